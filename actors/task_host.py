"""The runtime that hosts a user's task instance in a worker process.

A user's ``Task`` or ``ParallelTask`` (``task.py``) is a plain object. What runs it is here:

- ``Runtime``, the framework side of one instance: it begins the instance, slices a
  ParallelTask's ``get_work`` lazily, a bounded look-ahead at a time (a task of a million units
  never holds them all), collects unit results and reduces them. A Runtime lives in one mailbox,
  and only that mailbox changes it.
- Where that mailbox is. A plain Task, and a ParallelTask instance that only runs units, has no
  conversation of its own: its Runtime lives in the Worker actor's mailbox (``host_instance``),
  which saves an actor thread for every instance. A ParallelTask's driver is a ``Driver``, a
  small pykka actor that holds the user's instance (it is not the instance, so a user's names
  cannot collide with pykka's): its input (start, unit results to reduce) and the slicing do not
  hold up the Worker actor's mailbox.
- The executor: the process's one thread for user code (``work``, ``reduce``; units, run by
  ``unit_runner.py``, too). It reports back by ``tell``-ing the mailbox the Runtime lives in.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import msgspec
import pykka
import structlog

from actors import messages as m
from actors import task_output
from actors.mapping import MapOf
from actors.serialize import (
    describe_failure,
    dumps,
    dumps_result,
    dumps_result_parts,
    is_fatal,
    loads,
)
from actors.shell import simple_inbox
from actors.task import ParallelTask, StopFlag, Task, Unit
from actors.unit_runner import Gather

log = structlog.get_logger("actors.task_host")

#: Units a driver may have sliced but not yet seen finished; fewer where their arguments are
#: large: about ``LOOKAHEAD_BYTES`` of them, by the mean so far (they wait on the master).
LOOKAHEAD = 8192
LOOKAHEAD_BYTES = 64 << 20
#: Units per UnitsSliced message, and the bytes of arguments that end one sooner.
SLICE_BATCH = 2048
SLICE_BYTES = 1 << 20
#: Packs (``UnitCall.count``) a driver may have sliced ahead, where ``LOOKAHEAD`` units make
#: fewer: a worker's share of a window of eight large packs would be one pack in flight.
PACKS_AHEAD = 64
#: Units a driver slices before the master first answers: until one of them is measured the
#: master sends one a worker, and then it may say to pack the rest (so few go one by one).
FIRST_LOOKAHEAD = 256
#: A pack holds no more units than make about this many bytes of arguments, at the mean size
#: so far: tiny units with large arguments go in packs the master and the wire take easily.
PACK_BYTES = 256 << 10
# Held while a plain Task's work is claimed, by the executor as it begins it or by the worker's
# mailbox as it gives it back (``Runtime.withdraw``): exactly one of them has it.
_CLAIMS = threading.Lock()


class HeldParts(msgspec.Struct, frozen=True):
    """A task's result as a pickle and out-of-band buffers (``dumps_result_parts``), for the
    worker to hand to its node before the ``TaskResult`` that says it is held there."""

    task_id: str
    parts: list[bytes | memoryview]


Emit = Callable[[m.Message | HeldParts], None]


def host_instance(cls: type[Task]) -> Task:
    """Make an instance of a user's task class; it lives in the caller's mailbox."""
    instance = cls()
    instance._task_stop = StopFlag()
    return instance


def request_stop(instance: Task) -> None:
    """The task was cancelled: its ``task_stop_requested`` turns true, its next progress report
    raises ``TaskStopped``, and calls of it not yet begun on the executor do not begin."""
    if instance._task_stop is not None:
        instance._task_stop.set()


def start_driver(instance: Task) -> pykka.ActorRef[Any]:
    """Start the actor that drives ``instance`` (a ParallelTask); tell it ``Begin`` next."""
    return Driver.start(instance)


def begin_instance(task: Task, message: Begin, tell: Callable[[Any], None]) -> Runtime:
    """Start an instance's framework side; ``tell`` reaches the mailbox the instance lives in."""
    task.task_id = message.task_id
    runtime = Runtime(task, message, tell)
    runtime.begin()
    return runtime


