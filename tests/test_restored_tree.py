"""The rule that tells a process of the restored tree that died from one that
ended as its workload meant (migrations_app/engine/restored_tree.py). The
lab tests (test_acceptance_lab.py) run it on real restored trees; here each
case of the rule is pinned on its own."""

from migrations_app.engine.restored_tree import TASK_DEAD, Died, died

ALIVE = 1


def _report(dumped, live):
    return {"dumped": dumped, "live": {str(k): v for k, v in live.items()}}


# A root (10) running a loop shell (11) whose child is a short sleep (12).
DUMPED = [[10, 1, ALIVE, "sh"], [11, 10, ALIVE, "sh"], [12, 11, ALIVE, "sleep"]]


def test_a_whole_tree_has_nothing_dead():
    live = {10: ["S", "sh", [11]], 11: ["S", "sh", [12]], 12: ["S", "sleep", []]}
    assert died(_report(DUMPED, live)) == []


def test_a_leaf_ended_while_its_loop_goes_on_is_not_dead():
    live = {10: ["S", "sh", [11]], 11: ["S", "sh", [13]], 13: ["S", "sleep", []]}
    assert died(_report(DUMPED, live)) == []


def test_a_leaf_gone_without_a_new_sibling_is_dead():
    live = {10: ["S", "sh", [11]], 11: ["S", "sh", []]}
    assert died(_report(DUMPED, live)) == [Died(12, "sleep")]


def test_a_process_with_children_gone_is_dead_even_if_its_parent_goes_on():
    # The loop shell died; its sleep, an orphan now, is the holder's.
    live = {10: ["S", "sh", [14]], 14: ["S", "sh", []], 12: ["S", "sleep", []]}
    assert died(_report(DUMPED, live)) == [Died(11, "sh")]


def test_a_zombie_after_the_restore_is_dead():
    live = {10: ["S", "sh", [11]], 11: ["Z", "sh", []], 12: ["S", "sleep", []]}
    assert died(_report(DUMPED, live)) == [Died(11, "sh")]


def test_a_zombie_at_dump_time_is_not_counted():
    dumped = [*DUMPED, [15, 10, TASK_DEAD, "worker"]]
    live = {10: ["S", "sh", [11]], 11: ["S", "sh", [12]], 12: ["S", "sleep", []]}
    assert died(_report(dumped, live)) == []


def test_a_leaf_whose_parent_is_a_zombie_is_dead():
    live = {10: ["S", "sh", [11]], 11: ["Z", "sh", [13]], 13: ["S", "sleep", []]}
    assert died(_report(DUMPED, live)) == [Died(11, "sh"), Died(12, "sleep")]
