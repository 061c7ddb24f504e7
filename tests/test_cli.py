"""The command lines a user types: keys, master, node."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from actors import Client, Task
from tests.conftest import alive, descendants, kill_all, python, wait_until

pytestmark = pytest.mark.processes


class Hostname(Task):
    def work(self):
        return os.getpid()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_keys_init_creates_pairs_and_the_allow_list(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "actors", "keys", "init", str(tmp_path / "k")],
                         capture_output=True, text=True, timeout=60, check=True)
    assert "created CURVE keys" in out.stdout
    files = {p.relative_to(tmp_path / "k").as_posix() for p in (tmp_path / "k").rglob("*")}
    for role in ("master", "node", "client"):
        assert {f"{role}.key", f"{role}.key_secret"} <= files
    assert {"allowed/node.key", "allowed/client.key"} <= files
    assert "allowed/master.key" not in files
    assert (tmp_path / "k" / "client.key_secret").stat().st_mode & 0o077 == 0
    again = subprocess.run([sys.executable, "-m", "actors", "keys", "init", str(tmp_path / "k")],
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "already exist" in again.stderr


def test_master_runs_until_sigterm_then_every_child_is_gone(tmp_path: Path) -> None:
    port = free_port()
    with open(tmp_path / "master.log", "w") as log_file:
        master = python("-m", "actors.master", "--port", str(port), "--workers", "2",
                        "--keys", str(tmp_path / "keys"), "--log-format", "json",
                        stdout=subprocess.PIPE, stderr=log_file)
    pids: set[int] = set()
    try:
        assert master.stdout is not None
        banner = master.stdout.readline()
        assert f"tcp://127.0.0.1:{port}" in banner
        with Client(f"tcp://127.0.0.1:{port}", keys=tmp_path / "keys") as client:
            client.wait_for_workers(2)
            assert client.submit(Hostname).result(timeout=30) > 0
        pids = descendants(master.pid)
        assert len(pids) >= 3  # a node and its two workers
        events = [json.loads(line)["event"] for line in
                  (tmp_path / "master.log").read_text().splitlines() if line.startswith("{")]
        assert "node_joined" in events
        assert "node_lost" not in events  # the local node was never taken for dead
        master.send_signal(signal.SIGTERM)
        assert master.wait(30) == 0
        wait_until(lambda: not any(alive(p) for p in pids), 20, "the master's children to end")
    finally:
        kill_all(pids | {master.pid})
        master.wait(10)
        assert master.stdout is not None
        master.stdout.close()


def test_a_node_joins_a_running_master_and_its_loss_is_seen(tmp_path: Path) -> None:
    port = free_port()
    keys = str(tmp_path / "keys")
    with open(tmp_path / "master.log", "w") as log_file:
        master = python("-m", "actors.master", "--port", str(port), "--workers", "0",
                        "--keys", keys, "--node-timeout", "2", "--log-format", "json",
                        stdout=subprocess.DEVNULL, stderr=log_file)
    address = f"tcp://127.0.0.1:{port}"
    node = None
    pids: set[int] = set()
    try:
        wait_until(lambda: (tmp_path / "keys" / "allowed").is_dir(), 30, "the master's keys")
        node = python("-m", "actors.node", "--master", address, "--workers", "1", "--keys", keys,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with Client(address, keys=keys) as client:
            client.wait_for_workers(1)
            assert client.submit(Hostname).result(timeout=30) in descendants(node.pid)
            pids = descendants(node.pid)
            os.kill(node.pid, signal.SIGKILL)  # no Bye: the master must notice the silence
            wait_until(lambda: client.info().workers == 0, 30, "the master to drop the node")
        events = [json.loads(line) for line in (tmp_path / "master.log").read_text().splitlines()
                  if line.startswith("{")]
        joined = [e for e in events if e["event"] == "node_joined"]
        lost = [e for e in events if e["event"] == "node_lost"]
        assert joined and lost and "silent" in lost[0]["reason"]
        # The node's workers notice their node is gone and exit on their own.
        wait_until(lambda: not any(alive(p) for p in pids), 20, "orphaned workers to exit")
    finally:
        kill_all(pids | {master.pid} | ({node.pid} if node else set()))
        master.wait(10)
        if node:
            node.wait(10)


def test_run_flag_runs_a_script_and_exits_with_its_code(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text(
        "import sys\nfrom actors import Client\nfrom tests.test_cli import Hostname\n"
        "with Client() as c:\n    print('pid', c.submit(Hostname).result(timeout=30))\n"
        "sys.exit(3)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run(
        [sys.executable, "-m", "actors.master", "--port", "0", "--workers", "1",
         "--keys", str(tmp_path / "keys"), "--run", str(script)],
        capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 3, done.stderr[-2000:]
    assert "pid " in done.stdout


def test_a_node_whose_workers_cannot_start_gives_up_and_says_why(tmp_path: Path) -> None:
    """Five worker processes in a row dying before their hello: the node exits (code 1) with
    the reason in its log, instead of respawning forever."""
    port = free_port()
    keys = str(tmp_path / "keys")
    assert python("-m", "actors", "keys", "init", keys, stdout=subprocess.DEVNULL).wait(30) == 0
    broken = tmp_path / "broken"
    broken.mkdir()
    # Every python that starts with PYTHONPATH=broken imports this; only workers die of it
    # (spawned ones: --no-prefork, as a forked worker starts no interpreter).
    (broken / "sitecustomize.py").write_text(
        "import os, sys\n"
        "if 'actors.worker' in sys.orig_argv:\n"
        "    os._exit(3)\n")
    env = dict(os.environ, PYTHONPATH=f"{broken}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with open(tmp_path / "node.log", "w") as log_file:
        node = subprocess.Popen(
            [sys.executable, "-m", "actors.node", "--master", f"tcp://127.0.0.1:{port}",
             "--workers", "2", "--keys", keys, "--log-format", "json", "--no-prefork"],
            env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    try:
        assert node.wait(60) == 1
    finally:
        kill_all({node.pid} | descendants(node.pid))
    events = [json.loads(line) for line in (tmp_path / "node.log").read_text().splitlines()
              if line.startswith("{")]
    exits = [e for e in events if e["event"] == "worker_exited"]
    assert len(exits) >= 5 and all(e["exitcode"] == 3 for e in exits)
    [gave_up] = [e for e in events if e["event"] == "workers_cannot_start"]
    assert gave_up["attempts"] == 5
    assert any(e["event"] == "node_exiting" and "died on start" in e["reason"] for e in events)
