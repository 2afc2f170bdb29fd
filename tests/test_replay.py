"""Idempotent replays of every operation kind, through the real server.

The kinds are enumerated from the `Operation` oneof of the batch API, so a new kind fails
`test_every_kind_has_scenarios` until it gets its scenarios here. For each kind, as a single
call and inside a batch:
- a success, replayed with its key, returns the same answer, marked a replay;
- a refusal, then a change that would let the request succeed, then the replay: the same
  refusal, marked a replay;
- the same key with another request: IDEMPOTENCY_KEY_REUSED;
- and all of that again after the server restarted.
Within one batch: the same request twice (also inside a linked chain) is stored once and its
second answer is the first's, marked a replay; the same key with another request is
IDEMPOTENCY_KEY_REUSED; a chain that failed because of an invalid operation keeps none of its
answers.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message
from test_api import error_info

from coffer.server.app import Server, Settings
from coffer.v1 import (
    holds_pb2,
    holds_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    types_pb2,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)

Code = grpc.StatusCode
caller = "replay-tests"
metadata = (("coffer-caller", caller),)
_keys = itertools.count(1)

operation_kinds = [
    field.name for field in transfers_pb2.Operation.DESCRIPTOR.oneofs_by_name["operation"].fields
]


def key() -> str:
    return f"replay-{next(_keys)}"


def rpc_of(kind: str) -> tuple[str, str]:
    """The service and method that take the same request as the batch's operation `kind`."""
    request_type = transfers_pb2.Operation.DESCRIPTOR.fields_by_name[kind].message_type
    for module in (transfers_pb2, holds_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.input_type is request_type:
                    return service.name, method.name
    raise AssertionError(f"no RPC takes {request_type.full_name}")


@dataclass(frozen=True, slots=True)
class Answer:
    """What a call answered, in a form two answers can be compared in."""

    code: grpc.StatusCode
    reason: str = ""
    message: str = ""
    # The success's reply (serialized), or its batch result without the replay marker.
    reply: bytes = b""
    replayed: bool = False
    # For INVALID_ARGUMENT: the field at fault.
    field: str = ""

    def same_as(self, first: Answer) -> bool:
        return (self.code, self.reason, self.message, self.reply, self.field) == (
            first.code,
            first.reason,
            first.message,
            first.reply,
            first.field,
        )


class World:
    def __init__(self, channel: grpc.aio.Channel, connection: asyncpg.Connection) -> None:
        self.connection = connection
        self.wallets = wallets_pb2_grpc.WalletServiceStub(channel)
        self.stubs = {
            "TransferService": transfers_pb2_grpc.TransferServiceStub(channel),
            "HoldService": holds_pb2_grpc.HoldServiceStub(channel),
        }
        self.units = units_pb2_grpc.UnitServiceStub(channel)

    async def setup(self) -> None:
        await self.units.CreateUnit(
            units_pb2.CreateUnitRequest(
                code="EUR", kind=types_pb2.UNIT_KIND_CURRENCY, name="Euro", scale=2
            ),
            metadata=metadata,
        )

    async def wallet(self, kind: int = types_pb2.OWNER_KIND_CUSTOMER) -> int:
        response = await self.wallets.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key=key(), owner_id=f"owner-{next(_keys)}", owner_kind=kind, unit="EUR"
            ),
            metadata=metadata,
        )
        return response.wallet.id

    async def credit(self, wallet_id: int, amount: int = 1000) -> int:
        request = transfers_pb2.CreditRequest(
            idempotency_key=key(), wallet_id=wallet_id, amount=amount
        )
        response = await self.stubs["TransferService"].Credit(request, metadata=metadata)
        return response.transfer.id

    async def funded(self, amount: int = 1000, kind: int = types_pb2.OWNER_KIND_CUSTOMER) -> int:
        wallet_id = await self.wallet(kind)
        await self.credit(wallet_id, amount)
        return wallet_id

    async def hold(self, wallet_id: int, amount: int = 100) -> int:
        request = holds_pb2.PlaceHoldRequest(
            idempotency_key=key(), wallet_id=wallet_id, amount=amount
        )
        response = await self.stubs["HoldService"].PlaceHold(request, metadata=metadata)
        return response.hold.id

    async def next_wallet_id(self) -> int:
        return int(await self.connection.fetchval("select coalesce(max(id), 0) + 1 from wallets"))

    async def next_transfer_id(self) -> int:
        last, called = await self.connection.fetchrow(
            "select last_value, is_called from transfers_id"
        )
        return int(last) + 1 if called else int(last)

    async def until(self, made: Callable[[], Awaitable[int]], wanted: int) -> None:
        """Makes things (wallets, transfers) until one with the id `wanted` exists."""
        for _ in range(10):
            made_id = await made()
            if made_id == wanted:
                return
            assert made_id < wanted, f"id {wanted} was skipped"
        raise AssertionError(f"id {wanted} was never made")

    async def call(self, kind: str, request: Message, batched: bool) -> Answer:
        if batched:
            return await self.submit_batch(kind, request)
        service, method = rpc_of(kind)
        call = getattr(self.stubs[service], method)(request, metadata=metadata)
        try:
            reply = await call
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            return Answer(
                error.code(),
                info.reason,
                error.details() or "",
                replayed=_replayed(error.trailing_metadata()),
                field=info.metadata.get("field", ""),
            )
        return Answer(
            Code.OK,
            reply=reply.SerializeToString(deterministic=True),
            replayed=_replayed(await call.trailing_metadata()),
        )

    async def submit_batch(self, kind: str, request: Message) -> Answer:
        """The operation as a batch of its own."""
        [answer] = await self.batch([operation(kind, request)])
        return answer

    async def batch(self, operations: list[transfers_pb2.Operation]) -> list[Answer]:
        """The operations as one SubmitBatch call: each one's answer."""
        response = await self.stubs["TransferService"].SubmitBatch(
            transfers_pb2.SubmitBatchRequest(operations=operations), metadata=metadata
        )
        assert len(response.results) == len(operations), response
        return [_answer_of(result) for result in response.results]

    async def stored(self, request: Message) -> tuple[int, int]:
        """How many transfers and how many refusals the journal holds under the request's
        key."""
        row = await self.connection.fetchrow(
            """
            select (select count(*) from transfers where caller = $1 and idempotency_key = $2),
                   (select count(*) from refusals where caller = $1 and idempotency_key = $2)
            """,
            caller,
            request.idempotency_key,  # type: ignore[attr-defined]
        )
        return int(row[0]), int(row[1])

    async def posted(self, wallet_id: int) -> int:
        return int(
            await self.connection.fetchval("select posted from wallets where id = $1", wallet_id)
        )


