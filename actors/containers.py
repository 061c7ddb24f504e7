"""``TaskContainer`` and ``MapReduceTask``: Pydra's composite tasks, on the unit and dependency
paths (no second scheduler).

Subclass it and list the children (plain ``Task`` classes)::

    class Pipeline(TaskContainer):
        children = [Fetch, Clean, Summarise]      # Fetch(args) -> Clean(its result) -> ...

    class FiveCounts(TaskContainer):
        children = [Count] * 5
        sequential = False                          # side by side; the result is the list

Sequential (the default): each child runs as one unit that depends on the previous one, so its
``work`` receives the previous child's result (the first child receives the container's
arguments), a child that fails fails the container at once and the later children never start,
and the result is the last child's. Parallel: every child runs on the container's arguments on
any worker, and the result is the list of their results in order. Progress counts the
children; cancelling the container asks the child that runs to stop (its
``task_stop_requested``, ``TaskStopped`` at its next ``task_progress``) and no later child starts. No second scheduler: the
children are units, their results stay on the workers that made them until the next needs it.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

from actors.task import ParallelTask, Task, Unit


class TaskContainer(ParallelTask):
    #: The child Task classes, in order.
    children: ClassVar[Sequence[type[Task]]] = ()
    #: One after another, each taking the previous one's result (True), or side by side.
    sequential: ClassVar[bool] = True

    def get_work(self, *args: Any, **kwargs: Any) -> Iterator[Unit]:
        children = self._task_children()
        previous: Unit | None = None
        for index in range(len(children)):
            if self.sequential and previous is not None:
                unit = Unit((index, (), {}), after=[previous])
            else:
                unit = Unit((index, args, kwargs))
            previous = unit
            yield unit

    def work_unit(self, item: tuple[int, tuple[Any, ...], dict[str, Any]], *inputs: Any) -> Any:
        index, args, kwargs = item
        child = self._task_children()[index]()
        child.task_id = self.task_id
        child._task_stop = self._task_stop  # a cancel of the container stops the child it runs
        child._task_reports_progress = False  # the container's progress counts its children
        return child.work(*inputs) if inputs else child.work(*args, **kwargs)

    def reduce(self, results: list[Any]) -> Any:
        return results[-1] if self.sequential else list(results)

    def task_total(self, *args: Any, **kwargs: Any) -> int:
        return len(self._task_children())

    @classmethod
    def task_entry(cls) -> Callable[..., Any]:
        """The arguments a container takes are its first child's (all children's, side by side)."""
        return cls._task_children()[0].task_entry()

    @classmethod
    def _task_children(cls) -> Sequence[type[Task]]:
        children = cls.children
        bad = [c for c in children if not (isinstance(c, type) and issubclass(c, Task))
               or issubclass(c, ParallelTask)]
        if not children or bad:
            raise TypeError(f"{cls.__qualname__}.children is a non-empty list of Task classes "
                            f"(not ParallelTasks: a child runs as one unit), not {list(children)!r}")
        return children


class MapReduceTask(ParallelTask):
    """Map units over an input, a partition per key, one reduce unit per partition::

        class WordCount(MapReduceTask):
            partitions = 4
            def map_input(self, pattern):
                yield from byte_ranges(files(pattern))
            def map(self, part):
                for line in read_lines(part):
                    for word in line.split():
                        yield word, 1
            def reduce_partition(self, word, counts):
                return sum(counts)

    The map results stay on the workers that made them (grouped by partition); each reduce
    unit fetches them from there (worker to worker through the nodes, never through the master)
    and reduces the keys of its partition; the task's result is ``{key: reduced value}``.
    ``partition(key)`` is stable across processes (a CRC of the key's ``repr``, not ``hash``,
    which differs from one interpreter to the next)."""

    partitions: ClassVar[int] = 4

    def map_input(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        raise NotImplementedError(f"{type(self).__qualname__} must define map_input()")

    def map(self, item: Any) -> Iterator[tuple[Any, Any]]:
        raise NotImplementedError(f"{type(self).__qualname__} must define map()")

    def reduce_partition(self, key: Any, values: list[Any]) -> Any:
        return values

    def partition(self, key: Any) -> int:
        return zlib.crc32(repr(key).encode()) % self.partitions

    def get_work(self, *args: Any, **kwargs: Any) -> Iterator[Unit]:
        if self.partitions < 1:
            raise ValueError(f"partitions must be at least 1, not {self.partitions}")
        maps = [Unit(("map", item)) for item in self.map_input(*args, **kwargs)]
        yield from maps
        for index in range(self.partitions):
            yield Unit(("reduce", index), after=maps)

    def work_unit(self, unit: tuple[str, Any], *mapped: dict[int, dict[Any, list[Any]]]) -> Any:
        kind, item = unit
        if kind == "map":
            groups: dict[int, dict[Any, list[Any]]] = {}
            for key, value in self.map(item):
                groups.setdefault(self.partition(key), {}).setdefault(key, []).append(value)
            return groups
        merged: dict[Any, list[Any]] = {}
        for groups in mapped:
            for key, values in groups.get(item, {}).items():
                merged.setdefault(key, []).extend(values)
        return {key: self.reduce_partition(key, values) for key, values in merged.items()}

    def reduce(self, results: list[Any]) -> Any:
        out: dict[Any, Any] = {}
        for part in results:
            out.update(part)
        return out

    @classmethod
    def task_entry(cls) -> Callable[..., Any]:
        return cls.map_input
