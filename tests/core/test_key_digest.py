"""The journal's index of idempotency keys by digest (`model.key_digest`, migration 0008): the
digest's spec, the SQL of the migration computing the same bytes, the backfill of a journal
written before it, the database encoding it requires, the unique indexes the ledger names,
and a collision of digests answered as IDEMPOTENCY_KEY_UNAVAILABLE without the key."""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from importlib import resources

import asyncpg
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from coffer.core import errors
from coffer.core.ledger import Ledger
from coffer.core.migrate import migrate
from coffer.core.model import (
    Credit,
    NewWallet,
    OwnerKind,
    Unit,
    UnitKind,
    key_digest,
    key_digest_prefix_size,
    key_digest_size,
)
from coffer.core.store.connections import create_pool
from coffer.core.store.keys import key_constraints
from coffer.postgres.supervisor import EmbeddedPostgres

from support.database import scratch_database

_databases = itertools.count(1)
_migration = "0008_key_digest.sql"
# The migration's function computing the digest in SQL, created in pg_temp and dropped by it.
_function_pattern = re.compile(
    r"create function pg_temp\.key_digest\(.*?\$\$.*?\$\$;", re.DOTALL | re.IGNORECASE
)
# Text as callers and keys may hold it: any character PostgreSQL stores (not NUL; not a lone
# surrogate, which UTF-8 cannot encode), including ones of two, three and four bytes.
_texts = st.text(
    alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"),
    max_size=40,
)


def digest_function_sql() -> str:
    text = resources.files("coffer.core.migrations").joinpath(_migration).read_text()
    [function] = _function_pattern.findall(text)
    return str(function)


@pytest_asyncio.fixture(loop_scope="session")
async def empty_database(postgres_cluster: EmbeddedPostgres) -> AsyncIterator[str]:
    """A database of this test's own with no migration applied, dropped after the test."""
    async with scratch_database(postgres_cluster, f"key_digest_{next(_databases)}") as database:
        yield database


def test_digest_is_as_specified() -> None:
    """4 bytes over the caller and the key's stem, 12 over the caller and the whole key; the
    caller after its UTF-8 length, 4 bytes big-endian."""
    caller, key = "shop-é", "order-000123"
    scope = len(caller.encode()).to_bytes(4, "big") + caller.encode()
    expected = (
        hashlib.sha256(scope + b"order-000").digest()[:4]
        + hashlib.sha256(scope + key.encode()).digest()[:12]
    )
    assert key_digest(caller, key) == expected
    assert len(expected) == key_digest_size


def test_caller_and_key_do_not_run_together() -> None:
    assert key_digest("ab", "c") != key_digest("a", "bc")
    assert key_digest("a", "") != key_digest("", "a")


def test_keys_differing_in_their_tail_share_a_prefix() -> None:
    """Keys from a counter land near each other in the index: same prefix, other digests."""
    first, second = key_digest("shop", "order-000123"), key_digest("shop", "order-000124")
    assert first != second
    assert first[:key_digest_prefix_size] == second[:key_digest_prefix_size]
    # The caller scopes the prefix too.
    assert (
        key_digest("shop-2", "order-000123")[:key_digest_prefix_size]
        != first[:key_digest_prefix_size]
    )


def test_keys_of_three_characters_or_fewer_have_an_empty_stem() -> None:
    prefixes = {key_digest("c", key)[:key_digest_prefix_size] for key in ("", "a", "ab", "abc")}
    assert len(prefixes) == 1
    assert key_digest("c", "abcd")[:key_digest_prefix_size] not in prefixes


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(pairs=st.lists(st.tuples(_texts, _texts), min_size=1, max_size=8))
@example(pairs=[("tests", "ab"), ("shop", "ключ-€-日本-🙂"), ("é", "x"), ("", "")])
async def test_the_migration_digests_as_the_model_does(
    empty_database: str, pairs: list[tuple[str, str]]
) -> None:
    """The SQL of migration 0008 gives model.key_digest's bytes, for any text: short keys,
    empty ones, characters of every UTF-8 length."""
    connection = await asyncpg.connect(empty_database)
    try:
        await connection.execute(digest_function_sql())
        found = await connection.fetch(
            "select pg_temp.key_digest(caller, key) as digest"
            " from unnest($1::text[], $2::text[]) with ordinality as k (caller, key, number)"
            " order by number",
            [caller for caller, _ in pairs],
            [key for _, key in pairs],
        )
    finally:
        await connection.close()
    assert [row["digest"] for row in found] == [key_digest(caller, key) for caller, key in pairs]


