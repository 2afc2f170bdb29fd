"""The reports through the real server, with the typed client: the usage register (filters,
pages, tokens), the outstanding overview, past balances, the balance after each history entry;
each as every role sees it (merchants and customers their own alone); and bad input refused
as INVALID_ARGUMENT naming its field."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from coffer.clients import Client, errors
from coffer.core.model import Role
from coffer.server.app import Server
from coffer.v1 import reports_pb2, types_pb2

_keys = itertools.count(1)


def key() -> str:
    return f"reports-api-{next(_keys)}"


def stamp(transfer: types_pb2.Transfer) -> datetime:
    return transfer.create_time.ToDatetime(tzinfo=UTC)


@dataclass
class Ledger:
    """What the setup made: wallets by name, and transfers by name."""

    wallets: dict[str, int]
    transfers: dict[str, types_pb2.Transfer]


async def setup(coffer: Client) -> Ledger:
    """Two units: seats, whose credits expire after 30 days (so they are grants), and euros;
    customers ann and bob, the merchant shop; debits, a payment, a capture, a void."""
    await coffer.create_unit(
        code="seat", kind="credit", name="Seat", scale=0, default_validity="P30D"
    )
    await coffer.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
    wallets = {}
    for name, owner, kind, unit in (
        ("ann", "ann", "customer", "seat"),
        ("bob", "bob", "customer", "seat"),
        ("shop", "shop", "merchant", "seat"),
        ("ann-eur", "ann", "customer", "EUR"),
    ):
        created = await coffer.create_wallet(owner_id=owner, owner_kind=kind, unit=unit)
        wallets[name] = created.id
    done = {}
    done["ann-credit"] = await coffer.credit(wallet_id=wallets["ann"], amount=10)
    await coffer.credit(wallet_id=wallets["bob"], amount=5)
    await coffer.deposit(wallet_id=wallets["ann-eur"], amount=5000, funding_source="iban:1")
    done["ann-debit"] = (
        await coffer.debit(
            wallet_id=wallets["ann"], amount=4, performed_by="coach:bo", reference="r-1"
        )
    ).transfer
    done["bob-pays"] = await coffer.pay(
        payer_wallet_id=wallets["bob"], payee_wallet_id=wallets["shop"], amount=3
    )
    held = await coffer.place_hold(wallet_id=wallets["ann"], amount=2)
    done["ann-capture"] = (await coffer.capture_hold(hold_id=held.hold.id)).transfer
    done["eur-debit"] = (
        await coffer.debit(wallet_id=wallets["ann-eur"], amount=1200, reference="r-1")
    ).transfer
    done["bob-debit"] = (await coffer.debit(wallet_id=wallets["bob"], amount=1)).transfer
    done["void"] = await coffer.void(transfer_id=done["bob-debit"].id)
    return Ledger(wallets, done)


def ids(entries: list[reports_pb2.UsageEntry]) -> list[int]:
    return [entry.transfer.id for entry in entries]


async def every_entry(coffer: Client, page_size: int, **filters: Any) -> list[int]:
    found: list[int] = []
    token = ""
    while True:
        page = await coffer.list_usage(page_size=page_size, page_token=token, **filters)
        found.extend(ids(page.items))
        token = page.next_page_token
        if not token:
            return found


async def test_the_usage_register(server: Server) -> None:
    async with Client(f"127.0.0.1:{server.port}") as coffer:
        made = await setup(coffer)
        wallets, done = made.wallets, made.transfers
        every = (await coffer.list_usage()).items
        assert ids(every) == [
            done[name].id
            for name in ("bob-debit", "eur-debit", "ann-capture", "bob-pays", "ann-debit")
        ]
        entry = {entry.transfer.id: entry for entry in every}
        debit = entry[done["ann-debit"].id]
        # The seats came as a grant (the unit's validity): the debit drew from it alone.
        assert [(each.amount, each.HasField("expires_at")) for each in debit.drawn] == [(4, True)]
        assert debit.untracked == 0
        assert (debit.transfer.performed_by, debit.transfer.reference) == ("coach:bo", "r-1")
        assert debit.transfer.unit == "seat" and debit.transfer.unit_scale == 0
        assert [each.amount for each in entry[done["ann-capture"].id].drawn] == [2]
        assert [each.amount for each in entry[done["bob-pays"].id].drawn] == [3]
        euros = entry[done["eur-debit"].id]
        assert (euros.drawn, euros.untracked, euros.transfer.unit_scale) == ([], 1200, 2)
        assert entry[done["bob-debit"].id].transfer.voided_by_transfer_id == done["void"].id
        # Filters, each through its pages.
        for filters, expected in (
            ({"wallet_id": wallets["ann"]}, ["ann-capture", "ann-debit"]),
            ({"owner_id": "ann"}, ["eur-debit", "ann-capture", "ann-debit"]),
            ({"owner_id": "ann", "unit": "seat"}, ["ann-capture", "ann-debit"]),
            ({"unit": "EUR"}, ["eur-debit"]),
            ({"performed_by": "coach:bo"}, ["ann-debit"]),
            ({"reference": "r-1"}, ["eur-debit", "ann-debit"]),
            (
                {"start_time": stamp(done["bob-pays"]), "end_time": stamp(done["eur-debit"])},
                ["ann-capture", "bob-pays"],
            ),
            ({"owner_id": "nobody"}, []),
        ):
            want = [done[name].id for name in expected]
            for page_size in (1, 2, 100):
                assert await every_entry(coffer, page_size, **filters) == want, filters
        # A token goes on with the filters it was made for only.
        first = await coffer.list_usage(page_size=1, owner_id="ann")
        with pytest.raises(errors.InvalidArgument) as raised:
            await coffer.list_usage(page_size=1, owner_id="bob", page_token=first.next_page_token)
        assert raised.value.field == "page_token"
        assert [each.transfer.id async for each in coffer.iter_usage(owner_id="ann")] == ids(
            [
                each
                for each in every
                if each.transfer.source_wallet_id in (wallets["ann"], wallets["ann-eur"])
            ]
        )


async def test_the_outstanding_overview(server: Server) -> None:
    async with Client(f"127.0.0.1:{server.port}") as coffer:
        made = await setup(coffer)
        wallets = made.wallets
        before = datetime.now(UTC)
        seats = await coffer.outstanding("seat")
        assert seats.unit == "seat" and seats.unit_scale == 0
        assert seats.expiring_before.ToDatetime(tzinfo=UTC) >= before + timedelta(days=30)
        assert [
            (each.wallet_id, each.owner_id, each.owner_kind, each.posted, each.available)
            for each in seats.wallets
        ] == [
            (wallets["ann"], "ann", types_pb2.OWNER_KIND_CUSTOMER, 4, 4),
            (wallets["bob"], "bob", types_pb2.OWNER_KIND_CUSTOMER, 2, 2),
            (wallets["shop"], "shop", types_pb2.OWNER_KIND_MERCHANT, 3, 3),
        ]
        # Within 30 days: each customer's seats came from a credit that expires then; the
        # shop's from a payment, which makes no grant.
        assert [each.expiring for each in seats.wallets] == [4, 2, 0]
        assert (seats.totals.wallets, seats.totals.outstanding, seats.totals.expiring) == (
            3,
            9,
            6,
        )
        assert not seats.next_page_token
        soon = await coffer.outstanding("seat", expiring_within_days=1)
        assert [each.expiring for each in soon.wallets] == [0, 0, 0]
        assert soon.totals.expiring == 0
        # Paged: the totals with the first page alone.
        first = await coffer.outstanding("seat", page_size=2)
        assert [each.wallet_id for each in first.wallets] == [wallets["ann"], wallets["bob"]]
        assert first.HasField("totals") and first.next_page_token
        second = await coffer.outstanding("seat", page_size=2, page_token=first.next_page_token)
        assert [each.wallet_id for each in second.wallets] == [wallets["shop"]]
        assert not second.HasField("totals") and not second.next_page_token
        with pytest.raises(errors.InvalidArgument) as raised:
            await coffer.outstanding(
                "seat", expiring_within_days=1, page_size=2, page_token=first.next_page_token
            )
        assert raised.value.field == "page_token"
        euros = await coffer.outstanding("EUR")
        assert [(each.posted, each.expiring) for each in euros.wallets] == [(3800, 0)]
        assert euros.unit_scale == 2
        with pytest.raises(errors.UnitNotFound):
            await coffer.outstanding("nothing")


async def test_past_balances_and_the_balance_after_each_entry(server: Server) -> None:
    async with Client(f"127.0.0.1:{server.port}") as coffer:
        made = await setup(coffer)
        ann, done = made.wallets["ann"], made.transfers
        credited = stamp(done["ann-credit"])
        past = await coffer.past_balance(ann, credited)
        assert (past.wallet_id, past.unit, past.posted, past.pending) == (ann, "seat", 10, 0)
        assert past.time.ToDatetime(tzinfo=UTC) == credited
        assert (await coffer.past_balance(ann, credited - timedelta(microseconds=1))).posted == 0
        assert (await coffer.past_balance(ann, stamp(done["ann-debit"]))).posted == 6
        # Held, then captured: pending between the two.
        captured = stamp(done["ann-capture"])
        before_capture = await coffer.past_balance(ann, captured - timedelta(microseconds=1))
        assert (before_capture.posted, before_capture.pending) == (6, 2)
        after_capture = await coffer.past_balance(ann, captured)
        assert (after_capture.posted, after_capture.pending) == (4, 0)
        # The first instant a time can name: nothing yet.
        origin = await coffer.past_balance(ann, datetime(1, 1, 1, tzinfo=UTC))
        assert (origin.posted, origin.pending) == (0, 0)
        # A wallet's history: each entry with the balance after it, signed as it saw it.
        history = (await coffer.list_transfers(wallet_id=ann)).items
        assert [(each.kind, each.signed_amount, each.balance_after) for each in history] == [
            (types_pb2.TRANSFER_KIND_CAPTURE, -2, 4),
            (types_pb2.TRANSFER_KIND_HOLD, 0, 6),
            (types_pb2.TRANSFER_KIND_DEBIT, -4, 6),
            (types_pb2.TRANSFER_KIND_CREDIT, 10, 10),
        ]
        debits = (await coffer.list_transfers(wallet_id=ann, kinds=["debit"])).items
        assert [(each.balance_after, each.signed_amount) for each in debits] == [(6, -4)]
        shop = made.wallets["shop"]
        [paid] = (await coffer.list_transfers(wallet_id=shop)).items
        assert (paid.signed_amount, paid.balance_after) == (3, 3)
        # Without a wallet, neither.
        for each in (await coffer.list_transfers()).items:
            assert not each.HasField("balance_after") and not each.HasField("signed_amount")
        assert not (await coffer.get_transfer(transfer_id=paid.id)).HasField("balance_after")


async def refused(call: Awaitable[Any]) -> errors.InvalidArgument:
    with pytest.raises(errors.InvalidArgument) as raised:
        await call
    assert raised.value.reason == "INVALID_ARGUMENT"
    return raised.value


async def test_bad_input_is_invalid_argument_naming_its_field(server: Server) -> None:
    async with Client(f"127.0.0.1:{server.port}", retries_max=0) as coffer:
        made = await setup(coffer)
        ann = made.wallets["ann"]
        now = datetime.now(UTC)
        for call, field in (
            (coffer.list_usage(wallet_id=-1), "filter.wallet_id"),
            (coffer.list_usage(owner_id="o" * 257), "filter.owner_id"),
            (coffer.list_usage(unit="not a code"), "filter.unit"),
            (coffer.list_usage(performed_by="p" * 257), "filter.performed_by"),
            (coffer.list_usage(reference="r" * 257), "filter.reference"),
            (coffer.list_usage(start_time=now, end_time=now - timedelta(1)), "filter.end_time"),
            (coffer.list_usage(page_size=1001), "page_size"),
            (coffer.list_usage(page_size=-1), "page_size"),
            (coffer.list_usage(page_token="nonsense"), "page_token"),
            (coffer.outstanding(""), "unit"),
            (coffer.outstanding("not a code"), "unit"),
            (coffer.outstanding("seat", expiring_within_days=-1), "expiring_within_days"),
            (coffer.outstanding("seat", expiring_within_days=36_501), "expiring_within_days"),
            (coffer.outstanding("seat", page_size=1001), "page_size"),
            (coffer.outstanding("seat", page_token="nonsense"), "page_token"),
            (coffer.past_balance(0, now), "wallet_id"),
            (coffer.past_balance(ann, now + timedelta(hours=1)), "time"),
        ):
            assert (await refused(call)).field == field
        with pytest.raises(errors.InvalidArgument) as raised:
            await coffer._call(
                lambda stubs: stubs.reports.GetPastBalance,
                reports_pb2.GetPastBalanceRequest(wallet_id=ann),
            )
        assert raised.value.field == "time"
        with pytest.raises(errors.WalletNotFound):
            await coffer.past_balance(9_000_000, now)


async def make_key(server: Server, role: Role, owner_id: str | None = None) -> str:
    token, _ = await server.gate.access.create_key(
        name=role.name,
        role=role,
        owner_id=owner_id,
        expires_at=None,
        created_by="tests",
        actor="tests",
    )
    return token


async def test_each_role_reads_what_it_may(server: Server) -> None:
    """Administrators, managers and services read every report; a customer or a merchant, the
    usage and past balances of its own wallets alone (another owner's wallet is missing to it),
    and not the outstanding overview."""
    target = f"127.0.0.1:{server.port}"
    admin = await make_key(server, Role.admin)
    async with Client(target, api_key=admin) as coffer:
        made = await setup(coffer)
        everything = ids((await coffer.list_usage()).items)
    wallets, done = made.wallets, made.transfers
    now = datetime.now(UTC)
    for role in (Role.manager, Role.service):
        async with Client(target, api_key=await make_key(server, role)) as staff:
            assert ids((await staff.list_usage()).items) == everything
            assert (await staff.outstanding("seat")).totals.wallets == 3
            assert (await staff.past_balance(wallets["bob"], now)).posted == 2
    customer = await make_key(server, Role.customer, "ann")
    async with Client(target, api_key=customer, retries_max=0) as ann:
        own = [done[name].id for name in ("eur-debit", "ann-capture", "ann-debit")]
        assert ids((await ann.list_usage()).items) == own
        assert ids((await ann.list_usage(owner_id="ann", unit="EUR")).items) == own[:1]
        assert (await ann.list_usage(owner_id="bob")).items == []
        assert (await ann.list_usage(wallet_id=wallets["bob"])).items == []
        assert (await ann.past_balance(wallets["ann"], now)).posted == 4
        for wallet_id in (wallets["bob"], 9_000_000):
            with pytest.raises(errors.WalletNotFound) as raised:
                await ann.past_balance(wallet_id, now)
            assert raised.value.message == f"wallet {wallet_id} does not exist"
        with pytest.raises(errors.PermissionDenied) as denied:
            await ann.outstanding("seat")
        assert "GetOutstanding" in denied.value.message
    merchant = await make_key(server, Role.merchant, "shop")
    async with Client(target, api_key=merchant, retries_max=0) as shop:
        # The shop spent nothing: the payment is bob's consumption, not the shop's.
        assert (await shop.list_usage()).items == []
        assert (await shop.past_balance(wallets["shop"], now)).posted == 3
        with pytest.raises(errors.WalletNotFound):
            await shop.past_balance(wallets["ann"], now)
        with pytest.raises(errors.PermissionDenied):
            await shop.outstanding("seat")
