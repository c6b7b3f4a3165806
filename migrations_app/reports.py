"""Numbers for the comparison pages, computed in the database.

Each function is one query whatever the number of runs, so the pages stay
fast with many thousands of runs stored.
"""

from django.db.models import Case, CharField, Count, F, IntegerField, Q, Value, When, Window
from django.db.models.expressions import ExpressionWrapper
from django.db.models.functions import Concat, RowNumber

from .models import SUCCEEDED, Phase

MIB = 1024 * 1024

SIZE_BUCKETS = [
    (1 * MIB, "< 1 MiB"),
    (16 * MIB, "1-16 MiB"),
    (256 * MIB, "16-256 MiB"),
]


def size_bucket():
    whens = [When(total_bytes__lt=limit, then=Value(label)) for limit, label in SIZE_BUCKETS]
    return Case(*whens, default=Value(">= 256 MiB"), output_field=CharField())


GROUPINGS = {
    "strategy": lambda: F("strategy"),
    "host_pair": lambda: Concat(F("source__name"), Value(" → "), F("target__name"), output_field=CharField()),
    "size": size_bucket,
    "kind": lambda: F("kind"),
}


# What the database partitions by where that is cheaper than the group's
# label and makes the same groups: host names are unique, so each (source,
# target) pair has one label, and comparing two integers costs less than
# joining the hosts' names for every run.
PARTITIONS = {
    "host_pair": lambda: [F("source_id"), F("target_id")],
}


def _nearest_rank(n, percent):
    # ceil(n * percent / 100) in integer arithmetic, the same in SQLite and PostgreSQL.
    return ExpressionWrapper((n * percent + 99) / 100, output_field=IntegerField())


def downtime_percentiles(runs, grouping):
    """[{group, count, median_ms, p95_ms}] of successful runs' downtime per group.

    Nearest-rank percentiles: the runs of a group ranked by downtime, the
    rows at ranks ceil(n/2) and ceil(0.95 n) picked by the database.
    """
    partition = PARTITIONS.get(grouping, lambda: [F("group")])()
    ranked = (
        runs.filter(status=SUCCEEDED, downtime_ms__isnull=False)
        # No ORDER BY: the runs' default (-created) would make the database
        # sort every successful run twice, inside and outside the window query,
        # for rows whose order does not matter here.
        .order_by()
        .annotate(group=GROUPINGS[grouping]())
        .annotate(
            rank=Window(RowNumber(), partition_by=partition, order_by=[F("downtime_ms").asc(), F("id").asc()]),
            n=Window(Count("id"), partition_by=partition),
        )
    )
    picked = ranked.filter(Q(rank=_nearest_rank(F("n"), 50)) | Q(rank=_nearest_rank(F("n"), 95)))
    groups = {}
    for row in picked.values("group", "rank", "n", "downtime_ms"):
        g = groups.setdefault(row["group"], {"group": row["group"], "count": row["n"]})
        n = row["n"]
        if row["rank"] == (n * 50 + 99) // 100:
            g["median_ms"] = row["downtime_ms"]
        if row["rank"] == (n * 95 + 99) // 100:
            g["p95_ms"] = row["downtime_ms"]
    return sorted(groups.values(), key=lambda g: g["group"])


def runs_over_time(runs, limit=500):
    """The latest successful runs, oldest first, for the downtime-over-time chart."""
    rows = list(
        runs.filter(status=SUCCEEDED)
        .order_by("-created")
        .values("code", "created", "downtime_ms", "total_bytes", "kind", "strategy")[:limit]
    )
    rows.reverse()
    return [
        {
            "id": str(r["code"]),
            "created": r["created"].isoformat(),
            "downtime_ms": r["downtime_ms"],
            "bytes": r["total_bytes"],
            "kind": r["kind"],
            "strategy": r["strategy"],
        }
        for r in rows
    ]


def phase_breakdown(runs, limit=50):
    """Phase durations of the latest successful runs: {labels, phases: {name: [ms per run]}}."""
    latest = list(runs.filter(status=SUCCEEDED).order_by("-created").values_list("id", "created")[:limit])
    latest.reverse()
    index = {run_id: i for i, (run_id, _) in enumerate(latest)}
    phases = {}
    rows = Phase.objects.filter(run_id__in=index).values_list("run_id", "name", "duration_ms")
    for run_id, name, duration in rows:
        series = phases.setdefault(name, [0.0] * len(latest))
        series[index[run_id]] += duration or 0.0
    return {"labels": [created.isoformat() for _, created in latest], "phases": phases}


def downtime_by_size(runs, limit=1000):
    """Downtime against the state moved, for the latest successful runs (the baseline's too).

    [{strategy, kind, tls, bytes, downtime_ms, observed_ms}]: one point per
    run, for a chart with log axes, so runs that moved nothing are left out.
    """
    rows = (
        runs.filter(status=SUCCEEDED, downtime_ms__isnull=False, total_bytes__gt=0)
        .order_by("-created")
        .values("strategy", "kind", "tls", "total_bytes", "downtime_ms", "observed_downtime_ms")[:limit]
    )
    return [
        {
            "strategy": r["strategy"],
            "kind": r["kind"],
            "tls": r["tls"],
            "bytes": r["total_bytes"],
            "downtime_ms": r["downtime_ms"],
            "observed_ms": r["observed_downtime_ms"],
        }
        for r in rows
    ]
