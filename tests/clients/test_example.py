"""The client's examples, run as their users run them: separate processes against the server.
The EMI merchant example, and the README's Python example."""

from __future__ import annotations

import re
import socket
import sys

from coffer.clients import Client
from coffer.server.app import Server

from support.checkout import histories_printed
from support.paths import readme
from support.processes import run_beside

example_module = "coffer.clients.examples.emi_merchant"
example_timeout_s = 30.0
# The server the README's example names, replaced by the test's.
readme_target = "127.0.0.1:50051"


async def run_example(target: str) -> tuple[int, str, str]:
    return await run_beside(
        sys.executable, "-m", example_module, "--target", target, timeout_s=example_timeout_s
    )


async def test_checkout(server: Server) -> None:
    target = f"127.0.0.1:{server.port}"
    exit_code, out, err = await run_example(target)
    assert exit_code == 0, err
    lines = out.splitlines()
    wallets = re.fullmatch(r"customer wallet (\d+), merchant wallet (\d+)", lines[0])
    assert wallets, lines[0]
    customer, merchant = (int(group) for group in wallets.groups())
    deposit = re.fullmatch(r"deposited 50\.00 EUR \(transfer (\d+)\)", lines[1])
    assert deposit, lines[1]
    payment = re.fullmatch(r"paid 25\.99 EUR for (order-[0-9a-f]{8}) \(transfer (\d+)\)", lines[2])
    assert payment, lines[2]
    order, payment_id = payment.group(1), payment.group(2)
    deposit_id = deposit.group(1)
    assert lines[3].startswith("a payment of 10000.00 EUR was refused: INSUFFICIENT_FUNDS: ")
    assert [line.split() for line in lines[4:]] == histories_printed(
        customer, merchant, payment_id, deposit_id, order
    )
    assert err == ""
    # What it printed is what the ledger holds.
    async with Client(target) as coffer:
        assert (await coffer.get_balance(wallet_id=customer)).balance.posted == 2401
        assert (await coffer.get_balance(wallet_id=merchant)).balance.posted == 2599
        refused = [
            transfer async for transfer in coffer.iter_transfers(reference=f"{order}-too-big")
        ]
        assert refused == []


async def test_checkout_with_an_existing_unit_of_other_names(server: Server) -> None:
    """EUR made before by someone else, with other names: the example uses it as it is."""
    target = f"127.0.0.1:{server.port}"
    async with Client(target, caller="someone-else") as coffer:
        await coffer.create_unit(code="EUR", kind="currency", scale=2, name="Euro")
    exit_code, out, err = await run_example(target)
    assert exit_code == 0, err
    assert "  balance 24.01 EUR, available 24.01 EUR\n" in out
    async with Client(target) as coffer:
        unit = await coffer.get_unit(code="EUR")
    assert (unit.name, unit.plural, unit.description) == ("Euro", "", "")


async def test_unreachable_server() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exit_code, out, err = await run_example(f"127.0.0.1:{port}")
    assert exit_code == 3
    assert out == ""
    assert err.startswith("error: UNAVAILABLE: ")


def readme_python() -> str:
    """The README's one Python example."""
    [block] = re.findall(r"^```python\n(.*?)^```$", readme.read_text(), re.M | re.S)
    return block


async def test_the_readmes_python_example(server: Server) -> None:
    source = readme_python()
    assert readme_target in source
    returncode, out, err = await run_beside(
        sys.executable,
        "-c",
        source.replace(readme_target, f"127.0.0.1:{server.port}"),
        timeout_s=example_timeout_s,
    )
    assert (returncode, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("refused: ")
    assert lines[1:3] == ["debited 1500 still due 500", "available 0.00 EUR"]
    assert [line.split()[1:4] for line in lines[3:]] == [
        ["TRANSFER_KIND_DEBIT", "15.00", "EUR"],
        ["TRANSFER_KIND_CREDIT", "15.00", "EUR"],
    ]


async def test_the_stories_of_credits_that_expire(server: Server) -> None:
    """The four stories of credits that expire, as the example tells them (twice: a second
    run finds the units made)."""
    target = f"127.0.0.1:{server.port}"
    for _ in range(2):
        exit_code, out, err = await run_beside(
            sys.executable,
            "-m",
            "coffer.clients.examples.credits",
            "--target",
            target,
            timeout_s=example_timeout_s,
        )
        assert exit_code == 0 and err == "", err
        venue, coach, overview, booking, loyalty = out.splitlines()
        assert re.fullmatch(
            r"venue: 8 seats left \(8 seat left of 10 seat until \d{4}-\d\d-\d\d\); "
            r"after the season: 0",
            venue,
        ), venue
        assert re.fullmatch(
            r"coach: 4\.50 session left \(4\.50 session left of 5\.00 session until "
            r"\d{4}-\d\d-\d\d\); used 0\.50 session by coach Bo: half a session: warm-up",
            coach,
        ), coach
        assert overview.endswith(
            "outstanding 4.50 session for "
            + overview.split(" for ")[1].split(",")[0]
            + ", expiring within 31 days 0.00 session"
        ), overview
        assert re.fullmatch(
            r"booking: paid 15\.00 EUR, 15\.00 EUR of it from the goodwill; 5\.00 EUR left of "
            r"20\.00 EUR until \d{4}-\d\d-\d\d",
            booking,
        ), booking
        assert re.fullmatch(
            r"loyalty: the month ended, the run expired [1-9]\d* grant\(s\); 0 points left",
            loyalty,
        ), loyalty
