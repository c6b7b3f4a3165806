"""The migration engine: a run is a list of phases, each a plain function.

A phase function takes the run's Context and returns what it measured
(bytes, CRIU statistics, a detail line). execute() walks the list, times
every phase on the controller's clock (one timeline across both hosts),
stores it, and when anything fails after the freeze brings the workload
back on the source. Tests call execute() and the phase functions directly.
"""

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

from django.db import IntegrityError, transaction
from django.utils import timezone

from . import criu, ssh
from .docker_engine import Engine, EngineError
from .models import (
    CONTAINER,
    FAILED,
    FINISHED,
    INTERRUPTED,
    PENDING,
    PHASE_FAILED,
    PHASE_OK,
    PHASE_RUNNING,
    PROCESS,
    ROLLED_BACK,
    RUNNING,
    SUCCEEDED,
    MigrationRun,
    Phase,
)

log = logging.getLogger(__name__)

# Errors that end a run with a message rather than a traceback.
STEP_ERRORS = (ssh.SSHError, EngineError, criu.CriuError)
# How long a restored workload must keep running to count as verified.
SETTLE_SECONDS = 0.5
# Room left free beyond the image estimate, for logs and CRIU's own files.
SPACE_MARGIN = 32 * 1024 * 1024
# GNU tar flags that keep a writable layer exact: owners as numbers, and
# the trusted.overlay.* xattrs that mark opaque directories.
TAR_CREATE = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cf", "-", "-C"]
TAR_EXTRACT = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--same-owner", "-xpf", "-", "-C"]
# Marks a container criuweb created on a target, with the run's id.
RUN_LABEL = "io.criuweb.run"
# Progress is written to the database at most this often during a transfer.
PROGRESS_INTERVAL = 0.25


class MigrationError(Exception):
    """A run cannot start or a check failed; the message says why."""


@dataclass
class Measured:
    bytes: int = 0
    criu_stats: dict = field(default_factory=dict)
    detail: str = ""
    log: str = ""


@dataclass(frozen=True)
class Step:
    name: str
    side: str  # "source", "target" or "both": which host(s) the phase works on
    run: Callable
    freezes: bool = False  # the workload stops at the start of this phase
    resumes: bool = False  # ... and runs again on the target at its end
    when: Callable = None  # when given and false for a run, the phase is not needed
    commits: bool = False  # once it succeeds the workload runs verified on the target
    workload_bytes: bool = True  # its bytes are the workload's (not e.g. its image)


class Context:
    """What the phases of one run share: connections and what they learned."""

    def __init__(self, run):
        self.run = run
        self.source = run.source
        self.target = run.target
        self.src = None  # Engine (containers) or ssh.Connection (processes)
        self.dst = None
        self.facts = {}
        self.frozen = False
        self.freeze_t = None  # perf_counter() when the workload was frozen
        self.resumed_at = None  # perf_counter() when the workload ran again on the target
        self.current_timer = None  # the phase in progress
        self.seq = 0  # the next phase's number
        # True from the moment a restore on the target starts until CRIU or
        # Docker says it failed: then a copy may run there.
        self.target_may_run = False
        self.committed = False  # verified on the target: never roll back after this
        self.recovering = False

    def host_for(self, side):
        return {"source": self.source.name, "target": self.target.name}.get(
            side, f"{self.source.name} -> {self.target.name}"
        )

    @property
    def src_ssh(self):
        return self.src.conn if isinstance(self.src, Engine) else self.src

    @property
    def dst_ssh(self):
        return self.dst.conn if isinstance(self.dst, Engine) else self.dst

    def images_dir(self, host):
        return f"{host.work_dir.rstrip('/')}/runs/{self.run.code}"

    def close(self):
        for side in (self.src, self.dst):
            if side is not None:
                side.close()


# -- shared phase helpers --------------------------------------------------------


def _connect(host, kind):
    """An open Engine (containers) or ssh.Connection (processes) to host."""
    conn = Engine(host) if kind == CONTAINER else ssh.Connection(host)
    conn.__enter__()
    return conn


def _check_space(conn, path, need, what):
    out = conn.sh('mkdir -p "$1" && df -P -k "$1"', path).stdout.splitlines()
    avail = int(out[-1].split()[3]) * 1024
    if avail < need:
        raise MigrationError(
            f"{conn.name}: not enough free space in {path} for {what}: "
            f"{avail // 2**20} MiB free, {need // 2**20} MiB needed"
        )
    return avail


def _preflight_common(conn):
    """CRIU present and passing `criu check`; returns its probe."""
    probe = criu.probe(conn)
    if not probe["installed"]:
        raise MigrationError(f"{conn.name}: CRIU is not installed ({probe['check_output']})")
    if not probe["check_ok"]:
        raise MigrationError(f"{conn.name}: `criu check` fails: {probe['check_output'][-300:]}")
    return probe


