"""`coffer bench`: a load generator that measures a Coffer server end to end.

    coffer bench --scenario batch --duration 20 --json

By default it starts a durable embedded PostgreSQL (fsync and synchronous_commit on, as in
production) in a temporary directory and a `coffer serve` (as many workers as `coffer serve`
starts by default, or --workers) on a free port, sets up a
unit and wallets (not timed), drives the server over gRPC with the typed client for a warmup
and then the measured duration, checks the books, and, for comparison on the same machine and
database server, runs pgbench's tpcb-like load and a bare gRPC health-check echo. It prints a
table, writes `<scenario>-<timestamp>.json` and `.png` in `--out`, and stops everything it
started. `--target` and `--database-url` aim it at a running server and database instead.

Scenarios (every operation with an idempotency key, notes and references, stored history):
  batch     SubmitBatch calls of --batch-size transfers among customer wallets
  single    single Transfer calls, coalesced by the server's batcher
  hot       batches of transfers from many customers to ONE merchant wallet
  mixed     single calls: credits, debits (both modes), transfers, holds captured or
            released, voids, balance reads
  payments  batches of EMI deposits and customer-to-merchant payments
  overload  4x the measured capacity of batch calls (--batch-size) and single calls at
            once, open-loop, for --duration; then none, and the time to recover. Reports
            refusals by reason, admitted single calls' latency, recovery time, server RSS
            (the capacity is measured for --warmup seconds, at least 1)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shutil
import signal
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import uvloop

from coffer.bench import infra, load, measure, overload, report
from coffer.bench.load import batch_scenarios, scenarios
from coffer.clients import Client, limits
from coffer.clients.client import connections_max
from coffer.server.app import cluster_connections_max
from coffer.server.cli import serve_settings
from coffer.server.settings import SettingsError, workers_default, workers_max
from coffer.server.tls import TlsError

__all__ = ["bench", "connections_per_worker", "main", "parse_arguments"]

inflight_default_batch = 2
inflight_default_single = 64
echo_inflight = 64
# The kernel gives each connection to one worker, picked by a hash, and the client opens
# again those that leave a worker unreached: two per worker, each call to the worker with the
# fewest of the client's calls in flight.
connections_per_worker = 2


def main(argv: Sequence[str] | None = None) -> int:
    """`coffer bench`: 0 when the run went through and the books balance, 1 when not, 2 for
    bad arguments."""
    arguments = parse_arguments(sys.argv[1:] if argv is None else argv)
    if arguments is None:
        return 2
    try:
        return uvloop.run(bench(arguments))
    except (KeyboardInterrupt, asyncio.CancelledError):
        # Ctrl-C, or SIGTERM (see bench): what the run started is stopped by then.
        print("coffer bench: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # Anything that stopped the run: say what, in one place.
        print(f"coffer bench: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace | None:
    """The arguments, with the defaults that depend on others filled; None, once the problem
    is printed, if they are wrong (argparse's own refusals exit with 2, as it does)."""
    arguments = _parser().parse_args(argv)
    problem = _check(arguments)
    if problem:
        print(f"coffer bench: {problem}", file=sys.stderr)
        return None
    return arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="coffer bench",
        description="Measure a Coffer server's throughput and latency under load.",
        epilog=__doc__[__doc__.index("Scenarios") :] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenario", choices=scenarios, default="batch")
    parser.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="measured seconds (default 20; under 1 s, a smoke run without per-second figures)",
    )
    parser.add_argument(
        "--warmup", type=float, default=2.0, help="seconds of load not counted (default 2)"
    )
    parser.add_argument(
        "--inflight",
        type=int,
        default=None,
        help=f"calls in flight at once (default {inflight_default_batch} for batch, hot and "
        f"payments, {inflight_default_single} for single and mixed)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=1000,
        help="operations per SubmitBatch call (batch, hot, payments; default 1000)",
    )
    parser.add_argument("--wallets", type=int, default=1000, help="wallets (default 1000)")
    parser.add_argument(
        "--skew",
        type=float,
        default=0.0,
        help="Zipf-like exponent of wallet choice: 0 uniform (default), 1 a few hot wallets",
    )
    parser.add_argument(
        "--sweep",
        default=None,
        metavar="N,N,...",
        help="run the scenario at each of these in-flight counts, e.g. 1,8,32,64,128",
    )
    parser.add_argument(
        "--target", default=None, metavar="HOST:PORT", help="a running server to measure"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        metavar="URL",
        help="a running PostgreSQL (the server's, for the self-check, preload and pgbench)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="passed to the `coffer serve` it starts (repeatable), e.g. "
        "--server-arg=--batch-size-max=2000",
    )
    parser.add_argument(
        "--no-events",
        action="store_true",
        help="start the server with --no-events (no event records), to measure what the "
        "event stream costs",
    )
    parser.add_argument(
        "--no-auth",
        action="store_true",
        help="call in the open mode, without an API key, to measure what authentication costs "
        "(by default the bench makes an administrator's key in its database and every call "
        "carries it)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("COFFER_API_KEY"),
        metavar="KEY",
        help="with --target and no --database-url: the key the calls carry (env COFFER_API_KEY)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes of the server it starts (`coffer serve --workers`; default "
        f"coffer serve's: the cores this process may run on, {workers_default()})",
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=None,
        help=f"gRPC connections of the client, spread over the workers (default "
        f"{connections_per_worker} per worker, at most {connections_max}; 1 with --target)",
    )
    parser.add_argument(
        "--preload",
        type=int,
        default=0,
        metavar="N",
        help="store N transfers of history among the customers before the run, each with an "
        "idempotency key, with the core's bulk preload (e.g. 10000000; needs the database)",
    )
    parser.add_argument(
        "--no-compare", action="store_true", help="skip the pgbench and gRPC echo comparisons"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="results directory")
    parser.add_argument(
        "--json", action="store_true", help="end stdout with the results as one JSON line"
    )
    parser.add_argument("--seed", type=int, default=1, help="of the random load (default 1)")
    parser.add_argument(
        "--whole-answers",
        action="store_true",
        help="batch calls ask for whole transfers in their answers, not compact outcomes",
    )
    return parser


