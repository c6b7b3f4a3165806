"""The API's shapes: what it returns, and what a launch takes.

The output serializers also describe the responses in the OpenAPI schema.
The launch serializer only reads the JSON's types; what the input means
(hosts that pass their probe, a strategy both support, a workload that
runs on the source) is checked by the migration form, as on the web.
"""

from __future__ import annotations

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from ..engine import plans
from ..models import KIND_CHOICES, TCP_CHOICES, TCP_CLOSE, Checkpoint, Host, MigrationRun, Phase

# What CRIU's stats images hold (criu.py reads them): free-form counters.
MAX_FREEZE_LIMIT = 24 * 3600  # lifecycle.create_run's bound

CRIU_STATS = {"type": "object", "additionalProperties": {"type": "number"}, "nullable": True}


# Integer fields of the models declared again with bounds of their own: taken
# from the model, their bounds are the database's integer range (64 bits on
# SQLite, 32 on PostgreSQL), and the schema would change with the database.


class PhaseSerializer(serializers.ModelSerializer):
    seq = serializers.IntegerField(min_value=0, read_only=True, help_text="The phase's place in the run, from 0.")
    criu_stats = serializers.SerializerMethodField()

    class Meta:
        model = Phase
        fields = [
            "seq",
            "name",
            "host",
            "status",
            "started",
            "ended",
            "duration_ms",
            "bytes",
            "criu_stats",
            "detail",
            "log_excerpt",
        ]

    @extend_schema_field(CRIU_STATS)
    def get_criu_stats(self, phase):
        return phase.criu_stats or None


class RunSerializer(serializers.ModelSerializer):
    """A run as the list shows it: everything but its phases."""

    id = serializers.UUIDField(source="code")
    url = serializers.HyperlinkedIdentityField(view_name="api-run", lookup_field="code", lookup_url_kwarg="code")
    source = serializers.SlugRelatedField(slug_field="name", read_only=True)
    target = serializers.SlugRelatedField(slug_field="name", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    probe = serializers.CharField(source="probe_address")
    bytes = serializers.IntegerField(source="total_bytes", help_text="Bytes of the workload's state moved.")
    duration_ms = serializers.SerializerMethodField(help_text="From the start to the end of the run.")
    queue_position = serializers.SerializerMethodField(
        help_text="While the run is queued (status pending): 1 plus the runs queued before it for one of its "
        "hosts (1: next in line); null once a worker took it. See docs/workers.md."
    )

    class Meta:
        model = MigrationRun
        fields = [
            "id",
            "url",
            "status",
            "queue_position",
            "stage",
            "operation",
            "kind",
            "workload",
            "result_workload",
            "source",
            "target",
            "strategy",
            "tls",
            "tcp",
            "keep_source",
            "shared_storage",
            "probe",
            "freeze_limit",
            "benchmark",
            "created",
            "started",
            "finished",
            "duration_ms",
            "downtime_ms",
            "observed_downtime_ms",
            "observed_method",
            "bytes",
            "image_bytes",
            "volume_bytes",
            "expected_bytes",
            "error",
            "created_by",
        ]

    @extend_schema_field({"type": "integer", "nullable": True})
    def get_queue_position(self, run) -> int | None:
        # The list sets it for its whole page in one query (RunList.paginate_queryset).
        return run.queue_position

    @extend_schema_field(OpenApiTypes.DOUBLE)
    def get_duration_ms(self, run) -> float | None:
        if run.started and run.finished:
            return (run.finished - run.started).total_seconds() * 1000
        return None


class RunDetailSerializer(RunSerializer):
    """A run with its phases: timings, bytes, CRIU's statistics, log excerpts."""

    phases = PhaseSerializer(many=True, read_only=True)

    class Meta(RunSerializer.Meta):
        fields = RunSerializer.Meta.fields + ["phases"]


class LaunchSerializer(serializers.Serializer):
    """A migration to start: the migration form's fields, with the workload in one field."""

    source = serializers.CharField(help_text="Name of the source host.")
    target = serializers.CharField(help_text="Name of the target host.")
    kind = serializers.ChoiceField(choices=KIND_CHOICES)
    # Not trimmed: " 12" is refused, not read as PID 12 (validation.pid says why).
    workload = serializers.CharField(
        trim_whitespace=False,
        max_length=255,
        help_text="A container's name or id, or a process tree's root PID (digits, or a JSON number).",
    )
    strategy = serializers.CharField(
        required=False,
        allow_blank=True,
        help_text=f"One of {', '.join(plans.strategies())} that both hosts passed (GET /api/v1/hosts/); "
        "empty or absent: the kind's default ("
        + ", ".join(f"{kind}: {plans.default_strategy(kind)}" for kind in plans.KINDS)
        + ").",
    )
    keep_source = serializers.BooleanField(default=False, help_text="Keep the stopped source container.")
    tcp = serializers.ChoiceField(choices=TCP_CHOICES, default=TCP_CLOSE, help_text="Established TCP connections.")
    probe = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="host:port the controller connects to every 10 ms during the run, to see the outage from outside.",
    )
    shared_storage = serializers.BooleanField(
        default=False, help_text="Bind-mount sources and non-local volumes hold the same data on the target."
    )
    freeze_limit = serializers.FloatField(
        required=False,
        allow_null=True,
        default=None,
        help_text="Seconds the workload may stay frozen before the run rolls back; "
        "null: 60 s plus 30 s per GiB (configurable).",
    )

    def validate_freeze_limit(self, value):
        # create_run refuses the same; checked here so that the error names the field.
        if value is not None and not 0 < value <= MAX_FREEZE_LIMIT:
            raise serializers.ValidationError(f"Give seconds between 0 and {MAX_FREEZE_LIMIT} (exclusive of 0).")
        return value


