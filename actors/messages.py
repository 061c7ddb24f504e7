"""The catalogue of control messages: every struct that crosses a process boundary.

Messages are msgspec structs encoded as msgpack arrays with a type tag, so a
frame either decodes to exactly one of these types or is rejected with
``MalformedMessage``; nothing a peer sends can reach a handler half-parsed.
User objects (task classes, arguments, results, exceptions) are opaque
``bytes`` fields holding cloudpickle output: the master and the nodes carry
them without ever unpickling them.

Routing (see transport/hub.py): a master frame is ``[peer, body]`` for the
node or client ``peer`` itself, or ``[node, worker, body]`` for a worker behind
that node; a worker prefixes what it sends with ``b"n"`` (for its node) or
``b"m"`` (relayed to the master).
"""

from __future__ import annotations

import zlib
from typing import Any

import msgspec

from actors.errors import MalformedMessage

#: Bumped on any incompatible change of this catalogue; checked in the handshake.
PROTOCOL_VERSION = 18  # 18: AssignTasks, TaskResults, TasksEnded; 17: SubmitMany, TaskState.task_ids; 16: Submit.items, ItemsDone (client.map_batch), Holding; 15: Hello.handshake (a node back after a dropped connection is taken back); 14: the results socket admits named keys (AssignTask.owner, ScatterExpected), a worker's Hello.token; 13: a scalar argument or result is MessagePack (serialize.py); 12: futures as arguments (Submit.inputs, AssignTask.inputs, Release, ShareInput, InputRequest, InputData); 11: cooperative stop (Cancel.grace, StopTask, TaskStopped); 10: results held on nodes (ResultAt, ShareResult, FetchResult...); 9: WorkerStats; 8: CancelTask/CancelReply, LogsRequest/LogsReply, StoryReply.error; 7: Hello.running, UnitOutcome.digest


class Message(msgspec.Struct, tag=True, array_like=True, frozen=True, gc=False):
    """Base of every message. ``tag=True`` puts the class name on the wire. ``gc=False``: the
    cyclic collector never tracks one (a message is a tree of plain values, in no cycle), so a
    process does not walk the thousands it makes a second, nor a client the results it holds."""


# --- handshake and liveness -------------------------------------------------


class Hello(Message, frozen=True, kw_only=True):
    """First message on every connection: who I am and what I speak."""

    role: str  # "node" | "client" | "worker"
    peer_id: str
    protocol: int
    version: str  # the pydra-actors package version
    host: str = ""
    pid: int = 0
    slots: int = 0  # a node's worker count
    data_address: str = ""  # a node's endpoint for other nodes' data requests
    results_address: str = ""  # a node's endpoint for clients fetching results it holds
    # A node's data endpoint for peer nodes on its host and uid: "<boot id> <uid> <ipc address>"
    local_data: str = ""
    # A node back after losing its master: each worker that ran code, and the tasks it still
    # holds. The master takes back what it can (SchedulerState's WorkerAdopted), stops the rest.
    running: list[tuple[str, list[str]]] = []
    token: str = ""  # a worker's: the secret its node started it with (node_actor.py, "Proof")
    # A node's handshakes since it started: one more each time it lost its connection to the
    # master. A Hello repeated while the first awaits its Welcome says the same number; a new
    # one says what either side sent meanwhile may be lost (the master takes the node back).
    # (Last: a peer of the protocol before still decodes this Hello, and is refused by number.)
    handshake: int = 0


class Welcome(Message, frozen=True):
    """The handshake is accepted. A master restarted on the same state directory keeps its
    ``master_id`` (its clients' futures ride through) and counts one more ``epoch``: a peer
    that was welcomed by a higher epoch refuses a lower one (a paused master that woke up)."""

    master_id: str
    peer_id: str
    heartbeat_s: float = 1.0
    epoch: int = 0
    # The largest message the master reads, in bytes (0: no bound; ``--max-message``): a larger
    # one closes the sender's connection unread, so a client refuses to send it.
    max_message: int = 0


class Refused(Message, frozen=True):
    """The handshake (or a request from an unknown peer) is refused; ``reason`` says why."""

    reason: str


