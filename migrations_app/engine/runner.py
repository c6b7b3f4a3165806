"""The runner: walks a plan's steps, times each phase, stores it, and when
anything fails after the freeze brings the workload back on the source.

A phase function takes the run's Context and returns what it measured
(bytes, CRIU statistics, a detail line). Every phase is timed on the
controller's clock, one timeline across both hosts. Tests call execute()
and the phase functions directly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from .. import criu, ssh
from ..docker_engine import Engine, EngineError
from ..models import (
    FAILED,
    PHASE_FAILED,
    PHASE_OK,
    PHASE_RUNNING,
    ROLLED_BACK,
    RUNNING,
    SUCCEEDED,
    MigrationRun,
    Phase,
    Stage,
)
from . import lifecycle, observe, plans
from .errors import MigrationError
from .plan import Measured, Plan, Step

log = logging.getLogger(__name__)

# Errors that end a run with a message rather than a traceback.
STEP_ERRORS = (ssh.SSHError, EngineError, criu.CriuError, MigrationError)

# A call made while the workload is frozen (a checkpoint, a restore, a
# removal) may take this long: a base plus an allowance per GiB of memory.
# Docker 20.10 needs about 7 s each way for 512 MiB (containerd's copies).
CALL_TIMEOUT_BASE = 30
CALL_TIMEOUT_PER_GIB = 30

# Test-only: "<phase>=<seconds>" makes the runner sleep that long right after
# the phase's action, before it is recorded — how the fault tests kill a CLI
# at a known point. Unset (the default) it does nothing.
TEST_PAUSE_ENV = "CRIUWEB_TEST_PAUSE_AFTER"


class FreezeLimitError(MigrationError):
    """The workload stayed frozen longer than its run allows."""


def freeze_limit(run: MigrationRun) -> float:
    """Seconds the run's workload may stay frozen: its own limit, or the configured one for its size."""
    if run.freeze_limit:
        return float(run.freeze_limit)
    return settings.FREEZE_LIMIT + settings.FREEZE_LIMIT_PER_GIB * (run.expected_bytes or 0) / 2**30


class Context:
    """What the phases of one run share: connections, the plan's state, the stage."""

    def __init__(self, run: MigrationRun, plan: Plan):
        self.run = run
        self.plan = plan
        self.source = run.source
        self.target = run.target
        self.src = None  # Engine (containers) or ssh.Connection (processes)
        self.dst = None
        self.state = plan.new_state(run.state or None)
        self.stage = Stage(run.stage)
        self.freeze_t: float | None = None  # perf_counter() when the workload was frozen
        self.resumed_at: float | None = None  # perf_counter() when it ran again
        self.current_timer: _PhaseTimer | None = None  # the phase in progress
        self.seq = run.phases.count() if run.pk else 0  # the next phase's number
        self.recovering = False
        # callable(phase name, bytes so far, bytes expected) while bytes move.
        self.on_progress = None
        self.watch = observe.Watch(self)  # the downtime seen from outside
        self.watchdog: _Watchdog | None = None
        self.leftovers = ""  # what a rollback could not remove from the target
        self.lease: lifecycle.Lease | None = None  # this process's lease on the run, while it executes it
        # Whose run it is, and in which status, as long as this process may act on it.
        self.owner = (run.worker, run.status)
        self.lost = False  # another worker took the run over (LeaseLostError)

    # The stage answers the questions a failure asks.
    @property
    def frozen(self) -> bool:
        return self.stage in (Stage.FROZEN, Stage.RESTORING)

    @property
    def target_may_run(self) -> bool:
        return self.stage == Stage.RESTORING

    @property
    def committed(self) -> bool:
        return self.stage in (Stage.VERIFIED, Stage.DONE)

    def set_stage(self, stage: Stage) -> None:
        """Record a new stage in the database before acting on it."""
        self.stage = stage
        self.run.stage = stage
        self.save_state()

    def save_state(self) -> None:
        self.run.state = dataclasses.asdict(self.state)
        n = self._mine().update(stage=self.run.stage, state=self.run.state, result_workload=self.run.result_workload)
        if n == 0 and self.run.pk is not None:
            self._lost()

    def _mine(self):
        worker, status = self.owner
        return MigrationRun.objects.filter(pk=self.run.pk, worker=worker, status=status)

    def _lost(self, when: str = "") -> None:
        self.lost = True
        message = f"run {self.run.code} was taken over by another worker {when}".strip()
        log.error("%s (lease lost): this process leaves it", message)
        raise lifecycle.LeaseLostError(message)

    def ensure_mine(self, when: str = "") -> None:
        """Raise LeaseLostError if another worker took the run over (this one stalled past its lease).

        Asked before each step and before a rollback: a worker that resumes
        after the takeover must not restore, resume or remove anything. The
        lease thread may know it already; else the database tells.
        """
        worker, status = self.owner
        lost = self.lost or (self.lease is not None and self.lease.lost.is_set())
        if lost or not lifecycle.owns(self.run, worker, (status,)):
            self._lost(when)

    def save_run(self) -> None:
        """Save the whole run, unless it is no longer this process's (then LeaseLostError)."""
        fields = [f.attname for f in MigrationRun._meta.concrete_fields if not f.primary_key]
        if self.run.pk is None or self.lost or self._mine().update(**{f: getattr(self.run, f) for f in fields}) == 0:
            self._lost()

    def resumed_on_source(self, leftovers: str = "") -> None:
        """Record that the workload runs on the source again (a rollback's last word).

        From here a recovery must never restore it again, only clear what the
        run left on the target (leftovers, if any, says what).
        """
        self.leftovers = leftovers
        self.set_stage(Stage.LEFTOVERS)

    def host_for(self, side: str) -> str:
        return {"source": self.source.name, "target": self.target.name}.get(
            side, f"{self.source.name} -> {self.target.name}"
        )

    @property
    def src_ssh(self):
        return self.src.conn if isinstance(self.src, Engine) else self.src

    @property
    def dst_ssh(self):
        return self.dst.conn if isinstance(self.dst, Engine) else self.dst

    def images_dir(self, host) -> str:
        return f"{host.work_dir.rstrip('/')}/runs/{self.run.code}"

    def call_timeout(self, base: float = CALL_TIMEOUT_BASE, per_gib: float = CALL_TIMEOUT_PER_GIB) -> float:
        """Seconds one call may take: sized by the workload, never past the freeze limit."""
        sized = base + per_gib * (self.run.expected_bytes or 0) / 2**30
        if self.watchdog is not None and not self.watchdog.stopped.is_set():
            # One second past the limit: the watchdog, not the call, says why.
            sized = min(sized, max(1.0, self.watchdog.remaining() + 1))
        return sized

    def interrupt(self) -> None:
        """Make whatever call is blocked on the run's connections fail now (from another thread)."""
        for side in (self.src, self.dst):
            if side is not None:
                try:
                    side.interrupt()
                except Exception:  # closing must not fail the watchdog
                    log.exception("run %s: interrupting a connection", self.run.code)

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
        for side in (self.src, self.dst):
            if side is not None:
                side.close()


