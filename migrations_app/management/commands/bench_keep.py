"""Kept container checkpoints: Docker's API path against the runc path, on the lab.

Each round starts one memhog container per path on lab-1, takes a kept
checkpoint of it (stopping it) and restores it in place, checks that nothing
was lost (one copy, the same memory checksum, the counter on without a gap),
and removes it. The paths are interleaved, so both see the same load.
"""

from __future__ import annotations

import statistics
import uuid

from django.core.management.base import BaseCommand, CommandError

from migrations_app import benchmark
from migrations_app.engine import execute, keep
from migrations_app.models import CHECKPOINT, CONTAINER, RESTORE, SUCCEEDED, Checkpoint

PATHS = {"docker": ("checkpoint", "restore"), "runc": ("checkpoint-runc", "restore-runc")}


def _wall_ms(run) -> float:
    return sum(p.duration_ms or 0 for p in run.phases.all())


def _phase_ms(run, name: str) -> float:
    return sum(p.duration_ms or 0 for p in run.phases.filter(name=name))


class Command(BaseCommand):
    help = "Time kept container checkpoints (checkpoint + in-place restore) through Docker's API and through runc."

    def add_arguments(self, parser):
        parser.add_argument("--mib", type=int, default=256, help="memory the container holds (default 256)")
        parser.add_argument("--runs", type=int, default=3, help="rounds, each path once per round (default 3)")

    def handle(self, mib: int, runs: int, **options):
        lab1, _ = benchmark.lab_hosts(self.stdout.write)
        rows: dict[str, list[tuple[float, float, float, float]]] = {p: [] for p in PATHS}
        for r in range(1, runs + 1):
            for path, (cp_strategy, restore_strategy) in PATHS.items():
                name = f"bk-{path}-{uuid.uuid4().hex[:8]}"
                w = benchmark.start(CONTAINER, mib, lab1, name)
                try:
                    rows[path].append(self._one(w, lab1, name, cp_strategy, restore_strategy))
                except benchmark.BenchmarkError as e:
                    raise CommandError(str(e)) from e
                finally:
                    benchmark.stop(w)
                    for cp in Checkpoint.objects.filter(name=f"{name}-cp"):
                        keep.delete(cp)
                cp_ms, cp_wall, rs_ms, rs_wall = rows[path][-1]
                self.stdout.write(
                    f"round {r} {path:6s}: checkpoint {cp_ms:6.0f} ms (run {cp_wall:6.0f} ms), "
                    f"restore {rs_ms:6.0f} ms (run {rs_wall:6.0f} ms)"
                )
        self.stdout.write(f"\nmedians over {runs} runs, container memhog {mib} MiB, on {lab1.name}:")
        self.stdout.write("| path | checkpoint phase | checkpoint run | restore phase | restore run |")
        self.stdout.write("|---|---|---|---|---|")
        for path, values in rows.items():
            med = [statistics.median(v[i] for v in values) for i in range(4)]
            self.stdout.write(f"| {path} | {med[0]:.0f} ms | {med[1]:.0f} ms | {med[2]:.0f} ms | {med[3]:.0f} ms |")

    def _one(self, w, host, name, cp_strategy, restore_strategy) -> tuple[float, float, float, float]:
        made = execute(
            keep.create_checkpoint_run(host, CONTAINER, w.ref, f"{name}-cp", leave_running=False, strategy=cp_strategy)
        )
        if made.status != SUCCEEDED:
            raise benchmark.BenchmarkError(f"{CHECKPOINT} ({cp_strategy}): {made.error}")
        before = benchmark.counter_values(w)  # the stopped container's whole log
        restored = execute(keep.create_restore_run(made.checkpoint, strategy=restore_strategy))
        if restored.status != SUCCEEDED:
            raise benchmark.BenchmarkError(f"{RESTORE} ({restore_strategy}): {restored.error}")
        benchmark.check(w, f"{name} restored", before)
        return (
            _phase_ms(made, "checkpoint") + _phase_ms(made, "keep"),
            _wall_ms(made),
            _phase_ms(restored, "transfer") + _phase_ms(restored, "stage") + _phase_ms(restored, "restore"),
            _wall_ms(restored),
        )
