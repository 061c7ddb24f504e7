"""What a task's exception becomes on its way to the client (``actors.serialize``): described
where it was raised (the user's frames only, a bounded text, a pickle that loads), then rebuilt
in the client as the same type with the remote traceback in its message or a note. The process
tests (test_first_hour.py and others) raise through a real cluster; these call the two ends
directly, so that every rule is checked on its own."""

from __future__ import annotations

import dataclasses
import pickle
import resource
import threading
import traceback
from pathlib import Path

import pytest

import actors.serialize as serialize
from actors.errors import RemoteError, ResultNotSerializable, ResultTooLarge, TaskStopped
from actors.serialize import (
    MAX_DESCRIBED_CHARS,
    describe_exception,
    describe_failure,
    dumps_result,
    is_fatal,
    rebuild_exception,
)

# Functions compiled as if they were a file of the runtime: their frames are the runtime's.
# ``run`` calls user code and catches what it raises, as a worker's executor does.
_RUNTIME_FILE = str(Path(serialize.__file__).resolve().parent / "a_runtime_module.py")
_namespace: dict[str, object] = {}
exec(compile("def call(fn):\n    return fn()\n"
             "def run(fn):\n    try:\n        call(fn)\n    except BaseException as exc:\n"
             "        return exc\n", _RUNTIME_FILE, "exec"), _namespace)
call_from_runtime, run_from_runtime = _namespace["call"], _namespace["run"]


def user_code() -> None:
    raise ValueError("the user's own words")


def raised(fn: object) -> BaseException:
    """What ``fn`` raised, caught two runtime frames above it."""
    exc = run_from_runtime(fn)  # type: ignore[operator]
    assert isinstance(exc, BaseException), "nothing raised"
    return exc


def test_a_traceback_starts_at_the_users_code_headed_by_where_it_ran() -> None:
    payload, type_name, message, text = describe_exception(raised(user_code), "in work")
    assert (type_name, message) == ("builtins.ValueError", "the user's own words")
    assert text.startswith("(in work)\nTraceback (most recent call last):\n")
    assert "in user_code" in text and "a_runtime_module.py" not in text
    assert f'  File "{__file__}", line ' in text
    assert text.endswith('in user_code\n    raise ValueError("the user\'s own words")\n'
                         "ValueError: the user's own words\n")
    assert "^^^" not in text  # (no columns: finding them parses the source, per failure)
    back = pickle.loads(payload)
    assert type(back) is ValueError and back.args == ("the user's own words",)


def test_each_exception_of_a_chain_starts_at_the_users_code() -> None:
    def wrapping() -> None:
        cause = run_from_runtime(user_code)  # type: ignore[operator]
        raise KeyError("wrapped") from cause

    text = describe_exception(raised(wrapping))[3]
    assert text.count("Traceback (most recent call last)") == 2
    assert "direct cause of the following exception" in text
    assert "a_runtime_module.py" not in text and "in user_code" in text and "in wrapping" in text


def test_a_traceback_of_runtime_frames_only_is_kept_whole() -> None:
    def fails() -> None:
        call_from_runtime(None)  # type: ignore[operator]  # the runtime's own frame raises

    exc = raised(fails)
    assert "a_runtime_module.py" in describe_exception(exc)[3]


def test_a_huge_message_and_traceback_are_cut_saying_how_much_was_left_out() -> None:
    def huge() -> None:
        raise ValueError("x" * (MAX_DESCRIBED_CHARS + 10) + "\n")

    def at_the_bound() -> None:
        raise ValueError("x" * MAX_DESCRIBED_CHARS)

    payload, _, message, text = describe_exception(raised(huge))
    assert message == "x" * MAX_DESCRIBED_CHARS + "... (11 more characters)\n"
    assert "... (" in text and len(text) < 3 * MAX_DESCRIBED_CHARS
    assert len(pickle.loads(payload).args[0]) == MAX_DESCRIBED_CHARS + 11  # the object is whole
    assert describe_exception(raised(at_the_bound))[2] == "x" * MAX_DESCRIBED_CHARS


