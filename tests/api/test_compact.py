"""Compact batch answers (`SubmitBatchRequest.compact`), over every operation kind, through
the real server.

The kinds are enumerated from the `Operation` oneof (support.replay), so a new kind is covered
as soon as it has its replay scenarios. For each kind, one compact batch of its success, its
refusal and an operation that cannot be built: the columns hold one entry per operation, the
success's transfer id, the failures with their index and the error a whole answer gives; the
same batch sent again whole replays the very transfer the compact answer named; sent again
compact, the replays are marked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from coffer.v1 import transfers_pb2, types_pb2

from support.replay import World, key, metadata, opened_world, operation, operation_kinds, scenarios


@pytest.fixture
async def world(channel: grpc.aio.Channel, database_url: str) -> AsyncIterator[World]:
    async with opened_world(channel, database_url) as opened:
        yield opened


async def _submit(
    world: World, operations: list[transfers_pb2.Operation], *, compact: bool
) -> transfers_pb2.SubmitBatchResponse:
    response: transfers_pb2.SubmitBatchResponse = await world.stubs["TransferService"].SubmitBatch(
        transfers_pb2.SubmitBatchRequest(operations=operations, compact=compact),
        metadata=metadata,
    )
    return response


@pytest.mark.parametrize("kind", operation_kinds)
async def test_a_compact_answer_says_what_a_whole_one_says(world: World, kind: str) -> None:
    success_of, refusal_of = scenarios[kind]
    success = await success_of(world)
    refusal, reason, _ = await refusal_of(world)
    batch = [operation(kind, success), operation(kind, refusal), transfers_pb2.Operation()]

    compact = await _submit(world, batch, compact=True)
    assert not compact.results
    outcomes = compact.outcomes
    assert len(outcomes.transfer_ids) == len(batch)
    assert outcomes.transfer_ids[0] > 0 and list(outcomes.transfer_ids[1:]) == [0, 0]
    assert [failed.index for failed in outcomes.failed] == [1, 2]
    assert outcomes.failed[0].error.reason == reason
    assert not outcomes.replayed and not outcomes.amounts_remaining

    whole = await _submit(world, batch, compact=False)
    assert not whole.HasField("outcomes")
    made, refused, invalid = whole.results
    assert made.replayed and made.transfers[0].id == outcomes.transfer_ids[0]
    assert refused.replayed and refused.error == outcomes.failed[0].error
    assert not invalid.replayed and invalid.error == outcomes.failed[1].error
    assert invalid.error.reason == "INVALID_ARGUMENT" and invalid.error.field == "operation"

    again = await _submit(world, batch, compact=True)
    assert list(again.outcomes.replayed) == [True, True, False]
    assert list(again.outcomes.transfer_ids) == list(outcomes.transfer_ids)
    assert list(again.outcomes.failed) == list(outcomes.failed)


async def test_an_up_to_debit_says_what_was_left_to_cover(world: World) -> None:
    wallet = await world.funded(100)
    debit = transfers_pb2.DebitRequest(
        wallet_id=wallet,
        amount=130,
        mode=types_pb2.DEBIT_MODE_UP_TO,
        idempotency_key=key(),
    )
    outcomes = (await _submit(world, [operation("debit", debit)], compact=True)).outcomes
    assert list(outcomes.amounts_remaining) == [30]
    [whole] = (await _submit(world, [operation("debit", debit)], compact=False)).results
    assert whole.amount_remaining == 30 and whole.transfers[0].id == outcomes.transfer_ids[0]
