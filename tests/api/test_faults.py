"""Faults: the database lost, stalled or restarted, and the server killed.

The ledger's boundary first, on the shared test cluster: a lost connection is UNAVAILABLE
(retryable), and the pool recovers; an error that is not about the connection stays what it
is (a bug); statement and lock timeouts fail calls fast; queries cannot take the connections
writes need.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import asyncpg
import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coffer.clients.caller import caller_metadata_key
from coffer.core import errors
from coffer.core.ledger import Ledger
from coffer.core.model import Credit, NewWallet, OwnerKind, Unit, UnitKind
from coffer.core.store.connections import command_timeout_margin_s, create_pool
from coffer.postgres.supervisor import LEDGER_ROLE, EmbeddedPostgres, supervise
from coffer.server.app import Server, Settings
from coffer.v1 import (
    holds_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    types_pb2,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)

from support.books import assert_books_balance
from support.normalized import normalized_reply, normalized_result
from support.replay import operation_kinds, rpc_of
from support.workload import Wallets, random_operation


@pytest_asyncio.fixture(loop_scope="session")
async def administration(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection of the test's own, beside the ledger's."""
    connection = await asyncpg.connect(database_url)
    try:
        yield connection
    finally:
        await connection.close()


async def new_wallet(ledger: Ledger) -> int:
    await ledger.create_unit(Unit(code="EUR", kind=UnitKind.currency, name="Euro", scale=2))
    created, _ = await ledger.create_wallet(
        NewWallet(idempotency_key="w", owner_id="o", owner_kind=OwnerKind.customer, unit="EUR")
    )
    return created.id


async def blocked_backend(administration: asyncpg.Connection) -> int:
    """The pid of the ledger's backend that waits for the lock the test holds."""
    async with asyncio.timeout(10):
        while True:
            pid = await administration.fetchval(
                "select pid from pg_stat_activity where wait_event_type = 'Lock'"
            )
            if pid is not None:
                return int(pid)
            await asyncio.sleep(0.02)


async def test_a_lost_connection_is_unavailable_and_the_pool_recovers(
    database_url: str, administration: asyncpg.Connection
) -> None:
    pool = await create_pool(database_url, size_max=1)
    try:
        ledger = Ledger(pool)
        wallet_id = await new_wallet(ledger)
        async with administration.transaction():
            await administration.execute("lock table wallets in access exclusive mode")
            reading = asyncio.create_task(ledger.get_wallet(wallet_id))
            pid = await blocked_backend(administration)
            await administration.execute("select pg_terminate_backend($1)", pid)
            with pytest.raises(errors.Unavailable) as raised:
                await reading
        assert raised.value.retryable
        assert (await ledger.get_wallet(wallet_id)).id == wallet_id
    finally:
        await pool.close()


async def test_other_database_errors_are_not_unavailable(database_url: str) -> None:
    pool = await create_pool(database_url, size_max=1)
    try:
        # A value the driver cannot encode is a bug of the caller, not an outage.
        with pytest.raises(asyncpg.DataError):
            await Ledger(pool).get_wallet(2**63)
    finally:
        await pool.close()


