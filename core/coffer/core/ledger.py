"""The ledger on PostgreSQL: applies batches of operations, and answers queries.

A batch is one database transaction:
1. find the batch's duplicate idempotency keys, and — when an earlier attempt met a stored
   one — the keys already stored (replays, or keys reused for another request);
2. read the earlier transfers and holds that voids, captures and releases name;
3. write ahead, with one COPY, the transfers whose postings do not depend on any balance
   (credits, all-or-nothing debits, transfers, deposits, withdrawals, payments), as if they
   will succeed: the journal is written before any lock is taken;
4. lock every wallet the batch touches, once, with SELECT … FOR UPDATE in ascending id order
   (so batches never deadlock), then the open holds it resolves, and release the lapsed
   holds of those wallets first;
5. validate each operation in order against that state in memory (`rules.apply_all`);
6. check, with the locks held, that no key it answers anew was stored meanwhile (as a refusal,
   or as a success of an operation it refused), and keep its refusals under their keys;
7. remove what was written ahead and did not happen (never committed, so never seen), COPY
   the other transfers, and update each touched wallet row once.

The transfers of one batch share one time; their ids follow the order they were written in,
which within a batch is not always the order the operations were applied in.

Keys are stored in the same transaction as the postings: a success's on its first transfer, a
refusal's (NOT_FOUND, FAILED_PRECONDITION, LINKED_OPERATION_FAILED) in `refusals`; a replay
after a crash or a restart finds them, and answers what was answered first. Two batches racing
on one new key meet at a unique index, or at step 6: the same request locks the same wallets,
so the later batch sees what the earlier one stored once it holds the locks. The later starts
over, looks its keys up first, and answers with the stored outcome. (Two different requests
racing under one key, on wallets apart, can each be answered before either is stored: each
replays its own answer after, and any other request with that key is IDEMPOTENCY_KEY_REUSED.
Likewise a request naming a wallet, transfer or hold whose creation is not yet committed locks
nothing, is refused as not found, and a copy racing it may find the thing created and apply:
the key then holds both, and replays answer with the success, which moved money. Ids are told
only once their creation has committed, so only a guessed id can meet this.)

Connections come from two pools: writes (batches, units, wallets) from one, queries from
another, smaller one, so that long history scans cannot take the connections writes need.
Every connection is used through one boundary (`_guarded`): what asyncpg raises when the
database is gone or does not answer in time (a lost or refused connection, a server shutting
down or restarting, a statement, lock, command or acquire timeout) becomes errors.Unavailable,
which the same request with the same idempotency key may retry; anything else is a bug and
passes unchanged. A stalled database fails calls within about `statement_timeout_s`: the
server cancels statements past it, and the client gives up on a server that answers nothing
(a paused or unreachable one) shortly after.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import asyncpg

from . import errors, rules
from .model import (
    Applied,
    Balance,
    CaptureHold,
    ExpireHold,
    Hold,
    HoldStatus,
    NewWallet,
    Operation,
    OwnerKind,
    Rejected,
    ReleaseHold,
    SystemWallet,
    Transfer,
    TransferKind,
    Unit,
    UnitKind,
    Void,
    Wallet,
    WalletStatus,
    batch_operations_max,
    hold_status_resolved_by,
    operation_transfers_max,
    page_size_default,
    page_size_max,
    system_caller,
)

T = TypeVar("T")

transaction_retries_max = 5
wallet_unit_cache_max = 100_000
expiry_batch_max = 1000

statement_timeout_s_default = 5.0
lock_timeout_s_default = 5.0
# PostgreSQL takes its timeouts in whole milliseconds, where 0 means none: a shorter timeout
# than the least would round to none at all.
timeout_s_min = 0.01
timeout_s_max = 3600.0
pool_size_max = 100
# How much longer than statement_timeout the client waits for an answer before it gives up on
# the connection: the server's own timeout, which leaves the connection usable, comes first.
command_timeout_margin_s = 0.5

_retryable_database_errors = (
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
)

# What asyncpg raises when the database is gone or does not answer in time: the request may
# succeed when sent again. Classes, never messages.
_unreachable_errors: tuple[type[Exception], ...] = (
    # The socket: refused, reset, broken, no socket file; and TimeoutError (a subclass of
    # OSError), raised by a command, connect or acquire timeout on the client's side.
    OSError,
    # Class 08, connection exception: the connection does not exist, failed, was rejected.
    asyncpg.PostgresConnectionError,
    # Class 57, operator intervention: admin or crash shutdown, cannot connect now (starting
    # or shutting down), and query_canceled (statement_timeout).
    asyncpg.OperatorInterventionError,
    # 55P03: lock_timeout.
    asyncpg.LockNotAvailableError,
    # 53300: too many connections.
    asyncpg.TooManyConnectionsError,
    # asyncpg's protocol lost track of the connection: e.g. the FATAL message a server shutting
    # down sends to an idle connection leaves it in a state from which every later operation
    # fails ("cannot switch to state ..."). The connection cannot be used again.
    asyncpg.InternalClientError,
)
_timeout_errors = (TimeoutError, asyncpg.QueryCanceledError, asyncpg.LockNotAvailableError)


@dataclass(frozen=True, slots=True)
class TransferFilter:
    wallet_id: int | None = None
    kinds: tuple[TransferKind, ...] = ()
    start: datetime | None = None
    end: datetime | None = None
    reference: str | None = None


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    items: list[T]
    # Where the next page starts (an id to pass back as the cursor); None on the last page.
    cursor: int | None


async def _init_connection(connection: asyncpg.Connection) -> None:
    await connection.set_type_codec(
        "jsonb",
        encoder=_encode_jsonb,
        decoder=_decode_jsonb,
        schema="pg_catalog",
        format="binary",
    )


async def _keep_session(connection: asyncpg.Connection) -> None:
    """The ledger leaves no session state behind (no LISTEN, no open cursors, no session
    settings, advisory locks released explicitly): skip the round trip that resets it."""


def _encode_jsonb(value: Any) -> bytes:
    # jsonb's binary format: a version byte, then the text.
    return b"\x01" + json.dumps(value, separators=(",", ":")).encode()


def _decode_jsonb(data: bytes) -> Any:
    assert data[:1] == b"\x01", data[:1]
    return json.loads(data[1:])


async def create_pool(
    dsn: str,
    *,
    size_max: int = 10,
    statement_timeout_s: float = statement_timeout_s_default,
    lock_timeout_s: float = lock_timeout_s_default,
    on_close: Callable[[], None] | None = None,
) -> asyncpg.Pool:
    """A pool of up to `size_max` connections, opened when needed (none kept open while the
    database is down, so nothing retries in the background). Each statement is bounded on the
    server (statement_timeout, lock_timeout) and on the client (command_timeout, a little
    longer, for a server that answers nothing); connecting is bounded by statement_timeout_s.
    `on_close` is called whenever one of its connections closes (the server went away, say)."""

    async def init(connection: asyncpg.Connection) -> None:
        await _init_connection(connection)
        if on_close is not None:
            connection.add_termination_listener(lambda _connection: on_close())

    assert 0 < size_max <= pool_size_max, size_max
    assert timeout_s_min <= statement_timeout_s <= timeout_s_max
    assert timeout_s_min <= lock_timeout_s <= timeout_s_max
    pool = await asyncpg.create_pool(
        dsn,
        min_size=0,
        max_size=size_max,
        init=init,
        reset=_keep_session,
        timeout=statement_timeout_s,
        command_timeout=statement_timeout_s + command_timeout_margin_s,
        server_settings={
            "statement_timeout": str(round(statement_timeout_s * 1000)),
            "lock_timeout": str(round(lock_timeout_s * 1000)),
        },
    )
    assert pool is not None
    return pool


async def ping(pool: asyncpg.Pool, timeout_s: float) -> None:
    """Raises errors.Unavailable unless the database answers `select 1` within about
    `timeout_s` (connecting included)."""
    async with _guarded(pool.acquire(timeout=timeout_s)) as connection:
        await connection.fetchval("select 1", timeout=timeout_s)


class Ledger:
    """`pool` serves writes; `read_pool` (by default the same) serves queries. Waiting for a
    connection of either takes at most `acquire_timeout_s` (None: no bound)."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        read_pool: asyncpg.Pool | None = None,
        acquire_timeout_s: float | None = None,
    ) -> None:
        self._pool = pool
        self._read_pool = read_pool or pool
        self._acquire_timeout_s = acquire_timeout_s
        # Facts that never change once written: a wallet's unit, a unit's system wallets.
        self._wallet_units: dict[int, str] = {}
        self._system_wallets: dict[tuple[str, SystemWallet], int] = {}

    @property
    def pool(self) -> asyncpg.Pool:
        return self._pool

    @property
    def read_pool(self) -> asyncpg.Pool:
        return self._read_pool

    async def close(self) -> None:
        await self._pool.close()
        if self._read_pool is not self._pool:
            await self._read_pool.close()

    # Units -------------------------------------------------------------------------------------

    async def create_unit(self, unit: Unit) -> Unit:
        """Creates the unit and its system wallets; idempotent for the same definition."""
        async with self._connection(transaction=True) as connection:
            row = await connection.fetchrow(
                """
                insert into units (code, kind, name, plural, description, scale)
                values ($1, $2, $3, $4, $5, $6)
                on conflict (code) do nothing
                returning *
                """,
                unit.code,
                unit.kind,
                unit.name,
                unit.plural,
                unit.description,
                unit.scale,
            )
            if row is None:
                existing = _unit(
                    await connection.fetchrow("select * from units where code = $1", unit.code)
                )
                if not existing.same_definition(unit):
                    raise errors.UnitExists(f"unit {unit.code} exists with another definition")
                return existing
            await connection.executemany(
                "insert into wallets (owner_id, owner_kind, unit) values ($1, $2, $3)",
                [(which.name, OwnerKind.system, unit.code) for which in SystemWallet],
            )
            return _unit(row)

    async def get_unit(self, code: str) -> Unit:
        async with self._read_connection() as connection:
            row = await connection.fetchrow("select * from units where code = $1", code)
        if row is None:
            raise errors.UnitNotFound(f"unit {code} does not exist")
        return _unit(row)

    async def list_units(self) -> list[Unit]:
        async with self._read_connection() as connection:
            rows = await connection.fetch("select * from units order by code")
        return [_unit(row) for row in rows]

    # Wallets -----------------------------------------------------------------------------------

    async def create_wallet(self, new: NewWallet) -> tuple[Wallet, bool]:
        """Creates the wallet; returns it, and whether this was a replay of an earlier
        request with the same key (the wallet it created then)."""
        request_hash = new.request_hash()
        replayed = False
        async with self._connection(transaction=True) as connection:
            if not await connection.fetchval("select true from units where code = $1", new.unit):
                raise errors.UnitNotFound(f"unit {new.unit} does not exist")
            row = await connection.fetchrow(
                f"""
                insert into wallets (owner_id, owner_kind, unit, balance_minimum, metadata,
                                     caller, idempotency_key, request_hash)
                values ($1, $2, $3, $4, $5, $6, $7, $8)
                on conflict (caller, idempotency_key) where idempotency_key is not null
                do nothing
                returning {_wallet_columns}
                """,
                new.owner_id,
                new.owner_kind,
                new.unit,
                new.balance_minimum,
                dict(new.metadata) or None,
                new.caller,
                new.idempotency_key,
                request_hash,
            )
            if row is None:
                row = await connection.fetchrow(
                    f"""
                    select {_wallet_columns}, request_hash from wallets
                    where caller = $1 and idempotency_key = $2
                    """,
                    new.caller,
                    new.idempotency_key,
                )
                assert row is not None
                if row["request_hash"] != request_hash:
                    raise _key_reused(new.idempotency_key)
                replayed = True
        return _wallet(row), replayed

    async def get_wallet(self, wallet_id: int) -> Wallet:
        async with self._read_connection() as connection:
            row = await connection.fetchrow(
                f"select {_wallet_columns} from wallets where id = $1", wallet_id
            )
        if row is None:
            raise errors.WalletNotFound(f"wallet {wallet_id} does not exist")
        return _wallet(row)

    async def list_wallets(
        self,
        *,
        owner_id: str | None = None,
        owner_kind: OwnerKind | None = None,
        unit: str | None = None,
        page_size: int = page_size_default,
        after_id: int = 0,
    ) -> Page[Wallet]:
        assert 0 < page_size <= page_size_max
        async with self._read_connection() as connection:
            rows = await connection.fetch(
                f"""
                select {_wallet_columns} from wallets
                where id > $1
                  and ($2::text is null or owner_id = $2)
                  and ($3::smallint is null or owner_kind = $3)
                  and ($4::text is null or unit = $4)
                order by id
                limit $5
                """,
                after_id,
                owner_id,
                owner_kind,
                unit,
                page_size + 1,
            )
        wallets = [_wallet(row) for row in rows[:page_size]]
        cursor = wallets[-1].id if len(rows) > page_size else None
        return Page(wallets, cursor)

    async def cancel_wallet(self, wallet_id: int) -> Wallet:
        async with self._connection(transaction=True) as connection:
            row = await connection.fetchrow(
                f"select {_wallet_columns} from wallets where id = $1 for update", wallet_id
            )
            if row is None:
                raise errors.WalletNotFound(f"wallet {wallet_id} does not exist")
            wallet = _wallet(row)
            if wallet.owner_kind == OwnerKind.system:
                raise errors.WalletKindMismatch(f"wallet {wallet_id} is a system wallet")
            if wallet.status == WalletStatus.cancelled:
                return wallet
            if wallet.balance.posted != 0 or wallet.balance.pending != 0:
                raise errors.WalletNotEmpty(
                    f"wallet {wallet_id} holds {wallet.balance.posted}"
                    f" with {wallet.balance.pending} on hold; empty it first"
                )
            row = await connection.fetchrow(
                f"update wallets set status = $2 where id = $1 returning {_wallet_columns}",
                wallet_id,
                WalletStatus.cancelled,
            )
        return _wallet(row)

    # Operations --------------------------------------------------------------------------------

    async def apply(
        self, operations: Sequence[Operation | Rejected], *, now: datetime | None = None
    ) -> list[Applied | errors.CofferError]:
        """Applies a batch of operations in one database transaction: one result each.
        `Rejected` entries fail as they are (with their linked chain). `now` is the batch's
        time (tests move it); by default the clock's."""
        assert 0 < len(operations) <= batch_operations_max, len(operations)
        # First optimistically, as if no key were stored yet: the insert of the transfers
        # finds out. If one was, the batch starts over and looks its keys up first.
        optimistic = True
        for _ in range(transaction_retries_max):
            try:
                async with self._connection(transaction=True) as connection:
                    batch = _Batch(
                        self, connection, operations, now or datetime.now(UTC), optimistic
                    )
                    return await batch.run()
            except asyncpg.UniqueViolationError as error:
                if error.constraint_name not in _key_constraints:
                    raise  # a broken invariant, not a stored key
                # A key was stored already, or a concurrent batch took it first.
                optimistic = False
            except _KeyStored:
                optimistic = False
            except _retryable_database_errors:
                continue
        raise errors.Unavailable("the batch met conflicting writes too often; send it again")

    async def expire_holds(self, now: datetime | None = None) -> int:
        """Releases holds past their expiry; returns how many."""
        now = now or datetime.now(UTC)
        async with self._connection() as connection:
            rows = await connection.fetch(
                """
                select transfer_id from pending_holds where expires_at <= $1
                order by expires_at limit $2
                """,
                now,
                expiry_batch_max,
            )
        if not rows:
            return 0
        outcomes = await self.apply([_expiry(row["transfer_id"]) for row in rows], now=now)
        return sum(1 for outcome in outcomes if isinstance(outcome, Applied))

    # Queries -----------------------------------------------------------------------------------

    async def get_transfer(self, transfer_id: int) -> Transfer:
        async with self._read_connection() as connection:
            rows = await connection.fetch(f"{_select_transfers} where t.id = $1", transfer_id)
        if not rows:
            raise errors.TransferNotFound(f"transfer {transfer_id} does not exist")
        return _transfer(rows[0])

    async def list_transfers(
        self,
        where: TransferFilter,
        *,
        page_size: int = page_size_default,
        before_id: int | None = None,
    ) -> Page[Transfer]:
        """Newest first."""
        assert 0 < page_size <= page_size_max
        arguments: list[Any] = []

        def argument(value: Any, cast: str) -> str:
            arguments.append(value)
            return f"${len(arguments)}::{cast}"

        conditions = []
        if before_id is not None:
            conditions.append(f"t.id < {argument(before_id, 'bigint')}")
        if where.kinds:
            conditions.append(f"t.kind = any({argument(list(where.kinds), 'smallint[]')})")
        if where.start is not None:
            conditions.append(f"t.created_at >= {argument(where.start, 'timestamptz')}")
        if where.end is not None:
            conditions.append(f"t.created_at < {argument(where.end, 'timestamptz')}")
        if where.reference:
            conditions.append(f"t.reference = {argument(where.reference, 'text')}")
        limit = page_size + 1
        if where.wallet_id is not None:
            # One index range scan per side of the transfer, merged.
            wallet = argument(where.wallet_id, "bigint")
            sides = [
                f"""(select t.id from transfers t where t.{side} = {wallet}
                     {"".join(" and " + condition for condition in conditions)}
                     order by t.id desc limit {limit})"""
                for side in ("source_wallet_id", "target_wallet_id")
            ]
            query = f"""
                {_select_transfers}
                where t.id in (select id from ({" union all ".join(sides)}) ids)
                order by t.id desc limit {limit}
            """
        else:
            where_clause = " and ".join(conditions) or "true"
            query = f"{_select_transfers} where {where_clause} order by t.id desc limit {limit}"
        async with self._read_connection() as connection:
            rows = await connection.fetch(query, *arguments)
        transfers = [_transfer(row) for row in rows[:page_size]]
        cursor = transfers[-1].id if len(rows) > page_size else None
        return Page(transfers, cursor)

    async def get_hold(self, hold_id: int) -> Hold:
        async with self._read_connection() as connection:
            holds = await _holds(connection, [hold_id], datetime.now(UTC))
        if hold_id not in holds:
            raise errors.HoldNotFound(f"hold {hold_id} does not exist")
        return holds[hold_id]

    # Plumbing ----------------------------------------------------------------------------------

    def _connection(self, *, transaction: bool = False) -> _guarded:
        return _guarded(
            self._pool.acquire(timeout=self._acquire_timeout_s), transaction=transaction
        )

    def _read_connection(self) -> _guarded:
        return _guarded(self._read_pool.acquire(timeout=self._acquire_timeout_s))

    async def _wallet_unit_map(
        self, connection: asyncpg.Connection, wallet_ids: set[int]
    ) -> dict[int, str]:
        missing = [wallet_id for wallet_id in wallet_ids if wallet_id not in self._wallet_units]
        if missing:
            if len(self._wallet_units) + len(missing) > wallet_unit_cache_max:
                self._wallet_units.clear()
            rows = await connection.fetch(
                "select id, unit from wallets where id = any($1::bigint[])", missing
            )
            self._wallet_units.update((row["id"], row["unit"]) for row in rows)
        return {
            wallet_id: self._wallet_units[wallet_id]
            for wallet_id in wallet_ids
            if wallet_id in self._wallet_units
        }

    async def _system_wallet_map(
        self, connection: asyncpg.Connection, units: set[str]
    ) -> dict[tuple[str, SystemWallet], int]:
        missing = [
            unit for unit in units if (unit, SystemWallet.operator) not in self._system_wallets
        ]
        if missing:
            rows = await connection.fetch(
                """
                select unit, owner_id, id from wallets
                where owner_kind = $1 and unit = any($2::text[])
                """,
                OwnerKind.system,
                missing,
            )
            for row in rows:
                self._system_wallets[(row["unit"], SystemWallet[row["owner_id"]])] = row["id"]
        return {
            key: wallet_id for key, wallet_id in self._system_wallets.items() if key[0] in units
        }


