"""The largest message the master reads (``--max-message``): a peer's frame past it cuts the peer
off before the master reads or allocates it, a client refuses to send one (MessageTooLarge,
nothing registered; a resend past it fails its future), a node sends a failure of the task in
place of a worker's message past it, and the runtime's own reports stay far below (a run's
inline results are bounded)."""

from __future__ import annotations

import collections
import gc
import os
import signal
import threading
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq

from actors import Client, Task
from actors import messages as m
from actors.errors import LargePayloadWarning, MessageTooLarge
from actors.master_gate import MasterGate
from actors.node_actor import relay_frames
from actors.serialize import MAX_DESCRIBED_CHARS, describe_exception, dumps, loads
from actors.unit_runner import Ran, UnitRunner
from tests.conftest import kill_all, shown, start_master, wait_until
from transport.keys import load_keypair, load_public_key

MIB = 1 << 20


class _Recorded(collections.deque[str]):
    """A client's queue of released futures' ids that remembers every one put in it."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def append(self, task_id: str) -> None:
        self.seen.append(task_id)
        super().append(task_id)


class Size(Task):
    def work(self, data):
        return len(data)


def master_pid_rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


@pytest.mark.processes
def test_a_client_refuses_a_message_the_master_would_not_read(tmp_path: Path) -> None:
    """The bound comes in the master's Welcome: a submission past it fails at submit() with
    MessageTooLarge naming the option, leaves no future behind, and the client serves on."""
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "1", "--keys", str(keys),
                                   "--max-message", "64", "--max-key-memory", "0")
    try:
        with Client(address, keys=keys) as client:
            with pytest.raises(MessageTooLarge, match="--max-message") as refused:
                client.submit(Size, bytes(70 * MIB))
            assert refused.value.limit == 64 * MIB and refused.value.size > 70 * MIB
            assert not client._futures and not client._unaccepted
            assert client.submit(Size, bytes(MIB)).result(timeout=60) == MIB
    finally:
        kill_all({master.pid})
        master.wait(10)


@pytest.mark.processes
def test_a_map_with_one_item_refused_sends_none_of_them(tmp_path: Path) -> None:
    """``client.map`` is all or none: an item past the bound (or one that does not pickle)
    raises before any item is sent, so no task runs that the caller holds no future to."""
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "1", "--keys", str(keys),
                                   "--max-message", "64", "--max-key-memory", "0")
    try:
        with Client(address, keys=keys) as client:
            items = [b"a", b"bc", bytes(70 * MIB), b"d"]
            with pytest.raises(MessageTooLarge, match="--max-message"):
                client.map(Size, items)
            with pytest.raises(Exception, match="lock"):
                client.map(Size, [b"a", threading.Lock(), b"c"])  # the second does not pickle
            # Each item alone is within the bound, but the first carries the class's code
            # (sent once): past the bound, found after the futures were made and registered.
            # None stays registered, and none is released when it goes (never sent).
            class LargeCode(Task):
                """Pickles to 40 MiB: what a class captures goes with its code."""

                ballast = bytes(40 * MIB)

                def work(self, data: bytes) -> int:
                    return len(data)

            client._released = released = _Recorded()
            with pytest.warns(LargePayloadWarning), \
                    pytest.raises(MessageTooLarge, match="--max-message"):
                client.map(LargeCode, [bytes(30 * MIB), b"b"])
            del LargeCode
            gc.collect()
            assert not client._futures and not client._unaccepted and not released.seen
            assert client.tasks() == []  # the master never heard of any of them
            futures = client.map(Size, [b"a", b"bc", bytes(MIB)])
            assert [f.result(timeout=60) for f in futures] == [1, 2, MIB]
            assert len(client.tasks()) == 3
    finally:
        kill_all({master.pid})
        master.wait(10)


@pytest.mark.processes
def test_a_frame_past_the_bound_cuts_its_sender_off_unread(tmp_path: Path) -> None:
    """A peer with a valid key that sends one 200 MiB frame: the master closes its connection
    as the frame's header arrives (its peak memory does not grow by the frame), and serves
    other clients as before."""
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(keys),
                                   "--max-message", "64")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    monitor = raw.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        with Client(address, keys=keys) as client:  # the master is up, its keys are made
            assert client.info().tasks_queued == 0
            Path(f"/proc/{master.pid}/clear_refs").write_text("5")  # VmHWM from here on
            before = master_pid_rss_kib(master.pid, "VmRSS")
            pair = load_keypair(keys, "client")
            raw.setsockopt(zmq.LINGER, 0)
            raw.curve_publickey, raw.curve_secretkey = pair.public, pair.secret
            raw.curve_serverkey = load_public_key(keys, "master")
            raw.connect(address)
            raw.send(bytes(200 * MIB), copy=False)
            assert monitor.poll(60_000), "the master kept the connection"
            grown = master_pid_rss_kib(master.pid, "VmHWM") - before
            assert grown < 100 * 1024, f"the master's peak grew {grown} KiB"
            assert master.poll() is None
            client.submit(Size, b"still serving")  # no worker: it queues
            wait_until(lambda: client.info().tasks_queued == 1, 30, "the next submit to queue")
    finally:
        raw.disable_monitor()
        monitor.close(linger=0)
        raw.close(linger=0)
        ctx.term()
        kill_all({master.pid})
        master.wait(10)


class Relayed:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list[bytes]]] = []

    def relay(self, socket: str, frames: list[bytes]) -> None:
        self.sent.append((socket, frames))

    def tell(self, message: object) -> None:  # (as the node's actors: the Welcome goes there)
        pass


def test_a_worker_message_past_the_masters_bound_fails_its_task_instead() -> None:
    """Relayed, a worker's message past what the master reads would get the node cut off and
    leave the task waiting forever: the node sends a failed TaskResult of the task it names in
    its place (MessageTooLarge, which ends the task from any of its workers); one at the bound
    goes as it is. The bound is the master's own, from its Welcome."""
    hub, told, gate = Relayed(), Relayed(), MasterGate()
    relay_frames(hub, told, told, "master",  # type: ignore[arg-type]
                 [m.encode(m.Welcome("m1", "n1", 1.0, 0, 64 * MIB))], None, None, gate)
    def result(size: int) -> bytes:  # a TaskResult of this many bytes, encoded
        def encoded(value: int) -> bytes:
            return m.encode(m.TaskResult("t1", m.UnitOutcome(-1, False, bytes(value))))
        return encoded(size - (len(encoded(MIB)) - MIB))

    at_bound = result(64 * MIB)
    assert len(at_bound) == 64 * MIB
    for body in (at_bound, result(64 * MIB + 1)):
        relay_frames(hub, told, told, "workers", [b"n1/w1", b"m", body],  # type: ignore[arg-type]
                     None, None, gate)
    (_, kept), (_, replaced) = hub.sent
    assert kept == [b"n1/w1", at_bound]
    failed = m.decode(replaced[1])
    assert isinstance(failed, m.TaskResult) and failed.task_id == "t1" and not failed.outcome.ok
    error = loads(failed.outcome.value)
    assert isinstance(error, MessageTooLarge) and error.limit == 64 * MIB
    assert error.size == 64 * MIB + 1 and "TaskResult from worker n1/w1" in str(error)
    # Several tasks' ends in one message past the bound (a worker gathers 1 MiB at most): each
    # of the tasks it names fails, not none.
    ends = m.TaskResults([m.TaskResult(f"t{i}", m.UnitOutcome(-1, True, bytes(33 * MIB)))
                          for i in (2, 3)])
    relay_frames(hub, told, told, "workers", [b"n1/w1", b"m", m.encode(ends)],  # type: ignore[arg-type]
                 None, None, gate)
    many = m.decode(hub.sent[-1][1][1])
    assert isinstance(many, m.TaskResults) and [e.task_id for e in many.results] == ["t2", "t3"]
    assert not any(e.outcome.ok for e in many.results)
    assert "TaskResults from worker n1/w1" in str(loads(many.results[0].outcome.value))


