"""The Worker actor's unit side: feeds the worker state machine and carries out what it says.

Not an actor of its own: it runs inside the Worker actor's mailbox. Every stimulus — a batch
from the scheduler, an execution that ended on the executor thread, data from a peer, a steal
request — reaches it as a message of that one mailbox, so ``WorkerState`` needs no lock.

Keys. The scheduler sends units in runs (batches). A run of independent units is one key,
``"<task>:run<id>"``: what a key costs in the state machine is paid once per batch,
which keeps tiny units fast. A unit that others may depend on (``keep``) or that depends on
others comes alone and is keyed by its index, ``"<task>:<index>"``, so that peers can ask for its
result by name. The driver's gathering of held results for ``reduce`` is a key too,
``"<task>:gather"``, whose dependencies are fetched like any unit's.

Data moves worker -> node -> node -> worker: a ``Fetch`` goes out as ``[b"p", address, holder,
DataRequest]`` to this worker's node, which relays it to the holder's node; the holder answers
``[b"r", origin, requester, *large values, DataReply]`` back along the same path (values of
``ATTACH_BYTES`` or more in frames of their own, named by ``DataReply.attached``).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, MutableMapping
from functools import partial
from typing import Any

import msgspec
import structlog

from actors import messages as m
from actors import task_output
from actors.core import worker_events as ev
from actors.core.worker_state import WorkerState
from actors.serialize import describe_failure, dumps, is_fatal, loads, not_serializable

log = structlog.get_logger("actors.worker")

# A transfer with no answer by then failed (its holder's node may be gone); a node's
# --fetch-timeout ($ACTORS_FETCH_TIMEOUT, which its workers inherit) sets it: a slow link.
FETCH_TIMEOUT_S = 10.0
FETCH_TIMEOUT_PER_KEY_S = 1.0  # and a second more for each further key it asks for
ATTACH_BYTES = 64 << 10  # a value this large travels as a frame of its own (DataReply.attached)
REPLY_BYTES = 64 << 20  # an answer to a request for many keys goes in replies of about this
GATHER = "gather"
KEPT_RUN = -2  # the run id of a unit result kept under its own key (no scheduler run names it)
EXECUTION_SLOTS = 1


def fetch_timeout() -> float:
    """Seconds a transfer may go unanswered: ``$ACTORS_FETCH_TIMEOUT`` (checked by the node
    that set it), else ``FETCH_TIMEOUT_S``."""
    try:
        seconds = float(os.environ.get("ACTORS_FETCH_TIMEOUT") or FETCH_TIMEOUT_S)
    except ValueError:
        return FETCH_TIMEOUT_S
    return seconds if seconds > 0 else FETCH_TIMEOUT_S


SendMaster = Callable[[m.Message], None]
SendFrames = Callable[[list[bytes]], None]
Submit = Callable[[Callable[[], None], str], None]  # (a call, the task whose code it runs)


def unit_key(task_id: str, index: int) -> str:
    return f"{task_id}:{index}"


def _of_task(key: str, task_id: str) -> bool:
    """Whether ``key`` is a unit key of ``task_id`` (``unit_key``)."""
    head, _, index = key.rpartition(":")
    return head == task_id and index.isdigit()


def run_key(task_id: str, run_id: int) -> str:
    return f"{task_id}:run{run_id}"


class _Run(msgspec.Struct, frozen=True):
    """The static calls the scheduler sent under one key, never changed (the core's UnitSpec
    names the key and its dependencies; what came of the calls is kept apart, in
    ``UnitRunner.outcomes``)."""

    task_id: str
    run_id: int
    units: tuple[m.UnitCall, ...]
    keep: bool  # keyed by its unit: its result stays here for dependents


# --- messages of the Worker actor's mailbox that the runner handles ------------


class Ran(msgspec.Struct, frozen=True):
    """The executor ran a key's units (sent from the executor thread)."""

    key: str
    outcomes: list[m.UnitOutcome]
    elapsed: float
    large: bool = False  # a result is larger than INLINE_RESULT_BYTES, or all past RUN_INLINE_BYTES


