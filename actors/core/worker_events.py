"""The vocabulary of the worker state machine: unit specs, states, events and instructions.

``WorkerState.handle`` (in ``worker_state.py``) takes events — past-tense facts the Worker actor
observed — and returns instructions — commands for the actor to carry out. All of them are frozen
dataclasses holding plain values; user payloads, results and errors are opaque ``bytes`` that the
core never unpickles. Every event and every instruction carries the ``stimulus_id`` of the stimulus
that caused it, so a unit's story can be traced from a scheduler message to a worker action.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum


class UnitState(StrEnum):
    """Where a unit key stands on this worker (see the theory of operation in worker_state.py)."""

    RELEASED = "released"
    WAITING = "waiting"
    READY = "ready"
    EXECUTING = "executing"
    MEMORY = "memory"
    ERROR = "error"
    FETCH = "fetch"
    FLIGHT = "flight"
    MISSING = "missing"
    CANCELLED = "cancelled"
    RESUMED = "resumed"
    RESCHEDULED = "rescheduled"
    FORGOTTEN = "forgotten"


# States in which a hold-only key serves (or is on its way to serve) its dependents.
HOLDING = frozenset({UnitState.FETCH, UnitState.FLIGHT, UnitState.MISSING, UnitState.MEMORY,
                     UnitState.RESUMED})


class Role(StrEnum):
    """Why this worker knows a key: to compute it, or only to hold it for units that need it."""

    COMPUTE = "compute"  # the scheduler assigned it here (ComputeUnit): run its spec
    HOLD = "hold"  # a dependency of units here: fetch it from a holder and keep it while needed


class Work(StrEnum):
    """What is busy with a key right now; at most one of these per key, ever."""

    EXECUTION = "execution"  # an executor thread runs its spec
    TRANSFER = "transfer"  # the transport fetches its data from a peer


@dataclass(frozen=True)
class UnitSpec:
    """The static, immutable description of a unit; its dynamic state lives in ``Unit``."""

    key: str
    task_id: str
    payload: bytes  # the cloudpickled call; unpickled only by the executor
    dependencies: tuple[str, ...] = ()
    priority: int = 0  # higher runs first; ties run in arrival order

    def __post_init__(self) -> None:
        object.__setattr__(self, "dependencies", tuple(self.dependencies))
        if self.key in self.dependencies:
            raise ValueError(f"unit {self.key!r} depends on itself")
        if len(set(self.dependencies)) != len(self.dependencies):
            raise ValueError(f"unit {self.key!r} lists a dependency twice: {self.dependencies}")


# --- events: facts fed into WorkerState.handle ------------------------------


@dataclass(frozen=True, kw_only=True)
class Event:
    stimulus_id: str
    now: float  # the shell's clock; the core never reads one


@dataclass(frozen=True)
class ComputeUnit(Event):
    """The scheduler assigned a unit here; ``who_has`` names holders of its dependencies."""

    spec: UnitSpec
    who_has: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    nbytes: Mapping[str, int] = field(default_factory=dict)  # dependencies' sizes, where known


@dataclass(frozen=True)
class ReleaseUnit(Event):
    """The scheduler no longer wants this worker to compute or keep ``key``."""

    key: str


@dataclass(frozen=True)
class ForgetUnit(Event):
    """The scheduler is done with ``key``: drop everything about it."""

    key: str


@dataclass(frozen=True)
class StealRequest(Event):
    """The scheduler wants ``key`` back, to run it on another worker."""

    key: str


@dataclass(frozen=True)
class WhoHasUpdate(Event):
    """The scheduler's latest word on which peers hold ``key`` (usually after ``SendMissing``)."""

    key: str
    holders: tuple[str, ...]
    nbytes: int | None = None  # its size, where known


@dataclass(frozen=True)
class PeerLost(Event):
    """A peer worker, or the node it ran on, vanished; nothing more will come from it."""

    peer: str


@dataclass(frozen=True)
class ExecuteSucceeded(Event):
    """The executor ran ``key`` (after an ``Execute``) and it returned ``result``."""

    key: str
    result: bytes


@dataclass(frozen=True)
class KeepResult(Event):
    """A unit of a run (``ExecuteSucceeded`` of the run's key) returned ``data`` too large to go
    inline to the scheduler: it stays here in memory under the unit's own ``key``, as if that
    key had been computed here, for peers (the driver's gather) to fetch by name."""

    key: str
    task_id: str
    data: bytes


@dataclass(frozen=True)
class ExecuteFailed(Event):
    """The executor ran ``key`` and it raised; ``error`` is the pickled exception."""

    key: str
    error: bytes
    traceback: str


@dataclass(frozen=True)
class FetchSucceeded(Event):
    """The transport brought ``key``'s data from ``peer`` (after a ``Fetch``)."""

    key: str
    peer: str
    data: bytes


@dataclass(frozen=True)
class FetchFailed(Event):
    """The transfer of ``key`` from ``peer`` failed, or ``peer`` did not have it."""

    key: str
    peer: str


@dataclass(frozen=True)
class PeerBusy(Event):
    """``peer`` refused to send ``key`` for now (too many transfers); it still holds it."""

    key: str
    peer: str


@dataclass(frozen=True)
class PeerRetryDue(Event):
    """The delay asked for by ``RetryPeerLater`` has passed."""

    peer: str


@dataclass(frozen=True)
class DataRequested(Event):
    """``peer`` asks for the data of ``keys``."""

    keys: tuple[str, ...]
    peer: str


# --- instructions: commands for the Worker actor ----------------------------


@dataclass(frozen=True, kw_only=True)
class Instruction:
    stimulus_id: str


@dataclass(frozen=True)
class Execute(Instruction):
    """Run ``spec`` in an executor thread with its dependencies' data; report back exactly once."""

    key: str
    spec: UnitSpec
    inputs: Mapping[str, bytes]  # dependency key -> data, taken when the execution starts


@dataclass(frozen=True)
class Fetch(Instruction):
    """Get the data of ``keys`` from ``peer``, in one request; report back exactly once for
    each key (or report ``PeerLost``)."""

    keys: tuple[str, ...]
    peer: str


@dataclass(frozen=True)
class RetryPeerLater(Instruction):
    """Feed ``PeerRetryDue(peer)`` back after ``delay`` seconds."""

    peer: str
    delay: float


@dataclass(frozen=True)
class SendFinished(Instruction):
    """Tell the scheduler ``key`` is in memory here (small results may ride along inline)."""

    key: str
    nbytes: int


@dataclass(frozen=True)
class SendErred(Instruction):
    """Tell the scheduler ``key`` raised."""

    key: str
    error: bytes
    traceback: str


@dataclass(frozen=True)
class SendReleased(Instruction):
    """Tell the scheduler this worker has let go of ``key`` after its ``ReleaseUnit``."""

    key: str


@dataclass(frozen=True)
class SendStealResponse(Instruction):
    """Answer a ``StealRequest``; ``state`` is where the key stood when the request came."""

    key: str
    accepted: bool
    state: UnitState


@dataclass(frozen=True)
class SendMissing(Instruction):
    """Ask the scheduler for holders of ``key``: none that this worker knows can give it."""

    key: str


@dataclass(frozen=True)
class SendData(Instruction):
    """Answer a ``DataRequested``: the data held here, and the keys not held here."""

    peer: str
    data: Mapping[str, bytes]
    missing: tuple[str, ...]
