"""Runs in the background of the web process, and what is left after it stops."""

import logging
import threading

from django.db import close_old_connections, connection

from . import engine
from .engine import recovery
from .models import MigrationRun

log = logging.getLogger(__name__)


def _thread(target, *args, name=None, daemon=True):
    """Start target(*args) in a thread with its own database connection."""

    def body():
        close_old_connections()
        try:
            target(*args)
        except Exception:  # a thread has nobody to raise to
            log.exception("background %s failed", name or target.__name__)
        finally:
            connection.close()

    thread = threading.Thread(target=body, name=name, daemon=daemon)
    thread.start()
    return thread


def start(run):
    """Execute a pending run in a thread of this process."""
    # Not a daemon: a stopping server process waits for the run to end
    # (up to gunicorn's graceful timeout) rather than cutting it off mid-freeze.
    return _thread(_work, run.pk, name=f"run-{run.code}", daemon=False)


def _work(run_pk):
    run = MigrationRun.objects.select_related("source", "target").get(pk=run_pk)
    engine.execute(run)


def mark_interrupted():
    """Mark runs whose worker is gone as interrupted, naming that worker; return them."""
    return recovery.mark_gone()


def recover_all():
    """Recover every interrupted run and clear leftovers (see engine.recovery)."""
    runs = recovery.recover_all()
    for run in runs:
        log.warning("run %s recovered: %s: %s", run.code, run.status, run.error)
    return runs


def recover_on_startup():
    """Mark stale runs interrupted now, and recover them in the background.

    Called when the web server starts: a run in progress when its worker
    died would otherwise keep its workload frozen, or leave two halves.
    """
    runs = mark_interrupted()
    if runs:
        log.warning("%d run(s) were interrupted: their worker is gone", len(runs))
    return _thread(recover_all, name="recovery", daemon=False)


def recover_one(run):
    """Recover one run (the run page's button) in a thread of this process."""
    return _thread(recovery.recover, run, name=f"recover-{run.code}", daemon=False)
