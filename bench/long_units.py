"""Workload 4b: a few long units, against the ideal ``ceil(n / workers) × t``.

Twelve units of a 0.25 s sleep on three workers: the units are too few to even out by numbers,
so any unit that waits behind another on a busy worker while a peer idles shows as a whole
extra round (issue 13: 8 units on one worker, 2 on another, none on the third, 2× the ideal).
The workload starts its own cluster of ``WORKERS`` (whatever ``--workers`` says), with every
worker up before the clock starts; one untimed run of the same size first.
"""

from __future__ import annotations

import math

from bench import units
from bench.peers import Runtime
from bench.stats import Result, repeat
from bench.workload import Settings, SharedSession, target

WORKLOAD = "few long units"
WORKERS = 3


def long_units(runtime: Runtime, _shared: SharedSession, settings: Settings) -> list[Result]:
    n = settings.size(4 * WORKERS, 8 * WORKERS, minimum=WORKERS)
    ideal = math.ceil(n / WORKERS) * units.LONG_S
    with runtime.open(WORKERS) as session:
        seconds = repeat(lambda: session.map_units("sleep_250ms", n), settings.reps,
                         warmup=lambda: session.map_units("sleep_250ms", n))
    extra = {"ideal_s": ideal}
    return [
        Result(WORKLOAD, "wall s", runtime.name, runtime.map_label_for(1), n, False, seconds,
               target=target(runtime, f"≤ {1.1 * ideal:.3g}"), workers=WORKERS, extra=extra),
        Result(WORKLOAD, "× ideal", runtime.name, runtime.map_label_for(1), n, False,
               [s / ideal for s in seconds], workers=WORKERS, extra=extra),
    ]
