"""The README's walkthrough of access, run as written: every `$ coffer …` line of its
`console access` blocks, in order, through the real `coffer` program against a server over TLS
on a fresh database (its first key made in the database, as on the server's machine), then
its `python access` example with the customer's key. In the commands, `coffer_2_…` stands for
the whole key printed as `coffer_2_…` above: times and keys' secrets (only those) may differ."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from coffer.server.app import Server, Settings

from support.certificates import Authority
from support.paths import readme
from support.processes import run_beside
from support.walkthrough import walkthrough

command_timeout_s = 30.0
readme_target = "127.0.0.1:50051"
_time = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}")
_key = re.compile(r"coffer_([0-9]+)_[A-Za-z0-9_-]{43}")
_key_shown = re.compile(r"coffer_([0-9]+)_…")


def python_example() -> str:
    [block] = re.findall(r"^```python access\n(.*?)^```$", readme.read_text(), re.M | re.S)
    return block


def loose(lines: list[str]) -> list[str]:
    return [_key.sub(r"coffer_\1_…", _time.sub("<time>", line)) for line in lines]


async def test_the_access_walkthrough_runs_as_written(database_url: str, tmp_path: Path) -> None:
    steps = walkthrough("```console access")
    assert len(steps) >= 10 and "keys create --role admin" in steps[0].command
    authority = Authority(tmp_path, "readme")
    certificate = authority.issue_server()
    shutil.copy(authority.cert, tmp_path / "ca.pem")
    server = await Server.start(
        Settings(
            database_url=database_url,
            listen="127.0.0.1:0",
            tls_cert=str(certificate.cert),
            tls_key=str(certificate.key),
        )
    )
    program = Path(sys.executable).parent / "coffer"
    environment = {
        name: value for name, value in os.environ.items() if not name.startswith("COFFER_")
    }
    environment |= {
        "COFFER_TARGET": f"127.0.0.1:{server.port}",
        "COFFER_TLS_CA": "ca.pem",
        "DATABASE_URL": database_url,
    }
    keys: dict[str, str] = {}
    try:
        for step in steps:
            argv = [
                _key_shown.sub(lambda found: keys[found[1]], each)
                for each in shlex.split(step.command)
            ]
            process = await asyncio.create_subprocess_exec(
                str(program),
                *argv[1:],
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=environment,
                cwd=tmp_path,
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=command_timeout_s)
            printed = out.decode().splitlines() + err.decode().splitlines()
            where = f"README.md:{step.line}: $ {step.command}"
            assert loose(printed) == loose(step.output), where
            expected = 1 if step.output and step.output[0].startswith("error: ") else 0
            assert process.returncode == expected, (where, err.decode())
            for line in printed:
                for found in _key.finditer(line):
                    keys[found[1]] = found[0]
        source = python_example().replace(readme_target, f"127.0.0.1:{server.port}")
        assert readme_target not in source
        returncode, printed_out, printed_err = await run_beside(
            sys.executable,
            "-c",
            source,
            timeout_s=command_timeout_s,
            cwd=tmp_path,
            env={**environment, "COFFER_API_KEY": keys["2"]},
        )
        assert (returncode, printed_err) == (0, "")
        assert printed_out.splitlines() == [
            "[3]",
            "paid 500 by alice-app",
            "refused: wallet 4 does not exist",
        ]
    finally:
        await server.stop()
