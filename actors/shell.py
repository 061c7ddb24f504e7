"""What every actor shell shares: its outbox to the transport hub and the in-process envelopes."""

from __future__ import annotations

import contextlib
import queue
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import pykka
import structlog

from actors import messages as m
from transport import Hub, Outbox


def simple_inbox() -> queue.SimpleQueue[Any]:
    """An actor's inbox (pykka's extension point for actor types, which uses only ``put``, ``get``
    and ``empty``): C's SimpleQueue, not ``queue.Queue`` with its three Conditions to build and a
    lock and a notify per ``tell``; every message between a hub and its actors goes through one."""
    return queue.SimpleQueue()


def tell_if_alive(ref: pykka.ActorRef[Any] | None, message: Any) -> None:
    """For the hub's callbacks: during shutdown an actor may already have stopped."""
    if ref is None:
        return
    with contextlib.suppress(pykka.ActorDeadError):
        ref.tell(message)


@dataclass(frozen=True)
class Inbound:
    """A decoded message from ``peer`` (or from worker ``via`` behind node ``peer``)."""

    peer: bytes
    via: bytes | None
    message: m.Message


@dataclass(frozen=True)
class Tick:
    now: float


@dataclass(frozen=True)
class ConnectionEvent:
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

    def on_failure(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                   tb: TracebackType | None) -> None:
        """A handler raised: pykka stops the actor. Say so loudly, then let the process react."""
        structlog.get_logger("actors.shell").error(
            "actor_crashed", actor=type(self).__name__, exc_info=(exc_type, exc, tb))
        self.on_crash()

    def on_crash(self) -> None:
        """What the process does when this actor dies; subclasses that must not linger exit."""

    def send(self, socket: str, *route: bytes, message: m.Message) -> None:
        assert self.outbox is not None, "send() before on_start()"
        self.outbox.send(socket, [*route, m.encode(message)])
