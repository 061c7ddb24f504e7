"""A node holds what its workers say to the master while the master is away, and sends it, in
order and ahead of anything newer, once the master welcomes it back (``relay_frames`` with a
``MasterGate``; the process-level story is in test_durable_master.py)."""

from __future__ import annotations

from typing import Any

from actors import messages as m
from actors.master_gate import MasterGate
from actors.node_actor import TaskEnds, relay_frames


class Relayed:
    """The part of the hub that relay_frames uses, recording what leaves for the master."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, list[bytes]]] = []

    def relay(self, socket: str, frames: list[bytes]) -> None:
        self.sent.append((socket, frames))


class Told:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    def tell(self, message: Any) -> None:
        self.messages.append(message)


def from_worker(hub: Relayed, node: Told, gate: MasterGate, ends: TaskEnds, worker: bytes,
                msg: m.Message) -> None:
    relay_frames(hub, node, node, "workers", [worker, b"m", m.encode(msg)],  # type: ignore[arg-type]
                 None, ends, gate)


def from_master(hub: Relayed, node: Told, gate: MasterGate, ends: TaskEnds, frames: list[bytes]) -> None:
    relay_frames(hub, node, node, "master", frames, None, ends, gate)  # type: ignore[arg-type]


def result(task_id: str, value: bytes) -> m.TaskResult:
    return m.TaskResult(task_id, m.UnitOutcome(-1, True, value))


def assignment(task_id: str) -> m.AssignTask:
    return m.AssignTask(task_id=task_id, name="T", kind="task", code=b"", args=b"", driver=True)


def assign(task_id: str) -> bytes:
    return m.encode(assignment(task_id))


def test_results_wait_for_the_welcome_then_go_first_in_order() -> None:
    hub, node, gate, ends = Relayed(), Told(), MasterGate(), TaskEnds()
    from_master(hub, node, gate, ends, [m.encode(m.Welcome("m1", "n1"))])
    from_master(hub, node, gate, ends, [b"n1/w1", assign("t1")])
    from_master(hub, node, gate, ends, [b"n1/w1", assign("t2")])
    hub.sent.clear()
    gate.close()  # the connection to the master dropped
    from_worker(hub, node, gate, ends, b"n1/w1", result("t1", b"1"))
    from_worker(hub, node, gate, ends, b"n1/w1", result("t2", b"2"))
    assert hub.sent == [] and gate.held == 2
    # Until they are sent, the worker still holds both tasks: the Hello reports them.
    assert ends.holding() == {"n1/w1": ["t1", "t2"]}
    from_master(hub, node, gate, ends, [m.encode(m.Welcome("m1", "n1", 1.0, 2))])
    assert [m.decode(frames[1]) for _, frames in hub.sent] == [result("t1", b"1"), result("t2", b"2")]
    assert ends.holding() == {"n1/w1": []}  # it ran code: reported as not clean
    assert isinstance(node.messages[-1].message, m.Welcome)  # and the node hears of it after
    # Open: what comes next passes at once.
    from_worker(hub, node, gate, ends, b"n1/w1", result("t3", b"3"))
    assert len(hub.sent) == 3 and gate.held == 0


def test_past_its_bound_the_gate_drops_the_newest_and_says_so() -> None:
    gate = MasterGate(max_frames=2, max_bytes=1_000)
    gate.open()
    gate.close()
    assert [gate.passes([b"w", b"x" * 10]) for _ in range(3)] == [False, False, False]
    assert (gate.held, gate.dropped) == (2, 1)
    assert not gate.passes([b"w", b"y" * 2_000])  # too big for what is left
    assert gate.dropped == 2
    assert gate.open() == [[b"w", b"x" * 10]] * 2
    assert gate.passes([b"w", b"z"])


def test_only_a_proven_workers_frames_are_relayed_and_only_a_living_one_is_sent_any() -> None:
    """actors/node.py "Proof": a frame from an id whose Hello proved nothing is dropped (its
    Hello alone goes to the Node actor, which checks the secret); a proven worker's frames count
    until the node forgets it (LAST_WORDS_S after its exit), frames to it only while it lives."""
    hub, node, gate, ends = Relayed(), Told(), MasterGate(), TaskEnds()
    proven: set[bytes] = set()
    alive: set[bytes] = set()
    from_master(hub, node, gate, ends, [m.encode(m.Welcome("m1", "n1"))])

    def worker_says(worker: bytes, to: bytes, msg: m.Message) -> None:
        relay_frames(hub, node, node, "workers", [worker, to, m.encode(msg)],  # type: ignore[arg-type]
                     None, ends, gate, None, proven, alive)

    def master_says(worker: bytes, body: bytes) -> None:
        relay_frames(hub, node, node, "master", [worker, body],  # type: ignore[arg-type]
                     None, ends, gate, None, proven, alive)

    hub.sent.clear()
    node.messages.clear()
    hello = m.Hello(role="worker", peer_id="n1/w1", protocol=m.PROTOCOL_VERSION, version="x",
                    token="guess")
    worker_says(b"n1/w1", b"m", result("t1", b"forged"))
    worker_says(b"n1/w1", b"n", hello)
    master_says(b"n1/w1", assign("t1"))
    assert hub.sent == [] and [type(i.message) for i in node.messages] == [m.Hello]
    proven.add(b"n1/w1")  # (the Node actor, once the Hello said the secret)
    alive.add(b"n1/w1")
    master_says(b"n1/w1", assign("t1"))
    worker_says(b"n1/w1", b"m", result("t1", b"1"))
    assert [socket for socket, _ in hub.sent] == ["workers", "master"]
    alive.discard(b"n1/w1")  # it exited: its last words still count, nothing goes to its id
    master_says(b"n1/w1", assign("t2"))
    worker_says(b"n1/w1", b"m", result("t1", b"again"))
    assert [socket for socket, _ in hub.sent] == ["workers", "master", "master"]


class Lines:
    """The gate's log: what it said, as (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append(("warning", event, fields))

    def info(self, event: str, **fields: Any) -> None:
        self.lines.append(("info", event, fields))


