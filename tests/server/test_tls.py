"""TLS end to end, with real certificates made here: the server over TLS and mTLS, the typed
client and the CLI over both, what a client that trusts the wrong authority or shows no
certificate gets, a running `coffer serve` reading its files again on SIGHUP, and the settings
refused before start."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from coffer.clients import Client, SyncClient, Tls, errors
from coffer.clients.cli import main
from coffer.server.app import Server
from coffer.server.settings import Settings, SettingsError

from support.certificates import Authority, Issued
from support.processes import run_beside

coffer = str(Path(sys.executable).parent / "coffer")
ready_timeout_s = 120
# A TLS call that cannot succeed fails fast: no retries, a short deadline.
refused_timeout_s = 5.0
# `coffer serve`'s workers, and connections enough to reach each (all 16 on one of two: one
# chance in 32,768).
workers = 2
connections = 16


@pytest.fixture
def authorities(tmp_path: Path) -> tuple[Authority, Authority]:
    """Two certificate authorities that know nothing of each other."""
    return Authority(tmp_path, "first"), Authority(tmp_path, "second")


@asynccontextmanager
async def tls_server(
    database_url: str, server_certificate: Issued, client_ca: Path | None = None
) -> AsyncIterator[Server]:
    running = await Server.start(
        Settings(
            database_url=database_url,
            listen="127.0.0.1:0",
            tls_cert=str(server_certificate.cert),
            tls_key=str(server_certificate.key),
            tls_client_ca=str(client_ca or ""),
        )
    )
    try:
        yield running
    finally:
        await running.stop()


async def health(target: str, tls: Tls | None, connections: int = 1) -> str:
    """The server's health over `connections` connections of its own, asked over each: the
    one answer they all gave; raises the client's typed error."""
    async with Client(
        target,
        tls=tls,
        retries_max=0,
        timeout_s=refused_timeout_s,
        # A connection of this client's own: another client's, made with other
        # certificates, is never shared.
        channel_options=[("grpc.use_local_subchannel_pool", 1)],
        connections=connections,
    ) as client:
        [answer] = {await client.health() for _ in range(connections)}
        return answer


async def test_tls_serves_clients_that_trust_its_authority(
    database_url: str, authorities: tuple[Authority, Authority]
) -> None:
    first, second = authorities
    async with tls_server(database_url, first.issue_server()) as server:
        assert server.tls is not None and not server.tls.client_certificates_required
        target = f"127.0.0.1:{server.port}"
        trusting = Tls.from_files(ca=first.cert)
        async with Client(target, tls=trusting, caller="shop") as client:
            assert await client.health() == "SERVING"
            unit = await client.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
            assert unit.code == "EUR"
        # The name in the certificate matches either way of naming the server.
        assert await health(f"localhost:{server.port}", trusting) == "SERVING"
        # A client presenting a certificate the server does not ask for is served too.
        with_certificate = first.issue_client()
        assert (
            await health(
                target,
                Tls.from_files(ca=first.cert, cert=with_certificate.cert, key=with_certificate.key),
            )
            == "SERVING"
        )
        with pytest.raises(errors.Unavailable):
            await health(target, None)
        with pytest.raises(errors.Unavailable):
            await health(target, Tls.from_files(ca=second.cert))


async def test_mtls_requires_a_client_certificate_from_its_authority(
    database_url: str, authorities: tuple[Authority, Authority]
) -> None:
    first, second = authorities
    ours, theirs = first.issue_client("shop"), second.issue_client("intruder")
    async with tls_server(database_url, first.issue_server(), client_ca=first.cert) as server:
        assert server.tls is not None and server.tls.client_certificates_required
        target = f"127.0.0.1:{server.port}"
        mutual = Tls.from_files(ca=first.cert, cert=ours.cert, key=ours.key)
        assert await health(target, mutual) == "SERVING"

        def blocking() -> list[str]:
            with SyncClient(target, tls=mutual, caller="shop") as client:
                client.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
                return [unit.code for unit in client.list_units()]

        # Beside the event loop, on which the server answers.
        assert await asyncio.to_thread(blocking) == ["EUR"]
        for refused in (
            Tls.from_files(ca=first.cert),
            Tls.from_files(ca=first.cert, cert=theirs.cert, key=theirs.key),
            None,
        ):
            with pytest.raises(errors.Unavailable):
                await health(target, refused)


