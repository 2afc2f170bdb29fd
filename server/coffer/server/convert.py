"""Protobuf messages to core values and back; nothing else.

The one module that converts requests, and so the one that checks them: requests become core
values, whose constructors check every field (raising InvalidArgument naming it), and what is
not a core value (a list's filters, an id to look up, a page token) is checked here, by the
core's rules where it has them (`model.check_unit_code`, `model.check_text`). Proto3 cannot
tell an unset number from zero, so an unset id or amount arrives as 0 and is refused as
missing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from enum import IntEnum
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, Protocol, TypeVar, cast

from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import code_pb2

from coffer.core import errors, model, rules
from coffer.core.model import TransferFilter, batch_operations_max, page_size_default, page_size_max
from coffer.v1 import (
    access_pb2,
    events_pb2,
    grants_pb2,
    holds_pb2,
    reports_pb2,
    transfers_pb2,
    types_pb2,
    units_pb2,
    wallets_pb2,
)

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

__all__ = [
    "BalanceAlert",
    "PastBalanceRequest",
    "WalletFilter",
    "api_key_pb",
    "balance_alert",
    "balance_pb",
    "batch",
    "capture_hold",
    "certificate_mapping_pb",
    "credit",
    "cursor",
    "debit",
    "deposit",
    "event_cursor",
    "event_filter",
    "event_pb",
    "expires_at",
    "fill_operation_result",
    "fill_outcomes",
    "future_time",
    "grant_pb",
    "grants_of",
    "hold_pb",
    "new_wallet",
    "outstanding_pb",
    "page_scope",
    "page_size",
    "page_token",
    "past_balance_pb",
    "past_balance_request",
    "payment",
    "place_hold",
    "release_hold",
    "required_id",
    "role",
    "transfer",
    "transfer_filter",
    "transfer_pb",
    "unit",
    "unit_code",
    "unit_pb",
    "units_of",
    "units_of_events",
    "usage_entry_pb",
    "usage_filter",
    "void",
    "wallet_filter",
    "wallet_pb",
    "withdrawal",
]

_Member = TypeVar("_Member", bound=IntEnum)
_Number = TypeVar("_Number", bound=int)


class _Enum(Generic[_Member, _Number]):
    """One enum on both sides: the core's IntEnum and the proto's enum, which number their
    members alike (tests/server/test_enums.py holds them, and the database's values,
    together), so that converting is a lookup each way, typed as each side types its values."""

    __slots__ = ("_core", "_members", "_numbers")

    def __init__(self, core: type[_Member], proto: _EnumTypeWrapper[_Number]) -> None:
        self._core = core
        self._members = {int(member): member for member in core}
        self._numbers = {int(number): number for number in proto.values()}
        missing = sorted(set(core) - self._numbers.keys())
        assert not missing, f"{proto.DESCRIPTOR.full_name} has no numbers {missing}"

    def to_core(self, number: int) -> _Member:
        """A request's number as the core's member. Proto3 lets any number through (and 0,
        UNSPECIFIED, when the field is unset): one that names no member goes on as it is, for
        the model to refuse by its own rule for that field, in the order it checks its fields,
        as it checks a value from any other caller."""
        return self._members.get(number, cast(_Member, number))

    def to_core_checked(self, field: str, number: int) -> _Member:
        """As `to_core`, for a number no model class checks (a filter's): one that names no
        member is INVALID_ARGUMENT on `field`, by the core's rule for enums."""
        model.check_enum(field, number, self._core)
        return self._core(number)

    def to_proto(self, member: _Member) -> _Number:
        return self._numbers[member]


_unit_kinds = _Enum(model.UnitKind, types_pb2.UnitKind)
_owner_kinds = _Enum(model.OwnerKind, types_pb2.OwnerKind)
_wallet_statuses = _Enum(model.WalletStatus, types_pb2.WalletStatus)
_transfer_kinds = _Enum(model.TransferKind, types_pb2.TransferKind)
_hold_statuses = _Enum(model.HoldStatus, types_pb2.HoldStatus)
_roles = _Enum(model.Role, access_pb2.Role)
_event_types = _Enum(model.EventType, events_pb2.EventType)

# Requests --------------------------------------------------------------------------------------


def unit(request: units_pb2.CreateUnitRequest) -> model.Unit:
    return model.Unit(
        code=request.code,
        kind=_unit_kinds.to_core(request.kind),
        name=request.name,
        plural=request.plural,
        description=request.description,
        scale=request.scale,
        default_validity=request.default_validity,
    )


def unit_code(request: units_pb2.GetUnitRequest) -> str:
    model.check_unit_code("code", request.code)
    return request.code


def required_id(field: str, value: int) -> int:
    """An id a request must name (proto3 sends an unset one as 0), by the core's rule."""
    model.check_id(field, value)
    return value


def new_wallet(
    request: wallets_pb2.CreateWalletRequest, principal: model.Principal
) -> model.NewWallet:
    return model.NewWallet(
        idempotency_key=request.idempotency_key,
        caller=principal.scope,
        owner_id=request.owner_id,
        owner_kind=_owner_kinds.to_core(request.owner_kind),
        unit=request.unit,
        balance_minimum=request.balance_minimum if request.HasField("balance_minimum") else 0,
        metadata=dict(request.metadata),
        low_balance_threshold=(
            request.low_balance_threshold if request.HasField("low_balance_threshold") else None
        ),
        top_up_to=request.top_up_to if request.HasField("top_up_to") else None,
    )


class BalanceAlert(NamedTuple):
    """SetBalanceAlert's request: the wallet, and its alert (None: none)."""

    wallet_id: int
    low_balance_threshold: int | None
    top_up_to: int | None


def balance_alert(request: wallets_pb2.SetBalanceAlertRequest) -> BalanceAlert:
    wallet_id = required_id("wallet_id", request.wallet_id)
    alert = BalanceAlert(
        wallet_id,
        request.low_balance_threshold if request.HasField("low_balance_threshold") else None,
        request.top_up_to if request.HasField("top_up_to") else None,
    )
    # Checked by the ledger (`model.check_balance_alert`), which names the fields alike.
    return alert


def event_cursor(text: str) -> model.EventCursor | None:
    """A request's `after_cursor`: None for empty (the oldest kept)."""
    return model.EventCursor.parse(text, "after_cursor")


def event_filter(pb: events_pb2.EventFilter) -> model.EventFilter:
    """A filter of events, in one form however a request lists its sets."""
    if len(pb.wallet_ids) > model.event_filter_wallets_max:
        raise errors.InvalidArgument(
            "filter.wallet_ids", f"must name at most {model.event_filter_wallets_max} wallets"
        )
    for wallet_id in pb.wallet_ids:
        model.check_id("filter.wallet_ids", wallet_id)
    model.check_text("filter.owner_id", pb.owner_id, model.owner_id_length_max)
    return model.EventFilter(
        wallet_ids=tuple(sorted(set(pb.wallet_ids))),
        owner_id=pb.owner_id or None,
        types=tuple(
            sorted({_event_types.to_core_checked("filter.types", each) for each in pb.types})
        ),
    )


class _Annotated(Protocol):
    """What every operation request carries."""

    @property
    def idempotency_key(self) -> str: ...
    @property
    def note(self) -> str: ...
    @property
    def performed_by(self) -> str: ...
    @property
    def metadata(self) -> Mapping[str, str]: ...


_no_metadata: Mapping[str, str] = MappingProxyType({})


def _common(
    request: _Annotated, principal: model.Principal, linked: bool, reference: str = ""
) -> dict[str, Any]:
    return {
        "idempotency_key": request.idempotency_key,
        "caller": principal.scope,
        "note": request.note,
        "reference": reference,
        "performed_by": request.performed_by or principal.name,
        "metadata": dict(request.metadata) if request.metadata else _no_metadata,
        "linked": linked,
        "owner_limit": principal.owner,
    }


class _Terms(Protocol):
    """What a request that brings funds in from outside says of their terms."""

    @property
    def valid_from(self) -> Timestamp: ...
    @property
    def expires_at(self) -> Timestamp: ...
    def HasField(self, field_name: Any) -> bool: ...


def _optional_time(request: _Terms, field: str) -> datetime | None:
    """A request's time field: None when unset."""
    if not request.HasField(field):
        return None
    value: Timestamp = getattr(request, field)
    return _time(value, field)


def credit(
    request: transfers_pb2.CreditRequest, principal: model.Principal, linked: bool = False
) -> model.Credit:
    return model.Credit(
        wallet_id=request.wallet_id,
        amount=request.amount,
        valid_from=_optional_time(request, "valid_from"),
        expires_at=_optional_time(request, "expires_at"),
        **_common(request, principal, linked, request.reference),
    )


_debit_modes = {
    types_pb2.DEBIT_MODE_UNSPECIFIED: model.DebitMode.all_or_nothing,
    types_pb2.DEBIT_MODE_ALL_OR_NOTHING: model.DebitMode.all_or_nothing,
    types_pb2.DEBIT_MODE_UP_TO: model.DebitMode.up_to,
}


def debit(
    request: transfers_pb2.DebitRequest, principal: model.Principal, linked: bool = False
) -> model.Debit:
    if request.mode not in _debit_modes:
        raise errors.InvalidArgument("mode", "must be ALL_OR_NOTHING or UP_TO")
    return model.Debit(
        wallet_id=request.wallet_id,
        amount=request.amount,
        mode=_debit_modes[request.mode],
        **_common(request, principal, linked, request.reference),
    )


def transfer(
    request: transfers_pb2.TransferRequest, principal: model.Principal, linked: bool = False
) -> model.WalletTransfer:
    return model.WalletTransfer(
        source_wallet_id=request.source_wallet_id,
        target_wallet_id=request.target_wallet_id,
        amount=request.amount,
        **_common(request, principal, linked, request.reference),
    )


def deposit(
    request: transfers_pb2.DepositRequest, principal: model.Principal, linked: bool = False
) -> model.Deposit:
    return model.Deposit(
        wallet_id=request.wallet_id,
        amount=request.amount,
        valid_from=_optional_time(request, "valid_from"),
        expires_at=_optional_time(request, "expires_at"),
        **_common(request, principal, linked, request.funding_source),
    )


def withdrawal(
    request: transfers_pb2.WithdrawRequest, principal: model.Principal, linked: bool = False
) -> model.Withdrawal:
    return model.Withdrawal(
        wallet_id=request.wallet_id,
        amount=request.amount,
        **_common(request, principal, linked, request.funding_source),
    )


def payment(
    request: transfers_pb2.PayRequest, principal: model.Principal, linked: bool = False
) -> model.Payment:
    return model.Payment(
        payer_wallet_id=request.payer_wallet_id,
        payee_wallet_id=request.payee_wallet_id,
        amount=request.amount,
        **_common(request, principal, linked, request.reference),
    )


def void(
    request: transfers_pb2.VoidRequest, principal: model.Principal, linked: bool = False
) -> model.Void:
    expires_at = _time(request.expires_at, "expires_at") if request.HasField("expires_at") else None
    return model.Void(
        transfer_id=request.transfer_id,
        expires_at=expires_at,
        **_common(request, principal, linked),
    )


def place_hold(
    request: holds_pb2.PlaceHoldRequest, principal: model.Principal, linked: bool = False
) -> model.PlaceHold:
    timeout_s = model.hold_timeout_s_default
    if request.HasField("timeout"):
        if request.timeout.nanos:
            raise errors.InvalidArgument("timeout", "must be whole seconds")
        timeout_s = request.timeout.seconds
    return model.PlaceHold(
        wallet_id=request.wallet_id,
        target_wallet_id=request.target_wallet_id or None,
        amount=request.amount,
        timeout_s=timeout_s,
        **_common(request, principal, linked, request.reference),
    )


def capture_hold(
    request: holds_pb2.CaptureHoldRequest, principal: model.Principal, linked: bool = False
) -> model.CaptureHold:
    return model.CaptureHold(
        hold_id=request.hold_id,
        amount=request.amount if request.HasField("amount") else None,
        **_common(request, principal, linked, request.reference),
    )


def release_hold(
    request: holds_pb2.ReleaseHoldRequest, principal: model.Principal, linked: bool = False
) -> model.ReleaseHold:
    return model.ReleaseHold(hold_id=request.hold_id, **_common(request, principal, linked))


_operation_builders: dict[str, Callable[[Any, model.Principal, bool], model.Operation]] = {
    "credit": credit,
    "debit": debit,
    "transfer": transfer,
    "deposit": deposit,
    "withdraw": withdrawal,
    "pay": payment,
    "void": void,
    "place_hold": place_hold,
    "capture_hold": capture_hold,
    "release_hold": release_hold,
}


def _operation(
    pb: transfers_pb2.Operation, principal: model.Principal
) -> model.Operation | model.Rejected:
    """One operation of a batch; one that cannot be built is Rejected, not raised, so the rest
    of the batch goes on."""
    which = pb.WhichOneof("operation")
    try:
        if which is None:
            raise errors.InvalidArgument("operation", "is empty: set one of its kinds")
        return _operation_builders[which](getattr(pb, which), principal, pb.linked)
    except errors.CofferError as error:
        return model.Rejected(error, linked=pb.linked)


class WalletFilter(NamedTuple):
    """ListWallets' filters; None: any."""

    owner_id: str | None
    owner_kind: model.OwnerKind | None
    unit: str | None


def wallet_filter(request: wallets_pb2.ListWalletsRequest) -> WalletFilter:
    model.check_text("owner_id", request.owner_id, model.owner_id_length_max)
    if request.unit:
        model.check_unit_code("unit", request.unit)
    owner_kind = (
        _owner_kinds.to_core_checked("owner_kind", request.owner_kind)
        if request.owner_kind
        else None
    )
    return WalletFilter(
        owner_id=request.owner_id or None,
        owner_kind=owner_kind,
        unit=request.unit or None,
    )


def batch(
    request: transfers_pb2.SubmitBatchRequest, principal: model.Principal
) -> list[model.Operation | model.Rejected]:
    """A batch's operations, as they may be applied (`rules.seal`); one that cannot be built
    is Rejected, the rest go on."""
    count = len(request.operations)
    if not 0 < count <= batch_operations_max:
        raise errors.InvalidArgument(
            "operations", f"must hold 1 to {batch_operations_max} operations, not {count}"
        )
    return rules.seal([_operation(each, principal) for each in request.operations])


def transfer_filter(request: transfers_pb2.ListTransfersRequest) -> TransferFilter:
    if request.wallet_id < 0:
        raise errors.InvalidArgument("wallet_id", "must be a positive id, or 0 for all")
    model.check_text("reference", request.reference, model.reference_length_max)
    start = _time(request.start_time, "start_time") if request.HasField("start_time") else None
    end = _time(request.end_time, "end_time") if request.HasField("end_time") else None
    # [start, end) is half-open: end == start is an empty range, allowed; end < start is not.
    if start is not None and end is not None and end < start:
        raise errors.InvalidArgument("end_time", "must not be before start_time")
    return TransferFilter(
        wallet_id=request.wallet_id or None,
        kinds=_kinds_in_order(list(request.kinds)),
        start=start,
        end=end,
        reference=request.reference or None,
    )


def _kinds_in_order(kinds: list[int]) -> tuple[model.TransferKind, ...]:
    """A set of kinds, in one order: the same filter however a request lists it."""
    return tuple(sorted({_transfer_kinds.to_core_checked("kinds", kind) for kind in kinds}))


def usage_filter(pb: reports_pb2.UsageFilter) -> model.UsageFilter:
    """ListUsage's filter, checked by the core's rules, each field named as in the request."""
    if pb.wallet_id < 0:
        raise errors.InvalidArgument("filter.wallet_id", "must be a positive id, or 0 for any")
    model.check_text("filter.owner_id", pb.owner_id, model.owner_id_length_max)
    if pb.unit:
        model.check_unit_code("filter.unit", pb.unit)
    model.check_text("filter.performed_by", pb.performed_by, model.performed_by_length_max)
    model.check_text("filter.reference", pb.reference, model.reference_length_max)
    start = _time(pb.start_time, "filter.start_time") if pb.HasField("start_time") else None
    end = _time(pb.end_time, "filter.end_time") if pb.HasField("end_time") else None
    if start is not None and end is not None and end < start:
        raise errors.InvalidArgument("filter.end_time", "must not be before start_time")
    return model.UsageFilter(
        wallet_id=pb.wallet_id or None,
        owner_id=pb.owner_id or None,
        unit=pb.unit or None,
        performed_by=pb.performed_by or None,
        start=start,
        end=end,
        reference=pb.reference or None,
    )


class PastBalanceRequest(NamedTuple):
    """GetPastBalance's request: the wallet, and the instant."""

    wallet_id: int
    at: datetime


def past_balance_request(request: reports_pb2.GetPastBalanceRequest) -> PastBalanceRequest:
    wallet_id = required_id("wallet_id", request.wallet_id)
    if not request.HasField("time"):
        raise errors.InvalidArgument("time", "is required")
    return PastBalanceRequest(wallet_id, _time(request.time, "time"))


def role(number: int) -> model.Role:
    """A request's role: unspecified or unknown is INVALID_ARGUMENT on `role`."""
    return _roles.to_core_checked("role", number)


def expires_at(request: access_pb2.CreateApiKeyRequest) -> datetime | None:
    return _time(request.expires_at, "expires_at") if request.HasField("expires_at") else None


def future_time(request: grants_pb2.GetFutureBalanceRequest) -> datetime:
    """GetFutureBalance's time, required. (That it is to come is the ledger's to check, by
    its clock.)"""
    if not request.HasField("time"):
        raise errors.InvalidArgument("time", "is required: a time to come")
    return _time(request.time, "time")


def _time(pb: Timestamp, field: str) -> datetime:
    try:
        return pb.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError):
        raise errors.InvalidArgument(field, "must be a time from year 1 to 9999") from None


