"""What users subclass: ``Task`` and ``ParallelTask``.

A running task instance is a pykka actor in its worker process. Its mailbox
receives the instance's input (start, units to run, unit results to reduce)
from the worker's shell; user code (``work``, ``work_unit``, ``reduce``)
runs on one executor thread, which reports back by ``tell``-ing the actor, so
the instance's state only changes inside its mailbox. The slicer
``get_work`` is pulled lazily from the mailbox, a bounded look-ahead at a
time: a task of a million units never holds them all.

Framework attributes are prefixed ``task_`` (public) or ``_task_`` (private)
so they do not collide with a user's own attributes.
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

import pykka
import structlog

from actors import messages as m
from actors.errors import InvalidArguments
from actors.serialize import describe_exception, dumps, loads

log = structlog.get_logger("actors.task")

#: Units a driver may have sliced but not yet seen finished.
LOOKAHEAD = 4096
#: Units per UnitsSliced message.
SLICE_BATCH = 512

Emit = Callable[[m.Message], None]


class Task(pykka.ThreadingActor):
    """A unit of work: subclass and define ``work(self, ...)``; its return value is the result."""

    task_kind: ClassVar[str] = "task"
    task_id: str = ""

    def work(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__qualname__} must define work()")

    # --- framework ----------------------------------------------------------

    @classmethod
    def task_entry(cls) -> Callable[..., Any]:
        """The method whose signature the submitted arguments must fit."""
        return cls.work

    def on_start(self) -> None:
        self._task_runtime: _Runtime | None = None

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, _Begin):
            self.task_id = message.task_id
            self._task_runtime = _Runtime(self, message)
            self._task_runtime.begin()
        elif self._task_runtime is not None:
            return self._task_runtime.handle(message)
        return None



class ParallelTask(Task):
    """A task sliced into work units that run on many workers, then reduced.

    ``get_work(...)`` receives the submitted arguments and yields one argument
    per unit; ``work_unit(arg)`` runs a unit on any worker of the task;
    ``reduce(results)`` receives the unit results in the order they were yielded.
    """

    task_kind: ClassVar[str] = "parallel"

    def get_work(self, *args: Any, **kwargs: Any) -> Iterable[Any]:
        raise NotImplementedError(f"{type(self).__qualname__} must define get_work()")

    def work_unit(self, unit: Any) -> Any:
        raise NotImplementedError(f"{type(self).__qualname__} must define work_unit()")

    def reduce(self, results: list[Any]) -> Any:
        return results

    @classmethod
    def task_entry(cls) -> Callable[..., Any]:
        return cls.get_work


def check_arguments(cls: type[Task], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse, before anything is sent, arguments that do not fit the task's entry point."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise InvalidArguments(repr(cls), "not a Task or ParallelTask subclass")
    entry = cls.task_entry()
    try:
        inspect.signature(entry).bind(None, *args, **kwargs)
    except TypeError as exc:
        raise InvalidArguments(
            f"{cls.__qualname__}.{entry.__name__}{inspect.signature(entry)}", str(exc)
        ) from None


# --- messages of the task actor's mailbox (in-process only) -----------------


@dataclass(frozen=True)
class _Begin:
    task_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    driver: bool
    emit: Emit


@dataclass(frozen=True)
class RunUnits:
    run_id: int
    units: list[m.UnitCall]


@dataclass(frozen=True)
class UnitResults:
    results: list[tuple[int, bytes]]


@dataclass(frozen=True)
class _UnitsRan:
    run_id: int
    outcomes: list[m.UnitOutcome]
    elapsed: float


@dataclass(frozen=True)
class _Finished:
    outcome: m.UnitOutcome


@dataclass
class _Runtime:
    """The framework side of one task instance; lives in the task actor's mailbox."""

    task: Task
    begin_msg: _Begin
    slicer: Iterator[Any] | None = None
    sliced: int = 0
    exhausted: bool = False
    results: dict[int, bytes] = field(default_factory=dict)
    reducing: bool = False

    @property
    def emit(self) -> Emit:
        return self.begin_msg.emit

    def begin(self) -> None:
        if not self.begin_msg.driver:
            return
        if isinstance(self.task, ParallelTask):
            try:
                self.slicer = iter(self.task.get_work(*self.begin_msg.args, **self.begin_msg.kwargs))
            except Exception as exc:
                self._fail_task(exc)
                return
            self._slice_more()
        else:
            self._in_executor(self._call_work)

    def handle(self, message: Any) -> None:
        match message:
            case RunUnits(run_id=run_id, units=units):
                self._in_executor(partial(self._run_units, run_id, units))
            case _UnitsRan(run_id=run_id, outcomes=outcomes, elapsed=elapsed):
                self.emit(m.UnitsDone(self.task.task_id, run_id, outcomes, elapsed))
            case UnitResults(results=results):
                self.results.update(results)
                self._slice_more()
            case _Finished(outcome=outcome):
                self.emit(m.TaskResult(self.task.task_id, outcome))
            case _:
                raise TypeError(f"task actor got an unknown message: {message!r}")

    # --- the driver: slicing and reducing -----------------------------------

    def _slice_more(self) -> None:
        while not self.exhausted and self.sliced - len(self.results) < LOOKAHEAD:
            assert self.slicer is not None
            batch: list[m.UnitCall] = []
            try:
                for arg in itertools.islice(self.slicer, SLICE_BATCH):
                    batch.append(m.UnitCall(self.sliced + len(batch), dumps(arg)))
            except Exception as exc:
                self._fail_task(exc)
                return
            self.exhausted = len(batch) < SLICE_BATCH
            self.sliced += len(batch)
            self.emit(m.UnitsSliced(self.task.task_id, batch, self.exhausted))
        if self.exhausted and len(self.results) >= self.sliced and not self.reducing:
            self.reducing = True
            self._in_executor(self._call_reduce)

    def _call_reduce(self) -> _Finished:
        assert isinstance(self.task, ParallelTask)
        ordered = [loads(self.results[i]) for i in range(self.sliced)]
        self.results.clear()
        return _Finished(_outcome(-1, lambda: self.task.reduce(ordered)))  # type: ignore[attr-defined]

    def _call_work(self) -> _Finished:
        return _Finished(
            _outcome(-1, lambda: self.task.work(*self.begin_msg.args, **self.begin_msg.kwargs))
        )

    def _fail_task(self, exc: BaseException) -> None:
        payload, type_name, message, text = describe_exception(exc)
        self.exhausted = True
        self.reducing = True
        self.emit(m.TaskResult(self.task.task_id, m.UnitOutcome(-1, False, payload, type_name, message, text)))

    # --- running units -------------------------------------------------------

    def _run_units(self, run_id: int, units: list[m.UnitCall]) -> _UnitsRan:
        """Run a batch on the executor thread; its duration sizes the next batches."""
        assert isinstance(self.task, ParallelTask)
        started = time.perf_counter()
        work_unit = self.task.work_unit
        outcomes = []
        for unit in units:
            outcome = _outcome(unit.index, partial(_call_unit, work_unit, unit.args))
            outcomes.append(outcome)
            if not outcome.ok:
                break  # the task fails; the rest of the batch would be wasted
        return _UnitsRan(run_id, outcomes, time.perf_counter() - started)

    def _in_executor(self, call: Callable[[], Any]) -> None:
        actor = self.task.actor_ref

        def run() -> None:
            actor.tell(call())

        _executor().submit(run)


_EXECUTOR: ThreadPoolExecutor | None = None


def _executor() -> ThreadPoolExecutor:
    """The worker process's one thread for user code, shared by its successive task instances.

    A worker hosts one instance at a time; one that ends badly is killed with its
    process, so nothing of it can still be queued here for the next one.
    """
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = ThreadPoolExecutor(1, thread_name_prefix="task-exec")
    return _EXECUTOR


def _call_unit(work_unit: Callable[[Any], Any], args: bytes) -> Any:
    return work_unit(loads(args))


def _outcome(index: int, call: Callable[[], Any]) -> m.UnitOutcome:
    try:
        return m.UnitOutcome(index, True, dumps(call()))
    except Exception as exc:
        payload, type_name, message, text = describe_exception(exc)
        return m.UnitOutcome(index, False, payload, type_name, message, text)
