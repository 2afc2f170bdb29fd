"""What `coffer bench` shows at the end: a table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

__all__ = ["plot", "table", "workers_phrase", "write_json"]


def _number(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def workers_phrase(count: int) -> str:
    """ "1 worker", "2 workers"."""
    return f"{count} worker{'s' if count > 1 else ''}"


def _rss(result: dict[str, Any]) -> str:
    """The server's processes together, and the largest of them when there are several."""
    total = _number(result["server_rss_mb_max"], 1) + " MB"
    if (result.get("workers") or 1) > 1:
        largest = _number(result.get("server_rss_mb_max_per_process"), 1)
        total += f" (all processes; {largest} MB the largest)"
    return total


def table(result: dict[str, Any], stream: TextIO) -> None:
    rows: list[tuple[str, str]] = [
        ("scenario", str(result["scenario"])),
        (
            "server",
            str(result["server"])
            + (
                f" (coffer serve, {workers_phrase(result['workers'])})"
                if result.get("workers")
                else ""
            ),
        ),
        ("database", str(result["database"])),
        ("load", _load(result)),
        ("duration", f"{result['duration_s']:g} s (after {result['warmup_s']:g} s warmup)"),
        ("transfers/s", _number(result["transfers_per_s"])),
        ("calls/s", _number(result["rpcs_per_s"])),
        (
            "latency ms per call",
            "p50 {} p90 {} p99 {} max {}".format(
                *(_number(result[f"latency_ms_{name}"], 1) for name in ("p50", "p90", "p99", "max"))
            ),
        ),
        ("refused (insufficient funds)", _number(result["refused"])),
        *(
            [
                ("batch transfers/s beside it", _number(result["batch_transfers_per_s"])),
                ("credits / batch", _number(result["credits_vs_batch"], 2)),
            ]
            if result.get("batch_transfers_per_s") is not None
            else []
        ),
        ("errors", _number(result["errors"])),
    ]
    overload = result.get("overload")
    if overload:
        rows += _overload_rows(overload)
    elif result["error_reasons"]:
        reasons = ", ".join(
            f"{reason} {count}" for reason, count in result["error_reasons"].items()
        )
        rows.append(("error reasons", reasons))
    rows += _budget_rows(result)
    rows += [
        ("server RSS max", _rss(result)),
        ("transfers stored", _number(result["transfers_stored"])),
        ("preloaded", _number(result["preload"])),
        ("pgbench tpcb-like tps (32 clients)", _pgbench(result)),
        ("gRPC health echo calls/s (64 in flight)", _number(result["echo_rps"])),
        ("self-check", str(result["self_check"])),
    ]
    sweep = result.get("sweep")
    if sweep:
        rows.append(("sweep", ""))
        for point in sweep:
            rows.append(
                (
                    f"  {point['inflight']} in flight",
                    f"{_number(point['transfers_per_s'])} transfers/s, "
                    f"p99 {_number(point['latency_ms_p99'], 1)} ms, "
                    f"errors {point['errors']}",
                )
            )
    rows += [("results", str(result.get("json_path"))), ("plot", str(result.get("plot_path")))]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        stream.write(f"{name:<{width}}  {value}\n")


def _budget_rows(result: dict[str, Any]) -> list[tuple[str, str]]:
    """CPU µs per transfer by process group (and the cores each kept busy)."""
    rows = []
    for label, budget, cores in (
        ("CPU µs per transfer", result.get("cpu_us_per_transfer"), result.get("cpu_cores")),
        ("  batch beside it", result.get("batch_cpu_us_per_transfer"), None),
    ):
        if budget:
            rows.append(
                (
                    label,
                    ", ".join(
                        f"{name} {_number(value, 1)}"
                        + (f" ({cores[name]:.2f} cores)" if cores and name in cores else "")
                        for name, value in budget.items()
                    ),
                )
            )
    return rows


def _load(result: dict[str, Any]) -> str:
    overload = result.get("overload")
    if overload:
        load = (
            f"open loop at {overload['factor']}x capacity: "
            f"{_number(overload['offered_single_calls_per_s'])} single calls/s and "
            f"{_number(overload['offered_batch_calls_per_s'], 1)} batch calls/s "
            f"of {result['batch_size']}"
        )
    else:
        load = f"{result['inflight']} in flight" + (
            f", batches of {result['batch_size']}"
            if result["batch_size"] is not None
            else ", single calls"
        )
    return load + f", {result['wallets']:,} wallets, skew {result['skew']:g}"


