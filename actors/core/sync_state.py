"""TaskSync as two sans-I/O state machines: the node's cache client and the master's server.

Theory of operation
-------------------
Both machines change only in ``handle(event) -> list[instruction]``; they hold
no socket, thread or clock (the time comes in as ``now`` on every event), so
the actor shells in ``actors.task_sync`` only translate messages to events and
carry the instructions out.

Node side, `SyncClientState`, per (package, version)::

    VersionNeeded ──▶ CHECKING ──VALID──▶ INSTALLED ──(unused, not newest, grace)──▶ removed
                         │  MISSING/CORRUPT            ▲
                         ▼                             │ InstallFinished(ok)
                      FETCHING ──all chunks, hash ok──▶ INSTALLING

1. A worker that must start asks for a version (`VersionNeeded`). Requests for
   a version already being checked or fetched join it: one transfer, and every
   requester is answered by the same `VersionReady` or `VersionFailed`.
2. The cache is verified on every request, not only the first one: a folder
   whose content no longer matches its hash is never imported. A CORRUPT one
   is removed (`RemoveVersion(reason=CORRUPT)`, worth a warning) and fetched
   again.
3. Chunks are requested with a sliding window of at most ``window`` in flight.
   A chunk out of range, a duplicate, or one of a finished transfer is
   ignored; the chunks are joined in index order and the archive is unpacked
   and hashed here, so `Install` only ever carries content that matches its
   version (the shell hashes again what it wrote).
4. A transfer without progress for ``transfer_timeout_s`` (seen on `Tick`)
   asks again for what is missing; a bad archive starts again from nothing.
   Each counts as an attempt; after ``max_attempts`` the version fails.
   `TransferFailed` (the master no longer has the version, or the link is
   gone) fails it at once: the scheduler decides what happens to the task.
5. A version is removed only when it is INSTALLED, no running instance uses it,
   the master has named a newer one (`NewestVersion`), and ``grace_s`` have
   passed since the last of those became true. A version in use is never
   removed for being unused.

Master side, `SyncServerState`: the catalogue of versions from scans, answers
to chunk requests, and a snapshot of every version a queued or running
instance uses, so a task keeps its code after a file changes on disk. A
snapshot that is not the newest and unused for ``grace_s`` is dropped.

Peers are not trusted to be consistent (messages repeat, arrive late, or come
from a node that restarted), so an event that does not fit the current state
is ignored rather than raised: it cannot leave the machine in a bad state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

import msgspec

from actors.core.packages import (
    DEFAULT_CHUNK_SIZE,
    FileEntry,
    PackageVersion,
    chunk_at,
    chunk_count,
    is_valid_package_name,
    is_valid_version,
    unpack,
    version_of,
)
from actors.errors import PackageIntegrityError

DEFAULT_GRACE_S = 300.0
DEFAULT_WINDOW = 8
DEFAULT_TRANSFER_TIMEOUT_S = 30.0
DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_MAX_CHUNKS_PER_REQUEST = 16


class CacheStatus(StrEnum):
    VALID = "valid"
    MISSING = "missing"
    CORRUPT = "corrupt"  # present, but its content does not hash to its version


class RemovalReason(StrEnum):
    UNUSED = "unused"
    CORRUPT = "corrupt"


# --- events (facts, with the time they were seen) ---------------------------


class SyncEvent(msgspec.Struct, frozen=True, kw_only=True):
    now: float


class Tick(SyncEvent, frozen=True):
    pass


class VersionNeeded(SyncEvent, frozen=True):
    package: str
    version: str
    requester: str  # e.g. the id of the worker/instance waiting to start


class CacheChecked(SyncEvent, frozen=True):
    package: str
    version: str
    status: CacheStatus
    detail: str = ""


class ChunkReceived(SyncEvent, frozen=True):
    package: str
    version: str
    index: int
    total: int
    data: bytes


class TransferFailed(SyncEvent, frozen=True):
    package: str
    version: str
    reason: str


class InstallFinished(SyncEvent, frozen=True):
    package: str
    version: str
    ok: bool
    reason: str = ""


class InstanceStarted(SyncEvent, frozen=True):
    package: str
    version: str
    instance_id: str


class InstanceEnded(SyncEvent, frozen=True):
    package: str
    version: str
    instance_id: str


class NewestVersion(SyncEvent, frozen=True):
    package: str
    version: str | None  # None: the package is gone from the master


class CachedVersionsFound(SyncEvent, frozen=True):
    """What the node's cache held when it started, so old versions are collected too."""

    versions: tuple[tuple[str, str], ...]


