"""The batcher over a real ledger: calls coalesce, groups stay whole, the queue is bounded."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from coffer.core import errors
from coffer.core.ledger import Ledger, create_pool
from coffer.core.model import Credit, NewWallet, OwnerKind, Unit, UnitKind, WalletTransfer
from coffer.server.batcher import Batcher


@pytest_asyncio.fixture(loop_scope="session")
async def ledger_and_wallet(database_url: str) -> AsyncIterator[tuple[Ledger, int]]:
    pool = await create_pool(database_url, size_max=4)
    try:
        ledger = Ledger(pool)
        await ledger.create_unit(Unit(code="EUR", kind=UnitKind.currency, name="Euro"))
        wallet, _ = await ledger.create_wallet(
            NewWallet(idempotency_key="w", owner_id="o", owner_kind=OwnerKind.customer, unit="EUR")
        )
        yield ledger, wallet.id
    finally:
        await pool.close()


async def test_concurrent_calls_coalesce(ledger_and_wallet: tuple[Ledger, int]) -> None:
    ledger, wallet = ledger_and_wallet
    batcher = Batcher(ledger.apply, batch_size_max=100)
    try:
        applied = await asyncio.gather(
            *(
                batcher.submit(Credit(idempotency_key=f"c{n}", wallet_id=wallet, amount=1))
                for n in range(200)
            )
        )
        assert len({each.transfer.id for each in applied}) == 200
        # One batch at a time while the queue is short: far fewer batches than calls.
        assert batcher.batches_applied < 20
        assert (await ledger.get_wallet(wallet)).balance.posted == 200
    finally:
        await batcher.close()


async def test_groups_stay_whole_and_in_order(ledger_and_wallet: tuple[Ledger, int]) -> None:
    ledger, wallet = ledger_and_wallet
    batcher = Batcher(ledger.apply, batch_size_max=10)
    try:
        group = [Credit(idempotency_key=f"g{n}", wallet_id=wallet, amount=n + 1) for n in range(25)]
        outcomes = await batcher.submit_all(group)
        assert [outcome.transfer.amount for outcome in outcomes] == list(range(1, 26))  # type: ignore[union-attr]
        assert batcher.batches_applied == 1  # larger than a batch: applied whole, alone
    finally:
        await batcher.close()


async def test_the_queue_is_bounded(ledger_and_wallet: tuple[Ledger, int]) -> None:
    ledger, wallet = ledger_and_wallet
    batcher = Batcher(ledger.apply, queue_max=5)
    try:
        calls = [
            batcher.submit(
                WalletTransfer(
                    idempotency_key=f"t{n}",
                    source_wallet_id=wallet,
                    target_wallet_id=wallet + 99,
                    amount=1,
                )
            )
            for n in range(20)
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        overloaded = [each for each in outcomes if isinstance(each, errors.Overloaded)]
        assert len(overloaded) == 15
        assert all(isinstance(each, errors.WalletNotFound) for each in outcomes[:5])
        assert errors.Overloaded.retryable
    finally:
        await batcher.close()


async def test_closing_applies_what_is_queued_and_refuses_more(
    ledger_and_wallet: tuple[Ledger, int],
) -> None:
    ledger, wallet = ledger_and_wallet
    batcher = Batcher(ledger.apply)
    pending = asyncio.ensure_future(
        batcher.submit(Credit(idempotency_key="last", wallet_id=wallet, amount=7))
    )
    await asyncio.sleep(0)
    await batcher.close()
    assert (await pending).transfer.amount == 7
    with pytest.raises(errors.Unavailable):
        await batcher.submit(Credit(idempotency_key="late", wallet_id=wallet, amount=1))
