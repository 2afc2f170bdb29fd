"""The batcher over a real ledger: calls coalesce, groups stay whole, the queue is bounded,
single calls pass queued batches, late calls are dropped, whole-batch failures fail every call.

A wallet's row lock, held by the test in a transaction of its own, stands for a long batch:
every batch touching that wallet waits for it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from coffer.core import errors
from coffer.core.ledger import Ledger
from coffer.core.model import (
    Applied,
    Credit,
    NewWallet,
    Operation,
    OwnerKind,
    Rejected,
    Unit,
    UnitKind,
    WalletTransfer,
)
from coffer.core.store.connections import create_pool
from coffer.server.batcher import Batcher, retry_after_ms_max, retry_after_ms_min
from coffer.server.settings import batch_wait_ms_max

from support.database import lock_waiters


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
    batcher = Batcher(ledger.apply, batch_size_max=5, queue_max=5)
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


@contextlib.asynccontextmanager
async def locked(database_url: str, wallet_id: int) -> AsyncIterator[None]:
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute("select id from wallets where id = $1 for update", wallet_id)
            yield
    finally:
        await connection.close()


async def other_wallet(ledger: Ledger, name: str) -> int:
    """A customer wallet that may go below zero: transfers from it need no funding (which,
    as credits, would lock the unit's operator wallet, as the locked batch does)."""
    wallet, _ = await ledger.create_wallet(
        NewWallet(
            idempotency_key=name,
            owner_id=name,
            owner_kind=OwnerKind.customer,
            unit="EUR",
            balance_minimum=-(10**9),
        )
    )
    return wallet.id


def credits(prefix: str, wallet_id: int, count: int) -> list[Operation | Rejected]:
    return [
        Credit(idempotency_key=f"{prefix}{n}", wallet_id=wallet_id, amount=1) for n in range(count)
    ]


async def test_single_calls_pass_queued_batches(
    ledger_and_wallet: tuple[Ledger, int], database_url: str
) -> None:
    ledger, slow = ledger_and_wallet
    source, target = await other_wallet(ledger, "source"), await other_wallet(ledger, "target")
    batcher = Batcher(ledger.apply, batch_size_max=100, queue_max=1000, workers=1)
    try:
        async with locked(database_url, slow):
            # A batch call applying (waiting for the lock), two more queued behind it.
            batch_calls = [
                asyncio.ensure_future(batcher.submit_all(credits(f"b{n}-", slow, 100)))
                for n in range(3)
            ]
            await lock_waiters(database_url)
            assert batcher.queued == 200
            # Single calls go by their own lane: applied while the batches wait.
            transfers = [
                WalletTransfer(
                    idempotency_key=f"s{n}",
                    source_wallet_id=source,
                    target_wallet_id=target,
                    amount=1,
                )
                for n in range(50)
            ]
            async with asyncio.timeout(5):
                applied = await asyncio.gather(*map(batcher.submit, transfers))
            assert len(applied) == 50
            assert not any(call.done() for call in batch_calls)
        for call in batch_calls:
            assert len(await call) == 100
        assert (await ledger.get_wallet(slow)).balance.posted == 300
        assert (await ledger.get_wallet(target)).balance.posted == 50
    finally:
        await batcher.close()


async def test_a_small_batch_lingers_for_more(ledger_and_wallet: tuple[Ledger, int]) -> None:
    ledger, wallet = ledger_and_wallet
    batcher = Batcher(ledger.apply, batch_wait_s=batch_wait_ms_max / 1000)
    try:
        [first, second] = credits("s", wallet, 2)
        early = asyncio.ensure_future(batcher.submit(first))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        assert batcher.queued == 1  # lingering, not applied alone
        late = asyncio.ensure_future(batcher.submit(second))  # type: ignore[arg-type]
        await asyncio.gather(early, late)
        assert batcher.batches_applied == 1
    finally:
        await batcher.close()


async def test_a_lingering_batch_call_does_not_hold_up_single_calls(
    ledger_and_wallet: tuple[Ledger, int],
) -> None:
    ledger, wallet = ledger_and_wallet
    batch_wait_s = batch_wait_ms_max / 1000
    batcher = Batcher(ledger.apply, batch_size_max=5, batch_wait_s=batch_wait_s)
    try:
        batch_call = asyncio.ensure_future(batcher.submit_all(credits("b", wallet, 3)))
        await asyncio.sleep(0)  # queued: its lane lingers for more
        # A full batch of single calls is taken at once, while the batch call still lingers.
        singles = [
            asyncio.ensure_future(batcher.submit(operation))  # type: ignore[arg-type]
            for operation in credits("s", wallet, 5)
        ]
        await asyncio.sleep(0)
        assert batcher.queued == 8
        async with asyncio.timeout(batch_wait_s / 2):
            while batcher.queued != 3:
                await asyncio.sleep(0.001)
        assert len(await asyncio.gather(*singles)) == 5
        assert not batch_call.done()
        assert len(await batch_call) == 3
        assert (await ledger.get_wallet(wallet)).balance.posted == 8
    finally:
        await batcher.close()


async def test_batch_calls_leave_room_for_single_calls(
    ledger_and_wallet: tuple[Ledger, int], database_url: str
) -> None:
    ledger, slow = ledger_and_wallet
    batcher = Batcher(ledger.apply, batch_size_max=10, queue_max=30, workers=1)
    try:
        async with locked(database_url, slow):
            applying = asyncio.ensure_future(batcher.submit_all(credits("a", slow, 10)))
            await lock_waiters(database_url)  # taken into a batch: waits for the lock
            queued = asyncio.ensure_future(batcher.submit_all(credits("b", slow, 10)))
            await asyncio.sleep(0)
            assert batcher.queued == 10
            # Batch calls may fill the queue up to queue_max - batch_size_max = 20.
            with pytest.raises(errors.Overloaded) as raised:
                await batcher.submit_all(credits("c", slow, 11))
            assert retry_after_ms_min <= raised.value.retry_after_ms <= retry_after_ms_max
            # Single calls may fill it whole: 10 applying (waiting for the lock), 20 queued.
            operations = credits("s", slow, 30)
            singles = [
                asyncio.ensure_future(batcher.submit(operation))  # type: ignore[arg-type]
                for operation in operations[:10]
            ]
            await lock_waiters(database_url, 2)  # taken into a batch: waits for a lock
            assert batcher.queued == 10
            singles += [
                asyncio.ensure_future(batcher.submit(operation))  # type: ignore[arg-type]
                for operation in operations[10:]
            ]
            await asyncio.sleep(0)
            assert batcher.queued == 30
            with pytest.raises(errors.Overloaded):
                await batcher.submit(Credit(idempotency_key="s-over", wallet_id=slow, amount=1))
        await asyncio.gather(applying, queued, *singles)
        assert (await ledger.get_wallet(slow)).balance.posted == 50
    finally:
        await batcher.close()


async def test_calls_whose_deadline_passed_are_not_applied(
    ledger_and_wallet: tuple[Ledger, int], database_url: str
) -> None:
    ledger, wallet = ledger_and_wallet
    batcher = Batcher(ledger.apply)
    try:
        async with locked(database_url, wallet):
            # Both applying, waiting for the lock (the batch call first: none starts while
            # single calls are being applied).
            first_batch = asyncio.ensure_future(batcher.submit_all(credits("first-", wallet, 2)))
            await lock_waiters(database_url)
            first = asyncio.ensure_future(
                batcher.submit(Credit(idempotency_key="first", wallet_id=wallet, amount=1))
            )
            await lock_waiters(database_url, 2)
            late = [
                asyncio.ensure_future(
                    batcher.submit(
                        Credit(idempotency_key=f"late{n}", wallet_id=wallet, amount=10), 0.05
                    )
                )
                for n in range(3)
            ]
            late_batch = asyncio.ensure_future(
                batcher.submit_all(credits("late-batch", wallet, 5), 0.05)
            )
            gone = asyncio.ensure_future(
                batcher.submit(Credit(idempotency_key="gone", wallet_id=wallet, amount=100))
            )
            await asyncio.sleep(0.01)
            assert batcher.queued == 9
            # A caller that goes away frees its place at once.
            gone.cancel()
            await asyncio.sleep(0)
            assert batcher.queued == 8
            await asyncio.sleep(0.1)  # the deadlines pass while the lock is held
        assert (await first).transfer.amount == 1
        assert len(await first_batch) == 2
        for call in (*late, late_batch):
            with pytest.raises(errors.DeadlineExceeded):
                await call
        assert batcher.operations_expired == 8
        assert batcher.queued == 0
        assert (await ledger.get_wallet(wallet)).balance.posted == 3
        assert errors.DeadlineExceeded.retryable
    finally:
        await batcher.close()


async def test_an_unknown_failure_fails_the_whole_batch_as_internal(
    ledger_and_wallet: tuple[Ledger, int], database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    ledger, wallet = ledger_and_wallet
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute("alter table transfers add constraint odd check (amount <> 13)")
    finally:
        await connection.close()
    batcher = Batcher(ledger.apply)
    try:
        async with locked(database_url, wallet):
            first = asyncio.ensure_future(
                batcher.submit(Credit(idempotency_key="first", wallet_id=wallet, amount=1))
            )
            await lock_waiters(database_url)
            # Coalesced into the next batch, one of them trips the constraint.
            calls = [
                asyncio.ensure_future(
                    batcher.submit(
                        Credit(
                            idempotency_key=f"c{amount}",
                            wallet_id=wallet,
                            amount=amount,
                            caller="shop",
                        )
                    )
                )
                for amount in (12, 13, 14)
            ]
            await asyncio.sleep(0)
        await first
        with caplog.at_level(logging.ERROR, logger="coffer.server.batcher"):
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
        assert [type(outcome) for outcome in outcomes] == [errors.Internal] * 3
        assert not errors.Internal.retryable
        [record] = caplog.records
        assert record.getMessage() == (
            "a batch of 3 operations in 3 calls failed (first caller 'shop')"
        )
        assert isinstance(record.exc_info and record.exc_info[1], asyncpg.CheckViolationError)
        assert (await ledger.get_wallet(wallet)).balance.posted == 1
    finally:
        await batcher.close()


async def test_batch_calls_take_turns_with_a_stream_of_single_calls(
    ledger_and_wallet: tuple[Ledger, int],
) -> None:
    ledger, wallet = ledger_and_wallet
    source, target = await other_wallet(ledger, "source"), await other_wallet(ledger, "target")
    batcher = Batcher(ledger.apply)
    singles: list[asyncio.Future[Applied]] = []
    streaming = True

    async def stream() -> None:
        # Single calls arriving faster than their batches return: their lane is never idle.
        number = 0
        while streaming:
            number += 1
            transfer = WalletTransfer(
                idempotency_key=f"s{number}",
                source_wallet_id=source,
                target_wallet_id=target,
                amount=1,
            )
            singles.append(asyncio.ensure_future(batcher.submit(transfer)))
            await asyncio.sleep(0)

    streamer = asyncio.create_task(stream())
    try:
        await asyncio.sleep(0.05)
        # Batch calls are not starved: they get every other turn.
        async with asyncio.timeout(5):
            for n in range(3):
                assert len(await batcher.submit_all(credits(f"b{n}-", wallet, 10))) == 10
    finally:
        streaming = False
        await streamer
        await asyncio.gather(*singles)
        await batcher.close()
    assert (await ledger.get_wallet(wallet)).balance.posted == 30
    assert (await ledger.get_wallet(target)).balance.posted == len(singles)
