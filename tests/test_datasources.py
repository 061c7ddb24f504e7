"""Ready slicers: lines, byte ranges, files, SQL rows (pure functions, then one real job)."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from actors import Client, ParallelTask
from actors.datasources import ByteRange, byte_ranges, files, lines, read_lines, sql_rows
from actors.errors import MissingDependency
from tests.conftest import peak_mib


def _write(path: Path, rows: list[str]) -> Path:
    path.write_text("".join(f"{row}\n" for row in rows))
    return path


def test_byte_ranges_give_every_line_exactly_once_whatever_the_cut(tmp_path: Path) -> None:
    rng = random.Random(7)
    rows = ["x" * rng.randrange(0, 40) + str(i) for i in range(2_000)]
    data = _write(tmp_path / "data.txt", rows)
    (tmp_path / "tail.txt").write_text("no newline at the end")
    for chunk in (1, 7, 64, 4096, 10**9):
        parts = list(byte_ranges([data, tmp_path / "tail.txt"], chunk_bytes=chunk))
        got = [line for part in parts for line in read_lines(part)]
        assert got == [*rows, "no newline at the end"], chunk


def test_lines_files_and_sql_rows_come_in_chunks(tmp_path: Path) -> None:
    for name in ("b", "a", "sub/c"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        _write(tmp_path / f"{name}.txt", [f"{name}{i}" for i in range(3)])
    assert files(str(tmp_path / "**" / "*.txt")) == [
        str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(tmp_path / "sub" / "c.txt")]
    chunks = list(lines(files(str(tmp_path / "*.txt")), per_unit=4))
    assert chunks == [["a0", "a1", "a2", "b0"], ["b1", "b2"]]
    db = tmp_path / "rows.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("create table t (i integer, s text)")
        conn.executemany("insert into t values (?, ?)", [(i, str(i)) for i in range(2_500)])
    got = list(sql_rows(str(db), "select i from t where i >= ? order by i", (500,), per_unit=1000))
    assert [len(c) for c in got] == [1000, 1000]
    assert got[0][0] == (500,) and got[-1][-1] == (2499,)
    with pytest.raises(FileNotFoundError):
        next(sql_rows(str(tmp_path / "none.sqlite"), "select 1"))
    with pytest.raises(ValueError):
        next(lines([], per_unit=0))


def test_a_database_other_than_sqlite_needs_sqlalchemy_or_says_so() -> None:
    try:
        import sqlalchemy  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependency, match="sqlalchemy"):
            next(sql_rows("postgresql://nowhere/db", "select 1"))
    else:
        with pytest.raises(Exception):  # noqa: B017 (no such server: any connection error)
            next(sql_rows("postgresql://127.0.0.1:1/db", "select 1"))


class CountWords(ParallelTask):
    def get_work(self, pattern, chunk_bytes):
        yield from byte_ranges(files(pattern), chunk_bytes=chunk_bytes)

    def work_unit(self, part: ByteRange):
        return sum(len(line.split()) for line in read_lines(part))

    def reduce(self, counts):
        return sum(counts)


class SumRows(ParallelTask):
    def get_work(self, database):
        yield from sql_rows(database, "select n from numbers order by n", per_unit=5_000)

    def work_unit(self, rows):
        return sum(n for (n,) in rows)

    def reduce(self, sums):
        return sum(sums)


@pytest.mark.processes
def test_a_job_reads_files_by_byte_ranges_and_a_table_by_rows(client: Client,
                                                              tmp_path: Path) -> None:
    words = 0
    for f in range(3):
        rows = [" ".join(["w"] * ((i + f) % 9)) for i in range(20_000)]
        words += sum((i + f) % 9 for i in range(20_000))
        _write(tmp_path / f"part{f}.txt", rows)
    fut = client.submit(CountWords, str(tmp_path / "part*.txt"), 16 << 10)
    assert fut.result(timeout=120) == words
    assert fut.progress()[0] > 3  # many units, not one per file
    db = tmp_path / "numbers.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("create table numbers (n integer)")
        conn.executemany("insert into numbers values (?)", [(n,) for n in range(100_000)])
    assert client.submit(SumRows, str(db)).result(timeout=120) == sum(range(100_000))


class CountLines(ParallelTask):
    def get_work(self, pattern):
        yield from byte_ranges(files(pattern), chunk_bytes=16 << 20)

    def work_unit(self, part: ByteRange):
        return sum(1 for _ in read_lines(part))

    def reduce(self, counts):
        return sum(counts)


@pytest.mark.processes
def test_a_large_file_and_a_million_rows_pass_the_master_by(cluster, client: Client,
                                                             tmp_path: Path) -> None:
    """256 MiB of lines read by the workers in byte ranges and 10^6 SQLite rows: exact counts,
    and the master's peak memory grows by a small fraction of the data (the file never passes
    through it; the rows pass a chunk at a time)."""
    line = b"lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor\n"
    block = line * ((1 << 20) // len(line))
    big = tmp_path / "big.txt"
    with big.open("wb") as out:
        for _ in range(256):
            out.write(block)
    before = peak_mib(cluster.pid)
    assert client.submit(CountLines, str(big)).result(timeout=300) == 256 * (block.count(b"\n"))
    db = tmp_path / "million.sqlite"
    with sqlite3.connect(db) as conn:
        conn.execute("create table numbers (n integer)")
        conn.executemany("insert into numbers values (?)", ((n,) for n in range(1_000_000)))
    assert client.submit(SumRows, str(db)).result(timeout=300) == sum(range(1_000_000))
    grew = peak_mib(cluster.pid) - before
    assert grew < 32, f"the master's peak grew by {grew:.0f} MiB"
