"""Task packages as data: versions, the transfer archive, chunks, and the task listing.

Theory of operation
-------------------
A package is a folder of files. Everything here sees it as a list of
``(relative POSIX path, bytes)`` pairs and never touches a disk, a socket or
the package's code; ``actors.package_store`` does the reading and writing.

* **Content.** Caches and dotfiles (``__pycache__/``, ``*.pyc``, ``*.pyo``,
  ``.git``, ``.DS_Store``...) are not part of a package: `version_of` and
  `pack` drop them, and an archive that carries one is rejected, because an
  unhashed ``.pyc`` would be code that no version vouches for.
* **Version.** SHA-256 over the files sorted by path, each path and each
  content prefixed with its length as 8 big-endian bytes, behind a domain tag.
  The length prefixes make the encoding unambiguous: ``("a", b"bc")`` and
  ``("ab", b"c")`` hash differently. The version is the first
  `VERSION_LENGTH` (20) hex digits, 80 bits: short enough for a folder name
  and a log line, far beyond accidental collisions. It is not meant to resist
  someone who can already write to the master's tasks directory.
* **Archive.** What travels to a node: ``MAGIC``, a 4-byte entry count, then
  per file a 4-byte path length, the UTF-8 path, an 8-byte content length and
  the content, sorted by path. Deterministic, so the same version always packs
  to the same bytes. `unpack` rejects absolute paths, ``..``, duplicates,
  ignored files, truncation and trailing bytes with `PackageIntegrityError`
  before the caller could write anything.
* **Chunks.** The archive is cut into ``chunk_size`` slices addressed by index.
* **Listing.** Task classes are found by parsing each module with `ast`,
  never by importing it: a class whose bases name ``Task``, ``ParallelTask``
  or ``TaskContainer`` (``Task`` or ``actors.Task``, or an alias imported with
  ``from ... import Task as T``), or a class of the same module that is one.
  Only top-level classes count, and names starting with ``_`` are treated as
  helpers and not listed. ``lib/`` holds bundled libraries, not tasks, and is
  not listed. A module that does not parse is reported as broken.
"""

from __future__ import annotations

import ast
import hashlib
import keyword
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from actors.errors import PackageIntegrityError

FileEntry = tuple[str, bytes]

VERSION_LENGTH = 20
DEFAULT_CHUNK_SIZE = 256 * 1024
LIBRARY_FOLDER = "lib"

_HASH_DOMAIN = b"pydra-actors package v1\n"
MAGIC = b"PYDRAPKG\x01"
_VERSION_PATTERN = re.compile(f"[0-9a-f]{{{VERSION_LENGTH}}}")


# --- names and paths -------------------------------------------------------


def is_ignored(path: str) -> bool:
    """Whether a relative path is a cache or a dotfile, not package content."""
    parts = path.split("/")
    if any(part.startswith(".") or part == "__pycache__" for part in parts):
        return True
    return parts[-1].endswith((".pyc", ".pyo"))


def is_valid_package_name(name: str) -> bool:
    """A package name is imported by workers, so it must be a Python identifier."""
    return name.isidentifier() and not keyword.iskeyword(name)


def is_valid_version(version: str) -> bool:
    """Versions become folder names on nodes: only our own hex digests are accepted."""
    return _VERSION_PATTERN.fullmatch(version) is not None


def path_problem(path: str) -> str | None:
    """Why ``path`` cannot name a file inside a package, or None if it can."""
    if not path:
        return "empty path"
    if path.startswith("/"):
        return f"absolute path {path!r}"
    if "\\" in path or "\x00" in path:
        return f"path {path!r} contains a backslash or NUL"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return f"path {path!r} is not a plain relative path"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return f"path {path!r} is not valid UTF-8"
    return None


def canonical_files(files: Iterable[FileEntry], package: str = "") -> list[FileEntry]:
    """The files sorted by path, after checking that they can form a folder.

    Raises PackageIntegrityError for a bad path, an ignored file, a duplicate,
    or a path that is both a file and a folder ("a" and "a/b").
    """
    entries = sorted(files, key=lambda entry: entry[0])
    paths = set()
    for path, _ in entries:
        problem = path_problem(path)
        if problem is None and is_ignored(path):
            problem = f"{path!r} is a cache or dotfile, never part of a package"
        if problem is None and path in paths:
            problem = f"duplicate path {path!r}"
        if problem is not None:
            raise PackageIntegrityError(package, problem)
        paths.add(path)
    for path in paths:
        parts = path.split("/")
        for end in range(1, len(parts)):
            if "/".join(parts[:end]) in paths:
                raise PackageIntegrityError(package, f"{path!r} lies inside a file")
    return entries


