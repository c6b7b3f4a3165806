"""Containers: kept checkpoints, restores and clones, on the Docker engine plan's steps.

- checkpoint: Docker's checkpoint call (leaving the container running or
  stopping it), then its images and writable layer copied into a kept
  checkpoint's directory on the host;
- restore / clone from a kept checkpoint: a new container created with the
  checkpointed configuration, the kept directory streamed into it, started
  from the checkpoint; in place, it replaces the stopped original once it runs;
- clone of a running container: a leave-running checkpoint streamed straight
  into the new container, as a migration does, the original left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import criu, ssh
from ...docker_engine import Engine, EngineError, redate_checkpoint_argv
from ...models import CHECKPOINT, CLONE, CONTAINER, RESTORE
from .. import keep, lifecycle
from ..errors import MigrationError
from ..hostcheck import SPACE_MARGIN, check_space, connect, unsafe_to_resume
from ..plan import Measured, Plan, Step
from . import container_engine as ce

if TYPE_CHECKING:
    from ..runner import Context


@dataclass
class KeepContainerState(ce.ContainerState):
    keep_name: str = ""  # the kept checkpoint a checkpoint run makes
    kept: str = ""  # its directory on the host
    criu_version: str = ""
    kernel: str = ""
    final_name: str = ""  # the restored container's name when the run ends
    replace_id: str = ""  # restore in place: the stopped original, removed once the restore runs
    layer_bytes: int = 0  # checkpoint: the writable layer's size at pre-flight


def leaving_running(ctx: Context) -> bool:
    return ctx.state.leave_running


def stopping(ctx: Context) -> bool:
    return not ctx.state.leave_running


# -- checkpoint ---------------------------------------------------------------------


def _refuse_mounts(ctx: Context) -> None:
    """A kept checkpoint holds no volume's data, and a clone must not share the original's: refused first."""
    ctx.src = connect(ctx.source, CONTAINER)
    found = ctx.src.find_container(ctx.run.workload)
    mounts = [m for m in (found or {}).get("Mounts") or [] if m.get("Type") != "tmpfs"]
    if mounts:
        what = ", ".join(f"{m.get('Name') or m.get('Source')} -> {m.get('Destination')}" for m in mounts)
        raise MigrationError(
            f"{ctx.source.name}: container {ctx.run.workload} mounts {what}; a kept checkpoint or a clone "
            "carries no volume data and must not share the original's, so it is refused"
        )


def _refuse_what_stays_behind(ctx: Context) -> None:
    """What a kept checkpoint or a clone cannot carry, refused before anything is frozen."""
    s = ctx.state
    if s.leave_running and s.facts.get("close_tcp"):
        raise MigrationError(
            f"{ctx.source.name}: container {s.container['Name'].lstrip('/')} holds established TCP connections; "
            "Docker's checkpoint API cannot keep them, and a checkpoint that leaves it running must not close them"
        )


def checkpoint_preflight(ctx: Context):
    _refuse_mounts(ctx)
    measured = ce.preflight_source(ctx)
    _refuse_what_stays_behind(ctx)
    s = ctx.state
    if not s.leave_running:
        ce.refuse_auto_remove(ctx, "take the checkpoint with --leave-running")
    keep.name_free(s.keep_name)
    s.kept = keep.kept_dir(ctx.source, s.keep_name)
    if ctx.src.conn.run(["test", "-e", s.kept], check=False).rc == 0:
        raise MigrationError(f"{ctx.source.name}: {s.kept} already exists")
    # The writable layer is copied too, after the checkpoint: counted in the room
    # needed, and in the time its copy may take.
    upper = s.container["GraphDriver"]["Data"]["UpperDir"]
    s.layer_bytes = int(ctx.src.conn.sh('du -sb -- "$1" | cut -f1', upper).stdout)
    need = s.rss + s.layer_bytes + SPACE_MARGIN
    check_space(ctx.src.conn, s.kept.rsplit("/", 1)[0], need, "the kept checkpoint and writable layer")
    s.criu_version, s.kernel = keep.host_facts(ctx.src.conn)
    ctx.dst = None  # one host: the target is the source
    return measured


# A speed a busy disk still copies at: with the layer's size, how long the
# keep step's copy may take beyond the usual limit of a remote command
# (a multi-GiB layer outlasts that limit, and the copy would be cut off).
LAYER_COPY_FLOOR = 20 * 2**20  # bytes per second


def keep_timeout(ctx: Context) -> float:
    return 120 + ctx.state.layer_bytes / LAYER_COPY_FLOOR


def stopping_with_restart_policy(ctx: Context) -> bool:
    return stopping(ctx) and ce.has_restart_policy(ctx)


# $1 Docker's checkpoint directory, $2 the container's writable layer,
# $3 the kept directory: both copied whole before the directory gets its
# name, so a half-copied checkpoint never looks kept. Prints its size.
KEEP_SCRIPT = r"""
set -e
rm -rf -- "$3.part"
mkdir -p -- "$3.part"
cp -a -- "$1" "$3.part/checkpoint"
cp -a -- "$2" "$3.part/diff"
mv -T -- "$3.part" "$3"  # -T: never into a directory made meanwhile
du -sb -- "$3" | cut -f1
"""


def keep_checkpoint(ctx: Context):
    s = ctx.state
    c = s.container
    docker_dir = f"{s.src_root}/containers/{c['Id']}/checkpoints/{s.checkpoint}"
    upper = c["GraphDriver"]["Data"]["UpperDir"]
    size = int(ctx.src.conn.sh(KEEP_SCRIPT, docker_dir, upper, s.kept, timeout=keep_timeout(ctx)).stdout)
    # Docker's checkpoint call keeps no statistics (containerd removes CRIU's
    # work directory); when a runtime left them with the images, they count.
    stats = criu.read_stats(ctx.src.conn, f"{s.kept}/{keep.IMAGES}/stats-dump")
    freeze = stats["frozen_time"] / 1000 if stats.get("frozen_time") else ctx.run.downtime_ms
    cp = keep.record(
        ctx, s.kept, size, workload=ctx.run.workload, workload_id=c["Id"], leave_running=s.leave_running,
        criu_stats=stats, freeze_ms=freeze if s.leave_running else None, config=c, facts=s.facts, image_id=c["Image"],
        image=c["Config"]["Image"], criu_version=s.criu_version, kernel=s.kernel,
    )  # fmt: skip
    how = f"left running, frozen at most {freeze:.0f} ms" if s.leave_running else "stopped"
    return Measured(bytes=size, criu_stats=stats, detail=f"kept as {cp.name} in {s.kept} ({how})")


def checkpoint_cleanup(ctx: Context):
    s = ctx.state
    ctx.src.delete_checkpoint(s.container["Id"], s.checkpoint)  # the kept copy is what stays
    removed = keep.apply_retention(ctx.source, CONTAINER, ctx.run.workload)
    detail = f"retention removed {', '.join(removed)}" if removed else "Docker's own copy removed"
    if stopping_with_restart_policy(ctx):
        detail += "; the stopped container's restart policy stays 'no' (a restore gets the original back)"
    return Measured(detail=detail)


def checkpoint_rollback(ctx: Context):
    s = ctx.state
    if s.kept:
        keep.unrecord(ctx)  # recorded, then the run failed before it was marked done: the files go
        with ssh.Connection(ctx.source) as conn:
            conn.run(["rm", "-rf", "--", s.kept, f"{s.kept}.part"], check=False)
    return ce.rollback(ctx)


CHECKPOINT_PLAN = Plan(
    kind=CONTAINER,
    strategy=CHECKPOINT,
    operation=CHECKPOINT,
    label="checkpoint (Docker engine)",
    summary="Docker's checkpoint call, leaving the container running or stopping it; images and writable "
    "layer kept on the host.",
    state=KeepContainerState,
    steps=(
        Step("pre-flight", "source", checkpoint_preflight),
        Step("prepare source", "source", ce.prepare_source, when=stopping_with_restart_policy),
        Step("checkpoint", "source", ce.checkpoint, freezes=True, resumes=True, when=leaving_running),
        Step("checkpoint", "source", ce.checkpoint, freezes=True, stops=True, when=stopping),
        Step("keep", "source", keep_checkpoint, commits=True),
        Step("cleanup", "source", checkpoint_cleanup),
    ),
    rollback=checkpoint_rollback,
    abort=ce.abort,
)


# -- restore and clone from a kept checkpoint ------------------------------------------------


def restore_preflight_source(ctx: Context):
    cp = ctx.run.checkpoint
    if cp is None:
        raise MigrationError("the checkpoint was deleted")
    ctx.src = connect(ctx.source, CONTAINER)
    s = ctx.state
    s.container, s.kept, s.rss = cp.config, cp.path, cp.size
    # No volumes nor binds (a checkpoint of a container with any is refused);
    # networks and fixed addresses to prepare, and what verify compares.
    s.facts = {"volumes": [], "binds": [], "other_volumes": [], "networks": {}, **(cp.facts or {})}
    s.checkpoint, s.src_checkpoints, s.src_upper = keep.IMAGES, cp.path, f"{cp.path}/{keep.LAYER}"
    for sub in (keep.IMAGES, keep.LAYER):
        if ctx.src.conn.run(["test", "-d", f"{cp.path}/{sub}"], check=False).rc != 0:
            raise MigrationError(f"{ctx.source.name}: the files of checkpoint {cp.name} are gone from {cp.path}")
    return Measured(detail=f"checkpoint {cp.name}: {cp.size // 1024} KiB in {cp.path}")


def _refuse_missing_image(ctx: Context) -> None:
    """Neither host has the checkpoint's image: nothing to ship it from, found before anything is made."""
    cp = ctx.run.checkpoint
    image = cp.config["Image"]
    if not ctx.dst.has_image(image) and not ctx.src.has_image(image):
        where = "there" if ctx.source.pk == ctx.target.pk else f"there and on {ctx.source.name}, its checkpoint's host"
        raise MigrationError(
            f"{ctx.target.name}: the checkpoint's image {cp.image or '?'} ({image[:19]}) is missing {where}; "
            "load it first"
        )


