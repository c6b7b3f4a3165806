"""Process trees, post-copy ("lazy"): restored at once, memory pulled afterwards.

The source dumps with --lazy-pages: CRIU writes the small images and then
serves the memory of the frozen tree from a page server of its own on the
source's address (with CRIU's TLS unless the pair is a trusted migration
network). The small images go to the target; there `criu lazy-pages`
connects to the source, and `criu restore --lazy-pages` (under the
namespace holder) returns as soon as the tree is rebuilt: the downtime
ends there. The pages then come over in the background, each one pulled
when the process touches it or pushed in order; that pull is its own phase.

Between the restore and the last page the workload depends on both hosts.
The source tree is dumped with --leave-stopped, so that it is killed only
once every page has arrived and both CRIUs exited 0. If the pull fails
before that, the target copy, which already ran and may have acted (written
files, answered requests), is killed, and the source tree goes on from its
state at the freeze: CRIU resumes it when its page server fails; when the
source's CRIU itself dies, the kernel lets it run again. The run then ends
failed and says so. (Without --leave-stopped, a lazy-pages daemon that
dies would look to the source's CRIU, in plain TCP, like a finished
transfer, and it would kill the source: page_server_serve takes a closed
connection for the end.)
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import criu, ssh
from ...models import LAZY, PROCESS, Phase
from .. import streams, tls
from ..errors import MigrationError
from ..hostcheck import (
    pid_alive,
    unsafe_to_resume,
)
from ..plan import Measured, Plan, Step
from . import process_copy
from ._process_streaming import (
    KILL_DUMP_SCRIPT,
    abort_source,
    close_waiting,
    host_ip,
    install_tls,
    kill_stopped_source,
    record_tls,
    refuse_kept_connections,
    remove_source_files,
    src_tls_dir,
    wake_source,
)
from .process_copy import TREE_RSS_SCRIPT, ProcessState

if TYPE_CHECKING:
    from ..runner import Context

PAGE_SIZE = 4096
# How often the page pull's progress is looked at and stored.
PULL_POLL_SECONDS = 0.5
# A free TCP port on $1, asked of the kernel.
FREE_PORT = r"""
import socket, sys
a = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET)
s.bind((a, 0))
print(s.getsockname()[1])
"""
# Resident KiB of the tree at $1 (what has arrived of its memory), or "-" once it is gone.
TREE_RSS_NOW = '[ -d "/proc/$1" ] || { echo -; exit 0; }\n' + TREE_RSS_SCRIPT


@dataclass
class LazyState(ProcessState):
    pages_in_images = False

    address: str = ""  # the source's address, where the lazy dump serves pages
    port: int = 0
    tls: bool = True
    dump_pid: int | None = None  # the source's criu dump, serving pages
    lazy_pid: int | None = None  # the target's criu lazy-pages
    # The dump left the source tree stopped (--leave-stopped, or still frozen
    # while it serves): woken on failure, killed once every page arrived.
    source_stopped: bool = False
    pulled: bool = False  # every page arrived and both CRIUs exited 0


def _dst_tls_dir(s: LazyState) -> str:
    # Beside the images: the images directory is unpacked from the source.
    return f"{s.dst_images}.tls"


def preflight_source(ctx: Context):
    measured = process_copy.preflight_source(ctx)
    refuse_kept_connections(ctx, "post-copy")
    s = ctx.state
    s.address = host_ip(ctx.source, "post-copy")
    # Picked before the freeze; a port taken meanwhile fails the dump, which
    # CRIU then undoes (it resumes the tree).
    s.port = int(ctx.src.run(["python3", "-c", FREE_PORT, s.address]).stdout.strip())
    record_tls(ctx)
    return measured


def preflight_target(ctx: Context):
    measured = process_copy.preflight_target(ctx)
    s = ctx.state
    detail = measured.detail + install_tls(ctx, (ctx.src, src_tls_dir(s)), (ctx.dst, _dst_tls_dir(s)))
    return Measured(detail=detail)


def prepare(ctx: Context):
    """The dump and the restore, started before the freeze, each in a shell waiting for the controller's word.

    The freeze then costs no SSH session and no shell start-up: a word to
    the source, its images through the controller into the target (where
    `criu lazy-pages` starts as soon as they are in place), a word to the
    target.
    """
    s = ctx.state
    extra = [*s.criu_opts, "--leave-stopped", "--lazy-pages", "--address", s.address, "--port", str(s.port)]
    if s.tls:
        extra += tls.criu_args(src_tls_dir(s))
    mode, inner, _ = s.resolved
    argv = criu.dump_argv(s.pid, s.src_images, None if mode == "root" else inner, extra)
    lazy = ["criu", "lazy-pages", "--page-server", "--address", s.address, "--port", str(s.port)]
    lazy += ["-D", s.dst_images, "-v4", "-o", "lazy-pages.log"]
    if s.tls:
        lazy += tls.criu_args(_dst_tls_dir(s))
    ctx.receiver = criu.RestoreReceiver(ctx.dst, s.dst_images, [*s.criu_opts, "--lazy-pages"], lazy_argv=lazy)
    ctx.sender = criu.DumpSender(ctx.src, s.src_images, argv, lazy=True)
    return Measured(detail="dump and restore waiting for the freeze")


def dump(ctx: Context):
    """Ends once the small images are written and the source serves its pages."""
    s = ctx.state
    # Neither is stored on its own (each commit is downtime here): the stage
    # (frozen) already tells a recovery to wake the source, a rollback finds
    # the dump by its images directory, and the state goes with the next
    # stage write.
    s.source_stopped = True
    # When the dump fails CRIU resumes the tree; the rollback checks.
    ctx.sender.dump(ctx.call_timeout())
    s.dump_pid = ctx.sender.pid
    return Measured(
        detail=f"small images written; PID {s.dump_pid} serves the memory on {s.address}:{s.port}"
        f"{' over TLS' if s.tls else ''}",
    )


def transfer(ctx: Context):
    """The small images, from the waiting dump's output into the waiting restore's input."""
    s = ctx.state
    sender = ctx.sender
    moved = streams.pipe(ctx, sender.chan, ctx.receiver.chan, "the small images", keep_dst=True, limit=sender.size)
    # The same channel then says when the dump has served every page.
    ctx.lazy_dump = sender.serving(f"{s.src_images}/dump.log")
    return Measured(bytes=moved, detail="images other than pages")


def start_lazy_pages(ctx: Context):
    """Started by the waiting restore's shell once the images are in place; here its readiness is awaited."""
    s = ctx.state
    ctx.receiver.unpacked()
    # Stored with the restore's stage write; until then the receiving
    # shell kills it if the controller goes.
    s.lazy_pid = ctx.receiver.lazy_pid
    return Measured(detail=f"PID {s.lazy_pid}, connected to {s.address}:{s.port} once the restore starts")


