"""A larger lab: `lab up --hosts 4`, and a fleet of runs on it.

The session's lab is grown to four hosts for this module and brought back
to two at its end (the last test checks that), so the other modules find
the lab they expect.
"""

import itertools
import json
import os
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command

from migrations_app import lab, ssh
from migrations_app.docker_engine import Engine
from migrations_app.models import Host, TrustedPair
from migrations_app.runc import RUNTIME_NAME

pytestmark = pytest.mark.lab

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
def fleet(fleet_lab, db):
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


# The fleet of runs goes here (it needs the workers).


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
