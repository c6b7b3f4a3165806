"""A run's life outside its steps: creating it, claiming it, and telling
whether the process that claimed it still lives."""

from __future__ import annotations

import os
import socket

from django.db import IntegrityError, transaction
from django.utils import timezone

from .. import validation
from ..models import CONTAINER, INTERRUPTED, PENDING, RUNNING, TCP_CHOICES, TCP_CLOSE, MigrationRun
from . import observe, plans
from .errors import MigrationError, WorkloadBusy


def create_run(
    source, target, kind, workload, keep_source=False, strategy=None, probe="", tcp=TCP_CLOSE, shared_storage=False,
    freeze_limit=None,
):
    """Validate and store a pending run; MigrationError says what is wrong.

    probe: an optional host:port the controller polls during the run to
    see the downtime from outside (engine/observe.py).
    """
    if source.pk == target.pk:
        raise MigrationError("source and target must be different hosts")
    if kind not in plans.KINDS:
        raise MigrationError(f"unknown workload kind {kind!r}")
    strategy = strategy or plans.default_strategy(kind)
    plans.get(kind, strategy)  # raises MigrationError naming the choices
    if tcp not in dict(TCP_CHOICES):
        known = ", ".join(dict(TCP_CHOICES))
        raise MigrationError(f"unknown choice for TCP connections {tcp!r} (choose from: {known})")
    # The same checks as the form and the CLI, and nothing stripped: " 12"
    # is not PID 12.
    try:
        workload = validation.container_ref(workload) if kind == CONTAINER else str(validation.pid(workload))
    except validation.InputError as e:
        raise MigrationError(str(e)) from None
    probe = (probe or "").strip()
    if probe:
        try:
            observe.parse_address(probe)
        except ValueError as e:
            raise MigrationError(str(e)) from None
    if freeze_limit is not None and not 0 < freeze_limit <= 24 * 3600:
        raise MigrationError(f"the freeze limit must be between 0 and 86400 seconds, not {freeze_limit}")
    fields = dict(
        source=source, target=target, kind=kind, workload=workload, keep_source=keep_source, strategy=strategy,
        probe_address=probe, tcp=tcp, shared_storage=shared_storage, freeze_limit=freeze_limit,
    )  # fmt: skip
    busy = WorkloadBusy(f"{workload} on {source.name} is already being migrated")
    for other in MigrationRun.objects.unfinished().filter(source=source, kind=kind):
        if not _same_workload(kind, workload, other):
            continue
        # Busy while the process that claimed it lives, or, not yet
        # claimed, while its thread is about to.
        if worker_alive(other.worker) if other.worker else _young(other):
            raise busy
        # Its process is gone (a killed CLI, a crashed server): it blocks nothing.
        MigrationRun.objects.filter(pk=other.pk, status=other.status).update(
            status=INTERRUPTED, error=gone_message(other.worker)
        )
    try:
        with transaction.atomic():
            return MigrationRun.objects.create(**fields)
    except IntegrityError:
        # Another request got there between the check and the insert.
        raise busy from None


def _same_workload(kind, workload, other):
    """Whether another run's workload is this one, as far as the names tell.

    A container named by its name in one run and by its id in another is
    caught here once pre-flight resolved the other's id; when both are still
    unresolved, claim_workload() catches it at pre-flight, before any freeze.
    """
    if other.workload == workload:
        return True
    if kind == CONTAINER and other.workload_id:
        return other.workload_id.startswith(workload) or other.workload_id == workload
    return other.workload_id == workload


def claim_workload(run, workload_id):
    """Record what a run's workload resolved to; MigrationError when another active run has it.

    The partial unique constraint one_active_run_per_workload_id makes this
    hold between two controllers too: of two runs naming one container two
    ways, the second to get here is refused before anything is frozen.
    """
    try:
        with transaction.atomic():
            MigrationRun.objects.filter(pk=run.pk).update(workload_id=workload_id)
    except IntegrityError:
        raise MigrationError(
            f"{run.workload} on {run.source.name} is already being migrated (by another run, by another name)"
        ) from None
    run.workload_id = workload_id


def gone_message(worker: str) -> str:
    """What happened to a run whose worker died, naming that worker."""
    if not worker:
        return "interrupted: the process that was to run it never started it"
    host, _, pid, _ = (worker.split(":") + ["", "", "", ""])[:4]
    return f"interrupted: the worker process that ran it (PID {pid} on {host}, worker {worker}) is gone"


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
