import functools
import hashlib
import secrets
import uuid

from django.core.validators import MinValueValidator
from django.db import models
from django.utils import timezone

# Run status
PENDING = "pending"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
ROLLED_BACK = "rolled_back"
INTERRUPTED = "interrupted"
STATUS_CHOICES = [
    # Waiting in the workers' queue: for a worker, or for a place on its hosts.
    (PENDING, "queued"),
    (RUNNING, "running"),
    (SUCCEEDED, "succeeded"),
    (FAILED, "failed"),
    (ROLLED_BACK, "rolled back"),
    (INTERRUPTED, "interrupted"),
]
FINISHED = (SUCCEEDED, FAILED, ROLLED_BACK, INTERRUPTED)
# Runs that hold a place on their hosts: executing, or interrupted and
# waiting for (or under) their recovery, their workload maybe frozen.
HOLDING = (RUNNING, INTERRUPTED)

# Workload kinds
CONTAINER = "container"
PROCESS = "process"
KIND_CHOICES = [(CONTAINER, "container"), (PROCESS, "process")]

# Strategy names. What each one is, which workload kinds it serves and what
# hosts need for it live in the plan registry (engine/plans/__init__.py).
STOP_AND_COPY = "stop-and-copy"
ENGINE = "engine"  # containers through Docker's own checkpoint API
PAGE_SERVER = "page-server"  # memory streamed by CRIU straight into the target's tmpfs
LAZY = "lazy"  # post-copy: restored at once, memory pulled afterwards

# What happens to a workload's established TCP connections (CRIU's options
# of the same names): closed, the peer seeing a reset or end of file, or
# kept, which only works where the workload's address moves with it.
TCP_CLOSE = "tcp-close"
TCP_ESTABLISHED = "tcp-established"
TCP_CHOICES = [
    (TCP_CLOSE, "close established TCP connections (the peers see them end)"),
    (TCP_ESTABLISHED, "keep established TCP connections (only where the workload's address moves with it)"),
]

# What a run does. Migrations choose a strategy from the plan registry; the
# other operations have one plan per workload kind (engine/plans/__init__.py
# OPERATIONS), and store the operation's name as their strategy, so the
# history and comparison pages group them apart from the migrations.
MIGRATE = "migrate"
CHECKPOINT = "checkpoint"
RESTORE = "restore"
CLONE = "clone"
EXPORT = "export"
IMPORT = "import"
OPERATION_CHOICES = [
    (MIGRATE, "migrate"),
    (CHECKPOINT, "checkpoint"),
    (RESTORE, "restore"),
    (CLONE, "clone"),
    (EXPORT, "export"),
    (IMPORT, "import"),
]


class Stage(models.TextChoices):
    """Where a run's workload may be, stored before each change so that a
    run whose controller died can be finished correctly from the database."""

    PREPARING = "preparing", "preparing (the workload runs on the source)"
    FROZEN = "frozen", "frozen (stopped on the source, no copy on the target)"
    RESTORING = "restoring", "restoring (a copy may run on the target)"
    VERIFIED = "verified", "verified (runs on the target)"
    # Back on the source after a rollback that could not reach the target:
    # what the run made there (a container, staging or image directories)
    # is removed by the next recovery.
    LEFTOVERS = "leftovers", "leftovers (runs on the source; the target still holds the run's files)"
    DONE = "done", "done (nothing left to recover)"


# Phase status
PHASE_OK = "ok"
PHASE_FAILED = "failed"
PHASE_RUNNING = "running"


