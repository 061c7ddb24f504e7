"""``/metrics`` in Prometheus' format beside the master, moving as tasks run (real processes)."""

from __future__ import annotations

import re
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors import Client, ParallelTask, Task
from tests.conftest import descendants, kill_all, start_master, wait_until

pytestmark = pytest.mark.processes


class Units(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        return i


class Add(Task):
    def work(self, a, b):
        return a + b


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_count_tasks_units_and_workers_as_they_run(tmp_path: Path) -> None:
    master, address = start_master(tmp_path, "--workers", "2", "--keys", str(tmp_path / "keys"),
                                   "--metrics", "127.0.0.1:0")
    try:
        url = re.search(r"metrics:\s+(\S+)", (tmp_path / "master.out").read_text())[1]
        with Client(address, keys=tmp_path / "keys", timeout=60) as client:
            client.wait_for_workers(2, 60)
            # The page shows the snapshot of the master's last tick: wait for one after the join.
            wait_until(lambda: scrape(url).get(("actors_workers", (("state", "idle"),))) == 2,
                       30, "both idle workers in the metrics")
            assert client.submit(Units, 500).result(timeout=60) == list(range(500))
            assert [f.result(timeout=60) for f in client.map(Add, range(20), range(20))] == [
                2 * i for i in range(20)]
            wait_until(lambda: scrape(url).get(("actors_tasks", (("status", "done"),))) == 21,
                       30, "the finished tasks in the metrics")
            seen = scrape(url)
        assert seen[("actors_units_done_total", ())] == 500
        assert seen[("actors_tasks_submitted_total", ())] == 21
        assert seen[("actors_nodes", ())] == 1
        assert seen[("actors_scheduler_events_total", ())] > 0
        assert seen[("actors_scheduler_seconds_total", ())] > 0
        assert seen[("actors_journal_commits_total", ())] > 0
    finally:
        kill_all({master.pid} | descendants(master.pid))
        master.wait(10)


def test_a_silent_connection_to_the_metrics_is_let_go_without_a_traceback(
        monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    """Anyone who can reach the port can open a connection and say nothing: it is let go after
    the handler's timeout, quietly (the standard library's WSGI handler let the timeout
    through, and the server printed a traceback for each)."""
    import socket

    from actors import metrics
    from actors.metrics import MetricsServer

    monkeypatch.setattr(metrics._Quiet, "timeout", 0.3)
    server = MetricsServer("127.0.0.1", 0)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as silent:
            silent.settimeout(5)
            assert silent.recv(1) == b""  # closed by the server after its timeout
    finally:
        server.close()
    assert "Traceback" not in capfd.readouterr().err
