"""A bulk preload of history: many stored transfers among some wallets, written set-based.

A ledger with ten million transfers behind it behaves differently from an empty one (index
depth, cache misses, table size), and building it through the API takes minutes of full load
for every run. `preload_transfers` writes them in the journal directly, a million per statement,
as the ledger itself would have: transfers of kind `TransferKind.transfer` between distinct
wallets of one unit, the wallets' posted balances updated in the same transaction, so that the
books still balance afterwards (see `coffer.core.audit`).

    connection = await asyncpg.connect(dsn)  # of its own: no statement timeout
    await preload_transfers(connection, wallet_ids, 10_000_000)

The wallets are checked first by the ledger's own rule for a transfer (`rules.apply`): they
exist, are active customers' or merchants' wallets, of one unit. Their floors are kept by the
database's constraint on the balances each chunk leaves (one statement: not transfer by
transfer within it): a chunk that would leave a wallet below its minimum fails whole with
`InsufficientFunds` (past the balance limit, `BalanceOverflow`), and the chunks before it
stay. Wallets funded far above what the preload moves never come near either.

Preloaded transfers are history, not requests. By default they carry no idempotency key and
do not grow the index of keys; with `keyed`, each carries one, as a request's first transfer
does (the caller `keyed.caller`, the key `keyed.prefix` followed by the transfer's number in
the preload, and the key's digest, `model.key_digest`), so that the index of keys grows as a
ledger's that took as many requests. A replay of such a key finds no request digest to match
(IDEMPOTENCY_KEY_REUSED).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import asyncpg

from . import errors, model, rules
from .model import TransferKind, WalletTransfer
from .store import rows, sql
from .store.keys import journal_key_index

__all__ = [
    "Keyed",
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


@dataclass(frozen=True, slots=True)
class Keyed:
    """Under which caller, and with which start of their keys, preloaded transfers are keyed."""

    caller: str
    prefix: str

    def __post_init__(self) -> None:
        model.check_text("caller", self.caller, model.caller_length_max, required=True)
        # Room for the number after it, up to the greatest id.
        model.check_text(
            "prefix", self.prefix, model.idempotency_key_length_max - len(str(model.id_max))
        )

    def digests(self, first: int, last: int) -> list[bytes]:
        """The digests of the keys of the transfers numbered `first` to `last`."""
        return [
            model.key_digest(self.caller, f"{self.prefix}{number}")
            for number in range(first, last + 1)
        ]


async def preload_transfers(
    connection: asyncpg.Connection,
    wallet_ids: Sequence[int],
    count: int,
    *,
    amount_max: int = amount_max_default,
    spread: timedelta = spread_default,
    performed_by: str = performed_by_default,
    keyed: Keyed | None = None,
    progress: Progress | None = None,
) -> None:
    """Stores `count` transfers among `wallet_ids` (two or more distinct wallets), each from
    one wallet to another chosen at random, then VACUUMs and ANALYZEs the tables it wrote (so
    that autovacuum's pass over the whole load does not come later, in the middle of what is
    measured on it; PostgreSQL skips them, with a warning, for a role that may not). `progress`
    is called with the number written so far after each chunk. `connection` must not be in a
    transaction: each chunk is one of its own, and VACUUM runs in none; nor, for millions of
    transfers, bound by a statement timeout (as the ledger's pool connections are)."""
    assert not connection.is_in_transaction()
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
                await connection.execute(sql.lock_wallets, locked)
                await connection.execute(
                    sql.insert_preload_chunk,
                    ids,
                    done + 1,
                    done + chunk,
                    count,
                    latest,
                    spread,
                    int(TransferKind.transfer),
                    amount_max,
                    performed_by,
                    None if keyed is None else keyed.caller,
                    None if keyed is None else keyed.prefix,
                    None if keyed is None else keyed.digests(done + 1, done + chunk),
                )
        except asyncpg.UniqueViolationError as error:
            if keyed is None or error.constraint_name != journal_key_index:
                raise
            raise errors.InvalidArgument(
                "keyed", f"keys starting {keyed.prefix!r} are stored already; use another prefix"
            ) from error
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
    await connection.execute(sql.vacuum_preloaded)


async def _check_wallets(connection: asyncpg.Connection, ids: list[int]) -> None:
    """Raises the ledger's error for a transfer these wallets could not make: each sends one
    minor unit to the next, around the ring, each pair on fresh copies of their states."""
    found = await connection.fetch(sql.select_wallet_states, ids)
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
