"""`bench_workers`: what it refuses before it touches the lab (its figures come from running it: docs/benchmarks.md)."""

import pytest
from django.core.management import CommandError, call_command

from migrations_app import fleet
from migrations_app.models import CONTAINER, PROCESS, Host


@pytest.mark.parametrize(
    "args, message",
    [
        (["--runs", "6"], r"--runs must be a multiple of --hosts \(4\), with 1 to 3 runs per host"),
        (["--runs", "16"], r"with 1 to 3 runs per host"),
        (["--runs", "4", "--hosts", "1"], r"a multiple of --hosts \(1\)"),
        (["--workers", "1", "0"], "each count must be at least 1"),
    ],
)
def test_bench_workers_refuses_bad_counts(args, message):
    with pytest.raises(CommandError, match=message):
        call_command("bench_workers", *args)


def test_placement_needs_an_even_share_per_host():
    hosts = [Host(pk=i, name=f"h-{i}") for i in range(1, 5)]
    for count in (0, 3, 16):
        with pytest.raises(ValueError, match=f"{count} workloads do not spread evenly over 4 hosts"):
            fleet.placement(hosts, count, [PROCESS])


@pytest.mark.parametrize("count", [4, 8, 12])
def test_each_round_makes_every_host_source_and_target_alike(count):
    hosts = [Host(pk=i, name=f"h-{i}") for i in range(1, 5)]
    placed = fleet.placement(hosts, count, [CONTAINER, PROCESS])
    share = count // len(hosts)
    if share >= 2:  # each host has both kinds
        assert all({kind for host, _, kind in placed if host == h} == {CONTAINER, PROCESS} for h in hosts)
    workloads = [fleet.Workload(kind, host, step, str(i), []) for i, (host, step, kind) in enumerate(placed)]
    for _ in range(3):
        moves = [(w, fleet.target(hosts, w)) for w in workloads]
        for h in hosts:
            assert sum(w.host == h for w, _ in moves) == share
            assert sum(t == h for _, t in moves) == share
        assert all(w.host != t for w, t in moves)
        for w, t in moves:
            fleet.moved(w, t)


def test_most_runs_at_once_counts_overlapping_runs_only():
    from datetime import datetime, timedelta

    from migrations_app.management.commands.bench_workers import Round
    from migrations_app.models import MigrationRun

    t0 = datetime(2026, 1, 1)

    def run(start, end):
        return MigrationRun(started=t0 + timedelta(seconds=start), finished=t0 + timedelta(seconds=end))

    # 0-4 and 4-6 only touch; 1-5 overlaps both; 2-3 inside all three.
    runs = [run(0, 4), run(4, 6), run(1, 5), run(2, 3)]
    assert Round(2, runs, 6.0, (0, 0, 0)).most_at_once == 3
    assert Round(1, [run(0, 1), run(1, 2)], 2.0, (0, 0, 0)).most_at_once == 1
