"""The README's walkthroughs, run as written: every `$ coffer …` line of its `console` blocks, in
order, through the real `coffer` program against a server on a fresh database, printing what
the README shows under it; and likewise its `console grants` blocks (credits that expire) and
its `console reports` blocks, each on a fresh database of their own. Times (and only times)
may differ."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
from pathlib import Path

from coffer.server.app import Server

from support.walkthrough import Step, walkthrough

command_timeout_s = 30.0
_time = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")


def loose(lines: list[str]) -> list[str]:
    return [_time.sub("<time>", line) for line in lines]


def refused(step: Step) -> bool:
    return bool(step.output) and step.output[0].startswith("error: ")


def test_the_walkthrough_is_found_and_refuses_last() -> None:
    steps = walkthrough("```console")
    assert len(steps) >= 15
    assert all(shlex.split(step.command)[0] == "coffer" for step in steps), steps
    # A refusal may use up a transfer id: after the first, nothing shows a transfer or hold id.
    first = next(index for index, step in enumerate(steps) if refused(step))
    for step in steps[first:]:
        assert refused(step) or not any(
            line.startswith(("transfer ", "hold ")) for line in step.output
        ), f"README.md:{step.line}: ids after a refusal"


async def test_the_walkthrough_runs_as_written(server: Server) -> None:
    await run(walkthrough("```console"), server)


async def test_the_walkthrough_of_credits_that_expire_runs_as_written(server: Server) -> None:
    """Its `console grants` blocks, on a fresh server of their own."""
    steps = walkthrough("```console grants")
    assert len(steps) >= 10 and "--validity P6M" in steps[0].command
    assert not any(refused(step) for step in steps)
    await run(steps, server)


async def test_the_walkthrough_of_the_reports_runs_as_written(server: Server) -> None:
    """Its `console reports` blocks, on a fresh server of their own."""
    steps = walkthrough("```console reports")
    commands = [shlex.split(step.command)[1] for step in steps]
    assert {"usage", "outstanding"} <= set(commands), commands
    await run(steps, server)


async def run(steps: list[Step], server: Server) -> None:
    """Runs each step's command through the real `coffer`, comparing what it prints."""
    program = Path(sys.executable).parent / "coffer"
    assert program.exists(), program
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("COFFER_")
    }
    environment["COFFER_TARGET"] = f"127.0.0.1:{server.port}"
    for step in steps:
        argv = shlex.split(step.command)
        process = await asyncio.create_subprocess_exec(
            str(program),
            *argv[1:],
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=command_timeout_s)
        printed = out.decode().splitlines() + err.decode().splitlines()
        where = f"README.md:{step.line}: $ {step.command}"
        assert loose(printed) == loose(step.output), where
        assert process.returncode == (1 if refused(step) else 0), (where, err.decode())