class Heartbeat(Message, frozen=True):
    pass


class Bye(Message, frozen=True):
    """A node or client leaves on purpose (so the master need not wait for a timeout)."""

    reason: str = ""


# --- client <-> master ------------------------------------------------------


class Submit(Message, frozen=True, kw_only=True):
    """Run a task: shipped by value (``code``), or deployed (``code`` empty, ``name`` is
    ``"package.module:Class"`` and the master pins the newest version of that package)."""

    task_id: str
    name: str  # the class's qualified name, or the deployed task's full name
    kind: str  # "task" | "parallel" ("" for a deployed task: the master knows)
    code: bytes  # cloudpickled task class; b"" for a deployed task, or one this client shipped
    args: bytes  # cloudpickled (args, kwargs)
    priority: int = 0
    retries: int = 0  # times a unit (or a Task's work) that raises runs again
    # The code's content hash. A client ships each code once: later submits of the same class
    # carry only the hash, and the master takes the code this client shipped under it.
    code_hash: str = ""
    # The tasks (of this client) whose results are among the arguments (futures in ``args``):
    # it runs once they are done, with their results in their place.
    inputs: list[str] = []
    # A batched map (``Client.map_batch``, a ParallelTask): each unit's outcome goes to this
    # client as it finishes (``ItemsDone``), besides to its driver.
    items: bool = False


class SubmitMany(Message, frozen=True, kw_only=True):
    """Tasks of one class (or deployed name) with the same options, in one message: what they
    share travels once, each (``task_ids[i]``, ``args[i]``) is a task of its own, answered as its
    own ``Submit`` would be (``Client.map``'s items whose arguments hold no future). At most
    ``MAX_SUBMIT_MANY`` tasks; ``args`` as long as ``task_ids``."""

    task_ids: list[str]
    args: list[bytes]
    name: str
    kind: str
    code: bytes
    priority: int = 0
    retries: int = 0
    code_hash: str = ""


#: Tasks in one SubmitMany at most (a client sends a larger map as several).
MAX_SUBMIT_MANY = 1024

#: Seconds a cancelled task's code has to stop (``Task.task_stop_requested``) before its worker
#: is killed, unless the canceller says otherwise; and the most it may say.
STOP_GRACE_S = 5.0
# A task's priority, either way: the largest integer the dashboard's JSON reader keeps exact
# (the journal's SQLite keeps 64 bits; a larger one stopped every commit, for every client).
MAX_PRIORITY = 2**53 - 1
MAX_STOP_GRACE_S = 600.0


class Cancel(Message, frozen=True):
    task_id: str
    grace: float = STOP_GRACE_S  # 0: kill its workers at once


class StoryRequest(Message, frozen=True):
    task_id: str


class StoryReply(Message, frozen=True):
    task_id: str
    entries: list[tuple[str, str, str, str, float]]  # (key, start, finish, cause, time)
    # Why there is no story: no task of the asker's key has this id ("" for a task it may read).
    error: str = ""


class CancelTask(Message, frozen=True):
    """Cancel a task of the caller's key and say what became of it (``python -m actors cancel``
    is not the client that submitted it; a future's ``Cancel`` gets no reply but the end)."""

    task_id: str
    grace: float = STOP_GRACE_S


class CancelReply(Message, frozen=True):
    task_id: str
    status: str  # the task's status after the request: "cancelled", or how it had ended
    error: str = ""  # no task of the asker's key has this id


class LogsRequest(Message, frozen=True):
    """The output the master kept of a task of the caller's key: its last ``limit`` lines."""

    task_id: str
    limit: int = 1000


class LogsReply(Message, frozen=True):
    task_id: str
    lines: list[tuple[str, OutputLine]]  # (worker id, line), oldest first
    dropped: int  # lines the task printed that are not here (workers' and the master's caps)
    error: str = ""  # no task of the asker's key has this id


class InfoRequest(Message, frozen=True):
    pass


class TasksRequest(Message, frozen=True):
    """The tasks submitted with the caller's key (by any of its clients), newest first."""

    limit: int = 1000


