"""Real workers on the real lab: a worker killed in the middle of a run, and per-host limits.

The workers are `manage.py criuweb_worker` processes on the test database,
started here and stopped by their PID. Runs are queued the way the form
queues them (worker.submit).
"""

import signal
import subprocess
import sys
import time
import uuid

import pytest
from django.test import Client

from migrations_app import engine, lab, worker
from migrations_app.docker_engine import Engine
from migrations_app.engine.runner import TEST_PAUSE_ENV
from migrations_app.models import FINISHED, INTERRUPTED, PENDING, ROLLED_BACK, RUNNING, SUCCEEDED, MigrationRun, Stage
from tests.support import BASE_DIR, process_env, stop_worker, wait_for, worker_pid
from tests.test_faults_lab import assert_consecutive, running_copies, values

pytestmark = [pytest.mark.lab, pytest.mark.django_db(transaction=True)]

LEASE = 3  # seconds: short, so that a takeover comes soon after a worker dies
OTHER_MACHINE = "criuweb-test-other-machine"


def paused_line(proc, phase):
    return lambda: f"criuweb test pause: after {phase}" in proc.log.read_text()


def start_worker_elsewhere(tmp_path, **env):
    """A worker that sees itself on another machine: same kernel, its own host name (a UTS namespace).

    For it the workers on this machine are on another one, whose PIDs it
    may not look at: only their leases tell it when they are gone, as
    between two controllers. The PID stays the same (no PID namespace), so
    it is stopped by it like any other.
    """
    log = tmp_path / "worker-elsewhere.log"
    argv = ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', OTHER_MACHINE,
            sys.executable, "manage.py", "criuweb_worker", "--interval", "0.2", "--no-startup-delay"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, cwd=BASE_DIR, env=process_env(PYTHONUNBUFFERED=1, **env), stdout=out, stderr=subprocess.STDOUT)
    proc.log = log
    return proc


@pytest.mark.parametrize("phase", ["checkpoint", "transfer"])
def test_worker_killed_the_run_is_taken_over_after_its_lease(hosts, counter_container, start_worker, tmp_path, phase):
    lab1, lab2 = hosts
    name = counter_container
    first = start_worker(CRIUWEB_RUN_LEASE=LEASE, **{TEST_PAUSE_ENV: f"{phase}=120"})
    run = worker.submit(engine.create_run, lab1, lab2, "container", name, freeze_limit=300)
    wait_for(paused_line(first, phase), 120, f"the worker never reached {phase}: {first.log.read_text()}")
    second = start_worker_elsewhere(tmp_path, CRIUWEB_RUN_LEASE=LEASE)
    try:
        wait_for(lambda: "Starting worker" in second.log.read_text(), 60, "the second worker did not start")
        # While the first worker lives its lease holds, renewed by it, past LEASE seconds.
        time.sleep(2 * LEASE)
        run.refresh_from_db()
        assert run.status == RUNNING and worker_pid(run) == first.pid and run.stage == Stage.FROZEN
        with Engine(lab1) as eng:
            before = values(eng.logs(name))
        first.kill()  # SIGKILL, by its PID
        first.wait()
        # Done, and its outcome saved (the stage is stored first, the status last).
        run = wait_for(lambda: MigrationRun.objects.filter(pk=run.pk, stage=Stage.DONE).exclude(status=INTERRUPTED)
                       .first(), 120, f"not taken over: {second.log.read_text()}")
    finally:
        stop_worker(second)
    assert run.worker.startswith(OTHER_MACHINE + ":") and worker_pid(run) == second.pid
    assert f"PID {first.pid} on" in run.error, run.error  # the dead worker named
    assert run.status == ROLLED_BACK and "runs on lab-1 again" in run.error, run.error
    # Exactly one copy, on lab-1, its counter on from the checkpoint with nothing lost.
    assert running_copies(hosts, name) == ["lab-1"]
    with Engine(lab1) as eng:
        after = wait_for(lambda: (v := values(eng.logs(name))) and len(v) >= len(before) + 2 and v)
    assert_consecutive(after)
    with Engine(lab2) as eng:
        assert not eng.exists(name)


@pytest.fixture
def second_counter(hosts):
    name = f"counter-{uuid.uuid4().hex[:8]}"
    with Engine(hosts[0]) as eng:
        eng.run_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name)
        wait_for(lambda: len(eng.logs(name).split()) >= 2, message="counter did not start")
    yield name
    for host in hosts:
        with Engine(host) as eng:
            if eng.exists(name):
                eng.remove(name)


