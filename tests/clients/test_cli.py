"""The operator CLI end to end: `coffer.clients.cli.main` against the real server, and its
parsing, which needs none.

`main` blocks (it runs a SyncClient); the server runs on the test's event loop, so every
command goes through `asyncio.to_thread`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from coffer.clients import Client, limits
from coffer.clients.cli import argument_parser, deadline_s_max, main
from coffer.server.app import Server


@dataclass(frozen=True)
class Result:
    exit_code: int
    out: str
    err: str


class Cli:
    def __init__(self, target: str, capsys: pytest.CaptureFixture[str]) -> None:
        self.target = target
        self.capsys = capsys

    async def __call__(self, *argv: str) -> Result:
        exit_code = await asyncio.to_thread(main, ["--target", self.target, *argv])
        captured = self.capsys.readouterr()
        return Result(exit_code, captured.out, captured.err)

    async def ok(self, *argv: str) -> list[str]:
        """Runs a command that must succeed; its output lines."""
        result = await self(*argv)
        assert (result.exit_code, result.err) == (0, ""), result
        return result.out.splitlines()

    async def json(self, *argv: str) -> Any:
        result = await self(*argv, "--json")
        assert (result.exit_code, result.err) == (0, ""), result
        return json.loads(result.out)

    async def wallet(self, owner: str, owner_kind: str = "customer") -> int:
        """Creates an EUR wallet; its id."""
        created = await self.json(
            "wallet", "create", "--owner", owner, "--owner-kind", owner_kind, "--unit", "EUR"
        )
        return int(created["wallet"]["id"])


@pytest.fixture
def cli(server: Server, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(f"127.0.0.1:{server.port}", capsys)


@pytest.fixture
def closed_target() -> str:
    """An address where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


def number(pattern: str, line: str) -> int:
    """The first group of `pattern`, which must match the start of `line`, as an int."""
    match = re.match(pattern, line)
    assert match, (pattern, line)
    return int(match.group(1))


def column(lines: list[str], index: int) -> list[str]:
    return [line.split()[index] for line in lines]


