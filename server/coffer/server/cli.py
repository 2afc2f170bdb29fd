"""The server's commands, `coffer serve` and `coffer migrate`.

The `coffer` program is the client's (`coffer.clients.cli`); these join it through the
`coffer.commands` entry points of this distribution, each called with the arguments after
its name."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import uvloop

from coffer.core.migrate import migrate as apply_migrations
from coffer.postgres.supervisor import (
    EmbeddedPostgres,
    EmbeddedPostgresError,
    default_data_dir,
    supervise,
)

from .app import Server
from .settings import Settings, SettingsError, listen_default
from .tls import ServerTls, TlsError

__all__ = ["migrate", "serve"]

logger = logging.getLogger("coffer")


def serve(argv: list[str]) -> int:
    """run the ledger server"""
    return _main(["serve", *argv])


def migrate(argv: list[str]) -> int:
    """apply the schema migrations"""
    return _main(["migrate", *argv])


def _main(argv: list[str]) -> int:
    arguments = _parser().parse_args(argv)
    logging.basicConfig(
        level=arguments.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if arguments.command == "serve":
            try:
                settings = _settings(arguments)
                return uvloop.run(_serve(arguments, settings))
            # The TLS files are read again at start: they may have changed since checked.
            except (SettingsError, TlsError) as error:
                flag = "--" + error.setting.replace("_", "-")
                print(f"coffer serve: {flag} {error.problem}", file=sys.stderr)
                return 2
        return uvloop.run(_migrate(arguments))
    except EmbeddedPostgresError as error:
        print(f"coffer: {error}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as error:
        print(f"coffer: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coffer", description="The Coffer ledger server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC ledger server")
    migrate_command = commands.add_parser("migrate", help="apply the schema migrations")
    for command in (serve, migrate_command):
        command.add_argument(
            "--database-url",
            default=os.environ.get("DATABASE_URL"),
            help="PostgreSQL to use (env DATABASE_URL); without it, an embedded PostgreSQL",
        )
        command.add_argument(
            "--data-dir",
            type=Path,
            default=None,
            help="where the embedded PostgreSQL keeps its data (env COFFER_DATA_DIR; default: "
            f"{default_data_dir()})",
        )
        command.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    serve.add_argument(
        "--listen",
        default=os.environ.get("COFFER_LISTEN", listen_default),
        help=f"address to serve gRPC on (env COFFER_LISTEN; default {listen_default})",
    )
    # The flags' values are parsed here and checked by Settings, in one place (`_settings`).
    defaults = Settings(database_url="")
    serve.add_argument(
        "--pool-size",
        type=int,
        default=defaults.pool_size,
        metavar="N",
        help="database connections for writes, at least twice --batch-workers "
        f"(default {defaults.pool_size})",
    )
    serve.add_argument(
        "--pool-size-read",
        type=int,
        default=defaults.pool_size_read,
        metavar="N",
        help="database connections for queries, apart from the writes' "
        f"(default {defaults.pool_size_read})",
    )
    serve.add_argument(
        "--statement-timeout-s",
        type=float,
        default=defaults.statement_timeout_s,
        metavar="S",
        help="a statement running longer, or a database not answering as long, fails the call "
        f"with UNAVAILABLE (default {defaults.statement_timeout_s:g})",
    )
    serve.add_argument(
        "--lock-timeout-s",
        type=float,
        default=defaults.lock_timeout_s,
        metavar="S",
        help="a wait for a lock longer than this fails the call with UNAVAILABLE "
        f"(default {defaults.lock_timeout_s:g})",
    )
    serve.add_argument(
        "--batch-size-max",
        type=int,
        default=defaults.batch_size_max,
        metavar="N",
        help="most operations coalesced into one database transaction "
        f"(default {defaults.batch_size_max})",
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=defaults.batch_wait_ms,
        metavar="MS",
        help="how long a small batch may wait for more operations (default 0: never)",
    )
    serve.add_argument(
        "--batch-workers",
        type=int,
        default=defaults.batch_workers,
        metavar="N",
        help="coalesced batches applied at once, of single calls and of batch calls each, "
        f"at most half of --pool-size (default {defaults.batch_workers})",
    )
    serve.add_argument(
        "--queue-max",
        type=int,
        default=defaults.queue_max,
        metavar="N",
        help="operations waiting for a batch before calls get RESOURCE_EXHAUSTED, at least "
        f"--batch-size-max (default {defaults.queue_max})",
    )
    serve.add_argument(
        "--queued-bytes-max",
        type=int,
        default=defaults.queued_bytes_max,
        metavar="N",
        help="request bytes in progress at once before calls get RESOURCE_EXHAUSTED "
        f"(default {defaults.queued_bytes_max})",
    )
    serve.add_argument(
        "--calls-max",
        type=int,
        default=defaults.calls_max,
        metavar="N",
        help="calls in progress at once before calls get RESOURCE_EXHAUSTED "
        f"(default {defaults.calls_max})",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT, so that several servers can listen on one port",
    )
    serve.add_argument(
        "--events",
        action=argparse.BooleanOptionalAction,
        default=defaults.events,
        help="keep the event stream: a record per write transaction, in commit order "
        "(default on; --no-events keeps none, and the event RPCs answer EVENTS_DISABLED)",
    )
    serve.add_argument(
        "--events-retention-days",
        type=int,
        default=defaults.events_retention_days,
        metavar="DAYS",
        help=f"keep event records this many days (default {defaults.events_retention_days})",
    )
    serve.add_argument(
        "--events-watchers-max",
        type=int,
        default=defaults.events_watchers_max,
        metavar="N",
        help="WatchEvents streams served at once before RESOURCE_EXHAUSTED; each also counts "
        f"as a call of --calls-max (default {defaults.events_watchers_max})",
    )
    serve.add_argument(
        "--tls-cert",
        default=os.environ.get("COFFER_TLS_CERT", ""),
        metavar="PEM",
        help="serve TLS with this certificate chain, with --tls-key; read again on SIGHUP "
        "(env COFFER_TLS_CERT; default: plaintext)",
    )
    serve.add_argument(
        "--tls-key",
        default=os.environ.get("COFFER_TLS_KEY", ""),
        metavar="PEM",
        help="the unencrypted private key of --tls-cert (env COFFER_TLS_KEY)",
    )
    serve.add_argument(
        "--tls-client-ca",
        default=os.environ.get("COFFER_TLS_CLIENT_CA", ""),
        metavar="PEM",
        help="require client certificates issued by these certificate authorities (mTLS; "
        "env COFFER_TLS_CLIENT_CA)",
    )
    return parser


@asynccontextmanager
async def _database(arguments: argparse.Namespace) -> AsyncIterator[tuple[str, str]]:
    """The database URL, and how to describe it: the given one, or an embedded cluster."""
    if arguments.database_url:
        yield arguments.database_url, "DATABASE_URL"
        return
    data_dir = arguments.data_dir or default_data_dir()
    cluster = EmbeddedPostgres(data_dir / "postgres")
    await asyncio.to_thread(cluster.start)
    # Restarts the cluster when it dies while Coffer runs.
    supervisor = asyncio.create_task(supervise(cluster))
    try:
        yield cluster.ledger_dsn, f"embedded PostgreSQL in {cluster.data_dir}"
    finally:
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await asyncio.to_thread(cluster.stop)


def _settings(arguments: argparse.Namespace) -> Settings:
    """The server's settings from the flags, checked before anything starts (the embedded
    database's URL, when there is no other, comes later)."""
    return Settings(
        database_url=arguments.database_url or "",
        listen=arguments.listen,
        pool_size=arguments.pool_size,
        pool_size_read=arguments.pool_size_read,
        statement_timeout_s=arguments.statement_timeout_s,
        lock_timeout_s=arguments.lock_timeout_s,
        batch_size_max=arguments.batch_size_max,
        batch_wait_ms=arguments.batch_wait_ms,
        queue_max=arguments.queue_max,
        batch_workers=arguments.batch_workers,
        queued_bytes_max=arguments.queued_bytes_max,
        calls_max=arguments.calls_max,
        reuse_port=arguments.reuse_port,
        tls_cert=arguments.tls_cert,
        tls_key=arguments.tls_key,
        tls_client_ca=arguments.tls_client_ca,
        events=arguments.events,
        events_retention_days=arguments.events_retention_days,
        events_watchers_max=arguments.events_watchers_max,
    )


