"""Several hosts on one machine: Linux network namespaces joined by a switch.

A ``Net`` is a namespace holding a bridge (the switch); each ``Host`` is a namespace of its own
with one veth link to that switch, an address on a private subnet that exists only inside these
namespaces, and its own hostname (a UTS namespace per process) that no other host can resolve.
A link can be cut and restored (``partition``/``heal``); a slow link is a relay (``relay.py``:
this kernel has no netem). ``close`` kills every process in every one of these namespaces (by pid,
from ``ip netns pids`` and /proc: workers run in sessions and network namespaces of their own) and deletes the namespaces (their
veths go with them), whether the test passed or not.

Needs root and iproute2 (``ip``, ``tc``), as CI has; elsewhere the suite says why it cannot run.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import alive, descendants

PREFIX = "pa-"  # every namespace this suite makes starts so (and a stale one is removed)
_nets = itertools.count()


def usable() -> str | None:
    """None when namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None or shutil.which("unshare") is None:
        return "iproute2 (ip) and util-linux (unshare) are needed"
    return None


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def remove_stale() -> None:
    """Namespaces of an earlier run of this suite whose process is gone (killed mid-test)."""
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


class Host:
    """One host: a namespace, its address on the switch, its hostname, its processes."""

    def __init__(self, net: Net, name: str, ns: str, address: str) -> None:
        self.net, self.name, self.ns, self.address = net, name, ns, address
        self.procs: list[subprocess.Popen[str]] = []

    def command(self, args: list[str]) -> list[str]:
        """``args`` as run on this host: in its namespace, with its own hostname."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "--",
                "sh", "-c", 'hostname "$0" && exec "$@"', self.name, *args]

    def popen(self, args: list[str], **kwargs: object) -> subprocess.Popen[str]:
        """Start ``args`` on this host in a session of its own (stopped on ``Net.close``)."""
        proc = subprocess.Popen(self.command(args), text=True, start_new_session=True,
                                **kwargs)  # type: ignore[call-overload]
        self.procs.append(proc)
        return proc

    def run(self, args: list[str], timeout: float = 60.0,
            **kwargs: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(args), capture_output=True, text=True,  # type: ignore[call-overload]
                              timeout=timeout, **kwargs)

    def counter(self, name: str) -> int:
        """A statistic of this host's link (``rx_bytes``, ``tx_bytes``...)."""
        out = self.run(["cat", f"/sys/class/net/eth0/statistics/{name}"])
        return int(out.stdout)

    def pids(self) -> set[int]:
        """Every process started on this host and every process below them (workers leave the
        host's network namespace for one of their own: ``ip netns pids`` does not list them)."""
        out = subprocess.run(["ip", "netns", "pids", self.ns], capture_output=True, text=True)
        mine = {int(pid) for pid in out.stdout.split()}
        mine |= {proc.pid for proc in self.procs if alive(proc.pid)}
        return mine | set().union(*(descendants(pid) for pid in mine))

    def kill_group(self, proc: subprocess.Popen[str]) -> None:
        """``kill -9`` of the process group ``proc`` leads."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class Net:
    """A switch (bridge) in a namespace of its own and the hosts linked to it."""

    def __init__(self, subnet: str = "10.77.0") -> None:
        self.tag = f"{PREFIX}{os.getpid()}-{next(_nets)}"
        self.subnet = subnet
        self.switch = f"{self.tag}-sw"
        self.hosts: list[Host] = []
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, name: str) -> Host:
        ns = f"{self.tag}-{name}"
        address = f"{self.subnet}.{len(self.hosts) + 2}"
        port = f"v-{name}"[:15]
        _ip("netns", "add", ns)
        self.hosts.append(host := Host(self, name, ns, address))
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port,
            "netns", self.switch)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return host

    def _port(self, host: Host) -> str:
        return f"v-{host.name}"[:15]

    def partition(self, host: Host) -> None:
        """Cut ``host`` off the switch: its packets are lost, its TCP connections see nothing
        (no reset, no close), as with a pulled cable."""
        _ip("-n", self.switch, "link", "set", self._port(host), "down")

    def heal(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", self._port(host), "up")

    def close(self) -> None:
        for host in self.hosts:
            for pid in host.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for host in self.hosts:
            for proc in host.procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)
        for ns in [h.ns for h in self.hosts] + [self.switch]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def wait_listening(host: Host, port: int, timeout: float = 20.0) -> None:
    """Until something listens on ``port`` on ``host`` (``ss`` in its namespace)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["ip", "netns", "exec", host.ns, "ss", "-Hltn", f"sport = :{port}"],
                             capture_output=True, text=True).stdout
        if out.strip():
            return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {host.name}:{port} after {timeout}s")
