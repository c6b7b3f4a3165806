"""Process trees, page-server streaming: memory goes host to host at CRIU's speed.

Before the freeze the target mounts a tmpfs for the run and starts
`criu page-server` on a free port of its own address (with CRIU's TLS and
certificates made for this run, unless the pair is a trusted migration
network). The source then dumps with --page-server: the memory pages go
straight into the target's tmpfs, never through the controller, never to
a disk. The small images (everything but pages and pagemaps) are written
on the source and follow through the controller; the restore reads all of
them from the tmpfs.

The source tree is dumped with --leave-stopped: it stays on the source,
stopped, until its copy runs verified on the target, and is killed only
then. Its memory then exists on the source until the move is certain, so
a rollback is a SIGCONT, and a target that dies after the dump loses
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import criu, ssh
from ...models import PAGE_SERVER, PROCESS, Phase
from .. import streams, tls
from ..errors import MigrationError
from ..hostcheck import (
    SPACE_MARGIN,
    mem_available,
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
from .process_copy import ProcessState

if TYPE_CHECKING:
    from ..runner import Context

PAGE_SIZE = 4096
# Memory the target keeps for itself beyond the tmpfs the pages fill.
MEMORY_RESERVE = 128 * 1024 * 1024

# Mount a tmpfs of $2 KiB, mode 0700, at $1 for one run's images.
MOUNT_SCRIPT = 'mkdir -p "$1" && mount -t tmpfs -o "size=$2k,mode=0700" criuweb-run "$1"'
# Empty and unmount a run's tmpfs; quiet when it is not there. Emptied first:
# a restored tree's mount namespace may hold a copy of the mount, and an
# empty tmpfs holds no memory.
UNMOUNT_SCRIPT = r"""
[ -d "$1" ] || exit 0
rm -rf -- "$1"/* "$1"/.[!.]* 2>/dev/null
if mountpoint -q "$1"; then umount -l "$1" || exit 1; fi
rmdir -- "$1" 2>/dev/null
true
"""


@dataclass
class PageServerState(ProcessState):
    pages_in_images = False

    address: str = ""  # the target's address, where the page server listens
    port: int = 0
    page_server_pid: int | None = None
    tls: bool = True
    tmpfs: bool = False  # a tmpfs is mounted at dst_images
    # The dump left the source tree stopped: it must be woken on a rollback
    # and killed once the target copy is verified.
    source_stopped: bool = False


def _dst_tls_dir(s: PageServerState) -> str:
    # In the tmpfs: the target's key never reaches its disk.
    return f"{s.dst_images}/.tls"


def preflight_source(ctx: Context):
    measured = process_copy.preflight_source(ctx)
    refuse_kept_connections(ctx, "page-server")
    record_tls(ctx)
    return measured


def preflight_target(ctx: Context):
    measured = process_copy.preflight_target(ctx)
    s = ctx.state
    avail = mem_available(ctx.dst)
    room = avail - MEMORY_RESERVE
    if room < s.rss + SPACE_MARGIN:
        raise MigrationError(
            f"{ctx.target.name}: not enough free memory for the process's pages in tmpfs: "
            f"{avail // 2**20} MiB available, {(s.rss + SPACE_MARGIN + MEMORY_RESERVE) // 2**20} MiB needed"
        )
    s.dst_images = ctx.images_dir(ctx.target)
    s.address = host_ip(ctx.target, "page-server streaming")
    # Stored before the mount: a recovery after a crash here finds it by this path.
    ctx.save_state()
    ctx.dst.sh(MOUNT_SCRIPT, s.dst_images, str(room // 1024))
    s.tmpfs = True
    ctx.save_state()
    detail = f"{measured.detail}, tmpfs of {room // 2**20} MiB at {s.dst_images}"
    detail += install_tls(ctx, (ctx.dst, _dst_tls_dir(s)), (ctx.src, src_tls_dir(s)))
    return Measured(detail=detail)


def start_page_server(ctx: Context):
    """Everything the freeze needs on both hosts, started before it, so that no start-up is downtime.

    The page server listens; on the source a shell waits to run the dump
    and send the small images; on the target another waits to unpack them
    and, on a word from the controller, restore. The freeze then costs no
    SSH session and no shell start-up: a word to the source, the images
    through the controller, a word to the target.
    """
    s = ctx.state
    extra = tls.criu_args(_dst_tls_dir(s)) if s.tls else []
    server = criu.PageServer(ctx.dst, s.dst_images, s.address, extra)
    ctx.page_server = server
    s.port, s.page_server_pid = server.port, server.pid
    ctx.save_state()
    dump_extra = [*s.criu_opts, "--leave-stopped", "--page-server", "--address", s.address, "--port", str(s.port)]
    if s.tls:
        dump_extra += tls.criu_args(src_tls_dir(s))
    mode, inner, _ = s.resolved
    argv = criu.dump_argv(s.pid, s.src_images, None if mode == "root" else inner, dump_extra)
    ctx.receiver = criu.RestoreReceiver(ctx.dst, s.dst_images, s.criu_opts)
    ctx.sender = criu.DumpSender(ctx.src, s.src_images, argv, page_server=(s.address, s.port))
    return Measured(
        detail=f"listening on {s.address}:{s.port}{' with TLS' if s.tls else ''} (PID {server.pid}); "
        "dump and restore waiting for the freeze"
    )


def dump(ctx: Context):
    s = ctx.state
    try:
        ctx.sender.dump(ctx.call_timeout())
    except criu.CriuError as e:
        # CRIU resumes the tree when a dump fails; the rollback checks.
        server_log = ctx.page_server.log_tail()
        if server_log:
            e.log_excerpt = f"{e.log_excerpt}\n--- {ctx.target.name}: page-server.log ---\n{server_log}"
        raise
    # Not stored on its own: the stage (frozen) already tells a recovery to
    # wake the source, and the state goes with the next stage write.
    s.source_stopped = True
    rc = ctx.page_server.wait()
    if rc != 0:
        raise criu.CriuError(
            f"{ctx.target.name}: criu page-server failed ({'no exit status' if rc == -1 else f'exit status {rc}'}): "
            f"{ctx.page_server.log_cause()}",
            ctx.page_server.log_tail(),
        )
    s.page_server_pid = None
    s.dumped = True
    # Its statistics and log are read after the restore (cleanup): each read
    # is an SSH round trip that would fall in the downtime here.
    return Measured(detail=f"pages streamed to {s.address}:{s.port}{' over TLS' if s.tls else ''}")


def _record_dump(ctx: Context) -> None:
    """Give the dump phase its statistics, log and bytes, now that the workload runs again."""
    s = ctx.state
    stats = criu.read_stats(ctx.src, f"{s.src_images}/stats-dump")
    log = ctx.src.read_file(f"{s.src_images}/dump.log", check=False) or ""
    moved = stats.get("pages_written", 0) * PAGE_SIZE
    Phase.objects.filter(run=ctx.run, name="dump").update(criu_stats=stats, log=log[-1_000_000:], bytes=moved)
    ctx.run.total_bytes += moved


def transfer(ctx: Context):
    """The small images, from the waiting dump's output into the waiting restore's input."""
    moved = streams.pipe(ctx, ctx.sender.chan, ctx.receiver.chan, "the small images", keep_dst=True)
    ctx.receiver.unpacked()
    return Measured(bytes=moved, detail="images other than pages")


def restore(ctx: Context):
    """The waiting restore is told to go: no SSH session or shell starts inside the downtime."""
    receiver = ctx.receiver
    return process_copy.restore(ctx, run=lambda extra: receiver.restore(ctx.call_timeout()))


def cleanup(ctx: Context):
    s = ctx.state
    _record_dump(ctx)
    kill_stopped_source(ctx)
    ctx.dst.sh(UNMOUNT_SCRIPT, s.dst_images)
    return remove_source_files(ctx)


def _clear_target(dst, s: PageServerState) -> None:
    if s.page_server_pid:
        dst.run(["kill", "-KILL", str(s.page_server_pid)], check=False)
    dst.sh(UNMOUNT_SCRIPT, s.dst_images)


# How long a rollback lets a dump whose answer was lost finish on its own.
DUMP_GRACE_SECONDS = 5.0


def stop_dump(src, images: str, grace: float) -> None:
    """Make sure no criu dump works on images any more: awaited for grace seconds, then killed.

    A dump still at work would stop or kill the tree after the rollback
    woke it. One blocked on a target that stopped answering may never end:
    killed, the kernel lets the tree run on (its parasite is gone by then:
    CRIU removes it before it sends the pages).
    """
    try:
        process_copy._await_dump(src, images, grace)
    except MigrationError:
        src.sh(KILL_DUMP_SCRIPT, images)
        process_copy._await_dump(src, images, 10)


def rollback(ctx: Context):
    s = ctx.state
    close_waiting(ctx)
    # A restore was started there: it is stopped before the source wakes, so
    # two never run at once. Otherwise nothing can run there, and the source
    # wakes first: the target may be what failed.
    may_run = ctx.target_may_run
    leftovers = _clear_target_of(ctx, may_run) if s.dst_images and may_run else ""
    with ssh.Connection(ctx.source) as src:
        if not s.dumped:
            stop_dump(src, s.src_images, min(DUMP_GRACE_SECONDS, ctx.call_timeout()))
        try:
            wake_source(ctx, src, leftovers)
        except MigrationError:
            # Gone (it ended during its dump) or not running again: nothing
            # to hand the target either, whose tmpfs and page server would
            # stay mounted there with no recovery to remove them.
            src.run(["rm", "-rf", "--", s.src_images, src_tls_dir(s)], check=False)
            if s.dst_images and not may_run:
                _clear_target_of(ctx, may_run=False)
            raise
        src.run(["rm", "-rf", "--", s.src_images, src_tls_dir(s)], check=False)
    if s.dst_images and not may_run:
        leftovers = _clear_target_of(ctx, may_run=False)
        if leftovers:
            ctx.resumed_on_source(leftovers)
    note = f"; {leftovers}" if leftovers else ""
    return Measured(detail=f"PID {s.pid} running again on {ctx.source.name}{note}")


def _clear_target_of(ctx: Context, may_run: bool) -> str:
    """Kill what the run started on the target and remove its tmpfs; what is left there, if anything."""
    s = ctx.state
    try:
        # On a fresh connection: the run's own may be what failed.
        with ssh.Connection(ctx.target) as dst:
            criu.kill_restored(dst, s.dst_images, s.target_pid, timeout=30)
            _clear_target(dst, s)
    except ssh.SSHError as e:
        if may_run:
            raise unsafe_to_resume(ctx, e) from e
        return f"{s.dst_images} (a tmpfs) and its page server stay on {ctx.target.name} ({e})"
    return ""


def abort(ctx: Context):
    """Remove what the run made on both hosts while the tree runs on the source."""
    s = ctx.state
    close_waiting(ctx)
    if s.dst_images:
        process_copy._on(ctx.dst, ctx.target, lambda conn: _clear_target(conn, s))
    if s.src_images:
        abort_source(ctx)


PLAN = Plan(
    kind=PROCESS,
    strategy=PAGE_SERVER,
    label="page-server streaming",
    summary=(
        "criu page-server on the target, started before the freeze; the dump streams memory straight into "
        "the target's tmpfs (CRIU's TLS unless the pair is a trusted network); the source stays stopped "
        "until the target copy is verified."
    ),
    state=PageServerState,
    needs=("page-server",),  # the probe's self-test: a real dump through criu page-server
    steps=(
        Step("pre-flight", "source", preflight_source),
        Step("pre-flight", "target", preflight_target),
        Step("page server", "target", start_page_server),
        Step("dump", "source", dump, freezes=True),
        Step("transfer", "both", transfer),
        Step("restore", "target", restore, resumes=True),
        Step("verify", "target", process_copy.verify, commits=True),
        Step("cleanup", "both", cleanup),
    ),
    rollback=rollback,
    abort=abort,
)
