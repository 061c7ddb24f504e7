"""``client.map_batch``: many small tasks as the units of one task, a future each, with each
item's own result or error (real processes: a LocalCluster of two workers; the MapOf task
itself in-process)."""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from actors import (
    AsyncClient,
    Client,
    LocalCluster,
    ParallelTask,
    Task,
    as_completed,
    gather,
    item_futures,
)
from actors import messages as m
from actors.errors import (
    ArgumentsNotSerializable,
    ClientClosed,
    InputFailed,
    InvalidArguments,
    MasterLost,
    TaskCancelled,
    TaskStopped,
)
from actors.futures import Future, _Parts
from actors.item_futures import ItemFuture
from actors.mapping import ItemFailed, MapOf
from actors.serialize import describe_failure, dumps, loads
from actors.task import StopFlag
from tests.conftest import descendants, shown, wait_until


class Square(Task):
    def work(self, x: int, fail_on: int = -1) -> int:
        if x == fail_on:
            raise ValueError(f"no square for {x}", x)
        print(f"squaring {x}")
        return x * x


class FailsOnce(Task):
    """Raises the first time it runs for an item (a mark file says it ran), then succeeds."""

    def work(self, x: int, directory: str) -> int:
        mark = Path(directory) / str(x)
        if not mark.exists():
            mark.touch()
            raise OSError(f"first try of {x}")
        return -x


class Marked(Task):
    """Leaves ``<item>-<pid>`` in ``directory``: who ran which item."""

    def work(self, x: int, directory: str) -> int:
        (Path(directory) / f"{x}-{os.getpid()}").touch()
        time.sleep(0.004)
        return 3 * x


class Gated(Task):
    """Returns ``x`` once ``gate`` exists (at once for no gate; bounded: 60 s)."""

    def work(self, x: int, gate: str) -> int:
        deadline = time.monotonic() + 60
        while gate and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return x


class Blob(Task):
    def work(self, x: int, size: int) -> bytes:
        return bytes([x]) * size


class Add(Task):
    def work(self, a: int, b: int) -> int:
        return a + b


def negate(x: int) -> int:
    return -x


# --- the MapOf task itself, in this process ----------------------------------------------


def started(task: type[Task] | object, items: list[tuple], kwargs: dict | None = None,
            retries: int = 0) -> MapOf:
    mapped = MapOf()
    mapped.task_id, mapped._task_stop = "MapOf-1", StopFlag()
    assert list(mapped.get_work(task, items, kwargs or {}, retries)) == list(range(len(items)))
    return mapped


def test_each_unit_is_an_item_and_what_an_item_raises_is_its_outcome() -> None:
    mapped = started(Square, [(2,), (3,), (4,)], {"fail_on": 3})
    assert mapped.work_unit(0) == 4 and mapped.work_unit(2) == 16
    failed = mapped.work_unit(1)
    assert type(failed) is ItemFailed
    assert failed.type_name == "builtins.ValueError" and failed.message == "('no square for 3', 3)"
    assert "in work" in failed.traceback and failed.payload  # the exception itself, pickled
    assert mapped.reduce([4, failed, 16]) == [4, failed, 16]


def test_an_item_is_run_again_up_to_its_retries_where_it_is(tmp_path: Path) -> None:
    assert started(FailsOnce, [(5, str(tmp_path))], retries=1).work_unit(0) == -5
    assert type(started(FailsOnce, [(6, str(tmp_path))]).work_unit(0)) is ItemFailed


def test_a_cancel_or_a_fatal_error_is_the_units_not_the_items() -> None:
    def interrupted(x: int) -> int:
        raise KeyboardInterrupt

    def exits(x: int) -> int:
        sys.exit(x)

    with pytest.raises(KeyboardInterrupt):
        started(interrupted, [(1,)]).work_unit(0)
    exited = started(exits, [(3,)]).work_unit(0)  # an item's own exit: that item fails
    assert type(exited) is ItemFailed and "SystemExit" in exited.message
    checks = started(type("Checks", (Task,), {"work": lambda self: self.task_check_stop()}), [()])
    checks._task_stop.set()  # the map's cancel: its items' task_stop_requested
    with pytest.raises(TaskStopped):
        checks.work_unit(0)


