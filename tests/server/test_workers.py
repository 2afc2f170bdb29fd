"""`coffer serve --workers N`: a supervisor and N worker processes on one port, as a user runs
it: one ready line, calls over several connections reaching every worker, idempotent replays
across them, a killed worker started again (within a budget of restarts), a worker that cannot
start failing the start, and SIGTERM stopping every process, the embedded PostgreSQL's too."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import timedelta
from pathlib import Path

import asyncpg
import grpc
import pytest
from grpc_health.v1 import health_pb2

from coffer.clients import Client
from coffer.clients import client as client_module
from coffer.clients.workers import Worker, worker_metadata_key
from coffer.postgres.supervisor import CONNECTIONS_MAX_DEFAULT, EmbeddedPostgres
from coffer.server.app import Server, Settings, database_connections_max
from coffer.server.workers import (
    WorkerReady,
    read_ready,
    ready_line_bytes_max,
    reserve_port,
    restart_pause_s,
    restarts_max,
    worker_ready_prefix,
)

from support.metrics import scrape, value
from support.ports import children, free_ports, gone
from support.processes import served_address

coffer = str(Path(sys.executable).parent / "coffer")
ready_timeout_s = 120.0
# Enough connections that the kernel's choice of worker for each leaves none without one
# (all 16 on one of two workers: one chance in 32,768).
connections = 16


class Serving:
    """A `coffer serve` process, everything it prints (stdout and the log) read as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reading = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stdout is not None
        async for line in self.process.stdout:
            self.lines.append(line.decode())
            self._changed.set()
        self._changed.set()

    async def line(self, predicate: Callable[[str], bool], timeout_s: float = 60.0) -> str:
        """The first line printed that satisfies `predicate`, waiting for it."""
        async with asyncio.timeout(timeout_s):
            while True:
                found = [line for line in self.lines if predicate(line)]
                if found:
                    return found[0]
                assert not self._reading.done(), "coffer serve exited:\n" + "".join(self.lines)
                self._changed.clear()
                await self._changed.wait()

    async def count(self, text: str, expected: int, timeout_s: float = 60.0) -> None:
        """Waits until `expected` lines hold `text`."""
        async with asyncio.timeout(timeout_s):
            while sum(text in line for line in self.lines) < expected:
                assert not self._reading.done(), "coffer serve exited:\n" + "".join(self.lines)
                self._changed.clear()
                await self._changed.wait()

    @property
    def ready(self) -> str:
        return next(line for line in self.lines if "serving on" in line)

    @property
    def target(self) -> str:
        return served_address(self.ready)

    async def exited(self, timeout_s: float = 60.0) -> int:
        """Its exit status, once it has exited and said everything."""
        async with asyncio.timeout(timeout_s):
            status = await self.process.wait()
            await self._reading
        return status

    async def stop(self) -> None:
        """SIGTERM: it stops its workers and exits with 0."""
        self.process.send_signal(signal.SIGTERM)
        assert await self.exited() == 0, "".join(self.lines)


@asynccontextmanager
async def serving(*arguments: str, environment: dict[str, str]) -> AsyncIterator[Serving]:
    """`coffer serve` with these arguments, once it says it serves; killed at the end if the
    test has not stopped it, with its workers."""
    process = await asyncio.create_subprocess_exec(
        coffer,
        "serve",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **environment},
    )
    running = Serving(process)
    try:
        await running.line(lambda line: "serving on" in line, ready_timeout_s)
        yield running
    finally:
        if process.returncode is None:
            workers = children(process.pid)
            process.kill()
            await process.wait()
            for pid in workers:
                os.kill(pid, signal.SIGKILL)


