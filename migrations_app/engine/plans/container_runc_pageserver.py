"""Containers with page-server streaming, through runc under Docker.

As the runc stop-and-copy plan (container_runc), except for the memory:
`criu page-server` runs on the target before the freeze, and the source's
`runc checkpoint --page-server` sends the pages straight into the target's
tmpfs, host to host; only the small images, the writable layer and the log
pass through the controller.

The source is paused (`docker pause`, the cgroup freezer) and checkpointed
with --leave-running: CRIU finds the cgroup frozen and leaves it frozen, so
the source stays whole, paused, until its copy runs verified on the target,
and is killed only then. A rollback is `docker unpause`. (runc has no
--leave-stopped, and without --leave-running its checkpoint would kill the
source with its memory already on the target.)

The memory's connection uses CRIU's TLS unless the pair is a trusted
migration network. runc's checkpoint has no TLS flags; CRIU reads them from
the container's own configuration file, which runc names only for a
container created by criuweb's runtime (runc.criu_config_path): any other
container moves this way only on a trusted pair.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ... import criu, runc, ssh
from ...docker_engine import Engine, EngineError
from ...models import CONTAINER, PAGE_SERVER
from ..errors import MigrationError
from ..plan import Measured, Plan, Step
from . import container_engine as engine_plan
from . import container_runc
from .container_runc import RuncContainerState

if TYPE_CHECKING:
    from ..runner import Context


@dataclass
class RuncPageServerState(RuncContainerState):
    address: str = ""  # the target's address, where the page server listens
    port: int = 0
    page_server_pid: int | None = None
    paused: bool = False  # the source is paused by us and must be unpaused or killed


def preflight_source(ctx: Context):
    return container_runc.preflight_source_tls(ctx, "page-server streaming")


def preflight_target(ctx: Context):
    measured = container_runc.preflight_target(ctx)
    try:
        ctx.state.address = str(ipaddress.ip_address(ctx.target.address))
    except ValueError:
        # CRIU's --address takes an IP only.
        raise MigrationError(
            f"{ctx.target.name}: page-server streaming needs the host's address as an IP address, "
            f"not {ctx.target.address!r}"
        ) from None
    return measured


def start_page_server(ctx: Context):
    """Started before the freeze, with the checkpoint's shell, so that neither start-up is downtime."""
    s = ctx.state
    images = f"{s.dst_base}/images"
    ctx.dst.conn.run(["mkdir", "-p", "--", images])
    # The source connects: its CRIU is the TLS client.
    extra = container_runc.install_tls(ctx, s.address, server_on_source=False) if s.tls else []
    server = criu.PageServer(ctx.dst.conn, images, s.address, extra=extra)
    ctx.page_server = server
    s.port, s.page_server_pid = server.port, server.pid
    ctx.save_state()
    # The freeze then opens no SSH session and starts no shell or Python on
    # the source: "go" on this channel checkpoints.
    state = runc.RuncState(s.runc_binary, s.runc_root)
    ctx.ps_checkpoint = runc.open_page_server_checkpoint(
        ctx.src.conn, state, s.container["Id"], f"{s.src_base}/images", f"{s.src_base}/work", s.address, s.port
    )
    how = "CRIU's TLS" if s.tls else "no TLS: trusted network"
    return Measured(
        detail=f"listening on {s.address}:{s.port} (PID {server.pid}), {how}; the checkpoint waiting for the freeze"
    )


