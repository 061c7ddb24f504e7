"""User payloads: how task classes, arguments, results and exceptions become bytes.

Only clients and workers call ``loads``; the master and nodes carry the bytes.
A single scalar (``int``, ``float``, ``str``, ``bytes``, ``bool``, ``None``: most unit
arguments and results) is MessagePack, a tenth of a pickle's cost each way; other plain
builtin values take the C pickler (much faster than cloudpickle on small values), everything
else cloudpickle, so lambdas and classes from ``__main__`` or a notebook travel by value.
``loads`` tells them apart by the first byte: every pickle of protocol 2 and later starts with
the PROTO opcode (0x80), which as MessagePack would be an empty map, never written here.
"""

from __future__ import annotations

import contextlib
import errno
import io
import linecache
import pickle
import resource
import socket
import sys
import sysconfig
import traceback
import types
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import cloudpickle
import msgspec

from actors.errors import RemoteError, ResultNotSerializable, ResultTooLarge, TaskStopped

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


SCALARS = frozenset({int, float, str, bytes, bool, type(None)})  # MessagePack, not pickled
_PROTO = 0x80  # the first byte of every pickle this writes (protocol 5)
_scalar_encode = msgspec.msgpack.Encoder().encode
_msgpack_decode = msgspec.msgpack.Decoder().decode


def dumps(obj: Any) -> bytes:
    if type(obj) in SCALARS:
        try:
            return _scalar_encode(obj)
        except (OverflowError, UnicodeEncodeError):  # an int past 64 bits, a lone surrogate
            return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    if _is_plain(obj):
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def dumps_scalar_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bytes | None:
    """``dumps((args, kwargs))`` of a call whose arguments are all scalars (no future can be
    among them), the same bytes, made without looking inside again; None for any other call."""
    # (issuperset over map: the types checked in C, not a generator's Python step an argument)
    if (len(args) > 64 or len(kwargs) > 64 or not SCALARS.issuperset(map(type, args))
            or (kwargs and not SCALARS.issuperset(map(type, kwargs.values())))):
        return None
    return pickle.dumps((args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)


def dumps_result(value: Any, task: str, unit: str = "") -> bytes:
    """``dumps`` of what user code returned; ``ResultNotSerializable`` naming the task (and unit)
    and the value's type when it cannot travel (a lock, a generator, an open file)."""
    try:
        return dumps(value)
    except Exception as exc:
        raise not_serializable(value, exc, task, unit) from None


def dumps_result_parts(value: Any, task: str) -> list[bytes | memoryview]:
    """``dumps_result`` as ``[pickle, *buffers]``: the protocol-5 buffers of the value (NumPy
    arrays, ``pickle.PickleBuffer``) out of band, not copied into the pickle; ``[pickle]``
    alone when it has none (then the same bytes as ``dumps_result``). ``loads_parts`` reads it."""
    views: list[memoryview] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        try:
            views.append(buffer.raw())
        except BufferError:  # not contiguous: it goes in the pickle
            return True
        return False

    try:
        if _is_plain(value):
            header = pickle.dumps(value, protocol=5, buffer_callback=out_of_band)
        else:
            header = cloudpickle.dumps(value, protocol=5, buffer_callback=out_of_band)
    except Exception as exc:
        raise not_serializable(value, exc, task) from None
    return [header, *views]


def loads_parts(parts: Sequence[bytes | memoryview]) -> Any:
    """The value of ``dumps_result_parts`` output; its arrays use the buffers given, uncopied.
    (A ``dumps`` of a scalar too: a result held on a node comes back this way.)"""
    if len(parts) == 1:
        return loads(parts[0])
    return pickle.loads(parts[0], buffers=parts[1:])


def not_serializable(value: Any, exc: Exception, task: str,
                     unit: str = "") -> ResultNotSerializable | ResultTooLarge:
    """What to raise when ``dumps`` of a result raised ``exc``."""
    kind = type(value)
    type_name = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(exc, MemoryError):
        return ResultTooLarge(task, unit, type_name, _size_of(value), _memory_limit())
    return ResultNotSerializable(task, unit, type_name, str(exc))


def _size_of(value: Any) -> int:
    """The bytes a value holds, where its type says (bytes, buffers, arrays); else 0."""
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, bytes | bytearray | str):
        return len(value)
    return 0


def _memory_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_DATA)  # what --worker-memory sets (contain.py)
    return 0 if soft == resource.RLIM_INFINITY else soft


