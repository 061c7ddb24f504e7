"""Units that depend on other units: results fetched worker to worker through the nodes."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors import Client, ParallelTask, Unit
from tests.conftest import (
    alive,
    descendants,
    kill_all,
    log_lines,
    peak_mib,
    python_logged,
    result_or_logs,
    start_master,
    wait_until,
)
from tests.test_containers import WordCount

pytestmark = pytest.mark.processes


def wait_for(gate: str, timeout: float = 60.0) -> None:
    """Block until the file ``gate`` exists (the test opens it); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} not opened within {timeout}s")
        time.sleep(0.005)


class TreeSum(ParallelTask):
    """sum(range(n)) as a tree: leaves sum chunks, inner units add ``fan_in`` partial sums.

    With a ``gate``, the units that add leaves wait for it: every leaf stays held (and needed)
    on the worker that computed it until the test opens it. With ``marks``, the driver leaves
    a file named after its pid there."""

    def get_work(self, n, chunk, fan_in=2, pause=0.0, gate="", marks=""):
        if marks:
            with open(os.path.join(marks, f"driver-{os.getpid()}"), "w"):
                pass
        level = [Unit(("leaf", pause, start, min(start + chunk, n))) for start in range(0, n, chunk)]
        yield from level
        while len(level) > 1:
            level = [Unit(("add", pause, gate), after=level[i:i + fan_in])
                     for i in range(0, len(level), fan_in)]
            yield from level
            gate = ""

    def work_unit(self, arg, *partial_sums):
        if arg[0] == "add" and arg[2]:
            wait_for(arg[2])
        time.sleep(arg[1])
        return sum(range(*arg[2:])) if arg[0] == "leaf" else sum(partial_sums)

    def reduce(self, results):
        (root,) = results
        return root


class Hold(ParallelTask):
    """Units that wait at a gate, more than three workers take: every worker joins."""

    def get_work(self, gate, n):
        for _ in range(n):
            yield gate

    def work_unit(self, gate):
        wait_for(gate)
        return 1

    def reduce(self, results):
        return len(results)


class ForwardReference(ParallelTask):
    def get_work(self):
        later = Unit(1)
        yield Unit(2, after=[later])

    def work_unit(self, x, *inputs):
        return x


@dataclass
class TwoNodes:
    address: str
    keys: str
    node_pids: list[int]
    logs: Path  # every process's log, shown when a task hangs
    master_pid: int = 0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    """A master and two nodes of two workers each."""
    logs = tmp_path_factory.mktemp("logs")
    keys = str(tmp_path_factory.mktemp("keys") / "keys")
    master, address = start_master(logs, "--workers", "0", "--keys", keys, "--node-timeout", "2",
                                   "--max-deaths", "10")
    procs = [master]
    everything = {master.pid}
    try:
        for i in range(2):
            procs.append(python_logged(logs / f"node{i}.log", "-m", "actors.node", "--master",
                                       address, "--workers", "2", "--keys", keys))
        everything |= {p.pid for p in procs}
        yield TwoNodes(address, keys, [p.pid for p in procs[1:]], logs, master.pid)
    finally:
        for proc in procs:
            everything |= descendants(proc.pid)
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)  # a test may have left a node stopped
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
        kill_all(everything)
        wait_until(lambda: not any(alive(p) for p in everything), 20, "every process to end")


def test_a_tree_reduction_fetches_partial_sums_across_nodes(two_nodes: TwoNodes) -> None:
    with Client(two_nodes.address, keys=two_nodes.keys) as client:
        client.wait_for_workers(4)
        fut = client.submit(TreeSum, n=64_000, chunk=1_000, fan_in=2, pause=0.01)
        assert result_or_logs(fut, 60, two_nodes.logs) == sum(range(64_000))
        story = fut.story()
    # The story spans the master and the workers of both nodes, in time order.
    times = [entry[4] for entry in story]
    assert times == sorted(times)
    tellers = {entry[3].split(": ", 1)[0] for entry in story}
    nodes = {teller.split("/")[0] for teller in tellers if teller != "master"}
    assert "master" in tellers and len(nodes) == 2, tellers
    # Partial sums moved worker to worker, some between the two nodes (the causes name them).
    arrivals = [(e[3].split(": ")[0], e[3].split("data ")[1]) for e in story
                if e[1] == "flight" and e[2] == "memory"]
    assert arrivals, "no dependency was fetched"
    assert any(me.split("/")[0] != holder.split("/")[0] for me, holder in arrivals), arrivals
    # Nodes of one host and uid reach each other by ipc, not over encrypted TCP.
    connects = [line for i in range(2) for line in log_lines(two_nodes.logs / f"node{i}.log")
                if "peer_node_connect" in line]
    assert connects and all("ipc://" in line for line in connects), connects


