"""Export and import of kept checkpoints as one archive (see archive.py).

- export: the kept directory streamed from its host through the controller
  into a zstd-compressed archive with its manifest;
- import: the whole archive checked on the controller first (checksums,
  paths), then the host (CRIU and kernel no older than those that made it,
  the container's image present, room), and only then unpacked there and
  recorded. Nothing is stopped by either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ... import archive, ssh
from ...docker_engine import Engine
from ...models import CONTAINER, EXPORT, IMPORT, KIND_CHOICES
from .. import keep, streams
from ..errors import MigrationError
from ..hostcheck import SPACE_MARGIN, check_space, criu_ready
from ..plan import Measured, Plan, Step

if TYPE_CHECKING:
    from ..runner import Context


@dataclass
class ArchiveState:
    output: str = ""  # export: the archive written on the controller
    archive: str = ""  # import: the archive read on the controller
    remove_archive: bool = False  # import: an upload, removed when the run ends
    manifest: dict = field(default_factory=dict)
    keep_name: str = ""
    kept: str = ""


def _recv_all(chan, what: str):
    """Yield a remote command's stdout; MigrationError naming the host if it fails."""
    while data := chan.recv(archive.CHUNK):
        yield data
    rc = chan.recv_exit_status()
    err = chan.makefile_stderr().read().decode(errors="replace").strip()
    chan.close()
    if rc != 0:
        raise MigrationError(f"{what} failed: {err[-300:] or f'exit status {rc}'}")


# -- export --------------------------------------------------------------------------------


def export_preflight(ctx: Context):
    cp = ctx.run.checkpoint
    if cp is None:
        raise MigrationError("the checkpoint was deleted")
    ctx.src = ssh.Connection(ctx.source).__enter__()
    if ctx.src.run(["test", "-d", f"{cp.path}/{keep.IMAGES}"], check=False).rc != 0:
        raise MigrationError(f"{ctx.source.name}: the files of checkpoint {cp.name} are gone from {cp.path}")
    out = os.path.dirname(os.path.abspath(ctx.state.output))
    if not os.path.isdir(out):
        raise MigrationError(f"controller: no directory {out} for the archive")
    return Measured(detail=f"checkpoint {cp.name}: {cp.size // 1024} KiB in {cp.path}")


def export(ctx: Context):
    cp = ctx.run.checkpoint
    parts = [keep.IMAGES] + ([keep.LAYER] if cp.kind == CONTAINER else [])
    chan = ctx.src.open_command(streams.TAR_CREATE + [cp.path, *parts])
    described = {**cp.to_dict(), "config": cp.config, "facts": cp.facts}
    manifest = archive.write(ctx.state.output, described, _recv_all(chan, f"{ctx.source.name}: reading {cp.path}"))
    size = os.path.getsize(ctx.state.output)
    ctx.state.manifest = {"sha256": manifest["sha256"], "payload_size": manifest["payload"]["size"]}
    return Measured(
        bytes=manifest["payload"]["size"],
        detail=f"{ctx.state.output}: {size} B compressed from {manifest['payload']['size']} B",
    )


def export_abort(ctx: Context):
    for path in (ctx.state.output, f"{ctx.state.output}.part"):
        if path and os.path.exists(path) and not ctx.committed:
            os.unlink(path)


def _export_plan(kind: str) -> Plan:
    return Plan(
        kind=kind,
        strategy=EXPORT,
        operation=EXPORT,
        label="export",
        summary="A kept checkpoint as one zstd archive with its manifest.",
        state=ArchiveState,
        steps=(
            Step("pre-flight", "source", export_preflight),
            Step("export", "source", export, commits=True),
        ),
        rollback=lambda ctx: Measured(),
        abort=export_abort,
    )


# -- import --------------------------------------------------------------------------------


