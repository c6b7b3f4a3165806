"""CRIU on a host: feature checks, dump and restore of process trees, and
reading CRIU's own statistics.

Commands run over an ssh.Connection; argv lists only, never shell strings
built from values.
"""

import json
import re
import shlex
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple


class CriuError(Exception):
    """A CRIU step failed; the message names the host, the step and the log.

    definitive: CRIU itself reported the failure, so nothing of the step
    runs on.
    """

    def __init__(self, message, log_excerpt="", definitive=True):
        super().__init__(message)
        self.log_excerpt = log_excerpt
        # False when the outcome is unknown (no status came back).
        self.definitive = definitive


# CRIU image magics (criu/include/magic.h): every image starts with the
# service magic, then its own.
IMG_SERVICE_MAGIC = 0x55105940
STATS_MAGIC = 0x57093306

# stats.proto: StatsEntry{dump=1, restore=2}; both messages hold only
# integer fields, so a varint reader is all the protobuf we need.
DUMP_STATS_FIELDS = {
    1: "freezing_time",
    2: "frozen_time",
    3: "memdump_time",
    4: "memwrite_time",
    5: "pages_scanned",
    6: "pages_skipped_parent",
    7: "pages_written",
    8: "irmap_resolve",
    9: "pages_lazy",
    10: "page_pipes",
    11: "page_pipe_bufs",
    12: "shpages_scanned",
    13: "shpages_skipped_parent",
    14: "shpages_written",
}
RESTORE_STATS_FIELDS = {
    1: "pages_compared",
    2: "pages_skipped_cow",
    3: "forking_time",
    4: "restore_time",
    5: "pages_restored",
}

# What every dump and restore is given. -v4 keeps the log useful when a
# step fails; the log lands beside the images (-D) as -o names it.
# --skip-in-flight: a server that clients reach during the freeze holds
# connections its kernel accepted but it has not (in its accept queue);
# CRIU refuses to dump those ("In-flight connection") unless told to drop
# them, and a client whose handshake is dropped connects again.
DUMP_OPTIONS = ["-v4", "-o", "dump.log", "--skip-in-flight"]
RESTORE_OPTIONS = ["-v4", "-o", "restore.log", "--restore-detached"]
FEATURES = ["mem_dirty_track", "uffd-noncoop"]


def _varint(data, pos):
    result = shift = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(data):
    """Yield (field number, wire type, value) of a protobuf message."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            value = data[pos : pos + length]
            if len(value) != length:
                raise ValueError("truncated field")
            pos += length
        elif wire == 5:
            value = data[pos : pos + 4]
            pos += 4
        elif wire == 1:
            value = data[pos : pos + 8]
            pos += 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        yield number, wire, value


def decode_stats(raw):
    """Decode a stats-dump or stats-restore image into a dict of named integers.

    Times are in microseconds, as CRIU records them.
    """
    if raw is None or len(raw) < 12:
        raise ValueError("stats image too short")
    service, magic, size = struct.unpack_from("<III", raw, 0)
    if service != IMG_SERVICE_MAGIC or magic != STATS_MAGIC:
        raise ValueError(f"not a CRIU stats image (magic {service:#x} {magic:#x})")
    body = raw[12 : 12 + size]
    if len(body) != size:
        raise ValueError("stats image truncated")
    stats = {}
    for number, wire, value in _fields(body):
        names = {1: DUMP_STATS_FIELDS, 2: RESTORE_STATS_FIELDS}.get(number)
        if names is None or wire != 2:
            continue
        for sub, sub_wire, sub_value in _fields(value):
            if sub_wire == 0 and sub in names:
                stats[names[sub]] = sub_value
    return stats


def log_excerpt(text, lines=25):
    """The lines of a CRIU log worth showing: errors and the lines before the last one."""
    if not text:
        return ""
    all_lines = text.splitlines()
    errors = [i for i, line in enumerate(all_lines) if _is_error(line)]
    if not errors:
        return "\n".join(all_lines[-lines:])
    last = errors[-1]
    start = max(0, errors[0] - 5)
    picked = all_lines[start : last + 3]
    return "\n".join(picked[-lines:])


def _is_error(line):
    # Every run on these kernels logs a harmless RLIMIT_NOFILE error.
    return "Error" in line and "RLIMIT_NOFILE" not in line


def first_error(excerpt):
    for line in excerpt.splitlines():
        if _is_error(line):
            return re.sub(r"^\(\s*[\d.]+\)\s*", "", line).strip()
    return ""


# -- host facts ---------------------------------------------------------------


# The self-test program (see criu_selftest.py), sent as `python3 -c SOURCE`:
# hosts need nothing of criuweb installed.
SELFTEST_SOURCE = (Path(__file__).parent / "criu_selftest.py").read_text()

# The probe's self-tests, by the name a plan lists in its needs (see
# Host.passes): "sockets" is a process holding a listening TCP socket moved
# with images on disk; the others move a socketless process the way that
# strategy moves memory.
SELF_TESTS = {
    "sockets": ["--mode=local"],
    "page-server": ["--mode=page-server", "--no-socket"],
    "lazy": ["--mode=lazy", "--no-socket"],
}

# $1: the self-test's source; $2: how many self-tests follow, each as a
# name and its options (constant words); then the features to check. The
# self-tests run only when criu check passes: pointless otherwise.
PROBE_SCRIPT = r"""
selftest=$1; n=$2; shift 2
tests=""
while [ "$n" -gt 0 ]; do tests="$tests$1
"; shift; n=$((n-1)); done
v=$(criu --version 2>&1) || { echo "installed 0"; echo ---; echo "$v"; exit 0; }
echo "installed 1"
echo "version $(echo "$v" | awk '/Version:/ {print $2}')"
out=$(criu check 2>&1); rc=$?; echo "check $rc"
for f in "$@"; do criu check --feature "$f" >/dev/null 2>&1; echo "feature $f $?"; done
if [ "$rc" = 0 ]; then
    echo "$tests" | while read -r name options; do
        [ -n "$name" ] || continue
        # $options unquoted on purpose: constant option words from criu.py.
        echo "selftest $name $(python3 -c "$selftest" $options 2>&1 </dev/null | tail -n 1)"
    done
