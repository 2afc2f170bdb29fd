"""Programs the tests run as a user would: beside the event loop, where the test's server
answers, to the end, with what they printed; or `coffer serve`, until the test stops it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Serving",
    "one_process_with_metrics",
    "run_beside",
    "run_timeout_s_default",
    "serve_beside",
    "served_address",
]

run_timeout_s_default = 120.0

# The arguments of `coffer serve` for one process on free ports, its metrics served (they
# count every call: one process).
one_process_with_metrics = (
    "--listen",
    "127.0.0.1:0",
    "--metrics-listen",
    "127.0.0.1:0",
    "--workers",
    "1",
)


async def run_beside(
    *argv: str | Path,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float = run_timeout_s_default,
) -> tuple[int, str, str]:
    """Runs the program without blocking the event loop: its exit code, stdout and stderr."""
    process = await asyncio.create_subprocess_exec(
        *(str(each) for each in argv),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=timeout_s)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def served_address(ready: str) -> str:
    """The address a ready line of `coffer serve` ("… serving on HOST:PORT …") names."""
    return ready.split("serving on ", 1)[1].split()[0]


@dataclass
class Serving:
    """A `coffer serve` process that said it is ready: what it printed on stdout up to its
    ready line (included), and its stderr (the log), read as it comes."""

    process: asyncio.subprocess.Process
    printed: list[str]
    _log: asyncio.Task[bytes]

    @property
    def ready(self) -> str:
        return self.printed[-1]

    @property
    def target(self) -> str:
        """The address its ready line says it serves on."""
        return served_address(self.ready)

    @property
    def metrics_port(self) -> int:
        """The port of its metrics, as printed (one process: one line)."""
        [line] = [line for line in self.printed if "metrics on" in line]
        return int(line.rsplit(":", 1)[1].split("/", 1)[0])

    async def stop(self) -> tuple[str, str]:
        """Stops it with SIGTERM; what it printed after its ready line, and its whole log."""
        assert self.process.stdout is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(60):
                rest = (await self.process.stdout.read()).decode()
                log = (await self._log).decode()
                status = await self.process.wait()
        except TimeoutError:
            # Not left behind the test.
            self.process.kill()
            await self.process.wait()
            raise
        assert status == 0, rest + log
        return rest, log


async def serve_beside(
    coffer: str | Path, *arguments: str, env: Mapping[str, str], ready_timeout_s: float = 120.0
) -> Serving:
    """Starts `coffer serve` with these arguments and environment, and waits for its ready
    line ("serving on"); its stdout and stderr apart."""
    process = await asyncio.create_subprocess_exec(
        str(coffer),
        "serve",
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=dict(env),
    )
    assert process.stdout is not None and process.stderr is not None
    log = asyncio.create_task(process.stderr.read())
    printed: list[str] = []
    try:
        async with asyncio.timeout(ready_timeout_s):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    await process.wait()
                    raise AssertionError(
                        f"coffer serve exited early: {''.join(printed)}{await log}"
                    )
                printed.append(line)
                if "serving on" in line:
                    return Serving(process, printed, log)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await log
        raise
