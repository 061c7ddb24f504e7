"""Waiting on many futures, as Dask and ``concurrent.futures`` users expect: ``wait``,
``as_completed`` (with ``add`` and ``with_results``) and ``gather`` (nested structures).

Only ``Future``'s surface is used (``done``, ``add_done_callback``, and the blocking
``_wait_result``/``_wait_exception`` under ``result``/``exception``: an ``AsyncFuture``'s are
coroutines): no thread of its own, no polling.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, Protocol, runtime_checkable


@runtime_checkable
class Future(Protocol):
    """What of ``actors.client.Future`` this module uses (it sits below the client)."""

    task_id: str

    def done(self) -> bool: ...
    def _wait_result(self, timeout: float | None) -> Any: ...
    def _wait_exception(self, timeout: float | None) -> BaseException | None: ...
    def add_done_callback(self, fn: Callable[[Any], None]) -> None: ...
    def _show_output(self, waiting: bool) -> None: ...

def _on_end(fut: Future, fn: Callable[[Any], None]) -> None:
    """``fn(fut)`` at its end, in the thread that ends it where the future can (``Future``'s
    ``_on_end``: a hand-off, never a wait), else as its ``add_done_callback`` does."""
    getattr(fut, "_on_end", fut.add_done_callback)(fn)


FIRST_COMPLETED = "FIRST_COMPLETED"
FIRST_EXCEPTION = "FIRST_EXCEPTION"
ALL_COMPLETED = "ALL_COMPLETED"


class DoneAndNotDone(NamedTuple):
    done: set[Future]
    not_done: set[Future]


def wait(futures: Iterable[Future], timeout: float | None = None,
         return_when: str = ALL_COMPLETED) -> DoneAndNotDone:
    """Wait until all (``ALL_COMPLETED``), any (``FIRST_COMPLETED``) or the first that fails
    (``FIRST_EXCEPTION``, else all) are done, or ``timeout`` passes; never raises a task's
    error. As ``concurrent.futures.wait``."""
    if return_when not in (FIRST_COMPLETED, FIRST_EXCEPTION, ALL_COMPLETED):
        raise ValueError(f"return_when is one of {FIRST_COMPLETED}, {FIRST_EXCEPTION} or "
                         f"{ALL_COMPLETED}, not {return_when!r}")
    pending = set(futures)
    changed = threading.Condition()

    def woken(_: Future) -> None:
        with changed:
            changed.notify_all()

    for fut in pending:
        _on_end(fut, woken)
    deadline = None if timeout is None else time.monotonic() + timeout
    with changed:
        while True:
            done = {f for f in pending if f.done()}
            if (len(done) == len(pending)
                    or (return_when == FIRST_COMPLETED and done)
                    or (return_when == FIRST_EXCEPTION and any(_failed(f) for f in done))):
                break
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            changed.wait(left)
    return DoneAndNotDone(done, pending - done)


def _failed(fut: Future) -> bool:
    return fut.done() and fut._wait_exception(0) is not None


class as_completed:  # noqa: N801 (a function to its callers, as in concurrent.futures and Dask)
    """Iterate over futures as they finish, in that order; ``add`` more while iterating.
    ``with_results=True`` yields ``(future, result)`` and raises a failed task's error.
    ``TimeoutError`` if ``timeout`` (from the start) passes before the next one is done."""

    def __init__(self, futures: Iterable[Future] = (), timeout: float | None = None,
                 with_results: bool = False) -> None:
        self._finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
        # The futures not yet yielded, held here: the client keeps only weak references, and a
        # future nobody holds is never finished.
        self._pending: set[Future] = set()
        self._lock = threading.Lock()
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._timeout = timeout
        self._with_results = with_results
        for fut in futures:
            self.add(fut)

    def add(self, fut: Future) -> None:
        with self._lock:
            self._pending.add(fut)
        _on_end(fut, self._finished.put)

    def count(self) -> int:
        """Futures added and not yet yielded."""
        return len(self._pending)

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        with self._lock:
            if not self._pending:
                raise StopIteration
        wait = None if self._deadline is None else max(0.0, self._deadline - time.monotonic())
        try:
            fut = self._finished.get(timeout=wait)
        except queue.Empty:
            raise TimeoutError(f"futures not done after {self._timeout}s") from None
        with self._lock:
            self._pending.discard(fut)
        fut._show_output(waiting=True)
        return (fut, fut._wait_result(None)) if self._with_results else fut


def gather(structure: Any, errors: str = "raise") -> Any:
    """``structure`` with every future in it (in lists, tuples, sets, dicts, nested) replaced
    by its result. ``errors="raise"``: the first failed future's error (in the order given);
    ``"skip"``: failed and cancelled futures are left out of their list, tuple, set or dict."""
    if errors not in ("raise", "skip"):
        raise ValueError(f'errors is "raise" or "skip", not {errors!r}')

    def walk(item: Any) -> Any:
        if isinstance(item, Future):
            if errors == "skip" and item._wait_exception(None) is not None:
                return _SKIPPED
            return item._wait_result(None)
        if isinstance(item, list | tuple | set):
            kept = [v for v in map(walk, item) if v is not _SKIPPED]
            return type(item)(kept) if not _is_namedtuple(item) else type(item)(*kept)
        if isinstance(item, dict):
            pairs = ((k, walk(v)) for k, v in item.items())
            return type(item)((k, v) for k, v in pairs if v is not _SKIPPED)
        return item

    return walk(structure)


_SKIPPED = object()


def futures_in(structure: Any) -> list[Any]:
    """The futures in ``structure`` (lists, tuples, sets, dicts, nested), as ``gather`` finds
    them."""
    if isinstance(structure, Future):
        return [structure]
    if isinstance(structure, list | tuple | set):
        return [fut for item in structure for fut in futures_in(item)]
    if isinstance(structure, dict):
        return [fut for item in structure.values() for fut in futures_in(item)]
    return []


def _is_namedtuple(item: Any) -> bool:
    return isinstance(item, tuple) and hasattr(item, "_fields")
