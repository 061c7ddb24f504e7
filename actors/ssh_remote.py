"""``python -m actors.ssh_remote``: the remote half of ``python -m actors ssh`` (see
``actors.ssh_launch``), run on each host by ssh.

Theory of operation:

1. The launcher writes one JSON line on our stdin (a ``LaunchRequest``: the master's address,
   the node's three key files, the node's options) and then keeps stdin open, writing nothing
   more. A line that is not a valid request ends us with exit code 2 and the reason.
2. The keys go into a fresh private folder (0700, the secret 0600), and ``python -m
   actors.node`` starts in a session of its own, its output going to ours, back through ssh.
3. We wait for the first of: stdin at end of file (the launcher closed it, or was killed, or
   the connection closed: sshd closes our stdin either way), stdin silent for longer than the
   request's ``silence_timeout`` (the launcher writes a newline every few seconds, so silence
   means a connection cut without a close), a signal, or the node's exit.
   The node is then stopped (SIGTERM to its process group, which stops its workers; SIGKILL
   after a grace), the key folder removed, and we exit with the node's code.

The node is also started with ``--exit-with-parent``: should we be killed outright, it stops.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import IO

import msgspec
import structlog

from actors import logs
from actors.addresses import master_address
from actors.contain import make_run_dir, remove_stale_run_dirs
from actors.errors import InvalidAddress, InvalidLaunchRequest

log = structlog.get_logger("actors.ssh")

KEYS_PREFIX = "actors-ssh-keys-"
MAX_REQUEST_BYTES = 1 << 20
STOP_GRACE_S = 10.0
EXIT_BAD_REQUEST = 2


class LaunchRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """The one line the launcher sends: where the master is, the node's keys, its options."""

    master: str
    master_key: str  # the contents of master.key (public)
    node_key: str  # node.key
    node_key_secret: str  # node.key_secret
    workers: int | None = None  # None: the node's default, one per core of that host
    connect_timeout: float = 0.0
    data_listen: str | None = None
    log_level: str = "INFO"
    # Seconds without a byte from the launcher (it sends a newline every few seconds) after
    # which it is taken as gone: a connection cut without a close is seen by sshd late, if
    # ever. 0: only the end of stdin counts.
    silence_timeout: float = 0.0


def encode_request(request: LaunchRequest) -> bytes:
    return msgspec.json.encode(request) + b"\n"


