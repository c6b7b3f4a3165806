"""The comparison pages' numbers (reports.py): values, and a query count that
does not grow with the number of runs."""

import random
from datetime import timedelta

import pytest
from django.utils import timezone

from migrations_app import reports
from migrations_app.models import (
    CONTAINER,
    FAILED,
    PROCESS,
    ROLLED_BACK,
    SUCCEEDED,
    Host,
    MigrationRun,
    Phase,
)

MIB = reports.MIB


@pytest.fixture
def three_hosts(db):
    return [Host.objects.create(name=f"h{i}", address=f"10.0.0.{i}", key_path="/k") for i in (1, 2, 3)]


def make_run(source, target, downtime, status=SUCCEEDED, total_bytes=0, kind=CONTAINER, created=None, phases=()):
    run = MigrationRun.objects.create(
        source=source, target=target, kind=kind, workload="w", status=status, downtime_ms=downtime,
        total_bytes=total_bytes, created=created or timezone.now(),
    )
    for seq, (name, ms) in enumerate(phases):
        Phase.objects.create(run=run, seq=seq, name=name, started=run.created, duration_ms=ms)
    return run


def runs():
    return MigrationRun.objects.select_related("source", "target")


def nearest_rank(values, percent):
    values = sorted(values)
    return values[-(-len(values) * percent // 100) - 1]


def test_percentiles_nearest_rank_per_host_pair(three_hosts):
    h1, h2, h3 = three_hosts
    for d in (10, 20, 30, 40, 50, 60, 70, 80, 90, 100):
        make_run(h1, h2, d)
    for d in (5, 7):
        make_run(h2, h1, d)
    make_run(h1, h3, 42)
    # Not counted: unsuccessful runs and runs without a downtime.
    make_run(h1, h2, 1, status=ROLLED_BACK)
    make_run(h1, h2, 1000, status=FAILED)
    make_run(h1, h2, None)
    assert reports.downtime_percentiles(runs(), "host_pair") == [
        {"group": "h1 → h2", "count": 10, "median_ms": 50, "p95_ms": 100},
        {"group": "h1 → h3", "count": 1, "median_ms": 42, "p95_ms": 42},
        {"group": "h2 → h1", "count": 2, "median_ms": 5, "p95_ms": 7},
    ]


def test_percentiles_by_size_and_strategy_with_ties(three_hosts):
    h1, h2, _ = three_hosts
    sizes = {0: [3, 1, 2], MIB: [8, 8, 8, 9], 16 * MIB: [30], 300 * MIB: [700, 500]}
    for size, downtimes in sizes.items():
        for d in downtimes:
            make_run(h1, h2, d, total_bytes=size)
    assert reports.downtime_percentiles(runs(), "size") == [
        {"group": "1-16 MiB", "count": 4, "median_ms": 8, "p95_ms": 9},
        {"group": "16-256 MiB", "count": 1, "median_ms": 30, "p95_ms": 30},
        {"group": "< 1 MiB", "count": 3, "median_ms": 2, "p95_ms": 3},
        {"group": ">= 256 MiB", "count": 2, "median_ms": 500, "p95_ms": 700},
    ]
    everything = [d for ds in sizes.values() for d in ds]
    assert reports.downtime_percentiles(runs(), "strategy") == [
        {"group": "stop-and-copy", "count": len(everything),
         "median_ms": nearest_rank(everything, 50), "p95_ms": nearest_rank(everything, 95)},
    ]


def test_percentiles_follow_the_filter(three_hosts):
    h1, h2, h3 = three_hosts
    make_run(h1, h2, 10)
    make_run(h2, h3, 20)
    make_run(h3, h1, 30, kind=PROCESS)
    host_runs = runs().for_host(h3)
    assert [g["group"] for g in reports.downtime_percentiles(host_runs, "host_pair")] == ["h2 → h3", "h3 → h1"]
    assert reports.downtime_percentiles(runs().filter(kind=PROCESS), "kind") == [
        {"group": "process", "count": 1, "median_ms": 30, "p95_ms": 30},
    ]
    assert reports.downtime_percentiles(runs().filter(kind="none"), "strategy") == []


def test_percentiles_match_python_on_random_data(three_hosts):
    rnd = random.Random(7)
    expected = {}
    for _ in range(200):
        source, target = rnd.sample(three_hosts, 2)
        d = round(rnd.lognormvariate(6, 0.5), 1)
        make_run(source, target, d)
        expected.setdefault(f"{source.name} → {target.name}", []).append(d)
    got = reports.downtime_percentiles(runs(), "host_pair")
    assert got == [
        {"group": g, "count": len(ds), "median_ms": nearest_rank(ds, 50), "p95_ms": nearest_rank(ds, 95)}
        for g, ds in sorted(expected.items())
    ]


def test_runs_over_time_and_phase_breakdown(three_hosts):
    h1, h2, _ = three_hosts
    t0 = timezone.now() - timedelta(days=1)
    old = make_run(h1, h2, 100, created=t0, phases=[("checkpoint", 40), ("restore", 60)])
    make_run(h1, h2, 1, status=FAILED, created=t0 + timedelta(minutes=1), phases=[("checkpoint", 1)])
    new = make_run(h2, h1, 200, created=t0 + timedelta(minutes=2),
                   phases=[("pre-flight", 5), ("checkpoint", 80), ("restore", 120), ("pre-flight", 7)])
    over = reports.runs_over_time(runs())
    assert [r["id"] for r in over] == [str(old.code), str(new.code)]
    assert [r["downtime_ms"] for r in over] == [100, 200]
    breakdown = reports.phase_breakdown(runs())
    assert breakdown["labels"] == [old.created.isoformat(), new.created.isoformat()]
    assert breakdown["phases"] == {"checkpoint": [40, 80], "restore": [60, 120], "pre-flight": [0.0, 12]}
    assert reports.phase_breakdown(runs(), limit=1)["phases"] == {
        "pre-flight": [12], "checkpoint": [80], "restore": [120],
    }


def test_query_count_does_not_grow_with_runs(three_hosts, django_assert_num_queries):
    h1, h2, h3 = three_hosts

    def compare_data():
        return (
            reports.runs_over_time(runs()),
            reports.phase_breakdown(runs()),
            [reports.downtime_percentiles(runs(), g) for g in ("strategy", "host_pair", "size")],
        )

    make_run(h1, h2, 10, phases=[("checkpoint", 4)])
    with django_assert_num_queries(6):
        compare_data()
    for i in range(60):
        make_run(*random.Random(i).sample(three_hosts, 2), 10 + i, total_bytes=i * MIB,
                 phases=[("checkpoint", 4), ("restore", 6)])
    with django_assert_num_queries(6):
        compare_data()
