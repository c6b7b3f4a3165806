"""Real workloads on the lab: sockets, refusals before the freeze, volumes and
the target's configuration, each on real hosts with real CRIU and Docker."""

import os
import socket
import subprocess
import urllib.request
import uuid

import pytest
from django.conf import settings
from django.utils import timezone

from migrations_app import lab, ssh
from migrations_app.criu import CriuError
from migrations_app.docker_engine import Engine
from migrations_app.engine import Context, MigrationError, container_checks, create_run, execute, plans, tree
from migrations_app.engine.plans import container_engine
from migrations_app.models import (
    CONTAINER,
    ENGINE,
    FAILED,
    PROCESS,
    ROLLED_BACK,
    SUCCEEDED,
    TCP_ESTABLISHED,
    Host,
    MigrationRun,
)
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


def _assert_reset_then_served_on_lab2(client, port):
    """The client's connection was closed by the move; the server answers anew on lab-2."""
    try:
        client.sendall(b"after\n")
        answer = client.recv(100)
    except OSError as e:
        answer = e
    assert answer == b"" or isinstance(answer, ConnectionResetError | BrokenPipeError), answer
    client.close()
    with socket.create_connection((lab.HOSTS[1].address, port), timeout=10) as again:
        assert _echo(again) == b"ping\n"


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


BACKLOG_SERVER = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(16)
while True:  # never accepts: what clients open waits in the accept queue
    time.sleep(1)
