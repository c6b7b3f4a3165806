"""Kept checkpoints end to end on the lab: checkpoint, restore, clone, export and import.

The lab report's own sequence first: checkpoint the counter, restore it in
place, clone it as cr-clone on the same host and on the other one; then
each copy counts on by itself from the checkpointed value.
"""

import json
import os
import re
from io import StringIO

import docker
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from migrations_app import inventory, lab, runc, ssh
from migrations_app.docker_engine import Engine
from migrations_app.models import CHECKPOINT, CLONE, CONTAINER, PROCESS, RESTORE, SUCCEEDED, Checkpoint, MigrationRun
from tests.support import wait_for
from tests.test_migration_lab import _kill_tree, assert_consecutive, counter_process, values  # noqa: F401

pytestmark = pytest.mark.lab


def cli(*args):
    """Run a command with --json; its JSON object (CommandError propagates)."""
    out = StringIO()
    call_command(*args, "--json", stdout=out)
    return json.loads(out.getvalue())


def logged(engine, name, at_least=2):
    return wait_for(
        lambda: (v := values(engine.logs(name))) and len(v) >= at_least and v,
        timeout=15,
        message=f"{engine.name}: {name} printed fewer than {at_least} values",
    )


@pytest.fixture
def clones(hosts):
    """Names of containers a test makes; removed from both hosts at the end."""
    names = []
    yield names
    for host in hosts:
        with Engine(host) as engine:
            for name in names:
                if engine.exists(name):
                    engine.remove(name)


_probed: dict = {}


def probe(hosts):
    """Both lab hosts as their probe finds them: engines that register criuweb's runtime.

    Kept checkpoints of containers then take the runc path; hosts never
    probed (the plain `hosts` fixture) take Docker's API. Probed once per
    session: transactional tests empty the tables, the capabilities are put back.
    """
    from django.utils import timezone

    for host in hosts:
        if host.name in _probed:
            host.capabilities, host.probed = _probed[host.name], timezone.now()
            host.save(update_fields=["capabilities", "probed"])
        else:
            _probed[host.name] = inventory.probe(host)
        assert host.passes(f"runtime:{runc.RUNTIME_NAME}"), host.capabilities
    return hosts


@pytest.fixture
def runc_hosts(hosts):
    return probe(hosts)


@pytest.fixture(params=["runc", "docker"])
def either_hosts(request, hosts):
    """The lab's hosts, probed (runc path) or not (Docker's API path)."""
    return (probe(hosts) if request.param == "runc" else hosts), request.param


def images_digest(host, path):
    """The sorted sha256sum lines of a directory's files: what a restore must not change."""
    with ssh.Connection(host) as conn:
        return conn.sh('cd "$1" && find . -type f -print0 | sort -z | xargs -0 sha256sum', path).stdout


def files_exist(host, path):
    with ssh.Connection(host) as conn:
        return conn.run(["test", "-d", path], check=False).rc == 0


def test_report_sequence(either_hosts, counter_container, clones, tmp_path):
    (lab1, lab2), path = either_hosts
    runc_path = path == "runc"
    name = counter_container
    clones.append("cr-clone")

    # 1. Checkpoint: without --leave-running the counter stops, as in the report.
    made = cli("checkpoint", "--host", "lab-1", "--container", name, "--name", f"{name}-cp1")
    assert made["status"] == SUCCEEDED, made["error"]
    assert made["operation"] == CHECKPOINT and made["checkpoint"] == f"{name}-cp1"
    assert made["strategy"] == ("checkpoint-runc" if runc_path else "checkpoint")
    cp = Checkpoint.objects.get(name=f"{name}-cp1")
    assert cp.host == lab1 and cp.kind == CONTAINER and cp.size > 0 and cp.image_id.startswith("sha256:")
    assert cp.criu_version and cp.kernel and cp.config["Name"] == f"/{name}"
    assert files_exist(lab1, f"{cp.path}/checkpoint") and files_exist(lab1, f"{cp.path}/diff")
    with Engine(lab1) as engine:
        original = engine.inspect(name)
        assert not original["State"]["Running"]
        last = values(engine.logs(name))[-1]
        # Docker's own copy is gone: the kept directory is what stays.
        assert engine.checkpoints(original["Id"]) == []

    if runc_path:
        # CRIU's own statistics came with runc's images.
        assert cp.criu_stats.get("frozen_time", 0) > 0
        before_restores = images_digest(lab1, f"{cp.path}/checkpoint")

    # 2. Restore in place: the stopped original is replaced by one counting on.
    restored = cli("restore", "--checkpoint", cp.name)
    assert restored["status"] == SUCCEEDED, restored["error"]
    assert restored["strategy"] == ("restore-runc" if runc_path else "restore")
    assert [p["name"] for p in restored["phases"]] == [
        "pre-flight",
        "pre-flight",
        "prepare target",
        "transfer",
        *([] if runc_path else ["stage"]),
        "restore",
        "verify",
        "finish",
    ]
    if runc_path:
        # Restored from the kept images themselves: CRIU only read them.
        assert images_digest(lab1, f"{cp.path}/checkpoint") == before_restores
    with Engine(lab1) as engine:
        now = engine.inspect(name)
        assert now["State"]["Running"] and now["Id"] != original["Id"]
        assert now["Id"].startswith(restored["result_workload"])
        after = logged(engine, name)
        assert after[0] == last + 1, (last, after[:5])
        assert_consecutive(after)

    if runc_path:
        # The restored container runs under criuweb's runtime, which passes
        # runc's checkpoint through: it can be checkpointed again at once.
        again = cli("checkpoint", "--host", "lab-1", "--container", name, "--leave-running")
        assert again["status"] == SUCCEEDED, again["error"]
        with Engine(lab1) as engine:
            assert engine.inspect(name)["HostConfig"]["Runtime"] == runc.RUNTIME_NAME
            assert engine.inspect(name)["Id"] == now["Id"] and engine.inspect(name)["State"]["Running"]

    # 3. Clone it as cr-clone on the same host, then on the other one.
    for target in (lab1, lab2):
        with Engine(lab1) as engine:
            before = engine.inspect(name)
        run = cli("clone", "--checkpoint", cp.name, "--as", "cr-clone", "--target", target.name)
        assert run["status"] == SUCCEEDED, run["error"]
        assert run["operation"] == CLONE
        with Engine(target) as engine:
            clone = logged(engine, "cr-clone", 3)
        # 4. The clone counts on from the checkpointed value...
        assert clone[0] == last + 1, (last, clone[:5])
        assert_consecutive(clone)
        # ... and the restored original was not touched: same container, same
        # process, counting on without a gap.
        with Engine(lab1) as engine:
            still = engine.inspect(name)
            assert still["Id"] == before["Id"] and still["State"]["Pid"] == before["State"]["Pid"]
            assert still["State"]["StartedAt"] == before["State"]["StartedAt"]
            mine = logged(engine, name)
        assert_consecutive(mine)
        assert mine[-1] > clone[-1], "the original should be ahead of its clone"
        if target == lab1:
            with Engine(lab1) as engine:
                engine.remove("cr-clone")
    # The kept checkpoint is still there for the next restore.
    assert files_exist(lab1, f"{cp.path}/checkpoint")
    if runc_path:
        # Its archive carries CRIU's statistics with the images.
        from migrations_app import archive

        out = tmp_path / "cp1.tar.zst"
        exported = cli("export", "--checkpoint", cp.name, "--output", str(out))
        assert exported["status"] == SUCCEEDED, exported["error"]
        files = [f[0] for f in archive.verify(out)["payload"]["files"]]
        assert "checkpoint/stats-dump" in files and "checkpoint/inventory.img" in files


