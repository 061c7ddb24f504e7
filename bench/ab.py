"""``python -m bench.ab A B``: two trees (or one tree in two settings) measured in interleaved
rounds, so that the host's drift over minutes falls on both alike.

A and B are checkouts of this repository (``git worktree add /tmp/base HEAD~1``), each given as
``PATH`` or ``PATH:NAME=VALUE`` (one environment variable set for that side, e.g.
``.:ACTORS_WORKER_LINKS=1``), or ``pool``: the standard library's process pool of 2 workers
(``bench.peers.PoolRuntime``, as ``python -m bench`` runs it), so that issue 20's ratios to it
(many small tasks >= 1.5x, latency p50 <= 3x) are taken in interleaved rounds too, where the
bench's rows run one runtime's repetitions after the other's. Each side is a process of its
own with a warm 2-worker ``LocalCluster`` (or pool) imported from its tree; the rounds
alternate which side goes first.

- ``--workload latency`` (the default): a round is ``--size`` sequential
  ``submit(...).result()`` of a no-op task; each side's p50 and p90 over all its trips.
- ``--workload many``: a round is one ``client.map`` of ``--size`` no-op tasks, every result
  fetched (the bench's "many small tasks"); each side's median tasks/s over its rounds.

Either way it prints the range of each side's round figures and in how many rounds B did
better than A: a change worth a few per cent shows as a count of rounds well away from half,
where two separate runs of ``python -m bench`` differ by 20-40 % from hour to hour.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

_READY = "ready"
POOL = "pool"  # a side that is the process pool, not a tree
_SIZES = {"latency": 200, "many": 2_000}


def child(workload: str, size: int, runtime: str = "actors") -> int:
    """One side: a warm cluster (or pool), then a round for each ``go`` line: the seconds of
    each trip (latency) or of the whole map (many), on one line."""
    from bench.peers import ActorsRuntime, PoolRuntime

    with (PoolRuntime() if runtime == POOL else ActorsRuntime()).open(2) as session:
        for _ in range(300):
            session.roundtrip()
        session.submit_each(400)
        print(_READY, flush=True)
        for line in sys.stdin:
            if line.strip() != "go":
                break
            taken = []
            if workload == "many":
                start = time.perf_counter()
                session.submit_each(size)
                taken.append(time.perf_counter() - start)
            else:
                for _ in range(size):
                    start = time.perf_counter()
                    session.roundtrip()
                    taken.append(time.perf_counter() - start)
            print(" ".join(f"{t:.7f}" for t in taken), flush=True)
    return 0


def _start(spec: str, workload: str, size: int) -> subprocess.Popen[str]:
    runtime = POOL if spec == POOL else "actors"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # (this bench's tree)
    path, _, setting = (here if spec == POOL else spec).partition(":")
    path = os.path.abspath(path)
    env = dict(os.environ, PYTHONPATH=path)
    if setting:
        name, _, value = setting.partition("=")
        env[name] = value
    # This file run by its path (the side's tree may predate it), the side's tree first on the
    # path: its bench.peers, actors and transport are what the cluster runs.
    side = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--child", workload, "--size", str(size),
         "--runtime", runtime],
        cwd=path, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True)
    assert side.stdout is not None
    if side.stdout.readline().strip() != _READY:
        side.kill()
        side.wait()
        raise SystemExit(f"{spec}: its cluster did not start")
    return side


def _round(side: subprocess.Popen[str]) -> list[float]:
    assert side.stdin is not None and side.stdout is not None
    side.stdin.write("go\n")
    side.stdin.flush()
    return [float(x) for x in side.stdout.readline().split()]


def _stop(side: subprocess.Popen[str]) -> None:
    assert side.stdin is not None and side.stdout is not None
    side.stdin.write("stop\n")
    side.stdin.flush()
    try:
        side.wait(30)
    except subprocess.TimeoutExpired:
        side.kill()
        side.wait()
    side.stdin.close()
    side.stdout.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sides", nargs="*", metavar="SIDE",
                        help="PATH, PATH:NAME=VALUE or pool (the process pool), two")
    parser.add_argument("--workload", choices=sorted(_SIZES), default="latency")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--size", type=int, help="trips a round (latency, default 200) or tasks "
                                                 "a round (many, default 2,000)")
    parser.add_argument("--child", choices=sorted(_SIZES), help=argparse.SUPPRESS)
    parser.add_argument("--runtime", choices=("actors", POOL), default="actors",
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = args.size or _SIZES[args.child or args.workload]
    if args.child is not None:
        return child(args.child, size, args.runtime)
    if len(args.sides) != 2:
        parser.error("two sides: A B")
    many = args.workload == "many"
    sides: list[subprocess.Popen[str]] = []
    taken: list[list[float]] = [[], []]
    figures: list[list[float]] = [[], []]  # a round's: median trip (us), or tasks/s
    try:
        for spec in args.sides:
            sides.append(_start(spec, args.workload, size))
        for number in range(args.rounds):
            for index in ((0, 1) if number % 2 == 0 else (1, 0)):
                seconds = _round(sides[index])
                taken[index] += seconds
                figure = size / seconds[0] if many else 1e6 * statistics.median(seconds)
                figures[index].append(figure)
                print(f"round {number + 1}: {args.sides[index]} "
                      + (f"{figure:,.0f} tasks/s" if many else f"median {figure:.0f} us"),
                      file=sys.stderr)
    finally:
        for side in sides:
            _stop(side)
    for index, spec in enumerate(args.sides):
        low, high = min(figures[index]), max(figures[index])
        if many:
            print(f"{spec}: median {statistics.median(figures[index]):,.0f} tasks/s over "
                  f"{args.rounds} rounds of {size}; rounds {low:,.0f}-{high:,.0f}")
        else:
            ordered = sorted(taken[index])
            print(f"{spec}: p50 {1e6 * ordered[len(ordered) // 2]:.0f} us, p90 "
                  f"{1e6 * ordered[int(len(ordered) * 0.9)]:.0f} us over {len(ordered)} trips; "
                  f"round medians {low:.0f}-{high:.0f} us")
    better = sum((b > a) if many else (b < a)
                 for a, b in zip(figures[0], figures[1], strict=True))
    print(f"B better than A in {better} of {args.rounds} rounds")
    # each round's B against the A next to it (the same minute), then their median: with
    # A the pool, issue 20's ratios (tasks/s >= 1.5x; a trip's median <= 3x)
    ratios = sorted(b / a for a, b in zip(figures[0], figures[1], strict=True))
    what = "tasks/s" if many else "median trip"
    print(f"B / A a round ({what}): median {statistics.median(ratios):.2f}x, "
          f"rounds {ratios[0]:.2f}-{ratios[-1]:.2f}x")
    return 0


if __name__ == "__main__":
    if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # (run by its path: bench/ itself is no place to import from)
    sys.exit(main())
