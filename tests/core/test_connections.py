"""The guard of every connection the ledger takes (`coffer.core.store.connections.Guarded`),
against a real PostgreSQL: a task cancelled while it holds one (a server stopping its sweeps)
gives it back to the pool, so that the pool can close."""

from __future__ import annotations

import asyncio

import pytest

from coffer.core.store.connections import Guarded, create_pool

# How long the commit of the test's transaction takes (a deferred trigger sleeps).
commit_s = 0.5
pool_wait_s_max = 5.0


async def test_a_task_cancelled_while_its_transaction_commits_gives_its_connection_back(
    database_url: str,
) -> None:
    pool = await create_pool(database_url, size_max=1)
    try:
        async with Guarded(pool.acquire()) as connection:
            await connection.execute(
                f"""
                create table slow_commit (id int);
                create function slow_commit() returns trigger language plpgsql as
                    $$ begin perform pg_sleep({commit_s}); return null; end $$;
                create constraint trigger slow_commit after insert on slow_commit
                    deferrable initially deferred for each row execute function slow_commit();
                """
            )
        written = asyncio.Event()

        async def write() -> None:
            async with Guarded(pool.acquire(), transaction=True) as connection:
                await connection.execute("insert into slow_commit values (1)")
                written.set()

        task = asyncio.create_task(write())
        await written.wait()
        # Now in its commit, which sleeps.
        await asyncio.sleep(commit_s / 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # The pool's one connection is free again.
        async with asyncio.timeout(pool_wait_s_max):
            async with Guarded(pool.acquire()) as connection:
                assert await connection.fetchval("select 1") == 1
    finally:
        async with asyncio.timeout(pool_wait_s_max):
            await pool.close()