def test_clone_of_a_running_container_leaves_it_alone(either_hosts, counter_container, clones):
    (lab1, lab2), path = either_hosts
    name = counter_container
    clones.append(f"{name}-twin")
    with Engine(lab1) as engine:
        before = engine.inspect(name)
    run = cli("clone", "--host", "lab-1", "--container", name, "--as", f"{name}-twin", "--target", "lab-2")
    assert run["status"] == SUCCEEDED, run["error"]
    # Only its leave-running checkpoint paused it, and that pause is measured.
    assert run["downtime_ms"] > 0
    assert [p["name"] for p in run["phases"]][:5] == [
        "pre-flight",
        "pre-flight",
        "prepare target",
        "checkpoint",
        "transfer",
    ]
    with Engine(lab1) as engine:
        still = engine.inspect(name)
        assert still["State"]["Running"] and still["Id"] == before["Id"]
        assert still["State"]["Pid"] == before["State"]["Pid"]
        assert engine.checkpoints(still["Id"]) == []
        mine = logged(engine, name, 4)
    assert mine[0] == 0
    assert_consecutive(mine)
    with Engine(lab2) as engine:
        twin = logged(engine, f"{name}-twin", 2)
    assert_consecutive(twin)
    assert 0 < twin[0] <= mine[-1]

    if path == "docker":
        # A second Docker-API checkpoint of the same container now could lose it
        # under Docker 20.10 (containerd#8401): refused before anything is done.
        with pytest.raises(CommandError, match="containerd#8401"):
            cli("checkpoint", "--host", "lab-1", "--container", name, "--leave-running")
    else:
        # containerd never saw runc's checkpoint: a second one is safe, and taken.
        again = cli("checkpoint", "--host", "lab-1", "--container", name, "--leave-running")
        assert again["status"] == SUCCEEDED, again["error"]
        assert again["strategy"] == "checkpoint-runc"
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Running"]
        assert engine.inspect(name)["State"]["Pid"] == before["State"]["Pid"]


def test_restore_refuses_a_running_original_and_hostile_names(runc_hosts, counter_container):
    lab1, _ = runc_hosts
    name = counter_container
    made = cli("checkpoint", "--host", "lab-1", "--container", name, "--leave-running")
    assert made["status"] == SUCCEEDED, made["error"]
    assert made["strategy"] == "checkpoint-runc"
    cp = Checkpoint.objects.get(name=made["checkpoint"])
    # CRIU's own measure of the freeze, within the checkpoint phase.
    assert cp.leave_running and cp.freeze_ms and cp.freeze_ms > 0
    assert cp.freeze_ms == pytest.approx(cp.criu_stats["frozen_time"] / 1000)
    assert cp.freeze_ms <= made["downtime_ms"]
    with Engine(lab1) as engine:
        running = engine.inspect(name)
        assert running["State"]["Running"]
    with pytest.raises(CommandError, match="lab-1: container .* is running; stop it"):
        cli("restore", "--checkpoint", cp.name)
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Pid"] == running["State"]["Pid"]
    for bad in ("../etc", "a b", "x;rm -rf /", "-rf"):
        with pytest.raises(CommandError, match="not a (container|checkpoint) name"):
            cli("clone", "--checkpoint", cp.name, f"--as={bad}")
        with pytest.raises(CommandError, match="not a checkpoint name"):
            cli("checkpoint", "--host", "lab-1", "--container", name, f"--name={bad}")
    assert not MigrationRun.objects.filter(operation=CLONE).exists()


def test_process_checkpoint_and_clones(hosts, counter_process):
    lab1, lab2 = hosts
    pid = counter_process["pid"]
    path = counter_process["path"]
    start = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19]
    made = cli("checkpoint", "--host", "lab-1", "--pid", str(pid), "--leave-running")
    assert made["status"] == SUCCEEDED, made["error"]
    cp = Checkpoint.objects.get(name=made["checkpoint"])
    assert cp.kind == PROCESS and cp.leave_running
    # CRIU's own measure of the freeze, no longer than the dump phase.
    assert 0 < cp.freeze_ms <= made["downtime_ms"]
    assert cp.criu_stats["frozen_time"] > 0
    assert open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19] == start
    checkpointed = max(values(path.read_text()))

    started = []
    try:
        # From the kept checkpoint on the other host, then from the live tree here.
        for args in (["--checkpoint", cp.name, "--target", "lab-2"], ["--host", "lab-1", "--pid", str(pid)]):
            run = cli("clone", *args)
            assert run["status"] == SUCCEEDED, run["error"]
            clone = int(run["result_workload"])
            started.append(clone)
            assert clone != pid
            # Its own PID namespace: its PIDs collide with nobody's.
            assert os.readlink(f"/proc/{clone}/ns/pid") != os.readlink(f"/proc/{pid}/ns/pid")
        # The original goes on as the same process; each clone counts on from
        # its checkpoint into the same file, so values repeat there.
        assert open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[19] == start
        wait_for(lambda: values(path.read_text()).count(checkpointed + 2) >= 2, 15, "the clone does not count")
        for p in started:
            assert os.path.exists(f"/proc/{p}")
        runs = MigrationRun.objects.filter(operation=CLONE, kind=PROCESS)
        assert runs.count() == 2 and all(r.status == SUCCEEDED for r in runs)
    finally:
        for p in started:
            _kill_tree(p)

    # Restored in place while the original runs would make two: refused.
    with pytest.raises(CommandError, match="still runs there"):
        cli("restore", "--checkpoint", cp.name)
    assert not MigrationRun.objects.filter(operation=RESTORE, status=SUCCEEDED).exists()


def host_listing(host):
    """What a host holds that an import could change: kept checkpoints and containers."""
    with ssh.Connection(host) as conn:
        kept = conn.run(["ls", "-a", f"{host.work_dir}/checkpoints"], check=False).stdout
    with Engine(host) as engine:
        containers = sorted(c["id"] for c in engine.containers())
    return kept, containers, Checkpoint.objects.filter(host=host).count()


def resealed(src, dst, change):
    """A copy of an archive with its manifest changed and its checksums made anew, as a forger would."""
    import io
    import tarfile

    import zstandard

    from migrations_app import archive

    raw = zstandard.ZstdDecompressor().stream_reader(open(src, "rb")).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())
        data = tar.extractfile("payload.tar").read()
    change(manifest)
    archive._seal(manifest)
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, content in (("manifest.json", json.dumps(manifest).encode()), ("payload.tar", data)):
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    dst.write_bytes(zstandard.ZstdCompressor(write_checksum=True).compress(out.getvalue()))