def test_map_reduce_across_two_nodes_moves_the_mapped_pairs_worker_to_worker(
        two_nodes: TwoNodes, tmp_path: Path) -> None:
    """Map units on both nodes keep their pairs; each reduce unit fetches its partition from
    the workers that made them, across the nodes (never through the master): exact counts."""
    rng = random.Random(5)
    vocabulary = [f"w{i}" for i in range(300)]
    expected: Counter[str] = Counter()
    for f in range(4):
        rows = [" ".join(rng.choices(vocabulary, k=rng.randrange(0, 12))) for _ in range(4_000)]
        expected.update(word for row in rows for word in row.split())
        (tmp_path / f"text{f}.txt").write_text("\n".join(rows) + "\n")
    with Client(two_nodes.address, keys=two_nodes.keys) as client:
        client.wait_for_workers(4)
        warm_workers(client, two_nodes, tmp_path / "gate")  # all four may take its units
        fut = client.submit(WordCount, str(tmp_path / "text*.txt"), 16 << 10)
        assert result_or_logs(fut, 120, two_nodes.logs) == dict(expected)
        story = fut.story()
    mapped_on = {e[3].split(": ")[0].split("/")[0] for e in story
                 if e[1] == "executing" and e[2] == "memory"}
    assert len(mapped_on) == 2, f"the units ran on {mapped_on}"
    arrivals = [(e[3].split(": ")[0], e[3].split("data ")[1]) for e in story
                if e[1] == "flight" and e[2] == "memory"]
    assert any(me.split("/")[0] != holder.split("/")[0] for me, holder in arrivals), arrivals


def gated_block(marks: str, gate: str, index: int, root: bytes):
    """8 MiB of byte ``index + root[0]`` (held on its node), once four of these run at once
    (one on each worker)."""
    Path(marks, f"started-{index}").touch()
    wait_for(gate)
    return bytes([index + root[0]]) * (8 << 20)


def root_block(seed: int):
    return bytes([seed]) * (1 << 20)


def checksum(*blocks):
    return sum(sum(block[::4096]) for block in blocks)


def test_a_diamond_of_futures_across_two_nodes(two_nodes: TwoNodes, tmp_path: Path) -> None:
    """A 1 MiB root taken by four tasks, one per worker of the two nodes, each making 8 MiB
    (held where it was made), all four taken by one last task: the inputs travel node to node,
    never through the master."""
    gate = tmp_path / "gate"
    with Client(two_nodes.address, keys=two_nodes.keys) as client:
        client.wait_for_workers(4)
        warm_workers(client, two_nodes, tmp_path / "warm")
        root = client.submit(root_block, 10)
        blocks = [client.submit(gated_block, str(tmp_path), str(gate), i, root)
                  for i in range(4)]
        wait_until(lambda: len(list(tmp_path.glob("started-*"))) == 4
                   or any(block.done() for block in blocks), 60, "one block on each worker",
                   logs=two_nodes.logs)
        for block in blocks:  # (one that failed to start, say its input refused, shows why)
            assert not block.done(), result_or_logs(block, 1, two_nodes.logs)
        before = peak_mib(two_nodes.master_pid)
        gate.touch()
        total = client.submit(checksum, *blocks)
        assert result_or_logs(total, 120, two_nodes.logs) == sum((10 + i) * 2048 for i in range(4))
        ran_on = {e[3].split("driver ")[1].split("/")[0] for b in blocks for e in b.story()
                  if e[0] == "task" and e[2] == "running"}
        assert len(ran_on) == 2, ran_on  # so the task's own node lacked some of its inputs
        assert peak_mib(two_nodes.master_pid) - before < 16, "inputs went through the master"


def warm_workers(client: Client, two_nodes: TwoNodes, gate: Path) -> set[int]:
    """Every worker process, each warm for ``client``: a new client's first task replaces the
    workers warm for earlier clients one at a time, so some of them could join it late."""
    hold = client.submit(Hold, str(gate), 40)
    wait_until(lambda: (info := client.info()).workers == 4 and info.idle_workers == 0, 60,
               "every worker to join", logs=two_nodes.logs)
    gate.touch()
    assert result_or_logs(hold, 60, two_nodes.logs) == 40
    return set().union(*(descendants(node) for node in two_nodes.node_pids))


