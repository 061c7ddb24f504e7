"""What every actor shell shares: its outbox to the transport hub and the in-process envelopes."""

from __future__ import annotations

import queue
import sys
import weakref
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any

import msgspec
import pykka
import structlog

from actors import messages as m
from actors.errors import HostedActorExit, InvalidEvent
from transport import Hub, Outbox


def simple_inbox() -> queue.SimpleQueue[Any]:
    """An actor's inbox (pykka's extension point for actor types, which uses only ``put``, ``get``
    and ``empty``): C's SimpleQueue, not ``queue.Queue`` with its three Conditions to build and a
    lock and a notify per ``tell``; every message between a hub and its actors goes through one."""
    return queue.SimpleQueue()


def tell_if_alive(ref: pykka.ActorRef[Any] | None, message: Any) -> None:
    """For the hub's callbacks: during shutdown an actor may already have stopped. (try, not
    ``contextlib.suppress``: a context manager per message cost 0.3 us on every hub thread.)"""
    if ref is None:
        return
    try:  # noqa: SIM105 - suppress() is the cost this avoids
        ref.tell(message)
    except pykka.ActorDeadError:
        pass


class Inbound(msgspec.Struct, frozen=True, gc=False):
    """A decoded message from ``peer`` (or from worker ``via`` behind node ``peer``). A struct,
    made for every message a hub receives: a frozen dataclass's ``__init__`` took 0.6 us, this
    0.1 us."""

    peer: bytes
    via: bytes | None
    message: m.Message
    key: bytes = b""  # the sender's public key (Z85), where the socket proves it (the master's)


class Tick(msgspec.Struct, frozen=True, gc=False):
    now: float


class PeerDisconnected(msgspec.Struct, frozen=True):
    """The transport saw the connection of the peer with this routing id close."""

    routing: bytes


class ConnectionEvent(msgspec.Struct, frozen=True):
    socket: str
    what: str  # connected | disconnected | auth_failed | handshake_failed


class Shell(pykka.ThreadingActor):
    """A pykka actor that sends through the hub. The outbox is made in ``on_start``,
    which runs in the actor's own thread: a ZeroMQ socket belongs to one thread."""

    def __init__(self, hub: Hub) -> None:
        super().__init__()
        self.hub = hub
        self.outbox: Outbox | None = None

    @staticmethod
    def _create_actor_inbox() -> Any:
        return simple_inbox()

    def on_start(self) -> None:
        self.outbox = self.hub.outbox()

    def on_stop(self) -> None:
        if self.outbox is not None:
            self.outbox.close()

    def on_receive(self, message: Any) -> Any:
        """The one entry point. A message a core refuses (``InvalidEvent``: checked before any
        change) is logged and dropped. One that raises anything else met a bug: it is logged
        and dropped too, and ``check_state`` then decides whether the actor can go on; only a
        broken invariant ends the actor (``on_failure``)."""
        return self.receive_guarded(self.receive, message)

    def receive_guarded(self, handle: Callable[[Any], Any], message: Any) -> Any:
        """``handle(message)`` as ``on_receive`` takes a message: for each message of a batch
        handed over as one (a message that raises is dropped, not the rest of its batch)."""
        try:
            return handle(message)
        except InvalidEvent as exc:  # refused before it changed anything: a peer's mistake
            self.refused(message, exc)
            return None
        except Exception as exc:
            structlog.get_logger("actors.shell").error(
                "message_dropped", actor=type(self).__name__, message=_describe(message),
                error=repr(exc), exc_info=True, **self.context_of(message))
            self.check_state()
            return None

    def receive(self, message: Any) -> Any:
        raise NotImplementedError

    def context_of(self, message: Any) -> dict[str, Any]:
        """What to log beside a dropped message (the story of the task it names)."""
        return {}

    def refused(self, message: Any, exc: InvalidEvent) -> None:
        """A message a core refused: logged (an actor that peers may flood with them logs
        them at a bounded rate instead: the master's ``_reject``)."""
        structlog.get_logger("actors.shell").warning(
            "message_refused", actor=type(self).__name__, message=_describe(message),
            reason=exc.reason, **self.context_of(message))

    def check_state(self) -> None:
        """Raise if this actor's state no longer holds after a dropped message."""

    def on_failure(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                   tb: TracebackType | None) -> None:
        """A handler raised: pykka stops the actor. Say so loudly, then let the process react."""
        structlog.get_logger("actors.shell").error(
            "actor_crashed", actor=type(self).__name__, exc_info=(exc_type, exc, tb))
        self.on_crash()

    def on_crash(self) -> None:
        """What the process does when this actor dies; subclasses that must not linger exit."""

    def send(self, socket: str, *route: bytes, message: m.Message | None = None,
             frames: list[bytes] | None = None) -> None:
        """Send ``message``, or ``frames`` already encoded (kept for sending again)."""
        assert self.outbox is not None, "send() before on_start()"
        body = [m.encode(message)] if message is not None else frames or []
        self.outbox.send(socket, [*route, *body])