class PackagesScanned(SyncEvent, frozen=True):
    packages: Mapping[str, PackageVersion]  # the current version of every package on disk


class ChunksRequested(SyncEvent, frozen=True):
    node: str
    package: str
    version: str
    start: int
    count: int


class InstanceQueued(SyncEvent, frozen=True):
    package: str
    version: str
    instance_id: str


# --- instructions (commands for the shell) -----------------------------------


class VerifyCache(msgspec.Struct, frozen=True):
    package: str
    version: str


class RequestChunks(msgspec.Struct, frozen=True):
    package: str
    version: str
    start: int
    count: int


class Install(msgspec.Struct, frozen=True):
    package: str
    version: str
    files: tuple[FileEntry, ...]  # already checked to hash to ``version``


class VersionReady(msgspec.Struct, frozen=True):
    package: str
    version: str
    requesters: tuple[str, ...]


class VersionFailed(msgspec.Struct, frozen=True):
    package: str
    version: str
    requesters: tuple[str, ...]
    reason: str


class RemoveVersion(msgspec.Struct, frozen=True):
    package: str
    version: str
    reason: RemovalReason
    detail: str = ""


class SendChunks(msgspec.Struct, frozen=True):
    node: str
    package: str
    version: str
    start: int
    total: int
    chunks: tuple[bytes, ...]


class SendUnknownVersion(msgspec.Struct, frozen=True):
    node: str
    package: str
    version: str


class NewestChanged(msgspec.Struct, frozen=True):
    package: str
    version: str | None


class DropSnapshot(msgspec.Struct, frozen=True):
    package: str
    version: str


Key = tuple[str, str]  # (package, version)


class _Users:
    """Which instances use which version."""

    def __init__(self) -> None:
        self.instances: dict[Key, set[str]] = {}

    def add(self, key: Key, instance_id: str) -> None:
        self.instances.setdefault(key, set()).add(instance_id)

    def discard(self, key: Key, instance_id: str) -> bool:
        """Forget one user; True when that was the last one."""
        users = self.instances.get(key)
        if users is None or instance_id not in users:
            return False
        users.discard(instance_id)
        if not users:
            del self.instances[key]
            return True
        return False

    def __contains__(self, key: Key) -> bool:
        return key in self.instances


def _dispatch(
    machine: Any, handlers: Mapping[type, Callable[[Any], list[Any]]], event: Any
) -> list[Any]:
    handler = handlers.get(type(event))
    if handler is None:
        raise TypeError(f"{type(machine).__name__} cannot handle {type(event).__name__}")
    return handler(event)


# --- node side ---------------------------------------------------------------


class VersionState(Enum):
    CHECKING = "checking"
    FETCHING = "fetching"
    INSTALLING = "installing"
    INSTALLED = "installed"


@dataclass
class _Transfer:
    last_progress: float
    total: int | None = None  # known from the first chunk
    chunks: dict[int, bytes] = field(default_factory=dict)
    in_flight: set[int] = field(default_factory=set)


@dataclass
class _Entry:
    state: VersionState
    requesters: list[str] = field(default_factory=list)
    attempts: int = 0
    transfer: _Transfer | None = None
    idle_since: float | None = None  # set while INSTALLED: when it was last touched


