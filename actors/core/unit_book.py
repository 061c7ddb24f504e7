"""One task's units as the master keeps them: which are open, queued, blocked, held or done.

A ``UnitBook`` belongs to one ``TaskRecord`` of ``scheduler_state.py``, which decides *when*
units move (on events) and writes the story; the book keeps the bookkeeping consistent and
checks it. No I/O, no clock.

A unit is **open** from the moment the driver slices it until its first valid result is
recorded (or the task ends). An open unit is in exactly one of three places:

  pending   queued to be dispatched, in order (a unit given back goes to the front)
  blocked   waiting for a dependency (a ``keep`` unit not yet held)
  flying    dispatched to a worker (``WorkerRecord.in_flight``, kept by the scheduler)

A finished ``keep`` unit's result stays on its worker: ``held[index]`` names that worker, and
the unit is kept (``kept``) so that it can be computed again if that worker is lost while a
dependent or ``reduce`` still needs it. Results of plain units go to the driver and into the
master's journal; ``journaled`` (one bit per unit) says which, so that a restarted driver's
re-sliced units are replayed instead of computed again.

The book's own changes (``open``, ``set_journaled``, ``clear_open``) are recorded in the caller's
``Undo`` log when one is given, so that the scheduler's ``handle`` stays all-or-nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from itertools import repeat

from actors.core.undo import Undo
from actors.messages import UnitCall

#: What ``open`` did, for ``unopen``: the unit, and the ``kept`` entry it replaced (a unit
#: sliced again by a new driver while its earlier result is still held).
Opened = list[tuple[UnitCall, UnitCall | None]]

_OpenState = tuple[deque[UnitCall], dict[int, UnitCall], dict[int, UnitCall], dict[int, UnitCall],
                   dict[int, str], dict[int, list[int]], dict[int, set[str]], set[int], bool]


@dataclass
class UnitBook:
    pending: deque[UnitCall] = field(default_factory=deque)
    open_units: dict[int, UnitCall] = field(default_factory=dict)
    blocked: dict[int, UnitCall] = field(default_factory=dict)  # open, waiting for dependencies
    kept: dict[int, UnitCall] = field(default_factory=dict)  # keep units, to recompute if lost
    held: dict[int, str] = field(default_factory=dict)  # finished keep unit -> its worker
    sizes: dict[int, int] = field(default_factory=dict)  # held result -> its bytes (last known)
    dependents: dict[int, list[int]] = field(default_factory=dict)  # unit -> units it feeds
    missing_for: dict[int, set[str]] = field(default_factory=dict)  # unit -> workers asking
    # (unit, asking worker) -> times it found the unit's live holder unreachable
    fetch_failures: dict[tuple[int, str], int] = field(default_factory=dict)
    done_count: int = 0
    # Plain units whose result was journaled, one bit each: a huge task stays small here.
    journaled: bytearray = field(default_factory=bytearray)
    journaled_count: int = 0
    sliced_all: bool = False
    sliced_end: int = 0  # one past the highest unit sliced so far (by any of its drivers)
    unit_seconds: float | None = None  # moving average of one unit's run time
    steals: set[int] = field(default_factory=set)  # run ids asked back
    steal_pending: bool = False  # a steal request is waiting for its answer
    # Every worker of the task with units in flight, and some that had none since (dropped when
    # a look for runs to steal meets them): that look walks these, not every worker of a task
    # that may have a thousand, most of them idle, at every result.
    flying: set[str] = field(default_factory=set)
    # Open units a lost driver's helpers still run: the next driver has not sliced them yet,
    # so it gets their results by replay once it does, not forwarded before.
    carried: set[int] = field(default_factory=set)
    reported_done: int = -1  # done_count when progress was last reported
    pack: int = 1  # plain units the driver was last told to pack together (UnitCall.count)
    # The driver heard from the master about its units (results, or "go on"): until then it
    # slices only its first few (task_host.FIRST_LOOKAHEAD).
    answered: bool = False

    def open(self, unit: UnitCall, opened: Opened | None = None) -> None:
        """A unit sliced (or re-sliced and not replayed): queued, or blocked on its inputs.
        ``opened``: a list registered in an undo log (``unopen``), the unit added once open."""
        index = unit.index
        self.open_units[index] = unit
        if not unit.deps and not unit.keep:  # most units: queued at once
            self.pending.append(unit)
            if opened is not None:
                opened.append((unit, None))
            return
        replaced = None
        if unit.keep:
            replaced = self.kept.get(index)
            self.kept[index] = unit
        for dep in unit.deps:
            self.dependents.setdefault(dep, []).append(index)
        if all(dep in self.held for dep in unit.deps):
            self.pending.append(unit)
        else:
            self.blocked[index] = unit
        if opened is not None:
            opened.append((unit, replaced))

    def open_fresh(self, units: list[UnitCall], opened: Opened) -> bool:
        """``open`` of a whole batch at once when it is a slicer's usual one: every unit plain
        (no dependencies, not kept), none open, none journaled. False, nothing done, otherwise
        (the caller opens them one by one). ~3x cheaper per unit than ``open`` each."""
        if any(unit.deps or unit.keep for unit in units):
            return False
        indices = [unit.index for unit in units]
        distinct = set(indices)  # (a batch naming a unit twice opens it once, one by one)
        if len(distinct) != len(indices) or not self.open_units.keys().isdisjoint(distinct):
            return False
        journaled, beyond = self.journaled, len(self.journaled) << 3
        if self.journaled_count and any(
                i < beyond and journaled[i >> 3] >> (i & 7) & 1 for i in indices):
            return False
        self.open_units.update(zip(indices, units, strict=True))
        self.pending.extend(units)
        opened.extend(zip(units, repeat(None)))  # (for unopen)
        return True

    def unopen(self, opened: Opened) -> None:
        """Undo ``open`` of these units, the latest first (an undo log runs backwards)."""
        for unit, replaced in reversed(opened):
            self._unopen(unit, replaced)

    def _unopen(self, unit: UnitCall, replaced: UnitCall | None) -> None:
        index = unit.index
        self.open_units.pop(index, None)
        if replaced is not None:
            self.kept[index] = replaced
        elif unit.keep:
            self.kept.pop(index, None)
        for dep in reversed(unit.deps):
            feeds = self.dependents.get(dep)
            if feeds and feeds[-1] == index:
                feeds.pop()
                if not feeds:
                    del self.dependents[dep]
        if self.blocked.pop(index, None) is None and self.pending and self.pending[-1] is unit:
            self.pending.pop()

    def still_needed(self, index: int) -> bool:
        """A held result ``reduce`` needs (no unit consumes it), or that an open unit consumes."""
        dependents = self.dependents.get(index)
        return not dependents or any(d in self.open_units for d in dependents)

    def is_journaled(self, index: int) -> bool:
        byte = index >> 3
        return byte < len(self.journaled) and bool(self.journaled[byte] >> (index & 7) & 1)

    def set_journaled(self, index: int, on: bool) -> bool:
        """Mark (or unmark) a unit whose result is in the journal; keeps ``journaled_count``.
        Whether anything changed (``unmark`` undoes a list of marks)."""
        if self.is_journaled(index) == on:
            return False
        byte = index >> 3
        self._grow_journaled(byte)
        if on:
            self.journaled[byte] |= 1 << (index & 7)
            self.journaled_count += 1
        else:
            self.journaled[byte] &= ~(1 << (index & 7)) & 0xFF
            self.journaled_count -= 1
        return True

    def mark_journaled(self, indices: list[int]) -> list[int]:
        """``set_journaled(i, True)`` for each of ``indices`` (one batch's results); those that
        were not marked yet, for ``unmark``."""
        if not indices:
            return []
        self._grow_journaled(max(indices) >> 3)  # once for the batch
        journaled, marked = self.journaled, []
        for index in indices:
            byte, bit = index >> 3, 1 << (index & 7)
            if not journaled[byte] & bit:
                journaled[byte] |= bit
                marked.append(index)
        self.journaled_count += len(marked)
        return marked

    def open_count(self) -> int:
        """The open units, each unit of an open pack counted."""
        return len(self.open_units) + sum(unit.count - 1 for unit in self.open_units.values()
                                          if unit.count)

    def unmark_range(self, first: int, count: int) -> list[int]:
        """Unmark the units ``first`` .. ``first + count - 1`` (a pack's); those that were marked."""
        return [index for index in range(first, first + count) if self.set_journaled(index, False)]

    def _grow_journaled(self, byte: int) -> None:
        """Room in the bitmap up to ``byte``, and half as much again (it grows with the task)."""
        if byte >= len(self.journaled):
            self.journaled.extend(bytes(byte + 1 - len(self.journaled) + len(self.journaled) // 2))

    def unmark(self, marked: list[int], size: int) -> None:
        """Undo ``set_journaled(i, True)`` for each of ``marked``; the bitmap back to ``size``."""
        for index in marked:
            self.set_journaled(index, False)
        del self.journaled[size:]

    def clear_open(self, undo: Undo | None = None) -> None:
        """Forget every open unit and what hangs on them (the task ended or restarts); the
        journal bits and the counters stay. The containers are replaced, not emptied, so that
        an undo only has to put the old ones back."""
        if not (self.open_units or self.held or self.kept or self.dependents or self.missing_for
                or self.steals or self.steal_pending):
            return  # nothing open (every plain Task): the pending and blocked are open units
        if undo is not None:
            undo.call(self._put_back_open, self._open_state())
            if self.carried:
                undo.call(setattr, self, "carried", self.carried)
        self.carried = set()
        self.pending, self.open_units, self.blocked, self.kept = deque(), {}, {}, {}
        self.held, self.dependents, self.missing_for, self.steals = {}, {}, {}, set()
        self.steal_pending = False

    def _open_state(self) -> _OpenState:
        return (self.pending, self.open_units, self.blocked, self.kept, self.held,
                self.dependents, self.missing_for, self.steals, self.steal_pending)

    def _put_back_open(self, saved: _OpenState) -> None:
        (self.pending, self.open_units, self.blocked, self.kept, self.held,
         self.dependents, self.missing_for, self.steals, self.steal_pending) = saved

    def validate(self, flying: Collection[int], finished: bool) -> None:
        """Raise AssertionError if the book does not hold; ``flying``: the open units dispatched
        to a worker, each listed once per worker that has it."""
        if finished:
            assert not self.pending and not self.open_units, "a finished task has open units"
        pending = {unit.index for unit in self.pending}
        assert len(pending) == len(self.pending), "a unit is queued twice"
        assert pending <= set(self.open_units), "a queued unit is not open"
        assert len(flying) == len(set(flying)), "a unit is on two workers"
        flown = set(flying)
        assert flown <= set(self.open_units), f"closed units {sorted(flown - set(self.open_units))[:5]} in flight"
        assert not pending & flown, "a unit is queued and in flight"
        blocked = set(self.blocked)
        assert not blocked & (pending | flown), "a blocked unit is queued or in flight"
        assert self.carried <= set(self.open_units), "a carried unit is not open"
        lost = set(self.open_units) - pending - flown - blocked
        assert not lost, f"units {sorted(lost)[:5]} are neither queued, running nor blocked"
        assert self.journaled_count == sum(bin(b).count("1") for b in self.journaled), \
            "journaled count disagrees with the bitmap"
        assert set(self.kept) >= set(self.held), "a held unit is not kept"


class NoUnits(UnitBook):
    """The book of every plain Task, one shared by all (a plain Task has no units: an empty book
    each would cost a queued task more than a kilobyte). Sealed: setting a field raises (a bug,
    which the scheduler's ``handle`` rolls back); ``validate`` checks its containers stay empty."""

    def __setattr__(self, name: str, value: object) -> None:
        if self.__dict__.get("_sealed"):
            raise AttributeError(f"a plain Task has no units (set {name})")
        super().__setattr__(name, value)

    def seal(self) -> NoUnits:
        self.__dict__["_sealed"] = True
        return self

    def check_empty(self) -> None:
        assert not (self.pending or self.open_units or self.blocked or self.kept or self.held
                    or self.dependents or self.missing_for or self.journaled or self.steals
                    or self.flying), \
            "a plain Task's shared book has units"


NO_UNITS = NoUnits().seal()
