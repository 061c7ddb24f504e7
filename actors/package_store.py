"""Task packages on disk: the master's tasks directory, a node's cache, a worker's import.

The master reads its tasks directory with `scan_tasks_dir`; a node keeps the
versions it fetched in a `NodeCache`, laid out as ``<root>/<package>/<version>/``;
a worker imports a task class from one of those folders with `import_deployed`.

A cache folder appears at its final path complete, verified and read-only, or
not at all: it is written into a staging folder next to it
(``<root>/<package>/.install-*``), hashed again from disk, made read-only
(files 0o444, folders 0o555) and renamed into place. Staging beside the final
path keeps the rename on one filesystem and inside one parent, where renaming
a folder that is already read-only needs no write permission on it. If another
installer got there first, the loser keeps the winner's folder. Removal renames
the folder aside (``.trash-*``) first, so the final path is free at once, and
makes the tree writable again before deleting it.

Nothing is fsynced: every use verifies the folder again (`NodeCache.check`), so
a crash in the middle of a write shows up as CORRUPT and is fetched again.
Workers must not write bytecode into the cache (set ``sys.pycache_prefix`` or
``sys.dont_write_bytecode``): a ``__pycache__`` that appears in a cached
version is content no hash vouches for, and makes the folder CORRUPT.
"""

from __future__ import annotations

import errno
import importlib
import importlib.machinery
import importlib.util
import os
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from actors.core.packages import (
    FileEntry,
    PackageVersion,
    canonical_files,
    is_ignored,
    is_valid_package_name,
    is_valid_version,
    version_of,
)
from actors.core.sync_state import CacheStatus
from actors.errors import PackageError, PackageIntegrityError

log = structlog.get_logger("actors.package_store")

STAGING_PREFIX = ".install-"
TRASH_PREFIX = ".trash-"
_INSTALL_TRIES = 3


# --- the master's tasks directory ------------------------------------------


@dataclass(frozen=True)
class ScanResult:
    packages: dict[str, PackageVersion]
    skipped: dict[str, str]  # folder name -> why it is not a package


def scan_tasks_dir(path: str | os.PathLike[str]) -> ScanResult:
    """Every package folder under ``path``: version, task listing and archive.

    Files, dotfolders and ``__pycache__`` are not packages. A folder that cannot
    be a package (its name is not an identifier, a file cannot be read) is
    reported in ``skipped`` and does not hide the others.
    """
    packages: dict[str, PackageVersion] = {}
    skipped: dict[str, str] = {}
    with os.scandir(path) as scan:
        entries = sorted(scan, key=lambda entry: entry.name)
    for entry in entries:
        if is_ignored(entry.name) or not entry.is_dir():
            continue
        if not is_valid_package_name(entry.name):
            skipped[entry.name] = "the folder name is not a Python identifier"
            continue
        try:
            files = read_package_dir(entry.path)
            packages[entry.name] = PackageVersion.from_files(entry.name, files)
        except (OSError, PackageError) as exc:
            skipped[entry.name] = str(exc)
    return ScanResult(packages, skipped)


def read_package_dir(folder: str | os.PathLike[str]) -> list[FileEntry]:
    """The files of a package folder, minus caches and dotfiles.

    A symlink is followed only to a file or folder inside the package folder itself (a link
    within the package is a convenience; one out of it would serve whatever it points at, a
    key file say, to every node): a link out of it is left out and logged. A link back to a
    folder being read is skipped, so that a loop cannot recurse forever.
    """
    files: list[FileEntry] = []
    root = os.path.realpath(folder)

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep)

    def walk(directory: str, prefix: str, ancestors: frozenset[str]) -> None:
        real = os.path.realpath(directory)
        if real in ancestors:
            return
        with os.scandir(directory) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            relative = prefix + entry.name
            if is_ignored(relative):
                continue
            if entry.is_symlink() and not inside(entry.path):
                log.warning("package_link_left_out", package=os.path.basename(root),
                            path=relative, target=os.path.realpath(entry.path))
                continue
            if entry.is_dir():
                walk(entry.path, relative + "/", ancestors | {real})
            elif entry.is_file():
                files.append((relative, Path(entry.path).read_bytes()))
            # Sockets, pipes and dangling links are not content.

    walk(os.fspath(folder), "", frozenset())
    return files


# --- a node's cache ----------------------------------------------------------


