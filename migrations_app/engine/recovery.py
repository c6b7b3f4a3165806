"""Finishing runs whose controller died, from what the database recorded.

A run stores its stage before each change and its plan's state after each
phase. From those alone a recovery, in another process and with fresh
connections, knows what to do:

- preparing (never frozen), or leftovers (back on the source after a
  rollback that could not reach the target): remove what the run made;
- frozen or restoring: a copy restored on the target that runs is kept and
  the run completes forward (the plan's adopt); otherwise the target copy is
  made impossible to start and the workload restored on the source;
- verified: finish the cleanup.

Each recovered run ends with a message saying where its workload runs now,
and what a person must do when the recovery could not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from django.db.models import Q
from django.utils import timezone

from ..models import (
    FAILED,
    INTERRUPTED,
    PENDING,
    PHASE_FAILED,
    PHASE_RUNNING,
    ROLLED_BACK,
    RUNNING,
    SUCCEEDED,
    MigrationRun,
    Phase,
    Stage,
)
from . import lifecycle, plans
from .hostcheck import connect
from .plan import Measured
from .runner import STEP_ERRORS, Context, _describe, _detail, _PhaseTimer

log = logging.getLogger(__name__)

# Stages a recovery acts on whatever the run's status.
LEFTOVER_STAGES = (Stage.LEFTOVERS, Stage.VERIFIED)


def mark_gone() -> list[MigrationRun]:
    """Mark unfinished runs whose worker is gone as interrupted; return them.

    Queued runs are left alone: they wait for a worker, not on one. The
    conditional UPDATE (same status, worker and lease as read) makes the
    takeover atomic: of two workers that find the same run gone, one marks it.
    """
    marked = []
    now = lifecycle.db_now()
    for run in MigrationRun.objects.unfinished().select_related("source", "target"):
        if run.status == PENDING and not run.worker:
            continue
        if not lifecycle.worker_gone(run, now):
            continue
        message = lifecycle.gone_message(run.worker)
        n = MigrationRun.objects.filter(
            pk=run.pk, status=run.status, worker=run.worker, lease_expires=run.lease_expires
        ).update(status=INTERRUPTED, error=message)
        if n == 1:
            run.status, run.error = INTERRUPTED, message
            marked.append(run)
    return marked


def pending_recovery():
    """Runs the automatic recovery takes on: interrupted and not done, or with leftovers to clear."""
    return (
        MigrationRun.objects.filter(Q(status=INTERRUPTED) | Q(stage__in=LEFTOVER_STAGES))
        .exclude(status__in=(PENDING, RUNNING))
        .exclude(stage=Stage.DONE)
        .select_related("source", "target")
        .order_by("created")
    )


def recoverable(run: MigrationRun) -> bool:
    """Whether a person may ask for this run's recovery now (the run page's button)."""
    if run.stage == Stage.DONE:
        return False
    if run.status == PENDING and not run.worker:
        return False  # queued: a worker will take it
    if run.status in (PENDING, RUNNING, INTERRUPTED):
        # An interrupted run whose worker lives is being recovered by it.
        return lifecycle.worker_gone(run)
    return True


def recover_all(report: Callable[[MigrationRun], None] | None = None) -> list[MigrationRun]:
    """Recover every interrupted run and clear every run's leftovers; return the runs handled."""
    mark_gone()
    return _recover_each(pending_recovery(), report)


def take_over(report: Callable[[MigrationRun], None] | None = None) -> list[MigrationRun]:
    """Recover the runs whose worker is gone (dead here, or its lease run out); return them.

    What a worker's sweeper does every few seconds: unlike recover_all, it
    leaves the leftovers of finished runs alone (a host that stays
    unreachable is not retried every few seconds).
    """
    mark_gone()
    interrupted = MigrationRun.objects.filter(status=INTERRUPTED).exclude(stage=Stage.DONE)
    return _recover_each(interrupted.select_related("source", "target").order_by("created"), report)


def _recover_each(runs, report: Callable[[MigrationRun], None] | None) -> list[MigrationRun]:
    done = []
    for run in runs:
        if run.status == INTERRUPTED and not lifecycle.worker_gone(run):
            continue  # another process is recovering it
        result = recover(run)
        if result is not None:
            done.append(result)
            if report:
                report(result)
    return done


