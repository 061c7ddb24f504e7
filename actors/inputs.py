"""Futures among a task's arguments (its *inputs*): placeholders on the way, results on arrival.

The client pickles a task's arguments inside ``collecting()``: each ``Future`` met anywhere in
them (in lists, dicts, a user's own objects) is recorded and pickled as a call of ``input_of``
with its task id. The task runs once those tasks are done; its worker unpickles the arguments
inside ``resolving()``, where each ``input_of`` call is that task's result (unpickled once, so
a future passed twice is one object). A ``Future`` pickled anywhere else is refused: it is not
data.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

from actors.errors import InputFailed, InputLost

T = TypeVar("T")

_collecting: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "actors_collecting_inputs", default=None)
_resolving: contextvars.ContextVar[_Inputs | None] = contextvars.ContextVar(
    "actors_resolving_inputs", default=None)


class _Inputs:
    def __init__(self, task_id: str, loaders: Mapping[str, Callable[[], Any]],
                 placeholders: bool) -> None:
        self.task_id = task_id
        self.loaders = loaders
        self.placeholders = placeholders
        self.values: dict[str, Any] = {}


def input_of(input_id: str) -> Any:
    """What a future among a task's arguments becomes in its worker: that task's result."""
    inputs = _resolving.get()
    if inputs is None:
        raise InputLost("", input_id, "a task's input is resolved only in its worker")
    if input_id in inputs.values:
        return inputs.values[input_id]
    loader = inputs.loaders.get(input_id)
    if loader is None:
        if inputs.placeholders:
            return None  # a helper of a ParallelTask: it checks the arguments, never uses them
        raise InputLost(inputs.task_id, input_id, "its result did not come with the task")
    value = inputs.values[input_id] = loader()
    return value


def item_of(input_id: str, index: int) -> Any:
    """What an item's future of a batched map (``item_futures.py``) among a task's arguments
    becomes in its worker: that item's result, out of its map's; ``InputFailed`` if it raised."""
    from actors.mapping import ItemFailed  # (the workers' side of a batched map)

    inputs = _resolving.get()
    values = input_of(input_id)
    if values is None and inputs is not None and inputs.placeholders:
        return None  # a helper of a ParallelTask, as input_of's
    task_id = inputs.task_id if inputs is not None else ""
    if type(values) is not list or not 0 <= index < len(values):
        raise InputLost(task_id, f"{input_id}#{index}", "its map's result has no such item")
    value = values[index]
    if type(value) is ItemFailed:
        raise InputFailed(task_id, f"{input_id}#{index}", "erred",
                          f"{value.type_name.removeprefix('builtins.')}: {value.message}"[:500])
    return value


def item_cancelled(input_id: str) -> Any:
    """A cancelled item of a batched map among a task's arguments: the task fails, as one
    whose input was cancelled does (``InputFailed``)."""
    inputs = _resolving.get()
    if inputs is not None and inputs.placeholders:
        return None  # a helper of a ParallelTask, as input_of's
    raise InputFailed(inputs.task_id if inputs is not None else "", input_id, "cancelled")


def reduce_cancelled_item(future: Any) -> tuple[Callable[[str], Any], tuple[str]]:
    """``ItemFuture.__reduce__`` of a cancelled item: no input to wait for, a failure to be."""
    if _collecting.get() is None:
        raise TypeError(f"a Future ({future.task_id}) is not data: pass it among a task's "
                        "arguments (its result takes its place), or call .result()")
    return item_cancelled, (future.task_id,)


def reduce_future(future: Any) -> tuple[Callable[[str], Any], tuple[str]]:
    """``Future.__reduce__``: an input while a submission's arguments are pickled, else refused."""
    found = _collecting.get()
    if found is None:
        raise TypeError(f"a Future ({future.task_id}) is not data: pass it among a task's "
                        "arguments (its result takes its place), or call .result()")
    found[future.task_id] = future
    return input_of, (future.task_id,)


@contextmanager
def collecting() -> Iterator[dict[str, Any]]:
    """Pickle arguments inside: the futures met, by task id, fill the dict it gives."""
    found: dict[str, Any] = {}
    token = _collecting.set(found)
    try:
        yield found
    finally:
        _collecting.reset(token)


def resolving(task_id: str, loaders: Mapping[str, Callable[[], Any]], unpickle: Callable[[], T],
              placeholders: bool = False) -> T:
    """``unpickle()`` a task's arguments with its inputs: each is its ``loaders[task id]()``;
    with ``placeholders``, an input without a loader is None (instead of ``InputLost``). (A
    call, not a context manager: it runs for every task a worker starts.)"""
    token = _resolving.set(_Inputs(task_id, loaders, placeholders))
    try:
        return unpickle()
    finally:
        _resolving.reset(token)
