"""Grants against a real PostgreSQL: what a batch writes of them, the expiration run (also two at
once, and racing spends), voids that return to the grants drawn, holds, balances at a time to
come, the notice of expiry, and the books' check of every grant."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import pytest_asyncio

from coffer.core import errors
from coffer.core import ledger as ledger_module
from coffer.core.audit import check_books
from coffer.core.ledger import Ledger
from coffer.core.model import (
    Applied,
    CaptureHold,
    Credit,
    Debit,
    DebitMode,
    EventType,
    Grant,
    NewWallet,
    Operation,
    OwnerKind,
    Payment,
    PlaceHold,
    ReleaseHold,
    SystemWallet,
    Transfer,
    TransferFilter,
    TransferKind,
    Unit,
    UnitKind,
    Void,
    Wallet,
    WalletTransfer,
    grant_instant_max,
)
from coffer.core.rules import GrantState, WalletState
from coffer.core.store import reports as reports_module
from coffer.core.store import rows, sql
from coffer.core.store.connections import create_pool

_keys = itertools.count(1)
day = timedelta(days=1)
hour = timedelta(hours=1)


def key() -> str:
    return f"grants-{next(_keys)}"


class Clock:
    """The ledger's clock, which a test may move: `now` plus `shift`."""

    def __init__(self) -> None:
        self.shift = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.shift


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    pool = await create_pool(database_url, size_max=8)
    try:
        ledger = Ledger(pool, clock=Clock())
        await ledger.create_unit(Unit(code="seat", kind=UnitKind.credit, name="seat"))
        yield ledger
    finally:
        await pool.close()


def clock(ledger: Ledger) -> Clock:
    assert isinstance(ledger._clock, Clock)
    return ledger._clock


async def wallet(ledger: Ledger, *, minimum: int = 0) -> Wallet:
    created, _ = await ledger.create_wallet(
        NewWallet(
            idempotency_key=key(),
            owner_id=f"owner-{next(_keys)}",
            owner_kind=OwnerKind.customer,
            unit="seat",
            balance_minimum=minimum,
        )
    )
    return created


async def one(ledger: Ledger, operation: Operation) -> Applied:
    [outcome] = await ledger.apply([operation])
    if isinstance(outcome, errors.CofferError):
        raise outcome
    return outcome


async def credit(
    ledger: Ledger, wallet_id: int, amount: int, expires_in: timedelta | None = None
) -> Applied:
    expires_at = None if expires_in is None else clock(ledger)() + expires_in
    return await one(
        ledger,
        Credit(idempotency_key=key(), wallet_id=wallet_id, amount=amount, expires_at=expires_at),
    )


async def grants(ledger: Ledger, wallet_id: int, *, include_spent: bool = True) -> list[Grant]:
    page = await ledger.list_grants(wallet_id, include_spent=include_spent)
    return page.items


async def expirations(ledger: Ledger, wallet_id: int | None = None) -> list[Transfer]:
    page = await ledger.list_transfers(
        TransferFilter(wallet_id=wallet_id, kinds=(TransferKind.expiration,))
    )
    return page.items


async def books(ledger: Ledger) -> None:
    async with ledger.pool.acquire() as connection:
        audit = await check_books(connection)
    assert audit.passed, audit.summary()


async def test_a_batch_writes_grants_and_what_each_transfer_drew(ledger: Ledger) -> None:
    ann = await wallet(ledger)
    soon = await credit(ledger, ann.id, 10, 5 * day)
    later = await credit(ledger, ann.id, 10, 10 * day)
    await credit(ledger, ann.id, 10)
    [first, second] = await grants(ledger, ann.id)
    assert (first.transfer_id, first.amount, first.remaining) == (soon.transfer.id, 10, 10)
    assert second.transfer_id == later.transfer.id and first.unit == "seat"
    spent = await one(ledger, Debit(idempotency_key=key(), wallet_id=ann.id, amount=15))
    assert [grant.remaining for grant in await grants(ledger, ann.id)] == [0, 5]
    assert [grant.id for grant in await grants(ledger, ann.id, include_spent=False)] == [second.id]
    balance = (await ledger.get_wallet(ann.id)).balance
    assert (balance.posted, balance.available, balance.unspendable) == (15, 15, 0)
    await books(ledger)
    # Its void returns each amount to the grant it came from.
    await one(ledger, Void(idempotency_key=key(), transfer_id=spent.transfer.id))
    assert [grant.remaining for grant in await grants(ledger, ann.id)] == [10, 10]
    await books(ledger)