def package_content(files: Iterable[FileEntry], package: str = "") -> list[FileEntry]:
    """What a version is made of: the files minus caches and dotfiles, sorted."""
    return canonical_files((entry for entry in files if not is_ignored(entry[0])), package)


# --- version -----------------------------------------------------------------


def version_of(files: Iterable[FileEntry], package: str = "") -> str:
    """The content hash of a package (see the module docstring for the format)."""
    digest = hashlib.sha256(_HASH_DOMAIN)
    for path, data in package_content(files, package):
        encoded = path.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "big"))
        digest.update(encoded)
        digest.update(len(data).to_bytes(8, "big"))
        digest.update(data)
    return digest.hexdigest()[:VERSION_LENGTH]


# --- archive and chunks ----------------------------------------------------


def pack(files: Iterable[FileEntry], package: str = "") -> bytes:
    """The transfer archive of a package's content (caches and dotfiles dropped)."""
    entries = package_content(files, package)
    out = [MAGIC, len(entries).to_bytes(4, "big")]
    for path, data in entries:
        encoded = path.encode("utf-8")
        out += [len(encoded).to_bytes(4, "big"), encoded, len(data).to_bytes(8, "big"), data]
    return b"".join(out)


def unpack(archive: bytes, package: str = "") -> list[FileEntry]:
    """The files of an archive, sorted; PackageIntegrityError if it is not a sound one."""

    def bad(reason: str) -> PackageIntegrityError:
        return PackageIntegrityError(package, f"bad archive: {reason}")

    view = memoryview(archive)
    if bytes(view[: len(MAGIC)]) != MAGIC:
        raise bad("not a package archive")
    offset = len(MAGIC)

    def take(size: int) -> bytes:
        nonlocal offset
        if offset + size > len(view):
            raise bad("truncated")
        piece = bytes(view[offset : offset + size])
        offset += size
        return piece

    count = int.from_bytes(take(4), "big")
    files = []
    for _ in range(count):
        raw_path = take(int.from_bytes(take(4), "big"))
        try:
            path = raw_path.decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"path {raw_path!r} is not UTF-8") from None
        files.append((path, take(int.from_bytes(take(8), "big"))))
    if offset != len(view):
        raise bad(f"{len(view) - offset} trailing bytes")
    return canonical_files(files, package)


