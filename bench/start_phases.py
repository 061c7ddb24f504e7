"""``python -m bench.start_phases [--runs N] [--workers N]``: where a LocalCluster's start goes.

Starts ``--runs`` fresh clusters the way workload 6 does (``LocalCluster``, ``Client``, one no-op
task submitted without waiting for workers), with every process of the cluster logging at debug
level, as JSON, to one file. Prints the median time from the call of ``LocalCluster()`` to each
event the processes log (first and last occurrence, e.g. of the two workers' hello) and to what
the caller sees, then what a fresh interpreter and the imports of each kind of process cost
(the median of as many fresh interpreters). Timestamps are the processes' own wall clocks.

Read the timeline as: master listening (``master_started``) -> the node running
(``worker_spawned``: its imports are done) -> each worker's hello (``worker_up``) ->
``task_assigned`` -> ``task_done`` -> the client's result.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

from bench import units
from bench.system import quiet_stdout

# What a fresh process of each kind imports before it does anything (see actors/launch.py).
IMPORTS = {
    "interpreter only": "pass",
    "master": "import actors.master",
    "node": "import actors.node",
    "worker": "import actors.worker",
}


def _timestamps(path: str) -> Iterator[tuple[str, float]]:
    with open(path, errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                stamp = datetime.datetime.fromisoformat(record["timestamp"].replace("Z", "+00:00"))
            except (ValueError, KeyError, TypeError, AttributeError):
                continue  # the master's banner, a traceback, a line cut short
            yield str(record["event"]), stamp.timestamp()


def one_start(workers: int) -> dict[str, list[float]]:
    """One cold start; seconds since ``LocalCluster()`` of every logged event (each occurrence)."""
    from actors import Client, LocalCluster

    fd, log_path = tempfile.mkstemp(prefix="start-phases-", suffix=".jsonl")
    saved_stderr, saved_format = os.dup(2), os.environ.get("ACTORS_LOG_FORMAT")
    os.environ["ACTORS_LOG_FORMAT"] = "json"
    events: dict[str, list[float]] = {}
    try:
        sys.stderr.flush()
        os.dup2(fd, 2)  # the master inherits it, the node from the master, the workers from it
        t0 = time.time()
        with quiet_stdout():
            cluster = LocalCluster(workers=workers, log_level="debug")
        try:
            events["(caller) LocalCluster returned"] = [time.time() - t0]
            with Client(cluster) as client:
                events["(caller) Client connected"] = [time.time() - t0]
                if client.submit(units.NoopTask, 7).result(timeout=60) != 7:
                    raise RuntimeError("wrong result")
                events["(caller) first result"] = [time.time() - t0]
        finally:
            cluster.close()
    finally:
        sys.stderr.flush()
        os.dup2(saved_stderr, 2)
        os.close(saved_stderr)
        os.close(fd)
        if saved_format is None:
            os.environ.pop("ACTORS_LOG_FORMAT", None)
        else:
            os.environ["ACTORS_LOG_FORMAT"] = saved_format
    for event, stamp in _timestamps(log_path):
        events.setdefault(event, []).append(stamp - t0)
    os.unlink(log_path)
    return events


def import_cost(statement: str) -> float:
    """Wall seconds of a fresh interpreter that runs ``statement`` (fork and exec included)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", statement], check=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.start_phases", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    one_start(args.workers)  # untimed: files into the page cache, as in workload 6
    runs = [one_start(args.workers) for _ in range(args.runs)]
    first: dict[str, list[float]] = {}
    last: dict[str, list[float]] = {}
    for run in runs:
        ended = run["(caller) first result"][0]
        for event, times in run.items():
            if min(times) <= ended:  # the start, not the close
                first.setdefault(event, []).append(min(times))
                last.setdefault(event, []).append(max(t for t in times if t <= ended))
    print(f"LocalCluster(workers={args.workers}) -> first result, median of {args.runs} "
          f"(ms since LocalCluster() was called)")
    print(f"  {'event':<36} {'first':>7} {'last':>7} {'in runs':>8}")
    for event in sorted(first, key=lambda e: statistics.median(first[e])):
        med_first, med_last = statistics.median(first[event]), statistics.median(last[event])
        last_text = f"{1000 * med_last:7.0f}" if med_last - med_first > 0.0005 else ""
        print(f"  {event:<36} {1000 * med_first:7.0f} {last_text:>7} {len(first[event]):>8}")
    print(f"\nfresh interpreters, median of {args.runs} (ms, fork and exec included)")
    for kind, statement in IMPORTS.items():
        cost = statistics.median(import_cost(statement) for _ in range(args.runs))
        print(f"  {kind:<16} {1000 * cost:7.0f}   python -c {statement!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