class Host(models.Model):
    """A machine reached over SSH whose Docker engine and CRIU we drive."""

    name = models.SlugField(max_length=64, unique=True)
    address = models.CharField(max_length=255)
    ssh_port = models.PositiveIntegerField(default=22)
    user = models.CharField(max_length=64, default="root")
    key_path = models.CharField(
        max_length=500, help_text="Private key file on the controller used to log in."
    )
    host_key = models.TextField(
        blank=True,
        help_text='Pinned host key, "<type> <base64>" as in known_hosts. '
        "Connections are refused until it is set.",
    )
    work_dir = models.CharField(
        max_length=500,
        default="/var/lib/criuweb",
        help_text="Directory on the host for checkpoint images.",
    )
    created = models.DateTimeField(default=timezone.now)
    # Privileged, host-mounting or host-network containers (and those with
    # extra capabilities, devices or security options) carry the host's
    # power with them; they move to or from this host only when an admin
    # said so here.
    allow_privileged = models.BooleanField(
        "allow privileged workloads",
        default=False,
        help_text="Let containers that are privileged, use the host's network, add capabilities or devices, "
        "or change security options move from or to this host.",
    )
    # The last capability probe (see inventory.probe) and when it ran.
    capabilities = models.JSONField(default=dict, blank=True)
    probed = models.DateTimeField(null=True, blank=True)
    # Kept checkpoints per workload on this host; older ones are deleted
    # (files and record) after each new checkpoint. 0 keeps them all.
    checkpoint_retention = models.PositiveIntegerField(default=0)
    # How many runs the host takes at once; more wait in the queue. A run
    # that checkpoints or restores on one host takes a place as source only.
    max_source_runs = models.PositiveIntegerField(
        "runs at once as source", default=1, validators=[MinValueValidator(1)],
        help_text="Runs beyond this many from this host wait in the queue.",
    )  # fmt: skip
    max_target_runs = models.PositiveIntegerField(
        "runs at once as target", default=1, validators=[MinValueValidator(1)],
        help_text="Runs beyond this many to this host wait in the queue.",
    )  # fmt: skip

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name

    def probe_ok(self):
        return bool(self.capabilities.get("ok"))

    def has_feature(self, name):
        """Whether the last probe found a CRIU feature (criu check --feature NAME)."""
        return bool(self.capabilities.get("criu", {}).get("features", {}).get(name))

    @property
    def lazy_pages(self):
        return self.has_feature("uffd-noncoop")

    @property
    def dirty_tracking(self):
        return self.has_feature("mem_dirty_track")

    def passes(self, need):
        """Whether the last probe found a capability: a self-test it passed, a CRIU feature, or a
        Docker runtime ("runtime:NAME", registered with the host's engine)."""
        if need.startswith("runtime:"):
            return need.partition(":")[2] in (self.capabilities.get("docker") or {}).get("runtimes", [])
        test = self.capabilities.get("self_tests", {}).get(need)
        if test is not None:
            return bool(test.get("ok"))
        return self.has_feature(need)

    def strategies(self, kind=None):
        """Strategies this host's last probe allows (for one workload kind, or any)."""
        from .engine import plans  # the registry imports the models

        return plans.strategies_for_host(self, kind)


class TrustedPair(models.Model):
    """Two hosts whose network between them is trusted for migration traffic.

    Between them CRIU streams memory in plain TCP, faster than with its TLS
    (as QEMU and libvirt allow); any other pair gets TLS. Stored with the
    lower host id first, so a pair is one row whichever way it is given.
    """

    host_a = models.ForeignKey(Host, models.CASCADE, related_name="+")
    host_b = models.ForeignKey(Host, models.CASCADE, related_name="+")
    note = models.CharField(max_length=200, blank=True, help_text="Why this network is trusted.")
    created = models.DateTimeField(default=timezone.now)

    class Meta:
        verbose_name = "trusted migration network"
        constraints = [
            models.UniqueConstraint(fields=["host_a", "host_b"], name="trusted_pair_once"),
            models.CheckConstraint(condition=models.Q(host_a__lt=models.F("host_b")), name="trusted_pair_ordered"),
        ]

    def __str__(self):
        return f"{self.host_a} <-> {self.host_b}"

    def clean(self):
        from django.core.exceptions import ValidationError

        if self.host_a_id and self.host_a_id == self.host_b_id:
            raise ValidationError("A trusted network joins two different hosts.")
        self._order()

    def save(self, *args, **kwargs):
        self._order()
        super().save(*args, **kwargs)

    def _order(self):
        if self.host_a_id and self.host_b_id and self.host_a_id > self.host_b_id:
            self.host_a_id, self.host_b_id = self.host_b_id, self.host_a_id

    @classmethod
    def between(cls, one, other):
        """Whether the network between two hosts is trusted."""
        a, b = sorted((one.pk, other.pk))
        return cls.objects.filter(host_a_id=a, host_b_id=b).exists()

    @classmethod
    def trust(cls, one, other, note=""):
        a, b = sorted((one.pk, other.pk))
        return cls.objects.get_or_create(host_a_id=a, host_b_id=b, defaults={"note": note})[0]


