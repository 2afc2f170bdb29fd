"""The four services' stubs on one channel, and what an error's status details say."""

from __future__ import annotations

import itertools
from typing import Any

import grpc
from google.protobuf.descriptor import MethodDescriptor
from google.rpc import error_details_pb2, status_pb2

from coffer.v1 import (
    holds_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    types_pb2,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)

_keys = itertools.count(1)


def key() -> str:
    return f"api-{next(_keys)}"


class Api:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.units = units_pb2_grpc.UnitServiceStub(channel)
        self.wallets = wallets_pb2_grpc.WalletServiceStub(channel)
        self.transfers = transfers_pb2_grpc.TransferServiceStub(channel)
        self.holds = holds_pb2_grpc.HoldServiceStub(channel)

    async def setup_units(self) -> None:
        await self.units.CreateUnit(
            units_pb2.CreateUnitRequest(
                code="EUR", kind=types_pb2.UNIT_KIND_CURRENCY, name="Euro", scale=2
            )
        )
        await self.units.CreateUnit(
            units_pb2.CreateUnitRequest(
                code="session",
                kind=types_pb2.UNIT_KIND_CREDIT,
                name="Coaching session",
                plural="Coaching sessions",
                scale=2,
            )
        )

    async def wallet(
        self, unit: str = "EUR", kind: int = types_pb2.OWNER_KIND_CUSTOMER, **fields: Any
    ) -> int:
        response = await self.wallets.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key=key(),
                owner_id=f"owner-{next(_keys)}",
                owner_kind=kind,
                unit=unit,
                **fields,
            )
        )
        return response.wallet.id

    async def funded(self, amount: int, unit: str = "EUR", **fields: Any) -> int:
        wallet_id = await self.wallet(unit, **fields)
        await self.transfers.Credit(
            transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet_id, amount=amount)
        )
        return wallet_id

    async def balance(self, wallet_id: int) -> tuple[int, int, int]:
        response = await self.wallets.GetBalance(wallets_pb2.GetBalanceRequest(wallet_id=wallet_id))
        return response.balance.posted, response.balance.pending, response.balance.available


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for name, value in error.trailing_metadata() or ():
        if name == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError(f"no ErrorInfo in {error!r}")


def bad_request(error: grpc.aio.AioRpcError) -> error_details_pb2.BadRequest:
    """The standard `google.rpc.BadRequest` detail of a failed call's status."""
    for name, value in error.trailing_metadata() or ():
        if name == "grpc-status-details-bin":
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                found = error_details_pb2.BadRequest()
                if detail.Unpack(found):
                    return found
    raise AssertionError(f"no BadRequest in {error!r}")


def raw_call(channel: grpc.aio.Channel, method: MethodDescriptor) -> Any:
    """The RPC taking and returning raw bytes, as a client with a broken encoder would call it:
    a function of the bytes (and a timeout), awaited for the answer. Of a stream, its first
    answer, or None when none came within a second (it waits for events to come)."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    if not method.server_streaming:
        return channel.unary_unary(path, request_serializer=None, response_deserializer=None)
    stream = channel.unary_stream(path, request_serializer=None, response_deserializer=None)

    async def first(data: bytes, timeout: float = 10) -> Any:
        call = stream(data, timeout=min(timeout, 1))
        try:
            async for response in call:
                return response
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            # Done with it: the server is told now, not when the call is collected.
            call.cancel()
        return None

    return first
