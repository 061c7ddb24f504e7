"""The worker state machine, fed events directly: no threads, no sockets, no clock.

Each test compares the whole list of instructions an event produces; the ``ws`` fixture validates
every invariant after every ``handle``.
"""

from __future__ import annotations

import ast
import copy
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

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
    KeepResult,
    PeerBusy,
    PeerLost,
    PeerRetryDue,
    ReleaseUnit,
    RetryPeerLater,
    Role,
    SendData,
    SendErred,
    SendFinished,
    SendMissing,
    SendReleased,
    SendStealResponse,
    StealRequest,
    Unit,
    UnitSpec,
    UnitState,
    WhoHasUpdate,
    Work,
    WorkerState,
)
from actors.errors import InvalidTransition, TransitionLoop

S = UnitState

# --- vocabulary ---------------------------------------------------------------


def spec(key: str, *deps: str, priority: int = 0) -> UnitSpec:
    return UnitSpec(key, "t1", f"call {key}".encode(), deps, priority)


def result(key: str) -> bytes:
    return f"result of {key}".encode()


def data(key: str) -> bytes:
    return f"data of {key}".encode()


def compute(sid: str, key: str, *deps: str, who_has: Mapping[str, tuple[str, ...]] | None = None,
            priority: int = 0, now: float = 0.0) -> ComputeUnit:
    return ComputeUnit(spec(key, *deps, priority=priority), who_has or {}, stimulus_id=sid, now=now)


def done(sid: str, key: str, now: float = 0.0) -> ExecuteSucceeded:
    return ExecuteSucceeded(key, result(key), stimulus_id=sid, now=now)


def failed(sid: str, key: str) -> ExecuteFailed:
    return ExecuteFailed(key, b"pickled error", f"Traceback of {key}", stimulus_id=sid, now=0.0)


def fetched(sid: str, key: str, peer: str) -> FetchSucceeded:
    return FetchSucceeded(key, peer, data(key), stimulus_id=sid, now=0.0)


def fetch_failed(sid: str, key: str, peer: str) -> FetchFailed:
    return FetchFailed(key, peer, stimulus_id=sid, now=0.0)


def busy(sid: str, key: str, peer: str) -> PeerBusy:
    return PeerBusy(key, peer, stimulus_id=sid, now=0.0)


def lost(sid: str, peer: str) -> PeerLost:
    return PeerLost(peer, stimulus_id=sid, now=0.0)


def holders(sid: str, key: str, *peers: str) -> WhoHasUpdate:
    return WhoHasUpdate(key, peers, stimulus_id=sid, now=0.0)


def release(sid: str, key: str) -> ReleaseUnit:
    return ReleaseUnit(key, stimulus_id=sid, now=0.0)


def forget(sid: str, key: str) -> ForgetUnit:
    return ForgetUnit(key, stimulus_id=sid, now=0.0)


def steal(sid: str, key: str) -> StealRequest:
    return StealRequest(key, stimulus_id=sid, now=0.0)


def execute(sid: str, key: str, *deps: str, inputs: dict[str, bytes] | None = None,
            priority: int = 0) -> Execute:
    return Execute(key, spec(key, *deps, priority=priority), inputs or {}, stimulus_id=sid)


def finished(sid: str, key: str) -> SendFinished:
    return SendFinished(key, len(result(key)), stimulus_id=sid)


def states(ws: WorkerState) -> dict[str, UnitState]:
    return {key: unit.state for key, unit in ws.units.items()}


