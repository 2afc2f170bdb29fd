"""Credentials and the principals they authenticate: API keys and client certificates.

    access = Access(pool)
    secret, key = await access.create_key(name="ops", role=Role.admin, created_by="setup")
    principal, expires_at = await access.authenticate(secret)

An API key is `coffer_<id>_<secret>`: its id, then 32 random bytes (`secrets`) in base64url.
It is shown once, when made; the database keeps only an HMAC-SHA256 of the whole key, keyed
with a secret of the database's own (made with the first key, in its own table), and a key is
checked by its id's row, the digests compared with `hmac.compare_digest`.

What that protects, and what not:
- a copy of the keys' table alone (a dump of it, a log of its rows) gives no key: the digests
  are of 256 random bits, keyed besides; a copy of the whole database gives no key either,
  but whoever can write to it can make themselves a principal, as they can move money;
- keys travel in the `authorization` metadata of every call: over plaintext anyone on the
  path reads them, so off the local machine serve TLS (or reach the server through a TLS
  proxy on a trusted network);
- a key is good until it expires or is revoked; servers that cache it (for a short time,
  the server's cache TTL) see a revocation made elsewhere within that time.

A client certificate is checked by TLS (mTLS: the server's client CA) before a call reaches
the server; its subject's common name is then mapped to a principal by `map_certificate`.
Whoever the client CA lets issue a certificate with a mapped common name is that principal.

A principal's idempotency scope is the credential's (`@key:17`, `@cert:5`, the id of the key
or of the certificate mapping): a key made anew is a new scope, even with the same name, and
so is a certificate mapped again (to another owner, say: no replay carries over).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable
from datetime import UTC, datetime

import asyncpg

from . import errors
from .model import (
    ApiKey,
    CertificateMapping,
    EventType,
    Page,
    Principal,
    Role,
    api_key_prefix,
    api_key_secret_bytes,
    certificate_subject_length_max,
    check_id,
    check_principal_fields,
    check_text,
    credential_scope_prefix,
    id_max,
    page_size_default,
)
from .store import access as stored
from .store import events
from .store.connections import Guarded

__all__ = [
    "Access",
    "certificate_scope",
    "check_subject",
    "key_scope",
]

_api_key_pattern = re.compile(
    rf"{re.escape(api_key_prefix)}([1-9][0-9]{{0,18}})_[A-Za-z0-9_-]{{43}}"
)


def key_scope(key_id: int) -> str:
    """The idempotency scope of an API key's principal."""
    return f"{credential_scope_prefix}key:{key_id}"


def certificate_scope(mapping_id: int) -> str:
    """The idempotency scope of a certificate's principal: its mapping's, new each time the
    subject is mapped."""
    return f"{credential_scope_prefix}cert:{mapping_id}"


def check_subject(subject: str) -> str:
    """A certificate subject's common name as a mapping may name it."""
    check_text("subject", subject, certificate_subject_length_max, required=True)
    if not subject.isprintable():
        raise errors.InvalidArgument("subject", "must be printable characters")
    return subject


def _system_clock() -> datetime:
    return datetime.now(UTC)


