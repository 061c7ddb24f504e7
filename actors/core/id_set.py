"""``IdSet``: a set of ids that keeps them sorted for a walk in order.

A task's workers are walked in id order at every dispatch of its units (the least loaded
first, ties by id); a task may have a thousand of them and change them rarely, so the order is
kept in step with it rather than sorted again each time. Only ``add`` and ``discard`` change an
``IdSet`` (the undo log's reverse calls are the same two): the other in-place changes are
refused, so the kept order cannot go stale.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import NoReturn, cast


class IdSet(set[str]):
    __slots__ = ("_in_order",)

    def __init__(self, ids: Iterable[str] = ()) -> None:
        super().__init__(ids)
        self._in_order: list[str] | None = None

    def add(self, item: str) -> None:
        # Kept in step, not sorted again: a thousand workers join a task one by one, with a
        # dispatch (a walk in order) after each.
        if self._in_order is not None and item not in self:
            bisect.insort(self._in_order, item)
        set.add(self, item)

    def discard(self, item: object) -> None:
        if self._in_order is not None and item in self:
            in_order = self._in_order
            del in_order[bisect.bisect_left(in_order, cast(str, item))]  # (it is in: a str)
        set.discard(self, item)

    def in_order(self) -> list[str]:
        """The ids, sorted (the set's own list, kept in step with it: do not change it)."""
        if self._in_order is None:
            self._in_order = sorted(self)
        return self._in_order

    def _refused(self, *args: object) -> NoReturn:
        raise TypeError("an IdSet changes by add and discard only (its order is kept)")

    remove = pop = clear = update = _refused  # type: ignore[assignment]
    difference_update = intersection_update = symmetric_difference_update = _refused  # type: ignore[assignment]
    __ior__ = __iand__ = __isub__ = __ixor__ = _refused  # type: ignore[assignment]
