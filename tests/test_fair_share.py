"""Clients share the cluster: one client's burst does not hold another's tasks until it has
drained (issue 23; the order itself is tested on the core in test_scheduler_state.py).

Real processes on loopback: a local cluster of two workers, two clients of one key. The tasks
write down the order they end in (one line each, appended), never a time.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

from actors import Client, LocalCluster, Task
from tests.conftest import wait_until

pytestmark = pytest.mark.processes


class Nap(Task):
    """Naps 2 ms, then writes its client's name as one line of ``ends`` (O_APPEND: whole)."""

    def work(self, ends, who):
        time.sleep(0.002)
        with open(ends, "a") as out:
            out.write(f"{who}\n")
        return who


def test_a_client_that_submits_after_a_burst_is_not_served_after_all_of_it() -> None:
    # Where a worker of a uid of its own may write too.
    folder = tempfile.mkdtemp(prefix="fair-", dir="/tmp")
    os.chmod(folder, 0o777)
    ends = os.path.join(folder, "ends")
    try:
        with LocalCluster(workers=2) as cl, Client(cl) as busy, Client(cl) as other:
            busy.wait_for_workers(2)
            burst = [busy.submit(Nap, ends, "busy") for _ in range(1_000)]
            # The whole burst is at the master (acknowledged) before the other client submits.
            wait_until(lambda: not busy._unaccepted, 60, "the burst to be acknowledged")
            late = [other.submit(Nap, ends, "other") for _ in range(10)]
            assert {f.result(timeout=120) for f in late} == {"other"}
            assert {f.result(timeout=120) for f in burst} == {"busy"}
        with open(ends) as lines:
            order = lines.read().split()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    assert len(order) == 1_010
    positions = [n for n, who in enumerate(order) if who == "other"]
    # First come, first served would put them last (1,000 to 1,009): in turn, they end among
    # the first of what was still queued when they came.
    assert max(positions) < 600, positions
