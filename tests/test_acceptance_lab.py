"""Workloads and faults an acceptance pass tried on the lab that no other test
covered, and that were found wrong: each test fails without its fix."""

import os
import uuid

import pytest

from migrations_app import lab, ssh
from migrations_app.docker_engine import Engine
from migrations_app.engine import create_run, execute
from migrations_app.models import CONTAINER, FAILED, PROCESS, ROLLED_BACK, SUCCEEDED
from tests.support import wait_for

pytestmark = pytest.mark.lab


def _kill_tree(pid):
    # A restored tree lives under a namespace holder: kill it, its
    # descendants and its holder, found by PID from this one.
    try:
        ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        try:
            todo += _children(p)
        except OSError:
            pass
    try:
        # Only a namespace holder (its argv ends with criu's restore), never whatever adopted an orphan.
        holder = [ppid] if "criu\0restore" in open(f"/proc/{ppid}/cmdline").read() else []
    except OSError:
        holder = []
    for p in [*holder, *tree]:
        if p > 1:
            try:
                os.kill(p, 9)
            except OSError:
                pass


@pytest.fixture
def started(hosts):
    """Start a process on lab-1 with start(argv); every PID noted in the list is killed at the end."""
    pids = []

    def start(argv):
        with ssh.Connection(hosts[0]) as conn:
            pid = int(conn.sh('setsid "$@" </dev/null >/dev/null 2>&1 & echo $!', *argv).stdout.strip())
        pids.append(pid)
        return pid

    yield start, pids
    for pid in pids:
        _kill_tree(pid)


@pytest.fixture
def containers(hosts):
    """Start a counter container on lab-1 with run(**create_host_config kwargs); removed from both hosts."""
    made = []

    def run(entrypoint=None, **host_config):
        name = f"acc-{uuid.uuid4().hex[:8]}"
        with Engine(hosts[0]) as engine:
            cid = engine.api.create_container(
                lab.IMAGE, ["-c", lab.COUNTER_SCRIPT], name=name, entrypoint=["sh"],
                host_config=engine.api.create_host_config(**host_config),
            )["Id"]  # fmt: skip
            made.append(name)
            engine.api.start(cid)
            wait_for(lambda: len(engine.logs(name).split()) >= 2, message="counter did not start")
        return name

    yield run
    for host in hosts:
        with Engine(host) as engine:
            for name in made:
                if engine.exists(name):
                    engine.remove(name)


def _counter_process(start, tmp_path):
    log = tmp_path / f"counter-{uuid.uuid4().hex[:8]}.log"
    pid = start(["sh", "-c", lab.PROCESS_COUNTER_SCRIPT, "sh", str(log)])
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, message="the counter did not start")
    return pid, log


def _values(log):
    return [int(v) for v in log.read_text().split()]


def _running_copies(log):
    """The processes on this machine (every lab host shares its /proc) that write this counter."""
    found = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and str(log) in open(f"/proc/{p}/cmdline").read():
                found.append(int(p))
        except OSError:
            pass
    return found


# -- a copy still being restored is not moved again --------------------------------


@pytest.mark.parametrize("strategy", ["stop-and-copy", "lazy"])
def test_a_process_still_being_restored_is_not_moved_on(hosts, started, tmp_path, strategy):
    # A second run took the first run's restored copy (a new PID, seen on the
    # target's page) back before the first had verified it: the first then
    # found its copy gone, rolled back, and two copies ran.
    lab1, lab2 = hosts
    start, pids = started
    pid, log = _counter_process(start, tmp_path)
    second = {}

    def move_it_on(ctx):
        pids.append(ctx.state.target_pid)
        again = execute(create_run(lab2, lab1, PROCESS, ctx.state.target_pid, strategy=strategy))
        pids.append(int(again.result_workload or 0))
        second["run"] = again

    run = execute(create_run(lab1, lab2, PROCESS, pid, strategy=strategy), after_phase={"restore": move_it_on})
    assert run.status == SUCCEEDED, run.error
    again = second["run"]
    assert again.status == FAILED, again.error
    assert f"is the copy that run {run.code} is still restoring there from lab-1" in again.error, again.error
    assert [p.name for p in again.phases.all()] == ["pre-flight"]
    copies = wait_for(lambda: (c := _running_copies(log)) and c, message="no copy runs")
    assert copies == [int(run.result_workload)], copies
    before = len(_values(log))
    wait_for(lambda: len(_values(log)) > before + 1, message="the counter stopped")
    values = _values(log)
    assert values == list(range(len(values))), "a value was lost or written twice"


