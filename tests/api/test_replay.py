"""Idempotent replays of every operation kind, through the real server.

The kinds are enumerated from the `Operation` oneof of the batch API, so a new kind fails
`test_every_kind_has_scenarios` until it gets its scenarios here. For each kind, as a single
call and inside a batch:
- a success, replayed with its key, returns the same answer, marked a replay;
- a refusal, then a change that would let the request succeed, then the replay: the same
  refusal, marked a replay;
- the same key with another request: IDEMPOTENCY_KEY_REUSED;
- a key whose digest another key has already (a stored transfer crafted with it):
  IDEMPOTENCY_KEY_UNAVAILABLE, nothing stored, and a new key succeeds;
- and all of that again after the server restarted.
Within one batch: the same request twice (also inside a linked chain) is stored once and its
second answer is the first's, marked a replay; the same key with another request is
IDEMPOTENCY_KEY_REUSED; a chain that failed because of an invalid operation keeps none of its
answers.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message

from coffer.core.model import TransferKind, key_digest
from coffer.server.app import Server, Settings
from coffer.v1 import (
    transfers_pb2,
    types_pb2,
    wallets_pb2,
)

from support.replay import (
    Answer,
    Code,
    World,
    _replayed,
    caller,
    key,
    metadata,
    opened_world,
    operation,
    operation_kinds,
    rpc_of,
    scenarios,
)

# Scenarios, per kind -----------------------------------------------------------------------------


def test_every_kind_has_scenarios() -> None:
    assert sorted(scenarios) == sorted(operation_kinds)
    for kind in operation_kinds:
        rpc_of(kind)


# Tests -------------------------------------------------------------------------------------------


@pytest.fixture
async def world(channel: grpc.aio.Channel, database_url: str) -> AsyncIterator[World]:
    async with opened_world(channel, database_url) as opened:
        yield opened


def _other(request: Message) -> Message:
    """The same request with another note: another request under the same key."""
    other = type(request)()
    other.CopyFrom(request)
    other.note = "another request"  # type: ignore[attr-defined]
    return other


async def _key_reused(world: World, kind: str, request: Message, batched: bool) -> None:
    answer = await world.call(kind, _other(request), batched)
    assert (answer.code, answer.reason) == (Code.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    assert not answer.replayed


modes = pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])
# The ids of the transfers planted under a digest another key has.
planted_ids_start = 2**62
planted_ids = itertools.count()


@modes
@pytest.mark.parametrize("kind", operation_kinds)
async def test_success_replays(world: World, kind: str, batched: bool) -> None:
    request = await scenarios[kind][0](world)
    first = await world.call(kind, request, batched)
    assert first.code == Code.OK and not first.replayed, first
    # A replay through the other route (batch or single) is a replay too.
    for route in (batched, not batched):
        again = await world.call(kind, request, route)
        assert again.replayed, (kind, route)
        if route == batched:
            assert again.same_as(first), (again, first)
    await _key_reused(world, kind, request, batched)


@modes
@pytest.mark.parametrize("refused", [False, True], ids=["succeeding", "refused"])
@pytest.mark.parametrize("kind", operation_kinds)
async def test_a_key_of_a_digest_taken_is_unavailable(
    world: World, kind: str, batched: bool, refused: bool
) -> None:
    """A transfer stored under another key with the same digest (crafted: a real one is a
    96-bit coincidence) makes the request's key IDEMPOTENCY_KEY_UNAVAILABLE, not a replay of
    the other's outcome, nor INTERNAL, whether the request would succeed or be refused; the
    message does not name the key; nothing is stored under it; the same request with a new
    key gets the answer it would have had."""
    # The wallet of the planted transfer first: a refusal may name the wallet made next.
    wallet_id = await world.wallet()
    if refused:
        request, reason, _ = await scenarios[kind][1](world)
    else:
        request, reason = await scenarios[kind][0](world), ""
    taken = request.idempotency_key  # type: ignore[attr-defined]
    await world.connection.execute(
        "insert into transfers (id, operation_id, kind, source_wallet_id, target_wallet_id,"
        " amount, caller, idempotency_key, key_digest, request_hash, created_at)"
        " values ($4, $4, $1, $2, $2, 0, 'another-caller', 'another-key', $3, '\\x00', now())",
        int(TransferKind.credit),
        wallet_id,
        key_digest(caller, taken),
        # Far above the ids the ledger gives: a refusal may name the transfer made next.
        planted_ids_start + next(planted_ids),
    )
    for route in (batched, not batched):
        answer = await world.call(kind, request, route)
        assert (answer.code, answer.reason) == (
            Code.ALREADY_EXISTS,
            "IDEMPOTENCY_KEY_UNAVAILABLE",
        ), (kind, route, answer)
        assert not answer.replayed
        assert taken not in answer.message and "another-key" not in answer.message
    assert await world.stored(request) == (0, 0)
    fresh = type(request)()
    fresh.CopyFrom(request)
    fresh.idempotency_key = key()  # type: ignore[attr-defined]
    answered = await world.call(kind, fresh, batched)
    assert answered.reason == reason and (answered.code == Code.OK) != refused, answered


@pytest.mark.parametrize("kind", operation_kinds)
async def test_successes_change_grants(world: World, kind: str) -> None:
    """The successes the replays are shown with bring funds in with terms (a grant made) or
    say what they changed in grants, so that a replay is shown to give those back alike."""
    request = await scenarios[kind][0](world)
    answer = await world.call(kind, request, batched=True)
    [transfer] = transfers_pb2.OperationResult.FromString(answer.reply).transfers
    if kind in ("credit", "deposit"):
        made = await world.connection.fetchval(
            "select count(*) from grants where transfer_id = $1", transfer.id
        )
        assert made == 1, kind
    else:
        assert transfer.allocations, (kind, transfer)


@modes
@pytest.mark.parametrize("kind", operation_kinds)
async def test_refusal_replays(world: World, kind: str, batched: bool) -> None:
    request, reason, enable = await scenarios[kind][1](world)
    first = await world.call(kind, request, batched)
    assert first.reason == reason and not first.replayed, first
    await enable()
    # Now a new key succeeds, but the key the refusal was given keeps its answer.
    for route in (batched, not batched):
        again = await world.call(kind, request, route)
        assert again.replayed and (again.code, again.reason, again.message) == (
            first.code,
            first.reason,
            first.message,
        ), (again, first)
    fresh = type(request)()
    fresh.CopyFrom(request)
    fresh.idempotency_key = key()  # type: ignore[attr-defined]
    succeeded = await world.call(kind, fresh, batched)
    assert succeeded.code == Code.OK, succeeded
    await _key_reused(world, kind, request, batched)


async def test_invalid_requests_are_not_kept(world: World) -> None:
    """A request refused as invalid never ran: sent again, fixed, under the same key, it
    applies."""
    wallet_id = await world.wallet()
    request = transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet_id, amount=0)
    first = await world.call("credit", request, False)
    assert first.code == Code.INVALID_ARGUMENT
    request.amount = 100
    fixed = await world.call("credit", request, False)
    assert fixed.code == Code.OK and not fixed.replayed


async def test_linked_chain_refusals_replay(world: World) -> None:
    """A chain refused for a reason of state keeps every operation's answer."""
    source, target = await world.wallet(), await world.wallet()
    chain = [
        transfers_pb2.Operation(
            credit=transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=target, amount=5),
            linked=True,
        ),
        transfers_pb2.Operation(
            transfer=transfers_pb2.TransferRequest(
                idempotency_key=key(), source_wallet_id=source, target_wallet_id=target, amount=9
            )
        ),
    ]
    request = transfers_pb2.SubmitBatchRequest(operations=chain)
    stub = world.stubs["TransferService"]
    first = await stub.SubmitBatch(request, metadata=metadata)
    assert [result.error.reason for result in first.results] == [
        "LINKED_OPERATION_FAILED",
        "INSUFFICIENT_FUNDS",
    ]
    await world.credit(source)
    again = await stub.SubmitBatch(request, metadata=metadata)
    assert [result.replayed for result in again.results] == [True, True]
    for result in again.results:
        result.replayed = False
    assert again == first


