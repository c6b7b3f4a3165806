"""The lab itself: what `lab up` and `lab down` leave for other labs and for the hosts."""

import fcntl
import pwd
from pathlib import Path

import pytest
from django.conf import settings
from django.test import override_settings

from migrations_app import lab, ssh

pytestmark = pytest.mark.lab


def _claim_another_lab_id():
    """A free lab id (1-9) beside this session's, with its lock (as settings_test claims)."""
    for lab_id in range(1, 10):
        if lab_id == settings.LAB_ID:
            continue
        lock = open(f"/run/criuweb-testlab-{lab_id}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        return lab_id, lock
    pytest.skip("no free lab id for a second lab")


def _up_one_host(h):
    """Only what SSH needs of a lab: bridge, user, namespace and sshd (no engine)."""
    settings.LAB_ROOT.mkdir(parents=True, exist_ok=True)
    lab._ensure_bridge()
    lab._ensure_client_key()
    lab._ensure_user()
    lab._ensure_netns(h)
    lab._ensure_sshd(h)
    lab.register(h)


def test_lab_user_home_outlives_another_labs_down(hosts):
    """make run's lab (id 0) and test labs (1-9) share the lab user: one lab's
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
