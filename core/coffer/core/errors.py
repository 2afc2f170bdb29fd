"""The domain's errors.

Each error names a stable, machine-readable `reason` and a `category` saying what kind of
failure it is; the API boundary maps categories to status codes in one table. `retryable`
says whether the same request may succeed if sent again unchanged.

    CofferError
    ├── InvalidArgument        bad input, named by field             (INVALID_ARGUMENT)
    ├── MalformedRequest       request bytes that are not the message (INVALID_ARGUMENT)
    ├── NotFound               UnitNotFound, WalletNotFound, …       (NOT_FOUND)
    ├── AlreadyExists          IdempotencyKeyReused, UnitExists,     (ALREADY_EXISTS)
    │                          IdempotencyKeyUnavailable
    ├── FailedPrecondition     InsufficientFunds, AlreadyVoided, …,  (FAILED_PRECONDITION)
    │                          EventsDisabled, EventsCursorExpired
    ├── LinkedOperationFailed  another operation of a linked chain failed (ABORTED)
    ├── Unauthenticated        CredentialsMissing, CredentialsInvalid, CredentialsExpired,
    │                          CredentialsRevoked                    (UNAUTHENTICATED)
    ├── PermissionDenied       the principal's role may not do this  (PERMISSION_DENIED)
    ├── Overloaded             too much is waiting already; with a retry-after hint
    │                                                                (RESOURCE_EXHAUSTED)
    ├── RateLimited            the principal (or, failing to authenticate, its host) calls
    │                          faster than its rate; with a retry-after hint
    │                                                                (RESOURCE_EXHAUSTED)
    ├── DeadlineExceeded       the caller's deadline passed before the operation ran
    │                                                                (DEADLINE_EXCEEDED)
    ├── Unavailable            the store cannot be reached now       (UNAVAILABLE)
    └── Internal               a bug or an unknown failure; details only in the server's log
                                                                     (INTERNAL)

Only Overloaded, RateLimited, DeadlineExceeded and Unavailable are `retryable`: an unknown
failure is not worth repeating blindly.
"""

from __future__ import annotations

import functools
from enum import Enum
from typing import ClassVar

__all__ = [
    "AlreadyExists",
    "AlreadyVoided",
    "ApiKeyNotFound",
    "BalanceOverflow",
    "CaptureExceedsHold",
    "Category",
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
    "reasons",
    "refusal",
]


class Category(Enum):
    invalid_argument = "invalid_argument"
    not_found = "not_found"
    already_exists = "already_exists"
    failed_precondition = "failed_precondition"
    aborted = "aborted"
    unauthenticated = "unauthenticated"
    permission_denied = "permission_denied"
    resource_exhausted = "resource_exhausted"
    deadline_exceeded = "deadline_exceeded"
    unavailable = "unavailable"
    internal = "internal"


class CofferError(Exception):
    reason: ClassVar[str] = "INTERNAL"
    category: ClassVar[Category] = Category.internal
    retryable: ClassVar[bool] = False
    # A refusal: the request was well-formed and ran, and the ledger's state said no. Refusals
    # are kept under the operation's idempotency key, so a retry gets the same answer.
    refusal: ClassVar[bool] = False

    def __init__(self, message: str, *, replayed: bool = False) -> None:
        super().__init__(message)
        self.message = message
        # True when this is the stored answer to an earlier request with the same key.
        self.replayed = replayed

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.message == other.message

    def __hash__(self) -> int:
        return hash((type(self), self.message))


class InvalidArgument(CofferError):
    reason = "INVALID_ARGUMENT"
    category = Category.invalid_argument

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class MalformedRequest(CofferError):
    """The request's bytes do not decode as its message (truncated, a varint too long,
    invalid UTF-8 in a string): no field to name."""

    reason = "MALFORMED_REQUEST"
    category = Category.invalid_argument


class NotFound(CofferError):
    category = Category.not_found
    refusal = True


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
    refusal = False


