"""The cores' undo log alone: every change it records is put back exactly, newest first, and a
commit makes the changes stay. (The scheduler's all-or-nothing ``handle`` rests on it.)"""

from __future__ import annotations

from types import SimpleNamespace

from actors.core.undo import Undo


def test_a_put_is_undone_to_the_old_value_to_none_or_to_no_entry() -> None:
    mapping: dict[str, object] = {"old": 1, "none": None}
    undo = Undo()
    undo.put(mapping, "old", 2)
    undo.put(mapping, "none", 3)
    undo.put(mapping, "new", 4)
    undo.put(mapping, "new", 5)  # twice: the first value it had (none) comes back
    assert mapping == {"old": 2, "none": 3, "new": 5} and len(undo) == 4
    undo.rollback()
    assert mapping == {"old": 1, "none": None}
    assert len(undo) == 0


def test_a_pop_is_undone_by_putting_the_entry_back_even_a_none() -> None:
    mapping: dict[str, object] = {"a": 1, "none": None}
    undo = Undo()
    assert undo.pop(mapping, "a") == 1
    assert undo.pop(mapping, "none") is None
    assert undo.pop(mapping, "missing") is None  # nothing to put back: nothing recorded
    assert mapping == {} and len(undo) == 2
    undo.rollback()
    assert mapping == {"a": 1, "none": None}


def test_set_add_discard_and_call_are_undone_newest_first() -> None:
    obj = SimpleNamespace(state="queued")
    items = {1, 2}
    calls: list[tuple[str, int]] = []
    undo = Undo()
    undo.set(obj, "state", "running")
    undo.set(obj, "state", "done")
    undo.add(items, 3)
    undo.add(items, 1)  # already in: nothing to undo
    undo.discard(items, 2)
    undo.discard(items, 9)  # not in: nothing to undo
    undo.call(lambda name, n: calls.append((name, n)), "first", 1)
    undo.call(lambda name, n: calls.append((name, n)), "second", 2)
    assert (obj.state, items, len(undo)) == ("done", {1, 3}, 6)
    undo.rollback()
    assert obj.state == "queued" and items == {1, 2}
    assert calls == [("second", 2), ("first", 1)]


def test_a_commit_keeps_the_changes() -> None:
    mapping = {"a": 1}
    undo = Undo()
    undo.put(mapping, "a", 2)
    undo.commit()
    undo.rollback()
    assert mapping == {"a": 2} and len(undo) == 0
