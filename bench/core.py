"""``python -m bench.core [TREE ...]``: the scheduler's core alone, in process, per plain Task.

No master, no sockets: a ``SchedulerState`` with ``--workers`` workers on 20 nodes is fed what
a busy master feeds it, bursts of ``--burst`` plain Tasks submitted in one ``handle_many``
(their pass after them), then each task's end as its own ``handle`` (a pass each, as a lone
end is), until every task of the burst ended. It prints the best of ``--repeats`` runs of
``--rounds`` bursts, in microseconds a task: what the core itself costs, which the simulated
master (``bench.simulate``) and the many-small-tasks row include with everything else.

Given trees (checkouts of this repository, ``git worktree add /tmp/base HEAD~1``), it runs the
same measure in each, in turn, ``--pairs`` times, so that a change to the core is seen against
its base in the same minutes (the host's drift is as large as most such changes).
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time


def measure(workers: int, burst: int, rounds: int) -> float:
    """Microseconds a task: the best round of ``rounds`` bursts on one scheduler."""
    from actors.core import scheduler_events as ev
    from actors.core.scheduler_state import SchedulerState
    from actors.messages import UnitOutcome

    state = SchedulerState()
    now = 0.0
    for node in range(20):
        state.handle(ev.NodeJoined(now, f"n{node}"))
    for worker in range(workers):
        state.handle(ev.WorkerReady(now, f"n{worker % 20}", f"w{worker}"))
    seq, best = 0, float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        submits = []
        for _ in range(burst):
            seq += 1
            submits.append(ev.TaskSubmitted(now, task_id=f"t{seq}", client_id="c1", name="Noop",
                                            kind="task", code=b"", args=b"(x)", code_hash="h"))
        out, failed = state.handle_many(submits)
        assert not failed, failed
        out += state.handle(ev.Tick(now))
        running = [(i.worker_id, i.task_id) for i in out if isinstance(i, ev.Assign)]
        while running:
            started_next = []
            for worker_id, task_id in running:
                now += 1e-6
                for ins in state.handle(ev.TaskFinished(now, worker_id, task_id,
                                                        UnitOutcome(-1, True, b"1"), 1e-5)):
                    if isinstance(ins, ev.Assign):
                        started_next.append((ins.worker_id, ins.task_id))
            running = started_next
        assert state.idle(), "a burst's tasks did not all end"
        best = min(best, (time.perf_counter() - started) / burst)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.core", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs="*", help="checkouts to measure in turn (default: this)")
    parser.add_argument("--workers", type=int, default=1_000)
    parser.add_argument("--burst", type=int, default=2_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pairs", type=int, default=3, help="turns of the trees (with trees)")
    args = parser.parse_args(argv)
    if not args.trees:
        gc.freeze()  # (what the master does with its start-up state)
        best = min(measure(args.workers, args.burst, args.rounds) for _ in range(args.repeats))
        print(f"{best:.2f} us a task ({args.workers:,} workers, bursts of {args.burst:,})")
        return 0
    for turn in range(args.pairs):
        for tree in args.trees if turn % 2 == 0 else reversed(args.trees):
            tree = os.path.abspath(tree)
            done = subprocess.run(  # (this file, whichever tree has it: the tree's core)
                [sys.executable, os.path.abspath(__file__), "--workers", str(args.workers),
                 "--burst", str(args.burst), "--rounds", str(args.rounds),
                 "--repeats", str(args.repeats)],
                cwd=tree, env={**os.environ, "PYTHONPATH": tree}, capture_output=True, text=True,
                check=True)
            print(f"{tree}: {done.stdout.strip()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
