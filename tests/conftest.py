import uuid

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from django.contrib.auth.models import Permission, User

from migrations_app import lab
from migrations_app.docker_engine import Engine
from migrations_app.models import Host
from tests.support import wait_for


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark what each test needs, so that `-m` can pick them (Makefile).

    lab: uses the lab (directly or through a fixture that does);
    db: touches the database (these run a second time on PostgreSQL).
    Before `-m` deselects anything, hence tryfirst.
    """
    for item in items:
        needs = set(getattr(item, "fixturenames", ()))
        if "lab_up" in needs:
            item.add_marker(pytest.mark.lab)
        # django_db_setup is behind db, transactional_db and live_server;
        # the marker alone asks for the database at run time.
        if "django_db_setup" in needs or item.get_closest_marker("django_db"):
            item.add_marker(pytest.mark.db)


@pytest.fixture(scope="session")
def lab_up(django_db_setup, django_db_blocker):
    """The test lab: two real hosts with sshd, Docker and CRIU, for the whole session.

    Built by the tests and removed by them; `make run`'s lab is another one.
    Two hosts even if a crashed session left a larger lab under this id:
    the fleet tests grow it for themselves (tests/test_fleet_lab.py).
    """
    with django_db_blocker.unblock():
        lab.up(log=lambda *a: None, count=lab.DEFAULT_HOSTS)
        # lab.up() records the hosts; tests that want them ask for `hosts`,
        # and the others count on an empty inventory.
        Host.objects.filter(name__in=[h.name for h in lab.hosts()]).delete()
        try:
            yield
        finally:
            lab.down(log=lambda *a: None)


@pytest.fixture
def hosts(lab_up, db):
    # Registered again for each test: transactional tests (the live server)
    # empty the tables when they end.
    for h in lab.HOSTS:
        lab.register(h)
    return Host.objects.get(name="lab-1"), Host.objects.get(name="lab-2")


@pytest.fixture
def counter_container(hosts):
    """A fresh counter container on lab-1, removed from wherever it ends up."""
    name = f"counter-{uuid.uuid4().hex[:8]}"
    with Engine(hosts[0]) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name)
        wait_for(lambda: len(engine.logs(name).split()) >= 2, message="counter did not start")
    yield name
    for host in hosts:
        with Engine(host) as engine:
            if engine.exists(name):
                engine.remove(name)


@pytest.fixture
def operator(db):
    """A user who may look and launch migrations (not manage hosts)."""
    user = User.objects.create_user("operator", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="launch_migration"))
    return user


@pytest.fixture
def viewer(db):
    """A user who may only look."""
    return User.objects.create_user("viewer", password="pw")


@pytest.fixture
def admin_user(db):
    return User.objects.create_superuser("boss", password="pw")


def new_private_key(password=None):
    """A fresh ed25519 private key in OpenSSH's file format."""
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, encryption)


@pytest.fixture
def key_dir(tmp_path, settings):
    """A key directory of the test's own, the only one criuweb reads keys from."""
    path = tmp_path / "keys"
    path.mkdir(mode=0o700)
    settings.SSH_KEY_DIR = path
    settings.SSH_KEY_DIRS = [path]
    return path


@pytest.fixture
def key_file(key_dir):
    path = key_dir / "id_ed25519"
    path.write_bytes(new_private_key())
    return str(path)


@pytest.fixture
def start_worker(transactional_db, tmp_path):
    """start(**env) starts a real worker process on the test database; each is stopped by its PID at the end.

    Transactional: a worker sees only what the test committed. Its output
    is in tmp_path/worker-N.log (proc.log).
    """
    from tests import support

    procs = []

    def start(**env):
        log = tmp_path / f"worker-{len(procs)}.log"
        proc = support.start_worker(log, **env)
        proc.log = log
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        support.stop_worker(proc)


@pytest.fixture
def worker_process(start_worker):
    """One real worker process, with the default lease."""
    return start_worker()
