"""The README's walkthrough of the reports, run as written: every `$ coffer …` line of its
`console reports` blocks, in order, through the real `coffer` program against a server on a
fresh database, printing what the README shows under it. Times (and only times) may differ."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from pathlib import Path

from coffer.server.app import Server

from support.walkthrough import walkthrough

command_timeout_s = 30.0
_time = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")


def loose(lines: list[str]) -> list[str]:
    return [_time.sub("<time>", line) for line in lines]


async def test_the_reports_walkthrough_runs_as_written(server: Server) -> None:
    steps = walkthrough("```console reports")
    commands = [shlex.split(step.command)[1] for step in steps]
    assert {"usage", "outstanding"} <= set(commands), commands
    program = Path(sys.executable).parent / "coffer"
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("COFFER_")
    }
    environment["COFFER_TARGET"] = f"127.0.0.1:{server.port}"
    for step in steps:
        process = await asyncio.create_subprocess_exec(
            str(program),
            *shlex.split(step.command)[1:],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=command_timeout_s)
        printed = out.decode().splitlines() + err.decode().splitlines()
        where = f"README.md:{step.line}: $ {step.command}"
        assert loose(printed) == loose(step.output), where
        assert process.returncode == 0, (where, err.decode())