def test_export_import_restore(hosts, counter_container, tmp_path):
    lab1, lab2 = hosts
    name = counter_container
    # Made the Docker way (hosts not probed: Docker's checkpoint API), as
    # every checkpoint before the runc path was ...
    made = cli("checkpoint", "--host", "lab-1", "--container", name, "--name", f"{name}-ex")
    assert made["status"] == SUCCEEDED, made["error"]
    assert made["strategy"] == "checkpoint"
    with Engine(lab1) as engine:
        last = values(engine.logs(name))[-1]
        engine.remove(name)  # only the archive will carry it on
    out = tmp_path / "cp.tar.zst"
    exported = cli("export", "--checkpoint", f"{name}-ex", "--output", str(out))
    assert exported["status"] == SUCCEEDED, exported["error"]
    assert out.stat().st_size > 0 and exported["output"] == str(out)

    # Damaged, truncated, or made by a newer CRIU: refused, and lab-2 unchanged.
    before = host_listing(lab2)
    raw = out.read_bytes()
    flipped = tmp_path / "flipped.tar.zst"
    flipped.write_bytes(raw[:5000] + bytes([raw[5000] ^ 0x10]) + raw[5001:])
    truncated = tmp_path / "truncated.tar.zst"
    truncated.write_bytes(raw[: len(raw) * 2 // 3])
    newer = tmp_path / "newer.tar.zst"
    resealed(out, newer, lambda m: m["checkpoint"].update(criu_version="999.0"))
    for bad, message in (
        (flipped, "damaged|checksum|changed"),
        (truncated, "damaged|truncated|checksum"),
        (newer, "lab-2: CRIU .* is older than the CRIU 999.0 that made this checkpoint"),
    ):
        with pytest.raises(CommandError, match=message):
            cli("import", "--host", "lab-2", "--input", str(bad))
        assert host_listing(lab2) == before

    imported = cli("import", "--host", "lab-2", "--input", str(out))
    assert imported["status"] == SUCCEEDED, imported["error"]
    cp = Checkpoint.objects.get(name=imported["checkpoint"])
    assert cp.host == lab2 and cp.imported and cp.name != f"{name}-ex"
    assert files_exist(lab2, f"{cp.path}/checkpoint") and files_exist(lab2, f"{cp.path}/diff")

    # ... and restored on the runc path, by criuweb's runtime.
    probe(hosts)
    restored = cli("restore", "--checkpoint", cp.name)
    assert restored["status"] == SUCCEEDED, restored["error"]
    assert restored["strategy"] == "restore-runc"
    try:
        with Engine(lab2) as engine:
            after = logged(engine, name)
        assert after[0] == last + 1, (last, after[:5])
        assert_consecutive(after)
    finally:
        with Engine(lab2) as engine:
            engine.remove(name)


def test_import_refuses_a_missing_image(hosts, counter_container, tmp_path):
    lab1, lab2 = hosts
    made = cli("checkpoint", "--host", "lab-1", "--container", counter_container, "--leave-running")
    out = tmp_path / "cp.tar.zst"
    cli("export", "--checkpoint", made["checkpoint"], "--output", str(out))
    missing = tmp_path / "missing.tar.zst"
    resealed(out, missing, lambda m: m["checkpoint"].update(image_id="sha256:" + "0" * 64, image="gone:1"))
    before = host_listing(lab2)
    with pytest.raises(CommandError, match="lab-2: the checkpoint's image gone:1 .* is missing there"):
        cli("import", "--host", "lab-2", "--input", str(missing))
    assert host_listing(lab2) == before


def test_retention_and_delete(hosts, counter_process):
    lab1, _ = hosts
    from migrations_app.engine import keep

    lab1.checkpoint_retention = 1
    lab1.save()
    pid = str(counter_process["pid"])
    first = cli("checkpoint", "--host", "lab-1", "--pid", pid, "--leave-running", "--name", f"p{pid}-a")
    first_path = Checkpoint.objects.get(name=first["checkpoint"]).path
    second = cli("checkpoint", "--host", "lab-1", "--pid", pid, "--leave-running", "--name", f"p{pid}-b")
    assert second["status"] == SUCCEEDED, second["error"]
    assert "retention removed " + first["checkpoint"] in second["phases"][-1]["detail"]
    assert list(Checkpoint.objects.filter(host=lab1, workload=pid).values_list("name", flat=True)) == [f"p{pid}-b"]
    assert not files_exist(lab1, first_path)
    cp = Checkpoint.objects.get(name=f"p{pid}-b")
    keep.delete(cp)
    assert not files_exist(lab1, cp.path) and not Checkpoint.objects.filter(name=cp.name).exists()
    assert os.path.exists(f"/proc/{pid}")


def test_a_container_with_a_volume_is_refused_and_runs_on(hosts, clones):
    lab1, _ = hosts
    name = f"vol-{os.getpid()}"
    clones.append(name)
    with Engine(lab1) as engine:
        config = engine.api.create_host_config(binds={f"{name}-data": {"bind": "/data", "mode": "rw"}})
        cid = engine.api.create_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name=name, host_config=config)
        engine.api.start(cid["Id"])
        logged(engine, name)
    try:
        for args in (["checkpoint", "--leave-running"], ["clone", "--as", f"{name}-2"]):
            with pytest.raises(CommandError, match=f"mounts {name}-data -> /data; a kept checkpoint or a clone"):
                cli(args[0], "--host", "lab-1", "--container", name, *args[1:])
        with Engine(lab1) as engine:
            assert engine.inspect(name)["State"]["Running"] and engine.checkpoints(cid["Id"]) == []
        assert not Checkpoint.objects.exists()
    finally:
        with Engine(lab1) as engine:
            engine.remove(name)
            engine.api.remove_volume(f"{name}-data")


def test_published_ports_are_refused_before_anything_is_done(runc_hosts, clones):
    lab1, lab2 = runc_hosts
    name = f"web-{os.getpid()}"
    port = 20000 + os.getpid() % 10000
    clones += [name, f"{name}-2", f"{name}-3"]
    with Engine(lab1) as engine:
        config = engine.api.create_host_config(port_bindings={8080: port})
        cid = engine.api.create_container(
            lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name=name, host_config=config, ports=[8080]
        )["Id"]
        engine.api.start(cid)
        logged(engine, name)
        pid = engine.inspect(cid)["State"]["Pid"]
    before = host_listing(lab1)
    taken = rf"lab-1: the container publishes host port {port}->8080/tcp \(held by container {name}\) there"

    # A live clone beside the original: refused in the target's pre-flight,
    # before the checkpoint, and nothing was made on the host.
    with pytest.raises(CommandError, match=taken):
        cli("clone", "--host", "lab-1", "--container", name, "--as", f"{name}-2")
    run = MigrationRun.objects.get(operation=CLONE)
    assert [p.name for p in run.phases.all()] == ["pre-flight", "pre-flight"]
    assert host_listing(lab1) == before
    with Engine(lab1) as engine:
        assert engine.inspect(cid)["State"]["Pid"] == pid

    # A kept checkpoint restored under a new name beside it: the same.
    made = cli("checkpoint", "--host", "lab-1", "--container", name, "--leave-running")
    assert made["status"] == SUCCEEDED, made["error"]
    before = host_listing(lab1)
    with pytest.raises(CommandError, match=taken):
        cli("restore", "--checkpoint", made["checkpoint"], "--as", f"{name}-3")
    assert host_listing(lab1) == before

    # On the other host the port is free: the clone runs there, published.
    run = cli("clone", "--host", "lab-1", "--container", name, "--as", f"{name}-2", "--target", "lab-2")
    assert run["status"] == SUCCEEDED, run["error"]
    with Engine(lab2) as engine:
        clone = engine.inspect(f"{name}-2")
        assert clone["State"]["Running"]
        assert clone["HostConfig"]["PortBindings"]["8080/tcp"][0]["HostPort"] == str(port)
    with Engine(lab1) as engine:
        assert engine.inspect(cid)["State"]["Pid"] == pid

    # Now lab-2 holds the port: a migration there is refused in its pre-flight
    # too, before the freeze, where Docker would have failed the restore after it.
    with pytest.raises(
        CommandError, match=rf"lab-2: the container publishes host port {port}->8080/tcp \(held by container {name}-2\)"
    ):
        cli("migrate_workload", "--source", "lab-1", "--target", "lab-2", "--container", name)
    with Engine(lab1) as engine:
        assert engine.inspect(cid)["State"]["Pid"] == pid


def test_an_image_is_shipped_and_one_neither_host_has_is_refused(runc_hosts, clones, tmp_path):
    import io

    lab1, lab2 = runc_hosts
    name = f"img-{os.getpid()}"
    tag = f"criuweb-test-{os.getpid()}:1"
    clones += [name, f"{name}-2"]
    with Engine(lab1) as engine:
        # An image of its own (the lab's image with one more label): removable.
        dockerfile = io.BytesIO(f"FROM {lab.IMAGE}\nLABEL criuweb.test={name}\n".encode())
        engine.call("docker build", lambda: list(engine.api.build(fileobj=dockerfile, tag=tag, rm=True)))
        cid = engine.api.create_container(tag, ["sh", "-c", lab.COUNTER_SCRIPT], name=name)["Id"]
        engine.api.start(cid)
        logged(engine, name)
    made = cli("checkpoint", "--host", "lab-1", "--container", name)
    assert made["status"] == SUCCEEDED, made["error"]
    with Engine(lab1) as engine:
        at = values(engine.logs(name))[-1]

    # lab-2 lacks the image: shipped from the checkpoint's host, then the clone runs.
    run = cli("clone", "--checkpoint", made["checkpoint"], "--as", f"{name}-2", "--target", "lab-2")
    assert run["status"] == SUCCEEDED, run["error"]
    assert "ship image" in [p["name"] for p in run["phases"]] and run["image_bytes"] > 0
    with Engine(lab2) as engine:
        copied = logged(engine, f"{name}-2", 3)
        engine.remove(f"{name}-2")
        # Shipped by its id (docker save of an id carries no tag).
        engine.api.remove_image(Checkpoint.objects.get(name=made["checkpoint"]).image_id, force=True)
    assert copied[0] == at + 1
    assert_consecutive(copied)

    # Gone from both hosts: nothing to ship it from, refused before anything is made.
    with Engine(lab1) as engine:
        engine.remove(cid)
        engine.api.remove_image(tag, force=True)
    before = host_listing(lab2)
    with pytest.raises(CommandError, match=f"lab-2: the checkpoint's image {tag} .* is missing there and on lab-1"):
        cli("restore", "--checkpoint", made["checkpoint"], "--host", "lab-2")
    assert host_listing(lab2) == before
    refused = MigrationRun.objects.get(operation=RESTORE)
    assert [p.name for p in refused.phases.all()] == ["pre-flight", "pre-flight"]


def test_a_failed_keep_brings_the_stopped_container_back(runc_hosts, counter_container):
    """The checkpoint stopped the container, then keeping it failed: it runs again from its images."""
    from migrations_app.engine import execute, keep
    from migrations_app.models import ROLLED_BACK

    lab1, _ = runc_hosts
    name = counter_container
    run = keep.create_checkpoint_run(lab1, CONTAINER, name, f"{name}-cp")
    assert run.strategy == "checkpoint-runc"
    kept = keep.kept_dir(lab1, f"{name}-cp")

    stopped_at = []

    def block_the_rename(ctx):
        with Engine(lab1) as engine:
            stopped_at.extend(values(engine.logs(name)))
        # A file where the kept directory goes: the keep step's last rename fails for real.
        with ssh.Connection(lab1) as conn:
            conn.run(["touch", "--", kept])

    with Engine(lab1) as engine:
        cid = engine.inspect(name)["Id"]
    run = execute(run, after_phase={"checkpoint": block_the_rename})
    assert run.status == ROLLED_BACK, run.error
    assert [p.name for p in run.phases.all()][-2:] == ["keep", "rollback"]
    with Engine(lab1) as engine:
        assert engine.inspect(name)["Id"] == cid and engine.inspect(name)["State"]["Running"]
        after = logged(engine, name, len(stopped_at) + 2)
    # Restored from its images, not started afresh: the log goes on from
    # where the checkpoint stopped it, no value lost or repeated.
    assert len(stopped_at) >= 2 and after[: len(stopped_at)] == stopped_at
    assert_consecutive(after)
    assert not Checkpoint.objects.exists()
    assert not files_exist(lab1, f"{kept}.part")
    with ssh.Connection(lab1) as conn:
        assert conn.run(["test", "-e", kept], check=False).rc != 0


def test_a_failed_restore_elsewhere_leaves_nothing_there(runc_hosts, counter_container, clones):
    """CRIU's restore fails on the other host: the new container and its files go, the checkpoint stays."""
    from migrations_app.engine import execute, keep
    from migrations_app.models import FAILED, ROLLED_BACK

    lab1, lab2 = runc_hosts
    name = counter_container
    clones.append(f"{name}-2")
    made = cli("checkpoint", "--host", "lab-1", "--container", name, "--leave-running")
    assert made["status"] == SUCCEEDED, made["error"]
    cp = Checkpoint.objects.get(name=made["checkpoint"])
    digest = images_digest(lab1, f"{cp.path}/checkpoint")
    before = host_listing(lab2)

    def damage_the_copy(ctx):
        # The copy on lab-2 loses its memory pages: CRIU's restore fails there for real.
        with ssh.Connection(lab2) as conn:
            conn.sh('rm -f -- "$1"/pages-*.img', ctx.state.images)

    run = keep.create_restore_run(cp, target=lab2, new_name=f"{name}-2", operation=CLONE)
    assert run.strategy == "clone-runc"
    run = execute(run, after_phase={"transfer": damage_the_copy})
    assert run.status in (FAILED, ROLLED_BACK) and "restore" in run.error, run.error
    assert host_listing(lab2) == before
    with Engine(lab2) as engine:
        assert not engine.exists(f"{name}-2")
    assert images_digest(lab1, f"{cp.path}/checkpoint") == digest
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Running"]


def test_a_fixed_address_taken_on_the_target_is_refused_before_anything_is_done(runc_hosts, clones):
    lab1, _ = runc_hosts
    name = f"ip-{os.getpid()}"
    network = f"{name}-net"
    ip = "172.31.77.10"
    clones += [name, f"{name}-2"]
    with Engine(lab1) as engine:
        ipam = docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet="172.31.77.0/24")])
        engine.api.create_network(network, driver="bridge", ipam=ipam)
        try:
            cid = engine.api.create_container(
                lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name=name,
                host_config=engine.api.create_host_config(network_mode=network),
                networking_config=engine.api.create_networking_config(
                    {network: engine.api.create_endpoint_config(ipv4_address=ip)}
                ),
            )["Id"]  # fmt: skip
            engine.api.start(cid)
            logged(engine, name)
            pid = engine.inspect(cid)["State"]["Pid"]
            before = host_listing(lab1)
            with pytest.raises(
                CommandError, match=f"lab-1: the container has the fixed address {ip} on network {network} "
                rf"\(held by container {name}\) there"
            ):  # fmt: skip
                cli("clone", "--host", "lab-1", "--container", name, "--as", f"{name}-2")
            assert [p.name for p in MigrationRun.objects.get(operation=CLONE).phases.all()] == [
                "pre-flight",
                "pre-flight",
            ]
            assert host_listing(lab1) == before
            assert engine.inspect(cid)["State"]["Pid"] == pid
        finally:
            if engine.exists(name):
                engine.remove(name)
            engine.api.remove_network(network)


