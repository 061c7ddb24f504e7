"""The Node actor: owns this host's worker processes and relays for them.

Workers are started blank (no user code; the first ones forked as the node
starts, see ``prefork.py``) and announced to the master, which
assigns each to one task instance at a time. A worker process that exits is
seen at once (a reaper thread blocks in ``wait4`` and tells this actor),
reported with its exit code or signal and peak memory, and replaced by a
fresh one. Frames between workers and the master are relayed on the hub
thread without being decoded (see ``relay_frames``): the node never touches
task payloads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import pykka
import structlog

from actors import __version__, logs
from actors import messages as m
from actors.cluster import default_keys_dir
from actors.errors import ActorsError, MalformedMessage
from actors.launch import master_arg, stop_on_signals
from actors.node_data import DataPlane
from actors.prefork import Forked, fork_workers, worker_args, worker_env
from actors.shell import ConnectionEvent, Inbound, Shell, Tick, tell_if_alive
from actors.task_sync import TaskSyncClient, WorkerGone
from transport import ClientCurve, Hub, load_keypair, load_public_key

log = structlog.get_logger("actors.node")

MASTER = "master"
WORKERS = "workers"
KILL_GRACE_S = 2.0
HELLO_RETRY_S = 2.0
MAX_FAILED_STARTS = 5


@dataclass(frozen=True)
class ProcessExited:
    worker_id: str
    pid: int
    status: int
    maxrss_kb: int


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


@dataclass
class NodeConfig:
    node_id: str
    slots: int
    ipc_address: str
    run_dir: str
    exit_with_parent: bool = False
    data_address: str = ""
    parent_pid: int = field(default_factory=os.getppid)


class Node(Shell):
    def __init__(self, hub: Hub, config: NodeConfig, on_fatal: Any = None,
                 task_sync: pykka.ActorRef[Any] | None = None,
                 forked: list[Forked] | None = None) -> None:
        super().__init__(hub)
        self.forked = forked or []
        self.task_sync = task_sync
        self.config = config
        self.workers: dict[str, WorkerProcess] = {}
        self.welcomed = False
        self.stopping = False
        self.now = 0.0
        self.last_hello = -HELLO_RETRY_S
        self.last_heartbeat = 0.0
        self.heartbeat_s = 1.0
        self._seq = 0
        self._failed_starts = 0  # workers in a row that died before saying hello
        self._on_fatal = on_fatal
        self.log = log.bind(role="node", node_id=config.node_id)

    def on_start(self) -> None:
        super().on_start()
        for child in self.forked:
            self._seq += 1
            self._adopt(WorkerProcess(child.worker_id, child.pid, child.scratch))
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
                self.welcomed = True
                self.heartbeat_s = heartbeat_s
                self.log.info("joined_master", workers=len(self.workers))
                for worker in self.workers.values():
                    if worker.ready and not worker.expected_exit:
                        self._announce(worker)
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

        Either way it has requeued whatever our workers run, and it will not take their results
        (they would arrive for runs it gave to other workers). Start afresh: new worker processes,
        a new introduction. Execution stays at-least-once; no result is recorded twice."""
        self.log.warning("master_forgot_node", workers=len(self.workers))
        self.welcomed = False
        for worker_id in list(self.workers):
            self._kill(worker_id, "the master forgot this node")
        self._hello()

    def _from_worker(self, worker_id: str, msg: m.Message) -> None:
        worker = self.workers.get(worker_id)
        if worker is None:
            if not self.stopping:  # a worker's last words while we stop are expected
                self.log.warning("message_from_unknown_worker", worker_id=worker_id)
            return
        match msg:
            case m.Hello(role="worker", protocol=m.PROTOCOL_VERSION, pid=pid):
                worker.ready = True
                self._failed_starts = 0
                self.log.debug("worker_up", worker_id=worker_id, pid=pid)
                self.send(WORKERS, worker_id.encode(), message=m.Welcome("", worker_id, 0.0))
                if self.welcomed:
                    self._announce(worker)
            case _:
                self.log.warning("unexpected_message", worker_id=worker_id, type=type(msg).__name__)

    def _tick(self, now: float) -> None:
        self.now = now
        if self.config.exit_with_parent and os.getppid() != self.config.parent_pid:
            self.log.warning("parent_gone", parent_pid=self.config.parent_pid)
            self._fatal("the process that started this node is gone")
            return
        if not self.welcomed and now - self.last_hello >= HELLO_RETRY_S:
            self._hello()
        if self.welcomed and now - self.last_heartbeat >= self.heartbeat_s:
            self.last_heartbeat = now
            self.send(MASTER, message=m.Heartbeat())
        for worker in list(self.workers.values()):
            if worker.kill_deadline is not None and now >= worker.kill_deadline:
                self.log.warning("worker_kill_escalated", worker_id=worker.worker_id)
                _signal_group(worker.pid, signal.SIGKILL)
                worker.kill_deadline = None

    def _connection(self, what: str) -> None:
        if what == "auth_failed":
            self.log.error("master_refused_key", hint="is this node's public key in the master's allowed/ folder?")
            self._fatal("the master refused this node's CURVE key")
        elif what == "disconnected" and self.welcomed:
            self.log.warning("master_disconnected")

    # --- workers ------------------------------------------------------------

    def _spawn(self) -> None:
        self._seq += 1
        worker_id = f"{self.config.node_id}/w{self._seq}"
        scratch = tempfile.mkdtemp(prefix=f"w{self._seq}-", dir=self.config.run_dir)
        proc = subprocess.Popen(
            [sys.executable, "-m", "actors.worker", *worker_args(self.config.ipc_address, worker_id)],
            cwd=scratch, env=worker_env(scratch), stdin=subprocess.DEVNULL, start_new_session=True,
        )
        self._adopt(WorkerProcess(worker_id, proc.pid, scratch, proc))

    def _adopt(self, worker: WorkerProcess) -> None:
        worker.reaper = threading.Thread(target=_reap, args=(self.actor_ref, worker),
                                         name=f"reaper-{worker.pid}", daemon=True)
        worker.reaper.start()
        self.workers[worker.worker_id] = worker
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
        _signal_group(worker.pid, signal.SIGTERM)

    def _exited(self, event: ProcessExited) -> None:
        worker = self.workers.pop(event.worker_id, None)
        if worker is None:
            return
        shutil.rmtree(worker.scratch, ignore_errors=True)
        _signal_group(event.pid, signal.SIGKILL)  # anything the task left in its group
        if self.task_sync is not None:
            self.task_sync.tell(WorkerGone(event.worker_id))
        exitcode = os.waitstatus_to_exitcode(event.status)
        died = m.WorkerExited(
            event.worker_id, event.pid,
            exitcode if exitcode >= 0 else None, -exitcode if exitcode < 0 else None,
            event.maxrss_kb, worker.expected_exit or self.stopping,
        )
        (self.log.info if died.expected else self.log.warning)(
            "worker_exited", worker_id=event.worker_id, pid=event.pid, exitcode=died.exitcode,
            signal=died.signal, maxrss_kb=event.maxrss_kb)
        if self.welcomed and worker.ready:
            self.send(MASTER, message=died)
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
        self.last_hello = self.now
        self.send(MASTER, message=m.Hello(
            "node", self.config.node_id, m.PROTOCOL_VERSION, __version__,
            host=os.uname().nodename, pid=os.getpid(), slots=self.config.slots,
            data_address=self.config.data_address))

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
        self.log.info("node_stopped", workers=len(self.workers))
        self.workers.clear()


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


