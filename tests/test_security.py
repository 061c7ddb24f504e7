"""CURVE on every TCP socket, the handshake, and garbage from an authenticated peer."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import zmq

import actors.client
from actors import Client, LocalCluster, Task, __version__
from actors import messages as m
from actors.errors import ConnectFailed, HandshakeRefused
from tests.conftest import alive, kill_all, log_events, python, wait_until
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


def test_a_client_to_an_address_where_nothing_listens_fails_at_once_saying_so(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stale $ACTORS_ADDRESS, or a closed port, cost the whole timeout (15 s by default) for
    "is a master running there?", though the port refused at once."""
    import socket

    held = socket.socket()  # bound, not listening: refused, and no other process can take it
    held.bind(("127.0.0.1", 0))
    try:
        monkeypatch.setenv("ACTORS_ADDRESS", f"127.0.0.1:{held.getsockname()[1]}")
        with pytest.raises(ConnectFailed, match=r"ACTORS_ADDRESS\), connection refused") as caught:
            Client(keys=cluster.keys_dir, timeout=60)
        assert caught.value.waited_s < 60
    finally:
        held.close()


def test_a_protocol_mismatch_is_refused_with_a_reason(cluster: LocalCluster) -> None:
    sock = raw_dealer(cluster, cluster.keys_dir, b"old-client")
    try:
        sock.send(m.encode(m.Hello(role="client", peer_id="old-client",
                                   protocol=m.PROTOCOL_VERSION + 1, version=__version__)))
        reply = m.decode(sock.recv())
        assert isinstance(reply, m.Refused)
        assert "protocol" in reply.reason
        sock.send(m.encode(m.Hello(role="client", peer_id="old-client",
                                   protocol=m.PROTOCOL_VERSION, version="0.0.0-other")))
        reply = m.decode(sock.recv())
        assert isinstance(reply, m.Refused) and "0.0.0-other" in reply.reason
    finally:
        sock.close()


def test_a_client_of_another_version_raises_handshake_refused_with_the_reason(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The one thing that differs in a client of another release: the version its Hello names.
    monkeypatch.setattr(actors.client, "__version__", "0.0.0-other")
    with pytest.raises(HandshakeRefused,
                       match=rf"handshake refused: pydra-actors 0\.0\.0-other != master's {__version__}"):
        Client(cluster.address, keys=cluster.keys_dir, timeout=60)


def _cmdlines_mentioning(text: str) -> set[int]:
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return {pid for pid in found if alive(pid)}


@pytest.mark.parametrize("why", ["unknown key", "other version"])
def test_a_node_refused_at_the_handshake_exits_saying_why_and_adds_no_worker(
    cluster: LocalCluster, client: Client, tmp_path: Path, why: str
) -> None:
    keys = Path(cluster.keys_dir)
    env = dict(os.environ)
    if why == "unknown key":
        keys = init_keys(tmp_path / "stranger")  # knows the master's key; its own is not allowed
        (keys / "master.key").write_bytes((Path(cluster.keys_dir) / "master.key").read_bytes())
        expected = "the master refused this node's CURVE key"
    else:
        release = tmp_path / "other-release"  # the same code announcing another version
        release.mkdir()
        (release / "sitecustomize.py").write_text("import actors\nactors.__version__ = '0.0.0-other'\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(release), env.get("PYTHONPATH")]))
        expected = f"master refused this node: pydra-actors 0.0.0-other != master's {__version__}"
    with open(tmp_path / "node.log", "w") as log_file:
        node = python("-m", "actors.node", "--master", cluster.address, "--workers", "1",
                      "--keys", str(keys), "--log-format", "json", "--cache", str(tmp_path / "c"),
                      stdout=subprocess.DEVNULL, stderr=log_file, env=env)
    try:
        assert node.wait(60) == 1
    finally:
        kill_all({node.pid})
        node.wait(10)
    events = log_events(tmp_path / "node.log")
    assert [e["reason"] for e in events if e["event"] == "node_exiting"] == [expected]
    assert client.info().workers == 2
    wait_until(lambda: not _cmdlines_mentioning(str(tmp_path / "c")), 20,
               "the refused node's workers to exit")


def test_garbage_from_an_authenticated_peer_is_dropped_and_the_master_keeps_serving(
    cluster: LocalCluster, client: Client
) -> None:
    sock = raw_dealer(cluster, cluster.keys_dir, b"vandal")
    try:
        garbage = [
            [b"\x00\xff garbage"],
            [b""],
            [b"\x93\xa4Nope\x01\x02"],  # a msgpack array with an unknown tag
            [m.encode(m.Hello(role="client", peer_id="vandal", protocol=m.PROTOCOL_VERSION,
                              version=__version__))[:5]],
            [b"a", b"b", b"c", b"d"],  # wrong frame count
            [m.encode(m.UnitsDone("no-task", 1, []))],  # valid, but from an unknown peer
        ]
        for frames in garbage:
            sock.send_multipart(frames)
        reply = m.decode(sock.recv())  # only the last one is answered: say Hello first
        assert isinstance(reply, m.Refused) and "Hello" in reply.reason
        # After a hello, messages a client may not send are dropped as well.
        sock.send(m.encode(m.Hello(role="client", peer_id="vandal", protocol=m.PROTOCOL_VERSION,
                                   version=__version__)))
        assert isinstance(m.decode(sock.recv()), m.Welcome)
        sock.send(m.encode(m.InfoRequest()))
        before = m.decode(sock.recv())
        assert isinstance(before, m.ClusterInfo)
        sock.send(m.encode(m.WorkerReady("fake-worker", 1)))
        # The master answers this client in order: the WorkerReady has been dealt with.
        sock.send(m.encode(m.InfoRequest()))
        after = m.decode(sock.recv())
        assert isinstance(after, m.ClusterInfo)
        assert (after.workers, after.idle_workers) == (before.workers, before.idle_workers)
        sock.send(m.encode(m.Submit(task_id="t-bad", name="X", kind="task", code=b"not a pickle",
                                    args=b"nor this")))
    finally:
        sock.close()
    # The master is alive and still serves real work.
    assert client.submit(Echo, "still here").result(timeout=30) == "still here"
