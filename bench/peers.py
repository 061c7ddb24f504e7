"""The runtimes under test, each driven through the same four operations.

A ``Runtime`` says whether it is installed and opens a ``Session``: a running cluster (or pool)
with a client attached. Every workload is written against ``Session`` alone:

- ``map_units(body, n)``: ``n`` units of one body run as one batch, the runtime's natural way
  (a ParallelTask here, ``client.map`` in Dask, one ``.remote()`` per unit in Ray,
  ``executor.map`` in the pool);
- ``submit_each(n)``: ``n`` independent no-op tasks, then every result;
- ``submit_raising(n, every)``: ``n`` independent tasks of which every ``every``-th raises
  ValueError, then every result or error (each checked);
- ``roundtrip()``: one no-op task, submitted and waited for;
- ``short_behind_long(n)``: ``n`` units of a 0.25 s sleep at the lowest priority, then (``BEHIND_S``
  later, when they hold the workers) one no-op task at a higher priority: the seconds from its
  submission to its result, and from the long batch's submission to its last result;
- ``fetch_blobs(n, nbytes, kind)``: ``n`` independent tasks each returning a large result of
  ``nbytes`` (``bytes``, or a NumPy array with ``kind="numpy"``), every one fetched by the
  client and checked;
- ``reduce_blobs(n, nbytes)``: ``n`` units each returning ``nbytes`` of bytes, reduced where the
  runtime reduces (a worker, or the pool's parent) to a small digest that is checked;
- ``tree_blobs(n, nbytes)``: a tree reduction of ``n`` leaf blobs of ``nbytes`` (inner nodes as
  large as their inputs, moved worker to worker), its root's small digest checked; the process
  pool has no worker-to-worker data and raises NotImplementedError;
- ``close()``.

Every wait is bounded by ``CALL_TIMEOUT_S``, and every count is checked, so a runtime that
loses work fails the bench instead of looking fast.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import multiprocessing
import os
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from bench import units
from bench.cluster import MultiNodeCluster
from bench.stats import CALL_TIMEOUT_S
from bench.system import quiet_stdout

#: How long the long batch of ``short_behind_long`` runs before the short task comes.
BEHIND_S = 0.1


class Session(ABC):
    #: pid of the process that schedules (the master); None where that is not one process.
    master_pid: int | None = None

    @abstractmethod
    def map_units(self, body: str, n: int, chunksize: int = 1) -> None: ...

    @abstractmethod
    def submit_each(self, n: int) -> None: ...

    def submit_batch(self, n: int) -> None:
        """``n`` small tasks as one batch where the runtime has one (``Runtime.batch_label``),
        else as ``submit_each``."""
        self.submit_each(n)

    @abstractmethod
    def submit_raising(self, n: int, every: int) -> None: ...

    @abstractmethod
    def roundtrip(self) -> None: ...

    @abstractmethod
    def short_behind_long(self, n: int) -> tuple[float, float]: ...

    @abstractmethod
    def fetch_blobs(self, n: int, nbytes: int, kind: str = "bytes") -> None: ...

    @abstractmethod
    def reduce_blobs(self, n: int, nbytes: int) -> None: ...

    def tree_blobs(self, n: int, nbytes: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} has no worker-to-worker data")

    @abstractmethod
    def chain(self, n: int) -> None:
        """``n`` tiny tasks, each taking the one before's result (its future where there are
        futures as arguments)."""

    @abstractmethod
    def fan_in(self, n: int) -> None:
        """``n`` tiny tasks, then one taking all their results."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Runtime(ABC):
    key: str  # what --peers names it
    name: str  # what the table calls it
    requires: tuple[str, ...] = ()  # modules that must import
    #: How map_units / submit_each drive it, for the table.
    map_label: str = ""
    submit_label: str = ""
    batch_label: str = ""  # how submit_batch drives it ("": as submit_each)
    #: True when map_units costs one scheduled task per unit (sizes are capped for those).
    task_per_unit: bool = True

    def availability(self) -> str:
        """Empty when the runtime can run here, else why not."""
        for module in self.requires:
            try:
                importlib.import_module(module)
            except Exception as exc:  # ImportError, or a broken install
                return f"not installed ({type(exc).__name__}: {exc})"
        return ""

    def map_label_for(self, chunksize: int) -> str:
        return self.map_label

    @abstractmethod
    def open(self, workers: int, *, wait: bool = True, workers_per_node: int | None = None,
             own_memory: bool = False) -> Session:
        """Start a cluster of ``workers`` and connect; with ``wait``, return once all are up.
        ``own_memory``: the master's memory will be read, so it must share no pages with this
        process (pydra-actors forks its master from a small single-threaded caller: not then)."""