async def test_a_lost_connection_left_unawaited_by_asyncpg_is_no_error(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    """asyncpg may leave a lost connection's error on a future nobody awaits (a query being
    cancelled when the database restarts): with a server running, asyncio's report of it is
    logged at INFO, without a traceback; any other unawaited error stays an ERROR."""
    loop = asyncio.get_running_loop()

    def unawaited(error: BaseException) -> dict[str, Any]:
        future = loop.create_future()
        future.set_exception(error)
        future.exception()  # retrieved here, so that collecting it later logs nothing
        return {
            "message": "Future exception was never retrieved",
            "exception": error,
            "future": future,
        }

    with caplog.at_level(logging.INFO):
        loop.call_exception_handler(unawaited(asyncpg.ConnectionDoesNotExistError("mid-query")))
        loop.call_exception_handler(unawaited(RuntimeError("a bug")))
    lost = [r for r in caplog.records if "mid-query" in r.getMessage()]
    assert [(r.levelno, r.exc_info) for r in lost] == [(logging.INFO, None)]
    [other] = [r for r in caplog.records if r.exc_info]
    assert other.levelno == logging.ERROR
    assert "a bug" in str(other.exc_info[1])


@pytest.mark.parametrize(
    ("statement_timeout_s", "lock_timeout_s"), [(30.0, 0.3), (0.3, 30.0)], ids=["lock", "statement"]
)
async def test_a_call_waiting_past_a_timeout_is_unavailable(
    database_url: str,
    administration: asyncpg.Connection,
    statement_timeout_s: float,
    lock_timeout_s: float,
) -> None:
    pool = await create_pool(
        database_url,
        size_max=1,
        statement_timeout_s=statement_timeout_s,
        lock_timeout_s=lock_timeout_s,
    )
    try:
        ledger = Ledger(pool)
        wallet_id = await new_wallet(ledger)
        async with administration.transaction():
            await administration.execute("lock table wallets in access exclusive mode")
            started = time.monotonic()
            with pytest.raises(errors.Unavailable, match="in time"):
                await ledger.get_wallet(wallet_id)
            waited_s = time.monotonic() - started
        assert 0.3 <= waited_s < 5
        # The connection is usable again (or replaced).
        assert (await ledger.get_wallet(wallet_id)).id == wallet_id
    finally:
        await pool.close()


async def test_queries_cannot_take_the_connections_of_writes(database_url: str) -> None:
    pool = await create_pool(database_url, size_max=2)
    read_pool = await create_pool(database_url, size_max=1)
    try:
        ledger = Ledger(pool, read_pool=read_pool, acquire_timeout_s=0.5)
        wallet_id = await new_wallet(ledger)
        # Every connection for queries is busy (as with long history scans).
        async with read_pool.acquire():
            [applied] = await ledger.apply(
                [Credit(idempotency_key="c", wallet_id=wallet_id, amount=100)]
            )
            assert not isinstance(applied, errors.CofferError), applied
            # A query waits for a connection at most the acquire timeout.
            with pytest.raises(errors.Unavailable, match="in time"):
                await ledger.get_wallet(wallet_id)
        assert (await ledger.get_wallet(wallet_id)).balance.posted == 100
    finally:
        await ledger.close()


# Faults under load -------------------------------------------------------------------------------
#
# Each against a cluster of this module's own (durable, so that a killed postmaster loses
# nothing it acknowledged) and a real server: a few clients send random operations of every
# kind of the batch API's `Operation` oneof (credits, both debit modes, transfers, deposits,
# withdrawals, payments, voids, holds, captures, releases), some of them as SubmitBatch calls
# with linked chains, each operation with its own idempotency key, each call sent once. Some
# wallets hold little, and voids, captures and releases meet transfers and holds already
# resolved, so some operations are refused. The fault strikes; the load goes on until calls
# have succeeded again for a while. Then the journal must hold every acknowledged success
# exactly once as a transfer and every acknowledged refusal as a refusal, no key as both; and
# every call sent again with its keys must be answered: the acknowledged operations with their
# first answer, marked a replay, the others twice alike; after which every key is stored once
# and the books balance.
#
# Each prints one line of figures: acknowledged operations (and how many of them refusals),
# lost (acknowledged but not in the journal as answered) and doubled (a key stored twice, or
# as both a transfer and a refusal), INTERNAL answers, failed calls (all UNAVAILABLE),
# recovery (seconds from the fault, or from SIGCONT for a pause, until calls stopped failing),
# how long health was not SERVING, the slowest single call and the slowest batch call from the
# fault on, and how many calls were sent again.

caller = "fault-load"
metadata = ((caller_metadata_key, caller),)
clients_count = 4
# Rich customers never run short; poor ones do, so debits, transfers, payments and holds from
# them are sometimes refused. Merchants are paid.
rich_count = 3
poor_count = 2
merchants_count = 1
balance_opening_rich = 10**12
balance_opening_poor = 300
amount_max = 100
# Calls that are a SubmitBatch of a few operations, and how likely one of them (but the last)
# is linked to the next.
batch_share = 0.2
batch_operations_max = 5
linked_share = 0.4
call_timeout_s = 15.0
failure_pause_s = 0.05
client_pause_s = 0.002
load_before_fault_s = 1.0
# Recovered: calls have succeeded, and none failed, for this long.
calm_s = 1.0
recovery_s_max = 60.0
health_poll_s = 0.05
resend_concurrency = 16
resend_attempts_max = 20
pause_s = 4.0
# (c): a short statement timeout, and the bound on any call while the database is paused.
paused_statement_timeout_s = 1.0
paused_call_s_max = 3 * paused_statement_timeout_s + 0.5

# Clients come back as soon as a server listens again.
channel_options = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
coffer = str(Path(sys.executable).parent / "coffer")

_databases = itertools.count(1)
_codes = {code.value[0]: code for code in grpc.StatusCode}
refusal_reasons = {reason for reason, kind in errors.reasons().items() if kind.refusal}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class Answer:
    """One operation's answer: ("OK", normalized reply) or (code name, reason, message);
    whether it says it is a replay; and the transfer (or, for a hold placed, the hold) it
    made."""

    outcome: tuple[str, ...]
    replayed: bool
    made: int | None = None


@dataclass
class Attempt:
    """One call: a single operation, or a batch of them."""

    service: str
    method: str
    request: Any
    # Each operation's kind and key, in order.
    operations: list[tuple[str, str]]
    # The call's failure (UNAVAILABLE, say), or None when it was answered.
    failure: grpc.StatusCode | None
    answers: list[Answer]
    started_s: float
    finished_s: float


@dataclass
class Figures:
    acknowledged: int = 0
    refused: int = 0
    failed: int = 0
    lost: int = 0
    doubled: int = 0
    internal: int = 0
    recovery_s: float = 0.0
    not_serving_s: float = 0.0
    # The slowest single call, and the slowest batch call, from the fault on.
    call_s_max: float = 0.0
    batch_call_s_max: float = 0.0
    resent: int = 0

    def line(self, fault: str) -> str:
        return (
            f"fault {fault}: acknowledged {self.acknowledged} (refused {self.refused}), "
            f"lost {self.lost}, doubled {self.doubled}, INTERNAL {self.internal}, failed "
            f"(UNAVAILABLE) {self.failed}, recovery {self.recovery_s:.1f} s, health not "
            f"SERVING {self.not_serving_s:.1f} s, slowest call {self.call_s_max:.1f} s "
            f"(batch call {self.batch_call_s_max:.1f} s), "
            f"resent {self.resent} calls: all converged"
        )


@pytest.fixture(scope="module")
def fault_cluster() -> Iterator[EmbeddedPostgres]:
    directory = Path(tempfile.mkdtemp(prefix="coffer-faults-"))
    # As root the cluster runs as a system user, which must get through this directory.
    directory.chmod(0o711)
    try:
        with EmbeddedPostgres(directory / "postgres", durable=True) as cluster:
            yield cluster
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest_asyncio.fixture(loop_scope="session")
async def fault_database(fault_cluster: EmbeddedPostgres) -> str:
    """A fresh database of the fault cluster, owned by the ledger's role; its name."""
    name = f"faults_{next(_databases)}"
    administration = await asyncpg.connect(fault_cluster.dsn)
    try:
        await administration.execute(f'create database "{name}" owner "{LEDGER_ROLE}"')
    finally:
        await administration.close()
    return name


def postgres_processes(cluster: EmbeddedPostgres) -> list[int]:
    """The postmaster and its children."""
    postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    children = []
    for entry in os.scandir("/proc"):
        with contextlib.suppress(OSError, IndexError):
            if entry.name.isdigit():
                status = Path(f"/proc/{entry.name}/stat").read_text()
                if status.rsplit(")", 1)[1].split()[1] == str(postmaster):
                    children.append(int(entry.name))
    return [postmaster, *children]


def _refusal_reason(error: grpc.aio.AioRpcError) -> str | None:
    """The reason of an error that is the ledger's answer (a refusal), else None."""
    for name, value in error.trailing_metadata() or ():
        if name == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    kind = errors.reasons().get(info.reason)
                    return info.reason if kind is not None and kind.refusal else None
    return None


def _replayed(trailing: Any) -> bool:
    return any(name == "coffer-replayed" and value == "true" for name, value in trailing or ())


class Load:
    """Clients sending calls, each once, until stopped; and a watch on health."""

    def __init__(self, channel: grpc.aio.Channel, wallets: Wallets, fault: str) -> None:
        self.stubs = {
            "TransferService": transfers_pb2_grpc.TransferServiceStub(channel),
            "HoldService": holds_pb2_grpc.HoldServiceStub(channel),
        }
        self.health = health_pb2_grpc.HealthStub(channel)
        self.wallets = wallets
        self.fault = fault
        self.attempts: list[Attempt] = []
        # (time, status name): each change of what health answers.
        self.health_seen: list[tuple[float, str]] = []
        self._stopping = asyncio.Event()
        self._tasks = [asyncio.create_task(self._client(number)) for number in range(clients_count)]
        self._tasks.append(asyncio.create_task(self._watch_health()))

    async def stop(self) -> None:
        self._stopping.set()
        await asyncio.gather(*self._tasks)

    def operation(
        self, random: Random, key: str, transfers: list[int], holds: list[int]
    ) -> tuple[str, Any]:
        return random_operation(
            random,
            key,
            self.wallets,
            transfers=transfers,
            holds=holds,
            amount_max=amount_max,
        )

    def call(
        self, random: Random, key: str, transfers: list[int], holds: list[int]
    ) -> tuple[str, str, Any, list[tuple[str, str]]]:
        """A random call: its service, method, request, and its operations' kinds and keys."""
        if random.random() < batch_share:
            count = random.randint(2, batch_operations_max)
            request = transfers_pb2.SubmitBatchRequest()
            operations = []
            for number in range(count):
                kind, operation = self.operation(random, f"{key}.{number}", transfers, holds)
                request.operations.add(
                    linked=number < count - 1 and random.random() < linked_share,
                    **{kind: operation},
                )
                operations.append((kind, operation.idempotency_key))
            return "TransferService", "SubmitBatch", request, operations
        kind, operation = self.operation(random, key, transfers, holds)
        service, method = rpc_of(kind)
        return service, method, operation, [(kind, key)]

    async def send(
        self, service: str, method: str, request: Any, kinds: list[str]
    ) -> tuple[grpc.StatusCode | None, list[Answer]]:
        """Sends a call; returns its failure (None if answered) and its operations' answers."""
        call = getattr(self.stubs[service], method)(
            request, metadata=metadata, timeout=call_timeout_s
        )
        try:
            reply = await call
        except grpc.aio.AioRpcError as error:
            reason = _refusal_reason(error)
            if reason is None:
                return error.code(), []
            outcome = (error.code().name, reason, error.details() or "")
            return None, [Answer(outcome, _replayed(error.trailing_metadata()))]
        if method != "SubmitBatch":
            [kind] = kinds
            made = reply.hold.id if kind == "place_hold" else reply.transfer.id
            replayed = _replayed(await call.trailing_metadata())
            return None, [Answer(("OK", normalized_reply(reply)), replayed, made)]
        answers = []
        for kind, result in zip(kinds, reply.results, strict=True):
            if result.HasField("error"):
                error = result.error
                outcome = (_codes[error.code].name, error.reason, error.message)
                answers.append(Answer(outcome, result.replayed))
            else:
                made = result.hold.id if kind == "place_hold" else result.transfers[0].id
                outcome = ("OK", normalized_result(kind, result))
                answers.append(Answer(outcome, result.replayed, made))
        return None, answers

    async def resend(self, attempt: Attempt) -> tuple[grpc.StatusCode | None, list[Answer]]:
        kinds = [kind for kind, _ in attempt.operations]
        for _ in range(resend_attempts_max):
            failure, answers = await self.send(
                attempt.service, attempt.method, attempt.request, kinds
            )
            if failure != grpc.StatusCode.UNAVAILABLE:
                break
            await asyncio.sleep(failure_pause_s)
        return failure, answers

    async def _client(self, number: int) -> None:
        random = Random(f"{self.fault}-{number}")
        transfers: list[int] = []
        holds: list[int] = []
        for sequence in itertools.count():
            if self._stopping.is_set():
                return
            service, method, request, operations = self.call(
                random, f"{self.fault}-{number}-{sequence}", transfers, holds
            )
            started_s = time.monotonic()
            failure, answers = await self.send(
                service, method, request, [kind for kind, _ in operations]
            )
            self.attempts.append(
                Attempt(
                    service,
                    method,
                    request,
                    operations,
                    failure,
                    answers,
                    started_s,
                    time.monotonic(),
                )
            )
            for (kind, _), answer in zip(operations, answers, strict=failure is None):
                if answer.made is not None:
                    (holds if kind == "place_hold" else transfers).append(answer.made)
            await asyncio.sleep(client_pause_s if failure is None else failure_pause_s)

    async def _watch_health(self) -> None:
        while not self._stopping.is_set():
            try:
                response = await self.health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.aio.AioRpcError as error:
                status = f"unreachable ({error.code().name})"
            if not self.health_seen or self.health_seen[-1][1] != status:
                self.health_seen.append((time.monotonic(), status))
            await asyncio.sleep(health_poll_s)

    async def recovered(self) -> None:
        """Until calls have succeeded, and none failed, for `calm_s`."""
        async with asyncio.timeout(recovery_s_max):
            while True:
                await asyncio.sleep(0.1)
                now_s = time.monotonic()
                failures = [a.finished_s for a in self.attempts if a.failure is not None]
                calm_since_s = max(failures, default=0.0)
                if now_s - calm_since_s >= calm_s and any(
                    a.failure is None and a.started_s > calm_since_s for a in self.attempts
                ):
                    return

    def not_serving_s(self) -> float:
        """How long health answered anything but SERVING."""
        total_s = 0.0
        for (at_s, status), (until_s, _) in itertools.pairwise(
            [*self.health_seen, (time.monotonic(), "")]
        ):
            if status != "SERVING":
                total_s += until_s - at_s
        return total_s


def opening_keys() -> set[str]:
    return {f"opening-{number}" for number in range(rich_count + poor_count)}


async def set_up(channel: grpc.aio.Channel) -> Wallets:
    await units_pb2_grpc.UnitServiceStub(channel).CreateUnit(
        units_pb2.CreateUnitRequest(code="EUR", kind=types_pb2.UNIT_KIND_CURRENCY, name="Euro"),
        metadata=metadata,
        timeout=call_timeout_s,
    )
    wallets = wallets_pb2_grpc.WalletServiceStub(channel)
    transfers = transfers_pb2_grpc.TransferServiceStub(channel)
    made = Wallets([], [])
    for number in range(rich_count + poor_count + merchants_count):
        customer = number < rich_count + poor_count
        created = await wallets.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key=f"wallet-{number}",
                owner_id=f"owner-{number}",
                owner_kind=types_pb2.OWNER_KIND_CUSTOMER
                if customer
                else types_pb2.OWNER_KIND_MERCHANT,
                unit="EUR",
            ),
            metadata=metadata,
            timeout=call_timeout_s,
        )
        if customer:
            await transfers.Credit(
                transfers_pb2.CreditRequest(
                    idempotency_key=f"opening-{number}",
                    wallet_id=created.wallet.id,
                    amount=balance_opening_rich if number < rich_count else balance_opening_poor,
                ),
                metadata=metadata,
                timeout=call_timeout_s,
            )
        (made.customers if customer else made.merchants).append(created.wallet.id)
    return made


