"""Every operation kind through the API, as a single call and in a batch: per kind, a request
that succeeds and one refused for a reason of state; answers in a form two compare in.

The successes use what every kind's request may say of grants, so that replays are shown to
give it back alike: credits and deposits name their terms, the wallets spent from are funded
by a grant that expires (so that spending says which grant it drew from), and the void voids an
expiration, naming the restored grant's new expiry."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from coffer.v1 import (
    grants_pb2,
    grants_pb2_grpc,
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

from support.api import error_info

Code = grpc.StatusCode


caller = "replay-tests"


metadata = (("coffer-caller", caller),)


_keys = itertools.count(1)
# Expirations made at once, to be voided one by one (each costs a wait for a second).
expirations_made = 2
expiration_wait_s_max = 10.0


operation_kinds = [
    field.name for field in transfers_pb2.Operation.DESCRIPTOR.oneofs_by_name["operation"].fields
]


def key() -> str:
    return f"replay-{next(_keys)}"


def timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def in_days(days: int) -> Timestamp:
    """A time that many days from now, whole seconds."""
    return timestamp((datetime.now(UTC) + timedelta(days=days)).replace(microsecond=0))


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
        self.grants = grants_pb2_grpc.GrantServiceStub(channel)
        # Expirations made and not voided yet (`expiration`).
        self._expirations: list[int] = []

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

    async def credit(
        self, wallet_id: int, amount: int = 1000, expires_at: Timestamp | None = None
    ) -> int:
        request = transfers_pb2.CreditRequest(
            idempotency_key=key(), wallet_id=wallet_id, amount=amount, expires_at=expires_at
        )
        response = await self.stubs["TransferService"].Credit(request, metadata=metadata)
        return response.transfer.id

    async def funded(self, amount: int = 1000, kind: int = types_pb2.OWNER_KIND_CUSTOMER) -> int:
        """A wallet with `amount` in a grant that expires in 30 days: what spends from it
        says so (`Transfer.allocations`)."""
        wallet_id = await self.wallet(kind)
        await self.credit(wallet_id, amount, expires_at=in_days(30))
        return wallet_id

    async def expiration(self) -> int:
        """An EXPIRATION transfer not voided yet: a few are made at once, by credits that
        expire a second from now, once they have expired."""
        if not self._expirations:
            wallet_id = await self.wallet()
            expiry = datetime.now(UTC) + timedelta(seconds=1)
            for _ in range(expirations_made):
                await self.credit(wallet_id, 10, expires_at=timestamp(expiry))
            async with asyncio.timeout(expiration_wait_s_max):
                expired = 0
                while expired < expirations_made:
                    await asyncio.sleep(0.1)
                    if datetime.now(UTC) > expiry:
                        run = await self.grants.RunExpiration(
                            grants_pb2.RunExpirationRequest(), metadata=metadata
                        )
                        expired += run.expired_count
            listed = await self.stubs["TransferService"].ListTransfers(
                transfers_pb2.ListTransfersRequest(
                    wallet_id=wallet_id, kinds=[types_pb2.TRANSFER_KIND_EXPIRATION]
                ),
                metadata=metadata,
            )
            self._expirations = [transfer.id for transfer in listed.transfers]
            assert len(self._expirations) == expirations_made, listed
        return self._expirations.pop()

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


@asynccontextmanager
async def opened_world(channel: grpc.aio.Channel, database_url: str) -> AsyncIterator[World]:
    """A World set up on the server's channel, with a connection of its own to the database."""
    connection = await asyncpg.connect(database_url)
    try:
        world = World(channel, connection)
        await world.setup()
        yield world
    finally:
        await connection.close()


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


# A request that succeeds.
Success = Callable[[World], Awaitable[Message]]


# A request that is refused (with the reason), and a change after which it would succeed.
Refusal = Callable[[World], Awaitable[tuple[Message, str, Callable[[], Awaitable[None]]]]]


async def _credit_success(world: World) -> Message:
    return transfers_pb2.CreditRequest(
        idempotency_key=key(),
        wallet_id=await world.wallet(),
        amount=100,
        valid_from=in_days(1),
        expires_at=in_days(30),
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
        idempotency_key=key(),
        wallet_id=await world.wallet(),
        amount=100,
        funding_source="iban:1",
        expires_at=in_days(30),
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
    return transfers_pb2.VoidRequest(
        idempotency_key=key(), transfer_id=await world.expiration(), expires_at=in_days(7)
    )


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
