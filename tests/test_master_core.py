"""The master's core as a state machine: a status table, one way in, refusals that change nothing,
and a master process that lives through what it refuses."""

from __future__ import annotations

import copy
from pathlib import Path

import msgspec
import pytest
import zmq

from actors import Client, LocalCluster, Task, __version__
from actors import messages as m
from actors.core import scheduler_events as ev
from actors.core.scheduler_state import TASK_TRANSITIONS, SchedulerState
from actors.errors import InvalidEvent, InvalidTransition
from actors.messages import UnitCall, UnitOutcome
from actors.serialize import dumps_result
from tests.conftest import descendants, kill_all, start_master, stderr_so_far, wait_until
from transport import load_keypair, load_public_key
from transport.hub import BATCH, unbatch


def fed(*events: ev.Event) -> SchedulerState:
    state = SchedulerState()
    for event in events:
        state.handle(event)
        state.validate()
    return state


def running_parallel_task() -> SchedulerState:
    return fed(ev.NodeJoined(1.0, "n1"), ev.WorkerReady(2.0, "n1", "w1"),
               ev.TaskSubmitted(3.0, task_id="t1", client_id="c1", name="Name", kind="parallel",
                                code=b"code", args=b"args"))


def snapshot(state: SchedulerState) -> object:
    """Everything the scheduler keeps but its id counters (never reused, so they only move on)
    and its undo log (empty between calls)."""
    assert len(state._undo) == 0
    return copy.deepcopy({k: v for k, v in vars(state).items()
                          if k not in ("_seq", "_run_ids", "_worker_seq", "_undo")})


def test_every_status_change_of_a_task_is_in_its_story_in_order() -> None:
    state = fed(ev.NodeJoined(1.0, "n1"), ev.WorkerReady(2.0, "n1", "w1"),
                ev.TaskSubmitted(3.0, task_id="t1", client_id="c1", name="Name", kind="task",
                                 code=b"code", args=b"args", retries=1),
                ev.TaskFinished(4.0, "w1", "t1", UnitOutcome(-1, False, b"", "ValueError")),
                ev.TaskFinished(5.0, "w1", "t1", UnitOutcome(-1, True, b"7")))
    changes = [(start, finish) for key, start, finish, _, _ in state.story("t1")
               if key == "task" and start != "error"]
    assert changes == [("released", "queued"), ("queued", "running"), ("running", "queued"),
                       ("queued", "running"), ("running", "done")]
    assert all(pair in TASK_TRANSITIONS for pair in changes[1:])


def test_a_status_change_missing_from_the_table_raises_with_the_story_and_changes_nothing() -> None:
    state = fed(ev.NodeJoined(1.0, "n1"), ev.WorkerReady(2.0, "n1", "w1"),
                ev.TaskSubmitted(3.0, task_id="t1", client_id="c1", name="Name", kind="task",
                                 code=b"code", args=b"args"),
                ev.TaskFinished(4.0, "w1", "t1", UnitOutcome(-1, True, b"7")))
    task = state.tasks["t1"]
    before = snapshot(state)
    with pytest.raises(InvalidTransition) as info:
        state._set_status(task, ev.TaskStatus.RUNNING, "a bug", 5.0)
    assert (info.value.start, info.value.finish) == ("done", "running")
    assert info.value.story[-1][:3] == ("task", "running", "done")
    assert snapshot(state) == before


@pytest.mark.parametrize("event", [
    ev.TaskSubmitted(4.0, task_id="t2", client_id="c1", name="Name", kind="bogus", code=b"code",
                     args=b"args"),
    ev.UnitsSliced(4.0, "w1", "t1", [UnitCall(0, b"a"), UnitCall(1, b"b", [3])], False),
    ev.UnitsSliced(4.0, "w1", "t1", [UnitCall(-1, b"a")], False),
], ids=["unknown kind", "a dependency on a later unit", "a negative index"])
def test_an_invalid_event_raises_and_changes_nothing(event: ev.Event) -> None:
    state = running_parallel_task()
    before = snapshot(state)
    with pytest.raises(InvalidEvent):
        state.handle(event)
    assert snapshot(state) == before
    state.validate()
    # The task goes on as if the event never came.
    out = state.handle(ev.UnitsSliced(5.0, "w1", "t1", [UnitCall(0, b"a")], True))
    assert out == [ev.Dispatch("n1", "w1", "t1", 1, [UnitCall(0, b"a")])]


