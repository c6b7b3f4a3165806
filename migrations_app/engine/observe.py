"""The downtime a workload showed from outside, next to the runner's own figure.

The runner's downtime is measured on the controller's clock from the freeze
to the restore call's return. This module measures what could be seen of the
workload itself, and says how:

- a probe address (host:port): a thread of the controller opens a TCP
  connection every 10 ms during the run and asks for an answer; the longest
  time between two answers is the outage. It pauses from just before the
  freeze to the end of the freezing phase: CRIU refuses to dump a listening
  socket with a connection in its backlog ("In-flight connection") or a
  connection the workload holds, and a frozen workload answers nothing in
  that time anyway. The pause starts once every open probe connection has
  closed, so the gap still begins at a real answer, a few ms before the freeze;
- a container's own log lines: Docker timestamps each line, so the gap
  between the last line on the source and the first on the target, less the
  usual interval between lines, is the time the container did not run.

Nothing here may fail a run: an observation that cannot be made leaves the
observed downtime empty and the method says why.
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from ..models import CONTAINER, MIGRATE

if TYPE_CHECKING:
    from .runner import Context

log = logging.getLogger(__name__)

PROBE_INTERVAL = 0.010
# An attempt that has no answer after this long counts as none; attempts
# overlap, so a slow answer never delays the next attempt.
PROBE_TIMEOUT = 2.0
# Any answer counts, an error page or an orderly close included: each
# proves the workload's own code ran. A bare TCP connect would not: the
# kernel completes the handshake into the listen backlog of a frozen process.
PROBE_REQUEST = b"HEAD / HTTP/1.0\r\n\r\n"
# Log lines further apart than this say too little about a sub-second
# outage to be reported as one.
MAX_LOG_INTERVAL_MS = 100.0
LOG_TAIL = 50
# Seconds of the target's log read after the source's last line: the first
# line after the move is in it unless the copy was silent that long.
TARGET_LOG_WINDOW = 120.0


def parse_address(text: str) -> tuple[str, int]:
    """(host, port) from "host:port"; ValueError with a message for anything else."""
    host, sep, port = (text or "").strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not an address: give host:port, e.g. 10.0.0.5:8080")
    if any(c.isspace() for c in host) or host.startswith("-"):
        raise ValueError(f"{text!r} is not an address: give host:port, e.g. 10.0.0.5:8080")
    return host.strip("[]"), int(port)


class Probe:
    """Polls one or more addresses from a background thread; keeps the times of the answers."""

    def __init__(
        self, addresses: list[tuple[str, int]], interval: float = PROBE_INTERVAL, timeout: float = PROBE_TIMEOUT
    ):
        self.addresses = addresses
        self.interval = interval
        self.timeout = timeout
        self.answers: list[float] = []  # time.monotonic() of each answer
        self.attempts = 0
        self.in_flight = 0  # attempts not yet answered, failed or closed
        self.paused_at: float | None = None
        self._paused = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="criuweb-probe", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(self.timeout + 1)

    def pause(self, wait: float = 0.2) -> None:
        """Stop opening connections and wait (up to `wait` s) until none is open."""
        self._paused.set()
        self.paused_at = time.monotonic()
        deadline = self.paused_at + wait
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.001)

    def resume(self) -> None:
        self._paused.clear()

    @property
    def paused(self) -> bool:
        return self._paused.is_set()

    def first_answer(self, wait: float) -> bool:
        """Wait up to `wait` seconds for a first answer; whether one came."""
        deadline = time.monotonic() + wait
        while not self.answers and time.monotonic() < deadline:
            time.sleep(self.interval)
        return bool(self.answers)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        pending: set[asyncio.Task] = set()
        while not self._stop.is_set():
            if not self._paused.is_set():
                for address in self.addresses:
                    self.in_flight += 1
                    task = asyncio.create_task(self._attempt(*address))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                self.attempts += 1
            await asyncio.sleep(self.interval)
        for task in list(pending):
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _attempt(self, host: str, port: int) -> None:
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), self.timeout)
            writer.write(PROBE_REQUEST)
            await asyncio.wait_for(reader.read(1), self.timeout)  # b"" (closed) is an answer too
            self.answers.append(time.monotonic())
            # Until the workload closes its end: a connection it still holds
            # when it is frozen would make CRIU refuse the dump.
            await asyncio.wait_for(reader.read(), self.timeout)
        except (TimeoutError, OSError):
            pass  # no answer: what the gap between answers measures
        finally:
            if writer is not None:
                writer.close()
            self.in_flight -= 1

    def longest_gap(self, since: float | None = None) -> float | None:
        """The longest time in ms between two answers (after `since`, monotonic), or None."""
        times = sorted(t for t in self.answers if since is None or t >= since)
        if len(times) < 2:
            return None
        return max(b - a for a, b in zip(times, times[1:])) * 1000


@dataclass
class LogLine:
    at: datetime
    text: str


def parse_log(raw: str) -> list[LogLine]:
    """Lines of `docker logs --timestamps` as (time, text)."""
    lines = []
    for line in raw.splitlines():
        stamp, _, text = line.partition(" ")
        try:
            lines.append(LogLine(_parse_stamp(stamp), text))
        except ValueError:
            continue
    return lines


def _parse_stamp(stamp: str) -> datetime:
    # RFC 3339 with nanoseconds ("2026-11-26T05:12:12.123456789Z"); Python
    # reads at most microseconds.
    head, dot, frac = stamp.rstrip("Z").partition(".")
    frac = (frac + "000000")[:6] if dot else "000000"
    return datetime.fromisoformat(f"{head}.{frac}+00:00")


def log_gap(before: list[LogLine], after: list[LogLine]) -> tuple[float, float] | None:
    """(gap ms, usual interval ms) between the source's last line and the target's first after it."""
    if len(before) < 3:
        return None
    last = before[-1].at
    later = [line for line in after if line.at > last]
    if not later:
        return None
    intervals = [(b.at - a.at).total_seconds() * 1000 for a, b in zip(before, before[1:])]
    return (later[0].at - last).total_seconds() * 1000, statistics.median(intervals)


class Watch:
    """What one run observes of its workload: started before the freeze, ended after verify."""

    def __init__(self, ctx: Context):
        self.ctx = ctx
        self.probe: Probe | None = None
        self.source_lines: list[LogLine] | None = None
        self.done = False

    def start(self) -> None:
        run = self.ctx.run
        if not run.probe_address:
            return
        try:
            host, port = parse_address(run.probe_address)
        except ValueError as e:
            run.observed_method = f"probe: {e}"
            return
        addresses = [(host, port)]
        # The workload listens where it runs: a probe of the source's own
        # address follows it to the same port on the target.
        if host == self.ctx.source.address:
            addresses.append((self.ctx.target.address, port))
        self.probe = Probe(addresses)
        try:
            self.probe.start()
        except RuntimeError as e:  # no thread to be had: the run goes on unobserved
            self.probe = None
            run.observed_method = f"probe not started: {e}"
            return
        # An answer before the freeze is what makes a gap measurable; waiting
        # for it here costs time before the freeze, never during it.
        self.probe.first_answer(wait=1.0)

    def before_freeze(self) -> None:
        if self.probe:
            self.probe.pause()

    def after_freeze(self) -> None:
        if self.probe:
            self.probe.resume()

    def committed(self) -> None:
        """After verify, before cleanup: the source container's log still exists."""
        try:
            # A migration's source and target logs: other operations have no such pair.
            run = self.ctx.run
            migration = run.kind == CONTAINER and run.operation == MIGRATE
            if migration and self.ctx.src is not None and self.ctx.state.container:
                raw = self.ctx.src.logs(self.ctx.state.container["Id"], tail=LOG_TAIL, timestamps=True)
                self.source_lines = parse_log(raw)
        except Exception as e:  # an observation never fails a run
            log.info("run %s: source log not read: %s", self.ctx.run.code, e)
        self._finish()

    def finish(self) -> None:
        """When the run ends, whatever its outcome."""
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        run = self.ctx.run
        try:
            if self.probe:
                self.probe.stop()
                self._from_probe(run)
            elif self.source_lines is not None:
                self._from_logs(run)
        except Exception as e:
            log.info("run %s: no observed downtime: %s", run.code, e)
            run.observed_method = run.observed_method or f"not observed: {e}"
        run.observed_method = run.observed_method[:255]

    def _from_probe(self, run) -> None:
        names = " and ".join(f"{h}:{p}" for h, p in self.probe.addresses)
        gap = self.probe.longest_gap()
        method = f"probe of {names} every {PROBE_INTERVAL * 1000:.0f} ms: longest time between two answers"
        if self.probe.paused:
            run.observed_method = f"{method} — the run ended before probing resumed after the freeze"
            return
        if self.probe.paused_at is not None and not any(t > self.probe.paused_at for t in self.probe.answers):
            run.observed_method = f"{method} — no answer after the freeze"
            return
        if gap is None:
            run.observed_method = f"{method} — too few answers ({len(self.probe.answers)}) to measure"
            return
        run.observed_downtime_ms = gap
        run.observed_method = method

    def _from_logs(self, run) -> None:
        target_id = self.ctx.state.target_id
        raw = ""
        if self.ctx.dst and self.source_lines:
            # The target's lines from the source's last one on, not its last
            # lines: a run whose copy ran for seconds before this (a post-copy's
            # page pull, a slow verify) has long pushed its first lines out of
            # any tail, and the first line seen would overstate the gap.
            last = self.source_lines[-1].at.timestamp()
            raw = self.ctx.dst.logs(target_id, timestamps=True, since=last, until=last + TARGET_LOG_WINDOW)
        found = log_gap(self.source_lines or [], parse_log(raw))
        if found is None:
            run.observed_method = "docker logs: too few lines before and after the move to measure"
            return
        gap, interval = found
        if interval > MAX_LOG_INTERVAL_MS:
            run.observed_method = f"docker logs: lines every {interval:.0f} ms are too far apart to measure"
            return
        run.observed_downtime_ms = max(gap - interval, 0.0)
        run.observed_method = (
            f"docker logs --timestamps: last line on {self.ctx.source.name} to first on {self.ctx.target.name}, "
            f"less the usual {interval:.0f} ms between lines"
        )