"""


def test_connections_waiting_to_be_accepted_do_not_stop_a_server_moving(hosts, started):
    # A busy server has connections its kernel accepted and it has not yet
    # taken; CRIU refused to dump them ("In-flight connection") and the run
    # failed. They are dropped now, as a client whose handshake is lost
    # connects again; the server moves.
    lab1, lab2 = hosts
    start, pids = started
    port = _free_port()
    pid = start(["python3", "-c", BACKLOG_SERVER], "0.0.0.0", port)
    wait_for(lambda: _connects(lab.HOSTS[0].address, port), message="the server did not start")
    waiting = [socket.create_connection((lab.HOSTS[0].address, port), timeout=5) for _ in range(3)]
    try:
        run = execute(create_run(lab1, lab2, PROCESS, pid))
        assert run.status == SUCCEEDED, run.error
        pids.append(int(run.result_workload))
        assert _connects(lab.HOSTS[1].address, port)
    finally:
        for sock in waiting:
            sock.close()


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
    # Every kernel thread is PID 2's child: the causes shown are capped, not one per thread.
    assert run.error.count("; ") <= tree.REFUSALS_SHOWN, run.error
    assert "dump" not in _phase_names(run)
    assert os.path.exists(f"/proc/{pid}")


THREADED = (
    "import threading, time\nthreading.Thread(target=time.sleep, args=(10**6,), daemon=True).start()\n"
    "while True: time.sleep(0.01)\n"
)


def test_a_thread_id_is_refused_before_the_freeze(hosts, started):
    # /proc/TID exists for a thread as for a process; CRIU, pointed at one,
    # froze the tree and then failed on a BUG in pstree.c.
    start, _ = started
    pid = start(["python3", "-c", THREADED])
    wait_for(lambda: len(os.listdir(f"/proc/{pid}/task")) == 2, message="the thread did not start")
    tid = max(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    run = execute(create_run(*hosts, PROCESS, str(tid)))
    assert run.status == FAILED
    assert f"{tid} is a thread of process {pid}" in run.error, run.error
    assert "dump" not in _phase_names(run)
    assert open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("S", "R")


UNIX_SERVER = (
    "import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\ns.bind(sys.argv[1])\ns.listen()\n"
    "c = s.accept()\ntime.sleep(10**6)\n"
)
UNIX_CLIENT = (
    "import socket, sys, time\ns = socket.socket(socket.AF_UNIX)\ns.connect(sys.argv[1])\n"
    "open(sys.argv[2], 'w').close()\nwhile True: time.sleep(0.01)\n"
)


def test_a_unix_socket_to_outside_the_tree_is_refused_before_the_freeze(hosts, started, tmp_path):
    # CRIU froze the tree, then failed: "External socket is used".
    start, _ = started
    path = tmp_path / "sock"
    start(["python3", "-c", UNIX_SERVER], path)
    wait_for(lambda: path.exists(), message="the unix server did not start")
    pid = start(["python3", "-c", UNIX_CLIENT], path, tmp_path / "connected")
    wait_for(lambda: (tmp_path / "connected").exists(), message="the unix client did not connect")
    run = execute(create_run(*hosts, PROCESS, str(pid)))
    assert run.status == FAILED
    assert f"PID {pid} holds a unix socket connected to {path} outside the tree" in run.error, run.error
    assert "dump" not in _phase_names(run)
    assert open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("S", "R")


def test_a_process_inside_a_container_is_refused_before_the_freeze(hosts):
    # Its PID namespace is the container's, not one criuweb's holder made: the
    # dump ran nsenter into it and failed there ("failed to execute criu").
    lab1, _ = hosts
    name = f"child-{uuid.uuid4().hex[:8]}"
    with Engine(lab1) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", "sleep 100000 & wait"], name)
        init = engine.inspect(name)["State"]["Pid"]
    try:
        kids = wait_for(lambda: open(f"/proc/{init}/task/{init}/children").read().split(), message="no child")
        pid = int(kids[0])
        run = execute(create_run(*hosts, PROCESS, str(pid)))
        assert run.status == FAILED
        assert f"PID {pid} lives in the PID namespace of process {init} (a container?)" in run.error, run.error
        assert "dump" not in _phase_names(run)
        assert os.path.exists(f"/proc/{pid}")
    finally:
        with Engine(lab1) as engine:
            engine.remove(name)


def test_one_container_by_name_and_by_id_is_one_workload(hosts, counter_container):
    lab1, lab2 = hosts
    # Room for both runs at once (the default is one run per host as source
    # and one as target): otherwise the second waits in the queue and never
    # meets the first at pre-flight, which is what this test is about.
    Host.objects.filter(pk=lab1.pk).update(max_source_runs=2)
    Host.objects.filter(pk=lab2.pk).update(max_target_runs=2)
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


# -- containers -------------------------------------------------------------------


def _lacks_cap_sys_resource():
    # The lab hosts are this machine's namespaces: their root is ours.
    for line in open("/proc/self/status"):
        if line.startswith("CapEff:"):
            return not int(line.split()[1], 16) & (1 << 24)
    return True


@pytest.fixture
def containers(hosts):
    """Start containers on lab-1 with run(name_suffix, command, **create kwargs); removed from both hosts."""
    made, networks, volumes = [], [], []

    def run(command, host_config=None, networking_config=None, **kwargs):
        name = f"fid-{uuid.uuid4().hex[:8]}"
        with Engine(hosts[0]) as engine:
            cid = engine.api.create_container(
                lab.IMAGE, command, name=name, host_config=engine.api.create_host_config(**(host_config or {})),
                networking_config=networking_config, **kwargs,
            )["Id"]  # fmt: skip
            engine.api.start(cid)
            wait_for(lambda: engine.inspect(cid)["State"]["Running"], message="container did not start")
        made.append(name)
        return name

    yield run, networks, volumes
    for host in hosts:
        with Engine(host) as engine:
            for name in made:
                if engine.exists(name):
                    engine.remove(name)
            for v in volumes:
                if engine.volume(v):
                    engine.remove_volume(v)
            for n in networks:
                if engine.network(n):
                    engine.remove_network(n)


def _exec(host, name, command):
    with Engine(host) as engine:
        exec_id = engine.api.exec_create(engine.inspect(name)["Id"], command)["Id"]
        out = engine.api.exec_start(exec_id).decode()
        return out, engine.api.exec_inspect(exec_id)["ExitCode"]


HTTPD = "mkdir -p /www && echo hello-from-the-container > /www/index.html && exec httpd -f -p 8080 -h /www"


def test_container_with_a_published_port_moves_and_serves_there(hosts, containers):
    lab1, lab2 = hosts
    run_container, _, _ = containers
    port = _free_port()
    name = run_container(["sh", "-c", HTTPD], host_config={"port_bindings": {8080: port}}, ports=[8080])
    url = f"http://{lab.HOSTS[0].address}:{port}/"
    wait_for(lambda: _connects(lab.HOSTS[0].address, port), message="httpd did not start")
    assert b"hello-from-the-container" in urllib.request.urlopen(url, timeout=5).read()

    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == SUCCEEDED, run.error
    assert ":8080 listening" in run.phases.first().detail
    body = urllib.request.urlopen(f"http://{lab.HOSTS[1].address}:{port}/", timeout=5).read()
    assert b"hello-from-the-container" in body


def test_container_established_tcp_closed_and_the_client_told(hosts, containers):
    lab1, lab2 = hosts
    run_container, _, _ = containers
    port = _free_port()
    # nc -ll: listens again after each client; -e cat: echoes.
    name = run_container(["nc", "-ll", "-p", "8080", "-e", "cat"], host_config={"port_bindings": {8080: port}},
                         ports=[8080])  # fmt: skip
    wait_for(lambda: _connects(lab.HOSTS[0].address, port), message="nc did not start")
    client = socket.create_connection((lab.HOSTS[0].address, port), timeout=10)
    assert _echo(client) == b"ping\n"

    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == SUCCEEDED, run.error
    assert "established TCP connections will be closed" in run.phases.first().detail
    _assert_reset_then_served_on_lab2(client, port)


def test_named_volume_moves_with_its_data(hosts, containers):
    lab1, lab2 = hosts
    run_container, _, volumes = containers
    volume = f"fidvol-{uuid.uuid4().hex[:8]}"
    volumes.append(volume)
    name = run_container(
        ["sh", "-c", "echo kept-in-the-volume > /data/note; " + lab.COUNTER_SCRIPT],
        host_config={"binds": [f"{volume}:/data"]},
        volumes=["/data"],
    )
    wait_for(lambda: _exec(lab1, name, ["cat", "/data/note"])[0].strip() == "kept-in-the-volume")

    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == SUCCEEDED, run.error
    out, code = _exec(lab2, name, ["cat", "/data/note"])
    assert (out.strip(), code) == ("kept-in-the-volume", 0)
    assert run.volume_bytes > 0 and run.volume_bytes < run.total_bytes
    assert volume in run.phases.get(name="transfer").detail
    with Engine(lab1) as engine:
        assert engine.volume(volume) is None, "the source's copy of the volume should be gone"


def test_bind_mount_refused_before_the_freeze(hosts, containers, tmp_path):
    lab1, lab2 = hosts
    run_container, _, _ = containers
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT], host_config={"binds": [f"{tmp_path}:/data"]},
                         volumes=["/data"])  # fmt: skip
    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == FAILED
    assert f"bind mount {tmp_path} -> /data" in run.error, run.error
    assert "checkpoint" not in _phase_names(run)
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Running"]
    with Engine(lab2) as engine:
        assert not engine.exists(name)


def test_privileged_container_refused_unless_both_hosts_allow_it(hosts, containers):
    lab1, lab2 = hosts
    run_container, _, _ = containers
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT], host_config={"cap_add": ["NET_ADMIN"]})
    lab1.allow_privileged = True
    lab1.save()
    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == FAILED
    assert "it adds capabilities NET_ADMIN" in run.error and "'allow privileged workloads' on lab-2" in run.error, run.error
    assert "checkpoint" not in _phase_names(run)
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Running"]


def test_read_only_root_and_fixed_ip_on_a_new_network_arrive_as_they_were(hosts, containers):
    lab1, lab2 = hosts
    run_container, networks, _ = containers
    net = f"fidnet-{uuid.uuid4().hex[:6]}"
    third = 100 + uuid.uuid4().int % 100
    networks.append(net)
    with Engine(lab1) as engine:
        ipam = {"Config": [{"Subnet": f"172.31.{third}.0/24"}]}
        engine.api.create_network(net, driver="bridge", ipam=ipam)
        endpoint = engine.api.create_networking_config(
            {net: engine.api.create_endpoint_config(ipv4_address=f"172.31.{third}.50")}
        )
    name = run_container(
        ["sh", "-c", lab.COUNTER_SCRIPT],
        host_config={"read_only": True, "network_mode": net, "mem_limit": "96m", "pids_limit": 50,
                     "nano_cpus": 500_000_000, "restart_policy": {"Name": "on-failure", "MaximumRetryCount": 3},
                     "cap_drop": ["NET_RAW"]},
        networking_config=endpoint, environment={"FID": "yes"}, labels={"fid.label": "kept"},
        working_dir="/bin", hostname="fid-host",
    )  # fmt: skip
    _, code = _exec(lab1, name, ["touch", "/probe"])
    assert code != 0, "the source's root should be read-only"

    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == SUCCEEDED, run.error
    with Engine(lab2) as engine:
        c = engine.inspect(name)
        assert c["NetworkSettings"]["Networks"][net]["IPAddress"] == f"172.31.{third}.50"
        pid = c["State"]["Pid"]
    out, code = _exec(lab2, name, ["touch", "/probe"])
    assert code != 0 and "Read-only file system" in out, out
    root = [line.split() for line in open(f"/proc/{pid}/mountinfo") if line.split()[4] == "/"][-1]
    assert "ro" in root[5].split(",")
    assert "configuration as on the source" in run.phases.get(name="verify").detail
    # From inside, not from `docker inspect`: what the kernel holds for it.
    out, _ = _exec(lab2, name, ["sh", "-c", "echo $FID; pwd; hostname; grep CapEff /proc/self/status"])
    fid, cwd, hostname, capeff = out.split("\n")[:4]
    assert (fid, cwd, hostname) == ("yes", "/bin", "fid-host")
    assert not int(capeff.split()[1], 16) & (1 << 13), "NET_RAW (13) was dropped on the source"
    cgroups = dict(line.strip().split(":", 2)[1:] for line in open(f"/proc/{pid}/cgroup"))
    if "memory" in cgroups:  # cgroup v1, as on these machines
        memory = open(f"/sys/fs/cgroup/memory{cgroups['memory']}/memory.limit_in_bytes").read().strip()
        assert memory == str(96 * 1024 * 1024)
        assert open(f"/sys/fs/cgroup/pids{cgroups['pids']}/pids.max").read().strip() == "50"
    else:
        path = cgroups[""]
        assert open(f"/sys/fs/cgroup{path}/memory.max").read().strip() == str(96 * 1024 * 1024)
    with Engine(lab2) as engine:
        c = engine.inspect(name)
        assert c["HostConfig"]["RestartPolicy"] == {"Name": "on-failure", "MaximumRetryCount": 3}
        assert c["Config"]["Labels"]["fid.label"] == "kept"


@pytest.mark.parametrize("strategy", ["engine", "stop-and-copy"])
def test_a_container_that_exits_on_its_own_before_its_checkpoint_is_not_run_again(hosts, containers, strategy):
    lab1, lab2 = hosts
    run_container, _, _ = containers
    # It appends a line each time it starts: run again from its image, it would add a second.
    name = run_container(["sh", "-c", "echo started >> /started; while [ ! -e /stop ]; do sleep 0.1; done; exit 3"])

    def end_it(ctx):
        # After the target is prepared and before the freeze, as a job that finishes then would.
        _exec(lab1, name, ["touch", "/stop"])
        with Engine(lab1) as engine:
            wait_for(lambda: not engine.inspect(name)["State"]["Running"], message="the container did not exit")

    run = execute(create_run(lab1, lab2, CONTAINER, name, strategy=strategy), after_phase={"prepare target": end_it})
    assert run.status == FAILED
    assert "exited on its own (exit status 3)" in run.error, run.error
    with Engine(lab1) as engine:
        state = engine.inspect(name)["State"]
        assert not state["Running"] and state["ExitCode"] == 3, state
    with Engine(lab2) as engine:
        assert not engine.exists(name), "the target's prepared container stayed"


@pytest.mark.parametrize("strategy", ["engine", "page-server"])
def test_a_paused_container_is_refused_and_stays_paused(hosts, containers, strategy):
    lab1, lab2 = hosts
    run_container, _, _ = containers
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT])
    with Engine(lab1) as engine:
        engine.api.pause(name)

    run = execute(create_run(lab1, lab2, CONTAINER, name, strategy=strategy))
    assert run.status == FAILED
    assert f"container {name!r} is paused; unpause it first" in run.error, run.error
    assert "checkpoint" not in _phase_names(run)
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Paused"], "the operator's pause was undone"
        engine.api.unpause(name)  # the fixture's removal needs it running or stopped
    with Engine(lab2) as engine:
        assert not engine.exists(name)


def test_a_rm_container_is_refused_before_docker_s_checkpoint_removes_it(hosts, containers):
    lab1, lab2 = hosts
    run_container, _, _ = containers
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT], host_config={"auto_remove": True})

    run = execute(create_run(lab1, lab2, CONTAINER, name, strategy=ENGINE))
    assert run.status == FAILED
    assert "was started with --rm" in run.error, run.error
    assert "checkpoint" not in _phase_names(run)
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Running"]


def _ended(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("strategy", ["page-server", "lazy"])
def test_a_process_that_ends_before_its_dump_leaves_no_tmpfs_on_the_target(hosts, started, strategy):
    lab1, lab2 = hosts
    start, _ = started
    pid = start(["sleep", "600"])
    phase = "page server" if strategy == "page-server" else "prepare"

    def end_it(ctx):
        # It ends on its own between the target's set-up and the freeze.
        os.kill(pid, 9)
        wait_for(lambda: _ended(pid), message="the process did not end")

    run = execute(create_run(lab1, lab2, PROCESS, pid, strategy=strategy), after_phase={phase: end_it})
    assert run.status == FAILED, run.error
    assert f"process {pid} is gone" in run.error, run.error
    mounted = [line for line in open("/proc/self/mounts") if str(run.code) in line]
    assert not mounted, mounted


def test_a_container_gone_while_it_is_read_is_said_so_without_a_traceback(hosts):
    # A real PID that no longer exists on lab-1: what pre-flight meets when a
    # container stops on its own between its inspect and this read.
    gone = subprocess.Popen(["true"])
    gone.wait()
    with ssh.Connection(hosts[0]) as conn:
        with pytest.raises(MigrationError) as err:
            container_checks.inside(conn, gone.pid, "container fid-gone")
    assert str(err.value) == f"lab-1: container fid-gone stopped (its process {gone.pid} is gone)"


@pytest.mark.parametrize("strategy", ["engine", "stop-and-copy"])
def test_a_healthcheck_moves_with_its_container(hosts, containers, strategy):
    lab1, lab2 = hosts
    run_container, _, _ = containers
    health = {"Test": ["CMD-SHELL", "true"], "Interval": 2_000_000_000, "Retries": 3}
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT], healthcheck=health)

    run = execute(create_run(lab1, lab2, CONTAINER, name, strategy=strategy))
    assert run.status == SUCCEEDED, run.error
    with Engine(lab2) as engine:
        assert engine.inspect(name)["Config"].get("Healthcheck") == health
        # Docker runs it again on the target: the container turns healthy there.
        wait_for(lambda: (engine.inspect(name)["State"].get("Health") or {}).get("Status") == "healthy",
                 message="the healthcheck does not run on the target")  # fmt: skip


def test_user_container_refused_before_the_freeze_where_criu_cannot_dump_it(hosts, containers):
    lab1, lab2 = hosts
    run_container, _, _ = containers
    if not _lacks_cap_sys_resource():
        pytest.skip("root here has CAP_SYS_RESOURCE: CRIU can dump another user's tasks")
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT], user="1000:1000")
    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == FAILED
    assert "runs as user/group 1000" in run.error and "CAP_SYS_RESOURCE" in run.error, run.error
    assert "checkpoint" not in _phase_names(run)


def test_a_failed_docker_checkpoint_quotes_criu_s_log(hosts, containers):
    """Calls the checkpoint phase directly, past pre-flight, on a container
    pre-flight would refuse: a real CRIU failure inside Docker's checkpoint."""
    lab1, lab2 = hosts
    run_container, _, _ = containers
    if not _lacks_cap_sys_resource():
        pytest.skip("needs a host where CRIU cannot dump another user's tasks")
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT], user="1000:1000")
    plan = plans.get(CONTAINER, ENGINE)
    ctx = Context(create_run(lab1, lab2, CONTAINER, name), plan)
    try:
        ctx.src = Engine(lab1).__enter__()
        ctx.state.container = ctx.src.inspect(name)
        ctx.state.checkpoint = "cw-direct"
        with pytest.raises(CriuError, match=r"docker checkpoint failed: .*Can't get rlimit") as failed:
            container_engine.checkpoint(ctx)
        assert "Dumping FAILED" in failed.value.log_excerpt or "Error" in failed.value.log_excerpt
        assert ctx.src.inspect(name)["State"]["Running"]  # CRIU let it run on
    finally:
        ctx.close()


