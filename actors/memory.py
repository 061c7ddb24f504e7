"""Giving memory back to the system after a backlog drained; sealed memory files.

A master that held 10^5 queued tasks keeps, once they are done, the high-water mark: CPython's
dicts never shrink their tables when entries are deleted, and glibc's allocator keeps freed
pages for the next allocation. On a machine several people share, a long-lived master should
return near its idle size: the owners of those tables rebuild them (``compact`` methods), and
``trim`` asks the C allocator to return its free pages; what CPython's own small-object allocator
keeps of a burst, ``free_pools.release`` gives back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import secrets
from typing import Any

_libc: Any = None


def _glibc() -> Any:
    """glibc's allocator calls, or False where the C library has none (musl, macOS)."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 - raises AttributeError where there is none (musl)
            _libc.mallopt  # noqa: B018
        except (OSError, AttributeError):
            _libc = False
    return _libc


def trim() -> bool:
    """``malloc_trim(0)`` where the C library has it (glibc); whether it returned memory."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc else False


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's most: larger blocks are always mapped afresh
TRIM_THRESHOLD = 256 << 20


def keep_large_blocks() -> bool:
    """For a worker, whose results and inputs are often megabytes: blocks up to 32 MiB come from
    the heap and freed ones stay there for the next (up to 256 MiB), instead of being mapped
    and unmapped each time, every page faulted in again (a fresh worker's first large results
    ran at half the speed of later ones). What stays is returned when the worker passes its
    pause mark (``trim``). Whether glibc took the settings."""
    libc = _glibc()
    if not libc:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    used = usage(os.getpid())
    return used[1] if used is not None else 0


_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds used, resident bytes) of a process, from /proc; None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
        with open(f"/proc/{pid}/statm", "rb") as statm:
            resident = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    # after "(comm)": state is field 3, so utime (14) and stime (15) are at 11 and 12 here
    return (int(fields[11]) + int(fields[12])) / _TICKS, resident * _PAGE


#: What a memory file handed to another process is sealed against: once sealed it can never
#: change, so a reader's mapping cannot lose its pages under it (SIGBUS) or see other bytes.
SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def sealed_file(parts: list[Any], prefix: str) -> tuple[int, str] | None:
    """``parts`` (buffers) end to end in a new memory file (Linux ``memfd``) named
    ``<prefix>-<nonce> ``, sealed; (descriptor, nonce), or None where that cannot be had."""
    if not hasattr(os, "memfd_create"):
        return None
    nonce = secrets.token_hex(8)
    try:
        fd = os.memfd_create(f"{prefix}-{nonce}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError:
        return None
    try:
        write_all(fd, parts)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS)
    except OSError:
        os.close(fd)
        return None
    return fd, nonce


def write_all(fd: int, parts: list[Any]) -> None:
    """Every byte of ``parts`` (buffers), end to end (a single write may take less)."""
    for part in parts:
        with memoryview(part) as view, view.cast("B") as raw:
            written = 0
            while written < len(raw):
                written += os.write(fd, raw[written:])
