"""Actors run by their hub's own thread (``HubShell``, ``Hub.host``), on real sockets: a message
from a socket is handled and answered in the hub's thread, work told from other threads wakes
it, an actor busy telling itself does not starve the sockets, and pykka's semantics hold (asks
answered, a crash stops only that actor, a stopped actor leaves the loop)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import msgspec
import pykka
import pytest
import zmq

from actors.shell import HubShell, direct_to
from tests.conftest import wait_until
from transport import Hub
from transport.hub import BATCH

DEADLINE_S = 10.0


class Echo(HubShell):
    """Answers each frame it is told about, and counts what other threads tell it."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        self.threads: set[str] = set()
        self.told: dict[int, list[int]] = {}
        self.spinning = False
        self.spins = 0
        self.stopped = threading.Event()

    def receive(self, message: Any) -> Any:
        self.threads.add(threading.current_thread().name)
        match message:
            case ("frame", body):
                self.spinning = False
                assert self.outbox is not None
                self.outbox.send("out", [b"echo:" + body])
            case ("told", sender, i):
                self.told.setdefault(sender, []).append(i)
            case ("spin",):
                self.spinning = True
                self.actor_ref.tell(("again",))
            case ("again",):
                self.spins += 1
                if self.spinning:  # tells itself until a frame arrives
                    self.actor_ref.tell(("again",))
            case ("ask",):
                return sorted(self.threads), {k: len(v) for k, v in self.told.items()}
            case ("order",):
                return self.told
            case ("boom",):
                raise KeyboardInterrupt  # not an Exception: pykka stops the actor
            case ("long", seconds):
                # One long turn (a master taking in a burst): what it sent at its start must
                # not wait for its end.
                assert self.outbox is not None
                self.outbox.send("out", [b"early"])
                ends = time.monotonic() + seconds
                while time.monotonic() < ends:
                    self.hub.flush_held()
                self.outbox.send("out", [b"late"])
        return None

    def on_stop(self) -> None:
        self.stopped.set()
        super().on_stop()


@pytest.fixture
def wired(raw_router: tuple[zmq.Socket[bytes], str]
          ) -> Iterator[tuple[zmq.Socket[bytes], Hub, list[pykka.ActorRef[Any]]]]:
    peer, address = raw_router
    refs: list[pykka.ActorRef[Any]] = []

    def on_frames(_socket: str, frames: list[bytes]) -> None:
        for ref in refs:
            ref.tell(("frame", frames[-1]))

    hub = Hub(on_frames)
    hub.add_dealer("out", address, identity=b"hosted")
    hub.start()
    try:
        yield peer, hub, refs
    finally:
        for ref in refs:
            if ref.is_alive():
                ref.stop(timeout=DEADLINE_S)
        hub.stop()


def _round_trip(peer: zmq.Socket[bytes], body: bytes) -> bytes:
    peer.send_multipart([b"hosted", body])
    identity, answer = peer.recv_multipart()
    assert identity == b"hosted"
    return answer


def _send_once_connected(peer: zmq.Socket[bytes], body: bytes) -> None:
    """The hub's dealer connects in the background: a ROUTER_MANDATORY send fails until it has."""
    peer.setsockopt(zmq.ROUTER_MANDATORY, 1)

    def sent() -> bool:
        try:
            peer.send_multipart([b"hosted", body])
            return True
        except zmq.ZMQError:
            return False

    wait_until(sent, DEADLINE_S, "the hub's dealer to connect")


def test_a_frame_is_answered_on_the_hub_thread(
        wired: tuple[zmq.Socket[bytes], Hub, list[pykka.ActorRef[Any]]]) -> None:
    peer, hub, refs = wired
    refs.append(Echo.start(hub))
    _send_once_connected(peer, b"one")
    assert peer.recv_multipart() == [b"hosted", b"echo:one"]
    assert _round_trip(peer, b"two") == b"echo:two"
    threads, _ = refs[0].ask(("ask",), timeout=DEADLINE_S)
    assert threads == ["transport-hub"]


def test_what_other_threads_tell_wakes_the_hub_and_keeps_each_threads_order(
        wired: tuple[zmq.Socket[bytes], Hub, list[pykka.ActorRef[Any]]]) -> None:
    _peer, hub, refs = wired
    ref = Echo.start(hub)
    refs.append(ref)
    per_thread = 2_000

    def tell_all(sender: int) -> None:
        for i in range(per_thread):
            ref.tell(("told", sender, i))

    senders = [threading.Thread(target=tell_all, args=(n,)) for n in range(6)]
    for thread in senders:
        thread.start()
    for thread in senders:
        thread.join(DEADLINE_S)
    # The ask itself wakes the hub: it is answered after everything told before it.
    order = ref.ask(("order",), timeout=DEADLINE_S)
    assert order == {n: list(range(per_thread)) for n in range(6)}