@pytest.mark.parametrize("read", ["live", "named"])
async def test_a_batch_reads_grants_as_the_rules_see_them(ledger: Ledger, read: str) -> None:
    """The batch builds each grant's state by position: the queries' first columns are the
    state's fields, in their order."""
    ann = await wallet(ledger)
    made = await credit(ledger, ann.id, 10, 5 * day + timedelta(microseconds=7))
    async with ledger.pool.acquire() as connection:
        if read == "live":
            [row] = await connection.fetch(sql.select_live_grants, [ann.id])
        else:
            [row] = await connection.fetch(sql.select_named_grants, [], [made.transfer.id])
    names = [field.name for field in dataclasses.fields(GrantState)]
    assert list(row.keys())[: len(names)] == names
    state = rows.grant_state(row)
    assert (state.wallet_id, state.amount, state.remaining, state.voided) == (ann.id, 10, 10, False)
    # The instants, read as microseconds, to the microsecond.
    [stored] = (await ledger.list_grants(ann.id, page_size=10)).items
    assert (state.valid_from, state.expires_at) == (stored.valid_from, stored.expires_at)
    assert state.valid_from.tzinfo is not None and state.expires_at is not None


async def test_a_batch_reads_wallets_as_the_rules_see_them(ledger: Ledger) -> None:
    """The batch builds each wallet's state by position: the locking query's columns are the
    state's fields, in their order (all but its grants and their order)."""
    ann = await wallet(ledger)
    await credit(ledger, ann.id, 10, 5 * day)
    async with ledger.pool.acquire() as connection, connection.transaction():
        [row] = await connection.fetch(sql.lock_wallets, [ann.id])
    names = [field.name for field in dataclasses.fields(WalletState)]
    assert list(row.keys()) == names[: len(row)]
    assert names[len(row) :] == ["grants", "queue"]
    state = rows.wallet_state(row)
    assert (state.id, state.unit, state.posted, state.tracked) == (ann.id, ann.unit, 10, 10)
    assert (state.owner_id, state.owner_kind) == (ann.owner_id, ann.owner_kind)


async def test_grants_name_only_the_instants_postgresql_keeps(ledger: Ledger) -> None:
    """The first and last instants Python holds are written as -infinity and infinity, which no
    grant could be read back from: refused; the ones just inside are kept and read back."""
    ann = await wallet(ledger)
    for expires_at in (datetime.max.replace(tzinfo=UTC), datetime.min.replace(tzinfo=UTC)):
        with pytest.raises(errors.InvalidArgument) as raised:
            Credit(idempotency_key=key(), wallet_id=ann.id, amount=1, expires_at=expires_at)
        assert raised.value.field == "expires_at"
    with pytest.raises(errors.InvalidArgument):
        Void(idempotency_key=key(), transfer_id=1, expires_at=datetime.max.replace(tzinfo=UTC))
    last = grant_instant_max
    assert last == datetime(9999, 12, 31, 23, 59, 59, 999_998, tzinfo=UTC)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=ann.id, amount=5, expires_at=last))
    # The wallet's next batch reads the grant back, and draws on it.
    await one(ledger, Debit(idempotency_key=key(), wallet_id=ann.id, amount=2))
    [grant] = await grants(ledger, ann.id)
    assert (grant.remaining, grant.expires_at) == (3, last)
    await books(ledger)


