"""Grants, as queries read them: a wallet's grants, its balance at a future date, and the
grants an expiration run or a notice of expiry picks. (A batch reads and writes grants itself,
under its wallets' locks: `batch`, `journal`.)"""

from __future__ import annotations

from datetime import datetime

import asyncpg

from ..model import Balance, ExpireGrant, Grant, Page, grant_expiry_key, system_caller
from . import rows, sql

__all__ = ["balance_at", "expired", "list_grants", "take_expiring"]


async def expired(
    connection: asyncpg.Connection, now: datetime, limit: int
) -> tuple[list[ExpireGrant], set[str]]:
    """The expirations of the grants past their expiry with something left, the soonest
    first, at most `limit`: each under the key of what the grant had expired before
    (`grant_expiry_key`), in the ledger's own name; and the grants' units."""
    found = await connection.fetch(sql.select_expired_grants, now, limit)
    expirations = [
        ExpireGrant(
            grant_id=row["id"],
            idempotency_key=grant_expiry_key(row["id"], row["expired"]),
            caller=system_caller,
        )
        for row in found
    ]
    return expirations, {row["unit"] for row in found}


async def take_expiring(connection: asyncpg.Connection, by: datetime, limit: int) -> list[Grant]:
    """Marks, and returns, the grants with something left that expire by `by` and were not
    announced yet, at most `limit` (each is announced once; a new expiry is announced again)."""
    return [
        rows.grant(row) for row in await connection.fetch(sql.announce_expiring_grants, by, limit)
    ]


async def list_grants(
    connection: asyncpg.Connection,
    wallet_id: int,
    *,
    after_id: int,
    page_size: int,
    include_spent: bool,
) -> Page[Grant]:
    """A wallet's grants, oldest first, after `after_id`: with something left, or with
    `include_spent` all of them."""
    found = await connection.fetch(
        sql.select_wallet_grants, wallet_id, after_id, include_spent, page_size + 1
    )
    items = [rows.grant(row) for row in found[:page_size]]
    return Page(items, items[-1].id if len(found) > page_size else None)


async def balance_at(
    connection: asyncpg.Connection, wallet_id: int, balance: Balance, at: datetime, now: datetime
) -> Balance:
    """A wallet's balance at a future time, if nothing more moves: its grants that expire by
    then are gone (as an expiration run would take them), those valid by then have started.
    Its holds are as now (`balance`, read at `now`): those lapsed by now hold nothing, and
    what they reserved is their grants' again."""
    row = await connection.fetchrow(sql.select_grants_at, wallet_id, at, now)
    assert row is not None
    return Balance(
        posted=balance.posted - row["expiring"],
        pending=balance.pending,
        unspendable=row["not_yet_valid"],
    )