async def test_replays_survive_a_restart(database_url: str) -> None:
    settings = Settings(database_url=database_url, listen="127.0.0.1:0")
    answers: list[tuple[str, Message, bool, Answer]] = []
    server = await Server.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            connection = await asyncpg.connect(database_url)
            try:
                world = World(channel, connection)
                await world.setup()
                for kind in operation_kinds:
                    success, refusal = scenarios[kind]
                    for batched in (False, True):
                        request = await success(world)
                        answers.append(
                            (kind, request, batched, await world.call(kind, request, batched))
                        )
                        request, _, enable = await refusal(world)
                        answers.append(
                            (kind, request, batched, await world.call(kind, request, batched))
                        )
                        await enable()
            finally:
                await connection.close()
    finally:
        await server.stop()
    server = await Server.start(settings)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            connection = await asyncpg.connect(database_url)
            try:
                world = World(channel, connection)
                for kind, request, batched, first in answers:
                    again = await world.call(kind, request, batched)
                    assert again.replayed and again.same_as(first), (kind, batched, again, first)
            finally:
                await connection.close()
    finally:
        await server.stop()


async def test_create_wallet_replays_say_so(world: World) -> None:
    request = wallets_pb2.CreateWalletRequest(
        idempotency_key=key(),
        owner_id="alice",
        owner_kind=types_pb2.OWNER_KIND_CUSTOMER,
        unit="EUR",
    )
    answers = []
    for _ in range(2):
        call = world.wallets.CreateWallet(request, metadata=metadata)
        answers.append((await call, _replayed(await call.trailing_metadata())))
    (first, first_replayed), (again, again_replayed) = answers
    assert (first_replayed, again_replayed) == (False, True)
    assert again == first


