"""Containers through Docker's own checkpoint API: the compatible reference.

Pre-flight on both hosts; the image shipped if the target lacks it; the
target container created before the freeze; `POST /containers/{id}/checkpoints`
on the source; the checkpoint and the writable layer in one tar stream from
host to host; `POST /containers/{id}/start?checkpoint=` on the target;
verification; then the source removed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from django.db.models import Q
from django.utils import timezone

from ... import criu, ssh, validation
from ...docker_engine import Engine, EngineError, NotFoundError, redate_checkpoint_argv
from ...models import (
    CHECKPOINT,
    CLONE,
    CONTAINER,
    ENGINE,
    FINISHED,
    MIGRATE,
    PHASE_OK,
    ROLLED_BACK,
    MigrationRun,
    Stage,
)
from .. import container_checks, lifecycle, streams
from ..errors import MigrationError
from ..hostcheck import SPACE_MARGIN, check_space, connect, criu_ready, rss_bytes, settle, unsafe_to_resume
from ..plan import Measured, Plan, Step

if TYPE_CHECKING:
    from ..runner import Context

# Marks a container criuweb created on a target, with the run's id.
RUN_LABEL = container_checks.RUN_LABEL
# Seconds Docker may take, once the checkpoint stopped the container, to
# say so (and so to have drained its output into its log).
EXIT_WAIT = 10.0


@dataclass
class ContainerState:
    container: dict = field(default_factory=dict)  # the source's inspect
    checkpoint: str = ""
    src_root: str = ""  # the engines' data roots
    dst_root: str = ""
    rss: int = 0
    name: str = ""
    target_id: str = ""
    target_upper: str = ""
    restart_policy: dict | None = None  # the source's, while it is off
    checkpointed: bool = False
    facts: dict = field(default_factory=dict)  # container_checks.check_source()
    networks_to_create: list = field(default_factory=list)
    created_networks: list = field(default_factory=list)  # on the target, by this run
    shipped_tags: list = field(default_factory=list)  # given there to the image this run shipped
    volumes: list = field(default_factory=list)  # named local volumes, with their target mountpoints
    tmp_added: bool = False
    leave_running: bool = False  # checkpoint without stopping the source (a clone, a kept checkpoint)
    # Where transfer reads the checkpoint and writable layer, when not from
    # the source container (a kept checkpoint's directory).
    src_checkpoints: str = ""
    src_upper: str = ""
    log_path: str = ""  # the source's json log, carried to dst_log when it has one
    dst_log: str = ""


def _engine_ready(engine):
    """CRIU passing and an engine that can checkpoint on overlay2; returns (probe, docker info)."""
    probe = criu_ready(engine.conn)
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
# back on the same engine is in that window for a while, and so is one
# checkpointed to keep or to clone.
SECOND_CHECKPOINT_WAIT = 10 * 60


# The plans whose checkpoint goes through Docker's API (containerd): only
# they can meet containerd#8401, and only their kept checkpoints and clones
# leave its blob behind. The runc plans checkpoint beside containerd.
DOCKER_API_STRATEGIES = (ENGINE, CHECKPOINT, CLONE)


def _refuse_second_checkpoint(ctx: Context, container, info):
    if int(info.get("ServerVersion", "0").split(".")[0] or 0) >= 25:
        return
    if ctx.plan.strategy not in DOCKER_API_STRATEGIES:
        return
    since = timezone.now() - timezone.timedelta(seconds=SECOND_CHECKPOINT_WAIT)
    # Only a checkpoint that was taken leaves containerd's blob behind; a
    # checkpoint that failed (CRIU refused, the container ran on) does not.
    recent = (
        MigrationRun.objects.filter(source=ctx.source, kind=CONTAINER, finished__gte=since)
        .filter(
            Q(operation=MIGRATE, status=ROLLED_BACK, result_workload=container["Id"][:12])
            | Q(
                operation__in=(CHECKPOINT, CLONE),
                strategy__in=DOCKER_API_STRATEGIES,
                state__checkpointed=True,
                state__container__Id=container["Id"],
            )
        )
        .filter(Q(state__checkpointed=True) | Q(phases__name="checkpoint", phases__status=PHASE_OK))
        .distinct()
        .order_by("-finished")
        .first()
    )
    if recent:
        wait = SECOND_CHECKPOINT_WAIT - (timezone.now() - recent.finished).total_seconds()
        what = {MIGRATE: "and rolled back", CHECKPOINT: "to keep", CLONE: "to clone it"}[recent.operation]
        raise MigrationError(
            f"{ctx.source.name}: this container was checkpointed {what} here "
            f"{(timezone.now() - recent.finished).seconds} s ago; Docker {info['ServerVersion']}'s containerd "
            f"could fail a second checkpoint now and lose its state (containerd#8401). Try again in "
            f"{int(wait // 60) + 1} min"
        )


def preflight_source(ctx: Context):
    ctx.src = ctx.src or connect(ctx.source, CONTAINER)
    probe, info = _engine_ready(ctx.src)
    try:
        ref = validation.container_ref(ctx.run.workload)
    except validation.InputError as e:
        raise MigrationError(str(e)) from None
    c = ctx.src.inspect(ref)
    if not c["State"]["Running"]:
        raise MigrationError(f"{ctx.source.name}: container {ctx.run.workload!r} is not running")
    for other in lifecycle.restoring_here(ctx.run):
        if (other.state or {}).get("target_id") == c["Id"]:
            lifecycle.refuse_arriving(ctx.run, other, f"container {ctx.run.workload!r}")
    # By its full id: the same container named another way is the same.
    lifecycle.claim_workload(ctx.run, c["Id"])
    if c["State"].get("Paused"):
        # Paused by its operator: the checkpoint records no pause, so the copy
        # would run on the target, and a rollback's unpause would wake it here.
        raise MigrationError(
            f"{ctx.source.name}: container {ctx.run.workload!r} is paused; unpause it first (docker unpause): "
            "moved or checkpointed, it would run again"
        )
    _refuse_second_checkpoint(ctx, c, info)
    facts = container_checks.check_source(ctx, c)
    top = ctx.src.call("docker top", ctx.src.api.top, c["Id"], ps_args="-eo user,pid")
    rss = rss_bytes(ctx.src.conn, [row[1] for row in top["Processes"]])
    root = info["DockerRootDir"]
    check_space(ctx.src.conn, root, rss + SPACE_MARGIN, "the checkpoint")
    s = ctx.state
    s.container, s.src_root, s.rss, s.checkpoint = c, root, rss, f"cw-{ctx.run.code.hex[:12]}"
    s.facts = facts
    ctx.run.expected_bytes = rss
    # Last: it changes the container, and only once nothing refused it.
    if container_checks.needs_tmp(c):
        s.tmp_added = container_checks.ensure_tmp(ctx.src.conn, c)
    volumes = f"; volumes {', '.join(v['name'] for v in facts['volumes'])} move with it" if facts["volumes"] else ""
    tcp = "; its established TCP connections will be closed" if facts["close_tcp"] else ""
    if s.tmp_added:
        tcp += "; read-only root: an empty /tmp added to its writable layer, which CRIU needs to restore it"
    return Measured(
        detail=f"CRIU {probe['version']}, Docker {info['ServerVersion']}, container {c['Name'].lstrip('/')} "
        f"({c['Id'][:12]}), ~{rss // 1024} KiB resident; sockets: {facts['sockets']}{volumes}{tcp}"
    )


def refuse_auto_remove(ctx: Context, instead: str = "start it without --rm to move it") -> None:
    """Refuse a --rm container that the checkpoint would stop: Docker removes it then, with its writable layer."""
    c = ctx.state.container
    if c["HostConfig"].get("AutoRemove"):
        raise MigrationError(
            f"{ctx.source.name}: container {c['Name'].lstrip('/')} was started with --rm: Docker removes it, "
            "writable layer and all, when its checkpoint stops it, so a failure after the checkpoint could not "
            f"bring it back; {instead}"
        )


def preflight_moving_source(ctx: Context):
    measured = preflight_source(ctx)
    refuse_auto_remove(ctx)
    return measured


def preflight_target(ctx: Context):
    ctx.dst = ctx.dst or connect(ctx.target, CONTAINER)
    probe, info = _engine_ready(ctx.dst)
    name = ctx.state.name or ctx.state.container["Name"].lstrip("/")
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
    ctx.state.networks_to_create = container_checks.check_target(ctx, ctx.state.facts)
    container_checks.refuse_taken_ports(ctx)
    container_checks.refuse_taken_addresses(ctx)
    root = info["DockerRootDir"]
    check_space(ctx.dst.conn, root, ctx.state.rss + SPACE_MARGIN, "the checkpoint")
    ctx.state.dst_root, ctx.state.name = root, name
    made = ctx.state.networks_to_create
    return Measured(
        detail=f"CRIU {probe['version']}, Docker {info['ServerVersion']}"
        + (f"; networks {', '.join(made)} will be created here" if made else "")
    )


def image_missing(ctx: Context):
    return not ctx.dst.has_image(ctx.state.container["Image"])


def ship_image(ctx: Context):
    image = ctx.state.container["Image"]
    total = [0]

    def chunks():
        for chunk in ctx.src.save_image(image):
            total[0] += len(chunk)
            yield chunk

    ctx.dst.load_image(chunks())
    if not ctx.dst.has_image(image):
        raise MigrationError(f"{ctx.target.name}: image {image[:19]} still missing after docker load")
    return Measured(bytes=total[0], detail=f"image {image[:19]} copied{_tag_as_on_source(ctx, image)}")


def _tag_as_on_source(ctx: Context, image: str) -> str:
    """Give the shipped image its source tags; returns what was done, for the phase's detail.

    Saved by id, the image arrives untagged, and the container made from it
    would show a bare id where the user ran "repo:tag". Saved by name,
    docker load would move a tag the target's engine already gives another
    image; that tag stays where it is (the container is then made by id).
    """
    s = ctx.state
    kept = []
    for name in ctx.src.image_tags(image):
        there = ctx.dst.image_id(name)
        if there is None:
            ctx.dst.tag_image(image, name)
            # Stored as made: an abort or rollback takes the tags back.
            s.shipped_tags.append(name)
            ctx.save_state()
        elif there != image:
            kept.append(name)
    notes = [f"; tagged {', '.join(s.shipped_tags)}"] if s.shipped_tags else []
    if kept:
        notes.append(f"; {', '.join(kept)} left naming another image on {ctx.target.name}")
    return "".join(notes)


def prepare_target(ctx: Context, runtime: str | None = None):
    # Before the freeze, so creating the container is not downtime.
    source = ctx.state.container
    # By its name where the target's tag means the same image, so lists show
    # "busybox", not a digest; else by id, which always means the same layers.
    image = source["Config"]["Image"]
    if ctx.dst.image_id(image) != source["Image"]:
        image = source["Image"]
    s = ctx.state
    # Networks and volumes first, stored as made, so that an abort removes them.
    for name in s.networks_to_create:
        container_checks.create_networks(ctx, [name])
        s.created_networks.append(name)
        ctx.save_state()
    s.volumes = container_checks.create_volumes(ctx, s.facts)
    ctx.save_state()
    cid = ctx.dst.create_like(source, s.name, image, {RUN_LABEL: str(ctx.run.code)}, runtime=runtime)
    s.target_id = cid
    s.target_upper = ctx.dst.inspect(cid)["GraphDriver"]["Data"]["UpperDir"]
    extra = "".join(
        [f"; network {n} created" for n in s.created_networks]
        + [f"; volume {v['name']} {'created' if v['created'] else 'found empty'}" for v in s.volumes]
    )
    return Measured(detail=f"container {cid[:12]} created{extra}")


def prepare_moving_target(ctx: Context):
    """prepare_target, and the container's log made ready to follow it: `docker logs` keeps its past."""
    measured = prepare_target(ctx)
    s = ctx.state
    c = s.container
    if (c["HostConfig"].get("LogConfig") or {}).get("Type") == "json-file" and c.get("LogPath"):
        s.log_path = c["LogPath"]
        # Docker names a json log after the container, in its directory, and
        # appends to one it finds there when it starts the container.
        s.dst_log = f"{s.dst_root}/containers/{s.target_id}/{s.target_id}-json.log"
        # Docker drains the container's output into its log only after the
        # checkpoint stopped it; registered now, the wait is no downtime.
        ctx.exit_wait = ctx.src.exit_waiter(c["Id"], EXIT_WAIT)
        measured.detail += "; its log follows it"
    return measured


