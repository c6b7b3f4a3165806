"""Observed downtime: the probe, the docker-logs gap, and both on real lab runs."""

import asyncio
import os
import threading
import time
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.conf import settings

from migrations_app import lab, ssh
from migrations_app.docker_engine import Engine
from migrations_app.engine import MigrationError, create_run, execute
from migrations_app.engine.observe import LogLine, Probe, log_gap, parse_address, parse_log
from migrations_app.models import CONTAINER, ENGINE, PROCESS, STOP_AND_COPY, SUCCEEDED
from tests.support import wait_for

# -- pieces -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10.213.1.11:8080", ("10.213.1.11", 8080)),
        ("localhost:1", ("localhost", 1)),
        ("[::1]:65535", ("::1", 65535)),
    ],
)
def test_parse_address(text, expected):
    assert parse_address(text) == expected


@pytest.mark.parametrize(
    "text", ["", "10.0.0.1", "10.0.0.1:", ":80", "host:0", "host:65536", "host:http", "-oProxy:22", "a b:80"]
)
def test_parse_address_refuses(text):
    with pytest.raises(ValueError, match="host:port"):
        parse_address(text)


def test_bad_probe_address_is_refused_before_the_run(db):
    from tests.test_views import make_host

    a, b = make_host("a"), make_host("b")
    with pytest.raises(MigrationError, match="not an address"):
        create_run(a, b, PROCESS, "1234", probe="nowhere")


def test_log_gap_is_the_time_between_the_last_line_and_the_next_less_the_usual_interval():
    t0 = datetime(2026, 11, 26, 5, 0, tzinfo=UTC)
    # Docker's own format: nanoseconds, "Z".
    raw = "\n".join(
        f"{(t0 + timedelta(milliseconds=10 * i)).strftime('%Y-%m-%dT%H:%M:%S.%f')}123Z {i}" for i in range(5)
    )
    before = parse_log(raw)
    assert [line.text for line in before] == ["0", "1", "2", "3", "4"]
    # The nanoseconds are cut to microseconds, not misread.
    assert before[1].at - before[0].at == timedelta(milliseconds=10)
    after = [
        LogLine(before[-1].at, "4"),  # the target's copy of an old line does not count
        LogLine(before[-1].at + timedelta(milliseconds=450), "5"),
        LogLine(before[-1].at + timedelta(milliseconds=460), "6"),
    ]
    assert log_gap(before, after) == (450.0, 10.0)
    assert log_gap(before[:2], after) is None  # too few lines to know the interval
    assert log_gap(before, after[:1]) is None  # nothing after the move


