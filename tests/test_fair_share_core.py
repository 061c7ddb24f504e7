"""The fair share's clocks and turns alone (the queue's order they make is tested through the
scheduler in test_scheduler_state.py, the effect on real clients in test_fair_share.py)."""

from __future__ import annotations

import pytest

from actors.core.fair_share import CLIENT_QUANTUM_S, MIN_COST_S, QUANTUM_S, FairShare
from actors.core.undo import Undo


def test_the_first_task_of_a_level_starts_at_zero_and_moves_its_clients_clock() -> None:
    fair, undo = FairShare(), Undo()
    bucket, turn, slot, client, start = fair.tag(undo, 0, "owner", "c1", 0.25)
    assert (bucket, slot, client, start) == (0, 0, "c1", 0.0)
    assert fair.clocks == {("c1", 0): 0.25} and fair.turns == {(0, "owner", 0): turn}
    second = fair.tag(undo, 0, "owner", "c1", 0.0)  # a cost below the least counts as the least
    assert second[4] == 0.25 and fair.clocks[("c1", 0)] == 0.25 + MIN_COST_S
    assert second[1] == turn  # the same key and bucket: the same turn


def test_a_client_that_comes_late_starts_at_the_levels_virtual_time() -> None:
    fair, undo = FairShare(), Undo()
    for _ in range(100):
        fair.tag(undo, 0, "a", "busy", 0.01)
    fair.started(undo, 0, 0.2)
    late = fair.tag(undo, 0, "b", "late", 0.01)
    assert late[4] == 0.2 and late[0] == int(0.2 // QUANTUM_S)
    assert late[2] == int(0.2 // CLIENT_QUANTUM_S)


def test_virtual_time_never_goes_back() -> None:
    fair, undo = FairShare(), Undo()
    fair.started(undo, 0, 0.8)
    fair.started(undo, 0, 0.3)
    assert fair.virtual == {0: 0.8}


def test_turns_of_buckets_behind_virtual_time_go_and_no_others() -> None:
    fair, undo = FairShare(), Undo()
    fair.turns = {(0, "a", 0): 1, (0, "b", 0): 2, (0, "a", 1): 3, (0, "a", 2): 4, (1, "a", 0): 5}
    fair.started(undo, 0, QUANTUM_S * 1.5)  # into bucket 1 of priority 0
    assert fair.turns == {(0, "a", 1): 3, (0, "a", 2): 4, (1, "a", 0): 5}
    undo.rollback()
    assert fair.turns == {(0, "a", 0): 1, (0, "b", 0): 2, (0, "a", 1): 3, (0, "a", 2): 4,
                          (1, "a", 0): 5}
    assert fair.virtual == {}


@pytest.mark.parametrize("leaving", ["c1", "c2"])
def test_a_client_that_leaves_takes_its_clocks_and_only_its_own(leaving: str) -> None:
    fair, undo = FairShare(), Undo()
    for priority in (0, 5):
        fair.tag(undo, priority, "owner", "c1", 0.1)
        fair.tag(undo, priority, "owner", "c2", 0.1)
    undo.commit()
    staying = "c2" if leaving == "c1" else "c1"
    fair.client_left(undo, leaving)
    assert set(fair.clocks) == {(staying, 0), (staying, 5)}
    undo.rollback()
    assert len(fair.clocks) == 4
