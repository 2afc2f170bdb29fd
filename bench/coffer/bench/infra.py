"""What `coffer bench` runs around its load: the database, the server processes, pgbench, the
preload of stored transfers, and the check of the books afterwards.

The benchmark reads and writes the ledger only through the public API (the typed client, in
`load`) and the core's documented entry points: `coffer.core.preload` for the history it
preloads, `coffer.core.audit` for the check of the books. pgbench's scratch database is its
own.

    async with bench_database(None) as database:          # a durable embedded cluster
        async with ServerGroup.start(database.dsn, count=1, server_arguments=[]) as servers:
            ...                                           # servers.target, servers.pids
        books = await check_books(database.dsn)           # books.passed, books.summary()
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

import asyncpg

from coffer.core import audit
from coffer.core.access import Access
from coffer.core.model import Role
from coffer.core.preload import preload_transfers
from coffer.core.store.connections import create_pool
from coffer.postgres.supervisor import EmbeddedPostgres, EmbeddedPostgresError, find_bin_dir

__all__ = [
    "BenchDatabase",
    "Note",
    "RssSampler",
    "ServerGroup",
    "bench_database",
    "bench_key_name",
    "check_books",
    "checkpoint",
    "coffer_command",
    "make_api_key",
    "postmaster_pid",
    "preload",
    "run_pgbench",
]

server_start_timeout_s = 120.0
server_stop_timeout_s = 30.0
log_tail_bytes_max = 4000
rss_sample_interval_s = 0.5
pgbench_scale = 10
pgbench_clients = 32
pgbench_threads = 2
pgbench_database = "pgbench_scratch"
pgbench_init_timeout_s = 600.0
# The name of the key the bench makes, and what its record says made it.
bench_key_name = "bench"
# Who the preloaded transfers say performed them.
preload_performed_by = "bench-preload"

Note = Callable[[str], None]


@dataclass
class BenchDatabase:
    dsn: str
    # The embedded cluster the bench started, or None for a --database-url.
    cluster: EmbeddedPostgres | None
    description: str


@contextlib.asynccontextmanager
async def bench_database(database_url: str | None, note: Note) -> AsyncIterator[BenchDatabase]:
    """The given database, or a durable embedded cluster in a temporary directory, stopped and
    deleted afterwards."""
    if database_url:
        yield BenchDatabase(database_url, None, "DATABASE_URL")
        return
    directory = Path(tempfile.mkdtemp(prefix="coffer-bench-"))
    # As root the cluster runs as a system user, which must get through this directory.
    directory.chmod(0o711)
    try:
        cluster = EmbeddedPostgres(directory / "postgres", durable=True)
        note(f"starting a durable embedded PostgreSQL in {cluster.data_dir}")
        dsn = await asyncio.to_thread(cluster.start)
        try:
            yield BenchDatabase(dsn, cluster, f"embedded PostgreSQL in {cluster.data_dir}")
        finally:
            await asyncio.to_thread(cluster.stop)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def make_api_key(dsn: str) -> str:
    """An administrator's key, made in the database as `coffer keys create` makes one (once
    the server has migrated it): the bench's calls carry it, as an integrator's would."""
    pool = await create_pool(dsn, size_max=1)
    try:
        key, _ = await Access(pool).create_key(
            name=bench_key_name, role=Role.admin, created_by=bench_key_name, actor=bench_key_name
        )
    finally:
        await pool.close()
    return key


def coffer_command() -> list[str]:
    """How to run `coffer`: the script beside this Python, else on PATH, else the module."""
    beside = Path(sys.executable).parent / "coffer"
    if os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("coffer")
    if found:
        return [found]
    return [
        sys.executable,
        "-c",
        "import sys; from coffer.server.cli import main; sys.exit(main())",
    ]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class _ServerProcess:
    process: asyncio.subprocess.Process
    log_path: Path
    # Its stderr, and its stdout once it serves.
    log: BinaryIO
    drain: asyncio.Task[None] | None = None


@dataclass
class ServerGroup:
    """`count` server processes on one port (SO_REUSEPORT when more than one)."""

    target: str
    processes: list[_ServerProcess] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [server.process.pid for server in self.processes]

    @classmethod
    async def start(
        cls,
        dsn: str,
        *,
        count: int,
        server_arguments: Sequence[str],
        log_dir: Path,
        note: Note,
    ) -> ServerGroup:
        port = _free_port()
        group = cls(f"127.0.0.1:{port}")
        command = [
            *coffer_command(),
            "serve",
            "--listen",
            group.target,
            "--database-url",
            dsn,
            "--log-level",
            "warning",
        ]
        if count > 1:
            command.append("--reuse-port")
        command.extend(server_arguments)
        try:
            for number in range(count):
                await group._start_one(command, log_dir / f"server-{number + 1}.log")
        except BaseException:
            await group.stop()
            raise
        note(f"{count} server process{'es' if count > 1 else ''} serving on {group.target}")
        return group

    async def _start_one(self, command: list[str], log_path: Path) -> None:
        log = log_path.open("wb")
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
        )
        server = _ServerProcess(process, log_path, log)
        self.processes.append(server)
        assert process.stdout is not None
        deadline = time.monotonic() + server_start_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(process.stdout.readline(), max(remaining, 0.01))
            except TimeoutError:
                raise RuntimeError(
                    f"the server did not start within {server_start_timeout_s:.0f} s:\n"
                    + _tail(log_path)
                ) from None
            if not line:
                await process.wait()
                raise RuntimeError(
                    f"the server exited with code {process.returncode} before serving:\n"
                    + _tail(log_path)
                )
            log.write(line)
            if b"serving on" in line:
                break
        server.drain = asyncio.create_task(_drain(process.stdout, log))

    def exited(self) -> list[str]:
        """The servers that stopped on their own, with the end of their logs."""
        return [
            f"server pid {server.process.pid} exited with code {server.process.returncode}:\n"
            + _tail(server.log_path)
            for server in self.processes
            if server.process.returncode is not None
        ]

    async def stop(self) -> None:
        """SIGTERM to each, then wait; SIGKILL those that do not stop in time."""
        for server in self.processes:
            if server.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    server.process.send_signal(signal.SIGTERM)
        for server in self.processes:
            try:
                await asyncio.wait_for(server.process.wait(), server_stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    server.process.kill()
                await server.process.wait()
            if server.drain is not None:
                with contextlib.suppress(Exception):
                    await server.drain
            server.log.close()
        self.processes.clear()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()


async def _drain(stream: asyncio.StreamReader, log: BinaryIO) -> None:
    while line := await stream.readline():
        log.write(line)


def _tail(path: Path) -> str:
    try:
        data = path.read_bytes()[-log_tail_bytes_max:]
    except OSError as error:
        return f"(no log: {error})"
    return data.decode(errors="replace")


class RssSampler:
    """Samples the summed VmRSS of some processes every half second, while running."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._pids = list(pids)
        self.mb_max: float | None = None
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0

    def start(self) -> None:
        if self._pids:
            self._started = time.monotonic()
            self._task = asyncio.create_task(self._sample())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sample(self) -> None:
        while True:
            total = sum(_rss_kb(pid) or 0 for pid in self._pids) / 1024
            self.samples.append((round(time.monotonic() - self._started, 1), round(total, 1)))
            self.mb_max = total if self.mb_max is None else max(self.mb_max, total)
            await asyncio.sleep(rss_sample_interval_s)