def close_exit_wait(ctx: Context) -> None:
    exit_wait = getattr(ctx, "exit_wait", None)
    if exit_wait is not None:
        exit_wait.close()
        ctx.exit_wait = None


def has_restart_policy(ctx: Context):
    policy = (ctx.state.container["HostConfig"].get("RestartPolicy") or {}).get("Name") or "no"
    return policy != "no"


def prepare_source(ctx: Context):
    # Docker would restart a container with a restart policy the moment the
    # checkpoint stops it: a second, fresh copy. Off until the run ends.
    c = ctx.state.container
    ctx.state.restart_policy = c["HostConfig"]["RestartPolicy"]
    ctx.src.set_restart_policy(c["Id"], {"Name": "no"})
    return Measured(detail=f"restart policy {ctx.state.restart_policy['Name']} off during the move")


def _restore_restart_policy(engine, ctx: Context):
    if ctx.state.restart_policy:
        try:
            engine.set_restart_policy(ctx.state.container["Id"], ctx.state.restart_policy)
        except NotFoundError:
            pass  # the container is gone: there is nothing to restart


def checkpoint(ctx: Context):
    c = ctx.state.container
    # A checkpoint that leaves the container running keeps its connections
    # (pre-flight refused one holding any: Docker's API cannot keep them).
    if ctx.state.facts.get("close_tcp") and not ctx.state.leave_running:
        container_checks.close_tcp(ctx.src.conn, c["State"]["Pid"])
    try:
        ctx.src.checkpoint(c["Id"], ctx.state.checkpoint, timeout=ctx.call_timeout(), exit=not ctx.state.leave_running)
    except EngineError as e:
        # Docker names only the path of CRIU's log; its cause is in there.
        quoted = container_checks.checkpoint_error(ctx.src.conn, e) if e.answered else None
        if quoted:
            raise quoted from e
        raise
    ctx.state.checkpointed = True
    return Measured(detail=f"checkpoint {ctx.state.checkpoint}")


