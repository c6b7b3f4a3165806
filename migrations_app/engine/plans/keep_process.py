"""Process trees: kept checkpoints, restores and clones, on the stop-and-copy plan's steps.

A restore always works on a copy of the kept images (CRIU writes its log and
the namespace holder its PID file beside them), so a checkpoint can be
restored again and again. Every restore runs under its own PID namespace
holder: a clone's PIDs cannot collide with the original's.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import TYPE_CHECKING

from django.utils import timezone

from ... import criu, ssh
from ...models import CHECKPOINT, CLONE, PROCESS, RESTORE, SUCCEEDED, Checkpoint, MigrationRun
from .. import keep, lifecycle
from ..errors import MigrationError
from ..hostcheck import connect, pid_alive, unsafe_to_resume
from ..plan import Measured, Plan, Step
from . import process_copy as pc

if TYPE_CHECKING:
    from ..runner import Context


@dataclass
class KeepProcessState(pc.ProcessState):
    keep_name: str = ""
    kept: str = ""
    start: str = ""  # the tree root's start time: with its PID, which process it was
    criu_version: str = ""
    kernel: str = ""


def leaving_running(ctx: Context) -> bool:
    return ctx.state.leave_running


def stopping(ctx: Context) -> bool:
    return not ctx.state.leave_running


def _original_runs(conn, s) -> bool:
    return bool(s.pid) and pid_alive(conn, s.pid) == s.start


# -- checkpoint ---------------------------------------------------------------------


def checkpoint_preflight(ctx: Context):
    measured = pc.preflight_source(ctx)
    s = ctx.state
    keep.name_free(s.keep_name)
    s.kept = keep.kept_dir(ctx.source, s.keep_name)
    if ctx.src.run(["test", "-e", s.kept], check=False).rc == 0:
        raise MigrationError(f"{ctx.source.name}: {s.kept} already exists")
    s.start = pid_alive(ctx.src, s.pid) or ""
    s.criu_version, s.kernel = keep.host_facts(ctx.src)
    return measured


def keep_images(ctx: Context):
    s = ctx.state
    # The images directory becomes the kept one's checkpoint/ (one rename, same disk).
    out = ctx.src.sh(
        'set -e; mkdir -p -- "$2"; mv -T -- "$1" "$2/checkpoint"; du -sb -- "$2" | cut -f1', s.src_images, s.kept
    ).stdout
    stats = criu.read_stats(ctx.src, f"{s.kept}/{keep.IMAGES}/stats-dump")
    frozen = stats["frozen_time"] / 1000 if stats.get("frozen_time") else None
    try:
        cp = keep.record(
            ctx, s.kept, int(out), workload=ctx.run.workload, workload_id=f"{s.pid}:{s.start}",
            leave_running=s.leave_running, criu_stats=stats, freeze_ms=frozen,
            config={"comm": s.resolved[2], "criu_opts": s.criu_opts},
            criu_version=s.criu_version, kernel=s.kernel,
        )  # fmt: skip
    except Exception:
        # The rollback restores from the images directory: put them back.
        ctx.src.sh('mv -- "$1/checkpoint" "$2" && rmdir -- "$1"', s.kept, s.src_images)
        raise
    how = f"left running, frozen {frozen:.0f} ms (CRIU's frozen_time)" if s.leave_running and frozen else "stopped"
    return Measured(bytes=int(out), criu_stats=stats, detail=f"kept as {cp.name} in {s.kept} ({how})")


def checkpoint_cleanup(ctx: Context):
    removed = keep.apply_retention(ctx.source, PROCESS, ctx.run.workload)
    return Measured(detail=f"retention removed {', '.join(removed)}" if removed else "")


def checkpoint_rollback(ctx: Context):
    s = ctx.state
    if s.leave_running or _original_runs_fresh(ctx):
        with ssh.Connection(ctx.source) as conn:
            conn.run(["rm", "-rf", "--", s.src_images], check=False)
        ctx.run.result_workload = str(s.pid)
        return Measured(detail=f"PID {s.pid} still running on {ctx.source.name}")
    if s.kept:
        # Kept and recorded, then the controller died before the run was
        # marked done: the images go back where the rollback restores from.
        keep.unrecord(ctx)
        with ssh.Connection(ctx.source) as conn:
            conn.sh(RECLAIM_SCRIPT, s.kept, s.src_images)
    return pc.rollback(ctx)


# $1 the kept directory, $2 the run's images directory.
RECLAIM_SCRIPT = r"""
if [ -d "$1/checkpoint" ] && [ ! -e "$2" ]; then mv -T -- "$1/checkpoint" "$2" && rmdir -- "$1"; fi
true
"""


def _original_runs_fresh(ctx: Context) -> bool:
    with ssh.Connection(ctx.source) as conn:
        return _original_runs(conn, ctx.state)


CHECKPOINT_PLAN = Plan(
    kind=PROCESS,
    strategy=CHECKPOINT,
    operation=CHECKPOINT,
    label="checkpoint (CRIU)",
    summary="criu dump (with --leave-running, or stopping the tree) into a kept directory on the host.",
    state=KeepProcessState,
    steps=(
        Step("pre-flight", "source", checkpoint_preflight),
        Step("dump", "source", pc.dump, freezes=True, resumes=True, when=leaving_running),
        Step("dump", "source", pc.dump, freezes=True, stops=True, when=stopping),
        Step("keep", "source", keep_images, commits=True),
        Step("cleanup", "source", checkpoint_cleanup),
    ),
    rollback=checkpoint_rollback,
    abort=pc.abort,
)


# -- restore and clone from a kept checkpoint ------------------------------------------------


def restore_preflight_source(ctx: Context):
    cp = ctx.run.checkpoint
    if cp is None:
        raise MigrationError("the checkpoint was deleted")
    ctx.src = connect(ctx.source, PROCESS)
    s = ctx.state
    s.src_images, s.rss = f"{cp.path}/{keep.IMAGES}", cp.size
    # A restore needs the dump's own options (--tcp-established, --tcp-close).
    s.criu_opts = list(cp.config.get("criu_opts") or [])
    if ctx.src.run(["test", "-s", f"{s.src_images}/inventory.img"], check=False).rc != 0:
        raise MigrationError(f"{ctx.source.name}: the files of checkpoint {cp.name} are gone from {cp.path}")
    return Measured(detail=f"checkpoint {cp.name}: {cp.size // 1024} KiB in {cp.path}")


def restore_preflight_target(ctx: Context):
    cp = ctx.run.checkpoint
    ctx.dst = connect(ctx.target, PROCESS)
    facts = keep.check_compatible(ctx.dst, cp.criu_version, cp.kernel, f"checkpoint {cp.name}")
    pid, _, start = cp.workload_id.partition(":")
    if ctx.run.operation == RESTORE and ctx.target == cp.host:
        if pid.isdigit() and pid_alive(ctx.dst, pid) == start:
            raise MigrationError(
                f"{ctx.target.name}: the checkpointed process {pid} still runs there; stop it to restore in place, "
                "or clone the checkpoint"
            )
        _refuse_a_running_copy(ctx, cp)
    measured = pc.preflight_target(ctx)
    measured.detail = f"{facts}, {measured.detail}"
    return measured


def _restores_of(cp: Checkpoint) -> list[MigrationRun]:
    """Runs that restored the checkpoint's process on its host, from it or any checkpoint of the
    same lineage (checkpoints of the process, of its restored copies, of theirs), newest first."""
    ids, found = {cp.workload_id}, {}
    while True:
        runs = MigrationRun.objects.filter(
            operation=RESTORE, kind=PROCESS, status=SUCCEEDED, target=cp.host,
            checkpoint__host=cp.host, checkpoint__workload_id__in=ids,
        ).exclude(pk__in=found).exclude(result_workload="")  # fmt: skip
        new = {r.pk: r for r in runs}
        if not new:
            return sorted(found.values(), key=lambda r: r.created, reverse=True)
        found.update(new)
        for r in new.values():
            lineage = f"{r.result_workload}:"
            kept = Checkpoint.objects.filter(host=cp.host, kind=PROCESS, workload_id__startswith=lineage)
            ids.update(kept.values_list("workload_id", flat=True))


# Of the target host, in one round trip: its boot time (wall clock, s), its
# uptime (s), its clock ticks per second, then the name of process $1.
PROC_CLOCK_SCRIPT = r"""
awk '/^btime / {print $2}' /proc/stat
cut -d' ' -f1 /proc/uptime
getconf CLK_TCK
cat /proc/"$1"/comm
"""

# How much younger than the restore that made it a process may look and
# still be taken for its copy: tick and /proc/uptime rounding, and the two
# clocks' drift over the copy's life. A process that reused the PID started
# after the restore ended, normally long after.
AGE_SLACK_S = 2.0


@dataclass
class _Seen:
    """A process as criuweb saw it on the target, for the message that names it."""

    pid: str
    comm: str
    started: str  # wall clock of the target host, UTC
    age_s: float  # by the target host's own clock


def _seen(conn, pid: str, start_ticks: str) -> _Seen | None:
    lines = conn.sh(PROC_CLOCK_SCRIPT, pid, check=False).stdout.split("\n", 3)
    try:
        btime, uptime, hz = int(lines[0]), float(lines[1]), int(lines[2])
    except (IndexError, ValueError):
        return None
    since_boot = int(start_ticks) / hz
    when = datetime.datetime.fromtimestamp(btime + since_boot, datetime.UTC)
    comm = lines[3].rstrip("\n") if len(lines) > 3 else ""
    return _Seen(pid, comm, f"{when:%Y-%m-%d %H:%M:%S} UTC", uptime - since_boot)


def _is_the_copy(run: MigrationRun, seen: _Seen, start_ticks: str, comm: str | None, asked: datetime.datetime) -> bool:
    """Whether the live process at the PID run restored is that run's copy, not one that reused the PID.

    A run that recorded the copy's start time (target_start) compares it:
    both read from the same host's /proc. For runs from before it did, the
    process must bear the checkpoint's name and be at least as old as the
    time since that run's restore ended: ages, each by one clock (the
    host's uptime, criuweb's), so the two clocks' offset does not count.
    """
    recorded = (run.state or {}).get("target_start")
    if recorded:
        return recorded == start_ticks
    if comm and seen.comm != comm:
        return False
    ended = run.phases.filter(name="restore").values_list("ended", flat=True).first() or run.finished
    if ended is None:
        return True  # nothing to compare: taken for the copy, the safe side
    return seen.age_s + AGE_SLACK_S >= (asked - ended).total_seconds()


def _refuse_a_running_copy(ctx: Context, cp: Checkpoint) -> None:
    """A copy an earlier in-place restore made of this process still runs: a second would be two copies.

    Unlike the original, a restored copy has a new PID (its own PID
    namespace); it is found through the runs that restored it. Two such
    restores at once are kept apart by claiming the process's identity.
    """
    comm = (cp.config or {}).get("comm")
    for run in _restores_of(cp):
        pid = run.result_workload
        # criuweb's clock read before the host's: a copy's age by the host
        # can then only come out larger than the restore's by criuweb.
        asked = timezone.now()
        start = pid.isdigit() and pid_alive(ctx.dst, pid)
        if not start:
            continue
        seen = _seen(ctx.dst, pid, start)
        if seen is None:
            # The host's clock facts could not be read: compare what can be.
            if (run.state or {}).get("target_start") not in (None, "", start):
                continue
            seen = _Seen(pid, comm or "?", "at an unknown time", 0.0)
        elif not _is_the_copy(run, seen, start, comm, asked):
            continue  # its PID was reused
        raise MigrationError(
            f"{ctx.target.name}: the process restored from checkpoint {run.checkpoint.name} by run "
            f"{str(run.code)[:8]} still runs there as PID {pid} (criuweb saw it named {seen.comm!r}, started "
            f"{seen.started} by {ctx.target.name}'s clock); check that PID {pid} is that copy "
            f"(`ps -o pid,lstart,args -p {pid}` on {ctx.target.name}) before stopping it to restore in place, "
            "or clone the checkpoint"
        )
    if cp.workload_id:
        lifecycle.claim_workload(
            ctx.run, cp.workload_id,
            busy=f"{ctx.target.name}: the process of checkpoint {cp.name} is being restored by another run; "
            "wait for that run to end",
        )  # fmt: skip


def _kill_copy(ctx: Context) -> None:
    """Remove a restored copy on the target (kill its namespace) and its images."""
    s = ctx.state
    if not s.dst_images:
        return
    try:
        with ssh.Connection(ctx.target) as dst:
            criu.kill_restored(dst, s.dst_images, s.target_pid)
            dst.run(["rm", "-rf", "--", s.dst_images], check=False)
    except ssh.SSHError as e:
        if ctx.target_may_run:
            raise unsafe_to_resume(ctx, e) from e


def restore_rollback(ctx: Context):
    _kill_copy(ctx)
    return Measured(detail="restored copy removed; the checkpoint is unchanged")


def abort(ctx: Context):
    # Never the kept images: only what this run made.
    if ctx.run.checkpoint_id:
        if ctx.dst is not None and ctx.state.dst_images:
            ctx.dst.run(["rm", "-rf", "--", ctx.state.dst_images], check=False)
        return
    pc.abort(ctx)


RESTORE_PLAN = Plan(
    kind=PROCESS,
    strategy=RESTORE,
    operation=RESTORE,
    label="restore (CRIU)",
    summary="A kept checkpoint's images copied and restored in new PID and mount namespaces.",
    state=KeepProcessState,
    steps=(
        Step("pre-flight", "source", restore_preflight_source),
        Step("pre-flight", "target", restore_preflight_target),
        Step("transfer", "both", pc.transfer),
        Step("restore", "target", pc.restore),
        Step("verify", "target", pc.verify, commits=True),
        Step("cleanup", "target", pc.cleanup),  # keep_source: the kept images stay
    ),
    rollback=restore_rollback,
    abort=abort,
)


# -- clone --------------------------------------------------------------------------------


def from_live(ctx: Context) -> bool:
    return not ctx.run.checkpoint_id


def clone_preflight_source(ctx: Context):
    return pc.preflight_source(ctx) if from_live(ctx) else restore_preflight_source(ctx)


def clone_preflight_target(ctx: Context):
    if not from_live(ctx):
        return restore_preflight_target(ctx)
    measured = pc.preflight_target(ctx)
    if ctx.target == ctx.source:
        # One host, one run: the images are read from one directory into another.
        ctx.state.dst_images += "-restore"
        ctx.dst.run(["mkdir", "-p", ctx.state.dst_images])
    return measured


def clone_rollback(ctx: Context):
    _kill_copy(ctx)
    s = ctx.state
    if from_live(ctx):
        with ssh.Connection(ctx.source) as src:
            if not pid_alive(src, s.pid):
                # CRIU left it stopped (a dump cut off midway): bring it back.
                return pc.rollback(ctx)
            src.run(["rm", "-rf", "--", s.src_images], check=False)
        ctx.run.result_workload = str(s.pid)
    return Measured(detail="clone removed; the original was left as it was")


CLONE_PLAN = Plan(
    kind=PROCESS,
    strategy=CLONE,
    operation=CLONE,
    label="clone (CRIU)",
    summary="A kept checkpoint, or a running tree through criu dump --leave-running, restored as a second "
    "tree in its own PID namespace.",
    state=KeepProcessState,
    steps=(
        Step("pre-flight", "source", clone_preflight_source),
        Step("pre-flight", "target", clone_preflight_target),
        Step("dump", "source", pc.dump, freezes=True, resumes=True, when=from_live),
        Step("transfer", "both", pc.transfer),
        Step("restore", "target", pc.restore),
        Step("verify", "target", pc.verify, commits=True),
        Step("cleanup", "both", pc.cleanup),
    ),
    rollback=clone_rollback,
    abort=abort,
)

PLANS = (CHECKPOINT_PLAN, RESTORE_PLAN, CLONE_PLAN)
