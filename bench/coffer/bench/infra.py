"""What `coffer bench` runs around its load: the database, the server and its workers, pgbench,
the preload of stored transfers, and the check of the books afterwards.

The benchmark reads and writes the ledger only through the public API (the typed client, in
`load`) and the core's documented entry points: `coffer.core.preload` for the history it
preloads, `coffer.core.audit` for the check of the books. pgbench's scratch database is its
own.

    async with bench_database(None) as database:          # a durable embedded cluster
        async with await BenchServer.start(database.dsn, workers=2, ...) as server:
            ...                                           # server.target, server.pid
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
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self

import asyncpg

from coffer.core import audit
from coffer.core.access import Access
from coffer.core.model import Role
from coffer.core.preload import Keyed, preload_transfers
from coffer.core.store.connections import create_pool
from coffer.postgres.supervisor import (
    CONNECTIONS_MAX_DEFAULT,
    EmbeddedPostgres,
    EmbeddedPostgresError,
    find_bin_dir,
)

from .measure import process_tree
from .report import workers_phrase

__all__ = [
    "BenchDatabase",
    "BenchServer",
    "Note",
    "RssSampler",
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
async def bench_database(
    database_url: str | None, note: Note, *, connections_max: int | None = None
) -> AsyncIterator[BenchDatabase]:
    """The given database, or a durable embedded cluster in a temporary directory, stopped and
    deleted afterwards, taking at least `connections_max` connections (None: its default)."""
    if database_url:
        yield BenchDatabase(database_url, None, "DATABASE_URL")
        return
    directory = Path(tempfile.mkdtemp(prefix="coffer-bench-"))
    # As root the cluster runs as a system user, which must get through this directory.
    directory.chmod(0o711)
    try:
        cluster = EmbeddedPostgres(
            directory / "postgres",
            durable=True,
            connections_max=connections_max or CONNECTIONS_MAX_DEFAULT,
        )
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
class BenchServer:
    """One `coffer serve` on a free port: with --workers N > 1, a supervisor (`pid`) and N
    worker processes below it."""

    target: str
    workers: int
    log_path: Path
    # Its stderr, and its stdout once it serves.
    log: BinaryIO
    process: asyncio.subprocess.Process | None = None
    drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @classmethod
    async def start(
        cls,
        dsn: str,
        *,
        workers: int,
        server_arguments: Sequence[str],
        log_dir: Path,
        note: Note,
    ) -> BenchServer:
        log_path = log_dir / "server.log"
        server = cls(f"127.0.0.1:{_free_port()}", workers, log_path, log_path.open("wb"))
        command = [
            *coffer_command(),
            "serve",
            "--listen",
            server.target,
            "--database-url",
            dsn,
            "--log-level",
            "warning",
            "--workers",
            str(workers),
            *server_arguments,
        ]
        try:
            await server._start(command)
        except BaseException:
            await server.stop()
            raise
        note(f"coffer serve with {workers_phrase(workers)} serving on {server.target}")
        return server

    async def _start(self, command: list[str]) -> None:
        self.process = process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log,
        )
        assert process.stdout is not None
        deadline = time.monotonic() + server_start_timeout_s
        while True:
            remaining = deadline - time.monotonic()
            try:
                line = await asyncio.wait_for(process.stdout.readline(), max(remaining, 0.01))
            except TimeoutError:
                raise RuntimeError(
                    f"the server did not start within {server_start_timeout_s:.0f} s:\n"
                    + _tail(self.log_path)
                ) from None
            if not line:
                await process.wait()
                raise RuntimeError(
                    f"the server exited with code {process.returncode} before serving:\n"
                    + _tail(self.log_path)
                )
            self.log.write(line)
            if b"serving on" in line:
                break
        self.drain = asyncio.create_task(_drain(process.stdout, self.log))

    def exited(self) -> list[str]:
        """The server, if it stopped on its own, with the end of its log; and its workers
        that did (their supervisor starts them again, and logs it)."""
        if self.process is None:
            return []
        if self.process.returncode is not None:
            return [
                f"server pid {self.process.pid} exited with code {self.process.returncode}:\n"
                + _tail(self.log_path)
            ]
        try:
            log = self.log_path.read_bytes().decode(errors="replace")
        except OSError:
            return []
        return [line for line in log.splitlines() if "starting it again" in line]

    async def stop(self) -> None:
        """SIGTERM, then wait (the supervisor stops its workers); SIGKILL if it does not stop
        in time."""
        process, self.process = self.process, None
        if process is not None:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(process.wait(), server_stop_timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            if self.drain is not None:
                with contextlib.suppress(Exception):
                    await self.drain
        self.log.close()

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
    """Samples every half second, while running, the VmRSS of some processes and of every
    process below them: their sum (`mb_max`, the largest sum) and the largest of one
    (`mb_max_per_process`)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._pids = list(pids)
        self.mb_max: float | None = None
        self.mb_max_per_process: float | None = None
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
            each = [(_rss_kb(pid) or 0) / 1024 for pid in process_tree(self._pids)]
            total, largest = sum(each), max(each, default=0.0)
            self.samples.append((round(time.monotonic() - self._started, 1), round(total, 1)))
            self.mb_max = total if self.mb_max is None else max(self.mb_max, total)
            self.mb_max_per_process = (
                largest
                if self.mb_max_per_process is None
                else max(self.mb_max_per_process, largest)
            )
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
    """Stores `count` transfers among the wallets with the core's bulk preload, each keyed as a
    request is (so that the index of keys grows as the journal does); returns the seconds it
    took."""
    started = time.monotonic()

    def progress(done: int) -> None:
        note(f"preload: {done:,} / {count:,} transfers ({time.monotonic() - started:.0f} s)")

    connection = await asyncpg.connect(dsn)
    try:
        await preload_transfers(
            connection,
            wallet_ids,
            count,
            performed_by=preload_performed_by,
            # Keys of their own, apart from any earlier preload's in the same database.
            keyed=Keyed(caller=preload_performed_by, prefix=f"{uuid.uuid4().hex[:12]}-"),
            progress=progress,
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
