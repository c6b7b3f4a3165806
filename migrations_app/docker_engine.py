"""A host's Docker engine, reached through the Engine API over SSH.

docker-py speaks the API; we hand it our own paramiko client so the host's
pinned key is the only one trusted (docker-py alone would read
~/.ssh/known_hosts). docker-py has no checkpoint calls, so those go to the
Engine API endpoints directly through the same session.
"""

import docker
import docker.errors
import requests
from docker.constants import DEFAULT_DOCKER_API_VERSION
from docker.transport import SSHHTTPAdapter
from docker.utils import version_lt

from . import ssh

# Config fields that make a container what it is; the rest (Hostname aside)
# the engine fills in for the new host.
CONFIG_FIELDS = [
    "Hostname", "Domainname", "User", "Tty", "OpenStdin", "StdinOnce", "Env", "Cmd",
    "Entrypoint", "WorkingDir", "Labels", "StopSignal", "StopTimeout", "ExposedPorts",
    "Volumes", "AttachStdin", "AttachStdout", "AttachStderr", "Healthcheck",
]
HOST_CONFIG_FIELDS = [
    "NetworkMode", "Binds", "PortBindings", "RestartPolicy", "Memory", "MemorySwap",
    "MemoryReservation", "NanoCpus", "CpuShares", "CpuQuota", "CpuPeriod", "CpusetCpus",
    "CapAdd", "CapDrop", "Privileged", "SecurityOpt", "Tmpfs", "Ulimits", "ShmSize",
    "PidsLimit", "ReadonlyRootfs", "Dns", "DnsOptions", "DnsSearch", "ExtraHosts",
    "LogConfig", "Sysctls", "Mounts", "Devices", "GroupAdd", "IpcMode", "PidMode", "UTSMode", "Init",
    "OomScoreAdj", "OomKillDisable", "CgroupnsMode", "BlkioWeight", "CpuRealtimePeriod", "CpuRealtimeRuntime",
]


def redate_checkpoint_argv(checkpoint_dir: str) -> list[str]:
    """A command that makes the tar Docker builds of a checkpoint differ from the one containerd kept.

    Docker (before 25) hands a checkpoint back to containerd as a tar whose
    digest can equal the blob containerd made when it took the checkpoint;
    until containerd collects that blob the restore fails with "commit
    failed: content ... already exists" (moby/moby#42900). Go's tar writer
    rounds mtimes to the second, so a touch within the checkpoint's own
    second changes nothing (seen in CI): the file is dated one whole second
    before its own time instead, which differs after rounding.
    """
    path = f"{checkpoint_dir}/descriptors.json"
    # A checkpoint without the file is left as it is, as `touch -c` would.
    script = '[ -e "$1" ] || exit 0; t=$(stat -c %Y "$1") && touch -c -d "@$((t - 1))" "$1"'
    return ["sh", "-c", script, "sh", path]


class EngineError(Exception):
    """A Docker engine call failed; the message names the host and the step.

    answered: the engine replied (with an error). False when the connection
    failed, so the call's effect on the host is unknown.
    """

    def __init__(self, message, answered=False):
        super().__init__(message)
        self.answered = answered


class NotFoundError(EngineError):
    """The engine has no such container, image or checkpoint."""


class _PinnedSSHAdapter(SSHHTTPAdapter):
    """docker-py's SSH transport on a paramiko client we connected ourselves."""

    def __init__(self, client, timeout):
        self._given_client = client
        super().__init__("ssh://pinned", timeout=timeout)

    def _create_paramiko_client(self, base_url):
        self.ssh_client = self._given_client
        self.ssh_params = {}

    def _connect(self):
        # Already connected with the pinned host key; docker-py would
        # reconnect with its own settings, which we do not want.
        if self.ssh_client.get_transport() is None:
            raise docker.errors.DockerException("SSH connection closed")


class ExitWait:
    """A wait registered with an engine for a container to stop."""

    def __init__(self, response):
        self.response = response

    def wait(self):
        """True once the engine saw the container stop; False if it did not answer within the wait's timeout."""
        try:
            self.response.content  # noqa: B018 - the body comes when the container has stopped
            return True
        except (requests.RequestException, OSError):
            return False
        finally:
            self.response.close()

    def close(self):
        """Give up the wait (its connection is dropped, not reused)."""
        self.response.close()


