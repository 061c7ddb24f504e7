"""Contained workers: each attack a task could make on its node, performed, and shown to fail
while legitimate work still completes (real processes, real signals; see actors/contain.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from actors import Client, LocalCluster, Task
from actors import messages as m
from actors.contain import make_run_dir, remove_stale_run_dirs
from tests.conftest import (
    alive,
    children,
    descendants,
    kill_all,
    log_events,
    python,
    start_master,
    wait_until,
)

pytestmark = [pytest.mark.processes,
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")]

ROOT = Path(__file__).resolve().parent.parent
SECRET = "PYDRA_NODE_SECRET"


def _readable_by_others(path: str) -> bool:
    parts = os.path.abspath(path).split(os.sep)
    return all(os.stat(os.sep.join(parts[:i]) or os.sep).st_mode & stat.S_IXOTH
               for i in range(2, len(parts) + 1))


def worker_python() -> str | None:
    """An interpreter whose standard library workers of other uids can read: this one, or the
    system's of the same version (a venv under /root is not); None when there is none."""
    if _readable_by_others(sysconfig.get_paths()["stdlib"]):
        return sys.executable
    minor = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    for candidate in (f"/usr/bin/{minor}", f"/usr/local/bin/{minor}"):
        if os.path.exists(candidate) and _readable_by_others(f"/usr/lib/{minor}"):
            return candidate
    return None


# --- what a task tries ------------------------------------------------------------------------


class Hold(Task):
    """Waits (30 s at most) until ``gate`` exists."""

    def work(self, gate: str) -> int:
        deadline = time.monotonic() + 30
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return os.getpid()


class Snoop(Task):
    """Everything a task might reach of its node and its neighbours, and what each attempt got."""

    def work(self, others: list[str]) -> dict[str, object]:
        node = os.getppid()
        seen: dict[str, object] = {"uid": os.getuid(), "pid": os.getpid(), "home": os.environ["HOME"]}
        cmdline = Path(f"/proc/{node}/cmdline").read_bytes().split(b"\0")
        keys = cmdline[cmdline.index(b"--keys") + 1].decode()
        for name, attempt in {
            "node_environ": lambda: Path(f"/proc/{node}/environ").read_bytes(),
            "keys": lambda: os.listdir(keys),
            "node_key": lambda: Path(keys, "node.key_secret").read_bytes(),
            "scratch": lambda: [os.listdir(o) for o in others if o != os.environ["HOME"]],
            "kill_node": lambda: os.kill(node, signal.SIGKILL),
        }.items():
            try:
                attempt()
                seen[name] = "allowed"
            except OSError as exc:
                seen[name] = type(exc).__name__
        Path(os.environ["HOME"], "mine").write_text("a task may write its own scratch folder")
        seen["environ"] = Path("/proc/self/environ").read_bytes().decode(errors="replace")
        seen["env"] = dict(os.environ)
        seen["argv"] = Path("/proc/self/cmdline").read_bytes().decode(errors="replace")
        seen["files"] = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                         if int(fd) > 2 and os.path.exists(f"/proc/self/fd/{fd}")]
        return seen


class Connect(Task):
    def work(self, host: str, port: int) -> str:
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as exc:
            return type(exc).__name__
        return "connected"


class LeavesAProcess(Task):
    """Starts a child that starts a grandchild in a session of its own, and returns at once."""

    def work(self, then: str = "return") -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", "import subprocess\n"
             "p = subprocess.Popen(['sleep', '600'], start_new_session=True,\n"
             "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
             "print(p.pid)"],
            capture_output=True, text=True, check=True)
        grandchild = int(out.stdout)
        if then == "exit":  # a fatal error: the node stops this worker
            raise SystemExit(f"grandchild {grandchild}")
        return grandchild, os.getpid()


class Allocates(Task):
    def work(self, size: int) -> int:
        return len(bytearray(size))


class Pid(Task):
    def work(self) -> int:
        return os.getpid()


# --- a cluster whose workers have uids of their own -----------------------------------------


@dataclass
class Contained:
    client: Client
    address: str
    node: subprocess.Popen[str]
    keys: str
    log: Path


