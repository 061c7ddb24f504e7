"""Clients share the cluster: one client's burst does not hold another's tasks until it has
drained (issue 23; the order itself is tested on the core in test_scheduler_state.py).

Real processes on loopback: a local cluster of two workers, two clients of one key. The tasks
write down the order they end in (one line each, appended), never a time.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from actors import Client, LocalCluster, Task, free_pools
from tests.conftest import descendants, kill_all, log_events, start_master, wait_until

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


class Echo(Task):
    def work(self, x):
        return x


def test_after_a_backlog_drains_the_master_repacks_its_memory_and_keeps_every_story(
        tmp_path: Path) -> None:
    """Issue 23: once a backlog is done (here 12,500 tasks: the last 10,000 kept for their
    stories, the rest forgotten) and the master has been quiet a moment, it moves what it keeps
    into fresh memory and gives back the pages of the allocator's free pools
    (``memory_repacked``). Nothing a client can ask for changes: each kept
    story is as it was, and the master serves on."""
    n = 12_500
    keys = tmp_path / "keys"
    master, address = start_master(tmp_path, "--workers", "2", "--keys", str(keys))
    pids: set[int] = set()

    def logged(event: str) -> list[dict[str, Any]]:
        return [e for e in log_events(tmp_path / "master.log") if e["event"] == event]

    def repacked() -> list[dict[str, Any]]:
        return logged("memory_repacked")

    def compactions() -> list[dict[str, Any]]:
        return [e for e in log_events(tmp_path / "master.log")
                if e["event"] in ("memory_given_back", "memory_repacked")]

    try:
        with Client(address, keys=keys) as client:
            client.wait_for_workers(2)
            pids = descendants(master.pid)
            futures = [client.submit(Echo, i) for i in range(n)]
            assert [f.result(timeout=120) for f in futures] == list(range(n))
            # (well inside the last 10,000 to finish: tasks end a little out of order)
            sample = [futures[i] for i in (n - 9_000, n // 2, n - 1)]
            stories = [client.story(f) for f in sample]
            assert all(any(e[2] == "done" for e in story) for story in stories)
            events = wait_until(repacked, 60, "the master to repack after the drain")
            assert events[0]["tasks"] == 10_000
            # and the free pools that survivors kept resident go back (where pymalloc is used)
            assert events[0]["free_pools_mb"] > 0 or not free_pools.available()
            again = [client.story(f) for f in sample]
            # (times are the master's monotonic clock turned into wall time at each asking)
            assert [[e[:4] for e in story] for story in again] == [
                [e[:4] for e in story] for story in stories]
            assert all(abs(a[4] - b[4]) < 0.01 for x, y in zip(again, stories, strict=True)
                       for a, b in zip(x, y, strict=True))
            assert client.submit(Echo, "after").result(timeout=30) == "after"
            # The client lets its futures go only now: the tables that named them are rebuilt
            # (however long after the burst, a 10^5-future table would stay 3.7 MB otherwise)
            # held: the 10,000 kept finished tasks, "after", and the futures clients hold
            before = len(compactions())
            assert all(e["held"] > 10_001 for e in compactions())
            del futures, sample
            gc.collect()
            # (a compaction of its own, or the repack's: the client's tick may split the
            # release in two, the second part below the threshold of a compaction of its own)
            wait_until(lambda: [e for e in compactions()[before:] if e["held"] <= 10_001], 60,
                       "the master to compact after the futures went")
    finally:
        kill_all(pids | {master.pid})
        master.wait(10)
