"""A LocalCluster forked from its caller: only where that is safe, and then like a spawned one.

A script (one thread, a small heap) gets its master and node forked from it, with the cluster's
imports done, rather than fresh interpreters: what a user relies on is that nothing else
changes. The same process tree and results; nothing of the caller's kept open in the master (a
pipe the caller closes reaches its end); none of the caller's ``atexit`` handlers run twice; a
caller running threads, or holding a large heap, gets fresh interpreters as before. Each check
runs in a script of its own: the test process runs threads, and its state is not a script's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from actors import Client, LocalCluster, Task
from actors.local_start import FORK_MAX_RSS
from tests.conftest import alive, children, cmdline, descendants, kill_all, python, wait_until

pytestmark = pytest.mark.processes

SCRIPT_TIMEOUT_S = 90


class Square(Task):
    def work(self, x):
        return x * x


def _run(code: str, tmp_path: Path) -> dict:
    """Run ``code`` as a script; the JSON object it prints last. Every process it left is killed."""
    proc = python("-c", code, str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    finally:
        kill_all(descendants(proc.pid) | {proc.pid})
        proc.wait(10)
    assert proc.returncode == 0, f"the script failed:\n{err}"
    return dict(json.loads(out.strip().splitlines()[-1]))


_PREAMBLE = """
import atexit, json, os, sys, threading
from pathlib import Path
from actors import Client, LocalCluster, Task

class Square(Task):
    def work(self, x):
        return x * x

