"""In a real browser: log in, launch a container migration from the form, watch the run page.

Debian's chromium driven by Playwright, against the live server (the app in a
thread of this process, on the test database), a real worker process that
executes the runs, and the test lab.
"""

import os
import re
import uuid
from pathlib import Path

import pytest
from django.conf import settings

from migrations_app import lab
from migrations_app.docker_engine import Engine
from migrations_app.models import FINISHED, SUCCEEDED, MigrationRun
from tests.support import wait_for

CHROMIUM = "/usr/bin/chromium"
# No outside network here: never let the browser (or Playwright) reach out.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
RESULTS = Path(settings.BASE_DIR) / "test-results"
RUN_TIMEOUT_S = 90

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (scripts/setup-system.sh installs it)"),
]


def counter_values(engine, name):
    return [int(line) for line in engine.logs(name).split()]


@pytest.mark.django_db(transaction=True)
def test_migrate_container_in_browser(live_server, hosts, operator, worker_process):
    # Imported here so that collecting the other tests never needs Playwright.
    from playwright.sync_api import expect, sync_playwright

    lab1, lab2 = hosts
    name = f"browser-{uuid.uuid4().hex[:8]}"
    RESULTS.mkdir(exist_ok=True)
    with Engine(lab1) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name)
        wait_for(lambda: len(counter_values(engine, name)) >= 2, message="counter did not start")

    errors = []  # console errors and uncaught exceptions, on every page
    run_code = None
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            with browser:
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                with context:
                    page = context.new_page()
                    page.set_default_timeout(30_000)
                    page.on("console", lambda msg: msg.type == "error" and errors.append(f"console: {msg.text} ({msg.location})"))
                    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
                    run_code = _migrate_through_the_ui(page, expect, live_server.url, name)
                    _check_run_page(page, expect)
                    page.screenshot(path=str(RESULTS / "run-page.png"), full_page=True)
                    _check_compare_page(page, live_server.url)
                    page.screenshot(path=str(RESULTS / "compare-page.png"), full_page=True)
        assert not errors, "JavaScript errors in the browser:\n" + "\n".join(errors)

        run = MigrationRun.objects.get(code=run_code)
        assert run.status == SUCCEEDED, run.error
        with Engine(lab2) as engine:
            assert engine.inspect(name)["State"]["Running"], f"{name} is not running on lab-2"
        with Engine(lab1) as engine:
            assert not engine.exists(name), f"{name} is still on lab-1"
    finally:
        # A run still going would race the cleanup (and the table flush).
        if run_code:
            wait_for(lambda: MigrationRun.objects.get(code=run_code).status in FINISHED, 120,
                     "the run did not finish")
        for host in hosts:
            with Engine(host) as engine:
                if engine.exists(name):
                    engine.remove(name)


def _migrate_through_the_ui(page, expect, base_url, name):
    """Log in, fill the migration form for `name` lab-1 → lab-2, submit; return the run's code."""
    page.goto(base_url + "/login/")
    page.fill("#id_username", "operator")
    page.fill("#id_password", "pw")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(base_url + "/")

    page.get_by_role("navigation").get_by_role("link", name="Migrate").click()
    page.wait_for_url(base_url + "/migrate/")
    page.select_option("#id_source", "lab-1")
    page.check("input[name=kind][value=container]")
    # static/js/migrate.js fills the list from the source's live containers.
    choices = page.get_by_label("running containers")
    page.wait_for_selector(f'#container-choices option[value="{name}"]', state="attached")
    page.wait_for_load_state("networkidle")  # both requests (page load, source change) answered
    expect(page.locator("#workloads-status")).to_have_text("")
    choices.select_option(name)
    expect(page.locator("#id_container")).to_have_value(name)
    page.select_option("#id_target", "lab-2")
    page.screenshot(path=str(RESULTS / "migrate-form.png"), full_page=True)

    # The form probes both hosts and checks the container before it starts the run.
    with page.expect_navigation(timeout=60_000):
        page.locator("#migrate-form button[type=submit]").click()
    match = re.search(r"/runs/([0-9a-f-]{36})/$", page.url)
    assert match, f"the form did not start a run ({page.url}): " + " | ".join(
        page.locator(".errorlist, #migrate-form > ul").all_inner_texts()
    )
    return match.group(1)