class Engine:
    """The Docker engine of one host; use as a context manager."""

    # Long enough for a checkpoint of a large container: docker-py's timeout
    # is how long one answer may take.
    def __init__(self, host, timeout=600):
        self.host = host
        self.name = host.name
        self.timeout = timeout
        self.conn = ssh.Connection(host)
        self.api = None

    def __enter__(self):
        self.conn.__enter__()
        try:
            self.api = _api_client(self.conn.client, self.timeout)
        except (docker.errors.DockerException, requests.RequestException, OSError) as e:
            self.conn.close()
            raise EngineError(
                f"{self.name}: cannot reach the Docker engine over SSH (`docker system dial-stdio`): {e}"
            ) from e
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.api:
            self.api.close()
            self.api = None
        self.conn.close()

    def interrupt(self):
        """Make a call blocked on this engine fail now, from another thread (see ssh.Connection.interrupt)."""
        self.conn.interrupt()

    def call(self, step, fn, *args, **kwargs):
        """Run a docker-py call, turning its errors into EngineError(step)."""
        try:
            return fn(*args, **kwargs)
        except docker.errors.NotFound as e:
            raise NotFoundError(f"{self.name}: {step}: not found ({_explain(e)})", answered=True) from e
        except docker.errors.APIError as e:
            raise EngineError(f"{self.name}: {step} failed: {_explain(e)}", answered=True) from e
        except (docker.errors.DockerException, requests.RequestException, ssh.SSHError, *ssh.TRANSPORT_ERRORS) as e:
            lost = ssh.connection_lost(e)
            if lost is None and self.conn.lost():
                # docker-py words it its own way ("Connection aborted.", an
                # SSHException, EOFError): say which host went, and keep those words for the log.
                lost = self.conn.lost_error(f"calling its Docker engine: {step}", detail=f"{e.__class__.__name__}: {e}")
            if lost is not None:
                raise EngineError(str(lost)) from lost
            raise EngineError(f"{self.name}: {step} failed: {e}") from e

    # -- facts ---------------------------------------------------------------

    def info(self):
        return self.call("docker info", self.api.info)

    def version(self):
        return self.call("docker version", self.api.version)

    def containers(self):
        """Running and stopped containers as short dicts."""
        rows = self.call("list containers", self.api.containers, all=True)
        return [
            {
                "id": c["Id"][:12],
                "name": c["Names"][0].lstrip("/") if c.get("Names") else c["Id"][:12],
                "image": c["Image"],
                "state": c["State"],
                "status": c["Status"],
            }
            for c in rows
        ]

    def _find(self, what, fn, name):
        """fn(name), or None when the engine has no such thing."""
        try:
            return self.call(f"inspect {what} {name!r}", fn, name)
        except NotFoundError:
            return None

    def find_container(self, name_or_id):
        """The container's inspect data, or None if there is no such container."""
        return self._find("container", self.api.inspect_container, name_or_id)

    def inspect(self, name_or_id):
        found = self.find_container(name_or_id)
        if found is None:
            raise EngineError(f"{self.name}: no container named {name_or_id!r}")
        return found

    def exists(self, name_or_id):
        return self.find_container(name_or_id) is not None

    def image_id(self, name):
        """The id an image name or id resolves to here, or None."""
        found = self._find("image", self.api.inspect_image, name)
        return found["Id"] if found else None

    def has_image(self, image_id):
        return self.image_id(image_id) is not None

    def image_tags(self, image_id):
        """The repo:tag names an image has here (none for an untagged one)."""
        found = self._find("image", self.api.inspect_image, image_id)
        return [t for t in (found or {}).get("RepoTags") or [] if t != "<none>:<none>"]

    def tag_image(self, image_id, name):
        """Give an image a repo:tag name (as `docker tag`)."""
        repository, _, tag = name.rpartition(":")
        self.call(f"tag image {name!r}", self.api.tag, image_id, repository, tag)

    def untag_image(self, name):
        """Remove a repo:tag name (as `docker rmi NAME`): the image goes with its last name, unless in use."""
        self.call(f"untag image {name!r}", self.api.remove_image, name)

    # -- actions -------------------------------------------------------------

    def create_like(self, source, name, image, labels=None, runtime=None):
        """Create (not start) a container with the source's configuration, from image.

        runtime: the OCI runtime the engine runs it with, when not its default.
        Its networks too, with the same fixed addresses and aliases: the
        first in the create call, the others connected before it starts.
        """
        config = {k: source["Config"][k] for k in CONFIG_FIELDS if source["Config"].get(k) is not None}
        config["Labels"] = {**(config.get("Labels") or {}), **(labels or {})}
        config["Image"] = image
        host_config = {
            k: source["HostConfig"][k] for k in HOST_CONFIG_FIELDS if source["HostConfig"].get(k) is not None
        }
        if runtime:
            host_config["Runtime"] = runtime
        config["HostConfig"] = host_config
        endpoints = _endpoints(source)
        mode = host_config.get("NetworkMode") or "default"
        first = mode if mode in endpoints else next(iter(endpoints), None)
        if first:
            config["NetworkingConfig"] = {"EndpointsConfig": {first: endpoints[first]}}
        # Docker's own API: create takes the inspect shape (docker-py's
        # create_container would make us rebuild it field by field).
        res = self.call(
            "create container",
            lambda: self.api._result(
                self.api._post_json(self.api._url("/containers/create"), data=config, params={"name": name}),
                True,
            ),
        )
        for net, endpoint in endpoints.items():
            if net != first:
                self.call(
                    f"connect to network {net}",
                    lambda net=net, endpoint=endpoint: self.api._raise_for_status(
                        self.api._post_json(
                            self.api._url("/networks/{0}/connect", net),
                            data={"Container": res["Id"], "EndpointConfig": endpoint},
                        )
                    ),
                )
        return res["Id"]

    def volume(self, name):
        """A volume's inspect data, or None."""
        return self._find("volume", self.api.inspect_volume, name)

    def create_volume(self, name, labels=None):
        return self.call(f"create volume {name!r}", self.api.create_volume, name, driver="local", labels=labels)

    def remove_volume(self, name):
        self.call(f"remove volume {name!r}", self.api.remove_volume, name)

    def volume_users(self, name):
        """Ids of the containers (running or not) that mount a volume."""
        rows = self.call("list containers", self.api.containers, all=True, filters={"volume": name})
        return [c["Id"] for c in rows]

    def network_users(self, network):
        """Ids of the containers (running, stopped or only created) on a network (its inspect data)."""
        # By name and by id: Docker matches a created container's network by
        # name only (its endpoint id comes at start), and by id the others too.
        wanted = [network["Name"], network["Id"]]
        rows = self.call("list containers", self.api.containers, all=True, filters={"network": wanted})
        return [c["Id"] for c in rows]

    def network(self, name):
        """A network's inspect data, or None."""
        return self._find("network", self.api.inspect_network, name)

    def create_network_like(self, source, labels=None):
        """A network like the source host's: driver, subnets, options, labels (and these labels)."""
        ipam = source.get("IPAM") or {}
        config = {
            "Name": source["Name"],
            "Driver": source.get("Driver") or "bridge",
            "IPAM": {"Driver": ipam.get("Driver") or "default", "Config": ipam.get("Config") or [],
                     "Options": ipam.get("Options") or {}},
            "Options": source.get("Options") or {},
            "Labels": {**(source.get("Labels") or {}), **(labels or {})},
            "Internal": bool(source.get("Internal")),
            "Attachable": bool(source.get("Attachable")),
            "EnableIPv6": bool(source.get("EnableIPv6")),
            "CheckDuplicate": True,
        }  # fmt: skip
        return self.call(
            f"create network {source['Name']!r}",
            lambda: self.api._result(self.api._post_json(self.api._url("/networks/create"), data=config), True),
        )

    def remove_network(self, name):
        self.call(f"remove network {name!r}", self.api.remove_network, name)

    def run_container(self, image, command, name, runtime=None):
        def run():
            host_config = self.api.create_host_config(runtime=runtime) if runtime else None
            cid = self.api.create_container(image, command, name=name, detach=True, host_config=host_config)["Id"]
            self.api.start(cid)
            return name

        return self.call(f"start container {name!r}", run)

    # The calls below take a timeout: those made while a workload is frozen
    # get one sized to their work, not the engine's default.

    def checkpoint(self, container_id, checkpoint, timeout=None, exit=True):
        """Freeze the container into a checkpoint and stop it (exit=False: leave it running)."""
        self.call(
            "docker checkpoint",
            lambda: self.api._raise_for_status(
                self.api._post_json(
                    self.api._url("/containers/{0}/checkpoints", container_id),
                    data={"CheckpointID": checkpoint, "Exit": exit},
                    timeout=timeout or self.timeout,
                )
            ),
        )

    def start(self, container_id, checkpoint=None, timeout=None):
        """Start a container, from a checkpoint if one is named."""
        params = {"checkpoint": checkpoint} if checkpoint else {}
        step = "restore from checkpoint" if checkpoint else "start container"
        self.call(
            step,
            lambda: self.api._raise_for_status(
                self.api._post(
                    self.api._url("/containers/{0}/start", container_id), params=params,
                    timeout=timeout or self.timeout,
                )
            ),
        )

    def exit_waiter(self, container_id, timeout):
        """Register with the engine a wait for the container to stop (an ExitWait).

        The engine answers the wait's headers once the waiter is registered
        and its body when the container has stopped, after its output was
        drained into its log (moby daemon/monitor.go, handleContainerExit):
        no polling, and no round trip after the exit.
        """

        def register():
            # No condition: "not-running" is the default, and some engine
            # versions refuse it by name (their router knows only the others).
            r = self.api._post(self.api._url("/containers/{0}/wait", container_id), stream=True, timeout=timeout)
            self.api._raise_for_status(r)
            return r

        return ExitWait(self.call("docker wait", register))

    def delete_checkpoint(self, container_id, checkpoint, timeout=None):
        self.call(
            "delete checkpoint",
            lambda: self.api._raise_for_status(
                self.api._delete(
                    self.api._url("/containers/{0}/checkpoints/{1}", container_id, checkpoint),
                    timeout=timeout or self.timeout,
                )
            ),
        )

    def rename(self, container_id, name):
        self.call("rename container", self.api.rename, container_id, name)

    def remove(self, container_id, timeout=None):
        self.call(
            "remove container",
            lambda: self.api._raise_for_status(
                self.api._delete(
                    self.api._url("/containers/{0}", container_id), params={"force": True},
                    timeout=timeout or self.timeout,
                )
            ),
        )

    def save_image(self, image_id):
        """The image as a tar stream (chunks)."""
        return self.call("docker save", self.api.get_image, image_id)

    def load_image(self, chunks):
        """docker load; the engine's progress messages are read for errors."""

        def load():
            for message in self.api.load_image(chunks):
                if message.get("error"):
                    raise EngineError(f"{self.name}: docker load failed: {message['error']}", answered=True)

        self.call("docker load", load)

    def set_restart_policy(self, container_id, policy):
        self.call("update restart policy", self.api.update_container, container_id, restart_policy=policy)

    def checkpoints(self, container_id):
        """Names of a container's checkpoints."""
        res = self.call(
            "list checkpoints",
            lambda: self.api._result(self.api._get(self.api._url("/containers/{0}/checkpoints", container_id)), True),
        )
        return [cp.get("Name") for cp in res or []]

    def logs(self, container_id, tail="all", timestamps=False, since=None, until=None):
        """The container's log; since/until (UNIX seconds, float) bound it by the lines' timestamps."""
        raw = self.call("container logs", self.api.logs, container_id, tail=tail, timestamps=timestamps,
                        since=since, until=until)  # fmt: skip
        return raw.decode(errors="replace")


