"""``IdSet``: a set of ids that keeps them sorted for a walk in order, until it changes.

A task's workers are walked in id order at every dispatch of its units (the least loaded
first, ties by id); a task may have a thousand of them and change them rarely, so the order is
kept rather than sorted again each time. Only ``add`` and ``discard`` change an ``IdSet`` (the
undo log's reverse calls are the same two): the other in-place changes are refused, so the
kept order cannot go stale.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn


class IdSet(set[str]):
    __slots__ = ("_in_order",)

    def __init__(self, ids: Iterable[str] = ()) -> None:
        super().__init__(ids)
        self._in_order: list[str] | None = None

    def add(self, item: str) -> None:
        set.add(self, item)
        self._in_order = None

    def discard(self, item: object) -> None:
        set.discard(self, item)
        self._in_order = None

    def in_order(self) -> list[str]:
        """The ids, sorted (the same list until the set changes: do not change it)."""
        if self._in_order is None:
            self._in_order = sorted(self)
        return self._in_order

    def _refused(self, *args: object) -> NoReturn:
        raise TypeError("an IdSet changes by add and discard only (its order is kept)")

    remove = pop = clear = update = _refused  # type: ignore[assignment]
    difference_update = intersection_update = symmetric_difference_update = _refused  # type: ignore[assignment]
    __ior__ = __iand__ = __isub__ = __ixor__ = _refused  # type: ignore[assignment]
