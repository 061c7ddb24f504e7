"""The Node actor: owns this host's worker processes and relays for them.

Workers are started blank (no user code; the first ones forked as the node
starts, see ``prefork.py``) and announced to the master, which
assigns each to one task instance at a time. A worker process that exits is
seen at once (a reaper thread blocks in ``wait4`` and tells this actor),
reported with its exit code or signal and peak memory, and replaced by a
fresh one. Frames between workers and the master are relayed on the hub
thread without being decoded (see ``relay_frames``): the node never touches
task payloads, and reads only the type tag of the few messages that open or
close a worker's task (``TaskEnds``).

Workers are contained (``contain.py``): a uid of their own when the node is
root, no network of the node's, resource limits. Every process a task started
is ended when its worker's last task ends, or when the worker exits.

Proof. The node's socket for workers is a path any of their processes can open, and a peer
names itself there: task code could connect under another worker's id. So each worker is
started with a secret of its own (``prefork.worker_token``: set in a forked one's environment
after the wipe, the first line of a spawned one's standard input) and says it in its
``Hello``; the node relays a worker's frames, and frames to it, only once its Hello proved it
(``Node.proven``, read on the hub thread) and until it exits, and the socket hands no id over
to a newer connection (a worker's connection cannot be taken over).
"""

from __future__ import annotations

import contextlib
import hmac
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pykka
import structlog

from actors import __version__, contain, logs, memory, worker_output
from actors import messages as m
from actors.contain import (
    TOKEN_ENV,
    TOKEN_ON_STDIN,
    WORKER_SCRIPT,
    Containment,
    Plan,
)
from actors.errors import MessageTooLarge
from actors.master_gate import MasterGate
from actors.node_data import DataPlane
from actors.node_results import HOLD_FILE, RESULTS, ResultStore
from actors.prefork import Forked, worker_args, worker_env, worker_token
from actors.shell import ConnectionEvent, Inbound, Shell, Tick, tell_if_alive
from actors.task_sync import WorkerGone
from transport import Hub, links

log = structlog.get_logger("actors.node")

MASTER = "master"
WORKERS = "workers"
KILL_GRACE_S = 2.0
# A worker's start (an interpreter, the runtime's imports, its containment) takes well under a
# second here; one that has not said its Hello after this long never will, or cannot: hung
# before it (a stuck import, a mount that does not answer), or its id on the workers' socket
# taken by another connection (task code that guessed it: node ids and worker numbers are in
# the open), which leaves it unheard. It is ended and replaced, so that the node keeps its
# slots; not counted as a failed start (MAX_FAILED_STARTS), which task code must not cause.
DEFAULT_START_TIMEOUT_S = 60.0
HELLO_RETRY_S = 2.0
# Hellos unanswered this long on one connection: connect afresh (Hub.reconnect: a master that
# woke from a pause may have parked this connection under the id its old one still held).
RENEW_AFTER_S = 3 * HELLO_RETRY_S
UNREACHABLE_AFTER_S, UNREACHABLE_EVERY_S = 5.0, 30.0  # when, and how often, to say so
MAX_FAILED_STARTS = 5
MAX_HELD_EXITS = 10_000  # worker exits told to the master when it is back (it was away)
# What an exited worker said last may still be on its way to the hub thread: its frames count
# this long after the node saw it exit (frames to it stop at once).
LAST_WORDS_S = 2.0
STATS_EVERY_S = 2.0  # how often the node tells the master what its workers use (the dashboard)
# A worker whose frames the node refuses (no layout, not a message, not one a worker sends)
# more often than this is ended, as a worker lost: task code that writes to its worker's
# socket could otherwise keep the node's one thread refusing, and the node's other workers
# unheard. The master's bound on what a worker sends it through its node is the same.
WORKER_REFUSALS_ENDING, REFUSAL_INTERVAL_S = 1_000, 10.0
RUN_DIR_PREFIX = "actors-node-"
# A task process that outlives its worker dies with it; the node reaps it within this long at exit.
ORPHAN_REAP_S = 2.0
# Shared by every worker of a node that contains them without a uid of their own.
UNCONTAINED = Plan(subreaper=False, oom_score=False, network="shared", no_new_privs=False)


class ProcessExited(msgspec.Struct, frozen=True):
    worker_id: str
    pid: int
    status: int
    maxrss_kb: int


class EndWorker(msgspec.Struct, frozen=True):
    """From the hub thread: this worker sent more than the node refuses (``why``)."""

    worker_id: str
    why: str


OUTPUT_DRAIN_S = 1.0  # at the node's stop, for its workers' last lines of output


@dataclass
class WorkerProcess:
    worker_id: str
    pid: int
    scratch: str
    popen: subprocess.Popen[bytes] | None = None  # None: forked, not spawned
    reaper: threading.Thread | None = None
    ready: bool = False
    kill_deadline: float | None = None
    expected_exit: bool = False
    plan: Plan = UNCONTAINED
    token: str = ""  # the secret it must say in its Hello (see "Proof")
    start_by: float | None = None  # its Hello is due by then (set on the first tick after start)
    ended: str = ""  # what it sent that made the node end it (WorkerExited.ended)
    output: int = -1  # the read end of its stdout and stderr (worker_output.py)
    relay: threading.Thread | None = None  # the thread logging what it writes there