# Page tokens: opaque to clients. One carries the cursor where the next page starts (an id, as
# 8 bytes) and a digest of the list and the filters it was issued for (`page_scope`), so that
# it pages through the same list only: a token of another list or of other filters is refused,
# as is anything malformed or out of range. The digest is not a secret: a token grants nothing
# a request could not ask for directly.
page_scope_size = 8
_cursor_size = 8
_page_token_length = len(
    base64.urlsafe_b64encode(bytes(_cursor_size + page_scope_size)).rstrip(b"=")
)


def page_scope(list_name: str, *filters: object) -> bytes:
    """A digest of a list and the (converted, checked) filters of one request."""
    return hashlib.blake2b(
        repr((list_name, *filters)).encode(), digest_size=page_scope_size
    ).digest()


def page_token(cursor: int | None, scope: bytes) -> str:
    """The token of the page that starts after `cursor`; empty when there is none."""
    if cursor is None:
        return ""
    assert 0 < cursor <= model.id_max and len(scope) == page_scope_size, (cursor, scope)
    raw = cursor.to_bytes(_cursor_size, "big") + scope
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def cursor(token: str, scope: bytes) -> int | None:
    """The cursor of a token this list issued for these filters; None for no token (the first
    page). Anything else is INVALID_ARGUMENT on `page_token`."""
    if not token:
        return None
    if len(token) == _page_token_length:
        try:
            raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        value = int.from_bytes(raw[:_cursor_size], "big")
        if (
            len(raw) == _cursor_size + page_scope_size
            and 0 < value <= model.id_max
            and raw[_cursor_size:] == scope
            and page_token(value, scope) == token
        ):
            return value
    raise errors.InvalidArgument(
        "page_token", "is not a token this list returned for these filters"
    )


