"""Submissions the master holds back while their client already has a full window queued.

A client that submits 10^5 small tasks at once used to cost the master a scheduler record per
task (about 850 bytes of small Python objects each) for as long as the backlog lasted, and
those objects, spread over the allocator's arenas, kept much of that memory from going back
to the system after the burst (docs/architecture.md, Memory after a backlog). Only the first
tasks of a client's backlog can start soon: each client's tasks leave the scheduler's queue in
their submission order (fair_share.py: a client's start tags only move on), so only its head
has to be in the queue for the fair order between clients to be the same.

So the master hands the scheduler at most ``WINDOW`` queued tasks per client and priority; the
rest wait here, in submission order, as compact records: ``CHUNK`` of them encoded as one
MessagePack blob (one large block outside the small-object allocator, freed whole once taken).
When the scheduler holds fewer than ``LOW`` of that client and priority, the master takes the
next ones (``take``) and submits them to the scheduler as if they had just arrived.

A held task is still the client's task in every other way: it was acknowledged (and journaled,
on a durable master) on arrival; its id is known (a resent submit is not taken twice); it can
be cancelled and named as another task's input (the master gives it to the scheduler first,
out of its turn: ``take_one``), detached, listed, and asked for its story (answered from
here). Each id maps to its chunk, so that one found out of its turn costs one chunk's decoding
at most, not a scan of the backlog. A plain class: the Master actor owns it; no I/O.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator

import msgspec

WINDOW = 2048  # queued tasks of one client and priority the scheduler holds at most ...
LOW = 1024  # ... topped up to WINDOW once it holds fewer than this
CHUNK = 256  # held submissions encoded together


class Held(msgspec.Struct, array_like=True, frozen=True, gc=False):
    """A submission as it waits here: what ``TaskSubmitted`` needs but the code (the client's
    shipped code is found again by its hash; a deployed task names its package version)."""

    task_id: str
    name: str
    kind: str
    code_hash: str
    args: bytes
    retries: int
    package: str
    version: str
    held_at: float  # the master's clock when it arrived


# A sealed chunk: the distinct (name, kind, code hash, package, version) of its submissions (a
# burst's tasks are mostly of one class), then each as (id, its shape's index, arguments,
# retries, held_at).
_Shape = tuple[str, str, str, str, str]
_Row = tuple[str, int, bytes, int, float]
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(tuple[list[_Shape], list[_Row]])


def _seal(batch: list[Held]) -> bytes:
    shapes: dict[_Shape, int] = {}
    rows = [(h.task_id, shapes.setdefault((h.name, h.kind, h.code_hash, h.package, h.version),
                                          len(shapes)), h.args, h.retries, h.held_at)
            for h in batch]
    return _encoder.encode((list(shapes), rows))


def _unseal(chunk: bytes) -> list[Held]:
    shapes, rows = _decoder.decode(chunk)
    return [Held(task_id, *shapes[shape][:3], args, retries, *shapes[shape][3:], held_at)
            for task_id, shape, args, retries, held_at in rows]


Key = tuple[str, int]  # (client id, priority)


class _Chunk:
    """Up to ``CHUNK`` held submissions of one FIFO: a list while it fills (or once decoded to
    be taken from), else one sealed blob. ``taken``: how many at its front were taken; ``live``:
    how many are still held (neither taken nor taken out of turn)."""

    __slots__ = ("number", "fifo", "items", "sealed", "taken", "live")

    def __init__(self, number: int, fifo: _Fifo) -> None:
        self.number = number  # the one int object every id of this chunk maps to (Backlog.ids)
        self.fifo = fifo
        self.items: list[Held] | None = []
        self.sealed = b""
        self.taken = 0
        self.live = 0

    def records(self) -> list[Held]:
        if self.items is None:  # decoded once: what is asked for out of turn, often is again
            self.items, self.sealed = _unseal(self.sealed), b""
        return self.items


class _Fifo:
    """One client's held submissions at one priority: its chunks, oldest first."""

    __slots__ = ("key", "owner", "chunks", "counted")

    def __init__(self, key: Key, owner: str) -> None:
        self.key = key
        self.owner = owner  # the submitter's key (TaskSubmitted.owner)
        self.counted = owner or key[0]  # whose tasks they count as (as the scheduler's owner)
        self.chunks: deque[_Chunk] = deque()


