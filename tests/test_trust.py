"""Keys bound to roles, routing ids bound to keys, tasks owned by their client: each attack is
performed on a real master and fails, while a legitimate task still completes."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import zmq

from actors import Client, LocalCluster, ParallelTask, Task, __version__
from actors import client as client_module
from actors import messages as m
from actors.errors import NoSuchTask, ScatterFailed, TaskIdTaken, WorkerKilled
from actors.futures import Future
from tests.conftest import stderr_so_far, wait_until
from transport.hub import BATCH, unbatch
from transport.keys import add_key, load_keypair, load_public_key

pytestmark = pytest.mark.processes


class Square(Task):
    def work(self, x):
        return x * x


class WaitsFor(Task):
    def work(self, path):
        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "released"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(workers=2) as cl:
        yield cl


def dealer(cluster: LocalCluster, keys: str | Path, role: str, identity: bytes) -> zmq.Socket[bytes]:
    """A bare DEALER with the ``role`` key pair of ``keys``: authenticated, speaking as we like."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5_000)
    sock.setsockopt(zmq.IDENTITY, identity)
    pair = load_keypair(keys, role)
    sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    sock.curve_serverkey = load_public_key(cluster.keys_dir, "master")
    sock.connect(cluster.address)
    return sock


def replies(sock: zmq.Socket[bytes]) -> list[m.Message]:
    return [m.decode(frames[-1]) for frames in unbatch(sock.recv_multipart())]


def hello(sock: zmq.Socket[bytes], role: str, peer_id: str) -> list[m.Message]:
    """Say hello; what came back up to the Welcome or Refused (a node first gets the newest
    package versions, in the same frame or one of its own)."""
    sock.send(m.encode(m.Hello(role=role, peer_id=peer_id, protocol=m.PROTOCOL_VERSION,
                               version=__version__)))
    got: list[m.Message] = []
    for _ in range(10):
        got += replies(sock)
        for i, msg in enumerate(got):  # (what the master sends after it may share its frame)
            if isinstance(msg, m.Welcome | m.Refused):
                return got[:i + 1]
    raise AssertionError(f"no Welcome or Refused: {got}")


@pytest.mark.parametrize(("key_role", "claimed"), [("client", "node"), ("node", "client")])
def test_a_key_cannot_connect_in_another_role(cluster: LocalCluster, key_role: str,
                                              claimed: str) -> None:
    sock = dealer(cluster, cluster.keys_dir, key_role, f"impostor-{key_role}".encode())
    try:
        refused = hello(sock, claimed, f"impostor-{key_role}")[-1]
        assert isinstance(refused, m.Refused)
        assert refused.reason == f"a {key_role} key cannot connect as a {claimed}"
    finally:
        sock.close()
    with Client(cluster) as client:
        assert client.info().workers == 2  # no fake node's workers joined
        assert client.submit(Square, 9).result(timeout=30) == 81


def test_a_peer_cannot_claim_another_peers_id(cluster: LocalCluster) -> None:
    with Client(cluster) as client:
        real_node = client.info().nodes[0]
        sock = dealer(cluster, cluster.keys_dir, "node", b"node-claimer")
        try:
            refused = hello(sock, "node", real_node)[-1]
            assert isinstance(refused, m.Refused)
            assert refused.reason == "a peer's id is its connection's identity"
        finally:
            sock.close()
        assert client.info().nodes == [real_node] and client.info().workers == 2
        assert client.submit(Square, 4).result(timeout=30) == 16


def test_a_connection_cannot_take_over_a_connected_peers_routing_id(
        cluster: LocalCluster, tmp_path: Path) -> None:
    """Same key and the victim's client id: the master never hears the impostor, and the
    victim's task runs to its end."""
    gate = tmp_path / "gate"
    with Client(cluster) as victim:
        fut = victim.submit(WaitsFor, str(gate))
        impostor = dealer(cluster, cluster.keys_dir, "client", victim.client_id.encode())
        try:
            impostor.send(m.encode(m.Cancel(fut.task_id)))
            impostor.send(m.encode(m.StoryRequest(fut.task_id)))
            with pytest.raises(zmq.Again):
                impostor.recv()  # nothing of the victim's comes to it
        finally:
            impostor.close()
        gate.touch()
        assert fut.result(timeout=30) == "released"


