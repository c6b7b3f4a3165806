"""What a host has and runs: its capability probe and live workload lists."""

from django.utils import timezone

from . import criu, ssh
from .docker_engine import Engine, EngineError

# One SSH command for the host facts a probe wants besides CRIU's.
FACTS_SCRIPT = r"""
echo "kernel $(uname -r)"
mkdir -p "$1" 2>/dev/null
echo "free_kib $(df -P -k "$1" | awk 'NR==2 {print $4}')"
command -v python3 >/dev/null && echo "python3 1" || echo "python3 0"
"""

# PID, parent, user, resident KiB, command line of every process, one per line.
PS_ARGV = ["ps", "-eo", "pid=,ppid=,user=,rss=,args=", "--sort=-rss"]


def probe(host):
    """Probe a host's capabilities, store them on it and return them.

    Never raises for a host that cannot be reached: the failure is the
    probe's result, shown on the host page.
    """
    caps = {"ok": False, "error": ""}
    try:
        with Engine(host) as engine:
            conn = engine.conn
            caps["criu"] = criu.probe(conn)
            # Top level, where Host.passes() looks up what a plan needs.
            caps["self_tests"] = caps["criu"].pop("self_tests")
            for line in conn.sh(FACTS_SCRIPT, host.work_dir).stdout.splitlines():
                key, _, value = line.partition(" ")
                caps[key] = value
            # KiB from df, as bytes here: awk would print large products in
            # scientific notation.
            kib = caps.pop("free_kib", "")
            caps["free"] = int(kib) * 1024 if kib.isdigit() else None
            caps["python3"] = caps.get("python3") == "1"
            version = engine.version()
            info = engine.info()
            caps["docker"] = {
                "version": version.get("Version"),
                "api_version": version.get("ApiVersion"),
                "checkpoints": bool(info.get("ExperimentalBuild")),
                "storage_driver": info.get("Driver"),
                # OCI runtimes the engine registers: criuweb's wrapper there
                # offers the runc path to kept checkpoints (a plan's "runtime:" need).
                "runtimes": sorted(info.get("Runtimes") or {}),
            }
    except (ssh.SSHError, EngineError) as e:
        caps["error"] = str(e)
    else:
        problems = []
        if not caps["criu"].get("check_ok"):
            problems.append("criu check fails")
        if not caps["docker"]["checkpoints"]:
            problems.append("Docker checkpoints are off (experimental)")
        caps["ok"] = not problems
        caps["error"] = "; ".join(problems)
    host.capabilities = caps
    host.probed = timezone.now()
    host.save(update_fields=["capabilities", "probed"])
    return caps


def workloads(host, with_processes=True):
    """(containers, processes) of a host, over one SSH connection."""
    with Engine(host) as engine:
        containers = engine.containers()
        processes = _processes(engine.conn) if with_processes else []
    return containers, processes


def _processes(conn, limit=2000):
    """The host's processes, largest first, as dicts.

    The limit bounds the page, not the choice: a busy host runs a few hundred
    processes, and a small one (a shell loop) must still be there to pick.
    """
    out = conn.run(PS_ARGV).stdout
    rows = []
    for line in out.splitlines()[:limit]:
        parts = line.split(None, 4)
        if len(parts) < 5:
            continue
        pid, ppid, user, rss, args = parts
        rows.append({"pid": int(pid), "ppid": int(ppid), "user": user, "rss_kib": int(rss), "command": args})
    return rows