def import_verify(ctx: Context):
    try:
        manifest = archive.verify(ctx.state.archive)
    except archive.ArchiveError as e:
        raise MigrationError(f"controller: {os.path.basename(ctx.state.archive)}: {e}") from None
    if manifest["checkpoint"].get("kind") != ctx.run.kind:
        raise MigrationError("controller: the archive's kind changed since the run was created")
    ctx.state.manifest = manifest
    files = len(manifest["payload"]["files"])
    return Measured(detail=f"checksums match; {files} files, {manifest['payload']['size']} B")


def import_preflight(ctx: Context):
    s = ctx.state
    described = s.manifest["checkpoint"]
    s.keep_name = keep.name_free(s.keep_name) if s.keep_name else _free_name(described.get("name"), ctx.target)
    ctx.dst = ssh.Connection(ctx.target).__enter__()
    criu_ready(ctx.dst)
    facts = keep.check_compatible(
        ctx.dst, described.get("criu_version", ""), described.get("kernel", ""), "this checkpoint"
    )
    if ctx.run.kind == CONTAINER:
        image = described.get("image_id") or ""
        with Engine(ctx.target) as engine:
            if not image or not engine.has_image(image):
                raise MigrationError(
                    f"{ctx.target.name}: the checkpoint's image {described.get('image') or '?'} "
                    f"({image[:19] or 'unknown id'}) is missing there; pull or load it first"
                )
    s.kept = keep.kept_dir(ctx.target, s.keep_name)
    if ctx.dst.run(["test", "-e", s.kept], check=False).rc == 0:
        raise MigrationError(f"{ctx.target.name}: {s.kept} already exists")
    check_space(ctx.dst, s.kept.rsplit("/", 1)[0], s.manifest["payload"]["size"] + SPACE_MARGIN, "the checkpoint")
    return Measured(detail=f"{facts}; to be kept as {s.keep_name}")


def _free_name(name: str | None, host) -> str:
    base = (name or "imported")[:50]
    for candidate in (base, f"{base}-{host.name}"[:64]):
        try:
            return keep.name_free(candidate)
        except MigrationError:
            continue
    return keep.default_name(base)


# Holds the run's code in the directory it unpacked, until it is recorded:
# an abort (or a recovery's) removes a kept directory only when it is its
# own and unrecorded (another import may have taken the name meanwhile).
OWNER = ".criuweb-import"

# $1: the run's own directory beside the kept one, $2: the run's code.
# Unpacked and checked there only: the controller learns whether the bytes
# it sent are the ones it checked (the archive may have changed since) at
# their end, and names the kept directory itself after that (PLACE_KEPT).
# Refused and removed if CRIU's images hold anything but files and
# directories (the controller checked already; the host does not trust it).
UNPACK_KEPT = r"""
set -e
rm -rf -- "$1"
mkdir -p -- "$1"
tar --numeric-owner --xattrs --xattrs-include='*' --same-owner -xpf - -C "$1"
odd=$(find "$1/checkpoint" ! -type f ! -type d -print -quit)
if [ -n "$odd" ]; then echo "refusing the checkpoint: $odd is not a regular file" >&2; rm -rf -- "$1"; exit 3; fi
printf '%s' "$2" >"$1/.criuweb-import"
"""

# $1 the run's directory, $2 the kept one. Prints its size.
PLACE_KEPT = r"""
set -e
mv -T -- "$1" "$2"  # -T: never into a directory made meanwhile
du -sb --exclude=.criuweb-import -- "$2" | cut -f1
"""

# $1 the run's directory, $2 the kept one, $3 the run's code, $4 "recorded"
# or "": the kept directory goes only when this run made it and recorded nothing.
ABORT_SCRIPT = r"""
rm -rf -- "$1"
if [ -z "$4" ] && [ "$(cat -- "$2/.criuweb-import" 2>/dev/null)" = "$3" ]; then rm -rf -- "$2"; fi
if [ -n "$4" ]; then rm -f -- "$2/.criuweb-import"; fi
true
"""


def _unpack_dir(ctx: Context) -> str:
    """The run's own directory beside the kept one: two imports of one name never share it."""
    return f"{ctx.state.kept}.{ctx.run.code.hex[:12]}.part"


