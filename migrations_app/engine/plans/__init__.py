"""The plan registry: one entry per (workload kind, strategy).

Everything that offers a choice derives it from here: the migration form,
the CLI's --strategy, what a host must pass to offer a strategy, and the
labels the history pages show. A new strategy is one module in this package
and one line in PLANS.
"""

from __future__ import annotations

from ...models import KIND_CHOICES, MIGRATE
from ..errors import MigrationError
from ..plan import Plan
from . import (
    container_engine,
    container_runc,
    container_runc_lazy,
    container_runc_pageserver,
    keep_archive,
    keep_container,
    keep_container_runc,
    keep_process,
    process_copy,
    process_lazy,
    process_page_server,
)

PLANS: dict[tuple[str, str], Plan] = {
    plan.key: plan
    for plan in (
        container_engine.PLAN,
        container_runc.PLAN,
        container_runc_pageserver.PLAN,
        container_runc_lazy.PLAN,
        process_copy.PLAN,
        process_page_server.PLAN,
        process_lazy.PLAN,
    )
}

KINDS = [kind for kind, _ in KIND_CHOICES]

# The operations on kept checkpoints (checkpoint, restore, clone, export,
# import): per (operation, workload kind), its plans in order of preference,
# beside the migrations and out of their choices. A run stores the chosen
# plan's strategy: the operation's name, or for the runc path of containers
# "<operation>-runc" (so the comparison pages tell the two apart).
OPERATIONS: dict[tuple[str, str], tuple[Plan, ...]] = {}
for _plan in (*keep_container_runc.PLANS, *keep_container.PLANS, *keep_process.PLANS, *keep_archive.PLANS):
    OPERATIONS[(_plan.operation, _plan.kind)] = (*OPERATIONS.get((_plan.operation, _plan.kind), ()), _plan)
OPERATION_PLANS: dict[tuple[str, str], Plan] = {p.key: p for ps in OPERATIONS.values() for p in ps}


def for_operation(operation: str, kind: str, hosts) -> Plan:
    """The first plan of an operation whose needs every host it works on meets, by their last probe.

    The last plan of each operation needs nothing (Docker's API, CRIU
    driven directly), so there always is one; a host never probed gets it.
    """
    try:
        choices = OPERATIONS[(operation, kind)]
    except KeyError:
        raise MigrationError(f"no {operation} for a {kind}") from None
    for plan in choices:
        if all(host.passes(need) for host in hosts for need in plan.needs):
            return plan
    return choices[-1]


def for_run(run) -> Plan:
    """The plan a run executes: a migration strategy, or an operation's plan."""
    if run.operation == MIGRATE:
        return get(run.kind, run.strategy)
    try:
        return OPERATION_PLANS[(run.kind, run.strategy)]
    except KeyError:
        raise MigrationError(f"no {run.operation} for a {run.kind} by {run.strategy!r}") from None


def get(kind: str, strategy: str) -> Plan:
    try:
        return PLANS[(kind, strategy)]
    except KeyError:
        known = ", ".join(strategies(kind)) or "none"
        raise MigrationError(f"no strategy {strategy!r} for a {kind} (choose from: {known})") from None


def strategies(kind: str | None = None) -> list[str]:
    """Strategy names for a kind (or any kind), in registry order, without repeats."""
    names = [s for (k, s) in PLANS if kind is None or k == kind]
    return list(dict.fromkeys(names))


def default_strategy(kind: str) -> str:
    return strategies(kind)[0]


def label(kind: str, strategy: str) -> str:
    plan = PLANS.get((kind, strategy)) or OPERATION_PLANS.get((kind, strategy))
    if plan:
        return plan.label
    return next((p.label for p in PLANS.values() if p.strategy == strategy), strategy)


def choices(kind: str | None = None) -> list[tuple[str, str]]:
    """(name, label) pairs for a form."""
    return [(s, label(kind, s) if kind else _any_label(s)) for s in strategies(kind)]


def _any_label(strategy: str) -> str:
    return next(p.label for p in PLANS.values() if p.strategy == strategy)


def missing(plan: Plan, host) -> list[str]:
    """What a host lacks for a plan, by its last probe; empty when it can serve."""
    if not host.probe_ok():
        return ["its probe fails" if host.probed else "it has not been probed"]
    return [_why(host, need) for need in plan.needs if not host.passes(need)]


def _why(host, need: str) -> str:
    """A missing need in words, with CRIU's own error where a self-test failed."""
    if need.startswith("runtime:"):
        return f"its Docker engine has no {need.partition(':')[2]!r} runtime (scripts/setup-system.sh registers it)"
    test = host.capabilities.get("self_tests", {}).get(need)
    if test is None:
        return f"no {need} support found"
    return f"its {need} self-test fails ({test.get('error') or 'no error recorded'})"


def strategies_for_host(host, kind: str | None = None) -> list[str]:
    return list(
        dict.fromkeys(p.strategy for p in PLANS.values() if (kind is None or p.kind == kind) and not missing(p, host))
    )


def available(kind: str, source, target) -> list[tuple[str, str, str]]:
    """(strategy, label, why not or "") for each strategy of a kind between two hosts."""
    rows = []
    for plan in PLANS.values():
        if plan.kind != kind:
            continue
        why = [f"{host.name}: {', '.join(m)}" for host in (source, target) if (m := missing(plan, host))]
        rows.append((plan.strategy, plan.label, "; ".join(why)))
    return rows


def offer_table(hosts) -> dict:
    """What the migration form's script needs to offer only what can work.

    strategies: per kind, [name, label, summary] in registry order, the
    default first; missing: per host name, per "kind/strategy", what that
    host lacks (empty lists left out). A strategy is offered for a pair
    when neither host lacks anything for it.
    """
    table: dict = {"strategies": {}, "missing": {}}
    for plan in PLANS.values():
        table["strategies"].setdefault(plan.kind, []).append([plan.strategy, plan.label, plan.summary])
    for host in hosts:
        if not host.probed:
            # Unknown yet, not lacking: the form probes such a host when it
            # is submitted and refuses then, with the reason.
            table["missing"][host.name] = {}
            continue
        lacks = {f"{p.kind}/{p.strategy}": m for p in PLANS.values() if (m := missing(p, host))}
        table["missing"][host.name] = lacks
    return table
