"""The recovery's and the freeze limit's own logic, on plans of plain functions.

Nothing here touches a host: what is under test is which plan function a
stage leads to, what the run says afterwards, and that the watchdog ends a
blocked phase. tests/test_faults_lab.py makes the same faults happen for
real (a killed CLI, a stopped engine, a network cut).
"""

import dataclasses
import os
import socket
import threading

import pytest

from migrations_app import engine, ssh
from migrations_app.engine import Measured, Plan, Step, hostcheck, plans, recovery
from migrations_app.models import (
    CONTAINER,
    ENGINE,
    FAILED,
    INTERRUPTED,
    ROLLED_BACK,
    RUNNING,
    SUCCEEDED,
    Host,
    MigrationRun,
    Stage,
)


@dataclasses.dataclass
class State:
    checkpoint: str = ""
    moved: bool = False


@pytest.fixture
def hosts(db):
    return (Host.objects.create(name="a", address="10.0.0.1", key_path="/k"),
            Host.objects.create(name="b", address="10.0.0.2", key_path="/k"))


def dead_worker():
    boot = engine.worker_id().split(":")[1]
    return f"{socket.gethostname()}:{boot}:{2**22 + 4321}:1"


class Calls(list):
    def fn(self, name, result=None, fail=None):
        def f(ctx):
            self.append((name, ctx.stage.value, dataclasses.asdict(ctx.state)))
            if fail:
                raise engine.MigrationError(fail)
            return result

        return f


def install(monkeypatch, calls, steps=None, adopt=None, rollback_fails=None):
    steps = steps or (
        Step("freeze", "source", calls.fn("freeze"), freezes=True),
        Step("restore", "target", calls.fn("restore"), resumes=True),
        Step("verify", "target", calls.fn("verify"), commits=True),
        Step("cleanup", "both", calls.fn("cleanup")),
    )
    monkeypatch.setitem(plans.PLANS, (CONTAINER, ENGINE), Plan(
        kind=CONTAINER, strategy=ENGINE, label="test", steps=tuple(steps), state=State,
        rollback=calls.fn("rollback", Measured(detail="back"), fail=rollback_fails), abort=calls.fn("abort"),
        adopt=adopt,
    ))
    # Fresh connections are not what is under test here.
    monkeypatch.setattr(recovery, "connect", lambda host, kind: _NoConnection())


class _NoConnection:
    def close(self):
        pass

    def interrupt(self):
        pass


def stored_run(hosts, stage, status=RUNNING, worker=None):
    run = engine.create_run(hosts[0], hosts[1], CONTAINER, "web")
    MigrationRun.objects.filter(pk=run.pk).update(
        status=status, stage=stage, worker=worker if worker is not None else dead_worker(),
        state={"checkpoint": "cw-123", "moved": True},
    )
    run.refresh_from_db()
    return run


@pytest.mark.parametrize("stage, called, status, says", [
    (Stage.PREPARING, "abort", FAILED, "before anything was frozen. the container web runs on a as before"),
    (Stage.FROZEN, "rollback", ROLLED_BACK, "Recovered: the container web runs on a again ("),
    (Stage.RESTORING, "rollback", ROLLED_BACK, "restored from checkpoint cw-123"),
    (Stage.VERIFIED, "cleanup", SUCCEEDED, "runs on b (); the cleanup is finished"),
    (Stage.LEFTOVERS, "abort", ROLLED_BACK, "what the run left on b is removed"),
])
def test_each_stage_leads_to_its_action(hosts, monkeypatch, stage, called, status, says):
    calls = Calls()
    install(monkeypatch, calls)
    run = stored_run(hosts, stage)
    done = recovery.recover_all()
    assert [r.pk for r in done] == [run.pk]
    run.refresh_from_db()
    assert [c[0] for c in calls] == [called]
    # The plan function got the stored stage and state back, not defaults.
    assert calls[0][1] == stage.value and calls[0][2] == {"checkpoint": "cw-123", "moved": True}
    assert run.status == status and run.stage == Stage.DONE
    assert run.error.startswith("interrupted: the worker process that ran it (PID 4198625 on "), run.error
    assert says in run.error, run.error
    assert run.phases.get(name="recovery").status == "ok"


