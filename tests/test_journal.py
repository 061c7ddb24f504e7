"""The master's journal on a real SQLite file: what a restarted master reads back, what never
needs the disk, and against another process's lock on it."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import msgspec
import pytest

from actors.errors import JournalUnreadable, MasterSuperseded
from actors.journal import ENTRY_BYTES, Journal, TaskRow


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


def on_disk(path: Path, task_id: str) -> tuple[bytes | None] | None:
    """A task's ``ended`` column as another process reads the file now (None: no row)."""
    with closing(sqlite3.connect(path)) as other:  # (a connection's `with` does not close it)
        return other.execute("select ended from tasks where task_id = ?", (task_id,)).fetchone()


def test_what_a_commit_wrote_a_restarted_master_reads_back_in_submission_order(
        tmp_path: Path) -> None:
    path = tmp_path / "master.sqlite"
    first = journal(path)
    first.task_added(row("t2", seq=2))
    first.task_added(row("t1", seq=1))
    first.code_added("client-1", "h1", b"class code")
    first.client_key("client-1", b"K" * 40)
    first.record("p1", [(0, 11, b"r0"), (1, 12, b"r1")])
    first.record("p1", [(5, 2, b"r5")])  # (a digest may be less than its index)
    assert sorted(r.task_id for r in first.commit()) == ["t1", "t2"]  # now durable: acknowledged
    first.task_added(row("t3", seq=3))  # never committed, so never acknowledged: not restored
    first.close()
    again = Journal(path)
    restored = again.start("a-new-id")
    assert (again.master_id, again.epoch) == ("master-test", 2)  # the same master, once more
    assert restored.tasks == [row("t1", seq=1), row("t2", seq=2)]
    assert restored.codes == {"client-1": {"h1": b"class code"}}
    assert restored.keys == {"client-1": b"K" * 40}
    assert restored.journaled == {"p1": [0, 1, 5]}
    assert again.lookup("p1", [1, 5, 9]) == {1: (12, b"r1"), 5: (2, b"r5")}
    assert again.lookup("p1", [5]) == {5: (2, b"r5")}
    again.close()


def test_a_task_delivered_between_two_commits_never_touches_the_disk(tmp_path: Path) -> None:
    path = tmp_path / "master.sqlite"
    kept = journal(path)
    kept.task_added(row("t1"))
    kept.task_ended("t1", "client-1", b"end")
    kept.delivered("t1", "client-1")
    assert not kept.knows("t1")
    assert kept.commit() == []  # (its client has its end: nothing to acknowledge)
    assert on_disk(path, "t1") is None
    kept.close()


def test_an_end_waits_one_commit_out_then_is_kept_until_its_client_has_it(tmp_path: Path) -> None:
    path = tmp_path / "master.sqlite"
    kept = journal(path)
    kept.task_added(row("t1"))
    kept.commit()
    kept.task_ended("t1", "client-1", b"end")
    kept.commit()  # the client most likely says it received the end before the next one
    assert on_disk(path, "t1") == (None,)
    assert kept.undelivered("client-1") == [("t1", b"end")] and kept.undelivered("client-2") == []
    kept.commit()  # it did not: the end is written, for a restarted master to send again
    assert on_disk(path, "t1") == (b"end",)
    assert kept.undelivered("client-1") == [("t1", b"end")] and kept.undelivered("client-2") == []
    kept.delivered("t1", "client-1")
    assert not kept.knows("t1") and kept.undelivered("client-1") == []
    kept.commit()
    assert on_disk(path, "t1") is None and not kept.knows("t1")
    # Submitted and ended in one interval, its end not received: both written, together.
    kept.task_added(row("t2", seq=2))
    kept.task_ended("t2", "client-1", b"end of t2")
    assert kept.commit() == []  # not written yet: not acknowledged yet
    assert on_disk(path, "t2") is None
    assert [r.task_id for r in kept.commit()] == ["t2"]
    assert on_disk(path, "t2") == (b"end of t2",)
    kept.close()


