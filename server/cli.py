"""The `coffer` command: `serve` and `migrate` run here; every other subcommand is an operator
command of the client (`coffer.clients.cli`)."""

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
from typing import Any

import asyncpg
import uvloop

from coffer.core.ledger import batch_operations_max, pool_size_max, timeout_s_max
from coffer.core.migrate import migrate

from .admission import request_bytes_max
from .app import Server, Settings, SettingsError, batch_wait_ms_max
from .embedded import EmbeddedPostgres, EmbeddedPostgresError, default_data_dir, supervise

logger = logging.getLogger("coffer")

server_commands = ("serve", "migrate", "bench")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in server_commands:
        from coffer.clients.cli import main as operator_main

        if not argv or argv[0] in ("-h", "--help"):
            print(_usage_header, end="")
        return operator_main(argv)
    if argv[0] == "bench":
        from .bench import main as bench_main

        return bench_main(argv[1:])
    arguments = _parser().parse_args(argv)
    logging.basicConfig(
        level=arguments.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if arguments.command == "serve":
            try:
                settings = _settings(arguments)
            except SettingsError as error:
                flag = "--" + error.setting.replace("_", "-")
                print(f"coffer serve: {flag} {error.problem}", file=sys.stderr)
                return 2
            return uvloop.run(_serve(arguments, settings))
        return uvloop.run(_migrate(arguments))
    except EmbeddedPostgresError as error:
        print(f"coffer: {error}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as error:
        print(f"coffer: {error}", file=sys.stderr)
        return 1


_usage_header = """\
coffer serve [--listen HOST:PORT] [--database-url URL]   run the ledger server
coffer migrate [--database-url URL]                      apply the schema migrations
coffer bench [--scenario NAME] [--duration S] [--json]   measure throughput and latency

Operator commands (against a running server):
"""


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
        default=os.environ.get("COFFER_LISTEN", "127.0.0.1:50051"),
        help="address to serve gRPC on (env COFFER_LISTEN; default 127.0.0.1:50051)",
    )
    defaults = Settings(database_url="")
    serve.add_argument(
        "--pool-size",
        type=_bounded(int, 2, pool_size_max),
        default=defaults.pool_size,
        metavar="N",
        help="database connections for writes, at least twice --batch-workers "
        f"(default {defaults.pool_size})",
    )
    serve.add_argument(
        "--pool-size-read",
        type=_bounded(int, 1, pool_size_max),
        default=defaults.pool_size_read,
        metavar="N",
        help="database connections for queries, apart from the writes' "
        f"(default {defaults.pool_size_read})",
    )
    serve.add_argument(
        "--statement-timeout-s",
        type=_bounded(float, 0, timeout_s_max),
        default=defaults.statement_timeout_s,
        metavar="S",
        help="a statement running longer, or a database not answering as long, fails the call "
        f"with UNAVAILABLE (default {defaults.statement_timeout_s:g})",
    )
    serve.add_argument(
        "--lock-timeout-s",
        type=_bounded(float, 0, timeout_s_max),
        default=defaults.lock_timeout_s,
        metavar="S",
        help="a wait for a lock longer than this fails the call with UNAVAILABLE "
        f"(default {defaults.lock_timeout_s:g})",
    )
    serve.add_argument(
        "--batch-size-max",
        type=int,
        default=defaults.batch_size_max,
        help="most operations coalesced into one database transaction "
        f"(1 to {batch_operations_max})",
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=defaults.batch_wait_ms,
        help=f"how long a batch may wait for more operations (0 to {batch_wait_ms_max}; "
        "default 0: never)",
    )
    serve.add_argument(
        "--batch-workers",
        type=int,
        default=defaults.batch_workers,
        help="coalesced batches applied at once, of single calls and of batch calls each "
        "(1 to half of --pool-size)",
    )
    serve.add_argument(
        "--queue-max",
        type=int,
        default=defaults.queue_max,
        help="operations waiting for a batch before calls get RESOURCE_EXHAUSTED "
        "(at least --batch-size-max)",
    )
    serve.add_argument(
        "--queued-bytes-max",
        type=int,
        default=defaults.queued_bytes_max,
        help="request bytes in progress at once before calls get RESOURCE_EXHAUSTED "
        f"(at least {2 * request_bytes_max})",
    )
    serve.add_argument(
        "--calls-max",
        type=int,
        default=defaults.calls_max,
        help="calls in progress at once before calls get RESOURCE_EXHAUSTED (1 or more)",
    )
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT, so that several servers can listen on one port",
    )
    return parser


def _bounded(kind: type[int] | type[float], low: float, high: float) -> Any:
    """An argument type: a number above `low` (at least it, for integers) and at most `high`."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not (low <= value if kind is int else low < value) or not value <= high:
            bound = f"from {low}" if kind is int else f"more than {low:g}"
            raise argparse.ArgumentTypeError(f"must be {bound} and at most {high:g}: {text}")
        return value

    return parse


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
    """The server's settings from the flags (the database comes later): checked before anything
    starts."""
    return Settings(
        database_url="",
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
    )


async def _serve(arguments: argparse.Namespace, settings: Settings) -> int:
    async with _database(arguments) as (database_url, description):
        server = await Server.start(dataclasses.replace(settings, database_url=database_url))
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, stopping.set)
        host = arguments.listen.rsplit(":", 1)[0]
        print(f"coffer: serving on {host}:{server.port} ({description})", flush=True)
        await stopping.wait()
        print("coffer: shutting down", flush=True)
        await server.stop()
    print("coffer: stopped", flush=True)
    return 0


async def _migrate(arguments: argparse.Namespace) -> int:
    async with _database(arguments) as (database_url, description):
        connection = await asyncpg.connect(database_url)
        try:
            applied = await migrate(connection)
        finally:
            await connection.close()
    print(f"coffer: applied migrations {applied or 'none'} ({description})")
    return 0
