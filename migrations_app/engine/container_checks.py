"""What a container needs on the target, found before the freeze; and what
criuweb does so that it arrives as it was.

Pre-flight refuses, with the cause, what would otherwise fail only after
the container was frozen: privilege the hosts did not agree to, mounts
whose data would not be there, networks and fixed addresses the target
cannot give, sockets bound to addresses the container would lose, and
processes CRIU cannot dump on the source. The rest is prepared before the
freeze: missing networks and named volumes created on the target.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from typing import TYPE_CHECKING

from .. import criu, ssh
from ..docker_engine import EngineError
from ..models import CONTAINER, ENGINE, FINISHED, TCP_ESTABLISHED, Checkpoint, MigrationRun
from . import tree
from .errors import MigrationError

if TYPE_CHECKING:
    from .runner import Context

# Networks every engine has; a container on one of them finds it anywhere.
BUILTIN_NETWORKS = ("bridge", "none", "default")

# Marks what criuweb created on a target (a container, a network), with the run's id.
RUN_LABEL = "io.criuweb.run"


# What Docker gives every container (moby's oci/defaults.go): adding one of
# these back after --cap-drop ALL, the usual hardening, grants nothing more.
DOCKER_DEFAULT_CAPABILITIES = frozenset({
    "CHOWN", "DAC_OVERRIDE", "FSETID", "FOWNER", "MKNOD", "NET_RAW", "SETGID", "SETUID", "SETFCAP", "SETPCAP",
    "NET_BIND_SERVICE", "SYS_CHROOT", "KILL", "AUDIT_WRITE",
})  # fmt: skip


# How Docker spells --security-opt no-new-privileges in a container's inspect.
NO_NEW_PRIVILEGES = frozenset({"no-new-privileges", "no-new-privileges:true", "no-new-privileges=true"})


def privilege(c: dict) -> list[str]:
    """What in a container's configuration carries its host's power with it."""
    hc = c["HostConfig"]
    found = []
    if hc.get("Privileged"):
        found.append("it is privileged")
    # Not CgroupnsMode: "host" is the engine's own default on some hosts (cgroup v1, Docker 20.10).
    for mode in ("NetworkMode", "PidMode", "IpcMode", "UTSMode", "UsernsMode"):
        if hc.get(mode) == "host":
            found.append(f"{mode} is host")
    added = [c for c in hc.get("CapAdd") or [] if c.upper().removeprefix("CAP_") not in DOCKER_DEFAULT_CAPABILITIES]
    if added:
        found.append(f"it adds capabilities {', '.join(added)}")
    if hc.get("Devices"):
        found.append(f"it has host devices {', '.join(d.get('PathOnHost', '?') for d in hc['Devices'])}")
    # no-new-privileges only takes power away (CRIU restores the flag with the task).
    options = [o for o in hc.get("SecurityOpt") or [] if o not in NO_NEW_PRIVILEGES]
    if options:
        found.append(f"it changes security options {', '.join(options)}")
    binds = [m for m in c.get("Mounts") or [] if m.get("Type") == "bind"]
    if binds:
        found.append(f"it mounts host paths {', '.join(m['Source'] for m in binds)}")
    return found


def _is_plain_local(volume: dict | None) -> bool:
    """A local-driver volume holding its own data (not a local mount of something else)."""
    if not volume or volume.get("Driver") != "local":
        return False
    options = volume.get("Options") or {}
    return not (options.get("device") or options.get("type"))


# Of the paths given, those that are symbolic links, each with what it points to.
LINKS_SCRIPT = r"""
for p in "$@"; do
    [ -L "$p" ] && printf '%s\t%s\n' "$p" "$(readlink -f -- "$p")"
