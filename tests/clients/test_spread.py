"""`coffer.clients.workers`: the worker a health check names, and which of a client's
connections to open again so that a server's workers share them evenly."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coffer.clients.workers import Worker, crowded, sole_worker


@pytest.mark.parametrize(
    ("value", "worker"),
    [
        ("1/1", sole_worker),
        ("2/2", Worker(2, 2)),
        ("12/64", Worker(12, 64)),
        ("0/2", None),
        ("3/2", None),
        ("2", None),
        ("1/2 ", None),
        ("01/2", None),
        ("a/b", None),
        ("", None),
    ],
)
def test_parse(value: str, worker: Worker | None) -> None:
    assert Worker.parse(value) == worker
    if worker is not None:
        assert worker.metadata() == value


def test_a_worker_is_one_of_its_count() -> None:
    with pytest.raises(ValueError, match="must be 1 to 2"):
        Worker(3, 2)


@pytest.mark.parametrize(
    ("numbers", "count", "again"),
    [
        ([1, 1, 1, 2], 2, [2]),
        ([1, 2, 1, 2], 2, []),
        ([1, 1, 1, 1], 2, [2, 3]),
        ([1, 1, 2, 2], 3, [3]),
        ([1, 1], 4, [1]),
        ([1, 1, 1], 1, []),
    ],
)
def test_crowded(numbers: list[int], count: int, again: list[int]) -> None:
    assert crowded([Worker(number, count) for number in numbers]) == again


def test_nothing_is_opened_again_when_a_worker_is_unknown() -> None:
    # A connection whose check failed, or a server that does not say, or workers of servers
    # of different sizes (a server restarted with other --workers while it was asked).
    assert crowded([Worker(1, 2), Worker(1, 2), None]) == []
    assert crowded([Worker(1, 2), Worker(1, 2), Worker(1, 3)]) == []
    assert crowded([]) == []


@given(
    st.integers(1, 8).flatmap(
        lambda count: st.lists(st.integers(1, count), min_size=1, max_size=24).map(
            lambda numbers: (count, numbers)
        )
    )
)
def test_what_is_kept_can_be_completed_evenly(case: tuple[int, list[int]]) -> None:
    """The connections kept hold no worker past its share, so that the ones opened again can
    land to make the spread even; and an even spread is kept whole."""
    count, numbers = case
    workers = [Worker(number, count) for number in numbers]
    again = crowded(workers)
    kept = Counter(worker for position, worker in enumerate(workers) if position not in again)
    share, extras = divmod(len(workers), count)
    assert all(held <= share + 1 for held in kept.values())
    assert sum(held == share + 1 for held in kept.values()) <= extras
    held = Counter(workers)
    even = all(
        share <= held[Worker(number, count)] <= share + (1 if extras else 0)
        for number in range(1, count + 1)
    )
    even = (
        even
        and sum(held[Worker(number, count)] == share + 1 for number in range(1, count + 1))
        == extras
    )
    assert (again == []) == even
