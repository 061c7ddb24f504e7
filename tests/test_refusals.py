"""How refusals of what a sender (a worker, task code) sends are counted: logged 1, 2, 4, 8...
times (``logs.Refusals``), and a sender past a bound within a window told once
(``logs.RefusalLimit``: the node ends such a worker). Task code sends as fast as it likes, so a
count that logs too often writes the log for it, and one that never passes lets it keep a node
busy."""

from __future__ import annotations

from actors.logs import RefusalLimit, Refusals


def test_a_senders_refusals_are_told_at_each_power_of_two_with_their_count() -> None:
    refusals = Refusals()
    told = [n for n in (refusals.count("w1") for _ in range(1_000)) if n]
    assert told == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert refusals.count("w2") == 1  # each sender its own count
    refusals.forget("w1")
    assert refusals.count("w1") == 1  # a worker gone: its id starts afresh
    refusals.forget("never refused")  # (a worker that exits having sent nothing wrong)


def test_past_its_room_the_sender_heard_from_longest_ago_is_forgotten() -> None:
    refusals = Refusals()
    refusals.MAX_SENDERS = 3
    for sender in ("a", "b", "c"):
        refusals.count(sender)
    refusals.count("a")  # a second refusal: "a" is now the most recent
    refusals.count("d")  # one too many: "b" goes, not "a"
    assert list(refusals.counts) == ["c", "a", "d"]
    assert refusals.count("a") == 0 and refusals.count("a") == 4  # its count kept


def test_a_sender_passes_the_limit_once_at_its_first_refusal_past_it_within_the_window() -> None:
    limit = RefusalLimit(3, 10.0)
    assert [limit.passed("w", 0.0) for _ in range(4)] == [False, False, False, True]
    # counted afresh after passing: three more before it passes again
    assert [limit.passed("w", 1.0) for _ in range(4)] == [False, False, False, True]
    assert not limit.passed("other", 1.0)  # each sender its own window


def test_refusals_spread_wider_than_the_window_never_pass() -> None:
    limit = RefusalLimit(3, 10.0)
    times = [0.0, 5.0, 10.0, 10.5, 20.6, 21.0, 25.0, 31.0]
    # 0, 5, 10: three within 10 s; 10.5 is 10.5 s after the window began: a new one starts
    assert not any(limit.passed("w", t) for t in times)
    # four within one window pass
    assert [limit.passed("x", t) for t in (40.0, 41.0, 49.0, 50.0)] == [False, False, False, True]


def test_a_forgotten_or_evicted_sender_starts_afresh() -> None:
    limit = RefusalLimit(2, 10.0)
    limit.passed("w", 0.0)
    limit.passed("w", 0.0)
    limit.forget("w")
    limit.forget("never refused")
    assert not limit.passed("w", 0.0) and not limit.passed("w", 0.0)
    assert limit.passed("w", 0.0)
    limit.MAX_SENDERS = 2
    limit.passed("a", 1.0)
    limit.passed("a", 1.0)
    limit.passed("b", 1.0)
    limit.passed("c", 1.0)  # "a" heard from longest ago: forgotten
    assert list(limit.windows) == ["b", "c"]
    assert not limit.passed("a", 1.0) and not limit.passed("a", 1.0)
