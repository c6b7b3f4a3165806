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

PAGE_SIZE = 4096


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
    """Started before the freeze, so its start-up is no downtime."""
    s = ctx.state
    images = f"{s.dst_base}/images"
    ctx.dst.conn.run(["mkdir", "-p", "--", images])
    # The source connects: its CRIU is the TLS client.
    extra = container_runc.install_tls(ctx, s.address, server_on_source=False) if s.tls else []
    server = criu.PageServer(ctx.dst.conn, images, s.address, extra=extra)
    ctx.page_server = server
    s.port, s.page_server_pid = server.port, server.pid
    ctx.save_state()
    how = "CRIU's TLS" if s.tls else "no TLS: trusted network"
    return Measured(detail=f"listening on {s.address}:{s.port} (PID {server.pid}), {how}")


def checkpoint(ctx: Context):
    s = ctx.state
    cid = s.container["Id"]
    state = container_runc.pause_source(ctx)
    extra = ["--leave-running", "--page-server", f"{s.address}:{s.port}"]
    try:
        runc.checkpoint(ctx.src.conn, state, cid, f"{s.src_base}/images", f"{s.src_base}/work", extra)
    except runc.RuncError as e:
        server_log = ctx.page_server.log_tail()
        excerpt = e.log_excerpt + (f"\n--- {ctx.target.name}: page-server.log ---\n{server_log}" if server_log else "")
        raise criu.CriuError(str(e), excerpt) from e
    rc = ctx.page_server.wait()
    s.page_server_pid = None
    if rc != 0:
        raise criu.CriuError(
            f"{ctx.target.name}: criu page-server failed ({'no exit status' if rc == -1 else f'exit status {rc}'}): "
            f"{ctx.page_server.log_cause()}",
            ctx.page_server.log_tail(),
        )
    s.checkpointed = True
    stats = criu.read_stats(ctx.src.conn, f"{s.src_base}/work/stats-dump")
    return Measured(
        bytes=stats.get("pages_written", 0) * PAGE_SIZE,
        criu_stats=stats,
        log=ctx.src.conn.read_file(f"{s.src_base}/work/dump.log", check=False) or "",
        detail=f"source paused; pages streamed to {s.address}:{s.port}",
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
