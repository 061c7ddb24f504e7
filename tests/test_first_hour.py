"""What a newcomer meets in the first hour: tracebacks that point at their code, addresses
as they type them, a closed client that says so, errors that name the problem, quiet embedding."""

from __future__ import annotations

import importlib
import linecache
import os
import re
import subprocess
import sys
import textwrap
import time
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import Client, LocalCluster, ParallelTask, Task
from actors import messages as m
from actors.client import Future
from actors.errors import (
    ArgumentsNotSerializable,
    ClientClosed,
    CodeUnknown,
    InvalidAddress,
    InvalidArguments,
    KeyFileError,
    KeyRefused,
    LargePayloadWarning,
    ResultNotSerializable,
)
from actors.serialize import describe_exception, dumps, dumps_task_class, loads
from tests.conftest import shown
from transport import init_keys

pytestmark = pytest.mark.processes

BOUND_S = 30  # a process that must exit by itself gets this long


class Square(Task):
    def work(self, x):
        return x * x


class Sleeps(Task):
    def work(self, seconds):
        time.sleep(seconds)
        return seconds


@pytest.fixture
def user_module(tmp_path: Path) -> Iterator[types.ModuleType]:
    """A task module in a file of the user's, outside site-packages (shipped by value)."""
    name = f"user_tasks_{uuid.uuid4().hex[:8]}"
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent('''
        from actors import ParallelTask, Task

        class Fails(Task):
            def work(self, n):
                total = n + 1
                raise ValueError(f"bad input {total}")

        class SlicerFails(ParallelTask):
            def get_work(self, n):
                yield 1
                raise KeyError("no more slices")

            def work_unit(self, i):
                return i
    '''))
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


# --- tracebacks ---------------------------------------------------------------------------


def test_a_remote_traceback_names_the_users_file_line_and_source(
        client: Client, user_module: types.ModuleType) -> None:
    with pytest.raises(ValueError, match="bad input 4") as info:
        client.submit(user_module.Fails, 3).result(timeout=30)
    text = shown(info.value)
    assert f'File "{user_module.__file__}", line 7, in work' in text
    assert 'raise ValueError(f"bad input {total}")' in text
    assert "<dynamic-code>" not in text
    # The runtime's own frames say nothing to the user.
    assert "actors/task_host.py" not in text and "actors/task.py" not in text


def test_shipped_code_carries_its_source_to_a_host_without_the_file(
        user_module: types.ModuleType) -> None:
    payload = dumps_task_class(user_module.Fails)
    Path(user_module.__file__).unlink()  # as on another host: no such file there
    linecache.clearcache()
    cls = loads(payload)
    try:
        cls().work(1)
    except ValueError as exc:
        text = describe_exception(exc)[3]
    assert f'File "{user_module.__file__}", line 7, in work' in text
    assert 'raise ValueError(f"bad input {total}")' in text


def test_a_notebook_cell_shows_as_the_cell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """IPython names cells by files like /tmp/ipykernel_1/123.py and maps them to In[n]; IPython
    is not installed here, so its one attribute that matters stands in for it."""
    cell_file = str(tmp_path / "ipykernel_1" / "2718.py")
    source = "def work(x):\n    raise RuntimeError('from a cell')\n"
    namespace: dict[str, object] = {}
    exec(compile(source, cell_file, "exec"), namespace)
    linecache.cache[cell_file] = (len(source), None, source.splitlines(True), cell_file)
    shell = types.SimpleNamespace(compile=types.SimpleNamespace(_filename_map={cell_file: 7}))
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: shell))
    payload = dumps_task_class(namespace["work"])  # type: ignore[arg-type]
    linecache.clearcache()
    try:
        loads(payload)(1)
    except RuntimeError as exc:
        text = describe_exception(exc)[3]
    assert "Cell In[7], line 2, in work" in text and "raise RuntimeError('from a cell')" in text


def test_an_exception_in_the_slicer_arrives_like_one_from_work(
        client: Client, user_module: types.ModuleType) -> None:
    with pytest.raises(KeyError) as info:
        client.submit(user_module.SlicerFails, 2).result(timeout=30)
    assert info.value.args == ("no more slices",)  # (a KeyError's traceback is a note)
    [text] = info.value.__notes__
    assert "in get_work, the task's slicer" in text
    assert 'raise KeyError("no more slices")' in text and ", in get_work" in text


class ForgetsToReturn(ParallelTask):
    def get_work(self, n):
        list(range(n))  # (its units built, and not returned)

    def work_unit(self, unit):
        return unit


class GivesACount(ForgetsToReturn):
    def get_work(self, n):
        return n


def test_a_slicer_that_returns_no_units_says_what_get_work_must_return(client: Client) -> None:
    with pytest.raises(TypeError, match=r"get_work\(\) returns or yields the task's units") as info:
        client.submit(ForgetsToReturn, 3).result(timeout=30)
    assert str(info.value).endswith("not NoneType (did it forget to return or yield its units?)")
    with pytest.raises(TypeError, match=r"not int \(a count\? return range\(n\)\)"):
        client.submit(GivesACount, 3).result(timeout=30)