def test_a_container_still_being_restored_is_not_moved_on(hosts):
    # On two hosts the source's container of the same name also stops the
    # second run, at the target's pre-flight; to a third host nothing did:
    # seen by hand on a 3-host lab, the first run rolled back and the
    # container ran on lab-1 and lab-3. Refused now at the source's
    # pre-flight, whatever the target.
    lab1, lab2 = hosts
    name = f"acc-{uuid.uuid4().hex[:8]}"
    with Engine(lab1) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name)
        wait_for(lambda: len(engine.logs(name).split()) >= 2, message="counter did not start")
    second = {}
    try:

        def move_it_on(ctx):
            second["run"] = execute(create_run(lab2, lab1, CONTAINER, name))

        run = execute(create_run(lab1, lab2, CONTAINER, name), after_phase={"restore": move_it_on})
        assert run.status == SUCCEEDED, run.error
        again = second["run"]
        assert again.status == FAILED, again.error
        assert f"is the copy that run {run.code} is still restoring there from lab-1" in again.error, again.error
        assert [p.name for p in again.phases.all()] == ["pre-flight"]
        with Engine(lab1) as engine:
            assert not engine.exists(name)
        with Engine(lab2) as engine:
            assert engine.inspect(name)["State"]["Running"]
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)


# -- what CRIU refuses only once the tree is frozen -----------------------------------

GHOST = r"""
import os, sys, time
with open(sys.argv[1], "wb") as f:
    f.write(os.urandom(int(sys.argv[2])))
held = open(sys.argv[1], "rb")
os.unlink(sys.argv[1])
while True:
    time.sleep(1)
"""


def _children(pid):
    return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]


def _refused_at_pre_flight(run, *expected):
    assert run.status == FAILED, run.error
    for text in expected:
        assert text in run.error, run.error
    # Refused before anything was frozen, and no traceback for a message.
    assert [p.name for p in run.phases.all()] == ["pre-flight"], [p.name for p in run.phases.all()]
    assert "Traceback" not in run.error


def test_a_process_holding_a_file_lock_is_refused_before_the_freeze(hosts, started, tmp_path):
    # CRIU failed the dump with "Some file locks are hold by dumping tasks!"
    # after it had frozen the tree.
    lab1, lab2 = hosts
    start, _ = started
    log, lock = tmp_path / "counter.log", tmp_path / "lockfile"
    pid = start(["flock", str(lock), "sh", "-c", lab.PROCESS_COUNTER_SCRIPT, "sh", str(log)])
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, message="the counter did not start")

    run = execute(create_run(lab1, lab2, PROCESS, pid))
    _refused_at_pre_flight(run, f"a file lock on {lock} (FLOCK", "release the lock")
    assert os.path.exists(f"/proc/{pid}")


# A terminal of its own: the child runs the counter on the pty's slave end,
# the parent reads its master end, as a terminal emulator, tmux or sshd does.
ON_A_TERMINAL = r"""
import os, pty, select, sys, time
pid, master = pty.fork()
if pid == 0:
    i = 0
    while True:
        with open(sys.argv[1], "a") as f:
            f.write("%d\n" % i)
        print(i, flush=True)
        i += 1
        time.sleep(0.2)
while True:
    if select.select([master], [], [], 1)[0]:
        os.read(master, 1000)
"""


