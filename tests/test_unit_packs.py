"""Tiny units travel in packs (``UnitCall.count``): the master measures a task's units, tells its
driver how many to pack together, and from then on a pack is one unit to the master, the wire
and the pickler, and its units again to the worker's loop and the driver's ``reduce``.

The core, the driver's Runtime and the worker's run loop are fed directly; a real cluster runs
a task of tiny units end to end."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pytest

from actors import Client, LocalCluster, ParallelTask, Unit
from actors import messages as m
from actors.core import scheduler_events as ev
from actors.core.scheduler_state import PACK_SECONDS
from actors.errors import InvalidEvent
from actors.messages import MAX_PACK, UnitCall, UnitOutcome
from actors.serialize import dumps, loads
from actors.task import StopFlag
from actors.task_host import (
    PACK_BYTES,
    Begin,
    Finished,
    Runtime,
    UnitResults,
    begin_instance,
)
from actors.unit_runner import Ran, _execute_run
from tests.conftest import shown
from tests.test_scheduler_state import Harness, submit

# --- the master's core ----------------------------------------------------------


@pytest.fixture
def s() -> Harness:
    h = Harness(batched=True)
    h(ev.NodeJoined, "n1")
    h(ev.WorkerReady, "n1", "w1")
    submit(h)
    return h


def pack(first: int, count: int) -> UnitCall:
    return UnitCall(first, pickle.dumps(list(range(first, first + count))), count=count)


def test_a_pack_is_one_unit_to_the_scheduler_and_its_units_to_progress_and_journal(
        s: Harness) -> None:
    out = s(ev.UnitsSliced, "w1", "t1", [pack(0, 8), pack(8, 8), UnitCall(16, b"a")], True)
    [run] = [i for i in out if isinstance(i, ev.Dispatch)]
    assert [(u.index, u.count) for u in run.units] == [(0, 8), (8, 8), (16, 0)]
    assert s.state.tasks["t1"].units.open_count() == 17  # each unit of the open packs
    out = s(ev.UnitsFinished, "w1", "t1", run.run_id,
            [UnitOutcome(0, True, b"r0", count=8), UnitOutcome(8, True, b"r8", count=8)], 1.0)
    [record] = [i for i in out if isinstance(i, ev.RecordResults)]
    assert [index for index, _, _ in record.results] == [0, 8]  # an entry a pack
    assert record.packs == {0: 8, 8: 8}  # (the journal writes each a row that says its units)
    book = s.state.tasks["t1"].units
    assert book.done_count == 16 and book.journaled_count == 16
    assert all(book.is_journaled(i) for i in range(16)) and not book.is_journaled(16)
    assert book.open_count() == 1
    progress = [i for i in s(ev.Tick) if isinstance(i, ev.ReportProgress)]
    assert [(p.done, p.total) for p in progress] == [(16, 17)]


@pytest.mark.parametrize(("seconds_a_unit", "told"), [
    (1e-6, MAX_PACK),  # no-op units: the most a pack holds
    (PACK_SECONDS / 3, 2),  # three fit a pack's time: a power of two, rounded down
    (PACK_SECONDS, 0),  # as long as a pack's time: not packed (nothing told, 1 already)
])
def test_the_driver_is_told_the_pack_its_measured_units_want(
        s: Harness, seconds_a_unit: float, told: int) -> None:
    out = s(ev.UnitsSliced, "w1", "t1", [UnitCall(i, b"a") for i in range(4)], False)
    [run] = [i for i in out if isinstance(i, ev.Dispatch)]
    out = s(ev.UnitsFinished, "w1", "t1", run.run_id,
            [UnitOutcome(u.index, True, b"r") for u in run.units], 4 * seconds_a_unit)
    [forward] = [i for i in out if isinstance(i, ev.ForwardResults)]
    assert forward.pack == told and forward.worker_id == "w1"
    story = [line for line in s.state.story("t1") if line[0] == "units"]
    assert bool(story) == bool(told)
    if told:
        assert f"{told} a pack from now on" in story[-1][3]
        # The same measure again tells nothing new.
        out = s(ev.UnitsSliced, "w1", "t1", [UnitCall(i, b"a") for i in range(4, 8)], True)
        run = next(i for i in out if isinstance(i, ev.Dispatch))
        out = s(ev.UnitsFinished, "w1", "t1", run.run_id,
                [UnitOutcome(u.index, True, b"r") for u in run.units],
                len(run.units) * seconds_a_unit)
        assert [i.pack for i in out if isinstance(i, ev.ForwardResults)] == [0]


def test_a_pack_holds_no_more_units_than_keep_its_results_inline(s: Harness) -> None:
    out = s(ev.UnitsSliced, "w1", "t1", [UnitCall(i, b"a") for i in range(4)], False)
    [run] = [i for i in out if isinstance(i, ev.Dispatch)]
    out = s(ev.UnitsFinished, "w1", "t1", run.run_id,
            [UnitOutcome(u.index, True, b"x" * 4000) for u in run.units], 4e-6)
    # 1 us a unit would make 512 a pack; 4,000 bytes a result, 2 MB of results: 64 stay inline.
    assert [i.pack for i in out if isinstance(i, ev.ForwardResults)] == [64]
    assert 64 * 4000 <= m.INLINE_RESULT_BYTES < 128 * 4000


@pytest.mark.parametrize("bad", [
    UnitCall(0, b"a", count=MAX_PACK + 1),
    UnitCall(0, b"a", count=-1),
    UnitCall(1, b"a", deps=(0,), count=2),
    UnitCall(0, b"a", keep=True, count=2),
])
def test_a_pack_a_driver_could_not_have_made_is_refused_and_changes_nothing(
        s: Harness, bad: UnitCall) -> None:
    with pytest.raises(InvalidEvent, match="pack"):
        s(ev.UnitsSliced, "w1", "t1", [UnitCall(0, b"a"), bad], False)
    assert s.state.tasks["t1"].units.open_units == {}


def test_a_unit_past_those_sliced_is_refused_and_changes_nothing(s: Harness) -> None:
    """A slicer numbers its units in order: a unit far past them (a worker's word) would have
    sized the task's bitmap of journaled units to it (2**34: 2 GiB) once it finished."""
    s(ev.UnitsSliced, "w1", "t1", [pack(0, 8), UnitCall(8, b"a")], False)
    with pytest.raises(InvalidEvent, match="sliced in order"):
        s(ev.UnitsSliced, "w1", "t1", [UnitCall(9, b"b"), UnitCall(2**34, b"c")], False)
    book = s.state.tasks["t1"].units
    assert sorted(book.open_units) == [0, 8] and book.sliced_end == 9
    s(ev.UnitsSliced, "w1", "t1", [UnitCall(0, b"a"), UnitCall(9, b"b")], False)  # (a re-slice)
    assert book.sliced_end == 10
    with pytest.raises(InvalidEvent, match="no unit 12345 of t1"):
        s(ev.UnitMissing, "w1", "t1", 12345)
    assert book.missing_for == {}


def test_a_stale_drivers_units_are_dropped_not_refused(s: Harness) -> None:
    """Units from a worker that is not (or no longer) the task's driver are dropped as before:
    the order of its slicing is not checked against the current driver's, nor counted as a
    refusal against it."""
    s(ev.NodeJoined, "n2")
    s(ev.WorkerReady, "n2", "w2")
    assert s(ev.UnitsSliced, "w2", "t1", [UnitCall(5_000, b"a")], False) == []
    assert s.state.tasks["t1"].units.sliced_end == 0


@pytest.mark.parametrize("elapsed", [float("inf"), float("nan"), -1.0, 1e12])
def test_a_time_that_is_no_time_is_refused_and_changes_nothing(s: Harness, elapsed: float) -> None:
    """What a worker says a run or a Task took is averaged into the times that size packs,
    runs and fair shares: one infinite time made every later submit of its key raise."""
    out = s(ev.UnitsSliced, "w1", "t1", [UnitCall(0, b"a")], True)
    [run] = [i for i in out if isinstance(i, ev.Dispatch)]
    with pytest.raises(InvalidEvent, match="elapsed"):
        s(ev.UnitsFinished, "w1", "t1", run.run_id, [UnitOutcome(0, True, b"r")], elapsed)
    assert s.state.tasks["t1"].units.unit_seconds is None
    submit(s, "t2", kind="task")
    with pytest.raises(InvalidEvent, match="elapsed"):
        s(ev.TaskFinished, "w1", "t2", UnitOutcome(-1, True, b"r"), elapsed)
    assert not s.state.task_seconds


def test_units_measured_at_a_few_nanoseconds_are_packed_as_many_as_may_be(s: Harness) -> None:
    out = s(ev.UnitsSliced, "w1", "t1", [UnitCall(0, b"a")], False)
    [run] = [i for i in out if isinstance(i, ev.Dispatch)]
    out = s(ev.UnitsFinished, "w1", "t1", run.run_id, [UnitOutcome(0, True, b"r")], 5e-324)
    assert s.state.tasks["t1"].units.pack == MAX_PACK


@pytest.mark.parametrize(("named", "reported"), [(21, "21"), (99, "16"), (-1, "16")])
def test_a_failing_pack_names_the_unit_that_raised_if_it_is_in_the_pack(
        s: Harness, named: int, reported: str) -> None:
    out = s(ev.UnitsSliced, "w1", "t1", [pack(0, 16), pack(16, 8)], True)
    [run] = [i for i in out if isinstance(i, ev.Dispatch)]
    assert [(u.index, u.count) for u in run.units] == [(0, 16), (16, 8)]
    good = UnitOutcome(0, True, b"r0", count=16)
    bad = UnitOutcome(16, False, b"exc", "builtins.KeyError", "'x'", "tb", count=8, unit=named)
    out = s(ev.UnitsFinished, "w1", "t1", run.run_id, [good, bad], 0.01)
    assert [i.unit for i in out if isinstance(i, ev.ReportErred)] == [reported]


def test_a_pack_not_replayed_unmarks_its_units(s: Harness) -> None:
    out = s(ev.UnitsSliced, "w1", "t1", [pack(0, 8)], False)
    [run] = [i for i in out if isinstance(i, ev.Dispatch)]
    s(ev.UnitsFinished, "w1", "t1", run.run_id, [UnitOutcome(0, True, b"r", count=8)], 0.01)
    book = s.state.tasks["t1"].units
    assert book.done_count == 8
    out = s(ev.UnitsNotReplayed, "w1", "t1", [pack(0, 8)])
    assert book.done_count == 0 and book.journaled_count == 0
    assert [u.index for i in out if isinstance(i, ev.Dispatch) for u in i.units] == [0]


def test_a_replayed_pack_counts_all_its_units_and_a_failed_replay_uncounts_them() -> None:
    """A master restarted on a journal of before packs had rows of their own, or a pack a worker
    salvaged while the master was away: only the pack's first unit is known journaled. Replayed
    to the task's next driver, the pack counts its every unit; not replayed, none of them."""
    s = Harness(batched=True)
    s(ev.NodeJoined, "n1")
    s(ev.WorkerReady, "n1", "w1")
    s(ev.TaskSubmitted, task_id="t1", client_id="c1", name="Name", kind="parallel",
      code=b"code", args=b"args", journaled=(0, 8), restored=True)
    book = s.state.tasks["t1"].units
    assert book.done_count == 2
    out = s(ev.UnitsSliced, "w1", "t1", [pack(0, 8), pack(8, 8), pack(16, 8)], True)
    [replay] = [i for i in out if isinstance(i, ev.ReplayResults)]
    assert [u.index for u in replay.units] == [0, 8]
    assert book.done_count == 16 and book.journaled_count == 16
    assert [(p.done, p.total) for p in s(ev.Tick) if isinstance(p, ev.ReportProgress)] == [
        (16, 24)]
    s(ev.UnitsNotReplayed, "w1", "t1", [pack(8, 8)])  # its arguments changed meanwhile
    assert book.done_count == 8 and not any(book.is_journaled(i) for i in range(8, 16))


# --- the driver ------------------------------------------------------------------


class Squares(ParallelTask):
    def get_work(self, n: int, every: int = 0) -> Any:
        for i in range(n):
            yield Unit(i) if every and i % every == every - 1 else i

    def work_unit(self, i: int) -> int:
        return i * i

    def reduce(self, results: list[int]) -> list[int]:
        return results


def driver(n: int, every: int = 0) -> tuple[Runtime, list[Any]]:
    sent: list[Any] = []
    runtime = begin_instance(Squares(), Begin("t1", (n, every), {}, True, sent.append,
                                              sent.append), sent.append)
    return runtime, sent


def calls(sent: list[Any]) -> list[UnitCall]:
    return [unit for msg in sent if isinstance(msg, m.UnitsSliced) for unit in msg.units]


def test_a_driver_told_to_pack_packs_plain_units_between_multiples_of_the_pack() -> None:
    runtime, sent = driver(40_000, every=1000)
    first = calls(sent)
    assert {u.count for u in first} == {0}  # nothing told yet: a unit a call
    runtime.handle(UnitResults([(u.index, dumps(u.index ** 2)) for u in first], pack=300))
    assert runtime.pack == 256  # (a power of two)
    packed = calls(sent)[len(first):]
    plain = [u for u in packed if not u.keep]
    assert max(u.count for u in plain) == 256
    # Full packs but where a Unit splits one in two.
    assert len(plain) <= -(-sum(u.count for u in plain) // 256) + len(packed) - len(plain)
    for unit in plain:  # within a multiple of 256 and the next, never across a Unit
        last = unit.index + max(unit.count, 1) - 1
        assert unit.index // 256 == last // 256
        assert not any(k % 1000 == 999 for k in range(unit.index, last + 1))
        if unit.count:
            assert loads(unit.args) == list(range(unit.index, last + 1))
    # Every unit sliced once, in order.
    covered = [k for u in calls(sent) for k in range(u.index, u.index + max(u.count, 1))]
    assert covered == list(range(len(covered)))


class Wide(Squares):
    def get_work(self, n: int, every: int = 0) -> Any:
        for _ in range(n):
            yield bytes(10_000)  # tiny to run, large to send


def test_a_driver_packs_units_with_large_arguments_in_fewer_a_pack() -> None:
    sent: list[Any] = []
    runtime = begin_instance(Wide(), Begin("t1", (40_000,), {}, True, sent.append,
                                           sent.append), sent.append)
    first = calls(sent)
    runtime.handle(UnitResults([(u.index, dumps(0)) for u in first], pack=512))
    packed = [u for u in calls(sent)[len(first):] if u.count]
    # 256 KiB of arguments a pack at the most (PACK_BYTES): 16 of 10 kB, not 512.
    assert packed and max(u.count for u in packed) == 16  # (fewer where a message began)
    assert max(len(u.args) for u in packed) <= PACK_BYTES


def test_reduce_gets_the_units_of_packs_in_order_and_a_short_pack_fails_the_task() -> None:
    def run(lie: bool) -> Any:
        runtime, sent = driver(20_000)
        runtime.handle(UnitResults([], pack=64))
        got: list[Any] = []
        runtime.tell = got.append
        while not runtime.exhausted or runtime._finished < runtime.sliced:
            for unit in calls(sent):
                if unit.index in runtime.results:
                    continue
                args = loads(unit.args) if unit.count else [loads(unit.args)]
                values = [a * a for a in args][: -1 if lie and unit.count else None]
                data = dumps(values if unit.count else values[0])
                runtime.handle(UnitResults([(unit.index, data)]))
        return _reduced(got)

    outcome = run(lie=False)
    assert outcome.ok and loads(outcome.value) == [i * i for i in range(20_000)]
    outcome = run(lie=True)
    assert not outcome.ok and outcome.type_name == "builtins.TypeError"
    assert "a pack of 64: their results came back as 63 results" in outcome.message


def _reduced(told: list[Any]) -> UnitOutcome:
    """Run what the Runtime queued for the executor (its reduce) here, and its outcome."""
    deadline = threading.Event()
    for _ in range(200):
        done = [msg for msg in told if isinstance(msg, Finished)]
        if done:
            return done[0].outcome
        deadline.wait(0.05)
    raise AssertionError(f"reduce did not finish: {told}")


# --- the worker's run loop -----------------------------------------------------


class Picky(Squares):
    bad, unpicklable = 13, 21

    def work_unit(self, i: int) -> Any:
        if i == self.bad:
            raise ValueError(f"unit argument {i}")
        return threading.Lock() if i == self.unpicklable else i * i


class PickyLate(Picky):
    bad, unpicklable = 90_013, -1  # past the first look-ahead: in a pack


def ran(units: list[UnitCall]) -> Ran:
    told: list[Any] = []
    _execute_run(Picky(), "t1:run1", tuple(units), "t1", {}, told.append)
    [result] = told
    assert isinstance(result, Ran)
    return result


def test_a_worker_runs_a_pack_unit_by_unit_into_one_result() -> None:
    result = ran([pack(0, 8), UnitCall(8, dumps(8))])
    first, single = result.outcomes
    assert (first.index, first.count, first.ok) == (0, 8, True)
    assert loads(first.value) == [i * i for i in range(8)]
    assert first.digest == m.unit_digest(pack(0, 8))
    assert loads(single.value) == 64 and single.count == 0


@pytest.mark.parametrize(("first", "unit", "kind"), [
    (8, 13, "builtins.ValueError"),  # raised in work_unit
    (16, 21, "actors.errors.ResultNotSerializable"),  # a result that cannot travel
])
def test_a_failing_unit_of_a_pack_is_named_and_ends_the_run(first: int, unit: int,
                                                           kind: str) -> None:
    result = ran([pack(first, 8), pack(first + 8, 8)])
    [failed] = result.outcomes  # the run stops at the failure
    assert (failed.ok, failed.index, failed.unit, failed.type_name) == (False, first, unit, kind)
    assert str(unit) in failed.message


# --- end to end ------------------------------------------------------------------


@pytest.mark.processes
def test_a_task_of_tiny_units_is_packed_and_reduces_every_result_in_order() -> None:
    with LocalCluster(workers=2, log_level="warning") as cluster, Client(cluster) as client:
        future = client.submit(Squares, 200_000, every=50_000)
        assert future.result(timeout=120) == [i * i for i in range(200_000)]
        packed = [line for line in future.story() if line[0] == "units"]
        assert packed and "a pack from now on" in packed[0][3]
        failing = client.submit(PickyLate, 100_000)
        with pytest.raises(ValueError, match="unit argument 90013") as raised:
            failing.result(timeout=120)
        assert "unit 90013" in shown(raised.value)  # the remote traceback's unit, not its pack's


def test_a_driver_whose_first_units_are_all_out_is_told_to_go_on_while_a_worker_has_none() -> None:
    """Before a unit is measured, a worker gets one; the driver slices its first few only
    (FIRST_LOOKAHEAD) until it hears from the master. More workers than those: the driver is
    told to go on at once, not after the first unit's whole run."""
    h = Harness()
    h(ev.NodeJoined, "n1")
    for worker in ("w1", "w2", "w3"):
        h(ev.WorkerReady, "n1", worker)
    submit(h)
    driver = h.state.tasks["t1"].driver
    out = h(ev.UnitsSliced, driver, "t1", [UnitCall(0, b"a"), UnitCall(1, b"b")], False)
    assert sum(len(i.units) for i in out if isinstance(i, ev.Dispatch)) == 2
    [go_on] = [i for i in out if isinstance(i, ev.ForwardResults)]
    assert (go_on.worker_id, go_on.results, go_on.pack) == (driver, [], 0)
    # Said once: more units while a worker still has none do not say it again.
    out = h(ev.UnitsSliced, driver, "t1", [UnitCall(2, b"c")], False)
    assert [i for i in out if isinstance(i, ev.ForwardResults)] == []


def test_a_driver_is_not_told_to_go_on_while_every_worker_has_a_unit(s: Harness) -> None:
    out = s(ev.UnitsSliced, "w1", "t1", [UnitCall(0, b"a")], False)
    assert [i for i in out if isinstance(i, ev.ForwardResults)] == []


def test_a_new_driver_is_told_the_pack_again() -> None:
    """The pack is said when it changes; a driver that replaces a lost one knows none yet."""
    h = Harness()
    h(ev.NodeJoined, "n1")
    h(ev.WorkerReady, "n1", "w1")
    submit(h)

    def measured(driver: str, start: int) -> list[int]:
        out = h(ev.UnitsSliced, driver, "t1", [UnitCall(i, b"a") for i in range(start, start + 4)],
                False)
        runs = [i for i in out if isinstance(i, ev.Dispatch)]
        told = []
        for run in runs:
            out = h(ev.UnitsFinished, run.worker_id, "t1", run.run_id,
                    [UnitOutcome(u.index, True, b"r") for u in run.units], 1e-6 * len(run.units))
            told += [i.pack for i in out if isinstance(i, ev.ForwardResults) and i.pack]
        return told

    assert measured("w1", 0) == [MAX_PACK]
    h(ev.WorkerLost, "w1", "SIGKILL", False)
    h(ev.WorkerReady, "n1", "w2")
    assert h.state.tasks["t1"].driver == "w2"
    assert measured("w2", 0) == [MAX_PACK]


class StopsItself(Squares):
    def work_unit(self, i: int) -> int:
        if i == 11:
            self._task_stop.set()  # as a cancel does, from the worker's mailbox
        return i * i


def test_a_cancelled_pack_stops_between_two_of_its_units() -> None:
    instance = StopsItself()
    instance._task_stop = StopFlag()
    ran_units: list[int] = []
    work_unit = instance.work_unit

    def counted(i: int) -> int:
        ran_units.append(i)
        return work_unit(i)

    instance.work_unit = counted  # type: ignore[method-assign]
    told: list[Any] = []
    _execute_run(instance, "t1:run1", (pack(8, 8), pack(16, 8)), "t1", {}, told.append)
    [result] = told
    assert ran_units == list(range(8, 12)) and result.outcomes == []
