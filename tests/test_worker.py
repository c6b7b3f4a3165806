"""Workers, leases and per-host limits, without the lab.

What is under test: which runs count as gone (dead PID here, lease run out
elsewhere), that a takeover and a claim are atomic between real processes,
that a host takes no more runs than its limits, the queue positions, and the
commands that queue runs. tests/test_workers_lab.py does the same with real
workers and workloads.
"""

import json
import os
import signal
import socket
import subprocess
import sys
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from migrations_app import engine, worker
from migrations_app.engine import lifecycle, recovery
from migrations_app.engine.lifecycle import Claim
from migrations_app.models import (
    CHECKPOINT,
    CONTAINER,
    FAILED,
    INTERRUPTED,
    PENDING,
    RUNNING,
    SUCCEEDED,
    Host,
    MigrationRun,
    Stage,
    queue_positions,
)
from tests.support import BASE_DIR, process_env, queued_runs, wait_for, worker_pid


def make_run(source, target, status=RUNNING, worker_id="", kind=CONTAINER, workload="web", lease=None, **fields):
    return MigrationRun.objects.create(source=source, target=target, kind=kind, workload=workload,
                                       status=status, worker=worker_id, lease_expires=lease, **fields)


def host(name, **fields):
    return Host.objects.create(name=name, address="127.0.0.1", ssh_port=1, key_path="/k", **fields)


@pytest.fixture
def two_hosts(db):
    return host("a"), host("b")


def dead_here():
    boot = engine.worker_id().split(":")[1]
    return f"{socket.gethostname()}:{boot}:{2**22 + 12345}:1"  # no such PID


def test_runs_of_a_dead_worker_are_marked_interrupted(two_hosts):
    a, b = two_hosts
    here = socket.gethostname()
    parent = engine.worker_id(os.getppid())  # a live process: still working
    host_, boot, pid, started = parent.split(":")
    now = timezone.now()
    dead = make_run(a, b, workload="w1", worker_id=dead_here())
    reused = make_run(a, b, workload="w2", worker_id=f"{here}:{boot}:{pid}:{int(started) - 1}")  # PID reused
    rebooted = make_run(a, b, workload="w3", worker_id=f"{here}:00000000:{pid}:{started}")
    # On another machine only the lease tells (that machine cannot be had
    # here: its worker is named, its PID is never looked at).
    leased = make_run(a, b, workload="w4", worker_id="another-machine:abcd:1:1", lease=now + timedelta(seconds=30))
    expired = make_run(a, b, workload="w7", worker_id="another-machine:abcd:2:1", lease=now - timedelta(seconds=1))
    no_lease = make_run(a, b, workload="w8", worker_id="another-machine:abcd:3:1")  # from before leases
    # A live worker here keeps its run even when its lease ran out (stalled, not gone).
    alive = make_run(a, b, workload="w5", worker_id=parent, lease=now - timedelta(seconds=60))
    done = make_run(a, b, workload="w6", status=SUCCEEDED, worker_id=dead_here())
    queued = make_run(a, b, workload="w9", status=PENDING)  # waits for a worker, not on one
    marked = recovery.mark_gone()
    assert {r.pk for r in marked} == {dead.pk, reused.pk, rebooted.pk, expired.pk}
    statuses = dict(MigrationRun.objects.values_list("pk", "status"))
    assert statuses == {dead.pk: INTERRUPTED, reused.pk: INTERRUPTED, rebooted.pk: INTERRUPTED,
                        expired.pk: INTERRUPTED, leased.pk: RUNNING, no_lease.pk: RUNNING, alive.pk: RUNNING,
                        done.pk: SUCCEEDED, queued.pk: PENDING}


def test_interrupted_message_names_the_dead_worker(two_hosts):
    a, b = two_hosts
    dead = make_run(a, b, workload="w1", worker_id=dead_here())
    recovery.mark_gone()
    dead.refresh_from_db()
    # Not "the server stopped": a killed CLI is no server.
    assert dead.error == (f"interrupted: the worker process that ran it (PID {2**22 + 12345} on "
                          f"{socket.gethostname()}, worker {dead.worker}) is gone")