class CertificateMappingNotFound(NotFound):
    reason = "CERTIFICATE_MAPPING_NOT_FOUND"
    refusal = False


class AlreadyExists(CofferError):
    category = Category.already_exists


class IdempotencyKeyReused(AlreadyExists):
    reason = "IDEMPOTENCY_KEY_REUSED"


class IdempotencyKeyUnavailable(AlreadyExists):
    """The key's digest, under which the journal indexes keys (`model.key_digest`), is
    another caller's or key's already: a collision, about as likely as guessing a 96-bit
    number. The message names neither key; another key goes through."""

    reason = "IDEMPOTENCY_KEY_UNAVAILABLE"


class UnitExists(AlreadyExists):
    reason = "UNIT_EXISTS"


class FailedPrecondition(CofferError):
    category = Category.failed_precondition
    refusal = True


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


class GrantNotExpired(FailedPrecondition):
    """An expiration of a grant not past its expiry, or with nothing left to expire."""

    reason = "GRANT_NOT_EXPIRED"


class GrantSpent(FailedPrecondition):
    """The void of a transfer whose grant was partly spent, when the wallet's other funds
    cannot cover what was spent."""

    reason = "GRANT_SPENT"


class EventsDisabled(FailedPrecondition):
    """The server keeps no events (it runs with events off)."""

    reason = "EVENTS_DISABLED"
    refusal = False


class EventsCursorExpired(FailedPrecondition):
    """The cursor names events older than the oldest kept; the message names the oldest cursor
    still available."""

    reason = "EVENTS_CURSOR_EXPIRED"
    refusal = False


class LinkedOperationFailed(CofferError):
    reason = "LINKED_OPERATION_FAILED"
    category = Category.aborted
    refusal = True


class Unauthenticated(CofferError):
    """The call's credentials are missing or not good: who calls is not known."""

    category = Category.unauthenticated


class CredentialsMissing(Unauthenticated):
    reason = "CREDENTIALS_MISSING"


class CredentialsInvalid(Unauthenticated):
    reason = "CREDENTIALS_INVALID"


class CredentialsExpired(Unauthenticated):
    reason = "CREDENTIALS_EXPIRED"


class CredentialsRevoked(Unauthenticated):
    reason = "CREDENTIALS_REVOKED"


class PermissionDenied(CofferError):
    """The principal is known, and its role may not do what it asks."""

    reason = "PERMISSION_DENIED"
    category = Category.permission_denied


class Overloaded(CofferError):
    """Refused at once, before any work, because too much is waiting; `retry_after_ms` says
    when trying again is likely to be admitted."""

    reason = "OVERLOADED"
    category = Category.resource_exhausted
    retryable = True

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class RateLimited(CofferError):
    """Refused at once: the principal calls faster than its rate allows (or its host fails
    to authenticate faster than that allows); `retry_after_ms` says when a call will be let
    through again."""

    reason = "RATE_LIMITED"
    category = Category.resource_exhausted
    retryable = True

    def __init__(self, message: str, *, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(CofferError):
    """The operation waited past its caller's deadline and was dropped, not applied."""

    reason = "DEADLINE_EXCEEDED"
    category = Category.deadline_exceeded
    retryable = True


class Unavailable(CofferError):
    reason = "UNAVAILABLE"
    category = Category.unavailable
    retryable = True


class Internal(CofferError):
    reason = "INTERNAL"
    category = Category.internal


def refusal(reason: str, message: str) -> CofferError:
    """A stored refusal, as it is answered again."""
    kind = reasons()[reason]
    assert kind.refusal, reason
    return kind(message, replayed=True)


@functools.cache
def reasons() -> dict[str, type[CofferError]]:
    """Every concrete error by its reason."""
    found: dict[str, type[CofferError]] = {}
    pending: list[type[CofferError]] = [CofferError]
    while pending:
        error = pending.pop()
        pending.extend(error.__subclasses__())
        if error.__subclasses__() == []:
            found[error.reason] = error
    return found
