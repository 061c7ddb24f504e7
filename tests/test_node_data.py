"""The node's data plane (actors/node_data.py) fed frames directly: what it relays, to whom,
and what it refuses, with a hub that records what it would send (no sockets; the process
tests in test_data_plane.py, test_trust.py and test_containment.py drive the real one)."""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec
import pytest
from structlog.testing import capture_logs

from actors import messages as m
from actors import node_data
from actors.errors import MalformedMessage
from actors.node_data import (
    ASKED_S,
    DATA,
    DATA_LOCAL,
    DATA_MARK,
    MAX_ATTACHED,
    MAX_PEERS,
    RESULTS_HOLDER,
    DataPlane,
    boot_id,
    data_host,
)
from actors.worker import with_attached
from transport.hub import ClientCurve
from transport.keys import KeyPair


class _FakeHub:
    """What the plane would send, open and close: kept, not done."""

    def __init__(self) -> None:
        self.open: list[str] = []
        self.dialed: dict[str, tuple[str, dict[str, object]]] = {}  # name -> (address, options)
        self.sent: list[tuple[str, list[bytes]]] = []

    def send_now(self, name: str, frames: list[bytes]) -> bool:
        self.sent.append((name, frames))
        return True

    def open_dealer_now(self, name: str, address: str, **options: object) -> None:
        self.open.append(name)
        self.dialed[name] = (address, options)

    def close_now(self, name: str) -> None:
        self.open.remove(name)


def new_plane(address: str = "tcp://127.0.0.1:2") -> tuple[Any, Any]:
    """A node n1's data plane, its address ``address``, and the hub it sends through."""
    plane = DataPlane("n1", KeyPair(b"p" * 40, b"s" * 40), "/nonexistent", "tcp://127.0.0.1:1")
    plane.address = address
    return plane, _FakeHub()


def test_peer_connections_are_capped_least_recently_used_first() -> None:
    plane, hub = new_plane()
    addresses = [f"tcp://10.0.0.{i}:9" for i in range(MAX_PEERS + 5)]
    plane.from_master(m.encode(m.RunUnits("t", 1, [], [(i, "w", a) for i, a in enumerate(addresses)])))
    body = m.encode(m.DataRequest("t", ["t:0"], "w"))
    plane.from_worker(hub, b"w", [b"p", addresses[0].encode(), b"h", body])
    for address in addresses[1:]:
        plane.from_worker(hub, b"w", [b"p", address.encode(), b"h", body])
        plane.from_worker(hub, b"w", [b"p", addresses[0].encode(), b"h", body])
    assert len(hub.open) == MAX_PEERS
    assert f"peer:{addresses[0]}" in hub.open, "the one used all along stays open"
    assert f"peer:{addresses[1]}" not in hub.open, "the least recently used was closed"
    plane.from_worker(hub, b"w", [b"p", b"tcp://10.9.9.9:9", b"h", body])
    assert "peer:tcp://10.9.9.9:9" not in hub.open
    assert hub.sent[-1][0] == "workers"  # answered at once: every key missing
    reply = m.decode(hub.sent[-1][1][-1])
    assert isinstance(reply, m.DataReply) and reply.missing == ["t:0"]


def test_a_peer_known_local_late_gets_an_ipc_socket_and_the_tcp_one_stays_for_its_replies(
) -> None:
    """A request that left over TCP before the master's LocalPeers named its peer a node of
    this host: later requests go by ipc (CURVE caps TCP at a fraction of what ipc moves here),
    and the TCP socket is not closed under the reply on its way."""
    plane, hub = new_plane()
    plane.local_address = "ipc:///run/n1/data"
    peer = "tcp://127.0.0.1:3"
    plane.from_master(m.encode(m.RunUnits("t", 1, [], [(0, "w", peer)])))
    body = m.encode(m.DataRequest("t", ["t:0"], "w"))
    plane.from_worker(hub, b"w", [b"p", peer.encode(), b"h", body])
    plane.local_peers(m.LocalPeers([(peer, f"{boot_id()} {os.getuid()} ipc:///run/n2/data")]))
    plane.from_worker(hub, b"w", [b"p", peer.encode(), b"h", body])
    plane.from_worker(hub, b"w", [b"p", peer.encode(), b"h", body])
    assert hub.open == [f"peer:{peer}", "peer:ipc:///run/n2/data"]
    assert [name for name, _ in hub.sent] == [f"peer:{peer}", *["peer:ipc:///run/n2/data"] * 2]