@contextlib.contextmanager
def _closed_on_error(resource: Any) -> Iterator[None]:
    """A session half-started must not leave its processes behind."""
    try:
        yield
    except BaseException:
        resource.close()
        raise


def _expect(what: str, got: object, wanted: object) -> None:
    if got != wanted:
        raise RuntimeError(f"{what}: got {got!r}, expected {wanted!r}")


def _outcome(get: Any) -> object:
    """A task's result, or "raised" for the ValueError ``noop_or_raise`` raises."""
    try:
        return get()
    except ValueError:
        return "raised"


def _expect_outcomes(got: list[object], n: int, every: int) -> None:
    wanted = ["raised" if every and i % every == 0 else i for i in range(n)]
    _expect("task outcomes", got, wanted)


def _expect_blobs(results: Iterator[Any], n: int, nbytes: int, kind: str) -> None:
    """Check every large result as it comes (none is kept: the bench process holds one at a
    time where the runtime lets it): ``n`` of them, intact, of ``nbytes``, in order."""
    check = units.BLOB_CHECKERS[kind]
    _expect(f"{kind} results", [check(r, nbytes) for r in results], list(range(n)))


def _drained(futures: list[Any], get: Any) -> Iterator[Any]:
    """Each future's result in order, letting go of every future once its result is taken."""
    queue = deque(futures)
    futures.clear()
    while queue:
        yield get(queue.popleft())


# --- pydra-actors ---------------------------------------------------------------


class ActorsRuntime(Runtime):
    key, name = "actors", "pydra-actors"
    map_label, submit_label, batch_label = "ParallelTask", "client.submit", "client.map_batch"
    task_per_unit = False

    def open(self, workers: int, *, wait: bool = True, workers_per_node: int | None = None,
             own_memory: bool = False) -> Session:
        return ActorsSession(workers, wait, workers_per_node, fork=not own_memory)

    def open_durable(self, workers: int, state_dir: str) -> ActorsSession:
        """A cluster whose master keeps its journal in ``state_dir`` (fsync'd commits)."""
        return ActorsSession(workers, True, None, state_dir=state_dir)


