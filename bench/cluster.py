"""A pydra-actors cluster of several nodes on this host, started the way an operator would.

``LocalCluster(workers=N)`` is one master with one node of N workers. To see how the runtime
scales past one node, this starts ``python -m actors.master --workers 0`` and then
``python -m actors.node`` processes of ``workers_per_node`` workers each, sharing one key folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 15.0


class MultiNodeCluster:
    def __init__(self, workers: int, workers_per_node: int, *, log_level: str = "warning") -> None:
        self.workers = workers
        self._tmp = tempfile.mkdtemp(prefix="actors-bench-")
        self.keys_dir = os.path.join(self._tmp, "keys")
        self._env = dict(os.environ, ACTORS_LOG_LEVEL=log_level)
        self.nodes: list[subprocess.Popen[bytes]] = []
        ready_file = os.path.join(self._tmp, "ready.json")
        self.master = self._start("actors.master", "--host", "127.0.0.1", "--port", "0",
                                  "--workers", "0", "--keys", self.keys_dir,
                                  "--ready-file", ready_file)
        self.pid = self.master.pid
        try:
            self.address = _wait_for_address(self.master, ready_file)
            for size in node_sizes(workers, workers_per_node):
                self.nodes.append(self._start("actors.node", "--master", self.address,
                                              "--workers", str(size), "--keys", self.keys_dir))
        except BaseException:
            self.close()
            raise

    def _start(self, module: str, *args: str) -> subprocess.Popen[bytes]:
        # Own session, stdout (the master's banner) to /dev/null; close() stops the group.
        return subprocess.Popen([sys.executable, "-m", module, *args], env=self._env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                start_new_session=True)

    def close(self) -> None:
        """Nodes first (each stops its workers), then the master; SIGKILL whatever lingers."""
        for group in (self.nodes, [self.master]):
            for proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.wait(STOP_GRACE_S)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> MultiNodeCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def node_sizes(workers: int, workers_per_node: int) -> list[int]:
    """Split ``workers`` into nodes of at most ``workers_per_node``: 10 by 4 is [4, 4, 2]."""
    full, rest = divmod(workers, workers_per_node)
    return [workers_per_node] * full + ([rest] if rest else [])


def _wait_for_address(master: subprocess.Popen[bytes], ready_file: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if os.path.exists(ready_file):
            return str(json.loads(Path(ready_file).read_text())["address"])
        if master.poll() is not None:
            raise RuntimeError(f"master exited with code {master.returncode}")
        time.sleep(0.01)
    raise TimeoutError(f"master not ready after {START_TIMEOUT_S}s")