def test_a_client_cancels_only_its_own_tasks_and_reads_only_its_keys_stories(
        cluster: LocalCluster, tmp_path: Path) -> None:
    """A future's Cancel is its own client's; the story (and the command line's cancel and
    logs) belong to the key: a notebook and a terminal with one key are one person. Another
    key gets nothing, in the words used for an id never seen."""
    gate = tmp_path / "gate"
    folder = add_key(cluster.keys_dir, "client", f"mallory{os.getpid()}")
    with (Client(cluster) as owner, Client(cluster) as same_key,
          Client(cluster.address, keys=folder) as stranger):
        fut = owner.submit(WaitsFor, str(gate))
        assert fut.story(), "the owner reads its own task's story"
        assert same_key._request(fut.task_id, m.StoryRequest(fut.task_id), 10).entries
        refused = stranger._request(fut.task_id, m.StoryRequest(fut.task_id), 10)
        assert refused.entries == [] and refused.error.startswith(f"no task {fut.task_id!r}")
        same_key._send(m.Cancel(fut.task_id))
        for ask in (stranger.cancel_task, stranger.task_logs, stranger.story_of):
            with pytest.raises(NoSuchTask) as no_task:
                ask(fut.task_id)
            assert str(no_task.value) == refused.error
        assert same_key.submit(Square, 3).result(timeout=30) == 9  # the cancel came before this
        assert stranger.submit(Square, 4).result(timeout=30) == 16
        assert not fut.done()
        gate.touch()
        assert fut.result(timeout=30) == "released"


