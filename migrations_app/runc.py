"""runc under a Docker engine: the runtime adapter of the fast container path.

Docker's own checkpoint and restore go through containerd, which copies
every checkpoint into its content store and back out (about 100 MB/s here;
checkpoint-restore/criu#2519, moby/moby#40644, containerd/containerd#2822).
This adapter works one level lower, on the runc state the engine's shim
keeps, while Docker keeps managing the container:

- checkpoint: `runc --root <the shim's runc root> checkpoint` on the
  source; Docker then sees the container exit (137).
- restore: the target container is created by Docker with criuweb's OCI
  runtime (scripts/criuweb-runtime), which runc's shim calls instead of
  runc. A marker file keyed by container id turns the shim's `create` into
  `runc restore --detach` from an images directory and its `start` into a
  no-op, exactly as the shim itself does for a task created from a
  checkpoint (containerd pkg/process/init.go, createdCheckpointState), so
  a plain `docker start` restores.

Commands are argv lists or constant scripts with positional arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from . import criu, ssh

# The name criuweb's runtime wrapper is registered under in daemon.json's
# "runtimes" (the lab does it; docs/fastpath.md for other hosts).
RUNTIME_NAME = "criuweb"
# Where the wrapper looks for restore markers (its MARKS).
MARKS_DIR = "/run/criuweb-runtime"


class RuncError(Exception):
    """A runc step failed; the message names the host, the step and CRIU's cause.

    definitive: runc answered, so its outcome is known.
    """

    def __init__(self, message: str, log_excerpt: str = "", definitive: bool = True):
        super().__init__(message)
        self.log_excerpt = log_excerpt
        self.definitive = definitive


@dataclass
class RuncState:
    """Where an engine's shim keeps a running container's runc state."""

    binary: str  # the runc the shim calls (daemon.json's runtime path)
    root: str  # runc's --root: the runtime's root plus the containerd namespace


# The running container's shim (`containerd-shim-runc-v2 -namespace NS -id ID
# ...`) runs in the task's bundle, whose options.json names the runc binary
# and root. Prints the namespace, then options.json. $1: container id.
SHIM_SCRIPT = r"""
for p in $(pgrep -f -- "[-]id $1( |\$)"); do
    args=$(tr '\0' ' ' <"/proc/$p/cmdline") || continue
    case $args in *containerd-shim*) ;; *) continue ;; esac
    ns=$(echo "$args" | sed -n 's/.*-namespace \([^ ]*\).*/\1/p')
    d=$(readlink "/proc/$p/cwd") || continue
    echo "${ns:-moby}"
    cat "$d/options.json" 2>/dev/null || echo '{}'
    exit 0