def test_the_instants_read_are_kept_within_their_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """The datetimes made from the microseconds read are kept up to `instants_kept_max`; past
    it, the cache starts over and still answers rightly."""
    monkeypatch.setattr(rows, "instants_kept_max", 2)
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    for micros in (0, 1_700_000_000_123_457, 253_402_300_799_999_998, -1, 0):
        state = rows.grant_state((1, 2, 3, 3, micros, None, 0, False))
        assert state.valid_from == epoch + timedelta(microseconds=micros)
        assert state.expires_at is None
        assert len(rows._instants) <= 2


async def test_wallets_without_terms_write_no_grants(ledger: Ledger) -> None:
    ann, ben = await wallet(ledger), await wallet(ledger)
    await credit(ledger, ann.id, 100)
    operations: list[Operation] = [
        Debit(idempotency_key=key(), wallet_id=ann.id, amount=10),
        WalletTransfer(
            idempotency_key=key(), source_wallet_id=ann.id, target_wallet_id=ben.id, amount=5
        ),
    ]
    await ledger.apply(operations)
    assert await grants(ledger, ann.id) == [] and await grants(ledger, ben.id) == []
    async with ledger.pool.acquire() as connection:
        assert await connection.fetchval("select count(*) from allocations") == 0


async def test_an_expiration_run_expires_each_remainder_once(ledger: Ledger) -> None:
    ann = await wallet(ledger)
    await credit(ledger, ann.id, 10, day)
    await credit(ledger, ann.id, 4, 3 * day)
    await credit(ledger, ann.id, 6)
    await one(ledger, Debit(idempotency_key=key(), wallet_id=ann.id, amount=3))
    assert await ledger.expire_grants() == 0
    clock(ledger).shift = 2 * day
    balance = (await ledger.get_wallet(ann.id)).balance
    assert (balance.posted, balance.unspendable, balance.available) == (17, 7, 10)
    assert await ledger.expire_grants() == 1
    assert await ledger.expire_grants() == 0
    balance = (await ledger.get_wallet(ann.id)).balance
    assert (balance.posted, balance.unspendable, balance.available) == (10, 0, 10)
    first = (await grants(ledger, ann.id))[0]
    assert (first.remaining, first.expired) == (0, 7)
    expired = await expirations(ledger)
    assert [(each.source_wallet_id, each.amount) for each in expired] == [(ann.id, 7)]
    system = await ledger_system_wallet(ledger, SystemWallet.expired)
    assert (await ledger.get_wallet(system)).balance.posted == 7
    await books(ledger)


async def ledger_system_wallet(ledger: Ledger, which: SystemWallet) -> int:
    async with ledger.pool.acquire() as connection:
        wallet_id: int = await connection.fetchval(
            "select id from wallets where owner_kind = 3 and unit = 'seat' and owner_id = $1",
            which.name,
        )
    return wallet_id


async def test_two_runs_at_once_expire_nothing_twice(ledger: Ledger) -> None:
    wallets = [await wallet(ledger) for _ in range(20)]
    for each in wallets:
        for days in (1, 2, 3):
            await credit(ledger, each.id, days, days * day)
    clock(ledger).shift = 10 * day
    counts = await asyncio.gather(
        ledger.expire_grants(batch_max=7), ledger.expire_grants(batch_max=5)
    )
    counts.append(await ledger.expire_grants())
    assert sum(counts) == 60
    for each in wallets:
        assert (await ledger.get_wallet(each.id)).balance.posted == 0
    system = await ledger_system_wallet(ledger, SystemWallet.expired)
    assert (await ledger.get_wallet(system)).balance.posted == 20 * 6
    await books(ledger)


