"""Events into and instructions out of the master's scheduler (``SchedulerState``).

Events are past-tense facts the Master actor observed; instructions are what
the scheduler wants done. Both are frozen structs (``msgspec.Struct``: made in a
fraction of a frozen dataclass's time, and they are made for every message; ``gc=False``:
plain values in no cycle, never walked by the cyclic collector); the core never
sees a socket, and they are never encoded. Opaque user payloads ride along as ``bytes``.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from actors.messages import UnitCall, UnitOutcome


class TaskStatus(StrEnum):
    """Where a task instance is in its life (``scheduler_state.TASK_TRANSITIONS``)."""

    QUEUED = "queued"  # waiting for a worker to become its driver
    RUNNING = "running"  # has a driver (and maybe helpers)
    DONE = "done"
    ERRED = "erred"
    CANCELLED = "cancelled"


class TaskKind(StrEnum):
    TASK = "task"  # one call of ``work`` on its driver
    PARALLEL = "parallel"  # sliced into units by its driver, run by any of its workers, reduced

# --- events -----------------------------------------------------------------


class Event(msgspec.Struct, frozen=True, gc=False):
    now: float


class NodeJoined(Event, frozen=True):
    node_id: str
    data_address: str = ""  # where other nodes fetch its workers' results


class NodeLost(Event, frozen=True):
    node_id: str
    reason: str


class WorkerReady(Event, frozen=True):
    node_id: str
    worker_id: str


class WorkerAdopted(Event, frozen=True):
    """A node back after the master restarted (or declared it lost) says this worker of it still
    holds these tasks. Plain Tasks of one submitter that wait in the queue are taken back as
    running there (their results, held by the node meanwhile, are on their way) instead of
    running again; anything else (a ParallelTask's driver or helper, a task given to another
    worker since, no task: idle, but warm for code of a submitter not known) and the worker is
    stopped."""

    node_id: str
    worker_id: str
    task_ids: tuple[str, ...]


class UnitsSalvaged(Event, frozen=True):
    """Unit results that reached a restarted master from a worker it stopped (held by the
    node while the master was away): ``(index, digest, value)``. Kept like journaled results,
    for the task's next driver to replay, for units not sliced again yet."""

    task_id: str
    results: tuple[tuple[int, int, bytes], ...]


class WorkerLost(Event, frozen=True):
    worker_id: str
    cause: str
    expected: bool  # we asked for it (task ended, cancel): not a death to count


class TaskSubmitted(Event, frozen=True, kw_only=True):
    task_id: str
    client_id: str
    name: str
    kind: str
    code: bytes
    args: bytes
    priority: int = 0
    package: str = ""  # a deployed task: the package version pinned at submit
    version: str = ""
    retries: int = 0
    code_hash: str = ""  # the code's content hash (workers keep code by it)
    owner: str = ""  # the submitter's key: its clients share warm workers and one fair share
    # Restored from the master's journal after a restart: units whose result it has (replayed
    # to the driver, not run again).
    journaled: tuple[int, ...] = ()
    restored: bool = False
    # Tasks whose results are its arguments' futures: it waits in the queue's antechamber until
    # they are done (and fails at once if one of them failed or was cancelled).
    inputs: tuple[str, ...] = ()
    items: bool = False  # a batched map: its units' outcomes go to its client too (ForwardItems)


class ClientLeft(Event, frozen=True):
    """A client said goodbye: nobody will read its unfinished tasks' results."""

    client_id: str


class TasksDetached(Event, frozen=True):
    """Fire and forget: these tasks of the client (and, before they run, the unfinished inputs
    they wait for) are not cancelled when it leaves."""

    client_id: str
    task_ids: tuple[str, ...]


class CancelRequested(Event, frozen=True):
    """``grace`` > 0: the task's workers are asked to stop it (``StopTask``) and killed only if
    they have not said so (``WorkerStopped``) within that many seconds; 0: killed at once."""

    task_id: str
    grace: float = 0.0


class WorkerStopped(Event, frozen=True):
    """A worker asked to stop a task (``StopTask``) says that no code of it runs any more."""

    worker_id: str
    task_id: str


class UnitsSliced(Event, frozen=True):
    worker_id: str
    task_id: str
    units: list[UnitCall]
    done: bool
    # Bytes the task's key may still make the master hold beyond what it holds outside its
    # tasks' open units (the master's --max-key-memory less the rest; -1: no bound).
    room: int = -1


class UnitsFinished(Event, frozen=True):
    worker_id: str
    task_id: str
    run_id: int
    outcomes: list[UnitOutcome]
    elapsed: float  # seconds the worker spent on the batch


class StealAnswered(Event, frozen=True):
    worker_id: str
    task_id: str
    run_id: int
    accepted: bool


class TakeBackAnswered(Event, frozen=True):
    """A worker gave back a plain Task queued on it (``accepted``: it had not begun), or not."""

    worker_id: str
    task_id: str
    accepted: bool


class RunsReleased(Event, frozen=True):
    """A worker let go of runs the scheduler released (``ReleaseUnits``)."""

    worker_id: str
    task_id: str
    run_ids: list[int]


class UnitsNotReplayed(Event, frozen=True):
    """Units a restarted driver sliced again that the journal cannot answer for (their
    arguments changed, or their result is not there): they run again."""

    worker_id: str
    task_id: str
    units: list[UnitCall]


class UnitMissing(Event, frozen=True):
    """A worker found no holder for a unit result it needs."""

    worker_id: str
    task_id: str
    index: int


class TaskFinished(Event, frozen=True):
    worker_id: str
    task_id: str
    outcome: UnitOutcome
    elapsed: float = 0.0  # seconds the driver's own code ran (a Task's work), for prefetch


