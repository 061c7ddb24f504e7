"""``python -m bench.simulate``: the master alone at scale, with simulated nodes and workers.

Real scaling needs more cores than a small machine has, so this measures the master itself
(issue 20): a real ``python -m actors.master`` process, real sockets (ZeroMQ over CURVE), a real
``Client`` submitting the work, and *simulated* nodes and workers in its place of real ones:
``--sim-procs`` processes, each one thread polling many node DEALERs. Every node speaks the real
protocol with the node key (``Hello``, ``Heartbeat``, ``WorkerReady``, ``WorkerStats``, worker
messages relayed as ``[worker id, body]``, batched as ``transport/hub.py`` batches them), and
each simulated worker answers as a real one does, without running user code:

- a plain ``Task`` (``AssignTask``, kind ``task``): ``TaskResult`` with its argument as result;
- a ``ParallelTask``'s driver slices ``n`` units itself (``UnitsSliced`` of ``SLICE_BATCH``, at
  most ``LOOKAHEAD`` sliced and not finished, as ``task_host.Runtime`` does; in packs of as many
  as the master says, ``DriverResults.pack``), counts what the master forwards
  (``DriverResults``) and ends the task with that count (``TaskResult``);
- every worker of the task answers ``RunUnits`` with ``UnitsDone`` (small inline results, a
  pack's a list of them, the unit's digest), and a ``StealUnits`` as a worker whose run already
  began (or, with
  ``--unit-seconds``, gives back a run not begun), and a ``TakeBackTask`` likewise (a plain
  Task queued on it, not begun, is given back).

Answers leave at once (``--unit-seconds 0``, the default), or after the set duration: one run
or task at a time per worker, as on a real worker's one executor thread.

For each configuration (``--configs W:N,...``: W workers on N nodes) a fresh master is measured:
its RSS with no node and with the W workers joined (memory per idle worker), its CPU while idle
(heartbeat load), one ParallelTask of ``--units`` units (units/s, master CPU per unit),
``--tasks`` plain Tasks by ``client.map`` (tasks/s, master CPU per task), and ``--queued``
tasks submitted while every simulated worker holds its answers (master RSS per queued task).
Every count is checked, and the master's log must hold no refused or unexpected message.

The simulators, the client and the master share this machine's cores: absolute rates are
bounded by them; the master's own CPU time per unit and per task is the figure that carries.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import heapq
import json
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import msgspec
import zmq

from actors import ParallelTask, Task, __version__
from actors import messages as m
from actors.task_host import FIRST_LOOKAHEAD, LOOKAHEAD, PACKS_AHEAD, SLICE_BATCH
from bench.system import machine, rss_mib
from transport.hub import BATCH, unbatch
from transport.keys import load_keypair, load_public_key

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_CONFIGS = "10:5,100:20,1000:20,1000:100"
FULL = {"units": 200_000, "tasks": 20_000, "queued": 20_000, "idle": 5.0}
QUICK = {"units": 20_000, "tasks": 2_000, "queued": 2_000, "idle": 2.0}
#: What a simulated worker reports as the time a no-op unit or task took when it answers at once
#: (a real worker's no-op unit: a few microseconds): the scheduler sizes runs from it.
NOOP_UNIT_S = 2e-6
NOOP_TASK_S = 20e-6
HEARTBEAT_S = 1.0
STATS_EVERY_S = 2.0  # as the node's WorkerStats
HELLO_RETRY_S = 2.0
BATCH_ITEMS = 1_000  # as transport/hub.py
WAIT_S = 600.0
#: Events in the master's log that say it refused or mishandled what a simulated peer sent.
BAD_EVENTS = frozenset({"message_refused", "unexpected_message", "message_dropped",
                        "message_with_another_key", "message_from_unknown_peer",
                        "handshake_refused", "malformed_frame", "malformed_batch",
                        "handler_failed", "dropped_from_unknown_node", "send_dropped"})
TARGETS = {"units_per_s": 500_000, "tasks_per_s": 20_000, "idle_worker_kib": 10.0}

_RESULT = pickle.dumps(None, protocol=5)  # every unit's small inline result


# --- the classes the client submits (simulated workers never run them) ------


class SimUnits(ParallelTask):
    """``n`` no-op units; the result is how many results reached the driver."""

    def get_work(self, n: int) -> Any:
        yield from range(n)

    def work_unit(self, unit: int) -> None:
        return None

    def reduce(self, results: list[Any]) -> int:
        return len(results)


class SimTask(Task):
    def work(self, x: int) -> int:
        return x


# --- the simulator process ---------------------------------------------------


@dataclass
class _Driver:
    task_id: str
    n: int
    sliced: int = 0
    finished: int = 0
    exhausted: bool = False
    ended: bool = False
    pack: int = 1  # as the master last said (DriverResults.pack)
    answered: bool = False
    packs: dict[int, int] = field(default_factory=dict)  # first index -> units, while open


@dataclass
class _Worker:
    worker_id: str
    key: bytes
    node: _Node
    task_id: str = ""  # the ParallelTask it drives or helps
    driver: _Driver | None = None
    queue: deque[Any] = field(default_factory=deque)  # held or timed work, in order
    busy_until: float = 0.0
    running: Any = None  # the run or task that takes until busy_until
    codes: set[str] = field(default_factory=set)  # hashes of the code it was sent
    ends: list[m.TaskResult] | None = None  # answered in this turn, sent together (as a worker)


@dataclass
class _Node:
    node_id: str
    sock: zmq.Socket[bytes]
    workers: dict[bytes, _Worker] = field(default_factory=dict)
    welcomed: bool = False
    last_hello: float = 0.0
    last_heartbeat: float = 0.0
    last_stats: float = 0.0
    out: list[tuple[list[bytes], bytes]] = field(default_factory=list)
    spawned: int = 0


class Simulator:
    """Many nodes in one thread: what arrives is decoded with the real decoder, what leaves is
    encoded with the real encoder, batched per node per turn as the node's hub batches it."""

    def __init__(self, address: str, keys: str, nodes: list[tuple[str, int]], *,
                 unit_s: float, task_s: float) -> None:
        self.ctx = zmq.Context()
        pair = load_keypair(keys, "node")
        server = load_public_key(keys, "master")
        self.unit_s, self.task_s = unit_s, task_s
        self.hold = False
        self.nodes: dict[zmq.Socket[bytes], _Node] = {}
        self.timed: list[tuple[float, int, _Worker]] = []  # (busy until, seq, worker)
        self.seq = 0
        self.counts: Counter[str] = Counter()
        self.refusals: list[str] = []
        self.digests: dict[bytes, int] = {}
        self.encoder = msgspec.msgpack.Encoder()
        for node_id, workers in nodes:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 500)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            sock.setsockopt(zmq.IDENTITY, node_id.encode())
            sock.setsockopt(zmq.RECONNECT_IVL, 10)
            sock.curve_publickey = pair.public
            sock.curve_secretkey = pair.secret
            sock.curve_serverkey = server
            sock.connect(address)
            node = _Node(node_id, sock)
            for j in range(workers):
                self._spawn(node, j)
            self.nodes[sock] = node

    def _spawn(self, node: _Node, j: int) -> None:
        worker_id = f"{node.node_id}/w{j}"
        node.workers[worker_id.encode()] = _Worker(worker_id, worker_id.encode(), node)
        node.spawned = max(node.spawned, j + 1)

    # --- sending -----------------------------------------------------------

    def _send(self, node: _Node, msg: m.Message, worker: bytes | None = None) -> None:
        node.out.append(([worker] if worker is not None else [], m.encode(msg)))

    def _flush(self) -> None:
        for node in self.nodes.values():
            out = node.out
            if not out:
                continue
            node.out = []
            for start in range(0, len(out), BATCH_ITEMS):
                items = out[start:start + BATCH_ITEMS]
                if len(items) == 1:
                    route, body = items[0]
                    node.sock.send_multipart([*route, body], zmq.NOBLOCK)
                else:
                    node.sock.send(BATCH + self.encoder.encode(items), zmq.NOBLOCK)

    def _hello(self, node: _Node, now: float) -> None:
        node.last_hello = now
        self._send(node, m.Hello(role="node", peer_id=node.node_id, protocol=m.PROTOCOL_VERSION,
                                 version=__version__, host="sim-host", pid=os.getpid(),
                                 slots=len(node.workers)))

    # --- receiving ---------------------------------------------------------

    def _receive(self, node: _Node) -> None:
        sock = node.sock
        for _ in range(1_000):
            if not int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                return
            frames = sock.recv_multipart(zmq.NOBLOCK)
            for message in unbatch(frames):
                if len(message) == 1:
                    self._for_node(node, m.decode(message[0]))
                elif len(message) == 2:
                    worker = node.workers.get(message[0])
                    msg = m.decode(message[1])
                    if worker is None:
                        self.counts[f"for unknown worker: {type(msg).__name__}"] += 1
                    else:
                        self._for_worker(worker, msg)
                else:
                    self.counts["malformed frames"] += 1

    def _for_node(self, node: _Node, msg: m.Message) -> None:
        match msg:
            case m.Welcome():
                if node.welcomed:
                    return
                node.welcomed = True
                for worker in node.workers.values():
                    self._send(node, m.WorkerReady(worker.worker_id, os.getpid()))
                self.counts["nodes welcomed"] += 1
            case m.Refused(reason=reason):
                self.refusals.append(f"{node.node_id}: {reason}")
                if "send Hello first" in reason:
                    node.welcomed = False
            case m.NewestVersions() | m.LocalPeers() | m.DropResults():
                pass
            case m.KillWorker(worker_id=worker_id):
                # As a node does: the worker exits (expected), and a fresh one takes its place.
                self.counts["workers killed"] += 1
                if node.workers.pop(worker_id.encode(), None) is not None:
                    self._send(node, m.WorkerExited(worker_id, os.getpid(), 0, None, 0, True))
                    j = node.spawned
                    self._spawn(node, j)
                    self._send(node, m.WorkerReady(f"{node.node_id}/w{j}", os.getpid()))
            case _:
                self.counts[f"unexpected for node: {type(msg).__name__}"] += 1

    def _for_worker(self, worker: _Worker, msg: m.Message) -> None:
        if isinstance(msg, m.AssignTasks):  # a worker's queued plain Tasks, in one message
            worker.ends = []  # the ends of those answered at once go in one, as a worker's turn
            for assign in msg.tasks:
                self._for_worker(worker, assign)
            ends, worker.ends = worker.ends, None
            if ends:
                self._send(worker.node, ends[0] if len(ends) == 1 else m.TaskResults(ends),
                           worker.key)
            return
        if isinstance(msg, m.AssignTask) and msg.code:  # code goes to a worker once, by value
            known = msg.code_hash in worker.codes
            self.counts["code sent again" if known else "code shipped"] += 1
            worker.codes.add(msg.code_hash)
        match msg:
            case m.AssignTask(kind="task"):
                self._work(worker, msg)
            case m.AssignTask(task_id=task_id, driver=drives, args=args):
                worker.task_id = task_id
                if drives:
                    (n,), _ = pickle.loads(args)
                    worker.driver = _Driver(task_id, int(n))
                    self._slice_more(worker)
            case m.RunUnits(task_id=task_id) if task_id == worker.task_id:
                self._work(worker, msg)
            case m.DriverResults(task_id=task_id, results=results, held=held, pack=pack):
                driver = worker.driver
                if driver is not None and driver.task_id == task_id:
                    packs = driver.packs
                    driver.finished += sum(packs.pop(i, 1) for i, _ in results)
                    driver.finished += sum(packs.pop(i, 1) for i, _, _ in held)
                    if pack > 0:
                        driver.pack = m.pack_size(pack)
                    driver.answered = True
                    self._slice_more(worker)
            case m.ReleaseTask(task_id=task_id):
                if worker.task_id == task_id:
                    worker.task_id, worker.driver = "", None
            case m.StealUnits(task_id=task_id, run_id=run_id):
                self._steal(worker, task_id, run_id)
            case m.TakeBackTask(task_id=task_id):
                self._take_back(worker, task_id)
            case m.WhoHas() | m.PeerGone():
                pass
            case _:
                self.counts[f"unexpected for worker: {type(msg).__name__}"] += 1

    # --- what a worker does --------------------------------------------------

    def _work(self, worker: _Worker, msg: m.AssignTask | m.RunUnits) -> None:
        worker.queue.append(msg)
        self._next(worker)

    def _begin(self, worker: _Worker, msg: Any, seconds: float) -> None:
        worker.running = msg
        worker.busy_until = time.monotonic() + seconds
        self.seq += 1
        heapq.heappush(self.timed, (worker.busy_until, self.seq, worker))

    def _next(self, worker: _Worker) -> None:
        """The worker's next held or queued piece of work, at once or begun."""
        while worker.queue and worker.running is None and not self.hold:
            msg = worker.queue.popleft()
            seconds = (self.task_s if isinstance(msg, m.AssignTask)
                       else self.unit_s * sum(unit.count or 1 for unit in msg.units))
            if seconds > 0:
                self._begin(worker, msg, seconds)
            else:
                self._answer(worker, msg, 0.0)

    def _answer(self, worker: _Worker, msg: Any, seconds: float) -> None:
        node = worker.node
        if isinstance(msg, m.AssignTask):
            (x,), _ = pickle.loads(msg.args)
            end = m.TaskResult(msg.task_id, m.UnitOutcome(-1, True, pickle.dumps(x, protocol=5)),
                               seconds or NOOP_TASK_S)
            if worker.ends is not None:
                worker.ends.append(end)
            else:
                self._send(node, end, worker.key)
            self.counts["tasks"] += 1
            return
        if msg.task_id != worker.task_id:
            return  # released meanwhile
        digests = self.digests
        outcomes = []
        ran = 0
        for unit in msg.units:
            digest = digests.get(unit.args)
            if digest is None:
                digest = digests[unit.args] = m.unit_digest(unit)
            outcomes.append(m.UnitOutcome(unit.index, True, _RESULT * (unit.count or 1),
                                          digest=digest, count=unit.count))
            ran += unit.count or 1
        self._send(node, m.UnitsDone(msg.task_id, msg.run_id, outcomes,
                                     seconds or NOOP_UNIT_S * ran), worker.key)
        self.counts["units"] += ran
        self.counts["runs"] += 1

    def _steal(self, worker: _Worker, task_id: str, run_id: int) -> None:
        for msg in worker.queue:
            if isinstance(msg, m.RunUnits) and msg.task_id == task_id and msg.run_id == run_id:
                worker.queue.remove(msg)
                self._send(worker.node, m.StealReply(task_id, run_id, True, "ready"), worker.key)
                self.counts["steals given"] += 1
                return
        running = worker.running
        state = ("executing" if isinstance(running, m.RunUnits) and running.run_id == run_id
                 else "forgotten")
        self._send(worker.node, m.StealReply(task_id, run_id, False, state), worker.key)
        self.counts["steals refused"] += 1

    def _take_back(self, worker: _Worker, task_id: str) -> None:
        """A plain Task queued here behind a late one: given back unless it began."""
        for msg in worker.queue:
            if isinstance(msg, m.AssignTask) and msg.task_id == task_id:
                worker.queue.remove(msg)
                self._send(worker.node, m.TakeBackReply(task_id, True), worker.key)
                self.counts["tasks given back"] += 1
                return
        self._send(worker.node, m.TakeBackReply(task_id, False), worker.key)
        self.counts["tasks not given back"] += 1

    def _slice_more(self, worker: _Worker) -> None:
        """As ``task_host.Runtime._slice_more``: batches of SLICE_BATCH, LOOKAHEAD ahead (fewer
        before the master first answers), in packs between multiples of the pack."""
        driver = worker.driver
        assert driver is not None
        limit = SLICE_BATCH if driver.answered else FIRST_LOOKAHEAD
        ahead = max(LOOKAHEAD, PACKS_AHEAD * driver.pack) if driver.answered else FIRST_LOOKAHEAD
        while not driver.exhausted and driver.sliced - driver.finished < ahead:
            count = min(limit, driver.n - driver.sliced)
            units, index, end, pack = [], driver.sliced, driver.sliced + count, driver.pack
            while index < end:
                size = min(pack - index % pack, end - index)
                if size == 1:
                    units.append(m.UnitCall(index, _RESULT))
                else:  # (arguments about the size of a pickled list of small ints)
                    units.append(m.UnitCall(index, _RESULT * size, count=size))
                    driver.packs[index] = size
                index += size
            driver.exhausted = count < limit
            driver.sliced += count
            self._send(worker.node, m.UnitsSliced(driver.task_id, units, driver.exhausted),
                       worker.key)
        if driver.exhausted and driver.finished >= driver.sliced and not driver.ended:
            driver.ended = True
            self._send(worker.node, m.TaskResult(driver.task_id, m.UnitOutcome(
                -1, True, pickle.dumps(driver.finished, protocol=5))), worker.key)
            self.counts["parallel tasks"] += 1

    # --- the loop --------------------------------------------------------------

    def _timers(self, now: float) -> None:
        for node in self.nodes.values():
            if not node.welcomed:
                if now - node.last_hello >= HELLO_RETRY_S:
                    self._hello(node, now)
                continue
            if now - node.last_heartbeat >= HEARTBEAT_S:
                node.last_heartbeat = now
                self._send(node, m.Heartbeat())
            if now - node.last_stats >= STATS_EVERY_S:
                node.last_stats = now
                self._send(node, m.WorkerStats([(w.worker_id, 0.0, 50 << 20)
                                                for w in node.workers.values()]))
        timed = self.timed
        while timed and timed[0][0] <= now:
            _, _, worker = heapq.heappop(timed)
            msg, worker.running = worker.running, None
            if msg is not None:
                seconds = (self.task_s if isinstance(msg, m.AssignTask)
                           else self.unit_s * len(msg.units))
                self._answer(worker, msg, seconds)
            self._next(worker)

    def stats(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "refusals": self.refusals[:20],
                "welcomed": sum(n.welcomed for n in self.nodes.values()),
                "workers": sum(len(n.workers) for n in self.nodes.values() if n.welcomed),
                "held": sum(len(w.queue) for n in self.nodes.values()
                            for w in n.workers.values())}

    def run(self, control: Connection) -> None:
        poller = zmq.Poller()
        for sock in self.nodes:
            poller.register(sock, zmq.POLLIN)
        poller.register(control.fileno(), zmq.POLLIN)
        try:
            while True:
                now = time.monotonic()
                self._timers(now)
                self._flush()
                wait = 0.1
                if self.timed:
                    wait = min(wait, max(0.0, self.timed[0][0] - time.monotonic()))
                ready = poller.poll(int(wait * 1000))
                for sock, _ in ready:
                    node = self.nodes.get(sock) if not isinstance(sock, int) else None
                    if node is not None:
                        self._receive(node)
                if control.poll():
                    command = control.recv()
                    if command[0] == "hold":
                        self.hold = bool(command[1])
                        if not self.hold:
                            for node in self.nodes.values():
                                for worker in list(node.workers.values()):
                                    self._next(worker)
                        control.send(self.stats())
                    elif command[0] == "stats":
                        control.send(self.stats())
                    elif command[0] == "stop":
                        for node in self.nodes.values():
                            if node.welcomed:
                                self._send(node, m.Bye("simulation over"))
                        self._flush()
                        control.send(self.stats())
                        return
        finally:
            for sock in self.nodes:
                sock.close(linger=500)
            self.ctx.term()