def test_a_unit_that_is_not_an_index_is_refused() -> None:
    with pytest.raises(TypeError, match="an item's index"):
        started(negate, [(1,)]).work_unit("0")  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="holds no items"):
        MapOf().work_unit(0)  # a helper that never got the items
    broken = MapOf()
    broken._task_join(b"not a pickle", [(1,)], {}, 0)  # never raises: its units say why
    with pytest.raises(RuntimeError, match="holds no items") as refused:
        broken.work_unit(0)
    assert refused.value.__cause__ is not None
    with pytest.raises(Exception, match="pickle|load"):
        list(broken.get_work(b"not a pickle", [(1,)], {}, 0))  # the driver fails the map


def test_a_value_that_cannot_be_pickled_fails_its_item_alone() -> None:
    mapped = started(lambda x: threading.Lock() if x else x, [(0,), (1,)])
    assert mapped.work_unit(0) == 0
    failed = mapped.work_unit(1)
    assert type(failed) is ItemFailed and failed.type_name.endswith(".ResultNotSerializable")
    assert "lock" in failed.message and "<lambda>" in failed.message and "unit 1" in failed.message


class Records(Task):
    def work(self, x: int, scale: int = 1) -> tuple[str, bool, int]:
        return self.task_id, self._task_reports_progress, x * scale


def test_an_item_is_a_fresh_instance_of_its_own_and_takes_the_shared_keywords() -> None:
    mapped = started(Records, [(2,), (3,)], {"scale": 10})
    assert [loads(mapped.work_unit(i).data) for i in (0, 1)] == [
        ("MapOf-1#0", False, 20), ("MapOf-1#1", False, 30)]  # its progress is the map's
    assert started(lambda x, k: x * k, [(2,)], {"k": 7}).work_unit(0) == 14  # a function too


class _Waiters:
    """What a Batch's futures need of their client, and no more."""

    def __init__(self) -> None:
        self._futures_done = threading.Condition()
        self._awaited: dict = {}
        self._callbacks = None
        self._released: list = []
        self.show_output = False


def test_items_delivered_in_packs_end_their_futures_and_what_is_wrong_is_dropped() -> None:
    client = _Waiters()
    whole = Future(client, "m-1", "Square", "parallel")  # type: ignore[arg-type]
    batch = item_futures.Batch(whole)
    items = item_futures.make_items(client, batch, 6, ItemFuture)  # type: ignore[arg-type]
    failed = ItemFailed(*describe_failure(ValueError("no")))
    batch.deliver([(0, 0, dumps(10)), (1, 3, dumps([11, failed, 13])),  # one unit, a pack
                   (4, 3, dumps([1, 2, 3])),  # a pack past the end
                   (-1, 0, dumps(0)), (9, 0, dumps(0)),  # outside the map
                   (5, 0, b"not a pickle"), (4, 2, dumps([1]))])  # does not load, short
    assert [f.done() for f in items] == [True] * 4 + [False] * 2
    assert [items[0].result(timeout=1), items[1].result(timeout=1), items[3].result(timeout=1)] == [10, 11, 13]
    assert items[2].status == "erred" and items[4].status == "running"
    batch.deliver([(0, 0, dumps(99))])
    assert items[0].result(timeout=1) == 10  # the first outcome stands
    items[4].cancel()  # (item 5 is still waited for: its map goes on)
    batch.deliver([(9, 0, dumps(0)), (4, 2, dumps([14, 15]))])  # one wrong entry skips itself
    assert items[5].result(timeout=1) == 15 and items[4].cancelled()
    whole._finish("finished", m.TaskDone("m-1", dumps([10, 11, failed, 13, 99, 99])))
    assert items[4].cancelled() and items[5].result(timeout=1) == 15  # ended ones keep their end
    assert type(items[2].exception(timeout=1)) is ValueError


def _settled(payload: object, status: str = "finished",
             error: BaseException | None = None) -> list[ItemFuture]:
    """Three items of a map that ends with ``payload``, none delivered before."""
    client = _Waiters()
    whole = Future(client, "m-2", "Square", "parallel")  # type: ignore[arg-type]
    items = item_futures.make_items(client, item_futures.Batch(whole), 3,  # type: ignore[arg-type]
                                    ItemFuture)
    dropped = items.pop(1)  # an item nobody holds: its outcome goes nowhere
    del dropped
    whole._finish(status, payload, error)  # type: ignore[arg-type]
    return items