def restore(ctx: Context):
    """criu restore --lazy-pages: returns with the tree running, before its memory is all there."""
    receiver = ctx.receiver
    measured = process_copy.restore(
        ctx, extra=["--lazy-pages"], run=lambda options: receiver.restore(ctx.call_timeout())
    )
    ctx.lazy_pages = receiver.lazy_pages(f"{ctx.state.dst_images}/lazy-pages.log")
    return measured


def page_pull(ctx: Context):
    """Wait until every page has arrived: both CRIUs exit, 0 both, and the copy still runs."""
    s = ctx.state
    server, daemon = ctx.lazy_dump, ctx.lazy_pages
    last = 0.0
    # Cut off from the source, lazy-pages waits on its socket for ever (no
    # keepalive), and the copy, stopped in its page faults, with it.
    stall = ssh.stream_idle_timeout()
    seen, moved_at = -1, time.monotonic()
    while not (server.done() and daemon.done()):
        # A CRIU that failed ends the wait; one that succeeded waits for the other.
        if (server.done() and server.wait() != 0) or (daemon.done() and daemon.wait() != 0):
            break
        now = time.monotonic()
        if now - last >= PULL_POLL_SECONDS:
            last = now
            out = ctx.dst.sh(TREE_RSS_NOW, str(s.target_pid), check=False).stdout.split()
            if "-" in out:
                raise MigrationError(
                    f"{ctx.target.name}: the restored process {s.target_pid} ended during the page pull"
                )
            arrived = sum(int(kib) for kib in out if kib.isdigit()) * 1024
            if arrived != seen:
                seen, moved_at = arrived, now
            elif now - moved_at > stall:
                raise MigrationError(
                    f"the page pull stalled: no page arrived on {ctx.target.name} for {stall} s "
                    f"(CRIUWEB_STREAM_IDLE_TIMEOUT); {ctx.source.name}:{s.port} does not answer"
                )
            if ctx.current_timer is not None:
                Phase.objects.filter(pk=ctx.current_timer.phase.pk).update(bytes=arrived)
            if ctx.on_progress:
                ctx.on_progress("page pull", arrived, ctx.run.expected_bytes)
        time.sleep(0.05)
    dump_rc = server.wait() if server.done() else None
    lazy_rc = daemon.wait() if daemon.done() else None
    if dump_rc != 0 or lazy_rc != 0:
        causes = []
        if dump_rc not in (0, None):
            causes.append(f"{ctx.source.name}: criu dump serving the pages ended: {server.cause(dump_rc)}")
        if lazy_rc not in (0, None):
            causes.append(f"{ctx.target.name}: criu lazy-pages failed: {daemon.cause(lazy_rc)}")
        server.close()
        daemon.close()
        log = "\n".join(
            f"--- {w} ---\n{t}"
            for w, t in (("dump.log", server.log_tail()), ("lazy-pages.log", daemon.log_tail()))
            if t
        )
        raise criu.CriuError("; ".join(causes), log)
    s.pulled = True
    s.dump_pid = s.lazy_pid = None
    ctx.save_state()
    # CRIU's stats-dump is no help here: its page server starts the dump
    # statistics afresh (cr_page_server calls init_stats), so they come out
    # zero. lazy-pages logs its own count per process instead.
    counts = ctx.dst.run(
        ["grep", "-o", r"UFFD transferred pages: ([0-9]*/[0-9]*)", daemon.log_path], check=False
    ).stdout
    copied = total = 0
    for found in re.finditer(r"\((\d+)/(\d+)\)", counts):
        copied, total = copied + int(found[1]), total + int(found[2])
    return Measured(
        bytes=copied * PAGE_SIZE,
        criu_stats={"uffd_pages_copied": copied, "uffd_pages_total": total},
        log=ctx.src.read_file(f"{s.src_images}/dump.log", check=False) or "",
        detail=f"{copied} of {total} pages pulled from {s.address}:{s.port}{' over TLS' if s.tls else ''}",
    )