def test_an_event_that_raises_part_way_changes_nothing_and_leaves_no_instruction() -> None:
    """A bug in scheduling, after the event's own changes were made (units recorded, results
    forwarded): the state is as before the event, nothing is sent, and the same event then goes
    through as if the bug had never been."""
    state = running_parallel_task()
    state.handle(ev.UnitsSliced(4.0, "w1", "t1", [UnitCall(i, b"u") for i in range(6)], True))
    # Nothing measured yet: run 1 is unit 0 alone.
    done = ev.UnitsFinished(5.0, "w1", "t1", 1, [UnitOutcome(0, True, b"r")], 0.01)
    before = snapshot(state)

    def broken_schedule(now: float) -> None:
        state._out.append(ev.KillWorker("n1", "w1", "half-made"))
        raise RuntimeError("a bug in scheduling")

    state._schedule = broken_schedule  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        state.handle(done)
    del state._schedule  # (monkeypatch.undo of pytest 8.0 would leave the bound method behind)
    assert snapshot(state) == before
    state.validate()
    out = state.handle(done)
    # 10 ms units measured: the other five go out, one a run.
    assert [type(i).__name__ for i in out] == ["ForwardResults", "RecordResults", *["Dispatch"] * 5]
    assert state.tasks["t1"].units.done_count == 1


# --- the shell: refused and dropped messages, a master that lives on ----------------------------


class Square(Task):
    def work(self, x):
        return x * x


@pytest.mark.processes
def test_the_master_refuses_a_forged_worker_message_and_keeps_serving(
        capfd: pytest.CaptureFixture[str]) -> None:
    """A node's key speaking for a worker that sends an impossible slice: refused, logged, and
    the master serves the next task as before."""
    with LocalCluster(workers=1) as cluster:  # its processes write to this test's stderr
        _forge_and_serve(cluster, capfd)


def _forge_and_serve(cluster: LocalCluster, capfd: pytest.CaptureFixture[str]) -> None:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.setsockopt(zmq.IDENTITY, b"node-forger")
    pair = load_keypair(cluster.keys_dir, "node")
    sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    sock.curve_serverkey = load_public_key(cluster.keys_dir, "master")
    sock.connect(cluster.address)
    try:
        sock.send(m.encode(m.Hello(role="node", peer_id="node-forger", protocol=m.PROTOCOL_VERSION,
                                   version=__version__)))
        welcomed: list[m.Message] = []
        for _ in range(10):  # the newest package versions may come first, in a frame of their own
            welcomed += [m.decode(frames[-1]) for frames in unbatch(sock.recv_multipart())]
            if any(isinstance(msg, m.Welcome) for msg in welcomed):
                break
        assert any(isinstance(msg, m.Welcome) for msg in welcomed), welcomed
        # Its own worker, so the message passes the master's ownership checks and reaches the
        # scheduler, whose _check refuses it; then it leaves before it could be given a task.
        sock.send(m.encode(m.WorkerReady("node-forger/w1", 1)))
        forged = m.UnitsSliced("no-such-task", [m.UnitCall(0, b"x", [9])], True)
        sock.send_multipart([b"node-forger/w1", m.encode(forged)])
        # Tasks' ends in one batch, as a node relays them (the master hands a batch's to its
        # scheduler in one call), one of them impossible: refused as the worker's alone, the
        # others ignored (no such task).
        ends = [m.TaskResult(f"no-such-task-{i}", m.UnitOutcome(-1, True, b"r"),
                             -1.0 if i == 7 else 0.001) for i in range(20)]
        sock.send(BATCH + msgspec.msgpack.encode([([b"node-forger/w1"], m.encode(end))
                                                  for end in ends]))
        sock.send(m.encode(m.Bye("forger leaving")))
        with Client(cluster.address, keys=cluster.keys_dir) as client:
            assert client.submit(Square, 12).result(timeout=30) == 144
        wait_until(lambda: "message_refused" in stderr_so_far(capfd), 20,
                   "the master to refuse the forged message")
        wait_until(lambda: "TaskResult" in stderr_so_far(capfd), 20,
                   "the master to refuse the impossible end")
        seen = stderr_so_far(capfd)
        assert "message_refused" in seen and "UnitsSliced" in seen, seen[-2000:]
        refusals = [line for line in seen.splitlines() if "message_refused" in line]
        assert sum("TaskResult" in line for line in refusals) == 1, refusals
        assert "event_dropped" not in seen and "message_dropped" not in seen
    finally:
        sock.close()


