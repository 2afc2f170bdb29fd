"""Amounts that describe themselves: every answer carrying a Balance, a Transfer or a Hold says
the unit's code and scale, for a unit of scale 2, one of scale 0 and one of scale 18, in
first answers and in replays, also from a server that has not read the unit since it started
(its cache of scales empty)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from coffer.clients import format_amount
from coffer.server.app import Server, Settings
from coffer.v1 import holds_pb2, transfers_pb2, types_pb2, units_pb2, wallets_pb2

from support.api import Api, key


class Case(NamedTuple):
    unit: str
    kind: int
    scale: int
    amount: int
    shown: str


# An amount of each unit, and how format_amount shows it.
cases = [
    Case("EUR", types_pb2.UNIT_KIND_CURRENCY, 2, 2599, "25.99 EUR"),
    Case("seat", types_pb2.UNIT_KIND_CREDIT, 0, 3, "3 seat"),
    Case(
        "wei", types_pb2.UNIT_KIND_CREDIT, 18, 1_500_000_000_000_000_000, "1.5" + "0" * 17 + " wei"
    ),
]
scale_of = {case.unit: case.scale for case in cases}


def says_its_unit(message: Any, unit: str) -> None:
    """A Transfer, Hold or Balance names `unit` and carries its scale."""
    assert message.unit == unit, message
    assert message.unit_scale == scale_of[unit], message


async def create_units(api: Api) -> None:
    for case in cases:
        await api.units.CreateUnit(
            units_pb2.CreateUnitRequest(
                code=case.unit, kind=case.kind, name=case.unit, scale=case.scale
            )
        )


async def twice(method: Any, request: Any) -> Any:
    """Calls `method` with `request`, then again with the same key: the second is a replay,
    and answers alike, scales included. Returns the first answer."""
    first = await method(request)
    call = method(request)
    again = await call
    assert ("coffer-replayed", "true") in tuple(await call.trailing_metadata())
    assert again == first
    return first


@pytest.fixture
async def api(channel: grpc.aio.Channel) -> Api:
    api = Api(channel)
    await create_units(api)
    return api


@pytest.mark.parametrize("case", cases, ids=[case.unit for case in cases])
async def test_wallets_and_balances(api: Api, case: Case) -> None:
    created = await twice(
        api.wallets.CreateWallet,
        wallets_pb2.CreateWalletRequest(
            idempotency_key=key(),
            owner_id=f"owner-{case.unit}",
            owner_kind=types_pb2.OWNER_KIND_CUSTOMER,
            unit=case.unit,
        ),
    )
    says_its_unit(created.wallet.balance, case.unit)
    wallet_id = created.wallet.id
    await api.transfers.Credit(
        transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet_id, amount=case.amount)
    )
    got = await api.wallets.GetWallet(wallets_pb2.GetWalletRequest(wallet_id=wallet_id))
    says_its_unit(got.wallet.balance, case.unit)
    balance = (
        await api.wallets.GetBalance(wallets_pb2.GetBalanceRequest(wallet_id=wallet_id))
    ).balance
    says_its_unit(balance, case.unit)
    assert format_amount(balance.available, balance.unit, balance.unit_scale) == case.shown
    listed = await api.wallets.ListWallets(
        wallets_pb2.ListWalletsRequest(owner_id=f"owner-{case.unit}")
    )
    assert [wallet.id for wallet in listed.wallets] == [wallet_id]
    says_its_unit(listed.wallets[0].balance, case.unit)
    empty = await api.wallet(case.unit)
    cancelled = await api.wallets.CancelWallet(wallets_pb2.CancelWalletRequest(wallet_id=empty))
    says_its_unit(cancelled.wallet.balance, case.unit)


@pytest.mark.parametrize("case", cases, ids=[case.unit for case in cases])
async def test_every_transfer_rpc(api: Api, case: Case) -> None:
    unit, amount = case.unit, case.amount
    customer = await api.wallet(unit)
    other = await api.wallet(unit)
    merchant = await api.wallet(unit, kind=types_pb2.OWNER_KIND_MERCHANT)
    transfers = api.transfers

    credited = await twice(
        transfers.Credit,
        transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=customer, amount=amount * 4),
    )
    deposited = await twice(
        transfers.Deposit,
        transfers_pb2.DepositRequest(
            idempotency_key=key(), wallet_id=customer, amount=amount, funding_source="iban:X"
        ),
    )
    debited = await twice(
        transfers.Debit,
        transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=customer, amount=amount),
    )
    moved = await twice(
        transfers.Transfer,
        transfers_pb2.TransferRequest(
            idempotency_key=key(), source_wallet_id=customer, target_wallet_id=other, amount=amount
        ),
    )
    withdrawn = await twice(
        transfers.Withdraw,
        transfers_pb2.WithdrawRequest(
            idempotency_key=key(), wallet_id=other, amount=amount, funding_source="iban:X"
        ),
    )
    paid = await twice(
        transfers.Pay,
        transfers_pb2.PayRequest(
            idempotency_key=key(), payer_wallet_id=customer, payee_wallet_id=merchant, amount=amount
        ),
    )
    voided = await twice(
        transfers.Void,
        transfers_pb2.VoidRequest(idempotency_key=key(), transfer_id=paid.transfer.id),
    )
    for answer in (credited, deposited, debited, moved, withdrawn, paid, voided):
        says_its_unit(answer.transfer, unit)
    assert (
        format_amount(paid.transfer.amount, paid.transfer.unit, paid.transfer.unit_scale)
        == case.shown
    )

    got = await transfers.GetTransfer(
        transfers_pb2.GetTransferRequest(transfer_id=paid.transfer.id)
    )
    says_its_unit(got.transfer, unit)
    assert got.transfer.voided_by_transfer_id == voided.transfer.id
    history = await transfers.ListTransfers(transfers_pb2.ListTransfersRequest(wallet_id=customer))
    assert len(history.transfers) == 6  # credit, deposit, debit, transfer, payment, void
    for transfer in history.transfers:
        says_its_unit(transfer, unit)


@pytest.mark.parametrize("case", cases, ids=[case.unit for case in cases])
async def test_holds(api: Api, case: Case) -> None:
    unit, amount = case.unit, case.amount
    customer = await api.funded(amount * 3, unit)
    merchant = await api.wallet(unit, kind=types_pb2.OWNER_KIND_MERCHANT)
    holds = api.holds

    def place() -> holds_pb2.PlaceHoldRequest:
        return holds_pb2.PlaceHoldRequest(
            idempotency_key=key(), wallet_id=customer, target_wallet_id=merchant, amount=amount
        )

    placed = await twice(holds.PlaceHold, place())
    captured = await twice(
        holds.CaptureHold,
        holds_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=placed.hold.id),
    )
    released = await twice(
        holds.ReleaseHold,
        holds_pb2.ReleaseHoldRequest(
            idempotency_key=key(), hold_id=(await holds.PlaceHold(place())).hold.id
        ),
    )
    got = await holds.GetHold(holds_pb2.GetHoldRequest(hold_id=placed.hold.id))
    for answer in (placed, captured, released):
        says_its_unit(answer.hold, unit)
        says_its_unit(answer.transfer, unit)
    says_its_unit(got.hold, unit)
    assert format_amount(got.hold.amount_captured, got.hold.unit, got.hold.unit_scale) == case.shown

    # A hold that lapses releases itself: its expiry is a transfer like any other.
    lapsing = place()
    lapsing.timeout.CopyFrom(Duration(seconds=1))
    await holds.PlaceHold(lapsing)
    expiries = transfers_pb2.ListTransfersRequest(
        wallet_id=customer, kinds=[types_pb2.TRANSFER_KIND_HOLD_EXPIRY]
    )
    for _ in range(100):
        found = (await api.transfers.ListTransfers(expiries)).transfers
        if found:
            break
        await asyncio.sleep(0.05)
    assert len(found) == 1
    says_its_unit(found[0], unit)


def batch_of(customers: dict[str, int]) -> transfers_pb2.SubmitBatchRequest:
    """Of each unit: a credit, a hold, and a debit refused for want of funds."""
    request = transfers_pb2.SubmitBatchRequest()
    for case in cases:
        wallet_id = customers[case.unit]
        request.operations.add().credit.CopyFrom(
            transfers_pb2.CreditRequest(
                idempotency_key=key(), wallet_id=wallet_id, amount=case.amount
            )
        )
        request.operations.add().place_hold.CopyFrom(
            holds_pb2.PlaceHoldRequest(
                idempotency_key=key(), wallet_id=wallet_id, amount=case.amount
            )
        )
        request.operations.add().debit.CopyFrom(
            transfers_pb2.DebitRequest(
                idempotency_key=key(), wallet_id=wallet_id, amount=case.amount
            )
        )
    return request


def check_batch(response: transfers_pb2.SubmitBatchResponse, replayed: bool) -> None:
    assert len(response.results) == 3 * len(cases)
    for index, case in enumerate(cases):
        credit, hold, debit = response.results[3 * index : 3 * index + 3]
        assert [result.replayed for result in (credit, hold, debit)] == [replayed] * 3
        says_its_unit(credit.transfers[0], case.unit)
        says_its_unit(hold.transfers[0], case.unit)
        says_its_unit(hold.hold, case.unit)
        assert debit.error.reason == "INSUFFICIENT_FUNDS"


async def test_batches_of_every_unit_and_replays_after_a_restart(
    api: Api, database_url: str, open_channel: Callable[..., grpc.aio.Channel]
) -> None:
    customers = {case.unit: await api.wallet(case.unit) for case in cases}
    request = batch_of(customers)
    first = await api.transfers.SubmitBatch(request)
    check_batch(first, replayed=False)
    credit = transfers_pb2.CreditRequest(
        idempotency_key=key(), wallet_id=customers["wei"], amount=1
    )
    credited = await api.transfers.Credit(credit)
    says_its_unit(credited.transfer, "wei")

    # A server that has read no unit yet answers the replays with the same scales.
    fresh = await Server.start(Settings(database_url=database_url, listen="127.0.0.1:0"))
    try:
        async with open_channel(f"127.0.0.1:{fresh.port}") as opened:
            again = Api(opened)
            replayed = await again.transfers.SubmitBatch(request)
            check_batch(replayed, replayed=True)
            for result in replayed.results:
                result.replayed = False
            assert replayed == first
            assert (await again.transfers.Credit(credit)) == credited
            listed = await again.transfers.ListTransfers(transfers_pb2.ListTransfersRequest())
            assert {transfer.unit for transfer in listed.transfers} == set(scale_of)
            for transfer in listed.transfers:
                says_its_unit(transfer, transfer.unit)
    finally:
        await fresh.stop()
