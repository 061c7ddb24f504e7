"""What a task's code prints, logs and reports as progress, caught in its worker
(``actors.task_output``), fed directly: lines, their bounds, progress, the wake-up, and what
is not task code. The process tests (test_first_hour.py, the notebooks) see it reach a client;
these check each rule of the module on its own."""

from __future__ import annotations

import io
import logging
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from actors import messages as m
from actors import task_output
from actors.task_output import MAX_LINE_CHARS, MAX_LINES, MAX_TASKS, Capture
from tests.conftest import wait_until

WORK = ("t1", "work", -1)


def lines(out: list[m.Message]) -> list[tuple[str, str, str, int, str]]:
    """(task, stream, phase, unit, text) of every line drained."""
    return [(msg.task_id, line.stream, line.phase, line.unit, line.text)
            for msg in out if isinstance(msg, m.TaskOutput) for line in msg.lines]


@pytest.fixture
def capture() -> Iterator[Capture]:
    yield Capture(lambda: None)


def test_a_line_ends_at_a_newline_and_keeps_its_stream_phase_and_unit(capture: Capture) -> None:
    assert not capture.pending and task_output.drain() == []
    before = time.time()
    capture.write("stdout", "hello\nwor", WORK)
    capture.write("stdout", "ld\n", WORK)
    capture.write("stderr", "oops\n", ("t1", "work_unit", 7))
    out = capture.drain()
    assert lines(out) == [("t1", "stdout", "work", -1, "hello"),
                          ("t1", "stdout", "work", -1, "world"),
                          ("t1", "stderr", "work_unit", 7, "oops")]
    assert isinstance(out[0], m.TaskOutput) and out[0].worker_id == ""  # (its worker says)
    assert all((line.level, line.logger) == ("", "") and before <= line.time <= time.time()
               for line in out[0].lines)
    assert capture.drain() == [] and not capture.pending


def test_an_unfinished_line_waits_for_its_end_or_for_its_phase_to_return(capture: Capture) -> None:
    """The driver's get_work and a helper's work_unit may write at once: their halves of a
    line never mix, and a phase's last words are a line when it returns."""
    capture.write("stdout", "slicing", ("t1", "get_work", -1))
    capture.write("stdout", "unit 3 says", ("t1", "work_unit", 3))
    capture.write("stdout", " hi\n", ("t1", "work_unit", 3))
    assert lines(capture.drain()) == [("t1", "stdout", "work_unit", 3, "unit 3 says hi")]
    assert capture.pending  # "slicing" waits
    capture.end_lines("t1", "get_work")
    capture.end_lines("t9", "work")  # a task that wrote nothing: nothing to end
    out = capture.drain()
    assert lines(out) == [("t1", "stdout", "get_work", -1, "slicing")]
    assert isinstance(out[0], m.TaskOutput) and (out[0].lines[0].level, out[0].lines[0].logger) == (
        "", "") and out[0].lines[0].time > 0
    assert not capture.pending


def test_a_task_keeps_at_most_its_lines_each_cut_and_counts_the_rest(capture: Capture) -> None:
    capture.write("stdout", "x" * (MAX_LINE_CHARS + 5) + "\n", WORK)
    capture.write("stdout", "".join(f"{n}\n" for n in range(MAX_LINES + 4)), WORK)
    out = capture.drain()
    assert len(out) == 1 and isinstance(out[0], m.TaskOutput)
    assert len(out[0].lines) == MAX_LINES and out[0].dropped == 5
    assert out[0].lines[0].text == "x" * MAX_LINE_CHARS + "... (5 more characters)"
    capture.write("stdout", "more\n", WORK)  # the cap is per task and worker, not per batch
    assert [(msg.lines, msg.dropped) for msg in capture.drain()
            if isinstance(msg, m.TaskOutput)] == [([], 1)]
    capture.write("stdout", "x" * MAX_LINE_CHARS + "\n", ("t2", "work", -1))
    assert lines(capture.drain())[0][4] == "x" * MAX_LINE_CHARS  # at the bound: whole


def test_only_the_newest_tasks_are_remembered(capture: Capture) -> None:
    for n in range(MAX_TASKS + 1):
        capture.write("stdout", "hi\n", (f"t{n}", "work", -1))
    tasks = [msg.task_id for msg in capture.drain() if isinstance(msg, m.TaskOutput)]
    assert len(tasks) == MAX_TASKS and "t0" not in tasks and f"t{MAX_TASKS}" in tasks