async def stored_keys(journal_dsn: str) -> tuple[dict[str, int], set[str]]:
    """The keys of the load's caller in the journal: on transfers (with how many), and on
    refusals."""
    connection = await asyncpg.connect(journal_dsn)
    try:
        transfers = await connection.fetch(
            """
            select idempotency_key, count(*) from transfers
            where caller = $1 and idempotency_key is not null group by 1
            """,
            caller,
        )
        refusals = await connection.fetch(
            "select idempotency_key from refusals where caller = $1", caller
        )
    finally:
        await connection.close()
    return {row[0]: row[1] for row in transfers}, {row[0] for row in refusals}


def lost_and_doubled(
    answered: dict[str, Answer], transfers: dict[str, int], refusals: set[str]
) -> tuple[int, int]:
    """Of the operations answered (by key), how many the journal does not hold as answered (a
    success as a transfer, a refusal as a refusal); and how many keys it holds twice, or as
    both a transfer and a refusal."""
    lost = sum(
        key not in (transfers if answer.outcome[0] == "OK" else refusals)
        for key, answer in answered.items()
    )
    doubled = sum(count > 1 for count in transfers.values()) + len(refusals & set(transfers))
    return lost, doubled


async def exercise(
    target: str,
    journal_dsn: str,
    fault: str,
    strike: Callable[[], Awaitable[float]],
) -> tuple[Figures, Load]:
    """Runs the load on `target`, lets `strike` inject the fault (it returns the moment the
    recovery is measured from), and checks what was stored and that retries converge."""
    figures = Figures()
    async with grpc.aio.insecure_channel(target, options=channel_options) as channel:
        wallets = await set_up(channel)
        load = Load(channel, wallets, fault)
        try:
            await asyncio.sleep(load_before_fault_s)
            struck_s = time.monotonic()
            recovering_s = await strike()
            await load.recovered()
        finally:
            await load.stop()
        attempts = load.attempts
        failures = [a for a in attempts if a.failure is not None]
        first: dict[str, Answer] = {
            key: answer
            for a in attempts
            if a.failure is None
            for (_, key), answer in zip(a.operations, a.answers, strict=True)
        }
        figures.acknowledged = len(first)
        figures.refused = sum(answer.outcome[0] != "OK" for answer in first.values())
        figures.failed = len(failures)
        figures.internal = sum(
            a.failure in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) for a in attempts
        )
        figures.recovery_s = max(
            [a.finished_s - recovering_s for a in failures if a.finished_s > recovering_s],
            default=0.0,
        )
        since_fault = [a for a in attempts if a.finished_s >= struck_s]
        figures.call_s_max = max(
            a.finished_s - a.started_s for a in since_fault if a.method != "SubmitBatch"
        )
        figures.batch_call_s_max = max(
            (a.finished_s - a.started_s for a in since_fault if a.method == "SubmitBatch"),
            default=0.0,
        )
        figures.not_serving_s = load.not_serving_s()
        assert {a.failure for a in failures} <= {grpc.StatusCode.UNAVAILABLE}, Counter(
            a.failure for a in failures
        )
        # Every kind was sent, some in batches, and some were refused.
        assert {kind for a in attempts for kind, _ in a.operations} == set(operation_kinds)
        assert any(a.method == "SubmitBatch" and a.failure is None for a in attempts)
        assert figures.refused > 0, figures
        assert not any(answer.replayed for answer in first.values())

        keys = {key for a in attempts for _, key in a.operations}
        transfers, refusals = await stored_keys(journal_dsn)
        assert set(transfers) | refusals <= keys | opening_keys()
        figures.lost, figures.doubled = lost_and_doubled(first, transfers, refusals)

        # Every call sent again with its keys: all answered, the acknowledged operations with
        # their first answer, marked a replay.
        semaphore = asyncio.Semaphore(resend_concurrency)

        async def resend(attempt: Attempt) -> tuple[grpc.StatusCode | None, list[Answer]]:
            async with semaphore:
                return await load.resend(attempt)

        resent = await asyncio.gather(*(resend(attempt) for attempt in attempts))
        figures.resent = len(resent)
        figures.internal += sum(
            failure in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN) for failure, _ in resent
        )
        assert Counter(failure for failure, _ in resent) == {None: len(attempts)}
        last: dict[str, Answer] = {}
        changed = []
        for attempt, (_, answers) in zip(attempts, resent, strict=True):
            for (_, key), answer in zip(attempt.operations, answers, strict=True):
                last[key] = answer
                if key in first and (answer.outcome != first[key].outcome or not answer.replayed):
                    changed.append((key, first[key], answer))
        assert changed == []
        # The calls that failed, sent once more: the same answers, replayed.
        again = await asyncio.gather(*(resend(attempt) for attempt in failures))
        figures.resent += len(again)
        for attempt, (failure, answers) in zip(failures, again, strict=True):
            assert failure is None, failure
            for (_, key), answer in zip(attempt.operations, answers, strict=True):
                assert answer.replayed and answer.outcome == last[key].outcome, (key, answer)
    assert {
        answer.outcome[1] for answer in last.values() if answer.outcome[0] != "OK"
    } <= refusal_reasons, Counter(answer.outcome[:2] for answer in last.values())

    transfers, refusals = await stored_keys(journal_dsn)
    lost, doubled = lost_and_doubled(last, transfers, refusals)
    assert lost == 0
    assert set(transfers) | refusals == keys | opening_keys()
    figures.doubled += doubled
    await assert_books_balance(journal_dsn)
    return figures, load


