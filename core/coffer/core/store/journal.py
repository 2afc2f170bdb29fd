"""What a batch writes: the journal (transfers), the open holds, the balances; and the
results built from what it wrote.

The transfers whose postings no balance decides are written ahead, before any lock is taken
(`write_ahead`); once validation has decided, `write` removes those that did not happen after
all (never committed, so never seen) and writes the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from .. import errors, rules
from ..model import (
    Allocation,
    Applied,
    Balance,
    EventType,
    Grant,
    Hold,
    HoldStatus,
    Operation,
    Rejected,
    SystemWallet,
    Transfer,
    TransferKind,
    hold_status_resolved_by,
    operation_transfers_max,
    system_caller,
    top_up_request_id,
)
from . import sql
from .events import Change, grant_change, low_balance_change, top_up_change

__all__ = [
    "Ahead",
    "AllocationRow",
    "Done",
    "Journal",
    "Written",
    "answers",
    "write",
    "write_ahead",
]

# A transfer written ahead, by the index of its operation: its id, and its posting.
Ahead = dict[int, tuple[int, rules.Posting]]


@dataclass(frozen=True, slots=True)
class Journal:
    """What a batch writes, in order, by index: the expiries of the lapsed holds it found,
    then its own operations; each with its request digest, its key's digest
    (`model.key_digest`), its outcome, and the transfer written ahead for it, if any; and the
    batch's time, which its transfers share."""

    operations: Sequence[Operation | Rejected]
    hashes: Sequence[bytes]
    digests: Sequence[bytes]
    outcomes: Sequence[rules.Outcome]
    ahead: Ahead
    now: datetime
    # The balances after each entry that succeeded anew, by index, when the batch keeps
    # events (`rules.apply_all`); None when it does not.
    after: Mapping[int, rules.BalancesAfter] | None = None
    # What each wallet with a balance alert could spend as the batch read it.
    spendable_read: Mapping[int, int] = field(default_factory=dict)


# The transfers an operation wrote: the id of each, and its posting.
Done = list[tuple[int, rules.Posting]]
# An allocation row as written (`sql.update_balances_and_grants`, $15 to $18): the transfer,
# the grant, the grant's wallet, the change to what is left of it.
AllocationRow = tuple[int, int, int, int]


@dataclass(frozen=True, slots=True)
class Written:
    """What `write` wrote: for each entry, the transfers it wrote, or its error (None for one
    settled before: a replay, or a repeat; in a linked chain undone, the chain's error), and
    the allocation rows (the grants' ids given),
    from which `answers` makes the results once the locks are let go; and, when the batch keeps
    events, what its record says: the transfers in the order applied, with the balances after
    each (four a transfer, flat), and the low balances and top-ups the batch's end balances
    call for."""

    done: list[Done | errors.CofferError | None]
    allocations: list[AllocationRow]
    transfer_ids: list[int]
    balances: list[int]
    changes: list[Change]


async def write_ahead(
    connection: asyncpg.Connection,
    operations: Sequence[Operation | Rejected],
    fresh: Sequence[int],
    hashes: Sequence[bytes],
    digests: Sequence[bytes],
    units: Mapping[int, str],
    system_wallets: Mapping[tuple[str, SystemWallet], int],
    now: datetime,
) -> Ahead:
    """Writes, before any wallet is locked, the transfers whose postings do not depend on
    the wallets' state, as if they will succeed: the lock is then held only to validate
    and update balances, not to write the journal. Returns them by operation."""
    unit_of = units.get
    expected: dict[int, rules.Posting] = {}
    for index in fresh:
        operation = operations[index]
        assert not isinstance(operation, Rejected)
        posting = rules.expected_posting(operation, unit_of, system_wallets)
        if posting is not None:
            expected[index] = posting
    if not expected:
        return {}
    ids = await _transfer_ids(connection, len(expected))
    written = dict(zip(expected, zip(ids, expected.values(), strict=True), strict=True))
    await connection.copy_records_to_table(
        sql.transfers_table,
        records=[
            _row(
                transfer_id,
                transfer_id,
                posting,
                operations[index],
                hashes[index],
                digests[index],
                now,
                first=True,
            )
            for index, (transfer_id, posting) in written.items()
        ],
        columns=sql.transfer_columns,
    )
    return written


async def _transfer_ids(connection: asyncpg.Connection, count: int) -> list[int]:
    return await _ids(connection, sql.next_transfer_ids, count)


async def _ids(connection: asyncpg.Connection, statement: str, count: int) -> list[int]:
    ids: list[int] = await connection.fetchval(statement, count)
    return ids