def restore_preflight_target(ctx: Context):
    cp = ctx.run.checkpoint
    s = ctx.state
    ctx.dst = connect(ctx.target, CONTAINER)
    facts = keep.check_compatible(ctx.dst.conn, cp.criu_version, cp.kernel, f"checkpoint {cp.name}")
    _refuse_missing_image(ctx)
    s.final_name = s.final_name or cp.config["Name"].lstrip("/")
    s.name = s.final_name
    other = ctx.dst.find_container(s.final_name)
    if other and ctx.run.operation == RESTORE and other["Id"] == cp.workload_id:
        if other["State"]["Running"]:
            raise MigrationError(
                f"{ctx.target.name}: container {s.final_name!r} is running; stop it to restore it in place, "
                f"or restore the checkpoint under another name"
            )
        # Two in-place restores of it at once (two of its checkpoints, two
        # users, a host that takes two runs) would each restore a copy and
        # replace it: two copies running. The original is claimed as this
        # run's workload, as a checkpoint or migration of it claims it too.
        lifecycle.claim_workload(
            ctx.run, other["Id"],
            busy=f"{ctx.target.name}: container {s.final_name} is being restored or checkpointed by another run; "
            "wait for that run to end",
        )  # fmt: skip
        # Replaced only once the restored copy runs: until then the stopped
        # original stays as it was.
        s.replace_id = other["Id"]
        s.name = f"{s.final_name}-cw{ctx.run.code.hex[:8]}"
    measured = ce.preflight_target(ctx)
    measured.detail = f"{facts}, {measured.detail}"
    return measured