def asked_by(plane: Any, hub: _FakeHub) -> None:
    """w1 (ours) and w7 (of node n2) ask our worker w2 for data; what that sends is dropped."""
    ask = m.encode(m.DataRequest("t", ["t:0"], "w1"))
    plane.from_worker(hub, b"w1", [b"p", plane.address.encode(), b"w2", ask])
    plane.from_network(hub, "data", [b"n2", b"w2", m.encode(m.DataRequest("t", ["t:0"], "w7"))])
    assert [frames[:2] for _, frames in hub.sent] == [[b"w2", b"d"]] * 2
    hub.sent.clear()


def test_a_worker_sends_on_the_data_plane_only_requests_of_its_own_and_replies_to_them(
) -> None:
    """The node relays what a worker sends on the data plane to the worker it names: a request
    must be one (DataRequest, InputRequest) and name its sender as the requester; a reply must
    be a DataReply naming its sender as the holder, to a requester that asked it (or, from a
    peer node, to one of ours that asked that node). What the plane hands a worker comes after
    its mark, which a worker's own node messages never have."""
    plane, hub = new_plane()
    here = plane.address.encode()
    assign = m.encode(m.AssignTask(task_id="x", name="T", kind="task", code=b"c", args=b"",
                                   driver=True))
    reply = m.encode(m.DataReply("t", "w2", [("t:0", b"v")], []))
    for sender, frames in [
            (b"w1", [b"p", here, b"w2", assign]),  # not a request
            (b"w1", [b"p", here, b"w2", m.encode(m.DataRequest("t", ["t:0"], "w3"))]),  # not its
            (b"w2", [b"r", b"", b"w1", reply]),  # nobody asked w2
            (b"w2", [b"r", b"", b"w1", assign])]:  # not a reply
        assert plane.from_worker(hub, sender, frames)
    assert hub.sent == []
    plane.from_worker(hub, b"w1", [b"p", here, b"w2", m.encode(m.DataRequest("t", ["t:0"], "w1"))])
    assert hub.sent.pop()[1][:2] == [b"w2", DATA_MARK]
    for sender, frames in [
            (b"w3", [b"r", b"", b"w1", reply]),  # w1 asked w2, not w3 (and w3 names w2)
            (b"w2", [b"r", b"", b"w1", assign]),  # an answer, but not a reply
            (b"w2", [b"r", b"", b"w1", m.encode(m.DataReply("t", "w3", [], []))]),  # not its own
            (b"w2", [b"r", b"n9", b"w1", reply])]:  # nobody of node n9 asked
        assert plane.from_worker(hub, sender, frames)
    assert hub.sent == []
    assert plane.from_worker(hub, b"w2", [b"r", b"", b"w1", reply])
    assert hub.sent == [("workers", [b"w1", DATA_MARK, reply])]
    # A peer node: its requests must be requests; its replies go only to who asked it.
    hub.sent.clear()
    plane.from_network(hub, "data", [b"n2", b"w2", assign])
    plane.from_network(hub, "peer:tcp://10.0.0.1:9", [b"w1", reply])
    assert hub.sent == []
    plane.from_master(m.encode(m.RunUnits("t", 1, [], [(0, "w9", "tcp://10.0.0.1:9")])))
    plane.from_worker(hub, b"w1", [b"p", b"tcp://10.0.0.1:9", b"w9",
                                   m.encode(m.DataRequest("t", ["t:0"], "w1"))])
    plane.from_network(hub, "peer:tcp://10.0.0.1:9", [b"w4", reply])  # w4 did not ask
    plane.from_network(hub, "peer:tcp://10.0.0.1:9", [b"w1", reply])
    assert [name for name, _ in hub.sent] == ["peer:tcp://10.0.0.1:9", "workers"]
    assert hub.sent[-1][1] == [b"w1", DATA_MARK, reply]


