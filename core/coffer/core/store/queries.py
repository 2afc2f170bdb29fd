"""Transfers and holds as they are read back: one, a page of history, and the stored results
of operations (what a replay answers), each transfer with what it changed in grants (its
allocations, read in one more query for all of them). `now` is the ledger's clock, by which an
open hold past its expiry reads as expired."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from datetime import datetime

import asyncpg

from .. import errors
from ..model import (
    Allocation,
    Applied,
    Hold,
    Page,
    Transfer,
    TransferFilter,
    TransferKind,
    operation_transfers_max,
    page_size_max,
)
from . import rows, sql

__all__ = [
    "get_hold",
    "get_transfer",
    "holds",
    "list_transfers",
    "stored_results",
    "with_allocations",
]


async def get_transfer(connection: asyncpg.Connection, transfer_id: int) -> Transfer:
    found = await connection.fetch(sql.select_transfer, transfer_id)
    if not found:
        raise errors.TransferNotFound(f"transfer {transfer_id} does not exist")
    [transfer] = await with_allocations(connection, [rows.transfer(found[0])])
    return transfer


async def list_transfers(
    connection: asyncpg.Connection,
    where: TransferFilter,
    *,
    page_size: int,
    before_id: int | None,
) -> Page[Transfer]:
    """Newest first."""
    assert 0 < page_size <= page_size_max
    query, arguments = sql.select_transfers_page(where, page_size + 1, before_id)
    found = await connection.fetch(query, *arguments)
    transfers = [rows.transfer(row) for row in found[:page_size]]
    cursor = transfers[-1].id if len(found) > page_size else None
    return Page(await with_allocations(connection, transfers), cursor)


async def with_allocations(
    connection: asyncpg.Connection, transfers: Sequence[Transfer]
) -> list[Transfer]:
    """The transfers, each with what it changed in grants, by grant id."""
    if not transfers:
        return []
    found = await connection.fetch(
        sql.select_transfer_allocations, [transfer.id for transfer in transfers]
    )
    if not found:
        return list(transfers)
    allocated: dict[int, list[Allocation]] = {}
    for row in found:
        allocated.setdefault(row["transfer_id"], []).append(
            Allocation(row["grant_id"], row["amount"])
        )
    return [
        transfer._replace(allocations=tuple(allocated[transfer.id]))
        if transfer.id in allocated
        else transfer
        for transfer in transfers
    ]


async def get_hold(connection: asyncpg.Connection, hold_id: int, now: datetime) -> Hold:
    found = await holds(connection, [hold_id], now)
    if hold_id not in found:
        raise errors.HoldNotFound(f"hold {hold_id} does not exist")
    return found[hold_id]


async def holds(
    connection: asyncpg.Connection, hold_ids: Collection[int], now: datetime
) -> dict[int, Hold]:
    """The holds that exist among `hold_ids`, as they stand at `now`."""
    found = await connection.fetch(sql.select_holds, list(hold_ids), TransferKind.hold)
    return {row["id"]: rows.hold(row, now) for row in found}


async def stored_results(
    connection: asyncpg.Connection, operation_ids: Collection[int], now: datetime
) -> dict[int, Applied]:
    """What the stored operations produced, answered again: their transfers, and the hold each
    placed or resolved as it stands now."""
    found = await connection.fetch(
        sql.select_operation_transfers, list(operation_ids), operation_transfers_max
    )
    grouped: dict[int, list[Transfer]] = {}
    for transfer in await with_allocations(connection, [rows.transfer(row) for row in found]):
        grouped.setdefault(transfer.operation_id, []).append(transfer)
    hold_of = {
        operation_id: transfers[0].id
        if transfers[0].kind == TransferKind.hold
        else transfers[0].hold_id
        for operation_id, transfers in grouped.items()
    }
    held = await holds(connection, {hold_id for hold_id in hold_of.values() if hold_id}, now)
    return {
        operation_id: Applied(
            tuple(transfers), hold=held.get(hold_of[operation_id] or 0), replayed=True
        )
        for operation_id, transfers in grouped.items()
    }