# Keyed rows of a journal written before migration 0008: (caller, key); and one without a key.
_stored_keys = [
    ("shop-backend", "order-000123"),
    ("shop-backend", "order-000124"),
    ("tests", "ключ-€-日本-🙂"),
    ("tests", "ab"),
    (None, "no-caller"),
]


async def test_migration_backfills_the_digests(empty_database: str) -> None:
    """Migrated through 0007, with keyed transfers stored (one without a caller, which is
    digested as the empty caller; keys of many UTF-8 lengths, a short one), then through
    0008: every keyed transfer has model.key_digest's bytes, the others none, the table was
    written anew, and the old index is gone."""
    connection = await asyncpg.connect(empty_database)
    try:
        assert await migrate(connection, through=7) == list(range(1, 8))
        now = datetime.now(UTC)
        rows = [
            (number, number, 1, 1, 2, 100, caller, key, b"request", now)
            for number, (caller, key) in enumerate([*_stored_keys, (None, None)], start=1)
        ]
        await connection.copy_records_to_table(
            "transfers",
            records=rows,
            columns=(
                "id",
                "operation_id",
                "kind",
                "source_wallet_id",
                "target_wallet_id",
                "amount",
                "caller",
                "idempotency_key",
                "request_hash",
                "created_at",
            ),
        )
        stored_in = await connection.fetchval("select pg_relation_filenode('transfers')")
        applied = await migrate(connection)
        assert applied[0] == 8 and applied == list(range(8, 8 + len(applied)))
        # Backfilled by a rewrite of the table, which leaves no dead row versions behind.
        assert await connection.fetchval("select pg_relation_filenode('transfers')") != stored_in
        stored = await connection.fetch(
            "select caller, idempotency_key, key_digest from transfers order by id"
        )
        assert [(row["caller"], row["idempotency_key"]) for row in stored] == [
            *_stored_keys,
            (None, None),
        ]
        for row in stored:
            if row["idempotency_key"] is None:
                assert row["key_digest"] is None
            else:
                assert row["key_digest"] == key_digest(row["caller"] or "", row["idempotency_key"])
        indexes = {
            row["indexname"]
            for row in await connection.fetch(
                "select indexname from pg_indexes where tablename = 'transfers'"
            )
        }
        assert "transfers_key_digest" in indexes
        assert "transfers_idempotency" not in indexes
        # The function of the backfill lived in the migration's session only.
        assert not await connection.fetchval(
            "select exists (select from pg_proc where proname = 'key_digest')"
        )
    finally:
        await connection.close()


async def _versions(connection: asyncpg.Connection) -> list[int]:
    return [
        row["version"]
        for row in await connection.fetch("select version from schema_migrations order by 1")
    ]


async def test_a_key_without_its_digest_is_refused(database_url: str) -> None:
    """A server of an older version writes keys without a digest: its write fails, rather
    than go past the index of keys and apply an operation twice."""
    connection = await asyncpg.connect(database_url)
    try:
        with pytest.raises(asyncpg.CheckViolationError) as raised:
            await connection.execute(
                "insert into transfers (id, operation_id, kind, source_wallet_id,"
                " target_wallet_id, amount, caller, idempotency_key, request_hash, created_at)"
                " values (1, 1, 1, 1, 2, 100, 'old-server', 'key-1', '\\x00', now())"
            )
        assert raised.value.constraint_name == "transfers_key_digest_present"
    finally:
        await connection.close()