def test_a_reply_with_large_values_is_relayed_frame_for_frame_and_checked_where_it_lands() -> None:
    """Large values travel as frames of their own before the reply (``DataReply.attached``):
    the node passes them on as they are, to its worker or to the asking node; the worker takes
    them only when there is exactly one frame per attached key."""
    plane, hub = new_plane()
    asked_by(plane, hub)
    values = [bytes([i]) * (1 << 17) for i in range(3)]
    body = m.encode(m.DataReply("", "w2", [("t:9", b"small")], ["t:5"], ["t:0", "t:1", "t:2"]))
    assert plane.from_worker(hub, b"w2", [b"r", b"", b"w1", *values, body])
    assert plane.from_worker(hub, b"w2", [b"r", b"n2", b"w7", *values, body])
    assert hub.sent == [("workers", [b"w1", DATA_MARK, *values, body]),
                        ("data", [b"n2", b"w7", *values, body])]
    assert all(a is b for a, b in zip(hub.sent[0][1][2:5], values, strict=True)), "copied"
    # More frames than any reply has are not a reply: not relayed.
    too_many = [b"r", b"", b"w1", *[b"x"] * (MAX_ATTACHED + 1), body]
    assert not plane.from_worker(hub, b"w2", too_many)
    assert len(hub.sent) == 2

    reply = with_attached(m.decode(body), values)  # type: ignore[arg-type]
    assert (reply.data, reply.missing, reply.attached) == (
        [("t:9", b"small"), ("t:0", values[0]), ("t:1", values[1]), ("t:2", values[2])],
        ["t:5"], [])
    for frames in (values[:2], [*values, b"x"]):
        with pytest.raises(MalformedMessage, match="names 3 attached values and came with"):
            with_attached(m.decode(body), frames)  # type: ignore[arg-type]


# --- answers for holders that are not there, and where answers go ---------------------------


def test_a_request_for_a_worker_not_alive_here_is_answered_at_once_with_every_key_missing(
) -> None:
    """A worker that exited may have its id taken by another process: nothing is relayed to
    it, and whoever asked (our worker, or a peer node's on the socket it asked on) is told at
    once that the holder has none of the keys, rather than left to wait for a timeout."""
    plane, hub = new_plane()
    plane.alive = {b"w1"}  # w2 is gone
    ask = m.encode(m.DataRequest("t", ["t:0", "t:1"], "w1"))
    plane.from_worker(hub, b"w1", [b"p", plane.address.encode(), b"w2", ask])
    plane.from_network(hub, DATA_LOCAL, [b"n2", b"w2", m.encode(m.DataRequest("t", ["t:0"], "w7"))])
    plane.from_network(hub, DATA, [b"n3", b"w2", m.encode(m.InputRequest("t", "w8"))])
    assert [(name, frames[:-1]) for name, frames in hub.sent] == [
        ("workers", [b"w1", DATA_MARK]), (DATA_LOCAL, [b"n2", b"w7"]), (DATA, [b"n3", b"w8"])]
    replies = [m.decode(frames[-1]) for _, frames in hub.sent]
    assert replies == [m.DataReply("t", "w2", [], ["t:0", "t:1"]),
                       m.DataReply("t", "w2", [], ["t:0"]),
                       m.InputData("t", b"", [], "the node that held it is unknown or gone")]