def stage(ctx: Context):
    # The images may be the very bytes containerd still holds from the
    # checkpoint (same engine, not yet collected): moby/moby#42900.
    s = ctx.state
    ctx.dst.conn.run(redate_checkpoint_argv(f"{s.dst_root}/containers/{s.target_id}/checkpoints/{s.checkpoint}"))
    return Measured(detail="checkpoint staged")


def restore_finish(ctx: Context):
    s = ctx.state
    ctx.dst.delete_checkpoint(s.target_id, s.checkpoint)
    if s.replace_id:
        ctx.dst.remove(s.replace_id)
        ctx.dst.rename(s.target_id, s.final_name)
        return Measured(detail=f"replaced the stopped container {s.replace_id[:12]}; now {s.final_name}")
    return Measured(detail=f"container {s.final_name} ({s.target_id[:12]})")


def _remove_copy(ctx: Context) -> str:
    """Remove the container a restore made on the target; a note when it is left behind."""
    s = ctx.state
    if not s.target_id:
        return ""
    try:
        with Engine(ctx.target) as dst:
            dst.remove(s.target_id)
    except (EngineError, ssh.SSHError) as e:
        if ctx.target_may_run and ce._container_may_run(ctx.target, s.target_id):
            raise unsafe_to_resume(ctx, e)
        return f"; left a stopped container {s.target_id[:12]} on {ctx.target.name} ({e})"
    return ""


