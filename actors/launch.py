"""What the command lines share: signals, keys, child processes, addresses.

Imported by ``actors.master``, ``actors.node`` and ``actors.cli``; imports none of them.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import structlog

from actors.addresses import master_address
from actors.errors import InvalidAddress
from actors.forking import ChildProcess
from transport import ensure_keys

log = structlog.get_logger("actors.launch")


def default_keys_dir() -> str:
    return os.environ.get("ACTORS_KEYS") or str(Path.home() / ".pydra-actors" / "keys")


def local_node_command(address: str, workers: int, keys: str, package_grace: float,
                       cache: str | None) -> list[str]:
    """The command line of a master's local node (it exits when the master does)."""
    cmd = [sys.executable, "-m", "actors.node", "--master", address, "--workers", str(workers),
           "--keys", keys, "--exit-with-parent", "--package-grace", str(package_grace)]
    return cmd + ["--cache", cache] if cache else cmd


def stop_on_signals(stop: threading.Event) -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())


def watch_parent(stop: threading.Event, interval: float = 0.5) -> None:
    """Set ``stop`` once the process that started this one is gone (``--exit-with-parent``:
    a master started by ``python -m actors ssh`` must not outlive a launcher killed outright)."""
    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(interval):
            if os.getppid() != parent:
                log.warning("parent_gone", parent_pid=parent)
                stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def master_arg(text: str) -> str:
    """argparse's ``type`` for ``--master``: HOST:PORT or tcp://HOST:PORT, else a usage error."""
    try:
        return master_address(text)
    except InvalidAddress as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def ensure_keys_logged(directory: str) -> None:
    if ensure_keys(directory):
        log.info("keys_created", directory=directory)


def run_script(command: list[str], address: str, keys: str, stop: threading.Event,
                exit_code: list[int]) -> None:
    env = dict(os.environ, ACTORS_ADDRESS=address, ACTORS_KEYS=keys)
    proc = subprocess.Popen([sys.executable, *command], env=env, stdin=subprocess.DEVNULL)

    def wait() -> None:
        exit_code[0] = proc.wait()
        log.info("script_finished", script=command[0], exit_code=exit_code[0])
        stop.set()

    threading.Thread(target=wait, name="run-script", daemon=True).start()


def stop_process(proc: ChildProcess, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def write_atomically(path: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