def test_containerd_lockout_only_after_a_checkpoint_was_taken(hosts, containers):
    lab1, lab2 = hosts
    run_container, _, _ = containers
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT])
    with Engine(lab1) as engine:
        cid = engine.inspect(name)["Id"]
    # A run that failed at its checkpoint and rolled back: no checkpoint was taken.
    failed = MigrationRun.objects.create(
        source=lab1, target=lab2, kind=CONTAINER, workload=name, strategy=ENGINE, status=ROLLED_BACK,
        finished=timezone.now(), result_workload=cid[:12], state={"checkpointed": False},
    )  # fmt: skip
    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == SUCCEEDED, run.error
    # Back on lab-1 later, after a run that did take one there: refused.
    run = execute(create_run(lab2, lab1, CONTAINER, name))
    assert run.status == SUCCEEDED, run.error
    with Engine(lab1) as engine:
        cid = engine.inspect(name)["Id"]
    failed.result_workload, failed.state = cid[:12], {"checkpointed": True}
    failed.save()
    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == FAILED and "containerd#8401" in run.error, run.error


# A tree talking to itself over loopback: the parent serves, its child
# sends 0, 1, 2, ... and writes each echoed value to $2. The connection's
# both ends move together, and 127.0.0.1 exists on every host.
LOOPBACK_PAIR = r"""
import os, socket, sys, time
port, path = int(sys.argv[1]), sys.argv[2]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port))
srv.listen()
if os.fork() == 0:
    c = socket.create_connection(("127.0.0.1", port))
    i = 0
    while True:
        c.sendall(b"%d\n" % i)
        got = c.recv(100)
        with open(path, "a") as f:
            f.write(got.decode())
        i += 1
        time.sleep(0.2)
conn, _ = srv.accept()
while True:
    d = conn.recv(100)
    if not d:
        break
    conn.sendall(d)
"""


