"""The memory-streaming strategies end to end on the lab: page-server and lazy."""

import json
import os
import threading
import time
import uuid
from io import StringIO

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from migrations_app import lab, ssh
from migrations_app.engine import create_run, execute
from migrations_app.models import LAZY, PAGE_SERVER, PROCESS, ROLLED_BACK, SUCCEEDED, TrustedPair
from tests.support import wait_for

pytestmark = pytest.mark.lab

def values(path):
    return [int(v) for v in path.read_text().split()]


def assert_continuous(seq):
    assert seq and seq[0] == 0, seq[:3]
    assert seq == list(range(len(seq))), "values skipped or repeated"


@pytest.fixture
def memhog(hosts):
    """Start memhog (N MiB of random memory, a counter every 10 ms) on lab-1; kill every copy at the end."""
    started = []

    def start(mib=64):
        tag = uuid.uuid4().hex[:8]
        log, sums = settings.LAB_ROOT / f"memhog-{tag}.log", settings.LAB_ROOT / f"memhog-{tag}.sum"
        with ssh.Connection(hosts[0]) as conn:
            pid = lab.start_memhog(conn, mib, log, sums)
            wait_for(lambda: log.exists() and len(values(log)) >= 5, 60, "memhog did not start")
            checksum = lab.memhog_checksum(conn, pid, sums)
        proc = {"pid": pid, "log": log, "sums": sums, "pids": [pid], "checksum": checksum}
        started.append(proc)
        return proc

    yield start
    for proc in started:
        for pid in proc["pids"]:
            _kill_tree(pid)
        proc["log"].unlink(missing_ok=True)
        proc["sums"].unlink(missing_ok=True)


def _kill_tree(pid):
    # A restored tree lives under a namespace holder: kill both.
    try:
        ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return
    for p in (pid, ppid):
        if p > 1:
            try:
                os.kill(p, 9)
            except OSError:
                pass


def state_of(pid):
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def assert_same_memory(proc, pid, host):
    with ssh.Connection(host) as conn:
        assert lab.memhog_checksum(conn, pid, proc["sums"]) == proc["checksum"], "the process's memory changed"


def assert_moved(run, proc, target):
    """The process runs on the target only, with its memory and its counter intact."""
    new_pid = int(run.result_workload)
    proc["pids"].append(new_pid)
    assert lab.host_of_pid(new_pid) == target.name
    assert state_of(proc["pid"]) in (None, "Z"), "the source copy still exists"
    count = len(values(proc["log"]))
    wait_for(lambda: len(values(proc["log"])) >= count + 20, message="the counter stopped")
    assert_continuous(values(proc["log"]))
    assert_same_memory(proc, new_pid, target)
    return new_pid


def migrate(source, target, pid, strategy, **kwargs):
    return execute(create_run(source, target, PROCESS, pid, strategy=strategy), **kwargs)


def mounted(path):
    return any(line.split()[4] == str(path) for line in open("/proc/self/mountinfo"))


@pytest.mark.parametrize("trusted", [False, True], ids=["tls", "plain"])
def test_page_server_moves_a_process(hosts, memhog, trusted):
    lab1, lab2 = hosts
    if trusted:
        TrustedPair.trust(lab1, lab2)
    proc = memhog(64)
    seen = {}

    def look_at_target(ctx):
        if not ctx.state.dst_images:
            return  # after the source's pre-flight
        seen["tmpfs"] = mounted(ctx.state.dst_images)
        seen["tls_files"] = sorted(os.listdir(f"{ctx.state.dst_images}/.tls")) if not trusted else []

    run = migrate(lab1, lab2, proc["pid"], PAGE_SERVER, after_phase={"pre-flight": look_at_target})
    assert run.status == SUCCEEDED, run.error
    assert run.strategy == PAGE_SERVER and run.tls is (not trusted)
    assert run.to_dict()["tls"] is (not trusted)
    assert seen["tmpfs"], "the target's images were not on a tmpfs"
    assert seen["tls_files"] == ([] if trusted else ["cacert.pem", "cert.pem", "key.pem"])
    assert [p.name for p in run.phases.all()] == [
        "pre-flight", "pre-flight", "page server", "dump", "transfer", "restore", "verify", "cleanup",
    ]
    dump = run.phases.get(name="dump")
    # The memory went through the page server: 64 MiB of pages at least.
    assert dump.bytes >= 64 << 20 and dump.criu_stats["pages_written"] * 4096 == dump.bytes
    assert "TLS handshake completed" in dump.log if not trusted else "TLS" not in dump.log
    assert 0 < run.phases.get(name="transfer").bytes < 8 << 20  # the small images only
    assert run.phases.get(name="restore").criu_stats["pages_restored"] >= 64 * 256
    assert run.total_bytes == sum(p.bytes for p in run.phases.all())
    assert_moved(run, proc, lab2)
    images = f"{lab2.work_dir}/runs/{run.code}"
    assert not mounted(images) and not os.path.exists(images)
    assert not os.path.exists(f"{lab1.work_dir}/runs/{run.code}.tls")


