"""Settings for criuweb, read from the environment.

SQLite is the default so that a checkout just works; DATABASE_URL switches
to another database (postgres://user:pass@host/db).
"""

import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .private_files import make_private, private_dir, write_private_file

BASE_DIR = Path(__file__).resolve().parent.parent


def envbool(name, default):
    """Read a boolean; anything but "True"/"False" is a configuration error."""
    value = os.environ.get(name, default)
    if value not in ("True", "False"):
        raise ImproperlyConfigured(f"{name} must be True or False, not {value!r}")
    return value == "True"


def envint(name, default):
    value = os.environ.get(name, default)
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be a whole number, not {value!r}")


DEBUG = envbool("DEBUG", "False")

# var/ holds the database, the secret key, the key directory and the
# administrator's first password: nobody but this server's user reads it.
VAR_DIR = private_dir(BASE_DIR / "var")

SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    # A per-checkout key, kept out of git, so sessions survive restarts.
    _key_file = VAR_DIR / "secret_key"
    make_private(_key_file)
    if not _key_file.exists() or not _key_file.read_text().strip():
        from django.core.management.utils import get_random_secret_key

        # An empty file (an older version's interrupted first start) is replaced;
        # otherwise the first of two processes starting at once wins.
        write_private_file(_key_file, get_random_secret_key(), replace=_key_file.exists())
    SECRET_KEY = _key_file.read_text().strip()

# Where `manage.py ensure_admin` leaves the first administrator's password.
ADMIN_PASSWORD_FILE = VAR_DIR / "admin-password"

ALLOWED_HOSTS = os.environ.get("ALLOWED_HOSTS", "127.0.0.1,localhost").split(",")

# Production mode: served over HTTPS by a TLS proxy in front of gunicorn (see
# docs/configuration.md). The proxy must set X-Forwarded-Proto and
# X-Forwarded-For itself, overwriting what the client sent.
PRODUCTION = envbool("CRIUWEB_PRODUCTION", "False")
BEHIND_PROXY = PRODUCTION
if PRODUCTION:
    if DEBUG:
        raise ImproperlyConfigured("DEBUG must be False when CRIUWEB_PRODUCTION is True")
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = envint("CRIUWEB_HSTS_SECONDS", str(365 * 24 * 3600))
    # Subdomains of criuweb's own host name only; a sibling host is not covered.
    SECURE_HSTS_INCLUDE_SUBDOMAINS = envbool("CRIUWEB_HSTS_INCLUDE_SUBDOMAINS", "True")
    # Asking browsers to preload is the domain owner's decision and hard to undo,
    # so it is off unless chosen (`check --deploy` then warns: security.W021).
    SECURE_HSTS_PRELOAD = envbool("CRIUWEB_HSTS_PRELOAD", "False")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "rest_framework",
    "drf_spectacular",
    "django_tasks",
    "django_tasks_db",
    "criuweb.apps.CriuwebConfig",
    "migrations_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into its answer.
    "axes.middleware.AxesMiddleware",
]

# -- logins ---------------------------------------------------------------------------

AUTHENTICATION_BACKENDS = [
    # First: refuses a locked-out client before any password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 12}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]
# After this many failed logins from one client address, that address may not
# log in for the cool-off time (a success before then starts the count anew).
AXES_FAILURE_LIMIT = envint("CRIUWEB_LOGIN_FAILURE_LIMIT", "5")
AXES_COOLOFF_TIME = timedelta(minutes=envint("CRIUWEB_LOGIN_LOCKOUT_MINUTES", "15"))
AXES_LOCKOUT_PARAMETERS = ["ip_address"]
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_CLIENT_IP_CALLABLE = "criuweb.client_ip.client_ip"

# -- the API (migrations_app/api, docs/api.md) -------------------------------------------

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        # First: its WWW-Authenticate header makes a request without credentials a 401.
        "migrations_app.api.authentication.TokenAuthentication",
        # A logged-in browser reads the API too (unsafe methods then need the CSRF token).
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # JSON only: no browsable API, no form or multipart parsing to defend.
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": ["rest_framework.parsers.JSONParser"],
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "migrations_app.api.views.exception_handler",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "criuweb API",
    "DESCRIPTION": "Launch and follow live migrations; read runs, hosts and checkpoints. See docs/api.md.",
    "VERSION": "1",
    # The schema is served to logged-in users and token holders, as every page is.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": "/api/v1",
}