@dataclass
class NodeConfig:
    node_id: str
    slots: int
    ipc_address: str
    run_dir: str
    exit_with_parent: bool = False
    data_address: str = ""
    results_address: str = ""  # where clients fetch the large results this node holds
    local_data: str = ""  # DataPlane.local_data(): its ipc endpoint for peer nodes of the host
    master: str = ""  # the master's address, for what a person reads in the log
    connect_timeout: float = 0.0  # seconds without a welcome before the node gives up (0: never)
    # A worker that has not proved itself this long after it started is replaced (0: never).
    start_timeout: float = DEFAULT_START_TIMEOUT_S
    parent_pid: int = field(default_factory=os.getppid)
    containment: Containment | None = None
    # Each worker's link a socket pair made before it starts (transport/links.py), not the
    # ipc socket at ``ipc_address`` (--worker-links; bench/README.md says what it costs).
    links: bool = False
    # Children of this process that are not what exited workers left (a master's --run
    # script, where the node runs inside its master): never ended as orphans.
    own_children: set[int] = field(default_factory=set)


class Node(Shell):
    def __init__(self, hub: Hub, config: NodeConfig, on_fatal: Any = None,
                 task_sync: pykka.ActorRef[Any] | None = None,
                 forked: list[Forked] | None = None,
                 task_ends: TaskEnds | None = None, gate: MasterGate | None = None,
                 pids: dict[str, int] | None = None,
                 proven: set[bytes] | None = None, alive: set[bytes] | None = None) -> None:
        super().__init__(hub)
        # worker id -> pid, for the hub thread's result store (a dict's get and set are atomic)
        self.pids = pids if pids is not None else {}
        # The workers whose Hello said their secret: the hub thread relays frames from them
        # (``proven``, until LAST_WORDS_S after their exit: ``gone``, oldest first) and to them
        # (``alive``, until their exit) only (relay_frames, DataPlane.alive; "Proof").
        self.proven = proven if proven is not None else set()
        self.alive = alive if alive is not None else set()
        self.gone: deque[tuple[float, bytes]] = deque()
        self.task_ends = task_ends or TaskEnds()
        self.gate = gate or MasterGate()
        self.reported: set[str] = set()  # busy workers our last Hello reported: the master decides
        self.held_exits: list[m.WorkerExited] = []  # while the master was away
        self.orphans: list[int] = []  # what exited workers left, killed, not yet reaped
        self.forked = forked or []
        self.task_sync = task_sync
        self.config = config
        self.workers: dict[str, WorkerProcess] = {}
        self.welcomed = False
        self.handshakes = 0  # one more each time we lose the master (Hello.handshake)
        self.stopping = False
        self.now = 0.0
        self.last_hello = -HELLO_RETRY_S
        self.unanswered_since: float | None = None  # our first Hello not yet welcomed
        self.last_heartbeat = 0.0
        self.heartbeat_s = 1.0
        self.connected = False  # the transport's view of the connection to the master
        self.waiting_since: float | None = None  # not welcomed since (None: welcomed)
        self.said_unreachable = -UNREACHABLE_EVERY_S
        self._seq = 0
        self.last_stats = 0.0
        self.cpu_seen: dict[str, tuple[float, float]] = {}  # worker -> (CPU seconds, when)
        self._failed_starts = 0  # workers in a row that died before saying hello
        self.refusals = logs.Refusals()  # what each worker sent that we refused (logged 1, 2, 4..)
        self.flooding = logs.RefusalLimit(WORKER_REFUSALS_ENDING, REFUSAL_INTERVAL_S)
        self._on_fatal = on_fatal
        self.log = log.bind(role="node", node_id=config.node_id)

    def on_start(self) -> None:
        super().on_start()
        for child in self.forked:
            self._seq += 1
            self._adopt(WorkerProcess(child.worker_id, child.pid, child.scratch, plan=child.plan,
                                      token=child.token, output=child.output))
        for _ in range(self.config.slots - len(self.forked)):
            self._spawn()
        self._hello()  # now, not at the first tick: start-up time is user-visible

    def on_crash(self) -> None:
        self._fatal("node actor crashed")

    # --- input --------------------------------------------------------------

    def receive(self, message: Any) -> Any:
        match message:
            case Inbound(via=None, message=msg) if message.peer == b"":
                self._from_master(msg)
            case Inbound(peer=worker_key, message=msg):
                self._from_worker(worker_key.decode(errors="replace"), msg)
            case ProcessExited():
                self._exited(message)
            case EndWorker(worker_id=worker_id, why=why):
                self._end(worker_id, why)
            case Tick(now=now):
                self._tick(now)
            case ConnectionEvent(what=what):
                self._connection(what)
            case ("shutdown",):
                self._shutdown()
            case _:
                raise TypeError(f"node got an unknown message: {message!r}")
        return None

    def _from_master(self, msg: m.Message) -> None:
        match msg:
            case m.Welcome(heartbeat_s=heartbeat_s):
                if self.welcomed:
                    return  # the answer to a Hello repeated while the first was on its way
                self.welcomed = True
                self.waiting_since = self.unanswered_since = None
                self.heartbeat_s = heartbeat_s
                self.log.info("joined_master", workers=len(self.workers),
                              reported_busy=len(self.reported),
                              data_address=self.config.data_address)
                # (relay_frames opened the gate: what workers said meanwhile is on its way)
                for died in self.held_exits:
                    self.send(MASTER, message=died)
                self.held_exits = []
                for worker in self.workers.values():
                    if worker.ready and not worker.expected_exit and worker.worker_id not in self.reported:
                        self._announce(worker)
                self.reported = set()
            case m.Refused(reason=reason):
                if "send Hello first" in reason:
                    if self.welcomed:
                        self._forgotten()
                    # else: our Hello is on its way, or the next tick sends it again
                else:
                    self.log.error("master_refused_node", reason=reason)
                    self._fatal(f"master refused this node: {reason}")
            case m.KillWorker(worker_id=worker_id, reason=reason):
                self._kill(worker_id, reason)
            case _:
                self.log.warning("unexpected_message", source="master", type=type(msg).__name__)

    def _forgotten(self) -> None:
        """The master no longer knows us: it restarted, or declared us lost while we were silent.

        Our workers run on, what they send the master is held (``MasterGate``), and a new Hello
        says which tasks each of them holds: the master takes back what it can and tells us to
        stop the rest (it requeued their work). No result is recorded twice."""
        self.log.warning("master_forgot_node", workers=len(self.workers))
        self.gate.close()
        self._away()
        self._hello()

    def _away(self) -> None:
        self.welcomed = False
        self.handshakes += 1
        self.waiting_since = None

    def _from_worker(self, worker_id: str, msg: m.Message) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            # (a worker's last words while we stop are expected) A Hello under any id reaches
            # here (from anyone who can reach the workers' socket: other workers' task code),
            # so the 1st, 2nd, 4th... of them all, not each: one task wrote 10^6 lines in 20 s.
            if not self.stopping and (refused := self.refusals.count("unknown workers")):
                self.log.warning("message_from_unknown_worker", worker_id=worker_id[:100],
                                 refused=refused)
            return
        match msg:
            case m.Hello(role="worker") if not (
                    worker.token and hmac.compare_digest(msg.token.encode(), worker.token.encode())):
                if refused := self.refusals.count(worker_id):
                    self.log.warning("worker_hello_refused", worker_id=worker_id, pid=msg.pid,
                                     refused=refused,
                                     why="not the secret this worker was started with")
            case m.Hello(role="worker") if worker.ready or worker.expected_exit or worker.ended:
                # Once: its task's code can say it again (it holds the secret), and a worker
                # being stopped that was announced anew got another key's task.
                if refused := self.refusals.count(worker_id):
                    self.log.warning("worker_hello_refused", worker_id=worker_id, pid=msg.pid,
                                     refused=refused, why="a worker says Hello once")
                if self.flooding.passed(worker_id, self.now):
                    self._end(worker_id, f"more than {WORKER_REFUSALS_ENDING} messages a worker "
                                         f"does not send in {REFUSAL_INTERVAL_S:.0f}s")
            case m.Hello(role="worker", protocol=m.PROTOCOL_VERSION, pid=pid):
                self.proven.add(worker_id.encode())
                self.alive.add(worker_id.encode())
                worker.ready = True
                self._failed_starts = 0
                self.log.debug("worker_up", worker_id=worker_id, pid=pid)
                self.send(WORKERS, worker_id.encode(), message=m.Welcome("", worker_id, 0.0))
                if self.welcomed:
                    self._announce(worker)
            case _:
                if refused := self.refusals.count(worker_id):
                    # (in_window: toward the flood's bound, what the log must show if a flood
                    # ever goes on past it unended; CI saw one, 2026-12-06, not seen again)
                    self.log.warning("unexpected_message", worker_id=worker_id,
                                     type=type(msg).__name__, refused=refused,
                                     in_window=self.flooding.windows.get(worker_id, (0, 0))[1])
                if self.flooding.passed(worker_id, self.now):
                    self._end(worker_id, f"more than {WORKER_REFUSALS_ENDING} messages a worker "
                                         f"does not send in {REFUSAL_INTERVAL_S:.0f}s")

    def _tick(self, now: float) -> None:
        self.now = now
        while self.gone and now - self.gone[0][0] > LAST_WORDS_S:
            self.proven.discard(self.gone.popleft()[1])
        if self.config.exit_with_parent and os.getppid() != self.config.parent_pid:
            self.log.warning("parent_gone", parent_pid=self.config.parent_pid)
            self._fatal("the process that started this node is gone")
            return
        if not self.welcomed:
            self._waiting(now)
            if self.stopping:
                return
        if not self.welcomed and self.connected and now - self.last_hello >= HELLO_RETRY_S:
            since = self.unanswered_since
            if since is not None and now - since >= RENEW_AFTER_S:
                self.log.warning("master_connection_renewed", unanswered_s=round(now - since, 1),
                                 why="connected, but no Welcome: its master may not hear it")
                assert self.outbox is not None
                self.outbox.reconnect(MASTER)
                self.unanswered_since = None
                self.handshakes += 1  # (what the parked connection carried is gone too)
            self._hello()  # (while not connected, the "connected" event sends the next one)
        if self.welcomed and now - self.last_heartbeat >= self.heartbeat_s:
            self.last_heartbeat = now
            self.send(MASTER, message=m.Heartbeat())
        if self.welcomed and now - self.last_stats >= STATS_EVERY_S:
            self.last_stats = now
            self._report_usage(now)
        for worker in list(self.workers.values()):
            if not worker.ready and not worker.expected_exit and self.config.start_timeout:
                if worker.start_by is None:
                    worker.start_by = now + self.config.start_timeout
                elif now >= worker.start_by:
                    self.log.warning("worker_start_timeout", worker_id=worker.worker_id,
                                     pid=worker.pid, seconds=self.config.start_timeout)
                    self._kill(worker.worker_id, "it did not say hello in time")
            if worker.kill_deadline is not None and now >= worker.kill_deadline:
                self.log.warning("worker_kill_escalated", worker_id=worker.worker_id)
                _signal_group(worker.pid, signal.SIGKILL)
                worker.kill_deadline = None
        pids = {w.worker_id: w.pid for w in self.workers.values() if not w.expected_exit}
        for worker_id, killed in self.task_ends.end_idle(pids):
            self.log.info("task_processes_ended", worker_id=worker_id, count=killed)
        if self.orphans:
            self.orphans = contain.reap(self.orphans)

    def _report_usage(self, now: float) -> None:
        """CPU and memory of each live worker process (from /proc), for the dashboard."""
        stats = []
        seen: dict[str, tuple[float, float]] = {}
        for worker in self.workers.values():
            if not worker.ready or worker.expected_exit:
                continue
            used = memory.usage(worker.pid)
            if used is None:
                continue
            cpu, rss = used
            before = self.cpu_seen.get(worker.worker_id)
            seen[worker.worker_id] = (cpu, now)
            percent = 100.0 * (cpu - before[0]) / (now - before[1]) if before and now > before[1] else 0.0
            stats.append((worker.worker_id, round(max(percent, 0.0), 1), rss))
        self.cpu_seen = seen
        if stats:
            self.send(MASTER, message=m.WorkerStats(stats))

    def _waiting(self, now: float) -> None:
        """Not welcomed: say why after a few seconds and every so often; give up after
        ``connect_timeout``."""
        if self.waiting_since is None:
            self.waiting_since = now
        waited = now - self.waiting_since
        why = ("connected, but no answer to its Hello" if self.connected else
               f"no connection to {self.config.master or 'the master'} (is a master running "
               "there, and reachable from this host?)")
        timeout = self.config.connect_timeout
        if timeout and waited >= timeout:
            self.log.error("master_unreachable", seconds=round(waited), reason=why,
                           hint="gave up (--connect-timeout)")
            self._fatal(f"no master after {waited:.0f}s: {why}")
        elif waited >= UNREACHABLE_AFTER_S and now - self.said_unreachable >= UNREACHABLE_EVERY_S:
            self.said_unreachable = now
            self.log.warning("master_unreachable", seconds=round(waited), reason=why)

    def _connection(self, what: str) -> None:
        if what in ("connected", "handshake_succeeded"):
            self.connected = True
        elif what == "disconnected":
            self.connected = False
            self.unanswered_since = None  # (a Hello on the next connection starts the count)
            if not self.welcomed:
                # A Welcome (and what followed it) may have been on its way in it: the next
                # Hello says the master's word may be lost (when welcomed, _away says so).
                self.handshakes += 1
        if what == "auth_failed":
            self.log.error("master_refused_key", hint="is this node's public key in the master's allowed/ folder?")
            self._fatal("the master refused this node's CURVE key")
        elif what == "disconnected" and self.welcomed and not self.stopping:
            # Until a Welcome: workers' messages are held (main's on_event closed the gate).
            self.log.warning("master_disconnected", workers=len(self.workers))
            self._away()
        elif what == "connected" and not self.welcomed and not self.stopping:
            self._hello()  # at once: the master may have restarted, and our work waits

    # --- workers ------------------------------------------------------------

    def _spawn(self) -> None:
        self._seq += 1
        worker_id = f"{self.config.node_id}/w{self._seq}"
        scratch = tempfile.mkdtemp(prefix=f"w{self._seq}-", dir=self.config.run_dir)
        plan = self._plan(scratch)
        token = worker_token()
        output, written = os.pipe()
        ours, theirs = links.pair() if self.config.links else (None, None)
        passed = (theirs.fileno(),) if theirs is not None else ()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER_SCRIPT, "actors.worker", plan.to_arg(),
                 *worker_args(self.config.ipc_address, worker_id, passed[0] if passed else -1)],
                cwd=scratch, env={**worker_env(scratch), TOKEN_ENV: TOKEN_ON_STDIN},
                stdin=subprocess.PIPE, stdout=written, stderr=written, start_new_session=True,
                pass_fds=passed,
            )
        except BaseException:
            os.close(output)
            if ours is not None:
                ours.close()
            raise
        finally:
            os.close(written)
            if theirs is not None:
                theirs.close()
        if ours is not None:  # before anything is sent to it
            self.hub.attach_link(WORKERS, worker_id.encode(), ours)
        assert proc.stdin is not None
        try:  # (a line in an empty pipe: never blocks)
            proc.stdin.write(token.encode() + b"\n")
            proc.stdin.close()
        except OSError:  # it died at once: its exit is reported as any other
            pass
        self._adopt(WorkerProcess(worker_id, proc.pid, scratch, proc, plan=plan, token=token,
                                  output=output))

    def _plan(self, scratch: str) -> Plan:
        containment = self.config.containment
        if containment is None:
            return UNCONTAINED
        plan = containment.plan()
        containment.prepare_scratch(scratch, plan)
        return plan

    def _adopt(self, worker: WorkerProcess) -> None:
        worker.reaper = threading.Thread(target=_reap, args=(self.actor_ref, worker),
                                         name=f"reaper-{worker.pid}", daemon=True)
        worker.reaper.start()
        if worker.output >= 0:  # what it writes to stdout and stderr, logged as its own
            worker.relay = threading.Thread(
                target=worker_output.relay, args=(worker.output, self.log.bind(worker_id=worker.worker_id)),
                name=f"output-{worker.pid}", daemon=True)
            worker.relay.start()
        self.workers[worker.worker_id] = worker
        self.pids[worker.worker_id] = worker.pid
        self.log.debug("worker_spawned", worker_id=worker.worker_id, pid=worker.pid,
                       forked=worker.popen is None)

    def _announce(self, worker: WorkerProcess) -> None:
        self.send(MASTER, message=m.WorkerReady(worker.worker_id, worker.pid))

    def _kill(self, worker_id: str, reason: str) -> None:
        worker = self.workers.get(worker_id)
        if worker is None or worker.expected_exit:
            return
        self.log.info("worker_stopping", worker_id=worker_id, reason=reason)
        worker.expected_exit = True
        worker.kill_deadline = self.now + KILL_GRACE_S
        self.alive.discard(worker_id.encode())  # nothing more is relayed to it
        _signal_group(worker.pid, signal.SIGTERM)

    def _end(self, worker_id: str, why: str) -> None:
        """A worker that kept sending what the node refuses: killed at once, told to the master
        as a worker lost (a death against its task) with ``why``; its frames are dropped from
        now on. Only a worker that proved itself: an id no one proved names no process."""
        worker = self.workers.get(worker_id)
        if (worker is None or worker.ended or worker.expected_exit
                or worker_id.encode() not in self.proven):
            if worker is not None and not worker.ended:  # (said: its flood goes on)
                self.log.warning("worker_not_ended", worker_id=worker_id, reason=why,
                                 stopping=worker.expected_exit, ready=worker.ready,
                                 proven=worker_id.encode() in self.proven)
            return
        worker.ended = why
        self.proven.discard(worker_id.encode())
        self.log.error("worker_ended", worker_id=worker_id, pid=worker.pid, reason=why)
        _signal_group(worker.pid, signal.SIGKILL)

    def _exited(self, event: ProcessExited) -> None:
        if self.config.links:  # what it wrote before it exited is read first, then it closes
            self.hub.detach_link(WORKERS, event.worker_id.encode())
        worker = self.workers.pop(event.worker_id, None)
        self.pids.pop(event.worker_id, None)
        self.alive.discard(event.worker_id.encode())
        self.gone.append((self.now, event.worker_id.encode()))
        if worker is None:
            return
        self.task_ends.forget(event.worker_id.encode())
        self.refusals.forget(event.worker_id)
        self.flooding.forget(event.worker_id)
        _signal_group(event.pid, signal.SIGKILL)  # anything the task left in its group
        # and anything it left elsewhere: the worker was its subreaper, now the node is
        self.orphans = contain.reap(self.orphans + self._end_orphans())
        shutil.rmtree(worker.scratch, ignore_errors=True)
        if self.config.containment is not None:
            self.config.containment.release(worker.plan)
        if self.task_sync is not None:
            self.task_sync.tell(WorkerGone(event.worker_id))
        exitcode = os.waitstatus_to_exitcode(event.status)
        died = m.WorkerExited(
            event.worker_id, event.pid,
            exitcode if exitcode >= 0 else None, -exitcode if exitcode < 0 else None,
            event.maxrss_kb, worker.expected_exit or self.stopping, worker.ended,
        )
        (self.log.info if died.expected else self.log.warning)(
            "worker_exited", worker_id=event.worker_id, pid=event.pid, exitcode=died.exitcode,
            signal=died.signal, maxrss_kb=event.maxrss_kb)
        if self.welcomed and worker.ready:
            self.send(MASTER, message=died)
        elif worker.ready and len(self.held_exits) < MAX_HELD_EXITS:
            self.held_exits.append(died)  # the master, back, may still count it as busy
        if not worker.ready and not worker.expected_exit and not self.stopping:
            self._failed_starts += 1
            if self._failed_starts >= MAX_FAILED_STARTS:
                self.log.error("workers_cannot_start", attempts=self._failed_starts)
                self._fatal(f"{self._failed_starts} worker processes in a row died on start")
                return
        if not self.stopping:
            self._spawn()

    # --- lifecycle ----------------------------------------------------------

    def _hello(self) -> None:
        """Introduce this node; with every live worker that ran code, and the tasks it still
        holds (after losing the master: what was running, and what finished meanwhile, whose
        result is held). The master decides what becomes of them; only clean workers are
        announced after its Welcome."""
        self.last_hello = self.now
        if self.unanswered_since is None:
            self.unanswered_since = self.now
        live = {w for w, p in self.workers.items() if p.ready and not p.expected_exit}
        running = sorted((w, tasks) for w, tasks in self.task_ends.holding().items() if w in live)
        self.reported = {w for w, _ in running}
        self.send(MASTER, message=m.Hello(role="node", peer_id=self.config.node_id,
                                          protocol=m.PROTOCOL_VERSION, version=__version__,
                                          host=os.uname().nodename, pid=os.getpid(),
                                          slots=self.config.slots,
                                          data_address=self.config.data_address,
                                          results_address=self.config.results_address,
                                          local_data=self.config.local_data,
                                          running=running, handshake=self.handshakes))

    def _fatal(self, reason: str) -> None:
        self.stopping = True  # what still exits until the process does is no news
        if self._on_fatal is not None:
            self._on_fatal(reason)

    def _shutdown(self) -> None:
        """Stop every worker (TERM, then KILL after a grace period) and say goodbye."""
        self.stopping = True
        if self.welcomed:
            self.send(MASTER, message=m.Bye("node stopping"))
        for worker in self.workers.values():
            _signal_group(worker.pid, signal.SIGTERM)
        for worker in self.workers.values():
            assert worker.reaper is not None
            worker.reaper.join(KILL_GRACE_S)
            if worker.reaper.is_alive():
                _signal_group(worker.pid, signal.SIGKILL)
                worker.reaper.join(KILL_GRACE_S)
            shutil.rmtree(worker.scratch, ignore_errors=True)
        # Their last lines logged (a bounded wait: a process they started may hold the pipe).
        deadline = time.monotonic() + OUTPUT_DRAIN_S
        for worker in self.workers.values():
            if worker.relay is not None:
                worker.relay.join(max(0.0, deadline - time.monotonic()))
        stopped = len(self.workers)
        self.workers.clear()
        left = contain.reap(self.orphans + self._end_orphans())
        deadline = time.monotonic() + ORPHAN_REAP_S
        while left and time.monotonic() < deadline:
            time.sleep(0.01)  # SIGKILLed already: a bounded wait for the kernel to finish them
            left = contain.reap(left)
        self.log.info("node_stopped", workers=stopped)

    def _end_orphans(self) -> list[int]:
        orphans = contain.end_orphans({w.pid for w in self.workers.values()}
                                      | self.config.own_children)
        if orphans:
            self.log.info("orphans_ended", count=len(orphans))
        return orphans


