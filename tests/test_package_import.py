"""A worker imports a deployed task class from its package's verified version folder, and only
from there (``package_store.import_deployed``)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from actors import Task
from actors.core.packages import version_of
from actors.package_store import NodeCache, import_deployed

TASKS = (b"from helper import shout\nfrom actors import Task\n\n"
         b"class Hello(Task):\n    def work(self, name):\n        return shout(name)\n")
HELPER = b"def shout(name):\n    return name.upper() + '!'\n"
INIT_RUNS: list[str] = []  # a package's __init__ below notes here that it ran


@pytest.fixture
def package(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A fresh package name; whatever importing it adds to sys.modules and sys.path goes after."""
    name = f"deployed_{uuid.uuid4().hex[:8]}"
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # as in a worker
    try:
        yield name
    finally:
        for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
            del sys.modules[module]
        sys.modules.pop("helper", None)


def install(tmp_path: Path, package: str, files: list[tuple[str, bytes]]) -> tuple[NodeCache, Path]:
    cache = NodeCache(tmp_path / "cache")
    return cache, cache.install(package, version_of(files, package), files)


def test_a_task_class_comes_from_its_version_folder_with_the_folders_lib(
        tmp_path: Path, package: str) -> None:
    files = [("tasks.py", TASKS), ("lib/helper.py", HELPER)]
    cache, folder = install(tmp_path, package, files)
    cls = import_deployed(package, folder, f"{package}.tasks:Hello")
    assert issubclass(cls, Task) and cls.__name__ == "Hello"
    assert sys.modules[f"{package}.tasks"].__file__ == str(folder / "tasks.py")
    assert sys.path[0] == str(folder / "lib")
    assert cls().work("hi") == "HI!"
    # Nothing was written into the read-only folder: it still hashes to its version.
    assert cache.verify(package, version_of(files, package))


def test_a_package_with_an_init_runs_it_once_and_is_imported_once(
        tmp_path: Path, package: str) -> None:
    init = b"from tests.test_package_import import INIT_RUNS\nINIT_RUNS.append(__name__)\n"
    _, folder = install(tmp_path, package, [("__init__.py", init), ("tasks.py", TASKS),
                                            ("lib/helper.py", HELPER)])
    first = import_deployed(package, folder, f"{package}.tasks:Hello")
    second = import_deployed(package, folder, f"{package}.tasks:Hello")
    assert first is second
    assert sys.modules[package].__file__ == str(folder / "__init__.py")
    assert INIT_RUNS.count(package) == 1
    assert sys.path.count(str(folder / "lib")) == 1


def test_a_module_the_version_folder_lacks_is_not_found_elsewhere_on_sys_path(
        tmp_path: Path, package: str) -> None:
    elsewhere = tmp_path / "elsewhere" / package
    elsewhere.mkdir(parents=True)
    (elsewhere / "__init__.py").write_text("")
    (elsewhere / "other.py").write_text("class Hello:\n    pass\n")
    sys.path.insert(0, str(tmp_path / "elsewhere"))
    _, folder = install(tmp_path, package, [("tasks.py", TASKS), ("lib/helper.py", HELPER)])
    with pytest.raises(ModuleNotFoundError):
        import_deployed(package, folder, f"{package}.other:Hello")
    assert sys.modules[package].__path__ == [str(folder)]


def test_a_class_the_module_lacks_raises_attribute_error(tmp_path: Path, package: str) -> None:
    _, folder = install(tmp_path, package, [("tasks.py", TASKS), ("lib/helper.py", HELPER)])
    with pytest.raises(AttributeError, match="Goodbye"):
        import_deployed(package, folder, f"{package}.tasks:Goodbye")
