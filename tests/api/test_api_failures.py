"""Failures that are not the caller's, through the real server: a bug or an unknown database
error is INTERNAL (not retryable, logged once with its batch); a lost database is UNAVAILABLE
(retryable); a batch that failed as a whole ends its SubmitBatch call with that status.

The faults are real: a CHECK constraint the ledger does not expect, added to the test's own
database, and a TCP proxy between the server and PostgreSQL that the test cuts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable

import asyncpg
import grpc
import pytest
import pytest_asyncio

from coffer.clients import Client
from coffer.clients import errors as client_errors
from coffer.server.app import Server, Settings
from coffer.v1 import transfers_pb2, transfers_pb2_grpc

from support.api import Api, error_info, key
from support.database import refuse_unexpected_amount, unexpected_amount

Code = grpc.StatusCode


@pytest.fixture
async def api(channel: grpc.aio.Channel) -> Api:
    api = Api(channel)
    await api.setup_units()
    return api


class Proxy:
    """A TCP proxy to PostgreSQL's Unix socket; `cut` closes every connection and refuses new
    ones."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.listen_port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.listen_port or 0)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()
        await self._server.wait_closed()
        self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_unix_connection(self.socket_path)
        except OSError:
            writer.transport.abort()
            return
        self._pipes |= {writer, upstream_writer}
        await asyncio.gather(
            self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer)
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.transport.abort()
        self._pipes.discard(writer)


@pytest_asyncio.fixture(loop_scope="session")
async def proxied(database_url: str) -> AsyncIterator[tuple[Server, Proxy]]:
    parts = urllib.parse.urlsplit(database_url)
    query = urllib.parse.parse_qs(parts.query)
    proxy = Proxy(f"{query['host'][0]}/.s.PGSQL.{query['port'][0]}")
    await proxy.open()
    url = f"postgresql://{parts.username}@127.0.0.1:{proxy.listen_port}{parts.path}"
    server = await Server.start(Settings(database_url=url, listen="127.0.0.1:0"))
    try:
        yield server, proxy
    finally:
        await proxy.open()
        await server.stop()
        await proxy.cut()


async def test_an_unknown_database_error_is_internal_and_logged_once(
    api: Api, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    wallet = await api.funded(1000)
    await refuse_unexpected_amount(database_url)
    request = transfers_pb2.CreditRequest(
        idempotency_key=key(), wallet_id=wallet, amount=unexpected_amount
    )
    with (
        caplog.at_level(logging.ERROR, logger="coffer.server"),
        pytest.raises(grpc.aio.AioRpcError) as raised,
    ):
        await api.transfers.Credit(request, metadata=(("coffer-caller", "shop"),))
    error = raised.value
    assert error.code() == Code.INTERNAL
    assert error_info(error).reason == "INTERNAL"
    # The details stay in the log: the client sees no SQL, no constraint name.
    assert "test_unexpected" not in (error.details() or "")
    [record] = [each for each in caplog.records if each.name == "coffer.server.batcher"]
    assert "a batch of 1 operations in 1 calls failed (first caller 'shop')" in record.message
    assert record.exc_info is not None
    assert isinstance(record.exc_info[1], asyncpg.CheckViolationError)
    # Other calls go on.
    await api.transfers.Credit(
        transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet, amount=5)
    )
    assert await api.balance(wallet) == (1005, 0, 1005)


async def test_the_typed_client_does_not_retry_internal(
    server: Server, api: Api, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    wallet = await api.funded(1000)
    await refuse_unexpected_amount(database_url)
    async with Client(f"127.0.0.1:{server.port}", caller="shop", retries_max=3) as coffer:
        with (
            caplog.at_level(logging.ERROR, logger="coffer.server"),
            pytest.raises(client_errors.Internal) as raised,
        ):
            await coffer.credit(wallet_id=wallet, amount=unexpected_amount)
    assert not raised.value.retryable
    failures = [each for each in caplog.records if each.name == "coffer.server.batcher"]
    assert len(failures) == 1  # one attempt: not retried


async def test_a_batch_that_failed_as_a_whole_ends_with_its_status(
    api: Api, database_url: str
) -> None:
    wallet = await api.funded(1000)
    await refuse_unexpected_amount(database_url)
    operations = [
        transfers_pb2.Operation(
            credit=transfers_pb2.CreditRequest(
                idempotency_key=key(), wallet_id=wallet, amount=amount
            )
        )
        for amount in (1, unexpected_amount, 2)
    ]
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await api.transfers.SubmitBatch(transfers_pb2.SubmitBatchRequest(operations=operations))
    assert raised.value.code() == Code.INTERNAL
    assert error_info(raised.value).reason == "INTERNAL"
    assert await api.balance(wallet) == (1000, 0, 1000)  # nothing of it was applied
    # A domain refusal stays a result of its own, in an OK call.
    operations[1].credit.amount = 3
    operations.append(
        transfers_pb2.Operation(
            debit=transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet, amount=10**9)
        )
    )
    response = await api.transfers.SubmitBatch(
        transfers_pb2.SubmitBatchRequest(operations=operations)
    )
    reasons = [result.error.reason for result in response.results]
    assert reasons == ["", "", "", "INSUFFICIENT_FUNDS"]


async def test_a_lost_database_is_unavailable_and_a_batch_call_says_so(
    proxied: tuple[Server, Proxy], open_channel: Callable[..., grpc.aio.Channel]
) -> None:
    server, proxy = proxied
    async with open_channel(f"127.0.0.1:{server.port}") as channel:
        api = Api(channel)
        await api.setup_units()
        wallet = await api.funded(1000)
        transfers = transfers_pb2_grpc.TransferServiceStub(channel)
        credit = transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet, amount=7)
        batch = transfers_pb2.SubmitBatchRequest(
            operations=[
                transfers_pb2.Operation(
                    credit=transfers_pb2.CreditRequest(
                        idempotency_key=key(), wallet_id=wallet, amount=amount
                    )
                )
                for amount in (1, 2)
            ]
        )
        await proxy.cut()
        for call in (transfers.Credit(credit), transfers.SubmitBatch(batch)):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == Code.UNAVAILABLE, raised.value.details()
            assert error_info(raised.value).reason == "UNAVAILABLE"
        await proxy.open()
        # Retried with the same keys once the database is back: applied once each.
        await transfers.Credit(credit)
        response = await transfers.SubmitBatch(batch)
        assert [result.error.reason for result in response.results] == ["", ""]
        assert await api.balance(wallet) == (1010, 0, 1010)
