"""``python -m actors ssh HOST [HOST ...]``: a master here and a node on each host over ssh,
with the keys handed over, all stopped on Ctrl-C (what ``dask-ssh`` and ``ray up`` do).

Theory of operation:

1. Arguments are checked before anything starts (a bad one is a usage error), and the address
   the nodes will connect to is settled: ``--master-address``, else this host's address on
   its route to the first host (no host needs to resolve this one's name).
2. The master starts here (``python -m actors.master``, in a process group of its own, so a
   Ctrl-C in the terminal reaches only this launcher, which stops everything in order).
3. Once it listens, each host gets ``ssh [options] HOST REMOTE_PYTHON -m actors.ssh_remote``;
   its stdin carries one JSON line (``actors.ssh_remote.LaunchRequest``: the master's address,
   the node's key files, the node's options), then a newline every few seconds, and stays
   open: its end is what stops that host's node. Whatever the remote prints (the node's JSON
   log lines, ssh's own complaints) is logged here, bound with ``host``.
4. An ssh that ends before we stop it failed (unreachable host, refused key, no pydra-actors
   on the remote python): logged with the last lines it printed. When every host has failed,
   the master is stopped and we exit 1.
5. On SIGINT or SIGTERM: every ssh's stdin is closed (the remotes stop their nodes), the ssh
   processes get a bounded wait and then SIGTERM, then the master stops; exit 0.

If this launcher is killed outright, the ssh connections close with it and the nodes stop;
the master (``--exit-with-parent``) sees its parent gone and stops too.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ipaddress
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import IO, Any

import structlog

from actors import logs
from actors.errors import ActorsError
from actors.launch import default_keys_dir, ensure_keys_logged, stop_on_signals, stop_process
from actors.ssh_remote import LaunchRequest, encode_request

log = structlog.get_logger("actors.ssh")

HEARTBEAT_S = 5.0  # a newline to every remote this often...
SILENCE_TIMEOUT_S = 30.0  # ...which takes the launcher for gone after this long without one
READY_TIMEOUT_S = 30.0
REMOTE_STOP_S = 15.0  # the remotes' own grace (10 s) and some: then ssh gets SIGTERM
TAIL_LINES = 12
_HOST = re.compile(r"^(?:[^@\s/]+@)?[A-Za-z0-9_.:%\[\]-]+$")


# --- arguments ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("hosts", nargs="+", metavar="HOST",
                        help="hosts to start a node on (HOST or USER@HOST, as ssh takes them)")
    parser.add_argument("--workers", type=_at_least(1), default=None,
                        help="worker processes of each node (default: one per core of its host)")
    parser.add_argument("--local-workers", type=_at_least(0), default=0,
                        help="worker processes of a node here, beside the master (default 0)")
    parser.add_argument("--port", type=_port(0), default=5555,
                        help="the master's TCP port (default 5555; 0: any free port)")
    parser.add_argument("--master-address", default=None, metavar="HOST", type=_address,
                        help="the address the nodes connect to (default: this host's address "
                             "on the route to the first host)")
    parser.add_argument("--host", default=None, metavar="INTERFACE",
                        help="the address the master listens on (default: the master address "
                             "when it is an IP address, else every interface)")
    parser.add_argument("--keys", default=None,
                        help="CURVE key directory (created if missing; default $ACTORS_KEYS or "
                             "~/.pydra-actors/keys)")
    parser.add_argument("-i", "--identity", default=None, metavar="FILE",
                        help="ssh's identity file (ssh -i)")
    parser.add_argument("--ssh-port", type=_port(1), default=None, help="ssh's port (ssh -p)")
    parser.add_argument("--user", default=None, help="the remote user (for hosts without USER@)")
    parser.add_argument("-o", "--ssh-option", action="append", default=[], metavar="OPTION",
                        help="passed to ssh as -o OPTION (repeatable); ssh runs with "
                             "BatchMode=yes unless one says otherwise: no prompts")
    parser.add_argument("--remote-python", default="python3", metavar="COMMAND",
                        help="how the remote shell runs a Python with pydra-actors installed "
                             "(default python3; e.g. /opt/venv/bin/python)")
    parser.add_argument("--connect-timeout", type=_non_negative, default=0.0, metavar="SECONDS",
                        help="a node no master welcomed within this long gives up (default 0: "
                             "keep trying)")
    parser.add_argument("--data-listen", default=None, metavar="HOST[:PORT]",
                        help="where each node listens for its peers (python -m actors.node "
                             "--data-listen)")
    logs.add_arguments(parser)


def check_arguments(args: argparse.Namespace) -> str | None:
    """What is wrong with ``args`` beyond their types (a usage error), else None."""
    for host in args.hosts:
        if host.startswith("-") or not _HOST.match(host):
            return f"{host!r} is not a host (HOST or USER@HOST)"
    if args.identity is not None and not os.path.isfile(args.identity):
        return f"no identity file {args.identity}"
    if args.user is not None and not re.fullmatch(r"[^@\s:/]+", args.user):
        return f"{args.user!r} is not a user name"
    return None


def _at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value
    return parse


def _port(low: int) -> Any:
    at_least = _at_least(low)

    def parse(text: str) -> int:
        value: int = at_least(text)
        if value > 65535:
            raise argparse.ArgumentTypeError(f"{value} is not a port (at most 65535)")
        return value
    return parse


def _non_negative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _address(text: str) -> str:
    """A host name or an IP address (IPv6 with or without brackets), without a port."""
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a host name or an IP address "
                                         "(without a port: the port is --port)")
    return text


def _host_of(target: str) -> str:
    """The host part of ``[USER@]HOST`` (brackets of an IPv6 address removed)."""
    host = target.rpartition("@")[2]
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


def route_address(first_host: str) -> str | None:
    """This host's address on the route to ``first_host`` (what the node there can reach)."""
    from actors.node_data import route_to

    return route_to(_endpoint(_host_of(first_host), 22))


