"""Events into and instructions out of the master's scheduler (``SchedulerState``).

Events are past-tense facts the Master actor observed; instructions are what
the scheduler wants done. Both are plain frozen dataclasses: the core never
sees a socket. Opaque user payloads ride along as ``bytes``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

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


@dataclass(frozen=True)
class Event:
    now: float


@dataclass(frozen=True)
class NodeJoined(Event):
    node_id: str
    data_address: str = ""  # where other nodes fetch its workers' results


@dataclass(frozen=True)
class NodeLost(Event):
    node_id: str
    reason: str


@dataclass(frozen=True)
class WorkerReady(Event):
    node_id: str
    worker_id: str


@dataclass(frozen=True)
class WorkerAdopted(Event):
    """A node back after the master restarted (or declared it lost) says this worker of it still
    holds these tasks. Plain Tasks of one submitter that wait in the queue are taken back as
    running there (their results, held by the node meanwhile, are on their way) instead of
    running again; anything else (a ParallelTask's driver or helper, a task given to another
    worker since, no task: idle, but warm for code of a submitter not known) and the worker is
    stopped."""

    node_id: str
    worker_id: str
    task_ids: tuple[str, ...]


@dataclass(frozen=True)
class UnitsSalvaged(Event):
    """Unit results that reached a restarted master from a worker it stopped (held by the
    node while the master was away): ``(index, digest, value)``. Kept like journaled results,
    for the task's next driver to replay, for units not sliced again yet."""

    task_id: str
    results: tuple[tuple[int, int, bytes], ...]


@dataclass(frozen=True)
class WorkerLost(Event):
    worker_id: str
    cause: str
    expected: bool  # we asked for it (task ended, cancel): not a death to count


@dataclass(frozen=True, kw_only=True)
class TaskSubmitted(Event):
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


@dataclass(frozen=True)
class ClientLeft(Event):
    """A client said goodbye: nobody will read its unfinished tasks' results."""

    client_id: str


@dataclass(frozen=True)
class TasksDetached(Event):
    """Fire and forget: these tasks of the client (and, before they run, the unfinished inputs
    they wait for) are not cancelled when it leaves."""

    client_id: str
    task_ids: tuple[str, ...]


@dataclass(frozen=True)
class CancelRequested(Event):
    """``grace`` > 0: the task's workers are asked to stop it (``StopTask``) and killed only if
    they have not said so (``WorkerStopped``) within that many seconds; 0: killed at once."""

    task_id: str
    grace: float = 0.0


@dataclass(frozen=True)
class WorkerStopped(Event):
    """A worker asked to stop a task (``StopTask``) says that no code of it runs any more."""

    worker_id: str
    task_id: str


@dataclass(frozen=True)
class UnitsSliced(Event):
    worker_id: str
    task_id: str
    units: list[UnitCall]
    done: bool


@dataclass(frozen=True)
class UnitsFinished(Event):
    worker_id: str
    task_id: str
    run_id: int
    outcomes: list[UnitOutcome]
    elapsed: float  # seconds the worker spent on the batch


@dataclass(frozen=True)
class StealAnswered(Event):
    worker_id: str
    task_id: str
    run_id: int
    accepted: bool


@dataclass(frozen=True)
class RunsReleased(Event):
    """A worker let go of runs the scheduler released (``ReleaseUnits``)."""

    worker_id: str
    task_id: str
    run_ids: list[int]


@dataclass(frozen=True)
class UnitsNotReplayed(Event):
    """Units a restarted driver sliced again that the journal cannot answer for (their
    arguments changed, or their result is not there): they run again."""

    worker_id: str
    task_id: str
    units: list[UnitCall]


@dataclass(frozen=True)
class UnitMissing(Event):
    """A worker found no holder for a unit result it needs."""

    worker_id: str
    task_id: str
    index: int


@dataclass(frozen=True)
class TaskFinished(Event):
    worker_id: str
    task_id: str
    outcome: UnitOutcome
    elapsed: float = 0.0  # seconds the driver's own code ran (a Task's work), for prefetch


@dataclass(frozen=True)
class WorkerPaused(Event):
    """A worker's memory passed its pause mark (``paused``), or fell back below it."""

    worker_id: str
    paused: bool
    cause: str = ""


