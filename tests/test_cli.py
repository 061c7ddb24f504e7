"""The command lines a user types: keys, master, node."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import stat
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from actors import Client, Task
from tests.conftest import (
    alive,
    children,
    descendants,
    kill_all,
    log_events,
    python,
    python_logged,
    start_master,
    wait_until,
)

pytestmark = pytest.mark.processes


class Hostname(Task):
    def work(self):
        return os.getpid()


class Fails(Task):
    def work(self):
        raise ValueError("expected")


class Waits(Task):
    def work(self, gate):
        import time

        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)


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


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_master_runs_until_ctrl_c_or_sigterm_then_every_child_is_gone(
    tmp_path: Path, stop: signal.Signals
) -> None:
    master, address = start_master(tmp_path, "--workers", "2", "--keys", str(tmp_path / "keys"))
    pids: set[int] = set()
    try:
        with Client(address, keys=tmp_path / "keys") as client:
            client.wait_for_workers(2)
            assert client.submit(Hostname).result(timeout=30) > 0
        pids = descendants(master.pid)
        assert len(pids) >= 2  # its node's two workers (the node runs inside it)
        events = [e["event"] for e in log_events(tmp_path / "master.log")]
        assert "node_joined" in events
        assert "node_lost" not in events  # the local node was never taken for dead
        master.send_signal(stop)
        assert master.wait(30) == 0
        wait_until(lambda: not any(alive(p) for p in pids), 20, "the master's children to end")
        # Its node stopping with it said so: a node that left, not one lost (a warning).
        assert "node_lost" not in [e["event"] for e in log_events(tmp_path / "master.log")]
        events = [e["event"] for e in log_events(tmp_path / "master.log")]
        assert events.count("master_stopping") == events.count("master_stopped") == 1
    finally:
        kill_all(pids | {master.pid})
        master.wait(10)


def test_a_node_joins_a_running_master_and_its_loss_is_seen(tmp_path: Path) -> None:
    keys = str(tmp_path / "keys")
    # A minute of silence allowed: the loss must be seen by its connection closing, not waited out.
    master, address = start_master(tmp_path, "--workers", "0", "--keys", keys, "--node-timeout", "60")
    node = None
    pids: set[int] = set()
    try:
        node = python("-m", "actors.node", "--master", address, "--workers", "1", "--keys", keys,
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with Client(address, keys=keys) as client:
            client.wait_for_workers(1)
            assert client.submit(Hostname).result(timeout=30) in descendants(node.pid)
            pids = descendants(node.pid)
            os.kill(node.pid, signal.SIGKILL)  # no Bye: the master must notice the closed socket
            wait_until(lambda: client.info().workers == 0, 30, "the master to drop the node")
        events = log_events(tmp_path / "master.log")
        joined = [e for e in events if e["event"] == "node_joined"]
        suspect = [e for e in events if e["event"] == "node_suspect"]
        lost = [e for e in events if e["event"] == "node_lost"]
        assert joined and suspect and lost and "connection closed" in lost[0]["reason"]
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


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_master_stopped_by_a_signal_stops_its_run_script_and_says_so_in_its_code(
        tmp_path: Path, signum: int) -> None:
    """A master running a script (``--run``) and stopped alone (``kill``, systemd, ``timeout``)
    exited 0 and left the script running, to fail 10 s later with MasterLost. The script is
    told the same signal now, and the master's code is 128 + its number."""
    script = tmp_path / "job.py"
    started = tmp_path / "started"
    script.write_text(
        "import pathlib, sys, time\nfrom actors import Client\n"
        "with Client() as c:\n"
        f"    pathlib.Path({str(started)!r}).write_text(str(c.submit(pow, 2, 5).result(30)))\n"
        "    time.sleep(120)\n")
    master = subprocess.Popen(
        [sys.executable, "-m", "actors.master", "--port", "0", "--workers", "1", "--no-banner",
         "--keys", str(tmp_path / "keys"), "--run", str(script)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started_by_master: set[int] = set()
    try:
        wait_until(lambda: started.exists() and started.read_text() == "32", 60, "the script's result")
        started_by_master = descendants(master.pid)
        # (its workers, forked by the master, show its command line, the script's name in it)
        (script_pid,) = [pid for pid in children(master.pid)
                         if str(script) in (line := Path(f"/proc/{pid}/cmdline").read_text())
                         and "actors.master" not in line]
        master.send_signal(signum)
        assert master.wait(60) == 128 + signum
        assert not alive(script_pid)
    finally:
        kill_all(started_by_master | descendants(master.pid) | {master.pid})


def test_a_run_script_outlives_workers_that_die_under_the_node_inside_its_master(
        tmp_path: Path) -> None:
    """A node ends what each exited worker left behind: the children of the process it runs in
    that are not its workers (a task's processes, adopted by the node as their subreaper).
    Inside its master, the master's own --run script is one of those children, and must live."""
    done_file = tmp_path / "done"
    script = tmp_path / "job.py"
    script.write_text(
        "import os, pathlib, signal\n"
        "from actors import Client\n"
        "def dies():\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "with Client() as c:\n"
        "    try:\n"
        "        c.submit(dies).result(120)\n"
        "    except Exception as exc:\n"
        "        failed = type(exc).__name__\n"
        f"    pathlib.Path({str(done_file)!r}).write_text(failed + ' ' + str(c.submit(pow, 2, 5)"
        ".result(60)))\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    done = subprocess.run(
        [sys.executable, "-m", "actors.master", "--port", "0", "--workers", "1",
         "--keys", str(tmp_path / "keys"), "--no-banner", "--run", str(script)],
        capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done_file.read_text() == "WorkerKilled 32"


@pytest.mark.parametrize("local_node", ["inside", "process"])
def test_a_run_script_whose_cluster_cannot_have_workers_fails_at_once_saying_why(
        tmp_path: Path, local_node: str) -> None:
    """The script's ``Client()`` waits for the master's own node's workers, as a LocalCluster's
    client does: a node that refuses its settings fails it at once with the node's reason,
    instead of its first result's own timeout saying only that the task is not done. (A node
    inside its master refuses before the master starts: the script never runs.)"""
    script = tmp_path / "job.py"
    script.write_text("from actors import Client\nClient()\nprint('connected')\n")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]), ACTORS_FETCH_TIMEOUT="-1")
    done = subprocess.run(
        [sys.executable, "-m", "actors.master", "--port", "0", "--workers", "2",
         "--local-node", local_node, "--keys", str(tmp_path / "keys"), "--run", str(script)],
        capture_output=True, text=True, timeout=120, env=env)
    if local_node == "inside":
        assert done.returncode == 2 and "connected" not in done.stdout, done.stderr[-2000:]
        assert "--fetch-timeout must be more than 0 seconds" in done.stderr, done.stderr[-2000:]
        return
    assert done.returncode == 1 and "connected" not in done.stdout, done.stderr[-2000:]
    assert ("ClusterStartFailed: local cluster did not start: 0 of 2 workers; the master's node "
            "is not running: it refused to start (bad arguments: --fetch-timeout must be more "
            "than 0 seconds)") in done.stderr, done.stderr[-2000:]


