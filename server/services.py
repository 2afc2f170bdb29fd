"""The gRPC servicers: each call converts its request, asks the core, converts the answer.

Errors are not handled here: what a handler raises is turned into a status by
`errors.translate_errors`, in one place.
"""

from __future__ import annotations

from typing import TypeVar

import grpc

from coffer.clients.v1 import (
    holds_pb2,
    holds_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)
from coffer.core import errors, model, rules
from coffer.core.ledger import Ledger, TransferFilter, batch_operations_max, system_caller

from . import convert
from .batcher import Batcher
from .errors import status_codes, translate_errors

caller_metadata_key = "coffer-caller"
caller_default = "default"

_HoldResponse = TypeVar(
    "_HoldResponse",
    holds_pb2.PlaceHoldResponse,
    holds_pb2.CaptureHoldResponse,
    holds_pb2.ReleaseHoldResponse,
)
_codes = {category: code.value[0] for category, code in status_codes.items()}


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """Who is calling: idempotency keys are scoped to it."""
    for key, value in context.invocation_metadata() or ():
        if key == caller_metadata_key:
            if not isinstance(value, str) or not 0 < len(value) <= model.caller_length_max:
                raise errors.InvalidArgument(
                    caller_metadata_key, f"must be 1 to {model.caller_length_max} characters"
                )
            if value.startswith(system_caller[0]):
                raise errors.InvalidArgument(
                    caller_metadata_key, f"must not start with {system_caller[0]!r}"
                )
            return value
    return caller_default