class LongError(Task):
    def work(self, n):
        raise ValueError("x" * n)


@pytest.mark.processes
def test_a_task_whose_failure_is_past_the_bound_fails_with_that_said(tmp_path: Path) -> None:
    """An exception of 70 MiB (its message and traceback travel with it) cannot reach the master
    under --max-message 64: the client gets MessageTooLarge for the task, not a wait forever,
    and the cluster serves on."""
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "1", "--keys", str(keys),
                                   "--max-message", "64")
    try:
        with Client(address, keys=keys) as client:
            error = client.submit(LongError, 70 * MIB).exception(timeout=60)
            assert isinstance(error, MessageTooLarge), error
            assert "TaskResult from worker" in str(error) and error.limit == 64 * MIB
            assert client.submit(Size, b"next").result(timeout=60) == 4
    finally:
        kill_all({master.pid})
        master.wait(10)


@pytest.mark.processes
def test_a_long_message_crosses_once_and_the_user_gets_it_whole(tmp_path: Path) -> None:
    """An exception with a 30 MiB message goes once as the pickled exception, its message and
    traceback as text cut short beside it: under --max-message 64 (three copies would be 90
    MiB) the client raises it with its message whole, and the story keeps a short cause."""
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "1", "--keys", str(keys),
                                   "--max-message", "64")
    try:
        with Client(address, keys=keys) as client:
            failed = client.submit(LongError, 30 * MIB)
            error = failed.exception(timeout=60)
            assert isinstance(error, ValueError), error
            message = shown(error)
            assert message.startswith("x" * (30 * MIB)) and "Remote traceback" in message
            assert len(message) < 30 * MIB + 2 * MAX_DESCRIBED_CHARS  # not twice over
            assert "more characters" in message  # (the traceback's last line, cut)
    finally:
        kill_all({master.pid})
        master.wait(10)


