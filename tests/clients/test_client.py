"""The typed client against the real server: each operation and each error reason through
`Client` and through `SyncClient` (every test runs once with each), on a real PostgreSQL.

The server runs on the test's event loop. `SyncClient` blocks its caller until its own loop,
in its own thread, has the answer; called from the test's loop it would stall the server, so
its calls go through `asyncio.to_thread` (see `Coffer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from coffer.clients import (
    Client,
    Grant,
    Operation,
    SyncClient,
    Transfer,
    Wallet,
    errors,
    events_pb2,
    operations,
    transfers_pb2,
    types_pb2,
)
from coffer.clients.errors import from_operation_error
from coffer.server.app import Server, Settings

client_kinds = ["Client", "SyncClient"]
hold_expiry_wait_s_max = 5.0
_numbers = itertools.count(1)


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_numbers)}"


class Coffer:
    """Either client, awaited alike: `Client` methods as they are, `SyncClient` methods in a
    worker thread, so that the server on this loop keeps serving while they block."""

    def __init__(self, client: Client | SyncClient, kind: str, target: str) -> None:
        self.client = client
        self.kind = kind
        self.target = target

    def __getattr__(self, name: str) -> Callable[..., Awaitable[Any]]:
        method = getattr(self.client, name)
        if isinstance(self.client, Client):
            return method  # type: ignore[no-any-return]
        return functools.partial(asyncio.to_thread, method)

    async def all_transfers(self, **filters: Any) -> list[Transfer]:
        client = self.client
        if isinstance(client, Client):
            return [transfer async for transfer in client.iter_transfers(**filters)]
        return await asyncio.to_thread(lambda: list(client.iter_transfers(**filters)))

    async def all_wallets(self, **filters: Any) -> list[Wallet]:
        client = self.client
        if isinstance(client, Client):
            return [wallet async for wallet in client.iter_wallets(**filters)]
        return await asyncio.to_thread(lambda: list(client.iter_wallets(**filters)))

    async def all_grants(self, **arguments: Any) -> list[Grant]:
        client = self.client
        if isinstance(client, Client):
            return [grant async for grant in client.iter_grants(**arguments)]
        return await asyncio.to_thread(lambda: list(client.iter_grants(**arguments)))

    async def setup_units(self) -> None:
        await self.create_unit(code="EUR", kind="currency", scale=2, name="Euro", plural="Euros")
        await self.create_unit(
            code="session",
            kind="credit",
            scale=2,
            name="Coaching session",
            plural="Coaching sessions",
        )

    async def wallet(self, unit: str = "EUR", owner_kind: str = "customer", **fields: Any) -> int:
        wallet = await self.create_wallet(
            owner_id=unique("owner"), owner_kind=owner_kind, unit=unit, **fields
        )
        return int(wallet.id)

    async def funded(self, amount: int, unit: str = "EUR") -> int:
        wallet_id = await self.wallet(unit)
        await self.credit(wallet_id=wallet_id, amount=amount)
        return wallet_id

    async def balance(self, wallet_id: int) -> tuple[int, int, int]:
        balance = (await self.get_balance(wallet_id=wallet_id)).balance
        return balance.posted, balance.pending, balance.available


@asynccontextmanager
async def opened(kind: str, target: str, **options: Any) -> AsyncIterator[Coffer]:
    options.setdefault("caller", "client-tests")
    if kind == "Client":
        async with Client(target, **options) as client:
            yield Coffer(client, kind, target)
        return
    sync_client = SyncClient(target, **options)
    try:
        yield Coffer(sync_client, kind, target)
    finally:
        await asyncio.to_thread(sync_client.close)


@pytest.fixture(params=client_kinds)
async def coffer(request: pytest.FixtureRequest, server: Server) -> AsyncIterator[Coffer]:
    async with opened(request.param, f"127.0.0.1:{server.port}") as opened_coffer:
        await opened_coffer.setup_units()
        yield opened_coffer


@pytest.fixture
def closed_target() -> str:
    """An address where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


async def fails(call: Awaitable[Any], error_class: type[errors.CofferError]) -> errors.CofferError:
    """Awaits a call that must raise exactly `error_class`; returns the error."""
    with pytest.raises(errors.CofferError) as raised:
        await call
    error = raised.value
    assert type(error) is error_class, repr(error)
    assert str(error).startswith(f"{error_class.reason}: ")
    assert error.message
    assert not error.retryable
    return error


# Units and wallets ---------------------------------------------------------------------------


