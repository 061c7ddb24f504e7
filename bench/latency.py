"""Workload 3: the round trip of one no-op task, submitted and waited for, one after another."""

from __future__ import annotations

from bench.peers import Runtime
from bench.stats import Result, percentile, timed
from bench.workload import Settings, SharedSession, target


def latency(runtime: Runtime, shared: SharedSession, settings: Settings) -> list[Result]:
    """``n`` sequential submit → result of a no-op task per repetition; p50 and p90 of each."""
    session = shared()
    n = settings.size(200, 200, minimum=5)
    for _ in range(max(1, n // 10)):  # warm-up
        session.roundtrip()
    p50, p90 = [], []
    for _ in range(settings.reps):
        samples_ms = [timed(session.roundtrip) * 1e3 for _ in range(n)]
        p50.append(percentile(samples_ms, 50))
        p90.append(percentile(samples_ms, 90))
    return [
        Result("latency", "p50 ms", runtime.name, "submit → result", n, False, p50,
               target=target(runtime, "≤ 1.0"), workers=settings.workers),
        Result("latency", "p90 ms", runtime.name, "submit → result", n, False, p90,
               workers=settings.workers),
    ]
