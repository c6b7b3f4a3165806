"""Time the run list and comparison pages with many runs stored.

Fills a dedicated benchmark database with synthetic runs and phases, then
requests each page with Django's test client, logged in as a superuser, and
prints per URL the median and max wall time and the number of SQL queries.

It writes thousands of fake runs, so it refuses any database whose NAME does
not contain "bench". scripts/bench-pages.sh runs it on a throw-away SQLite file.
"""

import math
import os
import random
import statistics
import time
import uuid
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.staticfiles.storage import staticfiles_storage
from django.core.management.base import BaseCommand, CommandError
from django.db import connection, transaction
from django.test import Client, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from migrations_app import reports
from migrations_app.models import (
    CONTAINER,
    FAILED,
    PHASE_FAILED,
    PHASE_OK,
    PROCESS,
    ROLLED_BACK,
    STOP_AND_COPY,
    SUCCEEDED,
    Host,
    MigrationRun,
    Phase,
)

HOSTS = ["bench-1", "bench-2", "bench-3"]
BENCH_USER = "bench-admin"
DAYS = 90

# (phase, host side, share of the downtime) as the engine's plans name them.
CONTAINER_PHASES = [
    ("pre-flight", "source", None), ("pre-flight", "target", None), ("ship image", "both", None),
    ("prepare target", "target", None), ("checkpoint", "source", 0.36), ("transfer", "both", 0.04),
    ("restore", "target", 0.60), ("verify", "target", None), ("cleanup", "both", None),
]
PROCESS_PHASES = [
    ("pre-flight", "source", None), ("pre-flight", "target", None), ("dump", "source", 0.45),
    ("transfer", "both", 0.10), ("restore", "target", 0.45), ("verify", "target", None),
    ("cleanup", "both", None),
]
# Typical durations (ms) of the phases outside the downtime.
OTHER_MS = {"pre-flight": 350, "ship image": 900, "prepare target": 120, "verify": 1000, "cleanup": 150}