async def write(
    connection: asyncpg.Connection,
    journal: Journal,
    book: rules.Book,
    balances_read: Mapping[int, tuple[int, int, int]],
) -> Written:
    """Writes what validation decided: the transfers not written ahead, the removal of
    those written ahead that did not happen after all, holds, grants and what each transfer
    changed in them, balances (with the wallets' low-balance crossings)."""
    operations, hashes, digests, outcomes, ahead = (
        journal.operations,
        journal.hashes,
        journal.digests,
        journal.outcomes,
        journal.ahead,
    )
    confirmed = {
        index
        for index, (_, posting) in ahead.items()
        if isinstance(outcome := outcomes[index], list)
        and len(outcome) == 1
        and outcome[0].same_row(posting)
    }
    stale = [transfer_id for index, (transfer_id, _) in ahead.items() if index not in confirmed]
    count = sum(
        len(outcome)
        for index, outcome in enumerate(outcomes)
        if isinstance(outcome, list) and index not in confirmed
    )
    next_id = iter(await _transfer_ids(connection, count) if count else ())
    done: list[Done | errors.CofferError | None] = []
    records: list[tuple[Any, ...]] = []
    new_holds: list[tuple[int, int, int, int, datetime]] = []
    resolved_holds: list[int] = []
    now = journal.now
    after = journal.after
    transfer_ids: list[int] = []
    balances: list[int] = []
    # Each transfer's changes to grants, and the grants it made (with provisional ids).
    allocations: list[tuple[int, int, int]] = []
    made: list[tuple[int, rules.GrantState, str]] = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, Exception):
            done.append(outcome)
            continue
        if not outcome:
            done.append(None)
            continue
        operation = operations[index]
        assert not isinstance(operation, Rejected)
        assert len(outcome) <= operation_transfers_max, outcome
        transfers: Done = []
        operation_id = 0
        for position, posting in enumerate(outcome):
            first = position == 0
            transfer_id = ahead[index][0] if index in confirmed else next(next_id)
            if first:
                operation_id = transfer_id
            if index not in confirmed:
                records.append(
                    _row(
                        transfer_id,
                        operation_id,
                        posting,
                        operation,
                        hashes[index],
                        digests[index],
                        now,
                        first=first,
                    )
                )
            transfers.append((transfer_id, posting))
            if posting.kind == TransferKind.hold:
                assert posting.hold_expires_at is not None
                new_holds.append(
                    (
                        transfer_id,
                        posting.source_wallet_id,
                        posting.target_wallet_id,
                        posting.amount,
                        posting.hold_expires_at,
                    )
                )
            if posting.hold_id is not None:
                resolved_holds.append(posting.hold_id)
            if posting.allocations:
                allocations.extend(
                    (transfer_id, grant_id, change) for grant_id, change in posting.allocations
                )
            if posting.new_grants:
                made.extend((transfer_id, grant, operation.caller) for grant in posting.new_grants)
            if after is not None:
                transfer_ids.append(transfer_id)
        if after is not None:
            # One transfer an operation (operation_transfers_max): the balances after it.
            balances.extend(after[index])
        done.append(transfers)
    if stale:
        # Written ahead, not confirmed: never committed, so never seen.
        await connection.execute(sql.delete_transfers, stale)
    if records:
        # COPY is the cheapest way in. A key stored already (by an earlier batch, or by
        # one committing just now) fails it on the unique index: the batch then starts
        # over.
        await connection.copy_records_to_table(
            sql.transfers_table, records=records, columns=sql.transfer_columns
        )
    if new_holds:
        await connection.execute(sql.insert_pending_holds, *zip(*new_holds, strict=True))
    if resolved_holds:
        await connection.execute(sql.delete_pending_holds, resolved_holds)
    changes: list[Change] = []
    allocation_rows: list[AllocationRow] = []
    grant_arguments: tuple[list[Any], ...] | None = None
    if made or allocations:
        changes, allocation_rows, grant_arguments = await _grant_writes(
            connection, book, allocations, made, now, keep_events=after is not None
        )
    changed = [
        wallet
        for wallet in book.wallets.values()
        # Tracked too: a batch may move grants and leave posted and pending as it read them.
        if (wallet.posted, wallet.pending, wallet.tracked) != balances_read[wallet.id]
    ]
    if after is not None:
        changes.extend(_low_balances(changed, journal.spendable_read, now))
    balance_arguments = (
        [wallet.id for wallet in changed],
        [wallet.posted for wallet in changed],
        [wallet.pending for wallet in changed],
        [wallet.low_balance_crossings for wallet in changed],
        [wallet.tracked for wallet in changed],
    )
    if grant_arguments is not None:
        await connection.execute(
            sql.update_balances_and_grants, *balance_arguments, *grant_arguments, now
        )
    elif changed:
        await connection.execute(sql.update_balances, *balance_arguments)
    return Written(done, allocation_rows, transfer_ids, balances, changes)


