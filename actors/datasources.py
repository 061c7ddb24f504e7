"""Ready slicers for the common inputs of a ``ParallelTask``: use them in ``get_work``.

Each is a generator, so the driver reads its input only as fast as units are dispatched (the
same look-ahead as any ``get_work``), and a unit's argument is one chunk::

    class CountWords(ParallelTask):
        def get_work(self, pattern):
            yield from byte_ranges(files(pattern), chunk_bytes=8 << 20)
        def work_unit(self, part):
            return sum(len(line.split()) for line in read_lines(part))
        def reduce(self, counts):
            return sum(counts)

- ``lines(paths, per_unit)``: the lines themselves, ``per_unit`` to a unit (they travel in the
  unit's argument: for inputs the workers cannot read).
- ``byte_ranges(paths, chunk_bytes)`` and ``read_lines(part)``: a file split by byte ranges on
  line boundaries, the worker reading its own range (large files on storage every worker
  sees: the data never passes through the master).
- ``files(pattern)``: the files a glob names (``**`` for a tree), in a stable order.
- ``sql_rows(database, query, params, per_unit)``: rows of a query, ``per_unit`` to a unit, read
  with ``fetchmany`` as units are needed; ``database`` is a SQLite file, or any URL SQLAlchemy
  reaches if it is installed.

A datasource belongs to its task instance: it is opened in the driver's ``get_work`` and closed
when the slicer is exhausted (or the task ends), never kept by a worker for the next task.
"""

from __future__ import annotations

import glob
import os
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from actors.errors import MissingDependency


@dataclass(frozen=True)
class ByteRange:
    """Lines of ``path`` that start at a byte offset in ``[start, end)``."""

    path: str
    start: int
    end: int


def files(pattern: str) -> list[str]:
    """The regular files ``pattern`` names (``**`` matches any depth), sorted."""
    found = [p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p)]
    return sorted(found)


def _paths(paths: str | Iterable[str]) -> list[str]:
    return [paths] if isinstance(paths, str | os.PathLike) else [str(p) for p in paths]


def lines(paths: str | Iterable[str], per_unit: int = 1_000) -> Iterator[list[str]]:
    """The lines of these files (without their newline), ``per_unit`` to a chunk."""
    if per_unit < 1:
        raise ValueError(f"per_unit must be at least 1, not {per_unit}")
    chunk: list[str] = []
    for path in _paths(paths):
        with open(path, encoding="utf-8", errors="replace") as text:
            for line in text:
                chunk.append(line.rstrip("\n"))
                if len(chunk) == per_unit:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def byte_ranges(paths: str | Iterable[str], chunk_bytes: int = 64 << 20) -> Iterator[ByteRange]:
    """Each file cut into ranges of about ``chunk_bytes``; ``read_lines`` gives each range's
    lines exactly once over all ranges (a line belongs to the range it starts in)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be at least 1, not {chunk_bytes}")
    for path in _paths(paths):
        size = os.path.getsize(path)
        for start in range(0, size, chunk_bytes):
            yield ByteRange(str(path), start, min(start + chunk_bytes, size))


def read_lines(part: ByteRange) -> Iterator[str]:
    """The lines (without their newline) that start within ``part``."""
    with open(part.path, "rb") as data:
        if part.start > 0:
            data.seek(part.start - 1)
            if data.read(1) != b"\n":
                data.readline()  # the line that started before this range is the previous one's
        while data.tell() < part.end:
            line = data.readline()
            if not line:
                return
            yield line.rstrip(b"\n").decode("utf-8", errors="replace")


def sql_rows(database: str, query: str, params: Sequence[Any] | dict[str, Any] = (),
             per_unit: int = 1_000) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of ``query``, ``per_unit`` to a chunk, fetched as the chunks are taken.
    ``database``: a SQLite file path (or ``sqlite:///path``), or a SQLAlchemy URL."""
    if per_unit < 1:
        raise ValueError(f"per_unit must be at least 1, not {per_unit}")
    if "://" in database and not database.startswith("sqlite:///"):
        yield from _sqlalchemy_rows(database, query, params, per_unit)
        return
    path = database.removeprefix("sqlite:///")
    if not os.path.exists(path):
        raise FileNotFoundError(f"no SQLite database at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cursor = db.execute(query, params)
        while rows := cursor.fetchmany(per_unit):
            yield [tuple(row) for row in rows]
    finally:
        db.close()


def _sqlalchemy_rows(url: str, query: str, params: Sequence[Any] | dict[str, Any],
                     per_unit: int) -> Iterator[list[tuple[Any, ...]]]:
    try:
        import sqlalchemy  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise MissingDependency("sqlalchemy", "sql_rows of a database other than SQLite",
                                "sql") from None
    engine = sqlalchemy.create_engine(url)
    try:
        with engine.connect() as connection:
            result = connection.execution_options(stream_results=True).execute(
                sqlalchemy.text(query), params or {})
            while rows := result.fetchmany(per_unit):
                yield [tuple(row) for row in rows]
    finally:
        engine.dispose()
