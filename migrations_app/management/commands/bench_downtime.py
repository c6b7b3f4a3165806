import statistics

from django.core.management.base import BaseCommand, CommandError

from migrations_app import engine, lab
from migrations_app.models import CONTAINER, PROCESS, SUCCEEDED, Host


class Command(BaseCommand):
    help = "Migrate the lab's demo counter back and forth and report its downtime."

    def add_arguments(self, parser):
        parser.add_argument("--runs", type=int, default=10)
        parser.add_argument("--process", action="store_true", help="the counter process, not the container")

    def handle(self, runs, process, **options):
        hosts = list(Host.objects.filter(name__in=[h.name for h in lab.HOSTS]).order_by("name"))
        if len(hosts) != 2:
            raise CommandError("the lab is not up: run `python manage.py lab up --demo` first")
        source = self._where_demo_runs(hosts, process)
        downtimes, totals = [], []
        for i in range(runs):
            target = hosts[1] if source == hosts[0] else hosts[0]
            workload = str(lab.demo_process_pid()) if process else lab.DEMO_CONTAINER
            run = engine.execute(engine.create_run(source, target, PROCESS if process else CONTAINER, workload))
            if run.status != SUCCEEDED:
                raise CommandError(f"run {i + 1}: {run.error}")
            total = sum(p.duration_ms for p in run.phases.all())
            downtimes.append(run.downtime_ms)
            totals.append(total)
            self.stdout.write(
                f"{i + 1:2d} {source.name} -> {target.name}: downtime {run.downtime_ms:6.0f} ms, "
                f"total {total:6.0f} ms, {run.total_bytes} B"
            )
            source = target
        self.stdout.write(
            f"downtime over {runs} runs: median {statistics.median(downtimes):.0f} ms, "
            f"min {min(downtimes):.0f} ms, max {max(downtimes):.0f} ms; "
            f"whole run median {statistics.median(totals):.0f} ms"
        )

    def _where_demo_runs(self, hosts, process):
        from migrations_app.docker_engine import Engine

        if process:
            name = lab.host_of_pid(lab.demo_process_pid())
            if not name:
                raise CommandError("the demo counter process is not running: `lab up --demo` starts it")
            return next(h for h in hosts if h.name == name)
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(lab.DEMO_CONTAINER) and engine.inspect(lab.DEMO_CONTAINER)["State"]["Running"]:
                    return host
        raise CommandError("the demo counter container is not running: `lab up --demo` starts it")
