"""The node's result store taking a worker's result file: only a sealed memory file of that
worker's own, named with the nonce it said, of the size it said. Real memory files of this
process stand for the worker's (the store opens them through /proc, as it would a worker's)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from actors import messages as m
from actors.memory import sealed_file
from actors.node import TaskEnds
from actors.node_results import MAX_ADMITTED, ResultStore
from transport.keys import KeyPair

WORKER = b"node-1/w1"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ResultStore]:
    tasks = TaskEnds()
    assign = m.encode(m.AssignTask(task_id="t1", name="T", kind="task", code=b"", args=b"",
                                   driver=True))
    tasks.from_master(WORKER, assign)
    tasks.from_master(b"node-1/w9", assign)  # holds the task, but no pid of ours is known
    held = ResultStore("node-1", KeyPair(b"", b""), "127.0.0.1", str(tmp_path), tasks,
                       pids={WORKER.decode(): os.getpid()})
    yield held
    held.close()


def offer(fd: int, nonce: str, lengths: list[int], task_id: str = "t1") -> m.HeldFile:
    return m.HeldFile(task_id, fd, nonce, lengths)


def test_a_sealed_memory_file_of_the_worker_is_taken_and_read_back_whole(store: ResultStore) -> None:
    made = sealed_file([b"header", memoryview(bytearray(b"x" * 1000))], "pydra-result")
    assert made is not None
    fd, nonce = made
    try:
        assert store._take_file(WORKER, offer(fd, nonce, [6, 1000])) == ""
    finally:
        os.close(fd)  # the worker lets go; the store keeps its own descriptor
    entry = store.held["t1"]
    assert entry.lengths == [6, 1000] and store.in_memory == 1006
    assert store._read(entry) == b"header" + b"x" * 1000


def test_an_unsealed_file_another_name_or_size_or_task_is_refused(store: ResultStore) -> None:
    unsealed = os.memfd_create("pydra-result-0123456789abcdef", os.MFD_CLOEXEC)
    os.write(unsealed, b"data")
    made = sealed_file([b"data"], "pydra-result")
    assert made is not None
    fd, nonce = made
    try:
        assert "sealed" in store._take_file(WORKER, offer(unsealed, "0123456789abcdef", [4]))
        assert "not its result file" in store._take_file(WORKER, offer(fd, "f" * 16, [4]))
        assert "bytes, not" in store._take_file(WORKER, offer(fd, nonce, [5]))
        assert "not a task" in store._take_file(WORKER, offer(fd, nonce, [4], task_id="t2"))
        assert "not a worker" in store._take_file(b"node-1/w9", offer(fd, nonce, [4]))
        assert "malformed" in store._take_file(WORKER, offer(fd, nonce, [-1, 5]))
        assert store.held == {} and store.in_memory == 0
        assert store._take_file(WORKER, offer(fd, nonce, [4])) == ""  # the real one: taken
        assert "held already" in store._take_file(WORKER, offer(fd, nonce, [4]))
    finally:
        os.close(unsealed)
        os.close(fd)


class _Hub:
    """What the store sends (``send_now``), kept: the store's only use of its hub here."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[bytes]]] = []

    def send_now(self, name: str, frames: list[bytes]) -> None:
        self.sent.append((name, frames))


def test_a_put_announced_before_the_first_tick_is_still_awaited_after_it(store: ResultStore) -> None:
    """A scatter right after the node started: the master's ExpectScatter comes before the
    hub's first tick, which must not find it 120 s overdue and fail the client's scatter."""
    hub: Any = _Hub()
    assert store.from_master(hub, m.ExpectScatter("scatter-1", "client key", 10))
    assert hub.sent == [("master", [m.encode(m.ScatterExpected("scatter-1"))])]
    store.tick(hub, time.monotonic())
    assert "scatter-1" in store.expected and len(hub.sent) == 1  # no Scattered: not overdue


def test_the_results_socket_admits_only_the_keys_the_master_named_here(
    store: ResultStore,
) -> None:
    """A driver's AssignTask relayed to a worker, or a scatter announced, names its owner's key;
    no other key may connect. Past the bound, the keys named longest ago go first."""
    hub: Any = _Hub()
    assert not store.admits(b"A" * 40) and not store.admits(b"")
    relayed = TaskEnds()  # what the node reads of the frames it relays to its workers
    driver = m.AssignTask(task_id="t2", name="T", kind="task", code=b"c" * 1000,
                          args=b"a" * 1000, driver=True, owner="A" * 40)
    helper = m.AssignTask(task_id="t3", name="T", kind="task", code=b"", args=b"", driver=False)
    owners = [relayed.from_master(WORKER, m.encode(assign)) for assign in (driver, helper)]
    assert owners == ["A" * 40, ""] and relayed.holds(WORKER, "t2") and relayed.holds(WORKER, "t3")
    assert relayed.from_master(WORKER, b"\xc1 not msgpack") == ""
    for owner in owners:
        store.admit(owner)
    assert store.from_master(hub, m.ExpectScatter("scatter-2", "B" * 40, 10))
    assert store.admitted.keys() == {"A" * 40, "B" * 40}
    assert store.admits(b"A" * 40) and store.admits(b"B" * 40) and not store.admits(b"C" * 40)
    for n in range(MAX_ADMITTED):
        store.admit(f"{n:040d}")
        if n == MAX_ADMITTED // 2:
            store.admit("A" * 40)  # named again: kept over those named before it
    assert len(store.admitted) <= MAX_ADMITTED
    assert store.admits(b"A" * 40) and not store.admits(b"B" * 40)
    assert store.admits(f"{MAX_ADMITTED - 1:040d}".encode())


def test_a_result_whose_parts_came_as_views_is_held_and_served_whole(store: ResultStore) -> None:
    """The node's socket to its workers hands large frames over uncopied (transport/hub.py,
    "Bulk data"): the store holds those views and reads them back as the bytes they were."""
    parts = [memoryview(b"pickle" * 20_000).toreadonly(), memoryview(b"\x01" * 200_000).toreadonly()]
    assert store.from_worker(WORKER, [b"h", b"t1", *parts])  # type: ignore[list-item]
    entry = store.held["t1"]
    assert entry.lengths == [120_000, 200_000] and store.in_memory == 320_000
    assert store._as_file("t1", entry)  # what a client of this host reads: a memory file
    assert store._read(entry) == b"pickle" * 20_000 + b"\x01" * 200_000


def test_a_task_id_frame_that_came_as_a_view_is_refused_like_any_unknown_task(
        store: ResultStore) -> None:
    """A worker's frames are hostile: a task id of 64 KiB or more arrives as a view, and is
    read as the unknown task it names (no handler error, nothing held)."""
    task_id = memoryview(b"t" * (80 << 10)).toreadonly()
    assert store.from_worker(WORKER, [b"h", task_id, b"data"])  # type: ignore[list-item]
    assert store.held == {}
