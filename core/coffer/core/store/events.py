"""The event stream: one record per committed write transaction, in commit order; and the
events read back from the records.

Order. Every write transaction (a batch, a unit or a wallet created, a wallet cancelled, a
balance alert set) ends with `record`, one statement that updates the one-row counter
(`event_counter`: `position = position + 1`), inserts the record at the position it gives, and
notifies `coffer_events`. The counter's row lock, taken by that update, is held until the
transaction commits; the next transaction's update waits for it, and reads the counter
committed. So:

- positions are given in commit order: a transaction gets position k only once k - 1's
  transaction has committed (and become visible: PostgreSQL releases a transaction's locks
  after it marks it committed);
- there is no gap: a transaction that rolls back, before or after its update, gives its
  position back, as the counter's update rolls back with it;
- a reader whose snapshot sees position k sees every position below it, committed before k's
  transaction could take the counter;
- per wallet, events come in the order their transactions locked the wallet: a later batch
  touching a wallet waits for the earlier one's lock, so it takes the counter after the earlier
  one committed.

The cost: from the counter's update to the end of its commit (the commit's fsync, with
synchronous commit on), no other write transaction can commit — commits pass one at a time, and
PostgreSQL can no longer flush several in one fsync (group commit). The update comes last, so
the serialised part is that one statement and the commit; batches still validate and write in
parallel up to it. docs/performance.md measures it.

Records. A batch's record names the transfers it wrote, in the order they were applied (the
journal holds the transfers themselves), with the balances of each transfer's source and target
right after it, packed as four little-endian int64 per transfer (source posted, source pending,
target posted, target pending): one `bytes`, built in C, rather than a Python object per
transfer. The other changes (`Change`: a unit or a wallet created, a wallet cancelled, a
balance alert set, a low balance, a top-up requested, and whatever later writers record) are a
JSON array after them, each with its actor and its wallets. A record's events are its
transfers, then its changes, in that stable order; event i of the record at position p is
`EventCursor(p, i)`.

Reading. `read_page` reads in one snapshot (repeatable read): the counter, the records from the
cursor on, the journal's transfers they name. It looks at a bounded number of events per page
(`page_size` without a filter; with one, up to `model.events_scanned_max`, the transfers among
them read from the journal with the filter applied there), so a filter that matches little
costs a bounded amount per page and moves the cursor on. A record keeps no list of the wallets
it concerns: it would make every write pay for the filtered reads.

Retention (`delete_before`) deletes the oldest records, a prefix of the positions, so that the
positions kept are contiguous and a cursor below the oldest kept answers EventsCursorExpired.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from .. import errors, rules
from ..model import (
    ApiKey,
    Balance,
    BalanceAlert,
    CertificateMapping,
    Event,
    EventBody,
    EventCursor,
    EventFilter,
    EventPage,
    EventType,
    Grant,
    LowBalance,
    Owner,
    OwnerKind,
    Role,
    TopUpRequest,
    Transfer,
    TransferMoved,
    Unit,
    UnitKind,
    Wallet,
    WalletStatus,
    access_event_types,
    event_type_of_kind,
    events_scanned_max,
    page_size_max,
    system_caller,
)
from . import rows, sql

__all__ = [
    "Change",
    "access_change",
    "alert_change",
    "delete_before",
    "grant_change",
    "low_balance_change",
    "pack_balances",
    "read_page",
    "record",
    "retention_chunk_max",
    "top_up_change",
    "unit_change",
    "wallet_change",
]

# Records one statement of retention deletes at most.
retention_chunk_max = 1000
# Records one read of a page fetches at once (each may name thousands of transfers).
_commits_read_max = 16
_balances = struct.Struct("<4q")
_little_endian = sys.byteorder == "little"


@dataclass(frozen=True, slots=True)
class Change:
    """A change other than a transfer, as a record keeps it: its type, who made it, the wallets
    it concerns, and its body (JSON, decoded by `_body`)."""

    type: EventType
    actor: str
    wallet_ids: tuple[int, ...]
    body: dict[str, Any]

    def json(self) -> dict[str, Any]:
        return {
            "type": int(self.type),
            "actor": self.actor,
            "wallet_ids": list(self.wallet_ids),
            **self.body,
        }


def pack_balances(values: Sequence[int]) -> bytes:
    """Balances after each transfer (four per transfer, flat), as `record` takes them."""
    packed = array("q", values)
    if not _little_endian:
        packed.byteswap()
    return packed.tobytes()


async def record(
    connection: asyncpg.Connection,
    created_at: datetime,
    *,
    transfer_ids: Sequence[int] = (),
    balances: bytes = b"",
    changes: Sequence[Change] = (),
) -> int:
    """Writes the record of the transaction `connection` is in, as its last statement (see the
    module's docstring: the transaction must end right after); returns its position. Every
    writer calls this: `transfer_ids` in the order applied, with their `balances` after
    (`pack_balances`), and `changes`."""
    assert transfer_ids or changes
    assert len(balances) == _balances.size * len(transfer_ids), (len(balances), transfer_ids)
    position: int = await connection.fetchval(
        sql.insert_commit,
        created_at,
        transfer_ids,
        balances,
        [change.json() for change in changes],
    )
    return position


# Changes ---------------------------------------------------------------------------------------


def wallet_change(type_: EventType, wallet: Wallet, actor: str) -> Change:
    """A wallet created or cancelled: the wallet as it then was."""
    return Change(type_, actor, (wallet.id,), {"wallet": _wallet_json(wallet)})


def unit_change(unit: Unit, actor: str) -> Change:
    assert unit.created_at is not None
    return Change(
        EventType.unit_created,
        actor,
        (),
        {
            "unit": {
                "code": unit.code,
                "kind": int(unit.kind),
                "name": unit.name,
                "plural": unit.plural,
                "description": unit.description,
                "scale": unit.scale,
                "default_validity": unit.default_validity,
                "created_at": unit.created_at.isoformat(),
            }
        },
    )


def grant_change(type_: EventType, grant: Grant, actor: str) -> Change:
    """A grant made, or expiring soon: the grant as it then was."""
    return Change(
        type_,
        actor,
        (grant.wallet_id,),
        {
            "grant": {
                "id": grant.id,
                "wallet_id": grant.wallet_id,
                "unit": grant.unit,
                "transfer_id": grant.transfer_id,
                "amount": grant.amount,
                "remaining": grant.remaining,
                "valid_from": grant.valid_from.isoformat(),
                "expires_at": None if grant.expires_at is None else grant.expires_at.isoformat(),
                "expired": grant.expired,
                "created_at": grant.created_at.isoformat(),
            }
        },
    )


def alert_change(wallet: Wallet, actor: str) -> Change:
    return Change(
        EventType.wallet_alert_set,
        actor,
        (wallet.id,),
        {
            "unit": wallet.unit,
            "low_balance_threshold": wallet.low_balance_threshold,
            "top_up_to": wallet.top_up_to,
        },
    )


def low_balance_change(
    wallet_id: int, unit: str, balance: Balance, threshold: int, actor: str
) -> Change:
    return Change(
        EventType.low_balance,
        actor,
        (wallet_id,),
        {"unit": unit, **_balance_json(balance), "low_balance_threshold": threshold},
    )


def top_up_change(
    wallet_id: int,
    unit: str,
    balance: Balance,
    request_id: str,
    top_up_to: int,
    actor: str,
) -> Change:
    """A top-up asked for: what brings the available balance to `top_up_to`."""
    return Change(
        EventType.top_up_requested,
        actor,
        (wallet_id,),
        {
            "unit": unit,
            **_balance_json(balance),
            "request_id": request_id,
            "amount": top_up_to - balance.available,
            "top_up_to": top_up_to,
        },
    )


def _balance_json(balance: Balance) -> dict[str, int]:
    return {
        "posted": balance.posted,
        "pending": balance.pending,
        "unspendable": balance.unspendable,
    }


def access_change(type_: EventType, credential: ApiKey | CertificateMapping, actor: str) -> Change:
    """A credential made, revoked or unmapped (the audit trail of access): its record, never
    a secret. It concerns no wallet."""
    assert type_ in access_event_types, type_
    common = {
        "name": credential.name,
        "role": int(credential.role),
        "owner_id": credential.owner_id,
        "created_at": credential.created_at.isoformat(),
        "created_by": credential.created_by,
    }
    if isinstance(credential, CertificateMapping):
        mapping = {"id": credential.id, "subject": credential.subject, **common}
        return Change(type_, actor, (), {"certificate_mapping": mapping})
    return Change(
        type_,
        actor,
        (),
        {
            "api_key": {
                "id": credential.id,
                **common,
                "expires_at": _time_json(credential.expires_at),
                "revoked_at": _time_json(credential.revoked_at),
            }
        },
    )


def _time_json(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _time(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _wallet_json(wallet: Wallet) -> dict[str, Any]:
    return {
        "id": wallet.id,
        "owner_id": wallet.owner_id,
        "owner_kind": int(wallet.owner_kind),
        "unit": wallet.unit,
        "status": int(wallet.status),
        "balance_minimum": wallet.balance_minimum,
        "posted": wallet.balance.posted,
        "pending": wallet.balance.pending,
        "metadata": dict(wallet.metadata),
        "created_at": wallet.created_at.isoformat(),
        "low_balance_threshold": wallet.low_balance_threshold,
        "top_up_to": wallet.top_up_to,
    }


def _body(change: dict[str, Any]) -> EventBody:
    """A change's body, as the model's value."""
    type_ = EventType(change["type"])
    if type_ in (EventType.wallet_created, EventType.wallet_cancelled):
        wallet = change["wallet"]
        return Wallet(
            id=wallet["id"],
            owner_id=wallet["owner_id"],
            owner_kind=OwnerKind(wallet["owner_kind"]),
            unit=wallet["unit"],
            status=WalletStatus(wallet["status"]),
            balance_minimum=wallet["balance_minimum"],
            balance=Balance(wallet["posted"], wallet["pending"]),
            metadata=wallet["metadata"],
            created_at=datetime.fromisoformat(wallet["created_at"]),
            low_balance_threshold=wallet["low_balance_threshold"],
            top_up_to=wallet["top_up_to"],
        )
    if type_ in (EventType.grant_created, EventType.grant_expiring_soon):
        grant = change["grant"]
        return Grant(
            id=grant["id"],
            wallet_id=grant["wallet_id"],
            unit=grant["unit"],
            transfer_id=grant["transfer_id"],
            amount=grant["amount"],
            remaining=grant["remaining"],
            valid_from=datetime.fromisoformat(grant["valid_from"]),
            expires_at=_time(grant["expires_at"]),
            expired=grant["expired"],
            created_at=datetime.fromisoformat(grant["created_at"]),
        )
    if type_ == EventType.unit_created:
        unit = change["unit"]
        return Unit(
            code=unit["code"],
            kind=UnitKind(unit["kind"]),
            name=unit["name"],
            plural=unit["plural"],
            description=unit["description"],
            scale=unit["scale"],
            # Records of units made before units had a default validity have none.
            default_validity=unit.get("default_validity", ""),
            created_at=datetime.fromisoformat(unit["created_at"]),
        )
    if type_ in (EventType.api_key_created, EventType.api_key_revoked):
        key = change["api_key"]
        return ApiKey(
            id=key["id"],
            name=key["name"],
            role=Role(key["role"]),
            owner_id=key["owner_id"],
            created_at=datetime.fromisoformat(key["created_at"]),
            created_by=key["created_by"],
            expires_at=_time(key["expires_at"]),
            revoked_at=_time(key["revoked_at"]),
        )
    if type_ in (EventType.certificate_mapped, EventType.certificate_unmapped):
        mapping = change["certificate_mapping"]
        return CertificateMapping(
            id=mapping["id"],
            subject=mapping["subject"],
            name=mapping["name"],
            role=Role(mapping["role"]),
            owner_id=mapping["owner_id"],
            created_at=datetime.fromisoformat(mapping["created_at"]),
            created_by=mapping["created_by"],
        )
    (wallet_id,) = change["wallet_ids"]
    if type_ == EventType.wallet_alert_set:
        return BalanceAlert(
            wallet_id, change["unit"], change["low_balance_threshold"], change["top_up_to"]
        )
    # Records made before grants have no unspendable part.
    balance = Balance(change["posted"], change["pending"], change.get("unspendable", 0))
    if type_ == EventType.low_balance:
        return LowBalance(wallet_id, change["unit"], balance, change["low_balance_threshold"])
    assert type_ == EventType.top_up_requested, change
    return TopUpRequest(
        wallet_id,
        change["unit"],
        change["request_id"],
        change["amount"],
        change["top_up_to"],
        balance,
    )


# Reading ---------------------------------------------------------------------------------------


async def read_page(
    connection: asyncpg.Connection,
    after: EventCursor | None,
    *,
    page_size: int,
    where: EventFilter,
    owner_scope: Owner | None,
    hidden_types: frozenset[EventType] = frozenset(),
) -> EventPage:
    """The events from `after` on (None: from the oldest kept), in commit order, that pass
    `where` and, with `owner_scope`, concern a wallet of that owner (its kind and id); at most
    `page_size`.
    Raises EventsCursorExpired for a cursor below the oldest kept, InvalidArgument for one past
    the newest given."""
    assert 0 < page_size <= page_size_max
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        bounds = await connection.fetchrow(sql.select_event_bounds)
        assert bounds is not None
        head, kept_from = bounds["head"], bounds["kept_from"]
        cursor = after or EventCursor(kept_from)
        if cursor.position < kept_from:
            raise errors.EventsCursorExpired(
                "the cursor names events older than the oldest kept (retention); the oldest"
                f" cursor still available is {EventCursor(kept_from).text!r}"
            )
        if cursor.position > head + 1 or (cursor.position == head + 1 and cursor.index):
            raise errors.InvalidArgument("after_cursor", "names no event of this ledger")
        owned = None if owner_scope is None else await _owned(connection, owner_scope)
        wallets = await _wallets_of(connection, where, owned)
        if wallets is not None and not wallets:
            # No wallet to match: nothing up to the head can.
            return EventPage([], EventCursor(head + 1), True)
        filtered = wallets is not None or bool(where.types) or bool(hidden_types)
        slots, end = await _slots(
            connection, cursor, head, events_scanned_max if filtered else page_size
        )
        transfers = await _transfers(connection, slots, wallets, where)
    events: list[Event] = []
    for slot in slots:
        event = _event(slot, transfers, wallets, where, owned, hidden_types)
        if event is None:
            continue
        events.append(event)
        if len(events) == page_size:
            end = event.cursor
            break
    return EventPage(events, end, end.position > head)


@dataclass(frozen=True, slots=True)
class _Slot:
    """Event `index` of a record, and the cursor after it."""

    record: asyncpg.Record
    index: int
    after: EventCursor


async def _owned(connection: asyncpg.Connection, owner: Owner) -> set[int]:
    """The wallets of an owner scope: of its kind and owner id."""
    found = await connection.fetch(sql.select_owner_wallets, owner.id, owner.kind)
    return {row["id"] for row in found}


async def _wallets_of(
    connection: asyncpg.Connection, where: EventFilter, owned: set[int] | None
) -> set[int] | None:
    """The wallets an event must concern one of (those of the filter, and of the owner scope
    `owned` if any); None: any."""
    wallets = set(where.wallet_ids) if where.wallet_ids else None
    if where.owner_id is not None:
        found = await connection.fetch(sql.select_owner_wallets, where.owner_id, None)
        named = {row["id"] for row in found}
        wallets = named if wallets is None else wallets & named
    if owned is not None:
        wallets = set(owned) if wallets is None else wallets & owned
    return wallets


async def _slots(
    connection: asyncpg.Connection,
    cursor: EventCursor,
    head: int,
    slots_max: int,
) -> tuple[list[_Slot], EventCursor]:
    """The events to look at, from `cursor` on: at most `slots_max`; and the cursor after the
    last one looked at."""
    scan_end = min(cursor.position + events_scanned_max, head + 1)
    position = cursor.position
    slots: list[_Slot] = []
    while position < scan_end:
        found = await connection.fetch(sql.select_commits, position, scan_end, _commits_read_max)
        position = found[-1]["position"] + 1 if len(found) == _commits_read_max else scan_end
        for row in found:
            count = len(row["transfer_ids"]) + len(row["changes"])
            start = cursor.index if row["position"] == cursor.position else 0
            stop = min(count, start + slots_max - len(slots))
            slots.extend(
                _Slot(row, index, _after(row["position"], index, count))
                for index in range(start, stop)
            )
            if stop < count:
                return slots, EventCursor(row["position"], stop)
            if len(slots) == slots_max:
                return slots, EventCursor(row["position"] + 1)
    return slots, EventCursor(position)


def _after(position: int, index: int, count: int) -> EventCursor:
    """The cursor after event `index` of a record of `count` events: the next record's first
    after its last (so that a cursor after a record whole never names it)."""
    return EventCursor(position + 1) if index + 1 >= count else EventCursor(position, index + 1)


async def _transfers(
    connection: asyncpg.Connection,
    slots: Sequence[_Slot],
    wallets: set[int] | None,
    where: EventFilter,
) -> dict[int, tuple[Transfer, str]]:
    """The transfers of the slots that pass the filters, each with its caller."""
    kinds = None
    if where.types:
        kinds = [int(kind) for kind, type_ in event_type_of_kind.items() if type_ in where.types]
        if not kinds:
            return {}
    ids = [
        slot.record["transfer_ids"][slot.index]
        for slot in slots
        if slot.index < len(slot.record["transfer_ids"])
    ]
    if not ids:
        return {}
    found = await connection.fetch(
        sql.select_event_transfers, ids, None if wallets is None else sorted(wallets), kinds
    )
    return {row["id"]: (rows.transfer(row), row["caller"] or "") for row in found}


def _event(
    slot: _Slot,
    transfers: dict[int, tuple[Transfer, str]],
    wallets: set[int] | None,
    where: EventFilter,
    owned: set[int] | None,
    hidden_types: frozenset[EventType],
) -> Event | None:
    """The slot's event, if it passes the filters (the transfers passed them in the query).
    To a reader limited to the wallets `owned` (a merchant or customer), a transfer's other
    wallet's balance is not shown, nor who acted, unless the ledger itself did."""
    record, index = slot.record, slot.index
    transfer_ids = record["transfer_ids"]
    if index < len(transfer_ids):
        found = transfers.get(transfer_ids[index])
        if found is None:
            return None
        transfer, actor = found
        source_posted, source_pending, target_posted, target_pending = _balances.unpack_from(
            record["balances"], index * _balances.size
        )
        source_balance: Balance | None = Balance(source_posted, source_pending)
        target_balance: Balance | None = (
            None
            if target_pending == rules.unrecorded_pending
            else Balance(target_posted, target_pending)
        )
        if owned is not None:
            if transfer.source_wallet_id not in owned:
                source_balance = None
            if transfer.target_wallet_id not in owned:
                target_balance = None
            if actor != system_caller:
                actor = ""
        return Event(
            slot.after,
            event_type_of_kind[transfer.kind],
            record["created_at"],
            actor,
            (transfer.source_wallet_id, transfer.target_wallet_id),
            TransferMoved(transfer, source_balance, target_balance),
        )
    change = record["changes"][index - len(transfer_ids)]
    type_ = EventType(change["type"])
    concerned = tuple(change["wallet_ids"])
    if (where.types and type_ not in where.types) or type_ in hidden_types:
        return None
    if wallets is not None and not wallets.intersection(concerned):
        return None
    actor = change["actor"]
    if owned is not None and actor != system_caller:
        actor = ""
    return Event(slot.after, type_, record["created_at"], actor, concerned, _body(change))


# Retention -------------------------------------------------------------------------------------


async def delete_before(connection: asyncpg.Connection, cutoff: datetime) -> int:
    """Deletes the oldest records made before `cutoff`, at most `retention_chunk_max`, in one
    statement: a prefix of the positions, up to the first record made at or after it (times
    follow positions only roughly: a transaction's time is when it began). Returns how many."""
    oldest = await connection.fetch(sql.select_oldest_commits, retention_chunk_max)
    last = None
    for row in oldest:
        if row["created_at"] >= cutoff:
            break
        last = row["position"]
    if last is None:
        return 0
    deleted = await connection.execute(sql.delete_commits_through, last)
    return int(deleted.split()[-1])
