"""``python -m bench.drain``: does the master give its memory back after a backlog drains?

Issue 23's last target: a long-lived master on a shared machine returns to within 1.5x of its
idle size once a burst of work is done. A ``LocalCluster`` of 2 workers runs one no-op task to
warm up; the master's RSS then is its idle size. ``--tasks`` no-op Tasks (default 100,000) are
submitted at once and every result fetched, the futures dropped; the master's RSS is then
polled once a second until it holds still (4 readings within 0.5 MiB, at most
``SETTLE_S``). Reported: idle, peak (VmHWM) and settled RSS, the settled-over-idle ratio
against its target, and the seconds the drain took. Repeat with ``--rounds``: each round
should settle about where the first did (a high-water mark, not a leak).

What stays after a drain by design: the last ``FINISHED_KEPT`` (10,000) finished tasks with
their stories and the dashboard's last runs; the master moves them into fresh memory once it
has been quiet for ``REPACK_IDLE_S`` (``Master._repack``), then gives back the pages of the
allocator's free pools (``actors/free_pools.py``).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from typing import Any

from actors import Client, LocalCluster
from bench.system import peak_rss_mib, reset_peak_rss, rss_mib
from bench.units import NoopTask

TARGET = 1.5  # settled RSS over idle RSS (issue 23)
SETTLE_S = 60.0
STILL_MIB = 0.5
STILL_READINGS = 4
RESULT_TIMEOUT_S = 300.0


def settled_rss(pid: int, limit_s: float = SETTLE_S) -> float:
    """The master's RSS once it holds still (``STILL_READINGS`` a second apart), or at the
    end of ``limit_s``."""
    last, still = rss_mib(pid), 0
    deadline = time.monotonic() + limit_s
    while still < STILL_READINGS and time.monotonic() < deadline:
        time.sleep(1.0)
        now = rss_mib(pid)
        still = still + 1 if abs(now - last) < STILL_MIB else 0
        last = now
    return last


def drain_round(client: Client, pid: int, tasks: int) -> dict[str, float]:
    reset_peak_rss(pid)
    started = time.perf_counter()
    futures = [client.submit(NoopTask, i) for i in range(tasks)]
    for i, future in enumerate(futures):
        if future.result(timeout=RESULT_TIMEOUT_S) != i:
            raise AssertionError(f"task {i} returned {future.result()!r}")
    drained = time.perf_counter() - started
    del futures
    gc.collect()
    settled = settled_rss(pid)
    return {"drain_s": round(drained, 2), "peak_mib": round(peak_rss_mib(pid), 1),
            "settled_mib": round(settled, 1)}


def main(argv: list[str] | None = None, out: Any = sys.stdout) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m bench.drain",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=100_000, help="tasks per round")
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    # fork=False: the master reads as its own memory only, no page shared with this process
    with LocalCluster(workers=2, fork=False) as cluster, Client(cluster) as client:
        client.wait_for_workers(2)
        client.submit(NoopTask, 0).result(timeout=60)
        pid = cluster.pid
        idle = round(settled_rss(pid, 10.0), 1)  # as reported: the ratio is of what is shown
        rounds = []
        for n in range(args.rounds):
            result = drain_round(client, pid, args.tasks)
            result["ratio"] = round(result["settled_mib"] / idle, 2)
            rounds.append(result)
            print(f"round {n + 1}: {args.tasks:,} tasks drained in {result['drain_s']} s; "
                  f"master idle {idle:.1f} MiB, peak {result['peak_mib']} MiB, settled "
                  f"{result['settled_mib']} MiB = {result['ratio']}x idle (target <= {TARGET}x: "
                  f"{'met' if result['ratio'] <= TARGET else 'MISSED'})", file=out)
    return {"tasks": args.tasks, "idle_mib": round(idle, 1), "rounds": rounds, "target": TARGET}


if __name__ == "__main__":
    main()
