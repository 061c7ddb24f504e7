"""The master's book of results kept for later tasks' arguments (a plain class, fed directly)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from actors.errors import InputFailed, InputLost
from actors.master_inputs import InputBook
from tests.conftest import examples


def test_a_result_is_kept_while_its_future_is_held_then_let_go() -> None:
    book = InputBook()
    book.submitted("a", "c1", ())
    assert book.ended("a", "done", b"ra") == []  # still held: kept
    assert book.kept["a"].result == b"ra"
    assert book.check("b", "c1", "a", None) is None
    assert book.released("c2", ["a"]) == []  # another client's release counts for nothing
    assert book.released("c1", ["a"]) == ["a"] and "a" not in book.kept


def test_a_task_that_takes_it_keeps_it_until_that_task_ends() -> None:
    book = InputBook()
    book.submitted("a", "c1", ())
    book.submitted("b", "c1", ["a", "a"])  # named twice: one use
    assert book.released("c1", ["a"]) == []  # b has not run: a stays
    assert book.ended("a", "done", b"ra") == []
    assert "a" in book.kept
    assert sorted(book.ended("b", "done", b"rb")) == ["a"]  # b ended: a goes (b is still held)
    assert "a" not in book.kept and "b" in book.kept


def test_inputs_refused_name_why() -> None:
    book = InputBook()
    book.submitted("bad", "c1", ())
    book.ended("bad", "erred", why="ValueError: no")
    assert isinstance(book.check("t", "c1", "bad", None), InputFailed)
    assert "ValueError: no" in str(book.check("t", "c1", "bad", None))
    for refused in (book.check("t", "c2", "bad", None),  # another client's
                    book.check("t", "c1", "never", None),  # unknown, or released
                    book.check("t", "c1", "t", None),  # itself
                    book.check("t", "c1", "running", "c2")):  # running, another client's
        assert isinstance(refused, InputLost)
    assert book.check("t", "c1", "running", "c1") is None


def test_data_scattered_again_counts_each_future() -> None:
    book = InputBook()
    book.submitted("scatter-x", "c1", ())
    book.ended("scatter-x", "done", b"x")
    assert book.referenced_again("scatter-x", "c1")  # a second future, the first not yet let go
    assert not book.referenced_again("scatter-x", "c2")
    assert book.released("c1", ["scatter-x"]) == []  # the first future's release
    assert "scatter-x" in book.kept
    assert book.released("c1", ["scatter-x"]) == ["scatter-x"]


def test_a_client_gone_takes_its_kept_results_with_it_but_not_those_in_use() -> None:
    book = InputBook()
    book.submitted("a", "c1", ())
    book.submitted("b", "c1", ())
    book.ended("a", "done", b"ra")
    book.submitted("d", "c1", ["b"])  # (detached: runs on after its client left)
    book.ended("b", "done", b"rb")
    book.client_gone("c1")
    assert "a" not in book.kept and "b" in book.kept and not book.refs
    assert book.ended("d", "done", b"rd") == ["d", "b"]
    assert not book.kept


def kept_sizes(book: InputBook) -> dict[str, int]:
    sizes: dict[str, int] = {}
    for kept in book.kept.values():
        if kept.result:
            sizes[kept.client_id] = sizes.get(kept.client_id, 0) + len(kept.result)
    return sizes


@settings(max_examples=examples(300), deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["submit", "end", "release", "again", "gone"]),
                          st.integers(0, 5), st.integers(0, 2), st.integers(0, 300)),
                max_size=60))
def test_the_bytes_kept_by_each_client_are_what_its_kept_results_hold(
        steps: list[tuple[str, int, int, int]]) -> None:
    """The master's budget per key counts the results kept here by client; whatever order
    tasks end, futures go and clients leave in, the count is the kept results' own size (a
    count that drifted would refuse a key for ever, or never)."""
    book = InputBook()
    for action, task, client, size in steps:
        task_id, client_id = f"t{task}", f"c{client}"
        if action == "submit":
            book.submitted(task_id, client_id, [f"t{(task + 1) % 6}"] if size % 2 else ())
        elif action == "end":
            book.ended(task_id, "done" if size % 3 else "erred", b"r" * size)
        elif action == "release":
            book.released(client_id, [task_id])
        elif action == "again":
            book.referenced_again(task_id, client_id)
        else:
            book.client_gone(client_id)
        assert book.kept_bytes == kept_sizes(book)
        assert book.kept_total == sum(book.kept_bytes.values())
        assert all(kept.client_id for kept in book.kept.values())  # each charged to a client


def test_a_result_kept_for_a_task_after_its_future_went_is_still_its_clients() -> None:
    """Its client let go of the future, but a task that names it has not run: the result is
    kept for that task, and counts in its client's bytes (it counted in nobody's, and one
    key could make the master hold any number of them)."""
    book = InputBook()
    book.submitted("a", "c1", ())
    book.submitted("b", "c1", ["a"])
    assert book.released("c1", ["a"]) == []  # b still needs it
    book.ended("a", "done", b"r" * 100)
    assert book.kept["a"].client_id == "c1" and book.kept_bytes == {"c1": 100}
    assert sorted(book.ended("b", "done")) == ["a"]  # b ended (its own future held: kept)
    assert book.kept_bytes == {} and not book.user_client