done
exit 3
"""


def runc_state(conn: ssh.Connection, container_id: str) -> RuncState:
    """The runc binary and root under which a running container lives."""
    r = conn.sh(SHIM_SCRIPT, container_id, check=False)
    if r.rc != 0:
        raise RuncError(f"{conn.name}: no containerd shim found for container {container_id[:12]}")
    ns, _, options = r.stdout.partition("\n")
    try:
        opts = json.loads(options or "{}")
    except ValueError:
        opts = {}
    # containerd's defaults when the engine passes no runtime options.
    root = opts.get("root") or "/run/containerd/runc"
    return RuncState(binary=opts.get("binary_name") or "runc", root=f"{root}/{ns.strip()}")


# $1 runc, $2 root, $3 images dir, $4 work dir, $5 container id, then extra
# checkpoint options. The directories are made fresh: runc refuses nothing,
# but stale images would be restored.
CHECKPOINT_SCRIPT = r"""
runc=$1 root=$2 images=$3 work=$4 id=$5; shift 5
umask 077  # the images hold the container's memory
rm -rf "$images" "$work" && mkdir -p "$images" "$work" || exit 90
exec "$runc" --root "$root" checkpoint --image-path "$images" --work-path "$work" "$@" "$id"
"""


def checkpoint(
    conn: ssh.Connection, state: RuncState, container_id: str, images: str, work: str, extra: list[str] | None = None
) -> None:
    """Dump the container into images and stop it (runc kills it after the dump)."""
    r = conn.sh(CHECKPOINT_SCRIPT, state.binary, state.root, images, work, container_id, *(extra or []),
                check=False, timeout=600)  # fmt: skip
    if r.rc != 0:
        excerpt = criu.log_excerpt(conn.read_file(f"{work}/dump.log", check=False))
        cause = criu.first_error(excerpt) or r.stderr.strip()[-300:] or f"exit status {r.rc}"
        raise RuncError(f"{conn.name}: runc checkpoint failed: {cause}", excerpt, definitive=r.rc != -1)


# A checkpoint set up before the freeze: a shell that makes the directories,
# then waits on its stdin. On the word "go" it checkpoints and prints
# "checkpoint <status>"; after a good checkpoint, on the word "send", it runs
# the rest of its arguments (the sender of the run's files, to its stdout).
# So the freeze opens no SSH session and starts no shell. EOF (a closed
# channel) before "go" checkpoints nothing. $1 runc, $2 root, $3 images dir,
# $4 work dir, $5 container id, then the sender's argv.
WAITING_CHECKPOINT_SCRIPT = r"""
runc=$1 root=$2 images=$3 work=$4 id=$5; shift 5
umask 077  # the images hold the container's memory
rm -rf "$images" "$work" && mkdir -p "$images" "$work" || exit 90
read -r go || exit 4
[ "$go" = go ] || exit 4
"$runc" --root "$root" checkpoint --image-path "$images" --work-path "$work" "$id" </dev/null >"$work/runc.out" 2>&1
rc=$?
echo "checkpoint $rc"
[ $rc -eq 0 ] || exit 0
read -r send || exit 4
[ "$send" = send ] || exit 4
exec "$@"
"""


def open_waiting_checkpoint(conn: ssh.Connection, state: RuncState, container_id: str, images: str, work: str,
                            sender: list[str]):  # fmt: skip
    """Start a WAITING_CHECKPOINT_SCRIPT shell; its channel."""
    return conn.open_command(
        ["sh", "-c", WAITING_CHECKPOINT_SCRIPT, "sh", state.binary, state.root, images, work, container_id, *sender]
    )


def run_waiting_checkpoint(conn: ssh.Connection, chan, work: str, timeout: float = 600) -> None:
    """Make a waiting checkpoint run; return once it succeeded, raise RuncError otherwise.

    The channel is left waiting for "send".
    """
    idle = chan.gettimeout()
    chan.settimeout(timeout)  # a big container's dump may be silent longer than a stream's idle limit
    line = b""
    try:
        chan.sendall(b"go\n")
        # Byte by byte: the stream that follows "send" must stay unread.
        while not line.endswith(b"\n"):
            b = chan.recv(1)
            if not b:
                break
            line += b
    except OSError:
        line = b""
    finally:
        chan.settimeout(idle)
    words = line.split()
    if len(words) == 2 and words[0] == b"checkpoint" and words[1] == b"0":
        return
    if len(words) == 2 and words[0] == b"checkpoint":
        excerpt = criu.log_excerpt(conn.read_file(f"{work}/dump.log", check=False))
        runc_out = (conn.read_file(f"{work}/runc.out", check=False) or "").strip()
        cause = criu.first_error(excerpt) or runc_out[-300:] or f"exit status {words[1].decode()}"
        raise RuncError(f"{conn.name}: runc checkpoint failed: {cause}", excerpt)
    # No outcome: the shell ended before the checkpoint, or the channel broke.
    rc = chan.recv_exit_status() if chan.status_event.wait(5) else -1
    raise RuncError(
        f"{conn.name}: runc checkpoint did not report ({'channel lost' if rc == -1 else f'exit status {rc}'})",
        definitive=rc in (4, 90),
    )


# A page-server checkpoint set up before the freeze, as
# WAITING_CHECKPOINT_SCRIPT, for a container paused by then: on "go" runc
# checkpoints it with --leave-running (CRIU finds the cgroup frozen and
# leaves it so) and its CRIU sends the pages to the page server at $6
# (ADDR:PORT), then the shell prints "checkpoint <status>" and ends. It runs
# under criu.UNCORK, to which it says runc's PID on fd 5: CRIU's socket to
# the page server is corked for good (criu/page-xfer.c), and its goodbye
# would wait 200 ms in the kernel with the container frozen. $1 runc, $2
# root, $3 images dir, $4 work dir, $5 container id, $6 ADDR:PORT.
PAGE_SERVER_CHECKPOINT_SCRIPT = r"""
runc=$1 root=$2 images=$3 work=$4 id=$5 ps=$6
umask 077  # the images hold the container's memory
rm -rf "$images" "$work" && mkdir -p "$images" "$work" || exit 90
read -r go || exit 4
[ "$go" = go ] || exit 4
"$runc" --root "$root" checkpoint --image-path "$images" --work-path "$work" --leave-running --page-server "$ps" \
    "$id" </dev/null >"$work/runc.out" 2>&1 5>&- &