def make_state(**kwargs: object) -> WorkerState:
    """A worker state that validates every invariant after every ``handle``."""
    return WorkerState(validate_after_handle=True, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
def ws() -> Iterator[WorkerState]:
    state = make_state()
    yield state
    state.validate()


@pytest.fixture
def one_key() -> Iterator[WorkerState]:
    """One key a transfer: a second key from the same peer waits in ``fetch`` behind the first."""
    state = make_state(max_transfer_keys=1)
    yield state
    state.validate()


# --- computing ------------------------------------------------------------------


def test_a_unit_without_dependencies_executes_and_is_reported_finished(ws: WorkerState) -> None:
    assert ws.handle(compute("s1", "a", now=1.0)) == [execute("s1", "a")]
    assert ws.executing == {"a"}
    assert ws.handle(done("s2", "a", now=2.0)) == [finished("s2", "a")]
    assert ws.data == {"a": result("a")}
    assert ws.story("a") == [
        ("a", "released", "waiting", "s1", 1.0),
        ("a", "waiting", "ready", "s1", 1.0),
        ("a", "ready", "executing", "s1", 1.0),
        ("a", "executing", "memory", "s2", 2.0),
    ]


def test_dependencies_are_fetched_and_passed_to_the_execution_then_dropped(ws: WorkerState) -> None:
    who_has = {"x": ("p1",), "y": ("p2",)}
    assert ws.handle(compute("s1", "b", "x", "y", who_has=who_has)) == [
        Fetch(("x",), "p1", stimulus_id="s1"),
        Fetch(("y",), "p2", stimulus_id="s1"),
    ]
    assert states(ws) == {"b": S.WAITING, "x": S.FLIGHT, "y": S.FLIGHT}
    assert ws.units["x"].role is Role.HOLD
    assert ws.handle(fetched("s2", "x", "p1")) == []
    assert ws.handle(fetched("s3", "y", "p2")) == [
        execute("s3", "b", "x", "y", inputs={"x": data("x"), "y": data("y")})
    ]
    # Nothing here needs x and y any more: their data goes, their records stay with b.
    assert states(ws) == {"b": S.EXECUTING, "x": S.RELEASED, "y": S.RELEASED}
    assert ws.data == {}
    assert ws.handle(done("s4", "b")) == [finished("s4", "b")]
    assert ws.handle(forget("s5", "b")) == []
    assert ws.units == {}  # the dependencies only b used went with it


def test_a_dependency_computed_here_is_waited_for_not_fetched(ws: WorkerState) -> None:
    assert ws.handle(compute("s1", "a")) == [execute("s1", "a")]
    assert ws.handle(compute("s2", "b", "a")) == []
    assert states(ws) == {"a": S.EXECUTING, "b": S.WAITING}
    assert ws.handle(done("s3", "a")) == [
        finished("s3", "a"),
        execute("s3", "b", "a", inputs={"a": result("a")}),
    ]
    assert ws.data == {"a": result("a")}  # the scheduler's result stays


def test_the_ready_queue_runs_higher_priority_first_then_in_arrival_order(ws: WorkerState) -> None:
    assert ws.handle(compute("s1", "a")) == [execute("s1", "a")]
    assert ws.handle(
        compute("s2", "low"), compute("s3", "high1", priority=5), compute("s4", "high2", priority=5)
    ) == []
    assert ws.handle(done("s5", "a")) == [finished("s5", "a"), execute("s5", "high1", priority=5)]
    assert ws.handle(done("s6", "high1")) == [
        finished("s6", "high1"),
        execute("s6", "high2", priority=5),
    ]
    assert ws.handle(done("s7", "high2")) == [finished("s7", "high2"), execute("s7", "low")]


def test_no_more_than_nthreads_units_execute_at_once() -> None:
    ws = make_state(nthreads=2)
    assert ws.handle(compute("s1", "a"), compute("s2", "b"), compute("s3", "c")) == [
        execute("s1", "a"),
        execute("s2", "b"),
    ]
    assert ws.executing == {"a", "b"}
    assert ws.handle(done("s4", "b")) == [finished("s4", "b"), execute("s4", "c")]


def test_a_failed_execution_is_reported_and_a_retry_runs_it_again(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"))
    assert ws.handle(failed("s2", "a")) == [
        SendErred("a", b"pickled error", "Traceback of a", stimulus_id="s2")
    ]
    assert ws.units["a"].state is S.ERROR
    assert ws.units["a"].traceback == "Traceback of a"
    assert ws.handle(compute("s3", "a")) == [execute("s3", "a")]  # no release acknowledged
    assert ws.handle(failed("s4", "a"), release("s5", "a")) == [
        SendErred("a", b"pickled error", "Traceback of a", stimulus_id="s4"),
        SendReleased("a", stimulus_id="s5"),
    ]
    assert ws.units["a"].state is S.RELEASED


def test_a_dependency_that_erred_here_leaves_its_dependent_waiting_for_the_scheduler(
    ws: WorkerState,
) -> None:
    ws.handle(compute("s1", "a"), compute("s2", "b", "a"))
    assert ws.handle(failed("s3", "a")) == [
        SendErred("a", b"pickled error", "Traceback of a", stimulus_id="s3")
    ]
    assert states(ws) == {"a": S.ERROR, "b": S.WAITING}


def test_compute_of_a_key_already_in_memory_reports_it_again(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), done("s2", "a"))
    assert ws.handle(compute("s3", "a")) == [finished("s3", "a")]


def test_a_different_spec_under_a_known_key_is_refused(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"))
    with pytest.raises(InvalidTransition) as refused:
        ws.handle(compute("s2", "a", priority=3))
    assert refused.value.key == "a"
    assert ws.units["a"].spec == spec("a")


# --- release, cancel, resume ------------------------------------------------------


def test_releasing_a_ready_unit_acknowledges_at_once(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), compute("s2", "b"))
    assert ws.handle(release("s3", "b")) == [SendReleased("b", stimulus_id="s3")]
    assert ws.handle(done("s4", "a")) == [finished("s4", "a")]  # b does not run
    assert ws.handle(release("s5", "b")) == []  # already released


def test_release_while_executing_cancels_and_drops_the_late_result(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"))
    assert ws.handle(release("s2", "a")) == []
    assert states(ws) == {"a": S.CANCELLED}
    assert ws.handle(compute("s3", "b")) == []  # the thread is still busy with a
    assert ws.handle(done("s4", "a")) == [SendReleased("a", stimulus_id="s4"), execute("s4", "b")]
    assert "a" not in ws.data
    assert ws.units["a"].state is S.RELEASED


def test_a_cancelled_execution_that_fails_is_released_without_an_error_report(
    ws: WorkerState,
) -> None:
    ws.handle(compute("s1", "a"), release("s2", "a"))
    assert ws.handle(failed("s3", "a")) == [SendReleased("a", stimulus_id="s3")]


def test_compute_again_while_cancelled_reuses_the_running_execution(ws: WorkerState) -> None:
    assert ws.handle(compute("s1", "a")) == [execute("s1", "a")]
    assert ws.handle(release("s2", "a")) == []
    assert ws.handle(compute("s3", "a")) == []  # no second Execute
    assert ws.units["a"].state is S.RESUMED
    assert ws.handle(done("s4", "a")) == [finished("s4", "a")]
    assert [entry[1:3] for entry in ws.story("a")][-3:] == [
        ("executing", "cancelled"),
        ("cancelled", "resumed"),
        ("resumed", "memory"),
    ]


def test_a_resumed_execution_that_fails_is_reported_as_an_error(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), release("s2", "a"), compute("s3", "a"))
    assert ws.handle(failed("s4", "a")) == [
        SendErred("a", b"pickled error", "Traceback of a", stimulus_id="s4")
    ]


def test_releasing_a_resumed_unit_cancels_it_again(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), release("s2", "a"), compute("s3", "a"))
    assert ws.handle(release("s4", "a")) == []
    assert ws.units["a"].state is S.CANCELLED
    assert ws.handle(done("s5", "a")) == [SendReleased("a", stimulus_id="s5")]


def test_release_while_in_flight_then_a_failed_fetch_ends_cleanly(ws: WorkerState) -> None:
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1",)}))
    assert ws.handle(release("s2", "b")) == [SendReleased("b", stimulus_id="s2")]
    assert states(ws) == {"b": S.RELEASED, "x": S.CANCELLED}
    assert ws.in_flight == {"x": "p1"}  # the transfer still runs
    assert ws.handle(fetch_failed("s3", "x", "p1")) == []
    assert states(ws) == {"b": S.RELEASED, "x": S.RELEASED}
    assert ws.in_flight == {}
    assert ws.handle(forget("s4", "b")) == []
    assert ws.units == {}


def test_a_cancelled_fetch_that_succeeds_drops_the_data(ws: WorkerState) -> None:
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1",)}), release("s2", "b"))
    assert ws.handle(fetched("s3", "x", "p1")) == []
    assert ws.data == {}


def test_a_key_in_flight_asked_to_compute_is_computed_when_the_fetch_fails(
    ws: WorkerState,
) -> None:
    assert ws.handle(compute("s1", "b", "x", who_has={"x": ("p1",)})) == [
        Fetch(("x",), "p1", stimulus_id="s1")
    ]
    assert ws.handle(compute("s2", "x")) == []
    assert ws.units["x"].state is S.RESUMED
    assert ws.handle(fetch_failed("s3", "x", "p1")) == [execute("s3", "x")]
    assert ws.handle(done("s4", "x")) == [
        finished("s4", "x"),
        execute("s4", "b", "x", inputs={"x": result("x")}),
    ]


def test_a_key_in_flight_asked_to_compute_is_reported_when_the_fetch_succeeds(
    ws: WorkerState,
) -> None:
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1",)}), compute("s2", "x"))
    assert ws.handle(fetched("s3", "x", "p1")) == [
        SendFinished("x", len(data("x")), stimulus_id="s3"),
        execute("s3", "b", "x", inputs={"x": data("x")}),
    ]
    assert ws.units["x"].role is Role.COMPUTE
    assert ws.data == {"x": data("x")}


def test_an_executing_key_released_then_needed_as_a_dependency_is_fetched_if_it_fails(
    ws: WorkerState,
) -> None:
    ws.handle(compute("s1", "x"), release("s2", "x"))
    # b needs x: the running execution is reused to feed b, and the release is acknowledged.
    assert ws.handle(compute("s3", "b", "x", who_has={"x": ("p1",)})) == [
        SendReleased("x", stimulus_id="s3")
    ]
    assert (ws.units["x"].state, ws.units["x"].role) == (S.RESUMED, Role.HOLD)
    assert ws.handle(failed("s4", "x")) == [Fetch(("x",), "p1", stimulus_id="s4")]
    assert ws.handle(fetched("s5", "x", "p1")) == [
        execute("s5", "b", "x", inputs={"x": data("x")})
    ]


