"""`manage.py bench_workers`: runs per minute and queue wait with 1, 2, 4 ... workers.

For each worker count: that many real workers (`manage.py criuweb_worker`,
processes of their own, stopped by PID after), then every counter of the
lab moved one round at once through the queue, as the migration form does
(worker.submit). Every host is the source and the target of the same number
of runs in each round (migrations_app/fleet.py). After each round the
command checks that every run succeeded and that each workload runs exactly
once, on its target; otherwise it stops with an error.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from migrations_app import engine, fleet, inventory, lab, worker
from migrations_app.models import CONTAINER, FINISHED, PROCESS, SUCCEEDED, Host, MigrationRun

KINDS = {"process": [PROCESS], "container": [CONTAINER], "both": [CONTAINER, PROCESS]}
# Longest a round may take before the benchmark gives up (its workers are stopped).
ROUND_TIMEOUT = 30 * 60


@dataclass
class Round:
    workers: int
    runs: list[MigrationRun]
    wall_s: float  # first run queued to last run finished
    load: tuple[float, float, float]  # load average at the round's end

    @property
    def per_minute(self) -> float:
        return len(self.runs) / self.wall_s * 60

    @property
    def waits_s(self) -> list[float]:
        return sorted((r.started - r.created).total_seconds() for r in self.runs)

    @property
    def durations_s(self) -> list[float]:
        return sorted((r.finished - r.started).total_seconds() for r in self.runs)

    @property
    def most_at_once(self) -> int:
        """The most runs executing at one moment (what the workers and the hosts' limits allowed)."""
        edges = sorted([(r.started, 1) for r in self.runs] + [(r.finished, -1) for r in self.runs])
        at_once = most = 0
        for _, step in edges:  # an end sorts before a start at the same instant
            at_once += step
            most = max(most, at_once)
        return most


class Command(BaseCommand):
    help = "Runs per minute and queue wait with 1, 2, 4 ... workers on the lab (runs launched through the queue)."

    def add_arguments(self, parser):
        parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="worker counts, in order")
        parser.add_argument(
            "--runs", type=int, default=8, help="runs per worker count: one per workload, an equal share per host"
        )
        parser.add_argument("--hosts", type=int, default=4, help="lab hosts to spread the workloads over")
        parser.add_argument("--kind", choices=KINDS, default="both", help="counter processes, containers or both")

    def handle(self, workers, runs, hosts, kind, **options):
        if any(n < 1 for n in workers):
            raise CommandError("--workers: each count must be at least 1")
        if hosts < 2 or runs % hosts or not 0 < runs // hosts < hosts:
            raise CommandError(f"--runs must be a multiple of --hosts ({hosts}), with 1 to {hosts - 1} runs per host")
        lab_hosts = self._lab(hosts)
        tag = f"bench-workers-{uuid.uuid4().hex[:6]}"
        logs = settings.BASE_DIR / "var" / tag
        logs.mkdir(parents=True)
        self.stdout.write(
            f"{runs} runs per round ({kind}) on {', '.join(h.name for h in lab_hosts)}; "
            f"workers' logs in {logs}; load average {_load()}"
        )
        workloads = fleet.spread(lab_hosts, runs, KINDS[kind], tag)
        rounds = []
        try:
            for w in workloads:
                _wait(lambda: len(fleet.values(w)) >= 2, 30, f"{w.ref} on {w.host.name} did not start counting")
            for n in workers:
                rounds.append(self._round(lab_hosts, workloads, n, logs))
                r = rounds[-1]
                self.stdout.write(
                    f"{n} worker(s): {len(r.runs)} runs in {r.wall_s:.1f} s, {r.per_minute:.1f} runs/min, "
                    f"queue wait median {statistics.median(r.waits_s):.1f} s"
                )
        finally:
            fleet.stop_all(lab_hosts, workloads)
        self._table(rounds)

    def _lab(self, count: int) -> list[Host]:
        """The first count lab hosts, up and probed; the lab grown to count hosts if it has fewer."""
        if len(lab.hosts()) < count or not all(s["sshd"] and s["dockerd"] for s in lab.status()):
            self.stdout.write(f"bringing the lab up with {max(count, len(lab.hosts()))} hosts")
            lab.up(log=self.stdout.write, count=max(count, len(lab.hosts())))
        for h in lab.hosts():
            lab.register(h)
        lab.trust_pair()
        hosts = [Host.objects.get(name=lab.host(i).name) for i in range(1, count + 1)]
        for host in hosts:
            if not inventory.probe(host)["ok"]:
                raise CommandError(f"{host.name} fails its probe: {host.capabilities.get('error')}")
        return hosts

    def _round(self, hosts: list[Host], workloads: list[fleet.Workload], n: int, logs: Path) -> Round:
        procs = [_start_worker(logs / f"{n}-workers-{i + 1}.log") for i in range(n)]
        try:
            for proc in procs:
                _wait(lambda: proc.poll() is not None or "Starting worker" in proc.log.read_text(), 120,
                      f"worker {proc.pid} did not start (see {proc.log})")  # fmt: skip
                if proc.poll() is not None:
                    raise CommandError(f"worker {proc.pid} exited with {proc.returncode}: see {proc.log}")
            moves = [(w, fleet.target(hosts, w)) for w in workloads]
            first = time.monotonic()
            runs = [worker.submit(engine.create_run, w.host, target, w.kind, w.ref) for w, target in moves]
            _wait(lambda: all(r.status in FINISHED for r in _refreshed(runs)), ROUND_TIMEOUT,
                  f"{n} worker(s): not every run ended in {ROUND_TIMEOUT} s")  # fmt: skip
            wall = time.monotonic() - first
        finally:
            for proc in procs:
                _stop_worker(proc)
        failed = [r for r in runs if r.status != SUCCEEDED]
        if failed:
            raise CommandError(
                f"{n} worker(s): {len(failed)} run(s) did not succeed: "
                + "; ".join(f"{r.code} {r.source} -> {r.target}: {r.status}: {r.error}" for r in failed)
            )
        for w, target in moves:
            where = fleet.running_on(hosts, w)
            if where != [target.name]:
                raise CommandError(f"{n} worker(s): {w.kind} {w.ref} runs on {where}, not once on {target.name}")
            fleet.moved(w, target, fleet.copies(w.argv)[0] if w.kind == PROCESS else None)
        executed_by = {r.worker for r in runs}
        if len(executed_by) > n:
            raise CommandError(f"{n} worker(s): the runs name {len(executed_by)} workers")
        return Round(n, runs, wall, os.getloadavg())

    def _table(self, rounds: list[Round]) -> None:
        self.stdout.write("")
        self.stdout.write(
            "| workers | runs | wall | runs/min | queue wait median | queue wait max | run median | most at once "
            "| load avg (1 min) |"
        )
        self.stdout.write("|---|---|---|---|---|---|---|---|---|")
        for r in rounds:
            self.stdout.write(
                f"| {r.workers} | {len(r.runs)} | {r.wall_s:.1f} s | {r.per_minute:.1f} | "
                f"{statistics.median(r.waits_s):.1f} s | {r.waits_s[-1]:.1f} s | "
                f"{statistics.median(r.durations_s):.1f} s | {r.most_at_once} | {r.load[0]:.1f} |"
            )


def _start_worker(log: Path) -> subprocess.Popen:
    """A worker as `make worker` starts it, in a process of its own, on this command's settings and database."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "criuweb_worker", "--no-startup-delay"],
            cwd=settings.BASE_DIR, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    proc.log = log
    return proc


def _stop_worker(proc: subprocess.Popen) -> None:
    # SIGTERM: the worker ends the run in hand first, as a deployment's restart would have it.
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _refreshed(runs: list[MigrationRun]) -> list[MigrationRun]:
    for run in runs:
        run.refresh_from_db()
    return runs


def _wait(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise CommandError(message)
        time.sleep(0.2)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