def test_a_second_run_from_a_full_host_waits_queued_then_succeeds(
    hosts, counter_container, second_counter, start_worker, admin_user
):
    lab1, lab2 = hosts
    assert (lab1.max_source_runs, lab2.max_target_runs) == (1, 1)  # the defaults
    # Two workers, so that only the host's limit can hold the second run back;
    # each run pauses after its checkpoint, long enough to look at the queue.
    workers = [start_worker(**{TEST_PAUSE_ENV: "checkpoint=3"}) for _ in range(2)]
    runs = [worker.submit(engine.create_run, lab1, lab2, "container", n) for n in (counter_container, second_counter)]
    first = wait_for(lambda: MigrationRun.objects.filter(status=RUNNING).first(), 60, "no run started")
    waiting = MigrationRun.objects.get(pk=next(r.pk for r in runs if r.pk != first.pk))
    assert waiting.status == PENDING and waiting.queue_position == 1
    client = Client()
    client.force_login(admin_user)
    assert "queued (position 1)" in client.get(f"/runs/{waiting.code}/").content.decode()
    assert "queued (position 1)" in client.get("/runs/").content.decode()
    done = [wait_for(lambda r=r: MigrationRun.objects.filter(pk=r.pk, status__in=FINISHED).first(), 120,
                     f"run did not finish: {[w.log.read_text() for w in workers]}") for r in runs]
    assert [r.status for r in done] == [SUCCEEDED, SUCCEEDED], [r.error for r in done]
    first, second = sorted(done, key=lambda r: r.started)
    assert second.started >= first.finished  # never both at once on lab-1
    assert {worker_pid(r) for r in done} <= {w.pid for w in workers}
    for name in (counter_container, second_counter):
        assert running_copies(hosts, name) == ["lab-2"]


def test_a_stalled_worker_whose_run_was_taken_over_does_not_act_when_it_resumes(
    hosts, counter_container, start_worker, tmp_path
):
    """SIGSTOP the worker after the transfer, past its lease: another machine's worker rolls the run back.

    When the first one resumes (SIGCONT), its next step would restore the
    container on lab-2 and its last save would overwrite the run: it must
    notice that the run is no longer its own and leave both alone.
    """
    from django_tasks_db.models import DBTaskResult

    lab1, lab2 = hosts
    name = counter_container
    first = start_worker(CRIUWEB_RUN_LEASE=LEASE, **{TEST_PAUSE_ENV: "transfer=8"})
    run = worker.submit(engine.create_run, lab1, lab2, "container", name, freeze_limit=300)
    wait_for(paused_line(first, "transfer"), 120, f"the worker never reached the transfer: {first.log.read_text()}")
    first.send_signal(signal.SIGSTOP)  # by its PID: a machine that froze, a VM paused
    second = start_worker_elsewhere(tmp_path, CRIUWEB_RUN_LEASE=LEASE)
    try:
        run = wait_for(lambda: MigrationRun.objects.filter(pk=run.pk, stage=Stage.DONE).exclude(status=INTERRUPTED)
                       .first(), 120, f"not taken over: {second.log.read_text()}")
        assert run.status == ROLLED_BACK and worker_pid(run) == second.pid, (run.status, run.error)
        first.send_signal(signal.SIGCONT)
        # The first worker's task ends once its runner has done whatever it does after the pause.
        task = next(t for t in DBTaskResult.objects.filter(task_path="migrations_app.worker.execute_run")
                    if t.args_kwargs["args"][0] == str(run.code))
        wait_for(lambda: DBTaskResult.objects.get(pk=task.pk).status != "RUNNING", 120,
                 f"the resumed worker did not end its task: {first.log.read_text()}")
    finally:
        first.send_signal(signal.SIGCONT)
        stop_worker(second)
    run.refresh_from_db()
    # Still the second worker's outcome: the resumed one saved nothing over it.
    assert run.status == ROLLED_BACK and worker_pid(run) == second.pid, (run.status, run.error, first.log.read_text())
    assert "lost" in first.log.read_text()  # it said why it stopped
    assert running_copies(hosts, name) == ["lab-1"]
    with Engine(lab1) as eng:
        before = values(eng.logs(name))
        after = wait_for(lambda: (v := values(eng.logs(name))) and len(v) >= len(before) + 2 and v)
    assert_consecutive(after)
    with Engine(lab2) as eng:
        assert not eng.exists(name)


def test_a_worker_told_to_stop_while_its_sweeper_rolls_a_run_back_finishes_the_rollback(
    hosts, counter_container, start_worker
):
    """SIGTERM stops a worker after the work in hand: the sweeper's recovery is work in hand too.

    The run's first worker is SIGKILLed after the checkpoint (the container
    frozen, its checkpoint taken); the second takes the run over at its start
    and gets SIGTERM as soon as it has. It must not exit with the container
    half rolled back.
    """
    lab1, lab2 = hosts
    name = counter_container
    first = start_worker(CRIUWEB_RUN_LEASE=LEASE, **{TEST_PAUSE_ENV: "checkpoint=120"})
    run = worker.submit(engine.create_run, lab1, lab2, "container", name, freeze_limit=300)
    wait_for(paused_line(first, "checkpoint"), 120, f"the worker never reached the checkpoint: {first.log.read_text()}")
    first.kill()  # SIGKILL, by its PID
    first.wait()
    second = start_worker(CRIUWEB_RUN_LEASE=LEASE)
    try:
        # Its sweeper claimed the run (a dead PID on this machine: at once).
        wait_for(lambda: MigrationRun.objects.filter(pk=run.pk, status=INTERRUPTED, worker__contains=f":{second.pid}:")
                 .exists(), 60, f"not taken over: {second.log.read_text()}")
        second.send_signal(signal.SIGTERM)  # by its PID
        second.wait(120)
    finally:
        stop_worker(second)
    run.refresh_from_db()
    assert run.stage == Stage.DONE and run.status == ROLLED_BACK, (run.status, run.stage, run.error, second.log.read_text())
    assert running_copies(hosts, name) == ["lab-1"]
