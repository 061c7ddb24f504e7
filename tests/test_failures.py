"""Failure as the normal case, with real processes and real signals."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import Client, Future, LocalCluster, ParallelTask, Task
from actors.errors import MasterLost, TaskCancelled, WorkerKilled
from actors.master import NODE_RESTARTS, _restart_local_node
from tests.conftest import (
    alive,
    children,
    descendants,
    kill_all,
    python_logged,
    result_or_logs,
    start_master,
    wait_until,
)

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
    """Short units; the last one waits at the gate, so the task cannot end before the test has
    done its damage and opens it."""

    def get_work(self, n, gate):
        for i in range(n):
            yield i, gate if i == n - 1 else ""

    def work_unit(self, arg):
        i, gate = arg
        if gate:
            wait_for(gate)
        time.sleep(0.002)
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


def wait_for(gate: str, timeout: float = 60.0) -> None:
    """Block until the file ``gate`` exists (the test opens it); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} not opened within {timeout}s")
        time.sleep(0.005)


def worker_pids(cluster_pid: int) -> set[int]:
    """The worker processes: the master's children, its node running inside it (a
    LocalCluster's default, ``local_node="inside"``)."""
    return children(cluster_pid)


def test_cancel_stops_the_worker_processes_and_the_cluster_goes_on() -> None:
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        before = worker_pids(cl.pid)
        fut = client.submit(SleepsForever, n=10)
        wait_until(lambda: client.info().tasks_running == 1 and client.info().idle_workers == 0,
                   20, "both workers to run the task")
        # grace=0: killed at once, without asking (a cancel's grace, and the worker that stops
        # in time and serves on, are test_cooperative_stop.py's)
        assert fut.cancel(timeout=20, grace=0) is True
        assert fut.cancelled() and fut.done()
        with pytest.raises(TaskCancelled):
            fut.result(timeout=1)
        wait_until(lambda: not any(alive(p) for p in before), 20, "the task's processes to end")
        assert client.submit(Square, 6).result(timeout=30) == 36


def test_closing_a_client_stops_the_worker_processes_of_its_unfinished_tasks() -> None:
    with LocalCluster(workers=2) as cl:
        with Client(cl) as client:
            client.wait_for_workers(2)
            client.submit(SleepsForever, n=10)
            wait_until(lambda: client.info().tasks_running == 1 and client.info().idle_workers == 0,
                       20, "both workers to run the task")
            busy = worker_pids(cl.pid)
            assert len(busy) == 2
        wait_until(lambda: not any(alive(p) for p in busy), 20, "the task's processes to end")
        with Client(cl) as other:
            assert other.submit(Square, 6).result(timeout=30) == 36


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


class GrowsThenDies(Task):
    def work(self, mib):
        block = b"\x01" * (mib * 2**20)  # every page written: resident
        os.kill(os.getpid(), signal.SIGKILL)
        return len(block)


def test_each_death_is_reported_with_the_signal_and_the_peak_memory_of_the_process() -> None:
    with LocalCluster(workers=1) as cl, Client(cl) as client, pytest.raises(WorkerKilled) as info:
        client.submit(GrowsThenDies, 100).result(timeout=60)
    causes = info.value.causes
    peaks = [re.search(r"killed by signal 9 \(SIGKILL\), peak memory (\d+) MiB", c) for c in causes]
    assert len(peaks) == 3 and all(peaks), causes
    assert all(int(found[1]) >= 100 for found in peaks if found), causes


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


class GatedTally(ParallelTask):
    """Units that say where they run (``began-<i>-<pid>``), wait at the gate, then leave a mark
    per run; the driver leaves its pid."""

    def get_work(self, n, tally, gate):
        Path(tally, f"driver-{os.getpid()}").touch()
        for i in range(n):
            yield (i, tally, gate)

    def work_unit(self, arg):
        i, tally, gate = arg
        Path(tally, f"began-{i}-{os.getpid()}").touch()
        wait_for(gate)
        with open(os.path.join(tally, str(i)), "a") as f:
            f.write(".")
        return i

    def reduce(self, results):
        return sum(results)


def test_a_killed_driver_leaves_its_healthy_helpers_running_their_units(tmp_path: Path) -> None:
    """kill -9 of a ParallelTask's driver while a unit waits on each of three workers: the two
    helpers are not stopped; their units finish once (journaled for the next driver, which
    gets them replayed) and the helpers are let go, warm."""
    gate = tmp_path / "gate"
    with LocalCluster(workers=3) as cl, Client(cl) as client:
        client.wait_for_workers(3)
        fut = client.submit(GatedTally, 6, str(tmp_path), str(gate))
        wait_until(lambda: len(list(tmp_path.glob("began-*"))) == 3, 60, "a unit on each worker")
        [driver] = [int(p.name.split("-")[1]) for p in tmp_path.glob("driver-*")]
        began = {int(p.name.split("-")[1]): int(p.name.split("-")[2])
                 for p in tmp_path.glob("began-*")}
        helpers = {pid for pid in began.values() if pid != driver}
        assert len(helpers) == 2
        os.kill(driver, signal.SIGKILL)
        wait_until(lambda: any(e[2] == "draining" for e in client.story(fut)), 30,
                   "the helpers to go on without their driver")
        gate.touch()
        assert fut.result(timeout=60) == sum(range(6))
        story = fut.story()
        assert all(alive(pid) for pid in helpers)  # never stopped
    assert not [e for e in story if e[2] == "killed" or "restarts" in e[3]], story
    runs = {int(p.name): p.stat().st_size for p in tmp_path.iterdir() if p.name.isdigit()}
    assert sorted(runs) == list(range(6))
    on_helpers = [i for i, pid in began.items() if pid in helpers]
    assert all(runs[i] == 1 for i in on_helpers), (runs, on_helpers)  # not run again
    assert len(list(tmp_path.glob("driver-*"))) == 2  # a new driver, on a warm helper or not