# Unpacks the checkpoint and the writable layer from one tar stream:
# $1 staging dir, $2 the container's checkpoints dir, $3 checkpoint name,
# $4 the container's (empty, not yet mounted) upper dir.
# The writable layer may hold links of its own, but the two top-level
# directories must be real ones and the checkpoint must hold only files and
# directories: a link sent by a compromised source would make `cp -a
# diff/.` copy this host's files into the container, or Docker write
# through it.
UNPACK_CONTAINER = r"""
set -e
mkdir -p "$1" "$2"
tar --numeric-owner --xattrs --xattrs-include='*' --same-owner -xpf - -C "$1"
for d in "$1/$3" "$1/diff"; do
    if [ -L "$d" ] || [ ! -d "$d" ]; then
        echo "refusing the stream: $d is not a directory" >&2; rm -rf -- "$1"; exit 3
    fi
done
odd=$(find "$1/$3" ! -type f ! -type d -print -quit)
if [ -n "$odd" ]; then echo "refusing the checkpoint: $odd is not a regular file" >&2; rm -rf -- "$1"; exit 3; fi
mv "$1/$3" "$2/"
if rmdir "$4" 2>/dev/null; then mv "$1/diff" "$4"; else cp -a "$1/diff/." "$4/"; fi
# The source's log (named in CW_LOG by the controller, when it sent one) into its place.
if [ -n "${CW_LOG:-}" ] && [ -f "$1/$CW_LOG" ] && [ ! -L "$1/$CW_LOG" ]; then
    mv -- "$1/$CW_LOG" "$CW_LOG_DST"
fi
rm -rf "$1"
"""


