"""TaskSync state machines driven by events alone: no socket, no disk, no clock."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.core.packages import PackageVersion, split_chunks
from actors.core.sync_state import (
    CacheChecked,
    CachedVersionsFound,
    CacheStatus,
    ChunkReceived,
    ChunksRequested,
    DropSnapshot,
    Install,
    InstallFinished,
    InstanceEnded,
    InstanceQueued,
    InstanceStarted,
    NewestChanged,
    NewestVersion,
    PackagesScanned,
    RemovalReason,
    RemoveVersion,
    RequestChunks,
    SendChunks,
    SendUnknownVersion,
    SyncClientState,
    SyncServerState,
    Tick,
    TransferFailed,
    VerifyCache,
    VersionFailed,
    VersionNeeded,
    VersionReady,
    VersionState,
)
from tests.conftest import examples

CHUNK = 16  # bytes: small, so that even a tiny package travels in many chunks


def package(name: str = "wc", text: str = "v1") -> PackageVersion:
    files = [
        (
            "tasks.py",
            f"from actors import Task\nclass T(Task):\n    def work(self): return {text!r}\n".encode(),
        ),
        ("lib/helper.py", b"def helper():\n    return 42\n" * 4),
    ]
    return PackageVersion.from_files(name, files)


V1 = package(text="v1")
V2 = package(text="v2")


def feed(machine: Any, *events: Any) -> list[Any]:
    """Handle events in order, checking every invariant after each; all the instructions."""
    out = []
    for event in events:
        out += machine.handle(event)
        machine.validate()
    return out


def chunk_events(pv: PackageVersion, now: float = 0.0) -> list[ChunkReceived]:
    chunks = split_chunks(pv.archive, CHUNK)
    return [
        ChunkReceived(pv.package, pv.version, i, len(chunks), c, now=now)
        for i, c in enumerate(chunks)
    ]


def serve(
    server: SyncServerState, requests: list[Any], node: str = "n1", now: float = 0.0
) -> list[ChunkReceived]:
    """What the shells do: a RequestChunks becomes ChunksRequested, a SendChunks becomes ChunkReceived."""
    received = []
    for request in requests:
        if not isinstance(request, RequestChunks):
            continue
        asked = ChunksRequested(
            node, request.package, request.version, request.start, request.count, now=now
        )
        for reply in feed(server, asked):
            assert isinstance(reply, SendChunks)
            received += [
                ChunkReceived(
                    reply.package, reply.version, reply.start + i, reply.total, data, now=now
                )
                for i, data in enumerate(reply.chunks)
            ]
    return received


def server_with(*versions: PackageVersion, **kwargs: Any) -> SyncServerState:
    server = SyncServerState(chunk_size=CHUNK, **kwargs)
    for pv in versions:
        feed(server, PackagesScanned({pv.package: pv}, now=0.0))
    return server


def fetching_client(pv: PackageVersion = V1, **kwargs: Any) -> tuple[SyncClientState, list[Any]]:
    """A client that has asked for ``pv``, found it missing, and sent its first requests."""
    client = SyncClientState(**kwargs)
    assert feed(client, VersionNeeded(pv.package, pv.version, "w1", now=0.0)) == [
        VerifyCache(pv.package, pv.version)
    ]
    requests = feed(client, CacheChecked(pv.package, pv.version, CacheStatus.MISSING, now=0.0))
    return client, requests


def run_transfer(
    client: SyncClientState, server: SyncServerState, requests: list[Any]
) -> list[Any]:
    """Deliver chunks one at a time, answering the client's requests, until it asks for nothing."""
    pending = serve(server, requests)
    out: list[Any] = []
    while pending:
        instructions = feed(client, pending.pop(0))
        out += instructions
        pending += serve(server, instructions)
    return out


