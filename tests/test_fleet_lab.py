"""A larger lab: `lab up --hosts 4`, and a fleet of runs on it.

The session's lab is grown to four hosts for this module and brought back
to two at its end (the last test checks that), so the other modules find
the lab they expect.
"""

import itertools
import json
import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.db import connection
from django.test import Client

from migrations_app import fleet as fleet_workloads
from migrations_app import inventory, lab, ssh
from migrations_app.docker_engine import Engine
from migrations_app.engine import plans
from migrations_app.models import CONTAINER, FINISHED, PROCESS, SUCCEEDED, Host, MigrationRun, TrustedPair
from migrations_app.runc import RUNTIME_NAME
from tests.support import wait_for, worker_pid

# Transactional, all three: the worker processes read what the test wrote,
# and pytest-django runs transactional tests after the others, so that the
# module's tests stay together and in order (grown, used, shrunk). Under
# pytest-xdist (`make test`: --dist loadgroup) the group keeps them on one
# worker, in order, on that worker's lab.
pytestmark = [pytest.mark.lab, pytest.mark.django_db(transaction=True), pytest.mark.xdist_group("fleet")]

FLEET = 4
NAMES = [f"lab-{i}" for i in range(1, FLEET + 1)]


def call(*args):
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.fixture(scope="module")
def fleet_lab(lab_up, django_db_blocker):
    """The session's lab with four hosts, for this module; two again after it."""
    with django_db_blocker.unblock():
        printed = call("lab", "up", "--hosts", str(FLEET))
    yield printed
    with django_db_blocker.unblock():
        lab.up(log=lambda *a: None, count=lab.DEFAULT_HOSTS)


def register_fleet():
    # Registered again for each test: transactional tests empty the tables when they end.
    for h in lab.hosts():
        lab.register(h)
    lab.trust_pair()
    return [Host.objects.get(name=name) for name in NAMES]


@pytest.fixture
def fleet(fleet_lab):
    return register_fleet()


def test_lab_up_hosts_builds_every_host_and_status_lists_them(fleet_lab, fleet):
    assert [line.split(":")[0] for line in fleet_lab.splitlines()] == NAMES
    status = json.loads(call("lab", "status", "--json"))
    assert [s["name"] for s in status] == NAMES
    assert all(s["sshd"] and s["dockerd"] for s in status), status
    assert len({s["address"] for s in status}) == FLEET
    for s, host in zip(status, fleet):
        assert (s["address"], s["user"], s["key"]) == (host.address, host.user, host.key_path)
        # SSH lands in that host's own network namespace, with its own engine.
        with ssh.Connection(host) as conn:
            netns = conn.run(["readlink", "/proc/self/ns/net"]).stdout.strip()
            assert conn.run(["printenv", "CRIUWEB_HOST"]).stdout.strip() == host.name
        assert netns == f"net:[{os.stat(Path('/run/netns') / s['netns']).st_ino}]"
        with Engine(host) as engine:
            info = engine.api.info()
            assert RUNTIME_NAME in info["Runtimes"], f"{host.name}: no {RUNTIME_NAME} runtime"
            assert info["ExperimentalBuild"], f"{host.name}: checkpoints are not enabled"
            assert {lab.IMAGE, lab.MEMHOG_IMAGE} <= {t for i in engine.api.images() for t in i["RepoTags"] or []}
    # Every pair is a trusted migration network, as lab-1 and lab-2 are.
    for one, other in itertools.combinations(fleet, 2):
        assert TrustedPair.between(one, other), f"{one} <-> {other} is not trusted"


# -- eight runs at once on four hosts -------------------------------------------------


def post_at_once(moves, user):
    """The migration form posted for every (workload, target) at once, each by its own client; the runs."""
    barrier = threading.Barrier(len(moves))

    def post(move):
        w, target = move
        client = Client()
        client.force_login(user)
        data = {"source": w.host.name, "target": target.name, "kind": w.kind,
                "strategy": plans.default_strategy(w.kind), "container" if w.kind == CONTAINER else "pid": w.ref}
        barrier.wait(timeout=60)
        try:
            response = client.post("/migrate/", data)
        finally:
            connection.close()  # this thread's own
        assert response.status_code == 302, f"{w.ref} -> {target}: {response.content.decode()[:3000]}"
        return MigrationRun.objects.get(code=response["Location"].rstrip("/").rsplit("/", 1)[1])

    with ThreadPoolExecutor(len(moves)) as pool:
        return list(pool.map(post, moves))


