"""Settings for the test suite: its own lab beside the one `make run` serves."""

import fcntl
import os


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

# Static files straight from the app's folders: no collectstatic in tests.
STATIC_ROOT = None
WHITENOISE_USE_FINDERS = True