class RunQuerySet(models.QuerySet):
    def unfinished(self):
        """Runs a worker may still be working on."""
        return self.filter(status__in=(PENDING, RUNNING))

    def for_host(self, host):
        """Runs from or to a host."""
        return self.filter(models.Q(source=host) | models.Q(target=host))

    def queued(self):
        """Runs waiting in the workers' queue, first in line first."""
        return self.filter(status=PENDING).order_by("created", "pk")


def queue_positions(runs):
    """Set queue_position on each queued run of runs, with one query for all of them.

    A queued run's position is 1 plus the number of runs queued before it
    that want one of its hosts: 1 is next in line.
    """
    runs = [r for r in runs if r.status == PENDING]
    if not runs:
        return
    line = list(MigrationRun.objects.queued().values_list("pk", "source_id", "target_id"))
    for run in runs:
        mine = {run.source_id, run.target_id}
        ahead = 0
        for pk, source_id, target_id in line:
            if pk == run.pk:
                break
            ahead += bool(mine & {source_id, target_id})
        run.__dict__["queue_position"] = ahead + 1


class MigrationRun(models.Model):
    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    source = models.ForeignKey(Host, models.PROTECT, related_name="runs_out")
    target = models.ForeignKey(Host, models.PROTECT, related_name="runs_in")
    kind = models.CharField(max_length=16, choices=KIND_CHOICES)
    # Container name or id, or a PID, as the user gave it.
    workload = models.CharField(max_length=255)
    # What pre-flight resolved it to on the source (a container's full id,
    # a PID): one workload named two ways is still one, and the database
    # refuses a second active run on it (one_active_run_per_workload_id).
    workload_id = models.CharField(max_length=64, blank=True)
    tcp = models.CharField("established TCP connections", max_length=16, choices=TCP_CHOICES, default=TCP_CLOSE)
    # The operator's word that bind-mount sources and non-local volumes hold
    # the same data on the target, so they are used there as they are.
    shared_storage = models.BooleanField(default=False)
    # Where the workload runs after the run: container id or PID on the
    # target (succeeded) or on the source (rolled back).
    result_workload = models.CharField(max_length=255, blank=True)
    # A strategy of the plan registry; no choices here, so that adding a plan
    # needs no schema migration.
    strategy = models.CharField(max_length=32, default=STOP_AND_COPY)
    # Whether CRIU's TLS protected the memory stream between the hosts;
    # None where the strategy opens no connection of its own (the memory
    # goes through the controller's SSH connections).
    tls = models.BooleanField(null=True, blank=True)
    keep_source = models.BooleanField(default=False)
    status = models.CharField(max_length=16, choices=STATUS_CHOICES, default=PENDING)
    created = models.DateTimeField(default=timezone.now)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    downtime_ms = models.FloatField(null=True, blank=True)
    # The downtime as the workload was seen from outside (engine/observe.py),
    # next to the phase-level figure above, and how it was seen.
    observed_downtime_ms = models.FloatField(null=True, blank=True)
    observed_method = models.CharField(max_length=255, blank=True)
    # host:port the controller polls during the run, when one was given.
    probe_address = models.CharField(max_length=255, blank=True)
    # The bench_matrix run this run belongs to, "" for ordinary runs.
    benchmark = models.CharField(max_length=64, blank=True)
    total_bytes = models.BigIntegerField(default=0)
    # Bytes of the image shipped to the target, when it lacked it: moved,
    # but not the workload's state, so kept out of total_bytes.
    image_bytes = models.BigIntegerField(default=0)
    # Of total_bytes, the data of the container's named volumes.
    volume_bytes = models.BigIntegerField(default=0)
    # Pre-flight's estimate of the image size, for the progress bar.
    expected_bytes = models.BigIntegerField(default=0)
    error = models.TextField(blank=True)
    # "hostname:pid" of the process executing the run, to tell a run whose
    # worker died from one another process is still working on.
    worker = models.CharField(max_length=100, blank=True)
    # Until when the worker's claim holds: it renews it while it works, and
    # another worker takes the run over (recovers it) once it ran out.
    lease_expires = models.DateTimeField(null=True, blank=True)
    stage = models.CharField(max_length=16, choices=Stage.choices, default=Stage.PREPARING)
    # The plan's state (its dataclass as a dict) after the last phase: what a
    # recovery needs to know (checkpoint names, image directories, ids).
    state = models.JSONField(default=dict, blank=True)
    # Seconds the workload may stay frozen before the run rolls back; null:
    # the configured default plus an allowance for the workload's size.
    freeze_limit = models.FloatField(null=True, blank=True)
    operation = models.CharField(max_length=16, choices=OPERATION_CHOICES, default=MIGRATE)
    # The kept checkpoint a restore, clone, export or import works on, or
    # that a checkpoint run made.
    checkpoint = models.ForeignKey("Checkpoint", models.SET_NULL, null=True, blank=True, related_name="runs")
    # Who asked for it (the web's user; none from the command line).
    created_by = models.ForeignKey("auth.User", models.SET_NULL, null=True, blank=True, related_name="+")

    objects = RunQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        permissions = [("launch_migration", "Can launch migrations")]
        constraints = [
            # One migration per workload at a time, even when two requests race.
            models.UniqueConstraint(
                fields=["source", "kind", "workload"],
                condition=models.Q(status__in=["pending", "running"]),
                name="one_active_run_per_workload",
            ),
            models.UniqueConstraint(
                fields=["source", "kind", "workload_id"],
                condition=models.Q(status__in=["pending", "running"]) & ~models.Q(workload_id=""),
                name="one_active_run_per_workload_id",
            ),
        ]
        indexes = [
            # The history list: newest first, filtered by status.
            models.Index(fields=["status", "-created"], name="run_status_created"),
            # The comparison pages group finished runs by strategy.
            models.Index(fields=["strategy", "status"], name="run_strategy_status"),
            # The history list unfiltered or filtered by host (ORDER BY created DESC
            # LIMIT 50) and the CSV/JSON export of all runs: newest first. Without it
            # the database sorts every stored run for each page.
            models.Index(fields=["-created"], name="run_created"),
        ]

    def __str__(self):
        if self.operation != MIGRATE:
            where = self.source.name if self.source_id == self.target_id else f"{self.source} -> {self.target}"
            return f"{self.operation} {self.kind} {self.workload}: {where}"
        return f"{self.kind} {self.workload}: {self.source} -> {self.target}"

    def get_strategy_display(self):
        from .engine import plans

        return plans.label(self.kind, self.strategy)

    @functools.cached_property
    def queue_position(self):
        """Where a queued run stands in the queue for its hosts (1: next), None once it left it."""
        if self.status != PENDING:
            return None
        queue_positions([self])
        return self.__dict__.get("queue_position")

    def to_dict(self, phases=None):
        """The run as the CLI's --json and the run page's JSON show it."""
        phases = self.phases.all() if phases is None else phases
        return {
            "id": str(self.code),
            "status": self.status,
            "operation": self.operation,
            "kind": self.kind,
            "workload": self.workload,
            "result_workload": self.result_workload,
            "source": self.source.name,
            "target": self.target.name,
            "strategy": self.strategy,
            "tls": self.tls,
            "tcp": self.tcp,
            "shared_storage": self.shared_storage,
            "downtime_ms": self.downtime_ms,
            "observed_downtime_ms": self.observed_downtime_ms,
            "observed_method": self.observed_method or None,
            "probe": self.probe_address or None,
            "benchmark": self.benchmark or None,
            "bytes": self.total_bytes,
            "image_bytes": self.image_bytes,
            "volume_bytes": self.volume_bytes,
            "phases": [p.to_dict() for p in phases],
            "error": self.error or None,
            "queue_position": self.queue_position if self.status == PENDING else None,
        }


