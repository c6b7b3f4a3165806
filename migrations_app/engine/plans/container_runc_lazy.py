"""Containers with post-copy (lazy pages), through runc under Docker.

The source is paused (`docker pause`) and checkpointed with `runc
checkpoint --lazy-pages --leave-running`: everything but the memory is
dumped, then CRIU serves the pages from the frozen container on a port of
the source's address. The small images, the writable layer and the log go
to the target; `criu lazy-pages` starts there, and a plain `docker start`
restores the container through criuweb's runtime with `runc restore
--lazy-pages`: it runs at once, and its pages arrive as it touches them or
in the background. The downtime ends when the start returns; the page pull
is its own phase, and the run is verified only when every page has arrived
(the source's runc and the target's daemon both exit 0).

Between the restore and the last page, the workload depends on both hosts.
If the pull fails, the target copy, which may already have acted, is
removed, and the source, which CRIU kept whole and frozen, runs again: the
run ends rolled back and says so. (CRIU left the cgroup frozen when it
finishes with --leave-running; when it dies before, the tasks run again
on their own, so the rollback freezes them once more and lets Docker
unpause them, keeping Docker's view and the container's state the same.)

The pages' connection uses CRIU's TLS unless the pair is a trusted
migration network (the source's options through the container's CRIU
configuration file, see container_runc.preflight_source_tls).
"""

from __future__ import annotations

import ipaddress
import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import criu, runc, ssh
from ...docker_engine import Engine
from ...models import CONTAINER, LAZY
from .. import tls
from ..errors import MigrationError
from ..plan import Measured, Plan, Step
from . import container_engine as engine_plan
from . import container_runc
from .container_runc import RuncContainerState

if TYPE_CHECKING:
    from ..runner import Context

PAGE_SIZE = 4096
# criu lazy-pages logs, per task, "UFFD transferred pages: (done/total)".
TRANSFERRED = re.compile(r"UFFD transferred pages: \((\d+)/(\d+)\)")


@dataclass
class RuncLazyState(RuncContainerState):
    src_address: str = ""  # where the source's CRIU serves pages
    port: int = 0
    runc_pid: int | None = None  # the source's serving runc checkpoint
    daemon_pid: int | None = None  # the target's criu lazy-pages
    paused: bool = False
    pulled: bool = False  # every page arrived: the target copy is whole


# On the word "go" (EOF: nothing is run; the shell is set up before the
# freeze), start `criu lazy-pages` in the background and report "listening <pid>" once
# its socket exists in the work directory (where the restore looks for it),
# then "exit <status>" when it has served every page. $1 images, $2 work,
# $3 source address, $4 port, then more options (TLS).
LAZY_PAGES_SCRIPT = r"""
images=$1 work=$2 addr=$3 port=$4; shift 4
read -r go || exit 0
[ "$go" = go ] || exit 0
mkdir -p "$work" && rm -f "$work/lazy-pages.socket" || { echo "exit 90"; exit 0; }
criu lazy-pages --page-server --address "$addr" --port "$port" -D "$images" -W "$work" -v4 -o lazy-pages.log "$@" \
    </dev/null >/dev/null 2>&1 &
pid=$!
i=0
while [ ! -S "$work/lazy-pages.socket" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then wait "$pid"; echo "exit $?"; exit 0; fi
    i=$((i + 1))
    if [ "$i" -gt 1000 ]; then kill -KILL "$pid"; wait "$pid"; echo "exit 124"; exit 0; fi
    sleep 0.01
done
echo "listening $pid"
wait "$pid"
echo "exit $?"
"""


class LazyPagesDaemon:
    """`criu lazy-pages` on the target, on an SSH channel of its own, set up before the freeze; start() starts it."""

    def __init__(self, conn: ssh.Connection, images: str, work: str, address: str, port: int,
                 extra: list[str] | None = None, timeout: int = 600):  # fmt: skip
        self.conn = conn
        self.work = work
        self.chan = conn.open_command(
            ["sh", "-c", LAZY_PAGES_SCRIPT, "sh", images, work, address, str(port), *(extra or [])],
            idle_timeout=timeout,
        )
        self.out = self.chan.makefile("r")
        self.pid: int | None = None

    def start(self) -> None:
        """Start the daemon (the images are in place); return once it listens."""
        self.chan.sendall(b"go\n")
        line = self.out.readline().split()
        if len(line) != 2 or line[0] != "listening":
            self.chan.close()
            raise criu.CriuError(f"{self.conn.name}: criu lazy-pages did not start: {self.cause()}", self.log_tail())
        self.pid = int(line[1])

    def close(self) -> None:
        self.chan.close()

    def log_tail(self) -> str:
        return criu.log_excerpt(self.conn.read_file(f"{self.work}/lazy-pages.log", check=False))

    def cause(self) -> str:
        return criu.first_error(self.log_tail()) or "see lazy-pages.log"

    def wait(self) -> int:
        return criu.wait_exit_line(self.out, self.chan)


