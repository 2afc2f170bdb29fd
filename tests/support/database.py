"""What the tests ask the database directly."""

from __future__ import annotations

import asyncio

import asyncpg

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
