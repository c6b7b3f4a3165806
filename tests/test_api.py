"""The API (migrations_app/api) through Django's test client, and once end to end on the lab.

Hosts and runs are built with the ORM (fake addresses: nothing connects)
except in the test marked `lab`, which migrates a real container.
"""

import io
from pathlib import Path

import pytest
import yaml
from django.contrib.auth.models import User
from django.core.management import call_command
from django.utils import timezone

from migrations_app.docker_engine import Engine
from migrations_app.models import (
    CONTAINER,
    ENGINE,
    FAILED,
    FINISHED,
    PENDING,
    PROCESS,
    STOP_AND_COPY,
    SUCCEEDED,
    TCP_ESTABLISHED,
    ApiToken,
    Checkpoint,
    MigrationRun,
    Phase,
)
from tests.support import queued_runs, wait_for
from tests.test_migration_lab import assert_consecutive, values
from tests.test_views import FakeEngine, make_host, make_run, ready_host

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "docs" / "api-schema.yaml"


def bearer(secret):
    return {"HTTP_AUTHORIZATION": f"Bearer {secret}"}


@pytest.fixture
def api(client):
    """A client that calls the API with a user's token: api(user).get(...)."""

    class Api:
        def __init__(self, secret):
            self.headers = bearer(secret)

        def get(self, url, data=None):
            return client.get(url, data, **self.headers)

        def post(self, url, data=None):
            return client.post(url, data or {}, content_type="application/json", **self.headers)

    def for_user(user):
        return Api(ApiToken.issue(user, "test")[1])

    return for_user


@pytest.fixture
def queue(monkeypatch):
    """The source's engine faked; returns what the workers' queue holds (nothing here executes it)."""
    monkeypatch.setattr("migrations_app.forms.Engine", FakeEngine)
    return queued_runs


def launch_body(**fields):
    body = {"source": "a", "target": "b", "kind": CONTAINER, "workload": "web", "strategy": ENGINE}
    body.update(fields)
    return {k: v for k, v in body.items() if v is not None}


# -- tokens and authentication ----------------------------------------------------------------


def test_a_token_is_stored_as_its_hash_only(operator):
    token, secret = ApiToken.issue(operator, "ci")
    stored = ApiToken.objects.get(pk=token.pk)
    assert secret.startswith("cw_") and len(secret) > 40
    assert stored.digest == ApiToken.hash(secret) != secret
    assert secret not in [str(getattr(stored, f.attname)) for f in ApiToken._meta.fields]
    assert stored.prefix == secret[:10]


@pytest.mark.parametrize(
    "headers, message",
    [
        ({}, "Authentication credentials were not provided."),
        (bearer("cw_not-a-token"), "Invalid token (unknown or revoked)."),
        ({"HTTP_AUTHORIZATION": "Bearer two words"}, "Give one token after 'Bearer', without spaces."),
    ],
)
def test_no_or_a_bad_token_is_401_json(client, db, headers, message):
    response = client.get("/api/v1/runs/", **headers)
    assert response.status_code == 401
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"detail": message}
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_a_revoked_token_stops_working(client, operator):
    token, secret = ApiToken.issue(operator, "ci")
    assert client.get("/api/v1/runs/", **bearer(secret)).status_code == 200
    token.delete()
    assert client.get("/api/v1/runs/", **bearer(secret)).status_code == 401


def test_an_inactive_users_token_is_refused(client, operator):
    _, secret = ApiToken.issue(operator, "ci")
    operator.is_active = False
    operator.save()
    response = client.get("/api/v1/runs/", **bearer(secret))
    assert response.status_code == 401 and response.json()["detail"] == "The token's user is inactive."


def test_a_token_records_when_it_was_used(client, operator):
    token, secret = ApiToken.issue(operator, "ci")
    assert token.last_used is None
    client.get("/api/v1/hosts/", **bearer(secret))
    token.refresh_from_db()
    assert token.last_used and timezone.now() - token.last_used < timezone.timedelta(minutes=1)


def test_a_logged_in_browser_reads_the_api(client, viewer):
    client.force_login(viewer)
    assert client.get("/api/v1/hosts/").status_code == 200


