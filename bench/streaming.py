"""Workload 5: a slicer that yields a million units; the master's memory must stay flat.

Each repetition starts a fresh cluster, runs ``small`` units (10,000) and then ``large`` units
(1,000,000; quick: 100,000) of a no-op, and reads the master's resident-set high-water mark
(``VmHWM``) after each: flat means the large run needed no more memory than the small one.

Only a runtime with a lazy unit source runs it: pydra-actors (the slicer streams units with a
bounded look-ahead) and the process pool (``executor.map`` over a generator; its parent is the
"master", whose peak is reset before the small run). Dask and Ray schedule one future per unit,
kept by the client: a million of them is a different workload, and hours at their rates.
"""

from __future__ import annotations

from typing import Any

from bench.peers import Runtime
from bench.stats import Result, skipped, timed
from bench.system import peak_rss_mib, reset_peak_rss
from bench.workload import Settings, SharedSession, target

WORKLOAD = "streaming"
POOL_CHUNKSIZE = 100
RATE, GROWTH = "units/s", "master peak growth MiB, small → large"
PEAK_SMALL, PEAK_LARGE = "master peak MiB after small", "master peak MiB after large"
METRICS = (RATE, GROWTH, PEAK_SMALL, PEAK_LARGE)


def streaming(runtime: Runtime, _shared: SharedSession, settings: Settings) -> list[Result]:
    if runtime.key not in ("actors", "pool"):
        return [skipped(WORKLOAD, metric, runtime.name, "", "no lazy unit source: one future per "
                        "unit held by the client", higher_is_better=metric == RATE,
                        workers=settings.workers) for metric in METRICS[:2]]
    small = settings.size(10_000, 10_000, minimum=100)
    large = settings.size(100_000, 1_000_000, minimum=1_000)
    chunksize = POOL_CHUNKSIZE if runtime.key == "pool" else 1
    rates, peaks_small, peaks_large = [], [], []
    for _ in range(settings.reps):
        with runtime.open(settings.workers, own_memory=True) as session:
            pid = session.master_pid
            assert pid is not None
            if runtime.key == "pool" and not reset_peak_rss(pid):
                return [skipped(WORKLOAD, metric, runtime.name, "", "cannot reset VmHWM here",
                                higher_is_better=metric == RATE, workers=settings.workers)
                        for metric in METRICS[:2]]
            session.map_units("noop", small, chunksize)
            peaks_small.append(peak_rss_mib(pid))
            rates.append(large / timed(lambda: session.map_units("noop", large, chunksize)))
            peaks_large.append(peak_rss_mib(pid))
    growth = [b - a for a, b in zip(peaks_small, peaks_large, strict=True)]

    def row(metric: str, values: list[float], **more: Any) -> Result:
        return Result(WORKLOAD, metric, runtime.name, runtime.map_label_for(chunksize), large,
                      metric == RATE, values, workers=settings.workers, **more)

    rows = [row(RATE, rates),
            row(GROWTH, growth, target=target(runtime, "≤ 5"), extra={"small_units": small})]
    if runtime.key == "actors":  # the pool's "master" is the bench process: its size is ours
        rows += [row(PEAK_SMALL, peaks_small, extra={"small_units": small}),
                 row(PEAK_LARGE, peaks_large)]
    return rows
