"""The benchmark matrix: memhog workloads of several sizes moved with every
strategy, interleaved, on the lab, beside CRIU's own figure on one host.

Each migration is a normal run (engine.execute) tagged with the benchmark's
name; the baseline (criu dump to tmpfs and criu restore on the host where
the workload is, no transfer) is stored as a run of strategy "baseline"
whose source and target are that host. After every run the benchmark checks
that nothing was lost: the memory checksum is the one taken at the start,
the counter went on without a gap or a repeated value, and exactly one
copy runs. A check that fails stops the benchmark with BenchmarkError.

This is lab-only code: it reads the workloads' counter files and /proc on
this machine, which the lab hosts share. The migrations themselves go
through SSH and the Engine API like any other run.
"""

from __future__ import annotations

import os
import shlex
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from . import criu, engine, lab, runc, ssh
from .docker_engine import Engine, redate_checkpoint_argv
from .engine import observe, plans
from .models import CONTAINER, PROCESS, SUCCEEDED, Host, MigrationRun, Phase, Stage, TrustedPair

BASELINE = "baseline"
# Issue 8's reference for containers: the seed's manual flow with Docker's
# CLI (checkpoint, copy into the target's data root, start --checkpoint).
SEED_FLOW = "seed-flow"
# Docker's own checkpoint and restore of a container on one engine, nothing
# moved (issue 8's "at least 5x faster than Docker's own"); slow for memory,
# so measured only when asked for.
DOCKER_LOCAL = "docker-local"
# A strategy measured twice: in plain TCP on the trusted lab pair, and with
# CRIU's TLS as any other pair would get it.
TLS_SUFFIX = "+tls"
# Where the baseline dumps: it must be a tmpfs (checked), like the target
# directory of the page-server strategy.
BASELINE_DIR = "/dev/shm"
MIB = 1024 * 1024


class BenchmarkError(Exception):
    """A check failed or the benchmark could not go on; the message says which run and why."""


@dataclass
class Workload:
    """One memhog of one size and kind, wherever it runs now."""

    kind: str
    mib: int
    host: Host
    ref: str  # PID (process) or container name
    argv: list[str]  # its command line, to find every copy in /proc
    counter: Path | None = None  # process: the file it appends its counter to
    checksum_file: str = ""
    checksum: str = ""
    last_value: int = -1  # the last counter value checked


@dataclass
class Result:
    run: MigrationRun
    variant: str  # strategy, "+tls" for the TLS variant, or "baseline"
    mib: int
    total_ms: float


@dataclass
class Matrix:
    sizes: list[int]
    variants: dict[str, list[str]]  # kind -> strategies (variants) to run
    runs: int
    baseline: bool
    name: str
    results: list[Result] = field(default_factory=list)


def variants_for(kind: str, wanted: list[str] | None) -> list[str]:
    """The strategies of a kind to measure (those registered), each TLS-capable one twice."""
    names = plans.strategies(kind)
    if wanted:
        unknown = [
            w
            for w in wanted
            if w.removesuffix(TLS_SUFFIX) not in plans.strategies() and w not in (BASELINE, SEED_FLOW, DOCKER_LOCAL)
        ]
        if unknown:
            raise BenchmarkError(f"no strategy {', '.join(unknown)} (known: {', '.join(plans.strategies())})")
        return [
            w
            for w in wanted
            if w.removesuffix(TLS_SUFFIX) in names or (w in (SEED_FLOW, DOCKER_LOCAL) and kind == CONTAINER)
        ]
    out = [SEED_FLOW] if kind == CONTAINER else []
    for name in names:
        out.append(name)
        # A process's page server uses CRIU's TLS unless the pair is trusted:
        # measure both. (A container gets TLS only under criuweb's runtime:
        # its +tls variants are measured on request.)
        if name == "page-server" and kind == PROCESS:
            out.append(name + TLS_SUFFIX)
    return out


# -- the lab and its workloads ------------------------------------------------------------


def lab_hosts(log: Callable[[str], None]) -> tuple[Host, Host]:
    """The two lab hosts, the lab brought up first if it is not."""
    status = lab.status()
    if not all(h["sshd"] and h["dockerd"] for h in status):
        log("the lab is not up: bringing it up")
        lab.up(log=log)
    for h in lab.HOSTS:
        lab.register(h)
    return Host.objects.get(name=lab.HOSTS[0].name), Host.objects.get(name=lab.HOSTS[1].name)