def test_a_reply_goes_back_to_a_peer_node_on_the_socket_its_request_came_in_on() -> None:
    plane, hub = new_plane()
    ask = m.DataRequest("t", ["t:0"], "w7")
    plane.from_network(hub, DATA_LOCAL, [b"n2", b"w2", m.encode(ask)])  # n2: this host, by ipc
    plane.from_network(hub, DATA, [b"n3", b"w2", m.encode(ask)])  # n3: by TCP
    reply = m.encode(m.DataReply("t", "w2", [("t:0", b"v")], []))
    plane.from_worker(hub, b"w2", [b"r", b"n2", b"w7", reply])
    plane.from_worker(hub, b"w2", [b"r", b"n3", b"w7", reply])
    assert hub.sent[2:] == [(DATA_LOCAL, [b"n2", b"w7", reply]), (DATA, [b"n3", b"w7", reply])]


def test_inputs_held_by_the_nodes_result_store_are_asked_of_it_naming_who_asks() -> None:
    plane, hub = new_plane()
    asked: list[tuple[bytes, bytes]] = []

    def serve_input(by: Any, origin: bytes, body: bytes) -> None:
        assert by is hub  # (it answers through the same hub)
        asked.append((origin, body))

    plane.serve_input = serve_input
    ours, theirs = m.encode(m.InputRequest("t", "w1")), m.encode(m.InputRequest("t", "w7"))
    plane.from_worker(hub, b"w1", [b"p", plane.address.encode(), RESULTS_HOLDER, ours])
    plane.from_network(hub, DATA, [b"n2", RESULTS_HOLDER, theirs])
    assert asked == [(b"", ours), (b"n2", theirs)]
    assert hub.sent == []
    # An input a worker holds (a peer's result) is that worker's to give, not the store's.
    plane.from_worker(hub, b"w1", [b"p", plane.address.encode(), b"w2", ours])
    plane.from_network(hub, DATA, [b"n2", b"w2", theirs])
    assert len(asked) == 2
    assert hub.sent == [("workers", [b"w2", DATA_MARK, b"", ours]),
                        ("workers", [b"w2", DATA_MARK, b"n2", theirs])]


# --- what is remembered, and for how long ----------------------------------------------------


def test_a_worker_may_dial_only_what_the_master_announced_in_any_message_naming_holders() -> None:
    plane, hub = new_plane()
    ask = m.encode(m.DataRequest("t", ["t:0"], "w1"))
    announced = {
        "tcp://10.0.0.1:9": m.DriverResults("t", [], [(0, "w5", "tcp://10.0.0.1:9")]),
        "tcp://10.0.0.2:9": m.WhoHas("t", 0, [("w6", "tcp://10.0.0.2:9")]),
        "tcp://10.0.0.3:9": m.AssignTask(task_id="t", name="T", kind="task", code=b"", args=b"",
                                         driver=False, held_inputs=[("w7", "tcp://10.0.0.3:9")]),
    }
    for address in announced:  # not announced yet: refused, answered with every key missing
        plane.from_worker(hub, b"w1", [b"p", address.encode(), b"w", ask])
    assert hub.open == [] and {name for name, _ in hub.sent} == {"workers"}
    for msg in announced.values():
        plane.from_master(m.encode(msg))
    hub.sent.clear()
    for address in announced:
        plane.from_worker(hub, b"w1", [b"p", address.encode(), b"w", ask])
    assert hub.open == [f"peer:{address}" for address in announced]
    assert hub.sent == [(f"peer:{address}", [b"w", ask]) for address in announced]


def test_the_addresses_announced_longest_ago_are_forgotten_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(node_data, "MAX_KNOWN", 2)
    plane, _ = new_plane()
    for address in ("tcp://10.0.0.1:9", "tcp://10.0.0.2:9", "tcp://10.0.0.1:9", "tcp://10.0.0.3:9"):
        plane.from_master(m.encode(m.WhoHas("t", 0, [("w", address)])))
    assert list(plane.known) == ["tcp://10.0.0.1:9", "tcp://10.0.0.3:9"]  # .1 named again


