"""`coffer keys` and `coffer certificates`: against the database itself (the server's
commands: how the first administrator's key is made) and through the AccessService with an
API key (the client's), end to end with a real server. `main` blocks: it runs beside the
event loop the server answers on."""

from __future__ import annotations

import asyncio
import re

import pytest

from coffer.clients import Client, errors
from coffer.clients.cli import main
from coffer.server.app import Server

key_pattern = re.compile(r"coffer_[0-9]+_[A-Za-z0-9_-]{43}")


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], str]:
    exit_code = await asyncio.to_thread(main, list(argv))
    captured = capsys.readouterr()
    return exit_code, captured.out.splitlines(), captured.err


async def test_keys_against_the_database_then_through_the_server(
    server: Server, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{server.port}"
    database = ("--database-url", database_url)
    # The first administrator's key, made in the database itself.
    code, out, err = await run(
        capsys, "keys", "create", "--role", "admin", "--name", "ops", *database
    )
    assert code == 0, err
    assert key_pattern.fullmatch(out[0]), out
    admin_key = out[0]
    assert out[1].split() == ["ID", "ROLE", "NAME", "OWNER", "CREATED", "EXPIRES", "REVOKED"]
    assert out[2].split()[:4] == ["1", "admin", "ops", "-"]
    code, out, _ = await run(capsys, "keys", "list", *database)
    assert code == 0 and [line.split()[:3] for line in out[1:]] == [["1", "admin", "ops"]]
    # No credential given: the server is no longer open.
    code, _, err = await run(capsys, "--target", target, "unit", "list")
    assert (code, err.split(":")[:2]) == (1, ["error", " CREDENTIALS_MISSING"])

    # Through the server, with the key.
    via = ("--target", target, "--api-key", admin_key)
    code, out, err = await run(
        capsys, *via, "keys", "create", "--role", "merchant", "--name", "pos", "--owner", "shop"
    )
    assert code == 0, err
    merchant_key = out[0]
    assert key_pattern.fullmatch(merchant_key)
    assert out[2].split()[:4] == ["2", "merchant", "pos", "shop"]
    code, out, _ = await run(capsys, *via, "keys", "list")
    assert [line.split()[:3] for line in out[1:]] == [
        ["1", "admin", "ops"],
        ["2", "merchant", "pos"],
    ]
    code, out, _ = await run(capsys, *via, "--json", "keys", "list")
    assert code == 0 and '"name": "pos"' in "\n".join(out)
    assert admin_key not in "\n".join(out) and merchant_key not in "\n".join(out)
    # The merchant's key works, and may not make keys.
    async with Client(target, api_key=merchant_key, retries_max=0) as merchant:
        assert (await merchant.list_wallets()).items == []
    code, _, err = await run(capsys, "--target", target, "--api-key", merchant_key, "keys", "list")
    assert code == 1 and "PERMISSION_DENIED" in err and "merchant" in err
    code, out, _ = await run(capsys, *via, "keys", "revoke", "2")
    assert code == 0 and out[1].split()[:3] == ["2", "merchant", "pos"] and len(out[1].split()) == 9
    async with Client(target, api_key=merchant_key, retries_max=0) as merchant:
        with pytest.raises(errors.CredentialsRevoked):
            await merchant.list_wallets()
    # Bad usage, and refusals, of both.
    code, _, err = await run(
        capsys, "keys", "create", "--role", "customer", "--name", "app", *database
    )
    assert code == 1 and "owner_id" in err
    code, _, err = await run(capsys, *via, "keys", "revoke", "99")
    assert code == 1 and "API_KEY_NOT_FOUND" in err
    code, _, _ = await run(capsys, *via, "keys", "create", "--role", "nobody", "--name", "x")
    assert code == 2


async def test_certificate_mappings_against_the_database_and_through_the_server(
    server: Server, database_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    database = ("--database-url", database_url)
    code, out, err = await run(
        capsys,
        "certificates",
        "map",
        "pos-7",
        "--role",
        "merchant",
        "--name",
        "shop-pos",
        "--owner",
        "shop",
        *database,
    )
    assert code == 0, err
    assert out[1].split()[:4] == ["pos-7", "merchant", "shop-pos", "shop"]
    code, out, _ = await run(
        capsys, "keys", "create", "--role", "admin", "--name", "ops", *database
    )
    via = ("--target", f"127.0.0.1:{server.port}", "--api-key", out[0])
    code, out, _ = await run(capsys, *via, "certificates", "list")
    assert [line.split()[:3] for line in out[1:]] == [["pos-7", "merchant", "shop-pos"]]
    code, out, _ = await run(
        capsys, *via, "certificates", "map", "till-1", "--role", "service", "--name", "till"
    )
    assert code == 0 and out[1].split()[:3] == ["till-1", "service", "till"]
    code, out, _ = await run(capsys, *via, "certificates", "unmap", "pos-7")
    assert code == 0
    code, out, _ = await run(capsys, "certificates", "list", *database)
    assert [line.split()[:3] for line in out[1:]] == [["till-1", "service", "till"]]
    code, _, err = await run(capsys, "certificates", "unmap", "pos-7", *database)
    assert code == 1 and "CERTIFICATE_MAPPING_NOT_FOUND" in err
