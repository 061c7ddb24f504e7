"""``check_arguments`` refuses exactly the calls Python would refuse, and the fast answer it
gives for plain positional calls (every submit of a map) is the one binding gives."""

from __future__ import annotations

import inspect

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import Task
from actors.errors import InvalidArguments
from actors.task import check_arguments


def task_with(required: int, optional: int, star: bool, keyword_only: bool) -> type[Task]:
    params = ["self", *(f"a{i}" for i in range(required)),
              *(f"b{i}=None" for i in range(optional))]
    if star:
        params.append("*rest")
    elif keyword_only:
        params += ["*", "k=None"]
    namespace: dict[str, object] = {}
    exec(f"def work({', '.join(params)}):\n    return None", namespace)  # noqa: S102
    return type("Generated", (Task,), {"work": namespace["work"]})


@given(required=st.integers(0, 3), optional=st.integers(0, 3), star=st.booleans(),
       keyword_only=st.booleans(), given_args=st.integers(0, 8),
       keywords=st.sampled_from([{}, {"a0": 1}, {"b0": 1}, {"k": 1}, {"nope": 1}]))
def test_a_call_is_refused_exactly_when_binding_refuses_it(
        required: int, optional: int, star: bool, keyword_only: bool, given_args: int,
        keywords: dict[str, int]) -> None:
    cls = task_with(required, optional, star, keyword_only)
    args = tuple(range(given_args))
    try:
        inspect.signature(cls.work).bind(None, *args, **keywords)
        binds = True
    except TypeError:
        binds = False
    if binds:
        check_arguments(cls, args, keywords)
    else:
        with pytest.raises(InvalidArguments):
            check_arguments(cls, args, keywords)


def test_an_unknown_task_says_where_tasks_come_from_and_the_closest_name() -> None:
    from actors.errors import UnknownTask

    assert "--tasks-dir" in str(UnknownTask("Nope"))
    assert "did you mean 'a.b:Count'" in str(UnknownTask("a.b:Cuont", ["a.b:Count", "a.b:Sum"]))


def test_a_task_class_without_its_methods_is_refused_before_it_is_sent() -> None:
    from actors import ParallelTask

    class NoWork(Task):
        pass

    class NoUnits(ParallelTask):
        def get_work(self, n):
            return range(n)

    with pytest.raises(InvalidArguments, match=r"NoWork: it must define work\(\)"):
        check_arguments(NoWork, (), {})
    with pytest.raises(InvalidArguments, match=r"must define work_unit\(\)"):
        check_arguments(NoUnits, (3,), {})


class Scale(Task):
    def __init__(self, factor: int) -> None:
        super().__init__()
        self.factor = factor

    def work(self, x: int) -> int:
        return x * self.factor


class Defaults(Task):
    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor

    def work(self, x: int) -> int:
        return x * self.factor


def test_a_task_class_that_cannot_be_made_without_arguments_is_refused_saying_where_they_go(
) -> None:
    """It was accepted, then failed on its worker with a traceback of the runtime's frames."""
    with pytest.raises(InvalidArguments, match=r"Scale.__init__\(factor\): .*take them in work\(\)"):
        check_arguments(Scale, (3,), {})
    check_arguments(Defaults, (3,), {})


def test_submits_own_options_are_refused_where_the_task_takes_a_parameter_of_that_name() -> None:
    """``submit(fetch, url, retries=1)`` ran ``fetch`` with its own default ``retries`` (the
    keyword went to submit), and ``priority=3`` to a function needing ``priority`` said that
    argument was missing."""
    from actors.client import _check_option_names

    def fetch(url: str, retries: int = 3) -> str:
        return url

    class Schedule(Task):
        def work(self, job: str, priority: int) -> str:
            return job

    with pytest.raises(InvalidArguments, match="retries=1 is submit's own option"):
        _check_option_names(fetch, 0, 1)
    with pytest.raises(InvalidArguments, match="priority=3 is submit's own option"):
        _check_option_names(Schedule, 3, 0)
    _check_option_names(fetch, 3, 0)  # no parameter of that name: the option is the task's
    _check_option_names(Schedule, 0, 0)  # none given
    _check_option_names("pkg.mod:Deployed", 3, 1)  # a deployed task's are checked by name
