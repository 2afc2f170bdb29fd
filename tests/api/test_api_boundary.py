"""The API's own rules, end to end through a real server: the `coffer-caller` label (in the
open mode of a server on loopback with no credential, it names the local principal), page
tokens, time ranges. RPCs are enumerated from the protos' descriptors, so a
new one is checked without anyone listing it here."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2, status_pb2

from coffer.clients import Client
from coffer.clients.caller import caller_length_max, caller_metadata_key
from coffer.server.app import Server, services_described
from coffer.v1 import (
    grants_pb2,
    reports_pb2,
    transfers_pb2,
    types_pb2,
    units_pb2,
    wallets_pb2,
)

Code = grpc.StatusCode
Metadata = tuple[tuple[str, str], ...]
_keys = itertools.count(1)


def key() -> str:
    return f"boundary-{next(_keys)}"


def rpcs() -> Iterator[MethodDescriptor]:
    for service in services_described:
        yield from service.methods


def rpc(service: str, name: str) -> MethodDescriptor:
    (method,) = (
        method
        for method in rpcs()
        if (method.containing_service.name, method.name) == (service, name)
    )
    return method


def reads(method: MethodDescriptor) -> bool:
    """Reads are named Get…, List… and Watch…; every other RPC writes."""
    return method.name.startswith(("Get", "List", "Watch"))


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
    if method.server_streaming:
        # Its first answer, or None if none came within a moment (the stream waits for more).
        stream = channel.unary_stream(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=lambda message: message.SerializeToString(),
            response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
        )(request, metadata=metadata, timeout=1)
        try:
            async for response in stream:
                return response
        except grpc.aio.AioRpcError as error:
            if error.code() != Code.DEADLINE_EXCEEDED:
                raise
        return None
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


async def test_no_call_needs_a_caller_in_the_open_mode(bare: grpc.aio.Channel) -> None:
    """Writes and reads alike: without a caller, the call is the local principal's."""
    for method in rpcs():
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


# Page tokens ---------------------------------------------------------------------------------


def paged_rpcs() -> dict[str, MethodDescriptor]:
    """Every list RPC that pages: its request has a page_token."""
    return {
        method.full_name: method
        for method in rpcs()
        if "page_token" in method.input_type.fields_by_name
    }


def items_field(method: MethodDescriptor) -> str:
    """The repeated field of the response that holds a page's items."""
    (field,) = (
        field.name
        for field in method.output_type.fields
        if field.is_repeated and field.message_type is not None
    )
    return field


async def page(
    channel: grpc.aio.Channel, method: MethodDescriptor, filters: Message, size: int, token: str
) -> tuple[list[int], str]:
    """The ids on one page, and the next page's token."""
    request = type(filters)()
    request.CopyFrom(filters)
    request.page_size = size
    request.page_token = token
    response = await call(channel, method, request)
    return [
        _item_id(item) for item in getattr(response, items_field(method))
    ], response.next_page_token


def _item_id(item: Message) -> int:
    """An item's id: its own, its transfer's (a usage entry), or its wallet's (an
    outstanding wallet)."""
    for name in ("id", "wallet_id"):
        if name in item.DESCRIPTOR.fields_by_name:
            value: int = getattr(item, name)
            return value
    transfer: int = item.transfer.id  # type: ignore[attr-defined]
    return transfer


async def page_through(
    channel: grpc.aio.Channel, method: MethodDescriptor, filters: Message, size: int
) -> tuple[list[int], list[str]]:
    """Every id, page after page, and the tokens it took."""
    ids, tokens, token = [], [], ""
    while True:
        found, token = await page(channel, method, filters, size, token)
        ids += found
        if not token:
            return ids, tokens
        tokens.append(token)


def encoded(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decoded(token: str) -> bytes:
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))


