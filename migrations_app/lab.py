"""The lab: N hosts (two by default) on this machine, each a network namespace
with its own address, sshd and Docker engine.

This module builds and removes the lab with local commands; it is the one
place that may. Everything else reaches the lab hosts over SSH, exactly as
it would reach a remote machine.
"""

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings

from .models import Host, TrustedPair
from .runc import RUNTIME_NAME

PREFIX = 24
IMAGE = "criuweb/busybox:latest"
# The benchmark workload (scripts/memhog.c), built static by setup-system.sh
# onto the filesystem the lab hosts share, and into an image of its own.
MEMHOG = Path("/opt/criuweb/bin/memhog")
MEMHOG_IMAGE = "criuweb/memhog:latest"
# Where a memhog container writes its checksum on SIGUSR1 (the image has no /tmp).
MEMHOG_CONTAINER_CHECKSUM = "/memhog.checksum"
# The lab hosts log in as this user: uid 0 like root (CRIU needs it), but
# with /bin/sh as its shell. Root's bash on these machines sources a
# ~/.bashrc that costs about 140 ms per SSH command (scripts/ssh-latency.sh),
# which would count as downtime; a remote host's root usually has no such thing.
LAB_USER = "cwlab"
# Its home is shared by every lab on this machine (make run's id 0 and the
# test sessions' 1-9 share the user), so it lives outside any lab's root:
# one lab's `down` must not pull the home from under another's SSH sessions
# ("Could not chdir to home directory" on every command).
LAB_HOME = Path("/var/lib/criuweb/lab-home")
DEMO_CONTAINER = "counter"
COUNTER_SCRIPT = "i=0; while true; do echo $i; i=$((i+1)); sleep 1; done"
# The demo process appends each value to a file it opens anew every second,
# so it holds no file open across the move (CRIU checks open files' sizes).
PROCESS_COUNTER_SCRIPT = 'i=0; while true; do echo $i >> "$1"; i=$((i+1)); sleep 1; done'


class LabError(Exception):
    """Building or removing the lab failed; the message says which step."""


def lab_id():
    # More than one lab can exist side by side: the test suite builds its
    # own (CRIUWEB_LAB_ID=1) and leaves the one `make run` serves alone.
    return settings.LAB_ID


def bridge():
    return f"cwlab{lab_id()}"


def bridge_addr():
    return f"10.213.{lab_id()}.1"


@dataclass
class LabHost:
    name: str
    index: int

    @property
    def netns(self):
        return f"cw{lab_id()}-{self.name}"

    @property
    def address(self):
        return f"10.213.{lab_id()}.{10 + self.index}"

    @property
    def root(self):
        return settings.LAB_ROOT / self.name

    @property
    def run_dir(self):
        return Path("/run") / f"criuweb{lab_id()}-{self.name}"

    @property
    def docker_sock(self):
        return self.run_dir / "docker.sock"

    @property
    def data_root(self):
        return self.root / "docker"

    @property
    def work_dir(self):
        return self.root / "work"

    @property
    def host_key(self):
        return self.root / "ssh_host_ed25519_key"

    @property
    def sshd_pid(self):
        return self.run_dir / "sshd.pid"

    @property
    def dockerd_pid(self):
        return self.run_dir / "docker.pid"

    @property
    def veth(self):
        return f"cwv{lab_id()}-{self.index}"


def host(index: int) -> LabHost:
    return LabHost(f"lab-{index}", index)


# lab-1 and lab-2, which every lab has: the pair the tests, the demo and the
# downtime benchmarks migrate between. hosts() is every host of the lab.
HOSTS = [host(1), host(2)]
DEFAULT_HOSTS = 2
# Addresses .11 to .42 of the lab's /24. Each host runs its own sshd, dockerd
# and containerd (about 120 MiB resident, 45 MiB of it its own: docs/lab.md),
# which bounds a lab on one machine long before the addresses do.
MAX_HOSTS = 32


def hosts() -> list[LabHost]:
    """Every host of this lab: as many as the last `up` asked for, and any left beyond.

    What is on the machine counts too (namespaces, run and root
    directories), so that `down` removes a lab whatever N built it, even
    one whose record is gone. With no lab at all: lab-1 and lab-2.
    """
    indices = set(range(1, _recorded_count() + 1)) | _present_indices()
    return [host(i) for i in sorted(indices)] or list(HOSTS)


