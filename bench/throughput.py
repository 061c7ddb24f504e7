"""Workloads 1 and 2: throughput of tiny work units and of many small independent tasks."""

from __future__ import annotations

import tempfile
from functools import partial

from bench.peers import ActorsRuntime, Runtime
from bench.stats import Result, rate, repeat, skipped
from bench.workload import Settings, SharedSession, target

#: Chunk sizes the process pool's ``executor.map`` is run with (other runtimes have no such knob).
POOL_CHUNKSIZES = (1, 100)


def tiny_unit_count(runtime: Runtime, settings: Settings, chunksize: int) -> int:
    """10,000 units (full: 100,000); a runtime that schedules one task per unit runs at most
    2,000 (full: 10,000) so a run stays minutes, not hours. Rates are per unit either way."""
    n = settings.size(10_000, 100_000, minimum=20)
    if runtime.task_per_unit and chunksize == 1:
        n = min(n, settings.size(2_000, 10_000, minimum=20))
    return n


def tiny_units(runtime: Runtime, shared: SharedSession, settings: Settings) -> list[Result]:
    session = shared()
    chunksizes = POOL_CHUNKSIZES if runtime.key == "pool" else (1,)
    rows = []
    for chunksize in chunksizes:
        n = tiny_unit_count(runtime, settings, chunksize)
        seconds = repeat(partial(session.map_units, "noop", n, chunksize), settings.reps,
                         warmup=partial(session.map_units, "noop", min(n, 1_000), chunksize))
        rows.append(Result("tiny units", "units/s", runtime.name, runtime.map_label_for(chunksize),
                           n, True, rate(n, seconds), target=target(runtime, "≥ 20000"),
                           workers=settings.workers))
    return rows


def many_tasks(runtime: Runtime, shared: SharedSession, settings: Settings) -> list[Result]:
    session = shared()
    n = settings.size(2_000, 2_000, minimum=4)
    # The warm-up leaves every worker warm for this client, as a notebook session would.
    seconds = repeat(lambda: session.submit_each(n), settings.reps,
                     warmup=lambda: session.submit_each(max(4 * settings.workers, n // 10)))
    return [Result("many small tasks", "tasks/s", runtime.name, runtime.submit_label, n, True,
                   rate(n, seconds), target=target(runtime, "≥ 5000"), workers=settings.workers)]


def batched_tasks(runtime: Runtime, shared: SharedSession, settings: Settings) -> list[Result]:
    """Row 2's tasks as one batch where the runtime has one (``client.map_batch``: the items
    as the work units of one task, a future each); a runtime without one submits each, as in
    row 2, so that the ratio is against the process pool's ``submit``."""
    session = shared()
    n = settings.size(2_000, 20_000, minimum=4)
    seconds = repeat(lambda: session.submit_batch(n), settings.reps,
                     warmup=lambda: session.submit_batch(max(4 * settings.workers, n // 10)))
    return [Result("many small tasks, one batch", "tasks/s", runtime.name,
                   runtime.batch_label or runtime.submit_label, n, True, rate(n, seconds),
                   workers=settings.workers)]


#: (metric, every): the share of tasks that raise, as ``noop_or_raise`` counts it.
RAISING_ROWS = (("tasks/s, none raise", 0), ("tasks/s, 10 % raise", 10),
                ("tasks/s, all raise", 1), ("tasks/s, none raise, right after", 0))


def raising_tasks(runtime: Runtime, shared: SharedSession, settings: Settings) -> list[Result]:
    """Many small tasks of which none, a tenth, then all raise ValueError; then none again at
    once, to see whether raising leaves the cluster slower for what follows."""
    session = shared()
    n = settings.size(1_000, 2_000, minimum=10)
    session.submit_each(max(4 * settings.workers, n // 10))  # every worker warm, as in row 2
    rows = []
    for metric, every in RAISING_ROWS:
        seconds = repeat(partial(session.submit_raising, n, every), settings.reps)
        rows.append(Result("tasks that raise", metric, runtime.name, runtime.submit_label, n,
                           True, rate(n, seconds), workers=settings.workers))
    return rows


def durable_tasks(runtime: Runtime, shared: SharedSession, settings: Settings) -> list[Result]:
    """Row 2 again on a master that keeps a journal in a state directory (every submission
    committed, with fsync, before it is acknowledged), against the shared cluster (a temporary
    journal, never synced), alternating in the same run: what surviving a restart costs."""
    if not isinstance(runtime, ActorsRuntime):
        return [skipped("many small tasks, journal", "tasks/s, state dir (fsync)", runtime.name,
                        runtime.submit_label, "no master journal to compare",
                        workers=settings.workers)]
    plain = shared()
    n = settings.size(2_000, 2_000, minimum=4)
    warm = max(4 * settings.workers, n // 10)
    with tempfile.TemporaryDirectory(prefix="bench-state-") as state, \
            runtime.open_durable(settings.workers, state) as durable:
        durable.submit_each(warm)
        plain.submit_each(warm)
        runs: dict[str, list[float]] = {"plain": [], "durable": []}
        for _ in range(settings.reps):  # alternating: the machine's drift hits both alike
            runs["plain"] += repeat(lambda: plain.submit_each(n), 1)
            runs["durable"] += repeat(lambda: durable.submit_each(n), 1)
    rates = {key: rate(n, seconds) for key, seconds in runs.items()}
    rows = [Result("many small tasks, journal", metric, runtime.name, runtime.submit_label, n,
                   True, rates[key], workers=settings.workers)
            for key, metric in (("plain", "tasks/s, no state dir"),
                                ("durable", "tasks/s, state dir (fsync)"))]
    ratios = [d / p for d, p in zip(rates["durable"], rates["plain"], strict=True)]
    rows.append(Result("many small tasks, journal", "state dir / none, same rep", runtime.name,
                       runtime.submit_label, n, True, ratios, workers=settings.workers,
                       target="≥ 0.8"))
    return rows
