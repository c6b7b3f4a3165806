"""What the database itself guarantees, on SQLite and on PostgreSQL alike.

`make test` runs this file twice: on SQLite, and with CRIUWEB_TEST_DB=postgres
on a throwaway PostgreSQL server (docs/testing.md). The races use real
threads and processes, each with its own database connection, so that the
database (not Python) decides who wins.
"""

import multiprocessing
import os
import re
import threading
from collections import Counter

import pytest
from django.db import IntegrityError, connection, connections, transaction

from migrations_app import engine, worker
from migrations_app.engine import lifecycle
from migrations_app.models import CONTAINER, FAILED, PENDING, PROCESS, RUNNING, SUCCEEDED, Host, MigrationRun
from tests.support import wait_for, worker_pid

RACERS = 6


@pytest.fixture
def two_hosts(transactional_db):
    # transactional_db: the racing threads and processes see only committed rows.
    return (
        Host.objects.create(name="a", address="10.0.0.1", key_path="/k"),
        Host.objects.create(name="b", address="10.0.0.2", key_path="/k"),
    )


def test_the_backend_is_the_one_asked_for(db):
    # The PostgreSQL pass must not quietly run on SQLite.
    asked = os.environ.get("CRIUWEB_TEST_DB", "sqlite")
    assert connection.vendor == {"sqlite": "sqlite", "postgres": "postgresql"}[asked]


def active(source, target, workload="web", kind=CONTAINER, status=PENDING, workload_id=""):
    with transaction.atomic():
        return MigrationRun.objects.create(
            source=source, target=target, kind=kind, workload=workload, status=status, workload_id=workload_id
        )


def test_the_database_refuses_a_second_active_run_on_a_workload(two_hosts):
    a, b = two_hosts
    first = active(a, b)
    # Below create_run's own check: the partial unique index alone.
    for status in (PENDING, RUNNING):
        with pytest.raises(IntegrityError):
            active(a, b, status=status)
    # Not the same workload: another kind, another source, another name.
    active(a, b, kind=PROCESS)
    active(b, a)
    active(a, b, workload="db")
    # Finished runs do not count: the workload may move again.
    MigrationRun.objects.filter(pk=first.pk).update(status=SUCCEEDED)
    active(a, b)
    assert MigrationRun.objects.filter(source=a, kind=CONTAINER, workload="web").count() == 2


def test_one_container_named_two_ways_is_refused_before_any_freeze(two_hosts):
    a, b = two_hosts
    by_name = engine.create_run(a, b, CONTAINER, "web")
    by_id = engine.create_run(a, b, CONTAINER, "3f2a")  # the same container, by an id prefix
    full_id = "3f2a" + "0" * 60
    lifecycle.claim_workload(by_name, full_id)
    with pytest.raises(engine.MigrationError, match="already being migrated .by another run, by another name."):
        lifecycle.claim_workload(by_id, full_id)
    by_id.refresh_from_db()
    assert by_id.workload_id == ""
    # Once the first run is over, the id is free again.
    MigrationRun.objects.filter(pk=by_name.pk).update(status=SUCCEEDED)
    lifecycle.claim_workload(by_id, full_id)
    assert MigrationRun.objects.get(pk=by_id.pk).workload_id == full_id


def race(target, count=RACERS):
    """Run target(i) in count threads released at once; their results (or exceptions) in order."""
    barrier = threading.Barrier(count, timeout=30)
    results = [None] * count

    def racer(i):
        try:
            # Connect before the barrier: the race is between queries, not connection set-ups.
            connection.ensure_connection()
            barrier.wait()
            results[i] = target(i)
        except Exception as e:  # noqa: BLE001 - reported as a result and asserted on
            results[i] = e
        finally:
            connection.close()

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a racing thread hangs"
    return results


def test_racing_create_runs_make_one_run(two_hosts):
    a, b = two_hosts
    results = race(lambda i: engine.create_run(a, b, CONTAINER, "web"))
    made = [r for r in results if isinstance(r, MigrationRun)]
    refused = [r for r in results if isinstance(r, engine.MigrationError)]
    # The losers get the form's message, not an IntegrityError.
    assert len(made) == 1 and len(refused) == RACERS - 1, results
    assert all("web on a is already being migrated" in str(e) for e in refused)
    assert list(MigrationRun.objects.values_list("pk", flat=True)) == [made[0].pk]


def test_racing_threads_claim_a_run_once(two_hosts):
    a, b = two_hosts
    pk = engine.create_run(a, b, CONTAINER, "web").pk
    # Each thread holds its own copy of the pending run, as separate workers would.
    results = race(lambda i: engine.claim(MigrationRun.objects.get(pk=pk)))
    assert sorted(results, key=str) == [False] * (RACERS - 1) + [True], results
    run = MigrationRun.objects.get(pk=pk)
    assert run.status == RUNNING and run.worker == engine.worker_id()


