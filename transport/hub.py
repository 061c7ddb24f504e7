"""One thread per process owns every ZeroMQ socket of that process.

ZeroMQ sockets are not thread-safe, so actors never touch a network socket.
Each actor creates an ``Outbox`` in its own thread and hands it ``(socket
name, frames)``: the message joins the hub's queue of outgoing messages and,
unless a wake-up is already on its way, a write to the hub's eventfd wakes
the hub thread, which polls it together with the network
sockets, sends what is queued, and passes every received frame list to
``on_frames`` (which decodes and ``tell``s an actor). One wake-up per burst,
not one ZeroMQ message per message: a client submitting in a loop, or a
master answering a burst of results, hands over hundreds per wake-up (each
ZeroMQ send released the GIL to a busy hub thread).
The same thread drives ``on_tick`` at a fixed interval, so time-based work
(heartbeats, timeouts) enters the actors as ordinary messages, and runs what a handler asked
for at a moment sooner than the next tick (``call_at``).

Hosted work. An actor may run on the hub thread itself (``host``): its turn comes after what
each turn of the loop received, and what it sends leaves at the end of that turn, batched with
the rest, with no thread between the socket and the actor. Another thread that gives such an
actor work wakes the hub with ``poke`` (an eventfd the loop polls). A round trip
through a master whose actor ran on its own thread took four hand-offs between threads there,
each a wake-up and a turn of the GIL; hosted, none.

Connections. A monitored dealer's connection events reach ``on_event``; a
keyed router tells ``on_peer_gone`` when the connection of a peer closed (a
killed process, a reset, or the ZMTP heartbeat's timeout on a silent link),
so that the owner need not wait for its own timeout to notice. ZeroMQ names
a closed connection only by its file descriptor: the hub remembers which
descriptor each peer's messages last came through (``SRCFD``).

Batching: what one turn of the loop has to send to the same peer over the
same socket leaves as one frame (``BATCH`` + the messages), and a batch
received is handed to ``on_frames`` message by message, as if each had come
alone. Under load a turn holds many messages (a master answering a burst of
results, a client submitting in a loop), and a ZeroMQ message costs a fixed
amount per frame and a wake-up of every thread on its way, whatever its size;
a lone message goes out as it is, so nothing waits for a batch to fill. Nor
for a long turn to end: what waited ``_HOLD_S`` leaves with the next message
deferred, or when a hosted actor between two messages of a batch says so
(``flush_held``: a master taking in a burst of 20,000 submissions in one turn
held the first tasks' assignments for the 200 ms of it, its workers idle).
And the first message of a quiet turn (one message in at most, after a turn
that took in one at most: a lone round trip's hop) leaves as it is made,
ahead of what its handler does next, not at the turn's end (5-10 us a hop,
six hops a round trip).

Bulk data. On a socket opened with ``views`` (the ones results travel through: a worker's link
to its node, the node's data plane and result store, a client fetching a result) a frame of
``_VIEW_BYTES`` or more is neither copied on its way out (ZeroMQ reads the bytes object
itself) nor on its way in: the handler gets a read-only ``memoryview`` of ZeroMQ's own buffer
instead of ``bytes``. A 1 MB result crossing worker -> node -> worker was copied four more times
in Python on its way, which halved the rate of a gather. Their handlers take ``bytes |
memoryview`` for any frame that may be large; other sockets get ``bytes`` only, and send without
a copy only from ``_ZERO_COPY_BYTES``: pyzmq's first zero-copy send starts a thread of its own
(its garbage collector, with a ZeroMQ context), and a client's process that runs another thread
can no longer fork a ``LocalCluster`` (actors/forking.py), whose start then takes 5x as long.

Links. Besides ZeroMQ sockets the hub polls links (links.py: messages over one end of a
socket pair): ``add_links`` makes a router of them (a node's workers, each attached with its id
by ``attach_link`` and closed by ``detach_link`` once its last words are read), ``add_link`` a
dealer over one (a worker's, to its node). Messages on them are routed, deferred and batched as
on a ROUTER or DEALER.

Loopback. Two parts of one process may speak as peers over the same hub: ``add_loopback``
makes a dealer whose peer is one of the hub's own keyed routers (a master's local node running
in the master's process). What either sends is batched as a socket's messages are and handed
to ``on_frames`` in the hub's next turn, framed as that socket would have received it (the
dealer's key and identity in front, on the router's side): the handlers cannot tell, and no
socket, I/O thread or system call lies between them. The peer behind a loopback runs on this
thread too, so it hears nothing while a hosted actor's turn lasts: once a message for it (or
one deferred, which may be for it) has waited ``_HOLD_S`` (``overdue``), the turn ends at its
actor's next message and the loop hands it on, or ``flush_held`` does within one message that
holds many; what that sends leaves at once (a master taking in a map's 2,000 submissions in one
turn of ~20 ms held its first assignments for all of it, its local node's workers idle). The
loopback's identity is free on the router's socket (no connection holds it): a connection that
names itself so is not heard.

Keys. On a CURVE server socket opened ``with_keys`` (the master's) every frame list
handed to ``on_frames`` starts with the sender's public key, as the handshake proved it
(Z85 text), so the receiver can hold each message to the role of its key; no
connection can take over another's routing identity there: one naming an id that another
still holds is parked for good, and its peer must connect afresh (``reconnect_now``).
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import itertools
import math
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sized

import msgspec
import structlog
import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from transport.keys import AllowList
from transport.links import Link
from transport.poller import Poller

log = structlog.get_logger("transport.hub")

FramesHandler = Callable[[str, list[bytes]], None]
BatchHandler = Callable[[str, list[list[bytes]]], None]  # (socket, the messages of one batch)
EventHandler = Callable[[str, str], None]
PeerGoneHandler = Callable[[str, bytes], None]  # (socket, routing id)
TickHandler = Callable[[float], None]
#: Work hosted on the hub thread (``Hub.host``): True, it has more to do now; False, it waits to
#: be poked; None, it is done and leaves the loop.
HostedTurn = Callable[[], "bool | None"]

_STOP = b""
_hub_ids = itertools.count()
#: First byte of a frame that carries several messages; 0xc1 never starts a msgpack value.
BATCH = b"\xc1"
_BATCH_ITEMS = 1_000
_BATCH_BYTES = 1 << 20
_LONE_BYTES = 64 << 10  # a message this big goes alone: batching would only copy it
_batch_encoder = msgspec.msgpack.Encoder()
_batch_decoder = msgspec.msgpack.Decoder(list[tuple[list[bytes], bytes]])
_RECONNECT = b"\0reconnect "  # an outgoing item naming no socket: connect this dealer afresh
_ATTACH = b"\0attach "  # ... nor this: take a link (+ its socket name; frames: its id, its fd)
_DETACH = b"\0detach "  # ... nor this: read what a link holds, then close it (frames: its id)
_POKE = (1).to_bytes(8, sys.byteorder)  # an eventfd adds it to its count (a pipe: 8 bytes)
#: On a ``views`` socket a frame this large is neither copied on send nor on receive: below it
#: a copy is cheaper than tracking the buffer's release (pyzmq copies below 64 KiB anyway).
_VIEW_BYTES = 64 << 10
_NO_VIEWS = sys.maxsize
#: On other sockets, the least a frame is sent without a copy from (see "Bulk data").
_ZERO_COPY_BYTES = 1 << 20
# ZeroMQ's flags as plain ints: pyzmq's are enum.IntFlag, and an operation on one (a flag
# or'ed, EVENTS and'ed with POLLIN) makes a new enum member, ~1 us each, several per message.
_NOBLOCK, _SNDMORE = int(zmq.NOBLOCK), int(zmq.SNDMORE)
_POLLIN, _EVENTS = int(zmq.POLLIN), int(zmq.EVENTS)
_POLLOUT, _POLLINOUT = int(zmq.POLLOUT), int(zmq.POLLIN | zmq.POLLOUT)
_SENDABLE = frozenset({bytes, memoryview, zmq.Frame})  # what the hub's own parts are
# pyzmq's own send, under the Python-level one its Socket wraps it in (for options the hub
# never passes: routing_id, group): a Python call less a part sent.
_send_part: Callable[[zmq.Socket[bytes], bytes | memoryview | zmq.Frame, int, bool], object] = (
    zmq.backend.Socket.send)  # type: ignore[assignment]
_ADMIT_DOMAIN = "admit:"  # + the socket's name: the ZAP domain of a socket with its own rule
HEARTBEAT_MS = 1_000  # a CURVE server pings each peer this often; 3 missed: the peer is gone
# (a monitored dealer pings its server alike, so a node notices a cut link as its master does)
_TURN_ITEMS = 10_000  # outgoing messages taken per turn, so receiving is never starved
_HOLD_S = 0.001  # the longest a deferred message waits for its turn's end (see "Batching")
# Messages read from one socket in one turn (a batch's each count): a burst on one socket (a
# client's 20,000 submissions) is taken a few batches a turn, and what other sockets bring
# meanwhile (the workers' results) is handled between them, not behind the whole burst.
_READ_ITEMS = 2_000
_SAFETY_MS = 1_000  # the longest wait without a tick: Poller.check_all's turn (poller.py)
# (route frames after the peer's, last frame) of the messages waiting for the end of a turn
_Pending = list[tuple[list[bytes], bytes]]
# Events a dealer's owner is told about, by zmq event number.
_WATCHED_EVENTS: dict[int, str] = {
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "connected",
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_failed",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
    zmq.EVENT_DISCONNECTED: "disconnected",
    zmq.EVENT_CONNECT_RETRIED: "connect_retried",  # an attempt refused: tried again later
}


class ServerCurve(msgspec.Struct, frozen=True):
    """CURVE for a bound socket: our key pair and the folder of public keys we admit, or (with
    ``admit``) the keys its owner's rule admits: ``admit(key)``, the key in Z85, is asked on
    the authenticator's thread at each handshake, so it must only read what the owner keeps
    (a refused peer sends nothing: ZeroMQ does not reconnect it). Either way the socket's
    owner may still decide per message what that key may have (``with_keys`` hands it over)."""

    public: bytes
    secret: bytes
    allowed_dir: str
    admit: Callable[[bytes], bool] | None = None


class ClientCurve(msgspec.Struct, frozen=True):
    public: bytes
    secret: bytes
    server_key: bytes


class _SocketSpec(msgspec.Struct, frozen=True):
    name: str
    kind: int
    address: str
    bind: bool
    identity: bytes | None
    server_curve: ServerCurve | None
    client_curve: ClientCurve | None
    monitor: bool
    with_keys: bool = False  # a CURVE server that hands each sender's key over (see "Keys")
    views: bool = False  # large frames received as memoryviews, uncopied (see "Bulk data")
    max_message: int = -1  # a larger frame closes its sender's connection, unread (-1: none)
    also_bind: str = ""  # a second endpoint of the same socket (the master's ipc:// for this host)
    handover: bool = True  # a keyless router gives a routing id to the newest connection naming it


class Outbox:
    """An actor's way to send: one per thread, created in the thread that uses it (the hub
    thread's own is a ``_LoopOutbox``)."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub

    def send(self, socket_name: str, frames: list[bytes]) -> None:
        hub = self._hub
        hub._outgoing.append((socket_name.encode(), frames))  # deque.append: thread-safe
        # The hub clears the flag before it takes from the queue, so a message appended after
        # its last take always finds the flag clear and wakes it (two wake-ups are harmless).
        if not hub._wake_pending:
            hub._wake_pending = True
            hub._wake()

    def send_all(self, socket_name: str, bodies: list[bytes]) -> None:
        """One-part messages, in order, as ``send`` each but one hand-off: a client's large
        ``map`` holds its send lock for this, not for a queue operation per message."""
        hub, name = self._hub, socket_name.encode()
        hub._outgoing.extend([(name, [body]) for body in bodies])  # (from a list: in one go)
        if not hub._wake_pending:
            hub._wake_pending = True
            hub._wake()

    def reconnect(self, socket_name: str) -> None:
        """``Hub.reconnect_now``, in order with what this outbox sent before and sends after."""
        self._hub._hand_over(_RECONNECT + socket_name.encode(), [])

    def close(self) -> None:
        pass  # (nothing of its own: kept for the threads that close what they made)


