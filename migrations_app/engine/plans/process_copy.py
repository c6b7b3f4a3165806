"""Process trees, stop and copy: the reference plan.

criu dump into a directory on the source, the images streamed host to host
through the controller, criu restore on the target in new PID and mount
namespaces held by a small init (as criu-ns does).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from ... import criu, ssh, validation
from ...models import PROCESS, STOP_AND_COPY, TCP_CLOSE, TCP_ESTABLISHED, Stage
from .. import lifecycle, restored_tree, streams, tree
from ..errors import MigrationError
from ..hostcheck import SPACE_MARGIN, check_space, connect, criu_ready, pid_alive, settle, unsafe_to_resume
from ..plan import Measured, Plan, Step

if TYPE_CHECKING:
    from ..runner import Context


@dataclass
class ProcessState:
    # Whether the memory pages are written to the images directories (on
    # disk); strategies that stream them elsewhere need room for the small
    # images only.
    pages_in_images: ClassVar[bool] = True

    pid: int = 0
    resolved: list | None = None  # criu.resolve_process(): mode, PID inside, comm
    rss: int = 0
    src_images: str = ""
    dst_images: str = ""
    dumped: bool = False
    target_pid: int | None = None
    # The restored root's start time (clock ticks since boot, /proc/PID/stat),
    # read on the target: with target_pid, which process the copy is, so a
    # later check does not take a process that reused the PID for it.
    target_start: str = ""
    # CRIU options the run's choices need, on dump and on every restore.
    criu_opts: list = field(default_factory=list)
    # Addresses the tree's sockets are bound to: listening ones, and the
    # local ends of connections kept with --tcp-established.
    listen_addrs: list = field(default_factory=list)
    kept_addrs: list = field(default_factory=list)
    kept_ports: list = field(default_factory=list)  # [local port, remote port] of each kept connection
    leave_running: bool = False  # dump without stopping the tree (a clone, a kept checkpoint)
    paths: list = field(default_factory=list)  # what the tree holds by path, which the target must have


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
        pid = validation.pid(ctx.run.workload)
    except validation.InputError as e:
        raise MigrationError(str(e)) from None
    mode, inner, comm = criu.resolve_process(ctx.src, pid)
    found = tree.read_tree(ctx.src, pid, ctx.source.ssh_port)
    why = tree.refusals(found, ctx.source.name, tree.controller_pids(found), own_namespaces=mode == "ns")
    if why:
        raise MigrationError(f"{ctx.source.name}: PID {pid} cannot be moved: {'; '.join(why)}")
    if mode == "ns":
        _refuse_a_copy_still_restoring(ctx, pid, found)
    lifecycle.claim_workload(ctx.run, str(pid))
    s = ctx.state
    connected = found.connected()
    if ctx.run.tcp == TCP_ESTABLISHED:
        s.criu_opts = ["--tcp-established"]
        s.kept_addrs = sorted({c.local[0] for c in connected})
        s.kept_ports = [[c.local[1], c.remote[1]] for c in connected]
    else:
        # CRIU dumps them as closed; the source kernel ends them when the
        # dumped tree is killed, so each peer sees its connection end.
        s.criu_opts = ["--tcp-close"]
    job = ""
    if tree.shell_job(found):
        # Pre-flight refused it unless nothing of it has a terminal. Given
        # on every restore too (criu_opts): the restored root joins the
        # namespace holder's session, which no SSH connection leads.
        s.criu_opts.append("--shell-job")
        job = (
            f"; a shell job (PID {found.procs[0]['sid']}, outside the tree, leads its session): moved with "
            "--shell-job, restored in a session of its own"
        )
    s.listen_addrs = sorted({c.local[0] for c in found.listening()})
    s.paths = found.paths()
    rss = sum(int(kib) for kib in ctx.src.sh(TREE_RSS_SCRIPT, str(pid)).stdout.split()) * 1024
    images = ctx.images_dir(ctx.source)
    check_space(ctx.src, images, (rss if s.pages_in_images else 0) + SPACE_MARGIN, "the process images")
    s.pid, s.src_images, s.rss, s.resolved = pid, images, rss, [mode, inner, comm]
    ctx.run.expected_bytes = rss
    where = "in its own PID namespace" if mode == "ns" else "in the host PID namespace"
    tcp = f"; {len(connected)} TCP connection(s), {ctx.run.tcp}" if connected else ""
    return Measured(
        detail=f"CRIU {probe['version']}, PID {pid} ({comm}) {where}, {len(found.procs)} process(es), "
        f"~{rss // 1024} KiB resident; sockets: {found.summary()}{tcp}{job}"
    )


def _refuse_a_copy_still_restoring(ctx: Context, pid: int, found: tree.Tree) -> None:
    """Refuse a tree that another run restored here and may still roll back (its holder's namespace)."""
    others = [o for o in lifecycle.restoring_here(ctx.run) if (o.state or {}).get("dst_images")]
    if not others:
        return
    namespaces = criu.holder_namespaces(ctx.src, [o.state["dst_images"] for o in others])
    for other, ns in zip(others, namespaces, strict=True):
        if ns and ns == found.root_ns.get("pid"):
            lifecycle.refuse_arriving(ctx.run, other, f"PID {pid}")


def preflight_target(ctx: Context):
    ctx.dst = ctx.dst or connect(ctx.target, PROCESS)
    probe = criu_ready(ctx.dst)
    # The namespace holder that keeps restored PIDs apart is a Python script.
    if ctx.dst.run(["python3", "-c", "pass"], check=False).rc != 0:
        raise MigrationError(f"{ctx.target.name}: python3 is needed to restore a process and is missing")
    s = ctx.state
    if s.listen_addrs or s.kept_addrs:
        # A process keeps the addresses its sockets are bound to; a host
        # process never takes its host's address along, so a socket bound
        # to the source's own address cannot be bound on the target.
        have = tree.addresses(ctx.dst)
        missing = [a for a in s.listen_addrs if not tree.bindable(a, have)]
        if missing:
            raise MigrationError(
                f"{ctx.target.name}: the process listens on {', '.join(missing)}, an address {ctx.target.name} "
                "does not have; it would fail to restore there. A server that should move listens on 0.0.0.0 "
                "(or ::), or on an address both hosts have"
            )
        lost = [a for a in s.kept_addrs if not tree.bindable(a, have)]
        if lost:
            raise MigrationError(
                f"{ctx.target.name}: keeping established TCP connections needs their local address "
                f"{', '.join(lost)} on {ctx.target.name}, and a host process never takes its host's address "
                f"along: its peers would talk to an address that is no longer there. Use {TCP_CLOSE} "
                "(connections on loopback or an address both hosts share can be kept)"
            )
    # CRIU reopens every file, map, working directory and program by path.
    missing = tree.missing_paths(ctx.dst, s.paths)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MigrationError(
            f"{ctx.target.name}: the process holds paths that do not exist here, so it could not be restored: {shown}"
        )
    images = ctx.images_dir(ctx.target)
    check_space(ctx.dst, images, (s.rss if s.pages_in_images else 0) + SPACE_MARGIN, "the process images")
    ctx.state.dst_images = images
    return Measured(detail=f"CRIU {probe['version']}")


def dump(ctx: Context):
    s = ctx.state
    try:
        leave = ["--leave-running"] if s.leave_running else []
        criu.dump(ctx.src, s.pid, s.src_images, s.resolved, [*s.criu_opts, *leave], timeout=ctx.call_timeout())
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


def restore(ctx: Context, extra: tuple[str, ...] | list[str] = (), run=None):
    """extra: a strategy's own restore options (post-copy: --lazy-pages).

    run(options): restores and returns the PID, when a strategy started its
    restore command before the freeze (criu.RestoreReceiver).
    """
    images = ctx.state.dst_images
    options = [*ctx.state.criu_opts, *extra]
    ctx.set_stage(Stage.RESTORING)
    try:
        if run is not None:
            pid = run(options)
        else:
            pid = criu.restore(ctx.dst, images, timeout=ctx.call_timeout(), extra=options)
        ctx.resumed_at = time.perf_counter()
    except criu.CriuError as e:
        if e.definitive:  # CRIU said it failed: nothing runs there
            ctx.set_stage(Stage.FROZEN)
        raise
    ctx.state.target_pid = pid
    return Measured(
        criu_stats=criu.read_stats(ctx.dst, f"{images}/stats-restore"),
        log=ctx.dst.read_file(f"{images}/restore.log", check=False) or "",
        detail=f"PID {pid}" + (" (a shell job, in its namespace holder's session)" if "--shell-job" in options else ""),
    )


def verify(ctx: Context):
    pid = ctx.state.target_pid
    start = settle(lambda: pid_alive(ctx.dst, pid))
    if not start:
        raise MigrationError(f"{ctx.target.name}: restored process {pid} is not running")
    # The settle time has passed: a process of the tree that died by now
    # (the root living on) would be lost with the source's copy.
    images = ctx.state.dst_images
    lost = restored_tree.check(ctx.dst, images, criu.holder_pidfile(images), pid)
    if lost:
        raise MigrationError(
            f"{ctx.target.name}: the restored root {pid} runs, but {len(lost)} process(es) of its tree died "
            f"after the restore: {restored_tree.describe(lost)} (PIDs as dumped)"
        )
    ctx.state.target_start = start
    ctx.run.result_workload = str(pid)
    return Measured(detail=f"PID {pid} running, its whole tree with it")


# CRIU keeps the network locked on the source after dumping established
# connections (--tcp-established): iptables rules dropping their packets
# unless marked 0xc114 (SOCCR_MARK), left so that the source's kernel never
# resets them; only a restore there unlocks them. Once the tree runs on the
# target they only block those ports on the source: removed here. argv:
# "local-port:remote-port" pairs.
UNLOCK_SCRIPT = r"""
import shlex, shutil, subprocess, sys
pairs = set(sys.argv[1:])
for tool in ("iptables", "ip6tables"):
    if not shutil.which(tool):
        continue
    rules = subprocess.run([tool, "-w", "-S"], capture_output=True, text=True).stdout.splitlines()
    for rule in rules:
        words = shlex.split(rule)
        if words[:1] != ["-A"] or "0xc114" not in words:
            continue
        ports = {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--sport", "--dport")}
        if any(set(p.split(":")) <= ports for p in pairs):
            subprocess.run([tool, "-w", "-D", *words[1:]], check=True)
"""


def cleanup(ctx: Context):
    if ctx.state.kept_ports:
        pairs = [f"{a}:{b}" for a, b in ctx.state.kept_ports]
        ctx.src.run(["python3", "-c", UNLOCK_SCRIPT, *pairs])
    ctx.dst.run(["rm", "-rf", "--", ctx.state.dst_images])
    if ctx.run.keep_source:
        return Measured(detail=f"images kept in {ctx.state.src_images}")
    ctx.src.run(["rm", "-rf", "--", ctx.state.src_images])
    return Measured(detail="images removed on both hosts")


# How long a rollback waits to reach the target: it may be what failed.
TARGET_CONNECT_TIMEOUT = 5


def _clear_target(ctx: Context, may_run: bool) -> str:
    """Make sure no restore from the run's images runs or can start on the target; return what stays."""
    s = ctx.state
    try:
        with ssh.Connection(ctx.target, connect_timeout=TARGET_CONNECT_TIMEOUT) as dst:
            criu.kill_restored(dst, s.dst_images, s.target_pid, timeout=30)
    except ssh.SSHError as e:
        if may_run:
            raise unsafe_to_resume(ctx, e) from e
        # Never restored there: only files are left.
        return f"{s.dst_images} stays on {ctx.target.name} ({e}); `manage.py recover` removes it"
    return ""


def rollback(ctx: Context):
    """Bring the tree back on the source; restartable from the stored state alone."""
    s = ctx.state
    # A restore was started there (its answer lost): it is stopped before
    # the source resumes, so two never run at once. Otherwise nothing runs
    # there, and the source resumes first: the target may be what failed.
    may_run = ctx.target_may_run
    leftovers = _clear_target(ctx, may_run) if s.dst_images and may_run else ""
    with ssh.Connection(ctx.source) as src:
        if not s.dumped:
            # The dump's answer was lost (its controller died, or the freeze
            # limit cut it off): a criu still dumping would kill the tree
            # after we found it alive, so its end is awaited first. Then the
            # tree still runs, or CRIU finished and its images are complete
            # (inventory.img is last).
            _await_dump(src, s.src_images, ctx.call_timeout())
        if not s.dumped and pid_alive(src, s.pid):
            pid = s.pid
            how = "still running"
        else:
            if src.run(["test", "-s", f"{s.src_images}/inventory.img"], check=False).rc != 0:
                raise MigrationError(f"{ctx.source.name}: the process stopped and no images were written")
            pid = criu.restore(src, s.src_images, timeout=ctx.call_timeout(), extra=s.criu_opts)
            ctx.resumed_at = time.perf_counter()
            how = "running again"
        ctx.run.result_workload = str(pid)
        # Recorded before anything else: a second restore from these images
        # would be a second copy.
        ctx.resumed_on_source(leftovers)
        if not settle(lambda: pid_alive(src, pid)):
            raise MigrationError(f"{ctx.source.name}: the process does not stay running after rollback")
        src.run(["rm", "-rf", "--", s.src_images], check=False)
    if s.dst_images and not may_run:
        leftovers = _clear_target(ctx, may_run=False)
        if leftovers:
            ctx.resumed_on_source(leftovers)
    note = f"; {leftovers}" if leftovers else ""
    return Measured(detail=f"PID {pid} {how} on {ctx.source.name}{note}")


# Exit 0 while a criu process works on images dir $1 (its argv holds it).
# Only criu binaries are looked at: this shell's own argv holds $1 too.
DUMPING_SCRIPT = r"""
for d in /proc/[0-9]*; do
    case $(readlink "$d/exe" 2>/dev/null) in */criu) ;; *) continue ;; esac
    tr '\0' '\n' < "$d/cmdline" 2>/dev/null | grep -qxF -- "$1" && exit 0
done
exit 1
"""


def _await_dump(conn, images: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while conn.sh(DUMPING_SCRIPT, images, check=False).rc == 0:
        if time.monotonic() > deadline:
            raise MigrationError(f"{conn.name}: criu is still dumping into {images} after {timeout:.0f} s")
        time.sleep(0.2)


def adopt(ctx: Context) -> bool:
    """After a crash: whether a copy restored on the target runs there; if so it is recorded.

    The restore's answer may never have come back; the namespace holder's
    PID file, beside the images, finds what it restored.
    """
    s = ctx.state
    if not s.dst_images:
        return False
    with ssh.Connection(ctx.target) as dst:
        pid = s.target_pid or criu.restored_root(dst, s.dst_images)
        if not pid or not settle(lambda: pid_alive(dst, pid)):
            return False
    s.target_pid = pid
    ctx.run.result_workload = str(pid)
    return True


def abort(ctx: Context):
    """Remove what the run made on both hosts while the tree runs on the source."""
    s = ctx.state
    if s.src_images:
        # Only files: after a rollback the tree on the source runs under a
        # holder whose PID file is in this directory, and must live.
        _on(ctx.src, ctx.source, lambda conn: conn.run(["rm", "-rf", "--", s.src_images], timeout=60))
    if s.dst_images:
        # Anything restored on the target from these images is a second copy.
        _on(ctx.dst, ctx.target, lambda conn: criu.kill_restored(conn, s.dst_images, timeout=30))


def _on(conn, host, action):
    """action(connection to host): the run's own connection, or a fresh one after a crash."""
    if conn is not None:
        return action(conn)
    with ssh.Connection(host) as fresh:
        return action(fresh)


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
    adopt=adopt,
)
