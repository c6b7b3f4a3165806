import base64
import re
from datetime import timedelta

from django import forms
from django.conf import settings
from django.utils import timezone

from . import criu, inventory, ssh, validation
from .docker_engine import Engine, EngineError
from .engine import observe, plans
from .models import CONTAINER, KIND_CHOICES, OPERATION_CHOICES, STATUS_CHOICES, TCP_CHOICES, TCP_CLOSE, Host

# A probe older than this is run again before a migration is accepted.
PROBE_MAX_AGE = timedelta(minutes=10)


def check_host_key(text):
    """A pinned host key as known_hosts spells it, whole; ValidationError otherwise."""
    try:
        parsed = ssh.parse_host_key(text)
    except ssh.SSHError as e:
        raise forms.ValidationError(str(e))
    # paramiko pads a truncated key with zeros (a key no server has) and ignores
    # trailing bytes: either way what was pasted is not one whole key.
    if parsed.asbytes() != base64.b64decode(text.split()[1]):
        raise forms.ValidationError("This host key is truncated or has extra bytes; copy it whole.")
    return text


class HostFieldsMixin:
    """The checks of a host's fields, shared by the web form and the admin's.

    The name's grammar comes from the SlugField (the form's, or the model's
    in the admin), and its uniqueness from the form.
    """

    def clean_address(self):
        address = self.cleaned_data["address"].strip()
        if not re.fullmatch(r"[A-Za-z0-9.:\-\[\]]+", address):
            raise forms.ValidationError("An address is a host name or an IP address, without spaces.")
        return address

    def clean_ssh_port(self):
        port = self.cleaned_data["ssh_port"]
        if not 1 <= port <= 65535:
            raise forms.ValidationError("A port is between 1 and 65535.")
        return port

    def clean_key_path(self):
        value = self.cleaned_data["key_path"].strip()
        try:
            ssh.load_private_key(value)
        except ssh.SSHError as e:
            raise forms.ValidationError(f"{e}.")
        # Stored as an absolute path, so that a later change of the key
        # directory setting cannot make it name another file.
        return ssh.key_file_path(value)

    def clean_work_dir(self):
        path = self.cleaned_data["work_dir"].strip()
        if not path.startswith("/"):
            raise forms.ValidationError("Give an absolute path.")
        return path


class HostForm(HostFieldsMixin, forms.Form):
    name = forms.SlugField(max_length=64)
    address = forms.CharField(max_length=255)
    ssh_port = forms.IntegerField(min_value=1, max_value=65535, initial=22)
    user = forms.CharField(max_length=64, initial="root")
    key_path = forms.CharField(
        max_length=500,
        label="Private key file (on this server)",
        help_text=f"A file in the key directory {settings.SSH_KEY_DIR}; a name alone is taken from there.",
    )
    work_dir = forms.CharField(max_length=500, initial="/var/lib/criuweb", label="Work directory on the host")

    def __init__(self, *args, instance=None, **kwargs):
        self.instance = instance
        super().__init__(*args, **kwargs)

    def clean_name(self):
        name = self.cleaned_data["name"]
        others = Host.objects.filter(name=name)
        if self.instance:
            others = others.exclude(pk=self.instance.pk)
        if others.exists():
            raise forms.ValidationError(f"A host named {name} already exists.")
        return name


class HostKeyForm(forms.Form):
    host_key = forms.CharField(widget=forms.HiddenInput)

    def clean_host_key(self):
        return check_host_key(self.cleaned_data["host_key"])


