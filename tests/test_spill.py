"""SpillBuffer: a worker's held results in memory up to a target, the rest in files."""

from __future__ import annotations

import hashlib
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from actors.spill import PAUSE_FRACTION, SPILL_FRACTION, SpillBuffer


def files(directory: Path) -> int:
    return len(list(directory.iterdir())) if directory.exists() else 0


def test_past_the_target_the_least_recently_used_go_to_disk_and_come_back_exact(
    tmp_path: Path,
) -> None:
    held = SpillBuffer(str(tmp_path / "held"), target=250)
    held["a"] = b"a" * 100
    held["b"] = b"b" * 100
    assert held["a"] == b"a" * 100  # a used again: b is now the oldest
    held["c"] = b"c" * 100
    assert list(held.fast) == ["a", "c"] and held.fast_bytes == 200
    assert list(held.slow) == ["b"] and files(tmp_path / "held") == 1
    held["d"] = b"d" * 100
    assert list(held.slow) == ["b", "a"] and files(tmp_path / "held") == 2
    assert {key: held[key] for key in held} == {k: k.encode() * 100 for k in "abcd"}
    assert len(held) == 4 and "b" in held and "z" not in held


def test_a_value_larger_than_the_target_goes_straight_to_disk(tmp_path: Path) -> None:
    held = SpillBuffer(str(tmp_path), target=10)
    held["small"] = b"12345"
    held["big"] = b"x" * 1000
    assert list(held.fast) == ["small"] and list(held.slow) == ["big"]
    assert held["big"] == b"x" * 1000


def test_a_value_replaced_or_deleted_leaves_no_file(tmp_path: Path) -> None:
    held = SpillBuffer(str(tmp_path / "held"), target=10)
    held["k"] = b"x" * 100
    assert files(tmp_path / "held") == 1
    held["k"] = b"y"  # back in memory: its old file goes
    assert files(tmp_path / "held") == 0 and held["k"] == b"y"
    held["j"] = b"z" * 100
    del held["j"]
    assert files(tmp_path / "held") == 0 and "j" not in held
    assert held.pop("missing", None) is None


def test_a_disk_that_refuses_the_file_keeps_the_value_in_memory(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder would be")
    held = SpillBuffer(str(blocked), target=10)
    held["k"] = b"x" * 100
    assert list(held.fast) == ["k"] and held["k"] == b"x" * 100 and not held.slow


def test_exactly_the_target_stays_in_memory(tmp_path: Path) -> None:
    held = SpillBuffer(str(tmp_path), target=10)
    held["a"] = b"a" * 10  # as large as the target: in memory
    assert list(held.fast) == ["a"]
    held = SpillBuffer(str(tmp_path), target=10)
    held["a"], held["b"] = b"a" * 5, b"b" * 5  # together exactly the target: both stay
    assert list(held.fast) == ["a", "b"] and held.fast_bytes == 10 and not held.slow


def test_what_is_in_memory_is_counted_as_values_are_replaced_and_deleted(tmp_path: Path) -> None:
    held = SpillBuffer(str(tmp_path), target=1000)
    held["a"], held["b"] = b"a" * 100, b"b" * 200
    held["a"] = b"A" * 50
    del held["b"]
    assert held.fast_bytes == 50 == sum(map(len, held.fast.values()))
    held["c"] = b"c" * 2000  # to disk
    del held["c"]  # a value on disk is deleted as one in memory
    assert "c" not in held and held.fast_bytes == 50
    with pytest.raises(KeyError, match="missing"):
        del held["missing"]
    with pytest.raises(KeyError, match="missing"):
        held["missing"]  # noqa: B018


def test_a_spilled_value_is_in_a_folder_only_the_worker_may_open_named_by_a_hash_of_its_key(
    tmp_path: Path,
) -> None:
    """A key comes from the scheduler, with a task's unit in it: its file is named by a
    digest, so no key leads out of the folder, and the folder is the worker's alone."""
    held = SpillBuffer(str(tmp_path / "held"), target=1)
    key = "../../t:1/../etc"
    held[key] = b"x" * 10
    assert [p.name for p in (tmp_path / "held").iterdir()] == [
        hashlib.sha256(key.encode()).hexdigest()[:40]]
    assert stat.S_IMODE((tmp_path / "held").stat().st_mode) == 0o700
    assert list(tmp_path.iterdir()) == [tmp_path / "held"]


def test_past_the_pause_mark_everything_goes_to_disk_and_comes_back_exact(tmp_path: Path) -> None:
    held = SpillBuffer(str(tmp_path / "held"), target=1000)
    held["a"], held["b"] = b"a" * 100, b"b" * 200
    assert held.spill_all() == 300
    assert not held.fast and held.fast_bytes == 0 and held.slow == {"a": 100, "b": 200}
    assert (held["a"], held["b"]) == (b"a" * 100, b"b" * 200)
    assert held.spill_all() == 0


def test_a_full_disk_stops_a_spill_of_everything_and_keeps_the_rest(tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the folder would be")
    held = SpillBuffer(str(blocked), target=1000)
    held["a"] = b"a" * 100
    with capture_logs() as logs:
        assert held.spill_all() == 0
    assert held.fast == {"a": b"a" * 100} and held.fast_bytes == 100
    assert [(e["event"], e["key"], e["size"]) for e in logs] == [("spill_failed", "a", 100)]


def test_spills_are_counted_each_and_logged_the_first_second_fourth_time(tmp_path: Path) -> None:
    held = SpillBuffer(str(tmp_path), target=1)
    with capture_logs() as logs:
        for n in range(5):
            held[f"k{n}"] = b"x" * 10
    assert held.spilled == 5
    assert [(e["key"], e["spilled"], e["on_disk"]) for e in logs] == [
        ("k0", 1, 10), ("k1", 2, 20), ("k3", 4, 40)]


def test_a_workers_marks_follow_its_memory_limit_or_the_nodes_settings() -> None:
    """Spill at 60 % and pause at 80 % of the worker's data limit (the node sets it); without
    a limit it never pauses; the node's own settings (environment) win."""
    script = ("import resource\n"
              "resource.setrlimit(resource.RLIMIT_DATA, (4 << 30, resource.RLIM_INFINITY))\n"
              "from actors.spill import spill_target, pause_mark\n"
              "print(spill_target(), pause_mark())")
    env = {"PATH": "/usr/bin:/bin"}
    limited = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             timeout=60, env=env, check=True).stdout.split()
    assert limited == [str(int((4 << 30) * SPILL_FRACTION)), str(int((4 << 30) * PAUSE_FRACTION))]
    hard = resource.getrlimit(resource.RLIMIT_DATA)[1]  # the most the child may raise it to
    widest = subprocess.run(
        [sys.executable, "-c", "import resource\n"
         f"resource.setrlimit(resource.RLIMIT_DATA, ({hard}, {hard}))\n"
         "from actors.spill import spill_target, pause_mark\n"
         "print(spill_target(), pause_mark())"],
        capture_output=True, text=True, timeout=60, env=env, check=True).stdout.split()
    assert int(widest[0]) > 0
    assert widest[1] == ("0" if hard == resource.RLIM_INFINITY else str(int(hard * PAUSE_FRACTION)))
    given = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True,
        env={**env, "ACTORS_WORKER_SPILL": "1MiB", "ACTORS_WORKER_PAUSE": "2MiB"}).stdout.split()
    assert given == [str(1 << 20), str(2 << 20)]