def test_an_executing_key_released_then_needed_as_a_dependency_feeds_it_when_done(
    ws: WorkerState,
) -> None:
    ws.handle(compute("s1", "x"), release("s2", "x"), compute("s3", "b", "x"))
    assert ws.handle(done("s4", "x")) == [execute("s4", "b", "x", inputs={"x": result("x")})]


def test_releasing_a_result_a_ready_unit_needs_keeps_its_data(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), compute("s2", "x"), compute("s3", "b", "x"))
    assert ws.handle(done("s4", "a")) == [finished("s4", "a"), execute("s4", "x")]
    assert ws.handle(compute("s5", "c", priority=9), done("s6", "x")) == [
        finished("s6", "x"),
        execute("s6", "c", priority=9),
    ]
    assert states(ws)["b"] is S.READY
    assert ws.handle(release("s7", "x")) == [SendReleased("x", stimulus_id="s7")]
    assert (ws.units["x"].state, ws.units["x"].role) == (S.MEMORY, Role.HOLD)
    assert ws.handle(done("s8", "c")) == [
        finished("s8", "c"),
        execute("s8", "b", "x", inputs={"x": result("x")}),
    ]
    assert "x" not in ws.data  # held only for b, and b has it now


# --- stealing -----------------------------------------------------------------------


def test_a_ready_unit_can_be_stolen_and_later_computed_again(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), compute("s2", "b"))
    assert ws.handle(steal("s3", "b")) == [SendStealResponse("b", True, S.READY, stimulus_id="s3")]
    assert ws.units["b"].state is S.RESCHEDULED
    assert ws.handle(done("s4", "a")) == [finished("s4", "a")]
    assert ws.handle(compute("s5", "b")) == [execute("s5", "b")]


def test_releasing_a_stolen_unit_acknowledges(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), compute("s2", "b"), steal("s3", "b"))
    assert ws.handle(release("s4", "b")) == [SendReleased("b", stimulus_id="s4")]


def test_a_waiting_unit_can_be_stolen_and_its_dependencies_are_no_longer_fetched(one_key: WorkerState) -> None:
    ws = one_key
    ws.handle(compute("s1", "b", "x", "y", who_has={"x": ("p1",), "y": ("p1",)}))
    assert states(ws) == {"b": S.WAITING, "x": S.FLIGHT, "y": S.FETCH}  # one transfer per peer
    assert ws.handle(steal("s2", "b")) == [
        SendStealResponse("b", True, S.WAITING, stimulus_id="s2")
    ]
    assert states(ws) == {"b": S.RESCHEDULED, "x": S.CANCELLED, "y": S.RELEASED}


def test_an_executing_unit_cannot_be_stolen(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"))
    assert ws.handle(steal("s2", "a")) == [
        SendStealResponse("a", False, S.EXECUTING, stimulus_id="s2")
    ]
    assert ws.handle(steal("s3", "unknown")) == [
        SendStealResponse("unknown", False, S.FORGOTTEN, stimulus_id="s3")
    ]
    assert ws.handle(done("s4", "a")) == [finished("s4", "a")]


def test_a_key_in_flight_or_queued_for_fetch_is_hold_only_and_cannot_be_stolen(one_key: WorkerState) -> None:
    ws = one_key
    ws.handle(compute("s1", "b", "x", "y", who_has={"x": ("p1",), "y": ("p1",)}))
    assert states(ws) == {"b": S.WAITING, "x": S.FLIGHT, "y": S.FETCH}
    assert ws.handle(steal("s2", "x"), steal("s3", "y")) == [
        SendStealResponse("x", False, S.FLIGHT, stimulus_id="s2"),
        SendStealResponse("y", False, S.FETCH, stimulus_id="s3"),
    ]
    assert states(ws) == {"b": S.WAITING, "x": S.FLIGHT, "y": S.FETCH}  # the fetches go on
    assert ws.in_flight == {"x": "p1"}
    assert ws.handle(fetched("s4", "x", "p1")) == [Fetch(("y",), "p1", stimulus_id="s4")]


def test_a_key_in_memory_cannot_be_stolen_and_keeps_its_data(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), done("s2", "a"))
    assert ws.handle(steal("s3", "a")) == [
        SendStealResponse("a", False, S.MEMORY, stimulus_id="s3")
    ]
    assert states(ws) == {"a": S.MEMORY}
    assert ws.data == {"a": result("a")}


def test_an_executing_unit_refuses_a_steal_and_is_reported_once(ws: WorkerState) -> None:
    assert ws.handle(compute("s1", "a"), compute("s2", "b")) == [execute("s1", "a")]
    assert ws.handle(steal("s3", "a"), steal("s4", "b")) == [
        SendStealResponse("a", False, S.EXECUTING, stimulus_id="s3"),
        SendStealResponse("b", True, S.READY, stimulus_id="s4"),
    ]
    assert states(ws) == {"a": S.EXECUTING, "b": S.RESCHEDULED}
    assert ws.handle(done("s5", "a")) == [finished("s5", "a")]  # b is not started


def test_a_cancelled_or_resumed_unit_cannot_be_stolen(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), release("s2", "a"))
    assert ws.handle(steal("s3", "a")) == [
        SendStealResponse("a", False, S.CANCELLED, stimulus_id="s3")
    ]
    assert ws.handle(compute("s4", "a")) == []
    assert ws.handle(steal("s5", "a")) == [
        SendStealResponse("a", False, S.RESUMED, stimulus_id="s5")
    ]
    assert states(ws) == {"a": S.RESUMED}
    assert ws.handle(done("s6", "a")) == [finished("s6", "a")]  # its one execution reports
    assert [entry[1:3] for entry in ws.story("a")] == [
        ("released", "waiting"), ("waiting", "ready"), ("ready", "executing"),
        ("executing", "cancelled"), ("cancelled", "resumed"), ("resumed", "memory"),
    ]


def test_stealing_a_unit_that_a_waiting_unit_needs_asks_where_it_will_be(
    ws: WorkerState,
) -> None:
    ws.handle(compute("s1", "z"), compute("s2", "a"), compute("s3", "b", "a"))
    assert ws.handle(steal("s4", "a")) == [
        SendStealResponse("a", True, S.READY, stimulus_id="s4"),
        SendMissing("a", stimulus_id="s4"),
    ]
    assert (ws.units["a"].state, ws.units["a"].role) == (S.MISSING, Role.HOLD)
    assert ws.handle(holders("s5", "a", "p2")) == [Fetch(("a",), "p2", stimulus_id="s5")]


# --- fetching -----------------------------------------------------------------------


def test_one_transfer_per_peer_carries_all_its_keys_and_at_most_max_fetches_in_all() -> None:
    ws = make_state(max_fetches=2)
    who_has = {"x": ("p1",), "y": ("p1",), "z": ("p2",), "w": ("p3",)}
    assert ws.handle(compute("s1", "b", "x", "y", "z", "w", who_has=who_has)) == [
        Fetch(("x", "y"), "p1", stimulus_id="s1"),
        Fetch(("z",), "p2", stimulus_id="s1"),
    ]
    assert ws.in_flight == {"x": "p1", "y": "p1", "z": "p2"}
    assert ws.handle(fetched("s2", "x", "p1")) == []  # p1's transfer still brings y
    assert ws.handle(fetched("s3", "z", "p2")) == [Fetch(("w",), "p3", stimulus_id="s3")]
    assert ws.handle(fetched("s4", "y", "p1"), fetched("s5", "w", "p3")) == [
        execute("s5", "b", "x", "y", "z", "w",
                inputs={k: data(k) for k in ("x", "y", "z", "w")})]