async def test_reload_serves_new_connections_the_new_files(
    database_url: str, authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    first, second = authorities
    served = Issued(cert=tmp_path / "served.pem", key=tmp_path / "served-key.pem")
    replace(served, first.issue_server())
    async with tls_server(database_url, served) as server:
        assert server.tls is not None
        target = f"127.0.0.1:{server.port}"
        trusting_first, trusting_second = (
            Tls.from_files(ca=first.cert),
            Tls.from_files(ca=second.cert),
        )
        # A connection open before the reload keeps its certificate.
        async with Client(target, tls=trusting_first) as before:
            assert await before.health() == "SERVING"
            replace(served, second.issue_server())
            # Until reloaded, the files read at start are served.
            assert await health(target, trusting_first) == "SERVING"
            assert server.tls.reload()
            assert await health(target, trusting_second) == "SERVING"
            with pytest.raises(errors.Unavailable):
                await health(target, trusting_first)
            assert await before.health() == "SERVING"
        # A reload of broken files keeps what is served.
        served.key.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
        assert not server.tls.reload()
        assert await health(target, trusting_second) == "SERVING"


def replace(served: Issued, issued: Issued) -> None:
    """Puts `issued` where the server reads its files, each file replaced at once."""
    for source, destination in ((issued.cert, served.cert), (issued.key, served.key)):
        staged = destination.with_suffix(".new")
        shutil.copyfile(source, staged)
        staged.replace(destination)


async def test_coffer_serve_reloads_its_files_on_sighup(
    database_url: str, authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    """SIGHUP to `coffer serve` reaches each of its workers, and each reads the files again."""
    first, second = authorities
    served = Issued(cert=tmp_path / "served.pem", key=tmp_path / "served-key.pem")
    replace(served, first.issue_server())
    process = await asyncio.create_subprocess_exec(
        coffer,
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--workers",
        str(workers),
        "--tls-cert",
        str(served.cert),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # The key from the environment, as an operator's unit file would give it.
        env={**os.environ, "DATABASE_URL": database_url, "COFFER_TLS_KEY": str(served.key)},
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(ready_timeout_s):
            ready = await until_line(process, "serving on")
        assert " over TLS " in ready and "mTLS" not in ready, ready
        target = "127.0.0.1:" + ready.split("serving on 127.0.0.1:", 1)[1].split()[0]
        trusting_first, trusting_second = (
            Tls.from_files(ca=first.cert),
            Tls.from_files(ca=second.cert),
        )
        assert await health(target, trusting_first) == "SERVING"

        replace(served, second.issue_server())
        process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(30):
            said = [await until_line(process, "TLS") for _ in range(workers)]
        assert all("reloaded" in line for line in said), said
        assert {line.split("worker=")[1].strip() for line in said} == {"1", "2"}, said
        # New connections, to whichever worker, get the new certificate.
        assert await health(target, trusting_second, connections) == "SERVING"
        with pytest.raises(errors.Unavailable):
            await health(target, trusting_first)

        # Files that cannot be read: a warning, and the certificate in use stays.
        served.cert.unlink()
        process.send_signal(signal.SIGHUP)
        async with asyncio.timeout(30):
            said = [await until_line(process, "TLS") for _ in range(workers)]
        for line in said:
            assert "WARNING" in line and "keeping the certificates in use" in line, line
            assert "--tls-cert must be a readable file" in line, line
        assert await health(target, trusting_second, connections) == "SERVING"
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            rest = (await process.stdout.read()).decode()
            assert await process.wait() == 0, rest


async def until_line(process: asyncio.subprocess.Process, marker: str) -> str:
    """The first line of the process's output from now on that holds `marker`."""
    assert process.stdout is not None
    seen: list[str] = []
    while True:
        line = (await process.stdout.readline()).decode()
        assert line, f"coffer serve exited: {''.join(seen)}"
        seen.append(line)
        if marker in line:
            return line


async def test_the_cli_over_tls_and_mtls(
    database_url: str,
    authorities: tuple[Authority, Authority],
    capsys: pytest.CaptureFixture[str],
) -> None:
    first, second = authorities
    ours, theirs = first.issue_client(), second.issue_client()
    async with tls_server(database_url, first.issue_server(), client_ca=first.cert) as server:
        target = f"127.0.0.1:{server.port}"
        trust = ["--tls-ca", str(first.cert)]
        mutual = [*trust, "--tls-cert", str(ours.cert), "--tls-key", str(ours.key)]

        async def cli(*argv: str) -> tuple[int, str, str]:
            exit_code = await asyncio.to_thread(main, ["--target", target, *argv])
            captured = capsys.readouterr()
            return exit_code, captured.out, captured.err

        assert await cli(*mutual, "health") == (0, "SERVING\n", "")
        exit_code, out, err = await cli(
            *mutual, "unit", "create", "EUR", "--kind", "currency", "--name", "Euro", "--scale", "2"
        )
        assert (exit_code, err) == (0, ""), out
        # The options go after the command too.
        assert (await cli("health", *mutual))[0] == 0
        exit_code, _, err = await cli("--deadline", "3", *trust, "health")
        assert exit_code == 3 and "UNAVAILABLE" in err.upper(), err
        exit_code, _, err = await cli(
            "--deadline",
            "3",
            *trust,
            "--tls-cert",
            str(theirs.cert),
            "--tls-key",
            str(theirs.key),
            "health",
        )
        assert exit_code == 3, err
        # Bad options are usage errors, before any call.
        assert (await cli("--tls-ca", str(first.cert), "--tls-cert", str(ours.cert), "health"))[
            :2
        ] == (2, "")
        exit_code, _, err = await cli("--tls-ca", str(first.cert.with_name("none.pem")), "health")
        assert exit_code == 2 and "tls ca cannot be read" in err, err

        # The `coffer` program, its options from the environment.
        environment = {
            **os.environ,
            "COFFER_TARGET": target,
            "COFFER_TLS_CA": str(first.cert),
            "COFFER_TLS_CLIENT_CERT": str(ours.cert),
            "COFFER_TLS_CLIENT_KEY": str(ours.key),
        }
        assert await run_beside(coffer, "health", env=environment) == (0, "SERVING\n", "")


@pytest.fixture
def unreadable(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "unreadable.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    path.chmod(0)
    yield path
    path.chmod(0o600)


async def test_coffer_serve_refuses_tls_settings_that_cannot_work(
    authorities: tuple[Authority, Authority], tmp_path: Path
) -> None:
    first, second = authorities
    server = first.issue_server()
    other = second.issue_server()
    missing = str(tmp_path / "missing.pem")
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    cert, key, ca = str(server.cert), str(server.key), str(first.cert)
    cases = [
        (["--tls-cert", cert], "--tls-cert must come with --tls-key"),
        (["--tls-key", key], "--tls-key must come with --tls-cert"),
        (["--tls-client-ca", ca], "--tls-client-ca must come with --tls-cert and --tls-key"),
        (
            ["--tls-cert", missing, "--tls-key", key],
            "--tls-cert must be a readable file: No such file",
        ),
        (["--tls-cert", cert, "--tls-key", str(not_pem)], "--tls-key must be a PEM file"),
        (
            ["--tls-cert", cert, "--tls-key", str(other.key)],
            "--tls-cert must be a PEM certificate chain that",
        ),
        (["--tls-cert", key, "--tls-key", key], "--tls-cert must be a PEM certificate chain that"),
        (
            ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", str(not_pem)],
            "--tls-client-ca must be a PEM file",
        ),
        (
            ["--tls-cert", cert, "--tls-key", key, "--tls-client-ca", key],
            "--tls-client-ca must hold PEM certificates",
        ),
    ]
    for arguments, message in cases:
        exit_code, out, err = await run_beside(
            coffer,
            "serve",
            *arguments,
            # Checked before anything starts: no database is ever reached.
            env={**os.environ, "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"},
        )
        assert (exit_code, out) == (2, ""), (arguments, out, err)
        assert err.startswith(f"coffer serve: {message}"), (arguments, err)


def test_settings_refuse_unreadable_and_encrypted_files(
    authorities: tuple[Authority, Authority], unreadable: Path, tmp_path: Path
) -> None:
    first, _ = authorities
    server = first.issue_server()
    if os.geteuid() != 0:
        # Root reads any file.
        with pytest.raises(
            SettingsError, match="tls_cert must be a readable file: Permission denied"
        ):
            Settings(database_url="", tls_cert=str(unreadable), tls_key=str(server.key))
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(encrypted_key())
    with pytest.raises(SettingsError, match="tls_key must be unencrypted"):
        Settings(database_url="", tls_cert=str(server.cert), tls_key=str(encrypted))
    assert Settings(database_url="").tls_files is None


def encrypted_key() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


def test_client_tls_options_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cert and key go together"):
        Tls(cert=b"-----BEGIN CERTIFICATE-----\n")
    with pytest.raises(ValueError, match="tls ca must be PEM bytes"):
        Tls(ca=b"not a certificate")
    with pytest.raises(ValueError, match="tls ca cannot be read: No such file"):
        Tls.from_files(ca=tmp_path / "none.pem")
    with pytest.raises(ValueError, match="tls or credentials, not both"):
        Client(tls=Tls(), credentials=grpc.ssl_channel_credentials())
