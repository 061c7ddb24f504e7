"""Hostile frames of every message type, as a client, a node, a stranger on the node's socket for
workers, a peer that never said hello, and task code through its own worker's connection (of
every kind a worker may send): the master and the node live on and serve a legitimate map."""

from __future__ import annotations

import pytest

from actors import LocalCluster
from bench.fuzz import MESSAGE_TYPES, fuzz

pytestmark = pytest.mark.processes


def test_the_fuzzer_knows_every_message_of_the_catalogue() -> None:
    names = {cls.__name__ for cls in MESSAGE_TYPES}
    assert {"Hello", "Submit", "UnitsSliced", "WorkerExited", "ChunkRequest", "NeedCode"} <= names


@pytest.mark.parametrize(("seed", "links"), [(1, "1"), (2, "0")])
def test_random_hostile_frames_crash_nothing_and_a_legitimate_map_completes(
        seed: int, links: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once with the local node's workers linked (``$ACTORS_WORKER_LINKS=1``: no socket for a
    stranger), once with its socket for workers (the default)."""
    monkeypatch.setenv("ACTORS_WORKER_LINKS", links)
    with LocalCluster(workers=2) as cluster:
        report = fuzz(cluster, frames=3_000, seed=seed)
    # 3,000 from outside, 750 from task code (unless its worker was ended for what it sent)
    assert report.frames == 3_750 or report.notes, "\n".join(report.lines())
    assert report.crashes == [], "\n".join(report.lines())
    for name, (_, fds_before) in report.before.items():
        assert report.after[name][1] <= fds_before + 8, "\n".join(report.lines())