def chunk_count(size: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> int:
    """How many chunks an archive of ``size`` bytes is sent in (at least one)."""
    return max(1, -(-size // chunk_size))


def chunk_at(archive: bytes, index: int, chunk_size: int = DEFAULT_CHUNK_SIZE) -> bytes:
    """Chunk ``index`` of an archive; IndexError outside ``range(chunk_count(...))``."""
    if not 0 <= index < chunk_count(len(archive), chunk_size):
        raise IndexError(index)
    return archive[index * chunk_size : (index + 1) * chunk_size]


def split_chunks(archive: bytes, chunk_size: int = DEFAULT_CHUNK_SIZE) -> list[bytes]:
    return [chunk_at(archive, i, chunk_size) for i in range(chunk_count(len(archive), chunk_size))]


# --- listing tasks without importing them ----------------------------------


class TaskKind(StrEnum):
    TASK = "Task"
    PARALLEL = "ParallelTask"
    CONTAINER = "TaskContainer"


# The method whose parameters are the task's arguments, per kind.
_ENTRY_METHOD = {TaskKind.TASK: "work", TaskKind.PARALLEL: "get_work"}


@dataclass(frozen=True)
class TaskInfo:
    name: str  # "<package>.<module>:<Class>", e.g. "wordcount.tasks:WordCount"
    package: str
    module: str  # dotted, relative to the package ("tasks", "sub.mod")
    class_name: str
    kind: TaskKind
    # Argument names of work()/get_work() ("*args", "**kwargs" marked);
    # None when the method is not defined in this module (inherited from elsewhere).
    parameters: tuple[str, ...] | None
    doc: str  # first line of the docstring
    line: int


@dataclass(frozen=True)
class BrokenModule:
    package: str
    module: str  # relative path of the file
    error: str
    line: int | None


@dataclass(frozen=True)
class PackageListing:
    tasks: tuple[TaskInfo, ...]
    broken: tuple[BrokenModule, ...]


def module_name(path: str) -> str:
    """Dotted module name of a relative ``.py`` path ("" for the package's own __init__)."""
    parts = path.removesuffix(".py").split("/")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def list_tasks(package: str, modules: Mapping[str, bytes | str]) -> PackageListing:
    """Task classes in a package's modules ({relative path: source}), found by parsing only."""
    tasks: list[TaskInfo] = []
    broken: list[BrokenModule] = []
    for path in sorted(modules):
        if not path.endswith(".py") or path.split("/")[0] == LIBRARY_FOLDER or is_ignored(path):
            continue
        try:
            tree = ast.parse(modules[path], filename=path)
        except SyntaxError as exc:
            broken.append(
                BrokenModule(package, path, f"{type(exc).__name__}: {exc.msg}", exc.lineno)
            )
            continue
        except (ValueError, RecursionError, MemoryError) as exc:  # NUL bytes, absurd nesting
            broken.append(BrokenModule(package, path, f"{type(exc).__name__}: {exc}", None))
            continue
        module = module_name(path)
        found = _task_classes(tree)
        if found and not all(part.isidentifier() for part in module.split(".") if part):
            broken.append(
                BrokenModule(
                    package, path, "defines tasks but is not an importable module name", None
                )
            )
            continue
        for node, kind in found:
            qualified = f"{package}.{module}:{node.name}" if module else f"{package}:{node.name}"
            doc = (ast.get_docstring(node) or "").strip().split("\n")[0]
            params = _parameters(node, kind, tree)
            tasks.append(
                TaskInfo(qualified, package, module, node.name, kind, params, doc, node.lineno)
            )
    return PackageListing(tuple(tasks), tuple(broken))


def _task_classes(tree: ast.Module) -> list[tuple[ast.ClassDef, TaskKind]]:
    """Public top-level classes that are tasks, with their kind, in source order."""
    base_names = {kind.value: kind for kind in TaskKind}
    for node in tree.body:  # "from actors import ParallelTask as PT"
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name in base_names and alias.asname:
                    base_names[alias.asname] = base_names[alias.name]
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    kinds: dict[str, TaskKind] = {}
    changed = True
    while changed:  # B(A) where A is a task class of this module, in any order
        changed = False
        for node in classes:
            if node.name in kinds:
                continue
            for base in node.bases:
                name = _base_name(base)
                kind = kinds.get(name) if name in kinds else base_names.get(name)
                if kind is not None:
                    kinds[node.name] = kind
                    changed = True
                    break
    return [
        (node, kinds[node.name])
        for node in classes
        if node.name in kinds and not node.name.startswith("_")
    ]


def _base_name(base: ast.expr) -> str:
    if isinstance(base, ast.Subscript):  # Task[int]
        base = base.value
    if isinstance(base, ast.Name):
        return base.id
    if isinstance(base, ast.Attribute):  # actors.Task
        return base.attr
    return ""


def _parameters(node: ast.ClassDef, kind: TaskKind, tree: ast.Module) -> tuple[str, ...] | None:
    """Arguments of the entry method, looked up in the class and its same-module bases."""
    method = _ENTRY_METHOD.get(kind)
    if method is None:
        return None
    classes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
    pending, seen = [node], set()
    while pending:
        current = pending.pop(0)
        if current.name in seen:
            continue
        seen.add(current.name)
        for item in current.body:
            if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef) and item.name == method:
                return _argument_names(item.args)
        pending += [
            classes[name] for base in current.bases if (name := _base_name(base)) in classes
        ]
    return None


def _argument_names(args: ast.arguments) -> tuple[str, ...]:
    positional = [a.arg for a in args.posonlyargs + args.args][1:]  # drop self
    names = positional + ([f"*{args.vararg.arg}"] if args.vararg else [])
    names += [a.arg for a in args.kwonlyargs]
    names += [f"**{args.kwarg.arg}"] if args.kwarg else []
    return tuple(names)


# --- a package version as the master holds it -----------------------------


@dataclass(frozen=True)
class PackageVersion:
    """One version of a package: what the master lists and what nodes fetch."""

    package: str
    version: str
    archive: bytes
    listing: PackageListing
    file_count: int

    @classmethod
    def from_files(cls, package: str, files: Iterable[FileEntry]) -> PackageVersion:
        content = package_content(files, package)
        modules = {path: data for path, data in content if path.endswith(".py")}
        return cls(
            package=package,
            version=version_of(content, package),
            archive=pack(content, package),
            listing=list_tasks(package, modules),
            file_count=len(content),
        )