async def filters_of_each_list(channel: grpc.aio.Channel) -> dict[str, tuple[Message, Message]]:
    """For each paged list: two requests with other filters, the first matching 4 items."""
    wallets = rpc("WalletService", "CreateWallet")
    credit = rpc("TransferService", "Credit")
    await call(
        channel,
        rpc("UnitService", "CreateUnit"),
        units_pb2.CreateUnitRequest(code="EUR", kind=types_pb2.UNIT_KIND_CURRENCY, name="Euro"),
    )
    ids = {}
    for owner in ("ada", "ada", "ada", "ada", "bo"):
        created = await call(
            channel,
            wallets,
            wallets_pb2.CreateWalletRequest(
                idempotency_key=key(),
                owner_id=owner,
                owner_kind=types_pb2.OWNER_KIND_CUSTOMER,
                unit="EUR",
            ),
        )
        ids.setdefault(owner, created.wallet.id)
    # Credits that expire, each a grant.
    expires_at = Timestamp()
    expires_at.FromDatetime(datetime.now(UTC) + timedelta(days=30))
    for owner, count in (("ada", 4), ("bo", 1)):
        for amount in range(1, count + 1):
            await call(
                channel,
                credit,
                transfers_pb2.CreditRequest(
                    idempotency_key=key(),
                    wallet_id=ids[owner],
                    amount=amount,
                    expires_at=expires_at,
                ),
            )
    # Two more owners, funded without terms: four wallets hold something (the outstanding
    # overview); four debits of one of them, made at one till (the usage register).
    for owner in ("cy", "dee"):
        created = await call(
            channel,
            wallets,
            wallets_pb2.CreateWalletRequest(
                idempotency_key=key(),
                owner_id=owner,
                owner_kind=types_pb2.OWNER_KIND_CUSTOMER,
                unit="EUR",
            ),
        )
        ids[owner] = created.wallet.id
        await call(
            channel,
            credit,
            transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=ids[owner], amount=100),
        )
    for _ in range(4):
        await call(
            channel,
            rpc("TransferService", "Debit"),
            transfers_pb2.DebitRequest(
                idempotency_key=key(), wallet_id=ids["cy"], amount=1, performed_by="till-1"
            ),
        )
    return {
        "coffer.v1.ReportService.ListUsage": (
            reports_pb2.ListUsageRequest(filter=reports_pb2.UsageFilter(performed_by="till-1")),
            reports_pb2.ListUsageRequest(filter=reports_pb2.UsageFilter(performed_by="till-2")),
        ),
        "coffer.v1.ReportService.GetOutstanding": (
            reports_pb2.GetOutstandingRequest(unit="EUR", expiring_within_days=30),
            reports_pb2.GetOutstandingRequest(unit="EUR", expiring_within_days=7),
        ),
        "coffer.v1.WalletService.ListWallets": (
            wallets_pb2.ListWalletsRequest(owner_id="ada"),
            wallets_pb2.ListWalletsRequest(owner_id="bo"),
        ),
        "coffer.v1.TransferService.ListTransfers": (
            transfers_pb2.ListTransfersRequest(wallet_id=ids["ada"]),
            transfers_pb2.ListTransfersRequest(wallet_id=ids["bo"]),
        ),
        "coffer.v1.GrantService.ListGrants": (
            grants_pb2.ListGrantsRequest(wallet_id=ids["ada"]),
            grants_pb2.ListGrantsRequest(wallet_id=ids["ada"], include_spent=True),
        ),
    }