def cleanup(ctx: Context):
    s = ctx.state
    kill_stopped_source(ctx)
    ctx.dst.run(["rm", "-rf", "--", s.dst_images, _dst_tls_dir(s)])
    return remove_source_files(ctx)


def rollback(ctx: Context):
    s = ctx.state
    close_waiting(ctx)
    # A restore was started there: it is killed before the source wakes, so
    # two never run at once. Otherwise nothing can run there, and the source
    # wakes first: the target may be what failed.
    may_run = ctx.target_may_run
    # Whether a copy on the target ran: then this is no clean rollback.
    ran = may_run or s.target_pid is not None
    leftovers = _clear_target_of(ctx, may_run) if s.dst_images and may_run else ""
    with ssh.Connection(ctx.source) as src:
        # The lazy dump serves pages until every one is taken: ended, its
        # page server fails and the tree runs on (CRIU resumes it, or the
        # kernel does when CRIU itself dies).
        src.sh(KILL_DUMP_SCRIPT, s.src_images)
        process_copy._await_dump(src, s.src_images, 10)
        if not pid_alive(src, s.pid) and ran:
            raise MigrationError(
                f"{ctx.source.name}: process {s.pid} is gone and its copy on {ctx.target.name} was killed: "
                "the workload is lost"
            )
        wake_source(ctx, src, leftovers)
        src.run(["rm", "-rf", "--", s.src_images, src_tls_dir(s)], check=False)
    if s.dst_images and not may_run:
        leftovers = _clear_target_of(ctx, may_run=False)
        if leftovers:
            ctx.resumed_on_source(leftovers)
    note = f"; {leftovers}" if leftovers else ""
    if ran:
        return Measured(
            detail=f"copy on {ctx.target.name} killed; PID {s.pid} running again on {ctx.source.name}{note}",
            failed=(
                f"post-copy failed after the restore: the copy on {ctx.target.name} ran without all its memory "
                f"and was killed (what it did meanwhile may be lost or done again); PID {s.pid} runs on "
                f"{ctx.source.name} from its state at the freeze"
            ),
        )
    return Measured(detail=f"PID {s.pid} running again on {ctx.source.name}{note}")


def _clear_target_of(ctx: Context, may_run: bool) -> str:
    """Kill what the run started on the target and remove its files; what is left there, if anything."""
    s = ctx.state
    try:
        # On a fresh connection: the run's own may be what failed.
        with ssh.Connection(ctx.target) as dst:
            criu.kill_restored(dst, s.dst_images, s.target_pid, timeout=30)
            if s.lazy_pid:
                dst.run(["kill", "-KILL", str(s.lazy_pid)], check=False)
            dst.run(["rm", "-rf", "--", s.dst_images, _dst_tls_dir(s)], check=False)
    except ssh.SSHError as e:
        if may_run:
            raise unsafe_to_resume(ctx, e) from e
        return f"{s.dst_images} stays on {ctx.target.name} ({e})"
    return ""


def abort(ctx: Context):
    """Remove what the run made on both hosts while the tree runs on the source."""
    s = ctx.state
    close_waiting(ctx)
    if s.dst_images:
        process_copy._on(
            ctx.dst, ctx.target, lambda conn: conn.run(["rm", "-rf", "--", s.dst_images, _dst_tls_dir(s)], timeout=60)
        )
    if s.src_images:
        abort_source(ctx)


PLAN = Plan(
    kind=PROCESS,
    strategy=LAZY,
    label="post-copy (lazy pages)",
    summary=(
        "restored on the target at once, its memory pulled afterwards from the frozen source; until the last "
        "page arrives the workload depends on both hosts, and a failure then kills the target copy (which may "
        "have acted) and resumes the source from the freeze."
    ),
    state=LazyState,
    needs=("lazy",),  # the probe's self-test: a real lazy dump and restore (pipe limits, userfaultfd)
    steps=(
        Step("pre-flight", "source", preflight_source),
        Step("pre-flight", "target", preflight_target),
        Step("prepare", "both", prepare),
        Step("dump", "source", dump, freezes=True),
        Step("transfer", "both", transfer),
        Step("lazy-pages", "target", start_lazy_pages),
        Step("restore", "target", restore, resumes=True),
        Step("page pull", "both", page_pull),
        Step("verify", "target", process_copy.verify, commits=True),
        Step("cleanup", "both", cleanup),
    ),
    rollback=rollback,
    abort=abort,
)
