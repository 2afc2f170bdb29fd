"""The server's logs: the text and JSON formats, and the line each refused or failed batch call
gets, read from a real `coffer serve` — which never logs a secret a call carries, in its
metadata or in its request, however the call ends."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from coffer.core.access import Access
from coffer.core.model import Role
from coffer.core.store.connections import create_pool
from coffer.server.logs import JsonFormatter, TextFormatter, request_id_metadata_key
from coffer.v1 import (
    transfers_pb2,
    transfers_pb2_grpc,
    types_pb2,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)

from support.database import refuse_unexpected_amount, unexpected_amount
from support.metrics import scrape
from support.processes import one_process_with_metrics, serve_beside

coffer = Path(sys.executable).parent / "coffer"


def record(message: str, *arguments: Any, **extra: Any) -> logging.LogRecord:
    made = logging.LogRecord("coffer.test", logging.INFO, __file__, 1, message, arguments, None)
    for name, each in extra.items():
        setattr(made, name, each)
    return made


def test_json_lines_carry_the_record_and_its_fields() -> None:
    line = JsonFormatter().format(
        record(
            "%d of %d\nrefused",
            1,
            2,
            fields={"principal": "shop", "reasons": {"INSUFFICIENT_FUNDS": 1}, "level": "no"},
        )
    )
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "1 of 2\nrefused"
    assert entry["logger"] == "coffer.test"
    # The record's own keys win over a field of the same name.
    assert entry["level"] == "INFO"
    assert entry["principal"] == "shop" and entry["reasons"] == {"INSUFFICIENT_FUNDS": 1}
    assert entry["time"].endswith("+00:00")
    try:
        raise ValueError("boom")
    except ValueError:
        failed = record("failed")
        failed.exc_info = sys.exc_info()
    entry = json.loads(JsonFormatter().format(failed))
    assert "ValueError: boom" in entry["exception"]


def test_text_lines_end_with_the_fields() -> None:
    line = TextFormatter().format(
        record("refused", fields={"principal": "a shop", "request_id": "r-1", "reasons": {"X": 1}})
    )
    assert line.endswith(' coffer.test: refused principal="a shop" request_id=r-1 reasons={"X":1}')


def test_a_workers_records_say_which_worker_wrote_them() -> None:
    """In a worker of `coffer serve --workers N`, every record carries its number, before the
    record's own fields."""
    fields = {"worker": 2}
    line = TextFormatter(fields).format(record("refused", fields={"request_id": "r-1"}))
    assert line.endswith(" coffer.test: refused worker=2 request_id=r-1")
    assert TextFormatter(fields).format(record("started")).endswith(" started worker=2")
    entry = json.loads(JsonFormatter(process_fields=fields).format(record("started")))
    assert entry["worker"] == 2 and entry["message"] == "started"