def test_an_actor_that_keeps_telling_itself_does_not_starve_the_sockets(
        wired: tuple[zmq.Socket[bytes], Hub, list[pykka.ActorRef[Any]]]) -> None:
    peer, hub, refs = wired
    ref = Echo.start(hub)
    refs.append(ref)
    ref.tell(("spin",))
    # It spins until a frame reaches it; a hub that ran it to the end of its inbox never reads
    # the socket again, and this would time out.
    _send_once_connected(peer, b"stop")
    assert peer.recv_multipart() == [b"hosted", b"echo:stop"]
    assert ref.ask(("ask",), timeout=DEADLINE_S) is not None


def test_a_crashed_actor_stops_alone_and_leaves_the_loop(
        wired: tuple[zmq.Socket[bytes], Hub, list[pykka.ActorRef[Any]]]) -> None:
    _peer, hub, refs = wired
    survivor = Echo.start(hub)
    crashing = Echo.start(hub)
    refs.append(survivor)
    crashing.tell(("boom",))
    wait_until(lambda: not crashing.is_alive(), DEADLINE_S, "the crashed actor to stop")
    with pytest.raises(pykka.ActorDeadError):
        crashing.ask(("ask",), timeout=DEADLINE_S)
    survivor.tell(("told", 1, 7))
    assert survivor.ask(("order",), timeout=DEADLINE_S) == {1: [7]}
    # A stopped actor is no longer run: only the survivor's turn is left.
    wait_until(lambda: len(hub._hosted) == 1, DEADLINE_S, "the stopped actor's turn to go")


def test_stop_runs_on_stop_and_refuses_later_messages(
        wired: tuple[zmq.Socket[bytes], Hub, list[pykka.ActorRef[Any]]]) -> None:
    _peer, hub, _refs = wired
    actor = Echo.start(hub)
    proxy_stopped = actor.proxy().stopped.get(timeout=DEADLINE_S)
    actor.stop(timeout=DEADLINE_S)
    assert proxy_stopped.is_set()
    with pytest.raises(pykka.ActorDeadError):
        actor.tell(("told", 0, 0))


def test_an_actor_cannot_be_hosted_by_a_hub_that_has_not_started() -> None:
    hub = Hub(lambda _socket, _frames: None)
    with pytest.raises(RuntimeError, match="before Hub.start"):
        Echo.start(hub)
    assert not pykka.ActorRegistry.get_by_class(Echo)  # nothing left for stop_all to wait on
    hub.stop()


def test_what_a_long_turn_sent_leaves_before_the_turn_ends(
        wired: tuple[zmq.Socket[bytes], Hub, list[pykka.ActorRef[Any]]]) -> None:
    peer, hub, refs = wired
    ref = Echo.start(hub)
    refs.append(ref)
    _send_once_connected(peer, b"hello")
    assert peer.recv_multipart() == [b"hosted", b"echo:hello"]
    ref.tell(("long", 1.0))
    started = time.monotonic()
    assert peer.poll(int(DEADLINE_S * 1000))
    assert peer.recv_multipart() == [b"hosted", b"early"]
    assert time.monotonic() - started < 0.5  # held for the whole turn, it came after 1 s
    assert peer.recv_multipart() == [b"hosted", b"late"]


def test_a_lone_answer_leaves_before_the_rest_of_its_turn(
        wired: tuple[zmq.Socket[bytes], Hub, list[pykka.ActorRef[Any]]]) -> None:
    """One message in, one answer out: the answer goes as it is made, not at the turn's end (a
    lone round trip's every hop would wait for its handler's bookkeeping after the answer)."""
    peer, hub, refs = wired
    released, turn_ended = threading.Event(), threading.Event()

    class AnswersThenWaits(Echo):
        def receive(self, message: Any) -> Any:
            super().receive(message)
            if message == ("frame", b"hold"):  # the rest of its turn: long
                released.wait(DEADLINE_S)
                turn_ended.set()
            return None

    refs.append(AnswersThenWaits.start(hub))
    _send_once_connected(peer, b"hello")
    assert peer.recv_multipart() == [b"hosted", b"echo:hello"]
    peer.send_multipart([b"hosted", b"hold"])
    came = peer.poll(int(DEADLINE_S / 2 * 1000))  # while the turn that answered still runs
    ended_first = turn_ended.is_set()
    released.set()
    assert came and not ended_first, "the answer waited for its turn's end"
    assert peer.recv_multipart() == [b"hosted", b"echo:hold"]
    assert turn_ended.wait(DEADLINE_S)


