"""One task's unit bookkeeping on the master, alone: no scheduler, no sockets."""

from __future__ import annotations

import pytest

from actors.core.unit_book import UnitBook
from actors.messages import UnitCall


def test_a_unit_waits_blocked_until_every_input_is_held() -> None:
    book = UnitBook()
    book.open(UnitCall(0, b"a", keep=True))
    book.open(UnitCall(1, b"b", [0], keep=True))
    assert [u.index for u in book.pending] == [0] and set(book.blocked) == {1}
    assert book.dependents == {0: [1]}
    book.validate([], finished=False)


def test_a_held_result_is_needed_while_a_dependent_is_open_or_reduce_takes_it() -> None:
    book = UnitBook()
    book.open(UnitCall(0, b"a", keep=True))
    book.open(UnitCall(1, b"b", [0], keep=True))
    assert book.still_needed(1)  # nobody consumes it: reduce does
    assert book.still_needed(0)  # unit 1 is open and consumes it
    del book.open_units[1]
    assert not book.still_needed(0)


def test_the_journal_bits_and_their_count_move_together() -> None:
    book = UnitBook()
    for index in (3, 1_000_000, 3):
        book.set_journaled(index, True)
    assert book.journaled_count == 2 and book.is_journaled(1_000_000) and not book.is_journaled(4)
    assert len(book.journaled) < 200_000  # a bitmap, not a byte per unit
    book.set_journaled(3, False)
    book.set_journaled(3, False)
    assert book.journaled_count == 1 and not book.is_journaled(3)
    book.validate([], finished=False)


def test_a_batch_of_journal_marks_returns_only_the_new_ones_for_an_undo() -> None:
    book = UnitBook()
    book.set_journaled(7, True)
    size = len(book.journaled)
    marked = book.mark_journaled([5, 7, 9, 70_000])
    assert marked == [5, 9, 70_000] and book.journaled_count == 4
    assert all(book.is_journaled(i) for i in (5, 7, 9, 70_000)) and not book.is_journaled(6)
    book.validate([], finished=False)
    book.unmark(marked, size)  # as the scheduler's undo log does
    assert book.journaled_count == 1 and book.is_journaled(7) and not book.is_journaled(9)
    assert len(book.journaled) == size and book.mark_journaled([]) == []
    book.validate([], finished=False)


def test_undoing_the_open_of_a_unit_sliced_again_keeps_its_earlier_held_result() -> None:
    """A new driver slices a keep unit again while its earlier result is still held: the
    open is undone (its event raised later): the unit kept for that result stays kept."""
    book = UnitBook()
    earlier = UnitCall(6, b"a", keep=True)
    book.kept[6], book.held[6] = earlier, "w3"
    opened: list = []
    again = UnitCall(6, b"a", keep=True)
    book.open(again, opened)
    assert book.kept[6] is again and 6 in book.open_units
    book.unopen(opened)
    assert book.kept[6] is earlier and book.held[6] == "w3" and 6 not in book.open_units
    assert not book.pending
    fresh: list = []
    book.open(UnitCall(7, b"b", keep=True), fresh)
    book.unopen(fresh)
    assert 7 not in book.kept  # one that was not kept before goes


def test_clearing_forgets_open_units_but_not_the_journal() -> None:
    book = UnitBook()
    book.open(UnitCall(0, b"a", keep=True))
    book.held[0] = "w1"
    book.set_journaled(5, True)
    book.clear_open()
    assert not (book.pending or book.open_units or book.held or book.kept or book.dependents)
    assert book.is_journaled(5)
    book.validate([], finished=True)


@pytest.mark.parametrize(("flying", "break_it", "says"), [
    ([0], lambda b: None, "queued and in flight"),
    ([0, 0], lambda b: b.pending.clear(), "on two workers"),
    ([], lambda b: b.pending.clear(), "neither queued, running nor blocked"),
    ([], lambda b: b.pending.append(b.pending[0]), "queued twice"),
    ([7], lambda b: None, "closed units [7] in flight"),
    ([], lambda b: b.journaled.append(1), "journaled count"),
    ([], lambda b: b.held.update({9: "w1"}), "held unit is not kept"),
])
def test_validate_finds_each_broken_invariant(flying, break_it, says) -> None:
    book = UnitBook()
    book.open(UnitCall(0, b"a"))
    break_it(book)
    with pytest.raises(AssertionError, match=says.replace("[", r"\[").replace("]", r"\]")):
        book.validate(flying, finished=False)
