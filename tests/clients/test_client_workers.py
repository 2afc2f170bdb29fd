"""`coffer.clients.workers`: the worker a health check names, and what a client does with
the workers its connections reached: which to open again, and how they group."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coffer.clients.workers import Worker, instance_id_bytes, new_instance, spread, workers_max

instance = new_instance()


def test_an_instance_is_random_hex() -> None:
    assert len(instance) == 2 * instance_id_bytes
    assert int(instance, 16) >= 0
    assert new_instance() != instance


@pytest.mark.parametrize(
    ("value", "worker"),
    [
        (f"1/1@{instance}", Worker(1, 1, instance)),
        (f"2/2@{instance}", Worker(2, 2, instance)),
        (f"12/{workers_max}@{instance}", Worker(12, workers_max, instance)),
        (f"1/{workers_max + 1}@{instance}", None),
        (f"0/2@{instance}", None),
        (f"3/2@{instance}", None),
        (f"01/2@{instance}", None),
        (f"1/2@{instance[:-1]}", None),
        (f"1/2@{instance.upper()}", None),
        (f"1/2@{instance} ", None),
        ("1/2", None),
        ("", None),
    ],
)
def test_parse(value: str, worker: Worker | None) -> None:
    assert Worker.parse(value) == worker
    if worker is not None:
        assert worker.metadata() == value


@pytest.mark.parametrize(
    ("number", "count"), [(0, 1), (3, 2), (1, workers_max + 1), (True, 1), (1.0, 2)]
)
def test_a_worker_is_one_of_its_count(number: int, count: int) -> None:
    with pytest.raises(ValueError, match="must be 1 to"):
        Worker(number, count, instance)


@pytest.mark.parametrize("bad", ["", instance[:-1], instance.upper(), f"{instance}0", 7])
def test_an_instance_is_what_the_metadata_carries(bad: str) -> None:
    with pytest.raises(ValueError, match="hex digits"):
        Worker(1, 1, bad)


def workers(*numbers: int, count: int = 2) -> list[Worker | None]:
    return [Worker(number, count, instance) for number in numbers]


@pytest.mark.parametrize(
    ("numbers", "count", "again", "groups"),
    [
        # Every worker reached: nothing opened again, however unevenly.
        ([1, 2, 1, 2], 2, [], [[0, 2], [1, 3]]),
        ([1, 1, 1, 2], 2, [], [[0, 1, 2], [3]]),
        # A worker unreached: every connection after a worker's first, opened again.
        ([1, 1, 1, 1], 2, [1, 2, 3], [[0, 1, 2, 3]]),
        ([2, 2, 1, 1], 3, [1, 3], [[2, 3], [0, 1]]),
        # Fewer connections than workers: no two on one.
        ([1, 1], 4, [1], [[0, 1]]),
        ([3, 1], 4, [], [[1], [0]]),
        # A server alone.
        ([1, 1, 1], 1, [], [[0, 1, 2]]),
    ],
)
def test_spread(numbers: list[int], count: int, again: list[int], groups: list[list[int]]) -> None:
    found = spread(workers(*numbers, count=count))
    assert found is not None
    assert (found.again, found.groups) == (again, groups)


def test_nothing_is_known_of_a_connection_whose_worker_is_unknown() -> None:
    # A check that failed, or a server that does not say.
    assert spread([*workers(1, 1), None]) is None
    assert spread([]) is None
    # Workers of two servers (behind a balancing proxy), or of one restarted with another
    # --workers while it was asked.
    assert spread([Worker(1, 2, instance), Worker(2, 2, new_instance())]) is None
    assert spread([Worker(1, 2, instance), Worker(1, 3, instance)]) is None


@given(
    st.integers(1, 8).flatmap(
        lambda count: st.tuples(
            st.just(count), st.lists(st.integers(1, count), min_size=1, max_size=24)
        )
    )
)
def test_what_is_kept_reaches_distinct_workers_and_groups_cover_all(
    case: tuple[int, list[int]],
) -> None:
    """The connections kept reach workers none of which another kept reaches (so that those
    opened again can only add workers), nothing is opened again when every worker is reached
    (or, of fewer connections than workers, when none shares one), and the groups hold every
    connection once, each group one worker's, by worker number."""
    count, numbers = case
    found = spread(workers(*numbers, count=count))
    assert found is not None
    reached = set(numbers)
    covered = len(reached) == min(count, len(numbers))
    assert (found.again == []) == covered
    if found.again:
        kept = [number for position, number in enumerate(numbers) if position not in found.again]
        assert sorted(kept) == sorted(reached)
    assert sorted(position for group in found.groups for position in group) == list(
        range(len(numbers))
    )
    assert [numbers[group[0]] for group in found.groups] == sorted(reached)
    assert all(len({numbers[position] for position in group}) == 1 for group in found.groups)


def test_a_connection_with_a_stream_is_kept_in_its_group() -> None:
    # Worker 2 unreached; of worker 1's connections, the one with a stream (position 2) is
    # kept, the others opened again; with every other one streaming too, none is, and the
    # worker is still unreached.
    found = spread(workers(1, 1, 1), pinned=[2])
    assert found is not None
    assert (found.again, found.groups, found.unreached) == ([0, 1], [[2, 0, 1]], True)
    found = spread(workers(1, 1, 1), pinned=[0, 1, 2])
    assert found is not None
    assert (found.again, found.unreached) == ([], True)
    found = spread(workers(1, 2))
    assert found is not None
    assert (found.again, found.unreached) == ([], False)