class _Watchdog:
    """Ends the freeze when it lasts longer than the run's limit.

    A call blocked on a host that stopped answering (an engine SIGSTOPped, a
    network cut) has nothing to notice a deadline with. When the limit
    passes with the workload still frozen, the watchdog closes the run's
    connections under it: the blocked call fails at once and the runner
    rolls back on fresh connections.
    """

    def __init__(self, ctx: Context, limit: float):
        self.ctx = ctx
        self.limit = limit
        self.deadline = time.monotonic() + limit
        self.stopped = threading.Event()
        self.fired = False
        self.thread = threading.Thread(target=self._watch, name=f"freeze-{ctx.run.code}", daemon=True)
        self.thread.start()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def stop(self) -> None:
        self.stopped.set()

    def _watch(self) -> None:
        if self.stopped.wait(self.limit):
            return
        ctx = self.ctx
        if ctx.resumed_at is not None or ctx.committed or ctx.recovering:
            return
        self.fired = True
        log.warning("run %s: frozen for %g s, its limit: interrupting", ctx.run.code, self.limit)
        ctx.interrupt()


class _PhaseTimer:
    def __init__(self, run, seq, name, host):
        self.phase = Phase.objects.create(run=run, seq=seq, name=name, host=host, started=timezone.now())
        self.t0 = time.perf_counter()

    def finish(self, measured, status=PHASE_OK, error="", log_excerpt="", log=""):
        p = self.phase
        p.log_excerpt = log_excerpt
        p.duration_ms = (time.perf_counter() - self.t0) * 1000
        p.ended = p.started + timezone.timedelta(milliseconds=p.duration_ms)
        p.status = status
        if measured:
            p.bytes = measured.bytes
            p.criu_stats = measured.criu_stats
            p.detail = measured.detail
            p.log = measured.log[-1_000_000:]
        if error:
            p.detail = error
        if log:
            p.log = log
        p.save()
        return p