def test_a_client_that_left_takes_its_tasks_code_and_key_with_it(tmp_path: Path) -> None:
    path = tmp_path / "master.sqlite"
    kept = journal(path)
    kept.task_added(row("a1", client="A"))
    kept.task_added(row("b1", client="B", seq=1))
    kept.code_added("A", "h", b"code")
    kept.client_key("A", b"A" * 40)
    kept.client_key("B", b"B" * 40)
    kept.commit()
    kept.task_added(row("a2", client="A", seq=2))  # still buffered
    kept.task_added(row("b2", client="B", seq=3))  # another client's, buffered
    kept.code_added("A", "h2", b"more code")
    kept.code_added("B", "hb", b"B's code")  # buffered too: B's, kept
    kept.delivered("b1", "B")  # (a deletion buffered when A leaves)
    kept.client_left("A")
    kept.commit()
    assert not kept.knows("a1") and not kept.knows("a2") and kept.knows("b2")
    kept.close()
    again = Journal(path)
    restored = again.start("x")
    assert [r.task_id for r in restored.tasks] == ["b2"]
    assert restored.codes == {"B": {"hb": b"B's code"}} and restored.keys == {"B": b"B" * 40}
    again.close()


def test_a_tasks_unit_results_go_when_it_ends_from_memory_and_from_disk(tmp_path: Path) -> None:
    path = tmp_path / "master.sqlite"
    kept = journal(path)
    kept.task_added(row("p1"))
    kept.record("p1", [(0, 1, b"a")])
    kept.commit()
    kept.record("p1", [(1, 2, b"b"), (2, 3, b"c")])
    kept.record("p1", [(3, 4, b"d")])
    kept.record("p1", [])
    assert kept.results_buffered == 3 * (1 + ENTRY_BYTES)
    assert kept.lookup("p1", [0, 1]) == {0: (1, b"a"), 1: (2, b"b")}
    assert kept.lookup("p1", []) == {} and kept.lookup("p2", [0]) == {}
    kept.task_ended("p1", "client-1", b"end")
    assert kept.results_buffered == 0 and kept.lookup("p1", [0, 1, 2, 3]) == {}
    kept.commit()
    kept.close()
    again = Journal(path)
    assert again.start("x").journaled == {}
    again.close()


def test_a_restarted_master_reads_each_unit_of_a_journaled_pack(tmp_path: Path) -> None:
    """A pack (512 units in one entry) is a row of its own whose last column is its last unit:
    a master restarted on the journal counts 512 finished units, not one; a row of single
    units, and a row written before packs had rows of their own, count their entries."""
    path = tmp_path / "master.sqlite"
    kept = journal(path)
    kept.task_added(row("p1"))
    kept.record("p1", [(0, 1, b"pack0"), (512, 2, b"one"), (1024, 3, b"pack1024"),
                       (600, 5, b"two")], {0: 512, 1024: 8})  # two single units in one row
    assert kept.lookup("p1", [0, 512, 1024]) == {0: (1, b"pack0"), 512: (2, b"one"),
                                                 1024: (3, b"pack1024")}
    kept.commit()
    assert kept.lookup("p1", [1024, 512]) == {512: (2, b"one"), 1024: (3, b"pack1024")}
    kept.close()
    with closing(sqlite3.connect(path)) as db, db:  # as a journal of before packs left it
        db.execute("insert into results values ('p1', 2000, 2000, ?)",
                   (msgspec.msgpack.encode([(2000, 4, b"pack2000")]),))
        # ... and a row no pack could have made (more units than a pack holds): its entry
        db.execute("insert into results values ('p1', 3000, 3512, ?)",
                   (msgspec.msgpack.encode([(3000, 6, b"odd")]),))
    again = Journal(path)
    restored = sorted(again.start("x").journaled["p1"])
    assert restored == [*range(513), 600, *range(1024, 1032), 2000, 3000]
    assert again.lookup("p1", [2000]) == {2000: (4, b"pack2000")}
    again.close()


def test_a_master_whose_journal_was_taken_over_writes_nothing_more(tmp_path: Path) -> None:
    path = tmp_path / "master.sqlite"
    old, new = journal(path), journal(path)  # a second master took the state directory
    assert (old.epoch, new.epoch) == (1, 2) and old.current_epoch() == 2
    old.task_added(row("t1"))
    with pytest.raises(MasterSuperseded, match=r"epoch 2\) took over .*master.sqlite.*epoch 1"):
        old.commit()
    new.commit()
    old.close()
    new.close()
    again = Journal(path)
    assert again.start("x").tasks == []
    again.close()


def test_an_ephemeral_journal_writes_no_submission_and_acknowledges_each_once(
        tmp_path: Path) -> None:
    path = tmp_path / "master.sqlite"
    ephemeral = journal(path, durable=False)
    ephemeral.task_added(row("t1"))
    ephemeral.code_added("client-1", "h", b"code")
    ephemeral.client_key("client-1", b"K" * 40)
    assert [r.task_id for r in ephemeral.commit()] == ["t1"]
    assert ephemeral.commit() == []
    ephemeral.close()
    again = Journal(path)
    restored = again.start("x")
    assert (restored.tasks, restored.codes, restored.keys) == ([], {}, {})
    again.close()