async def test_units(coffer: Coffer) -> None:
    assert [unit.code for unit in await coffer.list_units()] == ["EUR", "session"]
    session = await coffer.get_unit(code="session")
    assert session.kind == types_pb2.UNIT_KIND_CREDIT
    assert (session.name, session.plural, session.scale) == (
        "Coaching session",
        "Coaching sessions",
        2,
    )
    # The same fields again: the unit as it is.
    again = await coffer.create_unit(
        code="EUR", kind="currency", scale=2, name="Euro", plural="Euros"
    )
    assert again == await coffer.get_unit(code="EUR")
    error = await fails(
        coffer.create_unit(code="EUR", kind="currency", scale=3, name="Euro"), errors.UnitExists
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert isinstance(error, errors.AlreadyExists)
    error = await fails(coffer.get_unit(code="XYZ"), errors.UnitNotFound)
    assert error.code == grpc.StatusCode.NOT_FOUND and isinstance(error, errors.NotFound)
    await fails(
        coffer.create_wallet(owner_id="x", owner_kind="customer", unit="GBP"), errors.UnitNotFound
    )
    # Names the client does not know are refused before anything is sent.
    with pytest.raises(ValueError, match="currency, credit"):
        await coffer.create_unit(code="pts", kind="coin", scale=0, name="Point")
    # A default validity for credits that name no expiry, read back in its canonical form.
    pack = await coffer.create_unit(
        code="pack", kind="credit", scale=0, name="Pack", default_validity="P1Y"
    )
    assert pack.default_validity == "P12M" == (await coffer.get_unit(code="pack")).default_validity
    error = await fails(
        coffer.create_unit(
            code="pack", kind="credit", scale=0, name="Pack", default_validity="P6M"
        ),
        errors.UnitExists,
    )
    assert "another definition" in error.message


async def test_wallets(coffer: Coffer) -> None:
    fields: dict[str, Any] = {
        "owner_id": "shop-9",
        "owner_kind": "merchant",
        "unit": "EUR",
        "balance_minimum": -1000,
        "metadata": {"tier": "gold"},
        "idempotency_key": "wallet-1",
    }
    created = await coffer.create_wallet(**fields)
    assert created.owner_kind == types_pb2.OWNER_KIND_MERCHANT
    assert created.status == types_pb2.WALLET_STATUS_ACTIVE
    assert created.balance_minimum == -1000 and dict(created.metadata) == {"tier": "gold"}
    assert await coffer.create_wallet(**fields) == created
    error = await fails(
        coffer.create_wallet(**{**fields, "owner_id": "shop-10"}), errors.IdempotencyKeyReused
    )
    assert error.code == grpc.StatusCode.ALREADY_EXISTS
    assert await coffer.get_wallet(wallet_id=created.id) == created
    balance = await coffer.get_balance(wallet_id=created.id)
    assert (balance.wallet_id, balance.unit) == (created.id, "EUR")
    # The overdraft: the available balance may go down to the minimum.
    await coffer.debit(wallet_id=created.id, amount=1000)
    assert await coffer.balance(created.id) == (-1000, 0, -1000)
    await fails(coffer.debit(wallet_id=created.id, amount=1), errors.InsufficientFunds)
    listed = await coffer.list_wallets(owner_id="shop-9")
    assert [wallet.id for wallet in listed.items] == [created.id]
    assert listed.next_page_token == ""

    empty = await coffer.wallet()
    cancelled = await coffer.cancel_wallet(wallet_id=empty)
    assert cancelled.status == types_pb2.WALLET_STATUS_CANCELLED
    assert await coffer.cancel_wallet(wallet_id=empty) == cancelled
    await fails(coffer.credit(wallet_id=empty, amount=1), errors.WalletNotActive)
    await fails(coffer.cancel_wallet(wallet_id=created.id), errors.WalletNotEmpty)
    error = await fails(coffer.get_wallet(wallet_id=424242), errors.WalletNotFound)
    assert error.code == grpc.StatusCode.NOT_FOUND
    await fails(coffer.get_balance(wallet_id=424242), errors.WalletNotFound)


async def test_paging(coffer: Coffer) -> None:
    customers = [await coffer.wallet() for _ in range(3)]
    merchants = [await coffer.wallet(owner_kind="merchant") for _ in range(2)]
    everything = await coffer.all_wallets(page_size=2)
    ids = [wallet.id for wallet in everything]
    # Oldest first: the units' system wallets, then ours.
    assert ids == sorted(ids) and ids[-5:] == customers + merchants
    assert ids == [wallet.id for wallet in (await coffer.list_wallets()).items]
    first_page = await coffer.list_wallets(page_size=2)
    assert len(first_page.items) == 2 and first_page.next_page_token
    assert [wallet.id for wallet in await coffer.all_wallets(owner_kind="merchant")] == merchants
    customers_page_by_page = await coffer.all_wallets(
        owner_kind="customer", unit="EUR", page_size=1
    )
    assert [wallet.id for wallet in customers_page_by_page] == customers

    wallet = customers[0]
    for number in range(5):
        await coffer.credit(wallet_id=wallet, amount=10 + number, reference=f"invoice-{number}")
    await coffer.debit(wallet_id=wallet, amount=5)
    history = await coffer.all_transfers(wallet_id=wallet, page_size=2)
    assert [transfer.amount for transfer in history] == [5, 14, 13, 12, 11, 10]
    ids = [transfer.id for transfer in history]
    assert ids == sorted(ids, reverse=True)
    page = await coffer.list_transfers(wallet_id=wallet, page_size=4)
    assert [transfer.id for transfer in page.items] == ids[:4] and page.next_page_token
    rest = await coffer.list_transfers(
        wallet_id=wallet, page_size=4, page_token=page.next_page_token
    )
    assert [transfer.id for transfer in rest.items] == ids[4:] and not rest.next_page_token
    credits = await coffer.all_transfers(wallet_id=wallet, kinds=["credit"], page_size=3)
    assert [transfer.amount for transfer in credits] == [14, 13, 12, 11, 10]
    by_reference = await coffer.all_transfers(reference="invoice-3")
    assert [transfer.id for transfer in by_reference] == [ids[2]]
    now = datetime.now(UTC)
    assert await coffer.all_transfers(wallet_id=wallet, start_time=now + timedelta(hours=1)) == []
    window = await coffer.all_transfers(
        wallet_id=wallet, start_time=now - timedelta(hours=1), end_time=now + timedelta(hours=1)
    )
    assert [transfer.id for transfer in window] == ids
    with pytest.raises(ValueError, match="timezone-aware"):
        await coffer.list_transfers(start_time=datetime.now())


# Operations ----------------------------------------------------------------------------------


async def test_credit_and_debit_in_both_modes(coffer: Coffer) -> None:
    wallet = await coffer.wallet("session")
    credited = await coffer.credit(
        wallet_id=wallet,
        amount=300,
        note="3 sessions sold",
        reference="invoice-7",
        performed_by="ops:ana",
        metadata={"pack": "3"},
    )
    assert credited.kind == types_pb2.TRANSFER_KIND_CREDIT
    assert (credited.unit, credited.amount, credited.target_wallet_id) == ("session", 300, wallet)
    assert (credited.note, credited.reference, credited.performed_by) == (
        "3 sessions sold",
        "invoice-7",
        "ops:ana",
    )
    assert dict(credited.metadata) == {"pack": "3"}
    half = await coffer.debit(wallet_id=wallet, amount=50, note="half a session")
    assert (half.amount_debited, half.amount_remaining) == (50, 0)
    assert half.transfer.kind == types_pb2.TRANSFER_KIND_DEBIT
    assert half.transfer.source_wallet_id == wallet
    error = await fails(coffer.debit(wallet_id=wallet, amount=500), errors.InsufficientFunds)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert isinstance(error, errors.FailedPrecondition)
    assert await coffer.balance(wallet) == (250, 0, 250)
    partial = await coffer.debit(wallet_id=wallet, amount=500, mode="up_to")
    assert (partial.amount_debited, partial.amount_remaining) == (250, 250)
    assert (partial.transfer.amount, partial.transfer.amount_requested) == (250, 500)
    assert await coffer.balance(wallet) == (0, 0, 0)
    assert await coffer.get_transfer(transfer_id=credited.id) == credited
    await fails(coffer.get_transfer(transfer_id=777777), errors.TransferNotFound)
    with pytest.raises(ValueError, match="all_or_nothing, up_to"):
        await coffer.debit(wallet_id=wallet, amount=1, mode="sideways")


async def test_transfer_and_its_errors(coffer: Coffer) -> None:
    source = await coffer.funded(100)
    target = await coffer.wallet()
    sessions = await coffer.wallet("session")
    moved = await coffer.transfer(
        source_wallet_id=source, target_wallet_id=target, amount=40, reference="split"
    )
    assert moved.kind == types_pb2.TRANSFER_KIND_TRANSFER
    assert (moved.source_wallet_id, moved.target_wallet_id, moved.amount) == (source, target, 40)
    assert await coffer.balance(source) == (60, 0, 60)
    assert await coffer.balance(target) == (40, 0, 40)

    def move(to: int, amount: int = 1) -> Awaitable[Any]:
        return coffer.transfer(source_wallet_id=source, target_wallet_id=to, amount=amount)

    await fails(move(sessions), errors.UnitMismatch)
    await fails(move(source), errors.SameWallet)
    await fails(move(99999), errors.WalletNotFound)
    await fails(move(target, 61), errors.InsufficientFunds)
    # Wallet 1 is a system wallet: nobody transfers to it.
    await fails(move(1), errors.WalletKindMismatch)
    # Two system wallets, each within range, fund more than one wallet can hold.
    big = await coffer.wallet()
    await coffer.deposit(wallet_id=big, amount=2**62, funding_source="bank")
    await coffer.credit(wallet_id=target, amount=2**62)
    await fails(
        coffer.transfer(source_wallet_id=big, target_wallet_id=target, amount=2**62),
        errors.BalanceOverflow,
    )
    assert await coffer.balance(target) == (2**62 + 40, 0, 2**62 + 40)


async def test_a_replayed_refusal_says_so(coffer: Coffer) -> None:
    wallet = await coffer.wallet()
    with pytest.raises(errors.InsufficientFunds) as first:
        await coffer.debit(wallet_id=wallet, amount=50, idempotency_key="declined-1")
    assert not first.value.replayed
    await coffer.credit(wallet_id=wallet, amount=100)
    with pytest.raises(errors.InsufficientFunds) as again:
        await coffer.debit(wallet_id=wallet, amount=50, idempotency_key="declined-1")
    assert again.value.replayed and again.value.message == first.value.message
    assert await coffer.balance(wallet) == (100, 0, 100)


async def test_emi_deposit_payment_withdrawal(coffer: Coffer) -> None:
    customer = await coffer.wallet()
    merchant = await coffer.wallet(owner_kind="merchant")
    deposit = await coffer.deposit(
        wallet_id=customer, amount=5000, funding_source="iban:DE89370400440532013000"
    )
    assert deposit.kind == types_pb2.TRANSFER_KIND_DEPOSIT
    assert deposit.reference == "iban:DE89370400440532013000"
    paid = await coffer.pay(
        payer_wallet_id=customer, payee_wallet_id=merchant, amount=1200, reference="order-55"
    )
    assert paid.kind == types_pb2.TRANSFER_KIND_PAYMENT
    assert (paid.source_wallet_id, paid.target_wallet_id) == (customer, merchant)
    await fails(
        coffer.pay(payer_wallet_id=merchant, payee_wallet_id=customer, amount=1),
        errors.WalletKindMismatch,
    )
    await fails(
        coffer.pay(payer_wallet_id=customer, payee_wallet_id=merchant, amount=3801),
        errors.InsufficientFunds,
    )
    withdrawal = await coffer.withdraw(wallet_id=merchant, amount=1000, funding_source="iban:FR76")
    assert withdrawal.kind == types_pb2.TRANSFER_KIND_WITHDRAWAL
    await fails(
        coffer.withdraw(wallet_id=merchant, amount=201, funding_source="iban:FR76"),
        errors.InsufficientFunds,
    )
    assert await coffer.balance(customer) == (3800, 0, 3800)
    assert await coffer.balance(merchant) == (200, 0, 200)
    # Out of the payer's wallet and into the payee's: the same transfer in both histories.
    out = await coffer.all_transfers(wallet_id=customer)
    into = await coffer.all_transfers(wallet_id=merchant)
    assert [transfer.id for transfer in out] == [paid.id, deposit.id]
    assert [transfer.id for transfer in into] == [withdrawal.id, paid.id]


async def test_void(coffer: Coffer) -> None:
    wallet = await coffer.funded(100)
    spent = await coffer.debit(wallet_id=wallet, amount=30)
    voided = await coffer.void(transfer_id=spent.transfer.id, note="refund: wrong charge")
    assert voided.kind == types_pb2.TRANSFER_KIND_VOID
    assert voided.voids_transfer_id == spent.transfer.id
    assert voided.note == "refund: wrong charge"
    assert await coffer.balance(wallet) == (100, 0, 100)
    original = await coffer.get_transfer(transfer_id=spent.transfer.id)
    assert original.voided_by_transfer_id == voided.id
    await fails(coffer.void(transfer_id=spent.transfer.id), errors.AlreadyVoided)
    await fails(coffer.void(transfer_id=voided.id), errors.NotVoidable)
    await fails(coffer.void(transfer_id=777777), errors.TransferNotFound)
    await coffer.debit(wallet_id=wallet, amount=90)
    (credit,) = await coffer.all_transfers(wallet_id=wallet, kinds=["credit"])
    # Taking the credit back would overdraw the wallet.
    await fails(coffer.void(transfer_id=credit.id), errors.InsufficientFunds)


async def test_credits_that_expire(coffer: Coffer) -> None:
    """The terms of a credit and a deposit, the grants they make, what a debit drew from
    them, the balance to come, an expiration run; naive times are refused before any call."""
    wallet = await coffer.wallet()
    now = datetime.now(UTC)
    expiry = (now + timedelta(days=30)).replace(microsecond=0)
    credited = await coffer.credit(wallet_id=wallet, amount=200, expires_at=expiry)
    start = (now + timedelta(days=2)).replace(microsecond=0)
    await coffer.deposit(wallet_id=wallet, amount=50, funding_source="iban:1", valid_from=start)
    page = await coffer.list_grants(wallet_id=wallet, page_size=1)
    assert [grant.transfer_id for grant in page.items] == [credited.id]
    assert page.next_page_token
    grants = await coffer.all_grants(wallet_id=wallet)
    assert [(grant.amount, grant.expires_at.ToDatetime(tzinfo=UTC)) for grant in grants[:1]] == [
        (200, expiry)
    ]
    assert grants[1].valid_from.ToDatetime(tzinfo=UTC) == start
    assert not grants[1].HasField("expires_at")
    balance = (await coffer.get_balance(wallet_id=wallet)).balance
    assert (balance.posted, balance.unspendable, balance.available) == (250, 50, 200)
    debited = await coffer.debit(wallet_id=wallet, amount=80)
    assert [(each.grant_id, each.amount) for each in debited.transfer.allocations] == [
        (grants[0].id, -80)
    ]
    later = await coffer.future_balance(wallet_id=wallet, at=now + timedelta(days=40))
    assert (later.wallet_id, later.unit) == (wallet, "EUR")
    assert (later.balance.posted, later.balance.available) == (50, 50)
    assert await coffer.run_expiration() == 0
    await fails(
        coffer.void(transfer_id=credited.id, expires_at=now + timedelta(days=1)),
        errors.InvalidArgument,
    )
    for call in (
        lambda: coffer.credit(wallet_id=wallet, amount=1, valid_from=datetime(2030, 1, 1)),
        lambda: coffer.future_balance(wallet_id=wallet, at=datetime(2030, 1, 1)),
    ):
        with pytest.raises(ValueError, match="timezone-aware"):
            await call()


async def test_holds(coffer: Coffer) -> None:
    wallet = await coffer.funded(1000)
    merchant = await coffer.wallet(owner_kind="merchant")
    # Placed first so that it has expired by the end of the test.
    expiring = await coffer.place_hold(wallet_id=wallet, amount=100, timeout=timedelta(seconds=1))
    placed = await coffer.place_hold(
        wallet_id=wallet,
        target_wallet_id=merchant,
        amount=700,
        timeout=timedelta(minutes=1),
        reference="booking-3",
    )
    hold = placed.hold
    assert hold.status == types_pb2.HOLD_STATUS_PENDING
    assert (hold.source_wallet_id, hold.target_wallet_id, hold.amount) == (wallet, merchant, 700)
    assert placed.transfer.kind == types_pb2.TRANSFER_KIND_HOLD
    # A hold is known by the id of its own transfer.
    assert placed.transfer.id == hold.id and placed.transfer.hold_id == 0
    assert await coffer.balance(wallet) == (1000, 800, 200)
    await fails(coffer.debit(wallet_id=wallet, amount=201), errors.InsufficientFunds)
    await fails(coffer.capture_hold(hold_id=hold.id, amount=701), errors.CaptureExceedsHold)
    captured = await coffer.capture_hold(hold_id=hold.id, amount=500)
    assert captured.hold.status == types_pb2.HOLD_STATUS_CAPTURED
    assert captured.hold.amount_captured == 500
    assert captured.transfer.kind == types_pb2.TRANSFER_KIND_CAPTURE
    assert captured.transfer.hold_id == hold.id
    assert await coffer.balance(wallet) == (500, 100, 400)
    assert await coffer.balance(merchant) == (500, 0, 500)
    await fails(coffer.release_hold(hold_id=hold.id), errors.HoldNotPending)
    await fails(coffer.capture_hold(hold_id=hold.id), errors.HoldNotPending)
    # No amount captures all of it; no target captures to the operator.
    whole = await coffer.place_hold(wallet_id=wallet, amount=40)
    assert whole.hold.target_wallet_id not in (0, wallet, merchant)
    all_of_it = await coffer.capture_hold(hold_id=whole.hold.id)
    assert all_of_it.hold.amount_captured == 40
    second = await coffer.place_hold(wallet_id=wallet, amount=60)
    released = await coffer.release_hold(hold_id=second.hold.id, note="cancelled")
    assert released.hold.status == types_pb2.HOLD_STATUS_RELEASED
    assert released.transfer.kind == types_pb2.TRANSFER_KIND_RELEASE
    got = await coffer.get_hold(hold_id=second.hold.id)
    assert got.resolved_by_transfer_id == released.transfer.id
    await fails(coffer.get_hold(hold_id=captured.transfer.id), errors.HoldNotFound)
    await fails(coffer.release_hold(hold_id=999999), errors.HoldNotFound)

    deadline = asyncio.get_running_loop().time() + hold_expiry_wait_s_max
    # Expired as soon as its time is up; resolved when the server's sweep posts the expiry.
    while not (got := await coffer.get_hold(hold_id=expiring.hold.id)).resolved_by_transfer_id:
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.1)
    assert got.status == types_pb2.HOLD_STATUS_EXPIRED
    expiry = await coffer.get_transfer(transfer_id=got.resolved_by_transfer_id)
    assert expiry.kind == types_pb2.TRANSFER_KIND_HOLD_EXPIRY
    assert await coffer.balance(wallet) == (460, 0, 460)
    await fails(coffer.capture_hold(hold_id=expiring.hold.id), errors.HoldExpired)


