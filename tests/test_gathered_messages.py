"""What the runtime sends several of as one message is cut to a bound, in order, nothing lost:
a client's task ends (``TasksEnded``, at most ``ENDS_BYTES`` each, master_actor.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from actors.master_actor import ENDS_BYTES, runs_within


@given(st.lists(st.integers(0, 3 * ENDS_BYTES // 2), max_size=40))
def test_ends_go_in_order_in_runs_within_the_bound_a_larger_one_alone(sizes: list[int]) -> None:
    bodies = [bytes([i % 256]) * size for i, size in enumerate(sizes)]
    runs = runs_within(bodies, ENDS_BYTES)
    assert [body for run in runs for body in run] == bodies
    for run in runs:
        assert len(run) == 1 or sum(map(len, run)) <= ENDS_BYTES
    # and each run is as long as the bound lets it be: the next body would not have fit
    for run, after in zip(runs, runs[1:], strict=False):
        assert sum(map(len, run)) + len(after[0]) > ENDS_BYTES


def test_a_burst_of_small_ends_goes_as_one_message() -> None:
    assert runs_within([b"x" * 100] * 1000, ENDS_BYTES) == [[b"x" * 100] * 1000]
    assert runs_within([], ENDS_BYTES) == []
    half = b"h" * (ENDS_BYTES // 2)
    assert runs_within([half] * 3, ENDS_BYTES) == [[half, half], [half]]  # the bound itself fits