def test_a_submit_with_another_clients_task_id_is_refused_not_taken_for_a_resend(
        cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Taken for a resend, it would leave its future waiting for a result that goes to the
    task's own client; refused, its submitter knows at once, and the task is untouched."""
    gate = tmp_path / "gate"
    folder = add_key(cluster.keys_dir, "client", f"clasher{os.getpid()}")
    with Client(cluster) as owner, Client(cluster.address, keys=folder) as stranger:
        fut = owner.submit(WaitsFor, str(gate))
        owner.info()  # a round trip behind the submit: the master has it before the clash
        with monkeypatch.context() as patch:
            patch.setattr(client_module._task_ids, "new", lambda name: fut.task_id)
            clash = stranger.submit(Square, 5)
        assert clash.task_id == fut.task_id
        with pytest.raises(TaskIdTaken, match="another client's task"):
            clash.result(timeout=30)
        assert stranger.submit(Square, 6).result(timeout=30) == 36  # a new id: served
        gate.touch()
        assert fut.result(timeout=30) == "released"
        with monkeypatch.context() as patch:  # still refused once it is done (kept for stories)
            patch.setattr(client_module._task_ids, "new", lambda name: fut.task_id)
            late = owner.submit(Square, 7), stranger.submit(Square, 7)
        with pytest.raises(TaskIdTaken):
            late[1].result(timeout=30)
        assert not late[0].done()  # the owner's own id again: a resend, the first one stands


class Pick(Task):
    def work(self, value, _after):
        return value


class Evil(Task):
    def work(self):
        return "the stranger's value"


def test_a_submit_cannot_take_the_id_of_another_clients_scattered_data(
        cluster: LocalCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scattered data is a done task's result to the master: a task submitted under its id by
    another client would have replaced the value the owner's tasks take."""
    gate = tmp_path / "gate"
    folder = add_key(cluster.keys_dir, "client", f"squatter{os.getpid()}")
    with Client(cluster) as owner, Client(cluster.address, keys=folder) as stranger:
        secret = owner.scatter("the owner's value")
        waiting = owner.submit(WaitsFor, str(gate))
        picked = owner.submit(Pick, secret, waiting)  # takes the data once `waiting` is done
        with monkeypatch.context() as patch:
            patch.setattr(client_module._task_ids, "new", lambda name: secret.task_id)
            squat = stranger.submit(Evil)
        with pytest.raises(TaskIdTaken):
            squat.result(timeout=30)
        gate.touch()
        assert picked.result(timeout=30) == "the owner's value"
        assert owner.submit(Pick, secret, 0).result(timeout=30) == "the owner's value"


def test_two_clients_scatter_the_same_data_each_its_own(cluster: LocalCluster) -> None:
    """Named by its content alone, the second client's scatter of the same data failed (its
    id taken), whichever key it had."""
    folder = add_key(cluster.keys_dir, "client", f"sharer{os.getpid()}")
    with (Client(cluster) as first, Client(cluster) as same_key,
          Client(cluster.address, keys=folder) as other_key):
        futures = [c.scatter("shared config") for c in (first, same_key, other_key)]
        assert len({f.task_id for f in futures}) == 3
        assert first.scatter("shared config") is futures[0]  # again by its client: the same one
        for client, future in zip((first, same_key, other_key), futures, strict=True):
            assert client.submit(Pick, future, 0).result(timeout=30) == "shared config"


def test_a_client_that_announces_large_scatters_and_never_sends_them_holds_few_slots(
        cluster: LocalCluster) -> None:
    """A node takes a bounded number of large puts at once, for all clients: announced and
    never sent, one client's held them all (for two minutes each), and every other client's
    large scatter failed meanwhile."""
    folder = add_key(cluster.keys_dir, "client", f"hoarder{os.getpid()}")
    with Client(cluster) as victim, Client(cluster.address, keys=folder) as hoarder:
        for i in range(64):  # what a node takes at once, for all clients
            hoarder._send(m.Scatter(f"scatter-{i:024x}", size=1 << 30))
        with pytest.raises(ScatterFailed, match="8 scatters under way"):
            hoarder.scatter(os.urandom(1 << 20), timeout=10)
        big = victim.scatter(os.urandom(1 << 20), timeout=10)
        assert victim.submit(Pick, big, 0).result(timeout=30) == big.result(timeout=30)


def test_package_contents_go_to_node_keys_only(cluster: LocalCluster) -> None:
    sock = dealer(cluster, cluster.keys_dir, "client", b"curious-client")
    try:
        assert isinstance(hello(sock, "client", "curious-client")[-1], m.Welcome)
        sock.send(m.encode(m.ChunkRequest("anything", "0" * 64, 0, 1 << 20)))
        with pytest.raises(zmq.Again):
            sock.recv()  # no ChunkReply, no UnknownVersion: nothing about packages
    finally:
        sock.close()


def test_a_node_cannot_speak_for_another_nodes_workers(cluster: LocalCluster,
                                                      tmp_path: Path) -> None:
    with Client(cluster) as client:
        real_worker = client.info().nodes[0] + "/w1"
        sock = dealer(cluster, cluster.keys_dir, "node", b"node-rogue")
        try:
            assert isinstance(hello(sock, "node", "node-rogue")[-1], m.Welcome)
            sock.send(m.encode(m.WorkerExited(real_worker, 1, None, 9, 0, False)))
            sock.send(m.encode(m.WorkerReady(real_worker, 1)))  # not named after this node
            sock.send_multipart([real_worker.encode(), m.encode(
                m.TaskResult("any-task", m.UnitOutcome(-1, True, b"forged"), 0.0))])
            sock.send_multipart([real_worker.encode(), m.encode(m.TaskResults([
                m.TaskResult(f"any-task-{i}", m.UnitOutcome(-1, True, b"forged"), 0.0)
                for i in range(3)]))])
        finally:
            sock.send(m.encode(m.Bye("rogue leaving")))
            sock.close()
        assert client.info().workers == 2
        assert sorted(client.submit(Square, i).result(timeout=30) for i in range(6)) == [
            0, 1, 4, 9, 16, 25]


def test_a_key_added_for_one_client_works_as_a_client_and_only_so(cluster: LocalCluster) -> None:
    folder = add_key(cluster.keys_dir, "client", f"alice{os.getpid()}")
    with Client(cluster.address, keys=folder) as alice:
        assert alice.submit(Square, 5).result(timeout=30) == 25
    sock = dealer(cluster, folder, "client", b"alice-as-node")
    try:
        refused = hello(sock, "node", "alice-as-node")[-1]
        assert isinstance(refused, m.Refused) and "client key cannot connect as a node" in refused.reason
    finally:
        sock.close()


def test_keys_add_on_the_command_line_makes_a_folder_to_hand_over(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    subprocess.run([sys.executable, "-m", "actors", "keys", "init", str(keys)], check=True,
                   capture_output=True, timeout=60)
    done = subprocess.run([sys.executable, "-m", "actors", "keys", "add", str(keys), "bob",
                           "--role", "node"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert (keys / "allowed" / "node-bob.key").is_file()
    assert {p.name for p in (keys / "peers" / "bob").iterdir()} == {
        "node.key", "node.key_secret", "master.key"}
    again = subprocess.run([sys.executable, "-m", "actors", "keys", "add", str(keys), "bob",
                            "--role", "node"], capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "exists already" in again.stderr


def test_task_ids_drawn_in_a_forked_child_are_not_its_parents() -> None:
    """Ids are drawn in batches: a child forked with part of a batch left must draw its own,
    or a client in it and one in the parent would submit the same ids (and be refused)."""
    ids = client_module._task_ids
    ids.new("Warm")  # a batch drawn here, most of it left
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, " ".join(ids.new("T") for _ in range(300)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        child = pipe.read().decode().split()
    assert os.waitpid(pid, 0)[1] == 0
    parent = [ids.new("T") for _ in range(300)]
    assert len(child) == 300 and not set(child) & set(parent)
    assert len(set(parent)) == 300 and all(len(i) == len("T-") + 16 for i in parent)


def test_a_malformed_message_inside_a_batch_is_dropped_alone(cluster: LocalCluster) -> None:
    """The master takes a batched frame's messages as one hand-off: one that cannot be decoded
    is logged and dropped, and the messages before and after it in the batch are answered."""
    sock = dealer(cluster, cluster.keys_dir, "client", b"batching-client")
    try:
        assert isinstance(hello(sock, "client", "batching-client")[-1], m.Welcome)
        items = [([], m.encode(m.InfoRequest())), ([], b"\xffnot a message"),
                 ([], m.encode(m.InfoRequest()))]
        sock.send(BATCH + msgspec.msgpack.encode(items))
        answers: list[m.Message] = []
        for _ in range(10):
            answers += [a for a in replies(sock) if isinstance(a, m.ClusterInfo)]
            if len(answers) == 2:
                break
        assert len(answers) == 2
    finally:
        sock.send(m.encode(m.Bye("leaving")))
        sock.close()


def _connected_as(worker_id: str) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]]:
    """(Task code) a connection to its node's socket for workers under ``worker_id``, once
    connected; raises if it did not connect in 10 s."""
    path = os.path.join(os.path.dirname(os.getcwd()), "workers.sock")  # (its run folder)
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, worker_id.encode())
    events = sock.get_monitor_socket(zmq.EVENT_CONNECTED)
    try:
        sock.connect(f"ipc://{path}")
        if not events.poll(10_000):
            sock.close()
            context.term()
            raise ConnectionError(f"could not connect to {path}")
    finally:
        events.close()
    return context, sock


class TakesAnotherWorkersPlace(Task):
    """Task code that connects to its node's socket for workers under another worker's id (ids
    are guessable: NODE_ID/wN), says it is that worker (a Hello without its secret) and that
    the worker's task returned "forged", and listens for what the node sends that id."""

    def work(self, worker_id: str, task_id: str) -> str:
        from actors import __version__ as version
        from actors import messages as msgs
        from actors.serialize import dumps_result

        try:
            context, sock = _connected_as(worker_id)
        except ConnectionError as exc:
            return str(exc)
        try:
            hello = msgs.Hello(role="worker", peer_id=worker_id, protocol=msgs.PROTOCOL_VERSION,
                               version=version, pid=os.getpid(), token="0" * 32)
            forged = msgs.TaskResult(task_id, msgs.UnitOutcome(-1, True, dumps_result("forged",
                                                                                      "T")))
            for _ in range(3):  # (a parked connection's first frames are read as its id)
                sock.send_multipart([b"n", msgs.encode(hello)])
                sock.send_multipart([b"m", msgs.encode(forged)])
            return "sent" + (", and was sent the worker's messages" if sock.poll(2_000) else "")
        finally:
            sock.close()
            context.term()


class SpeaksAsAnotherWorkerOnItsLink(Task):
    """Task code on a worker linked to its node (no socket to open): on its own worker's link,
    it says it is another worker (a Hello without its secret) and that the worker's task
    returned "forged"."""

    def work(self, worker_id: str, task_id: str) -> str:
        import gc

        from actors import __version__ as version
        from actors import messages as msgs
        from actors.serialize import dumps_result
        from actors.worker import NODE
        from transport.hub import Hub

        hub = next(o for o in gc.get_objects() if type(o) is Hub)
        hello = msgs.Hello(role="worker", peer_id=worker_id, protocol=msgs.PROTOCOL_VERSION,
                           version=version, pid=os.getpid(), token="0" * 32)
        forged = msgs.TaskResult(task_id, msgs.UnitOutcome(-1, True, dumps_result("forged", "T")))
        outbox = hub.outbox()
        for _ in range(3):
            outbox.send(NODE, [b"n", msgs.encode(hello)])
            outbox.send(NODE, [b"m", msgs.encode(forged)])
        return "sent" if hub._link_fds else "no link"


class RunsWhereItWasSent(Task):
    """What the task below makes another worker run: its pid, in a file."""

    def work(self, marker: str) -> str:
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        return "ran"


class SendsAnotherWorkerItsNodesMessages(Task):
    """Task code speaking as its own worker's runtime (it runs in its process) on the data
    plane: to the other worker of its node (of two), an ``AssignTask`` of code of its own, as a
    reply to a request never made, and as a request to that worker as a holder."""

    def work(self, marker: str) -> str:
        import gc

        from actors.serialize import dumps, dumps_task_class
        from actors.worker import NODE, Worker
        from transport.hub import Hub

        hub = next(o for o in gc.get_objects() if type(o) is Hub)
        me = next(o for o in gc.get_objects() if isinstance(o, Worker)).worker_id
        node_id, number = me.rsplit("/w", 1)
        victim = f"{node_id}/w{3 - int(number)}"
        assign = m.encode(m.AssignTask(
            task_id="injected", name="RunsWhereItWasSent", kind="task",
            code=dumps_task_class(RunsWhereItWasSent), args=dumps(((marker,), {})), driver=True))
        outbox = hub.outbox()
        try:
            outbox.send(NODE, [b"r", b"", victim.encode(), assign])
            outbox.send(NODE, [b"p", b"tcp://127.0.0.1:9", victim.encode(), assign])
        finally:
            outbox.close()
        return victim


class HoldsTheNextWorkersId(Task):
    """Task code that connects to its node's socket for workers under the id the node will give
    its next worker (ids are guessable: NODE_ID/wN) and holds it until ``gate`` exists."""

    def work(self, worker_id: str, connected: str, gate: str) -> str:
        try:
            context, sock = _connected_as(worker_id)
        except ConnectionError as exc:
            return str(exc)
        try:
            sock.send_multipart([b"n", b"squatting"])  # (the router reads its id from the peer)
            open(connected, "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(gate) and time.monotonic() < deadline:
                time.sleep(0.01)
            return "held"
        finally:
            sock.close()
            context.term()


class DiesOnce(Task):
    """Kills its own worker the first time it runs (``marker`` says it did), returns after."""

    def work(self, marker: str) -> str:
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return "ran again"


def test_task_code_cannot_send_another_worker_its_nodes_messages(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """The node relays what a worker sends on the data plane to the worker it names (a holder,
    or the requester of a reply), and a worker took what came as if from its node: task code
    sent another user's idle worker an AssignTask of its own code, which ran there. Now the
    node relays only a request naming its sender, or a reply to a request it relayed, and a
    worker takes only data after the data plane's mark (actors/node_data.py)."""
    marker = tmp_path / "ran-there"
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        victim = client.submit(SendsAnotherWorkerItsNodesMessages, str(marker)).result(30)
        wait_until(lambda: stderr_so_far(capfd).count("data_frame_refused") >= 2, 30,
                   "the node to refuse both frames")
        # The victim (idle: the injected task would have run at once) serves on, as itself.
        futures = [client.submit(Square, i) for i in range(20)]
        assert [f.result(30) for f in futures] == [i * i for i in range(20)]
        assert client.info().workers == 2
    assert not marker.exists(), f"the injected task ran in {victim}, pid {marker.read_text()}"


class ItsWorkersStartingEnvironment(Task):
    """What /proc/PID/environ shows of its worker: the environment the process started with,
    readable by any process of its uid (os.environ is what the process made of it since)."""

    def work(self) -> dict[str, str]:
        with open("/proc/self/environ", "rb") as f:
            pairs = [entry.split(b"=", 1) for entry in f.read().split(b"\0") if b"=" in entry]
        return {k.decode(): v.decode(errors="replace") for k, v in pairs}


def test_a_spawned_workers_secret_is_not_in_its_environment(tmp_path: Path) -> None:
    """A worker proves itself to its node with a secret the node started it with. A spawned
    worker (one that replaces another) had it in its environment, which /proc/PID/environ shows
    to any process of its uid for the process's life; it now comes on its standard input."""
    from actors.contain import TOKEN_ENV

    with LocalCluster(workers=1) as cl, Client(cl) as client:
        client.wait_for_workers(1)
        first = client.submit(ItsWorkersStartingEnvironment).result(30)
        assert first.get(TOKEN_ENV, "-") == "-"  # (forked: set after the wipe, not in it)
        assert client.submit(DiesOnce, str(tmp_path / "marker")).result(60) == "ran again"
        spawned = client.submit(ItsWorkersStartingEnvironment).result(30)
        assert spawned.get(TOKEN_ENV) == "-", spawned.get(TOKEN_ENV)  # (it proved itself)


class Floods(Task):
    """Task code speaking as its own worker's runtime: ``n`` messages no worker sends (a client's
    Cancel), to the master through its worker's node (``to`` b"m") or to the node (b"n"), or
    (``to`` b"") frames in no layout a worker uses; then it waits ``then_wait`` seconds."""

    def work(self, n: int, to: bytes, then_wait: float = 0.0) -> str:
        import gc
        import time

        from actors.worker import NODE
        from transport.hub import Hub

        hub = next(o for o in gc.get_objects() if type(o) is Hub)
        outbox = hub.outbox()
        frames = [to, m.encode(m.Cancel("nothing"))] if to else [b"?"]
        try:
            for _ in range(n):
                outbox.send(NODE, frames)
        finally:
            outbox.close()
        time.sleep(then_wait)
        return "sent"


def test_task_code_that_floods_the_master_ends_its_worker_not_its_node(
        capfd: pytest.CaptureFixture[str]) -> None:
    """The master stops hearing a peer that sends more than 1,000 refused messages in 10 s. A
    worker's messages come through its node, and were counted as the node's: task code sending
    1,500 of them had the whole node (every worker of every user on it) unheard for a minute,
    and declared lost. Now they count against the worker, which is ended (a death against its
    task, as a worker lost); the node and its other workers serve on."""
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        flood = client.submit(Floods, 1_500, b"m")
        with pytest.raises(WorkerKilled, match="refused messages"):
            flood.result(60)  # ended on each of its three workers
        assert [client.submit(Square, i).result(30) for i in range(5)] == [0, 1, 4, 9, 16]
        wait_until(lambda: client.info().workers == 2, 30, "the ended workers to be replaced")
    err = capfd.readouterr().err
    assert "worker_blocked" in err and "peer_blocked" not in err, err[-3000:]


class SaysHelloAgain(Task):
    """Task code that keeps its worker's Hello (with the secret the worker holds) going from a
    thread it leaves behind, ignores SIGTERM, and keeps any other task's assignment that comes
    to its process, answering it with a forged result."""

    def work(self, loot: str) -> str:
        import ctypes
        import gc
        import signal
        import threading
        import time

        import actors
        from actors import serialize
        from actors.worker import NODE, Worker
        from transport.hub import Hub

        hub = next(o for o in gc.get_objects() if type(o) is Hub)
        worker = next(o for o in gc.get_objects() if isinstance(o, Worker))
        libc = ctypes.CDLL(None)
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        libc.signal(signal.SIGTERM, ctypes.c_void_p(1))  # SIG_IGN
        mine, original, outboxes = self.task_id, Worker._from_node, []

        def spy(self_: Worker, msg: m.Message) -> None:
            if isinstance(msg, m.AssignTask) and msg.task_id != mine:
                with open(os.path.join(loot, msg.task_id), "wb") as out:
                    out.write(msg.args)
                forged = m.TaskResult(msg.task_id, m.UnitOutcome(-1, True,
                                                                  serialize.dumps("forged")))
                outboxes[0].send(NODE, [b"m", m.encode(forged)])
                return
            original(self_, msg)

        Worker._from_node = spy  # type: ignore[method-assign]
        hello = m.encode(m.Hello(role="worker", peer_id=worker.worker_id,
                                 protocol=m.PROTOCOL_VERSION, version=actors.__version__,
                                 pid=os.getpid(), token=worker.token))

        def again() -> None:
            outboxes.append(hub.outbox())
            for _ in range(3000):  # (30 s at most)
                outboxes[0].send(NODE, [b"n", hello])
                time.sleep(0.01)

        threading.Thread(target=again, daemon=True).start()
        return worker.worker_id


class Secret(Task):
    def work(self, secret: str) -> str:
        return "its own result"


def test_a_worker_told_to_stop_cannot_come_back_for_another_keys_task(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """One key's task code kept its worker alive past its eviction (SIGTERM ignored) and said
    the worker's Hello again: the node announced it anew, the master took it for a clean
    worker and gave it another key's task, whose code and arguments it read and whose result
    it forged. A worker says Hello once; one told to stop is relayed nothing more; and the
    scheduler never takes back a worker it dropped for good."""
    with LocalCluster(workers=1) as cl:
        other = add_key(cl.keys_dir, "client", f"bob{os.getpid()}")
        with Client(cl) as alice, Client(cl.address, keys=other) as bob:
            alice.wait_for_workers(1)
            alice.submit(SaysHelloAgain, str(tmp_path)).result(30)
            assert bob.submit(Secret, "hunter2").result(60) == "its own result"
            assert os.listdir(tmp_path) == []  # nothing of bob's reached alice's process
    assert "a worker says Hello once" in capfd.readouterr().err  # (refused by its node)


class SwapsItsResultFile(Task):
    """Task code handing its node a result file by descriptor number (``HeldFile``) while a
    thread of it swaps that descriptor between a memory file of the right name and a FIFO
    that no one writes to."""

    def work(self, seconds: float) -> int:
        import gc
        import tempfile
        import threading
        import time

        from actors.worker import NODE
        from transport.hub import Hub

        hub = next(o for o in gc.get_objects() if type(o) is Hub)
        memory = os.memfd_create("pydra-result-deadbeef", os.MFD_ALLOW_SEALING)
        fifo = os.path.join(tempfile.mkdtemp(), "fifo")
        os.mkfifo(fifo)
        pipe, number, stop = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), 700, threading.Event()
        os.dup2(memory, number)

        def swap() -> None:
            while not stop.is_set():
                os.dup2(pipe, number)
                os.dup2(memory, number)

        threading.Thread(target=swap, daemon=True).start()
        outbox, sent = hub.outbox(), 0
        held = m.encode(m.HeldFile(self.task_id, number, "deadbeef", [0]))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            outbox.send(NODE, [b"f", held])
            sent += 1
            time.sleep(0.0005)
        stop.set()
        return sent


def test_task_code_swapping_the_file_it_hands_over_does_not_freeze_its_node() -> None:
    """The node looked at the worker's descriptor by its /proc path, then opened that path,
    waiting, on its hub thread: an open that landed on the FIFO never returned, and the node
    (every user's workers on it) stopped for good, declared lost. Opened without waiting, and
    what was opened is looked at again."""
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        assert client.submit(SwapsItsResultFile, 2.0).result(30) > 100
        assert [client.submit(Square, i).result(30) for i in range(3)] == [0, 1, 4]
        assert client.info().workers == 2


class HelloUnderAnotherName(Task):
    """Task code with a socket of its own on its node's workers' socket, saying Hello under an
    id no worker of the node holds, ``n`` times."""

    def work(self, n: int) -> int:
        import gc

        import zmq

        import actors
        from transport.hub import Hub

        hub = next(o for o in gc.get_objects() if type(o) is Hub)
        address = next(spec.address for spec in hub._specs if spec.name == "node")
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, b"nobody/w999")
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.connect(address)
        hello = m.encode(m.Hello(role="worker", peer_id="x", protocol=m.PROTOCOL_VERSION,
                                 version=actors.__version__))
        for _ in range(n):
            sock.send_multipart([b"n", hello])
        sock.close(linger=2000)
        return n


def test_hellos_under_an_unknown_name_are_logged_sparingly(
        capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """A Hello under any id reaches the node's actor (it is how a worker proves itself), which
    logged a warning for each one from an id it never started: one task wrote 10^6 lines in
    20 s. The 1st, 2nd, 4th... are logged, with their count. (A node with a socket for
    workers, the default; one that links its workers has none, test_links.py.)"""
    monkeypatch.setenv("ACTORS_WORKER_LINKS", "0")
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        assert client.submit(HelloUnderAnotherName, 5_000).result(60) == 5_000
        wait_until(lambda: "refused=4096" in stderr_so_far(capfd), 30, "the node to refuse them")
        assert client.submit(Square, 3).result(30) == 9
    lines = [line for line in capfd.readouterr().err.splitlines()
             if "message_from_unknown_worker" in line]
    assert 0 < len(lines) <= 14, len(lines)  # 1, 2, 4 ... 4096 (and a few of the node's own)


class FloodsMissing(ParallelTask):
    """Unit code speaking as its worker: ``n`` Missing reports for units never sliced (each
    refused by the scheduler, after it had kept an entry for each until the task ended)."""

    def get_work(self, n: int):
        yield n

    def work_unit(self, n: int) -> str:
        import gc
        import time

        from actors.worker import NODE
        from transport.hub import Hub

        hub = next(o for o in gc.get_objects() if type(o) is Hub)
        outbox = hub.outbox()
        try:
            for i in range(n):
                outbox.send(NODE, [b"m", m.encode(m.Missing(self.task_id, 10_000_000 + i))])
        finally:
            outbox.close()
        time.sleep(30)  # (ended meanwhile)
        return "sent"


def test_what_the_scheduler_refuses_of_a_worker_counts_against_it_and_a_flood_ends_it(
        capfd: pytest.CaptureFixture[str]) -> None:
    """The scheduler's own refusals (a Missing for a unit never sliced) logged a line each and
    counted against no one: 10^6 of them wrote 10^6 warnings. They count as every refusal of
    the worker's does: a few lines, and past 1,000 in 10 s the worker is ended."""
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        flood = client.submit(FloodsMissing, 1_500)
        with pytest.raises(WorkerKilled, match="refused messages"):
            flood.result(120)  # ended on each of its three workers
        assert [client.submit(Square, i).result(30) for i in range(5)] == [0, 1, 4, 9, 16]
    err = capfd.readouterr().err
    refusals = [line for line in err.splitlines() if "message_refused" in line]
    assert "worker_blocked" in err and 0 < len(refusals) <= 3 * 20, len(refusals)


def test_what_a_node_refuses_of_a_worker_is_logged_sparingly_and_a_flood_ends_it(
        capfd: pytest.CaptureFixture[str]) -> None:
    """A node logged a warning for each message of a worker it refused: task code wrote the
    node's log as fast as it could send (200,000 lines in a second). Now the 1st, 2nd, 4th,
    8th... of each worker, with the count. And refusing took the node's time for as long as
    the task sent: past 1,000 refused in 10 s (messages, or frames in no layout), the worker
    is ended as lost (a death against its task) and the node serves its other workers on."""
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        assert client.submit(Floods, 600, b"n").result(30) == "sent"  # within the bound
        wait_until(lambda: "refused=512" in stderr_so_far(capfd), 30,
                   "the node to refuse 512 of them")
        seen = stderr_so_far(capfd)
        lines = [line for line in seen.splitlines() if "unexpected_message" in line]
        counts = [int(n) for line in lines for n in re.findall(r"refused=(\d+)", line)]
        assert counts == [2**k for k in range(10)], lines[:20]  # 1, 2, 4 ... 512
        for to in (b"n", b""):  # messages a worker does not send; frames in no layout
            flood = client.submit(Floods, 1_500, to, 60.0)
            with pytest.raises(WorkerKilled, match="by its node: it sent more than 1000 "):
                flood.result(120)  # ended on each of its three workers
        assert [client.submit(Square, i).result(30) for i in range(5)] == [0, 1, 4, 9, 16]
        wait_until(lambda: client.info().workers == 2, 30, "the ended workers to be replaced")
    err = capfd.readouterr().err  # (the cluster is gone: nothing writes as it is read)
    assert "worker_ended" in err and "node_lost" not in err, err[-3000:]


def test_a_worker_whose_id_task_code_holds_as_it_starts_is_replaced(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """Task code can guess the id its node gives the next worker and hold it on the workers'
    socket first: that worker's connection is refused, its Hello is never heard, and it held its
    slot forever, so a task waiting for a worker waited for ever too. Now a worker that has not
    said hello ``--worker-start-timeout`` after its start ($ACTORS_WORKER_START_TIMEOUT here)
    is ended and replaced, and the log says so."""
    monkeypatch.setenv("ACTORS_WORKER_START_TIMEOUT", "5")  # (a start takes well under 1 s)
    monkeypatch.setenv("ACTORS_WORKER_LINKS", "0")  # (a node with a socket for workers: the default)
    connected, gate, marker = tmp_path / "connected", tmp_path / "gate", tmp_path / "marker"
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        first = client.submit(Square, 3)
        assert first.result(30) == 9
        node_id = next(cause.split("driver ", 1)[1].split()[0] for key, _, finish, cause, _
                       in first.story() if key == "task" and "driver " in cause).rsplit("/", 1)[0]
        squatter = client.submit(HoldsTheNextWorkersId, f"{node_id}/w3", str(connected), str(gate))
        wait_until(connected.exists, 30, "the task to hold the next worker's id")
        dies = client.submit(DiesOnce, str(marker))  # on the other worker: its replacement is w3
        assert dies.result(60) == "ran again"  # on the worker that replaced w3
        assert not squatter.done()
        gate.touch()
        assert squatter.result(30) == "held"
    err = capfd.readouterr().err
    assert "worker_start_timeout" in err and f"{node_id}/w3" in err, err[-3000:]


def _running_worker(task: Future) -> str:
    """The worker running ``task``, once it runs (its story: "master: driver NODE/wN")."""

    def driver() -> str:
        for key, _, finish, cause, _ in task.story():
            if key == "task" and finish == "running" and "driver " in cause:
                return cause.split("driver ", 1)[1].split()[0]
        return ""

    return str(wait_until(driver, 30, f"{task.task_id} to start"))


def test_task_code_on_a_linked_worker_cannot_speak_as_another_worker(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A node that links its workers (--worker-links, $ACTORS_WORKER_LINKS=1): no socket to
    open under another's id; what task code says on its own worker's link is its own worker's:
    a Hello as another worker and a forged end of that worker's task change nothing, the
    victim's task ends as it does, and the node and its workers serve on."""
    monkeypatch.setenv("ACTORS_WORKER_LINKS", "1")
    gate = tmp_path / "gate"
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        victim = client.submit(WaitsFor, str(gate))
        worker_id = _running_worker(victim)
        impostor = client.submit(SpeaksAsAnotherWorkerOnItsLink, worker_id, victim.task_id)
        with contextlib.suppress(WorkerKilled):  # (its worker may be ended for what it said)
            assert impostor.result(60) == "sent"
        gate.touch()
        assert victim.result(60) == "released"
        wait_until(lambda: client.info().workers == 2, 30, "two workers")
        assert [f.result(30) for f in client.map(Square, range(4))] == [0, 1, 4, 9]


def test_task_code_cannot_take_another_workers_place_on_its_node(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's socket for workers is a path any of its workers' processes can open, and a
    worker names itself: task code took a live worker's id, was sent its messages (another
    user's tasks) and ended its task with a forged result. Now a worker's frames count only
    once its Hello said the secret it was started with, and no connection takes over a
    connected worker's id (actors/node.py, "Proof"): neither the victim's id nor one no worker
    holds gets the impostor anything. (A node with a socket for workers, the default; one that
    links its workers has none: the test above.)"""
    monkeypatch.setenv("ACTORS_WORKER_LINKS", "0")
    gate = tmp_path / "gate"
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        victim = client.submit(WaitsFor, str(gate))
        worker_id = _running_worker(victim)
        nobodys = worker_id.rsplit("/", 1)[0] + "/w99"
        for taken in (worker_id, nobodys):
            impostor = client.submit(TakesAnotherWorkersPlace, taken, victim.task_id)
            assert impostor.result(60) == "sent"  # (it reached the socket: the attempt was made)
        gate.touch()
        assert victim.result(60) == "released"
        assert client.submit(Square, 7).result(30) == 49  # both workers serve on