def _rss_bytes(conn, pids):
    """Resident memory of some PIDs on a host: what a dump will roughly write."""
    if not pids:
        return 0
    # A process may be gone by now; it then counts as nothing.
    script = 'for p in "$@"; do awk \'/^VmRSS:/ {print $2}\' "/proc/$p/status" 2>/dev/null; done; true'
    out = conn.sh(script, *[str(p) for p in pids]).stdout.split()
    return sum(int(kb) for kb in out) * 1024


def _stream(ctx, src, dst, what):
    """Pipe one started source command into one target command; return bytes."""
    last = [0.0]

    def progress(n):
        # Live progress for the run page, without a write per chunk.
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL and ctx.current_timer is not None:
            last[0] = now
            Phase.objects.filter(pk=ctx.current_timer.phase.pk).update(bytes=n)

    try:
        total, src_rc, dst_rc, src_err, dst_err = ssh.stream(src, dst, progress)
    finally:
        src.close()
        dst.close()
    # The target first: when it dies, the source fails only for lack of a reader.
    if dst_rc != 0:
        why = dst_err.strip()[-300:] or ("no exit status" if dst_rc == -1 else f"exit status {dst_rc}")
        raise MigrationError(f"{ctx.target.name}: writing {what} failed: {why}")
    if src_rc != 0:
        why = src_err.strip()[-300:] or ("no exit status" if src_rc == -1 else f"exit status {src_rc}")
        raise MigrationError(f"{ctx.source.name}: reading {what} failed: {why}")
    return total


def _transfer(ctx, src_dir, dst_dir):
    """Stream a directory from the source host into an existing one on the target."""
    src = ctx.src_ssh.open_command(TAR_CREATE + [src_dir, "."])
    dst = ctx.dst_ssh.open_command(TAR_EXTRACT + [dst_dir])
    return _stream(ctx, src, dst, dst_dir)


def _settle(check):
    """True if check() holds now and still after SETTLE_SECONDS."""
    first = check()
    if not first:
        return None
    time.sleep(SETTLE_SECONDS)
    return first if check() == first else None


# -- container phases --------------------------------------------------------------


def _engine_ready(engine):
    """CRIU passing and an engine that can checkpoint on overlay2; returns (probe, docker info)."""
    probe = _preflight_common(engine.conn)
    info = engine.info()
    if not info.get("ExperimentalBuild"):
        raise MigrationError(f"{engine.name}: the Docker engine has no checkpoint support (experimental is off)")
    if info.get("Driver") != "overlay2":
        raise MigrationError(f"{engine.name}: storage driver {info.get('Driver')} is not supported (overlay2 only)")
    return probe, info


# containerd 1.6 (under Docker < 25) stores a container's spec as a blob
# with each checkpoint and fails the next checkpoint of the same container
# with "content ...: already exists" until it has collected the first one —
# after CRIU has already stopped the container, so its state is lost
# (containerd/containerd#8401). A container we checkpointed and then rolled
# back on the same engine is in that window for a while.
SECOND_CHECKPOINT_WAIT = 10 * 60


def _refuse_second_checkpoint(ctx, container, info):
    if int(info.get("ServerVersion", "0").split(".")[0] or 0) >= 25:
        return
    since = timezone.now() - timezone.timedelta(seconds=SECOND_CHECKPOINT_WAIT)
    recent = MigrationRun.objects.filter(
        source=ctx.source, kind=CONTAINER, status=ROLLED_BACK, finished__gte=since,
        result_workload=container["Id"][:12],
    ).order_by("-finished").first()
    if recent:
        wait = SECOND_CHECKPOINT_WAIT - (timezone.now() - recent.finished).total_seconds()
        raise MigrationError(
            f"{ctx.source.name}: this container was checkpointed and rolled back here "
            f"{(timezone.now() - recent.finished).seconds} s ago; Docker {info['ServerVersion']}'s containerd "
            f"could fail a second checkpoint now and lose its state (containerd#8401). Try again in "
            f"{int(wait // 60) + 1} min"
        )


