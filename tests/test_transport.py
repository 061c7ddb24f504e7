"""The transport hub on real sockets: what one turn sends to a peer leaves as one batch frame,
arrives message by message and in order, and a bad batch is dropped without harm."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from tests.conftest import wait_until
from transport import Hub
from transport.hub import BATCH

DEADLINE_S = 10.0


class Received:
    """What a hub's on_frames saw, for the test thread to wait on."""

    def __init__(self) -> None:
        self.frames: queue.SimpleQueue[tuple[str, list[bytes]]] = queue.SimpleQueue()

    def __call__(self, socket: str, frames: list[bytes]) -> None:
        self.frames.put((socket, frames))

    def take(self, n: int) -> list[list[bytes]]:
        return [self.frames.get(timeout=DEADLINE_S)[1] for _ in range(n)]


@pytest.fixture
def router(tmp_path: Path) -> Iterator[tuple[Hub, Received, str]]:
    received = Received()
    hub = Hub(received)
    hub.add_router("in", f"ipc://{tmp_path}/router.sock")
    hub.start()
    try:
        yield hub, received, hub.address("in")
    finally:
        hub.stop()


def dealer_hub(address: str, identity: bytes) -> tuple[Hub, Received]:
    received = Received()
    hub = Hub(received)
    hub.add_dealer("out", address, identity=identity)
    hub.start()
    return hub, received


def io_threads() -> dict[int, int]:
    """ZeroMQ's I/O threads in this process: thread id -> scheduling policy."""
    found = {}
    for thread in Path("/proc/self/task").iterdir():
        try:
            if (thread / "comm").read_text().startswith("ZMQbg/IO"):
                found[int(thread.name)] = os.sched_getscheduler(int(thread.name))
        except OSError:  # a thread that ended meanwhile
            continue
    return found


def started_since(before: set[int], count: int) -> dict[int, int]:
    """The ``count`` I/O threads started since ``before`` (libzmq names a thread and sets its
    policy as it starts, after the socket that started it exists)."""
    found: dict[int, int] = {}

    def named() -> bool:
        found.clear()
        found.update({tid: policy for tid, policy in io_threads().items() if tid not in before})
        return len(found) >= count

    wait_until(named, DEADLINE_S, f"{count} new ZeroMQ I/O threads")
    return found


def test_zeromqs_io_thread_never_preempts_the_thread_that_sends(tmp_path: Path) -> None:
    """A hub's ZeroMQ I/O thread runs as a batch thread (no preemption when a send wakes it:
    see transport.hub._batch_io_threads), and messages still go both ways; a context of
    ZeroMQ's own keeps the default policy."""
    before = set(io_threads())
    plain = zmq.Context()
    plain.socket(zmq.PULL).close()
    assert set(started_since(before, 1).values()) == {os.SCHED_OTHER}
    plain.term()
    before = set(io_threads())
    hub, received = dealer_hub(f"ipc://{tmp_path}/r.sock", b"d")
    peer = Received()
    server = Hub(peer)
    server.add_router("in", f"ipc://{tmp_path}/r.sock")
    server.start()
    out, back = hub.outbox(), server.outbox()
    try:
        assert set(started_since(before, 2).values()) == {os.SCHED_BATCH}
        out.send("out", [b"ping"])
        assert peer.take(1) == [[b"d", b"ping"]]
        back.send("in", [b"d", b"pong"])
        assert received.take(1) == [[b"pong"]]
    finally:
        out.close()  # (an outbox left open holds its hub's stop forever)
        back.close()
        hub.stop()
        server.stop()


IDLE_PROCESS = """
import os, sys, time
from pathlib import Path
from transport import Hub
os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
hub = Hub(lambda socket, frames: None)  # made under SCHED_IDLE
try:  # the rest at the usual share: an idle process may wait for long on a busy machine
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
except PermissionError:
    pass
hub.add_router("in", "ipc://" + sys.argv[1])
hub.start()
deadline, policies = time.monotonic() + 30, {}
while not policies and time.monotonic() < deadline:  # (libzmq names its thread as it starts)
    policies = {int(t.name): os.sched_getscheduler(int(t.name))
                for t in Path("/proc/self/task").iterdir()
                if (t / "comm").read_text().startswith("ZMQbg/IO")}
    time.sleep(0.01)
hub.stop()
print(sorted(set(policies.values())))
"""