@translate_errors
class UnitService(units_pb2_grpc.UnitServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def CreateUnit(
        self, request: units_pb2.CreateUnitRequest, context: grpc.aio.ServicerContext
    ) -> units_pb2.CreateUnitResponse:
        unit = await self._ledger.create_unit(convert.unit(request))
        return units_pb2.CreateUnitResponse(unit=convert.unit_pb(unit))

    async def GetUnit(
        self, request: units_pb2.GetUnitRequest, context: grpc.aio.ServicerContext
    ) -> units_pb2.GetUnitResponse:
        if not model.unit_code_pattern.fullmatch(request.code):
            raise errors.InvalidArgument("code", "must be 1 to 32 letters, digits, '_', '-' or '.'")
        unit = await self._ledger.get_unit(request.code)
        return units_pb2.GetUnitResponse(unit=convert.unit_pb(unit))

    async def ListUnits(
        self, request: units_pb2.ListUnitsRequest, context: grpc.aio.ServicerContext
    ) -> units_pb2.ListUnitsResponse:
        units = await self._ledger.list_units()
        return units_pb2.ListUnitsResponse(units=[convert.unit_pb(unit) for unit in units])


@translate_errors
class WalletService(wallets_pb2_grpc.WalletServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def CreateWallet(
        self, request: wallets_pb2.CreateWalletRequest, context: grpc.aio.ServicerContext
    ) -> wallets_pb2.CreateWalletResponse:
        wallet = await self._ledger.create_wallet(convert.new_wallet(request, caller_of(context)))
        return wallets_pb2.CreateWalletResponse(wallet=convert.wallet_pb(wallet))

    async def GetWallet(
        self, request: wallets_pb2.GetWalletRequest, context: grpc.aio.ServicerContext
    ) -> wallets_pb2.GetWalletResponse:
        wallet = await self._ledger.get_wallet(_id("wallet_id", request.wallet_id))
        return wallets_pb2.GetWalletResponse(wallet=convert.wallet_pb(wallet))

    async def GetBalance(
        self, request: wallets_pb2.GetBalanceRequest, context: grpc.aio.ServicerContext
    ) -> wallets_pb2.GetBalanceResponse:
        wallet = await self._ledger.get_wallet(_id("wallet_id", request.wallet_id))
        return wallets_pb2.GetBalanceResponse(
            wallet_id=wallet.id, unit=wallet.unit, balance=convert.balance_pb(wallet.balance)
        )

    async def ListWallets(
        self, request: wallets_pb2.ListWalletsRequest, context: grpc.aio.ServicerContext
    ) -> wallets_pb2.ListWalletsResponse:
        model.check_text("owner_id", request.owner_id, model.owner_id_length_max)
        if request.unit and not model.unit_code_pattern.fullmatch(request.unit):
            raise errors.InvalidArgument("unit", "is not a unit code")
        if request.owner_kind not in model.OwnerKind.__members__.values() and request.owner_kind:
            raise errors.InvalidArgument("owner_kind", "is not an owner kind")
        page = await self._ledger.list_wallets(
            owner_id=request.owner_id or None,
            owner_kind=model.OwnerKind(request.owner_kind) if request.owner_kind else None,
            unit=request.unit or None,
            page_size=convert.page_size(request.page_size),
            after_id=convert.cursor(request.page_token, "w") or 0,
        )
        return wallets_pb2.ListWalletsResponse(
            wallets=[convert.wallet_pb(wallet) for wallet in page.items],
            next_page_token=convert.page_token(page.cursor, "w"),
        )

    async def CancelWallet(
        self, request: wallets_pb2.CancelWalletRequest, context: grpc.aio.ServicerContext
    ) -> wallets_pb2.CancelWalletResponse:
        wallet = await self._ledger.cancel_wallet(_id("wallet_id", request.wallet_id))
        return wallets_pb2.CancelWalletResponse(wallet=convert.wallet_pb(wallet))


@translate_errors
class TransferService(transfers_pb2_grpc.TransferServiceServicer):
    def __init__(self, ledger: Ledger, batcher: Batcher) -> None:
        self._ledger = ledger
        self._batcher = batcher

    async def Credit(
        self, request: transfers_pb2.CreditRequest, context: grpc.aio.ServicerContext
    ) -> transfers_pb2.CreditResponse:
        applied = await self._batcher.submit(
            convert.credit(request, caller_of(context)), context.time_remaining()
        )
        return transfers_pb2.CreditResponse(transfer=convert.transfer_pb(applied.transfer))

    async def Debit(
        self, request: transfers_pb2.DebitRequest, context: grpc.aio.ServicerContext
    ) -> transfers_pb2.DebitResponse:
        applied = await self._batcher.submit(
            convert.debit(request, caller_of(context)), context.time_remaining()
        )
        return transfers_pb2.DebitResponse(
            transfer=convert.transfer_pb(applied.transfer),
            amount_debited=applied.transfer.amount,
            amount_remaining=applied.amount_remaining,
        )

    async def Transfer(
        self, request: transfers_pb2.TransferRequest, context: grpc.aio.ServicerContext
    ) -> transfers_pb2.TransferResponse:
        applied = await self._batcher.submit(
            convert.transfer(request, caller_of(context)), context.time_remaining()
        )
        return transfers_pb2.TransferResponse(transfer=convert.transfer_pb(applied.transfer))

    async def Deposit(
        self, request: transfers_pb2.DepositRequest, context: grpc.aio.ServicerContext
    ) -> transfers_pb2.DepositResponse:
        applied = await self._batcher.submit(
            convert.deposit(request, caller_of(context)), context.time_remaining()
        )
        return transfers_pb2.DepositResponse(transfer=convert.transfer_pb(applied.transfer))

    async def Withdraw(
        self, request: transfers_pb2.WithdrawRequest, context: grpc.aio.ServicerContext
    ) -> transfers_pb2.WithdrawResponse:
        applied = await self._batcher.submit(
            convert.withdrawal(request, caller_of(context)), context.time_remaining()
        )
        return transfers_pb2.WithdrawResponse(transfer=convert.transfer_pb(applied.transfer))

    async def Pay(
        self, request: transfers_pb2.PayRequest, context: grpc.aio.ServicerContext
    ) -> transfers_pb2.PayResponse:
        applied = await self._batcher.submit(
            convert.payment(request, caller_of(context)), context.time_remaining()
        )
        return transfers_pb2.PayResponse(transfer=convert.transfer_pb(applied.transfer))

    async def Void(
        self, request: transfers_pb2.VoidRequest, context: grpc.aio.ServicerContext
    ) -> transfers_pb2.VoidResponse:
        applied = await self._batcher.submit(
            convert.void(request, caller_of(context)), context.time_remaining()
        )
        return transfers_pb2.VoidResponse(transfer=convert.transfer_pb(applied.transfer))

    async def SubmitBatch(
        self, request: transfers_pb2.SubmitBatchRequest, context: grpc.aio.ServicerContext
    ) -> transfers_pb2.SubmitBatchResponse:
        count = len(request.operations)
        if not 0 < count <= batch_operations_max:
            raise errors.InvalidArgument(
                "operations", f"must hold 1 to {batch_operations_max} operations, not {count}"
            )
        caller = caller_of(context)
        operations = rules.seal([convert.operation(each, caller) for each in request.operations])
        outcomes = await self._batcher.submit_all(operations, context.time_remaining())
        response = transfers_pb2.SubmitBatchResponse()
        add = response.results.add
        for outcome in outcomes:
            convert.fill_operation_result(add(), outcome, _codes)
        return response

    async def GetTransfer(
        self, request: transfers_pb2.GetTransferRequest, context: grpc.aio.ServicerContext
    ) -> transfers_pb2.GetTransferResponse:
        transfer = await self._ledger.get_transfer(_id("transfer_id", request.transfer_id))
        return transfers_pb2.GetTransferResponse(transfer=convert.transfer_pb(transfer))

    async def ListTransfers(
        self, request: transfers_pb2.ListTransfersRequest, context: grpc.aio.ServicerContext
    ) -> transfers_pb2.ListTransfersResponse:
        if request.wallet_id < 0:
            raise errors.InvalidArgument("wallet_id", "must be a positive id, or 0 for all")
        model.check_text("reference", request.reference, model.reference_length_max)
        where = TransferFilter(
            wallet_id=request.wallet_id or None,
            kinds=convert.transfer_kinds(list(request.kinds)),
            start=convert.time(request.start_time, "start_time")
            if request.HasField("start_time")
            else None,
            end=convert.time(request.end_time, "end_time")
            if request.HasField("end_time")
            else None,
            reference=request.reference or None,
        )
        page = await self._ledger.list_transfers(
            where,
            page_size=convert.page_size(request.page_size),
            before_id=convert.cursor(request.page_token, "t"),
        )
        return transfers_pb2.ListTransfersResponse(
            transfers=[convert.transfer_pb(transfer) for transfer in page.items],
            next_page_token=convert.page_token(page.cursor, "t"),
        )


@translate_errors
class HoldService(holds_pb2_grpc.HoldServiceServicer):
    def __init__(self, ledger: Ledger, batcher: Batcher) -> None:
        self._ledger = ledger
        self._batcher = batcher

    async def PlaceHold(
        self, request: holds_pb2.PlaceHoldRequest, context: grpc.aio.ServicerContext
    ) -> holds_pb2.PlaceHoldResponse:
        applied = await self._batcher.submit(
            convert.place_hold(request, caller_of(context)), context.time_remaining()
        )
        return _hold_response(holds_pb2.PlaceHoldResponse, applied)

    async def CaptureHold(
        self, request: holds_pb2.CaptureHoldRequest, context: grpc.aio.ServicerContext
    ) -> holds_pb2.CaptureHoldResponse:
        applied = await self._batcher.submit(
            convert.capture_hold(request, caller_of(context)), context.time_remaining()
        )
        return _hold_response(holds_pb2.CaptureHoldResponse, applied)

    async def ReleaseHold(
        self, request: holds_pb2.ReleaseHoldRequest, context: grpc.aio.ServicerContext
    ) -> holds_pb2.ReleaseHoldResponse:
        applied = await self._batcher.submit(
            convert.release_hold(request, caller_of(context)), context.time_remaining()
        )
        return _hold_response(holds_pb2.ReleaseHoldResponse, applied)

    async def GetHold(
        self, request: holds_pb2.GetHoldRequest, context: grpc.aio.ServicerContext
    ) -> holds_pb2.GetHoldResponse:
        hold = await self._ledger.get_hold(_id("hold_id", request.hold_id))
        return holds_pb2.GetHoldResponse(hold=convert.hold_pb(hold))


def _hold_response(response: type[_HoldResponse], applied: model.Applied) -> _HoldResponse:
    assert applied.hold is not None
    return response(
        hold=convert.hold_pb(applied.hold), transfer=convert.transfer_pb(applied.transfer)
    )


def _id(field: str, value: int) -> int:
    if value == 0:
        raise errors.InvalidArgument(field, "is required")
    if value < 0:
        raise errors.InvalidArgument(field, "must be a positive id")
    return value