async def test_spends_racing_a_run_never_spend_what_expired(ledger: Ledger) -> None:
    """Grants expiring just as debits draw from them, from many calls at once: no credit is
    both spent and expired (every grant's remainder is its amount and allocations, checked by
    the books; the unit sums to 0), and what was spent and expired is what came in."""
    wallets = [await wallet(ledger) for _ in range(10)]
    for each in wallets:
        await credit(ledger, each.id, 50, day)
        await credit(ledger, each.id, 50, 30 * day)

    async def spend(wallet_id: int) -> int:
        spent = 0
        for _ in range(10):
            [outcome] = await ledger.apply(
                [
                    Debit(
                        idempotency_key=key(),
                        wallet_id=wallet_id,
                        amount=9,
                        mode=DebitMode.up_to,
                    )
                ]
            )
            assert isinstance(outcome, Applied)
            spent += outcome.transfer.amount
            await asyncio.sleep(0.05)
        return spent

    async def run() -> int:
        # The first grants pass their expiry while the debits go on.
        await asyncio.sleep(0.2)
        clock(ledger).shift = 2 * day
        expired = 0
        for _ in range(30):
            expired += await ledger.expire_grants(batch_max=3)
            await asyncio.sleep(0.05)
        return expired

    results = await asyncio.gather(*(spend(each.id) for each in wallets), run())
    await ledger.expire_grants()
    spent = sum(results[:-1])
    system = await ledger_system_wallet(ledger, SystemWallet.expired)
    expired = (await ledger.get_wallet(system)).balance.posted
    left = sum([(await ledger.get_wallet(each.id)).balance.posted for each in wallets])
    assert spent + expired + left == 1000
    # Some of the first grants were spent before they expired, the rest expired.
    assert 0 < expired < 500
    await books(ledger)


async def test_the_void_of_an_expiration_restores_the_grant(ledger: Ledger) -> None:
    ann = await wallet(ledger)
    await credit(ledger, ann.id, 10, day)
    clock(ledger).shift = 2 * day
    assert await ledger.expire_grants() == 1
    [expiration] = await expirations(ledger, ann.id)
    [outcome] = await ledger.apply([Void(idempotency_key=key(), transfer_id=expiration.id)])
    assert isinstance(outcome, errors.InvalidArgument) and outcome.field == "expires_at"
    new_expiry = clock(ledger)() + 30 * day
    await one(
        ledger,
        Void(idempotency_key=key(), transfer_id=expiration.id, expires_at=new_expiry),
    )
    [grant] = await grants(ledger, ann.id)
    assert (grant.remaining, grant.expires_at, grant.expired) == (10, new_expiry, 10)
    assert (await ledger.get_wallet(ann.id)).balance.available == 10
    await books(ledger)
    # It expires again, once, at its new expiry.
    clock(ledger).shift += 31 * day
    assert await ledger.expire_grants() == 1
    assert (await ledger.get_wallet(ann.id)).balance.posted == 0
    await books(ledger)


async def test_a_hold_reserves_from_grants_and_a_late_capture_takes_what_is_valid(
    ledger: Ledger,
) -> None:
    ann, shop = await wallet(ledger), await wallet(ledger)
    soon = await credit(ledger, ann.id, 10, day)
    await credit(ledger, ann.id, 10)
    held = await one(
        ledger,
        PlaceHold(
            idempotency_key=key(),
            wallet_id=ann.id,
            target_wallet_id=shop.id,
            amount=15,
            timeout_s=3 * 86400,
        ),
    )
    [grant] = await grants(ledger, ann.id)
    assert grant.transfer_id == soon.transfer.id and grant.remaining == 0
    await books(ledger)
    clock(ledger).shift = 2 * day
    captured = await one(ledger, CaptureHold(idempotency_key=key(), hold_id=held.transfer.id))
    assert (captured.transfer.amount, captured.transfer.amount_requested) == (5, 15)
    assert captured.hold is not None and captured.hold.amount_captured == 5
    [grant] = await grants(ledger, ann.id)
    assert grant.remaining == 10
    assert await ledger.expire_grants() == 1
    assert (await ledger.get_wallet(ann.id)).balance.posted == 5
    await books(ledger)