async def test_the_log_never_holds_a_secret_of_a_call(database_url: str) -> None:
    """Calls carry a secret in `authorization` and other metadata, in notes, metadata, keys,
    a caller and a request id too long to use; some are answered, some refused, some
    malformed, one fails as a whole. The JSON log (at DEBUG) and the metrics never hold it;
    the lines of the refused and failed batch calls parse and carry their fields."""
    serving = await serve_beside(
        coffer,
        *one_process_with_metrics,
        "--log-format",
        "json",
        "--log-level",
        "debug",
        env={**os.environ, "DATABASE_URL": database_url},
    )
    try:
        metrics_port, target = serving.metrics_port, serving.target
        # The secret is a real API key, made as `coffer keys create` makes one.
        pool = await create_pool(database_url, size_max=1)
        try:
            secret, _ = await Access(pool).create_key(
                name="shop", role=Role.admin, created_by="tests", actor="tests"
            )
        finally:
            await pool.close()
        sent = (
            ("authorization", f"Bearer {secret}"),
            ("x-api-key", secret),
            ("coffer-caller", "shop"),
        )
        made_ids = await calls_carrying(target, secret, sent, database_url)
        metrics = await scrape(metrics_port)
    finally:
        printed, log = await serving.stop()
    assert secret not in "".join(serving.printed) + printed + log
    assert not any(secret in name or secret in str(labels) for name, labels in metrics)
    entries = [json.loads(line) for line in log.splitlines()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
    lines = [entry for entry in entries if entry["logger"] == "coffer.server.logs"]
    refused = [entry for entry in lines if entry["event"] == "batch_refused"]
    assert [(entry["request_id"], entry["principal"], entry["level"]) for entry in refused] == [
        ("order-42", "shop", "INFO"),
        (made_ids[0], "shop", "INFO"),
        (made_ids[1], "shop", "INFO"),
    ]
    assert refused[0]["operations"] == 2 and refused[0]["applied"] == 1
    assert refused[0]["refused"] == 1 and refused[0]["reasons"] == {"INSUFFICIENT_FUNDS": 1}
    assert refused[2]["reasons"] == {"INVALID_ARGUMENT": 1}
    failed = [entry for entry in lines if entry["event"] == "batch_failed"]
    assert [(each["reason"], each["principal"], each["level"]) for each in failed] == [
        # Refused before the handler (the key, the caller): no batch line; the empty batch.
        ("INVALID_ARGUMENT", "shop", "INFO"),
        ("INTERNAL", "shop", "WARNING"),
    ]
    assert all(len(each["request_id"]) == 32 for each in failed)
    # The INTERNAL batch's traceback is logged, without the failing row PostgreSQL quoted.
    [internal] = [entry for entry in entries if "exception" in entry]
    assert "CheckViolationError" in internal["exception"]
    assert "its detail left out of the log" in internal["exception"]
    # The malformed requests are logged, without their bytes.
    assert sum("a malformed" in entry["message"] for entry in entries) == 2


async def calls_carrying(
    target: str, secret: str, sent: tuple[tuple[str, str], ...], database_url: str
) -> list[str]:
    """Makes the calls; returns the request ids the server made for the batch calls whose
    operations it refused without one given (in order)."""
    made_ids = []
    async with grpc.aio.insecure_channel(target) as channel:
        units = units_pb2_grpc.UnitServiceStub(channel)
        wallets = wallets_pb2_grpc.WalletServiceStub(channel)
        transfers = transfers_pb2_grpc.TransferServiceStub(channel)
        await units.CreateUnit(
            units_pb2.CreateUnitRequest(
                code="EUR", kind=types_pb2.UNIT_KIND_CURRENCY, name="Euro", scale=2
            ),
            metadata=sent,
        )
        created = []
        for number in range(2):
            response = await wallets.CreateWallet(
                wallets_pb2.CreateWalletRequest(
                    idempotency_key=f"{secret}-wallet-{number}",
                    owner_id="owner",
                    owner_kind=types_pb2.OWNER_KIND_CUSTOMER,
                    unit="EUR",
                    metadata={"token": secret},
                ),
                metadata=sent,
            )
            created.append(response.wallet.id)
        funded, empty = created
        await transfers.Credit(
            transfers_pb2.CreditRequest(
                idempotency_key=f"{secret}-credit",
                wallet_id=funded,
                amount=100,
                note=secret,
                metadata={"token": secret},
            ),
            metadata=sent,
        )

        def transfer(number: int, source: int, target: int, **fields: Any) -> Any:
            """10 from `funded`, far more than it holds from `empty`."""
            return transfers_pb2.Operation(
                transfer=transfers_pb2.TransferRequest(
                    idempotency_key=f"{secret}-{number}",
                    source_wallet_id=source,
                    target_wallet_id=target,
                    amount=10 if source == funded else 10**6,
                    note=secret,
                    **fields,
                )
            )

        # Refused operations: with a request id given, without (twice), one bad input.
        refusing = transfers_pb2.SubmitBatchRequest(
            operations=[transfer(1, funded, empty), transfer(2, empty, funded)]
        )
        await transfers.SubmitBatch(
            refusing, metadata=(*sent, (request_id_metadata_key, "order-42"))
        )
        call = transfers.SubmitBatch(
            transfers_pb2.SubmitBatchRequest(operations=[transfer(3, empty, funded)]),
            metadata=(*sent, (request_id_metadata_key, secret * 10)),
        )
        await call
        made_ids.append(dict(await call.initial_metadata())[request_id_metadata_key])
        call = transfers.SubmitBatch(
            transfers_pb2.SubmitBatchRequest(
                operations=[transfer(4, funded, empty, metadata={secret: "x" * 1000})]
            ),
            metadata=sent,
        )
        await call
        made_ids.append(dict(await call.initial_metadata())[request_id_metadata_key])

        # Batch calls refused whole: a key one character off, a caller refused, no operation.
        refusals = (
            (
                (("authorization", f"Bearer {secret[:-1]}x"), *sent[1:]),
                refusing,
                grpc.StatusCode.UNAUTHENTICATED,
            ),
            (
                (*sent[:2], ("coffer-caller", "@" + secret)),
                refusing,
                grpc.StatusCode.INVALID_ARGUMENT,
            ),
            (sent, transfers_pb2.SubmitBatchRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        )
        for metadata, request, code in refusals:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await transfers.SubmitBatch(request, metadata=metadata)
            assert raised.value.code() == code
        # Bytes that are no request, holding the secret.
        for method in ("Credit", "SubmitBatch"):
            raw = channel.unary_unary(f"/coffer.v1.TransferService/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await raw(b"\x0a\xff\xff" + secret.encode(), metadata=sent)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A refused single call, and a read of nothing.
        with pytest.raises(grpc.aio.AioRpcError):
            await transfers.Debit(
                transfers_pb2.DebitRequest(
                    idempotency_key=f"{secret}-debit", wallet_id=empty, amount=10**6, note=secret
                ),
                metadata=sent,
            )
        with pytest.raises(grpc.aio.AioRpcError):
            await wallets.GetWallet(wallets_pb2.GetWalletRequest(wallet_id=10**9), metadata=sent)
        # A batch the database fails as a whole, with an error nothing maps: INTERNAL, its
        # traceback in the log.
        await refuse_unexpected_amount(database_url)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await transfers.SubmitBatch(
                transfers_pb2.SubmitBatchRequest(
                    operations=[
                        transfers_pb2.Operation(
                            credit=transfers_pb2.CreditRequest(
                                idempotency_key=f"{secret}-internal",
                                wallet_id=funded,
                                amount=unexpected_amount,
                                note=secret,
                                reference=secret[:64],
                                metadata={"token": secret},
                            )
                        )
                    ]
                ),
                metadata=sent,
            )
        assert raised.value.code() == grpc.StatusCode.INTERNAL
    return made_ids
