"""Packages on disk: scanning the tasks directory and a node's read-only, verified cache."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

import actors.package_store as package_store
from actors.core.packages import TaskKind, split_chunks, version_of
from actors.core.sync_state import (
    CacheChecked,
    CacheStatus,
    ChunkReceived,
    Install,
    PackagesScanned,
    SyncClientState,
    VersionNeeded,
)
from actors.errors import PackageError, PackageIntegrityError
from actors.package_store import NodeCache, read_package_dir, scan_tasks_dir

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "tasks"

FILES = [
    (
        "tasks.py",
        b"from actors import Task\n\nclass Hello(Task):\n    def work(self, name):\n        return name\n",
    ),
    ("lib/helper.py", b"def helper():\n    return 1\n"),
    ("lib/deep/data.txt", b"some data\n"),
]
VERSION = version_of(FILES)


def write_package(folder: Path, files: list[tuple[str, bytes]] = FILES) -> Path:
    for relative, data in files:
        target = folder / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return folder


def make_writable(path: Path) -> None:
    """What someone hand-editing the cache does first."""
    for directory, _, names in os.walk(path):
        os.chmod(directory, 0o755)
        for name in names:
            os.chmod(os.path.join(directory, name), 0o644)


def leftovers(cache: NodeCache) -> list[str]:
    return sorted(p.name for p in cache.root.glob("*/.*"))


# --- scanning the tasks directory -------------------------------------------


def test_scan_finds_each_package_with_its_version_and_tasks(tmp_path):
    write_package(tmp_path / "hello")
    write_package(
        tmp_path / "other", [("jobs.py", b"import actors\nclass Job(actors.ParallelTask): pass\n")]
    )
    (tmp_path / "notes.txt").write_text("a file is not a package")
    write_package(tmp_path / "__pycache__", [("x.pyc", b"\x00")])
    write_package(tmp_path / ".git", [("config", b"")])

    result = scan_tasks_dir(tmp_path)

    assert sorted(result.packages) == ["hello", "other"]
    assert result.skipped == {}
    hello = result.packages["hello"]
    assert hello.version == VERSION
    assert [t.name for t in hello.listing.tasks] == ["hello.tasks:Hello"]
    assert [t.name for t in result.packages["other"].listing.tasks] == ["other.jobs:Job"]


def test_caches_and_dotfiles_in_a_package_do_not_change_its_version(tmp_path):
    folder = write_package(tmp_path / "hello")
    write_package(
        folder,
        [("__pycache__/tasks.cpython-311.pyc", b"\x00"), (".DS_Store", b""), ("lib/x.pyc", b"")],
    )
    assert scan_tasks_dir(tmp_path).packages["hello"].version == VERSION


def test_editing_a_file_changes_the_version(tmp_path):
    folder = write_package(tmp_path / "hello")
    (folder / "lib" / "helper.py").write_bytes(b"def helper():\n    return 2\n")
    assert scan_tasks_dir(tmp_path).packages["hello"].version != VERSION


def test_a_folder_that_cannot_be_a_package_is_reported_and_hides_nothing(tmp_path):
    write_package(tmp_path / "hello")
    write_package(tmp_path / "my-tasks")
    result = scan_tasks_dir(tmp_path)
    assert sorted(result.packages) == ["hello"]
    assert "identifier" in result.skipped["my-tasks"]


def test_a_broken_module_is_listed_with_its_error_next_to_the_working_ones(tmp_path):
    write_package(tmp_path / "hello", [*FILES, ("broken.py", b"def oops(:\n")])
    listing = scan_tasks_dir(tmp_path).packages["hello"].listing
    assert [t.name for t in listing.tasks] == ["hello.tasks:Hello"]
    assert [(b.module, b.line) for b in listing.broken] == [("broken.py", 1)]


def test_a_symlink_inside_the_package_is_read_and_a_symlink_loop_ends(tmp_path):
    folder = write_package(tmp_path / "tasks" / "hello")
    (folder / "lib" / "vendored").mkdir()
    (folder / "lib" / "vendored" / "vendored.py").write_bytes(b"X = 1\n")
    (folder / "lib" / "alias").symlink_to(folder / "lib" / "vendored")
    (folder / "lib" / "loop").symlink_to(folder)
    paths = [path for path, _ in read_package_dir(folder)]
    assert "lib/alias/vendored.py" in paths and "lib/vendored/vendored.py" in paths
    assert not any(path.startswith("lib/loop/lib/loop") for path in paths)


def test_a_symlink_out_of_the_package_is_never_served(tmp_path):
    """What a link points at outside the package (a key file, say) would reach every node."""
    secret = tmp_path / "keys" / "master.key_secret"
    secret.parent.mkdir()
    secret.write_bytes(b"secret-key = ...")
    elsewhere = write_package(tmp_path / "elsewhere", [("vendored.py", b"X = 1\n")])
    folder = write_package(tmp_path / "tasks" / "hello")
    (folder / "lib" / "stolen.key").symlink_to(secret)
    (folder / "lib" / "vendored").symlink_to(elsewhere)
    files = dict(read_package_dir(folder))
    assert not any(path.startswith(("lib/stolen", "lib/vendored")) for path in files)
    assert b"secret-key" not in b"".join(files.values())


def test_the_wordcount_example_lists_its_task_without_importing_it():
    result = scan_tasks_dir(EXAMPLES)
    wordcount = result.packages["wordcount"]
    [task] = wordcount.listing.tasks
    assert (task.name, task.kind, task.parameters) == (
        "wordcount.tasks:WordCount",
        TaskKind.PARALLEL,
        ("texts", "top"),
    )
    assert wordcount.listing.broken == ()
    assert {"tasks.py", "lib/textstats.py"} <= {
        path for path, _ in read_package_dir(EXAMPLES / "wordcount")
    }


# --- the node's cache ----------------------------------------------------------


def test_install_writes_a_read_only_copy_that_verifies(tmp_path):
    cache = NodeCache(tmp_path / "cache")
    path = cache.install("hello", VERSION, FILES)

    assert path == cache.path_for("hello", VERSION) == tmp_path / "cache" / "hello" / VERSION
    assert sorted(read_package_dir(path)) == sorted(FILES)
    assert cache.verify("hello", VERSION)
    assert cache.check("hello", VERSION) == (CacheStatus.VALID, "")
    for directory, _, names in os.walk(path):
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o555
        for name in names:
            assert stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode) == 0o444
    assert leftovers(cache) == []
    assert cache.installed() == [("hello", VERSION)]


def test_installing_content_that_does_not_match_its_version_leaves_no_trace(tmp_path):
    cache = NodeCache(tmp_path)
    with pytest.raises(PackageIntegrityError, match="hashes to"):
        cache.install("hello", VERSION, [*FILES[:-1], ("lib/deep/data.txt", b"tampered\n")])
    with pytest.raises(PackageIntegrityError, match="not a plain relative path"):
        cache.install("hello", VERSION, [*FILES, ("../escaped.py", b"")])
    assert not cache.path_for("hello", VERSION).exists()
    assert not (tmp_path / "escaped.py").exists()
    assert leftovers(cache) == []


@pytest.mark.parametrize(
    ("package", "version"), [("../x", VERSION), ("hello", "../../etc"), ("hello", VERSION.upper())]
)
def test_names_from_the_network_never_leave_the_cache_root(tmp_path, package, version):
    with pytest.raises(PackageError):
        NodeCache(tmp_path).path_for(package, version)


def test_installing_a_version_that_is_already_there_keeps_it(tmp_path):
    cache = NodeCache(tmp_path)
    first = cache.install("hello", VERSION, FILES)
    inode = os.stat(first).st_ino
    assert cache.install("hello", VERSION, FILES) == first
    assert os.stat(first).st_ino == inode
    assert leftovers(cache) == []


def edit(path: Path) -> None:
    (path / "tasks.py").write_bytes(b"import os\n")


def truncate(path: Path) -> None:
    with open(path / "lib" / "helper.py", "r+b") as f:
        f.truncate(5)


def delete(path: Path) -> None:
    (path / "lib" / "deep" / "data.txt").unlink()


def add_file(path: Path) -> None:
    (path / "extra.py").write_bytes(b"")


def add_bytecode(path: Path) -> None:
    (path / "__pycache__").mkdir()
    (path / "__pycache__" / "tasks.cpython-311.pyc").write_bytes(b"\x00")


def add_symlink(path: Path) -> None:
    (path / "lib" / "link.py").symlink_to(path / "tasks.py")


@pytest.mark.parametrize("damage", [edit, truncate, delete, add_file, add_bytecode, add_symlink])
def test_verify_notices_a_cache_folder_changed_by_hand(tmp_path, damage):
    cache = NodeCache(tmp_path)
    path = cache.install("hello", VERSION, FILES)
    make_writable(path)
    damage(path)
    status, reason = cache.check("hello", VERSION)
    assert status is CacheStatus.CORRUPT and reason
    assert not cache.verify("hello", VERSION)


def test_a_version_never_installed_is_missing(tmp_path):
    assert NodeCache(tmp_path).check("hello", VERSION) == (CacheStatus.MISSING, "")


def test_install_replaces_a_corrupt_folder(tmp_path):
    cache = NodeCache(tmp_path)
    path = cache.install("hello", VERSION, FILES)
    make_writable(path)
    truncate(path)
    assert cache.install("hello", VERSION, FILES) == path
    assert cache.verify("hello", VERSION)
    assert leftovers(cache) == []


def test_remove_deletes_a_read_only_version_and_only_that(tmp_path):
    cache = NodeCache(tmp_path)
    other_files = [("tasks.py", b"# other\n")]
    other = version_of(other_files)
    cache.install("hello", VERSION, FILES)
    cache.install("hello", other, other_files)

    assert cache.remove("hello", VERSION)
    assert not cache.path_for("hello", VERSION).exists()
    assert cache.verify("hello", other)
    assert leftovers(cache) == []
    assert not cache.remove("hello", VERSION)


def test_remove_does_not_follow_a_symlink_out_of_the_cache(tmp_path):
    outside = write_package(tmp_path / "outside", [("keep.txt", b"mine")])
    os.chmod(outside, 0o555)
    cache = NodeCache(tmp_path / "cache")
    (cache.root / "hello").mkdir()
    cache.path_for("hello", VERSION).symlink_to(outside)
    assert cache.check("hello", VERSION)[0] is CacheStatus.CORRUPT
    assert cache.remove("hello", VERSION)
    assert (outside / "keep.txt").read_bytes() == b"mine"
    assert stat.S_IMODE(os.stat(outside).st_mode) == 0o555


def test_an_installer_that_loses_the_race_keeps_the_winners_folder(tmp_path, monkeypatch):
    """A second installer renames its folder into place between our write and our rename."""
    cache = NodeCache(tmp_path)
    make_read_only = package_store._make_read_only
    rival_paths: list[Path] = []

    def rival_installs_first(staging: Path) -> None:
        make_read_only(staging)
        if not rival_paths:
            rival_paths.append(staging)  # only the first call races; the rival's own does not
            rival_paths.append(NodeCache(tmp_path).install("hello", VERSION, FILES))

    monkeypatch.setattr(package_store, "_make_read_only", rival_installs_first)
    path = cache.install("hello", VERSION, FILES)
    ours, winner = rival_paths
    assert path == winner
    assert not ours.exists()
    assert cache.verify("hello", VERSION)
    assert leftovers(cache) == []


def install_concurrently(cache: NodeCache, version: str, files: list, count: int) -> list:
    """``count`` threads released together to install one version; each one's path or error."""
    barrier = threading.Barrier(count)
    results: list[Path | BaseException] = []

    def install() -> None:
        barrier.wait(timeout=10)
        try:
            results.append(cache.install("hello", version, files))
        except BaseException as exc:  # reported by the test, in its own thread
            results.append(exc)

    threads = [threading.Thread(target=install) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return results


def test_concurrent_installs_of_one_version_end_with_one_valid_folder(tmp_path):
    cache = NodeCache(tmp_path)
    for round_number in range(10):
        files = [*FILES, ("round.txt", str(round_number).encode())]
        version = version_of(files)
        results = install_concurrently(cache, version, files, count=4)
        assert results == [cache.path_for("hello", version)] * 4
        assert cache.verify("hello", version)
    assert len(cache.installed()) == 10
    assert leftovers(cache) == []


def test_remove_leftovers_cleans_what_a_crash_left_behind(tmp_path):
    cache = NodeCache(tmp_path)
    cache.install("hello", VERSION, FILES)
    staging = write_package(tmp_path / "hello" / f".install-{VERSION}-abc", FILES)
    package_store._make_read_only(staging)
    (tmp_path / "hello" / f".trash-{VERSION}-def").mkdir()
    assert cache.remove_leftovers() == 2
    assert leftovers(cache) == []
    assert cache.verify("hello", VERSION)


# --- master scan to node cache, through the sync machines -------------------


def test_a_scanned_package_travels_through_the_sync_machines_into_a_valid_cache(tmp_path):
    from actors.core.sync_state import SyncServerState

    scanned = scan_tasks_dir(EXAMPLES).packages["wordcount"]
    server = SyncServerState(chunk_size=64)
    server.handle(PackagesScanned({"wordcount": scanned}, now=0.0))
    client = SyncClientState(window=8)
    client.handle(VersionNeeded("wordcount", scanned.version, "w1", now=0.0))
    client.handle(CacheChecked("wordcount", scanned.version, CacheStatus.MISSING, now=0.0))
    archive = server.get("wordcount", scanned.version)
    assert archive is not None
    chunks = split_chunks(archive.archive, 64)
    out = []
    for index, data in reversed(list(enumerate(chunks))):
        out += client.handle(
            ChunkReceived("wordcount", scanned.version, index, len(chunks), data, now=0.0)
        )
    [install] = [i for i in out if isinstance(i, Install)]  # chunks may come unasked, in any order
    assert isinstance(install, Install)

    cache = NodeCache(tmp_path)
    path = cache.install(install.package, install.version, install.files)
    assert cache.verify("wordcount", scanned.version)
    assert (path / "tasks.py").read_bytes() == (EXAMPLES / "wordcount" / "tasks.py").read_bytes()