def loads(data: bytes | memoryview) -> Any:
    if len(data) and data[0] != _PROTO:
        try:
            value = _msgpack_decode(data)
        except msgspec.DecodeError as exc:  # neither a pickle nor a scalar: as pickle would
            raise pickle.UnpicklingError(f"not a payload of this runtime: {exc}") from None
        if type(value) not in SCALARS:
            raise pickle.UnpicklingError(f"not a payload of this runtime: a {type(value).__name__}")
        return value
    return pickle.loads(data)


def dumps_task_class(cls: type) -> bytes:
    """Pickle a task class so that a worker without the user's files can load it.

    A class from ``__main__`` (a script, a notebook) is pickled by value by
    cloudpickle anyway. A class from a user module outside site-packages (a
    test file, a module next to the notebook) would be pickled by reference
    and fail to import on the worker, so its module is registered by value.

    The payload also carries the source of the files its code comes from, so
    that a remote traceback shows the user's file, line and source line on a
    worker that has no copy of the file (another host, a notebook cell).
    """
    module = sys.modules.get(cls.__module__)
    if module is not None and _is_user_module(module):
        cloudpickle.register_pickle_by_value(module)
    return dumps_shipped(cls)


def dumps_shipped(obj: Any) -> bytes:
    """cloudpickle ``obj`` (code shipped by value) with the source lines its tracebacks need."""
    buffer = io.BytesIO()
    pickler = _SourcePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dump(obj)
    if not pickler.filenames:
        return buffer.getvalue()
    return pickle.dumps(_Shipped(_sources_of(pickler.filenames), buffer.getbuffer()),
                        protocol=pickle.HIGHEST_PROTOCOL)


# cloudpickle >= 3.1.3 names every code object it ships "<dynamic-code>" (a
# deterministic payload); older releases keep the file name. Either way, the
# worker's traceback should name the user's file: the name is put back on load.
_CLOUDPICKLE_CODE_REDUCE = cloudpickle.Pickler.dispatch_table[types.CodeType]
MAX_SHIPPED_SOURCE = 2 * 1024 * 1024  # bytes of one file's source sent along for tracebacks


class _SourcePickler(cloudpickle.Pickler):
    """A cloudpickle Pickler that keeps each code object's file name and notes the files."""

    def __init__(self, file: io.BytesIO, protocol: int) -> None:
        super().__init__(file, protocol=protocol)
        self.filenames: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is types.CodeType:
            self.filenames.add(obj.co_filename)
            rebuild, args = _CLOUDPICKLE_CODE_REDUCE(obj)
            return _code_from_file, (rebuild, args, obj.co_filename)
        return super().reducer_override(obj)


def _code_from_file(rebuild: Any, args: tuple[Any, ...], filename: str) -> types.CodeType:
    code = rebuild(*args)
    return code if code.co_filename == filename else code.replace(co_filename=filename)


def _sources_of(filenames: set[str]) -> dict[str, tuple[str, list[str]]]:
    """{file name: (how a traceback names it, its lines)} of the files code came from."""
    labels = _notebook_cells()
    sources: dict[str, tuple[str, list[str]]] = {}
    for filename in sorted(filenames):
        lines = linecache.getlines(filename)
        if lines and sum(map(len, lines)) <= MAX_SHIPPED_SOURCE:
            sources[filename] = (labels.get(filename, ""), lines)
    return sources


def _notebook_cells() -> dict[str, str]:
    """IPython's cell file names -> "Cell In[n]", as IPython's own tracebacks name them."""
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None else None  # type: ignore[attr-defined]
    names = getattr(getattr(shell, "compile", None), "_filename_map", None)
    if not isinstance(names, dict):
        return {}
    return {name: f"Cell In[{count}]" for name, count in names.items()}


class _Shipped:
    """A payload and the sources of its code's files; loads as the payload alone."""

    def __init__(self, sources: dict[str, tuple[str, list[str]]], payload: memoryview) -> None:
        self.sources, self.payload = sources, payload

    def __reduce__(self) -> tuple[Any, ...]:
        return _load_shipped, (self.sources, pickle.PickleBuffer(self.payload))


_FILE_LABELS: dict[str, str] = {}  # file name -> how tracebacks name it (a notebook cell)


def _load_shipped(sources: dict[str, tuple[str, list[str]]], payload: bytes) -> Any:
    """Runs where shipped code is loaded: its files' lines go where tracebacks look for them."""
    for filename, (label, lines) in sources.items():
        # No mtime: linecache.checkcache() keeps the entry even though no such file exists here.
        linecache.cache[filename] = (sum(map(len, lines)), None, lines, filename)
        if label:
            _FILE_LABELS[filename] = label
    return pickle.loads(payload)


def _is_user_module(module: ModuleType) -> bool:
    if module.__name__ == "__main__" or module.__name__.split(".")[0] in ("actors", "transport"):
        return False
    filename = getattr(module, "__file__", None)
    if not filename:
        return False
    return not str(Path(filename).resolve()).startswith(_SYSTEM_PATHS)


