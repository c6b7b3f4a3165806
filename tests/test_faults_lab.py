"""The fault matrix, on the real lab: a controller killed mid-run, a target
engine that stops answering, a network cut during the transfer.

After each fault, exactly one copy of the workload runs and its counter goes
on: containers from their checkpointed value, processes with no value lost
or repeated. Freeze limits are a few seconds here (the per-run option), so
these tests stay fast.
"""

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from migrations_app import lab, runc, ssh
from migrations_app.docker_engine import Engine
from migrations_app.engine import create_run, execute
from migrations_app.engine.runner import TEST_PAUSE_ENV
from migrations_app.models import CONTAINER, PROCESS, ROLLED_BACK, SUCCEEDED, MigrationRun, Stage
from tests.support import wait_for

pytestmark = [pytest.mark.lab, pytest.mark.django_db(transaction=True)]

BASE_DIR = Path(__file__).resolve().parent.parent
# Short enough to keep the tests fast, long enough for a busy 2-core machine.
FREEZE_LIMIT = 6


def values(text):
    return [int(line) for line in text.split()]


def assert_consecutive(seq):
    assert seq, "the counter printed nothing"
    assert seq == list(range(seq[0], seq[0] + len(seq))), f"values skipped or repeated: {seq}"


def lab_host(name):
    return next(h for h in lab.HOSTS if h.name == name)


def _env():
    # The test settings (this session's lab) and the test database.
    return dict(os.environ, DJANGO_SETTINGS_MODULE="criuweb.settings_test",
                DATABASE_URL=f"sqlite:///{settings.DATABASES['default']['NAME']}")


