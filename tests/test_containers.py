"""TaskContainer: Pydra's container of child tasks, as units with dependencies (real processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from actors import Client, Task, TaskContainer
from actors.errors import InvalidArguments

pytestmark = pytest.mark.processes


class Double(Task):
    def work(self, x):
        return 2 * x


class AddOne(Task):
    def work(self, x):
        return x + 1


class Square(Task):
    def work(self, x):
        return x * x


class Fails(Task):
    def work(self, x):
        raise ValueError(f"child 2 cannot take {x}")


class Pipeline(TaskContainer):
    children = [Double, AddOne, Square]


class FiveSquares(TaskContainer):
    children = [Square] * 5
    sequential = False


class Empty(TaskContainer):
    children = []


def test_a_sequential_container_chains_each_childs_result_into_the_next(client: Client) -> None:
    fut = client.submit(Pipeline, 3)
    assert fut.result(timeout=60) == (2 * 3 + 1) ** 2
    assert fut.progress() == (3, 3)


def test_a_parallel_container_runs_its_children_side_by_side(client: Client) -> None:
    assert client.submit(FiveSquares, 4).result(timeout=60) == [16] * 5


def test_a_failing_child_stops_the_container_and_later_children_never_start(
        client: Client, tmp_path: Path) -> None:
    def marking(path: Path) -> type[Task]:
        class Marks(Task):  # shipped by value, with the path it marks
            def work(self, x):
                path.touch()
                return x
        return Marks

    class Control(TaskContainer):  # the marker works: a child after a good one runs
        children = [Double, marking(tmp_path / "ran")]

    class FailsInTheMiddle(TaskContainer):
        children = [Double, Fails, marking(tmp_path / "never")]

    assert client.submit(Control, 1).result(timeout=60) == 2
    assert (tmp_path / "ran").exists()
    fut = client.submit(FailsInTheMiddle, 5)
    with pytest.raises(ValueError, match="child 2 cannot take 10"):
        fut.result(timeout=60)
    assert not (tmp_path / "never").exists()


def test_a_container_checks_its_arguments_against_its_first_child(client: Client) -> None:
    with pytest.raises(InvalidArguments, match="missing a required argument"):
        client.submit(Pipeline)
    with pytest.raises(TypeError, match="non-empty list of Task classes"):
        client.submit(Empty, 1)