def _overload_rows(overload: dict[str, Any]) -> list[tuple[str, str]]:
    refusals = overload["refusals"]
    refused = sum(refusals.values())
    by_reason = ", ".join(f"{reason} {count:,}" for reason, count in refusals.items()) or "none"
    recovery = overload["recovery_s"]
    return [
        (
            "capacity (measured first)",
            f"{_number(overload['capacity_single_calls_per_s'])} single calls/s, "
            f"{_number(overload['capacity_batch_transfers_per_s'])} transfers/s in batches",
        ),
        ("refused calls by reason", by_reason),
        (
            "  with a retry-after hint",
            f"{overload['refusals_with_retry_after']:,} of {refused:,}",
        ),
        (
            "admitted single calls",
            f"{overload['single_calls_admitted']:,}: p50 "
            f"{_number(overload['single_latency_ms_p50'], 1)} ms, p99 "
            f"{_number(overload['single_latency_ms_p99'], 1)} ms",
        ),
        (
            "admitted batch calls",
            f"{overload['batch_calls_admitted']:,}: p50 "
            f"{_number(overload['batch_latency_ms_p50'], 1)} ms, p99 "
            f"{_number(overload['batch_latency_ms_p99'], 1)} ms",
        ),
        (
            "recovery after the load stopped",
            (f"{recovery:.3f} s" if recovery is not None else "not within 30 s")
            + f" (a single call within {overload['recovery_latency_ms_max']:.1f} ms; idle p50 "
            f"{overload['idle_single_latency_ms_p50']:.1f} ms); calls in flight done after "
            + (f"{overload['drained_s']:.1f} s" if overload["drained_s"] is not None else "-"),
        ),
        ("calls not sent (client saturated)", f"{overload['calls_not_sent']:,}"),
    ]


def _pgbench(result: dict[str, Any]) -> str:
    if result["pgbench_tps"] is not None:
        return _number(result["pgbench_tps"])
    return result.get("pgbench_note") or "-"


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def plot(result: dict[str, Any], path: Path) -> str | None:
    """Writes the PNG; returns why not if it cannot (no matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
    except ImportError:
        return "no plot: matplotlib is not installed (pip install matplotlib)"
    sweep = result.get("sweep")
    figure, (top, bottom) = pyplot.subplots(2, 1, figsize=(10, 8), sharex=True)
    title = _title(result)
    if sweep:
        _plot_sweep(sweep, top, bottom)
    else:
        _plot_series(result["series"], top, bottom, result["batch_size"] is None)
    for name, value, style in (
        ("pgbench tpcb-like tps, 32 clients", result["pgbench_tps"], ":"),
        ("gRPC health echo calls/s, 64 in flight", result["echo_rps"], "-."),
    ):
        if value:
            top.axhline(
                value, color="grey", linestyle=style, linewidth=1, label=f"{name}: {value:,.0f}"
            )
    top.legend(loc="best", fontsize=8)
    top.set_ylim(bottom=0)
    bottom.set_ylim(bottom=0)
    top.grid(True, alpha=0.3)
    bottom.grid(True, alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
    return None


def _title(result: dict[str, Any]) -> str:
    load = (
        f"batches of {result['batch_size']}" if result["batch_size"] is not None else "single calls"
    )
    workers = result["workers"]
    server = f"coffer serve, {workers_phrase(workers)}" if workers else f"server {result['server']}"
    return (
        f"coffer bench {result['scenario']}: {load}, {result['wallets']:,} wallets, "
        f"skew {result['skew']:g}, {server}\n"
        f"{_number(result['transfers_stored'])} transfers stored "
        f"({_number(result['preload'])} preloaded); self-check {result['self_check']}"
    )


def _plot_series(
    series: Sequence[dict[str, Any]], top: Any, bottom: Any, single_calls: bool
) -> None:
    seconds = [point["second"] for point in series]
    top.plot(seconds, [point["transfers"] for point in series], marker="o", label="transfers/s")
    calls = [point["rpcs"] for point in series]
    if single_calls and calls != [point["transfers"] for point in series]:
        top.plot(seconds, calls, marker=".", label="calls/s (with reads)")
    errors = [point["errors"] + point["refused"] for point in series]
    if any(errors):
        top.plot(seconds, errors, color="red", marker="x", label="errors + refused /s")
    top.set_ylabel("transfers per second")
    for name, style in (("p50", "-"), ("p90", "--"), ("p99", "-."), ("max", ":")):
        values = [point[f"latency_ms_{name}"] for point in series]
        bottom.plot(seconds, values, linestyle=style, marker=".", label=name)
    bottom.set_ylabel("latency per call (ms)")
    bottom.set_xlabel("second of the measured run")
    bottom.legend(loc="upper right", fontsize=8)


def _plot_sweep(sweep: Sequence[dict[str, Any]], top: Any, bottom: Any) -> None:
    inflight = [point["inflight"] for point in sweep]
    top.plot(
        inflight, [point["transfers_per_s"] for point in sweep], marker="o", label="transfers/s"
    )
    for x, point in zip(inflight, sweep, strict=True):
        top.annotate(
            f"{point['transfers_per_s']:,.0f}",
            (x, point["transfers_per_s"]),
            textcoords="offset points",
            xytext=(0, 6),
            ha="center",
            fontsize=8,
        )
    errors = [point["errors"] / point["duration_s"] for point in sweep]
    if any(errors):
        top.plot(inflight, errors, color="red", marker="x", label="failed operations/s")
    top.set_ylabel("transfers per second")
    for name, style in (("p50", "-"), ("p99", "-.")):
        values = [point[f"latency_ms_{name}"] for point in sweep]
        bottom.plot(inflight, values, linestyle=style, marker="o", label=name)
    bottom.set_ylabel("latency per call (ms)")
    bottom.set_xlabel("calls in flight")
    bottom.set_xscale("log", base=2)
    bottom.set_xticks(inflight, [str(value) for value in inflight])
    bottom.legend(loc="upper left", fontsize=8)