def answers(
    journal: Journal,
    written: Written,
    book: rules.Book,
    hold_created_at: Mapping[int, datetime],
) -> list[Applied | errors.CofferError | None]:
    """Each entry's result, from what `write` wrote. Nothing of it is written: the batch makes
    it once committed, out of its locks. A transfer answers what it changed in grants by grant
    id, as a read of it would (those the batch made with their ids given)."""
    operations, now = journal.operations, journal.now
    # The allocation rows by transfer: made once, when a transfer that drew on a grant the
    # batch made first asks.
    allocated: dict[int, list[Allocation]] | None = None
    results: list[Applied | errors.CofferError | None] = []
    for index, entry in enumerate(written.done):
        if entry is None or isinstance(entry, Exception):
            results.append(entry)
            continue
        operation = operations[index]
        assert not isinstance(operation, Rejected)
        operation_id = entry[0][0]
        transfers = []
        for transfer_id, posting in entry:
            answered: tuple[Allocation, ...] = ()
            if posting.allocations:
                if all(grant_id > 0 for grant_id, _ in posting.allocations):
                    answered = tuple(
                        Allocation(grant_id, change)
                        for grant_id, change in sorted(posting.allocations)
                    )
                else:
                    if allocated is None:
                        allocated = {}
                        for row_transfer_id, grant_id, _, change in written.allocations:
                            allocated.setdefault(row_transfer_id, []).append(
                                Allocation(grant_id, change)
                            )
                    answered = tuple(
                        sorted(allocated.get(transfer_id, ()), key=lambda each: each.grant_id)
                    )
            transfers.append(
                Transfer(
                    transfer_id,
                    operation_id,
                    posting.kind,
                    posting.source_wallet_id,
                    posting.target_wallet_id,
                    book.wallets[posting.source_wallet_id].unit,
                    posting.amount,
                    posting.amount_requested,
                    operation.note,
                    operation.reference,
                    operation.performed_by,
                    operation.metadata,
                    now,
                    posting.voids_transfer_id,
                    posting.hold_id,
                    posting.hold_expires_at,
                    allocations=answered,
                )
            )
        results.append(_applied(transfers, book, hold_created_at))
    return results


async def _grant_writes(
    connection: asyncpg.Connection,
    book: rules.Book,
    allocations: Sequence[tuple[int, int, int]],
    made: Sequence[tuple[int, rules.GrantState, str]],
    now: datetime,
    *,
    keep_events: bool,
) -> tuple[list[Change], list[AllocationRow], tuple[list[Any], ...]]:
    """What the batch writes of grants: gives the grants it made their ids, and writes the
    changes to grants other than their remainders; returns, when the batch keeps events, a
    GRANT_CREATED change for each grant made, each transfer's allocations (one row per transfer
    and grant, the changes summed), and the arguments of `sql.update_balances_and_grants` that
    write the rest (the grants made, the remainders, the allocations) with the balances."""
    ids: dict[int, int] = {}
    provisional: dict[int, int] = {}
    given: list[int] = []
    if made:
        given = await _ids(connection, sql.next_grant_ids, len(made))
        ids = {grant.id: grant_id for (_, grant, _), grant_id in zip(made, given, strict=True)}
        provisional = {grant_id: made_id for made_id, grant_id in ids.items()}
    drawn, others = book.changed_grants()
    if others:
        await connection.execute(
            sql.update_grants,
            [grant.id for grant in others],
            [grant.remaining for grant in others],
            [grant.expires_at for grant in others],
            [grant.expired for grant in others],
            [grant.voided for grant in others],
        )
    summed: dict[tuple[int, int], int] = {}
    for transfer_id, grant_id, change in allocations:
        key = (transfer_id, ids.get(grant_id, grant_id))
        summed[key] = summed.get(key, 0) + change
    rows = [
        (transfer_id, grant_id, book.grants[provisional.get(grant_id, grant_id)].wallet_id, change)
        for (transfer_id, grant_id), change in summed.items()
        if change
    ]
    arguments: tuple[list[Any], ...] = (
        [grant.wallet_id for _, grant, _ in made],
        given,
        [transfer_id for transfer_id, _, _ in made],
        [grant.amount for _, grant, _ in made],
        [grant.remaining for _, grant, _ in made],
        [grant.valid_from for _, grant, _ in made],
        [grant.expires_at for _, grant, _ in made],
        [grant.id for grant in drawn],
        [grant.remaining for grant in drawn],
        *([list(column) for column in zip(*rows, strict=True)] if rows else [[], [], [], []]),
    )
    if not keep_events:
        return [], rows, arguments
    return (
        [
            grant_change(
                EventType.grant_created,
                Grant(
                    id=ids[grant.id],
                    wallet_id=grant.wallet_id,
                    unit=book.wallets[grant.wallet_id].unit,
                    transfer_id=transfer_id,
                    amount=grant.amount,
                    remaining=grant.amount,
                    valid_from=grant.valid_from,
                    expires_at=grant.expires_at,
                    expired=0,
                    created_at=now,
                ),
                actor,
            )
            for transfer_id, grant, actor in made
        ],
        rows,
        arguments,
    )