class Gather(msgspec.Struct, frozen=True):
    """The driver wants held results (unit index -> holders) for ``reduce``."""

    task_id: str
    holders: list[tuple[int, str, str]]
    reply: Callable[[dict[int, bytes]], None]
    sizes: dict[int, int] = msgspec.field(default_factory=dict)  # of the held results, where known


class RetryDue(msgspec.Struct, frozen=True):
    peer: str


class UnitRunner:
    """See the module docstring. ``instance`` is the task object whose ``work_unit`` runs."""

    def __init__(self, worker_id: str, send_master: SendMaster, send_frames: SendFrames,
                 submit: Submit, tell: Callable[[Any], None],
                 clock: Callable[[], float] = time.time, validate: bool = False,
                 data: MutableMapping[str, bytes] | None = None) -> None:
        self.worker_id = worker_id
        # One execution slot for the process's one executor thread: a run the thread has not
        # begun stays ``ready`` here, where the scheduler can still steal it for an idle worker.
        # (A cancelled execution keeps the slot until it reports; its result is dropped, as the
        # state machine says for cancelled keys.)
        # ``data``: where held results live (a SpillBuffer: in memory up to a target, the rest
        # on this worker's scratch disk).
        self.state = WorkerState(nthreads=EXECUTION_SLOTS, validate_after_handle=validate,
                                 data=data)
        self.runs: dict[str, _Run] = {}
        self.outcomes: dict[str, tuple[list[m.UnitOutcome], float]] = {}  # key -> (them, seconds)
        # A dependency's key -> (task, unit index): what a Missing report names, never parsed
        # back out of the key.
        self.dependencies: dict[str, tuple[str, int]] = {}
        self.instance: Any = None
        self.addresses: dict[str, str] = {}  # peer worker -> its node's data address
        self.origins: dict[str, bytes] = {}  # requesting peer -> its node (b"": ours)
        self.fetches: dict[tuple[str, str], float] = {}  # (key, peer) -> deadline
        self.fetch_timeout = fetch_timeout()
        self.gathers: dict[str, Gather] = {}
        self._send_master = send_master
        self._send_frames = send_frames
        self._submit = submit
        self._tell = tell
        self._clock = clock
        self.log = log.bind(worker_id=worker_id)

    # --- stimuli ------------------------------------------------------------

    def run_units(self, msg: m.RunUnits) -> None:
        task_id = msg.task_id
        single = len(msg.units) == 1 and (msg.units[0].keep or bool(msg.units[0].deps))
        if single:
            unit = msg.units[0]
            key = unit_key(task_id, unit.index)
            deps = tuple(unit_key(task_id, d) for d in unit.deps)
            for dep, index in zip(deps, unit.deps, strict=True):
                self.dependencies[dep] = (task_id, index)
        else:
            key, deps = run_key(task_id, msg.run_id), ()
        self.runs[key] = _Run(task_id, msg.run_id, tuple(msg.units), single)
        spec = ev.UnitSpec(key, task_id, b"", deps)
        holders = self._who_has(task_id, msg.holders)
        self.feed(ev.ComputeUnit(spec, holders, _sizes(task_id, msg.sizes),
                                 stimulus_id=f"run{msg.run_id}", now=self._clock()))

    def release(self, msg: m.ReleaseUnits) -> None:
        keys = [key for key, run in self.runs.items()
                if run.task_id == msg.task_id and run.run_id in msg.run_ids]
        now = self._clock()
        self.feed(*(ev.ReleaseUnit(key, stimulus_id="release", now=now) for key in keys))

    def steal(self, msg: m.StealUnits) -> None:
        key = self._key_of_run(msg.task_id, msg.run_id)
        if key is None:
            self._send_master(m.StealReply(msg.task_id, msg.run_id, False, "forgotten"))
            return
        self.feed(ev.StealRequest(key, stimulus_id=f"steal{msg.run_id}", now=self._clock()))

    def who_has(self, msg: m.WhoHas) -> None:
        for worker, address in msg.holders:
            self.addresses[worker] = address
        self.feed(ev.WhoHasUpdate(unit_key(msg.task_id, msg.index),
                                  tuple(worker for worker, _ in msg.holders),
                                  msg.size if msg.size >= 0 else None,
                                  stimulus_id="who-has", now=self._clock()))

    def peer_gone(self, peer: str) -> None:
        self.fetches = {pair: t for pair, t in self.fetches.items() if pair[1] != peer}
        self.feed(ev.PeerLost(peer, stimulus_id=f"{peer} gone", now=self._clock()))

    def ran(self, msg: Ran) -> None:
        run = self.runs.get(msg.key)
        now = self._clock()
        if run is None:
            return
        outcomes: list[m.UnitOutcome] = msg.outcomes
        kept: list[ev.Event] = []
        if msg.large and not run.keep:
            outcomes, kept = self._keep_large(run, outcomes, now)
        self.outcomes[msg.key] = (outcomes, msg.elapsed)
        failed = next((o for o in outcomes if not o.ok), None)
        if failed is not None:
            self.feed(*kept, ev.ExecuteFailed(msg.key, failed.value, failed.traceback,
                                              stimulus_id="executed", now=now))
        else:
            value = outcomes[0].value if run.keep else b""
            self.feed(*kept, ev.ExecuteSucceeded(msg.key, value, stimulus_id="executed", now=now))

    def _keep_large(self, run: _Run, outcomes: list[m.UnitOutcome],
                    now: float) -> tuple[list[m.UnitOutcome], list[ev.Event]]:
        """Results too large to go inline stay here under their unit's key (reported ``held``),
        for the driver to gather like a ``Unit(...)`` result; the rest go inline as ever."""
        kept: list[ev.Event] = []
        out: list[m.UnitOutcome] = []
        units = {unit.index: unit for unit in run.units}
        inline = 0  # and no more than RUN_INLINE_BYTES of them in all: the report stays small
        for outcome in outcomes:
            key = unit_key(run.task_id, outcome.index)
            size = len(outcome.value)
            if (outcome.ok and (size > m.INLINE_RESULT_BYTES or inline + size > m.RUN_INLINE_BYTES)
                    and outcome.index in units and self.state.can_keep(key)):
                kept.append(ev.KeepResult(key, run.task_id, outcome.value,
                                          stimulus_id=f"run{run.run_id} kept", now=now))
                self.runs[key] = _Run(run.task_id, KEPT_RUN, (units[outcome.index],), keep=True)
                outcome = m.UnitOutcome(outcome.index, True, b"", held=True,
                                        size=len(outcome.value), digest=outcome.digest,
                                        count=outcome.count)
            inline += len(outcome.value)
            out.append(outcome)
        return out, kept

    def data_requested(self, origin: bytes, msg: m.DataRequest) -> None:
        """A peer asks for results held here: only the units of the task it names are served
        (its node checked that the peer holds that task, node_data.DataPlane.holds)."""
        self.origins[msg.requester] = origin
        keys = tuple(key for key in msg.keys if _of_task(key, msg.task_id))
        self.feed(ev.DataRequested(keys, msg.requester,
                                   stimulus_id=f"request {msg.requester}", now=self._clock()))

    def data_arrived(self, msg: m.DataReply) -> None:
        now = self._clock()
        events: list[ev.Event] = []
        for key, data in msg.data:
            if self.fetches.pop((key, msg.holder), None) is not None:
                events.append(ev.FetchSucceeded(key, msg.holder, data,
                                                stimulus_id=f"data {msg.holder}", now=now))
        for key in msg.missing:
            if self.fetches.pop((key, msg.holder), None) is not None:
                events.append(ev.FetchFailed(key, msg.holder,
                                             stimulus_id=f"missing at {msg.holder}", now=now))
        self.feed(*events)

    def gather(self, msg: Gather) -> None:
        """Fetch held results for the driver's reduce, as dependencies of a gather key."""
        key = f"{msg.task_id}:{GATHER}"
        self.gathers[key] = msg
        holders = self._who_has(msg.task_id, msg.holders)
        deps = tuple(holders)
        for index, _, _ in msg.holders:  # a holder lost meanwhile: the master is asked (Missing)
            self.dependencies[unit_key(msg.task_id, index)] = (msg.task_id, index)
        self.runs[key] = _Run(msg.task_id, -1, (), keep=True)
        self.feed(ev.ComputeUnit(ev.UnitSpec(key, msg.task_id, b"", deps), holders,
                                 _sizes(msg.task_id, msg.sizes), stimulus_id="gather",
                                 now=self._clock()))

    def results_arrived(self, msg: m.DriverResults) -> None:
        """Results the driver got inline that its gather still waits to fetch (computed again
        after their holder was lost, small this time): the gather takes them from here."""
        gather = self.gathers.get(f"{msg.task_id}:{GATHER}")
        if gather is None or not msg.results:
            return
        now = self._clock()
        wanted = {index for index, _, _ in gather.holders}
        events: list[ev.Event] = []
        for index, data in msg.results:
            key = unit_key(msg.task_id, index)
            if index in wanted and key not in self.state.data and self.state.can_keep(key):
                events.append(ev.KeepResult(key, msg.task_id, data, stimulus_id="inline", now=now))
        self.feed(*events)

    def retry_due(self, msg: RetryDue) -> None:
        self.feed(ev.PeerRetryDue(msg.peer, stimulus_id="retry", now=self._clock()))

    def tick(self) -> None:
        """Fail transfers that got no answer (the holder's node may be gone)."""
        now = self._clock()
        late = [(key, peer) for (key, peer), deadline in self.fetches.items() if deadline <= now]
        for pair in late:
            del self.fetches[pair]
        self.feed(*(ev.FetchFailed(key, peer, stimulus_id="fetch timed out", now=now)
                    for key, peer in late))

    def forget_task(self, task_id: str) -> None:
        """The task ended: let go of every key of it (running work is cancelled, then dropped)."""
        if not self.runs and not self.gathers:
            return  # (a plain Task's end, on a worker that ran no units: nothing to let go of)
        now = self._clock()
        keys = [key for key, run in self.runs.items() if run.task_id == task_id]
        self.feed(*(ev.ForgetUnit(key, stimulus_id="task ended", now=now) for key in keys))
        self.gathers = {k: g for k, g in self.gathers.items() if g.task_id != task_id}

    def story(self, task_id: str) -> list[tuple[str, str, str, str, float]]:
        return [(key, str(start), str(finish), f"{self.worker_id}: {cause}", when)
                for key, start, finish, cause, when in self.state.story_of(f"{task_id}:")]

    # --- the loop: events in, instructions out, until none remain ---------

    def feed(self, *events: ev.Event) -> None:
        pending = list(events)
        while pending:
            instructions = self.state.handle(*pending)
            pending = []
            if len(instructions) > 1:
                # The executor thread first: it starts the next run while this one is reported.
                instructions.sort(key=_not_execute)
            for instruction in instructions:
                pending += self._carry_out(instruction)
        self._drop_forgotten()

    def _carry_out(self, ins: ev.Instruction) -> list[ev.Event]:
        now = self._clock()
        match ins:
            case ev.Execute(key=key, inputs=inputs):
                return self._execute(key, dict(inputs), now)
            case ev.Fetch(keys=keys, peer=peer):
                # Many keys take longer to arrive than one (their sizes are not known here).
                deadline = now + self.fetch_timeout + FETCH_TIMEOUT_PER_KEY_S * (len(keys) - 1)
                for key in keys:
                    self.fetches[(key, peer)] = deadline
                task_id = keys[0].rsplit(":", 1)[0]
                address = self.addresses.get(peer, "")
                self._send_frames([b"p", address.encode(), peer.encode(),
                                   m.encode(m.DataRequest(task_id, list(keys), self.worker_id))])
            case ev.RetryPeerLater(peer=peer, delay=delay):
                timer = threading.Timer(delay, self._tell, (RetryDue(peer),))
                timer.daemon = True
                timer.start()
            case ev.SendFinished(key=key) | ev.SendErred(key=key):
                return self._report(key, now)
            case ev.SendReleased(key=key):
                run = self.runs.get(key)
                if run is not None:
                    self._send_master(m.UnitsReleased(run.task_id, [run.run_id]))
                    return [ev.ForgetUnit(key, stimulus_id=ins.stimulus_id, now=now)]
            case ev.SendStealResponse(key=key, accepted=accepted, state=state):
                run = self.runs.get(key)
                if run is not None:
                    self._send_master(m.StealReply(run.task_id, run.run_id, accepted, str(state)))
                    if accepted:  # the scheduler takes it back: nothing of it is wanted here
                        return [ev.ForgetUnit(key, stimulus_id=ins.stimulus_id, now=now)]
            case ev.SendMissing(key=key) if key in self.dependencies:
                self._send_master(m.Missing(*self.dependencies[key]))
            case ev.SendData(peer=peer, data=data, missing=missing):
                origin = self.origins.get(peer, b"")
                for items, gone in _replies(list(data.items()), list(missing)):
                    inline = [(k, v) for k, v in items if len(v) < ATTACH_BYTES]
                    large = [(k, v) for k, v in items if len(v) >= ATTACH_BYTES]
                    reply = m.DataReply("", self.worker_id, inline, gone, [k for k, _ in large])
                    self._send_frames([b"r", origin, peer.encode(), *(v for _, v in large),
                                       m.encode(reply)])
            case _:
                raise TypeError(f"unknown instruction {ins!r}")
        return []

    def _execute(self, key: str, inputs: dict[str, bytes], now: float) -> list[ev.Event]:
        gather = self.gathers.pop(key, None)
        if gather is not None:  # no user code: hand the fetched results to the driver
            prefix = len(gather.task_id) + 1
            gather.reply({int(k[prefix:]): data for k, data in inputs.items()})
            return [ev.ExecuteSucceeded(key, b"", stimulus_id="gathered", now=now),
                    ev.ForgetUnit(key, stimulus_id="gathered", now=now)]
        run = self.runs[key]
        instance = self.instance
        tell = self._tell
        self._submit(partial(_execute_run, instance, key, run.units, run.task_id, inputs, tell),
                     run.task_id)
        return []

    def _report(self, key: str, now: float) -> list[ev.Event]:
        run = self.runs.get(key)
        if run is None or run.run_id < 0:
            return []
        outcomes, elapsed = self.outcomes.pop(key, ([], 0.0))
        if run.keep and not outcomes and key in self.state.data:
            # Asked to compute what is already here (computed before the scheduler lost track
            # of this worker, or fetched for a unit here): it is held here, not computed again.
            outcomes = [m.UnitOutcome(run.units[0].index, True, b"")]
        if run.keep and outcomes and outcomes[0].ok:
            # The result stays here for the units that depend on it; the master learns where,
            # and its size (so that those who fetch it can bound what is on its way).
            size = self.state.units[key].nbytes if key in self.state.units else None
            outcomes = [m.UnitOutcome(outcomes[0].index, True, b"", held=True, size=size or 0)]
        self._send_master(m.UnitsDone(run.task_id, run.run_id, outcomes, elapsed))
        if run.keep and outcomes and outcomes[0].ok:
            return []
        # Plain runs: the scheduler said, by sending them as a run, that it wants them once.
        return [ev.ForgetUnit(key, stimulus_id="reported", now=now)]

    def _who_has(self, task_id: str,
                 holders: list[tuple[int, str, str]]) -> dict[str, tuple[str, ...]]:
        """Dependency key -> the workers holding it; remembers where those workers' nodes are."""
        who_has: dict[str, tuple[str, ...]] = {}
        for index, worker, address in holders:
            self.addresses[worker] = address
            key = unit_key(task_id, index)
            who_has[key] = (*who_has.get(key, ()), worker)
        return who_has

    def _drop_forgotten(self) -> None:
        if len(self.runs) > len(self.state.units):
            self.runs = {k: r for k, r in self.runs.items() if k in self.state.units}
        if len(self.outcomes) > len(self.state.units):
            self.outcomes = {k: o for k, o in self.outcomes.items() if k in self.state.units}
        if len(self.dependencies) > len(self.state.units):
            self.dependencies = {k: d for k, d in self.dependencies.items() if k in self.state.units}

    def _key_of_run(self, task_id: str, run_id: int) -> str | None:
        key = run_key(task_id, run_id)
        if key in self.runs:
            return key
        return next((k for k, r in self.runs.items()
                     if r.task_id == task_id and r.run_id == run_id), None)


