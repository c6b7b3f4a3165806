"""A run's life outside its steps: creating it, claiming it within its
hosts' limits, the lease its worker holds on it, and telling whether that
worker still lives."""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import socket
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F
from django.utils import timezone

from .. import validation
from ..models import (
    CONTAINER,
    HOLDING,
    INTERRUPTED,
    PENDING,
    RUNNING,
    TCP_CHOICES,
    TCP_CLOSE,
    Host,
    MigrationRun,
    Stage,
)
from . import observe, plans
from .errors import MigrationError, WorkloadBusy

log = logging.getLogger(__name__)


def create_run(
    source, target, kind, workload, keep_source=False, strategy=None, probe="", tcp=TCP_CLOSE, shared_storage=False,
    freeze_limit=None, user=None,
):
    """Validate and store a pending run; MigrationError says what is wrong.

    user: who asked for it (the web's or the API's user; none from the CLI).

    probe: an optional host:port the controller polls during the run to
    see the downtime from outside (engine/observe.py).
    """
    if source.pk == target.pk:
        raise MigrationError("source and target must be different hosts")
    if kind not in plans.KINDS:
        raise MigrationError(f"unknown workload kind {kind!r}")
    strategy = strategy or plans.default_strategy(kind)
    plans.get(kind, strategy)  # raises MigrationError naming the choices
    if tcp not in dict(TCP_CHOICES):
        known = ", ".join(dict(TCP_CHOICES))
        raise MigrationError(f"unknown choice for TCP connections {tcp!r} (choose from: {known})")
    # The same checks as the form and the CLI, and nothing stripped: " 12"
    # is not PID 12.
    try:
        workload = validation.container_ref(workload) if kind == CONTAINER else str(validation.pid(workload))
    except validation.InputError as e:
        raise MigrationError(str(e)) from None
    probe = (probe or "").strip()
    if probe:
        try:
            observe.parse_address(probe)
        except ValueError as e:
            raise MigrationError(str(e)) from None
    if freeze_limit is not None and not 0 < freeze_limit <= 24 * 3600:
        raise MigrationError(f"the freeze limit must be between 0 and 86400 seconds, not {freeze_limit}")
    fields = dict(
        source=source, target=target, kind=kind, workload=workload, keep_source=keep_source, strategy=strategy,
        probe_address=probe, tcp=tcp, shared_storage=shared_storage, freeze_limit=freeze_limit, created_by=user,
    )  # fmt: skip
    busy = WorkloadBusy(f"{workload} on {source.name} is already being migrated")
    for other in MigrationRun.objects.unfinished().filter(source=source, kind=kind):
        if not _same_workload(kind, workload, other):
            continue
        if holds_workload(other):
            raise busy
        # Its process is gone (a killed CLI, a crashed server): it blocks nothing.
        MigrationRun.objects.filter(pk=other.pk, status=other.status).update(
            status=INTERRUPTED, error=gone_message(other.worker)
        )
    try:
        with transaction.atomic():
            return MigrationRun.objects.create(**fields)
    except IntegrityError:
        # Another request got there between the check and the insert.
        raise busy from None


def _same_workload(kind, workload, other):
    """Whether another run's workload is this one, as far as the names tell.

    A container named by its name in one run and by its id in another is
    caught here once pre-flight resolved the other's id; when both are still
    unresolved, claim_workload() catches it at pre-flight, before any freeze.
    """
    if other.workload == workload:
        return True
    if kind == CONTAINER and other.workload_id:
        return other.workload_id.startswith(workload) or other.workload_id == workload
    return other.workload_id == workload


def claim_workload(run, workload_id, busy: str = ""):
    """Record what a run's workload resolved to; MigrationError when another active run has it.

    The partial unique constraint one_active_run_per_workload_id makes this
    hold between two controllers too: of two runs naming one container two
    ways, the second to get here is refused before anything is frozen.
    busy: the refusal's message, for a run whose workload is not what it names.
    """
    try:
        with transaction.atomic():
            MigrationRun.objects.filter(pk=run.pk).update(workload_id=workload_id)
    except IntegrityError:
        raise MigrationError(
            busy or f"{run.workload} on {run.source.name} is already being migrated (by another run, by another name)"
        ) from None
    run.workload_id = workload_id


def restoring_here(run: MigrationRun) -> list[MigrationRun]:
    """Other runs of this kind whose copy may be running on this run's source, still undecided.

    Their stage is "restoring" (running, interrupted, or failed and waiting
    for `recover --run`): each may yet remove that copy and bring its
    workload back on its own source. A run that took the copy away meanwhile
    would leave two copies once the other rolls back.
    """
    return list(
        MigrationRun.objects.filter(target=run.source, kind=run.kind, stage=Stage.RESTORING)
        .exclude(pk=run.pk)
        .select_related("source")
    )


