"""The reports against a real PostgreSQL, each against a model the test keeps of the operations
it made: the usage register (every filter, paged, with the bound on what a page looks at),
the outstanding overview, balances at every instant between the operations, and the balance
after every history entry."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
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
    NewWallet,
    Operation,
    OwnerKind,
    Payment,
    PlaceHold,
    ReleaseHold,
    Transfer,
    TransferFilter,
    TransferKind,
    Unit,
    UnitKind,
    UsageEntry,
    UsageFilter,
    Void,
    page_size_max,
    posting_kinds,
    usage_kinds,
)
from coffer.core.store import reports, sql
from coffer.core.store.connections import create_pool

_keys = itertools.count(1)
minute = timedelta(minutes=1)
hour = timedelta(hours=1)
day = timedelta(days=1)
microsecond = timedelta(microseconds=1)


def key() -> str:
    return f"reports-{next(_keys)}"


class Clock:
    """The ledger's clock, which the test moves on: `now` plus `shift`."""

    def __init__(self) -> None:
        self.shift = timedelta()

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.shift


# The model -------------------------------------------------------------------------------------


@dataclass
class ModelGrant:
    id: int
    expires_at: datetime | None
    remaining: int

    def spendable(self, now: datetime) -> bool:
        return self.remaining > 0 and (self.expires_at is None or now < self.expires_at)


@dataclass
class ModelHold:
    id: int
    wallet_id: int
    target_wallet_id: int
    amount: int
    placed_at: datetime
    expires_at: datetime
    reserved: list[tuple[int, int]]
    resolved_at: datetime | None = None


@dataclass
class Consumption:
    """A usage entry as the model expects it."""

    transfer: Transfer
    drawn: dict[int, int]
    voided_by: int | None = None


@dataclass
class Model:
    """What the test's operations did, as the test works it out."""

    posted: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    grants: dict[int, list[ModelGrant]] = field(default_factory=lambda: defaultdict(list))
    holds: dict[int, ModelHold] = field(default_factory=dict)
    # Every posting: (id, time, source, target, amount).
    moves: list[tuple[int, datetime, int, int, int]] = field(default_factory=list)
    usage: list[Consumption] = field(default_factory=list)
    # What each spending drew, by transfer: to give back on a void.
    drawn_by: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    owners: dict[int, tuple[str, OwnerKind, str]] = field(default_factory=dict)

    def grant(self, grant_id: int) -> ModelGrant:
        [found] = [g for each in self.grants.values() for g in each if g.id == grant_id]
        return found

    def draw(self, wallet_id: int, amount: int, now: datetime) -> list[tuple[int, int]]:
        """Takes `amount` from the wallet's grants valid now, the soonest expiry first."""
        order = sorted(
            (g for g in self.grants[wallet_id] if g.spendable(now)),
            key=lambda g: (
                g.expires_at is None,
                g.expires_at or datetime.max.replace(tzinfo=UTC),
                g.id,
            ),
        )
        taken = []
        left = amount
        for each in order:
            part = min(each.remaining, left)
            if part:
                each.remaining -= part
                left -= part
                taken.append((each.id, part))
        return taken

    def move(self, transfer: Transfer) -> None:
        self.posted[transfer.source_wallet_id] -= transfer.amount
        self.posted[transfer.target_wallet_id] += transfer.amount
        self.moves.append(
            (
                transfer.id,
                transfer.created_at,
                transfer.source_wallet_id,
                transfer.target_wallet_id,
                transfer.amount,
            )
        )

    def posted_at(self, wallet_id: int, at: datetime) -> int:
        return sum(
            (amount if target == wallet_id else -amount if source == wallet_id else 0)
            for _, time, source, target, amount in self.moves
            if time <= at
        )

    def pending_at(self, wallet_id: int, at: datetime) -> int:
        return sum(
            hold.amount
            for hold in self.holds.values()
            if hold.wallet_id == wallet_id
            and hold.placed_at <= at
            and (hold.resolved_at is None or hold.resolved_at > at)
            and at < hold.expires_at
        )

    def posted_after(self, wallet_id: int, transfer_id: int) -> int:
        return sum(
            (amount if target == wallet_id else -amount if source == wallet_id else 0)
            for id_, _, source, target, amount in self.moves
            if id_ <= transfer_id
        )


