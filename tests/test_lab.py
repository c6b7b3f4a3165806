"""The lab itself: what `lab up` and `lab down` leave for other labs and for the hosts."""

import os
import pwd
import re
import signal
import subprocess
import sys
import uuid
from io import StringIO
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import call_command
from django.test import override_settings

from criuweb import lab_claims
from criuweb.settings_test import claim_lab_id
from migrations_app import lab, ssh
from migrations_app.docker_engine import Engine, redate_checkpoint_argv
from tests.support import BASE_DIR, process_env, wait_for

pytestmark = pytest.mark.lab


def _claim_another_lab_id():
    """A lab id for a second lab beside this session's, with its lock (as settings_test claims)."""
    try:
        return claim_lab_id()
    except RuntimeError:
        pytest.skip("no free lab id for a second lab")


def _up_one_host(h):
    """Only what SSH needs of a lab: bridge, user, namespace and sshd (no engine)."""
    settings.LAB_ROOT.mkdir(parents=True, exist_ok=True)
    with lab._labs_lock():
        lab._ensure_bridge()
        lab._ensure_user()
    lab._ensure_client_key()
    lab._ensure_netns(h)
    lab._ensure_sshd(h)
    lab.register(h)


def test_lab_user_home_outlives_another_labs_down(hosts):
    """make run's lab (id 0) and test labs (1-254) share the lab user: one lab's
    down must leave the others' SSH sessions clean (it once deleted the home)."""
    lab1 = hosts[0]
    other_id, lock = _claim_another_lab_id()
    try:
        other = Path(f"/var/lib/criuweb-lab{other_id}")
        with override_settings(LAB_ID=other_id, LAB_ROOT=other, SSH_KEY_DIRS=[*settings.SSH_KEY_DIRS, other / "keys"]):
            h = lab.HOSTS[0]
            try:
                _up_one_host(h)
                from migrations_app.models import Host

                with ssh.Connection(Host.objects.get(name=h.name)) as conn:
                    result = conn.run(["pwd"])
                assert result.stderr == ""
                assert result.stdout.strip() == str(lab.LAB_HOME)
            finally:
                lab.down(log=lambda *a: None)
            other_root = settings.LAB_ROOT
        assert not other_root.exists()
    finally:
        lock.close()
    home = Path(pwd.getpwnam(lab.LAB_USER).pw_dir)
    assert home == lab.LAB_HOME and home.is_dir()
    assert settings.LAB_ROOT not in home.parents
    with ssh.Connection(lab1) as conn:
        result = conn.run(["pwd"])
    assert result.stderr == "", result.stderr
    assert result.stdout.strip() == str(lab.LAB_HOME)


def test_lab_up_lifts_the_pipe_limits_post_copy_needs(lab_up):
    # Root here lacks CAP_SYS_RESOURCE, so CRIU's lazy dump is bound by them.
    assert int(Path("/proc/sys/fs/pipe-max-size").read_text()) >= 268435456
    assert int(Path("/proc/sys/fs/pipe-user-pages-soft").read_text()) == 0


def test_lab_up_leaves_criu_its_kernel_feature_cache(lab_up, tmp_path):
    # Without it every criu here probes the kernel again (40-180 ms), inside the downtime of each restore.
    log = tmp_path / "check.log"
    result = lab.sh("criu", "check", "-v4", "--log-file", log, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Loaded kdat cache from /run/criu.kdat" in log.read_text()


def test_memhog_process_checksum_is_stable_and_counter_continuous(hosts):
    tag = uuid.uuid4().hex[:8]
    counter = settings.LAB_ROOT / f"memhog-{tag}.log"
    checksum = settings.LAB_ROOT / f"memhog-{tag}.checksum"
    with ssh.Connection(hosts[0]) as conn:
        pid = lab.start_memhog(conn, 32, counter, checksum)
        try:
            # It runs on lab-1: in that host's network namespace.
            assert lab.host_of_pid(pid) == "lab-1"
            wait_for(
                lambda: len(lab.counter_values(counter.read_text() if counter.exists() else "")) >= 5,
                message="memhog did not count",
            )
            first = lab.memhog_checksum(conn, pid, checksum)
            second = lab.memhog_checksum(conn, pid, checksum)
            assert re.fullmatch("[0-9a-f]{16}", first), first
            assert first == second
            # 32 MiB really held (RSS in KiB).
            rss = int(conn.run(["ps", "-o", "rss=", "-p", str(pid)]).stdout)
            assert rss >= 32 * 1024
            values = lab.counter_values(counter.read_text())
            assert values == list(range(len(values)))
        finally:
            os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not lab.pid_running(pid), message="memhog did not stop")
    counter.unlink(missing_ok=True)
    checksum.unlink(missing_ok=True)


