"""The errors a Coffer call raises: one class per reason the server gives.

The server reports every failure as a gRPC status with a `google.rpc.ErrorInfo` detail (domain
"coffer.v1", a stable `reason`, and for bad input the offending `field`, which a
`google.rpc.BadRequest` detail names too). `from_rpc_error` turns that status back into the
class of the same name as the server's domain error; a status without the detail (the
transport failed, the deadline passed) becomes the class of its status code. Catch classes,
never parse messages.

The reasons are published in the protos as the `ErrorReason` enum (coffer/v1/errors.proto),
each value with its status code and retryability as options; a reason's class here has the
same `reason` (the value's name without `ERROR_REASON_`), `code` and `retryable`, and the
client's tests fail if the two drift apart.

    CofferError                  .reason .code .message .field .retryable
    ├── InvalidArgument          bad input, named by .field              INVALID_ARGUMENT
    │   └── MalformedRequest     the request's bytes did not decode
    ├── NotFound                                                         NOT_FOUND
    │   ├── UnitNotFound
    │   ├── WalletNotFound
    │   ├── TransferNotFound
    │   ├── HoldNotFound
    │   ├── ApiKeyNotFound
    │   ├── CertificateMappingNotFound
    │   └── GrantNotFound
    ├── AlreadyExists                                                    ALREADY_EXISTS
    │   ├── IdempotencyKeyReused the key was used before for another request
    │   ├── UnitExists           the unit exists with other fields
    │   └── IdempotencyKeyUnavailable  the key cannot be stored: send another key
    ├── FailedPrecondition                                               FAILED_PRECONDITION
    │   ├── InsufficientFunds, WalletNotActive, WalletNotEmpty, WalletKindMismatch,
    │   ├── UnitMismatch, SameWallet, AlreadyVoided, NotVoidable, HoldExpired,
    │   ├── HoldNotPending, CaptureExceedsHold, BalanceOverflow,
    │   ├── EventsDisabled, EventsCursorExpired (of the event stream),
    │   └── GrantNotExpired, GrantSpent (of grants)
    ├── Aborted                                                          ABORTED
    │   └── LinkedOperationFailed   another operation of its linked chain failed
    ├── Unauthenticated          who calls is not known                  UNAUTHENTICATED
    │   ├── CredentialsMissing, CredentialsInvalid,
    │   └── CredentialsExpired, CredentialsRevoked
    ├── PermissionDenied         the principal's role may not            PERMISSION_DENIED
    ├── ResourceExhausted                                                RESOURCE_EXHAUSTED
    │   ├── Overloaded           the server has too much waiting (retryable; .retry_after_ms)
    │   └── RateLimited          the principal calls too fast (retryable; .retry_after_ms)
    ├── Unavailable              the server or its store can't be reached (retryable)
    ├── DeadlineExceeded         no answer within the call's deadline, or the server
    │                            dropped the operation unapplied when it passed (retryable)
    ├── Cancelled                                                        CANCELLED
    └── Internal                 a server bug (details in its log), or any other code:
                                 UNKNOWN, UNIMPLEMENTED, …

`retryable` says whether sending the same request again, with the same idempotency key, may
succeed. The client retries every retryable error itself, within the call's deadline (which
a DeadlineExceeded says has passed: that one it raises at once; retry it with a new call).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from coffer.v1 import transfers_pb2

__all__ = [
    "Aborted",
    "AlreadyExists",
    "AlreadyVoided",
    "ApiKeyNotFound",
    "BalanceOverflow",
    "Cancelled",
    "CaptureExceedsHold",
    "CertificateMappingNotFound",
    "CofferError",
    "CredentialsExpired",
    "CredentialsInvalid",
    "CredentialsMissing",
    "CredentialsRevoked",
    "DeadlineExceeded",
    "EventsCursorExpired",
    "EventsDisabled",
    "FailedPrecondition",
    "GrantNotExpired",
    "GrantNotFound",
    "GrantSpent",
    "HoldExpired",
    "HoldNotFound",
    "HoldNotPending",
    "IdempotencyKeyReused",
    "IdempotencyKeyUnavailable",
    "InsufficientFunds",
    "Internal",
    "InvalidArgument",
    "LinkedOperationFailed",
    "MalformedRequest",
    "NotFound",
    "NotVoidable",
    "Overloaded",
    "PermissionDenied",
    "RateLimited",
    "ResourceExhausted",
    "SameWallet",
    "TransferNotFound",
    "Unauthenticated",
    "Unavailable",
    "UnitExists",
    "UnitMismatch",
    "UnitNotFound",
    "WalletKindMismatch",
    "WalletNotActive",
    "WalletNotEmpty",
    "WalletNotFound",
    "error_domain",
    "from_operation_error",
    "from_rpc_error",
    "reasons",
    "replayed_metadata_key",
]

error_domain = "coffer.v1"
status_details_metadata_key = "grpc-status-details-bin"
field_metadata_key = "field"
retry_after_ms_metadata_key = "retry_after_ms"
# Trailing metadata of a replayed answer, success or error: "true".
replayed_metadata_key = "coffer-replayed"


class CofferError(Exception):
    """A failed Coffer call. `str(error)` is "REASON: message"."""

    reason: str = "INTERNAL"
    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        code: grpc.StatusCode | None = None,
        field: str | None = None,
        metadata: Mapping[str, str] | None = None,
        replayed: bool = False,
        from_server: bool = True,
    ) -> None:
        super().__init__(message)
        self.message = message
        # False when the status came without the server's ErrorInfo detail: gRPC's own (the
        # server unreachable, a deadline passed on the way) or a proxy's.
        self.from_server = from_server
        # True when the server answered with the stored refusal of an earlier request with
        # the same idempotency key (what it refused then, it refuses again).
        self.replayed = replayed
        if reason is not None:
            self.reason = reason
        if code is not None:
            self.code = code
        # For INVALID_ARGUMENT: the request field at fault, e.g. "amount".
        self.field = field
        # Every entry of the ErrorInfo detail, "field" included.
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}" if self.message else self.reason

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(reason={self.reason!r}, code={self.code.name}, "
            f"message={self.message!r}, field={self.field!r})"
        )


class InvalidArgument(CofferError):
    reason = "INVALID_ARGUMENT"
    code = grpc.StatusCode.INVALID_ARGUMENT


class MalformedRequest(InvalidArgument):
    reason = "MALFORMED_REQUEST"


class NotFound(CofferError):
    reason = "NOT_FOUND"
    code = grpc.StatusCode.NOT_FOUND


class UnitNotFound(NotFound):
    reason = "UNIT_NOT_FOUND"


class WalletNotFound(NotFound):
    reason = "WALLET_NOT_FOUND"


class TransferNotFound(NotFound):
    reason = "TRANSFER_NOT_FOUND"


class HoldNotFound(NotFound):
    reason = "HOLD_NOT_FOUND"


class GrantNotFound(NotFound):
    reason = "GRANT_NOT_FOUND"


class ApiKeyNotFound(NotFound):
    reason = "API_KEY_NOT_FOUND"


class CertificateMappingNotFound(NotFound):
    reason = "CERTIFICATE_MAPPING_NOT_FOUND"


class AlreadyExists(CofferError):
    reason = "ALREADY_EXISTS"
    code = grpc.StatusCode.ALREADY_EXISTS


class IdempotencyKeyReused(AlreadyExists):
    reason = "IDEMPOTENCY_KEY_REUSED"


class UnitExists(AlreadyExists):
    reason = "UNIT_EXISTS"


class IdempotencyKeyUnavailable(AlreadyExists):
    """The server cannot store this idempotency key (it would collide with another in the
    server's index of keys, a chance of about one in 2^96): send the request with another
    key."""

    reason = "IDEMPOTENCY_KEY_UNAVAILABLE"


class FailedPrecondition(CofferError):
    reason = "FAILED_PRECONDITION"
    code = grpc.StatusCode.FAILED_PRECONDITION


class InsufficientFunds(FailedPrecondition):
    reason = "INSUFFICIENT_FUNDS"


class WalletNotActive(FailedPrecondition):
    reason = "WALLET_NOT_ACTIVE"


class WalletNotEmpty(FailedPrecondition):
    reason = "WALLET_NOT_EMPTY"


class WalletKindMismatch(FailedPrecondition):
    reason = "WALLET_KIND_MISMATCH"


class UnitMismatch(FailedPrecondition):
    reason = "UNIT_MISMATCH"


class SameWallet(FailedPrecondition):
    reason = "SAME_WALLET"


class AlreadyVoided(FailedPrecondition):
    reason = "ALREADY_VOIDED"


class NotVoidable(FailedPrecondition):
    reason = "NOT_VOIDABLE"


class HoldExpired(FailedPrecondition):
    reason = "HOLD_EXPIRED"


class HoldNotPending(FailedPrecondition):
    reason = "HOLD_NOT_PENDING"


class CaptureExceedsHold(FailedPrecondition):
    reason = "CAPTURE_EXCEEDS_HOLD"


class BalanceOverflow(FailedPrecondition):
    reason = "BALANCE_OVERFLOW"


class EventsDisabled(FailedPrecondition):
    """The server keeps no events (it runs with events off)."""

    reason = "EVENTS_DISABLED"


class EventsCursorExpired(FailedPrecondition):
    """The cursor is older than the oldest event kept; the message names the oldest cursor
    still available."""

    reason = "EVENTS_CURSOR_EXPIRED"


class GrantNotExpired(FailedPrecondition):
    """An expiration of a grant not past its expiry, or with nothing left to expire."""

    reason = "GRANT_NOT_EXPIRED"


class GrantSpent(FailedPrecondition):
    """The void of a transfer whose grant was partly spent, which the wallet's other funds
    cannot cover."""

    reason = "GRANT_SPENT"


class Aborted(CofferError):
    reason = "ABORTED"
    code = grpc.StatusCode.ABORTED


class LinkedOperationFailed(Aborted):
    reason = "LINKED_OPERATION_FAILED"


class Unauthenticated(CofferError):
    reason = "UNAUTHENTICATED"
    code = grpc.StatusCode.UNAUTHENTICATED


class CredentialsMissing(Unauthenticated):
    reason = "CREDENTIALS_MISSING"


class CredentialsInvalid(Unauthenticated):
    reason = "CREDENTIALS_INVALID"


class CredentialsExpired(Unauthenticated):
    reason = "CREDENTIALS_EXPIRED"


class CredentialsRevoked(Unauthenticated):
    reason = "CREDENTIALS_REVOKED"


class PermissionDenied(CofferError):
    reason = "PERMISSION_DENIED"
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(CofferError):
    reason = "RESOURCE_EXHAUSTED"
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    @property
    def retry_after_ms(self) -> int | None:
        """The server's hint, when it gives one: how long until a retry is likely to be let
        through."""
        value = self.metadata.get(retry_after_ms_metadata_key, "")
        return int(value) if value.isdigit() else None


class Overloaded(ResourceExhausted):
    reason = "OVERLOADED"
    retryable = True


class RateLimited(ResourceExhausted):
    reason = "RATE_LIMITED"
    retryable = True


class Unavailable(CofferError):
    reason = "UNAVAILABLE"
    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(CofferError):
    reason = "DEADLINE_EXCEEDED"
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class Cancelled(CofferError):
    reason = "CANCELLED"
    code = grpc.StatusCode.CANCELLED


class Internal(CofferError):
    reason = "INTERNAL"
    code = grpc.StatusCode.INTERNAL


# The server's reasons: the leaves below the category classes, as in coffer.core.errors.
_error_by_reason: dict[str, type[CofferError]] = {
    error.reason: error
    for error in (
        InvalidArgument,
        MalformedRequest,
        UnitNotFound,
        WalletNotFound,
        TransferNotFound,
        HoldNotFound,
        ApiKeyNotFound,
        CertificateMappingNotFound,
        IdempotencyKeyReused,
        UnitExists,
        InsufficientFunds,
        WalletNotActive,
        WalletNotEmpty,
        WalletKindMismatch,
        UnitMismatch,
        SameWallet,
        AlreadyVoided,
        NotVoidable,
        HoldExpired,
        HoldNotPending,
        CaptureExceedsHold,
        BalanceOverflow,
        EventsDisabled,
        EventsCursorExpired,
        GrantNotFound,
        GrantNotExpired,
        GrantSpent,
        IdempotencyKeyUnavailable,
        LinkedOperationFailed,
        CredentialsMissing,
        CredentialsInvalid,
        CredentialsExpired,
        CredentialsRevoked,
        PermissionDenied,
        Overloaded,
        RateLimited,
        DeadlineExceeded,
        Unavailable,
        Internal,
    )
}

# For a status without a known reason; codes not listed become Internal.
_error_by_code: dict[grpc.StatusCode, type[CofferError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.CANCELLED: Cancelled,
}

_status_code_by_number: dict[int, grpc.StatusCode] = {
    code.value[0]: code for code in grpc.StatusCode
}


def reasons() -> dict[str, type[CofferError]]:
    """Every reason the server gives, with its class."""
    return dict(_error_by_reason)


def from_rpc_error(error: grpc.RpcError) -> CofferError:
    """The typed error for a failed call (grpc.aio.AioRpcError or a sync grpc.RpcError)."""
    code = _call_code(error)
    message = _call_details(error)
    info, bad_request = _status_details(error)
    if info is None:
        return _error_by_code.get(code, Internal)(
            message, reason=code.name, code=code, from_server=False
        )
    error_class = _error_by_reason.get(info.reason) or _error_by_code.get(code, Internal)
    field = info.metadata.get(field_metadata_key) or None
    if field is None and bad_request is not None and bad_request.field_violations:
        field = bad_request.field_violations[0].field or None
    return error_class(
        message,
        reason=info.reason,
        code=code,
        field=field,
        metadata=info.metadata,
        replayed=_is_replay(error),
    )


def _is_replay(call: grpc.RpcError | Any) -> bool:
    """Whether a finished call (failed, or a sync `with_call` Call) answered with the stored
    outcome of an earlier request with the same idempotency key."""
    trailing_metadata = getattr(call, "trailing_metadata", None)
    entries = trailing_metadata() if callable(trailing_metadata) else None
    return any(key == replayed_metadata_key and value == "true" for key, value in entries or ())


def from_operation_error(
    pb: transfers_pb2.OperationError, *, replayed: bool = False
) -> CofferError:
    """The typed error for one failed operation of a batch (`OperationResult.error`; pass
    `OperationResult.replayed` too)."""
    # `status_code`, or from a server older than it, the deprecated bare number (both are 0,
    # OK, only when neither was set).
    number = pb.status_code or pb.code
    code = _status_code_by_number.get(number, grpc.StatusCode.UNKNOWN)
    error_class = _error_by_reason.get(pb.reason) or _error_by_code.get(code, Internal)
    return error_class(
        pb.message,
        reason=pb.reason or code.name,
        code=code,
        field=pb.field or None,
        replayed=replayed,
    )


def _call_code(error: grpc.RpcError) -> grpc.StatusCode:
    code = getattr(error, "code", None)
    value = code() if callable(code) else None
    return value if isinstance(value, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _call_details(error: grpc.RpcError) -> str:
    details = getattr(error, "details", None)
    value = details() if callable(details) else None
    return value if isinstance(value, str) else ""


def _status_details(
    error: grpc.RpcError,
) -> tuple[error_details_pb2.ErrorInfo | None, error_details_pb2.BadRequest | None]:
    """The ErrorInfo of the Coffer domain and the BadRequest in the status details trailer,
    each if there is one."""
    trailing_metadata = getattr(error, "trailing_metadata", None)
    entries = trailing_metadata() if callable(trailing_metadata) else None
    for key, value in entries or ():
        if key != status_details_metadata_key or not isinstance(value, bytes):
            continue
        try:
            status = status_pb2.Status.FromString(value)
        except DecodeError:
            return None, None
        found_info: error_details_pb2.ErrorInfo | None = None
        found_bad_request: error_details_pb2.BadRequest | None = None
        for detail in status.details:
            # Unpack is False when the detail is of another type.
            info = error_details_pb2.ErrorInfo()
            if found_info is None and detail.Unpack(info) and info.domain == error_domain:
                found_info = info
            bad_request = error_details_pb2.BadRequest()
            if found_bad_request is None and detail.Unpack(bad_request):
                found_bad_request = bad_request
        return found_info, found_bad_request
    return None, None
