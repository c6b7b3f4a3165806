"""bench_matrix end to end on the lab, and its checks failing loudly."""

import json
import uuid
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from migrations_app import benchmark, lab, ssh
from migrations_app.models import PROCESS, SUCCEEDED, MigrationRun
from tests.support import wait_for

pytestmark = pytest.mark.lab


def call(*args):
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def bench_name(prefix):
    # Of its own: the memhogs and /dev/shm images of a benchmark carry its
    # name, and other test sessions' labs run the same benchmark on this machine.
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def test_bench_matrix_tiny(hosts):
    name = bench_name("t-tiny")
    out, _ = call("bench_matrix", "--sizes", "8", "--runs", "1", "--kinds", "process", "--name", name, "--json")
    result = json.loads(out)
    runs = MigrationRun.objects.filter(benchmark=name).select_related("source", "target")
    variants = benchmark.variants_for(PROCESS, None)
    # One run per strategy (page-server twice: plain and TLS) and the baseline, each stored and succeeded.
    assert sorted(r.strategy for r in runs) == sorted([v.removesuffix("+tls") for v in variants] + ["baseline"])
    assert all(r.status == SUCCEEDED and r.downtime_ms > 0 for r in runs), [(r.strategy, r.error) for r in runs]
    base = runs.get(strategy="baseline")
    assert base.source == base.target and base.total_bytes > 8 * 1024 * 1024
    assert [p.name for p in base.phases.all()] == ["dump", "restore"]
    assert base.downtime_ms == pytest.approx(sum(p.duration_ms for p in base.phases.all()))
    for run in runs.exclude(strategy="baseline"):
        assert run.source != run.target
        # memhog appends to its counter file every 10 ms: the controller saw the outage.
        assert run.observed_downtime_ms is not None, run.observed_method
        assert run.observed_method.startswith("counter file growth")
    rows = {row["variant"]: row for row in result["rows"]}
    assert set(rows) == set(variants) | {"baseline"}
    assert rows["baseline"]["ratio"] == 1.0
    for variant in variants:
        assert rows[variant]["mib"] == 8 and rows[variant]["n"] == 1
        assert rows[variant]["ratio"] == pytest.approx(rows[variant]["downtime_ms"] / rows["baseline"]["downtime_ms"])
    # Every memhog the benchmark started is stopped.
    left = benchmark.copies_of_benchmark(name)
    assert not left, [(open(f"/proc/{p}/cmdline").read(), open(f"/proc/{p}/status").read()[:400]) for p in left]


def test_bench_matrix_refuses_bad_input(db):
    with pytest.raises(CommandError, match="--sizes takes whole MiB"):
        call("bench_matrix", "--sizes", "big")
    with pytest.raises(CommandError, match="no strategy warp"):
        call("bench_matrix", "--strategies", "warp")
    with pytest.raises(CommandError, match="--kinds: choose from"):
        call("bench_matrix", "--kinds", "vm")


def test_checks_fail_loudly(hosts):
    lab1, _ = hosts
    w = benchmark.start(PROCESS, 4, lab1, bench_name("t-check"))
    try:
        benchmark.check(w, "untouched")  # passes: same memory, counting, one copy
        real = w.checksum
        w.checksum = "0" * 16
        with pytest.raises(benchmark.BenchmarkError, match="memory checksum .* the memory changed"):
            benchmark.check(w, "wrong checksum")
        w.checksum = real
        # A second copy with the same command line: the check sees two.
        with ssh.Connection(lab1) as conn:
            lab.start_memhog(conn, 4, w.argv[2], w.argv[3])
        wait_for(lambda: len(benchmark.copies(w.argv)) == 2, message="the second memhog did not start")
        with pytest.raises(benchmark.BenchmarkError, match="2 copies of memhog 4 MiB run"):
            benchmark.check(w, "two copies")
    finally:
        benchmark.stop(w)
    assert benchmark.copies(w.argv) == []


def test_bench_matrix_container(hosts):
    name = bench_name("t-cont")
    out, _ = call(
        "bench_matrix", "--sizes", "8", "--runs", "1", "--kinds", "container", "--no-baseline", "--name", name
    )
    runs = MigrationRun.objects.filter(benchmark=name)
    assert sorted(r.strategy for r in runs) == sorted(
        v.removesuffix("+tls") for v in benchmark.variants_for("container", None)
    )
    for run in runs:
        assert run.status == SUCCEEDED, run.error
        # memhog logs every 10 ms: Docker's timestamps time the outage.
        assert run.observed_method.startswith("docker logs --timestamps"), run.observed_method
        assert run.observed_downtime_ms is not None
    assert "| container | 8 MiB | engine | 1 |" in out
    # Issue 8's reference in the same run: the seed's CLI flow, phase by phase.
    seed = runs.get(strategy=benchmark.SEED_FLOW)
    assert [p.name for p in seed.phases.all()] == ["checkpoint", "copy", "restore"]
    assert seed.downtime_ms == pytest.approx(sum(p.duration_ms for p in seed.phases.all()))
    assert "| container | 8 MiB | seed-flow | 1 |" in out
    assert not benchmark.copies_of_benchmark(name)


def test_bench_matrix_container_baselines(hosts):
    name = bench_name("t-cbase")
    out, _ = call(
        "bench_matrix", "--sizes", "8", "--runs", "1", "--kinds", "container",
        "--strategies", f"stop-and-copy,{benchmark.DOCKER_LOCAL}", "--name", name, "--json",
    )  # fmt: skip
    runs = MigrationRun.objects.filter(benchmark=name).select_related("source", "target")
    assert sorted(r.strategy for r in runs) == sorted(["stop-and-copy", benchmark.DOCKER_LOCAL, benchmark.BASELINE])
    assert all(r.status == SUCCEEDED and r.downtime_ms > 0 for r in runs), [(r.strategy, r.error) for r in runs]
    # CRIU through runc on one host: dumped and restored there, nothing moved.
    base = runs.get(strategy=benchmark.BASELINE)
    assert base.kind == "container" and base.source == base.target
    phases = list(base.phases.all())
    assert [p.name for p in phases] == ["dump", "restore"]
    assert base.downtime_ms == pytest.approx(sum(p.duration_ms for p in phases))
    assert "CRIU's own" in phases[0].detail and "CRIU's own" in phases[1].detail
    local = runs.get(strategy=benchmark.DOCKER_LOCAL)
    assert local.source == local.target
    assert [p.name for p in local.phases.all()] == ["checkpoint", "restore"]
    rows = {row["variant"]: row for row in json.loads(out)["rows"]}
    assert rows["baseline"]["ratio"] == 1.0
    assert rows["stop-and-copy"]["ratio"] == pytest.approx(
        rows["stop-and-copy"]["downtime_ms"] / rows["baseline"]["downtime_ms"]
    )
    assert not benchmark.copies_of_benchmark(name)
