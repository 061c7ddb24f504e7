"""``client.map_batch(task, items)``: a map of small tasks run as the work units of one
ParallelTask (``MapOf``) instead of one task instance each.

A plain task instance costs the master its own record, queue entry, assignment, result
message and story (~60 us of its CPU on 2 cores, bench/README.md); units go in packs and
ranges for ~0.3 us each. Here each item is a unit: the driver slices the items' indices, every
worker of the task holds the items themselves (the task's arguments), and ``work_unit`` runs
the user's task on one item, catching what it raises so that one item's error fails that item
alone (``ItemFailed``), not the map. The map's result is every item's outcome, in order; the
client hands each to its item's future (``item_futures.ItemFuture``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors.errors import TaskStopped
from actors.serialize import SCALARS, describe_failure, dumps, loads, not_serializable
from actors.task import ParallelTask, Task


class ItemFailed:
    """What an item raised, described as a plain task's failure is (``describe_failure``):
    the client raises it from the item's future as it would from a task's."""

    __slots__ = ("payload", "type_name", "message", "traceback")

    def __init__(self, payload: bytes, type_name: str, message: str, traceback: str) -> None:
        self.payload = payload
        self.type_name = type_name
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return ItemFailed, (self.payload, self.type_name, self.message, self.traceback)

    def __repr__(self) -> str:
        return f"ItemFailed({self.type_name}: {self.message[:80]})"


class Pickled:
    """An item's value pickled where it was made (``dumps``), to load as itself: a value that
    cannot be pickled fails its item there (``ResultNotSerializable``), not its whole run of
    units, and the bytes are made once (the unit's own pickle copies them)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __reduce__(self) -> tuple[Any, ...]:
        return loads, (self.data,)


class MapOf(ParallelTask):
    """Runs ``task`` (a Task class or a function, pickled as a task's code or not) on each item
    of ``items`` (positional argument tuples, with ``kwargs`` for every one), each item a unit;
    an item that raises is run again up to ``retries`` times where it is, then its error is its
    outcome."""

    _task_call: Callable[[int], Any] | None = None
    _task_join_error: BaseException | None = None  # why this worker could not hold the items

    def task_total(self, code: Any, items: list[tuple[Any, ...]], kwargs: dict[str, Any],
                   retries: int) -> int:
        return len(items)

    def get_work(self, code: Any, items: list[tuple[Any, ...]], kwargs: dict[str, Any],
                 retries: int) -> range:
        self._task_join(code, items, kwargs, retries)
        if self._task_join_error is not None:
            raise self._task_join_error
        return range(len(items))

    def _task_join(self, code: Any, items: list[tuple[Any, ...]], kwargs: dict[str, Any],
                   retries: int) -> None:
        """Every worker of the map (its driver here, a helper from the runtime) holds the items:
        a unit is an index, a pack of units a list of them. ``code``: the task, or its pickle
        as a task's code is shipped (``serialize.dumps_task_class``). Never raises: a helper's
        units, or the driver's slicer, say why it could not."""
        try:
            task = loads(code) if isinstance(code, bytes) else code
        except Exception as exc:
            self._task_join_error = exc
            return
        stop = self._task_stop
        map_id = self.task_id

        if isinstance(task, type) and issubclass(task, Task):
            def call(index: int) -> Any:
                instance = task()
                instance.task_id = f"{map_id}#{index}"
                instance._task_stop = stop  # the map's cancel is its items'
                instance._task_reports_progress = False  # the map's progress counts items
                return instance.work(*items[index], **kwargs)
        else:
            def call(index: int) -> Any:
                return task(*items[index], **kwargs)

        tries = 1 + max(0, retries)
        name = getattr(task, "__qualname__", None) or repr(task)

        def run(index: int) -> Any:
            for left in range(tries - 1, -1, -1):
                try:
                    value = call(index)
                    if type(value) in SCALARS:
                        return value
                    try:
                        return Pickled(dumps(value))
                    except Exception as exc:  # (raised as the task's result would be)
                        raise not_serializable(value, exc, name, str(index)) from None
                except BaseException as exc:
                    # The map cancelled, its worker interrupted or out of memory: the unit's (the
                    # map fails, the worker is replaced). ``sys.exit()`` in an item fails that
                    # item, as it fails a task (a RuntimeError caused by it); the worker serves
                    # on: only its own code's exit was asked for, not the process's.
                    if isinstance(exc, TaskStopped | MemoryError | KeyboardInterrupt):
                        raise
                    if left:
                        continue
                    return ItemFailed(*describe_failure(exc))
            raise AssertionError("unreachable")  # (tries >= 1)

        self._task_call = run

    def work_unit(self, index: int) -> Any:
        call = self._task_call
        if call is None:
            raise RuntimeError(f"this worker of the map holds no items: {self._task_join_error!r}"
                               ) from self._task_join_error
        if type(index) is not int:
            raise TypeError(f"a MapOf unit is an item's index, not {index!r}")
        return call(index)

    def reduce(self, results: list[Any]) -> list[Any]:
        return results
