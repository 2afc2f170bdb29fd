"""Idempotent replays of every operation kind, through the real server.

The kinds are enumerated from the `Operation` oneof of the batch API, so a new kind fails
`test_every_kind_has_scenarios` until it gets its scenarios here. For each kind, as a single
call and inside a batch:
- a success, replayed with its key, returns the same answer, marked a replay;
- a refusal, then a change that would let the request succeed, then the replay: the same
  refusal, marked a replay;
- the same key with another request: IDEMPOTENCY_KEY_REUSED;
- and all of that again after the server restarted.
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

from coffer.clients.v1 import (
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
from coffer.server.app import Server, Settings

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

    def same_as(self, first: Answer) -> bool:
        return (self.code, self.reason, self.message, self.reply) == (
            first.code,
            first.reason,
            first.message,
            first.reply,
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
            )
        return Answer(
            Code.OK,
            reply=reply.SerializeToString(deterministic=True),
            replayed=_replayed(await call.trailing_metadata()),
        )

    async def submit_batch(self, kind: str, request: Message) -> Answer:
        """The operation as a batch of its own."""
        response = await self.stubs["TransferService"].SubmitBatch(
            transfers_pb2.SubmitBatchRequest(
                operations=[transfers_pb2.Operation(**{kind: request})]
            ),
            metadata=metadata,
        )
        [result] = response.results
        replayed = result.replayed
        result.replayed = False
        if result.HasField("error"):
            return Answer(
                Code(_codes[result.error.code]),
                result.error.reason,
                result.error.message,
                replayed=replayed,
            )
        return Answer(
            Code.OK, reply=result.SerializeToString(deterministic=True), replayed=replayed
        )


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


async def _capture_hold_refusal(
    world: World,
) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
    wallet_id = await world.funded()
    hold_id = await world.next_transfer_id()
    request = holds_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold_id)
    return request, "HOLD_NOT_FOUND", lambda: world.until(lambda: world.hold(wallet_id), hold_id)


async def _release_hold_success(world: World) -> Message:
    hold_id = await world.hold(await world.funded())
    return holds_pb2.ReleaseHoldRequest(idempotency_key=key(), hold_id=hold_id)


async def _release_hold_refusal(
    world: World,
) -> tuple[Message, str, Callable[[], Awaitable[None]]]:
    wallet_id = await world.funded()
    hold_id = await world.next_transfer_id()
    request = holds_pb2.ReleaseHoldRequest(idempotency_key=key(), hold_id=hold_id)
    return request, "HOLD_NOT_FOUND", lambda: world.until(lambda: world.hold(wallet_id), hold_id)


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
    "capture_hold": (_capture_hold_success, _capture_hold_refusal),
    "release_hold": (_release_hold_success, _release_hold_refusal),
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
