"""What a notebook user sees of a task: its output, its progress, its status, the reprs.

Real processes on loopback (the module's LocalCluster of 2 workers). Tasks that must be caught
in the middle wait at a gate, a file the test creates: no test depends on how fast anything is.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import Client, LocalCluster, ParallelTask, Task
from actors.errors import TaskCancelled
from actors.task_host import FIRST_LOOKAHEAD, SLICE_BATCH
from tests.conftest import wait_until

pytestmark = pytest.mark.processes


def wait_for(gate: str, timeout: float = 60.0) -> None:
    """In a task: block until the file ``gate`` exists (the test opens it)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} not opened within {timeout}s")
        time.sleep(0.005)


def open_gate(gate: Path) -> None:
    gate.touch()


class Chatty(Task):
    def work(self, tag):
        print(f"out {tag}")
        print(f"err {tag}", file=sys.stderr)
        print("one line", end="")
        print(" written in pieces")
        log = logging.getLogger("chatty")
        log.setLevel(logging.DEBUG)
        log.debug("debug %s", tag)
        log.info("info %s", tag)
        log.warning("warning %s", tag)
        logging.getLogger("elsewhere").debug("below its level: not sent")
        logging.info("root %s", tag)  # INFO reaches the client (Python's default is WARNING)
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.exception("error %s", tag)
        print("no newline at the end", end="")  # a line all the same, once work returns
        return tag


class ChattyUnits(ParallelTask):
    def get_work(self, n):
        print("slicing")
        yield from range(n)

    def work_unit(self, i):
        print(f"unit {i}")
        return i

    def reduce(self, results):
        logging.getLogger("chatty").warning("reducing %d", len(results))
        return sum(results)


class Flood(Task):
    def work(self, n):
        for i in range(n):
            print(f"line {i}")
        return n


class Counts(Task):
    """Reports its progress; stops half-way at the gate."""

    def work(self, n, gate):
        for i in range(n):
            self.task_progress(i + 1, n)
            if i + 1 == n // 2:
                wait_for(gate)
        return n


class SlicesSlowly(ParallelTask):
    """Declares nothing; its slicer waits at the gate after the first ``first`` units (the
    driver's first message holds ``FIRST_LOOKAHEAD`` units: ``first`` is that message)."""

    def get_work(self, n, first, gate):
        yield from range(first)
        wait_for(gate)
        yield from range(first, n)

    def work_unit(self, i):
        return i

    def reduce(self, results):
        return sum(results)


class Declared(SlicesSlowly):
    """The same, but declares its units up front."""

    def task_total(self, n, first, gate):
        return n


class Gated(Task):
    def work(self, gate):
        wait_for(gate)
        return "through"


class Fails(Task):
    def work(self):
        raise ValueError("as planned")


@pytest.fixture
def quiet(cluster: LocalCluster) -> Iterator[Client]:
    """A client of its own (no warm workers, no measured task times: nothing is queued on a busy
    worker) that shows no output (the tests read ``logs()``)."""
    with Client(cluster, show_output=False) as c:
        yield c


def sampled(fut, seen: list[tuple[int, int | None]]) -> bool:
    seen.append(fut.progress())
    return True


def fields(fut) -> list[tuple[str, str, str, str]]:
    return [(line.stream, line.level, line.logger, line.text) for line in fut.logs()]


def test_what_a_task_prints_and_logs_reaches_its_client_exactly_with_its_ids(
        quiet: Client) -> None:
    fut = quiet.submit(Chatty, "a")
    assert fut.result(timeout=60) == "a"
    got = fields(fut)
    assert got == [
        ("stdout", "", "", "out a"),
        ("stderr", "", "", "err a"),
        ("stdout", "", "", "one line written in pieces"),
        ("log", "DEBUG", "chatty", "debug a"),
        ("log", "INFO", "chatty", "info a"),
        ("log", "WARNING", "chatty", "warning a"),
        ("log", "INFO", "root", "root a"),
        ("log", "ERROR", "chatty", got[7][3]),
        ("stdout", "", "", "no newline at the end"),
    ]
    assert len(got) == 9, got
    assert got[7][3].startswith("error a\nTraceback") and "ZeroDivisionError" in got[7][3]
    lines = fut.logs()
    assert {(line.task_id, line.phase, line.unit) for line in lines} == {(fut.task_id, "work", -1)}
    worker_ids = {line.worker_id for line in lines}
    assert len(worker_ids) == 1
    worker_id = worker_ids.pop()
    assert re.fullmatch(r"node-.+/w\d+", worker_id), worker_id
    # the worker the master says ran it
    assert any(worker_id in entry[3] for entry in fut.story()), fut.story()
    assert fut.dropped_lines == 0


