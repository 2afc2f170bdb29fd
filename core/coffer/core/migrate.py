"""Schema migrations: numbered SQL files in coffer/core/migrations, applied in order, once each.

`migrate` takes a session-level advisory lock, so servers starting together apply each
migration exactly once; each migration runs in its own transaction with its version recorded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

import asyncpg

__all__ = ["migrate"]

# Any constant unique to this application; pg_advisory_lock takes a bigint.
advisory_lock_id = 0x636F66666572  # "coffer"
_file_pattern = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class _Migration:
    version: int
    name: str
    sql: str


def _migrations() -> list[_Migration]:
    found = []
    for entry in resources.files("coffer.core.migrations").iterdir():
        match = _file_pattern.match(entry.name)
        if match:
            found.append(_Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda migration: migration.version)
    versions = [migration.version for migration in found]
    assert versions == list(range(1, len(found) + 1)), (
        f"migrations must be numbered 1..n: {versions}"
    )
    return found


async def migrate(connection: asyncpg.Connection, *, through: int | None = None) -> list[int]:
    """Applies the migrations the database lacks, up to version `through` (None: all);
    returns their versions."""
    applied: list[int] = []
    await connection.execute("select pg_advisory_lock($1)", advisory_lock_id)
    try:
        await connection.execute(
            """
            create table if not exists schema_migrations (
                version integer primary key,
                name text not null,
                applied_at timestamptz not null default now()
            )
            """
        )
        done = {
            row["version"]
            for row in await connection.fetch("select version from schema_migrations")
        }
        for migration in _migrations():
            if migration.version in done:
                continue
            if through is not None and migration.version > through:
                break
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "insert into schema_migrations (version, name) values ($1, $2)",
                    migration.version,
                    migration.name,
                )
            applied.append(migration.version)
    finally:
        await connection.execute("select pg_advisory_unlock($1)", advisory_lock_id)
    return applied