def report(capsys: pytest.CaptureFixture[str], fault: str, figures: Figures) -> None:
    with capsys.disabled():
        print(f"\n{figures.line(fault)}")
    assert (figures.lost, figures.doubled, figures.internal) == (0, 0, 0), figures
    assert figures.acknowledged > 0 and figures.failed > 0, figures


def settings(database_url: str, **overrides: Any) -> Settings:
    return Settings(
        database_url=database_url,
        listen="127.0.0.1:0",
        health_check_interval_s=0.5,
        **overrides,
    )


def assert_outage_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    messages = [record.getMessage() for record in caplog.records]
    started = [m for m in messages if m.startswith("the database does not answer")]
    ended = [m for m in messages if m.startswith("the database answers again")]
    sweep = [m for m in messages if m.startswith("the hold expiry sweep")]
    assert len(started) == len(ended) == 1, messages
    assert len(sweep) <= 2, sweep
    assert not [r for r in caplog.records if r.exc_info], messages


async def test_postgres_restarted_under_load(
    fault_cluster: EmbeddedPostgres,
    fault_database: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="coffer")
    server = await Server.start(settings(fault_cluster.dsn_for(fault_database, role=LEDGER_ROLE)))
    try:

        async def strike() -> float:
            struck_s = time.monotonic()
            await asyncio.to_thread(fault_cluster.restart)
            return struck_s

        figures, load = await exercise(
            f"127.0.0.1:{server.port}", fault_cluster.dsn_for(fault_database), "restart", strike
        )
    finally:
        await server.stop()
    report(capsys, "(a) PostgreSQL restarted", figures)
    assert "NOT_SERVING" in {status for _, status in load.health_seen}, load.health_seen
    assert load.health_seen[-1][1] == "SERVING", load.health_seen
    assert_outage_logged_once(caplog)