def installed_client(pv: PackageVersion = V1, **kwargs: Any) -> SyncClientState:
    client = SyncClientState(**kwargs)
    feed(client, VersionNeeded(pv.package, pv.version, "w1", now=0.0))
    feed(client, CacheChecked(pv.package, pv.version, CacheStatus.VALID, now=0.0))
    assert client.state_of(pv.package, pv.version) is VersionState.INSTALLED
    return client


# --- fetching a version ------------------------------------------------------


def test_a_missing_version_is_fetched_installed_and_then_announced():
    client, requests = fetching_client(window=4)
    assert requests == [RequestChunks("wc", V1.version, 0, 4)]
    out = run_transfer(client, server_with(V1), requests)
    installs = [i for i in out if isinstance(i, Install)]
    assert installs == [Install("wc", V1.version, tuple(sorted(installs[0].files)))]
    assert PackageVersion.from_files("wc", installs[0].files).version == V1.version
    assert client.state_of("wc", V1.version) is VersionState.INSTALLING
    assert feed(client, InstallFinished("wc", V1.version, ok=True, now=1.0)) == [
        VersionReady("wc", V1.version, ("w1",))
    ]


def test_a_valid_cached_version_is_ready_without_a_transfer():
    client = SyncClientState()
    feed(client, VersionNeeded("wc", V1.version, "w1", now=0.0))
    assert feed(client, CacheChecked("wc", V1.version, CacheStatus.VALID, now=0.0)) == [
        VersionReady("wc", V1.version, ("w1",))
    ]


def test_concurrent_requests_for_one_version_share_one_check_and_one_transfer():
    client = SyncClientState(window=4)
    out = feed(
        client,
        VersionNeeded("wc", V1.version, "w1", now=0.0),
        VersionNeeded("wc", V1.version, "w2", now=0.0),
    )
    assert out == [VerifyCache("wc", V1.version)]
    requests = feed(client, CacheChecked("wc", V1.version, CacheStatus.MISSING, now=0.0))
    assert feed(client, VersionNeeded("wc", V1.version, "w3", now=0.1)) == []  # joins mid-transfer
    assert feed(client, VersionNeeded("wc", V1.version, "w1", now=0.1)) == []  # asked twice
    out = run_transfer(client, server_with(V1), requests)
    assert sum(isinstance(i, Install) for i in out) == 1
    assert feed(client, InstallFinished("wc", V1.version, ok=True, now=1.0)) == [
        VersionReady("wc", V1.version, ("w1", "w2", "w3"))
    ]


@pytest.mark.parametrize(
    ("name", "version"), [("../etc", V1.version), ("wc", "../../x"), ("wc", "")]
)
def test_a_request_that_could_not_name_a_cache_folder_fails_at_once(name, version):
    assert feed(SyncClientState(), VersionNeeded(name, version, "w1", now=0.0)) == [
        VersionFailed(name, version, ("w1",), "not a valid package name and version")
    ]


def test_an_installed_version_is_verified_again_before_each_use():
    client = installed_client()
    assert feed(client, VersionNeeded("wc", V1.version, "w2", now=5.0)) == [
        VerifyCache("wc", V1.version)
    ]


def test_a_corrupt_cached_version_is_removed_and_fetched_again():
    client = installed_client(window=2)
    feed(client, VersionNeeded("wc", V1.version, "w2", now=5.0))
    out = feed(
        client, CacheChecked("wc", V1.version, CacheStatus.CORRUPT, "tasks.py edited", now=5.0)
    )
    assert out == [
        RemoveVersion("wc", V1.version, RemovalReason.CORRUPT, "tasks.py edited"),
        RequestChunks("wc", V1.version, 0, 2),
    ]


@pytest.mark.parametrize("window", [1, 3, 8])
def test_no_more_than_the_window_of_chunks_is_ever_in_flight(window):
    client, requests = fetching_client(window=window)
    server = server_with(V1)
    total = len(split_chunks(V1.archive, CHUNK))
    assert total > 8
    requested: list[int] = []
    delivered = 0
    pending = serve(server, requests)
    requested += [i for r in requests for i in range(r.start, r.start + r.count)]
    most_in_flight = len(requested)
    while pending:
        instructions = feed(client, pending.pop(0))
        delivered += 1
        asked = [r for r in instructions if isinstance(r, RequestChunks)]
        requested += [i for r in asked for i in range(r.start, r.start + r.count)]
        most_in_flight = max(most_in_flight, len(requested) - delivered)
        pending += serve(server, asked)
    assert most_in_flight == window
    assert sorted(requested) == list(range(total))  # each chunk asked for exactly once


