"""``wait``, ``as_completed`` and ``gather`` on their own (``actors.waiting`` uses only a
future's public surface), with futures finished by the test: every return rule, timeout and
structure, without a cluster. The same functions on a real cluster: test_dask_habits.py,
test_end_to_end.py, test_async_client.py."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections import OrderedDict, namedtuple
from typing import Any

import pytest

from actors.waiting import (
    FIRST_COMPLETED,
    FIRST_EXCEPTION,
    as_completed,
    futures_in,
    gather,
    wait,
)


class Fut(concurrent.futures.Future[Any]):
    """A future the test finishes, with what actors.waiting asks of one."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.task_id = name
        self.shown: list[bool] = []

    def _show_output(self, waiting: bool) -> None:
        self.shown.append(waiting)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """As actors' Future: a cancelled one's error is returned (TaskCancelled there)."""
        try:
            self.result(timeout)
        except TimeoutError:
            raise
        except BaseException as exc:
            return exc
        return None

    # The blocking pair under actors' result()/exception() (an AsyncFuture's are coroutines).
    def _wait_result(self, timeout: float | None) -> Any:
        return self.result(timeout)

    def _wait_exception(self, timeout: float | None) -> BaseException | None:
        return self.exception(timeout)

    def __repr__(self) -> str:
        return f"<Fut {self.task_id}>"


def done(name: str, value: Any = None) -> Fut:
    fut = Fut(name)
    fut.set_result(name if value is None else value)
    return fut


def failed(name: str) -> Fut:
    fut = Fut(name)
    fut.set_exception(ValueError(name))
    return fut


def later(fut: Fut, seconds: float, value: Any = None, error: BaseException | None = None) -> None:
    """Finish ``fut`` from another thread after ``seconds``."""
    def finish() -> None:
        time.sleep(seconds)
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(fut.task_id if value is None else value)
    threading.Thread(target=finish, daemon=True).start()


# --- wait --------------------------------------------------------------------------------------


def test_wait_all_returns_once_every_future_is_done_and_never_raises() -> None:
    a, b, c = done("a"), failed("b"), Fut("c")
    later(c, 0.05)
    result = wait([a, b, c], timeout=30)
    assert result.done == {a, b, c} and result.not_done == set()
    assert (result.done, result.not_done) == tuple(result)  # a named pair, as concurrent's


def test_wait_first_completed_returns_at_the_first_and_leaves_the_rest() -> None:
    slow, quick = Fut("slow"), Fut("quick")
    later(quick, 0.05)
    result = wait([slow, quick], timeout=30, return_when=FIRST_COMPLETED)
    assert result.done == {quick} and result.not_done == {slow}
    assert not slow.done()


def test_wait_first_exception_returns_at_a_failure_but_not_at_a_success() -> None:
    ok, bad, never = Fut("ok"), Fut("bad"), Fut("never")
    later(ok, 0.02)
    later(bad, 0.1, error=KeyError("bad"))
    result = wait([ok, bad, never], timeout=30, return_when=FIRST_EXCEPTION)
    assert result.done == {ok, bad} and result.not_done == {never}
    # no failure at all: as ALL_COMPLETED
    x, y = done("x"), Fut("y")
    later(y, 0.05)
    assert wait([x, y], timeout=30, return_when=FIRST_EXCEPTION).done == {x, y}


def test_wait_returns_at_its_timeout_with_what_is_done_so_far() -> None:
    a, b = done("a"), Fut("b")
    result = wait([a, b], timeout=0.05)
    assert result.done == {a} and result.not_done == {b}
    assert wait([b], timeout=0).not_done == {b}  # no wait at all
    assert wait([], timeout=None) == (set(), set())  # nothing to wait for: at once


def test_wait_without_a_timeout_waits_as_long_as_it_takes() -> None:
    slow = Fut("slow")
    later(slow, 0.2)
    assert wait([slow], timeout=None).done == {slow}


def test_wait_returns_with_what_finished_within_its_timeout_not_before() -> None:
    within, after = Fut("within"), Fut("after")  # (the second is never finished)
    later(within, 0.1)
    result = wait([within, after], timeout=0.6)  # not done at once: waited for
    assert result.done == {within} and result.not_done == {after}