async def test_a_lapsed_hold_returns_to_its_grants(ledger: Ledger) -> None:
    ann = await wallet(ledger)
    await credit(ledger, ann.id, 10, 5 * day)
    await one(ledger, PlaceHold(idempotency_key=key(), wallet_id=ann.id, amount=8, timeout_s=1))
    clock(ledger).shift = timedelta(seconds=5)
    # The debit's batch releases the lapsed hold first, then draws from the grant.
    await one(ledger, Debit(idempotency_key=key(), wallet_id=ann.id, amount=9))
    [grant] = await grants(ledger, ann.id)
    assert grant.remaining == 1
    await books(ledger)


async def test_a_lapsed_hold_from_an_expired_grant_leaves_nothing_available(
    ledger: Ledger,
) -> None:
    """A hold reserves all of a grant; the grant expires, then the hold lapses, and no batch
    has released it yet. What it reserved is the grant's again, past its expiry: the next
    batch on the wallet finds nothing to spend. Every read says so: unspendable now, not
    available; gone at a time to come."""
    ann = await wallet(ledger)
    await credit(ledger, ann.id, 10, 2 * hour)
    await one(ledger, PlaceHold(idempotency_key=key(), wallet_id=ann.id, amount=10, timeout_s=3600))
    clock(ledger).shift = 3 * hour
    balance = (await ledger.get_wallet(ann.id)).balance
    future = await ledger.balance_at(ann.id, clock(ledger)() + day)
    [listed] = [
        each for each in (await ledger.outstanding("seat")).wallets if each.wallet_id == ann.id
    ]
    with pytest.raises(errors.InsufficientFunds):
        await one(ledger, Debit(idempotency_key=key(), wallet_id=ann.id, amount=1))
    # As the debit's batch found it (it released the hold into the grant past its expiry).
    released = (await ledger.get_wallet(ann.id)).balance
    assert (released.posted, released.pending, released.available) == (10, 0, 0)
    assert (balance.posted, balance.pending, balance.available) == (10, 0, 0)
    assert balance.unspendable == 10
    # Past its expiry and not yet expired by a run: expiring, as the grant's remainder is.
    assert (listed.balance.available, listed.expiring) == (0, 10)
    assert (future.posted, future.available) == (0, 0)
    await books(ledger)


async def test_balance_at_a_time_to_come(ledger: Ledger) -> None:
    ann = await wallet(ledger)
    await credit(ledger, ann.id, 10, 5 * day)
    await credit(ledger, ann.id, 4, 20 * day)
    await credit(ledger, ann.id, 3)
    now = clock(ledger)()
    later = await one(
        ledger,
        Credit(
            idempotency_key=key(),
            wallet_id=ann.id,
            amount=2,
            valid_from=now + 8 * day,
        ),
    )
    assert later.transfer.amount == 2
    assert (await ledger.get_wallet(ann.id)).balance.available == 17
    for at, posted, available in (
        (now + day, 19, 17),
        (now + 6 * day, 9, 7),
        (now + 9 * day, 9, 9),
        (now + 30 * day, 5, 5),
    ):
        balance = await ledger.balance_at(ann.id, at)
        assert (balance.posted, balance.available) == (posted, available), at
    with pytest.raises(errors.InvalidArgument):
        await ledger.balance_at(ann.id, now - day)


async def test_expiring_grants_are_announced_once(ledger: Ledger) -> None:
    ann = await wallet(ledger)
    soon = await credit(ledger, ann.id, 10, 2 * day)
    await credit(ledger, ann.id, 10, 20 * day)
    before = await ledger.list_events()
    assert await ledger.announce_expiring_grants(7 * day) == 1
    assert await ledger.announce_expiring_grants(7 * day) == 0
    page = await ledger.list_events(before.cursor)
    [event] = [each for each in page.events if each.type == EventType.grant_expiring_soon]
    assert isinstance(event.body, Grant) and event.body.transfer_id == soon.transfer.id
    assert event.wallet_ids == (ann.id,)
    created = [
        each for each in (await ledger.list_events()).events if each.type == EventType.grant_created
    ]
    assert soon.transfer.id in {
        each.body.transfer_id for each in created if isinstance(each.body, Grant)
    }


