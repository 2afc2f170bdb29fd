"""Faults: the database lost, stalled or restarted, and the server killed.

The ledger's boundary first, on the shared test cluster: a lost connection is UNAVAILABLE
(retryable), and the pool recovers; an error that is not about the connection stays what it
is (a bug); statement and lock timeouts fail calls fast; queries cannot take the connections
writes need.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
import pytest_asyncio

from coffer.core import errors
from coffer.core.ledger import Ledger, create_pool
from coffer.core.model import Credit, NewWallet, OwnerKind, Unit, UnitKind


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


@pytest.mark.parametrize(
    ("statement_timeout_s", "lock_timeout_s"), [(30.0, 0.3), (0.3, 30.0)], ids=["lock", "statement"]
)
async def test_a_call_waiting_past_a_timeout_is_unavailable(
    database_url: str,
    administration: asyncpg.Connection,
    statement_timeout_s: float,
    lock_timeout_s: float,
) -> None:
    pool = await create_pool(
        database_url,
        size_max=1,
        statement_timeout_s=statement_timeout_s,
        lock_timeout_s=lock_timeout_s,
    )
    try:
        ledger = Ledger(pool)
        wallet_id = await new_wallet(ledger)
        async with administration.transaction():
            await administration.execute("lock table wallets in access exclusive mode")
            started = time.monotonic()
            with pytest.raises(errors.Unavailable, match="in time"):
                await ledger.get_wallet(wallet_id)
            waited_s = time.monotonic() - started
        assert 0.3 <= waited_s < 5
        # The connection is usable again (or replaced).
        assert (await ledger.get_wallet(wallet_id)).id == wallet_id
    finally:
        await pool.close()


async def test_queries_cannot_take_the_connections_of_writes(database_url: str) -> None:
    pool = await create_pool(database_url, size_max=2)
    read_pool = await create_pool(database_url, size_max=1)
    try:
        ledger = Ledger(pool, read_pool=read_pool, acquire_timeout_s=0.5)
        wallet_id = await new_wallet(ledger)
        # Every connection for queries is busy (as with long history scans).
        async with read_pool.acquire():
            [applied] = await ledger.apply(
                [Credit(idempotency_key="c", wallet_id=wallet_id, amount=100)]
            )
            assert not isinstance(applied, errors.CofferError), applied
            # A query waits for a connection at most the acquire timeout.
            with pytest.raises(errors.Unavailable, match="in time"):
                await ledger.get_wallet(wallet_id)
        assert (await ledger.get_wallet(wallet_id)).balance.posted == 100
    finally:
        await ledger.close()
