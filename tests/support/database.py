"""What the tests ask the database directly."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg

from coffer.postgres.supervisor import EmbeddedPostgres

__all__ = [
    "lock_waiters",
    "lock_waiters_wait_s_max",
    "refuse_unexpected_amount",
    "scratch_database",
    "unexpected_amount",
]

# The ledger does not know this rule (`refuse_unexpected_amount`): a transfer of this amount
# fails in PostgreSQL with a CHECK violation, which nothing maps to a domain error.
unexpected_amount = 666
# How long a test waits for backends to block on the locks it holds before it fails.
lock_waiters_wait_s_max = 30.0


async def lock_waiters(database_url: str, count: int = 1) -> list[int]:
    """Waits until at least `count` backends of the database wait for a lock (one a test
    holds, or one held by another backend waiting for it), and returns their pids. Polls
    pg_stat_activity from a connection of its own (a transaction would see one snapshot)."""
    connection = await asyncpg.connect(database_url)
    try:
        async with asyncio.timeout(lock_waiters_wait_s_max):
            while True:
                pids = await connection.fetch(
                    "select pid from pg_stat_activity"
                    " where datname = current_database() and wait_event_type = 'Lock'"
                )
                if len(pids) >= count:
                    return [row["pid"] for row in pids]
                await asyncio.sleep(0.01)
    finally:
        await connection.close()


async def refuse_unexpected_amount(database_url: str) -> None:
    """Adds to the database a rule the ledger does not know: no transfer of
    `unexpected_amount`. Such a batch then fails as a whole, with an error nothing maps."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "alter table transfers add constraint test_unexpected "
            f"check (amount <> {unexpected_amount})"
        )
    finally:
        await connection.close()


@contextlib.asynccontextmanager
async def scratch_database(
    cluster: EmbeddedPostgres, name: str, options: str = ""
) -> AsyncIterator[str]:
    """A database of the cluster made as `CREATE DATABASE name options` (a template, an
    encoding), dropped afterwards whoever is still connected; yields its DSN."""
    administration = await asyncpg.connect(cluster.dsn)
    try:
        await administration.execute(f'CREATE DATABASE "{name}" {options}')
    finally:
        await administration.close()
    try:
        yield cluster.dsn_for(name)
    finally:
        administration = await asyncpg.connect(cluster.dsn)
        try:
            await administration.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await administration.close()