_FOR_TASK_SYNC = (m.ChunkReply, m.UnknownVersion, m.NewestVersions, m.NeedVersion)


def relay_frames(hub: Hub, node: pykka.ActorRef[Any], task_sync: pykka.ActorRef[Any],
                 socket: str, frames: list[bytes], data: DataPlane | None = None) -> None:
    """Route what the node's sockets receive (runs on the hub thread).

    master -> ``[body]`` is for the node; ``[worker, body]`` is relayed as is.
    worker -> ``[worker, b"m", body]`` is relayed to the master as ``[worker, body]``;
    ``[worker, b"n", body]`` is for the node; data frames go to the data plane.
    """
    if data is not None and socket != MASTER and socket != WORKERS:
        data.from_network(hub, socket, frames)
        return
    if socket == MASTER:
        if len(frames) == 1:
            msg = m.decode(frames[0])
            tell_if_alive(task_sync if isinstance(msg, _FOR_TASK_SYNC) else node,
                          Inbound(b"", None, msg))
        elif len(frames) == 2:
            hub.relay(WORKERS, frames)
        else:
            log.warning("malformed_frames", source="master", count=len(frames))
        return
    if len(frames) == 3 and frames[1] == b"m":
        hub.relay(MASTER, [frames[0], frames[2]])
    elif data is not None and len(frames) == 5 and data.from_worker(hub, frames[0], frames[1:]):
        pass
    elif len(frames) == 3 and frames[1] == b"n":
        msg = m.decode(frames[2])
        tell_if_alive(task_sync if isinstance(msg, _FOR_TASK_SYNC) else node,
                      Inbound(frames[0], None, msg))
    else:
        log.warning("malformed_frames", source="worker", count=len(frames))



# --- the command line: python -m actors.node --------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actors.node",
                                     description="Join a pydra-actors master with this host's workers.")
    parser.add_argument("--master", default=os.environ.get("ACTORS_ADDRESS"),
                        required="ACTORS_ADDRESS" not in os.environ, type=master_arg,
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
                             "are forked from the node as it starts, which answers sooner)")
    parser.add_argument("--exit-with-parent", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logs.configure(args.log_format)
    if args.workers < 1:
        log.error("bad_arguments", error="--workers must be at least 1")
        return 2

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
        # A refused key is known within milliseconds of the hub's start, before the Node
        # actor exists: wait for it, as on_frames does, or the refusal is lost.
        started.wait(10)
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
    stop_on_signals(stop)

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


if __name__ == "__main__":
    raise SystemExit(main())

