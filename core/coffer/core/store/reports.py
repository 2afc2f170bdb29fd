"""Reports on what the journal holds, read at query time: the usage register (what wallets
spent, and from which grants), a unit's outstanding overview, a wallet's balance at a past
instant, and the balance after each entry of a wallet's history.

Each reads in one snapshot (repeatable read), so that what it sums and what it lists agree.

Usage register (`list_usage`). The consumptions, `model.usage_kinds` (debits, payments,
captures), newest first. A page is one statement that looks along one index range, newest
first, at most `model.usage_scanned_max` transfers (those the filter skips included):

- with a wallet, or an owner, along the source's index (transfers_source: source_wallet_id,
  id), for each of the owner's wallets (of the unit, if the filter names one), merged by id;
- else, with a reference, along transfers_reference (reference, id);
- else along the primary key.

    -- select_usage_scan, for each wallet (EXPLAIN; the others alike on transfers_reference
    -- or transfers_pkey, without the loop):
    Nested Loop
      ->  Function Scan on unnest o
      ->  Limit
            ->  Subquery Scan on s
                  Filter: (s.matched OR (s."position" = $scanned))
                  ->  Limit
                        ->  WindowAgg
                              ->  Index Scan Backward using transfers_source on transfers t
                                    Index Cond: ((source_wallet_id = o.wallet_id) AND (id < $1))

A filter that matches little may so give a short page, even an empty one, while more follow:
the next page goes on below the last transfer looked at (for an owner, below the highest one
any wallet's look stopped at). What a consumption drew from grants is read from `allocations`:
a debit's and a payment's allocations on their source are what they drew (below 0); a
capture's are the returns of its hold's reservation, so that it drew, from each grant, what
the hold reserved there less what the capture returned (but from a grant voided in between,
which takes no return: `_captured`).

Outstanding (`outstanding`): the unit's customers' and merchants' wallets with something
posted, by id (along wallets_unit: unit, id), each with what its grants have left that expires
by the horizon; the totals, over all of them, with the first page.

A balance at a past instant (`past_balance`): from now backwards, the wallet's balance as
stored less what its transfers stamped after the instant moved. A transfer is stamped with its
batch's time, taken as the batch begins; its id is drawn later, as the batch goes, so ids and
stamps are not in the same order: a transfer stamped after the instant may have an id below one
stamped before it. A batch draws its ids within seconds of its stamp: its statements and its
waits for locks are bounded by the server's timeouts (5 s each by default). Taking that gap to
be at most `model.stamp_lag_s_max` (five minutes), every transfer stamped after the instant has
an id above every transfer stamped that long before it: the walk back, on each side of the
wallet, stops at the newest of those (index range scans on transfers_source and
transfers_target, never a scan of the table). A batch slower than that (timeouts set far
longer, and used up) could stamp, just after the instant, a transfer the walk does not meet.
Its cost is proportional to the wallet's transfers stamped after the instant, and those of the
`stamp_lag_s_max` before it: recent instants are cheap, the distant past is not.

    -- select_transfers_after, per side (EXPLAIN; the target's alike, on transfers_target):
    Index Scan using transfers_source on transfers t
      Index Cond: ((source_wallet_id = $1) AND (id > COALESCE((InitPlan 2).col1, '0'::bigint)))
      Filter: (created_at > $2)
      InitPlan 2
        ->  Result
              InitPlan 1
                ->  Limit
                      ->  Index Scan Backward using transfers_source on transfers b
                            Index Cond: (source_wallet_id = $1)
                            Filter: (created_at <= $3)

The balances after each history entry (`balances_after`): the wallet's posted balance as
stored, less the signed sum of its posting transfers newer than the page's first entry, then
walked down the page (and, when the page is filtered by more than the wallet, down the
transfers between its entries that it does not list). The order is the journal's id order,
which for one wallet is the order its batches committed in, except when two batches touching
it commit in the order opposite to the ids they drew (ids are drawn before the wallet's lock,
for the write-ahead): then the balance after the one is read as if the other came first.
The balance after the newest entry, and so the wallet's balance, is always exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import asyncpg

from .. import errors, rules
from ..model import (
    Balance,
    GrantDrawn,
    Outstanding,
    OutstandingTotals,
    OutstandingWallet,
    OwnerKind,
    Page,
    PastBalance,
    Transfer,
    TransferKind,
    UsageEntry,
    UsageFilter,
    grant_spendable,
    history_balances_scanned_max,
    hold_lapsed,
    page_size_max,
    posting_kinds,
    stamp_lag_s_max,
    usage_kinds,
    usage_scanned_max,
)
from . import rows, sql

__all__ = ["balances_after", "list_usage", "outstanding", "past_balance"]

_user_kinds = [int(OwnerKind.customer), int(OwnerKind.merchant)]
_posting_kinds = sorted(int(kind) for kind in posting_kinds)
_usage_kinds = sorted(int(kind) for kind in usage_kinds)


# The usage register ----------------------------------------------------------------------------


async def list_usage(
    connection: asyncpg.Connection,
    where: UsageFilter,
    *,
    page_size: int,
    before_id: int | None,
    scanned_max: int = usage_scanned_max,
) -> Page[UsageEntry]:
    """A page of consumptions below `before_id` (None: from the newest), newest first; its
    cursor, where the next page starts (None: none follows)."""
    assert 0 < page_size <= page_size_max and scanned_max > 0
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        wallet_ids = await _source_wallets(connection, where)
        if wallet_ids is not None and not wallet_ids:
            return Page([], None)
        query, arguments = sql.select_usage_scan(
            where, wallet_ids, _usage_kinds, before_id, scanned_max, page_size + 2
        )
        ids, cursor = _page_of(await connection.fetch(query, *arguments), page_size)
        if not ids:
            return Page([], cursor)
        found = await connection.fetch(sql.select_transfers_by_id, ids)
        transfers = [rows.transfer(row) for row in found]
        drawn = await _drawn(connection, transfers)
    return Page([UsageEntry(each, drawn.get(each.id, ())) for each in transfers], cursor)


async def _source_wallets(connection: asyncpg.Connection, where: UsageFilter) -> list[int] | None:
    """The wallets whose consumptions may match (None: any): the filter's wallet, or its
    owner's wallets, or both (the wallet, if the owner's); of the filter's unit, if it names
    one."""
    if where.owner_id is None and where.wallet_id is None:
        return None
    kinds = _user_kinds if where.owner_kind is None else [int(where.owner_kind)]
    if where.owner_id is None:
        found = await connection.fetch(sql.select_usage_wallet, where.wallet_id, where.unit)
    else:
        found = await connection.fetch(
            sql.select_owner_wallets_of_unit, where.owner_id, kinds, where.unit
        )
    wallet_ids = [row["id"] for row in found]
    if where.wallet_id is None:
        return wallet_ids
    return [where.wallet_id] if where.wallet_id in wallet_ids else []


def _page_of(found: Sequence[asyncpg.Record], page_size: int) -> tuple[list[int], int | None]:
    """The ids of a page, newest first, and its cursor, from the rows of the scan: per wallet,
    the transfers that matched, newest first, and the last one looked at if the look stopped at
    its bound. A wallet is known down to its floor: the (page_size + 1)-th match, else where
    its look stopped; one that ran out of transfers is known to the end. The page holds what
    is known of every wallet: the matches at or above the highest floor."""
    matches: dict[int, list[int]] = {}
    stopped: dict[int, int] = {}
    for row in found:
        if row["matched"]:
            matches.setdefault(row["wallet_id"], []).append(row["id"])
        if row["last_scanned"]:
            stopped[row["wallet_id"]] = row["id"]
    floors = [ids[page_size] for ids in matches.values() if len(ids) > page_size]
    floors += [
        stop for wallet_id, stop in stopped.items() if len(matches.get(wallet_id, ())) <= page_size
    ]
    floor = max(floors, default=None)
    ids = sorted(
        (
            each
            for each_ids in matches.values()
            for each in each_ids
            if floor is None or each >= floor
        ),
        reverse=True,
    )
    if len(ids) > page_size:
        ids = ids[:page_size]
        return ids, ids[-1]
    return ids, floor


async def _drawn(
    connection: asyncpg.Connection, transfers: Sequence[Transfer]
) -> dict[int, tuple[GrantDrawn, ...]]:
    """What each consumption drew from its source's grants, by transfer id: a debit's and a
    payment's draws; a capture's, as `_captured` works it out."""
    hold_of = {
        each.id: each.hold_id
        for each in transfers
        if each.kind == TransferKind.capture and each.hold_id is not None
    }
    found = await connection.fetch(
        sql.select_allocations_drawn, [each.id for each in transfers] + list(hold_of.values())
    )
    # By transfer: the changes it made to its source's grants.
    changes: dict[int, dict[int, int]] = {}
    grants: dict[int, asyncpg.Record] = {}
    sources = {each.id: each.source_wallet_id for each in transfers}
    sources.update({hold_id: sources[capture] for capture, hold_id in hold_of.items()})
    for row in found:
        if row["wallet_id"] == sources[row["transfer_id"]]:
            changes.setdefault(row["transfer_id"], {})[row["grant_id"]] = row["amount"]
            grants[row["grant_id"]] = row
    drawn: dict[int, tuple[GrantDrawn, ...]] = {}
    for each in transfers:
        own = changes.get(each.id, {})
        if each.id in hold_of:
            taken = _captured(each, changes.get(hold_of[each.id], {}), own, grants)
        else:
            taken = {grant_id: -change for grant_id, change in own.items()}
        order = sorted(taken, key=lambda grant_id: _spending_order(grants[grant_id]))
        drawn[each.id] = tuple(
            GrantDrawn(grant_id, taken[grant_id], grants[grant_id]["expires_at"])
            for grant_id in order
            if taken[grant_id] > 0
        )
    return drawn


def _captured(
    capture: Transfer,
    reserved: dict[int, int],
    returned: dict[int, int],
    grants: dict[int, asyncpg.Record],
) -> dict[int, int]:
    """What a capture took from each grant its hold reserved from. The capture takes from the
    grants still valid (in the order of its hold's reservation, as far as its amount goes), then
    from the untracked balance, and returns the rest of each reservation to its grant: what it
    took is the reservation less what it returned. But to a grant voided before the capture (the
    void of the transfer that made it, which came first on the wallet, as its id says) the rest
    returns nothing: what it took from those is what the capture took from grants, the least of
    its amount and what the valid grants held, less what it took from the others, shared among
    them in the order spending takes them."""
    taken: dict[int, int] = {}
    unknown = []
    valid = 0
    for grant_id, change in reserved.items():
        grant = grants[grant_id]
        if not grant_spendable(grant["valid_from"], grant["expires_at"], capture.created_at):
            taken[grant_id] = 0
            continue
        valid += -change
        if grant_id in returned:
            taken[grant_id] = -change - returned[grant_id]
        elif grant["voided_by"] is not None and grant["voided_by"] < capture.id:
            unknown.append(grant_id)
        else:
            taken[grant_id] = -change
    left = min(capture.amount, valid) - sum(taken.values())
    for grant_id in sorted(unknown, key=lambda grant_id: _spending_order(grants[grant_id])):
        taken[grant_id] = min(-reserved[grant_id], max(left, 0))
        left -= taken[grant_id]
    return taken


def _spending_order(grant: asyncpg.Record) -> tuple[bool, datetime, bool, int]:
    """Grants in the order spending takes them (`rules.spend_order`)."""
    return rules.spend_order(grant["expires_at"], grant["grant_id"])


# Outstanding -----------------------------------------------------------------------------------


async def outstanding(
    connection: asyncpg.Connection,
    unit: str,
    *,
    now: datetime,
    expiring_within: timedelta,
    page_size: int,
    after_id: int,
) -> Outstanding:
    """A page of the unit's outstanding overview after wallet `after_id` (0: the first page,
    which carries the totals). UnitNotFound if there is no such unit."""
    assert 0 < page_size <= page_size_max
    horizon = now + expiring_within
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        if await connection.fetchval(sql.select_unit_exists, unit) is None:
            raise errors.UnitNotFound(f"unit {unit} does not exist")
        found = await connection.fetch(
            sql.select_outstanding_wallets,
            unit,
            _user_kinds,
            after_id,
            now,
            page_size + 1,
            horizon,
        )
        totals = None
        if not after_id:
            row = await connection.fetchrow(
                sql.select_outstanding_totals, unit, _user_kinds, horizon, now
            )
            assert row is not None
            totals = OutstandingTotals(
                wallets=row["wallets"],
                outstanding=int(row["outstanding"]),
                expiring=int(row["expiring"]),
            )
    wallets = [
        OutstandingWallet(
            wallet_id=row["id"],
            owner_id=row["owner_id"],
            owner_kind=OwnerKind(row["owner_kind"]),
            balance=Balance(row["posted"], row["pending"], row["unspendable"]),
            expiring=row["expiring"],
        )
        for row in found[:page_size]
    ]
    cursor = wallets[-1].wallet_id if len(found) > page_size else None
    return Outstanding(unit, horizon, wallets, cursor, totals)


# A balance at a past instant -------------------------------------------------------------------


async def past_balance(connection: asyncpg.Connection, wallet_id: int, at: datetime) -> PastBalance:
    """The wallet's posted and pending balances at `at`, a past instant: the posted balance as
    stored less what its posting transfers stamped after `at` moved; pending, what the holds
    placed by `at` reserved then (each not resolved by a capture or a release stamped by `at`,
    and not lapsed by `at`, as `model.hold_lapsed` says: a hold lapsed then holds nothing, even
    if its release was stamped later). WalletNotFound if there is no such wallet."""
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        wallet = await connection.fetchrow(sql.select_wallet_posted, wallet_id)
        if wallet is None:
            raise errors.WalletNotFound(f"wallet {wallet_id} does not exist")
        after = await connection.fetch(sql.select_transfers_after, wallet_id, at, _lagged(at))
        held = {
            row["id"]: row["amount"]
            for row in await connection.fetch(sql.select_holds_open_at, wallet_id, at)
        }
        # The holds resolved after `at`: they may have held then.
        resolved = [
            row["hold_id"]
            for row in after
            if row["hold_id"] is not None and row["source_wallet_id"] == wallet_id
        ]
        terms = await connection.fetch(sql.select_hold_terms, resolved, TransferKind.hold)
    for hold in terms:
        if hold["created_at"] <= at and not hold_lapsed(hold["hold_expires_at"], at):
            held[hold["id"]] = hold["amount"]
    moved = sum(
        row["amount"] if row["target_wallet_id"] == wallet_id else -row["amount"]
        for row in after
        if row["kind"] in _posting_kinds
    )
    return PastBalance(wallet_id, wallet["unit"], at, wallet["posted"] - moved, sum(held.values()))


_stamp_lag = timedelta(seconds=stamp_lag_s_max)
_first_instant = datetime.min.replace(tzinfo=UTC)


def _lagged(at: datetime) -> datetime:
    """`stamp_lag_s_max` before `at`; at the earliest, the first instant a time can name."""
    return at - _stamp_lag if at - _first_instant > _stamp_lag else _first_instant


# Balances after history entries ----------------------------------------------------------------


async def balances_after(
    connection: asyncpg.Connection,
    wallet_id: int,
    entries: Sequence[Transfer],
) -> list[Transfer]:
    """The entries of a page of a wallet's history (newest first), each with the wallet's
    posted balance right after it and its amount signed as the wallet saw it. To be read in the
    snapshot the page was read in. The balance is worked out from now backwards: past
    `history_balances_scanned_max` transfers of the wallet newer than the page, the entries
    carry only their signed amounts, so that a page deep in a long history costs no more than
    the first."""
    if not entries:
        return []
    if await connection.fetchval(
        sql.select_history_newer_beyond, wallet_id, entries[0].id, history_balances_scanned_max
    ):
        return [entry._replace(signed_amount=_signed(entry, wallet_id)) for entry in entries]
    wallet = await connection.fetchrow(sql.select_wallet_posted, wallet_id)
    assert wallet is not None
    posted = wallet["posted"]
    first, last = entries[0].id, entries[-1].id
    found = await connection.fetch(sql.select_history_moves, wallet_id, first, last, _posting_kinds)
    newer = next(row["signed"] for row in found if row["id"] is None)
    moves = sorted(
        ((row["id"], row["signed"]) for row in found if row["id"] is not None), reverse=True
    )
    balance = posted - newer
    answered = []
    index = 0
    for entry in entries:
        # Past the moves above this entry.
        while index < len(moves) and moves[index][0] > entry.id:
            balance -= moves[index][1]
            index += 1
        answered.append(
            entry._replace(balance_after=balance, signed_amount=_signed(entry, wallet_id))
        )
    return answered


def _signed(transfer: Transfer, wallet_id: int) -> int:
    if transfer.kind not in posting_kinds:
        return 0
    return transfer.amount if transfer.target_wallet_id == wallet_id else -transfer.amount