@dataclass
class World:
    ledger: Ledger
    clock: Clock
    model: Model
    wallets: dict[str, int]

    def now(self) -> datetime:
        return self.clock()

    async def one(self, operation: Operation) -> Transfer:
        self.clock.shift += minute
        [outcome] = await self.ledger.apply([operation])
        if isinstance(outcome, errors.CofferError):
            raise outcome
        assert isinstance(outcome, Applied)
        return outcome.transfer

    async def adopt(self, wallet_id: int, transfer: Transfer, made: list[ModelGrant]) -> None:
        """Gives the grants the model expects a transfer to have made their ids."""
        page = await self.ledger.list_grants(wallet_id, include_spent=True, page_size=page_size_max)
        found = [grant for grant in page.items if grant.transfer_id == transfer.id]
        assert [(g.amount, g.expires_at) for g in found] == [
            (g.remaining, g.expires_at) for g in made
        ]
        for grant, model_grant in zip(found, made, strict=True):
            model_grant.id = grant.id
            self.model.grants[wallet_id].append(model_grant)

    async def credit(
        self, name: str, amount: int, expires_in: timedelta | None = None, **options: str
    ) -> Transfer:
        wallet_id = self.wallets[name]
        expires_at = None if expires_in is None else self.now() + minute + expires_in
        transfer = await self.one(
            Credit(
                idempotency_key=key(),
                wallet_id=wallet_id,
                amount=amount,
                expires_at=expires_at,
                **options,
            )
        )
        self.model.move(transfer)
        if expires_at is not None:
            await self.adopt(wallet_id, transfer, [ModelGrant(0, expires_at, amount)])
        return transfer

    async def deposit(self, name: str, amount: int) -> Transfer:
        transfer = await self.one(
            Deposit(
                idempotency_key=key(),
                wallet_id=self.wallets[name],
                amount=amount,
                reference="iban:1",
            )
        )
        self.model.move(transfer)
        return transfer

    def consumed(self, transfer: Transfer, drawn: list[tuple[int, int]]) -> None:
        summed: dict[int, int] = defaultdict(int)
        for grant_id, amount in drawn:
            summed[grant_id] += amount
        self.model.usage.append(Consumption(transfer, dict(summed)))

    async def debit(
        self, name: str, amount: int, *, up_to: bool = False, **options: str
    ) -> Transfer:
        wallet_id = self.wallets[name]
        mode = DebitMode.up_to if up_to else DebitMode.all_or_nothing
        transfer = await self.one(
            Debit(idempotency_key=key(), wallet_id=wallet_id, amount=amount, mode=mode, **options)
        )
        drawn = self.model.draw(wallet_id, transfer.amount, transfer.created_at)
        self.model.drawn_by[transfer.id] = drawn
        self.model.move(transfer)
        self.consumed(transfer, drawn)
        return transfer

    async def pay(self, payer: str, payee: str, amount: int, **options: str) -> Transfer:
        payer_id, payee_id = self.wallets[payer], self.wallets[payee]
        transfer = await self.one(
            Payment(
                idempotency_key=key(),
                payer_wallet_id=payer_id,
                payee_wallet_id=payee_id,
                amount=amount,
                **options,
            )
        )
        drawn = self.model.draw(payer_id, amount, transfer.created_at)
        self.model.move(transfer)
        self.consumed(transfer, drawn)
        # It reaches the payee untracked: a payment makes no grant.
        await self.adopt(payee_id, transfer, [])
        return transfer

    async def place_hold(
        self, name: str, amount: int, timeout: timedelta = hour, target: str | None = None
    ) -> ModelHold:
        wallet_id = self.wallets[name]
        operation = PlaceHold(
            idempotency_key=key(),
            wallet_id=wallet_id,
            amount=amount,
            timeout_s=int(timeout.total_seconds()),
            target_wallet_id=None if target is None else self.wallets[target],
        )
        transfer = await self.one(operation)
        hold = ModelHold(
            transfer.id,
            wallet_id,
            transfer.target_wallet_id,
            amount,
            transfer.created_at,
            transfer.created_at + timeout,
            self.model.draw(wallet_id, amount, transfer.created_at),
        )
        self.model.holds[hold.id] = hold
        return hold

    async def capture(self, hold: ModelHold, amount: int, **options: str) -> Transfer:
        transfer = await self.one(
            CaptureHold(idempotency_key=key(), hold_id=hold.id, amount=amount, **options)
        )
        assert transfer.amount == amount
        hold.resolved_at = transfer.created_at
        left = amount
        drawn = []
        for grant_id, reserved in hold.reserved:
            taken = min(reserved, left)
            left -= taken
            self.model.grant(grant_id).remaining += reserved - taken
            if taken:
                drawn.append((grant_id, taken))
        self.model.move(transfer)
        self.consumed(transfer, drawn)
        return transfer

    async def release(self, hold: ModelHold) -> Transfer:
        transfer = await self.one(ReleaseHold(idempotency_key=key(), hold_id=hold.id))
        hold.resolved_at = transfer.created_at
        for grant_id, reserved in hold.reserved:
            self.model.grant(grant_id).remaining += reserved
        return transfer

    async def void(self, spent: Transfer) -> Transfer:
        transfer = await self.one(Void(idempotency_key=key(), transfer_id=spent.id))
        for grant_id, part in self.model.drawn_by[spent.id]:
            self.model.grant(grant_id).remaining += part
        self.model.move(transfer)
        [entry] = [each for each in self.model.usage if each.transfer.id == spent.id]
        entry.voided_by = transfer.id
        return transfer

    async def expire(self) -> None:
        """An expiration run: the model takes what is left of the grants past their expiry."""
        assert await self.ledger.expire_grants() > 0
        page = await self.ledger.list_transfers(
            TransferFilter(kinds=(TransferKind.expiration,)), page_size=page_size_max
        )
        known = {move[0] for move in self.model.moves}
        for transfer in reversed(page.items):
            if transfer.id not in known:
                self.model.move(transfer)
                for each in self.model.grants[transfer.source_wallet_id]:
                    if each.expires_at is not None and each.expires_at <= transfer.created_at:
                        each.remaining = 0


