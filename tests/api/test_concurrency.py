"""Many clients at once, through two servers on one database: the books still balance.

32 clients send random transfers, debits (both modes), holds with captures or releases, and
voids among 10 wallets — several thousand operations — half of them through each of two
servers (two batchers, two connection pools: as two server processes would). Afterwards
every unit sums to zero, every wallet's posted balance equals the sum of its transfers, its
pending balance the sum of its open holds, no wallet is below its minimum, and no client saw
anything but the domain's own refusals (no deadlock, no INTERNAL, no UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

import grpc

from coffer.server.app import Server, Settings
from coffer.v1 import (
    holds_pb2,
    holds_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    types_pb2,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)

from support.books import assert_books_balance

clients = 32
operations_per_client = 120
wallet_count = 10
refusals = {
    "INSUFFICIENT_FUNDS",
    "ALREADY_VOIDED",
    "CAPTURE_EXCEEDS_HOLD",
    "HOLD_NOT_PENDING",
    "HOLD_EXPIRED",
}


async def test_concurrent_clients_keep_the_books(
    database_url: str, open_channel: Callable[[str], grpc.aio.Channel]
) -> None:
    servers = [
        await Server.start(Settings(database_url=database_url, listen="127.0.0.1:0", pool_size=4))
        for _ in range(2)
    ]
    channels = [open_channel(f"127.0.0.1:{server.port}") for server in servers]
    try:
        wallet_ids = await _setup(channels[0])
        outcomes: Counter[str] = Counter()
        await asyncio.gather(
            *(
                _client(number, channels[number % 2], wallet_ids, outcomes)
                for number in range(clients)
            )
        )
    finally:
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop()

    unexpected = set(outcomes) - refusals - {"OK"}
    assert not unexpected, outcomes
    assert outcomes["OK"] > clients * operations_per_client // 2, outcomes
    await assert_books_balance(database_url)


async def _setup(channel: grpc.aio.Channel) -> list[int]:
    units = units_pb2_grpc.UnitServiceStub(channel)
    wallets = wallets_pb2_grpc.WalletServiceStub(channel)
    transfers = transfers_pb2_grpc.TransferServiceStub(channel)
    await units.CreateUnit(
        units_pb2.CreateUnitRequest(code="EUR", kind=types_pb2.UNIT_KIND_CURRENCY, name="Euro")
    )
    ids = []
    for number in range(wallet_count):
        created = await wallets.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key=f"wallet-{number}",
                owner_id=f"owner-{number}",
                owner_kind=types_pb2.OWNER_KIND_CUSTOMER,
                unit="EUR",
                # Some wallets may overdraw.
                balance_minimum=-500 if number % 3 == 0 else 0,
            )
        )
        ids.append(created.wallet.id)
        await transfers.Credit(
            transfers_pb2.CreditRequest(
                idempotency_key=f"seed-{number}", wallet_id=created.wallet.id, amount=10_000
            )
        )
    return ids


async def _client(
    number: int, channel: grpc.aio.Channel, wallet_ids: list[int], outcomes: Counter[str]
) -> None:
    randomness = random.Random(number)
    transfers = transfers_pb2_grpc.TransferServiceStub(channel)
    holds = holds_pb2_grpc.HoldServiceStub(channel)
    mine: list[int] = []
    open_holds: list[int] = []
    for step in range(operations_per_client):
        key = f"client-{number}-{step}"
        wallet = randomness.choice(wallet_ids)
        other = randomness.choice([each for each in wallet_ids if each != wallet])
        amount = randomness.randint(1, 3_000)
        choice = randomness.random()
        try:
            if choice < 0.35:
                response = await transfers.Transfer(
                    transfers_pb2.TransferRequest(
                        idempotency_key=key,
                        source_wallet_id=wallet,
                        target_wallet_id=other,
                        amount=amount,
                    )
                )
                mine.append(response.transfer.id)
            elif choice < 0.5:
                mode = randomness.choice(
                    [types_pb2.DEBIT_MODE_ALL_OR_NOTHING, types_pb2.DEBIT_MODE_UP_TO]
                )
                response = await transfers.Debit(
                    transfers_pb2.DebitRequest(
                        idempotency_key=key, wallet_id=wallet, amount=amount, mode=mode
                    )
                )
                mine.append(response.transfer.id)
            elif choice < 0.6:
                response = await transfers.Credit(
                    transfers_pb2.CreditRequest(
                        idempotency_key=key, wallet_id=wallet, amount=amount
                    )
                )
                mine.append(response.transfer.id)
            elif choice < 0.75:
                placed = await holds.PlaceHold(
                    holds_pb2.PlaceHoldRequest(
                        idempotency_key=key, wallet_id=wallet, target_wallet_id=other, amount=amount
                    )
                )
                open_holds.append(placed.hold.id)
            elif choice < 0.88 and open_holds:
                hold_id = open_holds.pop(randomness.randrange(len(open_holds)))
                if randomness.random() < 0.6:
                    captured = await holds.CaptureHold(
                        holds_pb2.CaptureHoldRequest(
                            idempotency_key=key, hold_id=hold_id, amount=randomness.randint(1, 1000)
                        )
                        if randomness.random() < 0.5
                        else holds_pb2.CaptureHoldRequest(idempotency_key=key, hold_id=hold_id)
                    )
                    mine.append(captured.transfer.id)
                else:
                    await holds.ReleaseHold(
                        holds_pb2.ReleaseHoldRequest(idempotency_key=key, hold_id=hold_id)
                    )
            elif mine:
                # Voids, sometimes of the same transfer twice.
                target = randomness.choice(mine)
                await transfers.Void(
                    transfers_pb2.VoidRequest(idempotency_key=key, transfer_id=target)
                )
            else:
                continue
            outcomes["OK"] += 1
        except grpc.aio.AioRpcError as error:
            outcomes[_reason(error)] += 1


def _reason(error: grpc.aio.AioRpcError) -> str:
    from google.rpc import error_details_pb2, status_pb2

    for name, value in error.trailing_metadata() or ():
        if name == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    return info.reason
    return f"{error.code().name}: {error.details()}"