def test_a_journal_of_another_schema_or_no_database_is_refused_saying_so(tmp_path: Path) -> None:
    path = tmp_path / "master.sqlite"
    journal(path).close()
    other = sqlite3.connect(path)
    other.execute("update meta set value = '99' where key = 'schema'")
    other.commit()
    other.close()
    with pytest.raises(JournalUnreadable, match="journal schema 99, this master reads schema 3"):
        Journal(path)
    broken = tmp_path / "broken.sqlite"  # a results row that is not what the journal wrote
    kept = journal(broken)
    kept.record("p1", [(0, 1, b"r")])
    kept.commit()
    kept.close()
    other = sqlite3.connect(broken)
    other.execute("update results set data = ?", (b"\xc1",))
    other.commit()
    other.close()
    with pytest.raises(JournalUnreadable, match="broken.sqlite"):
        Journal(broken).start("x")
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"not a database, " * 512)
    with pytest.raises(JournalUnreadable, match="--fresh"):
        Journal(garbage)


def test_a_journal_is_durable_unless_told_otherwise_and_syncs_each_commit(tmp_path: Path) -> None:
    """What a durable journal's commit wrote survives the machine's crash (SQLite syncs the
    write-ahead log at each commit); an ephemeral one, in a folder that dies with its master,
    never waits for the disk."""
    durable, ephemeral = Journal(tmp_path / "kept.sqlite"), Journal(tmp_path / "temp.sqlite",
                                                                    durable=False)
    for opened, synchronous in ((durable, 2), (ephemeral, 0)):  # FULL, OFF
        opened.start("m")
        assert opened._db.execute("pragma journal_mode").fetchone()[0] == "wal"
        assert opened._db.execute("pragma synchronous").fetchone()[0] == synchronous
    durable.task_added(row("t1"))
    durable.commit()
    durable.close()
    ephemeral.close()
    assert on_disk(tmp_path / "kept.sqlite", "t1") == (None,)


def test_a_code_or_key_alone_is_written_by_the_next_commit(tmp_path: Path) -> None:
    """A client's class shipped by value, or its key, with no task in the same interval."""
    path = tmp_path / "master.sqlite"
    kept = journal(path)
    kept.code_added("client-1", "h", b"code")
    kept.commit()
    with closing(sqlite3.connect(path)) as other:
        assert other.execute("select client, hash from codes").fetchall() == [("client-1", "h")]
    kept.client_key("client-2", b"K" * 40)
    kept.commit()
    kept.close()
    again = Journal(path)
    restored = again.start("x")
    assert (restored.codes, restored.keys) == ({"client-1": {"h": b"code"}}, {"client-2": b"K" * 40})
    again.close()


def test_a_journal_of_schema_2_is_read_its_tasks_without_inputs_and_written_with_them(
        tmp_path: Path) -> None:
    """Schema 3 keeps a task's inputs (a task naming another's future lost them at a restart:
    queued at once, without its inputs' results). A journal of schema 2 is taken on, not
    refused: its tasks had none written."""
    path = tmp_path / "master.sqlite"
    old = sqlite3.connect(path)
    old.executescript("""
        create table meta (key text primary key, value text not null);
        create table tasks (
            task_id text primary key, client text not null, seq integer not null,
            priority integer not null, name text not null, kind text not null,
            code_hash text not null, code blob not null, args blob not null,
            package text not null, version text not null, retries integer not null, ended blob);
        create table codes (client text not null, hash text not null, code blob not null,
            primary key (client, hash));
        create table results (task text, first integer, last integer, data blob);
        insert into meta values ('schema', '2');
        insert into tasks values ('t1', 'c1', 1, 0, 'T', 'task', '', x'00', x'01', '', '', 0, null);
    """)
    old.commit()
    old.close()
    taken = Journal(path)
    restored = taken.start("m1")
    assert [(row.task_id, row.inputs) for row in restored.tasks] == [("t1", ())]
    taken.task_added(TaskRow(task_id="t2", client="c1", seq=2, priority=0, name="T", kind="task",
                             code_hash="", code=b"\0", args=b"\1", package="", version="",
                             retries=0, inputs=("t1", "t0")))
    taken.commit()
    taken.close()
    again = Journal(path).start("m1")
    assert [(row.task_id, row.inputs) for row in again.tasks] == [("t1", ()), ("t2", ("t1", "t0"))]
