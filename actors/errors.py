"""Every exception this runtime raises, under one base class.

Each class passes its fields positionally to ``super().__init__`` so that
``args`` holds them: that is what pickle (and cloudpickle) rebuilds an
exception from, and these errors cross process boundaries.
"""

from __future__ import annotations

import concurrent.futures
import difflib
from collections.abc import Sequence
from typing import Any


class ActorsError(Exception):
    """Base class of every error raised by pydra-actors itself."""


# --- protocol and transport -------------------------------------------------


class ProtocolError(ActorsError):
    """A peer sent something this process cannot accept."""


class MalformedMessage(ProtocolError):
    """A frame that does not decode to a message of the catalogue."""

    def __init__(self, reason: str, size: int = 0) -> None:
        super().__init__(reason, size)
        self.reason = reason
        self.size = size

    def __str__(self) -> str:
        return f"malformed message ({self.size} bytes): {self.reason}"


class HandshakeRefused(ProtocolError):
    """The other side refused our hello (wrong protocol or package version, bad role)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"handshake refused: {self.reason}"


class ClusterStartFailed(ActorsError):
    """A ``LocalCluster`` did not start: its master, or the node that would run its workers."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"local cluster did not start: {self.reason}"


class ClusterInTask(ActorsError, RuntimeError):
    """``Client()`` without an address in task code: it would start a cluster of its own inside
    the worker (a master, a node and a worker per CPU, on every worker that runs the task)."""

    def __str__(self) -> str:
        return ("Client() without an address inside a task would start a cluster of its own "
                "in this worker: return the work to the client that submitted the task "
                "instead (a ParallelTask's units, or futures passed as arguments to the next "
                "task), or, where the worker may reach the master (--worker-network), pass "
                "its address: Client(address)")


class ConnectFailed(ActorsError):
    """No answer from the master within the deadline (wrong address, or our key is not allowed)."""

    def __init__(self, address: str, waited_s: float, hint: str = "") -> None:
        super().__init__(address, waited_s, hint)
        self.address = address
        self.waited_s = waited_s
        self.hint = hint

    def __str__(self) -> str:
        text = f"no answer from {self.address} within {self.waited_s:.1f}s"
        return f"{text}: {self.hint}" if self.hint else text


class KeyRefused(ConnectFailed):
    """The master refused this peer's CURVE key at the handshake: it is not in its allow-list."""

    def __str__(self) -> str:
        return (f"the master at {self.address} refused this client's key (it is not in the "
                "master's allow-list): connect with the keys directory the master was started "
                "with (Client(address, keys=DIR) or $ACTORS_KEYS), or add this client's public "
                "key to DIR/allowed/")


class InvalidAddress(ActorsError, ValueError):
    """A master address that is not ``HOST:PORT`` or ``tcp://HOST:PORT`` (or, for a client on the
    master's host, the ``ipc://PATH`` of a Unix socket)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(address, reason)
        self.address = address
        self.reason = reason

    def __str__(self) -> str:
        return (f"invalid master address {self.address!r}: {self.reason}; expected HOST:PORT or "
                "tcp://HOST:PORT (e.g. 127.0.0.1:5555, tcp://[::1]:5555)")


class MissingDependency(ActorsError, ImportError):
    """A feature needs an optional package that is not installed; the message says how to get it."""

    def __init__(self, package: str, feature: str, extra: str) -> None:
        super().__init__(package, feature, extra)
        self.package = package
        self.feature = feature
        self.extra = extra

    def __str__(self) -> str:
        return (f"{self.feature} needs {self.package}: pip install 'pydra-actors[{self.extra}]' "
                f"(or pip install {self.package})")


class ClientClosed(ActorsError):
    """The client was closed: no request can be sent, and unfinished futures will never finish."""

    def __init__(self, client_id: str, task_id: str = "") -> None:
        super().__init__(client_id, task_id)
        self.client_id = client_id
        self.task_id = task_id

    def __str__(self) -> str:
        what = f"task {self.task_id} cannot finish" if self.task_id else "it cannot be used"
        return f"client {self.client_id} is closed: {what}"


class MasterLost(ActorsError):
    """The master went away for longer than ``master_timeout``, or came back without its state
    (a new journal), before this task ended: its result will never come."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(address, reason)
        self.address = address
        self.reason = reason

    def __str__(self) -> str:
        return f"lost the master at {self.address}: {self.reason}"


