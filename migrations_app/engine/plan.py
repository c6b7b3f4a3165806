"""The shapes every plan is made of: steps, what a step measured, the plan itself."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .runner import Context


@dataclass
class Measured:
    """What one phase reports: bytes moved, CRIU's statistics, a line, a log."""

    bytes: int = 0
    criu_stats: dict = field(default_factory=dict)
    detail: str = ""
    log: str = ""
    # Set by a rollback that did all it could yet cannot call the run rolled
    # back (post-copy: the target copy ran, and may have acted, before it
    # was killed): what happened, and the run ends failed with it.
    failed: str = ""


@dataclass(frozen=True)
class Step:
    name: str
    side: str  # "source", "target" or "both": which host(s) the phase works on
    run: Callable[[Context], Measured | None]
    freezes: bool = False  # the workload stops at the start of this phase
    resumes: bool = False  # ... and runs again on the target at its end
    # ... or stays stopped for good at its end (a checkpoint that stops it):
    # what follows (copying its writable layer) is no downtime, so the freeze
    # limit ends here, though a failure still brings the workload back.
    stops: bool = False
    when: Callable[[Context], bool] | None = None  # when false for a run, the phase is not needed
    commits: bool = False  # once it succeeds the workload runs verified on the target
    workload_bytes: bool = True  # its bytes are the workload's (not e.g. its image)


@dataclass(frozen=True)
class Plan:
    """How one kind of workload moves with one strategy.

    state is the dataclass the steps fill in; it is stored with the run after
    every phase, so that a run whose controller died can be finished from
    the database.
    """

    kind: str
    strategy: str
    label: str
    steps: tuple[Step, ...]
    # Each takes a Context that may be built afresh from a stored run (no
    # connections open): a recovery after the controller died calls them.
    rollback: Callable[[Context], Measured]  # frozen: bring the workload back on the source
    abort: Callable[[Context], None]  # it runs on the source: remove what the run made
    state: type
    # Host capabilities (probe self-tests or CRIU features) both hosts need.
    needs: tuple[str, ...] = ()
    # Containers: it carries named local volumes' data to the target.
    moves_volumes: bool = False
    summary: str = ""
    # After a crash in the restore: whether the restored copy runs on the
    # target (recorded in the context if so), so the run completes forward
    # instead of losing what that copy did since. None: never adopted.
    adopt: Callable[[Context], bool] | None = None
    # "migrate", or the operation on kept checkpoints this plan does
    # (models.OPERATION_CHOICES); those are keyed by (operation, kind).
    operation: str = "migrate"

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.strategy)

    def new_state(self, saved: dict[str, Any] | None = None):
        return self.state(**(saved or {}))
