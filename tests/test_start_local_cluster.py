"""How a LocalCluster starts: its master starts the local node first thing, on a port held for it.

The node no longer waits for the master to listen: the master process starts it before its own
imports, on a port that ``LocalCluster`` picked and holds until the master binds it. What a user
sees must not change: the same process tree (master -> node -> workers), the same clean stop,
the same errors.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
import zmq

from actors import Client, LocalCluster, Task
from actors.cluster import ClusterStartFailed, _reserve_port
from tests.conftest import alive, children, cmdline, descendants, kill_all, python, wait_until
from transport import init_keys

pytestmark = pytest.mark.processes


class Square(Task):
    def work(self, x):
        return x * x


def _running_with(text: str) -> set[int]:
    """Live processes whose command line mentions ``text`` (a path unique to one test)."""
    return {int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and text in cmdline(int(e.name)) and alive(int(e.name))}


@pytest.mark.parametrize("fork", [True, False])
@pytest.mark.parametrize("local_node", ["inside", "process"])
def test_the_workers_are_the_local_nodes_children_inside_the_master_or_in_its_child(
        fork: bool, local_node: str) -> None:
    with LocalCluster(workers=2, fork=fork, local_node=local_node) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        assert client.submit(Square, 3).result(timeout=30) == 9
        if local_node == "inside":  # the master's own children: its node runs in it
            assert len(children(cl.pid)) == 2 and not any(children(w) for w in children(cl.pid))
        else:
            (node,) = children(cl.pid)
            # forked (where this process runs one thread) it shows this process's command line
            assert "actors.node" in cmdline(node) or cl.forked
            assert len(children(node)) == 2
        pids = descendants(cl.pid) | {cl.pid}
    wait_until(lambda: not any(alive(p) for p in pids), 20, "every cluster process to end")


def test_a_held_port_is_refused_to_others_but_not_to_the_master() -> None:
    reserved = _reserve_port("127.0.0.1", 0)
    assert reserved is not None
    holder, port, ip = reserved
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    dealer = ctx.socket(zmq.DEALER)
    try:
        assert ip == "127.0.0.1" and port > 0
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        router.bind(f"tcp://127.0.0.1:{port}")  # what the master's hub does
        dealer.connect(f"tcp://127.0.0.1:{port}")
        dealer.send(b"hello")
        assert router.recv_multipart()[1] == b"hello"
    finally:
        holder.close()
        router.close(linger=0)
        dealer.close(linger=0)
        ctx.term()


def test_a_host_that_is_not_ipv4_is_not_held() -> None:
    assert _reserve_port("::1", 0) is None  # the master reports the error, as before


def test_an_explicit_port_is_the_clusters_and_a_busy_one_fails_cleanly() -> None:
    # Held here as LocalCluster holds it (bound, not listening): no other process can take the
    # port between choosing it and the master binding it.
    reserved = _reserve_port("127.0.0.1", 0)
    assert reserved is not None
    holder, port, _ = reserved
    try:
        with LocalCluster(workers=1, port=port) as cl, Client(cl) as client:
            assert cl.address == f"tcp://127.0.0.1:{port}"
            assert client.submit(Square, 4).result(timeout=30) == 16
    finally:
        holder.close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        # with the master's own reason: its log went to a terminal a notebook may not show
        with pytest.raises(ClusterStartFailed, match=r"exited with code 2: cannot listen: "
                                                     r".*Address already in use"):
            LocalCluster(workers=1, port=busy.getsockname()[1])


def test_a_master_that_cannot_start_stops_the_node_it_started(tmp_path: Path) -> None:
    keys = init_keys(tmp_path / "keys")
    (keys / "master.key_secret").write_text("not a key\n")  # the node's own keys are fine
    with pytest.raises(ClusterStartFailed, match="exited with code 2: bad keys: "):
        LocalCluster(workers=2, keys=keys)
    wait_until(lambda: not _running_with(str(keys)), 20, "the node to be stopped")


def test_a_local_node_placement_that_is_not_one_is_refused_before_anything_starts() -> None:
    before = set(Path(tempfile.gettempdir()).glob("actors-cluster-*"))
    with pytest.raises(ValueError, match="local_node is 'inside' or 'process', not 'elsewhere'"):
        LocalCluster(workers=1, local_node="elsewhere")
    assert set(Path(tempfile.gettempdir()).glob("actors-cluster-*")) == before


def test_a_node_inside_its_master_that_refuses_its_settings_fails_the_cluster_saying_why(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACTORS_FETCH_TIMEOUT", "-1")
    with pytest.raises(ClusterStartFailed, match=r"master exited with code 2: bad arguments: "
                       r"--fetch-timeout must be more than 0 seconds"):
        LocalCluster(workers=2)


def test_a_node_that_refuses_its_settings_fails_the_cluster_at_once_saying_why(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    # The master starts fine; its node (a process) refuses a setting it reads from the
    # environment, and would refuse it again: it is not started again, and the client is told
    # why instead of waiting out its timeout for workers that never come.
    monkeypatch.setenv("ACTORS_FETCH_TIMEOUT", "-1")
    with LocalCluster(workers=2, local_node="process") as cl:
        with pytest.raises(ClusterStartFailed, match=r"0 of 2 workers; the master's node is not "
                           r"running: it refused to start \(bad arguments: --fetch-timeout "
                           r"must be more than 0 seconds\)"):
            Client(cl, timeout=120)
        # A client of another host's making (it may expect other nodes) still waits, but its
        # timeout says what it waits for.
        with Client(cl.address, keys=cl.keys_dir) as client:
            assert "fetch-timeout" in client.info().local_node_failed
            with pytest.raises(TimeoutError, match=r"\(0 joined; the master's node is not "
                               r"running: it refused"):
                client.wait_for_workers(1, timeout=0.2)
            # and a task's wait that times out says why it is still queued
            with pytest.raises(TimeoutError, match=r"not done after 1.0s \(still queued: the "
                               r"cluster has no worker; the master's node is not running: it "
                               r"refused to start"):
                client.submit(Square, 2).result(timeout=1.0)
    assert "local_node_restarted" not in capfd.readouterr().err


def test_keys_are_created_where_asked_before_anything_starts(tmp_path: Path) -> None:
    keys = tmp_path / "new-keys"
    with LocalCluster(workers=1, keys=keys) as cl, Client(cl) as client:
        assert (keys / "master.key_secret").exists() and (keys / "allowed" / "node.key").exists()
        assert client.submit(Square, 5).result(timeout=30) == 25


@pytest.mark.parametrize(("local_node", "processes"), [("inside", 2), ("process", 3)])
def test_a_killed_master_takes_its_node_and_workers_along(local_node: str, processes: int) -> None:
    with LocalCluster(workers=2, local_node=local_node) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        pids = descendants(cl.pid)
        assert len(pids) == processes  # its 2 workers (and its node, a process)
        os.kill(cl.pid, signal.SIGKILL)
        cl.process.wait(10)
        wait_until(lambda: not any(alive(p) for p in pids), 20, "the node and workers to end")


def test_a_local_cluster_removes_what_one_killed_before_it_left_behind(tmp_path: Path) -> None:
    """A LocalCluster's folder holds its secret keys: one a kill -9 left goes at the next start."""
    stale = Path(tempfile.gettempdir()) / "actors-cluster-999999999-stale"
    (stale / "keys").mkdir(parents=True)
    (stale / "keys" / "master.key_secret").write_text("a secret left behind")
    with LocalCluster(workers=0) as cluster:
        assert not stale.exists()
        assert Path(cluster.keys_dir).is_dir()
    assert not Path(cluster.keys_dir).exists()


