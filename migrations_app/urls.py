from django.urls import path

from . import views

urlpatterns = [
    path("", views.index, name="cw-index"),
    path("hosts/", views.host_list, name="cw-hosts"),
    path("hosts/add/", views.host_add, name="cw-host-add"),
    path("hosts/<slug:name>/", views.host_detail, name="cw-host"),
    path("hosts/<slug:name>/edit/", views.host_edit, name="cw-host-edit"),
    path("hosts/<slug:name>/key/", views.host_key, name="cw-host-key"),
    path("hosts/<slug:name>/probe/", views.host_probe, name="cw-host-probe"),
    path("hosts/<slug:name>/workloads.json", views.host_workloads, name="cw-host-workloads"),
    path("hosts/<slug:name>/checkpoint/", views.host_checkpoint, name="cw-host-checkpoint"),
    path("hosts/<slug:name>/checkpoints/", views.checkpoint_list, name="cw-host-checkpoints"),
    path("hosts/<slug:name>/retention/", views.host_retention, name="cw-host-retention"),
    path("checkpoints/", views.checkpoint_list, name="cw-checkpoints"),
    path("checkpoints/import/", views.checkpoint_import, name="cw-checkpoint-import"),
    path("checkpoints/<str:name>/restore/", views.checkpoint_restore, {"operation": "restore"},
         name="cw-checkpoint-restore"),
    path("checkpoints/<str:name>/clone/", views.checkpoint_restore, {"operation": "clone"}, name="cw-checkpoint-clone"),
    path("checkpoints/<str:name>/delete/", views.checkpoint_delete, name="cw-checkpoint-delete"),
    path("checkpoints/<str:name>/export/", views.checkpoint_export, name="cw-checkpoint-export"),
    path("migrate/", views.migrate, name="cw-migrate"),
    path("runs/", views.run_list, name="cw-runs"),
    path("runs/export.<str:fmt>", views.runs_export, name="cw-runs-export"),
    path("runs/<uuid:code>/", views.run_detail, name="cw-run"),
    path("runs/<uuid:code>.json", views.run_json, name="cw-run-json"),
    path("runs/<uuid:code>/logs.txt", views.run_logs, name="cw-run-logs"),
    path("runs/<uuid:code>/recover/", views.run_recover, name="cw-run-recover"),
    path("compare/", views.compare, name="cw-compare"),
    path("compare/data.json", views.compare_json, name="cw-compare-json"),
]
