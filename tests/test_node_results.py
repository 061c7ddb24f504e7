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
from actors.node_data import boot_id
from actors.node_results import (
    EXPECT_S,
    MAX_ADMITTED,
    MAX_EXPECTED,
    MAX_WAITING,
    SHARE_WAIT_S,
    UNSHARED_TTL_S,
    ResultStore,
)
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


# --- who gets what: fetches, shares, memory, puts and inputs (a recording hub) -----------------

OWNER, OTHER = "O" * 40, "X" * 40


def fetch(task_id: str, key: str = OWNER, routing: bytes = b"r1", local: bool = False
          ) -> list[bytes]:
    """A client's FetchResult as the results ROUTER hands it over: [key, routing, body]."""
    msg = (m.FetchResult(task_id, boot_id(), os.getuid()) if local
           else m.FetchResult(task_id))
    return [key.encode(), routing, m.encode(msg)]


def answers(hub: Any) -> list[tuple[bytes, m.Message, list[bytes]]]:
    """What went to clients on the results socket: (routing, message, parts after it)."""
    return [(frames[0], m.decode(frames[1]), frames[2:]) for name, frames in hub.sent
            if name == "results"]


def held(store: ResultStore, data: bytes, task_id: str = "t1") -> None:
    """The worker ran ``task_id`` (the master's AssignTask, relayed) and leaves its result."""
    assign = m.AssignTask(task_id=task_id, name="T", kind="task", code=b"", args=b"", driver=True)
    store.tasks.from_master(WORKER, m.encode(assign))  # type: ignore[attr-defined]
    assert store.from_worker(WORKER, [b"h", task_id.encode(), data])
    assert task_id in store.held


def test_a_held_result_goes_to_its_owner_alone_and_a_probe_learns_nothing(
        store: ResultStore) -> None:
    hub: Any = _Hub()
    held(store, b"result")
    assert store.from_master(hub, m.ShareResult("t1", WORKER.decode(), OWNER))
    store.from_client(hub, fetch("t1", OTHER, b"stranger"))
    store.from_client(hub, fetch("t2", OTHER, b"none"))  # a result no one holds
    store.from_client(hub, fetch("t1", OWNER, b"owner"))
    (r1, other, _), (r2, none, _), (r3, data, parts) = answers(hub)
    assert (r1, r2, r3) == (b"stranger", b"none", b"owner")
    assert isinstance(other, m.ResultMissing) and isinstance(none, m.ResultMissing)
    assert other.reason == none.reason  # the same answer for another's result as for none
    assert isinstance(data, m.ResultData) and data.size == 6 and parts == [b"result"]
    store.from_master(hub, m.DropResults(["t1"]))  # delivered
    assert store.held == {} and store.in_memory == 0


def test_a_fetch_before_the_masters_share_waits_for_it_within_bounds(store: ResultStore) -> None:
    hub: Any = _Hub()
    held(store, b"early")
    held(store, b"never", "t2")
    store.from_client(hub, fetch("t1", OWNER, b"quick"))
    for n in range(MAX_WAITING):  # one result's parked fetches are bounded
        store.from_client(hub, fetch("t2", OTHER, b"p%d" % n))
    store.from_client(hub, fetch("t2", OTHER, b"one too many"))
    assert [(r, type(msg)) for r, msg, _ in answers(hub)] == [
        (b"one too many", m.ResultMissing)]  # answered at once: not the owner's
    store.from_master(hub, m.ShareResult("t1", WORKER.decode(), OWNER))
    routing, data, parts = answers(hub)[-1]
    assert routing == b"quick" and isinstance(data, m.ResultData) and parts == [b"early"]
    # The share of t2 never comes: its parked fetches are told so at their deadline, not before.
    store.tick(hub, store.now + SHARE_WAIT_S / 2)
    assert len(answers(hub)) == 2 and len(store.waiting["t2"]) == MAX_WAITING
    store.tick(hub, store.now + SHARE_WAIT_S)
    late = answers(hub)[2:]
    assert len(late) == MAX_WAITING and "t2" not in store.waiting
    assert all(isinstance(msg, m.ResultMissing) and "did not confirm" in msg.reason
               for _, msg, _ in late)


def test_a_share_naming_another_worker_holds_nothing_and_fails_the_waiting_fetches(
        store: ResultStore) -> None:
    hub: Any = _Hub()
    held(store, b"mine")
    store.from_client(hub, fetch("t1", OWNER, b"waiting"))
    store.from_master(hub, m.ShareResult("t1", "node-1/w2", OWNER))  # not the worker that left it
    [(routing, msg, _)] = answers(hub)
    assert routing == b"waiting" and isinstance(msg, m.ResultMissing)
    assert store.held["t1"].owner == ""  # still no one's


def test_results_past_the_memory_budget_wait_on_disk_and_come_back_whole(
        tmp_path: Path) -> None:
    spill = tmp_path / "spill"
    store = ResultStore("node-1", KeyPair(b"", b""), "127.0.0.1", str(spill), TaskEnds(),
                        memory_bytes=250)
    hub: Any = _Hub()
    try:
        for task_id, byte in (("a", b"a"), ("b", b"b"), ("c", b"c")):
            held(store, byte * 100, task_id)
        assert store.in_memory == 200  # the third went past 250: to disk
        on_disk = store.held["c"]
        assert on_disk.data is None and os.path.exists(on_disk.path)
        assert oct(os.stat(on_disk.path).st_mode & 0o777) == "0o600"
        store.from_master(hub, m.ShareResult("c", WORKER.decode(), OWNER))
        store.from_client(hub, fetch("c"))
        [(_, data, parts)] = answers(hub)
        assert isinstance(data, m.ResultData) and b"".join(parts) == b"c" * 100
        store.from_master(hub, m.DropResults(["a", "c", "unknown"]))
        assert not os.path.exists(on_disk.path) and store.in_memory == 100
    finally:
        store.close()
    assert store.held == {} and store.in_memory == 0


