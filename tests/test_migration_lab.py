"""End to end on the lab: real sshd, Docker engines and CRIU on two hosts."""

import os
import time
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from migrations_app import lab, ssh
from migrations_app.docker_engine import Engine
from migrations_app.engine import create_run, execute
from migrations_app.engine.plans.container_engine import RUN_LABEL
from migrations_app.models import CONTAINER, ENGINE, LAZY, PAGE_SERVER, PROCESS, ROLLED_BACK, STOP_AND_COPY, SUCCEEDED
from tests.support import wait_for

pytestmark = pytest.mark.lab


def values(text):
    return [int(line) for line in text.split()]


def assert_consecutive(seq):
    assert seq, "the counter printed nothing"
    assert seq == list(range(seq[0], seq[0] + len(seq))), f"values skipped or repeated: {seq}"


@pytest.fixture
def counter_process(hosts, tmp_path):
    """A counter process on lab-1 appending to a file; killed at the end."""
    path = settings.LAB_ROOT / f"counter-{uuid.uuid4().hex[:8]}.log"
    with ssh.Connection(hosts[0]) as conn:
        pid = lab.start_process(conn, lab.PROCESS_COUNTER_SCRIPT, str(path))
    wait_for(lambda: path.exists() and len(values(path.read_text())) >= 2, message="counter did not start")
    state = {"pid": pid, "path": path}
    yield state
    for pid in {state["pid"], pid}:
        _kill_tree(pid)
    path.unlink(missing_ok=True)


def _kill_tree(pid):
    # The restored tree lives under a namespace holder: kill both.
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


def migrate(source, target, kind, workload, strategy=None, **kwargs):
    run = create_run(source, target, kind, workload, **({"strategy": strategy} if strategy else {}))
    return execute(run, **kwargs)


def last_value_after(phase, engine_attr, holder):
    """An after_phase hook that records the container's last logged value."""

    def hook(ctx):
        engine = getattr(ctx, engine_attr)
        holder["last"] = values(engine.logs(ctx.state.container["Id"]))[-1]

    return {phase: hook}


def test_container_round_trip(hosts, counter_container):
    lab1, lab2 = hosts
    name = counter_container
    for source, target in ((lab1, lab2), (lab2, lab1)):
        seen = {}
        run = migrate(source, target, CONTAINER, name, after_phase=last_value_after("checkpoint", "src", seen))
        assert run.status == SUCCEEDED, run.error
        with Engine(target) as engine:
            state = engine.inspect(name)["State"]
            assert state["Running"]
            # The target's log holds the source's lines (they came with it) and
            # goes on from where the checkpoint left off.
            after = wait_for(lambda: (v := values(engine.logs(name))) and v[-1] > seen["last"] and v)
        assert after[0] == 0 and seen["last"] + 1 in after, (seen, after)
        assert_consecutive(after)
        with Engine(source) as engine:
            assert not engine.exists(name), "the source container should be gone"
        names = [p.name for p in run.phases.all()]
        assert names == [
            "pre-flight", "pre-flight", "prepare target", "checkpoint", "transfer", "restore", "verify", "cleanup",
        ]
        assert [p.host for p in run.phases.all()][:2] == [source.name, target.name]
        assert run.downtime_ms > 0
        checkpoint = run.phases.get(name="checkpoint")
        restore = run.phases.get(name="restore")
        # Downtime spans the freeze to the restored container running.
        assert run.downtime_ms <= (restore.ended - checkpoint.started).total_seconds() * 1000 + 1
        assert run.downtime_ms >= checkpoint.duration_ms
        assert run.total_bytes > 0 and run.total_bytes == sum(p.bytes for p in run.phases.all())
        assert restore.criu_stats["restore_time"] > 0
        assert "Restore finished successfully" in restore.log


def test_container_writable_layer_travels(hosts):
    lab1, lab2 = hosts
    name = f"writer-{uuid.uuid4().hex[:8]}"
    script = "echo written-before-move > /note.txt; rm /bin/vi; " + lab.COUNTER_SCRIPT
    with Engine(lab1) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", script], name)
        wait_for(lambda: values(engine.logs(name)), message="writer did not start")
    try:
        run = migrate(lab1, lab2, CONTAINER, name)
        assert run.status == SUCCEEDED, run.error
        with Engine(lab2) as engine:
            cid = engine.inspect(name)["Id"]
            exec_id = engine.api.exec_create(cid, ["sh", "-c", "cat /note.txt; ls /bin/vi 2>&1 || true"])["Id"]
            out = engine.api.exec_start(exec_id).decode()
        assert "written-before-move" in out
        # A deleted file (an overlay whiteout) stays deleted.
        assert "No such file" in out
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)


