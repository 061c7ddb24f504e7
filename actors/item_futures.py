"""The client's side of ``client.map_batch(task, items)`` (the workers' side is ``mapping.py``):
the items go as the units of one ``MapOf`` task or a few, each of at most ``BATCH_ITEMS`` items
and ``BATCH_BYTES`` of arguments, and every item has an ``ItemFuture``.

An item's future ends as its unit finishes (``ItemsDone``), or else with its map's task: with
its own result, or its own error (an item that raised fails alone), or as the map ended
(cancelled, or failed as a whole: its worker killed past its retries, its master lost). What an
item future does that a task's does not: ``cancel`` is the client's alone until no item of its
map is wanted any more (then the map is cancelled on the cluster); ``story`` is its map's; as
an argument of a later task it is its map's result, indexed on the worker (that task waits for
the whole map, and takes the whole map's result where it runs).
"""

from __future__ import annotations

import copy
import functools
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from actors import messages as m
from actors.errors import ArgumentsNotSerializable, ClientClosed
from actors.functions import function_name
from actors.futures import (
    _CANCELLED,
    _DONE,
    _ERRED,
    _QUEUED,
    _RUNNING,
    Future,
    _call_back,
    _Parts,
    check_grace,
    collector_paused,
)
from actors.inputs import item_of, reduce_cancelled_item, reduce_future
from actors.mapping import ItemFailed, MapOf
from actors.serialize import loads, loads_parts
from actors.task import Task

if TYPE_CHECKING:
    from actors.client import Client, _Prepared

BATCH_ITEMS = 10_000  # items of one MapOf at most: its result is one message
BATCH_BYTES = 8 << 20  # its pickled arguments at most (a batch is halved until it fits)


class Batch:
    """One ``MapOf`` task (its future) and its items' futures (weakly: an item nobody holds
    gets its outcome dropped; the map's future is held by every item's)."""

    __slots__ = ("future", "items", "began", "an_input", "__weakref__")

    def __init__(self, future: Future) -> None:
        self.future = future
        self.items: list[weakref.ref[ItemFuture]] = []
        self.began = False  # an item ended: the map runs (its client hears so on a tick)
        # An item went among the arguments of a later task, sent (Client._submit_all): that
        # task needs the whole map.
        self.an_input = False

    def unwanted(self) -> bool:
        """No item of the map is waited for: each held one has ended (one cancelled, say), and
        none went to a later task, whose input is the whole map."""
        return not self.an_input and all((item := ref()) is None or item._ended
                                         for ref in self.items)

    def deliver(self, done: list[tuple[int, int, bytes]]) -> None:
        """Items whose units finished (``ItemsDone``): their futures end now, not with their
        map. One that does not load here is left for the map's end, which says why."""
        items, ends = self.items, []
        self.began = True
        with collector_paused():
            for index, count, blob in done:
                if not 0 <= index < len(items) or not 0 <= count <= len(items) - index:
                    continue
                try:
                    values = loads(blob) if count else [loads(blob)]
                except BaseException:  # (a user's __setstate__: not on this thread)
                    continue
                if type(values) is not list or len(values) != max(1, count):
                    continue
                for offset, value in enumerate(values):
                    item = items[index + offset]()
                    if item is not None and not item._ended:
                        ends.append(_outcome(item, value))
        if ends:
            _finish_all(self.future._client, ends)

    def settle(self, ended: Future) -> None:
        """The map's task ended: every item's future ends (in the thread that ended it)."""
        items = [(i, ref()) for i, ref in enumerate(self.items)]
        waiting = [(i, item) for i, item in items if item is not None and not item._ended]
        if not waiting:
            return
        if ended._status != _DONE:  # cancelled, failed as a whole, or its master lost
            _finish_all(ended._client, [(item, ended._status, ended._payload,
                                         _own_error(ended._error, item))
                                        for _, item in waiting])
            return
        try:
            # The payload read, not waited for (this is the receive thread) nor kept loaded
            # (the map's future keeps its bytes; its items, their values).
            payload = ended._payload
            if isinstance(payload, m.TaskDone):
                values = loads(payload.result)
            elif isinstance(payload, _Parts):
                values = payload._value if payload._loaded else loads_parts(payload._parts)
            else:
                raise TypeError(f"the map {ended.task_id} ended without a result")
            if type(values) is not list or len(values) != len(items):
                raise TypeError(f"the map {ended.task_id} came back as {type(values).__name__}"
                                f", not a list of its {len(items)} items' outcomes")
        except BaseException as exc:  # (its result did not load here: no item has one)
            _finish_all(ended._client, [(item, _ERRED, None, _own_error(exc, item))
                                        for _, item in waiting])
            return
        with collector_paused():
            ends = [_outcome(item, values[i]) for i, item in waiting]
        _finish_all(ended._client, ends)


