"""Connections to PostgreSQL: the pool, how each connection is set up, and the one boundary
every connection is used through.

Every connection is used through `Guarded`: what asyncpg raises when the database is gone or
does not answer in time (a lost or refused connection, a server shutting down or restarting,
a statement, lock, command or acquire timeout) becomes errors.Unavailable, which the same
request with the same idempotency key may retry; anything else is a bug and passes unchanged.
A stalled database fails calls within about `statement_timeout_s`: the server cancels
statements past it, and the client gives up on a server that answers nothing (a paused or
unreachable one) shortly after.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import asyncpg

from .. import errors
from . import sql

__all__ = [
    "Guarded",
    "command_timeout_margin_s",
    "create_pool",
    "lock_timeout_s_default",
    "ping",
    "pool_size_max",
    "statement_timeout_s_default",
    "timeout_s_max",
    "timeout_s_min",
]

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
    async with Guarded(pool.acquire(timeout=timeout_s)) as connection:
        await connection.fetchval(sql.select_one, timeout=timeout_s)


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
    return b"\x01" + _json_encoder.encode(value).encode()


# One encoder for every value (json.dumps with separators of its own makes one a call). The
# values are built by the ledger, never circular.
_json_encoder = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def _decode_jsonb(data: bytes) -> Any:
    assert data[:1] == b"\x01", data[:1]
    return json.loads(data[1:])


class Guarded:
    """Acquires a connection (and with `transaction`, begins a transaction on it), and ends
    them: the one place where asyncpg's errors that mean the database is gone or did not
    answer in time become errors.Unavailable. The connection such an error met is closed,
    whatever state it is in, rather than rolled back (which would wait for an answer that may
    not come; the server rolls back a transaction whose connection closed) or given back to
    the pool, which opens a fresh one when it next needs one. Other errors pass unchanged.
    `acquiring` is what `Pool.acquire` returns."""

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
            except BaseException as error:
                if not isinstance(error, Exception):
                    # Cancelled while it began (a task stopped): the connection, in a state
                    # nobody knows, is closed, and so goes back to the pool.
                    self._connection.terminate()
                await self.__aexit__(type(error), error, error.__traceback__)
                raise
            self._transaction = transaction
        connection: asyncpg.Connection = self._connection
        return connection

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
            except BaseException:
                # Cancelled while the transaction ended (a task stopped during its commit):
                # whether it committed is the database's to say; the connection, in a state
                # nobody knows, is closed, and so goes back to the pool.
                self._connection.terminate()
                await self._acquiring.__aexit__(*exc_info)
                raise
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
