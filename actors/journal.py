"""The master's journal: what a master restarted on the same state directory needs.

One SQLite file (WAL) in the master's state directory holds:

  meta      the schema version, the master's id (a restarted master keeps it, so that its
            clients and nodes know it as the same master) and its epoch (one more at every
            start: a fencing token, see ``commit``)
  tasks     every submitted task not yet delivered: its submission (owner, name, kind, code or
            code hash, arguments, priority, retries, package version) and, once it ended, the
            message for its client, kept until the client says it received it
  codes     the task code each client shipped by value, by content hash
  clients   each client's key, while the journal holds anything of it: a client back after a
            restart must say Hello with the key it had (its id alone would let another key
            take its results); added to a journal of an earlier version as it opens
  results   finished unit results of running ParallelTasks, one row per batch:
            ``(task, first, last, data)``, ``data`` = msgpack ``[(index, digest, value), ...]``,
            so that a restarted driver gets them back instead of running them again; a pack
            of units (``UnitCall.count``) has a row of its own, its one entry at ``first`` and
            ``last`` its last unit (a restarted master counts its units, not one)

Every write is buffered in memory and written by ``commit``, which the master calls on its tick:
a short transaction per tick, so that many small tasks share one fsync, a task that starts and
is delivered between two ticks never touches the disk, and a paused master never holds the
database's write lock for long. What a ``commit`` wrote is durable (``synchronous=full``); what
the master acknowledges to a client (``Accepted``) is only ever what a commit wrote.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, cast

import msgspec

from actors.errors import JournalUnreadable, MasterSuperseded
from actors.messages import MAX_PACK

SCHEMA = 3  # 3: a task's inputs (2 is taken as it is, its tasks without inputs)
COMMIT_WAIT_MS = 200
# Unit results held for the next commit, at most (see record), in bytes: each result's and
# ENTRY_BYTES for what holds it (4,096 tiny results, or a few hundred packs of them).
RESULTS_BUFFERED = 512 << 10
ENTRY_BYTES = 100
Entry = tuple[int, int, bytes]  # unit index, digest of its arguments, result
Row = tuple[int, int, list[Entry]]  # a results row: first unit, last unit, its entries

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[tuple[int, int, bytes]])

_TABLES = """
create table if not exists meta (key text primary key, value text not null);
create table if not exists tasks (
    task_id text primary key, client text not null, seq integer not null,
    priority integer not null, name text not null, kind text not null, code_hash text not null,
    code blob not null, args blob not null, package text not null, version text not null,
    retries integer not null, ended blob, inputs blob not null default x'');
create table if not exists codes (
    client text not null, hash text not null, code blob not null, primary key (client, hash));
