import json
import uuid

from django.core.management.base import CommandError

from migrations_app.engine import recovery
from migrations_app.models import FAILED, MigrationRun

from . import _operations as op


class Command(op.JsonOutcome):
    help = (
        "Finish every run whose worker died (a killed CLI, a crashed server) from what the database "
        "recorded, and remove what finished runs left on their hosts. Says where each workload runs now."
    )

    def add_arguments(self, parser):
        parser.add_argument("--run", help="recover this run only (its id), even one that failed")
        parser.add_argument("--json", action="store_true", help="print one JSON object per recovered run")

    def handle(self, run=None, **options):
        as_json = options["json"]

        def report(r):
            if as_json:
                # One line per run (JSON lines), not write_json's indented object.
                self.stdout.write(json.dumps({"id": str(r.code), "status": r.status, "message": r.error}))
                self.json_written = True
            else:
                self.stdout.write(
                    f"run {r.code} ({r.kind} {r.workload}, {r.source.name} -> {r.target.name}): {r.status}: {r.error}"
                )

        if run:
            found = MigrationRun.objects.select_related("source", "target").filter(code=_uuid(run)).first()
            if found is None:
                raise CommandError(f"no run {run}")
            if not recovery.recoverable(found):
                raise CommandError(f"run {run} has nothing to recover, or its worker is still at work on it")
            recovered = [r for r in [recovery.recover(found)] if r is not None]
            for r in recovered:
                report(r)
        else:
            recovered = recovery.recover_all(report)
            if not recovered and not as_json:
                self.stdout.write("nothing to recover")
        failed = [r for r in recovered if r.status == FAILED and r.stage != "done"]
        if failed:
            raise CommandError(f"{len(failed)} run(s) could not be recovered; see the messages above")


def _uuid(value):
    try:
        return uuid.UUID(value)
    except ValueError:
        raise CommandError(f"{value!r} is not a run id") from None
