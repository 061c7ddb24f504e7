"""What users subclass: ``Task`` and ``ParallelTask`` (and ``Unit``, to name dependencies).

The driver of a ParallelTask is a pykka actor of its own in its worker process:
its mailbox receives the instance's input (start, unit results to reduce) from
the worker's shell, and its slicer ``get_work`` is pulled lazily from there, a
bounded look-ahead at a time (a task of a million units never holds them all),
without holding up the Worker actor's mailbox. A plain Task, and a ParallelTask
instance that only runs units, has no conversation of its own: it lives in the
Worker actor's mailbox (``host_instance``), which saves an actor thread per
instance (235 us of CPU per task, a quarter of a worker's cost per small task).
Either way user code (``work``, ``reduce``) runs on the process's one executor
thread, which reports back by ``tell``-ing the instance's mailbox, so the
instance's state only changes inside one mailbox. Units themselves
(``work_unit``) are run by the Worker actor's state machine (``unit_runner.py``)
on the same thread.

Framework attributes are prefixed ``task_`` (public) or ``_task_`` (private)
so they do not collide with a user's own attributes.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pykka
import structlog

from actors import messages as m
from actors.errors import InvalidArguments
from actors.serialize import describe_failure, dumps, dumps_result, is_fatal, loads
from actors.shell import simple_inbox
from actors.unit_runner import Gather

log = structlog.get_logger("actors.task")

#: Units a driver may have sliced but not yet seen finished.
LOOKAHEAD = 4096
#: Units per UnitsSliced message.
SLICE_BATCH = 512

Emit = Callable[[m.Message], None]
_created = threading.local()  # the instance Task.__init__ just made, for start_instance()


class Unit:
    """A work unit that other units may depend on, yielded by ``ParallelTask.get_work``.

    ``Unit(arg, after=[u1, u2])`` runs ``work_unit(arg, result_of_u1, result_of_u2)`` once
    ``u1`` and ``u2`` (units yielded earlier) have finished. A Unit's result stays on the worker
    that computed it, and the workers that need it fetch it from there through their nodes;
    ``reduce`` receives the results of the units that no other unit depends on. Plain values
    yielded by ``get_work`` are independent units.
    """

    __slots__ = ("arg", "after", "index")

    def __init__(self, arg: Any, after: Iterable[Unit] = ()) -> None:
        self.arg = arg
        self.after = tuple(after)
        self.index: int | None = None  # set when get_work yields it
        for dep in self.after:
            if not isinstance(dep, Unit):
                raise TypeError(f"Unit(after=...) takes Unit objects, got {dep!r}")

    def __repr__(self) -> str:
        return f"Unit({self.arg!r}, index={self.index})"


class Task(pykka.ThreadingActor):
    """A unit of work: subclass and define ``work(self, ...)``; its return value is the result."""

    task_kind: ClassVar[str] = "task"
    task_id: str = ""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _created.instance = self

    @staticmethod
    def _create_actor_inbox() -> Any:
        return simple_inbox()  # a plain Task makes one per instance: 10 us less each

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
            self._task_runtime = begin_instance(self, message, self.actor_ref.tell)
        elif self._task_runtime is not None:
            return self._task_runtime.handle(message)
        return None



class ParallelTask(Task):
    """A task sliced into work units that run on many workers, then reduced.

    ``get_work(...)`` receives the submitted arguments and yields one argument
    per unit (or a ``Unit`` naming earlier units it depends on); ``work_unit(arg)``
    runs a unit on any worker of the task; ``reduce(results)`` receives the unit
    results in the order they were yielded (only those no other unit depends on).
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


def start_instance(cls: type[Task]) -> tuple[pykka.ActorRef[Any], Task]:
    """Start a task actor and return its ref and the object (the Worker runs its units)."""
    _created.instance = None
    ref = cls.start()
    instance = _created.instance
    _created.instance = None
    if not isinstance(instance, cls):
        ref.stop(block=False)
        raise TypeError(f"{cls.__qualname__}.__init__ did not call Task.__init__")
    return ref, instance


