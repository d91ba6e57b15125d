"""SeenCache: bounded de-duplication of redelivered readings."""

from __future__ import annotations

import pytest

from factorywatch.detector.dedup import AnswerCache, SeenCache


def test_first_sighting_is_new_and_second_is_a_duplicate() -> None:
    """A key is reported unseen the first time and seen on redelivery."""
    cache = SeenCache(10)
    assert cache.seen(("mill-01", 1)) is False
    assert cache.seen(("mill-01", 1)) is True
    assert len(cache) == 1


def test_keys_are_distinguished_by_machine_and_sequence() -> None:
    """The same sequence number from two machines is two different messages."""
    cache = SeenCache(10)
    assert cache.seen(("mill-01", 7)) is False
    assert cache.seen(("mill-02", 7)) is False
    assert cache.seen(("mill-01", 8)) is False
    assert cache.seen(("mill-02", 7)) is True


def test_capacity_bounds_the_cache_and_evicts_the_oldest() -> None:
    """Beyond capacity the oldest key is forgotten, so it counts as new again."""
    cache = SeenCache(3)
    for key in range(5):
        assert cache.seen(key) is False
        assert len(cache) <= 3
    assert len(cache) == 3
    assert cache.seen(4) is True
    assert cache.seen(2) is True
    assert cache.seen(0) is False  # evicted long ago, remembered again now


def test_a_repeat_refreshes_the_key() -> None:
    """Seeing a key again makes it the most recent, so the other keys are evicted first."""
    cache = SeenCache(2)
    assert cache.seen("a") is False
    assert cache.seen("b") is False
    assert cache.seen("a") is True  # "a" is now newer than "b"
    assert cache.seen("c") is False  # evicts "b"
    assert cache.seen("a") is True
    assert cache.seen("b") is False


def test_capacity_zero_disables_deduplication() -> None:
    """With capacity 0 nothing is remembered and every message is new."""
    cache = SeenCache(0)
    for _ in range(3):
        assert cache.seen(("mill-01", 1)) is False
    assert len(cache) == 0


@pytest.mark.parametrize("capacity", [1, 2, 100])
def test_many_distinct_keys_never_exceed_capacity(capacity: int) -> None:
    """A long stream of distinct keys keeps the cache at exactly ``capacity`` entries."""
    cache = SeenCache(capacity)
    for key in range(1000):
        cache.seen(key)
    assert len(cache) == capacity
    assert all(cache.seen(k) for k in range(1000 - capacity, 1000))


def test_answer_cache_keeps_the_last_verdicts_and_forgets_the_oldest() -> None:
    """The cache returns the exact verdict bytes by id, bounded by its capacity."""
    answers = AnswerCache(2)
    answers.put("m1:1", "t/v", b"one")
    answers.put("m1:2", "t/v", b"two")
    answers.put("m1:3", "t/v", b"three")
    assert answers.get("m1:1") is None
    assert answers.get("m1:2") == ("t/v", b"two")
    answers.forget("m1:2")
    assert answers.get("m1:2") is None
    assert len(answers) == 1
    assert AnswerCache(0).get("x") is None