async def test_books_catch_a_grant_that_does_not_add_up(ledger: Ledger) -> None:
    ann = await wallet(ledger)
    await credit(ledger, ann.id, 10, day)
    async with ledger.pool.acquire() as connection:
        await connection.execute("update grants set remaining = remaining - 1")
        audit = await check_books(connection)
    assert audit.grants.count == 1 and audit.tracked.count == 1
    assert not audit.passed


async def test_a_batch_that_leaves_balances_as_read_still_writes_tracked(ledger: Ledger) -> None:
    """A wallet whose posted and pending end a batch as they were read, but whose
    grants changed (funds that never expire in, a grant spent out), must still have its
    tracked sum written."""
    ann = await wallet(ledger)
    await credit(ledger, ann.id, 10, 5 * day)
    outcomes = await ledger.apply(
        [
            Credit(idempotency_key=key(), wallet_id=ann.id, amount=10),
            Debit(idempotency_key=key(), wallet_id=ann.id, amount=10),
        ]
    )
    assert all(isinstance(outcome, Applied) for outcome in outcomes), outcomes
    assert [grant.remaining for grant in await grants(ledger, ann.id)] == [0]
    await books(ledger)


async def test_a_grant_made_in_a_batch_that_leaves_balances_as_read_is_spent_first(
    ledger: Ledger,
) -> None:
    """The same, the other way: a debit from the untracked balance and a credit that
    expires, in one batch. With the tracked sum left at 0, the grant was never drawn (the
    wallet looked as if it had none), then expired on top of what was spent: below the floor."""
    ann = await wallet(ledger)
    await credit(ledger, ann.id, 10)
    outcomes = await ledger.apply(
        [
            Debit(idempotency_key=key(), wallet_id=ann.id, amount=10),
            Credit(
                idempotency_key=key(),
                wallet_id=ann.id,
                amount=10,
                expires_at=clock(ledger)() + day,
            ),
        ]
    )
    assert all(isinstance(outcome, Applied) for outcome in outcomes), outcomes
    await one(ledger, Debit(idempotency_key=key(), wallet_id=ann.id, amount=10))
    assert [grant.remaining for grant in await grants(ledger, ann.id)] == [0]
    clock(ledger).shift += 2 * day
    try:
        await ledger.expire_grants()
    finally:
        clock(ledger).shift -= 2 * day
    assert (await ledger.get_wallet(ann.id)).balance.posted == 0
    await books(ledger)


