"""Coalesces concurrent calls into batches: one database transaction for many of them.

Each call submits its operations — one, or a whole batch from the batch RPC — as a group,
and waits for their results. A dispatcher takes the queued groups, whole and in order, up to
`batch_size_max` operations (a larger group goes alone), and applies them as one batch.
While a batch is being applied the next one gathers, and is applied when that one returns:
so batches grow with the load by themselves, one at a time while the queue is short, and
the database sees few, large transactions whose wallet locks never wait for each other.
Only a backlog of `batch_size_max` operations or more starts another batch beside those
running, up to `workers` at once. `batch_wait_s` lets a batch that would start alone and
small linger for more first (0: never).

The queue is bounded: past `queue_max` waiting operations, a call fails at once with
Overloaded instead of letting latency and memory grow.

A group's operations keep their linked chains; a chain never runs from one group into the
next, as the caller makes sure a group does not end linked.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from coffer.core import errors
from coffer.core.model import Applied, Operation, Rejected

logger = logging.getLogger(__name__)

Outcome = Applied | errors.CofferError

# Bounds of the retry-after hint given with Overloaded: the time the queue takes to drain at the
# rate batches were last applied.
retry_after_ms_min = 10
retry_after_ms_max = 5000
Apply = Callable[[Sequence[Operation | Rejected]], Awaitable[list[Outcome]]]


@dataclass(slots=True)
class _Group:
    operations: Sequence[Operation | Rejected]
    future: asyncio.Future[list[Outcome]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Batcher:
    def __init__(
        self,
        apply: Apply,
        *,
        batch_size_max: int = 1000,
        batch_wait_s: float = 0.0,
        queue_max: int = 50_000,
        workers: int = 2,
    ) -> None:
        assert batch_size_max > 0 and 0 <= batch_wait_s <= 1 and queue_max > 0 and workers > 0
        self._apply = apply
        self._batch_size_max = batch_size_max
        self._batch_wait_s = batch_wait_s
        self._queue_max = queue_max
        self._workers = workers
        self._queue: deque[_Group] = deque()
        self._queued = 0  # operations in the queue
        # Set when the dispatcher may have something to do: calls arrived, a batch
        # returned, or the server is closing.
        self._wake = asyncio.Event()
        self._closing = False
        self._running: set[asyncio.Task[None]] = set()
        self._dispatcher = asyncio.create_task(self._dispatch())
        self.batches_applied = 0
        self.operations_applied = 0
        # Operations applied per second, smoothed over the last batches; 0 before the first.
        self._rate_per_s = 0

    async def submit(self, operation: Operation) -> Applied:
        """Applies one operation; raises its error."""
        [outcome] = await self.submit_all([operation])
        if isinstance(outcome, errors.CofferError):
            raise outcome
        return outcome

    async def submit_all(self, operations: Sequence[Operation | Rejected]) -> list[Outcome]:
        """Applies a group of operations, in order, within one batch; one outcome each.
        Raises what failed the batch as a whole (Unavailable, Internal…), or Overloaded."""
        assert operations
        if self._closing:
            raise errors.Unavailable("the server is shutting down")
        if self._queued and self._queued + len(operations) > self._queue_max:
            raise errors.Overloaded(
                f"{self._queued} operations are waiting already; retry shortly",
                retry_after_ms=self.retry_after_ms(),
            )
        group = _Group(operations)
        self._queue.append(group)
        self._queued += len(operations)
        if not self._running or self._queued >= self._batch_size_max:
            self._wake.set()
        return await group.future

    def retry_after_ms(self) -> int:
        """How long the queued operations should take to apply: when to try again."""
        if not self._rate_per_s:
            return retry_after_ms_min
        drain_ms = self._queued * 1000 // self._rate_per_s
        return min(max(drain_ms, retry_after_ms_min), retry_after_ms_max)

    async def close(self) -> None:
        """Refuses new calls, applies those queued, and stops."""
        self._closing = True
        self._wake.set()
        await self._dispatcher

    async def _dispatch(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._queue:
                if self._closing and not self._running:
                    return
                continue
            if self._running and (
                self._queued < self._batch_size_max or len(self._running) >= self._workers
            ):
                continue  # the running batch will wake us when it returns
            if not self._running and self._batch_wait_s and self._queued < self._batch_size_max:
                await asyncio.sleep(self._batch_wait_s)
            groups = [self._queue.popleft()]
            size = len(groups[0].operations)
            while self._queue and size + len(self._queue[0].operations) <= self._batch_size_max:
                group = self._queue.popleft()
                groups.append(group)
                size += len(group.operations)
            self._queued -= size
            task = asyncio.create_task(self._run(groups))
            self._running.add(task)
            task.add_done_callback(self._returned)
            if self._queue:
                self._wake.set()

    def _returned(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()

    async def _run(self, groups: list[_Group]) -> None:
        operations = [operation for group in groups for operation in group.operations]
        started_ns = time.monotonic_ns()
        try:
            outcomes = await self._apply(operations)
        except errors.CofferError as error:
            self._fail(groups, error)
            return
        except Exception:
            # A bug, or a failure nothing maps: not worth retrying, and told once, here.
            logger.exception(
                "a batch of %d operations in %d calls failed (first caller %r)",
                len(operations),
                len(groups),
                _caller(operations[0]),
            )
            self._fail(groups, errors.Internal("the batch failed; see the server log"))
            return
        self.batches_applied += 1
        self.operations_applied += len(operations)
        elapsed_ns = max(time.monotonic_ns() - started_ns, 1)
        rate_per_s = len(operations) * 1_000_000_000 // elapsed_ns
        self._rate_per_s = (
            (3 * self._rate_per_s + rate_per_s) // 4 if self._rate_per_s else rate_per_s
        )
        start = 0
        for group in groups:
            end = start + len(group.operations)
            if not group.future.done():  # else the caller went away
                group.future.set_result(outcomes[start:end])
            start = end

    @staticmethod
    def _fail(groups: list[_Group], error: errors.CofferError) -> None:
        """The whole batch failed: every call fails with that error, as its status."""
        for group in groups:
            if not group.future.done():
                group.future.set_exception(error)


def _caller(operation: Operation | Rejected) -> str | None:
    return None if isinstance(operation, Rejected) else operation.caller
