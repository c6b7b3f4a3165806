"""Byte streams between hosts: a command's output on one host piped into a
command on another, through the controller, with live progress."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from .. import ssh
from ..models import Phase
from .errors import MigrationError

if TYPE_CHECKING:
    from .runner import Context

# GNU tar flags that keep a writable layer exact: owners as numbers, and
# the trusted.overlay.* xattrs that mark opaque directories.
TAR_CREATE = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "-cf", "-", "-C"]
TAR_EXTRACT = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--same-owner", "-xpf", "-", "-C"]
# Progress is written to the database at most this often during a transfer.
PROGRESS_INTERVAL = 0.25


def pipe(ctx: Context, src, dst, what: str, keep_dst: bool = False, limit: int | None = None) -> int:
    """Pipe one started source command into one target command; return bytes.

    keep_dst: the target command goes on after the stream (a
    criu.RestoreReceiver, which then waits for "go"): neither closed nor
    awaited here. limit: exactly this many bytes, src left running and open.
    """
    last = [0.0]

    def progress(n):
        # Live progress for the run page, without a write per chunk.
        now = time.monotonic()
        if now - last[0] >= PROGRESS_INTERVAL and ctx.current_timer is not None:
            last[0] = now
            Phase.objects.filter(pk=ctx.current_timer.phase.pk).update(bytes=n)
            if ctx.on_progress:
                ctx.on_progress(ctx.current_timer.phase.name, n, ctx.run.expected_bytes)

    try:
        total, src_rc, dst_rc, src_err, dst_err = ssh.stream(src, dst, progress, keep_dst=keep_dst, limit=limit)
    finally:
        if limit is None:
            src.close()
        if not keep_dst:
            dst.close()
    # A lost connection first: the other side then fails only for want of
    # its peer (tar reads a truncated stream, or has no reader).
    sides = ((dst_rc, dst, dst_err, ctx.target, "writing"), (src_rc, src, src_err, ctx.source, "reading"))
    for rc, chan, err, host, doing in sides:
        if rc != 0 and ssh.channel_lost(chan):
            lost = ssh.ConnectionLost(host.name, f"{doing} {what}", f"exit status {rc}; stderr: {err.strip()[-300:]}")
            raise MigrationError(str(lost)) from lost
    # The target first: when it dies, the source fails only for lack of a reader.
    if dst_rc != 0:
        why = last_lines(dst_err) or ("no exit status" if dst_rc == -1 else f"exit status {dst_rc}")
        raise MigrationError(f"{ctx.target.name}: writing {what} failed: {why}")
    if src_rc != 0:
        why = last_lines(src_err) or ("no exit status" if src_rc == -1 else f"exit status {src_rc}")
        raise MigrationError(f"{ctx.source.name}: reading {what} failed: {why}")
    return total


def last_lines(text: str, limit: int = 300) -> str:
    """The whole last lines of a command's error output that fit in limit characters.

    A tar that met a full disk says so once per file: cut at a character
    count, the message began mid-word ("t on device").
    """
    kept: list[str] = []
    for line in reversed([x.strip() for x in text.strip().splitlines() if x.strip()]):
        if kept and sum(len(k) + 1 for k in kept) + len(line) > limit:
            break
        kept.insert(0, line if kept or len(line) <= limit else line[-limit:])
    return "\n".join(kept)


# Unpacks CRIU images ($1: the directory) and refuses anything but regular
# files and directories. CRIU's images are never links or devices; a source
# that sends one means to have a later step on this host (criu writing its
# log, the namespace holder writing its PID file) follow it out of the
# directory. In the same command as the unpacking: no extra round trip.
UNPACK_IMAGES = r"""
set -e
tar --numeric-owner --xattrs --xattrs-include='*' --same-owner -xpf - -C "$1"
odd=$(find "$1" ! -type f ! -type d -print -quit)
if [ -n "$odd" ]; then
    echo "refusing the images: $odd is not a regular file or directory" >&2
    rm -rf -- "$1"
    exit 3
fi
"""


def copy_dir(ctx: Context, src_dir: str, dst_dir: str) -> int:
    """Stream a directory of CRIU images from the source host into one on the target."""
    src = ctx.src_ssh.open_command(TAR_CREATE + [src_dir, "."])
    dst = ctx.dst_ssh.open_command(["sh", "-c", UNPACK_IMAGES, "sh", dst_dir])
    return pipe(ctx, src, dst, dst_dir)
