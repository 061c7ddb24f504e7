"""TaskContainer: Pydra's container of child tasks, as units with dependencies (real processes)."""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path

import pytest

from actors import Client, MapReduceTask, Task, TaskContainer
from actors.datasources import byte_ranges, files, read_lines
from actors.errors import InvalidArguments
from tests.conftest import wait_until

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


class Counts(Task):
    """Counts slowly with progress; leaves a mark in ``finally`` (its result: the marks folder)."""

    def work(self, marks):
        try:
            for i in range(6_000):
                self.task_progress(i, 6_000)
                time.sleep(0.01)
        finally:
            Path(marks, "child2-finally").touch()
        return marks


class Marks(Task):
    def work(self, marks):
        Path(marks, "child3-ran").touch()
        return marks


class Passes(Task):
    def work(self, marks):
        return marks


class CancelledInTheMiddle(TaskContainer):
    children = [Passes, Counts, Marks]


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


def test_a_cancel_during_child_2_stops_it_and_child_3_never_starts(client: Client,
                                                                   tmp_path: Path) -> None:
    fut = client.submit(CancelledInTheMiddle, str(tmp_path))
    wait_until(lambda: any(e[2] == "executing" and e[0].endswith(":1") for e in client.story(fut)),
               30, "child 2 to run")
    assert fut.cancel(timeout=20) is True
    wait_until(lambda: (tmp_path / "child2-finally").exists(), 20, "child 2's finally: to run")
    wait_until(lambda: any(e[2] in ("stopped", "killed") for e in client.story(fut)
                           if e[0].startswith("worker")), 20, "its worker to stop")
    assert not (tmp_path / "child3-ran").exists()
    assert ("worker", "stopped") in {(e[0].split()[0], e[2]) for e in client.story(fut)}


def test_a_container_checks_its_arguments_against_its_first_child(client: Client) -> None:
    with pytest.raises(InvalidArguments, match="missing a required argument"):
        client.submit(Pipeline)
    with pytest.raises(TypeError, match="non-empty list of Task classes"):
        client.submit(Empty, 1)


class WordCount(MapReduceTask):
    partitions = 3

    def map_input(self, pattern, chunk_bytes):
        yield from byte_ranges(files(pattern), chunk_bytes=chunk_bytes)

    def map(self, part):
        for line in read_lines(part):
            for word in line.split():
                yield word, 1

    def reduce_partition(self, word, counts):
        return sum(counts)


def test_map_reduce_counts_words_exactly_over_files_split_by_byte_ranges(
        client: Client, tmp_path: Path) -> None:
    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(200)]
    expected: Counter[str] = Counter()
    for f in range(3):
        rows = [" ".join(rng.choices(vocabulary, k=rng.randrange(0, 12))) for _ in range(3_000)]
        expected.update(word for row in rows for word in row.split())
        (tmp_path / f"text{f}.txt").write_text("\n".join(rows) + "\n")
    fut = client.submit(WordCount, str(tmp_path / "text*.txt"), 8 << 10)
    assert fut.result(timeout=120) == dict(expected)
    maps = fut.progress()[0] - WordCount.partitions
    assert maps > 3  # the files were split: several map units per file
