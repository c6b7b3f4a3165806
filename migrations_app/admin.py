from django import forms
from django.contrib import admin

from . import ssh
from .models import Host, MigrationRun, Phase


class HostAdminForm(forms.ModelForm):
    class Meta:
        model = Host
        fields = "__all__"

    def clean_host_key(self):
        key = self.cleaned_data["host_key"].strip()
        if key:
            try:
                ssh.parse_host_key(key)
            except ssh.SSHError as e:
                raise forms.ValidationError(str(e))
        return key


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    form = HostAdminForm
    list_display = ["name", "address", "ssh_port", "user", "key_fingerprint", "probed"]
    search_fields = ["name", "address"]
    readonly_fields = ["capabilities", "probed", "created"]

    @admin.display(description="host key")
    def key_fingerprint(self, host):
        return ssh.fingerprint(host.host_key) if host.host_key else "not pinned"


class PhaseInline(admin.TabularInline):
    model = Phase
    extra = 0
    fields = ["seq", "name", "host", "status", "started", "duration_ms", "bytes", "detail"]
    readonly_fields = fields
    can_delete = False


@admin.register(MigrationRun)
class MigrationRunAdmin(admin.ModelAdmin):
    list_display = ["code", "kind", "workload", "source", "target", "status", "downtime_ms", "created"]
    list_filter = ["status", "kind", "strategy"]
    search_fields = ["workload"]
    list_select_related = ["source", "target"]
    readonly_fields = [f.name for f in MigrationRun._meta.fields]
    inlines = [PhaseInline]