# -- permissions ------------------------------------------------------------------------------


def test_a_viewer_reads_but_may_not_launch(api, viewer, queue):
    ready_host("a"), ready_host("b")
    as_viewer = api(viewer)
    assert as_viewer.get("/api/v1/runs/").status_code == 200
    response = as_viewer.post("/api/v1/runs/", launch_body())
    assert response.status_code == 403
    assert response.json() == {"detail": "Launching needs the permission 'Can launch migrations'."}
    assert MigrationRun.objects.count() == 0 and queue() == []


def test_probing_a_host_is_for_host_managers(api, operator, admin_user):
    make_host("a")  # no key pinned: the probe fails without connecting anywhere
    response = api(operator).post("/api/v1/hosts/a/probe/")
    assert response.status_code == 403 and "Can change host" in response.json()["detail"]
    response = api(admin_user).post("/api/v1/hosts/a/probe/")
    assert response.status_code == 200
    probe = response.json()["probe"]
    assert probe["ok"] is False and probe["error"] == "a: no host key pinned; confirm its key first"


# -- launching --------------------------------------------------------------------------------


def test_launch_creates_and_starts_a_run(api, operator, queue):
    a, b = ready_host("a"), ready_host("b")
    body = launch_body(
        keep_source=True, tcp=TCP_ESTABLISHED, probe="10.0.0.9:8080", shared_storage=True, freeze_limit=12.5
    )
    response = api(operator).post("/api/v1/runs/", body)
    assert response.status_code == 201, response.json()
    run = MigrationRun.objects.get()
    data = response.json()
    assert data["id"] == str(run.code) and data["status"] == PENDING and data["phases"] == []
    assert response["Location"] == data["url"] == f"http://testserver/api/v1/runs/{run.code}/"
    assert (run.source, run.target, run.kind, run.workload, run.strategy) == (a, b, CONTAINER, "web", ENGINE)
    assert (run.keep_source, run.tcp, run.probe_address, run.shared_storage) == (
        True,
        TCP_ESTABLISHED,
        "10.0.0.9:8080",
        True,
    )
    assert run.freeze_limit == 12.5 and run.created_by == operator and data["created_by"] == "operator"
    assert queue() == [run]


def test_launch_takes_the_kinds_default_strategy(api, operator, queue):
    ready_host("a"), ready_host("b")
    for strategy in (None, ""):
        MigrationRun.objects.all().delete()
        response = api(operator).post("/api/v1/runs/", launch_body(strategy=strategy))
        assert response.status_code == 201, response.json()
        assert response.json()["strategy"] == MigrationRun.objects.get().strategy == ENGINE


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"target": "a"}, "target", "Pick a target other than the source."),
        ({"workload": ""}, "workload", "This field may not be blank."),
        ({"workload": None}, "workload", "This field is required."),
        ({"kind": PROCESS, "workload": " 12"}, "workload", "' 12' is not a PID: give a positive whole number"),
        ({"kind": PROCESS, "workload": "1"}, "workload", "PID 1 is the host's init; it cannot be moved."),
        ({"workload": "a b"}, "workload", "'a b' is not a container name"),
        ({"workload": "ghost"}, "workload", "a has no container ghost."),
        ({"workload": "old"}, "workload", "Container old is not running on a."),
        ({"source": "nowhere"}, "source", "Select a valid choice."),
        ({"kind": "vm"}, "kind", '"vm" is not a valid choice.'),
        ({"strategy": "teleport"}, "strategy", "Select a valid choice. teleport is not one of the available"),
        ({"probe": "10.0.0.9"}, "probe", "'10.0.0.9' is not an address: give host:port"),
        ({"tcp": "keep"}, "tcp", '"keep" is not a valid choice.'),
        ({"keep_source": "maybe"}, "keep_source", "Must be a valid boolean."),
        ({"freeze_limit": 0}, "freeze_limit", "Give seconds between 0 and 86400"),
        ({"freeze_limit": 90000}, "freeze_limit", "Give seconds between 0 and 86400"),
    ],
)
def test_launch_refuses_bad_input_naming_the_field(api, operator, queue, fields, field, message):
    ready_host("a"), ready_host("b")
    response = api(operator).post("/api/v1/runs/", launch_body(**fields))
    assert response.status_code == 400
    data = response.json()
    assert list(data["errors"]) == [field], data
    assert data["errors"][field][0].startswith(message), data
    assert data["detail"].startswith(f"{field}: ")
    assert MigrationRun.objects.count() == 0 and queue() == []