# Batches and idempotency ---------------------------------------------------------------------


async def test_submit_batch(coffer: Coffer) -> None:
    customer = await coffer.wallet()
    other = await coffer.wallet()
    batch = [
        operations.credit(wallet_id=customer, amount=100),
        operations.debit(wallet_id=customer, amount=500),
        # A chain whose second link fails: neither applies.
        operations.transfer(
            source_wallet_id=customer, target_wallet_id=other, amount=60, linked=True
        ),
        operations.debit(wallet_id=other, amount=61),
        # A chain that holds: both apply.
        operations.transfer(
            source_wallet_id=customer, target_wallet_id=other, amount=30, linked=True
        ),
        operations.debit(wallet_id=other, amount=30, mode="up_to"),
        operations.credit(wallet_id=customer, amount=-1),
        Operation(),
        operations.place_hold(wallet_id=customer, amount=10),
        # Without a key: the client fills one in.
        Operation(credit=transfers_pb2.CreditRequest(wallet_id=customer, amount=5)),
    ]
    results = await coffer.submit_batch(batch)
    assert len(results) == len(batch)
    failures = [
        from_operation_error(result.error) if result.HasField("error") else None
        for result in results
    ]
    assert [type(failure).__name__ for failure in failures] == [
        "NoneType",
        "InsufficientFunds",
        "LinkedOperationFailed",
        "InsufficientFunds",
        "NoneType",
        "NoneType",
        "InvalidArgument",
        "InvalidArgument",
        "NoneType",
        "NoneType",
    ]
    linked = failures[2]
    assert isinstance(linked, errors.LinkedOperationFailed)
    assert linked.code == grpc.StatusCode.ABORTED and isinstance(linked, errors.Aborted)
    assert str(linked).startswith("LINKED_OPERATION_FAILED: ")
    insufficient = failures[1]
    assert insufficient is not None and insufficient.code == grpc.StatusCode.FAILED_PRECONDITION
    negative = failures[6]
    assert negative is not None and negative.field == "amount"
    assert results[0].transfers[0].amount == 100
    assert [transfer.amount for transfer in results[4].transfers] == [30]
    assert results[5].transfers[0].kind == types_pb2.TRANSFER_KIND_DEBIT
    assert results[8].hold.status == types_pb2.HOLD_STATUS_PENDING
    assert results[9].transfers[0].amount == 5
    assert not results[3].transfers and not results[2].transfers
    assert await coffer.balance(customer) == (75, 10, 65)
    assert await coffer.balance(other) == (0, 0, 0)
    # The same batch again (the keyed operations): every success is a replay.
    again = await coffer.submit_batch(batch[:9])
    for number in (0, 4, 5, 8):
        assert again[number].transfers == results[number].transfers
    assert await coffer.balance(customer) == (75, 10, 65)
    error = await fails(coffer.submit_batch([]), errors.InvalidArgument)
    assert error.field == "operations"


