"""The user's handle on a cluster: submit tasks, get futures.

``Client(address, keys=DIR)`` connects to a running master;
``Client(cluster)`` to a ``LocalCluster``; ``Client()`` to ``$ACTORS_ADDRESS``,
and failing that it starts a LocalCluster of its own (as Dask's ``Client()``).
The client's sockets live on its own transport hub thread; futures are
completed from there and are safe to wait on from any thread.
"""

from __future__ import annotations

import atexit
import collections
import gc
import hashlib
import html
import inspect
import itertools
import mmap
import os
import queue
import sys
import threading
import time
import uuid
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple, cast

import msgspec
import structlog
import zmq

from actors import __version__
from actors import messages as m
from actors.addresses import client_address
from actors.cluster import LocalCluster
from actors.errors import (
    ActorsError,
    ArgumentsNotSerializable,
    ClientClosed,
    ClusterInTask,
    ClusterStartFailed,
    ConnectFailed,
    HandshakeRefused,
    InvalidArguments,
    KeyRefused,
    LargePayloadWarning,
    MasterLost,
    MessageTooLarge,
    NoSuchTask,
    ResultLost,
    ScatterFailed,
    UnknownTask,
)
from actors.functions import check_function_arguments, function_task
from actors.futures import (  # (Future's old home: ``from actors.client import Future``)
    _CANCELLED,
    _DONE,
    _ERRED,
    _LOST,
    _QUEUED,
    _RUNNING,
    Future,
    _Callbacks,
    _Parts,
    check_grace,
)
from actors.inputs import collecting
from actors.launch import LOCAL_WORKERS_ENV, default_keys_dir
from actors.node_data import boot_id
from actors.serialize import (
    dumps,
    dumps_result_parts,
    dumps_scalar_call,
    dumps_task_class,
)
from actors.task import Task, check_arguments, check_named_arguments, in_worker
from actors.waiting import as_completed, futures_in, gather  # noqa: F401 (as_completed: its old home)
from transport import ClientCurve, Hub, load_keypair, load_public_key

log = structlog.get_logger("actors.client")

MASTER = "master"
LARGE_CODE_BYTES = 10 * 2**20  # a task's code above this size is worth a warning
# A SubmitMany's arguments at most (or, if less, half of what the master reads less its class's
# code): a larger map goes as several, and the master's turn on one stays short.
SUBMIT_MANY_BYTES = 2**20
FIRST_SUBMIT_MANY = 64
HEARTBEAT_S = 2.0  # how often a client tells the master it is alive
# No Welcome this long after saying Hello on a new connection: connect afresh (a master that
# woke from a pause may have parked it: Hub.reconnect_now).
RENEW_AFTER_S = 6.0
# A result held on a node (TaskDone.held) is fetched from there at once; no answer within this
# (plus a second per 20 MB: a large result takes a while to arrive) and it is lost.
FETCH_WAIT_S = 30.0
FETCH_RATE = 20e6
RESULTS_PREFIX = "results:"  # hub sockets to nodes' results endpoints, one per address


# Connection attempts all refused this long (no master listens there) fail a new client at
# once rather than at its timeout: a master started at the same moment is given this long.
REFUSED_FOR_S = 2.0


def fire_and_forget(futures: Any) -> None:
    """Run these tasks to their end even when their client closes (or drops their futures):
    Dask's ``fire_and_forget``. The inputs they wait for are kept running too; their results,
    once the client is gone, go nowhere. ``futures``: one, or any structure ``gather`` takes."""
    by_client: dict[Client, list[str]] = {}
    for fut in dict.fromkeys(f._cluster_future() for f in futures_in(futures)):
        by_client.setdefault(fut._client, []).append(fut.task_id)
    for client, task_ids in by_client.items():
        client._send(m.Detach(task_ids))


def _read_local(msg: m.ResultData, size: int) -> list[bytes | memoryview] | None:
    """A held result from the file its node named, if it is the node's (its name holds the
    nonce: not a file another namespace shows at that path) and whole; else None. One pickle
    is read; a pickle and its buffers are mapped, copy-on-write: its arrays use the pages."""
    try:
        target = os.readlink(msg.path) if msg.path.startswith("/proc/") else msg.path
        if not msg.nonce or f"result-{msg.nonce}" not in target:
            return None
        with open(msg.path, "rb") as f:
            if not msg.lengths:
                data = f.read(size + 1)
                return [data] if len(data) == size else None
            if os.fstat(f.fileno()).st_size != size or sum(msg.lengths) != size:
                return None
            mapped = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        return None
    return _split([memoryview(mapped)], msg.lengths, size)


def _split(frames: Sequence[bytes | memoryview], lengths: list[int],
           size: int) -> list[bytes | memoryview] | None:
    """A result's parts: the frames as they came (one per part), or one frame cut at
    ``lengths``; None when the sizes do not add up."""
    if sum(len(f) for f in frames) != size or (lengths and sum(lengths) != size):
        return None
    if len(frames) == max(1, len(lengths)):
        return list(frames) if not lengths or [len(f) for f in frames] == lengths else None
    if len(frames) != 1:
        return None
    view = memoryview(frames[0])
    cuts = list(itertools.accumulate(lengths, initial=0))
    return [view[a:b] for a, b in itertools.pairwise(cuts)]


BOOT_ID = boot_id()


class _TaskIds:
    """Task ids: the class's name and 64 random bits, drawn from the system's random source
    256 ids at a time (``uuid4`` a task, one ``getrandom`` call each, was a tenth of a client's
    CPU for a small task). Random, not counted: another client's ids cannot be foreseen, and
    the master refuses one of them (``TaskIdTaken``) rather than take it for a resend."""

    BATCH = 256

    def __init__(self) -> None:
        self.forget()

    def forget(self) -> None:
        """Nothing drawn: in a forked child, whose parent would draw the same ids next."""
        self._lock = threading.Lock()  # submits may come from many threads: one draws at a time
        self._drawn: list[str] = []

    def new(self, name: str) -> str:
        # A list's pop is atomic: threads taking ids at once never take the same one, so only
        # a draw takes the lock (a lock an id was 0.6 of a map's ~5 us an item before it sends).
        while True:
            try:
                return f"{name}-{self._drawn.pop()}"
            except IndexError:
                with self._lock:
                    if not self._drawn:
                        raw = os.urandom(8 * self.BATCH).hex()
                        self._drawn = [raw[i:i + 16] for i in range(0, len(raw), 16)]


_task_ids = _TaskIds()
os.register_at_fork(after_in_child=_task_ids.forget)


class _collector_held:  # (lower case: read as a statement, ``with _collector_held():``)
    """The cyclic collector held off while a ``map`` makes its thousands of objects (a future,
    a message and their entries an item), all kept: a collection then can free none of them,
    only walk them (~18 collections, ~5 ms of a 2,000-item ``map``'s ~16 ms). Turned on again
    after only if it was on: a process that runs without it keeps it off."""

    __slots__ = ("held",)

    def __enter__(self) -> None:
        self.held = gc.isenabled()
        if self.held:
            gc.disable()

    def __exit__(self, *_: object) -> None:
        if self.held:
            gc.enable()


def _close_at_exit(client: Client) -> Callable[[], None]:
    """Close ``client`` as the interpreter exits, if nobody did: before the clusters stop (a
    ``LocalCluster``'s finalizer runs later: atexit runs the last registered first), so that a
    script that never closed its client ends without its master seeming lost."""
    ref = weakref.ref(client)

    def close() -> None:
        found = ref()
        if found is not None:
            found.close()

    atexit.register(close)
    return close