def decode_request(line: bytes) -> LaunchRequest:
    """The request in ``line``, checked; ``InvalidLaunchRequest`` saying what is wrong."""
    if not line.strip():
        raise InvalidLaunchRequest("no request: stdin ended before a line came (run this "
                                   "through `python -m actors ssh`, not by hand)")
    try:
        request = msgspec.json.decode(line, type=LaunchRequest)
    except msgspec.ValidationError as exc:
        raise InvalidLaunchRequest(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise InvalidLaunchRequest(f"not JSON: {exc}") from None
    try:
        master_address(request.master)
    except InvalidAddress as exc:
        raise InvalidLaunchRequest(str(exc)) from None
    if request.workers is not None and request.workers < 1:
        raise InvalidLaunchRequest(f"workers must be at least 1, not {request.workers}")
    if request.connect_timeout < 0 or request.silence_timeout < 0:
        raise InvalidLaunchRequest("connect_timeout and silence_timeout must not be negative")
    for name, text, marker in (("master_key", request.master_key, "public-key"),
                               ("node_key", request.node_key, "public-key"),
                               ("node_key_secret", request.node_key_secret, "secret-key")):
        if marker not in text or "\0" in text:
            raise InvalidLaunchRequest(f"{name} is not a CURVE key file (no {marker})")
    return request


def write_keys(request: LaunchRequest) -> tuple[str, int]:
    """A private folder (and its lock) holding the node's keys, laid out as transport.keys
    expects: ``master.key``, ``node.key``, ``node.key_secret``."""
    folder, lock = make_run_dir(KEYS_PREFIX)
    for name, text, mode in (("master.key", request.master_key, 0o600),
                             ("node.key", request.node_key, 0o600),
                             ("node.key_secret", request.node_key_secret, 0o600)):
        fd = os.open(os.path.join(folder, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return folder, lock


def node_command(request: LaunchRequest, keys: str) -> list[str]:
    command = [sys.executable, "-m", "actors.node", "--master", master_address(request.master),
               "--keys", keys, "--exit-with-parent", "--log-format", "json"]
    if request.workers is not None:
        command += ["--workers", str(request.workers)]
    if request.connect_timeout:
        command += ["--connect-timeout", str(request.connect_timeout)]
    if request.data_listen:
        command += ["--data-listen", request.data_listen]
    return command


def stop_node(node: subprocess.Popen[bytes], grace: float = STOP_GRACE_S) -> int:
    """SIGTERM to the node's process group (the node stops its workers itself: they run in
    sessions of their own), SIGKILL to the group after ``grace``; the node's exit code."""
    if node.poll() is None:
        _signal_group(node.pid, signal.SIGTERM)
        try:
            node.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("node_kill_escalated", pid=node.pid, grace_s=grace)
            _signal_group(node.pid, signal.SIGKILL)
            node.wait(5)
    return node.returncode if node.returncode >= 0 else 128 - node.returncode


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _pass_through(source: IO[bytes], fd: int) -> None:
    """The node's output, line by line, to ours (ssh's); once ssh is gone, read and dropped,
    so the node never writes to a closed pipe (or blocks on a full one) while it stops."""
    open_ = True
    for line in iter(source.readline, b""):
        if open_:
            try:
                os.write(fd, line)
            except OSError:
                open_ = False
    source.close()


def main(argv: list[str] | None = None) -> int:
    del argv  # everything comes on stdin
    logs.configure("json")
    try:
        request = decode_request(sys.stdin.buffer.readline(MAX_REQUEST_BYTES))
    except InvalidLaunchRequest as exc:
        log.error("bad_launch_request", error=str(exc))
        return EXIT_BAD_REQUEST
    logs.configure("json", request.log_level)
    for stale in remove_stale_run_dirs(KEYS_PREFIX):  # left by a kill -9
        log.info("stale_key_dir_removed", path=stale)
    keys, lock = write_keys(request)
    try:
        return _run_node(request, keys)
    finally:
        shutil.rmtree(keys, ignore_errors=True)
        os.close(lock)


def _run_node(request: LaunchRequest, keys: str) -> int:
    ended = threading.Event()
    why: list[str] = []
    heard = [time.monotonic()]

    def until_eof() -> None:
        # The launcher sends only heartbeats (newlines) from now on: their absence, or the end
        # of the stream, is the news.
        with contextlib.suppress(OSError):
            while os.read(sys.stdin.fileno(), 65536):  # (what readline buffered: newlines)
                heard[0] = time.monotonic()
        why.append("stdin_closed")
        ended.set()

    def on_signal(signum: int, _frame: object) -> None:
        why.append(signal.Signals(signum).name)
        ended.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        node = subprocess.Popen(node_command(request, keys), stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True)
    except OSError as exc:
        log.error("node_not_started", error=str(exc))
        return 1
    relays = [threading.Thread(target=_pass_through, args=(stream, fd), daemon=True,
                               name=f"node-output-{fd}")
              for stream, fd in ((node.stdout, 1), (node.stderr, 2))]
    for relay in relays:
        relay.start()
    try:
        log.info("node_started", pid=node.pid, master=request.master, keys=keys,
                 workers=request.workers or os.cpu_count())
        threading.Thread(target=until_eof, name="stdin-eof", daemon=True).start()
        while not ended.wait(0.2) and node.poll() is None:
            silent = time.monotonic() - heard[0]
            if request.silence_timeout and silent > request.silence_timeout:
                why.append("launcher_silent")
                log.warning("launcher_silent", silent_s=round(silent, 1),
                            timeout_s=request.silence_timeout)
                break
        if node.poll() is None:
            log.info("node_stopping", pid=node.pid, reason=why[0] if why else "")
    finally:
        code = stop_node(node)
    for relay in relays:
        relay.join(5)
    log.info("node_exited", exit_code=code, keys_removed=keys)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