def copies(argv: list[str]) -> list[int]:
    """PIDs of every running process with exactly this command line (the lab hosts share /proc)."""
    want = [a.encode() for a in argv]
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "cmdline").read_bytes().split(b"\0")[:-1] == want and lab.pid_running(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def copies_of_benchmark(name: str) -> list[int]:
    """PIDs of every memhog a benchmark started that still runs (its files carry the benchmark's name)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if argv and argv[0].endswith(b"memhog") and any(f"{name}-".encode() in a for a in argv[1:]):
            if lab.pid_running(int(entry.name)):
                found.append(int(entry.name))
    return found


def start(kind: str, mib: int, host: Host, name: str, runtime: str | None = None) -> Workload:
    root = settings.LAB_ROOT / "bench"
    root.mkdir(exist_ok=True)
    if kind == PROCESS:
        counter = root / f"{name}.counter"
        checksum = str(root / f"{name}.checksum")
        counter.unlink(missing_ok=True)
        with ssh.Connection(host) as conn:
            pid = lab.start_memhog(conn, mib, counter, checksum)
        w = Workload(
            kind,
            mib,
            host,
            str(pid),
            [str(lab.MEMHOG), str(mib), str(counter), checksum],
            counter=counter,
            checksum_file=checksum,
        )
    else:
        # A checksum path of its own makes its command line unique on this
        # machine, where other labs may run memhog containers of the same size.
        argv = ["memhog", str(mib), "-", f"/{name}.checksum"]
        with Engine(host) as eng:
            eng.run_container(lab.MEMHOG_IMAGE, argv, name, runtime=runtime)
        w = Workload(kind, mib, host, name, argv, checksum_file=argv[-1])
    deadline = time.monotonic() + 60 + mib / 20  # filling a GiB with random words takes a while
    while len(counter_values(w)) < 5:
        if time.monotonic() > deadline:
            raise BenchmarkError(f"memhog {mib} MiB ({kind}) did not start counting on {host.name}")
        time.sleep(0.2)
    w.checksum = checksum_now(w)
    w.last_value = counter_values(w)[-1]
    return w


def stop(w: Workload) -> None:
    """Stop a workload wherever it is (by its PIDs, or its container on every lab host)."""
    if w.kind == PROCESS:
        for pid in copies(w.argv):
            _kill(pid)
        # SIGKILL is not instant: a process releasing a GiB takes a moment.
        deadline = time.monotonic() + 10
        while copies(w.argv) and time.monotonic() < deadline:
            time.sleep(0.05)
        return
    for host in Host.objects.filter(name__in=[h.name for h in lab.hosts()]):
        with Engine(host) as eng:
            if eng.exists(w.ref):
                eng.remove(w.ref)


def _kill(pid: int) -> None:
    # A restored tree sits under a namespace holder (its parent): both go.
    try:
        ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        ppid = 0
    holder = ppid if ppid > 1 and Path(f"/proc/{ppid}/cmdline").read_bytes().startswith(b"python3") else 0
    for p in (pid, holder):
        if p:
            try:
                os.kill(p, 9)
            except OSError:
                pass


def counter_values(w: Workload, kept: str | None = None) -> list[int]:
    """The counter values the workload wrote so far (a container's from its log)."""
    if w.kind == PROCESS:
        return lab.counter_values(w.counter.read_text()) if w.counter.exists() else []
    with Engine(w.host) as eng:
        return lab.counter_values(eng.logs(kept or w.ref))


def checksum_now(w: Workload) -> str:
    if w.kind == PROCESS:
        with ssh.Connection(w.host) as conn:
            return lab.memhog_checksum(conn, w.ref, w.checksum_file)
    with Engine(w.host) as eng:
        cid = eng.inspect(w.ref)["Id"]
        # memhog is the container's PID 1 and handles SIGUSR1.
        exec_id = eng.api.exec_create(cid, ["sh", "-c", lab.MEMHOG_CHECKSUM_SCRIPT, "sh", "1", w.checksum_file])["Id"]
        out, err = eng.api.exec_start(exec_id, demux=True)
        if eng.api.exec_inspect(exec_id)["ExitCode"] != 0:
            raise BenchmarkError(f"{w.ref}: no memhog checksum: {(err or b'').decode(errors='replace').strip()}")
        return (out or b"").decode().strip()


def check(w: Workload, what: str, before: list[int] | None = None) -> None:
    """Nothing lost: one copy, the same memory, the counter on without gap or repeat."""
    running = copies(w.argv)
    if w.kind == CONTAINER:
        # A container's memhog has the same command line in every lab on
        # this machine (another test session's too): count this lab's.
        ours = _lab_container_ids()
        running = [pid for pid in running if any(cid in _cgroup_path(pid) for cid in ours)]
    if len(running) != 1:
        where = ", ".join(f"{pid} ({_cgroup(pid)})" for pid in running)
        raise BenchmarkError(f"{what}: {len(running)} copies of memhog {w.mib} MiB run (PIDs {where}), not one")
    if w.kind == CONTAINER:
        hosts = [h for h in Host.objects.filter(name__in=[h.name for h in lab.hosts()]) if _container_running(h, w.ref)]
        if hosts != [w.host]:
            raise BenchmarkError(f"{what}: container {w.ref} runs on {[h.name for h in hosts]}, not on {w.host.name}")
    deadline = time.monotonic() + 5
    while True:
        now = counter_values(w)
        # A target whose log carries the source's lines too (as a path that
        # keeps the container's log may) repeats nothing: the same history.
        values = now if before and now[: len(before)] == before else (before or []) + now
        if w.last_value not in values:
            raise BenchmarkError(f"{what}: the counter's last checked value {w.last_value} is gone from its output")
        tail = values[values.index(w.last_value) :]
        if tail != list(range(w.last_value, w.last_value + len(tail))):
            bad = next(i for i, (a, b) in enumerate(zip(tail, tail[1:])) if b != a + 1)
            raise BenchmarkError(f"{what}: the counter went {tail[bad]} -> {tail[bad + 1]} (a gap or a repeat)")
        if len(tail) >= 3:
            break
        if time.monotonic() > deadline:
            raise BenchmarkError(f"{what}: the counter did not go on after {w.last_value}")
        time.sleep(0.05)
    checksum = checksum_now(w)
    if checksum != w.checksum:
        raise BenchmarkError(f"{what}: memory checksum {checksum}, {w.checksum} before: the memory changed")
    w.last_value = counter_values(w)[-1]


def _cgroup_path(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cgroup").read_text().strip()
    except OSError:
        return "gone"


def _cgroup(pid: int) -> str:
    return _cgroup_path(pid).rsplit("/", 1)[-1][:40]


def _lab_container_ids() -> list[str]:
    """Ids of every container, running or not, on this lab's engines."""
    ids = []
    for host in Host.objects.filter(name__in=[h.name for h in lab.hosts()]):
        with Engine(host) as eng:
            ids += [c["Id"] for c in eng.api.containers(all=True)]
    return ids


def _container_running(host: Host, name: str) -> bool:
    with Engine(host) as eng:
        found = eng.find_container(name)
    return bool(found and found["State"]["Running"])


# -- observing a process's counter file ---------------------------------------------------


class FileWatch:
    """Times when a file grows, seen from the controller every millisecond.

    The lab hosts share this machine's filesystem, so the controller sees a
    memhog's counter file grow wherever it runs: the longest time without
    growth, less the usual interval, is how long the workload did not run.
    """

    def __init__(self, path: Path, interval: float = 0.001):
        self.path = path
        self.interval = interval
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="criuweb-filewatch", daemon=True)

    def __enter__(self) -> FileWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        size = -1
        while not self._stop.is_set():
            try:
                now = self.path.stat().st_size
            except OSError:
                now = size
            if now != size:
                if size >= 0:
                    self.times.append(time.monotonic())
                size = now
            time.sleep(self.interval)

    def outage(self) -> tuple[float, float] | None:
        """(longest time without growth less the usual interval, usual interval), in ms."""
        if len(self.times) < 4:
            return None
        gaps = [(b - a) * 1000 for a, b in zip(self.times, self.times[1:])]
        usual = statistics.median(gaps)
        return max(max(gaps) - usual, 0.0), usual


def observe_file(run: MigrationRun, watch: FileWatch) -> None:
    """Store what the file watch saw as the run's observed downtime, unless the run observed one itself."""
    if run.observed_downtime_ms is not None:
        return
    found = watch.outage()
    if found is None:
        return
    run.observed_downtime_ms, usual = found
    run.observed_method = (
        f"counter file growth seen by the controller every {watch.interval * 1000:.0f} ms (shared lab "
        f"filesystem): longest time without growth, less the usual {usual:.0f} ms"
    )
    run.save(update_fields=["observed_downtime_ms", "observed_method"])


# -- one migration, one baseline ---------------------------------------------------------


def migrate(w: Workload, target: Host, variant: str, name: str) -> Result:
    strategy = variant.removesuffix(TLS_SUFFIX)
    if variant.endswith(TLS_SUFFIX):
        TrustedPair.objects.filter(host_a__in=[w.host, target], host_b__in=[w.host, target]).delete()
    else:
        TrustedPair.trust(w.host, target, note="the lab: both hosts are network namespaces of one machine")
    what = f"{w.kind} memhog {w.mib} MiB, {variant}, {w.host.name} -> {target.name}"
    # A kept source container keeps its log, where the counter's last values
    # before the move are; it is removed right after the checks.
    keep = w.kind == CONTAINER
    run = engine.create_run(w.host, target, w.kind, w.ref, keep_source=keep, strategy=strategy)
    run.benchmark = name
    MigrationRun.objects.filter(pk=run.pk).update(benchmark=name)
    t0 = time.perf_counter()
    if w.counter:
        with FileWatch(w.counter) as watch:
            run = engine.execute(run)
        observe_file(run, watch)
    else:
        run = engine.execute(run)
    total = (time.perf_counter() - t0) * 1000
    if run.status != SUCCEEDED or run.error:
        raise BenchmarkError(f"{what}: run {run.code} {run.status}: {run.error}")
    source = w.host
    before = None
    if keep:
        with Engine(source) as eng:
            before = lab.counter_values(eng.logs(w.ref))
            eng.remove(w.ref)
    w.host = target
    if w.kind == PROCESS:
        w.ref = run.result_workload
    check(w, what, before)
    return Result(run, variant, w.mib, total)


def seed_flow(w: Workload, target: Host, name: str, seq: int) -> Result:
    """The seed's manual flow, timed by the controller with Docker's CLI on the lab's sockets (no SSH).

    `docker checkpoint create` on the source, the checkpoint directory
    copied into the target container's (created before, as the flow
    allows), `docker start --checkpoint` there. Stored as a run of strategy
    "seed-flow"; observed downtime from both containers' logs.
    """
    src, dst = (next(h for h in lab.hosts() if h.name == host.name) for host in (w.host, target))
    what = f"seed flow, container memhog {w.mib} MiB, {w.host.name} -> {target.name}"
    cp = f"bench{seq}"
    image = lab._docker(src, "inspect", "-f", "{{.Config.Image}}", w.ref).stdout.strip()
    src_id = lab._docker(src, "inspect", "-f", "{{.Id}}", w.ref).stdout.strip()
    # --network none: the note's checked way to restore another engine's checkpoint.
    dst_id = lab._docker(dst, "create", "--network", "none", "--name", w.ref, image, *w.argv).stdout.strip()
    run = MigrationRun.objects.create(
        source=w.host, target=target, kind=CONTAINER, workload=w.ref, strategy=SEED_FLOW, status="running",
        started=timezone.now(), benchmark=name, stage=Stage.DONE,
    )  # fmt: skip
    marks = [("checkpoint", timezone.now(), time.perf_counter())]
    lab._docker(src, "checkpoint", "create", w.ref, cp, timeout=600)
    marks.append(("copy", timezone.now(), time.perf_counter()))
    checkpoints = dst.data_root / "containers" / dst_id / "checkpoints"
    lab.sh("mkdir", "-p", checkpoints)
    lab.sh("cp", "-a", src.data_root / "containers" / src_id / "checkpoints" / cp, checkpoints)
    marks.append(("restore", timezone.now(), time.perf_counter()))
    lab._docker(dst, "start", "--checkpoint", cp, w.ref, timeout=600)
    marks.append(("", timezone.now(), time.perf_counter()))
    for seq_no, ((phase, at, t), (_, end_at, end)) in enumerate(zip(marks, marks[1:])):
        Phase.objects.create(
            run=run, seq=seq_no, name=phase, host=target.name if phase == "restore" else w.host.name, status="ok",
            started=at, ended=end_at, duration_ms=(end - t) * 1000, detail="docker CLI on the lab's socket",
        )  # fmt: skip
    before, after = (lab._docker(h, "logs", "--timestamps", w.ref).stdout for h in (src, dst))
    gap = observe.log_gap(observe.parse_log(before), observe.parse_log(after))
    run.status, run.downtime_ms = SUCCEEDED, (marks[-1][2] - marks[0][2]) * 1000
    run.observed_downtime_ms = max(gap[0] - gap[1], 0.0) if gap else None
    run.observed_method = (
        "docker logs --timestamps: the source's last line to the target's first, less the usual interval" if gap else ""
    )
    run.ended = timezone.now()
    run.save()
    before_values = lab.counter_values(lab._docker(src, "logs", w.ref).stdout)
    lab._docker(src, "rm", "-f", w.ref)
    w.host = target
    check(w, what, before_values)
    return Result(run, SEED_FLOW, w.mib, run.downtime_ms)


# CRIU alone on one host, as the strategies' own runs use it, in one
# command so that no SSH round trip falls between the dump and the restore.
# $1: the images directory (on a tmpfs); $2: criu's dump argv, shlex-quoted
# by the controller; then the restore argv (criuweb's namespace holder with
# --go-fd 3, as every process restore). As in criu.RestoreReceiver, the
# holder (Python) starts first and waits, so that its start-up is not
# counted, as it is not in a migration. Then the dump (the migrations'
# options; --leave-stopped, as page-server and lazy use), right after it
# the restore; the controller kills the stopped original afterwards.
# Prints "<dump ns> <restore ns> <image bytes> <holder's status> <restored
# PID>", each time taken on the host itself.
TIMED_BASELINE = r"""
d=$1; dump=$2; shift 2
[ "$(stat -f -c %T "$(dirname "$d")")" = tmpfs ] || { echo "$(dirname "$d") is not a tmpfs" >&2; exit 5; }
rm -rf "$d" "$d.go" && mkdir -p "$d" || exit 5
mkfifo -m 600 "$d.go" "$d.res" || exit 5
# Its answer is read as soon as it is written, as a migration's controller
# reads it (the holder's own exit comes after).
exec 4<>"$d.res"
"$@" 3<>"$d.go" >"$d.res" &
holder=$!
sleep 0.5
t0=$(date +%s%N)
# $dump is shlex-quoted by the controller: eval only splits it back into words.
eval "$dump" || { kill -KILL "$holder"; rm -f "$d.go" "$d.res"; exit 6; }
t1=$(date +%s%N)
printf g >"$d.go"
read -r res <&4
t2=$(date +%s%N)
wait "$holder"
rm -f "$d.go" "$d.res"
echo $((t1 - t0)) $((t2 - t1)) $(du -sb --exclude=holder.pid "$d" | cut -f1) $res
"""


def baseline(w: Workload, name: str, seq: int) -> Result:
    """CRIU alone on the workload's host: dump to a tmpfs, restore from it, nothing moved."""
    host = w.host
    what = f"baseline, process memhog {w.mib} MiB on {host.name}"
    # /dev/shm is the machine's, and other labs may run a benchmark of the same name.
    images = f"{BASELINE_DIR}/criuweb-{name}-{seq}-{uuid.uuid4().hex[:8]}"
    run = MigrationRun.objects.create(
        source=host,
        target=host,
        kind=PROCESS,
        workload=w.ref,
        strategy=BASELINE,
        status="running",
        started=timezone.now(),
        benchmark=name,
        stage=Stage.DONE,
    )
    t0 = time.perf_counter()
    try:
        with ssh.Connection(host) as conn, FileWatch(w.counter) as watch:
            resolved = criu.resolve_process(conn, int(w.ref))
            mode, inner, _ = resolved
            dump_argv = criu.dump_argv(int(w.ref), images, None if mode == "root" else inner, ["--leave-stopped"])
            restore_argv = criu.restore_argv(images, go_fd=3)
            started = timezone.now()
            out = conn.sh(TIMED_BASELINE, images, shlex.join(dump_argv), *restore_argv, check=False, timeout=600)
            parts = out.stdout.split()
            if out.rc != 0 or len(parts) != 5 or parts[3] != "0":
                raise BenchmarkError(f"{what}: criu dump or restore failed: {out.stdout.strip()} "
                                     f"{out.stderr.strip()[-300:]}")  # fmt: skip
            dump_ns, restore_ns, nbytes, pid = int(parts[0]), int(parts[1]), int(parts[2]), int(parts[4])
            restored = started + timezone.timedelta(milliseconds=dump_ns / 1e6)
            # The original, left stopped by the dump as in the migrations, goes now.
            conn.run(["kill", "-KILL", w.ref], check=False)
            dump_stats = criu.read_stats(conn, f"{images}/stats-dump")
            restore_stats = criu.read_stats(conn, f"{images}/stats-restore")
            # The holder keeps running in its namespaces; only the images go.
            conn.run(["rm", "-rf", "--", images], check=False)
            time.sleep(0.3)  # a few counter values after the restore, for the outage's end
        dump_ms, restore_ms = dump_ns / 1e6, restore_ns / 1e6
        _phase(run, 0, "dump", host, started, dump_ms, f"to the tmpfs {images}", bytes=nbytes, criu_stats=dump_stats)
        _phase(run, 1, "restore", host, restored, restore_ms, f"PID {pid}", criu_stats=restore_stats)
        run.status, run.downtime_ms, run.total_bytes = SUCCEEDED, dump_ms + restore_ms, nbytes
        run.result_workload = str(pid)
    except BaseException as e:
        run.status, run.error = "failed", str(e)[:2000]
        raise
    finally:
        run.finished = timezone.now()
        run.save()
    observe_file(run, watch)
    w.ref = str(pid)
    check(w, what)
    return Result(run, BASELINE, w.mib, (time.perf_counter() - t0) * 1000)


def _phase(run: MigrationRun, seq: int, name: str, host: Host, started, ms: float, detail: str, **kw) -> None:
    Phase.objects.create(
        run=run, seq=seq, name=name, host=host.name, status="ok", started=started,
        ended=started + timezone.timedelta(milliseconds=ms), duration_ms=ms, detail=detail, **kw,
    )  # fmt: skip


def _criu_elapsed_ms(log_path: Path) -> float | None:
    """The last timestamp of a CRIU log (seconds since its start) in ms: CRIU's own time."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        if line.startswith("(") and ")" in line:
            try:
                return float(line[1 : line.index(")")]) * 1000
            except ValueError:
                continue
    return None


def container_baseline(w: Workload, name: str, seq: int) -> Result:
    """CRIU, through runc, on the container's own host: checkpoint to a tmpfs, restore from it, nothing moved.

    The same container's process tree with the options the runc plans use:
    `runc checkpoint` on its shim's runc state (timed on the controller,
    which is the lab hosts' machine: no SSH), then the restore of those
    images into a container created beforehand on the same engine with
    criuweb's runtime, by a plain `docker start` on the engine's socket,
    as the runc plans restore on a target. Docker's start (dockerd, shim,
    runc's hooks) is in the restore's time, as it is in every runc plan's;
    CRIU's own times, from its logs, are in the phases' details. What is
    left out is all a migration adds: SSH, the transfer, the second host.
    The restored copy takes the container's name; the old one is removed.
    """
    host = w.host
    labhost = next(h for h in lab.HOSTS if h.name == host.name)
    what = f"baseline, container memhog {w.mib} MiB on {host.name}"
    base = f"{BASELINE_DIR}/criuweb-{name}-{seq}"
    images, dump_work, restore_work = f"{base}/images", f"{base}/dump-work", f"{base}/restore-work"
    src_id = lab._docker(labhost, "inspect", "-f", "{{.Id}}", w.ref).stdout.strip()
    image = lab._docker(labhost, "inspect", "-f", "{{.Config.Image}}", w.ref).stdout.strip()
    with ssh.Connection(host) as conn:
        state = runc.runc_state(conn, src_id)
    clone = f"{w.ref}-b{seq}"
    clone_id = lab._docker(labhost, "create", "--runtime", runc.RUNTIME_NAME, "--name", clone, image, *w.argv).stdout
    clone_id = clone_id.strip()
    lab.sh("rm", "-rf", base)
    lab.sh("mkdir", "-p", images, dump_work)
    if lab.sh("stat", "-f", "-c", "%T", base).stdout.strip() != "tmpfs":
        raise BenchmarkError(f"{what}: {BASELINE_DIR} is not a tmpfs")
    run = MigrationRun.objects.create(
        source=host, target=host, kind=CONTAINER, workload=w.ref, strategy=BASELINE, status="running",
        started=timezone.now(), benchmark=name, stage=Stage.DONE,
    )  # fmt: skip
    t0 = time.perf_counter()
    try:
        dumped = timezone.now()
        t = time.perf_counter()
        out = lab.sh(state.binary, "--root", state.root, "checkpoint", "--image-path", images,
                     "--work-path", dump_work, src_id, check=False, timeout=600)  # fmt: skip
        dump_ms = (time.perf_counter() - t) * 1000
        if out.returncode != 0:
            raise BenchmarkError(f"{what}: runc checkpoint failed: {out.stderr.strip()[-300:]}")
        # Docker sees the exit (not timed: Docker's bookkeeping, not CRIU's work).
        lab._docker(labhost, "wait", src_id, timeout=60)
        nbytes = int(lab.sh("du", "-sb", images).stdout.split()[0])
        marker = Path(runc.marker_path(clone_id))
        marker.parent.mkdir(mode=0o700, exist_ok=True)
        marker.write_text(runc.marker_text(images, restore_work))
        restored = timezone.now()
        t = time.perf_counter()
        lab._docker(labhost, "start", clone, timeout=600)
        restore_ms = (time.perf_counter() - t) * 1000
        criu_dump = _criu_elapsed_ms(Path(dump_work) / "dump.log")
        criu_restore = _criu_elapsed_ms(Path(restore_work) / "restore.log")
        _phase(run, 0, "dump", host, dumped, dump_ms, f"runc checkpoint to the tmpfs {images}; CRIU's own "
               f"{criu_dump or 0:.0f} ms (dump.log)", bytes=nbytes)  # fmt: skip
        _phase(run, 1, "restore", host, restored, restore_ms, f"docker start through the {runc.RUNTIME_NAME} "
               f"runtime (runc restore); CRIU's own {criu_restore or 0:.0f} ms (restore.log)")  # fmt: skip
        run.status, run.downtime_ms, run.total_bytes = SUCCEEDED, dump_ms + restore_ms, nbytes
        run.result_workload = clone_id[:12]
    except BaseException as e:
        run.status, run.error = "failed", str(e)[:2000]
        raise
    finally:
        run.finished = timezone.now()
        run.save()
    before = lab.counter_values(lab._docker(labhost, "logs", src_id).stdout)
    gap = observe.log_gap(*(observe.parse_log(lab._docker(labhost, "logs", "--timestamps", c).stdout)
                            for c in (src_id, clone_id)))  # fmt: skip
    if gap:
        run.observed_downtime_ms = max(gap[0] - gap[1], 0.0)
        run.observed_method = "docker logs --timestamps: the old container's last line to the restored one's first"
        run.save(update_fields=["observed_downtime_ms", "observed_method"])
    lab._docker(labhost, "rm", "-f", src_id)
    lab._docker(labhost, "rename", clone, w.ref)
    lab.sh("rm", "-rf", base, check=False)
    check(w, what, before)
    return Result(run, BASELINE, w.mib, (time.perf_counter() - t0) * 1000)


def docker_local(w: Workload, name: str, seq: int) -> Result:
    """Docker's own checkpoint and restore of the container on its engine, nothing moved (CLI on the socket)."""
    host = w.host
    labhost = next(h for h in lab.HOSTS if h.name == host.name)
    what = f"docker checkpoint + restore, container memhog {w.mib} MiB on {host.name}"
    cp = f"bench-local{seq}"
    run = MigrationRun.objects.create(
        source=host, target=host, kind=CONTAINER, workload=w.ref, strategy=DOCKER_LOCAL, status="running",
        started=timezone.now(), benchmark=name, stage=Stage.DONE,
    )  # fmt: skip
    cid = lab._docker(labhost, "inspect", "-f", "{{.Id}}", w.ref).stdout.strip()
    try:
        at, t = timezone.now(), time.perf_counter()
        lab._docker(labhost, "checkpoint", "create", w.ref, cp, timeout=1200)
        checkpoint_ms = (time.perf_counter() - t) * 1000
        # containerd may still hold this very checkpoint (moby/moby#42900; the plans do the same).
        cp_dir = labhost.data_root / "containers" / cid / "checkpoints" / cp
        subprocess.run(redate_checkpoint_argv(str(cp_dir)), check=True)
        at2, t = timezone.now(), time.perf_counter()
        lab._docker(labhost, "start", "--checkpoint", cp, w.ref, timeout=1200)
        restore_ms = (time.perf_counter() - t) * 1000
        _phase(run, 0, "checkpoint", host, at, checkpoint_ms, "docker checkpoint create (CLI on the socket)")
        _phase(run, 1, "restore", host, at2, restore_ms, "docker start --checkpoint (CLI on the socket)")
        run.status, run.downtime_ms = SUCCEEDED, checkpoint_ms + restore_ms
    except BaseException as e:
        run.status, run.error = "failed", str(e)[:2000]
        raise
    finally:
        run.finished = timezone.now()
        run.save()
    lab._docker(labhost, "checkpoint", "rm", w.ref, cp, check=False)
    check(w, what)
    return Result(run, DOCKER_LOCAL, w.mib, run.downtime_ms)


# -- the matrix ---------------------------------------------------------------------------


def run_matrix(m: Matrix, log: Callable[[str], None]) -> list[Result]:
    """Start the workloads, move them round-robin (size x strategy) `runs` times, check each run."""
    lab1, lab2 = lab_hosts(log)
    workloads: list[Workload] = []
    try:
        for kind, variants in m.variants.items():
            for mib in m.sizes:
                if not variants and not m.baseline:
                    continue
                # A container's CRIU gets TLS options only under criuweb's runtime
                # (container_runc.preflight_source_tls): the +tls variants need it.
                tls_variant = kind == CONTAINER and any(v.endswith(TLS_SUFFIX) for v in variants)
                w = start(kind, mib, lab1, f"{m.name}-{kind[0]}{mib}", runc.RUNTIME_NAME if tls_variant else None)
                workloads.append(w)
                log(f"started {kind} memhog {mib} MiB on {lab1.name} ({w.ref}), checksum {w.checksum}")
        seq = 0
        for round_no in range(1, m.runs + 1):
            for w in workloads:
                for variant in m.variants[w.kind]:
                    target = lab2 if w.host.pk == lab1.pk else lab1
                    if variant == SEED_FLOW:
                        seq += 1
                        r = seed_flow(w, target, m.name, seq)
                    elif variant == DOCKER_LOCAL:
                        seq += 1
                        r = docker_local(w, m.name, seq)
                    else:
                        r = migrate(w, target, variant, m.name)
                    m.results.append(r)
                    log(_line(round_no, r))
                if m.baseline:
                    seq += 1
                    r = baseline(w, m.name, seq) if w.kind == PROCESS else container_baseline(w, m.name, seq)
                    m.results.append(r)
                    log(_line(round_no, r))
    finally:
        for w in workloads:
            try:
                stop(w)
            except Exception as e:  # the others still need stopping
                log(f"could not stop {w.kind} memhog {w.mib} MiB: {e}")
        # The lab pair is trusted, as lab up leaves it.
        TrustedPair.trust(lab1, lab2, note="the lab: both hosts are network namespaces of one machine")
    return m.results


def _line(round_no: int, r: Result) -> str:
    run = r.run
    observed = f"{run.observed_downtime_ms:7.0f}" if run.observed_downtime_ms is not None else "      -"
    route = f"{run.source.name} -> {run.target.name}" if run.source_id != run.target_id else run.source.name
    return (
        f"{round_no:2d} {run.kind:9} {r.mib:5d} MiB {r.variant:18} {route:16} downtime {run.downtime_ms:7.0f} ms "
        f"observed {observed} ms total {r.total_ms:7.0f} ms"
    )


@dataclass
class Row:
    kind: str
    mib: int
    variant: str
    n: int
    downtime_ms: float
    observed_ms: float | None
    total_ms: float
    ratio: float | None  # downtime / the baseline's of the same size


def summarize(results: list[Result]) -> list[Row]:
    """Medians per (kind, size, variant), with the ratio to the baseline of the same size."""
    groups: dict[tuple[str, int, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.run.kind, r.mib, r.variant), []).append(r)
    base = {
        (kind, mib): statistics.median(r.run.downtime_ms for r in rs)
        for (kind, mib, variant), rs in groups.items()
        if variant == BASELINE
    }
    rows = []
    for (kind, mib, variant), rs in sorted(
        groups.items(), key=lambda kv: (kv[0][0] != PROCESS, kv[0][0], kv[0][1], kv[0][2] != BASELINE, kv[0][2])
    ):
        downtime = statistics.median(r.run.downtime_ms for r in rs)
        observed = [r.run.observed_downtime_ms for r in rs if r.run.observed_downtime_ms is not None]
        rows.append(
            Row(
                kind,
                mib,
                variant,
                len(rs),
                downtime,
                statistics.median(observed) if observed else None,
                statistics.median(r.total_ms for r in rs),
                downtime / base[(kind, mib)] if (kind, mib) in base else None,
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table."""
    out = [
        "| kind | size | strategy | runs | downtime (median) | observed (median) | whole run (median) "
        "| downtime / baseline |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        observed = f"{r.observed_ms:.0f} ms" if r.observed_ms is not None else "–"
        ratio = f"{r.ratio:.2f}×" if r.ratio is not None else "–"
        out.append(
            f"| {r.kind} | {r.mib} MiB | {r.variant} | {r.n} | {r.downtime_ms:.0f} ms | {observed} "
            f"| {r.total_ms:.0f} ms | {ratio} |"
        )
    return "\n".join(out)


def command_line(m: Matrix) -> str:
    args = [
        "manage.py",
        "bench_matrix",
        "--sizes",
        ",".join(map(str, m.sizes)),
        "--runs",
        str(m.runs),
        "--kinds",
        ",".join(m.variants),
    ]
    return shlex.join(args)