def test_process_round_trip(hosts, counter_process):
    lab1, lab2 = hosts
    pid = counter_process["pid"]
    for source, target in ((lab1, lab2), (lab2, lab1)):
        run = migrate(source, target, PROCESS, pid)
        assert run.status == SUCCEEDED, run.error
        new_pid = int(run.result_workload)
        counter_process["pid"] = new_pid
        # It runs in the target host's network namespace: it is on that host.
        assert lab.host_of_pid(new_pid) == target.name
        # ... in a PID namespace of its own, so its PIDs collide with nobody's.
        assert os.readlink(f"/proc/{new_pid}/ns/pid") != os.readlink("/proc/self/ns/pid")
        before = len(values(counter_process["path"].read_text()))
        wait_for(lambda: len(values(counter_process["path"].read_text())) >= before + 2, message="counter stopped")
        assert_consecutive(values(counter_process["path"].read_text()))
        assert values(counter_process["path"].read_text())[0] == 0
        dump = run.phases.get(name="dump")
        assert dump.criu_stats["pages_written"] > 0 and dump.criu_stats["frozen_time"] > 0
        assert run.phases.get(name="restore").criu_stats["pages_restored"] > 0
        assert [p.name for p in run.phases.all()] == [
            "pre-flight", "pre-flight", "dump", "transfer", "restore", "verify", "cleanup",
        ]
        pid = new_pid


def _stop_engine(host_name):
    h = next(h for h in lab.HOSTS if h.name == host_name)
    pid = lab._alive(h.dockerd_pid)
    os.kill(pid, 15)
    wait_for(lambda: not lab._alive(h.dockerd_pid), 40, "dockerd did not stop")


def test_container_restore_failure_rolls_back(hosts, counter_container):
    lab1, lab2 = hosts
    name = counter_container
    seen = {}

    def stop_target_engine(ctx):
        seen["last"] = values(ctx.src.logs(ctx.state.container["Id"]))[-1]
        _stop_engine(lab2.name)

    try:
        run = migrate(lab1, lab2, CONTAINER, name, after_phase={"transfer": stop_target_engine})
    finally:
        lab.up(log=lambda *a: None)  # the engine back for the other tests
    assert run.status == ROLLED_BACK
    assert run.error.startswith("lab-2: restore from checkpoint failed"), run.error
    phases = list(run.phases.all())
    assert [p.name for p in phases][-2:] == ["restore", "rollback"]
    assert phases[-2].status == "failed" and phases[-1].status == "ok"
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Running"]
        after = wait_for(lambda: values(engine.logs(name)))
    # The source resumed from its checkpoint, not from scratch.
    assert seen["last"] in after and after[-1] > seen["last"] > 0
    with Engine(lab2) as engine:
        # Exactly one copy runs: on lab-2 at most a stopped leftover.
        assert not (engine.exists(name) and engine.inspect(name)["State"]["Running"])
    # Checkpointing it again at once could lose it (containerd#8401 under
    # Docker 20.10): refused, with the reason, and it keeps running.
    run = migrate(lab1, lab2, CONTAINER, name)
    assert run.status == "failed" and "containerd#8401" in run.error, run.error
    with Engine(lab1) as engine:
        assert engine.inspect(name)["State"]["Running"]


def test_leftover_of_a_failed_run_is_cleared(hosts, counter_container):
    lab1, lab2 = hosts
    name = counter_container
    ended = create_run(lab1, lab2, CONTAINER, "gone")
    ended.status = "rolled_back"
    ended.save()
    with Engine(lab2) as engine:
        # What a restore that failed while lab-2's engine was down leaves:
        # a never-started container with our label, under the workload's name.
        engine.api.create_container(lab.IMAGE, ["true"], name=name, labels={RUN_LABEL: str(ended.code)})
    run = migrate(lab1, lab2, CONTAINER, name)
    assert run.status == SUCCEEDED, run.error
    with Engine(lab2) as engine:
        assert engine.inspect(name)["State"]["Running"]