def test_a_container_with_a_terminal_is_cloned_on_the_runc_path(runc_hosts, clones):
    lab1, _ = runc_hosts
    name = f"tty-{os.getpid()}"
    clones += [name, f"{name}-2"]
    with Engine(lab1) as engine:
        cid = engine.api.create_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name=name, tty=True)["Id"]
        engine.api.start(cid)
        logged(engine, name)
    made = cli("checkpoint", "--host", "lab-1", "--container", name, "--leave-running")
    assert made["status"] == SUCCEEDED and made["strategy"] == "checkpoint-runc", made["error"]
    with Engine(lab1) as engine:
        at = values(engine.logs(name))[-1]
    run = cli("clone", "--checkpoint", made["checkpoint"], "--as", f"{name}-2")
    assert run["status"] == SUCCEEDED, run["error"]
    with Engine(lab1) as engine:
        clone = engine.inspect(f"{name}-2")
        assert clone["Config"]["Tty"] and clone["State"]["Running"]
        copied = logged(engine, f"{name}-2", 3)
        assert engine.inspect(cid)["State"]["Running"]
    # Its new terminal carries its output on from the checkpoint.
    assert 0 < copied[0] <= at + 1
    assert_consecutive(copied)


@pytest.mark.django_db(transaction=True)
def test_controller_killed_after_the_keep_step_recovers_from_the_images(runc_hosts, counter_container):
    """A stopping runc checkpoint recorded, then the controller killed before the run
    was marked done: the recovery rolls back. The container must come back from the
    images the checkpoint recorded, not start afresh, and no record may outlive its
    files (before: the record stayed, its directory was removed, the counter restarted)."""
    import subprocess
    import sys

    from migrations_app.engine import keep
    from migrations_app.engine.runner import TEST_PAUSE_ENV
    from migrations_app.models import ROLLED_BACK, Stage
    from tests.test_faults_lab import BASE_DIR, _env, kill_when_paused, recover_all

    lab1, _ = runc_hosts
    name = counter_container
    cp_name = f"{name}-cp"
    keep_dir = keep.kept_dir(lab1, cp_name)
    with Engine(lab1) as engine:
        cid = engine.inspect(name)["Id"]
    env = dict(_env(), **{TEST_PAUSE_ENV: "keep=120"})
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "checkpoint", "--host", "lab-1", "--container", name, "--name", cp_name],
        cwd=BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    kill_when_paused(proc, "keep")
    run = MigrationRun.objects.get(operation=CHECKPOINT, workload=name)
    assert run.strategy == "checkpoint-runc" and run.stage == Stage.FROZEN and run.checkpoint_id
    with Engine(lab1) as engine:
        assert not engine.inspect(name)["State"]["Running"]
        before = values(engine.logs(name))
    recover_all()
    run.refresh_from_db()
    assert run.status == ROLLED_BACK, run.error
    with Engine(lab1) as engine:
        assert engine.inspect(name)["Id"] == cid and engine.inspect(name)["State"]["Running"]
        after = logged(engine, name, len(before) + 2)
    # Restored from the images: the log goes on from where the checkpoint stopped it.
    assert len(before) >= 2 and after[: len(before)] == before, (before[-3:], after[: len(before) + 3])
    assert_consecutive(after)
    # Rolled back whole: no record without its files, no files without a record.
    assert not Checkpoint.objects.filter(name=cp_name).exists()
    assert not files_exist(lab1, keep_dir)
    assert not files_exist(lab1, f"{keep_dir}.part")