def page_size(size: int) -> int:
    if size == 0:
        return page_size_default
    if not 0 < size <= page_size_max:
        raise errors.InvalidArgument("page_size", f"must be 1 to {page_size_max}")
    return size


# Replies ---------------------------------------------------------------------------------------
#
# Every amount goes out with its unit's scale, so that an answer prints by itself ("25.99 EUR").
# The replies take the scales of their units (`scales`, from `Ledger.unit_scales`, which reads
# each unit once per process) rather than look them up: converting stays free of I/O.


def units_of(outcomes: Iterable[model.Applied | errors.CofferError]) -> set[str]:
    """The units of what a batch applied: those whose scales its answer needs."""
    return {
        transfer.unit
        for outcome in outcomes
        if isinstance(outcome, model.Applied)
        for transfer in outcome.transfers
    }


_last_timestamp: tuple[datetime, Timestamp] | None = None


def _timestamp(value: datetime) -> Timestamp:
    # The transfers of a batch share one time: convert it once.
    global _last_timestamp
    if _last_timestamp is not None and _last_timestamp[0] == value:
        return _last_timestamp[1]
    stamp = Timestamp()
    stamp.FromDatetime(value)
    _last_timestamp = (value, stamp)
    return stamp


def unit_pb(value: model.Unit) -> types_pb2.Unit:
    pb = types_pb2.Unit(
        code=value.code,
        kind=_unit_kinds.to_proto(value.kind),
        name=value.name,
        plural=value.plural,
        description=value.description,
        scale=value.scale,
        default_validity=value.default_validity,
    )
    if value.created_at is not None:
        pb.create_time.CopyFrom(_timestamp(value.created_at))
    return pb


