"""Workloads 4c and 4d: how work spreads when units are uneven, and when two tasks compete.

- skewed units: 400 units whose durations follow a heavy-tailed distribution (lognormal, mean
  10 ms, the longest 0.27 s; ``units.SKEWED_S``, the same order every run) on the shared
  cluster, against the bound ``total / workers`` (2.0 s on 2 workers). Batching by the mean
  would put long units behind short ones on one worker while the other idles.
- two tasks sharing: a long low-priority batch (``4 × workers`` units of 0.25 s) holds every
  worker; 0.1 s later a no-op task at a higher priority is submitted: the seconds to its result.
  A runtime that lets it in at the next unit boundary answers within about 0.25 s; one that
  serves in order answers once the long batch is done (about 0.9 s). The long batch's own time
  is a row too (ideal ``n × 0.25 s / workers``, plus at most one unit given up to the short one).
"""

from __future__ import annotations

from bench import units
from bench.peers import Runtime
from bench.stats import Result, repeat
from bench.workload import Settings, SharedSession, target

SKEWED = "skewed units"
SHARING = "two tasks sharing"


def skewed_units(runtime: Runtime, shared: SharedSession, settings: Settings) -> list[Result]:
    session = shared()
    n = settings.size(len(units.SKEWED_S), len(units.SKEWED_S), minimum=4)
    durations = [units.SKEWED_S[i % len(units.SKEWED_S)] for i in range(n)]
    bound = sum(durations) / settings.workers
    seconds = repeat(lambda: session.map_units("sleep_skewed", n), settings.reps,
                     warmup=lambda: session.map_units("sleep_10ms", 4 * settings.workers))
    extra = {"bound_s": bound, "longest_s": max(durations)}
    return [
        Result(SKEWED, "wall s", runtime.name, runtime.map_label_for(1), n, False, seconds,
               target=target(runtime, f"≤ {1.1 * bound:.3g}"), workers=settings.workers,
               extra=extra),
        Result(SKEWED, "× bound", runtime.name, runtime.map_label_for(1), n, False,
               [s / bound for s in seconds], workers=settings.workers, extra=extra),
    ]


def two_tasks(runtime: Runtime, shared: SharedSession, settings: Settings) -> list[Result]:
    """The short task's wait means little alone: a runtime that leaves a worker idle under the long
    batch answers at once, and takes twice as long over the batch. Both are rows."""
    session = shared()
    n = settings.size(4 * settings.workers, 4 * settings.workers, minimum=settings.workers)
    session.short_behind_long(n)  # untimed, like every warm-up
    # What is timed is inside: from each submission to its result.
    timed = [session.short_behind_long(n) for _ in range(settings.reps)]
    ideal = n * units.LONG_S / settings.workers
    return [
        Result(SHARING, "short task's result s", runtime.name, "", n, False,
               [short for short, _ in timed], target=target(runtime, f"≤ {units.LONG_S + 0.05:.3g}"),
               workers=settings.workers),
        Result(SHARING, "long batch s", runtime.name, "", n, False, [long for _, long in timed],
               target=target(runtime, f"≤ {1.1 * ideal + units.LONG_S:.3g}"),
               workers=settings.workers, extra={"ideal_s": ideal}),
    ]