def _sizes(task_id: str, sizes: dict[int, int]) -> dict[str, int]:
    return {unit_key(task_id, index): size for index, size in sizes.items()}


def _replies(items: list[tuple[str, bytes]],
             missing: list[str]) -> list[tuple[list[tuple[str, bytes]], list[str]]]:
    """An answer to a request for many keys, cut into replies of at most ``REPLY_BYTES`` (one
    key each, at least): no message the size of everything asked for at once."""
    replies: list[tuple[list[tuple[str, bytes]], list[str]]] = []
    batch: list[tuple[str, bytes]] = []
    size = 0
    for key, data in items:
        if batch and size + len(data) > REPLY_BYTES:
            replies.append((batch, []))
            batch, size = [], 0
        batch.append((key, data))
        size += len(data)
    replies.append((batch, missing))
    return replies


def _not_execute(instruction: ev.Instruction) -> bool:
    return not isinstance(instruction, ev.Execute)


def _execute_run(instance: Any, key: str, units: tuple[m.UnitCall, ...], task_id: str,
                 inputs: dict[str, bytes], tell: Callable[[Any], None]) -> None:
    """On the executor thread: run the units, stop at the first failure, report once."""
    started = time.perf_counter()
    outcomes: list[m.UnitOutcome] = []
    digest = m.unit_digest
    large = False  # a result is too large to go inline (or all of them together, at the end)
    inline, inline_limit = 0, m.INLINE_RESULT_BYTES
    task_output.enter(task_id, "work_unit")
    try:
        work_unit = instance.work_unit
        stop = getattr(instance, "_task_stop", None)
        for unit in units:
            if stop is not None and stop.is_set():
                break  # cancelled: the rest of the run does not begin (its key is forgotten)
            task_output.at_unit(unit.index)
            index = unit.index
            try:
                if unit.count:  # a pack: its arguments one list, its results one list
                    value, stopped = [], False
                    for arg in loads(unit.args):
                        if stop is not None and stop.is_set():
                            stopped = True  # cancelled: the pack stops between two units
                            break
                        task_output.at_unit(index)
                        value.append(work_unit(arg))
                        index += 1
                    if stopped:
                        break  # (the run's key is forgotten: nothing to report of it)
                    index = unit.index
                elif unit.deps:
                    value = work_unit(loads(unit.args),
                                      *[loads(inputs[unit_key(task_id, d)]) for d in unit.deps])
                else:  # most units: no list of inputs to build (a comprehension is a call)
                    value = work_unit(loads(unit.args))
                try:
                    data = dumps(value)
                except Exception as exc:
                    if unit.count:  # the result that cannot travel, and its unit
                        index, value = _unpicklable(value, index)
                    raise not_serializable(value, exc, f"{type(instance).__qualname__} {task_id}",
                                           str(index)) from None
                outcomes.append(m.UnitOutcome(unit.index, True, data, digest=digest(unit),
                                              count=unit.count))
                size = len(data)
                inline += size
                if size > inline_limit:
                    large = True
            except BaseException as exc:
                payload, type_name, message, text = describe_failure(exc)
                outcomes.append(m.UnitOutcome(unit.index, False, payload, type_name, message, text,
                                              fatal=is_fatal(exc), count=unit.count,
                                              unit=index if unit.count else -1))
                break  # the task fails; the rest of the run would be wasted
    finally:
        task_output.leave()
        tell(Ran(key, outcomes, time.perf_counter() - started,
                 large or inline > m.RUN_INLINE_BYTES))


def _unpicklable(values: list[Any], first: int) -> tuple[int, Any]:
    """Of a pack's results, which does not pickle, and its unit's index (the whole list, and
    the pack's first index, if each does alone)."""
    for offset, value in enumerate(values):
        try:
            dumps(value)
        except Exception:
            return first + offset, value
    return first, values