class TaskInfo(msgspec.Struct, array_like=True, frozen=True, kw_only=True, gc=False):
    task_id: str
    name: str
    client_id: str
    status: str  # queued, running, done, erred, cancelled
    done: int  # units (a ParallelTask) or steps reported by its work
    total: int  # 0: not known yet
    priority: int
    submitted: float  # wall-clock seconds; 0.0: not known (its story's oldest lines dropped)
    started: float  # 0.0: not yet
    ended: float  # 0.0: not yet


class TasksReply(Message, frozen=True):
    tasks: list[TaskInfo]


class ClusterInfo(Message, frozen=True):
    nodes: list[str]
    workers: int
    idle_workers: int
    tasks_running: int
    tasks_queued: int = 0
    # (node id, host, workers, idle workers), one per node
    node_workers: list[tuple[str, str, int, int]] = []
    master_id: str = ""
    epoch: int = 0
    version: str = ""  # the master's pydra-actors version
    # Why the master's own node (a LocalCluster's, or the one `python -m actors.master` starts)
    # is not running and will not be started again; "" while it runs or where there is none.
    local_node_failed: str = ""


#: A result larger than this (its pickle, in bytes) does not ride inline through the master: a
#: plain Task's stays on its node for the client to fetch (``ResultAt``), a unit's on its worker
#: for the driver to gather. Below it, one hop more costs less than a connection and a round trip.
INLINE_RESULT_BYTES = 256 * 1024
#: At most this much of one run's unit results goes inline in its ``UnitsDone``; the results
#: past it stay on the worker like large ones: a report stays far below the least the master
#: reads (``--max-message``, 64 MiB at the least).
RUN_INLINE_BYTES = 16 << 20


