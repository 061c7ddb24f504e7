"""An undo log: how to put back what one ``handle()`` call of a core changed.

A core that must be all-or-nothing records, before each change, the call that reverses it;
``rollback`` runs them backwards. The records are cheap (a tuple appended to a list), and the
hot paths record per batch rather than per item (a list registered once and filled as the loop
goes), so that a raise part-way through a loop is undone as far as it got.

No I/O, no clock; one ``Undo`` per core, emptied by ``commit`` at the end of every call.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, MutableSet
from typing import Any, TypeVar

K = TypeVar("K")
V = TypeVar("V")
T = TypeVar("T")

MISSING: Any = object()  # "no entry" where an entry's old value is recorded


def restore(mapping: MutableMapping[Any, Any], key: object, value: object) -> None:
    """``put`` undone: the entry back to ``value`` (``MISSING``: to no entry). Hot paths
    record it themselves (``record((restore, (mapping, key, old)))``), as ``put`` would."""
    if value is MISSING:
        mapping.pop(key, None)
    else:
        mapping[key] = value



class Undo:
    __slots__ = ("_ops", "record", "commit")

    def __init__(self) -> None:
        self._ops: list[tuple[Callable[..., object], tuple[object, ...]]] = []
        #: ``record((reverse, args))``: ``call(reverse, *args)`` without a Python call of its
        #: own (the list's bound ``append``), for the records every task makes
        self.record = self._ops.append
        #: ``commit()``: the changes stand, the records go (the list's bound ``clear``: the end
        #: of every event's handling, twice a task)
        self.commit = self._ops.clear

    def __len__(self) -> int:
        return len(self._ops)

    def call(self, reverse: Callable[..., object], *args: object) -> None:
        """Record ``reverse(*args)``: the call that puts back a change about to be made."""
        self._ops.append((reverse, args))

    def put(self, mapping: MutableMapping[K, V], key: K, value: V) -> None:
        """``mapping[key] = value``, undone to the old value (or to no entry)."""
        self._ops.append((restore, (mapping, key, mapping.get(key, MISSING))))
        mapping[key] = value

    def pop(self, mapping: MutableMapping[K, V], key: K) -> V | None:
        """``mapping.pop(key, None)``, undone by putting the entry back."""
        value = mapping.pop(key, MISSING)
        if value is MISSING:
            return None
        self._ops.append((restore, (mapping, key, value)))
        return value  # type: ignore[no-any-return]

    def add(self, items: MutableSet[T], item: T) -> None:
        if item not in items:
            items.add(item)
            self._ops.append((items.discard, (item,)))

    def discard(self, items: MutableSet[T], item: T) -> None:
        if item in items:
            items.discard(item)
            self._ops.append((items.add, (item,)))

    def set(self, obj: object, name: str, value: object) -> None:
        """``setattr(obj, name, value)``, undone to the old value."""
        self._ops.append((setattr, (obj, name, getattr(obj, name))))
        setattr(obj, name, value)

    def rollback(self) -> None:
        """Undo every recorded change, newest first."""
        ops = self._ops
        while ops:
            reverse, args = ops.pop()
            reverse(*args)