class _Server:
    """A real TCP server on loopback that answers each connection with a line."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.server = None
        self.port = None
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def _answer(self, reader, writer):
        writer.write(b"ok\n")
        await writer.drain()
        writer.close()

    def open(self):
        async def start():
            return await asyncio.start_server(self._answer, "127.0.0.1", self.port or 0, reuse_address=True)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result()
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self):
        async def stop():
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result()

    def end(self):
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_probe_sees_no_answer_while_the_server_is_down():
    server = _Server()
    server.open()
    probe = Probe([("127.0.0.1", server.port)], timeout=0.5)
    probe.start()
    try:
        assert probe.first_answer(wait=5), "the probe got no answer from a listening server"
        server.close()
        down = time.monotonic()
        time.sleep(0.3)
        up = time.monotonic()
        server.open()
        wait_for(lambda: any(t > up for t in probe.answers), message="no answer after the server came back")
    finally:
        probe.stop()
        server.end()
    # Answers before and after, none while nothing listened: the longest
    # gap spans at least the time the server was down.
    assert not [t for t in probe.answers if down < t < up]
    assert probe.longest_gap() >= (up - down) * 1000
    assert probe.attempts > 10


# -- on the lab ---------------------------------------------------------------------------------

FAST_COUNTER = "i=0; while true; do echo $i; i=$((i+1)); usleep 10000; done"


@pytest.mark.lab
def test_observed_downtime_from_docker_logs(hosts):
    lab1, lab2 = hosts
    name = f"chatty-{uuid.uuid4().hex[:8]}"
    with Engine(lab1) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", FAST_COUNTER], name)
        wait_for(lambda: len(engine.logs(name).split()) >= 20, message="counter did not start")
    try:
        run = execute(create_run(lab1, lab2, CONTAINER, name, strategy=ENGINE))
        assert run.status == SUCCEEDED, run.error
        assert run.observed_method.startswith("docker logs --timestamps"), run.observed_method
        assert run.observed_downtime_ms is not None and run.observed_downtime_ms > 0
        # The container cannot have been silent for longer than from the
        # start of the checkpoint to the end of the verification.
        checkpoint, verify = run.phases.get(name="checkpoint"), run.phases.get(name="verify")
        assert run.observed_downtime_ms < (verify.ended - checkpoint.started).total_seconds() * 1000
        assert run.to_dict()["observed_downtime_ms"] == run.observed_downtime_ms
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)


# A line every millisecond or so: hundreds of lines by the end of the
# verification, more than any fixed tail of the target's log holds.
CHATTY_COUNTER = "i=0; while true; do echo $i; i=$((i+1)); usleep 1000; done"


@pytest.mark.lab
def test_observed_downtime_ends_with_the_resume_even_when_the_copy_talked_a_lot_since(hosts):
    lab1, lab2 = hosts
    name = f"chatty-{uuid.uuid4().hex[:8]}"
    with Engine(lab1) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", CHATTY_COUNTER], name)
        wait_for(lambda: len(engine.logs(name).split()) >= 50, message="counter did not start")
    try:
        run = execute(create_run(lab1, lab2, CONTAINER, name, strategy=STOP_AND_COPY))
        assert run.status == SUCCEEDED, run.error
        assert run.observed_method.startswith("docker logs --timestamps"), run.observed_method
        # Silent at most from the freeze to the end of the restore: a first
        # line taken from the end of the target's log would come after the
        # verification instead.
        checkpoint, restore = run.phases.get(name="checkpoint"), run.phases.get(name="restore")
        assert 0 <= run.observed_downtime_ms < (restore.ended - checkpoint.started).total_seconds() * 1000
    finally:
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)


@pytest.fixture
def http_process(hosts, tmp_path):
    """python3 -m http.server on lab-1 in the host's network namespace; killed at the end."""
    port = 18000 + int(settings.LAB_ID)
    root = settings.LAB_ROOT / f"www-{uuid.uuid4().hex[:8]}"
    root.mkdir()
    (root / "index.html").write_text("criuweb probe target\n")
    script = 'cd "$1" && exec python3 -m http.server --bind 0.0.0.0 ' + str(port)
    with ssh.Connection(hosts[0]) as conn:
        pid = lab.start_process(conn, script, str(root))
    url = f"http://{hosts[0].address}:{port}/"
    wait_for(lambda: _get(url), timeout=15, message="http.server did not answer")
    state = {"pid": pid, "port": port}
    yield state
    for p in {pid, state["pid"]}:
        try:
            os.kill(p, 9)
        except OSError:
            pass


def _get(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.read().decode()
    except OSError:
        return None


@pytest.mark.lab
def test_observed_downtime_from_a_probe_address(hosts, http_process):
    lab1, lab2 = hosts
    port = http_process["port"]
    run = create_run(lab1, lab2, PROCESS, str(http_process["pid"]), probe=f"{lab1.address}:{port}")
    run = execute(run)
    http_process["pid"] = int(run.result_workload or http_process["pid"])
    assert run.status == SUCCEEDED, run.error
    # The server moved: it answers at the target's address now.
    assert "criuweb probe target" in _get(f"http://{lab2.address}:{port}/")
    assert run.observed_method.startswith(f"probe of {lab1.address}:{port} and {lab2.address}:{port}")
    assert run.observed_downtime_ms is not None
    dump, verify = run.phases.get(name="dump"), run.phases.get(name="verify")
    # It answered before the dump and after the restore, so the outage
    # lies within those phases (and is at least the freeze CRIU needed).
    assert run.observed_downtime_ms < (verify.ended - dump.started).total_seconds() * 1000
    assert run.observed_downtime_ms >= dump.criu_stats["frozen_time"] / 1000
