"""Phase bookkeeping of execute(), on plans of plain functions.

These steps touch no host: what is under test is the engine's own logic
(order, timing, downtime, rollback and abort choices), which the lab tests
then exercise for real.
"""

import dataclasses
import time

import pytest

from migrations_app import engine
from migrations_app.engine import Measured, Plan, Step, plans
from migrations_app.models import CONTAINER, ENGINE, FAILED, ROLLED_BACK, SUCCEEDED, Host


@pytest.fixture
def run(db):
    a = Host.objects.create(name="a", address="10.0.0.1", key_path="/k")
    b = Host.objects.create(name="b", address="10.0.0.2", key_path="/k")
    return engine.create_run(a, b, CONTAINER, "web")


def plan(monkeypatch, steps, calls):
    def rollback(ctx):
        calls.append("rollback")
        return Measured(detail="back")

    def abort(ctx):
        calls.append("abort")

    install(monkeypatch, steps, rollback, abort)


@dataclasses.dataclass
class NoState:
    pass


def install(monkeypatch, steps, rollback, abort):
    """Put a plan of plain functions in the registry in place of the container plan."""
    monkeypatch.setitem(plans.PLANS, (CONTAINER, ENGINE), Plan(
        kind=CONTAINER, strategy=ENGINE, label="test", steps=tuple(steps), rollback=rollback, abort=abort,
        state=NoState,
    ))


def step(name, calls, sleep=0.0, fail=None, skip=False, nbytes=0, **flags):
    def fn(ctx):
        calls.append(name)
        time.sleep(sleep)
        if fail:
            raise engine.MigrationError(fail)
        return Measured(bytes=nbytes, criu_stats={"n": 1}, detail=name)

    def needed(ctx):
        calls.append(f"{name}?")
        return False

    return Step(name, flags.pop("side", "source"), fn, when=needed if skip else None, **flags)


def test_phases_are_recorded_in_order_with_downtime(run, monkeypatch):
    calls = []
    plan(monkeypatch, [
        step("pre-flight", calls),
        step("skipped", calls, skip=True),
        step("freeze", calls, sleep=0.05, freezes=True),
        step("move", calls, nbytes=100, side="both", sleep=0.05),
        step("thaw", calls, resumes=True, nbytes=20, side="target"),
        step("after", calls, sleep=0.05),
    ], calls)
    engine.execute(run)
    run.refresh_from_db()
    assert run.status == SUCCEEDED and run.error == ""
    phases = list(run.phases.all())
    assert [p.name for p in phases] == ["pre-flight", "freeze", "move", "thaw", "after"]
    assert [p.seq for p in phases] == [0, 1, 2, 3, 4]
    assert [p.host for p in phases] == ["a", "a", "a -> b", "b", "a"]
    assert run.total_bytes == 120
    # Downtime: from the freezing step's action (after its stage write) to
    # the end of "thaw", nothing of "after".
    freeze, move, thaw, after = phases[1:]
    assert 50 + move.duration_ms + thaw.duration_ms <= run.downtime_ms
    assert run.downtime_ms <= freeze.duration_ms + move.duration_ms + thaw.duration_ms + 1000
    assert run.downtime_ms <= (after.started - freeze.started).total_seconds() * 1000 + 1
    for earlier, later in zip(phases, phases[1:]):
        assert earlier.ended <= later.started
    assert all(p.status == "ok" for p in phases)
    assert calls == ["pre-flight", "skipped?", "freeze", "move", "thaw", "after"]


def test_failure_after_freeze_rolls_back(run, monkeypatch):
    calls = []
    plan(monkeypatch, [
        step("pre-flight", calls),
        step("freeze", calls, freezes=True),
        step("move", calls, fail="b: disk full"),
        step("thaw", calls, resumes=True),
    ], calls)
    engine.execute(run)
    run.refresh_from_db()
    assert run.status == ROLLED_BACK
    assert run.error == "b: disk full"
    assert calls == ["pre-flight", "freeze", "move", "rollback"]
    phases = list(run.phases.all())
    assert [(p.name, p.status) for p in phases] == [
        ("pre-flight", "ok"), ("freeze", "ok"), ("move", "failed"), ("rollback", "ok"),
    ]
    assert phases[2].detail == "b: disk full"
    assert run.downtime_ms is not None  # the workload was stopped until the rollback


