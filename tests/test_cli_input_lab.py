"""Bad input to `manage.py migrate_workload`, in a process of its own as a
person runs it: a clear message on stderr, a non-zero exit, no traceback."""

import subprocess
import sys

import pytest

from tests.support import BASE_DIR, process_env

pytestmark = [pytest.mark.lab, pytest.mark.django_db(transaction=True)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "nowhere", "--target", "lab-2", "--container", "x"], "no host named 'nowhere'"),
        (["--source", "lab-1", "--target", "lab-2", "--container", "no-such-container"],
         "lab-1: no container named 'no-such-container'"),
        (["--source", "lab-1", "--target", "lab-2", "--pid", "1", "--strategy", "teleport"],
         "argument --strategy: invalid choice: 'teleport'"),
        (["--source", "lab-1", "--target", "lab-2", "--pid", "4194303"], "lab-1: no process with PID 4194303"),
    ],
)  # fmt: skip
def test_bad_input_gets_a_message_and_no_traceback(hosts, args, message):
    done = subprocess.run([sys.executable, "manage.py", "migrate_workload", *args], cwd=BASE_DIR,
                          env=process_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode != 0, done.stdout + done.stderr
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stdout + done.stderr, done.stderr
