import os
import socket

import pytest

from migrations_app import engine, worker
from migrations_app.models import CONTAINER, INTERRUPTED, RUNNING, SUCCEEDED, Host, MigrationRun


def make_run(source, target, status=RUNNING, worker_id="", kind=CONTAINER, workload="web"):
    return MigrationRun.objects.create(source=source, target=target, kind=kind, workload=workload,
                                       status=status, worker=worker_id)


@pytest.fixture
def two_hosts(db):
    return (Host.objects.create(name="a", address="10.0.0.1", key_path="/k"),
            Host.objects.create(name="b", address="10.0.0.2", key_path="/k"))


def test_runs_of_a_dead_worker_are_marked_interrupted(two_hosts):
    a, b = two_hosts
    here = socket.gethostname()
    parent = engine.worker_id(os.getppid())  # a live process: still working
    host, boot, pid, started = parent.split(":")
    dead = make_run(a, b, workload="w1", worker_id=f"{here}:{boot}:{2**22 + 12345}:1")  # no such PID
    reused = make_run(a, b, workload="w2", worker_id=f"{here}:{boot}:{pid}:{int(started) - 1}")  # PID reused
    rebooted = make_run(a, b, workload="w3", worker_id=f"{here}:00000000:{pid}:{started}")
    elsewhere = make_run(a, b, workload="w4", worker_id="another-machine:abcd:1:1")  # not ours to judge
    alive = make_run(a, b, workload="w5", worker_id=parent)
    done = make_run(a, b, workload="w6", status=SUCCEEDED, worker_id=f"{here}:{boot}:{2**22 + 12345}:1")
    marked = worker.mark_interrupted()
    assert {r.pk for r in marked} == {dead.pk, reused.pk, rebooted.pk}
    statuses = dict(MigrationRun.objects.values_list("pk", "status"))
    assert statuses == {dead.pk: INTERRUPTED, reused.pk: INTERRUPTED, rebooted.pk: INTERRUPTED,
                        elsewhere.pk: RUNNING, alive.pk: RUNNING, done.pk: SUCCEEDED}


def test_interrupted_message_names_the_dead_worker(two_hosts):
    a, b = two_hosts
    here = socket.gethostname()
    boot = engine.worker_id().split(":")[1]
    dead = make_run(a, b, workload="w1", worker_id=f"{here}:{boot}:{2**22 + 12345}:1")
    worker.mark_interrupted()
    dead.refresh_from_db()
    # Not "the server stopped": a killed CLI is no server.
    assert dead.error == (f"interrupted: the worker process that ran it (PID {2**22 + 12345} on {here}, "
                          f"worker {dead.worker}) is gone")


def test_a_run_whose_process_is_gone_blocks_nothing(two_hosts):
    a, b = two_hosts
    here = socket.gethostname()
    stale = make_run(a, b, workload="web", worker_id=f"{here}:{engine.worker_id().split(':')[1]}:{2**22 + 9}:1")
    run = engine.create_run(a, b, CONTAINER, "web")
    stale.refresh_from_db()
    assert stale.status == INTERRUPTED and run.status == "pending"
    # ... while a run claimed by a live process (this one) does block.
    assert engine.claim(run)
    with pytest.raises(engine.MigrationError, match="already being migrated"):
        engine.create_run(a, b, CONTAINER, "web")
