import os

from django.core.management.base import CommandError

from migrations_app.engine import keep

from . import _operations as op


class Command(op.JsonOutcome):
    help = 'Check an exported checkpoint archive and keep it on a host (printed as "checkpoint").'

    def add_arguments(self, parser):
        parser.add_argument("--host", required=True, help="the host to keep it on")
        parser.add_argument("--input", required=True, help="the archive (from the export command)")
        parser.add_argument("--name", help="the checkpoint's name there (default: the archive's, if free)")
        parser.add_argument("--json", action="store_true", help="print one JSON object at the end")

    def handle(self, host, input, name, **options):
        if not os.path.isfile(input):
            raise CommandError(f"no file {input}")
        run = op.create(keep.create_import_run, op.host(host), os.path.abspath(input), name)
        op.execute(self, run, options["json"])
