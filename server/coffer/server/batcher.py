"""Coalesces concurrent calls into batches: one database transaction for many of them.

Each call submits its operations — one, or a whole batch from the batch RPC — as a group,
and waits for their results. Groups queue in one of two lanes: single operations (the
single-call RPCs) and batches (SubmitBatch), each dispatched on its own, as below, and
single calls first:
- a single call never waits behind queued batch calls: its lane starts a batch whenever
  it has none running;
- while single calls wait or are being applied, batch calls start only on their turn, one
  at a time: after a batch of single calls that had the database to itself. So a single
  call waits, at worst, for the wallet locks of one batch call already running (if it
  touches the same wallets), then for its own small batch; batch calls are never starved,
  and have every other turn.
Within a lane:
- a lane takes its queued groups, whole and in order, up to `batch_size_max` operations (a
  larger group goes alone), and applies them as one batch;
- while a lane's batch is being applied its next one gathers, and is applied when that one
  returns: so batches grow with the load by themselves, one at a time while the queue is
  short, and the database sees few, large transactions;
- only a backlog of `batch_size_max` operations or more in a lane starts another of its
  batches beside those running, up to `workers` at once (so up to twice `workers` batches
  in all, each on a connection of its own);
- `batch_wait_s` lets a batch that would start alone and small linger for more first (0:
  never). A lane lingers on its own: the other lane is dispatched meanwhile, so a single
  call never waits for a batch call's lingering (only for its own lane's).

The queue is bounded: past `queue_max` waiting operations, a call fails at once with
Overloaded (with a retry-after hint: the time the queue takes to drain at the rate of the
last batches) instead of letting latency and memory grow. Batch calls may fill it up to
`queue_max - batch_size_max`; the rest is kept for single calls. One exception: a call into
an empty lane is always taken (else a batch call larger than the room left would never be),
so the queue may hold `queue_max` plus one call's operations: at most `queue_max +
batch_operations_max`.

A call passes its deadline (the time its caller has left). A group whose caller went away
(cancelled, or its deadline passed) is dropped from the queue, never applied: at once when
its call is cancelled, or, if the deadline passes first, when the group would be taken
into a batch (it then fails with DeadlineExceeded).

A batch that fails as a whole (the database is unreachable, an unknown failure) fails every
call in it with that error: Unavailable, or Internal for anything that is not a CofferError,
logged once with the batch (its size, calls and first caller).

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
from coffer.core.model import Applied, Operation, Rejected, batch_operations_max

from .settings import (
    batch_size_max_default,
    batch_wait_ms_max,
    batch_workers_default,
    queue_max_default,
)

__all__ = ["Answer", "Apply", "Batcher", "retry_after_ms_max", "retry_after_ms_min"]

logger = logging.getLogger(__name__)

# What a call gets for each of its operations: applied, or refused.
Answer = Applied | errors.CofferError
Apply = Callable[[Sequence[Operation | Rejected]], Awaitable[list[Answer]]]

# Bounds of the retry-after hint given with Overloaded.
retry_after_ms_min = 10
retry_after_ms_max = 5000


@dataclass(slots=True)
class _Group:
    operations: Sequence[Operation | Rejected]
    # The loop time past which its caller no longer waits; None: no deadline.
    deadline: float | None
    future: asyncio.Future[list[Answer]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    # In its lane's queue and counted there: until taken into a batch or dropped.
    queued: bool = True


@dataclass(slots=True)
class _Lane:
    queue: deque[_Group] = field(default_factory=deque)
    queued: int = 0  # operations of the groups queued
    running: set[asyncio.Task[None]] = field(default_factory=set)
    # Operations applied per second, smoothed over the last batches; 0 before the first.
    rate_per_s: int = 0
    # The loop time until which a small batch waits for more (batch_wait_s), once it does.
    lingering_until: float | None = None

    def drain_ms(self) -> int:
        """How long the queued operations should take to apply, at the last batches' rate."""
        return self.queued * 1000 // self.rate_per_s if self.rate_per_s else 0


