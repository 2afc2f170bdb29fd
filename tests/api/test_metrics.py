"""Prometheus metrics, scraped over HTTP from real servers after real calls: the calls counted
by method and status code (every RPC), the database batches and their operations, what is
read when scraped (the queue, the pools, health), the events-behind hook; one registry per
server, and the endpoint stopped with its server."""

from __future__ import annotations

import asyncio
import logging
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.protobuf import message_factory

from coffer.postgres.supervisor import EmbeddedPostgres
from coffer.server.app import Server, Settings, access_pool_size, services_described
from coffer.v1 import events_pb2, events_pb2_grpc, transfers_pb2, wallets_pb2

from support.api import Api, key
from support.database import refuse_unexpected_amount, unexpected_amount
from support.metrics import Samples, labelled, scrape, value


@pytest_asyncio.fixture(loop_scope="session")
async def measured(database_url: str) -> AsyncIterator[Server]:
    """A server serving its metrics on a free port."""
    running = await Server.start(
        Settings(
            database_url=database_url,
            listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0",
            health_check_interval_s=0.05,
        )
    )
    try:
        yield running
    finally:
        await running.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def channel(
    measured: Server, open_channel: Callable[..., grpc.aio.Channel]
) -> AsyncIterator[grpc.aio.Channel]:
    async with open_channel(f"127.0.0.1:{measured.port}") as opened:
        yield opened


@pytest.fixture
def api(channel: grpc.aio.Channel) -> Api:
    return Api(channel)


async def metrics_of(server: Server) -> Samples:
    assert server.metrics_port is not None
    return await scrape(server.metrics_port)


def rpcs(samples: Samples) -> dict[tuple[str, str, str], float]:
    """coffer_rpcs_total by (service's short name, method, code)."""
    found = {}
    for labels, count in labelled(samples, "coffer_rpcs_total").items():
        named = dict(labels)
        found[(named["service"].rsplit(".", 1)[1], named["method"], named["code"])] = count
    return found