class Command(BaseCommand):
    help = (
        "Fill a benchmark database with synthetic runs, then time the run list, comparison "
        "and export pages and count their SQL queries. Only on a database whose NAME contains "
        '"bench" (scripts/bench-pages.sh uses /tmp/criuweb-bench.sqlite3).'
    )

    def add_arguments(self, parser):
        parser.add_argument("--runs", type=int, default=10000, help="runs to have stored (default 10000)")
        parser.add_argument("--repeat", type=int, default=5, help="requests per URL (default 5)")
        parser.add_argument("--seed", type=int, default=1, help="random seed of the synthetic data")

    def handle(self, runs, repeat, seed, **options):
        self._refuse_unless_bench_db()
        if repeat < 1:
            raise CommandError("--repeat must be at least 1")
        if MigrationRun._meta.db_table not in connection.introspection.table_names():
            raise CommandError("the benchmark database has no tables: run `manage.py migrate` on it first")
        hosts = self._hosts()
        have = MigrationRun.objects.count()
        if have < runs:
            t0 = time.perf_counter()
            self._fill(hosts, runs - have, random.Random(seed))
            self.stdout.write(f"stored {runs - have} synthetic runs in {time.perf_counter() - t0:.1f} s")
        else:
            self.stdout.write(f"{have} runs already stored, none added")
        with connection.cursor() as cursor:
            # Fresh planner statistics, as a database in use would have. On
            # PostgreSQL, autovacuum would also have vacuumed the new rows
            # (its insert threshold is 1,000 rows), which lets counts read the
            # indexes alone.
            cursor.execute("VACUUM ANALYZE" if connection.vendor == "postgresql" else "ANALYZE")
        self._facts()
        self._measure(hosts, repeat)

    # -- safety ---------------------------------------------------------------------

    def _refuse_unless_bench_db(self):
        db = settings.DATABASES["default"]
        name = str(db.get("NAME") or "")
        if "bench" not in os.path.basename(name).lower():  # the file or database itself, not a directory
            raise CommandError(
                f"refusing to fill the database {name!r} with synthetic runs: its NAME must contain "
                '"bench". Run it on a throw-away database, e.g.\n'
                "  scripts/bench-pages.sh\n"
                "or\n"
                "  export DATABASE_URL=sqlite:////tmp/criuweb-bench.sqlite3\n"
                "  .venv/bin/python manage.py migrate -v0\n"
                "  .venv/bin/python manage.py bench_pages --runs 10000"
            )

    # -- data -----------------------------------------------------------------------

    def _hosts(self):
        hosts = []
        for i, name in enumerate(HOSTS):
            host, _ = Host.objects.get_or_create(
                name=name, defaults={"address": f"192.0.2.{11 + i}", "key_path": "/nonexistent/bench-key"}
            )
            hosts.append(host)
        return hosts

    def _fill(self, hosts, count, rnd):
        now = timezone.now()
        # Host pairs used unevenly, as a real lab would: most traffic between the first two.
        pairs = [(a, b) for a in hosts for b in hosts if a != b]
        pair_weights = [6, 6, 2, 1, 2, 1][: len(pairs)]
        bucket_limits = [0] + [limit for limit, _ in reports.SIZE_BUCKETS] + [2048 * reports.MIB]
        bucket_weights = [35, 35, 20, 10]
        batch = 1000
        for start in range(0, count, batch):
            runs, phases = [], []
            for _ in range(min(batch, count - start)):
                source, target = rnd.choices(pairs, pair_weights)[0]
                kind = CONTAINER if rnd.random() < 0.65 else PROCESS
                status = rnd.choices([SUCCEEDED, ROLLED_BACK, FAILED], [85, 10, 5])[0]
                b = rnd.choices(range(4), bucket_weights)[0]
                lo, hi = max(bucket_limits[b], 64 * 1024), bucket_limits[b + 1]
                total = int(math.exp(rnd.uniform(math.log(lo), math.log(hi - 1))))
                # Downtime: lognormal around the lab's measured medians, growing with the size moved.
                base = 900 if kind == CONTAINER else 400
                downtime = rnd.lognormvariate(math.log(base), 0.35) + total / (80 * reports.MIB) * 1000
                workload = f"web-{rnd.randrange(40)}" if kind == CONTAINER else str(rnd.randrange(2000, 60000))
                run = MigrationRun(
                    code=uuid.UUID(int=rnd.getrandbits(128), version=4),
                    source=source, target=target, kind=kind, strategy=STOP_AND_COPY, status=status,
                    workload=workload, result_workload=workload,
                    created=now - timedelta(seconds=rnd.uniform(0, DAYS * 86400)),
                    total_bytes=total, expected_bytes=total,
                    downtime_ms=None if status == FAILED else downtime,
                    error="" if status == SUCCEEDED else f"{target.name}: criu restore failed (synthetic)",
                    worker="bench:0",
                )
                run_phases = self._phases(run, downtime, rnd)
                run.started, run.finished = run_phases[0].started, run_phases[-1].ended
                runs.append(run)
                phases.extend(run_phases)
            with transaction.atomic():
                MigrationRun.objects.bulk_create(runs)
                if any(r.pk is None for r in runs):  # a database that returns no ids from bulk inserts
                    ids = dict(MigrationRun.objects.filter(code__in=[r.code for r in runs]).values_list("code", "id"))
                    for r in runs:
                        r.pk = ids[r.code]
                for phase in phases:
                    phase.run_id = phase.run.pk
                Phase.objects.bulk_create(phases, batch_size=2000)

    def _phases(self, run, downtime, rnd):
        plan = list(CONTAINER_PHASES if run.kind == CONTAINER else PROCESS_PHASES)
        if run.kind == CONTAINER and rnd.random() < 0.7:
            plan = [p for p in plan if p[0] != "ship image"]  # the target had the image
        if run.status != SUCCEEDED:
            # Failed at verification, then rolled back (FAILED: the rollback failed too).
            plan = [p for p in plan if p[0] != "cleanup"] + [("rollback", "source", None)]
        out, t = [], run.created + timedelta(milliseconds=rnd.uniform(5, 50))
        for seq, (name, side, share) in enumerate(plan):
            if share is not None:
                ms = downtime * share * rnd.uniform(0.9, 1.1)
            else:
                ms = rnd.lognormvariate(math.log(OTHER_MS.get(name, 800)), 0.3)
            failed = (run.status != SUCCEEDED and name == "verify") or (run.status == FAILED and name == "rollback")
            host = {"source": run.source.name, "target": run.target.name}.get(side, "")
            out.append(Phase(
                run=run, seq=seq, name=name, host=host, status=PHASE_FAILED if failed else PHASE_OK,
                started=t, ended=t + timedelta(milliseconds=ms), duration_ms=ms,
                bytes=run.total_bytes if name == "transfer" else 0,
                criu_stats={"frozen_time": int(ms * 1000)} if share is not None and name != "transfer" else {},
                detail="verification failed (synthetic)" if failed else "",
            ))
            t += timedelta(milliseconds=ms)
        return out

    # -- measurement ----------------------------------------------------------------

    def _facts(self):
        db = settings.DATABASES["default"]
        self.stdout.write(
            f"machine: nproc {len(os.sched_getaffinity(0))} ({os.cpu_count()} CPUs), "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
            f"database: {connection.vendor} {self._server_version()} ({db['ENGINE']}) {db['NAME']}, "
            f"connections kept {db.get('CONN_MAX_AGE', 0)} s"
        )
        self.stdout.write(
            f"stored: {MigrationRun.objects.count()} runs "
            f"({MigrationRun.objects.filter(status=SUCCEEDED).count()} succeeded), "
            f"{Phase.objects.count()} phases, {Host.objects.count()} hosts"
        )

    def _server_version(self):
        with connection.cursor() as cursor:
            cursor.execute("SELECT sqlite_version()" if connection.vendor == "sqlite" else "SHOW server_version")
            return cursor.fetchone()[0]

    def _measure(self, hosts, repeat):
        User = get_user_model()
        user = User.objects.filter(username=BENCH_USER).first()
        if user is None:
            user = User.objects.create_superuser(BENCH_USER, "", None)  # no password: force_login only
        urls = [
            "/runs/",
            "/runs/?status=succeeded&page=3",
            f"/runs/?host={hosts[0].name}",
            "/compare/",
            "/compare/data.json",
            "/compare/data.json?strategy=stop-and-copy",
            "/runs/export.csv",
        ]
        overrides = {"ALLOWED_HOSTS": list(settings.ALLOWED_HOSTS) + ["testserver"]}
        if not self._static_manifest_ok():
            # Without collectstatic the manifest storage cannot name static files.
            overrides["STORAGES"] = {
                **settings.STORAGES,
                "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
            }
            self.stdout.write("note: no static files manifest (collectstatic not run); plain static storage used")
        with override_settings(**overrides):
            client = Client()
            client.force_login(user)
            client.get("/runs/")  # warm up: imports, template loading, first connection
            server = self._server_process()
            if server is None and connection.vendor != "sqlite":
                self.stdout.write("note: the database server runs elsewhere: cpu ms is this process's only")
            # The minimum and the CPU time too: on a busy machine they are the
            # figures least disturbed by the others' load.
            self.stdout.write(
                f"{'URL':45} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'cpu ms':>7} {'queries':>8}"
            )
            for url in urls:
                times, cpu, queries, size = [], [], set(), 0
                for _ in range(repeat):
                    with CaptureQueriesContext(connection) as ctx:
                        c0, s0 = time.process_time(), _cpu_seconds(server)
                        t0 = time.perf_counter()
                        response = client.get(url)
                        body = b"".join(response.streaming_content) if response.streaming else response.content
                        times.append((time.perf_counter() - t0) * 1000)
                        cpu.append((time.process_time() - c0 + _cpu_seconds(server) - s0) * 1000)
                    if response.status_code != 200:
                        raise CommandError(f"{url}: HTTP {response.status_code}")
                    queries.add(len(ctx.captured_queries))
                    size = len(body)
                q = str(min(queries)) if len(queries) == 1 else f"{min(queries)}-{max(queries)}"
                line = (
                    f"{url:45} {statistics.median(times):10.1f} {min(times):8.1f} {max(times):8.1f} "
                    f"{statistics.median(cpu):7.1f} {q:>8}"
                )
                if url.startswith("/runs/export"):
                    rows = body.count(b"\n") - 1
                    line += f"   ({size} bytes, {rows} rows)"
                self.stdout.write(line)

    def _server_process(self):
        """The PID of the PostgreSQL process serving this connection, if it runs on this machine."""
        if connection.vendor != "postgresql":
            return None  # SQLite works inside this process: process_time() counts it
        connection.ensure_connection()
        pid = connection.connection.info.backend_pid
        return pid if _cpu_seconds(pid) else None

    def _static_manifest_ok(self):
        try:
            staticfiles_storage.url("css/criuweb.css")
        except ValueError:
            return False
        return True


def _cpu_seconds(pid):
    """CPU time a process has used (/proc/PID/schedstat, in ns), 0.0 for none or one we cannot read."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0