def test_loopback_tcp_inside_a_tree_is_kept_with_tcp_established(hosts, started, tmp_path):
    lab1, lab2 = hosts
    start, pids = started
    path = settings.LAB_ROOT / f"pair-{uuid.uuid4().hex[:8]}.log"
    pid = start(["python3", "-c", LOOPBACK_PAIR], _free_port(), path)
    try:
        wait_for(lambda: path.exists() and len(path.read_text().split()) >= 3, message="the pair did not talk")
        run = execute(create_run(lab1, lab2, PROCESS, pid, tcp=TCP_ESTABLISHED))
        assert run.status == SUCCEEDED, run.error
        pids.append(int(run.result_workload))
        before = len(path.read_text().split())
        wait_for(lambda: len(path.read_text().split()) >= before + 3, message="the connection did not survive")
        seen = [int(v) for v in path.read_text().split()]
        assert seen == list(range(len(seen))), f"values skipped or repeated: {seen}"
        # CRIU's network lock for those connections is gone from the source.
        rules = subprocess.run(["nsenter", f"--net=/run/netns/{lab.HOSTS[0].netns}", "iptables", "-w", "-S"],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "0xc114" not in rules, rules
    finally:
        path.unlink(missing_ok=True)


def test_bind_mount_moves_when_the_same_data_is_on_the_target(hosts, containers, tmp_path):
    # The lab's hosts share this machine's file system: the bind source is on both.
    lab1, lab2 = hosts
    run_container, _, _ = containers
    (tmp_path / "shared.txt").write_text("same on both hosts\n")
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT], host_config={"binds": [f"{tmp_path}:/data"]},
                         volumes=["/data"])  # fmt: skip
    for host in hosts:
        host.allow_privileged = True
        host.save()
    run = execute(create_run(lab1, lab2, CONTAINER, name, shared_storage=True))
    assert run.status == SUCCEEDED, run.error
    assert run.shared_storage
    out, code = _exec(lab2, name, ["cat", "/data/shared.txt"])
    assert (out, code) == ("same on both hosts\n", 0)