# --- the remotes ---------------------------------------------------------------


@dataclass(frozen=True)
class Ssh:
    """How to reach the hosts."""

    identity: str | None = None
    port: int | None = None
    user: str | None = None
    options: tuple[str, ...] = ()
    remote_python: str = "python3"

    def command(self, host: str) -> list[str]:
        command = ["ssh", "-T"]
        if self.port is not None:
            command += ["-p", str(self.port)]
        if self.identity is not None:
            command += ["-i", self.identity]
        for option in self.options:  # before ours: for ssh, the first value given wins
            command += ["-o", option]
        # No prompt (nobody could answer it), and a dead connection noticed within a minute.
        command += ["-o", "BatchMode=yes", "-o", "ServerAliveInterval=10",
                    "-o", "ServerAliveCountMax=6"]
        target = f"{self.user}@{host}" if self.user and "@" not in host else host
        # The remote shell runs this line: --remote-python may be a path or a command.
        return [*command, "--", target, f"{self.remote_python} -m actors.ssh_remote"]


@dataclass
class Remote:
    """One host's ssh process and what it printed last."""

    host: str
    proc: subprocess.Popen[bytes]
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(
        maxlen=TAIL_LINES))
    readers: list[threading.Thread] = field(default_factory=list)
    ended: bool = False

    def send(self, data: bytes) -> bool:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
        except (OSError, ValueError):  # a broken pipe: that ssh has ended
            return False
        return True

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()

    def output_read(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for reader in self.readers:
            reader.join(max(0.0, deadline - time.monotonic()))


def start_remote(host: str, ssh: Ssh, request: LaunchRequest) -> Remote:
    proc = subprocess.Popen(ssh.command(host), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, process_group=0)
    remote = Remote(host, proc)
    bound = log.bind(host=host)
    for stream in (proc.stdout, proc.stderr):
        assert stream is not None
        reader = threading.Thread(target=_relay, args=(stream, remote.tail, bound),
                                  name=f"ssh-{host}", daemon=True)
        reader.start()
        remote.readers.append(reader)
    remote.send(encode_request(request))
    return remote


def _relay(stream: IO[bytes], tail: collections.deque[str], bound: Any) -> None:
    """Each line the remote prints, logged here: a structlog JSON line of the node (or of
    ssh_remote) with its own event, level and fields; any other line as ``remote_output``."""
    for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\r\n")
        if not line.strip():
            continue
        tail.append(line[:500])
        relog(bound, line)
    stream.close()


def relog(bound: Any, line: str) -> None:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("event"), str):
        bound.info("remote_output", line=line)
        return
    event = record.pop("event")
    level = logging.getLevelNamesMapping().get(str(record.pop("level", "info")).upper(),
                                               logging.INFO)
    record.pop("timestamp", None)
    if "host" in record:  # ours is the ssh host
        record["remote_host"] = record.pop("host")
    bound.log(level, event, **record)


