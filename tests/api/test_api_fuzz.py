"""Odd input of every kind, at random (seeded), to the real server: refused with the right
kind of error, never INTERNAL. Field values through the stubs, and raw bytes to every RPC
(random, or valid encodings cut, flipped, spliced, overlong): never INTERNAL or UNKNOWN."""

from __future__ import annotations

import asyncio
import os
import random
import string
import time
from collections import Counter
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coffer.server.app import Server, services_described
from coffer.v1 import (
    holds_pb2,
    holds_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)

from support.api import raw_call

# COFFER_FUZZ_SCALE=N runs N times as many calls (the suite runs 1).
scale = int(os.environ.get("COFFER_FUZZ_SCALE", "1"))
calls = 600 * scale
R = random.Random(7)  # seeded: the same calls every run
# How soon the server ends a stream the client cancelled (it notices at its next read).
cancelled_streams_end_within_s = 5.0


def number() -> int:
    return R.choice([0, 1, -1, 2**63 - 1, -(2**63), R.randint(-(10**6), 10**6), 3, 4, 5, 6])


def text() -> str:
    return R.choice(
        [
            "",
            "a",
            "x" * 2000,
            "\x00",
            "é",
            "EUR",
            "seat",
            "".join(R.choice(string.printable) for _ in range(R.randint(0, 40))),
        ]
    )


def metadata() -> dict[str, str]:
    return R.choice([{}, {"k": "v"}, {text() or "k": text()}, {f"k{n}": "v" for n in range(20)}])


async def test_odd_input_never_reaches_internal(channel: grpc.aio.Channel) -> None:
    ch = channel
    u, w, t, h = (
        units_pb2_grpc.UnitServiceStub(ch),
        wallets_pb2_grpc.WalletServiceStub(ch),
        transfers_pb2_grpc.TransferServiceStub(ch),
        holds_pb2_grpc.HoldServiceStub(ch),
    )
    await u.CreateUnit(units_pb2.CreateUnitRequest(code="EUR", kind=1, name="Euro", scale=2))
    unexpected: list[str] = []
    for _ in range(calls):
        k = R.randrange(16)
        try:
            if k == 0:
                await u.CreateUnit(
                    units_pb2.CreateUnitRequest(
                        code=text(),
                        kind=R.randint(0, 3),
                        name=text(),
                        plural=text(),
                        description=text(),
                        scale=R.choice([0, 2, 18, 19, 2**32 - 1]),
                    )
                )
            elif k == 1:
                await w.CreateWallet(
                    wallets_pb2.CreateWalletRequest(
                        idempotency_key=text(),
                        owner_id=text(),
                        owner_kind=R.randint(0, 4),
                        unit=text(),
                        balance_minimum=number(),
                        metadata=metadata(),
                    )
                )
            elif k == 2:
                await w.ListWallets(
                    wallets_pb2.ListWalletsRequest(
                        owner_id=text(),
                        owner_kind=R.randint(0, 5),
                        unit=text(),
                        page_size=R.choice([0, -1, 5, 1001, 2**31 - 1]),
                        page_token=text(),
                    )
                )
            elif k == 3:
                await t.Credit(
                    transfers_pb2.CreditRequest(
                        idempotency_key=text(),
                        wallet_id=number(),
                        amount=number(),
                        note=text(),
                        reference=text(),
                        performed_by=text(),
                        metadata=metadata(),
                    )
                )
            elif k == 4:
                await t.Debit(
                    transfers_pb2.DebitRequest(
                        idempotency_key=text(),
                        wallet_id=number(),
                        amount=number(),
                        mode=R.randint(0, 4),
                    )
                )
            elif k == 5:
                await t.Transfer(
                    transfers_pb2.TransferRequest(
                        idempotency_key=text(),
                        source_wallet_id=number(),
                        target_wallet_id=number(),
                        amount=number(),
                    )
                )
            elif k == 6:
                await t.Void(
                    transfers_pb2.VoidRequest(idempotency_key=text(), transfer_id=number())
                )
            elif k == 7:
                await t.ListTransfers(
                    transfers_pb2.ListTransfersRequest(
                        wallet_id=number(),
                        kinds=[R.randint(-1, 12)],
                        reference=text(),
                        page_size=R.choice([0, 5, -5, 5000]),
                        page_token=text(),
                        start_time=Timestamp(seconds=number() % 2**40, nanos=R.choice([0, 5])),
                    )
                )
            elif k == 8:
                await h.PlaceHold(
                    holds_pb2.PlaceHoldRequest(
                        idempotency_key=text(),
                        wallet_id=number(),
                        target_wallet_id=number(),
                        amount=number(),
                        timeout=Duration(seconds=number(), nanos=R.choice([0, 1, -1])),
                    )
                )
            elif k == 9:
                await h.CaptureHold(
                    holds_pb2.CaptureHoldRequest(
                        idempotency_key=text(), hold_id=number(), amount=number()
                    )
                )
            elif k == 10:
                await h.ReleaseHold(
                    holds_pb2.ReleaseHoldRequest(idempotency_key=text(), hold_id=number())
                )
            elif k == 11:
                await h.GetHold(holds_pb2.GetHoldRequest(hold_id=number()))
            elif k == 12:
                await t.GetTransfer(transfers_pb2.GetTransferRequest(transfer_id=number()))
            elif k == 13:
                await w.GetBalance(wallets_pb2.GetBalanceRequest(wallet_id=number()))
            elif k == 14:
                await t.SubmitBatch(
                    transfers_pb2.SubmitBatchRequest(
                        operations=[
                            transfers_pb2.Operation(
                                deposit=transfers_pb2.DepositRequest(
                                    idempotency_key=text(),
                                    wallet_id=number(),
                                    amount=number(),
                                    funding_source=text(),
                                ),
                                linked=R.random() < 0.3,
                            )
                            for _ in range(R.randint(0, 5))
                        ]
                    )
                )
            elif k == 15:
                await w.CancelWallet(wallets_pb2.CancelWalletRequest(wallet_id=number()))
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                unexpected.append(f"{k}: {e.details()}")
    print(f"\nfuzz of field values: {calls} calls, INTERNAL or UNKNOWN: {len(unexpected)}")
    assert unexpected == []