def test_a_parallel_tasks_output_names_the_slicer_each_unit_and_the_reduce(
        quiet: Client) -> None:
    fut = quiet.submit(ChattyUnits, 20)
    assert fut.result(timeout=60) == sum(range(20))
    lines = fut.logs()
    assert sorted((line.phase, line.unit, line.text) for line in lines) == sorted(
        [("get_work", -1, "slicing"), ("reduce", -1, "reducing 20")]
        + [("work_unit", i, f"unit {i}") for i in range(20)])
    # Every unit's output was sent before the unit was reported done, so before the reduce.
    assert (lines[-1].phase, lines[-1].level) == ("reduce", "WARNING")


def test_a_task_printing_a_hundred_thousand_lines_neither_blocks_nor_floods(
        quiet: Client) -> None:
    fut = quiet.submit(Flood, 100_000)
    assert fut.result(timeout=120) == 100_000
    texts = [line.text for line in fut.logs()]
    assert texts == [f"line {i}" for i in range(1_000)]  # the first 1,000, in order
    assert fut.dropped_lines == 99_000  # the rest counted, never sent


def test_a_plain_tasks_progress_comes_from_its_work_is_monotonic_and_ends_at_its_total(
        quiet: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    fut = quiet.submit(Counts, 1_000, str(gate))
    wait_until(lambda: fut.progress() == (500, 1_000), 60, "the task to report half-way")
    seen = [fut.progress()]
    open_gate(gate)
    wait_until(lambda: sampled(fut, seen) and fut.done(), 60, "the task to end")
    assert fut.result(timeout=60) == 1_000
    seen.append(fut.progress())
    assert seen[-1] == (1_000, 1_000)
    assert repr(fut) == f"<Future Counts {fut.task_id} finished 1000/1000 done>"
    assert all(total == 1_000 for _, total in seen)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_a_plain_task_that_reports_nothing_shows_one_step_done_once_finished(
        quiet: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    fut = quiet.submit(Gated, str(gate))
    wait_until(lambda: fut.status == "running", 60, "the task to run")
    assert fut.progress() == (0, None)
    open_gate(gate)
    assert fut.result(timeout=60) == "through"
    assert fut.progress() == (1, 1)


def test_a_parallel_task_that_declares_its_units_has_its_total_from_the_start(
        quiet: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    n = 2 * SLICE_BATCH + 1
    fut = quiet.submit(Declared, n, FIRST_LOOKAHEAD, str(gate))
    seen: list[tuple[int, int | None]] = []
    wait_until(lambda: sampled(fut, seen) and seen[-1][0] == FIRST_LOOKAHEAD, 60,
               "the first batch")
    assert fut.progress() == (FIRST_LOOKAHEAD, n)  # the slicer waits: the declared total
    open_gate(gate)
    wait_until(lambda: sampled(fut, seen) and fut.done(), 60, "the task to end")
    assert fut.result(timeout=60) == sum(range(n))
    seen.append(fut.progress())
    assert seen[-1] == (n, n)
    assert {total for _, total in seen} <= {None, n}  # None: before the first report
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_a_parallel_tasks_total_is_unknown_until_its_slicer_is_exhausted(
        quiet: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    n = 2 * SLICE_BATCH + 1
    fut = quiet.submit(SlicesSlowly, n, FIRST_LOOKAHEAD, str(gate))
    wait_until(lambda: fut.progress()[0] == FIRST_LOOKAHEAD, 60, "the first batch to finish")
    assert fut.progress() == (FIRST_LOOKAHEAD, None)  # more may come: the slicer is not done
    open_gate(gate)
    assert fut.result(timeout=60) == sum(range(n))
    assert fut.progress() == (n, n)


def test_a_future_goes_queued_running_finished_and_says_so(
        quiet: Client, cluster: LocalCluster, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    blockers = [quiet.submit(Gated, str(first)) for _ in range(cluster.workers)]
    wait_until(lambda: all(b.status == "running" for b in blockers), 60, "both workers busy")
    fut = quiet.submit(Gated, str(second))
    assert fut.status == "queued"
    assert "queued" in repr(fut) and "queued" in fut._repr_html_()
    assert "2 running, 1 queued" in repr(quiet) or "1 queued, 2 running" in repr(quiet)
    open_gate(first)
    wait_until(lambda: fut.status == "running", 60, "the third task to get a worker")
    assert [b.result(timeout=60) for b in blockers] == ["through"] * len(blockers)
    open_gate(second)
    assert fut.result(timeout=60) == "through"
    assert fut.status == "finished"
    assert repr(fut) == f"<Future Gated {fut.task_id} finished>"  # it reported no progress


def test_a_future_that_raises_is_erred_and_one_cancelled_is_cancelled(
        quiet: Client, tmp_path: Path) -> None:
    failed = quiet.submit(Fails)
    with pytest.raises(ValueError, match="as planned"):
        failed.result(timeout=60)
    assert failed.status == "erred"
    held = quiet.submit(Gated, str(tmp_path / "never"))
    wait_until(lambda: held.status == "running", 60, "the task to run")
    assert held.cancel()
    with pytest.raises(TaskCancelled):
        held.result(timeout=60)
    assert held.status == "cancelled"
    assert "1 erred, 1 cancelled" in repr(quiet)
    assert "its tasks" in quiet._repr_html_()


def test_a_local_cluster_says_where_it_is_and_whether_it_runs(cluster: LocalCluster) -> None:
    assert repr(cluster) == f"<LocalCluster {cluster.address} workers=2 running>"
    page = cluster._repr_html_()
    assert cluster.address in page and "running" in page and "Client(" in page


def test_a_closed_local_cluster_says_so(tmp_path: Path) -> None:
    with LocalCluster(workers=0) as own:
        assert own.status == "running"
    assert own.status == "closed"
    assert repr(own).endswith("closed>")


class PrintsThenWaits(Task):
    def work(self, gate):
        print("mine")
        wait_for(gate)
        return "through"


@pytest.mark.processes
def test_output_forged_by_another_worker_never_reaches_the_tasks_client(
        cluster: LocalCluster, quiet: Client, tmp_path: Path) -> None:
    """A node key speaking for a worker of its own sends output for another client's running
    task: the master drops it (the worker is not one of the task's); the task's own lines come."""
    import zmq

    from actors import __version__
    from actors import messages as m
    from transport import load_keypair, load_public_key
    from transport.hub import unbatch

    gate = tmp_path / "gate"
    fut = quiet.submit(PrintsThenWaits, str(gate))
    wait_until(lambda: [line.text for line in fut.logs()] == ["mine"], 60, "the task's own line")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"node-forger-output")
    pair = load_keypair(cluster.keys_dir, "node")
    sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    sock.curve_serverkey = load_public_key(cluster.keys_dir, "master")
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.connect(cluster.address)
    hello = m.encode(m.Hello(role="node", peer_id="node-forger-output",
                             protocol=m.PROTOCOL_VERSION, version=__version__))
    try:
        sock.send(hello)
        sock.send(m.encode(m.WorkerReady("node-forger-output/w1", 1)))
        line = m.OutputLine(stream="stdout", level="", logger="", phase="work", unit=-1,
                            text="forged", time=time.time())
        for _ in range(3):
            sock.send_multipart([b"node-forger-output/w1",
                                 m.encode(m.TaskOutput(fut.task_id, "any", [line]))])
        # A second Hello is answered with a second Welcome, after what came before it on this
        # connection was handled: the forged output included.
        sock.send(hello)
        welcomes = 0
        while welcomes < 2:
            welcomes += sum(isinstance(m.decode(frames[-1]), m.Welcome)
                            for frames in unbatch(sock.recv_multipart()))
        sock.send(m.encode(m.Bye("forger leaving")))
    finally:
        sock.close()
    quiet.info()  # whatever the master sent this client before this answer has arrived
    assert [line.text for line in fut.logs()] == ["mine"]
    open_gate(gate)
    assert fut.result(timeout=60) == "through"
    assert [line.text for line in fut.logs()] == ["mine"]


def test_what_a_line_keeps_counts_every_string_and_labels_are_cut() -> None:
    """The master keeps tasks' output within a byte budget: a line's labels are a worker's word
    too (a megabyte as a logger's name counted as no bytes: two tasks held 2 GiB)."""
    from actors.messages import OutputLine
    from actors.watch import LABEL_CHARS, OutputRings, trimmed

    huge = OutputLine(stream="log", level="INFO", logger="x" * (1 << 20), phase="work", unit=-1,
                      text="", time=0.0)
    cut = trimmed(huge)
    assert cut.logger == "x" * LABEL_CHARS and cut.level == "INFO" and cut.phase == "work"
    plain = OutputLine(stream="stdout", level="", logger="", phase="work", unit=-1, text="hi",
                       time=0.0)
    assert trimmed(plain) is plain
    rings = OutputRings(budget=10 * LABEL_CHARS)
    for n in range(100):
        rings.add(f"task-{n}", "w1", [huge], 0)
    assert len(rings.rings) == 1  # (the newest line is kept whole, alone)
    rings = OutputRings(budget=3 * (LABEL_CHARS + 16))
    for n in range(100):
        rings.add(f"task-{n}", "w1", [cut], 0)
    assert len(rings.rings) == 3