def transfer(ctx: Context):
    s = ctx.state
    c = s.container
    src_upper = s.src_upper or c["GraphDriver"]["Data"]["UpperDir"]
    # The log, once Docker has written its last line (a file still written
    # would fail tar); without the wait (a run a recovery resumed), or with
    # no answer from Docker, the move goes on without it.
    exited = getattr(ctx, "exit_wait", None)
    ctx.exit_wait = None
    log, env = [], []
    if s.log_path and exited is not None and exited.wait():
        log_dir, log_name = s.log_path.rsplit("/", 1)
        log, env = ["-C", log_dir, log_name], ["env", f"CW_LOG={log_name}", f"CW_LOG_DST={s.dst_log}"]
    # One stream, two directories (and the named volumes' data, the log):
    # every SSH command here is downtime.
    src = ctx.src_ssh.open_command(
        streams.TAR_CREATE
        + [s.src_checkpoints or f"{s.src_root}/containers/{c['Id']}/checkpoints", s.checkpoint]
        + ["-C", src_upper.rsplit("/", 1)[0], src_upper.rsplit("/", 1)[1]]
        + container_checks.volume_tar_args(s.volumes)
        + log
    )
    dst_containers = f"{s.dst_root}/containers/{s.target_id}"
    stage = f"{dst_containers}/criuweb-{s.checkpoint}"
    if s.volumes:
        pairs = [x for v in s.volumes for x in (v["name"], v["target_mountpoint"])]
        dst = ctx.dst_ssh.open_command(
            [*env, "sh", "-c", container_checks.UNPACK_WITH_VOLUMES, "sh", stage, f"{dst_containers}/checkpoints",
             s.checkpoint, s.target_upper, f"{dst_containers}/criuweb-volume-bytes", *pairs]
        )  # fmt: skip
    else:
        dst = ctx.dst_ssh.open_command(
            [*env, "sh", "-c", UNPACK_CONTAINER, "sh", stage, f"{dst_containers}/checkpoints", s.checkpoint,
             s.target_upper]
        )  # fmt: skip
    n = streams.pipe(ctx, src, dst, "the checkpoint and writable layer")
    what = "checkpoint and writable layer" + (" and log" if log else "")
    if s.volumes:
        what += f", volumes {', '.join(v['name'] for v in s.volumes)}"
    return Measured(bytes=n, detail=what)


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