def test_items_not_delivered_take_their_outcome_from_their_maps_end() -> None:
    for payload in (m.TaskDone("m-2", dumps([0, 1, 4])), _loaded([0, 1, 4]),
                    _Parts("m-2", [dumps([0, 1, 4])])):
        assert [f.result(timeout=1) for f in _settled(payload)] == [0, 4]
    for wrong in (m.TaskDone("m-2", dumps([0, 1])), m.TaskDone("m-2", dumps("no")), None):
        errors = [f.exception(timeout=1) for f in _settled(wrong)]
        assert all(type(e) is TypeError and "m-2" in str(e) for e in errors), errors
        assert errors[0] is not errors[1]  # one each: raising it again grows its traceback
    lost = [f.exception(timeout=1) for f in _settled(None, "lost", MasterLost("a:1", "gone"))]
    assert all(type(e) is MasterLost and e.reason == "gone" for e in lost)
    assert lost[0] is not lost[1]
    assert all(f.cancelled() for f in _settled(None, "cancelled"))


def _loaded(value: object) -> _Parts:
    parts = _Parts("m-2", [])
    parts._value, parts._loaded = value, True
    return parts


def test_cancelling_items_cancels_each_where_it_is_and_passes_the_rest_on() -> None:
    plain = Future(_Waiters(), "t-1", "Square")  # type: ignore[arg-type]
    assert item_futures.cancel_items([plain]) == [plain]
    clients = [_Waiters(), _Waiters()]
    maps = [Future(c, f"m-{i}", "Square", "parallel") for i, c in enumerate(clients)]  # type: ignore[arg-type]
    items = [item_futures.make_items(c, item_futures.Batch(w), 2, ItemFuture)  # type: ignore[arg-type]
             for c, w in zip(clients, maps, strict=True)]
    assert item_futures.cancel_items([plain, items[0][0], items[1][0], items[1][1]]) == [
        plain, maps[1]]  # the first map has an item still waited for
    assert all(f.cancelled() for f in (items[0][0], items[1][0], items[1][1]))
    assert not items[0][1].done()


# --- through a cluster ----------------------------------------------------------------------


@pytest.mark.processes
def test_every_item_has_its_own_result_and_one_that_raises_fails_alone(client: Client) -> None:
    futures = client.map_batch(Square, range(50), fail_on=7)
    assert all(type(f) is ItemFuture for f in futures)
    results = [f.result(timeout=60) if i != 7 else None for i, f in enumerate(futures)]
    assert results == [i * i if i != 7 else None for i in range(50)]
    error = futures[7].exception(timeout=1)
    assert type(error) is ValueError and error.args == ("no square for 7", 7)
    # As a task's: the file, line and source line, shipped with the code.
    assert "Remote traceback" in shown(error) and "test_map_batch.py" in shown(error)
    assert 'raise ValueError(f"no square for {x}", x)' in shown(error)
    assert futures[7].status == "erred" and futures[8].status == "finished"
    listed = {t.task_id: t for t in client.tasks()}[futures[0].map_future.task_id]
    assert listed.name == "map_batch(Square)"
    with pytest.raises(ValueError, match="no square for 7"):
        futures[7].result()
    # Its output is its own; its story is its map's.
    wait_until(futures[3].logs, 30, "item 3's output")
    assert [line.text for line in futures[3].logs()] == ["squaring 3"]
    assert len(futures[3].map_future.result(timeout=60)) == 50
    assert ("task", "running", "done") in [(k, s, f) for k, s, f, _, _ in futures[3].story()]