here = Path(sys.argv[1])
def tree(pid):
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parents[int(entry)] = int(Path(f"/proc/{entry}/stat").read_text()
                                          .rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return {str(k): tree(k) for k, parent in parents.items() if parent == pid}
def cmdline(pid):
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\\0", b" ").decode()
"""


def test_a_script_forks_its_cluster_which_then_runs_as_a_spawned_one(tmp_path: Path) -> None:
    result = _run(_PREAMBLE + """
atexit.register(lambda: open(here / "atexit", "a").write(f"{os.getpid()}\\n"))
read_end, write_end = os.pipe()
with LocalCluster(workers=2) as cluster, Client(cluster) as client:
    client.wait_for_workers(2)
    answer = client.submit(Square, 9).result(timeout=30)
    os.close(write_end)  # the master must not hold a copy: the reader sees the end now
    os.set_blocking(read_end, False)
    try:
        pipe_end = os.read(read_end, 1) == b""
    except BlockingIOError:
        pipe_end = False
    print(json.dumps({"forked": cluster.forked, "answer": answer, "pipe_end": pipe_end,
                      "tree": tree(cluster.pid), "master": cluster.pid,
                      "same_cmdline": cmdline(cluster.pid) == cmdline(os.getpid()),
                      "master_stdin": os.readlink(f"/proc/{cluster.pid}/fd/0"),
                      "own_session": os.getsid(cluster.pid) == cluster.pid,
                      "script": os.getpid()}), flush=True)
""", tmp_path)
    assert result["forked"] and result["same_cmdline"], "a script's cluster is forked from it"
    assert result["answer"] == 81
    # master -> 2 workers, as when spawned (its node runs inside it: --local-node inside)
    assert len(result["tree"]) == 2
    assert result["pipe_end"], "the forked master kept the script's pipe open"
    assert result["master_stdin"] == "/dev/null" and result["own_session"]
    # The script's atexit handler ran once, in the script: not in the master, node or workers.
    assert (tmp_path / "atexit").read_text().split() == [str(result["script"])]
    pids = {int(result["master"]), *map(int, result["tree"])}
    assert not any(alive(pid) for pid in pids)


def test_a_script_that_used_a_cluster_hard_still_forks_the_next_one(tmp_path: Path) -> None:
    """Thousands of submissions (the client's batched frames reach hundreds of KiB) leave the
    script with its one thread: a zero-copy send there would start pyzmq's garbage collector
    thread for good, and every later cluster of the script would start fresh interpreters."""
    result = _run(_PREAMBLE + """
class Padded(Task):
    def work(self, x, pad):
        return x * x

with LocalCluster(workers=1) as cluster, Client(cluster) as client:
    total = sum(f.result(60) for f in client.map(Padded, [x % 7 for x in range(4_000)],
                                                  pad=b"x" * 200))
with LocalCluster(workers=1) as cluster, Client(cluster) as client:
    print(json.dumps({"total": total, "forked": cluster.forked,
                      "answer": client.submit(Square, 5).result(30)}), flush=True)
""", tmp_path)
    assert result == {"total": sum((x % 7) ** 2 for x in range(4_000)), "forked": True,
                      "answer": 25}


@pytest.mark.parametrize("why", ["a thread", "a large heap", "a worker memory limit"])
def test_a_caller_that_may_not_fork_gets_fresh_interpreters(tmp_path: Path, why: str) -> None:
    setup = {"a thread": "threading.Thread(target=threading.Event().wait, daemon=True).start()",
             "a large heap": f"heap = b'x' * {FORK_MAX_RSS + (32 << 20)}",
             # the caller's pages would count against the workers' limit and pause mark
             "a worker memory limit": "os.environ['ACTORS_WORKER_PAUSE'] = '1G'"}[why]
    result = _run(_PREAMBLE + setup + """
with LocalCluster(workers=1) as cluster, Client(cluster) as client:
    print(json.dumps({"forked": cluster.forked, "answer": client.submit(Square, 4).result(30),
                      "master": cmdline(cluster.pid)}), flush=True)
""", tmp_path)
    assert result == {"forked": False, "answer": 16, "master": result["master"]}
    assert "actors.master" in result["master"] and sys.executable in result["master"]


def test_fork_false_starts_fresh_interpreters() -> None:
    with LocalCluster(workers=1, fork=False) as cluster, Client(cluster) as client:
        assert not cluster.forked
        assert client.submit(Square, 5).result(timeout=30) == 25
        (worker,) = children(cluster.pid)  # forked by the master, its node inside it
        assert "actors.master" in cmdline(worker) and "actors.master" in cmdline(cluster.pid)
        pids = descendants(cluster.pid) | {cluster.pid}
    wait_until(lambda: not any(alive(p) for p in pids), 20, "every cluster process to end")


_FORK_CALLS = """
import json, os, signal, subprocess, sys, time
from actors.forking import ForkedProcess, fork_call, fork_is_safe

report = {"safe": fork_is_safe()}
report["returned"] = fork_call(lambda: 3, args=["three"]).wait(10)
report["exited"] = fork_call(lambda: sys.exit(5), args=["five"]).wait(10)
def boom():
    raise RuntimeError("boom")
report["raised"] = fork_call(boom, args=["boom"]).wait(10)
env = fork_call(lambda: 0 if os.environ == {"ONLY": "this"} else 1, args=["env"],
                env={"ONLY": "this"})
report["env"] = env.wait(10)
import logging
logging.basicConfig(filename=os.devnull)  # a handler of the caller's own
report["logging"] = fork_call(lambda: len(logging.getLogger().handlers), args=["log"]).wait(10)
import io
captured, sys.stderr = sys.stderr, io.StringIO()  # the caller's own capture
report["stderr"] = fork_call(lambda: print("written by the child", file=sys.stderr) or 0,
                             args=["stderr"]).wait(10)
sys.stderr = captured
sleeper = fork_call(lambda: time.sleep(600) or 0, args=["sleeper"])
try:
    sleeper.wait(0.05)
except subprocess.TimeoutExpired as exc:
    report["timeout"] = exc.cmd
sleeper.kill()
report["killed"] = sleeper.wait(10)
report["poll_after"] = sleeper.poll()
print(json.dumps(report), flush=True)
"""


def test_a_forked_call_exits_with_what_its_target_returns_raises_or_exits_with() -> None:
    proc = python("-c", _FORK_CALLS, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=SCRIPT_TIMEOUT_S)
    finally:
        kill_all(descendants(proc.pid) | {proc.pid})
        proc.wait(10)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert report["safe"], "a fresh interpreter runs one thread"
    assert (report["returned"], report["exited"], report["raised"]) == (3, 5, 70)
    assert "RuntimeError: boom" in err  # the child's traceback, on its inherited stderr
    assert report["env"] == 0
    assert report["logging"] == 0, "the child kept the caller's logging handlers"
    assert report["stderr"] == 0 and "written by the child" in err  # not in the caller's StringIO
    assert report["timeout"] == ["sleeper"]
    assert report["killed"] == report["poll_after"] == -9


def test_the_test_process_itself_is_not_taken_for_a_script() -> None:
    """This process runs threads (pytest's, earlier clusters' clients): its clusters must be
    spawned, or a fork would copy locks that those threads hold."""
    import threading

    from actors.forking import fork_is_safe

    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    try:
        assert not fork_is_safe()
    finally:
        stop.set()
        thread.join(10)