def _reap(node: pykka.ActorRef[Any], worker: WorkerProcess) -> None:
    """Block until the worker exits, then tell the node (a thread that only sends)."""
    _, status, usage = os.wait4(worker.pid, 0)
    if worker.popen is not None:
        worker.popen.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
    with contextlib.suppress(pykka.ActorDeadError):
        node.tell(ProcessExited(worker.worker_id, worker.pid, status, int(usage.ru_maxrss)))


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --- when a worker's tasks end ------------------------------------------------


def message_tag(body: bytes) -> bytes:
    """The type tag that heads an encoded message (a msgpack array whose first item is the class
    name, see messages.py), read without decoding the rest; ``b""`` when there is none."""
    if len(body) < 2:
        return b""
    first = body[0]
    at = 1 if 0x90 <= first <= 0x9F else 3 if first == 0xDC else 0
    if not at or len(body) <= at:
        return b""
    head = body[at]
    if 0xA0 <= head <= 0xBF:
        return body[at + 1:at + 1 + (head & 0x1F)]
    return body[at + 2:at + 2 + body[at + 1]] if head == 0xD9 and len(body) > at + 1 else b""


class _TaskHead(msgspec.Struct, array_like=True):
    """The first two fields of a message about one task instance (the rest is skipped)."""

    tag: str
    task_id: str