def test_eight_runs_at_once_on_four_hosts_each_run_once(fleet, operator, start_worker):
    """Two real workers; every host the source of two runs and the target of two, with the
    default limit of one run at a time as source and one as target, so that runs wait their turn."""
    hosts = fleet
    tag = f"fleet-{uuid.uuid4().hex[:6]}"
    for host in hosts:
        # Probed now, so that the eight posts do not each probe the hosts.
        assert inventory.probe(host)["ok"], host.capabilities
        assert (host.max_source_runs, host.max_target_runs) == (1, 1)
    workers = [start_worker(), start_worker()]
    for proc in workers:
        wait_for(lambda: "Starting worker" in proc.log.read_text() or proc.poll() is not None, 120,
                 f"worker {proc.pid} did not start")  # fmt: skip
        assert proc.poll() is None, proc.log.read_text()
    workloads = fleet_workloads.spread(hosts, 2 * FLEET, [CONTAINER, PROCESS], tag)
    try:
        moves = [(w, fleet_workloads.target(hosts, w)) for w in workloads]
        for host in hosts:
            assert sum(w.host == host for w, _ in moves) == 2 and sum(t == host for _, t in moves) == 2
        for w in workloads:
            wait_for(lambda: len(fleet_workloads.values(w)) >= 2, 30, f"{w.ref} did not start counting")
        runs = post_at_once(moves, operator)
        wait_for(lambda: all(r.status in FINISHED for r in _refreshed(runs)), 600, "the runs did not all end")
        for run in runs:
            assert run.status == SUCCEEDED, f"{run.source} -> {run.target} {run.workload}: {run.status}: {run.error}"
            assert run.created_by == operator  # launched by the form, as its user
        for w, target in moves:
            # Exactly one copy, on the target: every engine and the process table looked at.
            assert fleet_workloads.running_on(hosts, w) == [target.name], (w, target)
            fleet_workloads.moved(w, target)
            before = fleet_workloads.values(w)
            wait_for(lambda: len(fleet_workloads.values(w)) > len(before), 15, f"{w.ref}: the counter stopped")
            values = fleet_workloads.values(w)
            # A process counts into one file from start to end, a second copy would repeat values;
            # a container's log on the target starts where its checkpoint was.
            first = 0 if w.kind == PROCESS else values[0]
            assert values == list(range(first, first + len(values))), f"{w.ref}: {values}"
        check_one_worker_per_run(runs, workers)
        check_host_limits(runs, hosts)
    finally:
        fleet_workloads.stop_all(hosts, workloads)


def _refreshed(runs):
    for run in runs:
        run.refresh_from_db()
    return runs


def check_one_worker_per_run(runs, workers):
    """No run was executed by two workers, as the runs and the queue record it."""
    from django_tasks_db.models import DBTaskResult

    pids = {proc.pid for proc in workers}
    tasks = list(DBTaskResult.objects.filter(task_path="migrations_app.worker.execute_run"))
    for run in runs:
        assert worker_pid(run) in pids, f"{run.code}: executed by {run.worker}, not one of the workers {pids}"
        # A second execution would record its own phases: each step on each host once.
        steps = [(p.name, p.host) for p in run.phases.all()]
        assert len(steps) == len(set(steps)), f"{run.code}: phases recorded twice: {steps}"
        # Of the run's tasks (a run that found its hosts full was queued again), one executed it,
        # in one worker; the others found it taken, or its hosts full.
        mine = [t for t in tasks if t.args_kwargs["args"][0] == str(run.code)]
        executed = [t for t in mine if t.return_value == run.status]
        assert len(executed) == 1, f"{run.code}: {[(t.return_value, t.worker_ids) for t in mine]}"
        assert len(executed[0].worker_ids) == 1, executed[0].worker_ids
    # Both workers took their share.
    assert {worker_pid(run) for run in runs} == pids


def check_host_limits(runs, hosts):
    """Each host took one run at a time as source and one as target (the default limits): their times do not overlap."""
    for host in hosts:
        for role in ("source", "target"):
            mine = sorted((r for r in runs if getattr(r, f"{role}_id") == host.pk), key=lambda r: r.started)
            for before, after in zip(mine, mine[1:]):
                assert after.started >= before.finished, (
                    f"{host.name} was the {role} of {before.code} ({before.started} to {before.finished}) "
                    f"and of {after.code} (from {after.started}) at once"
                )


def test_lab_up_with_fewer_hosts_removes_the_rest(fleet_lab, fleet):
    """Last in this module: it brings the session's lab back to two hosts."""
    gone = [lab.host(i) for i in range(3, FLEET + 1)]
    pids = [lab._alive(p) for h in gone for p in (h.sshd_pid, h.dockerd_pid)]
    kept = [lab._alive(h.sshd_pid) for h in lab.HOSTS]
    assert all(pids) and all(kept)
    printed = call("lab", "up", "--hosts", "2")
    assert [line for line in printed.splitlines() if ": down" in line] == [
        f"{h.name}: down (the lab now has 2 hosts)" for h in gone
    ]
    assert [s["name"] for s in lab.status()] == ["lab-1", "lab-2"]
    for pid in pids:
        assert not lab.pid_running(pid), f"{pid} still runs"
    for h in gone:
        assert not Path(f"/run/netns/{h.netns}").exists() and not h.root.exists() and not h.run_dir.exists()
    assert not Host.objects.filter(name__in=[h.name for h in gone]).exists()
    # lab-1 and lab-2 were left alone: the same sshd, still answering.
    assert [lab._alive(h.sshd_pid) for h in lab.HOSTS] == kept
    with ssh.Connection(fleet[1]) as conn:
        assert conn.run(["printenv", "CRIUWEB_HOST"]).stdout.strip() == "lab-2"
