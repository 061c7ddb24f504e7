"""Hostile input against a running cluster: random messages of every catalogue type, as a client,
as a node, as a stranger on the node's socket for workers, and as task code speaking through its
own worker's proven connection (every kind of frame a worker may send: to the master, to the
node, to the data plane, results to hold), plus raw garbage; then a legitimate task.

``python -m bench.fuzz --frames 100000`` starts a LocalCluster, sends that many frames, and prints
the frames sent, crashes (a master or node process gone, or the legitimate task failing), and the
master's and node's memory and open files before and after. The test suite runs a small count.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect as mi
import zmq

from actors import Client, LocalCluster, Task, __version__
from actors import messages as m
from transport.keys import load_keypair, load_public_key

MESSAGE_TYPES: tuple[type[msgspec.Struct], ...] = tuple(
    t.cls for t in mi.multi_type_info(m.AnyMessage.__args__)  # type: ignore[attr-defined]
    if isinstance(t, mi.StructType))
_encoder = msgspec.msgpack.Encoder()


class Square(Task):
    def work(self, x: int) -> int:
        return x * x


class FuzzesFromItsWorker(Task):
    """Task code that sends ``frames`` hostile frames through its own worker's connection to its
    node (it runs in the worker's process: the node has proven that connection), naming
    ``ids`` (other workers, tasks, clients) as targets; the number it sent."""

    def work(self, frames: int, seed: int, ids: list[str]) -> int:
        import gc

        from actors.worker import NODE, Worker
        from transport.hub import Hub

        hub = next(o for o in gc.get_objects() if type(o) is Hub)
        me = next(o for o in gc.get_objects() if isinstance(o, Worker)).worker_id
        rng = random.Random(seed)
        hostile = Hostile(rng, [*ids, me])
        outbox = hub.outbox()
        try:
            for _ in range(frames):
                kind = rng.choice([b"m", b"n", b"p", b"r", b"h", b"f", b"x"])
                target = rng.choice([*ids, me]).encode()
                if kind == b"p":
                    parts = [kind, rng.choice([b"tcp://127.0.0.1:9", b"", b"ipc:///x"]), target,
                             hostile.body()]
                elif kind == b"r":
                    parts = [kind, rng.choice([b"", target]), target,
                             *[os.urandom(8)] * rng.choice([0, 1]), hostile.body()]
                elif kind == b"h":
                    parts = [kind, target, hostile.body()]
                else:
                    parts = [kind, hostile.body()]
                outbox.send(NODE, parts)
        finally:
            outbox.close()
        return frames


@dataclass
class Report:
    frames: int = 0
    crashes: list[str] = field(default_factory=list)
    before: dict[str, tuple[int, int]] = field(default_factory=dict)  # process -> (RSS kB, fds)
    after: dict[str, tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"frames sent: {self.frames:,}", f"crashes: {len(self.crashes)}"]
        out += [f"  {crash}" for crash in self.crashes]
        out += [f"note: {note}" for note in self.notes]
        for name in sorted(self.before):
            (rss0, fds0), (rss1, fds1) = self.before[name], self.after.get(name, (0, 0))
            out.append(f"{name}: RSS {rss0:,} -> {rss1:,} kB, open files {fds0} -> {fds1}")
        return out


class Hostile:
    """Random values of a catalogue type, biased to what breaks code: the ids in use, negative
    and huge numbers, empty and long strings, NaN."""

    def __init__(self, rng: random.Random, ids: list[str]) -> None:
        self.rng = rng
        self.ids = ids

    def message(self) -> msgspec.Struct:
        cls = self.rng.choice(MESSAGE_TYPES)
        return self.value(mi.type_info(cls), 0)  # type: ignore[no-any-return]

    def value(self, t: mi.Type, depth: int) -> Any:
        rng = self.rng
        match t:
            case mi.StructType(cls=cls, fields=fields):
                return cls(**{f.name: self.value(f.type, depth + 1) for f in fields
                              if f.required or rng.random() < 0.5})
            case mi.StrType():
                return rng.choice([*self.ids, "", "x" * rng.randint(1, 5000), "\u2603/../..",
                                   "node", "client", "worker", "task", "parallel"])
            case mi.IntType():
                return rng.choice([0, 1, -1, -8, 7, 2**31, 2**63 - 1, -(2**63),
                                   rng.randint(-10**6, 10**6)])
            case mi.FloatType():
                return rng.choice([0.0, -1.0, math.inf, math.nan, 1e308, rng.random()])
            case mi.BoolType():
                return rng.random() < 0.5
            case mi.BytesType():
                return rng.choice([b"", os.urandom(rng.randint(1, 200)), b"\x80\x04N."])
            case mi.NoneType():
                return None
            case mi.ListType(item_type=item) | mi.SetType(item_type=item):
                count = 0 if depth > 3 else rng.choice([0, 1, 3, 50])
                return [self.value(item, depth + 1) for _ in range(count)]
            case mi.TupleType(item_types=items):
                return tuple(self.value(i, depth + 1) for i in items)
            case mi.VarTupleType(item_type=item):
                return tuple(self.value(item, depth + 1) for _ in range(rng.choice([0, 2])))
            case mi.DictType(key_type=key, value_type=value):
                return {self.value(key, depth + 1): self.value(value, depth + 1)
                        for _ in range(rng.choice([0, 2]))}
            case mi.UnionType(types=types):
                return self.value(rng.choice(types), depth)
            case mi.AnyType():
                return rng.choice([None, 1, "x", b"y", [1, 2]])
            case _:
                return None

    def body(self) -> bytes:
        """A message, or (one time in ten) bytes that are not one."""
        if self.rng.random() < 0.1:
            return self.rng.choice([b"", b"\xc1garbage", os.urandom(self.rng.randint(1, 64)),
                                    b"\x93\xa4Nope\x01\x02"])
        try:  # (the function, not the module's encoder: the class goes by value to workers)
            return msgspec.msgpack.encode(self.message())
        except (TypeError, ValueError, OverflowError):
            return b"\xc0"


def _dealer(ctx: zmq.Context[zmq.Socket[bytes]], address: str, keys: str | None, role: str,
            identity: bytes) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, 1_000_000)
    sock.setsockopt(zmq.IDENTITY, identity)
    if keys is not None:
        pair = load_keypair(keys, role)
        sock.curve_publickey, sock.curve_secretkey = pair.public, pair.secret
        sock.curve_serverkey = load_public_key(keys, "master")
    sock.connect(address)
    return sock


def _usage(pid: int) -> tuple[int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")), 0)
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def _node_of(cluster: LocalCluster) -> tuple[int, str]:
    """The process the local node runs in and the ipc address its workers connect to (the Unix
    socket it listens on, from /proc/net/unix): the master itself (``--local-node inside``, the
    default), else the master's child with that socket. A node that links its workers
    (``--worker-links``) has none: the master and "" (its local node runs inside it by
    default)."""
    candidates = [cluster.pid]
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == cluster.pid:  # the master's children (forked, they show no node argv)
            candidates.append(int(entry.name))
    listening = {cols[6]: cols[7] for line in Path("/proc/net/unix").read_text().splitlines()[1:]
                 if len(cols := line.split()) >= 8 and cols[7].endswith("workers.sock")}
    for pid in candidates:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in listening:
                    return pid, f"ipc://{listening[link[8:-1]]}"
    if not listening:
        return cluster.pid, ""
    raise RuntimeError("the cluster's node (or its workers' socket) was not found")


def fuzz(cluster: LocalCluster, frames: int, seed: int = 0,
         progress: Callable[[int], None] | None = None) -> Report:
    """Send ``frames`` hostile frames to ``cluster``; then check it still serves."""
    rng = random.Random(seed)
    report = Report()
    with Client(cluster) as client:  # returns once the node's workers are up
        known = client.submit(Square, 2)
        known.result(timeout=60)
        ids = [known.task_id, client.client_id, *client.info().nodes,
               *(f"{n}/w{i}" for n in client.info().nodes for i in range(1, 4))]
    node_pid, node_address = _node_of(cluster)
    processes = {"master": cluster.pid, "node": node_pid}
    report.before = {name: _usage(pid) for name, pid in processes.items()}
    hostile = Hostile(rng, ids)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    senders: list[tuple[str, zmq.Socket[bytes]]] = []
    try:
        for role in ("client", "node"):
            sock = _dealer(ctx, cluster.address, cluster.keys_dir, role, f"fuzz-{role}".encode())
            sock.send(_encoder.encode(m.Hello(role=role, peer_id=f"fuzz-{role}",
                                              protocol=m.PROTOCOL_VERSION, version=__version__)))
            senders.append((role, sock))
        if node_address:  # (a stranger on the node's socket for workers, where it has one)
            senders.append(("worker", _dealer(ctx, node_address, None, "worker",
                                              b"fuzz-worker")))
        senders.append(("stranger", _dealer(ctx, cluster.address, cluster.keys_dir, "client",
                                            b"fuzz-stranger")))
        for sent in range(frames):
            role, sock = rng.choice(senders)
            if role == "node" and rng.random() < 0.5:  # as if relaying for a worker
                parts = [rng.choice(ids).encode(), hostile.body()]
            elif role == "worker":
                parts = [rng.choice([b"m", b"n", b"p", b"r", b"x"]), hostile.body()]
            else:
                parts = [hostile.body()]
            sock.send_multipart(parts)
            report.frames += 1
            if progress is not None and sent % 10_000 == 0:
                progress(sent)
            for _, receiver in senders:  # keep their receive queues short
                while receiver.poll(0):
                    receiver.recv_multipart()
    finally:
        for _, sock in senders:
            sock.close(linger=0)
        ctx.term()
    try:  # task code, through its own worker's connection (a quarter as many)
        with Client(cluster) as client:
            inside = client.submit(FuzzesFromItsWorker, max(1, frames // 4), seed, ids)
            report.frames += inside.result(timeout=120)
    except Exception as exc:  # its worker may be ended for what it sent: not a crash
        report.notes.append(f"the fuzzing task ended with {exc!r}")
    try:  # after the hostile frames (the master takes them in order of arrival)
        with Client(cluster) as client:
            got = [f.result(timeout=60) for f in client.map(Square, range(10))]
        if got != [i * i for i in range(10)]:
            report.crashes.append(f"a legitimate map answered {got}")
    except Exception as exc:
        report.crashes.append(f"a legitimate map failed: {exc!r}")
    for name, pid in processes.items():
        if not os.path.exists(f"/proc/{pid}"):
            report.crashes.append(f"the {name} process ({pid}) is gone")
    report.after = {name: _usage(pid) for name, pid in processes.items()
                    if os.path.exists(f"/proc/{pid}")}
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fuzz", description=__doc__)
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    with LocalCluster(workers=args.workers) as cluster:
        report = fuzz(cluster, args.frames, args.seed,
                      progress=lambda n: print(f"  {n:,} frames", flush=True))
    print("\n".join(report.lines()))
    return 1 if report.crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
