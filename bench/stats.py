"""Timing and statistics shared by every workload, and the record of one measured row."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

#: Seconds any single wait on a runtime may take before the bench gives up on it.
CALL_TIMEOUT_S = 600.0
#: The metric of a row that stands for a whole workload that did not run on a runtime.
NOT_RUN = "-"


@dataclass
class Result:
    """One row of the table: a metric of a workload on one runtime, measured ``len(values)`` times."""

    workload: str
    metric: str  # what the numbers are, e.g. "units/s", "p50 ms"
    runtime: str  # "pydra-actors", "dask", "ray", "process pool"
    variant: str  # how the runtime was driven, e.g. "ParallelTask", "client.map", "chunksize 100"
    n: int  # units or tasks per repetition
    higher_is_better: bool
    values: list[float] = field(default_factory=list)
    workers: int = 0
    skipped: str = ""  # why there are no values (runtime not installed, not comparable...)
    # "≥ 20000" / "≤ 1.0", pydra-actors rows only; "≥ dask": at least that runtime's median
    # in the same run (``report.resolve_targets`` writes the number in, "≥ 612.3 (dask)").
    target: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def low(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def high(self) -> float:
        return max(self.values) if self.values else math.nan

    def target_met(self) -> bool | None:
        if not self.target or not self.values:
            return None
        op, _, number = self.target.partition(" ")
        try:
            bound = float(number.split()[0])
        except (IndexError, ValueError):  # a peer's median the run did not measure
            return None
        return self.median >= bound if op == "≥" else self.median <= bound

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(median=self.median, min=self.low, max=self.high, target_met=self.target_met())
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


def skipped(workload: str, metric: str, runtime: str, variant: str, reason: str, *,
            higher_is_better: bool = True, workers: int = 0) -> Result:
    return Result(workload, metric, runtime, variant, 0, higher_is_better, skipped=reason,
                  workers=workers)


def timed(call: Callable[[], object]) -> float:
    """Seconds ``call`` took on the monotonic high-resolution clock."""
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def repeat(call: Callable[[], object], reps: int, *, warmup: Callable[[], object] | None = None
           ) -> list[float]:
    """Run ``warmup`` once (untimed), then time ``call`` ``reps`` times."""
    if warmup is not None:
        warmup()
    return [timed(call) for _ in range(reps)]


def rate(count: int, seconds_list: list[float]) -> list[float]:
    """Per-repetition throughput: ``count`` things done in each of these wall times."""
    return [count / s for s in seconds_list]


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of a non-empty sample."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