@pytest_asyncio.fixture(loop_scope="session")
async def world(database_url: str) -> AsyncIterator[World]:
    pool = await create_pool(database_url, size_max=4)
    try:
        clock = Clock()
        ledger = Ledger(pool, clock=clock)
        await ledger.create_unit(Unit(code="seat", kind=UnitKind.credit, name="seat"))
        await ledger.create_unit(Unit(code="EUR", kind=UnitKind.currency, name="Euro", scale=2))
        model = Model()
        wallets = {}
        for name, owner, kind, unit in (
            ("ann", "ann", OwnerKind.customer, "seat"),
            ("ben", "ben", OwnerKind.customer, "seat"),
            ("cat", "cat", OwnerKind.customer, "seat"),
            ("shop", "shop", OwnerKind.merchant, "seat"),
            ("ann-eur", "ann", OwnerKind.customer, "EUR"),
            ("shop-eur", "shop", OwnerKind.merchant, "EUR"),
            ("empty", "dan", OwnerKind.customer, "seat"),
        ):
            created, _ = await ledger.create_wallet(
                NewWallet(idempotency_key=key(), owner_id=owner, owner_kind=kind, unit=unit)
            )
            wallets[name] = created.id
            model.owners[created.id] = (owner, kind, unit)
        yield World(ledger, clock, model, wallets)
    finally:
        await pool.close()