def test_a_repack_that_fails_halfway_puts_back_everything_it_took() -> None:
    """The master's repack after a drain takes the finished tasks, the dashboard's runs and its
    samples out before it puts any back: a pack that raises (a bug) must lose none of them."""
    import types

    import structlog

    from actors.master_actor import Master
    from actors.watch import TaskStream, Throughput

    class Broken(TaskStream):
        def pack(self) -> bytes:
            raise RuntimeError("planted")

    state = fed(ev.NodeJoined(0.0, "n1"), ev.WorkerReady(0.0, "n1", "w1"),
                ev.TaskSubmitted(1.0, task_id="t1", client_id="c1", name="N", kind="task",
                                 code=b"c", args=b"a"),
                ev.TaskFinished(2.0, "w1", "t1", UnitOutcome(-1, True, b"r"), 0.001))
    story = state.story("t1")
    throughput = Throughput()
    throughput.sample(3.0, 7)
    master = types.SimpleNamespace(scheduler=state, stream=Broken(), throughput=throughput,
                                   repacks_due=2, log=structlog.get_logger("test"),
                                   _compact=lambda: None, _held=lambda: 1)
    Master._repack(master)  # type: ignore[arg-type]
    assert state.story("t1") == story and list(state._finished) == ["t1"]
    assert list(throughput.samples) == [(3.0, 7, 0)] and master.repacks_due == 1
    state.validate()


def test_a_driver_slicing_past_its_keys_budget_fails_its_task_and_no_honest_one_does() -> None:
    """The master held a driver's sliced units outside its key's budget: a driver that ignores
    its look-ahead could make it hold what it liked. Past the key's room, and past twice what
    a driver slices ahead (``UNITS_AHEAD_BYTES``), the task fails with its units dropped."""
    from actors.core.scheduler_state import UNITS_AHEAD_BYTES
    from actors.task_host import LOOKAHEAD_BYTES

    assert UNITS_AHEAD_BYTES >= 2 * LOOKAHEAD_BYTES
    state = running_parallel_task()
    big = b"x" * (16 << 20)
    index = 0

    def slice_one(room: int) -> list[ev.Instruction]:
        nonlocal index
        index += 1
        out = state.handle(ev.UnitsSliced(4.0, "w1", "t1", [UnitCall(index - 1, big)], False, room))
        state.validate()
        return out

    # A budget smaller than the look-ahead: an honest driver's units open all the same.
    for _ in range(4):
        assert not [i for i in slice_one(1 << 20) if isinstance(i, ev.ReportOverBudget)]
    assert state.open_unit_bytes("c1") == 4 * (len(big) + 200)
    # Past it, with room enough for the key: still open.
    for _ in range(8):
        assert not [i for i in slice_one(1 << 30) if isinstance(i, ev.ReportOverBudget)]
    before = snapshot(state)
    out = slice_one(100 << 20)  # 12 x 16 MiB open: past the room and the look-ahead
    failed = [i for i in out if isinstance(i, ev.ReportOverBudget)]
    assert failed == [ev.ReportOverBudget("c1", "t1", 12 * (len(big) + 200), len(big) + 200,
                                          100 << 20)]
    assert state.tasks["t1"].state == "erred" and state.open_unit_bytes("c1") == 0
    assert any(isinstance(i, ev.KillWorker) for i in out)  # its driver ran hostile code
    assert before != snapshot(state) and not state.unit_bytes_bound