def test_launch_refuses_a_strategy_a_host_lacks(api, operator, queue):
    # The probe passed, but without the lazy self-test: the form's refusal, naming the field.
    ready_host("a"), ready_host("b")
    response = api(operator).post("/api/v1/runs/", launch_body(strategy="lazy"))
    assert response.status_code == 400
    assert response.json()["errors"]["strategy"][0].startswith("Both hosts must support this strategy")


def test_launch_refuses_a_host_failing_its_probe(api, operator, queue):
    make_host("a", capabilities={"ok": False, "error": "criu check fails"}, probed=timezone.now())
    ready_host("b")
    response = api(operator).post("/api/v1/runs/", launch_body())
    assert response.status_code == 400
    assert response.json()["errors"] == {"source": ["a fails its probe: criu check fails"]}


def test_launch_refuses_a_body_that_is_not_json(client, operator):
    _, secret = ApiToken.issue(operator, "ci")
    response = client.post("/api/v1/runs/", "source=a", content_type="application/json", **bearer(secret))
    assert response.status_code == 400 and response.json()["detail"].startswith("JSON parse error")
    response = client.post("/api/v1/runs/", {"source": "a"}, **bearer(secret))  # a form post
    assert response.status_code == 415
    response = client.post("/api/v1/runs/", [], content_type="application/json", **bearer(secret))
    assert response.status_code == 400
    assert response.json()["errors"] == {"non_field_errors": ["Invalid data. Expected a dictionary, but got list."]}


def test_launch_of_a_workload_being_migrated_is_409(api, operator, queue):
    a, b = ready_host("a"), ready_host("b")
    busy = make_run(a, b, status=PENDING, workload="web")
    response = api(operator).post("/api/v1/runs/", launch_body())
    assert response.status_code == 409
    assert response.json() == {"detail": "web on a is already being migrated"}
    assert list(MigrationRun.objects.all()) == [busy] and queue() == []


# -- reading runs -----------------------------------------------------------------------------


def test_a_run_with_its_phases(api, viewer):
    a, b = make_host("a"), make_host("b")
    run = make_run(a, b, downtime_ms=512.0, total_bytes=4096, observed_downtime_ms=530.0, observed_method="tcp")
    Phase.objects.create(
        run=run, seq=1, name="checkpoint", host="a", status="ok", started=run.created, ended=run.created,
        duration_ms=210.0, bytes=4096, criu_stats={"frozen_time": 180000}, log="whole log", log_excerpt="tail",
    )  # fmt: skip
    response = api(viewer).get(f"/api/v1/runs/{run.code}/")
    assert response.status_code == 200
    data = response.json()
    assert data["id"] == str(run.code) and data["status"] == SUCCEEDED and data["stage"] == "preparing"
    assert (data["source"], data["target"], data["downtime_ms"], data["bytes"]) == ("a", "b", 512.0, 4096)
    assert data["observed_downtime_ms"] == 530.0 and data["error"] == ""
    [phase] = data["phases"]
    assert phase["name"] == "checkpoint" and phase["duration_ms"] == 210.0 and phase["bytes"] == 4096
    assert phase["criu_stats"] == {"frozen_time": 180000} and phase["log_excerpt"] == "tail"
    assert "log" not in phase  # the whole log is the run page's download


def test_an_unknown_run_is_404_json(api, viewer):
    response = api(viewer).get("/api/v1/runs/00000000-0000-0000-0000-000000000000/")
    assert response.status_code == 404
    assert response.json() == {"detail": "No MigrationRun matches the given query."}


