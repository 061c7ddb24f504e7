"""What people arriving from Dask, Ray or concurrent.futures type: plain functions, map over
several iterables, gather, wait, as_completed with add and results, the standard library's
futures, and ``await`` in asyncio (real processes: the session's LocalCluster)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import time
from pathlib import Path

import pytest

from actors import (
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    Client,
    as_completed,
    gather,
    wait,
)
from actors.errors import InvalidArguments
from tests.conftest import wait_until

pytestmark = pytest.mark.processes


def add(a, b):
    return a + b


def gated(path, value):
    """Return ``value`` once ``path`` exists (a test opens the gate; bounded: 60 s)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def test_plain_functions_lambdas_closures_and_partials_run_as_tasks(client: Client) -> None:
    factor = 6
    assert client.submit(lambda x: x + 1, 3).result(timeout=60) == 4
    assert client.submit(lambda: factor * 7).result(timeout=60) == 42  # a closure
    assert client.submit(functools.partial(add, 10), 5).result(timeout=60) == 15
    assert client.submit(add, 2, b=3).result(timeout=60) == 5
    assert [f.result(timeout=60) for f in client.map(add, [1, 2, 3], [10, 20, 30])] == [11, 22, 33]
    assert [f.result(timeout=60) for f in client.map(add, [1, 2], b=100)] == [101, 102]


def test_arguments_a_function_cannot_take_are_refused_before_anything_is_sent(
        client: Client) -> None:
    with pytest.raises(InvalidArguments, match=r"add\(a, b\).*missing a required argument: 'b'"):
        client.submit(add, 1)
    with pytest.raises(TypeError, match="at least one iterable"):
        client.map(add)


def test_a_function_that_raises_raises_at_the_client_with_its_name(client: Client) -> None:
    fut = client.submit(lambda x: 1 / x, 0)
    with pytest.raises(ZeroDivisionError):
        fut.result(timeout=60)
    assert "lambda" in fut.task_id


def test_gather_keeps_the_structure_and_raises_or_skips_failures(client: Client) -> None:
    ok = client.map(lambda x: x * 2, [1, 2, 3])
    bad = client.submit(lambda: 1 / 0)
    nested = {"list": ok, "tuple": (ok[0], bad), "plain": "kept"}
    with pytest.raises(ZeroDivisionError):
        client.gather(nested)
    assert gather(nested, errors="skip") == {"list": [2, 4, 6], "tuple": (2,), "plain": "kept"}
    with pytest.raises(ValueError, match="errors"):
        gather(ok, errors="ignore")


def test_wait_returns_at_the_first_completed_without_waiting_for_the_rest(
        client: Client, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    slow = client.submit(gated, str(gate), "slow")
    quick = client.submit(add, 1, 1)
    done, not_done = wait([slow, quick], timeout=60, return_when=FIRST_COMPLETED)
    assert done == {quick} and not_done == {slow}
    failing = client.submit(lambda: 1 / 0)
    done, not_done = wait([slow, failing], timeout=60, return_when=FIRST_EXCEPTION)
    assert done == {failing} and not_done == {slow}
    assert wait([slow], timeout=0.2).not_done == {slow}  # a timeout is not an error
    gate.touch()
    assert wait([slow, quick], timeout=60).not_done == set()
    assert slow.result(timeout=0) == "slow"


def test_as_completed_takes_futures_added_on_the_way_and_yields_results(
        client: Client) -> None:
    seen = []
    finished = as_completed([client.submit(add, 1, 1)], with_results=True, timeout=60)
    for _, result in finished:
        seen.append(result)
        if result == 2:
            finished.add(client.submit(add, 2, 2))
            finished.add(client.submit(add, 3, 3))
    assert seen[0] == 2 and sorted(seen) == [2, 4, 6]
    assert finished.count() == 0
    failing = as_completed([client.submit(lambda: 1 / 0)], with_results=True, timeout=60)
    with pytest.raises(ZeroDivisionError):
        next(failing)


def test_the_standard_librarys_futures_take_the_bridge(client: Client) -> None:
    futures = [client.submit(add, i, i).concurrent() for i in range(5)]
    done = concurrent.futures.wait(futures, timeout=60).done
    assert sorted(f.result() for f in done) == [0, 2, 4, 6, 8]
    failing = client.submit(lambda: 1 / 0).concurrent()
    assert isinstance(failing.exception(timeout=60), ZeroDivisionError)


def test_asyncio_awaits_a_thousand_futures_without_blocking_its_loop(client: Client) -> None:
    async def main() -> tuple[int, int]:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.create_task(tick())
        futures = client.map(lambda x: x * 2, range(1_000))
        results = await asyncio.wait_for(asyncio.gather(*futures), 120)
        ticker.cancel()
        return sum(results), ticks

    total, ticks = asyncio.run(main())
    assert total == 2 * sum(range(1_000))
    assert ticks > 1  # the loop ran while the results came

    async def failing() -> None:
        await asyncio.wait_for(client.submit(lambda: 1 / 0), 60)  # a future held by nobody

    with pytest.raises(ZeroDivisionError):
        asyncio.run(failing())


def test_running_says_a_worker_has_it_and_client_cancel_takes_many_at_once(
        client: Client, tmp_path: Path) -> None:
    """``Future.running()`` as ``concurrent.futures``'; ``client.cancel(futures)`` as Dask's:
    every request sent before any answer is awaited, those already ended left as they are."""
    done = client.submit(add, 1, 2)
    assert done.result(30) == 3 and not done.running()
    gate = str(tmp_path / "never")  # (never opened: the tasks end by their cancel)
    held = client.map(gated, [gate] * 3, range(3))
    wait_until(lambda: any(fut.running() for fut in held), 30, "a gated task to run")
    assert client.cancel({"held": held, "done": done}, grace=0) == 3
    assert all(fut.cancelled() and not fut.running() for fut in held)
    assert not done.cancelled() and done.result(0) == 3
    assert client.cancel([]) == 0
    assert client.submit(add, 2, 2).result(30) == 4  # and the cluster serves on
