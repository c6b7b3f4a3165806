import csv
import os
import shutil
import tempfile
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.paginator import Paginator
from django.db.models import BooleanField, ExpressionWrapper, F, Q
from django.http import FileResponse, Http404, HttpResponse, JsonResponse, StreamingHttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_POST

from . import engine, inventory, reports, ssh, worker
from .docker_engine import EngineError
from .engine import keep, plans, recovery
from .forms import (
    ApiTokenForm,
    CheckpointForm,
    HostForm,
    HostKeyForm,
    ImportForm,
    MigrationForm,
    RestoreForm,
    RetentionForm,
    RunFilterForm,
)
from .models import (
    CLONE,
    EXPORT,
    FINISHED,
    RESTORE,
    SUCCEEDED,
    ApiToken,
    Checkpoint,
    Host,
    MigrationRun,
    queue_positions,
)  # fmt: skip

RUNS_PER_PAGE = 50
CAN_LAUNCH = "migrations_app.launch_migration"
CAN_MANAGE_HOSTS = "migrations_app.change_host"


def _permission(perm):
    """Anonymous users log in first; a logged-in user without the permission gets 403
    (permission_required alone sends them to the login page they are already past)."""

    def decorator(view):
        return login_required(permission_required(perm, raise_exception=True)(view))

    return decorator


def _get_host(name):
    return get_object_or_404(Host, name=name)


def _get_run(code):
    return get_object_or_404(MigrationRun.objects.select_related("source", "target"), code=code)


def _filtered_runs(request):
    runs = MigrationRun.objects.select_related("source", "target")
    form = RunFilterForm(request.GET or None)
    if form.is_bound:
        # A filter that cannot be read (a deleted host, a mistyped status)
        # matches nothing: showing or exporting every run instead would lie.
        runs = form.filter(runs) if form.is_valid() else runs.none()
    return form, runs


@login_required
def index(request):
    ctx = {
        "hosts": Host.objects.all(),
        "runs": _with_positions(MigrationRun.objects.select_related("source", "target")[:10]),
        "can_launch": request.user.has_perm(CAN_LAUNCH),
    }
    return render(request, "index.html", ctx)


def _with_positions(runs):
    """The runs as a list, each queued one with its queue_position (one query for all)."""
    runs = list(runs)
    queue_positions(runs)
    return runs


# -- hosts -------------------------------------------------------------------------


@login_required
def host_list(request):
    return render(request, "hosts/list.html", {"hosts": Host.objects.all()})


@login_required
def host_detail(request, name):
    host = _get_host(name)
    ctx = {
        "host": host,
        "can_launch": request.user.has_perm(CAN_LAUNCH),
        "can_manage": request.user.has_perm(CAN_MANAGE_HOSTS),
        "runs": _with_positions(MigrationRun.objects.for_host(host).select_related("source", "target")[:10]),
        "checkpoint_form": CheckpointForm(),
    }
    return render(request, "hosts/detail.html", ctx)


# Process command lines often hold secrets (passwords in arguments), and each
# call opens SSH connections: only those who pick workloads to move may list them.
@_permission(CAN_LAUNCH)
def host_workloads(request, name):
    """Live containers and processes of a host, for its page and the migration form."""
    host = _get_host(name)
    try:
        containers, processes = inventory.workloads(host, with_processes=request.GET.get("processes") != "0")
    except (ssh.SSHError, EngineError) as e:
        return JsonResponse({"error": str(e)}, status=502)
    return JsonResponse({"host": host.name, "containers": containers, "processes": processes})


@_permission(CAN_MANAGE_HOSTS)
def host_add(request):
    form = HostForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        host = Host(**form.cleaned_data)
        host.save()
        return redirect("cw-host-key", name=host.name)
    return render(request, "hosts/form.html", {"form": form})


