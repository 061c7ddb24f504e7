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


def _snapshot(book: UnitBook) -> tuple:
    """Everything an undo must put back, by value."""
    return (list(book.pending), dict(book.open_units), dict(book.blocked), dict(book.kept),
            dict(book.held), {k: list(v) for k, v in book.dependents.items()},
            {k: set(v) for k, v in book.missing_for.items()}, set(book.steals),
            book.steal_pending, set(book.carried), bytes(book.journaled), book.journaled_count)


def test_undoing_opens_of_every_kind_leaves_the_book_as_it_was() -> None:
    """The scheduler's handle is all-or-nothing: units opened in an event that then raised
    (queued, blocked on an input, feeding others) go without a trace, and earlier ones stay."""
    book = UnitBook()
    book.open(UnitCall(0, b"a", keep=True))
    book.open(UnitCall(1, b"b", [0], keep=True))
    before = _snapshot(book)
    opened: list = []
    for unit in (UnitCall(2, b"c"), UnitCall(3, b"d", [0, 1], keep=True),
                 UnitCall(4, b"e", [0], keep=True), UnitCall(5, b"f")):
        book.open(unit, opened)
    assert [u.index for u in book.pending] == [0, 2, 5] and set(book.blocked) == {1, 3, 4}
    assert book.dependents == {0: [1, 3, 4], 1: [3]}
    assert [unit.index for unit, _ in opened] == [2, 3, 4, 5]
    book.unopen(opened)
    assert _snapshot(book) == before
    book.validate([], finished=False)


def test_a_unit_is_queued_once_its_inputs_are_held_and_blocked_until_then() -> None:
    book = UnitBook()
    book.held[0], book.kept[0] = "w1", UnitCall(0, b"a", keep=True)
    book.open(UnitCall(1, b"b", [0]))
    assert [u.index for u in book.pending] == [1] and not book.blocked
    assert book.open_units[1].index == 1
    book.open(UnitCall(2, b"c", [5]))  # a plain unit whose input is not held yet waits
    assert [u.index for u in book.pending] == [1] and book.blocked[2].index == 2


def test_undoing_the_open_of_a_blocked_unit_with_nothing_queued() -> None:
    book = UnitBook()
    book.open(UnitCall(0, b"a", keep=True))
    book.pending.popleft()  # dispatched: in flight, nothing queued
    opened: list = []
    book.open(UnitCall(1, b"b", [0], keep=True), opened)
    book.unopen(opened)
    assert set(book.open_units) == {0} and not book.blocked and not book.pending
    assert book.dependents == {}


@pytest.mark.parametrize("field", ["open_units", "held", "kept", "dependents", "missing_for",
                                   "steals", "steal_pending"])
def test_clearing_is_undone_whatever_alone_was_open(field: str) -> None:
    """Each of these alone means something hangs on the task's units: clear_open forgets it,
    and an undo puts it back as it was (the carried units too)."""
    from actors.core.undo import Undo

    book = UnitBook()
    value = {"open_units": {3: UnitCall(3, b"x")}, "held": {3: "w1"},
             "kept": {3: UnitCall(3, b"x", keep=True)}, "dependents": {3: [4]},
             "missing_for": {3: {"w2"}}, "steals": {12}, "steal_pending": True}[field]
    setattr(book, field, value)
    if field == "open_units":
        book.carried = {3}
    before = _snapshot(book)
    undo = Undo()
    book.clear_open(undo)
    assert getattr(book, field) in ({}, set(), False) and not book.carried
    undo.rollback()
    assert _snapshot(book) == before


def test_unmarking_a_journal_bit_keeps_the_others_and_the_count_right() -> None:
    book = UnitBook()
    assert book.set_journaled(1, True) and book.set_journaled(2, True)
    assert book.set_journaled(3, True)
    assert book.is_journaled(1) and book.is_journaled(2)  # a mark adds to its byte
    assert not book.set_journaled(2, True)  # nothing changed: said so
    assert book.set_journaled(1, False) and book.journaled_count == 2
    assert book.is_journaled(2) and not book.is_journaled(1)
    book.validate([], finished=False)


def test_the_bitmap_grows_by_half_again_and_no_more() -> None:
    book = UnitBook()
    book.mark_journaled([80])  # byte 10
    assert len(book.journaled) == 11
    book.mark_journaled([160])  # byte 20: past the end of an earlier growth
    assert book.is_journaled(160) and 21 <= len(book.journaled) <= 21 + 11 // 2
    book.validate([], finished=False)


def test_a_finished_task_with_units_left_or_a_blocked_unit_in_flight_is_caught() -> None:
    book = UnitBook()
    book.open(UnitCall(0, b"a"))
    with pytest.raises(AssertionError, match="finished task has open units"):
        book.validate([], finished=True)
    book.pending.clear()  # still open: not finished either
    with pytest.raises(AssertionError, match="finished task has open units"):
        book.validate([0], finished=True)
    blocked = UnitBook()
    blocked.open(UnitCall(0, b"a", keep=True))
    blocked.open(UnitCall(1, b"b", [0], keep=True))
    with pytest.raises(AssertionError, match="blocked unit is queued or in flight"):
        blocked.validate([1], finished=False)


def test_the_shared_book_of_plain_tasks_refuses_every_change() -> None:
    from actors.core.unit_book import NO_UNITS

    with pytest.raises(AttributeError, match="a plain Task has no units"):
        NO_UNITS.done_count = 1
    with pytest.raises(AttributeError, match="a plain Task has no units"):
        NO_UNITS.steal_pending = True
    NO_UNITS.check_empty()


@pytest.mark.parametrize("field", ["pending", "open_units", "blocked", "kept", "held",
                                   "dependents", "missing_for", "journaled", "steals", "flying"])
def test_the_shared_book_sees_any_container_changed_in_place(field: str) -> None:
    """Its fields cannot be set, but its containers can be changed in place: by a bug, which
    the scheduler's validate catches through check_empty, whichever container it was."""
    from actors.core.unit_book import NoUnits

    book = NoUnits().seal()
    container = getattr(book, field)
    if isinstance(container, dict):
        container[0] = "x"
    elif isinstance(container, bytearray):
        container.append(1)
    elif isinstance(container, set):
        container.add(0)
    else:
        container.append(UnitCall(0, b"a"))
    with pytest.raises(AssertionError, match="shared book has units"):
        book.check_empty()


def test_a_fresh_batch_opens_whole_as_one_by_one_and_anything_else_is_left_to_open() -> None:
    one_by_one, whole = UnitBook(), UnitBook()
    batch = [UnitCall(i, b"x") for i in range(5, 9)]
    for unit in batch:
        one_by_one.open(unit)
    opened: list[tuple[UnitCall, UnitCall | None]] = []
    assert whole.open_fresh(batch, opened)
    assert whole.open_units == one_by_one.open_units and whole.pending == one_by_one.pending
    whole.validate([], finished=False)
    whole.unopen(opened)
    assert not whole.open_units and not whole.pending
    # Not fresh: a unit named twice, one open already, one journaled, one kept or with inputs.
    book = UnitBook()
    book.open(UnitCall(3, b"x"))
    book.set_journaled(20, True)
    for refused in ([UnitCall(1, b"x"), UnitCall(1, b"y")], [UnitCall(2, b"x"), UnitCall(3, b"x")],
                    [UnitCall(19, b"x"), UnitCall(20, b"x")], [UnitCall(4, b"x", keep=True)],
                    [UnitCall(5, b"x", [3])]):
        assert not book.open_fresh(refused, opened)
    assert list(book.open_units) == [3] and [u.index for u in book.pending] == [3]