def test_an_exception_of_the_users_own_class_travels_by_value() -> None:
    class Refused(Exception):  # defined here: not importable by reference
        pass

    def raises() -> None:
        raise Refused("no")

    payload, type_name, _, _ = describe_exception(raised(raises))
    assert type_name == (f"{__name__}.test_an_exception_of_the_users_own_class_travels_by_value"
                         ".<locals>.Refused")
    back = pickle.loads(payload)
    assert type(back).__name__ == "Refused" and back.args == ("no",)


def test_an_exception_that_cannot_be_pickled_comes_back_as_remote_error_with_everything_said(
) -> None:
    class HoldsALock(Exception):
        def __init__(self) -> None:
            super().__init__("locked")
            self.lock = threading.Lock()

    def raises() -> None:
        raise HoldsALock

    described = describe_exception(raised(raises))
    assert described[0] == b""
    back = rebuild_exception(*described, where="task t1")
    assert isinstance(back, RemoteError)
    assert back.type_name.endswith("HoldsALock") and back.message == "locked"
    assert "in raises" in back.remote_traceback and "in raises" in str(back)


def test_a_rebuilt_exception_is_the_one_raised_with_the_remote_traceback_as_a_note() -> None:
    """Its type, args, str() and attributes are what the task's code made: code that reads
    ``err.args[0]`` or compares ``str(err)`` works as on a local call; where it was raised is
    a note, printed below it as any traceback shows it."""
    exc = raised(user_code)
    exc.code = 7  # type: ignore[attr-defined]  # what the exception carried stays with it
    back = rebuild_exception(*describe_exception(exc), where="task t1, unit 3")
    assert type(back) is ValueError and back.args == ("the user's own words",)
    assert str(back) == "the user's own words" and back.code == 7  # type: ignore[attr-defined]
    (note,) = back.__notes__
    assert note.startswith("Remote traceback (task t1, unit 3):\n") and "in user_code" in note
    assert note.endswith("ValueError: the user's own words")  # (no blank line after)
    shown = "".join(traceback.format_exception(back))
    assert shown.index("ValueError: the user's own words") < shown.index("Remote traceback")


def test_an_exception_without_a_message_stays_without_one() -> None:
    def raises() -> None:
        raise ValueError

    back = rebuild_exception(*describe_exception(raised(raises)), where="task t1")
    assert type(back) is ValueError and back.args == () and str(back) == ""
    assert back.__notes__[0].startswith("Remote traceback (task t1):\n")


def test_a_cause_comes_back_as_the_rebuilt_exceptions_cause() -> None:
    """``raise Mine(...) from err``: the caller's ``err.__cause__`` is the original error,
    itself rebuilt (its own cause too), as on a local call."""
    class Mine(Exception):
        pass

    def chained() -> None:
        try:
            try:
                int("x")
            except ValueError as err:
                raise KeyError("k") from err
        except KeyError as err:
            raise Mine("wrapped") from err

    back = rebuild_exception(*describe_exception(raised(chained)), where="task t1")
    assert type(back).__name__ == "Mine" and back.args == ("wrapped",)
    cause = back.__cause__
    assert type(cause) is KeyError and cause.args == ("k",)
    assert type(cause.__cause__) is ValueError and "invalid literal" in str(cause.__cause__)
    assert "direct cause" in back.__notes__[0]  # the whole chain's frames, as it was printed


def test_an_exception_not_built_from_one_message_gets_the_traceback_as_a_note() -> None:
    def raises() -> None:
        raise OSError(2, "No such file")

    def two_messages() -> None:
        raise KeyError("first", "second")

    back = rebuild_exception(*describe_exception(raised(raises)), where="task t1")
    assert type(back) is FileNotFoundError and back.args == (2, "No such file")
    assert back.__notes__[0].startswith("Remote traceback (task t1):\n")
    assert "in raises" in back.__notes__[0]
    back = rebuild_exception(*describe_exception(raised(two_messages)), where="task t1")
    assert type(back) is KeyError and back.args == ("first", "second")
    assert "in two_messages" in back.__notes__[0]


