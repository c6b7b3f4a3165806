"""The security review's findings (issue 6), each kept fixed by a test.

Like tests/test_views.py these go through Django's test client with hosts
made in the ORM; the servers they talk to are real sockets on loopback.
"""

import csv
import io
import os
import re
import shutil
import socket
import subprocess
import sys
import threading

import pytest
from django.conf import settings
from django.contrib.auth.forms import SetPasswordForm
from django.contrib.auth.models import User
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from criuweb.private_files import make_private, private_dir, write_private_file
from migrations_app import ssh, validation
from migrations_app.models import CONTAINER, PROCESS, Host, MigrationRun
from tests.conftest import new_private_key
from tests.support import queued_runs
from tests.test_views import (  # noqa: F401  (launcher and site are fixtures)
    assert_shows,
    launcher,
    login,
    make_host,
    make_run,
    new_host_key,
    page_text,
    post_migrate,
    ready_host,
    reencoded,
    site,
)

# -- the live list of a host's workloads needs the launch permission ----------------------------


def test_workloads_json_is_refused_to_a_viewer(client, site, viewer):
    response = login(client, viewer).get("/hosts/h1/workloads.json")
    assert response.status_code == 403
    # Nor does the host page ask for it.
    html = page_text(client.get("/hosts/h1/"))
    assert "workloads.json" not in html and "js/host.js" not in html
    assert "shown to users who may launch migrations" in html


def test_workloads_json_is_open_to_an_operator(client, site, operator):
    login(client, operator)
    # 502: the permission let the request through to the host, which has no key pinned.
    response = client.get("/hosts/h1/workloads.json")
    assert response.status_code == 502 and "no host key pinned" in response.json()["error"]
    html = page_text(client.get("/hosts/h1/"))
    assert 'data-url="/hosts/h1/workloads.json"' in html and "js/host.js" in html


# -- the host-key page does not echo what a non-SSH service says -----------------------------------

SECRET_BANNER = "HTTP/1.1 400 secret-service-banner-7f3a"


