"""The core's check of the books (`coffer.core.audit`) and bulk preload (`coffer.core.preload`)
against a real PostgreSQL: the check passes after every kind of operation and finds each kind
of damage; a preload keeps the books balanced and refuses what the ledger would refuse."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import pytest
import pytest_asyncio

from coffer.core import errors
from coffer.core.audit import Audit, check_books
from coffer.core.ledger import Ledger
from coffer.core.model import (
    Applied,
    CaptureHold,
    Credit,
    Debit,
    Deposit,
    NewWallet,
    Operation,
    OwnerKind,
    Payment,
    PlaceHold,
    ReleaseHold,
    TransferKind,
    Unit,
    UnitKind,
    Void,
    WalletTransfer,
    Withdrawal,
    balance_max,
    idempotency_key_length_max,
    key_digest,
)
from coffer.core.preload import Keyed, preload_transfers
from coffer.core.store.connections import create_pool

_keys = itertools.count(1)


def _key() -> str:
    return f"audit-{next(_keys)}"


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    pool = await create_pool(database_url, size_max=2)
    try:
        ledger = Ledger(pool)
        await ledger.create_unit(Unit(code="EUR", kind=UnitKind.currency, name="Euro", scale=2))
        await ledger.create_unit(Unit(code="seat", kind=UnitKind.credit, name="Seat"))
        yield ledger
    finally:
        await pool.close()


async def _wallet(
    ledger: Ledger, kind: OwnerKind = OwnerKind.customer, unit: str = "EUR", minimum: int = 0
) -> int:
    created, _ = await ledger.create_wallet(
        NewWallet(
            idempotency_key=_key(),
            owner_id=f"owner-{next(_keys)}",
            owner_kind=kind,
            unit=unit,
            balance_minimum=minimum,
        )
    )
    return created.id


async def _apply(ledger: Ledger, operation: Operation) -> Applied:
    [outcome] = await ledger.apply([operation])
    assert isinstance(outcome, Applied), outcome
    return outcome


async def _audit(ledger: Ledger) -> Audit:
    async with ledger.pool.acquire() as connection:
        return await check_books(connection)


async def _funded_customers(ledger: Ledger, count: int, amount: int) -> list[int]:
    customers = [await _wallet(ledger) for _ in range(count)]
    for customer in customers:
        await _apply(ledger, Credit(idempotency_key=_key(), wallet_id=customer, amount=amount))
    return customers


async def _every_kind_of_operation(ledger: Ledger) -> None:
    """One operation of each kind, with a hold left open."""
    payer, other = await _funded_customers(ledger, 2, 10_000)
    merchant = await _wallet(ledger, OwnerKind.merchant)
    await _apply(ledger, Debit(idempotency_key=_key(), wallet_id=payer, amount=100))
    moved = await _apply(
        ledger,
        WalletTransfer(
            idempotency_key=_key(), source_wallet_id=payer, target_wallet_id=other, amount=300
        ),
    )
    await _apply(ledger, Void(idempotency_key=_key(), transfer_id=moved.transfer.id))
    await _apply(
        ledger, Deposit(idempotency_key=_key(), wallet_id=payer, amount=500, reference="iban:1")
    )
    await _apply(
        ledger,
        Withdrawal(idempotency_key=_key(), wallet_id=other, amount=200, reference="iban:2"),
    )
    await _apply(
        ledger,
        Payment(
            idempotency_key=_key(), payer_wallet_id=payer, payee_wallet_id=merchant, amount=700
        ),
    )
    captured = await _apply(ledger, PlaceHold(idempotency_key=_key(), wallet_id=payer, amount=40))
    assert captured.hold is not None
    await _apply(ledger, CaptureHold(idempotency_key=_key(), hold_id=captured.hold.id, amount=30))
    released = await _apply(ledger, PlaceHold(idempotency_key=_key(), wallet_id=other, amount=20))
    assert released.hold is not None
    await _apply(ledger, ReleaseHold(idempotency_key=_key(), hold_id=released.hold.id))
    await _apply(
        ledger,
        PlaceHold(idempotency_key=_key(), wallet_id=payer, target_wallet_id=merchant, amount=60),
    )


async def _execute(ledger: Ledger, statement: str, *arguments: object) -> None:
    async with ledger.pool.acquire() as connection:
        await connection.execute(statement, *arguments)


async def test_the_books_balance_after_every_kind_of_operation(ledger: Ledger) -> None:
    empty = await _audit(ledger)
    assert empty.passed and empty.summary() == "passed"
    assert empty.transfers == 0
    await _every_kind_of_operation(ledger)
    audit = await _audit(ledger)
    assert audit.passed, audit.summary()
    # 2 credits, debit, transfer, void, deposit, withdrawal, payment, 3 holds, capture, release.
    assert audit.transfers == 13
    # 3 users' wallets, and the two system wallets of each of the two units.
    assert audit.wallets == 7
    assert all(finding.count == 0 and not finding.examples for finding in audit.findings)


async def test_a_posted_balance_off_its_journal_is_found(ledger: Ledger) -> None:
    await _every_kind_of_operation(ledger)
    customer = await _wallet(ledger)
    await _apply(ledger, Credit(idempotency_key=_key(), wallet_id=customer, amount=50))
    await _execute(ledger, "update wallets set posted = posted + 7 where id = $1", customer)
    audit = await _audit(ledger)
    assert not audit.passed
    assert audit.units.count == 1
    assert (audit.units.examples[0].subject, audit.units.examples[0].stored) == ("EUR", 7)
    assert audit.posted.count == 1
    [mismatch] = audit.posted.examples
    assert (mismatch.subject, mismatch.stored, mismatch.expected) == (customer, 57, 50)
    assert (audit.pending.count, audit.floors.count, audit.holds.count) == (0, 0, 0)
    assert audit.summary().startswith("failed: 1 units whose posted balances do not sum to 0")
    assert f"{customer}: 57, expected 50" in audit.summary()


async def test_a_pending_balance_off_its_holds_is_found(ledger: Ledger) -> None:
    [customer] = await _funded_customers(ledger, 1, 1000)
    placed = await _apply(ledger, PlaceHold(idempotency_key=_key(), wallet_id=customer, amount=90))
    assert placed.hold is not None
    await _execute(ledger, "update wallets set pending = 10 where id = $1", customer)
    audit = await _audit(ledger)
    [mismatch] = audit.pending.examples
    assert (mismatch.subject, mismatch.stored, mismatch.expected) == (customer, 10, 90)
    assert (audit.units.count, audit.posted.count, audit.holds.count) == (0, 0, 0)
    # And an open hold the journal resolved, or does not know, is one too.
    await _execute(ledger, "update wallets set pending = 90 where id = $1", customer)
    await _execute(
        ledger, "update pending_holds set amount = 80 where transfer_id = $1", placed.hold.id
    )
    audit = await _audit(ledger)
    [hold] = audit.holds.examples
    assert (hold.subject, hold.stored, hold.expected) == (placed.hold.id, 80, 90)
    assert audit.pending.count == 1
    await _execute(ledger, "delete from pending_holds where transfer_id = $1", placed.hold.id)
    audit = await _audit(ledger)
    [hold] = audit.holds.examples
    assert (hold.subject, hold.stored, hold.expected) == (placed.hold.id, 0, 90)


async def test_a_balance_below_its_minimum_is_found(ledger: Ledger) -> None:
    customer = await _wallet(ledger, minimum=-100)
    await _apply(ledger, Debit(idempotency_key=_key(), wallet_id=customer, amount=1))
    assert (await _audit(ledger)).floors.count == 0
    # The database refuses such a balance by a constraint; the check does not rely on it.
    await _execute(ledger, "alter table wallets drop constraint untracked_above_minimum")
    await _execute(ledger, "update wallets set balance_minimum = 5 where id = $1", customer)
    audit = await _audit(ledger)
    [mismatch] = audit.floors.examples
    assert (mismatch.subject, mismatch.stored, mismatch.expected) == (customer, -1, 5)


async def test_a_transfer_voided_twice_is_found(ledger: Ledger) -> None:
    [customer] = await _funded_customers(ledger, 1, 1000)
    debit = await _apply(ledger, Debit(idempotency_key=_key(), wallet_id=customer, amount=10))
    await _apply(ledger, Void(idempotency_key=_key(), transfer_id=debit.transfers[0].id))
    assert (await _audit(ledger)).voids.count == 0
    # The database refuses a second void by a unique index; the check does not rely on it.
    await _execute(ledger, "drop index transfers_voids")
    await _execute(
        ledger,
        "insert into transfers (id, operation_id, kind, source_wallet_id, target_wallet_id, amount,"
        " voids_transfer_id, created_at) select nextval('transfers_id'), operation_id, kind,"
        " source_wallet_id, target_wallet_id, 0, voids_transfer_id, created_at from transfers"
        " where voids_transfer_id = $1",
        debit.transfers[0].id,
    )
    audit = await _audit(ledger)
    [mismatch] = audit.voids.examples
    assert (mismatch.subject, mismatch.stored, mismatch.expected) == (debit.transfers[0].id, 2, 1)
    assert audit.posted.count == 0


async def test_examples_are_few_and_every_mismatch_is_counted(ledger: Ledger) -> None:
    customers = [await _wallet(ledger) for _ in range(8)]
    await _execute(ledger, "update wallets set posted = 1 where id = any($1)", customers)
    async with ledger.pool.acquire() as connection:
        audit = await check_books(connection, examples_max=3)
    assert audit.posted.count == 8
    assert [example.subject for example in audit.posted.examples] == customers[:3]
    assert audit.posted.describe().endswith(", …)")


async def test_a_preload_keeps_the_books_balanced(ledger: Ledger) -> None:
    customers = await _funded_customers(ledger, 5, 10_000_000)
    merchant = await _wallet(ledger, OwnerKind.merchant, minimum=-10_000_000)
    wallets = [*customers, merchant]
    before = await _audit(ledger)
    written: list[int] = []
    maintenance = (
        "select relname, last_vacuum, last_analyze from pg_stat_user_tables"
        " where relname in ('transfers', 'wallets') order by relname"
    )
    async with ledger.pool.acquire() as connection:
        maintained_before = await connection.fetch(maintenance)
        await preload_transfers(
            connection, wallets, 3000, spread=timedelta(days=1), progress=written.append
        )
        rows = await connection.fetch(
            "select kind, source_wallet_id, target_wallet_id, amount, created_at, caller,"
            " idempotency_key from transfers where performed_by = 'preload' order by id"
        )
        started = await connection.fetchval("select now()")
        # Vacuumed and analyzed once loaded: autovacuum has nothing of it left to do.
        maintained = await connection.fetch(maintenance)
    assert len(maintained) == 2
    for (_, vacuumed, analyzed), (_, vacuumed_before, analyzed_before) in zip(
        maintained, maintained_before, strict=True
    ):
        assert vacuumed is not None and vacuumed != vacuumed_before
        assert analyzed is not None and analyzed != analyzed_before
    audit = await _audit(ledger)
    assert audit.passed, audit.summary()
    assert audit.transfers == before.transfers + 3000
    assert written == [3000]
    assert len(rows) == 3000
    assert {row["kind"] for row in rows} == {TransferKind.transfer}
    assert all(row["source_wallet_id"] != row["target_wallet_id"] for row in rows)
    assert {row["source_wallet_id"] for row in rows} == set(wallets)
    assert {row["target_wallet_id"] for row in rows} == set(wallets)
    assert all(1 <= row["amount"] <= 10_000 for row in rows)
    assert all(row["caller"] is None and row["idempotency_key"] is None for row in rows)
    # History: spread over the day before, in the order of the ids.
    times = [row["created_at"] for row in rows]
    assert times == sorted(times)
    assert started - timedelta(days=1, minutes=2) < times[0] < times[-1] < started
    # What the ledger reads afterwards agrees.
    balances = [(await ledger.get_wallet(wallet_id)).balance.posted for wallet_id in wallets]
    assert sum(balances) == 5 * 10_000_000


async def test_a_keyed_preload_grows_the_index_of_keys(ledger: Ledger) -> None:
    """Each transfer carries its key and the key's digest, as a request's first transfer does:
    a request with one of those keys meets it, and is refused as a key reused."""
    first, second = await _funded_customers(ledger, 2, 10_000_000)
    keyed = Keyed(caller="default", prefix=f"{_key()}-preload-")
    async with ledger.pool.acquire() as connection:
        await preload_transfers(connection, [first, second], 50, keyed=keyed)
        rows = await connection.fetch(
            "select caller, idempotency_key, key_digest from transfers"
            " where idempotency_key like $1 order by id",
            keyed.prefix + "%",
        )
    assert [row["idempotency_key"] for row in rows] == [
        f"{keyed.prefix}{number}" for number in range(1, 51)
    ]
    assert {row["caller"] for row in rows} == {"default"}
    assert [row["key_digest"] for row in rows] == keyed.digests(1, 50)
    assert all(
        row["key_digest"] == key_digest(row["caller"], row["idempotency_key"]) for row in rows
    )
    assert (await _audit(ledger)).passed
    [outcome] = await ledger.apply(
        [
            WalletTransfer(
                idempotency_key=f"{keyed.prefix}7",
                source_wallet_id=first,
                target_wallet_id=second,
                amount=1,
            )
        ]
    )
    assert isinstance(outcome, errors.IdempotencyKeyReused), outcome
    # The same keys again: refused, and nothing of the chunk stored.
    before = await _audit(ledger)
    async with ledger.pool.acquire() as connection:
        with pytest.raises(errors.InvalidArgument, match="another prefix"):
            await preload_transfers(connection, [first, second], 10, keyed=keyed)
    assert (await _audit(ledger)).transfers == before.transfers


def test_a_keyed_preload_refuses_a_prefix_with_no_room_for_numbers() -> None:
    with pytest.raises(errors.InvalidArgument, match="prefix"):
        Keyed(caller="default", prefix="k" * idempotency_key_length_max)
    with pytest.raises(errors.InvalidArgument, match="caller"):
        Keyed(caller="", prefix="k")


async def test_a_preload_breaking_a_floor_stores_nothing_of_its_chunk(ledger: Ledger) -> None:
    wallets = await _funded_customers(ledger, 3, 10)
    before = await _audit(ledger)
    async with ledger.pool.acquire() as connection:
        with pytest.raises(errors.InsufficientFunds, match="below its minimum"):
            await preload_transfers(connection, wallets, 1000, amount_max=1000)
    audit = await _audit(ledger)
    assert audit.passed, audit.summary()
    assert audit.transfers == before.transfers


async def test_a_preload_past_the_balance_limit_stores_nothing_of_its_chunk(
    ledger: Ledger,
) -> None:
    # Both one below the greatest balance: whichever the chunk leaves richer goes past it.
    full, other = await _wallet(ledger), await _wallet(ledger)
    await _apply(ledger, Credit(idempotency_key=_key(), wallet_id=full, amount=balance_max - 1))
    await _apply(
        ledger,
        Deposit(
            idempotency_key=_key(), wallet_id=other, amount=balance_max - 1, reference="iban:3"
        ),
    )
    before = await _audit(ledger)
    async with ledger.pool.acquire() as connection:
        with pytest.raises(errors.BalanceOverflow):
            await preload_transfers(connection, [full, other], 1000, amount_max=1000)
    audit = await _audit(ledger)
    assert audit.passed, audit.summary()
    assert audit.transfers == before.transfers


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("one wallet", errors.InvalidArgument),
        ("the same wallet twice", errors.InvalidArgument),
        ("an unknown wallet", errors.WalletNotFound),
        ("a system wallet", errors.WalletKindMismatch),
        ("two units", errors.UnitMismatch),
        ("a wallet with nothing to send", errors.InsufficientFunds),
        ("a negative count", errors.InvalidArgument),
    ],
)
async def test_a_preload_refuses_what_the_ledger_would(
    ledger: Ledger, case: str, error: type[errors.CofferError]
) -> None:
    first, second = await _funded_customers(ledger, 2, 1000)
    count = 10
    wallets = {
        "one wallet": [first],
        "the same wallet twice": [first, second, first],
        "an unknown wallet": [first, 10**12],
        "two units": [first, await _wallet(ledger, unit="seat", minimum=-10)],
        "a wallet with nothing to send": [await _wallet(ledger), first],
    }.get(case, [first, second])
    if case == "a system wallet":
        async with ledger.pool.acquire() as connection:
            system = await connection.fetchval(
                "select min(id) from wallets where owner_kind = $1", int(OwnerKind.system)
            )
        wallets = [first, system]
    if case == "a negative count":
        count = -1
    before = await _audit(ledger)
    async with ledger.pool.acquire() as connection:
        with pytest.raises(error):
            await preload_transfers(connection, wallets, count)
    assert (await _audit(ledger)).transfers == before.transfers


async def test_the_check_reads_one_snapshot(ledger: Ledger, database_url: str) -> None:
    """It runs in a transaction of its own, read-only: it refuses a connection already in
    one rather than read outside a snapshot."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            with pytest.raises(asyncpg.InterfaceError):
                await check_books(connection)
        assert (await check_books(connection)).passed
    finally:
        await connection.close()
