"""What a node's workers say to the master while it is away: held, and sent when it is back.

A master restarted on its state directory (or one that lost sight of this node for a while)
must not lose what workers finished meanwhile: a Task's result, a batch of unit results. The
node closes the gate when the connection to the master drops or the master says it forgot the
node; worker frames bound for the master are then held here, in order, up to a bound; the first
``Welcome`` opens the gate and the held frames go out ahead of anything newer. The node reports
what its workers hold in its ``Hello`` (``TaskEnds.holding``), so that the master can take them
back (adopt a running Task, keep finished units) before these frames reach it.

Both sides run on the hub thread, except ``close`` (the Node actor, when told it was forgotten);
one lock covers the decision to hold, so that nothing slips through a gate closing.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import structlog

# What a node holds at most while its master is away: past it, newer frames are dropped (their
# work runs again: at-least-once) rather than the node running out of memory.
HELD_BYTES = 256 * 1024 * 1024
HELD_FRAMES = 200_000


class MasterGate:
    def __init__(self, *, max_bytes: int = HELD_BYTES, max_frames: int = HELD_FRAMES,
                 log: Any = None) -> None:
        self.log = log or structlog.get_logger("actors.node")
        self._lock = threading.Lock()
        self.is_open = False  # closed until the first Welcome: nothing is assigned before it
        self._held: deque[list[bytes]] = deque()
        self._bytes = 0
        self._max_bytes, self._max_frames = max_bytes, max_frames
        self.dropped = 0  # since the gate last closed (told as it opens)
        # The largest message the master reads (its Welcome; 0: no bound): a worker's larger one
        # is not relayed (node._within_bound).
        self.max_message = 0

    def passes(self, frames: list[bytes]) -> bool:
        """Whether to send these frames now; if not, they are held (or dropped past the bound)."""
        if self.is_open:  # the common case, without the lock: a stale True only loses a frame
            return True   # the master would have refused anyway (at-least-once)
        with self._lock:
            if self.is_open:
                return True
            size = sum(map(len, frames))
            if len(self._held) >= self._max_frames or self._bytes + size > self._max_bytes:
                if not self.dropped:
                    self.log.warning("held_frames_dropped", held=len(self._held), held_bytes=self._bytes,
                                hint="the master is away longer than the node can hold its "
                                     "workers' results: those dropped will run again")
                self.dropped += 1
                return False
            self._held.append(frames)
            self._bytes += size
            return False

    def close(self) -> None:
        with self._lock:
            self.is_open = False  # (dropped is 0: an opening reset it)

    def open(self) -> list[list[bytes]]:
        """Open the gate; the frames held meanwhile, oldest first, to send before anything else."""
        with self._lock:
            held, self._held, self._bytes = list(self._held), deque(), 0
            if held or self.dropped:
                self.log.info("master_gate_opened", held=len(held), dropped=self.dropped)
            # (said once: a Welcome to a node whose gate is open already says nothing again)
            self.is_open, self.dropped = True, 0
            return held

    @property
    def held(self) -> int:
        return len(self._held)
