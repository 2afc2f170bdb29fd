"""`coffer bench`: a short smoke run of each scenario, as a process, as it is used.

Not a benchmark: a second of load against a server process the bench starts itself (on this
test's database), then the JSON it prints, the files it writes and its check of the books.
One run takes the default path instead: its own durable embedded PostgreSQL, pgbench and the
gRPC echo comparison, and nothing left running after.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

import pytest

from coffer.bench.infra import coffer_command
from coffer.bench.main import main

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
run_timeout_s = 180
quick = ["--duration", "1", "--warmup", "0.2", "--wallets", "40", "--batch-size", "50", "--json"]


def _bench(arguments: list[str], out: Path) -> dict[str, object]:
    completed = subprocess.run(
        [*coffer_command(), "bench", *arguments, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=run_timeout_s,
        stdin=subprocess.DEVNULL,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    result: dict[str, object] = json.loads(completed.stdout.strip().splitlines()[-1])
    assert required_keys <= set(result), required_keys - set(result)
    assert Path(str(result["json_path"])).is_file()
    assert Path(str(result["plot_path"])).is_file(), result["plot_path"]
    return result


@pytest.mark.parametrize(
    ("scenario", "extra"),
    [
        ("batch", ["--preload", "5000"]),
        # Two server processes on one port: --reuse-port, and one connection each at least.
        ("single", ["--servers", "2", "--inflight", "16"]),
        ("hot", ["--sweep", "1,2", "--skew", "1"]),
        ("mixed", ["--inflight", "16"]),
        ("payments", []),
    ],
)
def test_scenario(scenario: str, extra: list[str], database_url: str, tmp_path: Path) -> None:
    result = _bench(
        ["--scenario", scenario, "--database-url", database_url, "--no-compare", *quick, *extra],
        tmp_path,
    )
    assert result["scenario"] == scenario
    assert result["self_check"] == "passed"
    assert result["errors"] == 0, result["error_reasons"]
    assert isinstance(result["transfers_per_s"], float) and result["transfers_per_s"] > 0
    assert isinstance(result["server_rss_mb_max"], float) and result["server_rss_mb_max"] > 0
    assert isinstance(result["transfers_stored"], int) and result["transfers_stored"] > 0
    assert result["pgbench_tps"] is None and result["echo_rps"] is None
    expected_batch = 50 if scenario in ("batch", "hot", "payments") else None
    assert result["batch_size"] == expected_batch
    if scenario == "batch":
        assert result["preload"] == 5000
        transfers = result["transfers"]
        assert isinstance(transfers, int)
        assert result["transfers_stored"] >= 5000 + transfers
    if scenario == "hot":
        sweep = result["sweep"]
        assert isinstance(sweep, list) and [point["inflight"] for point in sweep] == [1, 2]


def test_overload_scenario(database_url: str, tmp_path: Path) -> None:
    result = _bench(
        ["--scenario", "overload", "--database-url", database_url, "--no-compare", *quick],
        tmp_path,
    )
    assert result["scenario"] == "overload"
    assert result["self_check"] == "passed"
    assert result["batch_size"] == 50
    overload = result["overload"]
    assert isinstance(overload, dict)
    assert overload["factor"] == 4
    assert overload["single_calls_admitted"] > 0 and overload["batch_calls_admitted"] > 0
    # Whatever was refused was refused by the server, as OVERLOADED with a retry-after hint.
    refusals = overload["refusals"]
    assert set(refusals) <= {"OVERLOADED"}, refusals
    assert overload["refusals_with_retry_after"] == sum(refusals.values())
    assert overload["recovery_s"] is not None
    assert isinstance(result["server_rss_mb_max"], float) and result["server_rss_mb_max"] > 0


def test_embedded_database_and_comparisons(tmp_path: Path) -> None:
    result = _bench(["--scenario", "batch", *quick], tmp_path)
    assert result["self_check"] == "passed"
    assert result["errors"] == 0
    assert isinstance(result["pgbench_tps"], float) and result["pgbench_tps"] > 0
    assert isinstance(result["echo_rps"], float) and result["echo_rps"] > 0
    assert "durable" in str(result["database"])
    # The cluster and the server ran in a temporary directory: both stopped, and it is gone.
    data_dir = str(result["database"]).split(" in ", 1)[1].split(" ", 1)[0]
    assert data_dir.startswith(tempfile.gettempdir())
    assert not Path(data_dir).exists()
    running = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert data_dir not in running


@pytest.mark.parametrize(
    "arguments",
    [
        ["--batch-size", "0"],
        ["--scenario", "nonesuch"],
        ["--sweep", "1,x"],
        ["--target", "127.0.0.1:1", "--servers", "2"],
        ["--target", "127.0.0.1:1", "--preload", "10"],
        ["--scenario", "overload", "--sweep", "1,2"],
    ],
)
def test_bad_arguments_are_usage_errors(arguments: list[str]) -> None:
    try:
        code = main(arguments)
    except SystemExit as exit:  # argparse's own refusals
        code = exit.code  # type: ignore[assignment]
    assert code == 2