class HubShell(Shell):
    """A shell run by its hub's own thread rather than a thread of its own (``Hub.host``): a
    message from a socket reaches it and its answer leaves in the same turn of the hub's loop,
    with no hand-off between threads. For an actor on the path of every task (the master's, a
    worker's); one that may block for long (reading packages) keeps its own thread, since here
    it would hold up every socket of its process.

    pykka runs it: its own loop (``_actor_loop_running``: replies, failures, stop) is called
    each turn, over what the inbox holds then, and ends the turn when the inbox raises
    ``_TurnOver``."""

    def __init__(self, hub: Hub) -> None:
        super().__init__(hub)
        inbox = self.actor_inbox
        assert isinstance(inbox, _HubInbox)
        inbox.poke = hub.poke
        inbox.looped, inbox.deferred, inbox.overdue = hub.looped, hub.deferred, hub.overdue
        self._set_up = False
        self._turning = False  # a message of its is being handled (a turn, or deliver_now)
        _hosted[self.actor_urn] = self

    @staticmethod
    def _create_actor_inbox() -> Any:
        return _HubInbox()

    def _start_actor_loop(self) -> None:
        try:
            self.hub.host(self._hub_turn)
        except BaseException:
            # pykka registered it already: a registry that kept it would wait on it to stop.
            pykka.ActorRegistry.unregister(self.actor_ref)
            self.actor_stopped.set()
            raise

    def _handle_receive(self, message: Any) -> Any:
        # pykka meets a BaseException from a handler (SystemExit, KeyboardInterrupt raised by
        # the code itself) by stopping every actor and waiting for them, which on this thread
        # would wait for itself: it is this actor's crash instead (``on_failure``).
        try:
            if type(message) is Inbound:  # a peer's message (most): none of pykka's own
                return self.receive_guarded(self.receive, message)  # (as on_receive)
            return super()._handle_receive(message)
        except Exception:
            raise
        except BaseException as exc:
            raise HostedActorExit(type(self).__name__, repr(exc)) from exc

    def _hub_turn(self) -> bool | None:
        """One turn on the hub thread: True, more waits; None, the actor has stopped."""
        inbox: _HubInbox = self.actor_inbox  # type: ignore[assignment]
        if not inbox.items and self._set_up and not self.actor_stopped.is_set():
            return False  # (the hub runs every hosted turn each loop: most find nothing)
        if not self._set_up:
            self._set_up = True
            self._actor_loop_setup()
        inbox.budget = _TURN_MESSAGES
        self._turning = True
        try:
            self._actor_loop_running()
        except _TurnOver:
            return bool(inbox.items)
        finally:
            self._turning = False
        inbox.budget = -1  # stopped: pykka answers what is left (ActorDeadError)
        self._actor_loop_teardown()
        return None

    def deliver_now(self, message: Any) -> bool:
        """On the hub thread, a peer's message (``tell``'d, no reply): handled in this call, as
        its turn would (pykka's failure handling included), when nothing waits in the inbox
        before it and no message of this actor is being handled; False, and nothing done,
        otherwise (``tell`` it). What it saves a lone message: its envelope, the inbox, the
        poke and the turn (~16 Python calls; the hub's caller decides which are lone)."""
        if (self._turning or self.actor_inbox.items or not self._set_up  # type: ignore[attr-defined]
                or self.actor_stopped.is_set()):
            return False
        self._turning = True
        try:
            self._handle_receive(message)
        except Exception:  # (as pykka's loop meets one from a tell: the actor stops)
            self._handle_failure(*sys.exc_info())
            try:
                self.on_failure(*sys.exc_info())
            except Exception:
                self._handle_failure(*sys.exc_info())
            self.hub.poke()  # (its next turn tears it down)
        finally:
            self._turning = False
        return True


def direct_to(ref: pykka.ActorRef[Any] | None) -> Callable[[Any], bool]:
    """``deliver_now`` of the actor behind ``ref`` where it is hosted on its hub, else what
    declines every message (the caller ``tell``s them)."""
    actor = None if ref is None else _hosted.get(ref.actor_urn)
    return _decline if actor is None else actor.deliver_now


def _decline(_message: Any) -> bool:
    return False


#: Hosted actors by their urn, for ``direct_to`` (an ``ActorRef`` names its actor's urn, and
#: keeps the actor itself only privately).
_hosted: weakref.WeakValueDictionary[str, HubShell] = weakref.WeakValueDictionary()


class _TurnOver(Exception):
    """The inbox of a ``HubShell`` is empty, this turn's share is used, or what the turn gave
    out has waited long enough for its end (``Hub.overdue``): back to the loop."""


_TURN_MESSAGES = 10_000  # messages a hosted actor takes per turn: the sockets are read between


class _HubInbox:
    """pykka's inbox (``put``, ``get``, ``empty``) for a ``HubShell``: ``put`` from any thread
    pokes the hub; ``get`` runs on the hub thread and never waits."""

    def __init__(self) -> None:
        self.items: deque[Any] = deque()
        self.poke: Any = None
        # the hub's: what waits for a loopback's peer or the turn's end, and whether it waited
        # long enough for this turn to end (asked only when there is some)
        self.looped: Any = ()
        self.deferred: Any = ()
        self.overdue: Any = None
        self.budget = 0  # messages left in this turn; -1: take all (teardown)

    def put(self, envelope: Any, block: bool = True, timeout: float | None = None) -> None:
        self.items.append(envelope)  # deque.append: thread-safe
        self.poke()

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if not self.items or self.budget == 0 or (
                (self.looped or self.deferred) and self.budget > 0 and self.overdue()):
            raise _TurnOver
        self.budget -= 1
        return self.items.popleft()

    def empty(self) -> bool:
        return not self.items


def _describe(message: Any) -> str:
    inner = message.message if isinstance(message, Inbound) else message
    return type(inner).__name__
