"""``python -m actors cancel | story | logs ID``: one task of the caller's key, against a running
master, for a person and as JSON; an unknown id and another key's task are errors (exit 2)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from actors import Task
from tests.conftest import wait_until

pytestmark = pytest.mark.processes


class Sleeps(Task):
    def work(self, seconds):
        time.sleep(seconds)
        return seconds


class Chatty(Task):
    def work(self, n):
        import logging

        for i in range(n):
            print(f"line {i} of {n}")
        logging.getLogger("chatty").warning("a warning from the task")
        return n


def actors(cluster, *args: str, keys: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "actors", *args, "--master", cluster.address,
                           "--keys", keys or cluster.keys_dir], capture_output=True, text=True,
                          timeout=90)


def test_cancel_stops_a_running_task_of_the_same_key(cluster, client) -> None:
    running = client.submit(Sleeps, 60)
    wait_until(lambda: running.status == "running", 60, "the task to run")
    bad = actors(cluster, "cancel", running.task_id, "--grace", "-1")
    assert bad.returncode == 2 and bad.stderr == "error: grace is seconds from 0 to 600, not -1.0\n"
    assert running.status == "running"  # (nothing was sent)
    shown = actors(cluster, "cancel", running.task_id, "--grace", "0")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == f"task {running.task_id} cancelled\n"
    # The task's own client hears of it as if it had cancelled it itself.
    wait_until(running.cancelled, 30, "the submitting client to see the cancel")
    again = actors(cluster, "cancel", running.task_id, "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == {"task_id": running.task_id, "status": "cancelled",
                                        "cancelled": True}
    done = client.submit(Sleeps, 0)
    done.result(timeout=60)
    late = actors(cluster, "cancel", done.task_id, "--json")
    assert json.loads(late.stdout)["status"] == "done" and late.returncode == 0
    assert "had already ended: done" in actors(cluster, "cancel", done.task_id).stdout


def test_story_tells_a_tasks_changes_as_a_table_and_as_json(cluster, client) -> None:
    fut = client.submit(Sleeps, 0)
    fut.result(timeout=60)
    table = actors(cluster, "story", fut.task_id)
    assert table.returncode == 0, table.stderr
    assert re.search(r"^\d\d:\d\d:\d\d\.\d{3}  task\s+queued -> running\s+master: ", table.stdout,
                     re.M), table.stdout
    assert re.search(r"task\s+running -> done", table.stdout), table.stdout
    doc = json.loads(actors(cluster, "story", fut.task_id, "--json").stdout)
    moves = [(e["key"], e["start"], e["finish"]) for e in doc]
    assert ("task", "queued", "running") in moves and ("task", "running", "done") in moves
    assert all(e["time"] > time.time() - 600 for e in doc)  # wall-clock seconds


def test_logs_prints_what_a_task_printed_and_logged(cluster, client) -> None:
    fut = client.submit(Chatty, 5)
    assert fut.result(timeout=60) == 5
    # The master keeps the lines it forwarded; they reach it before the task's end.
    shown = actors(cluster, "logs", fut.task_id)
    assert shown.returncode == 0, shown.stderr
    printed = [line for line in shown.stdout.splitlines() if "line " in line]
    assert [line.split(": ", 1)[1] for line in printed] == [f"line {i} of 5" for i in range(5)]
    assert re.match(r"\d\d:\d\d:\d\d\.\d{3} \S+/w\d+ stdout: line 0 of 5$", printed[0])
    assert re.search(r" WARNING: a warning from the task$", shown.stdout, re.M), shown.stdout
    doc = json.loads(actors(cluster, "logs", fut.task_id, "--json", "--limit", "3").stdout)
    assert doc["task_id"] == fut.task_id
    assert len(doc["lines"]) == 3 and doc["dropped"] == 3  # 6 lines, the newest 3 shown
    assert doc["lines"][0]["text"] == "line 3 of 5" and doc["lines"][0]["stream"] == "stdout"
    assert doc["lines"][0]["worker"].startswith("node-")
    quiet = client.submit(Sleeps, 0)
    quiet.result(timeout=60)
    assert actors(cluster, "logs", quiet.task_id).stdout == f"task {quiet.task_id}: no output kept\n"


@pytest.mark.parametrize("command", ["cancel", "story", "logs"])
def test_an_unknown_id_or_another_keys_task_is_an_error(cluster, client, command: str) -> None:
    unknown = actors(cluster, command, "NoSuchTask-0123456789ab")
    assert unknown.returncode == 2 and unknown.stdout == ""
    assert unknown.stderr == ("error: no task 'NoSuchTask-0123456789ab' submitted with this key "
                              "on this master (unknown, or forgotten after it ended)\n")
    as_json = actors(cluster, command, "NoSuchTask-0123456789ab", "--json")
    assert as_json.returncode == 2 and as_json.stdout == "" and "error: no task" in as_json.stderr
    running = client.submit(Sleeps, 60)
    try:
        wait_until(lambda: running.status == "running", 60, "the task to run")
        other = subprocess.run(
            [sys.executable, "-m", "actors", "keys", "add", cluster.keys_dir,
             f"other{command}{os.getpid()}", "--role", "client"], capture_output=True, text=True,
            timeout=60)
        folder = re.search(r"hand (\S+) to that client", other.stdout)[1]
        stranger = actors(cluster, command, running.task_id, keys=folder)
        # Word for word the answer for an id never used: it does not tell the task exists.
        assert stranger.returncode == 2
        assert stranger.stderr == unknown.stderr.replace("NoSuchTask-0123456789ab",
                                                         running.task_id)
        assert client.tasks(5)[0].status == "running"  # (a stranger's cancel did nothing)
    finally:
        running.cancel(timeout=30)


def test_a_local_cluster_serves_its_dashboard_and_says_where(cluster) -> None:
    import urllib.request

    assert cluster.dashboard_url.startswith("http://127.0.0.1:") and "?token=" in cluster.dashboard_url
    with urllib.request.urlopen(cluster.dashboard_url, timeout=30) as page:
        assert page.status == 200 and b"pydra-actors dashboard" in page.read()
    assert cluster.dashboard_url in cluster._repr_html_()
