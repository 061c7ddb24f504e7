"""Deployed task packages, end to end: versions side by side, refetch, two nodes, errors."""

from __future__ import annotations

import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actors import Client, LocalCluster
from actors.errors import InvalidArguments, UnknownTask
from tests.conftest import (
    alive,
    descendants,
    kill_all,
    log_events,
    python_logged,
    shown,
    start_master,
    wait_until,
)

pytestmark = pytest.mark.processes

SOURCE = '''
import os
import time
from actors import ParallelTask, Task

VERSION = {version!r}


def wait_for(gate, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(gate)
        time.sleep(0.005)


class Which(Task):
    """Which version of the package runs (once the gate, if any, is open)."""

    def work(self, gate=""):
        if gate:
            wait_for(gate)
        return VERSION


class Where(Task):
    """The version and the worker process, once the gate is open."""

    def work(self, gate):
        wait_for(gate)
        return VERSION, os.getpid()


class Squares(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        time.sleep(0.005)
        return (i * i, __import__("os").getpid())

    def reduce(self, results):
        return sum(r for r, _ in results), len({{pid for _, pid in results}})
'''


def deploy(tasks_dir: Path, version: str, package: str = "demo", data_mib: int = 0) -> None:
    folder = tasks_dir / package
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "jobs.py").write_text(SOURCE.format(version=version))
    if data_mib:  # many chunks: a transfer long enough for every worker to ask during it
        (folder / "data.bin").write_bytes(random.Random(version).randbytes(data_mib * 2**20))


def versions(client: Client, package: str = "demo") -> list[str]:
    return [p.version for p in client.packages() if p.package == package]


def cached(cache: Path, package: str = "demo") -> set[str]:
    folder = cache / package
    return {p.name for p in folder.iterdir() if not p.name.startswith(".")} if folder.is_dir() else set()


def test_a_new_version_runs_beside_the_old_one_which_is_removed_after_use(tmp_path: Path) -> None:
    tasks, cache = tmp_path / "tasks", tmp_path / "cache"
    deploy(tasks, "one")
    with LocalCluster(workers=2, tasks_dir=tasks, cache_dir=cache, package_grace=0.5) as cl, \
            Client(cl) as client:
        client.wait_for_workers(2)
        first = wait_until(lambda: versions(client), 20, "the package to be listed")
        old = client.submit("demo.jobs:Which", gate=str(tmp_path / "gate"))
        wait_until(lambda: cached(cache) == set(first), 20, "the node to fetch the first version")
        deploy(tasks, "two")
        second = wait_until(lambda: versions(client) != first and versions(client), 20,
                            "the master to see the change")
        assert client.submit("demo.jobs:Which").result(timeout=30) == "two"
        (tmp_path / "gate").touch()
        assert old.result(timeout=30) == "one"  # it kept the version it started with
        assert cached(cache) >= set(second)
        wait_until(lambda: cached(cache) == set(second), 20, "the old version to be removed")


def test_many_short_deployed_tasks_each_get_their_version_and_a_new_one_takes_over(
    tmp_path: Path
) -> None:
    """Short deployed tasks queue on workers that imported their version already (no fetch,
    begun at once); a newer version deployed meanwhile runs on other workers, never mixed."""
    tasks = tmp_path / "tasks"
    deploy(tasks, "one")
    with LocalCluster(workers=2, tasks_dir=tasks) as cl, Client(cl) as client:
        client.wait_for_workers(2)
        wait_until(lambda: versions(client), 20, "the package to be listed")
        assert client.submit("demo.jobs:Which").result(timeout=30) == "one"
        futures = [client.submit("demo.jobs:Which") for _ in range(300)]
        assert {f.result(timeout=60) for f in futures} == {"one"}
        first = versions(client)
        deploy(tasks, "two")
        wait_until(lambda: versions(client) != first, 20, "the master to see the change")
        futures = [client.submit("demo.jobs:Which") for _ in range(300)]
        assert {f.result(timeout=60) for f in futures} == {"two"}
        # A map by name: its tasks travel as SubmitMany messages, the newest version pinned
        # once for all of them.
        mapped = client.map("demo.jobs:Which", [""] * 1_500)
        assert {f.result(timeout=60) for f in mapped} == {"two"}
        assert client.submit("demo.jobs:Which").result(timeout=30) == "two"