_HEAD = msgspec.msgpack.Decoder(_TaskHead)


class _EndsHead(msgspec.Struct, array_like=True):
    """A ``TaskResults`` read for its tasks alone."""

    tag: msgspec.Raw
    results: list[_TaskHead]


_ENDS_HEAD = msgspec.msgpack.Decoder(_EndsHead)


class _AssignHead(msgspec.Struct, array_like=True):
    """An ``AssignTask`` read for its task and owner alone: the fields between are left as they
    are (``Raw``: neither the code nor the arguments are copied)."""

    tag: msgspec.Raw
    task_id: str
    name: msgspec.Raw
    kind: msgspec.Raw
    code: msgspec.Raw
    args: msgspec.Raw
    driver: msgspec.Raw
    package: msgspec.Raw
    version: msgspec.Raw
    code_hash: msgspec.Raw
    inputs: msgspec.Raw
    held_inputs: msgspec.Raw
    owner: str = ""


class _AssignsHead(msgspec.Struct, array_like=True):
    """An ``AssignTasks`` read for its tasks' heads alone."""

    tag: msgspec.Raw
    tasks: list[_AssignHead]


_ASSIGN_HEAD = msgspec.msgpack.Decoder(_AssignHead)
_ASSIGNS_HEAD = msgspec.msgpack.Decoder(_AssignsHead)
_OPENS = {m.AssignTask.__name__.encode()}  # master -> worker
_OPENS_MANY = m.AssignTasks.__name__.encode()
_CLOSES_FROM_MASTER = {m.ReleaseTask.__name__.encode()}
_CLOSES_MANY = m.TaskResults.__name__.encode()
_CLOSES_FROM_WORKER = {m.TaskResult.__name__.encode(), m.WorkerFailed.__name__.encode(),
                       m.TaskStopped.__name__.encode()}