def test_wait_refuses_an_unknown_return_rule() -> None:
    with pytest.raises(ValueError, match="return_when is one of FIRST_COMPLETED"):
        wait([done("a")], return_when="FIRST_DONE")


# --- as_completed ------------------------------------------------------------------------------


def test_as_completed_yields_in_the_order_futures_finish_and_shows_their_output() -> None:
    first, second, third = Fut("1"), Fut("2"), Fut("3")
    later(third, 0.02)
    later(first, 0.1)
    later(second, 0.2)
    order = list(as_completed([first, second, third], timeout=30))
    assert order == [third, first, second]
    assert first.shown == second.shown == third.shown == [True]


def test_as_completed_takes_futures_added_while_iterating_and_counts_what_is_left() -> None:
    a, b = done("a"), Fut("b")
    seq = as_completed([a], timeout=30)
    assert seq.count() == 1
    got = []
    for fut in seq:
        got.append(fut)
        if fut is a:
            seq.add(b)
            assert seq.count() == 1  # a yielded, b added
            later(b, 0.02)
    assert got == [a, b] and seq.count() == 0
    assert list(seq) == []  # exhausted


def test_as_completed_with_results_yields_pairs_and_raises_a_failure() -> None:
    a = done("a", 41)
    assert list(as_completed([a], with_results=True)) == [(a, 41)]
    seq = as_completed([failed("b")], with_results=True)
    with pytest.raises(ValueError, match="b"):
        next(seq)


def test_as_completed_raises_timeout_error_counted_from_its_start() -> None:
    a, never = Fut("a"), Fut("never")
    later(a, 0.02)
    seq = as_completed([a, never], timeout=0.3)
    assert next(seq) is a
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="not done after 0.3s"):
        next(seq)
    assert time.monotonic() - started < 5  # (bounded: the test never hangs)
    assert seq.count() == 1  # the late one is still there to wait for
    # a future done after the timeout is not waited for
    late = Fut("late")
    later(late, 0.6)
    with pytest.raises(TimeoutError):
        next(as_completed([late], timeout=0.2))


# --- gather and futures_in ---------------------------------------------------------------------


Point = namedtuple("Point", "x y")


def test_gather_replaces_every_future_in_nested_structures_keeping_their_types() -> None:
    a, b, c, d = done("a", 1), done("b", 2), done("c", 3), done("d", 4)
    ordered = OrderedDict([("k", c)])
    structure = {"list": [a, (b, "plain")], "set": {d}, "point": Point(a, b),
                 "ordered": ordered, "n": 7}
    result = gather(structure)
    assert result == {"list": [1, (2, "plain")], "set": {4}, "point": Point(1, 2),
                      "ordered": OrderedDict([("k", 3)]), "n": 7}
    assert type(result["point"]) is Point and type(result["ordered"]) is OrderedDict
    assert type(result["list"][1]) is tuple
    assert gather(a) == 1 and gather("plain") == "plain"


def test_gather_raises_the_first_failure_in_the_order_given() -> None:
    with pytest.raises(ValueError, match="first"):
        gather([done("a"), failed("first"), failed("second")])


def test_gather_skip_leaves_failed_futures_out_of_their_container() -> None:
    a, bad = done("a", 1), failed("bad")
    cancelled = Fut("cancelled")
    cancelled.cancel()
    assert gather([a, bad, (bad, a), {"x": bad, "y": a}, {bad}], errors="skip") == [
        1, (1,), {"y": 1}, set()]
    assert gather([cancelled, a], errors="skip") == [1]
    with pytest.raises(ValueError, match='errors is "raise" or "skip"'):
        gather([a], errors="ignore")


def test_futures_in_finds_what_gather_would_replace() -> None:
    a, b, c = done("a"), done("b"), done("c")
    assert futures_in({"x": [a, (b,)], "y": {c}, "z": 5}) == [a, b, c]
    assert futures_in(a) == [a] and futures_in([1, "two"]) == []
