"""Workload 2d: task graphs built from futures passed as arguments (issue 17).

A chain of dependent tiny tasks (each takes the one before's future: one scheduling round trip
per task, nothing runs side by side) and a fan-in (many tiny tasks, then one that takes all
their futures). Dask and Ray take futures as arguments natively; the process pool has no such
thing, so its results come back to the parent to be passed on (the baseline a user without
futures-as-arguments writes).
"""

from __future__ import annotations

from bench.peers import Runtime
from bench.stats import Result, rate, repeat
from bench.workload import Settings, SharedSession, target

WORKLOAD = "task graphs"


def graphs(runtime: Runtime, shared: SharedSession, settings: Settings) -> list[Result]:
    session = shared()
    n = settings.size(300, 1_000, minimum=4)
    session.submit_each(max(4 * settings.workers, 20))  # every worker warm, as in row 2
    chain = repeat(lambda: session.chain(n), settings.reps, warmup=lambda: session.chain(10))
    fan_in = repeat(lambda: session.fan_in(n), settings.reps, warmup=lambda: session.fan_in(10))
    label = runtime.submit_label
    return [
        Result(WORKLOAD, "chain, tasks/s", runtime.name, label, n, True, rate(n, chain),
               target=target(runtime, "≥ dask, ray"), workers=settings.workers),
        Result(WORKLOAD, "fan-in, tasks/s", runtime.name, label, n + 1, True,
               rate(n + 1, fan_in), target=target(runtime, "≥ dask, ray"),
               workers=settings.workers),
    ]