def test_a_process_on_a_terminal_held_outside_its_tree_is_refused_before_the_freeze(hosts, started, tmp_path):
    # A program started in a terminal (tmux, an SSH session, script(1)):
    # CRIU failed the dump with "tty: Found slave peer index 0 without
    # correspond master peer" after it had frozen the tree. The tree that
    # holds the terminal's master moves, and goes on.
    lab1, lab2 = hosts
    start, pids = started
    log = tmp_path / "counter.log"
    holder = start(["python3", "-c", ON_A_TERMINAL, str(log)])
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, message="the counter did not start")
    (child,) = _children(holder)

    run = execute(create_run(lab1, lab2, PROCESS, child))
    _refused_at_pre_flight(run, "the terminal /dev/pts/", "outside the tree")
    assert os.path.exists(f"/proc/{child}")

    run = execute(create_run(lab1, lab2, PROCESS, holder))
    assert run.status == SUCCEEDED, run.error
    pids.append(int(run.result_workload))
    before = len(_values(log))
    wait_for(lambda: len(_values(log)) > before + 2, message="the counter stopped after the move")
    values = _values(log)
    assert values == list(range(len(values))), "a value was lost or written twice"


def test_a_process_of_a_pipeline_is_refused_before_the_freeze_and_the_pipeline_moves(hosts, started, tmp_path):
    # The reader of `counter | reader` does not lead its session (the
    # pipeline's shell does), and shares its pipe with the writer, outside
    # its tree. CRIU failed the dump with "The root process ... is not a
    # session leader" after the freeze; with --shell-job it dumps the
    # reader, and the writer dies of SIGPIPE (seen by hand: the pipeline
    # stopped, its restored reader alone). The whole pipeline, children and
    # the pipe between them, moves.
    lab1, lab2 = hosts
    start, pids = started
    log = tmp_path / "counter.log"
    script = f"i=0; while :; do echo $i; i=$((i+1)); sleep 0.2; done | while read l; do echo $l >> {log}; done"
    root = start(["sh", "-c", script])
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, message="the pipeline did not start")
    writer, reader = _children(root)

    run = execute(create_run(lab1, lab2, PROCESS, reader))
    _refused_at_pre_flight(run, f"PID {reader} shares a pipe with PID {writer} (sh)", "outside the tree")
    assert os.path.exists(f"/proc/{reader}") and os.path.exists(f"/proc/{writer}")

    run = execute(create_run(lab1, lab2, PROCESS, root))
    assert run.status == SUCCEEDED, run.error
    pids.append(int(run.result_workload))
    before = len(_values(log))
    wait_for(lambda: len(_values(log)) > before + 2, message="the pipeline stopped after the move")
    values = _values(log)
    assert values == list(range(len(values))), "a value was lost or written twice"


def test_a_session_leader_piped_into_a_process_outside_its_tree_is_refused_before_the_freeze(hosts, tmp_path):
    # `setsid server | cat`: the server leads its session, and its stdout is
    # a pipe whose reader is outside the tree. CRIU dumps the server's end
    # only; the restored copy's first write would kill it (SIGPIPE), and a
    # rollback restores the same broken pipe on the source.
    lab1, lab2 = hosts
    log, pidfile = tmp_path / "counter.log", tmp_path / "pid"
    script = 'echo $$ > "$0"; i=0; while :; do echo $i; echo $i >> "$1"; i=$((i+1)); sleep 0.1; done'
    with ssh.Connection(lab1) as conn:
        conn.sh('(setsid sh -c "$1" "$2" "$3" | cat >/dev/null) </dev/null >/dev/null 2>&1 &', script, str(pidfile), str(log))
    wait_for(lambda: pidfile.exists() and len(_values(log)) >= 2, message="the piped counter did not start")
    pid = int(pidfile.read_text())
    try:
        assert _stat(pid)[1] == pid, "the counter should lead its session"
        run = execute(create_run(lab1, lab2, PROCESS, pid))
        _refused_at_pre_flight(run, f"PID {pid}'s tree shares a pipe with PID", "(cat) outside it")
        before = len(_values(log))
        wait_for(lambda: len(_values(log)) > before + 2, message="the counter stopped after the refusal")
        values = _values(log)
        assert values == list(range(len(values))), "a value was lost or written twice"
    finally:
        # The reader, cat, ends with the writer (end of file).
        _kill_tree(pid)