def two_workers(database_url: str, metrics_port: int) -> AbstractAsyncContextManager[Serving]:
    """`coffer serve --workers 2` on `database_url`, worker K's metrics on metrics_port + K - 1."""
    return serving(
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        environment={"DATABASE_URL": database_url},
    )


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path, which is private (0700): as root the embedded cluster runs as a
    # system user, which must get through the directories above its data.
    directory = Path(tempfile.mkdtemp(prefix="coffer-workers-test-"))
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def answered(port: int, service: str, method: str) -> float:
    """The calls of `method` answered OK, as the metrics on `port` count them."""
    samples = await scrape(port)
    return value(samples, "coffer_rpcs_total", service=service, method=method, code="OK")


async def credits_counted(metrics_ports: list[int]) -> list[float]:
    """The Credit calls answered OK, as each worker's metrics count them."""
    return [await answered(port, "coffer.v1.TransferService", "Credit") for port in metrics_ports]


async def test_workers_share_one_port_and_a_replay_applies_once_across_them(
    database_url: str,
) -> None:
    metrics_port = free_ports(2)
    async with two_workers(database_url, metrics_port) as server:
        # One ready line, on the port chosen for all, after a metrics line for each worker.
        assert sum("serving on" in line for line in server.lines) == 1, server.lines
        assert "(DATABASE_URL, 2 workers); open: " in server.ready, server.ready
        assert not server.target.endswith(":0")
        metrics_lines = [line for line in server.lines if "metrics on" in line]
        assert metrics_lines == [
            f"coffer: metrics on http://127.0.0.1:{metrics_port}/metrics (worker 1)\n",
            f"coffer: metrics on http://127.0.0.1:{metrics_port + 1}/metrics (worker 2)\n",
        ]
        workers = children(server.process.pid)
        assert len(workers) == 2, workers

        # The same credit, with one key, over every connection: applied once, by whichever
        # worker came first; every other worker answers with the same transfer.
        async with Client(server.target, caller="tests", connections=connections) as client:
            await client.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
            wallet = await client.create_wallet(owner_id="c-1", owner_kind="customer", unit="EUR")
            answers = await asyncio.gather(
                *(
                    client.credit(wallet_id=wallet.id, amount=150, idempotency_key="order-1")
                    for _ in range(connections)
                )
            )
            assert len({answer.id for answer in answers}) == 1
            balance = await client.get_balance(wallet_id=wallet.id)
            assert balance.balance.posted == 150
        counted = await credits_counted([metrics_port, metrics_port + 1])
        assert sum(counted) == connections and min(counted) > 0, counted
        await server.stop()
    assert server.lines[-2:] == ["coffer: shutting down\n", "coffer: stopped\n"], server.lines
    assert all(gone(pid) for pid in workers)


async def health_worker(target: str) -> Worker:
    """The worker a health check over a connection of its own names."""
    async with grpc.aio.insecure_channel(
        target, options=[("grpc.use_local_subchannel_pool", 1)]
    ) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        call = check(health_pb2.HealthCheckRequest())
        assert (await call).status == health_pb2.HealthCheckResponse.SERVING
        worker = Worker.parse(dict(await call.trailing_metadata())[worker_metadata_key])
        assert worker is not None
        return worker


async def answered_by_each(
    metrics_port: int, calls: Callable[[], Awaitable[object]], method: str = "Credit"
) -> list[int]:
    """The calls of `method` (of TransferService, or else WalletService) each of two workers
    answered while `calls` ran."""
    ports = [metrics_port, metrics_port + 1]
    service = "coffer.v1.TransferService" if method == "Credit" else "coffer.v1.WalletService"
    before = [await answered(port, service, method) for port in ports]
    await calls()
    after = [await answered(port, service, method) for port in ports]
    return [int(late - early) for early, late in zip(before, after, strict=True)]


