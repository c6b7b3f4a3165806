"""Pre-flight's decision on a tree whose root does not lead its session, on trees as read_tree() reads them.

The lab tests (tests/test_acceptance_lab.py) run the real cases; these pin
each rule alone, the controlling terminal without any terminal open too,
which no lab test sets up on its own.
"""

from migrations_app.engine import tree

NS = {"pid": "pid:[1]", "net": "net:[2]", "mnt": "mnt:[3]", "user": "user:[4]"}


def _proc(pid: int, sid: int, **more) -> dict:
    return {
        "pid": pid, "ppid": 1, "sid": sid, "state": "S", "flags": 0, "comm": "sh", "exe": "/bin/sh",
        "cmdline": "sh", "uids": [0], "gids": [0], "capeff": "", "ns": NS, "paths": [], "locks": [],
        "ghosts": {}, "ptys": [], "ptmx": [], "ctty": 0, "ttys": [], "pipes": [], **more,
    }  # fmt: skip


def _tree(*procs: dict, external_pipes=()) -> tree.Tree:
    return tree.Tree(
        procs=list(procs), sockets=[], session_pid=999, session_ns=NS, boot_id="b", ssh_port=22,
        cap_eff=-1, root_ns=NS, external_pipes=list(external_pipes),
    )  # fmt: skip


def test_a_session_leader_is_no_shell_job():
    t = _tree(_proc(100, 100), _proc(101, 100, ctty=34816))
    assert not tree.shell_job(t)
    assert tree.refusals(t, "lab-1") == []


def test_a_background_job_without_a_terminal_moves_as_a_shell_job():
    t = _tree(_proc(100, 50), _proc(101, 50, pipes=[7]))
    assert tree.shell_job(t)
    assert tree.refusals(t, "lab-1") == []


def test_a_controlling_terminal_alone_refuses_a_shell_job():
    (why,) = tree.refusals(_tree(_proc(100, 50), _proc(101, 50, ctty=34816)), "lab-1")
    assert why.startswith("PID 100 does not lead its session: PID 50, outside the tree"), why
    assert "the controlling terminal of PID 101" in why


def test_a_terminal_open_refuses_a_shell_job():
    (why,) = tree.refusals(_tree(_proc(100, 50, ttys=["/dev/tty"])), "lab-1")
    assert "does not lead its session" in why and "/dev/tty" in why


def test_a_pipe_shared_outside_the_tree_refuses_a_shell_job():
    t = _tree(_proc(100, 50, pipes=[7]), external_pipes=[{"inode": 7, "peer": 60, "peer_comm": "writer"}])
    (why,) = tree.refusals(t, "lab-1")
    assert why.startswith("PID 100 shares a pipe with PID 60 (writer) outside the tree"), why
    assert "move PID 50's tree" in why


def test_a_container_is_not_judged_by_its_session():
    t = _tree(_proc(100, 50, ctty=34816))
    assert tree.refusals(t, "lab-1", whole_session=False) == []