def preflight_source(ctx: Context):
    try:
        ctx.state.src_address = str(ipaddress.ip_address(ctx.source.address))
    except ValueError:
        raise MigrationError(
            f"{ctx.source.name}: post-copy needs the host's address as an IP address (CRIU serves pages on it), "
            f"not {ctx.source.address!r}"
        ) from None
    return container_runc.preflight_source_tls(ctx, "post-copy")


def preflight_target(ctx: Context):
    measured = container_runc.preflight_target(ctx)
    if ctx.state.tls:
        # The source serves the pages: its CRIU is the TLS server, the
        # target's lazy-pages daemon the client; both before the freeze.
        container_runc.install_tls(ctx, ctx.state.src_address, server_on_source=True)
        measured.detail += "; CRIU's TLS certificates installed"
    return measured


def _open_lazy_checkpoint(ctx: Context) -> runc.LazyCheckpoint:
    s = ctx.state
    state = runc.RuncState(s.runc_binary, s.runc_root)
    try:
        return runc.LazyCheckpoint(ctx.src.conn, state, s.container["Id"], f"{s.src_base}/images",
                                   f"{s.src_base}/work", s.src_address, ["--leave-running"])  # fmt: skip
    except runc.RuncError as e:
        raise criu.CriuError(str(e), e.log_excerpt) from e


def prepare_target(ctx: Context):
    measured = container_runc.prepare_target(ctx)
    # The source's checkpoint shell too, with its port: inside the freeze
    # neither an SSH session nor Python starts for it.
    ctx.lazy_dump = _open_lazy_checkpoint(ctx)
    ctx.lazy_daemon = _open_lazy_daemon(ctx, ctx.lazy_dump.port)
    measured.detail += (
        f"; the source's lazy checkpoint (port {ctx.lazy_dump.port}) and the target's lazy-pages daemon set up, "
        f"waiting for the freeze"
    )
    return measured


def _open_lazy_daemon(ctx: Context, port: int) -> LazyPagesDaemon:
    s = ctx.state
    extra = tls.criu_args(f"{s.dst_base}/tls") if s.tls else []
    return LazyPagesDaemon(ctx.dst.conn, f"{s.dst_base}/images", f"{s.dst_base}/work", s.src_address, port, extra)


def checkpoint(ctx: Context):
    s = ctx.state
    # A run resumed by a recovery has no shell waiting: one is set up now.
    dump = getattr(ctx, "lazy_dump", None) or _open_lazy_checkpoint(ctx)
    ctx.lazy_dump = dump
    container_runc.pause_source(ctx)
    try:
        dump.start()
    except runc.RuncError as e:
        raise criu.CriuError(str(e), e.log_excerpt) from e
    s.runc_pid, s.port = dump.pid, dump.port
    ctx.save_state()
    return Measured(detail=f"source paused; everything but memory dumped; pages served on {s.src_address}:{s.port}")


def transfer(ctx: Context):
    s = ctx.state
    measured = container_runc.transfer(ctx, lazy=True)
    # Started now (it reads the images as it starts), so that the restore
    # finds its socket; its shell was set up before the freeze.
    daemon = getattr(ctx, "lazy_daemon", None) or _open_lazy_daemon(ctx, s.port)
    ctx.lazy_daemon = daemon
    daemon.start()
    s.daemon_pid = daemon.pid
    ctx.save_state()
    measured.detail += f"; criu lazy-pages listening (PID {daemon.pid})"
    return measured


