"""The server's limits, through the real server: settings bounded by the limits they feed,
batches never larger than the ledger takes."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import pytest
from test_api import Api, key

from coffer.clients.v1 import transfers_pb2
from coffer.core.ledger import batch_operations_max
from coffer.server.app import Server, Settings, SettingsError


@pytest.mark.parametrize(
    ("changes", "setting"),
    [
        ({"batch_size_max": batch_operations_max + 1}, "batch_size_max"),
        ({"batch_size_max": 0}, "batch_size_max"),
        ({"pool_size": 0}, "pool_size"),
        ({"queue_max": 999}, "queue_max"),
        ({"batch_workers": 0}, "batch_workers"),
        ({"batch_workers": 9}, "batch_workers"),
        ({"batch_wait_ms": 1001}, "batch_wait_ms"),
        ({"hold_expiry_interval_s": 0}, "hold_expiry_interval_s"),
        ({"shutdown_grace_s": -1}, "shutdown_grace_s"),
    ],
)
def test_settings_are_bounded_by_what_they_feed(changes: dict[str, float], setting: str) -> None:
    base = Settings(database_url="")
    with pytest.raises(SettingsError) as raised:
        dataclasses.replace(base, **changes)
    assert raised.value.setting == setting
    assert str(raised.value).startswith(f"{setting} must ")


async def test_concurrent_groups_past_the_ledger_maximum_are_split(database_url: str) -> None:
    # The largest coalesced batch the ledger takes, and two calls that together pass it.
    settings = Settings(
        database_url=database_url, listen="127.0.0.1:0", batch_size_max=batch_operations_max
    )
    size = 5000
    assert 2 * size > batch_operations_max
    server = await Server.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
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
