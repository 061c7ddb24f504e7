"""Fair share of the task queue between clients and between keys, at each priority level.

One client's burst (10^5 small tasks) must not hold every other user's first result, and yet a
worker is warm for one key's code (isolation): serving keys in turn, task by task, would stop
and start a worker process at every turn. So the queue is ordered by start-time fair queuing
(Goyal et al.'s SFQ), with the keys served in turns of ``QUANTUM_S`` of estimated work:

- Each client has a virtual clock per priority: a task it queues starts (its *start tag*) at
  the later of that clock and the level's virtual time (the start tag of the last task started
  there), and moves the clock on by the task's estimated cost (its measured run time, or
  ``DEFAULT_COST_S``). A client that queued much is far ahead; one that arrives now starts now.
- Start tags fall into buckets of ``QUANTUM_S``. Within a bucket the keys (owners) take turns in
  the order they reached it, each running all of its tasks of that bucket; within a key's
  turn its clients take turns of ``CLIENT_QUANTUM_S`` (clients of one key share warm
  workers: no process changes; a turn of a few tasks, not one, so that results still leave
  the master in batches, one frame per client and turn).
- A task's cost is at least ``MIN_COST_S``: what a small task really costs is the runtime's
  own work around it (its measured run time is only its ``work``).

The queue's order is ``(-priority, bucket, turn, slot, client, start, seq)``: priority still
wins across levels. A requeued task (its driver lost) keeps its tags: it goes back where it was.

No clock and no I/O: the costs come from the scheduler, changes go through its undo log.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

from actors.core.undo import MISSING, Undo, restore

QUANTUM_S = 0.5  # estimated work one key runs before another waiting at its level gets a turn
CLIENT_QUANTUM_S = 0.01  # ... and one client before another of the same key
DEFAULT_COST_S = 0.01  # a task's estimate until its kind's run time is measured
MIN_COST_S = 0.001

Tag = tuple[int, int, int, str, float]  # (bucket, turn, slot, client, start)


@dataclass
class FairShare:
    virtual: dict[int, float] = field(default_factory=dict)  # priority -> last start tag run
    clocks: dict[tuple[str, int], float] = field(default_factory=dict)  # (client, priority) ->
    turns: dict[tuple[int, str, int], int] = field(default_factory=dict)  # (priority, owner,
    # bucket) -> turn; the counter of turns only moves on (like the scheduler's id counters)
    _turns: Iterator[int] = field(default_factory=itertools.count, compare=False, repr=False)

    def tag(self, undo: Undo, priority: int, owner: str, client: str, cost: float) -> Tag:
        """The tags of a task queued now (first time only: a requeued task keeps its own)."""
        clocks, key = self.clocks, (client, priority)
        clock = clocks.get(key, MISSING)  # (undo.put's record, made here: once a task)
        start = max(self.virtual.get(priority, 0.0), 0.0 if clock is MISSING else clock)
        undo.record((restore, (clocks, key, clock)))
        clocks[key] = start + max(cost, MIN_COST_S)
        bucket = int(start // QUANTUM_S)
        turn = self.turns.get((priority, owner, bucket))
        if turn is None:
            turn = next(self._turns)
            undo.put(self.turns, (priority, owner, bucket), turn)
        return bucket, turn, int(start // CLIENT_QUANTUM_S), client, start

    def started(self, undo: Undo, priority: int, start: float) -> None:
        """A task whose start tag is ``start`` left the queue to run: virtual time moves on
        (never back)."""
        virtual = self.virtual
        old = virtual.get(priority, MISSING)
        before = 0.0 if old is MISSING else old
        if start <= before:
            return
        undo.record((restore, (virtual, priority, old)))  # (undo.put's, once a task)
        virtual[priority] = start
        if int(start // QUANTUM_S) > int(before // QUANTUM_S):
            # Turns of buckets behind virtual time are never asked for again.
            bucket = int(start // QUANTUM_S)
            for key in [k for k in self.turns if k[0] == priority and k[2] < bucket]:
                undo.pop(self.turns, key)

    def client_left(self, undo: Undo, client: str) -> None:
        for key in [k for k in self.clocks if k[0] == client]:
            undo.pop(self.clocks, key)
