"""The migration engine.

- plan.py: the shapes (Step, Measured, Plan);
- plans/: the registry and one module per (workload kind, strategy);
- runner.py: walks a plan, times and stores phases, recovers on failure;
- lifecycle.py: creating and claiming runs, worker liveness;
- streams.py: byte streams between hosts;
- hostcheck.py: checks on a host that several plans share.
"""

from .errors import MigrationError, WorkloadBusy
from .lifecycle import claim, create_run, worker_alive, worker_id
from .plan import Measured, Plan, Step
from .runner import Context, execute

__all__ = [
    "Context", "Measured", "MigrationError", "Plan", "Step", "WorkloadBusy", "claim", "create_run", "execute",
    "worker_alive", "worker_id",
]