def test_a_corrupted_cache_folder_is_fetched_again(tmp_path: Path) -> None:
    tasks, cache = tmp_path / "tasks", tmp_path / "cache"
    deploy(tasks, "one")
    with LocalCluster(workers=1, tasks_dir=tasks, cache_dir=cache) as cl:
        with Client(cl) as client:
            wait_until(lambda: versions(client), 20, "the package to be listed")
            assert client.submit("demo.jobs:Which").result(timeout=30) == "one"
            # The worker that imported it goes (a fresh one must import the package again).
            warm = client.submit(os.getpid).result(timeout=30)
            os.kill(warm, signal.SIGKILL)
            wait_until(lambda: client.info().idle_workers == 1 and warm not in descendants(os.getpid()),
                       30, "a fresh worker")
        (version,) = cached(cache)
        target = cache / "demo" / version / "jobs.py"
        os.chmod(target.parent, 0o755)
        os.chmod(target, 0o644)
        target.write_text("VERSION = 'tampered'\n")  # edited by hand
        with Client(cl) as other:
            assert other.submit("demo.jobs:Which").result(timeout=30) == "one"
        assert "tampered" not in target.read_text()
        assert stat.S_IMODE(target.stat().st_mode) == 0o444


def test_an_unknown_task_name_is_refused_at_submit_with_what_exists(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    deploy(tasks, "one")
    with LocalCluster(workers=1, tasks_dir=tasks) as cl, Client(cl) as client:
        wait_until(lambda: versions(client), 20, "the package to be listed")
        with pytest.raises(UnknownTask) as info:
            client.submit("demo.jobs:Nope")
        assert "demo.jobs:Which" in str(info.value) and "demo.jobs:Squares" in str(info.value)
        with pytest.raises(UnknownTask, match="did you mean 'demo.jobs:Which'"):
            client.submit("demo.jobs:Wich")
        listing = {t.name: t for p in client.packages() for t in p.tasks}
        assert listing["demo.jobs:Which"].parameters == ["gate"]
        assert listing["demo.jobs:Squares"].kind == "ParallelTask"
        assert listing["demo.jobs:Which"].last_run == 0.0  # never run
        before = time.time()
        assert client.submit("demo.jobs:Which").result(timeout=30) == "one"
        listing = {t.name: t for p in client.packages() for t in p.tasks}
        assert before <= listing["demo.jobs:Which"].last_run <= time.time()
        assert listing["demo.jobs:Squares"].last_run == 0.0


def test_arguments_that_do_not_fit_a_deployed_task_fail_it_not_its_module(tmp_path: Path) -> None:
    """A misspelt keyword is refused at submit from the listing's parameter names (nothing is
    sent); what only the code can tell (a missing argument) fails the task on its worker,
    which serves on, and the module is not listed broken."""
    tasks = tmp_path / "tasks"
    deploy(tasks, "one")
    with LocalCluster(workers=1, tasks_dir=tasks) as cl, Client(cl) as client:
        wait_until(lambda: versions(client), 20, "the package to be listed")
        with pytest.raises(InvalidArguments, match="'gates' .did you mean 'gate'"):
            client.submit("demo.jobs:Which", gates="")
        with pytest.raises(InvalidArguments, match="at most 1 positional"):
            client.submit("demo.jobs:Which", "", "")
        gate = tmp_path / "open"
        gate.touch()
        worker = client.submit("demo.jobs:Where", str(gate)).result(timeout=30)[1]
        with pytest.raises(InvalidArguments, match="missing a required argument: 'gate'"):
            client.submit("demo.jobs:Where").result(timeout=30)
        assert client.submit("demo.jobs:Where", str(gate)).result(timeout=30)[1] == worker
        [listing] = client.packages()
        assert listing.broken == [], listing.broken


def test_a_keyword_the_newest_version_takes_is_not_refused_by_an_older_listing(
        tmp_path: Path) -> None:
    """The client checks a deployed task's keywords against the listing it read last: a new
    version deployed since (the one that would run) takes one the older did not."""
    tasks = tmp_path / "tasks"
    deploy(tasks, "one")
    with LocalCluster(workers=1, tasks_dir=tasks) as cl, Client(cl) as client:
        first = wait_until(lambda: versions(client), 20, "the package to be listed")
        client.submit("demo.jobs:Which").result(timeout=30)  # (the listing read)
        source = (tasks / "demo" / "jobs.py").read_text()
        (tasks / "demo" / "jobs.py").write_text(source.replace(
            'def work(self, gate=""):', 'def work(self, gate="", extra=0):', 1))
        wait_until(lambda: versions(client) != first and versions(client), 20,
                   "the master to see the change")
        assert client.submit("demo.jobs:Which", extra=1).result(timeout=30) == "one"


def test_a_package_that_fails_to_import_fails_only_its_task(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    deploy(tasks, "one")
    broken = tasks / "broken"
    broken.mkdir()
    (broken / "jobs.py").write_text(
        "from actors import Task\nimport no_such_module_here\n\n"
        "class Fails(Task):\n    def work(self):\n        return 1\n")
    with LocalCluster(workers=1, tasks_dir=tasks) as cl, Client(cl) as client:
        wait_until(lambda: versions(client, "broken"), 20, "the broken package to be listed")
        with pytest.raises(ModuleNotFoundError) as info:
            client.submit("broken.jobs:Fails").result(timeout=30)
        assert "no_such_module_here" in str(info.value) and "Remote traceback" in shown(info.value)
        assert client.submit("demo.jobs:Which").result(timeout=30) == "one"


def test_two_nodes_fetch_the_same_version_at_once_one_transfer_each_for_all_its_workers(
    tmp_path: Path
) -> None:
    """Four tasks start together on two nodes of two workers each: every worker needs the
    version (4 MiB, sixteen chunks) at the same moment; each node fetches it once for both."""
    tasks, keys, gate = tmp_path / "tasks", tmp_path / "keys", tmp_path / "gate"
    deploy(tasks, "one", data_mib=4)
    master, address = start_master(tmp_path, "--workers", "0", "--keys", str(keys),
                                   "--tasks-dir", str(tasks))
    nodes: list[subprocess.Popen[str]] = []
    pids: set[int] = set()
    try:
        for name in ("a", "b"):
            nodes.append(python_logged(tmp_path / f"node-{name}.log", "-m", "actors.node",
                                       "--master", address, "--workers", "2", "--keys", str(keys),
                                       "--cache", str(tmp_path / f"cache-{name}")))
        with Client(address, keys=keys) as client:
            client.wait_for_workers(4)
            (version,) = wait_until(lambda: versions(client), 20, "the package to be listed")
            # Never run before, so never queued on a busy worker: one task per worker, at once.
            futures = [client.submit("demo.jobs:Where", gate=str(gate)) for _ in range(4)]
            wait_until(lambda: client.info().idle_workers == 0, 30, "a task on every worker")
            workers = [descendants(node.pid) for node in nodes]
            gate.touch()
            ran = [fut.result(timeout=60) for fut in futures]
        pids = set().union(*workers)
        assert {v for v, _ in ran} == {"one"}
        assert [len({pid for _, pid in ran} & node_workers) for node_workers in workers] == [2, 2]
        for name in ("a", "b"):
            events = log_events(tmp_path / f"node-{name}.log")
            installed = [(e["package"], e["version"]) for e in events
                         if e["event"] == "package_installed"]
            assert installed == [("demo", version)], name
            assert cached(tmp_path / f"cache-{name}") == {version}
    finally:
        for proc in (*nodes, master):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in (*nodes, master):
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                kill_all({proc.pid})
                proc.wait(5)
        wait_until(lambda: not any(alive(p) for p in pids), 20, "every worker to exit")


def test_the_packages_command_lists_versions_and_tasks(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks"
    deploy(tasks, "one")
    with LocalCluster(workers=0, tasks_dir=tasks) as cl:
        with Client(cl) as client:
            (version,) = wait_until(lambda: versions(client), 20, "the package to be listed")
        out = subprocess.run([sys.executable, "-m", "actors", "packages", "--master", cl.address,
                              "--keys", cl.keys_dir], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"demo  version {version}" in out.stdout
    assert "demo.jobs:Which(gate)  [Task]  never run" in out.stdout


def test_the_dashboard_shows_which_package_version_a_worker_holds(tmp_path: Path) -> None:
    import urllib.request

    tasks = tmp_path / "tasks"
    deploy(tasks, "one")
    with LocalCluster(workers=1, tasks_dir=tasks) as cl, Client(cl) as client:
        wait_until(lambda: versions(client), 20, "the package to be listed")
        assert client.submit("demo.jobs:Which").result(timeout=30) == "one"
        (version,) = versions(client)
        state_url = cl.dashboard_url.replace("/?token=", "/api/state?token=")

        def held() -> list[str]:
            with urllib.request.urlopen(state_url, timeout=30) as answer:
                state = json.loads(answer.read())
            return [w["package"] for n in state["nodes"] for w in n["workers"]]

        wait_until(lambda: held() == [f"demo {version}"], 30, "the worker's package on the page")


def test_a_module_that_fails_to_import_is_marked_broken_once_a_worker_tried(tmp_path: Path) -> None:
    """The master lists tasks by parsing, never importing: a module that raises on import is
    listed as runnable until a worker tries it; then its task fails with the import's error and
    the listing marks the module broken with it (issue 18, item 6)."""
    tasks = tmp_path / "tasks"
    (tasks / "demo").mkdir(parents=True)
    (tasks / "demo" / "fail.py").write_text(
        "from actors import Task\n"
        "raise RuntimeError('no database here')\n\n\n"
        "class Fail(Task):\n"
        "    def work(self):\n"
        "        return 1\n")
    with LocalCluster(workers=1, tasks_dir=tasks) as cl, Client(cl) as client:
        wait_until(lambda: versions(client), 20, "the package to be listed")
        [listing] = client.packages()
        assert [t.name for t in listing.tasks] == ["demo.fail:Fail"] and not listing.broken
        with pytest.raises(RuntimeError, match="no database here"):
            client.submit("demo.fail:Fail").result(timeout=30)
        [listing] = client.packages()
        assert listing.broken == [("demo.fail", "RuntimeError: no database here")]