@dataclass(frozen=True)
class NewestVersion(Event):
    """A package's newest version changed: workers warm for an older one are retired."""

    package: str
    version: str | None


@dataclass(frozen=True)
class Tick(Event):
    pass


# --- instructions -----------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    pass


@dataclass(frozen=True)
class Assign(Instruction):
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


@dataclass(frozen=True)
class Dispatch(Instruction):
    node_id: str
    worker_id: str
    task_id: str
    run_id: int
    units: list[UnitCall]
    holders: list[tuple[int, str, str]] = field(default_factory=list)  # index, worker, address
    sizes: dict[int, int] = field(default_factory=dict)  # of the held inputs, where known


@dataclass(frozen=True)
class Steal(Instruction):
    """Ask a worker to give a queued run back (it refuses once the run has started)."""

    node_id: str
    worker_id: str
    task_id: str
    run_id: int


@dataclass(frozen=True)
class TellPeerGone(Instruction):
    """A worker that may be fetching from ``peer`` learns that it is gone."""

    node_id: str
    worker_id: str
    peer: str


@dataclass(frozen=True)
class TellHolders(Instruction):
    """Answer a worker's ``UnitMissing``: who holds that unit's result now."""

    node_id: str
    worker_id: str
    task_id: str
    index: int
    holders: list[tuple[str, str]]  # (worker, node data address)
    size: int = -1  # of that result, in bytes (-1: not known)


@dataclass(frozen=True)
class ForwardResults(Instruction):
    node_id: str
    worker_id: str
    task_id: str
    results: list[tuple[int, bytes]]
    held: list[tuple[int, str, str]] = field(default_factory=list)  # index, worker, address
    sizes: dict[int, int] = field(default_factory=dict)  # of the held results, where known


@dataclass(frozen=True)
class RecordResults(Instruction):
    """Journal finished units' results, ``(index, digest of the unit, value)``: a restarted
    driver gets them back instead of running them again."""

    task_id: str
    results: list[tuple[int, int, bytes]]


@dataclass(frozen=True)
class ReplayResults(Instruction):
    """A restarted driver sliced again units that had finished: send it their journaled results
    (where the unit's digest matches) and report the others back (``UnitsNotReplayed``)."""

    node_id: str
    worker_id: str
    task_id: str
    units: list[UnitCall]


@dataclass(frozen=True)
class ReleaseWorker(Instruction):
    """The task ended well: the worker drops the instance and stays warm for its submitter.

    Not sent for a plain Task: its worker drops the instance as soon as its work returns."""

    node_id: str
    worker_id: str
    task_id: str


@dataclass(frozen=True)
class StopTask(Instruction):
    """Ask the worker to stop the task's code (its stop flag; ``TaskStopped`` at its next
    progress report) and say when none runs; killed after ``grace`` seconds otherwise."""

    node_id: str
    worker_id: str
    task_id: str
    grace: float


@dataclass(frozen=True)
class KillWorker(Instruction):
    node_id: str
    worker_id: str
    reason: str


@dataclass(frozen=True)
class ReportDone(Instruction):
    client_id: str
    task_id: str
    result: bytes


@dataclass(frozen=True)
class ReportErred(Instruction):
    client_id: str
    task_id: str
    outcome: UnitOutcome
    unit: str


@dataclass(frozen=True)
class ReportInputFailed(Instruction):
    """The task cannot run: its input ``input_id`` ended ``input_state`` (erred, cancelled)."""

    client_id: str
    task_id: str
    input_id: str
    input_state: str


@dataclass(frozen=True)
class ReportKilled(Instruction):
    """A unit was on too many workers that died: the task fails with ``WorkerKilled``."""

    client_id: str
    task_id: str
    unit: str
    causes: tuple[str, ...]


@dataclass(frozen=True)
class ReportUnreachable(Instruction):
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


@dataclass(frozen=True)
class ReportCancelled(Instruction):
    client_id: str
    task_id: str


@dataclass(frozen=True)
class ReportProgress(Instruction):
    client_id: str
    task_id: str
    done: int
    total: int
    sliced_all: bool