def restore(ctx: Context):
    cid = ctx.state.target_id
    copy = f"{ctx.state.dst_root}/containers/{cid}/criuweb-restore.log"
    watcher = container_checks.watch_restore_log(ctx.dst.conn, cid, copy)
    ctx.set_stage(Stage.RESTORING)
    try:
        ctx.dst.start(cid, checkpoint=ctx.state.checkpoint, timeout=ctx.call_timeout())
        ctx.resumed_at = time.perf_counter()
    except EngineError as e:
        # Docker answered that the restore failed: nothing runs there. No
        # answer (a lost connection) proves nothing.
        if e.answered:
            ctx.set_stage(Stage.FROZEN)
        try:
            # containerd has removed the task's own copy by now; the watcher's is left.
            excerpt = criu.log_excerpt(container_checks.restore_log_copy(ctx.dst.conn, copy))
            container_checks.stop_watch(ctx.dst.conn, watcher, copy)
        except ssh.SSHError:
            excerpt = ""  # the connection may be what failed; the error says it
        cause = criu.first_error(excerpt)
        if cause:
            raise criu.CriuError(
                f"{ctx.target.name}: restore from checkpoint failed: {cause} (see restore.log excerpt)", excerpt
            ) from e
        raise criu.CriuError(f"{e} (see restore.log excerpt)" if excerpt else str(e), excerpt) from e
    container_checks.stop_watch(ctx.dst.conn, watcher, copy)
    task_dir = _containerd_task_dir(ctx.dst.conn, ctx.state.dst_root, cid)
    stats = criu.read_stats(ctx.dst.conn, f"{task_dir}/stats-restore")
    restore_log = ctx.dst.conn.read_file(f"{task_dir}/restore.log", check=False) or ""
    return Measured(criu_stats=stats, log=restore_log)


def verify(ctx: Context):
    cid = ctx.state.target_id

    def state():
        s = ctx.dst.inspect(cid)["State"]
        return (s["Pid"], s["StartedAt"]) if s["Running"] and not s.get("Restarting") else None

    if not settle(state):
        s = ctx.dst.inspect(cid)["State"]
        raise MigrationError(
            f"{ctx.target.name}: the restored container is not running (status {s['Status']}, exit {s['ExitCode']})"
        )
    fidelity = container_checks.verify_fidelity(
        ctx, ctx.state.container, ctx.state.restart_policy, ctx.state.facts.get("inside"), RUN_LABEL
    )
    volumes = ""
    if ctx.state.volumes:
        count = ctx.dst.conn.read_file(f"{ctx.state.dst_root}/containers/{cid}/criuweb-volume-bytes", check=False)
        ctx.run.volume_bytes = int(count) if count and count.strip().isdigit() else 0
        MigrationRun.objects.filter(pk=ctx.run.pk).update(volume_bytes=ctx.run.volume_bytes)
        volumes = f"; volumes {ctx.run.volume_bytes} B"
    ctx.run.result_workload = cid[:12]
    return Measured(detail=f"container {cid[:12]} running; {fidelity}{volumes}")


