"""The master's scheduler: which worker runs which task instance and which units.

Theory of operation
-------------------
Nodes announce worker processes (``WorkerReady``). A worker is *clean* (never
ran user code), *warm* for one key (ran code submitted with that key, by any of
its clients, and may run more of it, never another key's), or *busy* with
exactly one task instance. No worker is held by a task beyond its need.

A submitted task waits in the queue, in its fair place (``fair_share.py``:
start-time fair queuing, keys served in turns of about 0.5 s of work, the
clients of one key in turns of about 10 ms; priority first), until a worker
becomes its **driver**:
for a ``Task`` the driver runs ``work``; for a ``ParallelTask`` it slices
(``UnitsSliced``, a bounded look-ahead at a time), reduces, and also runs
units, so one worker is enough. While a task has sliced units pending, every
idle worker that may run its code (clean, or warm for the same key) joins it
as a helper, highest ``priority`` task first, then submission order
(``_rank``); an idle worker warm for other code is replaced (isolation).

Batches. Units go out in runs (``Dispatch``), topped up per worker to a
depth in flight. Until a unit of the task has been measured, one unit a run
and one in flight per worker (``first_batch``, ``first_depth``): a unit of
unknown length may take long, and a batch that starts on one worker cannot be
split any more, so ten 0.8 s units on three idle workers run 4-3-3, not 8-2.
From the first measurement on, runs carry about ``BATCH_SECONDS`` of work and
a worker holds about ``PREFETCH_SECONDS`` (tens of ms) in flight: tiny units
go by the thousand, so the round trip hides behind queued work; a unit
longer than that goes out only when its worker has nothing else. A worker
executes one run at a time (one executor thread); the rest wait in its ready
queue, from where a steal can take them back.

Sharing. The best-ranked task that wants a worker and finds none idle (a
queued one needing a driver, else a running one with units queued) makes
the running ParallelTasks ranked below it with the same warm key yield: their
helpers get no more units, and each one left with nothing in flight (and no
kept result) is let go (``ReleaseWorker``) and taken by that task in the same
``handle``. So a task submitted while a worse one holds every worker starts
as soon as a unit there ends, not after that task ends. A driver is never
taken: it holds its task's instance.

Every unit result is recorded once: the first valid result for an open unit
wins, anything later is dropped. Results are forwarded to the driver.

Dependencies. A unit may name earlier units whose results it takes (``deps``);
such a unit is *blocked* until every dependency is finished, then queued and
dispatched alone, with the holders of its inputs, to fetch them worker to
worker. A ``keep`` unit's result stays on its worker (``held``); if that worker
is lost, the unit is opened and queued again, and workers that reported it
missing are told its new holder.

Locality. Units that go alone (kept or with inputs) are dealt in one
contiguous block per worker with room, an even share each, so that a tree's
siblings land together and every worker gets some. A unit whose inputs add
up to ``LOCALITY_MIN_BYTES`` or more goes where it starts soonest (Dask's
``worker_objective``, simplified): the bytes it would fetch at
``TRANSFER_BYTES_PER_S``, plus what is queued there at the task's unit
time; a holder of its inputs that is full keeps it waiting in the queue
until it has room, unless a worker with room starts it sooner.

Prefetch. Plain Tasks that take less than a round trip would leave a worker
idle between them: a busy worker running a plain Task may also be assigned
the next queued plain Tasks of the same submitter (``queued``, run in order),
up to about ``PREFETCH_SECONDS`` of their measured run time. A worker lost
counts a death against the task it was running only; the ones queued behind
it go back to the queue uncounted. A worker killed to end one of its tasks
(cancelled, failed) gives the others back the same way. The measure is per
submitter, not per function: a task that runs long (``LATE_S`` and more) among
short ones of the same submitter would hold the ones queued behind it. So a
worker whose current plain Task has run ``LATE_S`` queues no more, and on the
next tick while another worker is free the scheduler asks it for the ones
queued there (``TakeBack``); it gives back each that has not begun
(``TakeBackAnswered``), and they go back to the queue, uncounted, in the fair
place they had, for the worker free sooner. With no worker free none is asked:
a master too busy to hear results at once sees every worker late, and asking
each for its queue only added to its load (at 1,000 simulated workers, four
tasks in five were asked for and one in ten assigned twice).

Stealing. A worker of a task with nothing left to queue is idle while a peer
has two runs or more in flight: the scheduler asks that peer to give its newest
run back (``Steal``); the peer accepts only if the run has not started (it
executes one run at a time, so its newest is usually still ready), and the
units go back to the queue for the idle worker. A worker that comes free while
nothing is queued and every worker of a task is busy, one of them with a run
not begun, joins that task to steal it (``_join_to_steal``).

Failure is the normal case. A lost helper's units go back to the front of the
queue; each unit remembers the deaths it witnessed, and the third
(``max_deaths``) fails the task with ``ReportKilled``. A lost driver restarts
the task from its slicer (its helpers are stopped), under the same count.
A unit that raises fails the task; its other workers are killed.

Rejoining. A node back after the master restarted on its state directory (or after
it was declared lost) reports which tasks each worker of it still holds
(``WorkerAdopted``): plain Tasks still queued here are taken back as running on that
worker, so their results (held by the node meanwhile) are not computed again; any
other worker is stopped. Unit results such a stopped worker finished meanwhile
(``UnitsSalvaged``) are kept like journaled ones for the next driver's replay.

Rules
 1. ``handle(event)`` is the one way in; it returns the instructions for the Master actor.
    Nothing here reads a clock or touches a socket: time comes in on the event.
 2. ``_check`` refuses (``InvalidEvent``) what a peer cannot have sent in good faith, before
    anything changes. Stale events (about a task that ended, a worker that no longer works for
    it) are dropped without a word: they are the normal trace of a race, not a fault.
 3. A task's status (``TaskStatus``) changes only through ``_set_status``, checked against
    ``TASK_TRANSITIONS`` (a missing pair raises ``InvalidTransition`` with the story) and written
    to the task's story; the indices of queued and running tasks follow from it.
 4. ``handle`` is all-or-nothing: every change is recorded in an undo log (``Undo``) before it
    is made, so an event that raises after ``_check`` (a bug) leaves the state and the outbox
    as they were; the shell drops it and asks ``validate()`` whether the master can go on.
    Only the id counters move on (a rolled-back call skips some ids; none is reused). Hot loops
    record per batch: a list registered in the log before the loop and filled as it goes.
 5. Each ``handle`` ends with a scheduling pass (``_schedule``) unless asked not to
    (``schedule=False``): a shell with a burst of events waiting leaves the pass to the burst's
    last event. A pass costs about as much for one queued task as for hundreds: who is idle and
    who may queue more is looked up once per pass (``_Picker``), not once per task.

Invariants (``validate``): a busy worker is in the worker set of its task
and of each task queued on it, and vice versa; only a busy worker has tasks
queued, and only plain ones; in-flight units are open and not pending; a
finished task holds no worker; the driver is one of the task's workers.
"""

from __future__ import annotations

import functools
import heapq
import io
import itertools
import pickle
import sys
from collections import deque
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar, cast

from actors.core.fair_share import DEFAULT_COST_S, FairShare
from actors.core.id_set import IdSet
from actors.core.scheduler_events import (
    Assign,
    CancelRequested,
    ClientLeft,
    Dispatch,
    Event,
    ForwardItems,
    ForwardResults,
    Instruction,
    KillWorker,
    NewestVersion,
    NodeJoined,
    NodeLost,
    RecordResults,
    ReleaseWorker,
    ReplayResults,
    ReportCancelled,
    ReportDone,
    ReportErred,
    ReportInputFailed,
    ReportKilled,
    ReportOverBudget,
    ReportProgress,
    ReportUnreachable,
    RunsReleased,
    Steal,
    StealAnswered,
    StopTask,
    TakeBack,
    TakeBackAnswered,
    TaskFinished,
    TaskKind,
    TasksDetached,
    TaskStatus,
    TaskSubmitted,
    TellHolders,
    TellPeerGone,
    Tick,
    UnitMissing,
    UnitsFinished,
    UnitsNotReplayed,
    UnitsSalvaged,
    UnitsSliced,
    WorkerAdopted,
    WorkerLost,
    WorkerPaused,
    WorkerReady,
    WorkerStopped,
)
from actors.core.undo import MISSING, Undo, restore
from actors.core.unit_book import NO_UNITS, Opened, UnitBook
from actors.errors import InvalidEvent, InvalidTransition
from actors.messages import (
    INLINE_RESULT_BYTES,
    MAX_PACK,
    UnitCall,
    UnitOutcome,
    pack_size,
    unit_digest,
)

BATCH_SECONDS = 0.005  # work per dispatched batch
PREFETCH_SECONDS = 0.05  # work queued on a worker: covers a batch's round trip (measured)
MAX_BATCH = 2048  # units of a run, however short (a run is still ~BATCH_SECONDS of work)
# A driver packs plain units measured shorter than this much of work together (about this
# much a pack, a power of two of them, MAX_PACK at most; UnitCall.count): the master, the
# wire and the pickler then pay per pack, and a run still holds several packs.
PACK_SECONDS = 0.001
# Where a unit's inputs are held (see Locality): moving bytes between workers is assumed to
# run at this rate (Dask's default estimate, conservative: two nodes on one host move ~400
# MB/s here), inputs under LOCALITY_MIN_BYTES in all are not worth waiting for, and a unit
# not measured yet is assumed to take UNKNOWN_UNIT_S (Dask's default task duration).
TRANSFER_BYTES_PER_S = 100e6
LOCALITY_MIN_BYTES = 1 << 20
UNKNOWN_UNIT_S = 0.5
# Plain Tasks queued on one worker behind the one it runs, however short (PREFETCH_SECONDS of
# them bounds the rest): room for the master's refill to come while the worker still has work
# (a worker reports ends ~1 ms apart while it runs: a 2,000-task map at 64 +7 % at 128, 256
# the same as 128 and 512 worse; bench/README.md).
MAX_QUEUED_TASKS = 128
# A plain Task running this long is late for the ones queued behind it (they were measured at
# PREFETCH_SECONDS at most between them): they are taken back, and no more queue there.
LATE_S = 4 * PREFETCH_SECONDS
# A worker that reports a unit's result missing this often while its holder lives cannot reach
# that holder's data address (each report follows a fetch that got no answer): the task fails.
MAX_FETCH_FAILURES = 3
STORY_LENGTH = 2_000
STORY_OPEN_UNITS = 100  # open units a story lists where they are
FINISHED_KEPT = 10_000  # finished tasks whose story can still be asked for
# Salvaged unit results (a worker's word) mark a bit each in the task's journaled bitmap: bounded.
MAX_SALVAGED_INDEX = 1 << 24
MAX_RETIRED = 100_000  # worker ids remembered as dropped for good
# The most a worker may say a run or a Task took (a worker's word, averaged into the times
# that size packs and runs and into fair shares): a year; beyond, or not a number, refused.
MAX_ELAPSED_S = 365 * 86400.0
# What an open unit costs the master beyond its arguments (the UnitCall, its place in the
# book): counted with them in its key's budget (UnitsSliced.room).
UNIT_OVERHEAD_BYTES = 200
# A task's open units may pass its key's budget up to this: twice what a driver slices ahead
# (task_host.LOOKAHEAD_BYTES), so that only a driver that ignores its look-ahead fails.
UNITS_AHEAD_BYTES = 128 << 20

StoryEntry = tuple[str, str, str, str, float]

QUEUED, RUNNING, DONE = TaskStatus.QUEUED, TaskStatus.RUNNING, TaskStatus.DONE
ERRED, CANCELLED = TaskStatus.ERRED, TaskStatus.CANCELLED
FINISHED = frozenset({DONE, ERRED, CANCELLED})
TASK, PARALLEL = TaskKind.TASK, TaskKind.PARALLEL

# Every change of a task's status goes through SchedulerState._set_status, which refuses a pair
# missing here (InvalidTransition, with the task's story) and writes the change to the story.
TASK_TRANSITIONS: dict[tuple[TaskStatus, TaskStatus], str] = {
    (QUEUED, RUNNING): "a worker became its driver",
    (RUNNING, QUEUED): "its driver was lost, or its own code raised and runs again",
    (QUEUED, CANCELLED): "cancelled, or its client left, before it started",
    (RUNNING, CANCELLED): "cancelled, or its client left",
    (RUNNING, DONE): "its driver reported its result",
    (RUNNING, ERRED): "its code raised for good, workers died under it too often, or it "
                      "sliced units past its key's memory budget",
    (QUEUED, ERRED): "an input of it (a future among its arguments) failed or was cancelled",
}


K = TypeVar("K")

# A queued task's place: (-priority, bucket, turn, slot, client, start) as fair_share.py orders
# them, then its submission order and its id.
QueueEntry = tuple[int, int, int, int, str, float, int, str]

#: A submitted kind's text -> the kind (``TaskKind(text)`` is a Python-level lookup per submit).
_TASK_KINDS: dict[str, TaskKind] = {kind.value: kind for kind in TaskKind}


# How to undo the changes the hot paths record per batch (see Undo). A reversal is recorded
# after its change, or before it with a list the loop fills once each change is made.

def _unpush(queue: list[QueueEntry], entry: QueueEntry) -> None:
    queue.remove(entry)
    heapq.heapify(queue)


def _unsubmit(state: SchedulerState, task: TaskRecord, key: tuple[str, int], owner: str,
              size: int) -> None:
    """A new task's entry, queued counts and arguments' bytes (``_submitted``) undone."""
    del state.tasks[task.task_id]
    _move(state.queued, key, -1)
    _move(state.queued_owners, owner, -1)
    if size:
        _add_bytes(state.args_bytes, owner, -size)


