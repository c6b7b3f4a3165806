"""The command line's progress lines."""

from migrations_app import progress


def test_describe_gives_bytes_share_rate_and_time_left():
    line = progress.describe("page pull", 256 << 20, 1 << 30, 2.0)
    assert line == "page pull       256.0 MiB of ~1.0 GiB (25%), 128.0 MiB/s, ~6.0 s left"


def test_describe_without_an_estimate_or_past_it():
    assert progress.describe("transfer", 1536, 0, 0.5) == "transfer        1.5 KiB, 3.0 KiB/s"
    # The estimate (resident memory) can be short of what moves: no time left then.
    assert progress.describe("transfer", 2 << 20, 1 << 20, 1.0) == "transfer        2.0 MiB of ~1.0 MiB (100%), 2.0 MiB/s"


def test_printer_times_each_phase_and_writes_at_most_once_an_interval():
    now = [100.0]
    lines = []
    printer = progress.Printer(lines.append, interval=1.0, clock=lambda: now[0])
    printer("transfer", 0, 100 << 20)  # starts the phase's clock
    for t, done in ((100.5, 10 << 20), (101.0, 20 << 20), (101.5, 30 << 20), (102.0, 40 << 20)):
        now[0] = t
        printer("transfer", done, 100 << 20)
    assert lines == [
        "transfer        20.0 MiB of ~100.0 MiB (20%), 20.0 MiB/s, ~4.0 s left",
        "transfer        40.0 MiB of ~100.0 MiB (40%), 20.0 MiB/s, ~3.0 s left",
    ]
    now[0] = 102.2
    printer("page pull", 0, 0)  # a new phase starts its own clock
    now[0] = 103.2
    printer("page pull", 5 << 20, 0)
    assert lines[-1] == "page pull       5.0 MiB, 5.0 MiB/s"
