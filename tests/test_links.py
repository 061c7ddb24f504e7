"""Links (transport/links.py): messages over a socket pair, alone and in a hub."""

from __future__ import annotations

import array
import fcntl
import gc
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_until
from transport import links as links_module
from transport.hub import Hub
from transport.links import FILE_BYTES, IN_FILE, MAX_FRAMES, Link, pair

Pair = Callable[..., tuple[Link, Link]]


@pytest.fixture
def links() -> Iterator[Callable[..., tuple[Link, Link]]]:
    """Both ends of a link as Links (keyword arguments: the reader's), closed after the test."""
    made: list[Link] = []

    def make(**reader: object) -> tuple[Link, Link]:
        ours, theirs = pair()
        made.extend([Link(ours), Link(theirs, **reader)])  # type: ignore[arg-type]
        return made[-2], made[-1]

    yield make
    for link in made:
        link.close()


def read_all(link: Link, count: int, writer: Link | None = None,
             timeout: float = 10.0) -> list[list[bytes]]:
    """What ``link`` reads until ``count`` messages came or it closed; ``writer``'s backlog
    is written meanwhile (as its hub would when the socket takes more)."""
    got: list[list[bytes]] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and not link.closed:
        assert time.monotonic() < deadline, f"{len(got)} of {count} messages in time"
        got += link.read()
        if writer is not None:
            writer.flush()
    return got


def test_messages_arrive_whole_and_in_order_however_the_stream_cuts_them(links: Pair) -> None:
    a, b = links()
    sent = [[b"m", f"body {i}".encode() * (i % 50)] for i in range(2_000)]
    sent.append([b"x" * 300_000, b"", b"tail"])  # larger than one read: cut across reads
    for frames in sent:
        assert a.send(frames)
    got = read_all(b, len(sent), a)
    assert [[bytes(f) for f in m] for m in got] == sent


def test_a_large_frame_on_a_link_with_views_comes_as_a_view_of_one_buffer(links: Pair) -> None:
    a, b = links(views=True)
    big = bytes(range(256)) * (20 << 12)  # 20 MiB
    writer = threading.Thread(target=lambda: (a.send([b"head", big]), _drain(a)))
    writer.start()
    got = read_all(b, 1, timeout=30)
    writer.join(30)
    head, body = got[0]
    assert isinstance(head, bytes) and head == b"head"
    assert isinstance(body, memoryview) and body.readonly and body == big


def _drain(link: Link) -> None:
    deadline = time.monotonic() + 30
    while link.backlog and time.monotonic() < deadline:
        link.flush()
        time.sleep(0.001)


def test_a_peer_that_reads_nothing_holds_messages_in_our_backlog_until_it_reads(links: Pair) -> None:
    a, b = links()
    body = b"z" * 100_000
    for i in range(100):  # ~10 MB: more than the socket's buffers hold
        assert a.send([str(i).encode(), body])
    assert a.backlog
    got = read_all(b, 100, a)
    assert [int(m[0]) for m in got] == list(range(100)) and all(m[1] == body for m in got)
    assert not a.backlog


@pytest.mark.parametrize("header", [
    struct.pack("<I", 0),  # no frames
    struct.pack("<I", MAX_FRAMES + 1),  # too many
    struct.pack("<IQ", 1, 2_000),  # over the link's bound (1,000 bytes)
], ids=["no frames", "too many frames", "too large"])
def test_a_peer_that_breaks_the_framing_is_cut_off_after_what_it_sent_whole(
        header: bytes, links: Pair) -> None:
    a, b = links(max_message=1_000)
    assert a.send([b"first"])
    a.sock.sendall(header + b"\0" * 64)
    got = read_all(b, 2)
    assert got == [[b"first"]] and b.closed and b.broken


def test_a_header_naming_a_huge_message_costs_the_reader_only_what_arrives(links: Pair) -> None:
    a, b = links()
    a.sock.sendall(struct.pack("<IQ", 1, 2 << 30) + b"only this")  # 2 GiB named
    assert b.read() == [] and not b.closed
    a.close()
    assert b.read() == [] and b.closed  # the peer left: the message never came


