from django.core.management.base import CommandError

from migrations_app import engine, progress, worker
from migrations_app.engine import plans, recovery
from migrations_app.models import CONTAINER, PROCESS, SUCCEEDED, TCP_CLOSE, TCP_ESTABLISHED

from . import _operations as op


class Command(op.JsonOutcome):
    help = "Migrate a container or a process tree from one host to another, in the foreground."

    def add_arguments(self, parser):
        parser.add_argument("--source", required=True, help="source host name")
        parser.add_argument("--target", required=True, help="target host name")
        what = parser.add_mutually_exclusive_group(required=True)
        what.add_argument("--container", help="container name or id on the source")
        what.add_argument("--pid", help="PID of the process tree's root on the source")
        parser.add_argument(
            "--strategy",
            choices=plans.strategies(),
            help="how to move it (default: the first for its kind: "
            + ", ".join(f"{k} {plans.default_strategy(k)}" for k in plans.KINDS)
            + ")",
        )
        parser.add_argument("--keep-source", action="store_true", help="keep the stopped source container")
        tcp = parser.add_mutually_exclusive_group()
        tcp.add_argument(
            "--tcp-close", dest="tcp", action="store_const", const=TCP_CLOSE, default=TCP_CLOSE,
            help="close the workload's established TCP connections; their peers see them end (the default)",
        )  # fmt: skip
        tcp.add_argument(
            "--tcp-established", dest="tcp", action="store_const", const=TCP_ESTABLISHED,
            help="keep established TCP connections; refused unless the workload's address moves with it",
        )  # fmt: skip
        parser.add_argument(
            "--shared-storage", action="store_true",
            help="bind-mount sources and non-local volumes hold the same data on the target: use them there",
        )  # fmt: skip
        parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
        parser.add_argument(
            "--enqueue", action="store_true",
            help="only queue the run for a worker (manage.py criuweb_worker) and print its id",
        )  # fmt: skip
        parser.add_argument(
            "--probe", metavar="HOST:PORT", default="",
            help="poll this address every 10 ms during the run and record the longest outage as observed downtime",
        )
        parser.add_argument(
            "--freeze-limit",
            type=float,
            metavar="SECONDS",
            help="roll back when the workload stays frozen longer than this "
            "(default: CRIUWEB_FREEZE_LIMIT plus CRIUWEB_FREEZE_LIMIT_PER_GIB per GiB)",
        )

    def handle(self, source, target, container, pid, keep_source, probe, strategy=None, **options):
        as_json = options["json"]
        src, dst = op.host(source), op.host(target)
        # `is not None`: --container '' is an empty name, not "no container".
        kind, workload = (CONTAINER, container) if container is not None else (PROCESS, pid)
        fields = dict(
            keep_source=keep_source, probe=probe, tcp=options["tcp"], shared_storage=options["shared_storage"],
            strategy=strategy, freeze_limit=options["freeze_limit"],
        )  # fmt: skip
        if options["enqueue"]:
            try:
                run = worker.submit(engine.create_run, src, dst, kind, workload, **fields)
            except engine.MigrationError as e:
                raise CommandError(str(e))
            if as_json:
                self.write_json(run.to_dict())
            else:
                self.stdout.write(f"queued run {run.code}")
            self.stderr.write(worker.ENQUEUED_HINT)
            return
        # Runs an earlier CLI or server left behind go first: one of them
        # may hold this very workload frozen.
        recovery.recover_all(lambda r: self.stderr.write(f"recovered run {r.code}: {r.status}: {r.error}"))
        try:
            run = engine.create_run(src, dst, kind, workload, **fields)
        except engine.MigrationError as e:
            raise CommandError(str(e))
        if not as_json:
            self.stdout.write(f"strategy: {run.strategy} ({run.get_strategy_display()})")
            self.stdout.write(f"established TCP connections: {run.get_tcp_display()}")

        def show(phase):
            if not as_json:
                extra = f", {phase.bytes} B" if phase.bytes else ""
                self.stdout.write(
                    f"{phase.name:<15} {phase.host:<22} {phase.duration_ms:8.1f} ms{extra}"
                    f"  {phase.status}{': ' + phase.detail if phase.detail else ''}"
                )

        # Bytes, rate and time left while a transfer or a page pull runs.
        on_progress = None if as_json else progress.Printer(self.stdout.write)
        try:
            run = worker.run_here(run, say=self.stderr.write, on_phase=show, on_progress=on_progress)
        except KeyboardInterrupt:
            # execute() has brought the workload back (or said where it is)
            # before letting the interrupt through: say that, not a traceback.
            run.refresh_from_db()
            if as_json:
                self.write_json(run.to_dict())
            raise CommandError(f"interrupted: run {run.code} ended {run.status}: {run.error or '-'}") from None
        except engine.MigrationError as e:
            if as_json:
                self.write_json(op.with_error(run, str(e)))
            raise CommandError(str(e))
        if as_json:
            self.write_json(run.to_dict())
        else:
            downtime = f"{run.downtime_ms:.0f} ms" if run.downtime_ms is not None else "-"
            if run.observed_downtime_ms is not None:
                downtime += f" (observed {run.observed_downtime_ms:.0f} ms: {run.observed_method})"
            elif run.observed_method:
                downtime += f" (observed: {run.observed_method})"
            self.stdout.write(
                f"{run.status}: {kind} {workload} {src.name} -> {dst.name}; downtime {downtime}; "
                f"{run.total_bytes} B moved; now {run.result_workload or '-'}"
            )
        if run.status != SUCCEEDED:
            raise CommandError(run.error or run.status)
