"""Failure as the normal case, with real processes and real signals."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import Client, Future, LocalCluster, ParallelTask, Task
from actors.errors import MasterLost, TaskCancelled, WorkerKilled
from tests.conftest import (
    alive,
    children,
    descendants,
    kill_all,
    python_logged,
    result_or_logs,
    wait_until,
)
from transport import init_keys

pytestmark = pytest.mark.processes


class SleepsForever(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        time.sleep(3600)


class KillsItself(Task):
    def work(self):
        os.kill(os.getpid(), signal.SIGKILL)


class Square(Task):
    def work(self, x):
        return x * x


class Slow(ParallelTask):
    """Short units that report where they ran, so a test can kill those processes."""

    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        time.sleep(0.005)  # ~4 s on 4 workers: time for the chaos to land mid-task
        return i

    def reduce(self, results):
        return sum(results)


class Tallied(ParallelTask):
    """Each execution of a unit leaves a mark in ``tally``; the driver leaves its pid there."""

    def get_work(self, n, tally):
        with open(os.path.join(tally, f"driver-{os.getpid()}"), "w"):
            pass
        for i in range(n):
            yield (i, tally)

    def work_unit(self, arg):
        i, tally = arg
        time.sleep(0.01)
        with open(os.path.join(tally, str(i)), "a") as f:
            f.write(".")
        return i

    def reduce(self, results):
        return sum(results)


def worker_pids(cluster_pid: int) -> set[int]:
    """The worker processes: grandchildren of the master (master -> node -> worker)."""
    return {worker for node in children(cluster_pid) for worker in children(node)}


def test_cancel_stops_the_worker_processes_and_the_cluster_goes_on() -> None:
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        before = worker_pids(cl.pid)
        fut = client.submit(SleepsForever, n=10)
        wait_until(lambda: client.info().tasks_running == 1 and client.info().idle_workers == 0,
                   20, "both workers to run the task")
        assert fut.cancel(timeout=20) is True
        assert fut.cancelled() and fut.done()
        with pytest.raises(TaskCancelled):
            fut.result(timeout=1)
        wait_until(lambda: not any(alive(p) for p in before), 20, "the task's processes to end")
        assert client.submit(Square, 6).result(timeout=30) == 36


def test_a_unit_that_kills_its_process_ends_the_task_with_worker_killed() -> None:
    with LocalCluster(workers=1) as cl, Client(cl) as client:
        fut = client.submit(KillsItself)
        with pytest.raises(WorkerKilled) as info:
            fut.result(timeout=60)
        text = str(info.value)
        assert "3 time(s)" in text and "SIGKILL" in text, text
        assert info.value.task_id == fut.task_id and info.value.unit == "driver"
        assert len(info.value.causes) == 3 and all("SIGKILL" in c for c in info.value.causes)
        assert client.submit(Square, 5).result(timeout=30) == 25
        story = [(k, s, f) for k, s, f, _, _ in fut.story()]
        assert story.count(("task", "running", "queued")) == 2  # restarted twice, then failed


def test_a_killed_driver_restarts_and_keeps_the_units_already_finished(tmp_path: Path) -> None:
    n = 400
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        fut = client.submit(Tallied, n, str(tmp_path))
        wait_until(lambda: fut.progress()[0] >= 150, 60, "half the units to finish")
        [driver] = [int(p.name.split("-")[1]) for p in tmp_path.glob("driver-*")]
        done_at_kill = fut.progress()[0]
        os.kill(driver, signal.SIGKILL)
        assert fut.result(timeout=60) == sum(range(n))
        story = fut.story()
    assert len(list(tmp_path.glob("driver-*"))) == 2, "the driver did not restart"
    runs = {int(p.name): p.stat().st_size for p in tmp_path.iterdir() if p.name.isdigit()}
    assert sorted(runs) == list(range(n))
    # What had finished when the driver died was replayed to the new one, not run again:
    # only units in flight at the kill (or finishing between progress reports) ran twice.
    replayed = sum(int(e[3].split(": ")[1].split()[0]) for e in story if e[2] == "replayed")
    assert replayed >= done_at_kill, (replayed, done_at_kill)
    assert sum(1 for count in runs.values() if count > 1) <= n - replayed


def test_killing_workers_and_a_node_during_a_task_still_gives_the_exact_result(
    tmp_path: Path,
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keys, address = str(tmp_path / "keys"), f"tcp://127.0.0.1:{port}"
    # --max-deaths 10: random kills may hit the driver repeatedly
    master = python_logged(tmp_path / "master.log", "-m", "actors.master", "--port", str(port),
                           "--workers", "0", "--keys", keys, "--node-timeout", "2", "--max-deaths", "10")
    nodes: list[subprocess.Popen[str]] = []
    everything: set[int] = {master.pid}
    rng = random.Random(7)
    try:
        wait_until(lambda: (tmp_path / "keys" / "allowed").is_dir(), 30, "the master's keys")
        for i in range(2):
            nodes.append(python_logged(tmp_path / f"node{i}.log", "-m", "actors.node", "--master",
                                       address, "--workers", "2", "--keys", keys))
        everything |= {n.pid for n in nodes}
        with Client(address, keys=keys) as client:
            client.wait_for_workers(4)
            fut = client.submit(Slow, n=3000)
            kills = 0
            for round_ in range(4):  # kill a worker each time another 300 units are done
                wait_until(lambda r=round_: fut.done() or fut.progress()[0] > 300 * (r + 1),
                           60, "the task to make progress")
                victims = sorted(descendants(nodes[1].pid))
                everything |= set(victims)
                if fut.done() or not victims:
                    break
                os.kill(rng.choice(victims), signal.SIGKILL)
                kills += 1
            assert kills >= 2, "the task ended before the chaos could start"
            everything |= descendants(nodes[0].pid)
            if not fut.done():
                os.kill(nodes[0].pid, signal.SIGKILL)  # a whole node, with its workers
            assert result_or_logs(fut, 90, tmp_path) == sum(range(3000))
            story = fut.story()
            requeued = [e for e in story if e[2] == "queued" and "lost" in e[3]]
            assert requeued, "the story shows no re-queue"
    finally:
        everything |= set().union(*(descendants(n.pid) for n in nodes)) if nodes else set()
        for proc in (*nodes, master):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (*nodes, master):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
        kill_all(everything)
        wait_until(lambda: not any(alive(p) for p in everything), 20, "every process to end")


class Marked(Task):
    """A short task that leaves its pid where the test can find it, then returns x * x."""

    def work(self, x, marks):
        with open(os.path.join(marks, f"{x}-{os.getpid()}"), "w"):
            pass
        time.sleep(0.002)
        return x * x


def test_short_tasks_queued_on_killed_and_cancelled_workers_all_resolve(tmp_path: Path) -> None:
    """Short Tasks queue on busy workers (prefetch): a worker killed with tasks queued behind
    the one it runs, and a cancel of a queued task (which replaces that worker), must leave every
    other future with its own result and no task counted as a killer."""
    n = 600
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        assert client.submit(Marked, -1, str(tmp_path)).result(timeout=30) == 1  # measured
        futures = [client.submit(Marked, x, str(tmp_path)) for x in range(n)]
        wait_until(lambda: sum(f.done() for f in futures) >= n // 6, 60, "a sixth to finish")
        victim = max(int(p.name.split("-")[1]) for p in tmp_path.iterdir())
        os.kill(victim, signal.SIGKILL)
        cancelled = [f for f in futures[-50:] if not f.done()][:5]
        for fut in cancelled:
            fut.cancel(timeout=20)
        for x, fut in enumerate(futures):
            if fut in cancelled and fut.cancelled():
                continue
            assert result_or_logs(fut, 60, tmp_path) == x * x, x
        causes = [e[3].removeprefix("master: ") for fut in futures for e in client.story(fut)
                  if e[0] == "task"]
    assert any("queued behind" in cause for cause in causes), "no task was queued on a busy worker"
    # The kill requeued the task the worker ran ("driver lost: worker w-... killed by signal 9")
    # and, apart, those queued behind it ("driver lost: worker lost: ...", no death counted).
    running = [c for c in causes if c.startswith("driver lost: worker ") and "SIGKILL" in c]
    assert any(not c.startswith("driver lost: worker lost:") for c in running), causes[-20:]
    assert any(c.startswith("driver lost: worker lost:") for c in running), causes[-20:]


class Naps(Task):
    def work(self, seconds):
        time.sleep(seconds)
        return seconds


def _master(tmp_path: Path, port: int, name: str) -> subprocess.Popen[str]:
    if not (tmp_path / "keys").exists():
        init_keys(tmp_path / "keys")  # the client reads them before the master is up
    return python_logged(tmp_path / f"{name}.log", "-m", "actors.master", "--port", str(port),
                         "--workers", "1", "--keys", str(tmp_path / "keys"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _a_task_running_on_a_master(tmp_path: Path, master_timeout: float) -> Iterator[
        tuple[Client, Future, subprocess.Popen[str], set[int], int]]:
    """A master process of one worker, a client, and a long task running there; every process
    started is stopped afterwards (those the test adds to the yielded set too)."""
    port = _free_port()
    first = _master(tmp_path, port, "first")
    pids = {first.pid}
    try:
        with Client(f"tcp://127.0.0.1:{port}", keys=tmp_path / "keys", timeout=60,
                    master_timeout=master_timeout) as client:
            fut = client.submit(Naps, 600)
            wait_until(lambda: client.info().tasks_running == 1, 60, "the task to start")
            pids |= descendants(first.pid)
            yield client, fut, first, pids, port
    finally:
        kill_all(pids)
        first.wait(10)


def test_a_client_whose_master_dies_fails_its_futures_instead_of_waiting_forever(
    tmp_path: Path
) -> None:
    """kill -9 of the master: unfinished futures fail with MasterLost once it stays away for
    master_timeout, and so do tasks submitted while it is away."""
    with _a_task_running_on_a_master(tmp_path, master_timeout=2.0) as (client, fut, first, _, _):
        first.kill()
        started = time.monotonic()
        with pytest.raises(MasterLost, match="no connection"):
            fut.result(timeout=60)
        assert time.monotonic() - started < 30
        with pytest.raises(MasterLost):  # submitted while there is no master
            client.submit(Square, 2).result(timeout=30)


def test_a_client_learns_its_master_restarted_and_goes_on_with_the_new_one(
    tmp_path: Path
) -> None:
    """A new master on the address: the client's earlier tasks fail at once (they died with the
    old one) and new ones run there."""
    second: subprocess.Popen[str] | None = None
    try:
        with _a_task_running_on_a_master(tmp_path, master_timeout=600) as (
                client, fut, first, pids, port):
            first.kill()
            first.wait(10)
            second = _master(tmp_path, port, "second")
            pids.add(second.pid)
            with pytest.raises(MasterLost, match="restarted"):
                fut.result(timeout=60)
            assert client.submit(Square, 3).result(timeout=60) == 9
            pids |= descendants(second.pid)
    finally:
        if second is not None:
            second.wait(10)  # killed with the others on the way out