class WorkerPaused(Event, frozen=True):
    """A worker's memory passed its pause mark (``paused``), or fell back below it."""

    worker_id: str
    paused: bool
    cause: str = ""


class NewestVersion(Event, frozen=True):
    """A package's newest version changed: workers warm for an older one are retired."""

    package: str
    version: str | None


class Tick(Event, frozen=True):
    pass


# --- instructions -----------------------------------------------------------


class Instruction(msgspec.Struct, frozen=True, gc=False):
    pass


class Assign(Instruction, frozen=True):
    node_id: str
    worker_id: str
    task_id: str
    name: str
    kind: str
    code: bytes
    args: bytes
    driver: bool
    package: str = ""
    version: str = ""
    code_hash: str = ""
    inputs: tuple[str, ...] = ()  # the tasks whose results its arguments name


class Dispatch(Instruction, frozen=True):
    node_id: str
    worker_id: str
    task_id: str
    run_id: int
    units: list[UnitCall]
    holders: list[tuple[int, str, str]] = msgspec.field(default_factory=list)  # index, worker, address
    sizes: dict[int, int] = msgspec.field(default_factory=dict)  # of the held inputs, where known


class Steal(Instruction, frozen=True):
    """Ask a worker to give a queued run back (it refuses once the run has started)."""

    node_id: str
    worker_id: str
    task_id: str
    run_id: int


class TakeBack(Instruction, frozen=True):
    """Ask a worker to give back a plain Task queued on it behind a late one (see Prefetch in
    scheduler_state.py); it refuses once the task has begun."""

    node_id: str
    worker_id: str
    task_id: str


class TellPeerGone(Instruction, frozen=True):
    """A worker that may be fetching from ``peer`` learns that it is gone."""

    node_id: str
    worker_id: str
    peer: str


class TellHolders(Instruction, frozen=True):
    """Answer a worker's ``UnitMissing``: who holds that unit's result now."""

    node_id: str
    worker_id: str
    task_id: str
    index: int
    holders: list[tuple[str, str]]  # (worker, node data address)
    size: int = -1  # of that result, in bytes (-1: not known)


class ForwardResults(Instruction, frozen=True):
    node_id: str
    worker_id: str
    task_id: str
    results: list[tuple[int, bytes]]
    held: list[tuple[int, str, str]] = msgspec.field(default_factory=list)  # index, worker, address
    sizes: dict[int, int] = msgspec.field(default_factory=dict)  # of the held results, where known
    pack: int = 0  # plain units the driver packs from now on (0: unchanged)


class ForwardItems(Instruction, frozen=True):
    """A batched map's finished units, to its client: (index, pack count or 0, outcome)."""

    client_id: str
    task_id: str
    items: list[tuple[int, int, bytes]]


class RecordResults(Instruction, frozen=True):
    """Journal finished units' results, ``(index, digest of the unit, value)``: a restarted
    driver gets them back instead of running them again."""

    task_id: str
    results: list[tuple[int, int, bytes]]
    # The packs among them: first index -> how many units (a restarted master counts them all)
    packs: dict[int, int] = msgspec.field(default_factory=dict)


class ReplayResults(Instruction, frozen=True):
    """A restarted driver sliced again units that had finished: send it their journaled results
    (where the unit's digest matches) and report the others back (``UnitsNotReplayed``)."""

    node_id: str
    worker_id: str
    task_id: str
    units: list[UnitCall]


class ReleaseWorker(Instruction, frozen=True):
    """The task ended well: the worker drops the instance and stays warm for its submitter.

    Not sent for a plain Task: its worker drops the instance as soon as its work returns."""

    node_id: str
    worker_id: str
    task_id: str


class StopTask(Instruction, frozen=True):
    """Ask the worker to stop the task's code (its stop flag; ``TaskStopped`` at its next
    progress report) and say when none runs; killed after ``grace`` seconds otherwise."""

    node_id: str
    worker_id: str
    task_id: str
    grace: float


class KillWorker(Instruction, frozen=True):
    node_id: str
    worker_id: str
    reason: str


class ReportDone(Instruction, frozen=True):
    client_id: str
    task_id: str
    result: bytes


class ReportErred(Instruction, frozen=True):
    client_id: str
    task_id: str
    outcome: UnitOutcome
    unit: str


class ReportInputFailed(Instruction, frozen=True):
    """The task cannot run: its input ``input_id`` ended ``input_state`` (erred, cancelled)."""

    client_id: str
    task_id: str
    input_id: str
    input_state: str


class ReportKilled(Instruction, frozen=True):
    """A unit was on too many workers that died: the task fails with ``WorkerKilled``."""

    client_id: str
    task_id: str
    unit: str
    causes: tuple[str, ...]


class ReportUnreachable(Instruction, frozen=True):
    """A worker could not fetch a unit's result from its live holder, time after time: the
    holder's data address is not reachable from there. The task fails with
    ``DataUnreachable`` (a misconfigured address or a firewall, for a person to fix)."""

    client_id: str
    task_id: str
    unit: str
    asker: str
    holder: str
    address: str
    tries: int


class ReportOverBudget(Instruction, frozen=True):
    """A driver sliced units past its key's memory budget on the master (``UnitsSliced.room``):
    the task fails with ``MemoryBudgetFull``."""

    client_id: str
    task_id: str
    held: int  # the key's open units' bytes before these
    needed: int  # these units' bytes
    room: int


class ReportCancelled(Instruction, frozen=True):
    client_id: str
    task_id: str


class ReportProgress(Instruction, frozen=True):
    client_id: str
    task_id: str
    done: int
    total: int
    sliced_all: bool