async def test_a_client_spreads_its_connections_over_the_workers(
    database_url: str,
) -> None:
    """Each worker's health check says which it is (a server alone: 1/1). A client of two
    connections finds one on each worker, whatever the kernel chose first (and again once
    closed and used again); its calls, one at a time, take them in turn; and while a call is
    held on one worker, the others go to the other."""
    metrics_port = free_ports(2)
    async with two_workers(database_url, metrics_port) as server:
        said = [await health_worker(server.target) for _ in range(16)]
        assert {worker.number for worker in said} == {1, 2}, said
        assert {(worker.count, worker.instance) for worker in said} == {(2, said[0].instance)}
        async with Client(server.target, caller="tests") as setup:
            await setup.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
            held, other = [
                (await setup.create_wallet(owner_id=f"c-{n}", owner_kind="customer", unit="EUR")).id
                for n in range(2)
            ]

        async def ten(client: Client) -> None:
            for _ in range(10):
                await client.credit(wallet_id=other, amount=1)

        async def balances(client: Client) -> None:
            for _ in range(10):
                await client.get_balance(wallet_id=other)

        for _ in range(3):
            client = Client(server.target, caller="tests", connections=2)
            try:
                calls = functools.partial(ten, client)
                assert await answered_by_each(metrics_port, calls) == [5, 5]
                await client.close()
                assert await answered_by_each(metrics_port, calls) == [5, 5]
            finally:
                await client.close()

        # A credit held on its worker (its wallet's row locked here): the calls meanwhile (reads,
        # which take no lock) take the other.
        async with Client(server.target, caller="tests", connections=2) as client:
            await client.health()
            database = await asyncpg.connect(database_url)
            try:
                locking = database.transaction()
                await locking.start()
                await database.execute("select 1 from wallets where id = $1 for update", held)
                blocked = asyncio.create_task(client.credit(wallet_id=held, amount=1))

                async def meanwhile() -> None:
                    async with asyncio.timeout(30):
                        while not await database.fetchval(
                            "select count(*) from pg_locks where not granted"
                        ):
                            await asyncio.sleep(0.01)
                    read = await answered_by_each(
                        metrics_port, functools.partial(balances, client), "GetBalance"
                    )
                    assert sorted(read) == [0, 10], read
                    await locking.rollback()
                    await blocked

                assert sorted(await answered_by_each(metrics_port, meanwhile)) == [0, 1]
            finally:
                await database.close()
        await server.stop()
    async with serving(
        "--listen", "127.0.0.1:0", "--workers", "1", environment={"DATABASE_URL": database_url}
    ) as alone:
        worker = await health_worker(alone.target)
        assert (worker.number, worker.count) == (1, 1)
        await alone.stop()


async def test_a_client_reaches_a_restarted_worker_again(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's connections to a worker that was killed reconnect to the other; once the
    supervisor has started it again, the client's next spread (sooner than the 30 s it waits
    outside tests) finds it, and the calls go to both again."""
    monkeypatch.setattr(client_module, "spread_recheck_s", 0.2)
    monkeypatch.setattr(client_module, "spread_retry_s_min", 0.1)
    monkeypatch.setattr(client_module, "spread_retry_s_max", 0.5)
    metrics_port = free_ports(2)
    async with two_workers(database_url, metrics_port) as server:
        async with Client(server.target, caller="tests", connections=2) as client:
            await client.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
            wallet = await client.create_wallet(owner_id="c-1", owner_kind="customer", unit="EUR")

            async def ten() -> None:
                for _ in range(10):
                    await client.get_balance(wallet_id=wallet.id)

            assert await answered_by_each(metrics_port, ten, "GetBalance") == [5, 5]
            os.kill(children(server.process.pid)[1], signal.SIGKILL)
            await server.line(lambda line: "serves again" in line)
            async with asyncio.timeout(30):
                while await answered_by_each(metrics_port, ten, "GetBalance") != [5, 5]:
                    await asyncio.sleep(0.1)
        await server.stop()


async def test_a_killed_worker_is_started_again_within_a_budget(database_url: str) -> None:
    async with serving(
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--metrics-listen",
        "127.0.0.1:0",
        environment={"DATABASE_URL": database_url},
    ) as server:
        first, second = children(server.process.pid)
        os.kill(second, signal.SIGKILL)
        said = await server.line(lambda line: "serves again" in line)
        assert "worker" in said and f"(pid {second})" not in said, said
        pause_s = restart_pause_s(0)
        assert f"exited with signal SIGKILL; starting it again in {pause_s:g} s" in said_all(server)
        assert first in children(server.process.pid) and second not in children(server.process.pid)
        async with Client(server.target, caller="tests", connections=connections) as client:
            await client.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
            wallet = await client.create_wallet(owner_id="c-1", owner_kind="customer", unit="EUR")
            for number in range(connections):
                await client.credit(wallet_id=wallet.id, amount=1, idempotency_key=f"k-{number}")
            assert (await client.get_balance(wallet_id=wallet.id)).balance.posted == connections

        # Past the budget (restarts_max restarts within the window, all workers together),
        # the supervisor stops every worker and exits with 1.
        for restarted in range(2, restarts_max + 1):
            os.kill(children(server.process.pid)[0], signal.SIGKILL)
            await server.count("serves again", restarted)
        workers = children(server.process.pid)
        os.kill(workers[0], signal.SIGKILL)
        assert await server.exited() == 1
    log = "".join(server.lines)
    assert f"after {restarts_max} restarts of workers within 60 s: stopping every worker" in log
    assert all(gone(pid) for pid in workers)


def said_all(server: Serving) -> str:
    return "".join(server.lines)


# A sitecustomize that makes every worker fail at its start (status 3) once FAIL_FILE exists.
_failing_workers = """
import os, sys
if "--worker" in sys.argv and os.path.exists(os.environ["FAIL_FILE"]):
    os._exit(3)
