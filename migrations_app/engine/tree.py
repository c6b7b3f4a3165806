"""What pre-flight reads of a workload's process tree on its host, before
anything is frozen: its processes, their namespaces, and their sockets.

One SSH command (a small python3 script: hosts need python3 anyway) walks
the tree from its root through /proc/PID/task/*/children, maps every fd
that is a socket to its line in /proc/PID/net/{tcp,tcp6,udp,udp6} — read
through the root's /proc entry, so the tables are those of the tree's own
network namespace (a container's, not the host's) — and says which
processes CRIU must never be pointed at.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import dataclass, field

from ..criu import CriuError
from .errors import MigrationError

# The kernel's PF_KTHREAD task flag (include/linux/sched.h).
PF_KTHREAD = 0x00200000

# argv: root PID, the host's SSH port. Prints one JSON object.
TREE_SCRIPT = r"""
import json, os, sys
root, ssh_port = int(sys.argv[1]), int(sys.argv[2])
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING"}

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None

def link(path):
    try:
        return os.readlink(path)
    except OSError:
        return ""

def addr(hexaddr, v6):
    ip, port = hexaddr.split(":")
    raw = bytes.fromhex(ip)
    if v6:
        # Four 32-bit words, each in host (little-endian) order.
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        import ipaddress
        return str(ipaddress.IPv6Address(raw)), int(port, 16)
    return ".".join(str(b) for b in raw[::-1]), int(port, 16)

def ghost(target):
    # A deleted file CRIU carries in its images; shared memory (memfd,
    # System V, /dev/zero) and AIO rings show as deleted too: CRIU dumps
    # those itself. Anonymous huge pages as well, checked on their own
    # ("hugetlb" below).
    return (target.startswith("/") and target.endswith(" (deleted)")
            and not target.startswith(("/memfd:", "/SYSV", "/dev/zero ", "/anon_hugepage ", "/[aio] ")))

