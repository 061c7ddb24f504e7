"""A class shipped by value goes to a worker once: later assignments name it by its hash, and a
worker that no longer has it gets it again by asking (``NeedCode`` -> ``Code``). A real master
and a real client; the node is a bare DEALER with the node key, so that what reaches the worker
can be read."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import zmq

from actors import Client, LocalCluster, Task
from actors import messages as m
from actors.serialize import dumps, loads
from tests.test_trust import dealer, hello
from transport.hub import unbatch

pytestmark = pytest.mark.processes

NODE = "node-fake"
WORKER = f"{NODE}/w1"


class Square(Task):
    def work(self, x):
        return x * x


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(workers=0) as cl:
        yield cl


def next_for_worker(sock: zmq.Socket[bytes], deadline: float) -> m.Message:
    """The next message the master sends the worker (node-level ones skipped)."""
    while time.monotonic() < deadline:
        try:
            frames_list = unbatch(sock.recv_multipart())
        except zmq.Again:
            continue
        for frames in frames_list:
            if len(frames) == 2 and frames[0] == WORKER.encode():
                return m.decode(frames[1])
    raise AssertionError("nothing for the worker in time")


def answer(sock: zmq.Socket[bytes], task_id: str, args: bytes) -> None:
    (x,), _ = loads(args)
    outcome = m.UnitOutcome(-1, True, dumps(x * x))
    sock.send_multipart([WORKER.encode(), m.encode(m.TaskResult(task_id, outcome, 0.001))])


def test_code_goes_once_then_by_hash_and_again_to_a_worker_that_asks(
        cluster: LocalCluster) -> None:
    sock = dealer(cluster, cluster.keys_dir, "node", NODE.encode())
    try:
        assert isinstance(hello(sock, "node", NODE)[-1], m.Welcome)
        sock.send(m.encode(m.WorkerReady(WORKER, 1)))
        deadline = time.monotonic() + 30
        with Client(cluster) as client:
            first = client.submit(Square, 3)
            assign = next_for_worker(sock, deadline)
            assert isinstance(assign, m.AssignTask) and assign.task_id == first.task_id
            code = assign.code
            assert len(code) >= 1024 and assign.code_hash  # by value, with this file's source
            answer(sock, assign.task_id, assign.args)
            assert first.result(timeout=30) == 9

            second = client.submit(Square, 4)
            assign = next_for_worker(sock, deadline)
            assert isinstance(assign, m.AssignTask) and assign.task_id == second.task_id
            assert assign.code == b"" and assign.code_hash  # named by its hash alone
            # As a worker that dropped the class: it asks, and gets the same code back.
            sock.send_multipart([WORKER.encode(), m.encode(m.NeedCode(assign.task_id,
                                                                      assign.code_hash))])
            sent = next_for_worker(sock, deadline)
            assert sent == m.Code(assign.code_hash, code)
            answer(sock, assign.task_id, assign.args)
            assert second.result(timeout=30) == 16

            # Asking for code of a task it does not hold gets nothing (and breaks nothing).
            sock.send_multipart([WORKER.encode(), m.encode(m.NeedCode("no-such-task",
                                                                      assign.code_hash))])
            third = client.submit(Square, 5)
            assign = next_for_worker(sock, deadline)
            assert isinstance(assign, m.AssignTask) and assign.task_id == third.task_id
            answer(sock, assign.task_id, assign.args)
            assert third.result(timeout=30) == 25
    finally:
        sock.send(m.encode(m.Bye("test over")))
        sock.close()
