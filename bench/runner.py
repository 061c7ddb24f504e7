"""``python -m bench``: run the selected workloads on every runtime, print the table, keep the JSON.

Runtimes run one after another (an idle cluster still costs CPU on a small machine), each
through all selected workloads: first those that share one warm cluster, then those that start
their own. Every runtime is measured in the same run, so ratios hold while absolute numbers
drift with the machine's load.

With ``--interleave`` each workload's repetitions alternate between the runtimes instead (one
repetition of each, in turn, the order reversed every other round), every runtime's shared
cluster up at once: a slow spell of a shared host then falls on every runtime's repetition of
that round, not on one runtime's whole row, and each ratio is the median of the rounds' own
ratios.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shlex
import sys
import traceback
from pathlib import Path
from typing import Any, TextIO

from bench import (
    data,
    efficiency,
    graphs,
    latency,
    long_units,
    report,
    scale,
    spread,
    startup,
    streaming,
    throughput,
)
from bench.peers import OURS, RUNTIMES, Runtime
from bench.stats import NOT_RUN, Result, skipped
from bench.system import machine
from bench.workload import Settings, SharedSession, Workload

WORKLOADS: dict[str, Workload] = {w.key: w for w in (
    Workload("tiny", "1. tiny units", throughput.tiny_units),
    Workload("many", "2. many small tasks", throughput.many_tasks),
    Workload("batch", "2a. many small tasks, one batch", throughput.batched_tasks),
    Workload("raising", "2b. tasks that raise", throughput.raising_tasks),
    Workload("durable", "2c. many small tasks on a durable master", throughput.durable_tasks),
    Workload("graphs", "2d. task graphs (futures as arguments)", graphs.graphs),
    Workload("latency", "3. latency", latency.latency),
    Workload("efficiency", "4. 10 ms units", efficiency.efficiency),
    Workload("long", "4b. few long units", long_units.long_units, uses_shared_session=False),
    Workload("skewed", "4c. skewed units", spread.skewed_units),
    Workload("sharing", "4d. two tasks sharing", spread.two_tasks),
    Workload("streaming", "5. streaming", streaming.streaming, uses_shared_session=False),
    Workload("startup", "6. start and close", startup.startup, uses_shared_session=False),
    Workload("data", "8. large results", data.data, uses_shared_session=False),
    Workload("scale", "7. scale", scale.scale, uses_shared_session=False),
)}
DEFAULT_WORKLOADS = ("tiny", "many", "batch", "raising", "durable", "latency", "efficiency", "long",
                     "skewed", "sharing", "streaming", "startup", "data")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _names(text: str, known: dict[str, Any], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown)} "
                                         f"(choose from {', '.join(known)})")
    return names


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="pydra-actors against Dask, Ray and a process pool.")
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes (10^4 tiny units, 10^5 streamed units)")
    parser.add_argument("--reps", type=int, default=3, help="timed repetitions per row (default 3)")
    parser.add_argument("--only", type=lambda t: _names(t, WORKLOADS, "workload"), default=None,
                        metavar="NAME,...", help=f"workloads to run: {', '.join(WORKLOADS)}")
    parser.add_argument("--peers", type=lambda t: _names(t, RUNTIMES, "runtime"),
                        default=list(RUNTIMES), metavar="NAME,...",
                        help=f"runtimes to run (default all): {', '.join(RUNTIMES)}")
    parser.add_argument("--workers", type=int, default=2, help="workers per cluster (default 2)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="where to write the JSON (default bench/results/<timestamp>.json)")
    parser.add_argument("--scale", action="store_true",
                        help="run workload 7: throughput and efficiency at several worker counts")
    parser.add_argument("--scale-workers", type=lambda t: tuple(int(x) for x in t.split(",")),
                        default=None, metavar="N,...",
                        help="worker counts for --scale (default 2,4,8,16 up to the core count)")
    parser.add_argument("--workers-per-node", type=int, default=4,
                        help="pydra-actors node size for --scale (default 4)")
    parser.add_argument("--size-scale", type=float, default=1.0, metavar="F",
                        help="multiply every size by F (the smoke test uses 0.01)")
    parser.add_argument("--interleave", action="store_true",
                        help="alternate each workload's repetitions between the runtimes "
                             "(every shared cluster up at once); ratios per round")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.workers < 1 or args.workers_per_node < 1 or args.size_scale <= 0:
        parser.error("--reps, --workers, --workers-per-node and --size-scale must be positive")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    counts = args.scale_workers
    if counts is None:
        cores = os.cpu_count() or 1
        counts = tuple(n for n in scale.DEFAULT_WORKER_COUNTS if n <= cores) or (2,)
    return Settings(quick=args.quick, reps=args.reps, workers=args.workers,
                    size_scale=args.size_scale, scale_workers=counts,
                    workers_per_node=args.workers_per_node)


def selected_workloads(args: argparse.Namespace) -> list[Workload]:
    keys = set(args.only) if args.only else (set() if args.scale else set(DEFAULT_WORKLOADS))
    if args.scale:
        keys.add("scale")
    return [w for key, w in WORKLOADS.items() if key in keys]


def run_runtime(runtime: Runtime, workloads: list[Workload], settings: Settings,
                progress: TextIO) -> tuple[list[Result], list[str]]:
    """Every workload on one runtime; a workload that fails is reported, and the rest go on."""
    rows: list[Result] = []
    errors: list[str] = []
    reason = runtime.availability()
    if reason:
        print(f"[{runtime.name}] unavailable: {reason}", file=progress, flush=True)
        return [skipped(w.title, NOT_RUN, runtime.name, "", f"unavailable: {reason}",
                        workers=settings.workers) for w in workloads], errors
    shared = SharedSession(runtime, settings.workers)
    ordered = sorted(workloads, key=lambda w: not w.uses_shared_session)
    try:
        for workload in ordered:
            if not workload.uses_shared_session:
                shared.close()
            print(f"[{runtime.name}] {workload.title} ...", file=progress, flush=True)
            measured, _ = _measure(workload, runtime, shared, settings, errors, progress)
            rows += measured
    finally:
        shared.close()
    return rows, errors


def _measure(workload: Workload, runtime: Runtime, shared: SharedSession, settings: Settings,
             errors: list[str], progress: TextIO) -> tuple[list[Result], bool]:
    """One workload on one runtime, its rows said on ``progress``; one that fails is reported
    (in ``errors``, and as a row), and its shared session closed: a failure may have left it
    broken, and the next workload starts anew. Also whether it failed."""
    try:
        measured, failed = workload.run(runtime, shared, settings), False
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
        errors.append(f"{runtime.name} {workload.title}: {text}")
        traceback.print_exc(file=progress)
        measured = [skipped(workload.title, NOT_RUN, runtime.name, "", f"failed: {text}",
                            workers=settings.workers)]
        failed = True
        shared.close()
    for row in measured:
        if row.values:
            median = report.format_number(row.median)
            print(f"[{runtime.name}]   {row.metric}: {median} "
                  f"(median of {len(row.values)}, n={row.n})", file=progress, flush=True)
    return measured, failed


def run_interleaved(runtimes: list[Runtime], workloads: list[Workload], settings: Settings,
                    progress: TextIO) -> tuple[list[Result], list[str]]:
    """Each workload in ``settings.reps`` rounds of one repetition on every runtime (its own
    untimed warm-up first, each time), the runtimes' order reversed every other round; each
    row's values in round order. A runtime that fails a workload is not asked again for it."""
    rows: dict[tuple[str, str, str, str], Result] = {}
    errors: list[str] = []
    available: list[Runtime] = []
    for runtime in runtimes:
        reason = runtime.availability()
        if reason:
            print(f"[{runtime.name}] unavailable: {reason}", file=progress, flush=True)
            for w in workloads:
                row = skipped(w.title, NOT_RUN, runtime.name, "", f"unavailable: {reason}",
                              workers=settings.workers)
                rows[(w.title, NOT_RUN, runtime.name, "")] = row
        else:
            available.append(runtime)
    if heavy := [r.name for r in available if r.key in ("dask", "ray")]:
        print(f"note: interleaved with {' and '.join(heavy)}, whose idle clusters stay up "
              "beside the others' turns and whose clients leave threads in this process (Dask's "
              "offload pool), so pydra-actors' LocalCluster starts by spawn, not fork: for "
              "ratios against the pool, interleave pydra-actors with the pool alone",
              file=progress, flush=True)
    shared = {r.key: SharedSession(r, settings.workers) for r in available}
    one = dataclasses.replace(settings, reps=1)
    try:
        for workload in sorted(workloads, key=lambda w: not w.uses_shared_session):
            if not workload.uses_shared_session:
                for session in shared.values():
                    session.close()
            failed: set[str] = set()
            for round_ in range(settings.reps):
                order = available if round_ % 2 == 0 else available[::-1]
                for runtime in [r for r in order if r.key not in failed]:
                    print(f"[{runtime.name}] {workload.title}, round {round_ + 1} of "
                          f"{settings.reps} ...", file=progress, flush=True)
                    measured, broke = _measure(workload, runtime, shared[runtime.key], one,
                                               errors, progress)
                    if broke:
                        failed.add(runtime.key)
                    for row in measured:
                        key = (row.workload, row.metric, row.runtime, row.variant)
                        if key in rows:
                            rows[key].values += row.values
                        else:
                            rows[key] = row
    finally:
        for session in shared.values():
            session.close()
    return list(rows.values()), errors


