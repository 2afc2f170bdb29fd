"""The gRPC servicers: each call converts its request, asks the core, converts the answer.

Errors are not handled here: what a handler raises is turned into a status by
`errors.translate_errors`, in one place.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from typing import Any, TypeVar

import grpc

from coffer.clients.caller import caller_metadata_key, check_caller
from coffer.core import errors, model
from coffer.core.ledger import Ledger
from coffer.core.store.listener import Listener
from coffer.v1 import (
    events_pb2,
    events_pb2_grpc,
    holds_pb2,
    holds_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)

from . import convert
from .batcher import Batcher
from .errors import replayed_metadata, status_codes, translate_errors

__all__ = ["EventService", "HoldService", "TransferService", "UnitService", "WalletService"]

_HoldResponse = TypeVar(
    "_HoldResponse",
    holds_pb2.PlaceHoldResponse,
    holds_pb2.CaptureHoldResponse,
    holds_pb2.ReleaseHoldResponse,
)
_Request = TypeVar("_Request", bound=Any)
_codes = {category: code.value[0] for category, code in status_codes.items()}
# A unary call's context. Its type arguments type only streaming reads and writes, which no
# RPC here makes; each handler's signature names its request and response.
_Context = grpc.aio.ServicerContext[Any, Any]


def _caller_of(context: _Context) -> str:
    """Who is calling, for a call that writes: required; idempotency keys are scoped to it."""
    caller = _caller_sent(context)
    if caller is None:
        raise errors.InvalidArgument(
            caller_metadata_key, "is required on every call that writes: name the caller"
        )
    return caller


def _caller_sent(context: _Context) -> str | None:
    """The caller a call names, checked by the one rule (`coffer.clients.caller`); None if it
    names none. Reads call it for the check alone."""
    sent = [
        value for key, value in context.invocation_metadata() or () if key == caller_metadata_key
    ]
    if not sent:
        return None
    if len(sent) > 1:
        raise errors.InvalidArgument(caller_metadata_key, "must be sent once")
    try:
        return check_caller(sent[0])
    except ValueError as error:
        raise errors.InvalidArgument(caller_metadata_key, str(error)) from None


@translate_errors
class UnitService(units_pb2_grpc.UnitServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def CreateUnit(
        self, request: units_pb2.CreateUnitRequest, context: _Context
    ) -> units_pb2.CreateUnitResponse:
        actor = _caller_of(context)
        unit = await self._ledger.create_unit(convert.unit(request), actor=actor)
        return units_pb2.CreateUnitResponse(unit=convert.unit_pb(unit))

    async def GetUnit(
        self, request: units_pb2.GetUnitRequest, context: _Context
    ) -> units_pb2.GetUnitResponse:
        _caller_sent(context)
        unit = await self._ledger.get_unit(convert.unit_code(request))
        return units_pb2.GetUnitResponse(unit=convert.unit_pb(unit))

    async def ListUnits(
        self, request: units_pb2.ListUnitsRequest, context: _Context
    ) -> units_pb2.ListUnitsResponse:
        _caller_sent(context)
        units = await self._ledger.list_units()
        return units_pb2.ListUnitsResponse(units=[convert.unit_pb(unit) for unit in units])


@translate_errors
class WalletService(wallets_pb2_grpc.WalletServiceServicer):
    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger

    async def CreateWallet(
        self, request: wallets_pb2.CreateWalletRequest, context: _Context
    ) -> wallets_pb2.CreateWalletResponse:
        wallet, replayed = await self._ledger.create_wallet(
            convert.new_wallet(request, _caller_of(context))
        )
        if replayed:
            context.set_trailing_metadata(replayed_metadata)
        scales = await self._ledger.unit_scales((wallet.unit,))
        return wallets_pb2.CreateWalletResponse(wallet=convert.wallet_pb(wallet, scales))

    async def GetWallet(
        self, request: wallets_pb2.GetWalletRequest, context: _Context
    ) -> wallets_pb2.GetWalletResponse:
        _caller_sent(context)
        wallet = await self._ledger.get_wallet(convert.required_id("wallet_id", request.wallet_id))
        scales = await self._ledger.unit_scales((wallet.unit,))
        return wallets_pb2.GetWalletResponse(wallet=convert.wallet_pb(wallet, scales))

    async def GetBalance(
        self, request: wallets_pb2.GetBalanceRequest, context: _Context
    ) -> wallets_pb2.GetBalanceResponse:
        _caller_sent(context)
        wallet = await self._ledger.get_wallet(convert.required_id("wallet_id", request.wallet_id))
        scales = await self._ledger.unit_scales((wallet.unit,))
        return wallets_pb2.GetBalanceResponse(
            wallet_id=wallet.id,
            unit=wallet.unit,
            balance=convert.balance_pb(wallet.balance, wallet.unit, scales),
        )

    async def ListWallets(
        self, request: wallets_pb2.ListWalletsRequest, context: _Context
    ) -> wallets_pb2.ListWalletsResponse:
        _caller_sent(context)
        where = convert.wallet_filter(request)
        scope = convert.page_scope("wallets", *where)
        page = await self._ledger.list_wallets(
            owner_id=where.owner_id,
            owner_kind=where.owner_kind,
            unit=where.unit,
            page_size=convert.page_size(request.page_size),
            after_id=convert.cursor(request.page_token, scope) or 0,
        )
        scales = await self._ledger.unit_scales({wallet.unit for wallet in page.items})
        return wallets_pb2.ListWalletsResponse(
            wallets=[convert.wallet_pb(wallet, scales) for wallet in page.items],
            next_page_token=convert.page_token(page.cursor, scope),
        )

    async def CancelWallet(
        self, request: wallets_pb2.CancelWalletRequest, context: _Context
    ) -> wallets_pb2.CancelWalletResponse:
        actor = _caller_of(context)
        wallet = await self._ledger.cancel_wallet(
            convert.required_id("wallet_id", request.wallet_id), actor=actor
        )
        scales = await self._ledger.unit_scales((wallet.unit,))
        return wallets_pb2.CancelWalletResponse(wallet=convert.wallet_pb(wallet, scales))

    async def SetBalanceAlert(
        self, request: wallets_pb2.SetBalanceAlertRequest, context: _Context
    ) -> wallets_pb2.SetBalanceAlertResponse:
        actor = _caller_of(context)
        alert = convert.balance_alert(request)
        wallet = await self._ledger.set_balance_alert(
            alert.wallet_id,
            low_balance_threshold=alert.low_balance_threshold,
            top_up_to=alert.top_up_to,
            actor=actor,
        )
        scales = await self._ledger.unit_scales((wallet.unit,))
        return wallets_pb2.SetBalanceAlertResponse(wallet=convert.wallet_pb(wallet, scales))


@translate_errors
class TransferService(transfers_pb2_grpc.TransferServiceServicer):
    def __init__(self, ledger: Ledger, batcher: Batcher) -> None:
        self._ledger = ledger
        self._batcher = batcher

    async def Credit(
        self, request: transfers_pb2.CreditRequest, context: _Context
    ) -> transfers_pb2.CreditResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, convert.credit, request
        )
        return transfers_pb2.CreditResponse(transfer=convert.transfer_pb(applied.transfer, scales))

    async def Debit(
        self, request: transfers_pb2.DebitRequest, context: _Context
    ) -> transfers_pb2.DebitResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, convert.debit, request
        )
        return transfers_pb2.DebitResponse(
            transfer=convert.transfer_pb(applied.transfer, scales),
            amount_debited=applied.transfer.amount,
            amount_remaining=applied.amount_remaining,
        )

    async def Transfer(
        self, request: transfers_pb2.TransferRequest, context: _Context
    ) -> transfers_pb2.TransferResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, convert.transfer, request
        )
        return transfers_pb2.TransferResponse(
            transfer=convert.transfer_pb(applied.transfer, scales)
        )

    async def Deposit(
        self, request: transfers_pb2.DepositRequest, context: _Context
    ) -> transfers_pb2.DepositResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, convert.deposit, request
        )
        return transfers_pb2.DepositResponse(transfer=convert.transfer_pb(applied.transfer, scales))

    async def Withdraw(
        self, request: transfers_pb2.WithdrawRequest, context: _Context
    ) -> transfers_pb2.WithdrawResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, convert.withdrawal, request
        )
        return transfers_pb2.WithdrawResponse(
            transfer=convert.transfer_pb(applied.transfer, scales)
        )

    async def Pay(
        self, request: transfers_pb2.PayRequest, context: _Context
    ) -> transfers_pb2.PayResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, convert.payment, request
        )
        return transfers_pb2.PayResponse(transfer=convert.transfer_pb(applied.transfer, scales))

    async def Void(
        self, request: transfers_pb2.VoidRequest, context: _Context
    ) -> transfers_pb2.VoidResponse:
        applied, scales = await _submit(self._ledger, self._batcher, context, convert.void, request)
        return transfers_pb2.VoidResponse(transfer=convert.transfer_pb(applied.transfer, scales))

    async def SubmitBatch(
        self, request: transfers_pb2.SubmitBatchRequest, context: _Context
    ) -> transfers_pb2.SubmitBatchResponse:
        operations = convert.batch(request, _caller_of(context))
        answers = await self._batcher.submit_all(operations, context.time_remaining())
        scales = await self._ledger.unit_scales(convert.units_of(answers))
        response = transfers_pb2.SubmitBatchResponse()
        add = response.results.add
        for answer in answers:
            convert.fill_operation_result(add(), answer, _codes, scales)
        return response

    async def GetTransfer(
        self, request: transfers_pb2.GetTransferRequest, context: _Context
    ) -> transfers_pb2.GetTransferResponse:
        _caller_sent(context)
        transfer = await self._ledger.get_transfer(
            convert.required_id("transfer_id", request.transfer_id)
        )
        scales = await self._ledger.unit_scales((transfer.unit,))
        return transfers_pb2.GetTransferResponse(transfer=convert.transfer_pb(transfer, scales))

    async def ListTransfers(
        self, request: transfers_pb2.ListTransfersRequest, context: _Context
    ) -> transfers_pb2.ListTransfersResponse:
        _caller_sent(context)
        where = convert.transfer_filter(request)
        scope = convert.page_scope("transfers", where)
        page = await self._ledger.list_transfers(
            where,
            page_size=convert.page_size(request.page_size),
            before_id=convert.cursor(request.page_token, scope),
        )
        scales = await self._ledger.unit_scales({transfer.unit for transfer in page.items})
        return transfers_pb2.ListTransfersResponse(
            transfers=[convert.transfer_pb(transfer, scales) for transfer in page.items],
            next_page_token=convert.page_token(page.cursor, scope),
        )


@translate_errors
class HoldService(holds_pb2_grpc.HoldServiceServicer):
    def __init__(self, ledger: Ledger, batcher: Batcher) -> None:
        self._ledger = ledger
        self._batcher = batcher

    async def PlaceHold(
        self, request: holds_pb2.PlaceHoldRequest, context: _Context
    ) -> holds_pb2.PlaceHoldResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, convert.place_hold, request
        )
        return _hold_response(holds_pb2.PlaceHoldResponse, applied, scales)

    async def CaptureHold(
        self, request: holds_pb2.CaptureHoldRequest, context: _Context
    ) -> holds_pb2.CaptureHoldResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, convert.capture_hold, request
        )
        return _hold_response(holds_pb2.CaptureHoldResponse, applied, scales)

    async def ReleaseHold(
        self, request: holds_pb2.ReleaseHoldRequest, context: _Context
    ) -> holds_pb2.ReleaseHoldResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, convert.release_hold, request
        )
        return _hold_response(holds_pb2.ReleaseHoldResponse, applied, scales)

    async def GetHold(
        self, request: holds_pb2.GetHoldRequest, context: _Context
    ) -> holds_pb2.GetHoldResponse:
        _caller_sent(context)
        hold = await self._ledger.get_hold(convert.required_id("hold_id", request.hold_id))
        scales = await self._ledger.unit_scales((hold.unit,))
        return holds_pb2.GetHoldResponse(hold=convert.hold_pb(hold, scales))


@translate_errors
class EventService(events_pb2_grpc.EventServiceServicer):
    def __init__(self, ledger: Ledger, listener: Listener) -> None:
        self._ledger = ledger
        self._listener = listener

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: _Context
    ) -> events_pb2.ListEventsResponse:
        _caller_sent(context)
        page = await self._ledger.list_events(
            convert.event_cursor(request.after_cursor),
            page_size=convert.page_size(request.page_size),
            where=convert.event_filter(request.filter),
        )
        scales = await self._ledger.unit_scales(convert.units_of_events(page.events))
        return events_pb2.ListEventsResponse(
            events=[convert.event_pb(event, scales) for event in page.events],
            next_cursor=page.cursor.text,
            caught_up=page.caught_up,
        )

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: _Context
    ) -> AsyncGenerator[events_pb2.WatchEventsResponse, None]:
        _caller_sent(context)
        events = self._ledger.watch_events(
            convert.event_cursor(request.after_cursor),
            self._listener,
            where=convert.event_filter(request.filter),
        )
        async with aclosing(events):
            async for event in events:
                scales = await self._ledger.unit_scales(convert.units_of_events((event,)))
                yield events_pb2.WatchEventsResponse(event=convert.event_pb(event, scales))


async def _submit(
    ledger: Ledger,
    batcher: Batcher,
    context: _Context,
    operation: Callable[[_Request, str], model.Operation],
    request: _Request,
) -> tuple[model.Applied, Mapping[str, int]]:
    """Applies the operation a request asks for; returns what it applied and the scales of
    its units, for the answer. A replayed answer says so in the trailing metadata (a replayed
    refusal too, through `errors.translate_errors`)."""
    applied = await batcher.submit(
        operation(request, _caller_of(context)), context.time_remaining()
    )
    if applied.replayed:
        context.set_trailing_metadata(replayed_metadata)
    return applied, await ledger.unit_scales(convert.units_of((applied,)))


def _hold_response(
    response: type[_HoldResponse], applied: model.Applied, scales: Mapping[str, int]
) -> _HoldResponse:
    assert applied.hold is not None
    return response(
        hold=convert.hold_pb(applied.hold, scales),
        transfer=convert.transfer_pb(applied.transfer, scales),
    )