"""


async def test_each_failed_restart_counts_once_and_waits(database_url: str, tmp_path: Path) -> None:
    """A worker that exits and then fails every attempt to start it again: each attempt
    counted once against the budget, after a pause that grows; past the budget the supervisor
    stops every worker and exits with 1."""
    (tmp_path / "sitecustomize.py").write_text(_failing_workers)
    fail = tmp_path / "fail"
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    environment = {"DATABASE_URL": database_url, "PYTHONPATH": path, "FAIL_FILE": str(fail)}
    async with serving(
        "--listen", "127.0.0.1:0", "--workers", "2", environment=environment
    ) as server:
        fail.touch()
        first, second = children(server.process.pid)
        os.kill(second, signal.SIGKILL)
        assert await server.exited() == 1
    log = said_all(server)
    assert f"worker 2 (pid {second}) exited with signal SIGKILL; starting it again in 0.1 s" in log
    for attempt in range(1, restarts_max):
        pause_s = restart_pause_s(attempt)
        said = f"worker 2 did not start again (status 3); starting it again in {pause_s:g} s"
        assert log.count(said) == 1, log
    assert log.count("starting it again") == restarts_max, log
    said = f"worker 2 did not start again (status 3), after {restarts_max} attempts in a row"
    assert said in log, log
    assert gone(first)


async def test_sigterm_stops_every_worker_and_the_embedded_postgres(data_dir: Path) -> None:
    """The embedded PostgreSQL, started once by the supervisor, takes every worker's
    connections (here more than its default); SIGTERM stops it after the workers."""
    async with serving(
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        "--pool-size-read",
        "100",
        environment={"COFFER_DATA_DIR": str(data_dir), "DATABASE_URL": ""},
    ) as server:
        assert f"(embedded PostgreSQL in {data_dir / 'postgres'}, 2 workers)" in server.ready
        cluster = EmbeddedPostgres(data_dir / "postgres")
        dsn = cluster.running_dsn()
        assert dsn is not None
        connection = await asyncpg.connect(dsn)
        try:
            taken = int(await connection.fetchval("show max_connections"))
        finally:
            await connection.close()
        per_worker = database_connections_max(Settings(database_url="", pool_size_read=100))
        assert taken >= 2 * per_worker > CONNECTIONS_MAX_DEFAULT
        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        backends = children(postmaster)
        workers = children(server.process.pid)
        assert len(workers) == 2 and backends
        async with Client(server.target, caller="tests", connections=connections) as client:
            assert await client.health() == "SERVING"
        await server.stop()
    assert all(gone(pid) for pid in [*workers, postmaster, *backends])


async def test_sighup_without_tls_stops_the_supervisor_as_sigterm_does(
    database_url: str,
) -> None:
    async with serving(
        "--listen", "127.0.0.1:0", "--workers", "2", environment={"DATABASE_URL": database_url}
    ) as server:
        workers = children(server.process.pid)
        server.process.send_signal(signal.SIGHUP)
        assert await server.exited() == 0, server.lines
    said = [line for line in server.lines if line.startswith("coffer: ")]
    assert said[-2:] == ["coffer: shutting down\n", "coffer: stopped\n"], server.lines
    assert all(gone(pid) for pid in workers)


async def test_workers_stop_when_their_supervisor_is_killed(database_url: str) -> None:
    """SIGKILL leaves the supervisor no word to say: its workers see their standard input end,
    and stop by themselves."""
    async with serving(
        "--listen", "127.0.0.1:0", "--workers", "2", environment={"DATABASE_URL": database_url}
    ) as server:
        workers = children(server.process.pid)
        assert len(workers) == 2, workers
        server.process.kill()
        await server.process.wait()
        async with asyncio.timeout(60):
            while not all(gone(pid) for pid in workers):
                await asyncio.sleep(0.05)
        await server.exited()
    assert "the supervisor is gone: stopping" in said_all(server)


# A sitecustomize that holds every worker at its start (its Python started, the server not
# yet), once it has said so with a file in HOLD_DIRECTORY: a supervisor still starting, for
# as long as a test needs.
_hold_workers = """
import os, sys, time
if "--worker" in sys.argv:
    number = sys.argv[sys.argv.index("--worker") + 1].split("/")[0]
    open(os.path.join(os.environ["HOLD_DIRECTORY"], "worker-" + number), "w").close()
    time.sleep(3600)