def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def postmaster_pid(cluster: EmbeddedPostgres | None) -> int | None:
    """The embedded cluster's postmaster, from its postmaster.pid."""
    if cluster is None:
        return None
    try:
        first = (cluster.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
    except OSError:
        return None
    return int(first) if first.strip().isdigit() else None


# pgbench ---------------------------------------------------------------------------------------


def _find_pgbench(cluster: EmbeddedPostgres | None) -> Path | None:
    candidates = []
    if cluster is not None:
        candidates.append(cluster.bin_dir / "pgbench")
    with contextlib.suppress(EmbeddedPostgresError):
        candidates.append(find_bin_dir() / "pgbench")
    on_path = shutil.which("pgbench")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _dsn_with_database(dsn: str, database: str) -> str:
    """The same server (host, socket, user, options), another database."""
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + urllib.parse.quote(database)))


async def run_pgbench(database: BenchDatabase, duration_s: float, note: Note) -> dict[str, object]:
    """PostgreSQL's own tpcb-like benchmark on a scratch database of the same cluster."""
    pgbench = _find_pgbench(database.cluster)
    if pgbench is None:
        return {"tps": None, "note": "skipped: no pgbench binary found (PATH or COFFER_PG_BIN)"}
    administration = await asyncpg.connect(database.dsn)
    try:
        await administration.execute(f"drop database if exists {pgbench_database} with (force)")
        await administration.execute(f"create database {pgbench_database}")
    finally:
        await administration.close()
    scratch = _dsn_with_database(database.dsn, pgbench_database)
    try:
        note(f"pgbench: initializing scale {pgbench_scale} in {pgbench_database}")
        await _run_command(
            [str(pgbench), "-i", "-q", "-s", str(pgbench_scale), scratch], pgbench_init_timeout_s
        )
        note(f"pgbench: tpcb-like, {pgbench_clients} clients, {duration_s:g} s")
        output = await _run_command(
            [
                str(pgbench),
                "-c",
                str(pgbench_clients),
                "-j",
                str(pgbench_threads),
                "-T",
                str(max(1, round(duration_s))),
                "-M",
                "prepared",
                scratch,
            ],
            duration_s + 120,
        )
    finally:
        administration = await asyncpg.connect(database.dsn)
        try:
            await administration.execute(f"drop database if exists {pgbench_database} with (force)")
        finally:
            await administration.close()
    tps = re.search(r"^tps = ([\d.]+)", output, re.MULTILINE)
    latency = re.search(r"^latency average = ([\d.]+) ms", output, re.MULTILINE)
    return {
        "tps": float(tps[1]) if tps else None,
        "latency_ms_average": float(latency[1]) if latency else None,
        "clients": pgbench_clients,
        "scale": pgbench_scale,
        "binary": str(pgbench),
        "note": "" if tps else "pgbench printed no tps:\n" + output[-log_tail_bytes_max:],
    }