async def _serve(arguments: argparse.Namespace, settings: Settings) -> int:
    async with _database(arguments) as (database_url, description):
        server = await Server.start(dataclasses.replace(settings, database_url=database_url))
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, stopping.set)
        # Without TLS, SIGHUP keeps its default (it ends the process), as it always did.
        reloads = None
        if server.tls is not None:
            reload_asked = asyncio.Event()
            loop.add_signal_handler(signal.SIGHUP, reload_asked.set)
            reloads = asyncio.create_task(_reload_tls_on_request(server.tls, reload_asked))
        host = arguments.listen.rsplit(":", 1)[0]
        events = "" if settings.events else ", events off"
        print(
            f"coffer: serving on {host}:{server.port}{_security(server)} ({description}{events})",
            flush=True,
        )
        await stopping.wait()
        print("coffer: shutting down", flush=True)
        if reloads is not None:
            reloads.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloads
        await server.stop()
    print("coffer: stopped", flush=True)
    return 0


def _security(server: Server) -> str:
    """How the ready line says the server is reached."""
    if server.tls is None:
        return ""
    if server.tls.client_certificates_required:
        return " over TLS with client certificates required (mTLS; SIGHUP reloads the files)"
    return " over TLS (SIGHUP reloads the files)"


async def _reload_tls_on_request(tls: ServerTls, asked: asyncio.Event) -> None:
    """Reads the TLS files again each time `asked` is set (SIGHUP), off the event loop."""
    while True:
        await asked.wait()
        asked.clear()
        await asyncio.to_thread(tls.reload)


async def _migrate(arguments: argparse.Namespace) -> int:
    async with _database(arguments) as (database_url, description):
        connection = await asyncpg.connect(database_url)
        try:
            applied = await apply_migrations(connection)
        finally:
            await connection.close()
    print(f"coffer: applied migrations {applied or 'none'} ({description})")
    return 0
