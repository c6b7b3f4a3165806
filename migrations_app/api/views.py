"""The API for automation: launch runs, read them and their phases, list runs, hosts and checkpoints.

Django REST framework views over the same code as the web pages: the
history page's filter form, the migration form's checks, lifecycle's
create_run and the worker entry point the migration page uses. The
permissions are the web app's: any logged-in user reads, launching needs
"Can launch migrations", host management needs the admin's permission.
"""

from __future__ import annotations

import logging

from django.db.models import Prefetch
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import exceptions, generics, permissions, status
from rest_framework.pagination import PageNumberPagination
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from .. import engine, inventory, worker
from ..engine import plans
from ..forms import MigrationForm, RunFilterForm
from ..models import CONTAINER, Checkpoint, Host, MigrationRun, Phase, queue_positions
from . import serializers as s

log = logging.getLogger(__name__)

CAN_LAUNCH = "migrations_app.launch_migration"
CAN_MANAGE_HOSTS = "migrations_app.change_host"


class HasPermission(permissions.BasePermission):
    """A Django permission for the unsafe methods; reading needs only a login."""

    perm = ""

    def has_permission(self, request, view):
        if request.method in permissions.SAFE_METHODS:
            return True
        return request.user.has_perm(self.perm)


class CanLaunch(HasPermission):
    perm = CAN_LAUNCH
    message = "Launching needs the permission 'Can launch migrations'."


class CanManageHosts(HasPermission):
    perm = CAN_MANAGE_HOSTS
    message = "Managing hosts needs the permission 'Can change host' (an administrator's)."


class Pagination(PageNumberPagination):
    page_size = 50  # the history page's
    page_size_query_param = "page_size"
    max_page_size = 500


ERRORS = {
    400: OpenApiResponse(s.ErrorSerializer, description="Bad input; `errors` names each field at fault."),
    401: OpenApiResponse(s.ErrorSerializer, description="No token, or an unknown or revoked one."),
    403: OpenApiResponse(s.ErrorSerializer, description="The token's user lacks the permission."),
    404: OpenApiResponse(s.ErrorSerializer, description="No such object."),
    409: OpenApiResponse(s.ErrorSerializer, description="The workload is already being migrated."),
}

FILTERS = [
    OpenApiParameter("host", str, description="Runs from or to this host (its name)."),
    OpenApiParameter("workload", str, description="Workload name or PID contains this (any case)."),
    OpenApiParameter("kind", str, enum=[k for k, _ in RunFilterForm.base_fields["kind"].choices if k]),
    OpenApiParameter("strategy", str, description="A strategy, or `baseline` for the benchmark's CRIU-alone runs."),
    OpenApiParameter("status", str, enum=[k for k, _ in RunFilterForm.base_fields["status"].choices if k]),
    OpenApiParameter("benchmark", str, description="The bench_matrix run's name."),
    OpenApiParameter("operation", str, enum=[k for k, _ in RunFilterForm.base_fields["operation"].choices if k]),
]


def _bad_input(errors: dict, rename: dict | None = None) -> exceptions.ValidationError:
    """A 400 whose `errors` names the API's fields (the form's `__all__` as non_field_errors)."""
    rename = {"__all__": "non_field_errors", **(rename or {})}
    named = {}
    for field, messages in errors.items():
        named.setdefault(rename.get(field, field), []).extend(str(m) for m in messages)
    return exceptions.ValidationError(named)


class WorkloadBusy(exceptions.APIException):
    status_code = status.HTTP_409_CONFLICT
    default_code = "busy"


class RunList(generics.ListAPIView):
    permission_classes = [permissions.IsAuthenticated, CanLaunch]
    serializer_class = s.RunSerializer
    pagination_class = Pagination

    def get_queryset(self):
        runs = MigrationRun.objects.select_related("source", "target", "created_by")
        # The history page's filters, read by its own form. Unlike the page,
        # which shows nothing for a filter it cannot read, a script is told
        # which parameter is wrong.
        params = {k: v for k, v in self.request.query_params.items() if k in RunFilterForm.base_fields}
        form = RunFilterForm(params)
        if not form.is_valid():
            raise _bad_input(form.errors)
        return form.filter(runs)

    def paginate_queryset(self, queryset):
        page = super().paginate_queryset(queryset)
        queue_positions(page)  # one query for the queued runs of the page, not one each
        return page

    @extend_schema(
        parameters=FILTERS,
        responses={200: s.RunSerializer(many=True), **ERRORS},
        summary="List runs, newest first, with the history page's filters",
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)

    @extend_schema(
        request=s.LaunchSerializer, responses={201: s.RunDetailSerializer, **ERRORS}, summary="Launch a migration"
    )
    def post(self, request: Request) -> Response:
        launch = s.LaunchSerializer(data=request.data)
        launch.is_valid(raise_exception=True)
        data = launch.validated_data
        run = _launch(data, request.user)
        body = s.RunDetailSerializer(run, context={"request": request}).data
        return Response(body, status=status.HTTP_201_CREATED, headers={"Location": body["url"]})


