"""The benchmark entry point runs end to end at a tiny size and reports what it measured.

No timing is asserted: the machine is shared and small. What must hold is the shape of the
report: every selected workload has rows for pydra-actors and the process pool with positive
numbers, a runtime that is not installed is reported as unavailable (never an error), and the
bench leaves no process behind.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import os
from pathlib import Path

import pytest

from bench import ab, breakdown, core, drain, peers, report, runner, simulate, units
from bench.stats import Result
from tests.conftest import alive, descendants, kill_all, wait_until

pytestmark = [pytest.mark.processes, pytest.mark.timeout(90)]

#: Memory growths (the master's peak over a baseline): 0 or below at these sizes is no error.
GROWTH_METRICS = {"master peak growth MiB, small → large", "master peak over idle MiB"}
TINY = ["--quick", "--reps", "1", "--size-scale", "0.01", "--workers", "2"]


def _is_resource_tracker(pid: int) -> bool:
    """multiprocessing's resource tracker (started by the spawn pool) ends with this interpreter."""
    try:
        return b"multiprocessing.resource_tracker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.fixture
def no_leftover_processes():
    """Every process the bench starts is ours to end: fail (after killing them) if any outlive it."""
    before = descendants(os.getpid())
    yield
    leftover = {p for p in descendants(os.getpid()) - before if not _is_resource_tracker(p)}
    try:
        wait_until(lambda: not any(alive(p) for p in leftover), 20, "the bench's processes to end")
    finally:
        kill_all(leftover)


def run(argv: list[str]) -> tuple[dict, str]:
    out, progress = io.StringIO(), io.StringIO()
    doc = runner.run_bench(argv, out=out, progress=progress)
    return doc, out.getvalue()


def test_quick_run_reports_every_workload_for_actors_and_the_pool(tmp_path: Path,
                                                                 no_leftover_processes) -> None:
    json_path = tmp_path / "bench.json"
    doc, table = run([*TINY, "--peers", "actors,pool", "--json", str(json_path)])

    assert json.loads(json_path.read_text()) == json.loads(json.dumps(doc))
    assert doc["errors"] == []
    assert doc["settings"]["runtimes"] == ["actors", "pool"]
    assert set(doc["machine"]) >= {"nproc", "cpu", "python"}
    measured = {(r["workload"], r["metric"], r["runtime"], r["variant"]): r
                for r in doc["results"] if r["values"]}
    workloads = {w for w, _, _, _ in measured}
    assert workloads == {"tiny units", "many small tasks", "many small tasks, one batch",
                         "tasks that raise", "latency",
                         "10 ms units", "few long units", "skewed units", "two tasks sharing",
                         "streaming", "start and close", "many small tasks, journal",
                         "data: task results", "data: units reduced on a worker",
                         "data: tree reduction, 2 nodes"} | (
        {"data: NumPy task results"} if importlib.util.find_spec("numpy") else set())
    # A master's journal and worker-to-worker data: the pool has neither.
    ours_only = {"many small tasks, journal", "data: tree reduction, 2 nodes"}
    for runtime in ("pydra-actors", "process pool"):
        expected = workloads if runtime == "pydra-actors" else workloads - ours_only
        assert {w for w, _, rt, _ in measured if rt == runtime} == expected, runtime
    for row in measured.values():
        assert len(row["values"]) == 1 and row["n"] > 0
        assert row["median"] == row["min"] == row["max"]
        if row["metric"] not in GROWTH_METRICS:  # may be 0 or below
            assert row["median"] > 0, row
    # The pool runs the tiny units both unbatched and in chunks of 100.
    assert {v for w, _, rt, v in measured if w == "tiny units" and rt == "process pool"} == {
        "executor.map chunksize 1", "executor.map chunksize 100"}
    # Each pool row is compared with ours, as a positive ratio.
    pool_rows = [r for r in doc["results"] if r["runtime"] == "process pool" and r["values"]]
    assert len(doc["ratios"]) == len(pool_rows)
    for r in doc["ratios"]:
        if r["metric"] == "master peak growth MiB, small → large" and r["advantage"] is None:
            continue  # a growth of 0 MiB (often, at these sizes) has no ratio
        assert r["advantage"] > 0 and math.isfinite(r["advantage"]), r
    # Only pydra-actors rows carry targets.
    assert all(not r["target"] for r in pool_rows)
    assert any(r["target_met"] is not None for r in doc["results"] if r["runtime"] == "pydra-actors")
    assert "tiny units — units/s" in table and "ours ×" in table