def test_a_node_whose_workers_cannot_start_gives_up_and_says_why(tmp_path: Path) -> None:
    """Five worker processes in a row dying before their hello: the node exits (code 1) with
    the reason in its log, instead of respawning forever."""
    keys = str(tmp_path / "keys")
    assert python("-m", "actors", "keys", "init", keys, stdout=subprocess.DEVNULL).wait(30) == 0
    # A port held here, bound but not listening: the node's connection is refused, and no other
    # process can take the port meanwhile.
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]
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
        held.close()
        kill_all({node.pid} | descendants(node.pid))
    events = log_events(tmp_path / "node.log")
    exits = [e for e in events if e["event"] == "worker_exited"]
    assert len(exits) >= 5 and all(e["exitcode"] == 3 for e in exits)
    [gave_up] = [e for e in events if e["event"] == "workers_cannot_start"]
    assert gave_up["attempts"] == 5
    assert any(e["event"] == "node_exiting" and "died on start" in e["reason"] for e in events)


@pytest.mark.parametrize("where", ["home", "ACTORS_KEYS"])
def test_a_master_without_keys_creates_them_on_first_use_and_keeps_them(
    tmp_path: Path, where: str
) -> None:
    env = dict(os.environ, HOME=str(tmp_path / "home"))
    keys = tmp_path / "home" / ".pydra-actors" / "keys"
    if where == "ACTORS_KEYS":
        keys = tmp_path / "elsewhere" / "keys"
        env["ACTORS_KEYS"] = str(keys)
    for run in ("first", "second"):
        master, address = start_master(tmp_path, "--workers", "0", name=run, env=env)
        try:
            assert f"--keys {keys}" in (tmp_path / f"{run}.out").read_text()
            with Client(address, keys=keys) as client:
                assert client.info().workers == 0
            created = [e for e in log_events(tmp_path / f"{run}.log") if e["event"] == "keys_created"]
            if run == "first":
                assert [e["directory"] for e in created] == [str(keys)]
                secret = (keys / "master.key_secret").read_bytes()
                assert {"node.key", "client.key"} <= {p.name for p in (keys / "allowed").iterdir()}
            else:
                assert created == []  # found, not made again
                assert (keys / "master.key_secret").read_bytes() == secret
            master.send_signal(signal.SIGTERM)
            assert master.wait(30) == 0
        finally:
            kill_all({master.pid})
            master.wait(10)