@pytest.mark.parametrize("leave_running", [False, True])
def test_freeze_limit_cutting_a_runc_checkpoint_off_waits_for_it(runc_hosts, clones, leave_running):
    """The freeze limit closes the checkpoint's SSH session while runc still
    checkpoints into the kept directory (stopping the container or leaving it
    running): runc and CRIU go on there. The rollback
    must wait for them, then bring the container back with the same memory,
    rather than find it still running and remove the images under CRIU."""
    import uuid

    from migrations_app.engine import execute, keep
    from migrations_app.engine.plans import container_runc as cr
    from migrations_app.models import ROLLED_BACK

    lab1, lab2 = runc_hosts
    name = f"memhog-{uuid.uuid4().hex[:8]}"
    clones.append(name)
    with Engine(lab1) as engine:
        lab.run_memhog_container(engine, name, 1024)  # a dump that outlasts the rollback's first look
        wait_for(lambda: len(lab.counter_values(engine.logs(name))) >= 5, 60, "memhog did not start")
        checksum = lab.memhog_container_checksum(engine, name)
    run = keep.create_checkpoint_run(lab1, CONTAINER, name, f"{name}-cp", leave_running=leave_running)
    assert run.strategy == "checkpoint-runc"
    run.freeze_limit = 0.5
    run.save(update_fields=["freeze_limit"])
    run = execute(run)
    assert run.status == ROLLED_BACK, run.error
    assert run.error.startswith("checkpoint did not end within the freeze limit"), run.error
    with Engine(lab1) as engine:
        cid = engine.inspect(name)["Id"]
        # Rolled back once runc was done, not while CRIU still held it frozen.
        assert engine.conn.sh(cr.CHECKPOINT_BUSY_SCRIPT, cid, check=False).rc == 1, "runc still checkpoints it"
        state = runc.runc_state(engine.conn, cid)
        assert runc.is_running(engine.conn, state, cid)
        # Not left frozen by CRIU's freezer either: runc says "paused" for that.
        status = json.loads(engine.conn.run([state.binary, "--root", state.root, "state", cid]).stdout)["status"]
        assert status == "running", status
        wait_for(lambda: engine.inspect(name)["State"]["Running"], 30, "the container is not running")
        # The same memory: restored from the checkpoint, or never stopped.
        assert lab.memhog_container_checksum(engine, name) == checksum
        count = len(lab.counter_values(engine.logs(name)))
        wait_for(lambda: len(lab.counter_values(engine.logs(name))) > count + 3, 30, "the counter stopped")
        assert_consecutive(lab.counter_values(engine.logs(name)))
        assert engine.inspect(name)["State"]["Running"]
    assert not Checkpoint.objects.exists()
    kept = keep.kept_dir(lab1, f"{name}-cp")
    assert not files_exist(lab1, kept) and not files_exist(lab1, f"{kept}.part")


