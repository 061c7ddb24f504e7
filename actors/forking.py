"""A process forked to run a function, set up as ``subprocess.Popen`` sets up a spawned one.

A fresh interpreter spends most of its start importing (structlog, zmq, msgspec, pykka, this
package): ~150 ms of a ``LocalCluster``'s ~190 ms to its first result. A fork starts with the
caller's imports done. It is safe without an ``exec`` only on Linux and only while the caller
runs a single thread: a fork copies the locks that other threads (Python's or a C library's:
ZeroMQ's I/O threads, a BLAS pool) may hold, and those threads are not there to release them.
So ``fork_is_safe`` counts the process's threads as the kernel does, not ``threading`` alone.

``fork_call`` runs ``target`` in a child and returns a ``ForkedProcess`` (what the callers use of
``Popen``). The child, before ``target``: stdin from /dev/null; every other descriptor it
inherited beyond stdout and stderr pointed at /dev/null (closed in effect: a pipe the caller
holds still sees its end, a port it binds is not held; kept as numbers, so that an inherited
Python object closing "its" descriptor later closes nothing of the child's); the environment
given; ``sys.stdout`` and the others back on the process's descriptors, the caller's Python
signal handlers back to their defaults and its root logger's handlers gone; optionally a
session of its own. After ``target`` it leaves with ``os._exit``: the caller's ``atexit``
handlers and finalizers (a ``LocalCluster``'s own among them) must not run in it. The
caller's objects are frozen out of the child's garbage collector (``gc.freeze`` around the
fork), so the child never walks, and so never copies, the caller's memory: its pages stay
shared. ``ps`` shows the child with its caller's command line.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, Protocol

EXIT_SOFTWARE = 70  # what a child whose target raised exits with (EX_SOFTWARE)


class ChildProcess(Protocol):
    """What ``LocalCluster`` and the master use of a child: a ``Popen`` or a ``ForkedProcess``."""

    pid: int
    returncode: int | Any
    args: Any

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...


def fork_is_safe() -> bool:
    """Linux, and this process runs one thread (the kernel's count: C libraries' threads too)."""
    if not sys.platform.startswith("linux") or not hasattr(os, "fork"):
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class ForkedProcess:
    """A forked child, with the parts of ``subprocess.Popen`` that its callers use. ``args``:
    the command line that would start the same program fresh (a restart spawns it)."""

    def __init__(self, pid: int, args: list[str]) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else (a SIGCHLD handler set to ignore)
                self.returncode = -1
                return self.returncode
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """As ``Popen.wait``: raises ``subprocess.TimeoutExpired`` after ``timeout`` seconds."""
        if timeout is None:
            while self.returncode is None:
                try:
                    _, status = os.waitpid(self.pid, 0)
                except ChildProcessError:
                    self.returncode = -1
                else:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode
        deadline = time.monotonic() + timeout
        delay = 0.0005
        while (code := self.poll()) is None:  # as Popen.wait polls, with a timeout
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"


def fork_call(target: Callable[[], int], *, args: list[str], env: dict[str, str] | None = None,
              new_session: bool = False) -> ForkedProcess:
    """Run ``target`` in a forked child, which exits with what it returns. Only where
    ``fork_is_safe()``: the caller checks, since what to do instead is its own choice."""
    for stream in (sys.stdout, sys.stderr):  # or the child writes the caller's buffer again
        if stream is not None:
            stream.flush()
    with frozen():
        pid = os.fork()
        if pid == 0:
            _run_child(target, env, new_session)
    return ForkedProcess(pid, args)


@contextlib.contextmanager
def frozen() -> Iterator[None]:
    """Around forks: this process's objects out of the cyclic collector's walks, so that a
    child never walks them, writing to their pages and so copying them; walked again here
    after. A caller's own frozen objects stay as they are. (A child never leaves the block.)"""
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        yield
    finally:
        if freeze:
            gc.unfreeze()


def _run_child(target: Callable[[], int], env: dict[str, str] | None, new_session: bool) -> None:
    """In the child: never returns."""
    code = EXIT_SOFTWARE
    try:
        if new_session:
            os.setsid()
        _reset_signals()
        _drop_descriptors()
        _reset_streams()
        _reset_logging()
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        code = target()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        exit_now(code)


def exit_now(code: int) -> NoReturn:
    """Leave now, stdout and stderr flushed, without the interpreter's teardown: for a forked
    child, whose caller's ``atexit`` handlers and finalizers must not run in it; and for a
    master or node once its ``main`` has stopped everything it started (actors, sockets,
    journal, children), where the teardown (~20-40 ms of freeing modules, one process after
    the other when a cluster closes) has nothing left to do. Not for a worker: the task code
    it ran may have left ``atexit`` handlers of its own."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed stream: nothing left to say
            if stream is not None:
                stream.flush()
    os._exit(code)


def _reset_signals() -> None:
    """The caller's Python handlers are its own: default ones here, as after an ``exec``
    (Ctrl-C's ``KeyboardInterrupt`` and an ignored signal stay, as they would)."""
    with contextlib.suppress(ValueError):  # (only the main thread may; a fork's one is that)
        signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
        except (OSError, ValueError):
            continue
        if callable(handler) and handler is not signal.default_int_handler:
            signal.signal(sig, signal.SIG_DFL)


def _reset_streams() -> None:
    """``sys.stdout`` and the others on the process's own descriptors again: the caller may
    have replaced them (a test's capture, a ``StringIO``), and what the child writes there
    would be lost in its copy of the caller's memory."""
    for name in ("stdin", "stdout", "stderr"):
        original = getattr(sys, f"__{name}__")
        if original is not None:
            setattr(sys, name, original)


def _reset_logging() -> None:
    """The caller's handlers on the standard library's root logger are its own (a file of its,
    a stream now pointing at /dev/null): none here, as in a fresh interpreter."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)


def _drop_descriptors() -> None:
    """stdin from /dev/null; every inherited descriptor above stderr onto /dev/null too."""
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    try:
        inherited = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:  # no /proc: closed outright, as Popen closes them
        os.closerange(3, devnull)
        os.closerange(devnull + 1, os.sysconf("SC_OPEN_MAX"))
        inherited = []
    for fd in inherited:
        if fd > 2 and fd != devnull:
            with contextlib.suppress(OSError):  # the listing's own descriptor, gone already
                os.dup2(devnull, fd, inheritable=False)
    os.close(devnull)
