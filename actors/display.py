"""What a client shows its user: a task's output lines, and progress bars (``progress``).

Where output is shown. In a terminal, a client prints a task's lines as they arrive (from its
receive thread), each prefixed with the task. In a notebook, output printed from that thread
would land under whichever cell happens to run (or the cell that made the client), so lines
are shown by the thread that waits on the future instead — ``result()``, ``exception()``,
``as_completed`` and ``progress`` — under the cell that waits. Every line is also kept for
``future.logs()``.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from actors.errors import MissingDependency

if TYPE_CHECKING:
    from actors.client import Future


@dataclass(frozen=True)
class TaskLine:
    """One line a task's code printed or logged, with where it came from."""

    task_id: str
    worker_id: str
    phase: str  # "work", "get_work", "work_unit", "reduce"
    unit: int  # the unit's index in work_unit, -1 elsewhere
    stream: str  # "stdout", "stderr" or "log"
    level: str  # a log record's level ("" for stdout and stderr)
    logger: str  # a log record's logger name
    text: str
    time: float  # seconds since the epoch, on the worker

    @property
    def where(self) -> str:
        return f"unit {self.unit}" if self.unit >= 0 else self.phase

    def __str__(self) -> str:
        text = f"{self.level} {self.logger}: {self.text}" if self.stream == "log" else self.text
        return f"[{self.task_id} {self.where}] {text}"


def in_notebook() -> bool:
    """Whether this process is a Jupyter kernel (its stdout is the kernel's stream)."""
    return type(sys.stdout).__module__.startswith("ipykernel")


def show_lines(lines: Iterable[TaskLine | str]) -> None:
    """Print task output for the user: stdout lines to stdout, stderr and log lines to stderr.

    The one place where the library prints: this is the user's own output, handed back."""
    for line in lines:
        err = not isinstance(line, TaskLine) or line.stream != "stdout"
        print(str(line), file=sys.stderr if err else sys.stdout, flush=True)


# --- progress bars ----------------------------------------------------------------


def _tqdm() -> Any:
    try:
        from tqdm.std import tqdm
    except ImportError:
        raise MissingDependency("tqdm", "actors.progress", "notebook") from None
    if importlib.util.find_spec("ipywidgets") is None:
        # tqdm.auto would warn (TqdmWarning: IProgress not found) in every notebook without
        # ipywidgets, then draw these same text bars.
        return tqdm
    from tqdm.auto import tqdm as auto
    return auto


def progress(futures: Future | Iterable[Future], *, timeout: float | None = None,
             interval: float = 0.1) -> list[Future]:
    """Draw one live progress bar per task (a widget in a notebook, text in a terminal) until
    every task has ended, then close each with its status; returns the futures.

    A ParallelTask's bar counts units: its length is known once its slicer is exhausted, or
    from the start where the task declares ``task_total``. A plain Task's bar counts what its
    ``work`` reports with ``task_progress`` (else it fills when the task ends). The tasks'
    output is shown under the bars as it arrives. Raises TimeoutError if ``timeout`` passes.
    Needs tqdm (``pip install 'pydra-actors[notebook]'``).
    """
    futs: list[Future] = [futures] if hasattr(futures, "task_id") else list(futures)  # type: ignore[list-item,arg-type]
    tqdm = _tqdm()
    changed = threading.Event()
    for fut in futs:
        fut._on_end(lambda _fut: changed.set())
    deadline = None if timeout is None else time.monotonic() + timeout
    bars = [tqdm(total=fut.progress()[1], desc=f"{fut.name} {fut.task_id}", unit="unit",
                 leave=True, dynamic_ncols=True) for fut in futs]
    closed = [False] * len(futs)
    try:
        while True:
            for i, (fut, bar) in enumerate(zip(futs, bars, strict=True)):
                if closed[i]:
                    continue
                ended = fut.done()  # before progress: its last progress came before its end
                _draw(bar, fut)
                if ended:
                    if fut.status != "finished":
                        bar.colour = "red"  # a notebook bar turns red only when short of its end
                    bar.close()
                    closed[i] = True
            for fut in futs:
                fut._show_output(waiting=True)
            if all(closed):
                return futs
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"tasks not done after {timeout}s")
            changed.wait(interval)
            changed.clear()
    finally:
        for bar, is_closed in zip(bars, closed, strict=True):
            if not is_closed:
                bar.close()


def _draw(bar: Any, fut: Future) -> None:
    done, total = fut.progress()
    if total != bar.total and total is not None:
        bar.reset(total=total)  # the length became known, or changed (a declared total)
    if done != bar.n:
        bar.n = done
    bar.set_postfix_str(fut.status, refresh=False)
    bar.refresh()