class CheckpointQuerySet(models.QuerySet):
    def of_workload(self, host, kind, workload):
        """A workload's checkpoints on a host, newest first (what retention counts)."""
        return self.filter(host=host, kind=kind, workload=workload).order_by("-created", "-pk")


class Checkpoint(models.Model):
    """A checkpoint kept on a host: CRIU's images (and a container's writable layer) in one directory.

    Its directory on the host holds `checkpoint/` (the images) and, for a
    container, `diff/` (its writable layer); with the container's inspect
    and image id stored here, that is all a restore or a clone needs, even
    after the container itself is gone.
    """

    code = models.UUIDField(default=uuid.uuid4, unique=True, editable=False)
    # Docker's grammar for checkpoint names (also a directory name on the host).
    name = models.CharField(max_length=64, unique=True)
    host = models.ForeignKey(Host, models.PROTECT, related_name="checkpoints")
    kind = models.CharField(max_length=16, choices=KIND_CHOICES)
    # The container name or PID as given, and what it resolved to: the
    # container's full id, or "PID:start time" of the tree's root.
    workload = models.CharField(max_length=255)
    workload_id = models.CharField(max_length=100, blank=True)
    leave_running = models.BooleanField(default=False)
    path = models.CharField(max_length=500)
    size = models.BigIntegerField(default=0)
    criu_stats = models.JSONField(default=dict, blank=True)
    # How long the workload was frozen, where it could be measured.
    freeze_ms = models.FloatField(null=True, blank=True)
    # The container's inspect (what create_like needs) and its image.
    config = models.JSONField(default=dict, blank=True)
    # What the pre-flight found (container_checks.check_source): networks
    # and fixed addresses to prepare on a target, what a restore is checked against.
    facts = models.JSONField(default=dict, blank=True)
    image_id = models.CharField(max_length=100, blank=True)
    image = models.CharField(max_length=255, blank=True)
    # What made it: a restore on an older CRIU or kernel is refused.
    criu_version = models.CharField(max_length=32, blank=True)
    kernel = models.CharField(max_length=100, blank=True)
    imported = models.BooleanField(default=False)
    created = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey("auth.User", models.SET_NULL, null=True, blank=True, related_name="+")

    objects = CheckpointQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        indexes = [
            # Retention: a workload's checkpoints on a host, newest first.
            models.Index(fields=["host", "kind", "workload", "-created"], name="checkpoint_workload"),
        ]

    def __str__(self):
        return self.name

    def to_dict(self):
        return {
            "name": self.name,
            "host": self.host.name,
            "kind": self.kind,
            "workload": self.workload,
            "workload_id": self.workload_id,
            "leave_running": self.leave_running,
            "path": self.path,
            "size": self.size,
            "freeze_ms": self.freeze_ms,
            "criu_stats": self.criu_stats or None,
            "image": self.image or None,
            "image_id": self.image_id or None,
            "criu_version": self.criu_version,
            "kernel": self.kernel,
            "imported": self.imported,
            "created": self.created.isoformat(),
        }


