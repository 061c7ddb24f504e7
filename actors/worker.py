"""A worker process: the Worker actor and the task instance it hosts.

Started blank by its node, a worker talks only to that node over ipc (it
opens no TCP socket). The master assigns it one task instance at a time
(short plain Tasks of the same submitter may wait in line behind it: behind a
plain Task they are begun at once, their work queued on the executor in order,
so that one task's work follows the last without a round trip through this
mailbox; each reports and is let go as it finishes). The instance occupies the
actor's one slot, whose state (``core/worker_slot.py``: idle, loading, hosting,
helping, driving, failed) says what the actor holds and what it does with each
message: the Worker actor unpickles (or imports) the task class, makes the
instance (a ParallelTask's driver held by an actor of its own, anything else in
this actor's mailbox, see ``task_host.py``) and passes it its input; what the
task emits goes back through this actor's outbox. After a task returns, or
raises an ordinary exception, the worker stays, warm, for the same submitter's
next task; after a fatal error (SystemExit, MemoryError, a task that would not
load), a cancel or a lost worker, its node kills it. A plain Task's worker
forgets the instance as soon as its outcome is sent: the master releases it
without a message.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import os
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pykka
import structlog

from actors import __version__, free_pools, logs, memory, task_output
from actors import messages as m
from actors.contain import TOKEN_ENV, TOKEN_ON_STDIN
from actors.core.worker_slot import (
    DRIVING,
    FAILED,
    HELPING,
    HOLDS_INSTANCE,
    HOSTING,
    IDLE,
    LOADING,
    SLOT_TEXT,
    Slot,
    WorkerSlot,
)
from actors.errors import InputFailed, InputLost, InvalidArguments, MalformedMessage
from actors.inputs import resolving
from actors.memory import sealed_file
from actors.node_data import DATA_MARK, RESULTS_HOLDER
from actors.package_store import import_deployed
from actors.serialize import describe_exception, loads, loads_parts
from actors.shell import HubShell, Inbound, Tick, direct_to, tell_if_alive
from actors.spill import RESUME_FRACTION, SpillBuffer, pause_mark, spill_target
from actors.task import ParallelTask, Task, check_arguments, mark_worker
from actors.task_host import (
    Begin,
    Finished,
    HeldParts,
    Runtime,
    UnitResults,
    begin_instance,
    host_instance,
    request_stop,
    run_in_executor,
    start_driver,
    when_not_running,
)
from actors.unit_runner import Gather, Ran, RetryDue, UnitRunner
from transport import Hub

log = structlog.get_logger("actors.worker")

NODE = "node"
TO_MASTER = b"m"
# A turn's plain Tasks' ends go as one TaskResults (Worker.send_results): at most this many,
# each of at most GATHERED_RESULT_BYTES (a larger one goes alone), all of them at most
# MAX_RESULTS_BYTES: far below the least bound a master sets on a message (64 MiB), which a
# node enforces by failing the one task a message names.
MAX_RESULTS_OUT = 256
GATHERED_RESULT_BYTES = 64 << 10
MAX_RESULTS_BYTES = 1 << 20
# ... and while more plain Tasks are lined up on the executor (their ends come soon when they
# are short), what ended waits for them this long at most, even past its turn.
HOLD_RESULTS_S = 0.001
TO_NODE = b"n"
HOLD_RESULT = b"h"  # [b"h", task_id, *parts]: a large result, for the node to hold
HOLD_FILE = b"f"  # [b"f", HeldFile]: a large result in a sealed memory file, for the node
TO_PEER = b"p"  # [b"p", address, holder, request]: for a holder on the node at that address
_DATA = (m.DataRequest, m.DataReply, m.InputData)  # come only after the data plane's mark
INPUT_WAIT_S = 120.0  # a task's large inputs come within this, or it fails with InputLost


@dataclass
class _HandOver:
    """A result file offered to the node, until it answers: the descriptor is kept open (the
    node opens the file through it), and the parts and what follows wait with it."""

    fd: int
    parts: list[Any]
    after: list[m.Message] = field(default_factory=list)


class Outgoing(msgspec.Struct, frozen=True):
    """A message the task instance wants sent to the master (or a result for the node)."""

    message: m.Message | HeldParts


class ResultsDue(msgspec.Struct, frozen=True):
    """The gathered ends held for the next task's end have waited HOLD_RESULTS_S."""


class FlushOutput(msgspec.Struct, frozen=True):
    """What task code printed or logged is waiting to be sent (from task_output's timer)."""


class CodeStopped(msgspec.Struct, frozen=True):
    """No code of this cancelled task runs on the executor any more (from ``when_not_running``)."""

    task_id: str


STOPPED_KEPT = 256  # cancelled tasks remembered, so that what their code still sends is dropped


class ForHosted(msgspec.Struct, frozen=True):
    """Input for the task instance that lives in this actor's mailbox (from the executor)."""

    task_id: str
    message: Any