def test_a_package_smaller_than_the_window_is_not_waited_for_beyond_its_end():
    tiny = PackageVersion.from_files("tiny", [("a.py", b"x")])
    client, requests = fetching_client(tiny, window=64)
    assert requests == [RequestChunks("tiny", tiny.version, 0, 64)]
    out = run_transfer(client, server_with(tiny), requests)
    assert [type(i) for i in out] == [Install]


@settings(max_examples=examples(60), deadline=None)
@given(st.data())
def test_chunks_in_any_order_with_duplicates_and_junk_install_exactly_the_package(data):
    client, _ = fetching_client(window=1000)  # everything requested at once
    good = chunk_events(V1)
    total = len(good)
    junk = [
        ChunkReceived("wc", V1.version, total, total, b"past the end", now=0.0),
        ChunkReceived("wc", V1.version, -1, total, b"negative", now=0.0),
        ChunkReceived("wc", "0" * 20, 0, 1, b"another version", now=0.0),
    ]
    extra = data.draw(st.lists(st.sampled_from(good + junk), max_size=20))
    order = data.draw(st.permutations(good + extra))
    out = feed(client, *order)
    installs = [i for i in out if isinstance(i, Install)]
    assert [i.files for i in installs] == [tuple(sorted(installs[0].files))]
    assert PackageVersion.from_files("wc", installs[0].files).version == V1.version
    assert not [i for i in out if isinstance(i, VersionFailed)]


def test_chunks_that_hash_wrong_are_thrown_away_and_fetched_again_then_the_version_fails():
    client, _ = fetching_client(window=1000, max_attempts=2)
    tampered = chunk_events(V1)
    last = tampered[-1]
    tampered[-1] = ChunkReceived(
        "wc", V1.version, last.index, last.total, last.data[:-1] + b"!", now=1.0
    )
    out = feed(client, *tampered)
    assert not [i for i in out if isinstance(i, Install)]
    assert out[-1] == RequestChunks("wc", V1.version, 0, 1000)  # from scratch
    out = feed(client, *tampered)
    assert len(out) == 1 and isinstance(out[0], VersionFailed)
    assert out[0].requesters == ("w1",) and "hashes to" in out[0].reason
    assert client.state_of("wc", V1.version) is None


def test_chunks_that_disagree_on_the_size_restart_the_transfer():
    client, _ = fetching_client(window=4)
    first = chunk_events(V1)[0]
    feed(client, first)
    out = feed(client, ChunkReceived("wc", V1.version, 1, first.total + 1, b"", now=0.0))
    assert out == [RequestChunks("wc", V1.version, 0, 4)]


def test_a_stalled_transfer_asks_again_for_what_is_missing_after_the_timeout():
    client, _ = fetching_client(window=4, transfer_timeout_s=10.0, max_attempts=2)
    chunks = chunk_events(V1, now=1.0)
    feed(client, chunks[0], chunks[2])  # chunk 1 and 3 are lost, more were asked for
    assert feed(client, Tick(now=10.9)) == []
    out = feed(client, Tick(now=11.0))
    assert out == [RequestChunks("wc", V1.version, 1, 1), RequestChunks("wc", V1.version, 3, 3)]
    assert feed(client, Tick(now=20.9)) == []  # the retry reset the clock
    out = feed(client, Tick(now=21.0))
    assert len(out) == 1 and isinstance(out[0], VersionFailed) and "no chunk" in out[0].reason


