"""Workload 8 (``data``): the data plane, large results (issue 24).

Four rows, each on a fresh cluster of its own (so that the master's idle size is its size
before any large result):

- task results: ``n`` independent tasks (20; quick: 8), each returning 20 MB of ``bytes``,
  every result fetched by the client and checked (``units.blob_index``: type, size, both index
  tags, the fill): MB/s to the client;
- units reduced on a worker: one batch of ``n`` units (400; quick: 100) of 1 MB each, reduced
  where the runtime reduces to a small digest (count, bytes, sum of indexes), which is checked:
  MB/s produced and reduced. The process pool has no worker-side reduce: its results come to
  the parent, which reduces them as they arrive;
- NumPy task results: as the first row with 100 MB ``int64`` arrays (4; quick: 2), where NumPy
  is importable (else a ``skipped`` row);
- a tree reduction across 2 nodes (``tree``): 8 leaves of 12.5 MB (quick: 4), pairwise, inner
  nodes as large as their inputs; not run on the pool (no worker-to-worker data).

``--size-scale`` scales the sizes of the results as well as their counts (the smoke test's 0.01
makes them 200 KB, 10 KB, 1 MB and 125 KB). For pydra-actors each row also reports the master's peak
RSS (``VmHWM``, reset with ``clear_refs`` before each repetition) and that peak less the master's
RSS when idle (measured once, after a small warm-up that ships the code and warms the workers,
before any large result): issue 24's target is a growth within 50 MB whatever the data size, and
MB/s at least Dask's (``≥ dask``, resolved against Dask's median of the same run). Dask's
scheduler and the pool's parent are the bench process itself, which also holds the client's
copies: their peaks say nothing about a master, and are not reported.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from typing import Any

from bench.peers import Runtime, Session
from bench.stats import Result, skipped, timed
from bench.system import peak_rss_mib, reset_peak_rss, rss_mib
from bench.workload import Settings, SharedSession, target

MB = 1_000_000
TASKS, UNITS = "data: task results", "data: units reduced on a worker"
ARRAYS, TREE = "data: NumPy task results", "data: tree reduction, 2 nodes"
RATE = "MB/s"
PEAK, GROWTH = "master peak MiB", "master peak over idle MiB"
GROWTH_TARGET = "≤ 50"  # issue 24: within 50 MB of idle, whatever the data size
RATE_TARGET = "≥ dask"  # issue 24: at least Dask's MB/s (resolved by report.resolve_targets)
#: Size of each result in the untimed warm-up that ships the code and warms every worker.
WARMUP_BYTES = 1_024

TASK_LABELS = {"actors": "client.map(Task)", "dask": "submit + gather", "ray": ".remote() + get",
               "pool": "executor.submit"}
UNIT_LABELS = {"actors": "ParallelTask", "dask": "map + submit(reduce)",
               "ray": ".remote() + remote reduce", "pool": "map, parent reduces"}
TREE_LABELS = {"actors": "Unit(after=)", "dask": "map + submit tree", "ray": ".remote() tree"}
NODES = 2  # the tree reduction's pydra-actors cluster: workers split over this many nodes


def _mb(nbytes: int) -> str:
    return f"{nbytes / MB:g} MB"


def data(runtime: Runtime, _shared: SharedSession, settings: Settings) -> list[Result]:
    tasks = settings.size(8, 20, minimum=2)
    task_bytes = settings.size(20 * MB, 20 * MB, minimum=WARMUP_BYTES)
    units = settings.size(100, 400, minimum=4)
    unit_bytes = settings.size(MB, MB, minimum=WARMUP_BYTES)
    arrays = settings.size(2, 4, minimum=1)
    array_bytes = settings.size(100 * MB, 100 * MB, minimum=WARMUP_BYTES) // 8 * 8  # int64s
    task_label, unit_label = TASK_LABELS[runtime.key], UNIT_LABELS[runtime.key]
    rows = _measure(runtime, settings, TASKS, f"{task_label}, {_mb(task_bytes)}", tasks,
                    task_bytes, lambda s, n, b: s.fetch_blobs(n, b))
    rows += _measure(runtime, settings, UNITS, f"{unit_label}, {_mb(unit_bytes)} units", units,
                     unit_bytes, lambda s, n, b: s.reduce_blobs(n, b))
    if importlib.util.find_spec("numpy") is None:
        rows.append(skipped(ARRAYS, RATE, runtime.name, "", "skipped: NumPy is not installed",
                            workers=settings.workers))
    else:
        rows += _measure(runtime, settings, ARRAYS, f"{task_label}, {_mb(array_bytes)}", arrays,
                         array_bytes, lambda s, n, b: s.fetch_blobs(n, b, kind="numpy"))
    rows += tree(runtime, settings)
    return rows


def tree(runtime: Runtime, settings: Settings) -> list[Result]:
    """A tree reduction over leaves of 12.5 MB (8, 100 MB; quick: 4), pairwise, every inner
    node as large as its inputs; pydra-actors on nodes of their own (``MultiNodeCluster``), so
    that results cross from node to node, the peers on their usual cluster."""
    if runtime.key not in TREE_LABELS:
        return [skipped(TREE, RATE, runtime.name, "", "no worker-to-worker data: every result "
                        "goes through the parent", workers=settings.workers)]
    leaves = settings.size(4, 8, minimum=2)
    leaf_bytes = settings.size(12_500_000, 12_500_000, minimum=WARMUP_BYTES)
    per_node = -(-settings.workers // NODES) if runtime.key == "actors" else None
    label = TREE_LABELS[runtime.key] + (f", {NODES} nodes" if per_node else "")
    return _measure(runtime, settings, TREE, f"{label}, {_mb(leaf_bytes)}", leaves,
                    leaf_bytes, lambda s, n, b: s.tree_blobs(n, b), workers_per_node=per_node)


def _measure(runtime: Runtime, settings: Settings, workload: str, variant: str, n: int,
             nbytes: int, call: Callable[[Session, int, int], None],
             workers_per_node: int | None = None) -> list[Result]:
    """MB/s of ``call(session, n, nbytes)`` over ``settings.reps`` repetitions on a fresh
    session, and for pydra-actors the master's peak in each, and that peak over its idle RSS."""
    with runtime.open(settings.workers, workers_per_node=workers_per_node,
                      own_memory=True) as session:
        pid = session.master_pid if runtime.key == "actors" else None
        call(session, 2 * settings.workers, WARMUP_BYTES)  # code shipped, every worker warm
        idle = rss_mib(pid) if pid is not None else math.nan
        call(session, min(n, settings.workers), nbytes)  # untimed, at full size
        rates: list[float] = []
        peaks: list[float] = []
        reset = True
        for _ in range(settings.reps):
            if pid is not None:
                reset = reset_peak_rss(pid) and reset
            rates.append(n * nbytes / MB / timed(lambda: call(session, n, nbytes)))
            if pid is not None:
                peaks.append(peak_rss_mib(pid))
    extra: dict[str, Any] = {"bytes_each": nbytes, "mb_per_rep": n * nbytes / MB}

    def row(metric: str, values: list[float], higher: bool, **more: Any) -> Result:
        return Result(workload, metric, runtime.name, variant, n, higher, values,
                      workers=settings.workers, extra=extra, **more)

    rows = [row(RATE, rates, True, target=target(runtime, RATE_TARGET))]
    if pid is not None:
        # Without clear_refs, VmHWM is the peak since the master started: an upper bound.
        extra.update(idle_mib=round(idle, 1), peak_reset_each_rep=reset)
        rows += [row(PEAK, peaks, False),
                 row(GROWTH, [p - idle for p in peaks], False, target=GROWTH_TARGET)]
    return rows