def _stat(pid):
    """(ppid, session, controlling terminal) of a process."""
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[1]), int(f[3]), int(f[4])


# A shell's background job, as `nohup ./server > log 2>&1 &` typed over SSH
# leaves it once the terminal is gone: its shell leads its session. argv:
# the counter script; the log comes in $LOG, so that only the job's own
# command line names it.
BACKGROUND_JOB = 'sh -c "$0" sh "$LOG" >/dev/null 2>&1 & wait'


@pytest.mark.parametrize("strategy", ["stop-and-copy", "page-server", "lazy"])
def test_a_background_job_of_a_shell_moves_as_a_shell_job(hosts, started, tmp_path, strategy):
    # Pre-flight refused it ("does not lead its session"): CRIU dumps such
    # a root only with --shell-job. It moves with it now, and on the target
    # joins its namespace holder's session, which no SSH connection leads:
    # the run's connections are closed when execute() returns, and it runs on.
    lab1, lab2 = hosts
    start, pids = started
    log = tmp_path / "counter.log"
    shell = start(["env", f"LOG={log}", "sh", "-c", BACKGROUND_JOB, lab.PROCESS_COUNTER_SCRIPT])
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, message="the job did not start")
    (job,) = _children(shell)
    assert _stat(job)[1] == shell != job

    run = execute(create_run(lab1, lab2, PROCESS, job, strategy=strategy))
    assert run.status == SUCCEEDED, run.error
    moved = int(run.result_workload)
    pids.append(moved)
    assert "a shell job" in run.phases.filter(name="pre-flight").first().detail
    assert "a shell job" in run.phases.get(name="restore").detail

    holder, session, tty = _stat(moved)
    assert session == holder != moved and tty == 0, (holder, session, tty)
    assert "holder.pid" in open(f"/proc/{holder}/cmdline").read()
    assert _stat(holder)[1:] == (holder, 0), "the holder leads a session of its own, without a terminal"
    copies = wait_for(lambda: (c := _running_copies(log)) and c, message="no copy runs")
    assert copies == [moved], copies
    before = len(_values(log))
    wait_for(lambda: len(_values(log)) > before + 2, message="the job stopped after the move")
    assert _running_copies(log) == [moved]

    # Still a shell job there (its holder leads its session), dumped from
    # inside the holder's namespaces: it moves back the same way.
    back = execute(create_run(lab2, lab1, PROCESS, moved, strategy=strategy))
    assert back.status == SUCCEEDED, back.error
    pids.append(int(back.result_workload))
    assert "a shell job" in back.phases.get(name="restore").detail
    before = len(_values(log))
    wait_for(lambda: len(_values(log)) > before + 2, message="the job stopped after the move back")
    assert _running_copies(log) == [int(back.result_workload)]
    values = _values(log)
    assert values == list(range(len(values))), "a value was lost or written twice"


# The background job of a shell on a terminal: the shell is a pty's child
# (pty.fork: it leads a session with that terminal), the job shares both.
JOB_ON_A_TERMINAL = r"""
import os, pty, select, sys
pid, master = pty.fork()
if pid == 0:
    os.execvp("sh", ["sh", "-c", 'sh -c "$0" sh "$1" & wait', sys.argv[1], sys.argv[2]])
while True:
    if select.select([master], [], [], 1)[0]:
        os.read(master, 1000)
"""


