"""The node's data plane: unit results moving worker -> node -> node -> worker.

A unit's result stays on the worker that computed it; a worker that needs it asks through its
node, which relays to the holder's node, which relays to the holder; the answer comes back the
same way. The master never sees the data. Everything here runs on the node's hub thread and
reads only the routing frames, never the bodies:

    worker -> node      [worker, b"p", address, holder, DataRequest]   (a request for a peer)
    node -> node        [holder, DataRequest]  on a DEALER to the holder's node (identity: ours)
    node -> holder      [holder, origin, DataRequest]  origin: the asking node, b"" for us
    holder -> node      [holder, b"r", origin, requester, *attached, DataReply]
    node -> node        [origin, requester, *attached, DataReply]  on our data ROUTER
    node -> requester   [requester, *attached, DataReply]

``attached``: the large values of a reply, one frame each (``DataReply.attached`` names them),
relayed as they are: neither copied into the message by the holder nor out of it here.

Nodes talk to each other with CURVE, and a node's data socket admits only the nodes' key: a
client key, which the master admits, cannot read results. Nodes of one host and uid (the
master passes every node's ``Hello.local_data`` on as ``LocalPeers``) use each other's ipc
endpoint instead, ``data-local`` in a folder of the run directory only that uid may open: the
same frames, without the encryption that caps a TCP stream far below what the host moves.
Answers go back on the socket the request came in on (``origin_socket``).

Task code runs in the workers and may send any frame: the node connects only to data addresses
the master announced to its workers (``RunUnits``/``WhoHas``/``DriverResults`` holders, read from
the frames relayed to them), answers a request for any other address at once with every key
missing, and keeps at most ``MAX_PEERS`` peer connections, closing the least recently used.

Nor may a worker speak to another worker as its node would. What the data plane hands a worker
comes after a first frame of its own (``DATA_MARK``), and a worker takes only data messages
there, and none on its node's own path (actors/worker.py); here a request must be a
``DataRequest`` or ``InputRequest`` naming its sender as the requester, and a reply a
``DataReply`` naming its sender as the holder, to a requester that asked that holder (or that
peer node) in the last ``ASKED_S`` seconds. Before (2026-12-04), task code could send any
message to any worker of its node, or of a peer node, through either path: an ``AssignTask``
of its own code to another user's idle worker ran it there
(``test_task_code_cannot_send_another_worker_its_nodes_messages``).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec
import structlog

from actors import messages as m
from actors.errors import MalformedMessage
from transport import Hub
from transport.hub import ClientCurve, ServerCurve
from transport.keys import KeyPair

log = structlog.get_logger("actors.node")

DATA = "data"
DATA_LOCAL = "data-local"  # the same, on ipc, for peer nodes of this host and uid (no CURVE)
WORKERS = "workers"
#: The data plane's name for its node's result store, as a holder: a worker asks it for a held
#: result that is an input of its task (``InputRequest``), as it asks a peer worker for a unit's.
RESULTS_HOLDER = b"node-results"
TO_PEER = b"p"
REPLY = b"r"
MAX_PEERS = 64  # open DEALERs to other nodes; the least recently used is closed first
MAX_KNOWN = 4096  # announced addresses remembered, least recently announced forgotten first
#: Frames of their own a reply may carry (``DataReply.attached``): more is not a worker's reply.
MAX_ATTACHED = 4096
#: The first frame of all the data plane hands a worker: what follows is data, not its node's.
DATA_MARK = b"d"
#: A holder may answer a requester this long after it was last asked by it (a request may be
#: answered in several replies, and late), and these many askings are remembered at most.
ASKED_S = 600.0
MAX_ASKED = 65_536
_REQUESTS = (m.DataRequest, m.InputRequest)
_REPLY_TAGS = frozenset({"DataReply", "InputData"})


class _Head(msgspec.Struct, array_like=True):
    """A data message's type tag and the field after its task id (a reply's holder), read
    without decoding the values it carries."""

    tag: str
    task_id: str
    second: msgspec.Raw = msgspec.Raw()


_head = msgspec.msgpack.Decoder(_Head)


def boot_id() -> str:
    """This kernel's boot id and this process's mount namespace (Linux): two processes that see
    the same pair share a host and its files, so an ipc path or a file one names is the other's.
    (Containers on one kernel share the boot id, not their files.)"""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/mnt').st_ino}" if boot else ""
    except OSError:
        return ""


def data_host(master_address: str) -> str:
    """Where to listen for peer nodes: loopback when the master is local, else every interface."""
    host = urllib.parse.urlsplit(master_address).hostname or ""
    try:
        local = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        local = False
    return "127.0.0.1" if local else "0.0.0.0"


def route_to(master_address: str) -> str | None:
    """This host's address on the route to the master: what peers on the master's network most
    likely reach, without any name resolution between hosts (a UDP connect sends nothing)."""
    parts = urllib.parse.urlsplit(master_address)
    try:
        infos = socket.getaddrinfo(parts.hostname or "", parts.port or 1, type=socket.SOCK_DGRAM)
        family, _, _, _, where = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect(where)
            return str(probe.getsockname()[0])
    except (OSError, IndexError, ValueError):
        return None


def split_host_port(text: str) -> tuple[str, int]:
    """``HOST``, ``HOST:PORT`` or ``[V6]:PORT`` (port 0: any free one)."""
    parts = urllib.parse.urlsplit(f"//{text}")
    try:
        port = parts.port or 0
    except ValueError:
        raise ValueError(f"not HOST[:PORT]: {text!r}") from None
    if not parts.hostname:
        raise ValueError(f"not HOST[:PORT]: {text!r}")
    return parts.hostname, port


def _url(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class DataPlane:
    """The data ROUTER, the DEALERs to peer nodes, and the relay between them and the workers.

    It listens where ``listen`` says (default: loopback for a local master, every interface
    otherwise, on a free port) and announces ``announce`` to the master for its peers (default:
    this host's address on its route to the master, not a host name they may not resolve)."""

    def __init__(self, node_id: str, pair: KeyPair, run_dir: str, master_address: str,
                 listen: str | None = None, announce: str | None = None) -> None:
        self.node_id = node_id
        self.pair = pair
        self.master_address = master_address
        self.alive: set[bytes] | None = None  # our proven, living workers (the Node keeps it)
        self.host, self.port = split_host_port(listen) if listen else (data_host(master_address), 0)
        self.announce = split_host_port(announce) if announce else None
        self.allowed_dir = os.path.join(run_dir, "data-allowed")
        self.address = ""  # what peers connect to, once bound
        self.known: OrderedDict[str, None] = OrderedDict()  # addresses the master announced
        self.peers: OrderedDict[str, None] = OrderedDict()  # open peer sockets, by last use
        self.refused = 0
        self.local_dir = os.path.join(run_dir, "peers")  # 0700: only our uid reaches the socket
        self.local_address = ""
        self.local: dict[str, str] = {}  # peer data address -> its ipc endpoint (same host, uid)
        self.origin_socket: dict[bytes, str] = {}  # asking node -> the socket it asked on
        # Who asked whom, and when last (see ASKED_S): (our holder, origin, requester) for the
        # requests handed to our workers; (peer socket, requester) for those sent to peers.
        self.asked: OrderedDict[tuple[bytes, bytes, bytes], float] = OrderedDict()
        self.sent: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self.forged = 0  # frames refused (said 1, 2, 4, 8... times)
        # Whether a worker holds a task (the node's TaskEnds): a worker asks for the results of
        # a task it runs, and only of that one (the holder serves that task's units only).
        self.holds: Callable[[bytes, str], bool] | None = None
        # The result store's answer to an InputRequest (set by the node: node_results.py).
        self.serve_input: Callable[[Hub, bytes, bytes], None] | None = None

    def add_to(self, hub: Hub, node_public_key_file: str) -> None:
        """Before ``hub.start()``: bind the data ROUTER, admitting the nodes' key only."""
        os.makedirs(self.allowed_dir, exist_ok=True)
        shutil.copyfile(node_public_key_file, os.path.join(self.allowed_dir, "node.key"))
        # Both routers answer peers with the values: sent uncopied (``views``, transport/hub.py).
        hub.add_router(DATA, _url(self.host, self.port), views=True,
                       curve=ServerCurve(self.pair.public, self.pair.secret, self.allowed_dir))
        # Peer nodes of this host and uid come in here: CURVE would only cost them (it caps a
        # stream at a fraction of what the machine moves), and who can open this folder could
        # read our keys anyway.
        os.makedirs(self.local_dir, mode=0o700, exist_ok=True)
        os.chmod(self.local_dir, 0o700)
        self.local_address = f"ipc://{os.path.join(self.local_dir, 'data')}"
        hub.add_router(DATA_LOCAL, self.local_address, views=True)

    def local_data(self) -> str:
        """What the master passes on to peer nodes: who may use our ipc endpoint, and where
        ("" with ``$ACTORS_DATA_LOCAL=0``: peers of this host then use TCP and CURVE too)."""
        if os.environ.get("ACTORS_DATA_LOCAL") == "0":
            return ""
        boot = boot_id()
        return f"{boot} {os.getuid()} {self.local_address}" if boot and self.local_address else ""

    def local_peers(self, msg: m.LocalPeers) -> None:
        """The master's list of nodes: those of our host and uid are reached by ipc."""
        mine = self.local_data().split(" ", 2)[:2]
        self.local = {}
        for address, local in msg.peers:
            parts = local.split(" ", 2)
            if (len(parts) == 3 and parts[:2] == mine and address != self.address
                    and parts[2].startswith("ipc://")):
                self.local[address] = parts[2]

    def bound(self, hub: Hub) -> None:
        """After ``hub.start()``: the address to announce (a wildcard becomes this host's
        address on the route to the master)."""
        port = int(hub.address(DATA).rsplit(":", 1)[1])
        if self.announce is not None:
            host, announced_port = self.announce
            self.address = _url(host, announced_port or port)
            return
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            found = route_to(self.master_address)
            if found is None:
                found = os.uname().nodename
                log.warning("data_address_guessed", node_id=self.node_id, address=found,
                            hint="peers must resolve this name; give --data-address")
            host = found
        self.address = _url(host, port)

    def from_worker(self, hub: Hub, worker: bytes, frames: list[bytes]) -> bool:
        """Relay a worker's data frames (``[b"p"|b"r", ...]``); False when they are not data."""
        if len(frames) == 4 and frames[0] == TO_PEER:
            _, address, holder, body = frames
            if not self._requested_by(worker, body):
                return True
            holder = bytes(holder)
            # (bytes(): a worker's frame of 64 KiB or more comes as a view, see transport/hub.py)
            text = bytes(address).decode(errors="replace")
            if not address:
                log.warning("data_request_without_address",
                            holder=holder.decode(errors="replace"))
            elif text == self.address:
                if holder == RESULTS_HOLDER and self.serve_input is not None:
                    self.serve_input(hub, b"", body)
                elif self._to_worker(hub, [holder, b"", body]):
                    _remember(self.asked, (holder, b"", worker))
                else:
                    self._holder_gone(hub, holder, b"", body)
            elif text not in self.known:
                self.refused += 1
                if self.refused & (self.refused - 1) == 0:  # the 1st, 2nd, 4th, 8th... only
                    log.warning("data_address_refused", node_id=self.node_id, address=text[:200],
                                worker=worker.decode(errors="replace"), refused=self.refused)
                self._holder_gone(hub, holder, b"", body)
            else:
                peer = self._peer_socket(hub, text)
                hub.send_now(peer, [holder, body])
                _remember(self.sent, (peer, worker))
            return True
        if 4 <= len(frames) <= 4 + MAX_ATTACHED and frames[0] == REPLY:
            _, origin, requester, *attached, body = frames
            origin, requester = bytes(origin), bytes(requester)
            head = _head_of(body)
            if (head is None or head.tag != "DataReply" or _text(head.second) != worker
                    or not _asked(self.asked, (worker, origin, requester))):
                self._refuse(worker, "a reply to no request of its")
                return True
            self._reply(hub, origin, requester, body, attached)
            return True
        return False

    def _requested_by(self, worker: bytes, body: bytes) -> bool:
        """A worker's request for data: a ``DataRequest`` or ``InputRequest`` naming it."""
        try:
            request = m.decode(body)
        except MalformedMessage:
            request = None
        if not isinstance(request, _REQUESTS) or request.requester.encode() != worker:
            self._refuse(worker, "not a request of its own")
            return False
        if (isinstance(request, m.DataRequest) and self.holds is not None
                and not self.holds(worker, request.task_id)):
            self._refuse(worker, "a request for the results of a task it does not run")
            return False
        return True

    def _refuse(self, worker: bytes, why: str) -> None:
        self.forged += 1
        if self.forged & (self.forged - 1) == 0:
            log.warning("data_frame_refused", node_id=self.node_id, why=why, refused=self.forged,
                        worker=bytes(worker[:80]).decode(errors="replace"))

    def from_master(self, body: bytes) -> None:
        """A frame the master sends one of our workers: remember the data addresses it names."""
        if b"tcp://" not in body:  # most frames: no holder in them
            return
        try:
            msg = m.decode(body)
        except MalformedMessage:
            return
        if isinstance(msg, m.RunUnits | m.DriverResults):
            addresses = [address for _, _, address in (
                msg.holders if isinstance(msg, m.RunUnits) else msg.held)]
        elif isinstance(msg, m.WhoHas):
            addresses = [address for _, address in msg.holders]
        elif isinstance(msg, m.AssignTask):
            addresses = [address for _, address in msg.held_inputs]
        elif isinstance(msg, m.AssignTasks):
            addresses = [address for task in msg.tasks for _, address in task.held_inputs]
        else:
            return
        for address in addresses:
            self.known[address] = None
            self.known.move_to_end(address)
        while len(self.known) > MAX_KNOWN:
            self.known.popitem(last=False)

    def from_network(self, hub: Hub, socket: str, frames: list[bytes]) -> bool:
        """Relay what the data ROUTER or a peer DEALER received; False for other sockets."""
        if socket in (DATA, DATA_LOCAL):
            if len(frames) == 3:
                origin, holder, body = bytes(frames[0]), bytes(frames[1]), frames[2]
                try:
                    request = m.decode(body)
                except MalformedMessage:
                    request = None
                if not isinstance(request, _REQUESTS):  # (its node checked who asks)
                    self._refuse(origin, "a peer node's frame that is not a request")
                    return True
                if self.origin_socket.get(origin) != socket:
                    self.origin_socket[origin] = socket  # its answers go back the same way
                if holder == RESULTS_HOLDER and self.serve_input is not None:
                    self.serve_input(hub, origin, body)
                elif self._to_worker(hub, [holder, origin, body]):
                    _remember(self.asked, (holder, origin, request.requester.encode()))
                else:
                    self._holder_gone(hub, holder, origin, body)
            else:
                log.warning("malformed_frames", source="peer node", count=len(frames))
            return True
        if socket.startswith("peer:"):
            if 2 <= len(frames) <= 2 + MAX_ATTACHED:  # [requester, *attached, DataReply]
                head = _head_of(frames[-1])
                if (head is not None and head.tag in _REPLY_TAGS
                        and _asked(self.sent, (socket, bytes(frames[0])))):
                    self._to_worker(hub, frames)
                else:
                    self._refuse(b"", f"a reply from {socket} to no request sent there")
            else:
                log.warning("malformed_frames", source="peer node", count=len(frames))
            return True
        return False

    def _to_worker(self, hub: Hub, frames: list[bytes]) -> bool:
        """To one of our workers: only while it lives, proven (node_actor.py, "Proof"; another process
        may hold an exited worker's id)."""
        if self.alive is not None and frames[0] not in self.alive:
            return False
        return hub.send_now(WORKERS, [frames[0], DATA_MARK, *frames[1:]])

    def _holder_gone(self, hub: Hub, holder: bytes, origin: bytes, body: bytes) -> None:
        """The holder is not (or no longer) here: say so now, rather than let the asker wait."""
        try:
            request = m.decode(body)
        except MalformedMessage:
            return
        if isinstance(request, m.InputRequest):
            self._reply(hub, origin, request.requester.encode(), m.encode(m.InputData(
                request.task_id, b"", [], "the node that held it is unknown or gone")))
            return
        if not isinstance(request, m.DataRequest):
            return
        reply = m.DataReply(request.task_id, bytes(holder).decode(errors="replace"), [],
                            request.keys)
        self._reply(hub, origin, request.requester.encode(), m.encode(reply))

    def reply(self, hub: Hub, origin: bytes, requester: bytes, body: bytes) -> None:
        """Send an answer back to a requesting worker (the result store's, for inputs)."""
        self._reply(hub, origin, requester, body)

    def _reply(self, hub: Hub, origin: bytes, requester: bytes, body: bytes,
               attached: list[bytes] | None = None) -> None:
        """Send a holder's answer back: to our own worker, or to the asking node. ``attached``:
        the large values that travel in frames of their own before the body, untouched."""
        extra = attached or []
        if origin == b"":
            self._to_worker(hub, [requester, *extra, body])
        else:
            hub.send_now(self.origin_socket.get(origin, DATA), [origin, requester, *extra, body])

    def _peer_socket(self, hub: Hub, address: str) -> str:
        # Named by the endpoint it dials: a peer first reached over TCP (before LocalPeers
        # named it a node of this host) gets an ipc socket of its own once it is known local;
        # the TCP one stays open for the replies on their way, until it is the least used.
        local = self.local.get(address)
        name = f"peer:{local or address}"
        if name in self.peers:
            self.peers.move_to_end(name)
            return name
        while len(self.peers) >= MAX_PEERS:
            oldest, _ = self.peers.popitem(last=False)
            log.info("peer_node_closed", node_id=self.node_id, socket=oldest, why="least recently used")
            hub.close_now(oldest)
        log.info("peer_node_connect", node_id=self.node_id, address=address, local=local or "")
        # Its replies bring the values: received uncopied (``views``), relayed as they came.
        if local is not None:  # same host and uid: its ipc endpoint, no encryption
            hub.open_dealer_now(name, local, identity=self.node_id.encode(), views=True)
        else:
            hub.open_dealer_now(name, address, identity=self.node_id.encode(),
                                curve=ClientCurve(self.pair.public, self.pair.secret,
                                                  self.pair.public), views=True)
        self.peers[name] = None
        return name


def _head_of(body: bytes) -> _Head | None:
    try:
        return _head.decode(body)
    except msgspec.MsgspecError:
        return None


def _remember(table: OrderedDict[Any, float], key: Any) -> None:
    table[key] = time.monotonic()
    table.move_to_end(key)
    while len(table) > MAX_ASKED:
        table.popitem(last=False)


def _asked(table: OrderedDict[Any, float], key: Any) -> bool:
    when = table.get(key)
    return when is not None and time.monotonic() - when <= ASKED_S


def _text(raw: msgspec.Raw) -> bytes:
    """A msgpack string, as UTF-8 bytes (b"" for anything else)."""
    try:
        return msgspec.msgpack.decode(raw, type=str).encode()
    except msgspec.MsgspecError:
        return b""