class HostSerializer(serializers.ModelSerializer):
    """A host and what its last probe found."""

    ssh_port = serializers.IntegerField(min_value=1, max_value=65535, read_only=True)
    checkpoint_retention = serializers.IntegerField(
        min_value=0,
        read_only=True,
        help_text="Kept checkpoints per workload on this host (older ones are deleted); 0 keeps them all.",
    )
    host_key_pinned = serializers.SerializerMethodField()
    probe = serializers.SerializerMethodField()
    strategies = serializers.SerializerMethodField(help_text="Per workload kind, the strategies its probe allows.")

    class Meta:
        model = Host
        fields = [
            "name",
            "address",
            "ssh_port",
            "user",
            "work_dir",
            "host_key_pinned",
            "allow_privileged",
            "checkpoint_retention",
            "probed",
            "probe",
            "strategies",
        ]

    def get_host_key_pinned(self, host) -> bool:
        return bool(host.host_key)

    @extend_schema_field(
        {
            "type": "object",
            "nullable": True,
            "description": "The last probe's findings; null when never probed.",
            "properties": {
                "ok": {"type": "boolean"},
                "error": {"type": "string"},
                "criu_version": {"type": "string", "nullable": True},
                "criu_check_ok": {"type": "boolean"},
                "criu_features": {"type": "object", "additionalProperties": {"type": "boolean"}},
                "self_tests": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "properties": {"ok": {"type": "boolean"}, "error": {"type": "string"}},
                    },
                },
                "docker": {"type": "object", "additionalProperties": {}},
                "kernel": {"type": "string", "nullable": True},
                "free_bytes": {"type": "integer", "nullable": True},
            },
        }
    )
    def get_probe(self, host):
        if not host.probed:
            return None
        caps = host.capabilities or {}
        criu = caps.get("criu") or {}
        return {
            "ok": bool(caps.get("ok")),
            "error": caps.get("error", ""),
            "criu_version": criu.get("version"),
            "criu_check_ok": bool(criu.get("check_ok")),
            "criu_features": criu.get("features", {}),
            "self_tests": caps.get("self_tests", {}),
            "docker": caps.get("docker", {}),
            "kernel": caps.get("kernel"),
            "free_bytes": caps.get("free"),
        }

    @extend_schema_field({"type": "object", "additionalProperties": {"type": "array", "items": {"type": "string"}}})
    def get_strategies(self, host):
        return {kind: host.strategies(kind) for kind in plans.KINDS}


class CheckpointSerializer(serializers.ModelSerializer):
    host = serializers.SlugRelatedField(slug_field="name", read_only=True)
    created_by = serializers.SlugRelatedField(slug_field="username", read_only=True)
    criu_stats = serializers.SerializerMethodField()

    class Meta:
        model = Checkpoint
        fields = [
            "name",
            "host",
            "kind",
            "workload",
            "workload_id",
            "leave_running",
            "path",
            "size",
            "freeze_ms",
            "criu_stats",
            "image",
            "image_id",
            "criu_version",
            "kernel",
            "imported",
            "created",
            "created_by",
        ]

    @extend_schema_field(CRIU_STATS)
    def get_criu_stats(self, cp):
        return cp.criu_stats or None


class ErrorSerializer(serializers.Serializer):
    """Every error: what went wrong, and for bad input the fields at fault."""

    detail = serializers.CharField()
    errors = serializers.DictField(
        child=serializers.ListField(child=serializers.CharField()),
        required=False,
        help_text="Per input field (or non_field_errors), its messages.",
    )
