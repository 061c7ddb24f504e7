"""Shared fixtures: a real local cluster, waits with deadlines, process bookkeeping by pid."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from actors import Client, LocalCluster

# Every worker process the tests start checks its state machine's invariants after every event
# (nodes pass ACTORS_* variables on to their workers).
os.environ["ACTORS_VALIDATE_STATE"] = "1"
# The processes the tests start inherit this environment: a developer's own settings (a quieter
# log level, a cluster of theirs) would change what they log and where clients connect.
for _name in ("ACTORS_LOG_LEVEL", "ACTORS_LOG_FORMAT", "ACTORS_ADDRESS", "ACTORS_KEYS"):
    os.environ.pop(_name, None)
# A master on a fixed port keeps its journal under $XDG_STATE_HOME: one folder per test run, so
# that no test finds the tasks of an earlier one (or of the developer's own masters).
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="actors-test-state-")
atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], True)


def examples(full: int) -> int:
    """A property test's example count: ``full`` scaled by ``$ACTORS_TEST_EXAMPLES`` (a fraction,
    default 1). CI's second run, on the lowest versions setup.cfg claims, checks that every test
    still passes there, not the state space again: it runs a quarter."""
    scale = float(os.environ.get("ACTORS_TEST_EXAMPLES") or 1)
    return max(1, round(full * scale))


def shown(exc: BaseException) -> str:
    """An exception as a traceback shows it: its message, then its notes (a task's remote
    traceback is one)."""
    return "\n".join([str(exc), *getattr(exc, "__notes__", ())])


def stderr_so_far(capfd: pytest.CaptureFixture[str]) -> str:
    """What this test and the processes it started wrote to stderr since ``capfd`` was last
    read, read without emptying it: ``capfd.readouterr()`` empties the file they all write to,
    and a line another process writes between its read and the emptying is lost."""
    del capfd  # (asked for so that stderr is that file, not a terminal)
    with open("/proc/self/fd/2", "rb") as captured:
        return captured.read().decode(errors="replace")


def wait_until(condition: Callable[[], object], timeout: float = 20.0, what: str = "",
               logs: Path | None = None) -> object:
    """Poll ``condition`` until it is truthy; fail the test at the deadline (never hang), with
    the tail of every process's log in ``logs`` if given (a CI run leaves nothing else)."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}"
                        + ("\n" + "\n".join(log_tails(logs)) if logs is not None else ""))
        time.sleep(delay)
        delay = min(delay * 1.5, 0.2)


@pytest.fixture
def raw_router(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    """A bare ZeroMQ ROUTER bound on ipc (a peer with no hub of its own), and its address."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 10_000)
    address = f"ipc://{tmp_path}/raw.sock"
    sock.bind(address)
    try:
        yield sock, address
    finally:
        sock.close()
        ctx.term()


def _parents() -> dict[int, int]:
    """Every live process's parent, from /proc (zombies left out)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents[int(entry.name)] = int(fields[1])
    return parents


def children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid``."""
    return {child for child, parent in _parents().items() if parent == pid}


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (workers run in their own sessions, still our children)."""
    parents = _parents()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def peak_mib(pid: int) -> float:
    """The process's resident-set high-water mark (VmHWM)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def cmdline(pid: int) -> str:
    """A process's command line, its arguments joined by spaces ("" once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_all(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def result_or_logs(future: Any, timeout: float, logs: Path) -> Any:
    """``future.result(timeout)``; a task that does not end fails the test with the tail of every
    process's log in ``logs`` (a hang on a CI machine leaves nothing else to read)."""
    try:
        return future.result(timeout=timeout)
    except TimeoutError:
        tails = log_tails(logs)
        try:
            entries = future.story()
            # The scheduler's part says what is open; the workers' part what they did last.
            story = [repr(e) for e in [e for e in entries if e[3].startswith("master:")][-40:]]
            story += [repr(e) for e in [e for e in entries if not e[3].startswith("master:")][-40:]]
        except Exception as exc:  # the story is a help here, not the point
            story = [f"(no story: {exc!r})"]
        pytest.fail(f"{future!r} not done after {timeout}s; progress {future.progress()}\n"
                    + "\n".join(tails) + "\n--- the task's story (the master's last 40, the workers' last 40)\n" + "\n".join(story))


def log_tails(logs: Path, count: int = 40) -> list[str]:
    """The last ``count`` lines of every process's log in ``logs``, each under its file's name."""
    tails = []
    for log_file in sorted(logs.glob("*.log")):
        lines = log_file.read_text(errors="replace").splitlines()
        tails.append(f"--- {log_file.name} (last {count} of {len(lines)} lines)")
        tails += [line[:400] for line in lines[-count:]]
    return tails


def log_lines(path: Path) -> list[str]:
    """The lines a process logged to ``path`` so far, whole ones only: the one it is still
    writing may be read half-written (a write that crosses a page of the file is seen a page at
    a time: a JSON line cut in the middle failed a test in CI)."""
    text = path.read_text()
    return text[:text.rfind("\n") + 1].splitlines()


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON lines (structlog's events) among ``log_lines``."""
    return [json.loads(line) for line in log_lines(path) if line.startswith("{")]


def python(*args: str, **kwargs: object) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, *args], text=True, **kwargs)  # type: ignore[call-overload]


def python_logged(log: Path, *args: str) -> subprocess.Popen[str]:
    """``python *args`` with its stderr (its structlog lines, as JSON) in the file ``log``."""
    with open(log, "w") as stderr:
        return python(*args, "--log-format", "json", stdout=subprocess.DEVNULL, stderr=stderr)


def start_master(directory: Path, *args: str, name: str = "master", port: int = 0,
                 env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], str]:
    """``python -m actors.master --port PORT ARGS`` with its JSON log in ``DIRECTORY/NAME.log``;
    returns the process and the address from its banner. With port 0 (the default) the master
    binds a free port itself: a port picked here and bound later could be taken meanwhile."""
    banner = directory / f"{name}.out"
    with open(directory / f"{name}.log", "w") as stderr, open(banner, "w") as stdout:
        proc = python("-m", "actors.master", "--port", str(port), "--log-format", "json", *args,
                      stdout=stdout, stderr=stderr, env=env)

    def listening() -> str | None:
        found = re.search(r"listening on (tcp://\S+)", banner.read_text())
        if found is None and proc.poll() is not None:
            pytest.fail(f"the master exited with code {proc.returncode}:\n"
                        + (directory / f"{name}.log").read_text()[-3000:])
        return found[1] if found else None

    try:
        return proc, str(wait_until(listening, 30, "the master's banner"))
    except BaseException:
        kill_all(descendants(proc.pid) | {proc.pid})
        proc.wait(10)
        raise


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(workers=2) as cl:
        yield cl
        pids = descendants(cl.pid) | {cl.pid}
    wait_until(lambda: not any(alive(p) for p in pids), 20, "the cluster's processes to end")


@pytest.fixture(scope="module")
def client(cluster: LocalCluster) -> Iterator[Client]:
    with Client(cluster) as c:
        c.wait_for_workers(2)
        yield c
