"""Actors run by their hub's own thread (``HubShell``, ``Hub.host``), on real sockets: a message
from a socket is handled and answered in the hub's thread, work told from other threads wakes
it, an actor busy telling itself does not starve the sockets, and pykka's semantics hold (asks
answered, a crash stops only that actor, a stopped actor leaves the loop)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pykka
import pytest
import zmq

from actors.shell import HubShell
from tests.conftest import wait_until
from transport import Hub

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