# Within one batch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", operation_kinds)
async def test_a_request_twice_in_a_batch(world: World, kind: str) -> None:
    """The same request twice in one batch, under one key: the second answer is the first's,
    marked a replay, and the operation is stored once; for a success and for a refusal."""
    success, refusal = scenarios[kind]
    request = await success(world)
    first, second = await world.batch([operation(kind, request), operation(kind, request)])
    assert first.code == Code.OK and not first.replayed, first
    assert second.replayed and second.same_as(first), (second, first)
    assert await world.stored(request) == (1, 0)
    again = await world.call(kind, request, batched=True)
    assert again.replayed and again.same_as(first), (again, first)

    request, reason, enable = await refusal(world)
    first, second = await world.batch([operation(kind, request), operation(kind, request)])
    assert first.reason == reason and not first.replayed, first
    assert second.replayed and second.same_as(first), (second, first)
    assert await world.stored(request) == (0, 1)
    await enable()
    again = await world.call(kind, request, batched=True)
    assert again.replayed and again.same_as(first), (again, first)


async def test_a_request_twice_in_a_linked_chain(world: World) -> None:
    wallet_id = await world.funded(1000)
    target = await world.wallet()

    # A chain that succeeds: the operation is applied once.
    debit = transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet_id, amount=300)
    credit = transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=target, amount=5)
    chain = [
        operation("debit", debit, linked=True),
        operation("debit", debit, linked=True),
        operation("credit", credit),
    ]
    answers = await world.batch(chain)
    assert [answer.code for answer in answers] == [Code.OK] * 3, answers
    assert [answer.replayed for answer in answers] == [False, True, False], answers
    assert answers[1].same_as(answers[0])
    assert await world.stored(debit) == (1, 0)
    assert await world.posted(wallet_id) == 700

    # A chain that fails, and the same request again after it, outside the chain: every
    # answer of the chain is its refusal, the repeated one that refusal replayed.
    debit = transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet_id, amount=200)
    refused = transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet_id, amount=5000)
    chain = [
        operation("debit", debit, linked=True),
        operation("debit", debit, linked=True),
        operation("debit", refused),
        operation("debit", debit),
    ]
    answers = await world.batch(chain)
    assert [answer.reason for answer in answers] == [
        "LINKED_OPERATION_FAILED",
        "LINKED_OPERATION_FAILED",
        "INSUFFICIENT_FUNDS",
        "LINKED_OPERATION_FAILED",
    ], answers
    assert [answer.replayed for answer in answers] == [False, True, False, True], answers
    assert answers[1].same_as(answers[0]) and answers[3].same_as(answers[0])
    assert await world.stored(debit) == (0, 1)
    assert await world.stored(refused) == (0, 1)
    assert await world.posted(wallet_id) == 700

    # The same batch again: every answer replayed, the same.
    again = await world.batch(chain)
    assert [answer.replayed for answer in again] == [True] * 4, again
    assert all(each.same_as(first) for each, first in zip(again, answers, strict=True))
    assert await world.posted(wallet_id) == 700


