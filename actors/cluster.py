"""``LocalCluster``: a master and a local node as real subprocesses, with keys of its own."""

from __future__ import annotations

import html
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import weakref

import structlog

from actors.contain import make_run_dir, remove_stale_run_dirs
from actors.errors import ActorsError, ClusterStartFailed
from actors.forking import ChildProcess
from actors.launch import (
    EXIT_NOTE_OPTION,
    fits_socket_path,
    local_node_command,
    take_exit_note,
    with_parent_pid,
)
from actors.local_start import start_master

log = structlog.get_logger("actors.cluster")

class LocalCluster:
    """Start a master with a local node of ``workers`` processes (the node inside the master's
    process: ``local_node``); stop all of it on ``close()``.

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
        log_format: str | None = None,
        restart_after_error: bool = False,
        worker_network: bool = False,
        worker_memory: str | None = None,
        results_memory: str | None = None,
        worker_spill: str | None = None,
        worker_pause: str | None = None,
        state_dir: str | os.PathLike[str] | None = None,
        fork: bool = True,
        local_node: str = "inside",
    ) -> None:
        """``log_level``: what the cluster's processes log to this process's stderr; by default
        warnings and errors only (``"info"`` shows each worker and task event, ``"debug"``
        every message). ``log_format``: ``"console"`` (the default) or ``"json"``. The
        ``$ACTORS_LOG_LEVEL`` and ``$ACTORS_LOG_FORMAT`` variables set both where not given.
        ``restart_after_error``: replace a worker whose task raised, for a fresh interpreter after
        any failure (by default it serves on, as after a task that returned).
        ``worker_network``: let tasks use the network (by default, on Linux, each worker has a
        network namespace of its own with loopback only). ``worker_memory``: what each worker
        may allocate, e.g. ``"2G"`` (beyond it the task fails with MemoryError).
        ``results_memory``: how much of the large task results waiting for their clients the
        node keeps in memory, e.g. ``"512M"`` (default 1G); the rest waits on disk.
        ``worker_spill``: results each worker holds in memory for other units or the driver's
        reduce, e.g. ``"1G"``, before it writes the rest to its scratch disk (default: 60 % of
        ``worker_memory``, else of a quarter of the host's memory). ``worker_pause``: resident
        memory past which a worker takes no new work (default: 80 % of ``worker_memory``;
        without it, never).
        ``state_dir``: where the master keeps its journal; a cluster started again on the same
        folder (after a crash, or ``kill -9`` of its master) takes up its tasks where they
        were. By default a temporary folder, gone with the cluster.
        ``fork``: on Linux, when this process runs a single thread (a script, not a notebook's
        kernel) and holds less than 128 MiB, and no ``worker_memory`` or ``worker_pause`` is
        set, the master and its node are forked from it rather than started as fresh
        interpreters: the first result comes ~4x sooner (``actors/local_start.py``);
        ``forked`` says which it was. False: always fresh ones.
        ``local_node``: ``"inside"`` (the default) runs the node in the master's process, on
        its hub, where a task's messages cross no socket between them; ``"process"``, as a
        process of its own, which the master starts again should it die."""
        if local_node not in ("inside", "process"):
            raise ValueError(f"local_node is 'inside' or 'process', not {local_node!r}")
        self.workers = (os.cpu_count() or 1) if workers is None else workers
        # Its keys live here: a folder left by a process killed with kill -9 goes at next start.
        remove_stale_run_dirs("actors-cluster-")
        self._tmp, self._lock = make_run_dir("actors-cluster-")
        self.keys_dir = str(keys) if keys else os.path.join(self._tmp, "keys")
        ready_file = os.path.join(self._tmp, "ready.json")
        # The node is started beside the master, so it must know the port before the master
        # has bound it: a free one is held here (bound, not listening, SO_REUSEADDR) until the
        # master has it, so no one else takes it meanwhile.
        # (inside its master, the node needs no port before the master has one)
        reserved = _reserve_port(host, port) if self.workers > 0 and local_node == "process" \
            else None
        # The node and clients on this host reach the master through a Unix socket in this
        # private folder (cheaper per message than TCP's loopback; keys proved the same way).
        socket_path = os.path.join(self._tmp, "master.sock")
        self.local_address = f"ipc://{socket_path}" if fits_socket_path(socket_path) else ""
        if reserved is not None and not _keys_exist(self.keys_dir):  # the node reads them first
            reserved[0].close()  # and the master says what is wrong, as before
            reserved = None
        master_args = [
            "--host", host, "--port", str(reserved[1] if reserved else port),
            "--workers", str(self.workers), "--keys", self.keys_dir, "--local-node", local_node,
            "--ready-file", ready_file, "--node-timeout", str(node_timeout),
            # No tasks_dir: an empty folder of its own, not whatever ./tasks holds.
            "--tasks-dir", str(tasks_dir) if tasks_dir else os.path.join(self._tmp, "tasks"),
            "--package-grace", str(package_grace), "--no-banner",
            "--local-socket", socket_path if self.local_address else "off",
            *(["--state-dir", str(state_dir)] if state_dir else ["--ephemeral"]),
            # A process killed outright (kill -9, a notebook kernel killed) runs no finalizer:
            # the master then sees its parent gone and stops, with its node and workers.
            "--exit-with-parent",
            # Why it failed to start, if it does (its output is this process's stderr, which a
            # notebook may not show): said in ClusterStartFailed.
            EXIT_NOTE_OPTION, os.path.join(self._tmp, "master.exit"),
        ]
        if restart_after_error:
            master_args.append("--restart-after-error")
        if cache_dir:
            master_args += ["--cache", str(cache_dir)]
        env = with_parent_pid()  # (the master ends with this process: --exit-with-parent)
        # Embedded in a script or a notebook: quiet, and readable where it does speak.
        env["ACTORS_LOG_LEVEL"] = log_level or os.environ.get("ACTORS_LOG_LEVEL") or "warning"
        env["ACTORS_LOG_FORMAT"] = log_format or os.environ.get("ACTORS_LOG_FORMAT") or "console"
        if worker_network:
            env["ACTORS_WORKER_NETWORK"] = "1"
        if worker_memory:
            env["ACTORS_WORKER_MEMORY"] = worker_memory
        if results_memory:
            env["ACTORS_RESULTS_MEMORY"] = results_memory
        if worker_spill:
            env["ACTORS_WORKER_SPILL"] = worker_spill
        if worker_pause:
            env["ACTORS_WORKER_PAUSE"] = worker_pause
        try:
            node = local_node_command(f"tcp://{reserved[2]}:{reserved[1]}", self.workers,
                                      self.keys_dir, package_grace,
                                      str(cache_dir) if cache_dir else None,
                                      local=self.local_address,
                                      exit_note=os.path.join(self._tmp, "node.exit")
                                      ) if reserved else []
            # Own session: a Ctrl-C meant for the notebook or script does not kill the cluster
            # half-way; close() (or the finalizer) stops it.
            self.process, self.forked = start_master(master_args, node, env, fork=fork)
        except BaseException:
            if reserved is not None:
                reserved[0].close()
            shutil.rmtree(self._tmp, ignore_errors=True)
            os.close(self._lock)
            raise
        self._finalizer = weakref.finalize(self, _stop, self.process, self._tmp, self._lock)
        try:
            info = _wait_ready(self.process, ready_file, start_timeout,
                               os.path.join(self._tmp, "master.exit"))
        except BaseException:
            self.close()
            raise
        finally:
            if reserved is not None:
                reserved[0].close()
        self.address: str = info["address"]
        self.pid: int = self.process.pid
        # The master's dashboard page, with its access token ("" if it serves none).
        self.dashboard_url: str = info.get("dashboard", "")

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def status(self) -> str:
        """``running``, ``closed``, or ``exited N`` (its master process ended on its own)."""
        process = getattr(self, "process", None)
        finalizer = getattr(self, "_finalizer", None)  # None: __init__ failed before it
        if finalizer is None or not finalizer.alive:
            return "closed"
        if process is None or process.poll() is None:
            return "running"
        return f"exited {process.returncode}"

    def __repr__(self) -> str:
        return (f"<LocalCluster {getattr(self, 'address', '?')} workers={self.workers} "
                f"{self.status}>")

    def _repr_html_(self) -> str:
        """What a notebook shows: where the master listens, its workers, how to connect."""
        address = getattr(self, "address", "?")
        rows = [("master", address), ("workers", str(self.workers)), ("status", self.status),
                ("master pid", str(getattr(self, "pid", "?"))),
                ("connect", f"Client({address!r}, keys={self.keys_dir!r})")]
        if getattr(self, "dashboard_url", ""):
            rows.append(("dashboard", self.dashboard_url))
        cells = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th>"
                        f"<td style='text-align:left'><code>{html.escape(v)}</code></td></tr>"
                        for k, v in rows)
        return f"<div><b>pydra-actors LocalCluster</b><table>{cells}</table></div>"


def _reserve_port(host: str, port: int) -> tuple[socket.socket, int, str] | None:
    """Hold ``port`` (0: a free one) on ``host``'s IPv4 address until the master binds it.

    Returns the holding socket, the port and the address a node connects to; None where the
    host is not one this can resolve (the master then starts its node once it listens, as it
    did before), and off Linux, whose SO_REUSEADDR this relies on.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            "0.0.0.0" if host == "*" else host, port, socket.AF_INET, socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError:
        return None
    try:
        # The master's socket (ZeroMQ sets SO_REUSEADDR) may bind it while this one holds it,
        # as long as this one never listens; a plain bind, or a bind to port 0, cannot.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        ip, bound = sock.getsockname()[:2]
    except OSError:
        sock.close()
        return None
    return sock, int(bound), str(ip)


def _keys_exist(directory: str) -> bool:
    """Create the keys where there are none yet (the master would); False where that fails."""
    from transport import ensure_keys

    try:
        ensure_keys(directory)
    except (OSError, ActorsError):
        return False
    return True


def _wait_ready(process: ChildProcess, ready_file: str, timeout: float,
                exit_note: str) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    delay = 0.005
    while time.monotonic() < deadline:
        if os.path.exists(ready_file):
            with open(ready_file) as f:
                return dict(json.load(f))
        if process.poll() is not None:
            said = take_exit_note(exit_note)
            raise ClusterStartFailed(f"master exited with code {process.returncode}"
                                     + (f": {said}" if said else ""))
        time.sleep(delay)
        delay = min(delay * 1.5, 0.01)
    raise ClusterStartFailed(f"master not ready after {timeout}s")


def _stop(process: ChildProcess, tmp: str, lock: int) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            log.warning("master_kill_escalated", pid=process.pid)
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)
    shutil.rmtree(tmp, ignore_errors=True)
    os.close(lock)
