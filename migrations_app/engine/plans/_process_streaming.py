"""What the two process plans that leave the source stopped share: page-server
streaming (process_page_server) and post-copy (process_lazy).

Both dump with --leave-stopped and with CRIU's TLS unless the pair is a
trusted migration network; both then kill the stopped source once the move
is certain, or wake it on a rollback.
"""

from __future__ import annotations

import ipaddress
import time
from typing import TYPE_CHECKING

from ...models import TCP_CLOSE, Host, MigrationRun, TrustedPair
from .. import tls
from ..errors import MigrationError
from ..hostcheck import pid_alive, settle, signal_tree
from ..plan import Measured
from . import process_copy
from .process_copy import ProcessState

if TYPE_CHECKING:
    from ... import ssh
    from ..runner import Context

# Kill every criu process working on images dir $1 (its argv holds it).
# Only criu binaries are looked at: this shell's own argv holds $1 too.
KILL_DUMP_SCRIPT = r"""
for d in /proc/[0-9]*; do
    case $(readlink "$d/exe" 2>/dev/null) in */criu) ;; *) continue ;; esac
    tr '\0' '\n' < "$d/cmdline" 2>/dev/null | grep -qxF -- "$1" && kill -KILL "${d#/proc/}" 2>/dev/null
done
true
"""


def src_tls_dir(s: ProcessState) -> str:
    # Beside the images, not in them: the images travel to the target.
    return f"{s.src_images}.tls"


def record_tls(ctx: Context) -> None:
    """TLS unless the pair is a trusted migration network; stored with the run at once."""
    ctx.state.tls = not TrustedPair.between(ctx.source, ctx.target)
    ctx.run.tls = ctx.state.tls
    MigrationRun.objects.filter(pk=ctx.run.pk).update(tls=ctx.state.tls)


def refuse_kept_connections(ctx: Context, strategy: str) -> None:
    # The source tree stays stopped until the end; a rollback wakes it, but
    # CRIU keeps the network locked for connections it dumped to keep.
    if ctx.state.kept_addrs:
        raise MigrationError(
            f"{ctx.source.name}: keeping established TCP connections needs stop-and-copy; {strategy} leaves "
            f"the source stopped and could not give them back on a rollback. Use {TCP_CLOSE} or stop-and-copy"
        )


def host_ip(host: Host, strategy: str) -> str:
    """The host's address as an IP address: CRIU's --address takes an IP only, and the certificates name it."""
    try:
        return str(ipaddress.ip_address(host.address))
    except ValueError:
        raise MigrationError(
            f"{host.name}: {strategy} needs the host's address as an IP address, not {host.address!r}"
        ) from None


def install_tls(ctx: Context, server: tuple[ssh.Connection, str], client: tuple[ssh.Connection, str]) -> str:
    """Certificates for this run on both hosts (server and client: a connection and a directory),
    if the run uses TLS; what to add to the phase's detail."""
    s = ctx.state
    if not s.tls:
        return "; trusted migration network: no TLS"
    # Stored before a key is sent: a recovery after a crash here removes it by this path.
    ctx.save_state()
    server_pem, client_pem = tls.make_pair(s.address, f"criuweb run {ctx.run.code}")
    tls.install(*server, server_pem)
    tls.install(*client, client_pem)
    return "; TLS certificates for this run sent to both hosts"


def gone(conn, pid, tries: int = 20) -> bool:
    # A killed process needs a moment to die and be reaped.
    for _ in range(tries):
        if not pid_alive(conn, pid):
            return True
        time.sleep(0.05)
    return False


def kill_stopped_source(ctx: Context) -> None:
    """Kill the source tree that --leave-stopped kept, once the move is certain."""
    s = ctx.state
    signal_tree(ctx.src, s.pid, "KILL")
    if not gone(ctx.src, s.pid):
        raise MigrationError(f"{ctx.source.name}: the stopped source process {s.pid} could not be killed")
    s.source_stopped = False
    ctx.save_state()


def remove_source_files(ctx: Context) -> Measured:
    """The end of a cleanup: the source's certificates, and its images unless the run keeps them."""
    s = ctx.state
    ctx.src.run(["rm", "-rf", "--", src_tls_dir(s)])
    if ctx.run.keep_source:
        return Measured(detail=f"stopped source killed; its small images kept in {s.src_images}")
    ctx.src.run(["rm", "-rf", "--", s.src_images])
    return Measured(detail="stopped source killed; images and certificates removed on both hosts")


def wake_source(ctx: Context, src, leftovers: str) -> None:
    """Let the stopped source tree run again and record that it does."""
    s = ctx.state
    if not pid_alive(src, s.pid):
        raise MigrationError(f"{ctx.source.name}: process {s.pid} is gone; nothing to resume")
    # Stopped by --leave-stopped, or already resumed by CRIU after a failed dump.
    state = signal_tree(src, s.pid, "CONT")
    ctx.resumed_at = time.perf_counter()
    ctx.run.result_workload = str(s.pid)
    s.source_stopped = False
    # Recorded at once: from here a recovery must never wake or kill it again.
    ctx.resumed_on_source(leftovers)
    if state in ("T", "t") or not settle(lambda: pid_alive(src, s.pid)):
        raise MigrationError(f"{ctx.source.name}: process {s.pid} does not run again after rollback")


def close_waiting(ctx: Context) -> None:
    # The waiting dump and restore end at the EOF: neither acts without "go".
    for name in ("sender", "receiver"):
        waiting = getattr(ctx, name, None)
        if waiting is not None:
            waiting.close()


def abort_source(ctx: Context) -> None:
    """Remove the source's images and certificates while the tree runs on there."""
    s = ctx.state
    process_copy._on(
        ctx.src, ctx.source, lambda conn: conn.run(["rm", "-rf", "--", s.src_images, src_tls_dir(s)], timeout=60)
    )
