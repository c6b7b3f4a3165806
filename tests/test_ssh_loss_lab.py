"""SSH connections lost mid-run, for real: a lab host's sshd killed (by the
PIDs the lab and /proc give, never by name) at points of a process move and
a container move.

The run's error must name the host and say the SSH connection was lost and
during which phase; paramiko's own words stay in the log. Afterwards, and
after `manage.py recover --run` where the rollback could not reach the host,
exactly one copy of the workload runs.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from migrations_app import lab
from migrations_app.engine import create_run, execute, recovery
from migrations_app.engine.runner import TEST_PAUSE_ENV
from migrations_app.models import CONTAINER, PROCESS, ROLLED_BACK, SUCCEEDED, MigrationRun, Stage
from tests.support import BASE_DIR, process_env, wait_for
from tests.test_faults_lab import (  # noqa: F401 - counter_process is a fixture
    assert_consecutive,
    counter_pids,
    counter_process,
    lab_host,
    running_copies,
    values,
)

pytestmark = [pytest.mark.lab, pytest.mark.django_db(transaction=True)]


def sshd_tree(h):
    """The lab host's sshd and the sshd processes under it (its connections), from the lab's PID file."""
    root = lab._alive(h.sshd_pid)
    if root is None:
        return []
    children = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                exe = os.readlink(entry / "exe")
            except OSError:
                continue
            children.setdefault(ppid, []).append((int(entry.name), exe))
    found, todo = [root], [root]
    while todo:
        for pid, exe in children.get(todo.pop(), []):
            # Only sshd itself: the commands its sessions run die of that, or not, as they would.
            if exe == "/usr/sbin/sshd":
                found.append(pid)
                todo.append(pid)
    return found


def kill_sshd(h):
    for pid in sshd_tree(h):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def restart_sshd(h):
    # Only when it is gone: the lab's reload (SIGHUP) makes sshd re-exec
    # itself, refusing connections for a moment.
    if not lab._alive(h.sshd_pid):
        lab._ensure_sshd(h)


# What paramiko, docker-py and the streams said about a lost connection
# before it was named: none of it may reach the run's message.
RAW = ("Socket is closed", "SSHException", "EOFError", "exit status 255", "no exit status", "[Errno",
       "Connection aborted", "channel lost", "SSH session not active", "Traceback")  # fmt: skip


def assert_names_the_lost_connection(run, host):
    """The run's message says which host's SSH connection went, during which phase; the rest is in its log."""
    failed = run.phases.filter(status="failed").exclude(name__in=("rollback", "recovery")).order_by("seq").first()
    assert failed is not None, run.error
    headline = f"{host}: the SSH connection was lost during {failed.name}"
    # A failed cleanup follows the place where the workload runs.
    assert run.error.removeprefix("the workload runs on lab-2, but afterwards: ").startswith(headline), run.error
    assert failed.detail.startswith(headline), failed.detail
    for raw in RAW:
        assert raw not in run.error, run.error
    assert failed.log, "what paramiko said is kept in the run's log"


def kill_at(h, point):
    """execute() arguments that kill h's sshd right after phase `point`, or during the first bytes moved."""
    killed = []

    def kill(*_):
        if not killed:
            killed.append(sshd_tree(h))
            kill_sshd(h)

    if point == "mid-transfer":
        return killed, {"on_progress": kill}
    return killed, {"after_phase": {point: kill}}


def finish(run, h):
    """sshd back on h, then `recover --run` where the run's own rollback could not finish."""
    restart_sshd(h)
    run.refresh_from_db()
    if run.stage != Stage.DONE:
        assert "recover --run" in run.error or run.stage == Stage.LEFTOVERS, run.error
        recovery.recover(MigrationRun.objects.get(pk=run.pk))
        run.refresh_from_db()
    assert run.stage == Stage.DONE, run.error
    return run


# (strategy, kill point, host whose sshd dies). Kill points: right after a
# phase (the next phase meets the dead connection), or mid-transfer.
PROCESS_CASES = [
    ("stop-and-copy", "dump", "lab-1"),
    ("stop-and-copy", "mid-transfer", "lab-2"),
    ("stop-and-copy", "transfer", "lab-2"),
    ("page-server", "mid-transfer", "lab-2"),
    ("page-server", "page server", "lab-1"),
    ("page-server", "restore", "lab-2"),
    ("lazy", "restore", "lab-1"),
]


@pytest.mark.parametrize("strategy, point, side", PROCESS_CASES)
def test_sshd_killed_during_a_process_move(hosts, counter_process, strategy, point, side):
    lab1, lab2 = hosts
    path = counter_process
    (pid,) = counter_pids(path)
    h = lab_host(side)
    killed, how = kill_at(h, point)
    run = create_run(lab1, lab2, PROCESS, str(pid), strategy=strategy, freeze_limit=120)
    try:
        execute(run, **how)
    finally:
        restart_sshd(h)
    assert killed and killed[0], "sshd was never killed: the test shows nothing"
    run.refresh_from_db()
    assert_names_the_lost_connection(run, side)
    run = finish(run, h)
    pids = wait_for(lambda: counter_pids(path), 20, "no counter runs after the recovery")
    assert len(pids) == 1, f"{len(pids)} copies run"
    where = lab.host_of_pid(pids[0])
    assert where == ("lab-2" if run.status == SUCCEEDED else "lab-1"), (where, run.status, run.error)
    count = len(values(path.read_text()))
    wait_for(lambda: len(values(path.read_text())) >= count + 2, 20, "the counter stopped")
    seen = values(path.read_text())
    if run.status == SUCCEEDED or not run.phases.filter(name="restore", status="ok").exists():
        assert_consecutive(seen)
    else:
        # Rolled back after a restore: the copy ran on lab-2 until the
        # rollback removed it, and the source goes on from the freeze
        # (docs/safety.md, Rollback), so values it wrote come again. None is skipped.
        assert all(b <= a + 1 for a, b in zip(seen, seen[1:])), f"values skipped: {seen}"