async def test_a_stored_request_in_a_linked_chain_that_fails(world: World) -> None:
    """A request stored before, sent again inside a chain the batch undoes: its stored answer,
    replayed (the chain's failure does not undo what an earlier batch did), the others the
    chain's."""
    wallet_id = await world.funded(1000)
    debit = transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet_id, amount=300)
    [first] = await world.batch([operation("debit", debit)])
    assert first.code == Code.OK, first
    refused = transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet_id, amount=5000)
    answers = await world.batch(
        [operation("debit", debit, linked=True), operation("debit", refused)]
    )
    assert [answer.code for answer in answers] == [Code.OK, Code.FAILED_PRECONDITION], answers
    assert answers[1].reason == "INSUFFICIENT_FUNDS", answers
    assert [answer.replayed for answer in answers] == [True, False], answers
    assert answers[0].same_as(first)
    assert await world.stored(debit) == (1, 0)
    assert await world.posted(wallet_id) == 700


async def test_a_key_reused_in_a_batch(world: World) -> None:
    """The same key with another request in one batch: the first is answered as it would be
    alone, the other is IDEMPOTENCY_KEY_REUSED; for a success and for a refusal."""
    wallet_id = await world.wallet()
    credit = transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet_id, amount=100)
    debit = transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet_id, amount=5000)
    answers = await world.batch(
        [
            operation("credit", credit),
            operation("credit", _other(credit)),
            operation("debit", debit),
            operation("debit", _other(debit)),
        ]
    )
    assert [(answer.code, answer.reason) for answer in answers] == [
        (Code.OK, ""),
        (Code.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
        (Code.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS"),
        (Code.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED"),
    ], answers
    assert not any(answer.replayed for answer in answers), answers
    assert (await world.stored(credit), await world.stored(debit)) == ((1, 0), (0, 1))
    assert await world.posted(wallet_id) == 100


@pytest.mark.parametrize("invalid_first", [False, True], ids=["invalid-last", "invalid-first"])
async def test_a_chain_with_an_invalid_operation_is_not_kept(
    world: World, invalid_first: bool
) -> None:
    """A chain that failed because of an invalid operation never ran: the invalid operation
    answers INVALID_ARGUMENT with its field, the others fail with the chain, and none of
    their answers is kept. Sent again once they would succeed, under the same keys, they
    apply."""
    wallet_id = await world.wallet()
    # Refused alone (the wallet is empty): the chain must not keep that refusal either.
    debit = transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet_id, amount=100)
    invalid = transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet_id, amount=0)
    chain = [operation("debit", debit), operation("credit", invalid)]
    if invalid_first:
        chain.reverse()
    chain[0].linked = True
    answers = await world.batch(chain)
    invalid_answer, debit_answer = answers if invalid_first else reversed(answers)
    assert (invalid_answer.code, invalid_answer.field) == (Code.INVALID_ARGUMENT, "amount"), answers
    assert debit_answer.reason in ("LINKED_OPERATION_FAILED", "INSUFFICIENT_FUNDS"), answers
    assert not any(answer.replayed for answer in answers), answers
    assert await world.stored(debit) == (0, 0)

    await world.credit(wallet_id, 1000)
    again = await world.call("debit", debit, batched=False)
    assert again.code == Code.OK and not again.replayed, again
    invalid.amount = 50
    fixed = await world.call("credit", invalid, batched=False)
    assert fixed.code == Code.OK and not fixed.replayed, fixed
    assert await world.posted(wallet_id) == 950