def balance_pb(value: model.Balance, unit: str, scales: Mapping[str, int]) -> types_pb2.Balance:
    """A balance with its unit and the unit's scale (`scales`: what `Ledger.unit_scales`
    gave for the answer's units), so that it reads by itself."""
    return types_pb2.Balance(
        posted=value.posted,
        pending=value.pending,
        available=value.available,
        unspendable=value.unspendable,
        unit=unit,
        unit_scale=scales[unit],
    )


def wallet_pb(value: model.Wallet, scales: Mapping[str, int]) -> types_pb2.Wallet:
    pb = types_pb2.Wallet(
        id=value.id,
        owner_id=value.owner_id,
        owner_kind=_owner_kinds.to_proto(value.owner_kind),
        unit=value.unit,
        status=_wallet_statuses.to_proto(value.status),
        balance=balance_pb(value.balance, value.unit, scales),
        metadata=value.metadata,
        create_time=_timestamp(value.created_at),
    )
    if value.balance_minimum is not None:
        pb.balance_minimum = value.balance_minimum
    if value.low_balance_threshold is not None:
        pb.low_balance_threshold = value.low_balance_threshold
    if value.top_up_to is not None:
        pb.top_up_to = value.top_up_to
    return pb


def transfer_pb(value: model.Transfer, scales: Mapping[str, int]) -> types_pb2.Transfer:
    pb = types_pb2.Transfer()
    _fill_transfer(pb, value, scales)
    return pb