def test_a_burst_on_one_socket_does_not_hold_another_sockets_message_behind_it(
        raw_router: tuple[zmq.Socket[bytes], str]) -> None:
    """50 batches of 1,000 on one socket, then one message on another, all waiting as the hub
    comes to read: taken a few batches a turn, the lone message is handed on long before the
    burst's end (read whole, it came after all 50,000)."""
    peer, address = raw_router
    order: list[bytes] = []
    done = threading.Event()

    def on_frames(socket: str, frames: list[bytes]) -> None:
        order.append(frames[-1] if socket == "quiet" or frames[-1] == b"last" else b"m")
        if frames[-1] == b"last":
            done.set()

    hub = Hub(on_frames)
    hub.add_dealer("out", address, identity=b"hosted")
    hub.add_dealer("quiet", address, identity=b"quiet")
    hub.start()
    release, holding = threading.Event(), threading.Event()

    def hold() -> None:  # the hub thread, busy while the burst comes in
        holding.set()
        release.wait(DEADLINE_S)

    try:
        _send_once_connected(peer, b"hello")
        wait_until(lambda: _sent(peer, b"quiet", b"hello"), DEADLINE_S, "the second dealer")
        wait_until(lambda: len(order) == 2, DEADLINE_S, "both dealers to be heard")
        order.clear()
        hub.host(hold)
        assert holding.wait(DEADLINE_S)
        batch = BATCH + msgspec.msgpack.encode([([], b"m")] * 1000)
        for _ in range(50):
            peer.send_multipart([b"hosted", batch])
        peer.send_multipart([b"quiet", b"lone"])
        peer.send_multipart([b"hosted", b"last"])
        release.set()
        assert done.wait(DEADLINE_S)
        assert len(order) == 50_002 and order[-1] == b"last"
        assert order.index(b"lone") < 40_000
    finally:
        release.set()
        hub.stop()


def _sent(peer: zmq.Socket[bytes], identity: bytes, body: bytes) -> bool:
    try:
        peer.send_multipart([identity, body])
        return True
    except zmq.ZMQError:
        return False


@pytest.fixture
def wired_direct(raw_router: tuple[zmq.Socket[bytes], str]
                 ) -> Iterator[tuple[zmq.Socket[bytes], Hub, list[Any]]]:
    """As ``wired``, with the master's and the worker's way in: a lone frame is handed to the
    actor in the hub's own call (``deliver_now``), else told. ``state`` holds the actor's ref,
    its direct way in, and what each delivery answered."""
    peer, address = raw_router
    state: list[Any] = [None, direct_to(None), []]

    def on_frames(_socket: str, frames: list[bytes]) -> None:
        ref, direct, answers = state
        body = frames[-1]
        if body.startswith(b"first:"):  # something told before the frame, from this thread
            ref.tell(("told", 0, 1))
        message = ("boom",) if body == b"boom" else ("frame", body)
        delivered = hub.lone() and direct(message)
        answers.append(delivered)
        if not delivered:
            ref.tell(message)

    hub = Hub(on_frames)
    hub.add_dealer("out", address, identity=b"hosted")
    hub.start()
    try:
        yield peer, hub, state
    finally:
        if state[0] is not None and state[0].is_alive():
            state[0].stop(timeout=DEADLINE_S)
        hub.stop()


def _hosted_echo(hub: Hub, state: list[Any]) -> pykka.ActorRef[Any]:
    ref = Echo.start(hub)
    state[0], state[1] = ref, direct_to(ref)
    ref.ask(("ask",), timeout=DEADLINE_S)  # (its first turn has run: it takes messages now)
    return ref


def test_a_lone_frame_is_handled_in_the_hubs_own_call(
        wired_direct: tuple[zmq.Socket[bytes], Hub, list[Any]]) -> None:
    peer, hub, state = wired_direct
    ref = _hosted_echo(hub, state)
    _send_once_connected(peer, b"one")
    assert peer.recv_multipart() == [b"hosted", b"echo:one"]
    assert _round_trip(peer, b"two") == b"echo:two"
    assert state[2] == [True, True]  # neither went through the inbox
    threads, _ = ref.ask(("ask",), timeout=DEADLINE_S)
    assert threads == ["transport-hub"]


def test_a_frame_does_not_overtake_what_was_told_before_it(
        wired_direct: tuple[zmq.Socket[bytes], Hub, list[Any]]) -> None:
    peer, hub, state = wired_direct
    ref = _hosted_echo(hub, state)
    _send_once_connected(peer, b"first:frame")
    assert peer.recv_multipart() == [b"hosted", b"echo:first:frame"]
    assert state[2] == [False]  # its inbox held a message: the frame was told behind it
    assert ref.ask(("order",), timeout=DEADLINE_S) == {0: [1]}


def test_a_crash_in_a_frame_handled_at_once_stops_the_actor_as_a_told_one_does(
        wired_direct: tuple[zmq.Socket[bytes], Hub, list[Any]]) -> None:
    peer, hub, state = wired_direct
    ref = _hosted_echo(hub, state)
    _send_once_connected(peer, b"boom")
    wait_until(lambda: not ref.is_alive(), DEADLINE_S, "the crashed actor to stop")
    assert state[2] == [True]
    with pytest.raises(pykka.ActorDeadError):
        ref.ask(("ask",), timeout=DEADLINE_S)
    wait_until(lambda: not hub._hosted, DEADLINE_S, "the stopped actor's turn to go")