def _check_run_page(page, expect):
    status = page.locator("#run-status")
    page.wait_for_function(
        "finished => finished.includes(document.getElementById('run-status').textContent.trim())",
        arg=[s.replace("_", " ") for s in FINISHED],
        timeout=RUN_TIMEOUT_S * 1000,
    )
    assert status.inner_text().strip() == "succeeded", page.locator("#run-error").inner_text()
    phase_names = page.locator("#phases tbody tr td:nth-child(2)").all_inner_texts()
    for phase in ("checkpoint", "transfer", "restore"):
        assert phase in phase_names, phase_names
    # The durations and start offsets are filled in for every phase.
    assert all(t.endswith("ms") for t in page.locator("#phases tbody tr td:nth-child(6)").all_inner_texts())
    # Start, duration and bytes are right-aligned under their headers.
    assert page.locator("#phases tbody td.num").count() == 3 * len(phase_names)
    assert page.locator("#run-downtime").inner_text().endswith(" ms")

    page.wait_for_function("window.cwTimelineChart && window.cwTimelineChart.data.labels.length > 0")
    labels = page.evaluate("window.cwTimelineChart.data.labels")
    assert "downtime" in labels, labels
    assert len(labels) == len(phase_names) + 1, (labels, phase_names)
    expect(page.locator("#timeline-section")).to_be_visible()
    box = page.locator("#timeline").bounding_box()
    assert box and box["width"] > 300 and box["height"] > 100, box


def _check_compare_page(page, base_url):
    page.get_by_role("navigation").get_by_role("link", name="Compare").click()
    page.wait_for_url(base_url + "/compare/")
    page.wait_for_function("window.cwCompareCharts && window.cwCompareCharts.length === 6")
    # The run just made is a point of "downtime over time", of downtime by
    # size (its series named by kind and strategy) and of the phase breakdown.
    points = page.evaluate("window.cwCompareCharts[0].data.datasets[0].data")
    assert len(points) == 1 and points[0] > 0, points
    by_size = page.evaluate("window.cwCompareCharts[1].data.datasets.map((d) => [d.label, d.data.length])")
    assert by_size == [["container engine", 1]], by_size
    assert page.evaluate("window.cwCompareCharts[1].options.scales.x.type") == "logarithmic"
    assert page.evaluate("window.cwCompareCharts[2].data.labels.length") == 1
    rows = page.locator("#table-host_pair tr").all_inner_texts()
    assert any("lab-1" in r and "lab-2" in r for r in rows), rows


def _wait_run_finished(page, expect):
    page.wait_for_function(
        "finished => finished.includes(document.getElementById('run-status').textContent.trim())",
        arg=[s.replace("_", " ") for s in FINISHED],
        timeout=RUN_TIMEOUT_S * 1000,
    )
    assert page.locator("#run-status").inner_text().strip() == "succeeded", page.locator("#run-error").inner_text()


