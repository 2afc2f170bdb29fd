"""The books add up, by the core's own check."""

from __future__ import annotations

import asyncpg

from coffer.core.audit import check_books


async def assert_books_balance(database_url: str) -> None:
    """The books add up: every invariant of the core's check (`coffer.core.audit`) holds."""
    connection = await asyncpg.connect(database_url)
    try:
        audit = await check_books(connection)
    finally:
        await connection.close()
    assert audit.passed, audit.summary()