class SyncClientState:
    """The node's view of its package cache: what is installed, fetched, in use."""

    def __init__(
        self,
        *,
        window: int = DEFAULT_WINDOW,
        transfer_timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
        grace_s: float = DEFAULT_GRACE_S,
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    ) -> None:
        if window < 1 or max_attempts < 1:
            raise ValueError("window and max_attempts must be at least 1")
        self.window = window
        self.transfer_timeout_s = transfer_timeout_s
        self.grace_s = grace_s
        self.max_attempts = max_attempts
        self.entries: dict[Key, _Entry] = {}
        self.newest: dict[str, str | None] = {}
        self.users = _Users()
        self._handlers: dict[type, Callable[[Any], list[Any]]] = {
            VersionNeeded: self._on_version_needed,
            CacheChecked: self._on_cache_checked,
            ChunkReceived: self._on_chunk_received,
            TransferFailed: self._on_transfer_failed,
            InstallFinished: self._on_install_finished,
            InstanceStarted: self._on_instance_started,
            InstanceEnded: self._on_instance_ended,
            NewestVersion: self._on_newest_version,
            CachedVersionsFound: self._on_cached_versions_found,
            Tick: self._on_tick,
        }

    def handle(self, event: SyncEvent) -> list[Any]:
        return _dispatch(self, self._handlers, event)

    def state_of(self, package: str, version: str) -> VersionState | None:
        entry = self.entries.get((package, version))
        return entry.state if entry else None

    def validate(self) -> None:
        """Check every invariant; tests call it after each event."""
        for key, entry in self.entries.items():
            waiting = entry.state is not VersionState.INSTALLED
            assert bool(entry.requesters) == waiting, (key, entry)
            assert len(set(entry.requesters)) == len(entry.requesters), (key, entry)
            assert (entry.idle_since is not None) == (not waiting), (key, entry)
            fetching = entry.state is VersionState.FETCHING
            assert (entry.transfer is not None) == fetching, (key, entry)
            assert 0 <= entry.attempts <= self.max_attempts, (key, entry)
            if entry.transfer is not None:
                transfer = entry.transfer
                assert not transfer.in_flight & transfer.chunks.keys(), (key, transfer)
                assert len(transfer.in_flight) <= self.window, (key, transfer)
                if transfer.total is not None:
                    indexes = transfer.in_flight | transfer.chunks.keys()
                    assert all(0 <= i < transfer.total for i in indexes), (key, transfer)

    # -- requests and the cache check

    def _on_version_needed(self, event: VersionNeeded) -> list[Any]:
        key = (event.package, event.version)
        if not (is_valid_package_name(event.package) and is_valid_version(event.version)):
            # Both become folder names in the cache: refuse them before any I/O.
            return [VersionFailed(*key, (event.requester,), "not a valid package name and version")]
        entry = self.entries.get(key)
        if entry is not None and entry.state is not VersionState.INSTALLED:
            if event.requester not in entry.requesters:
                entry.requesters.append(event.requester)
            return []
        # Unknown, or installed: either way the folder is checked before anyone imports it.
        self.entries[key] = _Entry(VersionState.CHECKING, requesters=[event.requester])
        return [VerifyCache(*key)]

    def _on_cache_checked(self, event: CacheChecked) -> list[Any]:
        key = (event.package, event.version)
        entry = self.entries.get(key)
        if entry is None or entry.state is not VersionState.CHECKING:
            return []
        if event.status is CacheStatus.VALID:
            return self._ready(key, entry, event.now)
        out: list[Any] = []
        if event.status is CacheStatus.CORRUPT:
            out.append(RemoveVersion(*key, RemovalReason.CORRUPT, event.detail))
        return out + self._start_transfer(key, entry, event.now)

    # -- the transfer

    def _start_transfer(self, key: Key, entry: _Entry, now: float) -> list[Any]:
        entry.state = VersionState.FETCHING
        entry.attempts += 1
        entry.transfer = _Transfer(last_progress=now)
        return self._top_up(key, entry.transfer)

    def _top_up(self, key: Key, transfer: _Transfer) -> list[Any]:
        """Request missing chunks, lowest first, until ``window`` are in flight."""
        # Until the first chunk says how many there are, only the first window can be asked for.
        end = transfer.total if transfer.total is not None else self.window
        wanted: list[int] = []
        for index in range(end):
            if len(transfer.in_flight) + len(wanted) >= self.window:
                break
            if index not in transfer.chunks and index not in transfer.in_flight:
                wanted.append(index)
        transfer.in_flight.update(wanted)
        requests: list[Any] = []
        for index in wanted:  # one request per contiguous run
            last = requests[-1] if requests else None
            if last is not None and last.start + last.count == index:
                requests[-1] = RequestChunks(*key, last.start, last.count + 1)
            else:
                requests.append(RequestChunks(*key, index, 1))
        return requests

    def _on_chunk_received(self, event: ChunkReceived) -> list[Any]:
        key = (event.package, event.version)
        entry = self.entries.get(key)
        if entry is None or entry.transfer is None:
            return []  # late chunk of a finished or failed transfer
        transfer = entry.transfer
        if not 0 <= event.index < event.total:
            return []
        if transfer.total is None:
            transfer.total = event.total
            transfer.in_flight = {i for i in transfer.in_flight if i < event.total}
        elif event.total != transfer.total:
            # One version always packs to the same archive: a peer mixing two is broken.
            return self._retry_or_fail(
                key, entry, "chunks disagree on the archive size", event.now, keep_chunks=False
            )
        if event.index in transfer.chunks:
            return []
        transfer.chunks[event.index] = event.data
        transfer.in_flight.discard(event.index)
        transfer.last_progress = event.now
        if len(transfer.chunks) < transfer.total:
            return self._top_up(key, transfer)
        archive = b"".join(transfer.chunks[i] for i in range(transfer.total))
        try:
            files = unpack(archive, event.package)
            actual = version_of(files, event.package)
        except PackageIntegrityError as exc:
            return self._retry_or_fail(key, entry, exc.reason, event.now, keep_chunks=False)
        if actual != event.version:
            reason = f"received content hashes to {actual}"
            return self._retry_or_fail(key, entry, reason, event.now, keep_chunks=False)
        entry.state = VersionState.INSTALLING
        entry.transfer = None
        return [Install(*key, tuple(files))]

    def _retry_or_fail(
        self, key: Key, entry: _Entry, reason: str, now: float, *, keep_chunks: bool
    ) -> list[Any]:
        if entry.attempts >= self.max_attempts:
            return self._fail(key, entry, f"{reason} (after {entry.attempts} attempts)")
        if keep_chunks and entry.transfer is not None:
            entry.attempts += 1
            entry.transfer.in_flight.clear()  # ask again for everything still missing
            entry.transfer.last_progress = now
            return self._top_up(key, entry.transfer)
        return self._start_transfer(key, entry, now)

    def _on_transfer_failed(self, event: TransferFailed) -> list[Any]:
        key = (event.package, event.version)
        entry = self.entries.get(key)
        if entry is None or entry.state is not VersionState.FETCHING:
            return []
        return self._fail(key, entry, event.reason)

    def _on_install_finished(self, event: InstallFinished) -> list[Any]:
        key = (event.package, event.version)
        entry = self.entries.get(key)
        if entry is None or entry.state is not VersionState.INSTALLING:
            return []
        if event.ok:
            return self._ready(key, entry, event.now)
        return self._retry_or_fail(
            key, entry, f"install failed: {event.reason}", event.now, keep_chunks=False
        )

    def _ready(self, key: Key, entry: _Entry, now: float) -> list[Any]:
        requesters = tuple(entry.requesters)
        self.entries[key] = _Entry(VersionState.INSTALLED, idle_since=now)
        return [VersionReady(*key, requesters)]

    def _fail(self, key: Key, entry: _Entry, reason: str) -> list[Any]:
        del self.entries[key]  # the next request starts afresh
        return [VersionFailed(*key, tuple(entry.requesters), reason)]

    # -- use and removal

    def _on_instance_started(self, event: InstanceStarted) -> list[Any]:
        self.users.add((event.package, event.version), event.instance_id)
        return []

    def _on_instance_ended(self, event: InstanceEnded) -> list[Any]:
        key = (event.package, event.version)
        if self.users.discard(key, event.instance_id):
            self._touch(key, event.now)
        return []

    def _on_newest_version(self, event: NewestVersion) -> list[Any]:
        # The grace of a version that just stopped being the newest starts now. While the
        # newest was unknown, every version of the package counted as possibly the newest.
        if event.package not in self.newest:
            superseded = [key for key in self.entries if key[0] == event.package]
        else:
            superseded = [(event.package, self.newest[event.package] or "")]
        self.newest[event.package] = event.version
        for key in superseded:
            if key[1] != event.version:
                self._touch(key, event.now)
        return []

    def _on_cached_versions_found(self, event: CachedVersionsFound) -> list[Any]:
        for key in event.versions:
            self.entries.setdefault(key, _Entry(VersionState.INSTALLED, idle_since=event.now))
        return []

    def _touch(self, key: Key, now: float) -> None:
        entry = self.entries.get(key)
        if entry is not None and entry.state is VersionState.INSTALLED:
            entry.idle_since = now

    def _on_tick(self, event: Tick) -> list[Any]:
        out: list[Any] = []
        for key, entry in list(self.entries.items()):
            transfer = entry.transfer
            if (
                transfer is not None
                and event.now - transfer.last_progress >= self.transfer_timeout_s
            ):
                reason = f"no chunk for {event.now - transfer.last_progress:.0f}s"
                out += self._retry_or_fail(key, entry, reason, event.now, keep_chunks=True)
            elif self._collectable(key, entry, event.now):
                del self.entries[key]
                out.append(RemoveVersion(*key, RemovalReason.UNUSED))
        return out

    def _collectable(self, key: Key, entry: _Entry, now: float) -> bool:
        package, version = key
        newest = self.newest.get(package, version)  # newest unknown: keep it
        return (
            entry.state is VersionState.INSTALLED
            and key not in self.users
            and newest != version
            and entry.idle_since is not None
            and now - entry.idle_since >= self.grace_s
        )


