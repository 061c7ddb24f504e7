"""The hub thread's poller: ZeroMQ sockets and plain descriptors, in one ``poll`` call.

``zmq.Poller`` (libzmq's ``zmq_poll``) asks every ZeroMQ socket for its events twice a wait,
before and after the system's ``poll``, even a socket nothing happened to, and each ask is two
system calls (a ``getpid``, its fork check, and a ``poll`` of the socket's mailbox): ~30 system
calls each time a node's hub thread woke; ``poll`` and ``getpid`` made ~200 of a lone round
trip's system calls across a cluster's processes, ~120 with this poller.

This one asks only the sockets that may have something: those whose descriptor (``ZMQ_FD``)
the system's ``poll`` found readable, and those the hub used since it last asked them. The
descriptor is edge-like: it is readable once commands reached the socket's mailbox, and any
operation on the socket (a send, a receive, a connect) may take those commands in, a message's
"there is more to read" among them, without leaving the descriptor readable. So every such
operation must be told (``touched``) and the socket is asked before the next wait; a socket
the caller read until it said it had nothing left is ``settled``. A socket reported readable
is asked again at the next call unless it was settled meanwhile (a receive cut short by a
budget leaves messages the descriptor will not announce again).

Events are ZeroMQ's flags (``zmq.POLLIN``, ``POLLOUT``, ``POLLERR``), for descriptors too, as
``zmq.Poller`` gives them; a ZeroMQ socket is watched for ``POLLIN`` only.
"""

from __future__ import annotations

import select
from typing import Any

import zmq

_POLLIN, _POLLOUT, _POLLERR = int(zmq.POLLIN), int(zmq.POLLOUT), int(zmq.POLLERR)
_EVENTS = int(zmq.EVENTS)
_OS_IN, _OS_OUT = select.POLLIN, select.POLLOUT
_OS_ERR = select.POLLERR | select.POLLHUP | select.POLLNVAL


def _os_mask(mask: int) -> int:
    return (_OS_IN if mask & _POLLIN else 0) | (_OS_OUT if mask & _POLLOUT else 0)


def _zmq_mask(revents: int) -> int:
    return ((_POLLIN if revents & _OS_IN else 0) | (_POLLOUT if revents & _OS_OUT else 0)
            | (_POLLERR if revents & _OS_ERR else 0))


class Poller:
    """``register``/``modify``/``unregister``/``poll`` as ``zmq.Poller``'s, plus ``touched``
    and ``settled`` (see the module docstring). One thread's: not thread-safe."""

    def __init__(self) -> None:
        self._poll = select.poll()
        self._by_fd: dict[int, zmq.Socket[bytes]] = {}  # a ZeroMQ socket's ZMQ_FD -> it
        self._fds: dict[zmq.Socket[bytes], int] = {}
        #: ZeroMQ sockets to ask before the next wait (see the module docstring).
        self._unsure: set[zmq.Socket[bytes]] = set()
        self.touched = self._unsure.add
        self.settled = self._unsure.discard

    def register(self, target: zmq.Socket[bytes] | int, mask: int = _POLLIN) -> None:
        if isinstance(target, zmq.Socket):
            if mask != _POLLIN:
                raise ValueError("a ZeroMQ socket is watched for POLLIN only")
            fd = target.FD
            assert isinstance(fd, int)
            self._by_fd[fd] = target
            self._fds[target] = fd
            self._unsure.add(target)  # (what came before it was registered)
            self._poll.register(fd, _OS_IN)
        else:
            self._poll.register(target, _os_mask(mask))

    def modify(self, fd: int, mask: int) -> None:
        self._poll.modify(fd, _os_mask(mask))

    def unregister(self, target: zmq.Socket[bytes] | int) -> None:
        if isinstance(target, zmq.Socket):
            fd = self._fds.pop(target)
            del self._by_fd[fd]
            self._unsure.discard(target)
            self._poll.unregister(fd)
        else:
            self._poll.unregister(target)

    def check_all(self) -> None:
        """Ask every ZeroMQ socket before the next wait: a safety net, once in a while, for an
        operation nobody said ``touched`` for."""
        self._unsure.update(self._fds)

    def poll(self, timeout_ms: int | None = None) -> list[tuple[Any, int]]:
        """What is ready: ZeroMQ sockets with a message to read (``POLLIN``), descriptors with
        their events; waits up to ``timeout_ms`` (None: until something is) when nothing is.
        (Typed as ``zmq.Poller.poll``: the caller tells a socket from a descriptor by its maps.)"""
        ready: list[tuple[Any, int]] = []
        if self._unsure:
            for unsure in self._unsure:
                if unsure.get(_EVENTS) & _POLLIN:  # type: ignore[operator]
                    ready.append((unsure, _POLLIN))
            self._unsure.clear()
        if ready:
            timeout_ms = 0
        by_fd = self._by_fd
        for fd, revents in self._poll.poll(timeout_ms):
            sock = by_fd.get(fd)
            if sock is None:
                ready.append((fd, _zmq_mask(revents)))
            elif (sock, _POLLIN) not in ready and sock.get(_EVENTS) & _POLLIN:  # type: ignore[operator]
                ready.append((sock, _POLLIN))
        for target, _events in ready:
            if target.__class__ is not int:
                self._unsure.add(target)
        return ready