def test_process_restore_failure_rolls_back(hosts, counter_process):
    lab1, lab2 = hosts

    def break_images(ctx):
        # A real CRIU failure: the target's images lose their memory pages.
        ctx.dst.sh('rm -f "$1"/pages-*.img', ctx.state.dst_images)

    run = migrate(lab1, lab2, PROCESS, counter_process["pid"], after_phase={"transfer": break_images})
    assert run.status == ROLLED_BACK
    assert run.error.startswith("lab-2: criu restore failed"), run.error
    restore = run.phases.get(name="restore")
    assert "Error" in restore.log_excerpt
    new_pid = int(run.result_workload)
    counter_process["pid"] = new_pid
    assert lab.host_of_pid(new_pid) == "lab-1"
    before = len(values(counter_process["path"].read_text()))
    wait_for(lambda: len(values(counter_process["path"].read_text())) >= before + 2, message="counter stopped")
    assert_consecutive(values(counter_process["path"].read_text()))


def test_preflight_failure_leaves_workload_alone(hosts, counter_container):
    lab1, lab2 = hosts
    with Engine(lab2) as engine:
        engine.run_container(lab.IMAGE, ["sleep", "60"], counter_container)  # name taken on the target
    run = migrate(lab1, lab2, CONTAINER, counter_container)
    assert run.status == "failed"
    assert run.error == f"lab-2: a container named {counter_container!r} already exists there"
    assert run.downtime_ms is None
    with Engine(lab1) as engine:
        assert engine.inspect(counter_container)["State"]["Running"]


@pytest.mark.parametrize("strategy", [ENGINE, STOP_AND_COPY])
def test_image_missing_on_target_is_shipped_with_its_tags(hosts, strategy):
    lab1, lab2 = hosts
    name = f"shipped-{uuid.uuid4().hex[:8]}"
    tag = f"criuweb/only-on-lab-1:{name}"
    other_tag = f"criuweb/only-on-lab-1-too:{name}"
    with Engine(lab1) as engine:
        # An image that exists on lab-1 alone: a container's filesystem committed.
        seed = engine.api.create_container(lab.IMAGE, ["sh", "-c", "echo seeded > /seed.txt"])["Id"]
        engine.api.start(seed)
        engine.api.wait(seed)
        repo, version = tag.split(":")
        image_id = engine.api.commit(seed, repository=repo, tag=version)["Id"]
        engine.api.tag(image_id, *other_tag.split(":"))
        engine.remove(seed)
        engine.run_container(tag, ["sh", "-c", lab.COUNTER_SCRIPT], name)
    taken_tag = f"criuweb/taken-on-lab-2:{name}"
    with Engine(lab1) as engine:
        engine.api.tag(image_id, *taken_tag.split(":"))
    with Engine(lab2) as engine:
        # The same name means another image on lab-2: the move must not take it from that one.
        engine.api.tag(lab.IMAGE, *taken_tag.split(":"))
        theirs = engine.image_id(taken_tag)
    try:
        with Engine(lab2) as engine:
            assert not engine.has_image(image_id)
        run = migrate(lab1, lab2, CONTAINER, name, strategy=strategy)
        assert run.status == SUCCEEDED, run.error
        ship = run.phases.get(name="ship image")
        assert ship.bytes > 1_000_000  # the busybox layer travelled
        assert ship.host == "lab-1 -> lab-2"
        assert f"{taken_tag} left naming another image on lab-2" in ship.detail, ship.detail
        with Engine(lab2) as engine:
            assert engine.has_image(image_id)
            assert engine.inspect(name)["State"]["Running"]
            # Named as the user ran it, not by a bare id: `docker ps` shows the tag.
            assert engine.inspect(name)["Config"]["Image"] == tag
            assert [c["image"] for c in engine.containers() if c["name"] == name] == [tag]
            assert sorted(engine.api.inspect_image(image_id)["RepoTags"]) == sorted([tag, other_tag])
            assert engine.image_id(taken_tag) == theirs != image_id
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)
                if engine.has_image(image_id):
                    engine.api.remove_image(image_id, force=True)
                if engine.image_id(taken_tag):
                    engine.api.remove_image(taken_tag)


def _lose_target_pages(ctx):
    # A real CRIU failure on the target: the checkpoint's memory pages are gone
    # (the lab hosts share this machine's filesystem).
    s = ctx.state
    if getattr(s, "dst_base", ""):  # the runc path's images
        where = Path(s.dst_base) / "images"
    else:
        where = Path(s.dst_root) / "containers" / s.target_id / "checkpoints" / s.checkpoint
    pages = list(where.glob("pages-*.img"))
    assert pages, f"no pages in {where}"
    for page in pages:
        page.unlink()


