"""The checkpoints page and its actions, through Django's test client.

Hosts and checkpoints are made with the ORM (fake addresses: nothing
connects); the lab tests (test_keep_lab, test_browser) do the real thing.
"""

import os
from pathlib import Path

import pytest
from django.urls import reverse

from migrations_app.models import CHECKPOINT, CONTAINER, PROCESS, RUNNING, Checkpoint, Host, MigrationRun


@pytest.fixture
def host(db):
    return Host.objects.create(name="h1", address="10.99.0.1", key_path="/nonexistent/key")


@pytest.fixture
def checkpoint(host):
    return Checkpoint.objects.create(
        name="cp1", host=host, kind=CONTAINER, workload="web", path=f"{host.work_dir}/checkpoints/cp1",
        size=4096, config={"Name": "/web"}, criu_version="4.2.1", kernel="6.18.0", leave_running=True, freeze_ms=12,
    )  # fmt: skip


def test_the_list_shows_checkpoints_to_anyone_logged_in(client, viewer, checkpoint):
    client.force_login(viewer)
    page = client.get(reverse("cw-checkpoints")).content.decode()
    assert "cp1" in page and "4.0\xa0KB" in page and "frozen 12 ms" in page and "containerd#8401" in page
    # Who may not launch sees no actions.
    assert reverse("cw-checkpoint-clone", args=["cp1"]) not in page
    assert client.get(reverse("cw-host-checkpoints", args=["h1"])).status_code == 200
    assert client.get(reverse("cw-host-checkpoints", args=["nope"])).status_code == 404


def test_actions_need_the_launch_permission(client, viewer, checkpoint, host):
    client.force_login(viewer)
    for url in (
        reverse("cw-checkpoint-clone", args=["cp1"]),
        reverse("cw-checkpoint-restore", args=["cp1"]),
        reverse("cw-checkpoint-delete", args=["cp1"]),
        reverse("cw-checkpoint-export", args=["cp1"]),
        reverse("cw-checkpoint-import"),
        reverse("cw-host-checkpoint", args=["h1"]),
    ):
        assert client.post(url, {"new_name": "x", "kind": CONTAINER, "container": "web"}).status_code == 403
    assert Checkpoint.objects.filter(name="cp1").exists()
    assert not MigrationRun.objects.exists()


def test_operator_sees_the_actions(client, operator, checkpoint):
    client.force_login(operator)
    page = client.get(reverse("cw-checkpoints")).content.decode()
    for name in ("cw-checkpoint-clone", "cw-checkpoint-restore", "cw-checkpoint-delete", "cw-checkpoint-export"):
        assert reverse(name, args=["cp1"]) in page


@pytest.mark.parametrize("bad", ["../x", "a b", "x;reboot", "-rf", ""])
def test_hostile_clone_names_are_refused(client, operator, checkpoint, bad):
    client.force_login(operator)
    response = client.post(reverse("cw-checkpoint-clone", args=["cp1"]), {"new_name": bad}, follow=True)
    text = response.content.decode()
    assert "not a container name" in text or "needs a new name" in text
    assert not MigrationRun.objects.exists()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"kind": CONTAINER, "container": "a/b"}, "not a container name"),
        ({"kind": PROCESS, "pid": "1"}, "PID 1"),
        ({"kind": PROCESS, "pid": " 12"}, "not a PID"),
        ({"kind": CONTAINER, "container": "web", "name": "../etc"}, "not a checkpoint name"),
    ],
)
def test_hostile_checkpoint_requests_are_refused(client, operator, host, fields, message):
    client.force_login(operator)
    response = client.post(reverse("cw-host-checkpoint", args=["h1"]), fields, follow=True)
    assert message in response.content.decode()
    assert not MigrationRun.objects.exists()


def test_a_taken_checkpoint_name_is_refused(client, operator, host, checkpoint):
    client.force_login(operator)
    response = client.post(
        reverse("cw-host-checkpoint", args=["h1"]), {"kind": CONTAINER, "container": "web", "name": "cp1"}, follow=True
    )
    assert "already exists" in response.content.decode()
    assert not MigrationRun.objects.exists()


def test_a_checkpoint_in_use_is_not_deleted(client, operator, checkpoint, host):
    MigrationRun.objects.create(
        source=host, target=host, kind=CONTAINER, workload="cp1", operation="restore", strategy="restore",
        status=RUNNING, checkpoint=checkpoint,
    )  # fmt: skip
    client.force_login(operator)
    response = client.post(reverse("cw-checkpoint-delete", args=["cp1"]), follow=True)
    assert "in use by a run in progress" in response.content.decode()
    assert Checkpoint.objects.filter(name="cp1").exists()


def test_retention_is_saved_by_host_managers_only(client, operator, admin_user, host):
    client.force_login(operator)
    assert client.post(reverse("cw-host-retention", args=["h1"]), {"keep": 3}).status_code == 403
    client.force_login(admin_user)
    client.post(reverse("cw-host-retention", args=["h1"]), {"keep": 3})
    host.refresh_from_db()
    assert host.checkpoint_retention == 3


