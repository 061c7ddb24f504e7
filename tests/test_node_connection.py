"""A node's connection to its master: a frozen node is noticed by the transport's heartbeat, not
waited out, and its return is clean (real processes, SIGSTOP/SIGCONT)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from actors import Client, ParallelTask
from tests.conftest import (
    alive,
    descendants,
    kill_all,
    python_logged,
    result_or_logs,
    start_master,
    wait_until,
)
from tests.test_cli import log_events


class Squares(ParallelTask):
    def get_work(self, n):
        return range(n)

    def work_unit(self, unit):
        time.sleep(0.005)
        return unit * unit

    def reduce(self, results):
        return sum(results)


def test_a_frozen_node_is_lost_by_its_connection_then_rejoins_cleanly(tmp_path: Path) -> None:
    keys = str(tmp_path / "keys")
    # A minute of silence allowed: the loss must come from the transport's heartbeat closing
    # the connection of a node that stopped answering.
    master, address = start_master(tmp_path, "--workers", "0", "--keys", keys,
                                   "--node-timeout", "60")
    node = python_logged(tmp_path / "node.log", "-m", "actors.node", "--master", address,
                         "--workers", "2", "--keys", keys)
    pids: set[int] = set()
    try:
        with Client(address, keys=keys) as client:
            client.wait_for_workers(2)
            future = client.submit(Squares, 1_500)
            wait_until(lambda: future.progress()[0] > 100, 60, "units to be done")
            pids = descendants(node.pid)
            os.kill(node.pid, signal.SIGSTOP)  # frozen: its sockets stay open, nothing answers
            try:
                wait_until(lambda: any(e["event"] == "node_lost"
                                       for e in log_events(tmp_path / "master.log")),
                           30, "the master to declare the frozen node lost")
            finally:
                os.kill(node.pid, signal.SIGCONT)
            assert result_or_logs(future, 120, tmp_path) == sum(i * i for i in range(1_500))
            pids |= descendants(node.pid)
        master_events = log_events(tmp_path / "master.log")
        lost = [e for e in master_events if e["event"] == "node_lost"]
        assert len(lost) == 1 and "connection closed" in lost[0]["reason"], lost
        assert [e["event"] for e in master_events].count("node_joined") == 2  # and back
        warnings = [e for e in master_events if e.get("level") in ("warning", "error")
                    and e["event"] != "node_lost"]
        assert not warnings, warnings  # what the node sent before it noticed is expected
        node_events = log_events(tmp_path / "node.log")
        assert [e["event"] for e in node_events].count("joined_master") == 2
        # Once, when it woke; its own stop at the end is no news.
        assert [e["event"] for e in node_events].count("master_disconnected") == 1
        troubles = [e for e in node_events if e.get("level") in ("error", "critical")
                    or e["event"] == "worker_kill_escalated" or "Traceback" in str(e)]
        assert not troubles, troubles
    finally:
        pids |= descendants(node.pid)
        for proc in (node, master):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (node, master):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
        kill_all(pids | {node.pid, master.pid})
        wait_until(lambda: not any(alive(p) for p in pids), 20, "every process to end")


class Results(ParallelTask):
    """Units of results of a given size: large ones fill a connection's buffers while the
    master cannot read them."""

    def get_work(self, n, size):
        return ((i, size) for i in range(n))

    def work_unit(self, unit):
        time.sleep(0.002)
        return bytes(unit[1])

    def reduce(self, results):
        return sum(len(result) for result in results)


@pytest.mark.parametrize("size", [1, 20_000])
def test_a_master_paused_past_the_heartbeat_loses_no_work_and_hears_everyone_again(
        tmp_path: Path, size: int) -> None:
    """SIGSTOP the master 4 s, past the transport's 3 s heartbeat, while units stream in: the
    node's and the client's connections drop with what was on the way in them (unit results,
    assignments; the node comes back before it is taken as lost, and each side assumed the
    other had them), and each may connect again while the frozen master still holds the old
    connection under the same id (parked: large results fill the buffers, the master wakes
    late to the old one's end). The task still ends, with every unit counted."""
    keys = str(tmp_path / "keys")
    master, address = start_master(tmp_path, "--workers", "0", "--keys", keys,
                                   "--node-timeout", "60")
    node = python_logged(tmp_path / "node.log", "-m", "actors.node", "--master", address,
                         "--workers", "2", "--keys", keys)
    pids: set[int] = set()
    try:
        with Client(address, keys=keys) as client:
            client.wait_for_workers(2)
            future = client.submit(Results, 3_000, size)
            wait_until(lambda: future.progress()[0] > 300, 60, "units to be done")
            pids = descendants(node.pid)
            os.kill(master.pid, signal.SIGSTOP)
            time.sleep(4)
            os.kill(master.pid, signal.SIGCONT)
            assert result_or_logs(future, 90, tmp_path) == 3_000 * size
            assert client.submit(Results, 10, size).result(30) == 10 * size  # and serves on
            pids |= descendants(node.pid)
        troubles = [e for name in ("master.log", "node.log")
                    for e in log_events(tmp_path / name)
                    if e.get("level") in ("error", "critical") or "Traceback" in str(e)]
        assert not troubles, troubles
    finally:
        pids |= descendants(node.pid)
        for proc in (node, master):
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc in (node, master):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
        kill_all(pids | {node.pid, master.pid})
        wait_until(lambda: not any(alive(p) for p in pids), 20, "every process to end")
