"""A loopback (``Hub.add_loopback``): a dealer whose peer is the hub's own keyed router, as a
master's local node inside the master's process speaks to it. Real hubs, a real CURVE router
on loopback TCP, a real peer beside the loopback: each handler must see what a socket of that
kind would have handed it."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from actors.shell import HubShell
from tests.conftest import wait_until
from transport import ClientCurve, Hub, ServerCurve, init_keys, load_keypair, load_public_key
from transport.keys import allowed_dir

Received = queue.Queue[tuple[str, list[bytes]]]


def _hubs(tmp_path: Path) -> tuple[Hub, Hub, Received, Received, bytes, bytes]:
    """A hub with a keyed router "peers" and a loopback "node" to it (identity b"inside"),
    and another hub whose dealer is a real peer of that router (identity b"outside")."""
    keys = init_keys(tmp_path / "keys")
    master, node, client = (load_keypair(keys, role) for role in ("master", "node", "client"))
    inside: Received = queue.Queue()
    outside: Received = queue.Queue()
    hub = Hub(lambda socket, frames: inside.put((socket, [bytes(f) for f in frames])))
    hub.add_router("peers", "tcp://127.0.0.1:0", with_keys=True,
                   curve=ServerCurve(master.public, master.secret, str(allowed_dir(keys))))
    hub.add_loopback("node", "peers", b"inside", node.public)
    hub.start()
    peer = Hub(lambda socket, frames: outside.put((socket, [bytes(f) for f in frames])))
    peer.add_dealer("master", hub.address("peers"), identity=b"outside",
                    curve=ClientCurve(client.public, client.secret,
                                      load_public_key(keys, "master")))
    peer.start()
    return hub, peer, inside, outside, node.public, client.public


def _on_hub(hub: Hub, call: object) -> None:
    """Run ``call`` on the hub thread (where the master's and the node's handlers send), in the
    handler of a message sent through the loopback; every message still reaches the handler."""
    done = threading.Event()
    handler = hub._on_frames

    def first_runs_the_call(socket: str, frames: list[bytes]) -> None:
        if not done.is_set():
            call()  # type: ignore[operator]
            done.set()
        handler(socket, frames)

    hub._on_frames = first_runs_the_call
    hub.outbox().send("node", [b"wake"])
    assert done.wait(10), "the hub thread did not run the call"


def test_what_the_loopback_sends_reaches_the_router_as_a_keyed_peers_message(
        tmp_path: Path) -> None:
    hub, peer, inside, outside, node_key, client_key = _hubs(tmp_path)
    try:
        outbox = hub.outbox()
        outbox.send("node", [b"hello"])
        assert inside.get(timeout=10) == ("peers", [node_key, b"inside", b"hello"])
        # a real peer's message on the same router looks the same, with its own key and id
        peer.outbox().send("master", [b"from outside"])
        assert inside.get(timeout=10) == ("peers", [client_key, b"outside", b"from outside"])
        # the router's answer to the loopback's identity arrives on the loopback, its id gone;
        # to the real peer, through the socket
        outbox.send("peers", [b"inside", b"worker-7", b"to the node"])
        assert inside.get(timeout=10) == ("node", [b"worker-7", b"to the node"])
        outbox.send("peers", [b"outside", b"to the client"])
        assert outside.get(timeout=10) == ("master", [b"to the client"])
        assert inside.empty()
    finally:
        peer.stop()
        hub.stop()


def test_a_burst_through_the_loopback_arrives_whole_and_in_order(tmp_path: Path) -> None:
    """Many messages sent in one turn leave as one batch, as to a socket's peer, and are handed
    on one by one, in order, both ways."""
    hub, peer, inside, _, node_key, _ = _hubs(tmp_path)
    try:
        n = 1_000

        def burst() -> None:
            for i in range(n):
                hub.relay("node", [b"%d" % i])
                hub.relay("peers", [b"inside", b"%d" % i])

        _on_hub(hub, burst)
        got: dict[str, list[bytes]] = {"peers": [], "node": []}
        wait_until(lambda: _drain(inside, got) and len(got["peers"]) == n + 1
                   and len(got["node"]) == n, 20, "the burst both ways")
        assert got["peers"][0] == b"wake"
        assert got["peers"][1:] == got["node"] == [b"%d" % i for i in range(n)]
    finally:
        peer.stop()
        hub.stop()


class _Busy(HubShell):
    """A hosted actor (as the master is) that tells the loopback's peer (as its local node)
    first, then works on: each message it is told takes ``BUSY_S``."""

    def __init__(self, hub: Hub, progress: list[int]) -> None:
        super().__init__(hub)
        self.progress = progress  # [messages handled], read by the test's other handler

    def receive(self, message: Any) -> Any:
        match message:
            case ("send", *peers):  # (the first of a quiet turn leaves at once, the rest
                assert self.outbox is not None  # wait for the turn's end: deferred)
                for peer in peers:
                    self.outbox.send("peers", [peer, b"to " + peer])
            case ("busy",):
                ends = time.monotonic() + BUSY_S
                while time.monotonic() < ends:
                    pass
                self.progress[0] += 1
            case ("batch", count):  # one message holding many (a batched frame's): one call
                assert self.outbox is not None
                self.outbox.send("peers", [b"inside", b"early"])
                for _ in range(count):
                    self.receive(("busy",))
                    self.hub.flush_held()  # (as the master does between a batch's messages)
        return None


BUSY_S = 0.005


def test_a_long_turn_does_not_hold_what_it_sent_through_the_loopback(tmp_path: Path) -> None:
    """The loopback's peer runs on the hub's thread too: what a hosted actor sent it early in a
    long turn reaches it before the turn ends, whether the turn is many messages (it ends
    early) or one holding many (handed on from within): a master taking in a map's 2,000
    submissions held its first assignments for the ~20 ms of it, its local node's workers
    idle."""
    hub, peer, _, _, _, _ = _hubs(tmp_path)
    heard: list[tuple[bytes, int]] = []  # (body, messages the actor had handled by then)
    handled = [0]

    def on_frames(socket: str, frames: list[bytes]) -> None:
        if socket == "node":
            heard.append((bytes(frames[-1]), handled[0]))

    hub._on_frames = on_frames
    ref = _Busy.start(hub, handled)
    try:
        n = 100  # 0.5 s of work in all
        for first in (b"inside", b"outside"):  # (the loopback's first: it leaves at once)
            handled[0] = 0
            ref.tell(("send", first, b"inside"))  # (the other one deferred)
            for _ in range(n):
                ref.tell(("busy",))
            wait_until(lambda: handled[0] == n, 20, "the long turn")
            assert [body for body, _ in heard] == [b"to inside"] * (1 + (first == b"inside"))
            assert all(when < n // 2 for _, when in heard), f"heard after {heard} of {n}"
            heard.clear()
        handled[0] = 0
        ref.tell(("batch", n))
        wait_until(lambda: handled[0] == n, 20, "the long batch")
        assert [body for body, _ in heard] == [b"early"]
        assert heard[0][1] < n // 2, f"heard after {heard[0][1]} of {n} messages"
    finally:
        ref.stop(timeout=10)
        peer.stop()
        hub.stop()


def _drain(received: Received, into: dict[str, list[bytes]]) -> bool:
    while True:
        try:
            socket, frames = received.get_nowait()
        except queue.Empty:
            return True
        into[socket].append(frames[-1])


def test_a_loopback_is_made_before_the_hub_starts(tmp_path: Path) -> None:
    hub, peer, *_ = _hubs(tmp_path)
    try:
        with pytest.raises(RuntimeError, match="before start"):
            hub.add_loopback("late", "peers", b"late", b"key")
    finally:
        peer.stop()
        hub.stop()


def test_a_connection_naming_itself_as_the_loopback_is_neither_heard_nor_tracked(
        tmp_path: Path) -> None:
    """The loopback's identity is free on the router (no connection holds it): a peer with an
    admitted key that takes it must not speak as the loopback, nor make its peer look gone
    when it leaves."""
    keys = init_keys(tmp_path / "keys")
    master, node, client = (load_keypair(keys, role) for role in ("master", "node", "client"))
    heard: Received = queue.Queue()
    gone: queue.Queue[bytes] = queue.Queue()
    hub = Hub(lambda socket, frames: heard.put((socket, [bytes(f) for f in frames])),
              on_peer_gone=lambda _socket, routing: gone.put(routing))
    hub.add_router("peers", "tcp://127.0.0.1:0", with_keys=True,
                   curve=ServerCurve(master.public, master.secret, str(allowed_dir(keys))))
    hub.add_loopback("node", "peers", b"inside", node.public)
    hub.start()
    curve = ClientCurve(client.public, client.secret, load_public_key(keys, "master"))
    impostor = Hub(lambda socket, frames: None)
    impostor.add_dealer("master", hub.address("peers"), identity=b"inside", curve=curve)
    impostor.start()
    honest = Hub(lambda socket, frames: None)
    honest.add_dealer("master", hub.address("peers"), identity=b"honest", curve=curve)
    honest.start()
    try:
        impostor.outbox().send("master", [b"as the node"])
        honest.outbox().send("master", [b"after it"])
        # (the honest peer's message, sent after, is heard: the impostor's was read before it)
        assert heard.get(timeout=10) == ("peers", [client.public, b"honest", b"after it"])
        hub.outbox().send("node", [b"the loopback still speaks"])
        assert heard.get(timeout=10) == ("peers", [node.public, b"inside",
                                                   b"the loopback still speaks"])
        impostor.stop()
        honest.stop()
        assert gone.get(timeout=15) == b"honest"  # (the impostor, stopped first, went unseen)
        assert heard.empty() and gone.empty()
    finally:
        impostor.stop()
        honest.stop()
        hub.stop()