def _simulate(address: str, keys: str, nodes: list[tuple[str, int]], unit_s: float,
              task_s: float, control: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    Simulator(address, keys, nodes, unit_s=unit_s, task_s=task_s).run(control)


# --- the orchestrator ----------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str = "self") -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def spread(workers: int, nodes: int) -> list[int]:
    """``workers`` over ``nodes`` as evenly as can be: 10 over 4 is [3, 3, 2, 2]."""
    base, extra = divmod(workers, nodes)
    return [base + (i < extra) for i in range(nodes)]


@dataclass
class Options:
    units: int
    tasks: int
    queued: int
    idle_s: float
    unit_s: float = 0.0
    task_s: float = 0.0
    sim_procs: int = 1
    dashboard: bool = True


class SimCluster:
    """A real master process and the simulator processes of one configuration."""

    def __init__(self, workers: int, nodes: int, options: Options) -> None:
        self.workers, self.node_count, self.options = workers, nodes, options
        self.tmp = tempfile.mkdtemp(prefix="actors-sim-")
        self.keys = os.path.join(self.tmp, "keys")
        self.log_path = os.path.join(self.tmp, "master.log")
        ready = os.path.join(self.tmp, "ready.json")
        with open(self.log_path, "w") as log:
            self.master = subprocess.Popen(
                [sys.executable, "-m", "actors.master", "--port", "0", "--workers", "0",
                 "--keys", self.keys, "--ephemeral", "--no-banner", "--ready-file", ready,
                 "--log-format", "json", "--tasks-dir", os.path.join(self.tmp, "tasks"),
                 *([] if options.dashboard else ["--dashboard", "off"])],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                start_new_session=True)
        self.pid = self.master.pid
        self.sims: list[tuple[Any, Connection]] = []
        deadline = time.monotonic() + 60
        while not os.path.exists(ready):
            if self.master.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"the master did not start:\n{self.log_tail()}")
            time.sleep(0.01)
        self.address = str(json.loads(Path(ready).read_text())["address"])

    def start_nodes(self) -> None:
        sizes = spread(self.workers, self.node_count)
        procs = max(1, min(self.options.sim_procs, self.node_count))
        ctx = mp.get_context("spawn")
        for p in range(procs):
            nodes = [(f"node-sim{p}-{i}", sizes[i]) for i in range(p, self.node_count, procs)]
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_simulate, name=f"simulator-{p}", daemon=True,
                               args=(self.address, self.keys, nodes, self.options.unit_s,
                                     self.options.task_s, theirs))
            proc.start()
            theirs.close()
            self.sims.append((proc, mine))

    def tell(self, *command: Any) -> list[dict[str, Any]]:
        for _, conn in self.sims:
            conn.send(command)
        return [conn.recv() for _, conn in self.sims]

    def log_events(self) -> tuple[Counter[str], list[str]]:
        """Warnings and errors in the master's log, by event; the first lines of bad events."""
        found: Counter[str] = Counter()
        bad: list[str] = []
        for line in Path(self.log_path).read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                event = str(entry.get("event"))
                if event in BAD_EVENTS and len(bad) < 20:
                    bad.append(line[:500])
                if entry.get("level") in ("warning", "error", "critical"):
                    found[event] += 1
        return found, bad

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return Path(self.log_path).read_text()[-3000:]
        return ""

    def close(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        with contextlib.suppress(Exception):
            if self.sims:
                stats = _merge(self.tell("stop"))
        for proc, conn in self.sims:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            conn.close()
        if self.master.poll() is None:
            self.master.send_signal(signal.SIGTERM)
            try:
                self.master.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.master.pid, signal.SIGKILL)
                self.master.wait(5)
        return stats


