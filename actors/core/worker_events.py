"""The vocabulary of the worker state machine: unit specs, states, events and instructions.

``WorkerState.handle`` (in ``worker_state.py``) takes events — past-tense facts the Worker actor
observed — and returns instructions — commands for the actor to carry out. All of them are frozen
structs (``msgspec.Struct``, never encoded: made in a fraction of a frozen dataclass's time, and
defined in a tenth of one's at import, which every worker and node pays as it starts) holding
plain values; user payloads, results and errors are opaque ``bytes`` that the
core never unpickles. Every event and every instruction carries the ``stimulus_id`` of the stimulus
that caused it, so a unit's story can be traced from a scheduler message to a worker action.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

import msgspec


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


class UnitSpec(msgspec.Struct, frozen=True):
    """The static, immutable description of a unit; its dynamic state lives in ``Unit``."""

    key: str
    task_id: str
    payload: bytes  # the cloudpickled call; unpickled only by the executor
    dependencies: tuple[str, ...] = ()
    priority: int = 0  # higher runs first; ties run in arrival order

    def __post_init__(self) -> None:
        if type(self.dependencies) is not tuple:  # a frozen struct cannot convert it here
            raise TypeError(f"unit {self.key!r}: dependencies must be a tuple, "
                            f"not {type(self.dependencies).__name__}")
        if self.key in self.dependencies:
            raise ValueError(f"unit {self.key!r} depends on itself")
        if len(set(self.dependencies)) != len(self.dependencies):
            raise ValueError(f"unit {self.key!r} lists a dependency twice: {self.dependencies}")


# --- events: facts fed into WorkerState.handle ------------------------------


class Event(msgspec.Struct, frozen=True, kw_only=True):
    stimulus_id: str
    now: float  # the shell's clock; the core never reads one


class ComputeUnit(Event, frozen=True):
    """The scheduler assigned a unit here; ``who_has`` names holders of its dependencies."""

    spec: UnitSpec
    who_has: Mapping[str, tuple[str, ...]] = msgspec.field(default_factory=dict)
    nbytes: Mapping[str, int] = msgspec.field(default_factory=dict)  # dependencies' sizes, where known


class ReleaseUnit(Event, frozen=True):
    """The scheduler no longer wants this worker to compute or keep ``key``."""

    key: str


class ForgetUnit(Event, frozen=True):
    """The scheduler is done with ``key``: drop everything about it."""

    key: str


class StealRequest(Event, frozen=True):
    """The scheduler wants ``key`` back, to run it on another worker."""

    key: str


class WhoHasUpdate(Event, frozen=True):
    """The scheduler's latest word on which peers hold ``key`` (usually after ``SendMissing``)."""

    key: str
    holders: tuple[str, ...]
    nbytes: int | None = None  # its size, where known


class PeerLost(Event, frozen=True):
    """A peer worker, or the node it ran on, vanished; nothing more will come from it."""

    peer: str


class ExecuteSucceeded(Event, frozen=True):
    """The executor ran ``key`` (after an ``Execute``) and it returned ``result``."""

    key: str
    result: bytes


class KeepResult(Event, frozen=True):
    """A unit of a run (``ExecuteSucceeded`` of the run's key) returned ``data`` too large to go
    inline to the scheduler: it stays here in memory under the unit's own ``key``, as if that
    key had been computed here, for peers (the driver's gather) to fetch by name."""

    key: str
    task_id: str
    data: bytes


class ExecuteFailed(Event, frozen=True):
    """The executor ran ``key`` and it raised; ``error`` is the pickled exception."""

    key: str
    error: bytes
    traceback: str


class FetchSucceeded(Event, frozen=True):
    """The transport brought ``key``'s data from ``peer`` (after a ``Fetch``)."""

    key: str
    peer: str
    data: bytes


class FetchFailed(Event, frozen=True):
    """The transfer of ``key`` from ``peer`` failed, or ``peer`` did not have it."""

    key: str
    peer: str


class PeerBusy(Event, frozen=True):
    """``peer`` refused to send ``key`` for now (too many transfers); it still holds it."""

    key: str
    peer: str


class PeerRetryDue(Event, frozen=True):
    """The delay asked for by ``RetryPeerLater`` has passed."""

    peer: str


class DataRequested(Event, frozen=True):
    """``peer`` asks for the data of ``keys``."""

    keys: tuple[str, ...]
    peer: str


# --- instructions: commands for the Worker actor ----------------------------


class Instruction(msgspec.Struct, frozen=True, kw_only=True):
    stimulus_id: str


class Execute(Instruction, frozen=True):
    """Run ``spec`` in an executor thread with its dependencies' data; report back exactly once."""

    key: str
    spec: UnitSpec
    inputs: Mapping[str, bytes]  # dependency key -> data, taken when the execution starts


class Fetch(Instruction, frozen=True):
    """Get the data of ``keys`` from ``peer``, in one request; report back exactly once for
    each key (or report ``PeerLost``)."""

    keys: tuple[str, ...]
    peer: str


class RetryPeerLater(Instruction, frozen=True):
    """Feed ``PeerRetryDue(peer)`` back after ``delay`` seconds."""

    peer: str
    delay: float


class SendFinished(Instruction, frozen=True):
    """Tell the scheduler ``key`` is in memory here (small results may ride along inline)."""

    key: str
    nbytes: int


class SendErred(Instruction, frozen=True):
    """Tell the scheduler ``key`` raised."""

    key: str
    error: bytes
    traceback: str


class SendReleased(Instruction, frozen=True):
    """Tell the scheduler this worker has let go of ``key`` after its ``ReleaseUnit``."""

    key: str


class SendStealResponse(Instruction, frozen=True):
    """Answer a ``StealRequest``; ``state`` is where the key stood when the request came."""

    key: str
    accepted: bool
    state: UnitState


class SendMissing(Instruction, frozen=True):
    """Ask the scheduler for holders of ``key``: none that this worker knows can give it."""

    key: str


class SendData(Instruction, frozen=True):
    """Answer a ``DataRequested``: the data held here, and the keys not held here."""

    peer: str
    data: Mapping[str, bytes]
    missing: tuple[str, ...]
