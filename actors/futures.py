"""A task's future, as a ``Client`` (client.py) makes it and its receive thread ends it; the
futures of a batched map's items build on it (item_futures.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import html
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING, Any

import structlog

from actors import messages as m
from actors.display import TaskLine, in_notebook, show_lines
from actors.errors import InputFailed, NoSuchTask, TaskCancelled
from actors.inputs import reduce_future
from actors.serialize import loads, loads_parts, rebuild_exception

if TYPE_CHECKING:
    from actors.client import Client

log = structlog.get_logger("actors.client")

MAX_LINES_KEPT = 10_000  # output lines a future keeps (each worker sends at most 1,000 per task)


WAIT_STEP_S = 0.1  # how often a wait in a notebook shows the output that came meanwhile


#: A future's statuses: waiting for a worker, running, and how it ended (``lost``: with its master).
_QUEUED, _RUNNING, _DONE, _ERRED, _CANCELLED, _LOST = (
    "queued", "running", "finished", "erred", "cancelled", "lost")


class Future:
    """The eventual result of one submitted task instance."""

    # Slotted: a client may hold 10^5 of these (a backlog submitted at once).
    __slots__ = ("_client", "task_id", "name", "_kind", "_status", "_ended", "_payload",
                 "_callbacks", "_lock", "_progress", "_counts_units", "_reported", "_error",
                 "_lines", "_dropped", "_shown", "_dropped_shown", "_show_lock", "__weakref__")

    def __init__(self, client: Client, task_id: str, name: str, kind: str = "task") -> None:
        self._client = client
        self.task_id = task_id
        self.name = name
        self._kind = kind  # "task" or "parallel"
        self._status = _QUEUED
        # Its end is told through the condition its client's futures share (an Event each: a
        # condition, a lock and a deque, a kilobyte per pending future).
        self._ended = False
        self._payload: m.TaskDone | m.TaskErred | _Parts | None = None
        # Empty tuples, shared, until something comes: most futures get no callback and no
        # output, and a client may hold 10^5 (two lists were 144 bytes and two more objects
        # for every collection to walk).
        self._callbacks: tuple[tuple[Callable[[Future], None], bool], ...] = ()  # (fn, inline)
        self._lock = threading.Lock()
        self._progress: tuple[int, int | None] = (0, None)
        self._counts_units = False  # a ParallelTask's progress (units), not what work reported
        self._reported = False  # any progress came (a plain Task that reports none: no numbers)
        self._error: BaseException | None = None  # failed here, not by the cluster (MasterLost)
        self._lines: list[TaskLine] | tuple[()] = ()  # what the task printed and logged
        self._dropped = 0  # lines not kept (over a worker's cap, or MAX_LINES_KEPT here)
        self._shown = 0  # lines shown to the user so far
        self._dropped_shown = False
        self._show_lock = threading.Lock()  # one thread shows a future's lines at a time, in order

    def __repr__(self) -> str:
        return f"<Future {self.name} {self.task_id} {self._status}{self._progress_text()}>"

    def __reduce__(self) -> tuple[Any, ...]:
        """Among a task's arguments, a future is its task's result (``actors.inputs``)."""
        return reduce_future(self)

    def __del__(self) -> None:
        # Nothing holds this future: its result need not be kept for later tasks' arguments.
        # (Told on the client's next tick: a finalizer takes no lock.)
        released = getattr(getattr(self, "_client", None), "_released", None)
        if released is not None:
            released.append(self.task_id)

    def _progress_text(self) -> str:
        done, total = self._progress
        if not self._reported:
            return ""
        if total is None:
            return f" {done} units done" if done else ""
        what = "units" if self._counts_units else "done"
        return f" {done}/{total} {what}"

    def _repr_html_(self) -> str:
        colour = {_DONE: "green", _RUNNING: "#1f77b4", _QUEUED: "gray"}.get(self._status, "red")
        rows = [("task", f"{self.name} {self.task_id}"),
                ("status", f"<span style='color:{colour}'>{self._status}</span>")]
        if (progress := self._progress_text().strip()):
            rows.append(("progress", html.escape(progress)))
        if self._lines or self._dropped:
            rows.append(("output", f"{len(self._lines)} lines"
                         + (f" ({self._dropped} dropped)" if self._dropped else "")))
        cells = "".join(f"<tr><th style='text-align:left'>{k}</th>"
                        f"<td style='text-align:left'>{v if k == 'status' else html.escape(v)}"
                        "</td></tr>" for k, v in rows)
        return f"<div><b>pydra-actors Future</b><table>{cells}</table></div>"

    @property
    def status(self) -> str:
        """``queued`` (waiting for a worker), ``running``, then ``finished``, ``erred``,
        ``cancelled`` or ``lost`` (its master was lost: ``MasterLost``)."""
        return self._status

    def done(self) -> bool:
        return self._ended

    def _cluster_future(self) -> Future:
        """The future of what the cluster runs for this one: itself (an item's: its map's)."""
        return self

    def _wait_ended(self, timeout: float | None) -> bool:
        if self._ended:
            return True
        with self._client._futures_done:
            return self._client._futures_done.wait_for(self.done, timeout)

    def cancelled(self) -> bool:
        return self._status == _CANCELLED

    def running(self) -> bool:
        """True while a worker runs it (``status`` "running"), as ``concurrent.futures``'."""
        return self._status == _RUNNING

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the task; return its result or raise its exception (with the remote traceback)."""
        return self._wait_result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._wait_exception(timeout)

    def _wait_result(self, timeout: float | None) -> Any:
        """``result``, blocking: what the runtime's own helpers call (an ``AsyncFuture``'s
        ``result`` is a coroutine)."""
        if not self._wait(timeout):
            raise TimeoutError(f"task {self.name} {self.task_id} not done after {timeout}s"
                               + self._client._why_queued(self, timeout))
        if self._status == _CANCELLED:
            raise TaskCancelled(self.task_id)
        if self._error is not None:
            raise self._error
        payload = self._payload
        if isinstance(payload, m.TaskErred):
            raise self._exception_of(payload)
        if isinstance(payload, _Parts):
            return payload.value()
        assert isinstance(payload, m.TaskDone)
        return loads(payload.result)

    def _wait_exception(self, timeout: float | None) -> BaseException | None:
        try:
            self._wait_result(timeout)
        except TimeoutError:
            raise
        except BaseException as exc:
            return exc
        return None

    def cancel(self, timeout: float = 10.0, grace: float = m.STOP_GRACE_S) -> bool:
        """Cancel the task: its queued units are dropped and its running code is asked to stop
        (``Task.task_stop_requested`` turns true and its next ``task_progress`` raises
        ``TaskStopped``, so its ``finally:`` blocks run); a worker whose code has not stopped
        after ``grace`` seconds is killed (``grace=0``: at once). A worker whose code stopped
        in time serves on, warm.

        Returns True once the master has confirmed (the future is cancelled then; the task's
        code may take up to ``grace`` to stop), False if the task had already ended. Asked
        while the master is away (restarting on its state directory), the request goes when it
        is back, within ``timeout``; no answer by then raises ``TimeoutError``.
        """
        return self._cancel(timeout, grace)

    def _cancel(self, timeout: float, grace: float) -> bool:
        """``cancel``, blocking (an ``AsyncFuture``'s ``cancel`` is a coroutine that runs it)."""
        check_grace(grace)
        if self.done():
            return self.cancelled()
        deadline = time.monotonic() + timeout
        try:
            status = self._client.cancel_task(self.task_id, timeout, grace)
        except NoSuchTask:  # (its end came meanwhile and was forgotten: the future has it)
            status = ""
        if status == "cancelled":  # its end comes after the answer: TaskCancelled
            self._wait_ended(max(0.0, deadline - time.monotonic()))
        return self.cancelled()

    def progress(self) -> tuple[int, int | None]:
        """``(done, total)``: a ParallelTask's units done and all its units (None until known: its
        slicer is exhausted, or its ``task_total`` says); a plain Task's steps as its ``work``
        reports them with ``task_progress`` (else ``(0, None)``, then ``(1, 1)`` at its end).
        A finished task's ``done`` is its total."""
        return self._progress

    def logs(self) -> list[TaskLine]:
        """What the task's code printed (stdout, stderr) and logged, in the order each worker
        sent it, with the unit and worker of each line. Each worker sends at most 1,000 lines
        of a task; ``dropped_lines`` counts the rest."""
        with self._lock:
            return list(self._lines)

    @property
    def dropped_lines(self) -> int:
        return self._dropped

    def story(self, timeout: float = 10.0) -> list[tuple[str, str, str, str, float]]:
        """The transitions of this task and its units, oldest first: why is it stuck?"""
        return self._client.story(self, timeout)

    def __await__(self) -> Generator[Any, None, Any]:
        """``await future`` in asyncio: the result, or the task's error; the event loop is
        never blocked (the end is handed to the loop from the client's receive thread)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Any] = loop.create_future()

        def ended(fut: Future) -> None:
            loop.call_soon_threadsafe(_settle, waiter, fut)

        self._on_end(ended)
        # A generator, so that its frame holds this future while it is awaited: the client
        # keeps only weak references, and a future nobody holds never finishes.
        return (yield from waiter.__await__())

    def concurrent(self) -> concurrent.futures.Future[Any]:
        """The same end as a ``concurrent.futures.Future``, for the standard library's
        ``concurrent.futures.wait`` and ``as_completed`` (and ``asyncio.wrap_future``)."""
        bridged: concurrent.futures.Future[Any] = concurrent.futures.Future()
        bridged.set_running_or_notify_cancel()
        bridged.actors_future = self  # type: ignore[attr-defined]  # held while the bridge is
        # (in the callback thread: the bridge's own callbacks are users' and may wait)
        self._on_end(lambda fut: _settle(bridged, fut), inline=False)
        return bridged

    def add_done_callback(self, fn: Callable[[Future], None]) -> None:
        """Call ``fn(future)`` once it ends: at once, in this thread, if it has; otherwise in
        the client's callback thread, one callback at a time in the order the futures ended.
        Not in the thread that receives from the master: a callback may wait on another
        future (``result()``), which that thread is the one to end."""
        self._on_end(fn, inline=False)

    def _on_end(self, fn: Callable[[Future], None], *, inline: bool = True) -> None:
        """``add_done_callback`` for the runtime's own callbacks, which only hand the end on
        and never wait: called in the thread that ends the future (``inline``)."""
        with self._lock:
            if not self.done():
                self._callbacks = (*self._callbacks, (fn, inline))
                if not inline:  # held until it ends, as concurrent.futures' executor holds it:
                    self._client._awaited[self.task_id] = self  # a callback is a use of it
                return
        fn(self)

    def _wait(self, timeout: float | None) -> bool:
        """Wait for the end; in a notebook, show the task's output meanwhile, under this cell."""
        if self._ended and not (self._lines or self._dropped):
            return True  # (the results of a map, read in turn: most have ended, printing nothing)
        if not (self._client.show_output and in_notebook()):
            return self._wait_ended(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            done = self._wait_ended(WAIT_STEP_S if left is None else min(WAIT_STEP_S, left))
            self._show_output(waiting=True)
            if done or left == 0.0:
                return done

    def _add_output(self, msg: m.TaskOutput) -> None:
        lines = [TaskLine(self.task_id, msg.worker_id, line.phase, line.unit, line.stream,
                          line.level, line.logger, line.text, line.time) for line in msg.lines]
        with self._lock:
            room = max(0, MAX_LINES_KEPT - len(self._lines))
            if isinstance(self._lines, tuple):
                self._lines = lines[:room]
            else:
                self._lines += lines[:room]
            self._dropped += max(0, msg.dropped) + len(lines) - min(room, len(lines))

    def _show_output(self, waiting: bool) -> None:
        """Show the lines not shown yet: from the receive thread in a terminal, from the thread
        that waits in a notebook (``waiting``)."""
        if not (self._lines or self._dropped):  # (most tasks print nothing: asked per result)
            return
        if not self._client.show_output or waiting != in_notebook():
            return
        with self._show_lock:
            with self._lock:
                new = self._lines[self._shown:]
                self._shown += len(new)
                note = self._ended and self._dropped > 0 and not self._dropped_shown
                self._dropped_shown = self._dropped_shown or note
            shown: list[TaskLine | str] = list(new)
            if note:
                shown.append(f"[{self.task_id}] {self._dropped} more lines of output were "
                             "dropped (each worker sends at most 1,000 lines of a task)")
            if shown:
                show_lines(shown)

    def _exception_of(self, err: m.TaskErred) -> BaseException:
        where = f"task {self.name} {self.task_id}" + (f", unit {err.unit}" if err.unit else "")
        exc = rebuild_exception(err.error, err.type_name, err.message, err.traceback, where)
        if isinstance(exc, InputFailed) and exc.__cause__ is None:
            source = self._client._input_future(exc.input_id)
            if source is not None and source is not self and source.done():
                exc.__cause__ = source._wait_exception(0)  # the input's own error, as raised here
        return exc

    def _finish(self, status: str, payload: m.TaskDone | m.TaskErred | _Parts | None,
                error: BaseException | None = None) -> None:
        with self._lock:
            if self._ended:
                return
            self._status, self._payload, self._error = status, payload, error
            done, total = self._progress
            if status == _DONE:  # it got to its end, whatever it last reported
                self._progress = (total, total) if total else (max(done, 1), max(done, 1))
            with self._client._futures_done:
                self._ended = True
                self._client._futures_done.notify_all()
            callbacks, self._callbacks = self._callbacks, ()
            self._client._awaited.pop(self.task_id, None)
        for fn, inline in callbacks:
            if inline:
                _call_back(fn, self)
            else:
                self._client._callbacks.put((fn, self))


def _call_back(fn: Callable[[Future], None], fut: Future) -> None:
    try:
        fn(fut)
    except Exception:
        log.exception("future_callback_failed", task_id=fut.task_id)


class _Callbacks:
    """The thread that runs a client's done-callbacks, started with the first one."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Callable[[Future], None], Future] | None] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def put(self, item: tuple[Callable[[Future], None], Future]) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="actors-callbacks",
                                                daemon=True)
                self._thread.start()
        self._queue.put(item)

    def stop(self) -> None:
        """After the callbacks queued so far (not waited for: one may wait on this client)."""
        with self._lock:
            if self._thread is not None:
                self._queue.put(None)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            _call_back(*item)


def check_grace(grace: float) -> None:
    """Refuse, before anything is sent, a cancel's grace the master would refuse."""
    if (isinstance(grace, bool) or not isinstance(grace, (int, float))
            or not 0 <= grace <= m.MAX_STOP_GRACE_S):  # (NaN fails this too)
        raise ValueError(f"grace is seconds from 0 to {m.MAX_STOP_GRACE_S:g}, not {grace!r}")


class _Parts:
    """A result that came as a pickle and out-of-band buffers: loaded once, at the first
    ``result()`` (its arrays use the buffers as they came, not a copy), then kept."""

    __slots__ = ("task_id", "_parts", "_value", "_loaded", "_lock")

    def __init__(self, task_id: str, parts: list[bytes | memoryview]) -> None:
        self.task_id = task_id
        self._parts = parts
        self._value: Any = None
        self._loaded = False
        self._lock = threading.Lock()

    def value(self) -> Any:
        with self._lock:
            if not self._loaded:
                self._value = loads_parts(self._parts)
                self._loaded, self._parts = True, []
            return self._value


def _settle(target: asyncio.Future[Any] | concurrent.futures.Future[Any], fut: Future) -> None:
    """Give ``target`` the end of ``fut`` (which is done)."""
    if target.done():
        return
    try:
        target.set_result(fut._wait_result(0))
    except BaseException as exc:  # the task's error, TaskCancelled, MasterLost
        target.set_exception(exc)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No cyclic collection while many futures are made or ended at once (a batched map's; a
    plain ``map``'s futures, tried the same way, measured nothing: 10,575 against 9,619 tasks/s,
    within the spread, its master the bound): what is made there is in no cycle, and each young collection the allocations trigger, and the full
    ones they lead to, walk the user's whole heap (20,000 items of a batched map on a heap of
    3 x 10^5 objects: 15-25 us an item with the collector, 6.5-9 without). Left off where the
    user turned it off."""
    paused = gc.isenabled()
    try:
        if paused:
            gc.disable()
        yield
    finally:
        if paused:
            gc.enable()