procs, todo, seen = [], [root], set()
while todo:
    pid = todo.pop()
    if pid in seen:
        continue
    seen.add(pid)
    stat = read("/proc/%d/stat" % pid)
    if stat is None:
        continue
    rest = stat.rsplit(")", 1)[1].split()
    comm = stat[stat.index("(") + 1:stat.rindex(")")]
    ids = {}
    for line in (read("/proc/%d/status" % pid) or "").splitlines():
        if line.startswith(("Uid:", "Gid:")):
            ids[line[:3].lower()] = sorted(set(int(x) for x in line.split()[1:]))
        elif line.startswith("CapEff:"):
            ids["capeff"] = line.split()[1]
    cmdline = (read("/proc/%d/cmdline" % pid) or "").replace("\0", " ").strip()
    socks = []
    try:
        fds = os.listdir("/proc/%d/fd" % pid)
    except OSError:
        fds = []
    paths = set()
    # What CRIU refuses only once the tree is frozen: file locks, deleted
    # files over its ghost limit, a terminal whose master is elsewhere.
    locks, ghosts, ptys, ptmx, ttys, pipes = [], {}, set(), set(), set(), set()
    signalfd = False
    for fd in fds:
        target = link("/proc/%d/fd/%s" % (pid, fd))
        signalfd = signalfd or target == "anon_inode:[signalfd]"
        if target.startswith("socket:["):
            socks.append(int(target[8:-1]))
        elif target.startswith("pipe:["):
            pipes.add(int(target[6:-1]))
        elif target.startswith("/") and not target.endswith(" (deleted)"):
            paths.add(target)
        if ghost(target):
            try:
                ghosts[target[:-10]] = os.stat("/proc/%d/fd/%s" % (pid, fd)).st_size
            except OSError:
                pass
        if target.startswith("/dev/pts/") and target[9:].isdigit():
            ptys.add(int(target[9:]))
        if target.startswith(("/dev/pts/", "/dev/ptmx", "/dev/tty", "/dev/console")):
            ttys.add(target)
        for line in (read("/proc/%d/fdinfo/%s" % (pid, fd)) or "").splitlines():
            f = line.split()
            if f[:1] == ["lock:"] and len(f) >= 5:
                locks.append({"path": target, "kind": " ".join(f[2:5])})
            elif f[:1] == ["tty-index:"] and len(f) == 2 and f[1].isdigit():
                ptmx.add(int(f[1]))
    for name in ("cwd", "exe"):
        target = link("/proc/%d/%s" % (pid, name))
        if target.startswith("/") and not target.endswith(" (deleted)"):
            paths.add(target)
    hugetlb = False
    for line in (read("/proc/%d/maps" % pid) or "").splitlines():
        f = line.split(None, 5)
        if len(f) == 6 and f[5].startswith("/anon_hugepage"):
            hugetlb = True
        if len(f) == 6 and f[5].startswith("/") and not f[5].endswith(" (deleted)"):
            paths.add(f[5])
        elif len(f) == 6 and ghost(f[5]) and f[5][:-10] not in ghosts:
            try:
                ghosts[f[5][:-10]] = os.stat("/proc/%d/map_files/%s" % (pid, f[0])).st_size
            except OSError:
                pass
    ns = {n: link("/proc/%d/ns/%s" % (pid, n)) for n in ("pid", "net", "mnt", "user")}
    if "" in ns.values():
        # A zombie, or a process that ended while we read it (a shell
        # loop's short-lived child): its namespaces are gone, and empty
        # links must not read as namespaces of its own. CRIU dumps a zombie
        # as such; there is nothing else in it to check.
        continue
    procs.append({
        "pid": pid, "ppid": int(rest[1]), "sid": int(rest[3]), "state": rest[0], "flags": int(rest[6]), "comm": comm,
        "ctty": int(rest[4]), "ttys": sorted(ttys), "pipes": sorted(pipes),
        "exe": link("/proc/%d/exe" % pid), "cmdline": cmdline[:300],
        "uids": ids.get("uid", []), "gids": ids.get("gid", []), "capeff": ids.get("capeff", ""),
        "ns": ns,
        "sockets": socks,
        "paths": sorted(paths),
        "locks": locks, "ghosts": ghosts, "ptys": sorted(ptys), "ptmx": sorted(ptmx), "signalfd": signalfd,
        "hugetlb": hugetlb,
    })
    try:
        tasks = os.listdir("/proc/%d/task" % pid)
    except OSError:
        tasks = []
    for t in tasks:
        todo.extend(int(c) for c in (read("/proc/%d/task/%s/children" % (pid, t)) or "").split())

table = {}
for proto in ("tcp", "tcp6", "udp", "udp6"):
    for line in (read("/proc/%d/net/%s" % (root, proto)) or "").splitlines()[1:]:
        f = line.split()
        if len(f) < 10:
            continue
        local, remote = addr(f[1], proto.endswith("6")), addr(f[2], proto.endswith("6"))
        state = int(f[3], 16)
        if proto.startswith("tcp"):
            state = TCP_STATES.get(state, str(state))
        else:
            state = "UNCONN" if state == 7 else "CONNECTED"
        table[int(f[9])] = {"proto": proto, "local": local, "remote": remote, "state": state}

# Unix sockets connected to a peer outside the tree: CRIU refuses to dump
# them ("External socket is used"), only after the tree was frozen. The
# peers come from sock_diag (ss), in the tree's network namespace; without
# ss nothing is known and nothing refused here.
unix_names, unix_peers = {}, {}
try:
    import subprocess
    ss = subprocess.run(["nsenter", "--net=/proc/%d/ns/net" % root, "ss", "-xanH"],
                        capture_output=True, text=True, timeout=30).stdout
except (OSError, subprocess.SubprocessError):
    ss = ""
for line in ss.splitlines():
    f = line.split()
    # Netid State Recv-Q Send-Q Local-Address Inode Peer-Address Peer-Inode;
    # a local path may hold spaces, so the inodes are counted from the end.
    if len(f) < 8 or not (f[-1].isdigit() and f[-3].isdigit()):
        continue
    ino, peer = int(f[-3]), int(f[-1])
    unix_names[ino] = " ".join(f[4:-3])
    if peer:
        unix_peers[ino] = peer
