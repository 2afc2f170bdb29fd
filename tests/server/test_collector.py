"""The cycle collector of a serving process (coffer.server.collector), seen from outside: a
real `coffer serve` applying batches collects its young generation less than once a batch
(at CPython's defaults, about 4 times a batch of these)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from coffer.clients import Client, operations
from coffer.server import collector

from support.metrics import scrape
from support.processes import one_process_with_metrics, serve_beside

coffer = Path(sys.executable).parent / "coffer"

batches = 10
batch_size = 500


async def test_a_serving_process_collects_cycles_rarely(database_url: str) -> None:
    serving = await serve_beside(
        coffer,
        *one_process_with_metrics,
        env={**os.environ, "DATABASE_URL": database_url},
    )
    try:
        metrics_port, target = serving.metrics_port, serving.target
        async with Client(target, caller="collector") as client:
            await client.create_unit(code="GCX", kind="currency", name="Collected", scale=2)
            wallet = await client.create_wallet(
                owner_id="collector", owner_kind="customer", unit="GCX", idempotency_key="w"
            )
            young = ("python_gc_collections_total", frozenset({("generation", "0")}))
            before = (await scrape(metrics_port))[young]
            for number in range(batches):
                results = await client.submit_batch(
                    [
                        operations.credit(
                            wallet_id=wallet.id,
                            amount=1,
                            note="n" * 40,
                            idempotency_key=f"{number}-{index}",
                        )
                        for index in range(batch_size)
                    ]
                )
                assert not any(result.HasField("error") for result in results)
            after = (await scrape(metrics_port))[young]
            balance = (await client.get_wallet(wallet_id=wallet.id)).balance
    finally:
        await serving.stop()
    assert balance.posted == batches * batch_size
    # Every batch made far more objects than CPython's default threshold (700), nearly all
    # freed by their reference counts: the young generation was collected less than once a
    # batch.
    assert after - before < batches, (before, after, collector.threshold_young)