def container_preflight_source(ctx):
    ctx.src = _connect(ctx.source, CONTAINER)
    probe, info = _engine_ready(ctx.src)
    c = ctx.src.inspect(ctx.run.workload)
    if not c["State"]["Running"]:
        raise MigrationError(f"{ctx.source.name}: container {ctx.run.workload!r} is not running")
    _refuse_second_checkpoint(ctx, c, info)
    pids = [row[1] for row in ctx.src.call("docker top", ctx.src.api.top, c["Id"], ps_args="-eo user,pid")["Processes"]]
    rss = _rss_bytes(ctx.src.conn, pids)
    root = info["DockerRootDir"]
    _check_space(ctx.src.conn, root, rss + SPACE_MARGIN, "the checkpoint")
    ctx.facts.update(container=c, src_root=root, rss=rss, checkpoint=f"cw-{ctx.run.code.hex[:12]}")
    ctx.run.expected_bytes = rss
    return Measured(
        detail=f"CRIU {probe['version']}, Docker {info['ServerVersion']}, container {c['Name'].lstrip('/')} "
        f"({c['Id'][:12]}), ~{rss // 1024} KiB resident"
    )


def container_preflight_target(ctx):
    ctx.dst = _connect(ctx.target, CONTAINER)
    probe, info = _engine_ready(ctx.dst)
    name = ctx.facts["container"]["Name"].lstrip("/")
    other = ctx.dst.find_container(name)
    if other:
        # A container we prepared for a run that has ended and that never
        # started (its restore failed while this engine was unreachable) is
        # ours to clear; anything else, a kept source among them, is not.
        label = (other["Config"].get("Labels") or {}).get(RUN_LABEL)
        leftover = (
            label
            and not other["State"]["Running"]
            and not MigrationRun.objects.filter(code=label).exclude(status__in=FINISHED).exists()
            and other["State"].get("StartedAt", "").startswith("0001-")  # never started
        )
        if not leftover:
            raise MigrationError(f"{ctx.target.name}: a container named {name!r} already exists there")
        ctx.dst.remove(other["Id"])
    root = info["DockerRootDir"]
    _check_space(ctx.dst.conn, root, ctx.facts["rss"] + SPACE_MARGIN, "the checkpoint")
    ctx.facts.update(dst_root=root, name=name)
    return Measured(detail=f"CRIU {probe['version']}, Docker {info['ServerVersion']}")


def image_missing(ctx):
    return not ctx.dst.has_image(ctx.facts["container"]["Image"])


def ship_image(ctx):
    image = ctx.facts["container"]["Image"]
    total = [0]

    def chunks():
        for chunk in ctx.src.save_image(image):
            total[0] += len(chunk)
            yield chunk

    ctx.dst.load_image(chunks())
    if not ctx.dst.has_image(image):
        raise MigrationError(f"{ctx.target.name}: image {image[:19]} still missing after docker load")
    return Measured(bytes=total[0], detail=f"image {image[:19]} copied")


def prepare_target(ctx):
    # Before the freeze, so creating the container is not downtime.
    source = ctx.facts["container"]
    # By its name where the target's tag means the same image, so lists show
    # "busybox", not a digest; else by id, which always means the same layers.
    image = source["Config"]["Image"]
    if ctx.dst.image_id(image) != source["Image"]:
        image = source["Image"]
    cid = ctx.dst.create_like(source, ctx.facts["name"], image, {RUN_LABEL: str(ctx.run.code)})
    ctx.facts["target_id"] = cid
    upper = ctx.dst.inspect(cid)["GraphDriver"]["Data"]["UpperDir"]
    ctx.facts["target_upper"] = upper
    return Measured(detail=f"container {cid[:12]} created")


def has_restart_policy(ctx):
    policy = (ctx.facts["container"]["HostConfig"].get("RestartPolicy") or {}).get("Name") or "no"
    return policy != "no"


def prepare_source(ctx):
    # Docker would restart a container with a restart policy the moment the
    # checkpoint stops it: a second, fresh copy. Off until the run ends.
    c = ctx.facts["container"]
    ctx.facts["restart_policy"] = c["HostConfig"]["RestartPolicy"]
    ctx.src.set_restart_policy(c["Id"], {"Name": "no"})
    return Measured(detail=f"restart policy {ctx.facts['restart_policy']['Name']} off during the move")


def _restore_restart_policy(engine, ctx):
    if ctx.facts.get("restart_policy"):
        engine.set_restart_policy(ctx.facts["container"]["Id"], ctx.facts["restart_policy"])


def checkpoint_container(ctx):
    c = ctx.facts["container"]
    ctx.src.checkpoint(c["Id"], ctx.facts["checkpoint"])
    ctx.facts["checkpointed"] = True
    return Measured(detail=f"checkpoint {ctx.facts['checkpoint']}")


# Unpacks the checkpoint and the writable layer from one tar stream:
# $1 staging dir, $2 the container's checkpoints dir, $3 checkpoint name,
# $4 the container's (empty, not yet mounted) upper dir.
UNPACK_CONTAINER = r"""
set -e
mkdir -p "$1" "$2"
tar --numeric-owner --xattrs --xattrs-include='*' --same-owner -xpf - -C "$1"
mv "$1/$3" "$2/"
if rmdir "$4" 2>/dev/null; then mv "$1/diff" "$4"; else cp -a "$1/diff/." "$4/"; fi
rm -rf "$1"
"""