def test_a_run_whose_process_is_gone_blocks_nothing(two_hosts):
    a, b = two_hosts
    stale = make_run(a, b, workload="web", worker_id=dead_here())
    run = engine.create_run(a, b, CONTAINER, "web")
    stale.refresh_from_db()
    assert stale.status == INTERRUPTED and run.status == PENDING
    # A queued run holds its workload ...
    with pytest.raises(engine.MigrationError, match="already being migrated"):
        engine.create_run(a, b, CONTAINER, "web")
    # ... and so does a run claimed by a live process (this one), once the
    # interrupted one, which holds its place on a until then, is recovered.
    assert not engine.claim(run)
    MigrationRun.objects.filter(pk=stale.pk).update(status=FAILED, stage=Stage.DONE)
    assert engine.claim(run)
    with pytest.raises(engine.MigrationError, match="already being migrated"):
        engine.create_run(a, b, CONTAINER, "web")


def test_a_takeover_is_made_once(two_hosts):
    a, b = two_hosts
    gone = make_run(a, b, worker_id="another-machine:abcd:1:1", lease=timezone.now() - timedelta(seconds=1),
                    stage=Stage.PREPARING)
    stale = MigrationRun.objects.get(pk=gone.pk)
    assert recovery._claim(gone)
    gone.refresh_from_db()
    assert gone.worker == engine.worker_id() and gone.status == INTERRUPTED and gone.lease_expires > timezone.now()
    # Another worker that read the run before: its conditional UPDATE changes nothing.
    assert not recovery._claim(stale)


# -- per-host limits ----------------------------------------------------------------------


def test_a_host_takes_runs_up_to_its_limits(db):
    a, b, c = host("a"), host("b"), host("c", max_target_runs=2)
    first = make_run(a, b, status=PENDING, workload="w1")
    second = make_run(a, c, status=PENDING, workload="w2")  # a is full as source
    third = make_run(b, c, status=PENDING, workload="w3")  # b is a target, not a source: free
    fourth = make_run(c, b, status=PENDING, workload="w4")  # b is full as target
    assert lifecycle.take(first) == Claim.CLAIMED
    assert lifecycle.take(second) == Claim.FULL
    assert lifecycle.take(third) == Claim.CLAIMED
    assert lifecycle.take(fourth) == Claim.FULL
    assert lifecycle.take(first) == Claim.TAKEN
    # Positions: 1 is next in line for its hosts; the fourth shares c with the second.
    waiting = [MigrationRun.objects.get(pk=r.pk) for r in (second, fourth)]
    queue_positions(waiting)
    assert [r.queue_position for r in waiting] == [1, 2]
    # An interrupted run still holds its place (its workload may be frozen) ...
    MigrationRun.objects.filter(pk=first.pk).update(status=INTERRUPTED)
    assert lifecycle.take(second) == Claim.FULL
    # ... until it is recovered.
    MigrationRun.objects.filter(pk=first.pk).update(status=FAILED, stage=Stage.DONE)
    assert lifecycle.take(second) == Claim.CLAIMED
    # c is full as target now (the second and the third); a takes a second run once allowed.
    d = host("d")
    fifth = make_run(a, d, status=PENDING, workload="w5")
    assert lifecycle.take(fifth) == Claim.FULL
    a.max_source_runs = 2
    a.save()
    assert lifecycle.take(fifth) == Claim.CLAIMED


def test_a_run_on_one_host_takes_a_place_as_source_only(db):
    a, b = host("a"), host("b")
    checkpoint = make_run(a, a, status=PENDING, workload="w1", operation=CHECKPOINT)
    incoming = make_run(b, a, status=PENDING, workload="w2")
    assert lifecycle.take(checkpoint) == Claim.CLAIMED
    assert lifecycle.take(incoming) == Claim.CLAIMED


def test_queue_positions_count_the_runs_ahead_for_the_same_hosts(db):
    a, b, c, d = host("a"), host("b"), host("c"), host("d")
    runs = [make_run(a, b, status=PENDING, workload="w1"), make_run(c, d, status=PENDING, workload="w2"),
            make_run(a, c, status=PENDING, workload="w3"), make_run(d, b, status=PENDING, workload="w4"),
            make_run(a, b, status=SUCCEEDED, workload="w5")]
    queue_positions(runs)
    assert [r.__dict__.get("queue_position") for r in runs] == [1, 1, 3, 3, None]
    assert MigrationRun.objects.get(pk=runs[2].pk).to_dict()["queue_position"] == 3


def test_the_run_pages_show_the_queue(client, operator):
    a, b = host("a"), host("b")
    make_run(a, b, workload="w1", worker_id=engine.worker_id())
    waiting = make_run(a, b, status=PENDING, workload="w2")
    client.force_login(operator)
    assert "queued (position 1)" in client.get("/runs/").content.decode()
    page = client.get(f"/runs/{waiting.code}/").content.decode()
    assert "queued (position 1)" in page
    assert "Recover now" not in page  # a worker will take it: nothing to recover
    assert client.get(f"/runs/{waiting.code}.json").json()["queue_position"] == 1


