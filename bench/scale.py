"""Workload 7 (``--scale``): throughput and efficiency as the worker count grows.

For each worker count (``--scale-workers``, default 2, 4, 8, 16 up to this machine's cores) a
fresh cluster runs tiny no-op units and units of 10 ms of CPU time (100 per worker, so the ideal
wall time is 1 s at every size). pydra-actors runs as a master with ``--workers 0`` and nodes of
``--workers-per-node`` workers each, the way several hosts would run it. Only a machine with at
least as many cores as workers says anything about scaling; on fewer, the CPU-bound units simply
queue for the cores.
"""

from __future__ import annotations

from functools import partial

from bench import units
from bench.peers import Runtime
from bench.stats import Result, rate, repeat
from bench.throughput import tiny_unit_count
from bench.workload import Settings, SharedSession

WORKLOAD_TINY = "scale: tiny units"
WORKLOAD_CPU = "scale: 10 ms CPU units"
DEFAULT_WORKER_COUNTS = (2, 4, 8, 16)
CHUNKSIZE = 1  # the pool's unit of scheduling is a unit, as everyone else's


def scale(runtime: Runtime, _shared: SharedSession, settings: Settings) -> list[Result]:
    rows = []
    for workers in settings.scale_workers:
        per_node = settings.workers_per_node if runtime.key == "actors" else None
        with runtime.open(workers, workers_per_node=per_node) as session:
            label = runtime.map_label_for(CHUNKSIZE)
            if per_node is not None:
                label += f", nodes of {per_node}"
            tiny = tiny_unit_count(runtime, settings, CHUNKSIZE)
            seconds = repeat(partial(session.map_units, "noop", tiny), settings.reps,
                             warmup=partial(session.map_units, "noop", min(tiny, 1_000)))
            rows.append(Result(WORKLOAD_TINY, "units/s", runtime.name, label, tiny, True,
                               rate(tiny, seconds), workers=workers))
            busy = settings.size(100, 100, minimum=2) * workers
            ideal = busy * units.BUSY_S / workers
            seconds = repeat(partial(session.map_units, "busy_10ms", busy), settings.reps,
                             warmup=partial(session.map_units, "busy_10ms", 2 * workers))
            rows.append(Result(WORKLOAD_CPU, "units/s", runtime.name, label, busy, True,
                               rate(busy, seconds), workers=workers))
            rows.append(Result(WORKLOAD_CPU, "efficiency %", runtime.name, label, busy, True,
                               [100 * ideal / s for s in seconds], workers=workers,
                               extra={"ideal_s": ideal}))
    return rows