def transfer_container(ctx):
    c = ctx.facts["container"]
    cp = ctx.facts["checkpoint"]
    tid = ctx.facts["target_id"]
    src_upper = c["GraphDriver"]["Data"]["UpperDir"]
    # One stream, two directories: every SSH command here is downtime.
    src = ctx.src_ssh.open_command(
        TAR_CREATE
        + [f"{ctx.facts['src_root']}/containers/{c['Id']}/checkpoints", cp]
        + ["-C", src_upper.rsplit("/", 1)[0], src_upper.rsplit("/", 1)[1]]
    )
    dst_containers = f"{ctx.facts['dst_root']}/containers/{tid}"
    dst = ctx.dst_ssh.open_command(
        ["sh", "-c", UNPACK_CONTAINER, "sh", f"{dst_containers}/criuweb-{cp}", f"{dst_containers}/checkpoints",
         cp, ctx.facts["target_upper"]]
    )
    n = _stream(ctx, src, dst, "the checkpoint and writable layer")
    return Measured(bytes=n, detail="checkpoint and writable layer")


# Where containerd keeps a task's CRIU work files (restore.log,
# stats-restore): under the engine's data root when dockerd runs its own
# containerd (Debian's docker.io), in containerd's own root when it uses the
# system one (docker-ce). $1 data root, $2 container id.
TASK_DIR_SCRIPT = r"""
for d in "$1/containerd/daemon/io.containerd.runtime.v2.task/moby/$2" \
         "/var/lib/containerd/io.containerd.runtime.v2.task/moby/$2"; do
    [ -d "$d" ] && { echo "$d"; exit 0; }
done
echo "$1/containerd/daemon/io.containerd.runtime.v2.task/moby/$2"
"""


def _containerd_task_dir(conn, root, cid):
    return conn.sh(TASK_DIR_SCRIPT, root, cid).stdout.strip()


def restore_container(ctx):
    cid = ctx.facts["target_id"]
    ctx.target_may_run = True
    try:
        ctx.dst.start(cid, checkpoint=ctx.facts["checkpoint"])
        ctx.resumed_at = time.perf_counter()
    except EngineError as e:
        # Docker answered that the restore failed: nothing runs there. No
        # answer (a lost connection) proves nothing.
        ctx.target_may_run = not e.answered
        try:
            task_dir = _containerd_task_dir(ctx.dst.conn, ctx.facts["dst_root"], cid)
            excerpt = criu.log_excerpt(ctx.dst.conn.read_file(f"{task_dir}/restore.log", check=False))
        except ssh.SSHError:
            excerpt = ""  # the connection may be what failed; the error says it
        raise criu.CriuError(f"{e} (see restore.log excerpt)" if excerpt else str(e), excerpt) from e
    task_dir = _containerd_task_dir(ctx.dst.conn, ctx.facts["dst_root"], cid)
    stats = criu.read_stats(ctx.dst.conn, f"{task_dir}/stats-restore")
    restore_log = ctx.dst.conn.read_file(f"{task_dir}/restore.log", check=False) or ""
    return Measured(criu_stats=stats, log=restore_log)


def verify_container(ctx):
    cid = ctx.facts["target_id"]

    def state():
        s = ctx.dst.inspect(cid)["State"]
        return (s["Pid"], s["StartedAt"]) if s["Running"] and not s.get("Restarting") else None

    if not _settle(state):
        s = ctx.dst.inspect(cid)["State"]
        raise MigrationError(
            f"{ctx.target.name}: the restored container is not running (status {s['Status']}, exit {s['ExitCode']})"
        )
    ctx.run.result_workload = cid[:12]
    return Measured(detail=f"container {cid[:12]} running")


def cleanup_container(ctx):
    c = ctx.facts["container"]
    # The source first: it is what could otherwise run twice.
    if ctx.run.keep_source:
        # Kept stopped, with restart policy "no" (set before the freeze, or
        # never another one), so the engine never starts it again by itself.
        ctx.src.delete_checkpoint(c["Id"], ctx.facts["checkpoint"])
        detail = "source container kept (stopped, restart policy no)"
    else:
        ctx.src.remove(c["Id"])  # removes its checkpoints with it
        detail = f"source container {c['Id'][:12]} removed"
    ctx.dst.delete_checkpoint(ctx.facts["target_id"], ctx.facts["checkpoint"])
    return Measured(detail=detail)


