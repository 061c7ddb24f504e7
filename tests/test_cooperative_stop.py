"""A cancel asks a task's code to stop before it kills (real processes, real files).

``cancel()`` sets the task's stop flag (``task_stop_requested``; ``task_progress`` raises
``TaskStopped``): code that stops in time runs its ``finally:`` blocks and its worker serves on,
warm; code that does not is killed with its worker after the grace.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from actors import Client, LocalCluster, ParallelTask, Task
from actors.errors import TaskCancelled
from tests.conftest import alive, wait_until

pytestmark = pytest.mark.processes


def _mark(marks: str, name: str) -> None:
    with open(os.path.join(marks, f"{name}-{os.getpid()}"), "w"):
        pass


def _marked(marks: Path, name: str) -> set[int]:
    """The pids that left a mark of this name."""
    return {int(p.name.rsplit("-", 1)[1]) for p in marks.glob(f"{name}-*")}


class Pid(Task):
    def work(self):
        return os.getpid()


class Counting(Task):
    """Pydra's counting task: a step at a time, with progress, and a ``finally`` to clean up."""

    def work(self, marks, steps=6_000):
        try:
            for i in range(steps):
                self.task_progress(i, steps)
                time.sleep(0.01)
            return "counted to the end"
        finally:
            _mark(marks, "finally")
            print("cleaned up after", i + 1, "steps")  # (after the cancel: still the user's)


class Stuck(Task):
    """Never looks at its stop flag."""

    def work(self, marks):
        _mark(marks, "began")
        try:
            time.sleep(3600)
        finally:
            _mark(marks, "finally")


class Polls(ParallelTask):
    """Units that wait, polling the stop flag, up to a minute."""

    def get_work(self, n, marks):
        for i in range(n):
            yield i, marks

    def work_unit(self, unit):
        i, marks = unit
        _mark(marks, f"began{i}")
        deadline = time.monotonic() + 60
        while not self.task_stop_requested and time.monotonic() < deadline:
            time.sleep(0.01)
        _mark(marks, "saw-stop")
        return i


def _story(client: Client, fut, key_part: str) -> list[tuple[str, str, str, str, float]]:
    return [e for e in client.story(fut) if key_part in e[0]]


def test_a_task_that_stops_in_time_runs_its_finally_and_its_worker_serves_on(
        tmp_path: Path) -> None:
    with LocalCluster(workers=1) as cl, Client(cl) as client:
        client.wait_for_workers(1)
        pid = client.submit(Pid).result(timeout=30)
        fut = client.submit(Counting, str(tmp_path))
        wait_until(lambda: fut.progress()[0] > 3, 30, "the count to begin")
        assert fut.cancel(timeout=20) is True
        with pytest.raises(TaskCancelled):
            fut.result(timeout=1)
        wait_until(lambda: _marked(tmp_path, "finally"), 20, "its finally: block to run")
        assert _marked(tmp_path, "finally") == {pid}
        wait_until(lambda: any("cleaned up after" in line.text for line in fut.logs()), 20,
                   "what its finally: block printed to reach the client")
        wait_until(lambda: any(e[2] == "stopped" for e in _story(client, fut, "worker")), 20,
                   "the worker to say the code stopped")
        # The same process, warm, runs the next task: it was never killed.
        assert client.submit(Pid).result(timeout=30) == pid
        assert alive(pid)


def test_code_that_does_not_stop_within_the_grace_is_killed_with_its_worker(
        tmp_path: Path) -> None:
    with LocalCluster(workers=1) as cl, Client(cl) as client:
        client.wait_for_workers(1)
        pid = client.submit(Pid).result(timeout=30)
        fut = client.submit(Stuck, str(tmp_path))
        wait_until(lambda: _marked(tmp_path, "began"), 30, "the stuck task to begin")
        assert fut.cancel(timeout=20, grace=1.0) is True
        wait_until(lambda: not alive(pid), 20, "the worker to be killed after the grace")
        assert not _marked(tmp_path, "finally")  # killed, not stopped: no finally ran
        assert [e[2] for e in _story(client, fut, "worker")][-2:] == ["stopping", "killed"]
        assert client.submit(Pid).result(timeout=30) != pid  # a fresh worker serves


def test_running_units_see_the_stop_the_queued_never_begin_and_the_workers_serve_on(
        tmp_path: Path) -> None:
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        fut = client.submit(Polls, 20, str(tmp_path))
        began = lambda: {i for i in range(20) if _marked(tmp_path, f"began{i}")}  # noqa: E731
        wait_until(lambda: len(began()) == 2, 30, "a unit to begin on each worker")
        pids = {p for i in began() for p in _marked(tmp_path, f"began{i}")}
        assert len(pids) == 2
        running = began()
        assert fut.cancel(timeout=20) is True
        wait_until(lambda: _marked(tmp_path, "saw-stop") == pids, 20,
                   "each running unit to see the stop")
        wait_until(lambda: sum(e[2] == "stopped" for e in _story(client, fut, "worker")) == 2,
                   20, "both workers to say their code stopped")
        assert began() == running  # what was queued on them never began
        story = client.story(fut)
        assert {e[0] for e in story if e[2] == "cancelled"} >= {f"unit {i}" for i in running}
        assert all(alive(p) for p in pids)
        assert {client.submit(Pid).result(timeout=30) for _ in range(4)} <= pids


def test_a_grace_out_of_range_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    with LocalCluster(workers=1) as cl, Client(cl) as client:
        client.wait_for_workers(1)
        fut = client.submit(Stuck, str(tmp_path))
        for bad in (-1, float("nan"), float("inf"), 10_000, "5", True):
            with pytest.raises(ValueError, match="grace"):
                fut.cancel(grace=bad)  # type: ignore[arg-type]
        assert not fut.done()
        assert fut.cancel(timeout=20, grace=0) is True
