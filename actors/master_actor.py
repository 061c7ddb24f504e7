"""The Master actor: a thin shell around ``SchedulerState`` (its process, the command line
that starts it, is ``master.py``).

It keeps the table of peers (nodes and clients) with their handshake and
liveness, turns what they send into scheduler events, and turns the
scheduler's instructions into messages. It never unpickles user payloads.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import signal as signals
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgspec
import structlog

from actors import __version__, free_pools, memory
from actors import messages as m
from actors.core import scheduler_events as ev
from actors.core.packages import PackageVersion
from actors.core.scheduler_state import SchedulerState, TaskRecord, WorkerRecord
from actors.dashboard import BUILD_EVERY_S, Dashboard
from actors.errors import (
    CodeUnknown,
    DataUnreachable,
    InputFailed,
    InvalidEvent,
    MalformedMessage,
    MasterSuperseded,
    MemoryBudgetFull,
    QueueFull,
    TaskIdTaken,
    UnknownTask,
    WorkerKilled,
)
from actors.journal import RESULTS_BUFFERED, Journal, Restored, TaskRow
from actors.logs import debug_enabled
from actors.master_backlog import LOW, WINDOW, Backlog, Held
from actors.master_inputs import InputBook
from actors.metrics import MetricsServer, Snapshot
from actors.serialize import describe_exception
from actors.shell import HubShell, Inbound, PeerDisconnected, Tick
from actors.task_sync import Catalogue, InstanceUses
from actors.watch import (
    OUTPUT_LINES,
    OutputRings,
    TaskStream,
    Throughput,
    overview,
    task_detail,
    trimmed,
)
from transport import Hub
from transport.keys import AllowList

log = structlog.get_logger("actors.master")

SOCKET = "peers"
HEARTBEAT_S = 1.0
STORY_WAIT_S = 1.0  # how long a story request waits for workers that do not answer
MAX_RETRIES = 100
# A submit's task id and name: the scheduler, the journal and every story keep them.
MAX_ID_CHARS = 512
MAX_NAME_CHARS = 1024
MAX_SCATTERING = 8  # a client's large scatters announced to a node and not yet stored there
COMMIT_RETRY_MAX_S = 30.0  # the longest wait before trying again a journal that failed to write
# Code at least this big goes to a worker once: later assignments name it by its hash. Smaller
# code (a class pickled by reference) rides along with every assignment (cheaper than keeping
# track of it). A class shipped by value carries the source of its file for tracebacks, often
# kilobytes: it went with every task (10 KB each for the bench's tasks), copied by every hop.
INLINE_CODE_BYTES = 1024
KINDS = frozenset(ev.TaskKind)
MAX_CODE_PER_CLIENT = 1 << 30  # bytes of shipped task code the master keeps for one client
MAX_OUTPUT_LINES = 1_000  # lines of task output forwarded from one TaskOutput (workers cap too)
# Refused messages: logged up to REJECTIONS_LOGGED per key and interval; a key refused more than
# REJECTIONS_BLOCKED times in one is not heard for BLOCK_S (its peer keeps sending garbage). A
# worker's messages (relayed by its node) are counted apart, per worker: one past the bound is
# dropped and its node told to end it, and the node, with its other workers, is heard on.
REJECTION_INTERVAL_S = 10.0
REJECTIONS_LOGGED = 20
REJECTIONS_BLOCKED = 1_000
BLOCK_S = 60.0
# After a restart, a client with tasks in the journal that has not said Hello within this long
# is taken as gone: its tasks are cancelled and their results dropped.
CLIENT_GRACE_S = 60.0
# A client silent this long (it sends a heartbeat every 2 s) is taken as gone, as if it had said
# Bye: its unfinished tasks are cancelled and its code dropped.
# Tasks one key may have queued on the master, held back ones included (``--max-queued``):
# ~330 MB of the master's memory at the most, where a runaway loop would take it all.
MAX_QUEUED = 1_000_000
# Bytes one key's tasks may make the master hold (``--max-key-memory``; see _over_budget).
MAX_KEY_BYTES = 1 << 30
# The largest message the master reads (``--max-message``): a peer that sends a larger frame is
# cut off before it is read, so one frame cannot make the master allocate what it likes. A node
# sends a failure in place of a worker's larger message (node._within_bound). Never below
# what the runtime's own reports take (a run's inline results: m.RUN_INLINE_BYTES).
MAX_MESSAGE_BYTES = 1 << 30
MIN_MESSAGE_BYTES = 64 << 20
# The socket's own bound is this much higher: a batched frame carries up to ~1 MiB of other
# messages besides one at the bound (transport/hub.py, _BATCH_BYTES).
MESSAGE_SLACK = 4 << 20
CLIENT_TIMEOUT_S = 120.0
# Events after which the scheduling pass may wait for the next message's, while more are
# waiting: at most this many in a row.
DEFERRABLE = frozenset({ev.TaskSubmitted, ev.TaskFinished, ev.UnitsFinished})
MAX_DEFERRED = 64
ENDS_BYTES = 1 << 20  # the most a TasksEnded carries (a larger end goes alone)
_ENDS = (m.TaskResult, m.TaskResults)  # a worker's word of plain Tasks' ends
# What ends a task (``Master._task_ended``): its message to the client may wait for the others
# of the same call (_carry_out_all); ReportInputFailed is carried out last anyway.
_ENDINGS = frozenset({ev.ReportDone, ev.ReportErred, ev.ReportKilled, ev.ReportUnreachable,
                      ev.ReportOverBudget, ev.ReportCancelled})
# A node whose connection closed (its process killed, a reset, the transport's heartbeat timing
# out on a cut link) is lost unless it is heard again within this long (it reconnects in < 1 s).
NODE_SUSPECT_S = 2.0
# A known node's Hello with a new handshake sooner than this after its last is not taken yet
# (each costs a node lost and joined; see _hello).
RECONNECT_MIN_S = 1.0
# Task ends a client has not said it received, kept for it (without a state directory)
UNRECEIVED_BYTES = 64 << 20
# A message this long after the last tick means the process was paused (SIGSTOP, a frozen VM):
# before acting on it, the master asks the journal whether a newer master took over meanwhile
# (each tick asks too).
PAUSED_S = 2.0
# A node back after losing its master reports at most this many busy workers, each holding at
# most this many tasks (a running one and the prefetched ones queued behind it).
MAX_REPORTED_WORKERS, MAX_REPORTED_TASKS = 4_096, 128
# Unit results of a worker stopped at its node's return, held by the node while the master was
# away, are still taken (``UnitsSalvaged``) for this long after the node's Hello.
SALVAGE_S = 30.0
MAX_LOAD_ERRORS = 100  # modules of one package version marked broken by a worker's failed import
# Tasks gone since the last high-water mark before the master gives memory back (memory.py).
TRIM_AFTER = 20_000  # (or a tenth of that once nothing is queued or running)
REPACK_IDLE_S = 2.0  # quiet this long after a backlog drained: its survivors are repacked
# ... and as long again, a second time: what was alive only around the first (a tick's passing
# objects) held a few of the arenas the first one filled.
REPACKS = 2


@dataclass
class Peer:
    role: str
    peer_id: str
    last_seen: float
    host: str = ""
    pid: int = 0
    key: bytes = b""  # the public key it proved at the handshake; its routing id is bound to it
    routing: bytes = b""  # its routing id on the master's socket
    suspect_since: float | None = None  # when the transport saw its connection close
    handshake: int = 0  # a node's: the Hello.handshake it was welcomed with
    joined: float = 0.0  # when that Hello was welcomed
    # ``key`` as text, the owner of its tasks: one string shared by all of them (decoded for
    # each, it took ~90 bytes of every queued task).
    owner: str = ""
    holding_said: bool = False  # a client's Holding, taken once a Hello (each walks its refs)


@dataclass
class Unreceived:
    """The ends sent to a client that it has not said it received, oldest first, at most
    ``UNRECEIVED_BYTES`` of them (a master without a state directory; a journal keeps them)."""

    ends: OrderedDict[str, bytes] = field(default_factory=OrderedDict)
    size: int = 0
    resent: float = -RECONNECT_MIN_S  # when they were last sent again
    said_full: bool = False

    def add(self, task_id: str, ended: bytes) -> bool:
        """Keep it; True if older ones were let go to stay within the bound."""
        if (before := self.ends.pop(task_id, None)) is not None:  # (received(), inline)
            self.size -= len(before)
        self.ends[task_id] = ended
        self.size += len(ended)
        full = False
        while self.size > UNRECEIVED_BYTES and len(self.ends) > 1:
            self.size -= len(self.ends.popitem(last=False)[1])
            full = True
        return full

    def received(self, task_id: str) -> None:
        ended = self.ends.pop(task_id, None)
        if ended is not None:
            self.size -= len(ended)


@dataclass
class Scattering:
    """A client's large scatter under way: the node it goes to ("" while no node can hold it:
    it waits for one to join), and what that node is told to expect."""

    node_id: str
    client_id: str
    owner: str  # the client's key (Z85), which the node admits to its results socket
    size: int
    told: bool = False  # the client was told where (ScatterAt)


class _Admitted(NamedTuple):
    """What a submission's tasks share, checked (``Master._submission``)."""

    name: str
    kind: str
    code: bytes  # the class's, found by its hash; b"" for a deployed task
    code_hash: str
    priority: int
    retries: int
    package: str  # a deployed task's package version, pinned at submit
    version: str


@dataclass
class _Burst:
    """The tasks of one SubmitMany admitted for the scheduler, handed to it in one call."""

    events: list[ev.Event] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    bytes: int = 0  # their arguments' (not yet counted by the scheduler: budget checks add it)
    # What the key's bounds leave the burst, as its start found them (a budget's counted
    # from above): tasks and bytes admitted within them need no check each; past them, the
    # full one (``_queue_full``, ``_over_budget``) says. Admitted so far, held back or not:
    queue_room: int = 0
    budget_room: int = 0
    admitted: int = 0
    admitted_bytes: int = 0


@dataclass
class StoryGather:
    """A client's story request, waiting for the parts of the task's workers."""

    client_id: str
    task_id: str
    waiting: set[str]
    entries: list[tuple[str, str, str, str, float]]
    deadline: float