def cleanup(ctx: Context):
    s = ctx.state
    c = s.container
    # The source first: it is what could otherwise run twice.
    if ctx.run.keep_source:
        # Kept stopped, with restart policy "no" (set before the freeze, or
        # never another one), so the engine never starts it again by itself.
        _delete_checkpoint(ctx.src, c["Id"], s.checkpoint)
        detail = "source container kept (stopped, restart policy no)"
    else:
        try:
            ctx.src.remove(c["Id"])  # removes its checkpoints with it
        except NotFoundError:
            pass  # a recovery finishing this cleanup after a crash
        detail = f"source container {c['Id'][:12]} removed"
        detail += container_checks.remove_source_volumes(ctx.src, s.volumes)
        detail += container_checks.remove_source_networks(ctx.src, s.facts.get("networks") or {}, ctx.source)
    _delete_checkpoint(ctx.dst, s.target_id, s.checkpoint)
    return Measured(detail=detail)


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


# How long a rollback waits for the target's engine and SSH server: they
# may be the very thing that stopped answering, and when the restore call
# was sent the workload waits frozen meanwhile.
TARGET_ENGINE_TIMEOUT = 3
TARGET_CONNECT_TIMEOUT = 5

# Makes a prepared target container impossible to start from the run's
# checkpoint: its checkpoint files and staging directory go, and the check
# that they are gone is the exit status. A restore the engine queued and
# never answered then fails ("checkpoint does not exist") instead of
# starting a second copy later. $1 the container's directory, $2 checkpoint.
DISARM_SCRIPT = r"""
rm -rf -- "$1/checkpoints/$2" "$1/criuweb-$2"
[ ! -e "$1/checkpoints/$2" ]
"""


def _disarm_target(ctx: Context, may_run: bool) -> str:
    """Make sure the target copy neither runs nor can start; return what stays there ("" if nothing).

    may_run: a restore call was sent there (its answer lost), so a copy may
    run or start; then a target that cannot be made safe raises
    unsafe_to_resume. Otherwise the container was only created, never
    started, and what cannot be removed now is a leftover for a recovery.
    """
    s = ctx.state
    target, short = ctx.target.name, s.target_id[:12]
    if s.dst_root and s.checkpoint:
        try:
            with ssh.Connection(ctx.target, connect_timeout=TARGET_CONNECT_TIMEOUT) as conn:
                conn.sh(DISARM_SCRIPT, f"{s.dst_root}/containers/{s.target_id}", s.checkpoint, timeout=30)
        except ssh.SSHError as e:
            if may_run:
                raise unsafe_to_resume(ctx, e) from e
            return f"container {short} (created, never started) stays on {target} ({e})"
    try:
        with Engine(ctx.target, timeout=TARGET_ENGINE_TIMEOUT) as dst:
            dst.remove(s.target_id, timeout=TARGET_ENGINE_TIMEOUT)
            # The networks, volumes and image tags this run made there, volume data and all.
            container_checks.remove_created(dst, s)
        return ""
    except NotFoundError:
        return ""
    except (EngineError, ssh.SSHError) as e:
        if may_run and _container_may_run(ctx.target, s.target_id):
            raise unsafe_to_resume(ctx, e) from e
        # Its engine holds it, maybe with a restore call queued: that call
        # now fails for want of the checkpoint. A recovery removes it.
        return f"container {short} stays on {target} until its engine answers (its checkpoint is gone: {e})"


def exited_on_its_own(state: dict) -> bool:
    """Whether a stopped container ended by itself, not by a checkpoint of ours.

    CRIU ends a checkpointed container's tasks with SIGKILL (Docker records
    137); any other exit status is the workload's own, which starting it
    again from its image would run a second time.
    """
    return state.get("ExitCode") != 137 and not state.get("OOMKilled")