"""


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_a_stop_asked_while_starting_ends_the_start(
    signal_number: signal.Signals, data_dir: Path
) -> None:
    """SIGTERM, SIGINT, or SIGHUP without TLS, while the workers start: no ready line, every
    worker stopped, the embedded PostgreSQL too, status 0."""
    hold = data_dir / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text(_hold_workers)
    path = os.pathsep.join(filter(None, [str(hold), os.environ.get("PYTHONPATH")]))
    process = await asyncio.create_subprocess_exec(
        coffer,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={
            **os.environ,
            "COFFER_DATA_DIR": str(data_dir),
            "DATABASE_URL": "",
            "PYTHONPATH": path,
            "HOLD_DIRECTORY": str(hold),
        },
    )
    server = Serving(process)
    try:
        async with asyncio.timeout(ready_timeout_s):
            while len(list(hold.glob("worker-*"))) < 2:
                assert process.returncode is None, "".join(server.lines)
                await asyncio.sleep(0.05)
        workers = children(process.pid)
        postmaster = int((data_dir / "postgres" / "postmaster.pid").read_text().split()[0])
        assert len(workers) == 2, workers
        process.send_signal(signal_number)
        assert await server.exited() == 0, server.lines
    finally:
        if process.returncode is None:
            held = children(process.pid)
            process.kill()
            await process.wait()
            for pid in held:
                os.kill(pid, signal.SIGKILL)
    said = [line for line in server.lines if line.startswith("coffer: ")]
    assert said == ["coffer: shutting down\n", "coffer: stopped\n"], server.lines
    assert all(gone(pid) for pid in [*workers, postmaster])


@pytest.mark.parametrize(
    "taken", ["the port", "another supervisor's port", "a worker's metrics port"]
)
async def test_a_port_taken_fails_the_start(taken: str, database_url: str) -> None:
    """A port in use, the gRPC port (refused before anything starts), even one another
    supervisor has reserved while it starts (its workers not yet listening), or the metrics
    port of the second worker (refused by that worker, whose message is in the log): the start
    fails, with the reason, and no process is left."""
    first = free_ports(2)
    if taken == "another supervisor's port":
        holder, _ = reserve_port(f"127.0.0.1:{first + 1}", shared=False)
    else:
        holder = socket.socket()
        holder.bind(("127.0.0.1", first + 1))
        holder.listen()
    with holder:
        if taken != "a worker's metrics port":
            arguments = ["--listen", f"127.0.0.1:{first + 1}"]
            reason = f"coffer: cannot listen on 127.0.0.1:{first + 1}: Address already in use"
        else:
            arguments = ["--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{first}"]
            reason = (
                f"coffer (worker 2): cannot serve metrics on 127.0.0.1:{first + 1}: "
                "Address already in use"
            )
        process = await asyncio.create_subprocess_exec(
            coffer,
            "serve",
            *arguments,
            "--workers",
            "2",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "DATABASE_URL": database_url},
        )
        output, errors = await asyncio.wait_for(process.communicate(), ready_timeout_s)
    assert process.returncode == 1, errors
    assert output == b""
    assert reason in errors.decode(), errors
    if taken == "a worker's metrics port":
        assert "worker 2 did not start (status 1): stopping" in errors.decode(), errors
    assert children(process.pid) == []


async def test_a_server_without_background_jobs_leaves_them_to_another(
    database_url: str,
) -> None:
    """A worker other than the first runs no sweep: a lapsed hold stays unresolved (its money
    is free all the same) until a server with the background jobs sweeps it."""
    settings = Settings(
        database_url=database_url,
        listen="127.0.0.1:0",
        hold_expiry_interval_s=0.1,
        background_jobs=False,
    )
    quiet = await Server.start(settings)
    try:
        async with Client(f"127.0.0.1:{quiet.port}", caller="tests") as client:
            await client.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
            wallet = await client.create_wallet(owner_id="c-1", owner_kind="customer", unit="EUR")
            await client.credit(wallet_id=wallet.id, amount=100)
            placed = await client.place_hold(
                wallet_id=wallet.id, amount=60, timeout=timedelta(seconds=1)
            )
            await asyncio.sleep(1.5)
            hold = await client.get_hold(hold_id=placed.hold.id)
            assert not hold.resolved_by_transfer_id
            assert (await client.get_balance(wallet_id=wallet.id)).balance.available == 100
    finally:
        await quiet.stop()
    sweeping = await Server.start(dataclasses.replace(settings, background_jobs=True))
    try:
        async with Client(f"127.0.0.1:{sweeping.port}", caller="tests") as client:
            async with asyncio.timeout(10):
                while not (await client.get_hold(hold_id=placed.hold.id)).resolved_by_transfer_id:
                    await asyncio.sleep(0.05)
    finally:
        await sweeping.stop()


def stream_of(*chunks: bytes) -> asyncio.StreamReader:
    """A stream that gives these bytes, then ends."""
    stream = asyncio.StreamReader()
    for chunk in chunks:
        stream.feed_data(chunk)
    stream.feed_eof()
    return stream


async def test_the_ready_line_is_found_past_lines_of_any_length_and_malformed_ones() -> None:
    """A worker's output is read in chunks: a line longer than a line's read allows (64 KiB)
    neither ends the reading nor passes for the ready line, even with the words at its end;
    a line that starts like a ready line but is not one is let go."""
    ready = WorkerReady(port=4242, security="", access_mode="open", metrics_port=None)
    long = b"x" * (4 * ready_line_bytes_max)
    prefix = worker_ready_prefix.encode()
    found = await read_ready(
        stream_of(
            long + b"\n",
            prefix + b"{not json\n",
            prefix + b'{"port": "4242"}\n',
            long + prefix + ready.line().encode() + b"\n",
            ready.line().encode() + b"\n",
        )
    )
    assert found == ready
    assert await read_ready(stream_of(long + ready.line().encode() + b"\n")) is None
    assert await read_ready(stream_of(ready.line().encode())) is None
