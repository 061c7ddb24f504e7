"""A worker's raw stdout and stderr reach the operator's log only as that worker's lines:
escapes written out, lines cut, a flood counted rather than logged (worker_output.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest

from actors import Client, LocalCluster, Task
from actors.worker_output import (
    LINE_CHARS,
    LINES_PER_WINDOW,
    WINDOW_S,
    OutputLines,
    Said,
    printable,
)
from tests.conftest import stderr_so_far, wait_until


def test_lines_are_split_escaped_and_given_their_level() -> None:
    lines = OutputLines()
    out = lines.feed(b'2026 [info     ] worker_started x=1\n\x1b[31mred\r\n{"level": "error"', 0.0)
    assert out == [Said("info", "2026 [info     ] worker_started x=1"), Said("warning", "\\x1b[31mred")]
    assert lines.feed(b', "event": "e"}\nhalf', 0.1) == [Said("error", '{"level": "error", "event": "e"}')]
    assert lines.end(0.2) == [Said("warning", "half")]  # the last line, without its newline
    assert printable("a\u202eb\x07") == "a\\u202eb\\x07"


def test_a_long_line_is_cut_and_its_rest_skipped() -> None:
    lines = OutputLines()
    assert lines.feed(b"x" * (LINE_CHARS - 10), 0.0) == []
    out = lines.feed(b"y" * 100 + b"\nnext\n", 0.0)
    assert out == [Said("warning", "x" * (LINE_CHARS - 10) + "y" * 10 + " [cut]"),
                   Said("warning", "next")]


def test_a_flood_is_counted_once_a_window() -> None:
    lines = OutputLines()
    said = lines.feed(b"line\n" * (LINES_PER_WINDOW + 25), 0.0)
    assert said == [Said("warning", "line")] * LINES_PER_WINDOW + [Said("warning", limited=True)]
    said = lines.feed(b"later\n", WINDOW_S)  # the next window: the dropped said, then the line
    assert said == [Said("warning", dropped=25), Said("warning", "later")]
    assert lines.feed(b"more\n" * LINES_PER_WINDOW, WINDOW_S + 1)[-1] == Said("warning", limited=True)
    assert lines.end(WINDOW_S + 2) == [Said("warning", dropped=1)]


class WritesRaw(Task):
    def work(self, n: int) -> int:
        os.write(2, b"\x1b[2J2026-12-05T00:00:00Z [error    ] master_lost  forged=1\n")
        os.write(1, b"raw to stdout\n")
        for i in range(n):
            os.write(2, b"flood %d\n" % i)
        return n


@pytest.mark.processes
def test_task_code_writing_to_its_descriptors_is_logged_as_its_worker(
        capfd: pytest.CaptureFixture[str]) -> None:
    """Task code wrote to the node's own stderr: a line passing for the master's, a terminal
    escape, as many lines as it liked. Now each is a ``worker_output`` of its worker."""
    with LocalCluster(workers=1) as cl, Client(cl) as client:
        assert client.submit(WritesRaw, LINES_PER_WINDOW + 500).result(60) == LINES_PER_WINDOW + 500
        wait_until(lambda: "worker_output_limited" in stderr_so_far(capfd), 30,
                   "the node to say it limits the lines")
    err = capfd.readouterr().err  # (the count of what was dropped is said at the pipe's end)
    assert "\x1b" not in err
    forged = [line for line in err.splitlines() if "forged=1" in line]
    assert len(forged) == 1 and "worker_output" in forged[0] and "/w1" in forged[0], forged
    assert any("worker_output" in line and "raw to stdout" in line for line in err.splitlines())
    assert sum("flood" in line for line in err.splitlines()) == LINES_PER_WINDOW - 2
    assert "lines=502" in err


class Pid(Task):
    def work(self) -> int:
        return os.getpid()


class SaysRaw(Task):
    def work(self, text: str) -> int:
        os.write(2, text.encode() + b"\n")
        return os.getpid()


@pytest.mark.processes
def test_a_spawned_worker_is_logged_as_its_own_too(capfd: pytest.CaptureFixture[str]) -> None:
    """A worker that replaces one killed is a fresh interpreter (not forked): its descriptors
    go to its node the same way."""
    with LocalCluster(workers=1) as cl, Client(cl) as client:
        first = client.submit(Pid).result(30)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while (pid := client.submit(SaysRaw, "from-the-replacement").result(30)) == first:
            assert time.monotonic() < deadline, "the killed worker was not replaced"
        wait_until(lambda: "from-the-replacement" in stderr_so_far(capfd), 30, "its line")
    lines = [line for line in capfd.readouterr().err.splitlines() if "from-the-replacement" in line]
    assert lines and all("worker_output" in line and "/w2" in line for line in lines), lines
    assert pid != first