async def test_operator_walkthrough(cli: Cli) -> None:
    assert await cli.ok(
        "unit", "create", "EUR", "--kind", "currency", "--scale", "2", "--name", "Euro",
        "--plural", "Euros",
    ) == ["unit EUR  currency  scale 2  Euro/Euros"]  # fmt: skip
    units = await cli.ok("unit", "list")
    assert units[0].split() == ["CODE", "KIND", "SCALE", "VALIDITY", "NAME", "PLURAL"]
    assert units[1].split() == ["EUR", "currency", "2", "-", "Euro", "Euros"]

    created = await cli.json(
        "wallet", "create", "--owner", "ada", "--owner-kind", "customer", "--unit", "EUR"
    )
    customer = int(created["wallet"]["id"])
    assert created["wallet"]["status"] == "WALLET_STATUS_ACTIVE"
    merchant_lines = await cli.ok(
        "wallet", "create", "--owner", "bakery", "--owner-kind", "merchant", "--unit", "EUR",
        "--minimum", "-500", "--metadata", "tier=gold", "city=Lyon",
    )  # fmt: skip
    merchant = number(r"wallet (\d+)  merchant bakery  EUR  active$", merchant_lines[0])
    assert merchant_lines[1] == "balance   posted 0  pending 0  available 0  minimum -500"
    assert merchant_lines[2].startswith("created   20")
    assert merchant_lines[3] == "metadata  city=Lyon, tier=gold"
    friend = await cli.wallet("bo")

    # Credit, and the same credit again under its key: applied once.
    credit = ["credit", str(customer), "1500", "--reference", "order-1"]
    credit += ["--idempotency-key", "order-1:credit", "--performed-by", "ops:ana"]
    (line,) = await cli.ok(*credit)
    credit_id = number(r"transfer (\d+)  credit  \+1500 EUR  ", line)
    assert line == (
        f"transfer {credit_id}  credit  +1500 EUR  wallet {customer}  reference order-1"
        "  balance 1500"
    )
    assert await cli.ok(*credit) == [line]

    (line,) = await cli.ok("debit", str(customer), "200", "--note", "coffee")
    debit_id = number(r"transfer (\d+)  debit  -200 EUR  ", line)
    assert line.endswith(f"wallet {customer}  balance 1300")
    refused = await cli("debit", str(customer), "5000")
    assert refused.exit_code == 1 and refused.out == ""
    assert refused.err.startswith("error: INSUFFICIENT_FUNDS: ")
    assert refused.err.endswith("\n") and refused.err.count("\n") == 1
    (line,) = await cli.ok("debit", str(customer), "5000", "--mode", "up-to")
    assert re.fullmatch(
        rf"transfer \d+  debit  -1300 EUR  wallet {customer}  requested 5000"
        r"  remaining 3700 due  balance 0",
        line,
    )

    (line,) = await cli.ok("deposit", str(customer), "5000", "--source", "iban:DE89")
    assert re.fullmatch(
        rf"transfer \d+  deposit  \+5000 EUR  wallet {customer}  reference iban:DE89"
        r"  balance 5000",
        line,
    )
    (line,) = await cli.ok("pay", str(customer), str(merchant), "1200", "--reference", "o-55")
    assert re.fullmatch(
        rf"transfer \d+  payment  1200 EUR  wallet {customer} -> wallet {merchant}"
        r"  reference o-55",
        line,
    )
    (line,) = await cli.ok("transfer", str(customer), str(friend), "300")
    assert re.fullmatch(
        rf"transfer \d+  transfer  300 EUR  wallet {customer} -> wallet {friend}", line
    )
    (line,) = await cli.ok("withdraw", str(merchant), "1000", "--source", "iban:FR76")
    assert re.fullmatch(
        rf"transfer \d+  withdrawal  -1000 EUR  wallet {merchant}  reference iban:FR76"
        r"  balance 200",
        line,
    )

    # Holds: the server's --target comes before the command, the capture's after it.
    placed = await cli.ok(
        "hold", "place", str(customer), "500", "--target", str(merchant), "--timeout", "60"
    )
    hold = number(r"hold (\d+)  pending  500 EUR  ", placed[0])
    assert re.fullmatch(
        rf"hold {hold}  pending  500 EUR  wallet {customer} -> wallet {merchant}"
        r"  expires \d{4}-\d\d-\d\d \d\d:\d\d:\d\d",
        placed[0],
    )
    assert placed[1].startswith(f"transfer {hold}  hold  500 EUR  wallet {customer} -> ")
    balance = await cli.json("balance", str(customer))
    assert balance == {
        "walletId": str(customer),
        "unit": "EUR",
        "balance": {
            "posted": "3500",
            "pending": "500",
            "available": "3000",
            "unit": "EUR",
            "unitScale": 2,
            "unspendable": "0",
        },
    }
    captured = await cli.ok("hold", "capture", str(hold), "--amount", "300")
    assert captured[0] == (
        f"hold {hold}  captured  300 of 500 EUR  wallet {customer} -> wallet {merchant}"
    )
    assert re.fullmatch(rf"transfer \d+  capture  300 EUR  .*  hold {hold}", captured[1])
    assert (await cli.ok("hold", "show", str(hold)))[0] == captured[0]
    second = number(
        r"hold (\d+)  pending", (await cli.ok("hold", "place", str(customer), "100"))[0]
    )
    released = await cli.ok("hold", "release", str(second))
    assert released[0].startswith(f"hold {second}  released  100 EUR  wallet {customer} -> ")
    assert re.fullmatch(rf"transfer \d+  release  100 EUR  .*  hold {second}", released[1])
    refused = await cli("hold", "release", str(second))
    assert refused.exit_code == 1 and refused.err.startswith("error: HOLD_NOT_PENDING: ")

    (line,) = await cli.ok("void", str(debit_id), "--note", "refund")
    void_id = number(r"transfer (\d+)  void  200 EUR  ", line)
    assert line.endswith(f"voids transfer {debit_id}")
    refused = await cli("void", str(debit_id))
    assert refused.exit_code == 1 and refused.err.startswith("error: ALREADY_VOIDED: ")

    assert await cli.ok("balance", str(customer)) == [
        f"wallet {customer}  EUR  posted 3400  pending 0  available 3400"
    ]
    assert await cli.ok("balance", str(merchant)) == [
        f"wallet {merchant}  EUR  posted 500  pending 0  available 500"
    ]

    history = await cli.ok("history", str(customer), "--limit", "4")
    assert history[0].split() == [
        "ID", "TIME", "(UTC)", "KIND", "AMOUNT", "UNIT", "WALLET", "BALANCE", "REFERENCE", "NOTE",
    ]  # fmt: skip
    rows = history[1:5]
    assert column(rows, 0)[0] == str(void_id)
    assert column(rows, 3) == ["void", "release", "hold", "capture"]
    # Signed by the transfer's direction; what a hold reserves and its release frees, which
    # moves no posted money, in parentheses.
    amounts = column(rows, 4)
    assert amounts == ["+200", "(100)", "(100)", "-300"]
    assert column(rows, 6) == ["1", "1", "1", str(merchant)]
    # The wallet's posted balance after each: what holds reserve and free moves none.
    assert column(rows, 7) == ["3400", "3200", "3200", "3200"]
    assert history[5] == "(more than 4; raise --limit to see them)"
    everything = (await cli.ok("history", str(customer), "--limit", "100"))[1:]
    assert len(everything) == 11 and "raise --limit" not in everything[-1]
    assert column(everything, 0)[-1] == str(credit_id)
    credits = await cli.ok("history", str(customer), "--kind", "credit", "deposit")
    assert column(credits[1:], 3) == ["deposit", "credit"]
    by_reference = await cli.json("history", str(customer), "--reference", "o-55")
    assert [each["kind"] for each in by_reference["transfers"]] == ["TRANSFER_KIND_PAYMENT"]

    listed = await cli.ok("wallet", "list", "--unit", "EUR")
    assert listed[0].split() == [
        "ID", "OWNER", "KIND", "UNIT", "STATUS", "POSTED", "PENDING", "AVAILABLE",
    ]  # fmt: skip
    ours = [row.split() for row in listed[1:] if row.split()[1] in ("ada", "bakery", "bo")]
    assert ours == [
        [str(customer), "ada", "customer", "EUR", "active", "3400", "0", "3400"],
        [str(merchant), "bakery", "merchant", "EUR", "active", "500", "0", "500"],
        [str(friend), "bo", "customer", "EUR", "active", "300", "0", "300"],
    ]
    assert column(await cli.ok("wallet", "list", "--owner", "bo"), 0)[1:] == [str(friend)]
    limited = await cli.ok("wallet", "list", "--limit", "2")
    assert len(limited) == 4 and limited[-1] == "(more than 2; raise --limit to see them)"
    shown = await cli.ok("wallet", "show", str(customer))
    assert shown[0] == f"wallet {customer}  customer ada  EUR  active"
    assert shown[1] == "balance   posted 3400  pending 0  available 3400  minimum 0"

    empty = await cli.wallet("cy")
    cancelled = await cli.ok("wallet", "cancel", str(empty))
    assert cancelled[0] == f"wallet {empty}  customer cy  EUR  cancelled"
    refused = await cli("wallet", "cancel", str(customer))
    assert refused.exit_code == 1 and refused.err.startswith("error: WALLET_NOT_EMPTY: ")
    refused = await cli("wallet", "show", "424242")
    assert refused.exit_code == 1 and refused.err.startswith("error: WALLET_NOT_FOUND: ")

    assert await cli.ok("health") == ["SERVING"]
    assert await cli.json("health") == {"status": "SERVING"}


