"""The master's process: its command line (``python -m actors.master``), the socket it
listens on, its state directory and journal, the Master and TaskSync actors, its local node
(inside this process, on the same hub: node_parts.py; or a process of its own, started again
when it dies), its metrics and dashboard servers, and its stop.

The Master actor itself (``master_actor.py``) knows none of this: it is given a hub, a journal and
what the journal restored.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pykka
import structlog

from actors import logs
from actors import messages as m
from actors.contain import make_run_dir, remove_stale_run_dirs
from actors.dashboard import Dashboard, parse_address
from actors.errors import (
    ActorsError,
    InvalidAddress,
    JournalUnreadable,
    MalformedMessage,
    StateDirLocked,
)
from actors.forking import ChildProcess, exit_now
from actors.launch import (
    EXIT_NOTE_OPTION,
    NotingParser,
    claim_socket_path,
    default_keys_dir,
    ensure_keys_logged,
    exit_note_of,
    local_endpoint,
    local_node_command,
    parent_pid,
    refuse,
    run_noting_exit,
    run_script,
    stop_on_signals,
    stop_process,
    stop_script,
    take_exit_note,
    watch_parent,
    with_parent_pid,
    write_atomically,
)
from actors.master_actor import (
    CLIENT_TIMEOUT_S,
    MAX_KEY_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_QUEUED,
    MESSAGE_SLACK,
    MIN_MESSAGE_BYTES,
    Master,
)
from actors.metrics import MetricsServer
from actors.node_parts import NodeParts, node_parser, settle
from actors.shell import Inbound, PeerDisconnected, Tick, direct_to, tell_if_alive
from actors.state_dir import StateDir, default_state_dir
from actors.task_sync import TaskSyncServer
from transport import Hub, ServerCurve, load_keypair
from transport.keys import allowed_dir

log = structlog.get_logger("actors.master")

PEERS = "peers"  # the master's one ROUTER: nodes and clients
NODE_WATCH_S = 0.5  # how often the command line looks at its local node
NODE_RESTARTS, NODE_RESTART_WINDOW_S = 5, 60.0  # a local node that dies more often stays dead
# A script of --run still running when the master is stopped by a signal: told the same
# signal, and killed if it has not ended this long after.
SCRIPT_GRACE_S = 10.0
EX_SUPERSEDED = 75
GC_YOUNG = 10_000  # container allocations between the collector's walks of young objects


def route_frames(frames: list[bytes]) -> Inbound:
    """Decode a frame list received on the master's ROUTER (runs on the hub thread): the
    sender's key (the hub's, see transport/hub.py), its routing id, a worker's id when a node
    relays for it, the message."""
    if len(frames) == 3:
        return Inbound(frames[1], None, m.decode(frames[2]), frames[0])
    if len(frames) == 4:
        return Inbound(frames[1], frames[2], m.decode(frames[3]), frames[0])
    raise MalformedMessage(f"expected 3 or 4 frames, got {len(frames)}", sum(map(len, frames)))


def message_bound(mib: int) -> int:
    """``--max-message`` in bytes: 0 for no bound, else never below what the runtime's own
    reports take."""
    if mib <= 0:
        return 0
    if mib << 20 < MIN_MESSAGE_BYTES:
        log.warning("max_message_raised", asked_mib=mib, mib=MIN_MESSAGE_BYTES >> 20,
                    why="workers report up to 16 MiB of a run's results in one message")
    return max(mib << 20, MIN_MESSAGE_BYTES)


# --- the command line: python -m actors.master ------------------------------


def main(argv: list[str] | None = None, *,
                local_node: ChildProcess | None = None) -> int:
    """``local_node``: this master's node, already started (``LocalCluster`` starts it at once,
    beside the master, with ``local_node_command``); the master stops it as its own. Given
    ``--exit-note PATH`` (a LocalCluster's), it writes there why it failed to start."""
    return run_noting_exit(functools.partial(_main, local_node=local_node), argv)


def _main(argv: list[str], refused: list[str], *, local_node: ChildProcess | None) -> int:
    parent = parent_pid()  # whose end ends this master (--exit-with-parent): first of all
    parser = NotingParser(refused, prog="python -m actors.master",
                          description="Start a pydra-actors master (and a local node).")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1: this host only)")
    parser.add_argument("--port", type=int, default=5555,
                        help="TCP port (default 5555; 0: any free port)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes of the local node (default: one a CPU; 0: no "
                             "local node)")
    parser.add_argument("--local-node", choices=("inside", "process"),
                        default=os.environ.get("ACTORS_LOCAL_NODE") or "inside",
                        help="where the local node runs: inside this process, on its hub (the "
                             "default: a task's messages cross no socket between master and "
                             "node), or as a process of its own, started again when it dies "
                             "($ACTORS_LOCAL_NODE)")
    parser.add_argument("--keys", default=None,
                        help="CURVE key directory, created if missing (default: "
                             "~/.pydra-actors/keys, or $ACTORS_KEYS)")
    logs.add_arguments(parser)
    parser.add_argument("--node-timeout", type=float, default=5.0,
                        help="seconds of silence after which a node is declared dead")
    parser.add_argument("--max-deaths", type=int, default=3,
                        help="worker deaths a unit may witness before its task fails")
    parser.add_argument("--restart-after-error", action="store_true",
                        help="replace a worker whose task raised (by default it stays, warm, "
                             "unless the error was fatal: SystemExit, MemoryError, ...)")
    parser.add_argument("--tasks-dir", default="tasks",
                        help="folder of deployed task packages (default ./tasks)")
    parser.add_argument("--package-grace", type=float, default=300.0,
                        help="seconds an unused old package version is kept (master and local node)")
    parser.add_argument("--cache", default=None, help="the local node's package cache folder")
    parser.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local-socket", default=None, metavar="PATH",
                        help="also listen on this Unix socket (ipc://PATH), for the local node and "
                             "clients on this host: keys are proved as on TCP, each message costs "
                             "less (default: one in the master's own folder for the node it "
                             "starts; 'off': none)")
    parser.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(EXIT_NOTE_OPTION, default="", help=argparse.SUPPRESS)
    parser.add_argument("--no-banner", action="store_true",
                        help="do not print where the master listens (for embedding)")
    parser.add_argument("--state-dir", default=None,
                        help="where the master keeps its journal, so that a restart loses no "
                             "task (default: ~/.local/state/pydra-actors/master-HOST-PORT; with "
                             "--port 0, a temporary folder: nothing survives the master)")
    parser.add_argument("--client-timeout", type=float, default=CLIENT_TIMEOUT_S,
                        metavar="SECONDS",
                        help="a client silent this long is taken as gone and its tasks are "
                             "cancelled (clients send a heartbeat every 2 s; 0: never)")
    parser.add_argument("--max-queued", type=int, default=MAX_QUEUED, metavar="N",
                        help="tasks one key (all its clients) may have queued; a submission past "
                             "it fails at once with QueueFull (0: no limit)")
    parser.add_argument("--max-key-memory", type=int, default=MAX_KEY_BYTES >> 20, metavar="MiB",
                        help="what one key's tasks may make the master hold: their arguments "
                             "until they end, and the small results and inline scattered data "
                             "kept while their futures are held; past it a submission fails "
                             "at once with MemoryBudgetFull (0: no limit; default %(default)s)")
    parser.add_argument("--max-message", type=int, default=MAX_MESSAGE_BYTES >> 20, metavar="MiB",
                        help="the largest message the master reads: a peer that sends a larger "
                             "one is cut off unread, and clients refuse to send one "
                             f"(MessageTooLarge); at least {MIN_MESSAGE_BYTES >> 20}; 0: no limit "
                             "(default %(default)s)")
    parser.add_argument("--metrics", default=None, metavar="HOST:PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (port 0: a "
                             "free one; off by default)")
    parser.add_argument("--dashboard", default="127.0.0.1:0", metavar="HOST:PORT",
                        help="serve the live dashboard page at http://HOST:PORT/ (default "
                             "127.0.0.1 on a free port; its URL, with its access token, is "
                             "printed at start; 'off': no page)")
    parser.add_argument("--ephemeral", action="store_true",
                        help="keep the journal in a temporary folder, never synced: nothing "
                             "survives the master (the default with --port 0)")
    parser.add_argument("--fresh", action="store_true",
                        help="set the state directory's journal aside (renamed) and start empty")
    parser.add_argument("--take-over", action="store_true",
                        help="start on a state directory another master holds (one that is hung "
                             "or paused: it stops when it wakes)")
    parser.add_argument("--run", nargs=argparse.REMAINDER, default=None, metavar="SCRIPT ...",
                        help="run this Python script against the cluster, then stop with its "
                             "exit code (stopped by SIGINT or SIGTERM, the script is told the "
                             "same and the code is 128 + the signal's number)")
    args = parser.parse_args(argv)
    logs.configure(args.log_format, args.log_level)
    # Before the keys are read and before any thread starts (its workers are forked now).
    inside: NodeParts | None = None
    if local_node is None and args.workers > 0 and args.local_node == "inside":
        inside = _node_inside(args, refused)
        if inside is None:
            return 2
    keys = args.keys or default_keys_dir()
    try:
        ensure_keys_logged(keys)
        pair = load_keypair(keys, "master")
        curve = ServerCurve(pair.public, pair.secret, str(allowed_dir(keys)))
        if inside is not None:
            inside.load_keys(keys, master_key=False)
    except ActorsError as exc:
        refuse(refused, "bad_keys", str(exc))
        _stop_local_node(local_node, inside)
        return 2

    remove_stale_run_dirs("actors-master-")  # left by masters killed with kill -9
    temporary = args.ephemeral or (args.state_dir is None and args.port == 0)
    state_path = (make_run_dir("actors-master-") if temporary else
                  (args.state_dir or str(default_state_dir(args.host, args.port)), -1))
    try:
        state = StateDir(state_path[0], take_over=args.take_over)
    except StateDirLocked as exc:
        refuse(refused, "bad_state_dir", str(exc))
        _stop_local_node(local_node, inside)
        return 2

    master_ref: pykka.ActorRef[Any] | None = None
    sync_ref: pykka.ActorRef[Any] | None = None
    to_master = direct_to(None)  # (once the actor is there: its deliver_now, for lone messages)

    started = threading.Event()
    ready: list[bool] = []  # [True] once it is set: read per frame (Event.is_set is a call)

    def decoded(frames: list[bytes]) -> Inbound | None:
        # A node may say hello as soon as we listen (LocalCluster's node is started beside
        # this master, and connects before it binds): hold it until the actors exist.
        if not ready:  # (Event.wait takes a lock even when set)
            started.wait(10)
        try:
            return route_frames(frames)
        except MalformedMessage as exc:
            log.warning("malformed_frame", peer=frames[1][:40].decode(errors="replace")
                        if len(frames) > 1 else "", error=str(exc))
            return None

    def on_frames(socket: str, frames: list[bytes]) -> None:
        if socket != PEERS and inside is not None:
            inside.on_frames(socket, frames)
            return
        if (inbound := decoded(frames)) is not None and not (hub.lone() and to_master(inbound)):
            tell_if_alive(master_ref, inbound)  # chunk requests too: only nodes may ask

    def on_batch(socket: str, batch: list[list[bytes]]) -> None:
        if socket != PEERS and inside is not None:
            for frames in batch:
                inside.on_frames(socket, frames)
            return
        inbounds = [inbound for frames in batch if (inbound := decoded(frames)) is not None]
        tell_if_alive(master_ref, inbounds)  # one hand-off for the lot (each handled alone)

    def on_tick(now: float) -> None:
        for ref in (master_ref, sync_ref):
            tell_if_alive(ref, Tick(now))
        if inside is not None:
            inside.on_tick(now)

    def on_peer_gone(socket: str, routing: bytes) -> None:
        if socket == PEERS:
            tell_if_alive(master_ref, PeerDisconnected(routing))

    hub = Hub(on_frames, on_peer_gone=on_peer_gone, on_tick=on_tick, tick_s=0.25,
              on_batch=on_batch, on_event=inside.on_event if inside is not None else None)
    max_message = message_bound(args.max_message)
    local = local_endpoint(args.local_socket, state_path[0],
                           starts_node=local_node is None and args.workers > 0)
    if local and (taken := claim_socket_path(local.removeprefix("ipc://"))):
        log.warning("local_socket_refused", path=local, reason=taken,
                    hint="peers on this host connect by TCP")
        local = ""
    hub.add_router(PEERS, f"tcp://{args.host}:{args.port}", curve=curve, with_keys=True,
                   max_message=max_message + MESSAGE_SLACK if max_message else -1,
                   also_bind=local)
    if inside is not None:
        try:
            inside.add_to(hub, within=PEERS)
        except ValueError as exc:
            refuse(refused, "bad_data_address", str(exc))
            _stop_local_node(local_node, inside)
            _close_state(state, state_path, temporary)
            return 2
    try:
        with inside.sockets_made() if inside is not None else contextlib.nullcontext():
            hub.start()
    except Exception as exc:
        refuse(refused, "cannot_listen", f"tcp://{args.host}:{args.port}: {exc}", local=local)
        _stop_local_node(local_node, inside)
        _close_state(state, state_path, temporary)
        return 2
    address = hub.address(PEERS)
    local = hub.also_bound(PEERS)  # "" if its folder takes no Unix socket: TCP for all
    stop = threading.Event()
    exit_code = [0]

    if args.exit_with_parent:
        watch_parent(stop, parent)

    def crashed() -> None:
        exit_code[0] = 70  # EX_SOFTWARE: the scheduler hit a bug; the log has the traceback
        stop.set()

    def superseded() -> None:
        exit_code[0] = EX_SUPERSEDED
        stop.set()

    metrics: MetricsServer | None = None
    if args.metrics:
        try:
            host, _, port = args.metrics.rpartition(":")
            metrics = MetricsServer(host or "127.0.0.1", int(port))
        except (ActorsError, OSError, ValueError) as exc:
            refuse(refused, "cannot_serve_metrics", f"{args.metrics}: {exc}")
            hub.stop()
            _stop_local_node(local_node, inside)
            _close_state(state, state_path, temporary)
            return 2
    dashboard: Dashboard | None = None
    if args.dashboard != "off":
        try:
            dashboard = Dashboard(*parse_address(args.dashboard))
        except (InvalidAddress, OSError) as exc:
            refuse(refused, "cannot_serve_dashboard", f"{args.dashboard}: {exc}")
            hub.stop()
            if metrics is not None:
                metrics.close()
            _stop_local_node(local_node, inside)
            _close_state(state, state_path, temporary)
            return 2
        if dashboard.url.split("/")[2].rpartition(":")[0] not in ("127.0.0.1", "localhost",
                                                                  "[::1]"):
            log.warning("dashboard_not_local", port=dashboard.port,
                        hint="anyone who can reach this port and has the token sees every "
                             "task, its story and its output (plain HTTP, no TLS)")
    try:
        # Only once listening (its peers' socket, the metrics', the dashboard's): a master that
        # cannot (a port taken, most often by the master whose state directory it would take
        # over) changes nothing of the journal.
        journal = state.open(fresh=args.fresh, durable=not temporary)
        restored = journal.start(f"master-{uuid.uuid4().hex[:8]}")
        state.write_holder(address)
    except JournalUnreadable as exc:
        refuse(refused, "bad_state_dir", str(exc))
        hub.stop()
        for server in (metrics, dashboard):
            if server is not None:
                server.close()
        _stop_local_node(local_node, inside)
        _close_state(state, state_path, temporary)
        return 2
    master_ref = Master.start(hub, journal, restored, node_timeout_s=args.node_timeout,
                              max_deaths=args.max_deaths,
                              restart_after_error=args.restart_after_error,
                              allowed=curve.allowed_dir, on_crash=crashed,
                              on_superseded=superseded, metrics=metrics,
                              dashboard=dashboard, address=address,
                              client_timeout_s=max(0.0, args.client_timeout),
                              max_queued=max(0, args.max_queued),
                              max_key_bytes=max(0, args.max_key_memory) << 20,
                              max_message=max_message)
    sync_ref = TaskSyncServer.start(hub, os.path.abspath(args.tasks_dir), master_ref,
                                    grace_s=args.package_grace)
    master_ref.tell(("task_sync", sync_ref))
    to_master = direct_to(master_ref)
    _tune_gc()
    started.set()
    ready.append(True)
    received: list[int] = []
    stop_on_signals(stop, received)
    if inside is not None:
        inside.config.master = address
        inside.bound(hub)

        def local_node_failed(reason: str) -> None:  # (its actor crashed: a bug, logged)
            log.error("local_node_failed", reason=reason)
            tell_if_alive(master_ref, ("local_node_failed", reason))

        inside.start(hub, local_node_failed)
    node: ChildProcess | None = local_node
    if node is None and args.workers > 0 and inside is None:
        node = subprocess.Popen(local_node_command(
            address, args.workers, keys, args.package_grace, args.cache, local=local,
            exit_note=os.path.join(state_path[0], "local-node.exit")),
            stdin=subprocess.DEVNULL, env=with_parent_pid())
    if args.ready_file:
        write_atomically(args.ready_file, json.dumps({
            "address": address, "local_address": local, "pid": os.getpid(),
            "dashboard": dashboard.url if dashboard is not None else ""}))
    log.info("master_started", address=address, workers=args.workers, keys=keys,
             tasks_dir=os.path.abspath(args.tasks_dir), epoch=journal.epoch,
             state_dir="" if temporary else str(state.path))
    if not args.no_banner:
        sys.stdout.write(
            f"pydra-actors master listening on {address}\n"
            f"  add a host:  python -m actors.node --master {address} --keys {keys}\n"
            f"  from Python: Client({address!r}, keys={keys!r})\n"
            + (f"  metrics:     {metrics.url}\n" if metrics is not None else "")
            + (f"  dashboard:   {dashboard.url}\n" if dashboard is not None else "")
        )
        sys.stdout.flush()
    script = run_script(args.run, address, keys, stop, exit_code, max(0, args.workers)) \
        if args.run else None
    if script is not None and inside is not None:
        inside.config.own_children.add(script.pid)  # (not a task's orphan: see Node)
    restarts: list[float] = []
    while not stop.wait(NODE_WATCH_S):
        if node is not None and node.poll() is not None:
            node, reason = _restart_local_node(node, restarts)
            if node is None:
                tell_if_alive(master_ref, ("local_node_failed", reason))
        if not state.locked and state.relock():  # taken over: the old master is gone now
            state.write_holder(address)
    log.info("master_stopping")
    if received and script is not None:  # stopped by a signal: its script is told the same
        stop_script(script, received[0], SCRIPT_GRACE_S)
    if node is not None:
        stop_process(node, grace=10.0)
    if inside is not None:
        inside.shutdown()
    pykka.ActorRegistry.stop_all(timeout=5)
    hub.stop()
    if inside is not None:
        inside.close()
    if local:  # (ZeroMQ leaves the file: the next master would take it for another's)
        with contextlib.suppress(OSError):
            os.unlink(local.removeprefix("ipc://"))
    if metrics is not None:
        metrics.close()
    if dashboard is not None:
        dashboard.close()
    _close_state(state, state_path, temporary)
    if args.ready_file:
        Path(args.ready_file).unlink(missing_ok=True)
    log.info("master_stopped")
    # A job (--run) stopped by a signal ends as a shell says it: 128 + its number; a master
    # alone stops cleanly (0) when it is told to.
    return 128 + received[0] if received and script is not None else exit_code[0]


