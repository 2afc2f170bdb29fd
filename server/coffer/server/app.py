"""The server: the gRPC services over one Ledger, its batcher and its hold-expiry sweep.

    server = await Server.start(Settings(database_url=dsn, listen="127.0.0.1:0"))
    print(server.port)
    await server.stop()

With `tls_cert` and `tls_key` set, the server speaks TLS only (and asks for client
certificates from `tls_client_ca`: mTLS); `tls.reload()` reads the files again for the
connections that follow (`coffer serve` calls it on SIGHUP). Without them, plaintext.

Every call is authenticated, rate-limited and checked against the role matrix by the `gate`
before its handler runs (server/gate.py): on a loopback address with no credential made yet
the server is open (every call the local administrator's), elsewhere never.

`start` migrates the database first. `stop` shuts down in order: end the event streams (their
watchers get UNAVAILABLE, and resume from their last cursor elsewhere or later), stop taking
calls and let those in flight finish (within the grace period), apply what the batcher holds,
stop the sweeps and the health check, close the connection pools.

With events on (`settings.events`), a listener wakes the event streams' watchers
(`coffer.core.store.listener`), and a sweep deletes every `events_retention_interval_s` the
records older than `events_retention_days`.

Every `expiration_interval_s` (at start, then on; 0: never) an expiration run moves what is
left of the grants past their expiry to their units' expired-credits wallets, then the stream
is told of the grants that expire within `expiry_notice_days` (0: none). Runs are safe at once
from several servers. With `background_jobs` off, a server runs none of these (the hold-expiry
sweep, the deletion of old events, the expiration runs): another server does.

Health tells the truth: every `health_check_interval_s`, and at once when its connection
closes, a connection of its own asks the database `select 1`; while it gets no answer within
`health_check_timeout_s`, every service (and "") is NOT_SERVING, and SERVING again once it
does. An outage is logged when it starts
and when it ends; the hold-expiry sweep, failing meanwhile, says so once. Its answers to Check
also say which of a supervisor's workers answered (`coffer.clients.workers`), so that a client
can spread its connections over them.

With `metrics_listen` set, the server serves its Prometheus metrics over HTTP there
(`metrics_port` is the port bound), from a registry of its own (`coffer.server.metrics`),
until it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from coffer.clients.workers import Worker, worker_metadata_key
from coffer.core import errors
from coffer.core.access import Access
from coffer.core.ledger import Ledger
from coffer.core.migrate import migrate
from coffer.core.store.connections import create_pool, ping
from coffer.core.store.listener import Listener
from coffer.v1 import (
    access_pb2,
    events_pb2,
    grants_pb2,
    holds_pb2,
    reports_pb2,
    transfers_pb2,
    units_pb2,
    wallets_pb2,
)

from . import admission, reflection, services
from .batcher import Batcher
from .gate import Gate, RateLimits
from .metrics import Metrics
from .settings import Settings, calls_max_limit
from .tls import ServerTls

__all__ = [
    "Server",
    "Settings",
    "access_pool_size",
    "cluster_connections_max",
    "database_connections_max",
    "database_connections_spare",
    "migrate_database",
    "services_described",
]

logger = logging.getLogger(__name__)

# Connections of the pool that looks credentials up: its own, so that reads (event watchers
# above all) never keep calls waiting to be let in. A lookup is one short query, made once per
# credential per cache time.
access_pool_size = 2
# The health check's pool, and the listener of the event stream (with events on).
probe_pool_size = 1
listener_connections = 1
# A database takes the servers' connections and as many again as this, for the commands beside
# them (migrations, `coffer keys`, an operator's psql).
database_connections_spare = 20
# The largest answer: a page of transfers, or a batch's results, with their metadata.
response_bytes_max = 64 * 1024 * 1024
# gRPC's own limits on calls are multiples of Coffer's `calls_max`, so that Coffer refuses
# first, with OVERLOADED and a retry-after hint; gRPC's refusals carry no ErrorInfo. Calls the
# server runs at once (past them, RESOURCE_EXHAUSTED), and calls arrived but not yet taken by
# the event loop before gRPC starts refusing some of them (CANCELLED):
grpc_calls_factor = 2
# Calls at once on one connection (past them, callers wait, and calls racing in as others
# end are refused with UNAVAILABLE), and calls not yet taken before gRPC refuses them all:
grpc_streams_factor = 4
# gRPC takes them as 32-bit integers.
assert grpc_streams_factor * calls_max_limit < 2**31

services_described = (
    units_pb2.DESCRIPTOR.services_by_name["UnitService"],
    wallets_pb2.DESCRIPTOR.services_by_name["WalletService"],
    transfers_pb2.DESCRIPTOR.services_by_name["TransferService"],
    holds_pb2.DESCRIPTOR.services_by_name["HoldService"],
    access_pb2.DESCRIPTOR.services_by_name["AccessService"],
    events_pb2.DESCRIPTOR.services_by_name["EventService"],
    grants_pb2.DESCRIPTOR.services_by_name["GrantService"],
    reports_pb2.DESCRIPTOR.services_by_name["ReportService"],
)
_service_names = tuple(service.full_name for service in services_described)


def database_connections_max(settings: Settings) -> int:
    """The most connections to the database a server with these settings holds at once: its
    pools (writes, queries, credentials, the health check) and the event stream's listener.
    (At start it also opens one, alone, for the migrations.)"""
    return (
        settings.pool_size
        + settings.pool_size_read
        + access_pool_size
        + probe_pool_size
        + (listener_connections if settings.events else 0)
    )


def cluster_connections_max(settings: Settings) -> int:
    """The connections a database must take for `coffer serve` with these settings (the
    embedded PostgreSQL's max_connections): every worker's, and database_connections_spare
    more."""
    return settings.workers * database_connections_max(settings) + database_connections_spare


class _UnawaitedConnectionLoss(logging.Filter):
    """Logs at INFO, without a traceback, a lost database connection's error that asyncpg left
    on a future nobody awaits.

    When a connection is lost while a query on it is being cancelled (a timeout, or a caller
    gone, during a database restart), asyncpg sets the loss on an internal future nobody
    awaits any more, and asyncio logs "Future exception was never retrieved" at ERROR, with a
    traceback. The loss is the one the batch has answered UNAVAILABLE for, and health
    reports: no error of the server. A filter of asyncio's logger, rather than a handler of
    the event loop, so that it is one for the process, however many servers share a loop."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, asyncpg.ConnectionDoesNotExistError) and str(record.msg).startswith(
            "Future exception was never retrieved"
        ):
            record.levelno, record.levelname = logging.INFO, logging.getLevelName(logging.INFO)
            record.msg, record.args = (
                "a lost database connection's error went unawaited: %s",
                (error,),
            )
            record.exc_info, record.exc_text = None, None
        return True