class _guarded:
    """Acquires a connection (and with `transaction`, begins a transaction on it), and ends
    them: the one place where asyncpg's errors that mean the database is gone or did not
    answer in time become errors.Unavailable. The connection such an error met is closed,
    whatever state it is in, rather than rolled back (which would wait for an answer that may
    not come; the server rolls back a transaction whose connection closed) or given back to
    the pool, which opens a fresh one when it next needs one. Other errors pass unchanged."""

    __slots__ = ("_acquiring", "_connection", "_transaction", "_transactional")

    def __init__(self, acquiring: Any, *, transaction: bool = False) -> None:
        self._acquiring = acquiring
        self._transactional = transaction
        self._connection: Any = None
        self._transaction: Any = None

    async def __aenter__(self) -> asyncpg.Connection:
        try:
            self._connection = await self._acquiring.__aenter__()
        except Exception as error:
            if _unreachable(error, None):
                raise _unavailable(error) from error
            raise
        if self._transactional:
            transaction = self._connection.transaction()
            try:
                await transaction.start()
            except Exception as error:
                await self.__aexit__(type(error), error, error.__traceback__)
                raise
            self._transaction = transaction
        return self._connection  # type: ignore[no-any-return]

    async def __aexit__(self, *exc_info: Any) -> None:
        error = exc_info[1]
        lost = isinstance(error, Exception) and _unreachable(error, self._connection)
        ending_error = None
        if self._transaction is not None and not lost:
            try:
                await self._transaction.__aexit__(*exc_info)  # Commits, or rolls back.
            except Exception as failure:
                ending_error = failure
                lost = _unreachable(failure, self._connection)
                if lost:
                    error = failure
        if lost and not _closed(self._connection):
            self._connection.terminate()
        try:
            await self._acquiring.__aexit__(*exc_info)
        except Exception as release_error:
            if not lost and ending_error is None:
                if _unreachable(release_error, self._connection):
                    raise _unavailable(release_error) from release_error
                raise
        if lost:
            raise _unavailable(error) from error
        if ending_error is not None:
            raise ending_error