def import_transfer(ctx: Context):
    s = ctx.state
    part = _unpack_dir(ctx)
    chan = ctx.dst.open_command(["sh", "-c", UNPACK_KEPT, "sh", part, ctx.run.code.hex])
    sent = 0
    try:
        for chunk in archive.payload_chunks(s.archive, s.manifest):
            chan.sendall(chunk)
            sent += len(chunk)
    except (archive.ArchiveError, OSError) as e:
        # The host's tar may still be unpacking what it got: removed once it is done.
        chan.shutdown_write()
        chan.status_event.wait(ctx.call_timeout())
        chan.close()
        ctx.dst.run(["rm", "-rf", "--", part], check=False)
        if isinstance(e, archive.ArchiveError):
            raise MigrationError(
                f"controller: {os.path.basename(s.archive)}: {e}; nothing was kept on {ctx.target.name}"
            ) from None
        raise MigrationError(f"{ctx.target.name}: sending the checkpoint failed: {e}") from None
    chan.shutdown_write()
    rc = chan.recv_exit_status()
    err = chan.makefile_stderr().read().decode(errors="replace").strip()
    chan.close()
    if rc != 0:
        raise MigrationError(f"{ctx.target.name}: unpacking the checkpoint failed: {err[-300:] or rc}")
    return Measured(bytes=sent, detail=f"unpacked in {part}")


def import_keep(ctx: Context):
    s = ctx.state
    d = s.manifest["checkpoint"]
    size = ctx.dst.sh(PLACE_KEPT, _unpack_dir(ctx), s.kept).stdout.split()[0]
    cp = keep.record(
        ctx, s.kept, int(size), workload=d.get("workload", ""), workload_id=d.get("workload_id", ""),
        leave_running=bool(d.get("leave_running")), criu_stats=d.get("criu_stats") or {},
        freeze_ms=d.get("freeze_ms"), config=d.get("config") or {}, facts=d.get("facts") or {},
        image_id=d.get("image_id") or "",
        image=d.get("image") or "", criu_version=d.get("criu_version", ""), kernel=d.get("kernel", ""),
        imported=True,
    )  # fmt: skip
    ctx.dst.run(["rm", "-f", "--", f"{s.kept}/{OWNER}"], check=False)  # recorded: an abort leaves it alone
    return Measured(detail=f"kept as {cp.name} in {s.kept}")


def import_cleanup(ctx: Context):
    _remove_upload(ctx)
    return Measured()


def _remove_upload(ctx: Context):
    if ctx.state.remove_archive and ctx.state.archive and os.path.exists(ctx.state.archive):
        os.unlink(ctx.state.archive)


def import_abort(ctx: Context):
    s = ctx.state
    if s.kept:
        recorded = "recorded" if ctx.run.checkpoint_id else ""
        args = (ABORT_SCRIPT, _unpack_dir(ctx), s.kept, ctx.run.code.hex, recorded)
        if ctx.dst is not None:
            ctx.dst.sh(*args)
        else:
            # A recovery after the controller died: no connection of its own yet.
            with ssh.Connection(ctx.target) as conn:
                conn.sh(*args)
    _remove_upload(ctx)


def _import_plan(kind: str) -> Plan:
    return Plan(
        kind=kind,
        strategy=IMPORT,
        operation=IMPORT,
        label="import",
        summary="An archive checked whole, then the host, then unpacked there as a kept checkpoint.",
        state=ArchiveState,
        steps=(
            Step("verify archive", "target", import_verify),
            Step("pre-flight", "target", import_preflight),
            Step("transfer", "target", import_transfer),
            Step("keep", "target", import_keep, commits=True),
            Step("cleanup", "target", import_cleanup),
        ),
        rollback=lambda ctx: Measured(),
        abort=import_abort,
    )


PLANS = tuple(plan for kind, _ in KIND_CHOICES for plan in (_export_plan(kind), _import_plan(kind)))