def _merge(replies: Iterable[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"counts": Counter(), "refusals": [], "welcomed": 0, "workers": 0,
                              "held": 0}
    for reply in replies:
        merged["counts"].update(reply["counts"])
        merged["refusals"] += reply["refusals"]
        for key in ("welcomed", "workers", "held"):
            merged[key] += reply[key]
    merged["counts"] = dict(merged["counts"])
    return merged


def _settled_rss(pid: int, seconds: float = 0.5) -> float:
    time.sleep(seconds)
    return rss_mib(pid)


def _wait(what: str, check: Any, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f}s")
        time.sleep(0.05)


def run_config(workers: int, nodes: int, options: Options, progress: Any = sys.stderr
               ) -> dict[str, Any]:
    """One configuration on a fresh master: every figure of the row, and what went wrong."""

    def say(text: str) -> None:
        print(f"  [{workers} workers / {nodes} nodes] {text}", file=progress, flush=True)

    row: dict[str, Any] = {"workers": workers, "nodes": nodes,
                           "sim_procs": max(1, min(options.sim_procs, nodes))}
    cluster = SimCluster(workers, nodes, options)
    try:
        _measure(row, cluster, options, say)
    except Exception as exc:  # what was measured stays in the row
        row["error"] = f"{type(exc).__name__}: {exc}"
        say(f"failed: {row['error']}")
    finally:
        row["simulators"] = cluster.close()
        events, bad = cluster.log_events()
        row["master_log"] = dict(events)
        if bad:
            row["master_log_lines"] = bad
        shutil.rmtree(cluster.tmp, ignore_errors=True)
    row["refused"] = {k: v for k, v in row["master_log"].items() if k in BAD_EVENTS}
    sims = row["simulators"]
    row["unexpected_at_nodes"] = {k: v for k, v in sims.get("counts", {}).items()
                                  if k.startswith(("unexpected", "for unknown", "malformed"))}
    if sims.get("refusals"):
        row["unexpected_at_nodes"]["refusals"] = sims["refusals"]
    return row


def _measure(row: dict[str, Any], cluster: SimCluster, options: Options, say: Any) -> None:
    from actors import Client  # after the spawn children are made: no hub thread in them

    workers, pid = cluster.workers, cluster.pid
    with Client(cluster.address, keys=cluster.keys, timeout=30) as client:
        # Idle, no node: the baseline of memory and of CPU (the master's ticks).
        row["rss_empty_mib"] = _settled_rss(pid, 1.0)
        cpu = cpu_seconds(pid)
        time.sleep(options.idle_s)
        row["idle_cpu_empty_pct"] = 100 * (cpu_seconds(pid) - cpu) / options.idle_s
        say(f"master up (pid {pid}); nodes joining")
        started = time.perf_counter()
        cluster.start_nodes()
        _wait("workers joined", lambda: client.info().workers >= workers, 120)
        row["join_s"] = time.perf_counter() - started
        row["rss_idle_mib"] = _settled_rss(pid, 1.0)
        row["idle_worker_kib"] = ((row["rss_idle_mib"] - row["rss_empty_mib"]) * 1024
                                  / workers)
        cpu = cpu_seconds(pid)
        time.sleep(options.idle_s)
        row["idle_cpu_pct"] = 100 * (cpu_seconds(pid) - cpu) / options.idle_s
        row["heartbeat_cpu_pct"] = row["idle_cpu_pct"] - row["idle_cpu_empty_pct"]
        say(f"joined in {row['join_s']:.1f}s; idle master {row['idle_cpu_pct']:.1f}% CPU "
            f"(no node: {row['idle_cpu_empty_pct']:.1f}%); warm-up")

        # Warm-up: code shipped, each worker warm, the unit and task times measured.
        _check("warm-up units", client.submit(SimUnits, 10 * workers).result(WAIT_S),
               10 * workers)
        _check("warm-up tasks", [f.result(WAIT_S) for f in client.map(SimTask, range(
            2 * workers))], list(range(2 * workers)))

        # (a) one ParallelTask of many tiny units.
        n = options.units
        cpu, mine = cpu_seconds(pid), cpu_seconds()
        started = time.perf_counter()
        _check("units", client.submit(SimUnits, n).result(WAIT_S), n)
        seconds = time.perf_counter() - started
        row["units"] = n
        row["units_per_s"] = n / seconds
        row["master_us_per_unit"] = 1e6 * (cpu_seconds(pid) - cpu) / n
        row["client_us_per_unit"] = 1e6 * (cpu_seconds() - mine) / n
        say(f"{n:,} units in {seconds:.2f}s: {row['units_per_s']:,.0f} units/s, "
            f"master {row['master_us_per_unit']:.1f} µs CPU a unit")

        # (b) many small plain Tasks.
        n = options.tasks
        cpu, mine = cpu_seconds(pid), cpu_seconds()
        started = time.perf_counter()
        futures = client.map(SimTask, range(n))
        _check("tasks", [f.result(WAIT_S) for f in futures], list(range(n)))
        seconds = time.perf_counter() - started
        del futures
        row["tasks"] = n
        row["tasks_per_s"] = n / seconds
        row["master_us_per_task"] = 1e6 * (cpu_seconds(pid) - cpu) / n
        row["client_us_per_task"] = 1e6 * (cpu_seconds() - mine) / n
        say(f"{n:,} tasks in {seconds:.2f}s: {row['tasks_per_s']:,.0f} tasks/s, "
            f"master {row['master_us_per_task']:.0f} µs CPU a task (client "
            f"{row['client_us_per_task']:.0f} µs)")

        # (c) tasks queued while no worker answers: the master's memory per task held.
        n = options.queued
        if n:
            cluster.tell("hold", True)
            before = _settled_rss(pid, 0.5)
            started = time.perf_counter()
            cpu = cpu_seconds(pid)
            futures = client.map(SimTask, range(n))

            def all_in() -> bool:
                # (an answer waits behind every Submit sent before it: a busy master is slow)
                info = client.info(timeout=WAIT_S)
                return info.tasks_queued + info.tasks_running >= n

            _wait("queued tasks at the master", all_in, WAIT_S)
            # The master's time to take in n Submits with no worker free: what each costs it.
            row["queued_absorb_s"] = time.perf_counter() - started
            row["master_us_per_queued_submit"] = 1e6 * (cpu_seconds(pid) - cpu) / n
            info = client.info(timeout=WAIT_S)
            row["queued"] = n
            row["queued_in_master_queue"] = info.tasks_queued
            row["rss_queued_mib"] = _settled_rss(pid, 0.5)
            row["queued_task_bytes"] = (row["rss_queued_mib"] - before) * 2**20 / n
            held = row["queued_held_by_workers"] = _merge(cluster.tell("stats"))["held"]
            cluster.tell("hold", False)
            _check("queued tasks", [f.result(WAIT_S) for f in futures], list(range(n)))
            del futures
            say(f"{n:,} tasks queued ({info.tasks_queued:,} in the master's queue, "
                f"{held:,} held by workers) in {row['queued_absorb_s']:.1f}s, master "
                f"{row['master_us_per_queued_submit']:.0f} µs CPU each: "
                f"{row['queued_task_bytes']:,.0f} B each")
        row["rss_after_mib"] = rss_mib(pid)


def _check(what: str, got: Any, expected: Any) -> None:
    if got != expected:
        shown = got if not isinstance(got, list) else f"{len(got)} results, not as expected"
        raise AssertionError(f"{what}: got {shown}, expected "
                             f"{expected if not isinstance(expected, list) else len(expected)}")


# --- the report ------------------------------------------------------------------

COLUMNS = (
    ("workers", "workers", "{:,}"),
    ("nodes", "nodes", "{:,}"),
    ("units/s", "units_per_s", "{:,.0f}"),
    ("master µs/unit", "master_us_per_unit", "{:.2f}"),
    ("tasks/s", "tasks_per_s", "{:,.0f}"),
    ("master µs/task", "master_us_per_task", "{:.0f}"),
    ("client µs/task", "client_us_per_task", "{:.0f}"),
    ("master µs/queued submit", "master_us_per_queued_submit", "{:.0f}"),
    ("KiB/idle worker", "idle_worker_kib", "{:.1f}"),
    ("B/queued task", "queued_task_bytes", "{:,.0f}"),
    ("idle CPU %", "idle_cpu_pct", "{:.1f}"),
    ("no-node CPU %", "idle_cpu_empty_pct", "{:.1f}"),
    ("RSS idle MiB", "rss_idle_mib", "{:.1f}"),
)


def table(rows: list[dict[str, Any]]) -> str:
    head = [name for name, _, _ in COLUMNS]
    body = [[fmt.format(row[key]) if isinstance(row.get(key), int | float) else "-"
             for _, key, fmt in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h)
              for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def ratios(rows: list[dict[str, Any]]) -> list[str]:
    """How each figure moves from the smallest configuration to each larger one."""
    good = [r for r in rows if "error" not in r]
    if len(good) < 2:
        return []
    base = good[0]
    out = []
    for row in good[1:]:
        parts = []
        for label, key in (("master µs/unit", "master_us_per_unit"),
                           ("master µs/task", "master_us_per_task"),
                           ("idle CPU", "idle_cpu_pct")):
            if base.get(key) and row.get(key) is not None:
                parts.append(f"{label} x{row[key] / base[key]:.2f}")
        out.append(f"{row['workers']:,} workers / {row['nodes']} nodes vs "
                   f"{base['workers']:,} / {base['nodes']}: " + ", ".join(parts)
                   + f" (workers x{row['workers'] / base['workers']:.0f})")
    return out


def targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Issue 20's targets, judged on the largest configuration measured."""
    good = [r for r in rows if "error" not in r]
    if not good:
        return {}
    big = max(good, key=lambda r: (r["workers"], r["nodes"]))
    return {
        "at": f"{big['workers']} workers / {big['nodes']} nodes",
        "units_per_s": {"target": TARGETS["units_per_s"], "measured": big.get("units_per_s"),
                        "master_cpu_bound": 1e6 / big["master_us_per_unit"]
                        if big.get("master_us_per_unit") else None},
        "tasks_per_s": {"target": TARGETS["tasks_per_s"], "measured": big.get("tasks_per_s"),
                        "master_cpu_bound": 1e6 / big["master_us_per_task"]
                        if big.get("master_us_per_task") else None},
        "idle_worker_kib": {"target": TARGETS["idle_worker_kib"],
                            "measured": big.get("idle_worker_kib")},
    }


def parse_configs(text: str) -> list[tuple[int, int]]:
    configs = []
    for item in text.split(","):
        workers, _, nodes = item.strip().partition(":")
        w, n = int(workers), int(nodes or 1)
        if w < 1 or n < 1 or n > w:
            raise argparse.ArgumentTypeError(f"bad configuration {item!r}: W:N, 1 <= N <= W")
        configs.append((w, n))
    return configs


def main(argv: list[str] | None = None, out: Any = sys.stdout, progress: Any = sys.stderr
         ) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.simulate",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--configs", type=parse_configs, default=None,
                        help=f"WORKERS:NODES,... (default {DEFAULT_CONFIGS})")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: "
                        + ", ".join(f"{k} {v:,}" for k, v in QUICK.items()))
    parser.add_argument("--units", type=int, default=None, help=f"default {FULL['units']:,}")
    parser.add_argument("--tasks", type=int, default=None, help=f"default {FULL['tasks']:,}")
    parser.add_argument("--queued", type=int, default=None,
                        help=f"tasks submitted while workers hold their answers "
                             f"(default {FULL['queued']:,}; 0: skip)")
    parser.add_argument("--idle-seconds", type=float, default=None,
                        help=f"seconds the idle master's CPU is measured (default {FULL['idle']})")
    parser.add_argument("--unit-seconds", type=float, default=0.0,
                        help="what each simulated unit takes (default 0: answered at once)")
    parser.add_argument("--task-seconds", type=float, default=0.0,
                        help="what each simulated plain Task takes (default 0: at once)")
    parser.add_argument("--sim-procs", type=int, default=1,
                        help="simulator processes the nodes are spread over (default 1)")
    parser.add_argument("--no-dashboard", action="store_true",
                        help="start the master with --dashboard off (it is on by default)")
    parser.add_argument("--json", default=None,
                        help="where to write the JSON (default bench/results/simulate-<time>.json)")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    options = Options(
        units=args.units if args.units is not None else int(sizes["units"]),
        tasks=args.tasks if args.tasks is not None else int(sizes["tasks"]),
        queued=args.queued if args.queued is not None else int(sizes["queued"]),
        idle_s=args.idle_seconds if args.idle_seconds is not None else float(sizes["idle"]),
        unit_s=args.unit_seconds, task_s=args.task_seconds, sim_procs=args.sim_procs,
        dashboard=not args.no_dashboard)
    configs = args.configs or parse_configs(DEFAULT_CONFIGS)
    started = datetime.datetime.now(datetime.UTC)
    rows: list[dict[str, Any]] = []
    for workers, nodes in configs:
        print(f"{workers} workers on {nodes} nodes", file=progress, flush=True)
        try:
            rows.append(run_config(workers, nodes, options, progress))
        except Exception as exc:  # the next configuration still runs; the error is reported
            rows.append({"workers": workers, "nodes": nodes, "error": f"{type(exc).__name__}: {exc}"})
            print(f"  failed: {exc}", file=progress, flush=True)
    doc = {"started": started.isoformat(), "machine": machine(), "settings": {
               "configs": configs, **vars(options),
               "noop_unit_s": NOOP_UNIT_S, "noop_task_s": NOOP_TASK_S},
           "rows": rows, "targets": targets(rows), "ratios": ratios(rows),
           "errors": [f"{r['workers']}:{r['nodes']}: {r['error']}" for r in rows if "error" in r]
           + [f"{r['workers']}:{r['nodes']}: master refused {r['refused']}"
              for r in rows if r.get("refused")]
           + [f"{r['workers']}:{r['nodes']}: nodes got {r['unexpected_at_nodes']}"
              for r in rows if r.get("unexpected_at_nodes")]}
    print(table(rows), file=out)
    for line in doc["ratios"]:
        print(line, file=out)
    for error in doc["errors"]:
        print(f"ERROR {error}", file=out)
    path = Path(args.json) if args.json else (
        RESULTS_DIR / f"simulate-{started.strftime('%Y-%m-%dT%H%M%SZ')}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"JSON: {path}", file=progress)
    return doc


if __name__ == "__main__":
    sys.exit(1 if main()["errors"] else 0)
