"""Kept checkpoints: where their files live on a host, creating runs that use
them, what a host must have to restore one, retention and deletion.

A kept checkpoint is one directory on its host, `<work dir>/checkpoints/<name>/`,
holding `checkpoint/` (CRIU's images) and, for a container, `diff/` (its
writable layer). Everything else a restore needs is in the Checkpoint row.
"""

from __future__ import annotations

import re

from django.db import IntegrityError, transaction
from django.utils import timezone

from .. import ssh, validation
from ..models import (
    CHECKPOINT,
    CLONE,
    CONTAINER,
    EXPORT,
    IMPORT,
    MIGRATE,
    PROCESS,
    RESTORE,
    Checkpoint,
    Host,
    MigrationRun,
)
from . import lifecycle
from .errors import MigrationError

IMAGES = "checkpoint"  # the images' subdirectory, and the Docker checkpoint name a restore uses
LAYER = "diff"  # a container's writable layer (overlay2 calls its upper dir "diff")

# CRIU's version and the kernel's, one line each, in one round trip.
FACTS_SCRIPT = "criu --version 2>/dev/null | awk '/Version:/ {print $2}'; uname -r"


def kept_dir(host: Host, name: str) -> str:
    return f"{host.work_dir.rstrip('/')}/checkpoints/{name}"


def host_facts(conn) -> tuple[str, str]:
    """(CRIU version, kernel release) of a host."""
    lines = conn.sh(FACTS_SCRIPT).stdout.split("\n")
    return (lines[0].strip() if lines else ""), (lines[1].strip() if len(lines) > 1 else "")


def _numbers(version: str, parts: int) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", version)[:parts])


def check_compatible(conn, criu_version: str, kernel: str, what: str) -> str:
    """Refuse a host whose CRIU or kernel is older than the ones that made a checkpoint.

    CRIU reads images of its own version and older ones; a restore on an older
    kernel may lack what the dump relied on. Returns a line for the phase.
    """
    have_criu, have_kernel = host_facts(conn)
    if not have_criu:
        raise MigrationError(f"{conn.name}: CRIU is not installed; {what} needs CRIU {criu_version or 'any'}")
    if criu_version and _numbers(have_criu, 3) < _numbers(criu_version, 3):
        raise MigrationError(
            f"{conn.name}: CRIU {have_criu} is older than the CRIU {criu_version} that made {what}; "
            "it may not read its images"
        )
    if kernel and _numbers(have_kernel, 2) < _numbers(kernel, 2):
        raise MigrationError(
            f"{conn.name}: kernel {have_kernel} is older than the kernel {kernel} that made {what}; "
            "the restore may need what it lacks"
        )
    return f"CRIU {have_criu}, kernel {have_kernel}"


