"""The work every runtime runs: plain functions for the peers, Task classes for pydra-actors.

This module must stay importable by worker processes of every runtime (the process pool and
Dask import it by reference; pydra-actors ships its Task classes by value) and must not import
the rest of the bench.
"""

from __future__ import annotations

import math
import random
import time
from typing import Any

from actors import ParallelTask, Task

SLEEP_S = 0.010
BUSY_S = 0.010
LONG_S = 0.25
SKEWED_MEAN_S = 0.010
SKEWED_SIGMA = 1.5  # lognormal: most units well under the mean, a few ten to thirty times it


def _skewed_durations(count: int = 400, seed: int = 13) -> tuple[float, ...]:
    """``count`` lognormal durations scaled to a mean of exactly ``SKEWED_MEAN_S``, in a fixed
    order (the same for every runtime and every run)."""
    rng = random.Random(seed)
    mu = math.log(SKEWED_MEAN_S) - SKEWED_SIGMA ** 2 / 2
    drawn = [rng.lognormvariate(mu, SKEWED_SIGMA) for _ in range(count)]
    scale = SKEWED_MEAN_S * count / sum(drawn)
    return tuple(d * scale for d in drawn)


SKEWED_S = _skewed_durations()


# --- unit bodies, shared by every runtime ------------------------------------


def noop(x: Any = None) -> Any:
    return x


def sleep_10ms(x: Any = None) -> Any:
    time.sleep(SLEEP_S)
    return x


def sleep_250ms(x: Any = None) -> Any:
    time.sleep(LONG_S)
    return x


def sleep_skewed(x: int = 0) -> Any:
    """Unit ``x`` sleeps ``SKEWED_S[x]`` (cycling past the end)."""
    time.sleep(SKEWED_S[x % len(SKEWED_S)])
    return x


def busy_10ms(x: Any = None) -> Any:
    """10 ms of this thread's CPU time: on an oversubscribed machine it takes longer on the clock."""
    end = time.thread_time() + BUSY_S
    while time.thread_time() < end:
        pass
    return x


def noop_or_raise(x: int, every: int) -> int:
    """``x``, or ValueError when ``every`` divides it (``every`` 0: never)."""
    if every and x % every == 0:
        raise ValueError(f"input {x} refused")
    return x


UNIT_BODIES = {"noop": noop, "sleep_10ms": sleep_10ms, "busy_10ms": busy_10ms,
               "sleep_250ms": sleep_250ms, "sleep_skewed": sleep_skewed}


# --- pydra-actors tasks -------------------------------------------------------


class NoopTask(Task):
    def work(self, x: Any = None) -> Any:
        return x


class MaybeRaises(Task):
    def work(self, x: int, every: int) -> int:
        return noop_or_raise(x, every)


class CountUnits(ParallelTask):
    """``n`` units of ``body``; the result is how many ran (no results list crosses back)."""

    body = staticmethod(noop)

    def get_work(self, n: int) -> Any:
        yield from range(n)

    def work_unit(self, i: int) -> Any:
        return self.body(i)

    def reduce(self, results: list[Any]) -> int:
        return len(results)


class NoopUnits(CountUnits):
    body = staticmethod(noop)


class SleepUnits(CountUnits):
    body = staticmethod(sleep_10ms)


class BusyUnits(CountUnits):
    body = staticmethod(busy_10ms)


class LongUnits(CountUnits):
    body = staticmethod(sleep_250ms)


class SkewedUnits(CountUnits):
    body = staticmethod(sleep_skewed)


#: The ParallelTask that runs ``n`` units of each body (helper workers never run ``get_work``,
#: so the body is chosen by class, not by argument).
PARALLEL_TASKS: dict[str, type[CountUnits]] = {
    "noop": NoopUnits, "sleep_10ms": SleepUnits, "busy_10ms": BusyUnits,
    "sleep_250ms": LongUnits, "sleep_skewed": SkewedUnits,
}