# --- addresses and hangs -----------------------------------------------------------------


@pytest.mark.parametrize("address", ["127.0.0.1", "tcp://127.0.0.1", "ipc:///tmp/x", "h:0"])
def test_a_bad_address_raises_a_typed_error_and_the_process_exits(address: str) -> None:
    script = textwrap.dedent(f'''
        import gc
        from actors import Client
        try:
            Client({address!r})
        except Exception as exc:
            print(type(exc).__name__, exc)
        gc.collect()
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=BOUND_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("InvalidAddress") and "HOST:PORT" in done.stdout
    with pytest.raises(InvalidAddress):
        Client(address)


def test_a_key_folder_that_is_not_there_is_named_so(tmp_path: Path) -> None:
    """Not an "invalid certificate file" inside it: the folder itself is missing."""
    with pytest.raises(KeyFileError, match="no such key folder: pass the one"):
        Client("127.0.0.1:5555", keys=tmp_path / "nowhere", timeout=5)


def test_a_client_accepts_host_port_without_the_scheme(cluster: LocalCluster) -> None:
    host_port = cluster.address.removeprefix("tcp://")
    with Client(host_port, keys=cluster.keys_dir) as client:
        assert client.submit(Square, 5).result(timeout=30) == 25


def test_a_node_with_a_master_address_lacking_a_port_exits_with_a_usage_error() -> None:
    done = subprocess.run([sys.executable, "-m", "actors.node", "--master", "tcp://127.0.0.1",
                           "--no-prefork"], capture_output=True, text=True, timeout=BOUND_S)
    assert done.returncode == 2
    assert "invalid master address 'tcp://127.0.0.1': it has no port" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_refused_key_is_reported_at_once(cluster: LocalCluster, tmp_path: Path) -> None:
    stranger = init_keys(tmp_path / "stranger")
    (stranger / "master.key").write_bytes((Path(cluster.keys_dir) / "master.key").read_bytes())
    started = time.monotonic()
    with pytest.raises(KeyRefused, match="allow-list"):
        Client(cluster.address, keys=stranger, timeout=60)
    assert time.monotonic() - started < 30  # it did not wait for the 60 s deadline


# --- a closed client ------------------------------------------------------------------------


def test_futures_of_a_closed_client_fail_and_the_client_refuses_requests(
        cluster: LocalCluster) -> None:
    with Client(cluster.address, keys=cluster.keys_dir) as client:
        running = client.submit(Sleeps, 30)
        done = client.submit(Square, 6)
        assert done.result(timeout=30) == 36
    with pytest.raises(ClientClosed, match=f"task {running.task_id} cannot finish"):
        running.result(timeout=5)
    assert running.done() and done.result(timeout=0) == 36
    for request in (lambda: client.submit(Square, 1), lambda: client.info(),
                    lambda: client.map(Square, [1, 2]), lambda: client.packages()):
        with pytest.raises(ClientClosed):
            request()


# --- errors that say what happened ----------------------------------------------------------


def test_a_wrong_keyword_is_named_with_the_closest_parameter(client: Client) -> None:
    with pytest.raises(InvalidArguments) as info:
        client.submit(Square, y=3)
    assert "missing a required argument: 'x'" in str(info.value)
    assert "unexpected keyword argument 'y'" in str(info.value)
    with pytest.raises(InvalidArguments, match=r"'xx' \(did you mean 'x'\?\)"):
        client.submit(Square, xx=3)


class ReturnsALock(Task):
    def work(self):
        import threading

        return threading.Lock()


class UnitReturnsAGenerator(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        return (x for x in range(i))


def test_a_result_that_cannot_travel_names_the_task_unit_and_type(client: Client) -> None:
    lock = client.submit(ReturnsALock)
    with pytest.raises(ResultNotSerializable) as info:
        lock.result(timeout=30)
    assert info.value.task == f"ReturnsALock {lock.task_id}" and info.value.type_name == "_thread.lock"
    gen = client.submit(UnitReturnsAGenerator, 3)
    with pytest.raises(ResultNotSerializable, match=r"unit \d+ could not be serialized") as info:
        gen.result(timeout=30)
    assert info.value.type_name == "builtins.generator"
    assert client.submit(Square, 3).result(timeout=30) == 9  # the cluster goes on serving


def test_an_argument_or_code_that_cannot_travel_is_refused_at_submit_naming_it(
        client: Client, tmp_path: Path) -> None:
    import threading

    with pytest.raises(ArgumentsNotSerializable, match="argument 1 of Square") as info:
        client.submit(Square, threading.Lock())
    assert info.value.type_name == "lock" and "make locks" in str(info.value)
    with pytest.raises(ArgumentsNotSerializable, match="argument 'lock' of "):
        client.submit(lambda x, lock: x, 1, lock=threading.Lock())
    with open(tmp_path / "out", "w") as out, \
            pytest.raises(ArgumentsNotSerializable, match="the task's code"):
        client.submit(lambda: out.write("x"))
    assert client.submit(Square, 3).result(timeout=30) == 9  # nothing left behind


# --- code shipped once ------------------------------------------------------------------------

BIG = bytes(range(256)) * (12 * 4096)  # 12 MiB that a task's code uses


class UsesBigData(Task):
    def work(self, i):
        return len(BIG) + i


def test_large_code_is_shipped_once_and_warned_about_once(cluster: LocalCluster) -> None:
    with Client(cluster.address, keys=cluster.keys_dir) as client:
        with pytest.warns(LargePayloadWarning, match="12 MiB") as warned:
            first = client.submit(UsesBigData, 0)
        assert warned[0].filename == __file__  # the user's line, not ours
        futures = [first] + [client.submit(UsesBigData, i) for i in range(1, 6)]
        assert [f.result(timeout=60) for f in futures] == [len(BIG) + i for i in range(6)]
        # Each worker was sent the code once; one whose cache dropped it since asks again.
        many = [type(f"Small{i}", (Square,), {}) for i in range(80)]
        assert [client.submit(cls, 2).result(timeout=30) for cls in many] == [4] * 80
        assert client.submit(UsesBigData, 7).result(timeout=60) == len(BIG) + 7


def test_code_is_only_named_by_hash_to_the_client_that_shipped_it(cluster: LocalCluster) -> None:
    with Client(cluster.address, keys=cluster.keys_dir) as owner, \
            Client(cluster.address, keys=cluster.keys_dir) as other:
        assert owner.submit(Square, 4).result(timeout=30) == 16
        code_hash, _ = owner._code_of(Square)
        # Naming the owner's code by its hash, without shipping it, gets nothing.
        probe = f"Square-{uuid.uuid4().hex[:12]}"
        fut = other._futures[probe] = Future(other, probe, "Square")
        other._send(m.Submit(task_id=probe, name="Square", kind="task", code=b"",
                             args=dumps(((1,), {})), priority=0, retries=0, code_hash=code_hash))
        with pytest.raises(CodeUnknown):
            fut.result(timeout=30)


# --- quiet where a person works ---------------------------------------------------------------


def test_an_embedded_cluster_prints_no_banner_and_only_warnings(tmp_path: Path) -> None:
    script = textwrap.dedent('''
        from actors import Client, Task

        class Fails(Task):
            def work(self):
                raise ValueError("expected")

        with Client() as client:
            print("workers", client.info().workers)
            try:
                client.submit(Fails).result(30)
            except ValueError:
                print("raised")
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path,
                          env={**_env_without_actors(), "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"workers {os.cpu_count()}", "raised"]
    for noise in ("task_erred", "worker_stopping", "worker_exited", "listening on", '{"'):
        assert noise not in done.stderr, done.stderr


def test_a_client_says_nothing_after_its_bye(cluster: LocalCluster) -> None:
    """A future dropped as a script ends is released at the hub's next tick; a tick that came
    after the Bye sent the release to a master that had forgotten the client: a warning in the
    output of a user's first script (seen once in seven runs of the quickstart)."""
    client = Client(cluster.address, keys=cluster.keys_dir)
    fut = client.submit(Square, 2)
    assert fut.result(timeout=30) == 4
    client._released.append(fut.task_id)  # dropped just before the end
    client.close()
    sent: list[list[bytes]] = []

    class Recorder:
        def send_now(self, socket: str, frames: list[bytes]) -> None:
            sent.append(frames)

    client._hub = Recorder()  # type: ignore[assignment]
    client._on_tick(time.monotonic() + 60)  # the hub's tick, after the Bye
    assert sent == []


def _env_without_actors() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("ACTORS_")}


# --- what a notebook or a console shows ---------------------------------------------------------


def test_a_client_and_its_futures_say_what_they_are(cluster: LocalCluster) -> None:
    client = Client(cluster.address, keys=cluster.keys_dir)
    try:
        assert repr(client) == f"<Client {client.client_id} connected to {cluster.address}>"
        page = client._repr_html_()
        assert cluster.address in page and "<table>" in page
        assert re.search(r"workers</th><td[^>]*>\d+ \(\d+ idle\)", page) and "tasks running" in page
        fut = client.submit(Square, 3)
        assert fut.result(timeout=30) == 9
        assert repr(fut) == f"<Future Square {fut.task_id} finished>"
    finally:
        client.close()
    assert repr(client).endswith(f"closed {cluster.address}>")
    assert "closed" in client._repr_html_()
    with Client(cluster) as local:  # (a LocalCluster's client takes its master's Unix socket)
        via = " through its Unix socket" if cluster.local_address else ""
        assert repr(local).endswith(f"connected to {cluster.address}{via}>")


def test_a_script_that_never_closes_its_client_ends_quietly(tmp_path: Path) -> None:
    """Its own cluster stopped at exit before the client was closed: the client then warned
    that its master was lost, at the end of a script that had done nothing wrong."""
    script = textwrap.dedent('''
        from actors import Client
        c = Client()
        print(c.submit(lambda: 5).result(timeout=60))
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=BOUND_S, cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)})
    assert done.returncode == 0 and done.stdout == "5\n", done.stderr
    assert "master_disconnected" not in done.stderr and "Traceback" not in done.stderr, done.stderr