def _result_bytes(result: m.TaskResult) -> int:
    """About what a task's end takes encoded (its value, or its error's parts)."""
    o = result.outcome
    return len(result.task_id) + len(o.value) + len(o.type_name) + len(o.message) + len(o.traceback)


class Worker(HubShell):
    def __init__(self, hub: Hub, worker_id: str, on_exit: Any, node_pid: int | None = None,
                 token: str = "") -> None:
        super().__init__(hub)
        self.worker_id = worker_id
        self.token = token  # what proves to the node that we are its worker of this id
        self.slot = WorkerSlot()
        # What the slot holds, by its state (checked by _validate_slot):
        self.waiting: m.AssignTask | None = None  # LOADING: the assignment waiting to load,
        self.backlog: list[Any] = []  # and the task input that came meanwhile
        self.hosted: Runtime | None = None  # HOSTING, HELPING: the instance in this mailbox
        self.driver: pykka.ActorRef[Any] | None = None  # DRIVING: the driver's own actor
        # HOSTING: plain Tasks queued behind it and already handed to the executor, in order.
        self.lined_up: dict[str, Runtime] = {}
        self.handing: dict[str, _HandOver] = {}  # result files offered to the node, unanswered
        self.pause_mark = pause_mark()  # resident bytes past which we take no new work (0: none)
        self.paused = False
        self.assignments: deque[m.AssignTask] = deque()  # tasks queued behind it, not begun
        self.results_out: list[m.TaskResult] = []  # this turn's plain Tasks' ends, not yet sent
        self.results_bytes = 0  # (about) what they take
        self.results_since = 0.0  # when the first of them was gathered (monotonic)
        self.results_due = False  # a ResultsDue is on its way
        self.stopped: dict[str, None] = {}  # cancelled tasks (StopTask), oldest first
        # LOADING: held inputs of the waiting assignment that came (task id -> data, lengths),
        # and the version folder it loads from once they all have.
        self.input_data: dict[str, tuple[bytes, list[int]]] = {}
        self.input_path: str | None = None
        self.inputs_by = 0.0  # when waiting for them ends (monotonic): the task fails then
        self.runner: UnitRunner | None = None
        self.classes: dict[str, Any] = {}  # shipped code's hash -> class, for warm reuse
        self.loaded_version: tuple[str, str] | None = None
        self.loaded_path = ""  # that version's folder
        # The node's pid from its command line: a node that died while this process was still
        # importing has already left it to init, and getppid() here would never change again.
        self.parent_pid = node_pid or os.getppid()
        self._on_exit = on_exit
        # The test suite checks every invariant after every message, in real workers too.
        self.validate = os.environ.get("ACTORS_VALIDATE_STATE") == "1"
        self.log = log.bind(role="worker", worker_id=worker_id)
        self.debug = logs.debug_enabled(self.log)  # (per-task lines at debug: asked once)

    def on_start(self) -> None:
        super().on_start()
        outbox = self.outbox
        assert outbox is not None
        self.runner = UnitRunner(
            self.worker_id,
            send_master=self._to_master,
            send_frames=lambda frames: outbox.send(NODE, frames),
            submit=run_in_executor,
            tell=self.actor_ref.tell,
            validate=self.validate,
            data=SpillBuffer(os.path.join(tempfile.gettempdir(), "held"), spill_target()),
        )
        self.send(NODE, TO_NODE, message=m.Hello(role="worker", peer_id=self.worker_id,
                                                 protocol=m.PROTOCOL_VERSION, version=__version__,
                                                 pid=os.getpid(), token=self.token))

    def on_stop(self) -> None:
        if self.results_out:  # (ends gathered in a turn a stop cut short)
            self.send_results()
        self.lined_up.clear()
        self.assignments.clear()
        self._stop_task()
        super().on_stop()

    def on_crash(self) -> None:
        self._on_exit("worker actor crashed")

    def check_state(self) -> None:
        if self.runner is not None:
            self.runner.state.validate()
        self._validate_slot()

    def receive(self, message: Any) -> Any:
        self._receive(message)
        if self.results_out and self.actor_inbox.empty():
            self._results_turn_over()
        if self.validate:
            self._validate_slot()

    def _receive(self, message: Any) -> None:
        match message:
            case Outgoing(message=msg):
                self._to_master(msg)
            case ResultsDue():
                self.results_due = False
                if self.results_out:
                    self.send_results()
            case FlushOutput():
                for out in task_output.drain():
                    self.send(NODE, TO_MASTER, message=out)
            case ForHosted(task_id=task_id, message=msg):
                self._hosted_says(task_id, msg)
            case CodeStopped(task_id=task_id):
                self.log.info("task_stopped", task_id=task_id)
                # What its finally: blocks printed goes first: the master forwards a stopping
                # worker's output only until TaskStopped.
                for out in task_output.drain():
                    self.send(NODE, TO_MASTER, message=out)
                self.send(NODE, TO_MASTER, message=m.TaskStopped(task_id))
            case Ran():
                self._runner.ran(message)
            case Gather():
                self._runner.gather(message)
            case RetryDue():
                self._runner.retry_due(message)
            case Inbound(peer=origin, message=m.DataRequest() as request):
                self._runner.data_requested(origin, request)
            case Inbound(message=msg):
                self._from_node(msg)
            case Tick():
                waiting = self.waiting
                if (waiting is not None and waiting.driver and waiting.held_inputs
                        and time.monotonic() > self.inputs_by):
                    missing = next(i for i, _ in waiting.held_inputs if i not in self.input_data)
                    self._fail_input(waiting, InputLost(waiting.task_id, missing, "no answer from "
                                                        "the node that holds it in time"))
                if os.getppid() != self.parent_pid:
                    self.log.warning("node_gone")
                    self._on_exit("node gone")
                self._runner.tick()
                self._check_memory()
            case _:
                raise TypeError(f"worker got an unknown message: {message!r}")

    def _from_node(self, msg: m.Message) -> None:
        task_id = self.slot.task_id
        match msg:
            case m.Welcome():
                pass
            case m.AssignTask() if self.slot.state is IDLE:
                self._start(msg)
            case m.AssignTask():
                # A task the master queued behind this one (prefetch): next in line.
                if (self.slot.state is HOSTING and msg.kind == "task" and not self.assignments
                        and not msg.held_inputs
                        and (self._imported(msg) if msg.package else self._has_code(msg))):
                    self._line_up(msg)
                else:
                    self.assignments.append(msg)
            case m.AssignTasks(tasks=tasks):
                for assign in tasks:
                    self._from_node(assign)
            case m.Code(code_hash=code_hash, code=code) if (
                    self.waiting is not None and self.waiting.code_hash == code_hash
                    and not self.waiting.package):  # LOADING shipped code
                self._assign(msgspec.structs.replace(self.waiting, code=code), None, self.backlog)
            case m.Code():
                self.log.debug("code_not_waited_for")
            case m.VersionAvailable() if self.waiting is not None and self.waiting.package:
                assign, backlog = self.waiting, self.backlog  # LOADING a deployed version
                if msg.ok:
                    self._assign(assign, msg.path, backlog)
                else:
                    self._fail_load(assign, RuntimeError(
                        f"package {msg.package} version {msg.version} unavailable: {msg.reason}"))
            case m.RunUnits() if msg.task_id == task_id:
                self._to_task(msg)
            case m.ReleaseUnits() if msg.task_id == task_id:
                self._runner.release(msg)
            case m.StealUnits():
                self._runner.steal(msg)
            case m.TakeBackTask(task_id=taken):
                self._take_back(taken)
            case m.WhoHas():
                self._runner.who_has(msg)
            case m.PeerGone(worker_id=peer):
                self._runner.peer_gone(peer)
            case m.DataReply():
                self._runner.data_arrived(msg)
            case m.WorkerStoryRequest():
                self.send(NODE, TO_MASTER,
                          message=m.WorkerStory(msg.task_id, self._runner.story(msg.task_id)))
            case m.HeldFileTaken():
                self._handed(msg)
            case m.InputData():
                self._input_arrived(msg)
            case m.DriverResults(results=results, held=held, sizes=sizes,
                                 pack=pack) if msg.task_id == task_id:
                self._runner.results_arrived(msg)
                self._to_task(UnitResults(results, held, sizes, pack))
            case m.StopTask():
                self._stop_cancelled(msg)
            case m.ReleaseTask() if msg.task_id == task_id or msg.task_id in self.lined_up:
                self._release(msg.task_id)
            case m.ReleaseTask():  # it never began here: it failed to load
                self.log.debug("release_of_unloaded_task", task_id=msg.task_id)
            case _:
                self.log.warning("unexpected_message", type=type(msg).__name__)

    def _to_master(self, msg: m.Message | HeldParts) -> None:
        """Send what a task or its units produced; what their code printed or logged goes first,
        so that a client has a task's output before its result."""
        for out in task_output.drain():
            self.send(NODE, TO_MASTER, message=out)
        if getattr(msg, "task_id", None) in self.stopped:
            return  # the task was cancelled: what its code still produced is moot
        if self.paused and isinstance(msg, m.TaskResult):
            # Paused while the task's objects lived: they are gone now, and what they took may
            # come back. Said before the result, or the master replaces us as idle and past
            # the mark before we could.
            self._check_memory()
        if isinstance(msg, HeldParts):  # a large result in parts: for our node to hold
            self._hold(msg.task_id, list(msg.parts))
            return
        if (isinstance(msg, m.TaskResult) and msg.outcome.ok
                and len(msg.outcome.value) > m.INLINE_RESULT_BYTES):
            # Large: it waits on our node for the client, and the master learns only where.
            value = msg.outcome.value
            self._hold(msg.task_id, [value])
            msg = m.TaskResult(msg.task_id, m.UnitOutcome(
                msg.outcome.index, True, b"", held=True, size=len(value)), msg.elapsed)
        if isinstance(msg, m.TaskResult) and msg.task_id in self.handing:
            self.handing[msg.task_id].after.append(msg)  # once the node has taken the result
            return
        if type(msg) is m.TaskResult and (
                self.lined_up or self.results_out or not self.hub.lone()) and (
                size := _result_bytes(msg)) <= GATHERED_RESULT_BYTES:
            if self.results_bytes + size > MAX_RESULTS_BYTES:
                self.send_results()
            if not self.results_out:
                self.results_since = time.monotonic()
            self.results_out.append(msg)  # with the turn's others (see send_results)
            self.results_bytes += size
            if len(self.results_out) >= MAX_RESULTS_OUT:
                self.send_results()
            return
        self.send(NODE, TO_MASTER, message=msg)

    def send(self, socket: str, *route: bytes, message: m.Message | None = None,
             frames: list[bytes] | None = None) -> None:
        if self.results_out:  # (nothing said after a task's end may overtake it)
            self.send_results()
        super().send(socket, *route, message=message, frames=frames)

    def _results_turn_over(self) -> None:
        """At a turn's end, the ends it gathered go; unless the next plain Task runs on the
        executor already and they have not waited HOLD_RESULTS_S: then they wait for its end
        too (a burst's ends came one a turn, the executor a task ahead of this mailbox: a
        message each through the node and the master), and a ResultsDue sends them if it
        takes longer."""
        if self.slot.state is not HOSTING or (
                time.monotonic() - self.results_since >= HOLD_RESULTS_S):
            self.send_results()
        elif not self.results_due:
            self.results_due = True
            me = self.actor_ref
            self.hub.call_at(self.results_since + HOLD_RESULTS_S,
                             lambda: tell_if_alive(me, ResultsDue()))

    def send_results(self) -> None:
        """The plain Tasks' ends gathered, as one message: at the turn's end (or a moment
        after: _results_turn_over), or before anything else goes out. A burst's tasks end many
        a turn (a worker runs up to MAX_QUEUED_TASKS lined up); one message for them costs the
        node's relay and the master one decode and hand-off instead of one each."""
        results, self.results_out, self.results_bytes = self.results_out, [], 0
        message = results[0] if len(results) == 1 else m.TaskResults(results)
        super().send(NODE, TO_MASTER, message=message)

    def _check_memory(self) -> None:
        """Past the pause mark: what we hold goes to disk and freed memory back to the system
        (the C allocator's free pages, and the small-object allocator's free pools that a few
        survivors of a task's objects keep resident); still past it, the master sends us no
        new work until we are back below (the work queued here goes on, or to idle peers that
        steal it)."""
        mark = self.pause_mark
        if not mark:
            return
        if self.paused:
            free_pools.release()
            memory.trim()
        rss = memory.rss_bytes()
        if not self.paused and rss > mark:
            held = self._runner.state.data
            moved = held.spill_all() if isinstance(held, SpillBuffer) else 0
            released = free_pools.release()
            memory.trim()
            rss = memory.rss_bytes()
            if rss > mark:
                self.paused = True
                self.log.warning("worker_paused", rss_mb=rss >> 20, mark_mb=mark >> 20,
                                 spilled_mb=moved >> 20, task_id=self.slot.task_id)
                self.send(NODE, TO_MASTER, message=m.WorkerPaused(True, rss, mark))
            else:
                self.log.info("worker_memory_given_back", rss_mb=rss >> 20, mark_mb=mark >> 20,
                              spilled_mb=moved >> 20, free_pools_mb=released >> 20)
        elif self.paused and rss < mark * RESUME_FRACTION:
            self.paused = False
            self.log.info("worker_resumed", rss_mb=rss >> 20, mark_mb=mark >> 20)
            self.send(NODE, TO_MASTER, message=m.WorkerPaused(False, rss, mark))

    def _hold(self, task_id: str, parts: list[Any]) -> None:
        """Hand our node a large result: in a sealed memory file it opens itself (one copy, and
        none through the socket), or as frames (sent uncopied) where that cannot be had."""
        made = sealed_file(parts, "pydra-result")
        if made is None:
            self.send(NODE, HOLD_RESULT, task_id.encode(), frames=parts)
            return
        fd, nonce = made
        self.handing[task_id] = _HandOver(fd, parts)
        lengths = [memoryview(part).nbytes for part in parts]
        self.send(NODE, HOLD_FILE, message=m.HeldFile(task_id, fd, nonce, lengths))

    def _handed(self, msg: m.HeldFileTaken) -> None:
        """The node took the result file (or could not: then the bytes go); the TaskResult
        that says it is held follows."""
        handing = self.handing.pop(msg.task_id, None)
        if handing is None:
            return
        os.close(handing.fd)
        if not msg.ok:
            self.log.info("result_file_refused", task_id=msg.task_id, reason=msg.reason)
            self.send(NODE, HOLD_RESULT, msg.task_id.encode(), frames=handing.parts)
        for after in handing.after:
            self.send(NODE, TO_MASTER, message=after)

    def _to_task(self, message: Any) -> None:
        """Input for the current task instance (units to run, results to reduce)."""
        match self.slot.state:
            case Slot.HOSTING | Slot.HELPING | Slot.DRIVING if isinstance(message, m.RunUnits):
                self._runner.run_units(message)
            case Slot.DRIVING:
                assert self.driver is not None
                # A driver whose own code crashed has stopped (Driver.on_failure fails its task)
                # before that news reaches this mailbox: what comes for it meanwhile is moot.
                tell_if_alive(self.driver, message)
            case Slot.HOSTING | Slot.HELPING:
                assert self.hosted is not None
                self.hosted.handle(message)
            case Slot.LOADING:
                self.backlog.append(message)
            case Slot.FAILED:
                pass  # the task failed to load and was reported; its input is moot
            case _:
                raise TypeError(f"task input {message!r} with the slot {self.slot.state}")

    # --- the slot: one task instance at a time ----------------------------------

    def _set_slot(self, finish: Slot, task_id: str = "") -> None:
        """The one way the slot's state changes (checked against worker_slot.TRANSITIONS)."""
        start = self.slot.state
        why = self.slot.move(finish, task_id)
        if self.debug:
            self.log.debug("slot_changed", task_id=task_id, start=SLOT_TEXT[start],
                           finish=SLOT_TEXT[finish], why=why)

    def _start(self, msg: m.AssignTask) -> None:
        """The next task: begun at once if its code is here, or once it has come."""
        if not msg.package:
            if self._has_code(msg):
                self._assign(msg, None)
                return
            # Named by its hash alone, and no longer here: the master sends it again.
            self._wait_for(msg)
            self.send(NODE, TO_MASTER, message=m.NeedCode(msg.task_id, msg.code_hash))
            return
        if self._imported(msg):
            self._assign(msg, self.loaded_path)
            return
        # A deployed task: the node makes its version available first.
        self._wait_for(msg)
        self.send(NODE, TO_NODE, message=m.NeedVersion(msg.package, msg.version))

    def _wait_for(self, msg: m.AssignTask) -> None:
        self.waiting, self.backlog = msg, []
        self._set_slot(LOADING, msg.task_id)

    def _assign(self, msg: m.AssignTask, version_path: str | None,
                backlog: list[Any] | None = None) -> None:
        """Make the instance (IDLE or LOADING before) and begin it; then the input it missed."""
        if msg.driver and any(i not in self.input_data for i, _ in msg.held_inputs):
            self._fetch_inputs(msg, version_path, backlog)
            return
        self.waiting, self.backlog = None, []
        try:
            cls, args, kwargs = self._load(msg, version_path)
            instance = host_instance(cls)
            driver = start_driver(instance) if msg.driver and msg.kind == "parallel" else None
        # Not the code's fault, nor this process's (InputFailed: an item of a batched map among
        # the arguments raised, inputs.item_of).
        except (InputLost, InputFailed, InvalidArguments) as exc:
            self._fail_input(msg, exc)
            return
        except Exception as exc:
            self._fail_load(msg, exc)
            return
        if self.debug:
            self.log.debug("task_loaded", task_id=msg.task_id, task=msg.name, driver=msg.driver)
        self._runner.instance = instance
        if driver is not None:
            self.driver = driver
            self._set_slot(DRIVING, msg.task_id)
            me = self.actor_ref
            driver.tell(Begin(msg.task_id, args, kwargs, msg.driver,
                              lambda out: me.tell(Outgoing(out)), me.tell))
        else:
            self._set_slot(HOSTING if msg.kind == "task" else HELPING, msg.task_id)
            self.hosted = self._begin_hosted(msg, instance, args, kwargs)
        for message in backlog or ():
            self._to_task(message)

    def _load(self, msg: m.AssignTask, version_path: str | None) -> tuple[Any, tuple[Any, ...],
                                                                           dict[str, Any]]:
        """The task's class and its checked arguments; raises what makes the task unloadable."""
        cls = self._class_of(msg) if version_path is None else self._import_deployed(
            msg, version_path)
        loaders: dict[str, Callable[[], Any]] = {
            input_id: functools.partial(loads, data) for input_id, data in msg.inputs
        } if msg.inputs else {}
        for input_id, _ in msg.held_inputs:
            found = self.input_data.pop(input_id, None)
            if found is not None:
                loaders[input_id] = functools.partial(_loads_held, *found)
        args, kwargs = resolving(msg.task_id, loaders, functools.partial(loads, msg.args),
                                 placeholders=not msg.driver)
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"{cls!r} is not a Task subclass")
        if (msg.kind == "parallel") != issubclass(cls, ParallelTask):
            raise TypeError(f"{cls.__qualname__} was submitted as kind {msg.kind!r}")
        check_arguments(cls, args, kwargs)
        return cls, args, kwargs

    def _begin_hosted(self, msg: m.AssignTask, instance: Task, args: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> Runtime:
        me, task_id = self.actor_ref, msg.task_id
        return begin_instance(
            instance,
            Begin(task_id, args, kwargs, msg.driver,
                  self._to_master, me.tell),
            lambda message: me.tell(ForHosted(task_id, message)))

    def _fetch_inputs(self, msg: m.AssignTask, version_path: str | None,
                      backlog: list[Any] | None) -> None:
        """Ask the nodes that hold the task's large inputs for them; it loads once they came."""
        if self.slot.state is not LOADING:
            self._wait_for(msg)
        self.waiting, self.backlog, self.input_path = msg, list(backlog or []), version_path
        self.inputs_by = time.monotonic() + INPUT_WAIT_S
        for input_id, address in msg.held_inputs:
            if input_id not in self.input_data:
                self.send(NODE, TO_PEER, address.encode(), RESULTS_HOLDER,
                          message=m.InputRequest(input_id, self.worker_id))

    def _input_arrived(self, msg: m.InputData) -> None:
        waiting = self.waiting
        if waiting is None or not waiting.driver or msg.task_id not in dict(waiting.held_inputs):
            return  # for a task let go of meanwhile
        if msg.reason:
            self._fail_input(waiting, InputLost(waiting.task_id, msg.task_id, msg.reason))
            return
        self.input_data[msg.task_id] = (msg.data, msg.lengths)
        if all(i in self.input_data for i, _ in waiting.held_inputs):
            self._assign(waiting, self.input_path, self.backlog)

    def _fail_input(self, msg: m.AssignTask, exc: BaseException) -> None:
        """An input could not be had, or the arguments do not fit the task's code (a deployed
        task's, which the client could check only by name): the task fails, not the worker
        (it serves on), nor the module (it loaded)."""
        self.log.info("task_input_lost" if isinstance(exc, InputLost | InputFailed)
                      else "task_arguments_refused",
                      task_id=msg.task_id, error=str(exc))
        self.input_data.clear()
        self._stop_task()
        payload, type_name, text, tb = describe_exception(exc)
        self.send(NODE, TO_MASTER, message=m.TaskResult(
            msg.task_id, m.UnitOutcome(-1, False, payload, type_name, text, tb)))
        if self.assignments:
            self._start(self.assignments.popleft())

    def _imported(self, msg: m.AssignTask) -> bool:
        """A deployed task of the version this worker imported already: no need to ask the node
        for it again (the node counts this worker as that version's user until it exits)."""
        return (self.loaded_version == (msg.package, msg.version)
                and msg.package in sys.modules)

    def _line_up(self, msg: m.AssignTask) -> None:
        """A plain Task queued behind the plain Task running here: begun now, so the executor
        goes from one task's work to the next without waiting for this mailbox in between."""
        try:
            cls, args, kwargs = self._load(msg, self.loaded_path if msg.package else None)
            instance = host_instance(cls)
        except InvalidArguments as exc:  # that task fails; the one running here goes on
            self.log.info("task_arguments_refused", task_id=msg.task_id, error=str(exc))
            payload, type_name, text, tb = describe_exception(exc)
            self.send(NODE, TO_MASTER, message=m.TaskResult(
                msg.task_id, m.UnitOutcome(-1, False, payload, type_name, text, tb)))
            return
        except Exception as exc:
            self._fail_load(msg, exc, current=False)
            return
        self.lined_up[msg.task_id] = self._begin_hosted(msg, instance, args, kwargs)

    def _take_back(self, task_id: str) -> None:
        """The master wants a task queued here behind one that runs long: given back unless it
        has begun (the current task, or one whose work the executor took up)."""
        runtime = self.lined_up.get(task_id)
        accepted = False
        if runtime is not None and runtime.withdraw():
            del self.lined_up[task_id]
            accepted = True
        elif any(a.task_id == task_id for a in self.assignments):
            self.assignments = deque(a for a in self.assignments if a.task_id != task_id)
            accepted = True
        self.log.debug("task_take_back", task_id=task_id, accepted=accepted)
        self.send(NODE, TO_MASTER, message=m.TakeBackReply(task_id, accepted))

    def _hosted_says(self, task_id: str, msg: Any) -> None:
        """News from the executor for a hosted instance: the current one or one lined up."""
        current = task_id == self.slot.task_id
        runtime = self.hosted if current else self.lined_up.get(task_id)
        if runtime is None:
            return  # let go of meanwhile (released): its news is moot
        runtime.handle(msg)
        plain = self.slot.state is HOSTING if current else True
        if plain and isinstance(msg, Finished) and not msg.outcome.fatal:
            self._release(task_id)

    @property
    def _runner(self) -> UnitRunner:
        assert self.runner is not None, "used before on_start()"
        return self.runner

    def _has_code(self, msg: m.AssignTask) -> bool:
        return bool(msg.code) or msg.code_hash in self.classes

    def _class_of(self, msg: m.AssignTask) -> Any:
        """Unpickle shipped code once per worker: a warm worker is assigned the same code again,
        and shipped code comes by its hash alone once this worker has it."""
        key = msg.code_hash or hashlib.sha256(msg.code).hexdigest()
        cls = self.classes.get(key)
        if cls is None:
            cls = loads(msg.code)
            if len(self.classes) >= m.WORKER_CLASSES:
                self.classes.pop(next(iter(self.classes)))
            self.classes[key] = cls
        return cls

    def _fail_load(self, msg: m.AssignTask, exc: BaseException, current: bool = True) -> None:
        """The task would not load: reported as fatal (a failed import may leave half a package
        in sys.modules: this worker serves no more). The current one leaves the slot FAILED."""
        self.log.warning("task_load_failed", task_id=msg.task_id, task=msg.name, error=repr(exc))
        if current:
            self.waiting, self.backlog = None, []
            self._set_slot(FAILED, msg.task_id)
        payload, type_name, text, tb = describe_exception(exc)
        self.send(NODE, TO_MASTER, message=m.WorkerFailed(
            msg.task_id, m.UnitOutcome(-1, False, payload, type_name, text, tb, fatal=True)))

    def _import_deployed(self, msg: m.AssignTask, version_path: str) -> Any:
        """A deployed task's class; one worker process never imports two versions of a package."""
        if self.loaded_version not in (None, (msg.package, msg.version)):
            raise RuntimeError("this worker already imported another version of the package")
        self.loaded_version = (msg.package, msg.version)
        self.loaded_path = version_path
        return import_deployed(msg.package, version_path, msg.name)

    def _stop_cancelled(self, msg: m.StopTask) -> None:
        """The task was cancelled: its code is asked to stop (``request_stop``), its queued
        input and units are dropped, and once none of its code runs, ``TaskStopped`` says so.
        The master kills this process if that takes longer than ``msg.grace``."""
        task_id = msg.task_id
        self.stopped[task_id] = None
        if len(self.stopped) > STOPPED_KEPT:
            del self.stopped[next(iter(self.stopped))]
        instances = [runtime.task for runtime in (self.hosted, self.lined_up.get(task_id))
                     if runtime is not None and runtime.begin_msg.task_id == task_id]
        if self.slot.task_id == task_id and self._runner.instance is not None:
            instances.append(self._runner.instance)  # a driver's, or a helper's
        for instance in instances:
            request_stop(instance)
        self.log.info("task_stop_requested", task_id=task_id, grace=msg.grace,
                      running=bool(instances))
        if any(a.task_id == task_id for a in self.assignments):
            self.assignments = deque(a for a in self.assignments if a.task_id != task_id)
        if task_id == self.slot.task_id or task_id in self.lined_up:
            self._release(task_id)
        me = self.actor_ref
        when_not_running(task_id, lambda: me.tell(CodeStopped(task_id)))

    def _release(self, task_id: str) -> None:
        if self.debug:
            self.log.debug("task_released", task_id=task_id)
        if self.lined_up.pop(task_id, None) is not None:
            return  # done (or given up) before its turn as the current one
        self._runner.forget_task(task_id)
        self._stop_task()
        if self.lined_up:  # the next one's work is already on the executor
            next_id = next(iter(self.lined_up))
            self.hosted = self.lined_up.pop(next_id)
            self._runner.instance = self.hosted.task
            self._set_slot(HOSTING, next_id)
        elif self.assignments:
            self._start(self.assignments.popleft())

    def _stop_task(self) -> None:
        """Let go of the current task instance, whatever the slot's state: the slot is IDLE."""
        if self.driver is not None:
            self.driver.stop(block=False)
            self.driver = None
        self.hosted = None
        self.waiting, self.backlog = None, []
        self.input_data.clear()
        if self.runner is not None:
            self.runner.instance = None
        if self.slot.state is not IDLE:
            self._set_slot(IDLE)

    def _validate_slot(self) -> None:
        """Raise AssertionError if what this actor holds does not fit its slot's state."""
        state, task_id = self.slot.state, self.slot.task_id
        holds = {
            "waiting": self.waiting is not None and self.waiting.task_id == task_id,
            "hosted": self.hosted is not None and self.hosted.begin_msg.task_id == task_id,
            "driver": self.driver is not None,
            "instance": self.runner is not None and self.runner.instance is not None,
        }
        expected = {
            "waiting": state is LOADING,
            "hosted": state in (HOSTING, HELPING),
            "driver": state is DRIVING,
            "instance": state in HOLDS_INSTANCE,
        }
        wrong = [name for name in holds if holds[name] != expected[name]]
        if self.backlog and state is not LOADING:
            wrong.append("backlog")
        if self.lined_up and state is not HOSTING:
            wrong.append("lined_up")
        if self.assignments and state is IDLE:
            wrong.append("assignments")
        if wrong:
            raise AssertionError(f"worker slot {state.value} ({task_id or 'no task'}) does not "
                                 f"fit what the worker holds: {', '.join(wrong)}")


def _loads_held(data: bytes, lengths: list[int]) -> Any:
    """A held result as its node sent it: its parts end to end (one pickle and its buffers)."""
    if len(lengths) < 2:
        return loads(data)
    view = memoryview(data)
    cuts = list(itertools.accumulate(lengths, initial=0))
    return loads_parts([view[a:b] for a, b in itertools.pairwise(cuts)])


def contain() -> None:
    """Limits a task process runs under: no core dumps, its own process group (set by the node)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def with_attached(reply: m.DataReply, frames: list[bytes]) -> m.DataReply:
    """``reply`` with the values that came in frames of their own (``attached``) in its
    ``data``; MalformedMessage when the frames are not exactly one per attached key."""
    if len(frames) != len(reply.attached):
        raise MalformedMessage(f"a data reply names {len(reply.attached)} attached values and "
                               f"came with {len(frames)}", sum(map(len, frames)))
    if not frames:
        return reply
    return msgspec.structs.replace(reply, data=[*reply.data, *zip(reply.attached, frames, strict=True)],
                                   attached=[])


def _own_token() -> str:
    """The secret the node started this worker with (contain.TOKEN_ENV): from the environment
    (a forked worker), or the first line of standard input (a spawned one), which is then
    /dev/null as before."""
    token = os.environ.pop(TOKEN_ENV, "")
    if token != TOKEN_ON_STDIN:
        return token
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(0, 128)
        if not chunk:
            break
        line += chunk
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    return line.decode(errors="replace").strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="actors.worker", description=argparse.SUPPRESS)
    to_node = parser.add_mutually_exclusive_group(required=True)
    to_node.add_argument("--link-fd", type=int, help="this worker's end of its link to its node "
                                                    "(an inherited descriptor)")
    to_node.add_argument("--node", help="the node's ipc:// address (a node's stand-in in tests)")
    parser.add_argument("--id", required=True, help="this worker's id")
    parser.add_argument("--node-pid", type=int, default=None, help="the node process's pid")
    args = parser.parse_args(argv)
    token = _own_token()  # before any task code: ours to say, once
    mark_worker()  # (a Client() in task code must not start a cluster here)
    logs.configure()  # structlog writes to the real stderr, never to the task's
    memory.keep_large_blocks()
    worker_ref: pykka.ActorRef[Any] | None = None
    to_worker = direct_to(None)  # (once the actor is there: its deliver_now, for lone messages)
    # What task code prints or logs goes to its client (see task_output.py).
    task_output.install(lambda: tell_if_alive(worker_ref, FlushOutput()))
    contain()
    sys.dont_write_bytecode = True  # package folders are read-only and verified by hash
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the node, which stops us

    started = threading.Event()

    def on_frames(_socket: str, frames: list[bytes]) -> None:
        if not started.is_set():  # Event.wait takes a lock even when set: per frame
            started.wait(10)  # the node may answer our Hello before start() has returned
        # The data plane's frames come after a mark of their own: the node relays what other
        # workers send there, and only data may come that way (actors/node_data.py). What comes
        # without the mark is from the node (or the master through it), one frame.
        data = len(frames) > 1 and frames[0] == DATA_MARK
        try:
            message = m.decode(frames[-1])
            origin, expected = b"", True
            if not data:
                expected = len(frames) == 1 and not isinstance(message, _DATA)
            elif isinstance(message, m.DataReply):
                message = with_attached(message, frames[1:-1])
            elif isinstance(message, m.DataRequest) and len(frames) == 3:
                origin = bytes(frames[1])  # a peer's data request: its node (b"": ours)
            else:
                expected = isinstance(message, m.InputData) and len(frames) == 2
            if not expected:
                log.warning("unexpected_frames", data=data, count=len(frames),
                            type=type(message).__name__)
                return
        except MalformedMessage as exc:
            log.warning("malformed_frames", source="node", count=len(frames), error=str(exc))
            return
        inbound = Inbound(origin, None, message)
        if not (hub.lone() and to_worker(inbound)):
            tell_if_alive(worker_ref, inbound)

    def on_tick(now: float) -> None:
        tell_if_alive(worker_ref, Tick(now))

    def on_event(_socket: str, what: str) -> None:
        if what == "disconnected":  # our link's other end closed: the node is gone
            log.warning("node_gone", why="its link to this worker closed")
            stopped.set()

    hub = Hub(on_frames, on_tick=on_tick, tick_s=0.5, on_event=on_event)
    if args.link_fd is not None:  # (data arrives here: views)
        link = socket.socket(fileno=args.link_fd)
        link.set_inheritable(False)  # (no process a task starts gets it)
        hub.add_link(NODE, link, views=True)
    else:
        hub.add_dealer(NODE, args.node, identity=args.id.encode(), views=True)
    hub.start()
    worker_ref = Worker.start(hub, args.id, lambda _reason: stopped.set(), args.node_pid, token)
    to_worker = direct_to(worker_ref)
    started.set()
    stopped.wait()
    pykka.ActorRegistry.stop_all(timeout=2)
    hub.stop()
    # A task's threads may still run user code; they must not keep the process alive.
    os._exit(0)


if __name__ == "__main__":
    raise SystemExit(main())