def test_a_copy_found_running_on_the_target_is_kept(hosts, monkeypatch):
    calls = Calls()
    install(monkeypatch, calls, adopt=lambda ctx: True)
    run = stored_run(hosts, Stage.RESTORING)
    recovery.recover_all()
    run.refresh_from_db()
    assert [c[0] for c in calls] == ["cleanup"]
    assert run.status == SUCCEEDED and "the copy restored on the target was found running and kept" in run.error


def test_a_failed_recovery_says_what_to_do(hosts, monkeypatch):
    calls = Calls()
    install(monkeypatch, calls, rollback_fails="a: criu restore failed")
    run = stored_run(hosts, Stage.FROZEN)
    recovery.recover_all()
    run.refresh_from_db()
    assert run.status == FAILED and run.stage == Stage.FROZEN
    assert "Recovery failed: a: criu restore failed." in run.error, run.error
    assert run.phases.get(name="recovery").status == "failed"
    # Left for a person (the run page's button), not retried at every start.
    assert recovery.recoverable(run)
    assert list(recovery.pending_recovery()) == []


def test_runs_at_work_are_left_alone(hosts, monkeypatch):
    calls = Calls()
    install(monkeypatch, calls)
    alive = engine.worker_id(os.getpid())
    stored_run(hosts, Stage.FROZEN, worker=alive)  # its worker (this process) still runs it
    assert recovery.recover_all() == []
    assert calls == []
    assert MigrationRun.objects.get().status == RUNNING


def test_a_run_is_recovered_once(hosts, monkeypatch):
    calls = Calls()
    install(monkeypatch, calls)
    run = stored_run(hosts, Stage.FROZEN, status=INTERRUPTED)
    stale = MigrationRun.objects.get(pk=run.pk)
    assert recovery.recover(run) is not None
    # Another process that read the run before: its claim fails.
    assert recovery.recover(stale) is None
    assert [c[0] for c in calls] == ["rollback"]


def test_freeze_limit_ends_a_blocked_phase(hosts, monkeypatch):
    calls = Calls()
    unblocked = threading.Event()

    class Conn(_NoConnection):
        # Stands for a connection to an engine that never answers: the lab
        # test stops a real dockerd; here the runner's bookkeeping is tested.
        def interrupt(self):
            unblocked.set()

    def freeze(ctx):
        ctx.src = Conn()

    def hang(ctx):
        if not unblocked.wait(30):
            raise AssertionError("never interrupted")
        raise engine.MigrationError("b: connection closed")

    install(monkeypatch, calls, steps=(
        Step("freeze", "source", freeze, freezes=True),
        Step("restore", "target", hang, resumes=True),
    ))
    run = engine.create_run(hosts[0], hosts[1], CONTAINER, "web", freeze_limit=0.5)
    engine.execute(run)
    run.refresh_from_db()
    assert run.status == ROLLED_BACK
    assert run.error == ("restore did not end within the freeze limit of 0.5 s (the workload stayed frozen that "
                         "long; its connections were closed): b: connection closed")
    assert [c[0] for c in calls] == ["rollback"]
    assert run.stage == Stage.DONE


def test_freeze_limit_grows_with_the_workload(hosts, settings):
    settings.FREEZE_LIMIT, settings.FREEZE_LIMIT_PER_GIB = 60, 30
    run = engine.create_run(hosts[0], hosts[1], CONTAINER, "web")
    run.expected_bytes = 2 * 2**30
    assert engine.runner.freeze_limit(run) == 120
    run.freeze_limit = 5
    assert engine.runner.freeze_limit(run) == 5
    with pytest.raises(engine.MigrationError, match="freeze limit must be between"):
        engine.create_run(hosts[0], hosts[1], CONTAINER, "other", freeze_limit=-1)


def test_recover_command_takes_one_run_or_all(hosts, monkeypatch):
    from io import StringIO

    from django.core.management import CommandError, call_command

    calls = Calls()
    install(monkeypatch, calls, rollback_fails="a: criu restore failed")
    run = stored_run(hosts, Stage.FROZEN)
    out = StringIO()
    with pytest.raises(CommandError, match="1 run\\(s\\) could not be recovered"):
        call_command("recover", stdout=out)
    assert f"run {run.code} (container web, a -> b): failed: " in out.getvalue()
    # A failed recovery is not taken again by the automatic one...
    out = StringIO()
    call_command("recover", stdout=out)
    assert out.getvalue() == "nothing to recover\n"
    # ... but is by name, once the cause is fixed.
    install(monkeypatch, calls)
    call_command("recover", "--run", str(run.code), stdout=StringIO())
    run.refresh_from_db()
    assert run.status == ROLLED_BACK and run.stage == Stage.DONE
    with pytest.raises(CommandError, match="has nothing to recover"):
        call_command("recover", "--run", str(run.code))
    with pytest.raises(CommandError, match="'nope' is not a run id"):
        call_command("recover", "--run", "nope")