def test_page_server_killed_during_dump_rolls_back(hosts, memhog):
    lab1, lab2 = hosts
    proc = memhog(256)
    killed = {}

    def kill_when_pages_flow(ctx):
        # A real failure in the middle of the dump: the target's page server
        # dies once pages are arriving.
        images, pid = ctx.state.dst_images, ctx.state.page_server_pid

        def watch():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(n.startswith("pages-") and os.path.getsize(f"{images}/{n}") > 0 for n in os.listdir(images)):
                    os.kill(pid, 9)
                    killed["at"] = time.monotonic()
                    return
                time.sleep(0.002)

        threading.Thread(target=watch, daemon=True).start()

    run = migrate(lab1, lab2, proc["pid"], PAGE_SERVER, after_phase={"page server": kill_when_pages_flow})
    assert killed, "the page server was not killed during the dump"
    assert run.status == ROLLED_BACK, (run.status, run.error)
    assert run.error.startswith("lab-1: criu dump failed"), run.error
    phases = list(run.phases.all())
    assert [p.name for p in phases][-2:] == ["dump", "rollback"]
    assert phases[-2].status == "failed" and phases[-1].status == "ok"
    # The same process runs on, on the source: never stopped for good, never copied.
    assert int(run.result_workload) == proc["pid"]
    assert state_of(proc["pid"]) in ("S", "R")
    count = len(values(proc["log"]))
    wait_for(lambda: len(values(proc["log"])) >= count + 20, message="the counter stopped")
    assert_continuous(values(proc["log"]))
    assert_same_memory(proc, proc["pid"], lab1)
    images = f"{lab2.work_dir}/runs/{run.code}"
    assert not mounted(images) and not os.path.exists(images)


def test_page_server_restore_failure_wakes_the_stopped_source(hosts, memhog):
    lab1, lab2 = hosts
    TrustedPair.trust(lab1, lab2)
    proc = memhog(16)
    seen = {}

    def break_images(ctx):
        # The dump left the source stopped; a real CRIU failure on the target.
        seen["source"] = state_of(proc["pid"])
        ctx.dst.sh('rm -f "$1"/pages-*.img', ctx.state.dst_images)

    run = migrate(lab1, lab2, proc["pid"], PAGE_SERVER, after_phase={"transfer": break_images})
    assert seen["source"] == "T"
    assert run.status == ROLLED_BACK, run.error
    assert run.error.startswith("lab-2: criu restore failed"), run.error
    assert int(run.result_workload) == proc["pid"]
    assert state_of(proc["pid"]) in ("S", "R")
    count = len(values(proc["log"]))
    wait_for(lambda: len(values(proc["log"])) >= count + 20, message="the counter stopped")
    assert_continuous(values(proc["log"]))
    assert_same_memory(proc, proc["pid"], lab1)


def test_lab_up_marks_its_pair_trusted(hosts):
    lab1, lab2 = hosts
    assert not TrustedPair.between(lab1, lab2)  # the test hosts start untrusted
    lab.up(log=lambda *a: None)
    assert TrustedPair.between(lab2, lab1)


@pytest.mark.parametrize("trusted", [False, True], ids=["tls", "plain"])
def test_lazy_moves_a_process(hosts, memhog, trusted):
    lab1, lab2 = hosts
    if trusted:
        TrustedPair.trust(lab1, lab2)
    proc = memhog(64)
    run = migrate(lab1, lab2, proc["pid"], LAZY)
    assert run.status == SUCCEEDED, run.error
    assert run.strategy == LAZY and run.tls is (not trusted)
    assert [p.name for p in run.phases.all()] == [
        "pre-flight", "pre-flight", "prepare", "dump", "transfer", "lazy-pages", "restore", "page pull", "verify",
        "cleanup",
    ]
    pull = run.phases.get(name="page pull")
    # The memory came after the restore, in the pull: 64 MiB at least.
    assert pull.bytes >= 64 << 20 and pull.criu_stats["uffd_pages_copied"] * 4096 == pull.bytes
    assert ("TLS handshake completed" in pull.log) is (not trusted)
    restore = run.phases.get(name="restore")
    # The downtime ended with the restore, before the pull.
    assert run.downtime_ms is not None and restore.ended <= pull.started
    assert run.total_bytes == sum(p.bytes for p in run.phases.all())
    assert_moved(run, proc, lab2)
    assert not os.path.exists(f"{lab2.work_dir}/runs/{run.code}")
    assert not os.path.exists(f"{lab1.work_dir}/runs/{run.code}.tls")


