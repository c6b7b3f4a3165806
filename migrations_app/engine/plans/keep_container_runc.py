"""Containers' kept checkpoints on the runc path: no containerd checkpoint handling.

The same operations as keep_container.py (Docker's checkpoint API), on the
steps of the runc migration plan (container_runc.py), for hosts whose engine
registers criuweb's runtime wrapper (the registry offers these first there,
by the host probe's "runtimes"):

- checkpoint: `runc checkpoint` (with `--leave-running`, or stopping the
  container) straight into the kept directory; CRIU's statistics kept with
  the images, so the freeze shown is CRIU's own `frozen_time`;
- restore / clone from a kept checkpoint: a new container created with the
  checkpointed configuration under criuweb's runtime, the writable layer
  copied into it and a restore marker naming the images: on the
  checkpoint's own host the kept images themselves (CRIU only reads them),
  elsewhere a copy streamed there; then a plain `docker start` restores it;
- clone of a running container: a leave-running runc checkpoint streamed
  into the new container, the original left as it was.

Checkpoints made through Docker's API hold the same CRIU images (containerd
runs runc checkpoint too) and restore this way as well. Docker's
containerd#8401 does not apply: containerd never sees these checkpoints.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import runc, ssh
from ...models import CHECKPOINT, CLONE, CONTAINER, RESTORE, Stage
from .. import keep, streams
from ..errors import MigrationError
from ..hostcheck import SPACE_MARGIN
from ..plan import Measured, Plan, Step
from . import container_engine as ce
from . import container_runc as cr
from . import keep_container as kc

if TYPE_CHECKING:
    from ..runner import Context

NEEDS = (f"runtime:{runc.RUNTIME_NAME}",)


@dataclass
class KeepRuncState(cr.RuncContainerState):
    keep_name: str = ""
    kept: str = ""
    criu_version: str = ""
    kernel: str = ""
    final_name: str = ""
    replace_id: str = ""
    images: str = ""  # restore: the images directory the wrapper restores from
    layer_bytes: int = 0  # checkpoint: the writable layer's size at pre-flight


def _runc_state(ctx: Context) -> None:
    s = ctx.state
    c = s.container
    try:
        state = runc.runc_state(ctx.src.conn, c["Id"])
    except runc.RuncError as e:
        raise MigrationError(str(e)) from e
    s.runc_binary, s.runc_root = state.binary, state.root
    s.src_runtime = c["HostConfig"].get("Runtime") or ""
    s.checkpoint = ""  # no Docker checkpoint: the images are in src_base


def _checkpoint(ctx: Context) -> Measured:
    """runc checkpoint of the source into src_base/images (leaving it running or stopping it)."""
    s = ctx.state
    cid = s.container["Id"]
    state = runc.RuncState(s.runc_binary, s.runc_root)
    if not s.leave_running:
        cr.close_tcp(ctx)  # leave-running with established TCP was refused in pre-flight
    extra = ["--leave-running"] if s.leave_running else []
    t0 = time.perf_counter()
    try:
        runc.checkpoint(ctx.src.conn, state, cid, f"{s.src_base}/images", f"{s.src_base}/work", extra)
    except runc.RuncError as e:
        # CRIU resumes the container when a dump fails: then nothing stopped.
        if e.definitive and runc.is_running(ctx.src.conn, state, cid):
            ctx.set_stage(Stage.PREPARING)
        raise MigrationError(str(e)) from e
    s.checkpointed = True
    took = (time.perf_counter() - t0) * 1000
    if not s.leave_running:
        # Docker then sees the exit; only after it may the layer be copied whole.
        deadline = time.monotonic() + cr.EXIT_WAIT
        while ctx.src.inspect(cid)["State"]["Running"] and time.monotonic() < deadline:
            time.sleep(0.02)
    return Measured(detail=f"runc checkpoint {took:.0f} ms" + (", left running" if s.leave_running else ""))


# -- checkpoint ---------------------------------------------------------------------------


def checkpoint_preflight(ctx: Context):
    measured = kc.checkpoint_preflight(ctx)
    s = ctx.state
    c = s.container
    if c["HostConfig"].get("AutoRemove") and not s.leave_running:
        raise MigrationError(
            f"{ctx.source.name}: container {c['Name'].lstrip('/')} was started with --rm: Docker would remove it, "
            "writable layer and all, when the checkpoint stops it; take the checkpoint with --leave-running"
        )
    _runc_state(ctx)
    # Written beside the kept directory and renamed only when whole.
    s.src_base = f"{s.kept}.part"
    measured.detail += f"; runc root {s.runc_root}"
    return measured


# $1 the run's part directory (images/, work/), $2 the container's writable
# layer, $3 the kept directory. The layer is copied and CRIU's statistics put
# with the images before the two renames, so a half-made checkpoint never
# looks kept. Prints its size.
KEEP_SCRIPT = r"""
set -e
rm -rf -- "$1/diff"
cp -a -- "$2" "$1/diff"
if [ -f "$1/work/stats-dump" ]; then cp -- "$1/work/stats-dump" "$1/images/stats-dump"; fi
rm -rf -- "$1/work"
mv -- "$1/images" "$1/checkpoint"
mv -T -- "$1" "$3"  # -T: never into a directory made meanwhile
du -sb -- "$3" | cut -f1
"""


def keep_checkpoint(ctx: Context):
    s = ctx.state
    c = s.container
    # CRIU's statistics and log onto the checkpoint phase: read here, not in
    # it, where the SSH round trips would count as the freeze.
    cr.record_dump(ctx)
    phase = ctx.run.phases.filter(name="checkpoint").order_by("-seq").first()
    stats = phase.criu_stats if phase else {}
    upper = c["GraphDriver"]["Data"]["UpperDir"]
    size = int(ctx.src.conn.sh(KEEP_SCRIPT, s.src_base, upper, s.kept, timeout=kc.keep_timeout(ctx)).stdout)
    freeze = stats["frozen_time"] / 1000 if stats.get("frozen_time") else ctx.run.downtime_ms
    cp = keep.record(
        ctx, s.kept, size, workload=ctx.run.workload, workload_id=c["Id"], leave_running=s.leave_running,
        criu_stats=stats, freeze_ms=freeze if s.leave_running else None, config=c, facts=s.facts, image_id=c["Image"],
        image=c["Config"]["Image"], criu_version=s.criu_version, kernel=s.kernel,
    )  # fmt: skip
    how = f"left running, frozen {freeze:.0f} ms (CRIU's frozen_time)" if s.leave_running else "stopped"
    return Measured(bytes=size, detail=f"kept as {cp.name} in {s.kept} ({how})")


def checkpoint_cleanup(ctx: Context):
    removed = keep.apply_retention(ctx.source, CONTAINER, ctx.run.workload)
    detail = f"retention removed {', '.join(removed)}" if removed else "nothing else to remove"
    if kc.stopping_with_restart_policy(ctx):
        detail += "; the stopped container's restart policy stays 'no' (a restore gets the original back)"
    return Measured(detail=detail)


# $1 the kept directory, $2 the part directory: a keep step that failed
# after its renames (recording it) leaves the images where a rollback of the
# runc plan looks for them.
RECLAIM_SCRIPT = r"""
if [ -d "$1" ] && [ ! -e "$2" ]; then mv -- "$1" "$2"; fi
if [ -d "$2/checkpoint" ] && [ ! -e "$2/images" ]; then mv -- "$2/checkpoint" "$2/images"; fi
true
"""


def checkpoint_rollback(ctx: Context):
    s = ctx.state
    if s.kept:
        # Recorded but not marked done (the controller killed after the
        # record): the kept images are still what the container comes back from.
        keep.unrecord(ctx)
        with ssh.Connection(ctx.source) as conn:
            conn.sh(RECLAIM_SCRIPT, s.kept, s.src_base)
    # The runc plan's rollback restores a stopped container from src_base/images.
    measured = cr.rollback(ctx)
    s = ctx.state
    if s.kept:
        with ssh.Connection(ctx.source) as conn:
            conn.run(["rm", "-rf", "--", s.kept, f"{s.kept}.part"], check=False)
    return measured


def checkpoint_abort(ctx: Context):
    cr.abort(ctx)  # the restart policy back, src_base (the part directory) removed


CHECKPOINT_PLAN = Plan(
    kind=CONTAINER,
    strategy=f"{CHECKPOINT}-runc",
    operation=CHECKPOINT,
    label="checkpoint (runc)",
    summary="runc checkpoint straight into the kept directory, leaving the container running or stopping it; "
    "no containerd copies.",
    state=KeepRuncState,
    needs=NEEDS,
    steps=(
        Step("pre-flight", "source", checkpoint_preflight),
        Step("prepare source", "source", ce.prepare_source, when=kc.stopping_with_restart_policy),
        Step("checkpoint", "source", _checkpoint, freezes=True, resumes=True, when=kc.leaving_running),
        Step("checkpoint", "source", _checkpoint, freezes=True, stops=True, when=kc.stopping),
        Step("keep", "source", keep_checkpoint, commits=True),
        Step("cleanup", "source", checkpoint_cleanup),
    ),
    rollback=checkpoint_rollback,
    abort=checkpoint_abort,
)


# -- restore and clone from a kept checkpoint ------------------------------------------------


def _same_host(ctx: Context) -> bool:
    return ctx.source.pk == ctx.target.pk


def restore_preflight_target(ctx: Context):
    measured = kc.restore_preflight_target(ctx)
    s = ctx.state
    cr.require_runtime(ctx)
    # On the checkpoint's host CRIU restores from the kept images themselves
    # (it only reads them); elsewhere from a copy streamed there.
    need = 0 if _same_host(ctx) else s.rss + SPACE_MARGIN
    s.dst_base = cr._base_dir(ctx, ctx.dst.conn, need, "target")
    s.images = f"{s.kept}/{keep.IMAGES}" if _same_host(ctx) else f"{s.dst_base}/images"
    measured.detail += f"; restored by the {runc.RUNTIME_NAME} runtime from {s.images}"
    return measured


def prepare_target(ctx: Context):
    measured = ce.prepare_target(ctx, runtime=runc.RUNTIME_NAME)
    ctx.dst.conn.sh('umask 077 && mkdir -p -- "$1"', ctx.state.dst_base)
    return measured


# $1 the kept writable layer, $2 the new container's (empty, not yet
# mounted) upper dir, $3 marker path, $4 marker text, written last.
LOCAL_SCRIPT = r"""
set -e
if rmdir -- "$2" 2>/dev/null; then cp -a -- "$1" "$2"; else cp -a -- "$1/." "$2/"; fi
mkdir -p -- "${3%/*}"
chmod 700 -- "${3%/*}"
printf '%s' "$4" >"$3.new"
mv -f -- "$3.new" "$3"
"""


def transfer(ctx: Context):
    s = ctx.state
    mark = runc.marker_text(s.images, f"{s.dst_base}/work")
    if _same_host(ctx):
        ctx.dst.conn.sh(LOCAL_SCRIPT, f"{s.kept}/{keep.LAYER}", s.target_upper, runc.marker_path(s.target_id), mark)
        return Measured(detail=f"writable layer copied; the images stay in {s.kept}")
    # The runc plan's unpack wants images/ and diff/: the kept checkpoint/ renamed on the way.
    argv = [*streams.TAR_CREATE[:1], "--transform=s,^checkpoint,images,", *streams.TAR_CREATE[1:]]
    src = ctx.src_ssh.open_command([*argv, s.kept, keep.IMAGES, keep.LAYER])
    dst = ctx.dst_ssh.open_command(
        ["sh", "-c", cr.UNPACK_SCRIPT, "sh", f"{s.dst_base}/stage", s.images, s.target_upper, "", "",
         f"{s.dst_base}/volume-bytes", runc.marker_path(s.target_id), mark]
    )  # fmt: skip
    n = streams.pipe(ctx, src, dst, "the checkpoint and writable layer")
    return Measured(bytes=n, detail="checkpoint and writable layer")


def restore_finish(ctx: Context):
    s = ctx.state
    cr.remove_dir(ctx.dst.conn, s.dst_base)
    runc.clear_marks(ctx.dst.conn, s.target_id)
    if s.replace_id:
        ctx.dst.remove(s.replace_id)
        ctx.dst.rename(s.target_id, s.final_name)
        return Measured(detail=f"replaced the stopped container {s.replace_id[:12]}; now {s.final_name}")
    return Measured(detail=f"container {s.final_name} ({s.target_id[:12]})")


def restore_rollback(ctx: Context):
    # Nothing was stopped: the checkpoint and any original stay as they were.
    leftovers = cr.disarm_target(ctx)
    note = f"; {leftovers}" if leftovers else ""
    return Measured(detail=f"restored copy removed; the checkpoint is unchanged{note}")


def restore_abort(ctx: Context):
    cr.abort(ctx)
    s = ctx.state
    if s.target_id and ctx.dst is not None:
        runc.clear_marks(ctx.dst.conn, s.target_id)


RESTORE_PLAN = Plan(
    kind=CONTAINER,
    strategy=f"{RESTORE}-runc",
    operation=RESTORE,
    label="restore (runc)",
    summary="A kept checkpoint restored into a new container by criuweb's runtime, on its host or another.",
    state=KeepRuncState,
    needs=NEEDS,
    steps=(
        Step("pre-flight", "source", kc.restore_preflight_source),
        Step("pre-flight", "target", restore_preflight_target),
        Step("ship image", "both", ce.ship_image, when=ce.image_missing, workload_bytes=False),
        Step("prepare target", "target", prepare_target),
        Step("transfer", "both", transfer),
        Step("restore", "target", cr.restore),
        Step("verify", "target", ce.verify, commits=True),
        Step("finish", "target", restore_finish),
    ),
    rollback=restore_rollback,
    abort=restore_abort,
)


# -- clone --------------------------------------------------------------------------------


def clone_preflight_source(ctx: Context):
    if kc.from_checkpoint(ctx):
        return kc.restore_preflight_source(ctx)
    kc._refuse_mounts(ctx)
    measured = ce.preflight_source(ctx)
    kc._refuse_what_stays_behind(ctx)
    _runc_state(ctx)
    s = ctx.state
    s.src_base = cr._base_dir(ctx, ctx.src.conn, s.rss + SPACE_MARGIN, "source")
    measured.detail += f"; runc root {s.runc_root}; images in {s.src_base}"
    return measured


def clone_preflight_target(ctx: Context):
    if kc.from_checkpoint(ctx):
        return restore_preflight_target(ctx)
    ctx.state.name = ctx.state.final_name
    return cr.preflight_target(ctx)


def clone_prepare_target(ctx: Context):
    if kc.from_checkpoint(ctx):
        return prepare_target(ctx)
    return cr.prepare_target(ctx)  # both ends of the stream wait for the checkpoint


def clone_checkpoint(ctx: Context):
    return _checkpoint(ctx)


def clone_transfer(ctx: Context):
    if kc.from_checkpoint(ctx):
        return transfer(ctx)
    return cr.transfer(ctx)


def clone_cleanup(ctx: Context):
    s = ctx.state
    if s.src_base:
        cr.remove_dir(ctx.src.conn, s.src_base)
    cr.remove_dir(ctx.dst.conn, s.dst_base)
    runc.clear_marks(ctx.dst.conn, s.target_id)
    return Measured(detail=f"clone {s.final_name} ({s.target_id[:12]}) runs; the original was left as it was")


def clone_rollback(ctx: Context):
    if kc.from_checkpoint(ctx):
        return restore_rollback(ctx)
    # The original ran on through its leave-running checkpoint: the runc
    # plan's rollback makes the copy unable to run, finds the original
    # running and removes the images.
    return cr.rollback(ctx)


CLONE_PLAN = Plan(
    kind=CONTAINER,
    strategy=f"{CLONE}-runc",
    operation=CLONE,
    label="clone (runc)",
    summary="A new container from a kept checkpoint, or from a running one through a leave-running runc "
    "checkpoint, restored by criuweb's runtime; the original is left as it was.",
    state=KeepRuncState,
    needs=NEEDS,
    steps=(
        Step("pre-flight", "source", clone_preflight_source),
        Step("pre-flight", "target", clone_preflight_target),
        Step("ship image", "both", ce.ship_image, when=ce.image_missing, workload_bytes=False),
        Step("prepare target", "target", clone_prepare_target),
        Step("checkpoint", "source", clone_checkpoint, freezes=True, resumes=True, when=kc.from_live),
        Step("transfer", "both", clone_transfer),
        Step("restore", "target", cr.restore),
        Step("verify", "target", ce.verify, commits=True),
        Step("cleanup", "both", clone_cleanup),
    ),
    rollback=clone_rollback,
    abort=restore_abort,
)

PLANS = (CHECKPOINT_PLAN, RESTORE_PLAN, CLONE_PLAN)
