"""Progress of a transfer or page pull in words, for the command line."""

from __future__ import annotations

import time
from collections.abc import Callable


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe(phase: str, done: int, expected: int, elapsed: float) -> str:
    """One line: bytes so far (of the estimate), rate, time left when it can be told."""
    line = f"{phase:<15} {_size(done)}"
    if expected > 0:
        line += f" of ~{_size(expected)} ({min(done / expected, 1):.0%})"
    if elapsed > 0 and done > 0:
        rate = done / elapsed
        line += f", {_size(rate)}/s"
        if expected > done:
            line += f", ~{(expected - done) / rate:.1f} s left"
    return line


class Printer:
    """An on_progress callback for engine.execute() that writes a line at most every interval seconds.

    Each phase is timed from its first report, so the rate is that phase's own.
    """

    def __init__(self, write: Callable[[str], object], interval: float = 1.0, clock=time.monotonic):
        self.write, self.interval, self.clock = write, interval, clock
        self.phase: str | None = None
        self.started = self.last = 0.0

    def __call__(self, phase: str, done: int, expected: int) -> None:
        now = self.clock()
        if phase != self.phase:
            self.phase, self.started, self.last = phase, now, now
            return  # the first report only starts the phase's clock
        if now - self.last < self.interval:
            return
        self.last = now
        self.write(describe(phase, done, expected, now - self.started))