def test_a_described_exception_cuts_its_text_not_its_payload() -> None:
    payload, _, message, text = describe_exception(ValueError("y" * (MAX_DESCRIBED_CHARS + 10)))
    assert len(loads(payload).args[0]) == MAX_DESCRIBED_CHARS + 10
    assert message.endswith("... (10 more characters)")
    assert text.endswith(" more characters)\n") and len(text) < 2 * MAX_DESCRIBED_CHARS


class Coded(Task):
    ballast = b"c" * (30 * MIB)  # the class pickles to ~30 MiB: its code is that large

    def work(self, data):
        return len(data)


@pytest.mark.processes
def test_a_resend_past_the_bound_fails_its_future_once(tmp_path: Path) -> None:
    """A submission sent without its code (shipped before) passes the check; the master dies
    before making it durable, and a restarted one gets it again with its code, past the bound.
    Sent, it would cut the client off at every reconnection: its future fails instead."""
    keys, state = tmp_path / "keys", tmp_path / "state"
    args = ("--workers", "0", "--keys", str(keys), "--state-dir", str(state),
            "--max-message", "64", "--max-key-memory", "0")
    master, address = start_master(tmp_path, *args)
    port = int(address.rsplit(":", 1)[1])
    try:
        with Client(address, keys=keys) as client:
            with pytest.warns(LargePayloadWarning):
                client.submit(Coded, b"small")  # ships the code
            wait_until(lambda: not client._unaccepted, 60, "the first to be made durable")
            os.kill(master.pid, signal.SIGSTOP)
            late = client.submit(Coded, bytes(40 * MIB))  # 40 MiB without its code: it passes
            kill_all({master.pid})
            master.wait(10)
            master, _ = start_master(tmp_path, *args, port=port, name="master2")
            error = late.exception(timeout=60)
            assert isinstance(error, MessageTooLarge) and "sent again" in str(error)
            assert client.info().tasks_queued == 1  # the first, from the journal; served on
    finally:
        kill_all({master.pid})
        master.wait(10)


class Blobs:
    _task_stop = None

    def work_unit(self, index: int) -> bytes:
        return bytes([index % 256]) * 200_000  # inline alone (< 256 KiB): 24 MB in the run


def test_a_runs_inline_results_stay_under_their_bound_and_the_rest_are_held() -> None:
    """120 results of 200 kB in one run: those past RUN_INLINE_BYTES are kept on the worker
    (reported held, with their size) so that the report stays far below what a node relays."""
    sent: list[m.Message] = []
    calls: list[Any] = []
    told: list[Any] = []
    runner = UnitRunner("n1/w1", sent.append, lambda frames: None,
                        lambda call, _task: calls.append(call), told.append)
    runner.instance = Blobs()
    runner.run_units(m.RunUnits("t1", 1, [m.UnitCall(i, dumps(i)) for i in range(120)]))
    calls.pop()()  # the executor thread's part, here
    ran = told.pop()
    assert isinstance(ran, Ran) and ran.large
    runner.ran(ran)
    done = [msg for msg in sent if isinstance(msg, m.UnitsDone)]
    assert len(done) == 1
    outcomes = done[0].outcomes
    assert sorted(o.index for o in outcomes) == list(range(120))
    inline = sum(len(o.value) for o in outcomes if not o.held)
    held = [o for o in outcomes if o.held]
    assert 0 < inline <= m.RUN_INLINE_BYTES and held
    assert all(o.size == len(dumps(b"\0" * 200_000)) and not o.value for o in held)
    assert len(m.encode(done[0])) < m.RUN_INLINE_BYTES + MIB
    for o in held:  # kept under its unit's key, for the driver to gather
        assert f"t1:{o.index}" in runner.state.data


def test_the_bound_is_said_in_welcome_and_older_peers_decode_the_rest() -> None:
    """``Welcome.max_message`` is a trailing field: a peer of the same protocol built before it
    decodes the rest, and a Welcome without it means no bound."""
    data = m.encode(m.Welcome("m1", "c1", 1.0, 3, 64 * MIB))
    welcome = m.decode(data)
    assert isinstance(welcome, m.Welcome) and welcome.max_message == 64 * MIB
    assert m.Welcome("m1", "c1").max_message == 0

    class Welcome(msgspec.Struct, tag=True, array_like=True):  # as it was before the field
        master_id: str
        peer_id: str
        heartbeat_s: float = 1.0
        epoch: int = 0

    assert msgspec.msgpack.decode(data, type=Welcome) == Welcome("m1", "c1", 1.0, 3)