def test_progress_keeps_its_newest_value_and_each_value_is_sent_once(capture: Capture) -> None:
    capture.progress("t1", 1, 10)
    capture.progress("t1", 5, 10)
    assert capture.drain() == [m.WorkProgress("t1", 5, 10)]
    assert capture.drain() == []
    capture.progress("t1", 5, 10)  # told again, unchanged
    assert capture.drain() == []
    capture.progress("t1", 10, 10)
    capture.write("stdout", "done\n", WORK)
    out = capture.drain()
    assert out[0] == m.WorkProgress("t1", 10, 10) and lines(out) == [
        ("t1", "stdout", "work", -1, "done")]


def test_a_burst_of_writes_wakes_the_worker_once_and_a_drain_lets_it_wake_again() -> None:
    woken: list[str] = []
    capture = Capture(lambda: woken.append(threading.current_thread().name))
    for n in range(100):
        capture.write("stdout", f"{n}\n", WORK)
    wait_until(lambda: woken, 10, "the first wake-up")
    assert len(capture.drain()) == 1
    capture.progress("t1", 1, 2)
    wait_until(lambda: len(woken) == 2, 10, "the second wake-up")
    assert len(woken) == 2 and threading.current_thread().name not in woken  # (a timer's)


def test_print_in_task_code_is_the_tasks_and_elsewhere_goes_where_it_went(
        capture: Capture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_output, "_CAPTURE", capture)
    real = io.TextIOWrapper(io.BytesIO(), encoding="latin-1", write_through=True)
    stream = task_output._Stream(capture, "stdout", real)
    print("the runtime's own", file=stream)
    task_output.enter("t1", "work_unit", 4)
    try:
        print("from unit 4", file=stream)
        task_output.at_unit(5)
        stream.write("no newline from 5")
    finally:
        task_output.leave()  # the phase returned: its last words are a line
    assert real.buffer.getvalue() == b"the runtime's own\n"  # type: ignore[attr-defined]
    assert lines(task_output.drain()) == [("t1", "stdout", "work_unit", 4, "from unit 4"),
                                          ("t1", "stdout", "work_unit", 5, "no newline from 5")]
    assert task_output.drain() == []  # nothing pending: nothing asked of the capture
    assert not stream.isatty() and stream.writable() and stream.encoding == "latin-1"


def test_logging_in_task_code_is_the_tasks_and_elsewhere_only_warnings_reach_stderr(
        capture: Capture) -> None:
    stderr = io.StringIO()
    handler = task_output._Handler(capture, stderr)
    logger = logging.getLogger("users.module")

    def record(level: int, text: str, exc: bool = False) -> logging.LogRecord:
        info = None
        if exc:
            try:
                raise KeyError("k")
            except KeyError:
                info = sys.exc_info()
        return logger.makeRecord(logger.name, level, __file__, 1, text, (), info)

    handler.emit(record(logging.INFO, "runtime chatter"))
    handler.emit(record(logging.WARNING, "runtime warning"))
    task_output.enter("t1", "work_unit", 2)
    try:
        info = record(logging.INFO, "a task's info")
        handler.emit(info)
        handler.emit(record(logging.ERROR, "a task's error", exc=True))
    finally:
        task_output.leave()
    assert stderr.getvalue() == "runtime warning\n"
    drained = [msg for msg in capture.drain() if isinstance(msg, m.TaskOutput)]
    assert [msg.task_id for msg in drained] == ["t1"]
    out = drained[0].lines
    assert [(line.stream, line.level, line.logger, line.phase, line.unit) for line in out] == [
        ("log", "INFO", "users.module", "work_unit", 2),
        ("log", "ERROR", "users.module", "work_unit", 2)]
    assert (out[0].text, out[0].time) == ("a task's info", info.created)
    assert out[1].text.startswith("a task's error\nTraceback") and "KeyError: 'k'" in out[1].text


def test_progress_in_a_worker_is_its_tasks_and_outside_one_goes_nowhere(
        capture: Capture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(task_output, "_CAPTURE", capture)
    task_output.report_progress("t1", 1, 2)
    assert task_output.drain() == [m.WorkProgress("t1", 1, 2)]
    monkeypatch.setattr(task_output, "_CAPTURE", None)
    task_output.report_progress("t1", 2, 2)  # (a Task run in the client's own process)
    assert task_output.drain() == []
