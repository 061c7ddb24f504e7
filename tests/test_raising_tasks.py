"""A task that raises costs what a task that returns costs: its worker serves on, warm. Counted in
processes, not timed: the same worker pids before and after."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import Client, LocalCluster, ParallelTask, Task
from tests.conftest import alive, descendants, wait_until

pytestmark = pytest.mark.processes


class Pid(Task):
    def work(self, i):
        return os.getpid()


class Refuses(Task):
    def work(self, i):
        raise ValueError(f"input {i} refused")


class UnitRefuses(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        if i == 13:
            raise ValueError(f"unit input {i} refused")
        return os.getpid()


class Exits(Task):
    def work(self):
        sys.exit(3)


class RaisesOnce(Task):
    def work(self, marker):
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise ValueError("first try")
        return os.getpid()


@pytest.fixture
def warm() -> Iterator[tuple[LocalCluster, Client, set[int]]]:
    """A cluster of 2 workers, both warm for the client; the worker pids."""
    with LocalCluster(workers=2) as cluster, Client(cluster) as client:
        pids = {f.result(timeout=30) for f in client.map(Pid, range(40))}
        wait_until(lambda: len(pids | {f.result(30) for f in client.map(Pid, range(40))}) == 2,
                   30, "both workers to run a task")
        yield cluster, client, workers_of(cluster)


def workers_of(cluster: LocalCluster) -> set[int]:
    """The pids of the cluster's processes below its node (the master's grandchildren)."""
    return descendants(cluster.pid)


def test_fifty_raising_tasks_leave_the_same_worker_processes(
        warm: tuple[LocalCluster, Client, set[int]]) -> None:
    cluster, client, before = warm
    futures = client.map(Refuses, range(50))
    for i, fut in enumerate(futures):
        with pytest.raises(ValueError, match=f"input {i} refused"):
            fut.result(timeout=30)
    assert {f.result(timeout=30) for f in client.map(Pid, range(20))} <= before
    assert workers_of(cluster) == before


def test_a_raising_unit_leaves_the_same_worker_processes(
        warm: tuple[LocalCluster, Client, set[int]]) -> None:
    cluster, client, before = warm
    with pytest.raises(ValueError, match="unit input 13 refused"):
        client.submit(UnitRefuses, 200).result(timeout=30)
    assert set(client.submit(UnitRefuses, 10).result(timeout=30)) <= before
    assert workers_of(cluster) == before


def test_a_retry_runs_on_the_same_warm_worker(tmp_path: Path) -> None:
    with LocalCluster(workers=1) as cluster, Client(cluster) as client:
        first = client.submit(Pid, 0).result(timeout=30)
        retried = client.submit(RaisesOnce, str(tmp_path / "tried"), retries=1)
        assert retried.result(timeout=30) == first
        assert (tmp_path / "tried").exists()
        assert alive(first) and client.submit(Pid, 1).result(timeout=30) == first


def test_a_task_that_exits_gets_a_fresh_worker(warm: tuple[LocalCluster, Client, set[int]]) -> None:
    cluster, client, before = warm
    with pytest.raises(RuntimeError, match=r"raised SystemExit\(3\)"):
        client.submit(Exits).result(timeout=30)
    wait_until(lambda: not all(alive(p) for p in before), 30, "the exited task's worker to go")
    client.wait_for_workers(2)
    after = {f.result(timeout=30) for f in client.map(Pid, range(40))}
    assert after - before, "no fresh worker took the place of the one that ran sys.exit()"


def test_the_restart_option_replaces_the_worker_of_a_raising_task() -> None:
    with LocalCluster(workers=1, restart_after_error=True) as cluster, Client(cluster) as client:
        first = client.submit(Pid, 0).result(timeout=30)
        with pytest.raises(ValueError):
            client.submit(Refuses, 1).result(timeout=30)
        wait_until(lambda: not alive(first), 30, "the raising task's worker to be replaced")
        assert client.submit(Pid, 2).result(timeout=30) != first