def _leave_ended(ctx: Context, src: Engine, state: dict, leftovers: str | None = None) -> Measured:
    """A container that exited before its checkpoint: left as it ended, nothing kept on the target."""
    s = ctx.state
    c = s.container
    _restore_restart_policy(src, ctx)
    ctx.run.result_workload = ""
    if leftovers is None:
        leftovers = _disarm_target(ctx, may_run=False) if s.target_id else ""
    ctx.resumed_on_source(leftovers)
    note = f"; {leftovers}" if leftovers else ""
    return Measured(
        detail=f"container {c['Id'][:12]} left stopped on {ctx.source.name}{note}",
        failed=(
            f"{ctx.source.name}: the container exited on its own (exit status {state.get('ExitCode')}) before "
            f"its checkpoint: nothing was moved, and it stays stopped on {ctx.source.name} as it ended"
        ),
    )


def rollback(ctx: Context):
    """Bring the container back on the source; restartable from the stored state alone."""
    close_exit_wait(ctx)
    s = ctx.state
    c = s.container
    # A restore call was sent (its answer lost): the target copy is made
    # unable to run before the source resumes, so two never run at once.
    # Otherwise nothing can start there, and the source resumes first: the
    # target may be what failed, and the workload waits frozen meanwhile.
    may_run = ctx.target_may_run
    leftovers = _disarm_target(ctx, may_run) if s.target_id and may_run else ""
    with Engine(ctx.source, timeout=ctx.call_timeout()) as src:
        # A checkpoint whose answer was lost may still be under way; found
        # running now, it would stop the container after we looked.
        _await_checkpoint(src, ctx, ctx.call_timeout())
        # Its checkpoint, when the checkpoint call's answer was lost but
        # Docker finished it all the same.
        checkpointed = s.checkpointed or s.checkpoint in src.checkpoints(c["Id"])
        now = src.inspect(c["Id"])["State"]
        if not now["Running"]:
            if not checkpointed and exited_on_its_own(now):
                return _leave_ended(ctx, src, now)
            if not checkpointed:
                # Its state is gone (the checkpoint failed after CRIU stopped
                # it); running it afresh beats running nothing.
                src.start(c["Id"])
                ctx.run.result_workload = c["Id"][:12]
                ctx.resumed_on_source(leftovers)
                _restore_restart_policy(src, ctx)
                raise MigrationError(
                    f"{ctx.source.name}: the container stopped without a checkpoint: its state is lost; "
                    f"started it again from its image"
                )
            # containerd may still hold this very checkpoint (moby/moby#42900).
            cp_dir = f"{s.src_root}/containers/{c['Id']}/checkpoints/{s.checkpoint}"
            src.conn.run(redate_checkpoint_argv(cp_dir))
            src.start(c["Id"], checkpoint=s.checkpoint, timeout=ctx.call_timeout())
            ctx.resumed_at = time.perf_counter()
        ctx.run.result_workload = c["Id"][:12]
        ctx.resumed_on_source(leftovers)
        if not settle(lambda: src.inspect(c["Id"])["State"]["Running"]):
            raise MigrationError(f"{ctx.source.name}: the container does not stay running after rollback")
        if checkpointed:
            _delete_checkpoint(src, c["Id"], s.checkpoint)
        _restore_restart_policy(src, ctx)
    if s.target_id and not may_run:
        leftovers = _disarm_target(ctx, may_run=False)
        if leftovers:
            ctx.resumed_on_source(leftovers)
    note = f"; {leftovers}" if leftovers else ""
    return Measured(detail=f"container {c['Id'][:12]} running again on {ctx.source.name}{note}")


# Whether a checkpoint of container $1 into directory $2 is still under
# way: 0 while runc checkpoints it or a process (dockerd unpacking it from
# containerd) has a file open in the directory, 2 while the directory is
# there but empty (containerd still importing it), 1 when quiet. Processes
# are found from two listings, not one command per process.
CHECKPOINT_BUSY_SCRIPT = r"""
for p in $(ls -l /proc/[0-9]*/exe 2>/dev/null | sed -n 's#.*/proc/\([0-9]*\)/exe -> .*runc$#\1#p'); do
    case $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null) in *" checkpoint "*"$1"*) exit 0 ;; esac
done
ls -l /proc/[0-9]*/fd/ 2>/dev/null | grep -qF -- "-> $2/" && exit 0
[ -d "$2" ] && [ -z "$(ls -A "$2")" ] && exit 2
exit 1
"""


