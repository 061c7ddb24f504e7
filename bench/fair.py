"""``python -m bench.fair``: many clients at once, how evenly are they served? (issue 23)

A local cluster of ``--workers`` workers; ``--procs`` processes of ``--threads`` clients each
(one key, as people on one cluster share a key folder here) submit ``--tasks`` small tasks each,
all starting at the same moment. Printed: when each client got its first result and its last,
from that moment: the spread (slowest / fastest client) of first results, the range of
completions, and the total time. First come, first served makes whole clients wait behind
others; a fair share gives every client its first result early. Absolute times drift with the
machine: compare the spreads of two builds run one after the other.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import threading
import time
from typing import Any

from actors import Client, LocalCluster, Task


class Small(Task):
    def work(self, i):
        return i + 1


def _clients(address: str, keys: str, threads: int, tasks: int, start: float, out: Any) -> None:
    """One process: ``threads`` clients submitting at ``start``; (first, last) per client."""
    times: list[tuple[float, float]] = []
    lock = threading.Lock()

    def one() -> None:
        with Client(address, keys=keys) as client:
            client.submit(Small, 0).result(60)  # connected, code shipped: only the burst is timed
            while time.time() < start:
                time.sleep(0.001)
            futures = [client.submit(Small, i) for i in range(tasks)]
            futures[0].result(120)
            first = time.time() - start
            for future in futures:
                future.result(120)
            with lock:
                times.append((first, time.time() - start))

    running = [threading.Thread(target=one) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    out.put(times)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fair", description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--procs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=100)
    args = parser.parse_args()
    with LocalCluster(workers=args.workers, log_level="warning") as cluster:
        with Client(cluster) as client:
            client.wait_for_workers(args.workers, 60)
        start = time.time() + 3.0 + 0.3 * args.procs  # every client connected by then
        out: Any = mp.get_context("spawn").Queue()
        procs = [mp.get_context("spawn").Process(
            target=_clients, args=(cluster.address, str(cluster.keys_dir), args.threads,
                                   args.tasks, start, out)) for _ in range(args.procs)]
        for proc in procs:
            proc.start()
        times = [t for _ in procs for t in out.get(timeout=600)]
        for proc in procs:
            proc.join(60)
    firsts = sorted(f for f, _ in times)
    lasts = sorted(last for _, last in times)
    print(f"{len(times)} clients x {args.tasks} tasks on {args.workers} workers")
    print(f"first result: fastest {firsts[0]:.2f} s, median {statistics.median(firsts):.2f} s, "
          f"slowest {firsts[-1]:.2f} s: spread {firsts[-1] / firsts[0]:.1f}x")
    print(f"last result:  fastest {lasts[0]:.2f} s, slowest {lasts[-1]:.2f} s: "
          f"spread {lasts[-1] / lasts[0]:.1f}x; all done in {lasts[-1]:.2f} s")


if __name__ == "__main__":
    main()
