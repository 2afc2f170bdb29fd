"""The ledger on PostgreSQL: applies batches of operations, and answers queries.

`Ledger` is the one entry point; the work is done in `coffer.core.store`: `connections` (the
pools and the boundary that turns a lost database into errors.Unavailable), `sql` (every
statement), `rows` (rows to values), `facts` (what never changes, cached), `catalog` (units and
wallets), `queries` (transfers and holds), `reports` (usage, outstanding, past balances, the
balances after history entries), `keys` (idempotency keys), `batch` (a batch, in the phases
its docstring numbers) and `journal` (what a batch writes).

A batch is one database transaction. Keys are stored in the same transaction as the postings:
a success's on its first transfer, a refusal's (NOT_FOUND, FAILED_PRECONDITION,
LINKED_OPERATION_FAILED) in `refusals`; a replay after a crash or a restart finds them, and
answers what was answered first. Two batches racing on one new key meet at a unique index, or
when the later checks, with its locks held, that its keys are still free: the same request
locks the same wallets, so the later batch sees what the earlier one stored once it holds the
locks. The later starts over, looks its keys up first, and answers with the stored outcome.
(Two different requests racing under one key, on wallets apart, can each be answered before
either is stored: each replays its own answer after, and any other request with that key is
IDEMPOTENCY_KEY_REUSED. Likewise a request naming a wallet, transfer or hold whose creation is
not yet committed locks nothing, is refused as not found, and a copy racing it may find the
thing created and apply: the key then holds both, and replays answer with the success, which
moved money. Ids are told only once their creation has committed, so only a guessed id can
meet this.)

Events (`store.events`): every write transaction that changes something ends with its record,
in commit order; `list_events` reads them, `watch_events` follows them live, woken by a
`store.listener.Listener`. With `keep_events` false the ledger writes no records (and no
balance alerts fire), and reading them is EventsDisabled.

Connections come from two pools: writes (batches, units, wallets) from one, queries from
another, smaller one, so that long history scans cannot take the connections writes need.

One clock, the ledger's (`clock`, Python's by default), tells when a hold lapses, everywhere:
a batch stamps its transfers and sets a hold's expiry with it, so the hold lapses on the clock
that set it; the statements that read balances and holds take it as a parameter rather than
use the database's now() (the time its transaction began, on another machine's clock), so
that a wallet, a hold and a batch read at one instant agree on which holds still hold money.
Servers sharing a database each read their own clock: kept in step (NTP), they differ by far
less than the shortest hold (a second).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable, Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg

from . import errors, rules
from .model import (
    Applied,
    Balance,
    CaptureHold,
    Event,
    EventCursor,
    EventFilter,
    EventPage,
    EventType,
    Grant,
    Hold,
    NewWallet,
    Operation,
    Outstanding,
    Owner,
    OwnerKind,
    Page,
    PastBalance,
    Rejected,
    ReleaseHold,
    Transfer,
    TransferFilter,
    TransferKind,
    Unit,
    UsageEntry,
    UsageFilter,
    Void,
    Wallet,
    batch_operations_max,
    check_balance_alert,
    events_watchers_max_default,
    expiration_run_batches_max,
    expiration_runs_grants_max,
    expiring_within_days_max,
    page_size_default,
    page_size_max,
    system_caller,
)
from .store import catalog, events, grants, queries, reports, sql
from .store.batch import Batch, expiry
from .store.connections import Guarded
from .store.facts import Facts
from .store.keys import KeyStored, key_constraints
from .store.listener import Listener

__all__ = ["Ledger", "expiry_batch_max", "transaction_retries_max", "watchers_retry_after_ms"]

transaction_retries_max = 5
# Lapsed holds one sweep releases, in one batch.
expiry_batch_max = 1000
# A watcher refused as one too many is told to try again after this long.
watchers_retry_after_ms = 1000

_no_filter = EventFilter()
_retryable_database_errors = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)


def _system_clock() -> datetime:
    return datetime.now(UTC)


class Ledger:
    """`pool` serves writes; `read_pool` (by default the same) serves queries. Waiting for a
    connection of either takes at most `acquire_timeout_s` (None: no bound). `clock` tells
    the time: of transfers, of hold expiries, and whether a hold has lapsed. With
    `keep_events`, every write records its events; `watchers_max` watchers may follow them at
    once."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        read_pool: asyncpg.Pool | None = None,
        acquire_timeout_s: float | None = None,
        clock: Callable[[], datetime] = _system_clock,
        keep_events: bool = True,
        watchers_max: int = events_watchers_max_default,
    ) -> None:
        self._pool = pool
        self._read_pool = read_pool or pool
        self._acquire_timeout_s = acquire_timeout_s
        self._clock = clock
        self._facts = Facts()
        self.keep_events = keep_events
        self.watchers_max = watchers_max
        self.watchers = 0

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @property
    def read_pool(self) -> asyncpg.Pool:
        return self._read_pool

    async def close(self) -> None:
        await self._pool.close()
        if self._read_pool is not self._pool:
            await self._read_pool.close()

    # Units -------------------------------------------------------------------------------------

    async def create_unit(self, unit: Unit, *, actor: str = system_caller) -> Unit:
        """Creates the unit and its system wallets; idempotent for the same definition.
        `actor`: the caller its event names."""
        async with self._connection(transaction=True) as connection:
            created, new = await catalog.create_unit(connection, unit)
            if new and self.keep_events:
                await events.record(
                    connection, self._now(), changes=[events.unit_change(created, actor)]
                )
        self._facts.unit_created(created)
        return created

    async def get_unit(self, code: str) -> Unit:
        async with self._read_connection() as connection:
            return await catalog.get_unit(connection, code)

    async def unit_scales(self, units: Collection[str]) -> Mapping[str, int]:
        """The scale of each of the units that exist (the mapping may hold others too), for
        answers to say how to read their amounts. A unit never changes once created, so each is
        read once per process; a call whose units are all known costs no connection and no
        query."""
        known = self._facts.unit_scales_known(units)
        if known is not None:
            return known
        async with self._read_connection() as connection:
            return await self._facts.unit_scales(connection, units)

    async def list_units(self) -> list[Unit]:
        async with self._read_connection() as connection:
            return await catalog.list_units(connection)

    # Wallets -----------------------------------------------------------------------------------

    async def create_wallet(self, new: NewWallet) -> tuple[Wallet, bool]:
        """Creates the wallet; returns it, and whether this was a replay of an earlier
        request with the same key (the wallet it created then)."""
        now = self._now()
        async with self._connection(transaction=True) as connection:
            wallet, replayed = await catalog.create_wallet(connection, new, now)
            if not replayed and self.keep_events:
                change = events.wallet_change(EventType.wallet_created, wallet, new.caller)
                await events.record(connection, now, changes=[change])
            return wallet, replayed

    async def get_wallet(self, wallet_id: int) -> Wallet:
        async with self._read_connection() as connection:
            return await catalog.get_wallet(connection, wallet_id, self._now())

    async def list_wallets(
        self,
        *,
        owner_id: str | None = None,
        owner_kind: OwnerKind | None = None,
        unit: str | None = None,
        page_size: int = page_size_default,
        after_id: int = 0,
    ) -> Page[Wallet]:
        async with self._read_connection() as connection:
            return await catalog.list_wallets(
                connection,
                self._now(),
                owner_id=owner_id,
                owner_kind=owner_kind,
                unit=unit,
                page_size=page_size,
                after_id=after_id,
            )

    async def wallet_owners(self, wallet_ids: Collection[int]) -> dict[int, Owner]:
        """The owner of each of the wallets that exist (system wallets' too)."""
        async with self._read_connection() as connection:
            found = await connection.fetch(sql.select_wallet_owners, list(wallet_ids))
        return {row["id"]: Owner(OwnerKind(row["owner_kind"]), row["owner_id"]) for row in found}

    async def cancel_wallet(self, wallet_id: int, *, actor: str = system_caller) -> Wallet:
        now = self._now()
        async with self._connection(transaction=True) as connection:
            wallet, cancelled = await catalog.cancel_wallet(connection, wallet_id, now)
            if cancelled and self.keep_events:
                change = events.wallet_change(EventType.wallet_cancelled, wallet, actor)
                await events.record(connection, now, changes=[change])
            return wallet

    async def set_balance_alert(
        self,
        wallet_id: int,
        *,
        low_balance_threshold: int | None,
        top_up_to: int | None = None,
        actor: str = system_caller,
    ) -> Wallet:
        """Sets (or, with None, clears) a wallet's balance alert: below the threshold the
        ledger records LOW_BALANCE once per crossing, and with `top_up_to` TOP_UP_REQUESTED.
        Idempotent: setting what is set changes nothing and records nothing."""
        check_balance_alert(low_balance_threshold, top_up_to)
        now = self._now()
        async with self._connection(transaction=True) as connection:
            wallet, changed = await catalog.set_balance_alert(
                connection, wallet_id, low_balance_threshold, top_up_to, now
            )
            if changed and self.keep_events:
                await events.record(connection, now, changes=[events.alert_change(wallet, actor)])
            return wallet

    # Operations --------------------------------------------------------------------------------

    def _now(self) -> datetime:
        """The clock's time, which must say its time zone: asyncpg would read a naive time as
        the database's local time, and a hold's lapse compares it with aware ones."""
        now = self._clock()
        assert now.tzinfo is not None, f"the ledger's clock gave a naive time: {now}"
        return now

    async def apply(
        self, operations: Sequence[Operation | Rejected]
    ) -> list[Applied | errors.CofferError]:
        """Applies a batch of operations in one database transaction: one result each.
        `Rejected` entries fail as they are (with their linked chain)."""
        return await self._apply(operations)

    async def check_owner_limits(self, operations: Sequence[Operation | Rejected]) -> None:
        """Refuses with PermissionDenied, before anything is applied, operations limited to
        an owner (`Operation.owner_limit`) that void a transfer, or capture or release a hold,
        it sees but may not resolve (`rules.check_voidable_by`, `check_resolvable_by`): so that
        a batch holding one is refused whole, never applied in part. What they name is read
        once: a transfer's kind and wallets, and wallets' owners, never change. What they name
        and do not see (missing, or another owner's) is left to the batch, which answers it
        NOT_FOUND as it does a missing id."""
        named = {
            operation.transfer_id if isinstance(operation, Void) else operation.hold_id
            for operation in operations
            if isinstance(operation, (Void, CaptureHold, ReleaseHold))
            and operation.owner_limit is not None
        }
        if not named:
            return
        async with self._read_connection() as connection:
            found = {
                row["id"]: row
                for row in await connection.fetch(sql.select_referenced_transfers, list(named))
            }
            wallet_ids = {
                row[side]
                for row in found.values()
                for side in ("source_wallet_id", "target_wallet_id")
            }
            owners = {
                row["id"]: Owner(OwnerKind(row["owner_kind"]), row["owner_id"])
                for row in await connection.fetch(sql.select_wallet_owners, list(wallet_ids))
            }
        for operation in operations:
            if not isinstance(operation, (Void, CaptureHold, ReleaseHold)):
                continue
            owner = operation.owner_limit
            named_id = operation.transfer_id if isinstance(operation, Void) else operation.hold_id
            row = found.get(named_id)
            if owner is None or row is None:
                continue
            source_owned = owners.get(row["source_wallet_id"]) == owner
            target_owned = owners.get(row["target_wallet_id"]) == owner
            if not (source_owned or target_owned):
                continue
            if isinstance(operation, Void):
                rules.check_voidable_by(owner, named_id, TransferKind(row["kind"]), target_owned)
            elif TransferKind(row["kind"]) == TransferKind.hold:
                rules.check_resolvable_by(owner, named_id, target_owned)

    async def expire_holds(self) -> int:
        """Releases holds past their expiry; returns how many."""
        now = self._now()
        async with self._connection() as connection:
            lapsed = await connection.fetch(sql.select_lapsed_holds, now, expiry_batch_max)
        if not lapsed:
            return 0
        outcomes = await self._apply([expiry(row["transfer_id"]) for row in lapsed], now)
        return sum(1 for outcome in outcomes if isinstance(outcome, Applied))

    async def expire_grants(self, *, batch_max: int = expiration_runs_grants_max) -> int:
        """An expiration run: moves what is left of every grant past its expiry to its unit's
        expired-credits wallet, in batches of at most `batch_max` grants, each one batch
        through the rules (which lock each grant's wallet, so that nothing is both spent and
        expired, and find nothing left of a grant another run expired first); returns how many
        grants it expired. At most `expiration_run_batches_max` batches: a longer backlog is the
        next run's. Safe to run at once from several servers: two runs that pick the same grant
        expire it under one key (`grant_expiry_key`)."""
        total = 0
        for _ in range(expiration_run_batches_max):
            now = self._now()
            async with self._connection() as connection:
                expirations, units = await grants.expired(connection, now, batch_max)
                if expirations:
                    await self._facts.expired_wallets(connection, units)
            if not expirations:
                return total
            outcomes = await self._apply(expirations, now)
            done = sum(
                1 for outcome in outcomes if isinstance(outcome, Applied) and not outcome.replayed
            )
            total += done
            # A full batch of which none expired (another run's, at once) ends the run too:
            # the next one finds what is left.
            if len(expirations) < batch_max or not done:
                return total
        return total

    async def announce_expiring_grants(
        self, notice: timedelta, *, batch_max: int = expiration_runs_grants_max
    ) -> int:
        """Says on the event stream, once per grant, which grants with something left expire
        within `notice` (GRANT_EXPIRING_SOON), in batches of at most `batch_max`; returns how
        many. Without events kept, it does nothing."""
        if not self.keep_events:
            return 0
        total = 0
        for _ in range(expiration_run_batches_max):
            now = self._now()
            async with self._connection(transaction=True) as connection:
                expiring = await grants.take_expiring(connection, now + notice, batch_max)
                if expiring:
                    await events.record(
                        connection,
                        now,
                        changes=[
                            events.grant_change(EventType.grant_expiring_soon, grant, system_caller)
                            for grant in expiring
                        ],
                    )
            total += len(expiring)
            if len(expiring) < batch_max:
                return total
        return total

    # Events ------------------------------------------------------------------------------------

    async def list_events(
        self,
        after: EventCursor | None = None,
        *,
        page_size: int = page_size_default,
        where: EventFilter = _no_filter,
        owner_scope: Owner | None = None,
        hidden_types: frozenset[EventType] = frozenset(),
    ) -> EventPage:
        """Events after the cursor (None: from the oldest kept), in commit order; with
        `owner_scope`, only those of that owner's wallets; never those of `hidden_types`."""
        if not self.keep_events:
            raise errors.EventsDisabled("this server keeps no events (it runs with events off)")
        async with self._read_connection() as connection:
            return await events.read_page(
                connection,
                after,
                page_size=page_size,
                where=where,
                owner_scope=owner_scope,
                hidden_types=hidden_types,
            )

    async def watch_events(
        self,
        after: EventCursor | None,
        listener: Listener,
        *,
        where: EventFilter = _no_filter,
        owner_scope: Owner | None = None,
        hidden_types: frozenset[EventType] = frozenset(),
        page_size: int = page_size_max,
        progress: Callable[[int], None] | None = None,
    ) -> AsyncGenerator[Event, None]:
        """The events after the cursor, then each as it commits, until the iterator is
        closed. A database that cannot be reached only delays them: the watcher reads again
        every `listener.poll_interval_s`. Past `watchers_max` watchers, Overloaded; once the
        listener is closed (the server stops), Unavailable: resume from the last cursor.
        `progress`, if given, is told after each page the position the watcher has read
        through (filtered-out events included), for how far behind the head it is."""
        if not self.keep_events:
            raise errors.EventsDisabled("this server keeps no events (it runs with events off)")
        if self.watchers >= self.watchers_max:
            raise errors.Overloaded(
                f"{self.watchers} watchers follow the events already",
                retry_after_ms=watchers_retry_after_ms,
            )
        self.watchers += 1
        try:
            cursor = after
            while True:
                if listener.closed:
                    raise errors.Unavailable(
                        "the server is stopping; resume from the last event's cursor"
                    )
                seen = listener.generation
                try:
                    page = await self.list_events(
                        cursor,
                        page_size=page_size,
                        where=where,
                        owner_scope=owner_scope,
                        hidden_types=hidden_types,
                    )
                except errors.Unavailable:
                    await asyncio.sleep(listener.poll_interval_s)
                    continue
                for event in page.events:
                    yield event
                cursor = page.cursor
                if progress is not None:
                    progress(cursor.position - 1)
                if page.caught_up:
                    await listener.wait(seen)
                else:
                    # Another page at once, after the other tasks had their turn.
                    await asyncio.sleep(0)
        finally:
            self.watchers -= 1

    async def delete_events_before(self, cutoff: datetime) -> int:
        """Deletes the records made before `cutoff` (the oldest first, in bounded chunks, each
        its own transaction); returns how many."""
        deleted = 0
        while True:
            async with self._connection() as connection:
                chunk = await events.delete_before(connection, cutoff)
            deleted += chunk
            if chunk < events.retention_chunk_max:
                return deleted

    # Queries -----------------------------------------------------------------------------------

    async def get_transfer(self, transfer_id: int) -> Transfer:
        async with self._read_connection() as connection:
            return await queries.get_transfer(connection, transfer_id)

    async def list_transfers(
        self,
        where: TransferFilter,
        *,
        page_size: int = page_size_default,
        before_id: int | None = None,
    ) -> Page[Transfer]:
        """Newest first. With a wallet, each transfer carries the wallet's posted balance right
        after it and its amount signed as the wallet saw it (`reports.balances_after`)."""
        async with self._read_connection() as connection:
            if where.wallet_id is None:
                return await queries.list_transfers(
                    connection, where, page_size=page_size, before_id=before_id
                )
            async with connection.transaction(isolation="repeatable_read", readonly=True):
                page = await queries.list_transfers(
                    connection, where, page_size=page_size, before_id=before_id
                )
                items = await reports.balances_after(connection, where.wallet_id, page.items)
            return Page(items, page.cursor)

    async def list_grants(
        self,
        wallet_id: int,
        *,
        after_id: int = 0,
        page_size: int = page_size_default,
        include_spent: bool = False,
    ) -> Page[Grant]:
        """A wallet's grants, oldest first: those with something left, or with `include_spent`
        all (those spent, expired or voided too)."""
        async with self._read_connection() as connection:
            await catalog.get_wallet(connection, wallet_id, self._now())
            return await grants.list_grants(
                connection,
                wallet_id,
                after_id=after_id,
                page_size=page_size,
                include_spent=include_spent,
            )

    async def balance_at(self, wallet_id: int, at: datetime) -> Balance:
        """A wallet's balance at a time to come, if nothing more moves (`grants.balance_at`);
        at a time past, InvalidArgument naming `time` (GetFutureBalance's field)."""
        now = self._now()
        if at <= now:
            raise errors.InvalidArgument("time", "must be a time to come")
        # The wallet and its grants in one snapshot.
        async with (
            self._read_connection() as connection,
            connection.transaction(isolation="repeatable_read", readonly=True),
        ):
            wallet = await catalog.get_wallet(connection, wallet_id, now)
            return await grants.balance_at(connection, wallet_id, wallet.balance, at, now)

    # Reports -----------------------------------------------------------------------------------

    async def list_usage(
        self,
        where: UsageFilter,
        *,
        page_size: int = page_size_default,
        before_id: int | None = None,
    ) -> Page[UsageEntry]:
        """The usage register: consumptions (debits, payments, captures), newest first, each
        with the grants it drew from (`store.reports`). A page looks at a bounded number of
        transfers: it may hold fewer than `page_size`, even none, while more follow (its
        cursor says where)."""
        async with self._read_connection() as connection:
            return await reports.list_usage(
                connection, where, page_size=page_size, before_id=before_id
            )

    async def outstanding(
        self,
        unit: str,
        *,
        expiring_within_days: int = 0,
        page_size: int = page_size_default,
        after_id: int = 0,
    ) -> Outstanding:
        """A page of the unit's outstanding overview: its customers' and merchants' wallets
        with something posted, after wallet `after_id`, each with what its grants have left
        that expires within `expiring_within_days` from now (or is past its expiry, not yet
        expired by a run); the totals with the first page (`after_id` 0)."""
        if not 0 <= expiring_within_days <= expiring_within_days_max:
            raise errors.InvalidArgument(
                "expiring_within_days", f"must be 0 to {expiring_within_days_max}"
            )
        async with self._read_connection() as connection:
            return await reports.outstanding(
                connection,
                unit,
                now=self._now(),
                expiring_within=timedelta(days=expiring_within_days),
                page_size=page_size,
                after_id=after_id,
            )

    async def past_balance(self, wallet_id: int, at: datetime) -> PastBalance:
        """A wallet's posted and pending balances at a past instant (`reports.past_balance`:
        its cost grows with the wallet's transfers since); at a time to come, InvalidArgument
        (`balance_at` answers those)."""
        now = self._now()
        if at > now:
            raise errors.InvalidArgument(
                "time", f"is to come: it must be at most now ({now.isoformat()})"
            )
        async with self._read_connection() as connection:
            return await reports.past_balance(connection, wallet_id, at)

    async def get_hold(self, hold_id: int) -> Hold:
        async with self._read_connection() as connection:
            return await queries.get_hold(connection, hold_id, self._now())

    # Plumbing ----------------------------------------------------------------------------------

    async def _apply(
        self, operations: Sequence[Operation | Rejected], now: datetime | None = None
    ) -> list[Applied | errors.CofferError]:
        """`now`: the batch's time; by default the clock's when each attempt begins."""
        assert 0 < len(operations) <= batch_operations_max, len(operations)
        # First optimistically, as if no key were stored yet: the insert of the transfers
        # finds out. If one was, the batch starts over and looks its keys up first.
        look_up_keys = False
        for _ in range(transaction_retries_max):
            try:
                async with self._connection(transaction=True) as connection:
                    batch = Batch(
                        connection,
                        operations,
                        now or self._now(),
                        self._facts,
                        look_up_keys=look_up_keys,
                        keep_events=self.keep_events,
                    )
                    answer = await batch.run()
                # Committed: the answers are made out of the locks.
                return answer()
            except asyncpg.UniqueViolationError as error:
                if error.constraint_name not in key_constraints:
                    raise  # a broken invariant, not a stored key
                # A key was stored already, or a concurrent batch took it first.
                look_up_keys = True
            except KeyStored:
                look_up_keys = True
            except _retryable_database_errors:
                continue
        raise errors.Unavailable("the batch met conflicting writes too often; send it again")

    def _connection(self, *, transaction: bool = False) -> Guarded:
        return Guarded(self._pool.acquire(timeout=self._acquire_timeout_s), transaction=transaction)

    def _read_connection(self) -> Guarded:
        return Guarded(self._read_pool.acquire(timeout=self._acquire_timeout_s))