@pytest.mark.processes
def test_an_item_ends_when_its_unit_finishes_not_with_its_map(client: Client,
                                                              tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    futures = client.map_batch(Gated, range(3), ["", str(gate), str(gate)])
    assert futures[0].result(timeout=30) == 0
    assert not futures[0].map_future.done() and not futures[1].done()
    assert futures[1].status == "running"
    gate.touch()
    assert [f.result(timeout=60) for f in futures] == [0, 1, 2]


@pytest.mark.processes
def test_functions_several_iterables_and_the_waiting_helpers_take_items(client: Client) -> None:
    assert [f.result(timeout=60) for f in client.map_batch(negate, [1, 2, 3])] == [-1, -2, -3]
    assert [f.result(timeout=60) for f in client.map_batch(Add, [1, 2], [10, 20, 30])] == [11, 22]
    assert gather(client.map_batch(negate, range(3))) == [0, -1, -2]
    assert sorted(f.result() for f in as_completed(client.map_batch(negate, range(4)))) == [
        -3, -2, -1, 0]
    assert client.map_batch(negate, []) == []
    assert client.map_batch(Square, range(3))[2].concurrent().result(timeout=60) == 4


@pytest.mark.processes
def test_many_items_go_as_several_maps(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(item_futures, "BATCH_ITEMS", 40)
    futures = client.map_batch(negate, range(100))
    assert len({f.map_future.task_id for f in futures}) == 3
    assert [f.result(timeout=60) for f in futures] == [-i for i in range(100)]
    monkeypatch.setattr(item_futures, "BATCH_ITEMS", 10_000)
    monkeypatch.setattr(item_futures, "BATCH_BYTES", 4096)  # halved until each fits
    futures = client.map_batch(len, [bytes(1000 * i) for i in range(8)])
    assert len({f.map_future.task_id for f in futures}) > 1
    assert [f.result(timeout=60) for f in futures] == [1000 * i for i in range(8)]
    # The task's code goes in each map whole: it is not what is halved.
    blob = bytes(8192)
    futures = client.map_batch(lambda x: x + len(blob), range(8))
    assert len({f.map_future.task_id for f in futures}) == 1
    assert [f.result(timeout=60) for f in futures] == [8192 + i for i in range(8)]


@pytest.mark.processes
def test_an_item_is_run_again_up_to_its_retries(client: Client, tmp_path: Path) -> None:
    futures = client.map_batch(FailsOnce, range(4), directory=str(tmp_path), retries=1)
    assert [f.result(timeout=60) for f in futures] == [0, -1, -2, -3]
    again = client.map_batch(FailsOnce, [9], directory=str(tmp_path))
    with pytest.raises(OSError, match="first try of 9"):
        again[0].result(timeout=60)


@pytest.mark.processes
def test_what_map_batch_cannot_run_is_refused_before_anything_is_sent(client: Client) -> None:
    before = len(client.tasks())
    with pytest.raises(TypeError, match="plain Task class or a function"):
        client.map_batch("some.deployed:Task", [1])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="plain Task class or a function"):
        client.map_batch(ParallelTask, [1])
    with pytest.raises(InvalidArguments, match="unexpected keyword argument 'factor'"):
        client.map_batch(Square, [1], factor=2)
    with pytest.raises(TypeError, match="at least one iterable"):
        client.map_batch(Square)
    with pytest.raises(InvalidArguments, match="not a Task or ParallelTask subclass"):
        client.map_batch(5, [1])  # type: ignore[arg-type]
    with pytest.raises(ArgumentsNotSerializable, match=r"negate") as refused:
        client.map_batch(negate, [1, threading.Lock()])  # named as a task's argument
    assert "MapOf" not in str(refused.value)
    assert len(client.tasks()) == before


@pytest.mark.processes
def test_large_results_come_back_through_the_data_plane(client: Client) -> None:
    futures = client.map_batch(Blob, range(3), size=400_000)  # each held on its worker
    assert [f.result(timeout=60) for f in futures] == [bytes([i]) * 400_000 for i in range(3)]


@pytest.mark.processes
def test_an_item_is_an_argument_of_a_later_task_once_its_map_is_done(
        cluster: LocalCluster, client: Client) -> None:
    items = client.map_batch(Square, range(5), fail_on=4)
    assert client.submit(Add, items[2], items[3]).result(timeout=60) == 13
    processes = descendants(cluster.pid)
    failed = client.submit(Add, items[4], 1)
    error = failed.exception(timeout=60)
    assert isinstance(error, InputFailed) and error.input_id == items[4].task_id
    assert type(error.__cause__) is ValueError  # the item's own error, as raised here
    assert client.submit(Add, 1, 2).result(timeout=60) == 3
    assert descendants(cluster.pid) >= processes  # no worker was killed for it
    # Items that hold futures go one task each.
    plain = client.map_batch(Add, [client.submit(Add, 1, 2)], [10])
    assert type(plain[0]) is Future and plain[0].result(timeout=60) == 13


@pytest.mark.processes
def test_items_that_hold_futures_go_one_task_each_from_any_iterable(client: Client) -> None:
    three = client.submit(Add, 1, 2)
    plain = client.map_batch(Add, (f for f in [three, three]), iter([10, 20]))
    assert [type(f) for f in plain] == [Future, Future]
    assert [f.result(timeout=60) for f in plain] == [13, 23]


@pytest.mark.processes
def test_an_item_a_later_task_takes_keeps_its_map_from_a_cancel(client: Client,
                                                                 tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    items = client.map_batch(Gated, range(4), gate=str(gate))
    later = client.submit(Add, items[0], 1)
    del items[0]
    assert client.cancel(items) == 3
    gate.touch()
    assert later.result(timeout=60) == 1  # its input, the map, ran on
    # A cancelled item among a later task's arguments fails it, as a cancelled task's future.
    with pytest.raises(TypeError, match="not data"):
        pickle.dumps(items[0])
    failed = client.submit(Add, items[0], 1).exception(timeout=60)
    assert type(failed) is InputFailed and failed.input_id == items[0].task_id
    assert type(failed.__cause__) is TaskCancelled
    # A submit refused before it was sent takes nothing: its map goes with its items' cancel.
    gate.unlink()
    others = client.map_batch(Gated, range(4), gate=str(gate))
    with pytest.raises(ArgumentsNotSerializable):
        client.submit(Add, others[0], threading.Lock())
    assert client.cancel(others) == 4
    wait_until(lambda: others[0].map_future.cancelled(), 30, "the map to be cancelled")


@pytest.mark.processes
def test_closing_the_client_ends_its_items(cluster: LocalCluster, tmp_path: Path) -> None:
    with Client(cluster) as other:
        futures = other.map_batch(Gated, range(3), gate=str(tmp_path / "never"))
    with pytest.raises(ClientClosed):
        futures[0].result(timeout=10)
    errors = [f.exception(timeout=1) for f in futures]
    assert all(type(e) is ClientClosed for e in errors) and len({id(e) for e in errors}) == 3
    assert [(e.client_id, e.task_id) for e in errors] == [(other.client_id, f.task_id)
                                                         for f in futures]


@pytest.mark.processes
def test_cancelling_items_stops_their_map_once_none_is_waited_for(client: Client,
                                                                   tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    futures = client.map_batch(Gated, range(20), gate=str(gate))
    assert futures[5].cancel() and futures[5].cancelled() and futures[5].status == "cancelled"
    assert not futures[6].done()
    gate.touch()
    assert [f.result(timeout=60) for f in futures[:5]] == list(range(5))
    assert futures[5].cancelled()  # its map ran on: its outcome is not taken

    gate.unlink()  # item 0 ends at once; the rest wait at the gate
    futures = client.map_batch(Gated, range(20), ["", *[str(gate)] * 19])
    assert futures[0].result(timeout=60) == 0
    assert client.cancel(futures[:10]) == 9 and not futures[0].map_future.done()
    assert client.cancel(futures) == 10
    wait_until(lambda: futures[0].map_future.cancelled(), 30, "the map to be cancelled")
    assert all(f.cancelled() for f in futures[1:]) and futures[0].result() == 0


@pytest.mark.processes
def test_a_worker_killed_mid_map_loses_no_item(tmp_path: Path) -> None:
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        futures = client.map_batch(Marked, range(600), directory=str(tmp_path))
        wait_until(lambda: len(list(tmp_path.iterdir())) >= 100, 60, "100 items to run")
        pids = [int(p.name.split("-")[1]) for p in tmp_path.iterdir()]
        victim = max(set(pids), key=pids.count)
        os.kill(victim, signal.SIGKILL)
        assert [f.result(timeout=60) for f in futures] == [3 * i for i in range(600)]
        ran = {int(p.name.split("-")[0]) for p in tmp_path.iterdir()}
    assert ran == set(range(600))
    assert any(p.name.endswith(f"-{victim}") for p in tmp_path.iterdir())


@pytest.mark.processes
def test_dropping_every_item_releases_its_map_at_once(client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    futures = client.map_batch(Gated, range(10), gate=str(gate))
    map_id = futures[0].map_future.task_id
    assert map_id in client._futures
    del futures  # while it runs: no cycle keeps it for the collector
    assert map_id not in client._futures
    gate.touch()


@pytest.mark.processes
def test_an_async_clients_items_are_awaited(cluster: LocalCluster) -> None:
    async def main() -> None:
        async with AsyncClient(cluster) as client:
            futures = await client.map_batch(Square, range(4), fail_on=2)
            assert await futures[3] == 9 and await futures[1].result() == 1
            assert type(await futures[2].exception()) is ValueError
            assert await futures[0] == 0 and await futures[0].cancel() is False  # it had ended
            gated = await client.map_batch(Gated, [1], gate="/nonexistent-gate")
            assert await gated[0].cancel() is True

    asyncio.run(main())