async def test_postgres_killed_under_load(
    fault_cluster: EmbeddedPostgres,
    fault_database: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="coffer")
    server = await Server.start(settings(fault_cluster.dsn_for(fault_database, role=LEDGER_ROLE)))
    # As `coffer serve` does with its embedded PostgreSQL: start it again when it dies.
    supervisor = asyncio.create_task(supervise(fault_cluster))
    try:

        async def strike() -> float:
            struck_s = time.monotonic()
            os.kill(postgres_processes(fault_cluster)[0], signal.SIGKILL)
            return struck_s

        figures, load = await exercise(
            f"127.0.0.1:{server.port}", fault_cluster.dsn_for(fault_database), "kill", strike
        )
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await server.stop()
    report(capsys, "(b) PostgreSQL killed (kill -9), started again", figures)
    assert "NOT_SERVING" in {status for _, status in load.health_seen}, load.health_seen
    assert load.health_seen[-1][1] == "SERVING", load.health_seen
    assert_outage_logged_once(caplog)
    messages = [record.getMessage() for record in caplog.records]
    assert sum("died; starting it again" in message for message in messages) == 1, messages


async def test_postgres_paused_under_load(
    fault_cluster: EmbeddedPostgres,
    fault_database: str,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="coffer")
    server = await Server.start(
        settings(
            fault_cluster.dsn_for(fault_database, role=LEDGER_ROLE),
            statement_timeout_s=paused_statement_timeout_s,
            lock_timeout_s=paused_statement_timeout_s,
        )
    )
    try:

        async def strike() -> float:
            processes = postgres_processes(fault_cluster)
            for pid in processes:
                os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(pause_s)
            finally:
                for pid in processes:
                    os.kill(pid, signal.SIGCONT)
            return time.monotonic()

        figures, load = await exercise(
            f"127.0.0.1:{server.port}", fault_cluster.dsn_for(fault_database), "pause", strike
        )
    finally:
        await server.stop()
    report(capsys, f"(c) PostgreSQL paused (SIGSTOP) for {pause_s:g} s", figures)
    # Single calls failed within about the timeout, not after the pause. (Batch calls can
    # take a timeout longer: test_calls_fail_within_their_bounds_while_paused.)
    assert figures.call_s_max <= paused_call_s_max, figures
    assert "NOT_SERVING" in {status for _, status in load.health_seen}, load.health_seen
    assert load.health_seen[-1][1] == "SERVING", load.health_seen
    assert_outage_logged_once(caplog)


