"""`manage.py criuweb_worker`: django-tasks-db's `db_worker`, with a sweeper beside it.

The framework's worker claims and executes tasks, one at a time, and stops
gracefully on SIGTERM (after the task in hand). What it cannot do is notice
that another worker died with a run in its hands: its task stays "running"
in the queue forever. The sweeper thread does that for criuweb's runs, from
their leases (migrations_app.worker.sweep); at start it also finishes what
earlier workers, CLIs or servers left, as the web server did before runs
left it.
"""

from __future__ import annotations

from django_tasks_db.management.commands.db_worker import Command as DbWorkerCommand

from migrations_app import worker
from migrations_app.engine import lifecycle


class Command(DbWorkerCommand):
    help = (
        "Execute queued runs (django-tasks-db's db_worker) and take over the runs of workers that are gone. "
        "Stops after the run in hand on SIGTERM or Ctrl-C."
    )

    def add_arguments(self, parser) -> None:
        super().add_arguments(parser)
        # The reloader would run the worker in a child process and the
        # sweeper in both: never for runs that freeze workloads. The task
        # table names the worker as the runs do (hostname:boot id:PID:start).
        parser.set_defaults(reload=False, worker_id=lifecycle.worker_id()[:64])

    def handle(self, *args, **options) -> None:
        sweeper = worker.Sweeper()
        sweeper.start()
        try:
            super().handle(*args, **options)
        finally:
            sweeper.stopped.set()
            # A recovery in its hands is work in hand too: a daemon thread
            # would be cut at the interpreter's exit, a workload half rolled
            # back (a second signal still stops the process at once).
            sweeper.join()
