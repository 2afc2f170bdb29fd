"""The overload scenario of `coffer bench`: more load than the server can take, then none.

1. Idle: single Transfer calls one after another; their median latency is the normal one.
2. Capacity: for the calibration time (`--warmup`, at least 1 s), batch calls of
   `--batch-size` transfers (2 in flight) and single Transfer calls (16 in flight) at once,
   closed-loop: what the server applies of each per second.
3. Overload: for `--duration`, open-loop arrivals at `overload_factor` (4) times both
   capacities (single calls at most `single_calls_per_s_max`): batch calls and single calls
   sent at those rates whatever the answers, each call with the client's deadline and no
   retries.
4. Recovery: the load stops (calls in flight finish on their own); single calls one after
   another until one succeeds within `recovered_latency_factor` times the idle median (at
   least `recovered_latency_ms_min`): the time from the stop to that answer.

What it reports, besides the usual figures (transfers/s applied; the latency percentiles are
those of the admitted single calls): the refusals by reason, counted per call, and how many
carried ErrorInfo with a retry-after hint; the admitted single and batch calls' latencies;
the recovery time; and (from the caller) the server's peak RSS. The targets: RSS ≤ 256 MB,
every refusal OVERLOADED with ErrorInfo, admitted single calls' p99 ≤ 100 ms, recovery
within 1 s.
"""

from __future__ import annotations

import asyncio
import random
import time
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from coffer.bench.load import BatchWorkload, Fixture, Note, SingleWorkload
from coffer.bench.measure import Recorder, percentile_ms
from coffer.clients import Client, errors

__all__ = ["run"]

overload_factor = 4
# The client is one Python process on the same machine: past about this rate of single
# calls it would measure itself rather than the server (each call costs it some 150 us).
# Batch calls cost it little, so they carry the overload.
single_calls_per_s_max = 500
calibration_s_min = 1.0
calibration_batch_inflight = 2
calibration_single_inflight = 16
idle_calls = 30
recovered_latency_factor = 2
recovered_latency_ms_min = 5.0
recovery_s_max = 30.0
# Arrivals are sent in ticks; past this many calls in flight the client stops sending (it
# would measure itself, not the server) and counts what it did not send.
tick_s = 0.005
client_calls_max = 20_000
# How long calls still in flight at the stop may take to finish before they are abandoned.
drain_s_max = 60.0


class _Tally:
    """Calls of one kind: latencies of those admitted, refusals and failures by reason."""

    def __init__(self) -> None:
        self.latencies = array("d")
        self.transfers = 0
        self.reasons: Counter[str] = Counter()
        self.hinted = 0  # refusals with ErrorInfo and a retry-after hint

    def failed(self, error: Exception) -> None:
        reason = error.reason if isinstance(error, errors.CofferError) else type(error).__name__
        self.reasons[reason] += 1
        if isinstance(error, errors.Overloaded) and error.retry_after_ms is not None:
            self.hinted += 1


async def run(
    fixture: Fixture,
    client: Client,
    *,
    batch_size: int,
    skew: float,
    seed: int,
    calibration_s: float,
    duration_s: float,
    note: Note,
) -> dict[str, Any]:
    randomness = random.Random(seed)
    singles = SingleWorkload(fixture, skew, randomness)
    batches = BatchWorkload("batch", fixture, batch_size, skew, randomness)
    # Keys of their own: both workloads number their keys from 0.
    singles.key_prefix += "s-"
    batches.key_prefix += "b-"

    idle = array("d")
    for _ in range(idle_calls):
        started = time.perf_counter()
        await singles.transfer(client)
        idle.append(time.perf_counter() - started)
    idle_ms = percentile_ms(sorted(idle), 50) or 0.0
    threshold_ms = max(recovered_latency_factor * idle_ms, recovered_latency_ms_min)

    calibration_s = max(calibration_s, calibration_s_min)
    note(f"overload: measuring capacity for {calibration_s:g} s")
    single_capacity, batch_capacity = await _capacity(
        singles, batches, client, batch_size, calibration_s
    )
    single_rate = min(overload_factor * single_capacity, single_calls_per_s_max)
    batch_rate = overload_factor * batch_capacity / batch_size
    note(
        f"overload: capacity {single_capacity:,.0f} single calls/s and {batch_capacity:,.0f} "
        f"transfers/s in batches; sending {single_rate:,.0f} single calls/s and "
        f"{batch_rate:,.1f} batch calls/s for {duration_s:g} s"
    )

    recorder = Recorder(0.0, duration_s)
    single_tally, batch_tally = _Tally(), _Tally()
    in_flight: set[asyncio.Task[None]] = set()

    async def single_call(client: Client) -> None:
        started = time.perf_counter()
        try:
            await singles.transfer(client)
        except Exception as error:
            single_tally.failed(error)
            recorder.record(started, time.perf_counter(), 0, errors=1, timed=False)
            return
        ended = time.perf_counter()
        single_tally.latencies.append(ended - started)
        single_tally.transfers += 1
        recorder.record(started, ended, 1)

    async def batch_call(client: Client) -> None:
        operations = batches.next_operations()
        started = time.perf_counter()
        try:
            results = await client.submit_batch(operations)
        except Exception as error:
            batch_tally.failed(error)
            count = len(operations)
            recorder.record(started, time.perf_counter(), 0, errors=count, timed=False)
            return
        ended = time.perf_counter()
        applied = sum(1 for result in results if not result.HasField("error"))
        batch_tally.latencies.append(ended - started)
        batch_tally.transfers += applied
        recorder.record(started, ended, applied, refused=len(results) - applied, timed=False)

    recorder.start()
    unsent = await _open_loop(
        [(single_call, single_rate), (batch_call, batch_rate)], client, duration_s, in_flight
    )
    stopped = time.perf_counter()
    note(f"overload: stopped with {len(in_flight):,} calls in flight; measuring recovery")
    recovery_s, drained_s = await asyncio.gather(
        _recovery(singles, client, threshold_ms, stopped), _drained(set(in_flight), stopped)
    )

    point = recorder.summary()
    refusals = single_tally.reasons + batch_tally.reasons
    point["error_reasons"] = dict(refusals.most_common())
    point["inflight"] = None
    point["overload"] = {
        "factor": overload_factor,
        "idle_single_latency_ms_p50": round(idle_ms, 3),
        "capacity_single_calls_per_s": round(single_capacity, 1),
        "capacity_batch_transfers_per_s": round(batch_capacity, 1),
        "offered_single_calls_per_s": round(single_rate, 1),
        "offered_batch_calls_per_s": round(batch_rate, 2),
        "single_calls_admitted": len(single_tally.latencies),
        "batch_calls_admitted": len(batch_tally.latencies),
        "single_latency_ms_p50": percentile_ms(sorted(single_tally.latencies), 50),
        "single_latency_ms_p99": percentile_ms(sorted(single_tally.latencies), 99),
        "batch_latency_ms_p50": percentile_ms(sorted(batch_tally.latencies), 50),
        "batch_latency_ms_p99": percentile_ms(sorted(batch_tally.latencies), 99),
        "refusals": dict(refusals.most_common()),
        "refusals_single": dict(single_tally.reasons.most_common()),
        "refusals_batch": dict(batch_tally.reasons.most_common()),
        "refusals_with_retry_after": single_tally.hinted + batch_tally.hinted,
        "calls_not_sent": unsent,
        "recovery_s": recovery_s,
        "recovery_latency_ms_max": round(threshold_ms, 3),
        "drained_s": drained_s,
    }
    return point