def test_a_worker_recovers_at_start_and_takes_over_gone_runs(hosts, monkeypatch):
    from migrations_app import worker

    calls = Calls()
    install(monkeypatch, calls)
    run = stored_run(hosts, Stage.FROZEN)
    assert worker.sweep(startup=True) == [run]
    run.refresh_from_db()
    assert [c[0] for c in calls] == ["rollback"]
    assert run.status == ROLLED_BACK and run.stage == Stage.DONE
    assert "runs on a again" in run.error
    # Later sweeps take over the runs of workers gone since; a live one's run stays.
    gone = stored_run(hosts, Stage.VERIFIED)
    MigrationRun.objects.filter(pk=gone.pk).update(workload="other")
    alive = engine.create_run(hosts[0], hosts[1], CONTAINER, "third")
    MigrationRun.objects.filter(pk=alive.pk).update(status=RUNNING, stage=Stage.FROZEN,
                                                    worker=engine.worker_id(os.getpid()))
    assert [r.pk for r in worker.sweep()] == [gone.pk]
    assert [c[0] for c in calls] == ["rollback", "cleanup"]
    assert MigrationRun.objects.get(pk=alive.pk).status == RUNNING


@pytest.mark.django_db(transaction=True)
def test_recover_now_button(client, operator, viewer, worker_process):
    from django.test import Client

    from tests.support import wait_for

    a = Host.objects.create(name="a", address="10.0.0.1", key_path="/k")
    b = Host.objects.create(name="b", address="10.0.0.2", key_path="/k")
    # Never frozen, nothing prepared yet: its recovery touches no host.
    run = engine.create_run(a, b, "process", "4242")
    # A recovery that failed: left for a person (workers' sweeps leave it alone).
    MigrationRun.objects.filter(pk=run.pk).update(status=FAILED, stage=Stage.PREPARING, worker=dead_worker(),
                                                  error="interrupted. Recovery failed: b: unreachable")
    url = f"/runs/{run.code}/recover/"
    client.force_login(viewer)
    assert b"Recover now" not in client.get(f"/runs/{run.code}/").content
    assert client.post(url).status_code == 403
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(operator)
    assert strict.post(url).status_code == 403  # no CSRF token
    client.force_login(operator)
    assert b"Recover now" in client.get(f"/runs/{run.code}/").content
    assert client.get(url).status_code == 405
    assert client.post(url).status_code == 302
    # Recovered by the worker process, not by this one (the web's).
    # Done and saved: the stage is stored first, the outcome (with finished) last.
    run = wait_for(lambda: (r := MigrationRun.objects.get(pk=run.pk)).stage == Stage.DONE and r.finished and r, 60)
    assert run.status == FAILED and "before anything was frozen" in run.error
    assert int(run.worker.split(":")[2]) == worker_process.pid
    assert b"Recover now" not in client.get(f"/runs/{run.code}/").content


@pytest.mark.django_db(transaction=True)
def test_a_run_taken_over_by_another_worker_is_left_to_it(monkeypatch, settings):
    from tests.support import wait_for

    settings.RUN_LEASE = 0.6  # renewed every 0.2 s
    a = Host.objects.create(name="a", address="10.0.0.1", key_path="/k")
    b = Host.objects.create(name="b", address="10.0.0.2", key_path="/k")
    other = "another-machine:abcd:1:1"
    calls = Calls()

    def freeze(ctx):
        calls.append(("freeze", ctx.stage.value, {}))
        # What a worker on another machine does once this one's lease ran out.
        # Stands for a stall this process cannot have while it runs the test.
        MigrationRun.objects.filter(pk=ctx.run.pk).update(worker=other, status=INTERRUPTED)
        wait_for(lambda: ctx.lease.lost.is_set(), 10, "the lease thread did not notice")

    install(monkeypatch, calls, steps=(
        Step("freeze", "source", freeze, freezes=True),
        Step("restore", "target", calls.fn("restore"), resumes=True),
    ))
    run = engine.create_run(a, b, CONTAINER, "web")
    with pytest.raises(engine.runner.LeaseLostError, match="taken over by another worker after freeze"):
        engine.execute(run)
    # Neither the next step nor a rollback here, and the other worker's row as it wrote it.
    assert [c[0] for c in calls] == ["freeze"]
    row = MigrationRun.objects.get(pk=run.pk)
    assert (row.worker, row.status, row.stage) == (other, INTERRUPTED, Stage.FROZEN)


