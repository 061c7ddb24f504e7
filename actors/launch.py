"""What the command lines share: signals, keys, child processes, addresses.

Imported by ``actors.master``, ``actors.node`` and ``actors.cli``; imports none of them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import structlog

from actors.addresses import LISTENING, STALE, master_address, probe_unix_socket
from actors.contain import MAX_SOCKET_PATH
from actors.errors import InvalidAddress
from actors.forking import ChildProcess
from transport import ensure_keys

log = structlog.get_logger("actors.launch")


def default_keys_dir() -> str:
    return os.environ.get("ACTORS_KEYS") or str(Path.home() / ".pydra-actors" / "keys")


#: The pid of the process that starts a local node, in the node's environment: the node ends
#: with it (``--exit-with-parent``) even when it was killed before the node began to watch.
PARENT_PID_ENV = "ACTORS_PARENT_PID"


def with_parent_pid(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) saying that this process is the parent to watch."""
    return dict(os.environ if env is None else env, **{PARENT_PID_ENV: str(os.getpid())})


def local_node_command(address: str, workers: int, keys: str, package_grace: float,
                       cache: str | None, local: str = "", exit_note: str = "") -> list[str]:
    """The command line of a master's local node (it exits when the master does); ``local``:
    the master's ipc:// endpoint on this host, which the node connects to instead;
    ``exit_note``: where the node writes why it ended, if it fails (see ``take_exit_note``)."""
    cmd = [sys.executable, "-m", "actors.node", "--master", address, "--workers", str(workers),
           "--keys", keys, "--exit-with-parent", "--package-grace", str(package_grace)]
    if local:
        cmd += ["--local-master", local]
    if exit_note:
        cmd += [EXIT_NOTE_OPTION, exit_note]
    return cmd + ["--cache", cache] if cache else cmd


#: The option of a master's local node (and of a LocalCluster's master) naming the file where
#: it writes why it ended, when it fails: whoever started it reads it to say why (the master
#: in ``ClusterInfo.local_node_failed``, LocalCluster in ``ClusterStartFailed``) instead of
#: leaving users to wait and guess.
EXIT_NOTE_OPTION = "--exit-note"
_EXIT_NOTE_BYTES = 2000