def test_sending_to_a_closed_peer_is_refused_not_raised(links: Pair) -> None:
    a, b = links()
    b.close()
    for _ in range(3):  # (the first write may still be taken by the kernel)
        a.send([b"x" * 300_000])
    assert not a.send([b"late"]) and a.closed


# --- in a hub ------------------------------------------------------------


class Inbox:
    def __init__(self) -> None:
        self.frames: list[tuple[str, list[bytes]]] = []
        self.events: list[tuple[str, str]] = []

    def on_frames(self, name: str, frames: list[bytes]) -> None:
        self.frames.append((name, [bytes(f) for f in frames]))

    def on_event(self, name: str, what: str) -> None:
        self.events.append((name, what))


def test_a_router_of_links_routes_by_the_link_a_message_came_on() -> None:
    node_in, w1_in, w2_in = Inbox(), Inbox(), Inbox()
    node = Hub(node_in.on_frames)
    node.add_links("workers", views=True)
    hubs = [node]
    try:
        ends = {}
        for name, inbox in (("w1", w1_in), ("w2", w2_in)):
            ours, theirs = pair()
            node.attach_link("workers", name.encode(), ours)
            worker = Hub(inbox.on_frames, on_event=inbox.on_event)
            worker.add_link("node", theirs, views=True)
            hubs.append(worker)
            ends[name] = worker
        for hub in hubs:
            hub.start()
        ends["w1"].outbox().send("node", [b"m", b"from w1"])
        ends["w2"].outbox().send("node", [b"m", b"from w2"])
        wait_until(lambda: len(node_in.frames) == 2)
        assert sorted(node_in.frames) == [("workers", [b"w1", b"m", b"from w1"]),
                                          ("workers", [b"w2", b"m", b"from w2"])]
        out = node.outbox()
        for i in range(500):  # one turn's worth: batched on the way, handed on one by one
            out.send("workers", [b"w2", str(i).encode()])
        out.send("workers", [b"nobody", b"dropped"])
        wait_until(lambda: len(w2_in.frames) == 500)
        assert [f for _, (f,) in w2_in.frames] == [str(i).encode() for i in range(500)]
        assert w1_in.frames == []
    finally:
        for hub in reversed(hubs):
            hub.stop()


def test_a_detached_link_hands_on_its_peers_last_words_then_closes() -> None:
    node_in, worker_in = Inbox(), Inbox()
    node = Hub(node_in.on_frames)
    node.add_links("workers")
    ours, theirs = pair()
    worker = Hub(worker_in.on_frames, on_event=worker_in.on_event)
    worker.add_link("node", theirs)
    node.start()
    worker.start()
    try:
        node.attach_link("workers", b"w1", ours)
        wait_until(lambda: node.has_socket("workers"))
        for i in range(100):
            worker.outbox().send("node", [str(i).encode()])
        worker.stop()  # (as a worker exits: what it wrote waits in the socket)
        node.detach_link("workers", b"w1")
        wait_until(lambda: len(node_in.frames) == 100)
        node.outbox().send("workers", [b"w1", b"after"])
        assert [f[1] for _, f in node_in.frames] == [str(i).encode() for i in range(100)]
    finally:
        worker.stop()
        node.stop()


def test_a_dealer_link_says_when_its_peer_is_gone() -> None:
    inbox = Inbox()
    ours, theirs = pair()
    hub = Hub(inbox.on_frames, on_event=inbox.on_event)
    hub.add_link("node", theirs)
    hub.start()
    try:
        ours.close()
        wait_until(lambda: inbox.events == [("node", "disconnected")])
    finally:
        hub.stop()


def test_a_link_end_is_not_inherited_by_processes_started_without_it(links: Pair) -> None:
    a, b = links()
    assert not a.sock.get_inheritable() and not b.sock.get_inheritable()
    assert a.sock.family == socket.AF_UNIX


