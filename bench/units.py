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

from actors import ParallelTask, Task, Unit

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


def inc(x: int) -> int:
    return x + 1


def total(xs: list[int]) -> int:
    return sum(xs)


def total_of(*xs: int) -> int:
    return sum(xs)


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


# --- large results (the data plane) ---------------------------------------------

BLOB_FILL = 0xA5  # every byte of a blob but its 8-byte index tags at each end


def blob(i: int, nbytes: int) -> bytes:
    """``nbytes`` bytes (at least 16): ``i`` as 8 bytes at each end, ``BLOB_FILL`` between."""
    if nbytes < 16:
        raise ValueError(f"a blob has at least 16 bytes, not {nbytes}")
    tag = i.to_bytes(8, "little")
    return b"".join((tag, bytes((BLOB_FILL,)) * (nbytes - 16), tag))


def blob_index(data: Any, nbytes: int | None = None) -> int:
    """The index of a blob, checked: a ``bytes`` of ``nbytes`` (when given) whose two tags agree
    and whose first, middle and last fill bytes are ``BLOB_FILL``. Raises ValueError otherwise
    (a result cut short, swapped or mangled)."""
    size = len(data) if isinstance(data, bytes) else -1
    if (size < 16 or (nbytes is not None and size != nbytes) or data[:8] != data[-8:]
            or not data[8] == data[size // 2] == data[-9] == BLOB_FILL):
        raise ValueError(f"not an intact blob of {nbytes} bytes: {type(data).__name__} of "
                         f"{size if size >= 0 else '?'} bytes")
    return int.from_bytes(data[:8], "little")


def blob_digest(blobs: Any) -> tuple[int, int, int]:
    """(count, total bytes, sum of indexes) of intact blobs: what a worker returns instead of
    the data itself."""
    count = total = index_sum = 0
    for data in blobs:
        index_sum += blob_index(data)
        count += 1
        total += len(data)
    return count, total, index_sum


def blob_digest_of(*blobs: bytes) -> tuple[int, int, int]:
    """``blob_digest`` for runtimes that resolve only top-level arguments (Ray)."""
    return blob_digest(blobs)


def expected_digest(n: int, nbytes: int) -> tuple[int, int, int]:
    """The digest of blobs 0 .. n - 1 of ``nbytes`` each."""
    return n, n * nbytes, n * (n - 1) // 2


def blob_sum(*blobs: bytes) -> bytes:
    """An inner node of a tree reduction: a new blob of the inputs' size whose index is the sum
    of theirs (each input checked), so the root's index is the sum over all leaves."""
    return blob(sum(blob_index(b, len(blobs[0])) for b in blobs), len(blobs[0]))


def expected_tree_digest(n: int, nbytes: int) -> tuple[int, int, int]:
    """The digest of the root of a tree reduction over blobs 0 .. n - 1."""
    return 1, nbytes, n * (n - 1) // 2


#: Inputs per inner node of the tree reductions.
TREE_FAN_IN = 2


def array_blob(i: int, nbytes: int) -> Any:
    """A NumPy array of ``nbytes // 8`` int64, all ``i``."""
    import numpy

    return numpy.full(nbytes // 8, i, dtype=numpy.int64)


def array_index(data: Any, nbytes: int | None = None) -> int:
    """The index of an ``array_blob``, checked like ``blob_index`` (type, dtype, size, values at
    both ends and the middle)."""
    import numpy

    if (not isinstance(data, numpy.ndarray) or data.dtype != numpy.int64 or data.ndim != 1
            or len(data) == 0 or (nbytes is not None and data.nbytes != nbytes // 8 * 8)
            or not data[0] == data[len(data) // 2] == data[-1]):
        raise ValueError(f"not an intact array of {nbytes} bytes: {type(data).__name__} "
                         f"{getattr(data, 'dtype', '')} {getattr(data, 'shape', '')}")
    return int(data[0])


#: How a large result of each kind is made on a worker and checked by the client.
BLOB_MAKERS = {"bytes": blob, "numpy": array_blob}
BLOB_CHECKERS = {"bytes": blob_index, "numpy": array_index}


UNIT_BODIES = {"noop": noop, "sleep_10ms": sleep_10ms, "busy_10ms": busy_10ms,
               "sleep_250ms": sleep_250ms, "sleep_skewed": sleep_skewed}


# --- pydra-actors tasks -------------------------------------------------------


class NoopTask(Task):
    def work(self, x: Any = None) -> Any:
        return x


class MaybeRaises(Task):
    def work(self, x: int, every: int) -> int:
        return noop_or_raise(x, every)


class BytesTask(Task):
    def work(self, i: int, nbytes: int) -> bytes:
        return blob(i, nbytes)


class ArrayTask(Task):
    def work(self, i: int, nbytes: int) -> Any:
        return array_blob(i, nbytes)


#: The Task that returns one large result of each kind.
BLOB_TASKS: dict[str, type[Task]] = {"bytes": BytesTask, "numpy": ArrayTask}


class BlobUnits(ParallelTask):
    """``n`` units each returning a blob of ``nbytes``, reduced on the driving worker to
    ``blob_digest``: nothing large goes back to the client."""

    def get_work(self, n: int, nbytes: int) -> Any:
        for i in range(n):
            yield i, nbytes

    def work_unit(self, unit: tuple[int, int]) -> bytes:
        return blob(*unit)

    def reduce(self, results: list[bytes]) -> tuple[int, int, int]:
        return blob_digest(results)


class BlobTree(ParallelTask):
    """A tree reduction of ``n`` leaf blobs of ``nbytes``, ``TREE_FAN_IN`` inputs per inner unit
    (``blob_sum``, as large as its inputs): results move from worker to worker, fetched where
    they were computed; ``reduce`` gets the root alone and returns its digest."""

    def get_work(self, n: int, nbytes: int) -> Any:
        level = [Unit(("leaf", i, nbytes)) for i in range(n)]
        yield from level
        while len(level) > 1:
            level = [Unit(("sum",), after=level[i:i + TREE_FAN_IN])
                     for i in range(0, len(level), TREE_FAN_IN)]
            yield from level

    def work_unit(self, unit: tuple[Any, ...], *inputs: bytes) -> bytes:
        return blob(unit[1], unit[2]) if unit[0] == "leaf" else blob_sum(*inputs)

    def reduce(self, results: list[bytes]) -> tuple[int, int, int]:
        return blob_digest(results)


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