def host_instance(cls: type[Task]) -> Task:
    """Make an instance that lives in the caller's mailbox, with no actor thread of its own."""
    _created.instance = None
    instance = cls()
    created, _created.instance = _created.instance, None
    if created is not instance:
        raise TypeError(f"{cls.__qualname__}.__init__ did not call Task.__init__")
    instance.on_start()
    return instance


def begin_instance(task: Task, message: _Begin, tell: Callable[[Any], None]) -> _Runtime:
    """Start an instance's framework side; ``tell`` reaches the mailbox the instance lives in."""
    task.task_id = message.task_id
    runtime = _Runtime(task, message, tell)
    runtime.begin()
    return runtime


def check_arguments(cls: type[Task], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse, before anything is sent, arguments that do not fit the task's entry point."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise InvalidArguments(repr(cls), "not a Task or ParallelTask subclass")
    entry = cls.task_entry()
    try:
        _signature(entry).bind(None, *args, **kwargs)
    except TypeError as exc:
        raise InvalidArguments(
            f"{cls.__qualname__}.{entry.__name__}{_signature(entry)}",
            _explain_binding(_signature(entry), kwargs, str(exc)),
        ) from None


def _explain_binding(signature: inspect.Signature, kwargs: dict[str, Any], reason: str) -> str:
    """``reason`` and every keyword the entry point does not take, with the closest name it does
    (Python names only the first problem it meets: a missing argument hides a misspelt one)."""
    params = signature.parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return reason
    names = [n for n, p in params.items()
             if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    lowered = {name.lower(): name for name in names}
    extra = []
    for name in kwargs:
        if name in names:
            continue
        close = difflib.get_close_matches(name.lower(), list(lowered), n=1)
        what = f"unexpected keyword argument {name!r}"
        hinted = f"{what} (did you mean {lowered[close[0]]!r}?)" if close else what
        if what in reason:
            reason = reason.replace(what, hinted)
        else:
            extra.append(hinted)
    return "; ".join([reason, *extra])


@functools.lru_cache(maxsize=256)
def _signature(entry: Callable[..., Any]) -> inspect.Signature:
    # Asked for every submit and every start of an instance: 20 us each time, uncached.
    return inspect.signature(entry)


# --- messages of the task actor's mailbox (in-process only) -----------------


@dataclass(frozen=True)
class _Begin:
    task_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    driver: bool
    emit: Emit
    to_worker: Callable[[Any], None]  # the Worker actor's mailbox (to gather held results)


@dataclass(frozen=True)
class UnitResults:
    results: list[tuple[int, bytes]]
    held: list[tuple[int, str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Gathered:
    data: dict[int, bytes]


@dataclass(frozen=True)
class _Finished:
    outcome: m.UnitOutcome
    elapsed: float = 0.0


@dataclass
class _Runtime:
    """The framework side of one task instance; lives in the instance's mailbox."""

    task: Task
    begin_msg: _Begin
    tell: Callable[[Any], None]  # that mailbox
    slicer: Iterator[Any] | None = None
    sliced: int = 0
    exhausted: bool = False
    results: dict[int, bytes] = field(default_factory=dict)
    held: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (worker, address)
    depended_on: set[int] = field(default_factory=set)  # results that feed other units
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
            case UnitResults(results=results, held=held):
                self.results.update(results)
                for index, worker, address in held:
                    self.held[index] = (worker, address)
                self._slice_more()
            case _Gathered(data=data):
                self.results.update(data)
                self._in_executor(self._call_reduce)
            case _Finished(outcome=outcome, elapsed=elapsed):
                self.emit(m.TaskResult(self.task.task_id, outcome, elapsed))
            case _:
                raise TypeError(f"task actor got an unknown message: {message!r}")

    # --- the driver: slicing and reducing -----------------------------------

    def _slice_more(self) -> None:
        while not self.exhausted and self.sliced - self._finished < LOOKAHEAD:
            assert self.slicer is not None
            batch: list[m.UnitCall] = []
            try:
                for item in itertools.islice(self.slicer, SLICE_BATCH):
                    batch.append(self._unit_call(item, self.sliced + len(batch)))
            except Exception as exc:
                self._fail_task(exc)
                return
            self.exhausted = len(batch) < SLICE_BATCH
            self.sliced += len(batch)
            self.emit(m.UnitsSliced(self.task.task_id, batch, self.exhausted))
        if self.exhausted and self._finished >= self.sliced and not self.reducing:
            self.reducing = True
            # Results held on workers that reduce needs (no unit consumed them) are fetched here.
            wanted = [(i, *self.held[i]) for i in sorted(self.held) if i not in self.depended_on]
            if wanted:
                tell = self.tell
                self.begin_msg.to_worker(Gather(self.task.task_id, wanted,
                                                lambda data: tell(_Gathered(data))))
            else:
                self._in_executor(self._call_reduce)

    @property
    def _finished(self) -> int:
        return len(self.results) + len(self.held)

    def _unit_call(self, item: Any, index: int) -> m.UnitCall:
        if not isinstance(item, Unit):
            return m.UnitCall(index, dumps(item))
        if item.index is not None:
            raise ValueError(f"{item!r} was yielded twice")
        deps = []
        for dep in item.after:
            if dep.index is None:
                raise ValueError(f"{item!r} depends on {dep!r}, which get_work has not yielded yet")
            deps.append(dep.index)
            self.depended_on.add(dep.index)
        item.index = index
        return m.UnitCall(index, dumps(item.arg), deps, keep=True)

    def _call_reduce(self) -> _Finished:
        assert isinstance(self.task, ParallelTask)
        ordered = [loads(self.results[i]) for i in range(self.sliced) if i not in self.depended_on]
        self.results.clear()
        return _Finished(_outcome(self._name, lambda: self.task.reduce(ordered)))  # type: ignore[attr-defined]

    def _call_work(self) -> _Finished:
        start = time.perf_counter()
        outcome = _outcome(self._name,
                           lambda: self.task.work(*self.begin_msg.args, **self.begin_msg.kwargs))
        return _Finished(outcome, time.perf_counter() - start)

    @property
    def _name(self) -> str:
        return f"{type(self.task).__qualname__} {self.task.task_id}"

    def _fail_task(self, exc: BaseException) -> None:
        """The slicer (``get_work``) raised, or yielded what cannot be a unit."""
        payload, type_name, message, text = describe_failure(exc, "in get_work, the task's slicer")
        self.exhausted = True
        self.reducing = True
        self.emit(m.TaskResult(self.task.task_id, m.UnitOutcome(
            -1, False, payload, type_name, message, text, fatal=is_fatal(exc))))

    def _in_executor(self, call: Callable[[], Any]) -> None:
        tell = self.tell

        def run() -> None:
            tell(call())

        run_in_executor(run)


def run_in_executor(call: Callable[[], None]) -> None:
    """Run ``call`` on the process's one thread for user code (it must report back itself)."""
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _Executor()
    _EXECUTOR.calls.put(call)


class _Executor:
    """The worker process's one thread for user code, shared by its successive task instances.

    A worker hosts one instance at a time; one that ends badly is killed with its process, so
    nothing of it can still be queued here for the next one. A plain queue and thread, not a
    ThreadPoolExecutor: nobody reads a Future here (each call reports back itself), and making
    one cost 8 us per call.
    """

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        threading.Thread(target=self._run, name="task-exec", daemon=True).start()

    def _run(self) -> None:
        while True:
            call = self.calls.get()
            try:
                call()
            except pykka.ActorDeadError:
                pass  # the mailbox to report to has stopped (its task ended): the news is moot
            except BaseException:  # the call reports its own outcome: this is a framework bug
                log.exception("executor_call_failed")


_EXECUTOR: _Executor | None = None


def _outcome(name: str, call: Callable[[], Any]) -> m.UnitOutcome:
    """What came of the driver's own code (``work``, ``reduce``), by the index -1."""
    try:
        return m.UnitOutcome(-1, True, dumps_result(call(), name))
    except BaseException as exc:
        payload, type_name, message, text = describe_failure(exc)
        return m.UnitOutcome(-1, False, payload, type_name, message, text, fatal=is_fatal(exc))
