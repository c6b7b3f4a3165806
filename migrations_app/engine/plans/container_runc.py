"""Containers at CRIU's own speed: runc checkpoint and restore under Docker.

Docker manages the container before and after; only the checkpoint and
restore bypass containerd's content store (see migrations_app/runc.py).
Pre-flight, image shipping, the target created before the freeze and
the restart policy kept off are the engine plan's own steps. Then:

- `runc checkpoint` of the source on its shim's runc state, images in
  tmpfs when it has room;
- one tar stream from host to host with the images, the writable layer,
  the container's json log and its named volumes' data, unpacked beside
  the images, checked, then each part put in its place, and the restore
  marker written last;
- a plain `docker start` of the target container, created with criuweb's
  runtime wrapper, which turns it into `runc restore`;
- the engine plan's verification, then the source removed (or kept stopped).

A rollback restores the source from the same images: through the wrapper
when the source runs under it, else through Docker's own checkpoint
restore (slower, but any engine can do it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import criu, runc, ssh
from ...docker_engine import Engine, EngineError, NotFoundError
from ...models import CONTAINER, LAZY, PAGE_SERVER, PHASE_OK, STOP_AND_COPY, MigrationRun, Stage, TrustedPair
from .. import container_checks, streams, tls
from ..errors import MigrationError
from ..hostcheck import SPACE_MARGIN, check_space, settle, unsafe_to_resume
from ..plan import Measured, Plan, Step
from . import container_engine as engine_plan
from .container_engine import ContainerState

if TYPE_CHECKING:
    from ..runner import Context

PAGE_SIZE = 4096
# tmpfs first: images written to memory, not disk, on both hosts.
TMPFS_DIR = "/dev/shm/criuweb"
# How long Docker may take to see the checkpointed container exit; its
# last log lines are flushed by then.
EXIT_WAIT = 10.0


@dataclass
class RuncContainerState(ContainerState):
    runc_binary: str = ""
    runc_root: str = ""
    src_runtime: str = ""  # the source container's runtime name in Docker
    src_base: str = ""  # holds images/ and work/ on each side
    dst_base: str = ""
    log_path: str = ""  # the source's json log, when it has one
    dst_log: str = ""
    tls: bool = False  # the memory's connection (page-server, post-copy) uses CRIU's TLS
    criu_config: str = ""  # the source container's CRIU configuration file this run writes TLS options into


# Prints /dev/shm's filesystem type, its df line, then "ours" when criuweb's
# directory there ($2) is a real directory of this user that no one else may
# write: /dev/shm is world-writable, and another user's directory (or link)
# in its place would let them swap a run's directories for their own, the
# images the target's root restores included. $1 /dev/shm, $2 the directory.
TMPFS_SCRIPT = r"""
stat -f -c %T "$1" 2>/dev/null; df -P -k "$1" 2>/dev/null | tail -n 1
mkdir -m 700 "$2" 2>/dev/null
[ -d "$2" ] && [ ! -L "$2" ] && [ "$(stat -c %u "$2")" = "$(id -u)" ] &&
    case $(stat -c %A "$2") in ?????w*|????????w*) false ;; *) true ;; esac && echo ours