class ResultLost(ActorsError):
    """A task ended well, but its result, held on the node where it ran, could not be fetched
    from there (the node is gone or restarted, or did not answer in time)."""

    def __init__(self, task_id: str, node: str, reason: str) -> None:
        super().__init__(task_id, node, reason)
        self.task_id = task_id
        self.node = node
        self.reason = reason

    def __str__(self) -> str:
        return (f"task {self.task_id} ended, but its result could not be fetched from node "
                f"{self.node}: {self.reason}")


class StateDirLocked(ActorsError):
    """Another master holds this state directory: two masters never share one journal."""

    def __init__(self, path: str, holder: str) -> None:
        super().__init__(path, holder)
        self.path = path
        self.holder = holder

    def __str__(self) -> str:
        return (f"the state directory {self.path} is in use by another master ({self.holder}): "
                "connect to that master, or start this one on another --port (each port has "
                "its own state directory) or with another --state-dir; --take-over only if "
                "that master is hung (it stops when it wakes)")


class JournalUnreadable(ActorsError):
    """The master's journal is corrupt or from an incompatible version: the master does not
    start on it (nothing is overwritten)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return (f"cannot use the master's journal {self.path}: {self.reason}; start with "
                "--fresh to set it aside (renamed, not deleted) and begin with no tasks")


class MasterSuperseded(ActorsError):
    """A newer master took over this master's state directory (``--take-over``) while this one
    was paused: it must not write the journal or schedule any more."""

    def __init__(self, path: str, mine: int, newer: int) -> None:
        super().__init__(path, mine, newer)
        self.path = path
        self.mine = mine
        self.newer = newer

    def __str__(self) -> str:
        return (f"a newer master (epoch {self.newer}) took over {self.path}; this one "
                f"(epoch {self.mine}) stops")


class KeyFileError(ActorsError):
    """A CURVE key file or key directory is missing or unreadable."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class InvalidLaunchRequest(ActorsError, ValueError):
    """What ``python -m actors ssh`` sent a remote host (a JSON line on its stdin) is not a
    node to start: malformed, a field of the wrong type, a bad address, no key."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid launch request: {self.reason}"


# --- submitting tasks -------------------------------------------------------


class InvalidArguments(ActorsError, TypeError):
    """Arguments that do not fit the task's ``work()`` (or ``get_work()``) signature."""

    def __init__(self, task: str, reason: str) -> None:
        super().__init__(task, reason)
        self.task = task
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid arguments for {self.task}: {self.reason}"


class CodeUnknown(ActorsError, LookupError):
    """A submit named code by its hash that this client never shipped to this master."""

    def __init__(self, code_hash: str, task: str) -> None:
        super().__init__(code_hash, task)
        self.code_hash = code_hash
        self.task = task

    def __str__(self) -> str:
        return (f"the master has no code {self.code_hash[:12]} for {self.task} from this client "
                "(a master restarted since it was shipped?): submit again")


class LargePayloadWarning(UserWarning):
    """A task's code (the class and what it captures) is large, and travels to every worker."""


class QueueFull(ActorsError, RuntimeError):
    """A submission refused: its key already has as many tasks queued on the master as it may
    (``--max-queued``), so that one user's runaway loop cannot exhaust a shared master."""

    def __init__(self, limit: int) -> None:
        super().__init__(limit)
        self.limit = limit

    def __str__(self) -> str:
        return (f"this key already has {self.limit:,} tasks queued on the master, the most it "
                "may (master option --max-queued): wait for some to finish, or cancel some, "
                "and submit again")