fi
echo ---
echo "$out"
"""


def probe(conn, full: bool = True):
    """CRIU version, `criu check` verdict, strategy features and self-tests on a host.

    One SSH command: each one costs a round trip and a remote shell.
    full=False checks only the version and `criu check`: a run's pre-flight
    needs no more, and the self-tests take seconds per host (the host probe
    stores their results, which the form and the plans' needs read).
    sockets_ok says whether CRIU dumped and restored a process holding a
    listening TCP socket there; sockets_error is CRIU's error line if not.
    self_tests: {name: {"ok", "error"}} for each of SELF_TESTS.
    """
    tests = [f"{name} {' '.join(options)}" for name, options in SELF_TESTS.items()] if full else []
    features = FEATURES if full else []
    # Without self-tests, the source is not sent: it is most of the command.
    source = SELFTEST_SOURCE if full else ""
    out = conn.sh(PROBE_SCRIPT, source, str(len(tests)), *tests, *features, timeout=300).stdout
    head, _, check_output = out.partition("---\n")
    not_tried = {"ok": False, "error": "not tried: criu check fails" if full else "not tried"}
    facts = {
        "features": {},
        "version": None,
        "check_ok": False,
        "check_output": check_output.strip()[-2000:],
        "self_tests": {name: dict(not_tried) for name in SELF_TESTS},
    }
    for line in head.splitlines():
        key, *rest = line.split(maxsplit=1)
        if key == "selftest":
            name, _, report = rest[0].partition(" ") if rest else ("", "", "")
            if name in SELF_TESTS:
                result = parse_self_test(report)
                facts["self_tests"][name] = {"ok": result.ok, "error": result.error}
            continue
        rest = rest[0].split() if rest else []
        if key == "installed":
            facts["installed"] = rest == ["1"]
        elif key == "version":
            facts["version"] = rest[0] if rest else None
        elif key == "check":
            facts["check_ok"] = rest == ["0"]
        elif key == "feature":
            facts["features"][rest[0]] = rest[1] == "0"
    sockets = facts["self_tests"]["sockets"]
    facts["sockets_ok"], facts["sockets_error"] = sockets["ok"], sockets["error"]
    return facts


class SelfTest(NamedTuple):
    """The outcome of a CRIU self-test on a host: error is CRIU's own line."""

    ok: bool
    error: str


def parse_self_test(line: str) -> SelfTest:
    try:
        result = json.loads(line)
        return SelfTest(bool(result["ok"]), "" if result["ok"] else f"{result['stage']}: {result['error']}")
    except (ValueError, KeyError, TypeError):
        # Not the program's JSON: python3 missing, or it crashed.
        return SelfTest(False, f"self-test did not run: {line.strip()[-300:] or 'no output'}")


def self_test(
    conn,
    extra_dump_args: Sequence[str] = (),
    extra_restore_args: Sequence[str] = (),
    with_socket: bool = True,
    mode: str = "local",
    timeout: int = 150,
) -> SelfTest:
    """Dump and restore on the host a tiny process the test starts itself.

    One SSH command. A strategy tests its own CRIU options with
    extra_dump_args / extra_restore_args on the same process; with_socket
    gives that process a listening TCP socket on 127.0.0.1, answered after
    the restore. mode: how the pages travel, "local" (images on disk),
    "page-server" (through `criu page-server`) or "lazy" (post-copy with
    `criu lazy-pages`), each on 127.0.0.1 of the host.
    """
    argv = ["python3", "-c", SELFTEST_SOURCE, f"--mode={mode}"]
    # "--opt=VALUE": argparse would take a bare "--lazy-pages" for its own option.
    argv += [f"--dump-arg={a}" for a in extra_dump_args]
    argv += [f"--restore-arg={a}" for a in extra_restore_args]
    if not with_socket:
        argv.append("--no-socket")
    result = conn.run(argv, check=False, timeout=timeout)
    lines = result.stdout.strip().splitlines() or result.stderr.strip().splitlines() or [""]
    return parse_self_test(lines[-1])


# -- process trees ------------------------------------------------------------

# Print the tree root to dump for a PID: the PID itself when it lives in the
# SSH session's PID namespace, else the PID inside its own namespace (a tree
# we restored earlier lives in one), with "ns" to say so.
RESOLVE_SCRIPT = r"""
pid=$1
[ -d "/proc/$pid" ] || { echo "no process $pid" >&2; exit 3; }
[ "$pid" != "$$" ] || exit 3
mine=$(readlink /proc/self/ns/pid)
theirs=$(readlink "/proc/$pid/ns/pid") || exit 3
nspid=$(awk '/^NSpid:/ {print $NF}' "/proc/$pid/status")
state=$(awk '/^State:/ {print $2}' "/proc/$pid/status")
# /proc/TID exists for every thread too; CRIU meets a BUG on one, after the freeze.
tgid=$(awk '/^Tgid:/ {print $2}' "/proc/$pid/status")
[ "$tgid" = "$pid" ] || { echo "$tgid"; exit 4; }
comm=$(cat "/proc/$pid/comm")
if [ "$mine" != "$theirs" ] && [ "$nspid" != 1 ]; then
    # Only a namespace criuweb's holder made can be dumped from inside: a
    # container's has no criu in it, and its init would lose a process.
    init=$pid
    while [ "$(awk '/^NSpid:/ {print $NF}' "/proc/$init/status" 2>/dev/null)" != 1 ]; do
        init=$(awk '/^PPid:/ {print $2}' "/proc/$init/status" 2>/dev/null)
        [ -n "$init" ] && [ "$init" -gt 1 ] || break
    done
    tr '\0' '\n' < "/proc/$init/cmdline" 2>/dev/null | grep -q '/holder\.pid$' || { echo "$init"; exit 5; }
fi
if [ "$mine" = "$theirs" ]; then echo "root $pid $state $comm"; else echo "ns $nspid $state $comm"; fi
"""


def resolve_process(conn, pid):
    """Return (mode, pid_in_namespace, comm) for a PID, or raise CriuError."""
    result = conn.sh(RESOLVE_SCRIPT, str(pid), check=False)
    if result.rc == 4:
        raise CriuError(f"{conn.name}: {pid} is a thread of process {result.stdout.strip()}; give the process's PID")
    if result.rc == 5:
        raise CriuError(
            f"{conn.name}: PID {pid} lives in the PID namespace of process {result.stdout.strip()} (a container?); "
            "migrate the container instead"
        )
    if result.rc != 0:
        raise CriuError(f"{conn.name}: no process with PID {pid}")
    mode, inner, state, comm = result.stdout.split(maxsplit=3)
    if state == "Z":
        raise CriuError(f"{conn.name}: process {pid} is a zombie")
    if mode == "ns" and inner == "1":
        raise CriuError(
            f"{conn.name}: PID {pid} is the init of its own PID namespace (a container?); "
            "migrate the container instead"
        )
    return mode, int(inner), comm.strip()


def dump_argv(pid, images_dir, inner_pid=None, extra=()):
    """criu dump of the tree at pid; from inside its namespaces when it has its own.

    extra: a strategy's own options (--page-server ..., --lazy-pages ...).
    """
    if inner_pid is None:
        return ["criu", "dump", "-t", str(pid), "-D", images_dir, *DUMP_OPTIONS, *extra]
    # Like criu-ns: CRIU must see the tree from inside its PID and mount
    # namespaces, where it is an ordinary tree under the holder.
    return [
        "nsenter", "-t", str(pid), "--pid", "--mount", "--",
        "criu", "dump", "-t", str(inner_pid), "-D", images_dir, *DUMP_OPTIONS, *extra,
    ]


# Restore a tree into new PID and mount namespaces, so its PIDs cannot
# collide with the host's (criu-ns does the same; it is not packaged
# everywhere). PID 1 of the new namespace stays to reap and keep the
# namespace alive; the caller gets "<status> <root-ns pid of the tree>".
# argv: the file to write the holder's PID to, then criu's argv. Killing that
# PID (PID 1 inside) ends every process of the namespace: how a rollback
# removes a restore whose outcome it never heard.
HOLDER = r"""
import ctypes, os, select, sys
go = parent = None
if sys.argv[1] == "--go-fd":
    # Started before the freeze: Python's start-up, the namespaces, the
    # mounts and the PID file are all done before it; only criu waits for
    # a "g" on this fd. A parent gone first (the run ended otherwise) means
    # never: the holder then ends, and its inner half with it.
    go, parent = int(sys.argv[2]), os.getppid()
    del sys.argv[1:3]
pidfile, argv = sys.argv[1], sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
def ok(rc):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
# Opened before unshare: the new /proc mounted below hides host PIDs.
host_proc = os.open("/proc", os.O_RDONLY)
ok(libc.unshare(0x00020000 | 0x20000000))  # CLONE_NEWNS | CLONE_NEWPID
r, w = os.pipe()
go_r, go_w = os.pipe()
# Never written: its end of file tells the inner half the outer one is gone.
alive_r, alive_w = os.pipe()
holder = os.fork()
if holder == 0:
    os.close(r)
    os.close(go_w)
    os.close(alive_w)
    if os.read(go_r, 1) != b"g":  # criu starts only once the PID file is written
        os._exit(4)
    os.setsid()
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    ok(libc.mount(None, b"/", None, 16384 | (1 << 19), None))  # MS_REC | MS_SLAVE
    ok(libc.mount(b"proc", b"/proc", b"proc", 0, None))
    if go is not None:
        # The outer half gone before the "g" (its shell ended: no restore) ends this one.
        if go not in select.select([go, alive_r], [], [])[0] or os.read(go, 1) != b"g":
            os._exit(4)
        os.close(go)
    os.close(alive_r)
    criu = os.fork()
    if criu == 0:
        os.execvp(argv[0], argv)
    while True:
        pid, status = os.wait()
        if pid == criu:
            break
    os.write(w, b"%d" % os.waitstatus_to_exitcode(status))
    os.close(w)
    # Every process of the namespace dies with this one, a `criu dump` that
    # entered it with nsenter included: that dump kills the tree at its very
    # end, and the holder, left without children, would take the dump with
    # it before it finished. So it stays while anything else lives here.
    while True:
        try:
            os.wait()
        except ChildProcessError:
            if not [p for p in os.listdir("/proc") if p.isdigit() and p != "1"]:
                break
            select.select([], [], [], 0.005)
    sys.exit(0)
try:
    # O_EXCL|O_NOFOLLOW: the directory may come from another host, and a
    # link planted there must not make us write through it.
    fd = os.open(pidfile + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("%d\n" % holder)
    os.rename(pidfile + ".tmp", pidfile)
except OSError:
    os.kill(holder, 9)
    raise
os.write(go_w, b"g")
os.close(w)
os.close(alive_r)
if go is not None:
    os.close(go)  # the inner half alone reads it
    while not select.select([r], [], [], 0.5)[0]:
        if os.getppid() != parent:
            sys.exit(4)
status = os.read(r, 16).decode() or "252"
root = []
if status == "0":
    fd = os.open("%d/task/%d/children" % (holder, holder), os.O_RDONLY, dir_fd=host_proc)
    root = os.read(fd, 4096).decode().split()
print(status, root[0] if root else "-")
"""


def restore_argv(images_dir, extra=(), go_fd=None):
    """criu restore argv, run under the namespace holder; extra: a strategy's own options.

    go_fd: the holder waits for a "g" on this fd before anything (see RECEIVE_SCRIPT).
    """
    wait = ["--go-fd", str(go_fd)] if go_fd is not None else []
    return ["python3", "-c", HOLDER, *wait, holder_pidfile(images_dir), "criu", "restore", "-D", images_dir,
            *RESTORE_OPTIONS, *extra]


def holder_pidfile(images_dir):
    return f"{images_dir}/holder.pid"


# Prints the PID of the namespace holder whose PID file is $1, if it still
# runs: the PID the file names, when that process's argv names this PID
# file (a PID file that came in the images, or a reused PID, names some
# other process).
HOLDER_PID = r"""
f=$1
[ -f "$f" ] && [ ! -L "$f" ] || exit 0
p=$(head -c 20 "$f" | tr -dc 0-9)
[ -n "$p" ] && [ "$p" -gt 1 ] || exit 0
tr '\0' '\n' < "/proc/$p/cmdline" 2>/dev/null | grep -qxF "$f" && echo "$p"
true
"""

# For each images dir given, the PID namespace of the holder restoring from
# it (checked as HOLDER_PID does), or an empty line when none runs.
HOLDER_NAMESPACES = r"""
for d in "$@"; do
    f="$d/holder.pid" p=
    if [ -f "$f" ] && [ ! -L "$f" ]; then p=$(head -c 20 "$f" | tr -dc 0-9); fi
    if [ -n "$p" ] && [ "$p" -gt 1 ] && tr '\0' '\n' < "/proc/$p/cmdline" 2>/dev/null | grep -qxF "$f"; then
        readlink "/proc/$p/ns/pid" || echo
    else
        echo
    fi
done
"""


def holder_namespaces(conn, images_dirs: list[str]) -> list[str]:
    """The PID namespace ("pid:[N]") of the holder restoring from each images dir; "" where none runs."""
    dirs = [d.rstrip("/") for d in images_dirs]
    out = conn.sh(HOLDER_NAMESPACES, *dirs).stdout.split("\n")
    return [(out[i].strip() if i < len(out) else "") for i in range(len(dirs))]


# Stop a restore from images dir $1, whether it has not started, is running
# or has finished: the directory moves away first (a restore not yet begun
# then finds no images and no place for its PID file), then its holder (PID
# 1 of the tree's namespace: killing it ends every process there) and the
# tree's root ($2, may be empty) are killed, then the moved directory is
# removed. A directory that cannot move (a mount point) is worked on in
# place and left for its owner to unmount. Quiet when all is already gone.
KILL_RESTORED = r"""
d=$1
gone="$d.cancelled"
rm -rf -- "$gone"
here=$d
if [ -e "$d" ] && mv -- "$d" "$gone" 2>/dev/null; then here=$gone; fi
f="$here/holder.pid"
if [ -f "$f" ] && [ ! -L "$f" ]; then
    p=$(head -c 20 "$f" | tr -dc 0-9)
    if [ -n "$p" ] && [ "$p" -gt 1 ] && tr '\0' '\n' < "/proc/$p/cmdline" 2>/dev/null | grep -qxF "$d/holder.pid"
    then kill -KILL "$p"
    fi
fi
case $2 in ''|*[!0-9]*) ;; *) [ "$2" -gt 1 ] && kill -KILL "$2" 2>/dev/null ;; esac
rm -rf -- "$gone"
true
"""


def kill_restored(conn, images_dir, pid=None, timeout=60):
    """Make sure no restore from images_dir runs or can start on the host; removes images_dir."""
    conn.sh(KILL_RESTORED, images_dir.rstrip("/"), str(pid or ""), timeout=timeout)


def restored_root(conn, images_dir):
    """The root PID of a tree restored from images_dir that still runs there, or None.

    Found through the namespace holder's PID file, whose path derives from
    the images directory: how a recovery finds a restore whose answer it
    never got.
    """
    pidfile = holder_pidfile(images_dir.rstrip("/"))
    holder = conn.sh(HOLDER_PID, pidfile).stdout.strip()
    if not holder.isdigit():
        return None
    out = conn.run(["cat", f"/proc/{holder}/task/{holder}/children"], check=False).stdout.split()
    return int(out[0]) if out and out[0].isdigit() else None


def restore(conn, images_dir, timeout=600, extra=()):
    """Restore a dumped tree on a host; return its PID there (root namespace)."""
    result = conn.run(restore_argv(images_dir, extra), check=False, timeout=timeout)
    parts = result.stdout.split()
    if len(parts) == 2 and parts[0] == "0" and parts[1].isdigit():
        return int(parts[1])
    excerpt = log_excerpt(conn.read_file(f"{images_dir}/restore.log", check=False))
    cause = first_error(excerpt) or result.stderr.strip()[-300:] or "no restored process"
    # Only a status from CRIU itself says for sure that nothing was restored.
    definitive = len(parts) == 2 and parts[0].lstrip("-").isdigit() and parts[0] != "0"
    raise CriuError(f"{conn.name}: criu restore failed: {cause} (see restore.log excerpt)", excerpt, definitive)


def dump(conn, pid, images_dir, resolved=None, extra=(), timeout=600):
    """Dump the process tree at pid into images_dir; the tree is gone afterwards.

    resolved: what resolve_process() said of pid, to save a round trip.
    extra: a strategy's own options (see dump_argv).
    """
    mode, inner, _ = resolved or resolve_process(conn, pid)
    argv = dump_argv(pid, images_dir, None if mode == "root" else inner, extra)
    result = conn.run(argv, check=False, timeout=timeout)
    if result.rc != 0:
        excerpt = log_excerpt(conn.read_file(f"{images_dir}/dump.log", check=False))
        cause = first_error(excerpt) or result.stderr.strip()[-300:]
        raise CriuError(f"{conn.name}: criu dump failed: {cause} (see dump.log excerpt)", excerpt)


def read_stats(conn, path):
    """Decoded stats image at path on the host, or {} when CRIU wrote none."""
    raw = conn.read_bytes(path)
    if raw is None:
        return {}
    try:
        return decode_stats(raw)
    except ValueError:
        return {}


# -- page server (the page-server strategy) -----------------------------------------

# Start `criu page-server` in the background on a free port of $2 and report
# "listening <pid> <port>" once it listens, then "exit <status>" when it ends
# (after one dump). CRIU takes no --port 0, so a free port is asked of the
# kernel first; the page server binds it a moment later, and a port taken
# meanwhile only means another try. --status-fd says "listening" for real.
# $1: images directory; $2: address; the rest: more criu options (TLS).
PAGE_SERVER_SCRIPT = r"""
d=$1; addr=$2; shift 2
FREE_PORT='import socket, sys
a = sys.argv[1]
s = socket.socket(socket.AF_INET6 if ":" in a else socket.AF_INET)
s.bind((a, 0))
print(s.getsockname()[1])'
fifo="$d/.page-server-ready"
for try in 1 2 3 4 5; do
    port=$(python3 -c "$FREE_PORT" "$addr") || exit 3
    rm -f "$fifo" && mkfifo -m 600 "$fifo" || exit 3
    criu page-server -D "$d" --address "$addr" --port "$port" -v4 -o page-server.log --status-fd 9 "$@" \
        9>"$fifo" </dev/null >/dev/null 2>&1 &
    pid=$!
    ready=$(head -c1 "$fifo" | od -An -tx1 | tr -d ' \n')
    rm -f "$fifo"
    if [ "$ready" = 00 ]; then
        echo "listening $pid $port"
        wait "$pid"
        echo "exit $?"
        exit 0
    fi
    wait "$pid"
done
echo "failed"
exit 1
"""


def exit_status(words: list[str]) -> int:
    """The status in a background script's `exit N` line (split); -1 for anything else."""
    return int(words[1]) if len(words) == 2 and words[0] == "exit" else -1


def wait_exit_line(out, chan) -> int:
    """Read a background script's last line and close its channel: the `exit N`
    status, or -1 if the channel broke first."""
    try:
        line = out.readline().split()
    except OSError:
        line = []
    finally:
        chan.close()
    return exit_status(line)


class PageServer:
    """A `criu page-server` running on a host for one dump, on an SSH channel of its own."""

    def __init__(self, conn, images_dir, address, extra=(), timeout=600):
        self.conn = conn
        self.images_dir = images_dir
        self.chan = conn.open_command(["sh", "-c", PAGE_SERVER_SCRIPT, "sh", images_dir, address, *extra],
                                      idle_timeout=timeout)
        self.out = self.chan.makefile("r")
        line = self.out.readline().split()
        if len(line) != 3 or line[0] != "listening":
            self.chan.close()
            raise CriuError(f"{conn.name}: criu page-server did not start: {self.log_cause()}", self.log_tail())
        self.pid, self.port = int(line[1]), int(line[2])

    def log_tail(self):
        return log_excerpt(self.conn.read_file(f"{self.images_dir}/page-server.log", check=False))

    def log_cause(self):
        return first_error(self.log_tail()) or "see page-server.log"

    def wait(self):
        """The page server's exit status once it has served its dump (-1 if the channel broke)."""
        return wait_exit_line(self.out, self.chan)

    def close(self):
        self.chan.close()


# -- criu in the background (post-copy) -------------------------------------------

# Run "$@" (a criu command given --status-fd 9) in the background; print
# "ready <pid>" once CRIU says it is ready on its status fd, or "failed <pid>"
# when it ends without saying so; then "exit <status>" when it ends.
# $1: a path for the status fifo.
BACKGROUND_SCRIPT = r"""
fifo=$1; shift
rm -f "$fifo" && mkfifo -m 600 "$fifo" || exit 3
"$@" 9>"$fifo" </dev/null >/dev/null 2>&1 &
pid=$!
ready=$(head -c1 "$fifo" | od -An -tx1 | tr -d ' \n')
rm -f "$fifo"
if [ "$ready" = 00 ]; then echo "ready $pid"; else echo "failed $pid"; fi
wait "$pid"
echo "exit $?"
"""


class Background:
    """A criu command running on a host past its readiness, on an SSH channel of its own.

    The lazy dump is ready once its images are written and its page server
    listens; `criu lazy-pages` once its socket for the restore listens.
    Either then runs until every page has moved.
    """

    def __init__(self, conn, argv, fifo, log_path, what, timeout=3600):
        self.conn, self.log_path, self.what = conn, log_path, what
        self.chan = conn.open_command(["sh", "-c", BACKGROUND_SCRIPT, "sh", fifo, *argv, "--status-fd", "9"],
                                      idle_timeout=timeout)
        self.out = self.chan.makefile("r")
        line = self.out.readline().split()
        self.pid = int(line[1]) if len(line) == 2 and line[1].isdigit() else None
        self.status = None
        if not line or line[0] != "ready":
            rc = self.wait()
            raise CriuError(f"{conn.name}: {what} failed: {self.cause(rc)}", self.log_tail())

    @classmethod
    def adopt(cls, conn, chan, out, pid, log_path, what):
        """One already running on chan, whose "exit <status>" line comes on out (see DumpSender)."""
        self = cls.__new__(cls)
        self.conn, self.log_path, self.what = conn, log_path, what
        self.chan, self.out, self.pid, self.status = chan, out, pid, None
        return self

    def log_tail(self):
        return log_excerpt(self.conn.read_file(self.log_path, check=False))

    def cause(self, rc=None):
        said = first_error(self.log_tail())
        if rc in (None, -1):
            how = "no exit status"
        elif rc > 128:  # sh reports a death by signal N as 128 + N
            how = f"killed by signal {rc - 128}"
        else:
            how = f"exit status {rc}"
        return f"{said} ({how})" if said else how

    def done(self) -> bool:
        """Whether it has ended (its exit line is there); never blocks."""
        return self.status is not None or self.chan.exit_status_ready()

    def wait(self) -> int:
        """Its exit status once it ends; -1 when the channel broke first."""
        if self.status is None:
            self.status = wait_exit_line(self.out, self.chan)
        return self.status

    def close(self):
        self.chan.close()


# -- dump and restore started before the freeze (page-server) ---------------------

# CRIU starts before the freeze and waits in its pre-dump action script
# (run by cr_dump_tasks() in criu/cr-dump.c before it seizes anything, and
# before it connects to a page server), so that its start-up (exec, kernel
# feature cache, options, log) is no downtime; the word "go" lets it go on.
# PREDUMP_SETUP, shared by both senders, writes that script at $hook
# (beside the images directory, $d) with its two fifos, opened here
# read-write so that no open blocks: $hook.ready, where the script says
# "ready" and a watcher says "pid <criu's PID>" and, when it ends, "exit
# <status>" (fd 6), and $hook.go, where the script waits for "go" (fd 7).
# The script exits 0 for every other action, and non-zero on anything but
# "go" (CRIU then stops before touching the tree). A caller that goes away
# first (EOF) gets criu killed, still before it touched anything.
PREDUMP_SETUP = r"""
hook=$d.hook
rm -f "$hook" "$hook.go" "$hook.ready"
mkfifo -m 600 "$hook.go" "$hook.ready" || exit 3
printf '%s\n' '#!/bin/sh' \
    '[ "$CRTOOLS_SCRIPT_ACTION" = pre-dump ] || exit 0' \
    'echo ready >"$0.ready"' \
    'IFS= read -r w <"$0.go" && [ "$w" = go ]' >"$hook" && chmod 700 "$hook" || exit 3
exec 6<>"$hook.ready" 7<>"$hook.go"
await_ready() {
    pid=; state=
    while [ -z "$pid" ] || [ -z "$state" ]; do
        read -r said rc <&6 || exit 3
        case $said in pid) pid=$rc ;; ready) state=ready ;; exit) state=$rc ;; esac
    done
    trap 'kill -KILL "$pid" 2>/dev/null; rm -f "$hook" "$hook.go" "$hook.ready"' EXIT
    if [ "$state" != ready ]; then echo "criuweb-dump-failed $state" >&2; exit 70; fi
}
"""

# Says "criuweb-waiting" on stderr once the criu dump in "$@" waits in its
# pre-dump script (see PREDUMP_SETUP), waits for "go" on stdin, lets the
# dump go on and, once it has succeeded, sends the images directory $1 as
# a tar on stdout (all but CRIU's own log and statistics, which stay there
# and are read after the resume). stderr says "criuweb-dumped" between the
# two, or "criuweb-dump-failed <status>". $2: "5" when fd 5 leads to
# UNCORK (the dump's PID is written there after "go"), else "-".
# Started before the freeze: the SSH session, the shell and criu's own
# start-up then cost no downtime. Nothing is dumped without "go".
SEND_SCRIPT = r"""
d=$1; report=$2; shift 2
""" + PREDUMP_SETUP + r"""
(
    "$@" --action-script "$hook" </dev/null >&2 5>&- 6>&- 7>&- &
    c=$!
    echo "pid $c" >&6
    wait "$c"
    echo "exit $?" >&6
) 5>&- &
await_ready
echo criuweb-waiting >&2
read -r go || exit 4
[ "$go" = go ] || exit 4
echo go >&7
if [ "$report" = 5 ]; then echo "$pid" >&5; exec 5>&-; fi
while read -r said rc <&6; do [ "$said" = exit ] && break; done
trap - EXIT
rm -f "$hook" "$hook.go" "$hook.ready"
if [ "$rc" != 0 ]; then echo "criuweb-dump-failed $rc" >&2; exit 70; fi
echo "criuweb-dumped" >&2
exec tar --exclude=./dump.log --exclude=./stats-dump -cf - -C "$d" .
"""
DUMPED = b"criuweb-dumped\n"
DUMP_FAILED = b"criuweb-dump-failed"
WAITING = b"criuweb-waiting\n"

# Runs the command after its first two arguments (SEND_SCRIPT's shell) with a
# pipe on its fd 5, on which that shell writes the PID of the criu dump it
# starts; then takes TCP_CORK off the dump's socket to the page server
# (argv[1]:argv[2]). Why: CRIU corks that socket when it connects
# (connect_to_page_server() in criu/page-xfer.c) and never uncorks it; its
# last page entries and PS_IOV_CLOSE then wait in the source's kernel until
# TCP's 200 ms cork limit before disconnect_from_page_server() gets its
# answer, 200 ms of every dump with the workload frozen. A duplicate of the
# socket (pidfd_getfd, Linux >= 5.6, root) is enough to uncork it: the
# stream's bytes and their order do not change, only when they leave. Each
# duplicate is closed at once, so CRIU's own close still ends the
# connection. Anything that fails here only leaves the 200 ms in place.
# The PID may also be a `runc checkpoint`'s: its criu (swrk) is found among
# its children, and a criu that ends without that socket is looked for
# again (runc first starts one only to ask its version: go-criu's
# GetCriuVersion in libcontainer's checkCriuVersion). With
# CRIUWEB_UNCORKED set, the path it names gets the line "uncorked" once the
# cork is off, so a run can say that it was.
UNCORK = r"""
import ctypes, ipaddress, os, socket, sys, time
peer = (ipaddress.ip_address(sys.argv[1]), int(sys.argv[2]))
mark = os.environ.pop("CRIUWEB_UNCORKED", "")
r, w = os.pipe()
shell = os.fork()
if shell == 0:
    os.close(r)
    os.dup2(w, 5)
    if w != 5:
        os.close(w)
    os.execvp(sys.argv[3], sys.argv[3:])
os.close(w)
# The channel's stdio is the shell's alone.
null = os.open(os.devnull, os.O_RDWR)
for fd in (0, 1, 2):
    os.dup2(null, fd)
libc = ctypes.CDLL(None, use_errno=True)
SYS_pidfd_getfd = 438  # the same number on every architecture

def criu_under(pid):
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            if os.path.basename(os.readlink("/proc/%d/exe" % p)) == "criu":
                return p
            with open("/proc/%d/task/%d/children" % (p, p)) as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, ValueError):
            pass
    return None

def grab(pidfd, fd):
    got = libc.syscall(SYS_pidfd_getfd, pidfd, fd, 0)
    return socket.socket(fileno=got) if got >= 0 else None

def is_peer(s):
    try:
        if s.type != socket.SOCK_STREAM or s.family not in (socket.AF_INET, socket.AF_INET6):
            return False
        host, port = s.getpeername()[:2]
        return (ipaddress.ip_address(host.split("%")[0]), port) == peer
    except (OSError, ValueError):
        return False

# Uncorks criu's socket to the peer; False if criu ended before it had one.
def watch(criu, pidfd, deadline):
    sk, seen = None, set()
    while time.monotonic() < deadline:
        if sk is None:
            try:
                fds = os.listdir("/proc/%d/fd" % criu)
            except OSError:
                return False
            for name in fds:
                try:
                    link = os.readlink("/proc/%d/fd/%s" % (criu, name))
                except OSError:
                    continue
                if not link.startswith("socket:") or (name, link) in seen:
                    continue
                seen.add((name, link))
                s = grab(pidfd, int(name))
                if s is not None:
                    if is_peer(s):
                        sk = (int(name), link)
                    s.close()
                if sk:
                    break
        else:
            # CRIU corks once, right after connecting (and its TLS handshake).
            try:
                if os.readlink("/proc/%d/fd/%d" % (criu, sk[0])) != sk[1]:
                    return True
            except OSError:
                return True
            s = grab(pidfd, sk[0])
            if s is None:
                return True
            try:
                if s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 0)
                    if mark:
                        with open(mark, "w") as f:
                            f.write("uncorked\n")
                    return True
            finally:
                s.close()
        time.sleep(0.001)
    return True

def uncork(pid, deadline):
    while time.monotonic() < deadline and os.path.exists("/proc/%d" % pid):
        criu = criu_under(pid)
        if criu is None:
            time.sleep(0.001)
            continue
        try:
            pidfd = os.pidfd_open(criu)
        except OSError:
            time.sleep(0.001)
            continue
        try:
            if watch(criu, pidfd, deadline):
                return
        finally:
            os.close(pidfd)

said = os.read(r, 32).split()
if said and said[0].isdigit():
    try:
        uncork(int(said[0]), time.monotonic() + 60)
    except Exception:
        pass
_, status = os.waitpid(shell, 0)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


# The lazy dump's sender: starts the dump (--lazy-pages) at once, waiting
# in its pre-dump script (see PREDUMP_SETUP), says "criuweb-waiting" on
# stderr, waits for "go", lets the dump go on and, once CRIU says its
# images are written and its page server listens (its status fd), writes
# them as a tar into the images directory, says "criuweb-dumped-lazy <dump
# PID> <tar bytes>" on stderr and sends the tar on stdout; then "exit
# <status>" on stdout when the dump has served every page. The controller
# reads exactly the tar's bytes, then waits for that line. $1: images
# directory; $2: a path for the status fifo. Between "go" and the tar on
# stdout the workload is frozen, so as few processes as possible start
# there (each start is a few ms, tens under load): the fifos are made
# before, CRIU's status byte is read by one od, the tar's size comes from
# tar itself (--totals), the removals come after. The status fifo is open
# here too (fd 8), so that criu's open of it never waits; the watcher
# writes an "x" into it when criu ends, so that a status byte that will
# never come is not awaited for ever.
SEND_LAZY_SCRIPT = r"""
d=$1; fifo=$2; shift 2
rm -f "$fifo" && mkfifo -m 600 "$fifo" || exit 3
""" + PREDUMP_SETUP + r"""
exec 8<>"$fifo"
(
    "$@" --action-script "$hook" --status-fd 9 9>"$fifo" </dev/null >/dev/null 2>&1 6>&- 7>&- 8>&- &
    c=$!
    echo "pid $c" >&6
    wait "$c"
    echo "exit $?" >&6
    printf x >&8
) &
await_ready
echo criuweb-waiting >&2
read -r go || exit 4
[ "$go" = go ] || exit 4
echo go >&7
# CRIU writes one \0 once ready; the watcher an "x" if it ends first.
ready=$(od -An -tx1 -N1 <&8)
if [ "$ready" != " 00" ]; then
    while read -r said rc <&6; do [ "$said" = exit ] && break; done
    trap - EXIT
    rm -f "$fifo" "$hook" "$hook.go" "$hook.ready"
    echo "criuweb-dump-failed $rc" >&2; exit 70
fi
trap - EXIT
said=$(tar --totals --exclude=./dump.log --exclude=./stats-dump --exclude=./.images.tar \
    -cf "$d/.images.tar" -C "$d" . 2>&1 >/dev/null) || { echo "criuweb-dump-failed (tar)" >&2; exit 71; }
size=${said##*Total bytes written: }; size=${size%% *}
case $size in ''|*[!0-9]*) echo "criuweb-dump-failed (tar: $said)" >&2; exit 71 ;; esac
echo "criuweb-dumped-lazy $pid $size" >&2
cat "$d/.images.tar"
rm -f "$d/.images.tar" "$fifo" "$hook" "$hook.go" "$hook.ready"
while read -r said rc <&6; do [ "$said" = exit ] && break; done
echo "exit $rc"
"""
DUMPED_LAZY = "criuweb-dumped-lazy"


def _said(err: bytearray, words) -> bool:
    return any(w in err for w in words)


class DumpSender:
    """A criu dump on the source waiting for the freeze, its small images then sent on stdout.

    lazy: the dump serves the pages afterwards (SEND_LAZY_SCRIPT); pid and
    size then say which process serves them and how many bytes the images are.
    """

    def __init__(self, conn, images_dir, argv, timeout=600, lazy=False, page_server=None):
        """page_server: (address, port) the dump sends its pages to, whose socket UNCORK uncorks."""
        self.conn, self.images_dir = conn, images_dir
        self.pid: int | None = None
        self.size: int | None = None
        if lazy:
            script = ["sh", "-c", SEND_LAZY_SCRIPT, "sh", images_dir, f"{images_dir}.ready"]
        elif page_server:
            address, port = page_server
            script = ["python3", "-c", UNCORK, address, str(port), "sh", "-c", SEND_SCRIPT, "sh", images_dir, "5"]
        else:
            script = ["sh", "-c", SEND_SCRIPT, "sh", images_dir, "-"]
        self.chan = conn.open_command([*script, *argv], idle_timeout=timeout)
        self._await_waiting(timeout)

    def _await_waiting(self, timeout: float) -> None:
        """Return once criu has started and waits for "go" (before the freeze: its start-up is then no
        downtime, and a dump that cannot start fails here, the workload untouched)."""
        err = bytearray()
        deadline = time.monotonic() + timeout
        while WAITING not in err and time.monotonic() < deadline:
            try:
                data = self.chan.recv_stderr(1)
            except TimeoutError:
                continue
            if not data:
                break
            err += data
        if WAITING not in err:
            self.chan.close()
            said = bytes(err).decode(errors="replace").replace(DUMP_FAILED.decode(), "exit status").strip()
            excerpt = log_excerpt(self.conn.read_file(f"{self.images_dir}/dump.log", check=False))
            cause = first_error(excerpt) or said[-300:] or "no answer"
            raise CriuError(f"{self.conn.name}: criu dump could not start: {cause}", excerpt)

    def dump(self, timeout: float) -> None:
        """Start the dump now and return once it has succeeded; raise CriuError when it fails."""
        self.chan.sendall(b"go\n")
        err = bytearray()
        deadline = time.monotonic() + timeout
        while not _said(err, (DUMPED, DUMP_FAILED, DUMPED_LAZY.encode())) and time.monotonic() < deadline:
            # Waits at most the channel's idle timeout; a closed connection
            # (the freeze limit) reads empty at once.
            try:
                data = self.chan.recv_stderr(CHUNK_SMALL)
            except TimeoutError:
                continue
            if not data:
                break
            err += data
        if DUMPED in err:
            return
        for line in bytes(err).decode(errors="replace").splitlines():
            if line.startswith(DUMPED_LAZY):
                words = line.split()
                self.pid, self.size = int(words[1]), int(words[2])
                return
        excerpt = log_excerpt(self.conn.read_file(f"{self.images_dir}/dump.log", check=False))
        said = bytes(err).decode(errors="replace").replace(DUMP_FAILED.decode(), "exit status").strip()
        cause = first_error(excerpt) or said[-300:] or "no answer"
        self.chan.close()
        raise CriuError(f"{self.conn.name}: criu dump failed: {cause} (see dump.log excerpt)", excerpt)

    def serving(self, log_path: str) -> Background:
        """After a lazy dump's images were read: the dump serving pages, as a Background."""
        out = self.chan.makefile("r")
        return Background.adopt(self.conn, self.chan, out, self.pid, log_path, "criu dump --lazy-pages")

    def close(self):
        self.chan.close()


CHUNK_SMALL = 4096
UNPACKED = "criuweb-unpacked"
# Both receivers unpack the images sent on stdin into $d and refuse anything
# but regular files and directories (as streams.UNPACK_IMAGES).
_UNPACK_INTO_D = r"""
tar --numeric-owner --xattrs --xattrs-include='*' --same-owner --exclude=./holder.pid \
    --exclude=./holder.pid.tmp -xpf - -C "$d"
odd=$(find "$d" ! -type f ! -type d -print -quit)
if [ -n "$odd" ]; then
    echo "refusing the images: $odd is not a regular file or directory" >&2
    exit 3
fi
"""

# Starts the restore in "$@" at once, its namespace holder (Python, whose
# start-up takes a few hundred ms on a loaded host) waiting on fd 3 for a
# "g" through the fifo $2; unpacks the images sent on stdin into $1,
# refusing anything but regular files and directories (as UNPACK_IMAGES);
# says "criuweb-unpacked"; and on "go" from the controller, which sends it
# only once the run's stage says the target may run a copy, lets the
# holder restore. Without "go" (EOF, a closed channel) nothing is restored:
# the holder is killed, and it also gives up by itself once this shell is gone.
RECEIVE_SCRIPT = (
    r"""
set -e
d=$1; go=$2; shift 2
rm -f "$go"
mkfifo -m 600 "$go"
# Read-write: opening it then never waits for a writer.
"$@" 3<>"$go" &
holder=$!
trap 'kill -KILL "$holder" 2>/dev/null; rm -f "$go"' EXIT
"""
    + _UNPACK_INTO_D.lstrip("\n")
    + r"""echo criuweb-unpacked
read -r word
[ "$word" = go ] || exit 4
printf g >"$go"
trap - EXIT
rm -f "$go"
set +e
wait "$holder"
""")


class RestoreReceiver:
    """A target command started before the freeze: it unpacks the small images, then restores on "go"."""

    def __init__(self, conn, images_dir, extra=(), timeout=600, lazy_argv=None):
        self.conn, self.images_dir = conn, images_dir
        self.lazy_pid: int | None = None
        restore = restore_argv(images_dir, extra, go_fd=3)
        go = f"{images_dir}.go"
        if lazy_argv is None:
            argv = ["sh", "-c", RECEIVE_SCRIPT, "sh", images_dir, go, *restore]
        else:
            lazy = shlex.join([*lazy_argv, "--status-fd", "9"])
            argv = ["sh", "-c", RECEIVE_LAZY_SCRIPT, "sh", images_dir, go, lazy, f"{images_dir}.ready", *restore]
        self.chan = conn.open_command(argv, idle_timeout=timeout)
        self.out = self.chan.makefile("r")

    def unpacked(self) -> None:
        """Return once the images are in place; raise CriuError if they could not be written."""
        try:
            line = self.out.readline().strip()
        except OSError:
            line = ""
        if line == UNPACKED:
            return
        if line.startswith(UNPACKED + " ") and line.split()[1].isdigit():
            self.lazy_pid = int(line.split()[1])
            return
        rc = self.chan.recv_exit_status() if self.chan.exit_status_ready() else -1
        err = b""
        while self.chan.recv_stderr_ready():
            err += self.chan.recv_stderr(CHUNK_SMALL)
        self.chan.close()
        why = err.decode(errors="replace").strip()[-300:] or ("no exit status" if rc == -1 else f"exit status {rc}")
        raise CriuError(f"{self.conn.name}: writing the small images failed: {why}")

    def restore(self, timeout: float) -> int:
        """Restore now; the restored tree's PID. CriuError as restore() raises it."""
        self.chan.settimeout(timeout)
        try:
            self.chan.sendall(b"go\n")
            out = self.out.readline()
        except OSError:
            out = ""
        parts = out.split()
        if len(parts) == 2 and parts[0] == "0" and parts[1].isdigit():
            if self.lazy_pid is None:
                self.chan.close()
            return int(parts[1])
        err = b""
        while self.chan.recv_stderr_ready():
            err += self.chan.recv_stderr(CHUNK_SMALL)
        self.chan.close()
        excerpt = log_excerpt(self.conn.read_file(f"{self.images_dir}/restore.log", check=False))
        cause = first_error(excerpt) or err.decode(errors="replace").strip()[-300:] or "no restored process"
        # Only a status from CRIU itself says for sure that nothing was restored.
        definitive = len(parts) == 2 and parts[0].lstrip("-").isdigit() and parts[0] != "0"
        raise CriuError(
            f"{self.conn.name}: criu restore failed: {cause} (see restore.log excerpt)", excerpt, definitive
        )

    def close(self):
        self.chan.close()

    def lazy_pages(self, log_path: str) -> Background:
        """After the restore: the running `criu lazy-pages`, as a Background whose exit line comes here."""
        return Background.adopt(self.conn, self.chan, self.out, self.lazy_pid, log_path, "criu lazy-pages")


# The post-copy receiver: as RECEIVE_SCRIPT, and once the images are in
# place it starts `criu lazy-pages` ($2, a shlex-quoted command line ending
# in --status-fd 9) and says "criuweb-unpacked <its PID>" once it listens;
# on "go" the restore in "$@" runs, and "exit <status>" follows when
# lazy-pages has moved every page. Without "go", lazy-pages is killed.
# $3: a path for the status fifo, made before the freeze with the other.
RECEIVE_LAZY_SCRIPT = (
    r"""
set -e
d=$1; go=$2; lazy=$3; fifo=$4; shift 4
rm -f "$go" "$fifo"
mkfifo -m 600 "$go" "$fifo"
"$@" 3<>"$go" &
holder=$!
lpid=
trap 'kill -KILL "$holder" $lpid 2>/dev/null; rm -f "$go" "$fifo"' EXIT
"""
    + _UNPACK_INTO_D.lstrip("\n")
    + r"""# $lazy is shlex-quoted by the controller: eval only splits it back into words.
eval "$lazy" 9>"$fifo" </dev/null >/dev/null 2>&1 &
lpid=$!
ready=$(od -An -tx1 -N1 <"$fifo")
set +e
if [ "$ready" != " 00" ]; then wait "$lpid"; echo "criu lazy-pages did not start (exit status $?)" >&2; exit 5; fi
echo "criuweb-unpacked $lpid"
read -r word
[ "$word" = go ] || exit 4
printf g >"$go"
trap - EXIT
rm -f "$go" "$fifo"
wait "$holder"
wait "$lpid"
echo "exit $?"
""")
