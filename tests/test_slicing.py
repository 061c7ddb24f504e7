"""A driver slices its units in messages of ``SLICE_BATCH`` and keeps ``LOOKAHEAD`` ahead of
the results; units with large arguments go in messages of about ``SLICE_BYTES`` and about
``LOOKAHEAD_BYTES`` of them ahead, since the master holds what is sliced until it dispatches it
(the driver's Runtime fed directly: what it emits is what the master gets)."""

from __future__ import annotations

from typing import Any

from actors import ParallelTask
from actors import messages as m
from actors.task_host import (
    FIRST_LOOKAHEAD,
    LOOKAHEAD,
    LOOKAHEAD_BYTES,
    SLICE_BATCH,
    SLICE_BYTES,
    Begin,
    Driver,
    Runtime,
    UnitResults,
    begin_instance,
)
from tests.conftest import wait_until


class Blobs(ParallelTask):
    def get_work(self, n, size):
        for i in range(n):
            yield bytes([i % 256]) * size

    def work_unit(self, blob):
        return len(blob)

    def reduce(self, results):
        return sum(results)


def driver(n: int, size: int) -> tuple[Runtime, list[m.UnitsSliced]]:
    sent: list[Any] = []
    runtime = begin_instance(Blobs(), Begin("t1", (n, size), {}, True, sent.append, sent.append),
                             sent.append)
    return runtime, sent  # type: ignore[return-value]


def sliced(sent: list[Any]) -> list[m.UnitsSliced]:
    return [msg for msg in sent if isinstance(msg, m.UnitsSliced)]


def finish(runtime: Runtime, batch: m.UnitsSliced) -> None:
    runtime.handle(UnitResults([(unit.index, b"r") for unit in batch.units]))


def test_tiny_units_go_a_batch_a_message_and_a_lookahead_ahead() -> None:
    runtime, sent = driver(3 * LOOKAHEAD, 1)
    [first] = sliced(sent)
    assert len(first.units) == FIRST_LOOKAHEAD  # until the master first answers
    finish(runtime, first)
    batches = sliced(sent)[1:]
    assert [len(b.units) for b in batches] == [SLICE_BATCH] * (LOOKAHEAD // SLICE_BATCH)
    finish(runtime, batches[0])  # one message's results: one more message
    assert len(sliced(sent)) == 1 + len(batches) + 1


def test_large_arguments_go_in_small_messages_and_few_ahead() -> None:
    size = 256 << 10
    runtime, sent = driver(2_000, size)
    batches = sliced(sent)
    per_message = SLICE_BYTES // size
    assert {len(b.units) for b in batches} == {per_message}  # not SLICE_BATCH units of 256 KiB
    ahead = sum(len(b.units) for b in batches) * size
    assert LOOKAHEAD_BYTES <= ahead < LOOKAHEAD_BYTES + SLICE_BYTES
    assert not any(b.done for b in batches)
    while not (batches := sliced(sent))[-1].done:  # as results come, the rest, and the end
        finish(runtime, batches[-1])
    assert sum(len(b.units) for b in sliced(sent)) == 2_000
    assert [u.index for b in sliced(sent) for u in b.units] == list(range(2_000))


def test_a_driver_whose_own_code_raises_fails_its_task_instead_of_leaving_it_waiting() -> None:
    """A bug in the driver's side of the runtime (here: a message it has no case for) stops its
    actor; the task fails with that error, fatal (its worker is replaced), where it would wait
    for a driver that is gone."""
    sent: list[Any] = []
    ref = Driver.start(Blobs())
    ref.tell(Begin("t1", (10, 1), {}, True, sent.append, sent.append))
    ref.tell("no such message")
    wait_until(lambda: any(isinstance(msg, m.TaskResult) for msg in sent), 10, "the task's end")
    [end] = [msg for msg in sent if isinstance(msg, m.TaskResult)]
    assert not end.outcome.ok and end.outcome.fatal
    assert end.outcome.type_name == "builtins.TypeError" and "no such message" in end.outcome.message
    wait_until(lambda: not ref.is_alive(), 10, "the driver to stop")
