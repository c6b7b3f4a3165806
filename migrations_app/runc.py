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
# Where the wrapper looks for restore markers (its CRIUWEB_RUNTIME_MARKS).
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
