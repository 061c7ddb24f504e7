"""Large scattered data goes to a node that can hold it: it waits for one where there is none
yet (a cluster starting, nodes rejoining a restarted master) and moves off one that is lost
before it confirmed; sent again by its client (after a reconnect), it is the same scatter.
Real processes: a master, a node, and a bare socket playing a node that takes the data's
announcement and leaves."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import zmq

from actors import Client, Task, __version__
from actors import messages as m
from tests.conftest import (
    descendants,
    kill_all,
    log_events,
    python_logged,
    start_master,
    wait_until,
)
from transport.hub import unbatch
from transport.keys import load_keypair, load_public_key

pytestmark = pytest.mark.processes

SIZE = 3 * m.INLINE_RESULT_BYTES  # past what the master keeps: it goes to a node


class Length(Task):
    def work(self, data):
        return len(data)


def _waits_logged(log: Path) -> int:
    return sum(1 for e in log_events(log) if e.get("event") == "scatter_waits_for_a_node")


def _node_socket(address: str, keys: Path, node_id: str) -> zmq.Socket[bytes]:
    """A node's key on a bare DEALER: it joins, reads what the master sends it, answers nothing."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 2_000)
    sock.setsockopt(zmq.IDENTITY, node_id.encode())
    pair = load_keypair(keys, "node")
    sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    sock.curve_serverkey = load_public_key(keys, "master")
    sock.connect(address)
    sock.send(m.encode(m.Hello(role="node", peer_id=node_id, protocol=m.PROTOCOL_VERSION,
                               version=__version__, slots=1,
                               results_address="tcp://127.0.0.1:9")))
    return sock


def _announced(sock: zmq.Socket[bytes], task_id: str) -> bool:
    """Whether the master told this node to expect ``task_id`` (reading for at most 20 s)."""
    for _ in range(10):
        try:
            frames = sock.recv_multipart()
        except zmq.Again:
            continue
        for message in unbatch(frames):
            got = m.decode(message[-1])
            if isinstance(got, m.ExpectScatter) and got.task_id == task_id:
                return True
    return False


def test_a_large_scatter_waits_for_a_node_and_moves_off_one_that_is_lost(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(keys))
    log = tmp_path / "master.log"
    node = None
    fake = None
    try:
        with Client(address, keys=keys, timeout=60) as client:
            data = os.urandom(SIZE)
            done: list[object] = []

            def scatter() -> None:
                try:
                    done.append(client.scatter(data, timeout=60))
                except Exception as exc:  # (the assertions below show it)
                    done.append(exc)

            thread = threading.Thread(target=scatter)
            thread.start()
            # No node yet: it waits (it was refused: "no node to hold it yet").
            wait_until(lambda: _waits_logged(log) == 1 or done, 30, "the scatter to wait")
            assert not done, done
            [task_id] = client._scattering

            # A node joins: the data is announced to it; it leaves without taking it.
            fake = _node_socket(address, keys, "node-fake")
            assert _announced(fake, task_id)
            # What the client sends again after a reconnect: the same scatter, not a new one
            # (it was refused as an id taken, and the first failed with it).
            size = sum(memoryview(part).nbytes for part in client._scattering[task_id])
            client._send(m.Scatter(task_id, size=size))
            fake.send(m.encode(m.Bye("leaving")))
            wait_until(lambda: _waits_logged(log) == 2 or done, 30, "the scatter to wait again")
            assert not done, done

            # A real node joins: the data goes there, and a task takes it.
            node = python_logged(tmp_path / "node.log", "-m", "actors.node", "--master", address,
                                 "--workers", "1", "--keys", str(keys))
            thread.join(90)
            [future] = done
            assert not isinstance(future, Exception), future
            assert client.submit(Length, future).result(timeout=60) == SIZE
    finally:
        if fake is not None:
            fake.close()
        kill_all({master.pid} | ({node.pid} | descendants(node.pid) if node else set()))
        master.wait(10)
        if node is not None:
            node.wait(10)
