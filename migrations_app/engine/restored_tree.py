"""Whether the whole restored process tree still runs on the target, not its root alone.

A tree can lose a process right after its restore while its root lives on
(script(1) kills its command when it wakes up to a signal; a child may
crash on something the target lacks): the move must not count as done then.

What was dumped comes from CRIU's own images (pstree.img: every process and
its parent; core-PID.img: its name and whether it was already a zombie), read
on the target in the same command that walks the live tree from the
namespace holder, so both are seen at one moment. PIDs inside the restored
PID namespace are the dumped ones (CRIU restores each process with its PID),
so the two compare by PID.

A dumped process that is gone is not always a failure: a shell loop's
`sleep 0.05` ends and is reaped by its shell as it would have on the source,
and its exit status reaches that shell alone. Such a process is taken as
ended normally when it was a leaf of the dumped tree, its parent still runs,
and that parent has started a child since the dump (the loop goes on).
Anything else gone (or left a zombie) counts as died: a workload whose
one-shot child ends right after the move then fails verification and rolls
back to the source, which is the safe side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# argv: images dir, the holder's PID file, the tree root's PID on the host.
# Prints {"dumped": [[pid, ppid, state, comm]...], "live": {pid: [state, comm, [child pids]]}}
# with PIDs as the restored namespace sees them.
TREE_CHECK_SCRIPT = r"""
import json, os, struct, sys
images, pidfile, root = sys.argv[1], sys.argv[2], int(sys.argv[3])
COMMON = 0x54564319

def varint(b, i):
    r = s = 0
    while True:
        c = b[i]; i += 1
        r |= (c & 0x7F) << s
        if not c & 0x80:
            return r, i
        s += 7

def fields(b):
    i = 0
    while i < len(b):
        k, i = varint(b, i)
        n, w = k >> 3, k & 7
        if w == 0:
            v, i = varint(b, i)
        elif w == 2:
            l, i = varint(b, i); v = b[i:i + l]; i += l
        elif w == 5:
            v = b[i:i + 4]; i += 4
        elif w == 1:
            v = b[i:i + 8]; i += 8
        else:
            raise ValueError("wire type %d" % w)
        yield n, w, v

def entries(path):
    with open(path, "rb") as f:
        b = f.read()
    if struct.unpack_from("<I", b, 0)[0] != COMMON:
        raise ValueError("%s: not a CRIU image" % path)
    i = 8
    while i + 4 <= len(b):
        (size,) = struct.unpack_from("<I", b, i)
        yield b[i + 4:i + 4 + size]
        i += 4 + size

dumped = []
for e in entries(os.path.join(images, "pstree.img")):
    f = {n: v for n, w, v in fields(e) if w == 0}
    pid, ppid = f.get(1, 0), f.get(2, 0)
    state, comm = 0, ""
    try:
        core = next(entries(os.path.join(images, "core-%d.img" % pid)))
        for n, w, v in fields(core):
            if n == 3 and w == 2:  # core_entry.tc: task_core_entry
                for m, mw, mv in fields(v):
                    if m == 1 and mw == 0:
                        state = mv
                    elif m == 6 and mw == 2:
                        comm = mv.decode("utf-8", "replace")
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    dumped.append([pid, ppid, state, comm])

def read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""

def inner(pid):
    for line in read("/proc/%d/status" % pid).splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return None

start = root
try:
    with open(pidfile) as f:
        holder = int(f.read(20).strip())
    if pidfile in read("/proc/%d/cmdline" % holder).split("\0"):
        start = holder  # orphans of the tree are its children
except (OSError, ValueError):
    pass
live, todo = {}, [start]
while todo:
    pid = todo.pop()
    stat = read("/proc/%d/stat" % pid)
    if not stat:
        continue
    kids = [int(c) for t in (os.listdir("/proc/%d/task" % pid) if os.path.isdir("/proc/%d/task" % pid) else [])
            for c in read("/proc/%d/task/%s/children" % (pid, t)).split()]
    todo += kids
    me = inner(pid)
    if me is None or pid == start and start != root:
        continue
    live[me] = [stat.rsplit(")", 1)[1].split()[0], stat[stat.index("(") + 1:stat.rindex(")")],
                [k for k in (inner(c) for c in kids) if k is not None]]
print(json.dumps({"dumped": dumped, "live": live}))
"""

# task_core_entry.task_state (CRIU's images/core.proto): a zombie at dump time.
TASK_DEAD = 2


@dataclass(frozen=True)
class Died:
    pid: int  # as dumped: the PID inside the restored namespace
    comm: str


def died(report: dict) -> list[Died]:
    """The dumped processes that no longer run, out of TREE_CHECK_SCRIPT's report (see the module's rule)."""
    dumped = [(int(p), int(pp), int(st), comm) for p, pp, st, comm in report["dumped"]]
    live = {int(k): v for k, v in report["live"].items()}
    known = {p for p, *_ in dumped}
    has_children = {pp for _, pp, *_ in dumped}
    lost = []
    for pid, ppid, state, comm in dumped:
        if state == TASK_DEAD:
            continue  # a zombie already: CRIU restores it as one
        here = live.get(pid)
        if here is not None and here[0] != "Z":
            continue
        parent = live.get(ppid)
        loop_goes_on = (
            pid not in has_children
            and parent is not None
            and parent[0] != "Z"
            and any(c not in known for c in parent[2])
        )
        if not loop_goes_on:
            lost.append(Died(pid, comm))
    return lost


def check(conn, images_dir: str, holder_pidfile: str, root_pid: int) -> list[Died]:
    """The processes of the tree restored from images_dir on conn's host that died since the restore."""
    out = conn.run(["python3", "-c", TREE_CHECK_SCRIPT, images_dir, holder_pidfile, str(root_pid)]).stdout
    return died(json.loads(out))


def describe(lost: list[Died]) -> str:
    return ", ".join(f"PID {d.pid} ({d.comm or '?'})" for d in lost)
