import json
import os
import struct

import pytest

from migrations_app import criu

# A stats-restore image as CRIU 4.1.1 wrote it on the lab (restore of the
# busybox counter container).
STATS_RESTORE = bytes.fromhex("40591055063309570f000000120d0809100218d2042093c9182820")


def stats_image(entry_field, fields):
    body = b""
    for number, value in fields.items():
        body += _varint(number << 3) + _varint(value)
    message = _varint(entry_field << 3 | 2) + _varint(len(body)) + body
    return struct.pack("<III", criu.IMG_SERVICE_MAGIC, criu.STATS_MAGIC, len(message)) + message


def _varint(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def test_decode_real_restore_stats():
    assert criu.decode_stats(STATS_RESTORE) == {
        "pages_compared": 9,
        "pages_skipped_cow": 2,
        "forking_time": 594,
        "restore_time": 402579,
        "pages_restored": 32,
    }


def test_decode_dump_stats_with_large_values():
    raw = stats_image(1, {1: 287, 2: 16749, 3: 1954, 4: 368, 7: 2**40 + 5})
    assert criu.decode_stats(raw) == {
        "freezing_time": 287,
        "frozen_time": 16749,
        "memdump_time": 1954,
        "memwrite_time": 368,
        "pages_written": 2**40 + 5,
    }


@pytest.mark.parametrize(
    "raw, message",
    [
        (None, "too short"),
        (b"\x00" * 12, "not a CRIU stats image"),
        (STATS_RESTORE[:-3], "truncated"),
    ],
)
def test_decode_rejects_what_is_not_a_stats_image(raw, message):
    with pytest.raises(ValueError, match=message):
        criu.decode_stats(raw)


def test_log_excerpt_skips_the_harmless_rlimit_error():
    log = "\n".join(
        ["(00.000001) Version: 4.1.1"]
        + ["(00.01) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self"]
        + [f"(00.1{i}) line {i}" for i in range(40)]
        + ["(00.9) Error (criu/cr-restore.c:1): Can't fork for 42: File exists", "(01.0) tail"]
    )
    excerpt = criu.log_excerpt(log)
    assert "Can't fork for 42" in excerpt
    assert "RLIMIT_NOFILE" not in excerpt
    assert criu.first_error(excerpt) == "Error (criu/cr-restore.c:1): Can't fork for 42: File exists"


def test_log_excerpt_without_errors_is_the_tail():
    log = "\n".join(f"line {i}" for i in range(100))
    assert criu.log_excerpt(log, lines=3) == "line 97\nline 98\nline 99"


def test_dump_argv_keeps_hostile_paths_as_one_argument():
    argv = criu.dump_argv(1234, "/srv/a; rm -rf /")
    assert argv[:6] == ["criu", "dump", "-t", "1234", "-D", "/srv/a; rm -rf /"]
    inside = criu.dump_argv(1234, "/d", inner_pid=7)
    assert inside[:7] == ["nsenter", "-t", "1234", "--pid", "--mount", "--", "criu"]
    assert inside[inside.index("-t", 7) + 1] == "7"


def test_restore_runs_under_the_namespace_holder():
    argv = criu.restore_argv("/x y")
    assert argv[:2] == ["python3", "-c"]
    assert argv[3] == "/x y/holder.pid"
    assert argv[4:8] == ["criu", "restore", "-D", "/x y"]
    assert "--restore-detached" in argv
    compile(criu.HOLDER, "holder", "exec")  # it is valid Python


def test_self_test_runner_finds_criu_error_lines_as_criu_py_does():
    from migrations_app import criu_selftest

    log = (
        "(00.000001) Version: 4.1.1\n"
        "(00.01) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self\n"
        "(00.02) Error (criu/sockets.c:628): sockets: Can't get 1:16 opt: Operation not supported\n"
    )
    expected = "Error (criu/sockets.c:628): sockets: Can't get 1:16 opt: Operation not supported"
    assert criu_selftest.first_error(log) == expected == criu.first_error(log)


@pytest.mark.parametrize(
    "line, expected",
    [
        ('{"ok": true, "stage": "done", "error": "", "dump_s": 0.05}', (True, "")),
        ('{"ok": false, "stage": "dump", "error": "Error (x): sockets: no"}', (False, "dump: Error (x): sockets: no")),
        ("sh: 1: python3: not found", (False, "self-test did not run: sh: 1: python3: not found")),
        ("", (False, "self-test did not run: no output")),
    ],
)
def test_parse_self_test(line, expected):
    assert criu.parse_self_test(line) == expected


@pytest.mark.lab
def test_self_test_failure_quotes_criu(hosts):
    from migrations_app import ssh

    with ssh.Connection(hosts[1]) as conn:
        # A real CRIU failure, reported with CRIU's own line: a lazy restore
        # with no lazy-pages daemon to serve it.
        ok, error = criu.self_test(conn, extra_restore_args=["--lazy-pages"])
    assert not ok
    assert error.startswith("restore: Error (criu/uffd.c:") and "lazy-pages.socket" in error, error


@pytest.mark.lab
@pytest.mark.parametrize("mode, started", [("local", 4), ("page-server", 5), ("lazy", 6)])
@pytest.mark.parametrize("with_socket", [True, False])
def test_self_test_on_a_lab_host(hosts, mode, started, with_socket):
    from migrations_app import ssh

    argv = ["python3", "-c", criu.SELFTEST_SOURCE, f"--mode={mode}"] + ([] if with_socket else ["--no-socket"])
    with ssh.Connection(hosts[1]) as conn:
        assert criu.self_test(conn, mode=mode, with_socket=with_socket) == (True, "")
        report = json.loads(conn.run(argv).stdout)
    assert report["ok"], report
    # The test process, the CRIU daemons of the mode, unshare, the
    # namespace's init and the restored copy. The lab hosts share this
    # machine's PIDs, so /proc here shows whether they are gone.
    assert len(report["pids"]) == started
    assert not [pid for pid in report["pids"] if os.path.exists(f"/proc/{pid}")], "the self-test left processes"


@pytest.mark.lab
def test_probe_records_the_socket_self_test(hosts):
    from migrations_app import ssh

    with ssh.Connection(hosts[0]) as conn:
        facts = criu.probe(conn)
    assert facts["check_ok"] is True
    assert facts["sockets_ok"] is True and facts["sockets_error"] == ""
    # Every strategy's self-test passes on the lab (lab up lifts the pipe
    # limits the lazy one needs).
    assert facts["self_tests"] == {name: {"ok": True, "error": ""} for name in criu.SELF_TESTS}


@pytest.mark.lab
def test_preflight_probe_checks_criu_without_self_tests(hosts):
    from migrations_app import ssh
    from migrations_app.engine.hostcheck import criu_ready

    with ssh.Connection(hosts[0]) as conn:
        facts = criu_ready(conn)
    assert facts["check_ok"] is True and facts["version"]
    # The self-tests are the host probe's job; a run's pre-flight skips them.
    assert all(t == {"ok": False, "error": "not tried"} for t in facts["self_tests"].values())
    assert facts["features"] == {}


# Stands in for a criu dump: connects to the page server at argv[1]:argv[2]
# and to a bystander at argv[3], corks both as CRIU does, then waits up to
# 10 s for the page server's socket to be uncorked; prints both states.
CORKED_CLIENT = r"""
import socket, sys, time
def corked(port):
    s = socket.create_connection((sys.argv[1], port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
    return s
ps, other = corked(int(sys.argv[2])), corked(int(sys.argv[3]))
deadline = time.monotonic() + 10
while ps.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) and time.monotonic() < deadline:
    time.sleep(0.01)
print(ps.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK), other.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK))
"""


def test_uncork_takes_the_cork_off_the_dump_socket_to_the_page_server_only(tmp_path):
    """CRIU corks its page-server socket for good; UNCORK lifts it on that socket, no other.

    Real sockets and a real process found the way UNCORK finds a dump: by
    its executable's name, criu (a copy of Python under that name stands in
    for it: a real dump needs a page server and a workload, which the lab
    tests bring).
    """
    import shutil
    import socket
    import subprocess
    import sys

    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    ps_port, other_port = (s.getsockname()[1] for s in listeners)
    fake = tmp_path / "criu"
    shutil.copy(sys.executable, fake)
    # What SEND_SCRIPT does with fd 5: start the dump, say its PID there.
    shell = '"$@" & pid=$!; echo "$pid" >&5; exec 5>&-; wait "$pid"'
    try:
        out = subprocess.run(
            [sys.executable, "-c", criu.UNCORK, "127.0.0.1", str(ps_port), "sh", "-c", shell, "sh",
             str(fake), "-c", CORKED_CLIENT, "127.0.0.1", str(ps_port), str(other_port)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        for s in listeners:
            s.close()
    # UNCORK hands its own stdio to the shell: the dump's output comes through.
    assert out.stdout.split() == ["0", "1"], out
    assert out.returncode == 0, out


# Stands in for `runc checkpoint`: like runc (go-criu's version query, then
# the dump), it starts a criu that ends without connecting anywhere, then
# the one that connects to the page server. argv[1]: the fake criu, then
# CORKED_CLIENT's arguments.
FAKE_RUNC = r"""
import subprocess, sys
subprocess.run([sys.argv[1], "-c", "import time; time.sleep(0.3)"], check=True)
subprocess.run([sys.argv[1], *sys.argv[2:]], check=True)
"""


def test_uncork_finds_the_dump_criu_of_a_runc_checkpoint(tmp_path):
    """Under runc, the first criu is a version query: UNCORK waits for the one that dumps, and says it uncorked.

    Real sockets and real processes, a copy of Python named criu standing in
    for CRIU (a real runc checkpoint is the fast-path lab tests' job).
    """
    import shutil
    import socket
    import subprocess
    import sys

    listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    ps_port, other_port = (s.getsockname()[1] for s in listeners)
    fake = tmp_path / "criu"
    shutil.copy(sys.executable, fake)
    mark = tmp_path / "uncorked"
    # What runc.PAGE_SERVER_CHECKPOINT_SCRIPT does with fd 5: say runc's PID there.
    shell = '"$@" & pid=$!; echo "$pid" >&5; exec 5>&-; wait "$pid"'
    try:
        out = subprocess.run(
            [sys.executable, "-c", criu.UNCORK, "127.0.0.1", str(ps_port), "sh", "-c", shell, "sh",
             sys.executable, "-c", FAKE_RUNC, str(fake), "-c", CORKED_CLIENT, "127.0.0.1", str(ps_port),
             str(other_port)],
            capture_output=True, text=True, timeout=60, env={**os.environ, "CRIUWEB_UNCORKED": str(mark)},
        )  # fmt: skip
    finally:
        for s in listeners:
            s.close()
    assert out.stdout.split() == ["0", "1"], out
    assert out.returncode == 0, out
    assert mark.read_text() == "uncorked\n"