def test_a_hub_made_under_another_policy_asks_for_none(tmp_path: Path) -> None:
    """libzmq aborts a process whose thread cannot take the policy asked (an unprivileged
    process under SCHED_IDLE cannot leave it): a hub made under a policy other than the default
    asks for none, and serves."""
    done = subprocess.run([sys.executable, "-c", IDLE_PROCESS, str(tmp_path / "s.sock")],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() in (f"[{os.SCHED_OTHER}]", f"[{os.SCHED_IDLE}]"), done.stdout


def test_a_burst_arrives_whole_and_in_order_through_batches(
    router: tuple[Hub, Received, str]
) -> None:
    _hub, received, address = router
    sender, _ = dealer_hub(address, b"sender")
    try:
        outbox = sender.outbox()
        bodies = [msgspec.msgpack.encode(["msg", i]) for i in range(3_000)]
        for i, body in enumerate(bodies):
            # Some messages carry a route frame before the body, as a node's relays do.
            outbox.send("out", [b"w1", body] if i % 3 == 0 else [body])
        got = received.take(len(bodies))
        outbox.close()
    finally:
        sender.stop()
    expected = [[b"sender", b"w1", body] if i % 3 == 0 else [b"sender", body]
                for i, body in enumerate(bodies)]
    assert got == expected


def test_a_turn_to_one_peer_leaves_as_one_frame_and_a_lone_message_as_itself(
    raw_router: tuple[zmq.Socket[bytes], str]
) -> None:
    raw, address = raw_router
    sender, _ = dealer_hub(address, b"sender")
    try:
        outbox = sender.outbox()
        bodies = [msgspec.msgpack.encode(i) for i in range(2_000)]
        for body in bodies:
            outbox.send("out", [body])
        arrived: list[bytes] = []
        frames_seen = 0
        for _ in range(len(bodies)):  # bounded: at most one frame per message
            identity, frame = raw.recv_multipart()
            frames_seen += 1
            if frame[:1] == BATCH:
                arrived += [body for route, body in msgspec.msgpack.decode(frame[1:])]
            else:
                arrived.append(frame)
            if len(arrived) >= len(bodies):
                break
        assert arrived == bodies
        assert frames_seen < len(bodies) / 2, "a burst should travel in batches"
        # Alone, a message is sent as it is: a receiver that knows no batches can read it.
        lone = msgspec.msgpack.encode("alone")
        outbox.send("out", [lone])
        assert raw.recv_multipart() == [b"sender", lone]
        outbox.close()
    finally:
        sender.stop()


def test_a_router_batches_per_peer_and_keeps_each_peers_order(
    router: tuple[Hub, Received, str]
) -> None:
    hub, received, address = router
    started = {name: dealer_hub(address, name) for name in (b"p1", b"p2")}
    peers = {name: hub for name, (hub, _) in started.items()}
    try:
        for name, peer in peers.items():
            out = peer.outbox()
            out.send("out", [b"hello from " + name])
            out.close()
        received.take(2)  # the router now knows both identities
        outbox = hub.outbox()
        for i in range(1_000):
            outbox.send("in", [b"p1" if i % 2 else b"p2", str(i).encode()])
        outbox.close()
        for name, parity in ((b"p1", 1), (b"p2", 0)):
            got = [frames[0] for frames in started[name][1].take(500)]
            assert got == [str(i).encode() for i in range(1_000) if i % 2 == parity]
    finally:
        for peer in peers.values():
            peer.stop()


def test_a_malformed_batch_is_dropped_and_the_hub_keeps_serving(
    router: tuple[Hub, Received, str]
) -> None:
    _hub, received, address = router
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.IDENTITY, b"vandal")
    raw.connect(address)
    try:
        raw.send(BATCH + b"\x00\xff not msgpack")
        raw.send(BATCH + msgspec.msgpack.encode([["not", "a", "route"]]))
        raw.send(BATCH + msgspec.msgpack.encode([[[b"r"], b"fine"], [[], b"also fine"]]))
        raw.send(b"after")
        assert received.take(3) == [[b"vandal", b"r", b"fine"], [b"vandal", b"also fine"],
                                    [b"vandal", b"after"]]
    finally:
        raw.close()
        ctx.term()