def test_a_background_job_on_a_terminal_is_refused_before_the_freeze(hosts, started, tmp_path):
    # With --shell-job CRIU needs the job's terminal on the target, which a
    # terminal of the source cannot be: refused as before.
    lab1, lab2 = hosts
    start, _ = started
    log = tmp_path / "counter.log"
    holder = start(["python3", "-c", JOB_ON_A_TERMINAL, lab.PROCESS_COUNTER_SCRIPT, str(log)])
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, message="the job did not start")
    (shell,) = _children(holder)
    (job,) = _children(shell)

    run = execute(create_run(lab1, lab2, PROCESS, job))
    _refused_at_pre_flight(
        run, f"PID {job} does not lead its session: PID {shell}, outside the tree", "the tree has a terminal"
    )
    assert os.path.exists(f"/proc/{job}")


def test_a_process_holding_a_big_deleted_file_is_refused_before_the_freeze(hosts, started, tmp_path):
    # CRIU carries a deleted, still open file in its images up to 1 MiB;
    # over that the dump failed ("Can't dump ghost file ... increase limit")
    # with the tree frozen. Under the limit it moves.
    lab1, lab2 = hosts
    start, pids = started
    big = start(["python3", "-c", GHOST, str(tmp_path / "big"), str(3 << 20)])
    small = start(["python3", "-c", GHOST, str(tmp_path / "small"), "4096"])
    wait_for(lambda: not (tmp_path / "big").exists() and not (tmp_path / "small").exists(), message="not deleted")

    run = execute(create_run(lab1, lab2, PROCESS, big))
    _refused_at_pre_flight(run, f"holds {tmp_path / 'big'}, deleted since it was opened, of 3.0 MiB")
    assert os.path.exists(f"/proc/{big}")

    run = execute(create_run(lab1, lab2, PROCESS, small))
    assert run.status == SUCCEEDED, run.error
    pids.append(int(run.result_workload))


def test_a_container_holding_a_big_deleted_file_is_refused_before_the_freeze(hosts):
    # Docker's checkpoint failed with the ghost file error, the container
    # frozen and then restored on the source by the rollback.
    lab1, lab2 = hosts
    name = f"acc-{uuid.uuid4().hex[:8]}"
    keep = "dd if=/dev/urandom of=/g bs=1M count=3 2>/dev/null; exec 3</g; rm /g; " + lab.COUNTER_SCRIPT
    with Engine(lab1) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", keep], name)
        wait_for(lambda: len(engine.logs(name).split()) >= 2, message="counter did not start")
    try:
        run = execute(create_run(lab1, lab2, CONTAINER, name))
        _refused_at_pre_flight(run, "/g, deleted since it was opened, of 3.0 MiB")
        with Engine(lab1) as engine:
            assert engine.inspect(name)["State"]["Running"]
    finally:
        with Engine(lab1) as engine:
            engine.remove(name)


# -- containers: what CRIU cannot restore, and a hardened one that it can -------------


def _allow_privileged(hosts):
    for host in hosts:
        host.allow_privileged = True
        host.save()


def _running(host, name):
    with Engine(host) as engine:
        return engine.exists(name) and engine.inspect(name)["State"]["Running"]


def test_a_container_with_docker_s_init_is_refused_before_the_freeze(hosts, containers):
    # --init: Docker mounts its docker-init into the container, on Debian's
    # docker.io a link to tini-static. CRIU failed the restore on the target
    # ("mnt-v2: Can't remount ... with MS_PRIVATE") and the rollback's too:
    # the container was left stopped on both hosts, its memory lost.
    lab1, lab2 = hosts
    name = containers(init=True)
    run = execute(create_run(lab1, lab2, CONTAINER, name))
    _refused_at_pre_flight(run, "it runs Docker's init (--init), which Docker mounts from ", "a symbolic link to ")
    assert _running(lab1, name)