class MemoryBudgetFull(QueueFull):
    """A submission (or inline scatter) refused: what its key's tasks make the master hold
    would pass the key's budget in bytes (``--max-key-memory``): the arguments of its
    unfinished tasks, held-back ones included, and the small results and inline scattered data
    kept while their futures are held. One user must not exhaust a master others share."""

    def __init__(self, limit: int, held: int = 0, needed: int = 0) -> None:
        super().__init__(limit)
        self.args = (limit, held, needed)
        self.held, self.needed = held, needed

    def __str__(self) -> str:
        mib = 1 << 20
        needed = f"{self.needed / mib:,.1f} MiB" if self.needed >= mib else f"{self.needed:,} bytes"
        return (f"this key's tasks hold {self.held / mib:,.1f} MiB on the master (arguments of "
                f"unfinished tasks, kept results and inline scattered data), and {needed} "
                f"more would pass its budget of {self.limit / mib:,.0f} MiB (master option "
                "--max-key-memory): wait for tasks to finish, release futures you no longer "
                "need, and put large data on the cluster once with client.scatter (data past "
                "256 KiB is held on a node, not the master)")


class MessageTooLarge(ActorsError, ValueError):
    """A message refused by the client before it is sent: larger than the master reads
    (``--max-message``, said in its ``Welcome``). The master closes the connection of a peer
    that sends one, unread; nothing of it was queued."""

    def __init__(self, kind: str, size: int, limit: int) -> None:
        super().__init__(kind, size, limit)
        self.kind, self.size, self.limit = kind, size, limit

    def __str__(self) -> str:
        mib = 1 << 20
        return (f"this {self.kind} is {self.size / mib:,.1f} MiB encoded, and the master reads "
                f"messages of at most {self.limit / mib:,.0f} MiB (master option --max-message): "
                "put large data on the cluster with client.scatter and pass its future, or "
                "split the work into smaller arguments")


