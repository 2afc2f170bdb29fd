"""What `coffer bench` measures: per-second counts and latencies of the calls that complete
in the measured window, and the progress line while it runs.

Latency is per call (per batch, for SubmitBatch), over the calls that got an answer: a
refusal is an answer; a call that failed outright (OVERLOADED, UNAVAILABLE, a transport
error) counts among the errors, with all its operations, and not in the latency.
Percentiles are by nearest rank.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from array import array
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = [
    "CpuMeter",
    "ProcessStat",
    "Recorder",
    "percentile_ms",
    "process_stats",
    "process_tree",
    "progress",
]

progress_interval_tty_s = 1.0
progress_interval_s = 5.0


# What a run measures -------------------------------------------------------------------------


class Recorder:
    """Counts what completes inside the measured window [warmup, warmup + duration), per
    second; what completes in the warmup or after the window only shows in the progress."""

    def __init__(self, warmup_s: float, duration_s: float) -> None:
        self.warmup_s = warmup_s
        self.duration_s = duration_s
        seconds = int(duration_s) + 1
        self.transfers = [0] * seconds
        self.rpcs = [0] * seconds
        self.errors = [0] * seconds
        self.refused = [0] * seconds
        self.latencies = [array("d") for _ in range(seconds)]
        self.reasons: Counter[str] = Counter()
        self.live_transfers = 0
        self.live_errors = 0
        self.started = self.measure_start = self.measure_end = 0.0

    def start(self) -> None:
        self.started = time.perf_counter()
        self.measure_start = self.started + self.warmup_s
        self.measure_end = self.measure_start + self.duration_s

    def running(self) -> bool:
        return time.perf_counter() < self.measure_end

    def record(
        self,
        started: float,
        ended: float,
        transfers: int,
        refused: int = 0,
        errors: int = 0,
        reasons: Mapping[str, int] | None = None,
        timed: bool = True,
    ) -> None:
        """One call: its operations that succeeded, were refused or failed. Latency is kept
        for the calls that got an answer (a refusal is one), not for those that failed."""
        self.live_transfers += transfers
        self.live_errors += errors
        if not self.measure_start <= ended < self.measure_end:
            return
        second = int(ended - self.measure_start)
        self.transfers[second] += transfers
        self.rpcs[second] += 1
        self.errors[second] += errors
        self.refused[second] += refused
        if timed:
            self.latencies[second].append(ended - started)
        if reasons:
            self.reasons.update(reasons)

    def summary(self) -> dict[str, Any]:
        duration = self.duration_s
        latencies = sorted(itertools.chain.from_iterable(self.latencies))
        series = []
        for second in range(int(duration)):
            ordered = sorted(self.latencies[second])
            series.append(
                {
                    "second": second + 1,
                    "transfers": self.transfers[second],
                    "rpcs": self.rpcs[second],
                    "errors": self.errors[second],
                    "refused": self.refused[second],
                    "latency_ms_p50": percentile_ms(ordered, 50),
                    "latency_ms_p90": percentile_ms(ordered, 90),
                    "latency_ms_p99": percentile_ms(ordered, 99),
                    "latency_ms_max": percentile_ms(ordered, 100),
                }
            )
        transfers = sum(self.transfers)
        rpcs = sum(self.rpcs)
        return {
            "duration_s": duration,
            "transfers": transfers,
            "transfers_per_s": round(transfers / duration, 1),
            "rpcs": rpcs,
            "rpcs_per_s": round(rpcs / duration, 1),
            "errors": sum(self.errors),
            "refused": sum(self.refused),
            "error_reasons": dict(self.reasons.most_common()),
            "latency_ms_mean": round(sum(latencies) / len(latencies) * 1000, 3)
            if latencies
            else None,
            "latency_ms_p50": percentile_ms(latencies, 50),
            "latency_ms_p90": percentile_ms(latencies, 90),
            "latency_ms_p99": percentile_ms(latencies, 99),
            "latency_ms_p999": percentile_ms(latencies, 99.9),
            "latency_ms_max": percentile_ms(latencies, 100),
            "series": series,
        }


def percentile_ms(ordered: Sequence[float], percent: float) -> float | None:
    """Nearest rank, in milliseconds; None without samples."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * percent // 100))
    return round(ordered[int(rank) - 1] * 1000, 3)


async def progress(label: str, unit: str, recorder: Recorder, stream: TextIO) -> None:
    """A line on stderr: rewritten in place every second on a terminal, else every 5 s."""
    tty = stream.isatty()
    interval = progress_interval_tty_s if tty else progress_interval_s
    last_time, last_transfers = time.perf_counter(), 0
    try:
        while True:
            await asyncio.sleep(interval)
            now = time.perf_counter()
            rate = (recorder.live_transfers - last_transfers) / (now - last_time)
            last_time, last_transfers = now, recorder.live_transfers
            if now < recorder.measure_start:
                phase = f"warmup {now - recorder.started:4.1f}/{recorder.warmup_s:g} s"
            else:
                elapsed = min(now - recorder.measure_start, recorder.duration_s)
                phase = f"{elapsed:5.1f}/{recorder.duration_s:g} s"
            line = f"{label}: {phase}  {rate:10,.0f} {unit}/s  errors {recorder.live_errors:,}"
            if tty:
                stream.write(f"\r\x1b[K{line}")
            else:
                stream.write(line + "\n")
            stream.flush()
    except asyncio.CancelledError:
        if tty:
            stream.write("\r\x1b[K")
            stream.flush()
        raise


# CPU time per process tree --------------------------------------------------------------------


class CpuMeter:
    """The CPU seconds (user + system) spent so far by each named group of processes: a
    group is a list of root pids, each counted with every process below it (live children as
    they run, exited ones through their parent's reaped-children times), and "client" is this
    process. Differences of two readings give what each group spent between them."""

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        self._groups = {name: list(pids) for name, pids in groups.items() if pids}
        self._ticks = os.sysconf("SC_CLK_TCK")

    def read(self) -> dict[str, float]:
        stats = process_stats()
        reading = {
            name: sum(stats[pid].ticks for pid in process_tree(pids, stats)) / self._ticks
            for name, pids in self._groups.items()
        }
        times = os.times()
        reading["client"] = times.user + times.system
        return reading


@dataclass(frozen=True, slots=True)
class ProcessStat:
    """What /proc/PID/stat says of a process."""

    parent: int
    # R, S, D, Z (a zombie: exited, not yet reaped), …
    state: str
    # Its CPU ticks (user + system), its own and its reaped children's.
    ticks: int


def process_stats() -> dict[int, ProcessStat]:
    """Every process's, by pid."""
    stats = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as file:
                text = file.read()
        except OSError:
            continue
        # After the command's closing parenthesis: state, ppid, ..., utime (14th field),
        # stime, cutime, cstime.
        fields = text[text.rindex(")") + 2 :].split()
        stats[int(entry.name)] = ProcessStat(
            int(fields[1]), fields[0], sum(int(value) for value in fields[11:15])
        )
    return stats


def process_tree(roots: Sequence[int], stats: Mapping[int, ProcessStat] | None = None) -> list[int]:
    """`roots` and every process below them, those of `stats` (by default, read now) alone."""
    if stats is None:
        stats = process_stats()
    children: dict[int, list[int]] = {}
    for pid, stat in stats.items():
        children.setdefault(stat.parent, []).append(pid)
    found: list[int] = []
    pending = [pid for pid in roots if pid in stats]
    while pending:
        pid = pending.pop()
        found.append(pid)
        pending.extend(children.get(pid, ()))
    return found