def operation(kind: str, request: Message, linked: bool = False) -> transfers_pb2.Operation:
    """The request as an operation of a batch."""
    return transfers_pb2.Operation(**{kind: request}, linked=linked)


def _answer_of(result: transfers_pb2.OperationResult) -> Answer:
    replayed = result.replayed
    result.replayed = False
    if result.HasField("error"):
        return Answer(
            Code(_codes[result.error.code]),
            result.error.reason,
            result.error.message,
            replayed=replayed,
            field=result.error.field,
        )
    return Answer(Code.OK, reply=result.SerializeToString(deterministic=True), replayed=replayed)


_codes = {code.value[0]: code for code in Code}


def _replayed(trailing: Any) -> bool:
    return any(name == "coffer-replayed" and value == "true" for name, value in trailing or ())


# Scenarios, per kind -----------------------------------------------------------------------------

# A request that succeeds.
Success = Callable[[World], Awaitable[Message]]
# A request that is refused (with the reason), and a change after which it would succeed.
Refusal = Callable[[World], Awaitable[tuple[Message, str, Callable[[], Awaitable[None]]]]]


async def _credit_success(world: World) -> Message:
    return transfers_pb2.CreditRequest(
        idempotency_key=key(), wallet_id=await world.wallet(), amount=100
    )


async def _credit_refusal(world: World) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
    wallet_id = await world.next_wallet_id()
    request = transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet_id, amount=100)
    return request, "WALLET_NOT_FOUND", lambda: world.until(world.wallet, wallet_id)


async def _debit_success(world: World) -> Message:
    return transfers_pb2.DebitRequest(
        idempotency_key=key(), wallet_id=await world.funded(), amount=100, note="lunch"
    )


async def _debit_refusal(world: World) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
    wallet_id = await world.wallet()
    request = transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet_id, amount=100)
    return request, "INSUFFICIENT_FUNDS", lambda: _discard(world.credit(wallet_id))


async def _transfer_success(world: World) -> Message:
    return transfers_pb2.TransferRequest(
        idempotency_key=key(),
        source_wallet_id=await world.funded(),
        target_wallet_id=await world.wallet(),
        amount=100,
    )


async def _transfer_refusal(world: World) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
    source = await world.wallet()
    request = transfers_pb2.TransferRequest(
        idempotency_key=key(),
        source_wallet_id=source,
        target_wallet_id=await world.wallet(),
        amount=100,
    )
    return request, "INSUFFICIENT_FUNDS", lambda: _discard(world.credit(source))


async def _deposit_success(world: World) -> Message:
    return transfers_pb2.DepositRequest(
        idempotency_key=key(), wallet_id=await world.wallet(), amount=100, funding_source="iban:1"
    )