def _await_checkpoint(engine, ctx: Context, timeout: float) -> None:
    """Wait until no checkpoint of the source container is under way.

    A checkpoint call whose answer was lost (the freeze limit cut it off,
    or the controller died) goes on in the engine: CRIU's dump, then
    containerd's import, then dockerd unpacking it into the checkpoint
    directory. Looked at midway, the container may still run (and stop a
    moment later) or its checkpoint be half written.
    """
    s = ctx.state
    cid = s.container["Id"]
    cp_dir = f"{s.src_root}/containers/{cid}/checkpoints/{s.checkpoint}"
    deadline = time.monotonic() + timeout
    quiet = 0
    while quiet < 3:  # dockerd closes each file before it opens the next
        rc = engine.conn.sh(CHECKPOINT_BUSY_SCRIPT, cid, cp_dir, check=False).rc
        if rc == 2 and engine.inspect(cid)["State"]["Running"]:
            rc = 1  # CRIU failed and left it running: nothing is coming
        quiet = quiet + 1 if rc == 1 else 0
        if quiet < 3:
            if time.monotonic() > deadline:
                raise MigrationError(f"{engine.name}: container {cid[:12]} is still being checkpointed")
            time.sleep(0.2)


def _delete_checkpoint(engine, container_id, checkpoint):
    try:
        engine.delete_checkpoint(container_id, checkpoint)
    except NotFoundError:
        pass  # a recovery after a crash may find it gone already


def adopt(ctx: Context) -> bool:
    """After a crash: whether the container restored on the target runs there (recorded if so)."""
    s = ctx.state
    if not s.target_id:
        return False
    with Engine(ctx.target, timeout=TARGET_ENGINE_TIMEOUT) as dst:

        def running():
            found = dst.find_container(s.target_id)
            st = found["State"] if found else {}
            return (st["Pid"], st["StartedAt"]) if st.get("Running") and not st.get("Restarting") else None

        if not settle(running):
            return False
    ctx.run.result_workload = s.target_id[:12]
    return True


def abort(ctx: Context):
    """Remove what the run made while the container runs on the source; restartable after a crash."""
    close_exit_wait(ctx)
    s = ctx.state
    if s.target_id or s.created_networks or s.volumes or s.shipped_tags:
        dst = ctx.dst if ctx.dst is not None else Engine(ctx.target, timeout=TARGET_ENGINE_TIMEOUT).__enter__()
        try:
            if s.target_id:
                # Anything run from it on the target is a second copy.
                try:
                    dst.remove(s.target_id, timeout=TARGET_ENGINE_TIMEOUT)
                except NotFoundError:
                    pass
            container_checks.remove_created(dst, s)
        finally:
            if dst is not ctx.dst:
                dst.close()
    if s.restart_policy and s.container:
        src = ctx.src if ctx.src is not None else Engine(ctx.source, timeout=TARGET_ENGINE_TIMEOUT).__enter__()
        try:
            _restore_restart_policy(src, ctx)
        finally:
            if src is not ctx.src:
                src.close()


PLAN = Plan(
    kind=CONTAINER,
    strategy=ENGINE,
    label="Docker engine checkpoint",
    summary="Docker's own checkpoint and restore calls; the checkpoint and writable layer streamed host to host.",
    state=ContainerState,
    steps=(
        Step("pre-flight", "source", preflight_moving_source),
        Step("pre-flight", "target", preflight_target),
        Step("ship image", "both", ship_image, when=image_missing, workload_bytes=False),
        Step("prepare target", "target", prepare_moving_target),
        Step("prepare source", "source", prepare_source, when=has_restart_policy),
        Step("checkpoint", "source", checkpoint, freezes=True),
        Step("transfer", "both", transfer),
        Step("restore", "target", restore, resumes=True),
        Step("verify", "target", verify, commits=True),
        Step("cleanup", "both", cleanup),
    ),
    rollback=rollback,
    abort=abort,
    moves_volumes=True,
    adopt=adopt,
)