class TaskIdTaken(ActorsError, ValueError):
    """A submission refused: its task id is another client's task (or scattered data) on this
    master (ids are random, so a clash is a bug or a client reusing ids it saw). Taken for a
    resend, it would leave this client's future waiting for a result that goes to the other."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return (f"task id {self.task_id!r} is another client's task or data on this master: "
                "submit again (a new submit draws a new id)")


class UnknownTask(ActorsError, LookupError):
    """A task or package name that the master does not know."""

    def __init__(self, name: str, known: Sequence[str] = ()) -> None:
        super().__init__(name, list(known))
        self.name = name
        self.known = list(known)

    def __str__(self) -> str:
        if not self.known:
            return (f"unknown task {self.name!r}: no task is deployed on this master (it reads "
                    "packages from its --tasks-dir, ./tasks by default; `python -m actors "
                    "packages` lists what it has)")
        close = difflib.get_close_matches(self.name, self.known, n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return (f"unknown task {self.name!r}{hint}; deployed tasks are named "
                f"package.module:Class, known: {', '.join(self.known)}")


class NoSuchTask(ActorsError, LookupError):
    """A task id the master has no task of the caller's key for: never submitted, forgotten
    after it ended, or submitted with another key (the answer does not say which)."""

    def __init__(self, task_id: str, reason: str = "") -> None:
        super().__init__(task_id, reason)
        self.task_id = task_id
        self.reason = reason

    def __str__(self) -> str:
        return self.reason or f"no task {self.task_id!r} submitted with this key"


# --- running tasks ----------------------------------------------------------


class ArgumentsNotSerializable(ActorsError, TypeError):
    """What a submit would send (an argument, or the task's code and what it captures) could
    not be pickled to travel to a worker; nothing was sent."""

    def __init__(self, task: str, what: str, type_name: str, reason: str) -> None:
        super().__init__(task, what, type_name, reason)
        self.task = task
        self.what = what  # "argument 2", "argument 'path'", "the task's code"
        self.type_name = type_name
        self.reason = reason

    def __str__(self) -> str:
        return (f"{self.what} of {self.task} cannot be sent to a worker: a {self.type_name} "
                f"({self.reason}); pass plain data (numbers, strings, lists, dicts, arrays, a "
                "path) and make locks, open files, sockets and connections inside the task")


class ResultNotSerializable(ActorsError, TypeError):
    """A task's (or unit's) return value could not be pickled to travel back."""

    def __init__(self, task: str, unit: str, type_name: str, reason: str) -> None:
        super().__init__(task, unit, type_name, reason)
        self.task = task
        self.unit = unit
        self.type_name = type_name
        self.reason = reason

    def __str__(self) -> str:
        where = f"{self.task}, unit {self.unit}" if self.unit else self.task
        return (f"the return value of {where} could not be serialized: a {self.type_name} "
                f"({self.reason}); return plain data (numbers, strings, lists, dicts, arrays) "
                "instead of locks, generators, open files or sockets")


class ResultTooLarge(ActorsError, MemoryError):
    """A task's (or unit's) return value is too large for its worker to send: serializing it
    ran out of the memory the worker may use."""

    def __init__(self, task: str, unit: str, type_name: str, size: int, limit: int) -> None:
        super().__init__(task, unit, type_name, size, limit)
        self.task = task
        self.unit = unit
        self.type_name = type_name
        self.size = size  # bytes the value holds, as far as its type tells (0: not known)
        self.limit = limit  # the worker's memory limit in bytes (0: none set)

    def __str__(self) -> str:
        where = f"{self.task}, unit {self.unit}" if self.unit else self.task
        size = f" of about {self.size / 2**20:,.0f} MiB" if self.size else ""
        limit = (f" (--worker-memory {self.limit / 2**20:,.0f} MiB)" if self.limit
                 else " (the host ran out of memory)")
        return (f"the return value of {where}, a {self.type_name}{size}, is too large to send: "
                f"serializing it needs about as much memory again, more than the worker may "
                f"use{limit}; return less, or write it to shared storage and return its path")


class TaskCancelled(ActorsError, concurrent.futures.CancelledError):
    """The task was cancelled before it produced a result."""

    def __init__(self, task_id: str) -> None:
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return f"task {self.task_id} was cancelled"


class InputFailed(ActorsError):
    """A task could not run: a future among its arguments (its input) failed or was cancelled.
    The client chains that input's own error as ``__cause__`` when it still has its future."""

    def __init__(self, task_id: str, input_id: str, state: str, reason: str = "") -> None:
        super().__init__(task_id, input_id, state, reason)
        self.task_id = task_id
        self.input_id = input_id
        self.state = state
        self.reason = reason

    def __str__(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return f"task {self.task_id} did not run: its input {self.input_id} {self.state}{why}"


class ScatterFailed(ActorsError):
    """``Client.scatter`` could not put the data on the cluster; ``reason`` says why."""

    def __init__(self, task_id: str, reason: str) -> None:
        super().__init__(task_id, reason)
        self.task_id = task_id
        self.reason = reason

    def __str__(self) -> str:
        return f"scatter {self.task_id} failed: {self.reason}"


class InputLost(ActorsError, LookupError):
    """A future passed as an argument names a result the cluster no longer has (its future was
    released, its master restarted, or its node was lost)."""

    def __init__(self, task_id: str, input_id: str, reason: str) -> None:
        super().__init__(task_id, input_id, reason)
        self.task_id = task_id
        self.input_id = input_id
        self.reason = reason

    def __str__(self) -> str:
        return f"task {self.task_id}: its input {self.input_id} is gone: {self.reason}"


class TaskStopped(BaseException):
    """Raised inside a cancelled task's code, at its next ``task_progress`` (or by the task
    itself once ``task_stop_requested`` is true): unwinds ``work`` so that its ``finally:``
    blocks and context managers run. A BaseException, like ``KeyboardInterrupt``, so that an
    ``except Exception:`` in the task does not swallow it."""

    def __init__(self, task_id: str = "") -> None:
        super().__init__(task_id)
        self.task_id = task_id

    def __str__(self) -> str:
        return f"task {self.task_id} was asked to stop (cancelled)"


class WorkerKilled(ActorsError):
    """A unit was on workers that died too many times; ``causes`` says how each died."""

    def __init__(self, task_id: str, unit: str, causes: Sequence[str]) -> None:
        super().__init__(task_id, unit, list(causes))
        self.task_id = task_id
        self.unit = unit
        self.causes = list(causes)

    def __str__(self) -> str:
        deaths = "; ".join(self.causes) or "unknown cause"
        return (
            f"task {self.task_id}: unit {self.unit} was running on workers that died "
            f"{len(self.causes)} time(s): {deaths}"
        )


class DataUnreachable(ActorsError, ConnectionError):
    """A worker could not fetch a unit's result from the worker holding it, ``tries`` times,
    while that worker lived: the holder's node announced a data address (``address``) the
    fetching node cannot reach (a NAT, a firewall, a wrong ``--data-address``)."""

    def __init__(self, task_id: str, unit: str, asker: str, holder: str, address: str,
                 tries: int) -> None:
        super().__init__(task_id, unit, asker, holder, address, tries)
        self.task_id, self.unit, self.asker, self.holder = task_id, unit, asker, holder
        self.address, self.tries = address, tries

    def __str__(self) -> str:
        asker_node, holder_node = self.asker.split("/")[0], self.holder.split("/")[0]
        return (f"task {self.task_id}: {self.asker} could not fetch {self.unit}'s result from "
                f"{self.holder} at {self.address or 'its data address'} ({self.tries} tries, no "
                f"answer): is that address reachable from {asker_node}'s host? (see "
                f"{holder_node}'s --data-address and --data-listen, and any firewall between)")


class RemoteError(ActorsError):
    """A task raised an exception that cannot be rebuilt here (its class is not importable)."""

    def __init__(self, type_name: str, message: str, remote_traceback: str) -> None:
        super().__init__(type_name, message, remote_traceback)
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.type_name}: {self.message}\n\nRemote traceback:\n{self.remote_traceback}"


