"""What the checkpoint, restore, clone, export and import commands share:
finding hosts and checkpoints, running a run in the foreground, printing it
as migrate_workload does; and what every command with --json shares."""

from __future__ import annotations

import json

from django.core.management.base import BaseCommand, CommandError

from migrations_app import engine, worker
from migrations_app.models import PHASE_FAILED, SUCCEEDED, Checkpoint, Host


class JsonOutcome(BaseCommand):
    """A command whose --json prints a JSON object on stdout in every outcome.

    A script reads stdout; a refusal before any run exists (bad arguments, an
    unknown host, the same host twice) would otherwise leave it only a
    message on stderr. Such a refusal prints {"id": null, "status": "refused",
    "error": ...}; the message still goes to stderr and the exit stays non-zero.
    A command writes its own objects with write_json().
    """

    json_written = False
    _json_in_argv = False

    def write_json(self, obj) -> None:
        self.stdout.write(json.dumps(obj, indent=2))
        self.json_written = True

    def _refused(self, message: str) -> None:
        if not self.json_written:
            self.write_json({"id": None, "status": "refused", "error": message})

    def run_from_argv(self, argv):
        # Bad arguments are found while parsing, before handle() sees --json.
        self._json_in_argv = "--json" in argv[2:]
        super().run_from_argv(argv)

    def create_parser(self, prog_name, subcommand, **kwargs):
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        error = parser.error

        def error_as_json(message):
            if self._json_in_argv:
                self._refused(message)
            error(message)

        parser.error = error_as_json
        return parser

    def execute(self, *args, **options):
        try:
            return super().execute(*args, **options)
        except CommandError as e:
            if options.get("json"):
                self._refused(str(e))
            raise


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


def create_or_enqueue(command: JsonOutcome, options: dict, factory, *args, **kwargs):
    """With --enqueue: queue the run for a worker, print its id, return None; else a pending run for this process."""
    if not options.get("enqueue"):
        return create(factory, *args, **kwargs)
    try:
        run = worker.submit(factory, *args, **kwargs)
    except engine.MigrationError as e:
        raise CommandError(str(e))
    if options["json"]:
        command.write_json(run.to_dict())
    else:
        command.stdout.write(f"queued run {run.code}")
    command.stderr.write(worker.ENQUEUED_HINT)
    return None


def execute(command: JsonOutcome, run, as_json: bool, extra=None):
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
        if as_json:
            command.write_json(with_error(run, str(e)))
        raise CommandError(str(e))
    run.refresh_from_db()
    result = run.to_dict()
    cp = run.checkpoint
    result["checkpoint"] = cp.name if cp else None
    result.update((extra or (lambda r: {}))(run))
    if as_json:
        command.write_json(result)
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


def with_error(run, message: str) -> dict:
    """The run as --json prints it, once it ended with this message (it may not have recorded it)."""
    run.refresh_from_db()
    result = run.to_dict()
    result["error"] = result["error"] or message
    return result
