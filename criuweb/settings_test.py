"""Settings for the test suite: its own lab beside the one `make run` serves."""

import atexit
import os

from django.core.exceptions import ImproperlyConfigured

from . import lab_claims

# Lab ids the test suite may take. Each one names a bridge `cwlab<id>`, veths
# `cwv<id>-<n>` and namespaces `cw<id>-lab-<n>` (within Linux's 15 characters
# up to id 254) and the addresses 10.213.<id>.0/24 (an octet: below 255).
# Many at once: up to eight developers on a machine, each session with one
# lab per pytest-xdist worker, and tests that build a second lab beside it.
# 1-29 last: checkouts from before pytest-xdist take 1-9 for their sessions
# and 10-29 for second labs, and may run beside this one on the machine.
TEST_LAB_IDS = [*range(30, 255), *range(1, 30)]
# Which process claimed the id in CRIUWEB_LAB_ID: the xdist worker's name
# ("" outside xdist). A worker inherits its controller's environment and must
# claim a lab of its own; a process a test starts (manage.py on the test
# database) inherits its worker's and must use that worker's lab.
_OWNER_ENV = "CRIUWEB_TEST_LAB_OWNER"


def claim_lab_id():
    """The first lab id no other process holds, with its lock file (open; the lock lasts while it is).

    Two test sessions at once (two developers, CI beside a developer, or two
    xdist workers) would otherwise build, use and tear down the same lab and
    database. The lock dies with the process, so a killed session frees its id.
    """
    for lab_id in TEST_LAB_IDS:
        # A lab made by hand (CRIUWEB_LAB_ID=N manage.py lab up) holds no lock
        # between commands: not ours to take over and tear down. Its marker
        # says so; a lock file alone does not, since every id a session ever
        # used keeps one. One a killed test session left (no marker) is taken
        # over and removed at the end, as before.
        if lab_claims.is_hand_made(lab_id):
            continue
        if not lab_claims.lock_path(lab_id).exists() and os.path.exists(f"/sys/class/net/cwlab{lab_id}"):
            # A lab no test ever claimed: made by hand before labs left a marker.
            continue
        lock = lab_claims.try_lock(lab_id)
        if lock is not None:
            return lab_id, lock
    raise RuntimeError("all test lab ids 1-254 are in use")


_worker = os.environ.get("PYTEST_XDIST_WORKER", "")
if "CRIUWEB_LAB_ID" not in os.environ or os.environ.get(_OWNER_ENV, "") != _worker:
    _lab_id, _LAB_LOCK = claim_lab_id()  # kept open: the lock lives as long as the process
    os.environ["CRIUWEB_LAB_ID"] = str(_lab_id)
    os.environ[_OWNER_ENV] = _worker

from .settings import *  # noqa: E402,F401,F403

# The session holds its lab's lock itself (claim_lab_id): `manage.py lab`
# run by a test or on the test settings neither takes it again (flock locks of
# one process conflict too) nor marks the lab as made by hand.
LAB_HAND_MADE = False

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}

# A file, not memory: background migration threads and the live server's
# thread need their own connections to the same test database.
DATABASES["default"]["TEST"] = {"NAME": str(BASE_DIR / "var" / f"test-{LAB_ID}.sqlite3")}  # noqa: F405


def _throwaway_postgres():
    """The socket directory of this session's own PostgreSQL server, started here if need be.

    The process that imports these settings first (pytest, or xdist's
    controller) starts it and stops it when it exits; the processes it starts
    (xdist workers, commands run by tests) inherit the variable and share it.
    """
    if "CRIUWEB_TEST_PG_SOCKET" not in os.environ:
        from . import throwaway_postgres

        server = throwaway_postgres.start()
        atexit.register(server.stop)
        os.environ["CRIUWEB_TEST_PG_SOCKET"] = server.socket_dir
    return os.environ["CRIUWEB_TEST_PG_SOCKET"]


# CRIUWEB_TEST_DB=postgres: the same tests on PostgreSQL (`make test` runs
# the database tests again this way; docs/testing.md).
TEST_DB = os.environ.get("CRIUWEB_TEST_DB", "sqlite")
if TEST_DB == "postgres":
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.postgresql",
            "HOST": _throwaway_postgres(),
            "PORT": "5432",
            "USER": "criuweb",
            # Never created: only the test database is (xdist workers add _gwN).
            # A process a test starts (a worker) is given that test database
            # (tests/support.py process_env).
            "NAME": os.environ.get("CRIUWEB_TEST_PG_DATABASE", "criuweb"),
            "TEST": {"NAME": "test_criuweb"},
        }
    }
elif TEST_DB != "sqlite":
    raise ImproperlyConfigured(f"CRIUWEB_TEST_DB must be sqlite or postgres, not {TEST_DB!r}")

# Static files straight from the app's folders: no collectstatic in tests.
STATIC_ROOT = None
WHITENOISE_USE_FINDERS = True