def _send_raw(link: Link, lengths: list[int], fds: list[int], body: bytes = b"") -> None:
    """A message written by hand: its header, ``body`` in the stream, ``fds`` with it."""
    header = struct.pack(f"<I{len(lengths)}Q", len(lengths), *lengths)
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    link.sock.sendmsg([header + body], rights)


def _file_of(data: bytes, *, sealed: bool) -> int:
    fd = os.memfd_create("test", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if sealed:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK
                    | fcntl.F_SEAL_GROW)
    return fd


def test_a_large_frame_travels_in_a_sealed_memory_file_and_arrives_mapped(links: Pair) -> None:
    a, b = links(views=True)
    big = os.urandom(FILE_BYTES)
    assert a.send([b"head", big, b"tail"])
    got = read_all(b, 1, a)
    assert [bytes(f) for f in got[0]] == [b"head", big, b"tail"]
    assert isinstance(got[0][1], memoryview) and got[0][1].readonly
    assert len(os.listdir("/proc/self/fd")) == len(set(os.listdir("/proc/self/fd")))  # (sane)


def test_a_large_frame_leaves_without_giving_the_gil_to_a_spinning_thread(links: Pair) -> None:
    """A worker's link makes, sends and closes a large frame's memory file without giving the
    GIL up: a thread of task code that holds it (a driver slicing in a tight loop) would take
    it at every such call and keep it for its switch interval, and the frames would trickle
    out (bench/README.md, "Fewer Python calls a task"). Here a spinning thread must not run
    while the frame leaves. (Through the socket's and os's calls instead, it ran in 5 of 6
    runs: a thread woken for the GIL may miss a short release on a busy machine.)"""
    if links_module._LIBC is None:
        pytest.skip("no C library through ctypes here")  # (not on Linux: no memory files)
    a, b = links(views=True)
    big = os.urandom(FILE_BYTES)
    spins = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            spins[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1.0)  # no forced switch within one send (~1 ms), however busy
    spinner = threading.Thread(target=spin, daemon=True)
    try:
        spinner.start()
        wait_until(lambda: spins[0] > 1000, 10, "the spinning thread to run")
        gc.collect()
        gc.disable()  # (a finalizer run meanwhile, closing an older file, would give it up)
        before = spins[0]  # (this thread has just got the GIL back from it)
        assert a.send([b"head", big])
        during = spins[0] - before
    finally:
        gc.enable()
        stop.set()
        sys.setswitchinterval(interval)
        spinner.join(10)
    assert during == 0, f"the spinning thread ran {during} times while the frame left"
    assert [bytes(f) for f in read_all(b, 1, a)[0]] == [b"head", big]


@pytest.mark.parametrize("hostile", ["unsealed", "wrong size", "a plain file", "no file",
                                     "files without messages"])
def test_a_frame_in_a_file_that_is_not_a_sealed_one_of_its_size_breaks_the_link(
        hostile: str, links: Pair, tmp_path: Path) -> None:
    """A file its peer could still write to (what the reader checked could change under it),
    of another size, or any other kind of descriptor: the link is cut, the descriptor closed."""
    a, b = links(views=True)
    assert a.send([b"first"])
    size = FILE_BYTES
    fds: list[int]
    if hostile == "unsealed":
        fds = [_file_of(b"x" * size, sealed=False)]
    elif hostile == "wrong size":
        fds = [_file_of(b"x" * (size - 1), sealed=True)]
    elif hostile == "a plain file":
        (tmp_path / "plain").write_bytes(b"x" * size)
        fds = [os.open(tmp_path / "plain", os.O_RDONLY)]
    else:
        fds = []
    try:
        if hostile == "files without messages":  # (each message carries one it never names)
            for _ in range(100):
                fd = _file_of(b"x", sealed=True)
                _send_raw(a, [1], [fd], b"y")
                os.close(fd)
        else:
            _send_raw(a, [size | IN_FILE], fds)
        before = len(os.listdir("/proc/self/fd"))
        got = read_all(b, 101)
        if hostile == "files without messages":
            assert b.closed and b.broken and len(got) < 100
        else:
            assert got == [[b"first"]] and b.closed and b.broken
        assert len(os.listdir("/proc/self/fd")) <= before  # (what came is closed)
    finally:
        for fd in fds:
            os.close(fd)