class MigrationForm(forms.Form):
    source = forms.ModelChoiceField(Host.objects.all(), to_field_name="name", empty_label=None)
    kind = forms.ChoiceField(choices=KIND_CHOICES, initial=CONTAINER, widget=forms.RadioSelect)
    # strip=False: " 12" must be refused, not read as PID 12 (validation.pid says why).
    container = forms.CharField(required=False, strip=False, max_length=255, help_text="name or id on the source")
    pid = forms.CharField(required=False, strip=False, max_length=20, label="PID")
    target = forms.ModelChoiceField(Host.objects.all(), to_field_name="name", empty_label=None)
    strategy = forms.ChoiceField(
        choices=plans.choices,
        help_text="Only strategies both hosts passed in their probe are offered. Post-copy (lazy) restores at "
        "once and pulls the memory afterwards: until the last page arrives the workload depends on both hosts, "
        "and if either fails then, the copy on the target (which may already have acted) is killed and the "
        "source goes on from its state at the freeze; the run then ends failed.",
    )
    keep_source = forms.BooleanField(required=False, help_text="keep the stopped source container")
    probe = forms.CharField(
        required=False, max_length=255, label="Probe address",
        help_text="optional host:port the controller connects to every 10 ms during the run, "
        "to measure the outage from outside",
    )

    def clean_probe(self):
        value = self.cleaned_data["probe"]
        if value:
            try:
                observe.parse_address(value)
            except ValueError as e:
                raise forms.ValidationError(str(e)) from None
        return value
    tcp = forms.ChoiceField(
        choices=TCP_CHOICES,
        initial=TCP_CLOSE,
        required=False,  # a form posted without it (a script) gets the default
        widget=forms.RadioSelect,
        label="Established TCP connections",
    )
    shared_storage = forms.BooleanField(
        required=False,
        label="The same data is there on the target",
        help_text="bind-mount sources and volumes of drivers other than local hold the same data on the "
        "target; without this such a container is refused",
    )

    def clean(self):
        data = super().clean()
        data["tcp"] = data.get("tcp") or TCP_CLOSE
        source, target, kind = data.get("source"), data.get("target"), data.get("kind")
        if not (source and target and kind):
            return data
        if source == target:
            self.add_error("target", "Pick a target other than the source.")
            return data
        # Only the field of the chosen kind counts: the other may hold what the page prefilled.
        field, check = ("container", validation.container_ref) if kind == CONTAINER else ("pid", validation.pid)
        try:
            data[field] = check(data.get(field))
        except validation.InputError as e:
            self.add_error(field, str(e))
        if self.errors:
            return data
        for field, host in (("source", source), ("target", target)):
            if not host.probed or timezone.now() - host.probed > PROBE_MAX_AGE:
                inventory.probe(host)
            if not host.probe_ok():
                self.add_error(field, f"{host.name} fails its probe: {host.capabilities.get('error')}")
        if self.errors:
            return data
        offered = {strategy: why for strategy, _, why in plans.available(kind, source, target)}
        strategy = data.get("strategy")
        if strategy not in offered:
            self.add_error("strategy", f"A {kind} moves with: {', '.join(offered)}.")
        elif offered[strategy]:
            self.add_error("strategy", f"Both hosts must support this strategy ({offered[strategy]}).")
        self._check_workload(source, kind, data)
        return data

    def _check_workload(self, source, kind, data):
        """The workload must exist on the source now, not only when the page was drawn."""
        try:
            if kind == CONTAINER:
                with Engine(source) as engine:
                    name = data["container"]
                    found = engine.find_container(name)
                    if not found:
                        self.add_error("container", f"{source.name} has no container {name}.")
                    elif not found["State"]["Running"]:
                        self.add_error("container", f"Container {name} is not running on {source.name}.")
            else:
                with ssh.Connection(source) as conn:
                    criu.resolve_process(conn, data["pid"])
        except criu.CriuError as e:
            self.add_error("pid", str(e))
        except (ssh.SSHError, EngineError) as e:
            self.add_error("source", str(e))

    def workload(self):
        data = self.cleaned_data
        return data["container"] if data["kind"] == CONTAINER else str(data["pid"])