def test_the_run_filter_knows_operations(client, viewer, host):
    MigrationRun.objects.create(source=host, target=host, kind=CONTAINER, workload="w", operation=CHECKPOINT,
                                strategy=CHECKPOINT)  # fmt: skip
    other = Host.objects.create(name="h2", address="10.99.0.2", key_path="/nonexistent/key")
    MigrationRun.objects.create(source=host, target=other, kind=CONTAINER, workload="w2")
    client.force_login(viewer)
    page = client.get(reverse("cw-runs"), {"operation": CHECKPOINT}).content.decode()
    assert "checkpoint (Docker engine)" in page and "w2" not in page


@pytest.fixture
def var_dir(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    return tmp_path


def test_export_runs_in_the_background_and_its_page_offers_the_archive(client, operator, viewer, checkpoint, var_dir):
    from migrations_app.models import EXPORT, PENDING, SUCCEEDED

    # The request only queues the run for a worker (none runs here: its
    # host is a fake address nothing may connect to).
    stale = var_dir / "exports" / "old"
    stale.mkdir(parents=True)
    os.utime(stale, (0, 0))
    client.force_login(operator)
    response = client.post(reverse("cw-checkpoint-export", args=["cp1"]))
    run = MigrationRun.objects.get(operation=EXPORT)
    # The request only created the run: no archive was built in it.
    assert response.status_code == 302 and response.url == reverse("cw-run", args=[run.code])
    assert run.status == PENDING
    output = Path(run.state["output"])
    assert output.parent.parent == var_dir / "exports" and output.name == "cp1.tar.zst" and not output.exists()
    assert not stale.exists(), "archives older than a day are removed"
    url = reverse("cw-run-archive", args=[run.code])
    assert client.get(url).status_code == 404  # not written yet
    assert client.get(reverse("cw-run-json", args=[run.code])).json()["archive_url"] is None

    # Once the run wrote it: offered on the run page and sent.
    output.write_bytes(b"archive bytes")
    MigrationRun.objects.filter(pk=run.pk).update(status=SUCCEEDED)
    assert client.get(reverse("cw-run-json", args=[run.code])).json()["archive_url"] == url
    assert url in client.get(reverse("cw-run", args=[run.code])).content.decode()
    response = client.get(url)
    assert response.status_code == 200 and b"".join(response.streaming_content) == b"archive bytes"
    assert response["Content-Disposition"] == 'attachment; filename="cp1.tar.zst"'
    # Who may not export may not download either.
    client.force_login(viewer)
    assert client.get(url).status_code == 403
    assert client.get(reverse("cw-run-json", args=[run.code])).json()["archive_url"] is None


def test_no_run_names_a_file_the_web_sends(client, operator, checkpoint, host, var_dir, tmp_path_factory):
    from migrations_app.models import EXPORT, SUCCEEDED

    # A CLI export's output (anywhere on the controller) and a path that
    # leaves the exports directory: neither is sent.
    elsewhere = tmp_path_factory.mktemp("cli") / "cp1.tar.zst"
    elsewhere.write_bytes(b"secret")
    (var_dir / "exports").mkdir()
    for output in (str(elsewhere), f"{var_dir}/exports/../{elsewhere.name}", "/etc/passwd"):
        run = MigrationRun.objects.create(
            source=host, target=host, kind=CONTAINER, workload="cp1", operation=EXPORT, strategy=EXPORT,
            status=SUCCEEDED, checkpoint=checkpoint, state={"output": output},
        )  # fmt: skip
        client.force_login(operator)
        assert client.get(reverse("cw-run-archive", args=[run.code])).status_code == 404


def test_the_path_follows_the_hosts_probe(host, checkpoint):
    """runc where the probe found criuweb's runtime on every host the operation works on, else Docker's API."""
    from migrations_app.engine import keep
    from migrations_app.models import CLONE

    other = Host.objects.create(name="h2", address="10.99.0.2", key_path="/nonexistent/key")
    host.capabilities = {"ok": True, "docker": {"runtimes": ["criuweb", "runc"]}}
    host.save()
    other.capabilities = {"ok": True, "docker": {"runtimes": ["runc"]}}
    other.save()
    assert keep.create_checkpoint_run(host, CONTAINER, "web").strategy == "checkpoint-runc"
    assert keep.create_checkpoint_run(other, CONTAINER, "db").strategy == "checkpoint"
    # A restore or clone of a kept checkpoint: by its target.
    assert keep.create_restore_run(checkpoint, new_name="web2").strategy == "restore-runc"
    MigrationRun.objects.filter(operation="restore").delete()  # one run per checkpoint at a time
    assert keep.create_restore_run(checkpoint, other, "web3", operation=CLONE).strategy == "clone"
    # A live clone: both hosts.
    assert keep.create_live_clone_run(host, CONTAINER, "api", "api2").strategy == "clone-runc"
    assert keep.create_live_clone_run(host, CONTAINER, "app", "app2", target=other).strategy == "clone"
    # Processes have one path.
    assert keep.create_checkpoint_run(host, PROCESS, "1234").strategy == "checkpoint"