def _claim_in_a_process(pk, barrier, results):
    # A forked child: its own connection (the parent closed its own before the fork).
    try:
        run = MigrationRun.objects.get(pk=pk)
        barrier.wait()
        results.put((lifecycle.worker_id(), engine.claim(run)))
    finally:
        connections.close_all()


def test_racing_processes_claim_a_run_once(two_hosts):
    a, b = two_hosts
    pk = engine.create_run(a, b, CONTAINER, "web").pk
    ctx = multiprocessing.get_context("fork")  # the children keep the test database's settings
    barrier, results = ctx.Barrier(RACERS, timeout=30), ctx.Queue()
    connections.close_all()  # never share a connection with a child
    procs = [ctx.Process(target=_claim_in_a_process, args=(pk, barrier, results)) for _ in range(RACERS)]
    for p in procs:
        p.start()
    try:
        outcomes = [results.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():  # stopped by its own PID, never by name
                p.kill()
                p.join()
    winners = [worker for worker, won in outcomes if won]
    assert len(winners) == 1 and len(outcomes) == RACERS, outcomes
    run = MigrationRun.objects.get(pk=pk)
    # The run names the one process that won, not one of the losers.
    assert run.status == RUNNING and run.worker == winners[0]


def test_racing_queue_claims_take_each_task_once(two_hosts):
    """The workers' queue claim, as django-tasks-db's db_worker makes it, raced by threads.

    SELECT ... FOR UPDATE SKIP LOCKED on PostgreSQL, an exclusive transaction
    on SQLite: more claimants than tasks, released at once, each task goes
    to one claimant and the others find none.
    """
    from django_tasks import TaskResultStatus
    from django_tasks_db.models import DBTaskResult
    from django_tasks_db.utils import exclusive_transaction

    a, b = two_hosts
    for i in range(RACERS // 2):
        worker.submit(engine.create_run, a, b, CONTAINER, f"web{i}")
    tasks = DBTaskResult.objects.filter(task_path="migrations_app.worker.execute_run")

    def claim_one(i):
        # db_worker's own claim step (django_tasks_db/management/commands/db_worker.py).
        with exclusive_transaction():
            task = DBTaskResult.objects.ready().get_locked()
            if task is not None:
                task.claim(f"racer-{i}")
        return task and str(task.id)

    results = race(claim_one)
    assert not [r for r in results if isinstance(r, Exception)], results
    claimed = [r for r in results if r]
    assert sorted(claimed) == sorted(str(t.id) for t in tasks), results
    assert results.count(None) == RACERS - len(claimed), results
    # Each task names the one claimant that got it.
    owners = {str(t.id): t.worker_ids for t in tasks}
    assert all(t.status == TaskResultStatus.RUNNING for t in tasks)
    assert owners == {task_id: [f"racer-{results.index(task_id)}"] for task_id in claimed}


def test_racing_workers_take_each_queued_run_once(two_hosts, start_worker):
    """The workers' queue: real worker processes polling one queue take each task once.

    django-tasks-db claims a task with SELECT ... FOR UPDATE SKIP LOCKED on
    PostgreSQL and in an exclusive transaction on SQLite; a task taken twice
    would start twice, and each start is a line in its worker's log.
    """
    a, b = two_hosts
    # Room for every run at once: what races here is the queue, not the hosts' places.
    Host.objects.update(max_source_runs=10, max_target_runs=10)
    procs = [start_worker() for _ in range(2)]
    # All polling the empty queue before the runs come, so that they race for them.
    for proc in procs:
        wait_for(lambda: "Starting worker" in proc.log.read_text(), 60, f"worker did not start: {proc.log}")
    with transaction.atomic():
        runs = [worker.submit(engine.create_run, a, b, CONTAINER, f"web{i}") for i in range(4)]
    from django_tasks import TaskResultStatus
    from django_tasks_db.models import DBTaskResult

    # Besides one task per run, a run that ends queues wake-ups for the runs
    # waiting for its hosts: tasks too, to be taken once each like the others.
    tasks = DBTaskResult.objects.filter(task_path="migrations_app.worker.execute_run")
    finished = [TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED]

    def drained():
        # Nobody listens on the hosts' port 1: each run fails in its
        # pre-flight, before anything is frozen, which is all this test needs.
        runs_done = MigrationRun.objects.filter(status=FAILED).count() == len(runs)
        return runs_done and not tasks.exclude(status__in=finished).exists()

    wait_for(drained, 90, "the workers did not drain the queue: " + " | ".join(p.log.name for p in procs))
    started = Counter()
    for proc in procs:
        started.update(re.findall(r"Task id=(\S+) path=\S+ state=RUNNING", proc.log.read_text()))
    assert started == Counter({str(t.id): 1 for t in tasks}), started
    assert all(t.status == TaskResultStatus.SUCCESSFUL and len(t.worker_ids) == 1 for t in tasks)
    pids = {p.pid for p in procs}
    assert all(worker_pid(run) in pids for run in MigrationRun.objects.all())