class Access:
    """The credentials of one database. `pool` serves its statements (few, and short); the
    wait for a connection takes at most `acquire_timeout_s`."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        acquire_timeout_s: float | None = None,
        clock: Callable[[], datetime] = _system_clock,
        keep_events: bool = True,
    ) -> None:
        self.pool = pool
        # Whether each change is an event of the stream (the audit trail), as the ledger's.
        self.keep_events = keep_events
        self._acquire_timeout_s = acquire_timeout_s
        self._clock = clock
        # The database's secret never changes once made: read once.
        self._secret: bytes | None = None

    # API keys -----------------------------------------------------------------------------------

    async def create_key(
        self,
        *,
        name: str,
        role: Role,
        owner_id: str | None = None,
        expires_at: datetime | None = None,
        created_by: str,
        actor: str,
    ) -> tuple[str, ApiKey]:
        """Makes a key; returns it (to show once: it is not kept) and its record. `created_by`
        names who made it in its record; `actor`, in its event (a principal's scope)."""
        check_principal_fields(name, role, owner_id)
        check_text("created_by", created_by, 256, required=True)
        now = self._clock()
        if expires_at is not None:
            if expires_at.tzinfo is None:
                raise errors.InvalidArgument("expires_at", "must say its time zone")
            if expires_at <= now:
                raise errors.InvalidArgument("expires_at", "must be in the future")
        async with self._connection(transaction=True) as connection:
            secret = await self._database_secret(connection, create=True)
            assert secret is not None
            key_id = await stored.next_api_key_id(connection)
            token = f"{api_key_prefix}{key_id}_" + base64.urlsafe_b64encode(
                secrets.token_bytes(api_key_secret_bytes)
            ).decode().rstrip("=")
            record = await stored.insert_api_key(
                connection,
                key_id,
                name=name,
                role=Role(role),
                owner_id=owner_id,
                digest=_digest(secret, token),
                now=now,
                expires_at=expires_at,
                created_by=created_by,
            )
            await self._record(connection, EventType.api_key_created, record, actor, now)
        return token, record

    async def list_keys(
        self, *, page_size: int = page_size_default, after_id: int = 0
    ) -> Page[ApiKey]:
        """Every key, revoked and expired ones too, in the order they were made."""
        async with self._connection() as connection:
            return await stored.list_api_keys(connection, page_size=page_size, after_id=after_id)

    async def revoke_key(self, key_id: int, *, actor: str) -> ApiKey:
        """Revokes a key for good; a key revoked already stays as it was (and records no
        event)."""
        check_id("key_id", key_id)
        now = self._clock()
        async with self._connection(transaction=True) as connection:
            record = await stored.revoke_api_key(connection, key_id, now)
            if record.revoked_at == now:
                await self._record(connection, EventType.api_key_revoked, record, actor, now)
            return record

    async def authenticate(self, token: str) -> tuple[Principal, datetime | None]:
        """The principal of an API key, and when it expires (None: never). Raises
        CredentialsInvalid for a key that is not one of this database's, CredentialsRevoked
        and CredentialsExpired for one no longer good."""
        match = _api_key_pattern.fullmatch(token)
        if match is None:
            raise errors.CredentialsInvalid("the API key is not one of this server's")
        key_id = int(match[1])
        if key_id > id_max:
            raise errors.CredentialsInvalid("the API key is not one of this server's")
        async with self._connection() as connection:
            secret = await self._database_secret(connection, create=False)
            found = None if secret is None else await stored.select_api_key(connection, key_id)
        if secret is None or found is None:
            raise errors.CredentialsInvalid("the API key is not one of this server's")
        record, digest = found
        if not hmac.compare_digest(digest, _digest(secret, token)):
            raise errors.CredentialsInvalid("the API key is not one of this server's")
        if record.revoked_at is not None:
            raise errors.CredentialsRevoked(
                f"API key {record.id} was revoked at {record.revoked_at.isoformat()}"
            )
        if record.expires_at is not None and record.expires_at <= self._clock():
            raise errors.CredentialsExpired(
                f"the API key expired at {record.expires_at.isoformat()}"
            )
        principal = Principal(
            name=record.name, role=record.role, owner_id=record.owner_id, scope=key_scope(key_id)
        )
        return principal, record.expires_at

    # Certificates -------------------------------------------------------------------------------

    async def map_certificate(
        self,
        *,
        subject: str,
        name: str,
        role: Role,
        owner_id: str | None = None,
        created_by: str,
        actor: str,
    ) -> CertificateMapping:
        """Maps a client certificate's subject common name to a principal (again, if it was:
        the new mapping replaces the old; its idempotency scope stays the subject's)."""
        check_subject(subject)
        check_principal_fields(name, role, owner_id)
        async with self._connection(transaction=True) as connection:
            # Made with the first credential, of whichever kind: it says that one was made.
            await self._database_secret(connection, create=True)
            now = self._clock()
            mapping = await stored.upsert_certificate_mapping(
                connection,
                subject=subject,
                name=name,
                role=Role(role),
                owner_id=owner_id,
                now=now,
                created_by=created_by,
            )
            await self._record(connection, EventType.certificate_mapped, mapping, actor, now)
            return mapping

    async def unmap_certificate(self, subject: str, *, actor: str) -> CertificateMapping:
        """Removes a mapping; returns what it was."""
        check_subject(subject)
        async with self._connection(transaction=True) as connection:
            mapping = await stored.delete_certificate_mapping(connection, subject)
            await self._record(
                connection, EventType.certificate_unmapped, mapping, actor, self._clock()
            )
            return mapping

    async def list_certificates(
        self, *, page_size: int = page_size_default, after_id: int = 0
    ) -> tuple[list[CertificateMapping], int | None]:
        """A page of mappings, and the cursor of the next page (None on the last)."""
        async with self._connection() as connection:
            return await stored.list_certificate_mappings(
                connection, page_size=page_size, after_id=after_id
            )

    async def principal_for_certificate(self, subject: str) -> Principal:
        """The principal a client certificate's subject common name is mapped to; else
        CredentialsInvalid."""
        async with self._connection() as connection:
            found = await stored.select_certificate_mapping(connection, subject)
        if found is None:
            raise errors.CredentialsInvalid(
                f"the client certificate's subject {subject!r} is mapped to no principal"
            )
        return Principal(
            name=found.name,
            role=found.role,
            owner_id=found.owner_id,
            scope=certificate_scope(found.id),
        )

    async def credentials_exist(self) -> bool:
        """Whether any credential was ever made (revoked, expired and unmapped ones count)."""
        async with self._connection() as connection:
            return await stored.credentials_exist(connection)

    # Plumbing -----------------------------------------------------------------------------------

    async def _record(
        self,
        connection: asyncpg.Connection,
        type_: EventType,
        credential: ApiKey | CertificateMapping,
        actor: str,
        now: datetime,
    ) -> None:
        """The change's event, as the last statement of its transaction."""
        if self.keep_events:
            await events.record(
                connection, now, changes=[events.access_change(type_, credential, actor)]
            )

    async def _database_secret(
        self, connection: asyncpg.Connection, *, create: bool
    ) -> bytes | None:
        if self._secret is None:
            self._secret = await stored.access_secret(connection, create=create)
        return self._secret

    def _connection(self, *, transaction: bool = False) -> Guarded:
        return Guarded(self.pool.acquire(timeout=self._acquire_timeout_s), transaction=transaction)


def _digest(secret: bytes, token: str) -> bytes:
    return hmac.new(secret, token.encode(), hashlib.sha256).digest()
