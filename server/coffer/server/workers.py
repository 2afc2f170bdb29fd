"""`coffer serve --workers N` with N > 1: a supervising process and N worker processes of the
same program on one port. The kernel spreads the connections among the workers
(SO_REUSEPORT); each worker is a whole server (`Server`), whose batcher coalesces the calls
of the connections it was given. A client that opens one connection reaches one worker: to
use them all, open several (the typed client's `connections=`).

The supervisor (`supervise`):
- reserves the port before anything starts: it binds it, so that a port in use (even by
  another server that shares its port, unless `--reuse-port` says this one may) fails the
  start, and a port 0 becomes a free one, which every worker then takes; it holds it, with
  SO_REUSEPORT and listening (a port bound but not listened on would not stand in the way of
  another supervisor's check), until the workers serve: the few connections the kernel may
  give that socket meanwhile are reset when it closes;
- finds the database as one `coffer serve` does (starting the embedded PostgreSQL, once,
  here), and applies the migrations, once;
- starts the workers: the same program with the same arguments, then `--workers 1
  --reuse-port --listen HOST:PORT --worker K/N@ID` (K from 1 to N, ID this supervisor's; a
  flag for this alone), with the database's URL in DATABASE_URL; with `--metrics-listen
  HOST:P`, worker K's metrics on HOST:P+K-1 (port 0: each on a free port of its own); worker
  1 alone runs the background
  jobs (`Settings.background_jobs`). Each says on its standard output when it serves, with a
  `WorkerReady` line;
- prints one ready line once every worker serves (`serving_line`, the first worker's words
  for its security and access mode, and "N workers"), and a metrics line for each;
- passes SIGTERM and SIGINT on as SIGTERM (each worker stops taking calls and drains, as one
  server does), and SIGHUP with TLS (each worker reads its files again; without TLS, SIGHUP
  stops the supervisor as SIGTERM does); waits for the workers, then stops the embedded
  PostgreSQL. Its handlers are in place before anything starts: a stop asked for during the
  start ends it (the workers started so far stopped, no ready line, status 0);
- starts again, with its number, a worker that exits on its own, and logs it, after a pause
  that grows with the restarts (`restart_pause_s`): at most `restarts_max` restarts within
  `restarts_window_s`, all workers together, each attempt counted once, and at most
  `restarts_max` attempts in a row that fail to start a worker (it exits, or says nothing
  within `worker_start_timeout_s`); past that it stops every worker and exits with status 1.
  A worker that fails to start at first fails the start: its message is in the log (the
  workers write to the supervisor's standard error), the other workers are stopped, and the
  supervisor exits with its status.

A worker's standard input is a pipe from its supervisor (`watch_supervisor`): when it ends,
the supervisor gone however it went, the worker stops as on SIGTERM. The workers run in a
session of their own, so that a terminal's Ctrl-C reaches the supervisor alone, which stops
them in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from coffer.clients.workers import Worker, new_instance

from .app import migrate_database
from .settings import Settings

__all__ = [
    "WorkerReady",
    "read_bytes",
    "read_ready",
    "ready_line_bytes_max",
    "reserve_port",
    "restart_pause_s",
    "restart_pause_s_max",
    "restart_pause_s_min",
    "restarts_max",
    "restarts_window_s",
    "serving_line",
    "supervise",
    "watch_supervisor",
    "worker_ready_prefix",
]

logger = logging.getLogger(__name__)

# Restarts of workers that exited on their own, all workers together, within the window, or
# attempts in a row that fail to start one worker again (however long each took): one more
# and the supervisor stops (a worker that keeps dying would only keep failing calls).
restarts_max = 5
restarts_window_s = 60.0
# The pause before a restart: the least, doubled for each restart within the window, at most
# the most (with restarts_max restarts a window, 0.1 s to 1.6 s).
restart_pause_s_min = 0.1
restart_pause_s_max = 5.0
worker_start_timeout_s = 120.0
# Past its drain (the server's shutdown grace) and this, a worker that has not stopped is
# killed.
worker_stop_margin_s = 30.0
# What starts a worker's line that says it serves; the rest is JSON.
worker_ready_prefix = "coffer-worker-ready "
# A worker's standard output is read in chunks of this, and a line longer than the other is
# not kept while looking for the ready line (which is far shorter).
read_bytes = 64 * 1024
ready_line_bytes_max = 64 * 1024
# How a worker is run: this program's `serve`, on the Python running the supervisor.
_worker_program = "import sys; from coffer.server.cli import serve; sys.exit(serve(sys.argv[1:]))"


@dataclass(frozen=True, slots=True)
class WorkerReady:
    """What a worker says, on one line of its standard output, once it serves."""

    port: int
    # How it is reached (" over TLS …", or "" for plaintext), and how calls are let in: the
    # words of the ready line.
    security: str
    access_mode: str
    metrics_port: int | None

    def line(self) -> str:
        return worker_ready_prefix + json.dumps(dataclasses.asdict(self))

    @classmethod
    def parse(cls, line: str) -> WorkerReady | None:
        """The WorkerReady of a line that is one, else None (a line that only starts like
        one too)."""
        if not line.startswith(worker_ready_prefix):
            return None
        try:
            said = json.loads(line.removeprefix(worker_ready_prefix))
        except ValueError:
            return None
        if not (
            isinstance(said, dict)
            and said.keys() == {field.name for field in dataclasses.fields(cls)}
            and isinstance(said["port"], int)
            and isinstance(said["security"], str)
            and isinstance(said["access_mode"], str)
            and (said["metrics_port"] is None or isinstance(said["metrics_port"], int))
        ):
            return None
        return cls(**said)


async def read_ready(stream: asyncio.StreamReader) -> WorkerReady | None:
    """The first WorkerReady said on `stream`, a worker's standard output; None if it ends
    first. Read in chunks: a line of any length is let go (one longer than
    ready_line_bytes_max is not kept at all), where a line's read would fail."""
    line = b""
    # Within a line too long to keep, whose end is still to come.
    skipping = False
    while True:
        chunk = await stream.read(read_bytes)
        if not chunk:
            return None
        *complete, line = (line + chunk).split(b"\n")
        for each in complete:
            if skipping:
                skipping = False
                continue
            ready = WorkerReady.parse(each.decode(errors="replace"))
            if ready is not None:
                return ready
        if len(line) > ready_line_bytes_max:
            line, skipping = b"", True


