"""Shared fixtures.

Database: one throwaway PostgreSQL cluster for the whole run (`postgres_cluster`), a template
database migrated once (`coffer_template`), and for each test that asks for `database_url` a
fresh database copied from the template and dropped after the test.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio

from coffer.clients.caller import caller_metadata_key
from coffer.postgres.supervisor import EmbeddedPostgres
from coffer.server.app import Server, Settings

from support.database import scratch_database

TEMPLATE_DATABASE = "coffer_template"
# The caller the tests' raw channels name on every call that names none.
CALLER = "tests"

_database_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[EmbeddedPostgres]:
    """A started, non-durable cluster in a temporary directory; stopped and deleted at the end.

    Its `dsn` is the `postgres` database, for administration.
    """
    directory = Path(tempfile.mkdtemp(prefix="coffer-tests-"))
    # As root the cluster runs as a system user, which must get through this directory.
    directory.chmod(0o711)
    try:
        cluster = EmbeddedPostgres(directory / "postgres", durable=False, database="postgres")
        with cluster:
            yield cluster
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def template_database(postgres_cluster: EmbeddedPostgres) -> str:
    """The name of the template database, migrated once; tests copy it, never connect to it."""
    # Imported here so that the tests that need no database run without it.
    from coffer.core.migrate import migrate

    administration = await asyncpg.connect(postgres_cluster.dsn)
    try:
        await administration.execute(f'CREATE DATABASE "{TEMPLATE_DATABASE}"')
        connection = await asyncpg.connect(postgres_cluster.dsn_for(TEMPLATE_DATABASE))
        try:
            await migrate(connection)
        finally:
            await connection.close()
        # CREATE DATABASE ... TEMPLATE fails while anyone is connected to the template.
        await administration.execute(
            f'ALTER DATABASE "{TEMPLATE_DATABASE}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false'
        )
    finally:
        await administration.close()
    return TEMPLATE_DATABASE


@pytest_asyncio.fixture(loop_scope="session")
async def database_url(
    postgres_cluster: EmbeddedPostgres, template_database: str
) -> AsyncIterator[str]:
    """The DSN of a fresh, migrated database of this test's own, dropped after the test."""
    name = f"test_{next(_database_numbers)}"
    async with scratch_database(
        postgres_cluster, name, f'TEMPLATE "{template_database}"'
    ) as database:
        yield database


@pytest_asyncio.fixture(loop_scope="session")
async def server(database_url: str) -> AsyncIterator[Server]:
    """A real Coffer server on a free port, over this test's own database."""
    running = await Server.start(
        Settings(database_url=database_url, listen="127.0.0.1:0", hold_expiry_interval_s=0.2)
    )
    try:
        yield running
    finally:
        await running.stop()


class NamesCaller(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Sends `coffer-caller: <caller>` with every call that does not send one itself, as every
    client of Coffer does (the server refuses writes without it)."""

    def __init__(self, caller: str = CALLER) -> None:
        self.caller = caller

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        if caller_metadata_key not in metadata:
            metadata.add(caller_metadata_key, self.caller)
        return await continuation(details._replace(metadata=metadata), request)


def insecure_channel(target: str, options: Sequence[tuple[str, Any]] = ()) -> grpc.aio.Channel:
    """A channel to `target` that names the tests' caller."""
    return grpc.aio.insecure_channel(target, options=options, interceptors=[NamesCaller()])


@pytest.fixture
def open_channel() -> Callable[..., grpc.aio.Channel]:
    """Opens channels that name the tests' caller, for tests that start servers of their own."""
    return insecure_channel


@pytest_asyncio.fixture(loop_scope="session")
async def channel(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with insecure_channel(f"127.0.0.1:{server.port}") as opened:
        yield opened