def _unreachable(error: Exception, connection: asyncpg.Connection | None) -> bool:
    """Whether `error` means the database is gone or did not answer in time: it, or an error
    it was raised from or while handling, is one of `_unreachable_errors`; or it is asyncpg's
    InterfaceError on a connection that is closed ("the underlying connection is closed")."""
    if isinstance(error, errors.CofferError):
        return False
    if isinstance(error, asyncpg.InterfaceError) and connection is not None and _closed(connection):
        return True
    return any(isinstance(cause, _unreachable_errors) for cause in _causes(error))


def _closed(connection: asyncpg.Connection) -> bool:
    try:
        return connection.is_closed()
    except asyncpg.InterfaceError:
        # The pool took the connection back when it closed: the proxy is detached from it.
        return True


def _unavailable(error: BaseException) -> errors.Unavailable:
    if any(isinstance(cause, _timeout_errors) for cause in _causes(error)):
        return errors.Unavailable("the database did not answer in time; send it again")
    return errors.Unavailable("the database cannot be reached; send it again")


def _causes(error: BaseException) -> Iterator[BaseException]:
    """`error`, the error it was raised from or while handling, and so on."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        yield cause
        cause = cause.__cause__ or cause.__context__


# A batch -----------------------------------------------------------------------------------------


class _Batch:
    def __init__(
        self,
        ledger: Ledger,
        connection: asyncpg.Connection,
        operations: Sequence[Operation | Rejected],
        now: datetime,
        optimistic: bool,
    ) -> None:
        self.ledger = ledger
        self.connection = connection
        self.operations = operations
        self.now = now
        self.optimistic = optimistic
        # When the holds the batch resolves were placed.
        self.hold_created_at: dict[int, datetime] = {}
        # Each operation's request digest (set with its keys), and each locked wallet's
        # balances as read (set with the locks).
        self.hashes: list[bytes] = []
        self.original: dict[int, tuple[int, int]] = {}

    async def run(self) -> list[Applied | errors.CofferError]:
        operations = self.operations
        settled, replays, duplicates = await self._settle_keys()
        fresh = [
            index
            for index, operation in enumerate(operations)
            if index not in settled and not isinstance(operation, Rejected)
        ]

        book = rules.Book()
        transfer_ids = set()
        hold_ids = set()
        for index in fresh:
            operation = operations[index]
            if isinstance(operation, Void):
                transfer_ids.add(operation.transfer_id)
            elif isinstance(operation, (CaptureHold, ReleaseHold, ExpireHold)):
                hold_ids.add(operation.hold_id)
        referenced = await self._referenced_transfers(transfer_ids | hold_ids)

        wallet_ids = set()
        for index in fresh:
            wallet_ids.update(rules.wallets_named(operations[index]))
        for transfer in referenced.values():
            wallet_ids.update((transfer["source_wallet_id"], transfer["target_wallet_id"]))
        units = await self.ledger._wallet_unit_map(self.connection, wallet_ids)
        system_units = {
            units[wallet_id]
            for index in fresh
            if type(operations[index]) in rules.system_wallet_kinds
            for wallet_id in rules.wallets_named(operations[index])
            if wallet_id in units
        }
        if system_units:
            book.system_wallets = await self.ledger._system_wallet_map(
                self.connection, system_units
            )
            wallet_ids.update(book.system_wallets.values())

        ahead = await self._write_ahead(fresh, units, book)
        await self._lock_wallets(book, wallet_ids)
        lapsed = await self._lock_holds(book, referenced, hold_ids)
        await self._load_voids(book, referenced, transfer_ids)

        try:
            expiries: list[rules.Outcome] = [
                rules.apply(book, expiry, self.now) for expiry in lapsed
            ]
        except errors.CofferError as error:
            # A lapsed hold, locked and open, always expires.
            raise AssertionError(f"a lapsed hold did not expire: {error}") from error
        outcomes = rules.apply_all(book, operations, self.now, settled)
        refused = rules.kept_refusals(operations, outcomes, settled)
        await self._check_keys_free(fresh, refused, ahead)
        if refused:
            await self._record_refusals(refused, outcomes)
        if lapsed:
            # Written like any operation, ahead of the batch's own; their results are not
            # the caller's.
            self.operations = [*lapsed, *operations]
            self.hashes = [expiry.request_hash() for expiry in lapsed] + self.hashes
            ahead = {index + len(lapsed): written for index, written in ahead.items()}
        results = (await self._write(book, [*expiries, *outcomes], ahead))[len(lapsed) :]
        if replays:
            replayed = await _operation_results(self.connection, set(replays.values()), self.now)
            for index, operation_id in replays.items():
                results[index] = replayed[operation_id]
        for index, first in duplicates.items():
            results[index] = _replay_of(results[first])
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    async def _settle_keys(
        self,
    ) -> tuple[dict[int, errors.CofferError | None], dict[int, int], dict[int, int]]:
        """Which operations are replays of stored ones, which reuse a key for another
        request, and which repeat an earlier one of this batch."""
        operations = self.operations
        settled: dict[int, errors.CofferError | None] = {}
        replays: dict[int, int] = {}
        duplicates: dict[int, int] = {}
        first: dict[tuple[str, str], int] = {}
        hashes = self.hashes = [
            b"" if isinstance(operation, Rejected) else operation.request_hash()
            for operation in operations
        ]
        for index, operation in enumerate(operations):
            if isinstance(operation, Rejected):
                continue
            key = (operation.caller, operation.idempotency_key)
            if key in first:
                earlier = first[key]
                if hashes[earlier] != hashes[index]:
                    settled[index] = _key_reused(operation.idempotency_key)
                else:
                    settled[index] = None
                    duplicates[index] = earlier
            else:
                first[key] = index
        if self.optimistic:
            return settled, replays, duplicates
        rows = await self.connection.fetch(_select_stored_keys, *_key_columns(first))
        # Successes last: where a key holds both (see the module's note on a request naming
        # what is being created at that very moment), the success, which moved money, wins.
        for row in sorted(rows, key=lambda row: row["operation_id"] is not None):
            index = first[(row["caller"], row["idempotency_key"])]
            replays.pop(index, None)
            if row["request_hash"] != hashes[index]:
                settled[index] = _key_reused(row["idempotency_key"])
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
        return settled, replays, duplicates

    async def _check_keys_free(
        self, fresh: list[int], refused: list[int], ahead: Mapping[int, object]
    ) -> None:
        """Raises _KeyStored if a key this batch is about to answer anew is stored already:
        as a refusal (for any operation), or as a success (for one refused here; one written
        ahead would have met the stored key at the unique index already). Run with the
        wallets locked: a batch that stored the same request locked the same wallets, so it
        has committed, and what it stored is seen."""
        if not fresh:
            return
        keys = {self._key(index): index for index in fresh}
        unwritten = {self._key(index): index for index in refused if index not in ahead}
        found = await self.connection.fetchval(
            """
            select exists (
                select from refusals r
                join unnest($1::text[], $2::text[]) as k (caller, key)
                  on r.caller = k.caller and r.idempotency_key = k.key
            ) or exists (
                select from transfers t
                join unnest($3::text[], $4::text[]) as k (caller, key)
                  on t.caller = k.caller and t.idempotency_key = k.key
            )
            """,
            *_key_columns(keys),
            *_key_columns(unwritten),
        )
        if found:
            raise _KeyStored()

    async def _record_refusals(self, refused: list[int], outcomes: list[rules.Outcome]) -> None:
        """Stores the refusals under their keys: a retry gets the same answer. A concurrent
        batch storing the same key meets this one at the primary key; the later starts over
        and finds it."""
        records = []
        for index in refused:
            error = outcomes[index]
            assert isinstance(error, errors.CofferError) and error.refusal
            caller, key = self._key(index)
            records.append((caller, key, self.hashes[index], error.reason, error.message, self.now))
        await self.connection.copy_records_to_table(
            "refusals",
            records=records,
            columns=(
                "caller",
                "idempotency_key",
                "request_hash",
                "reason",
                "message",
                "created_at",
            ),
        )

    def _key(self, index: int) -> tuple[str, str]:
        operation = self.operations[index]
        assert not isinstance(operation, Rejected)
        return operation.caller, operation.idempotency_key

    async def _referenced_transfers(self, ids: set[int]) -> dict[int, asyncpg.Record]:
        if not ids:
            return {}
        rows = await self.connection.fetch(
            """
            select id, kind, source_wallet_id, target_wallet_id, amount, hold_expires_at,
                   created_at
            from transfers where id = any($1::bigint[])
            """,
            list(ids),
        )
        return {row["id"]: row for row in rows}

    async def _lock_wallets(self, book: rules.Book, wallet_ids: set[int]) -> None:
        rows = await self.connection.fetch(
            """
            select id, unit, owner_kind, status, balance_minimum, posted, pending
            from wallets where id = any($1::bigint[])
            order by id
            for update
            """,
            sorted(wallet_ids),
        )
        for row in rows:
            book.wallets[row["id"]] = rules.WalletState(
                id=row["id"],
                unit=row["unit"],
                owner_kind=_owner_kinds[row["owner_kind"]],
                status=_wallet_statuses[row["status"]],
                balance_minimum=row["balance_minimum"],
                posted=row["posted"],
                pending=row["pending"],
            )
        self.original = {
            wallet.id: (wallet.posted, wallet.pending) for wallet in book.wallets.values()
        }

    async def _lock_holds(
        self, book: rules.Book, referenced: dict[int, asyncpg.Record], hold_ids: set[int]
    ) -> list[ExpireHold]:
        """Locks the open holds the batch names, and the lapsed holds of the wallets it
        locked: those release themselves now, first, so that no expired hold keeps holding
        money until the sweep comes by. All of them, as a wallet's balance counts them all (a
        bound here would leave money held, and a refusal on it would be kept); the sweep, a
        bounded batch each second, keeps them few. Returns their expiries, to apply before the rest
        (a lapsed hold the batch names is the batch's to resolve: a capture or release
        fails with HoldExpired, the sweep's expiry applies)."""
        ids = sorted(
            hold_id
            for hold_id in hold_ids
            if hold_id in referenced and referenced[hold_id]["kind"] == TransferKind.hold
        )
        held = [wallet.id for wallet in book.wallets.values() if wallet.pending > 0]
        if not ids and not held:
            return []
        rows = await self.connection.fetch(
            """
            select h.transfer_id, h.source_wallet_id, h.target_wallet_id, h.amount,
                   h.expires_at, t.created_at
            from pending_holds h
            join transfers t on t.id = h.transfer_id
            where h.transfer_id = any($1::bigint[])
               or (h.source_wallet_id = any($2::bigint[]) and h.expires_at <= $3)
            order by h.transfer_id
            for update of h
            """,
            ids,
            held,
            self.now,
        )
        open_holds = {row["transfer_id"]: row for row in rows}
        resolutions: dict[int, TransferKind] = {}
        closed = [hold_id for hold_id in ids if hold_id not in open_holds]
        if closed:
            for row in await self.connection.fetch(
                "select hold_id, kind from transfers where hold_id = any($1::bigint[])", closed
            ):
                resolutions[row["hold_id"]] = TransferKind(row["kind"])
        for hold_id in closed:
            hold = referenced[hold_id]
            self.hold_created_at[hold_id] = hold["created_at"]
            book.holds[hold_id] = rules.HoldState(
                id=hold_id,
                source_wallet_id=hold["source_wallet_id"],
                target_wallet_id=hold["target_wallet_id"],
                amount=hold["amount"],
                expires_at=hold["hold_expires_at"],
                resolution=resolutions.get(hold_id, TransferKind.release),
            )
        lapsed = []
        for hold_id, row in open_holds.items():
            self.hold_created_at[hold_id] = row["created_at"]
            book.holds[hold_id] = rules.HoldState(
                id=hold_id,
                source_wallet_id=row["source_wallet_id"],
                target_wallet_id=row["target_wallet_id"],
                amount=row["amount"],
                expires_at=row["expires_at"],
            )
            if row["expires_at"] <= self.now and hold_id not in hold_ids:
                lapsed.append(_expiry(hold_id))
        return lapsed

    async def _load_voids(
        self, book: rules.Book, referenced: dict[int, asyncpg.Record], transfer_ids: set[int]
    ) -> None:
        ids = [transfer_id for transfer_id in transfer_ids if transfer_id in referenced]
        if not ids:
            return
        for transfer_id in ids:
            row = referenced[transfer_id]
            book.transfers[transfer_id] = rules.TransferState(
                id=transfer_id,
                kind=_transfer_kinds[row["kind"]],
                source_wallet_id=row["source_wallet_id"],
                target_wallet_id=row["target_wallet_id"],
                amount=row["amount"],
            )
        rows = await self.connection.fetch(
            """
            select voids_transfer_id from transfers
            where voids_transfer_id = any($1::bigint[])
            """,
            ids,
        )
        book.voided.update(row["voids_transfer_id"] for row in rows)

    async def _write_ahead(
        self, fresh: list[int], units: Mapping[int, str], book: rules.Book
    ) -> dict[int, tuple[int, rules.Posting]]:
        """Writes, before any wallet is locked, the transfers whose postings do not depend on
        the wallets' state, as if they will succeed: the lock is then held only to validate
        and update balances, not to write the journal. Returns them by operation."""
        expected: dict[int, rules.Posting] = {}
        for index in fresh:
            operation = self.operations[index]
            assert not isinstance(operation, Rejected)
            posting = rules.expected_posting(operation, units.get, book.system_wallets)
            if posting is not None:
                expected[index] = posting
        if not expected:
            return {}
        ids = await self._transfer_ids(len(expected))
        written = dict(zip(expected, zip(ids, expected.values(), strict=True), strict=True))
        await self.connection.copy_records_to_table(
            "transfers",
            records=[
                self._row(transfer_id, transfer_id, posting, index, first=True)
                for index, (transfer_id, posting) in written.items()
            ],
            columns=_transfer_columns,
        )
        return written

    async def _transfer_ids(self, count: int) -> list[int]:
        ids: list[int] = await self.connection.fetchval(
            "select array(select nextval('transfers_id') from generate_series(1, $1))", count
        )
        return ids

    def _row(
        self,
        transfer_id: int,
        operation_id: int,
        posting: rules.Posting,
        index: int,
        *,
        first: bool,
    ) -> tuple[Any, ...]:
        """A journal row, in the order of _transfer_columns."""
        operation = self.operations[index]
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
            self.hashes[index] if first else None,
            operation.note or None,
            operation.reference or None,
            operation.performed_by or None,
            dict(operation.metadata) or None,
            posting.voids_transfer_id,
            posting.hold_id,
            posting.hold_expires_at,
            self.now,
        )

    async def _write(
        self,
        book: rules.Book,
        outcomes: list[rules.Outcome],
        ahead: dict[int, tuple[int, rules.Posting]],
    ) -> list[Applied | errors.CofferError | None]:
        """Writes what validation decided: the transfers not written ahead, the removal of
        those written ahead that did not happen after all, holds, balances."""
        confirmed = {
            index
            for index, (_, posting) in ahead.items()
            if isinstance(outcomes[index], list) and outcomes[index] == [posting]
        }
        stale = [transfer_id for index, (transfer_id, _) in ahead.items() if index not in confirmed]
        count = sum(
            len(outcome)
            for index, outcome in enumerate(outcomes)
            if isinstance(outcome, list) and index not in confirmed
        )
        next_id = iter(await self._transfer_ids(count) if count else ())
        results: list[Applied | errors.CofferError | None] = []
        rows: list[tuple[Any, ...]] = []
        new_holds: list[tuple[int, int, int, int, datetime]] = []
        resolved_holds: list[int] = []
        now = self.now
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, Exception):
                results.append(outcome)
                continue
            if not outcome:
                results.append(None)
                continue
            operation = self.operations[index]
            assert not isinstance(operation, Rejected)
            assert len(outcome) <= operation_transfers_max, outcome
            transfers = []
            operation_id = 0
            for position, posting in enumerate(outcome):
                first = position == 0
                transfer_id = ahead[index][0] if index in confirmed else next(next_id)
                if first:
                    operation_id = transfer_id
                if index not in confirmed:
                    rows.append(self._row(transfer_id, operation_id, posting, index, first=first))
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
                    )
                )
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
            results.append(self._applied(transfers, book))
        if stale:
            # Written ahead, not confirmed: never committed, so never seen.
            await self.connection.execute(
                "delete from transfers where id = any($1::bigint[])", stale
            )
        if rows:
            # COPY is the cheapest way in. A key stored already (by an earlier batch, or by
            # one committing just now) fails it on the unique index: the batch then starts
            # over.
            await self.connection.copy_records_to_table(
                "transfers", records=rows, columns=_transfer_columns
            )
        if new_holds:
            await self.connection.execute(
                """
                insert into pending_holds
                    (transfer_id, source_wallet_id, target_wallet_id, amount, expires_at)
                select * from unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                                     $5::timestamptz[])
                """,
                *zip(*new_holds, strict=True),
            )
        if resolved_holds:
            await self.connection.execute(
                "delete from pending_holds where transfer_id = any($1::bigint[])", resolved_holds
            )
        changed = [
            wallet
            for wallet in book.wallets.values()
            if (wallet.posted, wallet.pending) != self.original[wallet.id]
        ]
        if changed:
            await self.connection.execute(
                """
                update wallets w set posted = v.posted, pending = v.pending
                from unnest($1::bigint[], $2::bigint[], $3::bigint[]) as v (id, posted, pending)
                where w.id = v.id
                """,
                [wallet.id for wallet in changed],
                [wallet.posted for wallet in changed],
                [wallet.pending for wallet in changed],
            )
        return results

    def _applied(self, transfers: list[Transfer], book: rules.Book) -> Applied:
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
                created_at=self.hold_created_at[state.id],
                resolved_by_transfer_id=first.id,
                amount_captured=first.amount if first.kind == TransferKind.capture else 0,
            )
        return Applied(tuple(transfers), hold=hold)


