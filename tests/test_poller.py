"""The hub's poller (transport/poller.py) on real ZeroMQ sockets over ipc: it asks a socket for
its events only when told the socket may have something, so every way a message's signal can be
taken in before the wait must still end the wait with that socket reported."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tests.conftest import wait_until
from transport.poller import Poller

# Long enough that a missed message shows as an empty answer rather than a slow one.
WAIT_MS = 5_000


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[zmq.Socket[bytes], zmq.Socket[bytes]]]:
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    dealer = context.socket(zmq.DEALER)
    router.bind(f"ipc://{tmp_path}/p.sock")
    dealer.connect(f"ipc://{tmp_path}/p.sock")
    try:
        yield router, dealer
    finally:
        router.close(linger=0)
        dealer.close(linger=0)


def settled_poller(router: zmq.Socket[bytes]) -> Poller:
    """A poller holding the router, asked once so that nothing is left to ask."""
    poller = Poller()
    poller.register(router, zmq.POLLIN)
    assert poller.poll(0) == []
    return poller


def readable(sock: zmq.Socket[bytes]) -> bool:
    return bool(sock.get(zmq.EVENTS) & zmq.POLLIN)  # type: ignore[operator]


def test_a_message_that_came_before_the_socket_was_registered_is_reported(
        pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    router, dealer = pair
    dealer.send(b"early")
    # (asking takes the signal in: the descriptor alone would not say it again)
    wait_until(lambda: readable(router), timeout=10, what="the message reached the router")
    poller = Poller()
    poller.register(router, zmq.POLLIN)
    assert poller.poll(WAIT_MS) == [(router, zmq.POLLIN)]


def test_a_message_announced_while_waiting_ends_the_wait(
        pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    router, dealer = pair
    poller = settled_poller(router)
    dealer.send(b"later")
    assert poller.poll(WAIT_MS) == [(router, zmq.POLLIN)]
    assert router.recv_multipart()[1] == b"later"


def test_an_operation_it_was_told_of_does_not_hide_a_message(
        pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    router, dealer = pair
    poller = settled_poller(router)
    dealer.send(b"hidden")
    # An operation on the socket (here: asking its events, as a send or a receive may do
    # inside libzmq) takes in the signal the descriptor gave; the descriptor goes quiet.
    wait_until(lambda: readable(router), timeout=10, what="the message reached the router")
    poller.touched(router)
    assert poller.poll(WAIT_MS) == [(router, zmq.POLLIN)]


def test_check_all_finds_a_message_whose_signal_nobody_reported(
        pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    router, dealer = pair
    poller = settled_poller(router)
    dealer.send(b"hidden")
    wait_until(lambda: readable(router), timeout=10, what="the message reached the router")
    poller.check_all()
    assert poller.poll(WAIT_MS) == [(router, zmq.POLLIN)]


def test_a_socket_read_in_part_is_reported_again_until_settled(
        pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    router, dealer = pair
    poller = settled_poller(router)
    dealer.send(b"one")
    dealer.send(b"two")
    assert poller.poll(WAIT_MS) == [(router, zmq.POLLIN)]
    wait_until(lambda: readable(router), timeout=10, what="a message at the router")
    assert router.recv_multipart()[1] == b"one"
    # a receive cut short (the hub's budget a turn): the second is still reported
    wait_until(lambda: readable(router), timeout=10, what="the second message at the router")
    assert poller.poll(WAIT_MS) == [(router, zmq.POLLIN)]
    assert router.recv_multipart()[1] == b"two"
    assert not readable(router)
    poller.settled(router)
    assert poller.poll(0) == []


def test_descriptors_come_back_with_zeromq_flags() -> None:
    read_end, write_end = os.pipe()
    try:
        poller = Poller()
        poller.register(read_end, zmq.POLLIN)
        poller.register(write_end, zmq.POLLIN | zmq.POLLOUT)
        assert poller.poll(WAIT_MS) == [(write_end, zmq.POLLOUT)]
        os.write(write_end, b"x")
        poller.modify(write_end, zmq.POLLIN)
        assert poller.poll(WAIT_MS) == [(read_end, zmq.POLLIN)]
        os.read(read_end, 1)
        os.close(write_end)
        write_end = -1
        events = dict(poller.poll(WAIT_MS))[read_end]
        assert events & zmq.POLLERR and not events & zmq.POLLOUT  # (hung up: a read says so)
        poller.unregister(read_end)
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


def test_a_zeromq_socket_is_watched_for_reading_only(
        pair: tuple[zmq.Socket[bytes], zmq.Socket[bytes]]) -> None:
    router, _dealer = pair
    with pytest.raises(ValueError, match="POLLIN only"):
        Poller().register(router, zmq.POLLIN | zmq.POLLOUT)
