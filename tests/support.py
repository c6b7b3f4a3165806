"""Helpers shared by the test modules."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings

BASE_DIR = Path(__file__).resolve().parent.parent


def wait_for(predicate, timeout=10, message="condition not met", interval=0.2):
    """Poll predicate until it returns something true, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise AssertionError(message)


def process_env(**extra):
    """The environment of a process on this session's lab (CRIUWEB_LAB_ID) and test database.

    SQLite: the test database's file as DATABASE_URL. PostgreSQL
    (CRIUWEB_TEST_DB=postgres): the session's server is inherited
    (CRIUWEB_TEST_PG_SOCKET), the test database named by CRIUWEB_TEST_PG_DATABASE.
    """
    db = settings.DATABASES["default"]
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="criuweb.settings_test")
    if db["ENGINE"] == "django.db.backends.sqlite3":
        env["DATABASE_URL"] = f"sqlite:///{db['NAME']}"
    else:
        env["CRIUWEB_TEST_PG_DATABASE"] = db["NAME"]
    env.update({k: str(v) for k, v in extra.items()})
    return env


def start_worker(log_path, **env):
    """A real worker process (`manage.py criuweb_worker`) on the test database; its output in log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "manage.py", "criuweb_worker", "--interval", "0.2", "--no-startup-delay"],
            cwd=BASE_DIR, env=process_env(PYTHONUNBUFFERED=1, **env), stdout=log, stderr=subprocess.STDOUT,
        )


def stop_worker(proc, timeout=60):
    """SIGTERM to the worker by its PID (it ends the run in hand first), SIGKILL if it takes too long."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def queued_runs():
    """The runs in the workers' queue (the execute_run tasks of the database backend), oldest first."""
    from django_tasks_db.models import DBTaskResult

    from migrations_app.models import MigrationRun

    tasks = DBTaskResult.objects.filter(task_path="migrations_app.worker.execute_run").order_by("enqueued_at")
    return [MigrationRun.objects.get(code=t.args_kwargs["args"][0]) for t in tasks]


def worker_pid(run):
    """The PID in a run's worker id (hostname:boot id:pid:start time)."""
    return int(run.worker.split(":")[2])
