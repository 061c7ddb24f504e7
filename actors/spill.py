"""What a worker holds (unit results kept for dependents and the driver, data fetched for its
own units), in memory up to a target, the rest on its scratch disk.

``SpillBuffer`` is the mapping ``WorkerState.data`` is: the state machine stores and reads
bytes by key and never knows where they are. Past ``target`` bytes in memory, the least
recently used values are written to files in ``directory`` (the worker's private scratch
folder) and read from there when asked for; a value larger than the target goes straight to
disk. The reference is Dask's worker memory model (``distributed.worker.memory.target``, a
``zict.Buffer`` of a dict and a file store). Past a higher mark (``pause_mark``, only where
the worker has a memory limit), the worker writes everything it holds to disk, gives freed
memory back, and if it is still past the mark asks the master for no new work until it is
back below (``WorkerPaused``): Dask's ``pause``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping

import structlog

from actors.contain import parse_size

log = structlog.get_logger("actors.worker")

SPILL_FRACTION = 0.6  # of --worker-memory, or of a share of the host's memory, by default
PAUSE_FRACTION = 0.8  # of --worker-memory: past it (resident), the worker takes no new work
RESUME_FRACTION = 0.9  # of the pause mark: below it, work again
HOST_SHARE = 0.25  # the share of the host's memory a worker without a limit may hold


def spill_target() -> int:
    """Bytes a worker keeps in memory before it spills: ``$ACTORS_WORKER_SPILL`` (the node's
    ``--worker-spill``), else 60 % of its memory limit, else 60 % of a quarter of the host's."""
    text = os.environ.get("ACTORS_WORKER_SPILL")
    if text:
        return parse_size(text)
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    if soft != resource.RLIM_INFINITY:
        return int(soft * SPILL_FRACTION)
    try:
        host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        host = 8 << 30
    return int(host * HOST_SHARE * SPILL_FRACTION)


def pause_mark() -> int:
    """Resident bytes past which a worker takes no new work: ``$ACTORS_WORKER_PAUSE`` (the
    node's ``--worker-pause``), else 80 % of its memory limit; 0 (never) without a limit."""
    text = os.environ.get("ACTORS_WORKER_PAUSE")
    if text:
        return parse_size(text)
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)
    return 0 if soft == resource.RLIM_INFINITY else int(soft * PAUSE_FRACTION)


class SpillBuffer(MutableMapping[str, bytes]):
    """See the module docstring."""

    def __init__(self, directory: str, target: int) -> None:
        self.directory = directory
        self.target = target
        self.fast: OrderedDict[str, bytes] = OrderedDict()  # least recently used first
        self.slow: dict[str, int] = {}  # key -> size of its file
        self.fast_bytes = 0
        self.spilled = 0  # values written to disk, ever
        self.log = log

    # --- the mapping --------------------------------------------------------

    def __getitem__(self, key: str) -> bytes:
        value = self.fast.get(key)
        if value is not None:
            self.fast.move_to_end(key)
            return value
        if key not in self.slow:
            raise KeyError(key)
        with open(self._path(key), "rb") as f:
            return f.read()  # it stays on disk: reading it back should not evict another

    def __setitem__(self, key: str, value: bytes) -> None:
        self._discard(key)
        if len(value) > self.target and self._write(key, value):
            return  # larger than memory may hold: to disk at once, evicting nothing
        self.fast[key] = value
        self.fast_bytes += len(value)
        while self.fast_bytes > self.target and self.fast:
            oldest, data = next(iter(self.fast.items()))
            if not self._write(oldest, data):
                break  # a full disk: it stays in memory
            del self.fast[oldest]
            self.fast_bytes -= len(data)

    def __delitem__(self, key: str) -> None:
        if key not in self.fast and key not in self.slow:
            raise KeyError(key)
        self._discard(key)

    def __contains__(self, key: object) -> bool:
        return key in self.fast or key in self.slow

    def __iter__(self) -> Iterator[str]:
        yield from list(self.fast)
        yield from list(self.slow)

    def __len__(self) -> int:
        return len(self.fast) + len(self.slow)

    @property
    def slow_bytes(self) -> int:
        return sum(self.slow.values())

    def spill_all(self) -> int:
        """Everything held in memory to disk (the worker is past its pause mark); bytes moved."""
        moved = 0
        for key in list(self.fast):
            data = self.fast[key]
            if not self._write(key, data):
                break
            del self.fast[key]
            self.fast_bytes -= len(data)
            moved += len(data)
        return moved

    # --- inside -------------------------------------------------------------

    def _discard(self, key: str) -> None:
        value = self.fast.pop(key, None)
        if value is not None:
            self.fast_bytes -= len(value)
        elif self.slow.pop(key, None) is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path(key))

    def _write(self, key: str, value: bytes) -> bool:
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            with open(self._path(key), "wb") as f:
                f.write(value)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(self._path(key))
            self.log.warning("spill_failed", key=key, size=len(value), error=str(exc))
            return False
        self.slow[key] = len(value)
        self.spilled += 1
        if self.spilled & (self.spilled - 1) == 0:  # the 1st, 2nd, 4th... only
            self.log.info("results_spilled", key=key, size=len(value), spilled=self.spilled,
                          in_memory=self.fast_bytes, on_disk=self.slow_bytes,
                          target=self.target, directory=self.directory)
        return True

    def _path(self, key: str) -> str:
        return os.path.join(self.directory, hashlib.sha256(key.encode()).hexdigest()[:40])
