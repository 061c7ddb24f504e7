"""Plain functions as tasks: ``client.submit(fn, *args)`` runs ``fn`` as a Task's ``work``.

A function (a lambda, a closure, a ``functools.partial``, a bound method) is wrapped in a
``Task`` subclass made for it, shipped by value like any class defined in a script or a
notebook (cloudpickle takes the function with what it captures). The class is made once per
function object and kept while the function lives, so that its code goes to the master once.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable
from typing import Any

from actors.errors import InvalidArguments
from actors.task import Task

_made: weakref.WeakKeyDictionary[Callable[..., Any], type[Task]] = weakref.WeakKeyDictionary()


def function_task(fn: Callable[..., Any]) -> type[Task]:
    """The Task class whose ``work`` calls ``fn`` with the submitted arguments."""
    try:
        return _made[fn]
    except (KeyError, TypeError):  # TypeError: a callable that takes no weak reference
        pass
    name = function_name(fn)

    class FunctionTask(Task):
        def work(self, *args: Any, **kwargs: Any) -> Any:
            return fn(*args, **kwargs)

    FunctionTask.__name__ = FunctionTask.__qualname__ = name
    FunctionTask.__module__ = getattr(fn, "__module__", None) or __name__
    FunctionTask.task_function = fn  # type: ignore[attr-defined]
    with contextlib.suppress(TypeError):  # not weakly referable: made again next time
        _made[fn] = FunctionTask
    return FunctionTask


def check_function_arguments(fn: Callable[..., Any], args: tuple[Any, ...],
                             kwargs: dict[str, Any]) -> None:
    """Refuse here, before anything is sent, arguments that ``fn`` cannot take."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the worker will say
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise InvalidArguments(f"{function_name(fn)}{signature}", str(exc)) from None


def function_name(fn: Callable[..., Any]) -> str:
    """A name for task ids and stories: the function's, ``lambda`` for a lambda."""
    inner = getattr(fn, "func", fn)  # functools.partial
    name = getattr(inner, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name.strip("<>") or "function"
