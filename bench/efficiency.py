"""Workload 4: how close units of a 10 ms sleep come to the ideal wall time on the workers."""

from __future__ import annotations

from bench import units
from bench.peers import Runtime
from bench.stats import Result, repeat
from bench.workload import Settings, SharedSession, target


def efficiency(runtime: Runtime, shared: SharedSession, settings: Settings) -> list[Result]:
    """``n`` units of a 10 ms sleep: wall time against the ideal ``n × 10 ms / workers``."""
    session = shared()
    n = settings.size(200, 200, minimum=4)
    ideal = n * units.SLEEP_S / settings.workers
    seconds = repeat(lambda: session.map_units("sleep_10ms", n), settings.reps,
                     warmup=lambda: session.map_units("sleep_10ms", 4 * settings.workers))
    extra = {"ideal_s": ideal}
    return [
        Result("10 ms units", "wall s", runtime.name, runtime.map_label_for(1), n, False, seconds,
               target=target(runtime, f"≤ {1.08 * ideal:.3g}"), workers=settings.workers,
               extra=extra),
        Result("10 ms units", "efficiency %", runtime.name, runtime.map_label_for(1), n, True,
               [100 * ideal / s for s in seconds], workers=settings.workers, extra=extra),
    ]