# --- master side -------------------------------------------------------------


@dataclass
class _Snapshot:
    package_version: PackageVersion
    idle_since: float


class SyncServerState:
    """The master's catalogue of package versions, and the chunks it serves from it."""

    def __init__(
        self,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        grace_s: float = DEFAULT_GRACE_S,
        max_chunks_per_request: int = DEFAULT_MAX_CHUNKS_PER_REQUEST,
    ) -> None:
        if chunk_size < 1 or max_chunks_per_request < 1:
            raise ValueError("chunk_size and max_chunks_per_request must be at least 1")
        self.chunk_size = chunk_size
        self.grace_s = grace_s
        self.max_chunks_per_request = max_chunks_per_request
        self.snapshots: dict[Key, _Snapshot] = {}
        self.newest: dict[str, str] = {}
        self.users = _Users()
        self._handlers: dict[type, Callable[[Any], list[Any]]] = {
            PackagesScanned: self._on_packages_scanned,
            ChunksRequested: self._on_chunks_requested,
            InstanceQueued: self._on_instance_queued,
            InstanceEnded: self._on_instance_ended,
            Tick: self._on_tick,
        }

    def handle(self, event: SyncEvent) -> list[Any]:
        return _dispatch(self, self._handlers, event)

    def get(self, package: str, version: str) -> PackageVersion | None:
        snapshot = self.snapshots.get((package, version))
        return snapshot.package_version if snapshot else None

    def current(self) -> dict[str, PackageVersion]:
        """The newest version of every package: what the master lists."""
        return {
            package: self.snapshots[(package, version)].package_version
            for package, version in self.newest.items()
        }

    def validate(self) -> None:
        for package, version in self.newest.items():
            assert (package, version) in self.snapshots, (package, version)
        for (package, version), snapshot in self.snapshots.items():
            assert snapshot.package_version.package == package, package
            assert snapshot.package_version.version == version, version

    def _on_packages_scanned(self, event: PackagesScanned) -> list[Any]:
        out: list[Any] = []
        for package, package_version in sorted(event.packages.items()):
            key = (package, package_version.version)
            if key not in self.snapshots:
                self.snapshots[key] = _Snapshot(package_version, idle_since=event.now)
            out += self._set_newest(package, package_version.version, event.now)
        for package in sorted(self.newest.keys() - event.packages.keys()):  # deleted on disk
            out += self._set_newest(package, None, event.now)
        return out

    def _set_newest(self, package: str, version: str | None, now: float) -> list[Any]:
        previous = self.newest.get(package)
        if previous == version:
            return []
        if previous is not None:
            self.snapshots[(package, previous)].idle_since = now  # its grace starts now
        if version is None:
            del self.newest[package]
        else:
            self.newest[package] = version
        return [NewestChanged(package, version)]

    def _on_chunks_requested(self, event: ChunksRequested) -> list[Any]:
        snapshot = self.snapshots.get((event.package, event.version))
        if snapshot is None:
            return [SendUnknownVersion(event.node, event.package, event.version)]
        archive = snapshot.package_version.archive
        total = chunk_count(len(archive), self.chunk_size)
        start = max(event.start, 0)
        stop = min(start + max(min(event.count, self.max_chunks_per_request), 0), total)
        chunks = tuple(chunk_at(archive, i, self.chunk_size) for i in range(start, stop))
        return [SendChunks(event.node, event.package, event.version, start, total, chunks)]

    def _on_instance_queued(self, event: InstanceQueued) -> list[Any]:
        self.users.add((event.package, event.version), event.instance_id)
        return []

    def _on_instance_ended(self, event: InstanceEnded) -> list[Any]:
        key = (event.package, event.version)
        if self.users.discard(key, event.instance_id) and key in self.snapshots:
            self.snapshots[key].idle_since = event.now
        return []

    def _on_tick(self, event: Tick) -> list[Any]:
        out: list[Any] = []
        for key, snapshot in list(self.snapshots.items()):
            package, version = key
            if (
                self.newest.get(package) != version
                and key not in self.users
                and event.now - snapshot.idle_since >= self.grace_s
            ):
                del self.snapshots[key]
                out.append(DropSnapshot(package, version))
        return out
