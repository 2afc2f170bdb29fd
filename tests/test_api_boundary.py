"""The API's own rules, end to end through a real server: who may call (the `coffer-caller`
metadata), page tokens, time ranges. RPCs are enumerated from the protos' descriptors, so a
new one is checked without anyone listing it here."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from coffer.clients import Client
from coffer.clients.caller import caller_length_max, caller_metadata_key
from coffer.clients.v1 import (
    holds_pb2,
    transfers_pb2,
    types_pb2,
    units_pb2,
    wallets_pb2,
)
from coffer.server.app import Server

Code = grpc.StatusCode
Metadata = tuple[tuple[str, str], ...]
_keys = itertools.count(1)


def key() -> str:
    return f"boundary-{next(_keys)}"


def rpcs() -> Iterator[MethodDescriptor]:
    for module in (units_pb2, wallets_pb2, transfers_pb2, holds_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            yield from service.methods


def rpc(service: str, name: str) -> MethodDescriptor:
    (method,) = (
        method
        for method in rpcs()
        if (method.containing_service.name, method.name) == (service, name)
    )
    return method


def reads(method: MethodDescriptor) -> bool:
    """Reads are named Get… and List…; every other RPC writes."""
    return method.name.startswith(("Get", "List"))


async def call(
    channel: grpc.aio.Channel,
    method: MethodDescriptor,
    request: Message | None = None,
    metadata: Metadata = (),
) -> Any:
    """Calls `method` by its name, with `request` (by default an empty one)."""
    multicallable = channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
    )
    if request is None:
        request = message_factory.GetMessageClass(method.input_type)()
    return await multicallable(request, metadata=metadata, timeout=10)


def error_info(error: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo:
    for name, value in error.trailing_metadata() or ():
        if name == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info
    raise AssertionError(f"no ErrorInfo in {error!r}")


async def invalid_field(call: Any) -> str:
    """Awaits a call that must fail with INVALID_ARGUMENT; the field it names."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == Code.INVALID_ARGUMENT, raised.value.details()
    info = error_info(raised.value)
    assert info.reason == "INVALID_ARGUMENT", info
    return info.metadata["field"]


@pytest.fixture
async def bare(server: Server) -> Any:
    """A channel that sends only the metadata each call is given: no caller of its own."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as opened:
        yield opened


# The caller ----------------------------------------------------------------------------------


def test_rpcs_are_found() -> None:
    names = {method.name for method in rpcs()}
    assert {"CreateUnit", "ListWallets", "Credit", "SubmitBatch", "ListTransfers"} <= names
    assert {"GetHold", "CaptureHold", "CancelWallet"} <= names


async def test_every_write_needs_a_caller(bare: grpc.aio.Channel) -> None:
    for method in rpcs():
        if reads(method):
            continue
        field = await invalid_field(call(bare, method))
        assert field == caller_metadata_key, method.full_name


async def test_reads_need_no_caller(bare: grpc.aio.Channel) -> None:
    for method in rpcs():
        if not reads(method):
            continue
        try:
            await call(bare, method)
        except grpc.aio.AioRpcError as error:
            # An empty request may be refused, but for what it lacks, not for its caller.
            assert error.code() == Code.INVALID_ARGUMENT, (method.full_name, error)
            assert error_info(error).metadata["field"] != caller_metadata_key, method.full_name


@pytest.mark.parametrize(
    "metadata",
    [
        ((caller_metadata_key, ""),),
        ((caller_metadata_key, "@coffer"),),
        ((caller_metadata_key, "@"),),
        ((caller_metadata_key, "x" * (caller_length_max + 1)),),
        ((caller_metadata_key, "x" * 200),),
        ((caller_metadata_key, "shop backend"),),
        ((caller_metadata_key, "shop"), (caller_metadata_key, "billing")),
    ],
    ids=["empty", "reserved", "reserved-prefix", "too-long", "200", "space", "twice"],
)
async def test_every_rpc_refuses_a_bad_caller(bare: grpc.aio.Channel, metadata: Metadata) -> None:
    """Reads and writes alike: a caller that is sent is checked by the same rule."""
    for method in rpcs():
        field = await invalid_field(call(bare, method, metadata=metadata))
        assert field == caller_metadata_key, method.full_name


callers = {
    "a": True,
    "shop-1": True,
    "billing@eu": True,
    "!~": True,
    "x" * caller_length_max: True,
    "": False,
    "@coffer": False,
    "shop backend": False,
    " shop": False,
    "x" * (caller_length_max + 1): False,
    "x" * 200: False,
    "naïve": False,
    "tab\there": False,
}


async def test_client_and_server_agree_on_every_caller(
    bare: grpc.aio.Channel, server: Server
) -> None:
    """What the typed client accepts, the server accepts: no client whose every write fails."""
    await call(
        bare,
        rpc("UnitService", "CreateUnit"),
        units_pb2.CreateUnitRequest(code="EUR", kind=types_pb2.UNIT_KIND_CURRENCY, name="Euro"),
        metadata=((caller_metadata_key, "setup"),),
    )
    for caller, valid in callers.items():
        try:
            client = Client(f"127.0.0.1:{server.port}", caller=caller)
        except ValueError as error:
            assert not valid, (caller, error)
            assert str(error).startswith("caller "), error
        else:
            assert valid, caller
            async with client:
                wallet = await client.create_wallet(
                    owner_id="ada", owner_kind="customer", unit="EUR"
                )
                await client.credit(wallet_id=wallet.id, amount=5)
                assert (await client.get_balance(wallet_id=wallet.id)).balance.posted == 5
        if not caller.isascii() or not caller.isprintable():
            continue  # gRPC itself sends only printable ASCII metadata
        request = wallets_pb2.CreateWalletRequest(
            idempotency_key=key(),
            owner_id="bo",
            owner_kind=types_pb2.OWNER_KIND_CUSTOMER,
            unit="EUR",
        )
        sent = call(
            bare, rpc("WalletService", "CreateWallet"), request, ((caller_metadata_key, caller),)
        )
        if valid:
            assert (await sent).wallet.id
        else:
            assert await invalid_field(sent) == caller_metadata_key, caller