def test_logs_are_json_lines_off_a_terminal_and_console_lines_on_one(tmp_path: Path) -> None:
    master, _ = start_master(tmp_path, "--workers", "0", "--keys", str(tmp_path / "keys"),
                             "--log-format", "auto")
    try:
        started = [e for e in log_events(tmp_path / "master.log") if e["event"] == "master_started"]
        assert [(e["level"], e["workers"]) for e in started] == [("info", 0)]
        assert "timestamp" in started[0]
    finally:
        kill_all({master.pid})
        master.wait(10)
    # On a terminal: one readable line per event, no JSON.
    controller, terminal = os.openpty()
    master = python("-m", "actors.master", "--port", "0", "--workers", "0", "--keys",
                    str(tmp_path / "keys"), stdout=subprocess.DEVNULL, stderr=terminal,
                    cwd=tmp_path)
    os.close(terminal)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"master_started" not in seen and time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.5)
            if ready:
                seen += os.read(controller, 65536)
    finally:
        kill_all({master.pid})
        master.wait(10)
        os.close(controller)
    text = seen.decode(errors="replace")
    [line] = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in text.splitlines()
              if "master_started" in line]  # colours stripped
    assert re.search(r"\[info +\] master_started .*workers=0", line), line
    assert not line.lstrip().startswith("{")


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_task_logs_its_submission_and_result_at_debug_and_its_failure_at_info(
    tmp_path: Path, level: str
) -> None:
    env = dict(os.environ, ACTORS_LOG_LEVEL=level)
    master, address = start_master(tmp_path, "--workers", "1", "--keys", str(tmp_path / "keys"),
                                   env=env)
    pids: set[int] = set()
    try:
        with Client(address, keys=tmp_path / "keys") as client:
            ok = client.submit(Hostname)
            assert ok.result(timeout=30) > 0
            with pytest.raises(ValueError, match="expected"):
                client.submit(Fails).result(timeout=30)
            cancelled = client.submit(Waits, str(tmp_path / "never"))
            wait_until(lambda: client.info().tasks_running == 1, 30, "the task to start")
            assert cancelled.cancel(timeout=20)
        pids = descendants(master.pid)
        master.send_signal(signal.SIGTERM)
        assert master.wait(30) == 0
    finally:
        kill_all(pids | {master.pid})
        master.wait(10)
    levels = {(e["event"], e.get("task_id")): e["level"] for e in log_events(tmp_path / "master.log")}
    assert levels[("task_erred", next(k for e, k in levels if e == "task_erred"))] == "info"
    assert levels[("task_cancelled", cancelled.task_id)] == "info"
    per_task = {(e, k): v for (e, k), v in levels.items() if e in ("task_submitted", "task_done")}
    if level == "debug":
        assert per_task[("task_submitted", ok.task_id)] == "debug"
        assert per_task[("task_done", ok.task_id)] == "debug"
    else:
        assert per_task == {}


@pytest.mark.processes
def test_status_shows_a_running_cluster_to_a_person_and_to_a_script(cluster, client) -> None:
    """``python -m actors status``: nodes, workers, tasks, the master's id and version, as a
    table and as JSON; a master that is not there is an error, not a hang."""
    blocker = client.submit(Sleeps, 30)
    wait_until(lambda: client.info().tasks_running >= 1, 60, "a task to run")
    try:
        args = ["-m", "actors", "status", "--master", cluster.address, "--keys", cluster.keys_dir]
        shown = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                               timeout=60)
        assert shown.returncode == 0, shown.stderr
        assert re.search(r"tasks: [1-9]\d* running", shown.stdout), shown.stdout
        assert re.search(rf"workers: {cluster.workers} \(\d+ idle\) on 1 nodes", shown.stdout)
        scripted = subprocess.run([sys.executable, *args, "--json"], capture_output=True,
                                  text=True, timeout=60)
        doc = json.loads(scripted.stdout)
        assert doc["workers"]["total"] == cluster.workers and doc["tasks"]["running"] >= 1
        assert [n["workers"] for n in doc["nodes"]] == [cluster.workers]
        assert doc["master_id"].startswith("master-") and doc["version"]
    finally:
        blocker.cancel(timeout=30)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    missing = subprocess.run([sys.executable, "-m", "actors", "status", "--master",
                              f"127.0.0.1:{port}", "--keys", cluster.keys_dir, "--timeout", "2"],
                             capture_output=True, text=True, timeout=90)
    assert missing.returncode == 2 and "error:" in missing.stderr


