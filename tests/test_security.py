"""CURVE on every TCP socket, the handshake, and garbage from an authenticated peer."""

from __future__ import annotations

from pathlib import Path

import pytest
import zmq

from actors import Client, LocalCluster, Task, __version__
from actors import messages as m
from actors.errors import ConnectFailed, HandshakeRefused
from transport import init_keys, load_keypair, load_public_key

pytestmark = pytest.mark.processes


class Echo(Task):
    def work(self, value):
        return value


def raw_dealer(cluster: LocalCluster, keys_dir: str, identity: bytes) -> zmq.Socket[bytes]:
    """A bare DEALER with the cluster's client key: authenticated, but speaking whatever we like."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.setsockopt(zmq.IDENTITY, identity)
    pair = load_keypair(keys_dir, "client")
    sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    sock.curve_serverkey = load_public_key(keys_dir, "master")
    sock.connect(cluster.address)
    return sock


def test_a_client_with_an_unknown_key_is_refused_at_the_handshake(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    stranger = init_keys(tmp_path / "stranger")
    # The stranger knows the master's public key, but its own key is not allowed.
    (stranger / "master.key").write_bytes((Path(cluster.keys_dir) / "master.key").read_bytes())
    with pytest.raises(ConnectFailed, match="refused this client's key"):
        Client(cluster.address, keys=stranger, timeout=10)


def test_a_client_with_the_wrong_master_key_cannot_connect(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    other = init_keys(tmp_path / "other")
    with pytest.raises(ConnectFailed):
        Client(cluster.address, keys=other, timeout=3)


def test_a_protocol_mismatch_is_refused_with_a_reason(cluster: LocalCluster) -> None:
    sock = raw_dealer(cluster, cluster.keys_dir, b"old-client")
    try:
        sock.send(m.encode(m.Hello("client", "old-client", m.PROTOCOL_VERSION + 1, __version__)))
        reply = m.decode(sock.recv())
        assert isinstance(reply, m.Refused)
        assert "protocol" in reply.reason
        sock.send(m.encode(m.Hello("client", "old-client", m.PROTOCOL_VERSION, "0.0.0-other")))
        reply = m.decode(sock.recv())
        assert isinstance(reply, m.Refused) and "0.0.0-other" in reply.reason
    finally:
        sock.close()


def test_the_client_raises_handshake_refused() -> None:
    err = HandshakeRefused("protocol 9 != master's 1")
    assert "handshake refused" in str(err) and "protocol 9" in str(err)


def test_garbage_from_an_authenticated_peer_is_dropped_and_the_master_keeps_serving(
    cluster: LocalCluster, client: Client
) -> None:
    sock = raw_dealer(cluster, cluster.keys_dir, b"vandal")
    try:
        garbage = [
            [b"\x00\xff garbage"],
            [b""],
            [b"\x93\xa4Nope\x01\x02"],  # a msgpack array with an unknown tag
            [m.encode(m.Hello("client", "vandal", m.PROTOCOL_VERSION, __version__))[:5]],
            [b"a", b"b", b"c", b"d"],  # wrong frame count
            [m.encode(m.UnitsDone("no-task", 1, []))],  # valid, but from an unknown peer
        ]
        for frames in garbage:
            sock.send_multipart(frames)
        reply = m.decode(sock.recv())  # only the last one is answered: say Hello first
        assert isinstance(reply, m.Refused) and "Hello" in reply.reason
        # After a hello, messages a client may not send are dropped as well.
        sock.send(m.encode(m.Hello("client", "vandal", m.PROTOCOL_VERSION, __version__)))
        assert isinstance(m.decode(sock.recv()), m.Welcome)
        sock.send(m.encode(m.WorkerReady("fake-worker", 1)))
        sock.send(m.encode(m.Submit("t-bad", "X", "task", b"not a pickle", b"nor this")))
    finally:
        sock.close()
    # The master is alive and still serves real work.
    assert client.submit(Echo, "still here").result(timeout=30) == "still here"