def pull(ctx: Context):
    """Wait for every page to arrive: the run is verified only then."""
    s = ctx.state
    daemon_rc = ctx.lazy_daemon.wait()
    s.daemon_pid = None
    dump_rc = ctx.lazy_dump.wait()
    s.runc_pid = None
    ctx.save_state()
    if daemon_rc != 0:
        raise criu.CriuError(
            f"{ctx.target.name}: criu lazy-pages failed ({'no exit status' if daemon_rc == -1 else daemon_rc}): "
            f"{ctx.lazy_daemon.cause()}; the target copy had run with part of its memory",
            ctx.lazy_daemon.log_tail(),
        )
    if dump_rc != 0:
        raise criu.CriuError(
            f"{ctx.source.name}: runc checkpoint --lazy-pages failed "
            f"({'no exit status' if dump_rc == -1 else dump_rc}): {ctx.lazy_dump.cause()}",
            ctx.lazy_dump.log_tail(),
        )
    s.pulled = True
    ctx.save_state()
    # runc's lazy dump writes no useful statistics (all zero); the daemon's
    # log counts the pages it copied into each task.
    daemon_log = ctx.dst.conn.read_file(f"{s.dst_base}/work/lazy-pages.log", check=False) or ""
    pages = sum(int(done) for done, _ in TRANSFERRED.findall(daemon_log))
    return Measured(bytes=pages * PAGE_SIZE, log=daemon_log, detail=f"{pages} pages pulled; the source dump ended 0")


def cleanup(ctx: Context):
    return container_runc.cleanup_paused(ctx)


def _close_unstarted_dump(ctx: Context) -> None:
    """Close the shells set up before the freeze that were never told to go (they then run nothing)."""
    for name in ("lazy_dump", "lazy_daemon"):
        waiting = getattr(ctx, name, None)
        if waiting is not None and waiting.pid is None:
            waiting.close()


def rollback(ctx: Context):
    container_runc.close_transfer(ctx)
    _close_unstarted_dump(ctx)
    s = ctx.state
    c = s.container
    # The target copy first (it may run on part of its memory), with its daemon.
    if s.daemon_pid:
        try:
            with ssh.Connection(ctx.target) as dst:
                dst.run(["kill", "-KILL", str(s.daemon_pid)], check=False)
        except ssh.SSHError:
            pass  # the container's removal below decides
    leftovers = container_runc.disarm_target(ctx)
    with Engine(ctx.source, timeout=ctx.call_timeout()) as src:
        if s.runc_pid:
            # CRIU still serves (or waits for) the pages: stopped, the tasks it held run again.
            runc.stop_lazy(src.conn, s.runc_pid)
            s.runc_pid = None
        found = src.inspect(c["Id"])["State"]
        if not found["Running"]:
            raise MigrationError(f"{ctx.source.name}: the container stopped; nothing to resume")
        if found.get("Paused"):
            # Frozen again whatever CRIU left, so that Docker's unpause finds what it expects.
            runc.pause(src.conn, runc.RuncState(s.runc_binary, s.runc_root), c["Id"])
            src.call("docker unpause", src.api.unpause, c["Id"])
            ctx.resumed_at = time.perf_counter()
        return container_runc.finish_unpause(ctx, src, leftovers)


def adopt(ctx: Context) -> bool:
    """After a crash: keep the target copy only if every page was seen to arrive.

    Before that it may run on part of its memory, and keeping it would
    remove the source, the only whole copy.
    """
    return ctx.state.pulled and engine_plan.adopt(ctx)


def abort(ctx: Context):
    container_runc.close_transfer(ctx)
    _close_unstarted_dump(ctx)
    container_runc.abort(ctx)


PLAN = Plan(
    kind=CONTAINER,
    strategy=LAZY,
    label="post-copy (runc)",
    summary=(
        "the source paused and checkpointed by runc without its memory; restored at once on the target, "
        "which pulls the pages afterwards (CRIU's TLS unless the pair is trusted). Until the last page, the workload "
        "depends on both hosts: a failed pull removes the target copy, which may have acted, and resumes "
        "the source."
    ),
    state=RuncLazyState,
    needs=("lazy", *container_runc.NEEDS),
    steps=(
        Step("pre-flight", "source", preflight_source),
        Step("pre-flight", "target", preflight_target),
        Step("ship image", "both", engine_plan.ship_image, when=engine_plan.image_missing, workload_bytes=False),
        Step("prepare target", "target", prepare_target),
        Step("prepare source", "source", engine_plan.prepare_source, when=engine_plan.has_restart_policy),
        Step("checkpoint", "source", checkpoint, freezes=True),
        Step("transfer", "both", transfer),
        Step("restore", "target", container_runc.restore, resumes=True),
        Step("page pull", "both", pull),
        Step("verify", "target", engine_plan.verify, commits=True),
        Step("cleanup", "both", cleanup),
    ),
    rollback=rollback,
    abort=abort,
    moves_volumes=True,
    adopt=adopt,
)
