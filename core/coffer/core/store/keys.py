"""Idempotency keys in a batch: which operations replay stored ones, which reuse a key for
another request, which repeat an earlier one of the same batch; whether a key the batch is
about to answer anew was stored meanwhile; and the refusals kept under their keys.

Keys are stored in the same transaction as the postings: a success's on its first transfer, a
refusal's in `refusals` (see `coffer.core.ledger` for how racing batches meet). The journal
indexes a success's key by its digest (`model.key_digest`), computed once per operation here;
a row found by digest is the operation's only if its caller and key are the operation's too.
One that is not is a collision of digests: the operation is refused as
IdempotencyKeyUnavailable, and the log names the digest alone, never the key or the caller.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from .. import errors, rules
from ..model import Applied, Operation, Rejected, key_digest
from . import sql

__all__ = [
    "KeyStored",
    "Settlement",
    "check_free",
    "journal_key_index",
    "key_constraints",
    "key_reused",
    "key_unavailable",
    "record_refusals",
    "replay_of",
    "settle",
]

logger = logging.getLogger(__name__)

# The unique index of the journal's keys (migration 0008), and the unique indexes that find an
# idempotency key stored already (with migration 0002's).
journal_key_index = "transfers_key_digest"
key_constraints = frozenset({journal_key_index, "refusals_pkey"})


class KeyStored(Exception):
    """A key the batch took for new was stored by then: the batch starts over, looking its
    keys up first."""


@dataclass(frozen=True, slots=True)
class Settlement:
    """What the keys of a batch say before anything is applied, by operation index."""

    # Each operation's request digest, and its key's (`model.key_digest`); empty for a
    # Rejected one.
    hashes: list[bytes]
    digests: list[bytes]
    # Settled before: with None, a replay (or a repeat within the batch), succeeding with
    # nothing to write; with an error, failing with it (`rules.apply_all`).
    settled: dict[int, errors.CofferError | None]
    # Replays of stored operations: the id of the operation whose result they answer with.
    replays: dict[int, int]
    # Repeats of an earlier operation of this batch: its index.
    duplicates: dict[int, int]


async def settle(
    connection: asyncpg.Connection,
    operations: Sequence[Operation | Rejected],
    *,
    look_up: bool,
) -> Settlement:
    """Which operations are replays of stored ones, which reuse a key for another request,
    and which repeat an earlier one of this batch. Without `look_up`, the batch goes as if no
    key were stored yet (the insert of its transfers finds out)."""
    settled: dict[int, errors.CofferError | None] = {}
    replays: dict[int, int] = {}
    duplicates: dict[int, int] = {}
    # The first operation of the batch with each key digest.
    first: dict[bytes, int] = {}
    hashes: list[bytes] = []
    digests: list[bytes] = []
    for index, operation in enumerate(operations):
        if isinstance(operation, Rejected):
            hashes.append(b"")
            digests.append(b"")
            continue
        hashes.append(operation.request_hash())
        digest = key_digest(operation.caller, operation.idempotency_key)
        digests.append(digest)
        earlier = first.get(digest)
        if earlier is None:
            first[digest] = index
        elif _key(operations, earlier) != _key(operations, index):
            settled[index] = key_unavailable(digest)
        elif hashes[earlier] != hashes[index]:
            settled[index] = key_reused(operation.idempotency_key)
        else:
            settled[index] = None
            duplicates[index] = earlier
    if not look_up:
        return Settlement(hashes, digests, settled, replays, duplicates)
    stored = await connection.fetch(
        sql.select_stored_keys,
        list(first),
        *_key_columns(_key(operations, index) for index in first.values()),
    )
    # Collisions first, then refusals, successes last: a row of the operation's own key wins
    # over another key's of the same digest; and where a key holds both a refusal and a
    # success (see coffer.core.ledger on a request naming what is being created at that very
    # moment), the success, which moved money, wins.
    found: list[tuple[int, int, asyncpg.Record]] = []
    for row in stored:
        if row["key_digest"] is None:
            found.append((1, first[key_digest(row["caller"], row["idempotency_key"])], row))
            continue
        index = first[row["key_digest"]]
        own = (row["caller"], row["idempotency_key"]) == _key(operations, index)
        found.append((2 if own else 0, index, row))
    for rank, index, row in sorted(found, key=lambda each: each[0]):
        replays.pop(index, None)
        if rank == 0:
            settled[index] = key_unavailable(digests[index])
        elif row["request_hash"] != hashes[index]:
            settled[index] = key_reused(row["idempotency_key"])
        elif row["operation_id"] is None:
            settled[index] = errors.refusal(row["reason"], row["message"])
        else:
            settled[index] = None
            replays[index] = row["operation_id"]
    # A duplicate of an operation that turned out to be stored is a replay too.
    for index, earlier in list(duplicates.items()):
        if earlier in replays:
            replays[index] = replays[earlier]
            del duplicates[index]
        elif isinstance(settled.get(earlier), errors.CofferError):
            settled[index] = settled[earlier]
            del duplicates[index]
    return Settlement(hashes, digests, settled, replays, duplicates)


async def check_free(
    connection: asyncpg.Connection,
    operations: Sequence[Operation | Rejected],
    digests: Sequence[bytes],
    fresh: Sequence[int],
    refused: Sequence[int],
    ahead: Collection[int],
) -> None:
    """Raises KeyStored if a key the batch is about to answer anew (`fresh`) is stored
    already: as a refusal (for any operation), or as a success (for one `refused` here; one
    written `ahead` would have met the stored key at the unique index already), its own or
    another key's of the same digest, so that a refusal meets a collision as a success does
    (IDEMPOTENCY_KEY_UNAVAILABLE, once the batch looks its keys up). Run with the
    wallets locked: a batch that stored the same request locked the same wallets, so it has
    committed, and what it stored is seen."""
    if not fresh:
        return
    keys = {_key(operations, index) for index in fresh}
    unwritten = [index for index in refused if index not in ahead]
    taken = await connection.fetchval(
        sql.select_keys_taken, *_key_columns(keys), [digests[index] for index in unwritten]
    )
    if taken:
        raise KeyStored()


async def record_refusals(
    connection: asyncpg.Connection,
    operations: Sequence[Operation | Rejected],
    hashes: Sequence[bytes],
    refused: Sequence[int],
    outcomes: Sequence[rules.Outcome],
    now: datetime,
) -> None:
    """Stores the refusals under their keys: a retry gets the same answer. A concurrent
    batch storing the same key meets this one at the primary key; the later starts over and
    finds it."""
    records = []
    for index in refused:
        error = outcomes[index]
        assert isinstance(error, errors.CofferError) and error.refusal
        caller, key = _key(operations, index)
        records.append((caller, key, hashes[index], error.reason, error.message, now))
    await connection.copy_records_to_table(
        sql.refusals_table, records=records, columns=sql.refusal_columns
    )


def replay_of(result: Applied | errors.CofferError | None) -> Applied | errors.CofferError:
    """The answer to a request repeated within its batch: its first one, marked a replay."""
    if isinstance(result, Applied):
        return dataclasses.replace(result, replayed=True)
    assert isinstance(result, errors.CofferError)
    if isinstance(result, errors.InvalidArgument):
        return result
    return type(result)(result.message, replayed=True)


def key_reused(key: str) -> errors.IdempotencyKeyReused:
    return errors.IdempotencyKeyReused(
        f"idempotency key {key!r} was used for another request; use a new key"
    )


def key_unavailable(digest: bytes) -> errors.IdempotencyKeyUnavailable:
    """The error for a key whose digest is another key's: logged by the digest alone (the key
    and the caller stay out of the log), answered without either."""
    logger.warning(
        "idempotency key digest %s is another key's already: the operation is refused as "
        "IDEMPOTENCY_KEY_UNAVAILABLE",
        digest.hex(),
    )
    return errors.IdempotencyKeyUnavailable(
        "this idempotency key cannot be stored (its digest is another key's); send the "
        "request again with another key"
    )


def _key(operations: Sequence[Operation | Rejected], index: int) -> tuple[str, str]:
    operation = operations[index]
    assert not isinstance(operation, Rejected)
    return operation.caller, operation.idempotency_key


def _key_columns(keys: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    callers: list[str] = []
    names: list[str] = []
    for caller, name in keys:
        callers.append(caller)
        names.append(name)
    return callers, names