@pytest.mark.parametrize("seed", range(6))
async def test_random_work_keeps_the_books(ledger: Ledger, seed: int) -> None:
    """Random batches of every operation that touches grants — credits with and without terms,
    debits, transfers, payments, holds placed, captured, released and lapsing, voids, and
    expiration runs — with the clock moving forward: after each batch the books balance, every
    grant adds up and every wallet's tracked sum is its grants'."""
    randomness = random.Random(seed)
    customers = [await wallet(ledger, minimum=randomness.choice([0, -20])) for _ in range(4)]
    merchant, _ = await ledger.create_wallet(
        NewWallet(
            idempotency_key=key(),
            owner_id=f"shop-{next(_keys)}",
            owner_kind=OwnerKind.merchant,
            unit="seat",
        )
    )
    ids = [each.id for each in customers]
    transfers: list[int] = []
    holds: list[int] = []

    def operation() -> Operation:
        now = clock(ledger)()
        kind = randomness.choice(
            ["credit", "credit", "debit", "transfer", "pay", "hold", "capture", "release", "void"]
        )
        wallet_id = randomness.choice(ids)
        amount = randomness.randint(1, 30)
        if kind == "credit":
            start = randomness.choice([None, None, now + randomness.randint(0, 2) * day])
            return Credit(
                idempotency_key=key(),
                wallet_id=wallet_id,
                amount=amount,
                valid_from=start,
                expires_at=randomness.choice(
                    [None, (start or now) + randomness.randint(1, 5) * day]
                ),
            )
        if kind == "debit":
            return Debit(
                idempotency_key=key(),
                wallet_id=wallet_id,
                amount=amount,
                mode=randomness.choice(list(DebitMode)),
            )
        if kind == "transfer":
            target = randomness.choice([each for each in ids if each != wallet_id])
            return WalletTransfer(
                idempotency_key=key(),
                source_wallet_id=wallet_id,
                target_wallet_id=target,
                amount=amount,
            )
        if kind == "pay":
            return Payment(
                idempotency_key=key(),
                payer_wallet_id=wallet_id,
                payee_wallet_id=merchant.id,
                amount=amount,
            )
        if kind == "hold" or (not holds and kind in ("capture", "release")):
            return PlaceHold(
                idempotency_key=key(),
                wallet_id=wallet_id,
                target_wallet_id=randomness.choice([None, merchant.id]),
                amount=amount,
                timeout_s=randomness.choice([1, 86400, 3 * 86400]),
            )
        if kind == "capture":
            return CaptureHold(
                idempotency_key=key(),
                hold_id=randomness.choice(holds),
                amount=randomness.choice([None, amount]),
            )
        if kind == "release":
            return ReleaseHold(idempotency_key=key(), hold_id=randomness.choice(holds))
        if not transfers:
            return Credit(idempotency_key=key(), wallet_id=wallet_id, amount=amount)
        return Void(idempotency_key=key(), transfer_id=randomness.choice(transfers))

    for _ in range(40):
        outcomes = await ledger.apply([operation() for _ in range(randomness.randint(1, 8))])
        for outcome in outcomes:
            if isinstance(outcome, Applied):
                if outcome.transfer.kind == TransferKind.hold:
                    holds.append(outcome.transfer.id)
                else:
                    transfers.append(outcome.transfer.id)
        if randomness.random() < 0.3:
            clock(ledger).shift += randomness.choice([timedelta(seconds=2), day, 2 * day])
        if randomness.random() < 0.3:
            await ledger.expire_grants(batch_max=randomness.randint(1, 4))
            expired = await expirations(ledger)
            transfers.extend(each.id for each in expired)
        await books(ledger)


async def test_one_run_makes_a_bounded_number_of_batches(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog longer than one run's batches is the next run's."""
    ann = await wallet(ledger)
    for _ in range(3):
        await credit(ledger, ann.id, 1, day)
    clock(ledger).shift = 2 * day
    monkeypatch.setattr(ledger_module, "expiration_run_batches_max", 2)
    assert await ledger.expire_grants(batch_max=1) == 2
    assert await ledger.expire_grants(batch_max=1) == 1
    assert await ledger.expire_grants(batch_max=1) == 0


async def test_a_deep_history_page_carries_no_balance_after(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past a bound of newer transfers, the balance after an entry is left unset (working it
    out would read them all); the signed amount stays."""
    ann = await wallet(ledger)
    for amount in (1, 2, 3, 4, 5):
        await credit(ledger, ann.id, amount)
    monkeypatch.setattr(reports_module, "history_balances_scanned_max", 1)
    where = TransferFilter(wallet_id=ann.id)
    first = await ledger.list_transfers(where, page_size=2)
    assert [(each.balance_after, each.signed_amount) for each in first.items] == [
        (15, 5),
        (10, 4),
    ]
    assert first.cursor is not None
    deep = await ledger.list_transfers(where, page_size=2, before_id=first.items[-1].id)
    assert [(each.balance_after, each.signed_amount) for each in deep.items] == [
        (None, 3),
        (None, 2),
    ]
