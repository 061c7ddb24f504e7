"""User payloads: how task classes, arguments, results and exceptions become bytes.

Only clients and workers call ``loads``; the master and nodes carry the bytes.
Plain builtin values take the C pickler (about 50x faster than cloudpickle
on an int), everything else cloudpickle, so lambdas and classes from
``__main__`` or a notebook travel by value.
"""

from __future__ import annotations

import pickle
import sys
import sysconfig
import traceback
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle

from actors.errors import RemoteError

_PLAIN = (int, float, str, bytes, bool, type(None), complex)
_SYSTEM_PATHS = tuple(
    str(Path(p).resolve())
    for key in ("stdlib", "platstdlib", "purelib", "platlib")
    if (p := sysconfig.get_paths().get(key))
)


def _is_plain(obj: Any, depth: int = 0) -> bool:
    kind = type(obj)
    if kind in _PLAIN:
        return True
    if depth < 2 and kind in (tuple, list) and len(obj) <= 64:
        return all(_is_plain(item, depth + 1) for item in obj)
    if depth < 2 and kind is dict and len(obj) <= 64:
        return all(type(k) in _PLAIN and _is_plain(v, depth + 1) for k, v in obj.items())
    return False


def dumps(obj: Any) -> bytes:
    if _is_plain(obj):
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


def dumps_task_class(cls: type) -> bytes:
    """Pickle a task class so that a worker without the user's files can load it.

    A class from ``__main__`` (a script, a notebook) is pickled by value by
    cloudpickle anyway. A class from a user module outside site-packages (a
    test file, a module next to the notebook) would be pickled by reference
    and fail to import on the worker, so its module is registered by value.
    """
    module = sys.modules.get(cls.__module__)
    if module is not None and _is_user_module(module):
        cloudpickle.register_pickle_by_value(module)
    return cloudpickle.dumps(cls, protocol=pickle.HIGHEST_PROTOCOL)


def _is_user_module(module: ModuleType) -> bool:
    if module.__name__ == "__main__" or module.__name__.split(".")[0] in ("actors", "transport"):
        return False
    filename = getattr(module, "__file__", None)
    if not filename:
        return False
    return not str(Path(filename).resolve()).startswith(_SYSTEM_PATHS)


# --- exceptions -------------------------------------------------------------


def describe_exception(exc: BaseException) -> tuple[bytes, str, str, str]:
    """(pickled exception or b"", type name, message, formatted traceback) of a raised exception."""
    text = "".join(traceback.format_exception(exc))
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    try:
        payload = cloudpickle.dumps(exc, protocol=pickle.HIGHEST_PROTOCOL)
        pickle.loads(payload)  # an exception that pickles but cannot load is no use
    except Exception:
        payload = b""
    return payload, type_name, str(exc), text


def describe_failure(exc: BaseException) -> tuple[bytes, str, str, str]:
    """``describe_exception`` of what user code raised. ``SystemExit`` and its kind (not an
    ``Exception``) become a RuntimeError caused by them: the task fails, where letting it through
    would leave the task unanswered, and re-raising it in the client would end the caller."""
    if not isinstance(exc, Exception):
        wrapped = RuntimeError(f"the task's code raised {type(exc).__name__}({exc})")
        wrapped.__cause__ = exc
        exc = wrapped
    return describe_exception(exc)


def rebuild_exception(
    payload: bytes, type_name: str, message: str, remote_traceback: str, where: str
) -> BaseException:
    """The exception to raise in the client: the same type, its message carrying the remote traceback.

    When the exception can be rebuilt with a single message argument (the
    common case), its message is extended; otherwise the traceback becomes a
    note. An exception whose class does not load here becomes ``RemoteError``.
    """
    exc: BaseException | None = None
    if payload:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteError(type_name, message, remote_traceback)
    detail = f"\n\nRemote traceback ({where}):\n{remote_traceback.rstrip()}"
    if len(exc.args) <= 1 and all(isinstance(a, str) for a in exc.args):
        try:
            extended = type(exc)((exc.args[0] if exc.args else "") + detail)
            extended.__dict__.update(exc.__dict__)
            return extended
        except Exception:
            pass
    exc.add_note(detail.lstrip("\n"))
    return exc