def cli(*args, pause_after=None):
    """`manage.py migrate_workload` in a process of its own, on the test lab and database."""
    env = _env()
    if pause_after:
        env[TEST_PAUSE_ENV] = f"{pause_after}=120"
    return subprocess.Popen([sys.executable, "manage.py", "migrate_workload", *args], cwd=BASE_DIR, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when_paused(proc, phase):
    """SIGKILL the CLI once it says it paused right after `phase`; return what it printed."""
    lines = []
    deadline = time.monotonic() + 120
    for line in proc.stderr:
        lines.append(line)
        if f"criuweb test pause: after {phase}" in line:
            proc.kill()
            proc.wait()
            return lines
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise AssertionError(f"the CLI never reached {phase}: {''.join(lines)}{proc.stdout.read()}")


def recover_all():
    """`manage.py recover`, in a process of its own as a person would run it."""
    done = subprocess.run([sys.executable, "manage.py", "recover"], cwd=BASE_DIR, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def running_copies(hosts, name):
    """The hosts where a container of that name runs."""
    found = []
    for host in hosts:
        with Engine(host) as engine:
            c = engine.find_container(name)
            if c and c["State"]["Running"]:
                found.append(host.name)
    return found


# -- the controller killed ------------------------------------------------------------


@pytest.mark.parametrize("phase", ["checkpoint", "transfer", "restore"])
def test_cli_killed_container(hosts, counter_container, phase):
    lab1, lab2 = hosts
    name = counter_container
    proc = cli("--source", "lab-1", "--target", "lab-2", "--container", name, "--freeze-limit", "300",
               pause_after=phase)
    kill_when_paused(proc, phase)
    run = MigrationRun.objects.get(workload=name)
    assert run.status == "running" and run.stage in (Stage.FROZEN, Stage.RESTORING)
    with Engine(lab1) as engine:
        before = values(engine.logs(name))  # what it printed until the checkpoint froze it
    recover_all()
    run.refresh_from_db()
    assert f"PID {proc.pid} on" in run.error, run.error  # the dead CLI named, not "the server stopped"
    assert run.stage == Stage.DONE
    assert running_copies(hosts, name) == (["lab-2"] if run.status == SUCCEEDED else ["lab-1"])
    if phase == "restore":
        # Restored on lab-2 before the CLI died: kept there, not thrown away.
        assert run.status == SUCCEEDED, run.error
        assert "runs on lab-2" in run.error
        with Engine(lab2) as engine:
            after = wait_for(lambda: (v := values(engine.logs(name))) and len(v) >= len(before) + 2 and v)
        # Its log came with it: what it printed on lab-1, then on from the checkpointed value.
        assert after[: len(before)] == before, (before[-3:], after[:3])
        assert_consecutive(after)
        with Engine(lab1) as engine:
            assert not engine.exists(name)
    else:
        assert run.status == ROLLED_BACK, run.error
        assert "runs on lab-1 again" in run.error and "checkpoint cw-" in run.error, run.error
        with Engine(lab1) as engine:
            count = len(before)
            after = wait_for(lambda: (v := values(engine.logs(name))) and len(v) >= count + 2 and v)
        # The same container's log: from its first value, through the
        # checkpoint, on from the checkpointed value with nothing lost.
        assert_consecutive(after)
        with Engine(lab1) as engine:
            assert engine.checkpoints(name) == [], "the checkpoint stays on lab-1"
        with Engine(lab2) as engine:
            assert not engine.exists(name), "the prepared target container stays"


@pytest.fixture
def counter_process(hosts):
    path = settings.LAB_ROOT / f"counter-{uuid.uuid4().hex[:8]}.log"
    with ssh.Connection(hosts[0]) as conn:
        pid = lab.start_process(conn, lab.PROCESS_COUNTER_SCRIPT, str(path))
    wait_for(lambda: path.exists() and len(values(path.read_text())) >= 2, message="counter did not start")
    yield path
    for pid in counter_pids(path):
        _kill_with_holder(pid)
    path.unlink(missing_ok=True)


def counter_pids(path):
    """PIDs of the counter processes writing to path, wherever they run."""
    wanted = ["sh", "-c", lab.PROCESS_COUNTER_SCRIPT, "sh", str(path)]
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = [a.decode() for a in (entry / "cmdline").read_bytes().split(b"\0")[:-1]]
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if argv == wanted and stat[0] != "Z":
            parents[int(entry.name)] = int(stat[1])
    # The shell forks for each `sleep 1`; until that child execs, it has the
    # counter's command line too. A copy's parent is never another copy.
    return [pid for pid, ppid in parents.items() if ppid not in parents]


def _kill_with_holder(pid):
    # A restored tree lives under a namespace holder: kill both.
    try:
        ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return
    for p in (pid, ppid):
        if p > 1:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


@pytest.mark.parametrize("phase", ["dump", "transfer", "restore"])
def test_cli_killed_process(hosts, counter_process, phase):
    path = counter_process
    (pid,) = counter_pids(path)
    proc = cli("--source", "lab-1", "--target", "lab-2", "--pid", str(pid), "--freeze-limit", "300",
               pause_after=phase)
    kill_when_paused(proc, phase)
    recover_all()
    run = MigrationRun.objects.get(workload=str(pid))
    assert run.stage == Stage.DONE, run.error
    pids = wait_for(lambda: counter_pids(path), message="no counter runs after the recovery")
    assert len(pids) == 1, f"{len(pids)} copies run"
    where = lab.host_of_pid(pids[0])
    if phase == "restore":
        assert run.status == SUCCEEDED and where == "lab-2", run.error
    else:
        assert run.status == ROLLED_BACK and where == "lab-1", run.error
        assert "restored from the images in" in run.error
    assert run.result_workload == str(pids[0])
    count = len(values(path.read_text()))
    wait_for(lambda: len(values(path.read_text())) >= count + 2, message="the counter stopped")
    # One file across both hosts: no value lost, none written twice.
    assert_consecutive(values(path.read_text()))
    for host in hosts:
        with ssh.Connection(host) as conn:
            left = conn.run(["ls", f"{host.work_dir}/runs"], check=False).stdout.split()
        assert str(run.code) not in " ".join(left), f"images of the run left on {host.name}: {left}"


@pytest.mark.parametrize("strategy, phase", [("page-server", "dump"), ("lazy", "restore")])
def test_cli_killed_with_the_source_stopped_gets_a_true_message(hosts, counter_process, strategy, phase):
    # These strategies keep the source stopped and wake it on a rollback: the
    # recovery's message said it was "restored from the images", and a lazy
    # run whose copy had run on the target was reported rolled back.
    path = counter_process
    (pid,) = counter_pids(path)
    proc = cli("--source", "lab-1", "--target", "lab-2", "--pid", str(pid), "--strategy", strategy,
               "--freeze-limit", "300", pause_after=phase)
    kill_when_paused(proc, phase)
    recover_all()
    run = MigrationRun.objects.get(workload=str(pid))
    assert run.stage == Stage.DONE, run.error
    pids = wait_for(lambda: counter_pids(path), message="no counter runs after the recovery")
    assert len(pids) == 1, f"{len(pids)} copies run"
    assert pids[0] == pid and lab.host_of_pid(pid) == "lab-1"
    assert "restored from the images" not in run.error, run.error
    if strategy == "lazy":
        # The copy ran on lab-2 before it was killed: no clean rollback.
        assert run.status == "failed" and "post-copy failed after the restore" in run.error, run.error
    else:
        assert run.status == ROLLED_BACK, run.error
        assert_consecutive(values(path.read_text()))
    count = len(values(path.read_text()))
    wait_for(lambda: len(values(path.read_text())) >= count + 2, message="the counter stopped")


# -- a target engine that stops answering ------------------------------------------------


def test_stalled_target_engine_rolls_back_within_the_limit(hosts, counter_container):
    lab1, lab2 = hosts
    name = counter_container
    dockerd = lab._alive(lab_host("lab-2").dockerd_pid)
    seen = {}

    def stop_engine(ctx):
        os.kill(dockerd, signal.SIGSTOP)
        seen["stopped"] = True

    run = create_run(lab1, lab2, CONTAINER, name, freeze_limit=FREEZE_LIMIT)
    try:
        execute(run, after_phase={"prepare target": stop_engine})
        run.refresh_from_db()
        # Ended by the freeze limit, not by a call's own (10-minute) timeout.
        assert run.status == ROLLED_BACK, run.error
        assert run.error.startswith(f"restore did not end within the freeze limit of {FREEZE_LIMIT} s"), run.error
        assert run.stage == Stage.LEFTOVERS  # the engine never answered: its container waits for a recovery
        print(f"\nfreeze with the target engine stopped, limit {FREEZE_LIMIT} s: {run.downtime_ms:.0f} ms")
        with Engine(lab1) as engine:
            assert engine.inspect(name)["State"]["Running"]
        target_id = run.state["target_id"]
        checkpoint_dir = lab_host("lab-2").data_root / "containers" / target_id / "checkpoints" / run.state["checkpoint"]
        assert not checkpoint_dir.exists(), "the target copy could still start"
    finally:
        if seen:
            os.kill(dockerd, signal.SIGCONT)
    # The engine now carries out the restore it queued: it must fail, for
    # want of the checkpoint, rather than start a second copy.
    with Engine(lab2) as engine:
        wait_for(lambda: engine.find_container(target_id) is None
                 or engine.inspect(target_id)["State"]["Status"] in ("created", "exited"), 30)
        time.sleep(2)  # time for a late start to show, were it to happen
    assert running_copies(hosts, name) == ["lab-1"]
    recover_all()
    run.refresh_from_db()
    assert run.stage == Stage.DONE and run.status == ROLLED_BACK, run.error
    with Engine(lab2) as engine:
        assert engine.find_container(target_id) is None
    assert running_copies(hosts, name) == ["lab-1"]


# -- a network cut during the transfer ------------------------------------------------------


def test_network_cut_during_transfer_rolls_back_and_leftovers_go(hosts, counter_container):
    lab1, lab2 = hosts
    name = counter_container
    veth = lab_host("lab-2").veth
    cut = {}

    def cut_network(ctx):
        lab.sh("ip", "link", "set", veth, "down")
        cut["at"] = time.monotonic()

    run = create_run(lab1, lab2, CONTAINER, name, freeze_limit=FREEZE_LIMIT)
    try:
        execute(run, after_phase={"checkpoint": cut_network})
    finally:
        lab.sh("ip", "link", "set", veth, "up")
    run.refresh_from_db()
    assert run.status == ROLLED_BACK, run.error
    assert "freeze limit" in run.error, run.error
    assert run.phases.get(name="transfer").status == "failed"
    print(f"\nfreeze with the network cut during the transfer, limit {FREEZE_LIMIT} s: {run.downtime_ms:.0f} ms")
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Running"]
        assert values(engine.logs(name))
    target_id = run.state["target_id"]
    container_dir = lab_host("lab-2").data_root / "containers" / target_id
    # lab-2 was out of reach during the rollback: what the run made there
    # (a created container, its staging directory) waits for a recovery.
    assert run.stage == Stage.LEFTOVERS, run.stage
    wait_for(lambda: ssh_ok(lab2), 30, "lab-2 did not come back")
    recover_all()
    run.refresh_from_db()
    assert run.stage == Stage.DONE and run.status == ROLLED_BACK, run.error
    assert not container_dir.exists()
    with Engine(lab2) as engine:
        assert engine.find_container(target_id) is None
    assert running_copies(hosts, name) == ["lab-1"]


def test_network_cut_during_a_runc_transfer_leaves_no_images_after_recovery(hosts, counter_container):
    """The fast path's images in the target's tmpfs (the container's memory)
    are leftovers too: the recovery that removes the created container removes
    them, on connections of its own."""
    lab1, lab2 = hosts
    name = counter_container
    veth = lab_host("lab-2").veth
    seen = {}

    def cut_network(ctx):
        seen["dst_base"] = ctx.state.dst_base
        lab.sh("ip", "link", "set", veth, "down")

    run = create_run(lab1, lab2, CONTAINER, name, freeze_limit=FREEZE_LIMIT, strategy="stop-and-copy")
    try:
        execute(run, after_phase={"checkpoint": cut_network})
    finally:
        lab.sh("ip", "link", "set", veth, "up")
    run.refresh_from_db()
    assert run.status == ROLLED_BACK, run.error
    assert run.stage == Stage.LEFTOVERS, run.stage
    assert Path(seen["dst_base"]).exists(), "nothing reached lab-2: the test shows nothing"
    wait_for(lambda: ssh_ok(lab2), 30, "lab-2 did not come back")
    recover_all()
    run.refresh_from_db()
    assert run.stage == Stage.DONE and run.status == ROLLED_BACK, run.error
    assert not Path(seen["dst_base"]).exists(), "the images stay in lab-2's tmpfs"
    assert running_copies(hosts, name) == ["lab-1"]


def ssh_ok(host):
    try:
        with ssh.Connection(host) as conn:
            return conn.run(["true"]).rc == 0
    except ssh.SSHError:
        return False


# -- a freeze limit that cuts a call off midway ----------------------------------------------


def test_freeze_limit_cutting_a_checkpoint_off_waits_for_it(hosts):
    """The checkpoint call is cut off while runc still checkpoints: the rollback
    waits for it and restores from it, rather than finding the container still
    running and leaving it to stop a moment later."""
    lab1, lab2 = hosts
    name = f"memhog-{uuid.uuid4().hex[:8]}"
    with Engine(lab1) as engine:
        lab.run_memhog_container(engine, name, 256)
        wait_for(lambda: len(lab.counter_values(engine.logs(name))) >= 5, 60, "memhog did not start")
        checksum = lab.memhog_container_checksum(engine, name)
    try:
        run = execute(create_run(lab1, lab2, CONTAINER, name, freeze_limit=1))
        assert run.status == ROLLED_BACK, run.error
        assert run.error.startswith("checkpoint did not end within the freeze limit of 1 s"), run.error
        print(f"\nfreeze with a checkpoint cut off at 1 s: {run.downtime_ms:.0f} ms until it ran again on lab-1")
        assert running_copies(hosts, name) == ["lab-1"]
        with Engine(lab1) as engine:
            # Restored from the checkpoint: the same memory, the counter going on.
            assert lab.memhog_container_checksum(engine, name) == checksum
            count = len(lab.counter_values(engine.logs(name)))
            wait_for(lambda: len(lab.counter_values(engine.logs(name))) > count + 5, 30, "the counter stopped")
            assert_consecutive(lab.counter_values(engine.logs(name)))
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)


def test_freeze_limit_cutting_a_page_server_checkpoint_off_waits_for_it(hosts):
    """The page-server checkpoint, run by the shell started before the freeze,
    is cut off by the freeze limit while runc dumps the paused container: the
    run rolls back to the container running on the source, not paused, its
    memory unchanged."""
    lab1, lab2 = hosts
    lab.trust_pair()
    name = f"memhog-{uuid.uuid4().hex[:8]}"
    with Engine(lab1) as engine:
        lab.run_memhog_container(engine, name, 512)
        wait_for(lambda: len(lab.counter_values(engine.logs(name))) >= 5, 60, "memhog did not start")
        checksum = lab.memhog_container_checksum(engine, name)
    try:
        # 0.3 s: docker pause and the start of the dump fit, streaming 512 MiB does not.
        run = execute(create_run(lab1, lab2, CONTAINER, name, freeze_limit=0.3, strategy="page-server"))
        assert run.status == ROLLED_BACK, run.error
        assert run.error.startswith("checkpoint did not end within the freeze limit of 0.3 s"), run.error
        assert running_copies(hosts, name) == ["lab-1"]
        with Engine(lab1) as engine:
            assert not engine.inspect(name)["State"]["Paused"]
            # Running for real: the counter goes on, the memory unchanged.
            count = len(lab.counter_values(engine.logs(name)))
            wait_for(lambda: len(lab.counter_values(engine.logs(name))) > count + 5, 30, "the counter stopped")
            assert_consecutive(lab.counter_values(engine.logs(name)))
            assert lab.memhog_container_checksum(engine, name) == checksum
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)