# The unique indexes that find an idempotency key stored already (migrations 0001, 0002).
_key_constraints = frozenset({"transfers_idempotency", "refusals_pkey"})


class _KeyStored(Exception):
    """A key the batch took for new was stored by then: the batch starts over, looking its
    keys up first."""


def _key_columns(keys: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    callers: list[str] = []
    names: list[str] = []
    for caller, name in keys:
        callers.append(caller)
        names.append(name)
    return callers, names


async def _operation_results(
    connection: asyncpg.Connection, operation_ids: set[int], now: datetime
) -> dict[int, Applied]:
    # An operation's transfers have consecutive ids from its own (operation_id).
    rows = await connection.fetch(
        f"""
        {_select_transfers}
        join unnest($1::bigint[]) as o (id)
          on t.id between o.id and o.id + $2 - 1 and t.operation_id = o.id
        order by t.id
        """,
        list(operation_ids),
        operation_transfers_max,
    )
    grouped: dict[int, list[Transfer]] = {}
    for row in rows:
        grouped.setdefault(row["operation_id"], []).append(_transfer(row))
    # The hold an operation placed or resolved, as it stands now.
    hold_of = {
        operation_id: transfers[0].id
        if transfers[0].kind == TransferKind.hold
        else transfers[0].hold_id
        for operation_id, transfers in grouped.items()
    }
    holds = await _holds(connection, {hold_id for hold_id in hold_of.values() if hold_id}, now)
    return {
        operation_id: Applied(
            tuple(transfers), hold=holds.get(hold_of[operation_id] or 0), replayed=True
        )
        for operation_id, transfers in grouped.items()
    }


def _replay_of(result: Applied | errors.CofferError | None) -> Applied | errors.CofferError:
    """The answer to a request repeated within its batch: its first one, marked a replay."""
    if isinstance(result, Applied):
        return dataclasses.replace(result, replayed=True)
    assert isinstance(result, errors.CofferError)
    if isinstance(result, errors.InvalidArgument):
        return result
    return type(result)(result.message, replayed=True)


async def _holds(
    connection: asyncpg.Connection, hold_ids: Sequence[int] | set[int], now: datetime
) -> dict[int, Hold]:
    rows = await connection.fetch(
        """
        select h.id, h.source_wallet_id, h.target_wallet_id, w.unit, h.amount,
               h.hold_expires_at, h.created_at, r.id as resolved_by, r.kind as resolved_kind,
               r.amount as resolved_amount
        from transfers h
        join wallets w on w.id = h.source_wallet_id
        left join transfers r on r.hold_id = h.id
        where h.id = any($1::bigint[]) and h.kind = $2
        """,
        list(hold_ids),
        TransferKind.hold,
    )
    holds = {}
    for row in rows:
        if row["resolved_kind"] is not None:
            status = hold_status_resolved_by[TransferKind(row["resolved_kind"])]
        elif row["hold_expires_at"] <= now:
            status = HoldStatus.expired
        else:
            status = HoldStatus.pending
        holds[row["id"]] = Hold(
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
    return holds


def _expiry(hold_id: int) -> ExpireHold:
    return ExpireHold(
        hold_id=hold_id, idempotency_key=f"hold-expiry:{hold_id}", caller=system_caller
    )


def _key_reused(key: str) -> errors.IdempotencyKeyReused:
    return errors.IdempotencyKeyReused(
        f"idempotency key {key!r} was used for another request; use a new key"
    )


# Enum members by value: faster than calling the enum, row after row.
_owner_kinds = {member.value: member for member in OwnerKind}
_wallet_statuses = {member.value: member for member in WalletStatus}
_transfer_kinds = {member.value: member for member in TransferKind}

# Rows --------------------------------------------------------------------------------------------

# A hold past its expiry holds nothing, even before it is released in the journal.
_wallet_columns = """
    id, owner_id, owner_kind, unit, status, balance_minimum, posted, metadata, created_at,
    pending - case when pending = 0 then 0 else coalesce(
        (select sum(h.amount) from pending_holds h
         where h.source_wallet_id = wallets.id and h.expires_at <= now()), 0) end::bigint
    as pending
"""

# Where keys are stored: on the first transfer of a successful operation, or as a refusal.
_select_stored_keys = """
    select t.caller, t.idempotency_key, t.request_hash, t.operation_id,
           null as reason, null as message
    from transfers t
    join unnest($1::text[], $2::text[]) as k (caller, key)
      on t.caller = k.caller and t.idempotency_key = k.key
    union all
    select r.caller, r.idempotency_key, r.request_hash, null, r.reason, r.message
    from refusals r
    join unnest($1::text[], $2::text[]) as k (caller, key)
      on r.caller = k.caller and r.idempotency_key = k.key
"""

_select_transfers = """
    select t.id, t.operation_id, t.kind, t.source_wallet_id, t.target_wallet_id, w.unit,
           t.amount, t.amount_requested, t.note, t.reference, t.performed_by, t.metadata,
           t.created_at, t.voids_transfer_id, t.hold_id, t.hold_expires_at,
           v.id as voided_by
    from transfers t
    join wallets w on w.id = t.source_wallet_id
    left join transfers v on v.voids_transfer_id = t.id
"""

_transfer_columns = (
    "id",
    "operation_id",
    "kind",
    "source_wallet_id",
    "target_wallet_id",
    "amount",
    "amount_requested",
    "caller",
    "idempotency_key",
    "request_hash",
    "note",
    "reference",
    "performed_by",
    "metadata",
    "voids_transfer_id",
    "hold_id",
    "hold_expires_at",
    "created_at",
)


def _unit(row: asyncpg.Record) -> Unit:
    return Unit(
        code=row["code"],
        kind=UnitKind(row["kind"]),
        name=row["name"],
        plural=row["plural"],
        description=row["description"],
        scale=row["scale"],
        created_at=row["created_at"],
    )


def _wallet(row: asyncpg.Record) -> Wallet:
    return Wallet(
        id=row["id"],
        owner_id=row["owner_id"],
        owner_kind=_owner_kinds[row["owner_kind"]],
        unit=row["unit"],
        status=_wallet_statuses[row["status"]],
        balance_minimum=row["balance_minimum"],
        balance=Balance(posted=row["posted"], pending=row["pending"]),
        metadata=row["metadata"] or {},
        created_at=row["created_at"],
    )


def _transfer(row: asyncpg.Record) -> Transfer:
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
