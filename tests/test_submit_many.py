"""A map's tasks travel as ``SubmitMany`` messages: what they share once, each still its own task.

Against a real master process with no worker (its tasks stay queued, so what it admitted can be
counted), through a real client; the hostile messages are sent by hand on the client's link.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from actors import Client, Task
from actors import messages as m
from actors.errors import MemoryBudgetFull, QueueFull, TaskIdTaken
from actors.serialize import dumps
from tests.conftest import descendants, kill_all, log_events, start_master, wait_until

pytestmark = pytest.mark.processes


class Nop(Task):
    def work(self, n):
        return n


class Other(Task):
    def work(self, n):
        return -n


def ids_of(message: m.Submit | m.SubmitMany) -> list[str]:
    return message.task_ids if isinstance(message, m.SubmitMany) else [message.task_id]


def test_a_map_goes_in_runs_of_one_class_and_options_each_item_its_own_task(
        tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(keys))
    try:
        with Client(address, keys=keys) as client:
            first = client.submit(Nop, -1)
            items = [client._prepare(Nop, (n,), {}, 0, 0) for n in range(2_500)]
            items[1_000] = client._prepare(Other, (7,), {}, 0, 0)  # another class
            items[1_001] = client._prepare(Nop, (first,), {}, 0, 0)  # a future among its args
            items[1_002] = client._prepare(Nop, (8,), {}, 3, 0)  # another priority
            sent = client._grouped(items)
            # A map's first run is 64 items at most, each next one twice the one before (the
            # master starts its workers once it took in the first), up to MAX_SUBMIT_MANY.
            assert [(type(msg).__name__, len(ids_of(msg))) for _, msg, _ in sent] == [
                ("SubmitMany", 64), ("SubmitMany", 128), ("SubmitMany", 256),
                ("SubmitMany", 512), ("SubmitMany", 40), ("Submit", 1), ("Submit", 1),
                ("Submit", 1), ("SubmitMany", m.MAX_SUBMIT_MANY),
                ("SubmitMany", 2_500 - 1_003 - 1_024)]
            assert [task_id for _, msg, _ in sent for task_id in ids_of(msg)] == \
                [item.submit.task_id for item in items]

            futures = client.map(Nop, range(2_500))
            wait_until(lambda: client.info().tasks_queued == 2_501, 60, "the map queued")
            wait_until(lambda: not client._unaccepted, 60, "every task acknowledged")
            # The scheduler holds a client's first WINDOW queued tasks (2,048, with the first
            # submit), the master's backlog the rest: a message's tasks count as they go.
            held = [str(entry) for entry in futures[2_047].story()]
            assert "backlog" in held[0], held
            assert "backlog" not in str(futures[2_046].story()[0])
            # Each is a task of its own: one cancelled leaves the others queued.
            assert futures[1_234].cancel(timeout=30)
            assert client.info().tasks_queued == 2_500
            assert not any(f.done() for f in futures[:1_234] + futures[1_235:])
    finally:
        kill_all(descendants(master.pid) | {master.pid})
        master.wait(10)


def test_a_submit_many_past_the_queue_limit_is_refused_from_the_task_that_passes_it(
        tmp_path: Path) -> None:
    """``--max-queued`` below the scheduler's window: a message's tasks admitted but not yet
    handed to the scheduler count, or one message would queue past the limit."""
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(keys),
                                   "--max-queued", "1500")
    try:
        with Client(address, keys=keys) as client:
            futures = client.map(Nop, range(3_000))
            for future in futures[1_500:]:
                assert isinstance(future.exception(timeout=60), QueueFull)
            assert client.info().tasks_queued == 1_500
            assert not any(f.done() for f in futures[:1_500])
    finally:
        kill_all(descendants(master.pid) | {master.pid})
        master.wait(10)


@pytest.mark.parametrize(("size", "count", "fewest"), [
    (20_000, 100, 40),  # 2 MB of arguments: the budget passed between two messages
    (5_000, 400, 150),  # the third message (after 64 and 128 tasks) passes it in its middle
])
def test_a_submit_many_past_the_memory_budget_is_refused_from_the_task_that_passes_it(
        tmp_path: Path, size: int, count: int, fewest: int) -> None:
    """A 1 MiB budget: a message's tasks admitted before it count, those of the same message
    too (the master checks each task past what the budget left the message at its start)."""
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(keys),
                                   "--max-key-memory", "1")
    try:
        with Client(address, keys=keys) as client:
            blobs = [os.urandom(size) for _ in range(count)]
            futures = client.map(Nop, blobs)
            wait_until(lambda: client.info().tasks_queued + sum(f.done() for f in futures)
                       == count, 60, "every task queued or refused")
            queued = client.info().tasks_queued
            refused = [f for f in futures if f.done()]
            assert all(isinstance(f.exception(timeout=1), MemoryBudgetFull) for f in refused)
            assert fewest <= queued <= 2**20 // size and len(refused) == count - queued
            assert futures[-1] in refused and not futures[0].done()
    finally:
        kill_all(descendants(master.pid) | {master.pid})
        master.wait(10)


def test_a_hostile_submit_many_is_refused_and_the_master_serves_on(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(keys))
    try:
        with Client(address, keys=keys) as owner, Client(address, keys=keys) as other:
            taken = owner.submit(Nop, 1)
            code_hash, code = other._code_of(Nop)
            args = dumps(((1,), {}))

            def many(task_ids: list[str], arguments: list[bytes]) -> m.SubmitMany:
                return m.SubmitMany(task_ids=task_ids, args=arguments, name="Nop", kind="task",
                                    code=code, code_hash=code_hash)

            shapeless = {task_id: type(taken)(other, task_id, "Nop") for task_id in ("a1", "b0")}
            other._futures.update(shapeless)  # (weak references: ``shapeless`` holds them)
            other._send(many(["a1", "a2"], [args]))  # fewer arguments than ids
            other._send(many([], []))
            other._send(many([f"b{i}" for i in range(m.MAX_SUBMIT_MANY + 1)],
                             [args] * (m.MAX_SUBMIT_MANY + 1)))
            for future in shapeless.values():  # their tasks fail, with why: nothing is queued
                with pytest.raises(ValueError, match="a SubmitMany is 1 to 1024 tasks"):
                    future.result(timeout=30)
            # Another client's task id among its own, and one id twice: the others stand.
            mine = [f"mine-{i}" for i in range(5)]
            raw = {task_id: type(taken)(other, task_id, "Nop") for task_id in mine + [taken.task_id]}
            other._futures.update(raw)  # (weak references: ``raw`` holds them)
            other._send(many([mine[0], taken.task_id, *mine[1:], mine[2]], [args] * 7))
            with pytest.raises(TaskIdTaken):
                raw[taken.task_id].result(timeout=30)
            wait_until(lambda: owner.info().tasks_queued == 1 + 5, 30, "the five queued")
            assert not taken.done()
            assert other.map(Nop, range(10)) and owner.submit(Nop, 2)  # it serves on
            wait_until(lambda: owner.info().tasks_queued == 1 + 5 + 10 + 1, 30, "the rest queued")
        refusals = [e for e in log_events(tmp_path / "master.log")
                    if e["event"] == "message_refused" and e.get("type") == "SubmitMany"]
        assert len(refusals) == 3, refusals
        assert master.poll() is None
    finally:
        kill_all(descendants(master.pid) | {master.pid})
        master.wait(10)
