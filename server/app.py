"""The server: the gRPC services over one Ledger, its batcher and its hold-expiry sweep.

    server = await Server.start(Settings(database_url=dsn, listen="127.0.0.1:0"))
    print(server.port)
    await server.stop()

`start` migrates the database first. `stop` shuts down in order: stop taking calls and let
those in flight finish (within the grace period), apply what the batcher holds, stop the
sweep and the health check, close the connection pools.

Health tells the truth: every `health_check_interval_s`, and at once when its connection
closes, a connection of its own asks the database `select 1`; while it gets no answer within
`health_check_timeout_s`, every service (and "") is NOT_SERVING, and SERVING again once it
does. An outage is logged when it starts
and when it ends; the hold-expiry sweep, failing meanwhile, says so once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import asyncpg
import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coffer.clients.v1 import (
    holds_pb2,
    holds_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)
from coffer.core import errors
from coffer.core.ledger import (
    Ledger,
    create_pool,
    lock_timeout_s_default,
    ping,
    statement_timeout_s_default,
)
from coffer.core.migrate import migrate

from . import services
from .batcher import Batcher

logger = logging.getLogger(__name__)

message_bytes_max = 64 * 1024 * 1024
concurrent_calls_max = 1024

service_names = (
    units_pb2.DESCRIPTOR.services_by_name["UnitService"].full_name,
    wallets_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name,
    transfers_pb2.DESCRIPTOR.services_by_name["TransferService"].full_name,
    holds_pb2.DESCRIPTOR.services_by_name["HoldService"].full_name,
)


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str
    listen: str = "127.0.0.1:50051"
    # Connections to PostgreSQL for writes: batches in flight at once, units, wallets.
    pool_size: int = 8
    # Connections for queries (gets, lists, histories), apart from the writes' ones.
    pool_size_read: int = 4
    # A statement running longer, or waiting longer for a lock, fails its call with
    # UNAVAILABLE; so does a database that does not answer for about as long, and a wait for a
    # free connection.
    statement_timeout_s: float = statement_timeout_s_default
    lock_timeout_s: float = lock_timeout_s_default
    batch_size_max: int = 1000
    batch_wait_ms: float = 0.0
    queue_max: int = 50_000
    batch_workers: int = 2
    # SO_REUSEPORT: several server processes may listen on one port (the kernel spreads the
    # connections among them).
    reuse_port: bool = False
    hold_expiry_interval_s: float = 1.0
    health_check_interval_s: float = 1.0
    health_check_timeout_s: float = 1.0
    shutdown_grace_s: float = 10.0


class Server:
    def __init__(
        self,
        settings: Settings,
        server: grpc.aio.Server,
        port: int,
        ledger: Ledger,
        batcher: Batcher,
        health_servicer: health.aio.HealthServicer,
        probe_pool: asyncpg.Pool,
        probe_lost: asyncio.Event,
    ) -> None:
        self.settings = settings
        self.port = port
        self.ledger = ledger
        self.batcher = batcher
        self._server = server
        self._health = health_servicer
        self._probe_pool = probe_pool
        # Set when the health check's connection closes: check again at once.
        self._probe_lost = probe_lost
        self._sweep = asyncio.create_task(self._expire_holds())
        self._health_check = asyncio.create_task(self._check_health())

    @classmethod
    async def start(cls, settings: Settings) -> Server:
        # Migrations run on a connection of their own, without the pools' timeouts: one may
        # take long, and waits for another server's under an advisory lock.
        connection = await asyncpg.connect(
            settings.database_url, timeout=settings.statement_timeout_s
        )
        try:
            applied = await migrate(connection)
        finally:
            await connection.close()
        if applied:
            logger.info("applied migrations %s", applied)
        timeouts = {
            "statement_timeout_s": settings.statement_timeout_s,
            "lock_timeout_s": settings.lock_timeout_s,
        }
        pools: list[asyncpg.Pool] = []
        try:
            for size in (settings.pool_size, settings.pool_size_read):
                pools.append(await create_pool(settings.database_url, size_max=size, **timeouts))
            probe_timeout_s = settings.health_check_timeout_s
            probe_lost = asyncio.Event()
            probe_pool = await create_pool(
                settings.database_url,
                size_max=1,
                statement_timeout_s=probe_timeout_s,
                lock_timeout_s=probe_timeout_s,
                on_close=probe_lost.set,
            )
            pools.append(probe_pool)
            ledger = Ledger(
                pools[0], read_pool=pools[1], acquire_timeout_s=settings.statement_timeout_s
            )
            batcher = Batcher(
                ledger.apply,
                batch_size_max=settings.batch_size_max,
                batch_wait_s=settings.batch_wait_ms / 1000,
                queue_max=settings.queue_max,
                workers=settings.batch_workers,
            )
            server = grpc.aio.server(
                options=[
                    ("grpc.max_receive_message_length", message_bytes_max),
                    ("grpc.max_send_message_length", message_bytes_max),
                    # Past this many calls at once on a connection, gRPC makes callers wait.
                    ("grpc.max_concurrent_streams", concurrent_calls_max),
                    ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
                ],
            )
            units_pb2_grpc.add_UnitServiceServicer_to_server(services.UnitService(ledger), server)
            wallets_pb2_grpc.add_WalletServiceServicer_to_server(
                services.WalletService(ledger), server
            )
            transfers_pb2_grpc.add_TransferServiceServicer_to_server(
                services.TransferService(ledger, batcher), server
            )
            holds_pb2_grpc.add_HoldServiceServicer_to_server(
                services.HoldService(ledger, batcher), server
            )
            health_servicer = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
            reflection.enable_server_reflection(
                (*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
            port = server.add_insecure_port(settings.listen)
            if port == 0:
                raise OSError(f"cannot listen on {settings.listen}")
            await server.start()
            for name in ("", *service_names):
                await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        except BaseException:
            for pool in pools:
                await pool.close()
            raise
        return cls(settings, server, port, ledger, batcher, health_servicer, probe_pool, probe_lost)

    async def stop(self) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(self.settings.shutdown_grace_s)
        await self.batcher.close()
        for task in (self._sweep, self._health_check):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.ledger.close()
        await self._probe_pool.close()

    async def _expire_holds(self) -> None:
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
                    await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
            else:
                if down_since is not None:
                    logger.warning(
                        "the database answers again after %.1f s: health is SERVING",
                        time.monotonic() - down_since,
                    )
                    down_since = None
                    await self._set_health(health_pb2.HealthCheckResponse.SERVING)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval_s - (time.monotonic() - started)):
                    await self._probe_lost.wait()
            self._probe_lost.clear()

    async def _set_health(self, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        for name in ("", *service_names):
            await self._health.set(name, status)


def _described(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