def _count_file() -> Path:
    return settings.LAB_ROOT / "hosts"


def _recorded_count() -> int:
    try:
        return int(_count_file().read_text())
    except (OSError, ValueError):
        return 0


def _present_indices() -> set[int]:
    """Indices of the hosts of this lab that left anything on the machine."""
    # The lab id is followed by "-" in each name, so lab 1 never matches lab 10's.
    places = [
        (Path("/run/netns"), re.compile(rf"cw{lab_id()}-lab-(\d+)")),
        (Path("/run"), re.compile(rf"criuweb{lab_id()}-lab-(\d+)")),
        (settings.LAB_ROOT, re.compile(r"lab-(\d+)")),
    ]
    found = set()
    for directory, pattern in places:
        try:
            names = [entry.name for entry in directory.iterdir()]
        except OSError:
            continue
        for name in names:
            match = pattern.fullmatch(name)
            if match and 1 <= int(match[1]) <= MAX_HOSTS:
                found.add(int(match[1]))
    return found


def client_key():
    # In a key directory of its own: criuweb reads login keys only from the
    # directories in settings.SSH_KEY_DIRS, which names this one.
    return settings.LAB_ROOT / "keys" / "id_ed25519"


def counter_file():
    """Where the demo process writes; both lab hosts share this filesystem."""
    return settings.LAB_ROOT / "counter-process.log"


def sh(*argv, check=True, **kwargs):
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise LabError(f"`{' '.join(map(str, argv))}` failed: {result.stderr.strip() or result.stdout.strip()}")
    return result


