"""A client that dies without a word, or goes silent, is taken as gone after --client-timeout:
its tasks stop; one that wakes up is told on its futures and goes on (real processes)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import Client
from tests.conftest import descendants, kill_all, python_logged, start_master, wait_until

pytestmark = pytest.mark.processes

CLIENT = textwrap.dedent("""
    import sys, time
    from actors import Client, Task
    from actors.errors import MasterLost, TaskCancelled

    class Waits(Task):
        def work(self, seconds):
            time.sleep(seconds)
            return seconds

    address, keys = sys.argv[1], sys.argv[2]
    with Client(address, keys=keys, timeout=60) as client:
        fut = client.submit(Waits, 120)
        print("submitted", fut.task_id, flush=True)
        try:
            fut.result(timeout=120)
            print("finished", flush=True)
        except (MasterLost, TaskCancelled) as exc:
            print("stopped:", type(exc).__name__, exc, flush=True)
        print("after:", client.submit(Waits, 0).result(timeout=60), flush=True)
""")


def _cluster(tmp_path: Path) -> tuple[subprocess.Popen[str], subprocess.Popen[str], str]:
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(tmp_path / "keys"),
                                   "--client-timeout", "4")
    node = python_logged(tmp_path / "node.log", "-m", "actors.node", "--master", address,
                         "--workers", "2", "--keys", str(tmp_path / "keys"))
    return master, node, address


def _status(watcher: Client, task_id: str) -> str:
    return next((t.status for t in watcher.tasks() if t.task_id == task_id), "")


def _submitted(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("submitted"), line
    return line.split()[1]


@contextlib.contextmanager
def _a_client_with_a_running_task(tmp_path: Path) -> Iterator[
        tuple[subprocess.Popen[str], Client, str]]:
    """A master (client timeout 4 s) and a node; a client process whose task runs; a watcher
    client with the same key. Every process is stopped afterwards."""
    master, node, address = _cluster(tmp_path)
    script = tmp_path / "client.py"
    script.write_text(CLIENT)
    proc = subprocess.Popen([sys.executable, str(script), address, str(tmp_path / "keys")],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Client(address, keys=tmp_path / "keys", timeout=60) as watcher:
            task_id = _submitted(proc)
            wait_until(lambda: _status(watcher, task_id) == "running", 60, "the task to run")
            yield proc, watcher, task_id
    finally:
        kill_all({proc.pid, master.pid, node.pid} | descendants(node.pid))
        for p in (proc, master, node):
            p.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_client_killed_without_a_word_has_its_tasks_stopped(tmp_path: Path) -> None:
    with _a_client_with_a_running_task(tmp_path) as (proc, watcher, task_id):
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_until(lambda: _status(watcher, task_id) == "cancelled", 60,
                   "the dead client's task to stop")
    assert "client_lost" in (tmp_path / "master.log").read_text()


def test_a_client_that_wakes_after_the_timeout_learns_its_tasks_stopped_and_goes_on(
        tmp_path: Path) -> None:
    with _a_client_with_a_running_task(tmp_path) as (proc, watcher, task_id):
        os.kill(proc.pid, signal.SIGSTOP)
        wait_until(lambda: _status(watcher, task_id) == "cancelled", 60,
                   "the silent client's task to stop")
        os.kill(proc.pid, signal.SIGCONT)
        out, _ = proc.communicate(timeout=90)
    # Told at once (a connection that lived through the pause: MasterLost naming the
    # client timeout), or when it says Hello again (a new connection: TaskCancelled).
    assert "stopped: MasterLost" in out and "--client-timeout" in out or \
        "stopped: TaskCancelled" in out, out
    assert "after: 0" in out, out  # introduced again, it submits and gets results