class _LoopOutbox(Outbox):
    """The outbox of code on the hub thread (a hosted actor): it queues for the end of the turn,
    no socket and no wake-up."""

    def __init__(self, hub: Hub) -> None:
        self._hub = hub  # (and no wake-up: the hub thread is the one sending)

    def send(self, socket_name: str, frames: list[bytes]) -> None:
        self._hub._defer_checked(socket_name.encode(), frames)

    def send_all(self, socket_name: str, bodies: list[bytes]) -> None:
        for body in bodies:
            self.send(socket_name, [body])

    def reconnect(self, socket_name: str) -> None:
        self._hub.reconnect_now(socket_name)

    def close(self) -> None:
        pass


def _batch_io_threads(context: zmq.Context[zmq.Socket[bytes]]) -> None:
    """ZeroMQ's own threads (its I/O thread, which writes what a socket sends and reads what
    comes) under ``SCHED_BATCH``, before the first socket starts them. Why: Linux lets a thread
    it wakes preempt the one running on that core, and each message a hub sends wakes the I/O
    thread: the sender then waited for the I/O thread's whole turn inside ``send`` (26-113 us
    a message in a lone round trip, against 4-13 us since) while the other core idled. A batch
    thread does not preempt on waking: it runs on an idle core, or when the sender waits.
    (bench/README.md, "ZeroMQ's threads without wake-up preemption".) Only where a thread of
    this process may switch (``_may_batch``): libzmq ends the process when its thread cannot."""
    policy = getattr(os, "SCHED_BATCH", None)
    if policy is None or not _may_batch(policy):
        return
    with contextlib.suppress(zmq.ZMQError):  # (a libzmq older than the option)
        context.set(zmq.THREAD_SCHED_POLICY, policy)


