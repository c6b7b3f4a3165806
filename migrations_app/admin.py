from django import forms
from django.contrib import admin
from django.template.response import TemplateResponse

from . import ssh
from .forms import HostFieldsMixin, check_host_key
from .models import ApiToken, Checkpoint, Host, MigrationRun, Phase, TrustedPair


class HostAdminForm(HostFieldsMixin, forms.ModelForm):
    """The web form's checks here too: the admin is no way around them."""

    class Meta:
        model = Host
        fields = "__all__"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Left empty: keep every checkpoint, as a new host does.
        self.fields["checkpoint_retention"].required = False

    def clean_host_key(self):
        key = self.cleaned_data["host_key"].strip()
        return check_host_key(key) if key else key

    def clean_checkpoint_retention(self):
        return self.cleaned_data.get("checkpoint_retention") or 0


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    form = HostAdminForm
    list_display = [
        "name", "address", "ssh_port", "user", "key_fingerprint", "probed", "max_source_runs", "max_target_runs",
    ]  # fmt: skip
    search_fields = ["name", "address"]
    readonly_fields = ["capabilities", "probed", "created"]

    def save_model(self, request, obj, form, change):
        # As on the web's edit page: another address may be another machine,
        # whose key must be confirmed anew, unless a key was given with it.
        moved = change and {"address", "ssh_port"} & set(form.changed_data)
        if moved and "host_key" not in form.changed_data:
            obj.host_key = ""
        super().save_model(request, obj, form, change)

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
    list_display = [
        "code", "kind", "workload", "source", "target", "strategy", "tls", "status", "downtime_ms", "created",
    ]
    list_filter = ["status", "kind", "strategy"]
    search_fields = ["workload"]
    list_select_related = ["source", "target"]
    readonly_fields = [f.name for f in MigrationRun._meta.fields]
    inlines = [PhaseInline]


@admin.register(TrustedPair)
class TrustedPairAdmin(admin.ModelAdmin):
    """Host pairs whose network carries CRIU's memory stream without TLS."""

    list_display = ["__str__", "note", "created"]
    list_select_related = ["host_a", "host_b"]
    fields = ["host_a", "host_b", "note"]


@admin.register(Checkpoint)
class CheckpointAdmin(admin.ModelAdmin):
    list_display = ["name", "host", "kind", "workload", "size", "leave_running", "imported", "created"]
    list_filter = ["host", "kind", "imported"]
    search_fields = ["name", "workload"]
    list_select_related = ["host"]
    # Its files live on the host: deleting goes through the checkpoints page, which removes them too.
    readonly_fields = [f.name for f in Checkpoint._meta.fields]

    def has_delete_permission(self, request, obj=None):
        return False

@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Issue and revoke (delete) users' API tokens; a secret is shown once, on the page after adding."""

    list_display = ["name", "user", "prefix", "created", "last_used"]
    list_filter = ["user"]
    list_select_related = ["user"]
    search_fields = ["name", "user__username", "prefix"]
    readonly_fields = ["prefix", "created", "last_used"]

    def get_fields(self, request, obj=None):
        return ["user", "name"] if obj is None else ["user", "name", "prefix", "created", "last_used"]

    def get_readonly_fields(self, request, obj=None):
        # A token stays its user's: another user would get a secret someone else was given.
        return self.readonly_fields + (["user"] if obj else [])

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
        token, secret = ApiToken.issue(obj.user, obj.name)
        obj.pk, obj.prefix, obj.digest, obj.created = token.pk, token.prefix, token.digest, token.created
        obj._state.adding = False
        request._api_token_secret = secret

    def response_add(self, request, obj, post_url_continue=None):
        # The secret goes into this page only, never into a message (kept in a cookie or the session).
        ctx = {**self.admin_site.each_context(request), "token": obj, "secret": request._api_token_secret,
               "title": "API token issued", "opts": self.model._meta}  # fmt: skip
        return TemplateResponse(request, "admin/migrations_app/apitoken/issued.html", ctx)