class NodeCache:
    """Installed package versions under ``root``, each verified against its hash."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, package: str, version: str) -> Path:
        # Both names come from the network: never let them leave the cache root.
        if not is_valid_package_name(package):
            raise PackageError(package, "not a valid package name")
        if not is_valid_version(version):
            raise PackageError(package, f"not a valid version: {version!r}")
        return self.root / package / version

    def check(self, package: str, version: str) -> tuple[CacheStatus, str]:
        """VALID, MISSING, or CORRUPT with the reason (hand-edited, truncated, extra files)."""
        path = self.path_for(package, version)
        if not os.path.lexists(path):
            return CacheStatus.MISSING, ""
        try:
            actual = version_of(_read_installed_tree(path, package), package)
        except (OSError, PackageError) as exc:
            return CacheStatus.CORRUPT, str(exc)
        if actual != version:
            return CacheStatus.CORRUPT, f"content hashes to {actual}"
        return CacheStatus.VALID, ""

    def verify(self, package: str, version: str) -> bool:
        return self.check(package, version)[0] is CacheStatus.VALID

    def install(self, package: str, version: str, files: Iterable[FileEntry]) -> Path:
        """Put a version in the cache and return its folder; a valid copy already there is kept.

        Raises PackageIntegrityError, leaving the cache as it was, if the files
        do not hash to ``version`` or are not what was written.
        """
        final = self.path_for(package, version)
        entries = canonical_files(files, package)
        actual = version_of(entries, package)
        if actual != version:
            raise PackageIntegrityError(package, f"content hashes to {actual}, not {version}")
        if self.verify(package, version):
            return final
        final.parent.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{version}-", dir=final.parent))
        try:
            _write_tree(staging, entries)
            written = version_of(_read_installed_tree(staging, package), package)
            if written != version:
                raise PackageIntegrityError(
                    package, f"written content hashes to {written}, not {version}"
                )
            _make_read_only(staging)
            self._move_into_place(staging, final, package, version)
        finally:
            if os.path.lexists(staging):  # lost the race, or failed
                _remove_tree(staging)
        return final

    def _move_into_place(self, staging: Path, final: Path, package: str, version: str) -> None:
        for _ in range(_INSTALL_TRIES):
            try:
                os.rename(staging, final)
                return
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                    raise
            if self.verify(package, version):
                return  # a concurrent installer won; its folder is as good as ours
            self.remove(package, version)  # a corrupt leftover is in the way
        raise PackageError(package, f"could not install {version}: its folder keeps changing")

    def remove(self, package: str, version: str) -> bool:
        """Delete a version (read-only or not); False if it was not there."""
        final = self.path_for(package, version)
        trash = final.parent / f"{TRASH_PREFIX}{version}-{secrets.token_hex(4)}"
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            return False
        _remove_tree(trash)
        return True

    def installed(self) -> list[tuple[str, str]]:
        """(package, version) of every folder in the cache, valid or not (checked on use)."""
        found = []
        for package_dir in sorted(self.root.iterdir()):
            if package_dir.is_dir() and is_valid_package_name(package_dir.name):
                found += [
                    (package_dir.name, version_dir.name)
                    for version_dir in sorted(package_dir.iterdir())
                    if is_valid_version(version_dir.name)
                ]
        return found

    def remove_leftovers(self) -> int:
        """Delete staging and trash folders that a crash left behind. Call it before any install."""
        removed = 0
        for package_dir in self.root.iterdir():
            if not package_dir.is_dir() or package_dir.is_symlink():
                continue
            for child in package_dir.iterdir():
                if child.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                    _remove_tree(child)
                    removed += 1
        return removed


# --- a worker's import ---------------------------------------------------------


def import_deployed(package: str, version_path: str | os.PathLike[str], name: str) -> Any:
    """The class ``name`` (``"package.module:Class"``) imported from ``version_path``, the
    package's verified version folder, and only from it.

    The package is imported once per process: its modules are found in ``version_path`` alone,
    never on ``sys.path``, and the folder's ``lib/`` (the package's own libraries) goes first
    on ``sys.path``. The caller sets ``sys.dont_write_bytecode``: the folder is read-only, and
    bytecode written into it would be content no hash vouches for.
    """
    folder = os.fspath(version_path)
    if package not in sys.modules:
        init = os.path.join(folder, "__init__.py")
        spec: importlib.machinery.ModuleSpec | None
        if os.path.exists(init):
            spec = importlib.util.spec_from_file_location(
                package, init, submodule_search_locations=[folder])
        else:  # no __init__.py: a package whose modules sit in the version folder
            spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
            spec.submodule_search_locations = [folder]
        assert spec is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[package] = module
        if spec.loader is not None:
            spec.loader.exec_module(module)
        lib = os.path.join(folder, "lib")
        if os.path.isdir(lib):
            sys.path.insert(0, lib)
    module_name, _, class_name = name.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def _read_installed_tree(root: Path, package: str) -> list[FileEntry]:
    """Every file of an installed version; anything a version cannot hold is an error.

    Stricter than `read_package_dir`: a symlink, a special file or a cache or
    dotfile in the cache was not put there by `install`.
    """
    if root.is_symlink() or not root.is_dir():
        raise PackageIntegrityError(package, f"{root} is not a plain folder")
    files: list[FileEntry] = []
    pending = [(root, "")]
    while pending:
        directory, prefix = pending.pop()
        with os.scandir(directory) as scan:
            entries = list(scan)
        for entry in entries:
            relative = prefix + entry.name
            if is_ignored(relative) or entry.is_symlink():
                raise PackageIntegrityError(package, f"unexpected {relative!r} in the cache")
            if entry.is_dir(follow_symlinks=False):
                pending.append((Path(entry.path), relative + "/"))
            elif entry.is_file(follow_symlinks=False):
                files.append((relative, Path(entry.path).read_bytes()))
            else:
                raise PackageIntegrityError(package, f"{relative!r} is not a regular file")
    return files


def _write_tree(root: Path, entries: list[FileEntry]) -> None:
    for relative, data in entries:
        target = root.joinpath(*relative.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(target, "xb") as out:
            out.write(data)


def _make_read_only(root: Path) -> None:
    for directory, _, names in os.walk(root, topdown=False):
        for name in names:
            os.chmod(os.path.join(directory, name), 0o444)
        os.chmod(directory, 0o555)


def _remove_tree(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    # The entries of a read-only folder cannot be deleted: make every folder writable
    # first, before walking into it. Never chmod through a symlink: its target is not ours.
    os.chmod(path, stat.S_IRWXU)
    for directory, subdirs, _ in os.walk(path):
        for name in subdirs:
            sub = os.path.join(directory, name)
            if not os.path.islink(sub):
                os.chmod(sub, stat.S_IRWXU)
    shutil.rmtree(path)
