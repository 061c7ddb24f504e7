"""Giving back the pages of CPython's free small-object pools.

CPython's allocator (pymalloc) carves 1 MiB arenas into 16 KiB pools of equal blocks and
returns an arena to the system only when nothing in it lives. After a burst, a few survivors
in each arena (a counter replaced on a tick, a cache filled in passing) pin it, and its free
pools, every page touched during the burst, stay resident: in a master drained of 10^5 tasks,
~1,400 free pools (23 MB) against 23 MB of live objects (bench/README.md, "Memory after a
drain"). pymalloc never gives a free pool's pages back by itself; ``release`` does, through
the allocator's own calls, without reading or writing anything pymalloc may be using:

1. take 512-byte blocks (the largest size pymalloc serves; 31 fill a pool) from pymalloc until
   it hands out a pool that is not in memory mapped before the call (a new arena: every free
   pool of the old ones is then ours);
2. for each pool all of whose blocks are ours, and whose header reads as pymalloc's own (31
   blocks, no free block, its size class, fully carved) -- nobody else can touch such a pool:
   tell the kernel its pages after the first are not needed (``madvise(MADV_DONTNEED)``, they
   read as zeros when next touched), then set its count to the blocks wholly in the first page;
3. give back those first-page blocks and every block of the other pools (``PyObject_Free``).

The released pools end as free pools whose free list holds only first-page blocks, which is a
state pymalloc handles as it is: reused for 512-byte blocks they serve those few and count as
full, reused for another size they are laid out afresh. The 24 blocks past the first page are
never handed back: pymalloc's count no longer includes them. What stays resident of each
released pool is its first page (its header).

Only where that layout is what this was checked against: CPython with pymalloc on Linux,
64-bit, 4 KiB pages, no allocator debug hooks (``PYTHONMALLOC``, ``-X dev``, a debug build) and
no free-threading. A header that does not read as expected stops the release, and it is not
tried again in this process.
"""

from __future__ import annotations

import bisect
import ctypes
import os
import struct
import sys
import sysconfig

from actors import memory

POOL = 16384  # pymalloc's pool on 64-bit builds since 3.10 (POOL_BITS 14)
BLOCK = 512  # its largest size class
HEAD = 48  # the pool's header, rounded up to its 16-byte alignment
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 0
PER_POOL = (POOL - HEAD) // BLOCK
IN_FIRST_PAGE = (PAGE - HEAD) // BLOCK if PAGE else 0
MAX_POOLS = 1 << 16  # what one call may take: 1 GiB
_MADV_DONTNEED = 4
# count, freeblock, nextpool, prevpool, arenaindex, szidx, nextoffset, maxnextoffset
_HEADER = struct.Struct("=QQQQIIII")

_broken = False  # a header read otherwise than expected: never again in this process


def available() -> bool:
    """Whether this interpreter's allocator is the one ``release`` knows."""
    if _broken or not sys.platform.startswith("linux") or sys.implementation.name != "cpython":
        return False
    if sys.maxsize < 2**32 or PAGE != 4096 or IN_FIRST_PAGE < 2:
        return False
    if sysconfig.get_config_var("WITH_PYMALLOC") != 1 or sysconfig.get_config_var("Py_GIL_DISABLED"):
        return False
    # debug hooks put guard bytes around each block: 512 bytes asked for are no longer 512
    debug = hasattr(sys, "gettotalrefcount") or sys.flags.dev_mode
    return not debug and os.environ.get("PYTHONMALLOC", "pymalloc") in ("", "pymalloc")


class _Calls:
    """The C calls, made holding the interpreter's lock (``ctypes.PyDLL``; ``CDLL`` lets go of
    it), as pymalloc must be called."""

    def __init__(self) -> None:
        api = ctypes.PyDLL(None)
        self.malloc = api.PyObject_Malloc
        self.malloc.restype, self.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        self.free = api.PyObject_Free
        self.free.restype, self.free.argtypes = None, [ctypes.c_void_p]
        self.madvise = api.madvise
        self.madvise.restype = ctypes.c_int
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


_calls: _Calls | None = None


def _mapped() -> tuple[list[int], list[int]]:
    """Where this process has memory mapped now: (starts, ends), sorted."""
    starts, ends = [], []
    with open("/proc/self/maps", "rb") as maps:
        for line in maps:
            low, _, high = line.split(b" ", 1)[0].partition(b"-")
            starts.append(int(low, 16))
            ends.append(int(high, 16))
    return starts, ends


def release(max_pools: int = MAX_POOLS) -> int:
    """Give back the pages of pymalloc's free pools; how many bytes were released (0 where the
    allocator is not the one this knows). Takes ~3 ms per 100 pools, holding the interpreter's
    lock: call it when the process is quiet."""
    global _calls, _broken
    if not available():
        return 0
    calls = _calls = _calls or _Calls()
    starts, ends = _mapped()
    # free pools are resident or few (an arena's uncarved tail): never take more than the
    # process holds, even if a new arena came where something else was just unmapped
    max_pools = min(max_pools, memory.rss_bytes() // POOL + 256)

    def region(address: int) -> int:
        at = bisect.bisect_right(starts, address) - 1
        return at if at >= 0 and address < ends[at] else -1

    blocks: list[int] = []
    ours: dict[int, int] = {}  # pool -> our blocks in it
    released = 0
    try:
        while len(ours) < max_pools:
            block = calls.malloc(BLOCK)
            if not block:
                break
            blocks.append(block)
            pool = block & ~(POOL - 1)
            if pool in ours:
                ours[pool] += 1
                continue
            ours[pool] = 1
            # a pool in memory mapped since the start is a new arena's: every old free pool is
            # ours by now (pymalloc opens an arena only when the others have none)
            if region(pool) < 0 or region(pool) != region(block):
                break
        for pool, taken in ours.items():
            if taken != PER_POOL:
                continue
            header = _HEADER.unpack(ctypes.string_at(pool, HEAD))
            used, freeblock, _, _, _, size_class, next_offset, max_offset = header
            if ((used, freeblock, size_class, max_offset) != (PER_POOL, 0, BLOCK // 16 - 1, POOL - BLOCK)
                    or next_offset <= max_offset):
                _broken = True
                break
            if calls.madvise(pool + PAGE, POOL - PAGE, _MADV_DONTNEED) != 0:
                continue
            ctypes.c_uint.from_address(pool).value = IN_FIRST_PAGE
            ours[pool] = -1  # released: only its first page's blocks go back
            released += POOL - PAGE
    except MemoryError:
        pass  # (near a memory limit: this gives back what it could, the caller goes on)
    finally:
        first_page_end = HEAD + IN_FIRST_PAGE * BLOCK
        for block in blocks:
            if ours.get(block & ~(POOL - 1)) != -1 or (block & (POOL - 1)) < first_page_end:
                calls.free(block)
    return released