@pytest.fixture
def chatty_server():
    """A TCP server on loopback that greets every client with a non-SSH banner, then hangs up."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                # More lines than paramiko reads looking for "SSH-", so it gives up
                # at once and quotes the last one.
                conn.sendall((SECRET_BANNER + "\r\n").encode() * 120)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def test_fetch_host_key_does_not_echo_a_banner(chatty_server):
    with pytest.raises(ssh.SSHError) as caught:
        ssh.fetch_host_key("127.0.0.1", chatty_server, timeout=5)
    assert str(caught.value) == f"127.0.0.1:{chatty_server}: no SSH server answered (the SSH handshake failed)"
    assert "secret" not in str(caught.value) and caught.value.__cause__ is None


def test_host_key_page_does_not_echo_a_banner(client, admin_user, db, chatty_server):
    make_host("web", address="127.0.0.1", ssh_port=chatty_server)
    response = login(client, admin_user).get("/hosts/web/key/")
    assert response.status_code == 200
    assert "secret-service-banner" not in page_text(response)
    assert_shows(response, f"127.0.0.1:{chatty_server}: no SSH server answered (the SSH handshake failed)")
    assert "Trust and pin this key" not in page_text(response)


# -- CSV export cells are never formulas -----------------------------------------------------------


@pytest.mark.parametrize("hostile", ["=1+1", "+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1", '=HYPERLINK("http://x","y")'])
def test_csv_export_neutralises_formulas(client, viewer, db, hostile):
    a, b = make_host("a"), make_host("b")
    make_run(a, b, workload=hostile, error=hostile, downtime_ms=-1.0)
    response = login(client, viewer).get("/runs/export.csv")
    [row] = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode(), newline="")))
    assert row["workload"] == "'" + hostile and row["error"] == "'" + hostile
    # Numbers are numbers, not text a spreadsheet evaluates: left as they are.
    assert row["downtime_ms"] == "-1.0"
    # The JSON export is data for programs and keeps the values exact.
    assert client.get("/runs/export.json").json()["runs"][0]["workload"] == hostile


def test_csv_export_leaves_ordinary_text_alone(client, viewer, db):
    a, b = make_host("a"), make_host("b")
    make_run(a, b, workload="web-1", error="lab-2: criu restore failed = no")
    response = login(client, viewer).get("/runs/export.csv")
    [row] = list(csv.DictReader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert (row["workload"], row["error"]) == ("web-1", "lab-2: criu restore failed = no")


# -- workload references: one module's grammar -----------------------------------------------------


@pytest.mark.parametrize("value", ["counter", "a", "web_1.blue-2", "0a1b2c3d4e5f", "f" * 64, "A9"])
def test_container_ref_accepts_docker_names_and_ids(value):
    assert validation.container_ref(value) == value


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "Name a container."),
        ("", "Name a container."),
        (" counter", "' counter' is not a container name"),
        ("counter\n", "'counter\\n' is not a container name"),
        ("-rm", "'-rm' is not a container name"),
        ("_x", "'_x' is not a container name"),
        (".x", "'.x' is not a container name"),
        ("/counter", "'/counter' is not a container name"),
        ("a;b", "'a;b' is not a container name"),
        ("a b", "'a b' is not a container name"),
        ("é", "'é' is not a container name"),
        ("a" * 256, "at most 255 characters"),
        (12, "12 is not a container name."),
    ],
)
def test_container_ref_refuses(value, message):
    with pytest.raises(validation.InputError) as caught:
        validation.container_ref(value)
    assert message in str(caught.value)


@pytest.mark.parametrize("value, expected", [("12", 12), ("2", 2), ("4194304", 4194304), (4242, 4242)])
def test_pid_accepts_plain_positive_integers(value, expected):
    assert validation.pid(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (None, "Give the PID of the process tree to move."),
        ("", "Give the PID of the process tree to move."),
        (" 12", "' 12' is not a PID"),
        ("12 ", "'12 ' is not a PID"),
        ("12\n", "'12\\n' is not a PID"),
        ("+12", "'+12' is not a PID"),
        ("012", "'012' is not a PID"),
        ("1_2", "'1_2' is not a PID"),
        ("١٢", "'١٢' is not a PID"),  # Arabic-Indic digits: int() would take them
        ("12; rm -rf /", "'12; rm -rf /' is not a PID"),
        ("0", "'0' is not a PID"),
        ("-1", "'-1' is not a PID"),
        (0, "0 is not a PID: PIDs go from 2"),
        (-1, "-1 is not a PID: PIDs go from 2"),
        ("4194305", "PIDs go from 2 to 4194304"),
        (True, "True is not a PID"),
        (12.0, "12.0 is not a PID"),
        ("1", "PID 1 is the host's init; it cannot be moved."),
        (1, "PID 1 is the host's init; it cannot be moved."),
    ],
)
def test_pid_refuses(value, message):
    with pytest.raises(validation.InputError) as caught:
        validation.pid(value)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "fields, field_message",
    [
        ({"kind": PROCESS, "pid": " 12"}, "' 12' is not a PID"),
        ({"kind": PROCESS, "pid": "1"}, "PID 1 is the host's init; it cannot be moved."),
        ({"kind": PROCESS, "pid": "0"}, "'0' is not a PID"),
        ({"kind": PROCESS, "pid": "-1"}, "'-1' is not a PID"),
        ({"kind": PROCESS, "pid": ""}, "Give the PID of the process tree to move."),
        ({"kind": CONTAINER, "container": ""}, "Name a container."),
        ({"kind": CONTAINER, "container": " web"}, "' web' is not a container name"),
        ({"kind": CONTAINER, "container": "web; id"}, "'web; id' is not a container name"),
    ],
)
def test_migration_form_refuses_bad_workload_references(launcher, db, fields, field_message):
    ready_host("a"), ready_host("b")
    response = post_migrate(launcher, **fields)
    assert response.status_code == 200
    assert_shows(response, field_message)
    assert "&#x27;None&#x27;" not in page_text(response)
    assert MigrationRun.objects.count() == 0 and queued_runs() == []


def test_migration_form_ignores_the_other_kinds_field(launcher, db):
    # The page may carry a PID typed before the user switched to "container".
    ready_host("a"), ready_host("b")
    response = post_migrate(launcher, kind=CONTAINER, container="web", pid=" junk")
    assert response.status_code == 302
    assert MigrationRun.objects.get().workload == "web"


# -- private keys only from the key directory ---------------------------------------------------------


def host_form(key_path, **fields):
    data = {
        "name": "h3",
        "address": "10.99.0.3",
        "ssh_port": 22,
        "user": "root",
        "key_path": key_path,
        "work_dir": "/var/lib/criuweb",
    }
    data.update(fields)
    return data


def post_host(client, admin_user, key_path):
    response = login(client, admin_user).post("/hosts/add/", host_form(key_path))
    assert response.status_code == 200, "the host was accepted"
    assert not Host.objects.filter(name="h3").exists()
    return response


def outside_message(path, key_dir):
    return f"The key file {path} is outside the key directory ({key_dir}); criuweb reads private keys only from there."


@pytest.mark.parametrize(
    "path", ["/etc/shadow", "/etc/no-such-file-here", "/proc/self/environ", "../../../etc/passwd", "/"]
)
def test_a_key_outside_the_key_directory_is_refused_alike(client, admin_user, key_dir, path):
    # A file that is there and one that is not get the same words: the form
    # must not be a way to learn which files the server has.
    response = post_host(client, admin_user, path)
    assert_shows(response, outside_message(path, key_dir))


def test_a_symlink_out_of_the_key_directory_is_refused(client, admin_user, key_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.write_bytes(new_private_key())  # even a real key: it is not in the directory
    (key_dir / "link").symlink_to(outside)
    (key_dir / "dangling").symlink_to(tmp_path / "nothing")
    for name in ("link", "dangling"):
        response = post_host(client, admin_user, str(key_dir / name))
        assert_shows(response, outside_message(str(key_dir / name), key_dir))


def test_a_symlink_within_the_key_directory_is_followed(client, admin_user, key_dir, key_file):
    (key_dir / "current").symlink_to(key_file)
    response = login(client, admin_user).post("/hosts/add/", host_form("current"))
    assert response.status_code == 302
    # A bare name is a file of the key directory, stored with its full path.
    assert Host.objects.get(name="h3").key_path == str(key_dir / "current")


@pytest.mark.parametrize(
    "content, message",
    [
        (lambda: bytes(range(256)) * 8, "is not a private key criuweb can use"),
        (lambda: b"", "is not a private key criuweb can use"),
        (
            lambda: b"-----BEGIN OPENSSH PRIVATE KEY-----\nnot base64\n-----END OPENSSH PRIVATE KEY-----\n",
            "is not a private key criuweb can use",
        ),
        (lambda: new_private_key()[:-60], "is not a private key criuweb can use"),
        (lambda: b"x" * (ssh.KEY_FILE_MAX + 1), "is not a private key criuweb can use"),
        (lambda: new_private_key(password=b"secret"), "is protected by a passphrase; criuweb needs a key without one"),
    ],
    ids=["binary", "empty", "bad-base64", "truncated", "huge", "passphrase"],
)
def test_a_file_that_is_no_usable_key_is_a_form_error(client, admin_user, key_dir, content, message):
    (key_dir / "bad").write_bytes(content())
    response = post_host(client, admin_user, str(key_dir / "bad"))
    assert_shows(response, message)


def test_missing_key_and_directory_in_the_key_directory(client, admin_user, key_dir):
    (key_dir / "sub").mkdir()
    assert_shows(post_host(client, admin_user, "absent"), "There is no key file absent in the key directory.")
    assert_shows(post_host(client, admin_user, "sub"), "The key file sub is not a regular file.")


def test_connecting_rereads_the_key_from_the_key_directory(db, key_dir, key_file, tmp_path):
    # A host stored before the rule, or whose key was swapped for a symlink
    # afterwards: refused before any connection is made (port 9 would say
    # "cannot reach" otherwise).
    host = Host(name="old", address="127.0.0.1", ssh_port=9, key_path="/etc/shadow", host_key=new_host_key())
    with pytest.raises(ssh.SSHError, match=r"^old: The key file /etc/shadow is outside the key directory"):
        ssh.open_client(host)
    swapped = key_dir / "swapped"
    swapped.symlink_to("/etc/ssh/ssh_host_ed25519_key")
    host.key_path = str(swapped)
    with pytest.raises(ssh.SSHError, match=r"^old: The key file .*/swapped is outside the key directory"):
        ssh.open_client(host)
    host.key_path = ""
    with pytest.raises(ssh.SSHError, match=r"^old: No private key file is set"):
        ssh.open_client(host)
    host.key_path = key_file
    with pytest.raises(ssh.SSHError, match=r"^old: cannot reach 127.0.0.1:9"):
        ssh.open_client(host)


# -- the admin's host form checks what the web's does ----------------------------------------------

ADMIN_ADD = "/admin/migrations_app/host/add/"


def admin_host(key_path=None, **fields):
    data = {
        "name": "h3",
        "address": "10.99.0.3",
        "ssh_port": 22,
        "user": "root",
        "key_path": key_path,
        "host_key": "",
        "work_dir": "/var/lib/criuweb",
        "max_source_runs": 1,
        "max_target_runs": 1,
    }
    data.update(fields)
    return data


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"key_path": "/etc/shadow"}, "The key file /etc/shadow is outside the key directory"),
        ({"name": "a b"}, "Enter a valid “slug”"),
        ({"address": "10.0.0.1; rm -rf /"}, "An address is a host name or an IP address, without spaces."),
        ({"ssh_port": 70000}, "A port is between 1 and 65535."),
        ({"work_dir": "relative"}, "Give an absolute path."),
        ({"host_key": "garbage"}, "host key 'garbage' is not '<type> <base64>'"),
        ({"host_key": "TRUNCATED"}, "This host key is truncated or has extra bytes; copy it whole."),
    ],
)
def test_admin_host_form_refuses(client, admin_user, key_file, fields, message):
    fields = {"key_path": key_file, **fields}
    if fields.get("host_key") == "TRUNCATED":
        fields["host_key"] = reencoded(new_host_key(), lambda raw: raw[:-8])
    response = login(client, admin_user).post(ADMIN_ADD, admin_host(**fields))
    assert response.status_code == 200
    assert_shows(response, message)
    assert not Host.objects.exists()


def test_admin_host_form_accepts_a_good_host(client, admin_user, key_file):
    key = new_host_key()
    response = login(client, admin_user).post(ADMIN_ADD, admin_host(key_file, host_key=key, address=" 10.99.0.3 "))
    assert response.status_code == 302, page_text(response)
    host = Host.objects.get(name="h3")
    assert (host.address, host.key_path, host.host_key) == ("10.99.0.3", key_file, key)


def test_admin_edit_of_the_address_unpins_the_key(client, admin_user, key_file):
    host = make_host("h3", key_path=key_file, host_key=new_host_key(), address="10.99.0.3")
    url = f"/admin/migrations_app/host/{host.pk}/change/"
    data = admin_host(key_file, host_key=host.host_key)
    login(client, admin_user)
    assert client.post(url, dict(data, user="cw")).status_code == 302
    host.refresh_from_db()
    assert host.user == "cw" and host.host_key  # same place, same key
    assert client.post(url, dict(data, user="cw", address="10.99.0.4")).status_code == 302
    host.refresh_from_db()
    assert host.address == "10.99.0.4" and host.host_key == ""


# -- files only this server's user may read ---------------------------------------------------------


def mode(path):
    return os.stat(path).st_mode & 0o777


def test_var_database_and_secret_key_are_private(db):
    from django.db import connection

    connection.ensure_connection()
    assert mode(settings.VAR_DIR) == 0o700
    assert mode(settings.SSH_KEY_DIR) == 0o700
    assert mode(settings.VAR_DIR / "secret_key") == 0o600
    if connection.vendor == "sqlite":
        # The test database file, made fresh by this session's test runner
        # (PostgreSQL's files belong to its server, in a directory of mode 0700).
        assert mode(connection.settings_dict["NAME"]) == 0o600


def test_settings_make_var_and_the_secret_key_private(tmp_path):
    # The settings module of a fresh checkout (a copy of criuweb/ with no var/
    # yet), loaded by a process with the usual umask.
    shutil.copytree(settings.BASE_DIR / "criuweb", tmp_path / "criuweb", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "CRIUWEB_KEY_DIR")}
    load = [sys.executable, "-c", "import criuweb.settings as s; print(s.SECRET_KEY)"]
    first = subprocess.run(
        load,
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        preexec_fn=lambda: os.umask(0o022),
        timeout=60,
    )
    var = tmp_path / "var"
    assert (mode(var), mode(var / "keys"), mode(var / "secret_key")) == (0o700, 0o700, 0o600)
    key = (var / "secret_key").read_text()
    assert len(key) >= 50 and first.stdout.strip() == key
    assert sorted(p.name for p in var.iterdir()) == ["keys", "secret_key"]  # no temporary file left
    # A var/ and key file left open by an older version are closed up; the key stays.
    var.chmod(0o755)
    (var / "secret_key").chmod(0o644)
    again = subprocess.run(load, cwd=tmp_path, env=env, check=True, capture_output=True, text=True, timeout=60)
    assert again.stdout.strip() == key
    assert (mode(var), mode(var / "secret_key")) == (0o700, 0o600)


def test_a_new_database_is_private(tmp_path):
    # A database made from nothing by `migrate` in a process with the usual umask.
    database = tmp_path / "fresh.sqlite3"
    env = dict(os.environ, DJANGO_SETTINGS_MODULE="criuweb.settings", DATABASE_URL=f"sqlite:///{database}")
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "-v0"],
        cwd=settings.BASE_DIR,
        env=env,
        check=True,
        preexec_fn=lambda: os.umask(0o022),
        timeout=120,
    )
    assert mode(database) == 0o600


def test_write_private_file(tmp_path):
    target = tmp_path / "secret"
    old_umask = os.umask(0)  # even a process that would make every file world-writable
    try:
        assert write_private_file(target, "one") is True
    finally:
        os.umask(old_umask)
    assert target.read_text() == "one" and mode(target) == 0o600
    # replace=False: the first writer's content stays (two processes starting at once).
    assert write_private_file(target, "two", replace=False) is False
    assert target.read_text() == "one"
    assert write_private_file(target, "three") is True and target.read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["secret"]  # no temporary file left


def test_make_private_and_private_dir(tmp_path):
    loose = tmp_path / "loose"
    loose.write_text("x")
    loose.chmod(0o644)
    make_private(loose)
    assert mode(loose) == 0o600
    existing = tmp_path / "dir"
    existing.mkdir(mode=0o755)
    private_dir(existing)
    assert mode(existing) == 0o700


# -- the first administrator's password goes to a file, never to the terminal -----------------------


def test_ensure_admin_writes_the_password_to_a_private_file(db, settings, tmp_path, monkeypatch):
    monkeypatch.delenv("CRIUWEB_ADMIN_PASSWORD", raising=False)
    settings.ADMIN_PASSWORD_FILE = tmp_path / "admin-password"
    out = io.StringIO()
    call_command("ensure_admin", stdout=out)
    password = settings.ADMIN_PASSWORD_FILE.read_text().strip()
    assert mode(settings.ADMIN_PASSWORD_FILE) == 0o600
    assert password not in out.getvalue() and str(settings.ADMIN_PASSWORD_FILE) in out.getvalue()
    assert User.objects.get(username="admin").check_password(password)
    # A second call leaves the administrator and the file alone.
    call_command("ensure_admin", stdout=io.StringIO())
    assert settings.ADMIN_PASSWORD_FILE.read_text().strip() == password


def test_ensure_admin_with_a_chosen_password(db, settings, tmp_path, monkeypatch):
    settings.ADMIN_PASSWORD_FILE = tmp_path / "admin-password"
    monkeypatch.setenv("CRIUWEB_ADMIN_PASSWORD", "pw")
    with pytest.raises(CommandError, match="CRIUWEB_ADMIN_PASSWORD is refused: This password is too short"):
        call_command("ensure_admin", stdout=io.StringIO())
    assert not User.objects.exists()
    chosen = "correct horse battery staple 7"
    monkeypatch.setenv("CRIUWEB_ADMIN_PASSWORD", chosen)
    out = io.StringIO()
    call_command("ensure_admin", stdout=out)
    assert chosen not in out.getvalue() and "CRIUWEB_ADMIN_PASSWORD" in out.getvalue()
    assert User.objects.get(username="admin").check_password(chosen)
    assert not settings.ADMIN_PASSWORD_FILE.exists()


# -- logins: a rate limit and password rules ------------------------------------------------------------


def login_post(client, password, **extra):
    return client.post("/login/", {"username": "viewer", "password": password, "next": "/runs/"}, **extra)


def test_failed_logins_lock_the_address_out(client, viewer, settings):
    limit = settings.AXES_FAILURE_LIMIT
    for _ in range(limit - 1):
        assert login_post(client, "wrong").status_code == 200  # the form again, with its error
    # The limit-th failure locks the address: now even the right password is refused.
    assert login_post(client, "wrong").status_code == 429
    response = login_post(client, "pw")
    assert response.status_code == 429
    assert_shows(response, f"After {limit} failed logins, logins from your address are refused")
    assert "_auth_user_id" not in client.session
    # Another address is not locked out.
    response = login_post(client, "pw", REMOTE_ADDR="127.0.0.9")
    assert response.status_code == 302 and response.url == "/runs/"


def test_a_successful_login_starts_the_count_anew(client, viewer, settings):
    limit = settings.AXES_FAILURE_LIMIT
    for _ in range(limit - 1):
        login_post(client, "wrong")
    assert login_post(client, "pw").status_code == 302
    client.logout()
    for _ in range(limit - 1):
        assert login_post(client, "wrong").status_code == 200
    assert login_post(client, "pw").status_code == 302


def test_behind_the_proxy_the_lockout_follows_the_forwarded_address(client, viewer, settings):
    settings.BEHIND_PROXY = True
    # Behind a proxy every request comes from its address; X-Forwarded-For's
    # last entry is the one the proxy saw, earlier ones are the client's say.
    for i in range(settings.AXES_FAILURE_LIMIT):
        login_post(client, "wrong", HTTP_X_FORWARDED_FOR=f"6.6.6.{i}, 192.0.2.7")
    assert login_post(client, "pw", HTTP_X_FORWARDED_FOR="192.0.2.7").status_code == 429
    assert login_post(client, "pw", HTTP_X_FORWARDED_FOR="192.0.2.8").status_code == 302


@pytest.mark.parametrize(
    "password, message",
    [
        ("short1", "This password is too short. It must contain at least 12 characters."),
        ("123456789012", "This password is entirely numeric."),
        ("password1234", "This password is too common."),
        ("margaret.hamilton1", "The password is too similar to the username."),
    ],
)
def test_password_rules(db, password, message):
    user = User.objects.create_user("margaret.hamilton")
    with pytest.raises(ValidationError) as caught:
        validate_password(password, user)
    assert message in caught.value.messages


def test_password_forms_apply_the_rules(viewer):
    # The forms of the admin and `changepassword` check passwords the same way.
    form = SetPasswordForm(viewer, {"new_password1": "password1234", "new_password2": "password1234"})
    assert not form.is_valid() and "This password is too common." in form.errors["new_password2"]


# -- production mode: what `check --deploy` asks for, from the environment -----------------------------


def manage(*argv, **env):
    full_env = dict(os.environ, DJANGO_SETTINGS_MODULE="criuweb.settings", ALLOWED_HOSTS="criuweb.example.org")
    full_env.pop("DEBUG", None)
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", *argv],
        cwd=settings.BASE_DIR,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def deploy_warnings(result):
    return set(re.findall(r"\(([a-z_]+\.[WE]\d+)\)", result.stdout + result.stderr))


def test_check_deploy_in_production_mode():
    result = manage("check", "--deploy", CRIUWEB_PRODUCTION="True")
    # W021 (HSTS preload) alone stays: preloading is the domain owner's choice,
    # hard to undo, and CRIUWEB_HSTS_PRELOAD=True turns it on.
    assert deploy_warnings(result) == {"security.W021"}, result.stdout + result.stderr
    result = manage("check", "--deploy", CRIUWEB_PRODUCTION="True", CRIUWEB_HSTS_PRELOAD="True")
    assert result.returncode == 0 and "System check identified no issues" in result.stdout, result.stdout
    # Without production mode the same check finds what the mode fixes.
    assert {"security.W004", "security.W008", "security.W012", "security.W016"} <= deploy_warnings(
        manage("check", "--deploy")
    )


@pytest.mark.parametrize(
    "env, message",
    [
        ({"CRIUWEB_PRODUCTION": "yes"}, "CRIUWEB_PRODUCTION must be True or False, not 'yes'"),
        ({"CRIUWEB_PRODUCTION": "true"}, "CRIUWEB_PRODUCTION must be True or False, not 'true'"),
        ({"CRIUWEB_PRODUCTION": "True", "DEBUG": "True"}, "DEBUG must be False when CRIUWEB_PRODUCTION is True"),
        (
            {"CRIUWEB_PRODUCTION": "True", "CRIUWEB_HSTS_SECONDS": "a year"},
            "CRIUWEB_HSTS_SECONDS must be a whole number, not 'a year'",
        ),
    ],
)
def test_production_settings_refuse_unclear_values(env, message):
    result = manage("check", **env)
    assert result.returncode != 0 and message in result.stderr


def test_production_mode_redirects_to_https_and_sends_hsts(client, settings, viewer):
    # The values production mode sets, applied to this test's settings.
    settings.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    settings.SECURE_SSL_REDIRECT = True
    settings.SESSION_COOKIE_SECURE = settings.CSRF_COOKIE_SECURE = True
    settings.SECURE_HSTS_SECONDS = 3600
    response = client.get("/login/")
    assert response.status_code == 301 and response.url == "https://testserver/login/"
    response = client.get("/login/", HTTP_X_FORWARDED_PROTO="https")
    assert response.status_code == 200 and response["Strict-Transport-Security"].startswith("max-age=3600")
    assert response.cookies["csrftoken"]["secure"] is True