held = {ino for p in procs for ino in p["sockets"]}
external_unix = []
for p in procs:
    for ino in p["sockets"]:
        peer = unix_peers.get(ino)
        if peer and peer not in held:
            external_unix.append({"pid": p["pid"], "inode": ino, "peer": peer,
                                  "peer_name": unix_names.get(peer, "*")})

# Pipes the tree shares with a process outside it (a pipeline's other
# member): CRIU dumps only the tree's end, and the restored copy's pipe has
# no other end (a reader sees end of file, a writer SIGPIPE): a pipeline's
# member, or a session leader piped into a logger (`setsid server | tee log`).
external_pipes = []
tree_pipes = {ino for p in procs for ino in p["pipes"]}
if procs and tree_pipes:
    for other in os.listdir("/proc"):
        if not other.isdigit() or int(other) in seen or int(other) == os.getpid():
            continue
        # A child the tree started since it was walked (a loop's sleep) inherits its pipes: it is of the tree.
        stat = read("/proc/%s/stat" % other)
        if stat is None or int(stat.rsplit(")", 1)[1].split()[1]) in seen:
            continue
        try:
            fds = os.listdir("/proc/%s/fd" % other)
        except OSError:
            continue
        for fd in fds:
            target = link("/proc/%s/fd/%s" % (other, fd))
            if target.startswith("pipe:[") and int(target[6:-1]) in tree_pipes:
                comm = (read("/proc/%s/comm" % other) or "").strip()
                external_pipes.append({"inode": int(target[6:-1]), "peer": int(other), "peer_comm": comm})
                break

sockets = []
for p in procs:
    for ino in p.pop("sockets"):
        if ino in table:
            sockets.append(dict(table[ino], pid=p["pid"], inode=ino))