def test_the_run_list_filters_as_the_history_page(api, viewer):
    a, b, c = make_host("a"), make_host("b"), make_host("c")
    web = make_run(a, b, workload="web-1", strategy=ENGINE)
    failed = make_run(b, c, status=FAILED, workload="db", error="restore failed", strategy=ENGINE)
    proc = make_run(c, a, kind=PROCESS, workload="4242", strategy=STOP_AND_COPY)
    as_viewer = api(viewer)

    def ids(**query):
        response = as_viewer.get("/api/v1/runs/", query)
        assert response.status_code == 200, response.json()
        return [r["id"] for r in response.json()["results"]]

    assert ids() == [str(proc.code), str(failed.code), str(web.code)]  # newest first
    assert ids(host="a") == [str(proc.code), str(web.code)]
    assert ids(status=FAILED) == [str(failed.code)]
    assert ids(kind=PROCESS) == [str(proc.code)]
    assert ids(workload="WEB") == [str(web.code)]
    assert ids(strategy=STOP_AND_COPY, host="c") == [str(proc.code)]
    assert ids(operation="migrate", status=SUCCEEDED) == [str(proc.code), str(web.code)]


@pytest.mark.parametrize(
    "query, field",
    [({"host": "nowhere"}, "host"), ({"status": "exploded"}, "status"), ({"kind": "vm"}, "kind")],
)
def test_a_filter_that_cannot_be_read_is_400_naming_it(api, viewer, query, field):
    make_host("a")
    response = api(viewer).get("/api/v1/runs/", query)
    assert response.status_code == 400
    assert list(response.json()["errors"]) == [field]


def test_the_run_list_is_paginated(api, viewer):
    a, b = make_host("a"), make_host("b")
    runs = [make_run(a, b, workload=f"w{i}", created=timezone.now() - timezone.timedelta(minutes=i)) for i in range(5)]
    as_viewer = api(viewer)
    first = as_viewer.get("/api/v1/runs/", {"page_size": 2}).json()
    assert first["count"] == 5 and [r["workload"] for r in first["results"]] == ["w0", "w1"]
    second = as_viewer.get(first["next"].removeprefix("http://testserver")).json()
    assert [r["workload"] for r in second["results"]] == ["w2", "w3"]
    assert as_viewer.get("/api/v1/runs/", {"page": 9}).status_code == 404
    assert len(runs) == 5


def test_queued_runs_show_their_place_in_the_queue(api, viewer):
    a, b, c = make_host("a"), make_host("b"), make_host("c")
    now = timezone.now()
    first = make_run(a, b, status=PENDING, workload="w1", created=now - timezone.timedelta(seconds=3))
    second = make_run(c, b, status=PENDING, workload="w2", created=now - timezone.timedelta(seconds=2))
    elsewhere = make_run(c, a, status=PENDING, workload="w3", created=now - timezone.timedelta(seconds=1))
    done = make_run(a, b, workload="w4")
    as_viewer = api(viewer)
    listed = {r["workload"]: r["queue_position"] for r in as_viewer.get("/api/v1/runs/").json()["results"]}
    # w3 waits behind w1 (host a) and w2 (host c); w2 behind w1 (host b).
    assert listed == {"w1": 1, "w2": 2, "w3": 3, "w4": None}
    assert as_viewer.get(f"/api/v1/runs/{second.code}/").json()["queue_position"] == 2
    assert [first.pk, elsewhere.pk, done.pk]


def test_the_run_list_costs_the_same_queries_for_many_runs(api, viewer, django_assert_max_num_queries):
    a, b = make_host("a"), make_host("b")
    for i in range(30):
        make_run(a, b, workload=f"w{i}", created_by=viewer, status=PENDING if i % 2 else SUCCEEDED)
    as_viewer = api(viewer)
    # Token lookup, last_used, count, page, queue: no query per run for its hosts, user or queue position.
    with django_assert_max_num_queries(5):
        response = as_viewer.get("/api/v1/runs/")
    assert len(response.json()["results"]) == 30


# -- hosts and checkpoints --------------------------------------------------------------------


