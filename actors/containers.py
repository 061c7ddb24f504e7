"""``TaskContainer``: Pydra's container of child tasks, on the unit and dependency paths.

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
children; cancelling the container cancels the child that runs. No second scheduler: the
children are units, their results stay on the workers that made them until the next needs it.
"""

from __future__ import annotations

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