# While the database is paused, each batch the server applies fails after one timeout
# (statement_timeout_s, and command_timeout_margin_s more for a connection that was open). A
# single call waits at most for the batch of single calls being applied ahead of it, then for
# its own: two timeouts. A batch call waits for the batch call ahead of it, then, as single
# calls go first, for at most one batch of single calls started before its turn came, then
# for its own: three.
stalled_statement_timeout_s = 2.0
stalled_timeout_s = stalled_statement_timeout_s + command_timeout_margin_s
stalled_call_s_max = {
    "Credit": 2 * stalled_timeout_s + 0.3,
    "SubmitBatch": 3 * stalled_timeout_s + 0.3,
}


async def test_calls_fail_within_their_bounds_while_paused(
    fault_cluster: EmbeddedPostgres, fault_database: str
) -> None:
    """The database paused; a batch call, then a single call, then the batch call under test,
    then another single call, 0.1 s apart: each fails (UNAVAILABLE) within its bound: two
    timeouts for a single call, three for a batch call."""
    server = await Server.start(
        settings(
            fault_cluster.dsn_for(fault_database, role=LEDGER_ROLE),
            statement_timeout_s=stalled_statement_timeout_s,
            lock_timeout_s=stalled_statement_timeout_s,
        )
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            wallet_id = (await set_up(channel)).customers[0]
            stub = transfers_pb2_grpc.TransferServiceStub(channel)
            keys = itertools.count()

            def credit() -> transfers_pb2.CreditRequest:
                return transfers_pb2.CreditRequest(
                    idempotency_key=f"stalled-{next(keys)}", wallet_id=wallet_id, amount=1
                )

            def batch() -> transfers_pb2.SubmitBatchRequest:
                return transfers_pb2.SubmitBatchRequest(
                    operations=[transfers_pb2.Operation(credit=credit()) for _ in range(2)]
                )

            async def timed(method: str, request: Any) -> tuple[str, str, float]:
                started_s = time.monotonic()
                try:
                    await getattr(stub, method)(request, metadata=metadata, timeout=call_timeout_s)
                    code = "OK"
                except grpc.aio.AioRpcError as error:
                    code = error.code().name
                return method, code, time.monotonic() - started_s

            processes = postgres_processes(fault_cluster)
            for pid in processes:
                os.kill(pid, signal.SIGSTOP)
            try:
                calls = []
                for method, request in [
                    ("SubmitBatch", batch()),
                    ("Credit", credit()),
                    ("SubmitBatch", batch()),
                    ("Credit", credit()),
                ]:
                    calls.append(asyncio.create_task(timed(method, request)))
                    await asyncio.sleep(0.1)
                # Paused until every call has returned, or long enough to tell.
                await asyncio.wait(calls, timeout=2 * max(stalled_call_s_max.values()))
            finally:
                for pid in processes:
                    os.kill(pid, signal.SIGCONT)
            answers = [await call for call in calls]
    finally:
        await server.stop()
    assert [code for _, code, _ in answers] == ["UNAVAILABLE"] * 4, answers
    assert all(call_s <= stalled_call_s_max[method] for method, _, call_s in answers), answers


class ServeProcess:
    """`coffer serve` as a process, its output drained as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._draining = asyncio.create_task(self._drain())

    @classmethod
    async def start(cls, target: str, database_url: str) -> ServeProcess:
        process = await asyncio.create_subprocess_exec(
            coffer,
            "serve",
            "--listen",
            target,
            # One process, killed whole (a supervisor killed leaves its workers draining).
            "--workers",
            "1",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "DATABASE_URL": database_url},
        )
        serving = cls(process)
        async with asyncio.timeout(60):
            while not any("serving on" in line for line in serving.lines):
                assert not serving._draining.done(), "".join(serving.lines)
                await asyncio.sleep(0.05)
        return serving

    async def _drain(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line.decode())

    async def kill(self) -> None:
        self.process.kill()
        await self.process.wait()
        await self._draining

    async def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            assert await self.process.wait() == 0, "".join(self.lines)
            await self._draining


async def test_server_killed_under_load(
    fault_cluster: EmbeddedPostgres, fault_database: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{free_port()}"
    database_url = fault_cluster.dsn_for(fault_database, role=LEDGER_ROLE)
    servers = [await ServeProcess.start(target, database_url)]
    try:

        async def strike() -> float:
            struck_s = time.monotonic()
            await servers[0].kill()
            servers.append(await ServeProcess.start(target, database_url))
            return struck_s

        figures, load = await exercise(
            target, fault_cluster.dsn_for(fault_database), "server-kill", strike
        )
    finally:
        for server in servers:
            if server.process.returncode is None:
                await server.stop()
    report(capsys, "(d) server killed (kill -9), a new one started", figures)
    assert load.health_seen[-1][1] == "SERVING", load.health_seen
