"""CRIU self-test: dump and restore a tiny process this program starts itself.

This file runs on the host under test, as root, and must stay a standalone
program (standard library only, Python >= 3.9, no Django): setup-system.sh
runs it locally to choose a CRIU, and criu.self_test() sends its source over
SSH as one `python3 -c` command, so a probe costs one round trip.

`criu check` passing says little about what a host can move: CRIU 4.1.1
passes it on Linux >= 6.16 yet fails to dump any INET socket there
(checkpoint-restore/criu#2705). So the test is a real dump and restore of a
process holding a listening TCP socket on 127.0.0.1, checked afterwards by
talking to it.

--mode moves the pages the way a strategy does (local images, through
`criu page-server`, or lazily with `criu lazy-pages`; see run()), and extra
dump and restore options let a strategy test its own flags on the same
process.

It prints one JSON object: {"ok", "stage", "error", "dump_s", "restore_s",
"pages_s" (lazy only), "pids"} (pids: every process it started, all stopped
when it exits); "error" is CRIU's first real error line when CRIU failed.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

# The process under test. With a socket it answers "ok" to every connection,
# which proves after the restore that the socket came back listening. It
# holds no file open: CRIU would check the size of any file it held.
WORKLOAD = r"""
import os, socket, sys, time
port_file, with_socket = sys.argv[1], sys.argv[2] == "1"
port = 0
if with_socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    port = s.getsockname()[1]
with open(port_file + ".tmp", "w") as f:
    f.write(str(port))
os.rename(port_file + ".tmp", port_file)
while True:
    if with_socket:
        c, _ = s.accept()
        c.sendall(b"ok")
        c.close()
    else:
        time.sleep(0.05)
"""

TIMEOUT = 60


class Failed(Exception):
    def __init__(self, stage: str, error: str) -> None:
        super().__init__(error)
        self.stage = stage
        self.error = error


def first_error(log: str) -> str:
    """CRIU's first real error line (same rule as criu.first_error)."""
    for line in log.splitlines():
        # Every run on these kernels logs a harmless RLIMIT_NOFILE error.
        if "Error" in line and "RLIMIT_NOFILE" not in line:
            return line.split(")", 1)[1].strip() if line.startswith("(") else line.strip()
    return ""


def _criu_failed(stage: str, proc: subprocess.CompletedProcess[str], log_path: str) -> Failed:
    try:
        with open(log_path, errors="replace") as f:
            error = first_error(f.read())
    except OSError:
        error = ""
    # Without a log line (a bad option, say), criu's first word on stderr.
    said = next((line.strip() for line in proc.stderr.splitlines() if line.strip()), "")
    return Failed(stage, error or said[:300] or f"criu {stage} exited {proc.returncode}")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            return c.recv(16) == b"ok"
    except OSError:
        return False


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


MODES = ("local", "page-server", "lazy")