@pytest.mark.django_db(transaction=True)
def test_controller_killed_after_keeping_a_stopped_process_recovers_it(hosts, counter_process):
    """The process twin of the container case: a stopping dump kept and recorded, the
    CLI killed before the run was marked done. The recovery must restore the tree
    from those images (before: it found none where it looked, and nothing ran)."""
    import subprocess
    import sys

    from migrations_app.engine import keep
    from migrations_app.engine.hostcheck import pid_alive
    from migrations_app.engine.runner import TEST_PAUSE_ENV
    from migrations_app.models import ROLLED_BACK, Stage
    from tests.test_faults_lab import BASE_DIR, _env, kill_when_paused, recover_all

    lab1, _ = hosts
    pid, path = counter_process["pid"], counter_process["path"]
    cp_name = f"pid{pid}-cp"
    env = dict(_env(), **{TEST_PAUSE_ENV: "keep=120"})
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "checkpoint", "--host", "lab-1", "--pid", str(pid), "--name", cp_name],
        cwd=BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    kill_when_paused(proc, "keep")
    run = MigrationRun.objects.get(operation=CHECKPOINT, kind=PROCESS)
    assert run.stage == Stage.FROZEN and run.checkpoint_id
    before = values(path.read_text())
    recover_all()
    run.refresh_from_db()
    assert run.status == ROLLED_BACK, run.error
    new_pid = int(run.result_workload)
    counter_process["pid"] = new_pid  # the fixture kills it
    with ssh.Connection(lab1) as conn:
        assert pid_alive(conn, new_pid)
    after = wait_for(lambda: (v := values(path.read_text())) and len(v) >= len(before) + 2 and v, 30, "no count")
    assert after[: len(before)] == before
    assert_consecutive(after)
    assert not Checkpoint.objects.filter(name=cp_name).exists()
    assert not files_exist(lab1, keep.kept_dir(lab1, cp_name))


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("path", ["runc", "docker"])
def test_two_in_place_restores_at_once_leave_one_copy(hosts, counter_container, path):
    """Two in-place restores of two checkpoints of one container, started at once
    (two users, two API calls): one restores it, the other is refused with a
    message. Before: each saw the stopped original in its pre-flight, both
    restored a copy under a temporary name, and both ran."""
    import subprocess
    import sys

    from migrations_app.models import FAILED
    from tests.test_faults_lab import BASE_DIR, _env

    lab1, _ = probe(hosts) if path == "runc" else hosts
    name = counter_container
    first = cli("checkpoint", "--host", "lab-1", "--container", name, "--name", f"{name}-a", "--leave-running")
    assert first["status"] == SUCCEEDED, first["error"]
    if path == "docker":
        # containerd#8401 makes a second Docker-API checkpoint of the container
        # wait 10 minutes: the second checkpoint is a copy of the first, kept
        # and recorded under its own name, with a file CRIU does not read so
        # that containerd does not take it for the first (moby/moby#42900).
        import uuid

        from migrations_app.engine import keep

        cp_b = Checkpoint.objects.get(name=f"{name}-a")
        source = cp_b.path
        cp_b.pk, cp_b.code, cp_b.name = None, uuid.uuid4(), f"{name}-b"
        cp_b.path = keep.kept_dir(lab1, cp_b.name)
        with ssh.Connection(lab1) as conn:
            conn.run(["cp", "-a", "--", source, cp_b.path])
            conn.sh('echo "a copy of $1" >"$2/checkpoint/copied-from"', source, cp_b.path)
        cp_b.save()
        with Engine(lab1) as engine:
            engine.call("docker stop", engine.api.stop, name)
    else:
        second = cli("checkpoint", "--host", "lab-1", "--container", name, "--name", f"{name}-b")
        assert second["status"] == SUCCEEDED, second["error"]
    with Engine(lab1) as engine:
        assert not engine.inspect(name)["State"]["Running"]
    # A host that takes two runs at once (with the default of one, the second
    # waits in the queue, then finds the restored copy in its pre-flight).
    lab1.max_source_runs = 2
    lab1.save(update_fields=["max_source_runs"])

    argv = [sys.executable, "manage.py", "restore", "--json", "--checkpoint"]
    out = {"cwd": BASE_DIR, "env": _env(), "stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    procs = [subprocess.Popen([*argv, f"{name}-{which}"], **out) for which in "ab"]
    outcomes = [p.communicate(timeout=300) for p in procs]
    with Engine(lab1) as engine:
        mine = [c for c in engine.containers() if c["name"] == name or c["name"].startswith(f"{name}-cw")]
        running = [c for c in mine if engine.inspect(c["id"])["State"]["Running"]]
        assert len(running) == 1 and len(mine) == 1, (mine, outcomes)
        after = logged(engine, name)
    assert_consecutive(after)
    runs = MigrationRun.objects.filter(operation=RESTORE).order_by("created")
    assert sorted(r.status for r in runs) == sorted([SUCCEEDED, FAILED]), [(r.status, r.error) for r in runs]
    refused = runs.get(status=FAILED)
    # Refused in its pre-flight: while the other runs, or (on a busy machine) once it has replaced the original.
    busy = rf"lab-1: container {name} is being restored or checkpointed by another run"
    assert re.search(rf"{busy}|lab-1: a container named .{name}. already exists", refused.error), refused.error
    # Refused before anything was made there.
    assert [p.name for p in refused.phases.all()] == ["pre-flight", "pre-flight"]


@pytest.mark.parametrize("path", ["runc", "docker"])
def test_a_stopping_checkpoint_is_not_cut_off_while_its_layer_is_copied(hosts, counter_container, path):
    """Once a stopping checkpoint has stopped the container, copying its writable
    layer is no downtime: the freeze limit must not cut the copy off and roll a
    safely checkpointed container back. Before: with a 3 GiB layer and a 3 s
    limit, the checkpoint took 0.2 s and the keep step was cut off at 3 s."""
    import time

    from migrations_app.engine import execute, keep

    lab1, _ = probe(hosts) if path == "runc" else hosts
    name = counter_container
    run = keep.create_checkpoint_run(lab1, CONTAINER, name, f"{name}-cp")
    run.freeze_limit = 5  # room for the checkpoint itself on a busy machine
    run.save(update_fields=["freeze_limit"])

    def outlast_the_limit(ctx):
        # Stands for a layer whose copy outlasts the limit (GiBs, as in the
        # docstring): waiting here outlasts it on any machine, a copy of a
        # given size only on some.
        time.sleep(max(0.0, ctx.watchdog.deadline - time.monotonic()) + 1)

    run = execute(run, after_phase={"checkpoint": outlast_the_limit})
    assert run.status == SUCCEEDED, run.error
    assert [p.name for p in run.phases.all()] == ["pre-flight", "checkpoint", "keep", "cleanup"]
    cp = Checkpoint.objects.get(name=f"{name}-cp")
    assert files_exist(lab1, f"{cp.path}/checkpoint") and files_exist(lab1, f"{cp.path}/diff")
    with Engine(lab1) as engine:
        last = values(engine.logs(name))[-1]
        assert not engine.inspect(name)["State"]["Running"]
    # Still a good checkpoint: the counter goes on from it.
    restored = cli("restore", "--checkpoint", cp.name)
    assert restored["status"] == SUCCEEDED, restored["error"]
    with Engine(lab1) as engine:
        after = logged(engine, name)
    assert after[0] == last + 1, (last, after[:5])
    assert_consecutive(after)


def _exported_process_checkpoint(counter_process, tmp_path):
    """An archive of a leave-running checkpoint of the counter process."""
    pid = str(counter_process["pid"])
    made = cli("checkpoint", "--host", "lab-1", "--pid", pid, "--leave-running", "--name", f"p{pid}-ex")
    assert made["status"] == SUCCEEDED, made["error"]
    out = tmp_path / "cp.tar.zst"
    exported = cli("export", "--checkpoint", made["checkpoint"], "--output", str(out))
    assert exported["status"] == SUCCEEDED, exported["error"]
    return out


@pytest.mark.parametrize("change", ["changed", "truncated"])
def test_an_archive_changed_after_its_check_is_refused_and_leaves_nothing(hosts, counter_process, tmp_path, change):
    """The archive is replaced between its check and the transfer (same manifest,
    other payload bytes; or cut short): the bytes sent are not the ones checked.
    Refused with a message, nothing kept or recorded, and nothing left on the
    host: the host unpacks aside, the controller waits for its tar to end
    before removing that, and the kept directory is named only once the
    controller found the bytes it sent to be the checked ones. (Before, the
    host named it before the controller's check, and the cut-short one ended
    with the decompressor's own words, logged as a crash.)"""
    import io
    import tarfile

    import zstandard

    from migrations_app.engine import execute, keep
    from migrations_app.models import FAILED

    _, lab2 = hosts
    out = _exported_process_checkpoint(counter_process, tmp_path)
    raw = zstandard.ZstdDecompressor().stream_reader(open(out, "rb")).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    # One byte of the payload's last file changed: a tar that still unpacks.
    (manifest, mdata), (payload, pdata) = members
    inner = tarfile.open(fileobj=io.BytesIO(pdata))
    last = [m for m in inner.getmembers() if m.isreg() and m.size][-1]
    pdata = pdata[: last.offset_data] + bytes([pdata[last.offset_data] ^ 0xFF]) + pdata[last.offset_data + 1 :]
    changed = io.BytesIO()
    with tarfile.open(fileobj=changed, mode="w") as tar:
        tar.addfile(manifest, io.BytesIO(mdata))
        tar.addfile(payload, io.BytesIO(pdata))
    tampered = zstandard.ZstdCompressor(write_checksum=True).compress(changed.getvalue())
    if change == "truncated":
        tampered = out.read_bytes()[: len(tampered) * 2 // 3]

    with ssh.Connection(lab2) as conn:
        conn.run(["mkdir", "-p", f"{lab2.work_dir}/checkpoints"])  # made by the pre-flight's space check
    before = host_listing(lab2)
    run = keep.create_import_run(lab2, str(out), name="swapped")

    def swap(ctx):
        out.write_bytes(tampered)

    run = execute(run, after_phase={"verify archive": swap})
    expected = "the payload changed since it was verified" if change == "changed" else "is damaged or truncated"
    assert run.status == FAILED, run.error
    assert run.error.startswith(f"controller: cp.tar.zst: the {'archive' if change == 'truncated' else 'payload'}")
    assert expected in run.error and run.error.endswith("nothing was kept on lab-2"), run.error
    assert host_listing(lab2) == before
    assert not Checkpoint.objects.filter(name="swapped").exists()


@pytest.mark.django_db(transaction=True)
def test_an_import_whose_controller_died_after_the_transfer_leaves_nothing(hosts, counter_process, tmp_path):
    """The CLI killed right after the checkpoint reached the host, before it was
    recorded: the recovery removes what the host unpacked. Before: the recovery's
    abort had no connection to the host and removed nothing, leaving a kept
    directory no record names (disk used that no page shows)."""
    import subprocess
    import sys

    from migrations_app.engine import keep
    from migrations_app.engine.runner import TEST_PAUSE_ENV
    from migrations_app.models import FAILED, IMPORT
    from tests.test_faults_lab import BASE_DIR, _env, kill_when_paused, recover_all

    _, lab2 = hosts
    out = _exported_process_checkpoint(counter_process, tmp_path)
    with ssh.Connection(lab2) as conn:
        conn.run(["mkdir", "-p", f"{lab2.work_dir}/checkpoints"])  # made by the pre-flight's space check
    before = host_listing(lab2)
    env = dict(_env(), **{TEST_PAUSE_ENV: "transfer=120"})
    proc = subprocess.Popen(
        [sys.executable, "manage.py", "import", "--host", "lab-2", "--input", str(out), "--name", "died"],
        cwd=BASE_DIR, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    kill_when_paused(proc, "transfer")
    recover_all()
    run = MigrationRun.objects.get(operation=IMPORT)
    assert run.status == FAILED, run.error
    assert not Checkpoint.objects.filter(name="died").exists()
    assert host_listing(lab2) == before
    assert not files_exist(lab2, keep.kept_dir(lab2, "died"))


def test_restore_when_the_original_is_gone_or_its_name_taken(runc_hosts, counter_container):
    """The original removed since its checkpoint: restored under its name (the
    checkpoint holds its configuration; it outlives the container). Its name
    then held by another container, running or stopped: refused in the
    pre-flight with a message, that container untouched, nothing made."""
    lab1, _ = runc_hosts
    name = counter_container
    made = cli("checkpoint", "--host", "lab-1", "--container", name, "--name", f"{name}-cp")
    assert made["status"] == SUCCEEDED, made["error"]
    with Engine(lab1) as engine:
        last = values(engine.logs(name))[-1]
        engine.remove(name)
    restored = cli("restore", "--checkpoint", f"{name}-cp")
    assert restored["status"] == SUCCEEDED, restored["error"]
    with Engine(lab1) as engine:
        after = logged(engine, name)
        assert after[0] == last + 1, (last, after[:5])
        assert_consecutive(after)
        # Another container takes the name: running, then stopped.
        engine.remove(name)
        engine.run_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name)
        other = engine.inspect(name)
    for running in (True, False):
        if not running:
            with Engine(lab1) as engine:
                engine.call("docker stop", engine.api.stop, name)
                other = engine.inspect(name)
        before = host_listing(lab1)
        taken = f"restore failed at pre-flight .lab-1.: lab-1: a container named '{name}' already exists there"
        with pytest.raises(CommandError, match=taken):
            cli("restore", "--checkpoint", f"{name}-cp")
        assert host_listing(lab1) == before
        with Engine(lab1) as engine:
            now = engine.inspect(name)
            assert now["Id"] == other["Id"] and now["State"]["Running"] == running
            assert now["State"]["Pid"] == other["State"]["Pid"]


def test_a_process_restored_in_place_is_not_restored_twice(hosts, counter_process):
    """A stopped process restored in place runs again under a new PID (its own PID
    namespace). Restoring it again, from the same checkpoint or from one of its
    restored copy, while that copy runs would make two: refused, the copy
    untouched. Before: the second restore ran a second copy, both counting
    into one file. Once the copy is gone, the checkpoint restores again."""
    from migrations_app.engine.hostcheck import pid_alive

    lab1, _ = hosts
    pid = str(counter_process["pid"])
    made = cli("checkpoint", "--host", "lab-1", "--pid", pid, "--name", f"p{pid}-a")
    assert made["status"] == SUCCEEDED, made["error"]
    copies = []
    try:
        first = cli("restore", "--checkpoint", f"p{pid}-a")
        assert first["status"] == SUCCEEDED, first["error"]
        copy = first["result_workload"]
        copies.append(int(copy))
        again = cli("checkpoint", "--host", "lab-1", "--pid", copy, "--name", f"p{pid}-b", "--leave-running")
        assert again["status"] == SUCCEEDED, again["error"]
        with ssh.Connection(lab1) as conn:
            start = pid_alive(conn, copy)
        refusals = {
            f"p{pid}-a": (
                rf"lab-1: the process restored from checkpoint p{pid}-a by run \w+ still runs there as PID {copy} "
                rf"\(criuweb saw it named '[^']+', started [-\d]+ [:\d]+ UTC by lab-1's clock\); check that PID "
                rf"{copy} is that copy \(`ps -o pid,lstart,args -p {copy}` on lab-1\) before stopping it"
            ),
            f"p{pid}-b": f"lab-1: the checkpointed process {copy} still runs there;",  # the copy is its original
        }
        for name, refusal in refusals.items():
            with pytest.raises(CommandError, match=refusal):
                cli("restore", "--checkpoint", name)
        with ssh.Connection(lab1) as conn:
            assert pid_alive(conn, copy) == start
        assert MigrationRun.objects.filter(operation=RESTORE, status=SUCCEEDED).count() == 1
        _kill_tree(int(copy))
        wait_for(lambda: not os.path.exists(f"/proc/{copy}"), 15, "the copy did not end")
        third = cli("restore", "--checkpoint", f"p{pid}-a")
        assert third["status"] == SUCCEEDED, third["error"]
        copies.append(int(third["result_workload"]))
    finally:
        for p in copies:
            _kill_tree(p)


def test_a_process_that_reused_a_restored_copy_s_pid_does_not_block_a_restore(hosts, counter_process):
    """The copy an in-place restore made has ended; its PID now belongs to
    an unrelated process of the same name. Before the fix the next restore
    was refused ("still runs there as PID N; stop it"), sending the user to
    stop a process that is not the copy. Also for a restore recorded before
    criuweb kept the copy's start time: the unrelated process is younger
    than that restore."""
    import signal
    import subprocess
    from datetime import timedelta

    from django.utils import timezone

    from migrations_app.engine.hostcheck import pid_alive

    lab1, _ = hosts
    pid = str(counter_process["pid"])
    made = cli("checkpoint", "--host", "lab-1", "--pid", pid, "--name", f"p{pid}-r")
    assert made["status"] == SUCCEEDED, made["error"]
    comm = Checkpoint.objects.get(name=f"p{pid}-r").config["comm"]
    # The lab's hosts share this machine's PID namespace: a process started
    # here runs on lab-1 too, under the checkpointed process's name.
    other = subprocess.Popen(["sh", "-c", "while :; do sleep 1; done"], start_new_session=True)
    copies = []
    try:
        # Read until its exec is done: a full run once read pytest's name there.
        with open(f"/proc/{other.pid}/comm") as f:
            wait_for(lambda: f.seek(0) == 0 and f.read().strip() == comm, 10, f"the process is not named {comm}")
        for legacy in (False, True):
            restored = cli("restore", "--checkpoint", f"p{pid}-r")
            assert restored["status"] == SUCCEEDED, restored["error"]
            copy = restored["result_workload"]
            copies.append(int(copy))
            run = MigrationRun.objects.get(operation=RESTORE, status=SUCCEEDED, result_workload=copy)
            with ssh.Connection(lab1) as conn:
                assert run.state["target_start"] == pid_alive(conn, copy)
            _kill_tree(int(copy))
            wait_for(lambda: not os.path.exists(f"/proc/{copy}"), 15, "the copy did not end")
            # PID reuse, staged: the record is pointed at the unrelated
            # process. The kernel hands PIDs out in turn; making it give one
            # chosen PID means writing ns_last_pid, racing every other
            # session's forks on this machine.
            changed = {"result_workload": str(other.pid)}
            if legacy:
                # As a run from before the copy's start time was kept, an hour ago.
                changed["state"] = {k: v for k, v in run.state.items() if k != "target_start"}
                run.phases.filter(name="restore").update(ended=timezone.now() - timedelta(hours=1))
            MigrationRun.objects.filter(pk=run.pk).update(**changed)
        last = cli("restore", "--checkpoint", f"p{pid}-r")
        assert last["status"] == SUCCEEDED, last["error"]
        copies.append(int(last["result_workload"]))
        assert other.poll() is None, "the unrelated process is left alone"
    finally:
        os.killpg(other.pid, signal.SIGKILL)
        other.wait()
        for p in copies:
            _kill_tree(p)


def test_a_network_criuweb_made_stays_while_a_checkpoint_kept_there_needs_it(runc_hosts, clones):
    """A move there made the network; the container, checkpointed there, then
    moves away. Before the fix the move's cleanup removed that network (no
    container used it): the kept checkpoint's restore on its own host was
    then refused, "network ... (driver None) does not exist", and its fixed
    subnet was gone with it."""
    from migrations_app.engine import create_run, execute, keep

    lab1, lab2 = runc_hosts
    lab.trust_pair()
    name = f"netkept-{os.getpid()}"
    net = f"usernet-{os.getpid()}"
    clones += [name, f"{name}-back"]
    with Engine(lab1) as engine:
        engine.api.create_network(net, driver="bridge")
        cid = engine.api.create_container(
            lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name=name,
            host_config=engine.api.create_host_config(network_mode=net),
        )["Id"]  # fmt: skip
        engine.api.start(cid)
        logged(engine, name)
    cp = None
    try:
        there = execute(create_run(lab1, lab2, CONTAINER, name, strategy="stop-and-copy"))
        assert there.status == SUCCEEDED, there.error
        made = cli("checkpoint", "--host", "lab-2", "--container", name, "--leave-running", "--name", f"{name}-cp")
        assert made["status"] == SUCCEEDED, made["error"]
        cp = Checkpoint.objects.get(name=f"{name}-cp")
        back = execute(create_run(lab2, lab1, CONTAINER, name, strategy="stop-and-copy"))
        assert back.status == SUCCEEDED, back.error
        restored = cli("restore", "--checkpoint", cp.name, "--as", f"{name}-back")
        assert restored["status"] == SUCCEEDED, restored["error"]
        with Engine(lab2) as engine:
            assert_consecutive(logged(engine, f"{name}-back"))
            assert net in engine.inspect(f"{name}-back")["NetworkSettings"]["Networks"]
        assert f"network {net} (created by criuweb) kept on lab-2: checkpoint {cp.name} needs it" in (
            back.phases.get(name="cleanup").detail
        )
    finally:
        if cp is not None:
            keep.delete(cp)
        for host in (lab1, lab2):
            with Engine(host) as engine:
                for n in clones:
                    if engine.exists(n):
                        engine.remove(n)
                if engine.network(net):
                    engine.remove_network(net)


def test_a_background_job_of_a_shell_is_kept_and_restored_as_a_shell_job(hosts, tmp_path):
    # Its shell leads its session: CRIU dumps it only with --shell-job, and
    # a restore of its kept checkpoint needs it again (kept with the
    # checkpoint's CRIU options).
    from tests.test_acceptance_lab import BACKGROUND_JOB

    log = tmp_path / "counter.log"
    with ssh.Connection(hosts[0]) as conn:
        argv = ["env", f"LOG={log}", "sh", "-c", BACKGROUND_JOB, lab.PROCESS_COUNTER_SCRIPT]
        shell = int(conn.sh('setsid "$@" </dev/null >/dev/null 2>&1 & echo $!', *argv).stdout)
    restored = []
    try:
        wait_for(lambda: log.exists() and len(values(log.read_text())) >= 2, message="the job did not start")
        (job,) = (int(c) for c in open(f"/proc/{shell}/task/{shell}/children").read().split())
        made = cli("checkpoint", "--host", "lab-1", "--pid", str(job))
        assert made["status"] == SUCCEEDED, made["error"]
        assert "--shell-job" in Checkpoint.objects.get(name=made["checkpoint"]).config["criu_opts"]
        wait_for(lambda: not os.path.exists(f"/proc/{job}"), message="the stopping checkpoint left the job running")

        run = cli("restore", "--checkpoint", made["checkpoint"])
        assert run["status"] == SUCCEEDED, run["error"]
        restored.append(int(run["result_workload"]))
        counted = len(values(log.read_text()))
        wait_for(lambda: len(values(log.read_text())) > counted + 1, message="the restored job does not count")
        assert_consecutive(values(log.read_text()))
    finally:
        for pid in restored:
            _kill_tree(pid)
        try:
            os.kill(shell, 9)
        except OSError:
            pass