c=$!
echo "$c" >&5
exec 5>&-
wait "$c"
echo "checkpoint $?"
"""

# Where UNCORK says that it took the cork off (criu.UNCORK, CRIUWEB_UNCORKED), in the work dir.
UNCORKED_FILE = "uncorked"


def open_page_server_checkpoint(conn: ssh.Connection, state: RuncState, container_id: str, images: str, work: str,
                                address: str, port: int):  # fmt: skip
    """Start a PAGE_SERVER_CHECKPOINT_SCRIPT shell under criu.UNCORK; its channel, for run_waiting_checkpoint."""
    host = f"[{address}]" if ":" in address else address
    return conn.open_command(
        ["env", f"CRIUWEB_UNCORKED={work}/{UNCORKED_FILE}", "python3", "-c", criu.UNCORK, address, str(port),
         "sh", "-c", PAGE_SERVER_CHECKPOINT_SCRIPT, "sh", state.binary, state.root, images, work, container_id,
         f"{host}:{port}"]
    )  # fmt: skip


def is_running(conn: ssh.Connection, state: RuncState, container_id: str) -> bool:
    """Whether runc has the container running (after a failed checkpoint, CRIU resumes it)."""
    r = conn.run([state.binary, "--root", state.root, "state", container_id], check=False)
    if r.rc != 0:
        return False
    try:
        return json.loads(r.stdout).get("status") in ("running", "paused")
    except ValueError:
        return False


def marker_path(container_id: str) -> str:
    return f"{MARKS_DIR}/{container_id}"


def marker_text(images: str, work: str, lazy: bool = False) -> str:
    return f"image={images}\nwork={work}\nlazy={1 if lazy else 0}\n"


# $1 marker path, $2 its text. Written whole, then renamed: the wrapper
# never reads half a marker.
MARK_SCRIPT = r"""
mkdir -p "${1%/*}" && chmod 700 "${1%/*}" && printf '%s' "$2" >"$1.new" && mv -f "$1.new" "$1"
"""


def mark_for_restore(conn: ssh.Connection, container_id: str, images: str, work: str, lazy: bool = False) -> None:
    """Make the next `docker start` of the container restore it from images."""
    conn.sh(MARK_SCRIPT, marker_path(container_id), marker_text(images, work, lazy))


def clear_marks(conn: ssh.Connection, container_id: str) -> None:
    path = marker_path(container_id)
    conn.run(["rm", "-f", "--", path, f"{path}.new", f"{path}.restoring", f"{path}.restored", f"{path}.failed"],
             check=False)  # fmt: skip


def runtime_ready(conn: ssh.Connection, info: dict) -> str:
    """The wrapper's path on a host whose engine registers it; raise if it cannot serve."""
    runtime = (info.get("Runtimes") or {}).get(RUNTIME_NAME)
    if not runtime:
        raise RuncError(
            f"{conn.name}: the Docker engine has no {RUNTIME_NAME!r} runtime; register scripts/criuweb-runtime "
            f'in daemon.json ("runtimes": {{"{RUNTIME_NAME}": {{"path": ...}}}}) and restart it'
        )
    path = runtime.get("path") or ""
    if conn.run(["test", "-x", path], check=False).rc != 0:
        raise RuncError(f"{conn.name}: the {RUNTIME_NAME!r} runtime's program {path!r} is missing")
    return path


