"""The master's backlog of held submissions (actors/master_backlog.py), then the master that
holds a client's submissions past its window and hands them on in order (issue 23).

The core alone first: submissions go in and come out in order, across sealed chunks; one taken
out of its turn, cancelled or dropped is never handed on again. Then real processes on
loopback: a client whose burst is longer than the window gets every result, in its
submission order; its held tasks are listed, tell their story, can be cancelled; and another
client's tasks are not held behind them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors import Client, LocalCluster, Task
from actors.errors import QueueFull
from actors.master_backlog import CHUNK, LOW, WINDOW, Backlog, Held
from tests.conftest import descendants, examples, kill_all, log_events, start_master, wait_until


def held(n: int, *, name: str = "m.Add", code_hash: str = "h" * 64, package: str = "") -> Held:
    return Held(f"t{n}", name, "task", code_hash, b"args%d" % n, n % 3, package,
                "1" if package else "", float(n))


def test_held_submissions_come_out_in_order_with_their_fields_across_chunks() -> None:
    backlog = Backlog()
    shapes = ({}, {"name": "m.Other"}, {"code_hash": "", "package": "pkg"})
    records = [held(n, **shapes[n % 3]) for n in range(CHUNK * 3 + 17)]  # type: ignore[arg-type]
    for record in records:
        backlog.hold(("c1", 0), "key-1", record)
    assert len(backlog) == len(records) and backlog.holds(("c1", 0))
    out: list[Held] = []
    while True:
        owner, taken = backlog.take(("c1", 0), 100)
        assert owner == "key-1" or not taken
        if not taken:
            break
        out += taken
    assert out == records  # every field, in order, through sealing
    assert len(backlog) == 0 and not backlog.holds(("c1", 0))


def test_one_taken_out_of_turn_or_dropped_is_not_handed_on_again() -> None:
    backlog = Backlog()
    for n in range(CHUNK + 10):
        backlog.hold(("c1", 0), "k1", held(n))
    backlog.hold(("c1", 5), "k1", held(9_000))  # another priority: a FIFO of its own
    backlog.hold(("c2", 0), "k2", held(9_001))
    assert backlog.ahead_of("t3") == 3 and backlog.find("t3") == held(3)
    found = backlog.take_one("t3")
    assert found is not None and found[0] == ("c1", 0) and found[2] == held(3)
    assert "t3" not in backlog and backlog.take_one("t3") is None and backlog.find("t3") is None
    assert backlog.ahead_of("t4") == 3  # t3 no longer counts
    _, taken = backlog.take(("c1", 0), 5)
    assert [h.task_id for h in taken] == ["t0", "t1", "t2", "t4", "t5"]
    assert [h.task_id for _, _, h in backlog.of_clients({"c2"})] == ["t9001"]
    owner, dropped = backlog.drop_client("c1")
    assert owner == "k1"
    assert [h.task_id for _, h in dropped] == [f"t{n}" for n in range(6, CHUNK + 10)] + ["t9000"]
    assert {p for p, _ in dropped} == {0, 5}
    assert backlog.client_of("t9001") == "c2" and backlog.client_of("t7") is None
    assert backlog.take(("c1", 0), 10) == ("", []) and len(backlog) == 1
    assert backlog.held_of_owner("k1") == 0 and backlog.held_of_owner("k2") == 1


def test_held_submissions_are_counted_by_owner() -> None:
    """What ``--max-queued`` counts: a key's held submissions over all its clients and
    priorities (a client without a key counts as its own owner); and what ``--max-key-memory``
    counts of them: the bytes of their arguments."""
    backlog = Backlog()

    def args_bytes(*clients: str) -> int:
        return sum(len(h.args) for _, _, h in backlog.of_clients(set(clients)))

    for n in range(CHUNK + 5):
        backlog.hold(("c1", n % 2), "key", held(n))
    for n in range(10):
        backlog.hold(("c2", 0), "key", held(1_000 + n))
    backlog.hold(("c3", 0), "", held(5_000))
    assert backlog.held_of_owner("key") == CHUNK + 15 and backlog.held_of_owner("c3") == 1
    assert backlog.held_bytes.get("key", 0) == args_bytes("c1", "c2") > 0
    assert backlog.held_bytes.get("c3", 0) == len(held(5_000).args)
    backlog.take_one("t3")
    backlog.take(("c1", 0), 7)
    assert backlog.held_of_owner("key") == CHUNK + 15 - 8
    assert backlog.held_bytes.get("key", 0) == args_bytes("c1", "c2")
    backlog.drop_client("c1")
    assert backlog.held_of_owner("key") == 10
    assert backlog.held_bytes.get("key", 0) == args_bytes("c2")
    backlog.take(("c2", 0), 100)
    assert backlog.held_of_owner("key") == 0 and backlog.held_of_owner("c3") == 1
    assert backlog.held_bytes.get("key", 0) == 0


@pytest.fixture
def decoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry for each sealed chunk the backlog decodes."""
    import actors.master_backlog as backlog_module

    calls: list[int] = []
    unseal = backlog_module._unseal
    monkeypatch.setattr(backlog_module, "_unseal", lambda chunk: calls.append(1) or unseal(chunk))
    return calls