class Sleeps(Task):
    def work(self, seconds):
        time.sleep(seconds)
        return seconds


@pytest.mark.processes
def test_tasks_lists_what_was_submitted_with_the_same_key_and_nothing_of_other_keys(
        cluster, client, tmp_path: Path) -> None:
    """``python -m actors tasks`` (another client, the same key) lists a notebook's tasks with
    status, progress and times; a client with a key of its own sees none of them."""
    done = client.submit(Sleeps, 0)
    done.result(timeout=60)
    running = client.submit(Sleeps, 30)
    wait_until(lambda: any(t.task_id == running.task_id and t.status == "running"
                           for t in client.tasks()), 60, "the task to be listed as running")
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "actors", "tasks", "--master", cluster.address, "--keys",
             cluster.keys_dir, "--json"], capture_output=True, text=True, timeout=60)
        assert listed.returncode == 0, listed.stderr
        by_id = {t["task_id"]: t for t in json.loads(listed.stdout)}
        assert by_id[done.task_id]["status"] == "done" and by_id[done.task_id]["ended"] > 0
        assert by_id[running.task_id]["status"] == "running"
        assert by_id[running.task_id]["started"] >= by_id[running.task_id]["submitted"] > 0
        assert list(by_id).index(running.task_id) < list(by_id).index(done.task_id)  # newest first
        table = subprocess.run(
            [sys.executable, "-m", "actors", "tasks", "--master", cluster.address, "--keys",
             cluster.keys_dir], capture_output=True, text=True, timeout=60)
        assert re.search(rf"{running.task_id}\s+running", table.stdout), table.stdout
        assert table.stdout.split()[:3] == ["TASK", "STATUS", "PROGRESS"], table.stdout
        other = subprocess.run(
            [sys.executable, "-m", "actors", "keys", "add", cluster.keys_dir, f"other{os.getpid()}",
             "--role", "client"], capture_output=True, text=True, timeout=60)
        folder = re.search(r"hand (\S+) to that client", other.stdout)[1]
        with Client(cluster.address, keys=folder) as stranger:
            assert stranger.tasks() == []
    finally:
        running.cancel(timeout=30)


@pytest.mark.parametrize(("args", "message"), [
    ([], "the following arguments are required: HOST"),
    (["--workers", "0", "h"], "argument --workers: 0 is less than 1"),
    (["--port", "70000", "h"], "argument --port: 70000 is not a port"),
    (["-i", "/nonexistent/key", "h"], "error: no identity file /nonexistent/key"),
    (["--", "-oProxyCommand=x"], "'-oProxyCommand=x' is not a host"),
    (["--master-address", "10.0.0.1:5555", "h"], "without a port: the port is --port"),
    (["--connect-timeout", "-1", "h"], "argument --connect-timeout: -1 is negative"),
], ids=["no-host", "no-workers", "bad-port", "no-identity", "option-as-host", "address-port",
        "negative-timeout"])
