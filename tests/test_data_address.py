"""Where a node listens for its peers and what address it announces for them: one they can
reach without resolving each other's host names (issue 14's first break)."""

from __future__ import annotations

import re
import socket
import subprocess
from pathlib import Path

import pytest

from actors.node_data import route_to, split_host_port
from tests.conftest import (
    descendants,
    kill_all,
    log_events,
    python_logged,
    start_master,
    wait_until,
)


def test_the_route_to_the_master_names_an_address_not_a_host_name() -> None:
    assert route_to("tcp://127.0.0.1:5555") == "127.0.0.1"
    assert route_to("tcp://[::1]:5555") in ("::1", None)  # None: a kernel without IPv6
    assert route_to("tcp://no-such-host.invalid:5555") is None


def test_host_and_port_are_read_as_a_user_writes_them() -> None:
    assert split_host_port("10.0.0.5") == ("10.0.0.5", 0)
    assert split_host_port("10.0.0.5:7000") == ("10.0.0.5", 7000)
    assert split_host_port("[fd00::1]:7000") == ("fd00::1", 7000)
    with pytest.raises(ValueError, match="HOST"):
        split_host_port(":7000")
    with pytest.raises(ValueError, match="HOST"):
        split_host_port("host:port")


def _joined(log: Path) -> dict[str, object] | None:
    for event in log_events(log):
        if event["event"] == "joined_master":
            return event
    return None


@pytest.mark.processes
@pytest.mark.parametrize("options, expected", [
    (["--data-listen", "0.0.0.0"], r"tcp://127\.0\.0\.1:\d+"),  # the route to a local master
    (["--data-address", "192.0.2.7:7777"], r"tcp://192\.0\.2\.7:7777"),  # NAT: as given
], ids=["wildcard listen", "announced as given"])
def test_a_node_announces_an_address_its_peers_can_reach(
        tmp_path: Path, options: list[str], expected: str) -> None:
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(tmp_path / "keys"))
    node: subprocess.Popen[str] | None = None
    try:
        node = python_logged(tmp_path / "node.log", "-m", "actors.node", "--master", address,
                             "--workers", "1", "--keys", str(tmp_path / "keys"), *options)
        joined = wait_until(lambda: _joined(tmp_path / "node.log"), 60, "the node to join")
        assert isinstance(joined, dict)
        assert re.fullmatch(expected, str(joined["data_address"])), joined
    finally:
        kill_all({master.pid} | ({node.pid} | descendants(node.pid) if node else set()))
        master.wait(10)
        if node is not None:
            node.wait(10)


def test_a_data_address_that_is_not_host_port_stops_the_node_with_the_reason(
        tmp_path: Path) -> None:
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(tmp_path / "keys"))
    try:
        node = python_logged(tmp_path / "node.log", "-m", "actors.node", "--master", address,
                             "--workers", "1", "--keys", str(tmp_path / "keys"),
                             "--data-address", "host:port")
        assert node.wait(60) == 2
        assert "bad_data_address" in (tmp_path / "node.log").read_text()
    finally:
        master.kill()
        master.wait(10)


@pytest.mark.processes
def test_a_node_without_a_master_says_why_and_gives_up_after_its_connect_timeout(
        tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port where nothing listens (free a moment ago)
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    master, _ = start_master(tmp_path, "--workers", "0", "--keys", str(tmp_path / "keys"))
    master.kill()  # it made the keys; the node finds no one at its address
    master.wait(10)
    node = python_logged(tmp_path / "node.log", "-m", "actors.node", "--master",
                         f"tcp://127.0.0.1:{port}", "--workers", "1", "--keys",
                         str(tmp_path / "keys"), "--connect-timeout", "7")
    try:
        assert node.wait(60) == 1
    finally:
        kill_all({node.pid} | descendants(node.pid))
    events = log_events(tmp_path / "node.log")
    unreachable = [e for e in events if e["event"] == "master_unreachable"]
    assert unreachable[0]["level"] == "warning"  # said after a few seconds, before giving up
    assert f"no connection to tcp://127.0.0.1:{port}" in unreachable[0]["reason"]
    assert unreachable[-1]["level"] == "error" and "connect-timeout" in unreachable[-1]["hint"]
