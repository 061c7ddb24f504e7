"""The Worker actor's slot: its state machine fed directly, then the real Worker actor in its own
process, driven by a test that plays its node, through the states a running cluster seldom shows
(waiting for code, a task that would not load)."""

from __future__ import annotations

import itertools
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from actors import ParallelTask
from actors import messages as m
from actors.core.worker_slot import TRANSITIONS, Slot, WorkerSlot
from actors.errors import InvalidTransition
from actors.serialize import dumps, dumps_task_class, loads
from tests.conftest import alive, kill_all, log_events, python
from tests.test_worker_actor import FakeNode

# --- the state machine ---------------------------------------------------------------

# A way from IDLE into each state, for a task "t1".
PATH_TO = {
    Slot.IDLE: [],
    Slot.LOADING: [Slot.LOADING],
    Slot.HOSTING: [Slot.HOSTING],
    Slot.HELPING: [Slot.LOADING, Slot.HELPING],
    Slot.DRIVING: [Slot.DRIVING],
    Slot.FAILED: [Slot.LOADING, Slot.FAILED],
}


def slot_in(state: Slot) -> WorkerSlot:
    slot = WorkerSlot()
    for step in PATH_TO[state]:
        slot.move(step, "t1")
    assert slot.state is state
    return slot


def snapshot(slot: WorkerSlot) -> tuple[Slot, str, list[tuple[str, str, str]]]:
    return slot.state, slot.task_id, list(slot.story)


def test_a_new_slot_is_idle_and_names_no_task() -> None:
    slot = WorkerSlot()
    assert snapshot(slot) == (Slot.IDLE, "", [])


@pytest.mark.parametrize(("start", "finish"), sorted(TRANSITIONS, key=str))
def test_each_allowed_change_moves_the_slot_says_why_and_lands_in_its_story(
        start: Slot, finish: Slot) -> None:
    slot = slot_in(start)
    task_id = "" if finish is Slot.IDLE else "t1"
    assert slot.move(finish, task_id) == TRANSITIONS[(start, finish)]
    assert (slot.state, slot.task_id) == (finish, task_id)
    assert slot.story[-1] == ("t1", start.value, finish.value)


@pytest.mark.parametrize(("start", "finish"), [
    pair for pair in itertools.product(Slot, Slot) if pair not in TRANSITIONS])
def test_a_change_missing_from_the_table_raises_and_changes_nothing(
        start: Slot, finish: Slot) -> None:
    slot = slot_in(start)
    before = snapshot(slot)
    with pytest.raises(InvalidTransition) as info:
        slot.move(finish, "" if finish is Slot.IDLE else "t1")
    assert (info.value.start, info.value.finish) == (start.value, finish.value)
    assert info.value.story == before[2]
    assert snapshot(slot) == before


def test_the_slot_names_its_task_exactly_when_it_is_not_idle() -> None:
    slot = WorkerSlot()
    with pytest.raises(InvalidTransition):
        slot.move(Slot.HOSTING, "")
    assert snapshot(slot) == (Slot.IDLE, "", [])
    slot.move(Slot.HOSTING, "t1")
    with pytest.raises(InvalidTransition):
        slot.move(Slot.IDLE, "t1")
    assert snapshot(slot) == (Slot.HOSTING, "t1", [("t1", "idle", "hosting")])


def test_a_task_keeps_the_slot_until_it_leaves_it() -> None:
    slot = slot_in(Slot.LOADING)
    before = snapshot(slot)
    with pytest.raises(InvalidTransition):
        slot.move(Slot.HELPING, "t2")
    assert snapshot(slot) == before


def test_every_state_is_reached_from_idle_and_leads_back_to_it() -> None:
    def reachable(start: Slot, edges: set[tuple[Slot, Slot]]) -> set[Slot]:
        seen, todo = {start}, [start]
        while todo:
            here = todo.pop()
            for a, b in edges:
                if a is here and b not in seen:
                    seen.add(b)
                    todo.append(b)
        return seen

    edges = set(TRANSITIONS)
    assert reachable(Slot.IDLE, edges) == set(Slot)
    assert reachable(Slot.IDLE, {(b, a) for a, b in edges}) == set(Slot)


# --- the real Worker actor ---------------------------------------------------------------

