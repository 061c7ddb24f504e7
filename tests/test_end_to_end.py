"""What a user does with a local cluster: submit tasks, read results and errors."""

from __future__ import annotations

import gc
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest

from actors import Client, LocalCluster, ParallelTask, Task, Unit, as_completed
from actors.errors import InvalidArguments
from tests.conftest import alive, children, descendants, shown, wait_until

pytestmark = pytest.mark.processes


class Square(Task):
    def work(self, x):
        return x * x


class SumOfSquares(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        return i * i

    def reduce(self, results):
        return sum(results)


class WhichProcess(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        time.sleep(0.01)
        return os.getpid()

    def reduce(self, results):
        return results


class Boom(ValueError):
    pass


class Explodes(Task):
    def work(self, n):
        raise Boom(f"cannot handle {n}")


class UnitExplodes(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        if i == 13:
            return {}["missing-" + str(i)]
        return i

    def reduce(self, results):
        return results


def wait_for(gate: str, timeout: float = 60.0) -> None:
    """Block until the file ``gate`` exists (the test opens it); fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(gate):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{gate} not opened within {timeout}s")
        time.sleep(0.005)


class Gated(Task):
    def work(self, gate, value="opened"):
        wait_for(gate)
        return value


def fails_first(tally: str, key: object, times: int) -> None:
    """Raise the first ``times`` calls for ``key``: a count kept in a file, across processes."""
    path = os.path.join(tally, str(key))
    with open(path, "a") as f:
        f.write(".")
    if os.path.getsize(path) <= times:
        raise ConnectionError(f"{key}: flaky, call {os.path.getsize(path)}")


class FlakyUnits(ParallelTask):
    def get_work(self, n, tally, times):
        for i in range(n):
            yield (i, tally, times)

    def work_unit(self, arg):
        i, tally, times = arg
        if i % 5 == 0:
            fails_first(tally, i, times)
        return i

    def reduce(self, results):
        return sum(results)


class FlakyTask(Task):
    def work(self, x, tally, times):
        fails_first(tally, "task", times)
        return x * x


class SlicerExplodes(ParallelTask):
    def get_work(self):
        yield 1
        raise RuntimeError("slicer broke")

    def work_unit(self, i):
        return i


def test_the_readme_example_runs(client: Client) -> None:
    assert client.submit(Square, x=7).result(timeout=30) == 49
    fut = client.submit(SumOfSquares, n=10_000)
    assert fut.result(timeout=60) == sum(i * i for i in range(10_000))
    assert fut.progress() == (10_000, 10_000)


def test_units_of_a_parallel_task_run_on_several_worker_processes(client: Client) -> None:
    pids = client.submit(WhichProcess, n=200).result(timeout=60)
    assert len(pids) == 200
    assert len(set(pids)) >= 2, f"all units ran in {set(pids)}"
    assert os.getpid() not in pids


def test_reduce_gets_results_in_unit_order(client: Client) -> None:
    class Identity(ParallelTask):
        def get_work(self, n):
            yield from range(n)

        def work_unit(self, i):
            return i

    assert client.submit(Identity, n=3_000).result(timeout=60) == list(range(3_000))


def test_an_empty_parallel_task_reduces_nothing(client: Client) -> None:
    assert client.submit(SumOfSquares, n=0).result(timeout=30) == 0


def test_a_task_exception_is_raised_with_its_type_and_remote_traceback(client: Client) -> None:
    with pytest.raises(Boom) as info:
        client.submit(Explodes, n=5).result(timeout=30)
    text = shown(info.value)
    assert "cannot handle 5" in text
    assert "Remote traceback" in text and "in work" in text and "raise Boom" in text
    # the cluster keeps serving
    assert client.submit(Square, 3).result(timeout=30) == 9


class Exits(Task):
    def work(self, code):
        sys.exit(code)


class UnitExits(ParallelTask):
    def get_work(self, n):
        yield from range(n)

    def work_unit(self, i):
        if i == 7:
            raise SystemExit(4)
        return i


def test_code_that_calls_sys_exit_fails_its_task_and_the_caller_goes_on(client: Client) -> None:
    """SystemExit is not an Exception: it must still answer the task (not leave it waiting
    forever), and reach the caller as an error that does not end the caller's program."""
    with pytest.raises(RuntimeError, match=r"raised SystemExit\(3\)") as info:
        client.submit(Exits, 3).result(timeout=30)
    assert_caused_by_system_exit(shown(info.value), "sys.exit(code)", 3)
    with pytest.raises(RuntimeError, match=r"raised SystemExit\(4\)") as info:
        client.submit(UnitExits, 20).result(timeout=30)
    assert "unit 7" in shown(info.value)
    assert_caused_by_system_exit(shown(info.value), "raise SystemExit(4)", 4)
    assert client.submit(Square, 3).result(timeout=30) == 9


def assert_caused_by_system_exit(text: str, source_line: str, code: int) -> None:
    """The remote traceback is the chain: the SystemExit where the user's code raised it, as the
    direct cause of the RuntimeError the task failed with."""
    chain = text.split("Remote traceback", 1)[1]
    assert re.search(
        rf"Traceback \(most recent call last\):\n.*\n +{re.escape(source_line)}\nSystemExit: {code}\n"
        r"\nThe above exception was the direct cause of the following exception:\n"
        rf"(.|\n)*\nRuntimeError: the task's code raised SystemExit\({code}\)$", chain), chain


def test_a_failing_unit_fails_its_task_naming_the_unit(client: Client) -> None:
    with pytest.raises(KeyError) as info:
        client.submit(UnitExplodes, n=100).result(timeout=30)
    assert info.value.args == ("missing-13",)
    assert "unit 13" in info.value.__notes__[0]  # (a KeyError's traceback is a note)
    assert client.submit(SumOfSquares, n=10).result(timeout=30) == 285


def test_units_that_raise_run_again_as_often_as_asked(client: Client, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    fut = client.submit(FlakyUnits, 40, str(tmp_path / "a"), 2, retries=2)
    assert fut.result(timeout=60) == sum(range(40))
    # each flaky unit ran exactly three times: two failures, then its result
    assert {p.name: p.stat().st_size for p in (tmp_path / "a").iterdir()} == {
        str(i): 3 for i in range(0, 40, 5)}
    retries = [e for e in fut.story() if e[1] == "error" and e[2] == "queued"]
    assert len(retries) == 16 and all("retry" in e[3] for e in retries)
    # one retry short: the unit's own exception, naming the unit
    (tmp_path / "b").mkdir()
    with pytest.raises(ConnectionError, match=r"flaky, call 2(.|\n)*unit \d+"):
        client.submit(FlakyUnits, 40, str(tmp_path / "b"), 2, retries=1).result(timeout=60)


def test_a_task_whose_work_raises_runs_again_when_asked(client: Client, tmp_path: Path) -> None:
    assert client.submit(FlakyTask, 7, str(tmp_path), 1, retries=1).result(timeout=60) == 49
    with pytest.raises(ValueError, match="retries"):
        client.submit(FlakyTask, 7, str(tmp_path), 1, retries=-1)


class FlakySlicer(ParallelTask):
    def get_work(self, n, tally, times):
        fails_first(tally, "slicer", times)
        yield from range(n)

    def work_unit(self, i):
        return i

    def reduce(self, results):
        return sum(results)


class FlakyReduce(ParallelTask):
    def get_work(self, n, tally, times):
        self.tally, self.times = tally, times  # the driver, which slices, also reduces
        yield from range(n)

    def work_unit(self, i):
        return i

    def reduce(self, results):
        fails_first(self.tally, "reduce", self.times)
        return sum(results)


@pytest.mark.parametrize("flaky", [FlakySlicer, FlakyReduce])
def test_a_slicer_or_a_reduce_that_raises_runs_again_as_often_as_asked(
    client: Client, tmp_path: Path, flaky: type[ParallelTask]
) -> None:
    (tmp_path / "a").mkdir()
    fut = client.submit(flaky, 50, str(tmp_path / "a"), 2, retries=2)
    assert fut.result(timeout=60) == sum(range(50))
    # two failures, then the result; the story shows each retry
    assert [p.stat().st_size for p in (tmp_path / "a").iterdir()] == [3]
    retries = [e[3] for e in fut.story() if e[0] == "task" and e[1] == "error"]
    assert retries == ["master: retry 1 of 2", "master: retry 2 of 2"]
    (tmp_path / "b").mkdir()
    with pytest.raises(ConnectionError, match="flaky, call 2"):
        client.submit(flaky, 50, str(tmp_path / "b"), 2, retries=1).result(timeout=60)


def test_a_failing_slicer_fails_its_task(client: Client) -> None:
    with pytest.raises(RuntimeError, match="slicer broke"):
        client.submit(SlicerExplodes).result(timeout=30)


def test_arguments_that_do_not_fit_are_refused_at_submit(client: Client) -> None:
    with pytest.raises(InvalidArguments, match="unexpected keyword argument 'y'"):
        client.submit(Square, x=1, y=1)
    with pytest.raises(InvalidArguments, match="missing a required argument"):
        client.submit(SumOfSquares)
    with pytest.raises(TypeError):  # InvalidArguments is a TypeError too
        client.submit(Square, 1, 2)
    with pytest.raises(InvalidArguments, match="not a Task"):
        client.submit(42, 1)  # type: ignore[arg-type]
    with pytest.raises(InvalidArguments, match="too many positional arguments"):
        client.submit(len, 1, 2)  # a function: its own signature


def test_lambdas_and_closures_travel_by_value(client: Client) -> None:
    offset = 1000

    class Closure(Task):
        def work(self, fn):
            return fn(offset)

    assert client.submit(Closure, lambda v: v + 1).result(timeout=30) == 1001


def test_many_small_tasks_complete_with_as_completed(client: Client) -> None:
    futures = client.map(Square, range(50))
    done = list(as_completed(futures, timeout=60))
    assert sorted(f.result() for f in done) == [i * i for i in range(50)]


def test_a_map_makes_its_futures_without_the_collector_and_leaves_it_as_it_was(
        client: Client) -> None:
    """The thousands of objects a map makes are all kept: the cyclic collector, which could
    free none of them, is held off meanwhile, and is as it was afterwards (on, or left off by
    the process), also when the map is refused."""
    collections: list[str] = []

    def counted(phase: str, _info: dict[str, int]) -> None:
        if phase == "start":
            collections.append(threading.current_thread().name)

    assert gc.isenabled()
    gc.callbacks.append(counted)
    try:
        futures = client.map(Square, range(3_000))  # (~30 collections of the youngest, before)
        during = list(collections)
        assert gc.isenabled()
        assert [f.result(timeout=60) for f in futures] == [i * i for i in range(3_000)]
        # (one may follow at once: the objects counted while it was held)
        assert len(during) <= 1, f"collections during the map: {during}"
        with pytest.raises(InvalidArguments):
            client.map(Square, range(3), y=1)
        assert gc.isenabled()
        gc.disable()
        try:
            assert [f.result(timeout=60) for f in client.map(Square, range(3))] == [0, 1, 4]
            assert not gc.isenabled()
        finally:
            gc.enable()
    finally:
        gc.callbacks.remove(counted)


class Filled(Task):
    """``n`` bytes, each ``i % 256``: results that arrive whole and in their own futures or not."""

    def work(self, i, n):
        return bytes([i % 256]) * n


def test_a_burst_of_large_ends_reaches_each_future_whole(client: Client) -> None:
    """A burst's ends travel gathered from the workers (TaskResults: ends of 64 KiB at most,
    1 MiB together) and to the client (TasksEnded): 300 results of 50 KB, each whole in its own
    future."""
    futures = client.map(Filled, range(300), [50_000] * 300)
    assert all(f.result(timeout=60) == bytes([i % 256]) * 50_000 for i, f in enumerate(futures))


class SometimesFails(Task):
    """Short tasks, queued on busy workers, some of which fail for good and some once; with a
    gate, held until the test opens it."""

    def work(self, x, tally, gate=""):
        if gate:
            wait_for(gate)
        if x % 37 == 5:
            raise Boom(f"task {x} fails for good")
        if x % 23 == 7:
            fails_first(tally, f"once-{x}", 1)
        return x * x


def test_short_tasks_queued_behind_failing_ones_each_get_their_own_outcome(tmp_path: Path) -> None:
    """Queued short tasks are begun behind the running one; one that fails (for good, or once
    and then on retry) must not take its neighbours' results with it, or hand them its own."""
    gate, tally = str(tmp_path / "gate"), str(tmp_path)
    # A cluster of its own: both workers clean, so each held task below gets one to itself.
    with LocalCluster(workers=2) as cl, Client(cl) as client:
        client.submit(Square, 1).result(timeout=30)  # measured: short tasks queue from here on
        # Each worker runs a task held at the gate: one to fail for good, one to fail once.
        held = [client.submit(SometimesFails, 5, tally, gate, retries=1),
                client.submit(SometimesFails, 7, tally, gate, retries=1)]
        futures = [client.submit(SometimesFails, x, tally, retries=1) for x in range(200)]
        client.info()  # answered in order: the master has placed every task above
        (tmp_path / "gate").touch()
        with pytest.raises(Boom, match="task 5 fails for good"):
            held[0].result(timeout=60)
        assert held[1].result(timeout=60) == 49
        for x, fut in enumerate(futures):
            if x % 37 == 5:
                with pytest.raises(Boom, match=f"task {x} fails for good"):
                    fut.result(timeout=60)
            else:
                assert fut.result(timeout=60) == x * x, x
        causes = [e[3] for fut in futures[:10] for e in fut.story() if e[0] == "task"]
        for failing in held:
            assert any(f"(queued behind {failing.task_id})" in c for c in causes), causes
        assert client.submit(Square, 4).result(timeout=30) == 16


def test_result_times_out_without_hanging(client: Client, tmp_path: Path) -> None:
    fut = client.submit(Gated, str(tmp_path / "gate"), "late")
    with pytest.raises(TimeoutError):
        fut.result(timeout=0.05)
    assert not fut.done()
    (tmp_path / "gate").touch()
    assert fut.result(timeout=30) == "late"


def test_futures_say_running_once_their_tasks_have_a_worker(client: Client, tmp_path: Path) -> None:
    """One message a tick tells a client which of its tasks started (``TaskState``)."""
    gate = str(tmp_path / "gate")
    held = client.map(Gated, [gate, gate])  # one on each of the two workers
    queued = client.submit(Gated, gate)
    wait_until(lambda: [f.status for f in held] == ["running", "running"], 30,
               "both to say they run")
    assert queued.status in ("queued", "running")  # (a warm worker may queue it behind one)
    (tmp_path / "gate").touch()
    assert [f.result(timeout=30) for f in [*held, queued]] == ["opened"] * 3
    assert [f.status for f in [*held, queued]] == ["finished"] * 3


def test_exception_returns_what_result_would_raise_and_none_on_success(
    client: Client, tmp_path: Path
) -> None:
    fut = client.submit(Gated, str(tmp_path / "gate"))
    with pytest.raises(TimeoutError):
        fut.exception(timeout=0.05)
    (tmp_path / "gate").touch()
    assert fut.exception(timeout=30) is None
    err = client.submit(Explodes, n=2).exception(timeout=30)
    assert isinstance(err, Boom) and "cannot handle 2" in str(err)


def test_as_completed_raises_timeout_error_when_a_future_is_late(
    client: Client, tmp_path: Path
) -> None:
    quick = client.submit(Square, 5)
    late = client.submit(Gated, str(tmp_path / "gate"))
    finished = as_completed([quick, late], timeout=0.5)
    assert next(finished) is quick
    with pytest.raises(TimeoutError):
        next(finished)
    (tmp_path / "gate").touch()
    assert list(as_completed([late], timeout=30)) == [late]


def test_a_done_callback_is_called_once_when_the_task_ends_or_at_once_if_it_has(
    client: Client, tmp_path: Path
) -> None:
    fut = client.submit(Gated, str(tmp_path / "gate"))
    calls: list[tuple[object, bool, str]] = []
    called = threading.Event()

    def callback(f: object) -> None:
        calls.append((f, fut.done(), threading.current_thread().name))
        called.set()

    fut.add_done_callback(callback)
    assert not called.is_set()
    (tmp_path / "gate").touch()
    assert called.wait(30)
    assert fut.result(timeout=0) == "opened"
    # A callback added to a finished future runs at once, in the caller's thread.
    fut.add_done_callback(callback)
    me = threading.current_thread().name
    assert [(f, done) for f, done, _ in calls] == [(fut, True), (fut, True)]
    assert calls[0][2] != me and calls[1][2] == me


def test_a_done_callback_may_wait_on_another_task_and_the_client_serves_on_meanwhile(
    client: Client,
) -> None:
    """Callbacks ran in the thread that receives from the master: one that submitted a task
    and waited on its result (as concurrent.futures allows) waited for good, and so did every
    other result of the client. They run in a thread of their own now."""
    chained: list[int] = []
    done = threading.Event()

    def follow_up(fut: object) -> None:
        chained.append(client.submit(Square, fut.result() + 1).result(timeout=30))  # type: ignore[attr-defined]
        done.set()

    client.submit(Square, 2).add_done_callback(follow_up)
    assert client.submit(Square, 7).result(timeout=30) == 49
    assert done.wait(30) and chained == [25]
    bridged = client.submit(Square, 3).concurrent()  # its callbacks are a user's too
    waited: list[int] = []
    bridged.add_done_callback(lambda f: waited.append(client.submit(Square, f.result()).result(30)))
    assert bridged.result(timeout=30) == 9
    wait_until(lambda: waited == [81], 30, "the bridged callback's follow-up")


def test_threads_asking_the_same_at_once_each_get_the_answer(client: Client) -> None:
    """Requests are matched to their answers by what they ask (``info``, a task's story):
    threads that ask the same at the same time each get an answer, none is left waiting."""
    fut = client.submit(Square, x=3)
    assert fut.result(timeout=60) == 9
    answers: list[object] = []

    def ask() -> None:
        for _ in range(40):
            try:
                answers.append((client.info(timeout=20).workers, len(client.story(fut, 20))))
            except Exception as exc:  # (the assertion below shows it)
                answers.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert len(answers) == 240 and all(isinstance(a, tuple) for a in answers), [
        a for a in answers if not isinstance(a, tuple)][:3]


def test_story_shows_the_task_transitions(client: Client) -> None:
    fut = client.submit(SumOfSquares, n=100)
    fut.result(timeout=30)
    transitions = [(key, start, finish) for key, start, finish, _, _ in fut.story()]
    assert transitions[0] == ("task", "released", "queued")
    assert ("task", "queued", "running") in transitions
    assert transitions[-1] == ("task", "running", "done")


class Stuck(ParallelTask):
    """Unit 0 and the plain units wait at the gate; unit 1 waits for unit 0's result."""

    def get_work(self, gate, n):
        first = Unit(gate)
        yield first
        yield Unit(gate, after=[first])
        for _ in range(n):
            yield gate

    def work_unit(self, gate, *inputs):
        wait_for(gate)
        return 1

    def reduce(self, results):
        return len(results)


def test_story_ends_with_where_each_unfinished_unit_is_now(client: Client, tmp_path: Path) -> None:
    """More units than the two workers take: some run, one waits for another, the rest queue."""
    fut = client.submit(Stuck, str(tmp_path / "gate"), 30)

    def now(story: list[tuple[str, str, str, str, float]]) -> dict[str, str]:
        return {key: state for key, _, when, state, _ in story if when == "now"}

    wait_until(lambda: len(now(fut.story())) == 32 and "master: queued" in now(fut.story()).values(),
               30, "every unit to be sliced and placed")
    # Asked again: the workers have taken in every run placed before the first answer, and the
    # gate holds them, so nothing of theirs is newer than the master's "now".
    story = fut.story()
    places = now(story)
    assert [e[0] for e in story[-32:]] == [f"unit {i}" for i in range(32)]
    assert all(e[2] == "now" for e in story[-32:])
    assert places["unit 0"].startswith("master: running on ")
    assert places["unit 1"] == "master: blocked on units [0]"
    states = {state.removeprefix("master: ").split(" on ")[0] for state in places.values()}
    assert states == {"running", "blocked", "queued"}
    (tmp_path / "gate").touch()
    assert fut.result(timeout=60) == 31  # unit 1 and the 30 plain ones: nobody depends on them
    assert not now(fut.story())  # nothing is open any more


def test_a_client_without_an_address_starts_a_cluster_of_its_own_and_stops_it_on_close() -> None:
    """Another ``Client()`` meanwhile (a notebook cell run again, the old client still open)
    takes the same cluster rather than a second master, node and workers; the cluster ends
    with the last of them."""
    before = children(os.getpid())
    with Client() as c:
        (master,) = children(os.getpid()) - before
        pids = descendants(master) | {master}
        assert c.info().workers == os.cpu_count()
        again = Client()
        assert children(os.getpid()) - before == {master} and again.address == c.address
        assert again.submit(Square, 5).result(timeout=30) == 25
        again.close()
        assert alive(master)
        assert c.submit(Square, 6).result(timeout=30) == 36
    assert not alive(master)
    wait_until(lambda: not any(alive(p) for p in pids), 20, "the client's cluster to end")


def test_client_without_arguments_uses_actors_address(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACTORS_ADDRESS", cluster.address)
    monkeypatch.setenv("ACTORS_KEYS", cluster.keys_dir)
    with Client() as c:
        assert c.address == cluster.address
        assert c.submit(Square, 4).result(timeout=30) == 16


def test_local_cluster_stops_every_process_when_the_body_raises() -> None:
    pids: set[int] = set()
    with pytest.raises(RuntimeError, match="user error"), LocalCluster(workers=1) as cl:
        with Client(cl) as c:
            c.wait_for_workers(1)
            assert c.submit(Square, 2).result(timeout=30) == 4
        pids = descendants(cl.pid) | {cl.pid}
        assert len(pids) >= 2  # master (its node inside), worker
        raise RuntimeError("user error")
    wait_until(lambda: not any(alive(p) for p in pids), 20, "every cluster process to end")


class StartsAClient(Task):
    def work(self) -> str:
        from actors import Client as InnerClient

        with InnerClient():
            return "a cluster inside the worker"


def test_a_client_without_an_address_in_task_code_is_refused_not_a_cluster_in_the_worker(
    client: Client,
) -> None:
    """Client() in a task (Dask's get_client habit) started a master, a node and a worker per
    CPU inside the worker, on every worker that ran it. It raises ClusterInTask, saying what
    to do instead."""
    from actors.errors import ClusterInTask

    error = client.submit(StartsAClient).exception(timeout=60)
    assert isinstance(error, ClusterInTask), error
    assert "ParallelTask" in str(error) and "Client(address)" in str(error)
    assert client.submit(Square, 4).result(timeout=30) == 16