def test_memhog_checksum_differs_between_processes(hosts):
    """Two memhogs hold different random memory, so a checksum tells them apart."""
    tag = uuid.uuid4().hex[:8]
    sums, pids = [], []
    with ssh.Connection(hosts[1]) as conn:
        try:
            for i in range(2):
                path = settings.LAB_ROOT / f"memhog-{tag}-{i}.checksum"
                pids.append(lab.start_memhog(conn, 1, "-", path))
                sums.append(lab.memhog_checksum(conn, pids[-1], path))
                path.unlink()
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
    assert sums[0] != sums[1]


def test_memhog_container(hosts):
    name = f"memhog-{uuid.uuid4().hex[:8]}"
    with Engine(hosts[0]) as engine:
        lab.run_memhog_container(engine, name, 16)
        try:
            wait_for(lambda: len(lab.counter_values(engine.logs(name))) >= 5, message="memhog did not count")
            first = lab.memhog_container_checksum(engine, name)
            second = lab.memhog_container_checksum(engine, name)
            assert re.fullmatch("[0-9a-f]{16}", first) and first == second
            logs = engine.logs(name)
            assert f"checksum {first}" in logs
            values = lab.counter_values(logs)
            assert values == list(range(len(values)))
        finally:
            engine.remove(name)


def test_lab_engines_checkpoint_a_container_with_a_listening_socket(hosts):
    """The lab's dockerd finds setup's CRIU on its PATH (runc runs `criu`):
    CRIU 4.1.1 fails this on Linux >= 6.16 ("sockets: Can't get 1:16 opt")."""
    name = f"httpd-{uuid.uuid4().hex[:8]}"
    script = "mkdir /www && echo hello-from-httpd > /www/index.html && exec httpd -f -p 8080 -h /www"

    def fetch(engine):
        exec_id = engine.api.exec_create(name, ["wget", "-q", "-O", "-", "http://127.0.0.1:8080/"])["Id"]
        return engine.api.exec_start(exec_id).decode()

    with Engine(hosts[0]) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", script], name)
        try:
            wait_for(lambda: "hello-from-httpd" in fetch(engine), message="httpd did not answer")
            engine.checkpoint(name, "cp1")
            assert not engine.inspect(name)["State"]["Running"]
            # The restore on the engine that made the checkpoint can meet
            # containerd's blob of it (moby/moby#42900), as the plans and
            # the benchmark do.
            cid = engine.inspect(name)["Id"]
            cp_dir = lab.HOSTS[0].data_root / "containers" / cid / "checkpoints" / "cp1"
            subprocess.run(redate_checkpoint_argv(str(cp_dir)), check=True)
            engine.start(name, checkpoint="cp1")
            assert engine.inspect(name)["State"]["Running"]
            assert "hello-from-httpd" in fetch(engine)
        finally:
            engine.remove(name)


def test_lab_down_removes_every_host_whatever_n_built_it(lab_up, db):
    """`lab down` finds a lab's hosts on the machine, however many there are,
    even with the record of the count gone (engines left out: SSH is enough)."""
    from migrations_app.models import Host

    other_id, lock = _claim_another_lab_id()
    try:
        other = Path(f"/var/lib/criuweb-lab{other_id}")
        with override_settings(LAB_ID=other_id, LAB_ROOT=other, SSH_KEY_DIRS=[*settings.SSH_KEY_DIRS, other / "keys"]):
            three = [lab.host(i) for i in (1, 2, 3)]
            try:
                for h in three:
                    _up_one_host(h)
                assert not (other / "hosts").exists()  # nothing but the hosts themselves tells N
                assert [h.name for h in lab.hosts()] == ["lab-1", "lab-2", "lab-3"]
                sshds = [lab._alive(h.sshd_pid) for h in three]
                assert all(sshds)
                with ssh.Connection(Host.objects.get(name="lab-3")) as conn:
                    assert conn.run(["printenv", "CRIUWEB_HOST"]).stdout.strip() == "lab-3"
                status = {s["name"]: s["sshd"] for s in lab.status()}
                assert status == {"lab-1": True, "lab-2": True, "lab-3": True}
            finally:
                out = StringIO()
                call_command("lab", "down", stdout=out)
            assert out.getvalue().split("\n")[:3] == ["lab-1: down", "lab-2: down", "lab-3: down"]
            for h, pid in zip(three, sshds):
                assert not lab.pid_running(pid), f"{h.name}'s sshd {pid} still runs"
                assert not Path(f"/run/netns/{h.netns}").exists()
                assert not h.run_dir.exists()
                assert lab.sh("ip", "link", "show", h.veth, check=False).returncode != 0
            assert not other.exists()
            assert not Host.objects.filter(name__in=["lab-1", "lab-2", "lab-3"]).exists()
    finally:
        lock.close()