class Doubles(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        return 2 * i


@contextmanager
def worker_with_log(tmp_path: Path) -> Iterator[tuple[FakeNode, Path]]:
    """A real worker process, welcomed by the test as its node, logging JSON at debug level."""
    node = FakeNode(f"ipc://{tmp_path}/node.sock")
    log = tmp_path / "worker.log"
    env = {**os.environ, "ACTORS_LOG_LEVEL": "DEBUG", "ACTORS_LOG_FORMAT": "json"}
    with open(log, "w") as stderr:
        proc = python("-m", "actors.worker", "--node", f"ipc://{tmp_path}/node.sock", "--id", "w1",
                      env=env, stderr=stderr)
    try:
        hello = node.receive(30)
        assert isinstance(hello, m.Hello) and hello.pid == proc.pid
        node.send(m.Welcome("", "w1", 0.0))
        yield node, log
        assert proc.poll() is None, "the worker process died (an invariant broke?)"
    finally:
        node.close()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            kill_all({proc.pid})
            proc.wait(10)
        assert not alive(proc.pid)


def receive(node: FakeNode, kind: type[m.Message]) -> m.Message:
    """The next message of ``kind`` from the worker (a Heartbeat or a story may come between)."""
    for _ in range(100):
        msg = node.receive(20)
        assert msg is not None, f"no {kind.__name__} from the worker"
        if isinstance(msg, kind):
            return msg
    raise AssertionError(f"no {kind.__name__} among the worker's messages")


def slot_changes(log: Path) -> list[tuple[str, str, str]]:
    """(task id, start, finish) of each change of the worker's slot so far. The worker logs one
    before it carries on, so all made before its last answer to the test are there."""
    events = log_events(log)
    return [(e["task_id"], e["start"], e["finish"]) for e in events
            if e["event"] == "slot_changed"]


def assign(task_id: str, code: bytes, code_hash: str = "") -> m.AssignTask:
    return m.AssignTask(task_id=task_id, name="Doubles", kind="parallel", code=code,
                        args=dumps(((3,), {})), driver=False, code_hash=code_hash)


def run_units(task_id: str, run_id: int, arg: int) -> m.RunUnits:
    return m.RunUnits(task_id, run_id, [m.UnitCall(arg, dumps(arg))])


@pytest.mark.processes
def test_a_worker_waiting_for_its_code_keeps_the_units_that_come_meanwhile_and_runs_them(
        tmp_path: Path) -> None:
    with worker_with_log(tmp_path) as (node, log):
        node.send(assign("t1", b"", code_hash="h1"))  # named by a hash this worker never had
        assert receive(node, m.NeedCode) == m.NeedCode("t1", "h1")
        node.send(run_units("t1", 1, 5))
        node.send(m.Code("h1", dumps_task_class(Doubles)))
        done = receive(node, m.UnitsDone)
        assert (done.task_id, done.run_id) == ("t1", 1)
        assert [(o.index, o.ok, loads(o.value)) for o in done.outcomes] == [(5, True, 10)]
        node.send(m.ReleaseTask("t1"))
        node.send(m.WorkerStoryRequest("t1"))  # answered after the release: a barrier
        receive(node, m.WorkerStory)
        assert slot_changes(log) == [
            ("t1", "idle", "loading"), ("t1", "loading", "helping"), ("", "helping", "idle")]


@pytest.mark.processes
def test_a_task_that_would_not_load_drops_its_input_until_released_then_the_next_one_starts(
        tmp_path: Path) -> None:
    with worker_with_log(tmp_path) as (node, log):
        node.send(assign("t1", b"not a pickled class"))
        failed = receive(node, m.WorkerFailed)
        assert failed.task_id == "t1" and failed.outcome.fatal
        node.send(assign("t2", dumps_task_class(Doubles)))  # queued behind the failed one
        node.send(run_units("t1", 1, 5))  # dropped: t1 has no instance here
        node.send(m.ReleaseTask("t1"))
        node.send(run_units("t2", 2, 7))
        done = receive(node, m.UnitsDone)  # t1's run would have come first: the mailbox is FIFO
        assert (done.task_id, done.run_id) == ("t2", 2)
        assert [(o.index, o.ok, loads(o.value)) for o in done.outcomes] == [(7, True, 14)]
        assert slot_changes(log) == [
            ("t1", "idle", "failed"), ("", "failed", "idle"), ("t2", "idle", "helping")]


def test_a_refused_change_names_the_task_and_carries_the_story_a_log_shows() -> None:
    slot = WorkerSlot()
    with pytest.raises(InvalidTransition) as idle:
        slot.move(Slot.HOSTING, "")
    assert idle.value.key == "worker slot (no task)"
    with pytest.raises(InvalidTransition) as named:
        slot.move(Slot.IDLE, "t9")  # an idle slot names no task
    assert named.value.key == "worker slot (t9)"
    slot.move(Slot.LOADING, "t1")
    with pytest.raises(InvalidTransition) as missing:
        slot.move(Slot.LOADING, "t1")  # not in the table
    assert missing.value.key == "worker slot (t1)"
    with pytest.raises(InvalidTransition) as switched:
        slot.move(Slot.HELPING, "t2")
    assert (switched.value.key, switched.value.start, switched.value.finish) == (
        "worker slot (t1 -> t2)", "loading", "helping")
    assert switched.value.story == [("t1", "idle", "loading")]
    assert "t1 -> t2" in str(switched.value) and "('t1', 'idle', 'loading')" in str(switched.value)


def test_a_long_lived_worker_keeps_only_the_last_of_its_story() -> None:
    from actors.core.worker_slot import STORY_LENGTH

    slot = WorkerSlot()
    for n in range(STORY_LENGTH + 5):
        slot.move(Slot.HOSTING, f"t{n}")
        slot.move(Slot.IDLE, "")
    assert len(slot.story) == STORY_LENGTH
    assert slot.story[-1] == (f"t{STORY_LENGTH + 4}", "hosting", "idle")