class TaskEnds:
    """Which task instances each worker holds, as the frames the node relays tell (hub thread),
    and the ending of every process below a worker whose last task ended (Node actor's tick).

    A worker stays warm after a task; what the task started must not stay with it. A worker
    holds a task from its ``AssignTask`` until its ``TaskResult`` or ``WorkerFailed`` (plain
    Tasks, drivers), the master's ``ReleaseTask`` (a ParallelTask's workers) or its own
    ``TaskStopped`` (a cancelled task's code stopped in time). One lock covers
    both sides: the check that a worker holds no task and the killing happen together, so a task
    assigned meanwhile (recorded before it is relayed) never loses a process it started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[bytes, set[str]] = {}
        self._idle: set[bytes] = set()  # held tasks, holds none now, not swept since

    def from_master(self, worker: bytes, body: bytes) -> list[str]:
        """The owners the tasks assigned to the worker name (a driver's: its submitter's key),
        none for any other frame."""
        tag = message_tag(body)
        if tag in _OPENS:
            try:
                assign = _ASSIGN_HEAD.decode(body)
            except msgspec.MsgspecError:
                return []  # the worker refuses it too
            self._record(worker, assign.task_id, opened=True)
            return [assign.owner] if assign.owner else []
        if tag == _OPENS_MANY:
            try:
                assigns = _ASSIGNS_HEAD.decode(body).tasks
            except msgspec.MsgspecError:
                return []
            for assign in assigns:
                self._record(worker, assign.task_id, opened=True)
            return [assign.owner for assign in assigns if assign.owner]
        if tag in _CLOSES_FROM_MASTER:
            self._change(worker, body, opened=False)
        return []

    def from_worker(self, worker: bytes, body: bytes) -> None:
        tag = message_tag(body)
        if tag in _CLOSES_FROM_WORKER:
            self._change(worker, body, opened=False)
        elif tag == _CLOSES_MANY:
            try:
                ends = _ENDS_HEAD.decode(body).results
            except msgspec.MsgspecError:
                return  # the master refuses it too
            for end in ends:
                self._record(worker, end.task_id, opened=False)

    def _change(self, worker: bytes, body: bytes, *, opened: bool) -> None:
        try:
            task_id = _HEAD.decode(body).task_id
        except msgspec.MsgspecError:
            return  # the master or the worker would refuse it too
        self._record(worker, task_id, opened=opened)

    def _record(self, worker: bytes, task_id: str, *, opened: bool) -> None:
        with self._lock:
            held = self._open.setdefault(worker, set())
            if opened:
                held.add(task_id)
                self._idle.discard(worker)
            elif task_id in held:
                held.discard(task_id)
                if not held:
                    self._idle.add(worker)

    def end_idle(self, pids: Mapping[str, int]) -> list[tuple[str, int]]:
        """Kill what lives below each worker that holds no task since its last one ended;
        ``pids``: worker id -> pid of the workers still serving. [(worker id, killed)]."""
        ended = []
        with self._lock:
            for worker in list(self._idle):
                self._idle.discard(worker)
                pid = pids.get(worker.decode())
                if pid is not None and not self._open.get(worker):
                    killed = contain.end_descendants(pid)
                    if killed:
                        ended.append((worker.decode(), killed))
        return ended

    def holds(self, worker: bytes, task_id: str) -> bool:
        with self._lock:
            return task_id in self._open.get(worker, ())

    def forget(self, worker: bytes) -> None:
        with self._lock:
            self._open.pop(worker, None)
            self._idle.discard(worker)

    def holding(self) -> dict[str, list[str]]:
        """Worker id -> the task instances it holds (those whose end the master has not seen),
        for every worker that ever held one (an idle one ran someone's code: not clean)."""
        with self._lock:
            return {w.decode(): sorted(held) for w, held in self._open.items()}


_FOR_TASK_SYNC = (m.ChunkReply, m.UnknownVersion, m.NewestVersions, m.NeedVersion)


def relay_frames(hub: Hub, node: pykka.ActorRef[Any], task_sync: pykka.ActorRef[Any],
                 socket: str, frames: list[bytes], data: DataPlane | None = None,
                 task_ends: TaskEnds | None = None, gate: MasterGate | None = None,
                 results: ResultStore | None = None, proven: set[bytes] | None = None,
                 alive: set[bytes] | None = None) -> None:
    """Route what the node's sockets receive (runs on the hub thread).

    master -> ``[body]`` is for the node; ``[worker, body]`` is relayed as is.
    worker -> ``[worker, b"m", body]`` is relayed to the master as ``[worker, body]`` (held while
    the master is away: ``gate``); ``[worker, b"n", body]`` is for the node; data frames go to
    the data plane, results left for clients (and clients' fetches) to the result store.
    """
    if results is not None and socket == RESULTS:
        results.from_client(hub, frames)
        return
    if data is not None and socket != MASTER and socket != WORKERS:
        data.from_network(hub, socket, frames)
        return
    if socket == MASTER:
        if len(frames) == 1:
            msg = m.decode(frames[0])
            if gate is not None and isinstance(msg, m.Welcome):
                gate.max_message = msg.max_message
                # What workers said while the master was away goes first, in order.
                for held in gate.open():
                    held = _within_bound(held, gate.max_message)
                    if task_ends is not None:
                        task_ends.from_worker(held[0], held[1])
                    hub.relay(MASTER, held)
            if results is not None and results.from_master(hub, msg):
                return
            if data is not None and isinstance(msg, m.LocalPeers):
                data.local_peers(msg)
                return
            tell_if_alive(task_sync if isinstance(msg, _FOR_TASK_SYNC) else node,
                          Inbound(b"", None, msg))
        elif len(frames) == 2:
            if alive is not None and frames[0] not in alive:
                return  # a worker that exited meanwhile: its id may be anyone's now ("Proof")
            if task_ends is not None and (owners := task_ends.from_master(frames[0], frames[1])) \
                    and results is not None:
                for owner in owners:  # (a driver's: its submitter may fetch the result here)
                    results.admit(owner)
            if data is not None:
                data.from_master(frames[1])
            hub.relay(WORKERS, frames)
        else:
            log.warning("malformed_frames", source="master", count=len(frames))
        return
    if proven is not None and frames[0] not in proven and not _says_hello(frames):
        _unproven(frames[0])
        return
    if len(frames) == 3 and frames[1] == b"m":
        out = [frames[0], frames[2]]
        if gate is not None and gate.max_message and len(frames[2]) > gate.max_message:
            out = _within_bound(out, gate.max_message)  # (a call only for the rare large one)
        if gate is not None and not gate.passes(out):
            return  # held: the task it ends stays open in task_ends until it is sent
        if task_ends is not None:
            task_ends.from_worker(frames[0], frames[2])
        hub.relay(MASTER, out)
    elif ((data is not None and len(frames) >= 5 and data.from_worker(hub, frames[0], frames[1:]))
          or (results is not None and len(frames) >= 4
              and results.from_worker(frames[0], frames[1:]))):
        pass
    elif results is not None and len(frames) == 3 and frames[1] == HOLD_FILE:
        results.from_worker_file(hub, frames[0], frames[2])
    elif len(frames) == 3 and frames[1] == b"n":
        msg = m.decode(frames[2])
        tell_if_alive(task_sync if isinstance(msg, _FOR_TASK_SYNC) else node,
                      Inbound(frames[0], None, msg))
    else:
        worker_refused(node, frames[0], f"{len(frames)} frames in no layout")


def worker_refused(node: pykka.ActorRef[Any], worker: bytes, what: str) -> None:
    """A frame of a worker refused on the hub thread (``what``): logged 1, 2, 4, 8... times;
    past ``WORKER_REFUSALS_ENDING`` in ``REFUSAL_INTERVAL_S``, the Node actor ends the worker."""
    sender = bytes(worker[:80]).decode(errors="replace")
    if refused := _malformed.count(sender):
        log.warning("worker_frame_refused", worker_id=sender, what=what, refused=refused)
    if _flooding.passed(sender, time.monotonic()):
        tell_if_alive(node, EndWorker(sender, f"more than {WORKER_REFUSALS_ENDING} frames the "
                                              f"node could not read in {REFUSAL_INTERVAL_S:.0f}s"))


def _says_hello(frames: list[bytes]) -> bool:
    return len(frames) == 3 and frames[1] == b"n" and message_tag(frames[2]) == b"Hello"


_unproven_count = 0
_malformed = logs.Refusals()  # a proven worker's frames that fit no layout (the hub thread's)
_flooding = logs.RefusalLimit(WORKER_REFUSALS_ENDING, REFUSAL_INTERVAL_S)  # (the hub thread's)


def _unproven(worker: bytes) -> None:
    """A frame from an id no worker proved (see "Proof"): dropped; said 1, 2, 4, 8... times."""
    global _unproven_count
    _unproven_count += 1
    if _unproven_count & (_unproven_count - 1) == 0:
        log.warning("unproven_worker_frame", worker=bytes(worker[:80]).decode(errors="replace"),
                    dropped=_unproven_count)


def _within_bound(frames: list[bytes], limit: int) -> list[bytes]:
    """A worker's ``[worker, body]`` for the master, or, when the body is larger than the master
    reads (``limit``, its ``Welcome``; 0: no bound), a failed ``TaskResult`` of the task it names
    in its place (from any worker of a task, a failure ends it): relayed, it would get this node
    cut off, and the task would wait forever (a unit argument or an exception of hundreds of MiB,
    or task code writing to its worker's socket)."""
    worker, body = frames
    if not limit or len(body) <= limit:
        return frames
    tag = bytes(message_tag(body)).decode(errors="replace")
    worker_id = bytes(worker).decode(errors="replace")
    error = MessageTooLarge(f"{tag or 'message'} from worker {worker_id}", len(body), limit)
    try:
        # (a TaskResults: each of its tasks fails. Ours gather 1 MiB at most: only a worker
        # that is not this runtime's says this much)
        task_ids = ([end.task_id for end in _ENDS_HEAD.decode(body).results]
                    if tag == m.TaskResults.__name__ else [_HEAD.decode(body).task_id])
    except msgspec.MsgspecError:
        task_ids = [""]
    log.warning("worker_message_too_large", worker_id=worker_id, type=tag, size=len(body),
                limit=limit, task_id=",".join(task_ids)[:100])
    from actors.serialize import describe_failure  # (rare: not on the node's start)

    payload, type_name, message, text = describe_failure(error)
    failed = [m.TaskResult(task_id, m.UnitOutcome(-1, False, payload, type_name, message, text))
              for task_id in task_ids]
    return [worker, m.encode(failed[0] if len(failed) == 1 else m.TaskResults(failed))]
