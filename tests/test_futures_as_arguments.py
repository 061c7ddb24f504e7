"""Futures among a task's arguments: the task waits for them and gets their results, which stay
on the cluster (not sent back by the client) while anything may still need them (real
processes, the session's LocalCluster; across two nodes in test_unit_dependencies.py)."""

from __future__ import annotations

import collections
import contextlib
import gc
import os
import pickle
import signal
import threading
import uuid
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import Client, Future, LocalCluster, fire_and_forget
from actors import messages as m
from actors.errors import InputFailed, InputLost
from actors.functions import function_task
from actors.serialize import dumps
from tests.conftest import alive, children, descendants, peak_mib, wait_until

pytestmark = pytest.mark.processes


def inc(x):
    return x + 1


def total(xs):
    return sum(xs)


def fail(x):
    raise ValueError(f"no {x}")


def gated(path, value):
    while not os.path.exists(path):
        threading.Event().wait(0.01)
    return value


def block(mib, seed):
    return bytes([seed]) * (mib << 20)


def checksum(*blocks):
    return sum(sum(b[::4096]) for b in blocks)


def test_a_chain_of_a_hundred_tasks_each_taking_the_previous_future(client: Client) -> None:
    fut = client.submit(inc, 0)
    for _ in range(99):
        arguments, inputs = client._arguments((fut,), {})
        assert inputs == [fut.task_id] and len(arguments) < 200  # a name, not the result
        fut = client.submit(inc, fut)
    assert fut.result(timeout=120) == 100


def test_a_future_dropped_just_after_its_dependent_is_submitted_is_not_lost(
        client: Client) -> None:
    """``chain = client.submit(inc, chain)``: the old future is released as soon as the call
    returns, before the hub has sent the new Submit. Held in its tick (where releases go out)
    while the user thread submits and lets go, the client must still send the Submit first:
    released first, the finished input is dropped and the new task fails with InputLost."""
    chain = client.submit(inc, 0)
    assert chain.result(timeout=60) == 1
    hub = client._hub
    ticking, go = threading.Event(), threading.Event()
    on_tick = hub._on_tick
    assert on_tick is not None

    def held_tick(now: float) -> None:
        ticking.set()
        go.wait(10)
        on_tick(now)

    hub._on_tick = held_tick
    try:
        assert ticking.wait(10), "the client's hub never ticked"
        chain = client.submit(inc, chain)  # queued; the old future goes at once
        gc.collect()
        assert client._released, "the dropped future was not noted for release"
    finally:
        go.set()
        hub._on_tick = on_tick
    assert chain.result(timeout=60) == 2


def test_futures_nested_in_lists_and_dicts_are_replaced_by_their_results(client: Client) -> None:
    xs = [client.submit(inc, i) for i in range(20)]
    assert client.submit(total, xs).result(timeout=60) == sum(range(1, 21))
    named = {"a": xs[0], "b": [xs[1], (xs[2],)]}
    got = client.submit(lambda d: (d["a"], d["b"][0], d["b"][1][0]), named).result(timeout=60)
    assert got == (1, 2, 3)
    same = client.submit(lambda a, b: a is b, xs[3], xs[3])  # one input: one object
    assert same.result(timeout=60) is True


