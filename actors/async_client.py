"""``AsyncClient``: the client for asyncio programs. Every call that may wait is a coroutine, and
none of them blocks the event loop::

    async with AsyncClient(address) as client:
        futures = await client.map(square, range(1_000))
        print(sum(await client.gather(futures)))

It drives a ``Client`` (``client.sync``), whose own thread talks to the master: what could block
(connecting, pickling arguments, a request to the master) runs in a worker thread
(``asyncio.to_thread``), and a future's end reaches the loop by ``call_soon_threadsafe``.
The futures it returns are ``AsyncFuture``s: ``await future``, and as Dask's asynchronous
futures, ``await future.result()``, ``await future.exception()``, ``await future.cancel()``:
what waits on them is a coroutine too.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from typing import Any

from actors import messages as m
from actors.client import Client, Future
from actors.cluster import LocalCluster
from actors.item_futures import ItemFuture
from actors.task import Task
from actors.waiting import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    DoneAndNotDone,
    futures_in,
    gather,
)


class AsyncClient:
    def __init__(self, address: str | LocalCluster | None = None, *,
                 keys: str | os.PathLike[str] | None = None, timeout: float = 15.0,
                 master_timeout: float = 10.0, show_output: bool = True) -> None:
        """As ``Client``'s; it connects when awaited or entered (``async with``)."""
        self._connect = functools.partial(Client, address, keys=keys, timeout=timeout,
                                          master_timeout=master_timeout, show_output=show_output)
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, AsyncClient]:
        return self._start().__await__()

    async def __aenter__(self) -> AsyncClient:
        return await self._start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _start(self) -> AsyncClient:
        if self._client is None:
            client = await asyncio.to_thread(self._connect)
            client._future_type = AsyncFuture
            client._item_future = AsyncItemFuture
            self._client = client
        return self

    @property
    def sync(self) -> Client:
        """The blocking ``Client`` underneath (for a call this class does not wrap)."""
        if self._client is None:
            raise RuntimeError("AsyncClient not connected yet: await it, or use `async with`")
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await asyncio.to_thread(self._client.close)

    # --- tasks ----------------------------------------------------------------

    async def submit(self, task: type[Task] | str | Callable[..., Any], /, *args: Any,
                     priority: int = 0, retries: int = 0, **kwargs: Any) -> Future:
        """As ``Client.submit``; ``await`` the future it returns for the result."""
        return await asyncio.to_thread(self.sync.submit, task, *args, priority=priority,
                                       retries=retries, **kwargs)

    async def map(self, task: type[Task] | str | Callable[..., Any], /,
                  *iterables: Iterable[Any], priority: int = 0, retries: int = 0,
                  **kwargs: Any) -> list[Future]:
        return await asyncio.to_thread(self.sync.map, task, *iterables, priority=priority,
                                       retries=retries, **kwargs)

    async def map_batch(self, task: type[Task] | Callable[..., Any], /,
                        *iterables: Iterable[Any], priority: int = 0, retries: int = 0,
                        **kwargs: Any) -> list[Future]:
        """As ``Client.map_batch``: many small items as the units of one task, a future each."""
        return await asyncio.to_thread(self.sync.map_batch, task, *iterables, priority=priority,
                                       retries=retries, **kwargs)

    async def cancel(self, futures: Any, timeout: float = 10.0,
                     grace: float = m.STOP_GRACE_S) -> int:
        """As ``Future.cancel`` for one future (True once cancelled), as ``Client.cancel`` for
        a structure of them (how many were cancelled), without blocking the loop."""
        if isinstance(futures, Future):
            return await asyncio.to_thread(futures._cancel, timeout, grace)
        return await asyncio.to_thread(self.sync.cancel, futures, timeout, grace)

    # --- waiting --------------------------------------------------------------

    async def gather(self, futures: Any, errors: str = "raise") -> Any:
        """As ``Client.gather``: ``futures`` (nested in lists, tuples, sets, dicts) replaced by
        their results, once every one has ended."""
        if errors not in ("raise", "skip"):
            raise ValueError(f'errors is "raise" or "skip", not {errors!r}')
        await asyncio.gather(*(_ended(fut) for fut in futures_in(futures)))
        return gather(futures, errors)

    async def wait(self, futures: Iterable[Future], timeout: float | None = None,
                   return_when: str = ALL_COMPLETED) -> DoneAndNotDone:
        """As ``actors.wait`` (and ``concurrent.futures.wait``); never raises a task's error."""
        if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
            raise ValueError(f"return_when is one of {FIRST_COMPLETED}, {FIRST_EXCEPTION} or "
                             f"{ALL_COMPLETED}, not {return_when!r}")
        pending: set[Any] = set(futures)  # (actors.waiting.Future, as DoneAndNotDone holds)
        waiters = {asyncio.ensure_future(_ended(fut)): fut for fut in pending}
        if not waiters:
            return DoneAndNotDone(set(), set())
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=return_when)
        finally:
            for waiter in waiters:
                waiter.cancel()
        done = {fut for fut in pending if fut.done()}
        return DoneAndNotDone(done, pending - done)

    async def as_completed(self, futures: Iterable[Future], timeout: float | None = None,
                           with_results: bool = False) -> AsyncIterator[Any]:
        """The futures as they end (``(future, result)`` pairs with ``with_results``, raising a
        failed task's error); ``TimeoutError`` if ``timeout`` passes before the next one."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        waiters = {asyncio.ensure_future(_ended(fut)): fut for fut in set(futures)}
        try:
            while waiters:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                finished, _ = await asyncio.wait(waiters, timeout=left,
                                                 return_when=asyncio.FIRST_COMPLETED)
                if not finished:
                    raise TimeoutError(f"futures not done after {timeout}s")
                for waiter in finished:
                    fut = waiters.pop(waiter)
                    yield (fut, fut._wait_result(0)) if with_results else fut
        finally:
            for waiter in waiters:
                waiter.cancel()

    # --- the cluster ----------------------------------------------------------

    async def wait_for_workers(self, n: int, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self.sync.wait_for_workers, n, timeout)

    async def info(self, timeout: float = 10.0) -> m.ClusterInfo:
        return await asyncio.to_thread(self.sync.info, timeout)

    async def tasks(self, limit: int = 1000, timeout: float = 10.0) -> list[m.TaskInfo]:
        return await asyncio.to_thread(self.sync.tasks, limit, timeout)

    async def packages(self, timeout: float = 10.0) -> list[m.PackageListing]:
        return await asyncio.to_thread(self.sync.packages, timeout)

    async def story(self, future: Future,
                    timeout: float = 10.0) -> list[tuple[str, str, str, str, float]]:
        return await asyncio.to_thread(self.sync.story, future, timeout)


class AsyncFuture(Future):
    """A task's future from an ``AsyncClient``: each method that may wait is a coroutine (the
    others, ``done``, ``status``, ``progress``, ``logs``, are as ``Future``'s). Taken as an
    argument by ``submit`` as any future is."""

    __slots__ = ()

    async def result(self, timeout: float | None = None) -> Any:  # type: ignore[override]
        """The task's result, or its exception raised; ``TimeoutError`` after ``timeout``."""
        await self._ended_within(timeout)
        return self._wait_result(0)

    async def exception(  # type: ignore[override]
            self, timeout: float | None = None) -> BaseException | None:
        await self._ended_within(timeout)
        return self._wait_exception(0)

    async def cancel(self, timeout: float = 10.0,  # type: ignore[override]
                     grace: float = m.STOP_GRACE_S) -> bool:
        """As ``Future.cancel``; the round trip to the master off the loop."""
        return await asyncio.to_thread(self._cancel, timeout, grace)

    async def story(  # type: ignore[override]
            self, timeout: float = 10.0) -> list[tuple[str, str, str, str, float]]:
        return await asyncio.to_thread(Future.story, self, timeout)

    async def _ended_within(self, timeout: float | None) -> None:
        if self.done():
            return  # (wait_for with 0 would time out before even looking)
        try:
            await asyncio.wait_for(_ended(self), timeout)
        except TimeoutError:
            # (why it is still queued may ask the master: off the loop)
            why = await asyncio.to_thread(self._client._why_queued, self, timeout)
            raise TimeoutError(f"task {self.name} {self.task_id} not done after {timeout}s"
                               + why) from None


async def _ended(fut: Future) -> None:
    """Return once ``fut`` has ended, however (its end is handed over from the client's thread)."""
    if fut.done():
        return
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def ended(_: Future) -> None:
        if not loop.is_closed():  # (a wait given up on, its loop since closed)
            loop.call_soon_threadsafe(_set, waiter)

    fut._on_end(ended)
    await waiter


def _set(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class AsyncItemFuture(ItemFuture, AsyncFuture):
    """An item's future of an ``AsyncClient``'s ``map_batch``: ``AsyncFuture``'s coroutines
    over an item's blocking calls (``item_futures.ItemFuture``)."""

    __slots__ = ()
