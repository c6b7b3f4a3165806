"""The web pages, forms and JSON endpoints, through Django's test client.

Most tests build hosts and runs with the ORM (fake addresses: nothing
connects). Those marked `lab` talk to the test lab's real hosts.
"""

import base64
import csv
import io
import math
import os
import socket
import subprocess
import uuid
from datetime import timedelta
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.utils import timezone
from django.utils.html import escape

from migrations_app import forms as cw_forms
from migrations_app import lab, ssh
from migrations_app.docker_engine import Engine
from migrations_app.models import (
    CONTAINER,
    ENGINE,
    FAILED,
    FINISHED,
    PENDING,
    PROCESS,
    ROLLED_BACK,
    RUNNING,
    STOP_AND_COPY,
    SUCCEEDED,
    Host,
    MigrationRun,
    Phase,
)
from tests.support import queued_runs, wait_for, worker_pid

MIB = 1024 * 1024
OK_CAPS = {"ok": True, "error": "", "criu": {"version": "4.1.1", "check_ok": True, "features": {}}}


# -- helpers --------------------------------------------------------------------------


def closed_port():
    """A local port nobody listens on: connecting to it fails at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_host(name, **fields):
    """The host of that name, created if need be (fixtures share "a" and "b")."""
    fields.setdefault("address", "10.99.0.1")
    fields.setdefault("key_path", "/nonexistent/key")
    return Host.objects.get_or_create(name=name, defaults=fields)[0]


def ready_host(name, **fields):
    """A host whose recent probe passed, so the migration form does not probe it again."""
    return make_host(name, capabilities=OK_CAPS, probed=timezone.now(), **fields)


def make_run(source, target, status=SUCCEEDED, downtime_ms=None, total_bytes=0, created=None,
             kind=CONTAINER, workload="web", phases=(), **fields):
    run = MigrationRun.objects.create(
        source=source, target=target, status=status, downtime_ms=downtime_ms, total_bytes=total_bytes,
        created=created or timezone.now(), kind=kind, workload=workload, **fields,
    )
    for seq, (name, duration) in enumerate(phases, 1):
        Phase.objects.create(run=run, seq=seq, name=name, host=source.name, status="ok",
                             started=run.created, duration_ms=duration)
    return run


def login(client, user):
    client.force_login(user)
    return client


def page_text(response):
    return response.content.decode()


def assert_shows(response, text):
    """The text, as the template escapes it, is on the page."""
    assert escape(text) in page_text(response), f"{text!r} not on the page"


def new_host_key():
    """A fresh ed25519 public key in known_hosts form."""
    public = Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


def reencoded(key, change):
    """The key with its bytes changed by change(raw)."""
    kind, b64 = key.split()[:2]
    return f"{kind} {base64.b64encode(change(base64.b64decode(b64))).decode()}"


def nearest_rank(values, percent):
    """The reference: the value at rank ceil(n * percent / 100) of the sorted values."""
    ordered = sorted(values)
    return ordered[math.ceil(len(ordered) * percent / 100) - 1]


@pytest.fixture
def site(db):
    """A host with a run and its phases, for pages that need objects to show."""
    h1 = make_host("h1", address="127.0.0.1", ssh_port=closed_port())
    h2 = make_host("h2", address="10.99.0.2")
    run = make_run(h1, h2, downtime_ms=900.0, total_bytes=1000, phases=[("pre-flight", 10.0), ("checkpoint", 300.0)])
    return {"h1": h1, "h2": h2, "run": run}


# -- login and permissions ----------------------------------------------------------------

LOOK_PAGES = [
    "/",
    "/hosts/",
    "/hosts/h1/",
    "/runs/",
    "/runs/{run}/",
    "/runs/{run}.json",
    "/runs/{run}/logs.txt",
    "/runs/export.csv",
    "/runs/export.json",
    "/compare/",
    "/compare/data.json",
]
WORKLOADS = "/hosts/h1/workloads.json"
MANAGE_PAGES = ["/hosts/add/", "/hosts/h1/edit/", "/hosts/h1/key/"]


@pytest.mark.parametrize("path", LOOK_PAGES + [WORKLOADS, "/migrate/"] + MANAGE_PAGES)
def test_anonymous_get_goes_to_login(client, site, path):
    path = path.format(run=site["run"].code)
    response = client.get(path)
    assert response.status_code == 302
    assert response.url == f"/login/?next={quote(path, safe='/')}"


@pytest.mark.parametrize("path", ["/migrate/", "/hosts/add/", "/hosts/h1/edit/", "/hosts/h1/key/", "/hosts/h1/probe/"])
def test_anonymous_post_goes_to_login_and_changes_nothing(client, site, path):
    response = client.post(path, {"name": "new", "host_key": new_host_key(), "source": "h1", "target": "h2",
                                  "kind": CONTAINER, "container": "web", "strategy": ENGINE})
    assert response.status_code == 302
    assert response.url == f"/login/?next={quote(path, safe='/')}"
    assert MigrationRun.objects.count() == 1
    assert list(Host.objects.values_list("name", "host_key", "probed")) == [("h1", "", None), ("h2", "", None)]


def test_login_page_and_login_lead_back(client, viewer):
    assert client.get("/login/?next=/runs/").status_code == 200
    response = client.post("/login/", {"username": "viewer", "password": "pw", "next": "/runs/"})
    assert response.status_code == 302 and response.url == "/runs/"


@pytest.mark.parametrize("path", LOOK_PAGES)
def test_viewer_can_look(client, site, viewer, path):
    response = login(client, viewer).get(path.format(run=site["run"].code))
    assert response.status_code == 200


def test_viewer_cannot_launch(client, site, viewer, monkeypatch):
    monkeypatch.setattr(cw_forms, "Engine", FakeEngine)
    login(client, viewer)
    assert client.get("/migrate/").status_code == 403
    response = client.post("/migrate/", {"source": "h1", "target": "h2", "kind": CONTAINER, "container": "web",
                                         "strategy": ENGINE})
    assert response.status_code == 403
    assert MigrationRun.objects.count() == 1 and queued_runs() == []
    # Nor is the way there offered.
    assert 'href="/migrate/"' not in page_text(client.get("/"))
    assert "Test connection and probe" not in page_text(client.get("/hosts/h1/"))


def test_operator_can_open_the_migration_form(client, site, operator):
    login(client, operator)
    response = client.get("/migrate/")
    assert response.status_code == 200
    assert 'id="migrate-form"' in page_text(response)
    assert 'href="/migrate/"' in page_text(client.get("/"))


def test_migration_form_takes_initial_values_from_the_query(client, site, operator):
    # The host page's "migrate" links come with the source and workload filled in.
    response = login(client, operator).get("/migrate/?source=h2&container=web-7")
    html = page_text(response)
    assert '<option value="h2" selected>' in html
    assert 'value="web-7"' in html


@pytest.mark.parametrize("user", ["viewer", "operator"])
def test_host_management_needs_change_host(client, site, request, user):
    login(client, request.getfixturevalue(user))
    for path in MANAGE_PAGES:
        assert client.get(path).status_code == 403, path
        assert client.post(path, {"name": "h1", "address": "10.0.0.9", "host_key": new_host_key()}).status_code == 403
    assert client.post("/hosts/h1/probe/").status_code == 403
    host = Host.objects.get(name="h1")
    assert host.address == "127.0.0.1" and host.host_key == "" and host.probed is None
    assert not Host.objects.filter(address="10.0.0.9").exists()
    assert "Add a host" not in page_text(client.get("/hosts/"))


def test_admin_can_manage_hosts(client, site, admin_user):
    login(client, admin_user)
    for path in MANAGE_PAGES:
        assert client.get(path).status_code == 200, path
    html = page_text(client.get("/hosts/h1/"))
    assert "Test connection and probe" in html and 'href="/hosts/h1/edit/"' in html
    assert "Add a host" in page_text(client.get("/hosts/"))


def test_unknown_objects_are_404(client, site, admin_user):
    login(client, admin_user)
    code = uuid.uuid4()
    for path in ["/hosts/nope/", "/hosts/nope/edit/", "/hosts/nope/key/", f"/runs/{code}/",
                 f"/runs/{code}.json", f"/runs/{code}/logs.txt"]:
        assert client.get(path).status_code == 404, path
    assert client.post("/hosts/nope/probe/").status_code == 404


# -- the migration form ---------------------------------------------------------------------


class FakeEngine:
    """A source engine running the container "web" and holding a stopped "old" one."""

    CONTAINERS = {"web": True, "old": False}

    def __init__(self, host):
        self.host = host

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def find_container(self, name):
        if name not in self.CONTAINERS:
            return None
        return {"State": {"Running": self.CONTAINERS[name]}}


@pytest.fixture
def launcher(client, operator, monkeypatch):
    """An operator's client; the source's engine faked."""
    monkeypatch.setattr(cw_forms, "Engine", FakeEngine)
    login(client, operator)
    return client


def post_migrate(client, **fields):
    data = {"source": "a", "target": "b", "kind": CONTAINER, "container": "web", "strategy": ENGINE}
    data.update(fields)
    return client.post("/migrate/", {k: v for k, v in data.items() if v is not None})


@pytest.mark.parametrize("fields, message", [
    ({"target": "a"}, "Pick a target other than the source."),
    ({"container": ""}, "Name a container."),
    ({"kind": PROCESS, "container": None}, "Give the PID of the process tree to move."),
    ({"container": "ghost"}, "a has no container ghost."),
    ({"container": "old"}, "Container old is not running on a."),
    ({"source": "nowhere"}, "Select a valid choice. That choice is not one of the available choices."),
    ({"probe": "10.0.0.9"}, "'10.0.0.9' is not an address: give host:port, e.g. 10.0.0.5:8080"),
])
def test_migration_form_refuses(launcher, db, fields, message):
    ready_host("a"), ready_host("b")
    response = post_migrate(launcher, **fields)
    assert response.status_code == 200
    assert_shows(response, message)
    assert MigrationRun.objects.count() == 0 and queued_runs() == []


def test_migration_form_refuses_a_host_failing_its_probe(launcher, db):
    make_host("a", capabilities={"ok": False, "error": "criu check fails"}, probed=timezone.now())
    ready_host("b")
    response = post_migrate(launcher)
    assert response.status_code == 200
    assert_shows(response, "a fails its probe: criu check fails")
    assert MigrationRun.objects.count() == 0 and queued_runs() == []


def test_migration_form_probes_again_when_the_last_probe_is_old(launcher, db):
    # The stored probe passed, but an hour ago: it is run again, and now the
    # host cannot be reached (no key pinned).
    make_host("a", capabilities=OK_CAPS, probed=timezone.now() - timedelta(hours=1))
    ready_host("b")
    response = post_migrate(launcher)
    assert_shows(response, "a fails its probe: a: no host key pinned; confirm its key first")
    a = Host.objects.get(name="a")
    assert a.capabilities["ok"] is False and timezone.now() - a.probed < timedelta(minutes=1)
    assert MigrationRun.objects.count() == 0


def test_migration_form_refuses_a_workload_already_being_migrated(launcher, db):
    a, b = ready_host("a"), ready_host("b")
    busy = make_run(a, b, status=PENDING, workload="web")
    response = post_migrate(launcher)
    assert response.status_code == 200
    assert_shows(response, "web on a is already being migrated")
    assert list(MigrationRun.objects.all()) == [busy] and queued_runs() == []


def test_migration_form_starts_a_run(launcher, db):
    a, b = ready_host("a"), ready_host("b")
    make_run(a, b, status=SUCCEEDED, workload="web")  # a finished run is no obstacle
    response = post_migrate(launcher, keep_source="on", probe="10.0.0.9:8080")
    run = MigrationRun.objects.get(status=PENDING)
    assert response.status_code == 302 and response.url == f"/runs/{run.code}/"
    assert (run.source, run.target, run.kind, run.workload, run.keep_source) == (a, b, CONTAINER, "web", True)
    assert run.probe_address == "10.0.0.9:8080" and run.created_by.username == "operator"
    assert queued_runs() == [run]  # for a worker: this process only queued it


# -- host forms -----------------------------------------------------------------------------


def host_data(key_file, **fields):
    data = {"name": "h3", "address": "10.99.0.3", "ssh_port": 22, "user": "root", "key_path": key_file,
            "work_dir": "/var/lib/criuweb"}
    data.update(fields)
    return data


@pytest.mark.parametrize("fields, message", [
    ({"name": "h1"}, "A host named h1 already exists."),
    ({"address": "10.0.0.1; rm -rf /"}, "An address is a host name or an IP address, without spaces."),
    ({"key_path": "/nonexistent/id_ed25519"}, "The key file /nonexistent/id_ed25519 is outside the key directory"),
    ({"work_dir": "var/lib/criuweb"}, "Give an absolute path."),
    ({"ssh_port": 70000}, "Ensure this value is less than or equal to 65535."),
])
def test_host_form_refuses(client, site, admin_user, key_file, fields, message):
    response = login(client, admin_user).post("/hosts/add/", host_data(key_file, **fields))
    assert response.status_code == 200
    assert_shows(response, message)
    assert Host.objects.count() == 2


def test_host_add_then_its_key(client, site, admin_user, key_file):
    response = login(client, admin_user).post("/hosts/add/", host_data(key_file, address=" 10.99.0.3 "))
    assert response.status_code == 302 and response.url == "/hosts/h3/key/"
    host = Host.objects.get(name="h3")
    assert (host.address, host.key_path, host.host_key) == ("10.99.0.3", key_file, "")
    assert host.work_dir == "/var/lib/criuweb"


def test_host_edit(client, site, admin_user, key_file):
    login(client, admin_user)
    h1 = site["h1"]
    h1.host_key = new_host_key()
    h1.save()
    response = client.get("/hosts/h1/edit/")
    assert 'value="127.0.0.1"' in page_text(response)
    # Its own name is no duplicate; the same address keeps the pinned key.
    same_place = host_data(key_file, name="h1", address=h1.address, ssh_port=h1.ssh_port, user="cw")
    response = client.post("/hosts/h1/edit/", same_place)
    assert response.status_code == 302 and response.url == "/hosts/h1/"
    assert_shows(client.get(response.url), "h1 saved.")
    h1.refresh_from_db()
    assert h1.user == "cw" and h1.host_key
    # Another host's name is.
    response = client.post("/hosts/h1/edit/", dict(same_place, name="h2"))
    assert_shows(response, "A host named h2 already exists.")
    # Another address may be another machine: its key must be confirmed again.
    response = client.post("/hosts/h1/edit/", dict(same_place, address="10.99.0.7"))
    assert response.status_code == 302 and response.url == "/hosts/h1/key/"
    h1.refresh_from_db()
    assert h1.address == "10.99.0.7" and h1.host_key == ""


# -- host key and probe ------------------------------------------------------------------------


def test_host_key_page_shows_why_the_host_cannot_be_reached(client, site, admin_user):
    h1 = site["h1"]
    response = login(client, admin_user).get("/hosts/h1/key/")
    assert response.status_code == 200
    assert_shows(response, f"127.0.0.1:{h1.ssh_port}: cannot connect (no answer, or the connection was refused)")
    assert "Trust and pin this key" not in page_text(response)


def test_host_key_post_pins_the_key(client, site, admin_user):
    key = new_host_key()
    response = login(client, admin_user).post("/hosts/h1/key/", {"host_key": key})
    assert response.status_code == 302 and response.url == "/hosts/h1/"
    assert Host.objects.get(name="h1").host_key == key
    html = page_text(client.get(response.url))
    assert "Host key of h1 pinned." in html and "host key pinned" in html


TRUNCATED = "This host key is truncated or has extra bytes; copy it whole."


@pytest.mark.parametrize("bad_key, message", [
    (lambda: "garbage", "Key refused: host key 'garbage' is not '<type> <base64>'"),
    (lambda: "ssh-ed25519 !!!not-base64!!!", "Key refused: host key 'ssh-ed25519 !!!not-base64!!!' cannot be read"),
    (lambda: "ssh-rsa " + new_host_key().split()[1], "cannot be read: Invalid key"),
    (lambda: reencoded(new_host_key(), lambda raw: raw[:-8]), f"Key refused: {TRUNCATED}"),
    (lambda: reencoded(new_host_key(), lambda raw: raw + b"extra"), f"Key refused: {TRUNCATED}"),
], ids=["one-word", "not-base64", "wrong-type", "truncated", "extra-bytes"])
def test_host_key_post_refuses_a_malformed_key(client, site, admin_user, bad_key, message):
    response = login(client, admin_user).post("/hosts/h1/key/", {"host_key": bad_key()})
    assert response.status_code == 200
    assert_shows(response, message)
    assert Host.objects.get(name="h1").host_key == ""


def test_host_key_post_keeps_a_comment(client, site, admin_user):
    key = new_host_key() + " root@h1"
    assert login(client, admin_user).post("/hosts/h1/key/", {"host_key": key}).status_code == 302
    assert Host.objects.get(name="h1").host_key == key


def test_probe_of_an_unreachable_host(client, site, admin_user):
    login(client, admin_user)
    assert client.get("/hosts/h1/probe/").status_code == 405
    response = client.post("/hosts/h1/probe/", follow=True)
    assert response.redirect_chain == [("/hosts/h1/", 302)]
    assert_shows(response, "h1: h1: no host key pinned; confirm its key first")
    h1 = Host.objects.get(name="h1")
    assert h1.capabilities["ok"] is False and h1.probed is not None
    assert "not ready" in page_text(response)


def test_workloads_of_an_unreachable_host(client, site, operator):
    response = login(client, operator).get(WORKLOADS)
    assert response.status_code == 502
    assert response.json() == {"error": "h1: no host key pinned; confirm its key first"}


# -- runs: list, filters, pagination ---------------------------------------------------------


@pytest.fixture
def runs(db):
    a, b, c = make_host("a"), make_host("b"), make_host("c")
    t0 = timezone.now() - timedelta(days=1)
    made = {
        "ab-web": make_run(a, b, workload="web-1", created=t0),
        "ba-web": make_run(b, a, workload="web-1", status=FAILED, created=t0 + timedelta(minutes=1)),
        "ac-db": make_run(a, c, workload="db", status=ROLLED_BACK, created=t0 + timedelta(minutes=2)),
        "cb-pid": make_run(c, b, workload="4242", kind=PROCESS, created=t0 + timedelta(minutes=3)),
        "bc-run": make_run(b, c, workload="WEB-2", status=RUNNING, created=t0 + timedelta(minutes=4)),
    }
    return made


def listed(response):
    return [run.code for run in response.context["page"].object_list]


@pytest.mark.parametrize("query, expected", [
    ("", ["bc-run", "cb-pid", "ac-db", "ba-web", "ab-web"]),
    ("host=a", ["ac-db", "ba-web", "ab-web"]),
    ("host=c", ["bc-run", "cb-pid", "ac-db"]),
    ("workload=web", ["bc-run", "ba-web", "ab-web"]),
    ("kind=process", ["cb-pid"]),
    ("kind=container&status=succeeded", ["ab-web"]),
    ("strategy=stop-and-copy", ["bc-run", "cb-pid", "ac-db", "ba-web", "ab-web"]),
    ("status=rolled_back", ["ac-db"]),
    ("host=b&workload=web&status=failed", ["ba-web"]),
    # A filter that cannot be read matches nothing, rather than everything.
    ("host=nowhere", []),
    ("status=bogus", []),
])
def test_run_list_filters(client, runs, viewer, query, expected):
    response = login(client, viewer).get(f"/runs/?{query}")
    assert response.status_code == 200
    assert listed(response) == [runs[name].code for name in expected]
    html = page_text(response)
    for name, run in runs.items():
        assert (f'href="/runs/{run.code}/"' in html) == (name in expected)


def test_run_list_links_keep_the_filters(client, runs, viewer):
    html = page_text(login(client, viewer).get("/runs/?host=a&status=failed"))
    assert 'href="/runs/export.csv?host=a&amp;status=failed"' in html
    assert 'href="/runs/export.json?host=a&amp;status=failed"' in html
    assert 'href="/compare/?host=a&amp;status=failed"' in html
    assert "1 run ·" in html


def test_run_list_pages(client, viewer, db):
    a, b = make_host("a"), make_host("b")
    t0 = timezone.now() - timedelta(days=1)
    made = [make_run(a, b, workload=f"w{i}", created=t0 + timedelta(minutes=i)) for i in range(60)]
    newest_first = [r.code for r in reversed(made)]
    login(client, viewer)
    first = client.get("/runs/?kind=container")
    assert listed(first) == newest_first[:50]
    html = page_text(first)
    assert "60 runs" in html and "page 1 of 2" in html
    assert 'href="?kind=container&page=2"' in html and "newer" not in html
    second = client.get("/runs/?kind=container&page=2")
    assert listed(second) == newest_first[50:]
    assert 'href="?kind=container&page=1"' in page_text(second)
    # A page past the end or not a number shows the last or the first.
    assert listed(client.get("/runs/?page=9")) == newest_first[50:]
    assert listed(client.get("/runs/?page=x")) == newest_first[:50]


def make_many(n, a, b):
    t0 = timezone.now() - timedelta(days=1)
    for i in range(n):
        make_run(a, b, workload=f"w{i}", downtime_ms=100.0 + i, total_bytes=1000 * i, created=t0 + timedelta(seconds=i),
                 phases=[("pre-flight", 5.0), ("checkpoint", 40.0), ("restore", 60.0)])
        make_run(b, a, workload=f"w{i}", status=FAILED, created=t0 + timedelta(seconds=i, milliseconds=500))


@pytest.mark.parametrize("n", [5, 60])
def test_run_list_queries_do_not_grow_with_runs(client, viewer, django_assert_num_queries, n):
    a, b = make_host("a"), make_host("b")
    make_many(n // 2, a, b)
    make_many(n - n // 2, b, a)
    login(client, viewer)
    # Session, user, the user's and groups' permissions (the menu), count, the
    # page's runs with their hosts, the hosts of the filter form.
    with django_assert_num_queries(7):
        response = client.get("/runs/")
    assert len(listed(response)) == min(2 * n, 50)
    # Filtering by host adds the host's lookup, whatever the number of runs.
    with django_assert_num_queries(8):
        client.get("/runs/?host=a&status=succeeded")


@pytest.mark.parametrize("n", [5, 60])
def test_compare_json_queries_do_not_grow_with_runs(client, viewer, django_assert_num_queries, n):
    a, b = make_host("a"), make_host("b")
    make_many(n, a, b)
    login(client, viewer)
    # Session, user; runs over time; downtime by size; latest runs and their phases; one per grouping.
    with django_assert_num_queries(2 + 1 + 1 + 2 + 3):
        data = client.get("/compare/data.json").json()
    assert len(data["over_time"]) == n
    assert len(data["phases"]["labels"]) == min(n, 50)
    assert data["groups"]["host_pair"][0]["count"] == n
    assert len(data["by_size"]) == n - 1  # the run that moved 0 bytes has no place on log axes


# -- run detail, JSON and logs --------------------------------------------------------------


@pytest.fixture
def detailed_run(db):
    a, b = make_host("a"), make_host("b")
    t0 = timezone.now() - timedelta(minutes=5)
    run = MigrationRun.objects.create(
        source=a, target=b, kind=CONTAINER, workload="web", status=ROLLED_BACK, created=t0,
        started=t0, finished=t0 + timedelta(seconds=3), downtime_ms=812.5, total_bytes=230_000,
        expected_bytes=250_000, result_workload="abc123", observed_downtime_ms=790.25,
        observed_method="probe of 10.0.0.1:80 every 10 ms: longest time between two answers", probe_address="10.0.0.1:80",
        error="b: criu restore failed: boom (see restore.log excerpt)",
    )
    Phase.objects.create(run=run, seq=1, name="pre-flight", host="both", status="ok", started=t0,
                         ended=t0 + timedelta(milliseconds=120), duration_ms=120.0, detail="both hosts ready")
    Phase.objects.create(run=run, seq=2, name="checkpoint", host="a", status="ok", started=t0 + timedelta(seconds=1),
                         ended=t0 + timedelta(seconds=1, milliseconds=330), duration_ms=330.0, bytes=230_000,
                         criu_stats={"freezing_time": 1200, "frozen_time": 250000})
    Phase.objects.create(run=run, seq=3, name="restore", host="b", status="failed", started=t0 + timedelta(seconds=2),
                         duration_ms=480.0, criu_stats={"restore_time": 9000},
                         log_excerpt="Error (criu/cr-restore.c:1): boom",
                         log="(00.000001) Version: 4.1.1\n(00.1) Error (criu/cr-restore.c:1): boom\n")
    return run


def test_run_detail_page(client, detailed_run, viewer):
    response = login(client, viewer).get(f"/runs/{detailed_run.code}/")
    html = page_text(response)
    assert "<code>web</code>: a → b" in html
    assert "rolled back" in html and "813 ms" in html and "abc123" in html
    assert "790 ms" in html and "probe of 10.0.0.1:80 every 10 ms" in html
    assert_shows(response, detailed_run.error)
    assert f'href="/runs/{detailed_run.code}/logs.txt"' in html
    assert f'data-url="/runs/{detailed_run.code}.json"' in html
    for name in ("pre-flight", "checkpoint", "restore"):
        assert f"<td>{name}</td>" in html
    assert response.context["finished"] is True


def test_run_json(client, detailed_run, viewer):
    data = login(client, viewer).get(f"/runs/{detailed_run.code}.json").json()
    assert data["id"] == str(detailed_run.code)
    assert data["status"] == ROLLED_BACK and data["finished"] is True
    assert (data["source"], data["target"], data["kind"], data["workload"]) == ("a", "b", CONTAINER, "web")
    assert data["downtime_ms"] == 812.5 and data["bytes"] == 230_000 and data["expected_bytes"] == 250_000
    assert data["observed_downtime_ms"] == 790.25 and data["observed_method"].startswith("probe of 10.0.0.1:80")
    assert data["probe"] == "10.0.0.1:80" and data["benchmark"] is None
    assert data["result_workload"] == "abc123" and data["error"] == detailed_run.error
    assert data["started"] == detailed_run.started.isoformat()
    phases = data["phases"]
    assert [(p["seq"], p["name"], p["host"], p["status"]) for p in phases] == [
        (1, "pre-flight", "both", "ok"), (2, "checkpoint", "a", "ok"), (3, "restore", "b", "failed")]
    assert [p["duration_ms"] for p in phases] == [120.0, 330.0, 480.0]
    assert [p["bytes"] for p in phases] == [0, 230_000, 0]
    assert [p["criu_stats"] for p in phases] == [None, {"freezing_time": 1200, "frozen_time": 250000},
                                                 {"restore_time": 9000}]
    assert [p["log_excerpt"] for p in phases] == ["", "", "Error (criu/cr-restore.c:1): boom"]
    assert [p["has_log"] for p in phases] == [False, False, True]
    assert phases[0]["detail"] == "both hosts ready" and phases[1]["detail"] is None
    assert phases[0]["ended"] is not None and phases[2]["ended"] is None
    # Polling does not carry whole logs.
    assert all("log" not in p for p in phases)


def test_run_json_of_an_unfinished_run(client, viewer, db):
    run = make_run(make_host("a"), make_host("b"), status=RUNNING)
    data = login(client, viewer).get(f"/runs/{run.code}.json").json()
    assert data["status"] == RUNNING and data["finished"] is False
    assert data["phases"] == [] and data["started"] is None and data["error"] is None


def test_run_logs_download(client, detailed_run, viewer):
    response = login(client, viewer).get(f"/runs/{detailed_run.code}/logs.txt")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/plain; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="criuweb-run-{detailed_run.code}.log"'
    text = response.content.decode()
    assert text.startswith(f"criuweb run {detailed_run.code}: container web: a -> b — rolled_back\n")
    assert f"error: {detailed_run.error}\n" in text
    assert "===== 1 pre-flight on both: ok =====\nboth hosts ready\n" in text
    assert "===== 3 restore on b: failed =====" in text
    assert "--- log excerpt ---\nError (criu/cr-restore.c:1): boom\n" in text
    assert "--- log ---\n(00.000001) Version: 4.1.1\n(00.1) Error (criu/cr-restore.c:1): boom\n" in text


# -- export ---------------------------------------------------------------------------------


EXPORT_FIELDS = ["id", "created", "status", "kind", "workload", "source", "target", "strategy",
                 "downtime_ms", "bytes", "duration_ms", "error"]


def test_export_csv(client, detailed_run, runs, viewer):
    response = login(client, viewer).get("/runs/export.csv")
    assert response.status_code == 200 and response["Content-Type"] == "text/csv"
    assert response["Content-Disposition"] == 'attachment; filename="criuweb-runs.csv"'
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert len(rows) == 6 and list(rows[0]) == EXPORT_FIELDS
    row = next(r for r in rows if r["id"] == str(detailed_run.code))
    assert row == {
        "id": str(detailed_run.code), "created": detailed_run.created.isoformat(), "status": ROLLED_BACK,
        "kind": CONTAINER, "workload": "web", "source": "a", "target": "b", "strategy": STOP_AND_COPY,
        "downtime_ms": "812.5", "bytes": "230000", "duration_ms": "3000.0", "error": detailed_run.error,
    }


def test_export_csv_with_filters(client, runs, viewer):
    response = login(client, viewer).get("/runs/export.csv?host=a&workload=web")
    rows = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert [r["id"] for r in rows] == [str(runs["ba-web"].code), str(runs["ab-web"].code)]
    assert [(r["source"], r["target"], r["status"]) for r in rows] == [("b", "a", FAILED), ("a", "b", SUCCEEDED)]
    assert rows[0]["downtime_ms"] == "" and rows[0]["duration_ms"] == ""


def test_export_json_with_filters(client, runs, detailed_run, viewer):
    login(client, viewer)
    everything = client.get("/runs/export.json").json()["runs"]
    assert len(everything) == 6 and list(everything[0]) == EXPORT_FIELDS
    exported = client.get("/runs/export.json?host=c&status=succeeded").json()["runs"]
    assert [r["id"] for r in exported] == [str(runs["cb-pid"].code)]
    assert exported[0]["kind"] == PROCESS and exported[0]["workload"] == "4242"
    assert exported[0]["duration_ms"] is None and exported[0]["downtime_ms"] is None
    assert client.get("/runs/export.json?kind=process&host=a").json() == {"runs": []}


def test_export_of_an_unknown_format(client, runs, viewer):
    assert login(client, viewer).get("/runs/export.xml").status_code == 404


# -- comparison -----------------------------------------------------------------------------

# (source, target, downtime ms, bytes) of successful runs with known percentiles.
SAMPLES = [
    ("a", "b", 500, 200_000), ("a", "b", 100, 300_000), ("a", "b", 300, MIB - 1), ("a", "b", 200, MIB),
    ("a", "b", 400, 5 * MIB),
    *[("b", "a", ms, 2 * MIB) for ms in (130, 20, 200, 70, 10, 160, 90, 40, 180, 110, 60, 150, 30, 190, 80,
                                         120, 50, 170, 100, 140)],
    ("a", "c", 40, 300 * MIB), ("a", "c", 10, 256 * MIB), ("a", "c", 30, 400 * MIB), ("a", "c", 20, 20 * MIB),
]


def size_label(nbytes):
    if nbytes < MIB:
        return "< 1 MiB"
    if nbytes < 16 * MIB:
        return "1-16 MiB"
    if nbytes < 256 * MIB:
        return "16-256 MiB"
    return ">= 256 MiB"


def expected_groups(samples, key):
    groups = {}
    for sample in samples:
        groups.setdefault(key(sample), []).append(sample[2])
    return [{"group": g, "count": len(v), "median_ms": nearest_rank(v, 50), "p95_ms": nearest_rank(v, 95)}
            for g, v in sorted(groups.items())]


@pytest.fixture
def compared(db):
    hosts = {name: make_host(name) for name in "abc"}
    t0 = timezone.now() - timedelta(days=2)
    made = []
    for i, (s, t, ms, nbytes) in enumerate(SAMPLES):
        made.append(make_run(hosts[s], hosts[t], downtime_ms=float(ms), total_bytes=nbytes,
                             created=t0 + timedelta(minutes=i),
                             phases=[("checkpoint", ms * 0.25), ("transfer", 1.0), ("restore", ms * 0.75),
                                     ("transfer", 2.0)]))
    # Neither failed, rolled back nor unfinished runs, nor one without a downtime, count.
    a, b = hosts["a"], hosts["b"]
    later = t0 + timedelta(hours=5)
    make_run(a, b, status=ROLLED_BACK, downtime_ms=1.0, created=later, phases=[("checkpoint", 1.0)])
    make_run(a, b, status=FAILED, downtime_ms=99999.0, created=later)
    make_run(a, b, status=RUNNING, downtime_ms=5.0, created=later)
    make_run(b, a, status=SUCCEEDED, downtime_ms=None, created=t0 - timedelta(minutes=1), phases=[("pre-flight", 3.0)])
    return made


def test_compare_groups_nearest_rank(client, compared, viewer):
    groups = login(client, viewer).get("/compare/data.json").json()["groups"]
    # Worked by hand: nearest rank, never interpolated.
    assert groups["host_pair"] == [
        {"group": "a → b", "count": 5, "median_ms": 300.0, "p95_ms": 500.0},
        {"group": "a → c", "count": 4, "median_ms": 20.0, "p95_ms": 40.0},
        {"group": "b → a", "count": 20, "median_ms": 100.0, "p95_ms": 190.0},
    ]
    assert groups["strategy"] == [{"group": STOP_AND_COPY, "count": 29, "median_ms": 100.0, "p95_ms": 400.0}]
    assert groups["size"] == [
        {"group": "1-16 MiB", "count": 22, "median_ms": 110.0, "p95_ms": 200.0},
        {"group": "16-256 MiB", "count": 1, "median_ms": 20.0, "p95_ms": 20.0},
        {"group": "< 1 MiB", "count": 3, "median_ms": 300.0, "p95_ms": 500.0},
        {"group": ">= 256 MiB", "count": 3, "median_ms": 30.0, "p95_ms": 40.0},
    ]
    # And the same as the straightforward computation.
    assert groups["host_pair"] == expected_groups(SAMPLES, lambda s: f"{s[0]} → {s[1]}")
    assert groups["size"] == expected_groups(SAMPLES, lambda s: size_label(s[3]))


def test_compare_over_time_and_phases(client, compared, viewer):
    data = login(client, viewer).get("/compare/data.json").json()
    over_time = data["over_time"]
    # Successful runs, oldest first (the one without a downtime too: it is a point with no value).
    assert len(over_time) == 30 and over_time[0]["downtime_ms"] is None
    assert [r["id"] for r in over_time[1:]] == [str(r.code) for r in compared]
    assert over_time[1] == {"id": str(compared[0].code), "created": compared[0].created.isoformat(),
                            "downtime_ms": 500.0, "bytes": 200_000, "kind": CONTAINER, "strategy": STOP_AND_COPY}
    phases = data["phases"]
    assert phases["labels"] == [r["created"] for r in over_time]
    assert set(phases["phases"]) == {"pre-flight", "checkpoint", "transfer", "restore"}
    assert phases["phases"]["pre-flight"] == [3.0] + [0.0] * 29
    assert phases["phases"]["checkpoint"][1:] == [s[2] * 0.25 for s in SAMPLES]
    assert phases["phases"]["restore"][1:] == [s[2] * 0.75 for s in SAMPLES]
    # Two transfers in one run add up.
    assert phases["phases"]["transfer"] == [0.0] + [3.0] * 29


def test_compare_json_filters(client, compared, viewer):
    login(client, viewer)
    data = client.get("/compare/data.json?host=c").json()
    assert data["groups"]["host_pair"] == [{"group": "a → c", "count": 4, "median_ms": 20.0, "p95_ms": 40.0}]
    assert data["groups"]["strategy"] == [{"group": STOP_AND_COPY, "count": 4, "median_ms": 20.0, "p95_ms": 40.0}]
    assert len(data["over_time"]) == 4 and len(data["phases"]["labels"]) == 4
    empty = client.get("/compare/data.json?kind=process").json()
    assert empty == {"over_time": [], "phases": {"labels": [], "phases": {}}, "by_size": [],
                     "groups": {"strategy": [], "host_pair": [], "size": []}}


def test_compare_downtime_by_size(client, viewer, db):
    a, b = make_host("a"), make_host("b")
    t0 = timezone.now() - timedelta(hours=1)
    mib = 1024 * 1024
    make_run(a, b, kind=PROCESS, strategy=STOP_AND_COPY, downtime_ms=900.0, total_bytes=64 * mib,
             observed_downtime_ms=880.0, benchmark="bm", created=t0)
    make_run(a, b, kind=PROCESS, strategy="page-server", tls=True, downtime_ms=400.0, total_bytes=64 * mib,
             created=t0 + timedelta(minutes=1))
    # The baseline: CRIU alone on one host, stored as a run from a host to itself.
    make_run(a, a, kind=PROCESS, strategy="baseline", downtime_ms=170.0, total_bytes=64 * mib, benchmark="bm",
             created=t0 + timedelta(minutes=2))
    make_run(a, b, kind=PROCESS, status=FAILED, downtime_ms=5.0, total_bytes=mib, created=t0)  # not a success
    data = login(client, viewer).get("/compare/data.json").json()
    assert data["by_size"] == [
        {"strategy": "baseline", "kind": PROCESS, "tls": None, "bytes": 64 * mib, "downtime_ms": 170.0,
         "observed_ms": None},
        {"strategy": "page-server", "kind": PROCESS, "tls": True, "bytes": 64 * mib, "downtime_ms": 400.0,
         "observed_ms": None},
        {"strategy": STOP_AND_COPY, "kind": PROCESS, "tls": None, "bytes": 64 * mib, "downtime_ms": 900.0,
         "observed_ms": 880.0},
    ]
    # The baseline is a strategy group of its own in the percentiles too.
    assert [g["group"] for g in data["groups"]["strategy"]] == ["baseline", "page-server", STOP_AND_COPY]


def test_compare_json_filters_by_benchmark(client, viewer, db):
    a, b = make_host("a"), make_host("b")
    mine = make_run(a, b, downtime_ms=10.0, total_bytes=1024, benchmark="bm-1")
    make_run(a, a, downtime_ms=5.0, total_bytes=1024, benchmark="bm-1", strategy="baseline")
    make_run(a, b, downtime_ms=20.0, total_bytes=1024, benchmark="bm-2")
    make_run(a, b, downtime_ms=30.0, total_bytes=1024)
    login(client, viewer)
    data = client.get("/compare/data.json?benchmark=bm-1").json()
    assert sorted(p["downtime_ms"] for p in data["by_size"]) == [5.0, 10.0]
    data = client.get("/compare/data.json?benchmark=bm-1&strategy=baseline").json()
    assert [p["downtime_ms"] for p in data["by_size"]] == [5.0]
    listed_codes = [r["id"] for r in client.get("/runs/export.json?benchmark=bm-1&strategy=" + mine.strategy).json()["runs"]]
    assert listed_codes == [str(mine.code)]


def test_compare_page_passes_its_filters_on(client, compared, viewer):
    html = page_text(login(client, viewer).get("/compare/?host=c&kind=container"))
    assert 'data-url="/compare/data.json?host=c&amp;kind=container"' in html
    assert '<option value="c" selected>' in html


# -- on the lab -------------------------------------------------------------------------------


@pytest.fixture
def lab_container(hosts):
    """A fresh counter container on lab-1, removed from wherever it ends up."""
    name = f"views-{uuid.uuid4().hex[:8]}"
    with Engine(hosts[0]) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name)
    yield name
    for host in hosts:
        with Engine(host) as engine:
            if engine.exists(name):
                engine.remove(name)


@pytest.mark.lab
def test_host_page_and_workloads_on_the_lab(client, hosts, lab_container, operator):
    login(client, operator)
    response = client.get("/hosts/lab-1/")
    assert response.status_code == 200
    html = page_text(response)
    assert "<h1>lab-1</h1>" in html and 'data-url="/hosts/lab-1/workloads.json"' in html
    assert 'data-migrate-url="/migrate/"' in html
    data = client.get("/hosts/lab-1/workloads.json").json()
    assert data["host"] == "lab-1"
    mine = [c for c in data["containers"] if c["name"] == lab_container]
    assert len(mine) == 1 and mine[0]["state"] == "running" and mine[0]["image"] == lab.IMAGE
    assert data["processes"] and all(isinstance(p["pid"], int) for p in data["processes"])
    assert any(lab.COUNTER_SCRIPT in p["command"] for p in data["processes"])  # the counter's shell
    other = client.get("/hosts/lab-2/workloads.json?processes=0").json()
    assert other["processes"] == [] and lab_container not in [c["name"] for c in other["containers"]]


@pytest.mark.lab
def test_probe_on_the_lab(client, hosts, admin_user):
    response = login(client, admin_user).post("/hosts/lab-1/probe/", follow=True)
    assert_shows(response, "lab-1: connection and probe OK.")
    lab1 = Host.objects.get(name="lab-1")
    assert lab1.capabilities["ok"] is True
    criu = lab1.capabilities["criu"]
    # The CRIU setup installed, as `criu --version` on this machine reports it.
    local = subprocess.run(["criu", "--version"], capture_output=True, text=True).stdout.split()[1]
    assert criu["version"] == local
    # setup-system.sh installs a CRIU that passes the socket self-test.
    assert criu["sockets_ok"] is True and criu["sockets_error"] == ""
    # Free space as bytes, a whole number (df gives KiB; awk would print 8e+10).
    assert isinstance(lab1.capabilities["free"], int) and lab1.capabilities["free"] > 1024**2
    html = page_text(response)
    assert "ready to migrate" in html and local in html and "stop-and-copy" in html
    assert "passes: CRIU dumped and restored a process holding a listening socket" in html
    assert lab1.capabilities["self_tests"]["lazy"] == {"ok": True, "error": ""}
    assert "Self-test: lazy" in html and "Self-test: page-server" in html


@pytest.mark.lab
def test_key_page_on_the_lab(client, hosts, admin_user):
    lab1 = hosts[0]
    response = login(client, admin_user).get("/hosts/lab-1/key/")
    html = page_text(response)
    assert ssh.fingerprint(lab1.host_key) in html
    assert "This is the key already pinned." in html


@pytest.mark.lab
def test_migration_form_on_the_lab_refuses_a_missing_container(client, hosts, operator):
    name = f"absent-{uuid.uuid4().hex[:8]}"
    response = login(client, operator).post("/migrate/", {"source": "lab-1", "target": "lab-2", "kind": CONTAINER,
                                                          "container": name, "strategy": ENGINE})
    assert response.status_code == 200
    assert_shows(response, f"lab-1 has no container {name}.")
    assert MigrationRun.objects.count() == 0 and queued_runs() == []
    # Both hosts were probed on the way.
    assert all(h.probe_ok() for h in Host.objects.all())


@pytest.mark.lab
@pytest.mark.django_db(transaction=True)
def test_migrate_a_container_on_the_lab(client, hosts, lab_container, operator, worker_process):
    response = login(client, operator).post("/migrate/", {"source": "lab-1", "target": "lab-2", "kind": CONTAINER,
                                                          "container": lab_container, "strategy": ENGINE})
    assert response.status_code == 302, page_text(response)
    run = MigrationRun.objects.get()
    assert response.url == f"/runs/{run.code}/"
    run = wait_for(lambda: MigrationRun.objects.filter(pk=run.pk, status__in=FINISHED).first(), 90,
                   "the run did not finish in 90 s")
    # Executed by the worker process, not by this one (the web's).
    assert worker_pid(run) == worker_process.pid != os.getpid()
    assert run.status == SUCCEEDED, run.error
    data = client.get(f"/runs/{run.code}.json").json()
    assert data["finished"] is True and data["downtime_ms"] > 0 and data["bytes"] > 0
    assert "restore" in [p["name"] for p in data["phases"]]
    with Engine(hosts[1]) as engine:
        assert engine.inspect(lab_container)["State"]["Running"]
    with Engine(hosts[0]) as engine:
        assert not engine.exists(lab_container)
