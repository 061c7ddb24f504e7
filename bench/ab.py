"""``python -m bench.ab A B``: lone round trips of two trees (or one tree in two settings), taken
in interleaved rounds, so that the host's drift over minutes falls on both alike.

A and B are checkouts of this repository (``git worktree add /tmp/base HEAD~1``), each given as
``PATH`` or ``PATH:NAME=VALUE`` (one environment variable set for that side, e.g.
``.:ACTORS_WORKER_LINKS=1``). Each side is a process of its own with a warm 2-worker
``LocalCluster`` imported from its tree; the rounds alternate which side goes first, and each
round is ``--trips`` sequential ``submit(...).result()`` of a no-op task. Prints each side's
p50 and p90 over all its trips, the range of its round medians, and in how many rounds B's
median was below A's: a change that moves the p50 by a few per cent shows as a count of rounds
well away from half, where two separate runs of ``python -m bench --only latency`` differ by
20-40 % from hour to hour.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

_READY = "ready"


def child(trips: int) -> int:
    """One side: a warm cluster, then a round of ``trips`` round trips for each ``go`` line."""
    from bench.peers import ActorsRuntime

    with ActorsRuntime().open(2) as session:
        for _ in range(300):
            session.roundtrip()
        print(_READY, flush=True)
        for line in sys.stdin:
            if line.strip() != "go":
                break
            taken = []
            for _ in range(trips):
                start = time.perf_counter()
                session.roundtrip()
                taken.append(time.perf_counter() - start)
            print(" ".join(f"{1e6 * t:.1f}" for t in taken), flush=True)
    return 0


def _start(spec: str, trips: int) -> subprocess.Popen[str]:
    path, _, setting = spec.partition(":")
    path = os.path.abspath(path)
    env = dict(os.environ, PYTHONPATH=path)
    if setting:
        name, _, value = setting.partition("=")
        env[name] = value
    # This file run by its path (the side's tree may predate it), the side's tree first on the
    # path: its bench.peers, actors and transport are what the cluster runs.
    side = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--child", str(trips)],
                            cwd=path,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert side.stdout is not None
    if side.stdout.readline().strip() != _READY:
        side.kill()
        raise SystemExit(f"{spec}: its cluster did not start")
    return side


def _round(side: subprocess.Popen[str]) -> list[float]:
    assert side.stdin is not None and side.stdout is not None
    side.stdin.write("go\n")
    side.stdin.flush()
    return [float(x) for x in side.stdout.readline().split()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sides", nargs="*", metavar="SIDE", help="PATH or PATH:NAME=VALUE, two")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--trips", type=int, default=200, help="round trips a side a round")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.child)
    if len(args.sides) != 2:
        parser.error("two sides: A B")
    sides: list[subprocess.Popen[str]] = []
    trips: list[list[float]] = [[], []]
    medians: list[list[float]] = [[], []]
    try:
        for spec in args.sides:
            sides.append(_start(spec, args.trips))
        for number in range(args.rounds):
            for index in ((0, 1) if number % 2 == 0 else (1, 0)):
                taken = _round(sides[index])
                trips[index] += taken
                medians[index].append(statistics.median(taken))
                print(f"round {number + 1}: {args.sides[index]} median {medians[index][-1]:.0f} us",
                      file=sys.stderr)
    finally:
        for side in sides:
            assert side.stdin is not None
            side.stdin.write("stop\n")
            side.stdin.flush()
            try:
                side.wait(30)
            except subprocess.TimeoutExpired:
                side.kill()
                side.wait()
            side.stdin.close()
            assert side.stdout is not None
            side.stdout.close()
    for index, spec in enumerate(args.sides):
        ordered = sorted(trips[index])
        print(f"{spec}: p50 {ordered[len(ordered) // 2]:.0f} us, p90 "
              f"{ordered[int(len(ordered) * 0.9)]:.0f} us over {len(ordered)} trips; round "
              f"medians {min(medians[index]):.0f}-{max(medians[index]):.0f} us")
    faster = sum(b < a for a, b in zip(medians[0], medians[1], strict=True))
    print(f"B below A in {faster} of {args.rounds} rounds")
    return 0


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # (run by its path: bench/ itself is no place to import from)
    sys.exit(main())