# --- a node's workers over links (--worker-links) ------------------------------------------

from actors import Client, LocalCluster, ParallelTask, Task  # noqa: E402
from actors.errors import WorkerKilled  # noqa: E402

MIB = 1 << 20


class WhereAmI(Task):
    """Whether this worker reaches its node over a link, and whether the node's run folder
    (its scratch folder's parent) holds a socket for workers."""

    def work(self, _: int) -> tuple[bool, bool]:
        import gc

        from transport.hub import Hub as TheHub

        hub = next(o for o in gc.get_objects() if type(o) is TheHub)
        run_dir = os.path.dirname(os.getcwd())
        return bool(hub._link_fds), os.path.exists(os.path.join(run_dir, "workers.sock"))


class Echoes(ParallelTask):
    """Units of 1 MiB each way (in memory files on a link), checked at both ends."""

    def get_work(self):  # type: ignore[no-untyped-def]
        for i in range(40):
            yield bytes([i]) * MIB

    def work_unit(self, unit: bytes) -> bytes:
        assert len(unit) == MIB and unit[0] == unit[-1]
        return unit[::-1]

    def reduce(self, results: list[bytes]) -> list[int]:
        return sorted(r[0] for r in results if len(r) == MIB)


class DiesOnce(Task):
    def work(self, marker: str) -> str:
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), 9)
        return "ran again"


class GarblesItsLink(Task):
    """Task code writing past the framing on its worker's link: a header of no frames."""

    def work(self) -> str:
        import gc

        from transport.hub import Hub as TheHub

        hub = next(o for o in gc.get_objects() if type(o) is TheHub)
        link = next(link for _name, link in hub._link_fds.values())
        os.write(link.fd, struct.pack("<I", 0) + os.urandom(64))
        return "written"


@pytest.mark.parametrize("local_node", ["inside", "process"])
def test_a_cluster_whose_workers_have_links_serves_and_leaves_no_socket_for_workers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, local_node: str) -> None:
    """With --worker-links ($ACTORS_WORKER_LINKS, which a master's local node reads too, inside
    the master's process or a process of its own) each worker reaches its node over a socket
    pair made before it started: tasks, 1 MiB units each way, a worker killed with SIGKILL and
    replaced by a spawned one that gets a link too; and the node's run folder holds no socket
    any process could open under a worker's id."""
    monkeypatch.setenv("ACTORS_WORKER_LINKS", "1")
    monkeypatch.setenv("ACTORS_LOCAL_NODE", local_node)
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        assert [f.result(30) for f in client.map(WhereAmI, range(4))] == [(True, False)] * 4
        assert client.submit(Echoes).result(60) == list(range(40))
        assert client.submit(DiesOnce, str(tmp_path / "marker")).result(60) == "ran again"
        wait_until_workers(client, 2)
        assert [f.result(30) for f in client.map(WhereAmI, range(4))] == [(True, False)] * 4


def wait_until_workers(client: Client, count: int) -> None:
    wait_until(lambda: client.info().workers == count, 30, f"{count} workers")


def test_task_code_that_breaks_its_links_framing_loses_its_worker_not_its_node(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The node cuts a link whose peer breaks the framing; the worker, its link gone, leaves;
    its task is retried elsewhere and fails for good; the node and the other workers serve on."""
    monkeypatch.setenv("ACTORS_WORKER_LINKS", "1")
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        with pytest.raises(WorkerKilled):
            client.submit(GarblesItsLink).result(60)
        wait_until_workers(client, 2)
        assert [f.result(30) for f in client.map(WhereAmI, range(2))] == [(True, False)] * 2