def test_a_holder_may_answer_only_who_asked_it_lately_and_the_oldest_askings_go_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plane, hub = new_plane()
    asked_by(plane, hub)  # w1 (ours), then w7 of node n2, asked w2
    reply = m.encode(m.DataReply("t", "w2", [("t:0", b"v")], []))
    plane.asked[(b"w2", b"", b"w1")] = time.monotonic() - ASKED_S - 1  # asked too long ago
    plane.from_worker(hub, b"w2", [b"r", b"", b"w1", reply])
    assert hub.sent == []
    monkeypatch.setattr(node_data, "MAX_ASKED", 1)
    plane, hub = new_plane()
    asked_by(plane, hub)  # w7's asking pushed w1's out
    plane.from_worker(hub, b"w2", [b"r", b"", b"w1", reply])
    plane.from_worker(hub, b"w2", [b"r", b"n2", b"w7", reply])
    assert hub.sent == [(DATA, [b"n2", b"w7", reply])]


def test_a_reply_may_carry_as_many_frames_of_its_own_as_the_bound_and_no_more() -> None:
    plane, hub = new_plane()
    asked_by(plane, hub)
    attached = [b"x"] * MAX_ATTACHED
    body = m.encode(m.DataReply("t", "w2", [], [], [f"t:{i}" for i in range(MAX_ATTACHED)]))
    assert plane.from_worker(hub, b"w2", [b"r", b"", b"w1", *attached, body])
    plane.from_worker(hub, b"w1", [b"p", b"tcp://10.0.0.1:9", b"w9", m.encode(
        m.DataRequest("t", ["t:0"], "w1"))])  # (not announced: refused, answered "missing")
    plane.from_master(m.encode(m.WhoHas("t", 0, [("w9", "tcp://10.0.0.1:9")])))
    plane.from_worker(hub, b"w1", [b"p", b"tcp://10.0.0.1:9", b"w9", m.encode(
        m.DataRequest("t", ["t:0"], "w1"))])
    hub.sent.clear()
    peer = "peer:tcp://10.0.0.1:9"
    plane.from_network(hub, peer, [b"w1", *attached, body])
    plane.from_network(hub, peer, [b"w1", *attached, b"x", body])  # one frame too many
    assert [(name, len(frames)) for name, frames in hub.sent] == [("workers", MAX_ATTACHED + 3)]


def test_refusals_are_counted_each_and_logged_the_first_second_fourth_time() -> None:
    """A worker's task code may send a refused frame in a loop: each is counted, but the log
    gets a line at the 1st, 2nd, 4th, 8th... only, each naming the sender and what it did."""
    plane, hub = new_plane()
    ask = m.encode(m.DataRequest("t", ["t:0"], "w1"))
    not_its_own = m.encode(m.DataRequest("t", ["t:0"], "w9"))
    with capture_logs() as logs:
        for _ in range(9):
            plane.from_worker(hub, b"w1", [b"p", b"tcp://10.6.6.6:1", b"w2", ask])
        for _ in range(5):
            plane.from_worker(hub, b"w1", [b"p", plane.address.encode(), b"w2", not_its_own])
        plane.from_network(hub, DATA, [b"n2", b"w2", b"\xc1 not msgpack"])  # the 6th
        plane.from_network(hub, "peer:tcp://10.0.0.1:9", [b"w1", m.encode(
            m.DataReply("t", "w2", [], []))])  # the 7th
    assert (plane.refused, plane.forged) == (9, 7)
    dialed = [entry for entry in logs if entry["event"] == "data_address_refused"]
    assert [entry["refused"] for entry in dialed] == [1, 2, 4, 8]
    assert (dialed[0]["address"], dialed[0]["worker"]) == ("tcp://10.6.6.6:1", "w1")
    forged = [entry for entry in logs if entry["event"] == "data_frame_refused"]
    assert [entry["refused"] for entry in forged] == [1, 2, 4]
    assert (forged[0]["why"], forged[0]["worker"]) == ("not a request of its own", "w1")
    with capture_logs() as logs:
        plane.from_network(hub, DATA, [b"n2", b"w2", b"\xc1 not msgpack"])  # the 8th
    assert [(entry["why"], entry["worker"]) for entry in logs] == [
        ("a peer node's frame that is not a request", "n2")]


