"""Which of a server's processes a connection reached.

A server of several processes (`coffer serve --workers N`) listens with all of them on one
port, and the kernel gives each connection to one of them by a hash of its addresses: evenly
only on average. So every process answers the standard health check
(`/grpc.health.v1.Health/Check`) with the trailing metadata `coffer-worker: K/N@ID`: worker K
of N of the server started as ID (random hex, new at each start of the server; a server of one
process: 1/1@ID). A client that opens several connections can check which worker each
reached, open again those that leave a worker unreached, and send each call to the worker with
the fewest of its calls in flight (`Client(…, connections=…)`).

Behind a proxy that balances calls itself (an HTTP/2 proxy), a connection reaches the proxy,
and which worker answers is the proxy's choice each call: the answers then name workers of
several servers, or a connection changes worker between checks, and the client leaves its
connections as they are.

The one rule for that metadata and for what a client does with it, defined once: the server
(which imports this module) writes it, the client reads it. Standard library only, so that
both can use it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass

__all__ = [
    "Spread",
    "Worker",
    "instance_id_bytes",
    "new_instance",
    "spread",
    "worker_metadata_key",
    "workers_max",
]

worker_metadata_key = "coffer-worker"
# Processes of `coffer serve` at most (each opens its own database pools).
workers_max = 64
# The random bytes of a server's instance id, in hex in the metadata.
instance_id_bytes = 8

_instance_pattern = re.compile(rf"[0-9a-f]{{{2 * instance_id_bytes}}}")
_worker_pattern = re.compile(
    rf"([1-9][0-9]{{0,4}})/([1-9][0-9]{{0,4}})@({_instance_pattern.pattern})"
)


@dataclass(frozen=True, slots=True)
class Worker:
    """Worker `number` (from 1) of the `count` of the server started as `instance`."""

    number: int
    count: int
    instance: str

    def __post_init__(self) -> None:
        if (
            not all(type(each) is int for each in (self.number, self.count))
            or not 1 <= self.number <= self.count <= workers_max
        ):
            raise ValueError(
                f"worker {self.number!r} of {self.count!r}: must be 1 to {self.count}, of 1 "
                f"to {workers_max}"
            )
        if not isinstance(self.instance, str) or not _instance_pattern.fullmatch(self.instance):
            raise ValueError(
                f"instance {self.instance!r}: must be {2 * instance_id_bytes} hex digits"
            )

    def metadata(self) -> str:
        return f"{self.number}/{self.count}@{self.instance}"

    @classmethod
    def parse(cls, value: str) -> Worker | None:
        """The worker the metadata's value names; None if it names none (a server that does
        not say, or says something else)."""
        found = _worker_pattern.fullmatch(value)
        if found is None:
            return None
        number, count, instance = int(found[1]), int(found[2]), found[3]
        if not number <= count <= workers_max:
            return None
        return cls(number, count, instance)


@dataclass(frozen=True, slots=True)
class Spread:
    """What a client does with its connections, given the worker each reached: `again`, the
    positions of the connections to open again; `groups`, the positions of the connections
    of each worker, by worker number; and whether a worker is left unreached (possibly with
    nothing to open again: every connection that could be carries a stream)."""

    again: list[int]
    groups: list[list[int]]
    unreached: bool


def new_instance() -> str:
    """The instance id of a server starting now, which each of its workers says."""
    return secrets.token_hex(instance_id_bytes)


def spread(reached: Sequence[Worker | None], pinned: Collection[int] = ()) -> Spread | None:
    """Of connections that reached these workers (in order; None where a check failed or the
    server does not say), which to open again so that every worker is reached (of fewer
    connections than workers, so that no two reach one): while some worker is reached by
    none, every connection to a worker after its first, the `pinned` ones (positions: those
    that carry a stream) first in their group and never opened again. None when it is not
    known: a connection's worker unknown, or workers of several servers (a proxy's choice)."""
    if not reached or None in reached:
        return None
    instances = {(worker.instance, worker.count) for worker in reached if worker is not None}
    if len(instances) != 1:
        return None
    ((_, count),) = instances
    by_number: dict[int, list[int]] = {}
    for position, worker in enumerate(reached):
        assert worker is not None
        by_number.setdefault(worker.number, []).append(position)
    groups = [
        sorted(by_number[number], key=lambda position: position not in pinned)
        for number in sorted(by_number)
    ]
    again: list[int] = []
    unreached = len(groups) < min(count, len(reached))
    if unreached:
        again = sorted(
            position for positions in groups for position in positions[1:] if position not in pinned
        )
    return Spread(again, groups, unreached)