# --- exceptions -------------------------------------------------------------


#: Characters of an exception's message, and of each part of its traceback, that go as text
#: beside the pickled exception (which keeps its whole message): a message of hundreds of MiB
#: would otherwise cross three times (pickled, as the message, as the traceback's last line),
#: count three times against the master's message bound, and stay in the task's story.
MAX_DESCRIBED_CHARS = 64 * 1024


def _capped(text: str) -> str:
    if len(text) <= MAX_DESCRIBED_CHARS:
        return text
    end = "\n" if text.endswith("\n") else ""
    return f"{text[:MAX_DESCRIBED_CHARS]}... ({len(text) - MAX_DESCRIBED_CHARS:,} more characters){end}"


def describe_exception(exc: BaseException, where: str = "") -> tuple[bytes, str, str, str]:
    """(pickled exception or b"", type name, message, formatted traceback) of a raised exception.

    The traceback starts at the user's code: the runtime's own frames above it say nothing
    to whoever wrote the task. ``where`` (e.g. "in get_work") heads it. The message and each
    part of the traceback are cut at ``MAX_DESCRIBED_CHARS`` (the pickled exception is whole)."""
    # lookup_lines=False: the lines of the frames kept are read when formatted, not all stat()ed.
    tb = traceback.TracebackException.from_exception(exc, lookup_lines=False)
    text = "".join(map(_capped, _user_frames(tb).format()))
    for filename, label in _FILE_LABELS.items():
        text = text.replace(f'File "{filename}", line', f"{label}, line")
    if where:
        text = f"({where})\n{text}"
    type_name = f"{type(exc).__module__}.{type(exc).__qualname__}"
    return _pickled(exc), type_name, _capped(str(exc)), text


MAX_CAUSES = 8  # the links of a ``raise ... from`` chain that come back as exceptions


def _pickled(exc: BaseException, depth: int = 0) -> bytes:
    """The exception pickled so that it loads as itself, with its ``raise ... from`` cause (a
    pickled exception has none), or b"" if it cannot be."""
    payload = b""
    # By reference when its class can be imported (a builtin, a library's): the C pickler, and
    # only the user's own classes by value. One that pickles but cannot load is no use.
    for pickler, what in ((pickle.dumps, exc), (cloudpickle.dumps, exc),
                          (cloudpickle.dumps, _Remade(exc))):
        try:
            payload = pickler(what, protocol=pickle.HIGHEST_PROTOCOL)
            pickle.loads(payload)
            break
        except Exception:
            payload = b""
    cause = exc.__cause__
    if payload and cause is not None and depth < MAX_CAUSES:
        caused_by = _pickled(cause, depth + 1)
        if caused_by:
            payload = pickle.dumps(_Caused(payload, caused_by), protocol=pickle.HIGHEST_PROTOCOL)
    return payload


class _Caused:
    def __init__(self, payload: bytes, cause: bytes) -> None:
        self.payload, self.cause = payload, cause

    def __reduce__(self) -> tuple[Any, ...]:
        return _with_cause, (self.payload, self.cause)


def _with_cause(payload: bytes, cause: bytes) -> BaseException:
    exc = pickle.loads(payload)
    with contextlib.suppress(Exception):  # (a cause that does not load: the traceback shows it)
        # (object's: an exception that is a frozen dataclass refuses its own setattr)
        object.__setattr__(exc, "__cause__", pickle.loads(cause))
    return exc


