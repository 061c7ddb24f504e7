"""TaskSync actor shells: the server in the master, a client in each node.

Both are thin: they turn messages and ticks into events for the sans-I/O
machines in ``actors.core.sync_state`` and carry out the instructions (send
chunks, write the cache, answer waiting workers). See that module for the
rules: one transfer per version, verification before every use, removal of
unused old versions after a grace period.
"""

from __future__ import annotations

import os
import time
from typing import Any

import msgspec
import pykka
import structlog

from actors import logs
from actors import messages as m
from actors.core import sync_state as ss
from actors.core.packages import PackageVersion
from actors.errors import ActorsError
from actors.package_store import NodeCache, scan_tasks_dir
from actors.shell import Inbound, Shell, Tick
from transport import Hub

log = structlog.get_logger("actors.task_sync")

RESCAN_S = 1.0


# --- master side --------------------------------------------------------------


class Catalogue(msgspec.Struct, frozen=True):
    """What the server tells the Master after each scan that changed something."""

    packages: dict[str, PackageVersion]


class InstanceUses(msgspec.Struct, frozen=True):
    """From the Master: a task instance pinned (``ended=False``) or released a version."""

    package: str
    version: str
    task_id: str
    ended: bool


class TaskSyncServer(Shell):
    def __init__(self, hub: Hub, tasks_dir: str, master: pykka.ActorRef[Any], *,
                 grace_s: float = 300.0) -> None:
        super().__init__(hub)
        self.tasks_dir = tasks_dir
        self.master = master
        self.state = ss.SyncServerState(grace_s=grace_s)
        self.signature: tuple[Any, ...] | None = None
        self.last_scan = -RESCAN_S
        self.log = log.bind(role="task_sync_server", tasks_dir=tasks_dir)

    def on_start(self) -> None:
        super().on_start()
        self._rescan(0.0)

    def receive(self, message: Any) -> Any:
        match message:
            case Tick(now=now):
                if now - self.last_scan >= RESCAN_S:
                    self._rescan(now)
                self._apply(ss.Tick(now=now))
            case Inbound(peer=peer, message=m.ChunkRequest() as req):
                self._apply(ss.ChunksRequested(peer.decode(errors="replace"), req.package,
                                               req.version, req.start, req.count, now=_now()))
            case InstanceUses(package=package, version=version, task_id=task_id, ended=ended):
                event = ss.InstanceEnded if ended else ss.InstanceQueued
                self._apply(event(package, version, task_id, now=_now()))
            case _:
                raise TypeError(f"task sync server got an unknown message: {message!r}")
        return None

    def _rescan(self, now: float) -> None:
        self.last_scan = now
        signature = _tree_signature(self.tasks_dir)
        if signature == self.signature:
            return  # nothing on disk changed: no hashing
        self.signature = signature
        result = scan_tasks_dir(self.tasks_dir) if os.path.isdir(self.tasks_dir) else None
        packages = result.packages if result else {}
        for folder, why in (result.skipped.items() if result else ()):
            self.log.warning("package_skipped", folder=folder, reason=why)
        for name, pv in packages.items():
            for broken in pv.listing.broken:
                self.log.warning("package_module_broken", package=name, module=broken.module,
                                 error=broken.error)
        self._apply(ss.PackagesScanned(packages, now=now))
        self.master.tell(Catalogue(dict(self.state.current())))

    def _apply(self, event: ss.SyncEvent) -> None:
        for ins in self.state.handle(event):
            match ins:
                case ss.SendChunks():
                    self.send("peers", ins.node.encode(), message=m.ChunkReply(
                        ins.package, ins.version, ins.start, ins.total, list(ins.chunks)))
                case ss.SendUnknownVersion():
                    self.send("peers", ins.node.encode(),
                              message=m.UnknownVersion(ins.package, ins.version))
                case ss.NewestChanged(package=package, version=version):
                    self.log.info("package_version", package=package, version=version)
                case ss.DropSnapshot(package=package, version=version):
                    self.log.info("package_snapshot_dropped", package=package, version=version)
                case _:
                    raise TypeError(f"unknown sync server instruction {ins!r}")


def _tree_signature(root: str) -> tuple[Any, ...]:
    """A cheap fingerprint (paths, sizes, mtimes) so unchanged trees are not re-hashed."""
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in sorted(filenames):
            try:
                st = os.stat(os.path.join(dirpath, name))
            except OSError:
                continue
            entries.append((dirpath, name, st.st_size, st.st_mtime_ns))
    return tuple(entries)


def _now() -> float:
    return time.monotonic()


# --- node side ------------------------------------------------------------------