def test_freeze_limit_cutting_a_dump_off_waits_for_it(hosts):
    lab1, lab2 = hosts
    tag = uuid.uuid4().hex[:8]
    log, sums = settings.LAB_ROOT / f"memhog-{tag}.log", settings.LAB_ROOT / f"memhog-{tag}.sum"
    with ssh.Connection(lab1) as conn:
        pid = lab.start_memhog(conn, 256, log, sums)
        wait_for(lambda: log.exists() and len(lab.counter_values(log.read_text())) >= 5, 60, "memhog did not start")
        checksum = lab.memhog_checksum(conn, pid, sums)
    pids = [pid]
    try:
        run = execute(create_run(lab1, lab2, PROCESS, str(pid), freeze_limit=0.2))
        assert run.status == ROLLED_BACK, run.error
        assert run.error.startswith("dump did not end within the freeze limit of 0.2 s"), run.error
        print(f"\nfreeze with a dump cut off at 0.2 s: {run.downtime_ms:.0f} ms until it ran again on lab-1")
        new_pid = int(run.result_workload)
        pids.append(new_pid)
        assert lab.host_of_pid(new_pid) == "lab-1"
        with ssh.Connection(lab1) as conn:
            assert lab.memhog_checksum(conn, new_pid, sums) == checksum, "the memory changed"
        count = len(lab.counter_values(log.read_text()))
        wait_for(lambda: len(lab.counter_values(log.read_text())) > count + 5, 30, "the counter stopped")
        assert_consecutive(lab.counter_values(log.read_text()))
    finally:
        for p in pids:
            _kill_with_holder(p)
        log.unlink(missing_ok=True)
        sums.unlink(missing_ok=True)