async def test_submit_batch_compact(coffer: Coffer) -> None:
    """A compact answer names the transfer each operation made and the failures by index;
    the same batch sent again whole replays those very transfers."""
    customer = await coffer.wallet()
    batch = [
        operations.credit(wallet_id=customer, amount=100),
        operations.debit(wallet_id=customer, amount=500),
        operations.debit(wallet_id=customer, amount=130, mode="up_to"),
        Operation(),
    ]
    outcomes = await coffer.submit_batch_compact(batch)
    assert len(outcomes.transfer_ids) == len(batch)
    assert outcomes.transfer_ids[0] > 0 and outcomes.transfer_ids[2] > 0
    assert [outcomes.transfer_ids[1], outcomes.transfer_ids[3]] == [0, 0]
    assert [(failed.index, failed.error.reason) for failed in outcomes.failed] == [
        (1, "INSUFFICIENT_FUNDS"),
        (3, "INVALID_ARGUMENT"),
    ]
    assert isinstance(from_operation_error(outcomes.failed[0].error), errors.InsufficientFunds)
    assert list(outcomes.amounts_remaining) == [0, 0, 30, 0]
    assert not outcomes.replayed
    whole = await coffer.submit_batch(batch)
    assert [result.transfers[0].id if result.transfers else 0 for result in whole] == list(
        outcomes.transfer_ids
    )
    assert whole[2].amount_remaining == 30
    # The refusal is kept under its key too; the invalid operation has none.
    assert [result.replayed for result in whole] == [True, True, True, False]
    again = await coffer.submit_batch_compact(batch)
    assert list(again.replayed) == [True, True, True, False]
    assert list(again.transfer_ids) == list(outcomes.transfer_ids)
    assert await coffer.balance(customer) == (0, 0, 0)