def test_not_resuming_on_the_source_says_how_to_finish(hosts, monkeypatch):
    # The real case (the target unreachable while its restore may be under
    # way) is caused on the lab by hand; here only the message is checked.
    install(monkeypatch, Calls())
    run = stored_run(hosts, Stage.RESTORING)
    ctx = engine.Context(run, plans.for_run(run))
    message = str(hostcheck.unsafe_to_resume(ctx, "b: cannot reach 10.0.0.2:22"))
    assert "not resuming on a, to avoid two copies" in message, message
    assert f"`manage.py recover --run {run.code}`" in message, message


def test_a_failed_rollback_says_how_to_finish_the_run(hosts, monkeypatch):
    # On the lab: the source's sshd killed during a runc checkpoint left the
    # container stopped there and the rollback unable to reach it; a stand-in
    # plan makes the same two failures here, as only the message is checked.
    calls = Calls()
    install(monkeypatch, calls, steps=(
        Step("freeze", "source", calls.fn("freeze"), freezes=True),
        Step("restore", "target", calls.fn("restore", fail="b: connection lost"), resumes=True),
    ))  # fmt: skip

    def unreachable(ctx):
        raise ssh.SSHError("a: cannot reach 10.0.0.1:22")

    plan = plans.PLANS[(CONTAINER, ENGINE)]
    monkeypatch.setitem(plans.PLANS, (CONTAINER, ENGINE), dataclasses.replace(plan, rollback=unreachable))
    run = engine.create_run(hosts[0], hosts[1], CONTAINER, "web")
    engine.execute(run)
    run.refresh_from_db()
    assert run.status == FAILED
    assert "rollback failed: a: cannot reach 10.0.0.1:22" in run.error, run.error
    assert f"`manage.py recover --run {run.code}`" in run.error, run.error


def test_a_rollback_that_finds_the_workload_ended_offers_no_retry(hosts, monkeypatch):
    calls = Calls()
    install(monkeypatch, calls, steps=(
        Step("freeze", "source", calls.fn("freeze"), freezes=True),
        Step("restore", "target", calls.fn("restore", fail="b: restored process 7 is not running"), resumes=True),
    ), rollback_fails="a: process 7 is gone; nothing to resume")  # fmt: skip
    run = engine.create_run(hosts[0], hosts[1], CONTAINER, "web")
    engine.execute(run)
    run.refresh_from_db()
    assert run.status == FAILED
    assert "recover --run" not in run.error, run.error


@pytest.mark.parametrize(
    "status, then",
    [
        (RUNNING, "move it once that run has ended"),
        (FAILED, "finish that run first (manage.py recover --run "),
    ],
)
def test_a_copy_still_restoring_is_found_and_the_refusal_says_what_to_do(hosts, status, then):
    # Runs whose copy may run on host b, undecided: one at work, and one
    # whose rollback failed (it waits for a person's `recover --run`).
    a, b = hosts
    first = MigrationRun.objects.create(
        source=a, target=b, kind=CONTAINER, workload="web", status=status, stage=Stage.RESTORING,
        state={"target_id": "f" * 64},
    )  # fmt: skip
    MigrationRun.objects.create(
        source=a, target=b, kind=CONTAINER, workload="other", status=SUCCEEDED, stage=Stage.DONE
    )
    second = MigrationRun.objects.create(source=b, target=a, kind=CONTAINER, workload="web", status=RUNNING)
    assert engine.lifecycle.restoring_here(second) == [first]
    with pytest.raises(engine.MigrationError) as e:
        engine.lifecycle.refuse_arriving(second, first, "container 'web'")
    assert f"b: container 'web' is the copy that run {first.code} is still restoring there from a" in str(e.value)
    assert then in str(e.value)
