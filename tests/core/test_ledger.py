"""The ledger against a real PostgreSQL: each operation, its errors, idempotency, holds, and
the one clock by which holds lapse."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import pytest_asyncio

from coffer.core import errors
from coffer.core.ledger import Ledger
from coffer.core.model import (
    Applied,
    CaptureHold,
    Credit,
    Debit,
    DebitMode,
    Deposit,
    HoldStatus,
    NewWallet,
    Operation,
    OwnerKind,
    Payment,
    PlaceHold,
    Rejected,
    ReleaseHold,
    TransferFilter,
    TransferKind,
    Unit,
    UnitKind,
    Void,
    WalletTransfer,
    Withdrawal,
    posting_kinds,
)
from coffer.core.store.connections import create_pool
from coffer.core.store.facts import Facts
from coffer.core.validity import Validity

from support.database import lock_waiters

_keys = itertools.count(1)


def key() -> str:
    return f"key-{next(_keys)}"


class Clock:
    """The ledger's clock, as a test sets it: the system's, or a time it is stopped at."""

    def __init__(self) -> None:
        self.stopped_at: datetime | None = None

    def __call__(self) -> datetime:
        return self.stopped_at or datetime.now(UTC)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(database_url: str, clock: Clock) -> AsyncIterator[Ledger]:
    pool = await create_pool(database_url, size_max=4)
    try:
        ledger = Ledger(pool, clock=clock)
        await ledger.create_unit(Unit(code="EUR", kind=UnitKind.currency, name="Euro", scale=2))
        await ledger.create_unit(
            Unit(code="seat", kind=UnitKind.credit, name="Seat", plural="Seats")
        )
        yield ledger
    finally:
        await pool.close()


async def wallet(
    ledger: Ledger, unit: str = "EUR", kind: OwnerKind = OwnerKind.customer, minimum: int = 0
) -> int:
    created, _ = await ledger.create_wallet(
        NewWallet(
            idempotency_key=key(),
            owner_id=f"owner-{next(_keys)}",
            owner_kind=kind,
            unit=unit,
            balance_minimum=minimum,
        )
    )
    return created.id


async def one(ledger: Ledger, operation: object) -> Applied:
    [outcome] = await ledger.apply([operation])  # type: ignore[list-item]
    if isinstance(outcome, errors.CofferError):
        raise outcome
    return outcome


async def balance(ledger: Ledger, wallet_id: int) -> tuple[int, int]:
    found = await ledger.get_wallet(wallet_id)
    return found.balance.posted, found.balance.pending


async def assert_books_balance(ledger: Ledger) -> None:
    """The invariants: every unit sums to zero, and every wallet's posted balance is the sum
    of the posting transfers into it less those out of it."""
    async with ledger.pool.acquire() as connection:
        sums = await connection.fetch(
            "select unit, sum(posted) as total from wallets group by unit"
        )
        assert all(row["total"] == 0 for row in sums), sums
        mismatched = await connection.fetch(
            """
            select w.id, w.posted, coalesce(i.total, 0) - coalesce(o.total, 0) as journal
            from wallets w
            left join (select target_wallet_id id, sum(amount) total from transfers
                       where kind = any($1::smallint[]) group by 1) i on i.id = w.id
            left join (select source_wallet_id id, sum(amount) total from transfers
                       where kind = any($1::smallint[]) group by 1) o on o.id = w.id
            where w.posted <> coalesce(i.total, 0) - coalesce(o.total, 0)
            """,
            sorted(posting_kinds),
        )
        assert mismatched == []
        pending = await connection.fetch(
            """
            select w.id from wallets w
            left join (select source_wallet_id id, sum(amount) total from pending_holds
                       group by 1) h
              on h.id = w.id
            where w.pending <> coalesce(h.total, 0)
            """
        )
        assert pending == []


async def test_credit_debit_and_history(ledger: Ledger) -> None:
    customer = await wallet(ledger)
    credit = await one(
        ledger,
        Credit(
            idempotency_key=key(),
            wallet_id=customer,
            amount=1500,
            note="prepaid pack",
            performed_by="ops@shop",
        ),
    )
    assert credit.transfer.kind == TransferKind.credit
    assert credit.transfer.amount == 1500
    debit = await one(
        ledger, Debit(idempotency_key=key(), wallet_id=customer, amount=400, reference="order-1")
    )
    assert debit.transfer.kind == TransferKind.debit
    assert await balance(ledger, customer) == (1100, 0)
    history = await ledger.list_transfers(TransferFilter(wallet_id=customer))
    assert [t.id for t in history.items] == [debit.transfer.id, credit.transfer.id]
    assert history.items[1].note == "prepaid pack"
    assert history.items[1].performed_by == "ops@shop"
    by_reference = await ledger.list_transfers(TransferFilter(reference="order-1"))
    assert [t.id for t in by_reference.items] == [debit.transfer.id]
    await assert_books_balance(ledger)


async def test_all_or_nothing_and_up_to(ledger: Ledger) -> None:
    customer = await wallet(ledger, "seat")
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer, amount=3))
    with pytest.raises(errors.InsufficientFunds):
        await one(ledger, Debit(idempotency_key=key(), wallet_id=customer, amount=5))
    assert await balance(ledger, customer) == (3, 0)
    partial = await one(
        ledger, Debit(idempotency_key=key(), wallet_id=customer, amount=5, mode=DebitMode.up_to)
    )
    assert partial.transfer.amount == 3
    assert partial.amount_remaining == 2
    assert await balance(ledger, customer) == (0, 0)
    empty = await one(
        ledger, Debit(idempotency_key=key(), wallet_id=customer, amount=5, mode=DebitMode.up_to)
    )
    assert (empty.transfer.amount, empty.amount_remaining) == (0, 5)
    await assert_books_balance(ledger)


async def test_overdraft_minimum(ledger: Ledger) -> None:
    customer = await wallet(ledger, minimum=-500)
    await one(ledger, Debit(idempotency_key=key(), wallet_id=customer, amount=500))
    assert await balance(ledger, customer) == (-500, 0)
    with pytest.raises(errors.InsufficientFunds):
        await one(ledger, Debit(idempotency_key=key(), wallet_id=customer, amount=1))


async def test_transfer_rules(ledger: Ledger) -> None:
    source, target, seats = await wallet(ledger), await wallet(ledger), await wallet(ledger, "seat")
    await one(ledger, Credit(idempotency_key=key(), wallet_id=source, amount=100))
    moved = await one(
        ledger,
        WalletTransfer(
            idempotency_key=key(), source_wallet_id=source, target_wallet_id=target, amount=60
        ),
    )
    assert moved.transfer.kind == TransferKind.transfer
    assert await balance(ledger, target) == (60, 0)
    with pytest.raises(errors.UnitMismatch):
        await one(
            ledger,
            WalletTransfer(
                idempotency_key=key(), source_wallet_id=source, target_wallet_id=seats, amount=1
            ),
        )
    with pytest.raises(errors.SameWallet):
        await one(
            ledger,
            WalletTransfer(
                idempotency_key=key(), source_wallet_id=source, target_wallet_id=source, amount=1
            ),
        )
    with pytest.raises(errors.WalletNotFound):
        await one(
            ledger,
            WalletTransfer(
                idempotency_key=key(), source_wallet_id=source, target_wallet_id=999999, amount=1
            ),
        )
    with pytest.raises(errors.InsufficientFunds):
        await one(
            ledger,
            WalletTransfer(
                idempotency_key=key(), source_wallet_id=source, target_wallet_id=target, amount=41
            ),
        )


async def test_emi_deposit_payment_withdrawal(ledger: Ledger) -> None:
    customer = await wallet(ledger)
    merchant = await wallet(ledger, kind=OwnerKind.merchant)
    await one(
        ledger,
        Deposit(
            idempotency_key=key(), wallet_id=customer, amount=10_000, reference="IBAN DE89 3704"
        ),
    )
    paid = await one(
        ledger,
        Payment(
            idempotency_key=key(), payer_wallet_id=customer, payee_wallet_id=merchant, amount=2_500
        ),
    )
    assert paid.transfer.kind == TransferKind.payment
    with pytest.raises(errors.WalletKindMismatch):
        await one(
            ledger,
            Payment(
                idempotency_key=key(), payer_wallet_id=merchant, payee_wallet_id=customer, amount=1
            ),
        )
    await one(
        ledger,
        Withdrawal(
            idempotency_key=key(), wallet_id=merchant, amount=2_000, reference="IBAN FR76 3000"
        ),
    )
    assert await balance(ledger, customer) == (7_500, 0)
    assert await balance(ledger, merchant) == (500, 0)
    await assert_books_balance(ledger)


async def test_void_rules(ledger: Ledger) -> None:
    customer = await wallet(ledger)
    credit = await one(ledger, Credit(idempotency_key=key(), wallet_id=customer, amount=100))
    spent = await one(ledger, Debit(idempotency_key=key(), wallet_id=customer, amount=70))
    with pytest.raises(errors.InsufficientFunds):
        await one(ledger, Void(idempotency_key=key(), transfer_id=credit.transfer.id))
    voided = await one(ledger, Void(idempotency_key=key(), transfer_id=spent.transfer.id))
    assert voided.transfer.voids_transfer_id == spent.transfer.id
    assert await balance(ledger, customer) == (100, 0)
    original = await ledger.get_transfer(spent.transfer.id)
    assert original.voided_by_transfer_id == voided.transfer.id
    with pytest.raises(errors.AlreadyVoided):
        await one(ledger, Void(idempotency_key=key(), transfer_id=spent.transfer.id))
    with pytest.raises(errors.NotVoidable):
        await one(ledger, Void(idempotency_key=key(), transfer_id=voided.transfer.id))
    with pytest.raises(errors.TransferNotFound):
        await one(ledger, Void(idempotency_key=key(), transfer_id=987654))
    await assert_books_balance(ledger)


async def test_holds(ledger: Ledger) -> None:
    customer = await wallet(ledger)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer, amount=1000))
    placed = await one(ledger, PlaceHold(idempotency_key=key(), wallet_id=customer, amount=600))
    assert placed.hold is not None and placed.hold.status == HoldStatus.pending
    assert await balance(ledger, customer) == (1000, 600)
    with pytest.raises(errors.InsufficientFunds):
        await one(ledger, Debit(idempotency_key=key(), wallet_id=customer, amount=401))
    with pytest.raises(errors.CaptureExceedsHold):
        await one(ledger, CaptureHold(idempotency_key=key(), hold_id=placed.hold.id, amount=601))
    captured = await one(
        ledger, CaptureHold(idempotency_key=key(), hold_id=placed.hold.id, amount=250)
    )
    assert captured.transfer.amount == 250
    assert captured.hold is not None and captured.hold.status == HoldStatus.captured
    assert await balance(ledger, customer) == (750, 0)
    with pytest.raises(errors.HoldNotPending):
        await one(ledger, ReleaseHold(idempotency_key=key(), hold_id=placed.hold.id))
    second = await one(ledger, PlaceHold(idempotency_key=key(), wallet_id=customer, amount=100))
    assert second.hold is not None
    released = await one(ledger, ReleaseHold(idempotency_key=key(), hold_id=second.hold.id))
    assert released.hold is not None and released.hold.status == HoldStatus.released
    assert await balance(ledger, customer) == (750, 0)
    with pytest.raises(errors.HoldNotFound):
        await one(ledger, CaptureHold(idempotency_key=key(), hold_id=captured.transfer.id))
    await assert_books_balance(ledger)


async def test_holds_expire(ledger: Ledger, clock: Clock) -> None:
    customer = await wallet(ledger)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer, amount=1000))
    placed = await one(
        ledger, PlaceHold(idempotency_key=key(), wallet_id=customer, amount=300, timeout_s=1)
    )
    assert placed.hold is not None
    assert await ledger.expire_holds() == 0
    clock.stopped_at = datetime.now(UTC) + timedelta(seconds=2)
    assert await ledger.expire_holds() == 1
    assert await balance(ledger, customer) == (1000, 0)
    hold = await ledger.get_hold(placed.hold.id)
    assert hold.status == HoldStatus.expired
    with pytest.raises(errors.HoldExpired):
        await one(ledger, CaptureHold(idempotency_key=key(), hold_id=placed.hold.id))
    await assert_books_balance(ledger)


async def test_idempotency(ledger: Ledger) -> None:
    customer = await wallet(ledger)
    request = Credit(idempotency_key="same", wallet_id=customer, amount=10)
    first = await one(ledger, request)
    again = await one(ledger, request)
    assert again.replayed and again.transfer == first.transfer
    assert await balance(ledger, customer) == (10, 0)
    with pytest.raises(errors.IdempotencyKeyReused):
        await one(ledger, Credit(idempotency_key="same", wallet_id=customer, amount=11))
    other_caller = await one(
        ledger, Credit(idempotency_key="same", caller="b", wallet_id=customer, amount=11)
    )
    assert not other_caller.replayed
    # Duplicates inside one batch: the first applies, the copy returns its result.
    outcomes = await ledger.apply(
        [
            Credit(idempotency_key="dup", wallet_id=customer, amount=5),
            Credit(idempotency_key="dup", wallet_id=customer, amount=5),
            Credit(idempotency_key="dup", wallet_id=customer, amount=6),
        ]
    )
    assert isinstance(outcomes[0], Applied) and isinstance(outcomes[1], Applied)
    assert not outcomes[0].replayed and outcomes[1].replayed
    assert outcomes[1].transfers == outcomes[0].transfers
    assert isinstance(outcomes[2], errors.IdempotencyKeyReused)
    assert await balance(ledger, customer) == (26, 0)


async def test_batch_failures_are_independent_unless_linked(ledger: Ledger) -> None:
    customer, other = await wallet(ledger), await wallet(ledger)
    outcomes = await ledger.apply(
        [
            Credit(idempotency_key=key(), wallet_id=customer, amount=100),
            Debit(idempotency_key=key(), wallet_id=customer, amount=1000),
            WalletTransfer(
                idempotency_key=key(),
                source_wallet_id=customer,
                target_wallet_id=other,
                amount=30,
                linked=True,
            ),
            Debit(idempotency_key=key(), wallet_id=other, amount=31),
            Debit(idempotency_key=key(), wallet_id=customer, amount=10),
        ]
    )
    assert isinstance(outcomes[0], Applied)
    assert isinstance(outcomes[1], errors.InsufficientFunds)
    assert isinstance(outcomes[2], errors.LinkedOperationFailed)
    assert isinstance(outcomes[3], errors.InsufficientFunds)
    assert isinstance(outcomes[4], Applied)
    assert await balance(ledger, customer) == (90, 0)
    assert await balance(ledger, other) == (0, 0)
    await assert_books_balance(ledger)


async def test_a_chain_failed_by_an_invalid_operation_is_not_kept(ledger: Ledger) -> None:
    """It never ran: the invalid operation answers with its own error wherever it stands in
    the chain, and no answer of the chain is kept under its key."""
    customer = await wallet(ledger)
    invalid = errors.InvalidArgument("amount", "must be positive")
    for linked_first in (True, False):
        debit = Debit(idempotency_key=key(), wallet_id=customer, amount=50, linked=linked_first)
        rejected = Rejected(invalid, linked=not linked_first)
        chain = [debit, rejected] if linked_first else [rejected, debit]
        outcomes = await ledger.apply(chain)
        assert invalid in outcomes
        assert {type(outcome) for outcome in outcomes} <= {
            errors.InvalidArgument,
            errors.InsufficientFunds,
            errors.LinkedOperationFailed,
        }
        await one(ledger, Credit(idempotency_key=key(), wallet_id=customer, amount=50))
        # The same request (being linked is not part of it), alone.
        applied = await one(ledger, dataclasses.replace(debit, linked=False))
        assert not applied.replayed


async def test_an_unexpected_unique_violation_is_a_bug_not_a_stored_key(
    ledger: Ledger, database_url: str
) -> None:
    """Only the key indexes make a batch start over; any other unique index that fires is a
    broken invariant, raised as it is (the server answers INTERNAL), never retried."""
    customer = await wallet(ledger)
    administration = await asyncpg.connect(database_url)
    try:
        await administration.execute(
            "create unique index amount_77 on transfers (amount) where amount = 77"
        )
    finally:
        await administration.close()
    credits = [Credit(idempotency_key=key(), wallet_id=customer, amount=77) for _ in range(2)]
    with pytest.raises(asyncpg.UniqueViolationError):
        await ledger.apply(credits)
    assert await balance(ledger, customer) == (0, 0)


async def test_a_lapsed_hold_holds_nothing_before_the_sweep(ledger: Ledger, clock: Clock) -> None:
    customer = await wallet(ledger)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer, amount=100))
    placed = await one(
        ledger, PlaceHold(idempotency_key=key(), wallet_id=customer, amount=60, timeout_s=1)
    )
    assert placed.hold is not None
    clock.stopped_at = datetime.now(UTC) + timedelta(seconds=2)
    # No sweep has run: the batch that touches the wallet releases the lapsed hold first.
    [debit] = await ledger.apply([Debit(idempotency_key=key(), wallet_id=customer, amount=100)])
    assert isinstance(debit, Applied)
    assert await balance(ledger, customer) == (0, 0)
    history = await ledger.list_transfers(TransferFilter(wallet_id=customer))
    # One batch, one time: the expiry and the debit it made room for.
    assert {t.kind for t in history.items[:2]} == {TransferKind.debit, TransferKind.hold_expiry}
    assert history.items[0].created_at == history.items[1].created_at
    [capture] = await ledger.apply([CaptureHold(idempotency_key=key(), hold_id=placed.hold.id)])
    assert isinstance(capture, errors.HoldExpired)
    await assert_books_balance(ledger)


async def test_a_hold_lapses_at_its_expiry_for_every_reader(ledger: Ledger, clock: Clock) -> None:
    """One clock tells whether a hold has lapsed: a microsecond before its expiry, GetHold,
    the wallet's balance, the sweep and a batch all find it holding; at its expiry, all find
    it lapsed, before anything has released it in the journal."""
    customer = await wallet(ledger)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer, amount=100))
    placed = await one(
        ledger, PlaceHold(idempotency_key=key(), wallet_id=customer, amount=60, timeout_s=1)
    )
    assert placed.hold is not None
    hold_id, expires_at = placed.hold.id, placed.hold.expires_at

    clock.stopped_at = expires_at - timedelta(microseconds=1)
    assert (await ledger.get_hold(hold_id)).status == HoldStatus.pending
    assert await balance(ledger, customer) == (100, 60)
    [listed] = (
        await ledger.list_wallets(owner_id=(await ledger.get_wallet(customer)).owner_id)
    ).items
    assert listed.balance.pending == 60
    assert await ledger.expire_holds() == 0
    [short] = await ledger.apply([Debit(idempotency_key=key(), wallet_id=customer, amount=41)])
    assert isinstance(short, errors.InsufficientFunds)

    clock.stopped_at = expires_at
    read = await ledger.get_hold(hold_id)
    assert (read.status, read.resolved_by_transfer_id) == (HoldStatus.expired, None)
    assert await balance(ledger, customer) == (100, 0)
    [capture] = await ledger.apply([CaptureHold(idempotency_key=key(), hold_id=hold_id)])
    assert isinstance(capture, errors.HoldExpired)
    [debit] = await ledger.apply([Debit(idempotency_key=key(), wallet_id=customer, amount=100)])
    assert isinstance(debit, Applied)
    released = await ledger.get_hold(hold_id)
    assert released.status == HoldStatus.expired
    assert released.resolved_by_transfer_id is not None
    assert await balance(ledger, customer) == (0, 0)
    await assert_books_balance(ledger)


# What no balance decides, by kind: built for a customer with money, another customer and a
# merchant.
_written_ahead: dict[str, Callable[[int, int, int], Operation]] = {
    "credit": lambda customer, other, merchant: Credit(
        idempotency_key=key(), wallet_id=customer, amount=5
    ),
    "debit": lambda customer, other, merchant: Debit(
        idempotency_key=key(), wallet_id=customer, amount=5
    ),
    "transfer": lambda customer, other, merchant: WalletTransfer(
        idempotency_key=key(), source_wallet_id=customer, target_wallet_id=other, amount=5
    ),
    "deposit": lambda customer, other, merchant: Deposit(
        idempotency_key=key(), wallet_id=customer, amount=5, reference="bank"
    ),
    "withdrawal": lambda customer, other, merchant: Withdrawal(
        idempotency_key=key(), wallet_id=customer, amount=5, reference="bank"
    ),
    "payment": lambda customer, other, merchant: Payment(
        idempotency_key=key(), payer_wallet_id=customer, payee_wallet_id=merchant, amount=5
    ),
}


@pytest.mark.parametrize("kind", sorted(_written_ahead))
async def test_the_journal_is_written_before_the_locks_and_kept(
    ledger: Ledger, database_url: str, kind: str
) -> None:
    """A transfer no balance decides is written before the batch waits for its wallets'
    locks, and kept as written once validation confirms it: its id is the one the batch took
    while it waited, and the batch took no other."""
    customer, other = await wallet(ledger), await wallet(ledger)
    merchant = await wallet(ledger, kind=OwnerKind.merchant)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer, amount=100))
    operation = _written_ahead[kind](customer, other, merchant)
    holder = await asyncpg.connect(database_url)
    try:
        ids_taken_before = await holder.fetchval("select last_value from transfers_id")
        locking = holder.transaction()
        await locking.start()
        await holder.execute("select from wallets where id = $1 for update", customer)
        applying = asyncio.create_task(ledger.apply([operation]))
        await lock_waiters(database_url)
        ids_taken_waiting = await holder.fetchval("select last_value from transfers_id")
        await locking.rollback()
        [applied] = await applying
        ids_taken_after = await holder.fetchval("select last_value from transfers_id")
    finally:
        await holder.close()
    assert isinstance(applied, Applied)
    assert ids_taken_waiting == ids_taken_before + 1
    assert applied.transfer.id == ids_taken_waiting == ids_taken_after
    await assert_books_balance(ledger)


async def test_unit_scales_are_read_once(ledger: Ledger, database_url: str) -> None:
    """A unit's scale never changes: the ledger reads it once, then answers without a
    connection; a unit that does not exist is left out."""
    assert await ledger.unit_scales({"EUR", "seat", "XYZ"}) == {"EUR": 2, "seat": 0}
    # Known from their creation: asked again, no connection is taken.
    await ledger.pool.close()
    assert (await ledger.unit_scales({"EUR"}))["EUR"] == 2
    assert (await ledger.unit_scales({"seat", "EUR"}))["seat"] == 0
    # Another ledger on the same database, which created nothing, reads each unit once.
    pool = await create_pool(database_url, size_max=2)
    other = Ledger(pool)
    try:
        assert await other.unit_scales({"EUR"}) == {"EUR": 2}
    finally:
        await pool.close()
    assert (await other.unit_scales({"EUR"}))["EUR"] == 2


async def test_a_units_default_validity(ledger: Ledger, database_url: str) -> None:
    """Kept in its canonical form, part of the unit's definition, and read once per unit by
    the facts of a batch."""
    pack = Unit(code="pack", kind=UnitKind.credit, name="Pack", default_validity="P1Y6M")
    created = await ledger.create_unit(pack)
    assert created.default_validity == "P18M"
    assert (await ledger.get_unit("pack")).default_validity == "P18M"
    assert (await ledger.get_unit("seat")).default_validity == ""
    # Created again: the same validity spelled otherwise is the same unit; another is not.
    again = Unit(code="pack", kind=UnitKind.credit, name="Pack", default_validity="P18M")
    assert await ledger.create_unit(again) == created
    for other in ["P19M", ""]:
        with pytest.raises(errors.UnitExists):
            await ledger.create_unit(dataclasses.replace(pack, default_validity=other))
    facts = Facts()
    async with ledger.pool.acquire() as connection:
        validities = await facts.unit_validities(connection, {"pack", "seat", "XYZ"})
    assert validities == {"pack": Validity(months=18), "seat": None}
    # Read once: asked again, the facts need no connection that works.
    closed = await asyncpg.connect(database_url)
    await closed.close()
    assert await facts.unit_validities(closed, {"pack"}) == {"pack": Validity(months=18)}
    # Learned from a creation, with no query at all.
    learned = Facts()
    learned.unit_created(created)
    assert await learned.unit_validities(closed, {"pack"}) == {"pack": Validity(months=18)}


async def test_facts_started_over_still_answer_all_they_are_asked(ledger: Ledger) -> None:
    """A cache of facts past its bound starts over: what it answers then lacks nothing it was
    asked for, though it knew some of it a moment before."""
    wallets = [
        (
            await ledger.create_wallet(
                NewWallet(
                    idempotency_key=f"facts-{number}",
                    caller="tests",
                    owner_id=f"owner-{number}",
                    owner_kind=OwnerKind.customer,
                    unit="EUR" if number % 2 else "seat",
                )
            )
        )[0].id
        for number in range(4)
    ]
    await ledger.create_unit(Unit(code="pts", kind=UnitKind.credit, name="Point"))
    facts = Facts(wallet_units_max=3, system_wallet_units_max=2, unit_scales_max=2)
    async with ledger.pool.acquire() as connection:
        assert len(await facts.wallet_units(connection, set(wallets[:2]))) == 2
        units = await facts.wallet_units(connection, {wallets[0], *wallets[2:]})
        assert units == {wallets[0]: "seat", wallets[2]: "seat", wallets[3]: "EUR"}
        assert await facts.unit_scales(connection, {"EUR", "seat"}) == {"EUR": 2, "seat": 0}
        assert await facts.unit_scales(connection, {"EUR", "pts"}) == {"EUR": 2, "pts": 0}
        assert len(await facts.system_wallets(connection, {"EUR", "seat"})) == 4
        system = await facts.system_wallets(connection, {"EUR", "pts"})
        assert {unit for unit, _ in system} == {"EUR", "pts"}
        assert len(system) == 4
