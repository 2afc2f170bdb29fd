"""The server's limits, through the real server: batches never larger than the ledger takes,
malformed request bytes refused as such. (The settings' bounds: test_settings.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import asyncpg
import grpc
import pytest
from google.protobuf.descriptor import FieldDescriptor, MethodDescriptor

from coffer.core.model import batch_operations_max
from coffer.server import admission
from coffer.server.admission import request_bytes_max, request_bytes_small_max
from coffer.server.app import Server, Settings, services_described
from coffer.v1 import transfers_pb2

from support.api import Api, error_info, key, raw_call
from support.paths import root

Code = grpc.StatusCode


def test_the_api_states_the_batch_limits() -> None:
    """SubmitBatch's comment gives both of its limits, as the server defines them."""
    proto = root / "protos/coffer/v1/transfers.proto"
    lines = proto.read_text().splitlines()
    end = next(n for n, line in enumerate(lines) if "rpc SubmitBatch(" in line)
    start = end
    while lines[start - 1].strip().startswith("//"):
        start -= 1
    comment = " ".join(line.strip().removeprefix("//").strip() for line in lines[start:end])
    assert f"Up to {batch_operations_max:,} operations" in comment, comment
    assert f"at most {request_bytes_max:,} bytes" in comment, comment
    assert "RESOURCE_EXHAUSTED, without ErrorInfo" in comment, comment


async def test_concurrent_groups_past_the_ledger_maximum_are_split(
    database_url: str, open_channel: Callable[..., grpc.aio.Channel]
) -> None:
    # The largest coalesced batch the ledger takes, and two calls that together pass it.
    settings = Settings(
        database_url=database_url, listen="127.0.0.1:0", batch_size_max=batch_operations_max
    )
    size = 5000
    assert 2 * size > batch_operations_max
    server = await Server.start(settings)
    try:
        async with open_channel(f"127.0.0.1:{server.port}") as channel:
            api = Api(channel)
            await api.setup_units()
            wallet = await api.wallet()
            requests = [
                transfers_pb2.SubmitBatchRequest(
                    operations=[
                        transfers_pb2.Operation(
                            credit=transfers_pb2.CreditRequest(
                                idempotency_key=key(), wallet_id=wallet, amount=1
                            )
                        )
                        for _ in range(size)
                    ]
                )
                for _ in range(2)
            ]
            responses = await asyncio.gather(
                *(api.transfers.SubmitBatch(request, timeout=60) for request in requests)
            )
            for response in responses:
                assert len(response.results) == size
                assert not [result for result in response.results if result.HasField("error")]
            assert await api.balance(wallet) == (2 * size, 0, 2 * size)
            assert server.batcher.batches_applied == 2
    finally:
        await server.stop()


# Malformed request bytes -----------------------------------------------------------------------


def every_method() -> list[MethodDescriptor]:
    return [method for service in services_described for method in service.methods]


def malformed(method: MethodDescriptor) -> dict[str, bytes]:
    """Bytes that no protobuf decoder takes as this method's request."""
    cases = {
        # Field 1, length-delimited, says 5 bytes, gives 2.
        "truncated": b"\x0a\x05ab",
        # Field 1 as a varint of 11 bytes: a varint has 10 at most.
        "varint of 11 bytes": b"\x08" + b"\xff" * 10 + b"\x01",
        # A tag without its value.
        "tag alone": b"\x08",
    }
    for field in method.input_type.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            tag = bytes([field.number << 3 | 2]) if field.number < 16 else None
            if tag is not None:
                cases["invalid UTF-8 in a string"] = tag + b"\x02\xff\xfe"
                break
    return cases


