"""What a worker writes to its own stdout and stderr, logged by its node as that worker's.

Task code runs in its worker and may write to the process's descriptors 1 and 2 directly
(``os.write``, a C library, a subprocess it starts): what goes through ``sys.stdout`` is the
task's and reaches its client (task_output.py), but a raw write went to the node's own stderr,
the operator's log, where it could pass for a line of the node or the master, carry terminal
escapes, or flood it. A worker's descriptors 1 and 2 are a pipe to its node instead: each line
read there is logged by the node as a ``worker_output`` event with the worker's id bound, its
control characters escaped, cut at ``LINE_CHARS``, and at most ``LINES_PER_WINDOW`` lines of a
worker per ``WINDOW_S`` (the rest counted and said once a window). The worker's own log lines
come the same way: task code can write anything the worker can, so nothing read there is more
than what that worker said.

``OutputLines`` is the pure part (bytes in, what to log out); ``relay`` is the thread that reads
a worker's pipe until every writer has closed it.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Callable
from typing import NamedTuple

import structlog

LINE_CHARS = 4_000  # past this a line is cut (a structlog line in JSON carries its traceback)
LINES_PER_WINDOW = 1_000
WINDOW_S = 10.0
READ_BYTES = 65_536

# The level a worker's structlog line says it is at (console or JSON rendering); a line without
# one is raw output, logged as a warning: nothing of the runtime writes such lines.
_LEVEL = re.compile(rb'\[(debug|info|warning|error|critical)\s*\]|"level": ?"(debug|info|warning|'
                    rb'error|critical)"')
_LEVELS = {b"debug": "debug", b"info": "info", b"warning": "warning", b"error": "error",
           b"critical": "error"}


def printable(text: str) -> str:
    """``text`` with every character that is not printable (escapes, carriage returns, the
    bidirectional overrides) written as its Python escape."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class Said(NamedTuple):
    """What to log: a line, or that the window's limit was reached (``limited``), or how many
    lines the window dropped (``dropped``)."""

    level: str
    line: str = ""
    dropped: int = 0
    limited: bool = False


class OutputLines:
    """Bytes a worker wrote, in; what to log of them, out."""

    def __init__(self) -> None:
        self._partial = bytearray()
        self._cut = False  # the current line was cut: its rest is skipped up to its newline
        self._window_start: float | None = None
        self._in_window = 0
        self._dropped = 0

    def feed(self, chunk: bytes, now: float) -> list[Said]:
        out: list[Said] = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            self._add(chunk[start:end])
            self._line_ended(now, out)
            start = end + 1
        self._add(chunk[start:])
        return out

    def end(self, now: float) -> list[Said]:
        """The pipe closed: the last line without its newline, and what was dropped."""
        out: list[Said] = []
        if self._partial or self._cut:
            self._line_ended(now, out)
        if self._dropped:
            out.append(Said("warning", dropped=self._dropped))
            self._dropped = 0
        return out

    def _add(self, piece: bytes) -> None:
        room = LINE_CHARS - len(self._partial)
        if len(piece) > room:
            self._partial += piece[:max(room, 0)]
            self._cut = True
        elif not self._cut:
            self._partial += piece

    def _line_ended(self, now: float, out: list[Said]) -> None:
        raw, cut = bytes(self._partial), self._cut
        self._partial.clear()
        self._cut = False
        if self._window_start is None or now - self._window_start >= WINDOW_S:
            if self._dropped:
                out.append(Said("warning", dropped=self._dropped))
            self._window_start, self._in_window, self._dropped = now, 0, 0
        if self._in_window >= LINES_PER_WINDOW:
            if not self._dropped:
                out.append(Said("warning", limited=True))
            self._dropped += 1
            return
        self._in_window += 1
        found = _LEVEL.search(raw, 0, 200)
        level = _LEVELS[found.group(1) or found.group(2)] if found else "warning"
        line = printable(raw.rstrip(b"\r").decode(errors="replace"))
        out.append(Said(level, line + (" [cut]" if cut else "")))


def relay(fd: int, log: structlog.typing.FilteringBoundLogger,
          clock: Callable[[], float] = time.monotonic) -> None:
    """Read a worker's pipe until it closes, logging each line (a thread of the node's)."""
    lines = OutputLines()
    try:
        while True:
            try:
                chunk = os.read(fd, READ_BYTES)
            except InterruptedError:
                continue
            except OSError:
                break
            said = lines.feed(chunk, clock()) if chunk else lines.end(clock())
            for one in said:
                if one.limited:
                    log.warning("worker_output_limited", lines=LINES_PER_WINDOW, window_s=WINDOW_S,
                                hint="its further lines this window are counted, not logged; "
                                     "what a task print()s goes to its client")
                elif one.dropped:
                    log.warning("worker_output_dropped", lines=one.dropped, window_s=WINDOW_S)
                else:
                    getattr(log, one.level)("worker_output", line=one.line)
            if not chunk:
                break
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
