from django.core.management.base import CommandError
from django.utils import timezone

from migrations_app import benchmark, engine, lab, ssh
from migrations_app.docker_engine import EngineError
from migrations_app.models import KIND_CHOICES

from . import _operations as op


def _ints(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"--sizes takes whole MiB separated by commas, not {text!r}") from None
    if not values or any(v < 1 or v > 16384 for v in values):
        raise CommandError("--sizes: each size from 1 to 16384 MiB")
    return values


def _names(text):
    return [v.strip() for v in text.split(",") if v.strip()]


class Command(op.JsonOutcome):
    help = (
        "Move memhog workloads of several sizes with every strategy, interleaved, on the lab, beside CRIU's own "
        "dump + restore on one host; check each run lost nothing; print downtime per size and strategy."
    )

    def add_arguments(self, parser):
        parser.add_argument("--sizes", default="16,64,256", help="MiB, comma-separated (default 16,64,256)")
        parser.add_argument(
            "--strategies", default="", help="comma-separated (default: every registered one; page-server+tls for TLS)"
        )
        parser.add_argument("--kinds", default="process,container", help="process, container or both")
        parser.add_argument("--runs", type=int, default=2, help="runs of each size and strategy (default 2)")
        parser.add_argument("--no-baseline", action="store_true", help="skip CRIU's own dump + restore")
        parser.add_argument("--name", default="", help="the benchmark's tag on its runs (default bench-<time>)")
        parser.add_argument("--json", action="store_true", help="print the table as JSON")

    def handle(self, sizes, strategies, kinds, runs, no_baseline, name, **options):
        kinds_list = _names(kinds)
        known = [k for k, _ in KIND_CHOICES]
        if not kinds_list or any(k not in known for k in kinds_list):
            raise CommandError(f"--kinds: choose from {', '.join(known)}")
        if runs < 1:
            raise CommandError("--runs must be at least 1")
        if len(name) > 64:
            raise CommandError("--name: at most 64 characters")
        try:
            variants = {k: benchmark.variants_for(k, _names(strategies) or None) for k in kinds_list}
        except benchmark.BenchmarkError as e:
            raise CommandError(str(e))
        if not any(variants.values()) and no_baseline:
            raise CommandError("nothing to measure: no strategy of these kinds")
        matrix = benchmark.Matrix(
            sizes=_ints(sizes),
            variants=variants,
            runs=runs,
            baseline=not no_baseline,
            name=name or f"bench-{timezone.now():%Y%m%d-%H%M%S}",
        )
        log = self.stderr.write if options["json"] else self.stdout.write
        log(
            f"benchmark {matrix.name}: sizes {matrix.sizes} MiB, {runs} run(s) each, "
            + "; ".join(
                f"{k}: {', '.join(v + ([benchmark.BASELINE] if matrix.baseline else []))}"
                for k, v in variants.items()
            )
        )
        try:
            results = benchmark.run_matrix(matrix, log)
        except (benchmark.BenchmarkError, engine.MigrationError, lab.LabError, ssh.SSHError, EngineError) as e:
            if options["json"]:
                self.write_json({"benchmark": matrix.name, "status": "failed", "error": str(e)})
            raise CommandError(f"benchmark {matrix.name} failed: {e}")
        rows = benchmark.summarize(results)
        if options["json"]:
            self.write_json({"benchmark": matrix.name, "rows": [r.__dict__ for r in rows]})
        else:
            self.stdout.write(f"\nbenchmark {matrix.name}: every run checked (checksum, counter, one copy)\n")
            self.stdout.write(benchmark.table(rows))