def _describe(error: BaseException, ctx: Context | None = None, during: str = "") -> str:
    """The run's message for an error: the one place exceptions become what a person reads.

    A lost SSH connection reads "<host>: the SSH connection was lost during
    <phase> (<what ran>)", whatever paramiko, docker-py or a stream said
    about it ("Socket is closed", "EOFError", "exit status 255"): those
    words go to the run's log (_detail). An error with a cause of its own
    (CRIU's, Docker's) that arrives while one of the run's connections is
    gone keeps its words first, the lost connection after them.
    """
    lost = _lost_connection(error, ctx)
    if lost is not None:
        return (
            f"{lost.host}: the SSH connection was lost"
            + (f" during {during}" if during else "")
            + (f" ({lost.what})" if lost.what else "")
        )
    own = str(error) or error.__class__.__name__
    gone = _gone_connection(error, ctx)
    if gone is not None:
        return f"{own}; and the SSH connection to {gone} was lost" + (f" during {during}" if during else "")
    return own


def _detail(error: BaseException, ctx: Context | None = None) -> str:
    """What _describe left out of the message, for the run's log ("" when it left out nothing)."""
    lost = _lost_connection(error, ctx)
    if lost is None:
        return ""
    said = f"{error.__class__.__name__}: {error}".rstrip(": ")
    return "\n".join(dict.fromkeys(x for x in (said, lost.detail) if x))


def _cut_off(error: BaseException) -> str:
    """What a call the watchdog cut off was doing: its connection was lost because the watchdog closed it."""
    lost = ssh.connection_lost(error)
    if lost is not None:
        return f"{lost.host}: {lost.what or 'no answer'}"
    return str(error) or "no answer"


# Words a message carries when what failed was the channel under it, not the
# command: paramiko's and docker-py's, and the ones criuweb writes for a
# command that ended without an exit status.
_LOSS_WORDS = (
    "Socket is closed", "SSH session not active", "EOFError", "Connection aborted",
    "no exit status", "channel lost", "exit status 255",
)  # fmt: skip


def _only_says_lost(error: BaseException) -> bool:
    """Whether error tells nothing but that a channel went away (so a gone connection is its cause).

    CRIU's or runc's failure with an exit status, or dockerd's answer (an
    EngineError that was answered, an HTTP error with a response), has a
    cause of its own.
    """
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, EngineError) and not e.answered:
            return True
        if isinstance(e, ssh.TRANSPORT_ERRORS) and getattr(e, "response", None) is None:
            return True
        if any(w in str(e) for w in _LOSS_WORDS):
            return True
        e = e.__cause__  # as ssh.connection_lost: an error raised while handling one may be its own
    return False


def _gone_connection(error: BaseException, ctx: Context | None) -> str | None:
    """The host of one of the run's connections that is gone, if any (None without a ctx, or on an interrupt)."""
    if ctx is None or isinstance(error, FreezeLimitError) or not isinstance(error, Exception):
        return None
    for host, conn in ((ctx.source, ctx.src_ssh), (ctx.target, ctx.dst_ssh)):
        if conn is not None and conn.lost():
            return host.name
    return None


def _lost_connection(error: BaseException, ctx: Context | None) -> ssh.ConnectionLost | None:
    """The lost SSH connection behind error, if that is what it comes from."""
    if isinstance(error, FreezeLimitError) or not isinstance(error, Exception):
        # The watchdog closed the connections itself; an interrupt is the person's.
        return None
    lost = ssh.connection_lost(error)
    if lost is None and _only_says_lost(error):
        # Errors raised straight from a channel of the run's own connections
        # name no host ("Socket is closed", a stream's missing exit status):
        # the connection that is gone does. Only those: a restore CRIU
        # refused on one host while the other's connection went keeps its
        # own words (_describe), or its real cause would reach only the log.
        host = _gone_connection(error, ctx)
        if host is not None:
            return ssh.ConnectionLost(host, "", f"{error.__class__.__name__}: {error}".rstrip(": "))
    return lost


def execute(run, after_phase=None, on_phase=None, on_progress=None):
    """Claim a pending run (unless this process claimed it) and run it to its end; return the run.

    Its lease is renewed while it runs (lifecycle.Lease).

    after_phase: optional {phase name: callable(ctx)} called after a phase
    succeeds — how tests make a real failure happen at a chosen point.
    on_phase: optional callable(phase) for each phase that ends (the CLI
    prints them).
    on_progress: optional callable(phase name, bytes so far, bytes expected)
    called while a transfer or a page pull runs, a few times a second.
    """
    if run.status != RUNNING or run.worker != lifecycle.worker_id():
        taken = lifecycle.take(run)
        if taken == lifecycle.Claim.FULL:
            raise MigrationError(f"run {run.code} must wait: {run.source.name} or {run.target.name} has no free place")
        if taken != lifecycle.Claim.CLAIMED:
            raise MigrationError(f"run {run.code} was already started")
    with lifecycle.Lease(run) as lease:
        return _execute(run, after_phase, on_phase, on_progress, lease)


