"""The master's journal of finished unit results: a restarted driver gets them back.

A driver holds the results of its task's units until ``reduce``; when its worker dies, they die
with it. The master writes each batch of results it forwards to a driver into this SQLite file
(WAL), as one row per batch, so that writing costs one insert per batch, not per unit, and the
master's memory stays flat however many units a task has. When the new driver slices again, the
units that had finished are looked up here and replayed to it instead of run again: only those
whose arguments hash the same (a slicer that yields something else at an index is recomputed).

A row: ``(task, first, last, data)``: ``data`` is the batch ``[(index, digest, value), ...]``
encoded with msgpack, ``first``/``last`` its lowest and highest unit index (for lookups by range).
Commits happen on the master's tick; an uncommitted row is already visible to the master's own
connection, which is the only reader.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable

import msgspec

Entry = tuple[int, int, bytes]  # unit index, digest of its arguments, result

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(list[tuple[int, int, bytes]])


class ResultJournal:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=normal")
        self._db.execute(
            "create table if not exists results (task text, first integer, last integer, data blob)")
        self._db.execute("create index if not exists by_task on results (task, first)")
        self._open = False  # a transaction is open (committed at the next tick)
        self._tasks: set[str] = set()  # tasks with rows: most (every plain Task) never have one

    def record(self, task_id: str, entries: list[Entry]) -> None:
        if not entries:
            return
        self._begin()
        self._tasks.add(task_id)
        indices = [index for index, _, _ in entries]
        self._db.execute("insert into results values (?, ?, ?, ?)",
                         (task_id, min(indices), max(indices), _encoder.encode(entries)))

    def lookup(self, task_id: str, indices: Iterable[int]) -> dict[int, tuple[int, bytes]]:
        """The journaled ``(digest, result)`` of each of these units that has one."""
        wanted = set(indices)
        if not wanted:
            return {}
        rows = self._db.execute(
            "select data from results where task = ? and first <= ? and last >= ? order by rowid",
            (task_id, max(wanted), min(wanted)))
        found: dict[int, tuple[int, bytes]] = {}  # a unit recorded twice: the later one
        for (data,) in rows:
            for index, digest, value in _decoder.decode(data):
                if index in wanted:
                    found[index] = (digest, value)
        return found

    def forget(self, task_id: str) -> None:
        if task_id not in self._tasks:
            return
        self._tasks.discard(task_id)
        self._begin()
        self._db.execute("delete from results where task = ?", (task_id,))

    def commit(self) -> None:
        if self._open:
            self._db.execute("commit")
            self._open = False

    def close(self) -> None:
        self.commit()
        self._db.close()

    def _begin(self) -> None:
        if not self._open:
            self._db.execute("begin")
            self._open = True
