"""What a task's code prints and logs, and the progress it reports, caught in its worker process.

A worker installs one ``Capture`` (``install``): ``sys.stdout`` and ``sys.stderr`` become
streams that look up which task's code the current thread is running (``enter``/``leave``, set
by the runtime around ``work``, ``get_work``, ``work_unit`` and ``reduce``), and a handler on the
root logger does the same for ``logging`` records. What a thread writes outside a task's code
goes to the process's real streams, as before (a record below WARNING is dropped there, as
Python's last-resort handler would).

Rules
 1. Never block the task. A write takes a lock held only to append to a list, and it never
    waits for the network: the Worker actor drains the buffers (``drain``) when told to
    (``wake``, at most every ``FLUSH_DELAY_S``) and before it reports a unit or a task as
    finished, so that a task's output reaches its client before its result.
 2. Bounded. Each task keeps at most ``MAX_LINES`` lines per worker process, each cut to
    ``MAX_LINE_CHARS``; what comes beyond is counted (``TaskOutput.dropped``), not kept.
    Counts of at most ``MAX_TASKS`` tasks are remembered (a warm worker runs many).
 3. Progress (``task_progress``) keeps only the newest value: a task may report it in a tight
    loop, and each drain sends it once.
 4. A line ends at a newline, or when the code that wrote it returns (``leave``): so the output
    of a unit is complete before the unit is reported finished.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TextIO

from actors import messages as m

MAX_LINES = 1_000  # per task and worker process
MAX_LINE_CHARS = 10_000
MAX_TASKS = 256
FLUSH_DELAY_S = 0.1

_context = threading.local()  # .task_id, .phase, .unit: the task code this thread runs


def enter(task_id: str, phase: str, unit: int = -1) -> None:
    """The current thread runs ``phase`` ("work", "get_work", "work_unit", "reduce") of a task."""
    _context.task_id, _context.phase, _context.unit = task_id, phase, unit


def at_unit(unit: int) -> None:
    """The current thread (in ``work_unit``) moves on to the unit of this index."""
    _context.unit = unit


def leave() -> None:
    """The current thread is out of the task's code: what it wrote without a newline is a line."""
    task_id = getattr(_context, "task_id", None)
    _context.task_id = None
    if _CAPTURE is not None and _CAPTURE.pending and task_id is not None:
        _CAPTURE.end_lines(task_id, _context.phase)


def _current() -> tuple[str, str, int] | None:
    task_id = getattr(_context, "task_id", None)
    return None if task_id is None else (task_id, _context.phase, _context.unit)


class _TaskBuffer:
    __slots__ = ("lines", "kept", "dropped", "partial", "progress", "progress_sent")

    def __init__(self) -> None:
        self.lines: list[m.OutputLine] = []
        self.kept = 0  # lines accepted so far (sent or waiting)
        self.dropped = 0  # lines over the cap, not yet reported
        # (stream, phase) -> (text, unit): a line not ended yet. By phase, because get_work
        # (on the driver's thread) and work_unit (on the executor's) may write at once.
        self.partial: dict[tuple[str, str], tuple[str, int]] = {}
        self.progress: tuple[int, int] | None = None
        self.progress_sent: tuple[int, int] | None = None


