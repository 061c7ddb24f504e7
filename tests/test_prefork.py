"""A node's first workers are forked, later ones spawned: both must start the same way."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

from actors import Client, LocalCluster, Task
from tests.conftest import wait_until

pytestmark = pytest.mark.processes


class Surroundings(Task):
    """What a task sees of the process it runs in."""

    def work(self):
        return {
            "pid": os.getpid(),
            "own_session": os.getsid(0) == os.getpid(),
            "cwd": os.getcwd(),
            "home": os.environ.get("HOME"),
            "tmp": tempfile.gettempdir(),
            "secret": os.environ.get("PYDRA_TEST_SECRET"),
            "stdin": os.readlink("/proc/self/fd/0"),
            "cmdline": Path("/proc/self/cmdline").read_bytes().replace(b"\0", b" ").decode(),
            "files": [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                      if int(fd) > 2 and os.path.exists(f"/proc/self/fd/{fd}")],
        }


def check(seen: dict[str, object]) -> None:
    assert seen["own_session"], seen
    assert seen["cwd"] == seen["home"] == seen["tmp"], seen  # the worker's scratch folder
    assert seen["secret"] is None, "the node's environment leaked into a worker"
    assert seen["stdin"] == "/dev/null", seen
    # Nothing of the node's is open here: only ZeroMQ's own eventfds, pollers and socket.
    assert all(f.startswith(("anon_inode:", "socket:")) for f in seen["files"]), seen["files"]


@pytest.mark.parametrize(("local_node", "forked_by"), [("inside", "actors.master"),
                                                       ("process", "actors.node")])
def test_forked_and_spawned_workers_start_alike(monkeypatch: pytest.MonkeyPatch, local_node: str,
                                                forked_by: str) -> None:
    monkeypatch.setenv("PYDRA_TEST_SECRET", "not for tasks")
    # fork=False: a spawned master (and node), whose forked first worker shows the command line
    # of the process its node runs in
    with LocalCluster(workers=1, fork=False, local_node=local_node) as cl, Client(cl) as client:
        first = client.submit(Surroundings).result(timeout=30)
        check(first)
        assert forked_by in first["cmdline"], "the first worker should be forked by its node"
        os.kill(first["pid"], signal.SIGKILL)  # its replacement is spawned: threads run by now
        wait_until(lambda: client.info().workers == 1 and client.info().idle_workers == 1, 30,
                   "a replacement worker")
        second = client.submit(Surroundings).result(timeout=30)
        check(second)
        assert second["pid"] != first["pid"]
        assert "actors.worker" in second["cmdline"], second["cmdline"]
        assert first["cwd"] != second["cwd"]  # each its own scratch folder

