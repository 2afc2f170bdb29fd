"""`coffer bench`: a short smoke run of each scenario, end to end.

Not a benchmark: half a second of load each, to see that every scenario runs, prints its
table and its JSON line, writes its files and checks the books. The scenarios share one
`coffer serve` process (`--target`, with `--database-url` for the preload and the check), as
runs against a running server do: each sets up wallets of its own. One run takes the default
path instead, as a process, as it is used: its own durable embedded PostgreSQL and a `coffer
serve` of two workers, pgbench and the gRPC echo comparison, and nothing left running after.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from coffer.bench.infra import BenchServer, coffer_command
from coffer.bench.main import bench, connections_per_worker, main, parse_arguments
from coffer.clients.client import connections_max
from coffer.postgres.supervisor import EmbeddedPostgres
from coffer.server.app import Settings, cluster_connections_max, database_connections_max
from coffer.server.settings import workers_max

required_keys = {
    "scenario",
    "transfers_per_s",
    "latency_ms_p50",
    "latency_ms_p99",
    "errors",
    "refused",
    "pgbench_tps",
    "echo_rps",
    "server_rss_mb_max",
    "transfers_stored",
    "self_check",
    "duration_s",
    "inflight",
    "batch_size",
}
# The rows of the table every run prints before its JSON line.
table_rows = ("scenario", "transfers/s", "latency ms per call", "transfers stored", "self-check")
quick = ["--duration", "0.5", "--warmup", "0.1", "--wallets", "20", "--batch-size", "20"]
shared_database = "bench_shared"
run_timeout_s = 120


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def shared_server(
    postgres_cluster: EmbeddedPostgres,
    template_database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[list[str]]:
    """One migrated database and one `coffer serve` on it, for the whole module: the arguments
    that aim a run at them."""
    administration = await asyncpg.connect(postgres_cluster.dsn)
    try:
        await administration.execute(
            f'CREATE DATABASE "{shared_database}" TEMPLATE "{template_database}"'
        )
    finally:
        await administration.close()
    dsn = postgres_cluster.dsn_for(shared_database)
    try:
        server = await BenchServer.start(
            dsn,
            workers=1,
            server_arguments=[],
            log_dir=tmp_path_factory.mktemp("bench-server"),
            note=lambda message: None,
        )
        async with server:
            yield ["--target", server.target, "--database-url", dsn]
    finally:
        administration = await asyncpg.connect(postgres_cluster.dsn)
        try:
            await administration.execute(
                f'DROP DATABASE IF EXISTS "{shared_database}" WITH (FORCE)'
            )
        finally:
            await administration.close()


async def _run(
    arguments: list[str], out: Path, capsys: pytest.CaptureFixture[str]
) -> dict[str, object]:
    """Runs the bench in this process, on this loop; its JSON line, once the table and the
    files are checked."""
    parsed = parse_arguments([*arguments, "--out", str(out), "--json"])
    assert parsed is not None
    code = await bench(parsed)
    printed = capsys.readouterr()
    assert code == 0, printed.err[-4000:]
    return _result(printed.out)


def _result(printed: str) -> dict[str, object]:
    lines = printed.strip().splitlines()
    result: dict[str, object] = json.loads(lines[-1])
    assert required_keys <= set(result), required_keys - set(result)
    shown = {line.split("  ", 1)[0] for line in lines[:-1]}
    assert set(table_rows) <= shown, shown
    assert Path(str(result["json_path"])).is_file()
    assert Path(str(result["plot_path"])).is_file(), result["plot_path"]
    return result


@pytest.mark.parametrize(
    ("scenario", "extra"),
    [
        ("batch", ["--preload", "5000"]),
        ("single", ["--inflight", "8", "--connections", "2"]),
        ("hot", ["--sweep", "1,2", "--skew", "1"]),
        ("mixed", ["--inflight", "8"]),
        ("payments", []),
        # Whole transfers in the answers, counted alike.
        ("payments", ["--whole-answers"]),
    ],
)
async def test_scenario(
    scenario: str,
    extra: list[str],
    shared_server: list[str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = await _run(
        ["--scenario", scenario, *shared_server, "--no-compare", *quick, *extra], tmp_path, capsys
    )
    assert result["scenario"] == scenario
    assert result["answers"] == ("whole" if "--whole-answers" in extra else "compact")
    assert result["self_check"] == "passed"
    assert result["errors"] == 0, result["error_reasons"]
    assert isinstance(result["transfers_per_s"], float) and result["transfers_per_s"] > 0
    assert isinstance(result["transfers_stored"], int) and result["transfers_stored"] > 0
    # A running server: not its process, so no RSS; and no comparisons asked for.
    assert result["server_rss_mb_max"] is None
    assert result["pgbench_tps"] is None and result["echo_rps"] is None
    expected_batch = 20 if scenario in ("batch", "hot", "payments") else None
    assert result["batch_size"] == expected_batch
    if scenario == "batch":
        assert result["preload"] == 5000
        assert isinstance(result["preload_s"], float)
        transfers = result["transfers"]
        assert isinstance(transfers, int)
        assert result["transfers_stored"] >= 5000 + transfers
    if scenario == "hot":
        sweep = result["sweep"]
        assert isinstance(sweep, list) and [point["inflight"] for point in sweep] == [1, 2]


async def test_overload_scenario(
    shared_server: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = await _run(
        ["--scenario", "overload", *shared_server, "--no-compare", *quick], tmp_path, capsys
    )
    assert result["scenario"] == "overload"
    assert result["self_check"] == "passed"
    assert result["batch_size"] == 20
    overload = result["overload"]
    assert isinstance(overload, dict)
    assert overload["factor"] == 4
    assert overload["single_calls_admitted"] > 0 and overload["batch_calls_admitted"] > 0
    # Whatever was refused was refused by the server, as OVERLOADED with a retry-after hint.
    refusals = overload["refusals"]
    assert set(refusals) <= {"OVERLOADED"}, refusals
    assert overload["refusals_with_retry_after"] == sum(refusals.values())
    assert overload["recovery_s"] is not None


def test_embedded_database_two_workers_and_comparisons(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            *coffer_command(),
            "bench",
            "--scenario",
            "single",
            "--workers",
            "2",
            "--inflight",
            "8",
            *quick,
            "--json",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=run_timeout_s,
        stdin=subprocess.DEVNULL,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = _result(completed.stdout)
    assert result["self_check"] == "passed"
    assert result["errors"] == 0
    assert isinstance(result["transfers_per_s"], float) and result["transfers_per_s"] > 0
    # One `coffer serve` of two workers, the client's calls over two connections a worker.
    assert result["servers"] == 1 and result["workers"] == 2 and result["connections"] == 4
    # Its memory: the supervisor and the workers together, and the largest of them.
    together, largest = result["server_rss_mb_max"], result["server_rss_mb_max_per_process"]
    assert isinstance(together, float) and isinstance(largest, float)
    assert 0 < largest < together
    assert isinstance(result["pgbench_tps"], float) and result["pgbench_tps"] > 0
    assert isinstance(result["echo_rps"], float) and result["echo_rps"] > 0
    assert "durable" in str(result["database"])
    # The CPU the server (its workers), PostgreSQL and the client spent per transfer in the window.
    budget = result["cpu_us_per_transfer"]
    assert isinstance(budget, dict) and set(budget) == {"server", "postgres", "client"}
    assert all(isinstance(value, float) and value > 0 for value in budget.values()), budget
    # The cluster and the server ran in a temporary directory: all stopped, and it is gone.
    data_dir = str(result["database"]).split(" in ", 1)[1].split(" ", 1)[0]
    assert data_dir.startswith(tempfile.gettempdir())
    assert not Path(data_dir).exists()
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert data_dir not in running


def test_sigterm_stops_what_the_run_started(tmp_path: Path) -> None:
    """Terminated mid-run, the bench stops its server and its database, as on Ctrl-C."""
    command = [
        *coffer_command(),
        "bench",
        "--scenario",
        "batch",
        "--workers",
        "1",
        "--duration",
        "60",
        "--wallets",
        "20",
        "--batch-size",
        "20",
        "--no-compare",
        "--out",
        str(tmp_path),
    ]
    with subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    ) as running:
        assert running.stderr is not None
        said = []
        for line in running.stderr:
            said.append(line)
            if line.startswith("batch:"):  # measuring: the server and the database are up
                break
        data_dirs = [line.split(" in ", 1)[1].strip() for line in said if "PostgreSQL in" in line]
        assert len(data_dirs) == 1, said
        running.terminate()
        said.extend(running.stderr)
        assert running.wait(timeout=run_timeout_s) == 130, "".join(said)[-4000:]
    assert "interrupted" in said[-1]
    assert not Path(data_dirs[0]).exists()
    # Neither the database nor the server (whose database URL names the directory) runs on.
    processes = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert data_dirs[0] not in processes


@pytest.mark.parametrize("workers", [1, 2, workers_max])
def test_the_default_connections_are_a_few_per_worker_within_the_clients_limit(
    workers: int,
) -> None:
    parsed = parse_arguments(["--workers", str(workers)])
    assert parsed is not None
    assert parsed.connections == min(connections_per_worker * workers, connections_max)
    assert 1 <= parsed.connections <= connections_max


@pytest.mark.parametrize("workers", [1, 8])
def test_the_embedded_database_takes_every_workers_connections(workers: int) -> None:
    """The rule of `coffer serve`'s own embedded database, with the flags given the server."""
    parsed = parse_arguments(["--workers", str(workers), "--server-arg=--pool-size-read=40"])
    assert parsed is not None
    settings = Settings(database_url="", workers=workers, pool_size_read=40)
    assert parsed.database_connections == cluster_connections_max(settings)
    assert parsed.database_connections >= workers * database_connections_max(settings)


@pytest.mark.parametrize(
    "arguments",
    [
        ["--batch-size", "0"],
        ["--duration", "0"],
        ["--scenario", "nonesuch"],
        ["--sweep", "1,x"],
        ["--target", "127.0.0.1:1", "--workers", "2"],
        ["--workers", "0"],
        ["--workers", "65"],
        ["--connections", "0"],
        ["--server-arg=--pool-size-read=0"],
        ["--target", "127.0.0.1:1", "--preload", "10"],
        ["--scenario", "overload", "--sweep", "1,2"],
    ],
)
def test_bad_arguments_are_usage_errors(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(arguments)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code  # type: ignore[assignment]
    assert code == 2
    assert capsys.readouterr().err.strip(), "a usage error says what is wrong"
