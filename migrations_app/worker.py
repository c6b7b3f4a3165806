"""Runs executed by workers, through Django's task framework.

The web and `migrate_workload --enqueue` create a run and enqueue it
(`enqueue`); workers (`manage.py criuweb_worker`, django-tasks-db's
`db_worker` with a sweeper beside it) take the tasks from the queue kept in
the database and execute them (`execute_run`). A run whose hosts have no free
place waits in the queue and looks again later; a run that ends wakes the
runs waiting for its hosts. A worker also takes over the runs of workers that
are gone (`sweep`). docs/workers.md tells the whole flow.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta

from django.conf import settings
from django.db import close_old_connections, connection
from django.db.models import Q
from django.utils import timezone
from django_tasks import TaskResultStatus, task

from . import engine
from .engine import lifecycle, recovery
from .engine.lifecycle import Claim
from .models import FAILED, PENDING, RUNNING, MigrationRun, Stage

log = logging.getLogger(__name__)

# Recoveries go before new runs: their workload may be frozen.
RECOVERY_PRIORITY = 50
# How many waiting runs an ending run wakes at once (the others look again
# on their own, every QUEUE_RETRY seconds).
WAKE_AT_MOST = 10
EXECUTE_RUN = "migrations_app.worker.execute_run"  # the task's path in the queue's table
# Seconds a queued run's task may stay due, no worker taking it, before the
# run page says so (an idle worker looks at the queue every second).
UNATTENDED_AFTER = 15
# What --enqueue adds on stderr: nothing executes the run unless a worker runs.
ENQUEUED_HINT = "a worker executes it: if none runs, start one (make worker, or manage.py criuweb_worker)"


def enqueue(run: MigrationRun) -> MigrationRun:
    """Put a pending run in the workers' queue; a worker executes it when its hosts have room."""
    execute_run.enqueue(str(run.code))
    return run


def submit(factory: Callable[..., MigrationRun], *args, **kwargs) -> MigrationRun:
    """Create a run with factory(*args, **kwargs) and enqueue it, both or neither.

    factory is engine.create_run or one of engine.keep's create_*_run; its
    MigrationError (bad input, a busy workload) goes to the caller.
    """
    with lifecycle.write_transaction():
        return enqueue(factory(*args, **kwargs))


def enqueue_recovery(run: MigrationRun) -> None:
    """Have a worker recover a run (the run page's "Recover now")."""
    recover_run.using(priority=RECOVERY_PRIORITY).enqueue(str(run.code))


@task()
def execute_run(code: str, retry: bool = True) -> str:
    """Claim the run if its hosts have room and execute it; else wait in the queue.

    retry: look again in QUEUE_RETRY seconds when the hosts are full. A
    wake-up (see _wake) does not: the run's own chain of looks goes on.
    """
    run = MigrationRun.objects.select_related("source", "target").filter(code=code).first()
    if run is None or run.status != PENDING:
        return "gone" if run is None else f"already {run.status}"
    taken = lifecycle.take(run)
    if taken == Claim.FULL:
        if retry:
            later = timezone.now() + timedelta(seconds=settings.QUEUE_RETRY)
            execute_run.using(run_after=later).enqueue(code, retry=True)
        return "queued"
    if taken == Claim.TAKEN:
        return "taken by another worker"
    try:
        engine.execute(run)
    except lifecycle.LeaseLostError:
        return "taken over by another worker after this one stalled past its lease"
    finally:
        _wake(run)
    return run.status


@task()
def recover_run(code: str) -> str:
    """Recover one run from what the database recorded (engine.recovery.recover)."""
    run = MigrationRun.objects.select_related("source", "target").filter(code=code).first()
    if run is None:
        return "gone"
    if not recovery.recoverable(run):
        return "nothing to recover, or its worker is at work on it"
    done = recovery.recover(run)
    _wake(run)
    return done.status if done else "taken by another worker"


def _wake(run: MigrationRun) -> None:
    """Wake the queued runs that wait for one of this run's hosts: a place may be free now."""
    hosts = {run.source_id, run.target_id}
    waiting = (
        MigrationRun.objects.queued()
        .filter(worker="")
        .filter(Q(source_id__in=hosts) | Q(target_id__in=hosts))
        .values_list("code", flat=True)[:WAKE_AT_MOST]
    )
    for code in waiting:
        execute_run.enqueue(str(code), retry=False)


