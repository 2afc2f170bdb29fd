"""The gRPC API end to end: a real server on a free port, a real PostgreSQL, the generated
stubs. Each RPC, each error reason with its status code, and bad input for every RPC."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from coffer.server.app import Server, Settings
from coffer.v1 import (
    errors_pb2,
    holds_pb2,
    transfers_pb2,
    types_pb2,
    units_pb2,
    wallets_pb2,
)

from support.api import Api, bad_request, error_info, key

Code = grpc.StatusCode


@pytest.fixture
async def api(channel: grpc.aio.Channel) -> Api:
    api = Api(channel)
    await api.setup_units()
    return api


async def fails(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> str:
    """Awaits a call that must fail with `code` and an ErrorInfo of `reason`; returns the
    message."""
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    error = raised.value
    assert error.code() == code, error.details()
    info = error_info(error)
    assert info.reason == reason, (info, error.details())
    assert info.domain == "coffer.v1"
    return error.details() or ""


# Reflection ----------------------------------------------------------------------------------


async def test_reflection_describes_the_error_reasons(server: Server) -> None:
    """A client of another language, with no protos at hand, finds the reasons, their status
    codes and retryability through reflection, as `grpcurl describe` would."""

    def describe() -> descriptor_pb2.FileDescriptorProto:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            return database.FindFileContainingSymbol("coffer.v1.ErrorReason")

    file = await asyncio.to_thread(describe)
    assert file.name == "coffer/v1/errors.proto"
    (enum,) = file.enum_type
    values = {value.name: value for value in enum.value}
    insufficient = values["ERROR_REASON_INSUFFICIENT_FUNDS"].options
    assert insufficient.Extensions[errors_pb2.status_code] == code_pb2.FAILED_PRECONDITION
    assert insufficient.Extensions[errors_pb2.retryable] is False
    assert values["ERROR_REASON_OVERLOADED"].options.Extensions[errors_pb2.retryable] is True


# Units and wallets ---------------------------------------------------------------------------


async def test_units(api: Api) -> None:
    listed = await api.units.ListUnits(units_pb2.ListUnitsRequest())
    assert [unit.code for unit in listed.units] == ["EUR", "session"]
    got = await api.units.GetUnit(units_pb2.GetUnitRequest(code="session"))
    assert got.unit.plural == "Coaching sessions" and got.unit.scale == 2
    again = await api.units.CreateUnit(
        units_pb2.CreateUnitRequest(
            code="EUR", kind=types_pb2.UNIT_KIND_CURRENCY, name="Euro", scale=2
        )
    )
    assert again.unit.code == "EUR"
    await fails(
        api.units.CreateUnit(
            units_pb2.CreateUnitRequest(
                code="EUR", kind=types_pb2.UNIT_KIND_CURRENCY, name="Euro", scale=3
            )
        ),
        Code.ALREADY_EXISTS,
        "UNIT_EXISTS",
    )
    await fails(
        api.units.GetUnit(units_pb2.GetUnitRequest(code="XYZ")), Code.NOT_FOUND, "UNIT_NOT_FOUND"
    )


async def test_a_units_default_validity(api: Api) -> None:
    """Given at creation, answered in its canonical form by every RPC that shows the unit, and
    part of the definition an idempotent creation compares."""

    def pack(default_validity: str) -> units_pb2.CreateUnitRequest:
        return units_pb2.CreateUnitRequest(
            code="pack",
            kind=types_pb2.UNIT_KIND_CREDIT,
            name="Pack",
            default_validity=default_validity,
        )

    created = await api.units.CreateUnit(pack("P6M"))
    assert created.unit.default_validity == "P6M"
    got = await api.units.GetUnit(units_pb2.GetUnitRequest(code="pack"))
    assert got.unit == created.unit
    listed = await api.units.ListUnits(units_pb2.ListUnitsRequest())
    assert {unit.code: unit.default_validity for unit in listed.units} == {
        "EUR": "",
        "pack": "P6M",
        "session": "",
    }
    assert (await api.units.CreateUnit(pack("P6M"))).unit == created.unit
    for other in ["P7M", "P180D", ""]:
        await fails(api.units.CreateUnit(pack(other)), Code.ALREADY_EXISTS, "UNIT_EXISTS")
    # Stored canonical: P1Y6M is P18M, and created again as P18M it is the same unit.
    spelled = units_pb2.CreateUnitRequest(
        code="pass", kind=types_pb2.UNIT_KIND_CREDIT, name="Pass", default_validity="P1Y6M"
    )
    longer = await api.units.CreateUnit(spelled)
    assert longer.unit.default_validity == "P18M"
    spelled.default_validity = "P18M"
    assert (await api.units.CreateUnit(spelled)).unit == longer.unit


async def test_wallets(api: Api) -> None:
    request = wallets_pb2.CreateWalletRequest(
        idempotency_key="w-1",
        owner_id="shop-9",
        owner_kind=types_pb2.OWNER_KIND_MERCHANT,
        unit="EUR",
        balance_minimum=-1000,
        metadata={"tier": "gold"},
    )
    created = (await api.wallets.CreateWallet(request)).wallet
    assert created.balance_minimum == -1000 and created.metadata["tier"] == "gold"
    assert created.status == types_pb2.WALLET_STATUS_ACTIVE
    replayed = (await api.wallets.CreateWallet(request)).wallet
    assert replayed == created
    request.owner_id = "shop-10"
    await fails(api.wallets.CreateWallet(request), Code.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    second = await api.wallet(kind=types_pb2.OWNER_KIND_MERCHANT)
    listed = await api.wallets.ListWallets(wallets_pb2.ListWalletsRequest(owner_id="shop-9"))
    assert [wallet.id for wallet in listed.wallets] == [created.id]
    # Pagination over all wallets: the system wallets of both units, then ours.
    seen: list[int] = []
    token = ""
    while True:
        page = await api.wallets.ListWallets(
            wallets_pb2.ListWalletsRequest(page_size=2, page_token=token)
        )
        seen.extend(wallet.id for wallet in page.wallets)
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen) and seen[-2:] == [created.id, second] and len(seen) == 6
    got = (await api.wallets.GetWallet(wallets_pb2.GetWalletRequest(wallet_id=created.id))).wallet
    assert got.owner_id == "shop-9"
    cancelled = await api.wallets.CancelWallet(wallets_pb2.CancelWalletRequest(wallet_id=second))
    assert cancelled.wallet.status == types_pb2.WALLET_STATUS_CANCELLED
    await fails(
        api.transfers.Credit(
            transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=second, amount=1)
        ),
        Code.FAILED_PRECONDITION,
        "WALLET_NOT_ACTIVE",
    )
    funded = await api.funded(10)
    await fails(
        api.wallets.CancelWallet(wallets_pb2.CancelWalletRequest(wallet_id=funded)),
        Code.FAILED_PRECONDITION,
        "WALLET_NOT_EMPTY",
    )
    await fails(
        api.wallets.GetWallet(wallets_pb2.GetWalletRequest(wallet_id=424242)),
        Code.NOT_FOUND,
        "WALLET_NOT_FOUND",
    )
    await fails(
        api.wallets.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key=key(),
                owner_id="x",
                owner_kind=types_pb2.OWNER_KIND_CUSTOMER,
                unit="GBP",
            )
        ),
        Code.NOT_FOUND,
        "UNIT_NOT_FOUND",
    )


# Operations ----------------------------------------------------------------------------------


async def test_credit_debit_modes_and_history(api: Api) -> None:
    wallet = await api.wallet("session")
    credited = await api.transfers.Credit(
        transfers_pb2.CreditRequest(
            idempotency_key=key(),
            wallet_id=wallet,
            amount=300,
            note="3 sessions sold",
            reference="invoice-7",
            performed_by="ops:ana",
            metadata={"pack": "3"},
        )
    )
    assert credited.transfer.kind == types_pb2.TRANSFER_KIND_CREDIT
    assert credited.transfer.unit == "session"
    # Half a session consumed.
    half = await api.transfers.Debit(
        transfers_pb2.DebitRequest(
            idempotency_key=key(),
            wallet_id=wallet,
            amount=50,
            note="half session",
            performed_by="coach:bo",
        )
    )
    assert (half.amount_debited, half.amount_remaining) == (50, 0)
    await fails(
        api.transfers.Debit(
            transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet, amount=500)
        ),
        Code.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    )
    partial = await api.transfers.Debit(
        transfers_pb2.DebitRequest(
            idempotency_key=key(), wallet_id=wallet, amount=500, mode=types_pb2.DEBIT_MODE_UP_TO
        )
    )
    assert (partial.amount_debited, partial.amount_remaining) == (250, 250)
    assert partial.transfer.amount_requested == 500
    assert await api.balance(wallet) == (0, 0, 0)
    history = await api.transfers.ListTransfers(
        transfers_pb2.ListTransfersRequest(wallet_id=wallet)
    )
    assert [t.amount for t in history.transfers] == [250, 50, 300]
    # Each entry of one wallet's history says the balance after it, and its signed amount.
    assert [(t.signed_amount, t.balance_after) for t in history.transfers] == [
        (-250, 0),
        (-50, 250),
        (300, 300),
    ]
    first = history.transfers[-1]
    assert (first.note, first.reference, first.performed_by) == (
        "3 sessions sold",
        "invoice-7",
        "ops:ana",
    )
    assert dict(first.metadata) == {"pack": "3"}
    debits = await api.transfers.ListTransfers(
        transfers_pb2.ListTransfersRequest(wallet_id=wallet, kinds=[types_pb2.TRANSFER_KIND_DEBIT])
    )
    assert len(debits.transfers) == 2
    by_reference = await api.transfers.ListTransfers(
        transfers_pb2.ListTransfersRequest(reference="invoice-7")
    )
    assert [t.id for t in by_reference.transfers] == [first.id]
    future = Timestamp()
    future.FromDatetime(datetime.now(UTC) + timedelta(hours=1))
    later = await api.transfers.ListTransfers(
        transfers_pb2.ListTransfersRequest(wallet_id=wallet, start_time=future)
    )
    assert list(later.transfers) == []
    page = await api.transfers.ListTransfers(
        transfers_pb2.ListTransfersRequest(wallet_id=wallet, page_size=2)
    )
    assert len(page.transfers) == 2 and page.next_page_token
    rest = await api.transfers.ListTransfers(
        transfers_pb2.ListTransfersRequest(
            wallet_id=wallet, page_size=2, page_token=page.next_page_token
        )
    )
    assert [t.id for t in rest.transfers] == [first.id] and not rest.next_page_token
    got = await api.transfers.GetTransfer(transfers_pb2.GetTransferRequest(transfer_id=first.id))
    # The transfer itself: the history's entry but the wallet's view of it.
    alone = types_pb2.Transfer()
    alone.CopyFrom(first)
    alone.ClearField("balance_after")
    alone.ClearField("signed_amount")
    assert got.transfer == alone


async def test_transfer_and_its_errors(api: Api) -> None:
    source = await api.funded(100)
    target = await api.wallet()
    sessions = await api.wallet("session")
    moved = await api.transfers.Transfer(
        transfers_pb2.TransferRequest(
            idempotency_key=key(), source_wallet_id=source, target_wallet_id=target, amount=40
        )
    )
    assert moved.transfer.kind == types_pb2.TRANSFER_KIND_TRANSFER
    assert await api.balance(target) == (40, 0, 40)

    def move(to: int, amount: int = 1) -> Awaitable[Any]:
        return api.transfers.Transfer(
            transfers_pb2.TransferRequest(
                idempotency_key=key(), source_wallet_id=source, target_wallet_id=to, amount=amount
            )
        )

    await fails(move(sessions), Code.FAILED_PRECONDITION, "UNIT_MISMATCH")
    await fails(move(source), Code.FAILED_PRECONDITION, "SAME_WALLET")
    await fails(move(99999), Code.NOT_FOUND, "WALLET_NOT_FOUND")
    await fails(move(target, 61), Code.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    await fails(move(1), Code.FAILED_PRECONDITION, "WALLET_KIND_MISMATCH")
    # Two system wallets, each within range, fund more than a wallet can hold.
    big = await api.wallet()
    await api.transfers.Deposit(
        transfers_pb2.DepositRequest(
            idempotency_key=key(), wallet_id=big, amount=2**62, funding_source="bank"
        )
    )
    await api.transfers.Credit(
        transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=target, amount=2**62)
    )
    await fails(
        api.transfers.Transfer(
            transfers_pb2.TransferRequest(
                idempotency_key=key(), source_wallet_id=big, target_wallet_id=target, amount=2**62
            )
        ),
        Code.FAILED_PRECONDITION,
        "BALANCE_OVERFLOW",
    )


async def test_emi_flow(api: Api) -> None:
    customer = await api.wallet()
    merchant = await api.wallet(kind=types_pb2.OWNER_KIND_MERCHANT)
    deposit = await api.transfers.Deposit(
        transfers_pb2.DepositRequest(
            idempotency_key=key(),
            wallet_id=customer,
            amount=5000,
            funding_source="iban:DE89370400440532013000",
        )
    )
    assert deposit.transfer.kind == types_pb2.TRANSFER_KIND_DEPOSIT
    assert deposit.transfer.reference == "iban:DE89370400440532013000"
    paid = await api.transfers.Pay(
        transfers_pb2.PayRequest(
            idempotency_key=key(),
            payer_wallet_id=customer,
            payee_wallet_id=merchant,
            amount=1200,
            reference="order-55",
        )
    )
    assert paid.transfer.kind == types_pb2.TRANSFER_KIND_PAYMENT
    await fails(
        api.transfers.Pay(
            transfers_pb2.PayRequest(
                idempotency_key=key(),
                payer_wallet_id=merchant,
                payee_wallet_id=customer,
                amount=1,
            )
        ),
        Code.FAILED_PRECONDITION,
        "WALLET_KIND_MISMATCH",
    )
    withdrawal = await api.transfers.Withdraw(
        transfers_pb2.WithdrawRequest(
            idempotency_key=key(), wallet_id=merchant, amount=1000, funding_source="iban:FR76"
        )
    )
    assert withdrawal.transfer.kind == types_pb2.TRANSFER_KIND_WITHDRAWAL
    assert await api.balance(customer) == (3800, 0, 3800)
    assert await api.balance(merchant) == (200, 0, 200)
    # Transaction-out for the payer, transaction-in for the payee: the same transfer.
    out = await api.transfers.ListTransfers(transfers_pb2.ListTransfersRequest(wallet_id=customer))
    into = await api.transfers.ListTransfers(transfers_pb2.ListTransfersRequest(wallet_id=merchant))
    assert paid.transfer.id in [t.id for t in out.transfers]
    assert paid.transfer.id in [t.id for t in into.transfers]


async def test_void(api: Api) -> None:
    wallet = await api.funded(100)
    spent = await api.transfers.Debit(
        transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet, amount=30)
    )
    voided = await api.transfers.Void(
        transfers_pb2.VoidRequest(
            idempotency_key=key(), transfer_id=spent.transfer.id, note="refund: wrong charge"
        )
    )
    assert voided.transfer.kind == types_pb2.TRANSFER_KIND_VOID
    assert voided.transfer.voids_transfer_id == spent.transfer.id
    assert await api.balance(wallet) == (100, 0, 100)
    original = await api.transfers.GetTransfer(
        transfers_pb2.GetTransferRequest(transfer_id=spent.transfer.id)
    )
    assert original.transfer.voided_by_transfer_id == voided.transfer.id

    def void(transfer_id: int) -> Awaitable[Any]:
        return api.transfers.Void(
            transfers_pb2.VoidRequest(idempotency_key=key(), transfer_id=transfer_id)
        )

    await fails(void(spent.transfer.id), Code.FAILED_PRECONDITION, "ALREADY_VOIDED")
    await fails(void(voided.transfer.id), Code.FAILED_PRECONDITION, "NOT_VOIDABLE")
    await fails(void(777777), Code.NOT_FOUND, "TRANSFER_NOT_FOUND")
    await api.transfers.Debit(
        transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet, amount=90)
    )
    history = await api.transfers.ListTransfers(
        transfers_pb2.ListTransfersRequest(wallet_id=wallet, kinds=[types_pb2.TRANSFER_KIND_CREDIT])
    )
    await fails(void(history.transfers[0].id), Code.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")


async def test_holds(api: Api) -> None:
    wallet = await api.funded(1000)
    merchant = await api.wallet(kind=types_pb2.OWNER_KIND_MERCHANT)
    placed = await api.holds.PlaceHold(
        holds_pb2.PlaceHoldRequest(
            idempotency_key=key(),
            wallet_id=wallet,
            target_wallet_id=merchant,
            amount=700,
            timeout=Duration(seconds=60),
        )
    )
    hold = placed.hold
    assert hold.status == types_pb2.HOLD_STATUS_PENDING
    assert await api.balance(wallet) == (1000, 700, 300)
    await fails(
        api.transfers.Debit(
            transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet, amount=301)
        ),
        Code.FAILED_PRECONDITION,
        "INSUFFICIENT_FUNDS",
    )
    await fails(
        api.holds.CaptureHold(
            holds_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold.id, amount=701)
        ),
        Code.FAILED_PRECONDITION,
        "CAPTURE_EXCEEDS_HOLD",
    )
    captured = await api.holds.CaptureHold(
        holds_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold.id, amount=500)
    )
    assert captured.hold.status == types_pb2.HOLD_STATUS_CAPTURED
    assert captured.hold.amount_captured == 500
    assert captured.transfer.hold_id == hold.id
    assert await api.balance(wallet) == (500, 0, 500)
    assert await api.balance(merchant) == (500, 0, 500)
    await fails(
        api.holds.ReleaseHold(holds_pb2.ReleaseHoldRequest(idempotency_key=key(), hold_id=hold.id)),
        Code.FAILED_PRECONDITION,
        "HOLD_NOT_PENDING",
    )
    second = await api.holds.PlaceHold(
        holds_pb2.PlaceHoldRequest(idempotency_key=key(), wallet_id=wallet, amount=100)
    )
    released = await api.holds.ReleaseHold(
        holds_pb2.ReleaseHoldRequest(idempotency_key=key(), hold_id=second.hold.id)
    )
    assert released.hold.status == types_pb2.HOLD_STATUS_RELEASED
    got = await api.holds.GetHold(holds_pb2.GetHoldRequest(hold_id=second.hold.id))
    assert got.hold.resolved_by_transfer_id == released.transfer.id
    await fails(
        api.holds.GetHold(holds_pb2.GetHoldRequest(hold_id=captured.transfer.id)),
        Code.NOT_FOUND,
        "HOLD_NOT_FOUND",
    )


async def test_holds_expire_by_themselves(api: Api) -> None:
    wallet = await api.funded(1000)
    placed = await api.holds.PlaceHold(
        holds_pb2.PlaceHoldRequest(
            idempotency_key=key(), wallet_id=wallet, amount=400, timeout=Duration(seconds=1)
        )
    )
    assert await api.balance(wallet) == (1000, 400, 600)
    import asyncio

    for _ in range(50):
        await asyncio.sleep(0.1)
        got = await api.holds.GetHold(holds_pb2.GetHoldRequest(hold_id=placed.hold.id))
        if got.hold.resolved_by_transfer_id:
            break
    assert got.hold.status == types_pb2.HOLD_STATUS_EXPIRED
    assert got.hold.resolved_by_transfer_id
    assert await api.balance(wallet) == (1000, 0, 1000)
    await fails(
        api.holds.CaptureHold(
            holds_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=placed.hold.id)
        ),
        Code.FAILED_PRECONDITION,
        "HOLD_EXPIRED",
    )


# Batches and idempotency ---------------------------------------------------------------------


async def test_submit_batch(api: Api) -> None:
    customer = await api.wallet()
    other = await api.wallet()
    operations = [
        transfers_pb2.Operation(
            credit=transfers_pb2.CreditRequest(
                idempotency_key=key(), wallet_id=customer, amount=100
            )
        ),
        transfers_pb2.Operation(
            debit=transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=customer, amount=500)
        ),
        transfers_pb2.Operation(
            transfer=transfers_pb2.TransferRequest(
                idempotency_key=key(),
                source_wallet_id=customer,
                target_wallet_id=other,
                amount=60,
            ),
            linked=True,
        ),
        transfers_pb2.Operation(
            debit=transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=other, amount=61)
        ),
        transfers_pb2.Operation(
            credit=transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=customer, amount=-1)
        ),
        transfers_pb2.Operation(),
        transfers_pb2.Operation(
            place_hold=holds_pb2.PlaceHoldRequest(
                idempotency_key=key(), wallet_id=customer, amount=10
            )
        ),
    ]
    response = await api.transfers.SubmitBatch(
        transfers_pb2.SubmitBatchRequest(operations=operations)
    )
    results = response.results
    assert len(results) == len(operations)
    assert results[0].transfers[0].amount == 100 and not results[0].HasField("error")
    assert (results[1].error.reason, results[1].error.status_code) == (
        "INSUFFICIENT_FUNDS",
        code_pb2.FAILED_PRECONDITION,
    )
    # The deprecated bare number, still filled, for clients built before status_code.
    assert all(result.error.code == result.error.status_code for result in results)
    assert results[2].error.status_code == code_pb2.ABORTED
    assert results[4].error.status_code == code_pb2.INVALID_ARGUMENT
    assert results[2].error.reason == "LINKED_OPERATION_FAILED"
    assert results[3].error.reason == "INSUFFICIENT_FUNDS"
    assert results[4].error.reason == "INVALID_ARGUMENT" and "amount" in results[4].error.message
    assert results[5].error.reason == "INVALID_ARGUMENT"
    assert results[6].hold.status == types_pb2.HOLD_STATUS_PENDING
    assert await api.balance(customer) == (100, 10, 90)
    assert await api.balance(other) == (0, 0, 0)
    # The same batch again: every success is a replay, nothing moves twice.
    again = await api.transfers.SubmitBatch(transfers_pb2.SubmitBatchRequest(operations=operations))
    assert again.results[0].transfers == results[0].transfers
    assert again.results[6].transfers == results[6].transfers
    assert await api.balance(customer) == (100, 10, 90)


async def test_batch_limits(api: Api) -> None:
    await fails(
        api.transfers.SubmitBatch(transfers_pb2.SubmitBatchRequest()),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    wallet = await api.wallet()
    too_many = [
        transfers_pb2.Operation(
            credit=transfers_pb2.CreditRequest(idempotency_key=f"b{n}", wallet_id=wallet, amount=1)
        )
        for n in range(8001)
    ]
    await fails(
        api.transfers.SubmitBatch(transfers_pb2.SubmitBatchRequest(operations=too_many)),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    assert await api.balance(wallet) == (0, 0, 0)
    full = await api.transfers.SubmitBatch(
        transfers_pb2.SubmitBatchRequest(operations=too_many[:8000])
    )
    assert all(not result.HasField("error") for result in full.results)
    assert await api.balance(wallet) == (8000, 0, 8000)


async def test_idempotency(api: Api, channel: grpc.aio.Channel) -> None:
    wallet = await api.wallet()
    request = transfers_pb2.CreditRequest(idempotency_key="pay-1", wallet_id=wallet, amount=10)
    first = await api.transfers.Credit(request)
    second = await api.transfers.Credit(request)
    assert second == first
    assert await api.balance(wallet) == (10, 0, 10)
    request.amount = 11
    await fails(api.transfers.Credit(request), Code.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")
    # Keys are scoped to the caller.
    other = await api.transfers.Credit(request, metadata=(("coffer-caller", "billing"),))
    assert other.transfer.id != first.transfer.id
    assert await api.balance(wallet) == (21, 0, 21)
    await fails(
        api.transfers.Credit(request, metadata=(("coffer-caller", "@coffer"),)),
        Code.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_replay_after_restart(
    database_url: str, open_channel: Callable[[str], grpc.aio.Channel]
) -> None:
    settings = Settings(database_url=database_url, listen="127.0.0.1:0")
    request = transfers_pb2.CreditRequest(idempotency_key="restart-1", amount=25)
    server = await Server.start(settings)
    try:
        async with open_channel(f"127.0.0.1:{server.port}") as channel:
            api = Api(channel)
            await api.setup_units()
            request.wallet_id = await api.wallet()
            first = await api.transfers.Credit(request)
    finally:
        await server.stop()
    server = await Server.start(settings)
    try:
        async with open_channel(f"127.0.0.1:{server.port}") as channel:
            api = Api(channel)
            again = await api.transfers.Credit(request)
            assert again == first
            assert await api.balance(request.wallet_id) == (25, 0, 25)
    finally:
        await server.stop()


# Bad input -----------------------------------------------------------------------------------


async def invalid(call: Awaitable[Any], field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == Code.INVALID_ARGUMENT, raised.value.details()
    info = error_info(raised.value)
    assert info.reason == "INVALID_ARGUMENT"
    assert info.metadata["field"].startswith(field), (info, raised.value.details())
    # The same field, as the standard detail names it: one violation, described by the message.
    (violation,) = bad_request(raised.value).field_violations
    assert violation.field == info.metadata["field"]
    assert violation.description == raised.value.details()


async def test_bad_input_for_every_rpc(api: Api) -> None:
    wallet = await api.funded(100)
    t, h, w, u = api.transfers, api.holds, api.wallets, api.units
    await invalid(u.CreateUnit(units_pb2.CreateUnitRequest(code="", name="x")), "code")
    await invalid(u.CreateUnit(units_pb2.CreateUnitRequest(code="a b", name="x")), "code")
    await invalid(u.CreateUnit(units_pb2.CreateUnitRequest(code="pts", name="x")), "kind")
    await invalid(
        u.CreateUnit(units_pb2.CreateUnitRequest(code="pts", kind=2, name="x", scale=19)), "scale"
    )
    await invalid(u.CreateUnit(units_pb2.CreateUnitRequest(code="pts", kind=2)), "name")
    for validity in ["P", "P0D", "P1.5D", "-P1D", "p1d", "P1D ", "P1201M", "P" + "0" * 32 + "1D"]:
        await invalid(
            u.CreateUnit(
                units_pb2.CreateUnitRequest(code="pts", kind=2, name="x", default_validity=validity)
            ),
            "default_validity",
        )
    await invalid(u.GetUnit(units_pb2.GetUnitRequest(code="")), "code")
    await invalid(u.GetUnit(units_pb2.GetUnitRequest(code="a b")), "code")
    await invalid(
        w.CreateWallet(wallets_pb2.CreateWalletRequest(owner_id="o", owner_kind=1, unit="EUR")),
        "idempotency_key",
    )
    await invalid(
        w.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key="k" * 129, owner_id="o", owner_kind=1, unit="EUR"
            )
        ),
        "idempotency_key",
    )
    await invalid(
        w.CreateWallet(
            wallets_pb2.CreateWalletRequest(idempotency_key=key(), owner_kind=1, unit="EUR")
        ),
        "owner_id",
    )
    await invalid(
        w.CreateWallet(
            wallets_pb2.CreateWalletRequest(idempotency_key=key(), owner_id="o", unit="EUR")
        ),
        "owner_kind",
    )
    await invalid(
        w.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key=key(),
                owner_id="o",
                owner_kind=types_pb2.OWNER_KIND_SYSTEM,
                unit="EUR",
            )
        ),
        "owner_kind",
    )
    await invalid(
        w.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key=key(), owner_id="o", owner_kind=1, unit="EUR", balance_minimum=5
            )
        ),
        "balance_minimum",
    )
    await invalid(
        w.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key=key(),
                owner_id="o",
                owner_kind=1,
                unit="EUR",
                metadata={f"k{n}": "v" for n in range(17)},
            )
        ),
        "metadata",
    )
    # A bad key names the map, the field a client can point at.
    await invalid(
        w.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key=key(), owner_id="o", owner_kind=1, unit="EUR", metadata={"": "v"}
            )
        ),
        "metadata",
    )
    await invalid(w.GetWallet(wallets_pb2.GetWalletRequest()), "wallet_id")
    await invalid(w.GetWallet(wallets_pb2.GetWalletRequest(wallet_id=-3)), "wallet_id")
    await invalid(w.GetBalance(wallets_pb2.GetBalanceRequest()), "wallet_id")
    await invalid(w.CancelWallet(wallets_pb2.CancelWalletRequest()), "wallet_id")
    await invalid(w.ListWallets(wallets_pb2.ListWalletsRequest(page_size=1001)), "page_size")
    await invalid(w.ListWallets(wallets_pb2.ListWalletsRequest(owner_id="a\x00b")), "owner_id")
    await invalid(w.ListWallets(wallets_pb2.ListWalletsRequest(unit="a b")), "unit")
    await invalid(w.ListWallets(wallets_pb2.ListWalletsRequest(owner_kind=9)), "owner_kind")
    await invalid(
        t.ListTransfers(transfers_pb2.ListTransfersRequest(reference="r\x00")), "reference"
    )
    await invalid(
        w.ListWallets(wallets_pb2.ListWalletsRequest(page_token="garbage!")), "page_token"
    )
    await invalid(
        t.Credit(transfers_pb2.CreditRequest(wallet_id=wallet, amount=1)), "idempotency_key"
    )
    await invalid(
        t.Credit(transfers_pb2.CreditRequest(idempotency_key=key(), amount=1)), "wallet_id"
    )
    await invalid(
        t.Credit(transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet)), "amount"
    )
    await invalid(
        t.Credit(transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet, amount=-5)),
        "amount",
    )
    await invalid(
        t.Credit(
            transfers_pb2.CreditRequest(
                idempotency_key=key(), wallet_id=wallet, amount=1, note="n" * 1001
            )
        ),
        "note",
    )
    await invalid(
        t.Debit(
            transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet, amount=1, mode=9)
        ),
        "mode",
    )
    await invalid(
        t.Debit(transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=-1, amount=1)),
        "wallet_id",
    )
    await invalid(
        t.Transfer(
            transfers_pb2.TransferRequest(idempotency_key=key(), source_wallet_id=wallet, amount=1)
        ),
        "target_wallet_id",
    )
    await invalid(
        t.Deposit(transfers_pb2.DepositRequest(idempotency_key=key(), wallet_id=wallet, amount=1)),
        "funding_source",
    )
    await invalid(
        t.Withdraw(
            transfers_pb2.WithdrawRequest(idempotency_key=key(), wallet_id=wallet, amount=1)
        ),
        "funding_source",
    )
    await invalid(
        t.Pay(transfers_pb2.PayRequest(idempotency_key=key(), payer_wallet_id=wallet, amount=1)),
        "payee_wallet_id",
    )
    await invalid(t.Void(transfers_pb2.VoidRequest(idempotency_key=key())), "transfer_id")
    await invalid(t.GetTransfer(transfers_pb2.GetTransferRequest()), "transfer_id")
    await invalid(t.ListTransfers(transfers_pb2.ListTransfersRequest(kinds=[99])), "kinds")
    await invalid(t.ListTransfers(transfers_pb2.ListTransfersRequest(page_size=-1)), "page_size")
    await invalid(
        t.ListTransfers(transfers_pb2.ListTransfersRequest(start_time=Timestamp(seconds=-(2**62)))),
        "start_time",
    )
    await invalid(
        t.ListTransfers(transfers_pb2.ListTransfersRequest(end_time=Timestamp(seconds=2**40))),
        "end_time",
    )
    await invalid(
        h.PlaceHold(
            holds_pb2.PlaceHoldRequest(
                idempotency_key=key(), wallet_id=wallet, amount=1, timeout=Duration(seconds=0)
            )
        ),
        "timeout",
    )
    await invalid(
        h.PlaceHold(holds_pb2.PlaceHoldRequest(idempotency_key=key(), wallet_id=wallet)), "amount"
    )
    await invalid(h.CaptureHold(holds_pb2.CaptureHoldRequest(idempotency_key=key())), "hold_id")
    await invalid(
        h.CaptureHold(holds_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=1, amount=0)),
        "amount",
    )
    await invalid(h.ReleaseHold(holds_pb2.ReleaseHoldRequest(idempotency_key=key())), "hold_id")
    await invalid(h.GetHold(holds_pb2.GetHoldRequest()), "hold_id")
    # Nothing was written by any of them.
    assert await api.balance(wallet) == (100, 0, 100)


async def test_a_lapsed_hold_frees_its_money_before_the_sweep(
    database_url: str, open_channel: Callable[[str], grpc.aio.Channel]
) -> None:
    import asyncio

    settings = Settings(
        database_url=database_url, listen="127.0.0.1:0", hold_expiry_interval_s=3600
    )
    server = await Server.start(settings)
    try:
        async with open_channel(f"127.0.0.1:{server.port}") as channel:
            api = Api(channel)
            await api.setup_units()
            wallet = await api.funded(100)
            await api.holds.PlaceHold(
                holds_pb2.PlaceHoldRequest(
                    idempotency_key=key(), wallet_id=wallet, amount=60, timeout=Duration(seconds=1)
                )
            )
            assert await api.balance(wallet) == (100, 60, 40)
            await asyncio.sleep(1.2)
            assert await api.balance(wallet) == (100, 0, 100)
            await api.transfers.Debit(
                transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=wallet, amount=100)
            )
            assert await api.balance(wallet) == (0, 0, 0)
    finally:
        await server.stop()