def refuse_arriving(run: MigrationRun, other: MigrationRun, what: str) -> None:
    """Refuse a run whose workload is the copy another run is still restoring on its source."""
    if other.status in (PENDING, RUNNING, INTERRUPTED):
        then = "move it once that run has ended"
    else:
        # Its rollback could not finish: a person's recovery decides which copy stays.
        then = f"finish that run first (manage.py recover --run {other.code})"
    raise MigrationError(
        f"{run.source.name}: {what} is the copy that run {other.code} is still restoring there from "
        f"{other.source.name}; that run may yet roll it back: {then}"
    )


def holds_workload(run: MigrationRun) -> bool:
    """Whether an unfinished run still has its workload: queued, or its worker at work on it."""
    if run.status == PENDING and not run.worker:
        return True  # in the workers' queue
    return not worker_gone(run)


def reserve(run: MigrationRun) -> bool:
    """Reserve a queued run for this process (the CLI's foreground mode); False if another has it.

    Reserved under this process's worker id and lease, it is no longer the
    workers' to take, and is known gone if this process dies before it ends.
    """
    me, lease = worker_id(), lease_until()
    n = MigrationRun.objects.filter(pk=run.pk, status=PENDING, worker__in=("", me)).update(
        worker=me, lease_expires=lease
    )
    if n == 1:
        run.worker, run.lease_expires = me, lease
    return n == 1


def gone_message(worker: str) -> str:
    """What happened to a run whose worker died, naming that worker."""
    if not worker:
        return "interrupted: the process that was to run it never started it"
    host, _, pid, _ = (worker.split(":") + ["", "", "", ""])[:4]
    return f"interrupted: the worker process that ran it (PID {pid} on {host}, worker {worker}) is gone"


def worker_id(pid=None):
    """hostname:boot id:pid:start time of a process — unique across reboots and PID reuse."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{_boot_id()}:{pid}:{_start_time(pid)}"


def worker_alive(worker):
    """Whether the process that claimed a run (see worker_id) still runs."""
    if not worker:
        return False  # never claimed: its thread died before it began
    host, boot, pid, started = (worker.split(":") + ["", "", "", ""])[:4]
    if not _on_this_machine(worker):
        return True  # another machine's worker: not ours to judge
    if not pid.isdigit():
        return False
    # Same boot and the same start time: the same process, not a reused PID.
    return started != "None" and worker == worker_id(int(pid))


def _on_this_machine(worker: str) -> bool:
    """Whether a worker id names this machine: its host name and its boot.

    The host name alone does not (cloned machines, "localhost"): a PID of
    another machine looked at here would say its live worker is gone. A
    worker of this machine from before its last boot counts as elsewhere:
    its lease, which nobody renews any more, tells.
    """
    host, boot = (worker.split(":") + ["", ""])[:2]
    return host == socket.gethostname() and boot == _boot_id()


def _boot_id():
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()[:8]


def _start_time(pid):
    """The process's start time in clock ticks since boot, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def worker_gone(run: MigrationRun, now: datetime | None = None) -> bool:
    """Whether the process that claimed a run (or reserved it, or recovers it) is gone.

    On this machine its PID tells at once. Elsewhere only its lease does: it
    is gone once the lease ran out (a run with no lease, from before leases,
    is not ours to judge).
    """
    if not run.worker:
        return True  # nobody claimed it (a queued run is not a claimed one: see holds_workload)
    if _on_this_machine(run.worker):
        return not worker_alive(run.worker)
    if run.lease_expires is None:
        # From before leases: this host name's worker from an earlier boot is gone, as it always was.
        return run.worker.split(":")[0] == socket.gethostname()
    return run.lease_expires is not None and run.lease_expires < (now or db_now())


def lease_until(now: datetime | None = None) -> datetime:
    return (now or db_now()) + timedelta(seconds=settings.RUN_LEASE)


def db_now() -> datetime:
    """The database's clock: leases are written and judged by it.

    Workers on several machines share the database, not a clock: by their
    own clocks, one behind by more than a lease would write leases already
    run out, and one ahead would see every other machine's run out.
    """
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("SELECT statement_timestamp()")  # now() would be the transaction's start
            return cursor.fetchone()[0]
        cursor.execute("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')")  # SQLite: UTC
        return datetime.fromisoformat(cursor.fetchone()[0]).replace(tzinfo=UTC)


class Claim(enum.Enum):
    CLAIMED = "claimed"  # this process runs it now
    TAKEN = "taken"  # another worker has it, or it ended
    FULL = "full"  # one of its hosts has no free place: it waits in the queue


def claim(run: MigrationRun) -> bool:
    """Mark a pending run running for this process; False if someone else did, or its hosts are full."""
    return take(run) == Claim.CLAIMED


def take(run: MigrationRun) -> Claim:
    """Claim a pending run for this process if its hosts have a free place.

    The count of the runs its hosts hold and the conditional UPDATE of the
    claim happen under a lock on the host rows, so two workers never both
    take the last place of a host, and never both take one run.
    """
    me = worker_id()
    with _hosts_locked({run.source_id, run.target_id}):
        # A run reserved by this process (the CLI's foreground mode) or queued.
        mine = MigrationRun.objects.filter(pk=run.pk, status=PENDING, worker__in=("", me))
        if not mine.exists():
            return Claim.TAKEN
        if not has_room(run):
            return Claim.FULL
        now = timezone.now()
        n = mine.update(status=RUNNING, started=now, worker=me, lease_expires=lease_until())
    if n != 1:
        return Claim.TAKEN
    run.status, run.started, run.worker = RUNNING, now, me
    return Claim.CLAIMED