def test_lazy_source_killed_during_page_pull(hosts, memhog):
    lab1, lab2 = hosts
    TrustedPair.trust(lab1, lab2)
    proc = memhog(512)
    seen = {}

    def kill_source_criu(ctx):
        # A real failure between the restore and the last page: the source's
        # CRIU, which serves the pages, dies.
        seen["target_pid"] = ctx.state.target_pid
        try:
            os.kill(ctx.state.dump_pid, 9)
        except ProcessLookupError:
            pytest.fail("every page had arrived before the source's CRIU could be killed")

    run = migrate(lab1, lab2, proc["pid"], LAZY, after_phase={"restore": kill_source_criu})
    assert run.status == "failed", (run.status, run.error)
    assert "lab-1: criu dump serving the pages ended: killed by signal 9" in run.error, run.error
    assert "post-copy failed after the restore" in run.error and "was killed" in run.error, run.error
    phases = list(run.phases.all())
    assert [(p.name, p.status) for p in phases][-2:] == [("page pull", "failed"), ("rollback", "ok")]
    # As the docs say: the target copy is gone, the source runs from its state at the freeze.
    assert state_of(seen["target_pid"]) in (None, "Z")
    assert int(run.result_workload) == proc["pid"]
    assert state_of(proc["pid"]) in ("S", "R")
    count = len(values(proc["log"]))
    wait_for(lambda: len(values(proc["log"])) >= count + 20, message="the counter stopped")
    assert_same_memory(proc, proc["pid"], lab1)
    assert not os.path.exists(f"{lab2.work_dir}/runs/{run.code}")


def test_migrate_workload_strategy_option(hosts, memhog):
    proc = memhog(16)
    out = StringIO()
    call_command("migrate_workload", "--source", "lab-1", "--target", "lab-2", "--pid", str(proc["pid"]),
                 "--strategy", PAGE_SERVER, "--json", stdout=out)
    result = json.loads(out.getvalue())
    proc["pids"].append(int(result["result_workload"]))
    assert result["status"] == SUCCEEDED and result["strategy"] == PAGE_SERVER and result["tls"] is True
    assert [p["name"] for p in result["phases"]][2:4] == ["page server", "dump"]
    # A strategy the kind lacks gets a message, before anything moves.
    with pytest.raises(CommandError, match="no strategy 'engine' for a process"):
        call_command("migrate_workload", "--source", "lab-1", "--target", "lab-2", "--pid", str(proc["pid"]),
                     "--strategy", "engine", stdout=StringIO())


def test_page_server_target_cut_off_during_dump_rolls_back(hosts, memhog):
    lab1, lab2 = hosts
    TrustedPair.trust(lab1, lab2)
    proc = memhog(512)
    veth = next(h for h in lab.HOSTS if h.name == "lab-2").veth
    cut = {}

    def cut_when_pages_flow(ctx):
        # A real failure: lab-2 drops off the network while the pages flow to it.
        images = ctx.state.dst_images

        def watch():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                if any(n.startswith("pages-") and os.path.getsize(f"{images}/{n}") > 0 for n in os.listdir(images)):
                    lab.sh("ip", "link", "set", veth, "down")
                    cut["images"] = images
                    return
                time.sleep(0.002)

        threading.Thread(target=watch, daemon=True).start()

    run = create_run(lab1, lab2, PROCESS, proc["pid"], strategy=PAGE_SERVER, freeze_limit=6)
    try:
        execute(run, after_phase={"page server": cut_when_pages_flow})
    finally:
        lab.sh("ip", "link", "set", veth, "up")
    run.refresh_from_db()
    assert cut, "the network was not cut during the dump"
    assert run.status == ROLLED_BACK, run.error
    # The same process runs on, on the source, memory and counter intact.
    assert int(run.result_workload) == proc["pid"]
    assert state_of(proc["pid"]) in ("S", "R")
    count = len(values(proc["log"]))
    wait_for(lambda: len(values(proc["log"])) >= count + 20, message="the counter stopped")
    assert_continuous(values(proc["log"]))
    assert_same_memory(proc, proc["pid"], lab1)
    # lab-2 was out of reach in the rollback: its tmpfs waits for a recovery.
    assert run.stage == "leftovers" and "a tmpfs" in run.phases.get(name="rollback").detail
    wait_for(lambda: _ssh_ok(lab2), 30, "lab-2 did not come back")
    call_command("recover", stdout=StringIO())
    run.refresh_from_db()
    assert run.stage == "done" and run.status == ROLLED_BACK
    assert not mounted(cut["images"]) and not os.path.exists(cut["images"])