def _fill_transfer(
    pb: types_pb2.Transfer, value: model.Transfer, scales: Mapping[str, int]
) -> None:
    """Sets a transfer into a message in place (a batch's results are built where they stand,
    not copied in), and only what is set: protobuf charges for every field given."""
    pb.id = value.id
    pb.operation_id = value.operation_id
    pb.kind = _transfer_kinds.to_proto(value.kind)
    pb.source_wallet_id = value.source_wallet_id
    pb.target_wallet_id = value.target_wallet_id
    pb.unit = value.unit
    pb.amount = value.amount
    scale = scales[value.unit]
    if scale:
        pb.unit_scale = scale
    pb.create_time.CopyFrom(_timestamp(value.created_at))
    if value.amount_requested is not None:
        pb.amount_requested = value.amount_requested
    if value.allocations:
        add = pb.allocations.add
        for allocation in value.allocations:
            add(grant_id=allocation.grant_id, amount=allocation.amount)
    if value.note:
        pb.note = value.note
    if value.reference:
        pb.reference = value.reference
    if value.performed_by:
        pb.performed_by = value.performed_by
    if value.metadata:
        pb.metadata.update(value.metadata)
    if value.voids_transfer_id is not None:
        pb.voids_transfer_id = value.voids_transfer_id
    if value.hold_id is not None:
        pb.hold_id = value.hold_id
    if value.voided_by_transfer_id is not None:
        pb.voided_by_transfer_id = value.voided_by_transfer_id
    if value.hold_expires_at is not None:
        pb.hold_expire_time.CopyFrom(_timestamp(value.hold_expires_at))
    if value.balance_after is not None:
        pb.balance_after = value.balance_after
    if value.signed_amount is not None:
        pb.signed_amount = value.signed_amount