class ActorsSession(Session):
    def __init__(self, workers: int, wait: bool, workers_per_node: int | None,
                 state_dir: str | None = None, fork: bool = True) -> None:
        from actors import Client, LocalCluster

        self.cluster: Any
        if workers_per_node is None:
            with quiet_stdout():  # the master prints its banner for people
                self.cluster = LocalCluster(workers=workers, log_level="warning",
                                            state_dir=state_dir, fork=fork)
        else:
            self.cluster = MultiNodeCluster(workers, workers_per_node)
        self.master_pid = self.cluster.pid
        with _closed_on_error(self.cluster):
            # As Client(cluster) connects (its Unix socket), without waiting for its workers.
            self.client = Client(getattr(self.cluster, "local_address", "") or self.cluster.address,
                                 keys=self.cluster.keys_dir)
        with _closed_on_error(self):
            if wait:
                self.client.wait_for_workers(workers, timeout=CALL_TIMEOUT_S)

    def map_units(self, body: str, n: int, chunksize: int = 1) -> None:
        task = units.PARALLEL_TASKS[body]
        _expect("units run", self.client.submit(task, n).result(timeout=CALL_TIMEOUT_S), n)

    def submit_each(self, n: int) -> None:
        futures = self.client.map(units.NoopTask, range(n))
        _expect("task results", [f.result(timeout=CALL_TIMEOUT_S) for f in futures], list(range(n)))

    def submit_batch(self, n: int) -> None:
        futures = self.client.map_batch(units.NoopTask, range(n))
        _expect("task results", [f.result(timeout=CALL_TIMEOUT_S) for f in futures], list(range(n)))

    def submit_raising(self, n: int, every: int) -> None:
        futures = self.client.map(units.MaybeRaises, range(n), every=every)
        _expect_outcomes([_outcome(lambda f=f: f.result(timeout=CALL_TIMEOUT_S))
                          for f in futures], n, every)

    def roundtrip(self) -> None:
        _expect("result", self.client.submit(units.NoopTask, 7).result(timeout=CALL_TIMEOUT_S), 7)

    def short_behind_long(self, n: int) -> tuple[float, float]:
        began = time.perf_counter()
        long = self.client.submit(units.PARALLEL_TASKS["sleep_250ms"], n, priority=0)
        time.sleep(BEHIND_S)
        start = time.perf_counter()
        _expect("result", self.client.submit(units.NoopTask, 7, priority=1).result(
            timeout=CALL_TIMEOUT_S), 7)
        seconds = time.perf_counter() - start
        _expect("units run", long.result(timeout=CALL_TIMEOUT_S), n)
        return seconds, time.perf_counter() - began

    def fetch_blobs(self, n: int, nbytes: int, kind: str = "bytes") -> None:
        futures = self.client.map(units.BLOB_TASKS[kind], range(n), nbytes=nbytes)
        _expect_blobs(_drained(futures, lambda f: f.result(timeout=CALL_TIMEOUT_S)),
                      n, nbytes, kind)

    def reduce_blobs(self, n: int, nbytes: int) -> None:
        digest = self.client.submit(units.BlobUnits, n, nbytes).result(timeout=CALL_TIMEOUT_S)
        _expect("digest (units, bytes, index sum)", digest, units.expected_digest(n, nbytes))

    def tree_blobs(self, n: int, nbytes: int) -> None:
        digest = self.client.submit(units.BlobTree, n, nbytes).result(timeout=CALL_TIMEOUT_S)
        _expect("root digest", digest, units.expected_tree_digest(n, nbytes))

    def chain(self, n: int) -> None:
        fut = self.client.submit(units.inc, 0)
        for _ in range(n - 1):
            fut = self.client.submit(units.inc, fut)
        _expect("end of the chain", fut.result(timeout=CALL_TIMEOUT_S), n)

    def fan_in(self, n: int) -> None:
        parts = self.client.map(units.inc, range(n))
        _expect("sum", self.client.submit(units.total, parts).result(timeout=CALL_TIMEOUT_S),
                n * (n + 1) // 2)

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


# --- Dask distributed -------------------------------------------------------------


class DaskRuntime(Runtime):
    key, name = "dask", "dask"
    requires = ("distributed",)
    map_label, submit_label = "client.map", "client.submit"

    def open(self, workers: int, *, wait: bool = True, workers_per_node: int | None = None,
             own_memory: bool = False) -> Session:
        return DaskSession(workers, wait)


class DaskSession(Session):
    def __init__(self, workers: int, wait: bool) -> None:
        import distributed

        self._distributed = distributed
        self.cluster = distributed.LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True,
            dashboard_address=None, silence_logs=logging.ERROR)
        with _closed_on_error(self.cluster):
            self.client = distributed.Client(self.cluster)
        self.master_pid = os.getpid()  # the scheduler runs in this process
        with _closed_on_error(self):
            if wait:
                self.client.wait_for_workers(workers, timeout=CALL_TIMEOUT_S)

    def _wait_all(self, futures: list[Any]) -> None:
        self._distributed.wait(futures, timeout=CALL_TIMEOUT_S)
        _expect("finished tasks", sum(f.status == "finished" for f in futures), len(futures))

    def map_units(self, body: str, n: int, chunksize: int = 1) -> None:
        futures = self.client.map(units.UNIT_BODIES[body], range(n), pure=False)
        self._wait_all(futures)

    def submit_each(self, n: int) -> None:
        futures = [self.client.submit(units.noop, i, pure=False) for i in range(n)]
        self._wait_all(futures)
        _expect("task results", self.client.gather(futures), list(range(n)))

    def submit_raising(self, n: int, every: int) -> None:
        futures = [self.client.submit(units.noop_or_raise, i, every, pure=False) for i in range(n)]
        self._distributed.wait(futures, timeout=CALL_TIMEOUT_S)  # finished or erred
        _expect_outcomes([_outcome(lambda f=f: f.result(CALL_TIMEOUT_S)) for f in futures],
                         n, every)

    def roundtrip(self) -> None:
        _expect("result", self.client.submit(units.noop, 7, pure=False).result(CALL_TIMEOUT_S), 7)

    def short_behind_long(self, n: int) -> tuple[float, float]:
        began = time.perf_counter()
        long = self.client.map(units.sleep_250ms, range(n), pure=False, priority=0)
        time.sleep(BEHIND_S)
        start = time.perf_counter()
        _expect("result", self.client.submit(units.noop, 7, pure=False, priority=1).result(
            CALL_TIMEOUT_S), 7)
        seconds = time.perf_counter() - start
        self._wait_all(long)
        return seconds, time.perf_counter() - began

    def fetch_blobs(self, n: int, nbytes: int, kind: str = "bytes") -> None:
        make = units.BLOB_MAKERS[kind]
        futures = [self.client.submit(make, i, nbytes, pure=False) for i in range(n)]
        self._wait_all(futures)
        results = self.client.gather(futures)
        del futures  # the workers let go of their copies
        _expect_blobs(_drained(results, lambda r: r), n, nbytes, kind)

    def reduce_blobs(self, n: int, nbytes: int) -> None:
        futures = self.client.map(units.blob, range(n), nbytes=nbytes, pure=False)
        digest = self.client.submit(units.blob_digest, futures, pure=False)
        _expect("digest (units, bytes, index sum)", digest.result(CALL_TIMEOUT_S),
                units.expected_digest(n, nbytes))

    def tree_blobs(self, n: int, nbytes: int) -> None:
        level = self.client.map(units.blob, range(n), nbytes=nbytes, pure=False)
        while len(level) > 1:
            level = [self.client.submit(units.blob_sum, *level[i:i + units.TREE_FAN_IN],
                                        pure=False)
                     for i in range(0, len(level), units.TREE_FAN_IN)]
        digest = self.client.submit(units.blob_digest_of, level[0], pure=False)
        _expect("root digest", digest.result(CALL_TIMEOUT_S), units.expected_tree_digest(n, nbytes))

    def chain(self, n: int) -> None:
        fut = self.client.submit(units.inc, 0, pure=False)
        for _ in range(n - 1):
            fut = self.client.submit(units.inc, fut, pure=False)
        _expect("end of the chain", fut.result(CALL_TIMEOUT_S), n)

    def fan_in(self, n: int) -> None:
        parts = self.client.map(units.inc, range(n), pure=False)
        _expect("sum", self.client.submit(units.total, parts, pure=False).result(CALL_TIMEOUT_S),
                n * (n + 1) // 2)

    def close(self) -> None:
        self.client.close()
        self.cluster.close()


# --- Ray ------------------------------------------------------------------------------


class RayRuntime(Runtime):
    key, name = "ray", "ray"
    requires = ("ray",)
    map_label, submit_label = ".remote() per unit", ".remote()"

    def open(self, workers: int, *, wait: bool = True, workers_per_node: int | None = None,
             own_memory: bool = False) -> Session:
        return RaySession(workers, wait)


class RaySession(Session):
    def __init__(self, workers: int, wait: bool) -> None:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray

        self._ray = ray
        ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
        with _closed_on_error(self):
            self._remote = {name: ray.remote(num_cpus=1)(fn)
                            for name, fn in units.UNIT_BODIES.items()}
            if wait:  # Ray starts worker processes lazily: have each run once
                self.map_units("sleep_10ms", 4 * workers)

    def _get(self, refs: Any) -> Any:
        return self._ray.get(refs, timeout=CALL_TIMEOUT_S)

    def map_units(self, body: str, n: int, chunksize: int = 1) -> None:
        remote = self._remote[body]
        _expect("units run", len(self._get([remote.remote(i) for i in range(n)])), n)

    def submit_each(self, n: int) -> None:
        remote = self._remote["noop"]
        _expect("task results", self._get([remote.remote(i) for i in range(n)]), list(range(n)))

    def submit_raising(self, n: int, every: int) -> None:
        remote = self._ray.remote(num_cpus=1)(units.noop_or_raise)
        refs = [remote.remote(i, every) for i in range(n)]
        _expect_outcomes([_outcome(lambda r=r: self._get(r)) for r in refs], n, every)

    def roundtrip(self) -> None:
        _expect("result", self._get(self._remote["noop"].remote(7)), 7)

    def short_behind_long(self, n: int) -> tuple[float, float]:
        """Ray has no task priorities: the short task is simply submitted after the others."""
        began = time.perf_counter()
        long = [self._remote["sleep_250ms"].remote(i) for i in range(n)]
        time.sleep(BEHIND_S)
        start = time.perf_counter()
        _expect("result", self._get(self._remote["noop"].remote(7)), 7)
        seconds = time.perf_counter() - start
        _expect("units run", len(self._get(long)), n)
        return seconds, time.perf_counter() - began

    def fetch_blobs(self, n: int, nbytes: int, kind: str = "bytes") -> None:
        remote = self._ray.remote(num_cpus=1)(units.BLOB_MAKERS[kind])
        refs = [remote.remote(i, nbytes) for i in range(n)]
        _expect_blobs(_drained(refs, self._get), n, nbytes, kind)

    def reduce_blobs(self, n: int, nbytes: int) -> None:
        make = self._ray.remote(num_cpus=1)(units.blob)
        digest = self._ray.remote(num_cpus=1)(units.blob_digest_of)
        refs = [make.remote(i, nbytes) for i in range(n)]
        _expect("digest (units, bytes, index sum)", self._get(digest.remote(*refs)),
                units.expected_digest(n, nbytes))

    def tree_blobs(self, n: int, nbytes: int) -> None:
        make = self._ray.remote(num_cpus=1)(units.blob)
        add = self._ray.remote(num_cpus=1)(units.blob_sum)
        digest = self._ray.remote(num_cpus=1)(units.blob_digest_of)
        level = [make.remote(i, nbytes) for i in range(n)]
        while len(level) > 1:
            level = [add.remote(*level[i:i + units.TREE_FAN_IN])
                     for i in range(0, len(level), units.TREE_FAN_IN)]
        _expect("root digest", self._get(digest.remote(level[0])),
                units.expected_tree_digest(n, nbytes))

    def chain(self, n: int) -> None:
        inc = self._ray.remote(num_cpus=1)(units.inc)
        ref = inc.remote(0)
        for _ in range(n - 1):
            ref = inc.remote(ref)
        _expect("end of the chain", self._get(ref), n)

    def fan_in(self, n: int) -> None:
        inc = self._ray.remote(num_cpus=1)(units.inc)
        total = self._ray.remote(num_cpus=1)(units.total_of)  # (refs inside a list stay refs)
        _expect("sum", self._get(total.remote(*[inc.remote(i) for i in range(n)])),
                n * (n + 1) // 2)

    def close(self) -> None:
        self._ray.shutdown()


# --- concurrent.futures.ProcessPoolExecutor -------------------------------------------


class PoolRuntime(Runtime):
    key, name = "pool", "process pool"
    submit_label = "executor.submit"

    def map_label_for(self, chunksize: int) -> str:
        return f"executor.map chunksize {chunksize}"

    def open(self, workers: int, *, wait: bool = True, workers_per_node: int | None = None,
             own_memory: bool = False) -> Session:
        return PoolSession(workers, wait)


class PoolSession(Session):
    def __init__(self, workers: int, wait: bool) -> None:
        # spawn: fresh interpreters like every other runtime's workers, and no fork of a
        # process that runs threads (the bench's clients have some).
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        self.master_pid = os.getpid()
        with _closed_on_error(self):
            if wait:  # processes are spawned on demand: keep them all busy once
                self.map_units("sleep_10ms", 4 * workers)

    def map_units(self, body: str, n: int, chunksize: int = 1) -> None:
        results = self.executor.map(units.UNIT_BODIES[body], range(n), chunksize=chunksize,
                                    timeout=CALL_TIMEOUT_S)
        _expect("units run", sum(1 for _ in results), n)

    def submit_each(self, n: int) -> None:
        futures = [self.executor.submit(units.noop, i) for i in range(n)]
        _expect("task results", [f.result(CALL_TIMEOUT_S) for f in futures], list(range(n)))

    def submit_raising(self, n: int, every: int) -> None:
        futures = [self.executor.submit(units.noop_or_raise, i, every) for i in range(n)]
        _expect_outcomes([_outcome(lambda f=f: f.result(CALL_TIMEOUT_S)) for f in futures],
                         n, every)

    def roundtrip(self) -> None:
        _expect("result", self.executor.submit(units.noop, 7).result(CALL_TIMEOUT_S), 7)

    def short_behind_long(self, n: int) -> tuple[float, float]:
        """The pool has no priorities: the short task runs once a process is free of the queue."""
        began = time.perf_counter()
        long = [self.executor.submit(units.sleep_250ms, i) for i in range(n)]
        time.sleep(BEHIND_S)
        start = time.perf_counter()
        _expect("result", self.executor.submit(units.noop, 7).result(CALL_TIMEOUT_S), 7)
        seconds = time.perf_counter() - start
        _expect("units run", len([f.result(CALL_TIMEOUT_S) for f in long]), n)
        return seconds, time.perf_counter() - began

    def fetch_blobs(self, n: int, nbytes: int, kind: str = "bytes") -> None:
        make = units.BLOB_MAKERS[kind]
        futures = [self.executor.submit(make, i, nbytes) for i in range(n)]
        _expect_blobs(_drained(futures, lambda f: f.result(CALL_TIMEOUT_S)), n, nbytes, kind)

    def reduce_blobs(self, n: int, nbytes: int) -> None:
        """No worker-side reduce in a pool: the units' results come to the parent, which
        reduces them one at a time as they arrive."""
        results = self.executor.map(units.blob, range(n), [nbytes] * n, timeout=CALL_TIMEOUT_S)
        _expect("digest (units, bytes, index sum)", units.blob_digest(results),
                units.expected_digest(n, nbytes))

    def chain(self, n: int) -> None:
        """No futures as arguments in a pool: each result comes back to be passed on."""
        value = 0
        for _ in range(n):
            value = self.executor.submit(units.inc, value).result(CALL_TIMEOUT_S)
        _expect("end of the chain", value, n)

    def fan_in(self, n: int) -> None:
        parts = [f.result(CALL_TIMEOUT_S) for f in
                 [self.executor.submit(units.inc, i) for i in range(n)]]
        _expect("sum", self.executor.submit(units.total, parts).result(CALL_TIMEOUT_S),
                n * (n + 1) // 2)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


RUNTIMES: dict[str, Runtime] = {
    runtime.key: runtime
    for runtime in (ActorsRuntime(), DaskRuntime(), RayRuntime(), PoolRuntime())
}
OURS = RUNTIMES["actors"].name
