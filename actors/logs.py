"""structlog set-up shared by every process: console for people, JSON lines for machines."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Literal, TextIO, cast

import structlog

LogFormat = Literal["auto", "console", "json"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--log-format`` and ``--log-level``, as every command that logs takes them."""
    parser.add_argument("--log-format", default="auto", choices=["auto", "console", "json"],
                        help="console on a terminal, JSON otherwise (auto); $ACTORS_LOG_FORMAT")
    parser.add_argument("--log-level", default=None,
                        choices=["debug", "info", "warning", "error"],
                        help="the least a line is logged at (default info; debug: every task; "
                             "$ACTORS_LOG_LEVEL)")


def configure(fmt: str = "auto", level: str | None = None) -> None:
    """Configure structlog for this process. ``auto`` picks console on a terminal, JSON otherwise.

    Child processes inherit the choice through ``ACTORS_LOG_FORMAT``/``ACTORS_LOG_LEVEL``.
    """
    fmt = os.environ.get("ACTORS_LOG_FORMAT", fmt) if fmt == "auto" else fmt
    level_name = (level or os.environ.get("ACTORS_LOG_LEVEL") or "INFO").upper()
    if fmt not in ("auto", "console", "json"):
        raise ValueError(f"unknown log format {fmt!r} (choose auto, console or json)")
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        # One write per line (message and newline together): several processes share a stderr,
        # and a line split in two writes can interleave with another process's.
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, _DropWhenClosed(sys.stderr))),
        cache_logger_on_first_use=False,
    )
    os.environ["ACTORS_LOG_FORMAT"] = "json" if use_json else "console"
    os.environ["ACTORS_LOG_LEVEL"] = level_name


def debug_enabled(log: object) -> bool:
    """Whether ``log`` writes debug lines: a hot path asks once, not at every line (a line
    filtered out is still a call with its fields built, ~0.3 us, several a task). structlog
    before 25.1 cannot say (no ``is_enabled_for``): then every line is made, as before."""
    is_enabled_for = getattr(log, "is_enabled_for", None)
    return True if is_enabled_for is None else bool(is_enabled_for(logging.DEBUG))


class _DropWhenClosed:
    """stderr as structlog writes to it. When whoever read it is gone (an ssh connection that
    dropped, a closed terminal's pipe), a line is dropped: an exception there would end the
    actor that logged it, and a process that cannot log must still stop when told to (a node
    whose parent is gone logs that, then stops)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        with contextlib.suppress(OSError, ValueError):
            self._stream.write(text)
        return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


class Refusals:
    """How often each sender (a worker) had something refused: a warning for each would let
    task code write the log as fast as it sends. ``count`` says whether to log this one (the
    1st, 2nd, 4th, 8th... of a sender), and the count to log with it."""

    MAX_SENDERS = 4096  # the oldest forgotten first

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def count(self, sender: str) -> int:
        """This refusal's number for ``sender`` when it is one to log, else 0."""
        n = self.counts.pop(sender, 0) + 1
        self.counts[sender] = n  # (last in order: the oldest go first past MAX_SENDERS)
        if len(self.counts) > self.MAX_SENDERS:
            del self.counts[next(iter(self.counts))]
        return n if n & (n - 1) == 0 else 0

    def forget(self, sender: str) -> None:
        self.counts.pop(sender, None)


class RefusalLimit:
    """Refusals per sender within a window: a sender past ``limit`` of them within
    ``interval_s`` is told once (``passed``), then counted afresh. For what task code can send
    as fast as it likes: its worker is ended rather than its node kept busy refusing."""

    MAX_SENDERS = 4096  # the oldest forgotten first

    def __init__(self, limit: int, interval_s: float) -> None:
        self.limit, self.interval_s = limit, interval_s
        self.windows: dict[str, tuple[float, int]] = {}  # sender -> (window's start, count)

    def passed(self, sender: str, now: float) -> bool:
        """Count one refusal of ``sender`` at ``now``: whether it passed the limit with it."""
        since, n = self.windows.pop(sender, (now, 0))
        if now - since > self.interval_s:
            since, n = now, 0
        if n + 1 > self.limit:
            return True  # (not kept: counted afresh from the next one)
        self.windows[sender] = (since, n + 1)  # (last in order: the oldest go first)
        if len(self.windows) > self.MAX_SENDERS:
            del self.windows[next(iter(self.windows))]
        return False

    def forget(self, sender: str) -> None:
        self.windows.pop(sender, None)
