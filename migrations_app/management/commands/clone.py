from django.core.management.base import CommandError

from migrations_app.engine import keep
from migrations_app.models import CLONE, CONTAINER, PROCESS

from . import _operations as op


class Command(op.JsonOutcome):
    help = (
        "Clone a workload as a new one, from a kept checkpoint or from a running workload through a "
        "leave-running checkpoint; the original is left as it was."
    )

    def add_arguments(self, parser):
        parser.add_argument("--checkpoint", help="clone this kept checkpoint")
        parser.add_argument("--host", help="the running workload's host")
        what = parser.add_mutually_exclusive_group()
        what.add_argument("--container", help="running container name or id on --host")
        what.add_argument("--pid", help="PID of a running process tree on --host")
        parser.add_argument("--as", dest="new_name", help="the clone's name (containers)")
        parser.add_argument("--target", help="clone onto this host (default: the source's)")
        parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
        op.add_enqueue(parser)

    def handle(self, checkpoint, host, container, pid, new_name, target, **options):
        live = host is not None or container is not None or pid is not None
        if bool(checkpoint) == live:
            raise CommandError("give either --checkpoint, or --host with --container or --pid")
        dest = op.host(target) if target else None
        if checkpoint:
            cp = op.checkpoint(checkpoint)
            if cp.kind == CONTAINER and not new_name:
                raise CommandError("a container clone needs a new name: --as NAME")
            new = new_name if cp.kind == CONTAINER else None
            run = op.create_or_enqueue(self, options, keep.create_restore_run, cp, dest, new, operation=CLONE)
        else:
            if host is None or (container is None and pid is None):
                raise CommandError("a live clone needs --host and --container or --pid")
            kind, workload = (CONTAINER, container) if container is not None else (PROCESS, pid)
            if kind == CONTAINER and not new_name:
                raise CommandError("a container clone needs a new name: --as NAME")
            run = op.create_or_enqueue(
                self, options, keep.create_live_clone_run, op.host(host), kind, workload, new_name, dest
            )
        if run is not None:
            op.execute(self, run, options["json"])