def restore_rollback(ctx: Context):
    note = _remove_copy(ctx)
    # Nothing was stopped: the checkpoint and any original stay as they were.
    return Measured(detail=f"restored copy removed; the checkpoint is unchanged{note}")


_RESTORE_STEPS = (
    Step("pre-flight", "source", restore_preflight_source),
    Step("pre-flight", "target", restore_preflight_target),
    Step("ship image", "both", ce.ship_image, when=ce.image_missing, workload_bytes=False),
    Step("prepare target", "target", ce.prepare_target),
    Step("transfer", "both", ce.transfer),
    Step("stage", "target", stage),
    Step("restore", "target", ce.restore),
    Step("verify", "target", ce.verify, commits=True),
    Step("finish", "target", restore_finish),
)

RESTORE_PLAN = Plan(
    kind=CONTAINER,
    strategy=RESTORE,
    operation=RESTORE,
    label="restore (Docker engine)",
    summary="A kept checkpoint restored into a new container, on its host or another.",
    state=KeepContainerState,
    steps=_RESTORE_STEPS,
    rollback=restore_rollback,
    abort=ce.abort,
)


# -- clone --------------------------------------------------------------------------------


def clone_preflight_source(ctx: Context):
    if ctx.run.checkpoint_id:
        return restore_preflight_source(ctx)
    _refuse_mounts(ctx)
    measured = ce.preflight_source(ctx)
    _refuse_what_stays_behind(ctx)
    return measured


def clone_preflight_target(ctx: Context):
    if ctx.run.checkpoint_id:
        return restore_preflight_target(ctx)
    ctx.state.name = ctx.state.final_name
    return ce.preflight_target(ctx)


def from_checkpoint(ctx: Context) -> bool:
    return bool(ctx.run.checkpoint_id)


def from_live(ctx: Context) -> bool:
    return not ctx.run.checkpoint_id


def clone_cleanup(ctx: Context):
    s = ctx.state
    if from_live(ctx):
        ctx.src.delete_checkpoint(s.container["Id"], s.checkpoint)
    ctx.dst.delete_checkpoint(s.target_id, s.checkpoint)
    return Measured(detail=f"clone {s.final_name} ({s.target_id[:12]}) runs; the original was left as it was")


def clone_rollback(ctx: Context):
    if from_checkpoint(ctx):
        return restore_rollback(ctx)
    # The original ran on through its leave-running checkpoint: the generic
    # rollback removes the copy, finds the original running and only
    # deletes the checkpoint it left.
    return ce.rollback(ctx)


CLONE_PLAN = Plan(
    kind=CONTAINER,
    strategy=CLONE,
    operation=CLONE,
    label="clone (Docker engine)",
    summary="A new container from a kept checkpoint, or from a running one through a leave-running "
    "checkpoint; the original is left as it was.",
    state=KeepContainerState,
    steps=(
        Step("pre-flight", "source", clone_preflight_source),
        Step("pre-flight", "target", clone_preflight_target),
        Step("ship image", "both", ce.ship_image, when=ce.image_missing, workload_bytes=False),
        Step("prepare target", "target", ce.prepare_target),
        Step("checkpoint", "source", ce.checkpoint, freezes=True, resumes=True, when=from_live),
        Step("transfer", "both", ce.transfer),
        Step("stage", "target", stage),
        Step("restore", "target", ce.restore),
        Step("verify", "target", ce.verify, commits=True),
        Step("cleanup", "both", clone_cleanup),
    ),
    rollback=clone_rollback,
    abort=ce.abort,
)

PLANS = (CHECKPOINT_PLAN, RESTORE_PLAN, CLONE_PLAN)