def test_one_found_out_of_turn_costs_its_own_chunk_not_the_backlog(decoded: list[int]) -> None:
    """Cancelling each of a burst's held tasks, or naming each as an input, must not scan the
    backlog each time (10^5 of them would cost the master minutes): one chunk is decoded."""
    backlog = Backlog()
    for n in range(CHUNK * 20):
        backlog.hold(("c1", 0), "k1", held(n))
    for n in (CHUNK * 19 + 5, CHUNK * 19 + 6, CHUNK * 19 + 7):
        assert backlog.take_one(f"t{n}") is not None
    assert len(decoded) == 1  # the last sealed chunk, once
    assert backlog.ahead_of(f"t{CHUNK * 19 + 8}") == CHUNK * 19 + 5
    assert len(decoded) == 1


@given(st.lists(st.tuples(st.sampled_from(["hold", "hold", "hold", "take", "one", "drop"]),
                          st.sampled_from([("c1", 0), ("c1", 3), ("c2", 0)]),
                          st.integers(0, 2 * CHUNK + 40)), max_size=60))
@settings(max_examples=examples(150), deadline=None)
def test_the_backlog_behaves_as_one_ordered_list_per_client_and_priority(
        ops: list[tuple[str, tuple[str, int], int]]) -> None:
    """Any mix of holding, taking in turn, taking out of turn and dropping a client: what comes
    out is what a plain list per key says, in its order, each record once; the counts agree."""
    backlog, model = Backlog(), dict[tuple[str, int], list[Held]]()
    made = 0
    for op, key, n in ops:
        if op == "hold":
            for _ in range(n):
                record = held(made)
                made += 1
                backlog.hold(key, "k-" + key[0], record)
                model.setdefault(key, []).append(record)
        elif op == "take":
            owner, taken = backlog.take(key, n)
            expected, model[key] = model.get(key, [])[:n], model.get(key, [])[n:]
            assert taken == expected and (owner == "k-" + key[0] or not taken)
        elif op == "one" and model.get(key):
            record = model[key].pop(n % len(model[key]))
            assert backlog.ahead_of(record.task_id) == n % (len(model[key]) + 1)
            assert backlog.take_one(record.task_id) == (key, "k-" + key[0], record)
        elif op == "drop":
            _, dropped = backlog.drop_client(key[0])
            gone = [(k[1], r) for k in sorted(model) if k[0] == key[0] for r in model.pop(k)]
            assert sorted(dropped, key=lambda d: (d[0], d[1].held_at)) == gone
        assert len(backlog) == sum(map(len, model.values()))
        for owner in ("k-c1", "k-c2"):
            assert backlog.held_of_owner(owner) == sum(
                len(v) for k, v in model.items() if "k-" + k[0] == owner)
        for k, records in model.items():
            assert backlog.holds(k) or not records
            for at in {0, len(records) // 2, len(records) - 1} if records else ():
                assert backlog.find(records[at].task_id) == records[at]
                assert backlog.ahead_of(records[at].task_id) == at
        # (a FIFO whose records were all taken out of turn waits on, empty, for its next take)
        assert {k for k, v in model.items() if v} <= set(backlog.waiting())
    tables = {k: v for k, v in vars(backlog).items() if isinstance(v, dict)}
    backlog.compact()  # (after a backlog drained) the same content in fresh tables
    assert {k: v for k, v in vars(backlog).items() if isinstance(v, dict)} == tables


# --- the master, real processes ---------------------------------------------------------------

class Note(Task):
    """Writes its number as one line of ``ends`` (O_APPEND: whole); with ``go``, once that file
    exists (a gate the test opens: the worker is busy until then, however slow the machine)."""

    def work(self, ends, n, go=None):
        deadline = time.monotonic() + 120
        while go and not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.005)
        with open(ends, "a") as out:
            out.write(f"{n}\n")
        return n