class RunFilterForm(forms.Form):
    host = forms.ModelChoiceField(Host.objects.all(), to_field_name="name", required=False, empty_label="any host")
    workload = forms.CharField(required=False, max_length=255,
                               widget=forms.TextInput(attrs={"placeholder": "workload"}))
    kind = forms.ChoiceField(choices=[("", "any kind")] + KIND_CHOICES, required=False)
    # The benchmark's baseline runs (CRIU alone on one host) are no plan, but a strategy to compare with.
    strategy = forms.ChoiceField(
        choices=lambda: [("", "any strategy")] + plans.choices() + [("baseline", "baseline (CRIU alone)")],
        required=False,
    )
    status = forms.ChoiceField(choices=[("", "any status")] + STATUS_CHOICES, required=False)
    benchmark = forms.CharField(required=False, max_length=64,
                                widget=forms.TextInput(attrs={"placeholder": "benchmark", "size": 14}))
    operation = forms.ChoiceField(choices=[("", "any operation")] + OPERATION_CHOICES, required=False)

    def filter(self, runs):
        data = self.cleaned_data
        if data.get("host"):
            runs = runs.for_host(data["host"])
        if data.get("workload"):
            runs = runs.filter(workload__icontains=data["workload"])
        for field in ("kind", "strategy", "status", "benchmark", "operation"):
            if data.get(field):
                runs = runs.filter(**{field: data[field]})
        return runs


class CheckpointForm(forms.Form):
    """Take a kept checkpoint of a workload on one host (the host page)."""

    kind = forms.ChoiceField(choices=KIND_CHOICES, initial=CONTAINER, widget=forms.RadioSelect)
    container = forms.CharField(required=False, strip=False, max_length=255, help_text="name or id")
    pid = forms.CharField(required=False, strip=False, max_length=20, label="PID")
    name = forms.CharField(required=False, strip=False, max_length=64, help_text="unique; empty: workload and time")
    leave_running = forms.BooleanField(
        required=False, initial=True, help_text="run on after the freeze (else it stops, as `docker checkpoint` does)"
    )

    def clean(self):
        data = super().clean()
        field, check = ("container", validation.container_ref)
        if data.get("kind") != CONTAINER:
            field, check = ("pid", validation.pid)
        try:
            data[field] = check(data.get(field))
        except validation.InputError as e:
            self.add_error(field, str(e))
        if data.get("name"):
            try:
                validation.checkpoint_name(data["name"])
            except validation.InputError as e:
                self.add_error("name", str(e))
        return data

    def workload(self):
        data = self.cleaned_data
        return data["container"] if data["kind"] == CONTAINER else str(data["pid"])


class RestoreForm(forms.Form):
    """Restore or clone a kept checkpoint."""

    target = forms.ModelChoiceField(Host.objects.all(), to_field_name="name", required=False,
                                    empty_label="its own host")  # fmt: skip
    new_name = forms.CharField(required=False, strip=False, max_length=255, label="as")

    def clean_new_name(self):
        value = self.cleaned_data["new_name"]
        if value:
            try:
                validation.container_ref(value)
            except validation.InputError as e:
                raise forms.ValidationError(str(e))
        return value or None


class ImportForm(forms.Form):
    host = forms.ModelChoiceField(Host.objects.all(), to_field_name="name", empty_label=None)
    archive = forms.FileField(help_text="a .tar.zst written by Export")
    name = forms.CharField(required=False, strip=False, max_length=64, help_text="empty: the archive's, if free")

    def clean_name(self):
        value = self.cleaned_data["name"]
        if value:
            try:
                validation.checkpoint_name(value)
            except validation.InputError as e:
                raise forms.ValidationError(str(e))
        return value or None


class RetentionForm(forms.Form):
    keep = forms.IntegerField(min_value=0, max_value=1000, label="keep the last",
                              help_text="checkpoints per workload on this host; 0 keeps them all")  # fmt: skip

class ApiTokenForm(forms.Form):
    name = forms.CharField(max_length=100, help_text="what it is for: a script, a pipeline")
