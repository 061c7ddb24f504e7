"""``python -m actors ssh``: a master on one host, nodes started on others through a real sshd.

Each sshd runs in a host's namespace with a config, host key and authorized key of its own in
``tmp_path`` (the real ``~/.ssh`` is never read or written). The remote python is a wrapper
script that runs this interpreter with the code under test on its path.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import actors
from actors.errors import InvalidLaunchRequest
from actors.ssh_remote import LaunchRequest, decode_request, encode_request
from tests.conftest import children, wait_until
from tests.multihost import netns
from tests.multihost.conftest import cannot_run

pytestmark = pytest.mark.processes

SSHD = "/usr/sbin/sshd"  # sshd wants to be run by its absolute path

CLIENT_SCRIPT = """
import json, os, socket, sys
from actors import Client, Task

class Where(Task):
    def work(self, x):
        return [socket.gethostname(), os.getpid(), x * x]

with Client(sys.argv[1], keys=sys.argv[2], timeout=20) as client:
    client.wait_for_workers(2, timeout=30)
    print(json.dumps([f.result(timeout=30) for f in client.map(Where, range(6))]))
"""


@dataclass
class Ssh:
    """A client key pair, its known-hosts file and the remote python wrapper."""

    key: Path
    known_hosts: Path
    remote_python: Path

    def args(self, key: Path | None = None) -> list[str]:
        return ["-i", str(key or self.key), "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=accept-new", "--remote-python",
                str(self.remote_python)]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture
def ssh(tmp_path: Path) -> Ssh:
    if not os.path.exists(SSHD) or shutil.which("ssh") is None or shutil.which("ssh-keygen") is None:
        cannot_run("needs openssh-server (/usr/sbin/sshd) and openssh-client (ssh, ssh-keygen)")
    repo = Path(actors.__file__).resolve().parent.parent
    wrapper = tmp_path / "remote-python"
    wrapper.write_text("#!/bin/sh\n"
                       f"export PYTHONPATH='{repo}'${{PYTHONPATH:+:$PYTHONPATH}}\n"
                       "export ACTORS_VALIDATE_STATE=1\n"
                       f"exec '{sys.executable}' \"$@\"\n")
    wrapper.chmod(0o755)
    return Ssh(keygen(tmp_path / "client_key"), tmp_path / "known_hosts", wrapper)


def start_sshd(host: netns.Host, tmp_path: Path, authorized: Path) -> subprocess.Popen[str]:
    """sshd on ``host``'s port 22, admitting the key ``authorized`` (its public half)."""
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege separation folder
    folder = tmp_path / f"sshd-{host.name}"
    folder.mkdir()
    config = folder / "sshd_config"
    config.write_text(
        f"ListenAddress {host.address}\nPort 22\nHostKey {keygen(folder / 'host_key')}\n"
        f"AuthorizedKeysFile {authorized}\nStrictModes no\nUsePAM no\n"
        f"PidFile {folder / 'sshd.pid'}\nPasswordAuthentication no\n"
        "PermitRootLogin prohibit-password\n")
    with open(folder / "sshd.log", "w") as log:
        sshd = host.popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log)
    netns.wait_listening(host, 22, timeout=10)
    return sshd