async def test_the_counters_match_the_calls_made(
    measured: Server, channel: grpc.aio.Channel, api: Api
) -> None:
    await api.setup_units()
    funded = await api.funded(1000)
    empty = await api.wallet()
    for _ in range(4):
        await api.transfers.Credit(
            transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=funded, amount=10)
        )
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.transfers.Debit(
            transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=empty, amount=10)
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await api.wallets.GetWallet(wallets_pb2.GetWalletRequest(wallet_id=10**9))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND

    def transfer(source: int, target: int, amount: int) -> transfers_pb2.Operation:
        return transfers_pb2.Operation(
            transfer=transfers_pb2.TransferRequest(
                idempotency_key=key(),
                source_wallet_id=source,
                target_wallet_id=target,
                amount=amount,
            )
        )

    batch = transfers_pb2.SubmitBatchRequest(
        operations=[
            transfer(funded, empty, 5),
            transfer(funded, empty, 5),
            transfer(empty, funded, 50),
        ]
    )
    answered = await api.transfers.SubmitBatch(batch)
    assert [result.HasField("error") for result in answered.results] == [False, False, True]
    # A replay: its operations answered as stored, not applied again.
    await api.transfers.SubmitBatch(batch)
    # Bytes that are no request: refused by admission.
    malformed = channel.unary_unary("/coffer.v1.TransferService/Credit")
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await malformed(b"\xff\xff\xff", timeout=10)
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    samples = await metrics_of(measured)
    assert rpcs(samples) == {
        ("UnitService", "CreateUnit", "OK"): 2,
        ("WalletService", "CreateWallet", "OK"): 2,
        ("WalletService", "GetWallet", "NOT_FOUND"): 1,
        ("TransferService", "Credit", "OK"): 5,
        ("TransferService", "Credit", "INVALID_ARGUMENT"): 1,
        ("TransferService", "Debit", "FAILED_PRECONDITION"): 1,
        ("TransferService", "SubmitBatch", "OK"): 2,
    }
    # Every call timed, once.
    for (service, method, _), _count in rpcs(samples).items():
        calls = sum(
            count
            for (each, name, _), count in rpcs(samples).items()
            if (each, name) == (service, method)
        )
        assert (
            value(
                samples,
                "coffer_rpc_duration_seconds_count",
                service=f"coffer.v1.{service}",
                method=method,
            )
            == calls
        )
    assert labelled(samples, "coffer_admission_refusals_total") == {
        frozenset({("reason", "MALFORMED_REQUEST")}): 1
    }

    # The database batches, as the batcher counts them: credits and the debit went one a
    # batch (one call at a time), each batch call in one.
    batches = measured.batcher.batches_applied
    assert batches == 8
    assert value(samples, "coffer_batches_applied_total") == batches
    assert value(samples, "coffer_batch_operations_count") == batches
    assert value(samples, "coffer_batch_duration_seconds_count") == batches
    assert (
        value(samples, "coffer_batch_operations_sum") == measured.batcher.operations_applied == 12
    )
    # Every batch of one operation is in the first bucket; the two batch calls of 3, in the
    # bucket up to 5.
    assert value(samples, "coffer_batch_operations_bucket", le="1.0") == 6
    assert value(samples, "coffer_batch_operations_bucket", le="5.0") == 8
    assert value(samples, "coffer_batches_failed_total", reason="UNAVAILABLE") == 0
    assert value(samples, "coffer_operations_total", outcome="applied") == 7
    assert value(samples, "coffer_operations_total", outcome="replayed") == 2
    assert value(samples, "coffer_operations_total", outcome="refused") == 3
    assert labelled(samples, "coffer_operations_refused_total") == {
        frozenset({("reason", "INSUFFICIENT_FUNDS")}): 3
    }
    listed = await api.transfers.ListTransfers(transfers_pb2.ListTransfersRequest(page_size=100))
    assert value(samples, "coffer_transfers_applied_total") == len(listed.transfers) == 7

    # Read when scraped.
    assert value(samples, "coffer_batcher_queued_operations") == 0
    assert value(samples, "coffer_database_up") == 1
    assert value(samples, "coffer_admission_calls_in_progress") == 0
    assert value(samples, "coffer_admission_request_bytes_in_progress") == 0
    assert value(samples, "coffer_event_loop_lag_seconds") >= 0
    sizes = {
        "write": measured.settings.pool_size,
        "read": measured.settings.pool_size_read,
        "health": 1,
        "access": access_pool_size,
    }
    for pool, size in sizes.items():
        in_use = value(samples, "coffer_pool_connections_in_use", pool=pool)
        opened = value(samples, "coffer_pool_connections_open", pool=pool)
        assert value(samples, "coffer_pool_connections_max", pool=pool) == size
        assert 0 <= in_use <= opened <= size, (pool, in_use, opened)
    # Writes and reads were made, on connections still open.
    assert value(samples, "coffer_pool_connections_open", pool="write") >= 1
    assert value(samples, "coffer_pool_connections_open", pool="read") >= 1
    # The process's own.
    assert value(samples, "process_resident_memory_bytes") > 0


async def test_every_rpc_is_counted_with_its_status_code(
    measured: Server, channel: grpc.aio.Channel
) -> None:
    """Each RPC of every service, called once with an empty request (refused, or answered),
    is counted once, under the status code its caller got; a stream, which goes on until its
    caller leaves (here at its deadline), as CANCELLED."""
    codes = {}
    for service in services_described:
        for method in service.methods:
            path = f"/{service.full_name}/{method.name}"
            empty = message_factory.GetMessageClass(method.input_type)()
            if method.server_streaming:
                stream = channel.unary_stream(
                    path, request_serializer=lambda message: message.SerializeToString()
                )
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for _ in stream(empty, timeout=1):
                        pass
                assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                codes[(service.name, method.name, grpc.StatusCode.CANCELLED.name)] = 1
                continue
            call = channel.unary_unary(
                path, request_serializer=lambda message: message.SerializeToString()
            )
            try:
                await call(empty, timeout=10)
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as error:
                code = error.code()
            codes[(service.name, method.name, code.name)] = 1
    assert len(codes) == sum(len(service.methods) for service in services_described)
    # A stream whose caller left is counted once the server has seen it go, a moment later.
    async with asyncio.timeout(10):
        while (counted := rpcs(await metrics_of(measured))) != codes and len(counted) < len(codes):
            await asyncio.sleep(0.05)
    assert counted == codes


