"""Units and wallets: created, read, listed, cancelled. Each function runs on the connection
it is given, in the transaction the caller began where it writes; `now` is the ledger's clock,
by which a wallet's lapsed holds no longer count as pending."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from .. import errors
from ..model import (
    NewWallet,
    OwnerKind,
    Page,
    Unit,
    Wallet,
    WalletStatus,
    page_size_max,
    unit_system_wallets,
)
from . import rows, sql
from .keys import key_reused

__all__ = [
    "cancel_wallet",
    "create_unit",
    "create_wallet",
    "get_unit",
    "get_wallet",
    "list_units",
    "list_wallets",
    "set_balance_alert",
]


async def create_unit(connection: asyncpg.Connection, unit: Unit) -> tuple[Unit, bool]:
    """Creates the unit and its system wallets; idempotent for the same definition. Returns
    the unit, and whether it was created now."""
    row = await connection.fetchrow(
        sql.insert_unit,
        unit.code,
        unit.kind,
        unit.name,
        unit.plural,
        unit.description,
        unit.scale,
        unit.default_validity,
    )
    if row is None:
        found = await connection.fetchrow(sql.select_unit, unit.code)
        assert found is not None, unit.code  # Units are never deleted.
        existing = rows.unit(found)
        if not existing.same_definition(unit):
            raise errors.UnitExists(f"unit {unit.code} exists with another definition")
        return existing, False
    await connection.executemany(
        sql.insert_system_wallet,
        [(which.name, OwnerKind.system, unit.code) for which in unit_system_wallets],
    )
    return rows.unit(row), True


async def get_unit(connection: asyncpg.Connection, code: str) -> Unit:
    row = await connection.fetchrow(sql.select_unit, code)
    if row is None:
        raise errors.UnitNotFound(f"unit {code} does not exist")
    return rows.unit(row)


async def list_units(connection: asyncpg.Connection) -> list[Unit]:
    return [rows.unit(row) for row in await connection.fetch(sql.select_units)]


async def create_wallet(
    connection: asyncpg.Connection, new: NewWallet, now: datetime
) -> tuple[Wallet, bool]:
    """Creates the wallet; returns it, and whether this was a replay of an earlier request
    with the same key (the wallet it created then)."""
    request_hash = new.request_hash()
    if not await connection.fetchval(sql.select_unit_exists, new.unit):
        raise errors.UnitNotFound(f"unit {new.unit} does not exist")
    row = await connection.fetchrow(
        sql.insert_wallet,
        new.owner_id,
        new.owner_kind,
        new.unit,
        new.balance_minimum,
        dict(new.metadata) or None,
        new.caller,
        new.idempotency_key,
        request_hash,
        now,
        new.low_balance_threshold,
        new.top_up_to,
    )
    if row is not None:
        return rows.wallet(row), False
    row = await connection.fetchrow(sql.select_wallet_by_key, new.caller, new.idempotency_key, now)
    assert row is not None
    if row["request_hash"] != request_hash:
        raise key_reused(new.idempotency_key)
    return rows.wallet(row), True


async def get_wallet(connection: asyncpg.Connection, wallet_id: int, now: datetime) -> Wallet:
    row = await connection.fetchrow(sql.select_wallet, wallet_id, now)
    if row is None:
        raise errors.WalletNotFound(f"wallet {wallet_id} does not exist")
    return rows.wallet(row)


async def list_wallets(
    connection: asyncpg.Connection,
    now: datetime,
    *,
    owner_id: str | None,
    owner_kind: OwnerKind | None,
    unit: str | None,
    page_size: int,
    after_id: int,
) -> Page[Wallet]:
    assert 0 < page_size <= page_size_max
    found = await connection.fetch(
        sql.select_wallets, after_id, owner_id, owner_kind, unit, page_size + 1, now
    )
    wallets = [rows.wallet(row) for row in found[:page_size]]
    cursor = wallets[-1].id if len(found) > page_size else None
    return Page(wallets, cursor)


async def cancel_wallet(
    connection: asyncpg.Connection, wallet_id: int, now: datetime
) -> tuple[Wallet, bool]:
    """Cancels an empty wallet (nothing posted, nothing on hold); idempotent. Returns the
    wallet, and whether it was cancelled now."""
    wallet = await _lock_user_wallet(connection, wallet_id, now)
    if wallet.status == WalletStatus.cancelled:
        return wallet, False
    if wallet.balance.posted != 0 or wallet.balance.pending != 0:
        raise errors.WalletNotEmpty(
            f"wallet {wallet_id} holds {wallet.balance.posted}"
            f" with {wallet.balance.pending} on hold; empty it first"
        )
    row = await connection.fetchrow(
        sql.update_wallet_status, wallet_id, WalletStatus.cancelled, now
    )
    assert row is not None
    return rows.wallet(row), True


async def set_balance_alert(
    connection: asyncpg.Connection,
    wallet_id: int,
    low_balance_threshold: int | None,
    top_up_to: int | None,
    now: datetime,
) -> tuple[Wallet, bool]:
    """Sets an active customer's or merchant's wallet's balance alert (None: none; checked by
    `model.check_balance_alert`); idempotent. Returns the wallet, and whether the alert
    changed. The alert counts from now: a wallet below its new threshold already crosses it
    only once it has been back at or above it."""
    wallet = await _lock_user_wallet(connection, wallet_id, now)
    if wallet.status != WalletStatus.active:
        raise errors.WalletNotActive(f"wallet {wallet_id} is {wallet.status.name}")
    if (wallet.low_balance_threshold, wallet.top_up_to) == (low_balance_threshold, top_up_to):
        return wallet, False
    row = await connection.fetchrow(
        sql.update_balance_alert, wallet_id, low_balance_threshold, top_up_to, now
    )
    assert row is not None
    return rows.wallet(row), True


async def _lock_user_wallet(
    connection: asyncpg.Connection, wallet_id: int, now: datetime
) -> Wallet:
    """Locks a customer's or merchant's wallet; returns it as it stands."""
    row = await connection.fetchrow(sql.lock_wallet, wallet_id, now)
    if row is None:
        raise errors.WalletNotFound(f"wallet {wallet_id} does not exist")
    wallet = rows.wallet(row)
    if wallet.owner_kind == OwnerKind.system:
        raise errors.WalletKindMismatch(f"wallet {wallet_id} is a system wallet")
    return wallet