print(json.dumps({
    "procs": procs,
    "sockets": sockets,
    "external_unix": external_unix,
    "external_pipes": external_pipes,
    "session_pid": os.getpid(),
    "session_ns": {n: link("/proc/self/ns/%s" % n) for n in ("pid", "net", "mnt")},
    "boot_id": (read("/proc/sys/kernel/random/boot_id") or "").strip(),
    "cap_eff": int(next((l.split()[1] for l in (read("/proc/self/status") or "").splitlines()
                         if l.startswith("CapEff:")), "0"), 16),
    "ssh_port": ssh_port,
}))
"""

# Programs that run the host (or criuweb) itself: moving one, or a tree
# holding one, would take the host's own services away.
HOST_DAEMONS = ("sshd", "dockerd", "containerd", "runc", "criu", "systemd", "init", "docker-proxy", "tini")


@dataclass
class Socket:
    proto: str
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str
    pid: int
    inode: int

    @property
    def listening(self) -> bool:
        return self.state == "LISTEN" or (self.proto.startswith("udp") and self.remote[1] == 0)

    @property
    def connected_tcp(self) -> bool:
        return self.proto.startswith("tcp") and self.state not in ("LISTEN", "CLOSE")

    def describe(self) -> str:
        local = f"{_host(self.local[0])}:{self.local[1]}"
        if self.listening:
            return f"{self.proto} {local} listening (PID {self.pid})"
        return f"{self.proto} {local} -> {_host(self.remote[0])}:{self.remote[1]} {self.state} (PID {self.pid})"


@dataclass
class Tree:
    procs: list[dict]
    sockets: list[Socket]
    session_pid: int
    session_ns: dict
    boot_id: str
    ssh_port: int
    cap_eff: int = 0  # the SSH session's effective capabilities: what CRIU will have
    root_ns: dict = field(default_factory=dict)
    # Unix sockets of the tree whose peer is outside it: {pid, inode, peer, peer_name}.
    external_unix: list[dict] = field(default_factory=list)
    # Pipes of the tree a process outside it holds too: {inode, peer, peer_comm}.
    external_pipes: list[dict] = field(default_factory=list)

    @property
    def pids(self) -> set[int]:
        return {p["pid"] for p in self.procs}

    def paths(self) -> list[str]:
        """Files and directories the tree holds open, maps, runs or works in: CRIU reopens them by path."""
        return sorted({path for p in self.procs for path in p.get("paths", [])})

    def listening(self) -> list[Socket]:
        return [s for s in self.sockets if s.listening]

    def connected(self) -> list[Socket]:
        return [s for s in self.sockets if s.connected_tcp]

    def summary(self) -> str:
        if not self.sockets:
            return "no TCP/UDP sockets"
        return "; ".join(s.describe() for s in self.sockets[:8]) + (
            f"; and {len(self.sockets) - 8} more" if len(self.sockets) > 8 else ""
        )


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def read_tree(conn, pid: int, ssh_port: int) -> Tree:
    """The tree rooted at pid on the host of conn (an ssh.Connection)."""
    result = conn.run(["python3", "-c", TREE_SCRIPT, str(pid), str(ssh_port)], check=False)
    if result.rc != 0:
        raise MigrationError(f"{conn.name}: cannot read the process tree of PID {pid}: {result.stderr.strip()[-300:]}")
    data = json.loads(result.stdout)
    if not data["procs"]:
        raise CriuError(f"{conn.name}: no process with PID {pid}")
    sockets = [
        Socket(s["proto"], tuple(s["local"]), tuple(s["remote"]), s["state"], s["pid"], s["inode"])
        for s in data.pop("sockets")
    ]
    tree = Tree(sockets=sockets, **data)
    tree.root_ns = tree.procs[0]["ns"]
    return tree


def _exe_name(proc: dict) -> str:
    return os.path.basename(proc["exe"].removesuffix(" (deleted)"))


# capability(7) numbers.
CAP_SYS_RESOURCE = 24

# The most of a deleted file CRIU copies into its images by default
# (DEFAULT_GHOST_LIMIT in criu/include/cr_options.h); over it the dump fails
# "Can't dump ghost file ... increase limit", with the tree already frozen.
GHOST_LIMIT = 1 << 20


def refusals(
    tree: Tree,
    host_name: str,
    controller_pids: set[int] | None = None,
    host_daemons: bool = True,
    own_namespaces: bool = False,
    terminals: bool = True,
    whole_session: bool = True,
) -> list[str]:
    """Why CRIU must not be pointed at this tree; empty when nothing forbids it.

    controller_pids: criuweb's own process and its ancestors, when the host
    is the machine criuweb runs on (same boot and PID namespace).
    host_daemons: refuse programs that run the host (sshd, dockerd, ...);
    off for a container, whose sshd is its own.
    own_namespaces: the tree lives in namespaces of its own by design (a
    container, or a tree criuweb restored under its holder); otherwise a
    tree outside the host's mount namespace is refused, as CRIU would dump
    it against the host's mounts.
    terminals: refuse a terminal whose master is outside the tree; off for
    a container, whose console the runtime hands over.
    whole_session: refuse a root that does not lead its session when it
    cannot move as a shell job (see shell_job()); off for a container,
    whose runtime starts it.
    """
    why = []
    if whole_session and shell_job(tree):
        why += _shell_job_refusals(tree)
    elif whole_session and tree.external_pipes:
        # A session leader whose pipe's other end is outside the tree
        # (`setsid server | tee log`): after the dump the restored copy's
        # first write gets SIGPIPE, and a rollback restores the same broken
        # pipe on the source, so the workload would be lost on both hosts.
        peers = {pipe["peer"]: pipe["peer_comm"] for pipe in tree.external_pipes}
        shown = ", ".join(f"{pid} ({comm})" for pid, comm in sorted(peers.items())[:4])
        why.append(
            f"PID {tree.procs[0]['pid']}'s tree shares a pipe with PID {shown} outside it: CRIU would move only "
            "the tree's end, and on the target the pipe would have no other end (a write kills the writer, a "
            "read ends): start the program with its output in a file (CMD >LOG 2>&1), or move the tree that "
            "holds both ends"
        )
    if not own_namespaces and tree.root_ns.get("mnt") != tree.session_ns.get("mnt"):
        why.append(
            f"PID {tree.procs[0]['pid']} lives in a mount namespace of its own (unshare -m?): CRIU cannot dump "
            "it as a host process"
        )
    if not tree.cap_eff & (1 << CAP_SYS_RESOURCE):
        others = sorted({i for p in tree.procs for i in p.get("uids", []) + p.get("gids", []) if i != 0})
        if others:
            # CRIU reads every task's resource limits with prlimit(), which
            # for a task of another user needs CAP_SYS_RESOURCE; without it
            # the dump fails ("Can't get rlimit 0: Operation not permitted").
            why.append(
                f"it runs as user/group {', '.join(map(str, others[:4]))}, not root, and root on {host_name} "
                "lacks CAP_SYS_RESOURCE, which CRIU needs to read another user's resource limits"
            )
    for p in tree.procs:
        name = _exe_name(p)
        what = f"PID {p['pid']} ({p['comm']})"
        if p["flags"] & PF_KTHREAD or p["pid"] == 2 or p["ppid"] == 2 and not p["exe"]:
            why.append(f"{what} is a kernel thread")
        elif p["pid"] == 1 and p["ns"]["pid"] == tree.session_ns.get("pid"):
            why.append(f"{what} is the host's init")
        elif host_daemons and (name in HOST_DAEMONS or name.startswith(("containerd", "systemd-", "dockerd"))):
            why.append(f"{what} is the host's own {name}")
        elif host_daemons and "criuweb.wsgi" in p["cmdline"]:
            why.append(f"{what} is criuweb's own web server")
        if p["pid"] == tree.session_pid:
            why.append(f"the tree holds the SSH session criuweb works through ({what})")
        if controller_pids and p["pid"] in controller_pids:
            why.append(f"{what} is criuweb's own process (or one it runs under)")
        for ns in ("pid", "mnt", "net"):
            if p["ns"][ns] != tree.root_ns[ns]:
                why.append(f"{what} is in a {ns} namespace of its own, nested in the tree: CRIU cannot dump that")
                break
    why += _unmovable_files(tree, terminals)
    for u in tree.external_unix:
        peer = "an unnamed socket" if u["peer_name"] in ("", "*") else u["peer_name"]
        why.append(
            f"PID {u['pid']} holds a unix socket connected to {peer} outside the tree (peer inode {u['peer']}): "
            "CRIU cannot dump half of a connection"
        )
    for s in tree.listening():
        if s.proto.startswith("tcp") and s.local[1] == tree.ssh_port:
            why.append(f"the tree listens on the host's SSH port {tree.ssh_port} ({s.describe()}): an SSH server")
    # One line per cause is enough to act on; PID 2's tree (every kernel
    # thread) gave one per thread, a message of 70 lines.
    why = list(dict.fromkeys(why))
    if len(why) > REFUSALS_SHOWN:
        why = [*why[:REFUSALS_SHOWN], f"and {len(why) - REFUSALS_SHOWN} more like these"]
    return why


REFUSALS_SHOWN = 5


def shell_job(tree: Tree) -> bool:
    """Whether the tree's root does not lead its session: CRIU dumps and restores it only with --shell-job.

    A shell's background job (`server > log 2>&1 &`) is one: its shell
    leads the session. Restored with --shell-job, the root joins the
    restoring CRIU's session: the namespace holder's, a session of its own
    without a terminal, which the SSH connection that started it does not
    end.
    """
    root = tree.procs[0]
    return root.get("sid", root["pid"]) not in (root["pid"], 0)


def _shell_job_refusals(tree: Tree) -> list[str]:
    """Why a root that does not lead its session cannot move as a shell job; empty when it can."""
    root = tree.procs[0]
    terminals = sorted(
        {t for p in tree.procs for t in p.get("ttys", [])}
        | {f"the controlling terminal of PID {p['pid']}" for p in tree.procs if p.get("ctty")}
    )
    if terminals:
        # criu/pstree.c dump_pstree(): "The root process ... is not a session
        # leader"; with --shell-job a terminal must exist on the target, and a
        # terminal of the source's session cannot.
        shown = ", ".join(terminals[:3]) + (" ..." if len(terminals) > 3 else "")
        return [
            f"PID {root['pid']} does not lead its session: PID {root['sid']}, outside the tree (the shell or "
            f"pipeline that started it), does, and CRIU dumps only a whole session: move PID {root['sid']}'s "
            f"tree, or start the program in a session of its own (setsid) (the tree has a terminal: {shown}, "
            "which CRIU cannot take along as a shell job's)"
        ]
    peers: dict[int, str] = {}
    for pipe in tree.external_pipes:
        peers[pipe["peer"]] = pipe["peer_comm"]
    if peers:
        shown = ", ".join(f"{pid} ({comm})" for pid, comm in sorted(peers.items())[:4])
        return [
            f"PID {root['pid']} shares a pipe with PID {shown} outside the tree (a pipeline of the shell "
            f"{root['sid']} that leads its session): CRIU would move only the tree's end, and the other end "
            f"would be gone on the target: move PID {root['sid']}'s tree, the whole pipeline"
        ]
    return []


def _pids(pids: list[str], verb: str) -> str:
    """'PID 1 (sh) holds' or 'PIDs 1 (sh), 2 (sleep) hold': the subject of a refusal, with its verb."""
    if len(pids) == 1:
        return f"PID {pids[0]} {verb}"
    plural = "have" if verb == "has" else verb.removesuffix("s")
    return f"PIDs {', '.join(pids[:4])}{' ...' if len(pids) > 4 else ''} {plural}"


def _unmovable_files(tree: Tree, terminals: bool) -> list[str]:
    """What the tree holds open that CRIU would refuse only once it is frozen: one line per file or terminal."""
    locks: dict[tuple[str, str], list[str]] = {}
    ghosts: dict[str, tuple[int, list[str]]] = {}
    ptys: dict[int, list[str]] = {}
    masters = {i for p in tree.procs for i in p.get("ptmx", [])}
    for p in tree.procs:
        who = f"{p['pid']} ({p['comm']})"
        for lock in p.get("locks", []):
            locks.setdefault((lock["path"], lock["kind"]), []).append(who)
        for path, size in p.get("ghosts", {}).items():
            if size > GHOST_LIMIT:
                ghosts.setdefault(path, (size, []))[1].append(who)
        for index in p.get("ptys", []) if terminals else []:
            if index not in masters:
                ptys.setdefault(index, []).append(who)
    # script(1) (util-linux's pty proxy, which su/runuser --pty share; only
    # script was tried): a terminal's master for its command, and a
    # signalfd for its signals.
    # Restored by CRIU it kills its command at once (kill(child, SIGTERM),
    # two seconds, SIGKILL: strace of the restored copy), on the target and
    # on a rollback to the source alike, so the command would be lost.
    proxies = [f"{p['pid']} ({p['comm']})" for p in tree.procs if p.get("ptmx") and p.get("signalfd")]
    why = []
    # Anonymous huge pages (MAP_HUGETLB): CRIU tells them from a deleted
    # file only by the device of a huge page it maps itself when it probes
    # the kernel (criu/kerndat.c), and it caches that probe in /run/criu.kdat
    # until the next boot. Probed when no huge page was free (no pool, or all
    # of it in use: the usual case), it knows no such device and fails the
    # dump with the tree frozen ("Can't lookup mount=N for fd=-3
    # path=/anon_hugepage (deleted)"), seen in make test on a lab whose cache
    # was written with an empty pool; the pre-flight cannot read that cache.
    huge = [f"{p['pid']} ({p['comm']})" for p in tree.procs if p.get("hugetlb")]
    if huge:
        why.append(
            f"{_pids(huge, 'maps')} anonymous huge pages (MAP_HUGETLB): CRIU recognises them only if it found a "
            "free huge page when it last probed the kernel, and otherwise fails the dump once the tree is "
            "frozen: run the program without MAP_HUGETLB (transparent huge pages move), or restart it on the target"
        )
    if proxies:
        why.append(
            f"{_pids(proxies, 'runs')} a terminal for its command and watches it through a signalfd, as script(1) "
            "does: restored by CRIU it kills its command right away (SIGTERM, then SIGKILL), on the "
            "target as on the source, so the command would be lost: start the command without it "
            "(setsid CMD </dev/null >LOG 2>&1)"
        )
    why += [
        f"{_pids(pids, 'holds')} a file lock on {path} ({kind}): CRIU moves no file locks unless told to, and would "
        "refuse them once the tree is frozen (release the lock or stop the program first)"
        for (path, kind), pids in locks.items()
    ]
    why += [
        f"{_pids(pids, 'holds')} {path}, deleted since it was opened, of {size / 2**20:.1f} MiB: CRIU carries a "
        f"deleted file in its images only up to {GHOST_LIMIT // 2**20} MiB, and would refuse this one once the "
        "tree is frozen"
        for path, (size, pids) in ghosts.items()
    ]
    why += [
        f"{_pids(pids, 'has')} the terminal /dev/pts/{index} open, whose other end (a terminal window, tmux, screen "
        "or sshd) is outside the tree: CRIU cannot dump half of a terminal: start it without one "
        "(setsid CMD </dev/null >LOG 2>&1), or move the tree that holds the terminal"
        for index, pids in ptys.items()
    ]
    return why


def local_identity() -> tuple[str, str]:
    """This machine's boot id and PID namespace, to tell whether a host is this machine."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot = f.read().strip()
    return boot, os.readlink("/proc/self/ns/pid")