def test_keep_source_keeps_the_source_volume(hosts, containers):
    lab1, lab2 = hosts
    run_container, _, volumes = containers
    volume = f"fidvol-{uuid.uuid4().hex[:8]}"
    volumes.append(volume)
    name = run_container(["sh", "-c", "echo v1 > /data/note; " + lab.COUNTER_SCRIPT],
                         host_config={"binds": [f"{volume}:/data"]}, volumes=["/data"])  # fmt: skip
    wait_for(lambda: _exec(lab1, name, ["cat", "/data/note"])[0].strip() == "v1")
    run = execute(create_run(lab1, lab2, CONTAINER, name, keep_source=True))
    assert run.status == SUCCEEDED, run.error
    assert _exec(lab2, name, ["cat", "/data/note"])[0].strip() == "v1"
    with Engine(lab1) as engine:
        kept = engine.volume(volume)
        assert kept is not None
    assert open(f"{kept['Mountpoint']}/note").read().strip() == "v1"


def test_a_volume_with_data_on_the_target_is_refused_before_the_freeze(hosts, containers):
    lab1, lab2 = hosts
    run_container, _, volumes = containers
    volume = f"fidvol-{uuid.uuid4().hex[:8]}"
    volumes.append(volume)
    with Engine(lab2) as engine:
        there = engine.create_volume(volume)
    with open(f"{there['Mountpoint']}/other.txt", "w") as f:
        f.write("lab-2's own data\n")
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT], host_config={"binds": [f"{volume}:/data"]},
                         volumes=["/data"])  # fmt: skip
    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == FAILED
    assert f"already has a volume {volume} holding data" in run.error, run.error
    assert "checkpoint" not in _phase_names(run)
    assert open(f"{there['Mountpoint']}/other.txt").read() == "lab-2's own data\n"


