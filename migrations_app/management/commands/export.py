import os

from django.core.management.base import CommandError

from migrations_app.engine import keep

from . import _operations as op


class Command(op.JsonOutcome):
    help = "Write a kept checkpoint into one zstd-compressed archive with its manifest."

    def add_arguments(self, parser):
        parser.add_argument("--checkpoint", required=True, help="the checkpoint's name")
        parser.add_argument("--output", required=True, help="the archive to write (e.g. cp.tar.zst)")
        parser.add_argument("--json", action="store_true", help="print one JSON object at the end")

    def handle(self, checkpoint, output, **options):
        if os.path.exists(output):
            raise CommandError(f"{output} exists; remove it or name another file")
        cp = op.checkpoint(checkpoint)
        run = op.create(keep.create_export_run, cp, os.path.abspath(output))
        op.execute(self, run, options["json"], extra=lambda r: {"output": r.state.get("output")})
