"""Peers on the master's host reach it through a Unix socket (``--local-socket``): a
LocalCluster's node and clients, the node a master starts itself, a client naming the path.
Keys are proved there as on TCP; where no socket can be made, or something lives at the path
already, everyone goes by TCP as before; a ``--run`` script keeps the TCP address."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from actors import Client, LocalCluster, Task
from actors.addresses import client_address
from actors.errors import InvalidAddress, KeyRefused
from actors.launch import claim_socket_path
from tests.conftest import kill_all, log_events, start_master, wait_until
from transport import init_keys


class Square(Task):
    def work(self, x):
        return x * x


def sockets_at(path: str) -> int:
    """Unix sockets named ``path`` (``/proc/net/unix``): the listener, and on its side one per
    connection it accepted."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return sum(1 for line in lines if line.split()[-1] == path)


@pytest.mark.parametrize("local_node", ["inside", "process"])
def test_a_local_clusters_node_and_client_reach_the_master_through_its_socket(
        local_node: str) -> None:
    with LocalCluster(workers=1, local_node=local_node) as cluster:
        path = cluster.local_address.removeprefix("ipc://")
        assert cluster.local_address.startswith("ipc:///") and Path(path).is_socket()
        node = 1 if local_node == "process" else 0  # (inside the master: no connection)
        wait_until(lambda: sockets_at(path) >= 1 + node, 10, "the node's connection")
        with Client(cluster) as client:
            assert client.submit(Square, 7).result(timeout=30) == 49
            assert client.address == cluster.address  # (shown as the TCP address)
            wait_until(lambda: sockets_at(path) >= 2 + node, 10, "the client's connection")
        # TCP serves as before, for clients elsewhere.
        with Client(cluster.address, keys=cluster.keys_dir) as client:
            assert client.submit(Square, 8).result(timeout=30) == 64


@pytest.mark.processes
def test_a_client_names_the_socket_and_its_key_is_proved_there(tmp_path: Path) -> None:
    keys, path = tmp_path / "keys", tmp_path / "m.sock"
    master, _ = start_master(tmp_path, "--workers", "1", "--keys", str(keys),
                             "--local-socket", str(path))
    try:
        with Client(f"ipc://{path}", keys=keys) as client:
            assert client.submit(Square, 3).result(timeout=30) == 9
        stranger = init_keys(tmp_path / "stranger")
        (stranger / "master.key").write_bytes((keys / "master.key").read_bytes())
        with pytest.raises(KeyRefused):
            Client(f"ipc://{path}", keys=stranger, timeout=20)
    finally:
        kill_all({master.pid})
        master.wait(10)


@pytest.mark.processes
def test_a_socket_that_cannot_be_made_leaves_everyone_on_tcp(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "1", "--keys", str(keys),
                                   "--local-socket", str(tmp_path / "no-such-folder" / "m.sock"))
    try:
        with Client(address, keys=keys) as client:
            client.wait_for_workers(1, timeout=30)  # its node came by TCP
            assert client.submit(Square, 4).result(timeout=30) == 16
        log = log_events(tmp_path / "master.log")
        assert any(e.get("event") == "second_endpoint_not_bound" for e in log)
    finally:
        kill_all({master.pid})
        master.wait(10)


@pytest.mark.processes
def test_a_run_script_gets_the_tcp_address_the_command_line_tools_take(tmp_path: Path) -> None:
    """``$ACTORS_ADDRESS`` of a ``--run`` script stays the master's TCP address: the command
    line's tools (``python -m actors status``) and other hosts take it."""
    script = tmp_path / "script.py"
    script.write_text("import os, subprocess, sys\nfrom actors import Client\n"
                      "def square(x):\n    return x * x\n"
                      "with Client() as c:\n"
                      "    print(os.environ['ACTORS_ADDRESS'], c.submit(square, 6).result(30))\n"
                      "sys.exit(subprocess.run([sys.executable, '-m', 'actors', 'status']).returncode)\n")
    done = subprocess.run([sys.executable, "-m", "actors.master", "--port", "0", "--workers", "1",
                           "--keys", str(tmp_path / "keys"), "--no-banner", "--run", str(script)],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    address, result = done.stdout.splitlines()[0].split()
    assert address.startswith("tcp://127.0.0.1:") and result == "36"


def test_an_ipc_address_names_a_unix_socket_by_its_absolute_path(tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "m.sock"))
        listening.listen()
        assert client_address(f" ipc://{tmp_path}/m.sock ") == f"ipc://{tmp_path}/m.sock"
    with pytest.raises(InvalidAddress, match="no master listens"):  # left by one that stopped
        client_address(f"ipc://{tmp_path}/m.sock")
    assert client_address("127.0.0.1:5555") == "tcp://127.0.0.1:5555"
    with pytest.raises(InvalidAddress, match="absolute path"):
        client_address("ipc://m.sock")
    (tmp_path / "file").write_text("")
    for nothing in (tmp_path / "file", tmp_path / "none"):  # said at once, not after a timeout
        with pytest.raises(InvalidAddress, match="no Unix socket is there"):
            Client(f"ipc://{nothing}")


def test_a_socket_path_is_claimed_only_when_nothing_lives_there(tmp_path: Path) -> None:
    assert claim_socket_path(str(tmp_path / "free.sock")) == ""
    (tmp_path / "file").write_text("keep me")
    assert "not a socket" in claim_socket_path(str(tmp_path / "file"))
    assert (tmp_path / "file").read_text() == "keep me"
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(tmp_path / "live.sock"))
        listening.listen()
        assert "listens there" in claim_socket_path(str(tmp_path / "live.sock"))
    # Its process gone (the file left, as kill -9 leaves it): taken, the old file removed.
    assert claim_socket_path(str(tmp_path / "live.sock")) == ""
    assert not (tmp_path / "live.sock").exists()


@pytest.mark.processes
def test_a_second_master_does_not_take_the_first_ones_socket(tmp_path: Path) -> None:
    keys, path = tmp_path / "keys", tmp_path / "m.sock"
    first, _ = start_master(tmp_path, "--workers", "1", "--keys", str(keys),
                            "--local-socket", str(path), name="first")
    second = None
    try:
        second, address = start_master(tmp_path, "--workers", "0", "--keys", str(keys),
                                       "--local-socket", str(path), name="second")
        log = (tmp_path / "second.log").read_text()
        assert "local_socket_refused" in log and "listens there" in log
        with Client(f"ipc://{path}", keys=keys) as client:  # still the first one's
            client.wait_for_workers(1, timeout=30)
            assert client.info().workers == 1
        with Client(address, keys=keys) as client:
            assert client.info().workers == 0
        first.terminate()
        assert first.wait(30) == 0
        assert not path.exists()  # its master removed it on the way out
    finally:
        kill_all({first.pid} | ({second.pid} if second else set()))
        first.wait(10)
        if second is not None:
            second.wait(10)