ROOT_URLCONF = "criuweb.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "criuweb.wsgi.application"

DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'criuweb.sqlite3'}",
        conn_max_age=envint("DATABASE_CONN_MAX_AGE", "0"),
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Background migration threads write while requests read.
    DATABASES["default"].setdefault("OPTIONS", {})["timeout"] = 30
    # A run writes its stage and phases while the workload is frozen, about
    # eight commits in a container move. With SQLite's rollback journal each
    # one syncs the database and its journal (11 ms median, 24 ms p90 on the
    # lab's disk under load); the write-ahead log syncs once (3 ms, 10 ms).
    # synchronous=FULL keeps every commit durable, so a stage stored before
    # acting on it survives a power loss as before.
    DATABASES["default"]["OPTIONS"].setdefault("init_command", "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedManifestStaticFilesStorage"},
}

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "cw-index"
LOGOUT_REDIRECT_URL = "login"

# Where the lab keeps its namespaces' engines, keys and logs.
LAB_ID = envint("CRIUWEB_LAB_ID", "0")
LAB_ROOT = Path(os.environ.get("CRIUWEB_LAB_ROOT", f"/var/lib/criuweb-lab{LAB_ID or ''}"))
# `manage.py lab up`/`down` hold the id's lock while they run and mark the lab
# as made by hand, so that no test session claims its id and tears it down
# (criuweb/lab_claims.py). False in the test settings, whose session holds the lock.
LAB_HAND_MADE = True
# Private keys for logging in to hosts are read only from these directories
# (checked on the real path, so a symlink cannot lead out): the key directory,
# and the lab's own, where `lab up` makes its client key.
if "CRIUWEB_KEY_DIR" in os.environ:
    SSH_KEY_DIR = Path(os.environ["CRIUWEB_KEY_DIR"])
else:
    SSH_KEY_DIR = private_dir(VAR_DIR / "keys")
SSH_KEY_DIRS = [SSH_KEY_DIR, LAB_ROOT / "keys"]
# Seconds an SSH connect may take before a host counts as unreachable.
SSH_CONNECT_TIMEOUT = envint("CRIUWEB_SSH_TIMEOUT", "10")

# How long a workload may stay frozen before its run rolls back: a base in
# seconds plus an allowance per GiB of the workload's memory (a run's
# --freeze-limit replaces both).
FREEZE_LIMIT = envint("CRIUWEB_FREEZE_LIMIT", "60")
FREEZE_LIMIT_PER_GIB = envint("CRIUWEB_FREEZE_LIMIT_PER_GIB", "30")
# Seconds a host-to-host transfer may move no byte before it fails.
STREAM_IDLE_TIMEOUT = envint("CRIUWEB_STREAM_IDLE_TIMEOUT", "20")

# Runs are executed by workers (`manage.py criuweb_worker`, docs/workers.md)
# that take them from a queue kept in the database (django-tasks' database
# backend, the backport of Django 6's django.tasks).
TASKS = {"default": {"BACKEND": "django_tasks_db.DatabaseBackend"}}
# Seconds a worker's claim on a run lasts unless it renews it (it does, a
# few times per period, while it executes the run). A run whose lease ran
# out, its worker gone, is recovered by another worker.
RUN_LEASE = envint("CRIUWEB_RUN_LEASE", "30")
# Seconds between two looks of a queued run at its hosts' free places
# (a run that ends also wakes the runs waiting for its hosts at once).
QUEUE_RETRY = envint("CRIUWEB_QUEUE_RETRY", "5")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "migrations_app": {"handlers": ["console"], "level": os.environ.get("LOG_LEVEL", "INFO")},
        "paramiko": {"handlers": ["console"], "level": "WARNING"},
    },
}