def controller_pids(tree: Tree) -> set[int]:
    """criuweb's own PID and its ancestors' when the tree's host is this very machine, else nothing."""
    boot, pidns = local_identity()
    if tree.boot_id != boot or tree.session_ns.get("pid") != pidns:
        return set()
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            break
    return pids


# -- paths ------------------------------------------------------------------------

# Prints, one per line, which of the paths given (argv) do not exist here.
MISSING_PATHS_SCRIPT = r"""
import os, sys
for path in sys.argv[1:]:
    if not os.path.lexists(path):
        print(path)
"""


def missing_paths(conn, paths: list[str]) -> list[str]:
    """Which of these paths a host lacks (one SSH command)."""
    if not paths:
        return []
    result = conn.run(["python3", "-c", MISSING_PATHS_SCRIPT, *paths], check=False)
    if result.rc != 0:
        raise MigrationError(f"{conn.name}: cannot check the paths the process holds: {result.stderr[-300:]}")
    return result.stdout.splitlines()


# -- addresses ------------------------------------------------------------------

ADDRESSES_SCRIPT = r"""
import json, socket, subprocess
out = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True).stdout
print(json.dumps([line.split()[3].split("/")[0] for line in out.splitlines() if len(line.split()) > 3]))
"""


def addresses(conn) -> set[str]:
    """The IP addresses a host (its SSH session's network namespace) has."""
    result = conn.run(["python3", "-c", ADDRESSES_SCRIPT], check=False)
    try:
        return set(json.loads(result.stdout))
    except ValueError:
        raise MigrationError(f"{conn.name}: cannot list its IP addresses (`ip -o addr`)") from None


def bindable(ip: str, target_addresses: set[str]) -> bool:
    """Whether a socket bound to ip can be bound again on a host with these addresses."""
    a = ipaddress.ip_address(ip)
    if a.is_unspecified or a.is_loopback:
        return True
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        return bindable(str(a.ipv4_mapped), target_addresses)
    return ip in target_addresses
