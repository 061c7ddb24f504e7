"""The node's result store taking a worker's result file: only a sealed memory file of that
worker's own, named with the nonce it said, of the size it said. Real memory files of this
process stand for the worker's (the store opens them through /proc, as it would a worker's)."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from actors import messages as m
from actors import node_results
from actors.memory import sealed_file
from actors.node_actor import TaskEnds
from actors.node_data import boot_id
from actors.node_results import (
    EXPECT_S,
    MAX_ADMITTED,
    MAX_EXPECTED,
    MAX_LOCAL_FILES,
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
    assert owners == [["A" * 40], []] and relayed.holds(WORKER, "t2") and relayed.holds(WORKER, "t3")
    # A worker's queued tasks in one message: each held, each driver's owner named.
    queued = [msgspec.structs.replace(driver, task_id=f"q{n}", owner=f"{n:040d}") for n in (4, 5)]
    many = relayed.from_master(WORKER, m.encode(m.AssignTasks([*queued, helper])))
    assert many == [f"{4:040d}", f"{5:040d}"]
    assert relayed.holds(WORKER, "q4") and relayed.holds(WORKER, "q5")
    assert relayed.from_master(WORKER, b"\xc1 not msgpack") == []
    for owner in owners[0]:
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
    assert len(sent) == 2  # node-3/w4 still waits for a share of its own
    store.tick(hub, store.now + SHARE_WAIT_S + 1)  # node-3/w4 was never named: refused
    origin, requester, refused = sent[2]
    assert (origin, requester) == (b"peer", b"node-3/w4")
    assert isinstance(refused, m.InputData) and refused.reason and refused.data == b""
    assert store.inputs_waiting == {}


def test_an_input_asked_for_by_several_tasks_workers_waits_for_each_ones_share(
        store: ResultStore) -> None:
    """Four tasks take one result (a diamond): their workers, here and on a peer node, may ask
    before the master's shares come, each share naming one of them, in any order."""
    hub: Any = _Hub()
    sent: list[tuple[bytes, bytes, m.Message]] = []
    store.reply = lambda _hub, origin, requester, body: sent.append(
        (origin, requester, m.decode(body)))
    held(store, b"input")
    readers = [(b"peer", "node-2/w1"), (b"peer", "node-2/w2"), (b"", "node-1/w2")]
    for origin, reader in readers:
        store.input_request(hub, origin, m.encode(m.InputRequest("t1", reader)))
    assert sent == []
    for origin, reader in reversed(readers):
        store.from_master(hub, m.ShareInput("t1", reader))
        assert sent[-1] == (origin, reader.encode(), m.InputData("t1", b"input", [5], ""))
    assert len(sent) == 3 and store.inputs_waiting == {}