def test_a_tree_reduction_survives_killed_holders(two_nodes: TwoNodes, tmp_path: Path) -> None:
    """The units adding leaves wait at a gate, so each leaf stays held, and needed, on the worker
    that computed it: each worker killed (not the driver: that restarts the whole task) holds
    results that must be computed again, and the task is still running when it dies."""
    with Client(two_nodes.address, keys=two_nodes.keys) as client:
        client.wait_for_workers(4)
        workers = warm_workers(client, two_nodes, tmp_path / "warm")
        fut = client.submit(TreeSum, n=100_000, chunk=500, fan_in=4, pause=0.002,
                            gate=str(tmp_path / "gate"), marks=str(tmp_path))
        wait_until(lambda: fut.progress()[0] >= 200, 60, "all 200 leaves to be computed and held",
                   logs=two_nodes.logs)
        [driver] = [int(p.name.split("-")[1]) for p in tmp_path.glob("driver-*")]
        assert driver in workers
        for victim in sorted(workers - {driver})[:2]:
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda v=victim: any("holder lost" in e[3] and f"(pid {v})" in e[3]
                                            for e in fut.story()),
                       30, f"the master to compute again what {victim} held",
                       logs=two_nodes.logs)
        assert not fut.done()
        (tmp_path / "gate").touch()
        assert result_or_logs(fut, 90, two_nodes.logs) == sum(range(100_000))


def test_a_node_silent_past_the_timeout_is_replaced_and_then_rejoins_afresh(
    two_nodes: TwoNodes, tmp_path: Path,
) -> None:
    """SIGSTOP a node mid-tree (a long GC pause, a swapped-out host): the master declares it
    lost and recomputes what it held; woken, the node learns it was forgotten, replaces its
    worker processes and joins again. The result is exact and counted once."""
    node = two_nodes.node_pids[1]
    gate = tmp_path / "gate"
    with Client(two_nodes.address, keys=two_nodes.keys) as client:
        client.wait_for_workers(4)
        old_workers = descendants(node)
        # The adds wait at the gate: every leaf stays held, and needed, where it was computed,
        # on both nodes, when one of them falls silent (without it the task could end on the
        # other node first, the silent one holding nothing it needs).
        fut = client.submit(TreeSum, n=100_000, chunk=500, fan_in=4, pause=0.005, gate=str(gate))
        wait_until(lambda: fut.progress()[0] >= 200, 60, "all 200 leaves to be computed and held",
                   logs=two_nodes.logs)
        os.kill(node, signal.SIGSTOP)
        try:
            wait_until(lambda: client.info().workers == 2, 30,
                       "the master to declare the silent node lost", logs=two_nodes.logs)
        finally:
            gate.touch()
            os.kill(node, signal.SIGCONT)
        assert result_or_logs(fut, 90, two_nodes.logs) == sum(range(100_000))
        story = fut.story()
        assert any("lost" in e[3] for e in story), "the story shows no loss"
        # The node is back with new worker processes; the old ones are gone.
        wait_until(lambda: client.info().workers == 4, 30, "the node to rejoin with fresh workers",
                   logs=two_nodes.logs)
        wait_until(lambda: not any(alive(p) for p in old_workers), 20, "the old workers to end")
        assert descendants(node) and not descendants(node) & old_workers


def test_a_unit_may_depend_only_on_units_yielded_before_it(two_nodes: TwoNodes) -> None:
    with Client(two_nodes.address, keys=two_nodes.keys) as client:
        with pytest.raises(ValueError, match="has not yielded yet"):
            client.submit(ForwardReference).result(timeout=60)
        # the cluster goes on
        assert result_or_logs(client.submit(TreeSum, n=100, chunk=10), 60, two_nodes.logs) == 4950


def test_nodes_told_not_to_use_ipc_fetch_across_encrypted_tcp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The path nodes of different hosts (or uids) take: CURVE over TCP, here forced on one
    host with ``$ACTORS_DATA_LOCAL=0``."""
    monkeypatch.setenv("ACTORS_DATA_LOCAL", "0")
    keys = str(tmp_path / "keys")
    master, address = start_master(tmp_path, "--workers", "0", "--keys", keys)
    procs = [master]
    try:
        for i in range(2):
            procs.append(python_logged(tmp_path / f"node{i}.log", "-m", "actors.node",
                                       "--master", address, "--workers", "1", "--keys", keys))
        with Client(address, keys=keys) as client:
            client.wait_for_workers(2)
            fut = client.submit(TreeSum, n=8_000, chunk=1_000, fan_in=2, pause=0.01)
            assert result_or_logs(fut, 60, tmp_path) == sum(range(8_000))
        connects = [line for i in range(2) for line in log_lines(tmp_path / f"node{i}.log")
                    if "peer_node_connect" in line]
        assert connects and not any("ipc://" in line for line in connects), connects
    finally:
        everything = {p.pid for p in procs}.union(*(descendants(p.pid) for p in procs))
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
        kill_all(everything)