def _own_error(error: BaseException | None, item: ItemFuture) -> BaseException | None:
    """The map's end raised here (``MasterLost``, ``ClientClosed``), one for each item as for
    each task (an instance raised again keeps growing its traceback), naming the item."""
    if error is None:
        return None
    if type(error) is ClientClosed:
        return ClientClosed(error.client_id, item.task_id)
    return copy.copy(error)


def _outcome(item: ItemFuture, value: Any) -> tuple[ItemFuture, str, Any, BaseException | None]:
    if type(value) is ItemFailed:
        return item, _ERRED, m.TaskErred(item.task_id, value.payload, value.type_name,
                                         value.message, value.traceback, ""), None
    parts = _Parts(item.task_id, [])
    parts._value, parts._loaded = value, True
    return item, _DONE, parts, None


def _finish_all(client: Client,
                ends: Sequence[tuple[ItemFuture, str, Any, BaseException | None]]) -> None:
    """``Future._finish`` for many: the futures' waiters are told once, not once an item (a
    map of 10^4 items ends at once)."""
    called: list[tuple[Callable[[Future], None], bool, Future]] = []
    with collector_paused():
        _end_each(client, ends, called)
    with client._futures_done:
        client._futures_done.notify_all()
    for fn, inline, fut in called:
        if inline:
            _call_back(fn, fut)
        else:
            client._callbacks.put((fn, fut))


def _end_each(client: Client, ends: Sequence[tuple[ItemFuture, str, Any, BaseException | None]],
              called: list[tuple[Callable[[Future], None], bool, Future]]) -> None:
    for item, status, payload, error in ends:
        with item._lock:
            if item._ended:
                continue
            item._status, item._payload, item._error = status, payload, error
            if status == _DONE:
                item._progress = (1, 1)
            item._ended = True
            callbacks, item._callbacks = item._callbacks, ()
            client._awaited.pop(item.task_id, None)
        called.extend((fn, inline, item) for fn, inline in callbacks)


class ItemFuture(Future):
    """The eventual result of one item of a batched map (see the module's docstring)."""

    __slots__ = ("_batch", "_index")

    def __init__(self, client: Client, batch: Batch, index: int, name: str) -> None:
        super().__init__(client, f"{batch.future.task_id}#{index}", name)
        self._batch = batch
        self._index = index

    def __repr__(self) -> str:
        return f"<ItemFuture {self.name} {self.task_id} {self.status}>"

    def __del__(self) -> None:
        pass  # nothing of its own on the cluster: its map's result goes with the last item

    def __reduce__(self) -> tuple[Any, ...]:
        """Among a task's arguments: its map's result, indexed where that task runs."""
        if self.cancelled():  # as a cancelled task's future: the later task fails, InputFailed
            return reduce_cancelled_item(self)
        reduce_future(self._batch.future)  # the map is the later task's input (Batch.an_input)
        return item_of, (self._batch.future.task_id, self._index)

    @property
    def status(self) -> str:
        """As a task's: ``queued`` while its map waits for a worker, ``running`` while it runs
        (its items are not told apart until it ends), then this item's own end."""
        if self._ended:
            return self._status
        batch = self._batch
        return _QUEUED if batch.future._status == _QUEUED and not batch.began else _RUNNING

    def running(self) -> bool:
        return self.status == _RUNNING

    def _cancel(self, timeout: float, grace: float) -> bool:
        """``cancel``: the item's future ends cancelled at once. The map's task goes on for its
        other items; once none of them is waited for (``Batch.unwanted``), it is cancelled on
        the cluster (as a task's, within ``timeout``, its code given ``grace`` to stop)."""
        check_grace(grace)
        for whole in cancel_items([self]):
            whole._cancel(timeout, grace)
        return self.cancelled()

    def _cluster_future(self) -> Future:
        """Its map's: ``story()`` and ``Client.story`` tell the map's (its unit ``unit <i>``)."""
        return self._batch.future

    def _show_output(self, waiting: bool) -> None:
        self._batch.future._show_output(waiting)  # (in a notebook: its map's, as it comes)

    def logs(self) -> list[Any]:
        """What this item's code printed and logged (its map's lines of its unit)."""
        return [line for line in self._batch.future.logs() if line.unit == self._index]

    @property
    def dropped_lines(self) -> int:
        return self._batch.future.dropped_lines

    @property
    def map_future(self) -> Future:
        """The future of the map's task that runs this item (its progress counts items)."""
        return self._batch.future