def hold_pb(value: model.Hold, scales: Mapping[str, int]) -> types_pb2.Hold:
    return types_pb2.Hold(
        id=value.id,
        source_wallet_id=value.source_wallet_id,
        target_wallet_id=value.target_wallet_id,
        unit=value.unit,
        unit_scale=scales[value.unit],
        amount=value.amount,
        status=_hold_statuses.to_proto(value.status),
        expire_time=_timestamp(value.expires_at),
        resolved_by_transfer_id=value.resolved_by_transfer_id or 0,
        amount_captured=value.amount_captured,
        create_time=_timestamp(value.created_at),
    )


def fill_operation_result(
    pb: transfers_pb2.OperationResult,
    outcome: model.Applied | errors.CofferError,
    code_of: dict[errors.Category, int],
    scales: Mapping[str, int],
) -> None:
    if outcome.replayed:
        pb.replayed = True
    if isinstance(outcome, errors.CofferError):
        _fill_operation_error(pb.error, outcome, code_of)
        return
    for each in outcome.transfers:
        _fill_transfer(pb.transfers.add(), each, scales)
    if outcome.amount_remaining:
        pb.amount_remaining = outcome.amount_remaining
    if outcome.hold is not None:
        pb.hold.CopyFrom(hold_pb(outcome.hold, scales))


