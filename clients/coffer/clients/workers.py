"""Which of a server's processes a connection reached.

A server of several processes (`coffer serve --workers N`) listens with all of them on one
port, and the kernel gives each connection to one of them by a hash of its addresses: evenly
only on average. So every process answers the standard health check
(`/grpc.health.v1.Health/Check`) with the trailing metadata `coffer-worker: K/N`, worker K of
N (a server of one process: 1/1), and a client that opens several connections can check where
each landed and open again those that crowd one worker (`Client(…, connections=…)`).

The one rule for that metadata, defined once: the server (which imports this module) writes
it, the client reads it. Standard library only, so that both can use it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Worker", "crowded", "sole_worker", "worker_metadata_key"]

worker_metadata_key = "coffer-worker"

_worker_pattern = re.compile(r"([1-9][0-9]{0,3})/([1-9][0-9]{0,3})")


@dataclass(frozen=True, slots=True)
class Worker:
    """Worker `number` (from 1) of a server's `count`."""

    number: int
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.number <= self.count:
            raise ValueError(f"worker {self.number} of {self.count}: must be 1 to {self.count}")

    def metadata(self) -> str:
        return f"{self.number}/{self.count}"

    @classmethod
    def parse(cls, value: str) -> Worker | None:
        """The worker the metadata's value names; None if it names none (a server that does
        not say, or says something else)."""
        found = _worker_pattern.fullmatch(value)
        if found is None:
            return None
        number, count = int(found[1]), int(found[2])
        return cls(number, count) if number <= count else None


# A server of one process.
sole_worker = Worker(1, 1)


def crowded(reached: Iterable[Worker | None]) -> list[int]:
    """Of connections that reached these workers (in order; None where it is not known), the
    positions of those to open again so that the workers share them evenly: of C connections
    over W workers, each worker keeps C // W, and C % W of them one more. Empty when they
    share them so, or when it is not known (a connection whose worker is unknown, or workers
    that disagree on how many they are)."""
    workers = list(reached)
    counts = {worker.count for worker in workers if worker is not None}
    if not workers or None in workers or len(counts) != 1:
        return []
    (count,) = counts
    share, extras = divmod(len(workers), count)
    held: Counter[Worker | None] = Counter()
    again = []
    for position, worker in enumerate(workers):
        if held[worker] < share:
            held[worker] += 1
        elif held[worker] == share and extras:
            held[worker] += 1
            extras -= 1
        else:
            again.append(position)
    return again
