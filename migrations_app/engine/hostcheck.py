"""Checks and small actions on a host that more than one plan needs."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from .. import criu, ssh
from ..docker_engine import Engine
from ..models import CONTAINER
from .errors import MigrationError

T = TypeVar("T")

# How long a restored workload must keep running to count as verified.
SETTLE_SECONDS = 0.5
# Room left free beyond the image estimate, for logs and CRIU's own files.
SPACE_MARGIN = 32 * 1024 * 1024


def connect(host, kind: str):
    """An open Engine (containers) or ssh.Connection (processes) to host."""
    conn = Engine(host) if kind == CONTAINER else ssh.Connection(host)
    conn.__enter__()
    return conn


def check_space(conn, path: str, need: int, what: str) -> int:
    out = conn.sh('mkdir -p "$1" && df -P -k "$1"', path).stdout.splitlines()
    avail = int(out[-1].split()[3]) * 1024
    if avail < need:
        raise MigrationError(
            f"{conn.name}: not enough free space in {path} for {what}: "
            f"{avail // 2**20} MiB free, {need // 2**20} MiB needed"
        )
    return avail


def criu_ready(conn) -> dict:
    """CRIU present and passing `criu check`; returns its version and verdict.

    No self-tests here: they cost seconds per host on every run, and the
    plans' needs read the host probe's stored results instead.
    """
    probe = criu.probe(conn, full=False)
    if not probe["installed"]:
        raise MigrationError(f"{conn.name}: CRIU is not installed ({probe['check_output']})")
    if not probe["check_ok"]:
        raise MigrationError(f"{conn.name}: `criu check` fails: {probe['check_output'][-300:]}")
    return probe


def rss_bytes(conn, pids) -> int:
    """Resident memory of some PIDs on a host: what a dump will roughly write."""
    if not pids:
        return 0
    # A process may be gone by now; it then counts as nothing.
    script = 'for p in "$@"; do awk \'/^VmRSS:/ {print $2}\' "/proc/$p/status" 2>/dev/null; done; true'
    out = conn.sh(script, *[str(p) for p in pids]).stdout.split()
    return sum(int(kb) for kb in out) * 1024


def settle(check: Callable[[], T]) -> T | None:
    """check()'s value if it holds now and is the same after SETTLE_SECONDS."""
    first = check()
    if not first:
        return None
    time.sleep(SETTLE_SECONDS)
    return first if check() == first else None


def pid_alive(conn, pid) -> str | None:
    """The start time of a live, non-zombie PID (a true value), else None."""
    r = conn.run(["cat", f"/proc/{pid}/stat"], check=False)
    if r.rc != 0:
        return None
    # Fields after the command name, which is in parentheses and may hold spaces.
    rest = r.stdout.rsplit(")", 1)[1].split()
    state, start = rest[0], rest[19]
    return None if state in ("Z", "X") else start


def unsafe_to_resume(ctx, error) -> MigrationError:
    return MigrationError(
        f"{ctx.target.name}: cannot make sure the restored copy is gone ({error}); not resuming on "
        f"{ctx.source.name}, to avoid two copies. Check {ctx.target.name}; the images stay on {ctx.source.name}. "
        f'Once {ctx.target.name} answers, `manage.py recover --run {ctx.run.code}` (the run page\'s "Recover now") '
        f"keeps a whole copy found running there or brings the workload back on {ctx.source.name}"
    )


# Send signal $1 to every process of the tree rooted at $2 (children first),
# and print the root's state letter afterwards ("-" once it is gone).
SIGNAL_TREE_SCRIPT = r"""
walk() {
    for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do walk "$c"; done
    echo "$1"
}
pids=$(walk "$2")
[ -n "$pids" ] && kill -"$1" $pids 2>/dev/null
awk '{ sub(/.*\) /, ""); print $1 }' "/proc/$2/stat" 2>/dev/null || echo -
"""


def signal_tree(conn, pid, signal: str) -> str:
    """Signal a process tree (CONT, KILL...); return its root's state letter now, "-" when gone."""
    return conn.sh(SIGNAL_TREE_SCRIPT, signal, str(pid)).stdout.strip() or "-"


def mem_available(conn) -> int:
    """Bytes of memory the host can give without swapping (MemAvailable)."""
    out = conn.run(["awk", "/^MemAvailable:/ {print $2}", "/proc/meminfo"]).stdout.strip()
    return int(out) * 1024 if out.isdigit() else 0