async def test_migration_refuses_a_database_not_in_utf8(
    postgres_cluster: EmbeddedPostgres,
) -> None:
    """The SQL digest hashes the database's bytes of the texts, model.key_digest their UTF-8:
    in another encoding they would differ, so the migration refuses, saying why."""
    async with scratch_database(
        postgres_cluster,
        f"key_digest_ascii_{next(_databases)}",
        "TEMPLATE template0 ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C'",
    ) as database:
        connection = await asyncpg.connect(database)
        try:
            with pytest.raises(asyncpg.RaiseError, match="needs a database encoded in UTF8"):
                await migrate(connection)
            # Nothing of 0008 stays: it ran in one transaction.
            assert 8 not in await _versions(connection)
            assert not await connection.fetchval(
                "select exists (select from information_schema.columns"
                " where table_name = 'transfers' and column_name = 'key_digest')"
            )
        finally:
            await connection.close()


async def test_key_constraints_are_the_unique_indexes_of_keys(database_url: str) -> None:
    """The ledger tells a stored key from a broken invariant by the name of the unique index
    an insert met (`key_constraints`): each name is a unique index of the schema, so a renamed
    index cannot turn stored keys into INTERNAL errors unnoticed."""
    connection = await asyncpg.connect(database_url)
    try:
        found = await connection.fetch(
            "select c.relname, i.indisunique from pg_index i"
            " join pg_class c on c.oid = i.indexrelid"
            " join pg_indexes x on x.indexname = c.relname and x.schemaname = 'public'"
            " where c.relname = any($1::text[])",
            sorted(key_constraints),
        )
    finally:
        await connection.close()
    assert {row["relname"] for row in found} == key_constraints
    assert all(row["indisunique"] for row in found)


@pytest_asyncio.fixture(loop_scope="session")
async def ledger(database_url: str) -> AsyncIterator[Ledger]:
    pool = await create_pool(database_url, size_max=2)
    try:
        ledger = Ledger(pool)
        await ledger.create_unit(Unit(code="EUR", kind=UnitKind.currency, name="Euro", scale=2))
        yield ledger
    finally:
        await pool.close()


async def test_a_collision_of_digests_is_key_unavailable(
    ledger: Ledger, caplog: pytest.LogCaptureFixture
) -> None:
    """A stored transfer whose digest is another key's (crafted here: a real one is a 96-bit
    coincidence) makes that other key IDEMPOTENCY_KEY_UNAVAILABLE, never a replay of the
    stored one's outcome nor INTERNAL; the answer and the log name neither the key nor the
    caller, the log the digest alone. Other operations of the batch apply."""
    wallet, _ = await ledger.create_wallet(
        NewWallet(
            idempotency_key="wallet-1",
            owner_id="alice",
            owner_kind=OwnerKind.customer,
            unit="EUR",
        )
    )
    caller, key = "collider-caller", "collider-key-7"
    digest = key_digest(caller, key)
    async with ledger.pool.acquire() as connection:
        await connection.execute(
            "insert into transfers (id, operation_id, kind, source_wallet_id, target_wallet_id,"
            " amount, caller, idempotency_key, key_digest, request_hash, created_at)"
            " select id, id, 1, $1, $1, 0, 'stored-caller', 'stored-key', $2, '\\x00', now()"
            " from nextval('transfers_id') as id",
            wallet.id,
            digest,
        )
    colliding = Credit(idempotency_key=key, caller=caller, wallet_id=wallet.id, amount=7)
    other = Credit(idempotency_key="other-key", caller=caller, wallet_id=wallet.id, amount=11)
    with caplog.at_level(logging.WARNING, logger="coffer.core.store.keys"):
        outcomes = await ledger.apply([colliding, other])
        # The same again: the same answer.
        [again] = await ledger.apply([colliding])
    unavailable, applied = outcomes
    assert isinstance(unavailable, errors.IdempotencyKeyUnavailable), unavailable
    assert unavailable.reason == "IDEMPOTENCY_KEY_UNAVAILABLE"
    assert not unavailable.retryable
    assert isinstance(again, errors.IdempotencyKeyUnavailable), again
    assert not isinstance(applied, errors.CofferError)
    assert (await ledger.get_wallet(wallet.id)).balance.posted == 11
    records = [record for record in caplog.records if record.name == "coffer.core.store.keys"]
    assert records and all(record.levelno == logging.WARNING for record in records)
    for said in [unavailable.message, *(record.getMessage() for record in records)]:
        assert key not in said and caller not in said
        assert "stored-key" not in said and "stored-caller" not in said
    assert all(digest.hex() in record.getMessage() for record in records)
