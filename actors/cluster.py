"""``LocalCluster``: a master and a local node as real subprocesses, with keys of its own."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import structlog

from actors.errors import ActorsError

log = structlog.get_logger("actors.cluster")


def default_keys_dir() -> str:
    return os.environ.get("ACTORS_KEYS") or str(Path.home() / ".pydra-actors" / "keys")


class ClusterStartFailed(ActorsError):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason

    def __str__(self) -> str:
        return f"local cluster did not start: {self.reason}"


class LocalCluster:
    """Start a master with a local node of ``workers`` processes; stop all of it on ``close()``.

    Keys are generated in a private temporary directory unless ``keys`` names one.
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keys: str | os.PathLike[str] | None = None,
        node_timeout: float = 5.0,
        tasks_dir: str | os.PathLike[str] | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        package_grace: float = 300.0,
        start_timeout: float = 30.0,
        log_level: str | None = None,
    ) -> None:
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        self._tmp = tempfile.mkdtemp(prefix="actors-cluster-")
        self.keys_dir = str(keys) if keys else os.path.join(self._tmp, "keys")
        ready_file = os.path.join(self._tmp, "ready.json")
        cmd = [
            sys.executable, "-m", "actors.master", "--host", host, "--port", str(port),
            "--workers", str(self.workers), "--keys", self.keys_dir,
            "--ready-file", ready_file, "--node-timeout", str(node_timeout),
            # No tasks_dir: an empty folder of its own, not whatever ./tasks holds.
            "--tasks-dir", str(tasks_dir) if tasks_dir else os.path.join(self._tmp, "tasks"),
            "--package-grace", str(package_grace),
        ]
        if cache_dir:
            cmd += ["--cache", str(cache_dir)]
        env = dict(os.environ)
        if log_level:
            env["ACTORS_LOG_LEVEL"] = log_level
        # Own session: a Ctrl-C meant for the notebook or script does not kill the cluster
        # half-way; close() (or the finalizer) stops it.
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True)
        self._finalizer = weakref.finalize(self, _stop, self.process, self._tmp)
        try:
            info = _wait_ready(self.process, ready_file, start_timeout)
        except BaseException:
            self.close()
            raise
        self.address: str = info["address"]
        self.pid: int = self.process.pid

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<LocalCluster {getattr(self, 'address', '?')} workers={self.workers}>"


def _wait_ready(process: subprocess.Popen[bytes], ready_file: str, timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if os.path.exists(ready_file):
            with open(ready_file) as f:
                return dict(json.load(f))
        if process.poll() is not None:
            raise ClusterStartFailed(f"master exited with code {process.returncode}")
        time.sleep(delay)
        delay = min(delay * 1.5, 0.01)
    raise ClusterStartFailed(f"master not ready after {timeout}s")


def _stop(process: subprocess.Popen[bytes], tmp: str) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            log.warning("master_kill_escalated", pid=process.pid)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    shutil.rmtree(tmp, ignore_errors=True)
