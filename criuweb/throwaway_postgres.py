"""A throwaway PostgreSQL server for the tests and the page benchmark.

Debian's `postgresql` package gives the binaries; each server gets a fresh
cluster in a temporary directory of its own, reachable only through a unix
socket in that directory (no TCP), and is stopped by its PID and the
directory removed when its owner is done. Several test sessions on one
machine each get their own.

PostgreSQL refuses to run as root, so the cluster belongs to, and the server
runs as, the `postgres` system user the package creates. The directory is
mode 0700: only that user and root reach the socket, so the cluster trusts
every local connection.

The server is told to stop when the process that started it dies, even by
SIGKILL (PR_SET_PDEATHSIG); a directory left behind by such a death is
removed by the next start (`sweep()`).

    python -m criuweb.throwaway_postgres --database criuweb_bench -- CMD ARGS...

runs CMD with DATABASE_URL naming a fresh database on a throwaway server.
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import psycopg

PREFIX = "criuweb-pg-"
SUPERUSER = "criuweb"
SYSTEM_USER = "postgres"
PORT = 5432  # only names the socket file: nothing listens on TCP

# Durability is worthless for a cluster deleted at the end; these make the
# tests' many small transactions and the schema migrations faster.
SERVER_SETTINGS = {
    "listen_addresses": "",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",  # xdist workers, live servers and the claim-race threads
}

_PR_SET_PDEATHSIG = 1


class PostgresError(RuntimeError):
    """The throwaway server could not be set up; the message says which step failed."""


@dataclass
class Server:
    directory: Path
    process: subprocess.Popen[bytes]
    owner_pid: int = field(default_factory=os.getpid)

    @property
    def socket_dir(self) -> str:
        return str(self.directory)

    def url(self, database: str) -> str:
        """A DATABASE_URL for dj-database-url: the socket directory percent-encoded as the host."""
        return f"postgres://{SUPERUSER}@{quote(self.socket_dir, safe='')}:{PORT}/{database}"

    def create_database(self, name: str) -> None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
            raise PostgresError(f"{name!r} is not a plain database name (lower-case letters, digits, _)")
        with psycopg.connect(**connect_kwargs(self.socket_dir, "postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")

    def stop(self) -> None:
        """Fast shutdown by the postmaster's PID, then the directory removed.

        Only the process that started the server stops it: a forked child
        (a test's worker process) leaving must not take the database away.
        """
        if os.getpid() != self.owner_pid:
            return
        _stop_postmaster(self.process)
        shutil.rmtree(self.directory, ignore_errors=True)


def connect_kwargs(socket_dir: str, database: str) -> dict[str, object]:
    return {"host": socket_dir, "port": PORT, "user": SUPERUSER, "dbname": database, "connect_timeout": 5}


def bindir() -> Path:
    """The newest installed server's binaries (/usr/lib/postgresql/<major>/bin)."""
    found = sorted(
        (Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not found:
        raise PostgresError(
            "no PostgreSQL server in /usr/lib/postgresql/*/bin: install Debian's postgresql package "
            "(scripts/setup-system.sh does)"
        )
    return found[-1]


def start(timeout: float = 60.0) -> Server:
    """A fresh cluster, initialised and started; stop it with Server.stop()."""
    if os.geteuid() != 0:
        raise PostgresError(f"must run as root: the server runs as the {SYSTEM_USER!r} system user")
    sweep()
    try:
        account = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        raise PostgresError(f"no {SYSTEM_USER!r} system user: install Debian's postgresql package") from None
    bin_ = bindir()
    # The owner's PID and start time in the name, so that sweep() can tell
    # a directory whose owner died from one still in use.
    directory = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-{_start_time(os.getpid())}-"))
    try:
        os.chown(directory, account.pw_uid, account.pw_gid)
        data = directory / "data"
        as_postgres = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        init = subprocess.run(
            [str(bin_ / "initdb"), "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
             # The C locale sorts as SQLite does (by code point) and needs no locale installed.
             "--locale=C", "--no-sync", "--no-instructions"],
            capture_output=True, text=True, cwd=directory, **as_postgres,
        )  # fmt: skip
        if init.returncode != 0:
            raise PostgresError(f"initdb failed in {directory}: {init.stderr.strip() or init.stdout.strip()}")
        argv = [str(bin_ / "postgres"), "-D", str(data), "-k", str(directory), "-p", str(PORT)]
        for name, value in SERVER_SETTINGS.items():
            argv += ["-c", f"{name}={value}"]
        log = open(directory / "server.log", "wb")
        with log:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=directory,
                # Its own session: a Ctrl-C meant for pytest must not stop the
                # database under the tests' teardown.
                start_new_session=True, preexec_fn=_die_with_parent, **as_postgres,
            )  # fmt: skip
        server = Server(directory, process)
        _wait_ready(server, timeout)
        return server
    except BaseException:
        if "server" in locals():
            server.stop()
        else:
            if "process" in locals():
                _stop_postmaster(process)
            shutil.rmtree(directory, ignore_errors=True)
        raise


@contextmanager
def running() -> Iterator[Server]:
    server = start()
    try:
        yield server
    finally:
        server.stop()


def sweep() -> list[Path]:
    """Remove the directories of throwaway servers whose owner process is gone."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{PREFIX}*"):
        m = re.match(rf"{PREFIX}(\d+)-(\d+|None)-", path.name)
        if not m or _owner_alive(int(m.group(1)), m.group(2)):
            continue
        # Its server got SIGINT when the owner died; wait for the postmaster
        # if it is still shutting down, and never signal a process that is
        # not that cluster's postmaster (its PID may have been reused).
        pid = _postmaster_pid(path / "data")
        if pid and _is_postmaster_of(pid, path / "data"):
            try:
                os.kill(pid, signal.SIGQUIT)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + 10
            while _is_postmaster_of(pid, path / "data") and time.monotonic() < deadline:
                time.sleep(0.1)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server.process.poll() is not None:
            log = (server.directory / "server.log").read_text(errors="replace").strip()
            raise PostgresError(f"postgres exited with status {server.process.returncode}: {log[-2000:]}")
        try:
            with psycopg.connect(**connect_kwargs(server.socket_dir, "postgres")):
                return
        except psycopg.OperationalError as e:
            if time.monotonic() > deadline:
                raise PostgresError(f"postgres in {server.directory} not ready after {timeout:.0f} s: {e}") from None
        time.sleep(0.05)


def _stop_postmaster(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    # SIGINT: fast shutdown (ends the sessions, no checkpoint wait worth having).
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGQUIT)  # immediate shutdown: the postmaster kills its children
        process.wait(timeout=30)


def _die_with_parent() -> None:
    # Runs in the child after its user switch (which would clear the setting):
    # a fast shutdown when the process that started the server dies.
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _owner_alive(pid: int, started: str) -> bool:
    return str(_start_time(pid)) == started and started != "None"


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _is_postmaster_of(pid: int, data: Path) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return len(argv) > 2 and argv[0].endswith(b"/postgres") and str(data).encode() in argv


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m criuweb.throwaway_postgres",
        description="Run a command with DATABASE_URL naming a fresh database on a throwaway PostgreSQL server.",
    )
    parser.add_argument("--database", default="criuweb", help="the database to create (default criuweb)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name a command to run after --")
    try:
        with running() as server:
            server.create_database(args.database)
            env = dict(os.environ, DATABASE_URL=server.url(args.database))
            # A child, not exec: the server stops when the command ends.
            return subprocess.run(command, env=env).returncode
    except PostgresError as e:
        print(f"throwaway_postgres: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