async def test_idempotency(coffer: Coffer) -> None:
    wallet = await coffer.wallet()
    # Without keys, each call is its own: the client makes a fresh key for each.
    one = await coffer.credit(wallet_id=wallet, amount=10)
    two = await coffer.credit(wallet_id=wallet, amount=10)
    assert one.id != two.id
    assert await coffer.balance(wallet) == (20, 0, 20)
    first = await coffer.credit(wallet_id=wallet, amount=10, idempotency_key="pay-1")
    second = await coffer.credit(wallet_id=wallet, amount=10, idempotency_key="pay-1")
    assert second == first
    assert await coffer.balance(wallet) == (30, 0, 30)
    await fails(
        coffer.credit(wallet_id=wallet, amount=11, idempotency_key="pay-1"),
        errors.IdempotencyKeyReused,
    )
    held = await coffer.place_hold(wallet_id=wallet, amount=5, idempotency_key="hold-1")
    assert await coffer.place_hold(wallet_id=wallet, amount=5, idempotency_key="hold-1") == held
    assert await coffer.balance(wallet) == (30, 5, 25)
    # Keys are scoped to the caller.
    async with opened(coffer.kind, coffer.target, caller="billing") as billing:
        other = await billing.credit(wallet_id=wallet, amount=11, idempotency_key="pay-1")
    assert other.id != first.id
    assert await coffer.balance(wallet) == (41, 5, 36)
    # The server's own callers are refused by the client, before anything is sent.
    with pytest.raises(ValueError, match="caller must not start with '@'"):
        Client(coffer.target, caller="@coffer")


