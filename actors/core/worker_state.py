"""The worker state machine: what one worker does with each unit key, with no I/O.

Theory of operation
===================
``WorkerState.handle(*events)`` is the only way to change the state; it returns the instructions for
the Worker actor to carry out (worker_events.py holds both vocabularies). Nothing here reads a clock,
opens a socket or starts a thread: time comes in on the events.

Who sends what
  scheduler  ComputeUnit, ReleaseUnit, ForgetUnit, StealRequest, WhoHasUpdate, PeerLost
  executor   ExecuteSucceeded / ExecuteFailed: exactly one per Execute instruction; before a
             run's ExecuteSucceeded, KeepResult for each of its units whose result is too large
             to report inline (it stays here, in memory, under the unit's own key)
  transport  FetchSucceeded / FetchFailed / PeerBusy: one per Fetch; DataRequested from peers
  shell      PeerRetryDue, after the delay a RetryPeerLater instruction asked for

Each key known here has a ``Unit``: an explicit ``state``, a ``role`` (COMPUTE: the scheduler
assigned it here; HOLD: only a dependency of units here) and, for assigned units, an immutable
``UnitSpec``. The states:

  released     known, holds nothing, nobody wants it now (spec, holders and story are kept)
  waiting      to compute; some dependency is not in memory yet
  ready        to compute; queued by priority (higher first), then arrival
  executing    an executor thread runs it
  memory       its data is in ``WorkerState.data``
  error        its execution raised; the error is kept on the unit
  fetch        to get from a holder; queued until one is free (one transfer per peer)
  flight       a transfer from ``unit.peer`` runs
  missing      no known holder; the scheduler was asked (SendMissing) and answers WhoHasUpdate
  cancelled    nobody wants it, but its execution or transfer still runs; what it brings is dropped
  resumed      wanted again while that work still runs: the running work is reused, never restarted.
               ``role`` says what happens when it ends: COMPUTE reports it to the scheduler (and
               computes it if a transfer failed), HOLD keeps it for dependents (and fetches it if
               an execution failed)
  rescheduled  stolen by the scheduler (accepted only in waiting or ready, see "Steals" below);
               holds nothing and stays so until the scheduler computes, releases or forgets it
               again, or a unit here needs it (then it is fetched like any dependency)
  forgotten    gone from ``units``; only the story remembers it

Rules
 1. ``handle`` is atomic: if any event raises, every change made by the call is undone (a journal
    of what each change overwrote) and no instruction is lost, because none was returned.
 2. Transitions are the table ``TRANSITIONS[(start, finish)]``. A pair missing from it goes
    start -> released -> finish when the key holds no running work; otherwise, and for pairs
    that cannot be reached that way, it is InvalidTransition. Transitions return recommendations
    ``{key: finish}``, applied in a loop until none remain; a key moved more than
    ``transition_limit`` times by one event raises TransitionLoop.
 3. At most one execution or one transfer per key (``Unit.running``). Execute is emitted only
    while fewer than ``nthreads`` executions run; cancelled and resumed executions keep their
    thread until they report. At most one transfer per peer, ``max_fetches`` in all; a transfer
    carries every key queued for fetch that its peer holds, up to ``max_transfer_keys`` and
    ``max_transfer_bytes`` (one key at least), and no transfer starts while those running bring
    ``max_flight_bytes`` or more (sizes as the scheduler said them: ``Unit.nbytes``).
 4. A hold-only dependency is fetched and kept only while a dependent waits or is ready; when the
    last such dependent starts executing (Execute carries its inputs), is released or stolen, the
    dependency is released and its data dropped. A released hold-only key that no unit depends on
    any more is forgotten: forgetting a unit forgets the dependencies that only it used.
 5. A key is forgotten only on the scheduler's word: ForgetUnit, directly or through rule 4.
    ReleaseUnit keeps the unit (spec, holders, error) in ``released``. A forgotten key that units
    here still depend on stays, as a dependency, until they are forgotten too.
 6. ReleaseUnit is answered with SendReleased once the key holds nothing for the scheduler: at
    once, or when its cancelled execution or transfer reports back. A result that still lands on
    a cancelled key is dropped: the scheduler gave the key up, and data nobody knows about would
    leak. A release overtaken by a new ComputeUnit or by ForgetUnit is not acknowledged (the
    scheduler gets SendFinished / SendErred, or asked to forget anyway). Releasing a key that
    units here still need turns it into a dependency: data in memory is kept, a running
    execution is resumed to feed them, anything else is fetched.
 7. A dependency no holder can give (all failed or vanished) goes missing with SendMissing; a
    WhoHasUpdate naming holders sends it back to fetch. A dependency that erred here stays in
    error and its dependents wait: whether to retry or give up is the scheduler's decision.
 8. Replies about a transfer that already ended (it was ended by PeerLost) are stale: ignored.
    An execution report for a key that is not executing is a shell bug: InvalidTransition.

The scheduler's word, on the wire (rule 5 as the shell, unit_runner.py, carries it out)
  The wire protocol has no "forget" message: the scheduler's last word on a run is implied by
  the exchange itself, and the shell feeds ForgetUnit for a key exactly then:
  - right after reporting a run whose outcome rides inline in UnitsDone (a plain run, or a kept
    unit that failed). The scheduler records the first result of a unit and never asks a worker
    for an inline result again; a result lost on the way is computed again as a new run, under a
    new run id, hence a new key. So that report ends the scheduler's claim on the key;
  - right after answering a ReleaseUnits (UnitsReleased, sent when SendReleased comes out: at
    once, or when the cancelled work reports back) or accepting a StealUnits (StealReply with
    accepted=True): in both the scheduler has given the run up;
  - for every key of a task when the task is released (ReleaseTask);
  - for the driver's gather key once its inputs are handed over (no scheduler owns that key).
  A kept result (UnitCall.keep, reported ``held``) is not forgotten when it is reported: it stays
  in memory for the dependents the scheduler sends to fetch it, until the scheduler releases that
  run (ReleaseUnits) or the whole task. A release that has not been answered yet (the execution
  still runs: ``cancelled``) forgets nothing, so a RunUnits for the same run meanwhile resumes it.

Steals
  Only a computation that holds nothing can be stolen: ``waiting`` or ``ready``. Everything else
  is refused, with the key's state in the answer: ``executing``, ``cancelled`` and ``resumed``
  hold a thread (or a transfer) that must not run twice; ``memory`` and ``error`` are done and
  reported. ``fetch``, ``flight`` and ``missing`` keys are always hold-only here (role HOLD:
  rule 4, and ``validate`` checks it): this worker does not compute them, it brings them for its
  own dependents, so there is no computation to give back, and ``rescheduled`` (a stolen
  computation, role COMPUTE) would strand those dependents. The issue's list (waiting, ready,
  fetch) is narrowed on purpose: a steal of a fetch key is refused and the fetch goes on.

``validate()`` (worker_validate.py) checks every invariant; the tests call it after each
``handle``.
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import ClassVar

from actors.core.worker_events import (
    HOLDING,
    ComputeUnit,
    DataRequested,
    Event,
    Execute,
    ExecuteFailed,
    ExecuteSucceeded,
    Fetch,
    FetchFailed,
    FetchSucceeded,
    ForgetUnit,
    Instruction,
    KeepResult,
    PeerBusy,
    PeerLost,
    PeerRetryDue,
    ReleaseUnit,
    RetryPeerLater,
    Role,
    SendData,
    SendErred,
    SendFinished,
    SendMissing,
    SendReleased,
    SendStealResponse,
    StealRequest,
    UnitSpec,
    UnitState,
    WhoHasUpdate,
    Work,
)
from actors.errors import InvalidTransition, TransitionLoop

RELEASED, WAITING, READY = UnitState.RELEASED, UnitState.WAITING, UnitState.READY
EXECUTING, MEMORY, ERROR = UnitState.EXECUTING, UnitState.MEMORY, UnitState.ERROR
FETCH, FLIGHT, MISSING = UnitState.FETCH, UnitState.FLIGHT, UnitState.MISSING
CANCELLED, RESUMED = UnitState.CANCELLED, UnitState.RESUMED
RESCHEDULED, FORGOTTEN = UnitState.RESCHEDULED, UnitState.FORGOTTEN

# States a key can leave through `released` (the catch-all): no thread or transfer holds it.
RESTING = frozenset({WAITING, READY, FETCH, MISSING, MEMORY, ERROR, RESCHEDULED})
# States of a key whose data KeepResult may bring: none held, none on its way.
KEEPABLE = frozenset({RELEASED, FETCH, MISSING})
# States of a dependent that still needs its dependencies' data.
NEEDS_INPUTS = frozenset({WAITING, READY})

Recs = dict[str, UnitState]
StoryEntry = tuple[str, str, str, str, float]  # key, start, finish, stimulus_id, now
QueueEntry = tuple[int, int, str]  # (-priority, arrival order, key): sorts most urgent first


@dataclass
class Unit:
    """The dynamic state of one key on this worker."""

    key: str
    role: Role
    order: int  # arrival order, the tie-break between equal priorities
    state: UnitState = RELEASED
    spec: UnitSpec | None = None  # set once the scheduler assigns the key here
    who_has: set[str] = field(default_factory=set)  # peers known to hold its data
    dependents: set[str] = field(default_factory=set)  # units here whose spec lists this key
    running: Work | None = None  # the execution or transfer that holds the key now
    peer: str | None = None  # the holder the running transfer reads from
    priority: int = 0  # the priority it was last queued with (ready or fetch)
    nbytes: int | None = None
    error: bytes | None = None  # the last failure of its execution
    traceback: str | None = None

    @property
    def dependencies(self) -> tuple[str, ...]:
        return self.spec.dependencies if self.spec is not None else ()

    def clone(self) -> Unit:
        # Not dataclasses.replace: this runs for every unit an event touches (the hot path).
        copy = object.__new__(Unit)
        copy.__dict__.update(self.__dict__)
        copy.who_has = set(self.who_has)
        copy.dependents = set(self.dependents)
        return copy


@dataclass
class _Journal:
    """What one ``handle`` call overwrote, so that a failure can put it all back."""

    arrivals: int
    units: dict[str, Unit | None] = field(default_factory=dict)  # None: the key was new
    data: dict[str, bytes | None] = field(default_factory=dict)
    busy_peers: set[str] | None = None
    story_appended: int = 0
    story_evicted: list[StoryEntry] = field(default_factory=list)


Step = tuple[Recs, list[Instruction]]  # what a transition returns
Transition = Callable[["WorkerState", Unit, Event], Step]


class WorkerState:
    """The units of one worker and what to do next; see the theory of operation above."""

    TRANSITIONS: ClassVar[dict[tuple[UnitState, UnitState], Transition]]

    def __init__(
        self,
        nthreads: int = 1,
        *,
        max_fetches: int = 4,
        max_transfer_keys: int = 100,
        # One transfer is one multipart message, which every hop takes whole before passing it
        # on: the node's relay holds it meanwhile (a master's local node: in the master's
        # process). 16 MiB kept the 1 MB units' gather as fast as 64 did, its relay's peak
        # 16 MiB, not 64 (bench/README.md, "The local node inside the master's process").
        max_transfer_bytes: int = 16 << 20,
        max_flight_bytes: int = 256 << 20,
        busy_retry_delay: float = 0.15,
        story_limit: int = 10_000,
        transition_limit: int = 100,
        validate_after_handle: bool = False,
        data: MutableMapping[str, bytes] | None = None,
    ) -> None:
        if nthreads < 1 or max_fetches < 1:
            raise ValueError("nthreads and max_fetches must be at least 1")
        self.nthreads = nthreads
        self.max_fetches = max_fetches
        self.max_transfer_keys = max_transfer_keys
        self.max_transfer_bytes = max_transfer_bytes
        self.max_flight_bytes = max_flight_bytes
        self.busy_retry_delay = busy_retry_delay
        self.transition_limit = transition_limit
        self.validate_after_handle = validate_after_handle
        self.units: dict[str, Unit] = {}
        # The data of every key in memory, and only those: a dict, or the shell's mapping that
        # spills to disk (actors/spill.py): "memory" is this worker's, wherever the bytes are.
        self.data: MutableMapping[str, bytes] = {} if data is None else data
        self.busy_peers: set[str] = set()  # peers that answered PeerBusy and are not due yet
        self._story: deque[StoryEntry] = deque(maxlen=story_limit)
        self._arrivals = 0
        # Indices, derived from `units`: validate() checks them, a rollback rebuilds them.
        # The queues stay short (the scheduler prefetches a bounded number of units): sorted lists.
        self._ready: list[QueueEntry] = []
        self._fetch_queue: list[QueueEntry] = []
        self._executing: set[str] = set()
        # peer -> the keys being fetched from it (never changed in place: a rollback's copy of
        # the dict stays true)
        self._transfers: dict[str, frozenset[str]] = {}
        self._gathering: str | None = None  # the peer of the transfer being started
        self._journal: _Journal | None = None
        self._moves: Counter[str] = Counter()  # transitions per key for the current event

    # --- public API ----------------------------------------------------------

    def handle(self, *events: Event) -> list[Instruction]:
        """Apply ``events`` in order; all of them or, if one raises, none of them."""
        self._journal = _Journal(arrivals=self._arrivals)
        try:
            instructions: list[Instruction] = []
            for event in events:
                instructions += self._handle_event(event)
            if self.validate_after_handle:
                self.validate()
            return instructions
        except BaseException:
            self._rollback()
            raise
        finally:
            self._journal = None
            self._moves.clear()

    def story(self, *keys: str) -> list[StoryEntry]:
        """Every remembered transition of ``keys``, oldest first."""
        wanted = set(keys)
        return [entry for entry in self._story if entry[0] in wanted]

    def story_of(self, prefix: str) -> list[StoryEntry]:
        """Every remembered transition of keys that start with ``prefix`` (one task's keys)."""
        return [entry for entry in self._story if entry[0].startswith(prefix)]

    @property
    def executing(self) -> frozenset[str]:
        """Keys that hold an executor thread (including cancelled and resumed ones)."""
        return frozenset(self._executing)

    @property
    def in_flight(self) -> dict[str, str]:
        """Key -> peer of every running transfer."""
        return {key: peer for peer, keys in self._transfers.items() for key in keys}

    # --- events --------------------------------------------------------------

    def _handle_event(self, event: Event) -> list[Instruction]:
        self._moves.clear()
        match event:
            case ComputeUnit():
                instructions = self._on_compute(event)
            case ExecuteSucceeded() | ExecuteFailed():
                instructions = self._on_execution_ended(event)
            case KeepResult():
                instructions = self._on_keep(event)
            case FetchSucceeded() | FetchFailed() | PeerBusy():
                instructions = self._on_transfer_ended(event)
            case ReleaseUnit():
                instructions = self._on_release(event)
            case ForgetUnit():
                instructions = self._on_forget(event)
            case StealRequest():
                instructions = self._on_steal(event)
            case WhoHasUpdate():
                unit = self.units.get(event.key)
                recs = self._set_who_has(unit, event.holders) if unit else {}
                if unit is not None and unit.nbytes is None and event.nbytes is not None:
                    unit.nbytes = max(0, event.nbytes)
                instructions = self._apply(recs, event)
            case PeerLost():
                instructions = self._on_peer_lost(event)
            case PeerRetryDue():
                self._touch_busy_peers()
                self.busy_peers.discard(event.peer)
                instructions = []
            case DataRequested():
                held = {key: self.data[key] for key in event.keys if key in self.data}
                missing = tuple(key for key in event.keys if key not in self.data)
                instructions = [SendData(event.peer, held, missing, stimulus_id=event.stimulus_id)]
            case _:
                raise TypeError(f"not a worker event: {event!r}")
        return instructions + self._start_work(event)

    def _on_compute(self, event: ComputeUnit) -> list[Instruction]:
        spec = event.spec
        unit = self.units.get(spec.key) or self._new_unit(spec.key, Role.COMPUTE)
        if unit.spec is not None and unit.spec != spec:
            # A key names one computation; a different spec under the same key is a scheduler bug.
            raise self._invalid(spec.key, WAITING)
        self._touch(unit)
        unit.spec = spec
        recs: Recs = {}
        for dep_key in spec.dependencies:
            dep = self.units.get(dep_key) or self._new_unit(dep_key, Role.HOLD)
            self._touch(dep)
            dep.dependents.add(spec.key)
            if dep_key in event.who_has:
                recs.update(self._set_who_has(dep, event.who_has[dep_key]))
            if dep.nbytes is None and dep_key in event.nbytes:
                dep.nbytes = max(0, event.nbytes[dep_key])
        instructions: list[Instruction] = []
        if unit.state is MEMORY:  # we have it already (fetched, or the scheduler lost the news)
            unit.role = Role.COMPUTE
            instructions.append(SendFinished(spec.key, len(self.data[spec.key]),
                                             stimulus_id=event.stimulus_id))
        elif unit.state is RESUMED:  # the running work will deliver it to the scheduler
            unit.role = Role.COMPUTE
        elif unit.state not in (WAITING, READY, EXECUTING):
            recs[spec.key] = WAITING
        return instructions + self._apply(recs, event)

    def _on_keep(self, event: KeepResult) -> list[Instruction]:
        """The data of a key this worker holds nothing of, or waits to fetch (it computed the
        unit itself meanwhile, or the driver got it inline): in memory, its dependents fed."""
        unit = self.units.get(event.key)
        if unit is not None and (unit.running is not None or unit.state not in KEEPABLE):
            raise self._invalid(event.key, MEMORY)  # the shell asks can_keep() first
        if unit is None:
            unit = self._new_unit(event.key, Role.COMPUTE)
        self._touch(unit)
        start = unit.state
        self._dequeue(unit)
        unit.role = Role.COMPUTE  # the scheduler is told it is held here
        if unit.spec is None:
            unit.spec = UnitSpec(event.key, event.task_id, b"")
        unit.who_has = set()
        unit.state = MEMORY
        unit.nbytes = len(event.data)
        self._set_data(event.key, event.data)
        self._record(event.key, start, MEMORY, event)
        return self._apply(self._follow_ups(unit, start), event)

    def can_keep(self, key: str) -> bool:
        """Whether ``KeepResult`` may put ``key``'s data here now."""
        unit = self.units.get(key)
        return unit is None or (unit.running is None and unit.state in KEEPABLE)

    def _on_execution_ended(self, event: ExecuteSucceeded | ExecuteFailed) -> list[Instruction]:
        unit = self.units.get(event.key)
        succeeded = isinstance(event, ExecuteSucceeded)
        if unit is None or unit.running is not Work.EXECUTION:
            raise self._invalid(event.key, MEMORY if succeeded else ERROR)
        if unit.state is CANCELLED:
            finish = RELEASED  # nobody wants it: drop what it brought
        elif succeeded:
            finish = MEMORY
        else:
            finish = ERROR if unit.role is Role.COMPUTE else FETCH
        return self._apply({event.key: finish}, event)

    def _on_transfer_ended(self, event: FetchSucceeded | FetchFailed | PeerBusy) -> list[Instruction]:
        unit = self.units.get(event.key)
        if unit is None or unit.running is not Work.TRANSFER or unit.peer != event.peer:
            return []  # stale: that transfer was already ended by PeerLost
        instructions: list[Instruction] = []
        if isinstance(event, FetchSucceeded):
            finish = RELEASED if unit.state is CANCELLED else MEMORY
        else:
            if isinstance(event, FetchFailed):
                self._touch(unit)
                unit.who_has.discard(event.peer)
            elif event.peer not in self.busy_peers:
                self._touch_busy_peers()
                self.busy_peers.add(event.peer)
                instructions.append(RetryPeerLater(event.peer, self.busy_retry_delay,
                                                   stimulus_id=event.stimulus_id))
            finish = self._after_failed_transfer(unit)
        return instructions + self._apply({event.key: finish}, event)

    def _on_peer_lost(self, event: PeerLost) -> list[Instruction]:
        self._touch_busy_peers()
        self.busy_peers.discard(event.peer)
        units = sorted(self.units.values(), key=lambda u: u.order)
        for unit in units:
            if event.peer in unit.who_has:
                self._touch(unit)
                unit.who_has.discard(event.peer)
        # One key at a time, each decided from its state at that moment: what one key's
        # transitions lead to can change another's (a dependency released meanwhile).
        instructions: list[Instruction] = []
        for unit in units:
            if unit.running is Work.TRANSFER and unit.peer == event.peer:
                instructions += self._apply({unit.key: self._after_failed_transfer(unit)}, event)
        for unit in units:
            if unit.state is FETCH and not unit.who_has:
                instructions += self._apply({unit.key: MISSING}, event)
        return instructions

    def _on_release(self, event: ReleaseUnit) -> list[Instruction]:
        unit = self.units.get(event.key)
        if unit is None or unit.role is Role.HOLD or unit.state in (RELEASED, CANCELLED):
            return []  # nothing the scheduler asked of us is left to release
        if unit.state is MEMORY and self._needed(unit):
            # Dependents here still need the data: keep it, as a plain dependency.
            self._touch(unit)
            unit.role = Role.HOLD
            return [SendReleased(event.key, stimulus_id=event.stimulus_id)]
        return self._apply({event.key: RELEASED}, event)

    def _on_forget(self, event: ForgetUnit) -> list[Instruction]:
        unit = self.units.get(event.key)
        if unit is None:
            return []
        self._touch(unit)
        unit.role = Role.HOLD  # the scheduler has no claim left; a pending release ack is moot
        if unit.state is CANCELLED:
            return []  # forgotten when its work reports back, unless something depends on it
        if self._needed(unit):
            if unit.state in HOLDING:
                return []
            finish = RELEASED if unit.state is EXECUTING else FETCH  # executing: via cancelled
        elif unit.state is RELEASED:
            if unit.dependents:
                return []
            finish = FORGOTTEN
        else:
            finish = RELEASED  # then forgotten by the follow-up rule, or kept for its dependents
        return self._apply({event.key: finish}, event)

    def _on_steal(self, event: StealRequest) -> list[Instruction]:
        unit = self.units.get(event.key)
        state = unit.state if unit else FORGOTTEN
        accepted = state in (WAITING, READY)  # holds no thread, no transfer, no data yet
        response = SendStealResponse(event.key, accepted, state, stimulus_id=event.stimulus_id)
        return [response] + (self._apply({event.key: RESCHEDULED}, event) if accepted else [])

    # --- the transition loop -------------------------------------------------

    def _apply(self, recs: Recs, event: Event) -> list[Instruction]:
        """Carry out recommendations, and those they lead to, until none remain."""
        instructions: list[Instruction] = []
        pending = dict(recs)
        while pending:
            key = next(iter(pending))
            finish = pending.pop(key)
            unit = self.units.get(key)
            if unit is None or unit.state is finish:
                continue  # forgotten meanwhile, or already there
            self._moves[key] += 1
            if self._moves[key] > self.transition_limit:
                raise TransitionLoop(key, self._moves[key])
            more, new = self._transition(unit, finish, event)
            instructions += new
            pending.update(more)
        return instructions

    def _transition(self, unit: Unit, finish: UnitState, event: Event) -> Step:
        start = unit.state
        method = self.TRANSITIONS.get((start, finish))
        if method is None:
            if (
                start in RESTING
                and (start, RELEASED) in self.TRANSITIONS
                and (RELEASED, finish) in self.TRANSITIONS
            ):
                recs, instructions = self._transition(unit, RELEASED, event)
                recs.pop(unit.key, None)  # this detour exists to reach `finish`
                more, new = self._transition(unit, finish, event)
                return {**recs, **more}, instructions + new
            raise self._invalid(unit.key, finish)
        self._touch(unit)
        recs, instructions = method(self, unit, event)
        self._record(unit.key, start, unit.state, event)
        recs.update(self._follow_ups(unit, start))
        return recs, instructions

    def _follow_ups(self, unit: Unit, start: UnitState) -> Recs:
        """Recommendations every transition implies for the key's neighbours and itself."""
        recs: Recs = {}
        if unit.state is FORGOTTEN:
            return recs
        if unit.state is MEMORY:
            for key in sorted(unit.dependents):
                dependent = self.units[key]
                if dependent.state is WAITING and self._inputs_in_memory(dependent):
                    recs[key] = READY
        if start in NEEDS_INPUTS and unit.state not in NEEDS_INPUTS:
            for key in unit.dependencies:
                dep = self.units[key]
                if dep.role is Role.HOLD and dep.state in HOLDING and not self._needed(dep):
                    recs[key] = RELEASED
        if unit.state in (RELEASED, CANCELLED, RESCHEDULED) and self._needed(unit):
            recs[unit.key] = FETCH
        elif unit.state is RELEASED and unit.role is Role.HOLD and not unit.dependents:
            recs[unit.key] = FORGOTTEN
        return recs

    def _start_work(self, event: Event) -> list[Instruction]:
        """Start executions while threads are free, then transfers while holders are free."""
        instructions: list[Instruction] = []
        while True:
            if self._ready and len(self._executing) < self.nthreads:
                instructions += self._apply({self._ready[0][2]: EXECUTING}, event)
            elif (key := self._next_fetch()) is not None:
                instructions += self._start_transfer(key, event)
            else:
                return instructions

    def _start_transfer(self, key: str, event: Event) -> list[Instruction]:
        """One transfer from a free holder of ``key``, and with it every other key queued for
        fetch that the same peer holds, up to ``max_transfer_keys``, in queue order: one round
        trip for many small results, not one each."""
        peer = self._free_holder(self.units[key])
        assert peer is not None
        keys = [key]
        size = self.units[key].nbytes or 0
        room = min(self.max_transfer_bytes, self.max_flight_bytes - self._flight_bytes())
        for _, _, other in self._fetch_queue:
            if len(keys) >= self.max_transfer_keys:
                break
            unit = self.units[other]
            if other != key and peer in unit.who_has and size + (unit.nbytes or 0) <= room:
                keys.append(other)
                size += unit.nbytes or 0
        self._gathering = peer
        try:
            instructions = self._apply(dict.fromkeys(keys, FLIGHT), event)
        finally:
            self._gathering = None
        return instructions + [Fetch(tuple(keys), peer, stimulus_id=event.stimulus_id)]

    # --- transitions (the table is below them) -------------------------------

    def _to_waiting(self, unit: Unit, event: Event) -> Step:
        if unit.spec is None:
            raise self._invalid(unit.key, WAITING)
        self._end_work(unit)
        unit.role = Role.COMPUTE
        unit.state = WAITING
        recs: Recs = {}
        for key in unit.dependencies:
            if self.units[key].state in (RELEASED, CANCELLED, RESCHEDULED):
                recs[key] = FETCH  # nobody else is bringing it
        if self._inputs_in_memory(unit):
            recs[unit.key] = READY
        return recs, []

    def _waiting_ready(self, unit: Unit, event: Event) -> Step:
        assert unit.spec is not None
        unit.state = READY
        unit.priority = unit.spec.priority
        bisect.insort(self._ready, (-unit.priority, unit.order, unit.key))
        return {}, []

    def _ready_executing(self, unit: Unit, event: Event) -> Step:
        assert unit.spec is not None
        self._dequeue(unit)
        unit.state = EXECUTING
        unit.running = Work.EXECUTION
        self._executing.add(unit.key)
        inputs = {key: self.data[key] for key in unit.dependencies}
        return {}, [Execute(unit.key, unit.spec, inputs, stimulus_id=event.stimulus_id)]

    def _to_memory(self, unit: Unit, event: Event) -> Step:
        if isinstance(event, ExecuteSucceeded):
            value = event.result
        elif isinstance(event, FetchSucceeded):
            value = event.data
        else:
            raise self._invalid(unit.key, MEMORY)
        self._end_work(unit)
        unit.state = MEMORY
        unit.nbytes = len(value)
        self._set_data(unit.key, value)
        if unit.role is Role.HOLD:
            return {}, []
        return {}, [SendFinished(unit.key, len(value), stimulus_id=event.stimulus_id)]

    def _to_error(self, unit: Unit, event: Event) -> Step:
        if not isinstance(event, ExecuteFailed):
            raise self._invalid(unit.key, ERROR)
        self._end_work(unit)
        unit.state = ERROR
        unit.error, unit.traceback = event.error, event.traceback
        return {}, [SendErred(unit.key, event.error, event.traceback, stimulus_id=event.stimulus_id)]

    def _to_released(self, unit: Unit, event: Event) -> Step:
        self._dequeue(unit)
        self._drop_data(unit.key)
        unit.state = RELEASED
        return {}, self._release_ack(unit, event)

    def _to_cancelled(self, unit: Unit, event: Event) -> Step:
        unit.state = CANCELLED  # the work runs on; released when it reports back
        return {}, []

    def _cancelled_released(self, unit: Unit, event: Event) -> Step:
        self._end_work(unit)
        unit.state = RELEASED
        return {}, self._release_ack(unit, event)

    def _to_resumed_compute(self, unit: Unit, event: Event) -> Step:
        unit.role = Role.COMPUTE
        unit.state = RESUMED
        return {}, []

    def _to_resumed_hold(self, unit: Unit, event: Event) -> Step:
        instructions = self._release_ack(unit, event)  # the scheduler's claim ends here
        unit.role = Role.HOLD
        unit.state = RESUMED
        return {}, instructions

    def _to_rescheduled(self, unit: Unit, event: Event) -> Step:
        self._dequeue(unit)
        unit.state = RESCHEDULED
        return {}, []

    def _to_fetch(self, unit: Unit, event: Event) -> Step:
        self._end_work(unit)
        unit.role = Role.HOLD
        if not unit.who_has:
            unit.state = MISSING
            return {}, [SendMissing(unit.key, stimulus_id=event.stimulus_id)]
        unit.state = FETCH
        specs = [self.units[key].spec for key in unit.dependents]
        unit.priority = max((spec.priority for spec in specs if spec is not None), default=0)
        bisect.insort(self._fetch_queue, (-unit.priority, unit.order, unit.key))
        return {}, []

    def _fetch_flight(self, unit: Unit, event: Event) -> Step:
        peer = self._gathering  # (only _start_transfer moves keys into flight; it says Fetch)
        if peer is None or peer not in unit.who_has:
            raise self._invalid(unit.key, FLIGHT)
        self._dequeue(unit)
        unit.state = FLIGHT
        unit.running = Work.TRANSFER
        unit.peer = peer
        self._transfers[peer] = self._transfers.get(peer, frozenset()) | {unit.key}
        return {}, []

    def _fetch_missing(self, unit: Unit, event: Event) -> Step:
        self._dequeue(unit)
        unit.state = MISSING
        return {}, [SendMissing(unit.key, stimulus_id=event.stimulus_id)]

    def _released_forgotten(self, unit: Unit, event: Event) -> Step:
        if unit.dependents:
            raise self._invalid(unit.key, FORGOTTEN)
        unit.state = FORGOTTEN
        del self.units[unit.key]
        recs: Recs = {}
        for key in unit.dependencies:
            dep = self.units[key]
            self._touch(dep)
            dep.dependents.discard(unit.key)
            if dep.role is Role.HOLD and dep.state is RELEASED and not dep.dependents:
                recs[key] = FORGOTTEN
        return recs, []

    TRANSITIONS = {
        (RELEASED, WAITING): _to_waiting,
        (RELEASED, FETCH): _to_fetch,
        (RELEASED, FORGOTTEN): _released_forgotten,
        (WAITING, READY): _waiting_ready,
        (WAITING, RELEASED): _to_released,
        (WAITING, RESCHEDULED): _to_rescheduled,
        (READY, EXECUTING): _ready_executing,
        (READY, RELEASED): _to_released,
        (READY, RESCHEDULED): _to_rescheduled,
        (EXECUTING, MEMORY): _to_memory,
        (EXECUTING, ERROR): _to_error,
        (EXECUTING, RELEASED): _to_cancelled,
        (MEMORY, RELEASED): _to_released,
        (ERROR, RELEASED): _to_released,
        (ERROR, WAITING): _to_waiting,  # a retry; direct, so that no release is acknowledged
        (FETCH, FLIGHT): _fetch_flight,
        (FETCH, MISSING): _fetch_missing,
        (FETCH, RELEASED): _to_released,
        (FLIGHT, MEMORY): _to_memory,
        (FLIGHT, FETCH): _to_fetch,  # the transfer failed: another holder, or missing
        (FLIGHT, WAITING): _to_resumed_compute,
        (FLIGHT, RELEASED): _to_cancelled,
        (MISSING, FETCH): _to_fetch,
        (MISSING, RELEASED): _to_released,
        (CANCELLED, WAITING): _to_resumed_compute,
        (CANCELLED, FETCH): _to_resumed_hold,
        (CANCELLED, RELEASED): _cancelled_released,  # only when its work reports back
        (RESUMED, MEMORY): _to_memory,
        (RESUMED, ERROR): _to_error,
        (RESUMED, WAITING): _to_waiting,  # its transfer failed: compute it after all
        (RESUMED, FETCH): _to_fetch,  # its execution or transfer failed: fetch it
        (RESUMED, RELEASED): _to_cancelled,
        (RESCHEDULED, WAITING): _to_waiting,
        (RESCHEDULED, FETCH): _to_fetch,
        (RESCHEDULED, RELEASED): _to_released,
    }

    # --- helpers -------------------------------------------------------------

    def _invalid(self, key: str, finish: UnitState) -> InvalidTransition:
        unit = self.units.get(key)
        start = unit.state if unit is not None else FORGOTTEN
        return InvalidTransition(key, start.value, finish.value, self.story(key))

    def _needed(self, unit: Unit) -> bool:
        """Whether a unit here waits for, or is ready with, this key's data."""
        return any(self.units[key].state in NEEDS_INPUTS for key in unit.dependents)

    def _inputs_in_memory(self, unit: Unit) -> bool:
        return all(self.units[key].state is MEMORY for key in unit.dependencies)

    def _after_failed_transfer(self, unit: Unit) -> UnitState:
        if unit.state is CANCELLED:
            return RELEASED
        if unit.state is RESUMED and unit.role is Role.COMPUTE:
            return WAITING
        return FETCH

    def _release_ack(self, unit: Unit, event: Event) -> list[Instruction]:
        if unit.role is Role.COMPUTE:
            return [SendReleased(unit.key, stimulus_id=event.stimulus_id)]
        return []

    def _free_holder(self, unit: Unit) -> str | None:
        free = sorted(p for p in unit.who_has if p not in self.busy_peers and p not in self._transfers)
        return free[0] if free else None

    def _flight_bytes(self) -> int:
        """Bytes the running transfers bring, as far as their keys' sizes are known."""
        return sum(self.units[key].nbytes or 0 for keys in self._transfers.values() for key in keys)

    def _next_fetch(self) -> str | None:
        if len(self._transfers) >= self.max_fetches:
            return None
        if self._transfers and self._flight_bytes() >= self.max_flight_bytes:
            return None  # enough on its way: the next transfer waits for one to end
        for _, _, key in self._fetch_queue:
            if self._free_holder(self.units[key]) is not None:
                return key
        return None

    def _set_who_has(self, unit: Unit, holders: tuple[str, ...]) -> Recs:
        self._touch(unit)
        unit.who_has = set(holders)
        if unit.state is FETCH and not unit.who_has:
            return {unit.key: MISSING}
        if unit.state is MISSING and unit.who_has:
            return {unit.key: FETCH}
        return {}

    def _dequeue(self, unit: Unit) -> None:
        queue = self._ready if unit.state is READY else self._fetch_queue
        if unit.state in (READY, FETCH):
            queue.remove((-unit.priority, unit.order, unit.key))

    def _end_work(self, unit: Unit) -> None:
        if unit.running is Work.EXECUTION:
            self._executing.discard(unit.key)
        elif unit.running is Work.TRANSFER and unit.peer is not None:
            keys = self._transfers[unit.peer] - {unit.key}
            if keys:
                self._transfers[unit.peer] = keys
            else:
                del self._transfers[unit.peer]
        unit.running = None
        unit.peer = None

    # --- the journal: every change goes through these ------------------------

    def _new_unit(self, key: str, role: Role) -> Unit:
        if self._journal is not None:
            self._journal.units.setdefault(key, None)
        unit = Unit(key, role, order=self._arrivals)
        self._arrivals += 1
        self.units[key] = unit
        return unit

    def _touch(self, unit: Unit) -> None:
        """Call before changing ``unit``: the journal keeps its first version of this call."""
        if self._journal is not None and unit.key not in self._journal.units:
            self._journal.units[unit.key] = unit.clone()

    def _touch_busy_peers(self) -> None:
        if self._journal is not None and self._journal.busy_peers is None:
            self._journal.busy_peers = set(self.busy_peers)

    def _set_data(self, key: str, value: bytes) -> None:
        if self._journal is not None:
            self._journal.data.setdefault(key, self.data.get(key))
        self.data[key] = value

    def _drop_data(self, key: str) -> None:
        if key in self.data:
            if self._journal is not None:
                self._journal.data.setdefault(key, self.data[key])
            del self.data[key]

    def _record(self, key: str, start: UnitState, finish: UnitState, event: Event) -> None:
        journal = self._journal
        if journal is not None:
            if len(self._story) == self._story.maxlen:
                journal.story_evicted.append(self._story[0])
            journal.story_appended += 1
        self._story.append((key, start, finish, event.stimulus_id, event.now))  # StrEnum: a str

    def _rollback(self) -> None:
        journal = self._journal
        assert journal is not None
        for key, saved in journal.units.items():
            if saved is None:
                self.units.pop(key, None)
            else:
                self.units[key] = saved
        for key, value in journal.data.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value
        if journal.busy_peers is not None:
            self.busy_peers = journal.busy_peers
        # Evicted entries followed by what is left is the old story followed by what was appended.
        entries = journal.story_evicted + list(self._story)
        self._story.clear()
        self._story.extend(entries[: len(entries) - journal.story_appended])
        self._arrivals = journal.arrivals
        self._ready, self._fetch_queue, self._executing, self._transfers = self._indices()

    def _indices(self) -> tuple[list[QueueEntry], list[QueueEntry], set[str],
                                dict[str, frozenset[str]]]:
        """The ready queue, fetch queue, executing set and transfers, as ``units`` implies them."""
        units = self.units.values()
        ready = sorted((-u.priority, u.order, u.key) for u in units if u.state is READY)
        fetch = sorted((-u.priority, u.order, u.key) for u in units if u.state is FETCH)
        executing = {u.key for u in units if u.running is Work.EXECUTION}
        transfers: dict[str, frozenset[str]] = {}
        for u in units:
            if u.running is Work.TRANSFER and u.peer:
                transfers[u.peer] = transfers.get(u.peer, frozenset()) | {u.key}
        return ready, fetch, executing, transfers

    # --- invariants ----------------------------------------------------------

    def validate(self) -> None:
        """Raise AssertionError, naming the key, if any invariant does not hold."""
        # Imported here: worker_validate builds on this module (the checks read its internals).
        from actors.core.worker_validate import validate

        validate(self)


__all__ = [
    "ComputeUnit", "DataRequested", "Event", "Execute", "ExecuteFailed", "ExecuteSucceeded",
    "Fetch", "FetchFailed", "FetchSucceeded", "ForgetUnit", "Instruction", "KeepResult",
    "PeerBusy", "PeerLost",
    "PeerRetryDue", "ReleaseUnit", "RetryPeerLater", "Role", "SendData", "SendErred",
    "SendFinished", "SendMissing", "SendReleased", "SendStealResponse", "StealRequest",
    "StoryEntry", "Unit", "UnitSpec", "UnitState", "WhoHasUpdate", "Work", "WorkerState",
]
