"""Runs in the background of the web process, and what is left after it stops."""

import logging
import threading

from django.db import close_old_connections, connection

from . import engine, ssh
from .docker_engine import Engine, EngineError
from .models import CONTAINER, INTERRUPTED, MigrationRun

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
    """Mark runs whose worker is gone as interrupted; return them.

    Called when the app starts: a run in progress when the server stopped
    would otherwise show "running" for ever.
    """
    stale = [
        run
        for run in MigrationRun.objects.unfinished().select_related("source", "target")
        if not engine.worker_alive(run.worker)
    ]
    marked = []
    for run in stale:
        n = MigrationRun.objects.filter(pk=run.pk, status=run.status).update(status=INTERRUPTED)
        if n == 1:
            run.status = INTERRUPTED
            marked.append(run)
    return marked


def workload_state(run):
    """Where the run's workload is now, host by host, as short sentences."""
    lines = []
    for host in (run.source, run.target):
        try:
            if run.kind == CONTAINER:
                with Engine(host) as engine:
                    name = run.workload
                    found = engine.find_container(name)
                    if found:
                        state = found["State"]
                        lines.append(f"{host.name}: container {name} {state['Status']}")
                    else:
                        lines.append(f"{host.name}: no container {name}")
            else:
                pid = run.workload if host == run.source else run.result_workload
                if not pid:
                    lines.append(f"{host.name}: no restored process recorded")
                    continue
                with ssh.Connection(host) as conn:
                    alive = conn.run(["kill", "-0", pid], check=False).rc == 0
                lines.append(f"{host.name}: process {pid} {'running' if alive else 'not running'}")
        except (ssh.SSHError, EngineError) as e:
            lines.append(f"{host.name}: cannot check ({e})")
    return lines


def check_interrupted(runs):
    """Record the workload's state on both hosts for each interrupted run."""
    for run in runs:
        state = "; ".join(workload_state(run))
        run.error = f"interrupted: the server stopped during the run. Found: {state}"
        run.save(update_fields=["error"])


def recover_on_startup():
    """Mark stale runs interrupted now and check their workloads in the background."""
    runs = mark_interrupted()
    if runs:
        log.warning("%d run(s) were interrupted by a server stop", len(runs))
        _thread(check_interrupted, runs)
    return runs
