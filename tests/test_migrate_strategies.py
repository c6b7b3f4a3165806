"""The migration form offers only strategies both hosts passed in their probe."""

import json
import os
import re

import pytest
from django.utils import timezone

from migrations_app.engine import plans
from migrations_app.engine.plans import container_engine
from migrations_app.models import CONTAINER, LAZY, PAGE_SERVER, PROCESS, STOP_AND_COPY, MigrationRun
from tests.support import queued_runs
from tests.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.test_views import OK_CAPS, assert_shows, launcher, make_host, page_text, ready_host  # noqa: F401

PASSED = {"ok": True, "error": ""}
# What the lazy self-test says on a host whose root lacks CAP_SYS_RESOURCE
# and whose pipe limits are the defaults (see the shared notes).
LAZY_ERROR = "dump: page-pipe: tee: 65536: Operation not permitted"


def host_with_tests(name, **tests):
    caps = dict(
        OK_CAPS,
        self_tests={"sockets": PASSED, "page-server": PASSED, "lazy": PASSED, **tests},
        docker={"runtimes": ["criuweb", "runc"]},
    )
    return make_host(name, capabilities=caps, probed=timezone.now())


def strategy_table(response):
    found = re.search(r'<script id="strategy-table" type="application/json">(.*?)</script>', page_text(response))
    return json.loads(found[1])


def test_the_form_says_which_strategies_each_host_lacks_and_why(launcher, db):
    # The failed self-test is written into the stored probe: producing it for
    # real needs the machine-wide pipe limits back at their defaults, which
    # would make the lazy runs of any other test session on this kernel fail.
    host_with_tests("a")
    host_with_tests("b", lazy={"ok": False, "error": LAZY_ERROR})
    table = strategy_table(launcher.get("/migrate/"))
    names = [row[0] for row in table["strategies"][PROCESS]]
    assert names[0] == STOP_AND_COPY and {PAGE_SERVER, LAZY} <= set(names)
    assert table["missing"]["a"] == {}
    assert table["missing"]["b"][f"{PROCESS}/{LAZY}"] == [f"its lazy self-test fails ({LAZY_ERROR})"]
    # Only what needs the failed self-test is missing.
    assert all(key.endswith(f"/{LAZY}") for key in table["missing"]["b"])
    # The plan's summary travels with it: the form shows the post-copy risk.
    lazy = next(row for row in table["strategies"][PROCESS] if row[0] == LAZY)
    assert "depends on both hosts" in lazy[2]


def test_a_strategy_a_host_failed_is_refused_with_the_reason(launcher, db):
    host_with_tests("a")
    host_with_tests("b", lazy={"ok": False, "error": LAZY_ERROR})
    response = launcher.post("/migrate/", {"source": "a", "target": "b", "kind": PROCESS, "pid": "4242",
                                           "strategy": LAZY, "tcp": "tcp-close"})
    assert response.status_code == 200
    assert_shows(response, f"Both hosts must support this strategy (b: its lazy self-test fails ({LAZY_ERROR})).")
    assert MigrationRun.objects.count() == 0 and queued_runs() == []


def test_the_runc_strategies_need_criuwebs_runtime_on_both_hosts(db):
    with_runtime = host_with_tests("a")
    without = host_with_tests("b")
    without.capabilities = dict(without.capabilities, docker={"runtimes": ["runc"]})
    without.save()
    runc_plans = {p.strategy for p in plans.PLANS.values() if p.kind == CONTAINER and p is not container_engine.PLAN}
    assert runc_plans, "no runc plans registered"
    why = {s: w for s, _, w in plans.available(CONTAINER, with_runtime, without)}
    # Docker's own path needs nothing of the kind; each runc plan names what b lacks.
    assert why[container_engine.PLAN.strategy] == ""
    for strategy in runc_plans:
        assert "b: its Docker engine has no 'criuweb' runtime" in why[strategy], why
        assert "a:" not in why[strategy]
    both = {s for s, _, w in plans.available(CONTAINER, with_runtime, with_runtime) if not w}
    assert runc_plans <= both


def test_a_host_never_probed_offers_everything_until_the_form_probes_it(launcher, db):
    # Unknown is not lacking: the form probes such a host when submitted
    # (tests/test_views.py covers that) and refuses then, with the reason.
    host_with_tests("a")
    make_host("fresh")
    table = strategy_table(launcher.get("/migrate/"))
    assert table["missing"]["fresh"] == {}


def test_a_host_probed_before_self_tests_existed_offers_only_what_needs_none(db):
    old = ready_host("old")
    offered = [s for s, _, why in plans.available(PROCESS, old, old) if not why]
    assert offered == [STOP_AND_COPY]
    why = dict((s, w) for s, _, w in plans.available(PROCESS, old, old))
    assert why[PAGE_SERVER] == "old: no page-server support found; old: no page-server support found"


@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (scripts/setup-system.sh installs it)")
@pytest.mark.django_db(transaction=True)
def test_the_form_script_offers_by_kind_and_pair(live_server, operator):
    from playwright.sync_api import expect, sync_playwright

    host_with_tests("a")
    host_with_tests("b", lazy={"ok": False, "error": LAZY_ERROR})
    errors = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        with browser:
            page = browser.new_page()
            page.set_default_timeout(20_000)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(live_server.url + "/login/")
            page.fill("#id_username", "operator")
            page.fill("#id_password", "pw")
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(live_server.url + "/")
            page.goto(live_server.url + "/migrate/")
            page.select_option("#id_source", "a")
            page.select_option("#id_target", "b")
            page.check("input[name=kind][value=process]")
            options = page.locator("#id_strategy option")
            expect(options).to_have_count(2)
            assert options.evaluate_all("os => os.map(o => o.value)") == [STOP_AND_COPY, PAGE_SERVER]
            expect(page.locator("#strategy-missing")).to_contain_text(
                f"post-copy (lazy pages): not offered (b: its lazy self-test fails ({LAZY_ERROR}))"
            )
            page.select_option("#id_strategy", PAGE_SERVER)
            expect(page.locator("#strategy-summary")).to_contain_text("tmpfs")
            # For a container: those that do not need the lazy self-test.
            page.check("input[name=kind][value=container]")
            wanted = [p.strategy for p in plans.PLANS.values() if p.kind == "container" and "lazy" not in p.needs]
            expect(options).to_have_count(len(wanted))
            assert options.evaluate_all("os => os.map(o => o.value)") == wanted
    assert not errors, errors