def test_a_transfer_takes_at_most_max_transfer_keys_and_the_rest_follow_in_the_next() -> None:
    ws = make_state(max_transfer_keys=3)
    keys = [f"k{i}" for i in range(7)]
    assert ws.handle(compute("s1", "b", *keys, who_has={k: ("p1",) for k in keys})) == [
        Fetch(("k0", "k1", "k2"), "p1", stimulus_id="s1")]
    assert ws.handle(*(fetched(f"s{k}", k, "p1") for k in keys[:3])) == [
        Fetch(("k3", "k4", "k5"), "p1", stimulus_id="sk2")]
    # A key of a transfer that comes back missing goes to its next holder (p1 is busy).
    ws.handle(holders("s2", "k3", "p1", "p2"))
    assert ws.handle(fetch_failed("s3", "k3", "p1")) == [Fetch(("k3",), "p2", stimulus_id="s3")]
    assert ws.handle(fetched("s4", "k4", "p1"), fetched("s5", "k5", "p1")) == [
        Fetch(("k6",), "p1", stimulus_id="s5")]


def test_a_failed_fetch_tries_the_next_holder_then_asks_the_scheduler(ws: WorkerState) -> None:
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1", "p2")}))
    assert ws.handle(fetch_failed("s2", "x", "p1")) == [Fetch(("x",), "p2", stimulus_id="s2")]
    assert ws.handle(fetch_failed("s3", "x", "p2")) == [SendMissing("x", stimulus_id="s3")]
    assert ws.units["x"].state is S.MISSING
    assert ws.handle(holders("s4", "x")) == []  # still nobody: stay missing, do not ask again
    assert ws.handle(holders("s5", "x", "p3")) == [Fetch(("x",), "p3", stimulus_id="s5")]


def test_a_lost_peer_sends_its_transfers_to_other_holders(ws: WorkerState) -> None:
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1", "p2")}))
    assert ws.in_flight == {"x": "p1"}
    assert ws.handle(lost("s2", "p1")) == [Fetch(("x",), "p2", stimulus_id="s2")]
    assert ws.handle(fetched("s3", "x", "p1")) == []  # a stale reply from the lost peer
    assert ws.units["x"].state is S.FLIGHT
    assert ws.handle(fetched("s4", "x", "p2")) == [
        execute("s4", "b", "x", inputs={"x": data("x")})
    ]


def test_a_lost_peer_that_was_the_only_holder_makes_its_keys_missing(one_key: WorkerState) -> None:
    ws = one_key
    ws.handle(compute("s1", "b", "x", "y", who_has={"x": ("p1",), "y": ("p1",)}))
    assert states(ws) == {"b": S.WAITING, "x": S.FLIGHT, "y": S.FETCH}
    assert ws.handle(lost("s2", "p1")) == [
        SendMissing("x", stimulus_id="s2"),
        SendMissing("y", stimulus_id="s2"),
    ]
    assert ws.handle(holders("s3", "x", "p2")) == [Fetch(("x",), "p2", stimulus_id="s3")]
    assert ws.handle(release("s4", "b")) == [SendReleased("b", stimulus_id="s4")]
    assert states(ws) == {"b": S.RELEASED, "x": S.CANCELLED, "y": S.RELEASED}


def test_a_key_queued_for_fetch_whose_holders_are_withdrawn_goes_missing(one_key: WorkerState) -> None:
    ws = one_key
    ws.handle(compute("s1", "b", "x", "y", who_has={"x": ("p1",), "y": ("p1",)}))
    assert ws.handle(holders("s2", "y")) == [SendMissing("y", stimulus_id="s2")]


def test_a_busy_peer_is_retried_later_and_other_holders_are_tried_meanwhile(one_key: WorkerState) -> None:
    ws = one_key
    ws.handle(compute("s1", "b", "x", "y", who_has={"x": ("p1", "p2"), "y": ("p1",)}))
    assert ws.in_flight == {"x": "p1"}
    assert ws.handle(busy("s2", "x", "p1")) == [
        RetryPeerLater("p1", 0.15, stimulus_id="s2"),
        Fetch(("x",), "p2", stimulus_id="s2"),
    ]
    assert ws.units["y"].state is S.FETCH  # its only holder is busy: it waits
    retry = PeerRetryDue("p1", stimulus_id="s3", now=0.2)
    assert ws.handle(retry) == [Fetch(("y",), "p1", stimulus_id="s3")]


def test_a_key_in_flight_whose_dependent_is_released_is_cancelled_then_resumed(
    ws: WorkerState,
) -> None:
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1",)}), release("s2", "b"))
    assert ws.handle(compute("s3", "b", "x")) == []  # the running transfer is reused
    assert (ws.units["x"].state, ws.units["x"].role) == (S.RESUMED, Role.HOLD)
    assert ws.handle(fetch_failed("s4", "x", "p1")) == [SendMissing("x", stimulus_id="s4")]


def test_data_requested_sends_what_is_held_and_names_what_is_not(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), done("s2", "a"))
    request = DataRequested(("a", "zzz"), "p9", stimulus_id="s3", now=0.0)
    assert ws.handle(request) == [SendData("p9", {"a": result("a")}, ("zzz",), stimulus_id="s3")]


# --- forgetting -----------------------------------------------------------------------


def test_release_keeps_the_unit_until_the_scheduler_says_forget(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), done("s2", "a"))
    assert ws.handle(release("s3", "a")) == [SendReleased("a", stimulus_id="s3")]
    assert ws.units["a"].state is S.RELEASED
    assert ws.units["a"].spec == spec("a")
    assert ws.data == {}
    assert ws.handle(forget("s4", "a")) == []
    assert "a" not in ws.units
    assert ws.story("a")[-2:] == [
        ("a", "memory", "released", "s3", 0.0),
        ("a", "released", "forgotten", "s4", 0.0),
    ]


def test_forget_of_an_executing_unit_waits_for_the_execution_to_report(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"))
    assert ws.handle(forget("s2", "a")) == []
    assert ws.units["a"].state is S.CANCELLED
    assert ws.handle(compute("s3", "b")) == []  # its thread is still busy
    assert ws.handle(done("s4", "a")) == [execute("s4", "b")]
    assert "a" not in ws.units


def test_a_forgotten_key_that_units_here_depend_on_stays_until_they_go(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), compute("s2", "x"), compute("s3", "b", "x"))
    ws.handle(done("s4", "a"), compute("s5", "c", priority=9), done("s6", "x"))
    assert states(ws) == {"a": S.MEMORY, "x": S.MEMORY, "b": S.READY, "c": S.EXECUTING}
    assert ws.handle(forget("s7", "x")) == []
    assert (ws.units["x"].state, ws.units["x"].role) == (S.MEMORY, Role.HOLD)
    ws.handle(done("s8", "c"))
    assert ws.units["x"].state is S.RELEASED  # b has its input; x waits for b's fate
    ws.handle(done("s9", "b"), forget("s10", "b"))
    assert "x" not in ws.units


def test_forget_of_a_waiting_unit_that_others_need_fetches_it_instead(ws: WorkerState) -> None:
    ws.handle(compute("s1", "z"), compute("s2", "a"), compute("s3", "b", "a"))
    assert ws.handle(forget("s4", "a")) == [SendMissing("a", stimulus_id="s4")]
    assert (ws.units["a"].state, ws.units["a"].role) == (S.MISSING, Role.HOLD)


def test_forget_of_an_executing_unit_that_others_need_keeps_its_execution(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), compute("s2", "b", "a"))
    assert ws.handle(forget("s3", "a")) == []
    assert (ws.units["a"].state, ws.units["a"].role) == (S.RESUMED, Role.HOLD)
    assert ws.handle(done("s4", "a")) == [execute("s4", "b", "a", inputs={"a": result("a")})]


# --- errors leave the state as it was ---------------------------------------------------


def test_an_impossible_request_raises_with_the_story_and_changes_nothing(ws: WorkerState) -> None:
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1",)}))
    before = copy.deepcopy(vars(ws))
    with pytest.raises(InvalidTransition) as caught:
        ws.handle(done("s2", "b"))  # b never started executing
    assert (caught.value.key, caught.value.start, caught.value.finish) == ("b", "waiting", "memory")
    assert caught.value.story == ws.story("b")
    assert vars(ws) == before


def test_a_batch_that_fails_part_way_is_undone_whole(ws: WorkerState) -> None:
    ws.handle(compute("s1", "b", "x", "y", who_has={"x": ("p1",), "y": ("p2",)}))
    before = copy.deepcopy(vars(ws))
    batch: list[Event] = [
        fetched("s2", "x", "p1"),  # data arrives
        lost("s3", "p2"),  # y goes missing
        compute("s4", "c"),  # a new unit executes
        forget("s5", "b"),  # b, x and y go
        done("s6", "b"),  # impossible: b was never executing
    ]
    with pytest.raises(InvalidTransition):
        ws.handle(*batch)
    assert vars(ws) == before
    ws.validate()


def test_the_story_is_bounded_and_restored_whole_by_a_rollback() -> None:
    ws = make_state(story_limit=3)
    ws.handle(compute("s1", "a"))
    assert len(ws.story("a")) == 3
    before = copy.deepcopy(vars(ws))
    with pytest.raises(InvalidTransition):
        ws.handle(compute("s2", "b"), compute("s3", "c"), failed("s4", "b"))
    assert vars(ws) == before


def test_a_runaway_chain_of_recommendations_raises_transition_loop() -> None:
    table = dict(WorkerState.TRANSITIONS)
    to_waiting, to_released = table[(S.RELEASED, S.WAITING)], table[(S.WAITING, S.RELEASED)]

    def waiting_then_back(state: WorkerState, unit, event):  # type: ignore[no-untyped-def]
        recs, instructions = to_waiting(state, unit, event)
        return {unit.key: S.RELEASED}, instructions

    def released_then_back(state: WorkerState, unit, event):  # type: ignore[no-untyped-def]
        recs, instructions = to_released(state, unit, event)
        return {unit.key: S.WAITING}, instructions

    class Looping(WorkerState):
        TRANSITIONS = {
            **table,
            (S.RELEASED, S.WAITING): waiting_then_back,
            (S.WAITING, S.RELEASED): released_then_back,
        }

    for ws, steps in ((Looping(transition_limit=20), 21), (Looping(), 101)):  # 100: the default
        before = copy.deepcopy(vars(ws))
        with pytest.raises(TransitionLoop) as caught:
            ws.handle(compute("s1", "a"))
        assert (caught.value.key, caught.value.count) == ("a", steps)
        assert vars(ws) == before


def test_an_unknown_event_is_a_type_error(ws: WorkerState) -> None:
    with pytest.raises(TypeError):
        ws.handle(Event(stimulus_id="s1", now=0.0))


# --- validate() can fail ---------------------------------------------------------------


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda ws: ws.data.update(zzz=b"x"), id="data-without-memory"),
        pytest.param(lambda ws: ws.data.pop("a"), id="memory-without-data"),
        pytest.param(lambda ws: ws._ready.clear(), id="ready-key-not-queued"),
        pytest.param(lambda ws: ws._executing.add("b"), id="phantom-execution"),
        pytest.param(lambda ws: setattr(ws.units["c"], "state", S.WAITING), id="waiting-for-nothing"),
        pytest.param(lambda ws: ws.units["x"].dependents.clear(), id="broken-dependents"),
        pytest.param(lambda ws: setattr(ws.units["y"], "who_has", set()), id="fetch-without-holder"),
        pytest.param(lambda ws: setattr(ws, "nthreads", 0), id="too-many-executions"),
    ],
)
def test_validate_catches_a_broken_invariant(corrupt) -> None:  # type: ignore[no-untyped-def]
    ws = WorkerState()
    ws.handle(compute("s1", "a"), done("s2", "a"), compute("s3", "e"))
    ws.handle(compute("s4", "c"), compute("s5", "b", "x", "y", who_has={"x": ("p1",), "y": ("p1",)}))
    ws.handle(lost("s6", "p1"), holders("s7", "x", "p2", "p3"), holders("s8", "y", "p4"))
    ws.handle(busy("s9", "x", "p2"), busy("s10", "y", "p4"))
    assert states(ws) == {
        "a": S.MEMORY, "e": S.EXECUTING, "c": S.READY, "b": S.WAITING, "x": S.FLIGHT, "y": S.FETCH
    }
    ws.validate()
    corrupt(ws)
    with pytest.raises(AssertionError):
        ws.validate()


# --- the core stays pure ------------------------------------------------------------------

FORBIDDEN = {"pykka", "zmq", "threading", "time", "structlog", "asyncio"}
ROOT = Path(__file__).resolve().parent.parent
# What a pure core may build on, inside this project: the bottom layers and itself.
ALLOWED_INSIDE = ("actors.errors", "actors.messages", "actors.core")


def imported_modules(path: Path, package: str) -> set[str]:
    """Every module ``path`` (in ``package``) imports, anywhere in the file, functions included."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(part for part in (base, node.module or "") if part)
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


def package_of(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_the_core_modules_import_no_actors_sockets_threads_or_clocks() -> None:
    core = sorted((ROOT / "actors" / "core").glob("*.py"))
    assert ROOT / "actors" / "core" / "worker_state.py" in core
    assert ROOT / "actors" / "core" / "worker_validate.py" in core
    problems: list[str] = []
    seen: set[Path] = set()
    todo = list(core)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in sorted(imported_modules(path, package_of(path))):
            where = path.relative_to(ROOT)
            if module.split(".")[0] in FORBIDDEN:
                problems.append(f"{where} imports {module}")
            elif module.split(".")[0] == "actors":
                if not module.startswith(ALLOWED_INSIDE):
                    problems.append(f"{where} imports {module}, above the core")
                elif (target := module_file(module)) is not None:
                    todo.append(target)  # what the core builds on must be pure too
    assert problems == []


def test_the_import_check_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    impure = tmp_path / "impure.py"
    impure.write_text("def later():\n    import time\n    from zmq import Context\nfrom . import sibling\n")
    found = imported_modules(impure, "actors.core")
    assert {"time", "zmq", "actors.core.sibling"} <= found


def test_a_kept_result_is_in_memory_under_its_own_key_and_served_to_peers(ws: WorkerState) -> None:
    assert ws.handle(KeepResult("t:3", "t", b"big", stimulus_id="run1 kept", now=1.0)) == []
    assert states(ws) == {"t:3": S.MEMORY} and ws.data == {"t:3": b"big"}
    assert ws.units["t:3"].role is Role.COMPUTE
    assert ws.handle(DataRequested(("t:3", "t:4"), "p1", stimulus_id="ask", now=2.0)) == [
        SendData("p1", {"t:3": b"big"}, ("t:4",), stimulus_id="ask")]
    assert ws.handle(ForgetUnit("t:3", stimulus_id="task ended", now=3.0)) == []
    assert states(ws) == {}


def test_a_result_kept_here_feeds_a_dependent_that_waited_to_fetch_it(ws: WorkerState) -> None:
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1",)}))
    ws.handle(fetch_failed("s2", "x", "p1"))
    assert states(ws) == {"b": S.WAITING, "x": S.MISSING}
    # Computed here meanwhile (or sent to the driver inline): no fetch needed any more.
    out = ws.handle(KeepResult("x", "t", data("x"), stimulus_id="s3", now=3.0))
    assert out == [execute("s3", "b", "x", inputs={"x": data("x")})]
    assert ws.units["x"].state is S.MEMORY


def test_a_key_in_flight_cannot_be_kept_and_nothing_changes(ws: WorkerState) -> None:
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1",)}))
    assert not ws.can_keep("x") and ws.can_keep("y")
    before = states(ws)
    with pytest.raises(InvalidTransition):
        ws.handle(KeepResult("x", "t", b"x", stimulus_id="s2", now=2.0))
    assert states(ws) == before and ws.in_flight == {"x": "p1"}


def test_a_transfer_stops_at_max_transfer_bytes_and_none_starts_past_max_flight_bytes() -> None:
    ws = make_state(max_transfer_bytes=100, max_flight_bytes=100)
    who_has = {"a": ("p1",), "b": ("p1",), "c": ("p1",), "x": ("p2",), "y": ("p3",)}
    sizes = {"a": 60, "b": 40, "c": 30, "x": 70, "y": 10}
    out = ws.handle(ComputeUnit(spec("t", *who_has), who_has, sizes, stimulus_id="s1", now=0.0))
    # a + b fill p1's transfer (100 bytes): that is as much as may be on its way at once.
    assert out == [Fetch(("a", "b"), "p1", stimulus_id="s1")]
    # a arrived (40 on the way): x starts, from the free p2; c waits for p1, y for room.
    assert ws.handle(fetched("s2", "a", "p1")) == [Fetch(("x",), "p2", stimulus_id="s2")]
    assert ws.handle(fetched("s3", "b", "p1")) == [Fetch(("c",), "p1", stimulus_id="s3")]
    assert ws.handle(fetched("s4", "c", "p1")) == [Fetch(("y",), "p3", stimulus_id="s4")]


def test_a_key_larger_than_the_limits_still_goes_alone() -> None:
    ws = make_state(max_transfer_bytes=10, max_flight_bytes=10)
    who_has = {"big": ("p1",), "small": ("p1",)}
    out = ws.handle(ComputeUnit(spec("t", "big", "small"), who_has, {"big": 1000, "small": 1},
                                stimulus_id="s1", now=0.0))
    assert out == [Fetch(("big",), "p1", stimulus_id="s1")]
    assert ws.handle(fetched("s2", "big", "p1")) == [Fetch(("small",), "p1", stimulus_id="s2")]


# --- what a mutation run of this core found unchecked ------------------------------


def test_the_schedulers_word_on_a_size_counts_once_and_never_below_zero(ws: WorkerState) -> None:
    ws.handle(compute("s1", "b", "x", "y", who_has={"x": ("p1",), "y": ("p2",)}))
    ws.handle(fetch_failed("s2", "x", "p1"))
    ws.handle(WhoHasUpdate("x", ("p3",), -5, stimulus_id="s3", now=1.0))  # a bad size: none
    assert ws.units["x"].nbytes == 0
    ws.handle(WhoHasUpdate("y", ("p2",), 70, stimulus_id="s4", now=1.0))
    ws.handle(WhoHasUpdate("y", ("p2",), 10, stimulus_id="s5", now=1.0))  # known: kept
    assert ws.units["y"].nbytes == 70
    assert ws.handle(WhoHasUpdate("zz", ("p2",), 10, stimulus_id="s6", now=1.0)) == []
    assert "zz" not in ws.units  # a key it never heard of stays unknown


def test_a_kept_result_has_its_size_and_task_and_is_in_the_story(ws: WorkerState) -> None:
    ws.handle(KeepResult("t:3", "t", b"12345", stimulus_id="run1 kept", now=1.0))
    unit = ws.units["t:3"]
    assert unit.nbytes == 5 and unit.spec is not None
    assert (unit.spec.key, unit.spec.task_id) == ("t:3", "t")
    assert ws.story("t:3") == [("t:3", S.RELEASED, S.MEMORY, "run1 kept", 1.0)]


def test_a_worker_needs_a_thread_and_a_fetch(ws: WorkerState) -> None:
    WorkerState(nthreads=1, max_fetches=1)  # the least there is
    for kwargs in ({"nthreads": 0}, {"max_fetches": 0}):
        with pytest.raises(ValueError, match="at least 1"):
            WorkerState(**kwargs)  # type: ignore[arg-type]


def test_the_story_is_bounded_by_default() -> None:
    ws = WorkerState()
    for n in range(5_100):
        ws.handle(compute(f"s{n}", f"k{n}"))
    assert len(ws.story(*(f"k{n}" for n in range(5_100)))) == 10_000


def test_only_a_unit_at_rest_and_not_running_can_be_kept(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"))  # executing: holds a thread
    ws.handle(compute("s2", "b", "x", who_has={"x": ("p1",)}))
    ws.handle(fetch_failed("s3", "x", "p1"))  # missing: at rest
    assert states(ws)["x"] is S.MISSING and ws.can_keep("x")
    assert states(ws)["a"] is S.EXECUTING and not ws.can_keep("a")
    ws.handle(done("s4", "a"))  # in memory: its data is here already
    assert states(ws)["a"] is S.MEMORY and not ws.can_keep("a")


def test_a_lost_peer_fails_its_own_transfers_all_of_them_and_no_others() -> None:
    ws = make_state(max_fetches=3)
    ws.handle(compute("s1", "b", "x", "z", who_has={"x": ("p1",), "z": ("p1",)}))
    ws.handle(compute("s2", "c", "y", who_has={"y": ("p2",)}))
    assert ws.in_flight == {"x": "p1", "y": "p2", "z": "p1"}
    assert ws.handle(lost("s3", "p1")) == [SendMissing("x", stimulus_id="s3"),
                                           SendMissing("z", stimulus_id="s3")]
    assert ws.in_flight == {"y": "p2"}
    assert states(ws)["x"] is S.MISSING and states(ws)["z"] is S.MISSING


def test_the_most_wanted_input_is_fetched_first() -> None:
    ws = make_state(max_fetches=1)
    ws.handle(compute("s1", "busy", "w", who_has={"w": ("p9",)}))  # the one fetch slot, taken
    ws.handle(compute("s2", "low", "x", who_has={"x": ("p1",)}, priority=1))
    ws.handle(compute("s3", "high", "y", who_has={"y": ("p2",)}, priority=5))
    assert ws.handle(fetched("s4", "w", "p9"))[-1] == Fetch(("y",), "p2", stimulus_id="s4")


def test_a_refused_transition_names_its_key_and_where_it_was_asked_to_go(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"))
    ws.handle(done("s2", "a"))
    with pytest.raises(InvalidTransition) as refused:
        ws.handle(failed("s3", "a"))  # in memory already: no error now
    assert (refused.value.key, refused.value.finish) == ("a", S.ERROR)


# --- what the second mutation run found unchecked (2026-12-04) ------------------------------


def test_keeping_data_over_a_key_that_holds_or_brings_its_own_is_refused_and_changes_nothing(
    ws: WorkerState,
) -> None:
    """The shell asks ``can_keep`` first; a KeepResult that comes anyway must not overwrite a
    result in memory, nor one an execution is about to bring."""
    ws.handle(compute("s1", "a"), done("s2", "a"))  # in memory
    ws.handle(compute("s3", "b"))  # executing
    assert ws.units["a"].nbytes == len(result("a"))
    before = copy.deepcopy(vars(ws))
    for key in ("a", "b"):
        with pytest.raises(InvalidTransition) as refused:
            ws.handle(KeepResult(key, "t1", b"other bytes", stimulus_id="s4", now=0.0))
        assert (refused.value.key, refused.value.finish) == (key, S.MEMORY)
    assert vars(ws) == before


def test_a_late_reply_about_a_key_forgotten_meanwhile_is_ignored(ws: WorkerState) -> None:
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1",)}))
    ws.handle(lost("s2", "p1"))  # x: missing
    ws.handle(forget("s3", "b"))  # b goes, and x with it
    assert ws.units == {}
    late = [fetched("s4", "x", "p1"), fetch_failed("s5", "x", "p1"), busy("s6", "x", "p1")]
    assert ws.handle(*late) == []
    assert ws.units == {} and ws.data == {} and ws.busy_peers == set()


def test_a_transfer_takes_only_what_the_flight_budget_has_left() -> None:
    """Rule 3: while 60 of 100 bytes are on their way, a second peer's transfer brings at most
    40 more; what does not fit waits for the first transfer to end."""
    ws = make_state(max_flight_bytes=100)
    assert ws.handle(ComputeUnit(spec("b", "x"), {"x": ("p1",)}, {"x": 60},
                                 stimulus_id="s1", now=0.0)) == [Fetch(("x",), "p1", stimulus_id="s1")]
    sizes = {"y": 30, "z": 30}
    assert ws.handle(ComputeUnit(spec("c", "y", "z"), {"y": ("p2",), "z": ("p2",)}, sizes,
                                 stimulus_id="s2", now=0.0)) == [Fetch(("y",), "p2", stimulus_id="s2")]
    assert ws.handle(fetched("s3", "x", "p1")) == [
        execute("s3", "b", "x", inputs={"x": data("x")})]
    assert ws.handle(fetched("s4", "y", "p2")) == [Fetch(("z",), "p2", stimulus_id="s4")]


def test_a_unit_made_and_forgotten_within_a_failing_batch_leaves_no_trace(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"))  # the one thread: a
    before = copy.deepcopy(vars(ws))
    with pytest.raises(InvalidTransition):
        ws.handle(compute("s2", "b"), forget("s3", "b"), done("s4", "b"))
    assert vars(ws) == before


def test_peers_found_busy_in_a_failing_batch_are_not_busy_after_it() -> None:
    ws = make_state(max_fetches=2)
    ws.handle(compute("s1", "b", "x", "y", who_has={"x": ("p1",), "y": ("p2",)}))
    before = copy.deepcopy(vars(ws))
    with pytest.raises(InvalidTransition):
        ws.handle(busy("s2", "x", "p1"), busy("s3", "y", "p2"), done("s4", "b"))
    assert vars(ws) == before and ws.busy_peers == set()


def test_a_tasks_story_is_every_step_of_its_own_keys_and_no_other_tasks(ws: WorkerState) -> None:
    def unit(key: str) -> ComputeUnit:
        task = key.split(":")[0]
        return ComputeUnit(UnitSpec(key, task, b"call"), stimulus_id=f"run of {key}", now=1.0)

    ws.handle(unit("t1:0"), unit("t2:0"), unit("t1:1"))
    assert [entry[:3] for entry in ws.story_of("t1:")] == [
        ("t1:0", "released", "waiting"), ("t1:0", "waiting", "ready"),
        ("t1:0", "ready", "executing"),
        ("t1:1", "released", "waiting"), ("t1:1", "waiting", "ready")]
    assert {entry[0] for entry in ws.story_of("t2:")} == {"t2:0"}
    assert ws.story_of("t3:") == []


def test_what_is_not_a_worker_event_is_refused_by_name_and_changes_nothing(ws: WorkerState) -> None:
    before = copy.deepcopy(vars(ws))
    with pytest.raises(TypeError, match="not a worker event: 'hello'"):
        ws.handle(compute("s1", "a"), "hello")  # type: ignore[arg-type]
    assert vars(ws) == before


def test_by_default_four_transfers_run_at_once_each_of_at_most_100_keys() -> None:
    """The shell takes these defaults (unit_runner.py): rule 3's bounds as a worker has them."""
    ws = WorkerState()
    xs = [f"x{i}" for i in range(101)]  # all held by p1
    ys = [f"y{i}" for i in range(5)]  # one holder each
    who_has = {**dict.fromkeys(xs, ("p1",)), **{y: (f"q{i}",) for i, y in enumerate(ys)}}
    assert ws.handle(compute("s1", "b", *xs, *ys, who_has=who_has)) == [
        Fetch(tuple(xs[:100]), "p1", stimulus_id="s1"),
        *(Fetch((y,), f"q{i}", stimulus_id="s1") for i, y in enumerate(ys[:3]))]


