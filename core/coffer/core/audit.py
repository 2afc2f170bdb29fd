"""The check of the books: whether the stored balances are what the journal says they are.

The ledger keeps balances on the wallet rows, beside the journal of transfers, so that a batch
reads one row per wallet instead of summing its history. That is only right while both agree.
`check_books` reads everything in one snapshot and recomputes, independently of the code that
wrote it, the invariants that hold whatever the operations were:

- each unit's posted balances sum to zero (money moves between wallets, never appears);
- each wallet's posted balance is its posting transfers in less its posting transfers out;
- each wallet's pending balance is the sum of its open holds;
- no wallet's untracked balance (what its grants do not hold) is below its minimum, so
  neither is its available balance;
- each wallet's tracked sum is what its grants have left;
- each grant has left its amount plus the changes its allocations made, and has expired what
  the expirations allocated to it took;
- the open holds are exactly the hold transfers that nothing captured, released or expired;
- no transfer is voided more than once.

    async with ledger.pool.acquire() as connection:
        audit = await check_books(connection)
    assert audit.passed, audit.summary()

It only reads, so it may run beside a serving ledger; it scans the journal (a few seconds for
ten million transfers), so it is for tests, benchmarks and audits, not for a request path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg

from .model import TransferKind, posting_kinds
from .store import sql

__all__ = ["Audit", "Finding", "Mismatch", "check_books", "examples_max_default"]

# Mismatches kept per invariant as examples (all of them are counted).
examples_max_default = 5


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One stored figure against the one the journal gives."""

    # The unit's code, or the wallet's or hold's id.
    subject: str | int
    stored: int
    expected: int


@dataclass(frozen=True, slots=True)
class Finding:
    """What breaks one invariant: how many units, wallets or holds, and the first few."""

    invariant: str
    count: int
    examples: tuple[Mismatch, ...] = ()

    def describe(self) -> str:
        shown = ", ".join(
            f"{example.subject}: {example.stored}, expected {example.expected}"
            for example in self.examples
        )
        more = ", …" if self.count > len(self.examples) else ""
        return f"{self.count} {self.invariant} ({shown}{more})"


@dataclass(frozen=True, slots=True)
class Audit:
    """The books as one snapshot saw them: what was counted, and each invariant's finding."""

    transfers: int
    wallets: int
    units: Finding
    posted: Finding
    pending: Finding
    floors: Finding
    holds: Finding
    voids: Finding
    tracked: Finding
    grants: Finding
    expired: Finding

    @property
    def findings(self) -> tuple[Finding, ...]:
        return (
            self.units,
            self.posted,
            self.pending,
            self.floors,
            self.holds,
            self.voids,
            self.tracked,
            self.grants,
            self.expired,
        )

    @property
    def passed(self) -> bool:
        return all(finding.count == 0 for finding in self.findings)

    def summary(self) -> str:
        """ "passed", or "failed: " and what does not add up."""
        if self.passed:
            return "passed"
        return "failed: " + "; ".join(
            finding.describe() for finding in self.findings if finding.count
        )


async def check_books(
    connection: asyncpg.Connection, *, examples_max: int = examples_max_default
) -> Audit:
    """Checks every invariant in one read-only, repeatable-read transaction of `connection`
    (which must not be in a transaction already)."""
    posting = sorted(int(kind) for kind in posting_kinds)
    async with connection.transaction(isolation="repeatable_read", readonly=True):
        transfers: int = await connection.fetchval(sql.count_transfers)
        wallets: int = await connection.fetchval(sql.count_wallets)
        units = await connection.fetch(sql.audit_units_unbalanced, examples_max)
        posted = await connection.fetch(sql.audit_posted_mismatched, posting, examples_max)
        pending = await connection.fetch(sql.audit_pending_mismatched, examples_max)
        floors = await connection.fetch(sql.audit_floors_broken, examples_max)
        holds = await connection.fetch(
            sql.audit_holds_mismatched, int(TransferKind.hold), examples_max
        )
        voids = await connection.fetch(sql.audit_voided_twice, examples_max)
        tracked = await connection.fetch(sql.audit_tracked_mismatched, examples_max)
        grants = await connection.fetch(sql.audit_grants_mismatched, examples_max)
        expired = await connection.fetch(
            sql.audit_expired_mismatched, int(TransferKind.expiration), examples_max
        )
    return Audit(
        transfers=transfers,
        wallets=wallets,
        units=_finding("units whose posted balances do not sum to 0", units),
        posted=_finding("wallets whose posted balance is not their postings in less out", posted),
        pending=_finding("wallets whose pending balance is not their open holds", pending),
        floors=_finding("wallets whose untracked balance is below their minimum", floors),
        holds=_finding("holds whose open amount is not the journal's", holds),
        voids=_finding("transfers voided more than once (stored: voids)", voids),
        tracked=_finding("wallets whose tracked sum is not their grants' remainders", tracked),
        grants=_finding("grants whose remainder is not their amount and allocations", grants),
        expired=_finding("grants whose expired sum is not their expirations'", expired),
    )


def _finding(invariant: str, rows: Sequence[asyncpg.Record]) -> Finding:
    """From rows of (subject, stored, expected, count), `count` being every row's total."""
    return Finding(
        invariant,
        rows[0]["count"] if rows else 0,
        tuple(Mismatch(row["subject"], int(row["stored"]), int(row["expected"])) for row in rows),
    )