def test_redating_a_checkpoint_changes_its_mtime_at_tar_resolution(tmp_path):
    """Go's tar writer rounds mtimes to the second: a touch within the
    checkpoint's own second left Docker's tar identical to containerd's blob
    (moby/moby#42900, a CI failure), so the new date must differ after rounding."""
    descriptors = tmp_path / "descriptors.json"
    descriptors.write_text("[]")
    os.utime(descriptors, (1_700_000_000.7, 1_700_000_000.7))
    subprocess.run(redate_checkpoint_argv(str(tmp_path)), check=True)
    first = descriptors.stat().st_mtime
    assert round(first) not in (1_700_000_000, 1_700_000_001)
    subprocess.run(redate_checkpoint_argv(str(tmp_path)), check=True)
    assert round(descriptors.stat().st_mtime) != round(first)
    # Like `touch -c`: a checkpoint without the file is left alone, and that is no error.
    subprocess.run(redate_checkpoint_argv(str(tmp_path / "absent")), check=True)
    assert not (tmp_path / "absent").exists()


def test_claim_skips_a_lab_made_by_hand():
    """A lab made by hand on an id a test session once used (its lock file left
    in /run) was taken over by the next session and torn down under its owner.
    Its marker now keeps test sessions off it."""
    first, lock = _claim_another_lab_id()
    try:
        lab_claims.mark_hand_made(first)
        lock.close()  # as between two `manage.py lab` commands: no lock held
        again, other = _claim_another_lab_id()
        other.close()
        assert again != first
    finally:
        lab_claims.unmark_hand_made(first)
        lock.close()


def test_a_hand_made_marker_from_an_earlier_boot_counts_for_nothing():
    # /run outlives a reboot here; the labs do not.
    lab_id, lock = _claim_another_lab_id()
    try:
        lab_claims.marker_path(lab_id).write_text("a-boot-long-ago\n")
        assert not lab_claims.is_hand_made(lab_id)
        lab_claims.mark_hand_made(lab_id)
        assert lab_claims.is_hand_made(lab_id)
    finally:
        lab_claims.unmark_hand_made(lab_id)
        lock.close()


def _lab_by_hand(lab_id, action):
    """`manage.py lab ACTION` as a person runs it: the ordinary settings, CRIUWEB_LAB_ID=lab_id."""
    env = process_env(DJANGO_SETTINGS_MODULE="criuweb.settings", CRIUWEB_LAB_ID=lab_id)
    return subprocess.run([sys.executable, "manage.py", "lab", action], cwd=BASE_DIR, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_lab_by_hand_keeps_off_an_id_a_test_session_holds(db):
    lab_id, lock = _claim_another_lab_id()
    try:
        lab_claims.mark_hand_made(lab_id)  # so that a down that went ahead would show
        done = _lab_by_hand(lab_id, "down")
        assert done.returncode != 0
        assert f"lab {lab_id} is in use: another process holds /run/criuweb-testlab-{lab_id}.lock" in done.stderr
        assert "Traceback" not in done.stderr, done.stderr
        assert lab_claims.is_hand_made(lab_id)  # refused before it did anything
    finally:
        lab_claims.unmark_hand_made(lab_id)
        lock.close()


def test_lab_down_by_hand_removes_its_marker(lab_up, db):
    """On an id with no lab (so nothing is torn down): down holds the lock while it
    runs, then says the lab is no longer anyone's. lab_up: another lab stays on the
    machine, so this down is not the last lab's (which removes the shared user)."""
    lab_id, lock = _claim_another_lab_id()
    try:
        lab_claims.mark_hand_made(lab_id)  # before the lock goes: no test session takes the id meanwhile
        lock.close()
        done = _lab_by_hand(lab_id, "down")
        assert done.returncode == 0, done.stderr
        assert not lab_claims.marker_path(lab_id).exists()
    finally:
        lab_claims.unmark_hand_made(lab_id)


def test_lab_up_in_a_test_session_leaves_no_hand_made_marker(hosts):
    """`lab up` run by a test (the fleet tests do) wrote the hand-made marker
    for the session's own id, which its teardown never removed: later
    sessions skipped those ids until reboot (eight had leaked in one day)."""
    lab_claims.unmark_hand_made(settings.LAB_ID)
    call_command("lab", "up", stdout=StringIO())
    assert not lab_claims.is_hand_made(settings.LAB_ID)