def _claim(run: MigrationRun) -> bool:
    """Take the run for this process's recovery; False if another process has it.

    Marked interrupted while it is recovered, with this process as its worker,
    so that others leave it alone and a recovery that dies is itself recovered.
    """
    fields = {}
    if run.status in (PENDING, RUNNING):
        if not lifecycle.worker_gone(run):
            return False
        fields["error"] = lifecycle.gone_message(run.worker)
    me = lifecycle.worker_id()
    lease = lifecycle.lease_until()
    # On the worker, status and lease as read: of two workers taking over one
    # run whose lease ran out, exactly one changes the row.
    n = MigrationRun.objects.filter(
        pk=run.pk, status=run.status, worker=run.worker, lease_expires=run.lease_expires
    ).update(status=INTERRUPTED, worker=me, lease_expires=lease, **fields)
    if n == 1:
        run.status, run.worker, run.lease_expires = INTERRUPTED, me, lease
    return n == 1


def recover(run: MigrationRun) -> MigrationRun | None:
    """Finish one run from its stored stage and state; None if another process is on it."""
    previous_status = run.status
    if run.stage == Stage.DONE or not _claim(run):
        return None
    try:
        with lifecycle.Lease(run):
            return _recover_claimed(run, previous_status)
    except lifecycle.LeaseLostError:
        return None  # this process stalled past its lease: the worker that took the run over recovers it


def _recover_claimed(run: MigrationRun, previous_status: str) -> MigrationRun:
    run = MigrationRun.objects.select_related("source", "target").get(pk=run.pk)
    cause = run.error or "interrupted"
    plan = plans.for_run(run)
    ctx = Context(run, plan)
    ctx.recovering = True
    stage = ctx.stage
    # The phase that was running when the worker died will never end.
    Phase.objects.filter(run=run, status=PHASE_RUNNING).update(status=PHASE_FAILED, ended=timezone.now(), detail=cause)
    timer = _PhaseTimer(run, ctx.seq, "recovery", _recovery_host(ctx, stage))
    try:
        status, message, detail = _act(ctx, stage, cause)
        timer.finish(Measured(detail=detail))
    except Exception as e:  # every failure must end with a message, not a traceback
        if not isinstance(e, STEP_ERRORS):
            log.exception("run %s: recovery failed", run.code)
        status = FAILED
        said = _describe(e, ctx, "the recovery")
        message = f"{cause}. Recovery failed: {said}. {_salvage(ctx, stage)}".strip()
        timer.finish(None, PHASE_FAILED, said, log=_detail(e, ctx))
    finally:
        ctx.close()
    if stage in LEFTOVER_STAGES and previous_status in (SUCCEEDED, ROLLED_BACK, FAILED):
        # Where the workload runs has not changed: it ran to its end, and
        # only the clearing after it was left (and failed now, maybe, again).
        status = previous_status
    run.status = status
    run.error = message
    run.finished = run.finished or timezone.now()
    ctx.save_run()
    log.info("run %s: %s: %s", run.code, run.status, run.error)
    return run


def _recovery_host(ctx: Context, stage: Stage) -> str:
    return ctx.host_for("source" if stage in (Stage.FROZEN, Stage.RESTORING) else "both")