@_permission(CAN_MANAGE_HOSTS)
def host_edit(request, name):
    host = _get_host(name)
    initial = {f: getattr(host, f) for f in HostForm.base_fields}
    form = HostForm(request.POST or None, initial=initial, instance=host)
    if request.method == "POST" and form.is_valid():
        moved = (form.cleaned_data["address"], form.cleaned_data["ssh_port"]) != (host.address, host.ssh_port)
        for field, value in form.cleaned_data.items():
            setattr(host, field, value)
        if moved:
            host.host_key = ""  # another machine maybe: its key is confirmed anew
        host.save()
        if moved:
            return redirect("cw-host-key", name=host.name)
        messages.success(request, f"{host.name} saved.")
        return redirect("cw-host", name=host.name)
    return render(request, "hosts/form.html", {"form": form, "host": host})


@_permission(CAN_MANAGE_HOSTS)
def host_key(request, name):
    """Show the host's key as a fingerprint; pin it when the user confirms."""
    host = _get_host(name)
    if request.method == "POST":
        form = HostKeyForm(request.POST)
        if form.is_valid():
            host.host_key = form.cleaned_data["host_key"]
            host.save(update_fields=["host_key"])
            messages.success(request, f"Host key of {host.name} pinned.")
            return redirect("cw-host", name=host.name)
        # The page below shows a fresh form with the key offered now; say why this one was refused.
        for error in form.errors["host_key"]:
            messages.error(request, f"Key refused: {error}")
    offered, error = None, ""
    try:
        offered = ssh.fetch_host_key(host.address, host.ssh_port)
    except ssh.SSHError as e:
        error = str(e)
    ctx = {
        "host": host,
        "offered": offered,
        "fingerprint": ssh.fingerprint(offered) if offered else "",
        "pinned_fingerprint": ssh.fingerprint(host.host_key) if host.host_key else "",
        "form": HostKeyForm(initial={"host_key": offered}),
        "error": error,
    }
    return render(request, "hosts/key.html", ctx)


@require_POST
@_permission(CAN_MANAGE_HOSTS)
def host_probe(request, name):
    host = _get_host(name)
    caps = inventory.probe(host)
    if caps["ok"]:
        messages.success(request, f"{host.name}: connection and probe OK.")
    else:
        messages.error(request, f"{host.name}: {caps['error']}")
    return redirect("cw-host", name=host.name)


# -- migrations ---------------------------------------------------------------------


@_permission(CAN_LAUNCH)
def migrate(request):
    form = MigrationForm(request.POST or None, initial=request.GET.dict())
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            # A worker executes it (docs/workers.md); this process only queues it.
            run = worker.submit(
                engine.create_run, data["source"], data["target"], data["kind"], form.workload(),
                keep_source=data["keep_source"], strategy=data["strategy"], probe=data["probe"], tcp=data["tcp"],
                shared_storage=data["shared_storage"], user=request.user,
            )
        except engine.MigrationError as e:
            form.add_error(None, str(e))
        else:
            return redirect("cw-run", code=run.code)
    table = plans.offer_table(Host.objects.all())
    return render(request, "migrate.html", {"form": form, "strategy_table": table})


@login_required
def run_list(request):
    form, runs = _filtered_runs(request)
    page = Paginator(runs, RUNS_PER_PAGE).get_page(request.GET.get("page"))
    queue_positions(page.object_list)
    query = request.GET.copy()
    query.pop("page", None)
    ctx = {"form": form, "page": page, "query": query.urlencode()}
    return render(request, "runs/list.html", ctx)


@login_required
def run_detail(request, code):
    run = _get_run(code)
    can_recover = request.user.has_perm(CAN_LAUNCH) and recovery.recoverable(run)
    return render(request, "runs/detail.html", {"run": run, "finished": run.status in FINISHED,
                                                "can_recover": can_recover, "unattended": worker.unattended_for(run),
                                                "archive_url": _archive_url(request, run)})  # fmt: skip


def _archive_url(request, run) -> str | None:
    """Where a finished web export's archive downloads, for a user who may fetch it."""
    if request.user.has_perm(CAN_LAUNCH) and _export_file(run):
        return reverse("cw-run-archive", args=[run.code])
    return None