def _check(arguments: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, or None; fills the defaults that depend on others."""
    if arguments.inflight is None:
        arguments.inflight = (
            inflight_default_batch
            if arguments.scenario in batch_scenarios
            else inflight_default_single
        )
    if arguments.workers is None and arguments.target is None:
        arguments.workers = workers_default()
    if arguments.connections is None:
        arguments.connections = (
            1
            if arguments.workers is None
            else min(connections_per_worker * arguments.workers, connections_max)
        )
    if arguments.sweep is not None:
        try:
            arguments.sweep = [int(part) for part in arguments.sweep.split(",") if part.strip()]
        except ValueError:
            return f"--sweep takes in-flight counts separated by commas, not {arguments.sweep!r}"
        if not arguments.sweep or min(arguments.sweep) < 1:
            return "--sweep needs in-flight counts of 1 or more"
    checks = [
        (arguments.duration > 0, "--duration must be more than 0 seconds"),
        (arguments.warmup >= 0, "--warmup must not be negative"),
        (arguments.inflight >= 1, "--inflight must be 1 or more"),
        (
            1 <= arguments.batch_size <= limits.batch_operations_max,
            f"--batch-size must be 1 to {limits.batch_operations_max}",
        ),
        (arguments.wallets >= 2, "--wallets must be 2 or more"),
        (arguments.skew >= 0, "--skew must not be negative"),
        (
            arguments.workers is None or 1 <= arguments.workers <= workers_max,
            f"--workers must be 1 to {workers_max}",
        ),
        (
            1 <= arguments.connections <= connections_max,
            f"--connections must be 1 to {connections_max}",
        ),
        (arguments.preload >= 0, "--preload must not be negative"),
        (
            arguments.scenario != "overload" or arguments.sweep is None,
            "--sweep is not for the overload scenario",
        ),
        (
            arguments.target is None
            or (arguments.workers is None and not arguments.server_arg and not arguments.no_events),
            "--workers, --server-arg and --no-events are for the server it starts, not with "
            "--target",
        ),
        (
            not arguments.preload or arguments.target is None or arguments.database_url,
            "--preload needs the database: give --database-url with --target",
        ),
    ]
    problem = next((message for passed, message in checks if not passed), None)
    arguments.database_connections = None
    if problem is not None or arguments.target is not None:
        return problem
    # The server it starts, as `coffer serve` reads its flags: the embedded database takes
    # every worker's connections, as `coffer serve`'s own does.
    try:
        settings = serve_settings(
            [*_server_arguments(arguments), "--workers", str(arguments.workers)]
        )
    except (SettingsError, TlsError) as error:
        return f"--server-arg: --{error.setting.replace('_', '-')} {error.problem}"
    arguments.database_connections = cluster_connections_max(settings)
    return None


def _server_arguments(arguments: argparse.Namespace) -> list[str]:
    """The flags of the `coffer serve` it starts, but its address, database and workers."""
    return [*arguments.server_arg, *(["--no-events"] if arguments.no_events else [])]


def _note(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


async def bench(arguments: argparse.Namespace) -> int:
    """The run, on the running event loop (main runs it on uvloop): prints the table (and the
    JSON line with --json), writes the files, stops everything it started; returns main's
    exit code."""
    started = time.time()
    # SIGTERM stops the run as Ctrl-C does: the run is cancelled, and stops the server and the
    # database it started on its way out, rather than leaving them running.
    run = asyncio.current_task()
    assert run is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, run.cancel)
    run_id = f"b{secrets.token_hex(4)}"
    log_dir = Path(tempfile.mkdtemp(prefix="coffer-bench-logs-"))
    try:
        async with contextlib.AsyncExitStack() as stack:
            database = None
            if arguments.target is None or arguments.database_url:
                database = await stack.enter_async_context(
                    infra.bench_database(
                        arguments.database_url,
                        _note,
                        connections_max=arguments.database_connections,
                    )
                )
            server = None
            target = arguments.target
            if target is None:
                assert database is not None
                server = await infra.BenchServer.start(
                    database.dsn,
                    workers=arguments.workers,
                    server_arguments=_server_arguments(arguments),
                    log_dir=log_dir,
                    note=_note,
                )
                stack.push_async_callback(server.stop)
                target = server.target
            api_key = arguments.api_key
            if not arguments.no_auth and database is not None:
                api_key = await infra.make_api_key(database.dsn)
            client = load.open_client(
                target, arguments.connections, None if arguments.no_auth else api_key
            )
            stack.push_async_callback(client.close)
            result = await _measure(arguments, run_id, database, server, client)
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    result["wall_s"] = round(time.time() - started, 1)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(started))
    json_path = arguments.out / f"{arguments.scenario}-{stamp}.json"
    plot_path = json_path.with_suffix(".png")
    result["json_path"] = str(json_path)
    why_not = report.plot(result, plot_path)
    result["plot_path"] = why_not or str(plot_path)
    report.write_json(result, json_path)
    report.table(result, sys.stdout)
    if arguments.json:
        short = {name: value for name, value in result.items() if name not in ("series",)}
        for point in short.get("sweep") or ():
            point.pop("series", None)
        print(json.dumps(short, separators=(",", ":")), flush=True)
    failed = result["self_check"].startswith("failed") or result["servers_exited"]
    return 1 if failed else 0


async def _measure(
    arguments: argparse.Namespace,
    run_id: str,
    database: infra.BenchDatabase | None,
    server: infra.BenchServer | None,
    client: Client,
) -> dict[str, Any]:
    scenario = arguments.scenario
    setup_started = time.monotonic()
    fixture = await load.setup(client, scenario, arguments.wallets, run_id, _note)
    setup_s = time.monotonic() - setup_started
    preload_s = None
    if arguments.preload:
        assert database is not None
        preload_s = await infra.preload(database.dsn, fixture.customers, arguments.preload, _note)
    if database is not None:
        await infra.checkpoint(database.dsn)
    # The server's process and every one below it (its workers).
    rss = infra.RssSampler([server.pid] if server else [])
    rss.start()
    postmaster = infra.postmaster_pid(database.cluster) if database is not None else None
    cpu = measure.CpuMeter(
        {
            "server": [server.pid] if server else [],
            "postgres": [postmaster] if postmaster is not None else [],
        }
    )
    points = []
    baseline: dict[str, Any] = {}
    try:
        if scenario == "overload":
            points.append(
                await overload.run(
                    fixture,
                    client,
                    batch_size=arguments.batch_size,
                    skew=arguments.skew,
                    seed=arguments.seed,
                    calibration_s=arguments.warmup,
                    duration_s=arguments.duration,
                    note=_note,
                )
            )
        else:
            if scenario == "credits":
                # First, so that the credits load runs on the larger tables.
                baseline = await _batch_beside(arguments, fixture, client, cpu)
            points += await _load(arguments, fixture, client, cpu)
    finally:
        await rss.stop()
    servers_exited = server.exited() if server else []
    for message in servers_exited:
        _note(message)

    self_check = "skipped: no database url"
    transfers_stored = None
    if database is not None:
        _note("checking the books")
        books = await infra.check_books(database.dsn)
        self_check = books.summary()
        transfers_stored = books.transfers

    pgbench: dict[str, Any] = {"tps": None, "note": "skipped: --no-compare"}
    echo: dict[str, Any] | None = None
    if not arguments.no_compare and not servers_exited:
        if database is None:
            pgbench = {"tps": None, "note": "skipped: no database url"}
        else:
            # No gRPC channel open while pgbench forks (the echo below opens them again).
            await client.close()
            try:
                pgbench = await infra.run_pgbench(database, arguments.duration, _note)
            except Exception as error:
                pgbench = {"tps": None, "note": f"failed: {error}"}
                _note(f"pgbench {pgbench['note']}")
        _note(f"gRPC echo: health checks, {echo_inflight} in flight")
        echo = await load.run_load(
            load.EchoWorkload(run_id),
            client,
            inflight=echo_inflight,
            warmup_s=arguments.warmup,
            duration_s=arguments.duration,
        )

    best = max(points, key=lambda point: point["transfers_per_s"])
    beside: dict[str, Any] = {}
    if scenario == "credits":
        beside = {
            "batch_transfers_per_s": baseline["transfers_per_s"],
            "credits_vs_batch": round(best["transfers_per_s"] / baseline["transfers_per_s"], 3)
            if baseline["transfers_per_s"]
            else None,
            "batch_latency_ms_p99": baseline["latency_ms_p99"],
            "batch_cpu_us_per_transfer": baseline.get("cpu_us_per_transfer"),
        }
    result: dict[str, Any] = {
        "scenario": scenario,
        "transfers_per_s": best["transfers_per_s"],
        **beside,
        "latency_ms_p50": best["latency_ms_p50"],
        "latency_ms_p99": best["latency_ms_p99"],
        "errors": best["errors"],
        "refused": best["refused"],
        "pgbench_tps": pgbench.get("tps"),
        "echo_rps": echo["rpcs_per_s"] if echo else None,
        # The server's processes together, and the largest of them.
        "server_rss_mb_max": round(rss.mb_max, 1) if rss.mb_max is not None else None,
        "server_rss_mb_max_per_process": round(rss.mb_max_per_process, 1)
        if rss.mb_max_per_process is not None
        else None,
        "transfers_stored": transfers_stored,
        "self_check": self_check,
        "duration_s": arguments.duration,
        "inflight": best["inflight"],
        "batch_size": arguments.batch_size if scenario in (*batch_scenarios, "overload") else None,
        # The rest of the best (or only) run.
        **{name: value for name, value in best.items() if name not in ("duration_s",)},
        "warmup_s": arguments.warmup,
        "wallets": arguments.wallets,
        "skew": arguments.skew,
        # One `coffer serve` started (None: a --target), with this many workers.
        "servers": 1 if server else None,
        "workers": server.workers if server else None,
        "server": server.target if server else arguments.target,
        "server_args": arguments.server_arg,
        "events": not arguments.no_events,
        "answers": "whole" if arguments.whole_answers else "compact",
        "auth": not arguments.no_auth,
        "connections": arguments.connections,
        "database": _describe(database),
        "preload": arguments.preload,
        "preload_s": round(preload_s, 1) if preload_s is not None else None,
        "setup_s": round(setup_s, 1),
        "servers_exited": servers_exited,
        "pgbench": pgbench,
        "pgbench_note": pgbench.get("note") or None,
        "echo_latency_ms_p50": echo["latency_ms_p50"] if echo else None,
        "echo_latency_ms_p99": echo["latency_ms_p99"] if echo else None,
        "echo_errors": echo["errors"] if echo else None,
        "server_rss_mb_samples": rss.samples,
        "sweep": points if arguments.sweep else None,
        "run_id": run_id,
        "seed": arguments.seed,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "grpc": grpc.__version__,
            "platform": platform.platform(),
        },
        "client": "coffer.clients.Client (typed; retries off; its connections spread over "
        "the workers, each call to the one with the fewest in flight), one uvloop event loop",
    }
    return result


async def _load(
    arguments: argparse.Namespace,
    fixture: load.Fixture,
    client: Client,
    cpu: measure.CpuMeter,
) -> list[dict[str, Any]]:
    """The scenario's closed-loop load at each in-flight count: one point each."""
    workload = load.make_workload(
        arguments.scenario,
        fixture,
        arguments.batch_size,
        arguments.skew,
        arguments.seed,
        compact=not arguments.whole_answers,
    )
    points = []
    for inflight in arguments.sweep or [arguments.inflight]:
        _note(
            f"{arguments.scenario}: {inflight} in flight, {arguments.warmup:g} s warmup, "
            f"{arguments.duration:g} s measured"
        )
        points.append(
            await load.run_load(
                workload,
                client,
                inflight=inflight,
                warmup_s=arguments.warmup,
                duration_s=arguments.duration,
                cpu=cpu,
            )
        )
    return points


async def _batch_beside(
    arguments: argparse.Namespace,
    fixture: load.Fixture,
    client: Client,
    cpu: measure.CpuMeter,
) -> dict[str, Any]:
    """The batch load on the credits scenario's customers funded without terms, on the same
    server, right before it: what the credits load is compared with."""
    # Keys of its own: the same run, another load.
    plain = load.Fixture(f"{fixture.run_id}-batch", fixture.plain, [])
    workload = load.make_workload(
        "batch",
        plain,
        arguments.batch_size,
        arguments.skew,
        arguments.seed,
        compact=not arguments.whole_answers,
    )
    _note(
        f"batch, to compare with: {arguments.inflight} in flight, {arguments.warmup:g} s warmup, "
        f"{arguments.duration:g} s measured"
    )
    return await load.run_load(
        workload,
        client,
        inflight=arguments.inflight,
        warmup_s=arguments.warmup,
        duration_s=arguments.duration,
        cpu=cpu,
    )


def _describe(database: infra.BenchDatabase | None) -> str | None:
    """The database, without a password."""
    if database is None:
        return None
    if database.cluster is not None:
        return database.description + " (durable: fsync, synchronous_commit on)"
    parts = urllib.parse.urlsplit(database.dsn)
    if parts.password:
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return database.dsn
