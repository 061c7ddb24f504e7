"""A user's task is a plain object: its names are the user's own, even those an actor framework
uses for itself (pykka's ``on_start``, ``stop``, ``on_receive``, ``actor_ref``...). The runtime
never calls them; the user's own code does."""

from __future__ import annotations

from typing import Any

import pytest

from actors import Client, ParallelTask, Task

pytestmark = pytest.mark.processes


class ActorNames:
    """Methods and an attribute named as pykka's hooks, each noting that it was called."""

    actor_ref = "the user's own actor_ref"

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def on_start(self) -> str:
        self.calls.append("on_start")
        return "started"

    def on_stop(self) -> str:
        self.calls.append("on_stop")
        return "stopped quietly"

    def stop(self) -> str:
        self.calls.append("stop")
        return "stopped"

    def on_receive(self, message: Any) -> str:
        self.calls.append("on_receive")
        return f"received {message}"

    def on_failure(self, *exc_info: Any) -> str:
        self.calls.append("on_failure")
        return "failed"

    def used_names(self, arg: Any) -> list[Any]:
        """Call each of them from the user's own code, then say which were called."""
        calls_before = list(self.calls)
        said = [self.on_start(), self.on_stop(), self.stop(), self.on_receive(arg),
                self.on_failure(), self.actor_ref]
        return [calls_before, said]


NAMES = ["on_start", "on_stop", "stop", "on_receive", "on_failure"]
SAID = ["started", "stopped quietly", "stopped", "received {}", "failed",
        "the user's own actor_ref"]


def said(arg: Any) -> list[str]:
    return [s.format(arg) if "{}" in s else s for s in SAID]


def called_by_the_user_only(calls: list[str]) -> bool:
    """Whole rounds of ``used_names``, in order: not one call came from the runtime."""
    rounds, rest = divmod(len(calls), len(NAMES))
    return rest == 0 and calls == NAMES * rounds


class PlainWithActorNames(ActorNames, Task):
    def work(self, x: int) -> list[Any]:
        return self.used_names(x)


class ParallelWithActorNames(ActorNames, ParallelTask):
    def get_work(self, n: int) -> Any:
        self.sliced_with = self.used_names("slicing")
        yield from range(n)

    def work_unit(self, i: int) -> list[Any]:
        return self.used_names(i)

    def reduce(self, results: list[Any]) -> list[Any]:
        return [self.sliced_with, results, self.used_names("reducing")]


def test_a_tasks_own_methods_named_like_actor_hooks_are_its_own_and_run_from_work(
        client: Client) -> None:
    # Several in a row: on a warm worker, and lined up behind one another.
    futures = [client.submit(PlainWithActorNames, x) for x in range(6)]
    for x, future in enumerate(futures):
        assert future.result(timeout=30) == [[], said(x)]


def test_a_parallel_tasks_own_methods_named_like_actor_hooks_are_its_own_in_every_role(
        client: Client) -> None:
    sliced_with, results, (calls_before_reduce, reduced_with) = client.submit(
        ParallelWithActorNames, 20).result(timeout=30)
    # The driver's instance: only the user's code called them, in the slicer and in reduce.
    assert sliced_with == [[], said("slicing")]
    assert reduced_with == said("reducing")
    assert called_by_the_user_only(calls_before_reduce) and calls_before_reduce, calls_before_reduce
    # Every unit, on the driver's worker or a helper's: each call came from work_unit.
    assert [unit_said for _, unit_said in results] == [said(i) for i in range(20)]
    assert all(called_by_the_user_only(calls) for calls, _ in results), results