class _Daemon:
    """A CRIU run in the background that says when it is ready (--status-fd)."""

    def __init__(self, stage: str, argv: list[str], log_path: str) -> None:
        self.stage = stage
        self.log_path = log_path
        read_end, write_end = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [*argv, "--status-fd", str(write_end)],
                pass_fds=(write_end,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        finally:
            os.close(write_end)
        try:
            ready, _, _ = select.select([read_end], [], [], TIMEOUT)
            said = os.read(read_end, 1) if ready else b""
        finally:
            os.close(read_end)
        if said != b"\0":
            raise self.failure()

    def failure(self) -> Failed:
        rc = self.proc.poll()
        stderr = self.proc.stderr.read() if rc is not None and self.proc.stderr else ""
        return _criu_failed(self.stage, subprocess.CompletedProcess([], rc, "", stderr), self.log_path)

    def finish(self) -> None:
        """Wait for the daemon to end; raise unless it ended well."""
        try:
            self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            raise Failed(self.stage, f"criu {self.stage} did not end in {TIMEOUT} s")
        if self.proc.returncode != 0:
            raise self.failure()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers_in(netns_of: int, port: int) -> bool:
    """Whether the process listening on 127.0.0.1:port in the network namespace of PID netns_of answers."""
    client = (
        "import socket, sys\n"
        "c = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)\n"
        "print(c.recv(16).decode())"
    )
    result = subprocess.run(
        ["nsenter", f"--net=/proc/{netns_of}/ns/net", sys.executable, "-c", client, str(port)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    return result.stdout.strip() == "ok"


def run(
    criu: str, with_socket: bool, dump_args: list[str], restore_args: list[str], work: str, mode: str = "local"
) -> dict:
    """Dump and restore a test process on this host, the way mode says.

    local: dump to disk, restore from it. page-server: the pages go through
    `criu page-server` on 127.0.0.1. lazy: post-copy, as criuweb's lazy
    strategy does it: the dump serves the pages from the frozen process,
    `criu lazy-pages` pulls them into the restored one. While pages are
    pulled the original still holds its address, so a lazy restore gets a
    network namespace of its own (with lo up) and is asked there.
    """
    times: dict = {}
    # Every process started, reported so that a test can check they are gone.
    pids: list[int] = []
    port_file = os.path.join(work, "port")
    images = os.path.join(work, "images")
    os.mkdir(images)
    # A session of its own and no stdio: CRIU refuses a task that shares the
    # caller's terminal without --shell-job.
    workload = subprocess.Popen(
        [sys.executable, "-c", WORKLOAD, port_file, "1" if with_socket else "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )
    pids.append(workload.pid)
    holder = None
    daemons: list[_Daemon] = []
    own_netns = mode == "lazy"
    try:
        deadline = time.monotonic() + TIMEOUT
        while not os.path.exists(port_file):
            if workload.poll() is not None or time.monotonic() > deadline:
                raise Failed("start", "the test process did not start")
            time.sleep(0.02)
        with open(port_file) as f:
            port = int(f.read())

        dump_argv = [criu, "dump", "-t", str(workload.pid), "-D", images, "-v4", "-o", "dump.log", *dump_args]
        started = time.monotonic()
        if mode == "page-server":
            pages_port = str(_free_port())
            server = _Daemon(
                "page-server",
                [criu, "page-server", "-D", images, "--address", "127.0.0.1", "--port", pages_port]
                + ["-v4", "-o", "page-server.log"],
                os.path.join(images, "page-server.log"),
            )
            daemons.append(server)
            pids.append(server.proc.pid)
            dump_argv += ["--page-server", "--address", "127.0.0.1", "--port", pages_port]
        if mode == "lazy":
            pages_port = str(_free_port())
            # Ready once the small images are written and its page server listens.
            dumper = _Daemon(
                "dump",
                [*dump_argv, "--lazy-pages", "--address", "127.0.0.1", "--port", pages_port],
                os.path.join(images, "dump.log"),
            )
            daemons.append(dumper)
            pids.append(dumper.proc.pid)
            times["dump_s"] = round(time.monotonic() - started, 3)
            puller = _Daemon(
                "lazy-pages",
                [criu, "lazy-pages", "--page-server", "--address", "127.0.0.1", "--port", pages_port]
                + ["-D", images, "-v4", "-o", "lazy-pages.log"],
                os.path.join(images, "lazy-pages.log"),
            )
            daemons.append(puller)
            pids.append(puller.proc.pid)
            restore_args = ["--lazy-pages", *restore_args]
        else:
            dump = subprocess.run(dump_argv, capture_output=True, text=True, timeout=TIMEOUT)
            times["dump_s"] = round(time.monotonic() - started, 3)
            if dump.returncode != 0:
                raise _criu_failed("dump", dump, os.path.join(images, "dump.log"))
            if mode == "page-server":
                server.finish()
            # The dumped task is our child: reap it so its port and PID are free.
            workload.wait(TIMEOUT)

        # Restore in new PID and mount namespaces, as criuweb restores trees:
        # the old PID may still be held by a zombie on hosts whose init is
        # slow to reap ("Can't fork for N: File exists"), or by the frozen
        # original of a lazy dump. The namespace's init (sh, then sleep)
        # reports CRIU's status and keeps the namespace alive; --kill-child
        # ends it all if this program dies.
        unshare = ["unshare", "--pid", "--fork", "--mount-proc", "--propagation", "slave", "--kill-child"]
        script = 'out=$1; shift; "$@" >"$out" 2>&1; echo "$?"; exec sleep 3600'
        if own_netns:
            unshare.append("--net")
            script = "ip link set lo up && " + script
        started = time.monotonic()
        holder = subprocess.Popen(
            [*unshare, "sh", "-c", script, "sh", os.path.join(work, "restore.out")]
            + [criu, "restore", "-D", images, "-v4", "-o", "restore.log", "--restore-detached", *restore_args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        pids.append(holder.pid)
        ready, _, _ = select.select([holder.stdout], [], [], TIMEOUT)
        line = holder.stdout.readline().strip() if ready else ""
        times["restore_s"] = round(time.monotonic() - started, 3)
        if line != "0":
            proc = subprocess.CompletedProcess([], int(line) if line.lstrip("-").isdigit() else -1, "", "")
            try:
                with open(os.path.join(work, "restore.out"), errors="replace") as f:
                    proc.stderr = f.read()
            except OSError:
                proc.stderr = holder.stderr.read() if holder.poll() is not None else "no answer from criu restore"
            raise _criu_failed("restore", proc, os.path.join(images, "restore.log"))

        inits = _children(holder.pid)
        pids.extend(inits + [p for init in inits for p in _children(init)])
        if mode == "lazy":
            # Every page arrived, and the source side let go of the original.
            started = time.monotonic()
            puller.finish()
            dumper.finish()
            times["pages_s"] = round(time.monotonic() - started, 3)
            workload.wait(TIMEOUT)
        if with_socket:
            answered = _answers_in(inits[0], port) if own_netns and inits else _answers(port)
            if not answered:
                raise Failed("verify", f"the restored process does not answer on 127.0.0.1:{port}")
        else:
            time.sleep(0.1)
            if not inits or not _children(inits[0]):
                raise Failed("verify", "the restored process is not running")
        return {"ok": True, "stage": "done", "error": "", **times, "pids": pids}
    except Failed as e:
        return {"ok": False, "stage": e.stage, "error": e.error, **times, "pids": pids}
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return {"ok": False, "stage": "runner", "error": str(e), **times, "pids": pids}
    finally:
        for daemon in daemons:
            daemon.stop()
        if workload.poll() is None:
            os.killpg(workload.pid, signal.SIGKILL)
            workload.wait()
        if holder is not None:
            # SIGKILL to the namespace's init from here ends every process in
            # the namespace; unshare then reaps it and exits. (--kill-child
            # alone leaves the init for the host's PID 1 to reap, late.)
            for init in _children(holder.pid):
                os.kill(init, signal.SIGKILL)
            try:
                holder.wait(TIMEOUT)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--criu", default="criu", help="the criu binary to test")
    parser.add_argument("--mode", choices=MODES, default="local", help="how the pages travel (see run())")
    parser.add_argument("--no-socket", action="store_true", help="a process without a socket")
    parser.add_argument("--dump-arg", action="append", default=[], help="an extra criu dump option")
    parser.add_argument("--restore-arg", action="append", default=[], help="an extra criu restore option")
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="criuweb-selftest-")
    try:
        result = run(args.criu, not args.no_socket, args.dump_arg, args.restore_arg, work, args.mode)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