@require_POST
@_permission(CAN_LAUNCH)
def run_recover(request, code):
    """Recover a run whose worker died or whose rollback failed, from its stored stage."""
    run = _get_run(code)
    if not recovery.recoverable(run):
        messages.error(request, "This run has nothing to recover, or its worker is still at work on it.")
    else:
        worker.enqueue_recovery(run)
        messages.success(request, "Recovery queued for a worker; this page shows its outcome.")
    return redirect("cw-run", code=run.code)


@login_required
def run_json(request, code):
    run = _get_run(code)
    # Whole logs are a download of their own; polling should not carry them.
    phases = list(
        run.phases.defer("log").annotate(has_log=ExpressionWrapper(~Q(log=""), output_field=BooleanField()))
    )
    data = run.to_dict(phases)
    for item, phase in zip(data["phases"], phases):
        item.update(seq=phase.seq, log_excerpt=phase.log_excerpt, has_log=phase.has_log,
                    ended=phase.ended.isoformat() if phase.ended else None)
    data.update(
        finished=run.status in FINISHED,
        expected_bytes=run.expected_bytes,
        started=run.started.isoformat() if run.started else None,
        archive_url=_archive_url(request, run),
    )
    return JsonResponse(data)


@login_required
def run_logs(request, code):
    """Every CRIU log and error of a run as one text file."""
    run = _get_run(code)
    parts = [f"criuweb run {run.code}: {run} — {run.status}\n"]
    if run.error:
        parts.append(f"error: {run.error}\n")
    for phase in run.phases.all():
        parts.append(f"\n===== {phase.seq} {phase.name} on {phase.host}: {phase.status} =====\n")
        if phase.detail:
            parts.append(phase.detail + "\n")
        if phase.log_excerpt:
            parts.append("--- log excerpt ---\n" + phase.log_excerpt + "\n")
        if phase.log:
            parts.append("--- log ---\n" + phase.log + "\n")
    response = HttpResponse("".join(parts), content_type="text/plain; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="criuweb-run-{run.code}.log"'
    return response


EXPORT_FIELDS = ["id", "created", "status", "kind", "workload", "source", "target", "strategy",
                 "downtime_ms", "bytes", "duration_ms", "error"]


def _export_rows(runs):
    # Plain rows, not model instances: building 10,000 runs and their hosts
    # (with their capabilities JSON) was most of the export's time.
    rows = runs.values(
        "code", "created", "status", "kind", "workload", "strategy", "downtime_ms", "total_bytes", "error",
        "started", "finished", source_name=F("source__name"), target_name=F("target__name"),
    )
    for r in rows.iterator(chunk_size=2000):
        duration = (r["finished"] - r["started"]).total_seconds() * 1000 if r["finished"] and r["started"] else None
        yield {
            "id": str(r["code"]), "created": r["created"].isoformat(), "status": r["status"], "kind": r["kind"],
            "workload": r["workload"], "source": r["source_name"], "target": r["target_name"],
            "strategy": r["strategy"], "downtime_ms": r["downtime_ms"], "bytes": r["total_bytes"],
            "duration_ms": duration, "error": r["error"],
        }


# A spreadsheet runs a cell that starts with one of these as a formula
# (OWASP "CSV Injection"); a run's workload or error can come from a host.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_safe(row):
    """The row with every text cell a spreadsheet would read as a formula prefixed with a quote."""
    return {k: "'" + v if isinstance(v, str) and v.startswith(_FORMULA_START) else v for k, v in row.items()}


class _Echo:
    def write(self, value):
        return value


@login_required
def runs_export(request, fmt):
    if fmt not in ("csv", "json"):
        raise Http404(f"no export format {fmt!r}")  # rather than CSV under any name
    _, runs = _filtered_runs(request)
    if fmt == "json":
        return JsonResponse({"runs": list(_export_rows(runs))})
    writer = csv.DictWriter(_Echo(), fieldnames=EXPORT_FIELDS)
    lines = (writer.writerow(_csv_safe(row)) for row in _export_rows(runs))
    header = writer.writerow(dict(zip(EXPORT_FIELDS, EXPORT_FIELDS)))
    response = StreamingHttpResponse(_prepend(header, lines), content_type="text/csv")
    response["Content-Disposition"] = 'attachment; filename="criuweb-runs.csv"'
    return response


def _prepend(first, rest):
    yield first
    yield from rest


# -- comparison ---------------------------------------------------------------------------


@login_required
def compare(request):
    form, _ = _filtered_runs(request)
    return render(request, "compare.html", {"form": form, "query": request.GET.urlencode()})


@login_required
def compare_json(request):
    _, runs = _filtered_runs(request)
    data = {
        "over_time": reports.runs_over_time(runs),
        "phases": reports.phase_breakdown(runs),
        "by_size": reports.downtime_by_size(runs),
        "groups": {name: reports.downtime_percentiles(runs, name) for name in ("strategy", "host_pair", "size")},
    }
    return JsonResponse(data)



# -- kept checkpoints ----------------------------------------------------------------------


def _get_checkpoint(name):
    return get_object_or_404(Checkpoint.objects.select_related("host", "created_by"), name=name)


def _start(request, factory, *args, **kwargs):
    """Create an operation's run and queue it for a worker; redirect to it, or back with the error."""
    try:
        run = worker.submit(factory, *args, user=request.user, **kwargs)
    except engine.MigrationError as e:
        messages.error(request, str(e))
        return None
    return redirect("cw-run", code=run.code)


@login_required
def checkpoint_list(request, name=None):
    host = _get_host(name) if name else None
    checkpoints = Checkpoint.objects.select_related("host", "created_by")
    if host:
        checkpoints = checkpoints.filter(host=host)
    ctx = {
        "host": host,
        "checkpoints": checkpoints,
        "hosts": Host.objects.all(),
        "can_launch": request.user.has_perm(CAN_LAUNCH),
        "can_manage": request.user.has_perm(CAN_MANAGE_HOSTS),
        "retention_form": RetentionForm(initial={"keep": host.checkpoint_retention}) if host else None,
        "import_form": ImportForm(initial={"host": host.name} if host else None),
        "restore_form": RestoreForm(),
    }
    return render(request, "checkpoints/list.html", ctx)


@require_POST
@_permission(CAN_LAUNCH)
def host_checkpoint(request, name):
    """Take a checkpoint of a workload on this host (the form on the host page)."""
    host = _get_host(name)
    form = CheckpointForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        response = _start(request, keep.create_checkpoint_run, host, data["kind"], form.workload(),
                          data["name"] or None, data["leave_running"])  # fmt: skip
        if response:
            return response
    else:
        for field, errors in form.errors.items():
            messages.error(request, f"{field}: {' '.join(errors)}")
    return redirect("cw-host", name=host.name)


@require_POST
@_permission(CAN_LAUNCH)
def checkpoint_restore(request, name, operation):
    cp = _get_checkpoint(name)
    form = RestoreForm(request.POST)
    if form.is_valid():
        data = form.cleaned_data
        response = _start(request, keep.create_restore_run, cp, data["target"], data["new_name"],
                          operation=CLONE if operation == "clone" else RESTORE)  # fmt: skip
        if response:
            return response
    else:
        for field, errors in form.errors.items():
            messages.error(request, f"{field}: {' '.join(errors)}")
    return redirect("cw-checkpoints")


@require_POST
@_permission(CAN_LAUNCH)
def checkpoint_delete(request, name):
    cp = _get_checkpoint(name)
    try:
        keep.delete(cp)
    except (engine.MigrationError, ssh.SSHError) as e:
        messages.error(request, f"{cp.name} not deleted: {e}")
    else:
        messages.success(request, f"Checkpoint {name} and its files on {cp.host.name} deleted.")
    return redirect("cw-checkpoints")


# How long an exported archive waits on the controller for its download.
EXPORT_KEEP = timedelta(hours=24)


def _exports_dir() -> Path:
    path = Path(settings.VAR_DIR) / "exports"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _purge_exports() -> None:
    """Remove exported archives older than EXPORT_KEEP (one directory each)."""
    old = (timezone.now() - EXPORT_KEEP).timestamp()
    for d in _exports_dir().iterdir():
        if d.is_dir() and d.stat().st_mtime < old:
            shutil.rmtree(d, ignore_errors=True)


def _export_file(run) -> Path | None:
    """The archive a web export wrote, while it is there; None for any other run.

    Only a file under the exports directory: a CLI export's output is
    wherever its user wrote it, and no run names a file the web may send.
    """
    if run.operation != EXPORT or run.status != SUCCEEDED:
        return None
    try:
        path = Path(run.state.get("output") or "").resolve(strict=True)
    except (OSError, RuntimeError):
        return None
    return path if _exports_dir().resolve() in path.parents and path.is_file() else None


@require_POST
@_permission(CAN_LAUNCH)
def checkpoint_export(request, name):
    """Export in the background, as a run like the others; its page offers the archive when it is written.

    A large checkpoint takes minutes to read and compress: no request waits for it.
    """
    cp = _get_checkpoint(name)
    _purge_exports()
    output = Path(tempfile.mkdtemp(dir=_exports_dir())) / f"{cp.name}.tar.zst"
    response = _start(request, keep.create_export_run, cp, str(output))
    if response is None:
        shutil.rmtree(output.parent, ignore_errors=True)
        return redirect("cw-checkpoints")
    return response


@_permission(CAN_LAUNCH)
def run_archive(request, code):
    """The archive of a finished web export, sent from the controller's disk."""
    run = _get_run(code)
    gone = Http404("this run has no archive to download (not a finished export, or removed after 24 hours)")
    path = _export_file(run)
    if path is None:
        raise gone
    try:
        # Another request's purge may remove it between the check and here;
        # once open, a purge no longer cuts the download short.
        f = open(path, "rb")
    except FileNotFoundError:
        raise gone from None
    return FileResponse(f, as_attachment=True, filename=path.name, content_type="application/zstd")


@require_POST
@_permission(CAN_LAUNCH)
def checkpoint_import(request):
    form = ImportForm(request.POST, request.FILES)
    if not form.is_valid():
        for field, errors in form.errors.items():
            messages.error(request, f"{field}: {' '.join(errors)}")
        return redirect("cw-checkpoints")
    uploads = Path(settings.VAR_DIR) / "uploads"
    uploads.mkdir(mode=0o700, exist_ok=True)
    fd, path = tempfile.mkstemp(dir=uploads, suffix=".tar.zst")
    with os.fdopen(fd, "wb") as out:
        for chunk in form.cleaned_data["archive"].chunks():
            out.write(chunk)
    data = form.cleaned_data
    response = _start(request, keep.create_import_run, data["host"], path, data["name"], remove_archive=True)
    if response is None:
        os.unlink(path)
        return redirect("cw-checkpoints")
    return response


@require_POST
@_permission(CAN_MANAGE_HOSTS)
def host_retention(request, name):
    host = _get_host(name)
    form = RetentionForm(request.POST)
    if form.is_valid():
        host.checkpoint_retention = form.cleaned_data["keep"]
        host.save(update_fields=["checkpoint_retention"])
        kept = host.checkpoint_retention or "all"
        messages.success(request, f"{host.name} keeps the last {kept} checkpoints per workload.")
    return redirect("cw-host-checkpoints", name=host.name)

# -- API tokens ------------------------------------------------------------------------------


@never_cache  # a new token's secret is on the page: no copy kept by a browser or proxy
@login_required
def account_tokens(request):
    """The user's API tokens; a new one's secret is on this response only (only its hash is kept)."""
    form = ApiTokenForm(request.POST or None)
    secret = None
    if request.method == "POST" and form.is_valid():
        token, secret = ApiToken.issue(request.user, form.cleaned_data["name"])
        form = ApiTokenForm()
    ctx = {"form": form, "secret": secret, "tokens": request.user.api_tokens.all()}
    return render(request, "account/tokens.html", ctx)


@require_POST
@login_required
def account_token_revoke(request, pk):
    token = get_object_or_404(ApiToken, pk=pk, user=request.user)  # someone else's token is no business of theirs
    token.delete()
    messages.success(request, f"Token {token.name} ({token.prefix}…) revoked.")
    return redirect("cw-account-tokens")
