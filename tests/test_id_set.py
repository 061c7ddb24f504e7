"""IdSet: a task's workers, walked in id order at every dispatch; the order kept until it changes."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from actors.core.id_set import IdSet
from actors.core.undo import Undo


def test_the_order_follows_every_add_and_discard_the_undo_log_makes_or_reverses() -> None:
    ids = IdSet(["w3", "w1"])
    assert ids.in_order() == ["w1", "w3"]
    undo = Undo()
    undo.add(ids, "w2")
    undo.discard(ids, "w1")
    assert ids.in_order() == ["w2", "w3"]
    undo.rollback()  # items.discard("w2"), then items.add("w1")
    assert ids.in_order() == ["w1", "w3"]
    assert ids == {"w1", "w3"}


@pytest.mark.parametrize("change", [
    lambda s: s.remove("w1"), lambda s: s.pop(), lambda s: s.clear(), lambda s: s.update({"w0"}),
    lambda s: s.difference_update({"w1"}), lambda s: s.intersection_update(set()),
    lambda s: s.symmetric_difference_update({"w0"}),
])
def test_any_other_change_is_refused_and_changes_nothing(change: Callable[[IdSet], object]) -> None:
    ids = IdSet(["w2", "w1"])
    assert ids.in_order() == ["w1", "w2"]
    with pytest.raises(TypeError, match="add and discard only"):
        change(ids)
    assert ids == {"w1", "w2"} and ids.in_order() == ["w1", "w2"]


def test_in_place_operators_are_refused() -> None:
    ids = IdSet(["w1"])
    with pytest.raises(TypeError):
        ids |= {"w0"}
    with pytest.raises(TypeError):
        ids -= {"w1"}
    assert ids == {"w1"}


def test_the_kept_order_is_changed_in_step_not_sorted_again() -> None:
    ids = IdSet(["w5", "w1"])
    kept = ids.in_order()
    for worker_id in ("w3", "w0", "w9", "w3"):
        ids.add(worker_id)
    ids.discard("w5")
    ids.discard("w7")  # not there: nothing changes
    assert ids.in_order() is kept  # the same list, changed in place
    assert kept == sorted(ids) == ["w0", "w1", "w3", "w9"]