def _alive(pidfile):
    """The PID in pidfile if that process is running (not a zombie), else None."""
    try:
        pid = int(Path(pidfile).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_running(pid) else None


def pid_running(pid):
    """Whether a process runs here (a zombie does not): the lab hosts share this machine's PIDs."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _is_mountpoint(path):
    return sh("mountpoint", "-q", path, check=False).returncode == 0


# -- up ---------------------------------------------------------------------


def up(log=print, demo=False, count: int | None = None):
    """Bring the lab up with count hosts, lab-1 ... lab-count.

    Without count: as many as the lab has now, or DEFAULT_HOSTS for a new
    one (so `make run` keeps a lab someone grew). With a count below what
    the lab has, the hosts beyond it are removed.
    """
    if count is None:
        count = max(_recorded_count(), max(_present_indices(), default=0)) or DEFAULT_HOSTS
    if not DEFAULT_HOSTS <= count <= MAX_HOSTS:
        raise LabError(f"a lab has {DEFAULT_HOSTS} to {MAX_HOSTS} hosts, not {count}")
    extra = [h for h in hosts() if h.index > count]
    for h in extra:
        _down_host(h)
        log(f"{h.name}: down (the lab now has {count} hosts)")
    _forget(extra)
    settings.LAB_ROOT.mkdir(parents=True, exist_ok=True)
    # Recorded first: a lab that fails half-way still lists (and removes) every host it was to have.
    _count_file().write_text(f"{count}\n")
    _ensure_pipe_limits()
    with _labs_lock():
        _ensure_criu_kdat_cache()
        _ensure_bridge()
        _ensure_user()
    _ensure_client_key()
    for h in [host(i) for i in range(1, count + 1)]:
        _ensure_netns(h)
        _ensure_sshd(h)
        _ensure_dockerd(h)
        _ensure_image(h)
        register(h)
        log(f"{h.name}: up at {h.address} (sshd, Docker engine {h.docker_sock})")
    trust_pair()
    if demo:
        start_demo(log)


# Post-copy (criu dump --lazy-pages) moves pages through pipes far larger
# than the defaults allow, and root here lacks CAP_SYS_RESOURCE, so the
# limits apply to CRIU: the dump fails with "page-pipe: tee: 65536:
# Operation not permitted" when the target's lazy-pages daemon connects.
# A real host's root usually has CAP_SYS_RESOURCE and needs none of this.
# The lab hosts share this kernel, so these sysctls are global: raised
# only, and never put back by `down`, since other labs on the machine may
# be migrating with them.
PIPE_LIMITS = {
    "/proc/sys/fs/pipe-max-size": 268435456,  # bytes (256 MiB)
    "/proc/sys/fs/pipe-user-pages-soft": 0,  # 0: no per-user limit
}


def _ensure_pipe_limits():
    for path, wanted in PIPE_LIMITS.items():
        current = int(Path(path).read_text())
        # For pipe-user-pages-soft 0 is the highest setting (no limit).
        if (wanted == 0 and current != 0) or (wanted and current < wanted):
            Path(path).write_text(f"{wanted}\n")


@contextlib.contextmanager
def _labs_lock():
    """Held while a lab adds its bridge and the shared user, or removes its bridge and maybe the user.

    The last lab's `down` removes the user that every lab logs in as. Without
    this, a lab coming up at that moment (another test session, or another
    xdist worker of the same one) could find the user still there, then
    lose it.
    """
    with open("/run/criuweb-labs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


# CRIU learns the kernel's features at every start (kerndat_init in
# criu/kerndat.c: `iptables -L`, ptrace and userfaultfd probes, ...) unless
# it finds them in /run/criu.kdat, which it saves only when /run is a tmpfs
# (so that a reboot clears it: kerndat_save_cache). /run on this machine is
# not one, so every criu here probed again: 40-180 ms (by load) before a
# dump reached its freeze, and as much again inside the downtime for every
# restore and lazy-pages daemon, where a usual host loads its cache in
# microseconds. CRIU loads the file wherever /run is (kerndat_try_load_cache
# checks only its magics), so the lab makes it as CRIU would on a tmpfs:
# `criu check` in a mount namespace of its own with a tmpfs at /run, its
# file copied out. Made again after a reboot (a new kernel may differ) and
# when criu is newer than it (another build's cache is rejected anyway).
KDAT_CACHE = Path("/run/criu.kdat")
KDAT_MAGIC = 0x57023458  # criu/include/magic.h
KDAT_SCRIPT = "mount -t tmpfs criuweb-kdat /run && criu check >/dev/null 2>&1; cat /run/criu.kdat"


def _boot_time() -> float:
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    return 0.0


def _ensure_criu_kdat_cache():
    if sh("stat", "-f", "-c", "%T", "/run").stdout.strip() == "tmpfs":
        return  # CRIU keeps its own cache there
    criu_bin = shutil.which("criu")
    if criu_bin is None:
        return
    try:
        made = KDAT_CACHE.stat().st_mtime
        if made > _boot_time() and made > Path(criu_bin).resolve().stat().st_mtime:
            return
    except OSError:
        pass
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", KDAT_SCRIPT], capture_output=True
    ).stdout
    if len(out) < 8 or int.from_bytes(out[:4], "little") != KDAT_MAGIC:
        return  # CRIU then probes at every start, as before: slower, not wrong
    tmp = KDAT_CACHE.with_name(f"criu.kdat.criuweb-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(out)
    os.replace(tmp, KDAT_CACHE)


def _ensure_bridge():
    if sh("ip", "link", "show", bridge(), check=False).returncode != 0:
        sh("ip", "link", "add", bridge(), "type", "bridge")
        sh("ip", "addr", "add", f"{bridge_addr()}/{PREFIX}", "dev", bridge())
    sh("ip", "link", "set", bridge(), "up")


def _ensure_client_key():
    key = client_key()
    key.parent.mkdir(mode=0o700, exist_ok=True)
    if not key.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "criuweb-lab", "-f", key)


def _ensure_user():
    LAB_HOME.mkdir(mode=0o700, parents=True, exist_ok=True)
    entry = sh("getent", "passwd", LAB_USER, check=False)
    if entry.returncode == 0 and entry.stdout.split(":")[5] == str(LAB_HOME):
        return
    if entry.returncode == 0:
        # Made by an older criuweb with its home inside one lab's root.
        # usermod refuses to touch a uid-0 user ("currently used by process
        # 1"); removing and adding it again is a moment without it, once.
        sh("userdel", "--force", LAB_USER)
    # Password "*": no password login, yet not "locked", which sshd refuses.
    sh("useradd", "--non-unique", "--uid", "0", "--gid", "0", "--no-create-home", "--password", "*",
       "--home-dir", LAB_HOME, "--shell", "/bin/sh", LAB_USER)


def _ensure_netns(h):
    if not Path(f"/run/netns/{h.netns}").exists():
        sh("ip", "netns", "add", h.netns)
    ns = ["ip", "-n", h.netns]
    if sh(*ns, "link", "show", "eth0", check=False).returncode != 0:
        sh("ip", "link", "del", h.veth, check=False)
        sh("ip", "link", "add", h.veth, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
        sh("ip", "link", "set", h.veth, "master", bridge(), "up")
        sh(*ns, "addr", "add", f"{h.address}/{PREFIX}", "dev", "eth0")
        sh(*ns, "link", "set", "eth0", "up")
        sh(*ns, "link", "set", "lo", "up")
        sh(*ns, "route", "add", "default", "via", bridge_addr())


def _nsenter(h):
    # nsenter rather than `ip netns exec`: the latter remounts /sys, and
    # dockerd then finds no devices cgroup.
    return ["nsenter", f"--net=/run/netns/{h.netns}"]


def _ensure_sshd(h):
    h.root.mkdir(parents=True, exist_ok=True)
    h.run_dir.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(exist_ok=True)
    h.work_dir.mkdir(parents=True, exist_ok=True)
    if not h.host_key.exists():
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", h.name, "-f", h.host_key)
    authorized = h.root / "authorized_keys"
    authorized.write_text(Path(f"{client_key()}.pub").read_text())
    config = h.root / "sshd_config"
    config.write_text(
        f"""ListenAddress {h.address}
Port 22
HostKey {h.host_key}
PidFile {h.sshd_pid}
AuthorizedKeysFile {authorized}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# docker-py opens a channel per API connection.
MaxSessions 64
MaxStartups 64
SetEnv DOCKER_HOST=unix://{h.docker_sock} CRIUWEB_HOST={h.name}
"""
    )
    if _alive(h.sshd_pid):
        # Reload the config in case it changed.
        os.kill(_alive(h.sshd_pid), 1)
        return
    sh(*_nsenter(h), "/usr/sbin/sshd", "-f", config, "-E", h.root / "sshd.log")
    _wait(lambda: _alive(h.sshd_pid), f"{h.name}: sshd did not start (see {h.root / 'sshd.log'})")


def _ensure_dockerd(h):
    h.data_root.mkdir(parents=True, exist_ok=True)
    # CRIU copies mount sharing from the checkpoint; the default engine's
    # data root is a shared mount, so every lab engine's must be one too or
    # a checkpoint from another engine fails to restore ("mnt-v2: Failed to
    # copy sharing").
    if not _is_mountpoint(h.data_root):
        sh("mount", "--bind", h.data_root, h.data_root)
    sh("mount", "--make-shared", h.data_root)
    if _alive(h.dockerd_pid) and _docker_ok(h):
        return
    config = h.root / "daemon.json"
    # criuweb's OCI runtime beside runc, for the fast container path
    # (migrations_app/runc.py); from this checkout, so it always matches the code.
    runtimes = {RUNTIME_NAME: {"path": str(settings.BASE_DIR / "scripts" / "criuweb-runtime")}}
    config.write_text(json.dumps({"experimental": True, "runtimes": runtimes}))
    log = open(h.root / "dockerd.log", "ab")
    env = dict(os.environ, PATH="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    # setsid --fork: dockerd must not be our child, or it would linger as
    # our zombie after it stops.
    subprocess.Popen(
        [
            "setsid", "--fork",
            *_nsenter(h),
            "dockerd",
            "--config-file", str(config),
            "--data-root", str(h.data_root),
            "--exec-root", str(h.run_dir / "exec"),
            "--pidfile", str(h.dockerd_pid),
            "-H", f"unix://{h.docker_sock}",
        ],
        stdout=log,
        stderr=log,
        stdin=subprocess.DEVNULL,
        env=env,
    )
    _wait(lambda: _docker_ok(h), f"{h.name}: dockerd did not start (see {h.root / 'dockerd.log'})", 60)


def _docker(h, *argv, **kwargs):
    return sh("docker", "-H", f"unix://{h.docker_sock}", *argv, **kwargs)


def _docker_ok(h):
    return h.docker_sock.exists() and _docker(h, "version", check=False, timeout=20).returncode == 0


def _ensure_image(h):
    _ensure_one_image(h, IMAGE, None, _build_busybox)
    if not MEMHOG.exists():
        raise LabError(f"{MEMHOG} is missing: run `make setup` (scripts/setup-system.sh builds it)")
    # The version names the binary and the Dockerfile: a change to either rebuilds.
    version = hashlib.md5(MEMHOG.read_bytes() + _memhog_dockerfile("").encode()).hexdigest()
    _ensure_one_image(h, MEMHOG_IMAGE, version, _build_memhog)


def _ensure_one_image(h, image, version, build):
    """image on h; with a version, one whose criuweb.version label matches (rebuilt when the binary changed)."""
    if _image_version(h, image) == (version or ""):
        return
    first = HOSTS[0]
    if h.index != first.index:
        # The same image (same id) on every lab host, as a registry would
        # give: built once, then copied.
        save = subprocess.Popen(["docker", "-H", f"unix://{first.docker_sock}", "save", image], stdout=subprocess.PIPE)
        _docker(h, "load", "-q", stdin=save.stdout)
        save.wait()
        return
    build(h, version)


def _image_version(h, image):
    """The image's criuweb.version label ("" without one), or None if h lacks the image."""
    result = _docker(h, "image", "inspect", "-f", "{{json .Config.Labels}}", image, check=False)
    if result.returncode != 0:
        return None
    return (json.loads(result.stdout or "null") or {}).get("criuweb.version", "")


def _build(h, image, ctx):
    # No registry here: images are built from local files only.
    _docker(h, "build", "-q", "-t", image, ctx, env=dict(os.environ, DOCKER_BUILDKIT="0"))


def _build_busybox(h, version):
    ctx = h.root / "image"
    ctx.mkdir(exist_ok=True)
    shutil.copy("/bin/busybox", ctx / "busybox")
    (ctx / "Dockerfile").write_text(
        'FROM scratch\nCOPY busybox /bin/busybox\nRUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        'CMD ["sh"]\n'
    )
    _build(h, IMAGE, ctx)


def _build_memhog(h, version):
    ctx = h.root / "memhog-image"
    ctx.mkdir(exist_ok=True)
    shutil.copy(MEMHOG, ctx / "memhog")
    (ctx / "Dockerfile").write_text(_memhog_dockerfile(version))
    _build(h, MEMHOG_IMAGE, ctx)


def _memhog_dockerfile(version):
    return (
        f"FROM {IMAGE}\nCOPY memhog /bin/memhog\nLABEL criuweb.version={version}\n"
        f'CMD ["memhog", "16", "-", "{MEMHOG_CONTAINER_CHECKSUM}"]\n'
    )


def register(h):
    """Record a lab host in the inventory, its host key pinned."""
    pub = Path(f"{h.host_key}.pub").read_text().split()
    Host.objects.update_or_create(
        name=h.name,
        defaults=dict(
            address=h.address,
            ssh_port=22,
            user=LAB_USER,
            key_path=str(client_key()),
            # We generated this key ourselves a moment ago, so pinning it
            # without asking is pinning a fact, not trusting on first use.
            host_key=f"{pub[0]} {pub[1]}",
            work_dir=str(h.work_dir),
        ),
    )


def trust_pair():
    """Mark every pair of registered lab hosts a trusted migration network: their traffic never leaves this machine."""
    registered = Host.objects.filter(name__in=[h.name for h in hosts()]).order_by("pk")
    for one, other in itertools.combinations(registered, 2):
        TrustedPair.trust(one, other, note="the lab: its hosts are network namespaces of one machine")


def _wait(predicate, message, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise LabError(message)


# -- demo ---------------------------------------------------------------------


def start_demo(log=print):
    """Start the counter container and the counter process on lab-1, over SSH.

    Idempotent: a counter already running on any lab host is left alone,
    wherever earlier migrations moved it.
    """
    from . import docker_engine, ssh

    registered = sorted(Host.objects.filter(name__in=[h.name for h in hosts()]), key=_host_index)
    running = None
    for one in registered:
        with docker_engine.Engine(one) as engine:
            found = engine.find_container(DEMO_CONTAINER)
            if found:
                if found["State"]["Running"]:
                    running = one
                else:
                    engine.remove(DEMO_CONTAINER)
    first = registered[0]
    if running:
        log(f"{running.name}: container {DEMO_CONTAINER!r} already counting")
    else:
        with docker_engine.Engine(first) as engine:
            engine.run_container(IMAGE, ["sh", "-c", COUNTER_SCRIPT], DEMO_CONTAINER)
        log(f"{first.name}: container {DEMO_CONTAINER!r} counting")
    with ssh.Connection(first) as conn:
        pid = demo_process_pid()
        if pid:
            log(f"process {pid} already counting into {counter_file()}")
        else:
            conn.run(["rm", "-f", str(counter_file())])
            pid = start_process(conn, PROCESS_COUNTER_SCRIPT, str(counter_file()))
            log(f"{first.name}: process {pid} counting into {counter_file()}")


def _host_index(h: Host) -> int:
    # By number, not by name: lab-10 comes after lab-9.
    return int(h.name.rsplit("-", 1)[1])


def demo_process_pid():
    """PID of the running demo counter process, or None.

    The lab hosts share this machine's PID namespace, so a local look at
    /proc finds it wherever it was moved; its exact argv tells it apart.
    """
    wanted = ["sh", "-c", PROCESS_COUNTER_SCRIPT, "sh", str(counter_file())]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if [a.decode(errors="replace") for a in argv] == wanted and state != "Z":
            return int(entry.name)
    return None


def host_of_pid(pid):
    """Name of the lab host whose network namespace holds pid, or None."""
    try:
        ns = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None
    for h in hosts():
        path = Path(f"/run/netns/{h.netns}")
        if path.exists() and path.stat().st_ino == ns:
            return h.name
    return None


def start_process(conn, script, arg):
    """Start a detached `sh -c script sh arg` on a host and return its PID."""
    # setsid and /dev/null stdio: the process must not hold the SSH session,
    # and CRIU restores it without a terminal.
    result = conn.sh('setsid sh -c "$1" sh "$2" </dev/null >/dev/null 2>&1 & echo $!', script, arg)
    return int(result.stdout.strip())


# -- memhog ---------------------------------------------------------------------

# $1: memhog's PID, $2: its checksum file. memhog writes the file through a
# rename, so once it is there it is whole.
MEMHOG_CHECKSUM_SCRIPT = r"""
rm -f "$2"
kill -USR1 "$1" || exit 3
i=0
while [ ! -s "$2" ]; do
    i=$((i+1))
    [ "$i" -le 1200 ] || { echo "memhog $1 wrote no checksum to $2 in 60 s" >&2; exit 4; }
    sleep 0.05
done
cat "$2"
"""


def start_memhog(conn, mib, counter_path, checksum_path):
    """Start a detached memhog holding mib MiB on a host; return its PID.

    It appends 0, 1, 2, ... to counter_path every 10 ms and writes its
    memory's checksum to checksum_path on SIGUSR1 (memhog_checksum()).
    """
    result = conn.sh(
        'setsid "$1" "$2" "$3" "$4" </dev/null >/dev/null 2>&1 & echo $!',
        str(MEMHOG), str(int(mib)), str(counter_path), str(checksum_path),
    )
    return int(result.stdout.strip())


def memhog_checksum(conn, pid, checksum_path):
    """The checksum of a memhog process's memory, computed now, as hex."""
    return conn.sh(MEMHOG_CHECKSUM_SCRIPT, str(pid), str(checksum_path), timeout=90).stdout.strip()


def run_memhog_container(engine, name, mib):
    """Start a memhog container holding mib MiB; it prints its counter to its log."""
    return engine.run_container(MEMHOG_IMAGE, ["memhog", str(int(mib)), "-", MEMHOG_CONTAINER_CHECKSUM], name)


def memhog_container_checksum(engine, name):
    """The checksum of a memhog container's memory, computed now, as hex."""
    cid = engine.inspect(name)["Id"]
    # memhog is PID 1 of the container; it handles SIGUSR1, so the signal
    # reaches it (PID 1 ignores only signals it has no handler for).
    exec_id = engine.api.exec_create(cid, ["sh", "-c", MEMHOG_CHECKSUM_SCRIPT, "sh", "1", MEMHOG_CONTAINER_CHECKSUM])
    out = engine.api.exec_start(exec_id["Id"], demux=True)
    rc = engine.api.exec_inspect(exec_id["Id"])["ExitCode"]
    if rc != 0:
        raise LabError(f"{name}: no memhog checksum: {(out[1] or b'').decode(errors='replace').strip()}")
    return (out[0] or b"").decode().strip()


def counter_values(text):
    """The counter values in a memhog or counter output, other lines left out."""
    return [int(line) for line in text.split("\n") if line.strip().isdigit()]


# -- status and down ------------------------------------------------------------


def status():
    out = []
    for h in hosts():
        out.append(
            {
                "name": h.name,
                "address": h.address,
                "ssh_port": 22,
                "user": LAB_USER,
                "key": str(client_key()),
                "netns": h.netns,
                "docker_host": f"unix://{h.docker_sock}",
                "sshd": bool(_alive(h.sshd_pid)),
                "dockerd": bool(_alive(h.dockerd_pid)) and _docker_ok(h),
            }
        )
    return out


def down(log=print):
    """Remove every host of the lab (however many `up` made) and what they shared."""
    every = hosts()
    for h in every:
        _down_host(h)
        log(f"{h.name}: down")
    shutil.rmtree(settings.LAB_ROOT, ignore_errors=True)
    with _labs_lock():
        sh("ip", "link", "del", bridge(), check=False)
        others = sh("ip", "-o", "link", "show", "type", "bridge", check=False).stdout
        if "cwlab" not in others:  # the last lab on this machine
            sh("userdel", "--force", LAB_USER, check=False)
            shutil.rmtree(LAB_HOME, ignore_errors=True)
    _forget(every)


def _forget(gone: list[LabHost]) -> None:
    # Hosts with recorded runs stay, so the history keeps its meaning.
    Host.objects.filter(name__in=[h.name for h in gone], runs_out=None, runs_in=None).delete()


def _down_host(h: LabHost) -> None:
    """Stop one host's engine, sshd and every process in its namespace, and remove its files."""
    if _alive(h.dockerd_pid) and _docker_ok(h):
        ids = _docker(h, "ps", "-aq", check=False).stdout.split()
        if ids:
            _docker(h, "rm", "-f", *ids, check=False, timeout=60)
    for pidfile in (h.dockerd_pid, h.sshd_pid):
        pid = _alive(pidfile)
        if pid:
            os.kill(pid, 15)
            # By the PID, not the file: dockerd removes its pidfile before it has exited.
            _wait(lambda: not pid_running(pid), f"{h.name}: {pidfile} process {pid} did not stop", 30)
    # Processes started or restored inside the host's namespace.
    _kill_netns_processes(h)
    # Engine leftovers (overlay mounts, netns files) can stay mounted, and so
    # can a run's tmpfs under the work directory when a fault test cut the
    # run off from its cleanup: rmtree cannot remove a mount point, and the
    # lab's root stayed behind (seen: empty criuweb-run tmpfs mounts).
    _umount_below(h.data_root)
    _umount_below(h.run_dir)
    _umount_below(h.root)
    if Path(f"/run/netns/{h.netns}").exists():
        sh("ip", "netns", "del", h.netns, check=False)
    sh("ip", "link", "del", h.veth, check=False)
    shutil.rmtree(h.run_dir, ignore_errors=True)
    shutil.rmtree(h.root, ignore_errors=True)


def _umount_below(path):
    prefix = str(path)
    points = [
        line.split()[4]
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == prefix or line.split()[4].startswith(prefix + "/")
    ]
    # Deepest first, lazily: a busy leftover must not stop the rest.
    for point in sorted(points, key=len, reverse=True):
        sh("umount", "-l", point, check=False)


def _kill_netns_processes(h):
    if not Path(f"/run/netns/{h.netns}").exists():
        return
    pids = [int(pid) for pid in sh("ip", "netns", "pids", h.netns, check=False).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    # A killed process takes a moment to go; `down` is over once they are gone.
    _wait(lambda: not any(pid_running(pid) for pid in pids), f"{h.name}: processes {pids} did not stop", 30)
