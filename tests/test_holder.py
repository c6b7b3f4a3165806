"""The namespace holder of a restored tree outlives every process in its namespace.

A `criu dump` of a restored tree enters the tree's PID namespace (nsenter),
kills the tree as its last act, and must finish after that: the holder may
not end the namespace, and so kill the dump, as soon as the tree is gone.
"""

import os
import uuid

import pytest
from django.conf import settings

from migrations_app import criu, lab, ssh
from tests.support import wait_for

pytestmark = pytest.mark.lab

# One process, no children: once it is killed the holder has none left.
SLEEPER = 'exec python3 -c "import time\nwhile True: time.sleep(1)"'


def test_a_process_that_entered_the_namespace_outlives_the_tree(hosts):
    lab1, _ = hosts
    images = f"{lab1.work_dir}/holder-{uuid.uuid4().hex[:8]}"
    marker = settings.LAB_ROOT / f"holder-{uuid.uuid4().hex[:8]}"
    pids = []
    try:
        with ssh.Connection(lab1) as conn:
            conn.run(["mkdir", "-p", images])
            pid = lab.start_process(conn, SLEEPER, "x")
            pids.append(pid)
            criu.dump(conn, pid, images)
            restored = criu.restore(conn, images)
            pids.append(restored)
            holder = int(conn.read_file(criu.holder_pidfile(images)).strip())
            pids.append(holder)
            # Like criu dump: enter the tree's namespaces, outlive the tree by a moment, then finish.
            conn.sh(
                'setsid nsenter -t "$1" --pid --mount -- sh -c "sleep 1; echo finished > $2" '
                "</dev/null >/dev/null 2>&1 &",
                str(restored),
                str(marker),
            )
            wait_for(lambda: _entered(holder, str(marker)), message="the entering process did not start")
            os.kill(restored, 9)  # the tree goes, as a dump's end makes it go
        assert (
            wait_for(
                lambda: marker.exists() and marker.read_text(),
                timeout=10,
                message="the process in the namespace was killed with the tree",
            )
            == "finished\n"
        )
        # And then the holder goes too: nothing is left in its namespace.
        wait_for(lambda: not lab.pid_running(holder), timeout=10, message="the holder stayed")
    finally:
        for p in pids:
            try:
                os.kill(p, 9)
            except OSError:
                pass
        marker.unlink(missing_ok=True)
        with ssh.Connection(lab1) as conn:
            conn.run(["rm", "-rf", "--", images], check=False)


def _entered(holder, marker):
    """Whether a process naming marker runs in the holder's PID namespace."""
    try:
        ns = os.readlink(f"/proc/{holder}/ns/pid")
    except OSError:
        return False
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if (
                    os.readlink(f"/proc/{entry}/ns/pid") == ns
                    and marker.encode() in open(f"/proc/{entry}/cmdline", "rb").read()
                ):
                    return True
            except OSError:
                pass
    return False
