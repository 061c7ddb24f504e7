"""What users subclass: ``Task`` and ``ParallelTask`` (and ``Unit``, to name dependencies).

These are plain classes: a user's instance is not an actor, so any name a user gives a method
or an attribute (``start``, ``stop``, ``on_start``, ``on_receive``, ``actor_ref``...) is theirs.
The framework's own names on a task are prefixed ``task_`` (public) or ``_task_`` (private);
the runtime that hosts an instance in a worker process is ``task_host.py``.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

from actors import task_output
from actors.errors import InvalidArguments, TaskStopped

_in_worker = False


def in_worker() -> bool:
    """Whether this process is a worker, where task code runs (``mark_worker``)."""
    return _in_worker


def mark_worker() -> None:
    global _in_worker
    _in_worker = True


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


class StopFlag:
    """A task's cancel, set from the worker's mailbox and read by its code: a flag, not a
    ``threading.Event`` (nothing waits on it; making an Event, its lock and condition, was
    ~8 % of a worker actor's time for a small task)."""

    __slots__ = ("_set",)

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True  # (one attribute store: atomic under the GIL)

    def is_set(self) -> bool:
        return self._set


class Task:
    """A unit of work: subclass and define ``work(self, ...)``; its return value is the result."""

    task_kind: ClassVar[str] = "task"
    #: The id of the task instance, set by the runtime before ``work`` (or ``get_work``) runs.
    task_id: str = ""
    #: Set by the runtime when the task is cancelled (see ``task_stop_requested``).
    _task_stop: StopFlag | None = None
    #: False for a container's child: its steps are not its container's (which counts children).
    _task_reports_progress: bool = True

    @property
    def task_stop_requested(self) -> bool:
        """True once the task is cancelled: return (or raise ``TaskStopped``) soon, and your
        ``finally:`` blocks run; a task still running after the cancel's grace is killed with
        its worker process. ``task_progress`` raises ``TaskStopped`` by itself."""
        return self._task_stop is not None and self._task_stop.is_set()

    def task_check_stop(self) -> None:
        """Raise ``TaskStopped`` if the task was cancelled (a poll for code that reports no
        progress: between the steps of a long loop, say)."""
        if self.task_stop_requested:
            raise TaskStopped(self.task_id)

    def work(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__qualname__} must define work()")

    def task_progress(self, done: int, total: int) -> None:
        """Say, from inside ``work``, how far it is: ``done`` steps of ``total``. The client's
        ``future.progress()`` and ``actors.progress`` show it (the newest value, a few times a
        second: call it as often as you like)."""
        report_progress_of(self, done, total)

    @classmethod
    def task_entry(cls) -> Callable[..., Any]:
        """The method whose signature the submitted arguments must fit."""
        return cls.work


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

    def task_total(self, *args: Any, **kwargs: Any) -> int | None:
        """How many units ``get_work`` will yield, if known up front (it receives the same
        arguments): a progress bar then knows its length from the start. By default None: the
        total is known once the slicer is exhausted."""
        return None

    def task_progress(self, done: int, total: int) -> None:
        raise TypeError("a ParallelTask's progress counts its units: declare how many with "
                        "task_total() instead of reporting it")

    @classmethod
    def task_entry(cls) -> Callable[..., Any]:
        return cls.get_work


def report_progress_of(task: Task, done: int, total: int) -> None:
    task.task_check_stop()
    whole = all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (done, total))
    if not whole:
        raise ValueError(f"task_progress takes whole numbers done >= 0 and total >= 0, not "
                         f"{done!r} and {total!r}")
    if task._task_reports_progress:
        task_output.report_progress(task.task_id, done, total)