class Backlog:
    def __init__(self) -> None:
        self._fifos: dict[Key, _Fifo] = {}
        # Held and not yet taken, out of turn or not, nor dropped: task -> its chunk's number. A
        # record whose id is no longer here is skipped when its turn comes. Read as it is on
        # the master's hot paths (is any held, is this one): a dict's test, not a call a task.
        self.ids: dict[str, int] = {}
        self._chunks: dict[int, _Chunk] = {}
        self._numbers = itertools.count()
        self._owners: dict[str, int] = {}  # held submissions by owner (see held_of_owner)
        self.held_bytes: dict[str, int] = {}  # ... and the bytes of their arguments (by owner)
        self.detached: set[str] = set()  # held tasks their client detached (fire and forget)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.ids

    def waiting(self) -> list[Key]:
        """The keys whose submissions are held."""
        return list(self._fifos)

    def holds(self, key: Key) -> bool:
        """Whether submissions of this client and priority wait here (a new one must too, so
        that its tasks keep their order)."""
        return key in self._fifos

    def client_of(self, task_id: str) -> str | None:
        number = self.ids.get(task_id)
        return self._chunks[number].fifo.key[0] if number is not None else None

    def held_of_owner(self, owner: str) -> int:
        """How many submissions of this owner (a key, or a client without one) are held."""
        return self._owners.get(owner, 0)

    def _count(self, fifo: _Fifo, change: int, size: int) -> None:
        owner = fifo.counted
        if count := self._owners.get(owner, 0) + change:
            self._owners[owner] = count
        else:
            self._owners.pop(owner, None)
        if total := self.held_bytes.get(owner, 0) + size:
            self.held_bytes[owner] = total
        else:
            self.held_bytes.pop(owner, None)

    def hold(self, key: Key, owner: str, held: Held) -> None:
        fifo = self._fifos.get(key)
        if fifo is None:
            fifo = self._fifos[key] = _Fifo(key, owner)
        chunk = fifo.chunks[-1] if fifo.chunks else None
        if chunk is None or chunk.items is None or len(chunk.items) >= CHUNK:
            chunk = _Chunk(next(self._numbers), fifo)
            self._chunks[chunk.number] = chunk
            fifo.chunks.append(chunk)
        assert chunk.items is not None
        chunk.items.append(held)
        chunk.live += 1
        self.ids[held.task_id] = chunk.number
        self._count(fifo, 1, len(held.args))
        if len(chunk.items) == CHUNK and not chunk.taken and len(fifo.chunks) > 1:
            chunk.sealed, chunk.items = _seal(chunk.items), None

    def take(self, key: Key, count: int) -> tuple[str, list[Held]]:
        """Up to ``count`` of the oldest held submissions of ``key`` (its owner, them); the
        FIFO goes once empty."""
        fifo = self._fifos.get(key)
        if fifo is None:
            return "", []
        taken: list[Held] = []
        while len(taken) < count and fifo.chunks:
            chunk = fifo.chunks[0]
            records = chunk.records()
            while chunk.taken < len(records) and len(taken) < count:
                held = records[chunk.taken]
                chunk.taken += 1
                if self.ids.get(held.task_id) == chunk.number:
                    del self.ids[held.task_id]
                    chunk.live -= 1
                    taken.append(held)
            if chunk.taken == len(records) and (len(records) == CHUNK or len(fifo.chunks) > 1):
                self._close(fifo.chunks.popleft())
            elif chunk.taken == len(records):
                break  # the chunk still filling, taken to its end
        self._count(fifo, -len(taken), -sum(len(held.args) for held in taken))
        if not fifo.chunks or (len(fifo.chunks) == 1 and not fifo.chunks[0].live):
            self._drop_fifo(fifo)
        return fifo.owner, taken

    def take_one(self, task_id: str) -> tuple[Key, str, Held] | None:
        """This held submission, out of its turn (to cancel it, or because another task names
        it as an input): its key, owner and record; None if it is not held."""
        held = self.find(task_id)
        if held is None:
            return None
        chunk = self._chunks[self.ids.pop(task_id)]
        chunk.live -= 1
        self._count(chunk.fifo, -1, -len(held.args))
        return chunk.fifo.key, chunk.fifo.owner, held

    def find(self, task_id: str) -> Held | None:
        number = self.ids.get(task_id)
        if number is None:
            return None
        return next(held for held in self._chunks[number].records() if held.task_id == task_id)

    def ahead_of(self, task_id: str) -> int:
        """How many submissions of its client and priority wait here before it."""
        chunk = self._chunks[self.ids[task_id]]
        ahead = 0
        for before in chunk.fifo.chunks:
            if before is chunk:
                break
            ahead += before.live
        for held in chunk.records():
            if held.task_id == task_id:
                return ahead
            ahead += self.ids.get(held.task_id) == chunk.number
        return ahead

    def of_clients(self, client_ids: set[str],
                   newest: int | None = None) -> Iterator[tuple[str, int, Held]]:
        """The held submissions of these clients, oldest first per FIFO: (client, priority,
        record); with ``newest``, only that many of each FIFO, its newest (all a listing of at
        most that many can show), decoding only their chunks: a client could ask for its list
        at any rate, and a backlog of 10^6 is 4,000 chunks to decode. For a listing, rare."""
        for (client, priority), fifo in list(self._fifos.items()):
            if client not in client_ids:
                continue
            parts: list[list[Held]] = []  # newest chunk first
            count = 0
            for chunk in reversed(fifo.chunks):
                if newest is not None and count >= newest:
                    break
                records = chunk.records() if chunk.items is not None else _unseal(chunk.sealed)
                live = [h for h in records if self.ids.get(h.task_id) == chunk.number]
                parts.append(live)
                count += len(live)
            held = [h for part in reversed(parts) for h in part]
            for record in held[-newest:] if newest is not None and newest < len(held) else held:
                yield client, priority, record

    def drop_client(self, client_id: str) -> tuple[str, list[tuple[int, Held]]]:
        """Everything of a client that left: (its owner, (priority, record) of each, oldest
        first per priority). None of it is held any more."""
        owner, dropped = "", list[tuple[int, Held]]()
        for fifo in [f for k, f in self._fifos.items() if k[0] == client_id]:
            owner = fifo.owner
            before, size = len(dropped), 0
            for chunk in fifo.chunks:
                for held in chunk.records():
                    if self.ids.get(held.task_id) == chunk.number:
                        del self.ids[held.task_id]
                        dropped.append((fifo.key[1], held))
                        size += len(held.args)
            self._count(fifo, before - len(dropped), -size)
            self._drop_fifo(fifo)
        return owner, dropped

    def _drop_fifo(self, fifo: _Fifo) -> None:
        for chunk in fifo.chunks:
            self._close(chunk)
        fifo.chunks.clear()
        del self._fifos[fifo.key]

    def _close(self, chunk: _Chunk) -> None:
        del self._chunks[chunk.number]
        for held in chunk.items or ():  # what is still held in it (taken out of turn: gone)
            if self.ids.get(held.task_id) == chunk.number:
                raise AssertionError(f"held task {held.task_id} dropped with its chunk")

    def compact(self) -> None:
        """A dict keeps its table's size after a backlog went (see memory.py)."""
        self.ids, self._chunks = dict(self.ids), dict(self._chunks)
        self._owners, self.held_bytes = dict(self._owners), dict(self.held_bytes)