def test_a_stalled_transfer_that_never_got_a_chunk_starts_over():
    client, requests = fetching_client(window=4, transfer_timeout_s=10.0)
    assert feed(client, Tick(now=10.0)) == requests


def test_a_failed_transfer_fails_every_requester_and_the_next_request_starts_afresh():
    client, _ = fetching_client()
    feed(client, VersionNeeded("wc", V1.version, "w2", now=0.0))
    out = feed(client, TransferFailed("wc", V1.version, "unknown version", now=1.0))
    assert out == [VersionFailed("wc", V1.version, ("w1", "w2"), "unknown version")]
    assert feed(client, VersionNeeded("wc", V1.version, "w3", now=2.0)) == [
        VerifyCache("wc", V1.version)
    ]


def test_a_failed_install_fetches_again():
    client, requests = fetching_client(window=4)
    run_transfer(client, server_with(V1), requests)
    out = feed(client, InstallFinished("wc", V1.version, ok=False, reason="disk full", now=1.0))
    assert out == [RequestChunks("wc", V1.version, 0, 4)]


def test_late_and_stray_events_change_nothing():
    client = installed_client()
    assert (
        feed(
            client,
            *chunk_events(V1),
            CacheChecked("wc", V1.version, CacheStatus.CORRUPT, now=1.0),
            InstallFinished("wc", V1.version, ok=False, now=1.0),
            TransferFailed("wc", V1.version, "late", now=1.0),
            InstanceEnded("wc", V1.version, "never-started", now=1.0),
        )
        == []
    )
    assert client.state_of("wc", V1.version) is VersionState.INSTALLED


def test_an_event_of_the_other_side_is_a_programming_error():
    with pytest.raises(TypeError, match="PackagesScanned"):
        SyncClientState().handle(PackagesScanned({}, now=0.0))
    with pytest.raises(TypeError, match="VersionNeeded"):
        SyncServerState().handle(VersionNeeded("wc", V1.version, "w1", now=0.0))


# --- removing unused versions -------------------------------------------------


def test_an_old_unused_version_is_removed_only_after_the_grace_period():
    client = installed_client(grace_s=60.0)
    feed(client, NewestVersion("wc", V2.version, now=100.0))
    assert feed(client, Tick(now=159.0)) == []  # grace counts from when V1 stopped being newest
    assert feed(client, Tick(now=160.0)) == [RemoveVersion("wc", V1.version, RemovalReason.UNUSED)]
    assert client.state_of("wc", V1.version) is None
    assert feed(client, Tick(now=1000.0)) == []


def test_the_newest_version_is_never_removed():
    client = installed_client(grace_s=60.0)
    feed(client, NewestVersion("wc", V1.version, now=0.0))
    assert feed(client, Tick(now=10_000.0)) == []


def test_a_version_of_a_package_whose_newest_is_unknown_is_kept():
    client = installed_client(grace_s=60.0)
    assert feed(client, Tick(now=10_000.0)) == []


def test_a_version_in_use_is_kept_however_old_and_removed_after_grace_once_its_last_user_ends():
    client = installed_client(grace_s=60.0)
    feed(
        client,
        InstanceStarted("wc", V1.version, "i1", now=1.0),
        InstanceStarted("wc", V1.version, "i2", now=1.0),
        NewestVersion("wc", V2.version, now=2.0),
    )
    assert feed(client, Tick(now=10_000.0)) == []
    feed(client, InstanceEnded("wc", V1.version, "i1", now=10_000.0))
    assert feed(client, Tick(now=20_000.0)) == []  # i2 still runs
    feed(client, InstanceEnded("wc", V1.version, "i2", now=20_000.0))
    assert feed(client, Tick(now=20_059.0)) == []
    assert feed(client, Tick(now=20_060.0)) == [
        RemoveVersion("wc", V1.version, RemovalReason.UNUSED)
    ]


def test_a_version_being_checked_or_fetched_is_not_removed():
    client, _ = fetching_client(V1, grace_s=0.0, transfer_timeout_s=1e9)
    feed(client, NewestVersion("wc", V2.version, now=0.0))
    assert not [i for i in feed(client, Tick(now=1e6)) if isinstance(i, RemoveVersion)]


