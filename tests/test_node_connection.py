"""A node's connection to its master: a frozen node is noticed by the transport's heartbeat, not
waited out, and its return is clean (real processes, SIGSTOP/SIGCONT)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from actors import Client, ParallelTask, __version__
from actors import messages as m
from actors.master_actor import RECONNECT_MIN_S
from tests.conftest import (
    alive,
    descendants,
    kill_all,
    log_events,
    python_logged,
    result_or_logs,
    start_master,
    wait_until,
)
from transport import load_keypair, load_public_key
from transport.hub import unbatch

ROOT = Path(__file__).resolve().parent.parent


class Squares(ParallelTask):
    def get_work(self, n):
        return range(n)

    def work_unit(self, unit):
        time.sleep(0.005)
        return unit * unit

    def reduce(self, results):
        return sum(results)


def test_a_frozen_node_is_lost_by_its_connection_then_rejoins_cleanly(tmp_path: Path) -> None:
    keys = str(tmp_path / "keys")
    # A minute of silence allowed: the loss must come from the transport's heartbeat closing
    # the connection of a node that stopped answering.
    master, address = start_master(tmp_path, "--workers", "0", "--keys", keys,
                                   "--node-timeout", "60")
    node = python_logged(tmp_path / "node.log", "-m", "actors.node", "--master", address,
                         "--workers", "2", "--keys", keys)
    pids: set[int] = set()
    try:
        with Client(address, keys=keys) as client:
            client.wait_for_workers(2)
            future = client.submit(Squares, 1_500)
            wait_until(lambda: future.progress()[0] > 100, 60, "units to be done")
            pids = descendants(node.pid)
            os.kill(node.pid, signal.SIGSTOP)  # frozen: its sockets stay open, nothing answers
            try:
                wait_until(lambda: any(e["event"] == "node_lost"
                                       for e in log_events(tmp_path / "master.log")),
                           30, "the master to declare the frozen node lost")
            finally:
                os.kill(node.pid, signal.SIGCONT)
            assert result_or_logs(future, 120, tmp_path) == sum(i * i for i in range(1_500))
            pids |= descendants(node.pid)
        master_events = log_events(tmp_path / "master.log")
        lost = [e for e in master_events if e["event"] == "node_lost"]
        assert len(lost) == 1 and "connection closed" in lost[0]["reason"], lost
        assert [e["event"] for e in master_events].count("node_joined") == 2  # and back
        warnings = [e for e in master_events if e.get("level") in ("warning", "error")
                    and e["event"] != "node_lost"]
        assert not warnings, warnings  # what the node sent before it noticed is expected
        node_events = log_events(tmp_path / "node.log")
        assert [e["event"] for e in node_events].count("joined_master") == 2
        # Once, when it woke; its own stop at the end is no news.
        assert [e["event"] for e in node_events].count("master_disconnected") == 1
        troubles = [e for e in node_events if e.get("level") in ("error", "critical")
                    or e["event"] == "worker_kill_escalated" or "Traceback" in str(e)]
        assert not troubles, troubles
    finally:
        _stop(node, master, pids | descendants(node.pid))


def _stop(node: subprocess.Popen[str], master: subprocess.Popen[str], pids: set[int]) -> None:
    """Stop the node and the master as a user would (woken first, if paused), then whatever of
    theirs is left, by pid."""
    for proc in (node, master):
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
    for proc in (node, master):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(20)
    kill_all(pids | {node.pid, master.pid})
    wait_until(lambda: not any(alive(p) for p in pids), 20, "every process to end")


class Results(ParallelTask):
    """Units of results of a given size: large ones fill a connection's buffers while the
    master cannot read them."""

    def get_work(self, n, size):
        return ((i, size) for i in range(n))

    def work_unit(self, unit):
        time.sleep(0.002)
        return bytes(unit[1])

    def reduce(self, results):
        return sum(len(result) for result in results)


@pytest.mark.parametrize("size", [1, 20_000])
def test_a_master_paused_past_the_heartbeat_loses_no_work_and_hears_everyone_again(
        tmp_path: Path, size: int) -> None:
    """SIGSTOP the master 4 s, past the transport's 3 s heartbeat, while units stream in: the
    node's and the client's connections drop with what was on the way in them (unit results,
    assignments; the node comes back before it is taken as lost, and each side assumed the
    other had them), and each may connect again while the frozen master still holds the old
    connection under the same id (parked: large results fill the buffers, the master wakes
    late to the old one's end). The task still ends, with every unit counted."""
    keys = str(tmp_path / "keys")
    master, address = start_master(tmp_path, "--workers", "0", "--keys", keys,
                                   "--node-timeout", "60")
    node = python_logged(tmp_path / "node.log", "-m", "actors.node", "--master", address,
                         "--workers", "2", "--keys", keys)
    pids: set[int] = set()
    try:
        with Client(address, keys=keys) as client:
            client.wait_for_workers(2)
            future = client.submit(Results, 3_000, size)
            wait_until(lambda: future.progress()[0] > 300, 60, "units to be done")
            pids = descendants(node.pid)
            os.kill(master.pid, signal.SIGSTOP)
            time.sleep(4)
            os.kill(master.pid, signal.SIGCONT)
            assert result_or_logs(future, 90, tmp_path) == 3_000 * size
            assert client.submit(Results, 10, size).result(30) == 10 * size  # and serves on
            pids |= descendants(node.pid)
        troubles = [e for name in ("master.log", "node.log")
                    for e in log_events(tmp_path / name)
                    if e.get("level") in ("error", "critical") or "Traceback" in str(e)]
        assert not troubles, troubles
    finally:
        _stop(node, master, pids | descendants(node.pid))


_PAUSED_CLIENT = """
import sys, time
from actors import Client, Task

class Nap(Task):
    def work(self, i, seconds):
        time.sleep(seconds)
        return i * i

address, keys = sys.argv[1:3]
with Client(address, keys=keys, show_output=False, master_timeout=30) as client:
    client.wait_for_workers(2)
    futures = client.map(Nap, range(40), [0.2] * 40)  # 4 s of work on 2 workers
    futures[0].result(30)
    print("submitted", flush=True)
    print("results", sum(f.result(60) for f in futures), flush=True)
"""


def test_a_client_paused_past_the_heartbeat_gets_the_ends_sent_meanwhile(
        tmp_path: Path) -> None:
    """SIGSTOP a client 5 s while its tasks end: the master's sends to it go on a connection
    that dropped, or are refused while it is gone. Without a state directory the master kept
    no end to send again, and the client's futures waited for good."""
    keys = str(tmp_path / "keys")
    master, address = start_master(tmp_path, "--workers", "2", "--keys", keys)
    script = tmp_path / "client.py"
    script.write_text(_PAUSED_CLIENT)
    with open(tmp_path / "client.log", "w") as log:
        client = subprocess.Popen([sys.executable, str(script), address, keys], text=True,
                                  stdout=subprocess.PIPE, stderr=log,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert client.stdout is not None
        wait_until(lambda: client.stdout.readline().strip() == "submitted", 60,  # type: ignore[union-attr]
                   "the client's tasks to begin")
        os.kill(client.pid, signal.SIGSTOP)
        time.sleep(5)
        os.kill(client.pid, signal.SIGCONT)
        out, _ = client.communicate(timeout=90)
        assert client.returncode == 0, (tmp_path / "client.log").read_text()[-3000:]
        assert f"results {sum(i * i for i in range(40))}" in out.splitlines(), out[-3000:]
    finally:
        for proc in (client, master):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        kill_all(descendants(master.pid) | {master.pid, client.pid})
        master.wait(10)


def test_a_node_saying_it_lost_the_master_over_and_over_is_taken_back_at_most_once_a_second(
        tmp_path: Path) -> None:
    """Each Hello with a new handshake costs a node lost and joined: a node (its own valid key)
    that sends hundreds is taken back once, its older counts ignored, and the master serves
    on. Before, each was taken: 30,000 in 6 s."""
    keys = str(tmp_path / "keys")
    master, address = start_master(tmp_path, "--workers", "1", "--keys", keys)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, b"node-loud")
    sock.setsockopt(zmq.RCVTIMEO, 1_000)
    pair = load_keypair(keys, "node")
    sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    sock.curve_serverkey = load_public_key(keys, "master")
    sock.connect(address)

    def hello(handshake: int) -> None:
        sock.send(m.encode(m.Hello(role="node", peer_id="node-loud", protocol=m.PROTOCOL_VERSION,
                                   version=__version__, handshake=handshake)))

    def welcomed() -> bool:
        try:
            frames = sock.recv_multipart()
        except zmq.Again:
            return False
        return any(isinstance(m.decode(part[-1]), m.Welcome) for part in unbatch(frames))

    try:
        hello(0)
        wait_until(welcomed, 20, "a Welcome")
        time.sleep(RECONNECT_MIN_S + 0.1)  # (the first new count after it is taken)
        for handshake in range(1, 301):
            hello(handshake)
        hello(0)  # an older count: ignored

        def taken() -> list[dict[str, object]]:
            return [e for e in log_events(tmp_path / "master.log")
                    if e["event"] == "node_reconnected" and e["node_id"] == "node-loud"]

        wait_until(taken, 20, "the first new count to be taken")
        with Client(address, keys=keys) as client:  # (meanwhile the rest of the burst is read)
            assert client.submit(Results, 3, 1).result(30) == 3
        assert len(taken()) <= 2, taken()  # (2: a master so loaded it read them a second apart)
    finally:
        sock.close()
        kill_all(descendants(master.pid) | {master.pid})
        master.wait(10)