async def scenario(world: World) -> dict[str, Transfer]:
    """Several wallets, owners and units; grants with and without expiry, spent in part, by
    debits, payments and captures; a void; a hold that lapses, released by a later batch; an
    expiration run; and a grant past its expiry that no run has expired yet."""
    done: dict[str, Transfer] = {}
    await world.credit("ann", 100, 10 * day, performed_by="ops", reference="pack-1")
    await world.credit("ann", 50, 3 * day, performed_by="ops")
    await world.credit("ann", 70)
    done["ann-debit"] = await world.debit("ann", 80, performed_by="coach:bo", reference="s-1")
    await world.credit("ben", 40, 5 * day)
    await world.credit("ben", 100)
    done["ben-pays"] = await world.pay("ben", "shop", 60, performed_by="ben", reference="o-1")
    hold = await world.place_hold("ann", 90, target="shop")
    done["ann-capture"] = await world.capture(hold, 50, performed_by="pos", reference="o-2")
    await world.credit("cat", 30)
    done["cat-debit"] = await world.debit("cat", 10, performed_by="coach:bo")
    # A hold of cat's that lapses; the next batch on cat releases it, stamped later.
    await world.place_hold("cat", 15, timeout=90 * timedelta(seconds=1))
    world.clock.shift += 2 * minute
    done["cat-debit-2"] = await world.debit("cat", 5, performed_by="coach:bo", reference="s-1")
    done["ann-void"] = await world.void(done["ann-debit"])
    await world.deposit("ann-eur", 10_000)
    done["eur-pays"] = await world.pay("ann-eur", "shop-eur", 2500, reference="o-3")
    done["eur-up-to"] = await world.debit("ann-eur", 20_000, up_to=True, performed_by="ops")
    done["shop-debit"] = await world.debit("shop", 5, performed_by="pos")
    released = await world.place_hold("ben", 20)
    await world.release(released)
    done["ben-debit"] = await world.debit("ben", 30, performed_by="ben")
    # A grant that expires, and a run that expires it.
    await world.credit("ben", 10, 2 * hour)
    world.clock.shift += 3 * hour
    await world.expire()
    # One past its expiry that no run has expired yet.
    await world.credit("cat", 12, hour)
    done["ann-debit-2"] = await world.debit("ann", 20, performed_by="coach:bo", reference="s-2")
    world.clock.shift += 2 * hour
    return done


# The usage register ----------------------------------------------------------------------------


def expected(world: World, keep: Callable[[Consumption], bool]) -> list[tuple[object, ...]]:
    return [
        (each.transfer.id, each.transfer.kind, each.transfer.amount, each.drawn, each.voided_by)
        for each in sorted(world.model.usage, key=lambda each: -each.transfer.id)
        if keep(each)
    ]


def seen(entries: list[UsageEntry]) -> list[tuple[object, ...]]:
    return [
        (
            entry.transfer.id,
            entry.transfer.kind,
            entry.transfer.amount,
            {each.grant_id: each.amount for each in entry.drawn},
            entry.transfer.voided_by_transfer_id,
        )
        for entry in entries
    ]


async def every_page(
    world: World, where: UsageFilter, page_size: int, scanned_max: int
) -> tuple[list[UsageEntry], int]:
    """Every entry, page after page; and how many pages it took."""
    entries: list[UsageEntry] = []
    before_id = None
    pages = 0
    async with world.ledger.read_pool.acquire() as connection:
        while True:
            page = await reports.list_usage(
                connection,
                where,
                page_size=page_size,
                before_id=before_id,
                scanned_max=scanned_max,
            )
            pages += 1
            assert len(page.items) <= page_size
            entries.extend(page.items)
            if page.cursor is None:
                return entries, pages
            assert before_id is None or page.cursor < before_id
            before_id = page.cursor


