"""The domain's values: units, wallets, transfers, holds, and the operations that move money.

Operations validate their own fields when built (raising `InvalidArgument` naming the field),
so anything that reaches the ledger is well-formed; whether it can be applied is decided
later, against the locked wallet states, by `rules.apply`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from enum import Enum, IntEnum
from operator import attrgetter
from typing import (
    Any,
    ClassVar,
    Generic,
    NamedTuple,
    TypeVar,
    cast,
    dataclass_transform,
    get_type_hints,
)

from .errors import CofferError, InvalidArgument

__all__ = [
    "Allocation",
    "ApiKey",
    "Applied",
    "Balance",
    "BalanceAlert",
    "CaptureHold",
    "CertificateMapping",
    "Credit",
    "Debit",
    "DebitMode",
    "Deposit",
    "Event",
    "EventBody",
    "EventCursor",
    "EventFilter",
    "EventPage",
    "EventType",
    "ExpireGrant",
    "ExpireHold",
    "Grant",
    "GrantDrawn",
    "Hold",
    "HoldStatus",
    "LowBalance",
    "NewWallet",
    "Operation",
    "Outstanding",
    "OutstandingTotals",
    "OutstandingWallet",
    "Owner",
    "OwnerKind",
    "Page",
    "PastBalance",
    "Payment",
    "PlaceHold",
    "Principal",
    "Rejected",
    "ReleaseHold",
    "Role",
    "SystemWallet",
    "TopUpRequest",
    "Transfer",
    "TransferFilter",
    "TransferKind",
    "TransferMoved",
    "Unit",
    "UnitKind",
    "UsageEntry",
    "UsageFilter",
    "Void",
    "Wallet",
    "WalletStatus",
    "WalletTransfer",
    "Withdrawal",
    "access_event_types",
    "amount_max",
    "api_key_prefix",
    "api_key_secret_bytes",
    "balance_max",
    "balance_min",
    "batch_operations_max",
    "caller_length_max",
    "certificate_subject_length_max",
    "check_balance_alert",
    "check_enum",
    "check_grant_instant",
    "check_grant_terms",
    "check_id",
    "check_principal_fields",
    "check_text",
    "check_unit_code",
    "credential_scope_prefix",
    "event_filter_wallets_max",
    "event_type_of_kind",
    "events_retention_days_default",
    "events_retention_days_max",
    "events_scanned_max",
    "events_watchers_max_default",
    "events_watchers_max_limit",
    "events_watchers_per_principal_max",
    "expiration_run_batches_max",
    "expiration_runs_grants_max",
    "expiring_within_days_max",
    "grant_expiry_key",
    "grant_instant_max",
    "grant_instant_min",
    "grant_spendable",
    "history_balances_scanned_max",
    "hold_lapsed",
    "hold_status_resolved_by",
    "hold_timeout_s_default",
    "hold_timeout_s_max",
    "hold_timeout_s_min",
    "id_max",
    "idempotency_key_length_max",
    "key_digest",
    "key_digest_caller_length_size",
    "key_digest_prefix_size",
    "key_digest_size",
    "key_digest_stem_trimmed",
    "local_principal_name",
    "metadata_entries_max",
    "metadata_key_length_max",
    "metadata_value_length_max",
    "note_length_max",
    "operation_transfers_max",
    "owner_id_length_max",
    "page_size_default",
    "page_size_max",
    "performed_by_length_max",
    "posting_kinds",
    "principal_name_length_max",
    "reference_length_max",
    "stamp_lag_s_max",
    "system_caller",
    "top_up_request_id",
    "unit_code_length_max",
    "unit_description_length_max",
    "unit_name_length_max",
    "unit_scale_max",
    "unit_system_wallets",
    "usage_kinds",
    "usage_scanned_max",
    "validity_length_max",
    "validity_months_max",
]

# Limits: every string, map and number that comes in has one.
amount_max = 2**63 - 1
balance_max = 2**63 - 1
# The instants a grant's terms may name: those PostgreSQL keeps as they are (the first and last
# instants Python holds are written as -infinity and infinity, which no grant can be read back
# from).
grant_instant_min = datetime.min.replace(tzinfo=UTC) + timedelta(microseconds=1)
grant_instant_max = datetime.max.replace(tzinfo=UTC) - timedelta(microseconds=1)
balance_min = -(2**63)
id_max = 2**63 - 1
idempotency_key_length_max = 128
# The API's rule for callers is coffer.clients.caller's, which the core may not import; the
# core checks what it receives against the same limit (a project test holds them equal).
caller_length_max = 128
# The caller under which the ledger writes on its own behalf (hold expiry): one no client may
# use, as it starts with the API's reserved prefix (a project test holds them so).
system_caller = "@coffer"
note_length_max = 1000
reference_length_max = 256
performed_by_length_max = 256
owner_id_length_max = 256
metadata_entries_max = 16
metadata_key_length_max = 64
metadata_value_length_max = 512
unit_code_length_max = 32
_unit_code_pattern = re.compile(rf"[A-Za-z0-9_.\-]{{1,{unit_code_length_max}}}")
unit_name_length_max = 128
unit_description_length_max = 1000
unit_scale_max = 18
# A unit's default validity (coffer.core.validity): an ISO 8601 duration of at most this many
# characters, lasting at most this many months (100 years), a month counted as 30 days.
validity_length_max = 32
validity_months_max = 1200
hold_timeout_s_min = 1
hold_timeout_s_max = 30 * 24 * 3600
hold_timeout_s_default = 3600
# Operations in one batch: one database transaction, every touched wallet locked once.
batch_operations_max = 8000
# Items in one page of a list, and how many when the caller names no size.
page_size_max = 1000
page_size_default = 100
# Credentials (`coffer.core.access`). A principal's name labels it (and is the default
# `performed_by` of what it does); a certificate is named by its subject's common name, which
# X.509 bounds at 64 characters.
principal_name_length_max = 128
certificate_subject_length_max = 64
# The idempotency scope of a credential starts with this prefix ("@key:17", "@cert:5"),
# which the API's rule for callers reserves (a project test holds them equal): no caller label
# named in the open mode can take a credential's scope.
credential_scope_prefix = "@"
# An API key: this prefix, its id, "_", then api_key_secret_bytes random bytes in base64url.
api_key_prefix = "coffer_"
api_key_secret_bytes = 32
# The principal of the open mode when the call names no caller.
local_principal_name = "local"
# Events: the most one page looks at when it filters (those it skips included; the next page
# goes on from there), the watchers one server serves at once by default and at most, and how
# many days records are kept by default and at most.
events_scanned_max = 10_000
# Wallets one filter of events may name.
event_filter_wallets_max = 1000
events_watchers_max_default = 1000
# Watchers one principal may have at once on one server: one cannot take them all.
events_watchers_per_principal_max = 16
events_watchers_max_limit = 10_000
events_retention_days_default = 30
events_retention_days_max = 36_500
# Grants one expiration run expires in one batch (a run goes on batch after batch), and the
# batches one run makes at most (the next run goes on from there).
expiration_runs_grants_max = 1000
expiration_run_batches_max = 100
# Reports (coffer.core.store.reports). The usage register looks at most this many transfers
# per page (and per wallet of an owner), those it skips included; the next page goes on from
# there.
usage_scanned_max = 10_000
# A wallet's history gives each entry the balance after it when the wallet has at most this
# many transfers newer than the page (the balance is worked out from now backwards).
history_balances_scanned_max = 10_000
# The outstanding overview counts what expires within 0 to this many days from now.
expiring_within_days_max = 36_500
# The longest a batch may take from its stamp (the time its transfers carry, taken as it
# begins) to drawing its transfer ids and committing: a balance at a past instant walks the
# journal back this much further than the instant, so that it meets every transfer stamped
# after it whatever the order their ids were drawn in (see `store.reports.past_balance`).
stamp_lag_s_max = 300
# The most transfers one operation writes (each writes one today): an operation's transfers
# have consecutive ids from its own, so its replay reads at most this many.
operation_transfers_max = 1


class UnitKind(IntEnum):
    currency = 1
    credit = 2


class OwnerKind(IntEnum):
    customer = 1
    merchant = 2
    system = 3


class WalletStatus(IntEnum):
    active = 1
    cancelled = 2


class TransferKind(IntEnum):
    credit = 1
    debit = 2
    transfer = 3
    deposit = 4
    withdrawal = 5
    payment = 6
    hold = 7
    capture = 8
    release = 9
    hold_expiry = 10
    void = 11
    # What was left of a grant at its expiry, moved to the unit's expired-credits wallet.
    expiration = 12


# Kinds that move posted balances; the others only reserve or release.
posting_kinds = frozenset(
    {
        TransferKind.credit,
        TransferKind.debit,
        TransferKind.transfer,
        TransferKind.deposit,
        TransferKind.withdrawal,
        TransferKind.payment,
        TransferKind.capture,
        TransferKind.void,
        TransferKind.expiration,
    }
)


# The kinds that consume a wallet's funds, which the usage register lists: what its source
# spent.
usage_kinds = frozenset({TransferKind.debit, TransferKind.payment, TransferKind.capture})


class DebitMode(IntEnum):
    all_or_nothing = 1
    up_to = 2


class HoldStatus(IntEnum):
    pending = 1
    captured = 2
    released = 3
    expired = 4


# What a hold is once the transfer of each kind that resolves a hold has resolved it.
hold_status_resolved_by = {
    TransferKind.capture: HoldStatus.captured,
    TransferKind.release: HoldStatus.released,
    TransferKind.hold_expiry: HoldStatus.expired,
}


def hold_lapsed(expires_at: datetime, now: datetime) -> bool:
    """A hold lapses at its expiry: from that instant on it holds nothing, whether or not it is
    released in the journal yet. (The statements in coffer.core.store.sql say `<=` alike.)"""
    return expires_at <= now


class Role(IntEnum):
    """What a principal may do (the server's role matrix says which RPC each may call).
    Merchants and customers act only on the wallets of their owner."""

    admin = 1
    manager = 2
    service = 3
    merchant = 4
    customer = 5


# The roles limited to one owner's wallets, with the kind of wallets that owner has.
_owner_kinds_of_roles = {Role.merchant: OwnerKind.merchant, Role.customer: OwnerKind.customer}


class SystemWallet(IntEnum):
    """The wallets every unit has for the world outside: owner ids of system wallets."""

    operator = 1
    funding = 2
    # Where what is left of grants goes when they expire: made at the unit's first
    # expiration, so that a unit whose credits never expire has none.
    expired = 3


# The system wallets made with a unit.
unit_system_wallets = (SystemWallet.operator, SystemWallet.funding)


@dataclass(frozen=True, slots=True)
class Unit:
    code: str
    kind: UnitKind
    name: str
    plural: str = ""
    description: str = ""
    scale: int = 0
    # How long each credit of the unit stays valid when it names no expiry of its own: an ISO
    # 8601 duration (coffer.core.validity), kept in its canonical form; "" for no expiry.
    default_validity: str = ""
    created_at: datetime | None = None

    def __post_init__(self) -> None:
        # Here, not at the top: coffer.core.validity takes its limits from this module.
        from .validity import parse_validity

        check_unit_code("code", self.code)
        check_enum("kind", self.kind, UnitKind)
        check_text("name", self.name, unit_name_length_max, required=True)
        check_text("plural", self.plural, unit_name_length_max)
        check_text("description", self.description, unit_description_length_max)
        if not 0 <= self.scale <= unit_scale_max:
            raise InvalidArgument("scale", f"must be 0 to {unit_scale_max}")
        if self.default_validity:
            validity = parse_validity(self.default_validity, "default_validity")
            object.__setattr__(self, "default_validity", validity.text)

    def same_definition(self, other: Unit) -> bool:
        return self._definition() == other._definition()

    def _definition(self) -> tuple[object, ...]:
        return (
            self.code,
            self.kind,
            self.name,
            self.plural,
            self.description,
            self.scale,
            self.default_validity,
        )


@dataclass(frozen=True, slots=True)
class Balance:
    """A wallet's balance: `posted`, what its transfers moved; `pending`, what its open holds
    reserve; `unspendable`, what its grants hold that cannot be spent now (not valid yet, or
    past their expiry and not yet expired by a run). `available` is what it can spend."""

    posted: int
    pending: int
    unspendable: int = 0

    @property
    def available(self) -> int:
        return self.posted - self.pending - self.unspendable


@dataclass(frozen=True, slots=True)
class Wallet:
    id: int
    owner_id: str
    owner_kind: OwnerKind
    unit: str
    status: WalletStatus
    balance_minimum: int | None
    balance: Balance
    metadata: Mapping[str, str]
    created_at: datetime
    # Below this available balance the ledger says so (LOW_BALANCE), once per crossing; with
    # `top_up_to`, it also asks for a top-up to that (TOP_UP_REQUESTED). None: no alert.
    low_balance_threshold: int | None = None
    top_up_to: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class NewWallet:
    idempotency_key: str
    caller: str = "default"
    owner_id: str
    owner_kind: OwnerKind
    unit: str
    balance_minimum: int = 0
    metadata: Mapping[str, str] = field(default_factory=dict)
    low_balance_threshold: int | None = None
    top_up_to: int | None = None

    def __post_init__(self) -> None:
        _check_key(self.idempotency_key, self.caller)
        check_text("owner_id", self.owner_id, owner_id_length_max, required=True)
        if self.owner_kind not in (OwnerKind.customer, OwnerKind.merchant):
            raise InvalidArgument("owner_kind", "must be customer or merchant")
        check_unit_code("unit", self.unit)
        if not balance_min <= self.balance_minimum <= 0:
            raise InvalidArgument("balance_minimum", "must be 0 or negative (an overdraft)")
        _check_metadata(self.metadata)
        check_balance_alert(self.low_balance_threshold, self.top_up_to)

    def request_hash(self) -> bytes:
        return _hash(self)


class Allocation(NamedTuple):
    """What a transfer changed in one grant's remainder: below 0 drawn, above 0 returned. A
    named tuple: a batch makes one for each grant each of its transfers draws from."""

    grant_id: int
    amount: int


class Transfer(NamedTuple):
    """One row of the journal: `amount` moved from the source wallet to the target.
    `allocations`: what it changed in grants, by grant id (not part of the row; set where it
    is read with them). A named tuple, not a dataclass: a batch makes one a transfer, and a
    tuple is made in C."""

    id: int
    operation_id: int
    kind: TransferKind
    source_wallet_id: int
    target_wallet_id: int
    unit: str
    amount: int
    amount_requested: int | None
    note: str
    reference: str
    performed_by: str
    metadata: Mapping[str, str]
    created_at: datetime
    voids_transfer_id: int | None = None
    hold_id: int | None = None
    hold_expires_at: datetime | None = None
    voided_by_transfer_id: int | None = None
    allocations: tuple[Allocation, ...] = ()
    # Set only in a history read for one wallet (`Ledger.list_transfers` with a wallet): the
    # wallet's posted balance right after this transfer, and the amount as the wallet saw it
    # (+ in, - out; 0 for the kinds that move no posted money).
    balance_after: int | None = None
    signed_amount: int | None = None


@dataclass(frozen=True, slots=True)
class Hold:
    id: int
    source_wallet_id: int
    target_wallet_id: int
    unit: str
    amount: int
    status: HoldStatus
    expires_at: datetime
    created_at: datetime
    resolved_by_transfer_id: int | None = None
    amount_captured: int = 0


@dataclass(frozen=True, slots=True)
class Grant:
    """Funds a wallet received that carry terms: valid from `valid_from`, until `expires_at`
    (None: never). `remaining` is what is left of `amount`: drawn by debits, payments,
    transfers and holds (soonest expiry first), returned by voids and released holds, and
    moved to the unit's expired-credits wallet by an expiration run (`expired`, in all).
    Funds that never expire and are valid when received are not kept as grants: they are the
    wallet's untracked balance."""

    id: int
    wallet_id: int
    unit: str
    # The transfer that brought the funds in.
    transfer_id: int
    amount: int
    remaining: int
    valid_from: datetime
    expires_at: datetime | None
    expired: int
    created_at: datetime


def grant_spendable(valid_from: datetime, expires_at: datetime | None, now: datetime) -> bool:
    """A grant can be spent from its start up to (not at) its expiry."""
    return valid_from <= now and (expires_at is None or now < expires_at)


def grant_expiry_key(grant_id: int, expired: int) -> str:
    """The idempotency key of the expiration of a grant that had `expired` expired before:
    two runs that find the same remainder expire it under one key (and the second, if it
    comes after the first, finds nothing left); funds returned to the grant later (a hold
    released) expire under the next."""
    return f"grant-expiry:{grant_id}:{expired}"


# Principals ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Owner:
    """Whose wallets a merchant or customer may touch: those of this kind and owner id."""

    kind: OwnerKind
    id: str

    def owns(self, owner_kind: OwnerKind, owner_id: str) -> bool:
        return owner_kind == self.kind and owner_id == self.id


@dataclass(frozen=True, slots=True)
class Principal:
    """Who makes a call, once authenticated. `name` labels it and is the default
    `performed_by` of its operations; `owner_id` is set for merchants and customers alone (the
    owner whose wallets they may touch); `scope` scopes its idempotency keys (stored where
    operations store their caller)."""

    name: str
    role: Role
    owner_id: str | None
    scope: str

    def __post_init__(self) -> None:
        assert (self.owner_id is not None) == (self.role in _owner_kinds_of_roles), self
        assert 0 < len(self.scope) <= caller_length_max, self

    @property
    def owner(self) -> Owner | None:
        """The owner whose wallets alone it may touch; None: any."""
        if self.owner_id is None:
            return None
        return Owner(_owner_kinds_of_roles[self.role], self.owner_id)


def check_principal_fields(name: str, role: int, owner_id: str | None) -> None:
    """What a credential names: a name, a role, and an owner for merchants and customers
    alone."""
    check_text("name", name, principal_name_length_max, required=True)
    check_enum("role", role, Role)
    if role in _owner_kinds_of_roles:
        if owner_id is None:
            raise InvalidArgument("owner_id", f"is required for the role {Role(role).name}")
        check_text("owner_id", owner_id, owner_id_length_max, required=True)
    elif owner_id:
        raise InvalidArgument(
            "owner_id", f"is only for merchants and customers, not the role {Role(role).name}"
        )


@dataclass(frozen=True, slots=True)
class ApiKey:
    """An API key as stored: never its secret, which is shown once, when it is made."""

    id: int
    name: str
    role: Role
    owner_id: str | None
    created_at: datetime
    created_by: str
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class CertificateMapping:
    """A client certificate's subject common name, mapped to the principal it authenticates.
    `id` is the mapping's own, new each time the subject is mapped (anew, or again): the scope
    of its principal's idempotency keys."""

    id: int
    subject: str
    name: str
    role: Role
    owner_id: str | None
    created_at: datetime
    created_by: str


# Idempotency keys ----------------------------------------------------------------------------

# The digest under which the journal indexes an operation's (caller, idempotency key): its
# size, the size of its prefix (the digest of the key's stem), the characters of the key's end
# the stem leaves out, and the size of the caller's length that precedes it. Fixed by the
# digests stored (migration 0008 computes the same in SQL): another value would no longer find
# the keys stored, and their replays would apply again. Never change them.
key_digest_size = 16
key_digest_prefix_size = 4
key_digest_stem_trimmed = 3
key_digest_caller_length_size = 4


def key_digest(caller: str, key: str) -> bytes:
    """The 16 bytes under which the journal indexes the key of an operation (the unique index
    `transfers_key_digest`, migration 0008), in place of the two texts.

    The first 4 bytes are of SHA-256 over the caller and the key's stem (the key without its
    last 3 characters; empty for a key of 3 or fewer), the other 12 of SHA-256 over the
    caller and the whole key; the caller comes first, after its UTF-8 length as 4 bytes
    big-endian, so that ("ab", "c") and ("a", "bc") differ. Text is hashed as UTF-8.

    The prefix keeps keys that differ only in their tail near each other in the B-tree:
    order-000123 and order-000124 share the stem order-000, so their entries go into one
    narrow range of the index, whose few leaf pages stay cached while a counter counts up,
    instead of one page anywhere in the index each (insert locality). Random keys (UUIDs)
    spread over the whole index, as they did as text.

    Collisions: two different (caller, key) share a digest only if their prefixes and their
    96-bit tails are equal. The tails are independent and uniform, so among the n keys of one
    prefix the chance of any collision is at most n(n - 1)/2 / 2^96 (the birthday bound), and
    over all N keys stored, however they fall into prefixes, at most N²/2^97: about 6e-12 for
    a billion keys, 6e-10 for ten billion. One that happens does no harm: a lookup compares
    the row's caller and key, and the later key is refused (IDEMPOTENCY_KEY_UNAVAILABLE),
    never answered with another's outcome.

    Migration 0008 computes the same bytes in SQL for the rows it backfills (which is why it
    requires a database encoded in UTF-8)."""
    caller_bytes = caller.encode()
    scope = len(caller_bytes).to_bytes(key_digest_caller_length_size, "big") + caller_bytes
    stem = key[:-key_digest_stem_trimmed]
    prefix = hashlib.sha256(scope + stem.encode()).digest()[:key_digest_prefix_size]
    tail = hashlib.sha256(scope + key.encode()).digest()
    return prefix + tail[: key_digest_size - key_digest_prefix_size]


# Operations ----------------------------------------------------------------------------------

_Class = TypeVar("_Class", bound=type)


@dataclass_transform(frozen_default=True, kw_only_default=True)
def _operation(cls: _Class) -> _Class:
    """An operation's class: a dataclass with slots and keyword-only fields, frozen to the
    type checker (which refuses any assignment to its fields) but not at run time, where a
    frozen dataclass's __init__ sets each field through object.__setattr__: nearly twice as
    slow to make, and a batch makes one an operation."""
    return cast(_Class, dataclass(slots=True, kw_only=True)(cls))


@_operation
class Operation:
    """What every operation carries: who asked, under which key, and why."""

    idempotency_key: str
    caller: str = "default"
    note: str = ""
    reference: str = ""
    performed_by: str = ""
    metadata: Mapping[str, str] = field(default_factory=dict)
    # Links this operation to the next one in its batch: the chain applies as a whole.
    linked: bool = False
    # The owner whose wallets alone the operation may touch (a merchant's or customer's);
    # None: any. A wallet, transfer or hold of another owner is not found, as a missing one.
    owner_limit: Owner | None = None

    def __post_init__(self) -> None:
        _check_key(self.idempotency_key, self.caller)
        check_text("note", self.note, note_length_max)
        check_text("reference", self.reference, reference_length_max)
        check_text("performed_by", self.performed_by, performed_by_length_max)
        _check_metadata(self.metadata)

    def request_hash(self) -> bytes:
        return _hash(self)


@_operation
class Credit(Operation):
    wallet_id: int
    amount: int
    # The terms of the grant it makes: None, from now; and until the unit's default validity
    # has passed (if it has one), else never.
    valid_from: datetime | None = None
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("wallet_id", self.wallet_id)
        _check_amount("amount", self.amount)
        check_grant_terms(self.valid_from, self.expires_at)


@_operation
class Debit(Operation):
    wallet_id: int
    amount: int
    mode: DebitMode = DebitMode.all_or_nothing

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("wallet_id", self.wallet_id)
        _check_amount("amount", self.amount)
        check_enum("mode", self.mode, DebitMode)


@_operation
class WalletTransfer(Operation):
    source_wallet_id: int
    target_wallet_id: int
    amount: int

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("source_wallet_id", self.source_wallet_id)
        check_id("target_wallet_id", self.target_wallet_id)
        _check_amount("amount", self.amount)


@_operation
class Deposit(Operation):
    """From an external funding source, named in `reference`, into a wallet."""

    wallet_id: int
    amount: int
    # The terms of the grant it makes, as a credit's: money paid in never expires unless the
    # caller says so, or its unit has a default validity.
    valid_from: datetime | None = None
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("wallet_id", self.wallet_id)
        _check_amount("amount", self.amount)
        check_text("funding_source", self.reference, reference_length_max, required=True)
        check_grant_terms(self.valid_from, self.expires_at)


@_operation
class Withdrawal(Operation):
    """From a wallet out to an external funding source, named in `reference`."""

    wallet_id: int
    amount: int

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("wallet_id", self.wallet_id)
        _check_amount("amount", self.amount)
        check_text("funding_source", self.reference, reference_length_max, required=True)


@_operation
class Payment(Operation):
    payer_wallet_id: int
    payee_wallet_id: int
    amount: int

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("payer_wallet_id", self.payer_wallet_id)
        check_id("payee_wallet_id", self.payee_wallet_id)
        _check_amount("amount", self.amount)


@_operation
class Void(Operation):
    transfer_id: int
    # For the void of an expiration alone, and required there: the new expiry of the grant
    # whose remainder it restores.
    expires_at: datetime | None = None

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("transfer_id", self.transfer_id)
        check_grant_terms(None, self.expires_at)


@_operation
class PlaceHold(Operation):
    wallet_id: int
    amount: int
    # None: the unit's operator wallet.
    target_wallet_id: int | None = None
    timeout_s: int = hold_timeout_s_default

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("wallet_id", self.wallet_id)
        if self.target_wallet_id is not None:
            check_id("target_wallet_id", self.target_wallet_id)
        _check_amount("amount", self.amount)
        if not hold_timeout_s_min <= self.timeout_s <= hold_timeout_s_max:
            raise InvalidArgument(
                "timeout", f"must be {hold_timeout_s_min} s to {hold_timeout_s_max} s"
            )


@_operation
class CaptureHold(Operation):
    hold_id: int
    # None: all of the hold.
    amount: int | None = None

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("hold_id", self.hold_id)
        if self.amount is not None:
            _check_amount("amount", self.amount)


@_operation
class ReleaseHold(Operation):
    hold_id: int

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("hold_id", self.hold_id)


@_operation
class ExpireHold(Operation):
    """Written by the ledger itself when a hold reaches its expiry."""

    hold_id: int

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("hold_id", self.hold_id)


@_operation
class ExpireGrant(Operation):
    """Written by the ledger itself, by an expiration run: moves what is left of a grant past
    its expiry to the unit's expired-credits wallet."""

    grant_id: int

    def __post_init__(self) -> None:
        Operation.__post_init__(self)
        check_id("grant_id", self.grant_id)


@dataclass(frozen=True, slots=True)
class Rejected:
    """An operation of a batch that could not even be built: it fails with `error`, and so
    does its linked chain."""

    error: CofferError
    linked: bool = False


@dataclass(frozen=True, slots=True)
class Applied:
    """What a successful operation produced (or, replayed, had produced)."""

    transfers: tuple[Transfer, ...]
    hold: Hold | None = None
    replayed: bool = False

    @property
    def transfer(self) -> Transfer:
        return self.transfers[0]

    @property
    def amount_remaining(self) -> int:
        """For an up-to debit: what the wallet could not cover, due elsewhere. (A capture's
        `amount_requested` is what it was asked, not what is due.)"""
        first = self.transfers[0]
        if first.amount_requested is None or first.kind != TransferKind.debit:
            return 0
        return first.amount_requested - first.amount


# Queries -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TransferFilter:
    """Which transfers a history lists; None or empty: any. `start` and `end` bound the time
    they were made, half-open: [start, end)."""

    wallet_id: int | None = None
    kinds: tuple[TransferKind, ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    reference: str | None = None


_Item = TypeVar("_Item")


@dataclass(frozen=True, slots=True)
class Page(Generic[_Item]):
    items: list[_Item]
    # Where the next page starts (an id to pass back as the cursor); None on the last page.
    cursor: int | None


# Reports -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsageFilter:
    """Which consumptions the usage register lists; None: any. `wallet_id` and the owner name
    the spending wallet (the source): `owner_id` its owner's id, `owner_kind` (for a merchant
    or customer limited to its own) its owner's kind. `start` and `end` bound the time they
    were made, half-open: [start, end)."""

    wallet_id: int | None = None
    owner_id: str | None = None
    owner_kind: OwnerKind | None = None
    unit: str | None = None
    performed_by: str | None = None
    start: datetime | None = None
    end: datetime | None = None
    reference: str | None = None


@dataclass(frozen=True, slots=True)
class GrantDrawn:
    """What a consumption took from one grant of its wallet (positive), and when that grant
    expires (None: never)."""

    grant_id: int
    amount: int
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """One consumption (a debit, a payment, a capture) and the grants it drew from; the rest
    of its amount came from the wallet's untracked balance."""

    transfer: Transfer
    drawn: tuple[GrantDrawn, ...]

    @property
    def untracked(self) -> int:
        return self.transfer.amount - sum(each.amount for each in self.drawn)


@dataclass(frozen=True, slots=True)
class OutstandingWallet:
    """A wallet with something posted, and what its grants have left that expires by the
    overview's horizon (past expiry and not yet expired by a run included)."""

    wallet_id: int
    owner_id: str
    owner_kind: OwnerKind
    balance: Balance
    expiring: int


@dataclass(frozen=True, slots=True)
class OutstandingTotals:
    """The sums over every wallet of the overview (all its pages): how many, what they have
    posted, what of it expires by the horizon."""

    wallets: int
    outstanding: int
    expiring: int


@dataclass(frozen=True, slots=True)
class Outstanding:
    """A page of a unit's outstanding overview: its wallets with something posted, by id, what
    expires by `horizon`, and (on the first page) the totals."""

    unit: str
    horizon: datetime
    wallets: list[OutstandingWallet]
    # Where the next page starts (the last wallet's id); None on the last page.
    cursor: int | None
    totals: OutstandingTotals | None


@dataclass(frozen=True, slots=True)
class PastBalance:
    """A wallet's posted and pending balances as they stood at a past instant."""

    wallet_id: int
    unit: str
    at: datetime
    posted: int
    pending: int


# Events --------------------------------------------------------------------------------------


class EventType(IntEnum):
    """What an event records: one value per kind of change. Transfers of every posting kind are
    TRANSFER (the transfer says its kind); the four hold transfers each have their own. Numbered
    in groups, with room for more in each."""

    transfer = 1
    hold_placed = 2
    hold_captured = 3
    hold_released = 4
    hold_expired = 5
    wallet_created = 20
    wallet_cancelled = 21
    wallet_alert_set = 22
    unit_created = 40
    low_balance = 60
    top_up_requested = 61
    api_key_created = 80
    api_key_revoked = 81
    certificate_mapped = 82
    certificate_unmapped = 83
    grant_created = 100
    grant_expiring_soon = 101
    grant_expired = 102


# The audit trail of access: credentials made, revoked, mapped, unmapped.
access_event_types = frozenset(
    {
        EventType.api_key_created,
        EventType.api_key_revoked,
        EventType.certificate_mapped,
        EventType.certificate_unmapped,
    }
)

_own_event_types = {
    TransferKind.expiration: EventType.grant_expired,
    TransferKind.hold: EventType.hold_placed,
    TransferKind.capture: EventType.hold_captured,
    TransferKind.release: EventType.hold_released,
    TransferKind.hold_expiry: EventType.hold_expired,
}
# A transfer's event type, by its kind.
event_type_of_kind: Mapping[TransferKind, EventType] = {
    kind: _own_event_types.get(kind, EventType.transfer) for kind in TransferKind
}


def top_up_request_id(wallet_id: int, crossing: int) -> str:
    """The id of the top-up a wallet's `crossing`-th fall below its threshold asks for: the
    idempotency key (and reference) of the deposit that pays it, so that it pays once."""
    return f"top-up:{wallet_id}:{crossing}"


@dataclass(frozen=True, slots=True, order=True)
class EventCursor:
    """Where a stream of events goes on: at event `index` of the record at `position`. Clients
    see it as an opaque string (`text`, `parse`)."""

    position: int
    index: int = 0

    _layout: ClassVar[struct.Struct] = struct.Struct(">QI")

    @property
    def text(self) -> str:
        return base64.urlsafe_b64encode(self._layout.pack(self.position, self.index)).decode()

    @classmethod
    def parse(cls, text: str, field: str = "after_cursor") -> EventCursor | None:
        """The cursor a string names; None for the empty string (from the oldest event kept).
        Anything else is InvalidArgument on `field`."""
        if not text:
            return None
        try:
            raw = base64.urlsafe_b64decode(text.encode("ascii"))
        except (binascii.Error, ValueError, UnicodeEncodeError):
            raw = b""
        if len(raw) == cls._layout.size:
            position, index = cls._layout.unpack(raw)
            cursor = cls(position, index)
            if 0 < position <= id_max and cursor.text == text:
                return cursor
        raise InvalidArgument(field, "is not a cursor of an event")


@dataclass(frozen=True, slots=True)
class TransferMoved:
    """A transfer event's body: the transfer, and its wallets' balances right after it. None
    for a wallet the reader may not see (another owner's, to a merchant or customer)."""

    transfer: Transfer
    source_balance: Balance | None
    target_balance: Balance | None


@dataclass(frozen=True, slots=True)
class BalanceAlert:
    """A wallet's balance alert as set (WALLET_ALERT_SET); None: none."""

    wallet_id: int
    unit: str
    low_balance_threshold: int | None
    top_up_to: int | None


@dataclass(frozen=True, slots=True)
class LowBalance:
    """A wallet's available balance fell below its threshold (LOW_BALANCE): its balance at the
    end of the transaction that made it fall."""

    wallet_id: int
    unit: str
    balance: Balance
    low_balance_threshold: int


@dataclass(frozen=True, slots=True)
class TopUpRequest:
    """A top-up asked for (TOP_UP_REQUESTED): a deposit of `amount` into the wallet, with
    `request_id` as its idempotency key and reference, brings it to `top_up_to`."""

    wallet_id: int
    unit: str
    request_id: str
    amount: int
    top_up_to: int
    balance: Balance


EventBody = (
    TransferMoved
    | Wallet
    | Unit
    | BalanceAlert
    | LowBalance
    | TopUpRequest
    | ApiKey
    | CertificateMapping
    | Grant
)


@dataclass(frozen=True, slots=True)
class Event:
    """One change, as the stream tells it. `cursor` is where the stream goes on after it;
    `actor` the caller that made it (the ledger's own changes: `system_caller`); `wallet_ids`
    the wallets it concerns (none for a unit)."""

    cursor: EventCursor
    type: EventType
    created_at: datetime
    actor: str
    wallet_ids: tuple[int, ...]
    body: EventBody


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Which events to list; empty: any. An event passes when it concerns one of `wallet_ids`
    (if given), one of the wallets of `owner_id` (if given), and is of one of `types`."""

    wallet_ids: tuple[int, ...] = ()
    owner_id: str | None = None
    types: tuple[EventType, ...] = ()


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events in commit order, and the cursor after the last event the page looked at (which,
    with a filter, may be past the last event it holds). `caught_up`: the page reached the
    newest event committed when it was read."""

    events: list[Event]
    cursor: EventCursor
    caught_up: bool


# Checks --------------------------------------------------------------------------------------


def check_balance_alert(low_balance_threshold: int | None, top_up_to: int | None) -> None:
    """A wallet's balance alert: a threshold (any balance; None: no alert) and, only with one,
    the amount to top up to, at least the threshold (so that a top-up re-arms the alert)."""
    for name, value in (("low_balance_threshold", low_balance_threshold), ("top_up_to", top_up_to)):
        if value is not None and (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not balance_min <= value <= balance_max
        ):
            raise InvalidArgument(name, f"must be an integer from {balance_min} to {balance_max}")
    if top_up_to is not None:
        if low_balance_threshold is None:
            raise InvalidArgument("top_up_to", "needs a low_balance_threshold")
        if top_up_to < low_balance_threshold:
            raise InvalidArgument("top_up_to", "must be at least low_balance_threshold")


def check_grant_terms(valid_from: datetime | None, expires_at: datetime | None) -> None:
    """A grant's terms as asked: times with a time zone, within the instants a grant may name
    (`check_grant_instant`), the expiry after the start. (That the expiry is still to come is
    the rules' to check, against the ledger's clock.)"""
    for name, value in (("valid_from", valid_from), ("expires_at", expires_at)):
        if value is not None:
            if not isinstance(value, datetime) or value.tzinfo is None:
                raise InvalidArgument(name, "must be a time with a time zone")
            check_grant_instant(name, value)
    if valid_from is not None and expires_at is not None and expires_at <= valid_from:
        raise InvalidArgument("expires_at", "must be after valid_from")


def check_grant_instant(name: str, value: datetime) -> None:
    """An instant of a grant's terms is from `grant_instant_min` to `grant_instant_max`."""
    if not grant_instant_min <= value <= grant_instant_max:
        raise InvalidArgument(
            name,
            f"must be from {grant_instant_min.isoformat()} to {grant_instant_max.isoformat()}",
        )


def _check_key(idempotency_key: str, caller: str) -> None:
    check_text("idempotency_key", idempotency_key, idempotency_key_length_max, required=True)
    check_text("caller", caller, caller_length_max, required=True)


def check_text(
    name: str, value: str, length_max: int, *, required: bool = False, subject: str = ""
) -> None:
    """`value`, the field `name` (or, with `subject`, a part of it such as "a key"), is text
    of at most `length_max` characters, without NUL; not empty if `required`."""
    said = f"{subject} " if subject else ""
    if not isinstance(value, str):
        raise InvalidArgument(name, f"{said}must be a string")
    if required and not value:
        raise InvalidArgument(name, f"{said}is required")
    if len(value) > length_max:
        raise InvalidArgument(name, f"{said}must be at most {length_max} characters")
    if "\x00" in value:
        raise InvalidArgument(name, f"{said}must not contain NUL characters")


def check_unit_code(name: str, value: str) -> None:
    if not value:
        raise InvalidArgument(name, "is required")
    if not _unit_code_pattern.fullmatch(value):
        raise InvalidArgument(
            name, f"must be 1 to {unit_code_length_max} letters, digits, '_', '-' or '.'"
        )


def check_id(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, "must be an integer id")
    if value == 0:
        raise InvalidArgument(name, "is required")
    if not 0 < value <= id_max:
        raise InvalidArgument(name, "must be a positive id")


def _check_amount(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(name, "must be an integer in minor units")
    if value <= 0:
        raise InvalidArgument(name, "must be positive")
    if value > amount_max:
        raise InvalidArgument(name, f"must be at most {amount_max}")


def check_enum(name: str, value: int, kind: type[IntEnum]) -> None:
    if value not in kind.__members__.values():
        raise InvalidArgument(name, "must be one of " + ", ".join(kind.__members__))


def _check_metadata(metadata: Mapping[str, str]) -> None:
    if len(metadata) > metadata_entries_max:
        raise InvalidArgument("metadata", f"must have at most {metadata_entries_max} entries")
    for key, value in metadata.items():
        check_text("metadata", key, metadata_key_length_max, required=True, subject="a key")
        check_text(f"metadata[{key}]", value, metadata_value_length_max)


_unhashed = frozenset({"idempotency_key", "caller", "linked", "owner_limit"})
# Fields added since operations were first stored: left out of the digest while None, so
# that a replay of an operation stored before they existed still matches it.
_hashed_when_set = frozenset({"valid_from", "expires_at"})
# Per operation type: a getter of its hashed fields' values, in their order, and the fields
# whose values take another form (position among them, name, form), the last first.
_hashed_fields: dict[type, tuple[attrgetter[Any], tuple[tuple[int, str, int], ...]]] = {}
_mapping, _enum, _time = 1, 2, 3


def _layout(kind: type) -> tuple[attrgetter[Any], tuple[tuple[int, str, int], ...]]:
    hints = get_type_hints(kind)
    names = [each.name for each in fields(kind) if each.name not in _unhashed]
    forms = [
        _mapping
        if name == "metadata"
        else _time
        if name in _hashed_when_set
        else _enum
        if isinstance(hints[name], type) and issubclass(hints[name], Enum)
        else None
        for name in names
    ]
    others = tuple(
        (position, names[position], form)
        for position, form in reversed(list(enumerate(forms)))
        if form is not None
    )
    # (attrgetter of two names or more gives a tuple; every operation has several.)
    assert len(names) > 1, kind
    return attrgetter(*names), others


def _hash(value: Any) -> bytes:
    """A digest of what a request asks for, to tell a replay from a reused key: of the repr of
    its type's name and its fields' values, which is stable across processes and versions.
    (tests/core/test_request_hash.py holds the digests stored so far.)"""
    kind = type(value)
    layout = _hashed_fields.get(kind)
    if layout is None:
        layout = _hashed_fields[kind] = _layout(kind)
    get, others = layout
    items: list[Any] = [kind.__name__, *get(value)]
    # The others, the last first, so that a value left out shifts none still to come.
    for position, name, form in others:
        item = items[position + 1]
        if form == _mapping:
            items[position + 1] = tuple(sorted(item.items())) if item else ()
        elif form == _enum:
            items[position + 1] = int(item)
        elif item is None:
            del items[position + 1]
        else:
            # One form of one instant, whatever its time zone.
            items[position + 1] = (name, item.astimezone(UTC).isoformat())
    return hashlib.blake2b(repr(items).encode(), digest_size=16).digest()