class Capture:
    """The process's buffers of task output (see the module docstring)."""

    def __init__(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._tasks: OrderedDict[str, _TaskBuffer] = OrderedDict()
        self._wake_due = False
        self.pending = False  # read without the lock: a hint that drain() has work

    # --- from any thread running task code ------------------------------------------

    def write(self, stream: str, text: str, where: tuple[str, str, int]) -> None:
        task_id, phase, unit = where
        now = time.time()
        with self._lock:
            buf = self._buffer(task_id)
            head = buf.partial.pop((stream, phase), ("", unit))[0]
            pieces = (head + text).split("\n")
            if pieces[-1]:
                buf.partial[(stream, phase)] = (pieces[-1], unit)
            for piece in pieces[:-1]:
                self._add(buf, m.OutputLine(stream=stream, level="", logger="", phase=phase,
                                            unit=unit, text=_cut(piece), time=now))
            wake = self._mark_pending()
        if wake:
            self._schedule_wake()

    def record(self, record: logging.LogRecord, text: str, where: tuple[str, str, int]) -> None:
        task_id, phase, unit = where
        line = m.OutputLine(stream="log", level=record.levelname, logger=record.name, phase=phase,
                            unit=unit, text=_cut(text), time=record.created)
        with self._lock:
            self._add(self._buffer(task_id), line)
            wake = self._mark_pending()
        if wake:
            self._schedule_wake()

    def progress(self, task_id: str, done: int, total: int) -> None:
        with self._lock:
            self._buffer(task_id).progress = (done, total)
            wake = self._mark_pending()
        if wake:
            self._schedule_wake()

    # --- from the Worker actor ------------------------------------------------------

    def end_lines(self, task_id: str, phase: str) -> None:
        """``phase`` of the task returned: its unfinished lines are lines."""
        with self._lock:
            buf = self._tasks.get(task_id)
            if buf is None:
                return
            for key in [k for k in buf.partial if k[1] == phase]:
                text, unit = buf.partial.pop(key)
                self._add(buf, m.OutputLine(stream=key[0], level="", logger="", phase=phase,
                                            unit=unit, text=_cut(text), time=time.time()))

    def drain(self) -> list[m.Message]:
        """What to send: a ``TaskOutput`` and a ``WorkProgress`` per task that has news."""
        out: list[m.Message] = []
        with self._lock:
            self._wake_due = False
            unfinished = False
            for task_id, buf in self._tasks.items():
                if buf.progress is not None and buf.progress != buf.progress_sent:
                    out.append(m.WorkProgress(task_id, *buf.progress))
                    buf.progress_sent = buf.progress
                if buf.lines or buf.dropped:
                    out.append(m.TaskOutput(task_id, "", buf.lines, buf.dropped))
                    buf.lines, buf.dropped = [], 0
                unfinished = unfinished or bool(buf.partial)
            # Unfinished lines wait for their end, or for the end of their phase (leave).
            self.pending = unfinished
        return out

    # --- inside the lock --------------------------------------------------------------

    def _buffer(self, task_id: str) -> _TaskBuffer:
        buf = self._tasks.get(task_id)
        if buf is None:
            buf = self._tasks[task_id] = _TaskBuffer()
            while len(self._tasks) > MAX_TASKS:
                self._tasks.popitem(last=False)
        return buf

    @staticmethod
    def _add(buf: _TaskBuffer, line: m.OutputLine) -> None:
        if buf.kept < MAX_LINES:
            buf.kept += 1
            buf.lines.append(line)
        else:
            buf.dropped += 1

    def _mark_pending(self) -> bool:
        """True where the caller must schedule a wake-up (none is due yet)."""
        self.pending = True
        if self._wake_due:
            return False
        self._wake_due = True
        return True

    def _schedule_wake(self) -> None:
        timer = threading.Timer(FLUSH_DELAY_S, self._wake)
        timer.daemon = True
        timer.start()


def _cut(text: str) -> str:
    if len(text) <= MAX_LINE_CHARS:
        return text
    return f"{text[:MAX_LINE_CHARS]}... ({len(text) - MAX_LINE_CHARS} more characters)"


class _Stream(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` of a worker: task code's writes go to its task's buffer."""

    def __init__(self, capture: Capture, name: str, original: TextIO) -> None:
        self._capture, self._name, self._original = capture, name, original

    def write(self, text: str) -> int:
        where = _current()
        if where is None:
            return self._original.write(text)
        if text:
            self._capture.write(self._name, text, where)
        return len(text)

    def flush(self) -> None:
        self._original.flush()

    def fileno(self) -> int:
        return self._original.fileno()

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._original, "encoding", "utf-8")


class _Handler(logging.Handler):
    """On the root logger: a record from task code goes to its task's buffer."""

    def __init__(self, capture: Capture, original_stderr: TextIO) -> None:
        super().__init__()
        self._capture, self._stderr = capture, original_stderr
        self._plain = logging.Formatter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            where = _current()
            if where is None:  # not task code: what Python's last resort would do
                if record.levelno >= logging.WARNING:
                    self._stderr.write(self._plain.format(record) + "\n")
                return
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + self._plain.formatException(record.exc_info)
            self._capture.record(record, text, where)
        except Exception:
            self.handleError(record)


_CAPTURE: Capture | None = None


def install(wake: Callable[[], None]) -> Capture:
    """Catch task output in this (worker) process; ``wake`` is called, from a timer thread, when
    there is something to ``drain``. Records at INFO and above reach the handler (Python's
    default is WARNING: a task's ``logging.info`` would be lost)."""
    global _CAPTURE
    capture = Capture(wake)
    original_err = sys.__stderr__ or sys.stderr
    sys.stdout = _Stream(capture, "stdout", sys.__stdout__ or sys.stdout)
    sys.stderr = _Stream(capture, "stderr", original_err)
    root = logging.getLogger()
    root.addHandler(_Handler(capture, original_err))
    if root.level == logging.WARNING:
        root.setLevel(logging.INFO)
    _CAPTURE = capture
    return capture


def report_progress(task_id: str, done: int, total: int) -> None:
    """A task's progress, for its client (nothing happens outside a worker process)."""
    if _CAPTURE is not None:
        _CAPTURE.progress(task_id, done, total)


def drain() -> list[Any]:
    if _CAPTURE is None or not _CAPTURE.pending:
        return []
    return _CAPTURE.drain()