def _act(ctx: Context, stage: Stage, cause: str) -> tuple[str, str, str]:
    """Do what the stage asks; return (status, message, phase detail)."""
    run = ctx.run
    what = f"the {run.kind} {run.workload}"
    if stage == Stage.PREPARING:
        ctx.plan.abort(ctx)
        ctx.set_stage(Stage.DONE)
        message = (
            f"{cause}, before anything was frozen. {what} runs on {ctx.source.name} as before; "
            f"what the run prepared is removed"
        )
        return FAILED, message, "prepared files and containers removed"
    if stage == Stage.LEFTOVERS:
        ctx.plan.abort(ctx)
        ctx.set_stage(Stage.DONE)
        where = run.result_workload or run.workload
        message = (
            f"{cause}. {what} runs on {ctx.source.name} ({where}); what the run left on {ctx.target.name} is removed"
        )
        return ROLLED_BACK, message, f"leftovers on {ctx.target.name} removed"
    if stage == Stage.RESTORING and ctx.plan.adopt is not None and _adopted(ctx):
        ctx.set_stage(Stage.VERIFIED)
        stage = Stage.VERIFIED
        cause += "; the copy restored on the target was found running and kept"
    if stage == Stage.VERIFIED:
        _finish_cleanup(ctx)
        ctx.set_stage(Stage.DONE)
        message = f"{cause}. {what} runs on {ctx.target.name} ({run.result_workload}); the cleanup is finished"
        return SUCCEEDED, message, f"runs on {ctx.target.name}; cleanup finished"
    # Frozen, or restoring with no copy found running on the target.
    measured = ctx.plan.rollback(ctx)
    leftovers = ctx.leftovers
    ctx.set_stage(Stage.LEFTOVERS if leftovers else Stage.DONE)
    salvage = _salvage_source(ctx)
    message = f"{cause}. Recovered: {what} runs on {ctx.source.name} again ({run.result_workload}{salvage})"
    if leftovers:
        message += f"; {leftovers}"
    if measured and measured.failed:
        # The workload ran on the target before this (post-copy): not a rollback.
        return FAILED, f"{message}; {measured.failed}", measured.detail
    return ROLLED_BACK, message, measured.detail if measured else "rolled back"


def _adopted(ctx: Context) -> bool:
    try:
        return bool(ctx.plan.adopt(ctx))
    except Exception as e:  # it cannot tell: the rollback decides safely
        log.warning("run %s: looking for the restored copy failed: %s", ctx.run.code, e)
        return False


def _finish_cleanup(ctx: Context) -> None:
    """The steps after the plan's committing step, on fresh connections."""
    steps = ctx.plan.steps
    last_commit = max(i for i, s in enumerate(steps) if s.commits)
    ctx.src = connect(ctx.source, ctx.run.kind)
    ctx.dst = connect(ctx.target, ctx.run.kind)
    for step in steps[last_commit + 1 :]:
        step.run(ctx)


def _salvage_source(ctx: Context) -> str:
    s = ctx.state
    if hasattr(s, "source_stopped"):
        # Plans that keep the source stopped wake it: no restore from images.
        return ", woken where it was stopped"
    if getattr(s, "checkpoint", ""):
        return f", restored from checkpoint {s.checkpoint}"
    if getattr(s, "src_images", ""):
        return f", restored from the images in {s.src_images}"
    return ""


def _salvage(ctx: Context, stage: Stage) -> str:
    """What a person must do when the recovery could not: where the checkpoint or images are."""
    s = ctx.state
    src, dst = ctx.source.name, ctx.target.name
    if stage in (Stage.PREPARING, Stage.LEFTOVERS):
        return f"The workload runs on {src}; remove what the run left on {dst} by hand or retry the recovery."
    if stage == Stage.VERIFIED:
        return f"The workload runs on {dst}; the source's copy and files may remain on {src}."
    if getattr(s, "checkpoint", "") and getattr(s, "container", None):
        c = s.container
        name = c.get("Name", "").lstrip("/") or c.get("Id", "")[:12]
        return (
            f"Checkpoint {s.checkpoint} stays in {s.src_root}/containers/{c.get('Id', '')}/checkpoints on {src}; "
            f"once no copy runs on {dst}, run `docker start --checkpoint {s.checkpoint} {name}` on {src}."
        )
    if hasattr(s, "source_stopped") and getattr(s, "pid", 0):
        # Its memory is in the stopped tree, not in the source's images.
        return (
            f"Process {s.pid} may stay stopped on {src}; once no copy runs on {dst}, wake its tree there "
            f"with `kill -CONT` (its memory is in it, not in {s.src_images})."
        )
    if getattr(s, "src_images", ""):
        return (
            f"The images stay in {s.src_images} on {src}; once no copy runs on {dst}, restore them there "
            f"with `criu restore -D {s.src_images} --restore-detached`."
        )
    return f"Check {src} and {dst}."