def _ssh_ok(host):
    try:
        with ssh.Connection(host) as conn:
            return conn.run(["true"]).rc == 0
    except ssh.SSHError:
        return False


def test_lazy_cut_off_from_the_source_during_page_pull_rolls_back(hosts, memhog, settings):
    # Without a stall limit the pull waited as long as the cut lasted: lazy-pages
    # blocks on its socket, and the restored copy in its page faults.
    settings.STREAM_IDLE_TIMEOUT = 5
    lab1, lab2 = hosts
    TrustedPair.trust(lab1, lab2)
    proc = memhog(512)
    netns = next(h for h in lab.HOSTS if h.name == "lab-2").netns
    # A real cut between the two hosts only: the controller still reaches both.
    rule = ["INPUT", "-s", lab1.address, "-j", "DROP"]
    seen = {}

    def cut(ctx):
        seen["target_pid"] = ctx.state.target_pid
        lab.sh("nsenter", f"--net=/run/netns/{netns}", "iptables", "-I", *rule)
        seen["cut"] = True

    try:
        run = migrate(lab1, lab2, proc["pid"], LAZY, after_phase={"restore": cut})
    finally:
        if seen.get("cut"):
            lab.sh("nsenter", f"--net=/run/netns/{netns}", "iptables", "-D", *rule)
    assert seen.get("cut")
    assert run.status == "failed", (run.status, run.error)
    assert "the page pull stalled" in run.error and "post-copy failed after the restore" in run.error, run.error
    assert [(p.name, p.status) for p in run.phases.all()][-2:] == [("page pull", "failed"), ("rollback", "ok")]
    # One copy: the target's is gone, the source runs on from the freeze.
    assert state_of(seen["target_pid"]) in (None, "Z")
    assert int(run.result_workload) == proc["pid"]
    assert state_of(proc["pid"]) in ("S", "R")
    count = len(values(proc["log"]))
    wait_for(lambda: len(values(proc["log"])) >= count + 20, message="the counter stopped")
    assert_same_memory(proc, proc["pid"], lab1)
    assert not os.path.exists(f"{lab2.work_dir}/runs/{run.code}")


def _state(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(line.split()[1] for line in f if line.startswith("State:"))
    except (OSError, StopIteration):
        return "gone"


def _criu_on(images):
    """PIDs of criu processes whose command line names images (the lab hosts share this machine's /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
            exe = os.readlink(f"/proc/{entry}/exe")
        except OSError:
            continue
        if exe.endswith("/criu") and images.encode() in argv:
            found.append(int(entry))
    return found


@pytest.mark.parametrize("lazy", [False, True], ids=["page-server", "lazy"])
def test_the_dump_starts_before_the_freeze_and_nothing_happens_without_the_word(hosts, lazy):
    """criu dump starts when its shell does and waits in its pre-dump action script: a dump that cannot
    start fails there, before any freeze, and a shell closed before "go" leaves the tree running, no criu."""
    from migrations_app import criu

    lab1, _ = hosts
    images = f"{lab1.work_dir}/predump-{uuid.uuid4().hex[:8]}"
    pid = None
    with ssh.Connection(lab1) as conn:
        try:
            conn.run(["mkdir", "-p", images])
            pid = lab.start_process(conn, "while :; do sleep 0.1; done", "x")
            extra = ["--leave-stopped", "--lazy-pages", "--address", "127.0.0.1", "--port", "1"] if lazy else []
            bad = criu.dump_argv(pid, images, extra=[*extra, "--no-such-option"])
            with pytest.raises(criu.CriuError, match="could not start"):
                criu.DumpSender(conn, images, bad, lazy=lazy)
            assert _state(pid) in ("S", "R")
            sender = criu.DumpSender(conn, images, criu.dump_argv(pid, images, extra=extra), lazy=lazy)
            waiting = _criu_on(images)
            assert waiting, "criu did not start before the word"
            sender.close()
            wait_for(lambda: not _criu_on(images), message="criu stayed after its shell was closed")
            assert _state(pid) in ("S", "R")  # never frozen, never stopped
            assert not os.path.exists(f"{images}/inventory.img")
        finally:
            if pid:
                os.kill(pid, 9)
            conn.run(["rm", "-rf", "--", images, f"{images}.hook", f"{images}.hook.go", f"{images}.hook.ready",
                      f"{images}.ready"], check=False)  # fmt: skip
