from django.urls import path
from drf_spectacular.views import SpectacularAPIView

from . import views

urlpatterns = [
    path("v1/runs/", views.RunList.as_view(), name="api-runs"),
    path("v1/runs/<uuid:code>/", views.RunDetail.as_view(), name="api-run"),
    path("v1/hosts/", views.HostList.as_view(), name="api-hosts"),
    path("v1/hosts/<slug:name>/", views.HostDetail.as_view(), name="api-host"),
    path("v1/hosts/<slug:name>/probe/", views.HostProbe.as_view(), name="api-host-probe"),
    path("v1/checkpoints/", views.CheckpointList.as_view(), name="api-checkpoints"),
    path("v1/checkpoints/<str:name>/", views.CheckpointDetail.as_view(), name="api-checkpoint"),
    path("schema/", SpectacularAPIView.as_view(), name="api-schema"),
]