def launcher_events(log: Path) -> list[dict[str, object]]:
    events = []
    for line in log.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def uts_of(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/uts")
    except OSError:
        return ""


def started_by_sshd(host: netns.Host, sshd: subprocess.Popen[str]) -> set[int]:
    """Every process on ``host`` but its sshd: in its network namespace, or in sshd's UTS
    namespace (workers have a network namespace of their own, not a hostname of their own)."""
    uts = uts_of(sshd.pid)
    assert uts
    same_uts = {int(p) for p in os.listdir("/proc") if p.isdigit() and uts_of(int(p)) == uts}
    return (host.pids() | same_uts) - {sshd.pid}


def test_a_node_started_over_ssh_runs_tasks_on_its_host_and_ctrl_c_stops_it_and_its_workers(
    net: netns.Net, tmp_path: Path, ssh: Ssh
) -> None:
    a, b, c = net.add_host("a"), net.add_host("b"), net.add_host("c")  # c: no sshd
    shutil.copyfile(f"{ssh.key}.pub", tmp_path / "authorized_keys")
    sshd = start_sshd(b, tmp_path, tmp_path / "authorized_keys")
    keys, out, log = tmp_path / "keys", tmp_path / "launcher.out", tmp_path / "launcher.log"
    with open(out, "w") as stdout, open(log, "w") as stderr:
        launcher = a.popen([sys.executable, "-m", "actors", "ssh", b.address, c.address,
                            "--workers", "2", "--keys", str(keys), "--log-format", "json",
                            *ssh.args()], stdout=stdout, stderr=stderr)

    def banner() -> str | None:
        assert launcher.poll() is None, log.read_text()[-3000:]
        found = re.search(r"listening on (tcp://\S+),", out.read_text())
        return found[1] if found else None

    # The nodes connect to this host's address on its route to b, on the default port.
    assert wait_until(banner, 30, "the launcher's banner") == f"tcp://{a.address}:5555"
    client = a.run([sys.executable, "-c", CLIENT_SCRIPT, f"{a.address}:5555", str(keys)],
                   timeout=60)
    assert client.returncode == 0, client.stderr[-3000:] + log.read_text()[-3000:]
    results = json.loads(client.stdout)
    assert [x for _, _, x in results] == [i * i for i in range(6)]
    assert {where for where, _, _ in results} == {"b"}  # computed on b's node
    workers = {pid for _, pid, _ in results}

    started = [e for e in launcher_events(log) if e["event"] == "node_started"]
    assert [e["host"] for e in started] == [b.address]
    remote_keys = Path(str(started[0]["keys"]))
    assert sorted(p.name for p in remote_keys.iterdir()) == ["master.key", "node.key",
                                                             "node.key_secret"]
    on_b = started_by_sshd(b, sshd)
    assert workers <= on_b and len(on_b) >= 4  # ssh's session, ssh_remote, the node, workers
    # c's ssh failed at once; the launcher said so, naming c, and went on.
    failed = [e for e in launcher_events(log) if e["event"] == "host_failed"]
    assert [e["host"] for e in failed] == [c.address]
    assert launcher.poll() is None

    launcher.send_signal(signal.SIGINT)
    assert launcher.wait(30) == 0, log.read_text()[-3000:]
    wait_until(lambda: not started_by_sshd(b, sshd), 10, "every process on b but sshd to end")
    assert not remote_keys.exists()
    assert sshd.poll() is None
    events = [e["event"] for e in launcher_events(log)]
    assert "node_exited" in events and "ssh_launcher_stopped" in events
    wait_until(lambda: not a.pids(), 10, "the master on a to end")


def test_when_every_host_fails_the_launcher_stops_its_master_and_exits_1_naming_them(
    net: netns.Net, tmp_path: Path, ssh: Ssh
) -> None:
    a, b, c = net.add_host("a"), net.add_host("b"), net.add_host("c")
    shutil.copyfile(f"{ssh.key}.pub", tmp_path / "authorized_keys")
    start_sshd(b, tmp_path, tmp_path / "authorized_keys")  # b refuses this other key
    launcher = a.popen([sys.executable, "-m", "actors", "ssh", b.address, c.address,
                        "--keys", str(tmp_path / "keys"), "--log-format", "json",
                        *ssh.args(keygen(tmp_path / "other_key"))],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = launcher.communicate(timeout=30)
    assert launcher.returncode == 1, stderr[-3000:]
    assert "listening on" in stdout  # the master had started
    assert "error: every host failed, no node runs:\n" in stderr, stderr[-3000:]
    failures = stderr[stderr.index("every host failed"):]
    assert re.search(rf"\n  {re.escape(b.address)}: \S+@{re.escape(b.address)}: Permission "
                     r"denied \(publickey.*\)\. \(exit code 255\)\n", failures), failures
    assert f"  {c.address}: ssh: connect to host {c.address} port 22: Connection refused " \
        "(exit code 255)\n" in failures
    wait_until(lambda: not a.pids(), 10, "the master on a to end")



@pytest.mark.parametrize("killed", ["ssh", "ssh_remote"])
def test_when_the_connection_drops_or_the_remote_is_killed_the_node_and_its_workers_stop(
    net: netns.Net, tmp_path: Path, ssh: Ssh, killed: str
) -> None:
    """``ssh``: the ssh client here is killed, the connection drops and sshd closes the remote's
    stdin. ``ssh_remote``: the remote half is killed -9 on b; its node sees its parent gone."""
    a, b = net.add_host("a"), net.add_host("b")
    shutil.copyfile(f"{ssh.key}.pub", tmp_path / "authorized_keys")
    sshd = start_sshd(b, tmp_path, tmp_path / "authorized_keys")
    log = tmp_path / "launcher.log"
    with open(log, "w") as stderr:
        launcher = a.popen([sys.executable, "-m", "actors", "ssh", b.address, "--workers", "1",
                            "--keys", str(tmp_path / "keys"), "--log-format", "json",
                            *ssh.args()], stdout=subprocess.DEVNULL, stderr=stderr)

    def joined() -> list[dict[str, object]]:
        assert launcher.poll() is None, log.read_text()[-3000:]
        events = launcher_events(log)
        # The master's own log line, and the remote's, relayed: the node is up on b.
        return [e for e in events if e["event"] == "node_started"] if any(
            e["event"] == "node_joined" for e in events) else []

    started = wait_until(joined, 30, "b's node to join")[0]  # type: ignore[index]
    remote_keys = Path(str(started["keys"]))
    on_b = started_by_sshd(b, sshd)
    assert int(started["pid"]) in on_b and len(on_b) >= 4  # session, remote, node, worker
    if killed == "ssh":
        (victim,) = [pid for pid in children(launcher.pid)
                     if Path(f"/proc/{pid}/comm").read_text().strip() == "ssh"]
    else:
        (victim,) = [pid for pid in on_b if b"actors.ssh_remote" in
                     Path(f"/proc/{pid}/cmdline").read_bytes()]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not started_by_sshd(b, sshd), 15, "every process on b but sshd to end")
    if killed == "ssh":
        assert not remote_keys.exists()
    else:  # a remote killed -9 leaves them to the next start there (here: to us)
        shutil.rmtree(remote_keys)
    assert launcher.wait(15) == 1, log.read_text()[-3000:]  # its only host is lost
    assert any(e["event"] == "host_failed" and e["host"] == b.address
               for e in launcher_events(log))


# --- the remote half alone ------------------------------------------------------------


def a_request(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "master": "tcp://10.0.0.1:5555", "master_key": "public-key = \"x\"",
        "node_key": "public-key = \"y\"", "node_key_secret": "secret-key = \"z\"",
        "workers": 2}
    fields.update(changes)
    return fields


def test_a_launch_request_survives_its_encoding() -> None:
    request = LaunchRequest(**a_request(), silence_timeout=30.0)  # type: ignore[arg-type]
    assert decode_request(encode_request(request)) == request


@pytest.mark.parametrize(("line", "reason"), [
    (b"", "no request"),
    (b"not json\n", "not JSON"),
    (json.dumps(a_request(workers="2")).encode(), "Expected `int | null`, got `str`"),
    (json.dumps(a_request(workers=0)).encode(), "workers must be at least 1"),
    (json.dumps(a_request(master="10.0.0.1")).encode(), "it has no port"),
    (json.dumps(a_request(node_key_secret="")).encode(), "node_key_secret is not a CURVE key"),
    (json.dumps(a_request(extra=1)).encode(), "unknown field `extra`"),
], ids=["empty", "not-json", "wrong-type", "no-workers", "no-port", "no-key", "unknown-field"])
def test_a_bad_launch_request_is_refused_with_its_reason(line: bytes, reason: str) -> None:
    with pytest.raises(InvalidLaunchRequest, match=re.escape(reason)):
        decode_request(line)


def test_the_remote_exits_2_on_a_bad_request_and_starts_nothing() -> None:
    done = subprocess.run([sys.executable, "-m", "actors.ssh_remote"], input=b"{}\n",
                          capture_output=True, timeout=30)
    assert done.returncode == 2
    assert b"bad_launch_request" in done.stderr and b"missing required field" in done.stderr
