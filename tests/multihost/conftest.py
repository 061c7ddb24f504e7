"""Fixtures of the several-hosts suite: a switch and hosts in network namespaces."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NoReturn

import pytest

from tests.multihost import netns


def cannot_run(why: str) -> NoReturn:
    """Skip where this machine cannot make hosts (not root, no iproute2); fail where the run
    said it can (CI sets ACTORS_TEST_HOSTS=1 once it installed what the suite needs)."""
    if os.environ.get("ACTORS_TEST_HOSTS") == "1":
        pytest.fail(f"the several-hosts suite cannot run here: {why}")
    pytest.skip(why)


@pytest.fixture
def net() -> Iterator[netns.Net]:
    why = netns.usable()
    if why is not None:
        cannot_run(why)
    netns.remove_stale()
    network = netns.Net()
    try:
        yield network
    finally:
        network.close()