def test_cli_killed_during_a_lazy_pull_rolls_back(hosts):
    """Killed after a post-copy restore, with the source's CRIU then gone too:
    the target copy ran on part of its memory, so a recovery must not keep it
    (and remove the source, the only whole copy) just because it runs."""
    lab1, lab2 = hosts
    lab.trust_pair()
    name = f"lazykill-{uuid.uuid4().hex[:8]}"
    with Engine(lab1) as engine:
        # Large enough that the pull is still going when the restore phase ends.
        lab.run_memhog_container(engine, name, 512)
        wait_for(lambda: len(lab.counter_values(engine.logs(name, tail=5))) >= 2, 30, "memhog did not start")
        before = lab.memhog_container_checksum(engine, name)
    try:
        proc = cli("--source", "lab-1", "--target", "lab-2", "--container", name, "--strategy", "lazy",
                   "--freeze-limit", "300", pause_after="restore")  # fmt: skip
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "criuweb test pause: after restore" in line:
                break
        run = MigrationRun.objects.get(workload=name)
        assert run.state.get("runc_pid"), "".join(lines)
        with ssh.Connection(lab1) as conn:
            runc.stop_lazy(conn, run.state["runc_pid"])
        proc.kill()
        proc.wait()
        recover_all()
        run.refresh_from_db()
        assert run.status == ROLLED_BACK, run.error
        assert running_copies(hosts, name) == ["lab-1"]
        with Engine(lab1) as engine:
            state = engine.inspect(name)["State"]
            assert state["Running"] and not state["Paused"]
            assert lab.memhog_container_checksum(engine, name) == before
        with Engine(lab2) as engine:
            assert not engine.exists(name)
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)


def test_ctrl_c_during_the_freeze_rolls_back_and_says_so(hosts, counter_process):
    path = counter_process
    (pid,) = counter_pids(path)
    proc = cli("--source", "lab-1", "--target", "lab-2", "--pid", str(pid), pause_after="dump")
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "criuweb test pause: after dump" in line:
            proc.send_signal(signal.SIGINT)  # what Ctrl-C in a terminal sends
            break
    out, err = proc.communicate(timeout=120)
    err = "".join(lines) + err
    assert proc.returncode == 1, out + err
    assert "Traceback" not in err, err
    run = MigrationRun.objects.get(workload=str(pid))
    assert run.status == ROLLED_BACK
    assert f"interrupted: run {run.code} ended rolled_back" in err
    pids = wait_for(lambda: counter_pids(path), message="no counter runs after Ctrl-C")
    assert len(pids) == 1 and lab.host_of_pid(pids[0]) == "lab-1"
