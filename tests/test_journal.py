"""The master's journal on a real SQLite file, against another process's lock on it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from actors.journal import Journal, TaskRow


def row(task_id: str, client: str = "client-1", seq: int = 0) -> TaskRow:
    return TaskRow(task_id=task_id, client=client, seq=seq, priority=0, name="Add", kind="task",
                   code_hash="", code=b"code", args=b"args", package="", version="", retries=0)


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """The file's write lock held, as by a backup or sqlite3 at a terminal."""
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("begin exclusive")
    try:
        yield
    finally:
        other.execute("rollback")
        other.close()


def journal(path: Path, *, durable: bool = True) -> Journal:
    opened = Journal(path, durable=durable)
    opened.start("master-test")
    return opened


def test_a_commit_that_cannot_begin_keeps_everything_for_the_next(tmp_path: Path) -> None:
    """A commit whose transaction cannot begin (the file locked) lost the ends of the tasks
    that ended in the interval before it: a restart would then run those tasks again."""
    path = tmp_path / "master.sqlite"
    first = journal(path)
    first.task_added(row("t1"))
    assert [r.task_id for r in first.commit()] == ["t1"]
    first.task_ended("t1", "client-1", b"the end of t1")  # waits one commit out (see commit)
    first.task_added(row("t2", seq=1))
    with locked(path), pytest.raises(sqlite3.OperationalError, match="locked"):
        first.commit()
    assert [r.task_id for r in first.commit()] == ["t2"]
    first.commit()
    first.close()
    again = Journal(path)
    restored = {r.task_id: r.ended for r in again.start("master-test").tasks}
    assert restored == {"t1": b"the end of t1", "t2": None}
    again.close()


def test_an_ephemeral_journal_acknowledges_after_a_commit_that_failed(tmp_path: Path) -> None:
    """Without durability the acknowledgements ride on the commit that writes unit results: one
    that failed dropped them, and the client kept those submissions unacknowledged for good."""
    path = tmp_path / "master.sqlite"
    ephemeral = journal(path, durable=False)
    ephemeral.task_added(row("t1"))
    ephemeral.record("p1", [(0, 7, b"result")])
    with locked(path), pytest.raises(sqlite3.OperationalError, match="locked"):
        ephemeral.commit()
    assert [r.task_id for r in ephemeral.commit()] == ["t1"]
    ephemeral.close()


def test_the_client_of_a_task_is_known_until_it_is_delivered(tmp_path: Path) -> None:
    """Whose a task id is, for a submit that names it again: the master asks the journal last
    (a task ended long ago, no longer in the scheduler, its end not yet received)."""
    path = tmp_path / "master.sqlite"
    kept = journal(path)
    kept.task_added(row("t1", client="client-a"))
    assert kept.client_of("t1") == "client-a"  # buffered
    kept.commit()
    assert kept.client_of("t1") == "client-a"  # on disk
    kept.task_ended("t1", "client-a", b"end")
    kept.delivered("t1", "client-b")  # another client's word: ignored
    assert kept.client_of("t1") == "client-a"
    kept.delivered("t1", "client-a")
    assert kept.client_of("t1") is None and kept.client_of("t2") is None
    kept.close()