def test_versions_found_in_the_cache_at_start_are_collected_when_old():
    client = SyncClientState(grace_s=60.0)
    feed(
        client,
        CachedVersionsFound((("wc", V1.version), ("wc", V2.version)), now=0.0),
        NewestVersion("wc", V2.version, now=0.0),
    )
    assert feed(client, Tick(now=60.0)) == [RemoveVersion("wc", V1.version, RemovalReason.UNUSED)]


def test_every_version_of_a_package_deleted_on_the_master_is_removed_after_grace():
    client = installed_client(grace_s=60.0)
    feed(client, NewestVersion("wc", V1.version, now=0.0), NewestVersion("wc", None, now=10.0))
    assert feed(client, Tick(now=69.0)) == []
    assert feed(client, Tick(now=70.0)) == [RemoveVersion("wc", V1.version, RemovalReason.UNUSED)]


# --- the master's side ---------------------------------------------------------


def test_a_scan_announces_new_versions_once():
    server = SyncServerState(chunk_size=CHUNK)
    assert feed(server, PackagesScanned({"wc": V1}, now=0.0)) == [NewestChanged("wc", V1.version)]
    assert feed(server, PackagesScanned({"wc": V1}, now=1.0)) == []
    assert feed(server, PackagesScanned({"wc": V2}, now=2.0)) == [NewestChanged("wc", V2.version)]
    assert server.current() == {"wc": V2}
    assert feed(server, PackagesScanned({}, now=3.0)) == [NewestChanged("wc", None)]
    assert server.current() == {}


def test_chunk_requests_are_answered_within_bounds():
    server = server_with(V1, max_chunks_per_request=4)
    chunks = split_chunks(V1.archive, CHUNK)
    total = len(chunks)

    def ask(start: int, count: int) -> list[Any]:
        return feed(server, ChunksRequested("n1", "wc", V1.version, start, count, now=0.0))

    assert ask(1, 2) == [SendChunks("n1", "wc", V1.version, 1, total, tuple(chunks[1:3]))]
    assert ask(0, 100) == [SendChunks("n1", "wc", V1.version, 0, total, tuple(chunks[:4]))]
    assert ask(total - 1, 4) == [
        SendChunks("n1", "wc", V1.version, total - 1, total, (chunks[-1],))
    ]
    assert ask(total + 5, 4) == [SendChunks("n1", "wc", V1.version, total + 5, total, ())]
    assert ask(0, -3) == [SendChunks("n1", "wc", V1.version, 0, total, ())]


def test_a_request_for_an_unknown_version_is_answered_as_such():
    server = server_with(V1)
    assert feed(server, ChunksRequested("n1", "wc", V2.version, 0, 4, now=0.0)) == [
        SendUnknownVersion("n1", "wc", V2.version)
    ]


def test_the_master_keeps_an_old_version_while_an_instance_uses_it():
    server = server_with(V1, grace_s=60.0)
    feed(server, InstanceQueued("wc", V1.version, "i1", now=1.0))
    feed(server, PackagesScanned({"wc": V2}, now=2.0))  # the file changed on disk
    assert feed(server, Tick(now=10_000.0)) == []
    assert server.get("wc", V1.version) == V1  # a node can still fetch what i1 runs
    feed(server, InstanceEnded("wc", V1.version, "i1", now=10_000.0))
    assert feed(server, Tick(now=10_059.0)) == []
    assert feed(server, Tick(now=10_060.0)) == [DropSnapshot("wc", V1.version)]
    assert server.get("wc", V1.version) is None


def test_the_master_drops_an_unused_old_version_after_grace_and_never_the_newest():
    server = server_with(V1, grace_s=60.0)
    feed(server, PackagesScanned({"wc": V2}, now=100.0))
    assert feed(server, Tick(now=159.0)) == []
    assert feed(server, Tick(now=160.0)) == [DropSnapshot("wc", V1.version)]
    assert feed(server, Tick(now=1e9)) == []
    assert server.current() == {"wc": V2}


