"""Real workloads on the lab: sockets, refusals before the freeze, volumes and
the target's configuration, each on real hosts with real CRIU and Docker."""

import os
import socket
import urllib.request
import uuid

import pytest

from migrations_app import lab, ssh
from migrations_app.docker_engine import Engine
from migrations_app.engine import MigrationError, create_run, execute
from migrations_app.models import CONTAINER, FAILED, PROCESS, SUCCEEDED, TCP_ESTABLISHED
from tests.support import wait_for

pytestmark = pytest.mark.lab

# A one-client-at-a-time echo server: what it does with a connection is
# what a peer sees of it. $1: the address to bind, $2: the port.
ECHO_SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
while True:
    c, _ = s.accept()
    try:
        while True:
            d = c.recv(100)
            if not d:
                break
            c.sendall(d)
    except OSError:
        pass
    c.close()
"""


def _free_port():
    # Any port works in the lab namespaces; a random one keeps parallel
    # sessions and reruns apart.
    return 20000 + uuid.uuid4().int % 20000


def _kill_tree(pid):
    # A restored tree lives under a namespace holder: kill both.
    try:
        ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return
    for p in (pid, ppid):
        if p > 1:
            try:
                os.kill(p, 9)
            except OSError:
                pass


@pytest.fixture
def started(hosts):
    """Start processes on lab-1 with start(script, arg); all killed at the end, wherever they went."""
    pids = []

    def start(script, *args):
        with ssh.Connection(hosts[0]) as conn:
            pid = int(
                conn.sh(
                    'setsid "$@" </dev/null >/dev/null 2>&1 & echo $!', *[str(a) for a in script], *map(str, args)
                ).stdout.strip()
            )
        pids.append(pid)
        return pid

    yield start, pids
    for pid in pids:
        _kill_tree(pid)


def _echo_server(start, address, port):
    pid = start(["python3", "-c", ECHO_SERVER], address, port)
    wait_for(lambda: _connects(lab.HOSTS[0].address, port), message="echo server did not start")
    return pid


def _connects(address, port):
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


def _echo(sock, text=b"ping\n"):
    sock.sendall(text)
    return sock.recv(100)


def _phase_names(run):
    return [p.name for p in run.phases.all()]


# -- sockets ------------------------------------------------------------------


def test_process_listening_socket_moves_and_answers_on_the_target(hosts, started):
    lab1, lab2 = hosts
    start, pids = started
    port = _free_port()
    pid = start(["python3", "-m", "http.server", "--bind", "0.0.0.0"], port)
    url = f"http://{lab.HOSTS[0].address}:{port}/"
    wait_for(lambda: _connects(lab.HOSTS[0].address, port), message="http.server did not start")
    assert urllib.request.urlopen(url, timeout=5).status == 200

    run = execute(create_run(lab1, lab2, PROCESS, pid))
    assert run.status == SUCCEEDED, run.error
    pids.append(int(run.result_workload))
    assert f"tcp 0.0.0.0:{port} listening" in run.phases.first().detail
    # It answers at the target's address, and no longer at the source's.
    target_url = f"http://{lab.HOSTS[1].address}:{port}/"
    assert urllib.request.urlopen(target_url, timeout=5).status == 200
    assert not _connects(lab.HOSTS[0].address, port)


def test_established_tcp_is_closed_by_default_and_the_client_told(hosts, started):
    lab1, lab2 = hosts
    start, pids = started
    port = _free_port()
    pid = _echo_server(start, "0.0.0.0", port)
    client = socket.create_connection((lab.HOSTS[0].address, port), timeout=10)
    assert _echo(client) == b"ping\n"

    run = execute(create_run(lab1, lab2, PROCESS, pid))
    assert run.status == SUCCEEDED, run.error
    pids.append(int(run.result_workload))
    assert run.tcp == "tcp-close"
    assert "ESTABLISHED" in run.phases.first().detail
    # The client learns its connection ended: end of file or a reset.
    try:
        client.sendall(b"after\n")
        answer = client.recv(100)
    except OSError as e:
        answer = e
    assert answer == b"" or isinstance(answer, ConnectionResetError | BrokenPipeError), answer
    client.close()
    # The server itself moved and takes new connections at the target's address.
    with socket.create_connection((lab.HOSTS[1].address, port), timeout=10) as again:
        assert _echo(again) == b"ping\n"


def test_keeping_tcp_of_a_host_process_is_refused_before_the_freeze(hosts, started):
    lab1, lab2 = hosts
    start, _ = started
    port = _free_port()
    pid = _echo_server(start, "0.0.0.0", port)
    with socket.create_connection((lab.HOSTS[0].address, port), timeout=10) as client:
        assert _echo(client) == b"ping\n"
        run = execute(create_run(lab1, lab2, PROCESS, pid, tcp=TCP_ESTABLISHED))
        assert run.status == FAILED
        assert "keeping established TCP connections needs their local address" in run.error, run.error
        assert lab.HOSTS[0].address in run.error
        assert "dump" not in _phase_names(run)
        # Untouched: the same connection still answers.
        assert _echo(client, b"still\n") == b"still\n"


def test_socket_bound_to_the_source_address_is_refused_before_the_freeze(hosts, started):
    lab1, lab2 = hosts
    start, _ = started
    port = _free_port()
    pid = _echo_server(start, lab.HOSTS[0].address, port)
    run = execute(create_run(lab1, lab2, PROCESS, pid))
    assert run.status == FAILED
    assert f"listens on {lab.HOSTS[0].address}, an address lab-2 does not have" in run.error, run.error
    assert "dump" not in _phase_names(run)
    assert _connects(lab.HOSTS[0].address, port)


# -- what must never be dumped ----------------------------------------------------


@pytest.mark.parametrize(
    "workload, message",
    [
        (" 12", "is not a PID"),
        ("12 ", "is not a PID"),
        ("", "Give the PID"),
        ("1", "PID 1 is the host's init"),
        ("0x10", "is not a PID"),
        ("-5", "is not a PID"),
    ],
)
def test_bad_pids_are_refused_at_once(hosts, workload, message):
    with pytest.raises(MigrationError, match=message):
        create_run(*hosts, PROCESS, workload)


def _lab1_sshd_pid():
    return int(lab.HOSTS[0].sshd_pid.read_text().strip())


@pytest.mark.parametrize(
    "which, message",
    [
        ("kthreadd", "PID 2 (kthreadd) is a kernel thread"),
        ("sshd", "is the host's own sshd"),
        ("dockerd", "is the host's own dockerd"),
        ("controller", "is criuweb's own process"),
    ],
)
def test_host_and_criuweb_processes_are_refused_before_the_freeze(hosts, which, message):
    pid = {
        "kthreadd": lambda: 2,
        "sshd": _lab1_sshd_pid,
        "dockerd": lambda: int(lab.HOSTS[0].dockerd_pid.read_text().strip()),
        # lab-1 is this machine, so this test's own process is criuweb's.
        "controller": os.getpid,
    }[which]()
    run = execute(create_run(*hosts, PROCESS, pid))
    assert run.status == FAILED
    assert message in run.error, run.error
    assert "dump" not in _phase_names(run)
    assert os.path.exists(f"/proc/{pid}")


def test_one_container_by_name_and_by_id_is_one_workload(hosts, counter_container):
    lab1, lab2 = hosts
    name = counter_container
    with Engine(lab1) as engine:
        cid = engine.inspect(name)["Id"]
    by_name = create_run(lab1, lab2, CONTAINER, name)
    by_id = create_run(lab1, lab2, CONTAINER, cid[:12])  # nothing yet tells them apart
    seen = {}

    def second_run_meanwhile(ctx):
        if "second" in seen:
            return
        # The first run resolved its container: asking for it again by id is refused at once ...
        with pytest.raises(MigrationError, match="already being migrated"):
            create_run(lab1, lab2, CONTAINER, cid)
        # ... and the run made before that is refused at its pre-flight, before any freeze.
        seen["second"] = execute(by_id)

    run = execute(by_name, after_phase={"pre-flight": second_run_meanwhile})
    second = seen["second"]
    assert second.status == FAILED and "already being migrated" in second.error, second.error
    assert "checkpoint" not in _phase_names(second)
    assert run.status == SUCCEEDED, run.error
    with Engine(lab2) as engine:
        assert engine.inspect(name)["State"]["Running"]
