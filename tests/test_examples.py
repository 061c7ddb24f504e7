"""The shipped examples run as the README says, on a local cluster, and print exact results."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import descendants, kill_all

pytestmark = pytest.mark.processes

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 30  # it takes ~1.5 s; the bound only keeps a hang from stalling the suite


def run_script(script: Path, tmp_path: Path, workers: int,
               *options: str) -> subprocess.CompletedProcess[str]:
    """``python -m actors.master --workers N --port 0 OPTIONS --run SCRIPT``, as the README runs
    it (the master starts a local node with ``N`` workers, runs the script, then stops them all)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors.master", "--port", "0", "--workers", str(workers),
         "--keys", str(tmp_path / "keys"), *options, "--run", str(script)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        kill_all(descendants(proc.pid) | {proc.pid})  # while the master lives: its whole tree
        stdout, stderr = proc.communicate()
        pytest.fail(f"{script.name} did not end within {TIMEOUT_S}s:\n{stdout}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_the_tree_reduction_example_prints_the_exact_sum(tmp_path: Path) -> None:
    done = run_script(ROOT / "examples" / "tree_reduce.py", tmp_path, workers=2)
    assert done.returncode == 0, done.stderr[-3000:]
    n = 1_000_000
    expected = (n - 1) * n * (2 * n - 1) // 6  # the sum of i*i for i < n
    assert expected == 333_332_833_333_500_000
    lines = done.stdout.splitlines()
    assert f"TreeSum(1_000_000) = {expected}" in lines, done.stdout
    # The second line counts what moved between workers; how much depends on placement.
    story = [line for line in lines if "partial sums moved worker to worker" in line]
    assert len(story) == 1, done.stdout
    match = re.fullmatch(r"(\d+) partial sums moved worker to worker; the story has (\d+) "
                         r"transitions across workers", story[0])
    assert match is not None, story[0]
    assert int(match[2]) > 0


def test_the_quickstart_of_the_readmes_first_command_prints_its_results(tmp_path: Path) -> None:
    done = run_script(ROOT / "examples" / "quickstart.py", tmp_path, workers=2)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "Square(7) = 49" in lines, done.stdout
    total = sum(i * i for i in range(10_000))
    assert f"SumOfSquares(10_000) = {total} progress: (10000, 10000)" in lines, done.stdout
    assert f"map_batch(Square, range(10_000)) sums to {total}" in lines, done.stdout
    # on the master's cluster (ACTORS_ADDRESS): one master started and one client joined it,
    # no cluster that Client() would start for itself
    events = [json.loads(line)["event"] for line in done.stderr.splitlines() if line.startswith("{")]
    assert (events.count("master_started"), events.count("client_joined")) == (1, 1), events


def test_the_deployed_package_example_lists_its_task_and_counts_words(tmp_path: Path) -> None:
    done = run_script(ROOT / "examples" / "deployed.py", tmp_path, 2,
                      "--tasks-dir", str(ROOT / "examples" / "tasks"))
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(re.fullmatch(r"wordcount [0-9a-f]+: \['wordcount\.tasks:WordCount'\]", line)
               for line in lines), done.stdout
    # "the" five times; "actor", "state", "one", "mailbox" and "and" twice each, listed in the
    # order they are first met (results are reduced in unit order)
    assert "most common words: [('the', 5), ('actor', 2), ('state', 2)]" in lines, done.stdout