def test_failure_before_freeze_only_aborts(run, monkeypatch):
    calls = []
    plan(monkeypatch, [step("pre-flight", calls, fail="a: criu check fails"), step("freeze", calls, freezes=True)],
         calls)
    engine.execute(run)
    run.refresh_from_db()
    assert run.status == FAILED
    assert run.error == "a: criu check fails"
    assert calls == ["pre-flight", "abort"]
    assert run.downtime_ms is None


def test_unexpected_exception_still_rolls_back(run, monkeypatch):
    calls = []

    def boom(ctx):
        raise KeyError("State")

    plan(monkeypatch, [step("freeze", calls, freezes=True), Step("verify", "target", boom)], calls)
    engine.execute(run)
    run.refresh_from_db()
    assert run.status == ROLLED_BACK
    assert run.error == "'State'"
    assert calls == ["freeze", "rollback"]


def test_failed_rollback_is_said_plainly(run, monkeypatch):
    calls = []

    def rollback(ctx):
        raise engine.MigrationError("a: criu restore failed")

    install(monkeypatch, [step("freeze", calls, freezes=True), step("move", calls, fail="b: gone")], rollback,
            lambda ctx: None)
    engine.execute(run)
    run.refresh_from_db()
    assert run.status == FAILED
    assert run.error == "b: gone; rollback failed: a: criu restore failed"


def test_failure_after_verification_does_not_roll_back(run, monkeypatch):
    calls = []
    plan(monkeypatch, [
        step("freeze", calls, freezes=True),
        step("thaw", calls, resumes=True),
        step("verify", calls, commits=True),
        step("cleanup", calls, fail="a: ssh connection lost"),
    ], calls)
    engine.execute(run)
    run.refresh_from_db()
    assert run.status == SUCCEEDED
    assert run.error == "the workload runs on b, but afterwards: a: ssh connection lost"
    assert calls == ["freeze", "thaw", "verify", "cleanup"]  # no rollback of a verified copy
    assert [p.status for p in run.phases.all()] == ["ok", "ok", "ok", "failed"]


def test_interrupt_while_frozen_rolls_back_then_stops(run, monkeypatch):
    calls = []

    def interrupted(ctx):
        raise KeyboardInterrupt

    plan(monkeypatch, [step("freeze", calls, freezes=True), Step("move", "both", interrupted)], calls)
    with pytest.raises(KeyboardInterrupt):
        engine.execute(run)
    run.refresh_from_db()
    assert run.status == ROLLED_BACK
    assert calls == ["freeze", "rollback"]
    assert [(p.name, p.status) for p in run.phases.all()] == [("freeze", "ok"), ("move", "failed"), ("rollback", "ok")]


def test_image_bytes_are_kept_apart(run, monkeypatch):
    calls = []
    plan(monkeypatch, [
        Step("ship image", "both", lambda ctx: Measured(bytes=5000), workload_bytes=False),
        step("move", calls, nbytes=300),
    ], calls)
    engine.execute(run)
    run.refresh_from_db()
    assert (run.total_bytes, run.image_bytes) == (300, 5000)


def test_a_run_is_claimed_once(run):
    assert engine.claim(run)
    assert not engine.claim(run)
    with pytest.raises(engine.MigrationError, match="already started"):
        run.status = "pending"
        engine.execute(run)


def test_one_migration_per_workload(run):
    with pytest.raises(engine.MigrationError, match="web on a is already being migrated"):
        engine.create_run(run.source, run.target, CONTAINER, "web")


@pytest.mark.parametrize(
    "kind, workload, message",
    [
        ("container", "  ", "'  ' is not a container name"),
        ("container", "", "Name a container"),
        ("container", "web\n", "is not a container name"),
        ("process", "12ab", "'12ab' is not a PID"),
        ("process", " 12", "' 12' is not a PID"),
        ("process", "1", "PID 1 is the host's init"),
    ],
)
def test_bad_workloads_are_refused(db, kind, workload, message):
    a = Host.objects.create(name="a", address="10.0.0.1", key_path="/k")
    b = Host.objects.create(name="b", address="10.0.0.2", key_path="/k")
    with pytest.raises(engine.MigrationError, match=message):
        engine.create_run(a, b, kind, workload)
    with pytest.raises(engine.MigrationError, match="different hosts"):
        engine.create_run(a, a, kind, "12")