def test_a_new_gate_holds_until_its_first_welcome() -> None:
    """Nothing is assigned before the first Welcome; what a worker says before it (a worker
    adopted from before a node's restart) waits for it."""
    log = Lines()
    gate = MasterGate(max_bytes=6, log=log)
    assert not gate.is_open and not gate.passes([b"w", b"early"]) and gate.held == 1
    assert (gate.held, gate.dropped) == (1, 0)  # its 6 bytes: within the bound, exactly
    assert gate.open() == [[b"w", b"early"]] and gate.passes([b"w", b"then"])
    assert log.lines == [("info", "master_gate_opened", {"held": 1, "dropped": 0})]


def test_the_byte_bound_counts_everything_held_since_the_gate_closed_each_time() -> None:
    log = Lines()
    gate = MasterGate(max_frames=100, max_bytes=1_000, log=log)
    for _ in range(2):  # (a second closing counts from nothing again)
        gate.open()
        gate.close()
        kept = [gate.passes([b"w", b"x" * 399]) for _ in range(3)]  # 400 bytes each
        assert kept == [False] * 3 and (gate.held, gate.dropped) == (2, 1)
        assert not gate.passes([b"w", b"x" * 199])  # 1,000 bytes in all: it fits, exactly
        assert (gate.held, gate.dropped) == (3, 1)
        assert not gate.passes([b"w", b""])  # the bound reached: even one more byte is dropped
        assert (gate.held, gate.dropped) == (3, 2)
        assert len(gate.open()) == 3
    # One warning a closing, at its first drop, with what was held; each opening says what
    # was held and how much was dropped.
    assert [(level, event) for level, event, _ in log.lines] == [
        ("warning", "held_frames_dropped"), ("info", "master_gate_opened")] * 2
    assert log.lines[0][2]["held"] == 2 and log.lines[0][2]["held_bytes"] == 800
    assert (log.lines[1][2]["held"], log.lines[1][2]["dropped"]) == (3, 2)


def test_an_opening_with_nothing_held_or_dropped_says_nothing() -> None:
    log = Lines()
    gate = MasterGate(log=log)
    assert gate.open() == [] and log.lines == []
    gate.close()
    assert gate.open() == [] and log.lines == []


def test_tasks_given_and_ended_in_one_message_are_held_from_one_to_the_other() -> None:
    """A worker's queued plain Tasks come in one AssignTasks and end in TaskResults: the node
    counts each as held from the one to the other (it ends what a worker's tasks started once
    the worker holds none, TaskEnds), and relays both as they are."""
    hub, node, gate, ends = Relayed(), Told(), MasterGate(), TaskEnds()
    from_master(hub, node, gate, ends, [m.encode(m.Welcome("m1", "n1"))])
    hub.sent.clear()
    given = m.encode(m.AssignTasks([assignment(f"t{i}") for i in range(3)]))
    from_master(hub, node, gate, ends, [b"n1/w1", given])
    assert ends.holding() == {"n1/w1": ["t0", "t1", "t2"]}
    two = m.TaskResults([result("t0", b"0"), result("t1", b"1")])
    from_worker(hub, node, gate, ends, b"n1/w1", two)
    assert ends.holding() == {"n1/w1": ["t2"]}
    from_worker(hub, node, gate, ends, b"n1/w1", m.TaskResults([result("t2", b"2")]))
    assert ends.holding() == {"n1/w1": []}
    assert hub.sent == [("workers", [b"n1/w1", given]), ("master", [b"n1/w1", m.encode(two)]),
                        ("master", [b"n1/w1", m.encode(m.TaskResults([result("t2", b"2")]))])]
