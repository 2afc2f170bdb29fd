"""`coffer serve` as a user runs it: a process that says when it is ready, answers health
checks, and stops cleanly on SIGTERM and SIGINT — on its own embedded PostgreSQL (kept across
restarts) or on DATABASE_URL."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coffer.clients.caller import caller_metadata_key
from coffer.server.settings import workers_max
from coffer.v1 import transfers_pb2, transfers_pb2_grpc, units_pb2, units_pb2_grpc

from support.metrics import scrape, value
from support.ports import free_ports
from support.processes import serve_beside

coffer = str(Path(sys.executable).parent / "coffer")
ready_timeout_s = 120


@pytest.fixture
def data_dir() -> Iterator[Path]:
    # Not pytest's tmp_path, which is private (0700): as root the embedded cluster runs as a
    # system user, which must get through the directories above its data.
    directory = Path(tempfile.mkdtemp(prefix="coffer-serve-test-"))
    directory.chmod(0o711)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def serve(
    *arguments: str, environment: dict[str, str]
) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        coffer,
        "serve",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **environment},
    )
    assert process.stdout is not None
    seen = []
    async with asyncio.timeout(ready_timeout_s):
        while True:
            line = (await process.stdout.readline()).decode()
            assert line, f"coffer serve exited early: {''.join(seen)}"
            seen.append(line)
            if "serving on" in line:
                return process, line


async def stop(process: asyncio.subprocess.Process, signal_number: int) -> str:
    assert process.stdout is not None
    process.send_signal(signal_number)
    async with asyncio.timeout(60):
        rest = (await process.stdout.read()).decode()
        assert await process.wait() == 0, rest
    return rest


async def health(target: str) -> int:
    async with grpc.aio.insecure_channel(target) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=10
        )
        return response.status


async def test_serve_on_the_embedded_postgres(data_dir: Path) -> None:
    port = free_port()
    target = f"127.0.0.1:{port}"
    # One process, whatever the machine's cores (the supervisor's tests are test_workers').
    environment = {"COFFER_DATA_DIR": str(data_dir), "DATABASE_URL": "", "COFFER_WORKERS": "1"}
    process, ready = await serve("--listen", target, environment=environment)
    try:
        assert f"serving on {target}" in ready and "embedded PostgreSQL" in ready
        assert "workers" not in ready, ready
        assert await health(target) == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(target) as channel:
            await units_pb2_grpc.UnitServiceStub(channel).CreateUnit(
                units_pb2.CreateUnitRequest(code="EUR", kind=1, name="Euro", scale=2),
                metadata=((caller_metadata_key, "tests"),),
            )
    finally:
        rest = await stop(process, signal.SIGTERM)
    assert "stopped" in rest
    # The data stays for the next start.
    process, _ = await serve("--listen", target, environment=environment)
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            listed = await units_pb2_grpc.UnitServiceStub(channel).ListUnits(
                units_pb2.ListUnitsRequest()
            )
        assert [unit.code for unit in listed.units] == ["EUR"]
    finally:
        await stop(process, signal.SIGINT)


async def test_serve_on_database_url(database_url: str) -> None:
    target = f"127.0.0.1:{free_port()}"
    process, ready = await serve(
        "--listen", target, "--workers", "1", environment={"DATABASE_URL": database_url}
    )
    try:
        assert "DATABASE_URL" in ready and "workers" not in ready
        assert await health(target) == health_pb2.HealthCheckResponse.SERVING
    finally:
        await stop(process, signal.SIGTERM)


async def test_serve_with_metrics_and_json_logs(database_url: str) -> None:
    """--metrics-listen and --log-format, from the environment as from the flags: with two
    workers, their metrics on two ports from the one given, each record of their log saying
    which worker wrote it."""
    metrics_port = free_ports(2)
    serving = await serve_beside(
        coffer,
        "--listen",
        "127.0.0.1:0",
        "--workers",
        "2",
        env={
            **os.environ,
            "DATABASE_URL": database_url,
            "COFFER_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
            "COFFER_LOG_FORMAT": "json",
        },
    )
    metrics_ports = [metrics_port, metrics_port + 1]
    try:
        for number, port in enumerate(metrics_ports, start=1):
            said = f"coffer: metrics on http://127.0.0.1:{port}/metrics (worker {number})\n"
            assert said in serving.printed
        target = serving.target
        async with grpc.aio.insecure_channel(target) as channel:
            with pytest.raises(grpc.aio.AioRpcError):
                # No operations: refused whole, and logged.
                await transfers_pb2_grpc.TransferServiceStub(channel).SubmitBatch(
                    transfers_pb2.SubmitBatchRequest(),
                    metadata=((caller_metadata_key, "tests"), ("x-request-id", "serve-1")),
                )
        # The call is counted, by the worker that took it, once its answer is sent: a scrape
        # may come a moment before.
        async with asyncio.timeout(10):
            while True:
                scraped = [await scrape(port) for port in metrics_ports]
                counted = sum(
                    value(
                        samples,
                        "coffer_rpcs_total",
                        service="coffer.v1.TransferService",
                        method="SubmitBatch",
                        code="INVALID_ARGUMENT",
                    )
                    for samples in scraped
                )
                if counted:
                    break
                await asyncio.sleep(0.05)
        assert counted == 1
        assert all(value(samples, "coffer_database_up") == 1 for samples in scraped)
    finally:
        _, log = await serving.stop()
    [line] = [json.loads(each) for each in log.splitlines() if "batch_failed" in each]
    assert line["request_id"] == "serve-1" and line["reason"] == "INVALID_ARGUMENT"
    assert line["level"] == "INFO" and line["logger"] == "coffer.server.logs"
    assert line["worker"] in (1, 2)


async def test_migrate(database_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        coffer,
        "migrate",
        "--database-url",
        database_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await process.communicate()
    assert process.returncode == 0, output
    # The test database is migrated already: nothing to apply.
    assert b"applied migrations none" in output


async def test_serve_starts_its_killed_postgres_again(data_dir: Path) -> None:
    target = f"127.0.0.1:{free_port()}"
    environment = {"COFFER_DATA_DIR": str(data_dir), "DATABASE_URL": ""}
    # One server, whose log says each end of the outage once (each worker would say it).
    process, _ = await serve("--listen", target, "--workers", "1", environment=environment)
    assert process.stdout is not None
    output = asyncio.create_task(process.stdout.read())
    try:
        pid_file = data_dir / "postgres" / "postmaster.pid"
        os.kill(int(pid_file.read_text().split("\n", 1)[0]), signal.SIGKILL)
        serving = health_pb2.HealthCheckResponse.SERVING
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        seen = []
        async with grpc.aio.insecure_channel(target) as channel, asyncio.timeout(60):
            stub = health_pb2_grpc.HealthStub(channel)
            while not_serving not in seen or seen[-1] != serving:
                response = await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                if not seen or seen[-1] != response.status:
                    seen.append(response.status)
                await asyncio.sleep(0.05)
            await units_pb2_grpc.UnitServiceStub(channel).CreateUnit(
                units_pb2.CreateUnitRequest(code="EUR", kind=1, name="Euro", scale=2),
                metadata=((caller_metadata_key, "tests"),),
                timeout=10,
            )
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            log = (await output).decode()
            assert await process.wait() == 0, log
    serving, not_serving = (
        health_pb2.HealthCheckResponse.SERVING,
        health_pb2.HealthCheckResponse.NOT_SERVING,
    )
    assert not_serving in seen and seen[-1] == serving, log
    # Each end of the outage logged once.
    for said in ("died; starting it again", "runs again", "does not answer", "answers again"):
        assert log.count(said) == 1, log


@pytest.mark.parametrize(
    ("workers", "message"),
    [
        ("0", f"coffer serve: --workers must be 1 to {workers_max}, not 0"),
        ("two", "argument --workers: invalid int value: 'two'"),
    ],
)
async def test_serve_takes_its_workers_from_the_environment_too(workers: str, message: str) -> None:
    process = await asyncio.create_subprocess_exec(
        coffer,
        "serve",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "COFFER_WORKERS": workers,
        },
    )
    output, errors = await process.communicate()
    assert process.returncode == 2
    assert message in errors.decode(), errors
    assert output == b""


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--batch-size-max", "9000"], "--batch-size-max must be 1 to 8000"),
        (["--batch-size-max", "0"], "--batch-size-max must be 1 to 8000"),
        (["--pool-size", "4", "--batch-workers", "3"], "--batch-workers must be 1 to 2 (half"),
        (["--pool-size", "101"], "--pool-size must be 2 to 100"),
        (["--pool-size-read", "0"], "--pool-size-read must be 1 to 100"),
        (["--queue-max", "10"], "--queue-max must be 1000 to 1000000 (at least one batch"),
        (["--queue-max", "1000001"], "--queue-max must be 1000 to 1000000"),
        (["--batch-workers", "5"], "--batch-workers must be 1 to 4 (half of pool_size, 8"),
        (["--batch-wait-ms", "-1"], "--batch-wait-ms must be 0 to 1000"),
        (["--queued-bytes-max", "1000"], "--queued-bytes-max must be 16384000 to 1073741824"),
        (["--calls-max", "0"], "--calls-max must be 1 to 100000"),
        (["--calls-max", "1000000000"], "--calls-max must be 1 to 100000, not 1000000000"),
        (["--statement-timeout-s", "0.0004"], "--statement-timeout-s must be 0.01 to 3600"),
        (["--lock-timeout-s", "0.0004"], "--lock-timeout-s must be 0.01 to 3600"),
        (["--lock-timeout-s", "nan"], "--lock-timeout-s must be 0.01 to 3600"),
        (["--listen", "127.0.0.1:65536"], "--listen must be HOST:PORT with a port from 0"),
        (["--database-url", "coffer"], "--database-url must start with postgresql://"),
        (["--metrics-listen", "127.0.0.1:65536"], "--metrics-listen must be HOST:PORT with a port"),
        (
            ["--expiration-interval-s", "0.001"],
            "--expiration-interval-s must be 0 (no expiration runs) or 0.01 to 86400",
        ),
        (["--expiry-notice-days", "367"], "--expiry-notice-days must be 0 to 366 (0: no notices)"),
        (["--workers", "0"], f"--workers must be 1 to {workers_max}, not 0"),
        (["--workers", "65"], f"--workers must be 1 to {workers_max}, not 65"),
        (
            ["--workers", "3", "--metrics-listen", "127.0.0.1:65534"],
            "--metrics-listen must leave a port to each of the 3 workers (P to P + 2)",
        ),
        (
            ["--listen", "127.0.0.1:9090", "--metrics-listen", "127.0.0.1:9090"],
            "--metrics-listen must differ from --listen",
        ),
    ],
)
async def test_serve_refuses_settings_out_of_bounds(arguments: list[str], message: str) -> None:
    process = await asyncio.create_subprocess_exec(
        coffer,
        "serve",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        # Checked before anything starts: no database is ever reached.
        env={**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
    )
    output, errors = await process.communicate()
    assert process.returncode == 2
    assert errors.decode().startswith(f"coffer serve: {message}"), errors
    assert output == b""