# --- the launcher ----------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """``python -m actors ssh``, its arguments already checked."""
    logs.configure(args.log_format, args.log_level)
    master_host = args.master_address or route_address(args.hosts[0])
    if master_host is None:
        sys.stderr.write(f"error: cannot tell this host's address on the route to "
                         f"{_host_of(args.hosts[0])}: give --master-address\n")
        return 2
    listen = args.host or (master_host if _is_ip(master_host) else "0.0.0.0")
    keys = os.path.abspath(os.path.expanduser(args.keys or default_keys_dir()))
    try:
        ensure_keys_logged(keys)
        key_files = {name: _read(os.path.join(keys, name))
                     for name in ("master.key", "node.key", "node.key_secret")}
    except (ActorsError, OSError) as exc:
        sys.stderr.write(f"error: keys in {keys}: {exc}\n")
        return 2
    stop = threading.Event()
    stop_on_signals(stop)
    with tempfile.TemporaryDirectory(prefix="actors-ssh-") as folder:
        ready_file = os.path.join(folder, "ready.json")
        master = subprocess.Popen(
            [sys.executable, "-m", "actors.master", "--host", listen, "--port", str(args.port),
             "--workers", str(args.local_workers), "--keys", keys, "--ready-file", ready_file,
             "--no-banner", "--exit-with-parent"], stdin=subprocess.DEVNULL, process_group=0)
        ready = _wait_ready(master, ready_file, stop)
    if ready is None:
        stop_process(master, grace=10.0)
        if stop.is_set():
            return 0
        why = (f"exit code {master.returncode}" if master.returncode is not None and
               master.returncode >= 0 else f"not ready within {READY_TIMEOUT_S:.0f}s")
        sys.stderr.write(f"error: the master did not start ({why}); its log above says why\n")
        return 1
    port = int(ready["address"].rpartition(":")[2])
    address = _endpoint(master_host, port)
    request = LaunchRequest(
        master=address, master_key=key_files["master.key"], node_key=key_files["node.key"],
        node_key_secret=key_files["node.key_secret"], workers=args.workers,
        connect_timeout=args.connect_timeout, data_listen=args.data_listen,
        log_level=os.environ.get("ACTORS_LOG_LEVEL", "INFO"), silence_timeout=SILENCE_TIMEOUT_S)
    ssh = Ssh(args.identity, args.ssh_port, args.user, tuple(args.ssh_option),
              args.remote_python)
    remotes = [start_remote(host, ssh, request) for host in args.hosts]
    log.info("ssh_launched", master=address, hosts=args.hosts, listen=listen)
    sys.stdout.write(
        f"pydra-actors master listening on {address}, nodes on {len(remotes)} host(s) over ssh: "
        f"{' '.join(args.hosts)}\n"
        f"  from Python: Client({address!r}, keys={keys!r})\n"
        + (f"  dashboard:   {ready['dashboard']}\n" if ready.get("dashboard") else "")
        + "  Ctrl-C stops the nodes and the master\n")
    sys.stdout.flush()
    code = _watch(master, remotes, stop)
    _stop_remotes(remotes)
    stop_process(master, grace=10.0)
    log.info("ssh_launcher_stopped", exit_code=code)
    return code


def _watch(master: subprocess.Popen[bytes], remotes: list[Remote], stop: threading.Event) -> int:
    """Until Ctrl-C (0), the master's end or every host's failure (1)."""
    next_beat = time.monotonic() + HEARTBEAT_S
    while not stop.wait(0.2):
        if master.poll() is not None:
            log.error("master_exited", exit_code=master.returncode)
            sys.stderr.write(f"error: the master exited (code {master.returncode})\n")
            return 1
        for remote in remotes:
            if not remote.ended and remote.proc.poll() is not None:
                remote.ended = True
                remote.output_read(2.0)
                log.error("host_failed", host=remote.host, exit_code=remote.proc.returncode,
                          last_lines=list(remote.tail))
        if all(remote.ended for remote in remotes):
            sys.stderr.write("error: every host failed, no node runs:\n" + "".join(
                f"  {r.host}: {r.tail[-1] if r.tail else 'ssh ended'} (exit code "
                f"{r.proc.returncode})\n" for r in remotes))
            return 1
        if time.monotonic() >= next_beat:
            next_beat += HEARTBEAT_S
            for remote in remotes:
                if not remote.ended:
                    remote.send(b"\n")
    return 0


def _stop_remotes(remotes: list[Remote]) -> None:
    """Close every stdin (the remotes stop their nodes), wait, then SIGTERM what is left."""
    running = [r for r in remotes if r.proc.poll() is None]
    if running:
        log.info("nodes_stopping", hosts=[r.host for r in running])
    for remote in remotes:
        remote.close_stdin()
    deadline = time.monotonic() + REMOTE_STOP_S
    for remote in running:
        try:
            remote.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("ssh_not_ended", host=remote.host, waited_s=REMOTE_STOP_S)
            stop_process(remote.proc, grace=5.0)
        remote.output_read(2.0)
    for remote in remotes:
        remote.proc.wait(5)


def _wait_ready(master: subprocess.Popen[bytes], ready_file: str,
                stop: threading.Event) -> dict[str, str] | None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not stop.wait(0.02):
        if os.path.exists(ready_file):
            with open(ready_file) as f:
                return dict(json.load(f))
        if master.poll() is not None or time.monotonic() > deadline:
            return None
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
