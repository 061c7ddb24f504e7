"""``TaskContainer`` and ``MapReduceTask`` as the units they become, called in this process: the
units and their dependencies, what each unit runs, what ``reduce`` returns. The process tests
(test_containers.py) run them on a cluster; these check each rule on its own."""

from __future__ import annotations

import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors import MapReduceTask, ParallelTask, Task, TaskContainer
from actors.task import StopFlag


class Double(Task):
    def work(self, x: int, step: int = 1) -> int:
        return 2 * x * step


class AddOne(Task):
    def work(self, x: int, step: int = 1) -> int:
        return x + step


class Pipeline(TaskContainer):
    children = [Double, AddOne, Double]


class SideBySide(TaskContainer):
    children = [Double, AddOne]
    sequential = False


def run_units(task: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a ParallelTask's units in the order yielded, each given its dependencies' results,
    then ``reduce`` of the results no unit depends on: what a cluster does, in one process."""
    units = list(task.get_work(*args, **kwargs))
    for index, unit in enumerate(units):
        unit.index = index
    results: dict[int, Any] = {}
    depended = {dep.index for unit in units for dep in unit.after}
    for unit in units:
        results[unit.index] = task.work_unit(unit.arg, *(results[d.index] for d in unit.after))
    return task.reduce([results[u.index] for u in units if u.index not in depended])


def test_a_sequential_container_chains_its_children_each_unit_after_the_one_before() -> None:
    pipeline = Pipeline()
    units = list(pipeline.get_work(5))
    assert [unit.arg for unit in units] == [(0, (5,), {}), (1, (), {}), (2, (), {})]
    assert [unit.after for unit in units] == [(), (units[0],), (units[1],)]
    assert run_units(Pipeline(), 5) == 22  # ((5 * 2) + 1) * 2
    assert pipeline.task_total(5) == 3


def test_side_by_side_every_child_takes_the_containers_arguments_and_the_result_is_a_list(
) -> None:
    units = list(SideBySide().get_work(5, step=3))
    assert [unit.arg for unit in units] == [(0, (5,), {"step": 3}), (1, (5,), {"step": 3})]
    assert all(unit.after == () for unit in units)
    assert run_units(SideBySide(), 5) == [10, 6]
    assert run_units(SideBySide(), x=5, step=3) == [30, 8]  # keywords reach every child


def test_a_child_runs_as_the_containers_task_and_stops_with_it() -> None:
    seen: list[tuple[str, bool, bool]] = []

    class Looks(Task):
        def work(self, x: int) -> int:
            seen.append((self.task_id, self.task_stop_requested, self._task_reports_progress))
            return x

    class Holds(TaskContainer):
        children = [Looks]

    holds = Holds()
    holds.task_id, holds._task_stop = "container-1", StopFlag()  # (as its worker sets them)
    holds.work_unit((0, (1,), {}))
    holds._task_stop.set()  # the container is cancelled: the child it runs is asked to stop
    holds.work_unit((0, (1,), {}))
    assert seen == [("container-1", False, False), ("container-1", True, False)]


@pytest.mark.parametrize("children", [[], [Double, "not a class"], [Double, ParallelTask], [int]],
                         ids=["none", "not a class", "a ParallelTask", "not a Task"])
def test_children_must_be_a_non_empty_list_of_task_classes(children: list[Any]) -> None:
    class Bad(TaskContainer):
        pass

    Bad.children = children
    with pytest.raises(TypeError, match=r"Bad\.children is a non-empty list of Task classes"):
        list(Bad().get_work(1))


def test_a_container_takes_its_first_childs_arguments() -> None:
    assert Pipeline.task_entry() == Double.task_entry()


class WordCount(MapReduceTask):
    partitions = 3

    def map_input(self, texts: list[str], skip: str = "") -> Iterator[str]:
        yield from (text for text in texts if text != skip)

    def map(self, text: str) -> Iterator[tuple[str, int]]:
        for word in text.split():
            yield word, 1

    def reduce_partition(self, key: str, values: list[int]) -> str:
        return f"{key}={sum(values)}"


def test_map_reduce_reduces_each_key_once_in_its_partition() -> None:
    texts = ["a b a", "c a", "b"]
    wc = WordCount()
    units = list(wc.get_work(texts))
    maps, reduces = units[:3], units[3:]
    assert [unit.arg for unit in maps] == [("map", t) for t in texts]
    assert [unit.arg for unit in reduces] == [("reduce", p) for p in range(3)]
    assert all(unit.after == tuple(maps) for unit in reduces)
    expected: dict[int, dict[str, list[int]]] = {}
    for key, values in (("a", [1, 1]), ("b", [1])):
        expected.setdefault(wc.partition(key), {})[key] = values
    assert wc.work_unit(("map", "a b a")) == expected  # a map's pairs, grouped by partition
    assert run_units(WordCount(), texts) == {"a": "a=3", "b": "b=2", "c": "c=1"}
    assert run_units(WordCount(), texts, skip="c a") == {"a": "a=2", "b": "b=2"}

    class OnePartition(WordCount):
        partitions = 1

    assert run_units(OnePartition(), texts) == {"a": "a=3", "b": "b=2", "c": "c=1"}


def test_a_keys_partition_is_the_same_in_every_interpreter() -> None:
    """Map units on different workers must send a key to the same reduce unit: a CRC of its
    ``repr``, not ``hash`` (salted per process for strings)."""
    here = [WordCount().partition(key) for key in ("a", "word", ("t", 1))]
    assert here == [zlib.crc32(repr(key).encode()) % 3 for key in ("a", "word", ("t", 1))]
    other = subprocess.run(
        [sys.executable, "-c", "from tests.test_container_units import WordCount\n"
         "print([WordCount().partition(k) for k in ('a', 'word', ('t', 1))])"],
        capture_output=True, text=True, timeout=60, check=True,
        env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"}, cwd=str(_root()))
    assert other.stdout.strip() == str(here)


def test_map_reduce_needs_a_partition_and_its_own_input_and_map() -> None:
    class NoPartitions(WordCount):
        partitions = 0

    with pytest.raises(ValueError, match="partitions must be at least 1, not 0"):
        list(NoPartitions().get_work([]))

    class Nothing(MapReduceTask):
        pass

    with pytest.raises(NotImplementedError, match="Nothing must define map_input"):
        list(Nothing().get_work())
    with pytest.raises(NotImplementedError, match="Nothing must define map"):
        Nothing().work_unit(("map", 1))
    assert Nothing().reduce_partition("k", [1, 2]) == [1, 2]  # by default: the values, as mapped
    assert WordCount.task_entry() == WordCount.map_input


def _root() -> Path:
    return Path(__file__).resolve().parent.parent