def test_a_process_in_a_mount_namespace_of_its_own_is_refused_before_the_freeze(hosts, started, tmp_path):
    # CRIU tried and failed on it after the freeze ("doesn't have a proper
    # root mount"); pre-flight now says why first. Its file, on a tmpfs of
    # its own namespace, exists on no host.
    lab1, lab2 = hosts
    start, _ = started
    hidden = tmp_path / "private"
    hidden.mkdir()
    script = 'mount -t tmpfs none "$1" && echo x > "$1/held.txt" && exec python3 -c "$2" "$1/held.txt"'
    holder = "import sys, time\nf = open(sys.argv[1])\nwhile True:\n    time.sleep(1)"
    pid = start(["unshare", "-m", "sh", "-c", script, "sh"], hidden, holder)
    wait_for(lambda: any(os.readlink(f"/proc/{pid}/fd/{fd}").endswith("held.txt")
                         for fd in os.listdir(f"/proc/{pid}/fd")), message="the holder did not open its file")  # fmt: skip
    run = execute(create_run(lab1, lab2, PROCESS, pid))
    assert run.status == FAILED
    assert "lives in a mount namespace of its own" in run.error, run.error
    assert "dump" not in _phase_names(run)
    assert os.path.exists(f"/proc/{pid}")


def test_missing_paths_are_found_on_the_target(hosts, tmp_path):
    # The lab's hosts share one file system, so a process cannot hold a path
    # one of them lacks; the check itself runs for real on lab-2.
    present = tmp_path / "here.txt"
    present.write_text("x")
    with ssh.Connection(hosts[1]) as conn:
        missing = tree.missing_paths(conn, [str(present), str(tmp_path / "gone.txt"), "/usr/bin"])
    assert missing == [str(tmp_path / "gone.txt")]