# --- where a node listens, and which peers it reaches by ipc ---------------------------------


def test_a_node_listens_on_loopback_for_a_local_master_and_everywhere_otherwise() -> None:
    for local in ("tcp://127.0.0.1:5555", "tcp://localhost:5555", "tcp://[::1]:5555"):
        assert data_host(local) == "127.0.0.1", local
    for remote in ("tcp://10.0.0.5:5555", "tcp://master.example:5555"):
        assert data_host(remote) == "0.0.0.0", remote


def test_peers_of_this_host_and_uid_are_reached_by_ipc_and_no_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    plane, _ = new_plane()
    plane.local_address = "ipc:///run/n1/data"
    boot, uid = boot_id(), os.getuid()
    assert boot and plane.local_data() == f"{boot} {uid} ipc:///run/n1/data"
    peers = m.LocalPeers([
        ("tcp://127.0.0.1:3", f"{boot} {uid} ipc:///run/n2/data"),  # this host, this uid
        ("tcp://127.0.0.1:4", f"another-boot {uid} ipc:///run/n3/data"),  # another host
        ("tcp://127.0.0.1:5", f"{boot} {uid + 1} ipc:///run/n4/data"),  # another user
        ("tcp://127.0.0.1:6", f"{boot} {uid} tcp://127.0.0.1:9"),  # not an ipc endpoint
        ("tcp://127.0.0.1:7", ""),  # a peer that offers none
        (plane.address, f"{boot} {uid} ipc:///run/n1/data"),  # ourselves
        ("tcp://127.0.0.1:8", f"{boot} {uid} ipc:///run/a folder/data"),  # a path with a space
    ])
    plane.local_peers(peers)
    assert plane.local == {"tcp://127.0.0.1:3": "ipc:///run/n2/data",
                           "tcp://127.0.0.1:8": "ipc:///run/a folder/data"}
    plane.local_address = "ipc:///run/a node/data"  # (our own path may have a space too)
    plane.local_peers(peers)
    assert "tcp://127.0.0.1:3" in plane.local
    plane.local_address = ""  # not bound yet: nothing to offer
    assert plane.local_data() == ""
    plane.local_address = "ipc:///run/n1/data"
    monkeypatch.setenv("ACTORS_DATA_LOCAL", "0")  # every peer by TCP and CURVE
    assert plane.local_data() == ""
    plane.local_peers(peers)
    assert plane.local == {}


def test_a_reply_whose_head_is_not_a_data_reply_of_its_sender_is_refused_not_a_crash() -> None:
    plane, hub = new_plane()
    asked_by(plane, hub)
    for body in (b"\xc1 not msgpack", msgspec.msgpack.encode(["DataReply", "t", 7, [], []]),
                 msgspec.msgpack.encode(["DataReply"])):
        assert plane.from_worker(hub, b"w2", [b"r", b"", b"w1", body])
    assert hub.sent == [] and plane.forged == 3


def test_an_answer_of_the_result_store_goes_to_our_worker_or_back_to_the_asking_node() -> None:
    plane, hub = new_plane()
    body = m.encode(m.InputData("t", b"v", [1]))
    plane.reply(hub, b"", b"w1", body)
    plane.reply(hub, b"n5", b"w7", body)  # a node that asked on the TCP socket (the default)
    assert hub.sent == [("workers", [b"w1", DATA_MARK, body]), (DATA, [b"n5", b"w7", body])]