def test_killing_workers_and_a_node_during_a_task_still_gives_the_exact_result(
    tmp_path: Path,
) -> None:
    keys = str(tmp_path / "keys")
    # --max-deaths 10: random kills may hit the driver repeatedly
    master, address = start_master(tmp_path, "--workers", "0", "--keys", keys,
                                   "--node-timeout", "2", "--max-deaths", "10")
    nodes: list[subprocess.Popen[str]] = []
    everything: set[int] = {master.pid}
    rng = random.Random(7)
    try:
        for i in range(2):
            nodes.append(python_logged(tmp_path / f"node{i}.log", "-m", "actors.node", "--master",
                                       address, "--workers", "2", "--keys", keys))
        everything |= {n.pid for n in nodes}
        with Client(address, keys=keys) as client:
            client.wait_for_workers(4)
            fut = client.submit(Slow, n=3000, gate=str(tmp_path / "gate"))
            for round_ in range(4):  # kill a worker each time another 300 units are done
                wait_until(lambda r=round_: fut.progress()[0] > 300 * (r + 1),
                           60, "the task to make progress")
                found = wait_until(lambda: descendants(nodes[1].pid), 20, "node 1 to have workers")
                assert isinstance(found, set)
                victims = sorted(found)
                everything |= set(victims)
                os.kill(rng.choice(victims), signal.SIGKILL)
            everything |= descendants(nodes[0].pid)
            os.kill(nodes[0].pid, signal.SIGKILL)  # a whole node, with its workers
            assert not fut.done()  # the gate holds the last unit: all of it landed mid-task
            (tmp_path / "gate").touch()
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


def _master(tmp_path: Path, name: str, port: int = 0) -> tuple[subprocess.Popen[str], str]:
    return start_master(tmp_path, "--workers", "1", "--keys", str(tmp_path / "keys"),
                        name=name, port=port)


@contextlib.contextmanager
def _a_task_running_on_a_master(tmp_path: Path, master_timeout: float) -> Iterator[
        tuple[Client, Future, subprocess.Popen[str], set[int], int]]:
    """A master process of one worker, a client, and a long task running there; every process
    started is stopped afterwards (those the test adds to the yielded set too)."""
    first, address = _master(tmp_path, "first")
    port = int(address.rsplit(":", 1)[1])  # a restarted master comes back on it
    pids = {first.pid}
    try:
        with Client(address, keys=tmp_path / "keys", timeout=60,
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
        assert fut.status == "lost"
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
            second, _ = _master(tmp_path, "second", port)
            pids.add(second.pid)
            with pytest.raises(MasterLost, match="restarted"):
                fut.result(timeout=60)
            assert client.submit(Square, 3).result(timeout=60) == 9
            pids |= descendants(second.pid)
    finally:
        if second is not None:
            second.wait(10)  # killed with the others on the way out


def test_a_killed_local_node_is_started_again_and_the_cluster_serves_on() -> None:
    with LocalCluster(workers=1, local_node="process") as cl, Client(cl) as client:
        [node] = children(cl.pid)
        os.kill(node, signal.SIGKILL)
        wait_until(lambda: children(cl.pid) - {node}, 30, "the master to start another node")
        assert client.submit(Square, 7).result(timeout=60) == 49
        wait_until(lambda: len(client.info().nodes) == 1, 30, "the dead node to be declared lost")


def test_a_local_node_that_keeps_ending_is_started_again_then_left_saying_why(
        tmp_path: Path) -> None:
    # Real processes standing in for the node: each says why it ends where a node would.
    note = tmp_path / "node.exit"
    says = ("import sys; open(sys.argv[sys.argv.index('--exit-note') + 1], 'w')"
            ".write('cannot read\\n the disk'); sys.exit(3)")
    node: subprocess.Popen[bytes] | None = subprocess.Popen(
        [sys.executable, "-c", says, "--exit-note", str(note)])
    restarts: list[float] = []
    for _ in range(NODE_RESTARTS):
        assert node is not None
        node.wait(20)
        node, reason = _restart_local_node(node, restarts)
        assert node is not None and reason == ""
        assert not note.exists()  # read and removed: the next one writes its own
    assert node is not None
    node.wait(20)
    node, reason = _restart_local_node(node, restarts)
    assert node is None
    assert reason == (f"it ended {NODE_RESTARTS + 1} times within 60s, the last with cannot "
                      "read the disk")
    # Its arguments or keys refused (exit code 2): it would be again; not started again.
    refusing = subprocess.Popen([sys.executable, "-c", "raise SystemExit(2)"])
    refusing.wait(20)
    assert _restart_local_node(refusing, []) == (None, "it refused to start (exit code 2)")


def test_a_master_removes_the_folders_of_masters_killed_before_it() -> None:
    stale = Path(tempfile.gettempdir()) / "actors-master-999999999-stale"
    stale.mkdir()
    (stale / "results.sqlite").write_bytes(b"payloads of a master killed with kill -9")
    with LocalCluster(workers=0) as cl:
        wait_until(lambda: not stale.exists(), 20, "the stale folder to go")
        mine = [p for p in Path(tempfile.gettempdir()).glob(f"actors-master-{cl.pid}-*")]
        assert len(mine) == 1 and mine[0].is_dir()
    wait_until(lambda: not mine[0].exists(), 20, "the master's own folder to go at its stop")
