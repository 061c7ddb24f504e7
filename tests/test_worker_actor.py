"""The real Worker actor, in its own process, driven by a test that plays its node.

Many runs, with releases (cancels) and steals arriving while executions finish: the worker
stays valid (it checks its state machine after every event: ACTORS_VALIDATE_STATE) and every
wanted result comes back exactly once.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from actors import ParallelTask
from actors import messages as m
from actors.serialize import dumps, dumps_task_class, loads
from tests.conftest import alive, kill_all, python

pytestmark = pytest.mark.processes

RUNS = 240


class Squares(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        time.sleep(0.002)
        return i * i


class FakeNode:
    """A ROUTER on ipc that a worker process connects to, as to its node."""

    def __init__(self, address: str) -> None:
        self.context = zmq.Context()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.bind(address)
        self.worker = b""

    def receive(self, timeout_s: float) -> m.Message | None:
        if not self.router.poll(int(timeout_s * 1000)):
            return None
        frames = self.router.recv_multipart()
        self.worker = frames[0]
        return m.decode(frames[-1])

    def send(self, message: m.Message) -> None:
        self.router.send_multipart([self.worker, m.encode(message)])

    def close(self) -> None:
        self.router.close(linger=0)
        self.context.term()


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[FakeNode, subprocess.Popen[str]]]:
    """A real worker process, welcomed by the test as its node and given task t1 (Squares)."""
    node = FakeNode(f"ipc://{tmp_path}/node.sock")
    proc = python("-m", "actors.worker", "--node", f"ipc://{tmp_path}/node.sock", "--id", "w1")
    try:
        hello = node.receive(30)
        assert isinstance(hello, m.Hello) and hello.pid == proc.pid
        node.send(m.Welcome("", "w1", 0.0))
        node.send(m.AssignTask("t1", "Squares", "parallel", dumps_task_class(Squares), dumps(((1,), {})),
                               driver=False))
        yield node, proc
    finally:
        node.close()
        proc.terminate()
        try:
            proc.wait(10)
        finally:
            kill_all({proc.pid})
        assert not alive(proc.pid)


def test_the_worker_actor_under_releases_and_steals_delivers_each_wanted_result_once(
    worker: tuple[FakeNode, subprocess.Popen[str]],
) -> None:
    node, proc = worker
    rng = random.Random(3)
    released: set[int] = set()
    stolen: set[int] = set()
    for run in range(1, RUNS + 1):
        node.send(m.RunUnits("t1", run, [m.UnitCall(run, dumps(run))]))
        if run % 8 == 0:  # a release and a steal of recent runs, queued or running
            candidates = [r for r in range(max(1, run - 6), run + 1)
                          if r not in released and r not in stolen]
            release, steal = rng.sample(candidates, 2)
            released.add(release)
            node.send(m.ReleaseUnits("t1", [release]))
            stolen.add(steal)
            node.send(m.StealUnits("t1", steal))

    done: Counter[int] = Counter()
    acked: Counter[int] = Counter()
    steal_replies: dict[int, bool] = {}
    values: dict[int, int] = {}

    def settled(run: int) -> bool:
        return bool(done[run] or acked[run] or steal_replies.get(run))

    deadline = time.monotonic() + 60
    assert proc.poll() is None
    while not all(settled(r) for r in range(1, RUNS + 1)) or len(steal_replies) < len(stolen):
        assert time.monotonic() < deadline, "the worker did not settle every run in time"
        assert proc.poll() is None, "the worker process died (an invariant broke?)"
        msg = node.receive(1.0)
        match msg:
            case m.UnitsDone(run_id=run, outcomes=outcomes):
                done[run] += 1
                assert [o.ok for o in outcomes] == [True]
                values[run] = loads(outcomes[0].value)
            case m.UnitsReleased(run_ids=runs):
                acked.update(runs)
            case m.WorkerFailed(outcome=outcome):
                pytest.fail(f"the worker could not load the task: {outcome.message}")
            case m.StealReply(run_id=run, accepted=answer):
                assert run not in steal_replies, f"two answers to the steal of run {run}"
                steal_replies[run] = answer

    accepted = {r for r, ok in steal_replies.items() if ok}
    assert accepted, "no steal of a queued run was accepted"
    for run in range(1, RUNS + 1):
        if run in accepted:
            assert done[run] == 0 and acked[run] == 0, f"stolen run {run} still reported"
        elif run in released:
            assert done[run] + acked[run] == 1, f"released run {run}: {done[run]}, {acked[run]}"
        else:
            assert done[run] == 1, f"run {run} reported {done[run]} times"
            assert values[run] == run * run
    # Nothing more trickles in, and the worker is alive and valid.
    assert node.receive(0.3) is None
    node.send(m.WorkerStoryRequest("t1"))
    story = node.receive(10)
    assert isinstance(story, m.WorkerStory)
    finishes = {finish for _, _, finish, _, _ in story.entries}
    assert {"executing", "memory", "rescheduled", "forgotten"} <= finishes, finishes
    assert proc.poll() is None


def test_a_kept_result_asked_for_again_is_reported_held_not_recomputed(
    worker: tuple[FakeNode, subprocess.Popen[str]],
) -> None:
    """The scheduler may ask a worker to compute a kept unit it already holds (it reopened the
    unit when it lost track of this worker): the answer is "held here", once per asking run."""
    node, _ = worker
    replies: list[m.UnitsDone] = []
    for run in (1, 2, 3):
        node.send(m.RunUnits("t1", run, [m.UnitCall(7, dumps(7), keep=True)]))
        deadline = time.monotonic() + 30
        while len(replies) < run:
            assert time.monotonic() < deadline, f"no answer to run {run}"
            msg = node.receive(1.0)
            if isinstance(msg, m.UnitsDone):
                replies.append(msg)
    assert [r.run_id for r in replies] == [1, 2, 3]
    assert all(r.outcomes == [m.UnitOutcome(7, True, b"", held=True)] for r in replies), replies
    node.send(m.WorkerStoryRequest("t1"))
    story = node.receive(10)
    assert isinstance(story, m.WorkerStory)
    executions = [e for e in story.entries if e[0] == "t1:7" and e[2] == "executing"]
    assert len(executions) == 1, story.entries