def _unsafe_to_resume(ctx, error):
    return MigrationError(
        f"{ctx.target.name}: cannot make sure the restored copy is gone ({error}); not resuming on "
        f"{ctx.source.name}, to avoid two copies. Check {ctx.target.name}; the images stay on {ctx.source.name}"
    )


# Exit 0 when a process on the host names the container: its
# containerd shim (`... -id <container id> ...`), which every running
# container has. "[-]id" so that this shell's own command line does not match.
SHIM_SCRIPT = 'pgrep -f "[-]id $1" >/dev/null'


def _container_may_run(host, container_id):
    """Whether a container could be running on a host whose engine we cannot ask."""
    try:
        with ssh.Connection(host) as conn:
            return conn.sh(SHIM_SCRIPT, container_id, check=False).rc != 1
    except ssh.SSHError:
        return True  # unknown: assume the worst


def rollback_container(ctx):
    c = ctx.facts["container"]
    note = ""
    if ctx.facts.get("target_id"):
        # The target copy goes first, so two never run at once; on a fresh
        # connection, as the old one may be what failed.
        try:
            with Engine(ctx.target) as dst:
                dst.remove(ctx.facts["target_id"])
        except (EngineError, ssh.SSHError) as e:
            if ctx.target_may_run and _container_may_run(ctx.target, ctx.facts["target_id"]):
                raise _unsafe_to_resume(ctx, e)
            # Docker said the restore failed; the next run to this host
            # clears the stopped leftover by its label.
            note = f"; left a stopped container {ctx.facts['target_id'][:12]} on {ctx.target.name} ({e})"
    with Engine(ctx.source) as src:
        # Its checkpoint, when the checkpoint call's answer was lost but
        # Docker finished it all the same.
        checkpointed = ctx.facts.get("checkpointed") or ctx.facts["checkpoint"] in src.checkpoints(c["Id"])
        if not src.inspect(c["Id"])["State"]["Running"]:
            if not checkpointed:
                # Its state is gone (the checkpoint failed after CRIU stopped
                # it); running it afresh beats running nothing.
                src.start(c["Id"])
                _restore_restart_policy(src, ctx)
                ctx.run.result_workload = c["Id"][:12]
                raise MigrationError(
                    f"{ctx.source.name}: the container stopped without a checkpoint: its state is lost; "
                    f"started it again from its image"
                )
            # Docker (before 25) hands the checkpoint to containerd as a tar
            # whose digest equals the blob containerd made when it took the
            # checkpoint; until containerd collects that blob the restore
            # fails with "commit failed: content ... already exists"
            # (moby/moby#42900). A new mtime makes the tar differ.
            cp_dir = f"{ctx.facts['src_root']}/containers/{c['Id']}/checkpoints/{ctx.facts['checkpoint']}"
            src.conn.run(["touch", "-c", f"{cp_dir}/descriptors.json"])
            src.start(c["Id"], checkpoint=ctx.facts["checkpoint"])
            ctx.resumed_at = time.perf_counter()
        if not _settle(lambda: src.inspect(c["Id"])["State"]["Running"]):
            raise MigrationError(f"{ctx.source.name}: the container does not stay running after rollback")
        if checkpointed:
            src.delete_checkpoint(c["Id"], ctx.facts["checkpoint"])
        _restore_restart_policy(src, ctx)
    ctx.run.result_workload = c["Id"][:12]
    return Measured(detail=f"container {c['Id'][:12]} running again on {ctx.source.name}{note}")


def container_abort(ctx):
    """Undo preparation when the run fails before the freeze."""
    if ctx.facts.get("target_id") and ctx.dst is not None:
        ctx.dst.remove(ctx.facts["target_id"])
    if ctx.src is not None:
        _restore_restart_policy(ctx.src, ctx)


# -- process phases ------------------------------------------------------------------


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


def process_preflight_source(ctx):
    ctx.src = _connect(ctx.source, PROCESS)
    probe = _preflight_common(ctx.src)
    try:
        pid = int(ctx.run.workload)
    except ValueError:
        raise MigrationError(f"{ctx.run.workload!r} is not a PID")
    mode, inner, comm = criu.resolve_process(ctx.src, pid)
    rss = sum(int(kib) for kib in ctx.src.sh(TREE_RSS_SCRIPT, str(pid)).stdout.split()) * 1024
    images = ctx.images_dir(ctx.source)
    _check_space(ctx.src, images, rss + SPACE_MARGIN, "the process images")
    ctx.facts.update(pid=pid, src_images=images, rss=rss, resolved=(mode, inner, comm))
    ctx.run.expected_bytes = rss
    where = "in its own PID namespace" if mode == "ns" else "in the host PID namespace"
    return Measured(detail=f"CRIU {probe['version']}, PID {pid} ({comm}) {where}, ~{rss // 1024} KiB resident")


