"""Which finished tasks' results the master keeps as inputs for later tasks, and until when.

A future passed among a task's arguments is an *input* of that task (``actors.inputs``). Its
result must still be on the cluster when the task starts, however late that is: it is kept
while its client holds the future (``refs``: a ``Release`` says it no longer does) or while a
task that names it has not ended (``users``). A result of at most ``INLINE_RESULT_BYTES`` is
kept here (``kept``); a larger one stays on the node that holds it, and the master lets the
node drop it only once it is unused and its client has it. A failed input is kept as its
state and error text, so that a task submitted later with it fails at once, saying why.

A plain class: the Master actor feeds it and carries out what it returns (task ids whose held
results its nodes may drop).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from actors.errors import InputFailed, InputLost


class Kept(msgspec.Struct, frozen=True, gc=False):
    """(One made as each task ends: a struct, ~60 ns, not a frozen dataclass, ~550.)"""

    client_id: str
    state: str  # "done", or how it failed ("erred", "cancelled")
    result: bytes | None = None  # a result kept here; None: held on a node, or failed
    why: str = ""  # a failure: its error's type and message


class InputBook:
    def __init__(self) -> None:
        self.refs: dict[str, str] = {}  # task -> its client, while the client holds its future
        self.more_refs: dict[str, int] = {}  # scattered data with more than one future: how many
        self.users: dict[str, int] = {}  # task -> the unfinished tasks that name it as an input
        # ... and its client, whose result it stays once its future is released (an input is
        # its submitter's own task): kept, it counts in that client's bytes
        self.user_client: dict[str, str] = {}
        self.uses: dict[str, tuple[str, ...]] = {}  # unfinished task -> its inputs
        self.kept: dict[str, Kept] = {}
        # Bytes of the results kept here, by client and in all (the master's budget per key)
        self.kept_bytes: dict[str, int] = {}
        self.kept_total = 0

    def check(self, task_id: str, client_id: str, input_id: str,
              running: str | None) -> Exception | None:
        """Why ``task_id`` of ``client_id`` may not take ``input_id`` (None: it may).
        ``running``: the client of the input if the scheduler has it unfinished, else None."""
        if input_id == task_id:
            return InputLost(task_id, input_id, "a task cannot be its own input")
        kept = self.kept.get(input_id)
        owner = running if running is not None else kept.client_id if kept is not None else None
        if owner != client_id:  # unknown, released, or another client's (the same answer)
            return InputLost(task_id, input_id, "no such task of this client is on the cluster "
                                                "(its future was released, or its master "
                                                "restarted since)")
        if kept is not None and kept.state != "done":
            return InputFailed(task_id, input_id, kept.state, kept.why)
        return None

    def submitted(self, task_id: str, client_id: str, inputs: Iterable[str]) -> None:
        self.refs[task_id] = client_id
        if not inputs:
            return  # (most tasks: nothing to count)
        named = tuple(dict.fromkeys(inputs))
        if named:
            self.uses[task_id] = named
            for input_id in named:
                self.users[input_id] = self.users.get(input_id, 0) + 1
                self.user_client[input_id] = client_id

    def ended(self, task_id: str, state: str, result: bytes | None = None,
              why: str = "") -> list[str]:
        """``task_id`` ended: kept if still wanted; the inputs it used may go. The tasks whose
        held results are unused now."""
        client_id = self.refs.get(task_id)
        if client_id is not None or self.users.get(task_id):
            owner = (client_id or self.user_client.get(task_id)
                     or self.kept.get(task_id, Kept("", "")).client_id)
            self._keep(task_id, Kept(owner, state, result, why))
        # (in_use, inline: every task that ends asks it)
        unused = [] if client_id is not None or task_id in self.users else [task_id]
        for input_id in self.uses.pop(task_id, ()):
            left = self.users.get(input_id, 0) - 1
            if left > 0:
                self.users[input_id] = left
                continue
            self.users.pop(input_id, None)
            self.user_client.pop(input_id, None)
            if not self._in_use(input_id):
                self._drop(input_id)
                unused.append(input_id)
        return unused

    def referenced_again(self, task_id: str, client_id: str) -> bool:
        """Data scattered again (named by its content): one more future of it. False when it
        is not this client's kept result."""
        kept = self.kept.get(task_id)
        if kept is None or kept.client_id != client_id:
            return False
        if task_id in self.refs:
            self.more_refs[task_id] = self.more_refs.get(task_id, 1) + 1
        else:
            self.refs[task_id] = client_id
        return True

    def released(self, client_id: str, task_ids: Iterable[str]) -> list[str]:
        """The client let go of these futures (only its own count); those now unused."""
        unused = []
        for task_id in task_ids:
            if self.refs.get(task_id) != client_id:
                continue
            more = self.more_refs.pop(task_id, 1) - 1
            if more > 0:
                if more > 1:
                    self.more_refs[task_id] = more
                continue
            del self.refs[task_id]
            if task_id not in self.users:  # (in_use and _drop, inline: most of a burst's)
                kept = self.kept.pop(task_id, None)
                if kept is not None and kept.result:
                    self._count(kept.client_id, -len(kept.result))
                unused.append(task_id)
        return unused

    def holding(self, client_id: str, held: set[str]) -> list[str]:
        """The client holds the futures of ``held`` alone (it says so on a connection made
        again: a ``Release`` may have been lost with the one that dropped): each other result
        kept for it is released, however many of its futures it had; those now unused."""
        gone = [t for t, c in self.refs.items() if c == client_id and t not in held]
        for task_id in gone:
            self.more_refs.pop(task_id, None)
        return self.released(client_id, gone)

    def client_gone(self, client_id: str) -> None:
        """Its futures are gone with it (its unfinished tasks end as cancelled, and each end
        lets its inputs go)."""
        for task_id in [t for t, c in self.refs.items() if c == client_id]:
            del self.refs[task_id]
            self.more_refs.pop(task_id, None)
        for task_id in [t for t, k in self.kept.items() if k.client_id == client_id]:
            if not self.users.get(task_id):
                self._drop(task_id)

    def compact(self) -> None:
        """After a backlog drained: rebuild the tables it left oversized (a dict never shrinks
        its table as entries go). Changes no content."""
        self.refs, self.more_refs = dict(self.refs), dict(self.more_refs)
        self.users, self.uses, self.kept = dict(self.users), dict(self.uses), dict(self.kept)
        self.user_client = dict(self.user_client)
        self.kept_bytes = dict(self.kept_bytes)

    def _keep(self, task_id: str, kept: Kept) -> None:
        if task_id in self.kept:  # kept again: a task that ended once already, as a restart may
            self._drop(task_id)
        self.kept[task_id] = kept
        if result := kept.result:  # (inline: one of these a task)
            size, by_client = len(result), self.kept_bytes
            self.kept_total += size
            by_client[kept.client_id] = by_client.get(kept.client_id, 0) + size

    def _drop(self, task_id: str) -> None:
        kept = self.kept.pop(task_id, None)
        if kept is not None and kept.result:
            self._count(kept.client_id, -len(kept.result))

    def _count(self, client_id: str, size: int) -> None:
        self.kept_total += size
        count = self.kept_bytes.get(client_id, 0) + size
        if count:
            self.kept_bytes[client_id] = count
        else:
            del self.kept_bytes[client_id]

    def in_use(self, task_id: str) -> bool:
        return task_id in self.refs or task_id in self.users

    _in_use = in_use  # (one call, not two)
