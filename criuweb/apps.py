from pathlib import Path

from django.apps import AppConfig
from django.db.backends.signals import connection_created

from .private_files import make_private


def _private_sqlite(sender, connection, **kwargs):
    """Keep an SQLite database file 0600: it holds session keys and password hashes.

    SQLite creates a new database with the process's umask (often 0644) and
    gives its journal the database's mode, so the database is enough.
    Django's test runner makes a new test database the same way.
    """
    if connection.vendor != "sqlite":
        return
    name = str(connection.settings_dict.get("NAME") or "")
    if name and not name.startswith("file:") and ":memory:" not in name:
        make_private(Path(name))


class CriuwebConfig(AppConfig):
    name = "criuweb"
    verbose_name = "criuweb"

    def ready(self):
        connection_created.connect(_private_sqlite, dispatch_uid="criuweb-private-sqlite")
