"""A bulk preload of history: many stored transfers among some wallets, written set-based.

A ledger with ten million transfers behind it behaves differently from an empty one (index
depth, cache misses, table size), and building it through the API takes minutes of full load
for every run. `preload_transfers` writes them in the journal directly, a million per statement,
as the ledger itself would have: transfers of kind `TransferKind.transfer` between distinct
wallets of one unit, the wallets' posted balances updated in the same transaction, so that the
books still balance afterwards (see `coffer.core.audit`).

    async with ledger.pool.acquire() as connection:
        await preload_transfers(connection, wallet_ids, 10_000_000)

The wallets are checked first by the ledger's own rule for a transfer (`rules.apply`): they
exist, are active customers' or merchants' wallets, of one unit. Their floors are kept by the
database's constraint on the balances each chunk leaves (one statement: not transfer by
transfer within it): a chunk that would leave a wallet below its minimum fails whole with
`InsufficientFunds` (past the balance limit, `BalanceOverflow`), and the chunks before it
stay. Wallets funded far above what the preload moves never come near either.

Preloaded transfers are history, not requests: they carry no idempotency key, so nothing can
replay them, and they do not grow the index of keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg

from . import errors, model, rules
from .model import TransferKind, WalletTransfer
from .store import rows

__all__ = [
    "amount_max_default",
    "chunk_transfers_max",
    "performed_by_default",
    "preload_transfers",
    "spread_default",
]

# Transfers written by one statement, in one transaction.
chunk_transfers_max = 1_000_000
# Amounts are drawn uniformly from 1 to this.
amount_max_default = 10_000
# How far back the preloaded transfers reach: their times are spread evenly over it, in the
# order of their ids, up to a minute ago.
spread_default = timedelta(days=7)
performed_by_default = "preload"

Progress = Callable[[int], None]


async def preload_transfers(
    connection: asyncpg.Connection,
    wallet_ids: Sequence[int],
    count: int,
    *,
    amount_max: int = amount_max_default,
    spread: timedelta = spread_default,
    performed_by: str = performed_by_default,
    progress: Progress | None = None,
) -> None:
    """Stores `count` transfers among `wallet_ids` (two or more distinct wallets), each from
    one wallet to another chosen at random, then ANALYZEs the tables it grew. `progress` is
    called with the number written so far after each chunk. `connection` must not be in a
    transaction: each chunk is one of its own."""
    if count < 0:
        raise errors.InvalidArgument("count", "must not be negative")
    if not 1 <= amount_max <= model.amount_max:
        raise errors.InvalidArgument("amount_max", f"must be 1 to {model.amount_max}")
    model.check_text("performed_by", performed_by, model.performed_by_length_max)
    ids = list(wallet_ids)
    if len(set(ids)) != len(ids) or len(ids) < 2:
        raise errors.InvalidArgument("wallet_ids", "must be two or more distinct wallets")
    await _check_wallets(connection, ids)
    if count == 0:
        return
    latest: datetime = await connection.fetchval("select now() - interval '1 minute'")
    locked = sorted(ids)
    done = 0
    while done < count:
        chunk = min(chunk_transfers_max, count - done)
        try:
            async with connection.transaction():
                # In id order, as every batch of the ledger locks its wallets: no deadlock.
                await connection.execute(_lock_wallets, locked)
                await connection.execute(
                    _insert_chunk,
                    ids,
                    done + 1,
                    done + chunk,
                    count,
                    latest,
                    spread,
                    int(TransferKind.transfer),
                    amount_max,
                    performed_by,
                )
        except asyncpg.CheckViolationError as error:
            raise errors.InsufficientFunds(
                f"transfers {done + 1:,} to {done + chunk:,} would take a wallet below its"
                f" minimum; {done:,} transfers were stored before them"
            ) from error
        except asyncpg.NumericValueOutOfRangeError as error:
            raise errors.BalanceOverflow(
                f"transfers {done + 1:,} to {done + chunk:,} would take a balance past"
                f" {model.balance_max}; {done:,} transfers were stored before them"
            ) from error
        done += chunk
        if progress is not None:
            progress(done)
    await connection.execute("analyze transfers")
    await connection.execute("analyze wallets")


async def _check_wallets(connection: asyncpg.Connection, ids: list[int]) -> None:
    """Raises the ledger's error for a transfer these wallets could not make: each sends one
    minor unit to the next, around the ring, each pair on fresh copies of their states."""
    found = await connection.fetch(_wallet_states, ids)
    states = {row["id"]: rows.wallet_state(row) for row in found}
    now = datetime.now(UTC)
    for source, target in zip(ids, [*ids[1:], ids[0]], strict=True):
        book = rules.Book(
            wallets={
                wallet_id: replace(states[wallet_id])
                for wallet_id in (source, target)
                if wallet_id in states
            }
        )
        transfer = WalletTransfer(
            idempotency_key="preload-check",
            source_wallet_id=source,
            target_wallet_id=target,
            amount=1,
        )
        rules.apply(book, transfer, now)


_wallet_states = """
select id, unit, owner_kind, status, balance_minimum, posted, pending
from wallets where id = any($1::bigint[])
"""

_lock_wallets = """
select id from wallets where id = any($1::bigint[]) order by id for update
"""

# Each transfer: a source drawn among the wallets, a target among the others (never the
# source), an amount from 1 to $8; the balances change by what the chunk moved, in the same
# statement. $1 the wallets, $2 and $3 the chunk's first and last number, $4 the count, $5 the
# latest time, $6 the spread, $7 the kind, $9 who performed them.
_insert_chunk = """
with chosen as (
    select nextval('transfers_id') as id,
           g,
           floor(random() * cardinality($1::bigint[]))::int as source_index,
           floor(random() * (cardinality($1::bigint[]) - 1))::int as offset_index,
           1 + floor(random() * $8::bigint)::bigint as amount
    from generate_series($2::bigint, $3::bigint) as g
), inserted as (
    insert into transfers (id, operation_id, kind, source_wallet_id, target_wallet_id, amount,
                           performed_by, created_at)
    select id, id, $7::smallint,
           ($1::bigint[])[source_index + 1],
           ($1::bigint[])[(source_index + 1 + offset_index) % cardinality($1::bigint[]) + 1],
           amount,
           $9::text,
           $5::timestamptz - $6::interval * (1 - g::float8 / $4::float8)
    from chosen
    returning source_wallet_id, target_wallet_id, amount
), changes as (
    select wallet_id, sum(change) as change from (
        select source_wallet_id as wallet_id, -amount as change from inserted
        union all
        select target_wallet_id, amount from inserted
    ) as postings
    group by wallet_id
)
update wallets set posted = wallets.posted + changes.change
from changes where wallets.id = changes.wallet_id
"""
