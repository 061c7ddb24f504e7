"""Arguments and results as bytes (``actors.serialize``): a scalar travels as MessagePack, the
rest as a pickle, and every value comes back as the same type and value."""

from __future__ import annotations

import math
import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.serialize import dumps, dumps_scalar_call, loads, loads_parts

EDGES = [0, -1, 127, 128, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 10**40,
         0.0, -0.0, 1.5, math.inf, -math.inf, "", "é", "\ud800", "x" * 5000, b"", b"\x80x",
         True, False, None]


def _same(value: object, back: object) -> bool:
    if type(back) is not type(value):
        return False
    if isinstance(value, float) and isinstance(back, float):
        return (math.isnan(value) and math.isnan(back)) or (
            value == back and math.copysign(1, value) == math.copysign(1, back))
    return back == value


@pytest.mark.parametrize("value", EDGES + [math.nan, (1, "a"), [1.5], {"k": b"v"}], ids=repr)
def test_a_value_comes_back_as_itself(value: object) -> None:
    data = dumps(value)
    assert _same(value, loads(data)) and _same(value, loads_parts([data]))
    assert _same(value, loads(memoryview(data)))


@given(st.one_of(st.integers(), st.floats(), st.text(), st.binary(), st.booleans(), st.none()))
def test_any_scalar_comes_back_as_itself(value: object) -> None:
    assert _same(value, loads(dumps(value)))


_SCALAR = st.one_of(st.integers(), st.floats(allow_nan=False), st.text(), st.binary(),
                    st.booleans(), st.none())


@given(st.lists(_SCALAR, max_size=70).map(tuple),
       st.dictionaries(st.text(max_size=8), st.one_of(_SCALAR, st.lists(_SCALAR, max_size=2)),
                       max_size=4))
def test_a_call_of_scalars_is_pickled_as_any_call_would_be(args: tuple[object, ...],
                                                           kwargs: dict[str, object]) -> None:
    """The fast path for arguments (every item of a map) makes the very bytes of the general
    one, or leaves the call to it (None)."""
    fast = dumps_scalar_call(args, kwargs)
    scalars = len(args) <= 64 and all(not isinstance(v, list) for v in kwargs.values())
    assert (fast is not None) == scalars
    if fast is not None:
        assert fast == dumps((args, kwargs))


def test_a_scalar_is_not_a_pickle_and_a_pickle_still_loads() -> None:
    """Journals and results written before scalars were MessagePack hold pickles: they load."""
    assert dumps(7)[:1] != pickle.PROTO and dumps((7,))[:1] == pickle.PROTO
    assert loads(pickle.dumps(7, protocol=pickle.HIGHEST_PROTOCOL)) == 7


@pytest.mark.parametrize("data", [b"\x91\x01", b"\x81\xa1k\x01", b"\xc1", b"\xa5ab"])
def test_bytes_that_are_neither_raise_an_unpickling_error(data: bytes) -> None:
    """A list or map in MessagePack is no payload of this runtime; nor is malformed data."""
    with pytest.raises(pickle.UnpicklingError):
        loads(data)
