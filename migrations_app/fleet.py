"""Small workloads spread over the lab's hosts and moved all at once: the
fleet test's and `bench_workers`' shared part.

Each host holds the same number of workloads, and each round of moves makes
every host the source of that many runs and the target of that many: the
k-th workload of a host moves k+1 hosts on (wrapping round, skipping its own
host), so every host keeps its share. Workloads are busybox counter
containers and counter processes (lab.COUNTER_SCRIPT, lab.PROCESS_COUNTER_SCRIPT),
small enough that a run is mostly criuweb's own work.

This is lab-only code: it reads counter files and /proc on this machine,
which the lab hosts share. The runs themselves go through SSH and the
Engine API like any other.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from . import lab, ssh
from .benchmark import copies
from .docker_engine import Engine
from .models import CONTAINER, PROCESS, Host


@dataclass
class Workload:
    """One counter, wherever it runs now."""

    kind: str
    host: Host
    step: int  # how many hosts on it moves each round
    ref: str  # container name or PID
    argv: list[str]  # a process's command line, unique to it ([] for a container)
    counter: Path | None = None  # where a process counts


def placement(hosts: list[Host], count: int, kinds: list[str]) -> list[tuple[Host, int, str]]:
    """(host, step, kind) of count workloads: count/len(hosts) on each host, kinds taken in turn."""
    if count % len(hosts) or not 0 < count // len(hosts) < len(hosts):
        raise ValueError(f"{count} workloads do not spread evenly over {len(hosts)} hosts (1 to {len(hosts) - 1} each)")
    # With two kinds, each host gets both: the kind turns with the host
    # and with the round of hosts.
    return [
        (hosts[i % len(hosts)], 1 + i // len(hosts), kinds[(i + i // len(hosts)) % len(kinds)]) for i in range(count)
    ]


def spread(hosts: list[Host], count: int, kinds: list[str], tag: str) -> list[Workload]:
    """Start count counters as placement() has them; those started are stopped if one fails."""
    started: list[Workload] = []
    try:
        for i, (host, step, kind) in enumerate(placement(hosts, count, kinds)):
            started.append(start(kind, host, step, f"{tag}-{i}"))
    except BaseException:
        stop_all(hosts, started)
        raise
    return started


def start(kind: str, host: Host, step: int, name: str) -> Workload:
    if kind == CONTAINER:
        with Engine(host) as engine:
            engine.run_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name)
        return Workload(CONTAINER, host, step, name, [])
    path = settings.LAB_ROOT / f"{name}.log"
    with ssh.Connection(host) as conn:
        pid = lab.start_process(conn, lab.PROCESS_COUNTER_SCRIPT, str(path))
    return Workload(PROCESS, host, step, str(pid), ["sh", "-c", lab.PROCESS_COUNTER_SCRIPT, "sh", str(path)], path)


def target(hosts: list[Host], w: Workload) -> Host:
    """Where the workload goes this round."""
    return hosts[(_index(hosts, w.host) + w.step) % len(hosts)]


def _index(hosts: list[Host], host: Host) -> int:
    return next(i for i, h in enumerate(hosts) if h.pk == host.pk)


def values(w: Workload) -> list[int]:
    """What the counter printed so far, on the host where it runs now."""
    if w.kind == CONTAINER:
        with Engine(w.host) as engine:
            return lab.counter_values(engine.logs(w.ref)) if engine.exists(w.ref) else []
    return lab.counter_values(w.counter.read_text()) if w.counter and w.counter.exists() else []


def running_on(hosts: list[Host], w: Workload) -> list[str]:
    """The hosts where a copy of the workload runs: every host's engine, or this machine's process table."""
    if w.kind == CONTAINER:
        where = []
        for host in hosts:
            with Engine(host) as engine:
                found = engine.find_container(w.ref)
                if found and found["State"]["Running"]:
                    where.append(host.name)
        return where
    return sorted(lab.host_of_pid(pid) or f"PID {pid}, outside the lab" for pid in copies(w.argv))


def moved(w: Workload, host: Host, pid: int | None = None) -> None:
    """Record that the workload now runs on host (a restored process has a new PID)."""
    w.host = host
    if pid is not None:
        w.ref = str(pid)


def stop_all(hosts: list[Host], workloads: list[Workload]) -> None:
    """Stop every copy of every workload, by container name on each host or by PID."""
    for w in workloads:
        if w.kind == CONTAINER:
            for host in hosts:
                with Engine(host) as engine:
                    if engine.exists(w.ref):
                        engine.remove(w.ref)
            continue
        for pid in copies(w.argv):
            _kill_with_holder(pid)
        if w.counter:
            w.counter.unlink(missing_ok=True)


def _kill_with_holder(pid: int) -> None:
    # A restored process sits under the python3 that holds its PID
    # namespace: both go, by PID.
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        holder = ppid if ppid > 1 and Path(f"/proc/{ppid}/cmdline").read_bytes().startswith(b"python3") else 0
    except (OSError, ValueError, IndexError):
        holder = 0
    for p in (pid, holder):
        if p:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass
