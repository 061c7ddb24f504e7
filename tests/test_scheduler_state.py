"""The master's scheduler core, fed events directly: no sockets, no clock."""

from __future__ import annotations

from collections import deque

import pytest

from actors.core import scheduler_events as ev
from actors.core.fair_share import DEFAULT_COST_S, QUANTUM_S
from actors.core.scheduler_state import (
    LATE_S,
    MAX_QUEUED_TASKS,
    STORY_LENGTH,
    SchedulerState,
    WarmKey,
)
from actors.messages import UnitCall, UnitOutcome, unit_digest

# Scenarios about what happens to runs of several units (failures, steals, dependencies) start
# with this many units a run, two runs a worker, as if a unit time were known already.
FIRST_BATCH = 4


class Harness:
    def __init__(self, max_deaths: int = 3, restart_after_error: bool = False,
                 batched: bool = False, step: float = 0.001) -> None:
        self.step = step  # seconds between events (a busy master's; LATE_S is 200 of them)
        first = {"first_batch": FIRST_BATCH, "first_depth": 2 * FIRST_BATCH} if batched else {}
        self.state = SchedulerState(max_deaths=max_deaths, restart_after_error=restart_after_error,
                                    **first)
        self.now = 0.0

    def __call__(self, event_type: type[ev.Event], *args: object, **kwargs: object
                 ) -> list[ev.Instruction]:
        self.now += self.step
        out = self.state.handle(event_type(self.now, *args, **kwargs))  # type: ignore[call-arg]
        self.state.validate()
        return out


def units(*indices: int) -> list[UnitCall]:
    return [UnitCall(i, f"arg{i}".encode()) for i in indices]


def ok(*indices: int) -> list[UnitOutcome]:
    return [UnitOutcome(i, True, f"res{i}".encode()) for i in indices]


@pytest.fixture
def s() -> Harness:
    h = Harness()
    h(ev.NodeJoined, "n1")
    h(ev.WorkerReady, "n1", "w1")
    return h


@pytest.fixture
def s4() -> Harness:
    """One worker, and runs of ``FIRST_BATCH`` units from the start."""
    h = Harness(batched=True)
    h(ev.NodeJoined, "n1")
    h(ev.WorkerReady, "n1", "w1")
    return h


def submit(s: Harness, task_id: str = "t1", client: str = "c1", kind: str = "parallel",
           priority: int = 0) -> list[ev.Instruction]:
    return s(ev.TaskSubmitted, task_id=task_id, client_id=client, name="Name", kind=kind,
             code=b"code", args=b"args", priority=priority)


def test_a_task_waits_for_a_worker_then_gets_a_driver() -> None:
    s = Harness()
    assert submit(s, kind="task") == []
    s(ev.NodeJoined, "n1")
    assert s(ev.WorkerReady, "n1", "w1") == [
        ev.Assign("n1", "w1", "t1", "Name", "task", b"code", b"args", True)
    ]


def test_a_plain_task_finishes_and_its_worker_stays_warm(s: Harness) -> None:
    submit(s, kind="task")
    out = s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"49"))
    # No ReleaseWorker: a plain Task's worker let go of the instance when it sent the result.
    assert out == [ev.ReportDone("c1", "t1", b"49")]
    assert s.state.workers["w1"].warm_for == WarmKey("c1")
    assert s.state.workers["w1"].task_id is None


def test_until_a_unit_is_measured_units_go_out_one_at_a_time_per_worker(s: Harness) -> None:
    submit(s)
    out = s(ev.UnitsSliced, "w1", "t1", units(*range(10)), True)
    assert out == [ev.Dispatch("n1", "w1", "t1", 1, units(0))]
    out = s(ev.WorkerReady, "n1", "w2")
    assert out == [
        ev.Assign("n1", "w2", "t1", "Name", "parallel", b"code", b"args", False),
        ev.Dispatch("n1", "w2", "t1", 2, units(1)),
    ]
    # 0.8 s units: one at a time still, each worker's next unit when it is free
    out = s(ev.UnitsFinished, "w1", "t1", 1, ok(0), 0.8)
    assert out[2:] == [ev.Dispatch("n1", "w1", "t1", 3, units(2))]
    out = s(ev.WorkerReady, "n1", "w3")
    assert out == [
        ev.Assign("n1", "w3", "t1", "Name", "parallel", b"code", b"args", False),
        ev.Dispatch("n1", "w3", "t1", 4, units(3)),
    ]


def test_sliced_units_go_to_the_driver_then_to_a_helper(s4: Harness) -> None:
    s = s4
    submit(s)
    out = s(ev.UnitsSliced, "w1", "t1", units(*range(10)), True)
    assert out == [
        ev.Dispatch("n1", "w1", "t1", 1, units(0, 1, 2, 3)),
        ev.Dispatch("n1", "w1", "t1", 2, units(4, 5, 6, 7)),
    ]
    out = s(ev.WorkerReady, "n1", "w2")
    assert out == [
        ev.Assign("n1", "w2", "t1", "Name", "parallel", b"code", b"args", False),
        ev.Dispatch("n1", "w2", "t1", 3, units(8, 9)),
    ]


def test_results_are_forwarded_to_the_driver_once(s4: Harness) -> None:
    s = s4
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(0, 1), True)
    s(ev.WorkerReady, "n1", "w2")
    out = s(ev.UnitsFinished, "w1", "t1", 1, ok(0, 1), 0.002)
    assert out == [
        ev.ForwardResults("n1", "w1", "t1", [(0, b"res0"), (1, b"res1")]),
        ev.RecordResults("t1", [(i, unit_digest(u), b"res%d" % i) for i, u in enumerate(units(0, 1))]),
    ]
    # The same run reported again (a duplicate frame) records nothing twice.
    assert s(ev.UnitsFinished, "w1", "t1", 1, ok(0, 1), 0.002) == []
    assert s.state.tasks["t1"].units.done_count == 2


def test_a_batched_maps_finished_units_go_to_its_client_too_once(s4: Harness) -> None:
    s = s4
    s(ev.TaskSubmitted, task_id="t1", client_id="c1", name="MapOf", kind="parallel",
      code=b"code", args=b"args", items=True)
    pack = UnitCall(2, b"[2, 3]", count=2)
    s(ev.UnitsSliced, "w1", "t1", [*units(0, 1), pack], True)
    out = s(ev.UnitsFinished, "w1", "t1", 1, [*ok(0, 1), UnitOutcome(2, True, b"res23")], 0.002)
    assert [i for i in out if isinstance(i, ev.ForwardItems)] == [
        ev.ForwardItems("c1", "t1", [(0, 0, b"res0"), (1, 0, b"res1"), (2, 2, b"res23")])]
    assert isinstance(out[0], ev.ForwardResults)  # its driver has them as any task's
    assert s(ev.UnitsFinished, "w1", "t1", 1, ok(0, 1), 0.002) == []
    # A task that is not a batched map sends its client nothing of its units.
    s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"all"))
    submit(s, "t2")
    s(ev.UnitsSliced, "w1", "t2", units(0), True)
    run = s.state.workers["w1"].in_flight[0]
    assert not [i for i in s(ev.UnitsFinished, "w1", "t2", run, ok(0), 0.002)
                if isinstance(i, ev.ForwardItems)]


def test_batches_grow_from_the_measured_unit_time(s: Harness) -> None:
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(2000)), True)
    out = s(ev.UnitsFinished, "w1", "t1", 1, ok(0), 8e-6)
    # 8 µs units: ~5 ms of them a run (625, under MAX_BATCH), up to ~50 ms of them in flight
    assert [len(d.units) for d in out if isinstance(d, ev.Dispatch)] == [625, 625, 625, 124]


def test_a_unit_on_three_dying_workers_fails_its_task_with_every_cause(s4: Harness) -> None:
    s = s4
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(2 * FIRST_BATCH + 1)), True)
    last = 2 * FIRST_BATCH  # the driver's prefetch is full: the last unit waits for a helper
    out: list[ev.Instruction] = []
    for death in range(3):
        s(ev.WorkerReady, "n1", f"h{death}")
        assert list(s.state.workers[f"h{death}"].in_flight) == [last]
        out = s(ev.WorkerLost, f"h{death}", f"killed by signal 9 (#{death})", False)
    assert out[-1] == ev.ReportKilled(
        "c1", "t1", str(last), tuple(f"killed by signal 9 (#{d})" for d in range(3)))
    assert ev.KillWorker("n1", "w1", "task t1 erred") in out
    assert s.state.tasks["t1"].state == "erred"


def test_a_worker_its_node_stopped_is_requeued_but_not_counted_as_a_death(s4: Harness) -> None:
    s = s4
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(2 * FIRST_BATCH + 1)), True)
    last = 2 * FIRST_BATCH
    for attempt in range(5):  # more than max_deaths: none of these count
        s(ev.WorkerReady, "n1", f"h{attempt}")
        assert list(s.state.workers[f"h{attempt}"].in_flight) == [last]
        out = s(ev.WorkerLost, f"h{attempt}", "node stopping", True)
        assert not any(isinstance(i, ev.ReportKilled) for i in out)
    assert s.state.tasks["t1"].state == "running"
    assert [u.index for u in s.state.tasks["t1"].units.pending] == [last]


def test_warm_workers_of_an_old_package_version_are_retired(s: Harness) -> None:
    s(ev.TaskSubmitted, task_id="t1", client_id="c1", name="pkg.m:T", kind="task", code=b"",
      args=b"args", package="pkg", version="v1")
    s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"x"))
    assert s.state.workers["w1"].warm_for == WarmKey("c1", "pkg", "v1")
    assert s(ev.NewestVersion, "other", "v9") == []
    assert s(ev.NewestVersion, "pkg", "v2") == [
        ev.KillWorker("n1", "w1", "warm for an old package version")]
    # A task of the old version that ends after the change does not leave a warm worker.
    s(ev.WorkerReady, "n1", "w2")
    s(ev.TaskSubmitted, task_id="t2", client_id="c1", name="pkg.m:T", kind="task", code=b"",
      args=b"args", package="pkg", version="v1")
    out = s(ev.TaskFinished, "w2", "t2", UnitOutcome(-1, True, b"x"))
    assert out[0] == ev.KillWorker("n1", "w2", "task t2 done")


def test_a_requeued_unit_runs_elsewhere_and_the_story_says_why(s4: Harness) -> None:
    s = s4
    submit(s)
    s(ev.WorkerReady, "n1", "w2")
    s(ev.UnitsSliced, "w1", "t1", units(*range(12)), True)
    on_w2 = sorted(s.state.workers["w2"].in_flight)
    assert on_w2
    s(ev.WorkerLost, "w2", "killed by signal 9", False)
    assert sorted(u.index for u in s.state.tasks["t1"].units.pending) == on_w2
    story = s.state.story("t1")
    assert any(k == f"unit {on_w2[0]}" and c == "worker lost: killed by signal 9"
               for k, _, _, c, _ in story)


def test_a_lost_driver_restarts_the_task_and_its_helpers_finish_their_runs(s: Harness) -> None:
    submit(s)
    s(ev.WorkerReady, "n1", "w2")
    s(ev.UnitsSliced, "w1", "t1", units(*range(12)), False)
    flying = dict(s.state.workers["w2"].in_flight)
    assert flying
    out = s(ev.WorkerLost, "w1", "exit 1", False)
    assert not any(isinstance(i, ev.KillWorker) for i in out)  # the healthy helper goes on
    assert s.state.tasks["t1"].state == "queued"
    # Its runs' results are journaled for the next driver; then it is let go, warm, and
    # becomes that driver itself.
    (run,) = set(flying.values())
    out = s(ev.UnitsFinished, "w2", "t1", run, ok(*flying), 0.01)
    assert ev.RecordResults("t1", [(i, unit_digest(UnitCall(i, f"arg{i}".encode())),
                                     f"res{i}".encode()) for i in flying]) in out
    assert out[-2:] == [ev.ReleaseWorker("n1", "w2", "t1"),
                        ev.Assign("n1", "w2", "t1", "Name", "parallel", b"code", b"args", True)]
    out = s(ev.UnitsSliced, "w2", "t1", units(*range(12)), True)
    [replay] = [i for i in out if isinstance(i, ev.ReplayResults)]
    assert [u.index for u in replay.units] == sorted(flying)  # not run again
    story = s.state.story("t1")
    assert ("worker w2", "helping", "draining") in [e[:3] for e in story]
    assert ("worker w2", "draining", "released") in [e[:3] for e in story]


def test_a_draining_helper_that_dies_gives_its_runs_back_to_the_queue(s: Harness) -> None:
    submit(s)
    s(ev.WorkerReady, "n1", "w2")
    s(ev.UnitsSliced, "w1", "t1", units(*range(12)), False)
    flying = set(s.state.workers["w2"].in_flight)
    s(ev.WorkerLost, "w1", "exit 1", False)
    s(ev.WorkerLost, "w2", "killed by signal 9", False)
    assert not s.state.draining and s.state.tasks["t1"].state == "queued"
    assert flying <= {u.index for u in s.state.tasks["t1"].units.pending}
    out = s(ev.WorkerReady, "n1", "w3")
    assert out[0] == ev.Assign("n1", "w3", "t1", "Name", "parallel", b"code", b"args", True)
    assert {u.index for i in out[1:] if isinstance(i, ev.Dispatch) for u in i.units} == flying


def test_a_restarted_driver_gets_finished_results_replayed_not_recomputed(s4: Harness) -> None:
    s = s4
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(6)), True)
    run = s.state.workers["w1"].in_flight[0]
    s(ev.UnitsFinished, "w1", "t1", run, ok(0, 1, 2), 0.003)
    s(ev.WorkerLost, "w1", "killed by signal 9", False)
    out = s(ev.WorkerReady, "n1", "w2")
    assert out == [ev.Assign("n1", "w2", "t1", "Name", "parallel", b"code", b"args", True)]
    assert s.state.tasks["t1"].units.done_count == 3  # progress does not go back
    # The new driver slices again; unit 1's arguments differ this time.
    again = units(0, 2, 3, 4, 5) + [UnitCall(1, b"changed")]
    again.sort(key=lambda u: u.index)
    out = s(ev.UnitsSliced, "w2", "t1", again, True)
    [replay] = [i for i in out if isinstance(i, ev.ReplayResults)]
    assert [u.index for u in replay.units] == [0, 1, 2] and replay.worker_id == "w2"
    dispatched = [u.index for i in out if isinstance(i, ev.Dispatch) for u in i.units]
    assert dispatched == [3, 4, 5]
    # The journal has unit 1 under other arguments: the shell reports it back; it runs again.
    out = s(ev.UnitsNotReplayed, "w2", "t1", [UnitCall(1, b"changed")])
    assert [u.index for i in out if isinstance(i, ev.Dispatch) for u in i.units] == [1]
    assert s.state.tasks["t1"].units.done_count == 2
    story = s.state.story("t1")
    assert ("units 0-2", "memory", "replayed") in [e[:3] for e in story]


def test_a_failing_unit_fails_the_task_and_its_workers_stay_warm(s4: Harness) -> None:
    s = s4
    submit(s)
    s(ev.WorkerReady, "n1", "w2")
    s(ev.UnitsSliced, "w1", "t1", units(*range(12)), True)
    bad = UnitOutcome(1, False, b"exc", "builtins.KeyError", "'x'", "Traceback")
    out = s(ev.UnitsFinished, "w1", "t1", 1, [UnitOutcome(0, True, b"r"), bad], 0.01)
    assert out == [ev.ReportProgress("c1", "t1", 1, 1, True),
                   ev.ReleaseWorker("n1", "w1", "t1"), ev.ReleaseWorker("n1", "w2", "t1"),
                   ev.ReportErred("c1", "t1", bad, "1")]
    assert {w.warm_for for w in s.state.workers.values()} == {WarmKey("c1")}


@pytest.mark.parametrize("restart_after_error", [False, True],
                         ids=["a fatal error", "restart after any error"])
def test_a_fatal_error_or_the_restart_option_kills_the_workers(restart_after_error: bool) -> None:
    s = Harness(restart_after_error=restart_after_error, batched=True)  # fresh at each run
    s(ev.NodeJoined, "n1")
    s(ev.WorkerReady, "n1", "w1")
    s(ev.WorkerReady, "n1", "w2")
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(12)), True)
    fatal = not s.state.restart_after_error
    bad = UnitOutcome(1, False, b"exc", "builtins.RuntimeError", "exit", "Traceback", fatal=fatal)
    out = s(ev.UnitsFinished, "w1", "t1", 1, [UnitOutcome(0, True, b"r"), bad], 0.01)
    assert ev.KillWorker("n1", "w1", "task t1 erred") in out
    assert ev.KillWorker("n1", "w2", "task t1 erred") in out
    assert out[-1] == ev.ReportErred("c1", "t1", bad, "1")
    assert s.state.workers == {}


def test_a_plain_task_that_raises_keeps_its_worker_which_runs_the_next(s: Harness) -> None:
    submit(s, kind="task")
    submit(s, "t2", kind="task")
    bad = UnitOutcome(-1, False, b"exc", "builtins.ValueError", "no", "Traceback")
    out = s(ev.TaskFinished, "w1", "t1", bad)
    # No ReleaseWorker: a plain Task's worker let go of it when it sent the error.
    assert out == [ev.ReportErred("c1", "t1", bad, ""),
                   ev.Assign("n1", "w1", "t2", "Name", "task", b"code", b"args", True)]


def test_a_raising_unit_runs_again_as_often_as_asked_then_fails_its_task(s4: Harness) -> None:
    s = s4
    s(ev.TaskSubmitted, task_id="t1", client_id="c1", name="Name", kind="parallel", code=b"code",
      args=b"args", retries=2)
    s(ev.UnitsSliced, "w1", "t1", units(0, 1), True)
    bad = UnitOutcome(1, False, b"exc", "builtins.KeyError", "'x'", "Traceback")
    run = s.state.workers["w1"].in_flight[1]
    out = s(ev.UnitsFinished, "w1", "t1", run, [UnitOutcome(0, True, b"r0"), bad], 0.01)
    assert out[0] == ev.ForwardResults("n1", "w1", "t1", [(0, b"r0")], [])
    # unit 1 is queued and dispatched again (the worker is still good: only the code raised)
    [again] = [i for i in out if isinstance(i, ev.Dispatch)]
    assert [u.index for u in again.units] == [1]
    out = s(ev.UnitsFinished, "w1", "t1", again.run_id, [bad], 0.01)
    [third] = [i for i in out if isinstance(i, ev.Dispatch)]
    out = s(ev.UnitsFinished, "w1", "t1", third.run_id, [bad], 0.01)
    assert out[-1] == ev.ReportErred("c1", "t1", bad, "1")
    retries = [c for k, _, f, c, _ in s.state.story("t1") if k == "unit 1" and f == "queued"]
    assert retries == ["retry 1 of 2", "retry 2 of 2"]


def test_a_task_whose_work_raises_runs_again_on_its_warm_worker(s: Harness) -> None:
    s(ev.TaskSubmitted, task_id="t1", client_id="c1", name="Name", kind="task", code=b"code",
      args=b"args", retries=1)
    bad = UnitOutcome(-1, False, b"exc", "builtins.OSError", "flaky", "Traceback")
    out = s(ev.TaskFinished, "w1", "t1", bad)
    assert out == [ev.ReleaseWorker("n1", "w1", "t1"),
                   ev.Assign("n1", "w1", "t1", "Name", "task", b"code", b"args", True)]
    out = s(ev.TaskFinished, "w1", "t1", bad)
    assert out[-1] == ev.ReportErred("c1", "t1", bad, "")


def test_cancel_drops_queued_units_and_kills_the_workers(s: Harness) -> None:
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(100)), False)
    out = s(ev.CancelRequested, "t1")
    assert out[-2:] == [ev.KillWorker("n1", "w1", "task t1 cancelled"), ev.ReportCancelled("c1", "t1")]
    assert s(ev.CancelRequested, "t1") == []  # twice is harmless


def test_a_cancel_with_a_grace_asks_the_workers_to_stop_and_keeps_them_when_they_do(
        s: Harness) -> None:
    s(ev.WorkerReady, "n1", "w2")
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(4)), False)
    running = {w: set(r.in_flight) for w, r in s.state.workers.items() if r.in_flight}
    out = s(ev.CancelRequested, "t1", 5.0)
    assert not any(isinstance(i, ev.KillWorker) for i in out)
    assert {(i.worker_id, i.grace) for i in out if isinstance(i, ev.StopTask)} == {
        ("w1", 5.0), ("w2", 5.0)}
    assert out[-1] == ev.ReportCancelled("c1", "t1")
    story = s.state.story("t1")
    for worker, indices in running.items():  # each unit that was running: its cancel
        for index in indices:
            assert (f"unit {index}", "executing", "cancelled") in [e[:3] for e in story], worker
    # Stopping, a worker takes no new work, even work it is warm for.
    out = submit(s, "t2", kind="task")
    assert out == [] and s.state.tasks["t2"].state == "queued"
    out = s(ev.WorkerStopped, "w1", "t1")
    assert out == [ev.Assign("n1", "w1", "t2", "Name", "task", b"code", b"args", True)]
    assert s(ev.WorkerStopped, "w1", "t1") == []  # a repeated report changes nothing
    assert s(ev.WorkerStopped, "w2", "nope") == []  # nor one about a task it was not stopping
    assert s.state.workers["w2"].stopping == ("t1",)


def test_a_worker_that_does_not_stop_within_the_grace_is_killed(s: Harness) -> None:
    submit(s, kind="task")
    s(ev.CancelRequested, "t1", 2.0)  # at 3
    assert s(ev.Tick) == []  # at 4: within the grace
    s.now += 2
    out = s(ev.Tick)
    assert out == [ev.KillWorker("n1", "w1", "did not stop task t1 within its grace")]
    assert "w1" not in s.state.workers
    assert s(ev.WorkerStopped, "w1", "t1") == []  # too late: it is gone
    assert ("worker w1", "stopping", "killed") in [e[:3] for e in s.state.story("t1")]


def test_a_task_queued_behind_a_stopping_workers_cancelled_one_goes_back_to_the_queue(
        s: Harness) -> None:
    submit(s, "t1", kind="task")
    s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"x"), 0.001)  # measured: prefetch
    submit(s, "t2", kind="task")
    submit(s, "t3", kind="task")
    assert s.state.workers["w1"].queued == deque(["t3"])
    s(ev.CancelRequested, "t2", 1.0)
    assert s.state.workers["w1"].task_id == "t3"  # next in line on it
    s.now += 2
    out = s(ev.Tick)
    assert ev.KillWorker("n1", "w1", "did not stop task t2 within its grace") in out
    assert s.state.tasks["t3"].state == "queued"  # given back, uncounted
    assert s(ev.WorkerReady, "n1", "w2")[0].task_id == "t3"


def test_a_cancel_without_a_grace_kills_at_once(s: Harness) -> None:
    submit(s, kind="task")
    out = s(ev.CancelRequested, "t1", 0.0)
    assert out == [ev.KillWorker("n1", "w1", "task t1 cancelled"), ev.ReportCancelled("c1", "t1")]


def test_a_client_that_leaves_takes_its_unfinished_tasks_with_it(s: Harness) -> None:
    submit(s, "t1", client="gone")
    s(ev.UnitsSliced, "w1", "t1", units(*range(100)), False)
    submit(s, "t2", client="gone", kind="task")  # queued: no worker free
    submit(s, "t3", client="stays", kind="task")
    out = s(ev.ClientLeft, "gone")
    assert ev.KillWorker("n1", "w1", "task t1 cancelled") in out
    assert ev.ReportCancelled("gone", "t1") in out and ev.ReportCancelled("gone", "t2") in out
    assert {t: s.state.tasks[t].state for t in ("t1", "t2")} == {"t1": "cancelled", "t2": "cancelled"}
    s(ev.WorkerReady, "n1", "w2")  # the node replaces the killed worker
    assert s.state.tasks["t3"].state == "running"


def test_higher_priority_tasks_get_workers_first() -> None:
    s = Harness()
    s(ev.NodeJoined, "n1")
    submit(s, "low", priority=0, kind="task")
    submit(s, "high", priority=10, kind="task")
    out = s(ev.WorkerReady, "n1", "w1")
    assert [i.task_id for i in out if isinstance(i, ev.Assign)] == ["high"]


def test_a_warm_worker_is_never_reused_for_another_client(s: Harness) -> None:
    submit(s, "t1", client="alice", kind="task")
    s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"x"))
    out = submit(s, "t2", client="bob", kind="task")
    assert out == [ev.KillWorker("n1", "w1", "warm for other code")]
    out = s(ev.WorkerReady, "n1", "w2")
    assert out == [ev.Assign("n1", "w2", "t2", "Name", "task", b"code", b"args", True)]


def test_a_worker_dropped_for_good_is_not_taken_back_by_its_announcement(s: Harness) -> None:
    """Evicted for another client (told to stop), w1 announced again (its task's code said its
    Hello again) was a clean worker to the scheduler, and got bob's task. A worker lost with
    its node is not dropped for good: the node may come back with it."""
    submit(s, "t1", client="alice", kind="task")
    s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"x"))
    submit(s, "t2", client="bob", kind="task")
    # (its stop may have been lost on the way: said again)
    assert s(ev.WorkerReady, "n1", "w1") == [ev.KillWorker("n1", "w1", "it was dropped for good")]
    assert "w1" not in s.state.workers and "w1" in s.state.retired
    out = s(ev.WorkerAdopted, "n1", "w1", ("t2",))
    assert out == [ev.KillWorker("n1", "w1", "it was dropped for good before")]
    s(ev.WorkerReady, "n1", "w2")
    s(ev.NodeLost, "n1", "silent")
    s(ev.NodeJoined, "n1")
    s(ev.WorkerReady, "n1", "w2")  # back with its node
    assert "w2" in s.state.workers


def test_stale_messages_from_a_worker_that_left_the_task_are_ignored(s: Harness) -> None:
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(0), True)
    s(ev.CancelRequested, "t1")
    assert s(ev.UnitsFinished, "w1", "t1", 1, ok(0), 0.1) == []
    assert s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"x")) == []


def test_only_the_latest_finished_tasks_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from actors.core import scheduler_state

    monkeypatch.setattr(scheduler_state, "FINISHED_KEPT", 3)
    s = Harness()
    s(ev.NodeJoined, "n1")
    s(ev.WorkerReady, "n1", "w1")
    for i in range(5):
        submit(s, f"t{i}", kind="task")
        s(ev.TaskFinished, "w1", f"t{i}", UnitOutcome(-1, True, b"x"))
    assert sorted(s.state.tasks) == ["t2", "t3", "t4"]
    assert s.state.story("t0") == [] and s.state.story("t4")


# --- dependencies, held results, stealing -------------------------------------


def two_workers() -> Harness:
    h = Harness(batched=True)
    h(ev.NodeJoined, "n1", "tcp://n1")
    h(ev.NodeJoined, "n2", "tcp://n2")
    h(ev.WorkerReady, "n1", "w1")
    h(ev.WorkerReady, "n2", "w2")
    return h


def kept(index: int, *deps: int) -> UnitCall:
    return UnitCall(index, f"arg{index}".encode(), list(deps), keep=True)


def held(index: int) -> UnitOutcome:
    return UnitOutcome(index, True, b"", held=True)


def dispatches(out: list[ev.Instruction]) -> list[ev.Dispatch]:
    return [i for i in out if isinstance(i, ev.Dispatch)]


def test_a_dependent_waits_for_its_inputs_then_goes_alone_with_their_holders() -> None:
    s = Harness(batched=True)
    s(ev.NodeJoined, "n1", "tcp://n1")
    s(ev.WorkerReady, "n1", "w1")
    submit(s)
    out = s(ev.UnitsSliced, "w1", "t1", [kept(0), kept(1), kept(2, 0, 1)], True)
    sent = dispatches(out)
    # keep units go alone (keyed by index on the worker); the dependent is not sent yet
    assert [[u.index for u in d.units] for d in sent] == [[0], [1]]
    assert set(s.state.tasks["t1"].units.blocked) == {2}
    s(ev.UnitsFinished, "w1", "t1", sent[0].run_id, [held(0)], 0.001)
    out = s(ev.UnitsFinished, "w1", "t1", sent[1].run_id, [held(1)], 0.001)
    (dependent,) = dispatches(out)
    assert [u.index for u in dependent.units] == [2]
    assert dependent.holders == [(0, "w1", "tcp://n1"), (1, "w1", "tcp://n1")]
    # the driver learns where held results are, not their values
    forwards = [i for i in out if isinstance(i, ev.ForwardResults)]
    assert forwards == [ev.ForwardResults("n1", "w1", "t1", [], [(1, "w1", "tcp://n1")])]


def run_of(worker_id: str, *indices: int) -> tuple[str, list[int]]:
    return worker_id, list(indices)


def placed(out: list[ev.Instruction]) -> list[tuple[str, list[int]]]:
    """Where each dispatched run went, and its units."""
    return [(d.worker_id, [u.index for u in d.units]) for d in dispatches(out)]


def test_a_lost_holder_recomputes_only_what_is_still_needed_and_tells_its_peers() -> None:
    """w2 holds 8 (the open unit 12 needs it), 9 (its only dependent, 13, is done) and 11 (a
    sink: reduce needs it), and runs 10. When w2 is lost, 8 and 11 are computed again, 9 is
    not, 10 goes back to the queue, and w1 (which may be fetching from w2) is told at once."""
    s = two_workers()
    submit(s)
    # Eight plain units fill the driver w1; the keep units go to the helper w2, one run each.
    out = s(ev.UnitsSliced, "w1", "t1", [*units(*range(8)), kept(8), kept(9), kept(10), kept(11),
                                         kept(12, 8, 10), UnitCall(13, b"arg13", [9])], True)
    assert placed(out) == [run_of("w1", 0, 1, 2, 3), run_of("w1", 4, 5, 6, 7), run_of("w2", 8),
                           run_of("w2", 9), run_of("w2", 10), run_of("w2", 11)]
    s(ev.UnitsFinished, "w2", "t1", 3, [held(8)], 0.001)
    (run13,) = dispatches(s(ev.UnitsFinished, "w2", "t1", 4, [held(9)], 0.001))
    s(ev.UnitsFinished, "w2", "t1", run13.run_id, [UnitOutcome(13, True, b"res13")], 0.001)
    s(ev.UnitsFinished, "w2", "t1", 6, [held(11)], 0.001)
    assert s.state.tasks["t1"].units.held == {8: "w2", 9: "w2", 11: "w2"}

    out = s(ev.WorkerLost, "w2", "killed", False)
    assert out == [
        ev.TellPeerGone("n1", "w1", "w2"),
        ev.Dispatch("n1", "w1", "t1", 8, [kept(10)]),  # it was running on w2
        ev.Dispatch("n1", "w1", "t1", 9, [kept(11)]),
        ev.Dispatch("n1", "w1", "t1", 10, [kept(8)]),
    ]
    again = [(key, cause) for key, start, _, cause, _ in s.state.story("t1") if start == "memory"]
    assert again == [("unit 8", "holder lost: killed"), ("unit 11", "holder lost: killed")]
    # 12 goes once 8 and 10 are held again, with their new holder; 9 is never asked for.
    s(ev.UnitsFinished, "w1", "t1", 8, [held(10)], 0.001)
    s(ev.UnitsFinished, "w1", "t1", 9, [held(11)], 0.001)
    (run12,) = dispatches(s(ev.UnitsFinished, "w1", "t1", 10, [held(8)], 0.001))
    assert run12.units == [kept(12, 8, 10)]
    assert run12.holders == [(8, "w1", "tcp://n1"), (10, "w1", "tcp://n1")]
    assert 9 not in s.state.tasks["t1"].units.open_units


def test_a_lost_result_is_recomputed_with_the_inputs_it_needs_again() -> None:
    """Leaf 0 feeds 1, which feeds 2; 0 and 1 were held by w2. When w2 is lost, 0 looks
    unneeded (its only dependent is finished) until 1 is reopened: then 0 runs again first."""
    s = Harness()
    s(ev.NodeJoined, "n1")
    s(ev.WorkerReady, "n1", "w1")
    submit(s)
    s(ev.WorkerReady, "n1", "w2")
    chain = [UnitCall(0, b"a", keep=True), UnitCall(1, b"b", [0], keep=True), UnitCall(2, b"c", [1])]
    s(ev.UnitsSliced, "w1", "t1", chain, True)
    task = s.state.tasks["t1"]
    for index in (0, 1):
        worker, run = next((w, r.in_flight[index]) for w, r in s.state.workers.items()
                           if index in r.in_flight)
        s(ev.UnitsFinished, worker, "t1", run, [UnitOutcome(index, True, b"", held=True)], 0.01)
        task.units.held[index] = "w2"  # say both ended up on w2
    s(ev.WorkerLost, "w2", "killed by signal 9", False)
    assert set(task.units.open_units) == {0, 1, 2}
    assert 1 in task.units.blocked  # until 0 is held again
    s(ev.WorkerReady, "n1", "w3")
    [(worker, run)] = [(w, r.in_flight[0]) for w, r in s.state.workers.items() if 0 in r.in_flight]
    s(ev.UnitsFinished, worker, "t1", run, [UnitOutcome(0, True, b"", held=True)], 0.01)
    assert any(1 in r.in_flight for r in s.state.workers.values()), "unit 1 not dispatched again"
    causes = [c for k, _, _, c, _ in s.state.story("t1") if k == "unit 0"]
    assert "needed again by unit 1" in causes


def test_a_worker_missing_an_input_is_told_its_holder_or_gets_it_recomputed() -> None:
    s = two_workers()
    submit(s)
    # Eight plain units fill the driver w1, so the keep unit 8 goes to the helper w2.
    out = s(ev.UnitsSliced, "w1", "t1", [*units(*range(8)), kept(8), kept(9, 8)], True)
    assert placed(out) == [run_of("w1", 0, 1, 2, 3), run_of("w1", 4, 5, 6, 7), run_of("w2", 8)]
    s(ev.UnitsFinished, "w1", "t1", 1, ok(0, 1, 2, 3), 0.001)
    s(ev.UnitsFinished, "w1", "t1", 2, ok(4, 5, 6, 7), 0.001)
    out = s(ev.UnitsFinished, "w2", "t1", 3, [held(8)], 0.001)
    # 9 needs 8: it goes to the least loaded worker, w1, naming 8's holder
    assert dispatches(out) == [ev.Dispatch("n1", "w1", "t1", 4, [kept(9, 8)], [(8, "w2", "tcp://n2")])]
    # w1 asks again while the holder lives: it is told the holder, nothing is recomputed
    assert s(ev.UnitMissing, "w1", "t1", 8) == [
        ev.TellHolders("n1", "w1", "t1", 8, [("w2", "tcp://n2")])]
    assert 8 not in s.state.tasks["t1"].units.open_units
    # the holder itself lost it (its data is gone): the unit is computed again
    assert s(ev.UnitMissing, "w2", "t1", 8) == [ev.Dispatch("n2", "w2", "t1", 5, [kept(8)])]
    assert 8 in s.state.tasks["t1"].units.open_units
    # w1's fetch from w2 failed meanwhile: it waits for the new result instead of a holder
    assert s(ev.UnitMissing, "w1", "t1", 8) == []
    out = s(ev.UnitsFinished, "w2", "t1", 5, [held(8)], 0.001)
    assert ev.TellHolders("n1", "w1", "t1", 8, [("w2", "tcp://n2")]) in out


MB = 1_000_000


def held_of(index: int, size: int) -> UnitOutcome:
    return UnitOutcome(index, True, b"", held=True, size=size)


def test_units_that_go_alone_are_dealt_in_one_block_per_worker() -> None:
    """Eight keep units and two workers with room: four consecutive ones each, not all eight to
    the least loaded (the other idle) nor alternating (a tree's siblings split apart)."""
    s = two_workers()
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(12)), False)  # w2 joins as a helper
    s(ev.UnitsFinished, "w1", "t1", 1, ok(0, 1, 2, 3), 0.02)
    s(ev.UnitsFinished, "w2", "t1", 3, ok(8, 9, 10, 11), 0.02)
    s(ev.UnitsFinished, "w1", "t1", 2, ok(4, 5, 6, 7), 0.02)
    out = s(ev.UnitsSliced, "w1", "t1", [kept(i) for i in range(12, 20)], True)
    assert placed(out) == [run_of("w1", i) for i in range(12, 16)] + [
        run_of("w2", i) for i in range(16, 20)]


def test_a_unit_goes_to_the_worker_holding_most_of_its_input_bytes() -> None:
    s = two_workers()
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(12)), False)
    s(ev.UnitsFinished, "w1", "t1", 1, ok(0, 1, 2, 3), 0.02)
    s(ev.UnitsFinished, "w2", "t1", 3, ok(8, 9, 10, 11), 0.02)
    s(ev.UnitsFinished, "w1", "t1", 2, ok(4, 5, 6, 7), 0.02)
    s(ev.UnitsSliced, "w1", "t1", [kept(12), kept(13), kept(14, 12, 13)], True)
    task = s.state.tasks["t1"]
    (run12,), (run13,) = ({w.in_flight[i] for w in s.state.workers.values() if i in w.in_flight}
                          for i in (12, 13))
    assert (task.units.held, 12 in s.state.workers["w1"].in_flight) == ({}, True)
    s(ev.UnitsFinished, "w1", "t1", run12, [held_of(12, 1 * MB)], 0.02)
    # w1, idle and first by name, would be the least loaded pick; w2 holds 10 of the 11 MB.
    (run14,) = dispatches(s(ev.UnitsFinished, "w2", "t1", run13, [held_of(13, 10 * MB)], 0.02))
    assert (run14.worker_id, run14.units, run14.sizes) == ("w2", [kept(14, 12, 13)],
                                                           {12: MB, 13: 10 * MB})


@pytest.mark.parametrize(("unit_seconds", "goes_to"), [(0.02, "w1"), (0.2, "w2")])
def test_a_unit_waits_for_its_busy_holder_unless_moving_the_input_is_sooner(
        unit_seconds: float, goes_to: str) -> None:
    """The holder of a 10 MB input (~0.1 s to move) has two more units queued: at 0.02 s each
    the unit waits for it while w2 idles; at 0.2 s each it goes to w2 and fetches the input."""
    s = two_workers()
    submit(s)
    out = s(ev.UnitsSliced, "w1", "t1", [kept(0), kept(1), kept(2), kept(3, 0)], True)
    assert placed(out) == [run_of("w1", 0), run_of("w1", 1), run_of("w1", 2)]
    out = s(ev.UnitsFinished, "w1", "t1", 1, [held_of(0, 10 * MB)], unit_seconds)
    if goes_to == "w2":
        assert placed(out) == [run_of("w2", 3)]
        return
    assert placed(out) == []
    assert [u.index for u in s.state.tasks["t1"].units.pending] == [3]
    s.state.validate()
    assert placed(s(ev.UnitsFinished, "w1", "t1", 2, [held_of(1, 10)], unit_seconds)) == [
        run_of("w1", 3)]


def test_a_paused_holder_is_not_waited_for() -> None:
    s = two_workers()
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", [kept(0), kept(1), kept(2), kept(3, 0)], True)
    s(ev.WorkerPaused, "w1", True)
    assert placed(s(ev.UnitsFinished, "w1", "t1", 1, [held_of(0, 10 * MB)], 0.02)) == [
        run_of("w2", 3)]


def test_a_burst_handled_without_a_pass_is_placed_by_the_next_one_as_one_at_a_time() -> None:
    """What the master does with a burst of submits waiting in its mailbox: the pass after the
    last places every task exactly as passes after each would (idle workers first, then queued
    behind the busy one with the fewest, in join order)."""
    def burst(one_pass: bool) -> list[tuple[str, str, str]]:
        h = two_workers()
        for n in range(2):  # measured: plain Tasks of this key may queue behind each other
            submit(h, f"warm{n}", kind="task")
            h(ev.TaskFinished, f"w{n + 1}", f"warm{n}", UnitOutcome(-1, True, b""), 0.001)
        out: list[ev.Instruction] = []
        for n in range(7):
            h.now += h.step
            event = ev.TaskSubmitted(h.now, task_id=f"t{n}", client_id="c1", name="Name",
                                     kind="task", code=b"code", args=b"args")
            out += h.state.handle(event, schedule=not one_pass or n == 6)
        h.state.validate()
        where = [(a.task_id, a.worker_id) for a in out if isinstance(a, ev.Assign)]
        queued = {w: list(r.queued) for w, r in h.state.workers.items()}
        return [(t, w, ",".join(queued[w])) for t, w in where]

    assert burst(one_pass=True) == burst(one_pass=False)
    placed_ = burst(one_pass=True)
    assert [t for t, _, _ in placed_] == [f"t{n}" for n in range(7)]
    workers = [w for _, w, _ in placed_]  # the one with fewer queued each time: they alternate
    assert all(a != b for a, b in zip(workers, workers[1:], strict=False)), placed_


def test_a_holder_a_worker_cannot_reach_fails_the_task_after_three_fetches() -> None:
    s = two_workers()
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", [*units(*range(8)), kept(8), kept(9, 8)], True)
    s(ev.UnitsFinished, "w1", "t1", 1, ok(0, 1, 2, 3), 0.001)
    s(ev.UnitsFinished, "w1", "t1", 2, ok(4, 5, 6, 7), 0.001)
    s(ev.UnitsFinished, "w2", "t1", 3, [held(8)], 0.001)
    # w1's fetches from the living holder w2 get no answer: told again, then once more...
    for _ in range(2):
        assert s(ev.UnitMissing, "w1", "t1", 8) == [
            ev.TellHolders("n1", "w1", "t1", 8, [("w2", "tcp://n2")])]
    # ...and the third time the task fails, saying who could not reach whom, where
    out = s(ev.UnitMissing, "w1", "t1", 8)
    assert ev.ReportUnreachable("c1", "t1", "unit 8", "w1", "w2", "tcp://n2", 3) in out
    assert s.state.tasks["t1"].state is ev.TaskStatus.ERRED
    assert not [i for i in out if isinstance(i, (ev.TellHolders, ev.Dispatch))]


def test_an_idle_worker_steals_a_queued_run_from_a_busy_one() -> None:
    s = two_workers()
    submit(s)
    out = s(ev.UnitsSliced, "w1", "t1", units(*range(4 * FIRST_BATCH)), True)
    runs = {w: sorted(d.run_id for d in dispatches(out) if d.worker_id == w) for w in ("w1", "w2")}
    assert len(runs["w1"]) == 2 and len(runs["w2"]) == 2
    s(ev.UnitsFinished, "w2", "t1", runs["w2"][0], ok(*s.state.workers["w2"].in_flight)[:FIRST_BATCH], 0.0)
    left = [i for i, r in s.state.workers["w2"].in_flight.items() if r == runs["w2"][1]]
    out = s(ev.UnitsFinished, "w2", "t1", runs["w2"][1], ok(*left), 0.0)
    # w2 is idle and nothing is queued: w1 is asked for its newest run, once
    assert [i for i in out if isinstance(i, ev.Steal)] == [ev.Steal("n1", "w1", "t1", runs["w1"][1])]
    assert not [i for i in s(ev.Tick) if isinstance(i, ev.Steal)]  # one request at a time
    out = s(ev.StealAnswered, "w1", "t1", runs["w1"][1], True)
    (moved,) = dispatches(out)
    assert moved.worker_id == "w2" and len(moved.units) == FIRST_BATCH
    assert (f"run {runs['w1'][1]}", "queued", "rescheduled") in [e[:3] for e in s.state.story("t1")]
    # w1's oldest run is never asked for: it is most likely running
    assert not [i for i in s(ev.Tick) if isinstance(i, ev.Steal)]


def test_a_refused_steal_changes_nothing() -> None:
    s = two_workers()
    submit(s)
    out = s(ev.UnitsSliced, "w1", "t1", units(*range(4 * FIRST_BATCH)), True)
    assert [d.run_id for d in dispatches(out)] == [1, 2, 3, 4]  # w1: runs 1, 2; w2: runs 3, 4
    s(ev.UnitsFinished, "w2", "t1", 3, ok(*range(2 * FIRST_BATCH, 3 * FIRST_BATCH)), 0.0)
    out = s(ev.UnitsFinished, "w2", "t1", 4, ok(*range(3 * FIRST_BATCH, 4 * FIRST_BATCH)), 0.0)
    assert [i for i in out if isinstance(i, ev.Steal)] == [ev.Steal("n1", "w1", "t1", 2)]
    before = {w: dict(s.state.workers[w].in_flight) for w in ("w1", "w2")}
    # w1 had begun run 2 already: it refuses, and the run stays where it is
    assert s(ev.StealAnswered, "w1", "t1", 2, False) == []
    assert {w: dict(s.state.workers[w].in_flight) for w in ("w1", "w2")} == before
    assert "rescheduled" not in [e[2] for e in s.state.story("t1")]
    assert [i for i in s(ev.Tick) if isinstance(i, ev.Steal)] == []  # not asked twice
    # w1 finishes both runs itself
    s(ev.UnitsFinished, "w1", "t1", 1, ok(*range(FIRST_BATCH)), 0.0)
    s(ev.UnitsFinished, "w1", "t1", 2, ok(*range(FIRST_BATCH, 2 * FIRST_BATCH)), 0.0)
    assert s.state.tasks["t1"].units.done_count == 4 * FIRST_BATCH



def runs_of_two() -> Harness:
    """Units sliced two at a time, spread as runs of two over w1 and w2; w2 then finishes its
    oldest run (and w1 refuses the steal that asks for): nothing is queued, both are busy, w1
    has more runs than w2."""
    s = two_workers()
    submit(s)
    for first in range(0, 14, 2):
        s(ev.UnitsSliced, "w1", "t1", units(first, first + 1), first == 12)
    finish_run(s, "w2", min(s.state.workers["w2"].in_flight.values()))
    (asked,) = s.state.tasks["t1"].units.steals  # for w2, idle a moment: refused, begun already
    s(ev.StealAnswered, "w1", "t1", asked, False)
    assert [len(set(s.state.workers[w].in_flight.values())) for w in ("w1", "w2")] == [4, 2]
    assert not s.state.tasks["t1"].units.pending
    return s


def test_a_steal_asks_the_worker_with_most_runs_queued() -> None:
    s = runs_of_two()
    out = s(ev.WorkerReady, "n1", "w3")  # idle: joins to steal
    newest = max(s.state.workers["w1"].in_flight.values())
    assert [i for i in out if isinstance(i, ev.Steal)] == [ev.Steal("n1", "w1", "t1", newest)]


def test_a_steal_asks_a_paused_worker_first_though_another_has_more_runs() -> None:
    s = runs_of_two()
    s(ev.WorkerPaused, "w2", True, "resident 900 MiB")
    out = s(ev.WorkerReady, "n1", "w3")
    newest = max(s.state.workers["w2"].in_flight.values())
    assert [i for i in out if isinstance(i, ev.Steal)] == [ev.Steal("n2", "w2", "t1", newest)]


def test_units_a_run_left_undone_go_back_first_in_their_order(s4: Harness) -> None:
    s = s4
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(10)), True)  # runs [0-3], [4-7]; 8, 9 queued
    # The worker stopped its first run after unit 0 (a batch stops at a failure)
    out = s(ev.UnitsFinished, "w1", "t1", 1, ok(0), 0.001)
    assert [d.units for d in dispatches(out)] == [units(1, 2, 3, 8, 9)]

# --- prefetch: plain Tasks queued on a busy warm worker ------------------------


def assigned(out: list[ev.Instruction]) -> list[tuple[str, str]]:
    return [(i.worker_id, i.task_id) for i in out if isinstance(i, ev.Assign)]


def fast_worker(s: Harness) -> None:
    """w1 ran one plain Task of c1 in a millisecond: the scheduler knows c1's tasks are short."""
    submit(s, "t0", kind="task")
    s(ev.TaskFinished, "w1", "t0", UnitOutcome(-1, True, b"r"), 0.001)


def test_short_plain_tasks_queue_on_a_busy_worker_and_run_in_turn(s: Harness) -> None:
    fast_worker(s)
    assert assigned(submit(s, "t1", kind="task")) == [("w1", "t1")]
    assert assigned(submit(s, "t2", kind="task")) == [("w1", "t2")]
    assert assigned(submit(s, "t3", kind="task")) == [("w1", "t3")]
    assert s.state.workers["w1"].queued == deque(["t2", "t3"])
    assert ("task", "queued", "running", "driver w1 (queued behind t1)") in [
        e[:4] for e in s.state.story("t2")]
    out = s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"1"), 0.001)
    assert out == [ev.ReportDone("c1", "t1", b"1")]  # t2 is already there: nothing to send
    assert s.state.workers["w1"].task_id == "t2"
    s(ev.TaskFinished, "w1", "t2", UnitOutcome(-1, True, b"2"), 0.001)
    s(ev.TaskFinished, "w1", "t3", UnitOutcome(-1, True, b"3"), 0.001)
    assert s.state.workers["w1"].task_id is None and not s.state.workers["w1"].queued


def test_slow_plain_tasks_wait_for_an_idle_worker(s: Harness) -> None:
    submit(s, "t0", kind="task")
    s(ev.TaskFinished, "w1", "t0", UnitOutcome(-1, True, b"r"), 1.0)
    submit(s, "t1", kind="task")
    assert assigned(submit(s, "t2", kind="task")) == []  # a second of work: no queueing
    assert s.state.tasks["t2"].state == "queued"


@pytest.mark.parametrize(("measured", "room"),
                         [(0.01, 5), (0.001, 50), (0.0001, MAX_QUEUED_TASKS)])
def test_a_busy_worker_queues_about_50_ms_of_measured_tasks_and_never_more_than_its_bound(
    s: Harness, measured: float, room: int
) -> None:
    submit(s, "t0", kind="task")
    s(ev.TaskFinished, "w1", "t0", UnitOutcome(-1, True, b"r"), measured)
    n = MAX_QUEUED_TASKS + 16
    for i in range(1, n):
        submit(s, f"t{i}", kind="task")
    assert s.state.workers["w1"].task_id == "t1"
    assert list(s.state.workers["w1"].queued) == [f"t{i}" for i in range(2, 2 + room)]
    assert {s.state.tasks[f"t{i}"].state for i in range(2 + room, n)} == {"queued"}


def test_a_busy_worker_back_from_a_pause_queues_tasks_again(s: Harness) -> None:
    fast_worker(s)
    submit(s, "t1", kind="task")
    s(ev.WorkerPaused, "w1", True, "resident 900 MiB")
    assert assigned(submit(s, "t2", kind="task")) == []  # paused: nothing queued on it
    out = s(ev.WorkerPaused, "w1", False, "resident 100 MiB")
    assert assigned(out) == [("w1", "t2")]
    assert assigned(submit(s, "t3", kind="task")) == [("w1", "t3")]
    assert s.state.workers["w1"].queued == deque(["t2", "t3"])


def test_queued_tasks_go_to_the_busy_worker_with_fewest_queued_the_first_joined_of_them() -> None:
    s = Harness()
    s(ev.NodeJoined, "n1")
    for w in ("w3", "w1", "w2"):  # join order, not name order
        s(ev.WorkerReady, "n1", w)
    submit(s, "t0", kind="task")
    s(ev.TaskFinished, "w3", "t0", UnitOutcome(-1, True, b"r"), 0.001)
    for i in range(1, 4):
        submit(s, f"t{i}", kind="task")
    assert {w: s.state.workers[w].task_id for w in ("w3", "w1", "w2")} == {
        "w3": "t1", "w1": "t2", "w2": "t3"}
    placed = [assigned(submit(s, f"t{i}", kind="task")) for i in range(4, 10)]
    assert placed == [[("w3", "t4")], [("w1", "t5")], [("w2", "t6")],
                      [("w3", "t7")], [("w1", "t8")], [("w2", "t9")]]
    s(ev.TaskFinished, "w1", "t2", UnitOutcome(-1, True, b"2"), 0.001)  # w1: t5 now, t8 queued
    s(ev.TaskFinished, "w1", "t5", UnitOutcome(-1, True, b"5"), 0.001)  # w1: t8, none queued
    assert assigned(submit(s, "t10", kind="task")) == [("w1", "t10")]  # fewest: w1's none
    assert assigned(submit(s, "t11", kind="task")) == [("w1", "t11")]  # 1 against 2 and 2
    assert assigned(submit(s, "t12", kind="task")) == [("w3", "t12")]  # 2 each: first joined


def test_an_unmeasured_task_another_client_or_a_parallel_task_is_not_queued(s: Harness) -> None:
    submit(s, "t1", kind="task")
    assert assigned(submit(s, "t2", kind="task")) == []  # nothing measured yet
    s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"r"), 0.001)
    assert s.state.workers["w1"].task_id == "t2"
    assert assigned(submit(s, "t3", client="c2", kind="task")) == []
    assert assigned(submit(s, "p1", kind="parallel")) == []
    assert not s.state.workers["w1"].queued


def take_backs(out: list[ev.Instruction]) -> list[ev.TakeBack]:
    return [i for i in out if isinstance(i, ev.TakeBack)]


def test_tasks_queued_behind_one_that_runs_long_are_taken_back_for_a_free_worker(
    s: Harness
) -> None:
    """The submitter's tasks were measured short, but t1 is not: once another worker is free,
    the ones queued behind t1 go back to the queue (uncounted, their story says why) and run
    there."""
    fast_worker(s)
    submit(s, "t1", kind="task")
    assert assigned(submit(s, "t2", kind="task")) == [("w1", "t2")]  # t1 has just begun
    assert take_backs(s(ev.Tick)) == []  # not late yet
    s.now += LATE_S
    assert assigned(submit(s, "t3", kind="task")) == []  # late: nothing more queues there
    assert take_backs(s(ev.Tick)) == []  # no worker free: t2 would wait as long in the queue
    assert assigned(s(ev.WorkerReady, "n1", "w2")) == [("w2", "t3")]
    s(ev.TaskFinished, "w2", "t3", UnitOutcome(-1, True, b"3"), 0.001)  # w2 is free now
    s.now += LATE_S / 2
    assert take_backs(s(ev.Tick)) == [ev.TakeBack("n1", "w1", "t2")]
    s.now += LATE_S
    assert take_backs(s(ev.Tick)) == []  # asked once: the answer is on its way
    out = s(ev.TakeBackAnswered, "w1", "t2", True)
    assert assigned(out) == [("w2", "t2")]
    assert not s.state.workers["w1"].queued and not s.state.tasks["t2"].deaths
    assert ("task", "running", "queued", "taken back from w1: queued behind t1, which runs long") \
        in [e[:4] for e in s.state.story("t2")]
    s(ev.TaskFinished, "w2", "t2", UnitOutcome(-1, True, b"2"), 0.001)
    assert s.state.tasks["t2"].state == "done"


def test_no_task_is_taken_back_while_every_worker_is_busy(s: Harness) -> None:
    """A master slow to hear results sees every worker late (a thousand workers, tasks of no
    time): with no worker free, asking each for its queue would only add to its load."""
    fast_worker(s)
    s(ev.WorkerReady, "n1", "w2")
    for i in range(1, 5):
        submit(s, f"t{i}", kind="task")  # t1, t2 run; t3 and t4 queued behind them
    assert {w: list(s.state.workers[w].queued) for w in ("w1", "w2")} == {
        "w1": ["t3"], "w2": ["t4"]}
    s.now += 10 * LATE_S
    assert take_backs(s(ev.Tick)) == []
    s(ev.TaskFinished, "w2", "t2", UnitOutcome(-1, True, b"2"), 0.001)  # t4 begins on w2
    s.now += LATE_S / 2
    assert take_backs(s(ev.Tick)) == []  # w2 is busy with t4
    s(ev.TaskFinished, "w2", "t4", UnitOutcome(-1, True, b"4"), 0.001)  # w2 is free
    s.now += LATE_S / 2
    assert take_backs(s(ev.Tick)) == [ev.TakeBack("n1", "w1", "t3")]


def test_a_task_that_began_before_its_take_back_runs_where_it_is(s: Harness) -> None:
    fast_worker(s)
    s(ev.WorkerReady, "n1", "w2")
    submit(s, "t1", kind="task")
    submit(s, "t2", kind="task")  # on w2
    submit(s, "t3", kind="task")  # queued behind t1
    s(ev.TaskFinished, "w2", "t2", UnitOutcome(-1, True, b"2"), 0.001)  # w2 is free
    s.now += LATE_S
    assert take_backs(s(ev.Tick)) == [ev.TakeBack("n1", "w1", "t3")]
    s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"1"), 0.5)  # t3 begins at once
    assert s(ev.TakeBackAnswered, "w1", "t3", False) == []
    assert s.state.workers["w1"].task_id == "t3" and s.state.tasks["t3"].state == "running"
    assert s.state.workers["w1"].taking_back == ()
    s(ev.TaskFinished, "w1", "t3", UnitOutcome(-1, True, b"3"), 0.001)
    assert s.state.tasks["t3"].state == "done"


def test_a_worker_working_through_its_queue_is_not_late(s: Harness) -> None:
    """Late is measured from when its current task began, not from when it began its queue."""
    fast_worker(s)
    for i in range(1, 6):
        submit(s, f"t{i}", kind="task")  # t1 runs, t2 to t5 queued behind it
    for i in range(1, 4):
        s.now += LATE_S / 2
        s(ev.TaskFinished, "w1", f"t{i}", UnitOutcome(-1, True, b""), LATE_S / 2)
    assert s.state.workers["w1"].task_id == "t4"
    assert take_backs(s(ev.Tick)) == []


def test_a_take_back_answer_nobody_asked_for_changes_nothing(s: Harness) -> None:
    fast_worker(s)
    submit(s, "t1", kind="task")
    submit(s, "t2", kind="task")
    assert s(ev.TakeBackAnswered, "w1", "t2", True) == []
    assert s(ev.TakeBackAnswered, "w9", "t2", True) == []
    assert s.state.workers["w1"].queued == deque(["t2"])
    assert s.state.tasks["t2"].state == "running"


def test_a_lost_worker_counts_a_death_for_its_running_task_only(s: Harness) -> None:
    fast_worker(s)
    submit(s, "t1", kind="task")
    submit(s, "t2", kind="task")
    s(ev.WorkerLost, "w1", "SIGKILL", False)
    assert s.state.tasks["t1"].deaths == {-1: ["SIGKILL"]}
    assert not (s.state.tasks["t2"].deaths or {}).get(-1)
    assert {s.state.tasks[t].state for t in ("t1", "t2")} == {"queued"}
    s(ev.WorkerReady, "n1", "w2")
    s(ev.TaskFinished, "w2", "t1", UnitOutcome(-1, True, b"1"), 0.001)
    assert s.state.workers["w2"].task_id == "t2"


def test_cancelling_a_queued_task_replaces_the_worker_and_requeues_the_running_one(
    s: Harness
) -> None:
    fast_worker(s)
    submit(s, "t1", kind="task")
    submit(s, "t2", kind="task")
    out = s(ev.CancelRequested, "t2")
    # The worker may already have started t2: only a kill is sure to stop it.
    assert ev.KillWorker("n1", "w1", "task t2 cancelled") in out
    assert ev.ReportCancelled("c1", "t2") in out
    t1 = s.state.tasks["t1"]
    assert t1.state == "queued" and not (t1.deaths or {}).get(-1)
    assert "w1" not in s.state.workers


def test_a_failing_task_with_retries_frees_its_worker_for_the_next_queued_one(s: Harness) -> None:
    fast_worker(s)
    s(ev.TaskSubmitted, task_id="t1", client_id="c1", name="Name", kind="task", code=b"code",
      args=b"args", retries=1)
    submit(s, "t2", kind="task")
    assert s.state.workers["w1"].queued == deque(["t2"])
    bad = UnitOutcome(-1, False, b"exc", "builtins.OSError", "flaky", "Traceback")
    out = s(ev.TaskFinished, "w1", "t1", bad)
    assert out[0] == ev.ReleaseWorker("n1", "w1", "t1")
    assert s.state.workers["w1"].task_id == "t2"
    assert ("w1", "t1") in assigned(out)  # t1's retry queues behind t2 on the same worker


# --- sharing: idle workers join, a better task takes helpers as their units end -----------------


def three_workers() -> Harness:
    h = Harness()
    h(ev.NodeJoined, "n1")
    for worker in ("w1", "w2", "w3"):
        h(ev.WorkerReady, "n1", worker)
    return h


def assign(worker: str, task: str, driver: bool) -> ev.Assign:
    return ev.Assign("n1", worker, task, "Name", "parallel", b"code", b"args", driver)


def results(task: str, *indices: int, driver: str = "w1") -> list[ev.Instruction]:
    """What a worker's finished run of plain units makes: forwarded to the driver, recorded."""
    return [ev.ForwardResults("n1", driver, task, [(i, b"res%d" % i) for i in indices]),
            ev.RecordResults(task, [(i, unit_digest(u), b"res%d" % i)
                                    for i, u in zip(indices, units(*indices), strict=True)])]


def test_every_idle_worker_joins_a_task_with_queued_units() -> None:
    s = three_workers()
    assert submit(s) == [assign("w1", "t1", True)]
    assert s(ev.UnitsSliced, "w1", "t1", units(*range(10)), True) == [
        ev.Dispatch("n1", "w1", "t1", 1, units(0)),
        assign("w2", "t1", False), ev.Dispatch("n1", "w2", "t1", 2, units(1)),
        assign("w3", "t1", False), ev.Dispatch("n1", "w3", "t1", 3, units(2)),
    ]
    # 0.8 s units: each worker gets its next unit as it finishes one, and no more
    assert s(ev.UnitsFinished, "w3", "t1", 3, ok(2), 0.8) == [
        *results("t1", 2), ev.Dispatch("n1", "w3", "t1", 4, units(3))]


def test_a_better_task_takes_the_first_helper_whose_unit_ends() -> None:
    s = three_workers()
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(10)), True)
    s(ev.UnitsFinished, "w1", "t1", 1, ok(0), 0.8)  # measured: one unit at a time
    # Every worker busy with t1: t2 waits, and t1's helpers get no more units meanwhile.
    assert submit(s, "t2", priority=1) == []
    assert s.state.tasks["t2"].state == "queued"
    out = s(ev.UnitsFinished, "w2", "t1", 2, ok(1), 0.8)
    assert out == [*results("t1", 1), ev.ReleaseWorker("n1", "w2", "t1"), assign("w2", "t2", True)]
    assert ("worker w2", "helping", "released", "yields to t2") in [e[:4] for e in s.state.story("t1")]
    # t2 slices: it wants more workers, so t1's other helper goes to it when its unit ends ...
    assert s(ev.UnitsSliced, "w2", "t2", units(0, 1, 2), True) == [
        ev.Dispatch("n1", "w2", "t2", 5, units(0))]
    out = s(ev.UnitsFinished, "w3", "t1", 3, ok(2), 0.8)
    assert out == [*results("t1", 2), ev.ReleaseWorker("n1", "w3", "t1"),
                   assign("w3", "t2", False), ev.Dispatch("n1", "w3", "t2", 6, units(1))]
    # ... while t1's driver goes on with t1's units: it is never taken.
    out = s(ev.UnitsFinished, "w1", "t1", 4, ok(3), 0.8)
    assert out == [*results("t1", 3), ev.Dispatch("n1", "w1", "t1", 7, units(4))]
    out = s(ev.UnitsFinished, "w2", "t2", 5, ok(0), 0.8, )
    assert out == [*results("t2", 0, driver="w2"), ev.Dispatch("n1", "w2", "t2", 8, units(2))]
    # Nothing of t2 is queued any more: its idle helper goes back to t1 at once.
    out = s(ev.UnitsFinished, "w3", "t2", 6, ok(1), 0.8)
    assert out == [*results("t2", 1, driver="w2"), ev.ReleaseWorker("n1", "w3", "t2"),
                   assign("w3", "t1", False), ev.Dispatch("n1", "w3", "t1", 9, units(5))]


def test_an_idle_helper_goes_to_its_keys_queued_units_while_another_keys_task_waits() -> None:
    """A task of another key waiting for a worker (none idle, none to evict) must not keep a
    ParallelTask's queued units from a helper of its own key that idles in another task: the
    helper moves to them at once (let go idle, the next pass would replace its process for the
    other key's task; CI's property test found it idling)."""
    s = three_workers()
    submit(s)
    submit(s, "t2")
    s(ev.UnitsSliced, "w1", "t1", units(0, 1), False)  # w1 runs 0, w3 joins for 1
    assert "w3" in s.state.tasks["t1"].workers
    assert submit(s, "t3", client="c2") == []  # another key: every worker busy, it waits
    s(ev.UnitsFinished, "w3", "t1", 2, ok(1), 0.8)  # w3 idles in t1: nothing more sliced yet
    assert s.state.workers["w3"].task_id == "t1" and not s.state.workers["w3"].in_flight
    out = s(ev.UnitsSliced, "w2", "t2", units(0, 1, 2), True)
    assert ev.ReleaseWorker("n1", "w3", "t1") in out
    assert not any(isinstance(i, ev.KillWorker) for i in out)
    assert s.state.workers["w3"].task_id == "t2"
    assert [i.worker_id for i in out if isinstance(i, ev.Dispatch)] == ["w2", "w3"]
    assert s.state.tasks["t3"].state == "queued"
    assert ("worker w3", "helping", "released", "yields to t2") in [
        e[:4] for e in s.state.story("t1")]


def test_a_task_of_the_same_rank_or_below_waits_for_its_turn() -> None:
    s = three_workers()
    submit(s, priority=1)
    s(ev.UnitsSliced, "w1", "t1", units(*range(10)), True)
    submit(s, "t2", priority=1)  # submitted later: ranked below
    submit(s, "t3", priority=0)
    out = s(ev.UnitsFinished, "w2", "t1", 2, ok(1), 0.8)
    assert out == [*results("t1", 1), ev.Dispatch("n1", "w2", "t1", 4, units(3))]


def test_a_helper_holding_a_kept_result_is_not_let_go() -> None:
    s = three_workers()
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", [*units(0), kept(1), *units(*range(2, 10))], True)
    submit(s, "t2", priority=1)
    out = s(ev.UnitsFinished, "w2", "t1", 2, [held(1)], 0.8)  # w2 holds unit 1's result
    assert out == [ev.ForwardResults("n1", "w1", "t1", [], [(1, "w2", "")])]
    out = s(ev.UnitsFinished, "w3", "t1", 3, ok(2), 0.8)
    # w3 goes; once t2 has its driver, nothing better wants w2: it gets t1's next unit
    assert out == [*results("t1", 2), ev.ReleaseWorker("n1", "w3", "t1"), assign("w3", "t2", True),
                   ev.Dispatch("n1", "w2", "t1", 4, units(3))]


def test_a_worker_that_becomes_idle_joins_to_steal_a_run_queued_behind_a_long_one() -> None:
    s = Harness()
    s(ev.NodeJoined, "n1")
    s(ev.WorkerReady, "n1", "w1")
    s(ev.WorkerReady, "n1", "w2")
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(0, 1, 2, 3), True)  # w1: unit 0, w2: unit 1
    # 20 ms units: two in flight a worker; w1 takes 2 and 3, and begins 2 (which will be long).
    out = s(ev.UnitsFinished, "w1", "t1", 1, ok(0), 0.02)
    assert out[2:] == [ev.Dispatch("n1", "w1", "t1", 3, units(2)),
                       ev.Dispatch("n1", "w1", "t1", 4, units(3))]
    # A worker that comes free joins, and asks for the run w1 has not begun.
    out = s(ev.WorkerReady, "n1", "w3")
    assert out == [assign("w3", "t1", False), ev.Steal("n1", "w1", "t1", 4)]
    out = s(ev.StealAnswered, "w1", "t1", 4, True)
    assert out == [ev.Dispatch("n1", "w3", "t1", 5, units(3))]


# --- a node back after the master restarted ---------------------------------------------------


def restored(s: Harness, task_id: str, kind: str = "task", client: str = "c1",
             journaled: tuple[int, ...] = ()) -> None:
    s(ev.TaskSubmitted, task_id=task_id, client_id=client, name="Name", kind=kind, code=b"code",
      args=b"args", journaled=journaled, restored=True)


def test_plain_tasks_a_returning_node_still_runs_are_taken_back_not_assigned_again() -> None:
    s = Harness()
    restored(s, "t1")
    restored(s, "t2")
    s(ev.NodeJoined, "n1")
    # w1 runs t1 with t2 queued behind it (prefetch), as the node reports.
    assert s(ev.WorkerAdopted, "n1", "n1/w1", ("t2", "t1")) == []
    worker = s.state.workers["n1/w1"]
    assert (worker.task_id, list(worker.queued)) == ("t1", ["t2"])
    assert all(s.state.tasks[t].state is ev.TaskStatus.RUNNING for t in ("t1", "t2"))
    assert "taken back" in s.state.story("t1")[-1][3]
    # Their results, held by the node, end them; the worker stays warm for its submitter.
    assert s(ev.TaskFinished, "n1/w1", "t2", UnitOutcome(-1, True, b"2")) == [
        ev.ReportDone("c1", "t2", b"2")]
    assert s(ev.TaskFinished, "n1/w1", "t1", UnitOutcome(-1, True, b"1")) == [
        ev.ReportDone("c1", "t1", b"1")]
    assert (worker.task_id, worker.warm_for) == (None, WarmKey("c1"))


def test_a_worker_whose_work_is_not_waiting_any_more_is_stopped() -> None:
    s = Harness()
    restored(s, "t1")
    restored(s, "p1", kind="parallel")
    restored(s, "t3", client="c2")
    s(ev.NodeJoined, "n1")
    stop = [ev.KillWorker("n1", "n1/w1", "what it runs was queued again while its node was away "
                                         "from the master")]
    assert s(ev.WorkerAdopted, "n1", "n1/w1", ("p1",)) == stop  # a ParallelTask: restarts
    assert s(ev.WorkerAdopted, "n1", "n1/w1", ("t1", "t3")) == stop  # two submitters
    assert s(ev.WorkerAdopted, "n1", "n1/w1", ("gone",)) == stop  # unknown here
    assert "n1/w1" not in s.state.workers
    # t1 runs on w2 now: a report of it from w3 (late) does not take it away.
    s(ev.WorkerReady, "n1", "n1/w2")
    assert s.state.tasks["t1"].driver == "n1/w2"
    assert s(ev.WorkerAdopted, "n1", "n1/w3", ("t1",))[0] == ev.KillWorker(
        "n1", "n1/w3", stop[0].reason)
    # An idle worker that ran code (for whom, the node cannot say) is never taken as clean.
    assert s(ev.WorkerAdopted, "n1", "n1/w4", ())[0].reason.startswith("warm for code")
    # A node not (or no longer) joined reports nothing.
    assert s(ev.WorkerAdopted, "n2", "n2/w1", ("t1",)) == []


def test_units_finished_while_the_master_was_away_are_replayed_to_the_next_driver() -> None:
    s = Harness()
    restored(s, "p1", kind="parallel", journaled=(0,))
    calls = units(0, 1, 2, 3)
    held = ((1, unit_digest(calls[1]), b"r1"), (2, unit_digest(calls[2]), b"r2"),
            (0, unit_digest(calls[0]), b"again"), (1 << 40, 7, b"absurd"))
    out = s(ev.UnitsSalvaged, "p1", held)
    # Kept: 1 and 2; 0 was journaled already; an absurd index is not.
    assert out == [ev.RecordResults("p1", [held[0], held[1]])]
    assert s.state.tasks["p1"].units.done_count == 3
    s(ev.NodeJoined, "n1")
    s(ev.WorkerReady, "n1", "w1")
    out = s(ev.UnitsSliced, "w1", "p1", calls, True)
    assert ev.ReplayResults("n1", "w1", "p1", calls[:3]) in out
    assert [d.units for d in out if isinstance(d, ev.Dispatch)] == [units(3)]
    # Results of units already sliced again are not taken (they run, or ran, here).
    assert s(ev.UnitsSalvaged, "p1", ((3, unit_digest(calls[3]), b"r3"),)) == []


def test_a_queued_plain_task_costs_the_scheduler_under_640_bytes() -> None:
    """10^4 queued plain Tasks (shipped code shared by hash, small arguments, their submitter's
    key): under 640 bytes each, their own ids and arguments included (no empty unit book, story
    list or worker sets; one WarmKey for the key's tasks; the queue's heap and the task share
    one entry; one copy of the name and hash that every submit decodes afresh). Issue 23: a KiB
    on the master."""
    import tracemalloc

    s = SchedulerState()
    code = b"c" * 1400  # one shipped class, the same bytes object for every task (by hash)
    key = "MNnf{m#?}299@/U9(x/f%0DsN[^)xc=jwCCih:@5"  # the submitter's key, one string (the master's Peer.owner)
    ids = [f"Add-{i:012x}" for i in range(10_000)]
    tracemalloc.start()
    try:
        for i, task_id in enumerate(ids):
            # Strings made per task, as decoding each Submit makes them
            name, code_hash = b"tests.Add".decode(), ("h" * 64).encode().decode()
            s.handle(ev.TaskSubmitted(float(i), task_id=task_id, client_id="client-0123456789ab",
                                      name=name, kind="task", code=code,
                                      args=b"\x80\x05\x95%d" % i, code_hash=code_hash,
                                      owner=key))
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(s.tasks) == 10_000 and all(t.state == "queued" for t in s.tasks.values())
    assert used / 10_000 < 640, f"{used / 10_000:.0f} bytes per queued task"


def test_a_story_keeps_its_first_line_and_its_last_ones() -> None:
    """The queued line is kept apart (no list for a task only queued); once the story passes
    STORY_LENGTH the oldest lines after it go."""
    s = Harness()
    submit(s, kind="task")  # no worker: it stays queued
    assert s.state.story("t1") == [("task", "released", "queued", "submitted", s.now)]
    assert s.state.tasks["t1"].lines == ()
    task = s.state.tasks["t1"]
    for n in range(STORY_LENGTH + 5):
        s.state._note(task, f"unit {n}", "a", "b", "c", 10.0 + n)
    story = s.state.story("t1")
    assert len(story) == STORY_LENGTH + 1 and story[0][:4] == ("task", "released", "queued", "submitted")
    assert story[1][0] == "unit 5" and story[-1][0] == f"unit {STORY_LENGTH + 4}"


# --- fair share between clients and keys (fair_share.py) -------------------------------------


def queue_plain(s: Harness, prefix: str, client: str, owner: str, n: int,
                priority: int = 0) -> None:
    for i in range(n):
        s(ev.TaskSubmitted, task_id=f"{prefix}{i}", client_id=client, name="N", kind="task",
          code=b"c", args=b"", owner=owner, priority=priority)


def run_one_at_a_time(s: Harness, pending: list[ev.Instruction], count: int) -> list[str]:
    """One worker runs the queue: each assigned task finishes at once; a worker stopped to make
    room for another key's code is replaced. The order the tasks started in."""
    order: list[str] = []
    fresh = iter(range(100, 100_000))
    while pending and len(order) < count:
        ins = pending.pop(0)
        if isinstance(ins, ev.Assign):
            order.append(ins.task_id)
            pending += s(ev.TaskFinished, ins.worker_id, ins.task_id, UnitOutcome(-1, True, b""))
        elif isinstance(ins, ev.KillWorker):
            pending += s(ev.WorkerLost, ins.worker_id, "stopped", True)
            pending += s(ev.WorkerReady, "n1", f"w{next(fresh)}")
    return order


def test_a_client_queued_behind_another_clients_burst_is_served_in_turn() -> None:
    """Same key: a's 100 tasks, then b's 5; b's go out between a's, not after all of them."""
    s = Harness()
    queue_plain(s, "a", "a", "key1", 100)
    queue_plain(s, "b", "b", "key1", 5)
    s(ev.NodeJoined, "n1")
    order = run_one_at_a_time(s, s(ev.WorkerReady, "n1", "w1"), 105)
    assert sorted(order) == sorted([f"a{i}" for i in range(100)] + [f"b{i}" for i in range(5)])
    assert max(order.index(f"b{i}") for i in range(5)) < 12, order[:12]
    # one key: one warm worker served both clients, never replaced
    assert set(s.state.workers) == {"w1"}


def test_keys_take_turns_of_a_quantum_of_work_and_priority_still_wins() -> None:
    """Key 1 queues 500 tasks, then key 2 queues 5 and key 3 one urgent task: the urgent one
    first; key 2's start after one quantum of key 1's work (not after all 500), together (one
    worker change, not one per task)."""
    s = Harness()
    queue_plain(s, "a", "a", "key1", 500)
    queue_plain(s, "b", "b", "key2", 5)
    s(ev.TaskSubmitted, task_id="urgent", client_id="c", name="N", kind="task", code=b"c",
      args=b"", owner="key3", priority=1)
    s(ev.NodeJoined, "n1")
    order = run_one_at_a_time(s, s(ev.WorkerReady, "n1", "w1"), 506)
    assert order[0] == "urgent"
    first_b = order.index("b0")
    per_quantum = int(QUANTUM_S / DEFAULT_COST_S)
    assert first_b <= 1 + per_quantum, first_b
    assert order[first_b:first_b + 5] == [f"b{i}" for i in range(5)]
    assert len(order) == 506


def test_a_requeued_task_keeps_its_place_in_the_fair_order() -> None:
    s = Harness()
    s(ev.NodeJoined, "n1")
    s(ev.WorkerReady, "n1", "w1")
    for i in range(3):
        s(ev.TaskSubmitted, task_id=f"a{i}", client_id="a", name="N", kind="task", code=b"c",
          args=b"")
    place = s.state.tasks["a0"].fair
    assert s.state.tasks["a0"].state == "running"
    s(ev.WorkerLost, "w1", "SIGKILL", False)  # a0 goes back to the queue
    assert s.state.tasks["a0"].fair == place
    assert assigned(s(ev.WorkerReady, "n1", "w2"))[0] == ("w2", "a0")


def test_a_client_arriving_late_starts_at_the_present_not_with_credit_for_its_absence() -> None:
    """a's 100 tasks, 60 of them run; then b queues 100: they take turns with a's last 40 (b
    starts at the queue's virtual time, not at zero, which would run all of b's first)."""
    s = Harness()
    queue_plain(s, "a", "a", "key1", 100)
    s(ev.NodeJoined, "n1")
    pending = s(ev.WorkerReady, "n1", "w1")
    first = run_one_at_a_time(s, pending, 60)
    assert first == [f"a{i}" for i in range(60)]
    [last] = [i for i in pending if isinstance(i, ev.Assign)]  # a60, assigned as a59 ended
    queue_plain(s, "b", "b", "key1", 100)
    order = run_one_at_a_time(s, [last], 141)
    assert order.index("a99") < 100, order.index("a99")  # not behind all 100 of b's


def test_a_plain_units_large_result_held_on_its_worker_is_computed_again_if_that_worker_is_lost(
) -> None:
    """A plain unit whose result was too large to go inline is held like a keep unit: the
    driver learns where, the journal gets nothing, and losing its holder runs it again."""
    s = two_workers()
    submit(s)
    out = s(ev.UnitsSliced, "w1", "t1", units(*range(12)), True)
    [on_w2] = [d for d in dispatches(out) if d.worker_id == "w2"]
    index = on_w2.units[0].index
    rest = [UnitOutcome(u.index, True, b"small") for u in on_w2.units[1:]]
    out = s(ev.UnitsFinished, "w2", "t1", on_w2.run_id,
            [UnitOutcome(index, True, b"", held=True, size=5_000_000), *rest], 0.01)
    assert [i for i in out if isinstance(i, ev.ForwardResults)] == [ev.ForwardResults(
        "n1", "w1", "t1", [(u.index, b"small") for u in on_w2.units[1:]],
        [(index, "w2", "tcp://n2")], {index: 5_000_000})]  # the driver learns its size too
    [record] = [i for i in out if isinstance(i, ev.RecordResults)]
    assert index not in [i for i, _, _ in record.results], "a held result was journaled"
    units_of = s.state.tasks["t1"].units
    assert units_of.held == {index: "w2"} and index in units_of.kept
    out = s(ev.WorkerLost, "w2", "killed", False)
    assert index in units_of.open_units and index not in units_of.held
    assert any(index in [u.index for u in d.units] for d in dispatches(out)) or any(
        u.index == index for u in units_of.pending), "the lost result is not queued again"


def paused_helper() -> Harness:
    """w1 drives a 40-unit task, w2 helps with two runs (one running, one queued), then pauses."""
    s = two_workers()
    submit(s)
    s(ev.UnitsSliced, "w1", "t1", units(*range(40)), True)
    assert len(set(s.state.workers["w2"].in_flight.values())) == 2
    out = s(ev.WorkerPaused, "w2", True, "resident 900 MiB, pause mark 800 MiB")
    assert s.state.workers["w2"].paused and dispatches(out) == []
    assert ("worker w2", "running", "paused", "resident 900 MiB, pause mark 800 MiB") in [
        e[:4] for e in s.state.story("t1")]
    return s


def finish_run(s: Harness, worker: str, run_id: int) -> list[ev.Instruction]:
    done = [i for i, r in s.state.workers[worker].in_flight.items() if r == run_id]
    return s(ev.UnitsFinished, worker, "t1", run_id, ok(*done), 0.001)


def test_a_paused_worker_gets_no_new_runs_and_resumes() -> None:
    s = paused_helper()
    out = finish_run(s, "w2", min(s.state.workers["w2"].in_flight.values()))
    assert "w2" not in [d.worker_id for d in dispatches(out)], "a paused worker got a run"
    out = s(ev.WorkerPaused, "w2", False, "resident 100 MiB")
    assert not s.state.workers["w2"].paused and not s.state.paused
    assert ("worker w2", "paused", "running", "resident 100 MiB") in [
        e[:4] for e in s.state.story("t1")]


def test_a_paused_workers_queued_run_is_stolen_for_an_idle_peer() -> None:
    s = paused_helper()
    steals: list[ev.Steal] = []
    for _ in range(100):  # w1 does all the rest; then w2's queued run is asked back for it
        runs = sorted(set(s.state.workers["w1"].in_flight.values()))
        if not runs:
            break
        out = finish_run(s, "w1", runs[0])
        assert "w2" not in [d.worker_id for d in dispatches(out)], "a paused worker got a run"
        steals += [i for i in out if isinstance(i, ev.Steal)]
    assert [st.worker_id for st in steals] == ["w2"], steals


def test_a_paused_worker_whose_task_ended_is_replaced() -> None:
    s = Harness()
    s(ev.NodeJoined, "n1")
    s(ev.WorkerReady, "n1", "w1")
    submit(s, kind="task")
    s(ev.WorkerPaused, "w1", True, "leaked")
    out = s(ev.TaskFinished, "w1", "t1", UnitOutcome(-1, True, b"49"))
    assert ev.KillWorker("n1", "w1", "idle, and still past its memory's pause mark") in out
    assert "w1" not in s.state.workers and not s.state.paused
    submit(s, "t2", kind="task")  # the next task waits for the replacement, not for w1
    assert [i for i in s(ev.WorkerReady, "n1", "w2") if isinstance(i, ev.Assign)][0].worker_id == "w2"


def test_a_paused_helper_let_go_for_another_task_leaves_no_trace_among_the_paused() -> None:
    """A paused helper with no run left is let go for a plain Task of its key, and, paused, is
    replaced rather than given it: found by the stateful machine (the replaced worker stayed
    among the paused, a state validate() refuses)."""
    s = paused_helper()
    for run_id in sorted(set(s.state.workers["w2"].in_flight.values())):
        finish_run(s, "w2", run_id)
    assert not s.state.workers["w2"].in_flight and s.state.workers["w2"].task_id == "t1"
    out = submit(s, "t2", kind="task")
    assert any(isinstance(i, ev.KillWorker) and i.worker_id == "w2" for i in out)
    assert "w2" not in s.state.workers and not s.state.paused
    s.state.validate()


# --- tasks whose arguments are other tasks' futures (inputs) ----------------------------


def submit_with_inputs(s: Harness, task_id: str, *inputs: str) -> list[ev.Instruction]:
    return s(ev.TaskSubmitted, task_id=task_id, client_id="c1", name="Name", kind="task",
             code=b"code", args=b"args", inputs=inputs)


def test_a_task_waits_for_its_inputs_then_runs_with_them(s: Harness) -> None:
    submit(s, "a", kind="task")  # on w1
    assert submit_with_inputs(s, "b", "a") == []
    assert s.state.tasks["b"].state == "queued" and s.state.tasks["b"].inputs_left == {"a"}
    out = s(ev.TaskFinished, "w1", "a", UnitOutcome(-1, True, b"ra"))
    assert out == [ev.ReportDone("c1", "a", b"ra"),
                   ev.Assign("n1", "w1", "b", "Name", "task", b"code", b"args", True,
                             inputs=("a",))]
    assert ("task", "queued", "waiting") in [e[:3] for e in s.state.story("b")]
    assert ("task", "waiting", "queued") in [e[:3] for e in s.state.story("b")]
    assert not s.state.dependents


def test_a_failed_or_cancelled_input_fails_its_dependents_down_the_chain(s: Harness) -> None:
    submit(s, "a", kind="task")
    submit_with_inputs(s, "b", "a")
    submit_with_inputs(s, "c", "b", "a")
    out = s(ev.TaskFinished, "w1", "a", UnitOutcome(-1, False, b"exc", "builtins.ValueError", "no"))
    assert ev.ReportInputFailed("c1", "b", "a", "erred") in out
    assert ev.ReportInputFailed("c1", "c", "a", "erred") in out or \
        ev.ReportInputFailed("c1", "c", "b", "erred") in out
    assert {s.state.tasks[t].state for t in "bc"} == {"erred"}
    # Submitted after its input failed: it fails at once.
    assert submit_with_inputs(s, "d", "a")[-1] == ev.ReportInputFailed("c1", "d", "a", "erred")
    submit(s, "e", kind="task")
    submit_with_inputs(s, "f", "e")
    out = s(ev.CancelRequested, "e")
    assert ev.ReportInputFailed("c1", "f", "e", "cancelled") in out
    assert not s.state.dependents


def test_a_waiting_task_cancelled_is_not_run_when_its_inputs_are_done(s: Harness) -> None:
    submit(s, "a", kind="task")
    submit_with_inputs(s, "b", "a")
    assert s(ev.CancelRequested, "b") == [ev.ReportCancelled("c1", "b")]
    out = s(ev.TaskFinished, "w1", "a", UnitOutcome(-1, True, b"ra"))
    assert out == [ev.ReportDone("c1", "a", b"ra")]


def test_inputs_already_done_or_unknown_here_do_not_hold_a_task(s: Harness) -> None:
    submit(s, "a", kind="task")
    s(ev.TaskFinished, "w1", "a", UnitOutcome(-1, True, b"ra"))
    out = submit_with_inputs(s, "b", "a", "forgotten-long-ago")
    assert out == [ev.Assign("n1", "w1", "b", "Name", "task", b"code", b"args", True,
                             inputs=("a", "forgotten-long-ago"))]


def test_detached_tasks_and_the_inputs_they_wait_for_outlive_their_client(s: Harness) -> None:
    submit(s, "a", kind="task")  # running on w1
    submit_with_inputs(s, "b", "a")  # waits for a
    submit(s, "c", kind="task")  # queued: not detached
    s(ev.TasksDetached, "c1", ("b",))
    assert s.state.tasks["a"].detached and s.state.tasks["b"].detached
    s(ev.TasksDetached, "someone-else", ("c",))  # only a task's own client detaches it
    out = s(ev.ClientLeft, "c1")
    assert out == [ev.ReportCancelled("c1", "c")]
    out = s(ev.TaskFinished, "w1", "a", UnitOutcome(-1, True, b"ra"))
    assert out[-1] == ev.Assign("n1", "w1", "b", "Name", "task", b"code", b"args", True,
                                inputs=("a",))


@pytest.mark.parametrize("sliced_first", [False, True])
def test_a_lost_drivers_helper_hands_its_results_to_the_next_driver_exactly_once(
        s: Harness, sliced_first: bool) -> None:
    """The next driver gets the runs a draining helper finishes: by replay if they finish
    before it sliced them, forwarded if after: never both, never neither."""
    submit(s)
    s(ev.WorkerReady, "n1", "w2")
    s(ev.UnitsSliced, "w1", "t1", units(*range(12)), False)
    flying = dict(s.state.workers["w2"].in_flight)
    s(ev.WorkerLost, "w1", "exit 1", False)
    assert s(ev.WorkerReady, "n1", "w3")[0].worker_id == "w3"  # the next driver, at once
    (run,) = set(flying.values())
    delivered: list[int] = []
    if sliced_first:
        out = s(ev.UnitsSliced, "w3", "t1", units(*range(12)), True)
        assert not [i for i in out if isinstance(i, ev.ReplayResults)]
    out = s(ev.UnitsFinished, "w2", "t1", run, ok(*flying), 0.01)
    delivered += [i for f in out if isinstance(f, ev.ForwardResults) for i, _ in f.results]
    if not sliced_first:
        out = s(ev.UnitsSliced, "w3", "t1", units(*range(12)), True)
        delivered += [u.index for r in out if isinstance(r, ev.ReplayResults) for u in r.units]
    assert sorted(delivered) == sorted(flying)


def test_finished_tasks_packed_and_unpacked_are_the_same_tasks_in_the_same_order() -> None:
    """What the master does once a backlog drained (to move what outlives it into fresh
    memory): every task, finished or not, comes back equal, in submission order, the shared
    empties still the very objects the code compares against, and the scheduler serves on."""
    from actors.core.scheduler_state import NO_WORKERS
    from actors.core.unit_book import NO_UNITS

    s = two_workers()
    for n in range(6):
        submit(s, f"t{n}", client=f"c{n % 2}", kind="task")
        worker = next(w for w, r in s.state.workers.items() if r.task_id == f"t{n}")
        s(ev.TaskFinished, worker, f"t{n}", UnitOutcome(-1, True, b"r"), 0.001)
    submit(s, "p", kind="parallel")  # running: stays as it is
    submit(s, "q", kind="parallel")  # queued behind it
    before = {t: (r.state, r.client_id, r.name, r.owner, r.warm_key, set(r.seen_workers),
                  list(r.story), r.args, r.code) for t, r in s.state.tasks.items()}
    running = s.state.tasks["p"]
    finished = list(s.state._finished)

    blob = s.state.pack_finished()
    assert set(s.state.tasks) == {"p", "q"}
    s.state.unpack_finished(blob)

    after = {t: (r.state, r.client_id, r.name, r.owner, r.warm_key, set(r.seen_workers),
                 list(r.story), r.args, r.code) for t, r in s.state.tasks.items()}
    assert list(after) == list(before) and after == before
    assert list(s.state._finished) == finished
    assert s.state.tasks["p"] is running
    done = s.state.tasks["t0"]  # a finished plain Task: the shared empties
    assert done.units is NO_UNITS and done.workers is NO_WORKERS
    assert s.state.story("t0") == before["t0"][6]
    s.state.validate()
    submit(s, "t9", kind="task")  # and it serves on: queued behind the ParallelTasks
    assert s.state.tasks["t9"].state == "queued"


# --- a burst of events in one call (handle_many) ----------------------------------------


def submitted(task_id: str, now: float, kind: str = "task") -> ev.TaskSubmitted:
    return ev.TaskSubmitted(now, task_id=task_id, client_id="c1", name="Name", kind=kind,
                            code=b"code", args=b"args")


def test_a_burst_handled_in_one_call_leaves_what_one_call_each_would() -> None:
    one_each, burst = SchedulerState(), SchedulerState()
    events = [submitted(f"t{i}", 1.0 + i) for i in range(5)]
    for event in events:
        one_each.handle(event, schedule=False)
    out, failed = burst.handle_many(events)
    assert (out, failed) == ([], [])
    for state in (one_each, burst):
        state.validate()
    assert {t: (r.state, r.seq) for t, r in burst.tasks.items()} == \
        {t: (r.state, r.seq) for t, r in one_each.tasks.items()}
    assert burst.queued == one_each.queued and sorted(burst._queue) == sorted(one_each._queue)
    # The pass waited for the next event that has one.
    burst.handle(ev.NodeJoined(7.0, "n1"))
    assigned = burst.handle(ev.WorkerReady(8.0, "n1", "w1"))
    assert [a.task_id for a in assigned if isinstance(a, ev.Assign)] == ["t0"]


def test_an_event_of_a_burst_that_is_refused_or_raises_is_dropped_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    state = SchedulerState()
    enqueue = state._enqueue

    def enqueue_or_raise(task: object) -> None:
        if getattr(task, "task_id", "") == "raises":  # after its record and counts were made
            raise RuntimeError("a bug")
        enqueue(task)  # type: ignore[arg-type]

    monkeypatch.setattr(state, "_enqueue", enqueue_or_raise)
    events = [submitted("t1", 1.0), submitted("refused", 2.0, kind="bogus"),
              submitted("raises", 3.0), submitted("t2", 4.0)]
    out, failed = state.handle_many(events)
    assert [(i, type(exc).__name__) for i, exc in failed] == [
        (1, "InvalidEvent"), (2, "RuntimeError")]
    assert sorted(state.tasks) == ["t1", "t2"]
    assert state.queued == {("c1", 0): 2} and state.args_bytes == {"c1": 2 * len(b"args")}
    assert len(state._undo) == 0
    state.validate()


def test_a_finished_task_forgotten_by_an_event_that_raises_is_kept(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``FINISHED_KEPT`` a task's end forgets the oldest finished one: undone with the rest
    of the event if it raises later."""
    import actors.core.scheduler_state as core

    monkeypatch.setattr(core, "FINISHED_KEPT", 2)
    h = Harness()
    h(ev.NodeJoined, "n1")
    h(ev.WorkerReady, "n1", "w1")
    for i in range(3):
        submit(h, f"t{i}", kind="task")
        h(ev.TaskFinished, "w1", f"t{i}", UnitOutcome(-1, True, b"r"))
    assert "t0" not in h.state.tasks and list(h.state._finished) == ["t1", "t2"]
    submit(h, "t3", kind="task")
    before = (dict(h.state.tasks), list(h.state._finished))

    def broken(now: float) -> None:
        raise RuntimeError("a bug after the task's end")

    monkeypatch.setattr(h.state, "_schedule", broken)
    with pytest.raises(RuntimeError):
        h(ev.TaskFinished, "w1", "t3", UnitOutcome(-1, True, b"r"))
    assert (dict(h.state.tasks), list(h.state._finished)) == before
    assert h.state.tasks["t3"].state == "running"
