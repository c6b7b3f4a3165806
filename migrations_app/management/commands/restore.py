from migrations_app.engine import keep

from . import _operations as op


class Command(op.JsonOutcome):
    help = "Restore a kept checkpoint: in place, onto another host (--host), or under a new name (--as)."

    def add_arguments(self, parser):
        parser.add_argument("--checkpoint", required=True, help="the checkpoint's name")
        parser.add_argument("--host", help="restore onto this host (default: the checkpoint's own)")
        parser.add_argument("--as", dest="new_name", help="the restored container's name (default: the original's)")
        parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
        op.add_enqueue(parser)

    def handle(self, checkpoint, host, new_name, **options):
        cp = op.checkpoint(checkpoint)
        target = op.host(host) if host else None
        run = op.create_or_enqueue(self, options, keep.create_restore_run, cp, target, new_name)
        if run is not None:
            op.execute(self, run, options["json"])