def has_room(run: MigrationRun) -> bool:
    """Whether the run's hosts take one more run (see Host.max_source_runs, max_target_runs)."""
    hosts = {h.pk: h for h in Host.objects.filter(pk__in={run.source_id, run.target_id})}
    holding = MigrationRun.objects.filter(status__in=HOLDING).exclude(stage=Stage.DONE).exclude(pk=run.pk)
    if holding.filter(source_id=run.source_id).count() >= hosts[run.source_id].max_source_runs:
        return False
    if run.target_id == run.source_id:
        return True  # one place, as source
    as_target = holding.filter(target_id=run.target_id).exclude(source_id=F("target_id"))
    return as_target.count() < hosts[run.target_id].max_target_runs


@contextlib.contextmanager
def write_transaction() -> Iterator[None]:
    """A transaction that takes SQLite's write lock at its start (atomic() elsewhere).

    A deferred SQLite transaction that reads, then writes, fails at once
    (not after the busy timeout) when another connection writes meanwhile;
    one that begins IMMEDIATE waits its turn instead.
    """
    if connection.vendor != "sqlite" or connection.in_atomic_block:
        with transaction.atomic():
            yield
        return
    connection.ensure_connection()
    previous = connection.transaction_mode
    connection.transaction_mode = "IMMEDIATE"
    try:
        with transaction.atomic():
            yield
    finally:
        connection.transaction_mode = previous


@contextlib.contextmanager
def _hosts_locked(host_ids: set[int]) -> Iterator[None]:
    """A transaction that no other claim on these hosts runs beside.

    PostgreSQL locks the host rows (in id order, so two claims on crossed
    hosts cannot deadlock); SQLite has no row locks, and its write lock,
    taken at the start, makes the claims run one after the other.
    """
    with write_transaction():
        list(Host.objects.select_for_update().filter(pk__in=host_ids).order_by("pk").values_list("pk"))
        yield


class LeaseLostError(BaseException):
    """This process's claim on a run was taken over: it must not act on the run's workload any more.

    A BaseException, so that no step's `except Exception` turns it into a
    failure to roll back: the worker that took the run over recovers it.
    (runner.LeaseLostError is this class.)
    """


def owns(run: MigrationRun, worker: str, statuses: tuple[str, ...]) -> bool:
    """Whether the database still gives the run to worker, in one of these statuses.

    Only a clear "no" counts: when the database does not answer, the caller
    goes on as it would have without asking (its next write fails anyway).
    """
    if run.pk is None:
        return True
    try:
        return MigrationRun.objects.filter(pk=run.pk, worker=worker, status__in=statuses).exists()
    except DatabaseError as e:
        log.warning("run %s: could not check its claim: %s", run.code, e)
        return True


class Lease:
    """Keeps this process's lease on a run alive while it works on it.

    A thread renews it a few times per lease period, as long as the run is
    this process's in the status it had when the lease began (statuses: more
    than one for the CLI, whose reserved run becomes running). If it is no
    longer (a worker on another machine took it over after this one stalled
    longer than the lease), it stops renewing and sets `lost`; the runner,
    which also asks the database before each step (Context.ensure_mine),
    then leaves the run to the other worker, touching neither the workload
    nor the run's row.
    """

    def __init__(self, run: MigrationRun, statuses: tuple[str, ...] | None = None):
        self.pk = run.pk
        self.code = run.code
        self.worker = worker_id()
        self.statuses = statuses or (run.status,)
        self.stopped = threading.Event()
        self.lost = threading.Event()
        self.thread = threading.Thread(target=self._renew, name=f"lease-{run.code}", daemon=True)

    def __enter__(self) -> Lease:
        # A run inside a transaction not yet committed (a test's) is seen by
        # no other process, and another connection's write would wait on it.
        if not connection.in_atomic_block:
            self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(10)

    def _renew(self) -> None:
        period = max(settings.RUN_LEASE / 3, 0.2)
        try:
            while not self.stopped.wait(period):
                try:
                    n = MigrationRun.objects.filter(pk=self.pk, worker=self.worker, status__in=self.statuses).update(
                        lease_expires=lease_until()
                    )
                except DatabaseError as e:
                    # A busy database, or a connection the server dropped (the
                    # next query on it would fail too): the next renewal, on a
                    # fresh connection, may pass. A thread that ended here
                    # would let the lease run out under a live run.
                    log.warning("run %s: renewing the lease failed: %s", self.code, e)
                    with contextlib.suppress(DatabaseError):
                        connection.close()
                    continue
                if n == 0:
                    log.error("run %s: lease lost: the run is no longer this worker's (%s)", self.code, self.worker)
                    self.lost.set()
                    return
        finally:
            connection.close()
