"""Programs the tests run as a user would: beside the event loop, where the test's server
answers, to the end, with what they printed."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

__all__ = ["run_beside", "run_timeout_s_default"]

run_timeout_s_default = 120.0


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