def test_a_bind_mount_of_a_symbolic_link_is_refused_before_the_freeze(hosts, containers, tmp_path):
    # The same failure as --init's, for any bind mount whose source is a
    # link; the file it points to moves (the lab's hosts share their disk).
    lab1, lab2 = hosts
    _allow_privileged(hosts)
    (tmp_path / "real").write_text("shared\n")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    linked = containers(binds=[f"{tmp_path / 'link'}:/x:ro"])
    plain = containers(binds=[f"{tmp_path / 'real'}:/x:ro"])

    run = execute(create_run(lab1, lab2, CONTAINER, linked, shared_storage=True))
    _refused_at_pre_flight(run, f"bind mount {tmp_path / 'link'} -> /x is a symbolic link to {tmp_path / 'real'}")
    assert _running(lab1, linked)

    run = execute(create_run(lab1, lab2, CONTAINER, plain, shared_storage=True))
    assert run.status == SUCCEEDED, run.error
    assert _running(lab2, plain)


def test_a_hardened_container_is_no_privileged_one(hosts, containers):
    # --cap-drop ALL --cap-add NET_BIND_SERVICE, the usual hardening, has
    # fewer capabilities than Docker's default, yet was refused as
    # privileged ("it adds capabilities") unless an admin allowed
    # privileged workloads on both hosts. A capability beyond the default
    # set still is refused.
    lab1, lab2 = hosts
    hardened = containers(cap_drop=["ALL"], cap_add=["NET_BIND_SERVICE", "CHOWN"])
    run = execute(create_run(lab1, lab2, CONTAINER, hardened))
    assert run.status == SUCCEEDED, run.error
    assert _running(lab2, hardened)
    # The verification compared the effective capabilities the kernel shows.
    assert "configuration as on the source" in run.phases.get(name="verify").detail

    # no-new-privileges only takes power away too; the kernel's flag comes back with the task.
    locked = containers(security_opt=["no-new-privileges"])
    run = execute(create_run(lab1, lab2, CONTAINER, locked))
    assert run.status == SUCCEEDED, run.error
    with Engine(lab2) as engine:
        exec_id = engine.api.exec_create(locked, ["grep", "NoNewPrivs", "/proc/1/status"])["Id"]
        assert engine.api.exec_start(exec_id).decode().split() == ["NoNewPrivs:", "1"]

    powerful = containers(cap_drop=["ALL"], cap_add=["CHOWN", "SYS_PTRACE"])
    run = execute(create_run(lab1, lab2, CONTAINER, powerful))
    _refused_at_pre_flight(run, "it adds capabilities SYS_PTRACE:")
    assert "CHOWN" not in run.error


def test_docker_logs_keep_their_past_after_an_engine_move(hosts, containers):
    # The runc strategies carried the container's json log; Docker's own
    # path (the default strategy) did not: `docker logs` on the target began
    # at the move, and the lines from before went with the source container.
    lab1, lab2 = hosts
    name = containers()
    with Engine(lab1) as engine:
        wait_for(lambda: len(engine.logs(name).split()) >= 5, message="too few lines yet")
    run = execute(create_run(lab1, lab2, CONTAINER, name))
    assert run.status == SUCCEEDED, run.error
    with Engine(lab2) as engine:
        wait_for(lambda: len(engine.logs(name).split()) >= 8, message="the counter stopped")
        values = [int(v) for v in engine.logs(name).split()]
    assert values == list(range(len(values))), values
    assert "and log" in run.phases.get(name="transfer").detail


# Counts in anonymous huge-page memory ($1: log, $2: file to say it mapped):
# a copy restored without that memory would start again from 0.
HUGE = r"""
import ctypes, mmap, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
MAP_HUGETLB = 0x40000
p = libc.mmap(None, 2 << 20, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
if p in (None, ctypes.c_void_p(-1).value):
    sys.exit("no huge page")
n = ctypes.c_uint64.from_address(p + (1 << 20))
open(sys.argv[2], "w").close()
while True:
    with open(sys.argv[1], "a") as f:
        f.write(f"{n.value}\n")
    n.value += 1
    time.sleep(0.1)
"""


@pytest.fixture
def huge_pages():
    """Four 2 MiB huge pages reserved on this machine (every lab host shares its kernel) for the test."""
    path = "/proc/sys/vm/nr_hugepages"
    try:
        before = int(open(path).read())
        with open(path, "w") as f:
            f.write(str(before + 4))
    except OSError as e:
        pytest.skip(f"cannot reserve huge pages: {e}")
    try:
        if int(open(path).read()) < before + 4:
            pytest.skip("the kernel could not reserve four huge pages")
        yield
    finally:
        with open(path, "w") as f:
            f.write(str(before))