class Master(HubShell):
    def __init__(self, hub: Hub, journal: Journal, restored: Restored, *,
                 node_timeout_s: float = 5.0, max_deaths: int = 3,
                 restart_after_error: bool = False, allowed: str | None = None,
                 on_crash: Callable[[], None] | None = None,
                 on_superseded: Callable[[], None] | None = None,
                 metrics: MetricsServer | None = None,
                 dashboard: Dashboard | None = None, address: str = "",
                 client_timeout_s: float = CLIENT_TIMEOUT_S,
                 max_queued: int = MAX_QUEUED, max_key_bytes: int = MAX_KEY_BYTES,
                 max_message: int = MAX_MESSAGE_BYTES) -> None:
        """``journal``: the state directory's journal, already started (``restored`` is what it
        held). ``allowed``: the allow-list folder, whose file names give each key its role
        (None: peers are taken at their word, for a master without CURVE)."""
        super().__init__(hub)
        self._on_crash = on_crash
        self._on_superseded = on_superseded
        self.journal = journal
        self.restored: Restored | None = restored
        self.superseded = False
        self.client_timeout_s = client_timeout_s  # 0: clients are never timed out
        self.max_queued = max_queued  # tasks one key may have queued, held ones included (0: any)
        self.queue_full: set[str] = set()  # owners told so, logged once until they are below
        self.max_key_bytes = max_key_bytes  # what one key's tasks may hold here (0: any)
        self.max_message = max_message  # the largest message read, said in Welcome (0: any)
        self.budget_full: set[str] = set()  # owners past it, logged once until they are below
        # Clients taken as gone, newest last: one that comes back learns its tasks were stopped.
        self.lost_clients: OrderedDict[str, list[str] | None] = OrderedDict()
        # Routing ids of nodes declared lost: what they still send until they notice is expected.
        self.lost_nodes: OrderedDict[bytes, None] = OrderedDict()
        self.deferred = 0  # events handled since the last scheduling pass (see _apply)
        self.batch_left = 0  # messages of the batch being handled still to come (see _apply)
        # Tasks' ends heard in the batch being handled (and who sent each), for the scheduler
        # in one call: empty but within a batch (``_finishing``).
        self.finished_batch: list[tuple[ev.Event, Peer, str, m.Message]] = []
        # Within _carry_out_all: the tasks' ends for each client, sent together at its end
        self.ends_out: dict[str, list[bytes]] | None = None
        self.metrics = metrics
        self.stats = Snapshot()  # counters since start, published to /metrics on the tick
        # What people watch (actors/watch.py): all bounded. The dashboard's HTTP threads get
        # JSON built from these on the tick, never these.
        self.dashboard = dashboard
        self.address = address
        self.outputs = OutputRings()  # each task's last lines, for `actors logs` and the page
        self.stream = TaskStream()  # runs per worker over time (recorded with a dashboard only)
        self.throughput = Throughput()
        self.board_built = 0.0
        self.started_at = time.time()
        master_id = journal.master_id
        self.master_id = master_id
        self.node_timeout_s = node_timeout_s
        self.peers: dict[bytes, Peer] = {}
        self.allowed = AllowList(allowed) if allowed is not None else None
        # (key, routing id) -> (messages refused, since when); -> until when it is not heard
        self.rejections: dict[tuple[bytes, bytes], tuple[int, float]] = {}
        self.blocked: dict[tuple[bytes, bytes], float] = {}
        self.scheduler = SchedulerState(max_deaths=max_deaths,
                                        restart_after_error=restart_after_error)
        self.catalogue: dict[str, PackageVersion] = {}
        self.task_sync: Any = None  # the TaskSyncServer's ref, once started
        # Why this master's own node is not running and will not be started again ("" while
        # it runs, or where there is none): told to clients, who would wait for its workers.
        self.local_node_failed = ""
        self.now = 0.0
        self.stories: list[StoryGather] = []  # story requests waiting for workers' parts
        # The code each client shipped, by content hash: sent once, named by its hash after.
        self.codes: dict[str, dict[str, bytes]] = {}
        self.seq = 0  # submission order, kept in the journal
        self.started: set[str] = set()  # tasks given a driver since the last tick
        self.taken_back: dict[str, list[str]] = {}  # worker -> tasks an event asked it back for
        self.awaiting: dict[str, float] = {}  # restored clients not back yet -> until when
        self.last_tick = 0.0
        # worker -> hashes of the code it was sent, oldest first, as many as it keeps
        self.worker_codes: dict[str, dict[str, None]] = {}
        # Large results held on nodes (node_results.py): each node's results endpoint and key;
        # a result reported held, until the scheduler ends its task; one shared with its
        # client, until the client says it arrived (task -> node, client).
        self.result_ends: dict[str, tuple[str, str]] = {}
        # Each node's data address and its endpoint for peers of its host (LocalPeers).
        self.local_data: dict[str, tuple[str, str]] = {}
        self.leaving: dict[str, tuple[str, str, int]] = {}  # task -> node, worker, size
        self.inputs = InputBook()  # results kept for later tasks' arguments (master_inputs.py)
        # Submissions past a client's window of queued tasks, held back (master_backlog.py)
        self.backlog = Backlog()
        self.refilling = False
        self.fetched: set[str] = set()  # held results their client has (Received), still kept
        self.scattering: dict[str, Scattering] = {}  # large scattered data under way
        self.scatter_turn = 0  # the node the next large scatter goes to, in turn
        self.delivering: dict[str, tuple[str, str]] = {}
        # Without a state directory (the journal keeps no ends): client -> the ends sent it that
        # it has not said it received, sent again when it says Hello again (its connection
        # dropped with them in it). A durable journal keeps these itself.
        self.unreceived: dict[str, Unreceived] = {}
        self.unit_totals: dict[str, int] = {}  # ParallelTask -> the units its driver declared
        self.task_steps: dict[str, tuple[int, int]] = {}  # running Task -> the progress it said
        self.item_maps: set[str] = set()  # batched maps not ended (Submit.items): ForwardItems
        # client id -> its key (whose tasks are whose); those of the journal's clients at once:
        # a client back after a restart is one only with its key
        self.client_keys: dict[str, bytes] = dict(restored.keys)
        self.commit_failures = 0  # journal commits failed in a row (see _commit)
        self.commit_retry_at = 0.0
        # worker stopped at its node's return -> (its node, the tasks it held, until when its
        # held unit results are still taken)
        self.salvage: dict[str, tuple[str, frozenset[str], float]] = {}
        self.held_peak = 0  # the most tasks and futures held since memory was last given back
        self.idle_since: float | None = None  # when the scheduler last became idle
        self.repacks_due = 0  # memory was given back after a backlog: repack once quiet
        self.worker_usage: dict[str, tuple[float, int]] = {}  # worker -> (CPU %, bytes), for the page
        # (package, version) -> module -> what importing it on a worker raised
        self.load_errors: dict[tuple[str, str], dict[str, str]] = {}
        self.last_run: dict[str, float] = {}  # deployed task name -> when one last started
        self.log = log.bind(role="master", master_id=master_id)
        self.debug = debug_enabled(self.log)  # (per-task lines at debug: asked once)

    def on_start(self) -> None:
        super().on_start()
        self.now = time.monotonic()
        self.last_tick = self.now

    def on_stop(self) -> None:
        if not self.superseded:
            self._commit(force=True)  # a clean stop keeps what is buffered (main closes it)
        super().on_stop()

    def _restore_once(self) -> None:
        if self.restored is not None:
            restored, self.restored = self.restored, None
            self._restore(restored)

    def _restore(self, restored: Restored) -> None:
        """Queue again what the last master on this state directory left, in its order."""
        self.codes = restored.codes
        clients = {row.client for row in restored.tasks}
        # Whose tasks they are, as for a live submit (Peer.owner): the budgets count by key.
        owners = {c: self._key_text(c) for c in clients}
        # Every task's result is kept for the tasks that name it, as for a live submit; one
        # that ended before (its end waiting for its client) keeps its result for them too.
        for row in restored.tasks:
            self.inputs.submitted(row.task_id, row.client, row.inputs)
        for row in restored.tasks:
            if row.ended is not None and self.inputs.users.get(row.task_id):
                self._restore_kept(row.task_id, row.ended)
        for row in restored.tasks:
            self.seq = max(self.seq, row.seq + 1)
            if row.ended is not None:
                continue  # its end waits for its client (undelivered)
            code = row.code or self.codes.get(row.client, {}).get(row.code_hash, b"")
            self._apply(ev.TaskSubmitted(self.now, task_id=row.task_id, client_id=row.client,
                                         name=row.name, kind=row.kind, code=code, args=row.args,
                                         priority=row.priority, package=row.package,
                                         version=row.version, retries=row.retries,
                                         code_hash=row.code_hash, owner=owners[row.client],
                                         journaled=tuple(restored.journaled.get(row.task_id, ())),
                                         restored=True, inputs=row.inputs))
            if row.package and self.task_sync is not None:
                self.task_sync.tell(InstanceUses(row.package, row.version, row.task_id, ended=False))
        back = {p.peer_id for p in self.peers.values() if p.role == "client"}
        self.awaiting = {client: self.now + CLIENT_GRACE_S for client in clients - back}
        if restored.tasks:
            self.log.info("master_restored", epoch=self.journal.epoch, tasks=len(restored.tasks),
                          queued=sum(1 for r in restored.tasks if r.ended is None),
                          undelivered=sum(1 for r in restored.tasks if r.ended is not None),
                          clients=len(clients))

    def _restore_kept(self, task_id: str, ended: bytes) -> None:
        """A restored task's end, for the restored tasks that name it as an input."""
        try:
            message = m.decode(ended)
        except MalformedMessage:
            return
        if isinstance(message, m.TaskDone):
            self.inputs.ended(task_id, "done", message.result if message.held is None else None)
        elif isinstance(message, m.TaskErred | m.TaskCancelled):
            self.inputs.ended(task_id, "erred" if isinstance(message, m.TaskErred) else "cancelled")

    def context_of(self, message: Any) -> dict[str, Any]:
        task_id = getattr(getattr(message, "message", None), "task_id", None)
        if not isinstance(task_id, str) or task_id not in self.scheduler.tasks:
            return {}
        return {"task_id": task_id, "story": self.scheduler.story(task_id)[-10:]}

    def refused(self, message: Any, exc: InvalidEvent) -> None:
        """What the scheduler refused comes from a peer: counted and logged as any refusal of
        that peer's (a bounded number of lines an interval; a peer refused past that is not
        heard for a while), where a flood of them logged a line each."""
        if not isinstance(message, Inbound):
            super().refused(message, exc)
            return
        context = self.context_of(message)
        reason = exc.reason + (f" (task {context['task_id']})" if context else "")
        self._reject(message, "message_refused", reason, self.peers.get(message.peer))

    def check_state(self) -> None:
        self.scheduler.validate()

    def on_crash(self) -> None:
        # A master without its actor would leave every client waiting on a silent socket.
        if self._on_crash is not None:
            self._on_crash()

    # --- input --------------------------------------------------------------

    def receive(self, message: Any) -> Any:
        match message:
            case _ if self.superseded:
                pass  # a newer master owns the journal: this one only waits to be stopped
            case Inbound():
                self._heard(message)
                if self.deferred and self.actor_inbox.empty() and not self.superseded:
                    self._apply(ev.Tick(self.now))  # the pass the burst's events left owed
            case list():  # the messages of one batched frame (main's on_batch): one hand-off
                flush_held = self.hub.flush_held
                for done, inbound in enumerate(message, 1):
                    if self.finished_batch and type(inbound.message) not in _ENDS:
                        self.receive_guarded(self._flush_finished, None)  # (they come first)
                    self.batch_left = len(message) - done  # (waiting, as a mailbox's: _apply)
                    self.receive_guarded(self._heard, inbound)
                    flush_held()  # what this batch had to send waits for no more of it
                self.batch_left = 0
                if self.finished_batch:
                    self.receive_guarded(self._flush_finished, None)
                    flush_held()
                if self.deferred and self.actor_inbox.empty() and not self.superseded:
                    self._apply(ev.Tick(self.now))
            case PeerDisconnected(routing=routing):
                self._disconnected(routing)
            case Tick(now=now):
                if not self._still_mine():  # one small read a tick: the fencing token
                    return None
                self.now = self.last_tick = now
                self._restore_once()
                self._check_liveness()
                self._clients_not_back()
                self._tell_running()
                if self.metrics is not None:
                    self.metrics.publish(self._snapshot())
                self._apply(ev.Tick(now))
                for worker_id in [w for w in self.worker_codes if w not in self.scheduler.workers]:
                    del self.worker_codes[worker_id]
                for worker_id in [w for w in self.worker_usage if w not in self.scheduler.workers]:
                    del self.worker_usage[worker_id]
                self._forget_old_rejections()
                self._give_memory_back()
                if self.salvage:
                    self.salvage = {w: s for w, s in self.salvage.items() if s[2] > now}
                self._stories_due()
                self._commit()
                self._watch(now)
            case Catalogue(packages=packages):
                self._catalogue(packages)
            case ("task_sync", ref):
                self.task_sync = ref
                self._restore_once()
            case ("local_node_failed", str(reason)):
                self.local_node_failed = reason
            case _:
                raise TypeError(f"master got an unknown message: {message!r}")
        return None

    def _give_memory_back(self) -> None:
        """Once a backlog of ``TRIM_AFTER`` tasks or more has gone, rebuild the tables it left
        oversized and return the freed pages (see memory.py): a long-lived master on a shared
        machine goes back near its idle size. Once nothing has run for ``REPACK_IDLE_S`` after
        that, what outlives the burst is moved into fresh memory (``pack_finished``). The
        futures clients hold count with the tasks: a client may let 10^5 go long after they
        finished, and the table that named them is then as oversized."""
        held = self._held()
        self.held_peak = max(self.held_peak, held)
        gone = self.held_peak - held
        idle = self.scheduler.idle()
        self.idle_since = (self.idle_since or self.now) if idle else None
        if gone < TRIM_AFTER and not (gone >= TRIM_AFTER // 10 and idle):
            if (self.repacks_due and self.idle_since is not None
                    and self.now - self.idle_since >= REPACK_IDLE_S * (REPACKS + 1 - self.repacks_due)):
                self._repack()
            return
        before = memory.rss_bytes()
        self._compact()
        memory.trim()
        self.log.info("memory_given_back", held_peak=self.held_peak, held=held,
                      rss_mb_before=before >> 20, rss_mb=memory.rss_bytes() >> 20)
        self.held_peak = held
        self.repacks_due = REPACKS

    def _held(self) -> int:
        return len(self.scheduler.tasks) + len(self.backlog) + len(self.inputs.refs)

    def _compact(self) -> None:
        """Rebuild the tables a backlog left oversized (a dict never shrinks its table as
        entries go); no content changes."""
        self.scheduler.compact()
        self.journal.compact()
        self.inputs.compact()
        self.backlog.compact()
        self.unit_totals, self.task_steps = dict(self.unit_totals), dict(self.task_steps)
        self.item_maps = set(self.item_maps)

    def _repack(self) -> None:
        """Drained and quiet: the finished tasks kept for their stories and the dashboard's
        recent runs were allocated all through the burst, a few in each of the allocator's
        arenas, and an arena goes back to the system only when nothing in it lives. All of
        them out as pickles first (their arenas freed), then back into fresh memory."""
        before, started = memory.rss_bytes(), time.perf_counter()
        self.repacks_due -= 1
        # what emptied since the last compaction without reaching TRIM_AFTER (a table of 10^5
        # task ids is 3.7 MB however few it still holds)
        self._compact()
        parts: tuple[tuple[Callable[[], bytes], Callable[[bytes], None]], ...] = (
            (self.scheduler.pack_finished, self.scheduler.unpack_finished),
            (self.stream.pack, self.stream.unpack),
            (self.throughput.pack, self.throughput.unpack))
        packed: list[tuple[Callable[[bytes], None], bytes]] = []
        try:
            for pack, unpack in parts:
                packed.append((unpack, pack()))
            gc.collect()
            memory.trim()
        except Exception:  # a bug: what was packed goes back all the same
            self.log.exception("memory_repack_failed")
        finally:
            for unpack, blob in packed:
                unpack(blob)
            del packed
        # what is left pinned: arenas a few survivors keep, their free pools still resident
        released = free_pools.release()
        memory.trim()
        self.log.info("memory_repacked", tasks=len(self.scheduler.tasks), held=self._held(),
                      rss_mb_before=before >> 20, rss_mb=memory.rss_bytes() >> 20,
                      free_pools_mb=round(released / 2**20, 1),
                      ms=round((time.perf_counter() - started) * 1000))

    def _commit(self, *, force: bool = False) -> None:
        """Write the journal; acknowledge to each client the submissions this made durable.
        A commit that fails (disk full, an I/O error, the file locked by another process) is
        tried again later, waiting longer each time: meanwhile the master serves on, and what
        it could not write stays unacknowledged, for clients to send again if it dies."""
        if self.now < self.commit_retry_at and not force:
            return
        started = time.perf_counter()
        try:
            added = self.journal.commit()
            self.stats.commit_seconds += time.perf_counter() - started
            self.stats.commits += 1
        except MasterSuperseded as exc:
            self._superseded(exc)
            return
        except Exception as exc:  # raised in the middle of an event's instructions otherwise
            self.commit_failures += 1
            wait = min(COMMIT_RETRY_MAX_S, 0.5 * 2 ** min(self.commit_failures - 1, 6))
            self.commit_retry_at = self.now + wait
            self.log.error("journal_commit_failed", error=f"{type(exc).__name__}: {exc}",
                           failures=self.commit_failures, retry_in_s=wait,
                           hint="submissions are acknowledged once a commit succeeds")
            return
        if self.commit_failures:
            self.log.warning("journal_commit_resumed", failures=self.commit_failures)
            self.commit_failures, self.commit_retry_at = 0, 0.0
        accepted: dict[str, list[str]] = {}
        for row in added:
            accepted.setdefault(row.client, []).append(row.task_id)
        for client_id, task_ids in accepted.items():
            if client_id.encode() in self.peers:  # not to a client that left meanwhile
                self._to_client(client_id, m.Accepted(task_ids))

    def _still_mine(self) -> bool:
        """Whether the journal is still this master's; if not, it stops."""
        newer = self.journal.current_epoch()
        if newer == self.journal.epoch:
            return True
        self._superseded(MasterSuperseded(self.journal.path, self.journal.epoch, newer))
        return False

    def _superseded(self, exc: MasterSuperseded) -> None:
        self.superseded = True
        self.log.error("master_superseded", error=str(exc), epoch=self.journal.epoch,
                       newer_epoch=exc.newer)
        if self._on_superseded is not None:
            self._on_superseded()

    def _clients_not_back(self) -> None:
        for client_id in [c for c, until in self.awaiting.items() if until <= self.now]:
            del self.awaiting[client_id]
            self.log.warning("client_not_back", client_id=client_id, seconds=CLIENT_GRACE_S,
                             hint="its tasks from before the restart are cancelled")
            self._client_gone(client_id)

    def _client_gone(self, client_id: str) -> None:
        self._drop_held(client_id)  # first: a detached one needs its code
        self.codes.pop(client_id, None)
        self.inputs.client_gone(client_id)
        self._drop_results([t for t, (_, c) in self.delivering.items() if c == client_id])
        for task_id in [t for t, s in self.scattering.items()
                        if s.client_id == client_id and not s.node_id]:
            del self.scattering[task_id]  # waiting for a node: nobody will send it now
        self._apply(ev.ClientLeft(self.now, client_id))
        self.journal.client_left(client_id)
        self.unreceived.pop(client_id, None)  # (after ClientLeft: its cancels end tasks too)
        if not any(t.client_id == client_id for t in self.scheduler.tasks.values()):
            self.client_keys.pop(client_id, None)  # (its tasks, while kept, stay listed)

    def _heard(self, inbound: Inbound) -> None:
        # The shell owns the clock (the core gets time on events): a peer heard before the
        # first tick must not look silent since time zero.
        if self.superseded:
            return  # (found so by an earlier message of the same batch)
        self.now = time.monotonic()
        if self.now - self.last_tick > PAUSED_S:
            if not self._still_mine():
                return
            # Checked: not again for each message of a backlog (one SQLite read each would
            # slow a master already behind), only after another such gap.
            self.last_tick = self.now
        self._inbound(inbound)

    def _inbound(self, inbound: Inbound) -> None:
        msg, peer_key = inbound.message, inbound.peer
        if self.blocked and self.blocked.get(self._who(inbound), 0.0) > self.now:
            return  # a peer that kept sending what it may not: not heard for a while
        peer = self.peers.get(peer_key)
        if peer is not None and inbound.key != peer.key:
            # Another key using a known peer's routing id: never that peer's messages.
            self._reject(inbound, "message_with_another_key", "the routing id is another key's")
            return
        if isinstance(msg, m.Hello):
            if inbound.via is not None:  # a worker (its task's code) speaking as its node
                self._reject(inbound, "message_refused", "a worker cannot say Hello to the master")
            else:
                self._hello(peer_key, msg, inbound.key)
            return
        if peer is None:
            if inbound.via is not None:
                # A worker's message relayed by a node we declared lost: its runs were requeued.
                # The node learns it is forgotten from the answer to its own next message.
                self.log.debug("dropped_from_unknown_node", type=type(msg).__name__)
                return
            # A heartbeat from a peer of a master that restarted (or declared it gone) is
            # expected: it says Hello on hearing the answer (a debug line, not a warning storm).
            if self._reject(inbound, "message_from_unknown_peer", "unknown peer",
                            quiet=isinstance(msg, m.Heartbeat) or peer_key in self.lost_nodes):
                self.send(SOCKET, peer_key, message=m.Refused("unknown peer: send Hello first"))
            return
        peer.last_seen = self.now
        if peer.suspect_since is not None:
            peer.suspect_since = None
            self.log.info("node_back", node_id=peer.peer_id)
        if isinstance(msg, m.ChunkRequest):  # package contents: for nodes only
            if peer.role == "node" and inbound.via is None and self.task_sync is not None:
                self.task_sync.tell(inbound)
            else:
                self._unexpected(peer, msg)
            return
        if inbound.via is not None:
            self._from_worker(peer, inbound.via.decode(errors="replace"), msg)
        elif peer.role == "node":
            self._from_node(peer, msg)
        else:
            self._from_client(peer, msg)

    def _hello(self, peer_key: bytes, hello: m.Hello, key: bytes) -> None:
        problem = ""
        role = hello.role if self.allowed is None else self.allowed.role_of(key)
        if role is None:
            problem = ("this key has no role in the master's allow-list (its file in allowed/ "
                       "is named node*.key or client*.key)")
        elif hello.role != role:
            problem = f"a {role} key cannot connect as a {hello.role}"
        elif hello.peer_id.encode() != peer_key:
            # Messages to a node or client go to the routing id named after it: one that
            # claimed another's id would speak for that peer.
            problem = "a peer's id is its connection's identity"
        elif hello.role == "client" and self.client_keys.get(hello.peer_id, key) != key:
            # Its tasks' ends would go to whoever says its id (after a restart, or once it was
            # taken as gone): only its own key may.
            problem = "this client id is another key's"
        elif hello.protocol != m.PROTOCOL_VERSION:
            problem = f"protocol {hello.protocol} != master's {m.PROTOCOL_VERSION}"
        elif hello.version != __version__:
            problem = f"pydra-actors {hello.version} != master's {__version__}"
        elif hello.role not in ("node", "client"):
            problem = f"role {hello.role!r} cannot connect to a master"
        elif (len(hello.running) > MAX_REPORTED_WORKERS
              or any(len(held) > MAX_REPORTED_TASKS for _, held in hello.running)):
            problem = (f"a node reports at most {MAX_REPORTED_WORKERS} busy workers, "
                       f"{MAX_REPORTED_TASKS} tasks each")
        if problem:
            if self._reject(Inbound(peer_key, None, hello, key), "handshake_refused", problem):
                self.send(SOCKET, peer_key, message=m.Refused(problem))
            return
        known = self.peers.get(peer_key)
        if (known is not None and known.role == hello.role and known.peer_id == hello.peer_id
                and known.handshake == hello.handshake):
            # The same Hello again (our Welcome was slow to reach it): welcome it again, as it is.
            known.last_seen = self.now
            self._welcome(peer_key, hello)
            return
        if known is not None and known.role == "node" and known.peer_id == hello.peer_id and (
                hello.handshake < known.handshake or self.now - known.joined < RECONNECT_MIN_S):
            # An older Hello (overtaken), or a node saying it lost us again at once: each new
            # one costs a node lost and joined, and an honest node's says so at most every few
            # seconds (a heartbeat's timeout). Not answered: its next Hello, 2 s on, is taken.
            self._reject(Inbound(peer_key, None, hello, key), "hello_ignored",
                         f"handshake {hello.handshake} after {known.handshake} "
                         f"{self.now - known.joined:.1f}s ago", known, quiet=True)
            return
        if known is not None and known.role == "node":
            # Its connection dropped (a pause, a cut link) and it came back before it was taken
            # as lost: what either side sent meanwhile may be gone with the connection (a unit's
            # result, an assignment), and nothing sends it again. What it still runs is taken
            # back as for a node back after a master restart; the rest is queued again.
            self.log.warning("node_reconnected", node_id=known.peer_id,
                             running=len(hello.running),
                             hint="its connection dropped: its work is taken back")
            self._apply(ev.NodeLost(self.now, known.peer_id, "its connection dropped"))
        owner = key.decode(errors="replace")
        self.peers[peer_key] = Peer(hello.role, hello.peer_id, self.now, hello.host, hello.pid, key,
                                    peer_key, owner=owner, handshake=hello.handshake,
                                    joined=self.now)
        if hello.role == "node":
            self.result_ends[hello.peer_id] = (hello.results_address, owner)
            self.local_data[hello.peer_id] = (hello.data_address, hello.local_data)
            self._apply(ev.NodeJoined(self.now, hello.peer_id, hello.data_address))
            self._send_newest(peer_key)
        self.log.info(f"{hello.role}_joined", peer=hello.peer_id, host=hello.host, pid=hello.pid,
                      slots=hello.slots)
        if hello.running:
            self._take_back(hello)
        self._welcome(peer_key, hello)
        if hello.role == "node":
            self._tell_local_peers()
            self._scatters_moved(None)  # (after its Welcome: what it is told before, it drops)

    def _tell_local_peers(self) -> None:
        """Every node learns every node's data endpoints; those of its own host and uid it
        reaches by ipc (node_data.DataPlane.local_peers)."""
        peers = m.LocalPeers([ends for node, ends in sorted(self.local_data.items())
                              if node in self.scheduler.nodes and ends[1]])
        if not peers.peers:
            return
        for peer in self.peers.values():
            if peer.role == "node" and self.local_data.get(peer.peer_id, ("", ""))[1]:
                self.send(SOCKET, peer.routing, message=peers)  # (a node with none uses none)

    def _take_back(self, hello: m.Hello) -> None:
        """A node back after losing us: take back the tasks its workers still run where the
        scheduler can; the other workers are stopped, and the unit results they finished
        meanwhile (the node sends them after our Welcome) are kept for a while."""
        self._restore_once()  # what the journal holds first: the tasks to take back
        node_id, adopted, stopped = hello.peer_id, 0, 0
        for worker_id, task_ids in hello.running:
            if not worker_id.startswith(f"{node_id}/"):
                continue  # a node names its workers NODE_ID/...
            self._apply(ev.WorkerAdopted(self.now, node_id, worker_id, tuple(task_ids)))
            worker = self.scheduler.workers.get(worker_id)
            if worker is not None and worker.node_id == node_id:
                adopted += 1
            else:
                stopped += 1
                self.salvage[worker_id] = (node_id, frozenset(task_ids), self.now + SALVAGE_S)
        self.log.info("node_work_taken_back", node_id=node_id, workers_adopted=adopted,
                      workers_stopped=stopped)

    def _welcome(self, peer_key: bytes, hello: m.Hello) -> None:
        """Welcome; a client back after a restart also gets the ends of its tasks that it has
        not said it received (a client welcomed again sends its unacknowledged submits)."""
        self.send(SOCKET, peer_key, message=m.Welcome(self.master_id, hello.peer_id, HEARTBEAT_S,
                                                      self.journal.epoch, self.max_message))
        if hello.role != "client":
            return
        key = self.peers[peer_key].key
        if self.client_keys.get(hello.peer_id) != key:
            self.client_keys[hello.peer_id] = key
            self.journal.client_key(hello.peer_id, key)
        if self.awaiting.pop(hello.peer_id, None) is not None:
            self.log.info("client_back", client_id=hello.peer_id)
        if hello.peer_id in self.lost_clients:  # it was silent too long: its tasks were stopped
            held = self.lost_clients.pop(hello.peer_id) or []  # those held back, dropped
            for task in self.scheduler.tasks.values():
                if task.client_id == hello.peer_id and task.state is ev.TaskStatus.CANCELLED:
                    self.send(SOCKET, peer_key, message=m.TaskCancelled(task.task_id))
            for task_id in held:
                self.send(SOCKET, peer_key, message=m.TaskCancelled(task_id))
        undelivered = self.journal.undelivered(hello.peer_id)
        kept = self.unreceived.get(hello.peer_id)
        if not undelivered and kept is not None and self.now - kept.resent >= RECONNECT_MIN_S:
            kept.resent = self.now  # (a client saying Hello in a loop is not sent them each time)
            undelivered = list(kept.ends.items())
        for task_id, ended in undelivered:
            if task_id not in self.delivering:
                self._delivering_again(task_id, hello.peer_id, ended)
            self.send(SOCKET, peer_key, frames=[ended])

    def _from_node(self, peer: Peer, msg: m.Message) -> None:
        match msg:
            case m.Heartbeat():
                pass
            case m.Scattered():
                self._scattered(peer, msg)
            case m.ScatterExpected():
                self._scatter_expected(peer, msg)
            case m.WorkerReady(worker_id=worker_id) if not worker_id.startswith(f"{peer.peer_id}/"):
                self._refused(peer, msg, "a node names its workers NODE_ID/...")
            case m.WorkerReady(worker_id=worker_id, pid=pid):
                self.log.debug("worker_ready", node_id=peer.peer_id, worker_id=worker_id, pid=pid)
                self._apply(ev.WorkerReady(self.now, peer.peer_id, worker_id))
            case m.WorkerExited(worker_id=worker_id) if self._others_worker(peer, worker_id):
                self._refused(peer, msg, f"{worker_id} is not this node's worker")
            case m.WorkerExited():
                cause = describe_exit(msg)
                event = "worker_stopped" if msg.expected else "worker_died"
                (self.log.info if msg.expected else self.log.warning)(
                    event, node_id=peer.peer_id, worker_id=msg.worker_id, cause=cause)
                if not msg.expected:
                    kind = (f"signal {msg.signal}" if msg.signal is not None
                            else f"exit {msg.exitcode}")
                    deaths = self.stats.worker_deaths
                    deaths[kind] = deaths.get(kind, 0) + 1
                self._apply(ev.WorkerLost(self.now, msg.worker_id, cause, msg.expected))
            case m.WorkerStats(workers=stats) if len(stats) > MAX_REPORTED_WORKERS:
                self._refused(peer, msg, f"at most {MAX_REPORTED_WORKERS} workers a report")
            case m.WorkerStats(workers=stats):
                for worker_id, cpu, rss in stats:
                    if self._owns_worker(peer, worker_id):
                        self.worker_usage[worker_id] = (cpu, rss)
            case m.Bye(reason=reason):
                self._node_gone(peer, f"node left: {reason}")
            case _:
                self._unexpected(peer, msg)

    def _from_worker(self, node: Peer, worker_id: str, msg: m.Message) -> None:
        if node.role != "node":
            self._unexpected(node, msg)
            return
        if not self._owns_worker(node, worker_id):
            if isinstance(msg, m.UnitsDone) and self._salvaged(node, worker_id, msg):
                return
            # A worker the scheduler has dropped (its node was told to stop it) may still speak;
            # one of another node's never.
            known = self.scheduler.workers.get(worker_id)
            if known is not None:
                self._refused_worker(node, worker_id, msg, f"{worker_id} is not this node's worker")
            return
        match msg:
            case m.UnitsSliced(task_id=task_id, units=units, done=done):
                self._apply(ev.UnitsSliced(self.now, worker_id, task_id, units, done,
                                           self._room_for_units(task_id)))
            case m.UnitsDone(task_id=task_id, run_id=run_id, outcomes=outcomes, elapsed=elapsed):
                failed = sum(1 for o in outcomes if not o.ok)
                # (a pack's outcome counts its units: the worker's word, bounded, for counters)
                packed = sum(min(o.count, m.MAX_PACK) - 1 for o in outcomes if o.count > 1 and o.ok)
                self.stats.units_done += len(outcomes) - failed + packed
                self.stats.units_failed += failed
                if self.dashboard is not None:
                    self.stream.finished(worker_id, task_id, run_id, elapsed, not failed, self.now)
                self._apply(ev.UnitsFinished(self.now, worker_id, task_id, run_id, outcomes, elapsed))
            case m.TaskResult():
                self._task_result(node, worker_id, msg)
            case m.TaskResults(results=results):
                left = self.batch_left  # each as a batch's TaskResult: ended in one call
                try:  # (the sender and its worker checked once, above, for all of them)
                    for said, result in enumerate(results, 1):
                        self.batch_left = left + len(results) - said
                        self._task_result(node, worker_id, result)
                finally:
                    self.batch_left = left
            case m.WorkerFailed(task_id=task_id, outcome=outcome):
                self._load_failed(task_id, outcome)
                if self.dashboard is not None:
                    self.stream.finished(worker_id, task_id, 0, 0.0, False, self.now)
                self._apply(ev.TaskFinished(self.now, worker_id, task_id, outcome))
            case m.TaskStopped(task_id=task_id):
                self._apply(ev.WorkerStopped(self.now, worker_id, task_id))
            case m.WorkerPaused(paused=paused, rss=rss, mark=mark):
                cause = f"resident {rss >> 20} MiB, pause mark {mark >> 20} MiB"
                (self.log.warning if paused else self.log.info)(
                    "worker_paused" if paused else "worker_resumed", worker_id=worker_id,
                    rss_mb=rss >> 20, mark_mb=mark >> 20)
                self._apply(ev.WorkerPaused(self.now, worker_id, paused, cause))
            case m.StealReply(task_id=task_id, run_id=run_id, accepted=accepted):
                self._apply(ev.StealAnswered(self.now, worker_id, task_id, run_id, accepted))
            case m.TakeBackReply(task_id=task_id, accepted=accepted):
                self._apply(ev.TakeBackAnswered(self.now, worker_id, task_id, accepted))
            case m.UnitsReleased(task_id=task_id, run_ids=run_ids):
                self._apply(ev.RunsReleased(self.now, worker_id, task_id, run_ids))
            case m.Missing(task_id=task_id, index=index):
                self._apply(ev.UnitMissing(self.now, worker_id, task_id, index))
            case m.NeedCode(task_id=task_id, code_hash=code_hash):
                self._send_code(node, worker_id, task_id, code_hash)
            case m.TaskOutput() | m.WorkProgress():
                self._task_news(worker_id, msg)
            case m.WorkerStory(task_id=task_id, entries=entries):
                for gather in self.stories:
                    if gather.task_id == task_id and worker_id in gather.waiting:
                        gather.waiting.discard(worker_id)
                        gather.entries += entries
                self._stories_due()
            case _:
                self._refused_worker(node, worker_id, msg, "not a message a worker sends",
                                     "unexpected_message")

    def _task_result(self, node: Peer, worker_id: str, msg: m.TaskResult) -> None:
        """A plain Task's end, from a worker of this node."""
        task_id, outcome, elapsed = msg.task_id, msg.outcome, msg.elapsed
        if self.dashboard is not None:
            self.stream.finished(worker_id, task_id, 0, elapsed, outcome.ok, self.now)
        held = outcome.held and outcome.ok
        finished = ev.TaskFinished(self.now, worker_id, task_id, outcome, elapsed)
        if self.batch_left and not held:
            self._finishing(finished, node, worker_id, msg)
            return
        if self.finished_batch:  # the ends heard before it, before its result is noted:
            self._flush_finished()  # one of them may end the task (_share_result)
        if held:  # the scheduler decides whether it is the task's result
            self.leaving[task_id] = (node.peer_id, worker_id, max(0, outcome.size))
        self._apply(finished)
        if held and self.leaving.pop(task_id, None) is not None:  # it was not
            self.send(SOCKET, node.peer_id.encode(), message=m.DropResults([task_id]))

    def _refused_worker(self, node: Peer, worker_id: str, msg: m.Message, reason: str,
                        event: str = "message_refused") -> None:
        """Counted against the worker, not its node (see REJECTIONS_BLOCKED)."""
        self._reject(Inbound(node.routing, worker_id.encode(), msg, node.key), event, reason, node)

    def _salvaged(self, node: Peer, worker_id: str, msg: m.UnitsDone) -> bool:
        """Unit results of a worker stopped at its node's return: kept if the task is restored
        and the units not sliced again yet (see ``UnitsSalvaged``)."""
        entry = self.salvage.get(worker_id)
        if entry is None or entry[0] != node.peer_id or msg.task_id not in entry[1]:
            return False
        results = tuple((o.index, o.digest, o.value) for o in msg.outcomes
                        if o.ok and not o.held and o.digest)
        task = self.scheduler.tasks.get(msg.task_id)
        before = task.units.journaled_count if task is not None else 0
        if results:
            self._apply(ev.UnitsSalvaged(self.now, msg.task_id, results))
        kept = (task.units.journaled_count if task is not None else 0) - before
        self.log.info("units_salvaged", task_id=msg.task_id, worker_id=worker_id,
                      offered=len(msg.outcomes), kept=kept)
        return True

    def _from_client(self, peer: Peer, msg: m.Message) -> None:
        match msg:
            case m.Submit():
                self._submit(peer, msg)
            case m.SubmitMany():
                self._submit_many(peer, msg)
            case m.PackagesRequest():
                self._to_client(peer.peer_id, m.PackagesReply(self._listing()))
            case m.Cancel(task_id=task_id) if not self._owns_task(peer, task_id):
                self._refused(peer, msg, f"task {task_id} is not this client's")
            case m.Cancel(grace=grace) if _bad_grace(grace):
                self._refused(peer, msg, _bad_grace(grace))
            case m.StoryRequest(task_id=task_id) if self._held_of_key(peer, task_id):
                self._held_story(peer.peer_id, task_id)
            case m.StoryRequest(task_id=task_id) if self._of_key(peer, msg) is None:
                # An answer, so that the caller need not wait; the same for an id never used
                # and another key's task (see _of_key).
                self._to_client(peer.peer_id, m.StoryReply(task_id, [], _no_task(task_id)))
            case m.Cancel(task_id=task_id, grace=grace):
                self._take_out(task_id)  # a held one: to the scheduler, which cancels it
                self._apply(ev.CancelRequested(self.now, task_id, grace))
            case m.StoryRequest(task_id=task_id):
                self._story(peer.peer_id, task_id)
            case m.CancelTask(task_id=task_id, grace=grace):
                self._cancel_task(peer, task_id, grace)
            case m.LogsRequest(task_id=task_id, limit=limit):
                if self._held_of_key(peer, task_id):
                    self._to_client(peer.peer_id, m.LogsReply(task_id, [], 0))  # not started
                elif self._of_key(peer, msg) is None:
                    self._to_client(peer.peer_id, m.LogsReply(task_id, [], 0, _no_task(task_id)))
                else:
                    lines, dropped = self.outputs.get(task_id, max(0, min(limit, OUTPUT_LINES)))
                    self._to_client(peer.peer_id, m.LogsReply(task_id, lines, dropped))
            case m.InfoRequest():
                self._to_client(peer.peer_id, self._cluster_info())
            case m.TasksRequest(limit=limit):
                self._to_client(peer.peer_id, m.TasksReply(self._task_list(peer.key, limit)))
            case m.Heartbeat():
                pass
            case m.Received(task_ids=task_ids):
                if (unreceived := self.unreceived.get(peer.peer_id)) is not None:
                    for task_id in task_ids:
                        unreceived.received(task_id)
                for task_id in task_ids:
                    if self._unfinished(task_id):
                        # (a client's word: its journaled submission would go, and a restart
                        # lose the task it was told was durable)
                        continue
                    self.journal.delivered(task_id, peer.peer_id)
                held = [t for t in task_ids if self.delivering.get(t, ("", ""))[1] == peer.peer_id]
                # A held result its client may still pass to a later task stays on its node.
                kept = [t for t in held if self.inputs.in_use(t)]
                self.fetched.update(kept)
                self._drop_results([t for t in held if not self.inputs.in_use(t)])
            case m.Scatter():
                self._scatter(peer, msg)
            case m.Detach(task_ids=task_ids):
                task_ids = task_ids[:m.MAX_INPUTS * 10]
                self.backlog.detached.update(
                    t for t in task_ids if self.backlog.client_of(t) == peer.peer_id)
                self._apply(ev.TasksDetached(self.now, peer.peer_id, tuple(task_ids)))
            case m.Release(task_ids=task_ids):
                self._drop_unused(self.inputs.released(peer.peer_id, task_ids))
            case m.Holding() if peer.holding_said:
                self.log.debug("holding_ignored", client_id=peer.peer_id)
            case m.Holding(task_ids=task_ids):
                peer.holding_said = True
                released = self.inputs.holding(peer.peer_id, set(task_ids))
                if released:
                    self.log.info("releases_made_good", client_id=peer.peer_id,
                                  tasks=len(released))
                self._drop_unused(released)
            case m.Bye():
                self.peers = {k: p for k, p in self.peers.items() if p is not peer}
                self.log.info("client_left", peer=peer.peer_id)
                self._client_gone(peer.peer_id)
            case _:
                self._unexpected(peer, msg)

    def _task_list(self, key: bytes, limit: int) -> list[m.TaskInfo]:
        """The tasks submitted with ``key`` (by any client using it), newest first: a person's
        notebook's tasks, seen from the command line with the same key."""
        wall = time.time() - time.monotonic()  # the scheduler's clock is monotonic
        limit = max(0, min(limit, 10_000))
        clients = {client for client, its_key in self.client_keys.items() if its_key == key}
        held = list(self.backlog.of_clients(clients, newest=limit))
        listed = [m.TaskInfo(task_id=h.task_id, name=h.name, client_id=client, status="queued",
                             done=0, total=0, priority=priority, submitted=h.held_at + wall,
                             started=0.0, ended=0.0)
                  for client, priority, h in reversed(held[-limit:] if limit else [])]
        mine = [t for t in self.scheduler.tasks.values() if self.client_keys.get(t.client_id) == key]
        mine.sort(key=lambda t: t.seq, reverse=True)
        for task in mine[:limit - len(listed)]:
            times = {"submitted": 0.0, "started": 0.0, "ended": 0.0}
            for key_, _, finish, _, when in task.story:
                if key_ != "task":
                    continue
                if finish == "queued" and not times["submitted"]:
                    times["submitted"] = when + wall
                elif finish == "running" and not times["started"]:
                    times["started"] = when + wall
                elif finish in ("done", "erred", "cancelled"):
                    times["ended"] = when + wall
            done, total = self._progress_of(task)
            listed.append(m.TaskInfo(
                task_id=task.task_id, name=task.name, client_id=task.client_id,
                status=str(task.state), done=done, total=total, priority=task.priority, **times))
        return listed

    def _progress_of(self, task: TaskRecord) -> tuple[int, int]:
        """(done, total; 0: not known) as the task's client sees it."""
        if task.kind is ev.TaskKind.PARALLEL:
            units = task.units
            done = units.done_count
            total = self._unit_total(task.task_id, done + units.open_count(), units.sliced_all)
        else:
            done, total = self.task_steps.get(task.task_id, (0, 0))
        if task.state is ev.TaskStatus.DONE and total:
            done = total
        return done, total

    def _of_key(self, peer: Peer, msg: m.Message) -> TaskRecord | None:
        """The task a client's request names, if it was submitted with that client's key (by it
        or another client using the key: a notebook's tasks, from the command line). Another
        key's task is refused as if its id were unknown: the answer tells no one it exists."""
        task_id = getattr(msg, "task_id", "")
        task = self.scheduler.tasks.get(task_id)
        if task is None:
            return None
        if task.client_id == peer.peer_id or self.client_keys.get(task.client_id) == peer.key:
            return task
        self._refused(peer, msg, f"task {task_id} is another key's")
        return None

    def _cancel_task(self, peer: Peer, task_id: str, grace: float) -> None:
        """``python -m actors cancel``: cancel a task of the caller's key and say how it ended
        (the task's own client hears TaskCancelled as for its own Cancel)."""
        if not _bad_grace(grace) and self._held_of_key(peer, task_id):
            self._take_out(task_id)  # to the scheduler, which cancels it
        task = self._of_key(peer, m.CancelTask(task_id))
        if task is None:
            self._to_client(peer.peer_id, m.CancelReply(task_id, "", _no_task(task_id)))
            return
        if _bad_grace(grace):
            self._to_client(peer.peer_id, m.CancelReply(task_id, str(task.state),
                                                         _bad_grace(grace)))
            return
        if not task.finished:
            self.log.info("task_cancel_requested", task_id=task_id, by=peer.peer_id, grace=grace)
            self._apply(ev.CancelRequested(self.now, task_id, grace))
        self._to_client(peer.peer_id, m.CancelReply(task_id, str(task.state)))

    def _watch(self, now: float) -> None:
        """On the tick: sample the throughput and, while someone watches the dashboard, build
        its data. A bug here is logged and the tick goes on: the page is never worth the
        scheduler (it runs last in the tick, after the journal's commit)."""
        try:
            if self.throughput.sample(now, self.stats.units_done):
                self.outputs.forget_except(self.scheduler.tasks)
            board = self.dashboard
            if board is None or not board.wanted(now) or now - self.board_built < BUILD_EVERY_S:
                return
            self.board_built = now
            started = time.perf_counter()
            wall = time.time() - time.monotonic()  # the scheduler's clock is monotonic
            hosts = {p.peer_id: p.host for p in self.peers.values() if p.role == "node"}
            stats = self.stats
            state = overview(
                self.scheduler, progress=self._progress_of, hosts=hosts, stream=self.stream,
                throughput=self.throughput, now=now, wall=wall, usage=self.worker_usage,
                held=len(self.backlog),
                counters={"units_done": stats.units_done, "units_failed": stats.units_failed,
                          "tasks_submitted": stats.tasks_submitted},
                master={"id": self.master_id, "address": self.address, "version": __version__,
                        "epoch": self.journal.epoch, "started": round(self.started_at, 3)})
            details = {task_id: msgspec.json.encode(task_detail(
                self.scheduler, task_id, progress=self._progress_of, rings=self.outputs,
                now=now, wall=wall)) for task_id in board.watched(now)}
            board.publish(msgspec.json.encode(state), details)
            self.stats.dashboard_seconds += time.perf_counter() - started
            self.stats.dashboard_builds += 1
        except Exception:
            self.log.exception("dashboard_snapshot_failed")

    def _snapshot(self) -> Snapshot:
        """The counters so far and the state now, for /metrics (read there, never the state)."""
        sched, stats = self.scheduler, self.stats
        busy = sum(1 for w in sched.workers.values() if w.task_id is not None)
        return dataclasses.replace(
            stats, tasks=_with_held(Counter(str(t.state) for t in sched.tasks.values()),
                                    len(self.backlog)),
            queued_units=sum(len(t.units.pending) for t in sched.tasks.values()
                             if t.state is ev.TaskStatus.RUNNING),
            workers={"idle": len(sched.workers) - busy, "busy": busy}, nodes=len(sched.nodes),
            worker_deaths=dict(stats.worker_deaths))

    def _cluster_info(self) -> m.ClusterInfo:
        sched = self.scheduler
        hosts = {p.peer_id: p.host for p in self.peers.values() if p.role == "node"}
        per_node = [(node, hosts.get(node, ""), len(workers),
                     sum(1 for w in workers if _idle(sched.workers[w])))
                    for node, workers in sorted(sched.nodes.items())]
        states = [t.state for t in sched.tasks.values()]
        return m.ClusterInfo(
            sorted(sched.nodes), len(sched.workers),
            sum(1 for w in sched.workers.values() if _idle(w)),
            states.count(ev.TaskStatus.RUNNING),
            states.count(ev.TaskStatus.QUEUED) + len(self.backlog),
            per_node, self.master_id, self.journal.epoch, __version__, self.local_node_failed)

    def _submit(self, peer: Peer, msg: m.Submit) -> None:
        admitted = self._submission(peer, msg, [msg.task_id])
        if admitted is not None:
            self._admit(peer, admitted, msg.task_id, msg.args, msg.inputs, msg.items)

    def _submit_many(self, peer: Peer, msg: m.SubmitMany) -> None:
        """A map's tasks in one message: what they share checked once, each then admitted as
        its own ``Submit`` would be, those for the scheduler handed to it in one call."""
        count = len(msg.task_ids)
        if count != len(msg.args) or not 0 < count <= m.MAX_SUBMIT_MANY:
            why = (f"a SubmitMany is 1 to {m.MAX_SUBMIT_MANY} tasks, as many arguments as ids "
                   f"(not {count} ids, {len(msg.args)} arguments)")
            self._refused(peer, msg, why)
            # Its tasks fail with why (as many as one could carry: a client's futures waiting
            # for them would wait for good), unless they are known here already.
            self._refuse_all(peer, msg.task_ids[:m.MAX_SUBMIT_MANY], ValueError(why),
                             resends=True)
            return
        admitted = self._submission(peer, msg, msg.task_ids)
        if admitted is None:
            return
        burst = self._burst(peer)
        try:
            for task_id, args in zip(msg.task_ids, msg.args, strict=True):
                self._admit(peer, admitted, task_id, args, (), False, burst)
        finally:  # (those admitted, journaled already, go to the scheduler whatever came after)
            self._log_refused(burst.events, self._apply_many(burst.events))
            self._passes_owed()

    def _burst(self, peer: Peer) -> _Burst:
        """A SubmitMany's burst, with what its key's bounds leave it now."""
        burst = _Burst()
        owner = peer.owner or peer.peer_id
        if self.max_queued:
            queued = self.scheduler.queued_of_owner(owner) + self.backlog.held_of_owner(owner)
            burst.queue_room = self.max_queued - queued
            if burst.queue_room > 0:
                self.queue_full.discard(owner)  # (as _queue_full's pass below its bound)
        if self.max_key_bytes:
            # (every client's kept results: a bound from above on the key's own, as _kept_of)
            held = self.scheduler.args_bytes.get(owner, 0) + self.backlog.held_bytes.get(owner, 0)
            burst.budget_room = self.max_key_bytes - held - self.inputs.kept_total
        return burst

    def _passes_owed(self) -> None:
        """After a burst of events handed over in one call: the scheduling pass they owe, now
        if ``MAX_DEFERRED`` or more wait for it (as ``_apply``'s), else a refill's turn."""
        if self.deferred >= MAX_DEFERRED:
            self._apply(ev.Tick(self.now))
        elif self.backlog.ids and not self.refilling:
            self._refill()

    def _submission(self, peer: Peer, msg: m.Submit | m.SubmitMany,
                    task_ids: list[str]) -> _Admitted | None:
        """What a submit's tasks share, checked (None: refused, each task told why): its code,
        kind and options; a deployed task's package version, pinned now."""
        kind, package, version = msg.kind, "", ""
        if len(msg.name) > MAX_NAME_CHARS:
            self._refuse_all(peer, task_ids, ValueError(
                f"a task id is at most {MAX_ID_CHARS} characters, its name {MAX_NAME_CHARS}"))
            return None
        if msg.code and not msg.code_hash:
            # Code is kept (and counted against its client's bound) under its hash: code without
            # one would be held as each task's own, counted nowhere.
            self._refuse_all(peer, task_ids, ValueError("shipped code comes with its code_hash"))
            return None
        # The code first, whatever comes of the submit: its client ships a code once and names
        # it by its hash from then on, refused or not.
        if msg.code_hash and (refused := self._keep_code(peer, msg)) is not None:
            self._refuse_all(peer, task_ids, refused)  # (for its size)
            return None
        if (msg.code or msg.code_hash) and kind not in KINDS:
            self._refuse_all(peer, task_ids, ValueError(
                f"a task's kind is one of {sorted(KINDS)}, not {kind!r}"))
            return None
        if not 0 <= msg.retries <= MAX_RETRIES:
            self._refuse_all(peer, task_ids, ValueError(
                f"retries must be between 0 and {MAX_RETRIES}, not {msg.retries}"))
            return None
        if abs(msg.priority) > m.MAX_PRIORITY:
            self._refuse_all(peer, task_ids, ValueError(
                f"priority must be between -(2**53 - 1) and 2**53 - 1, not {msg.priority}"))
            return None
        code = msg.code
        if msg.code_hash:
            if (code := self.codes[peer.peer_id].get(msg.code_hash, b"")) == b"":
                self._refuse_all(peer, task_ids, CodeUnknown(msg.code_hash, msg.name),
                                 resends=True)
                return None
        elif not code:  # a deployed task, by name: pin the newest version now
            found = self._find_task(msg.name)
            if found is None:
                known = sorted(t.name for pv in self.catalogue.values() for t in pv.listing.tasks)
                self.log.warning("unknown_task", task=msg.name, client_id=peer.peer_id)
                self._refuse_all(peer, task_ids, UnknownTask(msg.name, known), resends=True)
                return None
            pv, info = found
            kind = "parallel" if info.kind.value == "ParallelTask" else "task"
            package, version = pv.package, pv.version
        return _Admitted(msg.name, kind, code, msg.code_hash, msg.priority, msg.retries,
                         package, version)

    def _admit(self, peer: Peer, sub: _Admitted, task_id: str, args: bytes,
               inputs: Collection[str], items: bool, burst: _Burst | None = None) -> None:
        """One task of a checked submission: refused (its client told why), or journaled and
        then held back or handed to the scheduler (with ``burst``: gathered there, for one call
        for all of a message's)."""
        if len(task_id) > MAX_ID_CHARS:
            self._refuse(peer, task_id, ValueError(
                f"a task id is at most {MAX_ID_CHARS} characters, its name {MAX_NAME_CHARS}"))
            return
        if self._id_known(task_id) or (burst is not None and task_id in burst.ids):
            if self._client_of(task_id) not in (peer.peer_id, None):
                self.log.warning("task_id_taken", task_id=task_id, client_id=peer.peer_id)
                self._refuse(peer, task_id, TaskIdTaken(task_id))
                return
            # Sent again after a reconnect (its Accepted was lost, or it was not yet durable):
            # the first one stands; acknowledge it if it is in the journal already.
            if self.journal.on_disk(task_id):
                self._to_client(peer.peer_id, m.Accepted([task_id]))
            return
        if sub.package and self.task_sync is not None:
            self.task_sync.tell(InstanceUses(sub.package, sub.version, task_id, ended=False))
        # Per task at debug: at thousands of tasks a second, info lines would be most of the
        # master's work; errors, kills and cancels stay at info and above.
        if self.debug:
            self.log.debug("task_submitted", task_id=task_id, task=sub.name,
                           client_id=peer.peer_id, priority=sub.priority, package=sub.package,
                           version=sub.version)
        pending, pending_bytes = (len(burst.events), burst.bytes) if burst is not None else (0, 0)
        if self.max_queued and (burst is None or burst.admitted >= burst.queue_room) and \
                self._queue_full(peer, pending):
            self._refuse(peer, task_id, QueueFull(self.max_queued))
            return
        if self.max_key_bytes and (
                burst is None or burst.admitted_bytes + len(args) > burst.budget_room) and (
                full := self._over_budget(peer, len(args) + pending_bytes)) is not None:
            self._refuse(peer, task_id, full)
            return
        if burst is not None:
            burst.admitted += 1
            burst.admitted_bytes += len(args)
        if inputs:
            refused = self._check_inputs(peer, task_id, inputs)
            if refused is not None:
                self._refuse(peer, task_id, refused)
                return
        self.inputs.submitted(task_id, peer.peer_id, inputs)
        self.seq += 1
        self.stats.tasks_submitted += 1
        kind, code = sub.kind, sub.code
        if self.journal.durable:
            self.journal.task_added(TaskRow(
                task_id=task_id, client=peer.peer_id, seq=self.seq, priority=sub.priority,
                name=sub.name, kind=kind, code_hash=sub.code_hash,
                code=b"" if sub.code_hash else code, args=args, package=sub.package,
                version=sub.version, retries=sub.retries, inputs=tuple(inputs)))
        else:  # (its row would be made only to be acknowledged: a few per cent of a task)
            self.journal.task_noted(task_id, peer.peer_id)
        key = (peer.peer_id, sub.priority)
        if items and kind == "parallel":  # a batched map (held back or not: _submit_held)
            self.item_maps.add(task_id)
        if not inputs and (sub.code_hash or not code) and (
                self.backlog.holds(key) or self.scheduler.queued_of(*key) + pending >= WINDOW):
            self.backlog.hold(key, peer.owner, Held(task_id, sub.name, kind, sub.code_hash,
                                                    args, sub.retries, sub.package, sub.version,
                                                    self.now))
            return
        event = ev.TaskSubmitted(self.now, task_id=task_id, client_id=peer.peer_id,
                                 name=sub.name, kind=kind, code=code, args=args,
                                 priority=sub.priority, package=sub.package,
                                 version=sub.version, retries=sub.retries,
                                 code_hash=sub.code_hash, owner=peer.owner,
                                 inputs=tuple(inputs), items=task_id in self.item_maps)
        if burst is None:
            self._apply(event)
        else:
            burst.events.append(event)
            burst.ids.add(task_id)
            burst.bytes += len(args)

    def _keep_code(self, peer: Peer, msg: m.Submit | m.SubmitMany) -> Exception | None:
        """Keep the code a submit ships with its hash, once per client and hash (later submits
        name it by the hash alone); past the client's limit, why its submit is refused."""
        shipped = self.codes.setdefault(peer.peer_id, {})
        if not msg.code or msg.code_hash in shipped:
            return None
        if sum(map(len, shipped.values())) + len(msg.code) > MAX_CODE_PER_CLIENT:
            return ValueError(
                f"this client's task code would take more than "
                f"{MAX_CODE_PER_CLIENT >> 20} MiB on the master: ship fewer distinct classes "
                "(or deploy them as a package)")
        if self.max_key_bytes:
            # Its key's other clients' code too (once a class and client: a pass is cheap here),
            # or one key's many clients would each keep their bound of it.
            owner = peer.owner or peer.peer_id
            code = sum(len(c) for client, codes in self.codes.items()
                       if self._owner_of(client) == owner for c in codes.values())
            if (full := self._over_budget(peer, code + len(msg.code))) is not None:
                return full
        shipped[msg.code_hash] = msg.code
        self.journal.code_added(peer.peer_id, msg.code_hash, msg.code)
        return None

    def _id_known(self, task_id: str) -> bool:
        """Whether a task or scattered data has this id here (a submit with it is a resend or
        another client's clash, never a new task)."""
        return (task_id in self.scheduler.tasks or task_id in self.backlog.ids
                or self.journal.knows(task_id) or task_id in self.inputs.kept
                or task_id in self.inputs.refs or task_id in self.scattering)

    def _unfinished(self, task_id: str) -> bool:
        """A task here that has not ended: queued, running, or held back."""
        task = self.scheduler.tasks.get(task_id)
        return (task is not None and not task.finished) or task_id in self.backlog.ids

    def _client_of(self, task_id: str) -> str | None:
        """The client whose task (or scattered data) this id is, where the master holds it."""
        task = self.scheduler.tasks.get(task_id)
        if task is not None:
            return task.client_id
        if (held := self.backlog.client_of(task_id)) is not None:
            return held
        if (kept := self.inputs.kept.get(task_id)) is not None:
            return kept.client_id
        if (scattering := self.scattering.get(task_id)) is not None:
            return scattering.client_id
        # (one the journal alone knows: ended, trimmed from the scheduler, not yet delivered)
        return self.inputs.refs.get(task_id) or self.journal.client_of(task_id)

    def _queue_full(self, peer: Peer, pending: int = 0) -> bool:
        """Whether the peer's key has as many tasks queued as it may (``--max-queued``): one
        user's runaway loop must not exhaust a master others share. Logged once a crossing.
        ``pending``: its tasks admitted but not yet handed to the scheduler."""
        owner = peer.owner or peer.peer_id
        queued = self.scheduler.queued_of_owner(owner) + self.backlog.held_of_owner(owner) + pending
        if queued < self.max_queued:
            self.queue_full.discard(owner)
            return False
        if owner not in self.queue_full:
            self.queue_full.add(owner)
            self.log.warning("queue_full", client_id=peer.peer_id, queued=queued,
                             limit=self.max_queued)
        return True

    def _over_budget(self, peer: Peer, needed: int) -> MemoryBudgetFull | None:
        """Why ``needed`` bytes more for the peer's key would pass its budget (None: they would
        not). Counted: the arguments of its unfinished tasks (held back ones too) and the
        results and inline data kept for its futures; not its code (bounded per client), nor
        a large result or scatter, which stays on a node. Logged once a crossing."""
        owner = peer.owner or peer.peer_id
        held = self.scheduler.args_bytes.get(owner, 0) + self.backlog.held_bytes.get(owner, 0)
        held += self._kept_of(owner, self.max_key_bytes - held - needed)
        if held + needed <= self.max_key_bytes:
            if self.budget_full:
                self.budget_full.discard(owner)
            return None
        if owner not in self.budget_full:
            self.budget_full.add(owner)
            self.log.warning("memory_budget_full", client_id=peer.peer_id, held=held,
                             needed=needed, limit=self.max_key_bytes)
        return MemoryBudgetFull(self.max_key_bytes, held, needed)

    def _room_for_units(self, task_id: str) -> int:
        """What a ParallelTask's key may still make the master hold in sliced units: its budget
        less the rest it holds (``_over_budget``'s count); -1 without a budget."""
        task = self.scheduler.tasks.get(task_id)
        if not self.max_key_bytes or task is None:
            return -1
        owner = task.warm_key.owner
        held = self.scheduler.args_bytes.get(owner, 0) + self.backlog.held_bytes.get(owner, 0)
        held += self._kept_of(owner, self.max_key_bytes // 2 - held)
        return max(0, self.max_key_bytes - held)

    def _kept_of(self, owner: str, within: int) -> int:
        """The results and inline data kept for a key's futures, as far as a budget check needs
        them: what every client keeps together (a bound from above, the common case without a
        pass over the clients) where that is ``within`` bytes, else the key's own."""
        if self.inputs.kept_total <= within:
            return self.inputs.kept_total
        return sum(size for client, size in self.inputs.kept_bytes.items()
                   if self._owner_of(client) == owner)

    def _owner_of(self, client_id: str) -> str:
        """Whose a client's tasks count as: its key, or itself without one."""
        return self._key_text(client_id) or client_id

    def _key_text(self, client_id: str) -> str:
        """A client's key as ``Peer.owner`` has it ("" without one)."""
        key = self.client_keys.get(client_id)
        return key.decode(errors="replace") if key else ""

    def _check_inputs(self, peer: Peer, task_id: str, inputs: Collection[str]) -> Exception | None:
        """Why the futures among a submission's arguments are refused (None: they are not)."""
        if len(inputs) > m.MAX_INPUTS:
            return ValueError(f"{len(inputs)} inputs: at most {m.MAX_INPUTS}")
        for input_id in inputs:
            if self.backlog.client_of(input_id) == peer.peer_id:
                self._take_out(input_id)  # something waits for it: it waits no longer here
        for input_id in inputs:
            task = self.scheduler.tasks.get(input_id)
            running = task.client_id if task is not None and not task.finished else None
            refused = self.inputs.check(task_id, peer.peer_id, input_id, running)
            if refused is not None:
                return refused
        return None

    def _refuse(self, peer: Peer, task_id: str, error: Exception) -> None:
        """A submitted task refused: its client's future fails with ``error``."""
        payload, type_name, text, _ = describe_exception(error)
        self._to_client(peer.peer_id, m.TaskErred(task_id, payload, type_name, text, ""))

    def _refuse_all(self, peer: Peer, task_ids: list[str], error: Exception, *,
                    resends: bool = False) -> None:
        """Each task of a refused submission told why (the error described once for all);
        with ``resends``, but those sent again (known here already: the first one stands), as
        ``_admit`` answers them."""
        payload, type_name, text, _ = describe_exception(error)
        for task_id in task_ids:
            if resends and self._id_known(task_id):
                if self._client_of(task_id) not in (peer.peer_id, None):
                    self._refuse(peer, task_id, TaskIdTaken(task_id))
                elif self.journal.on_disk(task_id):
                    self._to_client(peer.peer_id, m.Accepted([task_id]))
                continue
            self._to_client(peer.peer_id, m.TaskErred(task_id, payload, type_name, text, ""))

    def _find_task(self, name: str) -> tuple[PackageVersion, Any] | None:
        pv = self.catalogue.get(name.split(".", 1)[0])
        if pv is not None:
            for info in pv.listing.tasks:
                if info.name == name:
                    return pv, info
        return None

    def _listing(self) -> list[m.PackageListing]:
        return [
            m.PackageListing(
                pv.package, pv.version,
                [m.TaskListing(t.name, t.kind.value,
                               list(t.parameters) if t.parameters is not None else None, t.doc,
                               self.last_run.get(t.name, 0.0))
                 for t in pv.listing.tasks],
                [(b.module, b.error) for b in pv.listing.broken]
                + sorted(self.load_errors.get((pv.package, pv.version), {}).items()))
            for pv in sorted(self.catalogue.values(), key=lambda pv: pv.package)
        ]

    def _load_failed(self, task_id: str, outcome: m.UnitOutcome) -> None:
        """A worker could not load a deployed task (its module raised on import, a missing
        dependency): the listing, made by parsing, never importing, says so from now on."""
        task = self.scheduler.tasks.get(task_id)
        if task is None or not task.package:
            return
        errors = self.load_errors.setdefault((task.package, task.version), {})
        module = task.name.partition(":")[0]
        if module in errors or len(errors) >= MAX_LOAD_ERRORS:
            return
        kind = outcome.type_name.removeprefix("builtins.")
        errors[module] = f"{kind}: {outcome.message}"[:500]
        self.log.warning("task_module_broken", package=task.package, version=task.version,
                         module=module, error=errors[module])

    def _catalogue(self, packages: dict[str, PackageVersion]) -> None:
        removed = set(self.catalogue) - set(packages)
        self.catalogue = packages
        listed = {(pv.package, pv.version) for pv in packages.values()}
        self.load_errors = {k: v for k, v in self.load_errors.items() if k in listed}
        names = {t.name for pv in packages.values() for t in pv.listing.tasks}
        self.last_run = {k: v for k, v in self.last_run.items() if k in names}
        versions = self._newest_versions() + [(p, None) for p in sorted(removed)]
        for package, version in versions:
            self._apply(ev.NewestVersion(self.now, package, version))
        for key, peer in self.peers.items():
            if peer.role == "node":
                self.send(SOCKET, key, message=m.NewestVersions(versions))

    def _newest_versions(self) -> list[tuple[str, str | None]]:
        return [(p, pv.version) for p, pv in self.catalogue.items()]

    def _send_newest(self, node_key: bytes) -> None:
        self.send(SOCKET, node_key, message=m.NewestVersions(self._newest_versions()))

    def _replay(self, ins: ev.ReplayResults) -> None:
        """A restarted driver sliced finished units again: their journaled results, if the unit
        is the same (its digest); the others go back to the scheduler to run again."""
        found = self.journal.lookup(ins.task_id, (unit.index for unit in ins.units))
        replayed: list[tuple[int, bytes]] = []
        again: list[m.UnitCall] = []
        for unit in ins.units:
            entry = found.get(unit.index)
            if entry is not None and entry[0] == m.unit_digest(unit):
                replayed.append((unit.index, entry[1]))
            else:
                again.append(unit)
        self.log.info("results_replayed", task_id=ins.task_id, worker_id=ins.worker_id,
                      replayed=len(replayed), run_again=len(again))
        if replayed:
            self._to_worker(ins.node_id, ins.worker_id, m.DriverResults(ins.task_id, replayed, []))
        if again:
            self._apply(ev.UnitsNotReplayed(self.now, ins.worker_id, ins.task_id, again))

    def _task_ended(self, client_id: str, task_id: str, msg: m.Message) -> None:
        """Tell the client; the journal keeps the message until the client received it."""
        if isinstance(msg, m.TaskDone):
            unused = self.inputs.ended(task_id, "done", msg.result if msg.held is None else None)
        elif isinstance(msg, m.TaskErred):
            unused = self.inputs.ended(task_id, "erred",
                                       why=f"{msg.type_name.removeprefix('builtins.')}: "
                                           f"{msg.message}"[:500])
        else:
            unused = self.inputs.ended(task_id, "cancelled")
        if unused:
            self._drop_unused([t for t in unused if t != task_id])
        ended = m.encode(msg)
        self.journal.task_ended(task_id, client_id, ended)
        if not self.journal.durable and client_id.encode() in self.peers:
            self._keep_unreceived(client_id, task_id, ended)
        if (gathering := self.ends_out) is not None:
            gathering.setdefault(client_id, []).append(ended)  # (_carry_out_all sends them)
        else:
            self.send(SOCKET, client_id.encode(), frames=[ended])
        self.unit_totals.pop(task_id, None)
        self.task_steps.pop(task_id, None)
        self.item_maps.discard(task_id)
        self.throughput.tasks_ended += 1
        task = self.scheduler.tasks.get(task_id)
        if task is not None and task.package and self.task_sync is not None:
            self.task_sync.tell(InstanceUses(task.package, task.version, task_id, ended=True))

    def _keep_unreceived(self, client_id: str, task_id: str, ended: bytes) -> None:
        kept = self.unreceived.get(client_id)
        if kept is None:
            kept = self.unreceived[client_id] = Unreceived()
        if kept.add(task_id, ended) and not kept.said_full:
            kept.said_full = True  # (once a client: it says Received every tick, or it is stuck)
            self.log.warning("unreceived_ends_dropped", client_id=client_id,
                             bound_mib=UNRECEIVED_BYTES >> 20,
                             hint="its oldest task ends go unkept: a connection that drops "
                                  "now loses them")

    def _story(self, client_id: str, task_id: str) -> None:
        """The task's story: the scheduler's part and, asked now, each live worker's part."""
        wall = time.time() - time.monotonic()  # the scheduler's clock is monotonic
        entries = [(k, a, b, f"master: {c}", t + wall) for k, a, b, c, t in self.scheduler.story(task_id, self.now)]
        task = self.scheduler.tasks.get(task_id)
        workers = {w: self.scheduler.workers[w] for w in (task.seen_workers if task else ())
                   if w in self.scheduler.workers}
        gather = StoryGather(client_id, task_id, set(workers), entries, self.now + STORY_WAIT_S)
        self.stories.append(gather)
        for worker in workers.values():
            self._to_worker(worker.node_id, worker.worker_id, m.WorkerStoryRequest(task_id))
        self._stories_due()

    def _stories_due(self) -> None:
        """Answer story requests whose workers all replied, or that waited long enough."""
        for gather in [g for g in self.stories if not g.waiting or g.deadline <= self.now]:
            self.stories.remove(gather)
            entries = sorted(gather.entries, key=lambda entry: entry[4])
            self._to_client(gather.client_id, m.StoryReply(gather.task_id, entries))

    # --- a task's status, progress and output, for its client ------------------

    def _tell_running(self) -> None:
        """On the tick: the tasks that got a driver since the last one and still run (or wait,
        assigned, behind a short Task on its worker). A task that ends within a tick never
        says it ran: its end says more, and thousands of short tasks a second send one message
        each fewer."""
        started, self.started = self.started, set()
        self._tell_state(started, ev.TaskStatus.RUNNING)

    def _tell_state(self, task_ids: Iterable[str], state: ev.TaskStatus) -> None:
        """Each client, in one message, which of its tasks among these are in this state now."""
        by_client: dict[str, list[str]] = {}
        tasks = self.scheduler.tasks
        for task_id in task_ids:
            task = tasks.get(task_id)
            if task is not None and task.state is state:
                by_client.setdefault(task.client_id, []).append(task_id)
        for client_id, named in by_client.items():
            self._to_client(client_id, m.TaskState(named, str(state)))

    def _driven_by_lost(self, event: ev.Event) -> list[str]:
        """Running tasks whose driver this event may lose, or that it may take back from their
        worker (they may go back to the queue)."""
        match event:
            case ev.WorkerLost(worker_id=worker_id):
                lost = {worker_id}
            case ev.NodeLost(node_id=node_id):
                lost = {w.worker_id for w in self.scheduler.workers.values()
                        if w.node_id == node_id}
            case ev.TakeBackAnswered(task_id=task_id, accepted=True):
                return [task_id]  # queued behind a late task: it may go back to the queue
            case _:
                return []
        return [t.task_id for t in self.scheduler.tasks.values()
                if t.state is ev.TaskStatus.RUNNING and t.driver in lost]

    def _running_on(self, worker_id: str) -> str:
        worker = self.scheduler.workers.get(worker_id)
        return (worker.task_id or "") if worker is not None else ""

    def _tell_requeued(self, task_ids: list[str]) -> None:
        self._tell_state(task_ids, ev.TaskStatus.QUEUED)

    def _task_news(self, worker_id: str, msg: m.TaskOutput | m.WorkProgress) -> None:
        """Output or progress from a worker of a running task, for the task's client only;
        output also from a worker stopping a cancelled task's code (its ``finally:`` blocks
        run then, and what they print is the user's to see)."""
        task = self.scheduler.tasks.get(msg.task_id)
        stopping = type(msg) is m.TaskOutput and self._stopping(worker_id, msg.task_id)
        if task is None or not stopping and (task.finished or worker_id not in task.workers):
            self.log.debug("task_news_dropped", task_id=msg.task_id, worker_id=worker_id)
            return
        if isinstance(msg, m.TaskOutput):
            lines = [trimmed(line) for line in msg.lines[:MAX_OUTPUT_LINES]]
            dropped = max(0, msg.dropped)
            dropped += len(msg.lines) - len(lines)
            self.outputs.add(msg.task_id, worker_id, lines, dropped)
            self._to_client(task.client_id, msgspec.structs.replace(
                msg, worker_id=worker_id, lines=lines, dropped=dropped))
        elif msg.done < 0 or msg.total < 0:
            self._refused_from_worker(worker_id, msg, "progress is counted from 0")
        elif task.kind is not ev.TaskKind.PARALLEL:
            self.task_steps[msg.task_id] = (msg.done, msg.total)
            self._to_client(task.client_id, m.TaskProgress(msg.task_id, msg.done, msg.total, True))
        elif worker_id == task.driver:  # units to expect: the bar's length, ahead of slicing
            self.unit_totals[msg.task_id] = msg.total
            units = task.units
            known = units.done_count + units.open_count()
            self._to_client(task.client_id, m.TaskProgress(
                msg.task_id, units.done_count, self._unit_total(msg.task_id, known,
                                                                units.sliced_all),
                units.sliced_all))

    def _stopping(self, worker_id: str, task_id: str) -> bool:
        worker = self.scheduler.workers.get(worker_id)
        return worker is not None and task_id in worker.stopping

    def _ended_badly(self, task_id: str) -> bool:
        task = self.scheduler.tasks.get(task_id)
        return task is not None and task.finished and task.state is not ev.TaskStatus.DONE

    def _unit_total(self, task_id: str, known: int, sliced_all: bool) -> int:
        """A ParallelTask's units: all of them once sliced, else the count its driver declared
        (or the units known, if more), else 0: not known yet."""
        declared = self.unit_totals.get(task_id)
        if sliced_all or declared is None:
            return known if sliced_all else 0
        return max(declared, known)

    def _refused_from_worker(self, worker_id: str, msg: m.Message, reason: str) -> None:
        self.log.warning("message_refused", worker_id=worker_id, type=type(msg).__name__,
                         reason=reason)

    def _others_worker(self, node: Peer, worker_id: str) -> bool:
        """Another node's worker (one the scheduler no longer knows may still be reported)."""
        worker = self.scheduler.workers.get(worker_id)
        return worker is not None and worker.node_id != node.peer_id

    def _owns_worker(self, node: Peer, worker_id: str) -> bool:
        worker = self.scheduler.workers.get(worker_id)
        return worker is not None and worker.node_id == node.peer_id

    def _owns_task(self, client: Peer, task_id: str) -> bool:
        """A client acts on its own tasks only (unknown ids: nothing to leak, nothing to do)."""
        task = self.scheduler.tasks.get(task_id)
        if task is None:
            held = self.backlog.client_of(task_id)
            return held is None or held == client.peer_id
        return task.client_id == client.peer_id

    def _refused(self, peer: Peer, msg: m.Message, reason: str) -> None:
        self._reject(Inbound(peer.routing, None, msg, peer.key), "message_refused", reason, peer)

    def _reject(self, inbound: Inbound, event: str, reason: str, peer: Peer | None = None, *,
                quiet: bool = False) -> bool:
        """Log a refused message, at most ``REJECTIONS_LOGGED`` per peer (key and routing id) and
        interval, then one line saying how many were not; a peer refused more than
        ``REJECTIONS_BLOCKED`` times in an interval is not heard for ``BLOCK_S`` (per peer, not
        per key: peers may share a key). False once the peer is blocked."""
        key, who = inbound.key, self._who(inbound)
        count, since = self.rejections.get(who, (0, self.now))
        if self.now - since > REJECTION_INTERVAL_S:
            if count > REJECTIONS_LOGGED:
                self.log.warning("rejections_not_logged", key=key[:12].decode(errors="replace"),
                                 count=count - REJECTIONS_LOGGED)
            count, since = 0, self.now
        count += 1
        self.rejections[who] = (count, since)
        if count <= REJECTIONS_LOGGED:
            (self.log.debug if quiet else self.log.warning)(
                event, key=key[:12].decode(errors="replace"),
                peer=(peer.peer_id if peer else inbound.peer[:40].decode(errors="replace")),
                type=type(inbound.message).__name__, reason=reason[:200],
                **({"worker_id": bytes(inbound.via[:100]).decode(errors="replace")}
                   if inbound.via is not None else {}))
        if count > REJECTIONS_BLOCKED:
            self.blocked[who] = self.now + BLOCK_S
            self.rejections.pop(who, None)
            why = f"more than {REJECTIONS_BLOCKED} refused messages in {REJECTION_INTERVAL_S:.0f}s"
            if who[1] != inbound.peer:  # (a worker's, behind its node)
                self._end_worker(inbound, why)
                return False
            self.log.error("peer_blocked", key=key[:12].decode(errors="replace"), seconds=BLOCK_S,
                           reason=why)
            return False
        return True

    def _who(self, inbound: Inbound) -> tuple[bytes, bytes]:
        """Whose refused messages an inbound counts among: its peer's (key and routing id), or,
        relayed by a node for one of its workers (or one ended for them), that worker's. Any
        other name behind a peer counts as the peer: no one spreads refusals over made-up
        names."""
        if inbound.via is None:
            return inbound.key, inbound.peer
        node = self.peers.get(inbound.peer)
        if node is None or node.role != "node" or node.key != inbound.key:
            return inbound.key, inbound.peer
        worker = inbound.key, inbound.peer + b"\x00" + inbound.via
        if worker in self.blocked or self._owns_worker(
                node, bytes(inbound.via).decode(errors="replace")):
            return worker
        return inbound.key, inbound.peer  # (a name the node has no worker under: its own)

    def _end_worker(self, inbound: Inbound, why: str) -> None:
        """A worker (its task's code) that kept sending what it may not: dropped and ended, as
        a worker lost (a death against what it ran); its node and other workers are heard on."""
        worker_id = bytes(inbound.via or b"").decode(errors="replace")
        node = self.peers.get(inbound.peer)
        owned = node is not None and self._owns_worker(node, worker_id)
        self.log.error("worker_blocked", worker_id=worker_id[:100], seconds=BLOCK_S, reason=why,
                       node_id=node.peer_id if node is not None else "", ended=owned)
        if node is not None and owned:
            self._apply(ev.WorkerLost(self.now, worker_id, f"ended: it sent {why}", False))
            self.send(SOCKET, node.routing, message=m.KillWorker(worker_id, f"it sent {why}"))

    def _forget_old_rejections(self) -> None:
        for who in [w for w, until in self.blocked.items() if until <= self.now]:
            del self.blocked[who]
        stale = self.now - 2 * REJECTION_INTERVAL_S
        for who in [w for w, (_, since) in self.rejections.items() if since < stale]:
            del self.rejections[who]

    def _unexpected(self, peer: Peer, msg: m.Message) -> None:
        self._reject(Inbound(peer.routing, None, msg, peer.key), "unexpected_message",
                     f"not a message a {peer.role} sends", peer)

    def _disconnected(self, routing: bytes) -> None:
        peer = self.peers.get(routing)
        if peer is None or peer.role != "node" or peer.suspect_since is not None:
            return  # a client reconnects at its own pace; its timeout covers one that does not
        self.now = time.monotonic()  # the shell owns the clock, as for Inbound
        peer.suspect_since = self.now
        self.log.info("node_suspect", node_id=peer.peer_id, reason="its connection closed",
                      lost_in_s=min(NODE_SUSPECT_S, self.node_timeout_s))

    def _check_liveness(self) -> None:
        for peer in list(self.peers.values()):
            silent = self.now - peer.last_seen
            suspect = peer.suspect_since
            if (peer.role == "node" and suspect is not None
                    and self.now - suspect > min(NODE_SUSPECT_S, self.node_timeout_s)):
                self._node_gone(peer, f"its connection closed {self.now - suspect:.1f}s ago "
                                      "and it did not come back")
            elif peer.role == "node" and silent > self.node_timeout_s:
                self._node_gone(peer, f"silent for {silent:.1f}s")
            elif peer.role == "client" and self.client_timeout_s and silent > self.client_timeout_s:
                # Killed, or cut off: nobody will read its tasks' results (clients say Hello
                # again and go on if they come back; what they had running was stopped).
                self.peers = {k: p for k, p in self.peers.items() if p is not peer}
                self.log.warning("client_lost", client_id=peer.peer_id,
                                 reason=f"silent for {silent:.0f}s")
                self.lost_clients[peer.peer_id] = None
                while len(self.lost_clients) > 10_000:
                    self.lost_clients.popitem(last=False)
                self._client_gone(peer.peer_id)

    def _node_gone(self, peer: Peer, reason: str) -> None:
        self.peers = {k: p for k, p in self.peers.items() if p is not peer}
        left = reason.startswith("node left")
        if left:  # (a node that stops says so: not a loss)
            self.log.info("node_left", node_id=peer.peer_id,
                          reason=reason.removeprefix("node left: "))
        else:
            self.log.warning("node_lost", node_id=peer.peer_id, reason=reason)
        self.lost_nodes[peer.routing] = None
        while len(self.lost_nodes) > 10_000:
            self.lost_nodes.popitem(last=False)
        self._apply(ev.NodeLost(self.now, peer.peer_id, reason))
        self._scatters_moved(peer.peer_id)

    # --- output -------------------------------------------------------------

    def _finishing(self, event: ev.TaskFinished, node: Peer, worker_id: str,
                   msg: m.Message) -> None:
        """A task's end heard with more messages of its batch to come: kept, and handed to the
        scheduler with the batch's others in one call, before any other message of the batch
        is handled (``receive``), or once there are ``MAX_DEFERRED`` of them."""
        self.finished_batch.append((event, node, worker_id, msg))
        if len(self.finished_batch) >= MAX_DEFERRED:
            self._flush_finished()

    def _flush_finished(self, _: object = None) -> None:
        batch, self.finished_batch = self.finished_batch, []
        for index, refused in self._apply_many([event for event, _, _, _ in batch]):
            _, node, worker_id, msg = batch[index]  # a worker's word the scheduler refused
            self._refused_worker(node, worker_id, msg, refused.reason)
        self._passes_owed()

    def _log_refused(self, events: list[ev.Event], refused: list[tuple[int, InvalidEvent]]) -> None:
        """Events of the master's own making the scheduler refused (none should be: the master
        checked them first)."""
        for index, exc in refused:
            self.log.error("event_refused", event=type(events[index]).__name__,
                           task_id=getattr(events[index], "task_id", None), reason=exc.reason)

    def _apply_many(self, events: list[ev.Event]) -> list[tuple[int, InvalidEvent]]:
        """``_apply`` of each of a burst of events (a refill of the backlog, tasks' ends) in one
        call to the scheduler: its pass deferred (the caller owes it one), each event alone in
        what it changes (one refused or raising is dropped and the others stand). Those the
        scheduler refused (their positions, and why) for the caller to answer as a refused
        message; one that raised is logged, as a message that does."""
        if not events:
            return []
        started = time.perf_counter()
        out, failed = self.scheduler.handle_many(events)
        self.stats.handle_seconds += time.perf_counter() - started
        self.stats.handled += len(events)
        self.deferred += len(events)
        self._carry_out_all(out)
        refused = [(index, exc) for index, exc in failed if isinstance(exc, InvalidEvent)]
        for index, exc in failed:
            if not isinstance(exc, InvalidEvent):
                self.log.error("event_dropped", event=type(events[index]).__name__,
                               task_id=getattr(events[index], "task_id", None), error=repr(exc),
                               exc_info=exc)
        if len(refused) < len(failed):
            self.check_state()
        return refused

    def _apply(self, event: ev.Event) -> None:
        if self.finished_batch:  # (the ends heard before it come first)
            self._flush_finished()
        driven = self._driven_by_lost(event)
        started = time.perf_counter()
        # A burst of submits or finished work waiting in the mailbox gets one scheduling pass,
        # after its last message (or every MAX_DEFERRED), not one per message: a pass costs
        # about the same for one task as for hundreds (SchedulerState._start_queued). So does a
        # refill from the backlog (_refill), however many it submits.
        if type(event) in DEFERRABLE and (self.refilling or (
                self.deferred < MAX_DEFERRED and (self.batch_left or not self.actor_inbox.empty()))):
            self.deferred += 1
            out = self.scheduler.handle(event, schedule=False)
        else:
            self.deferred = 0
            out = self.scheduler.handle(event)
        self.stats.handle_seconds += time.perf_counter() - started
        self.stats.handled += 1
        self._carry_out_all(out)
        if self.taken_back:  # one line a worker, not one a task (up to MAX_QUEUED_TASKS)
            for worker_id, task_ids in self.taken_back.items():
                self.log.info("take_back_asked", worker_id=worker_id, tasks=len(task_ids),
                              first=task_ids[0], behind=self._running_on(worker_id))
            self.taken_back = {}
        if driven:
            self._tell_requeued(driven)
        if self.backlog.ids and not self.refilling:
            self._refill()

    # --- the backlog held back from the scheduler (master_backlog.py) ---------

    def _refill(self) -> None:
        """Top up the scheduler's window of each client and priority whose backlog is held."""
        self.refilling = True  # their passes deferred (_apply): one for all of them, below
        submitted = False
        try:
            for key in self.backlog.waiting():
                queued = self.scheduler.queued_of(*key)
                if queued < LOW:
                    owner, taken = self.backlog.take(key, WINDOW - queued)
                    events = [e for held in taken for e in self._held_events(key, owner, held)]
                    self._log_refused(events, self._apply_many(events))
                    submitted = submitted or bool(taken)
            if submitted:
                self._apply(ev.Tick(self.now))  # the pass they owe (a refill is up to 1,024)
        finally:
            self.refilling = False

    def _submit_held(self, key: tuple[str, int], owner: str, held: Held) -> None:
        for event in self._held_events(key, owner, held):
            self._apply(event)

    def _held_events(self, key: tuple[str, int], owner: str, held: Held) -> list[ev.Event]:
        """A held task's submit to the scheduler (and its detach, if its client detached it
        while it was held)."""
        client_id, priority = key
        code = self.codes[client_id][held.code_hash] if held.code_hash else b""
        events: list[ev.Event] = [ev.TaskSubmitted(
            self.now, task_id=held.task_id, client_id=client_id, name=held.name, kind=held.kind,
            code=code, args=held.args, priority=priority, package=held.package,
            version=held.version, retries=held.retries, code_hash=held.code_hash, owner=owner,
            items=held.task_id in self.item_maps)]
        if held.task_id in self.backlog.detached:
            self.backlog.detached.discard(held.task_id)
            events.append(ev.TasksDetached(self.now, client_id, (held.task_id,)))
        return events

    def _take_out(self, task_id: str) -> None:
        """A held task to the scheduler now, out of its turn (to be cancelled, or as an input
        something waits for)."""
        found = self.backlog.take_one(task_id)
        if found is not None:
            key, owner, held = found
            self._submit_held(key, owner, held)

    def _held_of_key(self, peer: Peer, task_id: str) -> bool:
        """Whether the task is held and the peer may ask about it (its own, or its key's; see
        ``_of_key``)."""
        client = self.backlog.client_of(task_id)
        return client is not None and (
            client == peer.peer_id or self.client_keys.get(client) == peer.key)

    def _held_story(self, client_id: str, task_id: str) -> None:
        wall = time.time() - time.monotonic()
        held = self.backlog.find(task_id)
        assert held is not None  # asked only of a held task
        ahead = self.backlog.ahead_of(task_id)
        self._to_client(client_id, m.StoryReply(task_id, [(
            "task", "released", "queued",
            f"master: submitted; held in the master's backlog, {ahead} of its client's "
            f"submissions before it (the scheduler takes {WINDOW} at a time)",
            held.held_at + wall)]))

    def _drop_held(self, client_id: str) -> None:
        """A client left: its held tasks go (its detached ones to the scheduler: they live on).
        A client lost, not gone, hears they were cancelled if it comes back."""
        owner, dropped = self.backlog.drop_client(client_id)
        if not dropped:
            return
        cancelled = []
        for priority, held in dropped:
            if held.task_id in self.backlog.detached:
                self._submit_held((client_id, priority), owner, held)  # detached there too
                continue
            cancelled.append(held.task_id)
            self.item_maps.discard(held.task_id)
            if held.package and self.task_sync is not None:
                self.task_sync.tell(InstanceUses(held.package, held.version, held.task_id,
                                                 ended=True))
        if client_id in self.lost_clients:
            self.lost_clients[client_id] = cancelled
        self.log.info("backlog_dropped", client_id=client_id, tasks=len(cancelled),
                      kept=len(dropped) - len(cancelled))

    def _carry_out_all(self, out: list[ev.Instruction]) -> None:
        """Carry out a scheduler call's instructions in order, an input's failure once its
        input's own end is known here (last). A worker's assignments one after another go as
        one message (``AssignTasks``), and so do a client's tasks' ends (``TasksEnded``): a
        pass that queues plain Tasks on a busy worker gives it many at once, a batch of their
        ends ends many, and each message costs the master, the node, the worker and the client
        more than what it carries. Anything else carried out sends what was gathered first."""
        nested = self.ends_out is not None
        if nested:
            self._send_ends()  # (what the outer call gathered goes first)
        else:
            self.ends_out = {}
        after: list[ev.ReportInputFailed] = []
        assigns: dict[tuple[str, str], list[m.AssignTask]] = {}
        try:
            for ins in out:
                kind = type(ins)
                if kind is ev.Assign:
                    assert isinstance(ins, ev.Assign)
                    assigns.setdefault((ins.node_id, ins.worker_id), []).append(
                        self._assignment(ins))
                    continue
                if assigns:  # (what follows for the same worker must not overtake them)
                    self._send_assigns(assigns)
                if kind is ev.ReportInputFailed:
                    assert isinstance(ins, ev.ReportInputFailed)
                    after.append(ins)
                    continue
                if kind not in _ENDINGS:
                    self._send_ends()
                self._carry_out(ins)
            for failed in after:
                self._carry_out(failed)
        finally:  # (one that raised: what the others changed stands, and is said)
            self._send_assigns(assigns)
            self._send_ends()
            if not nested:
                self.ends_out = None

    def _send_assigns(self, assigns: dict[tuple[str, str], list[m.AssignTask]]) -> None:
        for (node_id, worker_id), tasks in assigns.items():
            self._to_worker(node_id, worker_id, tasks[0] if len(tasks) == 1 else m.AssignTasks(tasks))
        assigns.clear()

    def _send_ends(self) -> None:
        gathered = self.ends_out
        if not gathered:
            return
        for client_id, ends in gathered.items():
            peer = client_id.encode()
            for part in runs_within(ends, ENDS_BYTES):  # (many results of 256 KiB each)
                if len(part) == 1:
                    self.send(SOCKET, peer, frames=part)
                else:  # (each encoded once, as kept for sending again: taken as it is)
                    self.send(SOCKET, peer, message=m.TasksEnded(
                        [msgspec.Raw(end) for end in part]))  # type: ignore[misc]
        gathered.clear()

    def _assignment(self, ins: ev.Assign) -> m.AssignTask:
        if self.debug:
            self.log.debug("task_assigned", task_id=ins.task_id, worker_id=ins.worker_id,
                           driver=ins.driver)
        if ins.driver:
            self.started.add(ins.task_id)
            if ins.package:  # the listing's "last run" (by name, any version)
                self.last_run[ins.name] = time.time()
            if self.dashboard is not None and ins.kind == ev.TaskKind.TASK:
                self.stream.started(ins.worker_id, ins.task_id, 0, 1, self.now)
        inline, held = self._with_inputs(ins) if ins.inputs and ins.driver else ([], [])
        return m.AssignTask(
            task_id=ins.task_id, name=ins.name, kind=ins.kind, code=self._code_for(ins),
            args=ins.args, driver=ins.driver, package=ins.package, version=ins.version,
            code_hash=ins.code_hash, inputs=inline, held_inputs=held,
            owner=self._fetcher_of(ins.task_id) if ins.driver else "")

    def _carry_out(self, ins: ev.Instruction) -> None:
        match ins:  # (what every unit and task needs first: each case is a type check)
            case ev.Dispatch():
                if self.dashboard is not None:
                    self.stream.started(ins.worker_id, ins.task_id, ins.run_id,
                                        sum(u.count or 1 for u in ins.units), self.now)
                self._to_worker(ins.node_id, ins.worker_id,
                                m.RunUnits(ins.task_id, ins.run_id, ins.units, ins.holders,
                                           ins.sizes))
            case ev.ForwardResults():
                self._to_worker(ins.node_id, ins.worker_id,
                                m.DriverResults(ins.task_id, ins.results, ins.held, ins.sizes,
                                                ins.pack))
            case ev.RecordResults():
                self.journal.record(ins.task_id, ins.results, ins.packs)
                if self.journal.results_buffered > RESULTS_BUFFERED:
                    self._commit()  # early: a fast task's results must not pile up here
            case ev.Assign():
                self._to_worker(ins.node_id, ins.worker_id, self._assignment(ins))
            case ev.ForwardItems():
                self._to_client(ins.client_id, m.ItemsDone(ins.task_id, ins.items))
            case ev.ReportDone():
                if self.debug:
                    self.log.debug("task_done", task_id=ins.task_id)
                self._task_ended(ins.client_id, ins.task_id, m.TaskDone(
                    ins.task_id, ins.result, self._share_result(ins.client_id, ins.task_id)))
            case ev.ReplayResults():
                self._replay(ins)
            case ev.Steal():
                self._to_worker(ins.node_id, ins.worker_id, m.StealUnits(ins.task_id, ins.run_id))
            case ev.TakeBack():
                self.taken_back.setdefault(ins.worker_id, []).append(ins.task_id)
                self._to_worker(ins.node_id, ins.worker_id, m.TakeBackTask(ins.task_id))
            case ev.TellPeerGone():
                self._to_worker(ins.node_id, ins.worker_id, m.PeerGone(ins.peer))
            case ev.TellHolders():
                self._to_worker(ins.node_id, ins.worker_id,
                                m.WhoHas(ins.task_id, ins.index, ins.holders, ins.size))
            case ev.ReleaseWorker():
                self._to_worker(ins.node_id, ins.worker_id, m.ReleaseTask(ins.task_id))
            case ev.StopTask():
                self._to_worker(ins.node_id, ins.worker_id, m.StopTask(ins.task_id, ins.grace))
            case ev.KillWorker():
                self.send(SOCKET, ins.node_id.encode(), message=m.KillWorker(ins.worker_id, ins.reason))
            case ev.ReportProgress() if self._ended_badly(ins.task_id):
                pass  # its units were dropped: the progress it last reported stands
            case ev.ReportProgress():
                self._to_client(ins.client_id, m.TaskProgress(
                    ins.task_id, ins.done, self._unit_total(ins.task_id, ins.total, ins.sliced_all),
                    ins.sliced_all))
            case ev.ReportErred(outcome=o):
                self.log.info("task_erred", task_id=ins.task_id, unit=ins.unit, error=o.type_name,
                              message=o.message[:200])
                self._task_ended(ins.client_id, ins.task_id, m.TaskErred(
                    ins.task_id, o.value, o.type_name, o.message, o.traceback, ins.unit))
            case ev.ReportKilled():
                self.log.warning("task_killed", task_id=ins.task_id, unit=ins.unit, causes=ins.causes)
                payload, type_name, text, _ = describe_exception(
                    WorkerKilled(ins.task_id, ins.unit, ins.causes))
                self._task_ended(ins.client_id, ins.task_id, m.TaskErred(
                    ins.task_id, payload, type_name, text, "", ins.unit))
            case ev.ReportUnreachable():
                error = DataUnreachable(ins.task_id, ins.unit, ins.asker, ins.holder, ins.address,
                                        ins.tries)
                self.log.warning("data_unreachable", task_id=ins.task_id, unit=ins.unit,
                                 worker_id=ins.asker, holder=ins.holder, address=ins.address)
                payload, type_name, text, _ = describe_exception(error)
                self._task_ended(ins.client_id, ins.task_id, m.TaskErred(
                    ins.task_id, payload, type_name, text, "", ins.unit))
            case ev.ReportInputFailed():
                kept = self.inputs.kept.get(ins.input_id)
                self.log.info("task_input_failed", task_id=ins.task_id, input_id=ins.input_id,
                              input_state=ins.input_state)
                payload, type_name, text, _ = describe_exception(InputFailed(
                    ins.task_id, ins.input_id, ins.input_state, kept.why if kept else ""))
                self._task_ended(ins.client_id, ins.task_id, m.TaskErred(
                    ins.task_id, payload, type_name, text, ""))
            case ev.ReportOverBudget():
                full = MemoryBudgetFull(self.max_key_bytes, self.max_key_bytes - ins.room + ins.held,
                                        ins.needed)
                self.log.warning("units_over_budget", task_id=ins.task_id, held=full.held,
                                 needed=ins.needed, limit=self.max_key_bytes)
                payload, type_name, text, _ = describe_exception(full)
                self._task_ended(ins.client_id, ins.task_id, m.TaskErred(
                    ins.task_id, payload, type_name, text, "", "get_work"))
            case ev.ReportCancelled():
                self.log.info("task_cancelled", task_id=ins.task_id)
                self._task_ended(ins.client_id, ins.task_id, m.TaskCancelled(ins.task_id))
            case _:
                raise TypeError(f"unknown scheduler instruction {ins!r}")

    # --- large results, held on nodes (node_results.py) ------------------------

    def _fetcher_of(self, task_id: str, client_id: str = "") -> str:
        """The key (Z85) of a task's submitter: who may fetch its result from a node."""
        task = self.scheduler.tasks.get(task_id)
        if task is not None:
            client_id = task.client_id
            if task.owner:
                return task.owner
        return self._key_text(client_id)

    def _share_result(self, client_id: str, task_id: str) -> m.ResultAt | None:
        """The task's result waits on a node: let its owner fetch it there, and say where."""
        leaving = self.leaving.pop(task_id, None)
        if leaving is None:
            return None
        node_id, worker_id, size = leaving
        owner = self._fetcher_of(task_id, client_id)
        address, server_key = self.result_ends.get(node_id, ("", ""))
        self.send(SOCKET, node_id.encode(), message=m.ShareResult(task_id, worker_id, owner))
        self.delivering[task_id] = (node_id, client_id)
        if client_id.encode() not in self.peers and not self.inputs.in_use(task_id):
            self._drop_results([task_id])  # fire and forget: its client left, nobody fetches it
        self.log.debug("result_held_on_node", task_id=task_id, node_id=node_id, size=size)
        return m.ResultAt(node_id, address, server_key, size)

    def _delivering_again(self, task_id: str, client_id: str, ended: bytes) -> None:
        """A restarted master replays a held result's end: its node drops it once delivered."""
        try:
            msg = m.decode(ended)
        except MalformedMessage:
            return
        if isinstance(msg, m.TaskDone) and msg.held is not None:
            self.delivering[task_id] = (msg.held.node_id, client_id)

    def _scatter(self, peer: Peer, msg: m.Scatter) -> None:
        """A client puts data on the cluster (``Client.scatter``): kept here when small, else
        on a node the client sends it to; either way a done task's result for inputs."""
        task_id, client_id = msg.task_id, peer.peer_id
        reason = ""
        if not task_id.startswith("scatter-") or len(task_id) > 64:
            reason = "a scattered result's id is scatter-<hex>"
        elif (under_way := self.scattering.get(task_id)) is not None \
                and under_way.client_id == client_id and under_way.size == msg.size:
            # Its client's again, after a reconnect (an answer may have been lost): the first
            # stands; where it goes is said again once known.
            if under_way.told:
                self._tell_where(task_id, under_way)
            return
        elif (task_id in self.scheduler.tasks or task_id in self.scattering
              or task_id in self.backlog.ids or self.journal.knows(task_id)):
            reason = "that id is taken"
        elif msg.again and self.inputs.refs.get(task_id) == client_id:
            # (its answer was lost on the way: the same future, not one more of it)
            self._to_client(client_id, m.ScatterDone(task_id))
            return
        elif task_id in self.inputs.kept:  # scattered before: one more future of it
            reason = "" if self.inputs.referenced_again(task_id, client_id) else "that id is taken"
            self._to_client(client_id, m.ScatterDone(task_id, reason))
            return
        elif msg.data and len(msg.data) > m.INLINE_RESULT_BYTES:
            reason = f"inline data is at most {m.INLINE_RESULT_BYTES} bytes"
        elif not msg.data and msg.size <= 0:
            reason = "nothing to scatter"
        elif (msg.data and self.max_key_bytes
              and (full := self._over_budget(peer, len(msg.data))) is not None):
            reason = str(full)
        if reason:
            self._to_client(client_id, m.ScatterDone(task_id, reason))
            return
        if msg.data:
            self.inputs.submitted(task_id, client_id, ())
            self.inputs.ended(task_id, "done", msg.data)
            self._to_client(client_id, m.ScatterDone(task_id))
            return
        if sum(1 for s in self.scattering.values() if s.client_id == client_id) >= MAX_SCATTERING:
            # A node takes a bounded number of puts at once, for every client: one client's
            # announced and never sent must not hold them all.
            self._to_client(client_id, m.ScatterAt(task_id, reason=(
                f"this client has {MAX_SCATTERING} scatters under way, the most it may")))
            return
        self.scattering[task_id] = Scattering("", client_id, peer.owner, msg.size)
        self._place_scatter(task_id)

    def _place_scatter(self, task_id: str) -> None:
        """Send a large scatter to the next node that can hold it; with none (before the first
        node joins, or while nodes rejoin a restarted master) it waits for one: the client's
        own timeout bounds that wait."""
        scattering = self.scattering[task_id]
        nodes = sorted(n for n in self.scheduler.nodes if self.result_ends.get(n, ("", ""))[0])
        if not nodes:
            scattering.node_id = ""
            self.log.info("scatter_waits_for_a_node", task_id=task_id,
                          client_id=scattering.client_id, size=scattering.size)
            return
        self.scatter_turn += 1
        scattering.node_id, scattering.told = nodes[self.scatter_turn % len(nodes)], False
        # The client hears where once the node admits its key (ScatterExpected): told at once,
        # its connection could reach the node first and be refused for good.
        self.send(SOCKET, scattering.node_id.encode(), message=m.ExpectScatter(
            task_id, scattering.owner, scattering.size))

    def _scatters_moved(self, lost_node: str | None) -> None:
        """Place the scatters waiting for a node (``lost_node`` None: one joined), or those
        under way to a node that is gone: its client is told where again and sends again."""
        for task_id, scattering in list(self.scattering.items()):
            if scattering.node_id != (lost_node or ""):
                continue
            if scattering.client_id.encode() not in self.peers:
                del self.scattering[task_id]  # its client left too: nobody sends it
            else:
                self._place_scatter(task_id)

    def _scatter_expected(self, node: Peer, msg: m.ScatterExpected) -> None:
        """A node awaits a client's scattered data, its key admitted: tell the client where."""
        pending = self.scattering.get(msg.task_id)
        if pending is None or pending.node_id != node.peer_id:
            self._refused(node, msg, "no scatter of that id was sent to this node")
            return
        pending.told = True
        self._tell_where(msg.task_id, pending)

    def _tell_where(self, task_id: str, scattering: Scattering) -> None:
        address, server_key = self.result_ends.get(scattering.node_id, ("", ""))
        self._to_client(scattering.client_id,
                        m.ScatterAt(task_id, scattering.node_id, address, server_key))

    def _scattered(self, node: Peer, msg: m.Scattered) -> None:
        """A node holds a client's scattered data (or could not take it)."""
        pending = self.scattering.get(msg.task_id)
        if pending is None or pending.node_id != node.peer_id:
            self._refused(node, msg, "no scatter of that id was sent to this node")
            return
        del self.scattering[msg.task_id]
        node_id, client_id = pending.node_id, pending.client_id
        if not msg.reason and client_id.encode() not in self.peers:  # it left meanwhile
            self.send(SOCKET, node_id.encode(), message=m.DropResults([msg.task_id]))
            return
        if not msg.reason:
            self.inputs.submitted(msg.task_id, client_id, ())
            self.inputs.ended(msg.task_id, "done")
            self.delivering[msg.task_id] = (node_id, client_id)
            self.fetched.add(msg.task_id)  # (its client has it: dropped once released)
        self._to_client(client_id, m.ScatterDone(msg.task_id, msg.reason))

    def _drop_unused(self, task_ids: list[str]) -> None:
        """Results no task may take as an input any more: held ones go once their client has
        them (until then, its Received drops them)."""
        fetched = [t for t in task_ids if t in self.fetched]
        self.fetched.difference_update(fetched)
        self._drop_results(fetched)

    def _with_inputs(self, ins: ev.Assign) -> tuple[list[tuple[str, bytes]], list[tuple[str, str]]]:
        """The results an assigned driver's arguments name: inline, or where they are held
        (the holding node is told to serve them to that worker)."""
        inline, held = [], []
        for input_id in ins.inputs:
            kept = self.inputs.kept.get(input_id)
            where = self.delivering.get(input_id)
            if kept is not None and kept.result is not None:
                inline.append((input_id, kept.result))
            elif where is not None:
                held.append((input_id, self.scheduler.data_addresses.get(where[0], "")))
                self.send(SOCKET, where[0].encode(), message=m.ShareInput(input_id, ins.worker_id))
            # else: gone (its node was lost): the worker fails the task with InputLost
        return inline, held

    def _drop_results(self, task_ids: list[str]) -> None:
        """These held results were delivered (or nobody will fetch them): their nodes let go."""
        by_node: dict[str, list[str]] = {}
        for task_id in task_ids:
            self.fetched.discard(task_id)
            where = self.delivering.pop(task_id, None)
            if where is not None:
                by_node.setdefault(where[0], []).append(task_id)
        for node_id, dropped in by_node.items():
            self.send(SOCKET, node_id.encode(), message=m.DropResults(dropped))

    def _code_for(self, ins: ev.Assign) -> bytes:
        """The code to send with an assignment: none where the worker was sent it before."""
        if not ins.code_hash:
            return ins.code
        if len(ins.code) >= INLINE_CODE_BYTES and ins.code_hash in self.worker_codes.get(
                ins.worker_id, ()):
            return b""
        self._code_sent(ins.worker_id, ins.code_hash)  # small code too: the worker keeps it
        return ins.code

    def _code_sent(self, worker_id: str, code_hash: str) -> None:
        """Note it as the worker notes a class: the first dropped once it keeps as many as it
        may, so that code it may have dropped goes again rather than by hash (a NeedCode and a
        round trip for a user whose tasks cycle through more classes than it keeps)."""
        sent = self.worker_codes.setdefault(worker_id, {})
        if code_hash not in sent and len(sent) >= m.WORKER_CLASSES:
            del sent[next(iter(sent))]
        sent[code_hash] = None

    def _send_code(self, node: Peer, worker_id: str, task_id: str, code_hash: str) -> None:
        """A worker asks for the code of a task it was assigned by hash (it dropped it since)."""
        task = self.scheduler.tasks.get(task_id)
        if task is None or worker_id not in task.workers or task.code_hash != code_hash:
            self.log.debug("code_request_dropped", worker_id=worker_id, task_id=task_id)
            return
        self._code_sent(worker_id, code_hash)
        self._to_worker(node.peer_id, worker_id, m.Code(code_hash, task.code))

    def _to_worker(self, node_id: str, worker_id: str, msg: m.Message) -> None:
        self.send(SOCKET, node_id.encode(), worker_id.encode(), message=msg)

    def _to_client(self, client_id: str, msg: m.Message) -> None:
        self.send(SOCKET, client_id.encode(), message=msg)


def runs_within(bodies: list[bytes], limit: int) -> list[list[bytes]]:
    """``bodies`` in order, in runs of at most ``limit`` bytes together (one larger alone)."""
    runs: list[list[bytes]] = []
    size = 0
    for body in bodies:
        if not runs or size + len(body) > limit:
            runs.append([])
            size = 0
        runs[-1].append(body)
        size += len(body)
    return runs


def _idle(worker: WorkerRecord) -> bool:
    """Free for work (a worker still stopping a cancelled task's code is not)."""
    return worker.task_id is None and not worker.stopping


def _with_held(states: Counter[str], held: int) -> dict[str, int]:
    """Tasks by state, the held back ones (master_backlog.py) counted as queued."""
    if held:
        states["queued"] += held
    return dict(states)


def _bad_grace(grace: float) -> str:
    """Why a cancel's grace is refused ("" if it is not)."""
    if math.isfinite(grace) and 0 <= grace <= m.MAX_STOP_GRACE_S:
        return ""
    return f"a cancel's grace is seconds from 0 to {m.MAX_STOP_GRACE_S:g}, not {grace!r}"


def _no_task(task_id: str) -> str:
    return (f"no task {task_id!r} submitted with this key on this master (unknown, or "
            "forgotten after it ended)")


def describe_exit(msg: m.WorkerExited) -> str:
    if msg.signal is not None:
        try:
            how = f"killed by signal {msg.signal} ({signals.Signals(msg.signal).name})"
        except ValueError:
            how = f"killed by signal {msg.signal}"
    else:
        how = f"exited with code {msg.exitcode}"
    if msg.ended:
        how += f" by its node: it sent {msg.ended[:200]}"
    return f"worker {msg.worker_id} (pid {msg.pid}) {how}, peak memory {msg.maxrss_kb // 1024} MiB"