def test_short_lived_children_are_not_taken_for_nested_namespaces(hosts, started):
    # A shell loop forks children that end while pre-flight reads them; a
    # child gone between its stat and its namespace links once read as "in
    # a pid namespace of its own" and refused a container that logs in a loop.
    pid = started[0](["sh", "-c", "while :; do /bin/true; done"])
    wait_for(lambda: os.path.exists(f"/proc/{pid}"), message="the loop did not start")
    with ssh.Connection(hosts[0]) as conn:
        seen_children = 0
        for _ in range(40):
            t = tree.read_tree(conn, pid, 22)
            seen_children += len(t.procs) - 1
            assert all(p["ns"] == t.root_ns for p in t.procs), [p for p in t.procs if p["ns"] != t.root_ns]
            assert not [w for w in tree.refusals(t, "lab-1") if "namespace of its own" in w]
    assert seen_children > 0  # the loop's children were there to be read


def test_a_failed_docker_restore_quotes_criu_s_log_and_rolls_back(hosts, containers):
    # A real CRIU restore failure: the /tmp criuweb adds to a read-only root
    # (CRIU needs it to pivot into that root) taken away on the target only,
    # after the transfer. The source keeps its own, so the rollback works.
    lab1, lab2 = hosts
    run_container, _, _ = containers
    name = run_container(["sh", "-c", lab.COUNTER_SCRIPT], host_config={"read_only": True})

    def take_tmp_away(ctx):
        ctx.dst.conn.run(["rmdir", "--", f"{ctx.state.target_upper}/tmp"])

    run = execute(create_run(lab1, lab2, CONTAINER, name), after_phase={"transfer": take_tmp_away})
    assert run.status == ROLLED_BACK, run.error
    assert run.error.startswith("lab-2: restore from checkpoint failed: "), run.error
    assert "Can't create a temporary directory: Read-only file system" in run.error, run.error
    restore = run.phases.get(name="restore")
    assert "Restoring FAILED" in restore.log_excerpt or "Error" in restore.log_excerpt
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Running"]