def test_a_key_error_keeps_its_key_and_gets_the_traceback_as_a_note() -> None:
    """A KeyError shows the repr of its message: a traceback added to it read as one line of
    escapes. Its key stays its key, the traceback a note printed below it."""
    def looks_up() -> None:
        {}["missing"]

    back = rebuild_exception(*describe_exception(raised(looks_up)), where="task t1")
    assert type(back) is KeyError and back.args == ("missing",) and str(back) == "'missing'"
    assert back.__notes__[0].startswith("Remote traceback (task t1):\n")
    assert "in looks_up" in back.__notes__[0]


def test_a_notebook_cells_frames_are_named_as_the_notebook_names_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Code shipped from a notebook runs from a file only the worker has: its frames say
    which cell, as the notebook itself would."""
    monkeypatch.setitem(serialize._FILE_LABELS, __file__, "Cell In[3]")
    text = describe_exception(raised(user_code))[3]
    assert "Cell In[3], line " in text and __file__ not in text


def test_an_exception_the_runtime_raised_itself_comes_back_as_it_was() -> None:
    payload = pickle.dumps(TimeoutError("no worker answered"))
    back = rebuild_exception(payload, "builtins.TimeoutError", "no worker answered", "", "")
    assert type(back) is TimeoutError and back.args == ("no worker answered",)
    broken = rebuild_exception(b"\x80not a pickle", "mod.Gone", "it said", "tb", "task t1")
    assert isinstance(broken, RemoteError) and (broken.type_name, broken.message) == (
        "mod.Gone", "it said")


def test_a_task_that_exits_fails_as_a_runtime_error_caused_by_the_exit() -> None:
    def exits() -> None:
        raise SystemExit(3)

    payload, type_name, message, text = describe_failure(raised(exits), "in work")
    assert text.startswith("(in work)\n")
    assert (type_name, message) == ("builtins.RuntimeError", "the task's code raised SystemExit(3)")
    assert type(pickle.loads(payload)) is RuntimeError
    assert "SystemExit: 3" in text and "direct cause of the following exception" in text
    assert describe_failure(raised(user_code))[1] == "builtins.ValueError"


@pytest.mark.parametrize("exc, fatal", [
    (ValueError("x"), False), (ResultTooLarge("t", "", "bytes", 10, 5), False),
    (TaskStopped("t"), False), (MemoryError(), True), (SystemExit(0), True),
    (KeyboardInterrupt(), True)], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else str(v))
def test_only_an_exit_an_interrupt_or_running_out_of_memory_ends_the_worker(
        exc: BaseException, fatal: bool) -> None:
    assert is_fatal(exc) is fatal


def test_a_result_that_cannot_travel_names_its_task_unit_and_type() -> None:
    with pytest.raises(ResultNotSerializable) as refused:
        dumps_result(threading.Lock(), "t1", "4")
    assert (refused.value.task, refused.value.unit, refused.value.type_name) == (
        "t1", "4", "_thread.lock")
    assert "lock" in refused.value.reason
    with pytest.raises(ResultNotSerializable) as refused:
        dumps_result(threading.Lock(), "t1")  # a Task's result: no unit
    assert refused.value.unit == ""
    limit = resource.getrlimit(resource.RLIMIT_DATA)[0]
    for value, size in ((b"x" * 100, 100), (memoryview(bytearray(64)).cast("d"), 64),
                        (object(), 0)):
        too_large = serialize.not_serializable(value, MemoryError(), "t2")
        assert isinstance(too_large, ResultTooLarge)
        assert (too_large.task, too_large.unit, too_large.size) == ("t2", "", size)
        assert too_large.limit == (0 if limit == resource.RLIM_INFINITY else limit)
    assert serialize.not_serializable(b"", MemoryError(), "t2").type_name == "builtins.bytes"


def test_an_exception_whose_init_takes_other_arguments_comes_back_as_its_class() -> None:
    """``MyError(code, text)`` passes one message on: pickled, it loaded as MyError(message),
    which its __init__ refuses, and the caller got a RemoteError its ``except`` missed."""
    class MyError(Exception):
        def __init__(self, code: int, text: str) -> None:
            super().__init__(f"{code}: {text}")
            self.code = code

    def raises() -> None:
        raise MyError(42, "custom")

    back = rebuild_exception(*describe_exception(raised(raises)), where="task t1")
    assert type(back).__name__ == "MyError" and isinstance(back, Exception)
    assert back.code == 42 and str(back) == "42: custom"
    assert back.__notes__[0].startswith("Remote traceback (task t1)")


def test_exceptions_remade_keep_what_their_builtin_base_holds() -> None:
    """Remade without their own __init__, an OSError subclass keeps its errno and filename, a
    SyntaxError its message; one whose __str__ raises still comes back, its traceback a note."""
    class MissingFile(FileNotFoundError):
        def __init__(self, path: str, why: str) -> None:
            super().__init__(2, why, path)

    class Broken(Exception):
        __slots__ = ("code",)

        def __str__(self) -> str:
            return f"code {self.code}"  # (no code on a remade one)

    def missing() -> None:
        raise MissingFile("/p", "nope")

    def syntax() -> None:
        raise SyntaxError("bad thing")

    back = rebuild_exception(*describe_exception(raised(missing)), where="task t1")
    assert isinstance(back, FileNotFoundError) and (back.errno, back.filename) == (2, "/p")
    back = rebuild_exception(*describe_exception(raised(syntax)), where="task t1")
    assert type(back) is SyntaxError and str(back).startswith("bad thing")

    def broken() -> None:
        error = Broken("x")
        error.code = 7
        raise error

    back = rebuild_exception(*describe_exception(raised(broken)), where="task t1")
    assert type(back).__name__ == "Broken" and back.__notes__[0].startswith("Remote traceback")


def test_a_network_error_in_a_worker_of_its_own_network_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A task that could not reach a service said only 'Connection refused' (or 'Temporary
    failure in name resolution'), though the same call worked from the user's shell: its
    worker has a network of its own. The error carries a note saying so, and how to change it."""
    import socket
    import urllib.error

    from actors import contain
    from actors.serialize import NETWORK_NOTE, describe_failure, rebuild_exception

    def raised(exc: BaseException) -> BaseException:
        try:
            raise exc
        except BaseException as caught:
            return caught

    refused = raised(urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")))
    no_name = raised(socket.gaierror(-3, "Temporary failure in name resolution"))
    monkeypatch.setattr(contain, "own_network", False)
    assert NETWORK_NOTE not in describe_failure(raised(ConnectionRefusedError(111, "x")))[3]
    monkeypatch.setattr(contain, "own_network", True)
    for exc in (refused, no_name):
        payload, type_name, message, text = describe_failure(exc)
        assert NETWORK_NOTE in text
        rebuilt = rebuild_exception(payload, type_name, message, text, "task t")
        shown = str(rebuilt) + "".join(getattr(rebuilt, "__notes__", ()))  # (as printed)
        assert type(rebuilt) is type(exc) and "--worker-network" in shown
    assert NETWORK_NOTE not in describe_failure(raised(ValueError("not the network")))[3]


@dataclasses.dataclass(frozen=True)
class FrozenError(Exception):
    code: int


def test_an_exception_that_refuses_a_note_still_comes_back_as_itself() -> None:
    """``__notes__`` made a tuple by the task's code, or an exception that is a frozen
    dataclass (it refuses attributes): rebuilt as it was, not a TypeError of the runtime's."""
    def tuple_notes() -> None:
        error = ValueError("x")
        error.__notes__ = ("its own",)  # type: ignore[assignment]
        raise error

    def frozen() -> None:
        try:
            int("y")
        except ValueError as err:
            raise FrozenError(3) from err

    back = rebuild_exception(*describe_exception(raised(tuple_notes)), where="task t1")
    assert type(back) is ValueError and back.args == ("x",)
    assert back.__notes__[0] == "its own" and back.__notes__[-1].startswith("Remote traceback")
    back = rebuild_exception(*describe_exception(raised(frozen)), where="task t1")
    assert type(back) is FrozenError and back.code == 3
    assert type(back.__cause__) is ValueError
    assert back.__notes__[0].startswith("Remote traceback")
