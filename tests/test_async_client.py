"""AsyncClient: the client's calls as coroutines that never block the event loop (real processes)."""

from __future__ import annotations

import asyncio
import time

import pytest

from actors import FIRST_COMPLETED, AsyncClient, LocalCluster, Task
from actors.errors import TaskCancelled

pytestmark = pytest.mark.processes


def add(a, b):
    return a + b


def napping(seconds):
    time.sleep(seconds)
    return seconds


class Fails(Task):
    def work(self, x):
        raise ValueError(f"no {x}")


class Ticker:
    """Counts the turns of a 50 ms tick on the loop while its block runs: a call that blocks
    the loop leaves it at zero."""

    def __init__(self) -> None:
        self.ticks = 0
        self._running: asyncio.Future[None] | None = None

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self.ticks += 1

    async def __aenter__(self) -> Ticker:
        self._running = asyncio.ensure_future(self._tick())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._running is not None
        self._running.cancel()


def test_a_thousand_concurrent_awaits_all_resolve_exactly(cluster: LocalCluster) -> None:
    async def main() -> list[int]:
        async with AsyncClient(cluster) as client:
            futures = await client.map(add, range(1_000), range(1_000))
            return await asyncio.gather(*futures)  # each `await future`, concurrently

    assert asyncio.run(main()) == [2 * i for i in range(1_000)]


def test_waiting_never_blocks_the_event_loop(cluster: LocalCluster) -> None:
    """A ticker on the loop keeps ticking while the client waits on a task of 1.5 s (with a
    blocking call underneath, it would not tick at all meanwhile)."""

    async def main() -> tuple[float, int]:
        async with AsyncClient(cluster) as client, Ticker() as ticker:
            await client.wait_for_workers(2)
            fut = await client.submit(napping, 1.5)
            before = ticker.ticks
            (result,) = await client.gather([fut])
            return result, ticker.ticks - before

    result, during = asyncio.run(main())
    assert result == 1.5
    assert during >= 5, f"the loop ticked {during} times while the task ran"


def test_gather_wait_as_completed_and_cancel(cluster: LocalCluster) -> None:
    async def main() -> None:
        async with AsyncClient(cluster) as client:
            good = await client.submit(add, 1, 2)
            bad = await client.submit(Fails, 7)
            assert await client.gather({"a": [good, bad]}, errors="skip") == {"a": [3]}
            with pytest.raises(ValueError, match="no 7"):
                await client.gather([good, bad])
            with pytest.raises(ValueError, match="no 7"):
                await bad
            slow = await client.submit(napping, 30)
            done, not_done = await client.wait([good, slow], return_when=FIRST_COMPLETED)
            assert done == {good} and not_done == {slow}
            seen = [pair async for pair in client.as_completed(
                [await client.submit(add, i, i) for i in range(5)], with_results=True)]
            assert sorted(result for _, result in seen) == [0, 2, 4, 6, 8]
            assert await client.cancel(slow, grace=0) is True
            with pytest.raises(TaskCancelled):
                await slow
            with pytest.raises(TimeoutError):
                async for _ in client.as_completed([await client.submit(napping, 30)],
                                                   timeout=0.2):
                    pass
            assert len((await client.info()).nodes) == 1

    asyncio.run(main())


def test_a_client_not_yet_connected_says_how_to_connect() -> None:
    client = AsyncClient("tcp://127.0.0.1:1")
    with pytest.raises(RuntimeError, match="await it"):
        client.sync  # noqa: B018


def test_its_futures_are_awaited_as_dasks_asynchronous_ones(cluster: LocalCluster) -> None:
    """``await fut.result()`` (what a Dask user types) waits without blocking the loop;
    ``exception()``, ``cancel()`` and ``story()`` are coroutines too, a timeout a
    ``TimeoutError``; and such a future is an argument of the next task as any future is."""

    async def main() -> None:
        async with AsyncClient(cluster) as client:
            await client.wait_for_workers(2)
            async with Ticker() as ticker:
                nap = await client.submit(napping, 1.0)
                assert await nap.result() == 1.0
                assert await nap.result(timeout=0) == 1.0  # (ended: no wait, not a timeout)
            assert ticker.ticks >= 5, f"the loop ticked {ticker.ticks} times meanwhile"
            assert await (await client.submit(add, nap, 1)).result(30) == 2.0
            bad = await client.submit(Fails, 3)
            error = await bad.exception(30)
            assert isinstance(error, ValueError) and error.args == ("no 3",)
            with pytest.raises(ValueError, match="no 3"):
                await bad.result()
            slow = await client.submit(napping, 30)
            with pytest.raises(TimeoutError, match="not done after 0.1s"):
                await slow.result(timeout=0.1)
            assert any(entry for entry in await slow.story())
            assert await slow.cancel(grace=0) is True and slow.cancelled()
            more = [await client.submit(napping, 30) for _ in range(2)]
            assert await client.cancel({"more": more, "done": [nap]}, grace=0) == 2

    asyncio.run(main())
