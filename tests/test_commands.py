import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command


def call(*args):
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


@pytest.mark.lab
def test_migrate_workload_json(hosts, counter_container):
    name = counter_container
    result = json.loads(call("migrate_workload", "--source", "lab-1", "--target", "lab-2",
                             "--container", name, "--json"))
    assert set(result) >= {"id", "status", "downtime_ms", "bytes", "phases", "error"}
    assert result["status"] == "succeeded" and result["error"] is None
    assert result["bytes"] > 0 and result["downtime_ms"] > 0
    # The counter logs once a second: too coarse to time a sub-second outage
    # (or, this soon after its start, too few lines), and it says so.
    assert result["observed_downtime_ms"] is None
    assert result["observed_method"].startswith("docker logs: ") and result["observed_method"].endswith(" to measure")
    phase = result["phases"][0]
    assert set(phase) >= {"name", "host", "started", "duration_ms", "bytes", "criu_stats"}
    restore = next(p for p in result["phases"] if p["name"] == "restore")
    assert restore["host"] == "lab-2" and restore["criu_stats"]["restore_time"] > 0
    # A failing run exits non-zero with the run's message.
    with pytest.raises(CommandError, match=f"lab-1: no container named '{name}'"):
        call("migrate_workload", "--source", "lab-1", "--target", "lab-2", "--container", name)


@pytest.mark.lab
def test_hostile_container_name_is_only_a_name(hosts, tmp_path):
    marker = tmp_path / "pwned"
    hostile = f"a; touch {marker}; $(touch {marker})"
    # Refused as input, before any host is asked.
    with pytest.raises(CommandError, match=r"^'a; touch .* is not a container name"):
        call("migrate_workload", "--source", "lab-1", "--target", "lab-2", "--container", hostile)
    assert not marker.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--container", ""], "Name a container"),
        (["--pid", " 12"], "' 12' is not a PID"),
        (["--pid", "1"], "PID 1 is the host's init"),
        (["--container", "web", "--tcp-close", "--tcp-established"], "not allowed with argument"),
    ],
)
def test_edge_case_workloads_get_a_message(db, args, message):
    from migrations_app.models import Host

    Host.objects.create(name="h-1", address="10.0.0.1", key_path="/k")
    Host.objects.create(name="h-2", address="10.0.0.2", key_path="/k")
    with pytest.raises(CommandError, match=message):
        call("migrate_workload", "--source", "h-1", "--target", "h-2", *args)


@pytest.mark.lab
def test_lab_status_json(hosts):
    status = json.loads(call("lab", "status", "--json"))
    assert [h["name"] for h in status] == ["lab-1", "lab-2"]
    for h, host in zip(status, hosts):
        assert h["address"] == host.address and h["ssh_port"] == 22 and h["user"] == host.user
        assert h["sshd"] and h["dockerd"]
        assert h["key"] == host.key_path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--source", "nowhere", "--target", "h-2", "--container", "x"], "no host named 'nowhere'"),
        (["--source", "h-1", "--target", "h-1", "--container", "x"], "source and target must be different"),
        (["--source", "h-1", "--target", "h-2", "--pid", "12; rm -rf /"], "'12; rm -rf /' is not a PID"),
        (["--source", "h-1", "--target", "h-2", "--pid", "12", "--probe", "h-2"], "'h-2' is not an address"),
    ],
)
def test_bad_input_gets_a_message(db, args, message):
    from migrations_app.models import Host

    for name in ("h-1", "h-2"):
        Host.objects.create(name=name, address="10.0.0.1", key_path="/k")
    with pytest.raises(CommandError, match=message):
        call("migrate_workload", *args)
