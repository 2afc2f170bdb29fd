"""Faults: the database lost, stalled or restarted, and the server killed.

The ledger's boundary first, on the shared test cluster: a lost connection is UNAVAILABLE
(retryable), and the pool recovers; an error that is not about the connection stays what it
is (a bug).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from coffer.core import errors
from coffer.core.ledger import Ledger, create_pool
from coffer.core.model import NewWallet, OwnerKind, Unit, UnitKind


@pytest_asyncio.fixture(loop_scope="session")
async def administration(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own, beside the ledger's."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def new_wallet(ledger: Ledger) -> int:
    await ledger.create_unit(Unit(code="EUR", kind=UnitKind.currency, name="Euro", scale=2))
    created = await ledger.create_wallet(
        NewWallet(idempotency_key="w", owner_id="o", owner_kind=OwnerKind.customer, unit="EUR")
    )
    return created.id


async def blocked_backend(administration: asyncpg.Connection) -> int:
    """The pid of the ledger's backend that waits for the lock the test holds."""
    async with asyncio.timeout(10):
        while True:
            pid = await administration.fetchval(
                "select pid from pg_stat_activity where wait_event_type = 'Lock'"
            )
            if pid is not None:
                return int(pid)
            await asyncio.sleep(0.02)


async def test_a_lost_connection_is_unavailable_and_the_pool_recovers(
    database_url: str, administration: asyncpg.Connection
) -> None:
    pool = await create_pool(database_url, size_max=1)
    try:
        ledger = Ledger(pool)
        wallet_id = await new_wallet(ledger)
        async with administration.transaction():
            await administration.execute("lock table wallets in access exclusive mode")
            reading = asyncio.create_task(ledger.get_wallet(wallet_id))
            pid = await blocked_backend(administration)
            await administration.execute("select pg_terminate_backend($1)", pid)
            with pytest.raises(errors.Unavailable) as raised:
                await reading
        assert raised.value.retryable
        assert (await ledger.get_wallet(wallet_id)).id == wallet_id
    finally:
        await pool.close()


async def test_other_database_errors_are_not_unavailable(database_url: str) -> None:
    pool = await create_pool(database_url, size_max=1)
    try:
        # A value the driver cannot encode is a bug of the caller, not an outage.
        with pytest.raises(asyncpg.DataError):
            await Ledger(pool).get_wallet(2**63)
    finally:
        await pool.close()
