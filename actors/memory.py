"""Giving memory back to the system after a backlog drained.

A master that held 10^5 queued tasks keeps, once they are done, the high-water mark: CPython's
dicts never shrink their tables when entries are deleted, and glibc's allocator keeps freed
pages for the next allocation. On a machine several people share, a long-lived master should
return near its idle size: the owners of those tables rebuild them (``compact`` methods), and
``trim`` asks the C allocator to return its free pages.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Any

_libc: Any = None


def trim() -> bool:
    """``malloc_trim(0)`` where the C library has it (glibc); whether it returned memory."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _libc.malloc_trim  # noqa: B018 - raises AttributeError where there is none (musl)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    return bool(_libc.malloc_trim(0))


def rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _page_size()
    except (OSError, ValueError, IndexError):
        return 0


def _page_size() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE")
