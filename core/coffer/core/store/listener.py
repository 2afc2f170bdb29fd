"""The wake-up of the event stream's watchers: one LISTEN connection per process.

Every record notifies `coffer_events` at its commit (`events.record`), its position as the
payload. `Listener` keeps one connection of its own listening (apart from the pools, whose
connections keep no session state), counts the notifications in `generation` and keeps the
newest position notified in `head`; a watcher notes the generation before it reads, and once
it has read all there was, `wait`s for the generation to move on, or for
`poll_interval_s` at most: a notification lost (with its connection, or while the database
restarted) only delays. A lost connection is opened again, every `poll_interval_s` until it
opens; each new connection moves the generation on, as notifications may have been missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from . import sql

__all__ = ["Listener", "channel", "poll_interval_s_default"]

logger = logging.getLogger(__name__)

channel = "coffer_events"
poll_interval_s_default = 1.0


class Listener:
    """`start` it on the event loop that will wait on it; `close` it at the end."""

    def __init__(self, dsn: str, *, poll_interval_s: float = poll_interval_s_default) -> None:
        assert poll_interval_s > 0
        self._dsn = dsn
        self.poll_interval_s = poll_interval_s
        self.generation = 0
        # The newest position notified (0 before the first): how far the stream goes, as far
        # as this process has heard.
        self.head = 0
        # Set by `close`: watchers end.
        self.closed = False
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self._task is None
        self._task = asyncio.create_task(self._listen())

    async def close(self) -> None:
        """Stops listening, and wakes every watcher, to end."""
        self.closed = True
        self._wake()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def wait(self, seen: int) -> None:
        """Returns once the generation is past `seen`, or after `poll_interval_s`."""
        if self.generation != seen or self.closed:
            return
        changed = self._changed
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.poll_interval_s):
                await changed.wait()

    def _notified(self, _connection: object, _pid: int, _channel: str, payload: object) -> None:
        """A record committed; its notification's payload is its position."""
        with contextlib.suppress(ValueError):
            self.head = max(self.head, int(str(payload)))
        self._wake()

    def _wake(self) -> None:
        self.generation += 1
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def _listen(self) -> None:
        failing = False
        while True:
            connection = None
            try:
                connection = await asyncpg.connect(self._dsn, timeout=self.poll_interval_s * 5)
                closed = asyncio.Event()
                connection.add_termination_listener(_setter(closed))
                await connection.add_listener(channel, self._notified)
                if failing:
                    logger.info("the event stream listens to the database again")
                failing = False
                self._wake()
                while not closed.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_interval_s):
                            await closed.wait()
                    if not closed.is_set():
                        # A connection cut without a word is found out here.
                        await connection.fetchval(sql.select_one, timeout=self.poll_interval_s)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                if not failing:
                    logger.warning(
                        "the event stream cannot listen to the database (%s: %s); watchers "
                        "poll every %g s meanwhile",
                        type(error).__name__,
                        error,
                        self.poll_interval_s,
                    )
                failing = True
            finally:
                if connection is not None and not connection.is_closed():
                    connection.terminate()
            await asyncio.sleep(self.poll_interval_s)


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    """A termination listener that sets `event`."""
    return lambda _connection: event.set()