async def test_a_movement_sends_its_options_and_shows_the_balance_after_it(
    cli: Cli, server: Server
) -> None:
    await cli.ok("unit", "create", "EUR", "--kind", "currency", "--scale", "2", "--name", "Euro")
    wallet = await cli.wallet("ada")
    await cli.ok("credit", str(wallet), "2000")
    await cli.ok("hold", "place", str(wallet), "300")
    credit = ["credit", str(wallet), "1500", "--reference", "order-1", "--performed-by", "ada"]
    (line,) = await cli.ok(*credit, "--idempotency-key", "order-1:credit")
    transfer_id = number(r"transfer (\d+)  credit", line)
    # What a hold reserves makes the available balance differ from the posted one.
    assert line == (
        f"transfer {transfer_id}  credit  +1500 EUR  wallet {wallet}  reference order-1"
        "  balance 3500 (available 3200)"
    )
    # Sent as the caller "cli": a client naming it with the same key and fields replays it.
    async with Client(f"127.0.0.1:{server.port}", caller="cli") as coffer:
        replayed = await coffer.credit(
            wallet_id=wallet,
            amount=1500,
            reference="order-1",
            performed_by="ada",
            idempotency_key="order-1:credit",
        )
    assert replayed.id == transfer_id
    assert (replayed.reference, replayed.performed_by) == ("order-1", "ada")


async def test_a_units_default_validity(cli: Cli) -> None:
    create = ["unit", "create", "pack", "--kind", "credit", "--scale", "0", "--name", "Pack"]
    assert await cli.ok(*create, "--validity", "P1Y6M") == [
        "unit pack  credit  scale 0  validity P18M  Pack"
    ]
    assert await cli.ok(*create, "--validity", "P18M") == [
        "unit pack  credit  scale 0  validity P18M  Pack"
    ]
    shown = await cli.json("unit", "create", "seat", "--kind", "credit", "--scale", "0",
                           "--name", "Seat", "--validity", "P6M")  # fmt: skip
    assert shown["unit"]["defaultValidity"] == "P6M"
    units = await cli.ok("unit", "list")
    assert [line.split() for line in units] == [
        ["CODE", "KIND", "SCALE", "VALIDITY", "NAME", "PLURAL"],
        ["pack", "credit", "0", "P18M", "Pack"],
        ["seat", "credit", "0", "P6M", "Seat"],
    ]
    # Another validity is another definition; a text that is no duration, bad input.
    refused = await cli(*create, "--validity", "P6M")
    assert refused.exit_code == 1 and refused.err.startswith("error: UNIT_EXISTS: ")
    refused = await cli(*create[:2], "box", *create[3:], "--validity", "6 months")
    assert refused.exit_code == 1, refused
    assert refused.err.startswith("error: INVALID_ARGUMENT: default_validity: must be ")