_unawaited_connection_loss = _UnawaitedConnectionLoss()


async def migrate_database(database_url: str, timeout_s: float) -> None:
    """The migrations not applied yet, on a connection of their own, without the pools'
    timeouts: one may take long, and waits for another server's under an advisory lock."""
    connection = await asyncpg.connect(database_url, timeout=timeout_s)
    try:
        applied = await migrate(connection)
    finally:
        await connection.close()
    if applied:
        logger.info("applied migrations %s", applied)


class _Health(health.aio.HealthServicer):
    """The standard health check, whose answers to Check also say which worker answered."""

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self._trailer = ((worker_metadata_key, worker.metadata()),)

    async def Check(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ],
    ) -> health_pb2.HealthCheckResponse:
        context.set_trailing_metadata(self._trailer)
        return await super().Check(request, context)


class Server:
    def __init__(
        self,
        settings: Settings,
        server: grpc.aio.Server,
        port: int,
        ledger: Ledger,
        batcher: Batcher,
        admitting: admission.Admission,
        health_servicer: health.aio.HealthServicer,
        probe_pool: asyncpg.Pool,
        probe_lost: asyncio.Event,
        gate: Gate,
        listener: Listener,
        tls: ServerTls | None = None,
        metrics: Metrics | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.settings = settings
        self.gate = gate
        # None: plaintext.
        self.tls = tls
        self.port = port
        self.ledger = ledger
        self.batcher = batcher
        self.admission = admitting
        self._server = server
        self._health = health_servicer
        self._probe_pool = probe_pool
        # Set when the health check's connection closes: check again at once.
        self._probe_lost = probe_lost
        # Whether the health check reaches the database; as health says.
        self.database_up = True
        # None: no metrics served (no `metrics_listen`).
        self.metrics = metrics
        self.metrics_port = metrics_port
        if metrics is not None:
            self._track(metrics)
        self.listener = listener
        logging.getLogger("asyncio").addFilter(_unawaited_connection_loss)
        self._sweep = asyncio.create_task(self._expire_holds())
        self._retention = asyncio.create_task(self._delete_old_events())
        self._expiration = asyncio.create_task(self._expire_grants())
        self._health_check = asyncio.create_task(self._check_health())
        self._loop_watch = asyncio.create_task(admitting.watch_loop())

    @classmethod
    async def start(cls, settings: Settings) -> Server:
        # One process: `coffer serve` starts the workers of settings.workers > 1, each a Server.
        assert settings.workers == 1, settings.workers
        await migrate_database(settings.database_url, settings.statement_timeout_s)
        pools: list[asyncpg.Pool] = []
        metrics = Metrics() if settings.metrics_listen else None
        try:
            for size in (settings.pool_size, settings.pool_size_read):
                pools.append(
                    await create_pool(
                        settings.database_url,
                        size_max=size,
                        statement_timeout_s=settings.statement_timeout_s,
                        lock_timeout_s=settings.lock_timeout_s,
                    )
                )
            probe_timeout_s = settings.health_check_timeout_s
            probe_lost = asyncio.Event()
            probe_pool = await create_pool(
                settings.database_url,
                size_max=probe_pool_size,
                statement_timeout_s=probe_timeout_s,
                lock_timeout_s=probe_timeout_s,
                on_close=probe_lost.set,
            )
            pools.append(probe_pool)
            access_pool = await create_pool(
                settings.database_url,
                size_max=access_pool_size,
                statement_timeout_s=settings.statement_timeout_s,
                lock_timeout_s=settings.lock_timeout_s,
            )
            pools.append(access_pool)
            ledger = Ledger(
                pools[0],
                read_pool=pools[1],
                acquire_timeout_s=settings.statement_timeout_s,
                keep_events=settings.events,
                watchers_max=settings.events_watchers_max,
            )
            listener = Listener(
                settings.database_url, poll_interval_s=settings.events_poll_interval_s
            )
            batcher = Batcher(
                ledger.apply if metrics is None else metrics.observed_apply(ledger.apply),
                batch_size_max=settings.batch_size_max,
                batch_wait_s=settings.batch_wait_ms / 1000,
                queue_max=settings.queue_max,
                workers=settings.batch_workers,
            )
            admitting = admission.Admission(
                queued_bytes_max=settings.queued_bytes_max,
                calls_max=settings.calls_max,
                retry_after_ms=batcher.retry_after_ms,
                batch_calls_drain_ms=batcher.batch_calls_drain_ms,
            )
            grpc_calls_max = grpc_calls_factor * settings.calls_max
            grpc_streams_max = grpc_streams_factor * settings.calls_max
            server = grpc.aio.server(
                options=[
                    # Larger requests are refused by gRPC before they are read whole.
                    ("grpc.max_receive_message_length", admission.request_bytes_max),
                    ("grpc.max_send_message_length", response_bytes_max),
                    ("grpc.max_concurrent_streams", grpc_streams_max),
                    ("grpc.server.max_pending_requests", grpc_calls_max),
                    ("grpc.server.max_pending_requests_hard_limit", grpc_streams_max),
                    ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
                ],
                maximum_concurrent_rpcs=grpc_calls_max,
            )
            access = Access(
                access_pool,
                acquire_timeout_s=settings.statement_timeout_s,
                keep_events=settings.events,
            )
            gate = Gate(
                access,
                open_allowed=settings.loopback,
                limits=RateLimits(
                    calls_per_s=settings.rate_limit_calls_per_s,
                    calls_burst=settings.rate_limit_burst,
                    failures_per_s=settings.authentication_failures_per_s,
                ),
                cache_ttl_s=settings.credentials_cache_ttl_s,
            )
            servicers = (
                services.UnitService(ledger, gate),
                services.WalletService(ledger, gate),
                services.TransferService(ledger, batcher, gate),
                services.HoldService(ledger, batcher, gate),
                services.AccessService(access, gate),
                services.EventService(
                    ledger, listener, gate, None if metrics is None else metrics.events_behind
                ),
                services.GrantService(ledger, gate),
                services.ReportService(ledger, gate),
            )
            for servicer, service in zip(servicers, services_described, strict=True):
                admission.register(
                    server,
                    servicer,
                    service,
                    admitting,
                    None if metrics is None else metrics.observed,
                )
            health_servicer = _Health(settings.worker)
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.Reflection(
                (
                    *_service_names,
                    health.SERVICE_NAME,
                    reflection.v1_service_name,
                    reflection.v1alpha_service_name,
                ),
                reflection.described_files(),
            ).add_to(server)
            metrics_port = None
            if metrics is not None:
                try:
                    metrics_port = metrics.serve(settings.metrics_listen)
                except OSError as error:
                    raise OSError(
                        f"cannot serve metrics on {settings.metrics_listen}: "
                        f"{error.strerror or error}"
                    ) from error
            tls_files = settings.tls_files
            tls = None if tls_files is None else ServerTls(tls_files)
            try:
                if tls is None:
                    port = server.add_insecure_port(settings.listen)
                else:
                    port = server.add_secure_port(settings.listen, tls.credentials())
            except RuntimeError:  # What gRPC raises when it cannot bind.
                port = 0
            if port == 0:
                raise OSError(
                    f"cannot listen on {settings.listen}: the port is taken, or the address is "
                    "not this machine's"
                )
            await server.start()
            if settings.events:
                listener.start()
            for name in ("", *_service_names):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            if metrics is not None:
                await metrics.stop()
            for pool in pools:
                await pool.close()
            raise
        return cls(
            settings,
            server,
            port,
            ledger,
            batcher,
            admitting,
            health_servicer,
            probe_pool,
            probe_lost,
            gate,
            listener,
            tls,
            metrics,
            metrics_port,
        )

    def _track(self, metrics: Metrics) -> None:
        """What the metrics read when scraped: the queue, the pools, health, admission."""
        metrics.track(
            queued=lambda: self.batcher.queued,
            pools={
                "write": self.ledger.pool,
                "read": self.ledger.read_pool,
                "health": self._probe_pool,
                "access": self.gate.access.pool,
            },
            database_up=lambda: self.database_up,
            admission=self.admission,
        )

    async def stop(self) -> None:
        await self.listener.close()
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.settings.shutdown_grace_s)
        await self.batcher.close()
        for task in (
            self._sweep,
            self._retention,
            self._expiration,
            self._health_check,
            self._loop_watch,
        ):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.ledger.close()
        await self._probe_pool.close()
        await self.gate.access.pool.close()
        if self.metrics is not None:
            await self.metrics.stop()

    async def _expire_holds(self) -> None:
        if not self.settings.background_jobs:
            return
        interval_s = self.settings.hold_expiry_interval_s
        failing = False
        while True:
            await asyncio.sleep(interval_s)
            try:
                while await self.ledger.expire_holds():
                    pass
            except errors.Unavailable as error:
                if not failing:
                    logger.warning(
                        "the hold expiry sweep cannot reach the database (%s); "
                        "trying again every %g s",
                        _described(error.__cause__ or error),
                        interval_s,
                    )
                failing = True
            except Exception:
                if not failing:
                    logger.exception(
                        "the hold expiry sweep failed; trying again every %g s", interval_s
                    )
                failing = True
            else:
                if failing:
                    logger.info("the hold expiry sweep works again")
                failing = False

    async def _delete_old_events(self) -> None:
        """Every events_retention_interval_s, deletes the records older than
        events_retention_days (in bounded chunks: `Ledger.delete_events_before`)."""
        settings = self.settings
        if not settings.events or not settings.background_jobs:
            return
        interval_s = settings.events_retention_interval_s
        failing = False
        while True:
            try:
                cutoff = datetime.now(UTC) - timedelta(days=settings.events_retention_days)
                deleted = await self.ledger.delete_events_before(cutoff)
            except Exception as error:
                if not failing:
                    logger.warning(
                        "the retention of events failed (%s); trying again every %g s",
                        _described(error.__cause__ or error),
                        interval_s,
                        exc_info=not isinstance(error, errors.Unavailable),
                    )
                failing = True
            else:
                if deleted:
                    logger.info("deleted %d event records older than %s", deleted, cutoff)
                failing = False
            await asyncio.sleep(interval_s)

    async def _expire_grants(self) -> None:
        """Every expiration_interval_s, from the start: an expiration run
        (`Ledger.expire_grants`), then the notices of the grants that expire within
        expiry_notice_days (`Ledger.announce_expiring_grants`)."""
        settings = self.settings
        interval_s = settings.expiration_interval_s
        if not interval_s or not settings.background_jobs:
            return
        notice = timedelta(days=settings.expiry_notice_days)
        failing = False
        while True:
            try:
                expired = await self.ledger.expire_grants()
                announced = (
                    await self.ledger.announce_expiring_grants(notice)
                    if settings.expiry_notice_days
                    else 0
                )
            except Exception as error:
                if not failing:
                    logger.warning(
                        "the expiration run failed (%s); trying again every %g s",
                        _described(error.__cause__ or error),
                        interval_s,
                        exc_info=not isinstance(error, errors.Unavailable),
                    )
                failing = True
            else:
                if expired or announced:
                    logger.info(
                        "expiration run: expired %d, announced %d expiring within %d days",
                        expired,
                        announced,
                        settings.expiry_notice_days,
                    )
                if failing:
                    logger.info("the expiration run works again")
                failing = False
            await asyncio.sleep(interval_s)

    async def _check_health(self) -> None:
        interval_s = self.settings.health_check_interval_s
        down_since: float | None = None
        while True:
            started = time.monotonic()
            try:
                await ping(self._probe_pool, self.settings.health_check_timeout_s)
            except Exception as error:
                if down_since is None:
                    down_since = started
                    cause = error.__cause__ if isinstance(error, errors.Unavailable) else error
                    logger.warning(
                        "the database does not answer (%s): health is NOT_SERVING until it does",
                        _described(cause or error),
                        exc_info=not isinstance(error, errors.Unavailable),
                    )
                    self.database_up = False
                    await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            else:
                if down_since is not None:
                    logger.warning(
                        "the database answers again after %.1f s: health is SERVING",
                        time.monotonic() - down_since,
                    )
                    down_since = None
                    self.database_up = True
                    await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s - (time.monotonic() - started)):
                    await self._probe_lost.wait()
            self._probe_lost.clear()

    async def _set_health(self, status: int) -> None:
        """`status`: a `HealthCheckResponse` serving status, as the health servicer takes it."""
        for name in ("", *_service_names):
            await self._health.set(name, status)


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