def check_arguments(cls: type[Task], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Refuse, before anything is sent, arguments that do not fit the task's entry point."""
    try:  # a class checked before (every submit of a map, every task a warm worker starts)
        fewest, most = _classes_checked[cls]
    except (KeyError, TypeError):  # (TypeError: not a class, nor weakly referenceable)
        fewest, most = _check_class(cls)
    if not kwargs and fewest <= len(args) <= most:
        return  # what binding would say, without binding
    entry = cls.task_entry()
    try:
        _signature(entry).bind(None, *args, **kwargs)
    except TypeError as exc:
        raise InvalidArguments(
            f"{cls.__qualname__}.{entry.__name__}{_signature(entry)}",
            _explain_binding(_signature(entry), kwargs, str(exc)),
        ) from None


def _check_class(cls: type[Task]) -> tuple[int, int]:
    """What ``check_arguments`` asks of the class itself, whatever the arguments: raises if
    it cannot run; else the positional arguments that always bind (``_positional_range``),
    kept for the class."""
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise InvalidArguments(repr(cls), "not a Task or ParallelTask subclass, nor a function")
    missing = _undefined(cls)
    if missing:
        raise InvalidArguments(cls.__qualname__, f"it must define {' and '.join(missing)} (it "
                                                 "would fail on its worker)")
    if (needs := _constructor_needs(cls)) is not None:
        raise InvalidArguments(f"{cls.__qualname__}.__init__({', '.join(needs.parameters)})",
                               "a task class is made "
                               "without arguments on its worker: take them in "
                               f"{cls.task_entry().__name__}() instead (its arguments are "
                               "the submit's)")
    checked = _classes_checked[cls] = _positional_range(cls.task_entry())
    return checked


#: A class that passed ``_check_class``, and its ``_positional_range`` (classes are
#: defined once and submitted many times; a class defined again, as a notebook cell run
#: again defines it, is another class)
_classes_checked: weakref.WeakKeyDictionary[type, tuple[int, int]] = weakref.WeakKeyDictionary()


def _undefined(cls: type[Task]) -> list[str]:
    """The methods a task class must define and inherits from ours instead."""
    if issubclass(cls, ParallelTask):
        wanted = [("get_work", ParallelTask.get_work), ("work_unit", ParallelTask.work_unit)]
    else:
        wanted = [("work", Task.work)]
    return [f"{name}()" for name, ours in wanted if getattr(cls, name) is ours]


def check_named_arguments(task: str, parameters: list[str] | None, args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> None:
    """What can be checked of arguments to a deployed task from its parameters' names alone
    (its listing, read from the source: no defaults, keyword-only ones not told apart): a
    keyword it has no parameter of, more positional arguments than it has parameters. The
    worker checks the rest against the code itself."""
    if parameters is None:
        return
    named = [p for p in parameters if not p.startswith("*")]
    shown = f"{task}({', '.join(parameters)})"
    if not any(p.startswith("*") and not p.startswith("**") for p in parameters) \
            and len(args) > len(named):
        raise InvalidArguments(shown, f"takes at most {len(named)} positional arguments but "
                                      f"{len(args)} were given")
    if any(p.startswith("**") for p in parameters):
        return
    unknown = []
    for name in kwargs:
        if name in named:
            continue
        close = difflib.get_close_matches(name, named, n=1)
        unknown.append(f"unexpected keyword argument {name!r}"
                       + (f" (did you mean {close[0]!r}?)" if close else ""))
    if unknown:
        raise InvalidArguments(shown, "; ".join(unknown))


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


_constructors: weakref.WeakKeyDictionary[type, inspect.Signature | None] = \
    weakref.WeakKeyDictionary()


def _constructor_needs(cls: type[Task]) -> inspect.Signature | None:
    """The signature of a task class that cannot be made without arguments (None: it can);
    asked at every submit, inspected once a class."""
    if cls in _constructors:
        return _constructors[cls]
    needs = None
    with contextlib.suppress(TypeError, ValueError):  # (no signature to read: nothing to tell)
        signature = inspect.signature(cls)
        try:
            signature.bind()
        except TypeError:
            needs = signature
    _constructors[cls] = needs
    return needs


@functools.lru_cache(maxsize=256)
def _signature(entry: Callable[..., Any]) -> inspect.Signature:
    # Asked for every submit and every start of an instance: inspecting is not free.
    return inspect.signature(entry)


@functools.lru_cache(maxsize=256)
def _positional_range(entry: Callable[..., Any]) -> tuple[int, int]:
    """How many positional arguments (after ``self``) always bind to ``entry`` without keyword
    arguments: its plain parameters, those without a default required; ``(1, 0)`` (none) when
    it has any other kind, which only binding can judge."""
    params = list(_signature(entry).parameters.values())[1:]
    if any(p.kind is not p.POSITIONAL_OR_KEYWORD for p in params):
        return 1, 0
    return sum(p.default is p.empty for p in params), len(params)