create table if not exists results (task text, first integer, last integer, data blob);
create index if not exists by_task on results (task, first);
"""
_CLIENTS = "create table if not exists clients (client text primary key, key text not null)"


@dataclass(kw_only=True)
class TaskRow:
    """A submission as the journal keeps it (``code`` empty when ``code_hash`` names it)."""

    task_id: str
    client: str
    seq: int
    priority: int
    name: str
    kind: str
    code_hash: str
    code: bytes
    args: bytes
    package: str
    version: str
    retries: int
    ended: bytes | None = None  # the encoded message that ends it, for its client
    ended_in: int = -1  # the commit interval it ended in (an end waits one out: see commit)
    inputs: tuple[str, ...] = ()  # the tasks whose results its arguments name

    def values(self) -> tuple[object, ...]:
        return (self.task_id, self.client, self.seq, self.priority, self.name, self.kind,
                self.code_hash, self.code, self.args, self.package, self.version, self.retries,
                self.ended, _inputs_encoder.encode(list(self.inputs)) if self.inputs else b"")


_ROW_FIELDS = ("task_id", "client", "seq", "priority", "name", "kind", "code_hash", "code", "args",
               "package", "version", "retries", "ended", "inputs")  # the table's columns, in order
_inputs_encoder = msgspec.msgpack.Encoder()
_inputs_decoder = msgspec.msgpack.Decoder(list[str])


def _row(values: tuple[object, ...]) -> TaskRow:
    fields = dict(zip(_ROW_FIELDS, values, strict=True))
    encoded = cast(bytes, fields["inputs"])
    fields["inputs"] = tuple(_inputs_decoder.decode(encoded)) if encoded else ()
    return TaskRow(**fields)  # type: ignore[arg-type]


class Submitted(NamedTuple):
    """A submission a commit made durable (or, without a state directory, took note of): to
    acknowledge to its client."""

    task_id: str
    client: str


@dataclass
class Restored:
    """What a master finds in its journal at start."""

    tasks: list[TaskRow]  # in submission order; ``ended`` set: waiting for delivery
    codes: dict[str, dict[str, bytes]]  # client -> code hash -> code
    journaled: dict[str, list[int]]  # task -> unit indices with a journaled result
    keys: dict[str, bytes]  # client -> its key


class Journal:
    def __init__(self, path: str | os.PathLike[str], *, durable: bool = True) -> None:
        """``durable`` False: a journal that dies with its master (a temporary folder): only unit
        results are written, for drivers restarted in the master's life, and never synced;
        submissions are acknowledged at the next commit without being written."""
        self.path = str(path)
        self.durable = durable
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=5.0)
            # The commit's statements go through this one cursor: Connection.execute makes a
            # cursor per call, and the connection keeps a weak reference to each (up to 200
            # dead ones), a few of them in every memory arena of a burst (see pack_finished).
            self._cursor = self._db.cursor()
            self._db.execute("pragma journal_mode=wal")
            self._db.execute(f"pragma synchronous={'full' if durable else 'off'}")
            found = self._db.execute(
                "select count(*) from sqlite_master where type = 'table'").fetchone()[0]
            if found:
                self._check_schema()
            else:
                self._db.executescript(_TABLES)
                self._db.execute("insert into meta values ('schema', ?)", (str(SCHEMA),))
            self._db.execute(_CLIENTS)
        except sqlite3.DatabaseError as exc:
            raise JournalUnreadable(self.path, str(exc)) from exc
        self.master_id = ""
        self.epoch = 0
        # Writes waiting for the next commit. A task id maps to its row to write, or to None
        # (delete it). Rows on disk: the tasks the journal has written and not deleted.
        self._tasks: dict[str, TaskRow | None] = {}
        self._on_disk: dict[str, str] = {}  # task -> its client
        self._codes: list[tuple[str, str, bytes]] = []
        self._keys: dict[str, str] = {}  # client -> its key, to write
        self._gone_clients: list[str] = []
        self._results: dict[str, list[Row]] = {}  # task -> rows not yet written
        self._forget: set[str] = set()  # tasks whose results rows go
        self._with_results: set[str] = set()  # tasks with result rows on disk
        self._commits = 0  # commits so far: the intervals ends are counted in
        # Unit results waiting for the commit: the master commits early past RESULTS_BUFFERED,
        # so that a fast task's results do not pile up in its memory between two ticks.
        self.results_buffered = 0
        self._acks: list[Submitted] = []  # submissions to acknowledge (not durable)

    def _check_schema(self) -> None:
        row = self._db.execute("select value from meta where key = 'schema'").fetchone()
        if row is not None and row[0] == "2":  # the last before inputs: its tasks have none
            with self._db:
                self._db.execute("alter table tasks add column inputs blob not null default x''")
                self._db.execute("update meta set value = ? where key = 'schema'", (str(SCHEMA),))
            row = (str(SCHEMA),)
        if row is None or row[0] != str(SCHEMA):
            raise JournalUnreadable(
                self.path, f"written by journal schema {row[0] if row else 'unknown'}, "
                           f"this master reads schema {SCHEMA}")
        problem = self._db.execute("pragma quick_check").fetchone()[0]
        if problem != "ok":
            raise JournalUnreadable(self.path, f"integrity check failed: {problem}")

    # --- start ---------------------------------------------------------------------------

    def start(self, new_master_id: str) -> Restored:
        """Take the journal: keep its master id (or record ``new_master_id`` in a new one),
        count one more epoch, and read back what the last master left."""
        try:
            self._db.execute("begin immediate")
            meta = dict(self._db.execute("select key, value from meta").fetchall())
            self.master_id = meta.get("master_id") or new_master_id
            self.epoch = int(meta.get("epoch", "0")) + 1
            self._db.executemany("insert or replace into meta values (?, ?)",
                                 [("master_id", self.master_id), ("epoch", str(self.epoch))])
            self._db.execute("commit")
            rows = self._db.execute("select * from tasks order by seq").fetchall()
            tasks = [_row(row) for row in rows]
            codes: dict[str, dict[str, bytes]] = {}
            for client, code_hash, code in self._db.execute("select * from codes"):
                codes.setdefault(client, {})[code_hash] = code
            journaled: dict[str, list[int]] = {}
            for task_id, first, last, data in self._db.execute(
                    "select task, first, last, data from results order by rowid"):
                journaled.setdefault(task_id, []).extend(row_units(first, last, data))
            keys = {client: key.encode()
                    for client, key in self._db.execute("select client, key from clients")}
        except (sqlite3.DatabaseError, msgspec.DecodeError, TypeError, ValueError) as exc:
            raise JournalUnreadable(self.path, str(exc)) from exc
        self._on_disk = {row.task_id: row.client for row in tasks}
        self._with_results = set(journaled)
        # From now on the master's thread waits this long at most for another process's lock
        # (a backup, sqlite3 at a terminal): a commit that cannot have it is tried again
        # later (Master._commit), not waited for while every peer goes unheard.
        self._db.execute(f"pragma busy_timeout = {COMMIT_WAIT_MS}")
        return Restored(tasks, codes, journaled, keys)

    # --- buffered writes -------------------------------------------------------------------

    def task_added(self, row: TaskRow) -> None:
        if self.durable:
            self._tasks[row.task_id] = row
        else:
            self._acks.append(Submitted(row.task_id, row.client))

    def task_noted(self, task_id: str, client: str) -> None:
        """``task_added`` where nothing is written (not ``durable``): the submission is only
        acknowledged at the next commit, and no row need be made for it."""
        self._acks.append(Submitted(task_id, client))

    def task_ended(self, task_id: str, client: str, message: bytes) -> None:
        """The task ended; ``message`` (for its client) is kept until ``delivered``."""
        row = self._tasks.get(task_id)
        if row is None and task_id in self._on_disk:
            row = self._tasks[task_id] = _Ended(task_id, client, message)
        if row is not None:
            row.ended, row.ended_in = message, self._commits
        self.forget_results(task_id)

    def delivered(self, task_id: str, client: str) -> None:
        """``client`` received the end of its task ``task_id`` (another client's: ignored)."""
        row = self._tasks.get(task_id)
        if (row.client if row is not None else self._on_disk.get(task_id)) != client:
            return
        if task_id in self._on_disk:
            self._tasks[task_id] = None
        else:
            self._tasks.pop(task_id, None)

    def knows(self, task_id: str) -> bool:
        """Submitted and not yet delivered (ended or not)."""
        if task_id in self._tasks:
            return self._tasks[task_id] is not None
        return task_id in self._on_disk

    def client_of(self, task_id: str) -> str | None:
        """The client of a task submitted and not yet delivered (None: no such task)."""
        if task_id in self._tasks:
            row = self._tasks[task_id]
            return row.client if row is not None else None
        return self._on_disk.get(task_id)

    def on_disk(self, task_id: str) -> bool:
        return task_id in self._on_disk and self._tasks.get(task_id, True) is not None

    def current_epoch(self) -> int:
        """The epoch in the file now (a master that took over counted one more)."""
        row = self._cursor.execute("select value from meta where key = 'epoch'").fetchone()
        return int(row[0])

    def code_added(self, client: str, code_hash: str, code: bytes) -> None:
        if self.durable:
            self._codes.append((client, code_hash, code))

    def client_key(self, client: str, key: bytes) -> None:
        """The key ``client`` said Hello with (written once per client and key)."""
        if self.durable:
            self._keys[client] = key.decode(errors="replace")

    def client_left(self, client: str) -> None:
        """Its tasks, results to deliver, code and key go (after its tasks were cancelled)."""
        self._gone_clients.append(client)
        self._keys.pop(client, None)
        for task_id, row in list(self._tasks.items()):
            if row is not None and row.client == client:
                self.delivered(task_id, client)
        self._codes = [c for c in self._codes if c[0] != client]

    def compact(self) -> None:
        """Rebuild the in-memory tables (a dict keeps its size after a backlog drained)."""
        self._tasks, self._on_disk, self._results = (
            dict(self._tasks), dict(self._on_disk), dict(self._results))

    def record(self, task_id: str, entries: list[Entry],
               packs: Mapping[int, int] | None = None) -> None:
        """Finished units' results, for the next commit; ``packs``: those of them that are packs,
        first index -> how many units (a row each, so that a restart counts their units)."""
        if not entries:
            return
        rows = self._results.setdefault(task_id, [])
        singles = [entry for entry in entries if entry[0] not in packs] if packs else entries
        if singles:  # (index, digest, result) tuples: the least and greatest compare by index
            rows.append((min(singles)[0], max(singles)[0], singles))
        if packs:
            rows += [(entry[0], entry[0] + packs[entry[0]] - 1, [entry])
                     for entry in entries if entry[0] in packs]
        self.results_buffered += _weight(entries)

    def forget_results(self, task_id: str) -> None:
        dropped = self._results.pop(task_id, None)
        if dropped:
            self.results_buffered -= sum(_weight(entries) for _, _, entries in dropped)
        if task_id in self._with_results:
            self._forget.add(task_id)

    def lookup(self, task_id: str, indices: Iterable[int]) -> dict[int, tuple[int, bytes]]:
        """The journaled ``(digest, result)`` of each of these units that has one."""
        wanted = set(indices)
        found: dict[int, tuple[int, bytes]] = {}  # a unit recorded twice: the later one
        if not wanted:
            return found
        if task_id in self._with_results and task_id not in self._forget:
            rows = self._db.execute(
                "select data from results where task = ? and first <= ? and last >= ? "
                "order by rowid", (task_id, max(wanted), min(wanted)))
            for (data,) in rows:
                self._take(_decoder.decode(data), wanted, found)
        for _, _, entries in self._results.get(task_id, ()):
            self._take(entries, wanted, found)
        return found

    @staticmethod
    def _take(entries: list[Entry], wanted: set[int], found: dict[int, tuple[int, bytes]]) -> None:
        for index, digest, value in entries:
            if index in wanted:
                found[index] = (digest, value)

    def undelivered(self, client: str) -> list[tuple[str, bytes]]:
        """The messages ending this client's tasks that it has not said it received."""
        out = {task_id: row.ended for task_id, row in self._tasks.items()
               if row is not None and row.client == client and row.ended is not None}
        for task_id, ended in self._db.execute(
                "select task_id, ended from tasks where client = ? and ended is not null", (client,)):
            if task_id not in self._tasks:
                out[task_id] = ended
        return [(task_id, ended) for task_id, ended in out.items() if ended is not None]

    # --- commit ------------------------------------------------------------------------------

    def commit(self) -> list[Submitted]:
        """Write what is buffered in one transaction; the tasks whose submission this made
        durable (to acknowledge). Raises ``MasterSuperseded`` (writing nothing) when a newer
        master took the journal over since ``start``.

        A task that ended in this interval waits for the next commit: its client, which gets
        the end now, most likely says it received it by then, and then the task never touches
        the disk. Not written, it is not acknowledged either: until its end arrives, the client
        keeps the submission to send again, so a master that dies meanwhile loses nothing."""
        self._commits += 1
        acks, self._acks = self._acks, []
        if not (self._tasks or self._codes or self._keys or self._gone_clients or self._results
                or self._forget):
            return acks
        young = self._commits - 1
        later = {t: r for t, r in self._tasks.items()
                 if r is not None and r.ended is not None and r.ended_in == young}
        for task_id in later:
            del self._tasks[task_id]
        db = self._cursor
        try:
            db.execute("begin immediate")  # (waits COMMIT_WAIT_MS for another one's lock)
            epoch = self.current_epoch()
            if epoch != self.epoch:
                raise MasterSuperseded(self.path, self.epoch, epoch)
            rows = [r for r in self._tasks.values() if r is not None]
            gone = [(t,) for t, r in self._tasks.items() if r is None]
            db.executemany("delete from tasks where task_id = ?", gone)
            # (one row a task: the order of these statements changes nothing)
            whole = [r for r in rows if not isinstance(r, _Ended)]
            db.executemany("update tasks set ended = ? where task_id = ?",
                           [(r.ended, r.task_id) for r in rows if isinstance(r, _Ended)])
            db.executemany("insert or replace into tasks values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                           [r.values() for r in whole])
            added: list[TaskRow] = [r for r in whole if r.task_id not in self._on_disk]
            db.executemany("insert or ignore into codes values (?, ?, ?)", self._codes)
            db.executemany("insert or replace into clients values (?, ?)", self._keys.items())
            for client in self._gone_clients:
                db.execute("delete from tasks where client = ?", (client,))
                db.execute("delete from codes where client = ?", (client,))
                db.execute("delete from clients where client = ?", (client,))
            db.executemany("delete from results where task = ?", [(t,) for t in self._forget])
            db.executemany("insert into results values (?, ?, ?, ?)", [
                (task_id, first, last, _encoder.encode(entries))
                for task_id, rows in self._results.items() for first, last, entries in rows])
            db.execute("commit")
        except BaseException:
            # All of it stays buffered for the next commit (disk full, an I/O error, the file
            # locked by another process): what was not written is not acknowledged.
            if self._db.in_transaction:  # (not when the begin itself failed)
                db.execute("rollback")
            self._tasks.update(later)
            self._acks[:0] = acks
            raise
        for (task_id,) in gone:
            self._on_disk.pop(task_id, None)
        self._on_disk.update((r.task_id, r.client) for r in rows)
        for client in self._gone_clients:
            for task_id in [t for t, c in self._on_disk.items() if c == client]:
                del self._on_disk[task_id]
        self._with_results.difference_update(self._forget)
        self._with_results.update(self._results)
        self._tasks.clear()
        self._tasks.update(later)
        self._codes.clear()
        self._keys.clear()
        self._gone_clients.clear()
        self._results.clear()
        self.results_buffered = 0
        self._forget.clear()
        return acks + [Submitted(r.task_id, r.client) for r in added]

    def close(self) -> None:
        self._db.close()


class _Ended(TaskRow):
    """A written task that ended: only its ``ended`` column changes."""

    def __init__(self, task_id: str, client: str, ended: bytes) -> None:
        super().__init__(task_id=task_id, client=client, seq=0, priority=0, name="", kind="",
                         code_hash="", code=b"", args=b"", package="", version="", retries=0,
                         ended=ended)


def row_units(first: int, last: int, data: bytes) -> Iterable[int]:
    """The units a results row holds: its entries' indices, or each unit of the pack it is (one
    entry at ``first``, ``last`` past it; rows written before packs had rows of their own end at
    their last entry)."""
    entries = _decoder.decode(data)
    if len(entries) == 1 and entries[0][0] == first and first < last < first + MAX_PACK:
        return range(first, last + 1)
    return [index for index, _, _ in entries]


def _weight(entries: list[Entry]) -> int:
    """What buffered results weigh towards RESULTS_BUFFERED."""
    return sum(len(value) for _, _, value in entries) + ENTRY_BYTES * len(entries)