async def test_page_tokens_page_through_and_are_refused_anywhere_else(
    channel: grpc.aio.Channel,
) -> None:
    lists = await filters_of_each_list(channel)
    # The access lists have no filters, and making credentials ends the open mode this test
    # runs in: tests/api/test_access.py pages through them with an administrator's key.
    ledger_lists = {name for name in paged_rpcs() if ".AccessService." not in name}
    assert set(lists) == ledger_lists, "a new list RPC: give it filters here"
    issued = {}
    for name, (filters, other_filters) in lists.items():
        method = paged_rpcs()[name]
        everything, _ = await page(channel, method, filters, 1000, "")
        assert len(everything) == 4, name
        # Page by page, with the same filters: every item once, in order.
        ids, tokens = await page_through(channel, method, filters, 1)
        assert (ids, len(tokens)) == (everything, 3), name
        # The page size may change from page to page; the filters may not.
        assert (await page(channel, method, filters, 3, tokens[0]))[0] == everything[1:], name
        assert await invalid_field(page(channel, method, other_filters, 1, tokens[0])) == (
            "page_token"
        ), name
        issued[name] = tokens[0]

    for name, method in paged_rpcs().items():
        if name not in ledger_lists:
            continue
        filters = lists[name][0]
        token = issued[name]
        scope = decoded(token)[8:]
        foreign = [other for other_name, other in issued.items() if other_name != name]
        assert foreign, "a token of another list"
        bad = [
            *foreign,
            "!",
            "not a token",
            token + "A",
            token[:-1],
            token + "==",
            token[:-2] + ("B" if token[-2] != "B" else "C") + token[-1],
            encoded(b"w:3"),
            encoded(b"t:3"),
            encoded(b"w:9223372036854775808"),
            encoded(b"t:" + b"9" * 30),
            encoded(bytes(16)),
            # The right digest, with a cursor of 0 or past int64.
            encoded((0).to_bytes(8, "big") + scope),
            encoded((2**63).to_bytes(8, "big") + scope),
            encoded((2**64 - 1).to_bytes(8, "big") + scope),
            "é" * 22,
            "A" * 5000,
        ]
        for token_bad in bad:
            field = await invalid_field(page(channel, method, filters, 1, token_bad))
            assert field == "page_token", (name, token_bad)


async def test_transfer_kinds_filter_as_a_set(channel: grpc.aio.Channel) -> None:
    """Kinds in another order, or repeated, are the same filter: its tokens go on working."""
    lists = await filters_of_each_list(channel)
    method = rpc("TransferService", "ListTransfers")
    wallet_id = lists[method.full_name][0].wallet_id
    credit, debit = types_pb2.TRANSFER_KIND_CREDIT, types_pb2.TRANSFER_KIND_DEBIT
    first = transfers_pb2.ListTransfersRequest(wallet_id=wallet_id, kinds=[credit, debit])
    same = transfers_pb2.ListTransfersRequest(wallet_id=wallet_id, kinds=[debit, credit, debit])
    ids, token = await page(channel, method, first, 2, "")
    rest, _ = await page(channel, method, same, 10, token)
    everything, _ = await page(channel, method, first, 10, "")
    assert ids + rest == everything and len(everything) == 4
    only_credits = transfers_pb2.ListTransfersRequest(wallet_id=wallet_id, kinds=[credit])
    assert await invalid_field(page(channel, method, only_credits, 2, token)) == "page_token"


# Time ranges ---------------------------------------------------------------------------------


async def test_time_ranges_are_half_open_and_never_inverted(channel: grpc.aio.Channel) -> None:
    lists = await filters_of_each_list(channel)
    method = rpc("TransferService", "ListTransfers")
    wallet_id = lists[method.full_name][0].wallet_id
    everything, _ = await page(
        channel, method, transfers_pb2.ListTransfersRequest(wallet_id=wallet_id), 10, ""
    )
    assert len(everything) == 4
    now = datetime.now(UTC)

    def ranged(start: datetime | None, end: datetime | None) -> Message:
        request = transfers_pb2.ListTransfersRequest(wallet_id=wallet_id)
        if start is not None:
            request.start_time.FromDatetime(start)
        if end is not None:
            request.end_time.FromDatetime(end)
        return request

    hour = timedelta(hours=1)
    assert (await page(channel, method, ranged(now - hour, now + hour), 10, ""))[0] == everything
    assert (await page(channel, method, ranged(now - hour, None), 10, ""))[0] == everything
    assert (await page(channel, method, ranged(None, now - hour), 10, ""))[0] == []
    # start == end: an empty range, allowed.
    assert (await page(channel, method, ranged(now, now), 10, ""))[0] == []
    # end before start: refused, by a microsecond or by years.
    for end in (now - timedelta(microseconds=1), now - 1000 * 24 * hour):
        field = await invalid_field(page(channel, method, ranged(now, end), 10, ""))
        assert field == "end_time"
