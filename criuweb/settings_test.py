"""Settings for the test suite: its own lab beside the one `make run` serves."""

import atexit
import fcntl
import os

from django.core.exceptions import ImproperlyConfigured


def _claim_lab_id():
    """The first lab id (1-9) no other test session holds, held until we exit.

    Two test sessions at once (two developers, or CI beside a developer)
    would otherwise build, use and tear down the same lab and database.
    """
    for lab_id in range(1, 10):
        lock = open(f"/run/criuweb-testlab-{lab_id}.lock", "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        globals()["_LAB_LOCK"] = lock  # kept open: the lock lives as long as the process
        return str(lab_id)
    raise RuntimeError("all test lab ids 1-9 are in use")


if "CRIUWEB_LAB_ID" not in os.environ:
    os.environ["CRIUWEB_LAB_ID"] = _claim_lab_id()

from .settings import *  # noqa: E402,F401,F403

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