@pytest.mark.parametrize("kind", client_kinds)
async def test_retry_across_a_server_restart_replays(kind: str, database_url: str) -> None:
    """The first server applies the credit and goes away; the same call, with the same key, is
    sent while none listens and is retried by the client until a new server on the same port
    and database answers it with the original transfer."""
    first_server = await Server.start(Settings(database_url=database_url, listen="127.0.0.1:0"))
    servers = [first_server]
    target = f"127.0.0.1:{first_server.port}"
    try:
        async with opened(kind, target, timeout_s=10, retries_max=10) as coffer:
            await coffer.setup_units()
            wallet = await coffer.wallet()
            credit = functools.partial(
                coffer.credit, wallet_id=wallet, amount=25, idempotency_key="restart-1"
            )
            first = await credit()
            await first_server.stop()
            servers.remove(first_server)
            retried = asyncio.ensure_future(credit())
            await asyncio.sleep(0.3)
            assert not retried.done()
            servers.append(await Server.start(Settings(database_url=database_url, listen=target)))
            assert await retried == first
            assert await coffer.balance(wallet) == (25, 0, 25)
    finally:
        for running in servers:
            await running.stop()


# Bad input, health, an unreachable server ----------------------------------------------------


async def test_invalid_argument_names_its_field(coffer: Coffer) -> None:
    wallet = await coffer.funded(100)
    hold = (await coffer.place_hold(wallet_id=wallet, amount=1)).hold.id
    bad_calls: list[tuple[Callable[[], Awaitable[Any]], str]] = [
        (lambda: coffer.create_unit(code="a b", kind="credit", scale=0, name="x"), "code"),
        (lambda: coffer.create_unit(code="pts", kind="credit", scale=19, name="x"), "scale"),
        (lambda: coffer.create_unit(code="pts", kind="credit", scale=0, name=""), "name"),
        (
            lambda: coffer.create_unit(
                code="pts", kind="credit", scale=0, name="x", default_validity="6 months"
            ),
            "default_validity",
        ),
        (lambda: coffer.get_unit(code=""), "code"),
        (
            lambda: coffer.create_wallet(
                owner_id="o", owner_kind="customer", unit="EUR", balance_minimum=5
            ),
            "balance_minimum",
        ),
        (
            lambda: coffer.create_wallet(
                owner_id="o",
                owner_kind="customer",
                unit="EUR",
                metadata={f"k{n}": "v" for n in range(17)},
            ),
            "metadata",
        ),
        (lambda: coffer.create_wallet(owner_id="", owner_kind="customer", unit="EUR"), "owner_id"),
        (lambda: coffer.get_wallet(wallet_id=0), "wallet_id"),
        (lambda: coffer.get_balance(wallet_id=-3), "wallet_id"),
        (lambda: coffer.cancel_wallet(wallet_id=0), "wallet_id"),
        (lambda: coffer.list_wallets(page_size=1001), "page_size"),
        (lambda: coffer.list_wallets(page_token="garbage!"), "page_token"),
        (lambda: coffer.credit(wallet_id=wallet, amount=0), "amount"),
        (lambda: coffer.credit(wallet_id=wallet, amount=-5), "amount"),
        (lambda: coffer.credit(wallet_id=wallet, amount=1, note="n" * 1001), "note"),
        (lambda: coffer.credit(wallet_id=wallet, amount=1, idempotency_key=""), "idempotency_key"),
        (
            lambda: coffer.credit(wallet_id=wallet, amount=1, idempotency_key="k" * 129),
            "idempotency_key",
        ),
        (lambda: coffer.debit(wallet_id=-1, amount=1), "wallet_id"),
        (
            lambda: coffer.transfer(source_wallet_id=wallet, target_wallet_id=0, amount=1),
            "target_wallet_id",
        ),
        (lambda: coffer.deposit(wallet_id=wallet, amount=1, funding_source=""), "funding_source"),
        (lambda: coffer.withdraw(wallet_id=wallet, amount=1, funding_source=""), "funding_source"),
        (
            lambda: coffer.pay(payer_wallet_id=wallet, payee_wallet_id=0, amount=1),
            "payee_wallet_id",
        ),
        (lambda: coffer.void(transfer_id=0), "transfer_id"),
        (lambda: coffer.get_transfer(transfer_id=0), "transfer_id"),
        (lambda: coffer.list_transfers(page_size=-1), "page_size"),
        (lambda: coffer.list_transfers(page_token="garbage!"), "page_token"),
        (lambda: coffer.place_hold(wallet_id=wallet, amount=1, timeout=timedelta(0)), "timeout"),
        (
            lambda: coffer.place_hold(wallet_id=wallet, amount=1, timeout=timedelta(days=31)),
            "timeout",
        ),
        (lambda: coffer.place_hold(wallet_id=wallet, amount=0), "amount"),
        (lambda: coffer.capture_hold(hold_id=hold, amount=0), "amount"),
        (lambda: coffer.capture_hold(hold_id=0), "hold_id"),
        (lambda: coffer.release_hold(hold_id=0), "hold_id"),
        (lambda: coffer.get_hold(hold_id=0), "hold_id"),
    ]
    for call, field in bad_calls:
        error = await fails(call(), errors.InvalidArgument)
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.field is not None and error.field.startswith(field), (field, repr(error))
        assert error.metadata["field"] == error.field
    # Nothing was written by any of them.
    assert await coffer.balance(wallet) == (100, 1, 99)