def _move(counts: dict[K, int], key: K, change: int) -> None:
    """A count moved by ``change``; zero leaves no entry (not idempotent: undone by the
    opposite change, recorded once it is made)."""
    if count := counts.get(key, 0) + change:
        counts[key] = count
    else:
        del counts[key]


def _unqueue(queue: list[QueueEntry], task: TaskRecord, fair: QueueEntry | None,
             entry: QueueEntry) -> None:
    """``_enqueue`` undone: the entry out of the heap, the task's fair place as it was."""
    _unpush(queue, entry)
    task.fair = fair


def _restore_members(task: TaskRecord, workers: set[str], seen: set[str],
                     driver: str | None) -> None:
    task.workers, task.seen_workers, task.driver = workers, seen, driver


def _restore_ended(task: TaskRecord, code: bytes, args: bytes, workers: set[str],
                   driver: str | None) -> None:
    task.code, task.args, task.workers, task.driver = code, args, workers, driver


def _unforget(finished: deque[str], tasks: dict[str, TaskRecord], task_id: str,
              task: TaskRecord | None) -> None:
    finished.appendleft(task_id)
    if task is not None:
        tasks[task_id] = task


def _restore_current(worker: WorkerRecord, task_id: str | None, since: float,
                     warm_for: WarmKey | None) -> None:
    worker.task_id, worker.since, worker.warm_for = task_id, since, warm_for


def _add_bytes(held: dict[str, int], owner: str, size: int) -> None:
    """A count of bytes moved; zero leaves no entry. Undone by the same with ``-size``,
    recorded once the change is made (it is not idempotent, as ``Undo.put``'s reverse is)."""
    if total := held.get(owner, 0) + size:
        held[owner] = total
    else:
        del held[owner]


def _unrequeue(pending: deque[UnitCall], in_flight: dict[int, int],
               runs: list[tuple[int, int]]) -> None:
    for index, run_id in reversed(runs):
        pending.popleft()
        in_flight[index] = run_id


def _put_back_first(pending: deque[UnitCall], units: list[UnitCall]) -> None:
    pending.extendleft(reversed(units))


class _Pickler(pickle.Pickler):
    # The shared, sealed empties stay the very objects the code compares against.
    def persistent_id(self, obj: object) -> str | None:
        return "NO_WORKERS" if obj is NO_WORKERS else "NO_UNITS" if obj is NO_UNITS else None


class _Unpickler(pickle.Unpickler):
    def persistent_load(self, pid: object) -> object:
        if pid == "NO_WORKERS":
            return NO_WORKERS
        if pid == "NO_UNITS":
            return NO_UNITS
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")


def _share_values(task: TaskRecord, same: dict[object, Any]) -> None:
    """A finished task's equal values made one object (``same``: value -> the one kept); what
    only a queued task needs (its fair place) dropped. Changes no value a reader sees."""
    task.client_id = same.setdefault(task.client_id, task.client_id)
    task.name = same.setdefault(task.name, task.name)
    task.owner = same.setdefault(task.owner, task.owner)
    task.code_hash = same.setdefault(task.code_hash, task.code_hash)
    task.warm_key = same.setdefault(task.warm_key, task.warm_key)
    if task.seen_workers is not NO_WORKERS:
        seen = frozenset(task.seen_workers)
        task.seen_workers = cast(set[str], same.setdefault(seen, seen))
    task.fair = None
    task.queued_how = same.setdefault(task.queued_how, task.queued_how)
    task.lines = [(same.setdefault(key, key), start, finish, same.setdefault(cause, cause), when)
                  for key, start, finish, cause, when in task.lines]


def _pack(value: object) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(value)
    return buffer.getvalue()


def _unpack(blob: bytes) -> Any:
    return _Unpickler(io.BytesIO(blob)).load()


def _pack_for(unit_seconds: float, result_bytes: float = 0.0) -> int:
    """The units to pack together (``UnitCall.count``) when one takes this long and returns this
    many bytes: a power of two (packs keep their bounds while it moves a little), 1 for units
    of PACK_SECONDS or more, and no more than keep a pack's results inline (a larger result
    stays on its worker, for the driver to gather)."""
    # (min before int: a unit measured at a few nanoseconds makes the ratio too large for one)
    wanted = int(min(PACK_SECONDS / unit_seconds, MAX_PACK)) if unit_seconds > 0 else MAX_PACK
    if result_bytes > 0:
        wanted = min(wanted, int(min(INLINE_RESULT_BYTES / result_bytes, MAX_PACK)))
    return pack_size(wanted)


def _raised_in(unit: UnitCall, outcome: UnitOutcome) -> int:
    """The index of the unit that raised: of a pack, the one the worker names if it is in it."""
    if unit.count and unit.index <= outcome.unit < unit.index + unit.count:
        return outcome.unit
    return unit.index


def _drop_first(pending: deque[UnitCall], count: int) -> None:
    for _ in range(count):
        pending.popleft()