@pytest.mark.parametrize("strategy", [ENGINE, STOP_AND_COPY])
def test_a_rolled_back_move_takes_back_the_image_tags_it_gave(hosts, strategy):
    lab1, lab2 = hosts
    name = f"unshipped-{uuid.uuid4().hex[:8]}"
    tag = f"criuweb/only-on-lab-1:{name}"
    with Engine(lab1) as engine:
        seed = engine.api.create_container(lab.IMAGE, ["sh", "-c", "echo seeded > /seed.txt"])["Id"]
        engine.api.start(seed)
        engine.api.wait(seed)
        image_id = engine.api.commit(seed, *tag.split(":"))["Id"]
        engine.remove(seed)
        engine.run_container(tag, ["sh", "-c", lab.COUNTER_SCRIPT], name)
    try:
        run = migrate(lab1, lab2, CONTAINER, name, strategy=strategy, after_phase={"transfer": _lose_target_pages})
        assert run.status == ROLLED_BACK, run.error
        assert f"tagged {tag}" in run.phases.get(name="ship image").detail
        with Engine(lab1) as engine:
            assert engine.inspect(name)["State"]["Running"]
        with Engine(lab2) as engine:
            assert not engine.exists(name)
            # Its tag taken back, the image this run brought went with it: nothing uses it there.
            assert engine.image_id(tag) is None
            assert not engine.has_image(image_id)
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)
                if engine.has_image(image_id):
                    engine.api.remove_image(image_id, force=True)


def _aliases(c, net):
    """The aliases a container has on a network, without the two Docker adds itself."""
    # Docker 20.10 (the lab's engines) lists the container's short id and its
    # hostname among them; Docker >= 26 does so only for API < 1.45.
    derived = {c["Id"][:12], c["Config"]["Hostname"]}
    return sorted(a for a in c["NetworkSettings"]["Networks"][net].get("Aliases") or [] if a not in derived)


@pytest.mark.parametrize("strategy", [ENGINE, STOP_AND_COPY, PAGE_SERVER, LAZY])
def test_user_network_there_and_back_keeps_aliases_and_leaves_no_network_it_made(hosts, strategy):
    lab1, lab2 = hosts
    lab.trust_pair()  # the streaming strategies' pages go over plain TCP only between trusted hosts
    name = f"aliased-{uuid.uuid4().hex[:8]}"
    net = f"usernet-{uuid.uuid4().hex[:6]}"
    with Engine(lab1) as engine:
        engine.api.create_network(net, driver="bridge")
        endpoint = engine.api.create_networking_config(
            {net: engine.api.create_endpoint_config(aliases=["db", "db.local"])}
        )
        cid = engine.api.create_container(
            lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name=name,
            host_config=engine.api.create_host_config(network_mode=net), networking_config=endpoint,
        )["Id"]  # fmt: skip
        engine.api.start(cid)
        assert _aliases(engine.inspect(name), net) == ["db", "db.local"]
    prepared = {}

    def aliases_given(ctx):
        # Created, not yet started: what it lists is what criuweb asked for,
        # before the engine adds its own names on start.
        prepared["aliases"] = ctx.dst.inspect(ctx.state.target_id)["NetworkSettings"]["Networks"][net]["Aliases"]

    try:
        for source, target in ((lab1, lab2), (lab2, lab1), (lab1, lab2)):
            run = migrate(
                source, target, CONTAINER, name, strategy=strategy, after_phase={"prepare target": aliases_given}
            )
            assert run.status == SUCCEEDED, run.error
            # Before the fix, the second move asked for the first container's id as an alias of its own.
            assert sorted(prepared["aliases"]) == ["db", "db.local"], (source.name, target.name)
            with Engine(target) as engine:
                assert _aliases(engine.inspect(name), net) == ["db", "db.local"], (source.name, target.name)
            with Engine(source) as engine:
                # lab-1's network is the user's: kept, as Docker keeps it when a container leaves.
                # lab-2's was made by the move there and nothing else uses it: gone with the container.
                assert (engine.network(net) is not None) == (source == lab1), source.name
        # A third move: lab-2's network is made again. Another container on
        # it there, only created, keeps it when ours leaves.
        with Engine(lab2) as engine:
            assert engine.network(net) is not None
            peer = engine.api.create_container(
                lab.IMAGE, ["true"], host_config=engine.api.create_host_config(network_mode=net)
            )["Id"]
        try:
            run = migrate(lab2, lab1, CONTAINER, name, strategy=strategy)
            assert run.status == SUCCEEDED, run.error
            assert f"network {net} (created by criuweb) kept on lab-2: containers {peer[:12]} use it" in (
                run.phases.get(name="cleanup").detail
            )
            with Engine(lab2) as engine:
                assert engine.network(net) is not None
        finally:
            with Engine(lab2) as engine:
                engine.remove(peer)
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)
                if engine.network(net):
                    engine.remove_network(net)