class _Remade:
    """An exception that pickles but does not load as itself: one whose ``__init__`` takes
    other arguments than the ``args`` it passed on (``MyError(code, text)`` calling
    ``super().__init__(f"{code}: {text}")``). Remade without its ``__init__``, from its args
    and attributes, it is still that class to the caller's ``except``."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        made_with = exc.args
        if isinstance(exc, OSError) and exc.filename is not None:  # (not among its args)
            made_with = (exc.errno, exc.strerror, exc.filename, None, exc.filename2)
        return _remake, (type(exc), exc.args, dict(getattr(exc, "__dict__", {})), made_with)


def _remake(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any],
            made_with: tuple[Any, ...] | None = None) -> BaseException:
    exc = cls.__new__(cls, *args)
    # The nearest built-in base's __init__ (not the user's): an OSError's errno and filename,
    # a SyntaxError's msg are set there.
    builtin: Any = next(c for c in cls.__mro__ if c.__module__ == "builtins")
    builtin.__init__(exc, *(args if made_with is None else made_with))
    object.__setattr__(exc, "args", args)  # (object's: a frozen dataclass refuses its own)
    exc.__dict__.update(state)
    return exc


_RUNTIME_DIR = str(Path(__file__).resolve().parent)


def _user_frames(tb: traceback.TracebackException) -> traceback.TracebackException:
    """Drop the runtime's frames at the top of each traceback in the chain (where the runtime
    called user code), unless nothing else is left."""
    seen: set[int] = set()
    todo: list[traceback.TracebackException | None] = [tb]
    while todo:
        part = todo.pop()
        if part is None or id(part) in seen:
            continue
        seen.add(id(part))
        frames = list(part.stack)
        first_user = next((i for i, f in enumerate(frames)
                           if not f.filename.startswith(_RUNTIME_DIR)), None)
        if first_user:
            frames = frames[first_user:]
            part.stack = traceback.StackSummary.from_list(frames)
        for frame in frames:
            # No ^^^^ under the line: finding its columns parses the line's source, the larger
            # part of what a failing task costs its worker; file, line and source stay.
            frame.colno = frame.end_colno = None
        todo += [part.__cause__, part.__context__]
    return tb


def is_fatal(exc: BaseException) -> bool:
    """Whether the process that ran user code raising ``exc`` should serve no further task: an
    interpreter told to exit or interrupted, or out of memory. Any other Exception leaves the
    worker as a successful task would (what the code changed in its globals stays changed).
    A result too large to serialize is not fatal: the allocation that failed was ours, and
    what it had taken is free again."""
    if isinstance(exc, (ResultTooLarge, TaskStopped)):
        return False  # (TaskStopped: a cancelled task that stopped in time: its worker serves on)
    return not isinstance(exc, Exception) or isinstance(exc, MemoryError)


def describe_failure(exc: BaseException, where: str = "") -> tuple[bytes, str, str, str]:
    """``describe_exception`` of what user code raised. ``SystemExit`` and its kind (not an
    ``Exception``) become a RuntimeError caused by them: the task fails, where letting it through
    would leave the task unanswered, and re-raising it in the client would end the caller."""
    if not isinstance(exc, Exception):
        wrapped = RuntimeError(f"the task's code raised {type(exc).__name__}({exc})")
        wrapped.__cause__ = exc
        exc = wrapped
    _note_own_network(exc)
    return describe_exception(exc, where)


# What a task meets on a network of its own (loopback only): refused, unreachable, no name.
_NETWORK_ERRNOS = {errno.ECONNREFUSED, errno.ENETUNREACH, errno.EHOSTUNREACH, errno.EADDRNOTAVAIL}
NETWORK_NOTE = ("this task's worker has a network of its own, loopback only: it reaches no other "
                "host, nor this host's services; to let tasks use the host's network, start the "
                "node with --worker-network (LocalCluster(worker_network=True))")


def _note_own_network(exc: BaseException) -> None:
    """A network error of task code in a worker of its own network gets a note saying so: the
    same call from the user's shell works, and 'connection refused' points elsewhere."""
    from actors import contain  # (only where something failed)

    if not contain.own_network:
        return
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:  # its causes too (urllib wraps)
        seen.add(id(current))
        reason = current.args[0] if isinstance(current, OSError) and current.args else None
        if _is_network_error(current) or _is_network_error(reason):  # (URLError: its reason)
            if NETWORK_NOTE not in getattr(exc, "__notes__", ()):
                with contextlib.suppress(Exception):
                    exc.add_note(NETWORK_NOTE)
            return
        current = current.__cause__ or current.__context__


def _is_network_error(exc: object) -> bool:
    return isinstance(exc, socket.gaierror) or (isinstance(exc, OSError)
                                                and exc.errno in _NETWORK_ERRNOS)


def rebuild_exception(
    payload: bytes, type_name: str, message: str, remote_traceback: str, where: str
) -> BaseException:
    """The exception to raise in the client: the one the task raised, the same type and
    arguments (``args``, ``str()``, its attributes and its ``raise ... from`` cause as the code
    made them), with the remote traceback as a note (PEP 678: printed below it, as a traceback
    shows it). An exception whose class does not load here becomes ``RemoteError``.
    """
    exc: BaseException | None = None
    if payload:
        try:
            exc = pickle.loads(payload)
        except Exception:
            exc = None
    if not isinstance(exc, BaseException):
        return RemoteError(type_name, message, remote_traceback)
    if remote_traceback:  # (none: raised by the runtime itself, WorkerKilled)
        note = f"Remote traceback ({where}):\n{remote_traceback.rstrip()}"
        try:
            exc.add_note(note)
        except Exception:  # (its __notes__ not a list, attributes refused: a frozen dataclass)
            with contextlib.suppress(Exception):
                object.__setattr__(exc, "__notes__", [*getattr(exc, "__notes__", ()), note])
    return exc