def _low_balances(
    changed: Sequence[rules.WalletState], spendable_read: Mapping[int, int], now: datetime
) -> list[Change]:
    """The low balances and top-ups the batch calls for: each wallet with a threshold whose
    available balance (what it can spend: `rules.spendable`) was at or above it before the
    batch and is below it after crosses it once (counted on the wallet, which the batch's
    update writes), whatever it went through within the batch, which nobody saw. Rising back
    to the threshold or above re-arms it."""
    changes: list[Change] = []
    for wallet in changed:
        threshold = wallet.low_balance_threshold
        if threshold is None:
            continue
        available = rules.spendable(wallet, now)
        if not (spendable_read[wallet.id] >= threshold > available):
            continue
        wallet.low_balance_crossings += 1
        balance = Balance(wallet.posted, wallet.pending, wallet.available - available)
        changes.append(
            low_balance_change(wallet.id, wallet.unit, balance, threshold, system_caller)
        )
        if wallet.top_up_to is not None:
            changes.append(
                top_up_change(
                    wallet.id,
                    wallet.unit,
                    balance,
                    top_up_request_id(wallet.id, wallet.low_balance_crossings),
                    wallet.top_up_to,
                    system_caller,
                )
            )
    return changes


def _row(
    transfer_id: int,
    operation_id: int,
    posting: rules.Posting,
    operation: Operation | Rejected,
    request_hash: bytes,
    digest: bytes,
    now: datetime,
    *,
    first: bool,
) -> tuple[Any, ...]:
    """A journal row, in the order of sql.transfer_columns. The first transfer of an
    operation carries its key, with the key's digest, and its request's digest."""
    assert not isinstance(operation, Rejected)
    return (
        transfer_id,
        operation_id,
        posting.kind,
        posting.source_wallet_id,
        posting.target_wallet_id,
        posting.amount,
        posting.amount_requested,
        operation.caller if first else None,
        operation.idempotency_key if first else None,
        digest if first else None,
        request_hash if first else None,
        operation.note or None,
        operation.reference or None,
        operation.performed_by or None,
        dict(operation.metadata) or None,
        posting.voids_transfer_id,
        posting.hold_id,
        posting.hold_expires_at,
        now,
    )


def _applied(
    transfers: list[Transfer], book: rules.Book, hold_created_at: Mapping[int, datetime]
) -> Applied:
    """An operation's result: its transfers, and the hold it placed or resolved."""
    first = transfers[0]
    hold = None
    if first.kind == TransferKind.hold:
        assert first.hold_expires_at is not None
        hold = Hold(
            id=first.id,
            source_wallet_id=first.source_wallet_id,
            target_wallet_id=first.target_wallet_id,
            unit=first.unit,
            amount=first.amount,
            status=HoldStatus.pending,
            expires_at=first.hold_expires_at,
            created_at=first.created_at,
        )
    elif first.hold_id is not None:
        state = book.holds[first.hold_id]
        hold = Hold(
            id=state.id,
            source_wallet_id=state.source_wallet_id,
            target_wallet_id=state.target_wallet_id,
            unit=first.unit,
            amount=state.amount,
            status=hold_status_resolved_by[first.kind],
            expires_at=state.expires_at,
            created_at=hold_created_at[state.id],
            resolved_by_transfer_id=first.id,
            amount_captured=first.amount if first.kind == TransferKind.capture else 0,
        )
    return Applied(tuple(transfers), hold=hold)