def test_a_result_the_master_never_claims_goes_after_its_time(store: ResultStore) -> None:
    hub: Any = _Hub()
    held(store, b"orphan")
    held(store, b"claimed", "t2")
    store.held["t2"].owner = OWNER
    start = store.now  # (the hub's clock, read by the store as it was made)
    store.tick(hub, start + UNSHARED_TTL_S - 1)
    assert set(store.held) == {"t1", "t2"}
    store.tick(hub, start + UNSHARED_TTL_S + 1)
    assert set(store.held) == {"t2"} and store.in_memory == len(b"claimed")


def put(task_id: str, parts: list[bytes], key: str = OWNER,
        lengths: list[int] | None = None) -> list[bytes]:
    """A client's PutResult and its parts, as the results ROUTER hands them over."""
    body = m.encode(m.PutResult(task_id, [len(p) for p in parts] if lengths is None else lengths))
    return [key.encode(), b"routing", body, *parts]


def told_master(hub: Any) -> list[m.Message]:
    return [m.decode(frames[0]) for name, frames in hub.sent if name == "master"]


def test_a_scatter_is_taken_only_from_the_key_announced_and_only_as_announced(
        store: ResultStore) -> None:
    hub: Any = _Hub()
    store.from_master(hub, m.ExpectScatter("s1", OWNER, 10))
    store.from_master(hub, m.ExpectScatter("s2", OWNER, 10))
    store.from_client(hub, put("s1", [b"x" * 10], key=OTHER))  # a stranger: said to no one
    assert told_master(hub) == [m.ScatterExpected("s1"), m.ScatterExpected("s2")]
    assert "s1" in store.expected
    store.from_client(hub, put("s2", [b"x" * 9]))  # not the size announced
    store.from_client(hub, put("s1", [b"01234", b"56789"]))
    expected, wrong, right = told_master(hub)[1:]
    assert isinstance(wrong, m.Scattered) and wrong.reason == "the data is not what was announced"
    assert right == m.Scattered("s1", 10, "")
    assert store.held["s1"].owner == OWNER and store.held["s1"].lengths == [5, 5]
    assert store.expected == {} and "s2" not in store.held
    store.from_client(hub, fetch("s1"))  # the owner reads it back (a task's input, or gather)
    assert b"".join(answers(hub)[0][2]) == b"0123456789"


def test_announced_puts_are_bounded_and_time_out(store: ResultStore) -> None:
    hub: Any = _Hub()
    for n in range(MAX_EXPECTED + 1):
        store.from_master(hub, m.ExpectScatter(f"s{n}", OWNER, 1))
    refused = told_master(hub)[-1]
    assert isinstance(refused, m.Scattered) and "too many puts" in refused.reason
    assert len(store.expected) == MAX_EXPECTED
    store.tick(hub, store.now + EXPECT_S + 1)
    late = told_master(hub)[MAX_EXPECTED + 1:]
    assert len(late) == MAX_EXPECTED and store.expected == {}
    assert all(isinstance(msg, m.Scattered) and "in time" in msg.reason for msg in late)


def test_a_held_result_is_an_input_only_of_the_workers_the_master_names(
        store: ResultStore) -> None:
    hub: Any = _Hub()
    sent: list[tuple[bytes, bytes, m.Message]] = []
    store.reply = lambda _hub, origin, requester, body: sent.append(
        (origin, requester, m.decode(body)))
    held(store, b"input")
    store.input_request(hub, b"", m.encode(m.InputRequest("t1", "node-2/w1")))
    store.input_request(hub, b"peer", m.encode(m.InputRequest("t1", "node-3/w4")))
    store.input_request(hub, b"", m.encode(m.InputRequest("t9", "node-2/w1")))  # none such
    [(_, _, none)] = sent
    assert isinstance(none, m.InputData) and none.reason and none.data == b""
    store.from_master(hub, m.ShareInput("t1", "node-2/w1"))
    origin, requester, data = sent[1]
    assert (origin, requester) == (b"", b"node-2/w1")
    assert isinstance(data, m.InputData) and data.data == b"input" and not data.reason
    store.tick(hub, store.now + SHARE_WAIT_S + 1)  # node-3/w4 was never named: refused
    origin, requester, refused = sent[2]
    assert (origin, requester) == (b"peer", b"node-3/w4")
    assert isinstance(refused, m.InputData) and refused.reason and refused.data == b""
    assert store.inputs_waiting == {}


def test_a_client_on_this_host_reads_the_result_from_a_file_not_the_socket(
        store: ResultStore) -> None:
    hub: Any = _Hub()
    held(store, b"local" * 1000)
    store.from_master(hub, m.ShareResult("t1", WORKER.decode(), OWNER))
    store.from_client(hub, fetch("t1", local=True))
    [(_, data, parts)] = answers(hub)
    assert isinstance(data, m.ResultData) and parts == [] and data.path
    with open(data.path, "rb") as f:
        assert f.read() == b"local" * 1000
    assert store.local_files == 1 and store.in_memory == 5000  # in the file, still counted
    store.from_master(hub, m.DropResults(["t1"]))
    assert store.local_files == 0 and store.in_memory == 0