@pytest.mark.django_db(transaction=True)
def test_checkpoint_then_clone_in_browser(live_server, hosts, operator, worker_process):
    """Take a checkpoint from the host page, then clone it onto lab-2 from the checkpoints page."""
    from playwright.sync_api import expect, sync_playwright

    from migrations_app import archive
    from migrations_app.models import CHECKPOINT, CLONE, Checkpoint

    lab1, lab2 = hosts
    name = f"browser-{uuid.uuid4().hex[:8]}"
    clone = f"{name}-clone"
    RESULTS.mkdir(exist_ok=True)
    with Engine(lab1) as engine:
        engine.run_container(lab.IMAGE, ["sh", "-c", lab.COUNTER_SCRIPT], name)
        wait_for(lambda: len(counter_values(engine, name)) >= 2, message="counter did not start")
        original = engine.inspect(name)
    errors = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            with browser:
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                with context:
                    page = context.new_page()
                    page.set_default_timeout(30_000)
                    page.on("console", lambda msg: msg.type == "error" and errors.append(f"console: {msg.text}"))
                    page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
                    base = live_server.url
                    page.goto(base + "/login/")
                    page.fill("#id_username", "operator")
                    page.fill("#id_password", "pw")
                    page.get_by_role("button", name="Log in").click()
                    page.wait_for_url(base + "/")

                    page.goto(base + "/hosts/lab-1/")
                    form = page.locator("#take-checkpoint form")
                    form.locator("input[name=kind][value=container]").check()
                    form.locator("input[name=container]").fill(name)
                    form.locator("input[name=name]").fill(f"{name}-cp")
                    expect(form.locator("input[name=leave_running]")).to_be_checked()
                    with page.expect_navigation():
                        form.get_by_role("button", name="Take a checkpoint").click()
                    _wait_run_finished(page, expect)
                    page.screenshot(path=str(RESULTS / "checkpoint-run.png"), full_page=True)

                    page.get_by_role("navigation").get_by_role("link", name="Checkpoints").click()
                    row = page.locator(f'tr[data-checkpoint="{name}-cp"]')
                    expect(row).to_contain_text("left running, frozen")
                    page.screenshot(path=str(RESULTS / "checkpoints-page.png"), full_page=True)
                    clone_form = row.locator("form.clone-form")
                    clone_form.locator("select[name=target]").select_option("lab-2")
                    clone_form.locator("input[name=new_name]").fill(clone)
                    with page.expect_navigation():
                        clone_form.get_by_role("button", name="Clone").click()
                    _wait_run_finished(page, expect)
                    page.screenshot(path=str(RESULTS / "clone-run.png"), full_page=True)

                    # Export: written in the background, then offered on its run page.
                    page.get_by_role("navigation").get_by_role("link", name="Checkpoints").click()
                    row = page.locator(f'tr[data-checkpoint="{name}-cp"]')
                    with page.expect_navigation():
                        row.get_by_role("button", name="Export").click()
                    _wait_run_finished(page, expect)
                    link = page.get_by_role("link", name="Download the archive")
                    expect(link).to_be_visible()
                    with page.expect_download() as download:
                        link.click()
                    exported = RESULTS / "exported.tar.zst"
                    download.value.save_as(exported)  # the browser's own copy goes with its context
        assert not errors, "JavaScript errors in the browser:\n" + "\n".join(errors)

        cp = Checkpoint.objects.get(name=f"{name}-cp")
        assert cp.host == lab1 and cp.leave_running and cp.created_by.username == "operator"
        # The downloaded archive is whole and is this checkpoint.
        assert archive.verify(exported)["checkpoint"]["name"] == cp.name
        exported.unlink()
        assert cp.runs.filter(operation=CHECKPOINT).count() == 1 and cp.runs.filter(operation=CLONE).count() == 1
        with Engine(lab2) as engine:
            assert engine.inspect(clone)["State"]["Running"]
            copied = wait_for(lambda: len(v := counter_values(engine, clone)) >= 2 and v)
        with Engine(lab1) as engine:
            still = engine.inspect(name)
            mine = counter_values(engine, name)
        # The original ran on, untouched; the clone counts from the checkpoint.
        assert still["Id"] == original["Id"] and still["State"]["Pid"] == original["State"]["Pid"]
        assert mine == list(range(len(mine)))
        assert copied == list(range(copied[0], copied[0] + len(copied))) and copied[0] > 0
    finally:
        for host in hosts:
            with Engine(host) as engine:
                for c in (name, clone):
                    if engine.exists(c):
                        engine.remove(c)