def process_preflight_target(ctx):
    ctx.dst = _connect(ctx.target, PROCESS)
    probe = _preflight_common(ctx.dst)
    # The namespace holder that keeps restored PIDs apart is a Python script.
    if ctx.dst.run(["python3", "-c", "pass"], check=False).rc != 0:
        raise MigrationError(f"{ctx.target.name}: python3 is needed to restore a process and is missing")
    images = ctx.images_dir(ctx.target)
    _check_space(ctx.dst, images, ctx.facts["rss"] + SPACE_MARGIN, "the process images")
    ctx.facts["dst_images"] = images
    return Measured(detail=f"CRIU {probe['version']}")


def dump_process(ctx):
    images = ctx.facts["src_images"]
    try:
        criu.dump(ctx.src, ctx.facts["pid"], images, ctx.facts["resolved"])
    except criu.CriuError:
        # CRIU resumes the tree when a dump fails; nothing to restore then.
        ctx.frozen = not _pid_alive(ctx.src, ctx.facts["pid"])
        raise
    ctx.facts["dumped"] = True
    return Measured(
        criu_stats=criu.read_stats(ctx.src, f"{images}/stats-dump"),
        log=ctx.src.read_file(f"{images}/dump.log", check=False) or "",
        detail=f"images in {images}",
    )


def transfer_process(ctx):
    n = _transfer(ctx, ctx.facts["src_images"], ctx.facts["dst_images"])
    return Measured(bytes=n)


def restore_process(ctx):
    images = ctx.facts["dst_images"]
    ctx.target_may_run = True
    try:
        pid = criu.restore(ctx.dst, images)
        ctx.resumed_at = time.perf_counter()
    except criu.CriuError as e:
        ctx.target_may_run = not e.definitive  # CRIU said it failed: nothing runs there
        raise
    ctx.facts["target_pid"] = pid
    return Measured(
        criu_stats=criu.read_stats(ctx.dst, f"{images}/stats-restore"),
        log=ctx.dst.read_file(f"{images}/restore.log", check=False) or "",
        detail=f"PID {pid}",
    )


def _pid_alive(conn, pid):
    """The start time of a live, non-zombie PID (a true value), else None."""
    r = conn.run(["cat", f"/proc/{pid}/stat"], check=False)
    if r.rc != 0:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces.
    rest = r.stdout.rsplit(")", 1)[1].split()
    state, start = rest[0], rest[19]
    return None if state in ("Z", "X") else start


def verify_process(ctx):
    pid = ctx.facts["target_pid"]
    if not _settle(lambda: _pid_alive(ctx.dst, pid)):
        raise MigrationError(f"{ctx.target.name}: restored process {pid} is not running")
    ctx.run.result_workload = str(pid)
    return Measured(detail=f"PID {pid} running")


def cleanup_process(ctx):
    ctx.dst.run(["rm", "-rf", "--", ctx.facts["dst_images"]])
    if ctx.run.keep_source:
        return Measured(detail=f"images kept in {ctx.facts['src_images']}")
    ctx.src.run(["rm", "-rf", "--", ctx.facts["src_images"]])
    return Measured(detail="images removed on both hosts")


def rollback_process(ctx):
    if ctx.facts.get("dst_images"):
        try:
            with ssh.Connection(ctx.target) as dst:
                criu.kill_restored(dst, ctx.facts["dst_images"], ctx.facts.get("target_pid"))
                dst.run(["rm", "-rf", "--", ctx.facts["dst_images"]], check=False)
        except ssh.SSHError as e:
            if ctx.target_may_run:
                raise _unsafe_to_resume(ctx, e)
    with ssh.Connection(ctx.source) as src:
        if not ctx.facts.get("dumped"):
            # The dump's answer was lost: the tree still runs, or CRIU
            # finished and its images are complete (inventory.img is last).
            if _pid_alive(src, ctx.facts["pid"]):
                ctx.run.result_workload = str(ctx.facts["pid"])
                return Measured(detail=f"PID {ctx.facts['pid']} still running on {ctx.source.name}")
            if src.run(["test", "-s", f"{ctx.facts['src_images']}/inventory.img"], check=False).rc != 0:
                raise MigrationError(f"{ctx.source.name}: the process stopped and no images were written")
        pid = criu.restore(src, ctx.facts["src_images"])
        ctx.resumed_at = time.perf_counter()
        if not _settle(lambda: _pid_alive(src, pid)):
            raise MigrationError(f"{ctx.source.name}: the process does not stay running after rollback")
        ctx.run.result_workload = str(pid)
        src.run(["rm", "-rf", "--", ctx.facts["src_images"]], check=False)
    return Measured(detail=f"PID {pid} running again on {ctx.source.name}")