async def test_the_usage_register_lists_each_consumption_with_the_grants_it_drew(
    world: World,
) -> None:
    done = await scenario(world)
    wallets, owners = world.wallets, world.model.owners
    every = await world.ledger.list_usage(UsageFilter(), page_size=page_size_max)
    assert every.cursor is None
    assert seen(every.items) == expected(world, lambda each: True)
    assert {entry.transfer.kind for entry in every.items} == usage_kinds
    by_id = {entry.transfer.id: entry for entry in every.items}
    # The debit drew the soonest expiry first, then the next; the rest, nothing untracked.
    ann_debit = by_id[done["ann-debit"].id]
    assert [each.amount for each in ann_debit.drawn] == [50, 30] and ann_debit.untracked == 0
    assert ann_debit.drawn[0].expires_at is not None
    assert ann_debit.transfer.voided_by_transfer_id == done["ann-void"].id
    assert (ann_debit.transfer.performed_by, ann_debit.transfer.reference) == ("coach:bo", "s-1")
    # The payment drew its grant whole, then untracked funds.
    ben_pays = by_id[done["ben-pays"].id]
    assert [each.amount for each in ben_pays.drawn] == [40] and ben_pays.untracked == 20
    # The capture took 50 of the 70 its hold reserved from a grant, the rest returned.
    ann_capture = by_id[done["ann-capture"].id]
    assert [each.amount for each in ann_capture.drawn] == [50] and ann_capture.untracked == 0
    assert by_id[done["cat-debit"].id].drawn == () and by_id[done["cat-debit"].id].untracked == 10
    assert by_id[done["eur-up-to"].id].transfer.amount == 7500

    t = {name: transfer.created_at for name, transfer in done.items()}
    cases: list[tuple[UsageFilter, Callable[[Consumption], bool]]] = [
        (UsageFilter(), lambda each: True),
        (
            UsageFilter(wallet_id=wallets["ann"]),
            lambda each: each.transfer.source_wallet_id == wallets["ann"],
        ),
        (
            UsageFilter(owner_id="ann"),
            lambda each: owners[each.transfer.source_wallet_id][0] == "ann",
        ),
        (
            UsageFilter(owner_id="shop", owner_kind=OwnerKind.merchant),
            lambda each: owners[each.transfer.source_wallet_id][0] == "shop",
        ),
        (UsageFilter(owner_id="shop", owner_kind=OwnerKind.customer), lambda each: False),
        (
            UsageFilter(owner_id="ann", unit="EUR"),
            lambda each: each.transfer.source_wallet_id == wallets["ann-eur"],
        ),
        (
            UsageFilter(owner_id="ann", wallet_id=wallets["ann"]),
            lambda each: each.transfer.source_wallet_id == wallets["ann"],
        ),
        (UsageFilter(owner_id="ann", wallet_id=wallets["ben"]), lambda each: False),
        (UsageFilter(wallet_id=wallets["ann"], unit="EUR"), lambda each: False),
        (
            UsageFilter(wallet_id=wallets["ann-eur"], unit="EUR"),
            lambda each: each.transfer.source_wallet_id == wallets["ann-eur"],
        ),
        (UsageFilter(unit="EUR"), lambda each: each.transfer.unit == "EUR"),
        (UsageFilter(unit="seat"), lambda each: each.transfer.unit == "seat"),
        (
            UsageFilter(performed_by="coach:bo"),
            lambda each: each.transfer.performed_by == "coach:bo",
        ),
        (UsageFilter(reference="s-1"), lambda each: each.transfer.reference == "s-1"),
        (
            UsageFilter(reference="s-1", wallet_id=wallets["cat"]),
            lambda each: (
                each.transfer.reference == "s-1"
                and each.transfer.source_wallet_id == wallets["cat"]
            ),
        ),
        (
            UsageFilter(start=t["ben-pays"], end=t["eur-pays"]),
            lambda each: t["ben-pays"] <= each.transfer.created_at < t["eur-pays"],
        ),
        (UsageFilter(start=t["ben-pays"], end=t["ben-pays"]), lambda each: False),
        (
            UsageFilter(unit="seat", performed_by="coach:bo", start=t["cat-debit"]),
            lambda each: (
                each.transfer.unit == "seat"
                and each.transfer.performed_by == "coach:bo"
                and each.transfer.created_at >= t["cat-debit"]
            ),
        ),
        (UsageFilter(wallet_id=wallets["empty"]), lambda each: False),
        (UsageFilter(owner_id="nobody"), lambda each: False),
    ]
    for where, keep in cases:
        want = expected(world, keep)
        # Whole pages; pages of one and two; looks bounded to a few transfers a page.
        for page_size, scanned_max in ((1000, 10_000), (1, 10_000), (2, 3), (1, 1), (5, 2)):
            found, pages = await every_page(world, where, page_size, scanned_max)
            assert seen(found) == want, (where, page_size, scanned_max)
            if scanned_max >= 1000:
                assert pages == max(1, -(-len(want) // page_size)), (where, page_size)


async def test_a_capture_from_a_grant_voided_since_its_hold(world: World) -> None:
    """A hold reserves from a grant; the void of the credit that made the grant takes it back
    (the wallet's other funds cover it); a capture in part then takes from the grant, and the
    rest of the reservation returns nothing to it: the capture drew what it took, not what the
    hold reserved."""
    await world.credit("ben", 100)
    granted = await world.credit("ben", 10, 10 * day)
    hold = await world.place_hold("ben", 8)
    await world.one(Void(idempotency_key=key(), transfer_id=granted.id))
    captured = await world.one(CaptureHold(idempotency_key=key(), hold_id=hold.id, amount=5))
    page = await world.ledger.list_usage(UsageFilter(wallet_id=world.wallets["ben"]))
    [entry] = [each for each in page.items if each.transfer.id == captured.id]
    assert [(each.grant_id, each.amount) for each in entry.drawn] == [(hold.reserved[0][0], 5)]
    assert entry.untracked == 0


async def test_a_bounded_look_gives_short_pages_that_go_on(world: World) -> None:
    await world.credit("cat", 10)
    spent = await world.debit("cat", 1, reference="rare")
    for _ in range(6):
        await world.credit("cat", 1)
    async with world.ledger.read_pool.acquire() as connection:
        # Newest first: six credits, then the debit: the first page looks at four, finds none.
        page = await reports.list_usage(
            connection, UsageFilter(), page_size=10, before_id=None, scanned_max=4
        )
        assert page.items == [] and page.cursor is not None
        page = await reports.list_usage(
            connection, UsageFilter(), page_size=10, before_id=page.cursor, scanned_max=4
        )
        assert [entry.transfer.id for entry in page.items] == [spent.id]


async def test_an_owners_wallets_are_merged_page_by_page(world: World) -> None:
    """An owner's wallets, each looked at along its own index, as far as its bound: a page
    holds only what is known of every wallet, so that none of the wallet looked at less far
    is skipped."""
    for name in ("eve-1", "eve-2"):
        created, _ = await world.ledger.create_wallet(
            NewWallet(
                idempotency_key=key(), owner_id="eve", owner_kind=OwnerKind.customer, unit="seat"
            )
        )
        world.wallets[name] = created.id
        world.model.owners[created.id] = ("eve", OwnerKind.customer, "seat")
        await world.credit(name, 1000)
    for step in "1222h1h2h2h1h2221h1h12":
        if step == "h":
            await world.place_hold("eve-1", 1)
        else:
            await world.debit(f"eve-{step}", 1)
    want = expected(
        world, lambda each: world.model.owners[each.transfer.source_wallet_id][0] == "eve"
    )
    assert len(want) == 15
    for page_size in (1, 2, 3, 5, 100):
        for scanned_max in (1, 2, 3, 4, 7, 100):
            found, _ = await every_page(world, UsageFilter(owner_id="eve"), page_size, scanned_max)
            assert seen(found) == want, (page_size, scanned_max)


async def test_usage_pages_are_index_range_scans(world: World) -> None:
    """The plans: one index range scan each (along the source's index per wallet, the
    reference's, the primary key), bounded, never a scan of the table."""
    await scenario(world)
    plans = {}
    async with world.ledger.read_pool.acquire() as connection:
        for name, where, wallet_ids in (
            ("wallets", UsageFilter(), [world.wallets["ann"], world.wallets["ben"]]),
            ("reference", UsageFilter(reference="s-1"), None),
            ("all", UsageFilter(unit="seat", performed_by="ops"), None),
        ):
            query, arguments = sql.select_usage_scan(
                where, wallet_ids, [2, 6, 8], 10**9, 10_000, 102
            )
            plans[name] = await plan(connection, query, *arguments)
    assert "Index Scan Backward using transfers_source" in plans["wallets"]
    assert "transfers_reference" in plans["reference"]
    assert "Index Scan Backward using transfers_pkey" in plans["all"]
    for each in plans.values():
        assert "Seq Scan on transfers" not in each, each


async def plan(connection: asyncpg.Connection, query: str, *arguments: object) -> str:
    """The plan of a statement as the planner makes it for tables far larger than the test's:
    for those, against a page's limit, it walks an index in order; on tables this small it
    would read them whole, or sort a bitmap's rows. So sequential and bitmap scans and sorts
    are off: a plan that needs one still shows it."""
    async with connection.transaction():
        for setting in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            await connection.execute(f"set local {setting} = off")
        found = await connection.fetch("explain " + query, *arguments)
    return "\n".join(row[0] for row in found)


# Outstanding -----------------------------------------------------------------------------------


async def test_the_outstanding_overview_of_each_unit(world: World) -> None:
    await scenario(world)
    now = world.now()
    model = world.model
    for unit in ("seat", "EUR"):
        for days in (0, 1, 4, 30):
            horizon = now + timedelta(days=days)
            rows = []
            for wallet_id, (owner, kind, wallet_unit) in sorted(model.owners.items()):
                posted = model.posted[wallet_id]
                if wallet_unit != unit or posted <= 0:
                    continue
                grants = model.grants[wallet_id]
                unspendable = sum(
                    g.remaining for g in grants if g.expires_at is not None and g.expires_at <= now
                )
                pending = model.pending_at(wallet_id, now)
                expiring = sum(
                    g.remaining
                    for g in grants
                    if g.expires_at is not None and g.expires_at <= horizon
                )
                rows.append(
                    (wallet_id, owner, kind, posted, posted - pending - unspendable, expiring)
                )
            for page_size in (1, 2, 100):
                found = []
                after_id = 0
                while True:
                    page = await world.ledger.outstanding(
                        unit, expiring_within_days=days, page_size=page_size, after_id=after_id
                    )
                    assert page.unit == unit and page.horizon > horizon - minute
                    if after_id == 0:
                        assert page.totals is not None
                        assert (
                            page.totals.wallets,
                            page.totals.outstanding,
                            page.totals.expiring,
                        ) == (len(rows), sum(r[3] for r in rows), sum(r[5] for r in rows))
                    else:
                        assert page.totals is None
                    found.extend(
                        (
                            each.wallet_id,
                            each.owner_id,
                            each.owner_kind,
                            each.balance.posted,
                            each.balance.available,
                            each.expiring,
                        )
                        for each in page.wallets
                    )
                    if page.cursor is None:
                        break
                    after_id = page.cursor
                assert found == rows, (unit, days, page_size)
    # Something is past its expiry, not yet expired by a run: it counts at 0 days.
    seat = await world.ledger.outstanding("seat")
    assert seat.totals is not None and seat.totals.expiring > 0
    with pytest.raises(errors.UnitNotFound):
        await world.ledger.outstanding("nothing")
    for days in (-1, 36_501):
        with pytest.raises(errors.InvalidArgument) as raised:
            await world.ledger.outstanding("seat", expiring_within_days=days)
        assert raised.value.field == "expiring_within_days"


# Balances at past instants ---------------------------------------------------------------------


async def test_the_balance_at_every_instant_between_the_operations(world: World) -> None:
    await scenario(world)
    model = world.model
    times = sorted(
        {move[1] for move in model.moves}
        | {hold.placed_at for hold in model.holds.values()}
        | {hold.expires_at for hold in model.holds.values() if hold.expires_at < world.now()}
        | {hold.resolved_at for hold in model.holds.values() if hold.resolved_at is not None}
    )
    instants = {times[0] - minute}
    for earlier, later in itertools.pairwise(times):
        instants |= {earlier, earlier + (later - earlier) / 2, later - microsecond}
    instants.add(times[-1])
    assert len(instants) > 50
    for name, wallet_id in world.wallets.items():
        for at in sorted(instants):
            found = await world.ledger.past_balance(wallet_id, at)
            assert (found.posted, found.pending) == (
                model.posted_at(wallet_id, at),
                model.pending_at(wallet_id, at),
            ), (name, at)
            assert found.unit == model.owners[wallet_id][2] and found.at == at
    # Now is the wallet's balance now; a time to come is refused.
    ann = world.wallets["ann"]
    now = world.now()
    wallet = await world.ledger.get_wallet(ann)
    past = await world.ledger.past_balance(ann, now)
    assert (past.posted, past.pending) == (wallet.balance.posted, wallet.balance.pending)
    with pytest.raises(errors.InvalidArgument) as raised:
        await world.ledger.past_balance(ann, now + hour)
    assert raised.value.field == "time"
    with pytest.raises(errors.WalletNotFound):
        await world.ledger.past_balance(9_000_000, now)


async def test_a_lapsed_hold_held_nothing_before_its_release_was_stamped(world: World) -> None:
    await world.credit("cat", 30)
    hold = await world.place_hold("cat", 20, timeout=timedelta(seconds=30))
    world.clock.shift += 5 * minute
    # The next batch on the wallet releases it, stamped minutes after it lapsed.
    await world.debit("cat", 1)
    releases = await world.ledger.list_transfers(
        TransferFilter(wallet_id=world.wallets["cat"], kinds=(TransferKind.hold_expiry,))
    )
    [release] = releases.items
    assert release.created_at > hold.expires_at + 4 * minute
    cat = world.wallets["cat"]
    for at, pending in (
        (hold.placed_at, 20),
        (hold.expires_at - microsecond, 20),
        (hold.expires_at, 0),
        (release.created_at, 0),
    ):
        assert (await world.ledger.past_balance(cat, at)).pending == pending


async def test_a_transfer_stamped_after_an_instant_counts_after_it_whatever_its_id(
    world: World,
) -> None:
    """A batch stamps its transfers as it begins and draws their ids as it goes: a transfer
    with a lower id may be stamped later than one with a higher id. The walk back meets it
    though a transfer stamped before the instant comes first."""
    await world.credit("cat", 50)
    lower = await world.credit("cat", 7)
    higher = await world.credit("cat", 3)
    cat = world.wallets["cat"]
    # As if `lower` had waited for a lock half a minute longer than `higher` took.
    stamped = higher.created_at + 30 * timedelta(seconds=1)
    async with world.ledger.pool.acquire() as connection:
        await connection.execute(
            "update transfers set created_at = $2 where id = $1", lower.id, stamped
        )
    world.clock.shift += minute
    assert (await world.ledger.past_balance(cat, higher.created_at)).posted == 53
    assert (await world.ledger.past_balance(cat, stamped - microsecond)).posted == 53
    assert (await world.ledger.past_balance(cat, stamped)).posted == 60
    assert (await world.ledger.past_balance(cat, higher.created_at - microsecond)).posted == 50


async def test_the_walk_back_is_an_index_range_scan(world: World) -> None:
    await scenario(world)
    async with world.ledger.read_pool.acquire() as connection:
        found = await plan(
            connection,
            sql.select_transfers_after,
            world.wallets["ann"],
            world.now() - hour,
            world.now() - 2 * hour,
        )
    assert "Index Scan Backward using transfers_source" in found
    assert "Index Scan Backward using transfers_target" in found
    assert "Seq Scan on transfers" not in found


# Balances after history entries ----------------------------------------------------------------


async def test_every_history_entry_carries_the_balance_after_it(world: World) -> None:
    await scenario(world)
    model = world.model
    checked = 0
    for name, wallet_id in world.wallets.items():
        for kinds in ((), (TransferKind.debit,), (TransferKind.credit, TransferKind.hold)):
            for page_size in (1, 3, 1000):
                entries: list[Transfer] = []
                before_id = None
                while True:
                    page = await world.ledger.list_transfers(
                        TransferFilter(wallet_id=wallet_id, kinds=kinds),
                        page_size=page_size,
                        before_id=before_id,
                    )
                    entries.extend(page.items)
                    if page.cursor is None:
                        break
                    before_id = page.cursor
                for entry in entries:
                    assert entry.balance_after == model.posted_after(wallet_id, entry.id), (
                        name,
                        entry,
                    )
                    if entry.kind in posting_kinds:
                        sign = 1 if entry.target_wallet_id == wallet_id else -1
                        assert entry.signed_amount == sign * entry.amount
                    else:
                        assert entry.signed_amount == 0
                    checked += 1
        newest = await world.ledger.list_transfers(TransferFilter(wallet_id=wallet_id))
        if newest.items:
            wallet = await world.ledger.get_wallet(wallet_id)
            assert newest.items[0].balance_after == wallet.balance.posted
    assert checked > 100
    # Without a wallet, none.
    page = await world.ledger.list_transfers(TransferFilter())
    assert page.items and all(
        each.balance_after is None and each.signed_amount is None for each in page.items
    )