def test_going_back_to_an_old_version_makes_it_the_newest_again():
    server = server_with(V1, grace_s=60.0)
    feed(server, PackagesScanned({"wc": V2}, now=1.0))
    assert feed(server, PackagesScanned({"wc": V1}, now=2.0)) == [NewestChanged("wc", V1.version)]
    assert feed(server, Tick(now=62.0)) == [DropSnapshot("wc", V2.version)]
    assert server.current() == {"wc": V1}


# --- both sides together -------------------------------------------------------


def test_a_node_follows_the_master_through_an_edit_and_cleans_up_after_itself():
    """Master and node machines wired in memory; the node's disk is a set."""
    server = server_with(V1, grace_s=60.0)
    client = SyncClientState(grace_s=60.0, window=3)
    disk: set[tuple[str, str]] = set()

    def node_does(instructions: list[Any], now: float) -> list[Any]:
        """Carry out the client's instructions like its shell would; what it reported back."""
        reported = []
        pending = list(instructions)
        while pending:
            match pending.pop(0):
                case VerifyCache(package, version):
                    status = (
                        CacheStatus.VALID if (package, version) in disk else CacheStatus.MISSING
                    )
                    pending += feed(client, CacheChecked(package, version, status, now=now))
                case RequestChunks() as request:
                    for chunk in serve(server, [request], now=now):
                        pending += feed(client, chunk)
                case Install(package, version, _):
                    disk.add((package, version))
                    pending += feed(client, InstallFinished(package, version, ok=True, now=now))
                case RemoveVersion(package, version, _):
                    disk.discard((package, version))
                case other:
                    reported.append(other)
        return reported

    feed(client, NewestVersion("wc", V1.version, now=0.0))
    assert node_does(feed(client, VersionNeeded("wc", V1.version, "w1", now=0.0)), 0.0) == [
        VersionReady("wc", V1.version, ("w1",))
    ]
    feed(client, InstanceStarted("wc", V1.version, "i1", now=0.0))
    feed(server, InstanceQueued("wc", V1.version, "i1", now=0.0))

    # The package is edited while i1 runs: the new version arrives next to the old one.
    [announced] = feed(server, PackagesScanned({"wc": V2}, now=10.0))
    feed(client, NewestVersion(announced.package, announced.version, now=10.0))
    assert node_does(feed(client, VersionNeeded("wc", V2.version, "w2", now=10.0)), 10.0) == [
        VersionReady("wc", V2.version, ("w2",))
    ]
    assert disk == {("wc", V1.version), ("wc", V2.version)}
    assert node_does(feed(client, Tick(now=1000.0)), 1000.0) == []
    assert feed(server, Tick(now=1000.0)) == []

    # i1 ends: both sides let V1 go after the grace period, and only V1.
    feed(client, InstanceEnded("wc", V1.version, "i1", now=1000.0))
    feed(server, InstanceEnded("wc", V1.version, "i1", now=1000.0))
    node_does(feed(client, Tick(now=1060.0)), 1060.0)
    assert disk == {("wc", V2.version)}
    assert feed(server, Tick(now=1060.0)) == [DropSnapshot("wc", V1.version)]


# --- what a mutation run of this core found unchecked ------------------------------


def test_chunks_that_do_not_form_an_archive_are_thrown_away_and_the_clock_restarts():
    """Garbage of the right length (not a wrong hash: no archive at all): every chunk is
    dropped and fetched again from scratch, the stall clock starts at the restart, and the
    last failure says what was wrong and how often it was tried."""
    client, _ = fetching_client(window=1000, max_attempts=3, transfer_timeout_s=10.0)
    garbage = [ChunkReceived("wc", V1.version, c.index, c.total, b"\xff" * len(c.data), now=5.0)
               for c in chunk_events(V1)]
    out = feed(client, *garbage)
    assert out[-1] == RequestChunks("wc", V1.version, 0, 1000)  # from scratch, not topped up
    assert feed(client, Tick(now=14.9)) == []
    assert feed(client, Tick(now=15.0)) == [RequestChunks("wc", V1.version, 0, 1000)]
    out = feed(client, *garbage)
    assert len(out) == 1 and isinstance(out[0], VersionFailed)
    assert "bad archive" in out[0].reason and "(after 3 attempts)" in out[0].reason