def test_a_process_in_anonymous_huge_pages_is_refused_before_the_freeze(hosts, started, tmp_path, huge_pages):
    # An anonymous MAP_HUGETLB mapping: CRIU dumps it only if its cached
    # kernel probe (/run/criu.kdat) found a free huge page. In make test,
    # whose lab wrote that cache with an empty pool, the dump failed with the
    # tree frozen ("Can't lookup mount=18 for fd=-3 path=/anon_hugepage
    # (deleted)"): the pre-flight refuses it, and the pool this test reserves
    # does not change that.
    lab1, lab2 = hosts
    start, _ = started
    log, mapped = tmp_path / "huge.log", tmp_path / "mapped"
    pid = start(["python3", "-c", HUGE, str(log), str(mapped)])
    wait_for(lambda: mapped.exists() and len(_values(log)) >= 3, message="the huge-page counter did not start")

    run = execute(create_run(lab1, lab2, PROCESS, pid))
    _refused_at_pre_flight(run, "anonymous huge pages (MAP_HUGETLB)", "without MAP_HUGETLB")
    before = len(_values(log))
    wait_for(lambda: len(_values(log)) > before + 3, message="the counter stopped after the refusal")
    values = _values(log)
    assert values == list(range(len(values))), "a value was lost or written twice"


# Holds an AIO context of $3 events (its ring maps as "/[aio] (deleted)")
# and counts into $1; $2 says the context is set up.
AIO = r"""
import ctypes, sys, time
libc = ctypes.CDLL(None, use_errno=True)
ctx = ctypes.c_ulong(0)
if libc.syscall(206, int(sys.argv[3]), ctypes.byref(ctx)) != 0:  # io_setup
    sys.exit("io_setup failed: errno %d" % ctypes.get_errno())
open(sys.argv[2], "w").close()
n = 0
while True:
    with open(sys.argv[1], "a") as f:
        f.write(f"{n}\n")
    n += 1
    time.sleep(0.1)
"""


@pytest.fixture
def aio_room():
    """Room for two large AIO contexts (the source's and its restored copy share this machine's kernel)."""
    path = "/proc/sys/fs/aio-max-nr"
    try:
        before = int(open(path).read())
        with open(path, "w") as f:
            f.write(str(max(before, 1 << 20)))
    except OSError as e:
        pytest.skip(f"cannot raise fs.aio-max-nr: {e}")
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(str(before))


def test_a_process_with_a_large_aio_ring_moves(hosts, started, tmp_path, aio_room):
    # An AIO context's ring maps as "/[aio] (deleted)"; from about 32k
    # events it is over 1 MiB, and the pre-flight took it for a deleted file
    # over CRIU's ghost limit. CRIU dumps AIO rings itself.
    lab1, lab2 = hosts
    start, pids = started
    log, ready = tmp_path / "aio.log", tmp_path / "ready"
    pid = start(["python3", "-c", AIO, str(log), str(ready), "40000"])
    wait_for(lambda: ready.exists() and len(_values(log)) >= 3, message="the AIO counter did not start")

    run = execute(create_run(lab1, lab2, PROCESS, pid))
    assert run.status == SUCCEEDED, run.error
    pids.append(int(run.result_workload))
    # The copy holds its AIO context again (the lab hosts share this /proc).
    assert "/[aio] (deleted)" in open(f"/proc/{run.result_workload}/maps").read()
    before = len(_values(log))
    wait_for(lambda: len(_values(log)) > before + 3, message="the counter stopped after the move")
    values = _values(log)
    assert values == list(range(len(values))), "a value was lost or written twice"


# -- the whole restored tree is verified, not its root alone -------------------------