def test_results_are_kept_in_the_mapping_the_shell_gives() -> None:
    """The shell gives its spilling store (actors/spill.py): every result must land there."""
    store: dict[str, bytes] = {}
    ws = WorkerState(data=store)
    ws.handle(compute("s1", "a"), done("s2", "a"))
    assert store == {"a": result("a")}


def test_with_validation_on_a_step_that_breaks_an_invariant_is_undone() -> None:
    table = dict(WorkerState.TRANSITIONS)

    def ready_but_not_queued(state: WorkerState, unit, event):  # type: ignore[no-untyped-def]
        unit.state = S.READY  # a bug: the ready queue does not have it
        return {}, []

    class Broken(WorkerState):
        TRANSITIONS = {**table, (S.WAITING, S.READY): ready_but_not_queued}

    ws = Broken(validate_after_handle=True)
    before = copy.deepcopy(vars(ws))
    with pytest.raises(AssertionError):
        ws.handle(compute("s1", "a"))
    assert vars(ws) == before
    assert Broken().handle(compute("s1", "a")) == []  # unvalidated, the unit is stuck unseen


def test_a_dependencys_size_from_the_scheduler_is_never_below_zero(ws: WorkerState) -> None:
    ws.handle(ComputeUnit(spec("b", "x"), {"x": ("p1",)}, {"x": -5}, stimulus_id="s1", now=0.0))
    assert ws.units["x"].nbytes == 0


def test_a_fetched_input_the_scheduler_then_assigns_here_is_its_to_release(ws: WorkerState) -> None:
    """x came as b's input; the scheduler then assigns x itself here: it is reported at once,
    kept when b starts (the scheduler's now), and its release acknowledged."""
    ws.handle(compute("s1", "a"))  # the one thread
    ws.handle(compute("s2", "b", "x", who_has={"x": ("p1",)}), fetched("s3", "x", "p1"))
    assert ws.handle(compute("s4", "x")) == [SendFinished("x", len(data("x")), stimulus_id="s4")]
    ws.handle(done("s5", "a"))  # b starts: x stays, as the scheduler's
    assert states(ws)["x"] is S.MEMORY and "x" in ws.data
    assert ws.handle(release("s6", "x")) == [SendReleased("x", stimulus_id="s6")]


def test_a_release_of_cancelled_work_or_of_a_mere_input_is_ignored(ws: WorkerState) -> None:
    ws.handle(compute("s1", "a"), release("s2", "a"))  # cancelled: its thread still runs
    assert ws.handle(release("s3", "a")) == []  # no second answer, nor one before it ends
    assert states(ws)["a"] is S.CANCELLED and ws.executing == {"a"}
    ws.handle(compute("s4", "b", "x", who_has={"x": ("p1",)}))
    assert ws.handle(release("s5", "x")) == []  # an input in flight: not the scheduler's here
    assert ws.in_flight == {"x": "p1"}
    assert ws.handle(done("s6", "a")) == [SendReleased("a", stimulus_id="s6")]


def test_a_lost_peer_is_no_longer_counted_busy(ws: WorkerState) -> None:
    """A peer that said busy and was then lost: if it comes back under its name, it is asked
    at once, not after a retry delay meant for its former self."""
    ws.handle(compute("s1", "b", "x", who_has={"x": ("p1",)}), busy("s2", "x", "p1"))
    assert ws.busy_peers == {"p1"}
    ws.handle(lost("s3", "p1"))
    assert ws.busy_peers == set()
    assert ws.handle(holders("s4", "x", "p1")) == [Fetch(("x",), "p1", stimulus_id="s4")]


# --- the validator itself: each invariant, broken on purpose, is named ----------------------


def every_state() -> WorkerState:
    """A worker with a key in each state the checks below break (nthreads 1, 2 fetches)."""
    ws = make_state(max_fetches=2)
    ws.handle(compute("s1", "a"), done("s2", "a"))  # a: memory
    ws.handle(compute("s3", "e"), failed("s4", "e"))  # e: error
    ws.handle(compute("s5", "c"), compute("s6", "r"), compute("s7", "s"))  # c executing; r, s ready
    ws.handle(steal("s8", "s"))  # s: rescheduled
    ws.handle(compute("s9", "b", "x", who_has={"x": ("p1",)}))  # b waiting, x in flight
    ws.handle(compute("s10", "d", "y", who_has={"y": ("p2",)}))  # y: the second transfer
    ws.handle(compute("s11", "f", "z", who_has={"z": ("p3",)}))  # z: fetch, queued
    ws.handle(compute("s12", "g", "m"))  # m: missing
    assert states(ws) == {
        "a": S.MEMORY, "e": S.ERROR, "c": S.EXECUTING, "r": S.READY, "s": S.RESCHEDULED,
        "b": S.WAITING, "x": S.FLIGHT, "d": S.WAITING, "y": S.FLIGHT, "f": S.WAITING,
        "z": S.FETCH, "g": S.WAITING, "m": S.MISSING}
    return ws


def _as_flight_but_executing(ws: WorkerState) -> None:
    ws.units["e"].state, ws.units["e"].running = S.FLIGHT, Work.EXECUTION
    ws._executing.add("e")
    ws.nthreads = 5


def _as_ready_with_an_input_in_flight(ws: WorkerState) -> None:
    ws.units["b"].state = S.READY
    ws._ready = sorted([*ws._ready, (0, ws.units["b"].order, "b")])


def _with_every_input_of_g_in_memory(ws: WorkerState) -> None:
    ws.units["m"].state, ws.units["m"].who_has = S.MEMORY, set()
    ws.data["m"] = b"m"


def _with_zs_one_dependent_erred(ws: WorkerState) -> None:
    ws.units["f"].state, ws.units["f"].error = S.ERROR, b"e"


def _as_executing_through_a_transfer(ws: WorkerState) -> None:
    ws.units["e"].state, ws.units["e"].running = S.EXECUTING, Work.TRANSFER


BROKEN = {
    "ready queue": lambda ws: ws._ready.clear(),
    "fetch queue": lambda ws: ws._fetch_queue.clear(),
    "executing set()": lambda ws: ws._executing.clear(),
    "transfers {}": lambda ws: setattr(ws, "_transfers", {}),
    "1 executions > 0": lambda ws: setattr(ws, "nthreads", 0),
    "2 transfers > 1": lambda ws: setattr(ws, "max_fetches", 1),
    "data for": lambda ws: ws.data.update(zz=b""),
    "'a' .*: misfiled": lambda ws: setattr(ws.units["a"], "key", "q"),
    "'e' .*: running=None": lambda ws: setattr(ws.units["e"], "state", S.EXECUTING),
    "'e' .*: not executing": _as_executing_through_a_transfer,
    "'e' .*: not in flight": _as_flight_but_executing,
    "'a' .*: peer=p9": lambda ws: setattr(ws.units["a"], "peer", "p9"),
    "'r' .*: computed without spec": lambda ws: setattr(ws.units["r"], "spec", None),
    "'z' .*: fetched but assigned": lambda ws: setattr(ws.units["z"], "role", Role.COMPUTE),
    "'z' .*: queued for fetch with no holder": lambda ws: ws.units["z"].who_has.clear(),
    "'m' .*: missing but holders": lambda ws: ws.units["m"].who_has.add("p5"),
    "'g' .*: waiting with every input in memory": _with_every_input_of_g_in_memory,
    "'b' .*: ready with inputs not in memory": _as_ready_with_an_input_in_flight,
    "'e' .*: error without an error": lambda ws: setattr(ws.units["e"], "error", None),
    "'z' .*: held but no dependent needs it": _with_zs_one_dependent_erred,
    "'h' .*: hold-only, released and unused": lambda ws: ws.units.update(h=Unit("h", Role.HOLD, 99)),
    "'s' .*: a dependency cannot be stolen": lambda ws: setattr(ws.units["s"], "role", Role.HOLD),
    "'b' .*: dependency 'x' does not list it": lambda ws: ws.units["x"].dependents.clear(),
    "'a' .*: dependent 'c' does not depend on it": lambda ws: ws.units["a"].dependents.add("c"),
}


@pytest.mark.parametrize("named", BROKEN)
def test_the_validator_names_each_broken_invariant_and_the_key(named: str) -> None:
    """``validate`` guards every test here: each of its checks fails, with its words and the
    key, when its invariant is broken (and only then: the state before it passes)."""
    ws = every_state()
    ws.validate()
    BROKEN[named](ws)
    with pytest.raises(AssertionError, match=named):
        ws.validate()