def process_abort(ctx):
    for conn, key in ((ctx.src, "src_images"), (ctx.dst, "dst_images")):
        if conn is not None and ctx.facts.get(key):
            conn.run(["rm", "-rf", "--", ctx.facts[key]], check=False)


# -- the plans ---------------------------------------------------------------------

CONTAINER_STEPS = [
    Step("pre-flight", "source", container_preflight_source),
    Step("pre-flight", "target", container_preflight_target),
    Step("ship image", "both", ship_image, when=image_missing, workload_bytes=False),
    Step("prepare target", "target", prepare_target),
    Step("prepare source", "source", prepare_source, when=has_restart_policy),
    Step("checkpoint", "source", checkpoint_container, freezes=True),
    Step("transfer", "both", transfer_container),
    Step("restore", "target", restore_container, resumes=True),
    Step("verify", "target", verify_container, commits=True),
    Step("cleanup", "both", cleanup_container),
]

PROCESS_STEPS = [
    Step("pre-flight", "source", process_preflight_source),
    Step("pre-flight", "target", process_preflight_target),
    Step("dump", "source", dump_process, freezes=True),
    Step("transfer", "both", transfer_process),
    Step("restore", "target", restore_process, resumes=True),
    Step("verify", "target", verify_process, commits=True),
    Step("cleanup", "both", cleanup_process),
]

PLANS = {
    CONTAINER: (CONTAINER_STEPS, rollback_container, container_abort),
    PROCESS: (PROCESS_STEPS, rollback_process, process_abort),
}


# -- running a plan --------------------------------------------------------------------


def create_run(source, target, kind, workload, keep_source=False, strategy=None):
    """Validate and store a pending run; MigrationError says what is wrong."""
    if source.pk == target.pk:
        raise MigrationError("source and target must be different hosts")
    if kind not in PLANS:
        raise MigrationError(f"unknown workload kind {kind!r}")
    workload = str(workload).strip()
    if not workload:
        raise MigrationError("name a container or a PID")
    if kind == PROCESS and not workload.isdigit():
        raise MigrationError(f"{workload!r} is not a PID")
    fields = dict(source=source, target=target, kind=kind, workload=workload, keep_source=keep_source)
    if strategy:
        fields["strategy"] = strategy
    busy = MigrationError(f"{workload} on {source.name} is already being migrated")
    for other in MigrationRun.objects.unfinished().filter(source=source, kind=kind, workload=workload):
        # Busy while the process that claimed it lives, or, not yet
        # claimed, while its thread is about to.
        if worker_alive(other.worker) if other.worker else _young(other):
            raise busy
        # Its process is gone (a killed CLI, a crashed server): it blocks nothing.
        MigrationRun.objects.filter(pk=other.pk, status=other.status).update(
            status=INTERRUPTED, error="interrupted: the process running it is gone"
        )
    try:
        with transaction.atomic():
            return MigrationRun.objects.create(**fields)
    except IntegrityError:
        # Another request got there between the check and the insert.
        raise busy from None


def worker_id(pid=None):
    """hostname:boot id:pid:start time of a process — unique across reboots and PID reuse."""
    pid = pid or os.getpid()
    return f"{socket.gethostname()}:{_boot_id()}:{pid}:{_start_time(pid)}"


def worker_alive(worker):
    """Whether the process that claimed a run (see worker_id) still runs."""
    if not worker:
        return False  # never claimed: its thread died before it began
    host, boot, pid, started = (worker.split(":") + ["", "", "", ""])[:4]
    if host != socket.gethostname():
        return True  # another machine's worker: not ours to judge
    if not pid.isdigit():
        return False
    # Same boot and the same start time: the same process, not a reused PID.
    return started != "None" and worker == worker_id(int(pid))


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


def _young(run, seconds=60):
    return (timezone.now() - run.created).total_seconds() < seconds


def claim(run):
    """Mark a pending run running; False if someone else already did."""
    now = timezone.now()
    me = worker_id()
    n = MigrationRun.objects.filter(pk=run.pk, status=PENDING).update(status=RUNNING, started=now, worker=me)
    if n == 1:
        run.status, run.started, run.worker = RUNNING, now, me
    return n == 1


class _PhaseTimer:
    def __init__(self, run, seq, name, host):
        self.phase = Phase.objects.create(run=run, seq=seq, name=name, host=host, started=timezone.now())
        self.t0 = time.perf_counter()

    def finish(self, measured, status=PHASE_OK, error="", log_excerpt=""):
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
        p.save()
        return p


