"""A node's parts as its process puts them together: its options, what it does before any
thread starts (its run folder, its workers' containment, its first workers forked), and its
sockets, actors and handlers on a hub.

Two users. The node's own command line (``python -m actors.node``, node.py): a hub of its own,
a DEALER to its master. A master's local node (master.py, ``--local-node inside``, the default):
the master's own hub and process, joined to the master by a loopback (``Hub.add_loopback``) in
place of the DEALER: what they say to each other is handed from one handler to the other in the
hub's next turn, with no socket, I/O thread or process between them (bench/README.md, "The local
node inside the master's process").
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pykka
import structlog

from actors import contain, logs, unit_runner
from actors.contain import Containment, Limits, parse_size
from actors.errors import MalformedMessage
from actors.launch import (
    EXIT_NOTE_OPTION,
    NotingParser,
    local_master_arg,
    master_arg,
    refuse,
)
from actors.master_gate import MasterGate
from actors.node_actor import (
    DEFAULT_START_TIMEOUT_S,
    MASTER,
    RUN_DIR_PREFIX,
    WORKERS,
    Node,
    NodeConfig,
    TaskEnds,
    relay_frames,
    worker_refused,
)
from actors.node_data import DataPlane
from actors.node_results import ResultStore
from actors.prefork import Forked, fork_workers
from actors.shell import ConnectionEvent, Tick, tell_if_alive
from actors.task_sync import TaskSyncClient
from transport import ClientCurve, Hub, load_keypair, load_public_key
from transport.keys import KeyPair

log = structlog.get_logger("actors.node")


def node_parser(refused: list[str], *, standalone: bool = True) -> NotingParser:
    """The node's options; ``standalone`` False: a master's local node, whose master is the
    process it runs in (``--master`` is then only what its log and its data plane say)."""
    parser = NotingParser(refused, prog="python -m actors.node",
                          description="Join a pydra-actors master with this host's workers.")
    parser.add_argument("--master", default=os.environ.get("ACTORS_ADDRESS"),
                        required=standalone and "ACTORS_ADDRESS" not in os.environ,
                        type=master_arg,
                        help="the master's address, HOST:PORT or tcp://HOST:PORT")
    parser.add_argument("--local-master", default=None, type=local_master_arg,
                        metavar="ipc://PATH",
                        help="reach the master through its Unix socket on this host (its "
                             "--local-socket) instead; --master still says where peers reach it")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes (default: one a CPU)")
    parser.add_argument("--keys", default=None, help="CURVE key directory")
    logs.add_arguments(parser)
    parser.add_argument("--cache", default=None,
                        help="folder for task package versions (default: a private temporary one)")
    parser.add_argument("--package-grace", type=float, default=300.0,
                        help="seconds an unused old package version stays in the cache")
    parser.add_argument("--no-prefork", action="store_true",
                        help="start every worker as a fresh interpreter (on Linux the first ones "
                             "are forked from the node as it starts, which answers sooner)")
    parser.add_argument("--data-listen", default=None, metavar="HOST[:PORT]",
                        help="where to listen for peer nodes fetching unit results (default: "
                             "loopback for a local master, else every interface, a free port)")
    parser.add_argument("--data-address", default=None, metavar="HOST[:PORT]",
                        help="the address peers connect to, announced through the master "
                             "(default: this host's address on its route to the master; give it "
                             "behind NAT or a port forward)")
    parser.add_argument("--connect-timeout", type=float, default=0.0, metavar="SECONDS",
                        help="give up (exit 1) when no master welcomed this node within this "
                             "long (default 0: keep trying; it says why every 30 s)")
    parser.add_argument("--worker-start-timeout", type=float, metavar="SECONDS",
                        default=os.environ.get("ACTORS_WORKER_START_TIMEOUT")
                        or str(DEFAULT_START_TIMEOUT_S),
                        help="replace a worker that has not said hello this long after it "
                             f"started (default {DEFAULT_START_TIMEOUT_S:g}; 0: never)")
    parser.add_argument("--worker-links", action="store_true",
                        default=os.environ.get("ACTORS_WORKER_LINKS", "") not in ("", "0"),
                        help="(experimental) each worker's link to the node a socket pair made "
                             "before it starts, not the node's ipc socket: no socket task code "
                             "could open under another worker's id; faster small messages, "
                             "slower large values between nodes and from a driver that holds "
                             "the GIL ($ACTORS_WORKER_LINKS=1)")
    parser.add_argument("--fetch-timeout", type=float, metavar="SECONDS",
                        default=os.environ.get("ACTORS_FETCH_TIMEOUT")
                        or str(unit_runner.FETCH_TIMEOUT_S),
                        help="a worker's fetch of a unit result from a peer with no answer this "
                             "long fails and is tried again (3 tries, then the task fails "
                             f"with DataUnreachable; default {unit_runner.FETCH_TIMEOUT_S:g}: "
                             "raise it for a slow link)")
    parser.add_argument("--results-memory", type=parse_size,
                        default=os.environ.get("ACTORS_RESULTS_MEMORY") or "1G", metavar="SIZE",
                        help="large task results this node holds for their clients, in memory, "
                             "in all (e.g. 512M); beyond it they wait on disk (default 1G)")
    parser.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(EXIT_NOTE_OPTION, default="", help=argparse.SUPPRESS)
    add_containment_arguments(parser)
    return parser


def settle(args: argparse.Namespace, refused: list[str]) -> bool:
    """What the options set for the workers (their environment: forked or spawned, they keep
    ``ACTORS_*`` variables); False, said in ``refused``, for options no node can run with."""
    if args.worker_spill:
        os.environ["ACTORS_WORKER_SPILL"] = str(args.worker_spill)
    if args.worker_pause:
        os.environ["ACTORS_WORKER_PAUSE"] = str(args.worker_pause)
    if args.workers < 1:
        refuse(refused, "bad_arguments", "--workers must be at least 1")
        return False
    if not args.fetch_timeout > 0:
        refuse(refused, "bad_arguments", "--fetch-timeout must be more than 0 seconds")
        return False
    os.environ["ACTORS_FETCH_TIMEOUT"] = str(args.fetch_timeout)
    return True


class NodeParts:
    """One node: made before any thread of its process starts (its containment's probe forks,
    its first workers are forked, before its keys are read), then its sockets added to a hub
    (``add_to``), its addresses read once the hub runs (``bound``), its actors started
    (``start``); ``shutdown`` and ``close`` at the end, ``give_up`` instead when it never ran."""

    def __init__(self, args: argparse.Namespace, parent: int | None, master: str) -> None:
        self.args, self.master = args, master
        for stale in contain.remove_stale_run_dirs(RUN_DIR_PREFIX):
            log.info("stale_run_dir_removed", path=stale)
        self.run_dir, self.run_lock = contain.make_run_dir(RUN_DIR_PREFIX)
        # (with a few random bytes: a restarted node may have its predecessor's host name and
        # pid, pid 1 in a container, and the master never takes back a worker id it dropped)
        self.node_id = node_id = f"node-{os.uname().nodename}-{os.getpid()}-{secrets.token_hex(3)}"
        # Before any thread starts (the probe forks), and before the workers are forked.
        self.containment = containment = Containment.start(Limits(
            memory=args.worker_memory, open_files=args.worker_open_files,
            processes=args.worker_processes, network=args.worker_network,
            uid_base=args.worker_uid_base, as_root=args.worker_as_root), args.workers,
            log.bind(role="node", node_id=node_id))
        containment.prepare_run_dir(self.run_dir)
        contain.become_subreaper()
        if args.cache and containment.group is not None and \
                not contain.reachable_by_others(args.cache):
            log.warning("cache_unreadable_by_workers", cache=args.cache,
                        hint="workers of their own uids must enter every folder on its path")
        self.config = NodeConfig(
            node_id, args.workers, f"ipc://{self.run_dir}/workers.sock", self.run_dir,
            exit_with_parent=args.exit_with_parent and parent is not None,
            parent_pid=parent if parent is not None else os.getppid(),
            containment=containment, master=master,
            connect_timeout=max(0.0, args.connect_timeout),
            start_timeout=max(0.0, args.worker_start_timeout), links=args.worker_links)

        def plan_for(scratch: str) -> contain.Plan:
            plan = containment.plan()
            containment.prepare_scratch(scratch, plan)
            return plan

        # Before the keys are read and before any thread starts: see prefork.py.
        self.forked: list[Forked] = [] if args.no_prefork else fork_workers(
            node_id, self.run_dir, self.config.ipc_address, args.workers, plan_for,
            links=self.config.links)
        self.task_ends = TaskEnds()
        self.worker_pids: dict[str, int] = {}  # the Node actor keeps it; the result store reads it
        self.gate = MasterGate(log=log.bind(role="node", node_id=node_id))
        self.proven: set[bytes] = set()  # the Node actor keeps them (see "Proof")
        self.alive: set[bytes] = set()
        self.node_ref: pykka.ActorRef[Any] | None = None
        self.sync_ref: pykka.ActorRef[Any] | None = None
        self.started = threading.Event()
        self.ready = False  # set with it: read per frame (Event.is_set is a Python call)
        self.malformed = logs.Refusals()  # (the hub thread's)
        self.hub: Hub | None = None

    def give_up(self) -> None:
        """It never ran: its forked workers killed, its folder removed."""
        for child in self.forked:
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.containment.close()
        os.close(self.run_lock)

    def load_keys(self, keys: str, *, master_key: bool = True) -> None:
        """Its keys (after the workers are forked: they never hold them), and its master's
        public key unless ``master_key`` is False (a local node inside its master); raises
        ActorsError."""
        self.keys = keys
        self.pair: KeyPair = load_keypair(keys, "node")
        self.master_key = load_public_key(keys, "master") if master_key else b""

    def add_to(self, hub: Hub, *, within: str = "") -> None:
        """Its sockets on ``hub``; ``within``: the name of the master's ROUTER on this same hub
        (a loopback to it, see the module docstring), else a DEALER to ``master``. Raises
        ValueError for a data address that cannot be."""
        self.hub = hub
        args, config = self.args, self.config
        if within:
            hub.add_loopback(MASTER, within, self.node_id.encode(), self.pair.public)
        else:
            curve = ClientCurve(self.pair.public, self.pair.secret, self.master_key)
            hub.add_dealer(MASTER, args.local_master or args.master,
                           identity=self.node_id.encode(), curve=curve, monitor=True)
        # (no handover: a proven worker's connection is never given to a newer one of its id)
        if config.links:
            hub.add_links(WORKERS, views=True)  # one a worker, made before it starts
            for worker in self.forked:
                assert worker.link is not None
                hub.attach_link(WORKERS, worker.worker_id.encode(), worker.link)
        else:
            hub.add_router(WORKERS, config.ipc_address, views=True, handover=False)
        self.data = data = DataPlane(self.node_id, self.pair, self.run_dir, self.master,
                                     args.data_listen, args.data_address)
        data.alive, data.holds = self.alive, self.task_ends.holds
        data.add_to(hub, os.path.join(self.keys, "node.key"))
        self.results = results = ResultStore(
            self.node_id, self.pair, data.host, os.path.join(self.run_dir, "results"),
            self.task_ends, args.results_memory, self.worker_pids)
        results.add_to(hub)
        data.serve_input, results.reply = results.input_request, data.reply

    @contextlib.contextmanager
    def sockets_made(self) -> Iterator[None]:
        """Around the hub's start: workers of other uids connect to the ipc socket through
        their group, so it is made 0770."""
        group = self.containment.group is not None and not self.config.links
        umask = os.umask(0o007) if group else None
        try:
            yield
        finally:
            if umask is not None:
                os.umask(umask)

    def bound(self, hub: Hub) -> None:
        """Once ``hub`` runs: the addresses its peers reach it at."""
        self.data.bound(hub)
        self.config.data_address = self.data.address
        self.results.bound(hub, self.data.address)
        self.config.results_address = self.results.address
        self.config.local_data = self.data.local_data()

    def start(self, hub: Hub, on_fatal: Callable[[str], None]) -> None:
        self.sync_ref = TaskSyncClient.start(
            hub, os.path.abspath(self.args.cache or os.path.join(self.run_dir, "cache")),
            grace_s=self.args.package_grace)
        self.node_ref = Node.start(hub, self.config, on_fatal, self.sync_ref, self.forked,
                                   self.task_ends, self.gate, self.worker_pids, self.proven,
                                   self.alive)
        self.started.set()
        self.ready = True

    def on_frames(self, socket: str, frames: list[bytes]) -> None:
        if not self.ready:  # (Event.wait takes a lock even when set)
            self.started.wait(10)
        try:
            assert self.hub is not None and self.node_ref is not None
            assert self.sync_ref is not None
            relay_frames(self.hub, self.node_ref, self.sync_ref, socket, frames, self.data,
                         self.task_ends, self.gate, self.results, self.proven, self.alive)
        except MalformedMessage as exc:
            if socket == WORKERS and len(frames) > 1 and self.node_ref is not None:
                worker_refused(self.node_ref, frames[0], str(exc))  # (counted against it)
                return
            sender = bytes(frames[0][:80]).decode(errors="replace") if len(frames) > 1 else ""
            if refused := self.malformed.count(f"{socket}:{sender}"):  # (1, 2, 4, 8... said)
                log.warning("malformed_frame", socket=socket, sender=sender, error=str(exc),
                            refused=refused)

    def on_event(self, socket: str, what: str) -> None:
        # A refused key is known within milliseconds of the hub's start, before the Node
        # actor exists: wait for it, as on_frames does, or the refusal is lost.
        if not self.started.is_set():
            self.started.wait(10)
        if socket == MASTER and what == "disconnected":
            self.gate.close()  # here, on the hub thread: no worker frame slips past it
        tell_if_alive(self.node_ref, ConnectionEvent(socket, what))

    def on_tick(self, now: float) -> None:
        if not self.started.is_set():
            return  # (a master's hub ticks before its local node's actors exist)
        assert self.hub is not None
        self.results.tick(self.hub, now)
        for ref in (self.node_ref, self.sync_ref):
            tell_if_alive(ref, Tick(now))

    def shutdown(self) -> None:
        """Its workers stopped and its Bye said (before the hub stops)."""
        if self.node_ref is None:
            return
        try:
            self.node_ref.ask(("shutdown",), timeout=15)
        except pykka.Timeout:
            log.error("node_shutdown_timeout")

    def close(self) -> None:
        """After the hub stopped: its held results, folder and containment let go."""
        if self.hub is not None:
            self.results.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.containment.close()
        os.close(self.run_lock)


def add_containment_arguments(parser: argparse.ArgumentParser) -> None:
    """The worker limits (see contain.py); ``$ACTORS_WORKER_MEMORY`` and
    ``$ACTORS_WORKER_NETWORK=1`` and ``$ACTORS_WORKER_AS_ROOT=1`` set them for nodes started
    by others (a LocalCluster's)."""
    group = parser.add_argument_group("worker containment (Linux)")
    group.add_argument("--worker-memory", type=parse_size,
                       default=os.environ.get("ACTORS_WORKER_MEMORY") or None,
                       help="data (heap) each worker process may allocate, e.g. 2G; beyond it "
                            "the task fails with MemoryError (default: no limit)")
    group.add_argument("--worker-spill", type=parse_size, metavar="SIZE",
                       default=os.environ.get("ACTORS_WORKER_SPILL") or None,
                       help="results each worker holds in memory (kept for other units or the "
                            "driver's reduce) before it writes the rest to its scratch disk "
                            "(default: 60%% of --worker-memory, else of a quarter of the host's)")
    group.add_argument("--worker-pause", type=parse_size, metavar="SIZE",
                       default=os.environ.get("ACTORS_WORKER_PAUSE") or None,
                       help="resident memory past which a worker, once it has written what it "
                            "holds to disk, takes no new work until it falls back (default: 80%% "
                            "of --worker-memory; without a limit, never)")
    group.add_argument("--worker-open-files", type=int, default=contain.DEFAULT_OPEN_FILES,
                       help="open files per worker process")
    group.add_argument("--worker-processes", type=int, default=contain.DEFAULT_PROCESSES,
                       help="processes and threads per worker (with a uid of its own: root)")
    group.add_argument("--worker-network", action="store_true",
                       default=os.environ.get("ACTORS_WORKER_NETWORK") == "1",
                       help="let tasks use the network (by default a worker has a network "
                            "namespace of its own, loopback only)")
    group.add_argument("--worker-uid-base", type=int, default=contain.DEFAULT_UID_BASE,
                       help="a root node runs its workers as uids above this one, and this as "
                            "their group")
    group.add_argument("--worker-as-root", action="store_true",
                       default=os.environ.get("ACTORS_WORKER_AS_ROOT") == "1",
                       help="a root node runs its workers as root, on purpose (a container that "
                            "is itself the isolation): no uid of their own, and no warning "
                            "about it at each start ($ACTORS_WORKER_AS_ROOT=1)")