async def test_json_output_is_the_response(cli: Cli) -> None:
    unit = await cli.json(
        "unit", "create", "pts", "--kind", "credit", "--scale", "0", "--name", "P"
    )
    assert unit["unit"]["code"] == "pts" and unit["unit"]["kind"] == "UNIT_KIND_CREDIT"
    wallet = (
        await cli.json(
            "wallet", "create", "--owner", "w", "--owner-kind", "customer", "--unit", "pts",
            "--idempotency-key", "w-1",
        )
    )["wallet"]  # fmt: skip
    wallet_id = wallet["id"]
    credited = await cli.json("credit", wallet_id, "10", "--metadata", "batch=7")
    assert credited["transfer"]["amount"] == "10"
    assert credited["transfer"]["kind"] == "TRANSFER_KIND_CREDIT"
    assert credited["transfer"]["metadata"] == {"batch": "7"}
    placed = await cli.json("hold", "place", wallet_id, "4")
    assert placed["hold"]["status"] == "HOLD_STATUS_PENDING"
    assert placed["transfer"]["id"] == placed["hold"]["id"]
    debited = await cli.json("debit", wallet_id, "15", "--mode", "up-to")
    assert (debited["amountDebited"], debited["amountRemaining"]) == ("6", "9")
    balance = await cli.json("balance", wallet_id)
    assert balance["balance"] == {
        "posted": "4",
        "pending": "4",
        "available": "0",
        "unit": "pts",
        "unitScale": 0,
        "unspendable": "0",
    }
    listed = await cli.json("wallet", "list", "--owner", "w")
    assert [each["id"] for each in listed["wallets"]] == [wallet_id]
    assert listed["nextPageToken"] == ""


