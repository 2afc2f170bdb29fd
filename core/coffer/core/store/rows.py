"""Database rows to the domain's values: what the statements of `sql` return, as the model's
values (for answers) or the rules' states (for a batch to validate against).

Enums are looked up by value in dicts made once: faster than calling the enum, row after row.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import asyncpg

from .. import rules
from ..model import (
    Balance,
    Grant,
    Hold,
    HoldStatus,
    OwnerKind,
    Transfer,
    TransferKind,
    Unit,
    UnitKind,
    Wallet,
    WalletStatus,
    hold_lapsed,
    hold_status_resolved_by,
)

__all__ = [
    "grant",
    "grant_state",
    "hold",
    "instants_kept_max",
    "open_hold_state",
    "resolved_hold_state",
    "transfer",
    "transfer_state",
    "unit",
    "wallet",
    "wallet_state",
]

_owner_kinds = {member.value: member for member in OwnerKind}
_wallet_statuses = {member.value: member for member in WalletStatus}
_transfer_kinds = {member.value: member for member in TransferKind}


def unit(row: asyncpg.Record) -> Unit:
    return Unit(
        code=row["code"],
        kind=UnitKind(row["kind"]),
        name=row["name"],
        plural=row["plural"],
        description=row["description"],
        scale=row["scale"],
        default_validity=row["default_validity"],
        created_at=row["created_at"],
    )


def wallet(row: asyncpg.Record) -> Wallet:
    return Wallet(
        id=row["id"],
        owner_id=row["owner_id"],
        owner_kind=_owner_kinds[row["owner_kind"]],
        unit=row["unit"],
        status=_wallet_statuses[row["status"]],
        balance_minimum=row["balance_minimum"],
        balance=Balance(
            posted=row["posted"], pending=row["pending"], unspendable=row["unspendable"]
        ),
        metadata=row["metadata"] or {},
        created_at=row["created_at"],
        low_balance_threshold=row["low_balance_threshold"],
        top_up_to=row["top_up_to"],
    )


def transfer(row: asyncpg.Record) -> Transfer:
    return Transfer(
        id=row["id"],
        operation_id=row["operation_id"],
        kind=_transfer_kinds[row["kind"]],
        source_wallet_id=row["source_wallet_id"],
        target_wallet_id=row["target_wallet_id"],
        unit=row["unit"],
        amount=row["amount"],
        amount_requested=row["amount_requested"],
        note=row["note"] or "",
        reference=row["reference"] or "",
        performed_by=row["performed_by"] or "",
        metadata=row["metadata"] or {},
        created_at=row["created_at"],
        voids_transfer_id=row["voids_transfer_id"],
        hold_id=row["hold_id"],
        hold_expires_at=row["hold_expires_at"],
        voided_by_transfer_id=row["voided_by"],
    )


def hold(row: asyncpg.Record, now: datetime) -> Hold:
    """A hold as it stands at `now` (the ledger's clock): one past its expiry is expired, even
    before it is released in the journal."""
    if row["resolved_kind"] is not None:
        status = hold_status_resolved_by[TransferKind(row["resolved_kind"])]
    elif hold_lapsed(row["hold_expires_at"], now):
        status = HoldStatus.expired
    else:
        status = HoldStatus.pending
    return Hold(
        id=row["id"],
        source_wallet_id=row["source_wallet_id"],
        target_wallet_id=row["target_wallet_id"],
        unit=row["unit"],
        amount=row["amount"],
        status=status,
        expires_at=row["hold_expires_at"],
        created_at=row["created_at"],
        resolved_by_transfer_id=row["resolved_by"],
        amount_captured=row["resolved_amount"] if status == HoldStatus.captured else 0,
    )


def wallet_state(row: asyncpg.Record) -> rules.WalletState:
    """From a row of `sql.lock_wallets` (or `sql.select_wallet_states`), whose columns are the
    state's fields in their order (by position: a batch locks up to thousands)."""
    wallet_id, unit, owner_kind, status, *rest = row[:_wallet_state_fields]
    return rules.WalletState(
        wallet_id, unit, _owner_kinds[owner_kind], _wallet_statuses[status], *rest
    )


# The fields read: all but the grants and the cache of their order.
_wallet_state_fields = len(dataclasses.fields(rules.WalletState)) - 2


def grant(row: asyncpg.Record) -> Grant:
    return Grant(
        id=row["id"],
        wallet_id=row["wallet_id"],
        unit=row["unit"],
        transfer_id=row["transfer_id"],
        amount=row["amount"],
        remaining=row["remaining"],
        valid_from=row["valid_from"],
        expires_at=row["expires_at"],
        expired=row["expired"],
        created_at=row["created_at"],
    )


def grant_state(row: asyncpg.Record) -> rules.GrantState:
    """From a row of `sql.select_live_grants` or `sql.select_named_grants`, whose first columns
    are the state's fields in their order (by position: a batch may read thousands), its
    instants in microseconds since the epoch."""
    (
        grant_id,
        wallet_id,
        amount,
        remaining,
        valid_from,
        expires_at,
        expired,
        voided,
    ) = row[:_grant_state_fields]
    return rules.GrantState(
        grant_id,
        wallet_id,
        amount,
        remaining,
        _instants[valid_from],
        None if expires_at is None else _instants[expires_at],
        expired,
        voided,
    )


_grant_state_fields = len(dataclasses.fields(rules.GrantState))

# Instants kept as datetimes by their microseconds since the epoch (about 14 MB at most); past
# this many, the cache starts over.
instants_kept_max = 100_000
_epoch = datetime(1970, 1, 1, tzinfo=UTC)


class _Instants(dict[int, datetime]):
    """Instants by their microseconds since the epoch, made once: the same expiries come back
    batch after batch (a wallet's grants are read by each batch that touches it; many grants
    share an expiry, as the end of a month), and a look-up costs a fraction of making one."""

    def __missing__(self, micros: int) -> datetime:
        if len(self) >= instants_kept_max:
            self.clear()
        instant = self[micros] = _epoch + timedelta(microseconds=micros)
        return instant


_instants = _Instants()


def open_hold_state(row: asyncpg.Record) -> rules.HoldState:
    """An open hold, from its row of pending_holds."""
    return rules.HoldState(
        id=row["transfer_id"],
        source_wallet_id=row["source_wallet_id"],
        target_wallet_id=row["target_wallet_id"],
        amount=row["amount"],
        expires_at=row["expires_at"],
    )


def resolved_hold_state(row: asyncpg.Record, resolution: TransferKind) -> rules.HoldState:
    """A hold no longer open, from the transfer that placed it; `resolution`: the kind of
    transfer that resolved it."""
    return rules.HoldState(
        id=row["id"],
        source_wallet_id=row["source_wallet_id"],
        target_wallet_id=row["target_wallet_id"],
        amount=row["amount"],
        expires_at=row["hold_expires_at"],
        resolution=resolution,
    )


def transfer_state(row: asyncpg.Record) -> rules.TransferState:
    return rules.TransferState(
        id=row["id"],
        kind=_transfer_kinds[row["kind"]],
        source_wallet_id=row["source_wallet_id"],
        target_wallet_id=row["target_wallet_id"],
        amount=row["amount"],
    )