class Phase(models.Model):
    run = models.ForeignKey(MigrationRun, models.CASCADE, related_name="phases")
    seq = models.PositiveIntegerField()
    name = models.CharField(max_length=64)
    host = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=16, default=PHASE_RUNNING)
    started = models.DateTimeField()
    ended = models.DateTimeField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    bytes = models.BigIntegerField(default=0)
    criu_stats = models.JSONField(default=dict, blank=True)
    detail = models.TextField(blank=True)
    log_excerpt = models.TextField(blank=True)
    # The whole CRIU log of this step where one was written, for download.
    log = models.TextField(blank=True)

    class Meta:
        ordering = ["seq"]
        constraints = [models.UniqueConstraint(fields=["run", "seq"], name="phase_run_seq")]

    def to_dict(self):
        return {
            "name": self.name,
            "host": self.host,
            "status": self.status,
            "started": self.started.isoformat() if self.started else None,
            "duration_ms": self.duration_ms,
            "bytes": self.bytes,
            "criu_stats": self.criu_stats or None,
            "detail": self.detail or None,
        }

class ApiToken(models.Model):
    """A user's secret for the API (migrations_app/api): the user's permissions, without a session.

    Only a SHA-256 digest of the secret is stored: the secret is shown once,
    when it is issued. A plain digest suffices (no slow password hash): the
    secret is 256 random bits, so a stolen digest cannot be guessed back.
    """

    PREFIX = "cw_"

    user = models.ForeignKey("auth.User", models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What this token is for (a script, a pipeline).")
    # The secret's first characters, shown in lists to tell tokens apart.
    prefix = models.CharField(max_length=16, editable=False)
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created = models.DateTimeField(default=timezone.now, editable=False)
    last_used = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created"]
        verbose_name = "API token"

    def __str__(self):
        return f"{self.name} ({self.prefix}…, {self.user})"

    @staticmethod
    def hash(secret: str) -> str:
        return hashlib.sha256(secret.encode()).hexdigest()

    @classmethod
    def issue(cls, user, name: str) -> tuple["ApiToken", str]:
        """A new token for a user, and its secret (stored nowhere: show it once)."""
        secret = cls.PREFIX + secrets.token_urlsafe(32)
        token = cls.objects.create(user=user, name=name, prefix=secret[:10], digest=cls.hash(secret))
        return token, secret