"""


def _base_dir(ctx: Context, conn, need: int, side: str) -> str:
    """Where a host keeps this run's images: tmpfs when it has room, else the work dir.

    Named by side too: two hosts may share one tmpfs (the lab's do).
    """
    out = conn.sh(TMPFS_SCRIPT, "/dev/shm", TMPFS_DIR, check=False).stdout.split("\n")
    try:
        tmpfs = out[0].strip() == "tmpfs" and int(out[1].split()[3]) * 1024 >= need and out[2].strip() == "ours"
    except (IndexError, ValueError):
        tmpfs = False
    if tmpfs:
        return f"{TMPFS_DIR}/{ctx.run.code}/{side}"
    base = f"{ctx.images_dir(conn.host)}/{side}"
    check_space(conn, base, need, "the checkpoint images")
    return base


def remove_dir(conn, base: str) -> None:
    """Remove a run's images directory, and its parent when that is left empty."""
    conn.sh('rm -rf -- "$1"; rmdir -- "${1%/*}" 2>/dev/null; true', base, check=False)


def preflight_source(ctx: Context):
    measured = engine_plan.preflight_source(ctx)
    s = ctx.state
    c = s.container
    if c["HostConfig"].get("AutoRemove"):
        # Docker removes it when the checkpoint stops it: nothing to roll back to.
        raise MigrationError(f"{ctx.source.name}: the container was started with --rm; the fast path cannot move it")
    try:
        state = runc.runc_state(ctx.src.conn, c["Id"])
    except runc.RuncError as e:
        raise MigrationError(str(e)) from e
    s.runc_binary, s.runc_root = state.binary, state.root
    s.checkpoint = ""  # no Docker checkpoint: the images are in src_base
    s.src_runtime = c["HostConfig"].get("Runtime") or ""
    if (c["HostConfig"].get("LogConfig") or {}).get("Type") == "json-file" and c.get("LogPath"):
        s.log_path = c["LogPath"]
    s.src_base = _base_dir(ctx, ctx.src.conn, s.rss + SPACE_MARGIN, "source")
    measured.detail += f"; runc root {state.root}; images in {s.src_base}"
    return measured


def require_runtime(ctx: Context) -> None:
    """MigrationError unless the target's engine has criuweb's runtime, ready to restore."""
    try:
        runc.runtime_ready(ctx.dst.conn, ctx.dst.info())
    except runc.RuncError as e:
        raise MigrationError(str(e)) from e


def preflight_target(ctx: Context):
    measured = engine_plan.preflight_target(ctx)
    s = ctx.state
    require_runtime(ctx)
    s.dst_base = _base_dir(ctx, ctx.dst.conn, s.rss + SPACE_MARGIN, "target")
    measured.detail += f"; images to {s.dst_base}"
    return measured


def prepare_target(ctx: Context):
    measured = engine_plan.prepare_target(ctx, runtime=runc.RUNTIME_NAME)
    s = ctx.state
    # Docker names a json log after the container, in its directory.
    s.dst_log = f"{s.dst_root}/containers/{s.target_id}/{s.target_id}-json.log"
    # Private: the images will hold the container's memory.
    ctx.dst.conn.sh('umask 077 && mkdir -p -- "$1"', s.dst_base)
    stop_and_copy = ctx.plan.strategy == STOP_AND_COPY
    open_transfer(ctx, lazy=ctx.plan.strategy == LAZY, checkpoint=stop_and_copy)
    if stop_and_copy:
        # Registered now, its round trip is no downtime; the checkpoint ends
        # the container (runc kills it after the dump), and Docker then answers.
        ctx.exit_wait = ctx.src.exit_waiter(s.container["Id"], EXIT_WAIT)
    measured.detail += (
        "; the checkpoint and the transfer's both ends started, waiting for the freeze"
        if stop_and_copy
        else "; the transfer's both ends started, waiting for the freeze"
    )
    return measured


# Runs "$@" once "go" comes on stdin; EOF (a closed channel) runs nothing.
AFTER_GO = 'read -r go || exit 4\n[ "$go" = go ] || exit 4\nexec "$@"\n'


def open_transfer(ctx: Context, lazy: bool = False, checkpoint: bool = False) -> None:
    """Both ends of the transfer, started before the freeze: each SSH session costs downtime inside it.

    The source's tar waits for "go", sent once the checkpoint is done; the
    target's unpack waits for the stream (an empty or cut stream fails its
    tar before anything is put in place). checkpoint: the source's shell
    also runs the checkpoint first (runc.WAITING_CHECKPOINT_SCRIPT: "go"
    checkpoints, "send" then sends).
    """
    s = ctx.state
    c = s.container
    upper = c["GraphDriver"]["Data"]["UpperDir"]
    # One stream from several directories.
    argv = streams.TAR_CREATE + [s.src_base, "images", "-C", upper.rsplit("/", 1)[0], "diff"]
    log_name = ""
    if s.log_path:
        log_dir, log_name = s.log_path.rsplit("/", 1)
        argv += ["-C", log_dir, log_name]
    argv += container_checks.volume_tar_args(s.volumes)
    mark = runc.marker_text(f"{s.dst_base}/images", f"{s.dst_base}/work", lazy)
    pairs = [x for v in s.volumes for x in (v["name"], v["target_mountpoint"])]
    count = f"{s.dst_root}/containers/{s.target_id}/criuweb-volume-bytes"
    ctx.transfer_dst = ctx.dst.conn.open_command(
        ["sh", "-c", UNPACK_SCRIPT, "sh", f"{s.dst_base}/stage", f"{s.dst_base}/images", s.target_upper, log_name,
         s.dst_log, count, runc.marker_path(s.target_id), mark, *pairs]
    )  # fmt: skip
    if checkpoint:
        state = runc.RuncState(s.runc_binary, s.runc_root)
        ctx.transfer_src = runc.open_waiting_checkpoint(
            ctx.src.conn, state, c["Id"], f"{s.src_base}/images", f"{s.src_base}/work", argv
        )
    else:
        ctx.transfer_src = ctx.src.conn.open_command(["sh", "-c", AFTER_GO, "sh", *argv])
    ctx.transfer_checkpoints = checkpoint


def close_transfer(ctx: Context) -> None:
    """End the waiting transfer commands, if any: at their EOF they do nothing."""
    for name in ("transfer_src", "transfer_dst", "ps_checkpoint"):
        chan = getattr(ctx, name, None)
        if chan is not None:
            chan.close()
            setattr(ctx, name, None)
    exit_wait = getattr(ctx, "exit_wait", None)
    if exit_wait is not None:
        exit_wait.close()
        ctx.exit_wait = None


def close_tcp(ctx: Context) -> None:
    """End the container's established TCP connections, as the pre-flight said it would.

    CRIU dumps none without --tcp-established or --tcp-close, and runc's
    checkpoint passes no --tcp-close: the same reset the engine plan sends.
    """
    s = ctx.state
    if (s.facts or {}).get("close_tcp"):
        container_checks.close_tcp(ctx.src.conn, s.container["State"]["Pid"])


def checkpoint(ctx: Context):
    s = ctx.state
    cid = s.container["Id"]
    state = runc.RuncState(s.runc_binary, s.runc_root)
    close_tcp(ctx)
    # The shim reports the exit to Docker, which then drains the
    # container's output into its log: the log is copied only after that.
    # A wait registered beforehand (prepare_target; here for a run resumed
    # by a recovery) answers then, with no polling.
    exited = getattr(ctx, "exit_wait", None) or ctx.src.exit_waiter(cid, EXIT_WAIT)
    ctx.exit_wait = None
    t0 = time.perf_counter()
    waiting = getattr(ctx, "transfer_checkpoints", False) and getattr(ctx, "transfer_src", None) is not None
    try:
        if waiting:
            runc.run_waiting_checkpoint(ctx.src.conn, ctx.transfer_src, f"{s.src_base}/work")
        else:
            # A run resumed by a recovery: no shell waits; one SSH command.
            runc.checkpoint(ctx.src.conn, state, cid, f"{s.src_base}/images", f"{s.src_base}/work")
    except runc.RuncError as e:
        exited.close()
        # CRIU resumes the container when a dump fails: then nothing stopped.
        if e.definitive and runc.is_running(ctx.src.conn, state, cid):
            ctx.set_stage(Stage.PREPARING)
        raise MigrationError(str(e)) from e
    s.checkpointed = True
    t1 = time.perf_counter()
    exited.wait()
    t2 = time.perf_counter()
    # CRIU's statistics and log are read after the restore (record_dump):
    # two more SSH round trips here would be downtime.
    how = "in the shell started before the freeze" if waiting else "over one SSH command"
    return Measured(
        detail=f"runc checkpoint {how} {(t1 - t0) * 1000:.0f} ms, Docker saw the exit {(t2 - t1) * 1000:.0f} ms later",
    )


# Unpacks the stream into a staging directory beside the images (the same
# filesystem: the images, the bulk, are only renamed), checks that what came
# is what was asked for, then puts each part in its place and writes the
# restore marker last. Nothing the source sends lands outside the staging
# directory before the checks: a link from a compromised source cannot
# reach this host's files. $1 staging dir, $2 images dir, $3 the target
# container's (empty, not yet mounted) upper dir, $4 the log's name in the
# stream ("" for none), $5 the target's log path, $6 the file that gets the
# volumes' byte count, $7 marker path, $8 marker text; then pairs of volume
# name and target mountpoint.
UNPACK_SCRIPT = r"""
set -e
stage=$1 images=$2 upper=$3 logname=$4 log=$5 count=$6 mark=$7 text=$8
shift 8
refuse() { echo "refusing the stream: $1" >&2; rm -rf -- "$stage"; exit 3; }
umask 077
rm -rf -- "$stage"
mkdir -p "$stage"
# Before the stream: this shell starts before the freeze, and from the
# stream on every process it starts is downtime.
mkdir -p "${mark%/*}"
chmod 700 "${mark%/*}"
tar --numeric-owner --xattrs --xattrs-include='*' --same-owner -xpf - -C "$stage"
for d in images diff; do
    { [ -L "$stage/$d" ] || [ ! -d "$stage/$d" ]; } && refuse "$d is not a directory"
done
odd=$(find "$stage/images" ! -type f ! -type d -print -quit)
[ -z "$odd" ] || refuse "$odd is not a regular file"
if [ -n "$logname" ]; then
    { [ -L "$stage/$logname" ] || [ ! -f "$stage/$logname" ]; } && refuse "the log is not a regular file"
fi
if [ $# -gt 0 ]; then
    { [ -L "$stage/volumes" ] || [ ! -d "$stage/volumes" ]; } && refuse "volumes is not a directory"
    du -sb --apparent-size "$stage/volumes" | cut -f1 >"$count"
    while [ $# -ge 2 ]; do
        data="$stage/volumes/$1/_data"
        { [ -L "$stage/volumes/$1" ] || [ -L "$data" ] || [ ! -d "$data" ]; } && refuse "volume $1 is not a directory"
        cp -a "$data/." "$2/"
        shift 2
    done
fi
# A page server may have put the memory there already.
if [ -d "$images" ]; then cp -a "$stage/images/." "$images/"; else mv "$stage/images" "$images"; fi
if rmdir "$upper" 2>/dev/null; then mv "$stage/diff" "$upper"; else cp -a "$stage/diff/." "$upper/"; fi
[ -z "$logname" ] || mv -f "$stage/$logname" "$log"
printf '%s' "$text" >"$mark.new"
mv -f "$mark.new" "$mark"
# What is left of the stage (the copied images' duplicates) goes after the
# answer, not inside the freeze; the run's cleanup removes its directory anyway.
rm -rf -- "$stage" </dev/null >/dev/null 2>&1 &
"""


def transfer(ctx: Context, lazy: bool = False):
    s = ctx.state
    src, dst = getattr(ctx, "transfer_src", None), getattr(ctx, "transfer_dst", None)
    if src is None or dst is None:
        # A run resumed by a recovery has no waiting commands: start them now.
        open_transfer(ctx, lazy)
        src, dst = ctx.transfer_src, ctx.transfer_dst
    checkpointed_there = getattr(ctx, "transfer_checkpoints", False)
    ctx.transfer_src = ctx.transfer_dst = None
    ctx.transfer_checkpoints = False
    src.sendall(b"send\n" if checkpointed_there else b"go\n")
    n = streams.pipe(ctx, src, dst, "the images, writable layer and log")
    what = "images, writable layer" + (" and log" if s.log_path else "")
    if s.volumes:
        what += f", volumes {', '.join(v['name'] for v in s.volumes)}"
    return Measured(bytes=n, detail=what)


def _restore_failure(ctx: Context, conn, error, work: str) -> Exception:
    try:
        excerpt = criu.log_excerpt(conn.read_file(f"{work}/restore.log", check=False))
    except ssh.SSHError:
        excerpt = ""  # the connection may be what failed; the error says it
    cause = criu.first_error(excerpt)
    message = f"{error}" + (f" (CRIU: {cause}; see restore.log excerpt)" if cause else "")
    return criu.CriuError(message, excerpt)


def record_dump(ctx: Context) -> None:
    """CRIU's dump statistics and log onto the checkpoint phase, unless it has them.

    With page-server streaming, also the bytes the dump streamed, and
    whether UNCORK took the cork off its socket (runc.UNCORKED_FILE).
    """
    s = ctx.state
    phase = ctx.run.phases.filter(name="checkpoint", status=PHASE_OK).first()
    if phase is None or phase.criu_stats:
        return
    conn, work = ctx.src.conn, f"{s.src_base}/work"
    phase.criu_stats = criu.read_stats(conn, f"{work}/stats-dump")
    phase.log = (conn.read_file(f"{work}/dump.log", check=False) or "")[-1_000_000:]
    fields = ["criu_stats", "log"]
    if ctx.plan.strategy == PAGE_SERVER:
        phase.bytes = phase.criu_stats.get("pages_written", 0) * PAGE_SIZE
        ctx.run.total_bytes += phase.bytes  # stored with the restore phase
        if (conn.read_file(f"{work}/{runc.UNCORKED_FILE}", check=False) or "").strip() == "uncorked":
            phase.detail += "; cork taken off CRIU's socket to the page server"
        fields += ["bytes", "detail"]
    phase.save(update_fields=fields)


def restore(ctx: Context):
    s = ctx.state
    ctx.set_stage(Stage.RESTORING)
    try:
        ctx.dst.start(s.target_id)
        ctx.resumed_at = time.perf_counter()
    except EngineError as e:
        # Docker answered that the start failed: nothing runs there.
        if e.answered:
            ctx.set_stage(Stage.FROZEN)
        raise _restore_failure(ctx, ctx.dst.conn, e, f"{s.dst_base}/work") from e
    conn = ctx.dst.conn
    restored = conn.sh('[ ! -e "$1" ] && [ -s "$2" ]', runc.marker_path(s.target_id), f"{s.dst_base}/work/restore.log",
                       check=False).rc == 0  # fmt: skip
    if not restored:
        # The wrapper takes the marker, then CRIU logs its restore: a marker
        # still there, or no log, means the engine created the container
        # without the wrapper (a runtime of that name that is not criuweb's,
        # or one that sees another /run): what runs is a fresh copy, not the
        # workload.
        raise MigrationError(
            f"{ctx.target.name}: Docker started the container without restoring it: its {runc.RUNTIME_NAME!r} "
            f"runtime left the restore marker {runc.marker_path(s.target_id)} or CRIU wrote no restore.log; "
            f"is that runtime scripts/criuweb-runtime, seeing the host's /run?"
        )
    record_dump(ctx)
    stats = criu.read_stats(conn, f"{s.dst_base}/work/stats-restore")
    restore_log = conn.read_file(f"{s.dst_base}/work/restore.log", check=False) or ""
    return Measured(criu_stats=stats, log=restore_log, detail=f"restored by {runc.RUNTIME_NAME} runtime")


def cleanup(ctx: Context):
    s = ctx.state
    c = s.container
    if ctx.run.keep_source:
        # Stopped, restart policy "no" since before the freeze: the engine
        # never starts it again by itself.
        detail = "source container kept (stopped, restart policy no)"
    else:
        try:
            ctx.src.remove(c["Id"])
        except NotFoundError:
            pass  # a recovery finishing this cleanup after a crash
        detail = f"source container {c['Id'][:12]} removed"
        detail += container_checks.remove_source_volumes(ctx.src, s.volumes)
        detail += container_checks.remove_source_networks(ctx.src, s.facts.get("networks") or {}, ctx.source)
    drop_criu_config(ctx)
    remove_dir(ctx.src.conn, s.src_base)
    remove_dir(ctx.dst.conn, s.dst_base)
    runc.clear_marks(ctx.dst.conn, s.target_id)
    return Measured(detail=detail)


def kill_paused_source(ctx: Context) -> None:
    """Kill the paused source container (kept stopped) and wait until Docker sees it exit.

    Docker thaws a paused container only to let it die; until its exit is
    seen, its process may still be there, and a look for copies would count two.
    """
    cid = ctx.state.container["Id"]
    if ctx.src.inspect(cid)["State"]["Running"]:  # not when a cleanup that died had killed it
        ctx.src.call("docker kill", ctx.src.api.kill, cid)
    deadline = time.monotonic() + EXIT_WAIT
    while ctx.src.inspect(cid)["State"]["Running"]:
        if time.monotonic() > deadline:
            raise MigrationError(f"{ctx.source.name}: the paused source container did not stop after docker kill")
        time.sleep(0.05)


# -- shared by the runc plans that keep the source paused (page-server, post-copy) --


def preflight_source_tls(ctx: Context, strategy: str):
    """The source's pre-flight, choosing plain TCP (a trusted pair) or CRIU's TLS for the memory's connection.

    runc's checkpoint has no TLS flags; CRIU gets them from the container's
    own configuration file (runc.criu_config_path), which runc names only
    for a container created by criuweb's runtime. Any other container is
    refused before the freeze on an untrusted pair.
    """
    measured = preflight_source(ctx)
    s = ctx.state
    s.tls = not TrustedPair.between(ctx.source, ctx.target)
    ctx.run.tls = s.tls
    MigrationRun.objects.filter(pk=ctx.run.pk).update(tls=s.tls)
    if not s.tls:
        measured.detail += "; trusted migration network: no TLS"
        return measured
    cid = s.container["Id"]
    found = runc.criu_config_of(ctx.src.conn, runc.RuncState(s.runc_binary, s.runc_root), cid)
    if found != runc.criu_config_path(cid):
        if found:
            why = f"its CRIU configuration file is {found}, not criuweb's"
        elif s.src_runtime == runc.RUNTIME_NAME:
            why = (
                "its runc state names no CRIU configuration file (it was created before criuweb's runtime named "
                "one, or its bundle had annotations of its own, which the runtime leaves alone)"
            )
        else:
            why = (
                f"it does not run under criuweb's runtime ({runc.RUNTIME_NAME!r}), through which runc passes CRIU "
                f"the TLS options its checkpoint has no flags for"
            )
        raise MigrationError(
            f"{ctx.source.name} -> {ctx.target.name}: container {strategy} needs CRIU's TLS on this untrusted pair, "
            f"and {why}; move it once with stop-and-copy (it then runs under that runtime), start it with "
            f"--runtime {runc.RUNTIME_NAME}, or mark the pair a trusted migration network"
        )
    s.criu_config = found
    measured.detail += "; CRIU's TLS through the container's CRIU configuration file"
    return measured


def install_tls(ctx: Context, address: str, server_on_source: bool) -> list[str]:
    """Certificates for this run's CRIU connection to address; the target side's CRIU arguments.

    The source side's options go into the container's CRIU configuration
    file, which runc hands CRIU on the checkpoint; the target's CRIU (page
    server or lazy-pages daemon) gets them as arguments.
    """
    s = ctx.state
    server, client = tls.make_pair(address, f"criuweb run {ctx.run.code}")
    src_side, dst_side = (server, client) if server_on_source else (client, server)
    src_dir, dst_dir = f"{s.src_base}/tls", f"{s.dst_base}/tls"
    tls.install(ctx.src.conn, src_dir, src_side)
    tls.install(ctx.dst.conn, dst_dir, dst_side)
    runc.write_criu_config(ctx.src.conn, s.criu_config, tls.criu_args(src_dir))
    return tls.criu_args(dst_dir)


def drop_criu_config(ctx: Context, conn=None) -> None:
    """Remove the container's CRIU configuration file this run wrote (its certificates go with src_base)."""
    s = ctx.state
    if getattr(s, "criu_config", ""):
        runc.remove_criu_config(conn or ctx.src.conn, s.criu_config)


def pause_source(ctx: Context) -> runc.RuncState:
    """The freeze: the source paused (the cgroup freezer)."""
    s = ctx.state
    close_tcp(ctx)
    ctx.src.call("docker pause", ctx.src.api.pause, s.container["Id"])
    # Not stored on its own (a disk sync inside the freeze): the stage,
    # frozen since before this call, already sends a recovery to the
    # rollback, and the rollbacks ask Docker whether the source is paused.
    # The state goes with the phase's end.
    s.paused = True
    return runc.RuncState(s.runc_binary, s.runc_root)


def cleanup_paused(ctx: Context):
    s = ctx.state
    if ctx.run.keep_source:
        # Killed while paused: it never runs again (Docker thaws it only to let it die).
        kill_paused_source(ctx)
    measured = cleanup(ctx)
    s.paused = False
    return measured


def finish_unpause(ctx: Context, src: Engine, leftovers: str) -> Measured:
    """The end of a rollback once the paused source was let run: recorded, checked, its files removed."""
    s = ctx.state
    c = s.container
    s.paused = False
    ctx.run.result_workload = c["Id"][:12]
    ctx.resumed_on_source(leftovers)
    if not settle(lambda: (st := src.inspect(c["Id"])["State"])["Running"] and not st.get("Paused")):
        raise MigrationError(f"{ctx.source.name}: the container does not run again after rollback")
    engine_plan._restore_restart_policy(src, ctx)
    drop_criu_config(ctx, src.conn)
    if s.src_base:
        remove_dir(src.conn, s.src_base)
    note = f"; {leftovers}" if leftovers else ""
    return Measured(detail=f"container {c['Id'][:12]} unpaused on {ctx.source.name}{note}")


# Makes the prepared target container impossible to restore from this
# run: its images go, and its marker stays, naming them, so a start its
# engine queued and never answered fails in the wrapper ("no CRIU images")
# rather than starting a copy (without a marker it would start afresh).
# The exit status says the images are gone. $1 marker path, $2 the run's
# directory there, $3 the marker's text.
DISARM_SCRIPT = r"""
rm -rf -- "$2"
mkdir -p "${1%/*}" && printf '%s' "$3" >"$1.new" && mv -f "$1.new" "$1"
[ ! -e "$2" ]
"""


def disarm_target(ctx: Context) -> str:
    """Make sure the target copy neither runs nor can start; return what stays there ("" if nothing)."""
    s = ctx.state
    if not s.target_id:
        return ""
    target, short = ctx.target.name, s.target_id[:12]
    if s.dst_base:
        mark = runc.marker_text(f"{s.dst_base}/images", f"{s.dst_base}/work")
        try:
            with ssh.Connection(ctx.target) as conn:
                conn.sh(DISARM_SCRIPT, runc.marker_path(s.target_id), s.dst_base, mark, timeout=30)
        except ssh.SSHError as e:
            if ctx.target_may_run:
                raise unsafe_to_resume(ctx, e) from e
            return f"container {short} (created, never started) stays on {target} ({e})"
    timeout = engine_plan.TARGET_ENGINE_TIMEOUT
    try:
        with Engine(ctx.target, timeout=timeout) as dst:
            try:
                dst.remove(s.target_id, timeout=timeout)
            except NotFoundError:
                pass
            runc.clear_marks(dst.conn, s.target_id)
            # The networks, volumes and image tags this run made there, volume data and all.
            container_checks.remove_created(dst, s)
        return ""
    except (EngineError, ssh.SSHError) as e:
        if ctx.target_may_run and engine_plan._container_may_run(ctx.target, s.target_id):
            raise unsafe_to_resume(ctx, e) from e
        return f"container {short} stays on {target} until its engine answers (its images are gone: {e})"


def _restore_source(ctx: Context, src: Engine) -> str:
    """Start the stopped source container from this run's images; how it was done."""
    s = ctx.state
    cid = s.container["Id"]
    images = f"{s.src_base}/images"
    if s.src_runtime == runc.RUNTIME_NAME:
        runc.mark_for_restore(src.conn, cid, images, f"{s.src_base}/rollback-work")
        try:
            src.start(cid)
        except EngineError as e:
            raise _restore_failure(ctx, src.conn, e, f"{s.src_base}/rollback-work") from e
        return f"restored by the {runc.RUNTIME_NAME} runtime"
    # Docker's own checkpoint restore reads a checkpoint from the
    # container's checkpoints directory; runc wrote the same images.
    cp_dir, name = _docker_checkpoint(ctx)
    src.conn.run(["sh", "-c", 'mkdir -p "$1" && rm -rf "$1/$3" && mv "$2" "$1/$3"', "sh", cp_dir, images, name])
    try:
        src.start(cid, checkpoint=name, timeout=ctx.call_timeout())
    except Exception:
        # The images are the workload's only state: back where a retried
        # rollback (a recovery) looks for them.
        _reclaim_images(ctx, src.conn)
        raise
    try:
        src.delete_checkpoint(cid, name)
    except EngineError:
        pass  # removed with the container later
    return "restored through Docker's checkpoint restore"


def _docker_checkpoint(ctx: Context) -> tuple[str, str]:
    """The checkpoints directory and name a rollback through Docker's restore uses."""
    s = ctx.state
    return f"{s.src_root}/containers/{s.container['Id']}/checkpoints", f"cw-{ctx.run.code.hex[:12]}"


def _reclaim_images(ctx: Context, conn) -> None:
    """Move the images back from a Docker checkpoint a rollback made and did not restore."""
    cp_dir, name = _docker_checkpoint(ctx)
    conn.run(["sh", "-c", '[ -e "$2" ] || [ ! -d "$1/$3" ] || mv "$1/$3" "$2"', "sh", cp_dir,
              f"{ctx.state.src_base}/images", name], check=False)  # fmt: skip


# Exits 0 while a runc checkpoint of container $1 runs (CRIU is its child).
# Processes found from two listings, not one command per process.
CHECKPOINT_BUSY_SCRIPT = r"""
for p in $(ls -l /proc/[0-9]*/exe 2>/dev/null | sed -n 's#.*/proc/\([0-9]*\)/exe -> .*runc$#\1#p'); do
    case $(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null) in *" checkpoint "*" $1 "*) exit 0 ;; esac
done
exit 1
"""


def await_checkpoint(ctx: Context, src: Engine, timeout: float) -> None:
    """Wait until no runc checkpoint of the source container runs, and Docker has seen how it ended.

    A checkpoint whose SSH session was cut (the freeze limit, a dropped
    connection, a dead controller) goes on in runc and CRIU. Looked at
    midway, the container still runs, then stops a moment later once its
    dump is done, with images a rollback would have removed by then.
    """
    s = ctx.state
    cid = s.container["Id"]
    deadline = time.monotonic() + timeout
    while src.conn.sh(CHECKPOINT_BUSY_SCRIPT, cid, check=False).rc == 0:
        if time.monotonic() > deadline:
            raise MigrationError(f"{ctx.source.name}: container {cid[:12]} is still being checkpointed by runc")
        time.sleep(0.2)
    if s.runc_root and not runc.is_running(src.conn, runc.RuncState(s.runc_binary, s.runc_root), cid):
        # runc ended it after the dump: the shim's exit reaches Docker a moment later.
        exit_deadline = time.monotonic() + EXIT_WAIT
        while src.inspect(cid)["State"]["Running"] and time.monotonic() < exit_deadline:
            time.sleep(0.1)


def rollback(ctx: Context):
    """Bring the container back on the source; restartable from the stored state alone."""
    close_transfer(ctx)
    s = ctx.state
    c = s.container
    leftovers = disarm_target(ctx)
    with Engine(ctx.source, timeout=ctx.call_timeout()) as src:
        await_checkpoint(ctx, src, ctx.call_timeout())
        now = src.inspect(c["Id"])["State"]
        running = now["Running"]
        if not running and s.src_base:
            # An earlier rollback may have died between moving them and the start.
            _reclaim_images(ctx, src.conn)
        has_images = (
            bool(s.src_base) and src.conn.run(["test", "-s", f"{s.src_base}/images/inventory.img"], check=False).rc == 0
        )
        how = "still running"
        if not running:
            if not has_images and engine_plan.exited_on_its_own(now):
                if s.src_base:
                    remove_dir(src.conn, s.src_base)
                return engine_plan._leave_ended(ctx, src, now, leftovers)
            if not has_images:
                # Its state is gone; running it afresh beats running nothing.
                src.start(c["Id"])
                ctx.run.result_workload = c["Id"][:12]
                ctx.resumed_on_source(leftovers)
                engine_plan._restore_restart_policy(src, ctx)
                raise MigrationError(
                    f"{ctx.source.name}: the container stopped without complete images: its state is lost; "
                    f"started it again from its image"
                )
            how = _restore_source(ctx, src)
            ctx.resumed_at = time.perf_counter()
        ctx.run.result_workload = c["Id"][:12]
        ctx.resumed_on_source(leftovers)
        if not settle(lambda: src.inspect(c["Id"])["State"]["Running"]):
            raise MigrationError(f"{ctx.source.name}: the container does not stay running after rollback")
        engine_plan._restore_restart_policy(src, ctx)
        runc.clear_marks(src.conn, c["Id"])
        if s.src_base:
            remove_dir(src.conn, s.src_base)
    note = f"; {leftovers}" if leftovers else ""
    return Measured(detail=f"container {c['Id'][:12]} running again on {ctx.source.name} ({how}){note}")


def abort(ctx: Context):
    """Undo preparation when the run fails before the freeze."""
    close_transfer(ctx)
    engine_plan.abort(ctx)
    s = ctx.state
    if s.criu_config and ctx.src is not None:
        drop_criu_config(ctx)
    for engine, host, path in ((ctx.src, ctx.source, s.src_base), (ctx.dst, ctx.target, s.dst_base)):
        if not path:
            continue
        if engine is not None:
            remove_dir(engine.conn, path)
        else:
            # A recovery (leftovers after a rollback) has no connections: the
            # images hold the container's memory and must not stay. The
            # target's failure keeps the leftovers for the next recovery; the
            # source's rollback removed its own.
            try:
                with ssh.Connection(host) as conn:
                    remove_dir(conn, path)
                    if host is ctx.source:
                        drop_criu_config(ctx, conn)
                    if host is ctx.target and s.target_id:
                        runc.clear_marks(conn, s.target_id)
            except ssh.SSHError:
                if host is ctx.target:
                    raise


# The target's engine restores through criuweb's runtime (a plain docker
# start that the runtime turns into runc restore): a host whose probe did not
# find it registered is not offered these plans, rather than refused at
# pre-flight.
NEEDS = (f"runtime:{runc.RUNTIME_NAME}",)

PLAN = Plan(
    kind=CONTAINER,
    strategy=STOP_AND_COPY,
    label="stop and copy (runc)",
    summary="runc checkpoint under Docker, images in tmpfs streamed host to host, restored by criuweb's runtime "
    "on a plain docker start: no containerd checkpoint copies.",
    state=RuncContainerState,
    steps=(
        Step("pre-flight", "source", preflight_source),
        Step("pre-flight", "target", preflight_target),
        Step("ship image", "both", engine_plan.ship_image, when=engine_plan.image_missing, workload_bytes=False),
        Step("prepare target", "target", prepare_target),
        Step("prepare source", "source", engine_plan.prepare_source, when=engine_plan.has_restart_policy),
        Step("checkpoint", "source", checkpoint, freezes=True),
        Step("transfer", "both", transfer),
        Step("restore", "target", restore, resumes=True),
        Step("verify", "target", engine_plan.verify, commits=True),
        Step("cleanup", "both", cleanup),
    ),
    rollback=rollback,
    abort=abort,
    moves_volumes=True,
    adopt=engine_plan.adopt,
    needs=NEEDS,
)