def test_hosts_with_their_probe_results(api, viewer):
    caps = {
        "ok": True,
        "error": "",
        "criu": {"version": "4.2.1", "check_ok": True, "features": {"uffd-noncoop": True}},
        "self_tests": {"page-server": {"ok": True, "error": ""}, "lazy": {"ok": False, "error": "no userfaultfd"}},
        "docker": {"version": "20.10.24", "checkpoints": True},
        "kernel": "6.18.0",
        "free": 1 << 30,
    }
    make_host("a", capabilities=caps, probed=timezone.now(), host_key="ssh-ed25519 AAAA")
    make_host("b")
    data = api(viewer).get("/api/v1/hosts/").json()
    a, b = data
    assert a["name"] == "a" and a["host_key_pinned"] is True
    assert a["probe"]["criu_version"] == "4.2.1" and a["probe"]["ok"] is True
    assert a["probe"]["self_tests"]["lazy"] == {"ok": False, "error": "no userfaultfd"}
    assert a["probe"]["kernel"] == "6.18.0" and a["probe"]["free_bytes"] == 1 << 30
    assert "page-server" in a["strategies"][PROCESS] and "lazy" not in a["strategies"][PROCESS]
    assert b["probe"] is None and b["strategies"] == {CONTAINER: [], PROCESS: []}
    assert "key_path" not in a and "host_key" not in a


def test_checkpoints(api, viewer):
    a, b = make_host("a"), make_host("b")
    Checkpoint.objects.create(name="cp-a", host=a, kind=CONTAINER, workload="web", path="/x/cp-a", size=10)
    Checkpoint.objects.create(name="cp-b", host=b, kind=PROCESS, workload="42", path="/x/cp-b")
    as_viewer = api(viewer)
    assert [c["name"] for c in as_viewer.get("/api/v1/checkpoints/", {"host": "a"}).json()["results"]] == ["cp-a"]
    data = as_viewer.get("/api/v1/checkpoints/cp-b/").json()
    assert (data["host"], data["kind"], data["workload"]) == ("b", PROCESS, "42")
    assert as_viewer.get("/api/v1/checkpoints/nope/").status_code == 404


def test_a_bug_is_a_500_json_without_traceback(api, viewer, monkeypatch):
    # No real input makes the serializer fail; faked to check what a bug looks like from outside.
    def broken(self, host):
        raise RuntimeError("secret internals")

    monkeypatch.setattr("migrations_app.api.serializers.HostSerializer.get_probe", broken)
    make_host("a")
    response = api(viewer).get("/api/v1/hosts/")
    assert response.status_code == 500
    assert response.json() == {"detail": "Internal error; the server's log has the details."}


# -- the schema -------------------------------------------------------------------------------


def test_the_schema_is_served_and_matches_the_checked_in_file(api, viewer):
    response = api(viewer).get("/api/schema/", {"format": "json"})
    assert response.status_code == 200
    served = response.json()
    assert set(served["paths"]) >= {"/api/v1/runs/", "/api/v1/runs/{code}/", "/api/v1/hosts/"}
    out = io.StringIO()
    call_command("spectacular", "--validate", "--fail-on-warn", stdout=out)
    generated = yaml.safe_load(out.getvalue())
    assert generated == served
    # docs/api-schema.yaml is regenerated by `make api-schema` when the API changes.
    assert yaml.safe_load(SCHEMA_FILE.read_text()) == generated, "docs/api-schema.yaml is stale: make api-schema"


def test_the_schema_needs_a_login(client, db):
    assert client.get("/api/schema/").status_code == 401


# -- managing tokens --------------------------------------------------------------------------


def test_a_user_creates_sees_once_and_revokes_a_token(client, viewer, admin_user):
    client.force_login(viewer)
    response = client.post("/account/tokens/", {"name": "nightly"})
    assert response.status_code == 200
    token = ApiToken.objects.get(user=viewer)
    secret = response.context["secret"]
    assert ApiToken.hash(secret) == token.digest and secret in response.content.decode()
    assert "no-store" in response["Cache-Control"]
    assert secret not in client.get("/account/tokens/").content.decode()
    assert client.get("/api/v1/hosts/", **bearer(secret)).status_code == 200
    # Someone else's token is not theirs to revoke.
    other, _ = ApiToken.issue(admin_user, "theirs")
    assert client.post(f"/account/tokens/{other.pk}/revoke/").status_code == 404
    response = client.post(f"/account/tokens/{token.pk}/revoke/")
    assert response.status_code == 302
    assert list(ApiToken.objects.all()) == [other]
    client.logout()
    assert client.get("/api/v1/hosts/", **bearer(secret)).status_code == 401