@pytest.fixture
def ends() -> Iterator[str]:
    folder = tempfile.mkdtemp(prefix="backlog-", dir="/tmp")
    os.chmod(folder, 0o777)  # a worker of a uid of its own writes here too
    yield os.path.join(folder, "ends")
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.processes
def test_a_burst_past_the_window_runs_whole_and_in_order(ends: str) -> None:
    total = WINDOW + LOW + 500
    with LocalCluster(workers=1) as cl, Client(cl) as client:
        client.wait_for_workers(1)
        go = ends + ".go"
        first = client.submit(Note, ends, -1, go)  # holds the worker until the checks are done
        futures = [client.submit(Note, ends, n) for n in range(total)]
        wait_until(lambda: not client._unaccepted, 60, "the burst to be acknowledged")
        info = client.info()
        assert info.tasks_queued + info.tasks_running == total + 1  # the held ones counted
        listed = client.tasks(limit=5)
        assert [t.task_id for t in listed] == [f.task_id for f in reversed(futures[-5:])]
        assert {t.status for t in listed} == {"queued"}
        story = futures[-1].story()
        assert any("held in the master's backlog" in line[3] for line in story), story
        assert futures[-2].cancel(timeout=30)
        open(go, "w").close()
        assert first.result(timeout=60) == -1
        assert [f.result(timeout=120) for f in futures[:-2]] == list(range(total - 2))
        assert futures[-1].result(timeout=60) == total - 1
        assert futures[-2].cancelled()
    with open(ends) as lines:
        order = [int(n) for n in lines.read().split()]
    assert order == [-1, *range(total - 2), total - 1]


@pytest.mark.processes
def test_another_client_is_not_held_behind_a_held_backlog(ends: str) -> None:
    with LocalCluster(workers=1) as cl, Client(cl) as busy, Client(cl) as other:
        busy.wait_for_workers(1)
        go = ends + ".go"
        gate = busy.submit(Note, ends, -2, go)  # the worker waits until the late ones are in
        burst = [busy.submit(Note, ends, n) for n in range(WINDOW * 2)]
        wait_until(lambda: not busy._unaccepted, 60, "the burst to be acknowledged")
        late = [other.submit(Note, ends, -1) for _ in range(10)]
        wait_until(lambda: not other._unaccepted, 60, "the late ones to be acknowledged")
        open(go, "w").close()
        assert gate.result(timeout=60) == -2
        assert [f.result(timeout=120) for f in late] == [-1] * 10
        assert [f.result(timeout=120) for f in burst] == list(range(WINDOW * 2))
    with open(ends) as lines:
        order = [int(n) for n in lines.read().split()]
    positions = [n for n, value in enumerate(order) if value == -1]
    # Held behind the burst, they would end last; in turn, among the first tasks after the gate.
    assert len(order) == WINDOW * 2 + 11 and max(positions) < 100, positions


@pytest.mark.processes
def test_a_held_task_named_as_an_input_runs_before_the_task_that_waits_for_it(ends: str) -> None:
    with LocalCluster(workers=1) as cl, Client(cl) as client:
        client.wait_for_workers(1)
        burst = [client.submit(Note, ends, n) for n in range(WINDOW + 100)]
        wait_until(lambda: not client._unaccepted, 60, "the burst to be acknowledged")
        last = burst[-1]
        after = client.submit(Note, ends, last)  # its argument: the held task's result
        assert after.result(timeout=120) == WINDOW + 99
        assert [f.result(timeout=120) for f in burst] == list(range(WINDOW + 100))


class Nop(Task):
    def work(self, n):
        return n


