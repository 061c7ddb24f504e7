"""Work spreads over every idle worker, and a better task gets one as soon as a unit ends (issue 13).

Real processes on loopback. Units wait at gate files the test opens, and record where they run;
the test waits on those marks with deadlines, so what it asserts are counts, never times.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest

from actors import Client, LocalCluster, ParallelTask, Task
from tests.conftest import result_or_logs, wait_until

pytestmark = pytest.mark.processes

GATE_TIMEOUT_S = 60.0


def wait_for_gate(gate: Path) -> None:
    deadline = time.monotonic() + GATE_TIMEOUT_S
    while not gate.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} not opened within {GATE_TIMEOUT_S}s")
        time.sleep(0.005)


class Gated(ParallelTask):
    """Unit ``i`` marks that it started (``started-i``), waits at its gate (``gates[i]``), and
    returns the pid of the worker that ran it."""

    def get_work(self, folder, gates):
        for i, gate in enumerate(gates):
            yield i, folder, gate

    def work_unit(self, arg):
        i, folder, gate = arg
        (Path(folder) / f"started-{i}").write_text(str(os.getpid()))
        wait_for_gate(Path(folder) / gate)
        return os.getpid()

    def reduce(self, results):
        return list(results)


class Pid(Task):
    def work(self):
        return os.getpid()


class GatedPid(Task):
    """Marks that it started (``started-task``), waits at ``gate``, returns its worker's pid."""

    def work(self, folder, gate):
        (Path(folder) / "started-task").write_text(str(os.getpid()))
        wait_for_gate(Path(folder) / gate)
        return os.getpid()


class FirstShort(Gated):
    """Unit 0 takes 20 ms and waits at no gate: measured, it makes the units go out two at a
    time per worker (so a unit can wait behind another on a worker)."""

    def work_unit(self, arg):
        i, folder, gate = arg
        if not gate:
            (Path(folder) / f"started-{i}").write_text(str(os.getpid()))
            time.sleep(0.02)
            return os.getpid()
        return super().work_unit(arg)


def started(folder: Path) -> dict[int, int]:
    """Unit index -> the pid that started it."""
    marks = {}
    for mark in folder.glob("started-[0-9]*"):
        text = mark.read_text()
        if text:
            marks[int(mark.name.split("-")[1])] = int(text)
    return marks


@pytest.fixture
def three_workers(tmp_path: Path):
    # A local cluster logs to this process's stderr: on a hang, result_or_logs shows the story.
    with LocalCluster(workers=3) as cl, Client(cl) as client:
        client.wait_for_workers(3)
        yield client, tmp_path


def test_six_units_on_three_workers_run_two_on_each(three_workers, tmp_path: Path) -> None:
    """Units 0-2 wait at gate a, units 3-5 at gate b. A worker runs one unit at a time, so the
    first three start on three workers; once gate a opens, the next three do too (a unit queued
    behind a waiting one is stolen by the worker that is free)."""
    client, logs = three_workers
    folder = tmp_path / "gates"
    folder.mkdir()
    future = client.submit(Gated, folder=str(folder), gates=["a"] * 3 + ["b"] * 3)
    first = wait_until(lambda: len(started(folder)) == 3 and started(folder), 30,
                       "three units to start")
    assert sorted(first) == [0, 1, 2]
    assert len(set(first.values())) == 3, f"two units started on one worker: {first}"
    (folder / "a").touch()
    wait_until(lambda: len(started(folder)) == 6, 30, "the other three units to start")
    (folder / "b").touch()
    pids = result_or_logs(future, 60, logs)
    assert sorted(Counter(pids).values()) == [2, 2, 2], Counter(pids)


def test_a_better_task_gets_a_worker_before_the_long_task_ends(three_workers, tmp_path: Path) -> None:
    """A low-priority task holds all three workers, its units waiting at gates. A high-priority
    task submitted then runs on the first helper whose unit ends, while the long task goes on."""
    client, logs = three_workers
    folder = tmp_path / "gates"
    folder.mkdir()
    long = client.submit(Gated, folder=str(folder), gates=["first"] * 3 + ["rest"] * 6, priority=0)
    wait_until(lambda: len(started(folder)) == 3, 30, "the long task to hold every worker")
    urgent = client.submit(Pid, priority=1)
    # Queued at the master before any unit ends (else the next units could take every worker
    # first, and then wait at "rest" for the urgent task to end: a deadlock of the test's own).
    wait_until(lambda: client.info().tasks_queued == 1, 30, "the master to queue the urgent task")
    (folder / "first").touch()  # three units end; the next ones wait at "rest"
    pid = result_or_logs(urgent, 60, logs)
    assert not long.done(), "the long task ended: nothing was shown"
    (folder / "rest").touch()
    pids = result_or_logs(long, 60, logs)
    assert len(pids) == 9
    assert pid in set(pids), "the better task ran on a worker that is not one of the long task's"


def test_a_unit_queued_behind_a_long_one_is_stolen_by_a_worker_that_comes_free(
        three_workers, tmp_path: Path) -> None:
    """A plain Task holds one worker; a ParallelTask gets the other two. Unit 0 is short (20 ms),
    so units then go out two at a time per worker: unit 1 waits at its gate on one worker, and
    the driver's worker takes units 2 (which waits at the gate) and 3 (queued behind it). When
    the plain Task ends, its worker joins the ParallelTask and steals unit 3, while 1 and 2 still
    wait."""
    client, logs = three_workers
    folder = tmp_path / "gates"
    folder.mkdir()
    blocker = client.submit(GatedPid, folder=str(folder), gate="task")
    wait_until(lambda: (folder / "started-task").exists(), 30, "the plain Task to start")
    future = client.submit(FirstShort, folder=str(folder), gates=["", "g", "g", "last"])
    wait_until(lambda: {1, 2} <= set(started(folder)), 30, "units 1 and 2 to wait at their gate")
    assert 3 not in started(folder)
    (folder / "last").touch()  # unit 3 need not wait: only where it runs is in question
    (folder / "task").touch()
    freed = result_or_logs(blocker, 60, logs)
    stolen = wait_until(lambda: started(folder).get(3), 30, "unit 3 to start")
    assert stolen == freed, "unit 3 did not run on the worker that came free"
    assert not future.done()  # units 1 and 2 still wait at their gate
    (folder / "g").touch()
    pids = result_or_logs(future, 60, logs)
    assert pids[3] == freed and freed not in pids[:3]


def test_plain_tasks_queued_behind_a_long_one_run_on_the_other_workers(
        three_workers, tmp_path: Path) -> None:
    """The submitter's tasks are measured short, so a burst of them queues on busy workers
    (prefetch), the one that runs its long task too: once it is late and another worker is
    free, the ones queued there are taken back (their stories say so) and run elsewhere while
    the long one still runs."""
    client, logs = three_workers
    client.submit(Pid).result(30)  # measured: this submitter's tasks take well under 50 ms
    folder = tmp_path / "gates"
    folder.mkdir()
    blocker = client.submit(GatedPid, folder=str(folder), gate="task")
    burst = [client.submit(Pid) for _ in range(60)]
    pids = [result_or_logs(future, 60, logs) for future in burst]
    assert not blocker.done()
    taken = [f for f in burst if any("taken back from" in e[3] for e in f.story())]
    assert taken, "none of the tasks queued behind the long one was taken back"
    (folder / "task").touch()
    held = result_or_logs(blocker, 60, logs)
    assert held not in pids and len(set(pids)) == 2