class Driver(pykka.ThreadingActor):
    """A ParallelTask's driver: a mailbox of its own for the user's instance and its Runtime."""

    def __init__(self, instance: Task) -> None:
        super().__init__()
        self.instance = instance
        self.runtime: Runtime | None = None

    @staticmethod
    def _create_actor_inbox() -> Any:
        return simple_inbox()

    def on_receive(self, message: Any) -> Any:
        if isinstance(message, Begin):
            self.runtime = begin_instance(self.instance, message, self.actor_ref.tell)
        elif self.runtime is not None:
            self.runtime.handle(message)
        return None

    def on_failure(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                   tb: TracebackType | None) -> None:
        """The driver's own code raised (what the user's code raises, the task reports as its
        error): pykka stops this actor. The task fails with that error, as fatal (its worker is
        replaced), instead of waiting for a driver that is gone."""
        runtime = self.runtime
        task_id = runtime.task.task_id if runtime is not None else ""
        log.error("driver_crashed", task_id=task_id, exc_info=(exc_type, exc, tb))
        if runtime is None or exc is None:
            return
        payload, type_name, text, trace = describe_failure(exc, "in the task's driver")
        with contextlib.suppress(Exception):  # (its worker may be stopping: nothing to tell)
            runtime.emit(m.TaskResult(task_id, m.UnitOutcome(-1, False, payload, type_name, text,
                                                             trace, fatal=True)))


# --- messages of the mailbox a Runtime lives in (in-process only) ------------


class Begin(msgspec.Struct, frozen=True):
    task_id: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    driver: bool
    emit: Emit
    to_worker: Callable[[Any], None]  # the Worker actor's mailbox (to gather held results)


class UnitResults(msgspec.Struct, frozen=True):
    results: list[tuple[int, bytes]]
    held: list[tuple[int, str, str]] = msgspec.field(default_factory=list)
    sizes: dict[int, int] = msgspec.field(default_factory=dict)  # of the held results, where known
    pack: int = 0  # the master's word on how many plain units to pack from now on (0: as before)


class Gathered(msgspec.Struct, frozen=True):
    data: dict[int, bytes]


class Finished(msgspec.Struct, frozen=True):
    outcome: m.UnitOutcome
    elapsed: float = 0.0
    parts: list[bytes | memoryview] | None = None  # the result out of band (outcome held)