def test_an_interleaved_run_alternates_the_runtimes_and_takes_each_ratio_per_round(
        tmp_path: Path, no_leftover_processes) -> None:
    out, progress = io.StringIO(), io.StringIO()
    doc = runner.run_bench(["--quick", "--reps", "2", *TINY[3:], "--only", "many,startup",
                            "--peers", "actors,pool", "--interleave",
                            "--json", str(tmp_path / "bench.json")],
                           out=out, progress=progress)

    assert doc["errors"] == [] and doc["settings"]["interleave"] is True
    # One repetition of each runtime a round, the second round in the other order.
    turns = [line.split("]")[0][1:] for line in progress.getvalue().splitlines()
             if "many small tasks, round" in line]
    assert turns == ["pydra-actors", "process pool", "process pool", "pydra-actors"]
    rows = {(r["workload"], r["metric"], r["runtime"]): r for r in doc["results"] if r["values"]}
    assert rows and all(len(r["values"]) == 2 for r in rows.values())
    # The ratio is the median of the rounds' own ratios, not the ratio of the medians.
    ours = rows[("many small tasks", "tasks/s", "pydra-actors")]["values"]
    pool = rows[("many small tasks", "tasks/s", "process pool")]["values"]
    ratio = next(r for r in doc["ratios"] if r["workload"] == "many small tasks")
    assert ratio["advantage"] == pytest.approx((ours[0] / pool[0] + ours[1] / pool[1]) / 2)
    assert "median over the interleaved rounds" in out.getvalue()


def test_a_large_result_cut_short_swapped_or_mangled_fails_its_check() -> None:
    good = units.blob(3, 1_000)
    assert units.blob_index(good, 1_000) == 3
    assert units.blob_digest([units.blob(i, 100) for i in range(4)]) == units.expected_digest(4, 100)
    mangled = good[:500] + b"x" + good[501:]
    for bad in (good[:-1], good[:8] + units.blob(4, 1_000)[8:], mangled, bytearray(good)):
        with pytest.raises(ValueError):
            units.blob_index(bad, 1_000)
    with pytest.raises(ValueError):  # a blob of the wrong size
        units.blob_index(units.blob(3, 999), 1_000)


def test_a_target_naming_a_peer_is_that_peers_median_of_the_same_row() -> None:
    def row(runtime: str, values: list[float], target: str = "") -> Result:
        return Result("data: task results", "MB/s", runtime, "", 1, True, values, workers=2,
                      target=target)

    ours, dask = row("pydra-actors", [90.0, 100.0, 110.0], "≥ dask"), row("dask", [120.0])
    alone = row("pydra-actors", [5.0], "≥ dask")  # no Dask row measured in its group
    alone.metric = "MB/s, alone"
    report.resolve_targets([ours, dask, alone])
    assert (ours.target, ours.target_met()) == ("≥ 120.0 (dask)", False)
    assert (alone.target, alone.target_met()) == ("≥ dask", None)


