from migrations_app.engine import keep
from migrations_app.models import CONTAINER, PROCESS

from . import _operations as op


class Command(op.JsonOutcome):
    help = "Take a kept checkpoint of a running container or process tree on its host."

    def add_arguments(self, parser):
        parser.add_argument("--host", required=True, help="the workload's host")
        what = parser.add_mutually_exclusive_group(required=True)
        what.add_argument("--container", help="container name or id")
        what.add_argument("--pid", help="PID of the process tree's root")
        parser.add_argument("--name", help="the checkpoint's name (unique; default: workload and time)")
        parser.add_argument(
            "--leave-running", action="store_true", help="keep the workload running after its freeze (else it stops)"
        )
        parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
        op.add_enqueue(parser)

    def handle(self, host, container, pid, name, leave_running, **options):
        kind, workload = (CONTAINER, container) if container is not None else (PROCESS, pid)
        run = op.create_or_enqueue(
            self, options, keep.create_checkpoint_run, op.host(host), kind, workload, name, leave_running
        )
        if run is not None:
            op.execute(self, run, options["json"])