def _kill_sshd(host_name):
    """Stop a lab host's sshd and every SSH session into it."""
    h = next(h for h in lab.HOSTS if h.name == host_name)
    pids = lab.sh("ip", "netns", "pids", h.netns).stdout.split()
    for pid in pids:
        try:
            if open(f"/proc/{pid}/comm").read().strip() == "sshd":
                os.kill(int(pid), 9)
        except OSError:
            pass


def test_unreachable_target_after_restore_is_not_resumed_twice(hosts, counter_container):
    lab1, lab2 = hosts
    name = counter_container
    try:
        run = migrate(lab1, lab2, CONTAINER, name, after_phase={"restore": lambda ctx: _kill_sshd(lab2.name)})
    finally:
        lab.up(log=lambda *a: None)  # sshd back for the other tests
    # The restored copy may run on lab-2 and nobody can ask: resuming the
    # source could make two copies, so the run stops and says so.
    assert run.status == "failed"
    assert "lab-2: cannot make sure the restored copy is gone" in run.error
    assert "not resuming on lab-1" in run.error
    with Engine(lab2) as engine:
        assert engine.inspect(name)["State"]["Running"]
    with Engine(lab1) as engine:
        assert not engine.inspect(name)["State"]["Running"]


def test_restart_policy_never_makes_a_second_copy(hosts):
    lab1, lab2 = hosts
    name = f"always-{uuid.uuid4().hex[:8]}"
    with Engine(lab1) as engine:
        config = engine.api.create_host_config(restart_policy={"Name": "always"})
        cid = engine.api.create_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name=name, host_config=config)
        engine.api.start(cid["Id"])
    try:
        run = execute(create_run(lab1, lab2, CONTAINER, name, keep_source=True))
        assert run.status == SUCCEEDED, run.error
        assert "prepare source" in [p.name for p in run.phases.all()]
        time.sleep(2)  # time for Docker to restart it, were the policy still on
        with Engine(lab1) as engine:
            kept = engine.inspect(name)
            assert not kept["State"]["Running"] and kept["HostConfig"]["RestartPolicy"]["Name"] == "no"
        with Engine(lab2) as engine:
            moved = engine.inspect(name)
            assert moved["State"]["Running"] and moved["HostConfig"]["RestartPolicy"]["Name"] == "always"
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)


def test_a_network_the_run_made_stays_when_it_aborts_if_another_container_joined_it(hosts):
    """The run made the network on the target; another container (another
    run's, only created) was put on it before this run failed. Docker lets a
    network go while a container on it is only created; before the fix the
    abort removed it, and that container could not start."""
    lab1, lab2 = hosts
    name = f"netabort-{uuid.uuid4().hex[:8]}"
    net = f"usernet-{uuid.uuid4().hex[:6]}"
    peer = {}
    with Engine(lab1) as engine:
        engine.api.create_network(net, driver="bridge")
        cid = engine.api.create_container(
            lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name=name,
            host_config=engine.api.create_host_config(network_mode=net),
        )["Id"]  # fmt: skip
        engine.api.start(cid)

    def join_then_fail(ctx):
        assert ctx.state.created_networks == [net]
        if joined:
            peer["id"] = ctx.dst.api.create_container(
                lab.IMAGE, ["sleep", "60"], host_config=ctx.dst.api.create_host_config(network_mode=net)
            )["Id"]
        # A failure before the freeze, from outside the plan: what fails it does not matter here, its abort does.
        raise RuntimeError("failed on purpose after prepare target")

    try:
        # Alone on it, the network goes with the abort.
        joined = False
        run = migrate(lab1, lab2, CONTAINER, name, strategy=ENGINE, after_phase={"prepare target": join_then_fail})
        assert run.status != SUCCEEDED and "failed on purpose" in run.error, run.error
        with Engine(lab2) as engine:
            assert engine.network(net) is None
        joined = True
        run = migrate(lab1, lab2, CONTAINER, name, strategy=ENGINE, after_phase={"prepare target": join_then_fail})
        assert run.status != SUCCEEDED and "failed on purpose" in run.error, run.error
        with Engine(lab1) as engine:
            assert engine.inspect(name)["State"]["Running"]
        with Engine(lab2) as engine:
            assert engine.network(net) is not None
            engine.api.start(peer["id"])
            assert engine.inspect(peer["id"])["State"]["Running"]
    finally:
        for host in hosts:
            with Engine(host) as engine:
                for c in (name, peer.get("id")):
                    if c and engine.exists(c):
                        engine.remove(c)
                if engine.network(net):
                    engine.remove_network(net)