class NotingParser(argparse.ArgumentParser):
    """An argument parser that keeps what it refused (for the exit note) before it prints the
    usage and exits 2."""

    def __init__(self, refused: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.refused = refused

    def error(self, message: str) -> NoReturn:
        self.refused.append(f"bad arguments: {message}")
        super().error(message)


def run_noting_exit(body: Callable[[list[str], list[str]], int], argv: list[str] | None) -> int:
    """``body(argv, refused)``, a command line's main that appends to ``refused`` why it gives
    up (``refuse``); where it fails and its command line has ``--exit-note PATH``, the last
    reason (or its exit code, or the exception that ended it) is written there for whoever
    started it, which may have no other way to read it (its output is the user's terminal)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    refused: list[str] = []
    try:
        code = body(argv, refused)
    except SystemExit as exc:  # argparse refused the arguments (it printed the usage)
        if exc.code:
            write_exit_note(exit_note_of(argv), refused[-1] if refused else f"exit code {exc.code}")
        raise
    except BaseException as exc:
        write_exit_note(exit_note_of(argv), f"crashed: {type(exc).__name__}: {exc}")
        raise
    if code:
        write_exit_note(exit_note_of(argv), refused[-1] if refused else f"exit code {code}")
    return code


def refuse(refused: list[str], event: str, error: str, **fields: object) -> None:
    """Log why a command line gives up (``event``, ``error``) and keep it for its exit note."""
    log.error(event, error=error, **fields)
    refused.append(f"{event.replace('_', ' ')}: {error}")  # "bad keys: ..."


def exit_note_of(args: object) -> str:
    """The exit note's path in a command line ("" for none)."""
    if not isinstance(args, list | tuple):
        return ""
    for option, value in zip(args, args[1:], strict=False):
        if option == EXIT_NOTE_OPTION:
            return str(value)
    return ""


def write_exit_note(path: str, reason: str) -> None:
    """(In the failing process: best effort, it is on its way out.)"""
    if path:
        try:
            write_atomically(path, reason[:_EXIT_NOTE_BYTES])
        except OSError as exc:
            log.warning("exit_note_not_written", path=path, error=str(exc))


def take_exit_note(path: str) -> str:
    """Why the process that was given ``path`` ended ("" if it wrote nothing), removed once
    read: one started again writes its own."""
    if not path:
        return ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            note = f.read(_EXIT_NOTE_BYTES)
        os.unlink(path)
    except OSError:
        return ""
    return " ".join(note.split())


def local_endpoint(option: str | None, folder: str, *, starts_node: bool) -> str:
    """The master's ipc:// endpoint for peers on its host ("" for none): ``--local-socket``'s
    path, or, for the node a master starts itself, ``master.sock`` in its own folder. A message
    through it costs both ends less than through TCP's loopback (no TCP stack; CURVE as on TCP)."""
    if option == "off":
        return ""
    if option:
        return f"ipc://{os.path.abspath(option.removeprefix('ipc://'))}"
    path = os.path.join(folder, "master.sock")
    return f"ipc://{path}" if starts_node and fits_socket_path(path) else ""


def fits_socket_path(path: str) -> bool:
    """(A master's own folder deeper than that gets no local socket: its node goes by TCP.)"""
    return len(os.fsencode(path)) <= MAX_SOCKET_PATH


def claim_socket_path(path: str) -> str:
    """Why ``path`` may not become this master's socket ("" when it may: nothing is there, or
    a socket no one listens on any more, removed now). ZeroMQ removes whatever is at the path
    before it binds: a file, or the socket of another master, which would then lose its peers
    on this host to this one without a word."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return ""
    except OSError as exc:
        return exc.strerror or str(exc)
    if not stat.S_ISSOCK(mode):
        return "something that is not a socket is there"
    found = probe_unix_socket(path)
    if found == STALE:  # left by a master that stopped (kill -9)
        os.unlink(path)
        return ""
    return "another process listens there (another master?)" if found == LISTENING else found


def local_master_arg(text: str) -> str:
    """argparse's ``type`` for a node's ``--local-master``: an ipc:// endpoint."""
    if not text.startswith("ipc://") or len(text) <= len("ipc://"):
        raise argparse.ArgumentTypeError(f"not an ipc:// endpoint: {text!r}")
    return text


def stop_on_signals(stop: threading.Event, received: list[int] | None = None) -> None:
    """SIGINT and SIGTERM set ``stop``; the first one's number is appended to ``received``."""
    def stopped(signum: int, _frame: object) -> None:
        if received is not None and not received:
            received.append(signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, stopped)


def parent_pid() -> int:
    """The process whose end ends this one (``--exit-with-parent``): the one that started it, as
    it said in ``PARENT_PID_ENV`` (taken out of the environment: it is not a child's), else the
    parent now. (Read as ``main`` begins; the parent may have been killed before that, and our
    parent is then init or a subreaper already.)"""
    return int(os.environ.pop(PARENT_PID_ENV, "") or 0) or os.getppid()


def watch_parent(stop: threading.Event, parent: int, interval: float = 0.5) -> None:
    """Set ``stop`` once ``parent`` (``parent_pid()``) is no longer this process's parent
    (``--exit-with-parent``: a master started by ``python -m actors ssh`` or a ``LocalCluster``
    must not outlive a launcher killed outright)."""

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


#: In a script ``python -m actors.master --run`` runs: the workers of the master's own node,
#: which its ``Client()`` waits for (and fails at once, saying why, if that node cannot run).
LOCAL_WORKERS_ENV = "ACTORS_LOCAL_WORKERS"


def run_script(command: list[str], address: str, keys: str, stop: threading.Event,
               exit_code: list[int], workers: int = 0) -> subprocess.Popen[bytes]:
    """Run the script ``--run`` names; its exit code becomes the master's (a signal's end as
    a shell says it, 128 + its number) and its end stops the master (``stop``)."""
    env = dict(os.environ, ACTORS_ADDRESS=address, ACTORS_KEYS=keys,
               **{LOCAL_WORKERS_ENV: str(workers)})
    proc = subprocess.Popen([sys.executable, *command], env=env, stdin=subprocess.DEVNULL)

    def wait() -> None:
        code = proc.wait()
        exit_code[0] = 128 - code if code < 0 else code
        log.info("script_finished", script=command[0], exit_code=exit_code[0])
        stop.set()

    threading.Thread(target=wait, name="run-script", daemon=True).start()
    return proc


def stop_script(proc: subprocess.Popen[bytes], signum: int, grace: float) -> None:
    """The master is stopping with its script still running: the script is told as the
    master was (SIGINT or SIGTERM), then killed after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    log.info("script_stopping", pid=proc.pid, signal=signal.Signals(signum).name)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        log.warning("script_killed", pid=proc.pid, grace_s=grace)
        proc.kill()
        proc.wait(5)


def stop_process(proc: ChildProcess, grace: float) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def write_atomically(path: str, text: str) -> None:
    """``text`` in ``path``, whole or not at all: written beside it, then renamed over it. A
    path that exists and is not a regular file (``/dev/null``, a FIFO, a terminal) is written
    to as it is: a rename would put a file in its place, and as root that replaces a device
    every other program on the machine relies on."""
    if os.path.exists(path) and not os.path.isfile(path):
        with open(path, "w") as f:
            f.write(text)
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)))
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
