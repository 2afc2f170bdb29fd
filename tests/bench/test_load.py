"""The credits load gives each wallet back, turn after turn of its ring, what it takes: each
package (a credit) is what the wallet's debits take until its next one, so that wallets do not
gather grants however long the bench runs (a wallet drawn once in a turn only spends)."""

from __future__ import annotations

import random

import pytest

from coffer.bench.load import BatchWorkload, Fixture, credits_plan


@pytest.mark.parametrize("skew", [0.0, 1.0])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_each_package_is_what_the_debits_after_it_take(skew: float, seed: int) -> None:
    customers = list(range(100, 600))
    plan = credits_plan(customers, 10_000, skew, random.Random(seed))
    assert len(plan) == 10_000
    assert all(amount > 0 for _, amount, _ in plan)
    turns: dict[int, list[tuple[int, bool]]] = {}
    for wallet_id, amount, credit in plan:
        turns.setdefault(wallet_id, []).append((amount, credit))
    packages = 0
    for turn in turns.values():
        if not any(credit for _, credit in turn):
            # Drawn once: it only spends.
            assert len(turn) == 1, turn
            continue
        # Read round the circle from each package: the debits until the next one.
        for start, (amount, credit) in enumerate(turn):
            if not credit:
                continue
            packages += 1
            taken = 0
            for offset in range(1, len(turn) + 1):
                following, is_credit = turn[(start + offset) % len(turn)]
                if is_credit:
                    break
                taken += following
            assert amount == taken
        assert sum(amount if credit else -amount for amount, credit in turn) == 0
    # About a sixth of the load buys packages.
    assert 0.12 < packages / len(plan) < 0.2


def test_the_credits_ring_is_the_plan() -> None:
    """The credits workload's ring of batches gives each wallet back what it takes."""
    customers = list(range(100, 400))
    workload = BatchWorkload(
        "credits", Fixture("run", customers, [], []), 100, 0.0, random.Random(1)
    )
    net: dict[int, int] = {}
    kinds = set()
    for batch in workload.ring:
        for operation in batch.operations:
            kind = operation.WhichOneof("operation")
            kinds.add(kind)
            inner = getattr(operation, kind)
            change = inner.amount if kind == "credit" else -inner.amount
            net[inner.wallet_id] = net.get(inner.wallet_id, 0) + change
    assert kinds == {"credit", "debit"}
    assert set(net) == set(customers)
    assert set(net.values()) == {0}