def test_the_ends_kept_for_a_client_stay_within_their_bound_oldest_first(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a state directory the master keeps each end until its client says Received:
    a client that never says so holds at most UNRECEIVED_BYTES there, its oldest let go."""
    from actors import master_actor as master

    monkeypatch.setattr(master, "UNRECEIVED_BYTES", 1_000)
    kept = master.Unreceived()
    assert not kept.add("t1", b"x" * 400) and not kept.add("t2", b"y" * 400)
    kept.received("t1")
    assert list(kept.ends) == ["t2"] and kept.size == 400
    assert not kept.add("t3", b"z" * 500)
    assert kept.add("t4", b"w" * 300)  # past the bound: t2 goes, then the rest fits
    assert list(kept.ends) == ["t3", "t4"] and kept.size == 800
    assert not kept.add("t4", b"v" * 100) and kept.size == 600  # (the same end again: replaced)
    kept.received("no-such-task")
    assert kept.size == sum(map(len, kept.ends.values()))


@pytest.mark.processes
def test_a_held_result_after_its_tasks_end_in_the_same_batch_is_dropped_not_delivered(
        tmp_path: Path) -> None:
    """A node relays in one batch its driver's end of a task (inline) and then another of its
    workers' held result for the same task (a run left over, or task code lying): the task
    ends with its driver's result, and the node is told to drop the held one. (Ends gathered
    from a batch are handed to the scheduler before a held result is noted: noted first, the
    driver's end took it for the task's result and sent the client to fetch it.)"""
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(keys))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    sock.setsockopt(zmq.IDENTITY, b"node-f")
    pair = load_keypair(keys, "node")
    sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
    sock.curve_serverkey = load_public_key(keys, "master")
    sock.connect(address)
    heard: list[tuple[list[bytes], m.Message]] = []

    def hear(kind: type[m.Message]) -> list[tuple[list[bytes], m.Message]]:
        """What the master sent this node, until a message of ``kind`` (and it)."""
        for _ in range(50):
            for frames in unbatch(sock.recv_multipart()):
                heard.append((frames[:-1], m.decode(frames[-1])))
            if any(isinstance(msg, kind) for _, msg in heard):
                return heard
        raise AssertionError(f"no {kind.__name__} in {[type(msg).__name__ for _, msg in heard]}")

    try:
        sock.send(m.encode(m.Hello(role="node", peer_id="node-f", protocol=m.PROTOCOL_VERSION,
                                   version=__version__, slots=2)))
        hear(m.Welcome)
        for worker in ("node-f/w1", "node-f/w2"):
            sock.send(m.encode(m.WorkerReady(worker, 1)))
        with Client(address, keys=keys) as client:
            future = client.submit(Square, 3)
            route, assign = next((r, msg) for r, msg in hear(m.AssignTask)
                                 if isinstance(msg, m.AssignTask))
            driver = route[-1]
            other = b"node-f/w2" if driver == b"node-f/w1" else b"node-f/w1"
            ends = [(driver, m.TaskResult(future.task_id, m.UnitOutcome(
                        -1, True, dumps_result(9, "Square")), 0.001)),
                    (other, m.TaskResult(future.task_id, m.UnitOutcome(
                        -1, True, b"", held=True, size=4_000_000), 0.001))]
            sock.send(BATCH + msgspec.msgpack.encode([([w], m.encode(end)) for w, end in ends]))
            assert future.result(timeout=30) == 9
            drops = [msg for _, msg in hear(m.DropResults) if isinstance(msg, m.DropResults)]
            assert drops == [m.DropResults([future.task_id])]
            assert not any(isinstance(msg, m.ShareResult) for _, msg in heard), heard
            assert assign.task_id == future.task_id
    finally:
        sock.close()
        kill_all(descendants(master.pid) | {master.pid})
        master.wait(10)
