"""Command lines: ``python -m actors.master``, ``python -m actors.node``, ``python -m actors keys``.

This is the one place that writes to stdout on purpose: the banner a person
reads to learn where the master is and how to connect to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from pathlib import Path
from typing import Any

import pykka
import structlog

from actors import logs
from actors.addresses import master_address
from actors.cluster import default_keys_dir, local_node_command
from actors.errors import ActorsError, InvalidAddress, MalformedMessage
from actors.shell import ConnectionEvent, Tick, tell_if_alive
from transport import (
    ClientCurve,
    Hub,
    ServerCurve,
    ensure_keys,
    init_keys,
    load_keypair,
    load_public_key,
)
from transport.keys import allowed_dir

log = structlog.get_logger("actors.cli")


def _stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def _master_arg(text: str) -> str:
    """argparse's ``type`` for ``--master``: HOST:PORT or tcp://HOST:PORT, else a usage error."""
    try:
        return master_address(text)
    except InvalidAddress as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _ensure_keys(directory: str) -> None:
    if ensure_keys(directory):
        log.info("keys_created", directory=directory)


# --- master -----------------------------------------------------------------


def master_main(argv: list[str] | None = None, *,
                local_node: subprocess.Popen[bytes] | None = None) -> int:
    """``local_node``: this master's node, already started (``LocalCluster`` starts it at once,
    beside the master, with ``local_node_command``); the master stops it as its own."""
    parser = argparse.ArgumentParser(prog="python -m actors.master",
                                     description="Start a pydra-actors master (and a local node).")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=5555, help="TCP port (0: any free port)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes of the local node (0: no local node)")
    parser.add_argument("--keys", default=None, help="CURVE key directory (created if missing)")
    parser.add_argument("--log-format", default="auto", choices=["auto", "console", "json"])
    parser.add_argument("--node-timeout", type=float, default=5.0,
                        help="seconds of silence after which a node is declared dead")
    parser.add_argument("--max-deaths", type=int, default=3,
                        help="worker deaths a unit may witness before its task fails")
    parser.add_argument("--tasks-dir", default="tasks",
                        help="folder of deployed task packages (default ./tasks)")
    parser.add_argument("--package-grace", type=float, default=300.0,
                        help="seconds an unused old package version is kept (master and local node)")
    parser.add_argument("--cache", default=None, help="the local node's package cache folder")
    parser.add_argument("--ready-file", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-banner", action="store_true",
                        help="do not print where the master listens (for embedding)")
    parser.add_argument("--run", nargs=argparse.REMAINDER, default=None, metavar="SCRIPT ...",
                        help="run this Python script against the cluster, then stop")
    args = parser.parse_args(argv)
    logs.configure(args.log_format)
    keys = args.keys or default_keys_dir()
    try:
        _ensure_keys(keys)
        pair = load_keypair(keys, "master")
        curve = ServerCurve(pair.public, pair.secret, str(allowed_dir(keys)))
    except ActorsError as exc:
        log.error("bad_keys", error=str(exc))
        _stop_local_node(local_node)
        return 2

    from actors import messages as m
    from actors.master import Master, route_frames
    from actors.task_sync import TaskSyncServer

    master_ref: pykka.ActorRef[Any] | None = None
    sync_ref: pykka.ActorRef[Any] | None = None

    started = threading.Event()

    def on_frames(_socket: str, frames: list[bytes]) -> None:
        # A node may say hello as soon as we listen (LocalCluster's node is started beside
        # this master, and connects before it binds): hold it until the actors exist.
        started.wait(10)
        try:
            inbound = route_frames(frames)
        except MalformedMessage as exc:
            log.warning("malformed_frame", peer=frames[0][:40].decode(errors="replace"),
                        error=str(exc))
            return
        is_sync = isinstance(inbound.message, m.ChunkRequest)
        tell_if_alive(sync_ref if is_sync else master_ref, inbound)

    def on_tick(now: float) -> None:
        for ref in (master_ref, sync_ref):
            tell_if_alive(ref, Tick(now))

    hub = Hub(on_frames, on_tick=on_tick, tick_s=0.25)
    hub.add_router("peers", f"tcp://{args.host}:{args.port}", curve=curve)
    try:
        hub.start()
    except Exception as exc:
        log.error("cannot_listen", address=f"tcp://{args.host}:{args.port}", error=str(exc))
        _stop_local_node(local_node)
        return 2
    address = hub.address("peers")
    stop = threading.Event()
    exit_code = [0]

    def crashed() -> None:
        exit_code[0] = 70  # EX_SOFTWARE: the scheduler hit a bug; the log has the traceback
        stop.set()

    master_ref = Master.start(hub, f"master-{uuid.uuid4().hex[:8]}", node_timeout_s=args.node_timeout,
                              max_deaths=args.max_deaths, on_crash=crashed)
    sync_ref = TaskSyncServer.start(hub, os.path.abspath(args.tasks_dir), master_ref,
                                    grace_s=args.package_grace)
    master_ref.tell(("task_sync", sync_ref))
    started.set()
    _stop_on_signals(stop)
    node = local_node
    if node is None and args.workers > 0:
        node = subprocess.Popen(local_node_command(address, args.workers, keys, args.package_grace,
                                                   args.cache), stdin=subprocess.DEVNULL)
    if args.ready_file:
        _write_atomically(args.ready_file, json.dumps({"address": address, "pid": os.getpid()}))
    log.info("master_started", address=address, workers=args.workers, keys=keys,
             tasks_dir=os.path.abspath(args.tasks_dir))
    if not args.no_banner:
        sys.stdout.write(
            f"pydra-actors master listening on {address}\n"
            f"  add a host:  python -m actors.node --master {address} --keys {keys}\n"
            f"  from Python: Client({address!r}, keys={keys!r})\n"
        )
        sys.stdout.flush()
    if args.run:
        _run_script(args.run, address, keys, stop, exit_code)
    stop.wait()
    log.info("master_stopping")
    if node is not None:
        _stop_process(node, grace=10.0)
    pykka.ActorRegistry.stop_all(timeout=5)
    hub.stop()
    if args.ready_file:
        Path(args.ready_file).unlink(missing_ok=True)
    log.info("master_stopped")
    return exit_code[0]


