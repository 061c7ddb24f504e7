"""Fixtures of the several-hosts suite: a switch and hosts in network namespaces."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.multihost import netns


@pytest.fixture
def net() -> Iterator[netns.Net]:
    why = netns.usable()
    if why is not None:
        pytest.skip(why)
    netns.remove_stale()
    network = netns.Net()
    try:
        yield network
    finally:
        network.close()