class ResultAt(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """Where a task's large result waits for its client: the node's results endpoint, the key
    that endpoint proves (CURVE, Z85 text) and the result's size in bytes."""

    node_id: str
    address: str
    server_key: str
    size: int


class TaskDone(Message, frozen=True):
    """A task ended well: its result inline, or (``held``) where to fetch it."""

    task_id: str
    result: bytes
    held: ResultAt | None = None


class TaskErred(Message, frozen=True):
    """A task failed. ``error`` is a cloudpickled exception (empty when not picklable)."""

    task_id: str
    error: bytes
    type_name: str
    message: str
    traceback: str
    unit: str = ""


class TaskCancelled(Message, frozen=True):
    task_id: str


class TasksEnded(Message, frozen=True):
    """master -> client: the ends of a client's tasks that one scheduler call ended, in order,
    in one message (each as it would come alone: a burst's tasks end many at a time)."""

    ends: list[TaskDone | TaskErred | TaskCancelled]


class Accepted(Message, frozen=True):
    """master -> client: these submissions are in the master's journal: they survive a restart
    of the master, so the client need not keep them to send again."""

    task_ids: list[str]


class Received(Message, frozen=True):
    """client -> master: the messages ending these tasks arrived; the journal may drop them."""

    task_ids: list[str]


#: The most inputs (futures among its arguments) one task may name.
MAX_INPUTS = 10_000
# Shipped classes a worker keeps, the first dropped first; the master keeps the same account of
# what it sent each worker, so that code named by hash alone is mostly there (else NeedCode).
WORKER_CLASSES = 32


class Scatter(Message, frozen=True):
    """client -> master: data put on the cluster as the result of ``task_id`` (named by its
    content), for tasks to take as an input: inline (``data``, at most INLINE_RESULT_BYTES), or,
    with ``data`` empty, a request for a node to send ``size`` bytes to (``ScatterAt``)."""

    task_id: str
    data: bytes = b""
    size: int = 0
    # Sent again after a Welcome (its answer may have been lost): not one more future of data
    # this client has scattered already.
    again: bool = False


class ScatterAt(Message, frozen=True):
    """master -> client: send the scattered data to this node's results endpoint (``PutResult``),
    or why not (``reason``)."""

    task_id: str
    node_id: str = ""
    address: str = ""
    server_key: str = ""
    reason: str = ""


class ExpectScatter(Message, frozen=True):
    """master -> node: the client of key ``owner`` will put ``size`` bytes as ``task_id``."""

    task_id: str
    owner: str
    size: int


class PutResult(Message, frozen=True):
    """client -> node results endpoint, followed by the parts (``lengths``): scattered data."""

    task_id: str
    lengths: list[int]


class ScatterExpected(Message, frozen=True):
    """node -> master: the put of ``task_id`` is awaited and its client's key admitted to the
    results socket: the master may tell the client where to send it (``ScatterAt``)."""

    task_id: str


class Scattered(Message, frozen=True):
    """node -> master: the scattered data of ``task_id`` is held here (or why not)."""

    task_id: str
    size: int
    reason: str = ""


class ScatterDone(Message, frozen=True):
    """master -> client: the scattered data is on the cluster (or why not): its future may
    be passed to tasks now."""

    task_id: str
    reason: str = ""


class Detach(Message, frozen=True):
    """client -> master: fire and forget: these tasks of mine (and the inputs they wait for)
    run to their end even if I leave; their results then go nowhere."""

    task_ids: list[str]


class Release(Message, frozen=True):
    """client -> master: nothing here holds these tasks' futures any more: their results need
    not be kept as inputs for later tasks (once the tasks waiting for them have run)."""

    task_ids: list[str]


class Holding(Message, frozen=True):
    """client -> master, on a connection made again to the same master: the only tasks whose
    futures it holds now. A ``Release`` lost with the connection that dropped is made good: the
    rest of its results go as if released."""

    task_ids: list[str]


class ItemsDone(Message, frozen=True):
    """master -> client: outcomes of a batched map's items as their units finish (its task's
    result has them all again at its end). ``(index, count, outcome)``: a unit's pickled
    outcome (``count`` 0), or a pack's of ``count`` items from ``index``, a pickled list."""

    task_id: str
    items: list[tuple[int, int, bytes]]


class TaskProgress(Message, frozen=True):
    """master -> client: how far a task is. A ParallelTask counts units: ``total`` is final once
    ``sliced_all`` (its slicer is exhausted), a declared hint before (0: not known yet). A plain
    Task counts what its ``work`` reports (``task_progress``)."""

    task_id: str
    done: int
    total: int
    sliced_all: bool  # ``total`` is final


class TaskState(Message, frozen=True):
    """master -> client: these tasks of its have a worker now (``"running"``), or are waiting for
    one again (``"queued"``: their driver was lost); one message a tick for all of them. Their
    ends come as TaskDone, TaskErred or TaskCancelled."""

    task_ids: list[str]
    state: str


class OutputLine(Message, frozen=True, kw_only=True):
    """One line a task's code printed or logged (nested in ``TaskOutput``)."""

    stream: str  # "stdout" | "stderr" | "log"
    level: str  # a log record's level name; "" for stdout and stderr
    logger: str  # a log record's logger name; ""
    phase: str  # "work" | "get_work" | "work_unit" | "reduce" | "thread" (a thread of its own)
    unit: int  # the unit's index in a work_unit; -1 elsewhere
    text: str
    time: float  # seconds since the epoch, on the worker


class TaskOutput(Message, frozen=True):
    """worker -> master -> the task's client: lines the task's code printed or logged on one
    worker, in order. ``dropped``: lines not sent since the last batch (each worker keeps at most
    a cap per task). The master sets ``worker_id`` to the sender it authenticated."""

    task_id: str
    worker_id: str
    lines: list[OutputLine]
    dropped: int = 0


# --- master <-> node --------------------------------------------------------


class WorkerReady(Message, frozen=True):
    """A node's fresh worker process said hello and can take a task instance."""

    worker_id: str
    pid: int


class WorkerExited(Message, frozen=True):
    worker_id: str
    pid: int
    exitcode: int | None  # None when killed by a signal
    signal: int | None
    maxrss_kb: int
    expected: bool  # the node was asked to stop it
    # Why its node ended it, unasked ("" otherwise): it kept sending what the node refused.
    ended: str = ""


class WorkerStats(Message, frozen=True):
    """node -> master, every few seconds: what each worker process uses, for the dashboard.
    ``(worker id, CPU % of one core since the last report, resident bytes)``."""

    workers: list[tuple[str, float, int]]


class WorkerPaused(Message, frozen=True):
    """worker -> master: my memory is past my pause mark even with what I hold on disk (``paused``):
    send me no new work until I say it fell back (``paused=False``)."""

    paused: bool
    rss: int  # resident bytes when it said so
    mark: int  # the pause mark, bytes


class KillWorker(Message, frozen=True):
    worker_id: str
    reason: str


# --- master <-> worker (relayed by the node) --------------------------------


class StopTask(Message, frozen=True):
    """master -> worker: the task was cancelled; stop its code (its stop flag, ``TaskStopped``
    at its next progress report) and say ``TaskStopped`` once none runs. The master kills the
    worker if that has not come within ``grace`` seconds."""

    task_id: str
    grace: float


class TaskStopped(Message, frozen=True):
    """worker -> master: no code of the cancelled task runs here any more; nothing of it will
    be sent. The worker serves on, warm for the same submitter."""

    task_id: str


class AssignTask(Message, frozen=True, kw_only=True):
    """Load a task instance. The driver slices and reduces; every assigned worker runs units.

    A deployed task comes as ``package``/``version``/``name`` with empty ``code``. Shipped code
    already sent to this worker comes as its ``code_hash`` alone: a worker that no longer has it
    asks with ``NeedCode``."""

    task_id: str
    name: str
    kind: str
    code: bytes
    args: bytes
    driver: bool
    package: str = ""
    version: str = ""
    code_hash: str = ""
    # The results its arguments' futures stand for: inline (task id, result), or held on a
    # node (task id, that node's data address: the worker asks there with InputRequest).
    inputs: list[tuple[str, bytes]] = []
    held_inputs: list[tuple[str, str]] = []
    # A driver's: its submitter's key (Z85), which the node then admits to its results socket
    # (node_results.py; read by position as the node relays it, node_actor.py _AssignHead: keep it
    # last).
    owner: str = ""


class AssignTasks(Message, frozen=True):
    """master -> worker: plain Tasks queued on one worker in one scheduling pass, in order, as
    one message (each as its own ``AssignTask`` would be handled)."""

    tasks: list[AssignTask]


class NeedCode(Message, frozen=True):
    """Worker -> master: an assignment named code by its hash alone, and this worker has none."""

    task_id: str
    code_hash: str


class Code(Message, frozen=True):
    """Master -> worker: the code a ``NeedCode`` asked for."""

    code_hash: str
    code: bytes


# --- task packages (TaskSync) -----------------------------------------------


class NeedVersion(Message, frozen=True):
    """worker -> node: make this package version available in the node's cache."""

    package: str
    version: str


class VersionAvailable(Message, frozen=True):
    """node -> worker: the version's folder (``ok``), or why it cannot be had."""

    package: str
    version: str
    ok: bool
    path: str = ""
    reason: str = ""


class ChunkRequest(Message, frozen=True):
    package: str
    version: str
    start: int
    count: int


class ChunkReply(Message, frozen=True):
    package: str
    version: str
    start: int
    total: int
    chunks: list[bytes]


class UnknownVersion(Message, frozen=True):
    package: str
    version: str


class NewestVersions(Message, frozen=True):
    """master -> nodes: the newest version of every package (None: package removed)."""

    versions: list[tuple[str, str | None]]


class PackagesRequest(Message, frozen=True):
    pass


class TaskListing(Message, frozen=True):
    name: str  # "package.module:Class"
    kind: str
    parameters: list[str] | None
    doc: str
    last_run: float = 0.0  # wall-clock time a task of this name last started here; 0.0: never


class PackageListing(Message, frozen=True):
    package: str
    version: str
    tasks: list[TaskListing]
    broken: list[tuple[str, str]]  # (module, error)


class PackagesReply(Message, frozen=True):
    packages: list[PackageListing]


#: The most plain units one ``UnitCall`` packs (``UnitCall.count``).
MAX_PACK = 512


def pack_size(wanted: int) -> int:
    """The pack size for ``wanted`` units: the largest power of two not above it, 1 to
    ``MAX_PACK`` (powers of two: packs that end at multiples of the size keep their bounds when
    it doubles or halves)."""
    return 1 << (min(max(wanted, 1), MAX_PACK).bit_length() - 1)


class UnitCall(Message, frozen=True, gc=False):
    """One unit: its index in slicing order and its cloudpickled argument.

    ``deps`` are indices of earlier units whose results it takes as inputs; ``keep`` marks a unit
    whose result stays on its worker (other units may depend on it) instead of riding inline.

    ``count`` > 0 makes it a pack: the plain units ``index`` .. ``index + count - 1``, ``args``
    the pickled list of their arguments, its result the pickled list of theirs. A driver packs
    units measured to be tiny (``DriverResults.pack``), so that the master, the wire and the
    pickler pay once for a pack what they paid for each unit; everywhere but the driver's
    ``reduce`` and the worker's loop a pack is one unit."""

    index: int
    args: bytes
    # A tuple: an empty one decodes to the shared (), where a list is made for every unit
    # (decoding a batch of plain units took twice as long).
    deps: tuple[int, ...] = ()
    keep: bool = False
    count: int = 0


def unit_digest(unit: UnitCall) -> int:
    """What identifies a unit across a re-slicing: its arguments and its dependencies (as the
    list they once were, so that digests a journal holds from an older version still match)."""
    return zlib.crc32(unit.args,
                      zlib.crc32(repr(list(unit.deps)).encode()) if unit.deps else _NO_DEPS)


_NO_DEPS = zlib.crc32(b"[]")  # most units: spare the repr


class RunUnits(Message, frozen=True):
    """A batch of units for one worker. ``holders`` names, for each dependency of these units,
    a worker holding its result and that worker's node data address."""

    task_id: str
    run_id: int  # one run id for the batch; results come back with it
    units: list[UnitCall]
    holders: list[tuple[int, str, str]] = []  # (unit index, worker id, node data address)
    sizes: dict[int, int] = {}  # of those results, in bytes, where known


class ReleaseUnits(Message, frozen=True):
    """master -> worker: the scheduler no longer wants these runs (answered by UnitsReleased)."""

    task_id: str
    run_ids: list[int]


class UnitsReleased(Message, frozen=True):
    task_id: str
    run_ids: list[int]


class StealUnits(Message, frozen=True):
    """master -> worker: give this run back, to run elsewhere, unless it has started."""

    task_id: str
    run_id: int


class StealReply(Message, frozen=True):
    task_id: str
    run_id: int
    accepted: bool
    state: str  # where the run stood when the request came


class TakeBackTask(Message, frozen=True):
    """master -> worker: give back this plain Task, queued here behind one that runs long, unless
    it has begun."""

    task_id: str


class TakeBackReply(Message, frozen=True):
    """worker -> master: ``accepted``, it will not run here (it was queued, not begun); else it
    began (or ended, or was never here) and its result comes as usual."""

    task_id: str
    accepted: bool


class Missing(Message, frozen=True):
    """worker -> master: no holder this worker knows can give unit ``index``'s result."""

    task_id: str
    index: int


class WhoHas(Message, frozen=True):
    """master -> worker: the holders of unit ``index``'s result now (after ``Missing``)."""

    task_id: str
    index: int
    holders: list[tuple[str, str]]  # (worker id, node data address)
    size: int = -1  # of that result, in bytes (-1: not known)


class PeerGone(Message, frozen=True):
    """master -> worker: a peer worker died; transfers from it will never answer."""

    worker_id: str


class LocalPeers(Message, frozen=True):
    """master -> node: every node's data address and its ``Hello.local_data``; a node reaches
    those on its own host and uid by their ipc endpoint, not over encrypted TCP."""

    peers: list[tuple[str, str]]


class ShareInput(Message, frozen=True):
    """master -> node: the result a worker of yours left for ``task_id`` is an input of a task
    that runs on ``worker_id``: serve it to that worker (``InputRequest``)."""

    task_id: str
    worker_id: str


class InputRequest(Message, frozen=True):
    """worker -> (its node -> the holder's node): the held result of ``task_id``, an input of the
    task this worker is to run."""

    task_id: str
    requester: str


class InputData(Message, frozen=True):
    """holder's node -> worker: the held result of ``task_id`` (its parts end to end, of these
    ``lengths``), or why not (``reason``)."""

    task_id: str
    data: bytes
    lengths: list[int]
    reason: str = ""


class ShareResult(Message, frozen=True):
    """master -> node: the result a worker of yours left for ``task_id`` is the task's result;
    its owner (the submitting client's key, Z85) may fetch it."""

    task_id: str
    worker_id: str
    owner: str


class HeldFile(Message, frozen=True):
    """worker -> node: the result of ``task_id`` is in my memory file ``fd`` (sealed: it can no
    longer change; its name holds ``nonce``), its parts end to end (``lengths``). Take your own
    descriptor of it, and say so (``HeldFileTaken``) before I send the TaskResult."""

    task_id: str
    fd: int
    nonce: str
    lengths: list[int]


class HeldFileTaken(Message, frozen=True):
    """node -> worker: the node holds the result file (``ok``), or could not take it
    (``reason``): then send the bytes."""

    task_id: str
    ok: bool
    reason: str = ""


class DropResults(Message, frozen=True):
    """master -> node: these tasks' results were delivered (or their client is gone)."""

    task_ids: list[str]


class FetchResult(Message, frozen=True):
    """client -> node: send me the result of my task ``task_id`` (``TaskDone.held``). A client
    that may be on the node's host says its kernel's boot id and its uid: the node may then
    answer with a file to read instead of the bytes (``ResultData.path``)."""

    task_id: str
    boot_id: str = ""
    uid: int = -1


class ResultData(Message, frozen=True):
    """node -> client: the result of ``task_id`` follows (``size`` bytes: one frame, or one
    frame per part of ``lengths``); or, for a client on the node's host with its uid, it is in
    the file ``path`` (its parts end to end), whose name holds ``nonce`` (so that a path seen
    from another pid or mount namespace is not trusted)."""

    task_id: str
    size: int
    path: str = ""
    nonce: str = ""
    lengths: list[int] = []  # a pickle and its out-of-band buffers: their sizes, in order


class ResultMissing(Message, frozen=True):
    """node -> client: no result of ``task_id`` can be sent from here, and why."""

    task_id: str
    reason: str


class DataRequest(Message, frozen=True):
    """worker -> (its node -> the holder's node ->) holder: send me these results."""

    task_id: str
    keys: list[str]
    requester: str


class DataReply(Message, frozen=True):
    task_id: str
    holder: str
    data: list[tuple[str, bytes]]
    missing: list[str]
    # Keys whose data travel as frames of their own before this message's frame, in this order
    # (large values: sent without a copy into the message, received without one out of it).
    attached: list[str] = []


class WorkerStoryRequest(Message, frozen=True):
    task_id: str


class WorkerStory(Message, frozen=True):
    task_id: str
    entries: list[tuple[str, str, str, str, float]]


class UnitsSliced(Message, frozen=True):
    """The driver's slicer produced more units; ``done`` when it is exhausted."""

    task_id: str
    units: list[UnitCall]
    done: bool


class UnitOutcome(Message, frozen=True, gc=False):
    index: int
    ok: bool
    value: bytes  # cloudpickled result, or cloudpickled exception when not ok
    type_name: str = ""
    message: str = ""
    traceback: str = ""
    held: bool = False  # ok, and the value stays on the worker (``value`` is empty)
    size: int = 0  # held: the value's size in bytes
    # Not ok, and the worker must not serve on: the code raised what is not an ordinary
    # Exception (SystemExit, KeyboardInterrupt) or a MemoryError, or the task did not load.
    fatal: bool = False
    # ``unit_digest`` of the unit, as the worker ran it: lets a restarted master keep a result
    # that reached it only after the restart (held by the node), for a re-sliced unit that is
    # the same. The worker's word: it can only mislead the replay of its own task.
    digest: int = 0
    # A pack's outcome (``UnitCall.count``): the units it covers; not ok, the one that raised.
    count: int = 0
    unit: int = -1


class UnitsDone(Message, frozen=True):
    task_id: str
    run_id: int
    outcomes: list[UnitOutcome]
    elapsed: float = 0.0  # seconds spent running the batch, for batch sizing


class DriverResults(Message, frozen=True):
    """Finished unit results, forwarded to the task's driver for ``reduce``; ``held`` names
    units whose results stay on a worker: (unit index, worker id, node data address)."""

    task_id: str
    results: list[tuple[int, bytes]]
    held: list[tuple[int, str, str]] = []
    sizes: dict[int, int] = {}  # of the held results, in bytes, where known
    pack: int = 0  # the plain units to slice into one UnitCall from now on (0: as before)


class TaskResult(Message, frozen=True):
    """The driver finished the task instance (``work`` returned or ``reduce`` ran)."""

    task_id: str
    outcome: UnitOutcome
    elapsed: float = 0.0  # seconds ``work`` ran (a plain Task), for the scheduler's prefetch


class TaskResults(Message, frozen=True):
    """worker -> master: plain Tasks' ends that came in one turn of the worker, in order, as
    one message (each as its own ``TaskResult`` would be handled)."""

    results: list[TaskResult]


class WorkProgress(Message, frozen=True):
    """worker -> master: a plain Task's ``work`` says how far it is (``task_progress``); a
    ParallelTask's driver says how many units it will slice (``task_total``, ``done`` is 0)."""

    task_id: str
    done: int
    total: int


class ReleaseTask(Message, frozen=True):
    """The task ended well: drop the instance and wait, warm, for the same submitter's next task."""

    task_id: str


class WorkerFailed(Message, frozen=True):
    """The worker could not load or start the task (unpicklable class, import error...)."""

    task_id: str
    outcome: UnitOutcome


AnyMessage = (
    Hello
    | Welcome
    | Refused
    | Heartbeat
    | Bye
    | Accepted
    | Received
    | Release
    | Holding
    | Detach
    | Scatter
    | ScatterAt
    | ExpectScatter
    | PutResult
    | ScatterExpected
    | Scattered
    | ScatterDone
    | Submit
    | SubmitMany
    | Cancel
    | StoryRequest
    | StoryReply
    | CancelTask
    | CancelReply
    | LogsRequest
    | LogsReply
    | InfoRequest
    | TasksRequest
    | TasksReply
    | ClusterInfo
    | TaskDone
    | TaskErred
    | TaskCancelled
    | TaskProgress
    | TaskState
    | TaskOutput
    | WorkProgress
    | ItemsDone
    | WorkerReady
    | WorkerExited
    | WorkerStats
    | WorkerPaused
    | KillWorker
    | StopTask
    | TaskStopped
    | AssignTask
    | AssignTasks
    | TaskResults
    | TasksEnded
    | NeedCode
    | Code
    | RunUnits
    | ReleaseUnits
    | UnitsReleased
    | StealUnits
    | StealReply
    | TakeBackTask
    | TakeBackReply
    | Missing
    | WhoHas
    | PeerGone
    | LocalPeers
    | ShareResult
    | ShareInput
    | InputRequest
    | InputData
    | HeldFile
    | HeldFileTaken
    | DropResults
    | FetchResult
    | ResultData
    | ResultMissing
    | DataRequest
    | DataReply
    | WorkerStoryRequest
    | WorkerStory
    | UnitsSliced
    | UnitsDone
    | DriverResults
    | TaskResult
    | ReleaseTask
    | WorkerFailed
    | NeedVersion
    | VersionAvailable
    | ChunkRequest
    | ChunkReply
    | UnknownVersion
    | NewestVersions
    | PackagesRequest
    | PackagesReply
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(AnyMessage)


def encode(message: Message) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes | memoryview) -> Message:
    """Decode one frame; anything that is not exactly a catalogue message raises."""
    try:
        message: Message = _decoder.decode(frame)
    except (msgspec.MsgspecError, ValueError) as exc:  # ValueError: bad UTF-8 in a tag
        raise MalformedMessage(str(exc), len(frame)) from None
    return message