def run_here(run: MigrationRun, say: Callable[[str], None] | None = None, **execute_options) -> MigrationRun:
    """Execute a pending run in this process, waiting for room on its hosts; return it.

    The CLI's foreground mode: the run is not enqueued but reserved for this
    process, and executed here within the same per-host limits. Waiting, it
    keeps its lease.
    """
    if not lifecycle.reserve(run):
        raise engine.MigrationError(f"run {run.code} was already started")
    said = False
    try:
        with lifecycle.Lease(run, statuses=(PENDING, RUNNING)):
            while (taken := lifecycle.take(run)) == Claim.FULL:
                if say and not said:
                    say(f"queued: position {run.queue_position}, waiting for a free place on "
                        f"{run.source.name} or {run.target.name}")  # fmt: skip
                    said = True
                time.sleep(min(settings.QUEUE_RETRY, 1))
                run.__dict__.pop("queue_position", None)
    except BaseException:
        # Ctrl-C while it waits: nothing was done, nothing is left to recover.
        MigrationRun.objects.filter(pk=run.pk, status=PENDING, worker=lifecycle.worker_id()).update(
            status=FAILED, stage=Stage.DONE, error="stopped while waiting in the queue", finished=timezone.now()
        )
        raise
    if taken != Claim.CLAIMED:
        raise engine.MigrationError(f"run {run.code} was already started")
    try:
        return engine.execute(run, **execute_options)
    except lifecycle.LeaseLostError:
        raise engine.MigrationError(
            f"run {run.code} was taken over by a worker while this process was stopped longer than its lease "
            f"({settings.RUN_LEASE} s); that worker finishes it: see the run's page"
        ) from None


def unattended_for(run: MigrationRun) -> float | None:
    """Seconds a queued run's task has been due with no worker taking it, once past UNATTENDED_AFTER; else None.

    Then every worker is busy, or none runs: the web cannot execute it, so
    the run page says so rather than "queued" alone.
    """
    from django_tasks_db.models import DBTaskResult, get_date_max

    if run.status != PENDING or run.worker:
        return None
    now = timezone.now()
    due = [
        enqueued if run_after == get_date_max() else run_after
        for enqueued, run_after in DBTaskResult.objects.ready()
        .filter(task_path=EXECUTE_RUN, args_kwargs__args__0=str(run.code))
        .values_list("enqueued_at", "run_after")
    ]
    waited = (now - min(due)).total_seconds() if due else 0
    return waited if waited > UNATTENDED_AFTER else None


def requeue_orphans() -> list[str]:
    """Queue again the queued runs that no task will look at any more; return their codes.

    A worker killed between taking a run's task and claiming the run leaves
    that task "running" for good, and a task that failed before the claim (a
    database error) ends the run's chain of looks: either way the run would
    stay queued forever. A run has a live task while one is ready (now or
    later), or was started lately: its worker is between taking it and
    claiming the run, or queueing its next look.
    """
    from django_tasks_db.models import DBTaskResult

    queued = {str(code) for code in MigrationRun.objects.queued().filter(worker="").values_list("code", flat=True)}
    if not queued:
        return []
    # Generous: the task's start is stamped by its worker's clock.
    lately = timezone.now() - timedelta(seconds=max(2 * settings.RUN_LEASE, 60))
    live = DBTaskResult.objects.filter(task_path=EXECUTE_RUN).filter(
        Q(status=TaskResultStatus.READY) | Q(status=TaskResultStatus.RUNNING, started_at__gte=lately)
    )
    orphans = sorted(queued - {t["args"][0] for t in live.values_list("args_kwargs", flat=True)})
    for code in orphans:
        log.warning("run %s: queued with no task left to execute it (its worker died?): queued again", code)
        execute_run.enqueue(code)
    return orphans


def sweep(startup: bool = False) -> list[MigrationRun]:
    """Take over the runs whose worker is gone and finish their recovery; return them.

    startup: also clear what finished runs left on their hosts (once, when a
    worker starts, as the web server used to: a failing host is not retried
    every few seconds).
    """
    runs = recovery.recover_all() if startup else recovery.take_over()
    for run in runs:
        log.warning("run %s recovered: %s: %s", run.code, run.status, run.error)
        _wake(run)
    # After the recoveries (a frozen workload goes first), and apart: a failure
    # here must not stop the takeovers of the next rounds.
    try:
        requeue_orphans()
    except Exception:
        log.exception("queueing again the queued runs whose task died failed")
    return runs


class Sweeper(threading.Thread):
    """A worker's thread that takes over gone workers' runs, a few times per lease period."""

    def __init__(self, period: float | None = None):
        super().__init__(name="criuweb-sweeper", daemon=True)
        self.period = period or max(settings.RUN_LEASE / 3, 0.5)
        self.stopped = threading.Event()

    def run(self) -> None:
        startup = True
        while True:
            close_old_connections()
            try:
                sweep(startup=startup)
                startup = False
            except Exception:  # the next round tries again
                log.exception("sweeping for runs of gone workers failed")
            finally:
                connection.close()
            if self.stopped.wait(self.period):
                return
