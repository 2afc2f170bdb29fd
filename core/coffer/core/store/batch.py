"""A batch of operations, applied in one database transaction, in phases:

1. find the batch's duplicate idempotency keys, and — when an earlier attempt met a stored
   one — the keys already stored (replays, or keys reused for another request): `keys.settle`;
2. read the earlier transfers and holds that voids, captures and releases name;
3. write ahead, with one COPY, the transfers whose postings do not depend on any balance
   (`rules.expected_posting`: credits, all-or-nothing debits, transfers, deposits,
   withdrawals, payments), as if they will succeed: the journal is written before any lock
   is taken;
4. lock every wallet the batch touches, once, with SELECT … FOR UPDATE in ascending id order
   (so batches never deadlock), then the open holds it resolves, and release the lapsed
   holds of those wallets first;
5. validate each operation in order against that state in memory (`rules.apply_all`);
6. check, with the locks held, that no key it answers anew was stored meanwhile (as a refusal,
   or as a success of an operation it refused), and keep its refusals under their keys;
7. remove what was written ahead and did not happen (never committed, so never seen), COPY
   the other transfers, and update each touched wallet row once (with its low-balance
   crossings);
8. with events kept, write the batch's record last (`events.record`): the transfers in the
   order they were applied, with the balances after each as validation left them, then the
   low balances and top-ups its end balances call for;
9. once committed, out of the locks: the answers, made from what was written.

The transfers of one batch share one time; their ids follow the order they were written in,
which within a batch is not always the order the operations were applied in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime

import asyncpg

from .. import errors, rules
from ..model import (
    Applied,
    CaptureHold,
    Credit,
    Deposit,
    ExpireGrant,
    ExpireHold,
    Operation,
    Rejected,
    ReleaseHold,
    SystemWallet,
    TransferKind,
    Void,
    hold_lapsed,
    key_digest,
    system_caller,
)
from . import events, rows, sql
from .facts import Facts
from .journal import Journal, answers, write, write_ahead
from .keys import check_free, record_refusals, replay_of, settle
from .queries import stored_results

__all__ = ["Batch", "expiry"]


class Batch:
    """One batch, run once on a connection in a transaction the caller began. Each phase
    takes what the phases before it found as arguments and returns what it finds (the locks
    fill the book they are given); `facts` are the caches of what never changes, shared
    between batches. With `look_up_keys` false, the batch goes
    as if none of its keys were stored (the unique indexes find out, and the caller starts
    over with it true)."""

    def __init__(
        self,
        connection: asyncpg.Connection,
        operations: Sequence[Operation | Rejected],
        now: datetime,
        facts: Facts,
        *,
        look_up_keys: bool,
        keep_events: bool = True,
    ) -> None:
        self._connection = connection
        self._operations = operations
        self._now = now
        self._facts = facts
        self._look_up_keys = look_up_keys
        self._keep_events = keep_events

    async def run(self) -> Callable[[], list[Applied | errors.CofferError]]:
        """Runs the batch; returns how to answer it, to call once it has committed: the
        answers are made out of its locks."""
        connection, operations, now = self._connection, self._operations, self._now
        # 1. Keys.
        keys = await settle(connection, operations, look_up=self._look_up_keys)
        fresh = [
            index
            for index, operation in enumerate(operations)
            if index not in keys.settled and not isinstance(operation, Rejected)
        ]
        # 2. What voids, captures and releases name.
        transfer_ids, hold_ids, grant_ids = _named(operations, fresh)
        referenced = await self._referenced_transfers(transfer_ids | hold_ids)
        grant_wallets = await self._referenced_grants(grant_ids)
        # 3. Write ahead.
        wallet_ids = {
            wallet_id for index in fresh for wallet_id in rules.wallets_named(operations[index])
        }
        for transfer in referenced.values():
            wallet_ids.update((transfer["source_wallet_id"], transfer["target_wallet_id"]))
        wallet_ids.update(grant_wallets.values())
        units = await self._facts.wallet_units(connection, wallet_ids)
        system_wallets = await self._system_wallets(fresh, units, grant_wallets)
        wallet_ids.update(system_wallets.values())
        ahead = await write_ahead(
            connection, operations, fresh, keys.hashes, keys.digests, units, system_wallets, now
        )
        # 4. Locks.
        book = rules.Book(
            system_wallets=system_wallets,
            validities=await self._validities(fresh, units),
        )
        balances_read = await self._lock_wallets(book, wallet_ids)
        lapsed, hold_created_at = await self._lock_holds(book, referenced, hold_ids)
        await self._load_voids(book, referenced, transfer_ids)
        await self._load_grants(book, referenced, grant_ids)
        spendable_read = {
            wallet.id: rules.spendable(wallet, now)
            for wallet in book.wallets.values()
            if wallet.low_balance_threshold is not None
        }
        # 5. Validation; with events, the balances after each operation, by its index in the
        # journal (the expiries first).
        after: dict[int, rules.BalancesAfter] | None = {} if self._keep_events else None
        expiries = _expire(book, lapsed, now, after)
        applied_after: dict[int, rules.BalancesAfter] | None = {} if after is not None else None
        outcomes = rules.apply_all(book, operations, now, keys.settled, applied_after)
        if after is not None and applied_after is not None:
            after.update((index + len(lapsed), each) for index, each in applied_after.items())
        refused = rules.kept_refusals(operations, outcomes, keys.settled)
        # 6. Keys still free; refusals kept.
        await check_free(connection, operations, keys.digests, fresh, refused, ahead)
        if refused:
            await record_refusals(connection, operations, keys.hashes, refused, outcomes, now)
        # 7. Writes: the expiries are written like any operation, ahead of the batch's own;
        # their results are not the caller's.
        journal = Journal(
            operations=[*lapsed, *operations],
            hashes=[each.request_hash() for each in lapsed] + keys.hashes,
            digests=[key_digest(each.caller, each.idempotency_key) for each in lapsed]
            + keys.digests,
            outcomes=[*expiries, *outcomes],
            ahead={index + len(lapsed): written for index, written in ahead.items()},
            now=now,
            after=after,
            spendable_read=spendable_read,
        )
        written = await write(connection, journal, book, balances_read)
        replayed = (
            await stored_results(connection, set(keys.replays.values()), now)
            if keys.replays
            else {}
        )
        # Every entry is answered, checked while the batch can still roll back: by what it
        # wrote, or as a replay (its result read) or a repeat, which write nothing (one in a
        # linked chain undone has the chain's error, which its stored or first answer
        # replaces).
        done = written.done[len(lapsed) :]
        settled = keys.replays.keys() | keys.duplicates.keys()
        assert {index for index, entry in enumerate(done) if entry is None} <= settled
        assert not any(isinstance(done[index], list) for index in settled)
        assert replayed.keys() >= set(keys.replays.values())
        # 8. The record, last.
        if written.transfer_ids or written.changes:
            await events.record(
                connection,
                now,
                transfer_ids=written.transfer_ids,
                balances=events.pack_balances(written.balances),
                changes=written.changes,
            )

        def answer() -> list[Applied | errors.CofferError]:
            results = answers(journal, written, book, hold_created_at)[len(lapsed) :]
            # Answers for replays and for repeats within the batch.
            for index, operation_id in keys.replays.items():
                results[index] = replayed[operation_id]
            for index, first in keys.duplicates.items():
                results[index] = replay_of(results[first])
            return [result for result in results if result is not None]

        return answer

    async def _system_wallets(
        self, fresh: list[int], units: Mapping[int, str], grant_wallets: Mapping[int, int]
    ) -> dict[tuple[str, SystemWallet], int]:
        """The system wallets of the units of the operations that move money with one (an
        expiration, with its grant's wallet's unit's)."""
        operations = self._operations
        system_units = {
            units[wallet_id]
            for index in fresh
            if type(operations[index]) in rules.system_wallet_kinds
            for wallet_id in rules.wallets_named(operations[index])
            if wallet_id in units
        }
        system_units.update(units[wallet_id] for wallet_id in grant_wallets.values())
        if not system_units:
            return {}
        return await self._facts.system_wallets(self._connection, system_units)

    async def _validities(
        self, fresh: list[int], units: Mapping[int, str]
    ) -> dict[str, rules.Validity]:
        """The default validities of the units of the wallets credits and deposits go into."""
        operations = self._operations
        credited = {
            units[wallet_id]
            for operation in (operations[index] for index in fresh)
            if type(operation) in _credited_kinds
            for wallet_id in rules.wallets_named(operation)
            if wallet_id in units
        }
        if not credited:
            return {}
        validities = await self._facts.unit_validities(self._connection, credited)
        return {unit: validity for unit, validity in validities.items() if validity is not None}

    async def _referenced_grants(self, ids: set[int]) -> dict[int, int]:
        """The wallet of each grant that expirations name, of those that exist."""
        if not ids:
            return {}
        found = await self._connection.fetch(sql.select_referenced_grants, list(ids))
        return {row["id"]: row["wallet_id"] for row in found}

    async def _load_grants(
        self,
        book: rules.Book,
        referenced: Mapping[int, asyncpg.Record],
        grant_ids: set[int],
    ) -> None:
        """The grants the batch may change, into the book, under their wallets' locks: those
        with something left of the wallets with grants; those the open holds reserved from
        (with what each hold reserved); and, for the voids, what each voided transfer changed
        in grants (a capture: with what its hold did) and the grants it made. (The book keeps
        the state of each before the batch first changes it: only those that changed are
        written.)"""
        holds = [hold.id for hold in book.holds.values() if hold.resolution is None]
        voids = list(book.transfers)
        captures = {
            transfer_id: referenced[transfer_id]["hold_id"]
            for transfer_id in voids
            if book.transfers[transfer_id].kind == TransferKind.capture
        }
        allocated: dict[int, list[tuple[int, int]]] = {}
        if holds or voids:
            for row in await self._connection.fetch(
                sql.select_allocations, [*holds, *voids, *captures.values()]
            ):
                allocated.setdefault(row["transfer_id"], []).append(
                    (row["grant_id"], row["amount"])
                )
        for hold_id in holds:
            book.holds[hold_id].allocations = tuple(allocated.get(hold_id, ()))
        for transfer_id in voids:
            book.transfer_allocations[transfer_id] = [
                *allocated.get(captures.get(transfer_id, 0), ()),
                *allocated.get(transfer_id, ()),
            ]
        tracked = [wallet.id for wallet in book.wallets.values() if wallet.tracked]
        named = {grant_id for each in allocated.values() for grant_id, _ in each} | grant_ids
        if not tracked and not named and not voids:
            return
        grants, wallets = book.grants, book.wallets
        found = await self._connection.fetch(sql.select_live_grants, tracked) if tracked else []
        named_found = (
            await self._connection.fetch(sql.select_named_grants, list(named), voids)
            if named or voids
            else []
        )
        for row in (*found, *named_found):
            if row[0] not in grants:
                grant = rows.grant_state(row)
                grants[grant.id] = grant
                wallets[grant.wallet_id].grants.append(grant)
        made_by = set(voids)
        for row in named_found:
            if row["transfer_id"] in made_by:
                book.transfer_grants.setdefault(row["transfer_id"], []).append(row[0])

    async def _referenced_transfers(self, ids: set[int]) -> dict[int, asyncpg.Record]:
        if not ids:
            return {}
        found = await self._connection.fetch(sql.select_referenced_transfers, list(ids))
        return {row["id"]: row for row in found}

    async def _lock_wallets(
        self, book: rules.Book, wallet_ids: set[int]
    ) -> dict[int, tuple[int, int, int]]:
        """Locks the wallets into the book; returns their balances as read (posted,
        pending, tracked), so that only those that changed are written."""
        for row in await self._connection.fetch(sql.lock_wallets, sorted(wallet_ids)):
            book.wallets[row["id"]] = rows.wallet_state(row)
        return {
            wallet.id: (wallet.posted, wallet.pending, wallet.tracked)
            for wallet in book.wallets.values()
        }

    async def _lock_holds(
        self, book: rules.Book, referenced: Mapping[int, asyncpg.Record], hold_ids: set[int]
    ) -> tuple[list[ExpireHold], dict[int, datetime]]:
        """Locks the open holds the batch names, and the lapsed holds of the wallets it
        locked: those release themselves now, first, so that no expired hold keeps holding
        money until the sweep comes by. All of them, as a wallet's balance counts them all (a
        bound here would leave money held, and a refusal on it would be kept); the sweep, a
        bounded batch each second, keeps them few. Returns their expiries, to apply before
        the rest (a lapsed hold the batch names is the batch's to resolve: a capture or
        release fails with HoldExpired, the sweep's expiry applies); and when each hold the
        book holds was placed."""
        ids = sorted(
            hold_id
            for hold_id in hold_ids
            if hold_id in referenced and referenced[hold_id]["kind"] == TransferKind.hold
        )
        held = [wallet.id for wallet in book.wallets.values() if wallet.pending > 0]
        if not ids and not held:
            return [], {}
        found = await self._connection.fetch(sql.lock_holds, ids, held, self._now)
        open_holds = {row["transfer_id"]: row for row in found}
        created_at: dict[int, datetime] = {}
        resolutions: dict[int, TransferKind] = {}
        closed = [hold_id for hold_id in ids if hold_id not in open_holds]
        if closed:
            for row in await self._connection.fetch(sql.select_hold_resolutions, closed):
                resolutions[row["hold_id"]] = TransferKind(row["kind"])
        for hold_id in closed:
            hold = referenced[hold_id]
            created_at[hold_id] = hold["created_at"]
            book.holds[hold_id] = rows.resolved_hold_state(
                hold, resolutions.get(hold_id, TransferKind.release)
            )
        lapsed = []
        for hold_id, row in open_holds.items():
            created_at[hold_id] = row["created_at"]
            book.holds[hold_id] = rows.open_hold_state(row)
            if hold_lapsed(row["expires_at"], self._now) and hold_id not in hold_ids:
                lapsed.append(expiry(hold_id))
        return lapsed, created_at

    async def _load_voids(
        self, book: rules.Book, referenced: Mapping[int, asyncpg.Record], transfer_ids: set[int]
    ) -> None:
        """The transfers the batch's voids name, into the book, and which are voided."""
        ids = [transfer_id for transfer_id in transfer_ids if transfer_id in referenced]
        if not ids:
            return
        for transfer_id in ids:
            book.transfers[transfer_id] = rows.transfer_state(referenced[transfer_id])
        found = await self._connection.fetch(sql.select_voiding_transfers, ids)
        book.voided.update(row["voids_transfer_id"] for row in found)


def expiry(hold_id: int) -> ExpireHold:
    """The operation by which the ledger releases a lapsed hold, under a key of its own."""
    return ExpireHold(
        hold_id=hold_id, idempotency_key=f"hold-expiry:{hold_id}", caller=system_caller
    )


# The operations whose grants may take their unit's default validity.
_credited_kinds: frozenset[type[Operation]] = frozenset({Credit, Deposit})


def _named(
    operations: Sequence[Operation | Rejected], fresh: list[int]
) -> tuple[set[int], set[int], set[int]]:
    """The transfers the fresh operations void, the holds they resolve, and the grants they
    expire."""
    transfer_ids: set[int] = set()
    hold_ids: set[int] = set()
    grant_ids: set[int] = set()
    for index in fresh:
        operation = operations[index]
        if isinstance(operation, Void):
            transfer_ids.add(operation.transfer_id)
        elif isinstance(operation, (CaptureHold, ReleaseHold, ExpireHold)):
            hold_ids.add(operation.hold_id)
        elif isinstance(operation, ExpireGrant):
            grant_ids.add(operation.grant_id)
    return transfer_ids, hold_ids, grant_ids


def _expire(
    book: rules.Book,
    lapsed: list[ExpireHold],
    now: datetime,
    after: dict[int, rules.BalancesAfter] | None,
) -> list[rules.Outcome]:
    """Applies the expiries of the lapsed holds; fills `after`, if given, by their index."""
    outcomes: list[rules.Outcome] = []
    for index, each in enumerate(lapsed):
        try:
            postings = rules.apply(book, each, now)
        except errors.CofferError as error:
            # A lapsed hold, locked and open, always expires.
            raise AssertionError(f"a lapsed hold did not expire: {error}") from error
        outcomes.append(postings)
        if after is not None:
            after[index] = rules.balances_after(book, postings)
    return outcomes
