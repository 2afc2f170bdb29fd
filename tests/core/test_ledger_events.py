"""The event stream against a real PostgreSQL: every write path records its events, in commit
order, once; refusals and rollbacks record none; cursors resume inside a record; filters and
the owner scope; low balance and top-up requests; retention; events off."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import pytest_asyncio

from coffer.core import errors, model
from coffer.core.ledger import Ledger
from coffer.core.model import (
    Applied,
    Balance,
    BalanceAlert,
    CaptureHold,
    Credit,
    Debit,
    Deposit,
    Event,
    EventCursor,
    EventFilter,
    EventType,
    LowBalance,
    NewWallet,
    Operation,
    Owner,
    OwnerKind,
    Payment,
    PlaceHold,
    ReleaseHold,
    TopUpRequest,
    TransferKind,
    TransferMoved,
    Unit,
    UnitKind,
    Void,
    Wallet,
    WalletTransfer,
    Withdrawal,
    system_caller,
)
from coffer.core.store.connections import create_pool
from coffer.core.store.listener import Listener

_keys = itertools.count(1)


def key() -> str:
    return f"events-{next(_keys)}"


class Clock:
    def __init__(self) -> None:
        self.stopped_at: datetime | None = None

    def __call__(self) -> datetime:
        return self.stopped_at or datetime.now(UTC)


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    pool = await create_pool(database_url, size_max=8)
    try:
        ledger = Ledger(pool, clock=Clock())
        await ledger.create_unit(
            Unit(code="EUR", kind=UnitKind.currency, name="Euro", scale=2), actor="ops"
        )
        yield ledger
    finally:
        await pool.close()


async def wallet(
    ledger: Ledger,
    owner: str | None = None,
    kind: OwnerKind = OwnerKind.customer,
    caller: str = "shop",
    **fields: int,
) -> Wallet:
    created, _ = await ledger.create_wallet(
        NewWallet(
            idempotency_key=key(),
            caller=caller,
            owner_id=owner or f"owner-{next(_keys)}",
            owner_kind=kind,
            unit="EUR",
            **fields,
        )
    )
    return created


async def one(ledger: Ledger, operation: Operation) -> Applied:
    [outcome] = await ledger.apply([operation])
    if isinstance(outcome, errors.CofferError):
        raise outcome
    return outcome


async def every_event(
    ledger: Ledger,
    after: EventCursor | None = None,
    where: EventFilter = EventFilter(),  # noqa: B008 - frozen, never changed
    owner_scope: Owner | None = None,
    page_size: int = 1000,
) -> tuple[list[Event], EventCursor]:
    """Every event from `after` to the newest, page after page; and the cursor after them."""
    found: list[Event] = []
    while True:
        page = await ledger.list_events(
            after, page_size=page_size, where=where, owner_scope=owner_scope
        )
        found.extend(page.events)
        after = page.cursor
        if page.caught_up:
            return found, after


async def head(ledger: Ledger) -> EventCursor:
    return (await every_event(ledger))[1]


async def since(ledger: Ledger, cursor: EventCursor) -> list[Event]:
    return (await every_event(ledger, cursor))[0]


# Every write path ------------------------------------------------------------------------------


def operation_kinds() -> set[type[Operation]]:
    """Every kind of operation the model defines: a new kind fails the test below until it
    records its event. (A slotted dataclass is a class made anew: the model's name holds the
    one in use.)"""
    return {kind for kind in Operation.__subclasses__() if getattr(model, kind.__name__) is kind}


async def test_every_operation_kind_records_its_transfer_with_the_balances_after(
    ledger: Ledger,
) -> None:
    clock = ledger._clock
    assert isinstance(clock, Clock)
    customer = await wallet(ledger)
    other = await wallet(ledger)
    merchant = await wallet(ledger, kind=OwnerKind.merchant)
    seen: dict[type[Operation], Event] = {}

    async def run(operation: Operation, expected: EventType) -> Applied:
        before = await head(ledger)
        applied = await one(ledger, operation)
        [event] = await since(ledger, before)
        assert event.type == expected
        assert event.actor == operation.caller
        body = event.body
        assert isinstance(body, TransferMoved)
        assert body.transfer.id == applied.transfer.id
        source = await ledger.get_wallet(body.transfer.source_wallet_id)
        target = await ledger.get_wallet(body.transfer.target_wallet_id)
        assert body.source_balance == source.balance
        assert body.target_balance == target.balance
        assert event.wallet_ids == (source.id, target.id)
        seen[type(operation)] = event
        return applied

    common = {"caller": "shop"}
    await run(
        Credit(idempotency_key=key(), wallet_id=customer.id, amount=1000, **common),
        EventType.transfer,
    )
    await run(
        Debit(idempotency_key=key(), wallet_id=customer.id, amount=100, **common),
        EventType.transfer,
    )
    await run(
        WalletTransfer(
            idempotency_key=key(),
            source_wallet_id=customer.id,
            target_wallet_id=other.id,
            amount=50,
            **common,
        ),
        EventType.transfer,
    )
    await run(
        Deposit(
            idempotency_key=key(), wallet_id=customer.id, amount=500, reference="iban", **common
        ),
        EventType.transfer,
    )
    await run(
        Withdrawal(
            idempotency_key=key(), wallet_id=customer.id, amount=20, reference="iban", **common
        ),
        EventType.transfer,
    )
    paid = await run(
        Payment(
            idempotency_key=key(),
            payer_wallet_id=customer.id,
            payee_wallet_id=merchant.id,
            amount=30,
            **common,
        ),
        EventType.transfer,
    )
    await run(
        Void(idempotency_key=key(), transfer_id=paid.transfer.id, **common), EventType.transfer
    )
    held = await run(
        PlaceHold(idempotency_key=key(), wallet_id=customer.id, amount=10, **common),
        EventType.hold_placed,
    )
    await run(
        CaptureHold(idempotency_key=key(), hold_id=held.transfer.id, amount=5, **common),
        EventType.hold_captured,
    )
    held = await run(
        PlaceHold(idempotency_key=key(), wallet_id=customer.id, amount=10, **common),
        EventType.hold_placed,
    )
    await run(
        ReleaseHold(idempotency_key=key(), hold_id=held.transfer.id, **common),
        EventType.hold_released,
    )
    # Expiry: a hold lapses, the sweep expires it, under the ledger's own caller.
    held = await one(
        ledger, PlaceHold(idempotency_key=key(), wallet_id=customer.id, amount=10, timeout_s=1)
    )
    before = await head(ledger)
    clock.stopped_at = datetime.now(UTC) + timedelta(seconds=5)
    try:
        assert await ledger.expire_holds() == 1
    finally:
        clock.stopped_at = None
    [expired] = await since(ledger, before)
    assert expired.type == EventType.hold_expired and expired.actor == system_caller
    assert isinstance(expired.body, TransferMoved)
    assert expired.body.transfer.kind == TransferKind.hold_expiry
    assert expired.body.source_balance == (await ledger.get_wallet(customer.id)).balance
    seen[model.ExpireHold] = expired
    # Expiration: a grant passes its expiry, a run expires what is left of it.
    granted = await one(
        ledger,
        Credit(
            idempotency_key=key(),
            wallet_id=customer.id,
            amount=7,
            expires_at=datetime.now(UTC) + timedelta(seconds=1),
        ),
    )
    before = await head(ledger)
    clock.stopped_at = datetime.now(UTC) + timedelta(seconds=5)
    try:
        assert await ledger.expire_grants() == 1
    finally:
        clock.stopped_at = None
    [expired] = await since(ledger, before)
    assert expired.type == EventType.grant_expired and expired.actor == system_caller
    assert isinstance(expired.body, TransferMoved)
    assert expired.body.transfer.kind == TransferKind.expiration
    assert expired.body.transfer.amount == granted.transfer.amount
    assert expired.body.source_balance == (await ledger.get_wallet(customer.id)).balance
    seen[model.ExpireGrant] = expired
    assert set(seen) == operation_kinds()
    # The transfer kinds met: every one of them.
    kinds = {event.body.transfer.kind for event in seen.values()}  # type: ignore[union-attr]
    assert kinds | {TransferKind.hold} == set(TransferKind)


async def test_a_hold_lapsed_in_a_batch_of_its_source_leaves_its_target_unrecorded(
    ledger: Ledger,
) -> None:
    """A batch that locks a wallet releases its lapsed holds first; a hold's target, which the
    batch did not lock (and the release does not change), has no balance after recorded."""
    clock = ledger._clock
    assert isinstance(clock, Clock)
    customer, other = await wallet(ledger), await wallet(ledger)
    shop = await wallet(ledger, kind=OwnerKind.merchant)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=100))
    held = await one(
        ledger,
        PlaceHold(
            idempotency_key=key(),
            wallet_id=customer.id,
            amount=10,
            target_wallet_id=shop.id,
            timeout_s=1,
        ),
    )
    before = await head(ledger)
    clock.stopped_at = datetime.now(UTC) + timedelta(seconds=5)
    try:
        await one(
            ledger,
            WalletTransfer(
                idempotency_key=key(),
                source_wallet_id=customer.id,
                target_wallet_id=other.id,
                amount=20,
            ),
        )
    finally:
        clock.stopped_at = None
    expired, moved = await since(ledger, before)
    assert expired.type == EventType.hold_expired and expired.actor == system_caller
    assert isinstance(expired.body, TransferMoved)
    assert expired.body.transfer.hold_id == held.transfer.id
    assert expired.body.source_balance == Balance(100, 0)
    assert expired.body.target_balance is None
    assert isinstance(moved.body, TransferMoved)
    assert moved.body.source_balance == Balance(80, 0)
    assert moved.body.target_balance == Balance(20, 0)


async def test_units_and_wallets_record_their_events(ledger: Ledger) -> None:
    before = await head(ledger)
    unit = await ledger.create_unit(
        Unit(code="seat", kind=UnitKind.credit, name="Seat", default_validity="P1Y"),
        actor="admin",
    )
    created = await wallet(ledger, caller="shop")
    alerted = await ledger.set_balance_alert(
        created.id, low_balance_threshold=100, top_up_to=500, actor="ops"
    )
    cancelled = await ledger.cancel_wallet(created.id, actor="ops")
    events = await since(ledger, before)
    assert [(event.type, event.actor) for event in events] == [
        (EventType.unit_created, "admin"),
        (EventType.wallet_created, "shop"),
        (EventType.wallet_alert_set, "ops"),
        (EventType.wallet_cancelled, "ops"),
    ]
    assert events[0].body == unit and events[0].wallet_ids == ()
    assert unit.default_validity == "P12M"
    assert events[1].body == created and events[1].wallet_ids == (created.id,)
    assert events[2].body == BalanceAlert(created.id, "EUR", 100, 500)
    assert alerted.low_balance_threshold == 100 and alerted.top_up_to == 500
    assert events[3].body == cancelled
    # What changed nothing records nothing: the unit again, the wallet's key replayed, the
    # same alert, a cancelled wallet cancelled again.
    await ledger.create_unit(
        Unit(code="seat", kind=UnitKind.credit, name="Seat", default_validity="P12M")
    )
    other = await wallet(ledger)
    after = await head(ledger)
    await ledger.set_balance_alert(other.id, low_balance_threshold=None)
    await ledger.cancel_wallet(created.id)
    assert await since(ledger, after) == []


async def test_refused_and_rolled_back_operations_record_nothing(ledger: Ledger) -> None:
    customer = await wallet(ledger)
    credit_key = key()
    await one(ledger, Credit(idempotency_key=credit_key, wallet_id=customer.id, amount=100))
    before = await head(ledger)
    outcomes = await ledger.apply(
        [
            Debit(idempotency_key=key(), wallet_id=customer.id, amount=1000),
            Credit(idempotency_key=key(), wallet_id=customer.id, amount=5, linked=True),
            Debit(idempotency_key=key(), wallet_id=customer.id, amount=1000),
            Credit(idempotency_key=key(), wallet_id=999_999, amount=5),
            # A replay: its transfer was recorded the first time.
            Credit(idempotency_key=credit_key, wallet_id=customer.id, amount=100),
        ]
    )
    assert [type(outcome).__name__ for outcome in outcomes] == [
        "InsufficientFunds",
        "LinkedOperationFailed",
        "InsufficientFunds",
        "WalletNotFound",
        "Applied",
    ]
    assert await since(ledger, before) == []
    # A transaction that fails after writing its record leaves no record, and no gap.
    pool = ledger.pool
    async with pool.acquire() as connection:
        with pytest.raises(asyncpg.RaiseError):
            async with connection.transaction():
                await connection.execute("update event_counter set position = position + 1")
                await connection.execute("do $$ begin raise exception 'rolled back'; end $$")
    applied = await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=1))
    [event] = await since(ledger, before)
    assert isinstance(event.body, TransferMoved) and event.body.transfer.id == applied.transfer.id
    assert event.cursor == EventCursor(before.position + 1)


async def test_a_batch_is_one_record_in_the_order_applied_and_cursors_resume_inside_it(
    ledger: Ledger,
) -> None:
    customer = await wallet(ledger)
    before = await head(ledger)
    operations: list[Operation] = [
        Credit(idempotency_key=key(), wallet_id=customer.id, amount=1000),
        Debit(idempotency_key=key(), wallet_id=customer.id, amount=1, mode=model.DebitMode.up_to),
        *[Debit(idempotency_key=key(), wallet_id=customer.id, amount=10) for _ in range(8)],
    ]
    outcomes = await ledger.apply(operations)
    ids = [outcome.transfer.id for outcome in outcomes if isinstance(outcome, Applied)]
    events = await since(ledger, before)
    assert [event.body.transfer.id for event in events] == ids  # type: ignore[union-attr]
    position = before.position
    assert [event.cursor for event in events] == [
        *(EventCursor(position, index) for index in range(1, 10)),
        EventCursor(position + 1),
    ]
    assert [event.body.source_balance.posted for event in events[2:]] == [  # type: ignore[union-attr]
        999 - 10 * n for n in range(1, 9)
    ]
    # A small page ends inside the record; its cursor resumes there.
    first = await ledger.list_events(before, page_size=3)
    assert [event.body.transfer.id for event in first.events] == ids[:3]  # type: ignore[union-attr]
    assert not first.caught_up and first.cursor == EventCursor(before.position, 3)
    rest = await since(ledger, first.cursor)
    assert [event.body.transfer.id for event in rest] == ids[3:]  # type: ignore[union-attr]
    # An event's cursor resumes after it.
    assert (await since(ledger, events[4].cursor)) == events[5:]


async def test_filters_and_the_owner_scope(ledger: Ledger) -> None:
    before = await head(ledger)
    alice = await wallet(ledger, owner="alice")
    bob = await wallet(ledger, owner="bob")
    shop = await wallet(ledger, owner="shop", kind=OwnerKind.merchant)
    await ledger.apply(
        [
            Credit(idempotency_key=key(), wallet_id=alice.id, amount=100),
            Credit(idempotency_key=key(), wallet_id=bob.id, amount=100),
            Payment(
                idempotency_key=key(),
                payer_wallet_id=alice.id,
                payee_wallet_id=shop.id,
                amount=10,
            ),
            PlaceHold(idempotency_key=key(), wallet_id=bob.id, amount=10),
        ]
    )

    async def listed(where: EventFilter, owner_scope: Owner | None = None) -> list[tuple[int, ...]]:
        events, _ = await every_event(ledger, before, where, owner_scope, page_size=2)
        return [(event.type, *event.wallet_ids) for event in events]

    assert len(await listed(EventFilter())) == 7
    ledger_operator = await operator(ledger)
    alice_events = [
        (EventType.wallet_created, alice.id),
        (EventType.transfer, ledger_operator, alice.id),
        (EventType.transfer, alice.id, shop.id),
    ]
    assert await listed(EventFilter(wallet_ids=(alice.id,))) == alice_events
    assert await listed(EventFilter(owner_id="alice")) == alice_events
    assert (
        await listed(EventFilter(), owner_scope=Owner(OwnerKind.customer, "alice")) == alice_events
    )
    assert (
        await listed(EventFilter(owner_id="bob"), owner_scope=Owner(OwnerKind.customer, "alice"))
        == []
    )
    assert (
        await listed(
            EventFilter(wallet_ids=(bob.id,)), owner_scope=Owner(OwnerKind.customer, "alice")
        )
        == []
    )
    # The scope is of a kind too: the merchant "alice" owns none of the customer's wallets.
    assert await listed(EventFilter(), owner_scope=Owner(OwnerKind.merchant, "alice")) == []
    assert await listed(EventFilter(types=(EventType.hold_placed,))) == [
        (EventType.hold_placed, bob.id, ledger_operator)
    ]
    assert await listed(
        EventFilter(owner_id="shop", types=(EventType.transfer, EventType.wallet_created))
    ) == [(EventType.wallet_created, shop.id), (EventType.transfer, alice.id, shop.id)]
    assert await listed(EventFilter(owner_id="nobody")) == []


async def operator(ledger: Ledger) -> int:
    async with ledger.pool.acquire() as connection:
        found: int = await connection.fetchval(
            "select id from wallets where owner_kind = 3 and owner_id = 'operator' and unit = 'EUR'"
        )
        return found


async def test_cursors_are_checked(ledger: Ledger) -> None:
    end = await head(ledger)
    with pytest.raises(errors.InvalidArgument, match="after_cursor"):
        await ledger.list_events(EventCursor(end.position + 1))
    with pytest.raises(errors.InvalidArgument, match="after_cursor"):
        await ledger.list_events(EventCursor(end.position, 1))
    for text in ("x", "AAAAAAAAAAUAAAAD=", EventCursor(1, 2).text + "A", "AAAAAAAAAAAAAAAA"):
        with pytest.raises(errors.InvalidArgument, match="after_cursor"):
            EventCursor.parse(text)
    assert EventCursor.parse(EventCursor(7, 2).text) == EventCursor(7, 2)
    assert EventCursor.parse("") is None


# Low balance and top-up ------------------------------------------------------------------------


async def test_low_balance_fires_once_per_crossing_and_rearms(ledger: Ledger) -> None:
    customer = await wallet(ledger, low_balance_threshold=300, top_up_to=1000)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=500))
    before = await head(ledger)

    async def debit(amount: int) -> None:
        await one(ledger, Debit(idempotency_key=key(), wallet_id=customer.id, amount=amount))

    await debit(100)  # 400: above
    await debit(100)  # 300: at, not below
    await debit(1)  # 299: crosses
    await debit(100)  # 199: still below, no new alert
    alerts = [event for event in await since(ledger, before) if event.type >= 60]
    assert [event.type for event in alerts] == [
        EventType.low_balance,
        EventType.top_up_requested,
    ]
    low, top_up = alerts[0].body, alerts[1].body
    assert isinstance(low, LowBalance) and isinstance(top_up, TopUpRequest)
    assert low.balance.available == 299 and low.low_balance_threshold == 300
    assert top_up.amount == 1000 - 299 and top_up.top_up_to == 1000
    assert top_up.request_id == f"top-up:{customer.id}:1"
    assert alerts[0].actor == system_caller and alerts[0].wallet_ids == (customer.id,)
    # The top-up is paid outside, and comes back as a deposit keyed by its request id: a
    # repeated delivery replays, so the wallet is topped up once.
    for attempt in range(2):
        paid = await one(
            ledger,
            Deposit(
                idempotency_key=top_up.request_id,
                wallet_id=customer.id,
                amount=top_up.amount,
                reference=top_up.request_id,
            ),
        )
        assert paid.replayed == (attempt == 1)
    assert (await ledger.get_wallet(customer.id)).balance.available == 199 + 701
    # Back at or above: re-armed; the next crossing is a new request.
    second = await head(ledger)
    await debit(600)
    await debit(1)
    alerts = [event for event in await since(ledger, second) if event.type >= 60]
    assert [event.type for event in alerts] == [EventType.low_balance, EventType.top_up_requested]
    assert alerts[1].body.request_id == f"top-up:{customer.id}:2"  # type: ignore[union-attr]


async def test_a_batch_crossing_back_and_forth_is_judged_by_its_end(ledger: Ledger) -> None:
    customer = await wallet(ledger, low_balance_threshold=100)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=500))
    before = await head(ledger)
    # Down below and up again within one batch: nobody saw it below.
    await ledger.apply(
        [
            Debit(idempotency_key=key(), wallet_id=customer.id, amount=450),
            Credit(idempotency_key=key(), wallet_id=customer.id, amount=450),
        ]
    )
    assert [event.type for event in await since(ledger, before)] == [1, 1]
    # A hold lowers available too; without top_up_to, only LOW_BALANCE.
    before = await head(ledger)
    await one(ledger, PlaceHold(idempotency_key=key(), wallet_id=customer.id, amount=450))
    assert [event.type for event in await since(ledger, before)] == [
        EventType.hold_placed,
        EventType.low_balance,
    ]


async def test_an_alert_set_below_counts_from_the_next_rise(ledger: Ledger) -> None:
    customer = await wallet(ledger)
    await ledger.set_balance_alert(customer.id, low_balance_threshold=100)
    before = await head(ledger)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=50))
    await one(ledger, Debit(idempotency_key=key(), wallet_id=customer.id, amount=10))
    assert EventType.low_balance not in {event.type for event in await since(ledger, before)}
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=100))
    await one(ledger, Debit(idempotency_key=key(), wallet_id=customer.id, amount=100))
    assert EventType.low_balance in {event.type for event in await since(ledger, before)}


async def test_balance_alerts_are_checked(ledger: Ledger) -> None:
    customer = await wallet(ledger)
    with pytest.raises(errors.InvalidArgument, match="top_up_to"):
        await ledger.set_balance_alert(customer.id, low_balance_threshold=None, top_up_to=5)
    with pytest.raises(errors.InvalidArgument, match="top_up_to"):
        await ledger.set_balance_alert(customer.id, low_balance_threshold=10, top_up_to=5)
    with pytest.raises(errors.WalletNotFound):
        await ledger.set_balance_alert(999_999, low_balance_threshold=10)
    with pytest.raises(errors.WalletKindMismatch):
        await ledger.set_balance_alert(await operator(ledger), low_balance_threshold=10)
    await ledger.cancel_wallet(customer.id)
    with pytest.raises(errors.WalletNotActive):
        await ledger.set_balance_alert(customer.id, low_balance_threshold=10)
    with pytest.raises(errors.InvalidArgument, match="top_up_to"):
        NewWallet(
            idempotency_key="k",
            owner_id="o",
            owner_kind=OwnerKind.customer,
            unit="EUR",
            top_up_to=5,
        )


# Retention, events off, watching ---------------------------------------------------------------


async def test_retention_deletes_old_records_and_an_expired_cursor_says_what_is_left(
    database_url: str,
) -> None:
    pool = await create_pool(database_url, size_max=2)
    try:
        clock = Clock()
        ledger = Ledger(pool, clock=clock)
        now = datetime.now(UTC)
        clock.stopped_at = now - timedelta(days=40)
        await ledger.create_unit(Unit(code="EUR", kind=UnitKind.currency, name="Euro"))
        customer = await wallet(ledger)
        for _ in range(3):
            await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=1))
        clock.stopped_at = None
        recent = await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=1))
        assert await ledger.delete_events_before(now - timedelta(days=30)) == 5
        kept, _ = await every_event(ledger)
        assert [event.body.transfer.id for event in kept] == [  # type: ignore[union-attr]
            recent.transfer.id
        ]
        with pytest.raises(errors.EventsCursorExpired, match=repr(EventCursor(6).text)):
            await ledger.list_events(EventCursor(5, 0))
        assert (await ledger.list_events(EventCursor(6))).events == kept
        assert await ledger.delete_events_before(now - timedelta(days=30)) == 0
    finally:
        await pool.close()


async def test_retention_of_everything_leaves_the_positions_counted(database_url: str) -> None:
    pool = await create_pool(database_url, size_max=2)
    try:
        ledger = Ledger(pool)
        await ledger.create_unit(Unit(code="EUR", kind=UnitKind.currency, name="Euro"))
        await wallet(ledger)
        _, end = await every_event(ledger)
        assert await ledger.delete_events_before(datetime.now(UTC) + timedelta(days=1)) == 2
        page = await ledger.list_events()
        assert page.events == [] and page.cursor == end and page.caught_up
        with pytest.raises(errors.EventsCursorExpired):
            await ledger.list_events(EventCursor(1))
    finally:
        await pool.close()


async def test_events_off_records_nothing_and_refuses_reads(database_url: str) -> None:
    pool = await create_pool(database_url, size_max=2)
    try:
        ledger = Ledger(pool, keep_events=False)
        await ledger.create_unit(Unit(code="EUR", kind=UnitKind.currency, name="Euro"))
        customer = await wallet(ledger, low_balance_threshold=10)
        await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=100))
        await one(ledger, Debit(idempotency_key=key(), wallet_id=customer.id, amount=100))
        async with pool.acquire() as connection:
            assert await connection.fetchval("select count(*) from commits") == 0
            assert await connection.fetchval("select position from event_counter") == 0
        with pytest.raises(errors.EventsDisabled):
            await ledger.list_events()
        with pytest.raises(errors.EventsDisabled):
            await anext(ledger.watch_events(None, Listener(database_url)))
    finally:
        await pool.close()


async def test_watchers_follow_live_and_are_bounded(ledger: Ledger, database_url: str) -> None:
    listener = Listener(database_url, poll_interval_s=30)
    listener.start()
    try:
        customer = await wallet(ledger)
        start = await head(ledger)
        ledger.watchers_max = 1
        watcher = ledger.watch_events(start, listener)
        first = asyncio.ensure_future(anext(watcher))
        await asyncio.sleep(0.2)
        assert not first.done()
        with pytest.raises(errors.Overloaded):
            await anext(ledger.watch_events(start, listener))
        # The notification wakes it long before the poll would.
        applied = await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=1))
        event = await asyncio.wait_for(first, 5)
        assert event.body.transfer.id == applied.transfer.id  # type: ignore[union-attr]
        await watcher.aclose()
        assert ledger.watchers == 0
    finally:
        await listener.close()


async def test_low_balance_is_judged_on_what_the_wallet_can_spend(ledger: Ledger) -> None:
    """`available` (get_wallet, the proto) leaves out what grants hold that cannot be
    spent now; the alert must cross on that same balance, and the top-up ask for the
    difference from it."""
    customer = await wallet(ledger, low_balance_threshold=100, top_up_to=300)
    await one(ledger, Credit(idempotency_key=key(), wallet_id=customer.id, amount=200))
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    await one(
        ledger,
        Credit(idempotency_key=key(), wallet_id=customer.id, amount=500, valid_from=tomorrow),
    )
    before = await head(ledger)
    await one(ledger, Debit(idempotency_key=key(), wallet_id=customer.id, amount=150))
    assert (await ledger.get_wallet(customer.id)).balance.available == 50
    alerts = [event for event in await since(ledger, before) if event.type >= 60]
    assert [event.type for event in alerts] == [EventType.low_balance, EventType.top_up_requested]
    top_up = alerts[1].body
    assert isinstance(top_up, TopUpRequest) and top_up.amount == 300 - 50
