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