async def test_malformed_bytes_are_invalid_argument_for_every_rpc(
    channel: grpc.aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    methods = every_method()
    assert {method.containing_service.name for method in methods} == {
        "AccessService",
        "UnitService",
        "WalletService",
        "TransferService",
        "HoldService",
        "EventService",
        "GrantService",
        "ReportService",
    }
    utf8_cases = 0
    with caplog.at_level(logging.INFO):
        for method in methods:
            call = raw_call(channel, method)
            for case, data in malformed(method).items():
                utf8_cases += case.startswith("invalid UTF-8")
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await call(data)
                error = raised.value
                assert error.code() == Code.INVALID_ARGUMENT, (method.full_name, case, error)
                info = error_info(error)
                assert info.reason == "MALFORMED_REQUEST", (method.full_name, case)
                assert method.input_type.full_name in (error.details() or "")
    assert utf8_cases >= 15  # every request with a string field among its first 15
    assert not [record for record in caplog.records if record.levelno > logging.INFO]
    malformed_logs = [r for r in caplog.records if r.name == "coffer.server.admission"]
    assert malformed_logs and all(r.levelno == logging.INFO for r in malformed_logs)
    # The server is fine: a well-formed call right after.
    api = Api(channel)
    await api.setup_units()
    assert await api.balance(await api.funded(5)) == (5, 0, 5)


# Bounded memory ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def wallet_locked(database_url: str, wallet_id: int) -> AsyncIterator[None]:
    """Holds the wallet's row lock, as a long transaction would: every batch touching it waits."""
    connection = await asyncpg.connect(database_url)
    try:
        async with connection.transaction():
            await connection.execute("select id from wallets where id = $1 for update", wallet_id)
            yield
    finally:
        await connection.close()


async def until(condition: Callable[[], bool], timeout_s: float = 10) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def overloaded(error: BaseException) -> int:
    """The retry-after hint of an OVERLOADED refusal, in ms; fails on anything else."""
    assert isinstance(error, grpc.aio.AioRpcError), error
    assert error.code() == Code.RESOURCE_EXHAUSTED, error.details()
    info = error_info(error)
    assert info.reason == "OVERLOADED"
    return int(info.metadata["retry_after_ms"])


def credit(wallet_id: int, note: str = "") -> transfers_pb2.CreditRequest:
    return transfers_pb2.CreditRequest(
        idempotency_key=key(), wallet_id=wallet_id, amount=1, note=note
    )


async def test_calls_past_calls_max_are_overloaded_with_a_retry_hint(
    database_url: str, open_channel: Callable[..., grpc.aio.Channel]
) -> None:
    settings = Settings(database_url=database_url, listen="127.0.0.1:0", calls_max=4)
    server = await Server.start(settings)
    try:
        async with open_channel(f"127.0.0.1:{server.port}") as channel:
            api = Api(channel)
            await api.setup_units()
            wallet = await api.wallet()
            async with wallet_locked(database_url, wallet):
                # Fewer than gRPC's own limit on streams per connection (twice calls_max), which
                # would make the client wait instead.
                calls = [
                    asyncio.ensure_future(api.transfers.Credit(credit(wallet))) for _ in range(7)
                ]
                await until(lambda: sum(call.done() for call in calls) == 3)
                assert server.admission.calls == 4
                for call in calls:
                    if call.done():
                        assert 10 <= overloaded(call.exception()) <= 5000  # type: ignore[arg-type]
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            applied = [each for each in outcomes if isinstance(each, transfers_pb2.CreditResponse)]
            assert len(applied) == 4
            assert await api.balance(wallet) == (4, 0, 4)
            assert (server.admission.calls, server.admission.bytes) == (0, 0)
    finally:
        await server.stop()


async def test_large_requests_cannot_shut_out_small_ones(
    server: Server,
    database_url: str,
    open_channel: Callable[..., grpc.aio.Channel],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shares of the byte budget alone decide here. The client runs in the server's process
    # and event loop: building and sending megabytes holds the loop, which a slow machine's
    # server then counts as busy (the loop's lag, tested in tests/server/test_admission.py).
    monkeypatch.setattr(admission, "loop_lag_ms_max", 10**6)
    # The answers echo the notes: larger than gRPC's default 4 MB.
    channel = open_channel(f"127.0.0.1:{server.port}", [("grpc.max_receive_message_length", 2**26)])
    async with channel:
        api = Api(channel)
        await api.setup_units()
        await large_and_small(server, api, database_url)


async def large_and_small(server: Server, api: Api, database_url: str) -> None:
    locked = await api.wallet()
    source = await api.wallet(balance_minimum=-(10**6))
    target = await api.wallet()
    note = "n" * 900

    def large() -> transfers_pb2.SubmitBatchRequest:
        return transfers_pb2.SubmitBatchRequest(
            operations=[
                transfers_pb2.Operation(credit=credit(locked, note))
                for _ in range(batch_operations_max)
            ]
        )

    first, second = large(), large()
    size = first.ByteSize()
    assert request_bytes_small_max < size <= request_bytes_max
    assert 2 * size > server.settings.queued_bytes_max - request_bytes_max
    async with wallet_locked(database_url, locked):
        admitted = asyncio.ensure_future(api.transfers.SubmitBatch(first, timeout=60))
        await until(lambda: server.admission.bytes >= size)
        # A second large request would pass the share large requests may take: refused,
        # before it is decoded; a small call still gets in, and is applied at once (a
        # transfer between other wallets: a credit would wait for the unit's operator wallet,
        # which the batch has locked).
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await api.transfers.SubmitBatch(second, timeout=60)
        overloaded(raised.value)
        small = transfers_pb2.TransferRequest(
            idempotency_key=key(), source_wallet_id=source, target_wallet_id=target, amount=1
        )
        await api.transfers.Transfer(small, timeout=10)
        assert not admitted.done()
    response = await admitted
    assert not [result for result in response.results if result.HasField("error")]
    assert await api.balance(locked) == (batch_operations_max, 0, batch_operations_max)
    assert await api.balance(target) == (1, 0, 1)
    assert (server.admission.calls, server.admission.bytes) == (0, 0)


async def test_calls_whose_deadline_passed_while_queued_are_not_applied(
    server: Server, channel: grpc.aio.Channel, database_url: str
) -> None:
    api = Api(channel)
    await api.setup_units()
    wallet = await api.wallet()

    def batch(size: int) -> transfers_pb2.SubmitBatchRequest:
        return transfers_pb2.SubmitBatchRequest(
            operations=[transfers_pb2.Operation(credit=credit(wallet)) for _ in range(size)]
        )

    async with wallet_locked(database_url, wallet):
        # A batch call and a single call applying (in that order: no batch call starts while
        # single calls are being applied), waiting for the lock; the late ones queue behind
        # them in their lanes.
        first_batch = asyncio.ensure_future(api.transfers.SubmitBatch(batch(2)))
        await until(lambda: server.admission.calls == 1)
        await asyncio.sleep(0.05)
        first = asyncio.ensure_future(api.transfers.Credit(credit(wallet)))
        await until(lambda: server.admission.calls == 2)
        await asyncio.sleep(0.1)
        late = [api.transfers.Credit(credit(wallet), timeout=0.2) for _ in range(20)] + [
            api.transfers.SubmitBatch(
                transfers_pb2.SubmitBatchRequest(
                    operations=[transfers_pb2.Operation(credit=credit(wallet)) for _ in range(3)]
                ),
                timeout=0.2,
            )
            for _ in range(2)
        ]
        outcomes = await asyncio.gather(*late, return_exceptions=True)
        codes = {getattr(outcome, "code", lambda: None)() for outcome in outcomes}
        assert codes == {Code.DEADLINE_EXCEEDED}
        await until(lambda: server.batcher.queued == 0)
    await first
    await first_batch
    assert await api.balance(wallet) == (3, 0, 3)  # none of the late ones applied
    assert (server.admission.calls, server.admission.bytes) == (0, 0)


async def test_a_request_past_the_largest_is_refused_by_grpc(channel: grpc.aio.Channel) -> None:
    call = channel.unary_unary(
        "/coffer.v1.UnitService/GetUnit", request_serializer=None, response_deserializer=None
    )
    length = request_bytes_max
    varint = bytearray()
    while length > 0x7F:
        varint.append(length & 0x7F | 0x80)
        length >>= 7
    varint.append(length)
    data = b"\x0a" + bytes(varint) + b"x" * request_bytes_max
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call(data)
    assert raised.value.code() == Code.RESOURCE_EXHAUSTED
    assert "Received message larger than max" in (raised.value.details() or "")
