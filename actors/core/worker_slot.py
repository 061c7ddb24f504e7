"""The Worker actor's one slot: which task instance it holds, and in what state. No I/O.

A worker holds one task instance at a time (others the master queued behind it wait in line,
outside the slot). The slot's states:

           code or version        code or version came
   IDLE -----not here yet----> LOADING ----------------+---> HOSTING  (a plain Task)
    |                             |                    +---> HELPING  (a ParallelTask's units)
    +-----with its code here------|--------------------+---> DRIVING  (a ParallelTask's driver)
    |                             |
    +---would not load---> FAILED <---would not load, or its version is unavailable

   and from every state but IDLE back to IDLE: released, or the worker stops.

  IDLE      no task instance; the next assignment starts at once
  LOADING   assigned, waiting for its shipped code (from the master) or its package version
            (from the node); the task's input that comes meanwhile is kept for it
  HOSTING   a plain Task in the Worker actor's mailbox, its work on the executor; plain Tasks
            queued behind it may be begun already (lined up); it is let go once its outcome
            is sent
  HELPING   a ParallelTask instance in the Worker actor's mailbox that only runs units (its
            driver is elsewhere)
  DRIVING   a ParallelTask's driver: a Driver actor of its own holds the instance, and units of
            the task run here too
  FAILED    its task would not load (reported as fatal: the node replaces this process); the
            task's input is dropped until it is released

Rules
 1. ``WorkerSlot.move`` is the only way to change the state. It refuses a pair missing from
    ``TRANSITIONS`` with ``InvalidTransition`` carrying the slot's story, and changes nothing.
 2. The slot names its task exactly when it is not IDLE.
 3. What each state holds (the assignment waited for, the hosted instance, the driver's actor
    ref) is the shell's, ``actors/worker.py``, whose ``_validate_slot`` checks that it fits.
"""

from __future__ import annotations

import enum
from collections import deque

from actors.errors import InvalidTransition

STORY_LENGTH = 64


class Slot(enum.Enum):
    # Hashed by identity (members are singletons; ``Enum.__hash__`` is a Python-level call,
    # ~12 a task on a warm worker: each transition's pair, each text looked up)
    __hash__ = object.__hash__

    IDLE = "idle"
    LOADING = "loading"
    HOSTING = "hosting"
    HELPING = "helping"
    DRIVING = "driving"
    FAILED = "failed"


IDLE, LOADING, FAILED = Slot.IDLE, Slot.LOADING, Slot.FAILED
HOSTING, HELPING, DRIVING = Slot.HOSTING, Slot.HELPING, Slot.DRIVING
#: Each state's text (``Slot.X.value`` is a property call, twice per change of a warm worker).
SLOT_TEXT = {state: state.value for state in Slot}
#: The states that hold a task instance whose units this worker runs.
HOLDS_INSTANCE = frozenset({HOSTING, HELPING, DRIVING})

# Every allowed change, and why it happens.
TRANSITIONS: dict[tuple[Slot, Slot], str] = {
    (IDLE, LOADING): "assigned; its code or package version is not here yet",
    (IDLE, HOSTING): "a plain Task assigned, its code here",
    (IDLE, HELPING): "a ParallelTask's units assigned, its code here",
    (IDLE, DRIVING): "a ParallelTask's driver assigned, its code here",
    (IDLE, FAILED): "assigned, and it would not load",
    (LOADING, HOSTING): "the plain Task's code came",
    (LOADING, HELPING): "the ParallelTask's code came",
    (LOADING, DRIVING): "the ParallelTask's code came",
    (LOADING, FAILED): "its code came and would not load, or its version is unavailable",
    (LOADING, IDLE): "released before it loaded, or the worker stops",
    (HOSTING, IDLE): "released (its outcome was sent), or the worker stops",
    (HELPING, IDLE): "released, or the worker stops",
    (DRIVING, IDLE): "released, or the worker stops",
    (FAILED, IDLE): "released, or the worker stops",
}

StoryEntry = tuple[str, str, str]  # task id, start, finish


class WorkerSlot:
    """The state of a worker's one slot and the task it names; see the module docstring."""

    __slots__ = ("state", "task_id", "story")

    def __init__(self) -> None:
        self.state = IDLE
        self.task_id = ""
        self.story: deque[StoryEntry] = deque(maxlen=STORY_LENGTH)

    def move(self, finish: Slot, task_id: str) -> str:
        """Change to ``finish`` for ``task_id`` ("" for IDLE) and return why such a change
        happens; raise ``InvalidTransition`` and change nothing if it cannot happen."""
        start = self.state
        why = TRANSITIONS.get((start, finish))
        if why is None or (finish is IDLE) == bool(task_id):
            raise InvalidTransition(
                f"worker slot ({task_id or self.task_id or 'no task'})", start.value, finish.value,
                list(self.story))
        if start is not IDLE and finish is not IDLE and task_id != self.task_id:
            raise InvalidTransition(
                f"worker slot ({self.task_id} -> {task_id})", start.value, finish.value,
                list(self.story))
        self.story.append((task_id or self.task_id, SLOT_TEXT[start], SLOT_TEXT[finish]))
        self.state, self.task_id = finish, task_id
        return why