async def test_health(coffer: Coffer) -> None:
    assert await coffer.health() == "SERVING"
    assert await coffer.health(service="coffer.v1.TransferService") == "SERVING"
    with pytest.raises(errors.NotFound) as raised:
        await coffer.health(service="no.such.Service")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND


def established_to(port: int) -> int:
    """This process's TCP connections established to `port` (IPv4 or IPv6)."""
    sockets = set()
    for descriptor in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{descriptor}")
            if link.startswith("socket:["):
                sockets.add(link.removeprefix("socket:[").removesuffix("]"))
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            next(rows)
            for row in rows:
                fields = row.split()
                # remote address, state (01: established), ..., inode
                remote_port = int(fields[2].rsplit(":", 1)[1], 16)
                if remote_port == port and fields[3] == "01" and fields[9] in sockets:
                    count += 1
    return count


@pytest.mark.parametrize("kind", client_kinds)
@pytest.mark.parametrize("connections", [1, 4])
async def test_each_connection_is_one_of_its_own_and_calls_take_them_in_turn(
    kind: str, connections: int, server: Server
) -> None:
    """What lets a client reach every worker of `coffer serve --workers`: the kernel gives
    each connection to one worker."""
    async with opened(kind, f"127.0.0.1:{server.port}", connections=connections) as coffer:
        for _ in range(2 * connections):
            assert await coffer.health() == "SERVING"
        assert established_to(server.port) == connections


