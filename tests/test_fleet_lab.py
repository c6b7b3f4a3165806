"""A larger lab: `lab up --hosts 4`, and a fleet of runs on it.

The session's lab is grown to four hosts for this module and brought back
to two at its end (the last test checks that), so the other modules find
the lab they expect.
"""

import itertools
import json
import os
import signal
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.db import connection
from django.test import Client

from migrations_app import inventory, lab, ssh
from migrations_app.benchmark import copies
from migrations_app.docker_engine import Engine
from migrations_app.engine import plans
from migrations_app.models import CONTAINER, FINISHED, PROCESS, SUCCEEDED, Host, MigrationRun, TrustedPair
from migrations_app.runc import RUNTIME_NAME
from tests.support import wait_for

# Transactional, all three: the worker processes read what the test wrote,
# and pytest-django runs transactional tests after the others, so that the
# module's tests stay together and in order (grown, used, shrunk).
pytestmark = [pytest.mark.lab, pytest.mark.django_db(transaction=True)]

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


@dataclass
class Move:
    """One workload of the fleet test and the run that moves it."""

    kind: str
    source: Host
    target: Host
    ref: str = ""  # container name or PID
    argv: list[str] = field(default_factory=list)  # a process's command line, unique to it
    counter: Path | None = None  # where a process counts
    code: str = ""  # the run's code, from the run page the form redirects to


def plan_moves(hosts):
    """Eight moves on four hosts: each host the source of two and the target of two, kinds mixed."""
    n = len(hosts)
    moves = []
    for i in range(2 * n):
        src = i % n
        dst = (src + 1 + i // n) % n  # the next host, then the one after it
        kind = CONTAINER if (i + i // n) % 2 == 0 else PROCESS
        moves.append(Move(kind, hosts[src], hosts[dst]))
    return moves


def start_workload(move, tag):
    if move.kind == CONTAINER:
        move.ref = f"fleet-{tag}"
        with Engine(move.source) as engine:
            engine.run_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], move.ref)
        return
    move.counter = settings.LAB_ROOT / f"fleet-{tag}.log"
    move.argv = ["sh", "-c", lab.PROCESS_COUNTER_SCRIPT, "sh", str(move.counter)]
    with ssh.Connection(move.source) as conn:
        move.ref = str(lab.start_process(conn, lab.PROCESS_COUNTER_SCRIPT, str(move.counter)))


def running_on(hosts, move):
    """Names of the hosts where the workload runs now: every engine, or this machine's process table."""
    if move.kind == CONTAINER:
        where = []
        for host in hosts:
            with Engine(host) as engine:
                found = engine.find_container(move.ref)
                if found and found["State"]["Running"]:
                    where.append(host.name)
        return where
    return sorted(lab.host_of_pid(pid) or f"PID {pid} outside the lab" for pid in copies(move.argv))


def counter(move):
    if move.kind == CONTAINER:
        with Engine(move.target) as engine:
            return lab.counter_values(engine.logs(move.ref))
    return lab.counter_values(move.counter.read_text())


def post_at_once(moves, user):
    """The migration form posted for every move at once, each by its own client; the runs' codes."""
    barrier = threading.Barrier(len(moves))

    def post(move):
        client = Client()
        client.force_login(user)
        data = {"source": move.source.name, "target": move.target.name, "kind": move.kind,
                "strategy": plans.default_strategy(move.kind)}  # fmt: skip
        data["container" if move.kind == CONTAINER else "pid"] = move.ref
        barrier.wait(timeout=60)
        try:
            response = client.post("/migrate/", data)
        finally:
            connection.close()  # this thread's own connection
        assert response.status_code == 302, f"{move.source} -> {move.target}: {response.content.decode()[:2000]}"
        return response["Location"].rstrip("/").rsplit("/", 1)[1]

    with ThreadPoolExecutor(len(moves)) as pool:
        for move, code in zip(moves, pool.map(post, moves)):
            move.code = code


def test_eight_runs_at_once_on_four_hosts_each_run_once(fleet, operator):
    hosts = fleet
    moves = plan_moves(hosts)
    assert {h.name: sum(m.source == h for m in moves) for h in hosts} == dict.fromkeys(NAMES, 2)
    assert {h.name: sum(m.target == h for m in moves) for h in hosts} == dict.fromkeys(NAMES, 2)
    for host in hosts:
        # Fresh probes now, so that the eight posts do not each probe the hosts.
        assert inventory.probe(host)["ok"], host.capabilities
    tag = uuid.uuid4().hex[:6]
    try:
        for i, move in enumerate(moves):
            start_workload(move, f"{tag}-{i}")
        for move in moves:
            wait_for(lambda: len(counter_on_source(move)) >= 2, 30, f"{move.ref} did not start counting")
        post_at_once(moves, operator)
        runs = {m.code: MigrationRun.objects.get(code=m.code) for m in moves}
        wait_for(
            lambda: all(r.status in FINISHED for r in _refreshed(runs.values())), 600,
            "the runs did not all end",
        )
        for move in moves:
            run = runs[move.code]
            assert run.status == SUCCEEDED, f"{run.source} -> {run.target} {run.workload}: {run.status}: {run.error}"
        for move in moves:
            # Exactly one copy, on the target: every engine and the process table looked at.
            assert running_on(hosts, move) == [move.target.name], move
            before = counter(move)
            wait_for(lambda: len(counter(move)) >= len(before) + 1, 15, f"{move.ref}: the counter stopped")
            values = counter(move)
            if move.kind == PROCESS:
                # One file from start to end: a second copy would repeat values.
                assert values == list(range(len(values))), f"{move.ref}: {values}"
            else:
                assert values == list(range(values[0], values[0] + len(values))), f"{move.ref}: {values}"
        check_one_worker_per_run(runs.values())
    finally:
        for move in moves:
            stop_workload(hosts, move)


def counter_on_source(move):
    if move.kind == CONTAINER:
        with Engine(move.source) as engine:
            return lab.counter_values(engine.logs(move.ref))
    return lab.counter_values(move.counter.read_text()) if move.counter.exists() else []


def _refreshed(runs):
    for run in runs:
        run.refresh_from_db()
    return runs


def check_one_worker_per_run(runs):
    """No run was executed by two workers, as far as the runs record it."""
    for run in runs:
        # A second execution would record its own phases: each step on each host once.
        steps = [(p.name, p.host) for p in run.phases.all()]
        assert len(steps) == len(set(steps)), f"{run.code}: phases recorded twice: {steps}"
        assert run.worker, f"{run.code}: no worker recorded"


def stop_workload(hosts, move):
    if move.kind == CONTAINER and move.ref:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(move.ref):
                    engine.remove(move.ref)
    elif move.argv:
        for pid in copies(move.argv):
            _kill_tree(pid)
        if move.counter:
            move.counter.unlink(missing_ok=True)


def _kill_tree(pid):
    # A restored process sits under a namespace holder (its parent, a
    # python3 that keeps the PID namespace): both go, by PID.
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        holder = ppid if ppid > 1 and Path(f"/proc/{ppid}/cmdline").read_bytes().startswith(b"python3") else 0
    except (OSError, ValueError, IndexError):
        holder = 0
    for p in (pid, holder):
        if p:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


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
