"""The master's state directory: its journal and the lock that keeps it to one master.

``<dir>/master.sqlite`` is the journal (``actors/journal.py``); ``<dir>/master.lock`` is held
with ``flock`` for the master's life (the kernel lets go when the process dies, ``kill -9``
included) and names the holder (pid, host, address) for the error a second master gets.
``--take-over`` starts anyway: meant for a master that is hung or paused, which then finds a
newer epoch in the journal at its next commit and stops (``MasterSuperseded``).
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import structlog

from actors.errors import StateDirLocked
from actors.journal import Journal

log = structlog.get_logger("actors.state_dir")

JOURNAL = "master.sqlite"
LOCK = "master.lock"


def default_state_dir(host: str, port: int) -> Path:
    """Per user and per listening address: ``$XDG_STATE_HOME/pydra-actors/master-HOST-PORT``."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "pydra-actors" / f"master-{host}-{port}"


class StateDir:
    def __init__(self, path: str | os.PathLike[str], *, take_over: bool = False) -> None:
        """Lock ``path`` (made if missing); with the lock held by another master, refuse
        (``StateDirLocked``) unless ``take_over``. Nothing in it changes until ``open``: a
        master that then cannot listen leaves the one it would take over serving."""
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        self.locked = self.relock()
        self.holder = ""
        if not self.locked:
            self.holder = os.pread(self._lock, 200, 0).decode(errors="replace").strip() or "unknown"
            if not take_over:
                os.close(self._lock)
                raise StateDirLocked(str(self.path), self.holder)
        self.journal: Journal | None = None

    def open(self, *, fresh: bool = False, durable: bool = True) -> Journal:
        """Open the journal (``fresh``: set an existing one aside first, renamed with the time,
        never deleted; ``durable`` False: one that dies with its master, no fsync). Taking it
        over happens here: the journal's next epoch stops the master that held it."""
        if not self.locked:
            log.warning("state_dir_taken_over", path=str(self.path), holder=self.holder)
        self.write_holder("")
        if fresh:
            self.set_aside()
        self.journal = Journal(self.path / JOURNAL, durable=durable)
        return self.journal

    def relock(self) -> bool:
        """Whether this master holds the lock now (taken if free: after a take-over, once the
        old master is gone, so that a third one is refused again)."""
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if getattr(self, "locked", True) is False:
            log.info("state_dir_locked", path=str(self.path), hint="the master taken over is gone")
        self.locked = True
        return True

    def write_holder(self, address: str) -> None:
        text = f"pid {os.getpid()} on {os.uname().nodename}" + (f" at {address}" if address else "")
        os.ftruncate(self._lock, 0)
        os.pwrite(self._lock, text.encode(), 0)

    def set_aside(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        for suffix in ("", "-wal", "-shm"):
            old = self.path / (JOURNAL + suffix)
            if old.exists():
                aside = self.path / f"{JOURNAL}{suffix}.set-aside-{stamp}"
                old.rename(aside)
                log.warning("journal_set_aside", path=str(old), renamed=str(aside))

    def close(self) -> None:
        if self.journal is not None:
            self.journal.close()
        os.close(self._lock)  # closing the descriptor releases the flock