def cancel_items(futures: Sequence[Future]) -> list[Future]:
    """The items among ``futures`` cancelled here, at once; the rest of ``futures``, and the
    maps' futures no item of which is wanted now (``Batch.unwanted``), to cancel on the
    cluster."""
    items = [fut for fut in futures if isinstance(fut, ItemFuture)]
    if not items:
        return list(futures)
    by_client: dict[int, list[ItemFuture]] = {}
    for item in items:
        by_client.setdefault(id(item._client), []).append(item)
    for same in by_client.values():
        _finish_all(same[0]._client, [(item, _CANCELLED, None, None) for item in same])
    maps = {id(item._batch): item._batch for item in items}
    return [*(fut for fut in futures if not isinstance(fut, ItemFuture)),
            *(batch.future for batch in maps.values()
              if not batch.future.done() and batch.unwanted())]


def prepare_maps(client: Client, task: type[Task] | Callable[..., Any], code: bytes,
                 items: list[tuple[Any, ...]], kwargs: dict[str, Any], priority: int,
                 retries: int) -> list[tuple[_Prepared, int]] | None:
    """The ``MapOf`` submissions of a batched map, each with its count of items: at most
    ``BATCH_ITEMS`` items and ``BATCH_BYTES`` of their arguments (the task's code not counted:
    it is in each); None when the items hold futures (they go one task each)."""
    name = getattr(task, "__qualname__", None) or repr(task)
    # Its maps' ids name it, as a task's does: "parse-batch-<64 random bits>#<item>".
    prefix = f"{task.__name__ if isinstance(task, type) else function_name(task)}-batch"
    maps: list[tuple[_Prepared, int]] = []
    pending = [items[i:i + BATCH_ITEMS] for i in range(0, len(items), BATCH_ITEMS)]
    while pending:
        chunk = pending.pop(0)
        try:
            one = client._prepare(MapOf, (code, chunk, kwargs, retries), {}, priority, retries,
                                  True)
        except ArgumentsNotSerializable:
            for args in chunk:  # the item that cannot go, named as a task's arguments are
                client._arguments(args, kwargs, name)
            raise
        if one.submit.inputs:
            return None
        if len(one.submit.args) - len(code) > BATCH_BYTES and len(chunk) > 1:
            half = len(chunk) // 2
            pending[:0] = [chunk[:half], chunk[half:]]
            continue
        # Named for people (client.tasks(), the dashboard, the CLI): the task's code is MapOf's.
        submit = msgspec.structs.replace(one.submit, task_id=client._new_task_id(prefix),
                                         name=f"map_batch({name})"[:1024], items=True)
        maps.append((one._replace(name=name, submit=submit), len(chunk)))
    return maps


def make_items(client: Client, batch: Batch, count: int,
               future_type: type[ItemFuture]) -> list[ItemFuture]:
    """The futures of a batch's items; the batch settles them when its task ends (told
    through a weak reference: a map whose items are all dropped is released at once, not when
    the cyclic collector runs)."""
    name = batch.future.name
    with collector_paused():
        made = [future_type(client, batch, i, name) for i in range(count)]
        batch.items = [weakref.ref(item) for item in made]
    batch.future._on_end(functools.partial(_settle, weakref.ref(batch)))
    return made


def _settle(batch: weakref.ref[Batch], ended: Future) -> None:
    found = batch()
    if found is not None:
        found.settle(ended)
