"""free_pools: the pages of CPython's free small-object pools go back to the system, and
nothing that lives is touched. Each case runs in a child process (a crash there is the
failure this guards against, and its memory is its own to measure)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any

import pytest

from actors import free_pools

pytestmark = pytest.mark.skipif(not free_pools.available(),
                                reason="pymalloc on 64-bit Linux only (this interpreter differs)")

# A burst of small objects of every size pymalloc serves, one in 2,000 kept: each arena keeps a
# few survivors and its free pools stay resident.
BURST = """
import gc, hashlib, json, pickle, sys, threading, random
from actors import free_pools
from actors.memory import rss_bytes as rss

def burst(n):
    made = [{"k": i, "v": str(i) * 3, "t": (i, float(i)), "b": b"y" * (i % 500)}
            for i in range(n)]
    kept = made[::2000]
    del made
    gc.collect()
    return kept

def digest(value):
    return hashlib.sha256(pickle.dumps(value)).hexdigest()
"""


def run(script: str, *flags: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run([sys.executable, *flags, "-c", BURST + textwrap.dedent(script)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, f"child ended {done.returncode}: {done.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_after_a_burst_the_free_pools_pages_go_back_and_what_lives_is_as_it_was() -> None:
    out = run("""
        idle = rss()
        kept = burst(300_000)
        before, settled = digest(kept), rss()
        released = free_pools.release()
        after = rss()
        print(json.dumps({"idle": idle, "settled": settled, "released": released,
                          "after": after, "same": digest(kept) == before}))
    """)
    burst_left = out["settled"] - out["idle"]
    assert burst_left > 50 << 20, out  # the burst did leave its free pools behind
    assert out["released"] > burst_left // 3, out
    # what is said to be released was resident: the process shrinks by (nearly) as much
    assert out["settled"] - out["after"] > out["released"] * 0.8, out
    assert out["same"]


def test_released_pools_serve_every_size_again_and_the_allocator_counts_true() -> None:
    """A released pool is reused for its own size (512-byte blocks: only its first page's are
    left) and for every other; pymalloc's count of blocks in use comes back to where it was,
    so no block is counted that is not in use, none in use is handed out twice, and a second
    release after the reuse finds the pools again."""
    out = run("""
        warm = burst(1_000)
        digest(warm)
        gc.collect()
        base = sys.getallocatedblocks()
        survivors = burst(300_000)
        before = digest(survivors)
        released = [free_pools.release()]
        for size in (0, 8, 100, 300, 470):  # bytes of 33 + size: small classes up to 512
            again = [b"z" * size + i.to_bytes(4, "little") for i in range(200_000)]
            assert all(v[-4:] == i.to_bytes(4, "little") for i, v in enumerate(again))
            del again
        more = burst(300_000)
        del more
        gc.collect()
        released.append(free_pools.release())
        same = digest(survivors) == before
        del survivors
        gc.collect()
        print(json.dumps({"released": released, "same": same, "base": base,
                          "blocks": sys.getallocatedblocks(), "broken": free_pools._broken}))
    """)
    assert all(r > 10 << 20 for r in out["released"]), out
    assert out["same"] and not out["broken"]
    # each released pool had 24 of its 31 blocks taken out of the count: if they still
    # counted, 10^3 pools would leave 24,000 blocks behind
    assert abs(out["blocks"] - out["base"]) < 2_000, out


def test_other_threads_allocating_meanwhile_lose_nothing() -> None:
    """The master's other threads (the hub, pykka's actors) allocate while it releases: each
    release holds the interpreter's lock only for single calls, so they run between them."""
    out = run("""
        stop, errors, rounds = False, [], [0, 0, 0]

        def churn(seed):
            r = random.Random(seed)
            live = []
            try:
                while not stop:
                    for _ in range(2000):
                        n = r.randrange(0, 600)
                        live.append((b"x" * n, n, [n] * (n % 7)))
                    r.shuffle(live)
                    for item in live[:1500]:
                        assert len(item[0]) == item[1] and item[2] == [item[1]] * (item[1] % 7)
                    del live[:1500]
                    rounds[seed] += 1
            except Exception as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=churn, args=(i,)) for i in range(3)]
        for thread in threads:
            thread.start()
        released = []
        for _ in range(4):
            kept = burst(150_000)
            before = digest(kept)
            released.append(free_pools.release())
            assert digest(kept) == before
        stop = True
        for thread in threads:
            thread.join(60)
        print(json.dumps({"released": released, "errors": errors, "rounds": rounds}))
    """)
    assert out["errors"] == [] and all(out["rounds"]), out
    assert sum(out["released"]) > 0, out


@pytest.mark.parametrize("setting", [{"PYTHONMALLOC": "malloc"}, {"PYTHONMALLOC": "pymalloc_debug"},
                                     {"PYTHONDEVMODE": "1"}])
def test_where_the_allocator_is_another_nothing_is_tried(setting: dict[str, str]) -> None:
    import os

    out = run("""
        kept = burst(100_000)
        print(json.dumps({"available": free_pools.available(), "released": free_pools.release()}))
    """, env={**os.environ, **setting})
    assert out == {"available": False, "released": 0}