@pytest.mark.processes
def test_a_key_past_its_queue_limit_is_refused_at_once_and_the_master_serves_on(
        tmp_path: Path) -> None:
    """``--max-queued``: one key's runaway loop cannot exhaust a master others share. Past the
    limit (held tasks counted) a submission fails at once with QueueFull, logged once; once
    some of its tasks are gone, the key submits again."""
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(keys),
                                   "--max-queued", "3000")
    try:
        with Client(address, keys=keys) as client:
            futures = [client.submit(Nop, n) for n in range(3_200)]  # nothing runs: no worker
            refused = futures[3_000:]
            for future in refused:
                assert isinstance(future.exception(timeout=60), QueueFull)
            assert client.info().tasks_queued == 3_000
            for future in futures[2_900:3_000]:  # held ones (past the 2,048 window)
                assert future.cancel(timeout=30)
            again = [client.submit(Nop, n) for n in range(50)]
            wait_until(lambda: not client._unaccepted, 60, "the new ones to be acknowledged")
            assert client.info().tasks_queued == 2_950
            assert not any(f.done() for f in futures[:2_900] + again)
        events = log_events(tmp_path / "master.log")
        assert [e["queued"] for e in events if e["event"] == "queue_full"] == [3_000]
    finally:
        kill_all(descendants(master.pid) | {master.pid})
        master.wait(10)


def test_a_listing_of_the_newest_decodes_only_their_chunks(decoded: list[int]) -> None:
    """A client may ask for its task list at any rate: each asking decoded every chunk of its
    backlog (4,000 of them at 10^6 held) to show at most 10,000. The newest of each FIFO, as
    many as asked, and the same list as before."""
    backlog = Backlog()
    for n in range(CHUNK * 20):
        backlog.hold(("c1", n % 2), "k1", held(n))
    for n in range(30):
        backlog.hold(("c2", 0), "k1", held(100_000 + n))
    backlog.take_one(f"t{CHUNK * 20 - 2}")  # taken out of turn: not listed
    everything = list(backlog.of_clients({"c1", "c2"}))
    assert len(everything) == CHUNK * 20 + 30 - 1
    fifos = {key: [h for c, p, h in everything if (c, p) == key]
             for key in (("c1", 0), ("c1", 1), ("c2", 0))}
    for limit in (1, 29, 31, CHUNK, CHUNK * 3 + 7, CHUNK * 30):
        decoded.clear()
        newest = list(backlog.of_clients({"c1", "c2"}, newest=limit))
        for key, records in fifos.items():  # each FIFO's newest, as many as asked, in order
            assert [h for c, p, h in newest if (c, p) == key] == records[-limit:], (key, limit)
        # per FIFO its newest chunks only: as many as hold the limit, and the one still filling
        assert len(decoded) <= 3 * (-(-limit // CHUNK) + 1)
    # A listing decodes for itself: what it read stays sealed in the backlog.
    assert sum(chunk.items is None for chunk in backlog._chunks.values()) == 20 - 2 - 1


def test_a_burst_waits_sealed_past_its_head_and_a_chunk_taken_whole_is_freed() -> None:
    """What makes a held task cost a few hundred bytes (issue 23): every full chunk but the
    head of its FIFO is one sealed blob, decoded only when its turn comes, and a chunk taken to
    its end goes at once (a backlog of 10^5 drained keeps nothing of what it held)."""
    backlog = Backlog()
    key = ("c1", 0)
    for n in range(CHUNK * 4 + 10):
        backlog.hold(key, "k1", held(n))
    chunks = list(backlog._fifos[key].chunks)
    assert [c.items is None for c in chunks] == [False, True, True, True, False]
    assert all(c.sealed for c in chunks[1:4]) and not chunks[0].sealed
    owner, taken = backlog.take(key, CHUNK + 10)
    assert owner == "k1" and [h.task_id for h in taken] == [f"t{n}" for n in range(CHUNK + 10)]
    assert chunks[0].number not in backlog._chunks  # the head, taken whole: freed
    assert chunks[1].items is not None and not chunks[1].sealed  # the next: decoded, once
    assert len(backlog._chunks) == 4
    _, rest = backlog.take(key, CHUNK * 10)
    assert len(rest) == CHUNK * 3  # everything else: the FIFO and all its chunks go
    assert not backlog._chunks and not backlog.holds(key) and len(backlog) == 0