def _fill_operation_error(
    pb: transfers_pb2.OperationError,
    error: errors.CofferError,
    code_of: dict[errors.Category, int],
) -> None:
    pb.reason = error.reason
    pb.message = error.message
    # googleapis-common-protos types google.rpc.Code's values as a subclass of int.
    pb.status_code = cast(code_pb2.Code, code_of[error.category])
    # The same code, for clients built before `status_code`.
    pb.code = pb.status_code
    if isinstance(error, errors.InvalidArgument):
        pb.field = error.field


def fill_outcomes(
    pb: transfers_pb2.BatchOutcomes,
    outcomes: Sequence[model.Applied | errors.CofferError],
    code_of: dict[errors.Category, int],
) -> None:
    """A compact batch's answer: the columns of BatchOutcomes, each filled at once."""
    transfer_ids = []
    remaining = []
    replayed = []
    add_failed = pb.failed.add
    for index, outcome in enumerate(outcomes):
        replayed.append(outcome.replayed)
        if isinstance(outcome, errors.CofferError):
            transfer_ids.append(0)
            remaining.append(0)
            _fill_operation_error(add_failed(index=index).error, outcome, code_of)
        else:
            transfer_ids.append(outcome.transfers[0].id)
            remaining.append(outcome.amount_remaining)
    pb.transfer_ids.extend(transfer_ids)
    if any(remaining):
        pb.amounts_remaining.extend(remaining)
    if any(replayed):
        pb.replayed.extend(replayed)


def grant_pb(value: model.Grant, scales: Mapping[str, int]) -> types_pb2.Grant:
    pb = types_pb2.Grant(
        id=value.id,
        wallet_id=value.wallet_id,
        unit=value.unit,
        unit_scale=scales[value.unit],
        transfer_id=value.transfer_id,
        amount=value.amount,
        remaining=value.remaining,
        valid_from=_timestamp(value.valid_from),
        expired=value.expired,
        create_time=_timestamp(value.created_at),
    )
    if value.expires_at is not None:
        pb.expires_at.CopyFrom(_timestamp(value.expires_at))
    return pb


def grants_of(request: grants_pb2.ListGrantsRequest) -> tuple[int, bool]:
    """ListGrants' wallet and whether to list spent grants too."""
    return required_id("wallet_id", request.wallet_id), request.include_spent


def usage_entry_pb(value: model.UsageEntry, scales: Mapping[str, int]) -> reports_pb2.UsageEntry:
    pb = reports_pb2.UsageEntry(untracked=value.untracked)
    _fill_transfer(pb.transfer, value.transfer, scales)
    for each in value.drawn:
        drawn = pb.drawn.add(grant_id=each.grant_id, amount=each.amount)
        if each.expires_at is not None:
            drawn.expires_at.CopyFrom(_timestamp(each.expires_at))
    return pb


def outstanding_pb(
    value: model.Outstanding, scales: Mapping[str, int], next_page_token: str
) -> reports_pb2.GetOutstandingResponse:
    pb = reports_pb2.GetOutstandingResponse(
        unit=value.unit,
        unit_scale=scales[value.unit],
        expiring_before=_timestamp(value.horizon),
        wallets=[
            reports_pb2.OutstandingWallet(
                wallet_id=each.wallet_id,
                owner_id=each.owner_id,
                owner_kind=_owner_kinds.to_proto(each.owner_kind),
                posted=each.balance.posted,
                available=each.balance.available,
                expiring=each.expiring,
            )
            for each in value.wallets
        ],
        next_page_token=next_page_token,
    )
    if value.totals is not None:
        pb.totals.wallets = value.totals.wallets
        pb.totals.outstanding = value.totals.outstanding
        pb.totals.expiring = value.totals.expiring
    return pb