def _launch(data: dict, user) -> MigrationRun:
    """Check a launch as the migration form does, create the run and hand it to the workers."""
    field = "container" if data["kind"] == CONTAINER else "pid"
    form = MigrationForm(
        {
            "source": data["source"],
            "target": data["target"],
            "kind": data["kind"],
            field: data["workload"],
            "strategy": data.get("strategy") or plans.default_strategy(data["kind"]),
            "keep_source": data["keep_source"],
            "probe": data["probe"],
            "tcp": data["tcp"],
            "shared_storage": data["shared_storage"],
        }
    )
    if not form.is_valid():
        raise _bad_input(form.errors, {"container": "workload", "pid": "workload"})
    clean = form.cleaned_data
    try:
        # The migration page's entry point: created and queued for a worker in one transaction.
        return worker.submit(
            engine.create_run,
            clean["source"],
            clean["target"],
            clean["kind"],
            form.workload(),
            keep_source=clean["keep_source"],
            strategy=clean["strategy"],
            probe=clean["probe"],
            tcp=clean["tcp"],
            shared_storage=clean["shared_storage"],
            freeze_limit=data["freeze_limit"],
            user=user,
        )
    except engine.WorkloadBusy as e:
        raise WorkloadBusy(str(e)) from None
    except engine.MigrationError as e:
        raise _bad_input({"__all__": [str(e)]}) from None


class RunDetail(generics.RetrieveAPIView):
    serializer_class = s.RunDetailSerializer
    lookup_field = "code"
    # The whole CRIU logs are the run page's download; polling should not carry them.
    queryset = MigrationRun.objects.select_related("source", "target", "created_by").prefetch_related(
        Prefetch("phases", Phase.objects.defer("log"))
    )

    @extend_schema(responses={200: s.RunDetailSerializer, **ERRORS}, summary="A run and its phases")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class HostList(generics.ListAPIView):
    serializer_class = s.HostSerializer
    queryset = Host.objects.all()

    @extend_schema(
        responses={200: s.HostSerializer(many=True), **ERRORS}, summary="Hosts with their last probe's results"
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class HostDetail(generics.RetrieveAPIView):
    serializer_class = s.HostSerializer
    queryset = Host.objects.all()
    lookup_field = "name"

    @extend_schema(responses={200: s.HostSerializer, **ERRORS}, summary="A host and its last probe's results")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class HostProbe(generics.GenericAPIView):
    permission_classes = [permissions.IsAuthenticated, CanManageHosts]
    serializer_class = s.HostSerializer
    queryset = Host.objects.all()
    lookup_field = "name"

    @extend_schema(
        request=None,
        responses={200: s.HostSerializer, **ERRORS},
        summary="Probe a host again (CRIU, Docker, kernel, self-tests); the host with the results",
    )
    def post(self, request, *args, **kwargs):
        host = self.get_object()
        inventory.probe(host)  # a host that fails is a result, not an error
        return Response(self.get_serializer(host).data)


class CheckpointList(generics.ListAPIView):
    serializer_class = s.CheckpointSerializer
    pagination_class = Pagination

    def get_queryset(self):
        checkpoints = Checkpoint.objects.select_related("host", "created_by")
        if host := self.request.query_params.get("host"):
            checkpoints = checkpoints.filter(host__name=host)
        return checkpoints

    @extend_schema(
        parameters=[OpenApiParameter("host", str, description="Only this host's checkpoints.")],
        responses={200: s.CheckpointSerializer(many=True), **ERRORS},
        summary="Kept checkpoints",
    )
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


class CheckpointDetail(generics.RetrieveAPIView):
    serializer_class = s.CheckpointSerializer
    queryset = Checkpoint.objects.select_related("host", "created_by")
    lookup_field = "name"

    @extend_schema(responses={200: s.CheckpointSerializer, **ERRORS}, summary="A kept checkpoint")
    def get(self, request, *args, **kwargs):
        return super().get(request, *args, **kwargs)


def exception_handler(exc, context):
    """Every error as {"detail", "errors"?}, and no traceback, even for a bug."""
    response = drf_exception_handler(exc, context)
    if response is None:
        log.exception("API request failed", exc_info=exc)
        return Response({"detail": "Internal error; the server's log has the details."}, status=500)
    if isinstance(exc, exceptions.ValidationError):
        errors = exc.detail if isinstance(exc.detail, dict) else {"non_field_errors": exc.detail}
        response.data = {"detail": _summary(errors), "errors": errors}
    return response


def _summary(errors: dict) -> str:
    """One line for a person reading the response: each field and its first message."""
    parts = []
    for field, messages in errors.items():
        first = messages[0] if isinstance(messages, list) and messages else messages
        parts.append(f"{field}: {first}" if field != "non_field_errors" else str(first))
    return "; ".join(parts)
