"""What the checkpoint, restore, clone, export and import commands share:
finding hosts and checkpoints, running a run in the foreground, printing it
as migrate_workload does."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from migrations_app import engine, worker
from migrations_app.models import PHASE_FAILED, SUCCEEDED, Checkpoint, Host


def host(name: str) -> Host:
    try:
        return Host.objects.get(name=name)
    except Host.DoesNotExist:
        known = ", ".join(Host.objects.values_list("name", flat=True)) or "none"
        raise CommandError(f"no host named {name!r} (known: {known})")


def checkpoint(name: str) -> Checkpoint:
    try:
        return Checkpoint.objects.select_related("host").get(name=name)
    except Checkpoint.DoesNotExist:
        raise CommandError(f"no checkpoint named {name!r}")


def create(factory, *args, **kwargs):
    """A pending run from one of engine.keep's create_*_run functions; CommandError on bad input."""
    try:
        return factory(*args, **kwargs)
    except engine.MigrationError as e:
        raise CommandError(str(e))


def add_enqueue(parser) -> None:
    parser.add_argument(
        "--enqueue", action="store_true",
        help="only queue the run for a worker (manage.py criuweb_worker) and print its id",
    )  # fmt: skip


def create_or_enqueue(command: BaseCommand, options: dict, factory, *args, **kwargs):
    """With --enqueue: queue the run for a worker, print its id, return None; else a pending run for this process."""
    if not options.get("enqueue"):
        return create(factory, *args, **kwargs)
    try:
        run = worker.submit(factory, *args, **kwargs)
    except engine.MigrationError as e:
        raise CommandError(str(e))
    command.stdout.write(json.dumps(run.to_dict(), indent=2) if options["json"] else f"queued run {run.code}")
    command.stderr.write(worker.ENQUEUED_HINT)
    return None


def execute(command: BaseCommand, run, as_json: bool, extra=None):
    """Run it here, print each phase (or one JSON object at the end); CommandError unless it succeeded."""

    def show(phase):
        if not as_json:
            size = f", {phase.bytes} B" if phase.bytes else ""
            command.stdout.write(
                f"{phase.name:<15} {phase.host:<22} {phase.duration_ms:8.1f} ms{size}"
                f"  {phase.status}{': ' + phase.detail if phase.detail else ''}"
            )

    try:
        run = worker.run_here(run, say=command.stderr.write, on_phase=show)
    except engine.MigrationError as e:
        raise CommandError(str(e))
    run.refresh_from_db()
    result = run.to_dict()
    cp = run.checkpoint
    result["checkpoint"] = cp.name if cp else None
    result.update((extra or (lambda r: {}))(run))
    if as_json:
        command.stdout.write(json.dumps(result, indent=2))
    else:
        downtime = f"{run.downtime_ms:.0f} ms" if run.downtime_ms is not None else "-"
        command.stdout.write(
            f"{run.status}: {run}; paused {downtime}; {run.total_bytes} B; "
            f"checkpoint {result['checkpoint'] or '-'}; now {run.result_workload or '-'}"
        )
    if run.status != SUCCEEDED:
        failed = run.phases.filter(status=PHASE_FAILED).first()
        step = f"{run.operation} failed at {failed.name} ({failed.host}): " if failed else f"{run.operation} failed: "
        raise CommandError(step + (run.error or run.status))
    return run
