"""SpillBuffer: a worker's held results in memory up to a target, the rest in files."""

from __future__ import annotations

from pathlib import Path

from actors.spill import SpillBuffer


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
