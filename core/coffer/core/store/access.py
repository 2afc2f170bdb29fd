"""The credentials' storage (migration 0003): API keys, certificate mappings, and the
database's secret that keys the digests of API keys.

Its statements are here rather than in `sql`: they touch none of the ledger's tables, and
none of the ledger's touches theirs.
"""

from __future__ import annotations

import secrets
from datetime import datetime

import asyncpg

from .. import errors
from ..model import ApiKey, CertificateMapping, Page, Role, page_size_max

__all__ = [
    "access_secret",
    "api_key",
    "certificate_mapping",
    "credentials_exist",
    "delete_certificate_mapping",
    "insert_api_key",
    "list_api_keys",
    "list_certificate_mappings",
    "next_api_key_id",
    "revoke_api_key",
    "secret_bytes",
    "select_api_key",
    "select_certificate_mapping",
    "upsert_certificate_mapping",
]

# The HMAC key of the digests: as long as SHA-256's block wants at least.
secret_bytes = 32

_select_secret = "select secret from access_secret"
_insert_secret = "insert into access_secret (secret) values ($1) on conflict do nothing"
_key_columns = "id, name, role, owner_id, created_at, created_by, expires_at, revoked_at"
_mapping_columns = "id, subject, name, role, owner_id, created_at, created_by"

_roles = {member.value: member for member in Role}


async def access_secret(connection: asyncpg.Connection, *, create: bool) -> bytes | None:
    """The database's secret; made (once: concurrent makers agree on the first) if `create`,
    else None while there is none."""
    found: bytes | None = await connection.fetchval(_select_secret)
    if found is not None or not create:
        return found
    await connection.execute(_insert_secret, secrets.token_bytes(secret_bytes))
    made: bytes = await connection.fetchval(_select_secret)
    return made


def api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        id=row["id"],
        name=row["name"],
        role=_roles[row["role"]],
        owner_id=row["owner_id"],
        created_at=row["created_at"],
        created_by=row["created_by"],
        expires_at=row["expires_at"],
        revoked_at=row["revoked_at"],
    )


def certificate_mapping(row: asyncpg.Record) -> CertificateMapping:
    return CertificateMapping(
        id=row["id"],
        subject=row["subject"],
        name=row["name"],
        role=_roles[row["role"]],
        owner_id=row["owner_id"],
        created_at=row["created_at"],
        created_by=row["created_by"],
    )


async def credentials_exist(connection: asyncpg.Connection) -> bool:
    """Whether any credential was ever made (the secret is made with the first): revoked,
    expired or unmapped since, it still was; the open mode is over for good."""
    found: bool = await connection.fetchval("select exists (select from access_secret)")
    return found


async def next_api_key_id(connection: asyncpg.Connection) -> int:
    """An id for a key to insert, so that its secret, which names it, is made first."""
    value: int = await connection.fetchval(
        "select nextval(pg_get_serial_sequence('api_keys', 'id'))"
    )
    return value


async def insert_api_key(
    connection: asyncpg.Connection,
    key_id: int,
    *,
    name: str,
    role: Role,
    owner_id: str | None,
    digest: bytes,
    now: datetime,
    expires_at: datetime | None,
    created_by: str,
) -> ApiKey:
    row = await connection.fetchrow(
        f"""
        insert into api_keys (id, name, role, owner_id, digest, created_at, expires_at,
                              created_by)
        values ($1, $2, $3, $4, $5, $6, $7, $8)
        returning {_key_columns}
        """,
        key_id,
        name,
        int(role),
        owner_id,
        digest,
        now,
        expires_at,
        created_by,
    )
    assert row is not None
    return api_key(row)


async def select_api_key(
    connection: asyncpg.Connection, key_id: int
) -> tuple[ApiKey, bytes] | None:
    """The key of this id and its digest, or None."""
    row = await connection.fetchrow(
        f"select {_key_columns}, digest from api_keys where id = $1", key_id
    )
    return None if row is None else (api_key(row), bytes(row["digest"]))


async def list_api_keys(
    connection: asyncpg.Connection, *, page_size: int, after_id: int
) -> Page[ApiKey]:
    assert 0 < page_size <= page_size_max
    found = await connection.fetch(
        f"select {_key_columns} from api_keys where id > $1 order by id limit $2",
        after_id,
        page_size + 1,
    )
    keys = [api_key(row) for row in found[:page_size]]
    return Page(keys, keys[-1].id if len(found) > page_size else None)


async def revoke_api_key(connection: asyncpg.Connection, key_id: int, now: datetime) -> ApiKey:
    """Revokes the key (a key revoked already keeps the time it was revoked at)."""
    row = await connection.fetchrow(
        f"""
        update api_keys set revoked_at = coalesce(revoked_at, $2) where id = $1
        returning {_key_columns}
        """,
        key_id,
        now,
    )
    if row is None:
        raise errors.ApiKeyNotFound(f"API key {key_id} does not exist")
    return api_key(row)


async def upsert_certificate_mapping(
    connection: asyncpg.Connection,
    *,
    subject: str,
    name: str,
    role: Role,
    owner_id: str | None,
    now: datetime,
    created_by: str,
) -> CertificateMapping:
    row = await connection.fetchrow(
        f"""
        insert into certificate_mappings (subject, name, role, owner_id, created_at,
                                          created_by)
        values ($1, $2, $3, $4, $5, $6)
        on conflict (subject) do update
        set id = nextval(pg_get_serial_sequence('certificate_mappings', 'id')),
            name = excluded.name, role = excluded.role, owner_id = excluded.owner_id,
            created_at = excluded.created_at, created_by = excluded.created_by
        returning {_mapping_columns}
        """,
        subject,
        name,
        int(role),
        owner_id,
        now,
        created_by,
    )
    assert row is not None
    return certificate_mapping(row)


async def select_certificate_mapping(
    connection: asyncpg.Connection, subject: str
) -> CertificateMapping | None:
    row = await connection.fetchrow(
        f"select {_mapping_columns} from certificate_mappings where subject = $1", subject
    )
    return None if row is None else certificate_mapping(row)


async def delete_certificate_mapping(
    connection: asyncpg.Connection, subject: str
) -> CertificateMapping:
    row = await connection.fetchrow(
        f"delete from certificate_mappings where subject = $1 returning {_mapping_columns}",
        subject,
    )
    if row is None:
        raise errors.CertificateMappingNotFound(f"no certificate subject {subject!r} is mapped")
    return certificate_mapping(row)


async def list_certificate_mappings(
    connection: asyncpg.Connection, *, page_size: int, after_id: int
) -> tuple[list[CertificateMapping], int | None]:
    """A page of mappings in the order they were first made, and the cursor of the next."""
    assert 0 < page_size <= page_size_max
    found = await connection.fetch(
        f"select {_mapping_columns} from certificate_mappings where id > $1 order by id limit $2",
        after_id,
        page_size + 1,
    )
    mappings = [certificate_mapping(row) for row in found[:page_size]]
    cursor = found[page_size - 1]["id"] if len(found) > page_size else None
    return mappings, cursor
