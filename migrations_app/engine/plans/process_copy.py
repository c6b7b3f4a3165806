"""Process trees, stop and copy: the reference plan.

criu dump into a directory on the source, the images streamed host to host
through the controller, criu restore on the target in new PID and mount
namespaces held by a small init (as criu-ns does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import criu, ssh
from ...models import PROCESS, STOP_AND_COPY, Stage
from .. import streams
from ..errors import MigrationError
from ..hostcheck import SPACE_MARGIN, check_space, connect, criu_ready, pid_alive, settle, unsafe_to_resume
from ..plan import Measured, Plan, Step

if TYPE_CHECKING:
    from ..runner import Context


@dataclass
class ProcessState:
    pid: int = 0
    resolved: list | None = None  # criu.resolve_process(): mode, PID inside, comm
    rss: int = 0
    src_images: str = ""
    dst_images: str = ""
    dumped: bool = False
    target_pid: int | None = None


# Resident KiB of every process of the tree rooted at $1, one per line: the
# size estimate, in one round trip. A process gone meanwhile counts nothing.
TREE_RSS_SCRIPT = r"""
walk() {
    awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null
    for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do walk "$c"; done
}
walk "$1"
true
"""


def preflight_source(ctx: Context):
    ctx.src = connect(ctx.source, PROCESS)
    probe = criu_ready(ctx.src)
    try:
        pid = int(ctx.run.workload)
    except ValueError:
        raise MigrationError(f"{ctx.run.workload!r} is not a PID") from None
    mode, inner, comm = criu.resolve_process(ctx.src, pid)
    rss = sum(int(kib) for kib in ctx.src.sh(TREE_RSS_SCRIPT, str(pid)).stdout.split()) * 1024
    images = ctx.images_dir(ctx.source)
    check_space(ctx.src, images, rss + SPACE_MARGIN, "the process images")
    s = ctx.state
    s.pid, s.src_images, s.rss, s.resolved = pid, images, rss, [mode, inner, comm]
    ctx.run.expected_bytes = rss
    where = "in its own PID namespace" if mode == "ns" else "in the host PID namespace"
    return Measured(detail=f"CRIU {probe['version']}, PID {pid} ({comm}) {where}, ~{rss // 1024} KiB resident")


def preflight_target(ctx: Context):
    ctx.dst = connect(ctx.target, PROCESS)
    probe = criu_ready(ctx.dst)
    # The namespace holder that keeps restored PIDs apart is a Python script.
    if ctx.dst.run(["python3", "-c", "pass"], check=False).rc != 0:
        raise MigrationError(f"{ctx.target.name}: python3 is needed to restore a process and is missing")
    images = ctx.images_dir(ctx.target)
    check_space(ctx.dst, images, ctx.state.rss + SPACE_MARGIN, "the process images")
    ctx.state.dst_images = images
    return Measured(detail=f"CRIU {probe['version']}")


def dump(ctx: Context):
    s = ctx.state
    try:
        criu.dump(ctx.src, s.pid, s.src_images, s.resolved)
    except criu.CriuError:
        # CRIU resumes the tree when a dump fails; nothing to restore then.
        if pid_alive(ctx.src, s.pid):
            ctx.set_stage(Stage.PREPARING)
        raise
    s.dumped = True
    return Measured(
        criu_stats=criu.read_stats(ctx.src, f"{s.src_images}/stats-dump"),
        log=ctx.src.read_file(f"{s.src_images}/dump.log", check=False) or "",
        detail=f"images in {s.src_images}",
    )


def transfer(ctx: Context):
    return Measured(bytes=streams.copy_dir(ctx, ctx.state.src_images, ctx.state.dst_images))


def restore(ctx: Context):
    images = ctx.state.dst_images
    ctx.set_stage(Stage.RESTORING)
    try:
        pid = criu.restore(ctx.dst, images)
        ctx.resumed_at = time.perf_counter()
    except criu.CriuError as e:
        if e.definitive:  # CRIU said it failed: nothing runs there
            ctx.set_stage(Stage.FROZEN)
        raise
    ctx.state.target_pid = pid
    return Measured(
        criu_stats=criu.read_stats(ctx.dst, f"{images}/stats-restore"),
        log=ctx.dst.read_file(f"{images}/restore.log", check=False) or "",
        detail=f"PID {pid}",
    )


def verify(ctx: Context):
    pid = ctx.state.target_pid
    if not settle(lambda: pid_alive(ctx.dst, pid)):
        raise MigrationError(f"{ctx.target.name}: restored process {pid} is not running")
    ctx.run.result_workload = str(pid)
    return Measured(detail=f"PID {pid} running")


def cleanup(ctx: Context):
    ctx.dst.run(["rm", "-rf", "--", ctx.state.dst_images])
    if ctx.run.keep_source:
        return Measured(detail=f"images kept in {ctx.state.src_images}")
    ctx.src.run(["rm", "-rf", "--", ctx.state.src_images])
    return Measured(detail="images removed on both hosts")


def rollback(ctx: Context):
    s = ctx.state
    if s.dst_images:
        try:
            with ssh.Connection(ctx.target) as dst:
                criu.kill_restored(dst, s.dst_images, s.target_pid)
                dst.run(["rm", "-rf", "--", s.dst_images], check=False)
        except ssh.SSHError as e:
            if ctx.target_may_run:
                raise unsafe_to_resume(ctx, e) from e
    with ssh.Connection(ctx.source) as src:
        if not s.dumped:
            # The dump's answer was lost: the tree still runs, or CRIU
            # finished and its images are complete (inventory.img is last).
            if pid_alive(src, s.pid):
                ctx.run.result_workload = str(s.pid)
                return Measured(detail=f"PID {s.pid} still running on {ctx.source.name}")
            if src.run(["test", "-s", f"{s.src_images}/inventory.img"], check=False).rc != 0:
                raise MigrationError(f"{ctx.source.name}: the process stopped and no images were written")
        pid = criu.restore(src, s.src_images)
        ctx.resumed_at = time.perf_counter()
        if not settle(lambda: pid_alive(src, pid)):
            raise MigrationError(f"{ctx.source.name}: the process does not stay running after rollback")
        ctx.run.result_workload = str(pid)
        src.run(["rm", "-rf", "--", s.src_images], check=False)
    return Measured(detail=f"PID {pid} running again on {ctx.source.name}")


def abort(ctx: Context):
    for conn, path in ((ctx.src, ctx.state.src_images), (ctx.dst, ctx.state.dst_images)):
        if conn is not None and path:
            conn.run(["rm", "-rf", "--", path], check=False)


PLAN = Plan(
    kind=PROCESS,
    strategy=STOP_AND_COPY,
    label="stop and copy",
    summary="criu dump to the source's disk, images streamed through the controller, restore on the target.",
    state=ProcessState,
    steps=(
        Step("pre-flight", "source", preflight_source),
        Step("pre-flight", "target", preflight_target),
        Step("dump", "source", dump, freezes=True),
        Step("transfer", "both", transfer),
        Step("restore", "target", restore, resumes=True),
        Step("verify", "target", verify, commits=True),
        Step("cleanup", "both", cleanup),
    ),
    rollback=rollback,
    abort=abort,
)
