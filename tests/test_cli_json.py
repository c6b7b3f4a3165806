"""`--json` prints one JSON object on stdout in every outcome, a refusal too:
a script that reads stdout must not be left with nothing. Each command runs
in a process of its own, as a script runs it."""

import json
import subprocess
import sys

import pytest

from migrations_app.models import Host, MigrationRun
from tests.support import BASE_DIR, process_env

pytestmark = pytest.mark.django_db(transaction=True)


def manage(*args):
    return subprocess.run([sys.executable, "manage.py", *args], cwd=BASE_DIR, env=process_env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture
def two_hosts():
    # Refused before any host is asked: addresses nobody listens on will do.
    for name, address in (("h1", "10.213.254.1"), ("h2", "10.213.254.2")):
        Host.objects.create(name=name, address=address, key_path="/nonexistent/key")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "h1", "--target", "h1", "--pid", "4242"], "source and target must be different hosts"),
        (["--source", "h1", "--target", "h2", "--pid", "4242", "--strategy", "teleport"],
         "argument --strategy: invalid choice: 'teleport'"),
        (["--source", "nowhere", "--target", "h2", "--pid", "4242"], "no host named 'nowhere' (known: h1, h2)"),
        (["--source", "h1", "--target", "h2", "--pid", "4242", "--freeze-limit", "-3"],
         "the freeze limit must be between 0 and 86400 seconds, not -3.0"),
        (["--source", "h1", "--target", "h2", "--pid", "4242", "--freeze-limit", "soon"],
         "argument --freeze-limit: invalid float value: 'soon'"),
        (["--source", "h1", "--target", "h2", "--pid", "not-a-pid"], "'not-a-pid' is not"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("enqueue", [False, True])
def test_migrate_workload_refusal_is_one_json_object(two_hosts, args, message, enqueue):
    done = manage("migrate_workload", *args, *(["--enqueue"] if enqueue else []), "--json")
    assert done.returncode != 0, done.stdout + done.stderr
    result = json.loads(done.stdout)  # one object, nothing else on stdout
    assert result["id"] is None and result["status"] == "refused", result
    assert message in result["error"], result
    # The same message on stderr, for a person.
    assert message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert not MigrationRun.objects.exists()


def test_migrate_workload_refusal_without_json_prints_nothing_on_stdout(two_hosts):
    done = manage("migrate_workload", "--source", "h1", "--target", "h1", "--pid", "1")
    assert done.returncode != 0
    assert done.stdout == "", done.stdout
    assert "source and target must be different hosts" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["restore", "--checkpoint", "nothing-kept"], "no checkpoint named 'nothing-kept'"),
        (["checkpoint", "--host", "nowhere", "--pid", "4242"], "no host named 'nowhere'"),
        (["clone", "--host", "h1"], "a live clone needs --host and --container or --pid"),
        (["export", "--checkpoint", "nothing-kept", "--output", "/nonexistent/cp.tar.zst"],
         "no checkpoint named 'nothing-kept'"),
        (["import", "--host", "h1", "--input", "/nonexistent/cp.tar.zst"], "no file /nonexistent/cp.tar.zst"),
        (["recover", "--run", "not-a-run"], "'not-a-run' is not a run id"),
        (["checkpoint", "--host", "h1"], "one of the arguments --container --pid is required"),
    ],
)  # fmt: skip
def test_other_commands_refusal_is_one_json_object(two_hosts, args, message):
    done = manage(*args, "--json")
    assert done.returncode != 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    assert result == {"id": None, "status": "refused", "error": result["error"]}
    assert message in result["error"] and message in done.stderr, (result, done.stderr)