def _describe(error):
    return str(error) or error.__class__.__name__


def execute(run, after_phase=None, on_phase=None):
    """Claim a pending run and run it to its end; return the run.

    after_phase: optional {phase name: callable(ctx)} called after a phase
    succeeds — how tests make a real failure happen at a chosen point.
    on_phase: optional callable(phase) for each phase that ends (the CLI
    prints them).
    """
    if not claim(run):
        raise MigrationError(f"run {run.code} was already started")
    steps, rollback, abort = PLANS[run.kind]
    on_phase = on_phase or (lambda phase: None)
    ctx = Context(run)
    try:
        failure = _run_steps(ctx, steps, after_phase or {}, on_phase)
        if failure is None:
            run.status = SUCCEEDED
        else:
            _recover(ctx, failure, rollback, abort, on_phase)
        return run
    except BaseException as e:
        # Ctrl-C in the CLI, or the process told to stop: bring the
        # workload back before going (once: not when recovery itself broke).
        if run.status == RUNNING and not ctx.recovering:
            _recover(ctx, e, rollback, abort, on_phase)
        raise
    finally:
        ctx.close()
        if run.status == RUNNING:
            run.status = FAILED
            run.error = run.error or "stopped while bringing the workload back; check both hosts"
        run.finished = timezone.now()
        run.save()


def _run_steps(ctx, steps, after_phase, on_phase):
    """Run the steps in order; return the exception that stopped them, or None."""
    run = ctx.run
    for step in steps:
        timer = None
        try:
            if step.when and not step.when(ctx):
                continue
            timer = _PhaseTimer(run, ctx.seq, step.name, ctx.host_for(step.side))
            ctx.current_timer = timer
            if step.freezes:
                # From here a failure must bring the workload back.
                ctx.frozen = True
                ctx.freeze_t = time.perf_counter()
            measured = step.run(ctx) or Measured()
            if step.commits:
                ctx.committed = True  # before any bookkeeping that could fail
            phase = timer.finish(measured)
            ctx.seq += 1
            if step.workload_bytes:
                run.total_bytes += phase.bytes
            else:
                run.image_bytes += phase.bytes
            if step.resumes and ctx.freeze_t is not None:
                run.downtime_ms = ((ctx.resumed_at or time.perf_counter()) - ctx.freeze_t) * 1000
            run.save(update_fields=["total_bytes", "image_bytes", "downtime_ms", "expected_bytes"])
            on_phase(phase)
            if step.name in after_phase:
                after_phase[step.name](ctx)
        except Exception as e:  # every failure must reach the rollback
            if not isinstance(e, STEP_ERRORS + (MigrationError,)):
                log.exception("run %s: phase %s", run.code, step.name)
            _fail_phase(ctx, e, on_phase)
            return e
    return None


def _fail_phase(ctx, error, on_phase):
    """Mark the phase in progress, if any, failed."""
    timer = ctx.current_timer
    if timer is None or timer.phase.status != PHASE_RUNNING:
        return
    try:
        phase = timer.finish(None, PHASE_FAILED, _describe(error), getattr(error, "log_excerpt", ""))
    except Exception:  # the database itself may be what failed
        log.exception("run %s: could not record the failed phase", ctx.run.code)
        return
    ctx.seq += 1
    on_phase(phase)


def _recover(ctx, failure, rollback, abort, on_phase):
    """After a failure: bring the workload back where it was, or say where it is."""
    run = ctx.run
    ctx.recovering = True
    message = _describe(failure)
    _fail_phase(ctx, failure, on_phase)
    if ctx.committed:
        # The workload runs verified on the target; what failed was cleanup.
        run.status = SUCCEEDED
        run.error = f"the workload runs on {ctx.target.name}, but afterwards: {message}"
        return
    if not ctx.frozen:
        try:
            abort(ctx)
        except Exception as e:
            message += f" (cleaning up the target also failed: {e})"
        run.status = FAILED
        run.error = message
        return
    timer = _PhaseTimer(run, ctx.seq, "rollback", ctx.source.name)
    ctx.resumed_at = None
    try:
        measured = rollback(ctx)
    except Exception as e:
        phase = timer.finish(None, PHASE_FAILED, _describe(e))
        run.status = FAILED
        run.error = f"{message}; rollback failed: {_describe(e)}"
        log.error("run %s: %s", run.code, run.error)
    else:
        phase = timer.finish(measured)
        run.status = ROLLED_BACK
        run.error = message
        # What the workload saw: stopped from the freeze until it ran again
        # on the source (or, when it never stopped, until the rollback ended).
        run.downtime_ms = ((ctx.resumed_at or time.perf_counter()) - ctx.freeze_t) * 1000
    on_phase(phase)