def test_an_admin_issues_a_token_for_a_user(client, admin_user, viewer):
    client.force_login(admin_user)
    response = client.post("/admin/migrations_app/apitoken/add/", {"user": viewer.pk, "name": "deploy"})
    assert response.status_code == 200, response.content.decode()[:2000]
    token = ApiToken.objects.get()
    secret = response.context["secret"]
    assert token.user == viewer and token.digest == ApiToken.hash(secret)
    assert secret in response.content.decode()
    assert client.get("/admin/migrations_app/apitoken/").status_code == 200
    assert secret not in client.get(f"/admin/migrations_app/apitoken/{token.pk}/change/").content.decode()


def test_the_api_token_command(client, viewer):
    out, err = io.StringIO(), io.StringIO()
    call_command("api_token", "create", "--user", "viewer", "--name", "ci", stdout=out, stderr=err)
    secret = out.getvalue().strip()
    token = ApiToken.objects.get()
    assert token.digest == ApiToken.hash(secret) and f"token {token.pk} for viewer" in err.getvalue()
    assert client.get("/api/v1/hosts/", **bearer(secret)).status_code == 200
    out = io.StringIO()
    call_command("api_token", "list", stdout=out)
    assert f"{token.pk}\tviewer\t{token.prefix}…\tci" in out.getvalue() and secret not in out.getvalue()
    call_command("api_token", "revoke", secret[:10], stdout=io.StringIO())
    assert not ApiToken.objects.exists()
    assert client.get("/api/v1/hosts/", **bearer(secret)).status_code == 401


def test_the_api_token_command_refuses_an_unknown_user(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="no user 'ghost'"):
        call_command("api_token", "create", "--user", "ghost", "--name", "ci")
    assert User.objects.filter(username="ghost").count() == 0


# -- end to end on the lab --------------------------------------------------------------------


@pytest.mark.lab
@pytest.mark.django_db(transaction=True)
def test_a_script_migrates_a_container_through_the_api(client, hosts, counter_container, operator, worker_process):
    _, secret = ApiToken.issue(operator, "pipeline")
    name = counter_container
    body = {"source": "lab-1", "target": "lab-2", "kind": CONTAINER, "workload": name}  # the default strategy
    response = client.post("/api/v1/runs/", body, content_type="application/json", **bearer(secret))
    assert response.status_code == 201, response.json()
    url = response["Location"].removeprefix("http://testserver")

    def finished():
        data = client.get(url, **bearer(secret)).json()
        return data if data["status"] in FINISHED else None

    data = wait_for(finished, 120, "the run did not finish in 120 s", interval=1)
    assert data["status"] == SUCCEEDED, data["error"]
    assert data["strategy"] == ENGINE and data["stage"] == "done" and data["created_by"] == "operator"
    assert data["downtime_ms"] > 0 and data["bytes"] > 0 and data["duration_ms"] >= data["downtime_ms"]
    phases = {p["name"]: p for p in data["phases"]}
    assert {"checkpoint", "transfer", "restore", "verify"} <= set(phases)
    assert phases["restore"]["criu_stats"]["restore_time"] > 0
    # Exactly one copy, running on the target, counting on from where it stopped.
    with Engine(hosts[1]) as engine:
        assert engine.inspect(name)["State"]["Running"]
        counted = wait_for(lambda: values(engine.logs(name)) if len(values(engine.logs(name))) >= 2 else None)
    assert_consecutive(counted)
    with Engine(hosts[0]) as engine:
        assert not engine.exists(name)
    # The run is in the history the API lists, found by its filters.
    listed = client.get("/api/v1/runs/", {"host": "lab-2", "workload": name}, **bearer(secret)).json()
    assert [r["id"] for r in listed["results"]] == [data["id"]]
