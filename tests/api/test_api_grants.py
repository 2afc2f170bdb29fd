"""Credits that expire, through the real server and the typed client: the terms of credits
and deposits, the grants they make (GrantService.ListGrants), what spending drew from them
(`Transfer.allocations`, alike in answers, replays and reads), balances now and to come,
expiration runs (RunExpiration, and the server's own) and the voids of expirations, holds
captured after a grant they reserved expired, and the events of grants."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from coffer.clients import Client, Grant, Transfer, errors, operations
from coffer.core.model import Role
from coffer.server.app import Server, Settings
from coffer.v1 import events_pb2, types_pb2

day = timedelta(days=1)
# How long a test waits for a grant a second from expiry to be past it.
expiry_wait_s_max = 10.0


@pytest.fixture
async def coffer(server: Server) -> AsyncIterator[Client]:
    async with Client(f"127.0.0.1:{server.port}", caller="grants-tests") as client:
        await client.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
        await client.create_unit(
            code="session",
            kind="credit",
            name="Coaching session",
            scale=2,
            default_validity="P6M",
        )
        yield client


async def wallet(coffer: Client, unit: str = "EUR", kind: Any = "customer") -> int:
    created = await coffer.create_wallet(owner_id=f"owner-{unit}", owner_kind=kind, unit=unit)
    return created.id


def allocations(transfer: Transfer) -> list[tuple[int, int]]:
    return [(each.grant_id, each.amount) for each in transfer.allocations]


def expires(grant: Grant) -> datetime | None:
    if not grant.HasField("expires_at"):
        return None
    return grant.expires_at.ToDatetime(tzinfo=UTC)


async def grants(coffer: Client, wallet_id: int, include_spent: bool = False) -> list[Grant]:
    return [
        grant
        async for grant in coffer.iter_grants(wallet_id=wallet_id, include_spent=include_spent)
    ]


async def past(moment: datetime) -> None:
    """Waits until the clock is past `moment`."""
    async with asyncio.timeout(expiry_wait_s_max):
        while datetime.now(UTC) <= moment:
            await asyncio.sleep(0.05)


async def test_spending_draws_the_soonest_expiry_first_and_says_so(coffer: Client) -> None:
    """Money paid in never expires; a goodwill credit of 30 days does: a debit draws it first,
    then the untracked balance; the debit's answer, its replay, GetTransfer and ListTransfers
    say alike which grant it drew from."""
    alice = await wallet(coffer)
    deposit = await coffer.deposit(wallet_id=alice, amount=5000, funding_source="card:4242")
    assert list(deposit.allocations) == []
    assert await grants(coffer, alice) == []
    goodwill_expiry = (datetime.now(UTC) + 30 * day).replace(microsecond=0)
    goodwill = await coffer.credit(
        wallet_id=alice, amount=2000, expires_at=goodwill_expiry, note="goodwill"
    )
    [grant] = await grants(coffer, alice)
    assert (grant.wallet_id, grant.unit, grant.unit_scale, grant.transfer_id) == (
        alice,
        "EUR",
        2,
        goodwill.id,
    )
    assert (grant.amount, grant.remaining, grant.expired) == (2000, 2000, 0)
    assert expires(grant) == goodwill_expiry
    assert grant.valid_from.ToDatetime(tzinfo=UTC) <= datetime.now(UTC)

    debited = await coffer.debit(wallet_id=alice, amount=2500, idempotency_key="booking-1")
    assert allocations(debited.transfer) == [(grant.id, -2000)]
    again = await coffer.debit(wallet_id=alice, amount=2500, idempotency_key="booking-1")
    assert again.transfer == debited.transfer
    assert await coffer.get_transfer(transfer_id=debited.transfer.id) == debited.transfer
    listed = (await coffer.list_transfers(wallet_id=alice)).items
    assert [(each.id, allocations(each)) for each in listed] == [
        (debited.transfer.id, [(grant.id, -2000)]),
        (goodwill.id, []),
        (deposit.id, []),
    ]
    assert await grants(coffer, alice) == []
    [spent] = await grants(coffer, alice, include_spent=True)
    assert (spent.id, spent.remaining) == (grant.id, 0)
    balance = (await coffer.get_balance(wallet_id=alice)).balance
    assert (balance.posted, balance.available, balance.unspendable) == (4500, 4500, 0)


async def test_terms_of_credits_and_deposits(coffer: Client) -> None:
    """A start to come holds the funds unspendable until then; a unit's default validity dates
    the credits that name no expiry; a deposit names its own terms; bad terms are refused,
    naming the field."""
    now = datetime.now(UTC)
    sessions = await wallet(coffer, "session")
    pack = await coffer.credit(wallet_id=sessions, amount=500)
    [grant] = await grants(coffer, sessions)
    assert grant.transfer_id == pack.id
    # P6M from now, give or take the call's time.
    expiry = expires(grant)
    assert expiry is not None and now + 180 * day < expiry < now + 185 * day

    alice = await wallet(coffer)
    start = (now + 10 * day).replace(microsecond=0)
    await coffer.deposit(
        wallet_id=alice,
        amount=300,
        funding_source="iban:1",
        valid_from=start,
        expires_at=start + 30 * day,
    )
    [later] = await grants(coffer, alice)
    assert later.valid_from.ToDatetime(tzinfo=UTC) == start
    assert expires(later) == start + 30 * day
    balance = (await coffer.get_balance(wallet_id=alice)).balance
    assert (balance.posted, balance.unspendable, balance.available) == (300, 300, 0)
    with pytest.raises(errors.InsufficientFunds):
        await coffer.debit(wallet_id=alice, amount=1)

    for terms, field in (
        ({"expires_at": now - day}, "expires_at"),
        ({"valid_from": start, "expires_at": start}, "expires_at"),
        ({"valid_from": start, "expires_at": start - day}, "expires_at"),
    ):
        with pytest.raises(errors.InvalidArgument) as raised:
            await coffer.credit(wallet_id=alice, amount=1, **terms)
        assert raised.value.field == field, terms
        with pytest.raises(errors.InvalidArgument) as raised:
            await coffer.deposit(wallet_id=alice, amount=1, funding_source="iban:1", **terms)
        assert raised.value.field == field, terms
    with pytest.raises(ValueError, match="timezone-aware"):
        await coffer.credit(wallet_id=alice, amount=1, expires_at=datetime(2030, 1, 1))


async def test_a_transfer_carries_the_expiries_it_moves(coffer: Client) -> None:
    alice, bob = await wallet(coffer, "session"), await wallet(coffer, "session")
    await coffer.credit(wallet_id=alice, amount=100)
    [grant] = await grants(coffer, alice)
    moved = await coffer.transfer(source_wallet_id=alice, target_wallet_id=bob, amount=40)
    assert allocations(moved) == [(grant.id, -40)]
    [carried] = await grants(coffer, bob)
    assert (carried.amount, carried.transfer_id, expires(carried)) == (
        40,
        moved.id,
        expires(grant),
    )


async def test_a_batch_answers_with_the_grants_real_ids(coffer: Client) -> None:
    """A credit and a debit of one batch: the debit draws from the grant the credit made, and
    its answer names it by the id the grant got, as reads and replays do."""
    alice = await wallet(coffer)
    expiry = datetime.now(UTC) + day
    batch = [
        operations.credit(wallet_id=alice, amount=100, expires_at=expiry, idempotency_key="c"),
        operations.debit(wallet_id=alice, amount=30, idempotency_key="d"),
    ]
    results = await coffer.submit_batch(batch)
    [grant] = await grants(coffer, alice)
    [debit] = results[1].transfers
    assert allocations(debit) == [(grant.id, -30)]
    replayed = await coffer.submit_batch(batch)
    assert [result.transfers for result in replayed] == [result.transfers for result in results]
    assert await coffer.get_transfer(transfer_id=debit.id) == debit


async def test_future_balance(coffer: Client) -> None:
    alice = await wallet(coffer)
    now = datetime.now(UTC)
    await coffer.deposit(wallet_id=alice, amount=1000, funding_source="iban:1")
    await coffer.credit(wallet_id=alice, amount=200, expires_at=now + 5 * day)
    await coffer.credit(wallet_id=alice, amount=50, valid_from=now + 3 * day)
    soon = await coffer.future_balance(wallet_id=alice, at=now + day)
    assert (soon.wallet_id, soon.unit, soon.balance.unit_scale) == (alice, "EUR", 2)
    assert (soon.balance.posted, soon.balance.unspendable, soon.balance.available) == (
        1250,
        50,
        1200,
    )
    later = (await coffer.future_balance(wallet_id=alice, at=now + 10 * day)).balance
    assert (later.posted, later.unspendable, later.available) == (1050, 0, 1050)
    with pytest.raises(errors.InvalidArgument) as raised:
        await coffer.future_balance(wallet_id=alice, at=now - day)
    assert raised.value.field == "time"
    with pytest.raises(errors.WalletNotFound):
        await coffer.future_balance(wallet_id=9_000_000, at=now + day)


async def test_expiration_runs_and_the_void_of_an_expiration(coffer: Client) -> None:
    """Past its expiry a grant's remainder is unspendable; a run moves it to the unit's
    expired-credits wallet (made then) as an EXPIRATION transfer, once; the void of the
    expiration restores it with the new expiry it names."""
    alice = await wallet(coffer)
    await coffer.deposit(wallet_id=alice, amount=100, funding_source="iban:1")
    expiry = datetime.now(UTC) + timedelta(seconds=1)
    await coffer.credit(wallet_id=alice, amount=70, expires_at=expiry)
    [grant] = await grants(coffer, alice)
    await coffer.debit(wallet_id=alice, amount=20)
    await past(expiry)
    balance = (await coffer.get_balance(wallet_id=alice)).balance
    assert (balance.posted, balance.unspendable, balance.available) == (150, 50, 100)

    assert await coffer.run_expiration() == 1
    assert await coffer.run_expiration() == 0
    [expiration] = (await coffer.list_transfers(wallet_id=alice, kinds=["expiration"])).items
    assert (expiration.kind, expiration.amount, allocations(expiration)) == (
        types_pb2.TRANSFER_KIND_EXPIRATION,
        50,
        [(grant.id, -50)],
    )
    assert expiration.source_wallet_id == alice
    expired = await coffer.get_wallet(wallet_id=expiration.target_wallet_id)
    assert (expired.owner_kind, expired.owner_id, expired.unit) == (
        types_pb2.OWNER_KIND_SYSTEM,
        "expired",
        "EUR",
    )
    assert expired.balance.posted == 50
    [spent] = await grants(coffer, alice, include_spent=True)
    assert (spent.remaining, spent.expired) == (0, 50)
    balance = (await coffer.get_balance(wallet_id=alice)).balance
    assert (balance.posted, balance.unspendable, balance.available) == (100, 0, 100)

    with pytest.raises(errors.InvalidArgument) as raised:
        await coffer.void(transfer_id=expiration.id)
    assert raised.value.field == "expires_at"
    with pytest.raises(errors.InvalidArgument) as raised:
        await coffer.void(transfer_id=expiration.id, expires_at=datetime.now(UTC) - day)
    assert raised.value.field == "expires_at"
    new_expiry = (datetime.now(UTC) + 7 * day).replace(microsecond=0)
    restored = await coffer.void(transfer_id=expiration.id, expires_at=new_expiry)
    assert allocations(restored) == [(grant.id, 50)]
    [grant_again] = await grants(coffer, alice)
    assert (grant_again.remaining, expires(grant_again)) == (50, new_expiry)
    assert (await coffer.get_balance(wallet_id=alice)).balance.available == 150
    # Any other void names no expiry.
    with pytest.raises(errors.InvalidArgument) as raised:
        await coffer.void(transfer_id=grant.transfer_id, expires_at=new_expiry)
    assert raised.value.field == "expires_at"


async def test_a_void_of_a_credit_whose_grant_was_spent(coffer: Client) -> None:
    """The void takes back what is left of the grant, and for what was spent the wallet's
    other funds; without them it is refused with GRANT_SPENT."""
    alice = await wallet(coffer)
    credited = await coffer.credit(wallet_id=alice, amount=100, expires_at=datetime.now(UTC) + day)
    [grant] = await grants(coffer, alice)
    await coffer.debit(wallet_id=alice, amount=60)
    with pytest.raises(errors.GrantSpent) as raised:
        await coffer.void(transfer_id=credited.id)
    assert raised.value.reason == "GRANT_SPENT"
    await coffer.deposit(wallet_id=alice, amount=60, funding_source="iban:1")
    voided = await coffer.void(transfer_id=credited.id)
    assert allocations(voided) == [(grant.id, -40)]
    balance = (await coffer.get_balance(wallet_id=alice)).balance
    assert (balance.posted, balance.available) == (0, 0)


async def test_a_capture_after_a_reserved_grant_expired(coffer: Client) -> None:
    """A hold reserved from a grant that expires before the capture: the capture takes what
    is still valid, releases the rest, and says what was asked."""
    alice = await wallet(coffer)
    await coffer.deposit(wallet_id=alice, amount=30, funding_source="iban:1")
    expiry = datetime.now(UTC) + timedelta(seconds=1)
    await coffer.credit(wallet_id=alice, amount=70, expires_at=expiry)
    [grant] = await grants(coffer, alice)
    placed = await coffer.place_hold(wallet_id=alice, amount=100)
    assert allocations(placed.transfer) == [(grant.id, -70)]
    await past(expiry)
    captured = await coffer.capture_hold(hold_id=placed.hold.id)
    assert (captured.transfer.amount, captured.transfer.amount_requested) == (30, 100)
    assert allocations(captured.transfer) == [(grant.id, 70)]
    assert (captured.hold.status, captured.hold.amount_captured) == (
        types_pb2.HOLD_STATUS_CAPTURED,
        30,
    )
    balance = (await coffer.get_balance(wallet_id=alice)).balance
    assert (balance.posted, balance.pending, balance.unspendable) == (70, 0, 70)


async def test_list_grants_pages_and_refuses_other_tokens(coffer: Client) -> None:
    alice, bob = await wallet(coffer, "session"), await wallet(coffer, "session")
    for amount in (1, 2, 3):
        await coffer.credit(wallet_id=alice, amount=amount)
    await coffer.credit(wallet_id=bob, amount=9)
    first = await coffer.list_grants(wallet_id=alice, page_size=2)
    assert [grant.amount for grant in first.items] == [1, 2] and first.next_page_token
    rest = await coffer.list_grants(wallet_id=alice, page_token=first.next_page_token)
    assert [grant.amount for grant in rest.items] == [3] and not rest.next_page_token
    for other in (
        {"wallet_id": bob, "page_token": first.next_page_token},
        {"wallet_id": alice, "include_spent": True, "page_token": first.next_page_token},
        {"wallet_id": alice, "page_token": "nonsense"},
    ):
        with pytest.raises(errors.InvalidArgument) as raised:
            await coffer.list_grants(**other)
        assert raised.value.field == "page_token", other
    for bad in ({"page_size": -1}, {"page_size": 1001}):
        with pytest.raises(errors.InvalidArgument) as raised:
            await coffer.list_grants(wallet_id=alice, **bad)
        assert raised.value.field == "page_size"
    with pytest.raises(errors.InvalidArgument) as raised:
        await coffer.list_grants(wallet_id=0)
    assert raised.value.field == "wallet_id"
    with pytest.raises(errors.WalletNotFound):
        await coffer.list_grants(wallet_id=9_000_000)


async def test_owners_read_their_own_grants_alone(server: Server, coffer: Client) -> None:
    alice = (await coffer.create_wallet(owner_id="alice", owner_kind="customer", unit="EUR")).id
    bob = (await coffer.create_wallet(owner_id="bob", owner_kind="customer", unit="EUR")).id
    for wallet_id in (alice, bob):
        await coffer.credit(wallet_id=wallet_id, amount=10, expires_at=datetime.now(UTC) + day)
    token, _ = await server.gate.access.create_key(
        name="alice-app",
        role=Role.customer,
        owner_id="alice",
        expires_at=None,
        created_by="tests",
        actor="tests",
    )
    server.gate.credentials_made()
    later = datetime.now(UTC) + 2 * day
    async with Client(f"127.0.0.1:{server.port}", api_key=token, retries_max=0) as customer:
        assert [grant.wallet_id for grant in await grants(customer, alice)] == [alice]
        assert (await customer.future_balance(wallet_id=alice, at=later)).balance.posted == 0
        for wallet_id in (bob, 9_000_000):
            for call in (
                customer.list_grants(wallet_id=wallet_id),
                customer.future_balance(wallet_id=wallet_id, at=later),
            ):
                with pytest.raises(errors.WalletNotFound) as raised:
                    await call
                assert raised.value.message == f"wallet {wallet_id} does not exist"
        with pytest.raises(errors.PermissionDenied, match="RunExpiration"):
            await customer.run_expiration()


async def test_the_events_of_grants(server: Server, coffer: Client) -> None:
    """GRANT_CREATED carries the grant as made; GRANT_EXPIRED the expiration transfer;
    GRANT_EXPIRING_SOON, once per grant, the grant as it then was."""
    alice = await wallet(coffer, "session")
    expiry = datetime.now(UTC) + timedelta(seconds=1)
    credited = await coffer.credit(wallet_id=alice, amount=40, expires_at=expiry)
    await coffer.credit(wallet_id=alice, amount=60, expires_at=datetime.now(UTC) + 2 * day)
    assert await server.ledger.announce_expiring_grants(3 * day) == 2
    assert await server.ledger.announce_expiring_grants(3 * day) == 0
    await past(expiry)
    assert await coffer.run_expiration() == 1
    types: Any = ["grant_created", "grant_expiring_soon", "grant_expired"]
    events = (await coffer.list_events(types=types, wallet_ids=[alice])).events
    assert [(event.type, event.WhichOneof("body")) for event in events] == [
        (events_pb2.EVENT_TYPE_GRANT_CREATED, "grant"),
        (events_pb2.EVENT_TYPE_GRANT_CREATED, "grant"),
        (events_pb2.EVENT_TYPE_GRANT_EXPIRING_SOON, "grant"),
        (events_pb2.EVENT_TYPE_GRANT_EXPIRING_SOON, "grant"),
        (events_pb2.EVENT_TYPE_GRANT_EXPIRED, "transfer"),
    ]
    made = events[0].grant
    assert (made.transfer_id, made.amount, made.unit, made.unit_scale) == (
        credited.id,
        40,
        "session",
        2,
    )
    assert events[0].actor == "grants-tests"
    assert {event.actor for event in events[2:]} == {"@coffer"}
    assert events[4].transfer.transfer.kind == types_pb2.TRANSFER_KIND_EXPIRATION


async def test_the_server_runs_expirations_and_notices_by_itself(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = await Server.start(
        Settings(
            database_url=database_url,
            listen="127.0.0.1:0",
            expiration_interval_s=0.1,
            expiry_notice_days=2,
        )
    )
    try:
        async with Client(f"127.0.0.1:{server.port}") as coffer:
            await coffer.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
            alice = await wallet(coffer)
            expiry = datetime.now(UTC) + timedelta(seconds=1)
            with caplog.at_level(logging.INFO, logger="coffer.server.app"):
                await coffer.credit(wallet_id=alice, amount=40, expires_at=expiry)
                await coffer.credit(wallet_id=alice, amount=5, expires_at=expiry + day)
                await coffer.credit(wallet_id=alice, amount=7, expires_at=expiry + 5 * day)
                async with asyncio.timeout(expiry_wait_s_max):
                    while (await coffer.get_wallet(wallet_id=alice)).balance.posted != 12:
                        await asyncio.sleep(0.1)
            kinds: Any = ["grant_expiring_soon"]
            noticed = (await coffer.list_events(types=kinds)).events
            assert sorted(event.grant.amount for event in noticed) == [5, 40]
            assert any("expiration run: expired 1," in record.message for record in caplog.records)
    finally:
        await server.stop()


async def test_expiration_runs_can_be_off(database_url: str) -> None:
    server = await Server.start(
        Settings(database_url=database_url, listen="127.0.0.1:0", expiration_interval_s=0)
    )
    try:
        assert server.settings.expiration_interval_s == 0
        await asyncio.sleep(0.2)
        # Nothing runs: the task ended at once.
        assert server._expiration.done()
    finally:
        await server.stop()
