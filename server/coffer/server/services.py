"""The gRPC servicers: each call converts its request, asks the core, converts the answer.

Errors are not handled here: what a handler raises is turned into a status by
`errors.translate_errors`, in one place. Nor is access: the guard there lets each call in
(authenticated, within its rate, allowed to its role by `roles`) and hands its handler the
principal. The handlers use it to scope what they do: operations and wallets are stored
under its idempotency scope, name it as `performed_by` when the request names nobody, and for
merchants and customers carry the owner they are limited to (checked by the ledger on the
wallets it locks); reads of a merchant or customer check, once fetched, that what they found
is its own, and answer NOT_FOUND, as for a missing id, when it is not.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import replace
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from coffer.core import errors, model
from coffer.core.access import Access
from coffer.core.ledger import Ledger, watchers_retry_after_ms
from coffer.core.model import Principal
from coffer.core.store.listener import Listener
from coffer.v1 import (
    access_pb2,
    events_pb2,
    grants_pb2,
    holds_pb2,
    reports_pb2,
    transfers_pb2,
    units_pb2,
    wallets_pb2,
)

from . import convert, logs, roles
from .batcher import Batcher
from .errors import replayed_metadata, status_codes, translate_errors
from .gate import Gate
from .metrics import EventsBehind

__all__ = [
    "AccessService",
    "EventService",
    "GrantService",
    "HoldService",
    "ReportService",
    "TransferService",
    "UnitService",
    "WalletService",
]

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


def _described(module: Any, name: str) -> ServiceDescriptor:
    service: ServiceDescriptor = module.DESCRIPTOR.services_by_name[name]
    return service


async def _owns_any(ledger: Ledger, principal: Principal, wallet_ids: tuple[int, ...]) -> bool:
    """Whether the principal may read what touches these wallets: any principal but a
    merchant or customer; a merchant or customer if one of them is its own."""
    owner = principal.owner
    if owner is None:
        return True
    owners = await ledger.wallet_owners(set(wallet_ids))
    return any(owners.get(wallet_id) == owner for wallet_id in wallet_ids)


async def _visible_wallet(ledger: Ledger, wallet_id: int, principal: Principal) -> model.Wallet:
    """The wallet, if the principal may read it: another owner's is not found, as a missing
    one is."""
    wallet = await ledger.get_wallet(convert.required_id("wallet_id", wallet_id))
    owner = principal.owner
    if owner is not None and not owner.owns(wallet.owner_kind, wallet.owner_id):
        raise errors.WalletNotFound(f"wallet {wallet_id} does not exist")
    return wallet


@translate_errors(_described(units_pb2, "UnitService"))
class UnitService:
    def __init__(self, ledger: Ledger, gate: Gate) -> None:
        self._ledger = ledger
        self.gate = gate

    async def CreateUnit(
        self, request: units_pb2.CreateUnitRequest, context: _Context, principal: Principal
    ) -> units_pb2.CreateUnitResponse:
        unit = await self._ledger.create_unit(convert.unit(request), actor=principal.scope)
        return units_pb2.CreateUnitResponse(unit=convert.unit_pb(unit))

    async def GetUnit(
        self, request: units_pb2.GetUnitRequest, context: _Context, principal: Principal
    ) -> units_pb2.GetUnitResponse:
        unit = await self._ledger.get_unit(convert.unit_code(request))
        return units_pb2.GetUnitResponse(unit=convert.unit_pb(unit))

    async def ListUnits(
        self, request: units_pb2.ListUnitsRequest, context: _Context, principal: Principal
    ) -> units_pb2.ListUnitsResponse:
        units = await self._ledger.list_units()
        return units_pb2.ListUnitsResponse(units=[convert.unit_pb(unit) for unit in units])


@translate_errors(_described(wallets_pb2, "WalletService"))
class WalletService:
    def __init__(self, ledger: Ledger, gate: Gate) -> None:
        self._ledger = ledger
        self.gate = gate

    async def CreateWallet(
        self, request: wallets_pb2.CreateWalletRequest, context: _Context, principal: Principal
    ) -> wallets_pb2.CreateWalletResponse:
        wallet, replayed = await self._ledger.create_wallet(convert.new_wallet(request, principal))
        if replayed:
            context.set_trailing_metadata(replayed_metadata)
        scales = await self._ledger.unit_scales((wallet.unit,))
        return wallets_pb2.CreateWalletResponse(wallet=convert.wallet_pb(wallet, scales))

    async def GetWallet(
        self, request: wallets_pb2.GetWalletRequest, context: _Context, principal: Principal
    ) -> wallets_pb2.GetWalletResponse:
        wallet = await self._visible_wallet(request.wallet_id, principal)
        scales = await self._ledger.unit_scales((wallet.unit,))
        return wallets_pb2.GetWalletResponse(wallet=convert.wallet_pb(wallet, scales))

    async def GetBalance(
        self, request: wallets_pb2.GetBalanceRequest, context: _Context, principal: Principal
    ) -> wallets_pb2.GetBalanceResponse:
        wallet = await self._visible_wallet(request.wallet_id, principal)
        scales = await self._ledger.unit_scales((wallet.unit,))
        return wallets_pb2.GetBalanceResponse(
            wallet_id=wallet.id,
            unit=wallet.unit,
            balance=convert.balance_pb(wallet.balance, wallet.unit, scales),
        )

    async def ListWallets(
        self, request: wallets_pb2.ListWalletsRequest, context: _Context, principal: Principal
    ) -> wallets_pb2.ListWalletsResponse:
        where = convert.wallet_filter(request)
        owner = principal.owner
        if owner is not None:
            # A merchant or customer lists its own wallets: of another owner, it sees none.
            if where.owner_id not in (None, owner.id) or where.owner_kind not in (
                None,
                owner.kind,
            ):
                return wallets_pb2.ListWalletsResponse()
            where = convert.WalletFilter(owner.id, owner.kind, where.unit)
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
        self, request: wallets_pb2.CancelWalletRequest, context: _Context, principal: Principal
    ) -> wallets_pb2.CancelWalletResponse:
        wallet = await self._ledger.cancel_wallet(
            convert.required_id("wallet_id", request.wallet_id), actor=principal.scope
        )
        scales = await self._ledger.unit_scales((wallet.unit,))
        return wallets_pb2.CancelWalletResponse(wallet=convert.wallet_pb(wallet, scales))

    async def SetBalanceAlert(
        self, request: wallets_pb2.SetBalanceAlertRequest, context: _Context, principal: Principal
    ) -> wallets_pb2.SetBalanceAlertResponse:
        alert = convert.balance_alert(request)
        wallet = await self._ledger.set_balance_alert(
            alert.wallet_id,
            low_balance_threshold=alert.low_balance_threshold,
            top_up_to=alert.top_up_to,
            actor=principal.scope,
        )
        scales = await self._ledger.unit_scales((wallet.unit,))
        return wallets_pb2.SetBalanceAlertResponse(wallet=convert.wallet_pb(wallet, scales))

    async def _visible_wallet(self, wallet_id: int, principal: Principal) -> model.Wallet:
        return await _visible_wallet(self._ledger, wallet_id, principal)


@translate_errors(_described(transfers_pb2, "TransferService"))
class TransferService:
    def __init__(self, ledger: Ledger, batcher: Batcher, gate: Gate) -> None:
        self._ledger = ledger
        self._batcher = batcher
        self.gate = gate

    async def Credit(
        self, request: transfers_pb2.CreditRequest, context: _Context, principal: Principal
    ) -> transfers_pb2.CreditResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, principal, convert.credit, request
        )
        return transfers_pb2.CreditResponse(transfer=convert.transfer_pb(applied.transfer, scales))

    async def Debit(
        self, request: transfers_pb2.DebitRequest, context: _Context, principal: Principal
    ) -> transfers_pb2.DebitResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, principal, convert.debit, request
        )
        return transfers_pb2.DebitResponse(
            transfer=convert.transfer_pb(applied.transfer, scales),
            amount_debited=applied.transfer.amount,
            amount_remaining=applied.amount_remaining,
        )

    async def Transfer(
        self, request: transfers_pb2.TransferRequest, context: _Context, principal: Principal
    ) -> transfers_pb2.TransferResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, principal, convert.transfer, request
        )
        return transfers_pb2.TransferResponse(
            transfer=convert.transfer_pb(applied.transfer, scales)
        )

    async def Deposit(
        self, request: transfers_pb2.DepositRequest, context: _Context, principal: Principal
    ) -> transfers_pb2.DepositResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, principal, convert.deposit, request
        )
        return transfers_pb2.DepositResponse(transfer=convert.transfer_pb(applied.transfer, scales))

    async def Withdraw(
        self, request: transfers_pb2.WithdrawRequest, context: _Context, principal: Principal
    ) -> transfers_pb2.WithdrawResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, principal, convert.withdrawal, request
        )
        return transfers_pb2.WithdrawResponse(
            transfer=convert.transfer_pb(applied.transfer, scales)
        )

    async def Pay(
        self, request: transfers_pb2.PayRequest, context: _Context, principal: Principal
    ) -> transfers_pb2.PayResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, principal, convert.payment, request
        )
        return transfers_pb2.PayResponse(transfer=convert.transfer_pb(applied.transfer, scales))

    async def Void(
        self, request: transfers_pb2.VoidRequest, context: _Context, principal: Principal
    ) -> transfers_pb2.VoidResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, principal, convert.void, request
        )
        return transfers_pb2.VoidResponse(transfer=convert.transfer_pb(applied.transfer, scales))

    async def SubmitBatch(
        self, request: transfers_pb2.SubmitBatchRequest, context: _Context, principal: Principal
    ) -> transfers_pb2.SubmitBatchResponse:
        try:
            operations = convert.batch(request, principal)
            if principal.owner is not None:
                # A void or a resolution it may not make refuses the whole call, first.
                await self._ledger.check_owner_limits(operations)
            answers = await self._batcher.submit_all(operations, context.time_remaining())
        except errors.CofferError as error:
            await logs.batch_failed(context, principal.name, len(request.operations), error)
            raise
        await logs.batch_answered(context, principal.name, answers)
        response = transfers_pb2.SubmitBatchResponse()
        if request.compact:
            convert.fill_outcomes(response.outcomes, answers, _codes)
            return response
        scales = await self._ledger.unit_scales(convert.units_of(answers))
        add = response.results.add
        for answer in answers:
            convert.fill_operation_result(add(), answer, _codes, scales)
        return response

    async def GetTransfer(
        self, request: transfers_pb2.GetTransferRequest, context: _Context, principal: Principal
    ) -> transfers_pb2.GetTransferResponse:
        transfer_id = convert.required_id("transfer_id", request.transfer_id)
        transfer = await self._ledger.get_transfer(transfer_id)
        if not await _owns_any(
            self._ledger, principal, (transfer.source_wallet_id, transfer.target_wallet_id)
        ):
            raise errors.TransferNotFound(f"transfer {transfer_id} does not exist")
        scales = await self._ledger.unit_scales((transfer.unit,))
        return transfers_pb2.GetTransferResponse(transfer=convert.transfer_pb(transfer, scales))

    async def ListTransfers(
        self, request: transfers_pb2.ListTransfersRequest, context: _Context, principal: Principal
    ) -> transfers_pb2.ListTransfersResponse:
        where = convert.transfer_filter(request)
        if principal.owner is not None:
            # A merchant or customer reads the history of a wallet of its own; of another
            # owner's wallet, as of a missing one, it reads nothing.
            if where.wallet_id is None:
                raise errors.InvalidArgument(
                    "wallet_id", "is required of a merchant or customer: name a wallet of its own"
                )
            if not await _owns_any(self._ledger, principal, (where.wallet_id,)):
                return transfers_pb2.ListTransfersResponse()
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


@translate_errors(_described(holds_pb2, "HoldService"))
class HoldService:
    def __init__(self, ledger: Ledger, batcher: Batcher, gate: Gate) -> None:
        self._ledger = ledger
        self._batcher = batcher
        self.gate = gate

    async def PlaceHold(
        self, request: holds_pb2.PlaceHoldRequest, context: _Context, principal: Principal
    ) -> holds_pb2.PlaceHoldResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, principal, convert.place_hold, request
        )
        return _hold_response(holds_pb2.PlaceHoldResponse, applied, scales)

    async def CaptureHold(
        self, request: holds_pb2.CaptureHoldRequest, context: _Context, principal: Principal
    ) -> holds_pb2.CaptureHoldResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, principal, convert.capture_hold, request
        )
        return _hold_response(holds_pb2.CaptureHoldResponse, applied, scales)

    async def ReleaseHold(
        self, request: holds_pb2.ReleaseHoldRequest, context: _Context, principal: Principal
    ) -> holds_pb2.ReleaseHoldResponse:
        applied, scales = await _submit(
            self._ledger, self._batcher, context, principal, convert.release_hold, request
        )
        return _hold_response(holds_pb2.ReleaseHoldResponse, applied, scales)

    async def GetHold(
        self, request: holds_pb2.GetHoldRequest, context: _Context, principal: Principal
    ) -> holds_pb2.GetHoldResponse:
        hold_id = convert.required_id("hold_id", request.hold_id)
        hold = await self._ledger.get_hold(hold_id)
        if not await _owns_any(
            self._ledger, principal, (hold.source_wallet_id, hold.target_wallet_id)
        ):
            raise errors.HoldNotFound(f"hold {hold_id} does not exist")
        scales = await self._ledger.unit_scales((hold.unit,))
        return holds_pb2.GetHoldResponse(hold=convert.hold_pb(hold, scales))


@translate_errors(_described(grants_pb2, "GrantService"))
class GrantService:
    """Merchants and customers read the grants and future balance of their own wallets alone
    (another owner's wallet is not found, as a missing one); running an expiration is the
    staff's (`roles`)."""

    def __init__(self, ledger: Ledger, gate: Gate) -> None:
        self._ledger = ledger
        self.gate = gate

    async def ListGrants(
        self, request: grants_pb2.ListGrantsRequest, context: _Context, principal: Principal
    ) -> grants_pb2.ListGrantsResponse:
        wallet_id, include_spent = convert.grants_of(request)
        if not await _owns_any(self._ledger, principal, (wallet_id,)):
            raise errors.WalletNotFound(f"wallet {wallet_id} does not exist")
        scope = convert.page_scope("grants", wallet_id, include_spent)
        page = await self._ledger.list_grants(
            wallet_id,
            after_id=convert.cursor(request.page_token, scope) or 0,
            page_size=convert.page_size(request.page_size),
            include_spent=include_spent,
        )
        scales = await self._ledger.unit_scales({grant.unit for grant in page.items})
        return grants_pb2.ListGrantsResponse(
            grants=[convert.grant_pb(grant, scales) for grant in page.items],
            next_page_token=convert.page_token(page.cursor, scope),
        )

    async def GetFutureBalance(
        self,
        request: grants_pb2.GetFutureBalanceRequest,
        context: _Context,
        principal: Principal,
    ) -> grants_pb2.GetFutureBalanceResponse:
        at = convert.future_time(request)
        wallet = await _visible_wallet(self._ledger, request.wallet_id, principal)
        balance = await self._ledger.balance_at(wallet.id, at)
        scales = await self._ledger.unit_scales((wallet.unit,))
        return grants_pb2.GetFutureBalanceResponse(
            wallet_id=wallet.id,
            unit=wallet.unit,
            time=request.time,
            balance=convert.balance_pb(balance, wallet.unit, scales),
        )

    async def RunExpiration(
        self, request: grants_pb2.RunExpirationRequest, context: _Context, principal: Principal
    ) -> grants_pb2.RunExpirationResponse:
        return grants_pb2.RunExpirationResponse(expired_count=await self._ledger.expire_grants())


@translate_errors(_described(access_pb2, "AccessService"))
class AccessService:
    """The credentials; administrators only (`roles`). What this server makes or revokes
    takes effect here at once (`Gate`), elsewhere within the gate's cache time."""

    def __init__(self, access: Access, gate: Gate) -> None:
        self._access = access
        self.gate = gate

    async def CreateApiKey(
        self, request: access_pb2.CreateApiKeyRequest, context: _Context, principal: Principal
    ) -> access_pb2.CreateApiKeyResponse:
        secret, key = await self._access.create_key(
            name=request.name,
            role=convert.role(request.role),
            owner_id=request.owner_id or None,
            expires_at=convert.expires_at(request),
            created_by=principal.name,
            actor=principal.scope,
        )
        self.gate.credentials_made()
        return access_pb2.CreateApiKeyResponse(api_key=secret, key=convert.api_key_pb(key))

    async def ListApiKeys(
        self, request: access_pb2.ListApiKeysRequest, context: _Context, principal: Principal
    ) -> access_pb2.ListApiKeysResponse:
        scope = convert.page_scope("api_keys")
        page = await self._access.list_keys(
            page_size=convert.page_size(request.page_size),
            after_id=convert.cursor(request.page_token, scope) or 0,
        )
        return access_pb2.ListApiKeysResponse(
            keys=[convert.api_key_pb(key) for key in page.items],
            next_page_token=convert.page_token(page.cursor, scope),
        )

    async def RevokeApiKey(
        self, request: access_pb2.RevokeApiKeyRequest, context: _Context, principal: Principal
    ) -> access_pb2.RevokeApiKeyResponse:
        key = await self._access.revoke_key(
            convert.required_id("key_id", request.key_id), actor=principal.scope
        )
        self.gate.forget_key(key.id)
        return access_pb2.RevokeApiKeyResponse(key=convert.api_key_pb(key))

    async def MapCertificate(
        self, request: access_pb2.MapCertificateRequest, context: _Context, principal: Principal
    ) -> access_pb2.MapCertificateResponse:
        mapping = await self._access.map_certificate(
            subject=request.subject,
            name=request.name,
            role=convert.role(request.role),
            owner_id=request.owner_id or None,
            created_by=principal.name,
            actor=principal.scope,
        )
        self.gate.credentials_made()
        self.gate.forget_certificate(mapping.subject)
        return access_pb2.MapCertificateResponse(mapping=convert.certificate_mapping_pb(mapping))

    async def UnmapCertificate(
        self, request: access_pb2.UnmapCertificateRequest, context: _Context, principal: Principal
    ) -> access_pb2.UnmapCertificateResponse:
        mapping = await self._access.unmap_certificate(request.subject, actor=principal.scope)
        self.gate.forget_certificate(mapping.subject)
        return access_pb2.UnmapCertificateResponse(mapping=convert.certificate_mapping_pb(mapping))

    async def ListCertificateMappings(
        self,
        request: access_pb2.ListCertificateMappingsRequest,
        context: _Context,
        principal: Principal,
    ) -> access_pb2.ListCertificateMappingsResponse:
        scope = convert.page_scope("certificate_mappings")
        mappings, cursor = await self._access.list_certificates(
            page_size=convert.page_size(request.page_size),
            after_id=convert.cursor(request.page_token, scope) or 0,
        )
        return access_pb2.ListCertificateMappingsResponse(
            mappings=[convert.certificate_mapping_pb(mapping) for mapping in mappings],
            next_page_token=convert.page_token(cursor, scope),
        )


@translate_errors(_described(events_pb2, "EventService"))
class EventService:
    """Merchants and customers see the events of their own wallets alone (the ledger's owner
    scope), whatever their filter asks."""

    def __init__(
        self,
        ledger: Ledger,
        listener: Listener,
        gate: Gate,
        behind: EventsBehind | None = None,
    ) -> None:
        self._ledger = ledger
        self._listener = listener
        self.gate = gate
        # Where each watcher says how far behind the stream's head it is (with metrics on).
        self._behind = behind
        # Watchers at once, by principal (scope).
        self._watching: dict[str, int] = {}

    async def ListEvents(
        self, request: events_pb2.ListEventsRequest, context: _Context, principal: Principal
    ) -> events_pb2.ListEventsResponse:
        page = await self._ledger.list_events(
            convert.event_cursor(request.after_cursor),
            page_size=convert.page_size(request.page_size),
            where=convert.event_filter(request.filter),
            owner_scope=principal.owner,
            hidden_types=_hidden_event_types(principal),
        )
        scales = await self._ledger.unit_scales(convert.units_of_events(page.events))
        return events_pb2.ListEventsResponse(
            events=[convert.event_pb(event, scales) for event in page.events],
            next_cursor=page.cursor.text,
            caught_up=page.caught_up,
        )

    async def WatchEvents(
        self, request: events_pb2.WatchEventsRequest, context: _Context, principal: Principal
    ) -> AsyncGenerator[events_pb2.WatchEventsResponse, None]:
        listener = self._listener
        read_through = 0
        scope = principal.scope
        watching = self._watching.get(scope, 0)
        if watching >= model.events_watchers_per_principal_max:
            raise errors.Overloaded(
                f"{watching} watchers of this principal follow the events already: end one first",
                retry_after_ms=watchers_retry_after_ms,
            )

        def progress(position: int) -> None:
            nonlocal read_through
            read_through = position

        events = self._ledger.watch_events(
            convert.event_cursor(request.after_cursor),
            listener,
            where=convert.event_filter(request.filter),
            owner_scope=principal.owner,
            hidden_types=_hidden_event_types(principal),
            progress=progress,
        )
        self._watching[scope] = watching + 1
        stop_counting = None
        try:
            if self._behind is not None:
                stop_counting = self._behind.add(lambda: max(listener.head - read_through, 0))
            async with aclosing(events):
                async for event in events:
                    scales = await self._ledger.unit_scales(convert.units_of_events((event,)))
                    yield events_pb2.WatchEventsResponse(event=convert.event_pb(event, scales))
        finally:
            if stop_counting is not None:
                stop_counting()
            left = self._watching[scope] - 1
            if left:
                self._watching[scope] = left
            else:
                del self._watching[scope]


@translate_errors(_described(reports_pb2, "ReportService"))
class ReportService:
    """Merchants and customers read the usage of their own wallets alone (the owner filter is
    theirs, whatever they ask), and the past balances of their own wallets; the outstanding
    overview is not theirs (`roles`)."""

    def __init__(self, ledger: Ledger, gate: Gate) -> None:
        self._ledger = ledger
        self.gate = gate

    async def ListUsage(
        self, request: reports_pb2.ListUsageRequest, context: _Context, principal: Principal
    ) -> reports_pb2.ListUsageResponse:
        where = convert.usage_filter(request.filter)
        owner = principal.owner
        if owner is not None:
            # A merchant or customer reads the usage of its own wallets: of another owner's,
            # it reads none.
            if where.owner_id not in (None, owner.id):
                return reports_pb2.ListUsageResponse()
            where = replace(where, owner_id=owner.id, owner_kind=owner.kind)
        scope = convert.page_scope("usage", where)
        page = await self._ledger.list_usage(
            where,
            page_size=convert.page_size(request.page_size),
            before_id=convert.cursor(request.page_token, scope),
        )
        scales = await self._ledger.unit_scales({entry.transfer.unit for entry in page.items})
        return reports_pb2.ListUsageResponse(
            entries=[convert.usage_entry_pb(entry, scales) for entry in page.items],
            next_page_token=convert.page_token(page.cursor, scope),
        )

    async def GetOutstanding(
        self, request: reports_pb2.GetOutstandingRequest, context: _Context, principal: Principal
    ) -> reports_pb2.GetOutstandingResponse:
        model.check_unit_code("unit", request.unit)
        scope = convert.page_scope("outstanding", request.unit, request.expiring_within_days)
        page = await self._ledger.outstanding(
            request.unit,
            expiring_within_days=request.expiring_within_days,
            page_size=convert.page_size(request.page_size),
            after_id=convert.cursor(request.page_token, scope) or 0,
        )
        scales = await self._ledger.unit_scales((page.unit,))
        return convert.outstanding_pb(page, scales, convert.page_token(page.cursor, scope))

    async def GetPastBalance(
        self, request: reports_pb2.GetPastBalanceRequest, context: _Context, principal: Principal
    ) -> reports_pb2.GetPastBalanceResponse:
        asked = convert.past_balance_request(request)
        if not await _owns_any(self._ledger, principal, (asked.wallet_id,)):
            raise errors.WalletNotFound(f"wallet {asked.wallet_id} does not exist")
        balance = await self._ledger.past_balance(asked.wallet_id, asked.at)
        scales = await self._ledger.unit_scales((balance.unit,))
        return convert.past_balance_pb(balance, scales)


def _hidden_event_types(principal: Principal) -> frozenset[model.EventType]:
    """The events a principal may not see: the audit trail of access, but to its readers."""
    if principal.role in roles.audit_readers:
        return frozenset()
    return model.access_event_types


async def _submit(
    ledger: Ledger,
    batcher: Batcher,
    context: _Context,
    principal: Principal,
    operation: Callable[[_Request, Principal], model.Operation],
    request: _Request,
) -> tuple[model.Applied, Mapping[str, int]]:
    """Applies the operation a request asks for, as the principal; returns what it applied
    and the scales of its units, for the answer. A replayed answer says so in the trailing
    metadata (a replayed refusal too, through `errors.translate_errors`)."""
    applied = await batcher.submit(operation(request, principal), context.time_remaining())
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