async def test_a_failed_batch_and_a_lost_database_are_counted(
    measured: Server,
    api: Api,
    database_url: str,
    postgres_cluster: EmbeddedPostgres,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await api.setup_units()
    funded = await api.funded(1000)
    await refuse_unexpected_amount(database_url)
    with (
        caplog.at_level(logging.INFO, logger="coffer.server"),
        pytest.raises(grpc.aio.AioRpcError) as failed,
    ):
        await api.transfers.SubmitBatch(
            transfers_pb2.SubmitBatchRequest(
                operations=[
                    transfers_pb2.Operation(
                        credit=transfers_pb2.CreditRequest(
                            idempotency_key=key(), wallet_id=funded, amount=unexpected_amount
                        )
                    )
                ]
            )
        )
    assert failed.value.code() == grpc.StatusCode.INTERNAL
    samples = await metrics_of(measured)
    assert value(samples, "coffer_batches_failed_total", reason="INTERNAL") == 1
    assert value(samples, "coffer_batches_applied_total") == 1  # the funding credit
    # The batch call's log line.
    [line] = [record for record in caplog.records if record.name == "coffer.server.logs"]
    assert line.levelno == logging.WARNING
    fields = line.fields  # type: ignore[attr-defined]
    assert fields["event"] == "batch_failed"
    assert fields["reason"] == "INTERNAL" and fields["operations"] == 1
    assert fields["principal"] == "tests"

    # The database goes away: health, and so the gauge, say so.
    name = urllib.parse.unquote(urllib.parse.urlsplit(database_url).path.lstrip("/"))
    administration = await asyncpg.connect(postgres_cluster.dsn)
    try:
        await administration.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await administration.close()
    async with asyncio.timeout(30):
        while value(await metrics_of(measured), "coffer_database_up") != 0:
            await asyncio.sleep(0.05)


async def test_each_server_has_its_own_registry_stopped_with_it(
    measured: Server, api: Api, database_url: str
) -> None:
    other = await Server.start(
        Settings(database_url=database_url, listen="127.0.0.1:0", metrics_listen="127.0.0.1:0")
    )
    try:
        assert other.metrics_port != measured.metrics_port
        await api.setup_units()
        assert rpcs(await metrics_of(measured)) == {("UnitService", "CreateUnit", "OK"): 2}
        assert rpcs(await metrics_of(other)) == {}
        # The events-behind hook: each watcher's callback, the most behind reported.
        assert other.metrics is not None
        remove_one = other.metrics.events_behind.add(lambda: 7)
        remove_other = other.metrics.events_behind.add(lambda: 3)
        samples = await metrics_of(other)
        assert value(samples, "coffer_events_behind") == 7
        assert value(samples, "coffer_event_watchers") == 2
        remove_one()
        remove_one()
        samples = await metrics_of(other)
        assert value(samples, "coffer_events_behind") == 3
        assert value(samples, "coffer_event_watchers") == 1
        remove_other()
        assert value(await metrics_of(other), "coffer_events_behind") == 0
    finally:
        await other.stop()
    with pytest.raises(urllib.error.URLError):
        await asyncio.to_thread(
            urllib.request.urlopen, f"http://127.0.0.1:{other.metrics_port}/metrics", timeout=5
        )


async def test_without_metrics_listen_nothing_is_served(server: Server) -> None:
    assert server.metrics is None and server.metrics_port is None


async def test_a_watcher_of_the_event_stream_is_counted_with_how_far_behind_it_is(
    measured: Server, channel: grpc.aio.Channel, api: Api
) -> None:
    """A real WatchEvents stream: counted while it lasts, and 0 behind once it has read all
    the records committed (a merchant's filter skips most, and is not behind for them)."""
    await api.setup_units()
    watch = events_pb2_grpc.EventServiceStub(channel).WatchEvents(
        events_pb2.WatchEventsRequest(filter=events_pb2.EventFilter(owner_id="nobody"))
    )
    try:
        for _ in range(5):
            await api.funded(100)
        listener = measured.listener
        samples = await metrics_of(measured)
        async with asyncio.timeout(10):
            while listener.head == 0 or value(samples, "coffer_events_behind") > 0:
                await asyncio.sleep(0.05)
                samples = await metrics_of(measured)
        assert value(samples, "coffer_event_watchers") == 1
    finally:
        watch.cancel()
    async with asyncio.timeout(10):
        while value(await metrics_of(measured), "coffer_event_watchers") != 0:
            await asyncio.sleep(0.05)