async def test_credits_that_expire(cli: Cli) -> None:
    """Terms on credits and deposits, a wallet's grants, its balance now and to come, an
    expiration run and the void of an expiration, as the operator types and reads them."""
    await cli.ok("unit", "create", "EUR", "--kind", "currency", "--scale", "2", "--name", "Euro")
    wallet = await cli.wallet("ada")
    (line,) = await cli.ok("deposit", str(wallet), "5000", "--source", "card:4242")
    assert line.endswith("balance 5000")
    now = datetime.now(UTC)
    (line,) = await cli.ok("credit", str(wallet), "2000", "--expires-in-days", "30")
    goodwill = number(r"transfer (\d+)  credit  ", line)
    assert line.endswith("balance 7000")
    start = (now + timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
    later = await cli.json(
        "credit", str(wallet), "300", "--valid-from", start, "--expires-in-days", "5"
    )
    assert later["transfer"]["amount"] == "300"
    (line,) = await cli.ok("balance", str(wallet))
    assert line == (
        f"wallet {wallet}  EUR  posted 7300  pending 0  unspendable 300  available 7000"
    )
    (line,) = await cli.ok("debit", str(wallet), "1500", "--note", "booking")
    assert line.endswith("balance 5800 (available 5500)")

    header, *rows = await cli.ok("grants", str(wallet))
    assert header.split() == [
        "ID", "AMOUNT", "REMAINING", "VALID", "FROM", "(UTC)", "EXPIRES", "(UTC)", "TRANSFER",
    ]  # fmt: skip
    assert [row.split()[:3] for row in rows] == [["1", "2000", "500"], ["2", "300", "300"]]
    assert rows[0].split()[-1] == str(goodwill)
    expires = datetime.strptime(" ".join(rows[0].split()[5:7]), "%Y-%m-%d %H:%M:%S")
    assert abs(expires.replace(tzinfo=UTC) - (now + timedelta(days=30))) < timedelta(minutes=1)
    assert " ".join(rows[1].split()[3:5]) == start.replace("T", " ").removesuffix("Z")
    listed = await cli.json("grants", str(wallet), "--all")
    assert [grant["remaining"] for grant in listed["grants"]] == ["500", "300"]

    at = (now + timedelta(days=40)).strftime("%Y-%m-%dT%H:%M:%SZ")
    (line,) = await cli.ok("balance", str(wallet), "--at", at)
    assert line == (
        f"wallet {wallet}  EUR  posted 5000  pending 0  available 5000"
        f"  at {at.replace('T', ' ').removesuffix('Z')}"
    )
    future = await cli.json("balance", str(wallet), "--at", at)
    assert (future["time"], future["balance"]["posted"]) == (at, "5000")
    assert await cli.ok("expire") == ["expired 0 grants"]
    assert (await cli.json("expire")) == {"expiredCount": "0"}

    # A grant a second from expiry, past it, then expired by a run, and its expiration voided.
    soon = (datetime.now(UTC) + timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    await cli.ok("credit", str(wallet), "70", "--expires-at", soon)
    async with asyncio.timeout(10):
        while (await cli.ok("expire")) != ["expired 1 grant"]:
            await asyncio.sleep(0.2)
    history = await cli.ok("history", str(wallet), "--kind", "expiration")
    assert history[1].split()[3:5] == ["expiration", "-70"]
    expiration = int(history[1].split()[0])
    refused = await cli("void", str(expiration))
    assert refused.exit_code == 1
    assert refused.err.startswith("error: INVALID_ARGUMENT: expires_at: is required")
    restored = (now + timedelta(days=7)).strftime("%Y-%m-%dT%H:%M:%SZ")
    (line,) = await cli.ok("void", str(expiration), "--expires-at", restored)
    assert re.fullmatch(rf"transfer \d+  void  70 EUR  wallet \d+ -> wallet {wallet}  .*", line)
    grants = await cli.json("grants", str(wallet))
    assert [grant["expiresAt"] for grant in grants["grants"]][-1] == restored

    events = await cli.ok("events", "--type", "grant-created", "--wallet", str(wallet))
    assert len(events) == 3
    assert "grant 1  wallet" in events[0] and "2000 of 2000 EUR" in events[0]


async def test_refusals_print_one_line_and_exit_1(cli: Cli) -> None:
    await cli.ok("unit", "create", "EUR", "--kind", "currency", "--scale", "2", "--name", "Euro")
    wallet = await cli.wallet("a")
    await cli.ok("credit", str(wallet), "100")
    refusals: list[tuple[list[str], str]] = [
        (["debit", str(wallet), "101"], "INSUFFICIENT_FUNDS"),
        (["debit", str(wallet), "101", "--json"], "INSUFFICIENT_FUNDS"),
        (["transfer", str(wallet), str(wallet), "1"], "SAME_WALLET"),
        (["credit", "424242", "1"], "WALLET_NOT_FOUND"),
        (["void", "424242"], "TRANSFER_NOT_FOUND"),
        (["hold", "show", "424242"], "HOLD_NOT_FOUND"),
        (["credit", str(wallet), "0"], "INVALID_ARGUMENT"),
        (["credit", str(wallet), "5", "--idempotency-key", "k", "--note", "a"], ""),
        (["credit", str(wallet), "6", "--idempotency-key", "k"], "IDEMPOTENCY_KEY_REUSED"),
        (["unit", "create", "EUR", "--kind", "currency", "--scale", "3", "--name", "E"],
         "UNIT_EXISTS"),
    ]  # fmt: skip
    for argv, reason in refusals:
        result = await cli(*argv)
        if not reason:
            assert result.exit_code == 0, result
            continue
        assert result.exit_code == 1, (argv, result)
        assert result.out == ""
        assert result.err.startswith(f"error: {reason}: "), (argv, result)
        assert result.err.count("\n") == 1 and result.err.endswith("\n")


def test_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    usage = capsys.readouterr().err
    for command in ["unit", "wallet", "credit", "debit", "transfer", "hold", "history", "health"]:
        assert command in usage
    assert main(["--help"]) == 0
    assert "operator commands" in capsys.readouterr().out
    assert main(["hold", "place", "--help"]) == 0
    assert "minor units" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["wallet"],
        ["credit", "7"],
        ["credit", "x", "5"],
        ["credit", "0", "5"],
        ["credit", "7", "1.5"],
        ["credit", "7", str(limits.balance_max + 1)],
        ["credit", "7", str(limits.balance_min - 1)],
        ["debit", "7", "5", "--mode", "sideways"],
        ["wallet", "create", "--owner", "a", "--owner-kind", "system", "--unit", "EUR"],
        ["wallet", "create", "--owner", "a", "--owner-kind", "customer", "--unit", "EUR",
         "--metadata", "x"],
        ["history", "7", "--kind", "refund"],
        ["history", "7", "--limit", "0"],
        ["unit", "create", "EUR", "--kind", "currency", "--name", "Euro"],
        ["unit", "create", "EUR", "--kind", "currency", "--name", "Euro",
         "--scale", str(limits.unit_scale_max + 1)],
        ["unit", "create", "EUR", "--kind", "currency", "--name", "Euro", "--scale", "2",
         "--validity", "P" + "1" * limits.validity_length_max + "D"],
        ["hold", "place", "7", "5", "--timeout", str(limits.hold_timeout_s_max + 1)],
        ["hold", "place", "7", "5", "--timeout", str(limits.hold_timeout_s_min - 1)],
        ["hold", "place", "7", "5", "--timeout", "1.5"],
        ["credit", "7", "5", "--expires-at", "2030-01-01T00:00:00"],
        ["credit", "7", "5", "--expires-at", "tomorrow"],
        ["credit", "7", "5", "--expires-in-days", "0"],
        ["credit", "7", "5", "--expires-in-days", str(limits.validity_months_max * 30 + 1)],
        ["credit", "7", "5", "--expires-in-days", "5", "--expires-at", "2030-01-01T00:00:00Z"],
        ["deposit", "7", "5", "--source", "x", "--valid-from", "2030-01-01"],
        ["void", "7", "--expires-at", "soon"],
        ["balance", "7", "--at", "2030-01-01"],
        # Times whose UTC falls outside the years 1 to 9999, and an expiry past 9999.
        ["balance", "7", "--at", "0001-01-01T00:30:00+01:00"],
        ["credit", "7", "5", "--expires-at", "9999-12-31T23:30:00-01:00"],
        ["usage", "--since", "0001-01-01T00:30:00+01:00"],
        ["credit", "7", "5", "--valid-from", "9999-12-01T00:00:00Z", "--expires-in-days", "100"],
        ["deposit", "7", "5", "--source", "x", "--valid-from", "9999-12-01T00:00:00Z",
         "--expires-in-days", "100"],
        ["grants", "0"],
        ["grants", "7", "--limit", "0"],
        ["balance", "7", "--deadline", "0"],
        ["balance", "7", "--deadline", str(deadline_s_max + 1)],
        ["--caller", "", "balance", "7"],
        ["--caller", "@coffer", "balance", "7"],
        ["--caller", "x" * 129, "balance", "7"],
    ],
)  # fmt: skip
async def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    # Nothing is sent: no server needed, the target is never reached.
    assert await asyncio.to_thread(main, ["--target", "127.0.0.1:9", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err


def test_parsing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USER", "ada")
    monkeypatch.setenv("COFFER_TARGET", "ledger:50051")
    arguments = argument_parser().parse_args(
        [
            *["hold", "place", "7", "500", "--target", "9", "--timeout", "60", "--json"],
            *["--note", "deposit"],
        ]
    )
    assert (arguments.wallet, arguments.amount, arguments.target_wallet) == (7, 500, 9)
    assert arguments.timeout == timedelta(seconds=60)
    assert arguments.json is True
    assert arguments.performed_by == "ada"
    assert arguments.target == "ledger:50051"
    assert arguments.reference == ""
    arguments = argument_parser().parse_args(["--target", "h:1", "--caller", "ops", "balance", "7"])
    assert (arguments.target, arguments.caller, arguments.json) == ("h:1", "ops", False)
    arguments = argument_parser().parse_args(
        ["--target", "h:1", "transfer", "7", "8", "100", "--json"]
    )
    assert (arguments.source_wallet, arguments.target_wallet, arguments.amount) == (7, 8, 100)
    assert arguments.target == "h:1"
    arguments = argument_parser().parse_args(["transfer", "7", "8", "100", "--target", "h:2"])
    assert arguments.target == "h:2"
    arguments = argument_parser().parse_args(["balance", "7"])
    assert arguments.target == "ledger:50051"
    arguments = argument_parser().parse_args(
        [
            *["wallet", "create", "--owner", "c-1", "--owner-kind", "customer", "--unit", "EUR"],
            *["--minimum", "-500", "--metadata", "tier=gold", "region=eu", "--metadata", "x="],
        ]
    )
    assert arguments.minimum == -500
    assert dict(arguments.metadata) == {"tier": "gold", "region": "eu", "x": ""}
    arguments = argument_parser().parse_args(
        ["history", "7", "--kind", "credit", "hold-expiry", "--limit", "5"]
    )
    assert arguments.kind == ["credit", "hold-expiry"]
    arguments = argument_parser().parse_args(["deposit", "7", "100", "--source", "iban:DE89"])
    assert arguments.source == "iban:DE89"
    assert "reference" not in arguments


def test_choices_are_the_apis() -> None:
    """The choices of the options that name an enum of the API are its values, as the CLI
    spells them, and the bounds of the others the core's (through coffer.clients.limits)."""
    options = {
        (sub.prog.removeprefix("coffer "), action.option_strings[0]): action
        for sub in _subparsers(argument_parser())
        for action in sub._actions
        if action.option_strings
    }
    assert options["history", "--kind"].choices == [
        "credit", "debit", "transfer", "deposit", "withdrawal", "payment", "hold", "capture",
        "release", "hold-expiry", "void", "expiration",
    ]  # fmt: skip
    assert options["unit create", "--kind"].choices == ["currency", "credit"]
    assert options["debit", "--mode"].choices == ["all-or-nothing", "up-to"]
    # The greatest of each bound passes; one more is bad usage (test_bad_usage_exits_2).
    timeout = ["hold", "place", "7", "5", "--timeout", str(limits.hold_timeout_s_max)]
    assert argument_parser().parse_args(timeout).timeout == timedelta(
        seconds=limits.hold_timeout_s_max
    )
    scale = ["unit", "create", "E", "--kind", "credit", "--name", "E"]
    scale += ["--scale", str(limits.unit_scale_max)]
    assert argument_parser().parse_args(scale).scale == limits.unit_scale_max
    amount = ["credit", "7", str(limits.balance_max)]
    assert argument_parser().parse_args(amount).amount == limits.balance_max


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below `parser`, commands and groups of commands."""
    found = []
    pending = [parser]
    while pending:
        current = pending.pop()
        for action in current._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.extend(action.choices.values())
                pending.extend(action.choices.values())
    return found


def test_options_of_commands_never_shadow_the_global_ones() -> None:
    """A command's own argument stored under a global option's name (`transfer … TARGET` as
    "target") would replace the server address parsed before the command."""
    parser = argument_parser()
    global_names = {action.dest for action in parser._actions}
    for sub in _subparsers(parser):
        for action in sub._actions:
            if action.dest in global_names and not isinstance(action, argparse._SubParsersAction):
                # Only the global options repeated after the command, which have no default.
                assert action.default is argparse.SUPPRESS, (sub.prog, action.dest)


async def test_unreachable_server_exits_3(
    closed_target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--target", closed_target, "--deadline", "1", "balance", "7"]
    assert await asyncio.to_thread(main, argv) == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(r"error: (UNAVAILABLE|DEADLINE_EXCEEDED): .*\n", captured.err)


async def test_console_script(server: Server) -> None:
    script = Path(sys.executable).parent / "coffer"
    assert script.exists(), script
    process = await asyncio.create_subprocess_exec(
        str(script),
        "health",
        "--target",
        f"127.0.0.1:{server.port}",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, err
    assert out.decode() == "SERVING\n"


async def test_module_runs_every_command_it_defines(cli: Cli, server: Server) -> None:
    """`python -m coffer.clients.cli`, a separate process: its commands reach the helpers
    defined after `main`."""
    await cli.ok("unit", "create", "EUR", "--kind", "currency", "--scale", "2", "--name", "Euro")
    wallet_id = await cli.wallet("ada")
    (credited,) = await cli.ok("credit", str(wallet_id), "700", "--reference", "inv-9")
    credit_id = number(r"transfer (\d+)  credit", credited)
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coffer.clients.cli",
        "--target",
        f"127.0.0.1:{server.port}",
        "history",
        str(wallet_id),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert (process.returncode, err.decode()) == (0, "")
    header, row = out.decode().splitlines()
    assert header == (
        "ID  TIME (UTC)           KIND    AMOUNT  UNIT  WALLET  BALANCE  REFERENCE  NOTE"
    )
    fields = row.split()
    assert fields[0] == str(credit_id)
    assert fields[3:] == ["credit", "+700", "EUR", "1", "700", "inv-9"]


async def test_events_and_alerts(cli: Cli) -> None:
    await cli.ok("unit", "create", "EUR", "--kind", "currency", "--scale", "2", "--name", "Euro")
    wallet_id = await cli.wallet("ada")
    lines = await cli.ok(
        "wallet", "alert", str(wallet_id), "--threshold", "100", "--top-up-to", "500"
    )
    assert lines[-1] == "alert     below 100, top up to 500"
    await cli.ok("credit", str(wallet_id), "150")
    await cli.ok("debit", str(wallet_id), "60")
    lines = await cli.ok("events", "--wallet", str(wallet_id))
    kinds = [line.split("  ")[2] for line in lines]
    assert kinds == [
        "wallet-created",
        "wallet-alert-set",
        "transfer",
        "transfer",
        "low-balance",
        "top-up-requested",
    ]
    assert lines[-1].endswith(f"request top-up:{wallet_id}:1")
    assert lines[0].split("  ")[3] == "cli"
    # From a line's cursor: what follows it; a limit says where to go on.
    after = lines[3].split("  ")[0]
    rest = await cli.ok("events", "--wallet", str(wallet_id), "--after", after)
    assert rest == lines[4:]
    limited = await cli.ok("events", "--limit", "2")
    assert len(limited) == 3 and limited[-1].startswith("(more: --after ")
    only = await cli.ok("events", "--type", "low-balance", "--owner", "ada")
    assert [line.split("  ")[2] for line in only] == ["low-balance"]
    listed = await cli.json("events", "--type", "unit-created")
    assert [event["type"] for event in listed["events"]] == ["EVENT_TYPE_UNIT_CREATED"]
    assert listed["caughtUp"] is True
    cleared = await cli.ok("wallet", "alert", str(wallet_id), "--clear")
    assert not [line for line in cleared if line.startswith("alert")]
    result = await cli("wallet", "alert", str(wallet_id))
    assert result.exit_code == 2 and "--threshold" in result.err
    result = await cli("events", "--after", "nonsense")
    assert result.exit_code == 1 and "after_cursor" in result.err


async def test_events_follow_prints_each_as_it_comes(cli: Cli, server: Server) -> None:
    await cli.ok("unit", "create", "EUR", "--kind", "currency", "--scale", "2", "--name", "Euro")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "coffer.clients.cli",
        "--target",
        f"127.0.0.1:{server.port}",
        "events",
        "--follow",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = await asyncio.wait_for(process.stdout.readline(), 30)
        assert b"unit-created" in first
        wallet_id = await cli.wallet("bo")
        second = await asyncio.wait_for(process.stdout.readline(), 30)
        assert b"wallet-created" in second and f"wallet {wallet_id}".encode() in second
    finally:
        process.terminate()
        await process.wait()


async def test_the_reports(cli: Cli) -> None:
    await cli.ok(
        "unit", "create", "seat", "--kind", "credit", "--scale", "0", "--name", "Seat",
        "--validity", "P30D",
    )  # fmt: skip
    await cli.ok("unit", "create", "EUR", "--kind", "currency", "--scale", "2", "--name", "Euro")
    created = await cli.json(
        "wallet", "create", "--owner", "ann", "--owner-kind", "customer", "--unit", "seat"
    )
    ann = int(created["wallet"]["id"])
    created = await cli.json(
        "wallet", "create", "--owner", "bob", "--owner-kind", "customer", "--unit", "seat"
    )
    bob = int(created["wallet"]["id"])
    credited = await cli.json("credit", str(ann), "10")
    credited_at = credited["transfer"]["createTime"]
    (line,) = await cli.ok(
        "debit", str(ann), "4", "--performed-by", "coach:bo", "--note", "team of 4",
        "--reference", "r-1",
    )  # fmt: skip
    debit_id = number(r"transfer (\d+)  debit  -4 seat  ", line)
    assert line.endswith("  balance 6")
    await cli.ok("credit", str(bob), "5")
    (line,) = await cli.ok("debit", str(bob), "1", "--performed-by", "ops")
    bob_debit = number(r"transfer (\d+)  debit", line)

    header, *rows = await cli.ok("usage")
    assert re.split(r"  +", header)[:3] == ["TIME (UTC)", "TRANSFER", "KIND"]
    assert [number(r"\S+ \S+ +(\d+)", row) for row in rows] == [bob_debit, debit_id]
    fields = re.split(r"  +", rows[1])
    assert fields[1:8] == [str(debit_id), "debit", str(ann), "4", "seat", "coach:bo", "team of 4"]
    assert re.fullmatch(r"grant \d+: 4 \(expires \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\)", fields[8])
    for options, expected in (
        (["--wallet", str(ann)], [debit_id]),
        (["--owner", "bob"], [bob_debit]),
        (["--performed-by", "coach:bo"], [debit_id]),
        (["--reference", "r-1"], [debit_id]),
        (["--unit", "EUR"], []),
        (["--since", credited_at, "--until", credited_at], []),
        (["--since", credited_at], [bob_debit, debit_id]),
    ):
        header, *rows = await cli.ok("usage", *options)
        assert [number(r"\S+ \S+ +(\d+)", row) for row in rows] == expected, options
    limited = await cli.ok("usage", "--limit", "1")
    assert len(limited) == 3 and limited[-1] == "(more than 1; raise --limit to see them)"
    listed = await cli.json("usage", "--owner", "ann")
    [entry] = listed["entries"]
    assert (entry["transfer"]["id"], entry["drawn"][0]["amount"]) == (str(debit_id), "4")

    header, *rows, total = await cli.ok("outstanding", "seat")
    assert header.split() == ["WALLET", "OWNER", "KIND", "POSTED", "AVAILABLE", "EXPIRING"]
    assert [row.split() for row in rows] == [
        [str(ann), "ann", "customer", "6", "6", "6"],
        [str(bob), "bob", "customer", "4", "4", "4"],
    ]
    assert re.fullmatch(
        r"total  2 wallets  outstanding 10 seat  expiring 10 seat by \S+ \S+", total
    )
    *_, total = await cli.ok("outstanding", "seat", "--within", "0")
    assert "expiring 0 seat" in total
    limited = await cli.ok("outstanding", "seat", "--limit", "1")
    assert limited[2] == "(more than 1; raise --limit to see them)"
    assert limited[3].startswith("total  2 wallets  outstanding 10 seat")
    listed = await cli.json("outstanding", "seat", "--limit", "1")
    assert listed["totals"] == {"wallets": "2", "outstanding": "10", "expiring": "10"}
    assert len(listed["wallets"]) == 1 and listed["nextPageToken"]
    refused = await cli("outstanding", "seat", "--within", "-1")
    assert refused.exit_code == 2

    (line,) = await cli.ok("balance", str(ann), "--at", credited_at)
    assert re.fullmatch(
        rf"wallet {ann}  seat  posted 10  pending 0  at \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d", line
    )
    shown = await cli.json("balance", str(ann), "--at", credited_at)
    assert (shown["posted"], shown["pending"], shown["time"]) == ("10", "0", credited_at)
    # A time to come is the future balance: the seats (valid 30 days) are gone by then.
    (line,) = await cli.ok("balance", str(ann), "--at", "2999-01-01T00:00:00Z")
    assert line.startswith(f"wallet {ann}  seat  posted 0  pending 0") and "at 2999-01-01" in line
    refused = await cli("balance", str(ann), "--at", "yesterday")
    assert refused.exit_code == 2

    header, *rows = await cli.ok("history", str(ann))
    assert header.split()[6:8] == ["WALLET", "BALANCE"]
    assert [row.split()[7] for row in rows] == ["6", "10"]
