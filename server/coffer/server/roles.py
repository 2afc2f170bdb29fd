"""The role matrix: which roles may call each RPC, in one table, `allowed`.

Every RPC the server serves is in the table, by its full name; an RPC that is not (a new one,
not yet decided) is refused to every role, and a test fails until it is added. `SubmitBatch`
is allowed operation by operation: each operation of a batch as the single RPC of its kind
(`batch_operations`), and one a role may not do refuses the whole call before anything is
applied.

Merchants and customers are limited to their own wallets (those of their kind whose owner id
is theirs) wherever they are allowed: the server checks reads after fetching (another owner's
wallet, transfer or hold is NOT_FOUND, as a missing one), and the ledger checks operations on
the wallets it locks (`Operation.owner_limit`, `coffer.core.rules`). What each may do to its
own is `scoped_to_own`, which the README's table shows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from coffer.core import errors
from coffer.core.model import Principal, Role

__all__ = [
    "allowed",
    "audit_readers",
    "authorize",
    "batch_method",
    "batch_operations",
    "everyone",
    "scoped_to_own",
]

admin, manager, service, merchant, customer = (
    Role.admin,
    Role.manager,
    Role.service,
    Role.merchant,
    Role.customer,
)
everyone = frozenset(Role)
_staff = frozenset({admin, manager, service})
_units = "coffer.v1.UnitService."
_wallets = "coffer.v1.WalletService."
_transfers = "coffer.v1.TransferService."
_holds = "coffer.v1.HoldService."
_access = "coffer.v1.AccessService."
_events = "coffer.v1.EventService."
_grants = "coffer.v1.GrantService."
_reports = "coffer.v1.ReportService."
batch_method = _transfers + "SubmitBatch"

# RPC full name -> the roles that may call it.
allowed: Mapping[str, frozenset[Role]] = {
    _units + "CreateUnit": frozenset({admin}),
    _units + "GetUnit": everyone,
    _units + "ListUnits": everyone,
    _wallets + "CreateWallet": _staff,
    _wallets + "GetWallet": everyone,
    _wallets + "GetBalance": everyone,
    _wallets + "ListWallets": everyone,
    _wallets + "CancelWallet": frozenset({admin, manager}),
    _wallets + "SetBalanceAlert": _staff,
    _transfers + "Credit": _staff,
    _transfers + "Debit": _staff | {customer},
    _transfers + "Transfer": frozenset({admin, service}),
    _transfers + "Deposit": frozenset({admin, service}),
    _transfers + "Withdraw": frozenset({admin, service, merchant}),
    _transfers + "Pay": frozenset({admin, service, customer}),
    _transfers + "Void": _staff | {merchant},
    # Operation by operation, each as its RPC (batch_operations).
    batch_method: everyone,
    _transfers + "GetTransfer": everyone,
    _transfers + "ListTransfers": everyone,
    _holds + "PlaceHold": frozenset({admin, service, customer}),
    _holds + "CaptureHold": frozenset({admin, service, merchant}),
    _holds + "ReleaseHold": _staff | {merchant},
    _holds + "GetHold": everyone,
    _access + "CreateApiKey": frozenset({admin}),
    _access + "ListApiKeys": frozenset({admin}),
    _access + "RevokeApiKey": frozenset({admin}),
    _access + "MapCertificate": frozenset({admin}),
    _access + "UnmapCertificate": frozenset({admin}),
    _access + "ListCertificateMappings": frozenset({admin}),
    _events + "ListEvents": everyone,
    _events + "WatchEvents": everyone,
    _grants + "ListGrants": everyone,
    _grants + "GetFutureBalance": everyone,
    _grants + "RunExpiration": _staff,
    _reports + "ListUsage": everyone,
    _reports + "GetOutstanding": _staff,
    _reports + "GetPastBalance": everyone,
}

# Who may read the audit trail of access in the event stream (keys made and revoked,
# certificates mapped and unmapped): those who may list the keys. To the others, those events
# are not there.
audit_readers = allowed[_access + "ListApiKeys"]

# A batch operation's kind (the `operation` oneof of coffer.v1.Operation) -> its RPC.
batch_operations: Mapping[str, str] = {
    "credit": _transfers + "Credit",
    "debit": _transfers + "Debit",
    "transfer": _transfers + "Transfer",
    "deposit": _transfers + "Deposit",
    "withdraw": _transfers + "Withdraw",
    "pay": _transfers + "Pay",
    "void": _transfers + "Void",
    "place_hold": _holds + "PlaceHold",
    "capture_hold": _holds + "CaptureHold",
    "release_hold": _holds + "ReleaseHold",
}

# What merchants and customers may do where they are allowed, for the README's table.
scoped_to_own: Mapping[str, str] = {
    _wallets + "GetWallet": "own wallets",
    _wallets + "GetBalance": "own wallets",
    _wallets + "ListWallets": "own wallets (the owner filter is forced)",
    _transfers + "Debit": "from an own wallet",
    _transfers + "Withdraw": "from an own wallet",
    _transfers + "Pay": "from an own wallet, to any merchant's",
    _transfers + "Void": "payments into an own wallet (refunds)",
    _transfers + "GetTransfer": "transfers from or to an own wallet",
    _transfers + "ListTransfers": "history of an own wallet (`wallet_id` required)",
    _holds + "PlaceHold": "on an own wallet",
    _holds + "CaptureHold": "holds towards an own wallet",
    _holds + "ReleaseHold": "holds towards an own wallet",
    _holds + "GetHold": "holds from or towards an own wallet",
    _events + "ListEvents": "events of own wallets (the owner scope is forced)",
    _events + "WatchEvents": "events of own wallets (the owner scope is forced)",
    _grants + "ListGrants": "own wallets",
    _grants + "GetFutureBalance": "own wallets",
    _reports + "ListUsage": "usage of own wallets (the owner filter is forced)",
    _reports + "GetPastBalance": "own wallets",
}


# The roles that may do every kind of batch operation: their batches need no look at each
# operation, so that a call costs them the same whatever its size.
_every_batch_operation = frozenset(
    role for role in Role if all(role in allowed[rpc] for rpc in batch_operations.values())
)


def authorize(principal: Principal, method: str, request: Any) -> None:
    """Raises PermissionDenied unless the principal's role may call `method` (an RPC's full
    name) with `request`: for a batch, every operation it holds."""
    role = principal.role
    if role not in allowed.get(method, ()):
        raise errors.PermissionDenied(f"the role {role.name} may not call {_short(method)}")
    if method == batch_method and role not in _every_batch_operation:
        for index, operation in enumerate(request.operations):
            kind = operation.WhichOneof("operation")
            if kind is not None and role not in allowed[batch_operations[kind]]:
                raise errors.PermissionDenied(
                    f"the role {role.name} may not {kind} (operation {index} of the batch); "
                    "nothing was applied"
                )


def _short(method: str) -> str:
    """`TransferService.Credit` of `coffer.v1.TransferService.Credit`."""
    return method.removeprefix("coffer.v1.")