async def _capacity(
    singles: SingleWorkload,
    batches: BatchWorkload,
    client: Client,
    batch_size: int,
    calibration_s: float,
) -> tuple[float, float]:
    """Single calls applied per second, and transfers applied per second in batch calls, with
    both loads at once, closed-loop."""
    ends = time.perf_counter() + calibration_s
    applied = {"single": 0, "batch": 0}

    async def single_loop() -> None:
        while time.perf_counter() < ends:
            try:
                await singles.transfer(client)
                applied["single"] += 1
            except errors.CofferError:
                await asyncio.sleep(0.05)

    async def batch_loop() -> None:
        while time.perf_counter() < ends:
            try:
                results = await client.submit_batch(batches.next_operations())
                applied["batch"] += sum(1 for result in results if not result.HasField("error"))
            except errors.CofferError:
                await asyncio.sleep(0.05)

    started = time.perf_counter()
    await asyncio.gather(
        *(single_loop() for _ in range(calibration_single_inflight)),
        *(batch_loop() for _ in range(calibration_batch_inflight)),
    )
    elapsed = time.perf_counter() - started
    # At least one of each per second, so that the overload sends some of both.
    return max(applied["single"] / elapsed, 1.0), max(applied["batch"] / elapsed, batch_size)


async def _open_loop(
    senders: Sequence[tuple[Callable[[Client], Coroutine[Any, Any, None]], float]],
    client: Client,
    duration_s: float,
    in_flight: set[asyncio.Task[None]],
) -> int:
    """Starts each sender's calls at its rate (calls/s) for the duration, whatever the answers;
    returns how many it did not start because too many were in flight already."""
    started = time.perf_counter()
    sent = [0] * len(senders)
    unsent = 0
    while (elapsed := time.perf_counter() - started) < duration_s:
        for index, (send, rate) in enumerate(senders):
            due = int(rate * elapsed) - sent[index]
            for _ in range(due):
                sent[index] += 1
                if len(in_flight) >= client_calls_max:
                    unsent += 1
                    continue
                task = asyncio.create_task(send(client))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        await asyncio.sleep(tick_s)
    return unsent


async def _drained(in_flight: set[asyncio.Task[None]], stopped: float) -> float | None:
    """Seconds from the stop until the calls then in flight are done; None if some are not
    within drain_s_max (they are cancelled)."""
    if in_flight:
        _, late = await asyncio.wait(in_flight, timeout=drain_s_max)
        for task in late:
            task.cancel()
        if late:
            return None
    return round(time.perf_counter() - stopped, 3)


async def _recovery(
    singles: SingleWorkload, client: Client, threshold_ms: float, stopped: float
) -> float | None:
    """Seconds from the stop until a single call succeeds within the threshold; None if none
    does within recovery_s_max."""
    while time.perf_counter() - stopped < recovery_s_max:
        started = time.perf_counter()
        try:
            await singles.transfer(client)
        except errors.CofferError:
            await asyncio.sleep(0.01)
            continue
        ended = time.perf_counter()
        if (ended - started) * 1000 <= threshold_ms:
            return round(ended - stopped, 3)
    return None