def test_a_runtime_that_is_not_installed_is_reported_unavailable(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setattr(peers.DaskRuntime, "requires", ("a_module_that_does_not_exist",))
    doc, table = run([*TINY, "--peers", "dask", "--only", "latency,startup",
                      "--json", str(tmp_path / "bench.json")])

    assert doc["errors"] == []
    assert doc["availability"]["dask"].startswith("not installed")
    rows = [r for r in doc["results"] if r["runtime"] == "dask"]
    assert len(rows) == 2 and all(not r["values"] for r in rows)
    assert all(r["skipped"].startswith("unavailable: not installed") for r in rows)
    assert "unavailable: not installed" in table


def test_scale_mode_runs_a_multi_node_cluster_at_two_workers(tmp_path: Path,
                                                            no_leftover_processes) -> None:
    doc, _ = run([*TINY, "--scale", "--scale-workers", "2", "--workers-per-node", "1",
                  "--peers", "actors", "--json", str(tmp_path / "bench.json")])

    assert doc["errors"] == []
    rows = {(r["workload"], r["metric"]): r for r in doc["results"]}
    assert set(rows) == {("scale: tiny units", "units/s"), ("scale: 10 ms CPU units", "units/s"),
                         ("scale: 10 ms CPU units", "efficiency %")}
    for row in rows.values():
        assert row["workers"] == 2 and row["median"] > 0
        assert row["variant"].endswith("nodes of 1")


def test_breakdown_prints_the_cpu_of_every_cluster_process(capsys, no_leftover_processes) -> None:
    assert breakdown.main(["latency", "5"]) == 0

    out = capsys.readouterr().out
    assert out.startswith("latency: 5 items in ")
    for role in ("client", "master", "worker0", "worker1", "all"):  # (its node inside the master)
        assert f"\n  {role} " in out, role


def test_the_ab_bench_takes_interleaved_rounds_of_both_sides(capsys, no_leftover_processes) -> None:
    here = str(Path(__file__).resolve().parent.parent)
    assert ab.main([here, f"{here}:ACTORS_TEST_SIDE=b", "--rounds", "2", "--size", "5"]) == 0
    out = capsys.readouterr().out
    assert f"{here}: p50 " in out and f"{here}:ACTORS_TEST_SIDE=b: p50 " in out
    assert out.count("over 10 trips") == 2
    assert "B better than A in " in out and " of 2 rounds" in out
    assert ab.main([here, here, "--workload", "many", "--rounds", "2", "--size", "20"]) == 0
    out = capsys.readouterr().out
    assert out.count("tasks/s over 2 rounds of 20") == 2
    # the process pool as a side: issue 20's ratio to it, round by round
    assert ab.main(["pool", here, "--workload", "many", "--rounds", "2", "--size", "20"]) == 0
    out = capsys.readouterr().out
    assert "pool: median " in out and f"{here}: median " in out
    assert "B / A a round (tasks/s): median " in out


def test_the_core_bench_times_bursts_in_process_and_trees_in_turn(capsys) -> None:
    assert core.main(["--workers", "10", "--burst", "50", "--rounds", "2", "--repeats", "1"]) == 0
    assert capsys.readouterr().out.endswith(" us a task (10 workers, bursts of 50)\n")
    here = str(Path(__file__).resolve().parent.parent)
    assert core.main([here, here, "--workers", "10", "--burst", "50", "--rounds", "2",
                      "--repeats", "1", "--pairs", "1"]) == 0
    assert capsys.readouterr().out.count(f"{here}: ") == 2


def test_simulated_nodes_and_workers_drive_a_real_master(tmp_path: Path,
                                                         no_leftover_processes) -> None:
    """bench.simulate at a tiny size: a real master, 10 simulated workers on 2 nodes speaking
    the real protocol; every result comes back exact and the master refuses nothing."""
    json_path = tmp_path / "sim.json"
    out, progress = io.StringIO(), io.StringIO()
    doc = simulate.main(["--configs", "10:2", "--units", "600", "--tasks", "300",
                         "--queued", "200", "--idle-seconds", "0.2", "--json", str(json_path)],
                        out=out, progress=progress)

    assert json.loads(json_path.read_text()) == json.loads(json.dumps(doc, default=str))
    assert doc["errors"] == [], progress.getvalue()
    (row,) = doc["rows"]
    assert (row["workers"], row["nodes"], row["units"], row["tasks"], row["queued"]) == (
        10, 2, 600, 300, 200)
    assert row["refused"] == {} and row["unexpected_at_nodes"] == {}
    counts = row["simulators"]["counts"]
    # Warm-up first: 10 units and 2 tasks per worker.
    assert counts["nodes welcomed"] == 2
    assert counts["units"] == 100 + 600
    assert counts["parallel tasks"] == 2
    assert counts["tasks"] == 20 + 300 + 200
    # The classes travel by value (with their file's source, for tracebacks: kilobytes), to
    # each worker once; later assignments name them by hash.
    assert 0 < counts["code shipped"] <= 2 * 10 and "code sent again" not in counts, counts
    assert row["units_per_s"] > 0 and row["tasks_per_s"] > 0
    assert row["master_us_per_unit"] >= 0 and row["master_us_per_task"] >= 0
    assert "units/s" in out.getvalue() and "tasks/s" in out.getvalue()


def test_the_drain_bench_reports_idle_peak_and_settled_sizes(no_leftover_processes) -> None:
    """bench.drain at a tiny size: a round of tasks, every result checked, sizes reported."""
    out = io.StringIO()
    doc = drain.main(["--tasks", "500"], out=out)
    (row,) = doc["rounds"]
    assert doc["idle_mib"] > 0 and row["peak_mib"] >= row["settled_mib"] > 0
    assert row["ratio"] == round(row["settled_mib"] / doc["idle_mib"], 2)
    assert "500 tasks drained" in out.getvalue()