def run_bench(argv: list[str], *, out: TextIO = sys.stdout, progress: TextIO = sys.stderr
              ) -> dict[str, Any]:
    """Parse ``argv``, run, print the table on ``out``, write the JSON; return the JSON document."""
    args = parse_args(argv)
    settings = settings_from(args)
    workloads = selected_workloads(args)
    runtimes = [RUNTIMES[key] for key in RUNTIMES if key in args.peers]
    started = datetime.datetime.now(datetime.UTC)
    rows: list[Result] = []
    errors: list[str] = []
    if args.interleave:
        rows, errors = run_interleaved(runtimes, workloads, settings, progress)
    else:
        for runtime in runtimes:
            runtime_rows, runtime_errors = run_runtime(runtime, workloads, settings, progress)
            rows += runtime_rows
            errors += runtime_errors
    finished = datetime.datetime.now(datetime.UTC)
    report.resolve_targets(rows)
    doc = report.document(
        rows,
        command=shlex.join(["python", "-m", "bench", *argv]),
        started=started.isoformat(timespec="seconds"),
        seconds=round((finished - started).total_seconds(), 1),
        machine=machine(),
        settings={**vars(settings), "workloads": [w.key for w in workloads],
                  "runtimes": [r.key for r in runtimes], "interleave": args.interleave},
        paired=args.interleave,
        availability={r.name: r.availability() or "available" for r in runtimes},
        errors=errors,
    )
    path = args.json or RESULTS_DIR / f"{started.strftime('%Y-%m-%dT%H%M%SZ')}.json"
    report.write_json(doc, path)
    info = machine()
    print(f"{doc['command']}  ({doc['started']}, {info['nproc']} cores {info['cpu']}, "
          f"Python {info['python']})\n", file=out)
    print(report.table(rows, paired=args.interleave), file=out)
    summary = report.targets_summary(rows)
    print(f"\n{summary}" if summary else "", file=out)
    print(f"JSON: {path}", file=out, flush=True)
    return doc


def main(argv: list[str] | None = None) -> int:
    doc = run_bench(sys.argv[1:] if argv is None else argv)
    ours_failed = [e for e in doc["errors"] if e.startswith(OURS)]
    return 1 if ours_failed else 0