# Another worker took the run over: this process stalled past its lease, and the run is the other's now.
LeaseLostError = lifecycle.LeaseLostError


def _execute(run, after_phase, on_phase, on_progress, lease):
    plan = plans.for_run(run)
    on_phase = on_phase or (lambda phase: None)
    ctx = Context(run, plan)
    ctx.on_progress = on_progress
    ctx.lease = lease
    ctx.watch.start()
    try:
        failure = _run_steps(ctx, plan.steps, after_phase or {}, on_phase)
        if failure is None:
            run.status = SUCCEEDED
        else:
            _recover(ctx, failure, on_phase)
        return run
    except LeaseLostError:
        # The worker that took the run over recovers it from the database:
        # acting on the workload, or writing the run, here would undo that.
        raise
    except BaseException as e:
        # Ctrl-C in the CLI, or the process told to stop: bring the
        # workload back before going (once: not when recovery itself broke).
        if run.status == RUNNING and not ctx.recovering:
            _recover(ctx, e, on_phase)
        raise
    finally:
        ctx.watch.finish()
        ctx.close()
        if not ctx.lost:
            _save_end(ctx)


def _save_end(ctx: Context) -> None:
    """Store how the run ended, and whether a recovery has anything left to do (if it is still this process's)."""
    run = ctx.run
    if run.status == RUNNING:
        run.status = FAILED
        run.error = run.error or "stopped while bringing the workload back; check both hosts"
    elif run.stage == Stage.VERIFIED and run.status == SUCCEEDED and run.error:
        pass  # its cleanup failed: a recovery finishes it
    elif run.stage == Stage.LEFTOVERS:
        pass  # a recovery removes them
    elif run.status in (SUCCEEDED, ROLLED_BACK) or run.stage == Stage.PREPARING:
        # Nothing is left for a later recovery to do.
        run.stage = Stage.DONE
    run.finished = timezone.now()
    run.state = dataclasses.asdict(ctx.state)
    ctx.save_run()


def _run_steps(ctx: Context, steps: tuple[Step, ...], after_phase, on_phase):
    """Run the steps in order; return the exception that stopped them, or None."""
    run = ctx.run
    for step in steps:
        ctx.ensure_mine(f"before {step.name}")
        timer = None
        try:
            if step.when and not step.when(ctx):
                continue
            if step.freezes:
                ctx.watch.before_freeze()
            timer = _PhaseTimer(run, ctx.seq, step.name, ctx.host_for(step.side))
            ctx.current_timer = timer
            if step.freezes:
                # From here a failure must bring the workload back; stored
                # first, so that a recovery after a crash knows it too.
                ctx.set_stage(Stage.FROZEN)
                # Downtime counts from here: the freezing phase starts with
                # this stage write (a disk sync), and nothing is frozen
                # before the step itself acts.
                ctx.freeze_t = time.perf_counter()
                ctx.watchdog = _Watchdog(ctx, freeze_limit(run))
            measured = step.run(ctx) or Measured()
            _test_pause(step.name)
            if ctx.watchdog is not None and ctx.watchdog.fired:
                raise FreezeLimitError("its connections were closed")
            if (step.resumes or step.stops) and ctx.watchdog is not None:
                ctx.watchdog.stop()
            if step.commits:
                ctx.set_stage(Stage.VERIFIED)  # before any bookkeeping that could fail
            # One commit for the phase and the run: each costs a disk sync,
            # and between the freeze and the resume that is downtime.
            try:
                with transaction.atomic():
                    phase = timer.finish(measured)
                    if step.workload_bytes:
                        run.total_bytes += phase.bytes
                    else:
                        run.image_bytes += phase.bytes
                    if step.resumes and ctx.freeze_t is not None:
                        run.downtime_ms = ((ctx.resumed_at or time.perf_counter()) - ctx.freeze_t) * 1000
                    run.state = dataclasses.asdict(ctx.state)
                    fields = ("total_bytes", "image_bytes", "downtime_ms", "expected_bytes", "state")
                    if ctx._mine().update(**{f: getattr(run, f) for f in fields}) == 0:
                        ctx._lost(f"after {step.name}")  # its phase is rolled back with this write
            except Exception:
                timer.phase.status = PHASE_RUNNING  # not stored: the failure path records it failed
                raise
            ctx.seq += 1
            on_phase(phase)
            if step.freezes:
                ctx.watch.after_freeze()
            if step.commits:
                ctx.watch.committed()  # between phases: neither downtime nor a phase's time
            if step.name in after_phase:
                after_phase[step.name](ctx)
        except Exception as e:  # every failure must reach the rollback
            if ctx.watchdog is not None and ctx.watchdog.fired:
                # Whatever the interrupted call said, the cause is the limit.
                e = FreezeLimitError(
                    f"{step.name} did not end within the freeze limit of {ctx.watchdog.limit:g} s "
                    f"(the workload stayed frozen that long; its connections were closed): "
                    f"{_cut_off(e)}"
                )
            elif _lost_connection(e, ctx) is not None:
                log.warning("run %s: phase %s: %s", run.code, step.name, _detail(e, ctx))
            elif not isinstance(e, STEP_ERRORS):
                log.exception("run %s: phase %s", run.code, step.name)
            _fail_phase(ctx, e, on_phase)
            return e
    return None