async def _deposit_refusal(world: World) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
    wallet_id = await world.next_wallet_id()
    request = transfers_pb2.DepositRequest(
        idempotency_key=key(), wallet_id=wallet_id, amount=100, funding_source="iban:1"
    )
    return request, "WALLET_NOT_FOUND", lambda: world.until(world.wallet, wallet_id)


async def _withdraw_success(world: World) -> Message:
    return transfers_pb2.WithdrawRequest(
        idempotency_key=key(), wallet_id=await world.funded(), amount=100, funding_source="iban:1"
    )


async def _withdraw_refusal(world: World) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
    wallet_id = await world.wallet()
    request = transfers_pb2.WithdrawRequest(
        idempotency_key=key(), wallet_id=wallet_id, amount=100, funding_source="iban:1"
    )
    return request, "INSUFFICIENT_FUNDS", lambda: _discard(world.credit(wallet_id))


async def _pay_success(world: World) -> Message:
    return transfers_pb2.PayRequest(
        idempotency_key=key(),
        payer_wallet_id=await world.funded(),
        payee_wallet_id=await world.wallet(types_pb2.OWNER_KIND_MERCHANT),
        amount=100,
    )


async def _pay_refusal(world: World) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
    payer = await world.wallet()
    request = transfers_pb2.PayRequest(
        idempotency_key=key(),
        payer_wallet_id=payer,
        payee_wallet_id=await world.wallet(types_pb2.OWNER_KIND_MERCHANT),
        amount=100,
    )
    return request, "INSUFFICIENT_FUNDS", lambda: _discard(world.credit(payer))


async def _void_success(world: World) -> Message:
    transfer_id = await world.credit(await world.wallet())
    return transfers_pb2.VoidRequest(idempotency_key=key(), transfer_id=transfer_id)


async def _void_refusal(world: World) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
    transfer_id = await world.next_transfer_id()
    wallet_id = await world.wallet()
    request = transfers_pb2.VoidRequest(idempotency_key=key(), transfer_id=transfer_id)
    return (
        request,
        "TRANSFER_NOT_FOUND",
        lambda: world.until(lambda: world.credit(wallet_id), transfer_id),
    )


async def _place_hold_success(world: World) -> Message:
    return holds_pb2.PlaceHoldRequest(
        idempotency_key=key(), wallet_id=await world.funded(), amount=100
    )


async def _place_hold_refusal(world: World) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
    wallet_id = await world.wallet()
    request = holds_pb2.PlaceHoldRequest(idempotency_key=key(), wallet_id=wallet_id, amount=100)
    return request, "INSUFFICIENT_FUNDS", lambda: _discard(world.credit(wallet_id))


async def _capture_hold_success(world: World) -> Message:
    hold_id = await world.hold(await world.funded())
    return holds_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold_id, amount=40)


def _hold_not_found(request_type: type[Message]) -> Refusal:
    """A capture or release of the hold the next transfer id will be: HOLD_NOT_FOUND, until a
    hold is placed with that id."""

    async def refusal(world: World) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
        wallet_id = await world.funded()
        hold_id = await world.next_transfer_id()
        request = request_type(idempotency_key=key(), hold_id=hold_id)
        return (
            request,
            "HOLD_NOT_FOUND",
            lambda: world.until(lambda: world.hold(wallet_id), hold_id),
        )

    return refusal


async def _release_hold_success(world: World) -> Message:
    hold_id = await world.hold(await world.funded())
    return holds_pb2.ReleaseHoldRequest(idempotency_key=key(), hold_id=hold_id)


async def _discard(call: Awaitable[Any]) -> None:
    await call


scenarios: dict[str, tuple[Success, Refusal]] = {
    "credit": (_credit_success, _credit_refusal),
    "debit": (_debit_success, _debit_refusal),
    "transfer": (_transfer_success, _transfer_refusal),
    "deposit": (_deposit_success, _deposit_refusal),
    "withdraw": (_withdraw_success, _withdraw_refusal),
    "pay": (_pay_success, _pay_refusal),
    "void": (_void_success, _void_refusal),
    "place_hold": (_place_hold_success, _place_hold_refusal),
    "capture_hold": (_capture_hold_success, _hold_not_found(holds_pb2.CaptureHoldRequest)),
    "release_hold": (_release_hold_success, _hold_not_found(holds_pb2.ReleaseHoldRequest)),
}


def test_every_kind_has_scenarios() -> None:
    assert sorted(scenarios) == sorted(operation_kinds)
    for kind in operation_kinds:
        rpc_of(kind)


# Tests -------------------------------------------------------------------------------------------


@pytest.fixture
async def world(channel: grpc.aio.Channel, database_url: str) -> AsyncIterator[World]:
    connection = await asyncpg.connect(database_url)
    try:
        world = World(channel, connection)
        await world.setup()
        yield world
    finally:
        await connection.close()


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