def _user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning point at the caller's first frame outside this
    package (the user's submit or map line, however deep the call came from)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    return level


def _not_serializable(task: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                      exc: Exception) -> ArgumentsNotSerializable:
    """Which argument would not pickle (each tried alone, on this failure path only)."""
    named = [(f"argument {n + 1}", value) for n, value in enumerate(args)]
    named += [(f"argument {name!r}", value) for name, value in kwargs.items()]
    for what, value in named:
        try:
            dumps(value)
        except Exception as alone:
            return ArgumentsNotSerializable(task, what, type(value).__qualname__, str(alone))
    return ArgumentsNotSerializable(task, "the arguments", type(exc).__name__, str(exc))


def _check_options(priority: int, retries: int) -> None:
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be a whole number >= 0, not {retries!r}")
    if (isinstance(priority, bool) or not isinstance(priority, int)
            or abs(priority) > m.MAX_PRIORITY):
        raise ValueError(f"priority must be a whole number between -(2**53 - 1) and "
                         f"2**53 - 1, not {priority!r}")


def _check_option_names(task: type[Task] | str | Callable[..., Any], priority: int,
                        retries: int) -> None:
    """``priority=`` and ``retries=`` are submit's own: refused when the task takes a parameter
    of that name too, rather than taken from it unseen (as Dask does)."""
    if not (priority or retries) or isinstance(task, str):
        return
    entry = task.task_entry() if isinstance(task, type) and issubclass(task, Task) else task
    try:
        names = inspect.signature(entry).parameters
    except (TypeError, ValueError):
        return
    for option, value in (("priority", priority), ("retries", retries)):
        if value and option in names:
            raise InvalidArguments(
                f"{getattr(entry, '__qualname__', entry)!s}{inspect.signature(entry)}",
                f"{option}={value} is submit's own option (the task's {option}), and the task "
                f"has a parameter {option!r} too: pass that argument by position or with "
                f"functools.partial, or rename the parameter")


def _same_options(a: m.Submit, b: m.Submit) -> bool:
    """Whether two submits can travel in one ``SubmitMany``: one class, the same options."""
    return (a.code_hash == b.code_hash and a.name == b.name and a.kind == b.kind
            and a.priority == b.priority and a.retries == b.retries)


class _Prepared(NamedTuple):
    """A submission checked and pickled, not yet sent (``Client._submit_all``)."""

    submit: m.Submit  # without its code: whether that goes along is decided as it is sent
    name: str  # the future's: the class's qualified name, or the deployed task's name
    kind: str  # the future's: "task" or "parallel"
    code: bytes  # the pickled class (b"" for a deployed task)


def _node_down(info: m.ClusterInfo) -> str:
    """"; the master's node is not running: <why>" where the master said so, else ""."""
    return (f"; the master's node is not running: {info.local_node_failed}"
            if info.local_node_failed else "")


def _local_workers_of_env() -> int:
    """``$ACTORS_LOCAL_WORKERS`` (set by ``launch.run_script``): the workers of the master's own
    node that a script's ``Client()`` waits for; 0 when unset or not a count."""
    try:
        return max(0, int(os.environ.get(LOCAL_WORKERS_ENV, "0")))
    except ValueError:
        return 0


class _SharedCluster:
    """The ``LocalCluster`` that ``Client()`` without an address starts: one a process, shared
    by every such client while it runs, closed with the last of them. A notebook cell
    ``client = Client()`` run again (the old client not closed: the notebook's history may
    hold it) would otherwise start another master, node and workers each time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cluster: LocalCluster | None = None
        self._users: set[object] = set()  # a token a client: letting go twice changes nothing

    def take(self, user: object) -> LocalCluster:
        with self._lock:
            cluster = self._cluster
            if cluster is not None and cluster.status == "running":
                self._users.add(user)
                log.info("local_cluster_shared", address=cluster.address,
                         clients=len(self._users))
                return cluster
            cluster = self._cluster = LocalCluster()
            self._users = {user}
            return cluster

    def let_go(self, cluster: LocalCluster, user: object) -> None:
        with self._lock:
            if cluster is self._cluster:
                self._users.discard(user)
                if self._users:
                    return
                self._cluster = None
        cluster.close()  # (closing twice is nothing: LocalCluster's finalizer runs once)


_DEFAULT_CLUSTER = _SharedCluster()


class Client:
    _future_type: type[Future] = Future  # (an AsyncClient's client makes AsyncFutures)
    _item_future: type[Any] | None = None  # map_batch's (item_futures.py; async_client.py)

    def __init__(
        self,
        address: str | LocalCluster | None = None,
        *,
        keys: str | os.PathLike[str] | None = None,
        timeout: float = 15.0,
        master_timeout: float = 10.0,
        show_output: bool = True,
    ) -> None:
        """``address``: the master's ``HOST:PORT``, the ``ipc://PATH`` of its ``--local-socket``
        on this host, or a ``LocalCluster`` (reached through its socket); default
        ``$ACTORS_ADDRESS``, else a ``LocalCluster`` of this process (started by the first such
        client, shared by those open at once, closed with the last). ``timeout``: seconds to wait for the
        master's welcome (and, with a ``LocalCluster`` or in a script that
        ``python -m actors.master --run`` runs, for its workers to be ready: if the master's
        own node cannot run, ``ClusterStartFailed`` says why at once).
        ``master_timeout``: seconds
        without a connection to the master after which unfinished futures fail with
        ``MasterLost`` (they fail at once if the master comes back as a new process).
        ``show_output``: show what tasks print and log (prefixed with the task; in a notebook
        under the cell that waits for it); ``future.logs()`` keeps it either way."""
        self.show_output = show_output
        self._own_cluster: LocalCluster | None = None
        self._cluster_token = object()  # this client, to the shared default cluster
        local_workers, local_address = 0, ""
        from_env = address is None and bool(os.environ.get("ACTORS_ADDRESS"))
        if address is None:
            address = os.environ.get("ACTORS_ADDRESS") or None
            # A script run by ``python -m actors.master --run``: its master's own node's
            # workers, waited for as a LocalCluster's are (``launch.run_script``).
            local_workers = _local_workers_of_env() if address else 0
        if address is None:
            if in_worker():
                raise ClusterInTask()
            address = self._own_cluster = _DEFAULT_CLUSTER.take(self._cluster_token)
        if isinstance(address, LocalCluster):
            local_workers, local_address = address.workers, address.local_address
            keys, address = address.keys_dir, address.address
        try:
            address = client_address(address)
        except BaseException:
            self._close_own_cluster()
            raise
        keys = keys or os.environ.get("ACTORS_KEYS") or default_keys_dir()
        self.address = address
        self._through = local_address  # its Unix socket, where it took that way (LocalCluster)
        self.client_id = f"client-{uuid.uuid4().hex[:12]}"
        self._futures: weakref.WeakValueDictionary[str, Future] = weakref.WeakValueDictionary()
        self._released: collections.deque[str] = collections.deque()  # futures gone (Release)
        self._scattering: dict[str, list[bytes | memoryview]] = {}  # data bound for a node
        self._futures_done = threading.Condition()  # every future's end is told through it
        self._callbacks = _Callbacks()  # where users' done-callbacks run
        self._awaited: dict[str, Future] = {}  # futures with a callback to run: held till then
        # The batches of map_batch by their task's id, while an item of one is held.
        self._batches: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        # Who waits for the answer to a request, by its key (several threads may ask the same
        # at once: each gets the answer); and the request, sent again after a Welcome (what
        # left while the master restarted reached none, or a master that did not know us yet)
        self._replies: dict[str, list[queue.SimpleQueue[m.Message]]] = {}
        self._asking: dict[str, m.Message] = {}
        self._waiting_lock = threading.Lock()
        self._welcome = threading.Event()
        self._refusal = ""
        self._auth_failed = False
        self._from_env = from_env  # the address was $ACTORS_ADDRESS's (said where it fails)
        self._refused = 0  # connection attempts refused before the first handshake
        self._reached = False  # a handshake happened (whatever its answer)
        self._send_lock = threading.Lock()
        # A class's code and its content hash, made once per class; the hashes this master has.
        self._code_cache: weakref.WeakKeyDictionary[type, tuple[str, bytes]] = (
            weakref.WeakKeyDictionary())
        self._shipped: set[str] = set()
        # Submissions the master has not said are in its journal (m.Accepted), with their code:
        # sent again when it welcomes us back after a restart. Task ids whose end arrived, to
        # tell the master on the next tick (m.Received) so that its journal may drop them.
        self._unaccepted: dict[str, tuple[m.Submit, bytes]] = {}  # as sent, and its code
        self._received: list[str] = []
        # Held results being fetched from their node (hub thread only): task -> where, deadline.
        self._fetching: dict[str, tuple[m.ResultAt, float]] = {}
        self._epoch = 0  # the highest master epoch that welcomed us
        self._last_heartbeat = 0.0  # hub thread only
        self._hello_at = time.monotonic()  # when we last said Hello
        self._unwelcomed_since: float | None = None  # hub thread only: our Hello after a reconnect
        self._closed = False
        self._names: dict[str, m.TaskListing] | None = None
        self._master_id = ""
        self._max_message = 0  # the largest message the master reads (its Welcome; 0: any)
        self._master_timeout = master_timeout
        self._disconnected_since: float | None = None  # hub thread only
        self._said_bye = False  # after it, the master knows this client no more: nothing to say
        try:
            pair = self._pair = load_keypair(keys, "client")
            curve = ClientCurve(pair.public, pair.secret, load_public_key(keys, "master"))
            self._hub = Hub(self._on_frames, on_event=self._on_event, on_tick=self._on_tick,
                            tick_s=0.1)
            # A LocalCluster's master, on this host: through its Unix socket (see LocalCluster).
            self._hub.add_dealer(MASTER, local_address or address,
                                 identity=self.client_id.encode(), curve=curve, monitor=True)
            self._hub.start()
        except BaseException:
            self._closed = True
            self._close_own_cluster()
            raise
        self._outbox = self._hub.outbox()
        self._at_exit = _close_at_exit(self)
        try:
            self._handshake(timeout)
            if local_workers:  # a local cluster is ready once its workers are
                self._wait_for_workers(local_workers, timeout, local=True)
        except BaseException:
            self.close()
            raise

    def _handshake(self, timeout: float) -> None:
        self._send(m.Hello(role="client", peer_id=self.client_id, protocol=m.PROTOCOL_VERSION,
                           version=__version__, host=os.uname().nodename, pid=os.getpid()))
        deadline = time.monotonic() + timeout
        start = time.monotonic()
        where = " (the address in $ACTORS_ADDRESS)" if self._from_env else ""
        while not self._welcome.wait(0.05):
            if self._refusal:
                raise HandshakeRefused(self._refusal)
            if self._auth_failed:
                raise KeyRefused(self.address, timeout)
            now = time.monotonic()
            if (not self._reached and self._refused >= 3
                    and now - start >= min(REFUSED_FOR_S, timeout)):
                raise ConnectFailed(self.address, now - start, "nothing accepts connections "
                                    f"there{where}, connection refused: is a master running "
                                    "at this address?")
            if now > deadline:
                raise ConnectFailed(self.address, timeout, f"is a master running there{where}?")

    # --- the API ------------------------------------------------------------

    def submit(self, task: type[Task] | str | Callable[..., Any], /, *args: Any,
               priority: int = 0, retries: int = 0, **kwargs: Any) -> Future:
        """Run one instance of ``task`` with these arguments.

        ``task`` is a Task class (shipped by value), or the name of a deployed task,
        ``"package.module:Class"``, run at the package's newest version. Arguments that
        do not fit a class are refused here; an unknown name raises ``UnknownTask``.
        ``retries``: how many times a unit (or a Task's ``work``, a slicer, a reduce) that
        raises runs again before the task fails; a worker that dies is not counted here.
        """
        _check_options(priority, retries)
        _check_option_names(task, priority, retries)
        return self._submit_all([self._prepare(task, args, kwargs, priority, retries)])[0]

    def _prepare(self, task: type[Task] | str | Callable[..., Any], args: tuple[Any, ...],
                 kwargs: dict[str, Any], priority: int, retries: int,
                 checked: bool = False) -> _Prepared:
        """One submission checked and its arguments pickled; nothing registered or sent yet.
        ``checked``: arguments of this shape (count, keywords) were found to fit already."""
        if isinstance(task, str):
            return self._prepare_deployed(task, args, kwargs, priority, retries)
        if callable(task) and not (isinstance(task, type) and issubclass(task, Task)):
            if not checked:
                check_function_arguments(task, args, kwargs)
            task = function_task(task)
        elif not checked:
            check_arguments(task, args, kwargs)
        code_hash, code = self._code_of(task)
        task_id = _task_ids.new(task.__name__)
        arguments, inputs = self._arguments(args, kwargs, task.__qualname__)
        submit = m.Submit(task_id=task_id, name=task.__qualname__, kind=task.task_kind, code=b"",
                          args=arguments, priority=priority, retries=retries,
                          code_hash=code_hash, inputs=inputs)
        return _Prepared(submit, task.__qualname__, task.task_kind, code)

    def _prepare_deployed(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                          priority: int, retries: int) -> _Prepared:
        known = self._deployed_names()
        if name not in known:
            known = self._deployed_names(refresh=True)
            if name not in known:
                raise UnknownTask(name, sorted(known))
        try:
            check_named_arguments(name, known[name].parameters, args, kwargs)
        except InvalidArguments:
            # (the listing may be an older version's: the newest, which would run, may take them)
            known = self._deployed_names(refresh=True)
            if name not in known:
                raise UnknownTask(name, sorted(known)) from None
            check_named_arguments(name, known[name].parameters, args, kwargs)
        listing = known[name]
        task_id = _task_ids.new(name.rpartition(':')[2])
        kind = "parallel" if listing.kind == "ParallelTask" else "task"
        arguments, inputs = self._arguments(args, kwargs, name)
        submit = m.Submit(task_id=task_id, name=name, kind="", code=b"", args=arguments,
                          priority=priority, retries=retries, inputs=inputs)
        return _Prepared(submit, name, kind, b"")

    def _submit_all(self, prepared: list[_Prepared]) -> list[Future]:
        """Send prepared submissions, all or none: each is encoded and held to the master's
        bound first (``MessageTooLarge`` leaves nothing registered or sent), then every future
        is registered (no answer can come before its future), then they leave in order.
        Encoding, making the futures and registering them (a weak reference each), most of a
        large ``map``'s time, happen before the send lock: other threads' submits wait only
        for the sending. Runs of them that share a class and options go as one ``SubmitMany``
        each (``_grouped``)."""
        ready = self._grouped(prepared)
        made = [self._future_type(self, item.submit.task_id, item.name, item.kind)
                for item in prepared]
        futures = self._futures
        for fut in made:
            futures[fut.task_id] = fut
        try:
            with self._send_lock:
                if self._closed:
                    raise ClientClosed(self.client_id)
                # Each code goes to the master once; later submits name it by its hash.
                # (Decided under the lock: a master's Welcome after a restart clears what it
                # has.)
                shipping: set[str] = set()
                for i, (first, message, _) in enumerate(ready):
                    code_hash = message.code_hash
                    if first.code and code_hash not in self._shipped and code_hash not in shipping:
                        message = msgspec.structs.replace(message, code=first.code)
                        ready[i] = (first, message, self._encoded(message))
                        shipping.add(code_hash)
                unaccepted = self._unaccepted
                for item in prepared:
                    unaccepted[item.submit.task_id] = (item.submit, item.code)
                self._outbox.send_all(MASTER, [body for _, _, body in ready])
                self._shipped |= shipping
            if self._batches:  # a batched map a task sent now takes is no longer its items' to end
                for item in prepared:
                    for input_id in item.submit.inputs:
                        if (batch := self._batches.get(input_id)) is not None:
                            batch.an_input = True
        except BaseException:
            # Never sent: nothing to release when they go (their weak registrations go with
            # them).
            for fut in made:
                fut._client = None  # type: ignore[assignment]
            raise
        return made

    def _grouped(self, prepared: list[_Prepared]
                 ) -> list[tuple[_Prepared, m.Submit | m.SubmitMany, bytes]]:
        """The messages that carry these submissions, encoded (without code: ``_submit_all``
        adds it where it goes), each with its first submission: a run of them of one class and
        the same options, without futures among their arguments, as one ``SubmitMany`` (up to
        ``MAX_SUBMIT_MANY`` tasks and ``SUBMIT_MANY_BYTES`` of arguments); any other alone."""
        out: list[tuple[_Prepared, m.Submit | m.SubmitMany, bytes]] = []
        run: list[_Prepared] = []
        size = budget = 0
        most = FIRST_SUBMIT_MANY
        for item in [*prepared, None]:
            submit = item.submit if item is not None else None
            alone = submit is not None and bool(submit.inputs or submit.items)
            if run and (submit is None or alone or len(run) >= most
                        or size + len(submit.args) > budget
                        or not _same_options(run[0].submit, submit)):
                first = run[0].submit
                message: m.Submit | m.SubmitMany = first if len(run) == 1 else m.SubmitMany(
                    task_ids=[p.submit.task_id for p in run], args=[p.submit.args for p in run],
                    name=first.name, kind=first.kind, code=b"", priority=first.priority,
                    retries=first.retries, code_hash=first.code_hash)
                out.append((run[0], message, self._encoded(message)))
                run, size = [], 0
                most = min(2 * most, m.MAX_SUBMIT_MANY)
            if item is None:
                break
            if alone:
                out.append((item, item.submit, self._encoded(item.submit)))
                continue
            if not run:  # (room left for the code, should the run's message carry it)
                budget = min(SUBMIT_MANY_BYTES,
                             ((self._max_message or 2 * SUBMIT_MANY_BYTES) - len(item.code)) // 2)
            run.append(item)
            size += len(item.submit.args) + len(item.submit.task_id)
        return out

    def _arguments(self, args: tuple[Any, ...], kwargs: dict[str, Any],
                   task: str = "the task") -> tuple[bytes, list[str]]:
        """The pickled arguments, and the tasks whose futures are among them (its inputs)."""
        plain = dumps_scalar_call(args, kwargs)
        if plain is not None:
            return plain, []
        with collecting() as found:
            try:
                arguments = dumps((args, kwargs))
            except Exception as exc:
                raise _not_serializable(task, args, kwargs, exc) from exc
        for fut in found.values():
            if fut._client is not self:
                raise ValueError(f"the future {fut.task_id} among the arguments is another "
                                 "client's: pass its result, or submit from that client")
        if len(found) > m.MAX_INPUTS:
            raise ValueError(f"{len(found)} futures among the arguments: at most "
                             f"{m.MAX_INPUTS} (gather them in fewer tasks)")
        return arguments, list(found)

    def _code_of(self, task: type[Task]) -> tuple[str, bytes]:
        found = self._code_cache.get(task)
        if found is None:
            try:
                code = dumps_task_class(task)
            except Exception as exc:  # (what its code captures: a lambda's open file...)
                raise ArgumentsNotSerializable(task.__qualname__, "the task's code",
                                               type(exc).__name__, str(exc)) from exc
            found = self._code_cache[task] = (hashlib.sha256(code).hexdigest(), code)
            if len(code) > LARGE_CODE_BYTES:
                warnings.warn(LargePayloadWarning(
                    f"{task.__qualname__} pickles to {len(code) / 2**20:.0f} MiB (its code and "
                    "what it captures, such as a large global array), sent to every worker that "
                    "runs it: pass large data as an argument once, or deploy the task as a "
                    "package"), stacklevel=_user_stacklevel())
        return found

    def _deployed_names(self, refresh: bool = False) -> dict[str, m.TaskListing]:
        """Deployed task name -> its listing (kind ``Task`` or ``ParallelTask``, parameters)."""
        if refresh or self._names is None:
            self._names = {t.name: t for p in self.packages() for t in p.tasks}
        return self._names

    def packages(self, timeout: float = 10.0) -> list[m.PackageListing]:
        """The deployed packages: name, version (content hash), tasks and broken modules."""
        reply = self._request("packages", m.PackagesRequest(), timeout)
        assert isinstance(reply, m.PackagesReply)
        return reply.packages

    def map(self, task: type[Task] | str | Callable[..., Any], /, *iterables: Iterable[Any],
            priority: int = 0, retries: int = 0, **kwargs: Any) -> list[Future]:
        """One task instance per item, as the builtin ``map``: with several iterables, the
        i-th items of each are its positional arguments (up to the shortest); ``kwargs`` go
        to every one."""
        if not iterables:
            raise TypeError("map() needs at least one iterable of arguments")
        _check_options(priority, retries)
        _check_option_names(task, priority, retries)
        # Every item is checked, pickled and held to the master's bound before any is sent:
        # one that is refused leaves no task of the others running without a future to it.
        # (Their shape is one: as many arguments, the same keywords. Checked once, as the
        # first item's: the checks bind names, not values, and cost the most of each item.)
        with _collector_held():
            return self._submit_all([self._prepare(task, items, kwargs, priority, retries, i > 0)
                                     for i, items in enumerate(zip(*iterables, strict=False))])

    def map_batch(self, task: type[Task] | Callable[..., Any], /, *iterables: Iterable[Any],
                  priority: int = 0, retries: int = 0, **kwargs: Any) -> list[Future]:
        """As ``map``, for many small items: they run as the work units of one task (one per
        ``item_futures.BATCH_ITEMS`` items), in packs sized from their measured time, instead of
        one task instance each: ~0.3 us of the master's CPU an item, not ~60. A future per item
        still, with the item's own result or error (an item that raises fails alone; it is run
        again up to ``retries`` times first). What differs from ``map``'s futures: an item ends
        with the pack of items it ran in, its ``cancel`` stops its map only once no item of it
        is waited for, its ``story`` is its map's, and a later task that takes it as an argument
        waits for its whole map.
        ``task``: a Task class or a function (a deployed task's name: ``map``). Items that hold
        futures go one task each, as ``map`` sends them."""
        from actors import item_futures as batched

        if not iterables:
            raise TypeError("map_batch() needs at least one iterable of arguments")
        if isinstance(task, str) or (isinstance(task, type) and issubclass(task, Task)
                                     and task.task_kind != "task"):
            raise TypeError(f"map_batch() runs a plain Task class or a function on each item, "
                            f"not {task!r}: map() takes deployed tasks and ParallelTasks")
        _check_options(priority, retries)
        _check_option_names(task, priority, retries)
        items = list(zip(*iterables, strict=False))
        if not items:
            return []
        if isinstance(task, type) or not callable(task):  # (InvalidArguments for what is neither)
            check_arguments(task, items[0], kwargs)  # (one shape for all, as map checks it)
        else:
            check_function_arguments(task, items[0], kwargs)
        # The task's code as a task's goes (by value where workers could not import it, with
        # its sources for tracebacks), once in each map's arguments.
        _, code = self._code_of(task if isinstance(task, type) else function_task(task))
        maps = batched.prepare_maps(self, task, code, items, kwargs, priority, retries)
        if maps is None:  # items hold futures: helpers would see placeholders
            return self._submit_all([self._prepare(task, args, kwargs, priority, retries, i > 0)
                                     for i, args in enumerate(items)])
        made: list[Future] = []
        for fut, size in zip(self._submit_all([p for p, _ in maps]), [n for _, n in maps],
                             strict=True):
            batch = self._batches[fut.task_id] = batched.Batch(fut)
            made += batched.make_items(self, batch, size, self._item_future_type())
        return made

    def _say_holding(self) -> None:
        """Tell the master, again connected, which futures this client holds (``Holding``):
        a ``Release`` sent into the connection that dropped is made good. Under the send lock,
        in order with submits: a future registered after the snapshot is sent after it. A
        released future's id still there is harmless: its Release follows, on the tick."""
        with self._send_lock:
            if self._closed or self._said_bye:
                return
            # Its refs copied in one call, as _unfinished does (other threads' submits add to it
            # outside this lock); a scatter still asked for is held once its answer comes.
            with self._waiting_lock:
                asked = [a.task_id for a in self._asking.values() if isinstance(a, m.Scatter)]
            held = m.encode(m.Holding([*(ref.key for ref in self._futures.valuerefs()), *asked]))
            if self._max_message and len(held) > self._max_message:
                log.warning("holding_not_said", futures=len(self._futures),
                            hint="results of futures released while the connection was down "
                                 "stay kept until this client leaves")
                return
            self._hub.send_in_order(MASTER, [held])

    def _new_task_id(self, name: str) -> str:
        return _task_ids.new(name)

    def _input_future(self, input_id: str) -> Future | None:
        """The future of an input by its id: a task's, or an item's of a batched map."""
        found = self._futures.get(input_id)
        map_id, _, index = input_id.rpartition("#")
        if found is None and (batch := self._batches.get(map_id)) is not None \
                and index.isdecimal() and index.isascii() and int(index) < len(batch.items):
            found = batch.items[int(index)]()
        return found

    def _item_future_type(self) -> type[Any]:
        if self._item_future is None:
            from actors.item_futures import ItemFuture

            self._item_future = ItemFuture
        return self._item_future

    def scatter(self, data: Any, hash: bool = True, timeout: float = 60.0) -> Any:
        """Put ``data`` on the cluster once, for tasks to take as an argument: its future (a
        list or dict of futures for a list or dict). Named by its content (``hash``): the same
        data scattered again by this client is the same future, not sent twice. Up to 256 KiB
        it is kept on the master; larger, it goes straight to a node, which hands it to the
        workers that take it. Kept while the future is held, like a task's result."""
        if isinstance(data, list | tuple):
            return [self.scatter(item, hash, timeout) for item in data]
        if isinstance(data, dict):
            return {key: self.scatter(item, hash, timeout) for key, item in data.items()}
        parts = dumps_result_parts(data, "the scattered data")
        digest = hashlib.sha256()
        for part in parts:
            digest.update(part)
        # This client's: the same data scattered by another client is another future (data
        # named by its content alone made a second client's scatter of it fail, its id taken).
        task_id = (f"scatter-{self.client_id.removeprefix('client-')}-"
                   f"{digest.hexdigest()[:24] if hash else uuid.uuid4().hex[:24]}")
        found = self._futures.get(task_id)
        if found is not None and found._status == _DONE:
            return found
        size = sum(memoryview(part).nbytes for part in parts)
        key = f"scatter {task_id}"
        if size <= m.INLINE_RESULT_BYTES:
            inline = parts[0] if len(parts) == 1 else dumps(data)
            request = m.Scatter(task_id, bytes(inline))
        else:
            self._scattering[task_id] = parts  # sent to its node on the hub thread
            request = m.Scatter(task_id, size=size)
        replies = self._await(key, request)  # (sent again after a Welcome, as any request)
        try:
            self._send_unless_away(request)
            done = replies.get(timeout=timeout + size / FETCH_RATE)
            assert isinstance(done, m.ScatterDone)
            if not done.reason:  # held before it is no longer asked for (see _say_holding)
                fut = self._future_type(self, task_id, "scatter")
                kept = _Parts(task_id, [])
                kept._value, kept._loaded = data, True
                fut._finish(_DONE, kept)
                self._futures[task_id] = fut
        except queue.Empty:
            raise TimeoutError(f"the scatter of {size:,} bytes was not confirmed within "
                               f"{timeout}s") from None
        finally:
            self._stop_waiting(key, replies)
            self._scattering.pop(task_id, None)
        if done.reason:
            raise ScatterFailed(task_id, done.reason)
        return fut

    def gather(self, futures: Any, errors: str = "raise") -> Any:
        """The results of ``futures``, in the same structure (lists, tuples, sets, dicts,
        nested); ``errors="skip"`` leaves failed ones out. See ``actors.waiting.gather``."""
        return gather(futures, errors)

    def story(self, fut: Future, timeout: float = 10.0) -> list[tuple[str, str, str, str, float]]:
        fut = fut._cluster_future()  # (an item of map_batch: its map's)
        reply = self._request(fut.task_id, m.StoryRequest(fut.task_id), timeout)
        assert isinstance(reply, m.StoryReply)
        return [tuple(entry) for entry in reply.entries]  # type: ignore[misc]

    def story_of(self, task_id: str,
                 timeout: float = 10.0) -> list[tuple[str, str, str, str, float]]:
        """The story of any task submitted with this client's key, by id (``NoSuchTask`` if
        there is none: an unknown id, one forgotten since, or another key's task)."""
        reply = self._request(task_id, m.StoryRequest(task_id), timeout)
        assert isinstance(reply, m.StoryReply)
        if reply.error:
            raise NoSuchTask(task_id, reply.error)
        return [tuple(entry) for entry in reply.entries]  # type: ignore[misc]

    def cancel_task(self, task_id: str, timeout: float = 10.0,
                    grace: float = m.STOP_GRACE_S) -> str:
        """Cancel a task submitted with this client's key, by id; its status after the request:
        ``"cancelled"``, or how it had already ended (``NoSuchTask`` as for ``story_of``).
        ``grace``: as for ``Future.cancel``."""
        check_grace(grace)
        reply = self._request(f"cancel {task_id}", m.CancelTask(task_id, float(grace)), timeout)
        assert isinstance(reply, m.CancelReply)
        if reply.error:
            raise NoSuchTask(task_id, reply.error)
        return reply.status

    def cancel(self, futures: Any, timeout: float = 10.0, grace: float = m.STOP_GRACE_S) -> int:
        """Cancel every future in ``futures`` (one, or lists, tuples, sets, dicts of them,
        nested) as ``Future.cancel`` does, all the requests at once, then wait up to
        ``timeout`` in all for their ends. Returns how many were cancelled (those that had
        already ended are not); ``TimeoutError`` if the master did not answer them all."""
        check_grace(grace)
        pending = [fut for fut in dict.fromkeys(futures_in(futures)) if not fut.done()]
        deadline = time.monotonic() + timeout
        asked = []
        from actors.item_futures import cancel_items

        tasks = cancel_items(pending)  # map_batch's items: theirs here, their maps once unwanted
        try:
            for fut in tasks:
                key, request = f"cancel {fut.task_id}", m.CancelTask(fut.task_id, float(grace))
                asked.append((fut, key, self._await(key, request)))
                self._send_unless_away(request)
            unanswered = 0
            for fut, _key, replies in asked:
                try:
                    reply = replies.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    unanswered += 1
                    continue
                if isinstance(reply, m.CancelReply) and reply.status == "cancelled":
                    fut._wait_ended(max(0.0, deadline - time.monotonic()))
        finally:
            for _fut, key, replies in asked:
                self._stop_waiting(key, replies)
        if unanswered:
            raise TimeoutError(f"no answer from the master within {timeout}s to {unanswered} "
                               f"of {len(tasks)} cancels")
        return sum(fut.cancelled() for fut in pending)

    def task_logs(self, task_id: str, limit: int = 1000,
                  timeout: float = 10.0) -> tuple[list[tuple[str, m.OutputLine]], int]:
        """The last ``limit`` lines of output the master kept of a task of this client's key
        (``(worker id, line)``, oldest first), and how many lines it printed beyond those (the
        master keeps 1,000 a task; ``NoSuchTask`` as for ``story_of``)."""
        reply = self._request(f"logs {task_id}", m.LogsRequest(task_id, limit), timeout)
        assert isinstance(reply, m.LogsReply)
        if reply.error:
            raise NoSuchTask(task_id, reply.error)
        return [(worker, line) for worker, line in reply.lines], reply.dropped

    def tasks(self, limit: int = 1000, timeout: float = 10.0) -> list[m.TaskInfo]:
        """The tasks submitted with this client's key (by this client or another using the same
        key, such as a notebook seen from the command line), newest first: id, name, status,
        progress, priority and wall-clock submitted/started/ended times (0: not yet)."""
        reply = self._request("tasks", m.TasksRequest(limit), timeout)
        assert isinstance(reply, m.TasksReply)
        return reply.tasks

    def info(self, timeout: float = 10.0) -> m.ClusterInfo:
        reply = self._request("info", m.InfoRequest(), timeout)
        assert isinstance(reply, m.ClusterInfo)
        return reply

    def _why_queued(self, fut: Future, waited: float | None) -> str:
        """For a wait that timed out on a task still queued: what the cluster lacks, in words
        (" (still queued: ...)"), where it has no worker; "" otherwise. Asked of the master
        only after a wait a person notices (a second or more), not in a polling loop."""
        if fut.status != _QUEUED or waited is None or waited < 1.0 or self._closed:
            return ""
        try:
            info = self.info(timeout=1.0)
        except (TimeoutError, ActorsError):
            return ""
        if info.workers:
            return ""
        return f" (still queued: the cluster has no worker{_node_down(info)})"

    def wait_for_workers(self, n: int, timeout: float = 30.0) -> None:
        """Block until the cluster has at least ``n`` worker processes. ``TimeoutError`` after
        ``timeout`` seconds says how many there are, and why the master's own node is down
        where it is (other hosts' nodes may still join: this waits for them)."""
        self._wait_for_workers(n, timeout, local=False)

    def _wait_for_workers(self, n: int, timeout: float, *, local: bool) -> None:
        """``local``: the workers are the master's own node's (a LocalCluster's): no other node
        will come, so once the master says that node will not run, ``ClusterStartFailed`` at
        once, with its reason."""
        deadline = time.monotonic() + timeout
        for attempt in itertools.count():
            info = self.info()
            if info.workers >= n:
                return
            down = _node_down(info)
            if local and down:
                raise ClusterStartFailed(f"{info.workers} of {n} workers{down}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"fewer than {n} workers after {timeout}s "
                                   f"({info.workers} joined{down})")
            # Each look is one round trip to the master (~1 ms): look every 2 ms for the first
            # ~0.15 s, as a new local cluster's workers are usually a few ms away, then at 10/s.
            time.sleep(0.002 if attempt < 50 else 0.1)

    def close(self) -> None:
        """Leave the master (it cancels this client's unfinished tasks) and stop the sockets.

        Unfinished futures fail at once with ``ClientClosed``; a closed client refuses every
        request with ``ClientClosed``."""
        if self._closed:
            return
        # First, so that what the master answers to the Bye (its cancels) finds them finished.
        for fut in self._unfinished():
            fut._finish(_ERRED, None, ClientClosed(self.client_id, fut.task_id))
        if self._welcome.is_set():
            self._said_bye = True  # before: a tick of the hub between the two must not follow it
            self._send(m.Bye("client closing"))
        self._closed = True
        atexit.unregister(self._at_exit)
        self._outbox.close()
        self._hub.stop()
        self._callbacks.stop()
        self._close_own_cluster()

    def _close_own_cluster(self) -> None:
        if self._own_cluster is not None:
            _DEFAULT_CLUSTER.let_go(self._own_cluster, self._cluster_token)
            self._own_cluster = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "connected to"
        tasks = self._tasks_by_status()
        through = " through its Unix socket" if self._through and not self._closed else ""
        return (f"<Client {self.client_id} {f'({tasks}) ' if tasks else ''}{state} "
                f"{self.address}{through}>")

    def _tasks_by_status(self) -> str:
        """This client's tasks that are still referenced, counted by status."""
        counts: dict[str, int] = {}
        for ref in self._futures.valuerefs():
            if (fut := ref()) is not None:
                counts[fut.status] = counts.get(fut.status, 0) + 1
        order = (_QUEUED, _RUNNING, _DONE, _ERRED, _CANCELLED, _LOST)
        return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s))

    def _repr_html_(self) -> str:
        """What a notebook shows for a client: where it is connected and what the cluster has."""
        rows = [("client", self.client_id), ("master", self.address)]
        if (tasks := self._tasks_by_status()):
            rows.append(("its tasks", tasks))
        if self._closed:
            rows.append(("state", "closed"))
        else:
            try:
                info = self.info(timeout=1.0)
                rows += [("nodes", ", ".join(info.nodes) or "none"),
                         ("workers", f"{info.workers} ({info.idle_workers} idle)"),
                         ("tasks running", str(info.tasks_running))]
            except (TimeoutError, ClientClosed):
                rows.append(("cluster", "no answer from the master"))
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                        f"<td style='text-align:left'>{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<div><b>pydra-actors Client</b><table>{cells}</table></div>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- plumbing -------------------------------------------------------------

    def _send(self, message: m.Message) -> None:
        with self._send_lock:  # one socket, many user threads
            self._send_locked(message)

    def _send_locked(self, message: m.Message) -> None:
        if self._closed:
            raise ClientClosed(self.client_id)
        self._outbox.send(MASTER, [self._encoded(message)])

    def _encoded(self, message: m.Message) -> bytes:
        body = m.encode(message)
        if self._max_message and len(body) > self._max_message:
            # The master would cut us off unread, and we would send it again on reconnecting.
            raise MessageTooLarge(type(message).__name__, len(body), self._max_message)
        return body

    def _request(self, key: str, message: m.Message, timeout: float) -> m.Message:
        """Ask the master; its answer. Asked while the master is away (restarting on its state
        directory, a link down), the request goes when it welcomes us back, within ``timeout``."""
        replies = self._await(key, message)
        try:
            self._send_unless_away(message)
            return replies.get(timeout=timeout)
        except queue.Empty:
            away = " (it has been away since)" if self._disconnected_since is not None else ""
            raise TimeoutError(f"no answer from the master within {timeout}s{away}") from None
        finally:
            self._stop_waiting(key, replies)

    def _send_unless_away(self, request: m.Message) -> None:
        """Send a request now, or, while the master is away, leave it for its Welcome."""
        if self._disconnected_since is None:
            self._send(request)
        elif self._closed:
            raise ClientClosed(self.client_id)

    def _await(self, key: str, request: m.Message | None = None) -> queue.SimpleQueue[m.Message]:
        """Wait for the answers under ``key`` (``request``: sent again after a Welcome)."""
        replies: queue.SimpleQueue[m.Message] = queue.SimpleQueue()
        with self._waiting_lock:
            self._replies.setdefault(key, []).append(replies)
            if request is not None:
                self._asking[key] = request
        return replies

    def _stop_waiting(self, key: str, replies: queue.SimpleQueue[m.Message]) -> None:
        with self._waiting_lock:
            waiting = self._replies.get(key, [])
            if replies in waiting:
                waiting.remove(replies)
            if not waiting:
                self._replies.pop(key, None)
                self._asking.pop(key, None)

    def _answer(self, key: str, message: m.Message) -> None:
        """An answer for all who wait under ``key`` (on the hub thread)."""
        for replies in tuple(self._replies.get(key, ())):
            replies.put(message)

    def _on_event(self, _socket: str, what: str) -> None:
        if what == "connect_retried":
            self._refused += 1
            return
        if what != "disconnected":
            self._reached = True
        if what in ("auth_failed", "handshake_failed"):
            self._auth_failed = True
        elif what == "disconnected" and self._welcome.is_set():
            self._unwelcomed_since = None  # (connected again, it counts anew)
            if self._disconnected_since is None:
                self._disconnected_since = time.monotonic()
                log.warning("master_disconnected", address=self.address)
        elif what == "connected" and self._disconnected_since is not None:
            # Back: the same master welcomes us again; a new one means our tasks are gone.
            self._disconnected_since = None
            log.info("master_reconnected", address=self.address)
            self._unwelcomed_since = time.monotonic()
            self._say_hello()

    def _say_hello(self) -> None:
        self._hello_at = time.monotonic()
        self._hub.send_now(MASTER, [m.encode(m.Hello(role="client", peer_id=self.client_id,
                                                     protocol=m.PROTOCOL_VERSION,
                                                     version=__version__,
                                                     host=os.uname().nodename, pid=os.getpid()))])

    def _on_tick(self, now: float) -> None:
        if self._said_bye:
            # Releases, receipts and heartbeats after the Bye would reach a master that forgot
            # this client (a warning there, on a user's first script); what they say, the Bye
            # says: every result of this client goes.
            return
        # Receipts and releases leave after what user threads queued before them: a future
        # released just after its dependent's Submit was queued (``chain = submit(inc, chain)``)
        # must not reach the master first, or the master drops the input the Submit names.
        if self._received and self._disconnected_since is None:
            received, self._received = self._received, []
            self._hub.send_in_order(MASTER, [m.encode(m.Received(received))])
        released = self._released
        if released and self._welcome.is_set() and self._disconnected_since is None:
            while released:
                batch = [released.popleft() for _ in range(min(len(released), 10_000))]
                self._hub.send_in_order(MASTER, [m.encode(m.Release(batch))])
        if (self._welcome.is_set() and self._disconnected_since is None
                and now - self._last_heartbeat >= HEARTBEAT_S):
            # The master takes a client silent for --client-timeout as gone (its tasks stop).
            self._last_heartbeat = now
            self._hub.send_now(MASTER, [m.encode(m.Heartbeat())])
        for task_id, (held, deadline) in list(self._fetching.items()):
            if now >= deadline:
                self._fetch_failed(task_id, held, f"no answer from {held.address} in time "
                                                  f"({held.size:,} bytes)")
        since = self._disconnected_since
        if since is not None and now - since >= self._master_timeout:
            self._master_lost(f"no connection for {now - since:.0f}s")
        unwelcomed = self._unwelcomed_since
        if (unwelcomed is not None and self._disconnected_since is None
                and now - self._hello_at >= RENEW_AFTER_S):
            # Connected again, and no Welcome: a master that woke from a pause may have parked
            # this connection under the id its old one still held (it hears nothing on it).
            log.warning("master_connection_renewed", address=self.address,
                        unanswered_s=round(now - unwelcomed, 1))
            self._hub.reconnect_now(MASTER)
            self._say_hello()

    def _master_lost(self, reason: str) -> None:
        """Fail every unfinished future: no result can come for them any more."""
        unfinished = self._unfinished()
        if unfinished:
            log.error("master_lost", address=self.address, reason=reason, tasks=len(unfinished))
        for fut in unfinished:
            fut._finish(_LOST, None, MasterLost(self.address, reason))
        self._unaccepted.clear()

    def _ended(self, task_id: str) -> None:
        self._unaccepted.pop(task_id, None)
        self._received.append(task_id)

    def _unfinished(self) -> list[Future]:
        # valuerefs() copies the dict in one C call: user threads may be submitting meanwhile.
        futures = [ref() for ref in self._futures.valuerefs()]
        return [f for f in futures if f is not None and not f.done()]

    # --- results held on nodes (actors/node_results.py) ----------------------

    def _put(self, at: m.ScatterAt) -> None:
        """Send scattered data to the node the master chose (on the hub thread); the master
        confirms (``ScatterDone``) once the node holds it."""
        parts = self._scattering.get(at.task_id)
        if parts is None:
            return  # given up meanwhile
        name, why = self._results_socket(at.address, at.server_key)
        if why:
            self._answer(f"scatter {at.task_id}", m.ScatterDone(at.task_id, why))
            return
        lengths = [memoryview(part).nbytes for part in parts]
        frames = [m.encode(m.PutResult(at.task_id, lengths)), *parts]  # (sent uncopied)
        self._hub.send_now(name, cast(list[bytes], frames))

    def _fetch(self, done: m.TaskDone, held: m.ResultAt) -> None:
        """Fetch a task's large result from the node that holds it (on the hub thread)."""
        if self._futures.get(done.task_id) is None:
            self._ended(done.task_id)  # nobody waits for it: the node may let it go
            return
        name, why = self._results_socket(held.address, held.server_key)
        if why:
            self._fetch_failed(done.task_id, held, why)
            return
        self._fetching[done.task_id] = (held, time.monotonic() + FETCH_WAIT_S
                                        + held.size / FETCH_RATE)
        # On the node's host with its uid, the node may hand us a file to read: no encryption,
        # no copy through a socket (node_results.py).
        self._hub.send_now(name, [m.encode(m.FetchResult(done.task_id, BOOT_ID, os.getuid()))])

    def _results_socket(self, address: str, server_key: str) -> tuple[str, str]:
        """The socket to a node's results endpoint (opened if need be, on the hub thread), and
        why it cannot be had ("" if it can)."""
        name = RESULTS_PREFIX + address
        try:
            self._hub.open_dealer_now(name, address, identity=self.client_id.encode(),
                                      curve=ClientCurve(self._pair.public, self._pair.secret,
                                                        server_key.encode()), views=True)
        except (zmq.ZMQError, ValueError) as exc:
            return name, f"cannot connect to {address}: {exc}"
        return name, ""

    def _result_arrived(self, frames: list[bytes]) -> None:
        msg = m.decode(frames[0])
        if not isinstance(msg, m.ResultData | m.ResultMissing):
            log.warning("unexpected_message", source="node results", type=type(msg).__name__)
            return
        fetching = self._fetching.pop(msg.task_id, None)
        if fetching is None:
            return  # not asked, or given up on
        held = fetching[0]
        if isinstance(msg, m.ResultMissing):
            self._fetch_failed(msg.task_id, held, msg.reason)
        elif msg.path:
            parts = _read_local(msg, held.size)
            if parts is None:  # not ours to read after all: the bytes, over the network
                self._fetching[msg.task_id] = fetching
                self._hub.send_now(RESULTS_PREFIX + held.address,
                                   [m.encode(m.FetchResult(msg.task_id))])
            else:
                self._fetched(msg.task_id, parts)
        else:
            parts = _split(frames[1:], msg.lengths, held.size)
            if parts is None:
                self._fetch_failed(msg.task_id, held, f"expected {held.size} bytes in "
                                                      f"{len(msg.lengths) or 1} part(s), got "
                                                      f"{[len(f) for f in frames[1:]]}")
            else:
                if len(parts) > 1:  # buffers users may write to, as arrays made here allow
                    parts = [parts[0], *(memoryview(bytearray(p)) for p in parts[1:])]
                self._fetched(msg.task_id, parts)

    def _resend(self, submit: m.Submit) -> None:
        """Send again a submission the master has not made durable (on the hub thread). With its
        code, or to a master restarted with a lower bound, it may now be larger than the master
        reads: sent, it would cut this client off again at every reconnection. Its future fails."""
        body = m.encode(submit)
        if not self._max_message or len(body) <= self._max_message:
            self._hub.send_now(MASTER, [body])
            return
        self._unaccepted.pop(submit.task_id, None)
        error = MessageTooLarge("Submit (sent again, with its code)", len(body), self._max_message)
        log.error("resend_too_large", task_id=submit.task_id, size=len(body),
                  limit=self._max_message)
        if (fut := self._futures.get(submit.task_id)) is not None:
            fut._finish(_ERRED, None, error)

    def _fetched(self, task_id: str, parts: list[bytes | memoryview]) -> None:
        self._ended(task_id)
        if (fut := self._futures.get(task_id)) is not None:
            if len(parts) == 1 and isinstance(parts[0], bytes | memoryview):
                # (a memoryview: the frame as it came, uncopied, see transport/hub.py; a
                # result() loads it afresh each time, as one that came inline)
                fut._finish(_DONE, m.TaskDone(task_id, parts[0]))  # type: ignore[arg-type]
            else:
                fut._finish(_DONE, _Parts(task_id, parts))
            fut._show_output(waiting=False)

    def _fetch_failed(self, task_id: str, held: m.ResultAt, reason: str) -> None:
        self._fetching.pop(task_id, None)
        self._ended(task_id)
        log.error("result_lost", task_id=task_id, node_id=held.node_id, reason=reason)
        if (fut := self._futures.get(task_id)) is not None:
            fut._finish(_ERRED, None, ResultLost(task_id, held.node_id, reason))
            fut._show_output(waiting=False)

    def _task_ended(self, msg: m.TaskDone | m.TaskErred | m.TaskCancelled) -> None:
        match msg:
            case m.TaskDone(held=held) if held is not None:
                if msg.task_id not in self._fetching:  # (a replay while fetching: asked already)
                    self._fetch(msg, held)
            case m.TaskDone(task_id=task_id) | m.TaskErred(task_id=task_id):
                self._ended(task_id)
                if (fut := self._futures.get(task_id)) is not None:
                    fut._finish(_DONE if isinstance(msg, m.TaskDone) else _ERRED, msg)
                    fut._show_output(waiting=False)
            case m.TaskCancelled(task_id=task_id):
                self._ended(task_id)
                if (fut := self._futures.get(task_id)) is not None:
                    fut._finish(_CANCELLED, None)
                    fut._show_output(waiting=False)

    def _on_frames(self, socket: str, frames: list[bytes]) -> None:
        if socket.startswith(RESULTS_PREFIX):
            self._result_arrived(frames)
            return
        msg = m.decode(frames[-1])
        match msg:
            case m.ItemsDone(task_id=task_id, items=items):
                if (batch := self._batches.get(task_id)) is not None:
                    batch.deliver(items)
            case m.TaskProgress(task_id=task_id):
                if (fut := self._futures.get(task_id)) is not None and not fut.done():
                    total = msg.total if msg.sliced_all or msg.total > 0 else None
                    fut._counts_units = fut._kind == "parallel"
                    fut._reported = True
                    fut._progress = (msg.done, total)
            case m.TaskState(task_ids=task_ids, state=state) if state in (_QUEUED, _RUNNING):
                for task_id in task_ids:
                    if (fut := self._futures.get(task_id)) is not None:
                        with fut._lock:
                            if not fut.done():
                                fut._status = state
            case m.TaskOutput(task_id=task_id):
                if (fut := self._futures.get(task_id)) is not None:
                    fut._add_output(msg)
                    fut._show_output(waiting=False)
            case m.TaskDone() | m.TaskErred() | m.TaskCancelled():
                self._task_ended(msg)
            case m.TasksEnded(ends=ends):
                for end in ends:
                    self._task_ended(end)
            case (m.StoryReply() | m.ClusterInfo() | m.PackagesReply() | m.TasksReply()
                  | m.CancelReply() | m.LogsReply()):
                key = (msg.task_id if isinstance(msg, m.StoryReply)
                       else f"cancel {msg.task_id}" if isinstance(msg, m.CancelReply)
                       else f"logs {msg.task_id}" if isinstance(msg, m.LogsReply)
                       else "info" if isinstance(msg, m.ClusterInfo)
                       else "tasks" if isinstance(msg, m.TasksReply) else "packages")
                self._answer(key, msg)
            case m.ScatterAt(task_id=task_id, reason=reason) if reason:
                self._answer(f"scatter {task_id}", m.ScatterDone(task_id, reason))
            case m.ScatterAt(task_id=task_id):
                self._put(msg)
            case m.ScatterDone(task_id=task_id):
                self._answer(f"scatter {task_id}", msg)
            case m.Accepted(task_ids=task_ids):
                for task_id in task_ids:
                    self._unaccepted.pop(task_id, None)
            case m.Welcome(master_id=master_id, epoch=epoch) if epoch < self._epoch:
                # A master that was paused while a newer one took its state over: not ours.
                log.warning("stale_master_ignored", master_id=master_id, epoch=epoch,
                            newest_epoch=self._epoch)
            case m.Welcome(master_id=master_id, epoch=epoch):
                self._max_message = msg.max_message  # (before the resends below: they check it)
                if self._master_id and master_id != self._master_id:
                    with self._send_lock:  # a new master has none of the code shipped
                        self._shipped.clear()
                    self._master_lost(f"the master restarted without its state "
                                      f"({self._master_id} -> {master_id})")
                elif self._master_id:
                    # The same master (restarted on its state directory, or reached again): what
                    # it had not made durable goes again, with its code; it has the rest. Code
                    # goes with the next submits too: it may have dropped ours meanwhile (it
                    # takes a client silent past its timeout as gone).
                    with self._send_lock:
                        self._shipped.clear()
                    if epoch != self._epoch:
                        log.info("master_restarted", epoch=epoch, resent=len(self._unaccepted))
                    for submit, code in list(self._unaccepted.values()):
                        if code and not submit.code:  # a new master may not have it
                            submit = msgspec.structs.replace(submit, code=code)
                        self._resend(submit)
                    self._say_holding()
                self._master_id, self._epoch = master_id, epoch
                self._unwelcomed_since = None
                # (after the submits above: a request may name one of them)
                for asked in list(self._asking.values()):
                    if isinstance(asked, m.Scatter):
                        asked = msgspec.structs.replace(asked, again=True)
                    self._hub.send_now(MASTER, [m.encode(asked)])
                self._welcome.set()
            case m.Refused(reason=reason) if (self._welcome.is_set() and "send Hello" in reason
                                              and time.monotonic() - self._hello_at > 5.0):
                # (Within a few seconds of a Hello, it answers what was queued before it.)
                # The master took this client as gone (silent past its client timeout, a cut-off
                # network) and stopped its tasks: say so on the futures, and introduce us again.
                self._master_lost("the master no longer knows this client (it was silent "
                                  "longer than the master's --client-timeout): its tasks stopped")
                self._say_hello()
            case m.Refused(reason=reason):
                self._refusal = reason
                log.warning("master_refused", reason=reason)
            case _:
                log.warning("unexpected_message", type=type(msg).__name__)
