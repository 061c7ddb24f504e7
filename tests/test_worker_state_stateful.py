"""The worker state machine under random interleavings of scheduler, executor and transport events.

The harness plays all three: it sends scheduler requests at random, and answers only the work
the machine really started (the Execute and Fetch instructions it emitted). After every step every
invariant holds; every step is first tried with a poisoned event appended, which must undo the
whole step; and at the end, once the harness lets every execution and transfer succeed, every unit
the scheduler still wants is in memory or error.
"""

from __future__ import annotations

import copy
from collections import deque

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from actors.core.worker_state import (
    ComputeUnit,
    DataRequested,
    Event,
    Execute,
    ExecuteFailed,
    ExecuteSucceeded,
    Fetch,
    FetchFailed,
    FetchSucceeded,
    ForgetUnit,
    Instruction,
    PeerBusy,
    PeerLost,
    PeerRetryDue,
    ReleaseUnit,
    RetryPeerLater,
    Role,
    SendData,
    SendFinished,
    SendStealResponse,
    StealRequest,
    UnitSpec,
    UnitState,
    WhoHasUpdate,
    WorkerState,
)
from actors.errors import InvalidTransition
from tests.conftest import examples

LOCAL = [f"k{i}" for i in range(5)]  # keys the scheduler may assign here
REMOTE = ["r0", "r1"]  # keys only ever computed elsewhere
PEERS = ["p1", "p2", "p3"]
FRESH_PEER = "p-fresh"  # where the scheduler says a missing key is, at the end

local_index = st.integers(0, len(LOCAL) - 1)
any_key = st.sampled_from(LOCAL + REMOTE)
peer = st.sampled_from(PEERS)
some_peers = st.lists(peer, unique=True, max_size=2).map(tuple)


def data_of(key: str) -> bytes:
    return f"data of {key}".encode()


def snapshot(ws: WorkerState) -> dict[str, object]:
    """Everything ``ws`` holds, copied as deep as it is mutable (a faster deepcopy of vars(ws))."""
    state = {
        name: copy.copy(value) if isinstance(value, (dict, list, set, deque)) else value
        for name, value in vars(ws).items()
    }
    state["units"] = {key: unit.clone() for key, unit in ws.units.items()}
    return state


class WorkerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ws = WorkerState(nthreads=1, max_fetches=2)  # start() sets the drawn nthreads
        self.specs: dict[str, UnitSpec] = {}  # one fixed spec per key: the graph stays acyclic
        self.wanted: set[str] = set()  # keys the scheduler asked for and has not given up
        self.executing: set[str] = set()  # Execute emitted, not yet answered
        self.transfers: dict[str, str] = {}  # key -> peer: Fetch emitted, not yet answered
        self.ended: set[tuple[str, str]] = set()  # transfers the machine ended (peer lost)
        self.retries: set[str] = set()
        self.clock = 0
        self.in_step = False

    @initialize(nthreads=st.integers(1, 3))
    def start(self, nthreads: int) -> None:
        # The Worker actor runs with one execution slot (unit_runner.EXECUTION_SLOTS), one per
        # executor thread; with more, cancelled and resumed executions share the slots with new ones.
        self.ws = WorkerState(nthreads=nthreads, max_fetches=2)

    # --- plumbing ----------------------------------------------------------

    def event(self, cls: type[Event], *args: object) -> Event:
        self.clock += 1
        return cls(*args, stimulus_id=f"s{self.clock}", now=float(self.clock))  # type: ignore[call-arg]

    def feed(self, *events: Event) -> list[Instruction]:
        self.in_step = True
        before = snapshot(self.ws)
        with pytest.raises(TypeError):
            self.ws.handle(*events, Event(stimulus_id="poison", now=0.0))
        assert vars(self.ws) == before, "a failed handle() left changes behind"
        instructions = self.ws.handle(*events)
        for instruction in instructions:
            self.observe(instruction)
            if isinstance(instruction, SendFinished):  # reported only what is held, as assigned
                unit = self.ws.units[instruction.key]
                assert (unit.state, unit.role) == (UnitState.MEMORY, Role.COMPUTE)
        self.in_step = False
        return instructions

    def observe(self, instruction: Instruction) -> None:
        match instruction:
            case Execute(key=key, spec=spec, inputs=inputs):
                assert key not in self.executing, f"second Execute of {key} while one runs"
                assert set(inputs) == set(spec.dependencies)
                self.executing.add(key)
            case Fetch(keys=keys, peer=source):
                assert source not in self.transfers.values(), f"second transfer from {source}"
                for key in keys:
                    assert key not in self.transfers, f"second Fetch of {key} while one runs"
                    self.transfers[key] = source
                    self.ended.discard((key, source))
            case RetryPeerLater(peer=busy_peer):
                self.retries.add(busy_peer)
            case SendStealResponse(key=key, accepted=True):
                self.wanted.discard(key)

    # --- the scheduler -----------------------------------------------------

    @rule(index=local_index, data=st.data())
    def compute(self, index: int, data: st.DataObject) -> None:
        key = LOCAL[index]
        if key not in self.specs:
            earlier = LOCAL[:index] + REMOTE
            deps = data.draw(st.lists(st.sampled_from(earlier), unique=True, max_size=3))
            self.specs[key] = UnitSpec(key, "t1", b"call", tuple(deps), data.draw(st.integers(0, 2)))
        spec = self.specs[key]
        who_has = {dep: data.draw(some_peers) for dep in spec.dependencies}
        self.feed(self.event(ComputeUnit, spec, who_has))
        self.wanted.add(key)

    @rule(index=local_index)
    def release(self, index: int) -> None:
        self.feed(self.event(ReleaseUnit, LOCAL[index]))
        self.wanted.discard(LOCAL[index])

    @rule(key=any_key)
    def forget(self, key: str) -> None:
        self.feed(self.event(ForgetUnit, key))
        self.wanted.discard(key)

    @rule(index=local_index)
    def steal(self, index: int) -> None:
        self.feed(self.event(StealRequest, LOCAL[index]))

    @rule(key=any_key, holders=some_peers)
    def who_has_update(self, key: str, holders: tuple[str, ...]) -> None:
        self.feed(self.event(WhoHasUpdate, key, holders))

    @rule(lost=peer)
    def peer_lost(self, lost: str) -> None:
        for key, source in list(self.transfers.items()):
            if source == lost:  # the machine ends these; any reply after is stale
                del self.transfers[key]
                self.ended.add((key, source))
        self.retries.discard(lost)
        self.feed(self.event(PeerLost, lost))

    # --- the executor ------------------------------------------------------

    @precondition(lambda self: self.executing)
    @rule(data=st.data(), succeeds=st.booleans())
    def execution_ends(self, data: st.DataObject, succeeds: bool) -> None:
        key = data.draw(st.sampled_from(sorted(self.executing)))
        self.executing.discard(key)
        if succeeds:
            self.feed(self.event(ExecuteSucceeded, key, b"result of " + key.encode()))
        else:
            self.feed(self.event(ExecuteFailed, key, b"error", "Traceback"))

    @rule(key=any_key)
    def a_report_for_a_key_not_executing_is_refused(self, key: str) -> None:
        if key in self.executing:
            return
        before = snapshot(self.ws)
        with pytest.raises(InvalidTransition):
            self.ws.handle(self.event(ExecuteSucceeded, key, b"result"))
        assert vars(self.ws) == before

    # --- the transport -----------------------------------------------------

    @precondition(lambda self: self.transfers)
    @rule(data=st.data(), outcome=st.sampled_from(["succeeded", "failed", "busy"]))
    def transfer_ends(self, data: st.DataObject, outcome: str) -> None:
        key = data.draw(st.sampled_from(sorted(self.transfers)))
        source = self.transfers.pop(key)
        if outcome == "succeeded":
            self.feed(self.event(FetchSucceeded, key, source, data_of(key)))
        elif outcome == "failed":
            self.feed(self.event(FetchFailed, key, source))
        else:
            self.feed(self.event(PeerBusy, key, source))

    @precondition(lambda self: self.ended)
    @rule(data=st.data())
    def a_stale_reply_changes_nothing(self, data: st.DataObject) -> None:
        key, source = data.draw(st.sampled_from(sorted(self.ended)))
        before = snapshot(self.ws)
        assert self.feed(self.event(FetchSucceeded, key, source, data_of(key))) == []
        assert vars(self.ws) == before

    @precondition(lambda self: self.retries)
    @rule(data=st.data())
    def retry_due(self, data: st.DataObject) -> None:
        due = data.draw(st.sampled_from(sorted(self.retries)))
        self.retries.discard(due)
        self.feed(self.event(PeerRetryDue, due))

    @rule(keys=st.lists(any_key, unique=True, max_size=3), asker=peer)
    def data_requested(self, keys: list[str], asker: str) -> None:
        held = {key: self.ws.data[key] for key in keys if key in self.ws.data}
        reply = self.feed(self.event(DataRequested, tuple(keys), asker))
        assert reply == [SendData(asker, held, tuple(k for k in keys if k not in held),
                                  stimulus_id=f"s{self.clock}")]

    # --- checks ------------------------------------------------------------

    @invariant()
    def every_invariant_holds(self) -> None:
        self.ws.validate()
        assert self.ws.executing == self.executing
        assert self.ws.in_flight == self.transfers
        assert len(self.executing) <= self.ws.nthreads

    def teardown(self) -> None:
        if self.in_step:
            return  # a step failed: that failure is the report
        for _ in range(500):
            units = self.ws.units
            missing = [key for key, unit in units.items() if unit.state is UnitState.MISSING]
            # The scheduler gives up on units whose dependency failed here.
            blocked = [
                key for key in sorted(self.wanted)
                if units[key].state is UnitState.WAITING
                and any(units[dep].state is UnitState.ERROR for dep in units[key].dependencies)
            ]
            if self.executing:
                key = min(self.executing)
                self.executing.discard(key)
                self.feed(self.event(ExecuteSucceeded, key, b"result of " + key.encode()))
            elif self.transfers:
                key = min(self.transfers)
                self.feed(self.event(FetchSucceeded, key, self.transfers.pop(key), data_of(key)))
            elif self.retries:
                self.feed(self.event(PeerRetryDue, self.retries.pop()))
            elif missing:
                self.feed(self.event(WhoHasUpdate, missing[0], (FRESH_PEER,)))
            elif blocked:
                self.feed(self.event(ReleaseUnit, blocked[0]))
                self.wanted.discard(blocked[0])
            else:
                break
            self.ws.validate()
        else:
            pytest.fail("the worker did not settle")
        stuck = {
            key: (self.ws.units[key].state, self.ws.story(key)[-5:])
            for key in self.wanted
            if self.ws.units[key].state not in (UnitState.MEMORY, UnitState.ERROR)
        }
        assert stuck == {}
        assert self.ws.executing == set() and self.ws.in_flight == {}


WorkerMachine.TestCase.settings = settings(
    max_examples=examples(200),
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_worker_state_machine = WorkerMachine.TestCase