def default_name(workload: str) -> str:
    """A free checkpoint name made of the workload's and the time."""
    base = re.sub(r"[^a-zA-Z0-9_.-]", "-", workload).lstrip("_.-")[:40] or "checkpoint"
    name = f"{base}-{timezone.now():%Y%m%d-%H%M%S}"
    n = 1
    candidate = name
    while Checkpoint.objects.filter(name=candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def name_free(name: str) -> str:
    """The name, checked for grammar and uniqueness."""
    try:
        validation.checkpoint_name(name)
    except validation.InputError as e:
        raise MigrationError(str(e)) from None
    if Checkpoint.objects.filter(name=name).exists():
        raise MigrationError(f"a checkpoint named {name!r} already exists")
    return name


def _workload(kind: str, workload: object) -> str:
    try:
        if kind == CONTAINER:
            return validation.container_ref(workload)
        return str(validation.pid(workload))
    except validation.InputError as e:
        raise MigrationError(str(e)) from None


def _strategy(operation: str, kind: str, *hosts: Host, wanted: str | None = None) -> str:
    """The strategy of the operation's plan these hosts support best (engine/plans OPERATIONS).

    wanted: one of the operation's strategies, chosen by the caller (the
    benchmark compares them on the same hosts).
    """
    from . import plans  # the registry imports the plans, which import this module

    if wanted:
        known = [p.strategy for p in plans.OPERATIONS.get((operation, kind), ())]
        if wanted not in known:
            raise MigrationError(f"no {operation} of a {kind} by {wanted!r} (choose from: {', '.join(known)})")
        return wanted
    return plans.for_operation(operation, kind, hosts).strategy


def _create(operation, kind, source, target, workload, state, checkpoint=None, user=None, keep_source=False,
            strategy=None):  # fmt: skip
    busy = MigrationError(f"{workload} on {source.name} is busy with another run")
    for other in MigrationRun.objects.unfinished().filter(source=source, kind=kind, workload=workload):
        if lifecycle.holds_workload(other):
            raise busy
    try:
        with transaction.atomic():
            return MigrationRun.objects.create(
                operation=operation, strategy=strategy or operation, kind=kind, source=source, target=target,
                workload=workload, state=state, checkpoint=checkpoint, created_by=user, keep_source=keep_source,
            )  # fmt: skip
    except IntegrityError:
        raise busy from None


def create_checkpoint_run(host, kind, workload, name=None, leave_running=False, user=None, strategy=None):
    """A pending run that takes a kept checkpoint of a running workload."""
    workload = _workload(kind, workload)
    name = name_free(name) if name else default_name(workload if kind == CONTAINER else f"pid{workload}")
    state = {"keep_name": name, "leave_running": leave_running}
    return _create(CHECKPOINT, kind, host, host, workload, state, user=user,
                   strategy=_strategy(CHECKPOINT, kind, host, wanted=strategy))  # fmt: skip


def create_restore_run(checkpoint, target=None, new_name=None, user=None, operation=RESTORE, strategy=None):
    """A pending run that restores a kept checkpoint (in place, elsewhere, or as a clone under new_name)."""
    target = target or checkpoint.host
    state = {}
    if new_name is not None:
        if checkpoint.kind != CONTAINER:
            raise MigrationError("a restored process keeps its own name; --as names containers only")
        state["final_name"] = _workload(CONTAINER, new_name)
    elif operation == CLONE and checkpoint.kind == CONTAINER:
        raise MigrationError("a container clone needs a new name (--as)")
    return _create(operation, checkpoint.kind, checkpoint.host, target, checkpoint.name, state,
                   checkpoint=checkpoint, user=user, keep_source=True,
                   strategy=_strategy(operation, checkpoint.kind, target, wanted=strategy))  # fmt: skip


def create_live_clone_run(host, kind, workload, new_name=None, target=None, user=None):
    """A pending run that clones a running workload through a leave-running checkpoint."""
    workload = _workload(kind, workload)
    state: dict = {"leave_running": True}
    if kind == CONTAINER:
        if not new_name:
            raise MigrationError("a clone needs a new name (--as)")
        state["final_name"] = _workload(CONTAINER, new_name)
    target = target or host
    return _create(CLONE, kind, host, target, workload, state, user=user,
                   strategy=_strategy(CLONE, kind, host, target))  # fmt: skip


def create_export_run(checkpoint, output: str, user=None):
    return _create(EXPORT, checkpoint.kind, checkpoint.host, checkpoint.host, checkpoint.name,
                   {"output": output}, checkpoint=checkpoint, user=user)  # fmt: skip


def create_import_run(host, archive_path: str, name=None, user=None, remove_archive=False):
    """A pending run that imports an archive onto a host; its kind is read from the archive."""
    from .. import archive

    try:
        manifest = archive.read_manifest(archive_path)
    except archive.ArchiveError as e:
        raise MigrationError(f"{archive_path}: {e}") from None
    kind = manifest["checkpoint"].get("kind")
    if kind not in (CONTAINER, PROCESS):
        raise MigrationError(f"{archive_path}: the manifest names no workload kind this app knows")
    if name:
        name_free(name)
    state = {"archive": archive_path, "keep_name": name or "", "remove_archive": remove_archive}
    workload = str(manifest["checkpoint"].get("name") or "import")[:255]
    return _create(IMPORT, kind, host, host, workload, state, user=user)


def record(ctx, path: str, size: int, **fields) -> Checkpoint:
    """Store a new kept checkpoint for the run; the run's state says its name."""
    run = ctx.run
    try:
        with transaction.atomic():
            cp = Checkpoint.objects.create(
                name=ctx.state.keep_name, host=ctx.target, kind=run.kind, path=path, size=size,
                created_by=run.created_by, **fields,
            )  # fmt: skip
    except IntegrityError:
        raise MigrationError(f"a checkpoint named {ctx.state.keep_name!r} was made meanwhile") from None
    run.checkpoint = cp
    MigrationRun.objects.filter(pk=run.pk).update(checkpoint=cp)
    return cp


def unrecord(ctx) -> None:
    """Forget the checkpoint the run recorded: its rollback takes the files back.

    The record is written inside the keep step; a run that failed (or whose
    controller died) before the step was marked done rolls back, and a
    record left then would name a directory the rollback removes.
    """
    run = ctx.run
    if run.checkpoint_id:
        Checkpoint.objects.filter(pk=run.checkpoint_id).delete()  # the run's link goes with it (SET_NULL)
        run.checkpoint = None


def in_use(checkpoint: Checkpoint) -> bool:
    return checkpoint.runs.unfinished().exists()


def delete(checkpoint: Checkpoint) -> None:
    """Remove a kept checkpoint's files from its host, then its record."""
    if in_use(checkpoint):
        raise MigrationError(f"checkpoint {checkpoint.name} is in use by a run in progress")
    # Only ever a directory under the host's work directory, made by us.
    expected = kept_dir(checkpoint.host, checkpoint.name)
    if checkpoint.path != expected:
        raise MigrationError(f"checkpoint {checkpoint.name}: its path {checkpoint.path!r} is not {expected!r}")
    with ssh.Connection(checkpoint.host) as conn:
        conn.run(["rm", "-rf", "--", checkpoint.path])
    checkpoint.delete()


def apply_retention(host: Host, kind: str, workload: str) -> list[str]:
    """Delete a workload's checkpoints beyond the host's retention; return their names."""
    keep = host.checkpoint_retention
    if not keep:
        return []
    removed = []
    for old in Checkpoint.objects.of_workload(host, kind, workload)[keep:]:
        if in_use(old):
            continue
        delete(old)
        removed.append(old.name)
    return removed


OPERATIONS_ON_CHECKPOINTS = (RESTORE, CLONE, EXPORT)
OPERATIONS = (MIGRATE, CHECKPOINT, RESTORE, CLONE, EXPORT, IMPORT)