_SCRIPT_THEN_KILLED = """
import sys, time
from actors import Client, LocalCluster
cluster = LocalCluster(workers=2)
client = Client(cluster)
client.wait_for_workers(2)
print(cluster.pid, flush=True)
time.sleep(600)
"""


def test_a_cluster_does_not_outlive_the_script_that_made_it_when_that_is_killed() -> None:
    """A notebook's kernel killed, a script hit by kill -9: no finalizer runs, yet the master,
    its node and workers must not live on without anyone (they hold memory, ports, keys)."""
    script = python("-c", _SCRIPT_THEN_KILLED, stdout=subprocess.PIPE)
    cluster: set[int] = set()
    try:
        line = script.stdout.readline()  # type: ignore[union-attr]
        assert line.strip().isdigit(), f"the script did not start its cluster: {line!r}"
        master = int(line)
        cluster = {master, *descendants(master)}
        assert len(cluster) == 3  # master (its node inside), 2 workers
        os.kill(script.pid, signal.SIGKILL)
        script.wait(10)
        wait_until(lambda: not any(alive(p) for p in cluster), 20,
                   "the master, node and workers to end with their script")
    finally:
        kill_all({script.pid, *descendants(script.pid), *cluster})  # (reparented once it died)
        script.wait(10)
        script.stdout.close()  # type: ignore[union-attr]