def test_a_peer_node_is_dialed_with_curve_and_our_identity_or_by_ipc_on_this_host() -> None:
    """Between hosts a node authenticates its peer by the nodes' key and encrypts (CURVE);
    a peer of this host and uid is reached on its ipc endpoint, in a folder only that uid
    may open. Either way the peer knows us by our node id, and values come uncopied."""
    plane, hub = new_plane()
    plane.local = {"tcp://127.0.0.1:3": "ipc:///run/n2/data"}
    ask = m.encode(m.DataRequest("t", ["t:0"], "w1"))
    for address in ("tcp://10.0.0.1:9", "tcp://127.0.0.1:3"):
        plane.from_master(m.encode(m.WhoHas("t", 0, [("w9", address)])))
        plane.from_worker(hub, b"w1", [b"p", address.encode(), b"w9", ask])
    pair = plane.pair
    assert hub.dialed == {
        "peer:tcp://10.0.0.1:9": ("tcp://10.0.0.1:9", {
            "identity": b"n1", "views": True,
            "curve": ClientCurve(pair.public, pair.secret, pair.public)}),
        "peer:ipc:///run/n2/data": ("ipc:///run/n2/data", {"identity": b"n1", "views": True}),
    }


def test_a_worker_asks_only_for_the_results_of_a_task_it_runs() -> None:
    """A holder served any key it held to whoever asked, whatever task the request named: the
    task id was the only guard (task code of another key that learnt it read the results).
    Now the requester's node relays a DataRequest only for a task the requester runs (its
    TaskEnds), and the holder serves only the units of the task named (below)."""
    plane, hub = new_plane()
    here = plane.address.encode()
    running = {(b"w1", "t")}
    plane.holds = lambda worker, task_id: (worker, task_id) in running
    for request in [m.DataRequest("victim", ["victim:0"], "w1"),  # not its task
                    m.DataRequest("t", ["t:0"], "w3")]:  # not its own request
        assert plane.from_worker(hub, b"w1" if request.requester == "w1" else b"w3",
                                 [b"p", here, b"w2", m.encode(request)])
    assert hub.sent == []
    plane.from_worker(hub, b"w1", [b"p", here, b"w2", m.encode(m.DataRequest("t", ["t:0"], "w1"))])
    assert hub.sent.pop()[1][:2] == [b"w2", DATA_MARK]


class _Blobs:
    _task_stop = None

    def work_unit(self, index: int) -> bytes:
        return bytes([index % 256]) * 300_000  # past a run's inline bytes after ~50: held


def test_a_holder_serves_only_the_units_of_the_task_a_request_names() -> None:
    from actors.serialize import dumps
    from actors.unit_runner import Ran, UnitRunner

    sent: list[m.Message] = []
    frames_out: list[list[bytes]] = []
    calls: list[Any] = []
    told: list[Any] = []
    runner = UnitRunner("n1/w1", sent.append, frames_out.append,
                        lambda call, _task: calls.append(call), told.append)
    runner.instance = _Blobs()
    runner.run_units(m.RunUnits("t1", 1, [m.UnitCall(i, dumps(i)) for i in range(80)]))
    calls.pop()()  # the executor thread's part, here
    ran = told.pop()
    assert isinstance(ran, Ran)
    runner.ran(ran)
    assert "t1:79" in runner.state.data  # held here
    for request in [m.DataRequest("t2", ["t1:79"], "n1/w2"),  # another task's keys
                    m.DataRequest("t1", ["t1:79"], "n1/w2")]:
        frames_out.clear()
        runner.data_requested(b"", request)
        reply = m.decode(frames_out[-1][-1])
        assert isinstance(reply, m.DataReply)
        served = [key for key, _ in reply.data] + [key for key in reply.attached]
        assert served == ([] if request.task_id == "t2" else ["t1:79"]), (request, served)
