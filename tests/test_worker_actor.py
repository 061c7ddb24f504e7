"""The real Worker actor, in its own process, driven by a test that plays its node.

Many runs, with releases (cancels) and steals arriving while executions finish: the worker
stays valid (it checks its state machine after every event: ACTORS_VALIDATE_STATE) and every
wanted result comes back exactly once. In that random mix the requests mostly find queued
runs; a second test holds executions open (each unit waits for a file the test creates) so that
releases and steals land on executing units: cancelled, refused, resumed, never run twice.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import pytest
import zmq

from actors import ParallelTask, Task
from actors import messages as m
from actors.serialize import dumps, dumps_task_class, loads
from actors.unit_runner import EXECUTION_SLOTS
from tests.conftest import alive, kill_all, python
from transport.hub import unbatch  # several messages may share one frame

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
        self.pending: deque[list[bytes]] = deque()  # received, not yet returned (a batch's rest)

    def receive(self, timeout_s: float) -> m.Message | None:
        if not self.pending:
            if not self.router.poll(int(timeout_s * 1000)):
                return None
            self.pending.extend(unbatch(self.router.recv_multipart()))
        frames = self.pending.popleft()
        self.worker = frames[0]
        return m.decode(frames[-1])

    def send(self, message: m.Message) -> None:
        self.router.send_multipart([self.worker, m.encode(message)])

    def close(self) -> None:
        self.router.close(linger=0)
        self.context.term()


@contextmanager
def worker_process(tmp_path: Path, task: type[ParallelTask]) -> Iterator[tuple[FakeNode, subprocess.Popen[str]]]:
    """A real worker process, welcomed by the test as its node and given task t1 (``task``)."""
    with welcomed_worker(tmp_path) as (node, proc):
        node.send(m.AssignTask(task_id="t1", name=task.__name__, kind="parallel",
                               code=dumps_task_class(task), args=dumps(((1,), {})), driver=False))
        yield node, proc


@contextmanager
def welcomed_worker(tmp_path: Path) -> Iterator[tuple[FakeNode, subprocess.Popen[str]]]:
    """A real worker process, welcomed by the test as its node; stopped by its pid after."""
    node = FakeNode(f"ipc://{tmp_path}/node.sock")
    proc = python("-m", "actors.worker", "--node", f"ipc://{tmp_path}/node.sock", "--id", "w1")
    try:
        hello = node.receive(30)
        assert isinstance(hello, m.Hello) and hello.pid == proc.pid
        node.send(m.Welcome("", "w1", 0.0))
        yield node, proc
    finally:
        node.close()
        proc.terminate()
        try:
            proc.wait(10)
        finally:
            kill_all({proc.pid})
        assert not alive(proc.pid)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[tuple[FakeNode, subprocess.Popen[str]]]:
    """A real worker process given task t1 (Squares)."""
    with worker_process(tmp_path, Squares) as started:
        yield started


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
    size = replies[0].outcomes[0].size  # the kept result's bytes, for those who fetch it
    assert size > 0, replies
    assert all(r.outcomes == [m.UnitOutcome(7, True, b"", held=True, size=size)]
               for r in replies), replies
    node.send(m.WorkerStoryRequest("t1"))
    story = node.receive(10)
    assert isinstance(story, m.WorkerStory)
    executions = [e for e in story.entries if e[0] == "t1:7" and e[2] == "executing"]
    assert len(executions) == 1, story.entries


GATE_TIMEOUT_S = 30.0


class Gated(ParallelTask):
    """Unit ``(i, folder)`` notes in ``folder/started.log`` that it started, then runs until the
    test opens its gate (creates ``folder/gate<i>``): the test decides when each execution ends."""

    def get_work(self, n):
        yield from range(n)

    def work_unit(self, arg):
        index, folder = arg
        with open(Path(folder) / "started.log", "a") as log:
            log.write(f"{index}\n")
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not (Path(folder) / f"gate{index}").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {index} never opened")
            time.sleep(0.002)
        return index * index


class Inbox:
    """Everything the worker sent to its node, in order, read with deadlines."""

    def __init__(self, node: FakeNode, proc: subprocess.Popen[str]) -> None:
        self.node, self.proc = node, proc
        self.messages: list[m.Message] = []  # a TaskResults' ends one by one, in its order
        self.gathered: list[int] = []  # how many ends each TaskResults carried

    def _keep(self, msg: m.Message) -> None:
        if isinstance(msg, m.TaskResults):
            self.gathered.append(len(msg.results))
            self.messages.extend(msg.results)
        else:
            self.messages.append(msg)

    def _receive(self, deadline: float, what: str) -> m.Message | None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        assert self.proc.poll() is None, "the worker process died (an invariant broke?)"
        msg = self.node.receive(0.2)
        if isinstance(msg, m.WorkerFailed):
            pytest.fail(f"the worker could not load the task: {msg.outcome.message}")
        return msg

    def wait_for(self, condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            msg = self._receive(deadline, what)
            if msg is not None:
                self._keep(msg)

    def story(self, timeout: float = 10.0) -> list[tuple[str, str, str]]:
        """The worker's story of t1 as (key, start, finish). The worker answers in mailbox order,
        so every message it sent before the answer is in ``messages`` when this returns."""
        self.node.send(m.WorkerStoryRequest("t1"))
        deadline = time.monotonic() + timeout
        while True:
            msg = self._receive(deadline, "the worker's story")
            if isinstance(msg, m.WorkerStory):
                return [(key, start, finish) for key, start, finish, _, _ in msg.entries]
            if msg is not None:
                self._keep(msg)

    def wait_for_story(self, condition: Callable[[list[tuple[str, str, str]]], bool], what: str,
                       timeout: float = 20.0) -> list[tuple[str, str, str]]:
        deadline = time.monotonic() + timeout
        while not condition(story := self.story()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {story}"
            time.sleep(0.01)
        return story

    def done(self) -> Counter[int]:
        return Counter(msg.run_id for msg in self.messages if isinstance(msg, m.UnitsDone))

    def released(self) -> Counter[int]:
        return Counter(run for msg in self.messages if isinstance(msg, m.UnitsReleased)
                       for run in msg.run_ids)

    def steal_replies(self) -> list[tuple[int, bool, str]]:
        return [(msg.run_id, msg.accepted, msg.state) for msg in self.messages
                if isinstance(msg, m.StealReply)]


def test_releases_and_steals_that_hit_executing_units_cancel_refuse_and_resume(
    tmp_path: Path,
) -> None:
    """Releases and steals that reach the real worker while its units execute: a steal of an
    executing (or resumed) run is refused; a release cancels the execution, which runs on; a run
    asked for again meanwhile resumes it (executed once, reported once); a run released and not
    asked again reports no result, only its release once its execution has ended. The worker has
    one execution slot (``EXECUTION_SLOTS``): the runs behind the executing one wait, stealable."""
    folder = tmp_path / "gates"
    folder.mkdir()
    assert EXECUTION_SLOTS == 1, "the scenario runs one execution at a time"
    first, second = 1, 2  # executing in turn: run 2 only once run 1 has ended
    stolen, released_ready = 3, 4  # queued (ready) when the requests come
    rest = list(range(5, 9))
    runs = [first, second, stolen, released_ready, *rest]

    def run_units(run: int) -> m.RunUnits:
        return m.RunUnits("t1", run, [m.UnitCall(run, dumps((run, str(folder))))])

    def started() -> Counter[int]:
        log = folder / "started.log"
        return Counter(int(line) for line in log.read_text().split()) if log.exists() else Counter()

    def key(run: int) -> str:
        return f"t1:run{run}"

    with worker_process(tmp_path, Gated) as (node, proc):
        inbox = Inbox(node, proc)
        for run in runs:
            node.send(run_units(run))
        # The slot holds the first run, and the executor thread really runs it.
        inbox.wait_for_story(
            lambda story: (key(first), "ready", "executing") in story and started()[first] == 1,
            "the first run to execute")
        assert not any((key(r), "ready", "executing") in inbox.story() for r in runs[1:])

        # Every gate is shut: nothing can finish while these arrive.
        node.send(m.StealUnits("t1", first))
        node.send(m.StealUnits("t1", stolen))
        node.send(m.ReleaseUnits("t1", [first, released_ready]))
        node.send(run_units(first))  # wanted again while its execution still runs
        node.send(m.StealUnits("t1", first))
        story = inbox.wait_for_story(
            lambda story: (key(first), "cancelled", "resumed") in story, "the cancel and resume")
        assert (key(first), "executing", "cancelled") in story
        assert inbox.steal_replies() == [
            (first, False, "executing"), (stolen, True, "ready"), (first, False, "resumed")]
        assert inbox.released() == Counter({released_ready: 1})  # it held nothing: at once
        assert inbox.done() == Counter(), "a result came back while every gate was shut"

        # The first run ends: the second takes the slot, and is released while it executes.
        (folder / f"gate{first}").touch()
        inbox.wait_for_story(
            lambda story: (key(second), "ready", "executing") in story and started()[second] == 1,
            "the second run to execute")
        node.send(m.StealUnits("t1", second))
        node.send(m.ReleaseUnits("t1", [second]))
        inbox.wait_for_story(lambda story: (key(second), "executing", "cancelled") in story,
                             "the second run's cancel")
        assert inbox.steal_replies()[-1] == (second, False, "executing")

        for run in runs:
            (folder / f"gate{run}").touch()
        wanted = [first, *rest]
        inbox.wait_for(lambda: all(inbox.done()[r] for r in wanted)
                       and inbox.released()[second] > 0, "every wanted result")
        # Every execution has ended: the story answer is a barrier for anything still to come.
        story = inbox.story()
        executing = [first, second]

    assert inbox.done() == Counter(wanted), inbox.done()  # each wanted result exactly once
    assert inbox.released() == Counter({second: 1, released_ready: 1})  # no result for those
    for msg in inbox.messages:
        if isinstance(msg, m.UnitsDone):
            assert [(o.index, o.ok, loads(o.value)) for o in msg.outcomes] == [
                (msg.run_id, True, msg.run_id ** 2)]
    assert len(inbox.steal_replies()) == 4
    # The resumed run executed once and was delivered from that one execution.
    assert started() == Counter({r: 1 for r in (*executing, *rest)}), started()
    assert [s for s in story if s[0] == key(first)] == [
        (key(first), "released", "waiting"), (key(first), "waiting", "ready"),
        (key(first), "ready", "executing"), (key(first), "executing", "cancelled"),
        (key(first), "cancelled", "resumed"), (key(first), "resumed", "memory"),
        (key(first), "memory", "released"), (key(first), "released", "forgotten")]
    assert [s for s in story if s[0] == key(second)][-3:] == [
        (key(second), "executing", "cancelled"), (key(second), "cancelled", "released"),
        (key(second), "released", "forgotten")]
    assert (key(stolen), "ready", "rescheduled") in story
    assert not any(s[0] == key(stolen) and s[2] == "executing" for s in story)


class AtGate(Task):
    """Notes ``name`` in ``folder/started.log``, then returns ``name`` once ``folder/gate`` exists."""

    def work(self, folder, name):
        with open(Path(folder) / "started.log", "a") as log:
            log.write(f"{name}\n")
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not (Path(folder) / "gate").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the gate never opened")
            time.sleep(0.002)
        return name


def test_a_task_lined_up_behind_a_running_one_is_given_back_and_never_runs(tmp_path: Path) -> None:
    """TakeBackTask: a plain Task queued behind the running one (its work already handed to the
    executor) is given back and never begins; the running one is not given back."""
    code = dumps_task_class(AtGate)
    started = tmp_path / "started.log"

    def assign(task_id: str) -> m.AssignTask:
        return m.AssignTask(task_id=task_id, name="AtGate", kind="task", code=code,
                            args=dumps(((str(tmp_path), task_id), {})), driver=True)

    with welcomed_worker(tmp_path) as (node, proc):
        inbox = Inbox(node, proc)
        node.send(assign("t1"))
        inbox.wait_for(lambda: started.exists(), "t1 to start")
        node.send(assign("t2"))  # lined up behind t1
        node.send(m.TakeBackTask("t2"))
        node.send(m.TakeBackTask("t1"))

        def replies() -> list[tuple[str, bool]]:
            return [(x.task_id, x.accepted) for x in inbox.messages
                    if isinstance(x, m.TakeBackReply)]

        inbox.wait_for(lambda: len(replies()) == 2, "both answers")
        assert replies() == [("t2", True), ("t1", False)]
        node.send(assign("t3"))  # lined up behind t1, as t2 was: it runs next
        # Code named by a hash it does not have: waits unloaded among its assignments.
        node.send(msgspec.structs.replace(assign("t4"), code=b"", code_hash="0" * 64))
        node.send(m.TakeBackTask("t4"))
        inbox.wait_for(lambda: len(replies()) == 3, "the third answer")
        assert replies()[2] == ("t4", True)
        (tmp_path / "gate").touch()

        def results() -> list[str]:
            return [loads(x.outcome.value) for x in inbox.messages if isinstance(x, m.TaskResult)]

        inbox.wait_for(lambda: len(results()) == 2, "the results of t1 and t3")
        inbox.story()  # answered in mailbox order: whatever it sent before is in by now
        assert results() == ["t1", "t3"]
        assert started.read_text().split() == ["t1", "t3"]
        assert not [x for x in inbox.messages if isinstance(x, m.NeedCode)]  # t4 never began


class GatedOrNot(Task):
    """The first waits for ``folder/gate``; the rest return at once: ``name``, ``size`` bytes of
    it, or a ValueError."""

    def work(self, folder, name, size=0, fail=False):
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while name == "t0" and not (Path(folder) / "gate").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("the gate never opened")
            time.sleep(0.002)
        if fail:
            raise ValueError(name)
        return name.encode() * size if size else name


def test_plain_tasks_given_at_once_end_once_each_in_order_some_in_one_message(
        tmp_path: Path) -> None:
    """A master gives a busy worker many plain Tasks in one AssignTasks; their ends come back
    exactly once each, in the order they ran, those of one turn of the worker in one TaskResults
    (a large result and an error among them keep their places)."""
    code = dumps_task_class(GatedOrNot)
    n, large, failing = 200, 77, 120

    def assign(i: int) -> m.AssignTask:
        size = 30_000 if i == large else 0  # its end, 90 KB: inline, but it goes alone
        return m.AssignTask(task_id=f"t{i}", name="GatedOrNot", kind="task", code=code,
                            args=dumps(((str(tmp_path), f"t{i}", size, i == failing), {})),
                            driver=True)

    with welcomed_worker(tmp_path) as (node, proc):
        inbox = Inbox(node, proc)
        node.send(assign(0))
        node.send(m.AssignTasks([assign(i) for i in range(1, n)]))
        inbox.story()  # answered once all of them are in (the first still at its gate)
        (tmp_path / "gate").touch()

        def ends() -> list[m.TaskResult]:
            return [x for x in inbox.messages if isinstance(x, m.TaskResult)]

        inbox.wait_for(lambda: len(ends()) >= n, f"{n} task ends")
        inbox.story()  # whatever it sent before its answer is in by now
        assert [end.task_id for end in ends()] == [f"t{i}" for i in range(n)]
        for i, end in enumerate(ends()):
            if i == failing:
                assert not end.outcome.ok and end.outcome.type_name == "builtins.ValueError"
            elif i == large:
                assert loads(end.outcome.value) == b"t77" * 30_000
            else:
                assert end.outcome.ok and loads(end.outcome.value) == f"t{i}"
        # (how the ends were gathered depends on the two threads' pace: shown, not asserted)
        print(f"{n} ends in {len(inbox.gathered)} TaskResults of {inbox.gathered} and "
              f"{n - sum(inbox.gathered)} alone")


class AtItsGate(Task):
    """Returns ``name`` once ``folder/gate-<name>`` exists, or at once when not ``gated``."""

    def work(self, folder, name, gated):
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while gated and not (Path(folder) / f"gate-{name}").exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gate of {name} never opened")
            time.sleep(0.002)
        return name


def test_ends_held_for_the_next_task_s_end_do_not_wait_for_a_long_one(tmp_path: Path) -> None:
    """The ends of plain Tasks wait a moment for the end of the next one, already running on
    the executor (a burst's ends in one message); a long one holds them no longer: t0 and t1
    are reported while t2, lined up behind them, still runs. (Hub.call_at's own test shows
    that the moment is kept without a tick.)"""
    code = dumps_task_class(AtItsGate)

    def assign(name: str, gated: bool) -> m.AssignTask:
        return m.AssignTask(task_id=name, name="AtItsGate", kind="task", code=code,
                            args=dumps(((str(tmp_path), name, gated), {})), driver=True)

    with welcomed_worker(tmp_path) as (node, proc):
        inbox = Inbox(node, proc)
        node.send(assign("t0", True))
        node.send(m.AssignTasks([assign("t1", False), assign("t2", True)]))
        inbox.story()  # all three in: t0 at its gate, t1 and t2 lined up behind it
        (tmp_path / "gate-t0").touch()

        def ended() -> list[str]:
            return [loads(x.outcome.value) for x in inbox.messages
                    if isinstance(x, m.TaskResult) and x.outcome.ok]

        inbox.wait_for(lambda: ended() == ["t0", "t1"], "the ends of t0 and t1, t2 at its gate")
        (tmp_path / "gate-t2").touch()
        inbox.wait_for(lambda: ended() == ["t0", "t1", "t2"], "the end of t2")