def _endpoints(source):
    """The source container's networks as create/connect endpoint configs.

    Only what the user chose: fixed addresses (IPAMConfig), aliases, links
    and driver options.
    """
    # On a user-defined network Docker lists two names of its own among the
    # aliases: the container's short id and its hostname (Docker < 26 stores
    # them there; later engines keep them in DNSNames and add them back to
    # Aliases for API < 1.45: moby api/server/router/container/inspect.go).
    # Passed on as aliases, the source's short id (the hostname of a container
    # run without --hostname) would become a name the user never gave, one
    # more on each move. The target's engine adds its own, and the hostname,
    # which the new container keeps.
    own = {source["Id"][:12], source["Config"].get("Hostname") or ""}
    endpoints = {}
    for net, ep in (source["NetworkSettings"].get("Networks") or {}).items():
        config = {}
        if ep.get("IPAMConfig"):
            config["IPAMConfig"] = {k: v for k, v in ep["IPAMConfig"].items() if v}
        aliases = list(dict.fromkeys(a for a in ep.get("Aliases") or [] if a not in own))
        if aliases:
            config["Aliases"] = aliases
        for key in ("Links", "DriverOpts"):
            if ep.get(key):
                config[key] = ep[key]
        endpoints[net] = config
    return endpoints


def _api_client(client, timeout):
    # A unix base_url makes docker-py construct without connecting anywhere;
    # then our adapter takes over the URLs it will use.
    api = docker.APIClient(base_url="unix:///nonexistent", version=DEFAULT_DOCKER_API_VERSION, timeout=timeout)
    adapter = _PinnedSSHAdapter(client, timeout)
    api.mount("http+docker://ssh", adapter)
    api._custom_adapter = adapter
    api.base_url = "http+docker://ssh"
    # Speak the older of the two API versions, as `docker` itself does.
    server = api.version(api_version=False)["ApiVersion"]
    if version_lt(server, DEFAULT_DOCKER_API_VERSION):
        api._version = server
    return api


def _explain(error):
    return getattr(error, "explanation", None) or str(error)