def test_a_restart_after_a_wrong_hash_or_size_restarts_the_stall_clock_too():
    client, _ = fetching_client(window=4, max_attempts=3, transfer_timeout_s=10.0)
    first = chunk_events(V1)[0]
    feed(client, ChunkReceived("wc", V1.version, 0, first.total, first.data, now=3.0))
    out = feed(client, ChunkReceived("wc", V1.version, 1, first.total + 1, b"", now=4.0))
    assert out == [RequestChunks("wc", V1.version, 0, 4)]
    assert feed(client, Tick(now=13.9)) == []
    assert feed(client, Tick(now=14.0)) == [RequestChunks("wc", V1.version, 0, 4)]


def test_a_failed_install_restarts_the_clock_and_its_last_failure_names_it():
    client, requests = fetching_client(window=4, max_attempts=3, transfer_timeout_s=10.0)
    server = server_with(V1)
    run_transfer(client, server, requests)
    out = feed(client, InstallFinished("wc", V1.version, ok=False, reason="disk full", now=1.0))
    assert out == [RequestChunks("wc", V1.version, 0, 4)]
    assert feed(client, Tick(now=10.9)) == []
    again = feed(client, Tick(now=11.0))
    assert again == [RequestChunks("wc", V1.version, 0, 4)]
    run_transfer(client, server, again)
    out = feed(client, InstallFinished("wc", V1.version, ok=False, reason="disk full", now=12.0))
    assert len(out) == 1 and isinstance(out[0], VersionFailed)
    assert out[0].reason == "install failed: disk full (after 3 attempts)"


@pytest.mark.parametrize("kwargs", [{"window": 0}, {"max_attempts": 0}])
def test_a_client_needs_a_window_and_an_attempt(kwargs):
    SyncClientState(window=1, max_attempts=1)  # the least there is
    with pytest.raises(ValueError, match="at least 1"):
        SyncClientState(**kwargs)


@pytest.mark.parametrize("kwargs", [{"chunk_size": 0}, {"max_chunks_per_request": 0}])
def test_a_server_needs_a_chunk_size_and_a_chunk_per_request(kwargs):
    SyncServerState(chunk_size=1, max_chunks_per_request=1)
    with pytest.raises(ValueError, match="at least 1"):
        SyncServerState(**kwargs)


def test_one_scan_announces_every_package_that_changed_and_every_one_deleted():
    other = package("other", "o1")
    server = SyncServerState(chunk_size=CHUNK)
    out = feed(server, PackagesScanned({"wc": V1, "other": other}, now=0.0))
    assert sorted(out, key=repr) == sorted([NewestChanged("wc", V1.version),
                                            NewestChanged("other", other.version)], key=repr)
    out = feed(server, PackagesScanned({}, now=1.0))
    assert sorted(out, key=repr) == sorted([NewestChanged("wc", None),
                                            NewestChanged("other", None)], key=repr)


def test_two_transfers_stalled_at_one_tick_are_both_asked_again():
    client, _ = fetching_client(window=4, transfer_timeout_s=10.0)
    other = package("other", "o1")
    feed(client, VersionNeeded("other", other.version, "w2", now=0.0))
    feed(client, CacheChecked("other", other.version, CacheStatus.MISSING, now=0.0))
    out = feed(client, Tick(now=10.0))
    assert sorted(out, key=repr) == sorted([RequestChunks("wc", V1.version, 0, 4),
                                            RequestChunks("other", other.version, 0, 4)], key=repr)