# -- claims between real processes ------------------------------------------------------------

CLAIM_SCRIPT = """
import os, sys, time, django
django.setup()
from migrations_app.engine import lifecycle
from migrations_app.models import MigrationRun
run = MigrationRun.objects.select_related("source", "target").get(pk=int(sys.argv[1]))
open(sys.argv[2] + ".ready." + str(os.getpid()), "w").close()
while not os.path.exists(sys.argv[2] + ".go"):
    time.sleep(0.005)
print(lifecycle.take(run).value, flush=True)
"""


def race(plan, tmp_path):
    """take() from several processes at once: plan is [(run, how many processes)]; the results by run pk.

    Each process starts Django and reads its run, then waits for the go file,
    so that their claims meet in the database at the same moment.
    """
    barrier = str(tmp_path / "race")
    procs = [(run.pk, subprocess.Popen([sys.executable, "-c", CLAIM_SCRIPT, str(run.pk), barrier], cwd=BASE_DIR,
                                       env=process_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
             for run, n in plan for _ in range(n)]
    try:
        wait_for(lambda: len(list(tmp_path.glob("race.ready.*"))) == len(procs) or any(
            p.poll() is not None for _, p in procs), 120, "the racing processes did not start")
        (tmp_path / "race.go").touch()
        results = {}
        for pk, proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            results.setdefault(pk, []).append(out.strip())
        return results
    finally:
        for _, proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.django_db(transaction=True)
def test_claims_between_processes_never_give_one_run_or_one_place_twice(tmp_path):
    a, b, c, d, e = host("a"), host("b"), host("c"), host("d"), host("e")
    # Three processes claim one run; four more race for a's last place as
    # source, two on each of two runs.
    one = make_run(d, e, status=PENDING, workload="w0")
    first, second = make_run(a, b, status=PENDING, workload="w1"), make_run(a, c, status=PENDING, workload="w2")
    results = race([(one, 3), (first, 2), (second, 2)], tmp_path)
    assert sorted(results[one.pk]) == ["claimed", "taken", "taken"], results
    for_a = results[first.pk] + results[second.pk]
    assert for_a.count("claimed") == 1 and set(for_a) <= {"claimed", "taken", "full"}, results
    running = MigrationRun.objects.filter(status=RUNNING)
    assert sorted(r.workload for r in running) in (["w0", "w1"], ["w0", "w2"])
    assert all(r.worker for r in running)


# -- the commands and the web queue, workers execute ---------------------------------------------


def test_migrate_workload_enqueue_prints_the_id(two_hosts):
    out, err = StringIO(), StringIO()
    call_command("migrate_workload", "--source", "a", "--target", "b", "--container", "web", "--enqueue", "--json",
                 stdout=out, stderr=err)
    data = json.loads(out.getvalue())
    run = MigrationRun.objects.get()
    assert data["id"] == str(run.code) and data["status"] == PENDING and data["queue_position"] == 1
    assert queued_runs() == [run]
    assert "a worker executes it: if none runs, start one (make worker" in err.getvalue()  # the web never will


def test_the_run_page_says_when_no_worker_takes_a_queued_run(client, operator):
    from django_tasks_db.models import DBTaskResult

    a, b = host("a"), host("b")
    run = worker.submit(engine.create_run, a, b, CONTAINER, "web")
    client.force_login(operator)
    assert "No worker has taken this run" not in client.get(f"/runs/{run.code}/").content.decode()  # just queued
    # A minute later with no worker: its task still due, taken by none.
    DBTaskResult.objects.update(enqueued_at=timezone.now() - timedelta(minutes=1))
    page = client.get(f"/runs/{run.code}/").content.decode()
    assert "No worker has taken this run for 6" in page and "make worker" in page
    # A task ready only later (the run's next look at full hosts) is not one a worker failed to take.
    DBTaskResult.objects.update(run_after=timezone.now() + timedelta(minutes=1))
    assert "No worker has taken this run" not in client.get(f"/runs/{run.code}/").content.decode()


def test_checkpoint_enqueue_prints_the_id(two_hosts):
    out = StringIO()
    call_command("checkpoint", "--host", "a", "--pid", "4242", "--enqueue", stdout=out)
    run = MigrationRun.objects.get()
    assert out.getvalue() == f"queued run {run.code}\n"
    assert run.operation == CHECKPOINT and queued_runs() == [run]


def test_a_run_waiting_for_its_host_is_woken_when_a_run_ends(db, settings):
    settings.QUEUE_RETRY = 3600  # only the wake-up can bring it
    a, b = host("a"), host("b")
    first = make_run(a, b, status=PENDING, workload="w1")
    second = make_run(a, b, status=PENDING, workload="w2")
    assert lifecycle.take(first) == Claim.CLAIMED
    assert worker.execute_run.call(str(second.code)) == "queued"
    MigrationRun.objects.filter(pk=first.pk).update(status=SUCCEEDED, stage=Stage.DONE)
    worker._wake(first)
    from django_tasks_db.models import DBTaskResult

    tasks = DBTaskResult.objects.filter(task_path="migrations_app.worker.execute_run")
    # Its own later look (in an hour), and the wake-up, ready now.
    assert [t.args_kwargs for t in tasks.ready()] == [{"args": [str(second.code)], "kwargs": {"retry": False}}]
    assert [t.args_kwargs for t in tasks.exclude(pk__in=tasks.ready())] == [
        {"args": [str(second.code)], "kwargs": {"retry": True}}]


@pytest.mark.django_db(transaction=True)
def test_a_worker_executes_what_the_web_queued_and_recovers_at_start(start_worker):
    # Hosts nobody listens for (port 1 on loopback): the run fails in its
    # pre-flight, before anything is frozen, which is all this test needs.
    a, b = host("a"), host("b")
    gone = make_run(a, b, workload="w0", worker_id=dead_here(), stage=Stage.PREPARING)
    run = worker.submit(engine.create_run, a, b, CONTAINER, "web")
    proc = start_worker()
    run = wait_for(lambda: MigrationRun.objects.filter(pk=run.pk, status=FAILED).first(), 60,
                   f"the worker did not execute the run: {proc.log.read_text()}")
    assert worker_pid(run) == proc.pid != os.getpid()
    assert "a:" in run.error or "a " in run.error, run.error
    # The queue's task names the same worker as the run.
    from django_tasks_db.models import DBTaskResult

    tasks = DBTaskResult.objects.filter(task_path="migrations_app.worker.execute_run")
    assert ([str(run.code)], [run.worker]) in [(t.args_kwargs["args"], t.worker_ids) for t in tasks]
    # The run its dead worker left: recovered by the new worker at its start.
    gone = wait_for(lambda: MigrationRun.objects.filter(pk=gone.pk, stage=Stage.DONE).exclude(status=INTERRUPTED).first(), 30,
                    f"not recovered: {proc.log.read_text()}")
    assert gone.status == FAILED and "before anything was frozen" in gone.error
    assert worker_pid(gone) == proc.pid


def cli(*args):
    return subprocess.Popen([sys.executable, "manage.py", "migrate_workload", *args], cwd=BASE_DIR, env=process_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_line(proc, text):
    """Read the process's standard error until a line holds text; return that line."""
    for line in proc.stderr:
        if text in line:
            return line
    raise AssertionError(f"never said {text!r}: {proc.communicate()}")


@pytest.mark.django_db(transaction=True)
def test_the_foreground_cli_waits_for_its_hosts_like_a_worker():
    a, b = host("a"), host("b")
    # a's one place as source, held by a live process (this one).
    holder = make_run(a, b, workload="w0", worker_id=engine.worker_id())
    stopped = cli("--source", "a", "--target", "b", "--pid", "4242")
    line = wait_line(stopped, "queued: position 1, waiting for a free place on a or b")
    assert line.strip() == "queued: position 1, waiting for a free place on a or b", line
    stopped.send_signal(signal.SIGINT)  # Ctrl-C while it waits: nothing done, nothing left to recover
    stopped.communicate(timeout=60)
    run = MigrationRun.objects.get(workload="4242")
    assert (run.status, run.stage, run.error) == (FAILED, Stage.DONE, "stopped while waiting in the queue")
    waiting = cli("--source", "a", "--target", "b", "--pid", "4343")
    wait_line(waiting, "queued: position 1")
    MigrationRun.objects.filter(pk=holder.pk).update(status=SUCCEEDED, stage=Stage.DONE)
    _, err = waiting.communicate(timeout=60)
    # Then claimed and executed by the CLI itself: its pre-flight finds nobody
    # listening on a (port 1 on loopback).
    assert waiting.returncode == 1, err
    run = MigrationRun.objects.get(workload="4343")
    assert run.status == FAILED and worker_pid(run) == waiting.pid, run.error
    assert queued_runs() == []  # never handed to the workers


def test_a_lease_is_renewed_after_the_database_dropped_its_connection(transactional_db, settings):
    """The server ends the lease thread's connection (as on a PostgreSQL restart or failover).

    Before, the thread kept using the dead connection: no renewal passed
    again, and the lease of a live run ran out under it (a takeover of a run
    still in progress).
    """
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("SQLite has no server that could drop a connection")
    settings.RUN_LEASE = 1  # renewed every 0.33 s
    a, b = host("a"), host("b")
    run = make_run(a, b, status=PENDING)
    assert lifecycle.claim(run)
    claimed = MigrationRun.objects.get(pk=run.pk).lease_expires
    with lifecycle.Lease(run):
        wait_for(lambda: MigrationRun.objects.get(pk=run.pk).lease_expires > claimed, 10, "never renewed")
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert cursor.fetchone()[0] >= 1  # the lease thread's connection among them
        after_drop = MigrationRun.objects.get(pk=run.pk).lease_expires
        wait_for(lambda: MigrationRun.objects.get(pk=run.pk).lease_expires > after_drop, 10,
                 "the lease was never renewed after its connection was dropped")


@pytest.mark.django_db(transaction=True)
def test_a_queued_run_whose_task_died_with_its_worker_is_queued_again(start_worker):
    from django_tasks_db.models import DBTaskResult

    a, b = host("a"), host("b")
    run = worker.submit(engine.create_run, a, b, CONTAINER, "web")
    # What a worker SIGKILLed between taking the run's task and claiming the
    # run leaves: the task "running" for good, the run queued. The window is
    # a few statements long and has no pause hook, too short to kill a real
    # worker in, so the task's row is written here as that worker left it.
    tasks = DBTaskResult.objects.filter(task_path="migrations_app.worker.execute_run")
    assert tasks.update(status="RUNNING", started_at=timezone.now() - timedelta(hours=1), worker_ids=[dead_here()]) == 1
    proc = start_worker()
    # Hosts nobody listens for: the run fails in its pre-flight once a worker executes it.
    run = wait_for(lambda: MigrationRun.objects.filter(pk=run.pk).exclude(status=PENDING).first(), 30,
                   f"the run stayed queued: {proc.log.read_text()}")
    assert worker_pid(run) == proc.pid


@pytest.mark.parametrize("skew", [-120, 120])
def test_leases_follow_the_database_clock_not_a_skewed_machine_clock(two_hosts, monkeypatch, skew):
    """Workers on machines whose clocks disagree by more than a lease.

    Behind, a worker wrote leases already run out (taken over at once while
    it worked); ahead, a sweeper saw every other machine's lease run out. The
    machine's clock cannot be set off for one process (it would move every
    other test's and helper's too), so this process's Python clock is.
    """
    a, b = two_hosts
    elsewhere = "another-machine:abcd:1:1"  # judged by its lease alone
    run = make_run(a, b, status=PENDING)
    assert lifecycle.reserve(run)  # the lease this (well-clocked) process writes
    run = MigrationRun.objects.get(pk=run.pk)
    MigrationRun.objects.filter(pk=run.pk).update(worker=elsewhere)
    run.worker = elsewhere
    real_now = timezone.now
    monkeypatch.setattr(timezone, "now", lambda: real_now() + timedelta(seconds=skew))
    assert not lifecycle.worker_gone(run)  # a live lease, whatever this machine's clock says
    assert lifecycle.lease_until() > real_now()  # and the leases it writes are live for the others
    assert [r.pk for r in recovery.mark_gone()] == []


def test_a_worker_on_another_machine_with_the_same_host_name_is_judged_by_its_lease(two_hosts):
    # Cloned VMs, "localhost" everywhere: the host name alone does not say the
    # worker is on this machine, where its PID could be looked at; the boot id does.
    a, b = two_hosts
    twin = f"{socket.gethostname()}:{'f' * 8}:{2**22 + 12345}:1"  # no such PID here, another kernel's boot
    assert twin.split(":")[1] != engine.worker_id().split(":")[1]
    run = make_run(a, b, worker_id=twin, lease=timezone.now() + timedelta(hours=1))
    assert not lifecycle.worker_gone(run)
    assert recovery.mark_gone() == []
    # Once its lease ran out, it is gone like any other machine's.
    MigrationRun.objects.filter(pk=run.pk).update(lease_expires=timezone.now() - timedelta(seconds=1))
    assert [r.pk for r in recovery.mark_gone()] == [run.pk]
