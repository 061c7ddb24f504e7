"""The master's book of results kept for later tasks' arguments (a plain class, fed directly)."""

from __future__ import annotations

from hypothesis import example, given, settings
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
    failed = book.check("t", "c1", "bad", None)
    assert isinstance(failed, InputFailed)
    assert (failed.task_id, failed.input_id, failed.state) == ("t", "bad", "erred")
    for input_id, refused in (("bad", book.check("t", "c2", "bad", None)),  # another client's
                              ("never", book.check("t", "c1", "never", None)),  # or released
                              ("t", book.check("t", "c1", "t", None)),  # itself
                              ("running", book.check("t", "c1", "running", "c2"))):
        assert isinstance(refused, InputLost)
        assert (refused.task_id, refused.input_id) == ("t", input_id)
        assert str(refused).startswith(f"task t: its input {input_id} is gone: ")
    assert "own input" in book.check("t", "c1", "t", None).reason  # type: ignore[union-attr]
    assert "released" in book.check("t", "c1", "never", None).reason  # type: ignore[union-attr]
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


def test_what_a_client_holds_after_a_reconnect_is_all_that_stays_kept_for_it() -> None:
    book = InputBook()
    for task_id, client_id in (("a", "c1"), ("b", "c1"), ("x", "c1"), ("o", "c2")):
        book.submitted(task_id, client_id, ())
        book.ended(task_id, "done", task_id.encode())
    book.referenced_again("x", "c1")  # two futures of it, however many
    book.submitted("t", "c1", ["b"])  # b is an input of a task not run yet
    assert sorted(book.holding("c1", {"a", "t"})) == ["x"]  # b stays while t needs it
    assert sorted(book.kept) == ["a", "b", "o"]  # another client's is not this one's to say
    assert book.check("u", "c1", "x", None) is not None  # released: no later task takes it
    assert sorted(book.ended("t", "done", b"t")) == ["b"]  # t ran: b goes


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


@settings(max_examples=examples(400), deadline=None)
# Cases too particular for random steps to meet often, each once a mutant no test noticed:
@example([("submit", 1, 0, []), ("submit", 2, 0, [1]), ("submit", 4, 0, [1]),  # two users
          ("end", 1, 0, []), ("release", 1, 0, []), ("end", 2, 0, []), ("end", 4, 0, [])])
@example([("submit", 1, 0, []), ("submit", 2, 0, []), ("submit", 4, 0, [1, 2]),  # two inputs,
          ("submit", 3, 0, [1]), ("end", 1, 0, []), ("end", 2, 0, []),  # the first still used
          ("release", 1, 0, [2]), ("end", 4, 0, [])])
@example([("submit", 1, 0, []), ("submit", 2, 1, []), ("end", 1, 0, []),  # three futures; a
          ("again", 1, 0, []), ("again", 1, 0, []), ("release", 2, 0, [1]),  # release list
          ("release", 1, 0, []), ("release", 1, 0, [])])  # with another client's id first
@example([("submit", 1, 0, []), ("submit", 2, 0, [1]), ("end", 1, 0, []),  # a future again
          ("release", 1, 0, []), ("again", 1, 0, []), ("end", 2, 0, []),  # after its release
          ("release", 1, 0, [])])
@example([("submit", 1, 0, []), ("submit", 2, 0, [1]), ("end", 1, 0, []),  # the client left
          ("again", 1, 0, []), ("gone", 0, 0, []), ("again", 1, 0, []),  # with two futures
          ("release", 1, 0, []), ("end", 2, 0, [])])
@example([("submit", 1, 0, []), ("submit", 2, 0, []), ("end", 1, 0, []),  # one of a release
          ("again", 1, 0, []), ("release", 1, 0, [2])])  # list still held, the next let go
@given(st.lists(st.tuples(st.sampled_from(["submit", "end", "release", "again", "gone"]),
                          st.integers(0, 4), st.integers(0, 1),
                          st.lists(st.integers(0, 4), max_size=3)),
                max_size=50))