def checkpoint(ctx: Context):
    s = ctx.state
    cid = s.container["Id"]
    waiting = getattr(ctx, "ps_checkpoint", None)
    ctx.ps_checkpoint = None
    t0 = time.perf_counter()
    state = container_runc.pause_source(ctx)
    t1 = time.perf_counter()
    try:
        if waiting is not None:
            runc.run_waiting_checkpoint(ctx.src.conn, waiting, f"{s.src_base}/work")
        else:
            # A run resumed by a recovery: no shell waits; one SSH command.
            extra = ["--leave-running", "--page-server", f"{s.address}:{s.port}"]
            runc.checkpoint(ctx.src.conn, state, cid, f"{s.src_base}/images", f"{s.src_base}/work", extra)
    except runc.RuncError as e:
        server_log = ctx.page_server.log_tail()
        excerpt = e.log_excerpt + (f"\n--- {ctx.target.name}: page-server.log ---\n{server_log}" if server_log else "")
        raise criu.CriuError(str(e), excerpt) from e
    finally:
        if waiting is not None:
            waiting.close()
    t2 = time.perf_counter()
    rc = ctx.page_server.wait()
    t3 = time.perf_counter()
    s.page_server_pid = None
    if rc != 0:
        raise criu.CriuError(
            f"{ctx.target.name}: criu page-server failed ({'no exit status' if rc == -1 else f'exit status {rc}'}): "
            f"{ctx.page_server.log_cause()}",
            ctx.page_server.log_tail(),
        )
    s.checkpointed = True
    # CRIU's statistics (the bytes streamed) and log are read after the
    # restore (container_runc.record_dump): each read is an SSH round trip
    # that would fall in the downtime here.
    how = "in the shell started before the freeze" if waiting is not None else "over one SSH command"
    return Measured(
        detail=f"source paused ({(t1 - t0) * 1000:.0f} ms); pages streamed to {s.address}:{s.port} by runc "
        f"checkpoint {how} ({(t2 - t1) * 1000:.0f} ms); the page server's exit seen {(t3 - t2) * 1000:.0f} ms later"
    )


def cleanup(ctx: Context):
    return container_runc.cleanup_paused(ctx)


def _stop_page_server(conn, s: RuncPageServerState) -> None:
    if s.page_server_pid:
        conn.run(["kill", "-KILL", str(s.page_server_pid)], check=False)
        s.page_server_pid = None


def rollback(ctx: Context):
    container_runc.close_transfer(ctx)
    s = ctx.state
    c = s.container
    if s.page_server_pid:
        try:
            with ssh.Connection(ctx.target) as dst:
                _stop_page_server(dst, s)
        except ssh.SSHError:
            pass  # a page server alone runs nothing; the target copy is what matters
    leftovers = container_runc.disarm_target(ctx)
    with Engine(ctx.source, timeout=ctx.call_timeout()) as src:
        # A checkpoint whose channel was cut (the freeze limit) goes on in
        # runc: waited for before the unpause, as the stop-and-copy rollback does.
        container_runc.await_checkpoint(ctx, src, ctx.call_timeout())
        found = src.inspect(c["Id"])["State"]
        if found.get("Paused"):
            src.call("docker unpause", src.api.unpause, c["Id"])
            ctx.resumed_at = time.perf_counter()
        elif not found["Running"]:
            raise MigrationError(f"{ctx.source.name}: the container stopped; nothing to resume")
        return container_runc.finish_unpause(ctx, src, leftovers)


def abort(ctx: Context):
    container_runc.close_transfer(ctx)
    if ctx.dst is not None:
        try:
            _stop_page_server(ctx.dst.conn, ctx.state)
        except (ssh.SSHError, EngineError):
            pass
    container_runc.abort(ctx)


PLAN = Plan(
    kind=CONTAINER,
    strategy=PAGE_SERVER,
    label="page-server streaming (runc)",
    summary=(
        "criu page-server on the target before the freeze; the source paused and checkpointed by runc with "
        "its pages streamed straight into the target's tmpfs, with CRIU's TLS unless the pair is trusted "
        "(TLS needs a source under criuweb's runtime); "
        "the source stays paused until the target copy is verified."
    ),
    state=RuncPageServerState,
    steps=(
        Step("pre-flight", "source", preflight_source),
        Step("pre-flight", "target", preflight_target),
        Step("ship image", "both", engine_plan.ship_image, when=engine_plan.image_missing, workload_bytes=False),
        Step("prepare target", "target", container_runc.prepare_target),
        Step("prepare source", "source", engine_plan.prepare_source, when=engine_plan.has_restart_policy),
        Step("page server", "target", start_page_server),
        Step("checkpoint", "source", checkpoint, freezes=True),
        Step("transfer", "both", container_runc.transfer),
        Step("restore", "target", container_runc.restore, resumes=True),
        Step("verify", "target", engine_plan.verify, commits=True),
        Step("cleanup", "both", cleanup),
    ),
    rollback=rollback,
    abort=abort,
    moves_volumes=True,
    adopt=engine_plan.adopt,
    needs=container_runc.NEEDS,
)