def serving_line(
    address: str,
    security: str,
    description: str,
    *,
    events: bool,
    access_mode: str,
    workers: int,
) -> str:
    """The line `coffer serve` prints once it serves (tests, the bench and operators wait for
    "serving on"); `address` is HOST:PORT, `description` the database's."""
    events_note = "" if events else ", events off"
    workers_note = "" if workers == 1 else f", {workers} workers"
    return (
        f"coffer: serving on {address}{security} ({description}{events_note}{workers_note}); "
        + access_mode
    )


def reserve_port(listen: str, *, shared: bool) -> tuple[socket.socket, int]:
    """A socket bound to `listen` (HOST:PORT) with SO_REUSEPORT, listening, and its port (for
    port 0, a free one): held until the workers listen there. Unless `shared`, first makes
    sure that nothing listens on that port, with SO_REUSEPORT or without (another
    supervisor's held socket among them: it listens so as to be seen). Raises OSError when
    the port is taken (or the host is not this machine's)."""
    host, _, port_text = listen.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    family, kind, protocol, _, address = socket.getaddrinfo(
        host, int(port_text), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    port = int(port_text)
    if not shared:
        # Without SO_REUSEPORT, a bind fails on a port where any socket listens; with
        # SO_REUSEADDR, as gRPC binds, connections closing (TIME_WAIT) do not stand in its way.
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
            port = probe.getsockname()[1]
    held = socket.socket(family, kind, protocol)
    try:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind((address[0], port, *address[2:]))
        # Listening, the smallest backlog: a bind without SO_REUSEPORT fails on it, as it does
        # on the workers' sockets.
        held.listen(1)
        bound: int = held.getsockname()[1]
    except BaseException:
        held.close()
        raise
    return held, bound


def watch_supervisor(stopping: asyncio.Event) -> None:
    """In a worker: sets `stopping` when its standard input, the supervisor's pipe, ends."""
    loop = asyncio.get_running_loop()
    descriptor = sys.stdin.fileno()

    def readable() -> None:
        try:
            data = os.read(descriptor, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(descriptor)
            if not stopping.is_set():
                logger.warning("the supervisor is gone: stopping")
            stopping.set()

    loop.add_reader(descriptor, readable)


class _StartFailed(Exception):
    """A worker exited, or said nothing, before it served."""

    def __init__(self, number: int, status: int | None) -> None:
        super().__init__(number, status)
        self.number = number
        # Its exit status; None when it was killed for taking too long.
        self.status = status


def restart_pause_s(restarts: int) -> float:
    """The pause before a worker's restart, after `restarts` restarts within the window."""
    return min(restart_pause_s_min * 2.0**restarts, restart_pause_s_max)


def _described(status: int | None) -> str:
    if status is None:
        return f"no word within {worker_start_timeout_s:g} s"
    if status < 0:
        return f"signal {signal.Signals(-status).name}"
    return f"status {status}"


class _Workers:
    """The worker processes, by number (1 to N), as they are started and started again."""

    def __init__(
        self, argv: Sequence[str], settings: Settings, database_url: str, address: str
    ) -> None:
        self._settings = settings
        # What its workers' health checks say they are part of (`coffer.clients.workers`).
        self._instance = new_instance()
        self._environment = {**os.environ, "DATABASE_URL": database_url}
        self._command = [
            sys.executable,
            "-c",
            _worker_program,
            *argv,
            "--workers",
            "1",
            "--reuse-port",
            "--listen",
            address,
        ]
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        # The workers that serve (SIGHUP goes to those alone: one starting would die of it).
        self.serving: set[int] = set()
        self._drains: dict[int, asyncio.Task[None]] = {}
        self._watches: list[asyncio.Task[None]] = []
        self._restarts: list[float] = []
        self.stopping = False
        # Set when the supervisor must stop: too many restarts.
        self.failed = asyncio.Event()

    def _arguments(self, number: int) -> list[str]:
        arguments = [
            *self._command,
            "--worker",
            Worker(number, self._settings.workers, self._instance).metadata(),
        ]
        metrics = self._settings.metrics_listen
        if metrics:
            host, _, port = metrics.rpartition(":")
            own = int(port) + number - 1 if int(port) else 0
            arguments += ["--metrics-listen", f"{host}:{own}"]
        return arguments

    async def start(self) -> list[WorkerReady]:
        """Starts every worker at once; what each said, in order of number. Raises
        _StartFailed for the first that did not start (the others left to `stop`)."""
        numbers = range(1, self._settings.workers + 1)
        starts = [asyncio.create_task(self._start(number)) for number in numbers]
        try:
            readies = await asyncio.gather(*starts)
        except BaseException:
            for start in starts:
                start.cancel()
            await asyncio.gather(*starts, return_exceptions=True)
            raise
        self._watches = [asyncio.create_task(self._watch(number)) for number in numbers]
        return readies

    async def _start(self, number: int) -> WorkerReady:
        self.serving.discard(number)
        process = await asyncio.create_subprocess_exec(
            *self._arguments(number),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=self._environment,
            start_new_session=True,
        )
        self.processes[number] = process
        assert process.stdout is not None
        try:
            async with asyncio.timeout(worker_start_timeout_s):
                ready = await read_ready(process.stdout)
                if ready is None:
                    raise _StartFailed(number, await process.wait())
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise _StartFailed(number, None) from None
        # Whatever else it prints is read and let go, so that it never blocks on a full pipe.
        self._drains[number] = asyncio.create_task(_drain(process.stdout))
        self.serving.add(number)
        return ready

    async def _watch(self, number: int) -> None:
        """Starts worker `number` again each time it exits on its own, within the budget of
        restarts; past it, sets `failed`."""
        while True:
            process = self.processes[number]
            status = await process.wait()
            what = f"worker {number} (pid {process.pid}) exited with {_described(status)}"
            attempts_failed = 0
            while True:
                self.serving.discard(number)
                now = time.monotonic()
                self._restarts = [each for each in self._restarts if now - each < restarts_window_s]
                spent = None
                if attempts_failed >= restarts_max:
                    spent = f"{attempts_failed} attempts in a row to start it again"
                elif len(self._restarts) >= restarts_max:
                    spent = (
                        f"{len(self._restarts)} restarts of workers within {restarts_window_s:g} s"
                    )
                if spent is not None:
                    logger.error("%s, after %s: stopping every worker", what, spent)
                    self.failed.set()
                    return
                pause_s = restart_pause_s(len(self._restarts))
                self._restarts.append(now)
                logger.warning("%s; starting it again in %g s", what, pause_s)
                await asyncio.sleep(pause_s)
                try:
                    ready = await self._start(number)
                except _StartFailed as failed:
                    attempts_failed += 1
                    what = f"worker {number} did not start again ({_described(failed.status)})"
                    continue
                break
            logger.warning(
                "worker %d serves again (pid %d)%s",
                number,
                self.processes[number].pid,
                "" if ready.metrics_port is None else f", metrics on port {ready.metrics_port}",
            )

    def signal(self, signal_number: int) -> None:
        """Sends `signal_number` to the workers that serve."""
        for number in sorted(self.serving):
            process = self.processes[number]
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal_number)

    async def stop(self) -> None:
        """Stops every worker (SIGTERM: each drains), waiting for them; kills those still
        running past their drain."""
        self.stopping = True
        for watch in self._watches:
            watch.cancel()
        await asyncio.gather(*self._watches, return_exceptions=True)
        for process in self.processes.values():
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        # One deadline for them all: they drain at once.
        wait_s = self._settings.shutdown_grace_s + worker_stop_margin_s
        processes = sorted(self.processes.items())
        try:
            async with asyncio.timeout(wait_s):
                await asyncio.gather(*(process.wait() for _, process in processes))
        except TimeoutError:
            for number, process in processes:
                if process.returncode is None:
                    logger.warning(
                        "worker %d (pid %d) did not stop: killing it", number, process.pid
                    )
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*(process.wait() for _, process in processes))
        for _, process in processes:
            if process.stdin is not None:
                process.stdin.close()
        for drain in self._drains.values():
            drain.cancel()
        await asyncio.gather(*self._drains.values(), return_exceptions=True)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.read(read_bytes):
        pass