def test_an_input_read_by_ever_new_workers_forgets_the_one_named_longest_ago(
        store: ResultStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived input (a scattered table) shared with more workers than a held result
    remembers: the newest are served, the one named longest ago is forgotten. (Its first
    1,024 readers were kept and every later one refused: their tasks failed.)"""
    monkeypatch.setattr(node_results, "MAX_READERS", 3)
    hub: Any = _Hub()
    sent: list[tuple[bytes, m.Message]] = []
    store.reply = lambda _hub, _origin, requester, body: sent.append((requester, m.decode(body)))
    held(store, b"input")
    for n in range(5):
        store.from_master(hub, m.ShareInput("t1", f"node-2/w{n}"))
    store.from_master(hub, m.ShareInput("t1", "node-2/w2"))  # named again: newest now
    for n in (4, 3, 2):
        store.input_request(hub, b"", m.encode(m.InputRequest("t1", f"node-2/w{n}")))
        assert sent[-1] == (f"node-2/w{n}".encode(), m.InputData("t1", b"input", [5], ""))
    store.input_request(hub, b"", m.encode(m.InputRequest("t1", "node-2/w1")))  # forgotten
    store.tick(hub, store.now + SHARE_WAIT_S + 1)
    requester, refused = sent[-1]
    assert requester == b"node-2/w1" and isinstance(refused, m.InputData) and refused.reason


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


def test_frames_that_are_not_a_hold_are_left_to_others_and_replies_say_what_was_handled(
        store: ResultStore) -> None:
    hub: Any = _Hub()
    assert not store.from_worker(WORKER, [b"x", b"t1", b"data"])  # another layout's
    assert not store.from_worker(WORKER, [b"h", b"t1"])  # a hold with no part
    assert store.held == {}
    assert not store.from_master(hub, m.Heartbeat())  # for the node, not the store
    assert store.from_master(hub, m.DropResults(["unknown"]))
    assert store.from_master(hub, m.ShareResult("unknown", WORKER.decode(), OWNER))


def test_a_result_of_several_parts_is_answered_with_their_lengths(store: ResultStore) -> None:
    hub: Any = _Hub()
    assert store.from_worker(WORKER, [b"h", b"t1", b"pickle", b"buffer-1", b"b2"])
    store.from_master(hub, m.ShareResult("t1", WORKER.decode(), OWNER))
    store.from_client(hub, fetch("t1"))
    [(_, data, parts)] = answers(hub)
    assert isinstance(data, m.ResultData) and data.lengths == [6, 8, 2] and data.size == 16
    assert parts == [b"pickle", b"buffer-1", b"b2"]


def test_results_held_in_memory_files_spill_to_disk_and_release_their_descriptors(
        tmp_path: Path) -> None:
    tasks = TaskEnds()
    for task_id in ("t1", "t2"):
        tasks.from_master(WORKER, m.encode(m.AssignTask(task_id=task_id, name="T", kind="task",
                                                        code=b"", args=b"", driver=True)))
    spill = tmp_path / "spill"
    store = ResultStore("node-1", KeyPair(b"", b""), "127.0.0.1", str(spill), tasks,
                        memory_bytes=1500, pids={WORKER.decode(): os.getpid()})
    hub: Any = _Hub()
    try:
        for task_id, byte in (("t1", b"1"), ("t2", b"2")):
            made = sealed_file([byte * 1000], "pydra-result")
            assert made is not None
            try:
                assert store._take_file(WORKER, offer(made[0], made[1], [1000], task_id)) == ""
            finally:
                os.close(made[0])
        # the second went past 1,500 bytes: read from its memory file into a private one
        assert store.local_files == 1 and store.in_memory == 1000
        on_disk = store.held["t2"]
        assert on_disk.fd == -1 and on_disk.path.startswith(str(spill))
        assert oct(os.stat(spill).st_mode & 0o777) == "0o700"
        with open(on_disk.path, "rb") as f:
            assert f.read() == b"2" * 1000
        # a client of this host is sent the spilled copy's path; of another host, its bytes
        store.from_master(hub, m.ShareResult("t2", WORKER.decode(), OWNER))
        store.from_client(hub, fetch("t2", local=True))
        store.from_client(hub, fetch("t2", routing=b"remote"))
        (_, local, _), (_, remote, parts) = answers(hub)
        assert isinstance(local, m.ResultData) and local.path == on_disk.path
        assert isinstance(remote, m.ResultData) and not remote.path
        assert parts == [b"2" * 1000]
    finally:
        store.close()
    assert store.local_files == 0 and store.in_memory == 0
    assert not os.path.exists(on_disk.path)


def test_only_a_client_of_this_boot_and_uid_is_sent_a_path(store: ResultStore) -> None:
    hub: Any = _Hub()
    held(store, b"data")
    store.from_master(hub, m.ShareResult("t1", WORKER.decode(), OWNER))
    for boot, uid in ((boot_id(), os.getuid() + 1), ("another-boot", os.getuid())):
        store.from_client(hub, [OWNER.encode(), b"r", m.encode(m.FetchResult("t1", boot, uid))])
    assert [msg.path for _, msg, _ in answers(hub)] == ["", ""]  # type: ignore[attr-defined]
    assert store.local_files == 0


def test_a_local_fetch_that_waited_for_the_share_is_answered_with_a_file(
        store: ResultStore) -> None:
    hub: Any = _Hub()
    held(store, b"x" * 100)
    store.from_client(hub, fetch("t1", local=True))
    store.from_master(hub, m.ShareResult("t1", WORKER.decode(), OWNER))
    [(_, data, parts)] = answers(hub)
    assert isinstance(data, m.ResultData) and data.path and parts == []


def test_what_a_put_brings_counts_against_the_memory_budget(tmp_path: Path) -> None:
    store = ResultStore("node-1", KeyPair(b"", b""), "127.0.0.1", str(tmp_path / "spill"),
                        TaskEnds(), memory_bytes=150)
    hub: Any = _Hub()
    try:
        store.from_master(hub, m.ExpectScatter("s1", OWNER, 100))
        store.from_master(hub, m.ExpectScatter("s2", OWNER, 100))
        store.from_client(hub, put("s1", [b"a" * 100]))
        store.from_client(hub, put("s2", [b"b" * 100]))
        assert store.in_memory == 100 and store.held["s2"].path  # the second on disk
        store.from_master(hub, m.ExpectScatter("s1", OWNER, 100))  # the same id again
        store.from_client(hub, put("s1", [b"c" * 100]))
        assert told_master(hub)[-1] == m.Scattered("s1", 100, "the data is not what was "
                                                              "announced")
        assert store.held["s1"].data == [b"a" * 100]  # the first kept
    finally:
        store.close()


def test_an_input_is_read_from_wherever_its_result_waits(tmp_path: Path) -> None:
    tasks = TaskEnds()
    tasks.from_master(WORKER, m.encode(m.AssignTask(task_id="t1", name="T", kind="task",
                                                    code=b"", args=b"", driver=True)))
    store = ResultStore("node-1", KeyPair(b"", b""), "127.0.0.1", str(tmp_path / "spill"),
                        tasks, memory_bytes=10)
    hub: Any = _Hub()
    sent: list[m.Message] = []
    store.reply = lambda _hub, _origin, _requester, body: sent.append(m.decode(body))
    try:
        assert store.from_worker(WORKER, [b"h", b"t1", b"pickle", b"buffer"])
        assert store.held["t1"].path  # past 10 bytes: on disk
        store.from_master(hub, m.ShareInput("t1", "node-2/w1"))
        store.input_request(hub, b"", m.encode(m.InputRequest("t1", "node-2/w1")))
        os.unlink(store.held["t1"].path)  # its copy gone (a full tmpfs cleaned, a disk error)
        store.input_request(hub, b"", m.encode(m.InputRequest("t1", "node-2/w1")))
    finally:
        store.close()
    ok, lost = sent
    assert ok == m.InputData("t1", b"picklebuffer", [6, 6], "")
    assert isinstance(lost, m.InputData) and "unreadable" in lost.reason
    assert lost.data == b"" and lost.lengths == []


def test_an_input_asked_for_before_the_master_names_its_reader_waits_then_is_refused(
        store: ResultStore) -> None:
    hub: Any = _Hub()
    sent: list[tuple[Any, bytes, bytes, m.Message]] = []
    store.reply = lambda via, origin, requester, body: sent.append(
        (via, origin, requester, m.decode(body)))
    held(store, b"input")
    start = store.now
    for n in range(MAX_WAITING - 1):
        store.input_request(hub, b"peer", m.encode(m.InputRequest("t1", f"node-2/w{n}")))
    store.now = start + SHARE_WAIT_S / 2
    store.input_request(hub, b"", m.encode(m.InputRequest("t1", "node-3/w1")))  # asked later
    store.input_request(hub, b"peer", m.encode(m.InputRequest("t1", "node-4/w1")))  # one too many
    [(via, origin, requester, refused)] = sent  # past the bound: answered at once
    assert via is hub and (origin, requester) == (b"peer", b"node-4/w1")
    assert isinstance(refused, m.InputData) and refused.reason
    store.tick(hub, start + SHARE_WAIT_S / 2)
    assert len(sent) == 1  # none due yet
    store.tick(hub, start + SHARE_WAIT_S + 0.5)  # the first ones due, the later one not
    assert len(sent) == MAX_WAITING and store.inputs_waiting["t1"] == [
        (b"", "node-3/w1", start + SHARE_WAIT_S / 2 + SHARE_WAIT_S)]
    assert {(o, r) for _, o, r, _ in sent[1:]} == {
        (b"peer", f"node-2/w{n}".encode()) for n in range(MAX_WAITING - 1)}
    assert all(isinstance(msg, m.InputData) and msg.reason and via is hub
               for via, _, _, msg in sent[1:])
    store.tick(hub, start + 2 * SHARE_WAIT_S)
    assert store.inputs_waiting == {} and sent[-1][1:3] == (b"", b"node-3/w1")


def test_a_taken_result_file_is_checked_whole_and_kept_private(store: ResultStore) -> None:
    made = sealed_file([b"", b"data"], "pydra-result")  # an empty out-of-band buffer is fine
    assert made is not None
    fd, nonce = made
    try:
        assert "malformed" in store._take_file(WORKER, offer(fd, "", [0, 4]))  # no nonce
        store.local_files = MAX_LOCAL_FILES
        assert "result files held already" in store._take_file(WORKER, offer(fd, nonce, [0, 4]))
        store.local_files = MAX_LOCAL_FILES - 1
        store.in_memory = 10  # what others hold: added to
        assert store._take_file(WORKER, offer(fd, nonce, [0, 4])) == ""
    finally:
        os.close(fd)
    entry = store.held["t1"]
    assert store.local_files == MAX_LOCAL_FILES and store.in_memory == 14
    assert entry.lengths == [0, 4] and entry.nonce == nonce
    assert fcntl.fcntl(entry.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # not into a task's exec
    hub: Any = _Hub()  # a local client is told the nonce its file's name must carry
    store.from_master(hub, m.ShareResult("t1", WORKER.decode(), OWNER))
    store.from_client(hub, fetch("t1", local=True))
    [(_, data, _)] = answers(hub)
    assert isinstance(data, m.ResultData) and data.nonce == nonce and data.path


def test_results_that_just_fill_the_memory_budget_stay_in_memory(tmp_path: Path) -> None:
    store = ResultStore("node-1", KeyPair(b"", b""), "127.0.0.1", str(tmp_path / "spill"),
                        TaskEnds(), memory_bytes=200)
    hub: Any = _Hub()
    try:
        for task_id in ("s1", "s2"):
            store.from_master(hub, m.ExpectScatter(task_id, OWNER, 100))
            store.from_client(hub, put(task_id, [b"z" * 100]))
        assert store.in_memory == 200 and all(e.data is not None for e in store.held.values())
        assert not (tmp_path / "spill").exists()
    finally:
        store.close()


def test_a_result_whose_copy_went_is_answered_missing_and_several_parts_keep_their_lengths(
        tmp_path: Path) -> None:
    store = ResultStore("node-1", KeyPair(b"", b""), "127.0.0.1", str(tmp_path / "spill"),
                        TaskEnds(), memory_bytes=10)
    hub: Any = _Hub()
    try:
        store.from_master(hub, m.ExpectScatter("s1", OWNER, 20))
        store.from_client(hub, put("s1", [b"a" * 5, b"b" * 15]))
        store.from_client(hub, fetch("s1", local=True, routing=b"here"))
        os.unlink(store.held["s1"].path)
        store.from_client(hub, fetch("s1", routing=b"there"))
    finally:
        store.close()
    (r1, local, _), (r2, lost, _) = answers(hub)
    assert r1 == b"here" and isinstance(local, m.ResultData) and local.lengths == [5, 15]
    assert r2 == b"there" and isinstance(lost, m.ResultMissing) and "unreadable" in lost.reason