def _test_pause(phase_name: str) -> None:
    """The test-only pause of TEST_PAUSE_ENV, when set for this phase."""
    wanted = os.environ.get(TEST_PAUSE_ENV)
    if wanted:
        name, _, seconds = wanted.rpartition("=")
        if name == phase_name:
            # The test waits for this line before it kills the process.
            print(f"criuweb test pause: after {phase_name}", file=sys.stderr, flush=True)
            time.sleep(float(seconds))


def _fail_phase(ctx: Context, error, on_phase):
    """Mark the phase in progress, if any, failed."""
    timer = ctx.current_timer
    if timer is None or timer.phase.status != PHASE_RUNNING:
        return
    try:
        during = timer.phase.name
        phase = timer.finish(
            None, PHASE_FAILED, _describe(error, ctx, during), getattr(error, "log_excerpt", ""), _detail(error, ctx)
        )
    except Exception:  # the database itself may be what failed
        log.exception("run %s: could not record the failed phase", ctx.run.code)
        return
    ctx.seq += 1
    on_phase(phase)


def _recover(ctx: Context, failure, on_phase):
    """After a failure: bring the workload back where it was, or say where it is."""
    run = ctx.run
    ctx.ensure_mine("before its rollback")  # a worker that stalled past its lease must not roll back
    ctx.recovering = True
    if ctx.watchdog is not None:
        ctx.watchdog.stop()
    failed = ctx.current_timer.phase.name if ctx.current_timer is not None else ""
    message = _describe(failure, ctx, failed)
    _fail_phase(ctx, failure, on_phase)
    if ctx.committed:
        # The workload runs verified on the target; what failed was cleanup.
        run.status = SUCCEEDED
        run.error = f"the workload runs on {ctx.target.name}, but afterwards: {message}"
        return
    if not ctx.frozen:
        try:
            ctx.plan.abort(ctx)
        except Exception as e:
            message += f" (cleaning up the target also failed: {_describe(e)}; a recovery retries it)"
            ctx.set_stage(Stage.LEFTOVERS)
        run.status = FAILED
        run.error = message
        return
    timer = _PhaseTimer(run, ctx.seq, "rollback", ctx.source.name)
    ctx.resumed_at = None
    try:
        measured = ctx.plan.rollback(ctx)
    except Exception as e:
        phase = timer.finish(None, PHASE_FAILED, _describe(e, during="the rollback"), log=_detail(e))
        run.status = FAILED
        run.error = f"{message}; rollback failed: {_describe(e, during='the rollback')}"
        unreachable = isinstance(e, ssh.SSHError) or isinstance(e, EngineError) and not e.answered
        if unreachable and "recover --run" not in run.error:
            # Workers' sweeps and plain `recover` leave such a run to a person
            # (the workload may be stopped on the source meanwhile): say how,
            # once the host answers again.
            run.error += (
                f'. Once that is fixed, `manage.py recover --run {run.code}` (the run page\'s "Recover now") '
                "finishes it from where it stopped"
            )
        log.error("run %s: %s", run.code, run.error)
    else:
        phase = timer.finish(measured)
        if measured.failed:
            # The workload ran on the target before this: not a rollback.
            run.status = FAILED
            run.error = f"{message}; {measured.failed}"
        else:
            run.status = ROLLED_BACK
            run.error = message
            # What the workload saw: stopped from the freeze until it ran again
            # on the source (or, when it never stopped, until the rollback ended).
            if ctx.freeze_t is not None:
                run.downtime_ms = ((ctx.resumed_at or time.perf_counter()) - ctx.freeze_t) * 1000
        if ctx.stage != Stage.LEFTOVERS or not ctx.leftovers:
            ctx.set_stage(Stage.DONE)
    on_phase(phase)