def past_balance_pb(
    value: model.PastBalance, scales: Mapping[str, int]
) -> reports_pb2.GetPastBalanceResponse:
    return reports_pb2.GetPastBalanceResponse(
        wallet_id=value.wallet_id,
        unit=value.unit,
        unit_scale=scales[value.unit],
        time=_timestamp(value.at),
        posted=value.posted,
        pending=value.pending,
    )


def api_key_pb(value: model.ApiKey) -> access_pb2.ApiKey:
    pb = access_pb2.ApiKey(
        id=value.id,
        name=value.name,
        role=_roles.to_proto(value.role),
        owner_id=value.owner_id or "",
        created_by=value.created_by,
    )
    pb.created_at.FromDatetime(value.created_at)
    if value.expires_at is not None:
        pb.expires_at.FromDatetime(value.expires_at)
    if value.revoked_at is not None:
        pb.revoked_at.FromDatetime(value.revoked_at)
    return pb


def certificate_mapping_pb(value: model.CertificateMapping) -> access_pb2.CertificateMapping:
    pb = access_pb2.CertificateMapping(
        subject=value.subject,
        name=value.name,
        role=_roles.to_proto(value.role),
        owner_id=value.owner_id or "",
        created_by=value.created_by,
    )
    pb.created_at.FromDatetime(value.created_at)
    return pb


def units_of_events(events: Iterable[model.Event]) -> set[str]:
    """The units of a page of events: those whose scales its answer needs."""
    units = set()
    for event in events:
        body = event.body
        if isinstance(body, model.TransferMoved):
            units.add(body.transfer.unit)
        elif not isinstance(body, (model.Unit, model.ApiKey, model.CertificateMapping)):
            units.add(body.unit)
    return units


def event_pb(value: model.Event, scales: Mapping[str, int]) -> events_pb2.Event:
    pb = events_pb2.Event(
        cursor=value.cursor.text,
        type=_event_types.to_proto(value.type),
        create_time=_timestamp(value.created_at),
        actor=value.actor,
        wallet_ids=value.wallet_ids,
    )
    body = value.body
    if isinstance(body, model.TransferMoved):
        unit = body.transfer.unit
        _fill_transfer(pb.transfer.transfer, body.transfer, scales)
        if body.source_balance is not None:
            pb.transfer.source_balance.CopyFrom(balance_pb(body.source_balance, unit, scales))
        if body.target_balance is not None:
            pb.transfer.target_balance.CopyFrom(balance_pb(body.target_balance, unit, scales))
    elif isinstance(body, model.Wallet):
        pb.wallet.CopyFrom(wallet_pb(body, scales))
    elif isinstance(body, model.Unit):
        pb.unit.CopyFrom(unit_pb(body))
    elif isinstance(body, model.BalanceAlert):
        pb.balance_alert.wallet_id = body.wallet_id
        pb.balance_alert.unit = body.unit
        if body.low_balance_threshold is not None:
            pb.balance_alert.low_balance_threshold = body.low_balance_threshold
        if body.top_up_to is not None:
            pb.balance_alert.top_up_to = body.top_up_to
    elif isinstance(body, model.LowBalance):
        pb.low_balance.wallet_id = body.wallet_id
        pb.low_balance.balance.CopyFrom(balance_pb(body.balance, body.unit, scales))
        pb.low_balance.low_balance_threshold = body.low_balance_threshold
    elif isinstance(body, model.ApiKey):
        pb.api_key.CopyFrom(api_key_pb(body))
    elif isinstance(body, model.CertificateMapping):
        pb.certificate_mapping.CopyFrom(certificate_mapping_pb(body))
    elif isinstance(body, model.Grant):
        pb.grant.CopyFrom(grant_pb(body, scales))
    else:
        pb.top_up_request.wallet_id = body.wallet_id
        pb.top_up_request.request_id = body.request_id
        pb.top_up_request.amount = body.amount
        pb.top_up_request.top_up_to = body.top_up_to
        pb.top_up_request.balance.CopyFrom(balance_pb(body.balance, body.unit, scales))
    return pb
