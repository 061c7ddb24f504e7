"""Workload 6: from nothing to the first result of a no-op task, and closing down again.

Each repetition starts a fresh cluster and client (the runtime's modules are already imported:
that is the bench's cost, not the cluster's), submits one task without first waiting for
workers, takes its result, and closes everything. One untimed start comes first, so that every
runtime finds its files in the page cache.
"""

from __future__ import annotations

import time

from bench.peers import Runtime
from bench.stats import Result
from bench.workload import Settings, SharedSession, target

WORKLOAD = "start and close"


def startup(runtime: Runtime, _shared: SharedSession, settings: Settings) -> list[Result]:
    first_result, close = [], []
    for rep in range(settings.reps + 1):
        start = time.perf_counter()
        session = runtime.open(settings.workers, wait=False)
        try:
            session.roundtrip()
            started = time.perf_counter()
        finally:
            session.close()
        closed = time.perf_counter()
        if rep > 0:
            first_result.append(started - start)
            close.append(closed - started)
    def row(metric: str, values: list[float], goal: str = "") -> Result:
        return Result(WORKLOAD, metric, runtime.name, "", 1, False, values,
                      workers=settings.workers, target=target(runtime, goal) if goal else "")

    return [row("start → first result s", first_result, "≤ 0.5"), row("close s", close)]