def test_ssh_with_bad_arguments_is_a_usage_error_before_anything_starts(
    tmp_path: Path, args: list[str], message: str
) -> None:
    done = subprocess.run([sys.executable, "-m", "actors", "ssh", "--keys",
                           str(tmp_path / "keys"), *args], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "usage: python -m actors ssh" in done.stderr
    assert not (tmp_path / "keys").exists()  # nothing started, not even keys made


@pytest.mark.parametrize("value", ["0", "-3", "nan"])
def test_a_node_refuses_a_fetch_timeout_that_is_not_a_positive_time(value: str) -> None:
    done = subprocess.run([sys.executable, "-m", "actors.node", "--master",
                           "tcp://127.0.0.1:9", "--fetch-timeout", value, "--log-format", "json"],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "--fetch-timeout must be more than 0 seconds" in done.stderr


def test_a_local_node_whose_master_is_killed_as_it_starts_stops_too(tmp_path: Path) -> None:
    """The master is killed outright while its node is still starting (before the node looks
    at its parent): the node knows whose end to watch all the same, and stops."""
    for attempt in range(3):
        master, _ = start_master(tmp_path, "--workers", "1", "--keys", str(tmp_path / "keys"),
                                 name=f"master{attempt}")
        node: set[int] = wait_until(partial(descendants, master.pid), 30,  # type: ignore[assignment]
                                    "the master's node")
        os.kill(master.pid, signal.SIGKILL)
        master.wait(10)
        try:
            wait_until(partial(_all_gone, node), 20, "the orphaned node to stop")
        finally:
            kill_all(node)


def _all_gone(pids: set[int]) -> bool:
    return not any(alive(pid) for pid in pids)


def test_a_master_started_with_exit_with_parent_stops_when_its_parent_is_killed(
        tmp_path: Path) -> None:
    # What python -m actors ssh relies on: a launcher killed outright leaves no master behind.
    ready = tmp_path / "ready.json"
    parent = python("-c", "import subprocess, sys, time\n"
                    "m = subprocess.Popen([sys.executable, '-m', 'actors.master', '--port', '0', "
                    "'--workers', '0', '--no-banner', '--ephemeral', '--keys', sys.argv[1], "
                    "'--ready-file', sys.argv[2], '--exit-with-parent'], stderr=open(sys.argv[3], 'w'))\n"
                    "print(m.pid, flush=True)\ntime.sleep(600)\n",
                    str(tmp_path / "keys"), str(ready), str(tmp_path / "master.log"),
                    stdout=subprocess.PIPE)
    master_pid = 0
    try:
        assert parent.stdout is not None
        master_pid = int(parent.stdout.readline())
        wait_until(ready.exists, 30, "the master to be ready")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        wait_until(lambda: not alive(master_pid), 20, "the orphaned master to stop")
        assert "parent_gone" in (tmp_path / "master.log").read_text()
    finally:
        kill_all({parent.pid} | ({master_pid} if master_pid else set()))
        parent.wait(10)
        if parent.stdout is not None:
            parent.stdout.close()


def test_a_ready_file_that_is_a_fifo_gets_the_address_and_stays_a_fifo(tmp_path: Path) -> None:
    # A launcher reading the address from a pipe (or --ready-file /dev/stdout): the file is
    # written to, not renamed over; as root, a rename put a regular file in /dev/null's place
    # (the bench's --json /dev/null did, and every later test that opened it failed).
    fifo = tmp_path / "ready"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    master = python_logged(tmp_path / "master.log", "-m", "actors.master", "--port", "0",
                           "--workers", "0", "--no-banner", "--ephemeral",
                           "--keys", str(tmp_path / "keys"), "--ready-file", str(fifo))
    text = b""

    def read_all() -> bool:
        nonlocal text
        with contextlib.suppress(BlockingIOError):  # (nothing written yet)
            text += os.read(reader, 65536)
        return text.endswith(b"}")

    try:
        wait_until(read_all, 30, "the master's ready line in the FIFO")
        ready = json.loads(text)
        assert ready["pid"] == master.pid and ready["address"].startswith("tcp://")
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith("tmp")] == []
    finally:
        os.close(reader)
        kill_all({master.pid})
        master.wait(10)


def test_the_log_level_option_sets_what_the_master_and_its_node_log(tmp_path: Path) -> None:
    """--log-level warning: neither the master's start nor its node's joining (info) is logged;
    the same master at its default logs both."""
    def events(name: str, *args: str) -> list[dict[str, object]]:
        keys = str(tmp_path / "keys")
        master, address = start_master(tmp_path, "--workers", "1", "--keys", keys, *args,
                                       name=name, env={**os.environ, "ACTORS_LOG_LEVEL": ""})
        try:
            with Client(address, keys=keys, timeout=60) as c:
                c.wait_for_workers(1, 60)
        finally:
            kill_all(descendants(master.pid) | {master.pid})
            master.wait(10)
        return log_events(tmp_path / f"{name}.log")

    quiet = events("quiet", "--log-level", "warning")
    assert not [e for e in quiet if e["level"] in ("info", "debug")], quiet[:5]
    default = {e["event"] for e in events("default")}
    assert {"master_started", "node_joined"} <= default, default


def test_a_command_without_a_master_says_where_one_comes_from() -> None:
    """It said only "the following arguments are required: --master", though the command
    takes $ACTORS_ADDRESS too (as a --run script has it)."""
    env = {k: v for k, v in os.environ.items() if k != "ACTORS_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "actors", "tasks"], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 2 and "give --master HOST:PORT, or set $ACTORS_ADDRESS" in done.stderr