class Batcher:
    def __init__(
        self,
        apply: Apply,
        *,
        batch_size_max: int = batch_size_max_default,
        batch_wait_s: float = 0.0,
        queue_max: int = queue_max_default,
        workers: int = batch_workers_default,
    ) -> None:
        assert 0 < batch_size_max <= min(queue_max, batch_operations_max), batch_size_max
        assert 0 <= batch_wait_s * 1000 <= batch_wait_ms_max and workers > 0
        self._apply = apply
        self._batch_size_max = batch_size_max
        self._batch_wait_s = batch_wait_s
        self._queue_max = queue_max
        self._workers = workers
        self._singles = _Lane()
        self._batches = _Lane()
        # Whether a batch call may start next although single calls are waiting.
        self._batches_turn = False
        # Set when the dispatcher may have something to do: calls arrived, a batch
        # returned, or the server is closing.
        self._wake = asyncio.Event()
        self._closing = False
        self._dispatcher = asyncio.create_task(self._dispatch())
        self.batches_applied = 0
        self.operations_applied = 0
        self.operations_expired = 0

    @property
    def queued(self) -> int:
        """Operations waiting for a batch."""
        return self._singles.queued + self._batches.queued

    async def submit(self, operation: Operation, time_remaining_s: float | None = None) -> Applied:
        """Applies one operation; raises its error."""
        [answer] = await self.submit_all([operation], time_remaining_s)
        if isinstance(answer, errors.CofferError):
            raise answer
        return answer

    async def submit_all(
        self, operations: Sequence[Operation | Rejected], time_remaining_s: float | None = None
    ) -> list[Answer]:
        """Applies a group of operations, in order, within one batch; one answer each.
        `time_remaining_s` is how long the caller waits (None: no deadline). Raises what
        failed the batch as a whole (Unavailable, Internal…), Overloaded, or
        DeadlineExceeded."""
        assert 0 < len(operations) <= batch_operations_max, len(operations)
        if self._closing:
            raise errors.Unavailable("the server is shutting down")
        count = len(operations)
        lane = self._singles if count == 1 else self._batches
        room = self._queue_max - (0 if lane is self._singles else self._batch_size_max)
        if lane.queued and self.queued + count > room:
            raise errors.Overloaded(
                f"{self.queued} operations are waiting already; retry shortly",
                retry_after_ms=self.retry_after_ms(),
            )
        loop = asyncio.get_running_loop()
        deadline = None if time_remaining_s is None else loop.time() + time_remaining_s
        group = _Group(operations, deadline)
        lane.queue.append(group)
        lane.queued += count
        if not lane.running or lane.queued >= self._batch_size_max:
            self._wake.set()
        try:
            return await group.future
        except asyncio.CancelledError:
            # The caller went away (cancelled, or its deadline passed): not applied, if it
            # was still waiting; its place is free at once.
            if group.queued:
                group.queued = False
                group.operations = ()
                lane.queued -= count
            raise

    def retry_after_ms(self) -> int:
        """How long the queued operations should take to apply: when to try again."""
        drain_ms = max(self._singles.drain_ms(), self._batches.drain_ms())
        return min(max(drain_ms, retry_after_ms_min), retry_after_ms_max)

    def batch_calls_drain_ms(self) -> int:
        """How long the queued batch calls should take to apply."""
        return self._batches.drain_ms()

    async def close(self) -> None:
        """Refuses new calls, applies those queued, and stops."""
        self._closing = True
        self._wake.set()
        await self._dispatcher

    async def _dispatch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            lanes = (self._singles, self._batches)
            if self._closing and not any(lane.queued or lane.running for lane in lanes):
                return
            if self._batches_turn:
                lanes = (self._batches, self._singles)
            for lane in lanes:
                if not lane.queued:
                    lane.lingering_until = None
                while self._may_start(lane):
                    if self._lingers(lane, loop.time()):
                        break
                    lane.lingering_until = None
                    groups = self._take(lane)
                    if not groups:
                        continue
                    if lane is self._batches:
                        self._batches_turn = False
                    alone = not self._batches.running
                    task = asyncio.create_task(self._run(lane, groups))
                    lane.running.add(task)
                    task.add_done_callback(self._returned(lane, alone))

    def _lingers(self, lane: _Lane, now: float) -> bool:
        """Whether the lane's next batch, which would start alone and small, waits for more
        first (batch_wait_s). It waits without blocking the dispatcher: the other lane is
        dispatched meanwhile, and a timer wakes the dispatcher when the wait ends."""
        if (
            not self._batch_wait_s
            or self._closing
            or lane.running
            or lane.queued >= self._batch_size_max
        ):
            return False
        if lane.lingering_until is None:
            lane.lingering_until = now + self._batch_wait_s
            asyncio.get_running_loop().call_at(lane.lingering_until, self._wake.set)
        return now < lane.lingering_until

    def _may_start(self, lane: _Lane) -> bool:
        if not lane.queued:
            return False
        if lane is self._batches and (self._singles.queued or self._singles.running):
            # Single calls first: while they wait or are being applied, a batch call starts
            # only on its turn, one at a time, so that single calls wait for the wallet locks
            # of at most the batch calls running already.
            return self._batches_turn
        return not lane.running or (
            lane.queued >= self._batch_size_max and len(lane.running) < self._workers
        )

    def _take(self, lane: _Lane) -> list[_Group]:
        """The lane's next batch: its queued groups, whole and in order, up to batch_size_max
        operations (or one larger group); groups whose deadline passed fail, unapplied."""
        now = asyncio.get_running_loop().time()
        groups: list[_Group] = []
        size = 0
        queue = lane.queue
        while queue:
            group = queue[0]
            if not group.queued:  # dropped by its caller
                queue.popleft()
                continue
            count = len(group.operations)
            if groups and size + count > self._batch_size_max:
                break
            queue.popleft()
            group.queued = False
            lane.queued -= count
            if group.future.done():  # cancelled, and its caller not told yet
                continue
            if group.deadline is not None and group.deadline <= now:
                self.operations_expired += count
                group.future.set_exception(
                    errors.DeadlineExceeded(
                        "the call's deadline passed before its operations were applied; none was"
                    )
                )
                continue
            groups.append(group)
            size += count
        return groups

    def _returned(self, lane: _Lane, alone: bool) -> Callable[[asyncio.Task[None]], None]:
        def returned(task: asyncio.Task[None]) -> None:
            lane.running.discard(task)
            if lane is self._singles and alone and self._batches.queued:
                # Single calls had the database to themselves: batch calls go next.
                self._batches_turn = True
            self._wake.set()

        return returned

    async def _run(self, lane: _Lane, groups: list[_Group]) -> None:
        operations = [operation for group in groups for operation in group.operations]
        started_ns = time.monotonic_ns()
        try:
            answers = await self._apply(operations)
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
        smoothed = (3 * lane.rate_per_s + rate_per_s) // 4
        lane.rate_per_s = smoothed if lane.rate_per_s else rate_per_s
        start = 0
        for group in groups:
            end = start + len(group.operations)
            if not group.future.done():  # else the caller went away
                group.future.set_result(answers[start:end])
            start = end

    @staticmethod
    def _fail(groups: list[_Group], error: errors.CofferError) -> None:
        """The whole batch failed: every call fails with that error, as its status."""
        for group in groups:
            if not group.future.done():
                group.future.set_exception(error)


def _caller(operation: Operation | Rejected) -> str | None:
    return None if isinstance(operation, Rejected) else operation.caller