def test_a_result_is_kept_exactly_while_a_future_or_an_unfinished_task_needs_it(
        steps: list[tuple[str, int, int, list[int]]]) -> None:
    """Against a model: a finished task's result is kept while its client holds a future of it
    or a task naming it has not ended, and goes the moment neither is true (dropped too early,
    a later task fails with InputLost; too late, the master and its nodes hold it for ever).
    What each call returns as unused is exactly what stopped being needed; a submission's
    inputs are refused exactly when the model says they are gone or failed."""
    book = InputBook()
    owner: dict[str, str] = {}  # task -> its client
    inputs: dict[str, list[str]] = {}  # unfinished task -> the inputs it names
    state: dict[str, str] = {}  # finished task -> "done" or "erred"
    futures: dict[str, int] = {}  # task -> how many futures of it its client holds

    def users(task_id: str) -> int:
        return sum(task_id in named for named in inputs.values())

    def needed(task_id: str) -> bool:
        return futures.get(task_id, 0) > 0 or users(task_id) > 0

    for action, task, client, others in steps:
        task_id, client_id = f"t{task}", f"c{client}"
        named = [f"t{o}" for o in others]
        before = {t for t in owner if needed(t)}
        returned: list[str] | None = None
        if action == "submit":
            if task_id in owner:
                continue
            refused = [book.check(task_id, client_id, n, owner[n] if n in inputs else None)
                       for n in named]
            ok = [n != task_id and owner.get(n) == client_id
                  and (n in inputs or (needed(n) and state.get(n) == "done")) for n in named]
            assert [r is None for r in refused] == ok, (named, refused)
            if not all(ok):
                continue
            book.submitted(task_id, client_id, named)
            owner[task_id], inputs[task_id], futures[task_id] = client_id, named, 1
        elif action == "end":
            if task_id not in inputs:
                continue
            result = f"r{task_id}".encode()
            outcome = "done" if task % 3 else "erred"
            returned = book.ended(task_id, outcome, result if outcome == "done" else None)
            del inputs[task_id]
            state[task_id] = outcome
        elif action == "release":
            ids = [task_id, *named]
            returned = book.released(client_id, ids)
            for t in ids:
                if owner.get(t) == client_id and futures.get(t, 0) > 0:
                    futures[t] -= 1
        elif action == "again":
            expect = (task_id in state and needed(task_id) and owner[task_id] == client_id)
            assert book.referenced_again(task_id, client_id) == expect
            if expect:
                futures[task_id] = futures.get(task_id, 0) + 1
        else:
            book.client_gone(client_id)
            for t, c in owner.items():
                if c == client_id:
                    futures[t] = 0
        after = {t for t in owner if needed(t)}
        if returned is not None:
            gone = before - after
            if action == "end" and task_id not in after:
                gone.add(task_id)
            assert sorted(returned) == sorted(gone), (action, task_id, returned, gone)
        for t, outcome in state.items():
            assert (t in book.kept) == (t in after), (t, book.kept.get(t))
            if t in book.kept:
                assert book.kept[t].state == outcome and book.kept[t].client_id == owner[t]
                assert book.kept[t].result == (f"r{t}".encode() if outcome == "done" else None)
        assert {t for t in owner if book.in_use(t)} == after
    tables = {k: v for k, v in vars(book).items() if isinstance(v, dict)}
    book.compact()  # (after a backlog drained) the same content in fresh tables
    assert {k: v for k, v in vars(book).items() if isinstance(v, dict)} == tables


def test_a_released_future_takes_its_kept_result_out_of_its_clients_bytes() -> None:
    """The usual end of a result (most of a map's): its task ended, its client let its future
    go; nothing names it any more, so it goes, and its bytes with it."""
    book = InputBook()
    book.submitted("a", "c1", ())
    assert book.ended("a", "done", b"r" * 100) == []  # (its future still held)
    assert book.kept_bytes == {"c1": 100} and book.kept_total == 100
    assert book.released("c1", ["a"]) == ["a"]
    assert "a" not in book.kept and book.kept_bytes == {} and book.kept_total == 0