def _stop_local_node(node: subprocess.Popen[bytes] | None) -> None:
    if node is not None:
        _stop_process(node, grace=10.0)


def _run_script(command: list[str], address: str, keys: str, stop: threading.Event,
                exit_code: list[int]) -> None:
    env = dict(os.environ, ACTORS_ADDRESS=address, ACTORS_KEYS=keys)
    proc = subprocess.Popen([sys.executable, *command], env=env, stdin=subprocess.DEVNULL)

    def wait() -> None:
        exit_code[0] = proc.wait()
        log.info("script_finished", script=command[0], exit_code=exit_code[0])
        stop.set()

    threading.Thread(target=wait, name="run-script", daemon=True).start()


def _stop_process(proc: subprocess.Popen[bytes], grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _write_atomically(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


# --- node -------------------------------------------------------------------


def node_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.node",
                                     description="Join a pydra-actors master with this host's workers.")
    parser.add_argument("--master", default=os.environ.get("ACTORS_ADDRESS"),
                        required="ACTORS_ADDRESS" not in os.environ, type=_master_arg,
                        help="the master's address, HOST:PORT or tcp://HOST:PORT")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--keys", default=None, help="CURVE key directory")
    parser.add_argument("--log-format", default="auto", choices=["auto", "console", "json"])
    parser.add_argument("--cache", default=None,
                        help="folder for task package versions (default: a private temporary one)")
    parser.add_argument("--package-grace", type=float, default=300.0,
                        help="seconds an unused old package version stays in the cache")
    parser.add_argument("--no-prefork", action="store_true",
                        help="start every worker as a fresh interpreter (on Linux the first ones "
                             "are forked from the node as it starts: ~200 ms sooner)")
    parser.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logs.configure(args.log_format)
    if args.workers < 1:
        log.error("bad_arguments", error="--workers must be at least 1")
        return 2

    from actors.node import Node, NodeConfig, relay_frames
    from actors.node_data import DataPlane
    from actors.prefork import fork_workers
    from actors.task_sync import TaskSyncClient

    run_dir = tempfile.mkdtemp(prefix="actors-node-")
    node_id = f"node-{os.uname().nodename}-{os.getpid()}"
    config = NodeConfig(node_id, args.workers, f"ipc://{run_dir}/workers.sock", run_dir,
                        exit_with_parent=args.exit_with_parent)
    # Before the keys are read and before any thread starts: see prefork.py.
    forked = [] if args.no_prefork else fork_workers(node_id, run_dir, config.ipc_address,
                                                     args.workers)
    keys = args.keys or default_keys_dir()
    try:
        pair = load_keypair(keys, "node")
        curve = ClientCurve(pair.public, pair.secret, load_public_key(keys, "master"))
    except ActorsError as exc:
        log.error("bad_keys", error=str(exc))
        for child in forked:
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
        shutil.rmtree(run_dir, ignore_errors=True)
        return 2
    node_ref: pykka.ActorRef[Any] | None = None
    sync_ref: pykka.ActorRef[Any] | None = None
    started = threading.Event()

    def on_frames(socket: str, frames: list[bytes]) -> None:
        started.wait(10)
        try:
            assert node_ref is not None and sync_ref is not None
            relay_frames(hub, node_ref, sync_ref, socket, frames, data)
        except MalformedMessage as exc:
            log.warning("malformed_frame", socket=socket, error=str(exc))

    def on_event(socket: str, what: str) -> None:
        tell_if_alive(node_ref, ConnectionEvent(socket, what))

    def on_tick(now: float) -> None:
        for ref in (node_ref, sync_ref):
            tell_if_alive(ref, Tick(now))

    hub = Hub(on_frames, on_event=on_event, on_tick=on_tick, tick_s=0.25)
    hub.add_dealer("master", args.master, identity=node_id.encode(), curve=curve, monitor=True)
    hub.add_router("workers", config.ipc_address)
    data = DataPlane(node_id, pair, run_dir, args.master)
    data.add_to(hub, os.path.join(keys, "node.key"))
    try:
        hub.start()
    except Exception as exc:
        log.error("cannot_connect", master=args.master, error=str(exc))
        for child in forked:
            os.kill(child.pid, signal.SIGKILL)
            os.waitpid(child.pid, 0)
        shutil.rmtree(run_dir, ignore_errors=True)
        return 2
    data.bound(hub)
    config.data_address = data.address
    stop = threading.Event()
    fatal: list[str] = []
    _stop_on_signals(stop)

    def on_fatal(reason: str) -> None:
        fatal.append(reason)
        stop.set()

    sync_ref = TaskSyncClient.start(hub, os.path.abspath(args.cache or os.path.join(run_dir, "cache")),
                                    grace_s=args.package_grace)
    node_ref = Node.start(hub, config, on_fatal, sync_ref, forked)
    started.set()
    stop.wait()
    try:
        node_ref.ask(("shutdown",), timeout=15)
    except pykka.Timeout:
        log.error("node_shutdown_timeout")
    pykka.ActorRegistry.stop_all(timeout=5)
    hub.stop()  # sends what the actors handed over before it, the last Bye included
    shutil.rmtree(run_dir, ignore_errors=True)
    if fatal:
        log.error("node_exiting", reason=fatal[0])
        return 1
    return 0


# --- python -m actors ... ---------------------------------------------------


def actors_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors", description="pydra-actors tools")
    sub = parser.add_subparsers(dest="command", required=True)
    keys = sub.add_parser("keys", help="CURVE keys").add_subparsers(dest="keys_command", required=True)
    init = keys.add_parser("init", help="create master, node and client key pairs and the allow-list")
    init.add_argument("directory")
    init.add_argument("--overwrite", action="store_true")
    packages = sub.add_parser("packages", help="list the master's deployed task packages")
    packages.add_argument("--master", default=os.environ.get("ACTORS_ADDRESS"),
                          required="ACTORS_ADDRESS" not in os.environ, type=_master_arg,
                          help="the master's address, HOST:PORT or tcp://HOST:PORT")
    packages.add_argument("--keys", default=None, help="CURVE key directory")
    args = parser.parse_args(argv)
    if args.command == "packages":
        return _print_packages(args.master, args.keys or default_keys_dir())
    if args.command == "keys" and args.keys_command == "init":
        try:
            root = init_keys(args.directory, overwrite=args.overwrite)
        except ActorsError as exc:
            sys.stderr.write(f"error: {exc}\n")
            return 2
        sys.stdout.write(
            f"created CURVE keys in {root}\n"
            f"  master: {root}/master.key_secret (keep it on the master host)\n"
            f"  nodes and clients: copy {root}/master.key and their own *.key_secret\n"
            f"  allow-list: {root}/allowed/ (public keys the master admits)\n"
        )
    return 0


def _print_packages(address: str, keys: str) -> int:
    from actors.client import Client

    logs.configure("auto", "WARNING")
    try:
        with Client(address, keys=keys) as client:
            listing = client.packages()
    except ActorsError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    if not listing:
        sys.stdout.write("no packages deployed\n")
    for package in listing:
        sys.stdout.write(f"{package.package}  version {package.version}\n")
        for task in package.tasks:
            params = ", ".join(task.parameters) if task.parameters is not None else "..."
            sys.stdout.write(f"  {task.name}({params})  [{task.kind}]  {task.doc}\n")
        for module, error in package.broken:
            sys.stdout.write(f"  BROKEN {module}: {error}\n")
    return 0