def pause(conn: ssh.Connection, state: RuncState, container_id: str) -> None:
    """Freeze the container's cgroup, as `docker pause` does (quiet when it is frozen already)."""
    conn.run([state.binary, "--root", state.root, "pause", container_id], check=False)


# A lazy checkpoint: runc dumps everything but the memory, then CRIU serves
# the pages from the frozen container on a port of $6 until a lazy-pages
# daemon has pulled them all. Set up before the freeze: it makes the
# directories, asks the kernel for a free port (CRIU takes no port 0; Python
# starts slowly, so not inside the freeze), prints "port <port>" and waits
# for the word "go" (EOF: nothing is run). Then it prints "ready <runc pid>
# <port>" when CRIU serves (runc writes a zero byte to --status-fd then),
# and "exit <status>" when runc ends. $1 runc, $2 root, $3 images, $4 work,
# $5 container id, $6 address, then more checkpoint options.
LAZY_CHECKPOINT_SCRIPT = r"""
runc=$1 root=$2 images=$3 work=$4 id=$5 addr=$6; shift 6
umask 077  # the images hold the container's memory
rm -rf "$images" "$work" && mkdir -p "$images" "$work" || { echo "exit 90"; exit 0; }
port=$(python3 -c 'import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1])' "$addr") || { echo "exit 91"; exit 0; }
fifo="$work/.lazy-ready"
mkfifo -m 600 "$fifo" || { echo "exit 92"; exit 0; }
echo "port $port"
read -r go || exit 0
[ "$go" = go ] || exit 0
"$runc" --root "$root" checkpoint --image-path "$images" --work-path "$work" --lazy-pages \
    --page-server "$addr:$port" --status-fd 9 "$@" "$id" 9>"$fifo" </dev/null >"$work/runc.out" 2>&1 &
pid=$!
ready=$(head -c1 "$fifo" | od -An -tx1 | tr -d ' \n')
rm -f "$fifo"
[ "$ready" = 00 ] && echo "ready $pid $port"
wait "$pid"
echo "exit $?"
"""


class LazyCheckpoint:
    """A `runc checkpoint --lazy-pages` serving a container's memory, on an SSH channel of its own.

    Made before the freeze (the shell, its directories and its port);
    start() runs the checkpoint.
    """

    def __init__(self, conn: ssh.Connection, state: RuncState, container_id: str, images: str, work: str,
                 address: str, extra: list[str] | None = None, timeout: int = 600):  # fmt: skip
        self.conn = conn
        self.work = work
        self.chan = conn.open_command(
            ["sh", "-c", LAZY_CHECKPOINT_SCRIPT, "sh", state.binary, state.root, images, work, container_id,
             address, *(extra or [])],
            idle_timeout=timeout,
        )  # fmt: skip
        self.out = self.chan.makefile("r")
        self.pid: int | None = None
        self.port = 0
        line = self.out.readline().split()
        if len(line) == 2 and line[0] == "port":
            self.port = int(line[1])
            return
        self.chan.close()
        rc = criu.exit_status(line)
        raise RuncError(f"{conn.name}: the lazy checkpoint could not be set up (exit status {rc})", definitive=True)

    def start(self) -> None:
        """Checkpoint; return once CRIU serves the pages (self.pid: runc's PID)."""
        self.chan.sendall(b"go\n")
        line = self.out.readline().split()
        if len(line) == 3 and line[0] == "ready":
            self.pid, self.port = int(line[1]), int(line[2])
            return
        self.chan.close()
        rc = criu.exit_status(line)
        raise RuncError(
            f"{self.conn.name}: runc checkpoint --lazy-pages failed: {self.cause() or f'exit status {rc}'}",
            self.log_tail(),
            definitive=rc != -1,
        )

    def close(self) -> None:
        """Give up a checkpoint not started (its shell exits at EOF and runs nothing)."""
        self.chan.close()

    def log_tail(self) -> str:
        return criu.log_excerpt(self.conn.read_file(f"{self.work}/dump.log", check=False))

    def cause(self) -> str:
        runc_out = (self.conn.read_file(f"{self.work}/runc.out", check=False) or "").strip()
        return criu.first_error(self.log_tail()) or runc_out[-300:]

    def wait(self) -> int:
        """runc's exit status once every page was served (-1 if the channel broke)."""
        return criu.wait_exit_line(self.out, self.chan)