done
true
"""


# Where dockerd looks for its init, in its order (moby daemon/config
# config_linux.go lookupBinPath, 20.10 to 28): a path as configured, else
# these libexec directories (FHS 3.0 and 2.3), then PATH. Distributions that
# keep docker-init in /usr/libexec/docker have it in no user's PATH: a
# `command -v` alone refused every --init container there.
INIT_DIRS = ("/usr/local/libexec/docker", "/usr/libexec/docker", "/usr/local/lib/docker", "/usr/lib/docker")
# Newer dockerd (moby 26+) also tries these for a docker-* name, after INIT_DIRS.
INIT_PREFIXED_DIRS = ("/usr/local/libexec", "/usr/libexec")

# $1: the init binary as dockerd names it; the rest: the directories to try
# before PATH. Prints the path found, nothing when there is none. PATH is the
# SSH user's, which is as close to dockerd's as a remote shell gets.
LOOKUP_INIT_SCRIPT = r"""
b=$1; shift
case $b in /*) echo "$b"; exit 0 ;; esac
for d in "$@"; do
    [ -f "$d/$b" ] && [ -x "$d/$b" ] && { echo "$d/$b"; exit 0; }
done
command -v -- "$b" || true
"""


def init_dirs(binary: str) -> tuple[str, ...]:
    """The directories dockerd tries for binary before PATH."""
    return INIT_DIRS + (INIT_PREFIXED_DIRS if binary.startswith("docker-") else ())


def _linked_mounts(ctx: Context, c: dict, binds: list[dict]) -> list[str]:
    """Bind mounts whose source is a symbolic link, Docker's init (--init) included.

    CRIU 4.2.1 mounts such a source's link itself and fails the restore
    ("mnt-v2: Can't remount ... with MS_PRIVATE"), on the target and back on
    the source alike: the rollback could not bring the container back.
    Debian's docker.io makes docker-init a link to tini-static.
    """
    init = ""
    if c["HostConfig"].get("Init"):
        # InitBinary is dockerd's init-path setting (a name or a path), "docker-init" by default.
        binary = ctx.src.info().get("InitBinary") or "docker-init"
        found = ctx.src.conn.sh(LOOKUP_INIT_SCRIPT, binary, *init_dirs(binary)).stdout.strip()
        # Where dockerd found it is unknown: refuse rather than guess.
        init = found or binary
    paths = [b["source"] for b in binds] + ([init] if init else [])
    if not paths:
        return []
    out = ctx.src.conn.sh(LINKS_SCRIPT, *paths).stdout
    links = dict(line.split("\t", 1) for line in out.splitlines() if "\t" in line)
    why = []
    if init and (init in links or not init.startswith("/")):
        why.append(
            f"it runs Docker's init (--init), which Docker mounts from {init}"
            + (f", a symbolic link to {links[init]}" if init in links else ", not found")
            + ": CRIU cannot restore that mount, neither on the target nor back here (start it without --init)"
        )
    why += [
        f"bind mount {b['source']} -> {b['destination']} is a symbolic link to {links[b['source']]}: CRIU cannot "
        "restore such a mount, neither on the target nor back here (bind the path it points to)"
        for b in binds
        if b["source"] in links
    ]
    return why


def check_source(ctx: Context, c: dict) -> dict:
    """Refuse before the freeze what cannot move; return the facts later steps need.

    Raises MigrationError naming every cause at once.
    """
    run, source, target = ctx.run, ctx.source, ctx.target
    why: list[str] = []
    facts: dict = {"volumes": [], "binds": [], "other_volumes": [], "networks": {}, "close_tcp": False}

    # Privilege: both hosts' admins must have said yes.
    power = privilege(c)
    if power:
        refusing = [h.name for h in (source, target) if not h.allow_privileged]
        if refusing:
            why.append(
                f"{'; '.join(power)}: moving it needs 'allow privileged workloads' on "
                f"{' and '.join(refusing)} (Hosts, in the admin)"
            )
    mode = c["HostConfig"].get("NetworkMode") or ""
    if mode.startswith("container:"):
        why.append(f"it shares the network of container {mode.split(':', 1)[1][:12]}, which does not move with it")

    # Mounts: named local volumes move with it; anything else needs the
    # operator's word that the same data is on the target.
    for m in c.get("Mounts") or []:
        kind, dest = m.get("Type"), m.get("Destination")
        if kind == "tmpfs":
            continue  # CRIU carries a tmpfs's files in the checkpoint
        if kind == "bind":
            facts["binds"].append({"source": m["Source"], "destination": dest})
            if not run.shared_storage:
                why.append(
                    f"bind mount {m['Source']} -> {dest}: its data would not be on {target.name}; tick "
                    "'the same data is there on the target' (--shared-storage) if it is"
                )
        elif kind == "volume":
            volume = ctx.src.volume(m["Name"])
            if _is_plain_local(volume):
                facts["volumes"].append(
                    {"name": m["Name"], "destination": dest, "mountpoint": volume["Mountpoint"],
                     "labels": volume.get("Labels") or {}}
                )  # fmt: skip
            else:
                driver = (volume or {}).get("Driver", "?")
                facts["other_volumes"].append({"name": m["Name"], "driver": driver, "destination": dest})
                if not run.shared_storage:
                    why.append(
                        f"volume {m['Name']} (driver {driver}, not plain local data) -> {dest}: criuweb moves only "
                        f"local volumes' data; tick 'the same data is there on the target' if {target.name} "
                        "has it"
                    )
        else:
            why.append(f"{kind} mount -> {dest} is not supported")
    why += _linked_mounts(ctx, c, facts["binds"])

    # Networks, and the fixed addresses on them.
    for name, ep in (c["NetworkSettings"].get("Networks") or {}).items():
        if name == "host":
            continue  # refused above unless allowed; nothing to prepare
        fixed = (ep.get("IPAMConfig") or {}).get("IPv4Address") or ""
        facts["networks"][name] = {"fixed_ip": fixed, "ip": ep.get("IPAddress") or ""}

    # The processes and sockets, read in the container's own namespaces.
    found = tree.read_tree(ctx.src.conn, c["State"]["Pid"], source.ssh_port)
    # A console (-t) has its master in Docker's shim: the runtime hands the restored copy a new one.
    why += tree.refusals(
        found, source.name, host_daemons=False, own_namespaces=True, terminals=False, whole_session=False
    )
    kept_ips = {n["fixed_ip"] for n in facts["networks"].values() if n["fixed_ip"]}
    for s in found.listening():
        ip = s.local[0]
        if not tree.bindable(ip, kept_ips):
            why.append(
                f"it listens on {ip}, an address it keeps only with a fixed IP (--ip) on its network; on "
                f"{target.name} its address may differ and the socket could not be restored"
            )
    if facts["volumes"] and not ctx.plan.moves_volumes:
        why.append(
            f"the {ctx.plan.strategy} strategy does not move named volumes' data yet "
            f"({', '.join(v['name'] for v in facts['volumes'])}); the engine strategy does"
        )
    connected = found.connected()
    if connected:
        if run.tcp == TCP_ESTABLISHED and ctx.plan.strategy != ENGINE:
            why.append(f"keeping established TCP connections is not offered by the {ctx.plan.strategy} strategy yet")
        elif run.tcp == TCP_ESTABLISHED:
            # Docker's checkpoint API takes no CRIU options; runc would read
            # --tcp-established only from the host-wide /etc/criu/runc.conf
            # (changing every checkpoint on that host) or from an
            # org.criu.config annotation, which Docker 20.10 cannot set.
            why.append(
                f"keeping its {len(connected)} established TCP connection(s) is not possible through Docker's "
                "checkpoint API, which passes no CRIU options (runc reads --tcp-established only from the "
                "host-wide /etc/criu/runc.conf); use tcp-close"
            )
        else:
            facts["close_tcp"] = True
    facts["sockets"] = found.summary()
    facts["inside"] = inside(ctx.src.conn, c["State"]["Pid"], f"container {c['Name'].lstrip('/')}")
    if why:
        raise MigrationError(f"{source.name}: container {c['Name'].lstrip('/')} cannot move: {'; '.join(why)}")
    return facts


def _subnets(network: dict) -> list:
    return [ipaddress.ip_network(cfg["Subnet"]) for cfg in (network.get("IPAM") or {}).get("Config") or []
            if cfg.get("Subnet")]  # fmt: skip


def check_target(ctx: Context, facts: dict) -> list[str]:
    """Refuse what the target lacks; return the networks to create there before the freeze."""
    target = ctx.target
    why: list[str] = []
    create = []
    for name, want in facts["networks"].items():
        if name in BUILTIN_NETWORKS:
            continue
        there = ctx.dst.network(name)
        src_net = ctx.src.network(name)
        if there is None:
            driver = (src_net or {}).get("Driver")
            if driver != "bridge":
                why.append(f"network {name} (driver {driver}) does not exist on {target.name}; create it there")
            else:
                create.append(name)  # the same bridge network, made before the freeze
            continue
        ip = want["fixed_ip"]
        if ip and not any(ipaddress.ip_address(ip) in net for net in _subnets(there)):
            why.append(f"its fixed IP {ip} is outside network {name}'s subnets on {target.name}")
    for b in facts["binds"]:
        if ctx.dst.conn.run(["test", "-e", b["source"]], check=False).rc != 0:
            why.append(f"bind mount source {b['source']} (-> {b['destination']}) does not exist on {target.name}")
    for v in facts["other_volumes"]:
        if ctx.dst.volume(v["name"]) is None:
            why.append(f"volume {v['name']} (driver {v['driver']}) does not exist on {target.name}")
    for v in facts["volumes"]:
        there = ctx.dst.volume(v["name"])
        if there is None:
            continue
        if not _is_plain_local(there):
            why.append(f"{target.name} has a volume {v['name']} that is not plain local data")
        elif ctx.dst.conn.sh('[ -z "$(ls -A "$1" 2>/dev/null)" ]', there["Mountpoint"], check=False).rc != 0:
            why.append(f"{target.name} already has a volume {v['name']} holding data; criuweb will not mix the two")
    if why:
        raise MigrationError(f"{target.name}: the container cannot move here: {'; '.join(why)}")
    return create


# Prints "<proto> <port>" for each TCP or UDP socket listening on the host
# (Docker's userland proxy for a published port among them).
LISTENING_SCRIPT = r"""
ss -Hlnt 2>/dev/null | awk '{n = split($4, a, ":"); print "tcp", a[n]}'
ss -Hlnu 2>/dev/null | awk '{n = split($4, a, ":"); print "udp", a[n]}'
true
"""


def refuse_taken_ports(ctx: Context) -> None:
    """A published host port another container or process holds on the target, refused before anything is done.

    Docker would only find out when it starts the new container: after the
    freeze for a migration, after it was created and filled for a restore. A
    clone on the original's own host always hits it.
    Not remapped: a port that changes behind the user's back is worse than a
    refusal that names it (docs/checkpoints.md).
    """
    s = ctx.state
    replace_id = getattr(s, "replace_id", "")  # a restore in place: the stopped original it replaces
    wanted = {}
    for spec, bindings in (s.container["HostConfig"].get("PortBindings") or {}).items():
        port, _, proto = spec.partition("/")
        for b in bindings or []:
            if (b or {}).get("HostPort"):  # "" is a port Docker picks: it cannot collide
                wanted[(proto or "tcp", str(b["HostPort"]))] = f"{b['HostPort']}->{port}/{proto or 'tcp'}"
    if not wanted:
        return
    held = {}
    for c in ctx.dst.call("list containers", ctx.dst.api.containers):
        if c["Id"] == replace_id:
            continue
        for p in c.get("Ports") or []:
            if p.get("PublicPort"):
                held[(p.get("Type", "tcp"), str(p["PublicPort"]))] = f"container {c['Names'][0].lstrip('/')}"
    for line in ctx.dst.conn.sh(LISTENING_SCRIPT, check=False).stdout.splitlines():
        proto, _, port = line.partition(" ")
        held.setdefault((proto, port.strip()), "a process")
    taken = [f"{wanted[k]} (held by {held[k]})" for k in wanted if k in held]
    if taken:
        raise MigrationError(
            f"{ctx.target.name}: the container publishes host port{'s' if len(taken) > 1 else ''} "
            f"{', '.join(taken)} there; two containers cannot publish one port. Choose another host, or stop "
            "what holds the port"
        )


def refuse_taken_addresses(ctx: Context) -> None:
    """A fixed IP address (`--ip`) another container holds on the target's network, refused before anything
    is done: Docker would refuse it only when the new container joins the network. A clone beside its
    original always hits it."""
    s = ctx.state
    replace_id = getattr(s, "replace_id", "")
    taken = []
    for name, want in (s.facts.get("networks") or {}).items():
        ip = want.get("fixed_ip")
        network = ctx.dst.network(name) if ip else None
        for cid, ep in ((network or {}).get("Containers") or {}).items():
            if cid != replace_id and (ep.get("IPv4Address") or "").split("/")[0] == ip:
                taken.append(f"{ip} on network {name} (held by container {ep.get('Name') or cid[:12]})")
    if taken:
        raise MigrationError(
            f"{ctx.target.name}: the container has the fixed address {', '.join(taken)} there; two containers "
            "cannot have one address. Choose another host, or stop what holds the address"
        )


def create_networks(ctx: Context, names: list[str]) -> list[str]:
    """Create on the target the bridge networks the container needs, as the source has them."""
    made = []
    for name in names:
        src_net = ctx.src.network(name)
        # Labelled ours, so that it goes with the last container we move away (remove_source_networks).
        ctx.dst.create_network_like(src_net, labels={RUN_LABEL: str(ctx.run.code)})
        made.append(name)
    return made


def create_volumes(ctx: Context, facts: dict) -> list[dict]:
    """Named local volumes on the target, same names, before the freeze; their mountpoints there."""
    made = []
    for v in facts["volumes"]:
        there = ctx.dst.volume(v["name"])
        created = there is None
        if created:
            there = ctx.dst.create_volume(v["name"], v["labels"])
        made.append({**v, "target_mountpoint": there["Mountpoint"], "created": created})
    return made


def remove_created(engine, state) -> None:
    """Undo what a run made on the target before its container ran there (abort, rollback); best effort.

    state: the plan's ContainerState: its created networks, volumes, and the tags it gave a shipped image.
    """
    networks, volumes = state.created_networks, state.volumes
    for name in state.shipped_tags:
        # Only while it still names the image we shipped; its last tag gone, Docker removes the image
        # unless a container uses it.
        try:
            if engine.image_id(name) == state.container.get("Image"):
                engine.untag_image(name)
        except EngineError:
            pass
    for v in volumes:
        if v.get("created"):
            try:
                engine.remove_volume(v["name"])
            except EngineError:
                pass  # in use by another container meanwhile: not ours to remove then
    for name in networks:
        try:
            # Docker lets a network go while a container on it is only
            # created (another run's, about to start there): that one keeps it.
            network = engine.network(name)
            if network is not None and not engine.network_users(network):
                engine.remove_network(name)
        except EngineError:
            pass


# Ends every established TCP connection in the container's network
# namespace ($1: a PID in it) with a reset to the peer: the same as CRIU's
# --tcp-close, which Docker's checkpoint API cannot pass. sock_destroy
# (CONFIG_INET_DIAG_DESTROY); the application sees ECONNABORTED.
CLOSE_TCP = r"""
nsenter -t "$1" -n ss -K state established >/dev/null
"""


def close_tcp(conn, pid: int) -> None:
    result = conn.sh(CLOSE_TCP, str(pid), check=False)
    if result.rc != 0:
        raise MigrationError(f"{conn.name}: could not close the container's TCP connections: {result.stderr[-200:]}")


# A read-only root without /tmp: CRIU 4.2 restores the root mount read-only
# (criu#2632, fixed by 88cb552f6) and then pivot_root()s into it, making a
# temporary directory at the root when /tmp is missing (criu/mount.c
# cr_pivot_root) — on a read-only root that fails, and the container could
# be restored neither on the target nor back on the source. An empty /tmp
# in its writable layer, made before the freeze, is what CRIU needs.
# $1: the container's merged root, $2: its upper dir.
ADD_TMP = r"""
[ -d "$1/tmp" ] && { echo present; exit 0; }
mkdir -m 1777 "$2/tmp" && echo added
"""


def ensure_tmp(conn, c: dict) -> bool:
    """Make sure a read-only container's root has /tmp; True when criuweb added it."""
    data = c["GraphDriver"]["Data"]
    out = conn.sh(ADD_TMP, data["MergedDir"], data["UpperDir"]).stdout.strip()
    return out == "added"


def needs_tmp(c: dict) -> bool:
    return bool(c["HostConfig"].get("ReadonlyRootfs"))


def checkpoint_error(conn, error: EngineError) -> criu.CriuError | None:
    """The first real line of CRIU's dump log, read on the host, for a failed Docker checkpoint.

    Docker's own message names only the log's path ("criu failed: type
    NOTIFY errno 0 path= .../criu-dump.log"); the cause is in that file, which
    containerd keeps while the container still runs.
    """
    m = re.search(r"(/\S+/(?:criu-dump|dump)\.log)", str(error))
    if not m:
        return None
    try:
        text = conn.read_file(m.group(1), check=False)
    except ssh.SSHError:
        return None
    excerpt = criu.log_excerpt(text)
    cause = criu.first_error(excerpt)
    if not cause:
        return None
    return criu.CriuError(f"{conn.name}: docker checkpoint failed: {cause} (see criu-dump.log excerpt)", excerpt)


# -- volumes in the transfer stream ------------------------------------------------

# As the plan's UNPACK_CONTAINER (same checks on the checkpoint and the
# writable layer), then each named volume's data into the target's volume
# of that name, and its byte count left for the run ($5: the file to write
# it to). $1 staging dir, $2 the container's checkpoints dir, $3 checkpoint
# name, $4 its upper dir; then pairs of volume name and target mountpoint.
UNPACK_WITH_VOLUMES = r"""
set -e
stage=$1 cps=$2 cp=$3 upper=$4 count=$5
shift 5
mkdir -p "$stage" "$cps"
tar --numeric-owner --xattrs --xattrs-include='*' --same-owner -xpf - -C "$stage"
for d in "$stage/$cp" "$stage/diff" "$stage/volumes"; do
    if [ -L "$d" ] || [ ! -d "$d" ]; then
        echo "refusing the stream: $d is not a directory" >&2; rm -rf -- "$stage"; exit 3
    fi
done
odd=$(find "$stage/$cp" ! -type f ! -type d -print -quit)
if [ -n "$odd" ]; then echo "refusing the checkpoint: $odd is not a regular file" >&2; rm -rf -- "$stage"; exit 3; fi
du -sb --apparent-size "$stage/volumes" | cut -f1 > "$count"
while [ $# -ge 2 ]; do
    data="$stage/volumes/$1/_data"
    if [ -L "$stage/volumes/$1" ] || [ -L "$data" ] || [ ! -d "$data" ]; then
        echo "refusing the stream: volume $1 is not a directory" >&2; rm -rf -- "$stage"; exit 3
    fi
    cp -a "$data/." "$2/"
    shift 2
done
mv "$stage/$cp" "$cps/"
if rmdir "$upper" 2>/dev/null; then mv "$stage/diff" "$upper"; else cp -a "$stage/diff/." "$upper/"; fi
# The source's log (named in CW_LOG by the controller, when it sent one) into its place.
if [ -n "${CW_LOG:-}" ] && [ -f "$stage/$CW_LOG" ] && [ ! -L "$stage/$CW_LOG" ]; then
    mv -- "$stage/$CW_LOG" "$CW_LOG_DST"
fi
rm -rf "$stage"
"""


def volume_tar_args(volumes: list[dict]) -> list[str]:
    """tar arguments adding each volume's data as volumes/NAME/_data to the stream."""
    args: list[str] = []
    for v in volumes:
        base, name, data = v["mountpoint"].rsplit("/", 2)
        if name != v["name"] or data != "_data":
            raise MigrationError(f"volume {v['name']}: unexpected mountpoint {v['mountpoint']}")
        args += ["-C", base.rsplit("/", 1)[0], f"volumes/{name}/_data"]
    return args


# -- what the target really runs ------------------------------------------------------

# What a container's init ($1: its PID on this host) really runs with, read
# from the kernel rather than from `docker inspect`: its ids and effective
# capabilities, whether its root is mounted read-only, its hostname, and the
# limits of its cgroup (v2). One JSON object.
INSIDE_SCRIPT = r"""
import json, subprocess, sys
pid = sys.argv[1]
out = {}
try:
    status = open("/proc/%s/status" % pid).readlines()
except FileNotFoundError:
    sys.exit(3)
for line in status:
    if line.startswith(("Uid:", "Gid:")):
        out[line[:3].lower()] = line.split()[1:]
    elif line.startswith("CapEff:"):
        out["capeff"] = line.split()[1]
root = [l.split() for l in open("/proc/%s/mountinfo" % pid) if l.split()[4] == "/"]
out["root_ro"] = bool(root) and "ro" in root[-1][5].split(",")
out["hostname"] = subprocess.run(["nsenter", "-t", pid, "-u", "cat", "/proc/sys/kernel/hostname"],
                                 capture_output=True, text=True).stdout.strip()
limits = {}
V1 = {"memory": ["memory.limit_in_bytes"], "pids": ["pids.max"], "cpu": ["cpu.cfs_quota_us", "cpu.cfs_period_us"]}
def grab(base, names):
    for name in names:
        try:
            limits[name] = open(base + "/" + name).read().strip()
        except OSError:
            pass
for line in open("/proc/%s/cgroup" % pid):
    _, controllers, path = line.strip().split(":", 2)
    if controllers == "":
        grab("/sys/fs/cgroup" + path, ("memory.max", "pids.max", "cpu.max"))
    for c in controllers.split(","):
        if c in V1:
            grab("/sys/fs/cgroup/%s%s" % (controllers, path), V1[c])
out["limits"] = limits
print(json.dumps(out))
"""

# Remounts a container's root read-only from inside its mount namespace, as
# runc does when it creates one ($1: its PID). CRIU before 4.2 restored the
# root mount without its flags (criu#2632), so a --read-only container came
# back writable although `docker inspect` still said ReadonlyRootfs.
REMOUNT_RO = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open("/proc/%s/ns/mnt" % sys.argv[1], os.O_RDONLY)
if libc.setns(fd, 0x00020000) != 0:  # CLONE_NEWNS
    raise OSError(ctypes.get_errno(), "setns")
os.chdir("/")
keep = os.statvfs("/").f_flag & (2 | 4 | 8 | 1024 | 2048 | 4096)  # nosuid nodev noexec noatime nodiratime relatime
if libc.mount(None, b"/", None, 32 | 4096 | 1 | keep, None) != 0:  # MS_REMOUNT | MS_BIND | MS_RDONLY
    raise OSError(ctypes.get_errno(), "remount")
"""


def inside(conn, pid: int, what: str = "the restored container") -> dict:
    result = conn.run(["python3", "-c", INSIDE_SCRIPT, str(pid)], check=False)
    # Exit 3: its process ended meanwhile (a workload that stops on its own
    # during pre-flight or right after its restore), not a fault of ours.
    if result.rc == 3:
        raise MigrationError(f"{conn.name}: {what} stopped (its process {pid} is gone)")
    if result.rc != 0:
        # The last line only: the error, not the script's traceback.
        last = (result.stderr.strip().splitlines() or ["no error output"])[-1]
        raise MigrationError(f"{conn.name}: cannot read what {what} runs with: {last[-300:]}")
    return json.loads(result.stdout)


def _cgroup_expect(hc: dict) -> dict:
    """The cgroup values (v2 and v1 file names) Docker writes for a HostConfig's limits."""
    want = {"memory.max": str(hc["Memory"]) if hc.get("Memory") else "max"}
    if hc.get("Memory"):
        want["memory.limit_in_bytes"] = str(hc["Memory"])
    want["pids.max"] = str(hc["PidsLimit"]) if hc.get("PidsLimit") and hc["PidsLimit"] > 0 else "max"
    quota, period = None, None
    if hc.get("NanoCpus"):
        quota, period = hc["NanoCpus"] * 100000 // 10**9, 100000
    elif hc.get("CpuQuota"):
        quota, period = hc["CpuQuota"], hc.get("CpuPeriod") or 100000
    if quota:
        want["cpu.max"] = f"{quota} {period}"
        want["cpu.cfs_quota_us"], want["cpu.cfs_period_us"] = str(quota), str(period)
    return want


def verify_fidelity(
    ctx: Context, source: dict, restart_policy: dict | None, source_inside: dict | None, own_label: str = ""
) -> str:
    """Check that the target runs the source's configuration; fix what can be fixed.

    Raises MigrationError naming each field that differs (the run then rolls
    back). Returns a line saying what was checked and fixed.
    """
    t = ctx.dst.inspect(ctx.state.target_id)
    sc, tc, sh, th = source["Config"], t["Config"], source["HostConfig"], t["HostConfig"]
    wrong, fixed = [], []
    for key in ("User", "WorkingDir", "Hostname", "Domainname", "Entrypoint", "Cmd", "Healthcheck"):
        if (sc.get(key) or None) != (tc.get(key) or None):
            wrong.append(f"{key} {tc.get(key)!r} (source {sc.get(key)!r})")
    if set(sc.get("Env") or []) != set(tc.get("Env") or []):
        wrong.append("environment")
    labels = tc.get("Labels") or {}
    # Not criuweb's own run label, which names this run on the target.
    if any(labels.get(k) != v for k, v in (sc.get("Labels") or {}).items() if k != own_label):
        wrong.append("labels")
    for key in ("ReadonlyRootfs", "Memory", "MemorySwap", "NanoCpus", "CpuShares", "CpuQuota", "CpuPeriod",
                "CpusetCpus", "PidsLimit", "CapAdd", "CapDrop", "Privileged", "SecurityOpt", "Ulimits",
                "ShmSize", "Sysctls", "PortBindings"):  # fmt: skip
        if (sh.get(key) or None) != (th.get(key) or None):
            wrong.append(f"{key} {th.get(key)!r} (source {sh.get(key)!r})")
    want_policy = (restart_policy or sh.get("RestartPolicy") or {}).get("Name") or "no"
    if ((th.get("RestartPolicy") or {}).get("Name") or "no") != want_policy:
        wrong.append(f"restart policy (source {want_policy})")
    for net, ep in (source["NetworkSettings"].get("Networks") or {}).items():
        fixed_ip = (ep.get("IPAMConfig") or {}).get("IPv4Address")
        got = ((t["NetworkSettings"].get("Networks") or {}).get(net) or {}).get("IPAddress")
        if fixed_ip and got != fixed_ip:
            wrong.append(f"IP address on {net}: {got} (fixed {fixed_ip})")
    pid = t["State"]["Pid"]
    now = inside(ctx.dst.conn, pid)
    if sh.get("ReadonlyRootfs") and not now["root_ro"]:
        result = ctx.dst.conn.run(["python3", "-c", REMOUNT_RO, str(pid)], check=False)
        now = inside(ctx.dst.conn, pid)
        if now["root_ro"]:
            fixed.append("root remounted read-only")
        else:
            wrong.append(f"root file system writable although read-only ({result.stderr.strip()[-200:]})")
    if source_inside:
        for key, name in (("uid", "user id"), ("gid", "group id"), ("capeff", "capabilities")):
            if source_inside.get(key) != now.get(key):
                wrong.append(f"{name} {now.get(key)} (source {source_inside.get(key)})")
        if source_inside.get("hostname") != now.get("hostname"):
            wrong.append(f"hostname {now.get('hostname')!r} (source {source_inside.get('hostname')!r})")
    for name, value in _cgroup_expect(th).items():
        got = now["limits"].get(name)
        if got is not None and got != value:
            wrong.append(f"cgroup {name} {got} (expected {value})")
    if wrong:
        raise MigrationError(f"{ctx.target.name}: the restored container differs from the source: {'; '.join(wrong)}")
    return "configuration as on the source (user, capabilities, limits, root mount, network)" + (
        f"; {', '.join(fixed)}" if fixed else ""
    )


def remove_source_volumes(engine, volumes: list[dict]) -> str:
    """After a move without --keep-source: the source's copies of the moved volumes, unless others use them."""
    notes = []
    for v in volumes:
        users = engine.volume_users(v["name"])
        if users:
            others = ", ".join(u[:12] for u in users)
            notes.append(f"volume {v['name']} kept on {engine.name}: containers {others} use it")
            continue
        engine.remove_volume(v["name"])
        notes.append(f"volume {v['name']} removed from {engine.name}")
    return "".join(f"; {n}" for n in notes)


def remove_source_networks(engine, networks, host) -> str:
    """After a move without --keep-source: the source's networks that criuweb itself made, once unused.

    A network the user made stays, as Docker keeps it when a container
    leaves. One that a move here created (labelled RUN_LABEL) the user never
    asked for: it goes with the last container (running, stopped or only created) on it,
    unless a checkpoint kept on this host or a run still coming here names it.
    """
    notes = []
    for name in networks:
        if name in BUILTIN_NETWORKS:
            continue
        network = engine.network(name)
        if network is None or RUN_LABEL not in (network.get("Labels") or {}):
            continue
        needed = _network_needed(host, name)
        if needed:
            notes.append(f"network {name} (created by criuweb) kept on {engine.name}: {needed} needs it")
            continue
        users = engine.network_users(network)
        if users:
            others = ", ".join(u[:12] for u in users)
            notes.append(f"network {name} (created by criuweb) kept on {engine.name}: containers {others} use it")
            continue
        try:
            engine.remove_network(name)
        except EngineError as e:
            # Joined by a container meanwhile (Docker refuses then): it is in use, so it stays.
            notes.append(f"network {name} kept on {engine.name}: {e}")
            continue
        notes.append(f"network {name} (created by criuweb) removed from {engine.name}")
    return "".join(f"; {n}" for n in notes)


def _network_needed(host, name: str) -> str:
    """What, besides a container, still needs a network on host: "" when nothing does.

    A kept checkpoint restores onto its host only with its networks there
    (check_target copies a missing one from the source, which for an
    in-place restore is this host). A run coming here past its pre-flight
    found the network there and will not make it again.
    """
    for cp in Checkpoint.objects.filter(host=host, kind=CONTAINER).only("name", "facts"):
        if name in ((cp.facts or {}).get("networks") or {}):
            return f"checkpoint {cp.name}"
    coming = MigrationRun.objects.filter(target=host, kind=CONTAINER).exclude(status__in=FINISHED)
    for run in coming.only("code", "state"):
        if name in (((run.state or {}).get("facts") or {}).get("networks") or {}):
            return f"run {run.code}"
    return ""


# -- CRIU's restore log ------------------------------------------------------------

# Keeps a copy of CRIU's restore log while Docker restores a container: when
# a restore fails, containerd deletes the task's directory, log and all,
# and Docker's error names only the path. $1 the container id, $2 where to
# copy, $3 a file whose appearance ends the watch. Also ends once the log
# was seen and is gone, after about 10 minutes, or when the controller's
# connection closes (the dot written each round then fails).
WATCH_RESTORE_LOG = r"""
i=0 seen=
while [ $i -lt 30000 ] && [ ! -e "$3" ]; do
    found=
    for f in /run/*/exec/containerd/daemon/io.containerd.runtime.v2.task/moby/"$1"/work/restore.log \
             /run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby/"$1"/work/restore.log \
             /var/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby/"$1"/work/restore.log \
             /run/containerd/io.containerd.runtime.v2.task/moby/"$1"/work/restore.log; do
        if [ -f "$f" ]; then
            found=1 seen=1
            cp -- "$f" "$2.part" 2>/dev/null && mv -- "$2.part" "$2"
        fi
    done
    [ -n "$seen" ] && [ -z "$found" ] && break
    printf . || exit 0
    i=$((i + 1))
    sleep 0.02
done
rm -f -- "$3"
"""


def watch_restore_log(conn, container_id: str, copy: str):
    """Start copying a container's CRIU restore log as it is written; returns the channel."""
    conn.run(["rm", "-f", "--", copy, f"{copy}.stop"], check=False)
    return conn.open_command(["sh", "-c", WATCH_RESTORE_LOG, "sh", container_id, copy, f"{copy}.stop"])


def restore_log_copy(conn, copy: str, wait: float = 1.0) -> str:
    """The copied restore log once the watcher saw the task's directory go (waits up to `wait` s)."""
    deadline = time.monotonic() + wait
    text = None
    while time.monotonic() < deadline:
        text = conn.read_file(copy, check=False)
        if text and "Restoring FAILED" in text:
            break
        time.sleep(0.1)
    return text or ""


def stop_watch(conn, watcher, copy: str) -> None:
    try:
        conn.run(["sh", "-c", 'touch -- "$1.stop"; rm -f -- "$1"', "sh", copy], check=False)
    finally:
        watcher.close()
