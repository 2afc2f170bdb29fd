"""The server's commands: `coffer serve`, `coffer migrate`, and `coffer keys` and `coffer
certificates`, which make and revoke credentials in the database itself (the way the first
administrator's key is made: `coffer keys create --role admin --name ops`).

The `coffer` program is the client's (`coffer.clients.cli`); these join it through the
`coffer.commands` entry points of this distribution, each called with the arguments after
its name. The database is found as `coffer migrate` finds it: `--database-url` or
DATABASE_URL, else the embedded PostgreSQL in the data directory, the running server's if one
runs there (through its socket), else started for the command and stopped after it.

`coffer serve --workers N` with N > 1 runs a supervisor and N workers on one port
(`coffer.server.workers`); each worker is this same command, with `--worker K/N@ID`."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import uvloop

from coffer.clients.cli import add_principal_options, moment
from coffer.clients.workers import Worker
from coffer.core import errors
from coffer.core.access import Access
from coffer.core.migrate import migrate as apply_migrations
from coffer.core.model import ApiKey, CertificateMapping, Role
from coffer.core.store.connections import create_pool
from coffer.postgres.supervisor import (
    CONNECTIONS_MAX_DEFAULT,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    default_data_dir,
    supervise,
)

from . import collector, logs, workers
from .app import Server, cluster_connections_max
from .settings import (
    Settings,
    SettingsError,
    listen_default,
    worker_alone,
    workers_default,
    workers_max,
)
from .tls import ServerTls, TlsError

__all__ = ["certificates", "keys", "migrate", "serve", "serve_settings"]

logger = logging.getLogger("coffer")


def serve(argv: list[str]) -> int:
    """run the ledger server"""
    return _main(["serve", *argv])


def migrate(argv: list[str]) -> int:
    """apply the schema migrations"""
    return _main(["migrate", *argv])


def keys(argv: list[str]) -> int:
    """API keys, in the database itself"""
    return _main(["keys", *argv])


def certificates(argv: list[str]) -> int:
    """certificate mappings, in the database itself"""
    return _main(["certificates", *argv])


# Who made or changed a credential through these commands (its record's `created_by`, and
# its event's actor).
made_by_command = "coffer keys"


def _main(argv: list[str]) -> int:
    arguments = _parser().parse_args(argv)
    worker: Worker | None = getattr(arguments, "worker", None)
    number = None if worker is None else worker.number
    logs.configure(arguments.log_level, arguments.log_format, worker=number)
    # Who says what went wrong: a worker's words reach the supervisor's standard error.
    program = "coffer" if worker is None else f"coffer (worker {number})"
    if worker is not None:
        # A worker serves alone, on the database its supervisor found (given in DATABASE_URL
        # when the command line named none).
        arguments.workers = 1
        arguments.database_url = arguments.database_url or os.environ.get("DATABASE_URL", "")
        assert arguments.database_url, "a worker is given its database"
    try:
        if arguments.command == "serve":
            try:
                settings = _settings(arguments)
                if settings.workers > 1:
                    database = _database(
                        arguments, connections_max=cluster_connections_max(settings)
                    )
                    return uvloop.run(workers.supervise(argv[1:], settings, database))
                return uvloop.run(_serve(arguments, settings))
            # The TLS files are read again at start: they may have changed since checked.
            except (SettingsError, TlsError) as error:
                flag = "--" + error.setting.replace("_", "-")
                print(f"{program} serve: {flag} {error.problem}", file=sys.stderr)
                return 2
        if arguments.command in ("keys", "certificates"):
            return uvloop.run(_access(arguments))
        return uvloop.run(_migrate(arguments))
    except errors.CofferError as error:
        print(f"error: {error.reason}: {error.message}", file=sys.stderr)
        return 1
    except EmbeddedPostgresError as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 1
    except (OSError, asyncpg.PostgresError) as error:
        print(f"{program}: {error}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coffer", description="The Coffer ledger server.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC ledger server")
    migrate_command = commands.add_parser("migrate", help="apply the schema migrations")
    keys_command = commands.add_parser(
        "keys", help="API keys, in the database itself (the first admin key)"
    )
    key_commands = keys_command.add_subparsers(dest="access_command", required=True)
    create = key_commands.add_parser("create", help="make an API key, shown this once")
    add_principal_options(create)
    create.add_argument(
        "--expires-at",
        type=moment,
        metavar="ISO",
        help="when it stops being good, e.g. 2027-01-31T00:00:00Z (default: never)",
    )
    key_commands.add_parser("list", help="list the API keys (never their secrets)")
    revoke = key_commands.add_parser("revoke", help="revoke an API key for good")
    revoke.add_argument("key", type=int, metavar="ID")
    certificates_command = commands.add_parser(
        "certificates", help="client certificates mapped to principals, in the database itself"
    )
    mapping_commands = certificates_command.add_subparsers(dest="access_command", required=True)
    map_command = mapping_commands.add_parser("map", help="map a subject common name")
    map_command.add_argument("subject", metavar="COMMON_NAME")
    add_principal_options(map_command)
    unmap = mapping_commands.add_parser("unmap", help="remove a mapping")
    unmap.add_argument("subject", metavar="COMMON_NAME")
    mapping_commands.add_parser("list", help="list the mappings")
    database_commands = [serve, migrate_command]
    for group in (key_commands, mapping_commands):
        database_commands.extend(group.choices.values())
    for command in database_commands:
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
        command.add_argument(
            "--log-format",
            default=os.environ.get("COFFER_LOG_FORMAT", "text"),
            choices=logs.log_formats,
            help="the log on standard error: text lines, or one JSON object per line "
            "(env COFFER_LOG_FORMAT; default text)",
        )
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
        "--workers",
        type=int,
        # A string (from the environment) is read as the flag's would be.
        default=os.environ.get("COFFER_WORKERS") or workers_default(),
        metavar="N",
        help="server processes on the one port, each with the pools, limits and rates these "
        "flags give (a worker's own); 1: this process alone; more: a supervisor and N "
        f"workers, one connection of a client reaching one worker (1 to {workers_max}; env "
        "COFFER_WORKERS; default: the cores this process may run on, within its CPU quota, "
        f"{workers_default()})",
    )
    # A worker of a supervisor (server/workers.py): K/N@ID, worker K of N of supervisor ID.
    serve.add_argument("--worker", type=_worker, default=None, help=argparse.SUPPRESS)
    serve.add_argument(
        "--reuse-port",
        action="store_true",
        help="set SO_REUSEPORT, so that other servers can listen on the same port",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext on an address other than loopback (a trusted network, or behind "
        "a TLS proxy); authentication stays on; with --tls-cert it changes nothing",
    )
    serve.add_argument(
        "--rate-limit",
        type=float,
        default=defaults.rate_limit_calls_per_s,
        metavar="N",
        help="calls a second each principal may make, past its burst "
        f"(default {defaults.rate_limit_calls_per_s:g})",
    )
    serve.add_argument(
        "--rate-burst",
        type=int,
        default=defaults.rate_limit_burst,
        metavar="N",
        help=f"calls a principal may make at once (default {defaults.rate_limit_burst})",
    )
    serve.add_argument(
        "--auth-failures-per-s",
        type=float,
        default=defaults.authentication_failures_per_s,
        metavar="N",
        help="failed authentications a second from one host before its calls with unknown "
        f"credentials are refused unchecked (default {defaults.authentication_failures_per_s:g})",
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
        "--expiration-interval-s",
        type=float,
        default=defaults.expiration_interval_s,
        metavar="S",
        help="run an expiration every this many seconds, from the start: what is left of "
        "grants past their expiry moves to the expired-credits wallets; 0: never "
        f"(default {defaults.expiration_interval_s:g})",
    )
    serve.add_argument(
        "--expiry-notice-days",
        type=int,
        default=defaults.expiry_notice_days,
        metavar="DAYS",
        help="after each run, say on the event stream which grants expire within this many "
        f"days (GRANT_EXPIRING_SOON), once each; 0: never (default {defaults.expiry_notice_days})",
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
    serve.add_argument(
        "--metrics-listen",
        default=os.environ.get("COFFER_METRICS_LISTEN", ""),
        metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP on this address, at /metrics; with "
        "--workers N, worker k's on port P+k-1 (port 0: each any free one) "
        "(env COFFER_METRICS_LISTEN; default: none)",
    )
    return parser


@asynccontextmanager
async def _database(
    arguments: argparse.Namespace, *, connections_max: int = CONNECTIONS_MAX_DEFAULT
) -> AsyncIterator[tuple[str, str]]:
    """The database URL, and how to describe it: the given one, or an embedded cluster (taking
    at least `connections_max` connections)."""
    if arguments.database_url:
        yield arguments.database_url, "DATABASE_URL"
        return
    data_dir = arguments.data_dir or default_data_dir()
    cluster = EmbeddedPostgres(data_dir / "postgres", connections_max=connections_max)
    if arguments.command in ("keys", "certificates"):
        # The server may be running on it: go through its socket.
        running = cluster.running_dsn()
        if running is not None:
            yield running, f"embedded PostgreSQL in {cluster.data_dir}, of the running server"
            return
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


def serve_settings(argv: Sequence[str]) -> Settings:
    """The settings `coffer serve` takes from these arguments (those after `serve`) and the
    environment, checked; argparse's refusals exit with 2, as the command's do."""
    return _settings(_parser().parse_args(["serve", *argv]))


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
        metrics_listen=arguments.metrics_listen,
        insecure=arguments.insecure,
        rate_limit_calls_per_s=arguments.rate_limit,
        rate_limit_burst=arguments.rate_burst,
        authentication_failures_per_s=arguments.auth_failures_per_s,
        events=arguments.events,
        events_retention_days=arguments.events_retention_days,
        events_watchers_max=arguments.events_watchers_max,
        expiration_interval_s=arguments.expiration_interval_s,
        expiry_notice_days=arguments.expiry_notice_days,
        workers=arguments.workers,
        worker=arguments.worker or worker_alone(),
        # Of a supervisor's workers, the first alone.
        background_jobs=arguments.worker is None or arguments.worker.number == 1,
    )


async def _serve(arguments: argparse.Namespace, settings: Settings) -> int:
    """One server in this process: `coffer serve --workers 1`, or a worker of a supervisor
    (`--worker K/N@ID`), which says it serves to its supervisor alone (`workers.WorkerReady`)."""
    worker = arguments.worker
    connections_max = cluster_connections_max(settings)
    async with _database(arguments, connections_max=connections_max) as (database_url, description):
        collector.tune()
        server = await Server.start(dataclasses.replace(settings, database_url=database_url))
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signal_number, stopping.set)
        if worker is not None:
            workers.watch_supervisor(stopping)
        # Without TLS, SIGHUP keeps its default (it ends the process), as it always did.
        reloads = None
        if server.tls is not None:
            reload_asked = asyncio.Event()
            loop.add_signal_handler(signal.SIGHUP, reload_asked.set)
            reloads = asyncio.create_task(_reload_tls_on_request(server.tls, reload_asked))
        if worker is not None:
            ready = workers.WorkerReady(
                server.port, _security(server), await _access_mode(server), server.metrics_port
            )
            print(ready.line(), flush=True)
        else:
            if server.metrics_port is not None:
                metrics_host = settings.metrics_listen.rsplit(":", 1)[0]
                print(
                    f"coffer: metrics on http://{metrics_host}:{server.metrics_port}/metrics",
                    flush=True,
                )
            host = arguments.listen.rsplit(":", 1)[0]
            line = workers.serving_line(
                f"{host}:{server.port}",
                _security(server),
                description,
                events=settings.events,
                access_mode=await _access_mode(server),
                workers=1,
            )
            print(line, flush=True)
        await stopping.wait()
        if worker is None:
            print("coffer: shutting down", flush=True)
        if reloads is not None:
            reloads.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reloads
        await server.stop()
    if worker is None:
        print("coffer: stopped", flush=True)
    return 0


def _worker(value: str) -> Worker:
    """`--worker K/N@ID`, as the supervisor passes it."""
    worker = Worker.parse(value)
    if worker is None:
        raise argparse.ArgumentTypeError(f"must be K/N@ID, worker K of N, not {value!r}")
    return worker


def _security(server: Server) -> str:
    """How the ready line says the server is reached."""
    if server.tls is None:
        return ""
    if server.tls.client_certificates_required:
        return " over TLS with client certificates required (mTLS; SIGHUP reloads the files)"
    return " over TLS (SIGHUP reloads the files)"


async def _access_mode(server: Server) -> str:
    """How the ready line says calls are let in."""
    if await server.gate.open():
        return (
            "open: no credential yet, every call is the local administrator's until the first "
            "is made (coffer keys create --role admin --name NAME)"
        )
    if server.gate.open_allowed or await server.gate.access.credentials_exist():
        return "authentication required"
    return (
        "authentication required, and no credential exists yet: make the first administrator's "
        "key with `coffer keys create --role admin --name NAME` where the database is reachable"
    )


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


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


_key_header = ["ID", "ROLE", "NAME", "OWNER", "CREATED", "EXPIRES", "REVOKED"]
_mapping_header = ["SUBJECT", "ROLE", "NAME", "OWNER", "MAPPED"]


def _key_row(key: ApiKey) -> list[str]:
    return [
        str(key.id),
        key.role.name,
        key.name,
        key.owner_id or "-",
        _when(key.created_at),
        _when(key.expires_at),
        _when(key.revoked_at),
    ]


def _mapping_row(mapping: CertificateMapping) -> list[str]:
    return [
        mapping.subject,
        mapping.role.name,
        mapping.name,
        mapping.owner_id or "-",
        _when(mapping.created_at),
    ]


async def _access(arguments: argparse.Namespace) -> int:
    """`coffer keys …` and `coffer certificates …`, against the database (migrated first)."""
    async with _database(arguments) as (database_url, _):
        connection = await asyncpg.connect(database_url)
        try:
            await apply_migrations(connection)
        finally:
            await connection.close()
        pool = await create_pool(database_url, size_max=1)
        try:
            lines = await _access_command(Access(pool), arguments)
        finally:
            await pool.close()
    for line in lines:
        print(line)
    return 0


async def _access_command(access: Access, arguments: argparse.Namespace) -> list[str]:
    command = (arguments.command, arguments.access_command)
    if command == ("keys", "create"):
        token, key = await access.create_key(
            name=arguments.name,
            role=Role[arguments.role],
            owner_id=arguments.owner or None,
            expires_at=arguments.expires_at,
            created_by=made_by_command,
            actor=made_by_command,
        )
        return [token, *_table(_key_header, [_key_row(key)])]
    if command == ("keys", "list"):
        rows: list[list[str]] = []
        after_id = 0
        while True:
            page = await access.list_keys(after_id=after_id)
            rows.extend(_key_row(key) for key in page.items)
            if page.cursor is None:
                return _table(_key_header, rows)
            after_id = page.cursor
    if command == ("keys", "revoke"):
        return _table(
            _key_header, [_key_row(await access.revoke_key(arguments.key, actor=made_by_command))]
        )
    if command == ("certificates", "map"):
        mapping = await access.map_certificate(
            subject=arguments.subject,
            name=arguments.name,
            role=Role[arguments.role],
            owner_id=arguments.owner or None,
            created_by=made_by_command,
            actor=made_by_command,
        )
        return _table(_mapping_header, [_mapping_row(mapping)])
    if command == ("certificates", "unmap"):
        mapping = await access.unmap_certificate(arguments.subject, actor=made_by_command)
        return _table(_mapping_header, [_mapping_row(mapping)])
    assert command == ("certificates", "list"), command
    rows = []
    after_id = 0
    while True:
        mappings, cursor = await access.list_certificates(after_id=after_id)
        rows.extend(_mapping_row(mapping) for mapping in mappings)
        if cursor is None:
            return _table(_mapping_header, rows)
        after_id = cursor
