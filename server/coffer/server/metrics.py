"""Prometheus metrics of one server, on a registry of its own, served over HTTP.

    metrics = Metrics()
    apply = metrics.observed_apply(ledger.apply)             # the batches, as applied
    register(server, servicer, service, admitting, metrics.observed)   # every RPC
    metrics.track(queued=..., pools=..., database_up=..., admission=...)
    port = metrics.serve("127.0.0.1:9090")                   # GET /metrics
    ...
    await metrics.stop()

A registry per `Metrics`, never the library's global one: several servers may run in one
process (the tests do), each counting its own calls.

Per call, the cost is constant and small: a call's counter and its method's histogram are
looked up once per method (and status code), then a call adds to two of them. Per database
batch: one histogram and a few counters, and one pass over the batch's answers to count what
they were. What the server knows already (the batcher's queue, the pools, admission's calls
and bytes in progress, the database's health, how far the event watchers are behind) is read
only when scraped, by callbacks: nothing is updated per call for it.

The HTTP endpoint is prometheus-client's, on threads of its own: callbacks run on those
threads, so each only reads a few attributes (no await, no lock of the event loop's), as the
ones given to `track` and `EventsBehind.add` must.

The metrics, with their labels; `coffer_*_total` are counters:
- coffer_rpcs_total{service, method, code}: calls answered, by status code name (OK,
  INVALID_ARGUMENT, …; CANCELLED when the caller went away);
- coffer_rpc_duration_seconds{service, method}: histogram of the time from the request's
  admission to the answer;
- coffer_admission_refusals_total{reason}: requests refused before they were decoded
  (OVERLOADED) or because they did not decode (MALFORMED_REQUEST);
- coffer_batch_operations: histogram of operations per database batch applied (its count is
  the batches applied, its sum the operations in them);
- coffer_batch_duration_seconds: histogram of the time a database batch took to apply;
- coffer_batches_applied_total, coffer_batches_failed_total{reason}: database batches applied,
  and failed as a whole (UNAVAILABLE, INTERNAL…);
- coffer_operations_total{outcome}: operations in applied batches: applied, replayed (the
  stored answer to an earlier request with the same key), refused;
- coffer_operations_refused_total{reason}: refused operations by reason;
- coffer_transfers_applied_total: transfers written (an applied operation writes one or more);
- coffer_batcher_queued_operations: operations waiting for a batch;
- coffer_admission_calls_in_progress, coffer_admission_request_bytes_in_progress: what
  admission counts against --calls-max and --queued-bytes-max;
- coffer_event_loop_lag_seconds: how late the event loop runs, smoothed;
- coffer_pool_connections_in_use{pool}, coffer_pool_connections_open{pool},
  coffer_pool_connections_max{pool}: the database connections of each pool (write, read,
  health, access);
- coffer_database_up: 1 while the health check reaches the database, else 0;
- coffer_events_behind, coffer_event_watchers: the most records (committed write
  transactions, each one or more events) any watcher of the event stream has yet to read, as
  far as the server has heard of them, and how many watchers there are (`EventsBehind`);
- process_* and python_*: the process's CPU, memory, open files, and the interpreter's
  garbage collection (prometheus-client's own collectors).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing
from typing import Any, cast

import asyncpg
import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coffer.core import errors
from coffer.core.model import Applied, Operation, Rejected, batch_operations_max

from .admission import Admission, Refused
from .batcher import Answer, Apply

__all__ = [
    "EventsBehind",
    "Handler",
    "Metrics",
    "batch_operations_buckets",
    "duration_buckets_s",
]

# A guarded RPC method, as `admission.register` serves it.
Handler = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]

# Calls take from a fraction of a millisecond (a read) to seconds (a large batch, under load).
duration_buckets_s = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
batch_operations_buckets = (
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500,
    1000,
    2000,
    5000,
    batch_operations_max,
)


class EventsBehind(Collector):
    """The hook of the events-behind gauge. Each watcher of the event stream adds a callback
    saying how many events it has yet to send (the position of the newest event minus the
    position it has sent), and removes it when it ends; a scrape reports the most any watcher
    is behind (0 with none) and how many watchers there are. Callbacks run on the HTTP
    endpoint's threads: they read a number or two, nothing more."""

    def __init__(self) -> None:
        self._sources: dict[int, Callable[[], int]] = {}
        self._numbers = itertools.count()

    def add(self, behind: Callable[[], int]) -> Callable[[], None]:
        """Adds a watcher's callback; returns what removes it (idempotent)."""
        number = next(self._numbers)
        self._sources[number] = behind

        def remove() -> None:
            self._sources.pop(number, None)

        return remove

    def collect(self) -> Iterator[Metric]:
        # A copy taken at once: the event loop may add or remove one meanwhile.
        sources = list(self._sources.values())
        yield GaugeMetricFamily(
            "coffer_events_behind",
            "The most records (committed write transactions) a watcher of the event stream has yet "
            "to read (0 with none).",
            value=max((source() for source in sources), default=0),
        )
        yield GaugeMetricFamily(
            "coffer_event_watchers",
            "Watchers of the event stream.",
            value=len(sources),
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
        self.events_behind = EventsBehind()
        registry.register(self.events_behind)
        self._rpcs = Counter(
            "coffer_rpcs",
            "Calls answered, by service, method and status code.",
            ("service", "method", "code"),
            registry=registry,
        )
        self._rpc_duration = Histogram(
            "coffer_rpc_duration_seconds",
            "Time from a request's admission to its answer, by service and method.",
            ("service", "method"),
            buckets=duration_buckets_s,
            registry=registry,
        )
        self._admission_refusals = Counter(
            "coffer_admission_refusals",
            "Requests refused before they were decoded (OVERLOADED), or that did not decode "
            "(MALFORMED_REQUEST).",
            ("reason",),
            registry=registry,
        )
        self._batch_operations = Histogram(
            "coffer_batch_operations",
            "Operations per database batch applied.",
            buckets=batch_operations_buckets,
            registry=registry,
        )
        self._batch_duration = Histogram(
            "coffer_batch_duration_seconds",
            "Time a database batch took to apply.",
            buckets=duration_buckets_s,
            registry=registry,
        )
        self._batches_applied = Counter(
            "coffer_batches_applied", "Database batches applied.", registry=registry
        )
        self._batches_failed = Counter(
            "coffer_batches_failed",
            "Database batches failed as a whole, by reason.",
            ("reason",),
            registry=registry,
        )
        operations = Counter(
            "coffer_operations",
            "Operations in the batches applied, by outcome: applied, replayed, refused.",
            ("outcome",),
            registry=registry,
        )
        self._operations_applied = operations.labels("applied")
        self._operations_replayed = operations.labels("replayed")
        self._operations_refused = operations.labels("refused")
        self._refusals = Counter(
            "coffer_operations_refused",
            "Operations refused, by reason.",
            ("reason",),
            registry=registry,
        )
        self._transfers_applied = Counter(
            "coffer_transfers_applied", "Transfers written.", registry=registry
        )
        self._endpoint: Any = None
        self._endpoint_thread: Any = None

    # Per call and per batch -------------------------------------------------------------------

    def observed(self, handler: Handler, service: str, method: str) -> Handler:
        """`handler` (a guarded RPC method of `service`, unary or server streaming), counting
        its calls by status code and timing them (a stream: until it ends); and counting the
        requests admission refused."""
        duration = self._rpc_duration.labels(service, method)
        rpcs = self._rpcs
        by_code: dict[grpc.StatusCode, Any] = {}
        refusals = self._admission_refusals

        def count(
            context: grpc.aio.ServicerContext[Any, Any], code: grpc.StatusCode | None
        ) -> None:
            if code is None:
                # Set when the call aborted with a status; else None (typed as never None): it
                # answered.
                code = cast("grpc.StatusCode | None", context.code()) or grpc.StatusCode.OK
            counter = by_code.get(code)
            if counter is None:
                counter = by_code[code] = rpcs.labels(service, method, code.name)
            counter.inc()

        if inspect.isasyncgenfunction(handler):
            stream = cast("Callable[..., AsyncGenerator[Any, None]]", handler)

            async def observe_stream(
                request: Any, context: grpc.aio.ServicerContext[Any, Any]
            ) -> AsyncGenerator[Any, None]:
                if type(request) is Refused:
                    refusals.labels(request.error.reason).inc()
                started = time.perf_counter()
                code: grpc.StatusCode | None = None
                try:
                    async with aclosing(stream(request, context)) as responses:
                        async for response in responses:
                            yield response
                except (asyncio.CancelledError, GeneratorExit):
                    code = grpc.StatusCode.CANCELLED
                    raise
                finally:
                    duration.observe(time.perf_counter() - started)
                    count(context, code)

            return cast("Handler", observe_stream)

        async def observe(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            if type(request) is Refused:
                refusals.labels(request.error.reason).inc()
            started = time.perf_counter()
            code: grpc.StatusCode | None = None
            try:
                return await handler(request, context)
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            finally:
                duration.observe(time.perf_counter() - started)
                count(context, code)

        return observe

    def observed_apply(self, apply: Apply) -> Apply:
        """`apply` (the ledger's), counting the batches, their operations and outcomes."""

        async def observe(operations: Sequence[Operation | Rejected]) -> list[Answer]:
            started = time.perf_counter()
            try:
                answers = await apply(operations)
            except errors.CofferError as error:
                self._batches_failed.labels(error.reason).inc()
                raise
            except Exception:
                self._batches_failed.labels(errors.Internal.reason).inc()
                raise
            self._batch_duration.observe(time.perf_counter() - started)
            self._batch_operations.observe(len(operations))
            self._batches_applied.inc()
            self._count(answers)
            return answers

        return observe

    def _count(self, answers: Sequence[Answer]) -> None:
        applied = replayed = transfers = 0
        refused: dict[str, int] = {}
        for answer in answers:
            if isinstance(answer, Applied):
                if answer.replayed:
                    replayed += 1
                else:
                    applied += 1
                    transfers += len(answer.transfers)
            else:
                refused[answer.reason] = refused.get(answer.reason, 0) + 1
        self._operations_applied.inc(applied)
        self._operations_replayed.inc(replayed)
        self._transfers_applied.inc(transfers)
        if refused:
            self._operations_refused.inc(sum(refused.values()))
            for reason, count in refused.items():
                self._refusals.labels(reason).inc(count)

    # Read when scraped ------------------------------------------------------------------------

    def track(
        self,
        *,
        queued: Callable[[], int],
        pools: Mapping[str, asyncpg.Pool],
        database_up: Callable[[], bool],
        admission: Admission,
    ) -> None:
        """What the server knows already, read when scraped: the batcher's queued operations,
        the connections of each named pool, the database's health, admission's counts."""
        registry = self.registry
        Gauge(
            "coffer_batcher_queued_operations",
            "Operations waiting for a batch.",
            registry=registry,
        ).set_function(queued)
        Gauge(
            "coffer_admission_calls_in_progress",
            "Calls admitted and not yet answered (bounded by --calls-max).",
            registry=registry,
        ).set_function(lambda: admission.calls)
        Gauge(
            "coffer_admission_request_bytes_in_progress",
            "Request bytes admitted and not yet answered (bounded by --queued-bytes-max).",
            registry=registry,
        ).set_function(lambda: admission.bytes)
        Gauge(
            "coffer_event_loop_lag_seconds",
            "How late the server's event loop runs, smoothed.",
            registry=registry,
        ).set_function(lambda: admission.loop_lag_ms / 1000)
        Gauge(
            "coffer_database_up",
            "1 while the health check reaches the database, else 0.",
            registry=registry,
        ).set_function(lambda: 1 if database_up() else 0)
        in_use = Gauge(
            "coffer_pool_connections_in_use",
            "Database connections in use, by pool.",
            ("pool",),
            registry=registry,
        )
        opened = Gauge(
            "coffer_pool_connections_open",
            "Database connections open, in use or idle, by pool.",
            ("pool",),
            registry=registry,
        )
        size_max = Gauge(
            "coffer_pool_connections_max",
            "Database connections each pool may open.",
            ("pool",),
            registry=registry,
        )
        for name, pool in pools.items():
            in_use.labels(name).set_function(_in_use(pool))
            opened.labels(name).set_function(pool.get_size)
            size_max.labels(name).set_function(pool.get_max_size)

    # The HTTP endpoint ------------------------------------------------------------------------

    def serve(self, listen: str) -> int:
        """Serves the metrics over HTTP on `listen` (HOST:PORT; port 0: any free one) at
        /metrics (and every other path); returns the port. Raises OSError if it cannot."""
        assert self._endpoint is None
        host, _, port = listen.rpartition(":")
        # An IPv6 address is written in brackets in HOST:PORT, as gRPC takes it.
        host = host.removeprefix("[").removesuffix("]")
        self._endpoint, self._endpoint_thread = start_http_server(
            int(port), addr=host, registry=self.registry
        )
        bound: int = self._endpoint.server_address[1]
        return bound

    async def stop(self) -> None:
        """Stops serving the metrics (if it did). Idempotent."""
        endpoint, self._endpoint = self._endpoint, None
        if endpoint is None:
            return
        # shutdown() waits for the serving thread to notice, up to its poll interval (0.5 s).
        await asyncio.to_thread(endpoint.shutdown)
        endpoint.server_close()
        await asyncio.to_thread(self._endpoint_thread.join)
        self._endpoint_thread = None


def _in_use(pool: asyncpg.Pool) -> Callable[[], int]:
    def in_use() -> int:
        return pool.get_size() - pool.get_idle_size()

    return in_use
