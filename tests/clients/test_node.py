"""The Node.js example, run as a Node.js integrator runs it: `npm install` of its pinned
packages from the npm registry into a folder of the test's own, then `node` against a real
server, on the protos as they are. What it prints is checked against what the server holds.

Node.js is needed for these tests. Without `node` or `npm`, they fail when CI is set (CI has
both) and are skipped otherwise, with the reason in pytest's summary."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from coffer.clients import Client
from coffer.server.app import Server

from support.checkout import histories_printed
from support.paths import root
from support.processes import run_beside

example_directory = root / "clients" / "examples" / "node"
example_files = ("package.json", "emi_merchant.js")
install_timeout_s = 240.0
run_timeout_s = 30.0
caller = "node-example-shop"
# Where the example loads .proto files from: coffer/v1/ and the google/rpc/ protos it decodes
# error details with, both shipped in the project's protos/.
protos_directory = root / "protos"


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        reason = f"`{name}` is not installed: the Node.js quick start is not tested"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{reason} (CI must have Node.js 18.3 or newer, with npm)")
        pytest.skip(reason)
    return found


@dataclass(frozen=True)
class NodeExample:
    node: str
    directory: Path

    async def run(self, target: str) -> tuple[int, str, str]:
        """Runs the example without blocking the event loop, where the test's server answers."""
        arguments = ["--target", target, "--caller", caller, "--protos", str(protos_directory)]
        return await run_beside(
            self.node,
            self.directory / "emi_merchant.js",
            *arguments,
            cwd=self.directory,
            timeout_s=run_timeout_s,
        )


@pytest.fixture(scope="module")
def node_example(tmp_path_factory: pytest.TempPathFactory) -> NodeExample:
    """The example and its package.json in a folder of their own, its packages installed."""
    node, npm = _tool("node"), _tool("npm")
    directory = tmp_path_factory.mktemp("node-example")
    for name in example_files:
        shutil.copy(example_directory / name, directory / name)
    install = subprocess.run(
        # No install scripts: none of the pinned packages needs one to work.
        [npm, "install", "--prefix", str(directory), "--no-audit", "--no-fund", "--ignore-scripts"],
        cwd=directory,
        capture_output=True,
        text=True,
        timeout=install_timeout_s,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    return NodeExample(node, directory)


def test_the_packages_are_pinned() -> None:
    """Exact versions, so that what the test ran is what a reader installs."""
    package = json.loads((example_directory / "package.json").read_text())
    dependencies = package["dependencies"]
    assert {"@grpc/grpc-js", "@grpc/proto-loader"} <= set(dependencies)
    exact = re.compile(r"\d+\.\d+\.\d+")
    assert [name for name, version in dependencies.items() if not exact.fullmatch(version)] == []


async def test_checkout(node_example: NodeExample, server: Server) -> None:
    target = f"127.0.0.1:{server.port}"
    exit_code, out, err = await node_example.run(target)
    assert (exit_code, err) == (0, ""), out
    lines = out.splitlines()
    assert lines[0] == "unit EUR scale 2"
    wallets = re.fullmatch(r"customer wallet (\d+), merchant wallet (\d+)", lines[1])
    assert wallets, lines[1]
    customer, merchant = (int(group) for group in wallets.groups())
    deposit = re.fullmatch(r"deposited 50\.00 EUR \(transfer (\d+)\)", lines[2])
    assert deposit, lines[2]
    deposit_id = deposit.group(1)
    # The deposit sent again with its key: the same transfer, marked as a replay.
    assert lines[3] == f"deposit sent again: transfer {deposit_id}, replayed true"
    payment = re.fullmatch(r"paid 25\.99 EUR for (order-[0-9a-f]{8}) \(transfer (\d+)\)", lines[4])
    assert payment, lines[4]
    order, payment_id = payment.groups()
    assert lines[5].startswith(
        "refused: a payment of 10000.00 EUR: FAILED_PRECONDITION reason INSUFFICIENT_FUNDS ("
    ), lines[5]
    # The field at fault, from the ErrorInfo's metadata and from the BadRequest's violation.
    assert lines[6].startswith(
        "invalid: a payment of 0.00 EUR: INVALID_ARGUMENT reason INVALID_ARGUMENT field amount,"
        " BadRequest field amount ("
    ), lines[6]
    assert [line.split() for line in lines[7:]] == histories_printed(
        customer, merchant, payment_id, deposit_id, order
    )
    # What it printed is what the ledger holds.
    async with Client(target) as coffer:
        assert (await coffer.get_balance(wallet_id=customer)).balance.posted == 2401
        assert (await coffer.get_balance(wallet_id=merchant)).balance.posted == 2599
        assert [
            (transfer.id, transfer.amount, transfer.reference)
            async for transfer in coffer.iter_transfers(wallet_id=customer)
        ] == [
            (int(payment_id), 2599, order),
            (int(deposit_id), 5000, "iban:DE89370400440532013000"),
        ]
        for refused in ("refused", "invalid"):
            assert [
                transfer async for transfer in coffer.iter_transfers(reference=f"{order}-{refused}")
            ] == []
        wallet = await coffer.get_wallet(wallet_id=customer)
        assert (wallet.owner_id, wallet.unit) == ("customer-ada", "EUR")


async def test_a_second_run_finds_the_unit(node_example: NodeExample, server: Server) -> None:
    """EUR made before by someone else, with other names: the example uses it as it is."""
    target = f"127.0.0.1:{server.port}"
    async with Client(target, caller="someone-else") as coffer:
        await coffer.create_unit(code="EUR", kind="currency", scale=2, name="Euro")
    exit_code, out, err = await node_example.run(target)
    assert (exit_code, err) == (0, ""), out
    assert out.startswith("unit EUR scale 2\n")
    assert "  balance 24.01 EUR, available 24.01 EUR\n" in out


async def test_unreachable_server(node_example: NodeExample) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exit_code, out, err = await node_example.run(f"127.0.0.1:{port}")
    assert (exit_code, out) == (3, "")
    assert err.startswith("error: UNAVAILABLE: "), err