def test_outboxes_of_many_threads_lose_nothing_and_keep_each_threads_order(
    router: tuple[Hub, Received, str]
) -> None:
    """Senders share the hub's queue and wake it only when no wake-up is on its way: a message
    appended just as the hub takes the last one must still go out."""
    _hub, received, address = router
    sender, _ = dealer_hub(address, b"sender")
    threads, per_thread = 4, 2_000

    def send_all(t: int) -> None:
        outbox = sender.outbox()
        for i in range(per_thread):
            outbox.send("out", [f"{t}:{i}".encode()])
            if i % 500 == 0:
                time.sleep(0.001)  # let the hub drain to empty now and then, mid-burst
        outbox.close()

    try:
        workers = [threading.Thread(target=send_all, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        got = [frames[1].decode() for frames in received.take(threads * per_thread)]
        for w in workers:
            w.join(DEADLINE_S)
    finally:
        sender.stop()
    for t in range(threads):
        mine = [int(x.split(":")[1]) for x in got if x.startswith(f"{t}:")]
        assert mine == list(range(per_thread)), f"thread {t} lost or reordered messages"


@pytest.mark.parametrize("views", [False, True])
def test_large_frames_arrive_whole_and_as_views_only_where_asked(tmp_path: Path,
                                                                 views: bool) -> None:
    """A result's bytes cross a ``views`` socket uncopied (a read-only view of ZeroMQ's buffer,
    still valid once the hub has moved on); every other socket hands over ``bytes``, and small
    frames are ``bytes`` everywhere (handlers decode ids and bodies from them)."""
    received = Received()
    hub = Hub(received)
    hub.add_router("in", f"ipc://{tmp_path}/router.sock", views=views)
    hub.start()
    sender, _ = dealer_hub(hub.address("in"), b"sender")
    large = [bytes([i]) * (1 << 20) for i in range(3)]
    small = msgspec.msgpack.encode(["body", 1])
    try:
        outbox = sender.outbox()
        outbox.send("out", [b"r", *large, small])
        outbox.send("out", [b"after"])
        first, after = received.take(2)
        outbox.close()
    finally:
        sender.stop()
        hub.stop()
    assert [bytes(f) for f in first] == [b"sender", b"r", *large, small]
    assert after == [b"sender", b"after"]
    for frame in (first[0], first[1], first[-1], *after):
        assert type(frame) is bytes
    for frame in first[2:-1]:
        if views:
            assert isinstance(frame, memoryview) and frame.readonly
        else:
            assert type(frame) is bytes


def test_a_part_that_cannot_be_sent_leaves_no_message_half_sent() -> None:
    """The hub sends a message's parts one by one: one refused after the first would leave the
    message open, and the next one sent would join it, on a ROUTER to the first one's peer."""
    import types

    ctx = zmq.Context()
    try:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        router.bind("inproc://half-sent")
        peers = {}
        for name in (b"alice", b"bob"):
            peers[name] = ctx.socket(zmq.DEALER)
            peers[name].setsockopt(zmq.IDENTITY, name)
            peers[name].connect("inproc://half-sent")
            peers[name].send(b"hello")
            router.recv_multipart()
        hub = types.SimpleNamespace(_views=set(), _poller=None, _loop_routes={})  # what Hub._send reads
        with pytest.raises(TypeError):
            Hub._send(hub, b"peers", router, [b"alice", "not bytes"])  # type: ignore[arg-type]
        assert Hub._send(hub, b"peers", router, [b"bob", b"for bob"])  # type: ignore[arg-type]
        assert peers[b"bob"].poll(5000) and peers[b"bob"].recv_multipart() == [b"for bob"]
        assert not peers[b"alice"].poll(100)
    finally:
        ctx.destroy(linger=0)


def test_a_handlers_message_sent_in_order_leaves_after_what_threads_queued_before_it(
    router: tuple[Hub, Received, str]
) -> None:
    """A client's tick releases a future just after a user thread queued the Submit naming it:
    the Release must not overtake that Submit. Here the hub is held inside its tick while a
    thread queues more than one turn takes, then the tick sends its own message in order."""
    _hub, received, address = router
    queued, sent = threading.Event(), threading.Event()
    burst = 25_000  # more than a turn takes (_TURN_ITEMS): some are still queued at the tick

    def on_tick(_now: float) -> None:
        if sent.is_set() or not queued.wait(DEADLINE_S):
            return
        sender.send_in_order("out", [b"last"])
        sent.set()

    sender = Hub(Received(), on_tick=on_tick, tick_s=0.01)
    sender.add_dealer("out", address, identity=b"sender")
    sender.start()
    try:
        outbox = sender.outbox()
        for i in range(burst):
            outbox.send("out", [str(i).encode()])
        queued.set()  # the hub may be in its tick, waiting: all of the burst is queued before
        got = [frames[1] for frames in received.take(burst + 1)]
        outbox.close()
    finally:
        sender.stop()
    assert sent.is_set()
    assert got == [str(i).encode() for i in range(burst)] + [b"last"]


def test_a_dealer_parked_under_an_id_still_held_is_heard_once_it_connects_afresh(
        tmp_path: Path) -> None:
    """A router that gives no connection an id another holds (the master's keyed one) parks
    the newer one for good, even once the older is gone: a peer that reconnected while its
    master was paused is not heard until it connects again (``Outbox.reconnect``)."""
    received = Received()
    master = Hub(received)
    master.add_router("in", f"ipc://{tmp_path}/router.sock", handover=False)
    master.start()
    old, _ = dealer_hub(master.address("in"), b"node")
    new: Hub | None = None
    outboxes = []
    try:
        old_outbox = old.outbox()
        outboxes.append(old_outbox)
        old_outbox.send("out", [b"from the old connection"])
        assert received.take(1) == [[b"node", b"from the old connection"]]
        events: queue.SimpleQueue[str] = queue.SimpleQueue()
        new = Hub(Received(), on_event=lambda _socket, what: events.put(what))
        new.add_dealer("out", master.address("in"), identity=b"node", monitor=True)
        new.start()
        # Its handshake done while the old connection holds the id, so parked (a connection
        # that came once the old one was gone would find the id free, and be heard).
        while events.get(timeout=DEADLINE_S) != "connected":
            pass
        outbox = new.outbox()
        outboxes.append(outbox)
        outbox.send("out", [b"parked"])
        old_outbox.close()
        outboxes.remove(old_outbox)
        old.stop()  # the id is free now, and the new connection still has none
        outbox.send("out", [b"still parked"])
        with pytest.raises(queue.Empty):
            received.frames.get(timeout=1.0)
        outbox.reconnect("out")
        outbox.send("out", [b"heard"])
        assert received.take(1) == [[b"node", b"heard"]]
    finally:
        for box in outboxes:  # (an outbox left open holds its hub's stop forever)
            box.close()
        for hub in (new, old, master):
            if hub is not None:
                hub.stop()


def test_a_call_asked_for_later_runs_on_the_hub_thread_on_time_without_a_tick() -> None:
    """``Hub.call_at`` from the hub thread: each call runs there once its time has come, in the
    order of their times, though the next tick is an hour away and no socket brings anything
    (a worker's gathered results, held a moment for the next task's end, rely on it)."""
    hub = Hub(lambda socket, frames: None, on_tick=lambda now: None, tick_s=3600)
    hub.start()
    fired: list[tuple[str, bool, bool]] = []
    try:
        def turn() -> None:
            now = time.monotonic()
            for name, after in (("later", 0.05), ("sooner", 0.01)):
                hub.call_at(now + after, lambda name=name, when=now + after: fired.append(
                    (name, time.monotonic() >= when, threading.get_ident() == hub._ident)))
            return None  # (a hosted turn that is done: it leaves the loop)

        hub.host(turn)
        wait_until(lambda: len(fired) == 2, timeout=10, what="both calls")
        assert fired == [("sooner", True, True), ("later", True, True)]
    finally:
        hub.stop()