@pytest.mark.parametrize("kind", client_kinds)
async def test_unreachable_server(kind: str, closed_target: str) -> None:
    async with opened(kind, closed_target, timeout_s=2, retries_max=1) as coffer:
        with pytest.raises(errors.Unavailable) as raised:
            await coffer.get_balance(wallet_id=1)
    assert raised.value.retryable
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


# Events ----------------------------------------------------------------------------------------


async def test_events_list_and_watch_with_the_balance_alert(coffer: Coffer) -> None:
    wallet_id = await coffer.wallet(low_balance_threshold=100, top_up_to=500)
    assert (await coffer.get_wallet(wallet_id=wallet_id)).low_balance_threshold == 100
    start = await coffer.list_events(wallet_ids=[wallet_id])
    assert [event.type for event in start.events] == [events_pb2.EVENT_TYPE_WALLET_CREATED]
    assert start.caught_up and start.next_cursor
    await coffer.credit(wallet_id=wallet_id, amount=150)
    await coffer.debit(wallet_id=wallet_id, amount=60)
    page = await coffer.list_events(
        after_cursor=start.next_cursor,
        wallet_ids=[wallet_id],
        types=["low_balance", "top_up_requested"],
    )
    low, top_up = page.events
    assert low.low_balance.balance.available == 90
    assert top_up.top_up_request.amount == 410
    assert top_up.top_up_request.request_id == f"top-up:{wallet_id}:1"
    # The typed client's stream, from a cursor: the events after it, then as they come.
    got: list[events_pb2.Event] = []
    client = coffer.client

    async def follow() -> None:
        if isinstance(client, Client):
            async for event in client.watch_events(after_cursor=start.next_cursor):
                got.append(event)
                if len(got) == 5:
                    return
        else:

            def blocking() -> None:
                for event in client.watch_events(after_cursor=start.next_cursor):
                    got.append(event)
                    if len(got) == 5:
                        return

            await asyncio.to_thread(blocking)

    following = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    wallet = await coffer.set_balance_alert(wallet_id=wallet_id, low_balance_threshold=None)
    assert not wallet.HasField("low_balance_threshold")
    await asyncio.wait_for(following, 10)
    assert [events_pb2.EventType.Name(event.type) for event in got] == [
        "EVENT_TYPE_TRANSFER",
        "EVENT_TYPE_TRANSFER",
        "EVENT_TYPE_LOW_BALANCE",
        "EVENT_TYPE_TOP_UP_REQUESTED",
        "EVENT_TYPE_WALLET_ALERT_SET",
    ]
    await fails(coffer.list_events(after_cursor="nonsense"), errors.InvalidArgument)
    with pytest.raises(ValueError, match="is none of"):
        await coffer.list_events(types=["nonsense"])