# Kill a lazy checkpoint that serves no one: CRIU first (runc's child), then
# runc, by their PIDs. $1: runc's PID.
STOP_LAZY_SCRIPT = r"""
[ "$(cat "/proc/$1/comm" 2>/dev/null)" = runc ] || exit 0  # gone, or a reused PID
kids=$(ps -o pid= --ppid "$1")
kill -KILL $kids "$1" 2>/dev/null
true
"""


def stop_lazy(conn: ssh.Connection, runc_pid: int) -> None:
    conn.sh(STOP_LAZY_SCRIPT, str(runc_pid), check=False)


# -- CRIU's TLS through runc ------------------------------------------------------------
#
# runc's checkpoint has no TLS flags, but it hands CRIU a configuration file
# over RPC (libcontainer handleCriuConfigurationFile): the one named by the
# container's "org.criu.config" annotation, else /etc/criu/runc.conf, which
# would apply to every container of the host. CRIU reads the file's options
# over the RPC ones ("Parsing config file ..." in dump.log), TLS included:
# measured with runc 1.1.5 and CRIU 4.2.1, a page-server checkpoint then logs
# "tls: TLS handshake completed". Docker 20.10 sets no annotations, but
# criuweb's runtime gives every container it creates one (annotate in
# scripts/criuweb-runtime), so a container running under it can be
# checkpointed with TLS.

CRIU_CONFIG_ANNOTATION = "org.criu.config"


def criu_config_path(container_id: str) -> str:
    """The per-container CRIU configuration file criuweb's runtime names in its annotation."""
    return f"{MARKS_DIR}/{container_id}.criu.conf"


# Prints the CRIU configuration file named in the container's runc state
# (its labels hold the annotations as KEY=VALUE), nothing if none.
# $1 runc root, $2 container id.
CRIU_CONFIG_SCRIPT = r"""
grep -o '"org\.criu\.config=[^"]*"' "$1/$2/state.json" 2>/dev/null | head -n 1 | sed 's/^"org\.criu\.config=//; s/"$//'
"""


def criu_config_of(conn: ssh.Connection, state: RuncState, container_id: str) -> str:
    """The per-container CRIU configuration file runc will pass on this container's checkpoint ("" if none)."""
    return conn.sh(CRIU_CONFIG_SCRIPT, state.root, container_id, check=False).stdout.strip()


# Writes CRIU's TLS options into a configuration file, readable by root
# alone. $1 the file, then CRIU's TLS arguments (--tls --tls-cacert F ...).
WRITE_CRIU_CONFIG_SCRIPT = r"""
f=$1; shift
umask 077
mkdir -p "${f%/*}" && chmod 700 "${f%/*}" || exit 1
: >"$f.new" || exit 1
while [ $# -gt 0 ]; do
    case $2 in --*|'') printf '%s\n' "${1#--}" >>"$f.new"; shift ;;
    *) printf '%s %s\n' "${1#--}" "$2" >>"$f.new"; shift 2 ;;
    esac
done
mv -f "$f.new" "$f"
"""


def write_criu_config(conn: ssh.Connection, path: str, criu_args: list[str]) -> None:
    """Put CRIU options (long ones, "--opt [value]") into a configuration file CRIU reads as runc's."""
    conn.sh(WRITE_CRIU_CONFIG_SCRIPT, path, *criu_args)


def remove_criu_config(conn: ssh.Connection, path: str) -> None:
    conn.run(["rm", "-f", "--", path, f"{path}.new"], check=False)