async def supervise(
    argv: Sequence[str],
    settings: Settings,
    database: AbstractAsyncContextManager[tuple[str, str]],
) -> int:
    """Runs `settings.workers` workers of `coffer serve` with the arguments `argv` (after
    `serve`) until SIGTERM or SIGINT, on the database `database` yields (its URL and how to
    describe it); returns the exit status. A stop asked for while it starts (the database, the
    migrations, the workers) ends the start: no ready line, every worker stopped."""
    assert settings.workers > 1, settings.workers
    try:
        held, port = reserve_port(settings.listen, shared=settings.reuse_port)
    except OSError as error:
        raise OSError(f"cannot listen on {settings.listen}: {error.strerror or error}") from error
    address = f"{settings.listen.rsplit(':', 1)[0]}:{port}"
    loop = asyncio.get_running_loop()
    stop_asked = asyncio.Event()
    workers: _Workers | None = None

    def hang_up() -> None:
        # With TLS, the workers that serve read their files again; without, SIGHUP stops as
        # SIGTERM does (one server ends on it).
        if settings.tls_files is None:
            stop_asked.set()
        elif workers is not None:
            workers.signal(signal.SIGHUP)

    # Every handler before anything starts: a signal during the start is taken, not fatal
    # (which would leave the embedded PostgreSQL running).
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop_asked.set)
    loop.add_signal_handler(signal.SIGHUP, hang_up)
    try:
        async with database as (database_url, description):
            workers = _Workers(argv, settings, database_url, address)
            try:
                starting = asyncio.create_task(_start(workers, database_url, settings))
                asked = asyncio.create_task(stop_asked.wait())
                try:
                    await asyncio.wait((starting, asked), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    asked.cancel()
                    held.close()
                if not starting.done():
                    starting.cancel()
                    await asyncio.gather(starting, return_exceptions=True)
                    logger.warning("asked to stop while starting: stopping")
                else:
                    try:
                        readies = starting.result()
                    except _StartFailed as failed:
                        logger.error(
                            "worker %d did not start (%s): stopping",
                            failed.number,
                            _described(failed.status),
                        )
                        return failed.status if failed.status and failed.status > 0 else 1
                    _print_ready(address, description, settings, readies)
                    asked = asyncio.create_task(stop_asked.wait())
                    failing = asyncio.create_task(workers.failed.wait())
                    await asyncio.wait((asked, failing), return_when=asyncio.FIRST_COMPLETED)
                    asked.cancel()
                    failing.cancel()
                print("coffer: shutting down", flush=True)
            finally:
                await workers.stop()
    finally:
        held.close()
        for signal_number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signal_number)
    print("coffer: stopped", flush=True)
    return 1 if workers.failed.is_set() else 0


async def _start(workers: _Workers, database_url: str, settings: Settings) -> list[WorkerReady]:
    """The migrations, then every worker: what each said once it served."""
    # Once for every worker (each then finds none to apply).
    await migrate_database(database_url, settings.statement_timeout_s)
    return await workers.start()


def _print_ready(
    address: str, description: str, settings: Settings, readies: Sequence[WorkerReady]
) -> None:
    """The metrics line of each worker, then the ready line, in the first worker's words."""
    metrics_host = settings.metrics_listen.rpartition(":")[0]
    for number, ready in enumerate(readies, start=1):
        if ready.metrics_port is not None:
            print(
                f"coffer: metrics on http://{metrics_host}:{ready.metrics_port}/metrics "
                f"(worker {number})",
                flush=True,
            )
    first = readies[0]
    line = serving_line(
        address,
        first.security,
        description,
        events=settings.events,
        access_mode=first.access_mode,
        workers=settings.workers,
    )
    print(line, flush=True)