async def _run_command(arguments: list[str], timeout_s: float) -> str:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("PG")}
    process = await asyncio.create_subprocess_exec(
        *arguments,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=environment,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise
    text = output.decode(errors="replace")
    if process.returncode != 0:
        raise RuntimeError(
            f"{Path(arguments[0]).name} exited with code {process.returncode}:\n"
            f"{text[-log_tail_bytes_max:]}"
        )
    return text


# The ledger's history and books, through the core ------------------------------------------


async def preload(dsn: str, wallet_ids: Sequence[int], count: int, note: Note) -> float:
    """Stores `count` transfers among the wallets with the core's bulk preload; returns the
    seconds it took."""
    started = time.monotonic()

    def progress(done: int) -> None:
        note(f"preload: {done:,} / {count:,} transfers ({time.monotonic() - started:.0f} s)")

    connection = await asyncpg.connect(dsn)
    try:
        await preload_transfers(
            connection, wallet_ids, count, performed_by=preload_performed_by, progress=progress
        )
    finally:
        await connection.close()
    return time.monotonic() - started


async def checkpoint(dsn: str) -> None:
    """A checkpoint before the timed part, so that the setup's writes are not flushed during
    it; skipped where the role may not."""
    connection = await asyncpg.connect(dsn)
    try:
        with contextlib.suppress(asyncpg.InsufficientPrivilegeError):
            await connection.execute("checkpoint")
    finally:
        await connection.close()


async def check_books(dsn: str) -> audit.Audit:
    """The core's check of the books, on a connection of its own."""
    connection = await asyncpg.connect(dsn)
    try:
        return await audit.check_books(connection)
    finally:
        await connection.close()