def _share(pending: deque[UnitCall], workers: int, room: int) -> int:
    """How many of the units that go alone at the head of ``pending`` each of ``workers``
    takes in one pass: an even share of them (counted up to the ``room`` all have), in one
    contiguous block per worker, so that neighbours (a tree's siblings) land together."""
    count = 0
    for unit in itertools.islice(pending, room):
        if not (unit.keep or unit.deps):
            break
        count += 1
    return max(1, -(-count // workers))


def _take_back(in_flight: dict[int, int], units: list[UnitCall]) -> None:
    for unit in units:
        in_flight.pop(unit.index, None)


def _unnote(task: TaskRecord, lines: list[StoryEntry] | tuple[()], story: list[StoryEntry],
            evicted: StoryEntry | None) -> None:
    """``SchedulerState._noted`` undone: the line out, the one it pushed out back in."""
    story.pop()
    if evicted is not None:
        story.insert(0, evicted)
    task.lines = lines


def _status_back(state: SchedulerState, task: TaskRecord, start: TaskStatus, finish: TaskStatus,
                 lines: list[StoryEntry] | tuple[()], story: list[StoryEntry],
                 evicted: StoryEntry | None, change: int, running: TaskRecord | None) -> None:
    """The common part of ``SchedulerState._set_status`` undone."""
    if finish in FINISHED:
        state._finished.pop()
    elif finish is RUNNING:
        del state._running[task.task_id]
    if running is not None:
        state._running[task.task_id] = running
    if change:
        _move(state.queued, (task.client_id, task.priority), -change)
        _move(state.queued_owners, task.warm_key.owner, -change)
    task.state = start
    _unnote(task, lines, story, evicted)


def _open_bytes(units: UnitBook) -> int:
    """What a task's open units (and its kept ones, to compute again if lost) hold."""
    calls = [*units.open_units.values(),
             *(unit for index, unit in units.kept.items() if index not in units.open_units)]
    return sum(len(unit.args) for unit in calls) + UNIT_OVERHEAD_BYTES * len(calls)


def _rank(task: TaskRecord) -> tuple[int, int]:
    """Who goes first: the higher ``priority``, then the earlier submitted."""
    return -task.priority, task.seq


class WarmKey(NamedTuple):
    """Whose code a worker ran, so who may reuse it: one key (every client of one person's key:
    a notebook and the command line), one package version (or the code it shipped by value: no
    package)."""

    owner: str
    package: str = ""
    version: str = ""


@functools.lru_cache(maxsize=1024)
def _warm_key(owner: str, package: str, version: str) -> WarmKey:
    """One WarmKey for all the tasks of an owner and version (one each: 80 bytes a queued
    task; and a worker's ``warm_for`` would hold one made in the middle of a backlog)."""
    return WarmKey(owner, package, version)


@dataclass
class WorkerRecord:
    worker_id: str
    node_id: str
    task_id: str | None = None
    warm_for: WarmKey | None = None  # whose code this worker has run (None: clean)
    in_flight: dict[int, int] = field(default_factory=dict)  # unit index -> run id
    queued: deque[str] = field(default_factory=deque)  # plain Tasks to run after task_id
    since: float = 0.0  # when task_id became its current task (as the scheduler heard)
    taking_back: tuple[str, ...] = ()  # queued ones it was asked to give back (TakeBack)
    paused: bool = False  # past its memory's pause mark: no new work (WorkerPaused)
    # Cancelled tasks whose code it was asked to stop (StopTask): no new work until it says
    # they stopped (WorkerStopped), or it is killed at ``stop_by``.
    stopping: tuple[str, ...] = ()
    stop_by: float = 0.0
    seq: int = 0  # its join order: who is picked first among equals (_Picker)


# The workers of a task that has none: one shared, empty and frozen (an empty set costs a queued
# task 216 bytes); replaced by a set of its own when a worker joins (``_join``), never changed.
NO_WORKERS: set[str] = cast(set[str], frozenset())


@dataclass(kw_only=True, slots=True)
class TaskRecord:
    """One task instance. Slotted, and nothing allocated that a queued plain Task does not use
    (no units, no story beyond its lines): a master holds a backlog of 10^5 of these."""

    task_id: str
    client_id: str
    name: str
    kind: TaskKind
    code: bytes
    args: bytes
    priority: int
    seq: int
    package: str = ""
    version: str = ""
    retries: int = 0  # runs again of a unit (or of the driver's own code) that raised
    code_hash: str = ""
    owner: str = ""  # its submitter's key ("": its client id stands for it)
    # Its entry in the queue, made when first queued: its place in the fair order (fair_share.py)
    # is kept when it is queued again; the queue's heap holds this same tuple (one per task).
    fair: QueueEntry | None = None
    state: TaskStatus = QUEUED  # changed only by SchedulerState._set_status
    driver: str | None = None
    # (the shared empty set as a plain default, not a factory: a Python call less, a task)
    workers: set[str] = NO_WORKERS
    # A ParallelTask's units; every plain Task shares the sealed, empty NO_UNITS (set by
    # __post_init__: a default factory's call less, a task).
    units: UnitBook = field(init=False)
    deaths: dict[int, list[str]] | None = None  # unit index (-1: driver) -> causes
    failures: dict[int, int] | None = None  # unit index (-1: driver) -> times it raised
    seen_workers: set[str] = NO_WORKERS  # every worker that joined
    # The story after its first line (queued, when and how: ``queued_at``, ``queued_how``), the
    # last STORY_LENGTH; a shared empty tuple until a second line comes (a list and the first
    # line's tuple took 170 bytes of every queued task). Read it whole as ``story``.
    lines: list[StoryEntry] | tuple[()] = ()
    queued_at: float = 0.0
    queued_how: str = "submitted"
    inputs: tuple[str, ...] = ()  # the tasks whose results its arguments name
    inputs_left: set[str] | None = None  # those not done yet: it waits outside the queue
    detached: bool = False  # fire and forget: not cancelled when its client leaves
    items: bool = False  # a batched map: its units' outcomes go to its client as they finish

    # Who may reuse a worker this task ran on: the same key, the same package version.
    warm_key: WarmKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.warm_key = _warm_key(self.owner or self.client_id, self.package, self.version)
        self.units = NO_UNITS

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    @property
    def story(self) -> list[StoryEntry]:
        """Its transitions, oldest first: the first (queued) and the last STORY_LENGTH after it."""
        return [("task", "released", "queued", self.queued_how, self.queued_at), *self.lines]


class _Picker:
    """Who takes the next queued task, for one pass of ``_start_queued``: built once from the
    workers (in join order), then kept in step with the pass's own joins, the only changes to
    the workers during it. The first idle worker warm for the task's key, else the first clean
    one (as ``_idle_worker_for``); else, for a plain Task, a busy worker of the same key running
    a plain Task that may queue it (see Prefetch): the one with the fewest queued (the first of
    them), while it has room for about ``PREFETCH_SECONDS`` of them."""

    def __init__(self, state: SchedulerState, now: float) -> None:
        self.state = state
        self.late_since = now - LATE_S  # a worker busy since before this queues no more
        self.idle_by_key: dict[WarmKey | None, deque[WorkerRecord]] = {}
        for worker in state.workers.values():
            if worker.task_id is None and not worker.paused and not worker.stopping:
                self.idle_by_key.setdefault(worker.warm_for, deque()).append(worker)
        # warm key -> heap of (tasks queued, join order, worker id), built on first use
        self.busy: dict[WarmKey, list[tuple[int, int, str]]] = {}

    def idle(self, warm_key: WarmKey) -> WorkerRecord | None:
        for wanted in (warm_key, None):
            found = self.idle_by_key.get(wanted)
            if found:
                return found[0]
        return None

    def prefetch(self, task: TaskRecord) -> WorkerRecord | None:
        seconds = self.state.task_seconds.get(task.warm_key)
        if task.kind is not TASK or seconds is None:
            return None
        room = min(MAX_QUEUED_TASKS, int(PREFETCH_SECONDS / max(seconds, 1e-6)))
        heap = self._busy(task.warm_key)
        if not heap or heap[0][0] >= room:
            return None
        return self.state.workers[heap[0][2]]

    def joined(self, task: TaskRecord, worker: WorkerRecord, *, queued: bool) -> None:
        if queued:  # it was the top of its key's heap: one more task queued now
            heapq.heapreplace(self.busy[task.warm_key], (
                len(worker.queued), worker.seq, worker.worker_id))
            return
        for key in (task.warm_key, None):  # it was the first idle one of one of these
            found = self.idle_by_key.get(key)
            if found and found[0] is worker:
                found.popleft()
                break
        busy = self.busy.get(task.warm_key)
        if busy is not None and task.kind is TASK:  # busy with a plain Task: may queue more
            heapq.heappush(busy, (len(worker.queued), worker.seq, worker.worker_id))

    def _busy(self, warm_key: WarmKey) -> list[tuple[int, int, str]]:
        heap = self.busy.get(warm_key)
        if heap is None:
            state = self.state
            heap = self.busy[warm_key] = [
                (len(w.queued), w.seq, w.worker_id)
                for w in state.workers.values()
                if w.task_id is not None and w.warm_for == warm_key and not w.paused
                and not w.stopping and w.since >= self.late_since
                and state.tasks[w.task_id].kind is TASK]
            heapq.heapify(heap)
        return heap


def _runs_to_give(worker: WorkerRecord) -> set[int]:
    """The runs a worker holds when there are two or more (all but its oldest may be stolen);
    else none. Most workers of a large task hold one run or none: skipped without a set."""
    if len(worker.in_flight) < 2:
        return set()
    runs = set(worker.in_flight.values())
    return runs if len(runs) > 1 else set()


def _victim_order(entry: tuple[bool, int, str, WorkerRecord, set[int]]) -> tuple[bool, int, str]:
    return entry[0], entry[1], entry[2]


class SchedulerState:
    def __init__(self, *, max_deaths: int = 3, restart_after_error: bool = False,
                 first_batch: int = 1, first_depth: int = 1) -> None:
        self.max_deaths = max_deaths
        # Units per run, and in flight per worker, until a task's unit time is measured (see
        # Batches): one at a time, as units of unknown length may each take long.
        self.first_batch, self.first_depth = first_batch, max(first_batch, first_depth)
        # Stop the workers of a task whose code raised (a fresh interpreter after any failure),
        # not only after a fatal error (UnitOutcome.fatal).
        self.restart_after_error = restart_after_error
        self.nodes: dict[str, set[str]] = {}
        self.data_addresses: dict[str, str] = {}  # node -> where peers fetch from it
        self.paused: set[str] = set()  # workers past their memory's pause mark
        self.stopping: set[str] = set()  # workers asked to stop a cancelled task's code
        # Workers dropped for good (told to stop, or exited), the newest MAX_RETIRED: ids are
        # never reused, so a WorkerReady naming one is not a new worker (task code kept a worker
        # it was to leave alive by saying its Hello again, and was given another key's task).
        self.retired: dict[str, None] = {}
        self.dependents: dict[str, list[str]] = {}  # task -> the tasks waiting for its result
        self.draining: set[str] = set()  # queued ParallelTasks whose helpers finish their runs
        self.workers: dict[str, WorkerRecord] = {}
        self.tasks: dict[str, TaskRecord] = {}
        self.newest: dict[str, str | None] = {}  # package -> newest version
        self._finished: deque[str] = deque()
        # Queued tasks by (-priority, fair tag, seq) (fair_share.py); stale entries are skipped
        # when popped. Running
        # tasks apart: scheduling never scans the finished ones kept for their story.
        self._queue: list[QueueEntry] = []
        self.fair = FairShare()
        # Queued tasks by (client, priority): the master hands the scheduler a client's backlog
        # a window at a time (actors/master_backlog.py).
        self.queued: dict[tuple[str, int], int] = {}
        self.queued_owners: dict[str, int] = {}  # ... and by owner (a key's clients together)
        # Bytes of arguments the unfinished tasks of each owner hold (a task's go at its end):
        # the master's budget per key (Master._over_budget)
        self.args_bytes: dict[str, int] = {}
        # Per owner, a bound from above on the bytes its open units hold (see _room_for).
        self.unit_bytes_bound: dict[str, int] = {}
        self._running: dict[str, TaskRecord] = {}
        self._parallel: dict[str, TaskRecord] = {}  # the running ParallelTasks: units to hand out
        self._seq = itertools.count()
        self._run_ids = itertools.count(1)
        self._worker_seq = itertools.count()  # join order (WorkerRecord.seq)
        self._out: list[Instruction] = []
        self._undo = Undo()
        self.task_seconds: dict[WarmKey, float] = {}  # moving average of a Task's run time
        self.late_checked = 0.0  # when workers were last looked over for late tasks

    # --- the one entry point ------------------------------------------------

    def handle(self, event: Event, *, schedule: bool = True) -> list[Instruction]:
        """Apply ``event``, then schedule; the instructions to carry out, in order. Without
        ``schedule`` the scheduling pass waits for the next event that has one: a shell with a
        burst of events waiting makes one pass for the burst (see ``_start_queued``).

        ``InvalidEvent`` (what a peer could not have sent in good faith) is raised by ``_check``
        before anything changes. An event that raises later is a bug: every change it made is
        undone and its instructions are dropped with it (rule 4)."""
        self._check(event)
        try:
            self._handle(event)
            if schedule:
                self._schedule(event.now)
            self._undo.commit()
        except BaseException:
            self._out = []
            self._undo.rollback()
            raise
        out, self._out = self._out, []
        return out

    def handle_many(self, events: Iterable[Event]) -> tuple[list[Instruction],
                                                            list[tuple[int, Exception]]]:
        """Apply each event as ``handle(event, schedule=False)`` would, in one call: the
        instructions of all of them, and the events that did not apply (their positions) with
        why (each alone: one refused, or raising, leaves nothing of itself and takes nothing of
        the others with it). The scheduling pass waits for the next event that has one. For a
        shell's burst of events (a refill of a client's backlog, a map's submits, the tasks'
        ends a node relayed together): one call, not one each."""
        undo, out = self._undo, self._out
        failed: list[tuple[int, Exception]] = []
        for index, event in enumerate(events):
            emitted = len(out)
            try:
                self._check(event)
                self._handle(event)
                # Each event's records go as it is done (it stands alone): the next reuses
                # their memory, where a burst's records kept to its end cost more than they
                # save (measured).
                undo.commit()
            except BaseException as exc:
                undo.rollback()
                del out[emitted:]
                if not isinstance(exc, Exception):
                    raise  # (an interrupt: those done before it stand, their instructions
                    # go out with the next call's)
                failed.append((index, exc))
        out, self._out = self._out, []
        return out, failed

    def _check(self, event: Event) -> None:
        """Refuse, before any change, the events whose fields the handlers take on trust."""
        match event:
            case TaskSubmitted(kind=kind) if kind not in _TASK_KINDS:
                raise InvalidEvent(event, f"unknown task kind {kind!r}")
            case UnitsSliced(units=units):
                for unit in units:
                    if unit.index < 0 or (unit.deps and any(not 0 <= dep < unit.index
                                                            for dep in unit.deps)):
                        raise InvalidEvent(event, f"unit {unit.index} with dependencies "
                                                  f"{list(unit.deps)[:5]}: a unit depends only on "
                                                  "units sliced before it")
                    if unit.count and (not 0 < unit.count <= MAX_PACK or unit.deps or unit.keep):
                        raise InvalidEvent(event, f"a pack of {unit.count} units at {unit.index}: "
                                                  f"1 to {MAX_PACK} plain units")
            case TaskFinished(elapsed=elapsed) | UnitsFinished(elapsed=elapsed) \
                    if not 0.0 <= elapsed <= MAX_ELAPSED_S:
                raise InvalidEvent(event, f"elapsed {elapsed!r}: seconds, 0 to {MAX_ELAPSED_S:.0f}")

    def idle(self) -> bool:
        """Nothing running, nothing queued (a stale queue entry, not yet popped, counts as
        queued: it goes at the next scheduling pass)."""
        return not self._running and not self._queue

    def compact(self) -> None:
        """Between events, after a backlog drained: rebuild the tables it left oversized (a
        dict never shrinks its table as entries go). Changes no content."""
        self.tasks = dict(self.tasks)
        self._running = dict(self._running)
        self._parallel = dict(self._parallel)
        self._finished = deque(self._finished)
        self._queue = list(self._queue)
        self.queued, self.queued_owners = dict(self.queued), dict(self.queued_owners)
        self.args_bytes = dict(self.args_bytes)

    def pack_finished(self) -> bytes:
        """Between events, once a backlog drained: the finished tasks kept for their stories,
        taken out as one pickle (``unpack_finished`` puts them back). Why: a finished task's
        record, story and strings were allocated all through the burst, a few in each of the
        allocator's arenas, and an arena goes back to the system only when nothing in it lives
        (see docs/architecture.md, Memory). Packed, freed, then unpacked into fresh memory,
        they fill a few arenas and the rest are returned."""
        ids = [task_id for task_id in self._finished if task_id in self.tasks]
        records = [self.tasks[task_id] for task_id in ids]
        # Equal values become one object (the pickle keeps one copy of each): a burst's tasks
        # name the same few clients, workers and causes thousands of times over.
        same: dict[object, object] = {}
        for task in records:
            _share_values(task, same)
        blob = _pack((list(self.tasks), ids, records))
        del records, same
        self._finished = deque()
        gone = set(ids)
        self.tasks = {task_id: task for task_id, task in self.tasks.items() if task_id not in gone}
        return blob

    def unpack_finished(self, blob: bytes) -> None:
        """Put back what ``pack_finished`` took out, in the same order."""
        order, ids, records = _unpack(blob)
        finished = dict(zip(ids, records, strict=True))
        live = self.tasks
        self.tasks = {task_id: finished[task_id] if task_id in finished else live[task_id]
                      for task_id in order if task_id in finished or task_id in live}
        self._finished = deque(ids)

    def story(self, task_id: str, now: float | None = None) -> list[StoryEntry]:
        """The task's transitions; with ``now``, closed by where each open unit is at that time
        (the answer to "why is it stuck?"): queued, blocked on which inputs, or on which worker."""
        task = self.tasks.get(task_id)
        if task is None:
            return []
        entries = list(task.story)
        if now is not None and not task.finished:
            where = {i: f"running on {w}" for w in sorted(task.workers)
                     for i in self.workers[w].in_flight}
            for index in sorted(task.units.open_units)[:STORY_OPEN_UNITS]:
                if index in where:
                    state = where[index]
                elif index in task.units.blocked:
                    missing = [d for d in task.units.blocked[index].deps if d not in task.units.held]
                    state = f"blocked on units {missing}"
                else:
                    state = "queued"
                entries.append((f"unit {index}", "open", "now", state, now))
        return entries

    def _handle(self, event: Event) -> None:
        undo = self._undo
        match event:  # (the events of every task and unit first: each case is a type check)
            case UnitsFinished():
                self._units_finished(event)
            case TaskFinished():
                self._task_finished(event)
            case TaskSubmitted():
                self._submitted(event)
            case UnitsSliced():
                self._sliced(event)
            case NodeJoined(node_id=node_id, data_address=address):
                if node_id not in self.nodes:
                    undo.put(self.nodes, node_id, set())
                undo.put(self.data_addresses, node_id, address)
            case WorkerReady(node_id=node_id, worker_id=worker_id):
                # A repeated announcement, or a late one from a node declared lost since, would
                # overwrite a worker's record behind its task's back: only new workers of live nodes.
                if node_id in self.nodes and worker_id in self.retired:
                    # (its stop may have been lost on the way: said again, and never used)
                    self._out.append(KillWorker(node_id, worker_id, "it was dropped for good"))
                elif node_id in self.nodes and worker_id not in self.workers:
                    undo.add(self.nodes[node_id], worker_id)
                    undo.put(self.workers, worker_id,
                             WorkerRecord(worker_id, node_id, seq=next(self._worker_seq)))
            case WorkerAdopted():
                self._adopted(event)
            case UnitsSalvaged():
                self._salvaged(event)
            case NodeLost(node_id=node_id, reason=reason):
                for worker_id in sorted(undo.pop(self.nodes, node_id) or ()):
                    self._worker_lost(worker_id, f"node {node_id} lost: {reason}", False, event.now,
                                      with_node=True)
            case WorkerLost(worker_id=worker_id, cause=cause, expected=expected):
                self._worker_lost(worker_id, cause, expected, event.now)
            case CancelRequested(task_id=task_id, grace=grace):
                task = self.tasks.get(task_id)
                if task is not None and not task.finished:
                    self._end(task, CANCELLED, "cancel requested", event.now, grace=grace)
                    self._out.append(ReportCancelled(task.client_id, task.task_id))
            case ClientLeft(client_id=client_id):
                # Its workers go to the clients still here (and its processes are stopped).
                for task in [t for t in self.tasks.values()
                             if t.client_id == client_id and not t.finished and not t.detached]:
                    if task.finished:
                        continue  # failed meanwhile: one of its inputs was cancelled
                    self._end(task, CANCELLED, "its client left", event.now)
                    self._out.append(ReportCancelled(task.client_id, task.task_id))
                for key in [k for k in self.task_seconds if k.owner == client_id]:
                    undo.pop(self.task_seconds, key)
                self.fair.client_left(undo, client_id)
            case StealAnswered():
                self._steal_answered(event)
            case RunsReleased(worker_id=worker_id, task_id=task_id, run_ids=run_ids):
                task = self._parallel_of(worker_id, task_id)
                if task is not None:
                    self._requeue_runs(task, self.workers[worker_id], set(run_ids))
            case UnitMissing():
                self._unit_missing(event)
            case UnitsNotReplayed():
                self._not_replayed(event)
            case NewestVersion(package=package, version=version):
                undo.put(self.newest, package, version)
                for worker in list(self.workers.values()):
                    if worker.task_id is None and self._is_stale(worker.warm_for):
                        self._drop_worker(worker.worker_id)
                        self._out.append(KillWorker(worker.node_id, worker.worker_id,
                                                    "warm for an old package version"))
            case WorkerPaused():
                self._paused(event)
            case WorkerStopped():
                self._stopped(event)
            case TasksDetached(client_id=client_id, task_ids=task_ids):
                pending = list(task_ids)
                while pending:  # the task, and what it waits for (inputs are the same client's)
                    task = self.tasks.get(pending.pop())
                    if task is None or task.client_id != client_id or task.finished \
                            or task.detached:
                        continue
                    undo.set(task, "detached", True)
                    pending.extend(task.inputs_left or ())
            case Tick():
                self._report_progress()
                self._stop_overdue(event.now)
                self._take_back_late(event.now)
            case TakeBackAnswered():
                self._taken_back(event)
            case _:
                raise TypeError(f"unknown scheduler event {event!r}")

    # --- tasks --------------------------------------------------------------

    def _submitted(self, event: TaskSubmitted) -> None:
        if event.task_id in self.tasks:
            return  # a resent submit: the first one stands
        # A burst's tasks name the same class, hash and package in strings each message decodes
        # afresh (~190 bytes a task): one copy of each, kept while a task names it.
        task = TaskRecord(
            task_id=event.task_id, client_id=event.client_id, name=sys.intern(event.name),
            kind=_TASK_KINDS[event.kind], code=event.code, args=event.args,
            priority=event.priority, seq=next(self._seq), package=sys.intern(event.package),
            version=sys.intern(event.version), retries=max(0, event.retries),
            code_hash=sys.intern(event.code_hash), owner=event.owner,
            inputs=tuple(dict.fromkeys(event.inputs)), items=event.items,
        )
        if task.kind is PARALLEL:
            task.units = UnitBook()
            for index in event.journaled:
                if index >= 0:
                    task.units.set_journaled(index, True)
            task.units.done_count = task.units.journaled_count
        # Its entry, its queued counts (by client and priority, and by owner) and its
        # arguments' bytes, with one record for all (every task comes here; no count reaches
        # zero by an addition)
        key, owner, size = (task.client_id, task.priority), task.warm_key.owner, len(task.args)
        self.tasks[task.task_id] = task
        queued, owners = self.queued, self.queued_owners
        queued[key] = queued.get(key, 0) + 1
        owners[owner] = owners.get(owner, 0) + 1
        if size:
            held = self.args_bytes
            held[owner] = held.get(owner, 0) + size
        self._undo.record((_unsubmit, (self, task, key, owner, size)))
        # The story's first line, kept as two fields (see TaskRecord.lines)
        task.queued_at = event.now
        if event.journaled or event.restored:
            task.queued_how = (f"restored with {task.units.journaled_count} finished units"
                               if event.journaled else "restored")
        if not self._wait_for_inputs(task, event.now):
            self._enqueue(task)

    def _wait_for_inputs(self, task: TaskRecord, now: float) -> bool:
        """Whether the task waits for inputs (its arguments' futures) that are not done yet;
        one that failed or was cancelled fails it at once. Inputs this scheduler does not know
        (finished and forgotten) the shell has checked."""
        left: list[str] = []
        for input_id in task.inputs:
            source = self.tasks.get(input_id)
            if source is None or source.state is DONE or source is task:
                continue  # (itself: no client's future can name it; the shell refuses that)
            if source.finished:
                self._input_failed(task, source, now)
                return True
            left.append(input_id)
        if not left:
            return False
        undo = self._undo
        undo.set(task, "inputs_left", set(left))
        for input_id in left:
            if input_id not in self.dependents:
                undo.put(self.dependents, input_id, [])
            self.dependents[input_id].append(task.task_id)
            undo.call(self.dependents[input_id].pop)
        shown = ", ".join(left[:3]) + (f" and {len(left) - 3} more" if len(left) > 3 else "")
        self._note(task, "task", "queued", "waiting", f"for its inputs {shown}", now)
        return True

    def _inputs_ended(self, source: TaskRecord, now: float) -> None:
        """``source`` ended: the tasks waiting for its result go to the queue once they have
        all their inputs, or fail if it did not end well."""
        for task_id in self._undo.pop(self.dependents, source.task_id) or ():
            task = self.tasks.get(task_id)
            if task is None or task.finished or task.inputs_left is None:
                continue  # cancelled meanwhile
            if source.state is not DONE:
                self._input_failed(task, source, now)
                continue
            left = task.inputs_left - {source.task_id}
            self._undo.set(task, "inputs_left", left or None)
            if not left:
                self._note(task, "task", "waiting", "queued", "its inputs are done", now)
                self._enqueue(task)

    def _input_failed(self, task: TaskRecord, source: TaskRecord, now: float) -> None:
        self._end(task, ERRED, f"its input {source.task_id} {source.state}", now)
        self._out.append(ReportInputFailed(task.client_id, task.task_id, source.task_id,
                                           str(source.state)))

    def _adopted(self, event: WorkerAdopted) -> None:
        node_id, worker_id = event.node_id, event.worker_id
        if node_id not in self.nodes or worker_id in self.workers:
            return  # a node declared lost since, or a report repeated
        if worker_id in self.retired:
            self._out.append(KillWorker(node_id, worker_id, "it was dropped for good before"))
            return
        tasks = [self.tasks.get(task_id) for task_id in dict.fromkeys(event.task_ids)]
        adoptable = [t for t in tasks if t is not None and t.state is QUEUED and t.kind is TASK
                     and t.inputs_left is None]
        if not tasks:
            # Idle, but it ran someone's code, and whose is not known here: never reused.
            self._out.append(KillWorker(node_id, worker_id, "warm for code this master does not "
                                        "know (its node was away)"))
            return
        if len(adoptable) < len(tasks) or len({t.warm_key for t in adoptable}) > 1 \
                or self._is_stale(adoptable[0].warm_key):
            self._out.append(KillWorker(node_id, worker_id, "what it runs was queued again "
                                        "while its node was away from the master"))
            return
        undo = self._undo
        worker = WorkerRecord(worker_id, node_id, seq=next(self._worker_seq))
        undo.add(self.nodes[node_id], worker_id)
        undo.put(self.workers, worker_id, worker)
        for n, task in enumerate(sorted(adoptable, key=lambda t: t.seq)):
            self._join(task, worker, driver=True, now=event.now, queue=n > 0, assign=False)

    def _salvaged(self, event: UnitsSalvaged) -> None:
        task = self.tasks.get(event.task_id)
        if task is None or task.finished or task.kind is not PARALLEL:
            return
        units, undo = task.units, self._undo
        marked: list[int] = []
        undo.call(units.unmark, marked, len(units.journaled))
        record: list[tuple[int, int, bytes]] = []
        for index, digest, value in event.results:
            if (0 <= index < MAX_SALVAGED_INDEX and index not in units.open_units
                    and index not in units.held and units.set_journaled(index, True)):
                marked.append(index)
                record.append((index, digest, value))
        if record:
            undo.set(units, "done_count", units.done_count + len(record))
            self._note(task, f"units {record[0][0]}-{record[-1][0]}", "memory", "salvaged",
                       f"{len(record)} finished while the master was away", event.now)
            self._out.append(RecordResults(task.task_id, record))

    def _sliced(self, event: UnitsSliced) -> None:
        task = self._parallel_of(event.worker_id, event.task_id)
        if task is None or event.worker_id != task.driver:
            return  # (a stale driver's: dropped, not refused)
        units = task.units
        end = units.sliced_end
        for unit in event.units:
            if unit.index > end:
                # A slicer numbers its units in order (a restarted one from 0 again): an index
                # past them would size the task's bitmap and books to it. (Before any change.)
                raise InvalidEvent(event, f"unit {unit.index} after {end} units sliced: units "
                                          "are sliced in order")
            end = max(end, unit.index + (unit.count or 1))
        if event.room >= 0 and not self._room_for(task, event.units, event.room, event.now):
            return
        replay: list[UnitCall] = []
        opened: Opened = []
        self._undo.call(units.unopen, opened)
        # (a unit past the bitmap's end is not journaled: most of a first slicing)
        journaled, beyond = units.journaled, len(units.journaled) << 3
        open_units = units.open_units
        for unit in () if units.open_fresh(event.units, opened) else event.units:
            index = unit.index
            if index < beyond and journaled[index >> 3] >> (index & 7) & 1:
                replay.append(unit)  # finished before the driver restarted
            elif index not in open_units:
                units.open(unit, opened)
            elif index in units.carried:  # still running on a lost driver's helper:
                self._undo.discard(units.carried, index)  # its result comes forwarded
        self._undo.set(task.units, "sliced_all", event.done)
        if end > units.sliced_end:
            self._undo.set(units, "sliced_end", end)
        if replay:
            self._count_replayed_packs(units, replay)
            driver = self.workers[event.worker_id]
            self._note(task, f"units {replay[0].index}-{replay[-1].index}", "memory", "replayed",
                       f"{len(replay)} finished before the driver restarted", event.now)
            self._out.append(ReplayResults(driver.node_id, driver.worker_id, task.task_id, replay))

    def _room_for(self, task: TaskRecord, sliced: list[UnitCall], room: int, now: float) -> bool:
        """Whether these units may open: the task fails (False) when its key's open units would
        pass ``room`` and its own would pass ``UNITS_AHEAD_BYTES``, what no honest driver slices
        ahead (so a budget smaller than a driver's look-ahead fails no honest task). A running
        total per key bounds the open units from above (it only grows between counts), so that
        they are counted only near the bound."""
        owner, bounds = task.warm_key.owner, self.unit_bytes_bound
        needed = sum(len(unit.args) for unit in sliced) + UNIT_OVERHEAD_BYTES * len(sliced)
        if (bound := bounds.get(owner, 0)) + needed <= room:
            self._undo.put(bounds, owner, bound + needed)
            return True
        held = self.open_unit_bytes(owner)
        self._undo.put(bounds, owner, held + needed)
        if held + needed <= room or _open_bytes(task.units) + needed <= UNITS_AHEAD_BYTES:
            return True
        self._end(task, ERRED, "units sliced past its key's memory budget", now)
        self._out.append(ReportOverBudget(task.client_id, task.task_id, held, needed, room))
        return False

    def open_unit_bytes(self, owner: str) -> int:
        """The bytes the open (and kept) units of an owner's running ParallelTasks hold."""
        return sum(_open_bytes(task.units) for task in self._parallel.values()
                   if task.warm_key.owner == owner)

    def _count_replayed_packs(self, units: UnitBook, replay: list[UnitCall]) -> None:
        """A pack replayed for its first unit counts all of its units done: a worker's salvaged
        pack (and a journal written before packs had rows of their own) marked only that one.
        Should the replay fail (``_not_replayed``), the whole pack is unmarked again."""
        rest = [i for unit in replay if unit.count for i in range(unit.index + 1,
                                                                   unit.index + unit.count)]
        if not rest:
            return
        size = len(units.journaled)
        marked = units.mark_journaled(rest)
        self._undo.call(units.unmark, marked, size)
        if marked:
            self._undo.set(units, "done_count", units.done_count + len(marked))

    def _not_replayed(self, event: UnitsNotReplayed) -> None:
        task = self._parallel_of(event.worker_id, event.task_id)
        if task is None or event.worker_id != task.driver:
            return
        for unit in event.units:
            if task.units.is_journaled(unit.index) and unit.index not in task.units.open_units:
                cleared = task.units.unmark_range(unit.index, unit.count or 1)
                self._undo.call(task.units.mark_journaled, cleared)
                self._undo.set(task.units, "done_count", task.units.done_count - len(cleared))
                self._note(task, f"unit {unit.index}", "memory", "queued",
                           "not replayed: its arguments changed or its result is gone", event.now)
                opened: Opened = []
                self._undo.call(task.units.unopen, opened)
                task.units.open(unit, opened)

    def _units_finished(self, event: UnitsFinished) -> None:
        task = self._parallel_of(event.worker_id, event.task_id)
        if task is None:
            return
        worker = self.workers[event.worker_id]
        units, in_flight, undo = task.units, worker.in_flight, self._undo
        forward: list[tuple[int, bytes]] = []
        items: list[tuple[int, int, bytes]] | None = [] if task.items else None
        record: list[tuple[int, int, bytes]] = []
        held: list[tuple[int, str, str]] = []
        # The undo log for the loop, registered once and filled as it goes.
        taken: dict[int, int] = {}
        closed: dict[int, UnitCall] = {}
        marked: list[int] = []
        undo.call(units.unmark, marked, len(units.journaled))
        undo.call(setattr, units, "done_count", units.done_count)
        undo.call(units.open_units.update, closed)
        undo.call(in_flight.update, taken)
        journaled: list[int] = []  # the units of ``record``, each unit of a pack
        packs: dict[int, int] = {}  # the packs of ``record``: first index -> units
        ran = result_bytes = 0  # units that ran (a pack counts its units), their results' bytes
        for outcome in event.outcomes:
            index = outcome.index
            if in_flight.get(index) != event.run_id:
                continue  # not this worker's current run of that unit
            taken[index] = in_flight.pop(index)
            if index not in units.open_units:
                continue  # already recorded: the first result won
            if not outcome.ok:
                raised = _raised_in(units.open_units[index], outcome)
                self._note(task, f"unit {raised}", "executing", "error", outcome.type_name,
                           event.now)
                if self._retry(task, index, event.now):
                    self._queue_first(units, units.open_units[index])
                    continue
                self._end(task, ERRED, f"unit {raised} raised", event.now,
                          keep_workers=self._keeps_workers(outcome))
                self._out.append(ReportErred(task.client_id, task.task_id, outcome, str(raised)))
                return
            carried = index in units.carried
            if carried:
                undo.discard(units.carried, index)
                if outcome.held:  # it would go with the helper's instance: computed again
                    self._queue_first(units, units.open_units[index])
                    continue
            unit = closed[index] = units.open_units.pop(index)
            ran += unit.count or 1
            result_bytes += outcome.size if outcome.held else len(outcome.value)
            units.done_count += unit.count or 1
            if outcome.held:
                if index not in units.kept:  # a plain unit's result too large to go inline
                    undo.put(units.kept, index, unit)
                if outcome.size > 0:
                    undo.put(units.sizes, index, outcome.size)
                self._held(task, index, worker)
                held.append((index, worker.worker_id, self._address(worker)))
            else:
                if not carried:  # (a carried one reaches the next driver by replay)
                    forward.append((index, outcome.value))
                if items is not None:
                    items.append((index, unit.count, outcome.value))
                # The worker's digest spares the master a CRC per unit (see UnitOutcome.digest).
                record.append((index, outcome.digest or unit_digest(unit), outcome.value))
                if unit.count:
                    journaled += range(index, index + unit.count)
                    packs[index] = unit.count
                else:
                    journaled.append(index)
        if journaled:
            newly = units.mark_journaled(journaled)
            marked.extend(newly)
            # (a pack whose units' results were journaled one by one, before its driver ran
            # again and packed them: counted once)
            units.done_count -= len(journaled) - len(newly)
        # Units the worker did not get to (it stops a batch at a failure) go back.
        self._requeue_runs(task, worker, {event.run_id})
        if event.outcomes and event.elapsed > 0:
            per_unit = event.elapsed / len(event.outcomes)
            previous = units.unit_seconds
            undo.set(units, "unit_seconds",
                     per_unit if previous is None else 0.7 * previous + 0.3 * per_unit)
        pack = (_pack_for(event.elapsed / ran, result_bytes / ran) if ran and event.elapsed > 0
                else units.pack)
        if pack == units.pack:
            pack = 0  # (said already)
        else:
            undo.set(units, "pack", pack)
            self._note(task, "units", "queued", "queued",
                       f"{pack} a pack from now on ({event.elapsed / ran * 1e6:.1f} us a unit)",
                       event.now)
        if (forward or held or pack) and task.driver is not None:
            driver = self.workers[task.driver]
            if not units.answered:
                undo.set(units, "answered", True)
            sizes = {i: units.sizes[i] for i, _, _ in held if i in units.sizes}
            self._out.append(ForwardResults(driver.node_id, driver.worker_id, task.task_id,
                                            forward, held, sizes, pack))
        if items:
            self._out.append(ForwardItems(task.client_id, task.task_id, items))
        if record:
            self._out.append(RecordResults(task.task_id, record, packs))

    def _held(self, task: TaskRecord, index: int, worker: WorkerRecord) -> None:
        """A keep unit finished: unblock its dependents, answer workers that missed it."""
        units, undo = task.units, self._undo
        undo.put(units.held, index, worker.worker_id)
        for dependent in units.dependents.get(index, ()):
            blocked = units.blocked.get(dependent)
            if blocked is not None and all(dep in units.held for dep in blocked.deps):
                undo.pop(units.blocked, dependent)
                units.pending.append(blocked)
                undo.call(units.pending.pop)
        holders = [(worker.worker_id, self._address(worker))]
        for asker_id in sorted(undo.pop(units.missing_for, index) or ()):
            asker = self.workers.get(asker_id)
            if asker is not None:
                self._out.append(TellHolders(asker.node_id, asker_id, task.task_id, index, holders,
                                             units.sizes.get(index, -1)))

    def _address(self, worker: WorkerRecord) -> str:
        return self.data_addresses.get(worker.node_id, "")

    def _requeue_runs(self, task: TaskRecord, worker: WorkerRecord, run_ids: set[int]) -> None:
        runs = sorted([(i, r) for i, r in worker.in_flight.items() if r in run_ids], reverse=True)
        if not runs:
            return
        pending, in_flight = task.units.pending, worker.in_flight
        moved: list[tuple[int, int]] = []
        self._undo.call(_unrequeue, pending, in_flight, moved)
        for index, run_id in runs:
            pending.appendleft(task.units.open_units[index])
            del in_flight[index]
            moved.append((index, run_id))

    def _queue_first(self, units: UnitBook, unit: UnitCall) -> None:
        """Back to the front of the task's queue (given back, or to run again)."""
        units.pending.appendleft(unit)
        self._undo.call(units.pending.popleft)

    def _steal_answered(self, event: StealAnswered) -> None:
        task = self._parallel_of(event.worker_id, event.task_id)
        if task is None:
            return
        self._undo.set(task.units, "steal_pending", False)
        if not event.accepted:
            return
        worker = self.workers[event.worker_id]
        self._note(task, f"run {event.run_id}", "queued", "rescheduled",
                   f"stolen from {worker.worker_id}", event.now)
        self._requeue_runs(task, worker, {event.run_id})

    def _unit_missing(self, event: UnitMissing) -> None:
        task = self._parallel_of(event.worker_id, event.task_id)
        if task is None:
            return
        holder = self.workers.get(task.units.held.get(event.index, ""))
        if holder is not None and holder.worker_id != event.worker_id:
            asker = self.workers[event.worker_id]
            pair = (event.index, asker.worker_id)
            tries = task.units.fetch_failures.get(pair, 0) + 1
            if tries >= MAX_FETCH_FAILURES:
                # Told the same live holder each time and still no data: not a loss the
                # scheduler can mend by asking again (nor by computing it anew on that node).
                self._end(task, ERRED, f"unit {event.index}: its holder {holder.worker_id} is "
                                       f"unreachable from {asker.worker_id}", event.now)
                self._out.append(ReportUnreachable(
                    task.client_id, task.task_id, f"unit {event.index}", asker.worker_id,
                    holder.worker_id, self._address(holder), tries))
                return
            self._undo.put(task.units.fetch_failures, pair, tries)
            self._out.append(TellHolders(asker.node_id, asker.worker_id, task.task_id, event.index,
                                         [(holder.worker_id, self._address(holder))],
                                         task.units.sizes.get(event.index, -1)))
            return
        units = task.units
        if (event.index not in units.kept and event.index not in units.open_units
                and event.index >= units.sliced_end):
            # (before any change: what it would record stays, one entry an index, until the
            # task ends; a restarted driver slices the unit again, and the worker asks again)
            raise InvalidEvent(event, f"no unit {event.index} of {task.task_id} was sliced")
        askers = task.units.missing_for.get(event.index)
        if askers is None:
            askers = set()
            self._undo.put(task.units.missing_for, event.index, askers)
        self._undo.add(askers, event.worker_id)
        self._reopen(task, event.index, f"missing at {event.worker_id}", event.now)

    def _reopen(self, task: TaskRecord, index: int, cause: str, now: float) -> None:
        """A finished keep unit's result was lost: compute it again, and whatever of its own
        inputs is gone too (an input dropped as no longer needed before this unit was lost)."""
        units, undo = task.units, self._undo
        unit = units.kept.get(index)
        undo.pop(units.held, index)
        if unit is None or index in units.open_units:
            return
        self._note(task, f"unit {index}", "memory", "queued", cause, now)
        undo.put(units.open_units, index, unit)
        undo.set(units, "done_count", units.done_count - (unit.count or 1))
        for dep in unit.deps:
            if dep not in units.held and dep not in units.open_units:
                self._reopen(task, dep, f"needed again by unit {index}", now)
        if all(dep in units.held for dep in unit.deps):
            self._queue_first(units, unit)
        else:
            undo.put(units.blocked, index, unit)

    def _retry(self, task: TaskRecord, index: int, now: float) -> bool:
        """Application exceptions run again only as often as the submitter asked (``retries``)."""
        failed = task.failures.get(index, 0) if task.failures is not None else 0
        if failed >= task.retries:
            return False
        if task.failures is None:
            self._undo.set(task, "failures", {})
        assert task.failures is not None
        self._undo.put(task.failures, index, failed + 1)
        what = "task" if index < 0 else f"unit {index}"
        self._note(task, what, "error", "queued", f"retry {failed + 1} of {task.retries}", now)
        return True

    def _task_finished(self, event: TaskFinished) -> None:
        task = self._task_of(event.worker_id, event.task_id)
        # Only the driver ends a task well; any worker that cannot load it fails it.
        if task is None or (event.worker_id != task.driver and event.outcome.ok):
            return
        if not event.outcome.ok and event.worker_id == task.driver and self._retry(task, -1, event.now):
            self._run_driver_again(task, event.now, keep=self._keeps_workers(event.outcome))
            return
        if task.kind is TASK and event.elapsed > 0:  # what a Task takes, raising or not
            seconds, key = self.task_seconds, task.warm_key
            seen = seconds.get(key, MISSING)  # (undo.put's record, made here: once a task)
            self._undo.record((restore, (seconds, key, seen)))
            seconds[key] = event.elapsed if seen is MISSING else 0.8 * seen + 0.2 * event.elapsed
        # _end first: its last progress report must reach the client before the outcome.
        if event.outcome.ok:
            self._end(task, DONE, "finished", event.now)
            self._out.append(ReportDone(task.client_id, task.task_id, event.outcome.value))
        else:
            self._end(task, ERRED, event.outcome.type_name or "failed", event.now,
                      keep_workers=self._keeps_workers(event.outcome))
            self._out.append(ReportErred(task.client_id, task.task_id, event.outcome, ""))

    def _set_status(self, task: TaskRecord, finish: TaskStatus, cause: str, now: float) -> None:
        """The one way a task's status changes: checked, written to the story, and the indices
        of running and queued tasks kept in step."""
        start = task.state
        if (start, finish) not in TASK_TRANSITIONS:
            raise InvalidTransition(f"task {task.task_id}", start, finish, list(task.story))
        # Every task changes status twice or more: its story line, status, queued counts, the
        # running index and the finished ones change here with one record for all of them
        # (``_status_back``), made once they are; the rarer changes below keep their own.
        # (``_noted`` and ``_move`` written out: two calls less, twice a task)
        lines = story = task.lines
        if not isinstance(story, list):
            story = task.lines = []
        story.append(("task", start, finish, cause, now))
        evicted = story.pop(0) if len(story) > STORY_LENGTH else None
        task.state = finish
        change = 0 if (start is QUEUED) is (finish is QUEUED) else 1 if finish is QUEUED else -1
        if change:
            queued, key = self.queued, (task.client_id, task.priority)
            if count := queued.get(key, 0) + change:
                queued[key] = count
            else:
                del queued[key]
            owners, owner = self.queued_owners, task.warm_key.owner
            if count := owners.get(owner, 0) + change:
                owners[owner] = count
            else:
                del owners[owner]
        running = self._running.pop(task.task_id, None) if start is RUNNING else None
        if finish is RUNNING:
            self._running[task.task_id] = task
        elif finish in FINISHED:
            self._finished.append(task.task_id)
        undo = self._undo
        undo.record((_status_back,
                     (self, task, start, finish, lines, story, evicted, change, running)))
        owner = task.warm_key.owner
        if start is RUNNING and task.kind is PARALLEL and \
                undo.pop(self._parallel, task.task_id) is not None and \
                owner in self.unit_bytes_bound and self._no_parallel_of(owner):
            undo.pop(self.unit_bytes_bound, owner)
        if finish is RUNNING and task.kind is PARALLEL:
            undo.put(self._parallel, task.task_id, task)
        elif finish is QUEUED:
            self._enqueue(task)

    def _no_parallel_of(self, owner: str) -> bool:
        return all(task.warm_key.owner != owner for task in self._parallel.values())

    def queued_of(self, client_id: str, priority: int) -> int:
        """How many of this client's tasks of this priority are queued (waiting for inputs
        included)."""
        return self.queued.get((client_id, priority), 0)

    def queued_of_owner(self, owner: str) -> int:
        """How many tasks of this owner (its key, or a client without one) are queued."""
        return self.queued_owners.get(owner, 0)

    def _enqueue(self, task: TaskRecord) -> None:
        """Into the queue in its fair place (a task queued again keeps the one it had)."""
        entry = task.fair
        if entry is None:
            cost = self.task_seconds.get(task.warm_key, DEFAULT_COST_S)
            tag = self.fair.tag(self._undo, task.priority, task.warm_key.owner, task.client_id,
                                cost)
            entry = (-task.priority, *tag, task.seq, task.task_id)
        fair, task.fair = task.fair, entry
        heapq.heappush(self._queue, entry)
        self._undo.record((_unqueue, (self._queue, task, fair, entry)))  # (once pushed: _unpush)

    def _dequeue(self, started: TaskRecord | None = None) -> None:
        """Pop the queue's head; ``started``: it leaves to run (virtual time moves on)."""
        entry = heapq.heappop(self._queue)
        self._undo.record((heapq.heappush, (self._queue, entry)))
        if started is not None and started.fair is not None:
            self.fair.started(self._undo, started.priority, started.fair[5])

    def _end(self, task: TaskRecord, state: TaskStatus, cause: str, now: float, *,
             keep_workers: bool = False, grace: float = 0.0) -> None:
        """The task is over. Its workers stay, warm for the submitter, when it is done or raised
        an ordinary exception (``keep_workers``); a cancel with a ``grace`` asks them to stop its
        code (``_stop``); otherwise (cancelled, killed, a fatal error) they are killed: only a
        kill stops user code that may still run there."""
        undo = self._undo
        self._set_status(task, state, cause, now)
        if task.task_id in self.dependents:
            self._inputs_ended(task, now)
        if task.units is not NO_UNITS:  # (a plain Task's: nothing open, no call)
            task.units.clear_open(undo)
        # One record for what the task gives up here: its payload now, its workers and driver
        # at the end (below).
        undo.record((_restore_ended, (task, task.code, task.args, task.workers, task.driver)))
        if size := len(task.args):
            held, owner = self.args_bytes, task.warm_key.owner
            if total := held.get(owner, 0) - size:
                held[owner] = total
            else:
                del held[owner]
            undo.record((_add_bytes, (held, owner, size)))
        task.code = task.args = b""
        if task.units.journaled:
            undo.set(task.units, "journaled", bytearray())
            undo.set(task.units, "journaled_count", 0)
        if task.kind is PARALLEL:
            self._report_progress_of(task)
        for worker_id in sorted(task.workers):
            worker = self.workers[worker_id]
            if state is CANCELLED:
                for index in sorted(worker.in_flight):
                    self._note(task, f"unit {index}", "executing", "cancelled",
                               f"{cause} (on {worker_id})", now)
            if state is CANCELLED and grace > 0:
                self._stop(task, worker, grace, now)
                continue
            self._let_go(worker, task.task_id, now)
            if (state is DONE or keep_workers) and (not task.warm_key.package
                                                    or not self._is_stale(task.warm_key)):
                if worker.warm_for != task.warm_key:
                    undo.set(worker, "warm_for", task.warm_key)
                # A plain Task's worker let go of it when it answered (and the error was not
                # fatal, or it would not be kept): only a ParallelTask's workers need telling.
                if task.kind is not TASK:
                    self._out.append(ReleaseWorker(worker.node_id, worker_id, task.task_id))
            else:
                self._drop_worker(worker_id)
                self._out.append(KillWorker(worker.node_id, worker_id, f"task {task.task_id} {state}"))
                self._give_back(worker, f"worker {worker_id} stopped: task {task.task_id} {state}",
                                now)
        task.workers, task.driver = NO_WORKERS, None  # (recorded above)
        while len(self._finished) > FINISHED_KEPT:
            forgotten = self._finished.popleft()
            undo.record((_unforget, (self._finished, self.tasks, forgotten,
                                     self.tasks.pop(forgotten, None))))

    # --- workers ------------------------------------------------------------

    def _stop(self, task: TaskRecord, worker: WorkerRecord, grace: float, now: float) -> None:
        """Ask the worker to stop the cancelled task's code; it takes no new work meanwhile."""
        undo = self._undo
        self._let_go(worker, task.task_id, now)
        undo.set(worker, "stopping", (*worker.stopping, task.task_id))
        by = now + grace
        undo.set(worker, "stop_by", min(worker.stop_by, by) if worker.stop_by else by)
        undo.add(self.stopping, worker.worker_id)
        self._note(task, f"worker {worker.worker_id}", "running", "stopping",
                   f"asked to stop its code within {grace:g}s", now)
        self._out.append(StopTask(worker.node_id, worker.worker_id, task.task_id, grace))

    def _stopped(self, event: WorkerStopped) -> None:
        """The worker stopped the task's code in time: it serves on, warm for the submitter."""
        worker = self.workers.get(event.worker_id)
        if worker is None or event.task_id not in worker.stopping:
            return  # killed meanwhile, or a report repeated
        undo = self._undo
        left = tuple(t for t in worker.stopping if t != event.task_id)
        undo.set(worker, "stopping", left)
        if not left:
            undo.set(worker, "stop_by", 0.0)
            undo.discard(self.stopping, worker.worker_id)
        task = self.tasks.get(event.task_id)
        if task is not None:
            self._note(task, f"worker {worker.worker_id}", "stopping", "stopped",
                       "its code stopped in time: the worker serves on", event.now)

    def _stop_overdue(self, now: float) -> None:
        """Workers that did not stop a cancelled task's code within its grace are killed."""
        for worker_id in sorted(self.stopping):
            worker = self.workers[worker_id]
            if worker.stop_by <= now:
                self._drop_worker(worker_id)
                self._out.append(KillWorker(worker.node_id, worker_id, "did not stop task "
                                            f"{', '.join(worker.stopping)} within its grace"))
                for task_id in worker.stopping:
                    task = self.tasks.get(task_id)
                    if task is not None:
                        self._note(task, f"worker {worker_id}", "stopping", "killed",
                                   "its code did not stop within the grace", now)
                self._give_back(worker, f"worker {worker_id} killed: a cancelled task's code "
                                "did not stop in time", now)

    def _is_stale(self, warm_key: WarmKey | None) -> bool:
        """Warm for a package version that is no longer the newest (so its cache can go)."""
        if warm_key is None or not warm_key.package:
            return False
        return self.newest.get(warm_key.package, warm_key.version) != warm_key.version

    def _worker_lost(self, worker_id: str, cause: str, expected: bool, now: float,
                     with_node: bool = False) -> None:
        """Requeue what the worker held. ``expected`` (its node stopped it) is not a death;
        ``with_node``: its node was lost (it may come back with the worker)."""
        worker = self._drop_worker(worker_id, retire=not with_node)
        if worker is None:
            return
        undo = self._undo
        for task in list(self._running.values()):
            lost = [i for i, holder in task.units.held.items() if holder == worker_id]
            for index in lost:
                if task.units.still_needed(index):
                    self._reopen(task, index, f"holder lost: {cause}", now)
                else:
                    undo.pop(task.units.held, index)
            if lost:  # its peers may be fetching from it: they need not wait for a timeout
                for peer_id in sorted(task.workers - {worker_id}):
                    peer = self.workers[peer_id]
                    self._out.append(TellPeerGone(peer.node_id, peer_id, worker_id))
        self._give_back(worker, f"worker lost: {cause}", now, running=False)
        if worker.task_id is None:
            return
        task = self.tasks[worker.task_id]
        undo.discard(task.workers, worker_id)
        if task.units.steal_pending:  # if it was asked, it will never answer
            undo.set(task.units, "steal_pending", False)
        if worker_id == task.driver:
            self._restart(task, cause, now, count=not expected)
            return
        for index in sorted(worker.in_flight, reverse=True):
            self._note(task, f"unit {index}", "executing", "queued", f"worker lost: {cause}", now)
            if not expected:
                causes = self._count_death(task, index, cause)
                if len(causes) >= self.max_deaths:
                    self._kill_task(task, str(index), causes, now)
                    return
            self._queue_first(task.units, task.units.open_units[index])

    def _count_death(self, task: TaskRecord, index: int, cause: str | None) -> list[str]:
        """The deaths witnessed by a unit (-1: the driver), with ``cause`` added if given."""
        causes = task.deaths.get(index) if task.deaths is not None else None
        if causes is None:
            causes = []
            if cause is None:
                return causes  # none witnessed, none to add: nothing to keep
            if task.deaths is None:
                self._undo.set(task, "deaths", {})
            assert task.deaths is not None
            self._undo.put(task.deaths, index, causes)
        if cause is not None:
            causes.append(cause)
            self._undo.call(causes.pop)
        return causes

    def _let_go(self, worker: WorkerRecord, task_id: str, now: float) -> None:
        """The worker is done with this task: the next one queued on it (if any) is its own now.
        Every plain Task's end comes here, with up to ``MAX_QUEUED_TASKS`` behind it: its
        current task is looked for first, and the next taken with an undo that puts it back,
        not a copy of the queue (a scan and a copy of 128 ids a task, on a busy worker)."""
        undo = self._undo
        queued = worker.queued
        if worker.task_id != task_id and task_id in queued:
            undo.set(worker, "queued", deque(queued))  # (its small queue copied: rare)
            worker.queued.remove(task_id)  # ended before its turn came (in the copy)
            return
        if queued:
            following = queued.popleft()
            undo.record((queued.appendleft, (following,)))
            undo.record((_restore_current,
                         (worker, worker.task_id, worker.since, worker.warm_for)))
            worker.task_id, worker.since = following, now
        else:  # (undo.set's record, made here: every task's end)
            undo.record((setattr, (worker, "task_id", worker.task_id)))
            worker.task_id = None
        if worker.in_flight:
            undo.set(worker, "in_flight", {})

    def _take_back_late(self, now: float) -> None:
        """Ask each worker whose current plain Task is late (see Prefetch) for the ones queued
        behind it, once each."""
        if now - self.late_checked < LATE_S / 2:
            return  # (a Tick also ends each burst of events: not a look at every worker each)
        self._undo.set(self, "late_checked", now)
        workers = self.workers.values()
        # Only for a worker free now: with none, a task taken back would wait in the queue as
        # long as where it is. And a master slow to hear results (a thousand workers, tasks of
        # no time) sees every worker late: asking each for its queue would make it slower yet.
        if not any(w.task_id is None and not w.paused and not w.stopping for w in workers):
            return
        for worker in workers:
            if not worker.queued or now - worker.since < LATE_S:
                continue
            # (a set: a thousand late workers, each asked for its 64 once, were walked 64 x 64
            # at every look, ~3 % of a simulated master's time)
            taking = set(worker.taking_back)
            asked = [task_id for task_id in worker.queued if task_id not in taking]
            if asked:
                self._undo.set(worker, "taking_back", (*worker.taking_back, *asked))
                self._out.extend(TakeBack(worker.node_id, worker.worker_id, task_id)
                                 for task_id in asked)

    def _taken_back(self, event: TakeBackAnswered) -> None:
        """A worker gave back a task queued on it (it had not begun), or refused (it began): an
        answer nobody asked for changes nothing."""
        worker = self.workers.get(event.worker_id)
        if worker is None or event.task_id not in worker.taking_back:
            return
        undo = self._undo
        undo.set(worker, "taking_back", tuple(t for t in worker.taking_back if t != event.task_id))
        task = self.tasks.get(event.task_id)
        if not event.accepted or task is None or event.task_id not in worker.queued:
            return  # it began there (its result follows), or it ended meanwhile
        undo.set(worker, "queued", deque(t for t in worker.queued if t != event.task_id))
        undo.set(task, "driver", None)
        undo.set(task, "workers", NO_WORKERS)
        self._set_status(task, QUEUED, f"taken back from {worker.worker_id}: queued behind "
                                       f"{worker.task_id}, which runs long", event.now)

    def _give_back(self, worker: WorkerRecord, cause: str, now: float, *,
                   running: bool = True) -> None:
        """A dropped worker's queued Tasks (and, with ``running``, the one it runs) go back to
        the queue uncounted: their code was not (or not alone) the cause."""
        ids = [*([worker.task_id] if running and worker.task_id else []), *worker.queued]
        undo = self._undo
        undo.set(worker, "queued", deque())
        if running:
            undo.set(worker, "task_id", None)
        for task_id in ids:
            task = self.tasks[task_id]
            undo.discard(task.workers, worker.worker_id)
            self._restart(task, cause, now, count=False)

    def _restart(self, task: TaskRecord, cause: str, now: float, *, count: bool = True,
                 lost: bool = True) -> None:
        """Back to the queue with a new driver to come (its workers are stopped); the third
        counted death of a driver (``count``) kills the task instead."""
        causes = self._count_death(task, -1, cause if count else None)
        if len(causes) >= self.max_deaths:
            self._kill_task(task, "driver", causes, now)
            return
        undo = self._undo
        undo.set(task, "driver", None)
        # A lost driver's helpers go on with the runs they have (their results are journaled
        # for the next driver) and are let go, warm, once those are done; after its own code
        # raised (not ``lost``), every worker of the task is replaced.
        going_on: dict[str, dict[int, int]] = {}
        flying: dict[int, UnitCall] = {}
        for worker_id in sorted(task.workers):
            worker = self.workers.get(worker_id)
            if worker is None:
                continue
            runs = {i: run for i, run in worker.in_flight.items()
                    if (call := task.units.open_units.get(i)) is not None and not call.deps}
            if task.kind is PARALLEL and lost and runs:
                going_on[worker_id] = runs
                flying.update((i, task.units.open_units[i]) for i in runs)
            elif task.kind is PARALLEL and lost:
                self._let_go(worker, task.task_id, now)
                self._out.append(ReleaseWorker(worker.node_id, worker_id, task.task_id))
            else:
                self._drop_worker(worker_id)
                self._out.append(KillWorker(worker.node_id, worker_id, f"task {task.task_id} restarts"))
        undo.set(task, "workers", IdSet(going_on) if going_on else NO_WORKERS)
        for worker_id, runs in going_on.items():
            undo.set(self.workers[worker_id], "in_flight", runs)  # (units with inputs: again)
            self._note(task, f"worker {worker_id}", "helping", "draining",
                       f"its {len(runs)} units in flight go on without a driver", now)
        if going_on:
            undo.add(self.draining, task.task_id)
        self._set_status(task, QUEUED, f"driver lost: {cause}" if lost else
                         "its code raised: it runs again on a fresh worker", now)
        if task.kind is PARALLEL:
            task.units.clear_open(undo)
            for index, call in flying.items():
                undo.put(task.units.open_units, index, call)
            undo.set(task.units, "carried", set(flying))
            # Journaled results are replayed to the next driver; held ones went with the task's
            # instance on its workers (computed again).
            undo.set(task.units, "done_count", task.units.journaled_count)
            undo.set(task.units, "sliced_all", False)
            # A new driver: its first few units again, and told the pack afresh.
            undo.set(task.units, "answered", False)
            undo.set(task.units, "pack", 1)

    def _keeps_workers(self, outcome: UnitOutcome) -> bool:
        """Whether the workers of a task that failed with ``outcome`` may serve on, warm."""
        return not outcome.fatal and not self.restart_after_error

    def _run_driver_again(self, task: TaskRecord, now: float, *, keep: bool) -> None:
        """The driver's own code raised and may run again: a Task on its (warm) worker, freed and
        queued; a ParallelTask restarts from its slicer, as after a lost driver. A worker whose
        code failed fatally (``keep`` False) is stopped instead of freed."""
        if task.kind is PARALLEL or not keep:
            self._restart(task, "raised", now, count=False, lost=False)
            return
        for worker_id in sorted(task.workers):
            worker = self.workers[worker_id]
            self._let_go(worker, task.task_id, now)
            self._out.append(ReleaseWorker(worker.node_id, worker_id, task.task_id))
        self._undo.set(task, "workers", NO_WORKERS)
        self._undo.set(task, "driver", None)
        self._set_status(task, QUEUED, "its code raised: it runs again", now)

    def _kill_task(self, task: TaskRecord, unit: str, causes: list[str], now: float) -> None:
        self._end(task, ERRED, f"unit {unit}: workers died {len(causes)} times", now)
        self._out.append(ReportKilled(task.client_id, task.task_id, unit, tuple(causes)))

    def _drop_worker(self, worker_id: str, retire: bool = True) -> WorkerRecord | None:
        """The one way a worker leaves: every index of workers forgets it too (a paused one
        evicted for another key's task stayed among the paused). ``retire``: for good (told to
        stop, or exited), not with its node (which may come back with it)."""
        if retire and worker_id not in self.retired:
            self._undo.put(self.retired, worker_id, None)
            if len(self.retired) > MAX_RETIRED:
                self._undo.pop(self.retired, next(iter(self.retired)))
        worker = self._undo.pop(self.workers, worker_id)
        if worker is not None and worker.node_id in self.nodes:
            self._undo.discard(self.nodes[worker.node_id], worker_id)
        if worker_id in self.stopping:
            self._undo.discard(self.stopping, worker_id)
        self._undo.discard(self.paused, worker_id)
        return worker

    def _parallel_of(self, worker_id: str, task_id: str) -> TaskRecord | None:
        """The ParallelTask, if this worker still works for it (unit messages about a plain
        Task, which has none, are dropped like stale ones)."""
        task = self._task_of(worker_id, task_id)
        return task if task is not None and task.kind is PARALLEL else None

    def _task_of(self, worker_id: str, task_id: str) -> TaskRecord | None:
        """The task, if this worker still works for it (stale messages are dropped)."""
        task = self.tasks.get(task_id)
        if task is None or task.state in FINISHED or worker_id not in task.workers:
            return None  # (not ``task.finished``: a property's call, every task's end)
        return task

    # --- scheduling ---------------------------------------------------------

    def _schedule(self, now: float) -> None:
        if self.draining:
            self._let_drained_go(now)
        if self.paused:
            self._replace_paused_idle()
        # A pass that lets a helper go (Sharing) hands it to the task that wanted it in the next
        # pass; each lets one go, so the workers bound the passes.
        for _ in range(len(self.workers) + 1):
            wanting = self._start_queued(now)
            wanting = self._serve_parallel(wanting, now)
            if wanting is None:
                return
            if self._yield_helper(wanting, now) is not None:
                continue
            if not self._parallel:
                return  # (plain Tasks only: every pass of a backlog of them comes here)
            # None for the first that wants a worker (a queued task of another key, say): a
            # ParallelTask after it with units queued takes an idle helper of its own key at
            # once, rather than that helper idling while they wait (let go instead, it would be
            # replaced for the other key's task at the next pass: a warm process for nothing).
            for task in self._wanting_units(wanting):
                helper = self._yield_helper(task, now, joins=True)
                if helper is not None:
                    self._join(task, helper, driver=False, now=now)
                    self._dispatch(task)
                    break
            else:
                return

    def _wanting_units(self, first: TaskRecord) -> Iterator[TaskRecord]:
        """The running ParallelTasks with units queued, best first, but ``first``."""
        for task in sorted(self._parallel.values(), key=_rank):
            if task is not first and task.units.pending:
                yield task

    def _let_drained_go(self, now: float) -> None:
        """Helpers of a driverless task whose runs are done are let go (warm): one of them may
        be its next driver. A task running again keeps the helpers it still has."""
        undo = self._undo
        for task_id in sorted(self.draining):
            task = self.tasks[task_id]
            if task.state is QUEUED:
                for worker_id in sorted(task.workers):
                    worker = self.workers[worker_id]
                    if not worker.in_flight:
                        self._let_go(worker, task_id, now)
                        undo.discard(task.workers, worker_id)
                        self._note(task, f"worker {worker_id}", "draining", "released",
                                   "its runs are done", now)
                        self._out.append(ReleaseWorker(worker.node_id, worker_id, task_id))
                if task.workers:
                    continue
                undo.set(task, "workers", NO_WORKERS)
            undo.discard(self.draining, task_id)

    def _start_queued(self, now: float) -> TaskRecord | None:
        """Drivers for queued tasks, best first; the first one left without a worker, if any.
        Who is idle and who may queue one more is looked up once for the pass (``_Picker``), not
        once per task: a pass after a burst of submits starts hundreds."""
        picker: _Picker | None = None
        while self._queue:
            task = self.tasks.get(self._queue[0][-1])
            if task is None or task.state is not QUEUED:
                self._dequeue()  # ended or already running: a stale entry
                continue
            if picker is None:
                picker = _Picker(self, now)
            worker = picker.idle(task.warm_key)
            queue = worker is None
            if worker is None:
                worker = picker.prefetch(task)
            if worker is None:
                self._evict_idle_worker()
                return task
            self._dequeue(started=task)
            self._join(task, worker, driver=True, now=now, queue=queue)
            picker.joined(task, worker, queued=queue)
        return None

    def _serve_parallel(self, wanting: TaskRecord | None, now: float) -> TaskRecord | None:
        """Units for the running ParallelTasks, best first, with idle workers joining them while
        units are queued; the task that wants a worker (``wanting``, if none yet: the first one
        left with queued units and no idle worker). A task ranked below it with the same warm key
        gets no more units on its helpers: they drain, to be let go (``_yield_helper``)."""
        # Only ParallelTasks have units to hand out (running plain ones may be many: prefetch).
        for task in sorted(self._parallel.values(), key=_rank):
            yielding = (wanting is not None and wanting.warm_key == task.warm_key
                        and _rank(wanting) < _rank(task))
            self._dispatch(task, helpers=not yielding)
            while task.units.pending:
                worker = self._idle_worker_for(task.warm_key)
                if worker is None:
                    self._evict_idle_worker()
                    break
                self._join(task, worker, driver=False, now=now)
                self._dispatch(task)
            if task.units.pending and wanting is None:
                wanting = task
            if not yielding:
                self._join_to_steal(task, now)
                self._steal_for_idle(task)
        return wanting

    def _join_to_steal(self, task: TaskRecord, now: float) -> None:
        """Nothing of the task is queued, every worker of it is busy, and one of them holds a run
        it has not begun (two or more in flight): an idle worker that may run its code joins, to
        steal that run (``_steal_for_idle``) instead of idling while it waits."""
        if task.units.pending or task.units.steal_pending:
            return
        workers = self.workers
        if not all(workers[w].in_flight for w in task.workers):
            return  # an idle worker of its own steals
        if not any(_runs_to_give(workers[w]) for w in task.workers):
            return
        worker = self._idle_worker_for(task.warm_key)
        if worker is not None:
            self._join(task, worker, driver=False, now=now)

    def _yield_helper(self, wanting: TaskRecord, now: float,
                      joins: bool = False) -> WorkerRecord | None:
        """Let go of one helper with nothing in flight, of a task ranked below ``wanting`` or with
        no unit queued, so that ``wanting`` takes it (same warm key: no process is replaced). A
        helper holding kept results stays (they would die with it), and so do a task's helpers
        while a steal waits for its answer (the answer would be dropped, and the task never asks
        again). The helper let go, if any; with ``joins``, only one that may join ``wanting``
        now (not paused, not stopping)."""
        for task in sorted(self._parallel.values(), key=_rank, reverse=True):
            if (task is wanting or task.warm_key != wanting.warm_key or task.units.steal_pending
                    or (task.units.pending and _rank(task) < _rank(wanting))):
                continue
            holders = set(task.units.held.values())
            for worker_id in sorted(task.workers):
                worker = self.workers[worker_id]
                if worker_id == task.driver or worker.in_flight or worker_id in holders:
                    continue
                if joins and (worker.paused or worker.stopping):
                    continue
                self._let_go(worker, task.task_id, now)
                self._undo.discard(task.workers, worker_id)
                self._note(task, f"worker {worker_id}", "helping", "released",
                           f"yields to {wanting.task_id}", now)
                self._out.append(ReleaseWorker(worker.node_id, worker_id, task.task_id))
                return worker
        return None

    def _idle_worker_for(self, warm_key: WarmKey) -> WorkerRecord | None:
        """A worker warm for this key, else a clean one (the first of each, in join order)."""
        clean: WorkerRecord | None = None
        for worker in self.workers.values():  # one pass: this runs for every queued task
            if worker.task_id is None and not worker.paused and not worker.stopping:
                if worker.warm_for == warm_key:
                    return worker
                if clean is None and worker.warm_for is None:
                    clean = worker
        return clean

    def _evict_idle_worker(self) -> None:
        """Nothing idle fits the next task: replace one worker warm for another key."""
        for worker in self.workers.values():
            if worker.task_id is None and not worker.stopping:
                # Isolation: another key's warm worker is replaced, never reused.
                self._drop_worker(worker.worker_id)
                self._out.append(KillWorker(worker.node_id, worker.worker_id, "warm for other code"))
                return

    def _join(self, task: TaskRecord, worker: WorkerRecord, *, driver: bool, now: float,
              queue: bool = False, assign: bool = True) -> None:
        """``assign`` False: the worker runs it already (``WorkerAdopted``)."""
        undo = self._undo
        if queue:  # (behind a task of its key: warm for it already, as _Picker chose it)
            worker.queued.append(task.task_id)
            undo.record((worker.queued.pop, ()))
            if worker.warm_for is not task.warm_key:
                undo.set(worker, "warm_for", task.warm_key)
        else:  # (one record for the three: this runs for every task)
            undo.record((_restore_current,
                         (worker, worker.task_id, worker.since, worker.warm_for)))
            worker.task_id, worker.since, worker.warm_for = task.task_id, now, task.warm_key
        if task.workers is NO_WORKERS and task.seen_workers is NO_WORKERS:
            # Its first worker (every plain Task's one): one record for the three fields,
            # whose new sets an undo drops whole. (A plain Task's workers are never walked in
            # order, as a ParallelTask's are: a set, not an IdSet, whose making is a Python
            # call.)
            undo.record((_restore_members,
                         (task, task.workers, task.seen_workers, task.driver)))
            task.workers = IdSet((worker.worker_id,)) if task.kind is PARALLEL \
                else {worker.worker_id}
            task.seen_workers = {worker.worker_id}
            if driver:
                task.driver = worker.worker_id
        else:
            if task.workers is NO_WORKERS:
                undo.set(task, "workers", IdSet())
            if task.seen_workers is NO_WORKERS:
                undo.set(task, "seen_workers", set())
            undo.add(task.workers, worker.worker_id)
            undo.add(task.seen_workers, worker.worker_id)
            if driver:
                undo.set(task, "driver", worker.worker_id)
        if driver:
            how = f" (queued behind {worker.task_id})" if queue else ""
            if not assign:
                how += ", taken back: it kept running while its node was away from the master"
            self._set_status(task, RUNNING, f"driver {worker.worker_id}{how}", now)
        if not assign:
            return
        self._out.append(Assign(
            node_id=worker.node_id, worker_id=worker.worker_id, task_id=task.task_id,
            name=task.name, kind=task.kind, code=task.code, args=task.args, driver=driver,
            package=task.package, version=task.version, code_hash=task.code_hash,
            inputs=task.inputs))

    def _dispatch(self, task: TaskRecord, *, helpers: bool = True) -> None:
        """Queued units to the task's workers (only to its driver without ``helpers``), each
        topped up to its depth (see Batches)."""
        if task.units.unit_seconds is None:
            batch, depth = self.first_batch, self.first_depth  # nothing measured yet
            per_unit = UNKNOWN_UNIT_S
        else:
            per_unit = max(task.units.unit_seconds, 1e-7)
            batch = max(1, min(MAX_BATCH, int(BATCH_SECONDS / per_unit)))
            # Tiny units need thousands in flight to hide the round trip; slow ones
            # only a couple, so the last units of a task do not queue behind others;
            # a unit longer than the queued work wanted goes out only when its worker is free.
            depth = (batch if per_unit >= PREFETCH_SECONDS else
                     max(2 * batch, min(8 * batch, int(PREFETCH_SECONDS / per_unit))))
        pending, undo, records = task.units.pending, self._undo, self.workers
        if not pending:
            return
        popleft = pending.popleft
        # The least loaded first, so that units given back by a steal go to the idle worker,
        # ties by worker id. A task may have a thousand workers, most of them idle while the
        # queue empties after a few (tiny units) or most of them full: the idle ones (nothing in
        # flight) are served as a walk of the ids in order meets them, and the walk stops when
        # nothing is left queued; those with some room, from a heap once every idle one had its
        # turn. A worker's load is what it held as this pass began (``loads``: of those sent a
        # run in it, to a unit's inputs too), as one heap of them all would order them.
        workers = task.workers if helpers or task.driver is None else (task.driver,)
        loads: dict[str, int] = {}
        alone_share = 0  # units that go alone, per worker in this pass (0: not counted yet)
        deferred: list[UnitCall] = []  # wait for a busy holder of their inputs

        def send(target: WorkerRecord, units: list[UnitCall]) -> None:
            loads.setdefault(target.worker_id, len(target.in_flight))
            self._send_run(task, target, units)

        def room_at_start() -> tuple[int, int]:
            """The workers that had room as this pass began, and the room they had in all."""
            count = total = 0
            for worker in map(records.__getitem__, workers):
                load = loads.get(worker.worker_id, len(worker.in_flight))
                if not worker.paused and load < depth:
                    count, total = count + 1, total + depth - load
            return count, total

        def serve(worker: WorkerRecord) -> None:
            nonlocal alone_share
            given_alone = 0
            in_flight = worker.in_flight  # grows with each run sent (_send_run)
            while pending and len(in_flight) < depth:
                room = depth - len(in_flight)
                units: list[UnitCall] = []
                undo.call(_put_back_first, pending, units)
                for _ in range(min(batch, room, len(pending))):  # (per unit: kept short)
                    unit = pending[0]
                    if unit.keep or unit.deps:
                        break  # goes alone: it is keyed by its index on the worker
                    units.append(popleft())
                if units:
                    send(worker, units)
                    continue
                if not alone_share:
                    alone_share = _share(pending, *room_at_start())
                if given_alone >= alone_share:
                    break  # the next worker's turn: neighbours stay together, all get some
                unit = pending.popleft()
                units.append(unit)
                if not all(dep in task.units.held for dep in unit.deps):
                    # An input's holder was lost meanwhile.
                    undo.put(task.units.blocked, unit.index, unit)
                    continue
                target = (self._nearest(task, unit, worker, workers, depth, per_unit)
                          if unit.deps else worker)
                if target is None:
                    deferred.append(unit)
                    continue
                send(target, units)
                if target is worker:
                    given_alone += 1

        with_room: list[tuple[int, str, WorkerRecord]] = []  # ids are unique: never a record compared
        for worker_id in workers.in_order() if type(workers) is IdSet else sorted(workers):
            if not pending:
                break
            worker = records[worker_id]
            load = loads.get(worker_id, len(worker.in_flight))
            if worker.paused or load >= depth:
                continue
            if load:
                with_room.append((load, worker_id, worker))
            else:
                serve(worker)
        heapq.heapify(with_room)
        while pending and with_room:
            serve(heapq.heappop(with_room)[2])
        if deferred:
            pending.extendleft(reversed(deferred))
            undo.call(_drop_first, pending, len(deferred))
        if not pending and not task.units.answered:
            self._urge_driver(task, workers)

    def _urge_driver(self, task: TaskRecord, workers: Collection[str]) -> None:
        """Every unit the driver sliced before it heard from the master is out, and a worker of
        the task has none, or one that could join it is idle: the driver is told to go on (a
        ForwardResults of nothing), so that a task of long units on more workers than its first
        few has one for each at once, not after the first unit's whole run."""
        if task.units.sliced_all or task.driver is None:
            return
        records = self.workers
        if (all(records[w].in_flight for w in workers if w in records)
                and self._idle_worker_for(task.warm_key) is None):
            return
        driver = records[task.driver]
        self._undo.set(task.units, "answered", True)
        self._out.append(ForwardResults(driver.node_id, driver.worker_id, task.task_id, []))

    def _nearest(self, task: TaskRecord, unit: UnitCall, worker: WorkerRecord,
                 workers: Collection[str], depth: int, per_unit: float) -> WorkerRecord | None:
        """Where a unit with inputs starts soonest: the worker that holds most of their bytes,
        unless what is queued there takes longer than moving them (``TRANSFER_BYTES_PER_S``).
        ``worker`` (the next with room) when nothing is held anywhere or nothing is large; None
        when the best is a holder with no room now: the unit waits for it."""
        held, sizes = task.units.held, task.units.sizes
        total = sum(sizes.get(dep, 0) for dep in unit.deps)
        if total < LOCALITY_MIN_BYTES:
            return worker
        local: dict[str, int] = {}
        for dep in unit.deps:
            local[held[dep]] = local.get(held[dep], 0) + sizes.get(dep, 0)
        best = worker
        best_cost = ((total - local.get(worker.worker_id, 0)) / TRANSFER_BYTES_PER_S
                     + len(worker.in_flight) * per_unit)
        for worker_id in sorted(local):
            holder = self.workers.get(worker_id)
            if holder is None or holder.paused or worker_id not in workers:
                continue
            cost = ((total - local[worker_id]) / TRANSFER_BYTES_PER_S
                    + len(holder.in_flight) * per_unit)
            if cost < best_cost:
                best, best_cost = holder, cost
        if len(best.in_flight) >= depth:
            return None  # the holder is full: the unit waits for its room
        return best

    def _send_run(self, task: TaskRecord, worker: WorkerRecord, units: list[UnitCall]) -> None:
        run_id = next(self._run_ids)
        self._undo.add(task.units.flying, worker.worker_id)
        self._undo.call(_take_back, worker.in_flight, units)
        for unit in units:
            worker.in_flight[unit.index] = run_id
        held, sizes = task.units.held, task.units.sizes
        holders = [(dep, held[dep], self._address(self.workers[held[dep]]))
                   for unit in units for dep in unit.deps]
        self._out.append(Dispatch(worker.node_id, worker.worker_id, task.task_id, run_id, units,
                                  holders, {i: sizes[i] for i, _, _ in holders if i in sizes}))

    def _steal_for_idle(self, task: TaskRecord) -> None:
        """An idle worker of the task and nothing queued: ask a busy peer for a queued run.

        One request at a time per task, never for a worker's oldest run (it is most likely
        running already), and never twice for the same run."""
        if task.units.pending or task.units.steal_pending:
            return
        if all(self.workers[w].in_flight or self.workers[w].paused for w in task.workers):
            return  # (a paused worker is idle, not for stealing: it may take no work)
        # Only a worker with two runs or more has one to give (never its oldest). A task may
        # have a thousand workers, most of them idle: only those sent runs are looked at.
        victims = []
        for worker_id in list(task.units.flying):
            worker = self.workers.get(worker_id)
            if worker is None or not worker.in_flight or worker_id not in task.workers:
                self._undo.discard(task.units.flying, worker_id)
                continue
            runs = _runs_to_give(worker)
            if runs:
                victims.append((not worker.paused, -len(runs), worker_id, worker, runs))
        # A paused worker's queued runs first: they would wait there for its memory to fall.
        for _, _, _, victim, runs in sorted(victims, key=_victim_order):
            candidates = [r for r in sorted(runs)[1:] if r not in task.units.steals]
            if candidates:
                self._undo.add(task.units.steals, candidates[-1])
                self._undo.set(task.units, "steal_pending", True)
                self._out.append(Steal(victim.node_id, victim.worker_id, task.task_id, candidates[-1]))
                return

    def _paused(self, event: WorkerPaused) -> None:
        """A worker past its memory's pause mark gets no new work until it says it is back
        below; one that has no task is replaced (what keeps its memory up is nobody's)."""
        worker = self.workers.get(event.worker_id)
        if worker is None or worker.paused == event.paused:
            return
        self._undo.set(worker, "paused", event.paused)
        (self._undo.add if event.paused else self._undo.discard)(self.paused, worker.worker_id)
        if worker.task_id is not None:
            task = self.tasks[worker.task_id]
            self._note(task, f"worker {worker.worker_id}", "running" if event.paused else "paused",
                       "paused" if event.paused else "running", event.cause, event.now)

    def _replace_paused_idle(self) -> None:
        """A paused worker whose task ended is replaced: what keeps its memory up is nobody's
        any more (a leak, a cache of the task's), and a fresh process has none of it."""
        for worker_id in sorted(self.paused):
            worker = self.workers.get(worker_id)
            if worker is None:  # (not since _drop_worker forgets it; a stale entry must not stall)
                self._undo.discard(self.paused, worker_id)
            elif worker.task_id is None:
                self._drop_worker(worker_id)
                self._out.append(KillWorker(worker.node_id, worker_id,
                                            "idle, and still past its memory's pause mark"))

    # --- reporting ------------------------------------------------------------

    def _report_progress(self) -> None:
        for task in self._parallel.values():
            self._report_progress_of(task)

    def _report_progress_of(self, task: TaskRecord) -> None:
        if task.units.done_count != task.units.reported_done:
            self._undo.set(task.units, "reported_done", task.units.done_count)
            total = task.units.done_count + task.units.open_count()
            self._out.append(
                ReportProgress(task.client_id, task.task_id, task.units.done_count, total, task.units.sliced_all)
            )

    def _note(self, task: TaskRecord, key: str, start: str, finish: str, cause: str, now: float) -> None:
        lines = task.lines
        story, evicted = self._noted(task, key, start, finish, cause, now)
        self._undo.call(_unnote, task, lines, story, evicted)

    @staticmethod
    def _noted(task: TaskRecord, key: str, start: str, finish: str, cause: str,
               now: float) -> tuple[list[StoryEntry], StoryEntry | None]:
        """A line added to the task's story, unrecorded (``_unnote`` takes it back): the list
        it went to, and the oldest line it pushed out, if any."""
        story = task.lines
        if not isinstance(story, list):  # the shared empty tuple: its own list from now on
            story = task.lines = []
        story.append((key, start, finish, cause, now))
        # (a list, not a deque with maxlen: an empty deque costs a queued task 600 bytes)
        return story, story.pop(0) if len(story) > STORY_LENGTH else None

    # --- invariants -------------------------------------------------------------

    def validate(self) -> None:
        NO_UNITS.check_empty()
        assert not NO_WORKERS, "the shared empty worker set has workers"
        assert not self.retired.keys() & self.workers.keys(), "a worker dropped for good is back"
        for worker_id, worker in self.workers.items():
            assert worker_id in self.nodes.get(worker.node_id, set()), f"{worker_id} not on its node"
            if worker.task_id is None:
                assert not worker.in_flight, f"idle {worker_id} has units in flight"
                assert not worker.queued, f"idle {worker_id} has tasks queued"
                continue
            for queued_id in worker.queued:
                behind = self.tasks[queued_id]
                assert behind.kind is TASK and behind.state is RUNNING, f"{queued_id} queued"
                assert worker_id in behind.workers, f"{worker_id} not in {queued_id}'s workers"
            assert len(set(worker.queued)) == len(worker.queued), f"{worker_id}: a task queued twice"
            assert worker.task_id not in worker.queued, f"{worker_id}: runs a task it has queued"
            task = self.tasks[worker.task_id]
            assert worker_id in task.workers, f"{worker_id} not in {task.task_id}'s workers"
            for index in worker.in_flight:
                assert index in task.units.open_units, f"{worker_id} runs closed unit {index}"
            assert not worker.in_flight or worker_id in task.units.flying, \
                f"{worker_id} has units of {task.task_id} in flight, not in its flying"
        paused = {w for w, record in self.workers.items() if record.paused}
        assert paused == self.paused, f"paused workers {paused} != {self.paused}"
        stopping = {w for w, record in self.workers.items() if record.stopping}
        assert stopping == self.stopping, f"stopping workers {stopping} != {self.stopping}"
        for worker_id in stopping:
            assert self.workers[worker_id].stop_by > 0, f"{worker_id} stops with no deadline"
        running = {t.task_id for t in self.tasks.values() if t.state is RUNNING}
        assert set(self._running) == running, "running index disagrees with task states"
        assert set(self._parallel) == {t for t in running if self.tasks[t].kind is PARALLEL}
        assert set(self.unit_bytes_bound) <= {t.warm_key.owner for t in self._parallel.values()}, \
            "a bound on open units' bytes of an owner without a running ParallelTask"
        counts: dict[tuple[str, int], int] = {}
        owners: dict[str, int] = {}
        held: dict[str, int] = {}
        for task in self.tasks.values():
            if task.args:
                held[task.warm_key.owner] = held.get(task.warm_key.owner, 0) + len(task.args)
            if task.state is QUEUED:
                counts[task.client_id, task.priority] = counts.get((task.client_id, task.priority), 0) + 1
                owners[task.warm_key.owner] = owners.get(task.warm_key.owner, 0) + 1
        assert counts == self.queued, "queued counts disagree with task states"
        assert owners == self.queued_owners, "queued counts by owner disagree with task states"
        assert held == self.args_bytes, "argument bytes by owner disagree with the tasks' own"
        queued = {t.task_id for t in self.tasks.values() if t.state is QUEUED and not t.inputs_left}
        assert queued <= {entry[-1] for entry in self._queue}, "a queued task is not in the queue"
        for task in self.tasks.values():
            if task.state is QUEUED and task.workers:  # a lost driver's helpers, finishing runs
                assert task.task_id in self.draining, f"{task.task_id} queued with workers"
        for task_id, waiting in self.dependents.items():
            source = self.tasks[task_id]
            assert not source.finished, f"finished {task_id} still has dependents"
            for dependent in waiting:
                record = self.tasks.get(dependent)
                assert record is None or record.finished or (
                    record.inputs_left and task_id in record.inputs_left), dependent
        for task in self.tasks.values():
            for worker_id in task.workers:
                worker = self.workers[worker_id]
                assert worker.task_id == task.task_id or task.task_id in worker.queued
            if task.finished:
                assert not task.workers, f"finished {task.task_id} holds workers"
            elif task.state is RUNNING:
                assert task.driver in task.workers, f"{task.task_id} lost track of its driver"
            flying = [i for w in task.workers for i in self.workers[w].in_flight]
            try:
                task.units.validate(flying, task.finished)
            except AssertionError as exc:
                raise AssertionError(f"{task.task_id}: {exc}") from None
