"""Coalesces concurrent single operations into batches.

Each RPC that carries one operation submits it here and waits for its result. A dispatcher
takes whatever is queued, up to `batch_size_max`, and applies it as one batch. While a batch
is being applied the next one gathers, and is applied when that one returns: so batches grow
with the load by themselves, one at a time while the queue is short, and the database sees
few, large transactions. Only a backlog of `batch_size_max` or more starts another batch
beside those running, up to `workers` at once. `batch_wait_s` lets a batch that would start
alone and small linger for more first (0: never). The queue is bounded: past `queue_max`
waiting operations, `submit` fails at once with Overloaded instead of letting latency grow.

Batches that arrive whole (the batch RPC) go through `apply_batch`, bounded the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from coffer.core import errors
from coffer.core.model import Applied, Operation

logger = logging.getLogger(__name__)

Apply = Callable[[Sequence[Operation]], Awaitable[list[Applied | errors.CofferError]]]


class Batcher:
    def __init__(
        self,
        apply: Apply,
        *,
        batch_size_max: int = 1000,
        batch_wait_s: float = 0.0,
        queue_max: int = 10_000,
        workers: int = 2,
        batch_calls_max: int = 4,
        batch_calls_waiting_max: int = 64,
    ) -> None:
        assert batch_size_max > 0 and 0 <= batch_wait_s <= 1 and queue_max > 0 and workers > 0
        assert batch_calls_max > 0 and batch_calls_waiting_max >= 0
        self._apply = apply
        self._batch_calls = asyncio.Semaphore(batch_calls_max)
        self._batch_calls_waiting = 0
        self._batch_calls_waiting_max = batch_calls_waiting_max
        self._batch_size_max = batch_size_max
        self._batch_wait_s = batch_wait_s
        self._queue_max = queue_max
        self._queue: deque[tuple[Operation, asyncio.Future[Applied]]] = deque()
        self._workers = workers
        # Set when the dispatcher may have something to do: operations arrived, a batch
        # returned, or the server is closing.
        self._wake = asyncio.Event()
        self._closing = False
        self._running: set[asyncio.Task[None]] = set()
        self._dispatcher = asyncio.create_task(self._dispatch())
        self.batches_applied = 0
        self.operations_applied = 0

    async def submit(self, operation: Operation) -> Applied:
        if self._closing:
            raise errors.Unavailable("the server is shutting down")
        if len(self._queue) >= self._queue_max:
            raise errors.Overloaded(
                f"{len(self._queue)} operations are waiting already; retry shortly"
            )
        future: asyncio.Future[Applied] = asyncio.get_running_loop().create_future()
        self._queue.append((operation, future))
        if not self._running or len(self._queue) >= self._batch_size_max:
            self._wake.set()
        return await future

    async def apply_batch(
        self, operations: Sequence[Operation]
    ) -> list[Applied | errors.CofferError]:
        """A whole batch from one call, applied as it is beside the coalesced ones: at most
        `batch_calls_max` at once; past `batch_calls_waiting_max` waiting, Overloaded."""
        if self._closing:
            raise errors.Unavailable("the server is shutting down")
        if self._batch_calls.locked() and (
            self._batch_calls_waiting >= self._batch_calls_waiting_max
        ):
            raise errors.Overloaded(
                f"{self._batch_calls_waiting} batches are waiting already; retry shortly"
            )
        self._batch_calls_waiting += 1
        try:
            await self._batch_calls.acquire()
        finally:
            self._batch_calls_waiting -= 1
        try:
            return await self._apply(operations)
        finally:
            self._batch_calls.release()

    async def close(self) -> None:
        """Refuses new operations, applies those queued, and stops."""
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
                len(self._queue) < self._batch_size_max or len(self._running) >= self._workers
            ):
                continue  # the running batch will wake us when it returns
            if not self._running and self._batch_wait_s and len(self._queue) < self._batch_size_max:
                await asyncio.sleep(self._batch_wait_s)
            batch = [
                self._queue.popleft() for _ in range(min(self._batch_size_max, len(self._queue)))
            ]
            task = asyncio.create_task(self._run(batch))
            self._running.add(task)
            task.add_done_callback(self._returned)
            if self._queue:
                self._wake.set()

    def _returned(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()

    async def _run(self, batch: list[tuple[Operation, asyncio.Future[Applied]]]) -> None:
        try:
            outcomes = await self._apply([operation for operation, _ in batch])
        except errors.CofferError as error:
            outcomes = [error] * len(batch)
        except Exception:
            logger.exception("a batch of %d operations failed", len(batch))
            outcomes = [errors.Unavailable("the batch failed; send it again")] * len(batch)
        self.batches_applied += 1
        self.operations_applied += len(batch)
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            if future.done():  # the caller went away
                continue
            if isinstance(outcome, errors.CofferError):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)
