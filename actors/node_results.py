"""Large task results held on the node, fetched by their owner straight from here.

A plain Task's result (or a ParallelTask's reduced result) larger than ``INLINE_RESULT_BYTES``
does not travel worker -> node -> master -> client. The worker hands it to its node, the master
learns only where it is and its size, and the client fetches it from the node directly:

    worker -> node     [worker, b"h", task_id, *parts]        (before its TaskResult, held=True)
                       or [worker, b"f", HeldFile]: in a sealed memory file of the worker's,
                       which the node opens through /proc and answers (HeldFileTaken) first
    master -> node     ShareResult(task_id, worker, owner)     once the master took the result
    client -> node     [key, routing, FetchResult]             on the node's "results" ROUTER
    node -> client     [routing, ResultData, *parts] | [routing, ResultData(path)]
                       | [routing, ResultMissing]
    master -> node     DropResults(task_ids)                   delivered, or the client is gone
    master -> node     ExpectScatter(task_id, owner, size)     a client will put data here
    node -> master     ScatterExpected(task_id)                its key is admitted: tell it where

The results socket admits only the keys the master named to this node: the owner of a task it
assigned here (``AssignTask.owner``, a driver's: before any result of it can exist) or of a
scatter it announced (``ExpectScatter``; the master tells the client where to put it only once
the node said ``ScatterExpected``). A stranger is refused at the handshake (``ServerCurve.admit``)
and sends nothing, not even one large frame for ZeroMQ to take whole before the node could look
at it. What an admitted key may fetch is decided here, per request: only the results the
master shared with that key as their owner.
A request that comes before the share (the client is quick, the master's word slower) waits
for it, up to ``SHARE_WAIT_S``. A worker may hand over only the result of a task it holds
(``TaskEnds``), once; the payload is never unpickled here.

A client on the node's host, with the node's uid (it says its kernel's boot id and its uid),
is answered with a file to read instead of the bytes: the result, moved into a memory file
(``memfd``, read through ``/proc/<node pid>/fd/N``), or its spilled copy. That spares the
encryption of the TCP path, which is what limits it on one host (about 200 MB/s); the client
proves nothing more by it than the filesystem already grants (only the node's uid can read the
node's files), and a name with a random nonce keeps it from reading another namespace's file.
A client that cannot read the file asks again for the bytes.

Memory: results are held in memory up to ``memory_bytes`` in all; beyond that they are written
to the node's run directory (``spill_dir``) and read back when fetched. Results never shared
(the worker died before its TaskResult reached the master, a master that never came back) go
after ``UNSHARED_TTL_S``. Everything here runs on the node's hub thread: no lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import structlog

from actors import messages as m
from actors.errors import MalformedMessage
from actors.memory import SEALS, sealed_file, write_all
from actors.node_data import WORKERS, boot_id
from transport import Hub
from transport.hub import ServerCurve
from transport.keys import KeyPair

log = structlog.get_logger("actors.node")

RESULTS = "results"
HOLD = b"h"
HOLD_FILE = b"f"
SHARE_WAIT_S = 10.0  # a fetch that came before the master's share waits this long for it
UNSHARED_TTL_S = 600.0
MAX_WAITING = 16  # fetches parked per result before its share (another admitted key may ask)
MAX_READERS = 1024  # workers a held input is shared with at once (the oldest named go first)
MAX_LOCAL_FILES = 256  # results moved into memory files at once (each holds a descriptor)
MEMORY_BYTES = 1 << 30  # results held in memory, in all; the rest goes to disk
MAX_EXPECTED = 64  # scattered puts announced and not yet done
EXPECT_S = 120.0  # how long an announced put is waited for
MAX_ADMITTED = 4096  # keys admitted to the results socket; past it the longest unnamed go
MASTER = "master"  # the node's socket to its master (node_actor.py)


M = TypeVar("M", bound=m.Message)


class Holds(Protocol):
    def holds(self, worker: bytes, task_id: str) -> bool: ...


@dataclass
class _Held:
    worker: str
    size: int
    since: float
    data: list[bytes] | None  # its parts; None: in the file ``path`` or the memory file ``fd``
    lengths: list[int]  # of its parts, in order: the file holds them end to end
    path: str = ""
    owner: str = ""  # set by the master's ShareResult
    # The workers it is an input of (ShareInput), named last in order: past MAX_READERS the one
    # named longest ago is forgotten (a long-lived input read by ever new workers kept its
    # first 1,024 and refused every later one, failing their tasks with InputLost).
    readers: dict[str, None] = field(default_factory=dict)
    nonce: str = ""  # in the name of its spilled file or memory file
    fd: int = -1  # its memory file, once a local client asked for it


@dataclass
class _Waiting:
    routing: bytes
    key: str
    deadline: float
    local: bool


Reply = Callable[[Hub, bytes, bytes, bytes], None]  # (hub, origin, requester, body)


class ResultStore:
    """See the module docstring. ``tasks`` says which tasks a worker holds (``TaskEnds``)."""

    def __init__(self, node_id: str, pair: KeyPair, host: str, spill_dir: str, tasks: Holds,
                 memory_bytes: int = MEMORY_BYTES,
                 pids: Mapping[str, int] | None = None) -> None:
        self.node_id = node_id
        self.pair = pair
        self.host = host
        self.spill_dir = spill_dir
        self.tasks = tasks
        self.memory_bytes = memory_bytes
        self.pids = pids if pids is not None else {}  # worker id -> pid (the Node keeps it)
        self.address = ""
        self.held: dict[str, _Held] = {}
        self.waiting: dict[str, list[_Waiting]] = {}
        # Scattered data a client will put (ExpectScatter): task -> (owner key, size, until).
        self.expected: dict[str, tuple[str, int, float]] = {}
        # Keys the master named (Z85) -> when last named, in namings: the results socket admits
        # these alone. Read on the authenticator's thread (``admits``): only ever set, never
        # taken out and put back, so that a key named again is never missing for an instant.
        self.admitted: dict[str, int] = {}
        self._named = 0
        # Input requests that came before the master's ShareInput: (origin, requester, until).
        self.inputs_waiting: dict[str, list[tuple[bytes, str, float]]] = {}
        self.reply: Reply | None = None  # the data plane's way back to a requester
        self.in_memory = 0
        self.local_files = 0
        # The hub's clock, read here too: a scatter right after the node started has its
        # ExpectScatter come before the hub's first tick, and a deadline counted from 0 was
        # overdue at that tick ("the client did not send the data in time").
        self.now = time.monotonic()
        self.boot_id = boot_id()
        self.log = log.bind(role="node", node_id=node_id)

    def add_to(self, hub: Hub) -> None:
        """Before ``hub.start()``: the results ROUTER, on the data plane's interface."""
        url = f"tcp://[{self.host}]:0" if ":" in self.host else f"tcp://{self.host}:0"
        hub.add_router(RESULTS, url, with_keys=True, views=True,  # scattered data's parts
                       curve=ServerCurve(self.pair.public, self.pair.secret, "",
                                         admit=self.admits))

    def bound(self, hub: Hub, data_address: str) -> None:
        """After ``hub.start()``: announced at the data plane's host, on our own port."""
        port = hub.address(RESULTS).rsplit(":", 1)[1]
        self.address = f"{data_address.rsplit(':', 1)[0]}:{port}"

    @property
    def server_key(self) -> str:
        return self.pair.public.decode()

    # --- who may connect ----------------------------------------------------

    def admits(self, key: bytes) -> bool:
        """Whether a key (Z85) may connect to the results socket: the master named it here.
        Asked on the authenticator's thread, at each handshake."""
        return key.decode(errors="replace") in self.admitted

    def admit(self, owner: str) -> None:
        """The master named this key here (hub thread; for every task a driver runs here, so a
        key named lately is left as it is). Past ``MAX_ADMITTED`` keys, the quarter named
        longest ago go: their connections stay, a new one is refused."""
        if not owner or self.admitted.get(owner, -MAX_ADMITTED) > self._named - MAX_ADMITTED // 4:
            return
        self._named += 1
        self.admitted[owner] = self._named
        if len(self.admitted) > MAX_ADMITTED:
            oldest = sorted(self.admitted, key=self.admitted.__getitem__)[:MAX_ADMITTED // 4]
            for key in oldest:
                del self.admitted[key]
            log.info("results_keys_forgotten", count=len(oldest), node_id=self.node_id)

    # --- from the worker, the master and clients ---------------------------

    def from_worker(self, worker: bytes, frames: list[bytes]) -> bool:
        """``[b"h", task_id, *parts]``: a worker leaves its task's result here (one pickle, or
        a pickle and its out-of-band buffers: ``serialize.dumps_result_parts``)."""
        if len(frames) < 3 or frames[0] != HOLD:
            return False
        task_id = bytes(frames[1]).decode(errors="replace")  # (a view, were it 64 KiB or more)
        name = worker.decode(errors="replace")
        if not self.tasks.holds(worker, task_id) or task_id in self.held:
            self.log.warning("result_refused", worker_id=name, task_id=task_id[:100],
                             why="not a task this worker holds" if task_id not in self.held
                             else "already held")
            return True
        parts = frames[2:]
        lengths = [len(part) for part in parts]
        entry = _Held(name, sum(lengths), self.now, parts, lengths)
        self.in_memory += entry.size
        if self.in_memory > self.memory_bytes:
            self._spill(task_id, entry)
        self.held[task_id] = entry
        self.log.debug("result_held", task_id=task_id, worker_id=name, size=entry.size,
                       parts=len(parts), on_disk=entry.data is None)
        return True

    def from_worker_file(self, hub: Hub, worker: bytes, body: bytes) -> None:
        """``[b"f", HeldFile]``: a worker's result in its sealed memory file; answered at once."""
        msg = self._decoded(body, m.HeldFile, "worker", "malformed_frame")
        if msg is None:
            return
        reason = self._take_file(worker, msg)
        if reason:
            self.log.info("result_file_refused", task_id=msg.task_id[:100], reason=reason,
                          worker_id=worker.decode(errors="replace"))
        hub.send_now(WORKERS, [worker, m.encode(m.HeldFileTaken(msg.task_id, not reason,
                                                                reason))])

    def _take_file(self, worker: bytes, msg: m.HeldFile) -> str:
        """Our own descriptor of the worker's result file; why not, else ""."""
        name = worker.decode(errors="replace")
        if not self.tasks.holds(worker, msg.task_id) or msg.task_id in self.held:
            return "not a task this worker holds, or held already"
        if self.local_files >= MAX_LOCAL_FILES:
            return f"{MAX_LOCAL_FILES} result files held already"
        pid = self.pids.get(name)
        size = sum(msg.lengths)
        if pid is None or not msg.nonce or msg.fd < 0 or min(msg.lengths, default=0) < 0:
            return "not a worker of this node, or a malformed hand-over"
        path, name_of = f"/proc/{pid}/fd/{msg.fd}", f"/memfd:pydra-result-{msg.nonce} "
        try:
            if not os.readlink(path).startswith(name_of):
                return "not its result file"
            # The worker's code may swap its descriptor between that look and this open (for
            # a FIFO without a writer, whose open blocked this thread, and every socket of the
            # node, for good): opened without waiting, and what was opened is looked at again.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            return f"cannot open it: {exc}"
        try:
            if not (stat.S_ISREG(os.fstat(fd).st_mode)
                    and os.readlink(f"/proc/self/fd/{fd}").startswith(name_of)):
                raise ValueError("not its result file")
            # Sealed (memory.SEALS), it cannot change once handed over: a file that shrank
            # under a client's mapping would kill the client (SIGBUS).
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & SEALS != SEALS:
                raise ValueError("not sealed against change")
            if os.fstat(fd).st_size != size:
                raise ValueError(f"{os.fstat(fd).st_size} bytes, not {size}")
        except (OSError, ValueError) as exc:
            os.close(fd)
            return str(exc)
        entry = _Held(name, size, self.now, None, msg.lengths, fd=fd, nonce=msg.nonce)
        self.local_files += 1
        self.in_memory += size
        self.held[msg.task_id] = entry
        if self.in_memory > self.memory_bytes:
            self._spill(msg.task_id, entry)
        self.log.debug("result_held", task_id=msg.task_id, worker_id=name, size=size,
                       parts=len(msg.lengths), in_file=True)
        return ""

    def from_master(self, hub: Hub, msg: m.Message) -> bool:
        match msg:
            case m.ShareResult(task_id=task_id, worker_id=worker_id, owner=owner):
                entry = self.held.get(task_id)
                if entry is None or entry.worker != worker_id:
                    self.log.warning("share_of_unknown_result", task_id=task_id, worker_id=worker_id)
                    for waiting in self.waiting.pop(task_id, []):
                        self._missing(hub, waiting.routing, task_id, "this node holds no such result")
                    return True
                entry.owner = owner
                for waiting in self.waiting.pop(task_id, []):
                    self._answer(hub, waiting.routing, waiting.key, task_id, waiting.local)
            case m.ShareInput(task_id=task_id, worker_id=worker_id):
                entry = self.held.get(task_id)
                if entry is not None:
                    entry.readers.pop(worker_id, None)
                    entry.readers[worker_id] = None
                    if len(entry.readers) > MAX_READERS:
                        del entry.readers[next(iter(entry.readers))]
                # Only this reader's requests: a task's input asked for by the workers of
                # several tasks at once waits for each one's share (those of another node's
                # workers were refused here when the first share came, failing their tasks).
                asked = self.inputs_waiting.pop(task_id, [])
                if entry is not None:
                    left = [a for a in asked if a[1] != worker_id]
                    if left:
                        self.inputs_waiting[task_id] = left
                    asked = [a for a in asked if a[1] == worker_id]
                for origin, requester, _ in asked:  # (no entry: each refused, as it is gone)
                    self._serve_input(hub, origin, requester, task_id)
            case m.ExpectScatter(task_id=task_id, owner=owner, size=size):
                if len(self.expected) < MAX_EXPECTED:
                    self.expected[task_id] = (owner, size, self.now + EXPECT_S)
                    self.admit(owner)
                    hub.send_now(MASTER, [m.encode(m.ScatterExpected(task_id))])
                else:
                    hub.send_now(MASTER, [m.encode(m.Scattered(task_id, size, "the node has too "
                                                               "many puts under way"))])
            case m.DropResults(task_ids=task_ids):
                for task_id in task_ids:
                    self._drop(task_id)
            case _:
                return False
        return True

    def from_client(self, hub: Hub, frames: list[bytes]) -> None:
        """``[key, routing, FetchResult]`` from the results ROUTER (or a ``PutResult`` with the
        parts of scattered data after it)."""
        if len(frames) > 3:
            self._put(hub, frames[0].decode(errors="replace"), frames[2], frames[3:])
            return
        if len(frames) != 3:
            log.warning("malformed_frames", source="results client", count=len(frames))
            return
        key, routing, body = frames
        msg = self._decoded(body, m.FetchResult, "results client", "malformed_fetch")
        if msg is None:
            return
        entry = self.held.get(msg.task_id)
        if entry is not None and not entry.owner:
            # The master's share is on its way: answer when it comes.
            waiting = self.waiting.setdefault(msg.task_id, [])
            if len(waiting) < MAX_WAITING:
                waiting.append(_Waiting(routing, key.decode(errors="replace"),
                                        self.now + SHARE_WAIT_S, self._local(msg)))
                return
        self._answer(hub, routing, key.decode(errors="replace"), msg.task_id, self._local(msg))

    def _put(self, hub: Hub, key: str, body: bytes, parts: list[bytes]) -> None:
        """A client puts scattered data the master told us to expect from its key."""
        msg = self._decoded(body, m.PutResult, "results client", "malformed_put")
        if msg is None:
            return
        expected = self.expected.get(msg.task_id)
        size = sum(map(len, parts))
        if expected is None or expected[0] != key:
            self.log.warning("put_refused", task_id=msg.task_id[:100], why="not expected from this key")
            return  # (said to no one: a stranger learns nothing, the master's wait runs out)
        del self.expected[msg.task_id]
        if size != expected[1] or msg.lengths != [len(part) for part in parts] \
                or msg.task_id in self.held:
            reason = "the data is not what was announced"
        else:
            reason = ""
            entry = _Held("", size, self.now, parts, list(msg.lengths), owner=key)
            self.in_memory += size
            if self.in_memory > self.memory_bytes:
                self._spill(msg.task_id, entry)
            self.held[msg.task_id] = entry
            self.log.info("scatter_held", task_id=msg.task_id, size=size)
        hub.send_now(MASTER, [m.encode(m.Scattered(msg.task_id, size, reason))])

    def input_request(self, hub: Hub, origin: bytes, body: bytes) -> None:
        """A worker (ours: ``origin`` b"", or a peer node's) asks for a held result that is an
        input of its task: served once the master has said so (``ShareInput``), to it alone."""
        msg = self._decoded(body, m.InputRequest, "data plane", "malformed_input_request")
        if msg is None:
            return
        entry = self.held.get(msg.task_id)
        if entry is not None and msg.requester not in entry.readers:
            waiting = self.inputs_waiting.setdefault(msg.task_id, [])
            if len(waiting) < MAX_WAITING:
                waiting.append((origin, msg.requester, self.now + SHARE_WAIT_S))
                return
        self._serve_input(hub, origin, msg.requester, msg.task_id)

    def _serve_input(self, hub: Hub, origin: bytes, requester: str, task_id: str) -> None:
        entry = self.held.get(task_id)
        reason, data = "", b""
        if entry is None or requester not in entry.readers:
            reason = "this node holds no such result for that worker"
        else:
            try:
                data = b"".join(entry.data) if entry.data is not None else self._read(entry)
            except OSError as exc:
                reason = f"its copy is unreadable: {exc}"
        lengths = entry.lengths if entry is not None and not reason else []
        self.log.debug("input_sent", task_id=task_id, requester=requester, size=len(data),
                       reason=reason)
        if self.reply is not None:
            self.reply(hub, origin, requester.encode(),
                       m.encode(m.InputData(task_id, data, lengths, reason)))

    def tick(self, hub: Hub, now: float) -> None:
        self.now = now
        for task_id, (_, size, until) in list(self.expected.items()):
            if until <= now:
                del self.expected[task_id]
                hub.send_now(MASTER, [m.encode(m.Scattered(task_id, size, "the client did not "
                                                           "send the data in time"))])
        for task_id, asked in list(self.inputs_waiting.items()):
            for origin, requester, until in asked:
                if until <= now:
                    self._serve_input(hub, origin, requester, task_id)  # (not shared: refused)
            left = [a for a in asked if a[2] > now]
            if left:
                self.inputs_waiting[task_id] = left
            else:
                del self.inputs_waiting[task_id]
        for task_id, waiting in list(self.waiting.items()):
            late = [w for w in waiting if w.deadline <= now]
            for w in late:
                self._missing(hub, w.routing, task_id, "the master did not confirm this result")
            if len(late) == len(waiting):
                del self.waiting[task_id]
            else:
                self.waiting[task_id] = [w for w in waiting if w.deadline > now]
        stale = [task_id for task_id, entry in self.held.items()
                 if not entry.owner and now - entry.since > UNSHARED_TTL_S]
        for task_id in stale:
            self.log.info("result_dropped", task_id=task_id, why="never claimed by the master")
            self._drop(task_id)

    def close(self) -> None:
        for task_id in list(self.held):
            self._drop(task_id)

    # --- inside -------------------------------------------------------------

    def _decoded(self, body: bytes, kind: type[M], source: str, malformed: str) -> M | None:
        """``body`` as a ``kind`` message, or None (logged) when it is malformed or another."""
        try:
            msg = m.decode(body)
        except MalformedMessage as exc:
            self.log.warning(malformed, source=source, error=str(exc))
            return None
        if not isinstance(msg, kind):
            self.log.warning("unexpected_message", source=source, type=type(msg).__name__)
            return None
        return msg

    def _local(self, msg: m.FetchResult) -> bool:
        return bool(self.boot_id) and msg.boot_id == self.boot_id and msg.uid == os.getuid()

    def _answer(self, hub: Hub, routing: bytes, key: str, task_id: str, local: bool) -> None:
        entry = self.held.get(task_id)
        if entry is None or entry.owner != key:
            # The same answer for another's result as for none: nothing to learn by probing.
            self._missing(hub, routing, task_id, "this node holds no result of that task for "
                                                 "this key (fetched and delivered already, or "
                                                 "the node restarted)")
            return
        lengths = entry.lengths if len(entry.lengths) > 1 else []
        if local and (path := self._as_file(task_id, entry)):
            self.log.debug("result_sent", task_id=task_id, size=entry.size, path=path)
            hub.send_now(RESULTS, [routing, m.encode(m.ResultData(task_id, entry.size, path,
                                                                  entry.nonce, lengths))])
            return
        parts = entry.data
        if parts is None:
            try:
                parts = [self._read(entry)]
            except OSError as exc:
                self._missing(hub, routing, task_id, f"its copy is unreadable: {exc}")
                return
        self.log.debug("result_sent", task_id=task_id, size=entry.size)
        hub.send_now(RESULTS, [routing, m.encode(m.ResultData(task_id, entry.size,
                                                              lengths=lengths)), *parts])

    @staticmethod
    def _missing(hub: Hub, routing: bytes, task_id: str, reason: str) -> None:
        hub.send_now(RESULTS, [routing, m.encode(m.ResultMissing(task_id, reason))])

    def _as_file(self, task_id: str, entry: _Held) -> str:
        """A file a local client may read the result from: its spilled copy, or a memory file
        it moves into (its bytes leave the heap); "" when none can be had."""
        if entry.path:
            return entry.path
        if entry.fd < 0:
            if self.local_files >= MAX_LOCAL_FILES:
                return ""
            assert entry.data is not None
            made = sealed_file(entry.data, "pydra-result")  # (the same kind a worker hands over)
            if made is None:
                self.log.warning("memory_file_refused", task_id=task_id)
                return ""
            entry.fd, entry.nonce = made
            entry.data = None  # (still in memory: in the file)
            self.local_files += 1
        return f"/proc/{os.getpid()}/fd/{entry.fd}"

    @staticmethod
    def _read(entry: _Held) -> bytes:
        if entry.fd >= 0:
            parts, at = [], 0
            while at < entry.size:  # (a single read stops at 2 GiB)
                part = os.pread(entry.fd, min(entry.size - at, 1 << 30), at)
                if not part:
                    raise OSError(f"its memory file ends at {at} of {entry.size} bytes")
                parts.append(part)
                at += len(part)
            return b"".join(parts) if len(parts) != 1 else parts[0]
        with open(entry.path, "rb") as f:
            return f.read()

    def _spill(self, task_id: str, entry: _Held) -> None:
        """From memory (its parts, or its memory file) to a file in the run directory."""
        nonce = secrets.token_hex(8)
        path = os.path.join(self.spill_dir, f"result-{nonce}")
        try:
            os.makedirs(self.spill_dir, mode=0o700, exist_ok=True)
            parts = entry.data if entry.data is not None else [self._read(entry)]
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write_all(fd, parts)
            finally:
                os.close(fd)
        except OSError as exc:  # a full disk: keep it in memory rather than lose it
            self.log.warning("result_spill_failed", task_id=task_id, size=entry.size, error=str(exc))
            with contextlib.suppress(OSError):
                os.unlink(path)
            return
        if entry.fd >= 0:
            os.close(entry.fd)
            entry.fd = -1
            self.local_files -= 1
        self.in_memory -= entry.size
        entry.data, entry.path, entry.nonce = None, path, nonce
        self.log.info("result_spilled", task_id=task_id, size=entry.size, path=path,
                      in_memory=self.in_memory)

    def _drop(self, task_id: str) -> None:
        entry = self.held.pop(task_id, None)
        if entry is None:
            return
        if entry.data is not None:
            self.in_memory -= entry.size
        elif entry.fd >= 0:
            os.close(entry.fd)
            self.local_files -= 1
            self.in_memory -= entry.size
        elif entry.path:
            with contextlib.suppress(OSError):
                os.unlink(entry.path)