def test_a_task_waits_for_an_input_that_is_still_running(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    first = client.submit(gated, str(gate), 41)
    second = client.submit(inc, first)
    wait_until(lambda: any(e[2] == "waiting" for e in client.story(second)), 30,
               "the second task to wait for its input")
    assert not second.done() and second.status == "queued"
    gate.touch()
    assert second.result(timeout=60) == 42


def test_a_failed_or_cancelled_input_fails_its_dependents_naming_it(client: Client,
                                                                     tmp_path: Path) -> None:
    bad = client.submit(fail, 7)
    child = client.submit(inc, bad)
    grandchild = client.submit(inc, child)
    with pytest.raises(InputFailed) as info:
        child.result(timeout=60)
    assert info.value.input_id == bad.task_id and "ValueError: no 7" in str(info.value)
    assert isinstance(info.value.__cause__, ValueError)  # the input's own error, chained
    with pytest.raises(InputFailed):
        grandchild.result(timeout=60)
    # Submitted after its input failed: it fails at once, the same way.
    with pytest.raises(InputFailed, match="erred: ValueError: no 7"):
        client.submit(inc, bad).result(timeout=60)
    waiting = client.submit(gated, str(tmp_path / "never"), 0)
    dependent = client.submit(inc, waiting)
    assert waiting.cancel(timeout=20, grace=0)
    with pytest.raises(InputFailed, match="cancelled"):
        dependent.result(timeout=60)


def test_a_future_is_not_data_outside_a_tasks_arguments(client: Client) -> None:
    fut = client.submit(inc, 1)
    with pytest.raises(TypeError, match="not data"):
        pickle.dumps(fut)
    assert fut.result(timeout=60) == 2


def _forged(client: Client, inputs: list[str]) -> Future:
    """A submission of ``inc(0)`` naming these inputs, as a forged or replayed message would
    (an honest client only names futures it holds)."""
    task_id = f"inc-{uuid.uuid4().hex[:12]}"
    fut = Future(client, task_id, "inc")
    code_hash, code = client._code_of(function_task(inc))
    client._futures[task_id] = fut
    client._send(m.Submit(task_id=task_id, name="inc", kind="task", code=code,
                          code_hash=code_hash, args=dumps(((0,), {})), inputs=inputs))
    return fut


def test_a_future_of_another_client_is_refused(cluster: LocalCluster, client: Client) -> None:
    fut = client.submit(inc, 1)
    assert fut.result(timeout=60) == 2
    with Client(cluster) as other:
        with pytest.raises(ValueError, match="another client's"):
            other.submit(inc, fut)
        # Named in a forged message: refused as a released one would be (nothing to learn
        # about another client's tasks), and the task does not run.
        with pytest.raises(InputLost, match="no such task of this client"):
            _forged(other, [fut.task_id]).result(timeout=60)
        assert _forged(other, []).result(timeout=60) == 1  # (the forging itself works)


def test_a_released_input_cannot_be_named_again(client: Client) -> None:
    fut = client.submit(inc, 1)
    assert fut.result(timeout=60) == 2
    task_id = fut.task_id
    del fut
    gc.collect()
    wait_until(lambda: not client._released, 10, "the release to be sent")
    client.info()  # (a round trip: the master has read the release by its answer)
    with pytest.raises(InputLost, match="released"):
        _forged(client, [task_id]).result(timeout=60)


def test_a_release_lost_with_a_dropped_connection_is_made_good_on_the_next() -> None:
    """A Release sent into a connection that drops is lost: the master kept that result until
    the client left. On a connection made again the client says what it holds (Holding). The
    connection drops for real: the master paused 4 s, past the transport's 3 s heartbeat."""
    with LocalCluster(workers=1) as cluster, Client(cluster) as client:
        kept, gone = client.submit(inc, 1), client.submit(inc, 2)
        assert (kept.result(timeout=60), gone.result(timeout=60)) == (2, 3)
        gone_id = gone.task_id
        client._released = collections.deque(maxlen=0)  # its Release lost, as in a dropped link
        del gone
        gc.collect()
        assert _forged(client, [gone_id]).result(timeout=60) == 1  # the master still keeps it
        os.kill(cluster.pid, signal.SIGSTOP)
        try:  # paused until the client's connection drops (its heartbeat: 3 s)
            wait_until(lambda: client._disconnected_since is not None, 30,
                       "the client to see its connection drop")
        finally:
            os.kill(cluster.pid, signal.SIGCONT)

        def refused() -> bool:
            return isinstance(_forged(client, [gone_id]).exception(timeout=60), InputLost)

        wait_until(refused, 30, "the master to let the lost release's result go")
        assert client.submit(inc, kept).result(timeout=60) == 3  # what is held stays
        client._send(m.Holding([]))  # once a connection: another would cost a walk of them all
        assert client.submit(inc, kept).result(timeout=60) == 3


class _Sent:
    """What ``Client._say_holding`` needs of a client, and what it sent."""

    def __init__(self) -> None:
        self._send_lock, self._waiting_lock = threading.Lock(), threading.Lock()
        self._closed = self._said_bye = False
        self._max_message = 0
        self._asking: dict[str, m.Message] = {}
        self._futures: weakref.WeakValueDictionary[str, Future] = weakref.WeakValueDictionary()
        self._hub = self
        self.sent: list[m.Holding] = []

    def send_in_order(self, socket: str, frames: list[bytes]) -> None:
        msg = m.decode(frames[0])
        assert isinstance(msg, m.Holding)
        self.sent.append(msg)


def test_holding_names_the_scatters_still_asked_for_and_survives_submits_meanwhile() -> None:
    client = _Sent()
    held = [Future(client, f"t{i}", "inc") for i in range(20_000)]  # type: ignore[arg-type]
    for fut in held:
        client._futures[fut.task_id] = fut
    client._asking["scatter s"] = m.Scatter("scatter-s", b"x")  # its future comes with its answer
    client._asking["story t0"] = m.StoryRequest("t0")
    more: list[Future] = []
    stop = threading.Event()

    def submits() -> None:  # another thread's submits register futures without the send lock
        for i in range(200_000):
            if stop.is_set():
                return
            fut = Future(client, f"u{i}", "inc")  # type: ignore[arg-type]
            more.append(fut)
            client._futures[fut.task_id] = fut

    thread = threading.Thread(target=submits)
    thread.start()
    try:
        for _ in range(20):
            Client._say_holding(client)  # type: ignore[arg-type]
    finally:
        stop.set()
        thread.join(30)
    assert len(client.sent) == 20
    for said in client.sent:
        assert {"t0", "t19999", "scatter-s"} <= set(said.task_ids)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    """The node a process of its own: what these tests hold the master's memory to is that a
    node's data never passes through it (as between the hosts of a cluster)."""
    with LocalCluster(workers=2, local_node="process") as cl:
        yield cl
        pids = descendants(cl.pid) | {cl.pid}
    wait_until(lambda: not any(alive(p) for p in pids), 20, "the cluster's processes to end")


def test_inputs_held_on_the_node_are_fetched_by_the_worker_and_released_with_the_futures(
        cluster: LocalCluster, client: Client) -> None:
    """Results of 32 MiB stay on the node that holds them (in sealed memory files the node keeps
    open) while their futures live; a task that takes them fetches them there (the master's
    memory never carries them); dropping the futures lets the node free them."""
    (node,) = children(cluster.pid)
    master_before = peak_mib(cluster.pid)
    blocks = [client.submit(block, 32, i) for i in range(4)]
    assert client.submit(checksum, *blocks).result(timeout=120) == sum(
        i * (32 << 8) for i in range(4))
    assert peak_mib(cluster.pid) - master_before < 32, "a held result went through the master"
    assert _held_files(node) == 4
    del blocks
    gc.collect()
    wait_until(lambda: _held_files(node) == 0, 30, "the node to free the released results")


def _held_files(pid: int) -> int:
    """The result memory files a node holds open."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # (closed meanwhile)
            count += os.readlink(fd).startswith("/memfd:pydra-result")
    return count


def test_fire_and_forget_runs_tasks_to_their_end_after_their_client_closed(
        cluster: LocalCluster, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    with Client(cluster) as client:
        first = client.submit(gated, str(gate), 1)
        kept = client.submit(mark, str(tmp_path / "kept"), first)  # waits for first
        fire_and_forget(kept)
        dropped = client.submit(mark, str(tmp_path / "dropped"), first)
        wait_until(lambda: all(any(e[2] == "waiting" for e in client.story(f))
                               for f in (kept, dropped)), 30, "both to wait for their input")
    gate.touch()  # the client is gone: only what it fired and forgot runs on
    wait_until(lambda: (tmp_path / "kept").exists(), 60, "the detached task to run")
    assert not (tmp_path / "dropped").exists()  # cancelled with its client


def mark(path, value):
    Path(path).write_text(str(value))
    return value


def size_of(data, index):
    return len(data) + index


def test_scatter_puts_data_on_the_cluster_once_for_many_tasks(cluster: LocalCluster,
                                                              client: Client) -> None:
    small = client.scatter("a small string")
    assert client.scatter("a small string") is small  # named by its content: not sent again
    assert client.submit(lambda d: d.upper(), small).result(timeout=60) == "A SMALL STRING"
    pair = client.scatter([1, 2])  # a list (or dict) of data: one future each, as in Dask
    assert pair == [client.scatter(1), client.scatter(2)]
    assert client.submit(total, pair).result(timeout=60) == 3
    master_before = peak_mib(cluster.pid)
    big = client.scatter(b"x" * (50 << 20))
    assert client.scatter(b"x" * (50 << 20)) is big
    sizes = client.gather(client.map(size_of, [big] * 20, range(20)))
    assert sizes == [(50 << 20) + i for i in range(20)]
    assert peak_mib(cluster.pid) - master_before < 32, "the scattered data went through the master"
    assert big.result() == b"x" * (50 << 20)
    (node,) = children(cluster.pid)
    held = _rss_mib(node)
    del big
    gc.collect()
    wait_until(lambda: _rss_mib(node) < held - 40, 30, "the node to free the released data")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")