# The root waits on two children: the counter loop, and a long sleep that
# the test kills on the target right after the restore.
TREE_WITH_A_CHILD = (
    'sh -c "i=0; while :; do echo \\$i >> \\"$1\\"; i=\\$((i+1)); sleep 0.2; done" sh "$1" & sleep 100000 & wait'
)


def _one_copy(run, log):
    """The processes writing the counter: all of them in the tree the run reports, which runs."""
    copies = wait_for(lambda: (c := _running_copies(log)) and c, message="no copy runs")
    tree, todo = set(), [int(run.result_workload)]
    while todo:
        p = todo.pop()
        tree.add(p)
        try:
            todo += _children(p)
        except OSError:
            pass
    assert set(copies) <= tree, (copies, tree)
    return copies


def _comm(pid):
    try:
        return open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        return ""


@pytest.mark.parametrize("strategy", ["stop-and-copy", "page-server", "lazy"])
def test_a_child_that_dies_after_the_restore_fails_the_move_and_one_copy_runs(hosts, started, tmp_path, strategy):
    # Verification watched the restored root alone: a tree whose child died
    # right after the restore was reported moved, and that child was lost.
    lab1, lab2 = hosts
    start, pids = started
    log = tmp_path / "counter.log"
    root = start(["sh", "-c", TREE_WITH_A_CHILD, "sh", str(log)])
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, message="the counter did not start")
    killed = {}

    def kill_the_sleep(ctx):
        pids.append(ctx.state.target_pid)
        (sleeper,) = [p for p in _children(ctx.state.target_pid) if _comm(p) == "sleep"]
        os.kill(sleeper, 9)
        killed["pid"] = sleeper

    run = execute(create_run(lab1, lab2, PROCESS, root, strategy=strategy), after_phase={"restore": kill_the_sleep})
    pids.append(int(run.result_workload or 0))
    assert "pid" in killed
    # A post-copy run that fails after its restore ends failed, not rolled
    # back: the copy ran without all its memory (docs/strategies.md).
    assert run.status == (FAILED if strategy == "lazy" else ROLLED_BACK), run.error
    assert "process(es) of its tree died after the restore" in run.error, run.error
    assert "(sleep)" in run.error, run.error
    assert "Traceback" not in run.error
    # Rolled back: the copy on the source writes on, alone, nothing lost.
    # The lab's hosts share this file, so what the target's copy wrote
    # before it was killed is written again by the source's copy, which
    # goes on from the dump; on two machines the target's file is apart.
    copies = _one_copy(run, log)
    before = len(_values(log))
    wait_for(lambda: len(_values(log)) > before + 2, message="the counter stopped after the rollback")
    values = _values(log)
    assert set(values) == set(range(max(values) + 1)), "a value was lost"
    tail = values[before - 1 :]
    assert tail == list(range(tail[0], tail[0] + len(tail))), "two copies write"
    assert copies == _running_copies(log)


def test_a_tree_under_script_is_refused_before_the_freeze(hosts, started, tmp_path):
    # script(1) running a command was reported moved while its command died
    # right after the restore (exit 143): the restored script kills it at
    # once, and does the same when restored back on the source, so such a
    # tree cannot move. A tree holding a terminal without script moves (see
    # the test of a terminal held outside its tree above).
    lab1, lab2 = hosts
    start, _ = started
    log = tmp_path / "counter.log"
    loop = f'sh -c "i=0; while :; do echo \\$i >> {log}; i=\\$((i+1)); sleep 0.05; done"'
    root = start(["script", "-qfc", loop, "/dev/null"])
    wait_for(lambda: log.exists() and log.read_text().count("\n") >= 2, message="the counter did not start")

    run = execute(create_run(lab1, lab2, PROCESS, root))
    _refused_at_pre_flight(run, f"PID {root} (script) runs a terminal for its command", "script(1)")
    before = len(_values(log))
    wait_for(lambda: len(_values(log)) > before + 2, message="the counter stopped after the refusal")
    assert os.path.exists(f"/proc/{root}")