class WorkerGone(msgspec.Struct, frozen=True):
    worker_id: str


class TaskSyncClient(Shell):
    def __init__(self, hub: Hub, cache_dir: str, *, grace_s: float = 300.0) -> None:
        super().__init__(hub)
        self.cache = NodeCache(cache_dir)
        self.state = ss.SyncClientState(grace_s=grace_s)
        self.users: dict[str, tuple[str, str]] = {}  # worker id -> (package, version) it imported
        self.refusals = logs.Refusals()  # what each worker sent that we refused (logged 1, 2, 4..)
        self.log = log.bind(role="task_sync_client", cache=cache_dir)

    def on_start(self) -> None:
        super().on_start()
        self.cache.remove_leftovers()
        self._apply(ss.CachedVersionsFound(tuple(self.cache.installed()), now=_now()))

    def receive(self, message: Any) -> Any:
        now = _now()
        match message:
            case Tick(now=now):
                self._apply(ss.Tick(now=now))
            case Inbound(peer=b"", message=msg):
                self._from_master(msg, now)
            case Inbound(peer=worker, message=m.NeedVersion(package=package, version=version)):
                self._apply(ss.VersionNeeded(package, version, worker.decode(), now=now))
            case WorkerGone(worker_id=worker_id):
                self.refusals.forget(worker_id)
                if (used := self.users.pop(worker_id, None)) is not None:
                    self._apply(ss.InstanceEnded(*used, worker_id, now=now))
            case Inbound(peer=worker, message=msg):  # a worker (its task's code) may send anything
                worker_id = worker.decode(errors="replace")
                if refused := self.refusals.count(worker_id):
                    self.log.warning("unexpected_message", worker_id=worker_id,
                                     type=type(msg).__name__, refused=refused)
            case _:
                raise TypeError(f"task sync client got an unknown message: {message!r}")
        return None

    def _from_master(self, msg: m.Message, now: float) -> None:
        match msg:
            case m.ChunkReply(package=package, version=version, start=start, total=total):
                for offset, data in enumerate(msg.chunks):
                    self._apply(ss.ChunkReceived(package, version, start + offset, total, data,
                                                 now=now))
            case m.UnknownVersion(package=package, version=version):
                self._apply(ss.TransferFailed(package, version, "the master no longer has it",
                                              now=now))
            case m.NewestVersions(versions=versions):
                for name, newest in versions:
                    self._apply(ss.NewestVersion(name, newest, now=now))
            case _:
                self.log.warning("unexpected_message", type=type(msg).__name__)

    def _apply(self, event: ss.SyncEvent) -> None:
        pending = [event]
        while pending:
            for ins in self.state.handle(pending.pop(0)):
                pending.extend(self._carry_out(ins))

    def _carry_out(self, ins: Any) -> list[ss.SyncEvent]:
        """Do one instruction; return the events it produced (disk results feed back in)."""
        match ins:
            case ss.VerifyCache(package=package, version=version):
                status, detail = self.cache.check(package, version)
                if status == ss.CacheStatus.CORRUPT:
                    self.log.warning("package_cache_corrupt", package=package, version=version,
                                     detail=detail)
                return [ss.CacheChecked(package, version, status, detail, now=_now())]
            case ss.RequestChunks(package=package, version=version, start=start, count=count):
                self.send("master", message=m.ChunkRequest(package, version, start, count))
            case ss.Install(package=package, version=version, files=files):
                try:
                    self.cache.install(package, version, files)
                except (ActorsError, OSError) as exc:
                    return [ss.InstallFinished(package, version, False, str(exc), now=_now())]
                self.log.info("package_installed", package=package, version=version)
                return [ss.InstallFinished(package, version, True, now=_now())]
            case ss.VersionReady(package=package, version=version, requesters=requesters):
                path = str(self.cache.path_for(package, version))
                for worker in requesters:
                    self.users[worker] = (package, version)
                    self.send("workers", worker.encode(), message=m.VersionAvailable(
                        package, version, True, path))
                return [ss.InstanceStarted(package, version, w, now=_now()) for w in requesters]
            case ss.VersionFailed(package=package, version=version, requesters=requesters,
                                  reason=reason):
                self.log.warning("package_unavailable", package=package, version=version,
                                 reason=reason)
                for worker in requesters:
                    self.send("workers", worker.encode(), message=m.VersionAvailable(
                        package, version, False, reason=reason))
            case ss.RemoveVersion(package=package, version=version, reason=reason):
                self.cache.remove(package, version)
                self.log.info("package_version_removed", package=package, version=version,
                              reason=str(reason))
            case _:
                raise TypeError(f"unknown sync client instruction {ins!r}")
        return []