raw_calls_per_rpc = 30 * scale


def filled(message_class: Any) -> bytes:
    """An encoded request with every scalar field set at random."""
    message = message_class()
    for field in message_class.DESCRIPTOR.fields:
        if field.is_repeated or field.type == FieldDescriptor.TYPE_MESSAGE:
            continue
        if field.type == FieldDescriptor.TYPE_STRING:
            setattr(message, field.name, text()[:200])
        elif field.type == FieldDescriptor.TYPE_BOOL:
            setattr(message, field.name, R.random() < 0.5)
        elif field.type == FieldDescriptor.TYPE_ENUM:
            setattr(message, field.name, R.randint(0, 3))
        elif field.type in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64):
            setattr(message, field.name, number())
        elif field.type == FieldDescriptor.TYPE_UINT64:
            setattr(message, field.name, abs(number()))
        elif field.type == FieldDescriptor.TYPE_UINT32:
            setattr(message, field.name, number() % 2**32)
        else:
            setattr(message, field.name, number() % 2**32 - 2**31)
    return bytes(message.SerializeToString())


def mangled(valid: bytes) -> bytes:
    """Random bytes, or a valid encoding cut, flipped, spliced or overlong."""
    choice = R.randrange(6)
    if choice == 0 or not valid:
        return bytes(R.randrange(256) for _ in range(R.randint(0, 40)))
    if choice == 1:
        return valid[: R.randrange(len(valid))]
    if choice == 2:
        position = R.randrange(len(valid))
        return valid[:position] + bytes([R.randrange(256)]) + valid[position + 1 :]
    if choice == 3:
        position = R.randrange(len(valid) + 1)
        return valid[:position] + b"\xff" * R.randint(1, 12) + valid[position:]
    if choice == 4:
        return valid + bytes([R.randint(1, 15) << 3 | R.randrange(6)]) + b"\x80" * 11
    return valid + b"\x0a\x03\xc3\x28\xa0"  # field 1 as 3 bytes of invalid UTF-8


async def test_raw_bytes_never_reach_internal(server: Server, channel: grpc.aio.Channel) -> None:
    await units_pb2_grpc.UnitServiceStub(channel).CreateUnit(
        units_pb2.CreateUnitRequest(code="EUR", kind=1, name="Euro", scale=2)
    )
    codes: Counter[str] = Counter()
    unexpected: list[str] = []
    methods = sum(len(service.methods) for service in services_described)
    for service in services_described:
        for method in service.methods:
            call = raw_call(channel, method)
            message_class = message_factory.GetMessageClass(method.input_type)
            for _ in range(raw_calls_per_rpc):
                data = mangled(filled(message_class))
                try:
                    await call(data, timeout=10)
                    codes["OK"] += 1
                except grpc.aio.AioRpcError as e:
                    codes[e.code().name] += 1
                    if e.code() in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
                        unexpected.append(f"{method.full_name} {data!r}: {e.details()}")
    print(f"\nfuzz of raw bytes: {sum(codes.values())} calls to {methods} RPCs, {dict(codes)}")
    assert unexpected == []
    assert sum(codes.values()) == methods * raw_calls_per_rpc
    assert codes["INVALID_ARGUMENT"] > 0 and codes["OK"] > 0, codes
    # Healthy after, and every call's request bytes given back.
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    # A stream the fuzz cancelled ends on the server once it sees the cancellation.
    deadline = time.monotonic() + cancelled_streams_end_within_s
    while server.admission.calls and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert (server.admission.calls, server.admission.bytes) == (0, 0)
