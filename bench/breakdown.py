"""``python -m bench.breakdown WORKLOAD [N]``: where pydra-actors spends CPU per unit or task.

Runs one workload on a warm 2-worker ``LocalCluster`` and prints, for the client and every
process of the cluster (master, node, workers), the CPU time (user + system, all threads, from
``/proc/<pid>/stat``) it spent per item, and its threads' context switches per item (each a
hand-off between threads or a wake-up). The sum is what the cores must supply per item; set
against the wall time per item it tells a CPU-bound path from one that waits. Pair it with
``py-spy record --gil --threads -p PID`` on the pids it prints to see the functions.

Workloads: ``tiny`` (no-op units of one ParallelTask), ``many`` (independent no-op tasks),
``batch`` (the same as ``client.map_batch``), ``latency`` (sequential round trips), ``sleep``
(10 ms sleep units).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.peers import ActorsRuntime, Session

_TICKS = os.sysconf("SC_CLK_TCK")
DEFAULT_SIZES = {"tiny": 20_000, "many": 2_000, "batch": 20_000, "latency": 300, "sleep": 200}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime


def context_switches(pid: int) -> int:
    """Voluntary and involuntary switches of every thread: each is a hand-off or a wake-up."""
    total = 0
    for thread in Path(f"/proc/{pid}/task").iterdir():
        try:
            for line in (thread / "status").read_text().splitlines():
                if "ctxt_switches:" in line:
                    total += int(line.split(":")[1])
        except OSError:  # a thread that ended meanwhile
            continue
    return total


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return sorted(found)


def cluster_processes(master_pid: int) -> dict[str, int]:
    """Master and its local node's workers, by role (the node runs inside the master: its CPU
    is the master's), or, with ``--local-node process``, its node and that node's workers;
    plus this process, the client."""
    named = {"client": os.getpid(), "master": master_pid}
    for i, child in enumerate(children(master_pid)):
        if below := children(child):  # a node process (a worker running a no-op has none)
            named[f"node{i}"] = child
            for j, worker in enumerate(below):
                named[f"node{i}/worker{j}"] = worker
        else:
            named[f"worker{i}"] = child
    return named


def workload(name: str, n: int, session: Session) -> Callable[[], None]:
    if name == "tiny":
        return lambda: session.map_units("noop", n)
    if name == "sleep":
        return lambda: session.map_units("sleep_10ms", n)
    if name == "many":
        return lambda: session.submit_each(n)
    if name == "batch":
        return lambda: session.submit_batch(n)

    def round_trips() -> None:
        for _ in range(n):
            session.roundtrip()

    return round_trips


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.breakdown", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=sorted(DEFAULT_SIZES))
    parser.add_argument("n", type=int, nargs="?", help="items (default depends on the workload)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    n = args.n or DEFAULT_SIZES[args.workload]
    with ActorsRuntime().open(args.workers) as session:
        assert session.master_pid is not None
        run = workload(args.workload, n, session)
        run()  # warm-up: warm workers, imported code, sized batches
        pids = cluster_processes(session.master_pid)
        before = {role: cpu_seconds(pid) for role, pid in pids.items()}
        switches = {role: context_switches(pid) for role, pid in pids.items()}
        start = time.perf_counter()
        run()
        wall = time.perf_counter() - start
        spent = {role: cpu_seconds(pid) - before[role] for role, pid in pids.items()}
        switches = {role: context_switches(pid) - switches[role] for role, pid in pids.items()}
    print(f"{args.workload}: {n} items in {wall:.3f} s = {n / wall:,.0f}/s, "
          f"{1e6 * wall / n:,.1f} us of wall time per item")
    for role, seconds in spent.items():
        print(f"  {role:<16} pid {pids[role]:<8} {seconds:7.2f} s CPU  "
              f"{1e6 * seconds / n:9.1f} us/item  {switches[role] / n:5.1f} switches/item")
    total = sum(spent.values())
    print(f"  {'all':<16} {'':<12} {total:7.2f} s CPU  {1e6 * total / n:9.1f} us/item "
          f"(of {len(os.sched_getaffinity(0)) * wall:.2f} s the cores had)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