@dataclass
class Runtime:
    """The framework side of one task instance; lives in the instance's mailbox."""

    task: Task
    begin_msg: Begin
    tell: Callable[[Any], None]  # that mailbox
    slicer: Iterator[Any] | None = None
    sliced: int = 0
    sliced_bytes: int = 0  # of the sliced units' arguments
    exhausted: bool = False
    results: dict[int, bytes] = field(default_factory=dict)
    held: dict[int, tuple[str, str]] = field(default_factory=dict)  # index -> (worker, address)
    sizes: dict[int, int] = field(default_factory=dict)  # held result -> its bytes, where known
    depended_on: set[int] = field(default_factory=set)  # results that feed other units
    # Packs sliced (first index -> units; see UnitCall.count): their results are lists, and
    # ``packed_done`` the units finished packs hold beyond one each.
    pack: int = 1  # plain units to slice into one pack, a power of two (DriverResults.pack)
    packs: dict[int, int] = field(default_factory=dict)
    packed_done: int = 0
    answered: bool = False  # the master forwarded results (and its word on packs) once
    reducing: bool = False
    claimed: bool = False  # a plain Task's work began, or was withdrawn (under _CLAIMS)

    @property
    def emit(self) -> Emit:
        return self.begin_msg.emit

    def begin(self) -> None:
        if not self.begin_msg.driver:
            if isinstance(self.task, MapOf):  # its helpers hold its items too (mapping.py)
                self.task._task_join(*self.begin_msg.args, **self.begin_msg.kwargs)
            return
        if isinstance(self.task, ParallelTask):
            args, kwargs = self.begin_msg.args, self.begin_msg.kwargs
            task_output.enter(self.task.task_id, "get_work")
            try:
                total = self.task.task_total(*args, **kwargs)
                if total is not None and (isinstance(total, bool) or not isinstance(total, int)
                                          or total < 0):
                    raise TypeError(f"task_total() returns a whole number >= 0 or None, "
                                    f"not {total!r}")
                self.slicer = _units_of(self.task.get_work(*args, **kwargs))
            except Exception as exc:
                self._fail_task(exc)
                return
            finally:
                task_output.leave()
            if total is not None:  # the units to expect: a progress bar's length from the start
                self.emit(m.WorkProgress(self.task.task_id, 0, total))
            self._slice_more()
        else:
            self._in_executor(self._call_work)

    def handle(self, message: Any) -> None:
        match message:
            case UnitResults(results=results, held=held, sizes=sizes, pack=pack):
                if self.packs:
                    self._count_packs(results, held)
                if pack > 0:
                    self.pack = m.pack_size(pack)
                self.answered = True
                self.results.update(results)
                for index, worker, address in held:
                    self.held[index] = (worker, address)
                self.sizes.update(sizes)
                self._slice_more()
            case Gathered(data=data):
                self.results.update(data)
                self._in_executor(self._call_reduce)
            case Finished(outcome=outcome, elapsed=elapsed, parts=parts):
                if parts is not None:
                    self.emit(HeldParts(self.task.task_id, parts))
                self.emit(m.TaskResult(self.task.task_id, outcome, elapsed))
            case _:
                raise TypeError(f"task runtime got an unknown message: {message!r}")

    # --- the driver: slicing and reducing -----------------------------------

    def _slice_more(self) -> None:
        while not self.exhausted and self.sliced - self._finished < self._lookahead():
            assert self.slicer is not None
            batch: list[m.UnitCall] = []
            size, full, taken, pack = 0, False, 0, self._pack_size()
            limit = SLICE_BATCH if self.answered else FIRST_LOOKAHEAD
            plain: list[Any] = []  # the arguments of the pack being filled
            task_output.enter(self.task.task_id, "get_work")
            try:
                for item in itertools.islice(self.slicer, limit):
                    index = self.sliced + taken
                    taken += 1
                    if pack > 1 and not isinstance(item, Unit):
                        plain.append(item)
                        # Packs end at multiples of ``pack``: a driver that runs again slices
                        # the same packs, whose journaled results it is given back.
                        if (index + 1) % pack:
                            continue
                        call = self._pack_call(plain, index + 1 - len(plain))
                        plain = []
                    else:
                        if plain:  # (a Unit ends the pack before it)
                            batch.append(self._pack_call(plain, index - len(plain)))
                            size += len(batch[-1].args)
                            plain = []
                        call = self._unit_call(item, index)
                    batch.append(call)
                    size += len(call.args)
                    if size >= SLICE_BYTES:
                        full = True  # the slicer may have more: only this message is full
                        break
                if plain:
                    batch.append(self._pack_call(plain, self.sliced + taken - len(plain)))
                    size += len(batch[-1].args)
            except Exception as exc:
                self._fail_task(exc)
                return
            finally:
                task_output.leave()
            self.exhausted = not full and taken < limit
            self.sliced += taken
            self.sliced_bytes += size
            self.emit(m.UnitsSliced(self.task.task_id, batch, self.exhausted))
        if self.exhausted and self._finished >= self.sliced and not self.reducing:
            self.reducing = True
            # Results held on workers that reduce needs (no unit consumed them) are fetched here.
            wanted = [(i, *self.held[i]) for i in sorted(self.held) if i not in self.depended_on]
            if wanted:
                tell = self.tell
                sizes = {i: self.sizes[i] for i, _, _ in wanted if i in self.sizes}
                self.begin_msg.to_worker(Gather(self.task.task_id, wanted,
                                                lambda data: tell(Gathered(data)), sizes))
            else:
                self._in_executor(self._call_reduce)

    @property
    def _finished(self) -> int:
        """Units whose results are here or held (a pack counts its units)."""
        return len(self.results) + len(self.held) + self.packed_done

    def _count_packs(self, results: list[tuple[int, bytes]],
                     held: list[tuple[int, str, str]]) -> None:
        packs, got, kept = self.packs, self.results, self.held
        for index in itertools.chain((i for i, _ in results), (i for i, _, _ in held)):
            count = packs.get(index)
            if count and index not in got and index not in kept:
                self.packed_done += count - 1

    def _lookahead(self) -> int:
        """``LOOKAHEAD`` units ahead (``PACKS_AHEAD`` packs where that is more; before the master
        first answers, ``FIRST_LOOKAHEAD``), or as many as
        ``LOOKAHEAD_BYTES`` of arguments make at the mean size so far (one at least): tiny units
        need many in flight to hide the round trips, and the master holds what is sliced until
        it is dispatched."""
        ahead = max(LOOKAHEAD, PACKS_AHEAD * self.pack) if self.answered else FIRST_LOOKAHEAD
        if not self.sliced_bytes:
            return ahead
        return max(1, min(ahead, LOOKAHEAD_BYTES * self.sliced // self.sliced_bytes))

    def _pack_size(self) -> int:
        """The master's word (``pack``), fewer where arguments are large: a power of two."""
        if self.pack == 1 or not self.sliced_bytes:
            return self.pack
        return min(self.pack, m.pack_size(PACK_BYTES * self.sliced // self.sliced_bytes))

    def _pack_call(self, plain: list[Any], first: int) -> m.UnitCall:
        if len(plain) == 1:
            return m.UnitCall(first, dumps(plain[0]))
        self.packs[first] = len(plain)
        return m.UnitCall(first, dumps(plain), count=len(plain))

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
        return m.UnitCall(index, dumps(item.arg), tuple(deps), keep=True)

    def _call_reduce(self) -> Finished:
        task = self.task
        assert isinstance(task, ParallelTask)

        def reduce() -> Any:
            # (results that do not load, a pack's that are not its list: the task fails)
            ordered = self._ordered_results()
            self.results.clear()
            return task.reduce(ordered)

        task_output.enter(task.task_id, "reduce")
        try:
            return _finished(self._name, reduce)
        finally:
            task_output.leave()

    def _ordered_results(self) -> list[Any]:
        results, packs, skip = self.results, self.packs, self.depended_on
        if not packs:
            return [loads(results[i]) for i in range(self.sliced) if i not in skip]
        ordered: list[Any] = []
        index = 0
        while index < self.sliced:
            count = packs.get(index)
            if count:
                values = loads(results[index])
                if type(values) is not list or len(values) != count:
                    got = (f"{len(values)} results" if type(values) is list
                           else f"a {type(values).__name__}")
                    raise TypeError(f"units {index}-{index + count - 1} are a pack of {count}: "
                                    f"their results came back as {got}")
                ordered += values
                index += count
                continue
            if index not in skip:
                ordered.append(loads(results[index]))
            index += 1
        return ordered

    def withdraw(self) -> bool:
        """A plain Task lined up behind another: its work will not begin, if it has not (the
        master takes it back for a worker free sooner). Whether it had not."""
        return self._claim()

    def _claim(self) -> bool:
        with _CLAIMS:
            if self.claimed:
                return False
            self.claimed = True
            return True

    def _call_work(self) -> Finished | None:
        if not self._claim():
            return None  # withdrawn before its turn: nothing to report
        start = time.perf_counter()
        task_output.enter(self.task.task_id, "work")
        try:
            def work() -> Any:
                self.task.task_check_stop()  # cancelled while it waited its turn: not begun
                return self.task.work(*self.begin_msg.args, **self.begin_msg.kwargs)

            done = _finished(self._name, work)
        finally:
            task_output.leave()
        return msgspec.structs.replace(done, elapsed=time.perf_counter() - start)

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
            news = call()
            if news is not None:
                tell(news)

        run_in_executor(run, self.task.task_id)


def run_in_executor(call: Callable[[], None], task_id: str = "") -> None:
    """Run ``call`` (code of the task ``task_id``) on the process's one thread for user code
    (it must report back itself)."""
    _executor().calls.put((task_id, call))


def when_not_running(task_id: str, then: Callable[[], None]) -> None:
    """Call ``then`` once no call of the task runs on the executor: at once if none does, else
    on the executor thread as the one running returns (calls of it queued behind it are not
    waited for: a cancelled task's do not begin, see ``request_stop``)."""
    _executor().when_not_running(task_id, then)


def _executor() -> _Executor:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = _Executor()
    return _EXECUTOR


class _Executor:
    """The worker process's one thread for user code, shared by its successive task instances.

    A worker hosts one instance at a time; one that ends badly is killed with its process, so
    nothing of it can still be queued here for the next one. A plain queue and thread, not a
    ThreadPoolExecutor: nobody reads a Future here (each call reports back itself), so making
    one per call would be cost for nothing.
    """

    def __init__(self) -> None:
        self.calls: queue.SimpleQueue[tuple[str, Callable[[], None]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = ""  # the task whose call runs now
        self._then: list[Callable[[], None]] = []  # to call as that call returns
        threading.Thread(target=self._run, name="task-exec", daemon=True).start()

    def when_not_running(self, task_id: str, then: Callable[[], None]) -> None:
        with self._lock:
            running = self._running == task_id
            if running:
                self._then.append(then)
        if not running:
            then()

    def _run(self) -> None:
        while True:
            task_id, call = self.calls.get()
            with self._lock:
                self._running = task_id
            try:
                call()
            except pykka.ActorDeadError:
                pass  # the mailbox to report to has stopped (its task ended): the news is moot
            except BaseException:  # the call reports its own outcome: this is a framework bug
                log.exception("executor_call_failed")
            with self._lock:
                self._running, then, self._then = "", self._then, []
            for call_back in then:
                with contextlib.suppress(pykka.ActorDeadError):  # (as above)
                    call_back()


_EXECUTOR: _Executor | None = None


def _finished(name: str, call: Callable[[], Any]) -> Finished:
    """What came of ``work`` or ``reduce``: a result with out-of-band buffers (NumPy arrays)
    larger than ``INLINE_RESULT_BYTES`` stays in parts, uncopied, for the worker's node to hold;
    any other result is one pickle, as ``_outcome`` makes it."""
    try:
        value = call()
        parts = dumps_result_parts(value, name)
        if len(parts) > 1 and (size := sum(map(len, parts))) > m.INLINE_RESULT_BYTES:
            return Finished(m.UnitOutcome(-1, True, b"", held=True, size=size), parts=parts)
        data = parts[0] if len(parts) == 1 else dumps_result(value, name)
        assert isinstance(data, bytes)
        return Finished(m.UnitOutcome(-1, True, data))
    except BaseException as exc:
        payload, type_name, message, text = describe_failure(exc)
        return Finished(m.UnitOutcome(-1, False, payload, type_name, message, text,
                                      fatal=is_fatal(exc)))


def _units_of(work: Any) -> Iterator[Any]:
    """What ``get_work`` returned, as an iterator of its units; one that is not iterable (a
    forgotten ``return``, a count instead of a range) fails saying what ``get_work`` must do."""
    try:
        return iter(work)
    except TypeError:
        if hasattr(type(work), "__iter__") or hasattr(type(work), "__getitem__"):
            raise  # (its own __iter__ raised: that error is the user's to see)
        hint = (" (did it forget to return or yield its units?)" if work is None
                else " (a count? return range(n))" if isinstance(work, int) else "")
        raise TypeError(f"get_work() returns or yields the task's units (a list, a range, a "
                        f"generator...), not {type(work).__name__}{hint}") from None
