"""The catalogue: what decodes, and that anything else is a typed error."""

from __future__ import annotations

import contextlib
import zlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors import messages as m
from actors.errors import MalformedMessage


def test_every_message_round_trips() -> None:
    samples = [
        m.Hello(role="node", peer_id="n1", protocol=m.PROTOCOL_VERSION, version="0.1.0", host="h",
                pid=3, slots=2),
        m.Submit(task_id="t1", name="Square", kind="task", code=b"\x80code", args=b"\x80args",
                 priority=5),
        m.RunUnits("t1", 7, [m.UnitCall(0, b"a"), m.UnitCall(1, b"b")]),
        m.UnitsDone("t1", 7, [m.UnitOutcome(0, True, b"r")], elapsed=0.5),
        m.TaskErred("t1", b"", "builtins.ValueError", "bad", "Traceback...", "3"),
        m.WorkerExited("w1", 10, None, 9, 2048, False),
        m.StoryReply("t1", [("task", "queued", "running", "driver w1", 1.5)]),
    ]
    for message in samples:
        assert m.decode(m.encode(message)) == message


def test_no_message_is_walked_by_the_cyclic_collector() -> None:
    """A client holds every result it received until its future goes, a master makes thousands
    of messages a second: none may be among the objects each collection walks (gc=False)."""
    import gc

    decoded = m.decode(m.encode(m.TaskDone("t1", b"\x80result", None)))
    samples = [decoded, m.RunUnits("t1", 7, [m.UnitCall(0, b"a")]), m.TaskInfo(
        task_id="t", name="n", client_id="c", status="done", done=0, total=0, priority=0,
        submitted=0.0, started=0.0, ended=0.0)]
    assert not any(gc.is_tracked(message) for message in samples)


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\x00garbage", msgspec.msgpack.encode(["NoSuchType", 1]),
     msgspec.msgpack.encode(["Hello", "node"]),  # too few fields
     msgspec.msgpack.encode(["Cancel", 42]),  # wrong field type
     msgspec.msgpack.encode({"task_id": "x"}),
     b"\x91\xa3\x00\x00\x80"],  # invalid UTF-8 in the tag (found by hypothesis)
)
def test_a_bad_frame_raises_malformed_message(frame: bytes) -> None:
    with pytest.raises(MalformedMessage) as info:
        m.decode(frame)
    assert "malformed message" in str(info.value)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise_anything_but_malformed_message(frame: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        m.decode(frame)


def test_a_units_digest_is_the_one_older_journals_hold() -> None:
    """A restarted master matches journaled results to re-sliced units by digest: the deps are
    hashed as the list they were on the wire before they became a tuple."""
    assert m.unit_digest(m.UnitCall(3, b"args", (0, 2))) == zlib.crc32(b"args", zlib.crc32(b"[0, 2]"))
    assert m.unit_digest(m.UnitCall(3, b"args")) == zlib.crc32(b"args", zlib.crc32(b"[]"))
    decoded = m.decode(m.encode(m.RunUnits("t1", 1, [m.UnitCall(3, b"args", (0, 2))])))
    assert isinstance(decoded, m.RunUnits) and decoded.units[0].deps == (0, 2)