def _tune_gc() -> None:
    """The cyclic collector, set for a master: its start-up state (modules, classes, the
    actors) is never garbage, so out of the collector's walks (``gc.freeze``); and it walks its
    young objects every ``GC_YOUNG`` allocations of containers rather than Python's 700. The
    master makes ~30 a task, almost none in a cycle: at 700 it collected every ~25 tasks and
    moved the records of tasks still queued into the older generations, whose walks took ~12 %
    of its CPU on many small tasks (``bench/README.md``)."""
    gc.freeze()
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])


def _restart_local_node(node: ChildProcess,
                        restarts: list[float]) -> tuple[ChildProcess | None, str]:
    """The local node died (killed, crashed): start another, unless it refused its arguments
    or keys (exit code 2: it would again) or keeps dying. Returns the new node, else None and
    why not, in words for the clients waiting for its workers."""
    now = time.monotonic()
    said = take_exit_note(exit_note_of(node.args)) or f"exit code {node.returncode}"
    restarts[:] = [t for t in restarts if now - t < NODE_RESTART_WINDOW_S]
    if node.returncode == 2:
        reason = f"it refused to start ({said})"
    elif len(restarts) >= NODE_RESTARTS:
        reason = (f"it ended {len(restarts) + 1} times within {NODE_RESTART_WINDOW_S:.0f}s, "
                  f"the last with {said}")
    else:
        restarts.append(now)
        log.warning("local_node_restarted", exitcode=node.returncode, pid=node.pid, said=said)
        return subprocess.Popen(node.args, stdin=subprocess.DEVNULL, env=with_parent_pid()), ""
    log.error("local_node_not_restarted", exitcode=node.returncode, reason=reason)
    return None, reason


def _close_state(state: StateDir, path: tuple[str, int], temporary: bool) -> None:
    state.close()
    if temporary:  # --port 0 and no --state-dir: the journal dies with its master
        shutil.rmtree(path[0], ignore_errors=True)
        os.close(path[1])


def _stop_local_node(node: ChildProcess | None, inside: NodeParts | None = None) -> None:
    """A master that does not start: its local node stopped (a process) or given up (inside)."""
    if node is not None:
        stop_process(node, grace=10.0)
    if inside is not None:
        inside.give_up()


def _node_inside(args: argparse.Namespace, refused: list[str]) -> NodeParts | None:
    """The local node's parts, to run inside this process (``--local-node inside``), made
    before the master reads its keys or starts a thread; None (said in ``refused``) where its
    options cannot run. Its options come from the master's and the environment, as a local
    node process takes them (``local_node_command``)."""
    node_args = node_parser(refused, standalone=False).parse_args([
        "--workers", str(args.workers), "--package-grace", str(args.package_grace),
        *(["--cache", args.cache] if args.cache else [])])
    if not settle(node_args, refused):
        return None
    return NodeParts(node_args, None, f"tcp://{args.host}:{args.port}")


if __name__ == "__main__":
    exit_now(main())