@pytest.fixture(scope="module")
def contained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Contained]:
    """A master and a root node of two workers, each worker a uid of its own, 1 GiB of data
    each, no network; the node's environment holds a secret."""
    if os.geteuid() != 0:
        pytest.skip("workers get uids of their own only under a root node")
    interpreter = worker_python()
    if interpreter is None:
        pytest.skip("no interpreter here that workers of another uid could read")
    tmp = tmp_path_factory.mktemp("contained")
    open_parent = Path(tempfile.mkdtemp(prefix="actors-test-keys-"))
    open_parent.chmod(0o755)  # the keys folder's own mode, not a closed parent, keeps tasks out
    keys = str(open_parent / "keys")
    assert python("-m", "actors", "keys", "init", keys, stdout=subprocess.DEVNULL).wait(30) == 0
    master, address = start_master(tmp, "--workers", "0", "--keys", keys)
    site = sysconfig.get_paths()["purelib"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), site]), **{SECRET: "hunter2"})
    log = tmp / "node.log"
    with open(log, "w") as stderr:
        node = subprocess.Popen(
            [interpreter, "-m", "actors.node", "--master", address, "--keys", keys,
             "--workers", "2", "--log-format", "json", "--worker-memory", "1G"],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        with Client(address, keys=keys) as client:
            client.wait_for_workers(2)
            yield Contained(client, address, node, keys, log)
    finally:
        kill_all({node.pid, master.pid} | descendants(node.pid) | descendants(master.pid))
        node.wait(10)
        master.wait(10)
        subprocess.run(["rm", "-rf", str(open_parent)], check=False)


def scratch_folders(node_pid: int) -> list[str]:
    [run_dir] = Path(tempfile.gettempdir()).glob(f"actors-node-{node_pid}-*")
    return sorted(str(p) for p in run_dir.glob("w*-*"))


def test_a_task_cannot_reach_its_neighbours_scratch_the_keys_or_its_node(
    contained: Contained
) -> None:
    others = scratch_folders(contained.node.pid)
    assert len(others) == 2
    futures = [contained.client.submit(Snoop, others) for _ in range(2)]
    seen = [f.result(timeout=30) for f in futures]
    for s in seen:
        assert s["uid"] not in (0, os.getuid()), s["uid"]
        assert {s[k] for k in ("node_environ", "keys", "node_key", "scratch", "kill_node")} == {
            "PermissionError"}, s
        assert "hunter2" not in str(s["environ"]) + str(s["env"]) + str(s["argv"])
        assert all(f.startswith(("anon_inode:", "socket:")) for f in s["files"]), s["files"]  # type: ignore[union-attr]
        assert stat.S_IMODE(os.stat(str(s["home"])).st_mode) == 0o700
    assert contained.node.poll() is None  # the kill was refused: the node serves on
    assert contained.client.submit(Pid).result(timeout=30) > 0


def test_a_spawned_replacement_worker_is_contained_like_a_forked_one(
    contained: Contained
) -> None:
    """Forked workers are checked above; this replaces one (a fatal error) and checks its
    replacement, a fresh interpreter started by the node's -c script."""
    with pytest.raises(RuntimeError):
        contained.client.submit(LeavesAProcess, "exit").result(timeout=30)
    contained.client.wait_for_workers(2)
    # The warm worker that is left holds a task at a gate, so that the snooping task runs on the
    # replacement (a clean worker; an idle warm one would be preferred).
    gates = tempfile.mkdtemp(prefix="actors-test-gate-", dir="/tmp")
    os.chmod(gates, 0o777)  # where a worker of a uid of its own can look
    try:
        held = contained.client.submit(Hold, os.path.join(gates, "open"))
        wait_until(lambda: held.status == "running", 30, "the warm worker to hold the gated task")
        seen = [contained.client.submit(Snoop, scratch_folders(contained.node.pid)).result(timeout=30)]
        Path(gates, "open").touch()
        held.result(timeout=30)
    finally:
        shutil.rmtree(gates, ignore_errors=True)
    spawned = [s for s in seen if "actors.contain" in str(s["argv"])]
    assert spawned, [s["argv"] for s in seen]
    for s in spawned:
        assert s["uid"] not in (0, os.getuid())
        assert {s[k] for k in ("node_environ", "node_key", "scratch", "kill_node")} == {
            "PermissionError"}, s
        assert "hunter2" not in str(s["environ"]) + str(s["env"]) + str(s["argv"])


def test_a_task_has_no_network_by_default(contained: Contained) -> None:
    host, port = contained.address.removeprefix("tcp://").rsplit(":", 1)
    assert contained.client.submit(Connect, host, int(port)).result(timeout=30) in (
        "ConnectionRefusedError", "OSError")


def test_with_worker_network_a_task_reaches_the_master() -> None:
    with LocalCluster(workers=1, worker_network=True) as cl, Client(cl) as client:
        host, port = cl.address.removeprefix("tcp://").rsplit(":", 1)
        assert client.submit(Connect, host, int(port)).result(timeout=30) == "connected"


def test_an_embedded_clusters_task_has_no_network_by_default() -> None:
    with LocalCluster(workers=1) as cl, Client(cl) as client:
        host, port = cl.address.removeprefix("tcp://").rsplit(":", 1)
        assert client.submit(Connect, host, int(port)).result(timeout=30) != "connected"


def test_a_setsid_grandchild_is_gone_once_its_task_ends(contained: Contained) -> None:
    grandchild, worker = contained.client.submit(LeavesAProcess).result(timeout=30)
    wait_until(lambda: not alive(grandchild), 10, "the task's setsid grandchild to be ended")
    assert alive(worker), "the worker itself stays, warm"


def test_a_setsid_grandchild_is_gone_once_its_worker_is_stopped(contained: Contained) -> None:
    before = set(descendants(contained.node.pid))
    with pytest.raises(RuntimeError, match="grandchild") as info:
        contained.client.submit(LeavesAProcess, "exit").result(timeout=30)
    grandchild = int(re.findall(r"grandchild (\d+)", str(info.value))[0])
    assert grandchild not in before
    wait_until(lambda: not alive(grandchild), 10, "the stopped worker's setsid grandchild")
    contained.client.wait_for_workers(2)


def test_a_huge_allocation_fails_the_task_with_memory_error_and_the_cluster_serves_on(
    contained: Contained
) -> None:
    def exits() -> int:
        return sum(e["event"] == "worker_exited" for e in log_events(contained.log))

    before = exits()
    with pytest.raises(MemoryError):
        contained.client.submit(Allocates, 8 << 30).result(timeout=30)
    wait_until(lambda: exits() == before + 1, 10, "the worker that hit its limit to be replaced")
    contained.client.wait_for_workers(2)
    assert contained.client.submit(Allocates, 64 << 20).result(timeout=30) == 64 << 20


# --- the data plane ---------------------------------------------------------------------------


class FloodsTheDataPlane(Task):
    """Task code speaking as its own worker's runtime (it runs in the worker's process, and a
    connection of its own is not its worker: actors/node.py, "Proof"): ``n`` data requests
    naming ``n`` addresses the master never announced, over the worker's own connection to its
    node. [answers 'missing' with no data, answers]."""

    def work(self, n: int) -> list[int]:
        import gc
        import queue

        from actors.worker import NODE, Worker
        from transport.hub import Hub

        hub = next(o for o in gc.get_objects() if type(o) is Hub)
        me = next(o for o in gc.get_objects() if isinstance(o, Worker)).worker_id
        answers: queue.SimpleQueue[m.DataReply] = queue.SimpleQueue()
        handler = hub._on_frames

        def spy(socket: str, frames: list[bytes]) -> None:
            try:
                msg: m.Message | None = m.decode(frames[-1])
            except Exception:
                msg = None
            if isinstance(msg, m.DataReply) and msg.task_id == self.task_id:
                answers.put(msg)
            else:
                handler(socket, frames)

        hub._on_frames = spy
        outbox = hub.outbox()
        try:
            for i in range(n):
                # (for its own task: one it does not run is not relayed, node_data.holds)
                request = m.encode(m.DataRequest(self.task_id, [f"{self.task_id}:{i}"], me))
                outbox.send(NODE, [b"p", f"tcp://10.255.{i // 250}.{i % 250}:9".encode(),
                                   b"holder", request])
            replies = [answers.get(timeout=10) for _ in range(n)]
        finally:
            hub._on_frames = handler
            outbox.close()
        return [sum(1 for r in replies if r.missing and not r.data), len(replies)]


def test_a_node_connects_to_no_address_the_master_did_not_announce(tmp_path: Path) -> None:
    """1,200 data requests naming 1,200 addresses, from task code onto its node's worker socket:
    each is answered 'missing' at once, and the node opens no connection."""
    # (the node a process of its own: its descriptors alone counted, not the master's too)
    with LocalCluster(workers=1, local_node="process") as cl, Client(cl) as client:
        client.wait_for_workers(1)
        (node,) = children(cl.pid)  # the master's one child (its workers are the node's)
        before = len(os.listdir(f"/proc/{node}/fd"))
        assert client.submit(FloodsTheDataPlane, 1200).result(timeout=60) == [1200, 1200]
        assert len(os.listdir(f"/proc/{node}/fd")) <= before + 5
        assert client.submit(Pid).result(timeout=30) > 0


# --- run folders ------------------------------------------------------------------------------


def test_a_cluster_under_a_temporary_folder_too_long_for_a_socket_still_runs(tmp_path: Path) -> None:
    """A node's workers talk to it through a Unix socket in its run folder, and a socket's path
    may not pass 107 bytes: under a long ``$TMPDIR`` the node could not bind it, died five
    times and the cluster never had a worker (``TimeoutError`` after 15 s, nothing said why).
    Run folders go to a shorter root then; the rest of the temporary files stay in TMPDIR."""
    long_tmp = tmp_path / ("x" * 60) / ("y" * 40)
    long_tmp.mkdir(parents=True)
    script = ("from actors import Client, LocalCluster\n"
              "with LocalCluster(workers=1) as cluster, Client(cluster) as client:\n"
              "    print(client.submit(pow, 7, 2).result(60), flush=True)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env=dict(os.environ, TMPDIR=str(long_tmp)))
    assert done.returncode == 0 and done.stdout.strip() == "49", done.stderr[-3000:]
    assert "longer than 107" not in done.stderr


def test_a_run_folder_whose_process_is_gone_is_removed_and_a_live_one_kept(tmp_path: Path) -> None:
    prefix = f"actors-test-{os.getpid()}-{time.monotonic_ns()}-"
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom actors.contain import make_run_dir\n"
         f"print(make_run_dir({prefix!r})[0], flush=True)\ntime.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    dead = child.stdout.readline().strip()
    mine, lock = make_run_dir(prefix)
    try:
        assert remove_stale_run_dirs(prefix) == []  # both processes live
        child.kill()
        child.wait(10)
        assert remove_stale_run_dirs(prefix) == [dead]
        assert not os.path.exists(dead) and os.path.isdir(mine)
    finally:
        os.close(lock)
        os.rmdir(mine)
        child.stdout.close()


# --- where the kernel refuses a measure -------------------------------------------------------

_UNPRIVILEGED_NODE = '''
import json, sys
from actors.contain import Containment, Limits, enter

class Log:
    def __init__(self): self.lines = []
    def info(self, event, **kw): self.lines.append(("info", event, kw))
    def warning(self, event, **kw): self.lines.append(("warning", event, kw))

log = Log()
containment = Containment.start(Limits(memory=1 << 30), 2, log)
plan = containment.plan()
enter(plan)  # strict: what the probe allowed must work in a worker
print(json.dumps({"refused": containment.refused, "log": log.lines, "uid": plan.uid,
                  "network": plan.network}))
'''


def test_a_node_that_is_not_root_logs_each_refused_measure_once_and_goes_on() -> None:
    if os.geteuid() != 0:
        pytest.skip("the test drops to an unprivileged uid itself")
    interpreter = worker_python()
    if interpreter is None:
        pytest.skip("no interpreter here that another uid could read")
    site = sysconfig.get_paths()["purelib"]
    done = subprocess.run(
        [interpreter, "-c", _UNPRIVILEGED_NODE], user=65534, group=65534, extra_groups=[],
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), site])), cwd="/",
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["uid"] is None
    assert seen["refused"]["uid"] == "the node is not root"
    logged = [line[2]["measure"] for line in seen["log"] if line[1] == "worker_containment_refused"]
    assert sorted(logged) == sorted(seen["refused"]), "each refusal is logged, once"
    assert all(level == "info" for level, _, kw in seen["log"] if kw["measure"] in ("uid", "processes"))
    # The network is isolated through a user namespace where the kernel allows one, else shared.
    assert seen["network"] == ("shared" if "network" in seen["refused"] else "user")


_ROOT_ON_PURPOSE = _UNPRIVILEGED_NODE.replace(
    "Containment.start(Limits(memory=1 << 30), 2, log)",
    "Containment.start(Limits(memory=1 << 30, as_root=sys.argv[1] == '1'), 2, log)")


@pytest.mark.parametrize("as_root", [False, True])
def test_a_root_node_told_its_workers_run_as_root_says_so_once_without_a_warning(
        as_root: bool) -> None:
    """In a container, root is the isolation: ``--worker-as-root`` keeps a root node's workers
    root without the warning each start gave (the other measures still apply)."""
    if os.geteuid() != 0:
        pytest.skip("only a root node gives its workers uids of their own")
    done = subprocess.run([sys.executable, "-c", _ROOT_ON_PURPOSE, "1" if as_root else "0"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    warned = [kw["measure"] for level, event, kw in seen["log"]
              if level == "warning" and event == "worker_containment_refused"]
    if as_root:
        assert seen["uid"] is None and seen["refused"]["uid"] == "asked to (--worker-as-root)"
        assert "uid" not in warned
    else:  # (a uid of their own, or a warning why not: /root unreadable to others, here)
        assert seen["uid"] is not None or "uid" in warned