def _may_batch(policy: int) -> bool:
    """Whether a thread started now may switch to ``policy``, tried in a thread of its own.
    libzmq applies the option in each thread it starts and aborts the process if the kernel
    refuses (a process under ``SCHED_IDLE`` without privileges, a sandbox that forbids the
    call). Only from the default policy: threads of a process run under another (idle,
    real-time) inherit it, and keep it."""
    if os.sched_getscheduler(0) != os.SCHED_OTHER:
        return False
    switched: list[bool] = []

    def attempt() -> None:
        try:
            os.sched_setscheduler(0, policy, os.sched_param(0))  # (0: this thread, on Linux)
            switched.append(True)
        except OSError:
            pass

    probe = threading.Thread(target=attempt, name="sched-probe", daemon=True)
    probe.start()
    probe.join()
    return bool(switched)


class Hub:
    """Owns the sockets of a process; see the module docstring."""

    def __init__(
        self,
        on_frames: FramesHandler,
        *,
        on_event: EventHandler | None = None,
        on_peer_gone: PeerGoneHandler | None = None,
        on_tick: TickHandler | None = None,
        tick_s: float = 0.25,
        on_batch: BatchHandler | None = None,
    ) -> None:
        """``on_batch``: given, the messages of a batched frame go to it together (one hand-off
        to an actor for the lot), not one by one to ``on_frames``."""
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        _batch_io_threads(self.context)
        self._inproc = f"inproc://hub-{os.getpid()}-{next(_hub_ids)}"
        self._on_frames = on_frames
        self._on_batch = on_batch
        self._on_event = on_event
        self._on_peer_gone = on_peer_gone
        self._malformed = 0  # batched frames that were not a batch
        # keyed router -> file descriptor -> the routing id whose messages last came through it
        self._peer_fds: dict[str, dict[int, bytes]] = {}
        self._on_tick = on_tick
        self._tick_s = tick_s
        self._specs: list[_SocketSpec] = []
        self._addresses: dict[str, str] = {}
        self._also_bound: dict[str, str] = {}  # a socket's second endpoint, once bound
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._ident: int | None = None  # the thread's, set by it: asked per message (a C call)
        self._auth: ThreadAuthenticator | None = None
        self._control: zmq.Socket[bytes] | None = None  # tells the hub thread to stop
        self._control_lock = threading.Lock()
        self._sockets: dict[bytes, zmq.Socket[bytes]] = {}
        # Links (links.py) by socket name, then by the id their messages are routed by (b"":
        # a dealer's one link), and by descriptor, for the poll.
        self._links: dict[bytes, dict[bytes, Link]] = {}
        self._link_fds: dict[int, tuple[bytes, Link]] = {}
        self._link_views: set[bytes] = set()
        self._poller: Poller | None = None  # the hub thread's, once running
        # (when, seq, fn) for call_at, earliest first; hub thread only
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = itertools.count()
        self._names: dict[zmq.Socket[bytes], str] = {}
        self._routers: set[bytes] = set()
        self._keyed: set[bytes] = set()  # CURVE servers: the sender's key heads each frame list
        self._views: set[bytes] = set()  # sockets whose large frames are received uncopied
        # (socket, peer) -> messages to send at the end of this turn of the loop, in order
        self._pending: dict[tuple[bytes, bytes], _Pending] = {}
        self._pending_bytes: dict[tuple[bytes, bytes], int] = {}
        self._pending_since = 0.0  # when the oldest of them was deferred (time.monotonic)
        # Messages this turn took in (received, or handed over by other threads) and gave out,
        # and whether the last turn was quiet (took in one at most): the first message of a
        # quiet turn after a quiet one leaves at once (see "Batching").
        self._turn_in = self._turn_out = 0
        self._quiet = True
        # What actors handed over, in order (see Outbox.send), and whether a wake-up is due.
        self._outgoing: deque[tuple[bytes, list[bytes]]] = deque()
        # Loopbacks (add_loopback): a dealer's name -> its router, its identity there, its key;
        # (router, identity) -> the dealer's name; what they carry, handed on next turn.
        self._loop_dealers: dict[bytes, tuple[bytes, bytes, bytes]] = {}
        self._loop_routes: dict[tuple[bytes, bytes], bytes] = {}
        self._looped: deque[tuple[str, list[bytes]]] = deque()
        # (read-only, for a hosted inbox: whether anything waits for the turn's end)
        self.looped: Sized = self._looped
        self.deferred: Sized = self._pending
        self._looped_since = 0.0  # when the oldest of them was queued (time.monotonic)
        self._impostors = 0  # messages refused for naming a loopback's identity on its router
        self._wake_pending = False
        # Work run on the hub thread at every turn (see "Hosted work"), and its wake-up.
        self._hosted: list[HostedTurn] = []
        self._poke_r = self._poke_w = -1
        # Held around each write and the close: a thread that read the descriptor just before
        # the hub closed it would otherwise write into whatever file took its number since.
        self._poke_lock = threading.Lock()
        self._poked = False  # a poke's byte is on its way
        self._again = False  # work was given on the hub thread after its turn ran: no waiting

    # --- configuration (before start) ---------------------------------------

    def add_router(self, name: str, address: str, *, curve: ServerCurve | None = None,
                   with_keys: bool = False, views: bool = False, max_message: int = -1,
                   also_bind: str = "", handover: bool = True) -> None:
        """A bound ROUTER socket (the master's TCP endpoint, the node's ipc endpoint). With
        ``with_keys`` (a CURVE server only) each frame list starts with the sender's key, and no
        connection may take over another's routing identity. ``views``: see "Bulk data".
        ``max_message`` (bytes, -1: none): ZeroMQ closes the connection of a peer whose frame is
        larger as soon as its header says so, before reading or allocating it. ``also_bind``: a
        second endpoint, with the same keys and bounds (``address()`` still names the first).
        ``handover`` False (a router without keys): a connection naming an id that a connected
        peer holds is parked by ZeroMQ, never given the id (libzmq then reads that connection's
        next frame as the id it names)."""
        if with_keys and curve is None:
            raise ValueError("with_keys needs CURVE: without it no key is proved")
        self._specs.append(_SocketSpec(name, zmq.ROUTER, address, True, None, curve, None, False,
                                       with_keys, views, max_message, also_bind, handover))

    def add_dealer(
        self,
        name: str,
        address: str,
        *,
        identity: bytes,
        curve: ClientCurve | None = None,
        monitor: bool = False,
        views: bool = False,
    ) -> None:
        """A connecting DEALER; with ``monitor``, connection events reach ``on_event``;
        ``views``: see "Bulk data"."""
        self._specs.append(
            _SocketSpec(name, zmq.DEALER, address, False, identity, None, curve, monitor,
                        views=views)
        )

    def add_loopback(self, name: str, router: str, identity: bytes, key: bytes) -> None:
        """Before ``start``: a dealer ``name`` whose peer is this hub's own keyed router
        ``router`` (a master's local node, in the master's process). What is sent on ``name``
        reaches ``on_frames`` as the router would hand on a message of ``identity`` whose
        connection proved ``key``; what the router sends to ``identity`` reaches ``on_frames`` as
        received on ``name``. Batched as a socket's messages are, handed on in the hub's next
        turn: no socket, no system call. (Loopback, see the module docstring.)"""
        if self._thread is not None:
            raise RuntimeError("Hub.add_loopback() is for before start()")
        self._loop_dealers[name.encode()] = (router.encode(), identity, key)
        self._loop_routes[(router.encode(), identity)] = name.encode()

    def add_links(self, name: str, *, views: bool = False) -> None:
        """A router whose peers are links (links.py), each taken with ``attach_link`` and the id
        its messages are routed by: a frame list received starts with it, and a message sent
        names it first, as on a ROUTER. ``views``: see "Bulk data"."""
        self._links[name.encode()] = {}
        self._routers.add(name.encode())
        if views:
            self._link_views.add(name.encode())

    def add_link(self, name: str, sock: socket.socket, *, views: bool = False) -> None:
        """Before ``start``: a dealer over one end of a link (a worker's to its node); the hub
        owns ``sock`` from now on."""
        if self._thread is not None:
            raise RuntimeError("Hub.add_link() is for before start()")
        self._links[name.encode()] = {}
        if views:
            self._link_views.add(name.encode())
        self._attach(name.encode(), b"", sock.detach())

    def attach_link(self, name: str, identity: bytes, sock: socket.socket) -> None:
        """From any thread: one more peer of the links ``name`` (``add_links``), reached and
        known by ``identity``; the hub owns ``sock`` from now on. Messages sent to it after this
        call reach it."""
        fd = sock.detach()
        if self._thread is None:
            self._attach(name.encode(), identity, fd)
            return
        self._hand_over(_ATTACH + name.encode(), [identity, fd.to_bytes(4, "little")])

    def detach_link(self, name: str, identity: bytes) -> None:
        """From any thread: what the link's peer sent is read and handed on, then the link is
        closed (a worker that exited: its last words first)."""
        self._hand_over(_DETACH + name.encode(), [identity])

    def _hand_over(self, name: bytes, frames: list[bytes]) -> None:
        """Queue an item for the hub thread, in order with what other threads queued, and wake
        it (as ``Outbox.send``, which keeps these lines inline: it runs for every message)."""
        self._outgoing.append((name, frames))
        if not self._wake_pending:
            self._wake_pending = True
            self._wake()

    def send_now(self, socket_name: str, frames: list[bytes]) -> bool:
        """Send from a handler running on the hub thread itself (a relay): no extra hop.

        It leaves at once, ahead of what this turn has queued for the same peer (``relay``).
        False when the message was dropped (an unroutable peer, a full queue)."""
        assert threading.current_thread() is self._thread, "send_now() is for hub handlers only"
        return self._send(socket_name.encode(), self._sockets.get(socket_name.encode()), frames)

    def send_in_order(self, socket_name: str, frames: list[bytes]) -> None:
        """From a hub handler: send after everything other threads queued before this call.

        ``send_now`` and ``relay`` go ahead of what user threads queued and the hub has not
        taken yet; a message that must not overtake them goes here (a client's ``Release`` of a
        future, after the ``Submit`` of the task that takes it as an input)."""
        assert threading.current_thread() is self._thread, "send_in_order() is for hub handlers"
        self._outgoing.append((socket_name.encode(), frames))  # taken next turn, in order

    def relay(self, socket_name: str, frames: list[bytes]) -> None:
        """From a hub handler: send at the end of this turn, batched with the turn's others to the
        same peer. For a relay that need not know whether the peer was there (``send_now`` does)."""
        assert threading.get_ident() == self._ident, "relay() is for hub handlers only"
        self._defer(socket_name.encode(), frames)

    def lone(self) -> bool:
        """From a hub handler: whether the message in hand is a lone one, the first of a turn
        after a quiet one (see "Batching"): a lone round trip's, not a burst's."""
        return self._quiet and self._turn_in <= 1

    def overdue(self) -> bool:
        """From a hosted actor's turn: whether what it gave out has waited ``_HOLD_S`` for the
        turn's end: a message for a loopback (its peer, on this thread, hears it only between
        turns), or one deferred (which may be for a loopback: it leaves at the turn's end, or
        at the next one deferred after ``_HOLD_S``)."""
        now = time.monotonic()
        return ((bool(self._looped) and now - self._looped_since >= _HOLD_S)
                or (bool(self._pending) and now - self._pending_since >= _HOLD_S))

    def has_socket(self, name: str) -> bool:
        return name.encode() in self._sockets or name.encode() in self._links

    def open_dealer_now(self, name: str, address: str, *, identity: bytes,
                        curve: ClientCurve | None = None, views: bool = False) -> None:
        """From a hub handler: connect one more DEALER while running (a node reaching a peer)."""
        assert threading.current_thread() is self._thread, "open_dealer_now() is for hub handlers"
        assert self._poller is not None
        if self.has_socket(name):
            return
        sock = self._open(_SocketSpec(name, zmq.DEALER, address, False, identity, None, curve, False,
                                      views=views))
        self._sockets[name.encode()] = sock
        self._names[sock] = name
        self._poller.register(sock, zmq.POLLIN)

    def close_now(self, name: str) -> None:
        """From a hub handler: close a socket opened with ``open_dealer_now``; what it still
        queues is dropped."""
        assert threading.current_thread() is self._thread, "close_now() is for hub handlers"
        assert self._poller is not None
        sock = self._sockets.pop(name.encode(), None)
        if sock is None:
            return
        self._poller.unregister(sock)
        del self._names[sock]
        self._addresses.pop(name, None)
        self._views.discard(name.encode())
        for key in [key for key in self._pending if key[0] == name.encode()]:
            del self._pending[key]
            self._pending_bytes.pop(key, None)
        sock.close(linger=0)

    def address(self, name: str) -> str:
        """The endpoint a bound socket really got (the port, when asked for port 0)."""
        return self._addresses[name]

    def also_bound(self, name: str) -> str:
        """A bound socket's second endpoint (``add_router(also_bind=)``), "" when it could not
        be bound (the socket serves on its first)."""
        return self._also_bound.get(name, "")

    # --- lifecycle ----------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        if any(spec.server_curve for spec in self._specs):
            self._auth = ThreadAuthenticator(self.context, log=_quiet_logger())
            self._auth.start()
            allowed = next((s.server_curve for s in self._specs
                            if s.server_curve and s.server_curve.admit is None), None)
            if allowed is not None:
                # Asked at every handshake: a key file added or removed counts at once.
                self._auth.configure_curve_callback(
                    domain="*", credentials_provider=AllowList(allowed.allowed_dir))
            for spec in self._specs:
                if spec.server_curve is not None and spec.server_curve.admit is not None:
                    self._auth.configure_curve_callback(
                        domain=_ADMIT_DOMAIN + spec.name,
                        credentials_provider=_Admit(spec.server_curve.admit))
        self._thread = threading.Thread(target=self._run, name="transport-hub", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("transport hub did not start")
        if self._start_error is not None:
            # Every socket is closed by now: end the context too, or the next garbage
            # collection would wait on it forever (Context.term in __del__).
            self._thread.join(timeout)
            self._stop_auth()
            self.context.term()
            raise self._start_error

    def outbox(self) -> Outbox:
        """A way to send for the calling thread: on the hub thread, one that needs no wake-up."""
        if threading.current_thread() is self._thread:
            return _LoopOutbox(self)
        return Outbox(self)

    def host(self, turn: HostedTurn) -> None:
        """Run ``turn`` on the hub thread at every turn of its loop, after what the turn received
        and before what it sends leaves, until it returns None (see "Hosted work"). From any
        thread, once the hub has started; stop what is hosted before the hub."""
        if self._poke_w < 0:
            raise RuntimeError("Hub.host() before Hub.start() (or after stop)")
        self._hosted.append(turn)  # list.append: thread-safe; the loop reads it each turn
        self.poke()

    def call_at(self, when: float, fn: Callable[[], None]) -> None:
        """From a hub handler or hosted turn: call ``fn`` on the hub thread once
        ``time.monotonic()`` reaches ``when`` (a millisecond late at most, between turns: not
        within one), for a wait shorter than a tick (a worker's gathered results held for the
        next ones; see worker.py). Nothing cancels it: ``fn`` checks whether it is still due."""
        assert threading.get_ident() == self._ident, "call_at() is for hub handlers only"
        heapq.heappush(self._timers, (when, next(self._timer_seq), fn))

    def reconnect_now(self, name: str) -> None:
        """From a hub handler: drop a DEALER's connection and connect it again, a new
        connection; what it still queues is dropped, what is sent after goes on the new one
        (other threads: ``Outbox.reconnect``). For a peer whose connection a keyed router parked:
        one made while the router still held the old one under the same id (a master that
        woke from a pause) is never given the id, and nothing sent on it is heard."""
        assert threading.current_thread() is self._thread, "reconnect_now() is for hub handlers"
        sock, address = self._sockets.get(name.encode()), self._addresses.get(name, "")
        if sock is None or sock.type != zmq.DEALER or not address:
            log.error("reconnect_refused", socket=name, why="not a connected dealer")
            return
        for key in [key for key in self._pending if key[0] == name.encode()]:
            del self._pending[key]
            self._pending_bytes.pop(key, None)
        try:
            sock.disconnect(address)
        except zmq.ZMQError as exc:  # (not connected there: connecting is what is asked)
            log.warning("reconnect_without_disconnect", socket=name, error=exc.strerror)
        sock.connect(address)
        if self._poller is not None:
            self._poller.touched(sock)

    def poke(self) -> None:
        """Make the hub thread run its hosted turns soon: from any thread, at any rate (one
        write is on its way at a time; on the hub thread itself, none: just no waiting)."""
        if threading.get_ident() == self._ident:
            self._again = True
        elif not self._poked:
            self._poked = True
            self._wake()

    def _wake(self) -> None:
        """Wake the hub thread for what other threads queued (``Outbox``) or gave a hosted actor
        (``poke``): its eventfd,
        a write and a read, where a ZeroMQ message through an inproc socket took a send, a
        receive and a round through each socket's mailbox (a lone submit left the client ~16 us
        later, bench/README.md)."""
        with self._poke_lock:
            try:  # noqa: SIM105 - a context manager per wake-up costs more than the write
                os.write(self._poke_w, _POKE)
            except OSError:  # not started (the first poll finds the queue), stopped, or woken
                pass

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            with self._control_lock:
                if self._control is None:
                    self._control = self.context.socket(zmq.PUSH)
                    self._control.setsockopt(zmq.LINGER, 0)
                    self._control.connect(self._inproc)
                self._control.send(_STOP)
            self._thread.join(timeout)
        if self._control is not None:
            self._control.close(linger=0)
        self._stop_auth()
        if not self.context.closed:
            self.context.term()

    def _stop_auth(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    # --- the I/O thread -----------------------------------------------------

    def _run(self) -> None:
        self._ident = threading.get_ident()  # (before anything of the thread's can ask it)
        pull = self.context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, 0)
        sockets = self._sockets
        monitors: dict[zmq.Socket[bytes], str] = {}
        try:
            pull.bind(self._inproc)
            self._poke_r, self._poke_w = _poke_pair()
            for spec in self._specs:
                sock = self._open(spec, connect=False)
                sockets[spec.name.encode()] = sock
                if spec.monitor:
                    monitors[sock.get_monitor_socket()] = spec.name
                elif spec.with_keys and self._on_peer_gone is not None:
                    self._peer_fds[spec.name] = {}
                    monitors[sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)] = spec.name
                if not spec.bind:
                    # only now: a first handshake refused (a key the server does not admit)
                    # before the monitor was there was never told, and is not tried again
                    sock.connect(spec.address)
        except BaseException as exc:  # reported to start(), which raises it
            self._start_error = exc
            for sock in [*monitors, *sockets.values()]:
                sock.close(linger=0)
            pull.close(linger=0)
            self._close_poke()
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop(pull, sockets, monitors)
        finally:
            for monitor in monitors:
                monitor.close(linger=0)
            for sock in sockets.values():
                sock.close()
            for _name, link in self._link_fds.values():
                link.close()
            self._link_fds.clear()
            pull.close(linger=0)
            self._close_poke()

    def _close_poke(self) -> None:
        with self._poke_lock:  # a late poke writes nowhere rather than to a reused descriptor
            fds = {self._poke_r, self._poke_w}
            self._poke_r = self._poke_w = -1
            for fd in fds:
                if fd >= 0:
                    os.close(fd)

    def _open(self, spec: _SocketSpec, *, connect: bool = True) -> zmq.Socket[bytes]:
        sock = self.context.socket(spec.kind)
        try:
            return self._set_up(sock, spec, connect)
        except BaseException:
            sock.close(linger=0)  # a socket left open would hang Context.term() forever
            raise

    def _set_up(self, sock: zmq.Socket[bytes], spec: _SocketSpec,
                connect: bool) -> zmq.Socket[bytes]:
        # A dealer gets a moment to flush a last message (Bye) when closed.
        sock.setsockopt(zmq.LINGER, 0 if spec.bind else 200)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if spec.kind == zmq.ROUTER:
            self._routers.add(spec.name.encode())
            # Unroutable sends raise instead of vanishing.
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            if not spec.with_keys:
                # A reconnecting peer with the same identity takes over its old connection.
                sock.setsockopt(zmq.ROUTER_HANDOVER, int(spec.handover))
            else:
                # Peers prove who they are: no connection may take over another's identity.
                # Heartbeats close a dead peer's connection, so its identity is free again
                # when the peer itself reconnects.
                self._keyed.add(spec.name.encode())
                sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
                sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        elif spec.monitor:
            sock.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_MS)
            sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * HEARTBEAT_MS)
        if spec.views:
            self._views.add(spec.name.encode())
        if spec.max_message >= 0:
            sock.setsockopt(zmq.MAXMSGSIZE, spec.max_message)
        if spec.identity is not None:
            sock.setsockopt(zmq.IDENTITY, spec.identity)
        if spec.address.startswith("tcp://["):
            sock.setsockopt(zmq.IPV6, 1)  # an IPv6 literal, tcp://[::1]:PORT
        if not spec.bind:
            # A peer starting at the same moment (a forked worker's node, a node's master) binds
            # a few ms later: retry soon (ZeroMQ waits 100 ms), backing off to 1 s.
            sock.setsockopt(zmq.RECONNECT_IVL, 10)
            sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if spec.server_curve is not None:
            sock.curve_publickey = spec.server_curve.public
            sock.curve_secretkey = spec.server_curve.secret
            sock.curve_server = True
            if spec.server_curve.admit is not None:
                sock.zap_domain = (_ADMIT_DOMAIN + spec.name).encode()
        if spec.client_curve is not None:
            sock.curve_publickey = spec.client_curve.public
            sock.curve_secretkey = spec.client_curve.secret
            sock.curve_serverkey = spec.client_curve.server_key
        if spec.bind:
            sock.bind(spec.address)
            endpoint = sock.getsockopt(zmq.LAST_ENDPOINT)
            assert isinstance(endpoint, bytes)
            self._addresses[spec.name] = endpoint.decode()
            if spec.also_bind:
                try:
                    sock.bind(spec.also_bind)
                    self._also_bound[spec.name] = spec.also_bind
                except zmq.ZMQError as exc:  # (a folder where no Unix socket can be made)
                    log.warning("second_endpoint_not_bound", socket=spec.name,
                                endpoint=spec.also_bind, error=str(exc))
        else:
            if connect:
                sock.connect(spec.address)
            self._addresses[spec.name] = spec.address
        return sock

    def _loop(
        self,
        pull: zmq.Socket[bytes],
        sockets: dict[bytes, zmq.Socket[bytes]],
        monitors: dict[zmq.Socket[bytes], str],
    ) -> None:
        poller = self._poller = Poller()
        poller.register(pull, zmq.POLLIN)
        names = self._names
        names.update({sock: name.decode() for name, sock in sockets.items()})
        for sock in sockets.values():
            poller.register(sock, zmq.POLLIN)
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        poke = self._poke_r
        poller.register(poke, zmq.POLLIN)
        link_fds = self._link_fds
        for fd, (_name, link) in link_fds.items():
            poller.register(fd, _POLLINOUT if link.backlog else _POLLIN)
        next_tick = time.monotonic() + self._tick_s
        timers = self._timers
        while True:
            timeout_ms = max(0, int((next_tick - time.monotonic()) * 1000))
            if not self._on_tick:
                timeout_ms = _SAFETY_MS
            if timers:  # (rounded up: a poll of 0 ms before one is due would spin)
                timeout_ms = min(timeout_ms, max(0, math.ceil(
                    (timers[0][0] - time.monotonic()) * 1000)))
            if self._outgoing or self._again or self._looped:  # (more: come straight back)
                timeout_ms = 0
            ready = dict(poller.poll(timeout_ms))
            self._quiet = self._turn_in <= 1
            self._turn_in = self._turn_out = 0
            if pull in ready and not self._wake_ups(pull, sockets):
                return
            if poke in ready:
                try:  # noqa: SIM105 - as in poke()
                    os.read(poke, 4096)
                except BlockingIOError:
                    pass
            self._take_outgoing(sockets)
            if self._looped:  # (a long turn's, late: what it gave rise to goes now)
                self._hand_on_looped(flush=self.overdue())
            for sock in ready:
                if sock in names:
                    try:
                        self._receive(names[sock], sock)
                    except zmq.ZMQError as exc:  # the thread that owns every socket lives on
                        log.error("receive_failed", socket=names[sock], error=str(exc))
                elif sock in link_fds:
                    self._link_ready(sock, ready[sock])
            for sock in ready:  # after what this turn received: a peer's last words come first
                if sock in monitors:
                    self._monitor_event(monitors[sock], sock)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + self._tick_s
                poller.check_all()  # (Poller's safety net)
                if self._on_tick is not None:
                    self._guarded(self._on_tick, now)
            while timers and timers[0][0] <= now:
                self._guarded(heapq.heappop(timers)[2])
            if self._hosted:
                self._run_hosted()
            if self._pending:
                self._flush()

    def _run_hosted(self) -> None:
        # Cleared before the turns run: work given after this finds them clear and pokes again.
        self._poked = self._again = False
        for turn in tuple(self._hosted):
            try:
                more = turn()
            except Exception:  # a bug in the host glue: the thread that owns the sockets goes on
                log.exception("hosted_turn_failed", turn=getattr(turn, "__qualname__", "?"))
                more = None
            if more is None:
                self._hosted.remove(turn)
            elif more:
                self._again = True

    def _wake_ups(self, pull: zmq.Socket[bytes], sockets: dict[bytes, zmq.Socket[bytes]]) -> bool:
        """Read a wake-up; False when told to stop (what was queued before is sent). One a
        turn, read without asking first (the poll said it is there; asking costs a round
        through the socket's mailbox, on every message): another one waiting makes the next
        poll return at once."""
        try:
            woken = pull.recv(_NOBLOCK)
        except zmq.Again:
            return True
        if woken == _STOP:
            self._wake_pending = False
            while self._outgoing:
                self._take_outgoing(sockets)
            self._flush()
            return False
        return True

    def _take_outgoing(self, sockets: dict[bytes, zmq.Socket[bytes]]) -> None:
        self._wake_pending = False  # before taking: see Outbox.send
        outgoing = self._outgoing
        taken = min(len(outgoing), _TURN_ITEMS)
        self._turn_in += taken
        for _ in range(taken):
            self._defer_checked(*outgoing.popleft())

    def _defer_checked(self, name: bytes, frames: list[bytes]) -> None:
        if name not in self._sockets and name not in self._links \
                and name not in self._loop_dealers:
            if name.startswith(_RECONNECT):  # (Outbox.reconnect: here, not on every send)
                self.reconnect_now(name[len(_RECONNECT):].decode())
                return
            if name.startswith(_ATTACH):
                self._attach(name[len(_ATTACH):], frames[0], int.from_bytes(frames[1], "little"))
                return
            if name.startswith(_DETACH):
                self._detach(name[len(_DETACH):], frames[0])
                return
            log.error("send_to_unknown_socket", socket=name.decode(errors="replace"))
            return
        self._defer(name, frames)

    def _defer(self, name: bytes, frames: list[bytes]) -> None:
        """Queue a message for the end of this turn (see the module docstring); the first of a
        quiet turn after a quiet one (each took in one message at most) leaves at once."""
        self._turn_out += 1
        if self._turn_out == 1 and self._quiet and self._turn_in <= 1:
            # A lone round trip's: what the turn does after it (the rest of the handler, the
            # actor's bookkeeping) no longer delays it. A burst's turns, and the first after
            # one, batch as before (sent early, a burst's messages would leave alone more often).
            self._send(name, self._sockets.get(name), frames)
            return
        if name in self._routers:
            key, route = (name, frames[0]), frames[1:-1]
        else:
            key, route = (name, b""), frames[:-1]
        body = frames[-1]
        size = len(body) if len(route) < 2 else len(body) + sum(map(len, route))
        if not self._pending:
            self._pending_since = time.monotonic()
        elif time.monotonic() - self._pending_since >= _HOLD_S:
            self._flush()  # a long turn: what waited goes now, this one in the next batch
            self._pending_since = time.monotonic()
        items = self._pending.get(key)
        if items is None:
            self._pending[key] = [(route, body)]
            self._pending_bytes[key] = size
        else:
            items.append((route, body))
            self._pending_bytes[key] += size
            if len(items) >= _BATCH_ITEMS or self._pending_bytes[key] >= _BATCH_BYTES:
                self._send_pending(key, self._pending.pop(key))

    def flush_held(self) -> None:
        """On the hub thread, in a long turn (a hosted actor's batch of messages): send what
        waited ``_HOLD_S`` or more for the turn's end, and hand what waited as long for a
        loopback's peer on to it now: its handler runs here, between the batch's messages (a
        node's relays and its actor's mailbox: the actor itself takes it in its own turn)."""
        if self._pending and time.monotonic() - self._pending_since >= _HOLD_S:
            self._flush()
        if self.overdue():
            self._hand_on_looped(flush=True)

    def _hand_on_looped(self, *, flush: bool) -> None:
        """What the loopbacks carry now, to their peers' handlers (more comes next turn); with
        ``flush``, what those sent leaves now, not at the turn's end."""
        looped = self._looped
        for _ in range(len(looped)):
            self._deliver(*looped.popleft())
        if looped:
            self._looped_since = time.monotonic()
        if flush and self._pending:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        pending = list(self._pending.items())
        self._pending.clear()  # (the same dict: a hosted inbox reads it, ``deferred``)
        for key, items in pending:
            self._send_pending(key, items)
        if self._looped and self._pending_since < self._looped_since:
            self._looped_since = self._pending_since  # (what went to a loopback waited as long)

    def _send_pending(self, key: tuple[bytes, bytes], items: _Pending) -> None:
        name, peer = key
        prefix = [peer] if name in self._routers else []
        sock = self._sockets.get(name)
        size = self._pending_bytes.pop(key, 0)
        if len(items) == 1 or size >= _LONE_BYTES * len(items):
            for route, body in items:
                self._send(name, sock, [*prefix, *route, body])
        else:
            self._send(name, sock, [*prefix, BATCH + _batch_encoder.encode(items)])

    def _send(self, name: bytes, sock: zmq.Socket[bytes] | None, frames: list[bytes]) -> bool:
        if sock is None:
            if (loop := self._loop_dealers.get(name)) is not None:
                router, identity, key = loop
                if not self._looped:
                    self._looped_since = time.monotonic()
                self._looped.append((router.decode(), [key, identity, *frames]))
                return True
            return self._send_link(name, frames)
        if self._loop_routes and (dealer := self._loop_routes.get(
                (name, bytes(frames[0])))) is not None:
            if not self._looped:
                self._looped_since = time.monotonic()
            self._looped.append((dealer.decode(), frames[1:]))
            return True
        if self._poller is not None:
            self._poller.touched(sock)  # (a send may take in the socket's commands: poller.py)
        try:
            # A large body goes without a copy: ZeroMQ reads it from the bytes object itself.
            least = _VIEW_BYTES if name in self._views else _ZERO_COPY_BYTES
            copy = len(frames) < 3 and len(frames[-1]) < least or max(map(len, frames)) < least
            if not _SENDABLE.issuperset(map(type, frames)):
                # send_multipart checks every part before the first leaves: a part refused after
                # it would leave the message open, and the next one sent would join it.
                sock.send_multipart(frames, _NOBLOCK, copy=copy)
                return True
            # (send_multipart, without its enum flags: the parts a message's first was taken
            # with are always taken)
            for part in frames[:-1]:
                _send_part(sock, part, _NOBLOCK | _SNDMORE, copy)
            _send_part(sock, frames[-1], _NOBLOCK, copy)
            return True
        except zmq.ZMQError as exc:
            # A peer that left (EHOSTUNREACH: a client that said Bye, a worker gone; expected,
            # at debug) or a full queue (EAGAIN: worth a look): the message is dropped;
            # liveness tracking notices the peer.
            (log.debug if exc.errno == zmq.EHOSTUNREACH else log.warning)(
                "send_dropped",
                socket=name.decode(errors="replace"),
                peer=bytes(frames[0][:40]).decode(errors="replace") if len(frames) > 1 else "",
                error=exc.strerror,
            )
            return False

    def _receive(self, name: str, sock: zmq.Socket[bytes]) -> None:
        keyed = name.encode() in self._keyed
        loops = self._loop_routes if keyed else None  # (a loopback's router is a keyed one)
        views = name.encode() in self._views
        fds = self._peer_fds.get(name)
        budget = _READ_ITEMS
        assert self._poller is not None
        settled = self._poller.settled
        for n in range(1_000):
            # Ask before receiving (raising and catching zmq.Again is costly on a busy master),
            # but the first: the poll said it is there.
            if n and budget <= 0:
                return
            if n and not _readable(sock):
                settled(sock)  # (its events just asked: poller.py)
                return
            # Part by part, each a zmq.Frame: cheaper than recv_multipart even when every part
            # is copied out (it asks the socket for RCVMORE after each), and a large part can
            # stay uncopied (``views``).
            try:
                frame = sock.recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            limit = _VIEW_BYTES if views else _NO_VIEWS
            frames = [frame.bytes if len(frame) < limit else _view(frame)]
            while frame.more:  # the rest of a message is there once its first part is
                frame = sock.recv(copy=False)
                frames.append(frame.bytes if len(frame) < limit else _view(frame))
            if keyed:
                if loops and (name.encode(), frames[0]) in loops:
                    # A connection naming itself as this hub's own loopback peer (its id is
                    # free on the socket: no connection holds it): neither heard nor tracked.
                    self._impostors += 1
                    if self._impostors & (self._impostors - 1) == 0:  # (1, 2, 4, 8... said)
                        log.warning("loopback_id_refused", socket=name,
                                    peer=bytes(frames[0][:80]).decode(errors="replace"),
                                    refused=self._impostors)
                    budget -= 1
                    continue
                # The key the CURVE handshake proved (ZAP's User-Id, its Z85 text) rides on the
                # parts the peer sent (not on the routing id the ROUTER adds, with older libzmq).
                frames.insert(0, _user_id(frame))
                if fds is not None:
                    fd = _source_fd(frame)
                    if fds.get(fd) != frames[1]:
                        fds[fd] = frames[1]
            budget -= self._deliver(name, frames)

    def _deliver(self, name: str, frames: list[bytes]) -> int:
        """Hand a received message on (a batch's one by one); how many there were."""
        if frames[-1][:1] == BATCH:
            self._turn_in += 2  # (a batch is a burst's: its answers are batched too)
            return self._unbatch(name, frames)
        self._turn_in += 1
        self._guarded(self._on_frames, name, frames)
        return 1

    def _unbatch(self, name: str, frames: list[bytes]) -> int:
        """Hand on a batch's messages; how many there were."""
        try:
            messages = unbatch(frames)
        except msgspec.MsgspecError as exc:
            self._malformed += 1  # (a peer may send them as fast as it likes: 1, 2, 4, 8... said)
            if self._malformed & (self._malformed - 1) == 0:
                log.warning("malformed_batch", socket=name, error=str(exc), size=len(frames[-1]),
                            refused=self._malformed)
            return 1
        if self._on_batch is not None:
            self._guarded(self._on_batch, name, messages)
            return len(messages)
        for message in messages:
            self._guarded(self._on_frames, name, message)
        return len(messages)

    # --- links (links.py) -----------------------------------------------------

    def _attach(self, name: bytes, identity: bytes, fd: int) -> None:
        links = self._links.get(name)
        sock = socket.socket(fileno=fd)
        if links is None:
            log.error("attach_refused", socket=name.decode(errors="replace"), why="no such links")
            sock.close()
            return
        old = links.get(identity)
        if old is not None:  # (an id is given once: its first link stands)
            log.error("attach_refused", socket=name.decode(errors="replace"),
                      peer=identity.decode(errors="replace"), why="that id has a link")
            sock.close()
            return
        # (a dealer's one peer is its node, trusted to read: see Link's blocking_sends)
        link = Link(sock, identity, views=name in self._link_views,
                    blocking_sends=name not in self._routers)
        links[identity] = link
        self._link_fds[link.fd] = (name, link)
        if self._poller is not None:
            self._poller.register(link.fd, _POLLIN)

    def _detach(self, name: bytes, identity: bytes) -> None:
        link = self._links.get(name, {}).get(identity)
        if link is None:
            return
        for _ in range(1_000):  # (bounded: a peer's child that kept the link may write on)
            messages = link.read()
            self._hand_on(name, link, messages)
            if not messages or link.closed:
                break
        self._drop_link(name, link)

    def _link_ready(self, fd: int, events: int) -> None:
        name, link = self._link_fds[fd]
        if events & _POLLOUT:
            link.flush()
            if not link.backlog and not link.closed and self._poller is not None:
                self._poller.modify(fd, _POLLIN)
        if events & ~_POLLOUT:  # readable, or hung up (a read says which)
            self._hand_on(name, link, link.read())
        if link.closed:
            self._drop_link(name, link)

    def _hand_on(self, name: bytes, link: Link, messages: list[list[bytes]]) -> None:
        text = name.decode()
        routed = name in self._routers
        for frames in messages:
            if routed:
                frames.insert(0, link.identity)
            self._deliver(text, frames)

    def _send_link(self, name: bytes, frames: list[bytes]) -> bool:
        links = self._links.get(name)
        routed = name in self._routers
        link = None if links is None else links.get(bytes(frames[0]) if routed else b"")
        if link is None:  # a peer gone (a worker that exited): as a ROUTER's EHOSTUNREACH
            log.debug("send_dropped", socket=name.decode(errors="replace"),
                      peer=bytes(frames[0][:40]).decode(errors="replace") if routed else "",
                      error="no link")
            return False
        sent = link.send(frames[1:] if routed else frames)
        if link.closed:
            self._drop_link(name, link)
        elif link.backlog and self._poller is not None:
            self._poller.modify(link.fd, _POLLINOUT)  # (again each time: a dict's set)
        if not sent and not link.closed:
            log.warning("send_dropped", socket=name.decode(errors="replace"),
                        peer=link.identity.decode(errors="replace"),
                        error="its peer left too much unread")
        return sent

    def _drop_link(self, name: bytes, link: Link) -> None:
        if self._link_fds.pop(link.fd, None) is None:
            return
        links = self._links.get(name, {})
        if links.get(link.identity) is link:
            del links[link.identity]
        if self._poller is not None:
            self._poller.unregister(link.fd)
        (log.warning if link.broken else log.debug)(
            "link_closed", socket=name.decode(errors="replace"),
            peer=link.identity.decode(errors="replace"), broken=link.broken)
        link.close()
        if name not in self._routers and self._on_event is not None:
            self._guarded(self._on_event, name.decode(), "disconnected")

    def _monitor_event(self, name: str, monitor: zmq.Socket[bytes]) -> None:
        fds = self._peer_fds.get(name)
        while True:
            try:
                event = parse_monitor_message(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if fds is not None:  # a keyed router: only disconnects are asked for
                routing = fds.pop(int(event["value"]), None)
                if routing is not None and self._on_peer_gone is not None:
                    self._guarded(self._on_peer_gone, name, routing)
                continue
            what = _WATCHED_EVENTS.get(int(event["event"]))
            if what is not None and self._on_event is not None:
                self._guarded(self._on_event, name, what)

    @staticmethod
    def _guarded(handler: Callable[..., None], *args: object) -> None:
        # A bug in a handler must not kill the thread that owns every socket.
        try:
            handler(*args)
        except Exception:
            log.exception("handler_failed", handler=getattr(handler, "__qualname__", "?"))


def _poke_pair() -> tuple[int, int]:
    """The read and write ends of the hub's poke: one eventfd on Linux (one descriptor, no
    buffer to fill), else a pipe. Non-blocking both."""
    if hasattr(os, "eventfd"):
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, fd
    read, write = os.pipe()
    os.set_blocking(read, False)
    os.set_blocking(write, False)
    return read, write


def unbatch(frames: list[bytes]) -> list[list[bytes]]:
    """The messages in what one receive returned: itself, or each message of a batch (with the
    frames before the batch, a ROUTER's sender identity, in front). Raises on a bad batch."""
    if frames[-1][:1] != BATCH:
        return [frames]
    prefix = frames[:-1]
    return [[*prefix, *route, body] for route, body in _batch_decoder.decode(frames[-1][1:])]


class _Admit:
    """pyzmq's CURVE credentials provider for a socket with its own rule (``ServerCurve.admit``).
    A rule that raises refuses the key (and is logged): the authenticator's thread lives on."""

    def __init__(self, admit: Callable[[bytes], bool]) -> None:
        self._admit = admit

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            return bool(self._admit(key))
        except Exception:
            log.exception("admit_rule_failed", domain=domain)
            return False


def _view(frame: zmq.Frame) -> bytes:
    """A large frame as a read-only view of ZeroMQ's buffer, uncopied; typed bytes, since the
    handlers of ``views`` sockets take either (see "Bulk data")."""
    return frame.buffer.toreadonly()  # type: ignore[return-value]


def _user_id(frame: zmq.Frame) -> bytes:
    try:
        return _key_bytes(frame.get("User-Id"))
    except zmq.ZMQError:  # no such property on this frame: no key proved
        return b""


def _source_fd(frame: zmq.Frame) -> int:
    """The file descriptor of the connection ``frame`` came through (-1: not known)."""
    try:
        return int(frame.get(_SRCFD))
    except zmq.ZMQError:
        return -1


_SRCFD = int(getattr(zmq, "SRCFD", 2))  # deprecated in libzmq, still answered by 4.3


@functools.lru_cache(maxsize=1024)  # a master hears from few keys, over and over
def _key_bytes(key: str | int | None) -> bytes:
    return key.encode() if isinstance(key, str) else b""


def _readable(sock: zmq.Socket[bytes]) -> bool:
    # (no typing.cast: a Python call, per message read)
    return bool(sock.get(_EVENTS) & _POLLIN)  # type: ignore[operator]


def _quiet_logger() -> object:
    import logging

    logger = logging.getLogger("actors.zap")
    logger.setLevel(logging.WARNING)
    return logger