CONTAINER_CASES = [
    ("stop-and-copy", "checkpoint", "lab-1"),
    ("stop-and-copy", "checkpoint", "lab-2"),
    ("stop-and-copy", "transfer", "lab-2"),
    ("page-server", "checkpoint", "lab-2"),
    ("page-server", "prepare target", "lab-1"),
    ("lazy", "transfer", "lab-2"),
    ("engine", "prepare target", "lab-1"),
    ("engine", "transfer", "lab-2"),
]


@pytest.mark.parametrize("strategy, point, side", CONTAINER_CASES)
def test_sshd_killed_during_a_container_move(hosts, counter_container, strategy, point, side):
    lab1, lab2 = hosts
    name = counter_container
    if strategy in ("page-server", "lazy"):
        lab.trust_pair()  # the lab's pair streams without TLS, as a trusted network does
    h = lab_host(side)
    killed, how = kill_at(h, point)
    run = create_run(lab1, lab2, CONTAINER, name, strategy=strategy, freeze_limit=120)
    try:
        execute(run, **how)
    finally:
        restart_sshd(h)
    assert killed and killed[0], "sshd was never killed: the test shows nothing"
    run.refresh_from_db()
    assert_names_the_lost_connection(run, side)
    run = finish(run, h)
    where = "lab-2" if run.status == SUCCEEDED else "lab-1"
    # failed: it never froze (the runc checkpoint starts before the freeze, in "page server").
    assert run.status in (SUCCEEDED, ROLLED_BACK) or f"runs on {where}" in run.error, run.error
    assert running_copies(hosts, name) == [where]


def test_the_cli_and_the_run_page_name_the_lost_connection(hosts, counter_process, client, admin_user):
    """`migrate_workload --json` with the target's sshd killed after the dump: the JSON's
    error and the run page name lab-2's lost connection; no traceback on stderr."""
    path = counter_process
    (pid,) = counter_pids(path)
    h = lab_host("lab-2")
    env = process_env(**{TEST_PAUSE_ENV: "dump=2"})
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "migrate_workload", "--source", "lab-1", "--target", "lab-2",
         "--pid", str(pid), "--freeze-limit", "120", "--json"],
        cwd=BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        err = []
        for line in proc.stderr:
            err.append(line)
            if "criuweb test pause: after dump" in line:
                kill_sshd(h)
                break
        out, rest = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        restart_sshd(h)
    err = "".join(err) + rest
    assert proc.returncode == 1, out + err
    assert "Traceback" not in err, err
    shown = json.loads(out)
    assert shown["error"].startswith("lab-2: the SSH connection was lost during transfer"), shown
    run = MigrationRun.objects.get(code=shown["id"])
    assert_names_the_lost_connection(run, "lab-2")
    client.force_login(admin_user)
    page = client.get(f"/runs/{run.code}/").content.decode()
    assert "lab-2: the SSH connection was lost during transfer" in page
    for raw in RAW:
        assert raw not in page, raw
    run = finish(run, h)
    pids = wait_for(lambda: counter_pids(path), 20, "no counter runs after the recovery")
    assert len(pids) == 1 and lab.host_of_pid(pids[0]) == "lab-1", run.error


def test_a_step_s_own_error_is_kept_while_another_connection_is_lost(hosts, tmp_path):
    """lab-1's sshd killed while a restore on lab-2 fails for a reason of
    its own (a real CRIU restore of an empty directory). Before the fix
    the run's message said only that lab-1's connection was lost; CRIU's
    error went to the log. What lab-1's dead connection itself raises
    (paramiko's words) still reads as the lost connection."""
    from types import SimpleNamespace

    import paramiko

    from migrations_app import criu, ssh
    from migrations_app.engine.runner import _describe, _detail

    lab1, lab2 = hosts
    images = tmp_path / "images"
    images.mkdir()  # the lab's hosts share this machine's disk
    with ssh.Connection(lab1) as src, ssh.Connection(lab2) as dst:
        src.run(["true"])
        with pytest.raises(criu.CriuError) as refused:
            criu.restore(dst, str(images))
        assert refused.value.definitive, refused.value
        try:
            kill_sshd(lab_host("lab-1"))
            wait_for(src.lost, 15, "lab-1's connection did not notice its sshd died")
            with pytest.raises(paramiko.SSHException) as raw:
                src.client.get_transport().open_session()
            # _describe reads only these four of the run's Context.
            ctx = SimpleNamespace(source=lab1, target=lab2, src_ssh=src, dst_ssh=dst)
            said = _describe(refused.value, ctx, "restore")
            assert said == f"{refused.value}; and the SSH connection to lab-1 was lost during restore", said
            assert said.startswith("lab-2: criu restore failed: "), said
            assert _detail(refused.value, ctx) == ""
            lost = _describe(raw.value, ctx, "restore")
            assert lost == "lab-1: the SSH connection was lost during restore", lost
            assert str(raw.value) in _detail(raw.value, ctx)
            # Without a lost connection the step's error reads as it is.
            whole = SimpleNamespace(source=lab1, target=lab2, src_ssh=None, dst_ssh=dst)
            assert _describe(refused.value, whole) == str(refused.value)
        finally:
            restart_sshd(lab_host("lab-1"))