class WorkerStartFailed(ActorsError):
    """A worker process could not load or construct the task instance."""

    def __init__(self, task_id: str, reason: str) -> None:
        super().__init__(task_id, reason)
        self.task_id = task_id
        self.reason = reason

    def __str__(self) -> str:
        return f"task {self.task_id}: worker could not start the task: {self.reason}"


# --- state machines ---------------------------------------------------------


class ContainmentFailed(ActorsError):
    """A measure the probe allowed failed in a worker: the worker must not run task code."""

    def __init__(self, measure: str, reason: str) -> None:
        super().__init__(measure, reason)
        self.measure = measure
        self.reason = reason

    def __str__(self) -> str:
        return f"worker containment failed at {self.measure}: {self.reason}"


class InvalidEvent(ActorsError):
    """An event a state machine cannot take (stale or malformed); it was refused unchanged."""

    def __init__(self, event: Any, reason: str) -> None:
        super().__init__(event, reason)
        self.event = event
        self.reason = reason

    def __str__(self) -> str:
        return f"{type(self.event).__name__} refused: {self.reason}"


class HostedActorExit(ActorsError):
    """A handler of an actor run by its hub's thread raised SystemExit or the like: that actor
    stops alone (pykka would stop every actor and wait for them, on the thread they need)."""

    def __init__(self, actor: str, raised: str) -> None:
        super().__init__(actor, raised)
        self.actor = actor
        self.raised = raised

    def __str__(self) -> str:
        return f"{self.actor} stopped: its handler raised {self.raised}"


class InvalidTransition(ActorsError):
    """A state machine was asked for a transition that cannot happen; its state is unchanged."""

    def __init__(self, key: str, start: str, finish: str, story: Sequence[Any] = ()) -> None:
        super().__init__(key, start, finish, list(story))
        self.key = key
        self.start = start
        self.finish = finish
        self.story = list(story)

    def __str__(self) -> str:
        lines = [f"invalid transition of {self.key!r}: {self.start} -> {self.finish}"]
        if self.story:
            lines.append("story:")
            lines.extend(f"  {entry}" for entry in self.story[-10:])
        return "\n".join(lines)


class TransitionLoop(ActorsError):
    """Chained recommendations did not settle: a bug in a transition table."""

    def __init__(self, key: str, count: int) -> None:
        super().__init__(key, count)
        self.key = key
        self.count = count

    def __str__(self) -> str:
        return f"transitions did not settle after {self.count} steps (last key {self.key!r})"


# --- task packages ----------------------------------------------------------


class PackageError(ActorsError):
    """A task package cannot be listed, fetched or loaded."""

    def __init__(self, package: str, reason: str) -> None:
        super().__init__(package, reason)
        self.package = package
        self.reason = reason

    def __str__(self) -> str:
        return f"package {self.package!r}: {self.reason}"


class PackageIntegrityError(PackageError):
    """A package's content does not match its version hash (tampered, truncated, edited by hand)."""
