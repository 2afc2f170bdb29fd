"""The pure validation of the ledger, without a database.

- Unit tests of `rules.apply`: each operation kind, each error it raises, up-to and
  all-or-nothing debits, and that a failed operation leaves the book as it was.
- Unit tests of `rules.apply_all`: linked chains applied all or nothing, a chain left open at
  the end of a batch, `settled` entries (replays and pre-failed ones) and `Rejected` entries.
- A stateful property test: random operations and batches against an independent model made
  of plain dicts, with the ledger's invariants checked after every step.
- A fuzz test of the operations' constructors: built, or InvalidArgument naming a field.

The book is built by hand, as the ledger's batch (`coffer.core.store.batch`) builds it from the
locked rows: two units, each with its system wallets (operator, funding; no floor), customers
and merchants with floors of 0 or an overdraft, and cancelled wallets. Transfers and holds that
operations produce are given ids and added to the book the way the ledger adds them when it
writes.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from coffer.core import errors, model, rules
from coffer.core.model import (
    CaptureHold,
    Credit,
    Debit,
    DebitMode,
    Deposit,
    ExpireGrant,
    ExpireHold,
    Operation,
    OwnerKind,
    Payment,
    PlaceHold,
    Rejected,
    ReleaseHold,
    SystemWallet,
    TransferKind,
    Void,
    WalletStatus,
    WalletTransfer,
    Withdrawal,
    amount_max,
    balance_max,
    balance_min,
)
from coffer.core.rules import Book, GrantState, HoldState, Posting, TransferState, WalletState

now = datetime(2025, 1, 1, 12, tzinfo=UTC)

# Wallet ids. EUR:
eur_operator = 1
eur_funding = 2
eur_expired = 3
alice = 10  # customer, floor 0
bob = 11  # customer, overdraft of 500
carol = 12  # customer, no practical floor (balance_min)
shop = 13  # merchant, floor 0
kiosk = 14  # merchant, overdraft of 100
closed_customer = 15
closed_merchant = 16
dan = 17  # customer, no practical floor either
# PTS:
pts_operator = 21
pts_funding = 22
pts_expired = 23
dave = 30  # customer, floor 0
erin = 31  # customer, overdraft of 50
stall = 33  # merchant, floor 0
missing = 999

active = WalletStatus.active
cancelled = WalletStatus.cancelled
customer = OwnerKind.customer
merchant = OwnerKind.merchant
system = OwnerKind.system

# id, unit, owner kind, status, balance minimum, posted. Each unit's posted sums to 0.
wallet_rows: tuple[tuple[int, str, OwnerKind, WalletStatus, int | None, int], ...] = (
    (eur_operator, "EUR", system, active, None, -1300),
    (eur_funding, "EUR", system, active, None, -200),
    (eur_expired, "EUR", system, active, None, 0),
    (alice, "EUR", customer, active, 0, 1000),
    (bob, "EUR", customer, active, -500, 200),
    (carol, "EUR", customer, active, balance_min, 0),
    (shop, "EUR", merchant, active, 0, 300),
    (kiosk, "EUR", merchant, active, -100, 0),
    (closed_customer, "EUR", customer, cancelled, 0, 0),
    (closed_merchant, "EUR", merchant, cancelled, 0, 0),
    (dan, "EUR", customer, active, balance_min, 0),
    (pts_operator, "PTS", system, active, None, 0),
    (pts_funding, "PTS", system, active, None, -100),
    (pts_expired, "PTS", system, active, None, 0),
    (dave, "PTS", customer, active, 0, 100),
    (erin, "PTS", customer, active, -50, 0),
    (stall, "PTS", merchant, active, 0, 0),
)
system_rows = {
    ("EUR", SystemWallet.operator): eur_operator,
    ("EUR", SystemWallet.funding): eur_funding,
    ("EUR", SystemWallet.expired): eur_expired,
    ("PTS", SystemWallet.operator): pts_operator,
    ("PTS", SystemWallet.funding): pts_funding,
    ("PTS", SystemWallet.expired): pts_expired,
}

# Earlier transfers, for voids: id, kind, source, target, amount.
history_rows: tuple[tuple[int, TransferKind, int, int, int], ...] = (
    (100, TransferKind.credit, eur_operator, alice, 300),
    (101, TransferKind.payment, bob, shop, 50),
    (102, TransferKind.void, shop, bob, 50),  # voids 101
    (103, TransferKind.hold, alice, eur_operator, 10),
    (104, TransferKind.release, alice, eur_operator, 10),
    (105, TransferKind.hold_expiry, alice, eur_operator, 10),
    (106, TransferKind.debit, alice, eur_operator, 20),
    (107, TransferKind.transfer, closed_customer, alice, 5),  # before it was cancelled
    (108, TransferKind.payment, erin, stall, 60),  # the stall has spent it since
    (109, TransferKind.withdrawal, shop, eur_funding, 40),
)
voided_rows = {101}

_keys = itertools.count(1)
_ids = itertools.count(1000)


def key() -> str:
    return f"key-{next(_keys)}"


def make_book(*, history: bool = False) -> Book:
    book = Book()
    for wallet_id, unit, owner_kind, status, minimum, posted in wallet_rows:
        book.wallets[wallet_id] = WalletState(
            id=wallet_id,
            unit=unit,
            owner_kind=owner_kind,
            status=status,
            balance_minimum=minimum,
            posted=posted,
            pending=0,
        )
    book.system_wallets = dict(system_rows)
    if history:
        for transfer_id, kind, source, target, amount in history_rows:
            book.transfers[transfer_id] = TransferState(transfer_id, kind, source, target, amount)
        book.voided.update(voided_rows)
    return book


@pytest.fixture
def book() -> Book:
    return make_book(history=True)


# Operations, briefly.


def credit(wallet_id: int, amount: int, *, linked: bool = False) -> Credit:
    return Credit(idempotency_key=key(), wallet_id=wallet_id, amount=amount, linked=linked)


def debit(
    wallet_id: int,
    amount: int,
    mode: DebitMode = DebitMode.all_or_nothing,
    *,
    linked: bool = False,
) -> Debit:
    return Debit(
        idempotency_key=key(), wallet_id=wallet_id, amount=amount, mode=mode, linked=linked
    )


def transfer(source: int, target: int, amount: int, *, linked: bool = False) -> WalletTransfer:
    return WalletTransfer(
        idempotency_key=key(),
        source_wallet_id=source,
        target_wallet_id=target,
        amount=amount,
        linked=linked,
    )


def deposit(wallet_id: int, amount: int, *, linked: bool = False) -> Deposit:
    return Deposit(
        idempotency_key=key(), wallet_id=wallet_id, amount=amount, reference="bank", linked=linked
    )


def withdrawal(wallet_id: int, amount: int, *, linked: bool = False) -> Withdrawal:
    return Withdrawal(
        idempotency_key=key(), wallet_id=wallet_id, amount=amount, reference="bank", linked=linked
    )


def payment(payer: int, payee: int, amount: int, *, linked: bool = False) -> Payment:
    return Payment(
        idempotency_key=key(),
        payer_wallet_id=payer,
        payee_wallet_id=payee,
        amount=amount,
        linked=linked,
    )


def void(transfer_id: int, *, linked: bool = False) -> Void:
    return Void(idempotency_key=key(), transfer_id=transfer_id, linked=linked)


def place_hold(
    wallet_id: int,
    amount: int,
    target: int | None = None,
    timeout_s: int = 600,
    *,
    linked: bool = False,
) -> PlaceHold:
    return PlaceHold(
        idempotency_key=key(),
        wallet_id=wallet_id,
        amount=amount,
        target_wallet_id=target,
        timeout_s=timeout_s,
        linked=linked,
    )


def capture(hold_id: int, amount: int | None = None, *, linked: bool = False) -> CaptureHold:
    return CaptureHold(idempotency_key=key(), hold_id=hold_id, amount=amount, linked=linked)


def release(hold_id: int, *, linked: bool = False) -> ReleaseHold:
    return ReleaseHold(idempotency_key=key(), hold_id=hold_id, linked=linked)


def expire(hold_id: int, *, linked: bool = False) -> ExpireHold:
    return ExpireHold(idempotency_key=key(), hold_id=hold_id, linked=linked)


def expire_grant(grant_id: int) -> ExpireGrant:
    return ExpireGrant(idempotency_key=key(), grant_id=grant_id)


def grant(book: Book, wallet_id: int = alice, amount: int = 100, *, days: int = -1) -> int:
    """Credits the wallet funds that expire `days` from now (by default, expired a day ago),
    through the rules: the grant's id."""
    wallet = book.wallets[wallet_id]
    expires_at = now + timedelta(days=days)
    if days < 0:
        # Credited when the expiry was still to come.
        [posting] = rules.apply(
            book,
            Credit(
                idempotency_key=key(),
                wallet_id=wallet_id,
                amount=amount,
                expires_at=expires_at,
            ),
            expires_at - timedelta(days=30),
        )
    else:
        [posting] = rules.apply(
            book,
            Credit(
                idempotency_key=key(), wallet_id=wallet_id, amount=amount, expires_at=expires_at
            ),
            now,
        )
    record(book, [posting])
    [made] = posting.new_grants
    assert made.wallet_id == wallet.id
    return made.id


def record(book: Book, postings: Iterable[Posting]) -> list[int]:
    """What the ledger does when it writes postings: gives each an id, keeps it as a transfer
    a void can name (with what it changed in grants and the grants it made), and keeps a
    hold's posting as an open hold."""
    ids = []
    for posting in postings:
        transfer_id = next(_ids)
        ids.append(transfer_id)
        # The grants it made get their ids, as the ledger gives them.
        given = {}
        for made in posting.new_grants:
            given[made.id] = next(_ids)
            del book.grants[made.id]
            made.id = given[made.id]
            book.grants[made.id] = made
            # Its id, part of the spending order: the wallet's queue is made anew, as a later
            # batch's book would.
            book.wallets[made.wallet_id].queue = None
        allocations = tuple(
            (given.get(grant_id, grant_id), change) for grant_id, change in posting.allocations
        )
        book.transfer_allocations[transfer_id] = list(allocations)
        book.transfer_grants[transfer_id] = [made.id for made in posting.new_grants]
        book.transfers[transfer_id] = TransferState(
            transfer_id,
            posting.kind,
            posting.source_wallet_id,
            posting.target_wallet_id,
            posting.amount,
        )
        if posting.kind == TransferKind.hold:
            assert posting.hold_expires_at is not None
            book.holds[transfer_id] = HoldState(
                transfer_id,
                posting.source_wallet_id,
                posting.target_wallet_id,
                posting.amount,
                posting.hold_expires_at,
                allocations=allocations,
            )
    return ids


def hold(
    book: Book,
    wallet_id: int = alice,
    amount: int = 100,
    target: int | None = None,
    *,
    timeout_s: int = 600,
    placed_at: datetime = now,
) -> int:
    """Places a hold through the rules and records it as the ledger would: its id."""
    [hold_id] = record(
        book, rules.apply(book, place_hold(wallet_id, amount, target, timeout_s), placed_at)
    )
    return hold_id


def resolved_hold(book: Book, resolve: Callable[[int], Operation], **options: Any) -> int:
    hold_id = hold(book, **options)
    record(book, rules.apply(book, resolve(hold_id), now))
    return hold_id


def balances(book: Book, *wallet_ids: int) -> list[tuple[int, int]]:
    return [(book.wallets[each].posted, book.wallets[each].pending) for each in wallet_ids]


def apply_failing(book: Book, operation: Operation, error: type[errors.CofferError]) -> None:
    before = copy.deepcopy(book)
    with pytest.raises(errors.CofferError) as caught:
        rules.apply(book, operation, now)
    assert type(caught.value) is error, caught.value
    assert caught.value.message
    assert book == before


# Each operation kind: what it writes ------------------------------------------------------------


def test_credit_moves_from_the_operator(book: Book) -> None:
    postings = rules.apply(book, credit(alice, 50), now)
    assert postings == [Posting(TransferKind.credit, eur_operator, alice, 50)]
    assert balances(book, alice, eur_operator) == [(1050, 0), (-1350, 0)]


def test_debit_moves_to_the_operator(book: Book) -> None:
    postings = rules.apply(book, debit(alice, 1000), now)
    assert postings == [Posting(TransferKind.debit, alice, eur_operator, 1000)]
    assert balances(book, alice, eur_operator) == [(0, 0), (-300, 0)]


def test_debit_may_use_the_overdraft_to_its_end(book: Book) -> None:
    rules.apply(book, debit(bob, 700), now)
    assert book.wallets[bob].posted == -500
    apply_failing(book, debit(bob, 1), errors.InsufficientFunds)


def test_debit_up_to_takes_what_is_available(book: Book) -> None:
    postings = rules.apply(book, debit(alice, 5000, DebitMode.up_to), now)
    assert postings == [
        Posting(TransferKind.debit, alice, eur_operator, 1000, amount_requested=5000)
    ]
    assert balances(book, alice) == [(0, 0)]


def test_debit_up_to_takes_all_when_enough(book: Book) -> None:
    postings = rules.apply(book, debit(alice, 30, DebitMode.up_to), now)
    assert postings == [Posting(TransferKind.debit, alice, eur_operator, 30, amount_requested=30)]
    assert balances(book, alice) == [(970, 0)]


def test_debit_up_to_uses_the_overdraft_and_spares_holds(book: Book) -> None:
    hold(book, bob, 100)
    postings = rules.apply(book, debit(bob, 10_000, DebitMode.up_to), now)
    assert postings == [
        Posting(TransferKind.debit, bob, eur_operator, 600, amount_requested=10_000)
    ]
    assert balances(book, bob) == [(-400, 100)]
    assert book.wallets[bob].available == -500


def test_debit_up_to_with_nothing_available_takes_nothing(book: Book) -> None:
    postings = rules.apply(book, debit(shop, 10, DebitMode.up_to), now)
    assert postings == [Posting(TransferKind.debit, shop, eur_operator, 10, amount_requested=10)]
    rules.apply(book, debit(shop, 290), now)
    postings = rules.apply(book, debit(shop, 10, DebitMode.up_to), now)
    assert postings == [Posting(TransferKind.debit, shop, eur_operator, 0, amount_requested=10)]
    assert balances(book, shop) == [(0, 0)]


def test_debit_all_or_nothing_takes_nothing_when_short(book: Book) -> None:
    apply_failing(book, debit(alice, 1001), errors.InsufficientFunds)


def test_debit_up_to_into_a_full_operator_overflows(book: Book) -> None:
    """An up-to debit must not carry the operator past balance_max: BalanceOverflow, as the
    all-or-nothing debit says, and the book unchanged — not an AssertionError from
    Book.adjust after the source was already debited."""
    book.wallets[eur_operator].posted = balance_max
    apply_failing(book, debit(alice, 1, DebitMode.all_or_nothing), errors.BalanceOverflow)
    apply_failing(book, debit(alice, 1, DebitMode.up_to), errors.BalanceOverflow)


def test_transfer_moves_between_wallets(book: Book) -> None:
    postings = rules.apply(book, transfer(alice, kiosk, 400), now)
    assert postings == [Posting(TransferKind.transfer, alice, kiosk, 400)]
    assert balances(book, alice, kiosk) == [(600, 0), (400, 0)]
    # A merchant may send too, down to its overdraft.
    rules.apply(book, transfer(kiosk, bob, 500), now)
    assert balances(book, kiosk, bob) == [(-100, 0), (700, 0)]


def test_deposit_and_withdrawal_move_through_funding(book: Book) -> None:
    assert rules.apply(book, deposit(dave, 25), now) == [
        Posting(TransferKind.deposit, pts_funding, dave, 25)
    ]
    assert rules.apply(book, withdrawal(dave, 125), now) == [
        Posting(TransferKind.withdrawal, dave, pts_funding, 125)
    ]
    assert balances(book, dave, pts_funding, pts_operator) == [(0, 0), (0, 0), (0, 0)]


def test_payment_moves_from_customer_to_merchant(book: Book) -> None:
    assert rules.apply(book, payment(bob, shop, 650), now) == [
        Posting(TransferKind.payment, bob, shop, 650)
    ]
    assert balances(book, bob, shop) == [(-450, 0), (950, 0)]


def test_void_reverses_the_transfer(book: Book) -> None:
    postings = rules.apply(book, void(100), now)
    assert postings == [Posting(TransferKind.void, alice, eur_operator, 300, voids_transfer_id=100)]
    assert balances(book, alice, eur_operator) == [(700, 0), (-1000, 0)]
    assert 100 in book.voided
    apply_failing(book, void(100), errors.AlreadyVoided)


@pytest.mark.parametrize(
    ("transfer_id", "source", "target", "amount"),
    [
        (106, eur_operator, alice, 20),  # a debit: back from the operator, which has no floor
        (109, eur_funding, shop, 40),  # a withdrawal: back from funding
    ],
)
def test_void_from_a_system_wallet(
    book: Book, transfer_id: int, source: int, target: int, amount: int
) -> None:
    postings = rules.apply(book, void(transfer_id), now)
    assert postings == [
        Posting(TransferKind.void, source, target, amount, voids_transfer_id=transfer_id)
    ]


def test_void_of_a_capture_returns_the_captured_amount(book: Book) -> None:
    hold_id = hold(book, alice, 100, kiosk)
    [capture_id] = record(book, rules.apply(book, capture(hold_id, 70), now))
    assert rules.apply(book, void(capture_id), now) == [
        Posting(TransferKind.void, kiosk, alice, 70, voids_transfer_id=capture_id)
    ]
    assert balances(book, alice, kiosk) == [(1000, 0), (0, 0)]


def test_place_hold_reserves_without_moving(book: Book) -> None:
    postings = rules.apply(book, place_hold(alice, 400, timeout_s=90), now)
    assert postings == [
        Posting(
            TransferKind.hold,
            alice,
            eur_operator,
            400,
            hold_expires_at=now + timedelta(seconds=90),
        )
    ]
    assert balances(book, alice, eur_operator) == [(1000, 400), (-1300, 0)]
    assert book.wallets[alice].available == 600
    apply_failing(book, debit(alice, 601), errors.InsufficientFunds)
    apply_failing(book, place_hold(alice, 601), errors.InsufficientFunds)


def test_place_hold_for_a_named_target(book: Book) -> None:
    postings = rules.apply(book, place_hold(bob, 650, shop), now)
    assert [(each.source_wallet_id, each.target_wallet_id) for each in postings] == [(bob, shop)]
    assert balances(book, bob, shop) == [(200, 650), (300, 0)]


def test_capture_part_of_a_hold(book: Book) -> None:
    hold_id = hold(book, alice, 100, shop)
    postings = rules.apply(book, capture(hold_id, 40), now)
    assert postings == [Posting(TransferKind.capture, alice, shop, 40, hold_id=hold_id)]
    # All of the hold is released; only the captured amount moves.
    assert balances(book, alice, shop) == [(960, 0), (340, 0)]
    assert book.holds[hold_id].resolution == TransferKind.capture
    apply_failing(book, capture(hold_id), errors.HoldNotPending)


def test_capture_all_of_a_hold_by_default(book: Book) -> None:
    hold_id = hold(book, bob, 700)
    postings = rules.apply(book, capture(hold_id), now)
    assert postings == [Posting(TransferKind.capture, bob, eur_operator, 700, hold_id=hold_id)]
    assert balances(book, bob, eur_operator) == [(-500, 0), (-600, 0)]


def test_release_a_hold(book: Book) -> None:
    hold_id = hold(book, alice, 100)
    postings = rules.apply(book, release(hold_id), now)
    assert postings == [Posting(TransferKind.release, alice, eur_operator, 100, hold_id=hold_id)]
    assert balances(book, alice) == [(1000, 0)]
    assert book.holds[hold_id].resolution == TransferKind.release


def test_expire_a_hold_at_its_expiry(book: Book) -> None:
    hold_id = hold(book, alice, 100, timeout_s=60)
    expires_at = now + timedelta(seconds=60)
    just_before = expires_at - timedelta(microseconds=1)
    before = copy.deepcopy(book)
    with pytest.raises(errors.HoldNotPending):
        rules.apply(book, expire(hold_id), just_before)
    assert book == before
    postings = rules.apply(book, expire(hold_id), expires_at)
    assert postings == [
        Posting(TransferKind.hold_expiry, alice, eur_operator, 100, hold_id=hold_id)
    ]
    assert balances(book, alice) == [(1000, 0)]
    assert book.holds[hold_id].resolution == TransferKind.hold_expiry


def test_capture_until_just_before_expiry(book: Book) -> None:
    first = hold(book, alice, 100, timeout_s=60)
    second = hold(book, alice, 100, timeout_s=60)
    expires_at = now + timedelta(seconds=60)
    rules.apply(book, capture(first), expires_at - timedelta(microseconds=1))
    with pytest.raises(errors.HoldExpired):
        rules.apply(book, capture(second), expires_at)
    with pytest.raises(errors.HoldExpired):
        rules.apply(book, release(second), expires_at)


# Each error, and the book unchanged after it --------------------------------------------------

Setup = Callable[[Book], Operation]


def at_most(wallet_id: int, posted: int, operation: Callable[[], Operation]) -> Setup:
    def setup(book: Book) -> Operation:
        book.wallets[wallet_id].posted = posted
        return operation()

    return setup


def spent_grant(book: Book) -> int:
    """A grant expired a day ago, with nothing left: spent before."""
    grant_id = grant(book, dave, 50)
    rules.apply(book, debit(dave, 150), now - timedelta(days=2))
    return grant_id


def spent_credit(book: Book) -> int:
    """A credit to the stall whose grant it spent in part, with no other funds: its id."""
    [posting] = rules.apply(
        book,
        Credit(idempotency_key=key(), wallet_id=stall, amount=40, expires_at=now + timedelta(1)),
        now,
    )
    [credit_id] = record(book, [posting])
    rules.apply(book, debit(stall, 10), now)
    return credit_id


def expired_hold(book: Book) -> int:
    return hold(book, alice, 100, timeout_s=60, placed_at=now - timedelta(hours=1))


def hold_to_a_full_operator(book: Book) -> int:
    hold_id = hold(book, alice, 100)
    book.wallets[eur_operator].posted = balance_max - 99
    return hold_id


def hold_then_cancel_target(book: Book) -> int:
    hold_id = hold(book, alice, 100, kiosk)
    book.wallets[kiosk].status = cancelled
    return hold_id


failures: list[Any] = [
    # Credit.
    pytest.param(lambda b: credit(missing, 1), errors.WalletNotFound, id="credit-missing"),
    pytest.param(lambda b: credit(eur_operator, 1), errors.WalletKindMismatch, id="credit-system"),
    pytest.param(lambda b: credit(closed_customer, 1), errors.WalletNotActive, id="credit-closed"),
    pytest.param(
        at_most(alice, balance_max, lambda: credit(alice, 1)),
        errors.BalanceOverflow,
        id="credit-target-overflow",
    ),
    pytest.param(
        at_most(eur_operator, balance_min + 5, lambda: credit(alice, 6)),
        errors.BalanceOverflow,
        id="credit-operator-underflow",
    ),
    # Debit.
    pytest.param(lambda b: debit(alice, 1001), errors.InsufficientFunds, id="debit-short"),
    pytest.param(lambda b: debit(bob, 701), errors.InsufficientFunds, id="debit-past-overdraft"),
    pytest.param(
        lambda b: hold(b, alice, 950) and debit(alice, 51),
        errors.InsufficientFunds,
        id="debit-held",
    ),
    pytest.param(lambda b: debit(missing, 1), errors.WalletNotFound, id="debit-missing"),
    pytest.param(lambda b: debit(eur_funding, 1), errors.WalletKindMismatch, id="debit-system"),
    pytest.param(
        lambda b: debit(closed_merchant, 1, DebitMode.up_to),
        errors.WalletNotActive,
        id="debit-up-to-closed",
    ),
    pytest.param(
        at_most(eur_operator, balance_max - 5, lambda: debit(alice, 6)),
        errors.BalanceOverflow,
        id="debit-operator-overflow",
    ),
    # Transfer.
    pytest.param(lambda b: transfer(alice, alice, 1), errors.SameWallet, id="transfer-same"),
    pytest.param(lambda b: transfer(alice, dave, 1), errors.UnitMismatch, id="transfer-units"),
    pytest.param(
        lambda b: transfer(alice, bob, 1001), errors.InsufficientFunds, id="transfer-short"
    ),
    pytest.param(
        lambda b: transfer(alice, eur_operator, 1),
        errors.WalletKindMismatch,
        id="transfer-to-system",
    ),
    pytest.param(
        lambda b: transfer(eur_funding, alice, 1),
        errors.WalletKindMismatch,
        id="transfer-from-system",
    ),
    pytest.param(
        lambda b: transfer(alice, closed_merchant, 1),
        errors.WalletNotActive,
        id="transfer-to-closed",
    ),
    pytest.param(
        lambda b: transfer(closed_customer, alice, 1),
        errors.WalletNotActive,
        id="transfer-from-closed",
    ),
    pytest.param(
        lambda b: transfer(alice, missing, 1), errors.WalletNotFound, id="transfer-to-missing"
    ),
    pytest.param(
        at_most(bob, balance_max - 1, lambda: transfer(alice, bob, 2)),
        errors.BalanceOverflow,
        id="transfer-overflow",
    ),
    # Deposit and withdrawal.
    pytest.param(lambda b: deposit(pts_funding, 1), errors.WalletKindMismatch, id="deposit-system"),
    pytest.param(
        lambda b: deposit(closed_customer, 1), errors.WalletNotActive, id="deposit-closed"
    ),
    pytest.param(
        at_most(eur_funding, balance_min, lambda: deposit(alice, 1)),
        errors.BalanceOverflow,
        id="deposit-funding-underflow",
    ),
    pytest.param(lambda b: withdrawal(dave, 101), errors.InsufficientFunds, id="withdrawal-short"),
    pytest.param(lambda b: withdrawal(missing, 1), errors.WalletNotFound, id="withdrawal-missing"),
    # Payment.
    pytest.param(
        lambda b: payment(shop, kiosk, 1), errors.WalletKindMismatch, id="payment-merchant-payer"
    ),
    pytest.param(
        lambda b: payment(alice, bob, 1), errors.WalletKindMismatch, id="payment-customer-payee"
    ),
    pytest.param(lambda b: payment(alice, alice, 1), errors.SameWallet, id="payment-same"),
    pytest.param(lambda b: payment(alice, stall, 1), errors.UnitMismatch, id="payment-units"),
    pytest.param(
        lambda b: payment(alice, shop, 1001), errors.InsufficientFunds, id="payment-short"
    ),
    pytest.param(
        lambda b: payment(alice, closed_merchant, 1),
        errors.WalletNotActive,
        id="payment-closed",
    ),
    # Void.
    pytest.param(lambda b: void(missing), errors.TransferNotFound, id="void-missing"),
    pytest.param(lambda b: void(102), errors.NotVoidable, id="void-of-void"),
    pytest.param(lambda b: void(103), errors.NotVoidable, id="void-of-hold"),
    pytest.param(lambda b: void(104), errors.NotVoidable, id="void-of-release"),
    pytest.param(lambda b: void(105), errors.NotVoidable, id="void-of-expiry"),
    pytest.param(lambda b: void(101), errors.AlreadyVoided, id="void-again"),
    pytest.param(lambda b: void(107), errors.WalletNotActive, id="void-to-closed"),
    pytest.param(lambda b: void(108), errors.InsufficientFunds, id="void-spent"),
    pytest.param(
        at_most(eur_operator, balance_max - 299, lambda: void(100)),
        errors.BalanceOverflow,
        id="void-overflow",
    ),
    # Place hold.
    pytest.param(lambda b: place_hold(alice, 1001), errors.InsufficientFunds, id="hold-short"),
    pytest.param(lambda b: place_hold(missing, 1), errors.WalletNotFound, id="hold-missing"),
    pytest.param(
        lambda b: place_hold(eur_operator, 1), errors.WalletKindMismatch, id="hold-system"
    ),
    pytest.param(
        lambda b: place_hold(closed_customer, 1), errors.WalletNotActive, id="hold-closed"
    ),
    pytest.param(lambda b: place_hold(alice, 1, alice), errors.SameWallet, id="hold-same"),
    pytest.param(lambda b: place_hold(alice, 1, stall), errors.UnitMismatch, id="hold-units"),
    pytest.param(
        lambda b: place_hold(alice, 1, eur_funding),
        errors.WalletKindMismatch,
        id="hold-to-system",
    ),
    pytest.param(
        lambda b: place_hold(alice, 1, closed_merchant),
        errors.WalletNotActive,
        id="hold-to-closed",
    ),
    pytest.param(
        lambda b: place_hold(alice, 1, missing), errors.WalletNotFound, id="hold-to-missing"
    ),
    # Capture.
    pytest.param(lambda b: capture(missing), errors.HoldNotFound, id="capture-missing"),
    pytest.param(lambda b: capture(100), errors.HoldNotFound, id="capture-not-a-hold"),
    pytest.param(
        lambda b: capture(hold(b, alice, 100), 101),
        errors.CaptureExceedsHold,
        id="capture-too-much",
    ),
    pytest.param(lambda b: capture(expired_hold(b)), errors.HoldExpired, id="capture-late"),
    pytest.param(
        lambda b: capture(resolved_hold(b, expire, placed_at=now - timedelta(days=1))),
        errors.HoldExpired,
        id="capture-expired",
    ),
    pytest.param(
        lambda b: capture(resolved_hold(b, capture)), errors.HoldNotPending, id="capture-captured"
    ),
    pytest.param(
        lambda b: capture(resolved_hold(b, release)), errors.HoldNotPending, id="capture-released"
    ),
    pytest.param(
        lambda b: capture(hold_then_cancel_target(b)),
        errors.WalletNotActive,
        id="capture-to-closed",
    ),
    pytest.param(
        lambda b: capture(hold_to_a_full_operator(b)),
        errors.BalanceOverflow,
        id="capture-overflow",
    ),
    # Release and expiry.
    pytest.param(lambda b: release(missing), errors.HoldNotFound, id="release-missing"),
    pytest.param(lambda b: release(expired_hold(b)), errors.HoldExpired, id="release-late"),
    pytest.param(
        lambda b: release(resolved_hold(b, release)), errors.HoldNotPending, id="release-again"
    ),
    pytest.param(lambda b: expire(missing), errors.HoldNotFound, id="expire-missing"),
    pytest.param(lambda b: expire_grant(missing), errors.GrantNotFound, id="expire-grant-missing"),
    pytest.param(
        lambda b: expire_grant(grant(b, days=3)), errors.GrantNotExpired, id="expire-grant-early"
    ),
    pytest.param(
        lambda b: expire_grant(spent_grant(b)), errors.GrantNotExpired, id="expire-grant-spent"
    ),
    pytest.param(lambda b: void(spent_credit(b)), errors.GrantSpent, id="void-spent-grant"),
    pytest.param(lambda b: expire(hold(b)), errors.HoldNotPending, id="expire-early"),
    pytest.param(
        lambda b: expire(resolved_hold(b, release)),
        errors.HoldNotPending,
        id="expire-released",
    ),
]


@pytest.mark.parametrize(("setup", "error"), failures)
def test_failure_leaves_the_book_unchanged(
    book: Book, setup: Setup, error: type[errors.CofferError]
) -> None:
    apply_failing(book, setup(book), error)


def test_every_failed_precondition_and_not_found_is_tested() -> None:
    tested = {param.values[1] for param in failures}
    tested.add(errors.BalanceOverflow)
    expected = {
        error
        for error in errors.reasons().values()
        if error.category in (errors.Category.failed_precondition, errors.Category.not_found)
    }
    # Raised by the ledger itself, by its credentials, or by the reads of events, not by
    # the rules.
    expected -= {
        errors.UnitNotFound,
        errors.WalletNotEmpty,
        errors.ApiKeyNotFound,
        errors.CertificateMappingNotFound,
        errors.EventsDisabled,
        errors.EventsCursorExpired,
    }
    assert expected <= tested, expected - tested


# The one posting function: what the write-ahead expects is what apply posts ----------------------


def operation_kinds() -> set[type[Operation]]:
    """Every kind of operation the model defines: the leaves of its class tree. (A slotted
    dataclass replaces the class its statement made, which may linger among the subclasses
    until collected: only the model's own are counted.)"""
    found: set[type[Operation]] = set()
    pending = [Operation]
    while pending:
        kind = pending.pop()
        if kind.__subclasses__():
            pending.extend(kind.__subclasses__())
        elif vars(model).get(kind.__name__) is kind:
            found.add(kind)
    return found


# Examples of every kind that succeed on the book, each with whether the ledger writes its
# transfer ahead, before it locks a wallet: those whose posting no balance decides.
posting_examples: dict[type[Operation], list[tuple[Setup, bool]]] = {
    Credit: [(lambda b: credit(alice, 50), True)],
    Debit: [
        (lambda b: debit(alice, 50), True),
        (lambda b: debit(alice, 50, DebitMode.up_to), False),
    ],
    WalletTransfer: [(lambda b: transfer(alice, bob, 50), True)],
    Deposit: [(lambda b: deposit(alice, 50), True)],
    Withdrawal: [(lambda b: withdrawal(alice, 50), True)],
    Payment: [(lambda b: payment(alice, shop, 50), True)],
    Void: [(lambda b: void(106), False)],
    PlaceHold: [
        (lambda b: place_hold(alice, 50), False),
        (lambda b: place_hold(alice, 50, bob), False),
    ],
    CaptureHold: [(lambda b: capture(hold(b)), False), (lambda b: capture(hold(b), 40), False)],
    ReleaseHold: [(lambda b: release(hold(b)), False)],
    ExpireHold: [(lambda b: expire(expired_hold(b)), False)],
    ExpireGrant: [(lambda b: expire_grant(grant(b)), False)],
}


def test_every_operation_kind_has_posting_examples() -> None:
    assert set(posting_examples) == operation_kinds()


@pytest.mark.parametrize(
    ("setup", "ahead"),
    [
        pytest.param(setup, ahead, id=f"{kind.__name__}-{number}")
        for kind, examples in posting_examples.items()
        for number, (setup, ahead) in enumerate(examples)
    ],
)
def test_the_write_ahead_expects_what_apply_posts(book: Book, setup: Setup, ahead: bool) -> None:
    """The ledger writes `expected_posting` before it locks anything, and keeps it only if
    `apply` then posts exactly that: were the two to differ, every such transfer would be
    written twice, and the locks held for longer, with nothing failing."""
    operation = setup(book)
    expected = rules.expected_posting(operation, book.unit_of, book.system_wallets)
    planned = rules.posting_of(operation, book.unit_of, book.system_wallets)
    postings = rules.apply(book, operation, now)
    if ahead:
        assert expected is not None
        assert len(postings) == 1 and postings[0].same_row(expected), (postings, expected)
    else:
        assert expected is None
    if planned is not None:
        # Here every wallet can spare the most an up-to debit asks.
        assert len(postings) == 1 and postings[0].same_row(planned), (postings, planned)


def test_a_posting_is_confirmed_by_its_journal_row_alone() -> None:
    """What a transfer changed in grants is not in its journal row: a posting written ahead
    without it is confirmed by the one `apply` makes with it; any other field differs."""
    written = Posting(TransferKind.transfer, 1, 2, 50)
    drawn = written._replace(allocations=((7, -50),))
    assert drawn.same_row(written) and written.same_row(drawn)
    made = written._replace(new_grants=(GrantState(-1, 2, 50, 50, now, None),))
    assert made.same_row(written)
    for field, value in [
        ("kind", TransferKind.payment),
        ("source_wallet_id", 3),
        ("target_wallet_id", 3),
        ("amount", 49),
        ("amount_requested", 50),
        ("voids_transfer_id", 9),
        ("hold_id", 9),
        ("hold_expires_at", now),
    ]:
        assert not written._replace(**{field: value}).same_row(written), field


# apply_all: batches and linked chains ---------------------------------------------------------


def kinds(outcomes: list[rules.Outcome]) -> list[Any]:
    """Each outcome as its error class, or as the list of its postings' kinds."""
    return [
        type(outcome)
        if isinstance(outcome, errors.CofferError)
        else [posting.kind for posting in outcome]
        for outcome in outcomes
    ]


linked_failed = errors.LinkedOperationFailed


def test_unlinked_failures_fail_alone(book: Book) -> None:
    outcomes = rules.apply_all(book, [credit(alice, 5), debit(bob, 10_000), credit(bob, 5)], now)
    assert kinds(outcomes) == [
        [TransferKind.credit],
        errors.InsufficientFunds,
        [TransferKind.credit],
    ]
    assert balances(book, alice, bob) == [(1005, 0), (205, 0)]
    assert book.undo is None


def test_linked_chain_applies_together(book: Book) -> None:
    # Bob can pay only thanks to the transfer before it in the chain.
    operations = [transfer(alice, bob, 1000, linked=True), payment(bob, shop, 1700)]
    outcomes = rules.apply_all(book, operations, now)
    assert kinds(outcomes) == [[TransferKind.transfer], [TransferKind.payment]]
    assert balances(book, alice, bob, shop) == [(0, 0), (-500, 0), (2000, 0)]
    assert book.undo is None


def test_linked_chain_fails_as_a_whole(book: Book) -> None:
    hold_id = hold(book, alice, 100)
    before = copy.deepcopy(book)
    operations: list[Operation | Rejected] = [
        credit(alice, 10, linked=True),
        void(100, linked=True),
        capture(hold_id, 60, linked=True),
        place_hold(bob, 10, linked=True),
        transfer(kiosk, stall, 1, linked=True),  # fails: the PTS stall
        credit(shop, 1, linked=True),
        release(hold_id),
    ]
    outcomes = rules.apply_all(book, operations, now)
    assert kinds(outcomes) == [
        linked_failed,
        linked_failed,
        linked_failed,
        linked_failed,
        errors.UnitMismatch,
        linked_failed,
        linked_failed,
    ]
    # Rolled back exactly: balances, the capture's hold, the void's mark.
    assert book == before
    assert book.holds[hold_id].resolution is None
    assert 100 not in book.voided


def test_operations_after_a_failed_chain_apply(book: Book) -> None:
    operations = [
        credit(alice, 1),
        credit(alice, 10, linked=True),
        debit(alice, 10_000),
        credit(alice, 100, linked=True),
        credit(alice, 1000),
    ]
    outcomes = rules.apply_all(book, operations, now)
    assert kinds(outcomes) == [
        [TransferKind.credit],
        linked_failed,
        errors.InsufficientFunds,
        [TransferKind.credit],
        [TransferKind.credit],
    ]
    assert balances(book, alice) == [(2101, 0)]


def test_a_chain_left_open_at_the_end_fails(book: Book) -> None:
    operations = [credit(alice, 1), credit(bob, 1, linked=True), credit(shop, 1, linked=True)]
    outcomes = rules.apply_all(book, operations, now)
    assert kinds(outcomes) == [[TransferKind.credit], linked_failed, errors.InvalidArgument]
    last = outcomes[-1]
    assert isinstance(last, errors.InvalidArgument) and last.field == "linked"
    assert balances(book, alice, bob, shop) == [(1001, 0), (200, 0), (300, 0)]


def test_a_lone_linked_operation_at_the_end_fails(book: Book) -> None:
    before = copy.deepcopy(book)
    assert kinds(rules.apply_all(book, [credit(alice, 1, linked=True)], now)) == [
        errors.InvalidArgument
    ]
    assert book == before


def test_settled_replay_succeeds_with_nothing_to_write(book: Book) -> None:
    before = copy.deepcopy(book)
    # Even an operation that would fail now: it was settled before.
    outcomes = rules.apply_all(
        book, [debit(alice, 10_000), credit(alice, 1)], now, {0: None, 1: None}
    )
    assert outcomes == [[], []]
    assert book == before


def test_settled_error_fails_without_applying(book: Book) -> None:
    reused = errors.IdempotencyKeyReused("key-1 was used for another request")
    outcomes = rules.apply_all(book, [credit(alice, 1), credit(bob, 1)], now, {0: reused})
    assert outcomes[0] is reused
    assert kinds(outcomes) == [errors.IdempotencyKeyReused, [TransferKind.credit]]
    assert balances(book, alice, bob) == [(1000, 0), (201, 0)]


def test_settled_error_fails_its_chain(book: Book) -> None:
    before = copy.deepcopy(book)
    reused = errors.IdempotencyKeyReused("reused")
    operations = [credit(alice, 1, linked=True), credit(bob, 1, linked=True), credit(shop, 1)]
    outcomes = rules.apply_all(book, operations, now, {1: reused})
    assert kinds(outcomes) == [linked_failed, errors.IdempotencyKeyReused, linked_failed]
    assert book == before


def test_settled_replay_in_a_chain(book: Book) -> None:
    # A replay in a chain that applies: nothing to write for it.
    operations = [credit(alice, 1, linked=True), credit(bob, 1)]
    outcomes = rules.apply_all(book, operations, now, {0: None})
    assert kinds(outcomes) == [[], [TransferKind.credit]]
    assert balances(book, alice, bob) == [(1000, 0), (201, 0)]
    # A replay in a chain that fails: it fails with the chain.
    before = copy.deepcopy(book)
    operations = [credit(alice, 1, linked=True), debit(bob, 10_000)]
    outcomes = rules.apply_all(book, operations, now, {0: None})
    assert kinds(outcomes) == [linked_failed, errors.InsufficientFunds]
    assert book == before


def test_rejected_fails_with_its_error(book: Book) -> None:
    rejected = Rejected(errors.InvalidArgument("amount", "must be positive"))
    outcomes = rules.apply_all(book, [rejected, credit(alice, 1)], now)
    assert outcomes[0] is rejected.error
    assert kinds(outcomes) == [errors.InvalidArgument, [TransferKind.credit]]


def test_rejected_fails_its_chain(book: Book) -> None:
    before = copy.deepcopy(book)
    rejected = Rejected(errors.InvalidArgument("amount", "must be positive"), linked=True)
    operations = [credit(alice, 1, linked=True), rejected, credit(bob, 1), credit(shop, 1)]
    outcomes = rules.apply_all(book, operations, now)
    assert outcomes[1] is rejected.error
    assert kinds(outcomes) == [
        linked_failed,
        errors.InvalidArgument,
        linked_failed,
        [TransferKind.credit],
    ]
    assert balances(book, alice, bob, shop) == [(1000, 0), (200, 0), (301, 0)]
    changed = {shop, eur_operator}
    assert {i: w for i, w in book.wallets.items() if i not in changed} == {
        i: w for i, w in before.wallets.items() if i not in changed
    }


# Property test: random operations against an independent model --------------------------------


@dataclasses.dataclass
class ModelHold:
    source: int
    target: int
    amount: int
    expires_at: datetime
    status: str = "pending"  # pending, captured, released, expired


resolutions = {
    None: "pending",
    TransferKind.capture: "captured",
    TransferKind.release: "released",
    TransferKind.hold_expiry: "expired",
}
voidable = {
    TransferKind.credit,
    TransferKind.debit,
    TransferKind.transfer,
    TransferKind.deposit,
    TransferKind.withdrawal,
    TransferKind.payment,
    TransferKind.capture,
}

Violations = set[type[errors.CofferError]]


class Model:
    """The ledger's semantics in plain dicts, written from its documentation, not its code.

    `step` says which errors an operation may fail with (any of them; empty when it must
    succeed) and, when it succeeds, applies it and says the postings it writes."""

    def __init__(self) -> None:
        self.posted: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.unit: dict[int, str] = {}
        self.kind: dict[int, OwnerKind] = {}
        self.active: dict[int, bool] = {}
        self.minimum: dict[int, int | None] = {}
        for wallet_id, unit, owner_kind, status, minimum, posted in wallet_rows:
            self.posted[wallet_id] = posted
            self.pending[wallet_id] = 0
            self.unit[wallet_id] = unit
            self.kind[wallet_id] = owner_kind
            self.active[wallet_id] = status == active
            self.minimum[wallet_id] = minimum
        self.system = dict(system_rows)
        self.holds: dict[int, ModelHold] = {}
        self.transfers: dict[int, tuple[TransferKind, int, int, int]] = {}
        self.voided: set[int] = set()

    def step(self, operation: Operation, at: datetime) -> tuple[Violations, list[Posting]]:
        match operation:
            case Credit():
                return self._through(
                    TransferKind.credit,
                    operation.wallet_id,
                    operation.amount,
                    SystemWallet.operator,
                    inward=True,
                )
            case Deposit():
                return self._through(
                    TransferKind.deposit,
                    operation.wallet_id,
                    operation.amount,
                    SystemWallet.funding,
                    inward=True,
                )
            case Withdrawal():
                return self._through(
                    TransferKind.withdrawal,
                    operation.wallet_id,
                    operation.amount,
                    SystemWallet.funding,
                    inward=False,
                )
            case Debit(mode=DebitMode.all_or_nothing):
                return self._through(
                    TransferKind.debit,
                    operation.wallet_id,
                    operation.amount,
                    SystemWallet.operator,
                    inward=False,
                )
            case Debit():
                return self._debit_up_to(operation.wallet_id, operation.amount)
            case WalletTransfer():
                return self._between(
                    TransferKind.transfer,
                    operation.source_wallet_id,
                    operation.target_wallet_id,
                    operation.amount,
                )
            case Payment():
                return self._between(
                    TransferKind.payment,
                    operation.payer_wallet_id,
                    operation.payee_wallet_id,
                    operation.amount,
                )
            case Void():
                return self._void(operation.transfer_id)
            case PlaceHold():
                return self._place_hold(operation, at)
            case CaptureHold():
                return self._capture(operation.hold_id, operation.amount, at)
            case ReleaseHold():
                return self._release(operation.hold_id, at)
            case ExpireHold():
                return self._expire(operation.hold_id, at)
        raise AssertionError(operation)

    # Checks.

    def _user(self, wallet_id: int) -> Violations | None:
        """None: no such wallet."""
        if wallet_id not in self.posted:
            return None
        found: Violations = set()
        if self.kind[wallet_id] == system:
            found.add(errors.WalletKindMismatch)
        if not self.active[wallet_id]:
            found.add(errors.WalletNotActive)
        return found

    def _can_move(self, source: int, target: int, amount: int) -> Violations:
        found: Violations = set()
        minimum = self.minimum[source]
        if minimum is None:
            if self.posted[source] - amount < balance_min:
                found.add(errors.BalanceOverflow)
        elif self.posted[source] - self.pending[source] - amount < minimum:
            found.add(errors.InsufficientFunds)
        if self.posted[target] + amount > balance_max:
            found.add(errors.BalanceOverflow)
        return found

    def _pair(self, source: int, target: int) -> tuple[Violations, bool]:
        """What is wrong with the pair, and whether money could move between them at all."""
        found: Violations = set()
        if source == target:
            found.add(errors.SameWallet)
        for wallet_id in (source, target):
            user = self._user(wallet_id)
            found |= {errors.WalletNotFound} if user is None else user
        if errors.WalletNotFound in found:
            return found, False
        if self.unit[source] != self.unit[target]:
            found.add(errors.UnitMismatch)
        movable = source != target and self.unit[source] == self.unit[target]
        return found, movable and self.kind[source] != system

    # Writes.

    def _move(self, kind: TransferKind, source: int, target: int, amount: int) -> Posting:
        self.posted[source] -= amount
        self.posted[target] += amount
        return Posting(kind, source, target, amount)

    # Operations.

    def _through(
        self, kind: TransferKind, wallet_id: int, amount: int, which: SystemWallet, *, inward: bool
    ) -> tuple[Violations, list[Posting]]:
        found = self._user(wallet_id)
        if found is None:
            return {errors.WalletNotFound}, []
        other = self.system[(self.unit[wallet_id], which)]
        source, target = (other, wallet_id) if inward else (wallet_id, other)
        if self.kind[wallet_id] != system:
            found |= self._can_move(source, target, amount)
        if found:
            return found, []
        return found, [self._move(kind, source, target, amount)]

    def _debit_up_to(self, wallet_id: int, amount: int) -> tuple[Violations, list[Posting]]:
        found = self._user(wallet_id)
        if found is None:
            return {errors.WalletNotFound}, []
        if found:
            return found, []
        operator = self.system[(self.unit[wallet_id], SystemWallet.operator)]
        minimum = self.minimum[wallet_id]
        assert minimum is not None
        available = self.posted[wallet_id] - self.pending[wallet_id]
        taken = min(amount, max(0, available - minimum))
        if self.posted[operator] + taken > balance_max:
            return {errors.BalanceOverflow}, []
        posting = self._move(TransferKind.debit, wallet_id, operator, taken)
        return found, [posting._replace(amount_requested=amount)]

    def _between(
        self, kind: TransferKind, source: int, target: int, amount: int
    ) -> tuple[Violations, list[Posting]]:
        found, movable = self._pair(source, target)
        if errors.WalletNotFound in found:
            return found, []
        payment_kinds = (self.kind[source], self.kind[target]) == (customer, merchant)
        if kind == TransferKind.payment and not payment_kinds:
            found.add(errors.WalletKindMismatch)
        if movable:
            found |= self._can_move(source, target, amount)
        if found:
            return found, []
        return found, [self._move(kind, source, target, amount)]

    def _void(self, transfer_id: int) -> tuple[Violations, list[Posting]]:
        if transfer_id not in self.transfers:
            return {errors.TransferNotFound}, []
        kind, source, target, amount = self.transfers[transfer_id]
        if kind not in voidable:
            return {errors.NotVoidable}, []
        found: Violations = set()
        if transfer_id in self.voided:
            found.add(errors.AlreadyVoided)
        if not (self.active[source] and self.active[target]):
            found.add(errors.WalletNotActive)
        found |= self._can_move(target, source, amount)
        if found:
            return found, []
        self.voided.add(transfer_id)
        posting = self._move(TransferKind.void, target, source, amount)
        return found, [posting._replace(voids_transfer_id=transfer_id)]

    def _place_hold(self, operation: PlaceHold, at: datetime) -> tuple[Violations, list[Posting]]:
        wallet_id = operation.wallet_id
        if operation.target_wallet_id is None:
            user = self._user(wallet_id)
            if user is None:
                return {errors.WalletNotFound}, []
            found = user
            target = self.system[(self.unit[wallet_id], SystemWallet.operator)]
            movable = self.kind[wallet_id] != system
        else:
            target = operation.target_wallet_id
            found, movable = self._pair(wallet_id, target)
        if movable:
            found |= self._can_move(wallet_id, target, operation.amount)
        if found:
            return found, []
        self.pending[wallet_id] += operation.amount
        expires_at = at + timedelta(seconds=operation.timeout_s)
        return found, [
            Posting(
                TransferKind.hold, wallet_id, target, operation.amount, hold_expires_at=expires_at
            )
        ]

    def _open(self, hold_id: int, at: datetime) -> Violations | None:
        """None: no such hold."""
        found = self.holds.get(hold_id)
        if found is None:
            return None
        if found.status == "expired" or (found.status == "pending" and found.expires_at <= at):
            return {errors.HoldExpired}
        if found.status != "pending":
            return {errors.HoldNotPending}
        return set()

    def _capture(
        self, hold_id: int, amount: int | None, at: datetime
    ) -> tuple[Violations, list[Posting]]:
        found = self._open(hold_id, at)
        if found is None:
            return {errors.HoldNotFound}, []
        held = self.holds[hold_id]
        taken = held.amount if amount is None else amount
        if taken > held.amount:
            found.add(errors.CaptureExceedsHold)
        if not self.active[held.target]:
            found.add(errors.WalletNotActive)
        if self.posted[held.target] + taken > balance_max:
            found.add(errors.BalanceOverflow)
        if found:
            return found, []
        held.status = "captured"
        self.pending[held.source] -= held.amount
        self.posted[held.source] -= taken
        self.posted[held.target] += taken
        return found, [
            Posting(TransferKind.capture, held.source, held.target, taken, hold_id=hold_id)
        ]

    def _release(self, hold_id: int, at: datetime) -> tuple[Violations, list[Posting]]:
        found = self._open(hold_id, at)
        if found is None:
            return {errors.HoldNotFound}, []
        if found:
            return found, []
        return found, [self._unhold(hold_id, "released", TransferKind.release)]

    def _expire(self, hold_id: int, at: datetime) -> tuple[Violations, list[Posting]]:
        held = self.holds.get(hold_id)
        if held is None:
            return {errors.HoldNotFound}, []
        if held.status != "pending" or held.expires_at > at:
            return {errors.HoldNotPending}, []
        return set(), [self._unhold(hold_id, "expired", TransferKind.hold_expiry)]

    def _unhold(self, hold_id: int, status: str, kind: TransferKind) -> Posting:
        held = self.holds[hold_id]
        held.status = status
        self.pending[held.source] -= held.amount
        return Posting(kind, held.source, held.target, held.amount, hold_id=hold_id)

    def record(self, transfer_id: int, posting: Posting) -> None:
        """The model's side of `record`."""
        self.transfers[transfer_id] = (
            posting.kind,
            posting.source_wallet_id,
            posting.target_wallet_id,
            posting.amount,
        )
        if posting.kind == TransferKind.hold:
            assert posting.hold_expires_at is not None
            self.holds[transfer_id] = ModelHold(
                posting.source_wallet_id,
                posting.target_wallet_id,
                posting.amount,
                posting.hold_expires_at,
            )


all_wallet_ids = [row[0] for row in wallet_rows]
user_wallet_ids = [row[0] for row in wallet_rows if row[2] != system]
open_wallet_ids = [row[0] for row in wallet_rows if row[2] != system and row[3] == active]
# Mostly the wallets money can move between; sometimes any wallet, or none.
any_wallet_ids = st.one_of(
    st.sampled_from(open_wallet_ids),
    st.sampled_from(open_wallet_ids),
    st.sampled_from([*all_wallet_ids, missing]),
)
# Mostly amounts that fit the balances; sometimes ones that reach the limits.
amounts = st.one_of(
    st.integers(1, 300),
    st.integers(1, 1500),
    st.sampled_from([amount_max, amount_max - 1, 2**62]),
    st.integers(1, amount_max),
)
modes = st.sampled_from(DebitMode)
# Operations that carry balances to the limits, where overflows live.
debts = st.sampled_from([0, 0, 2**61, 2**62, amount_max - 1000])
huge_amounts = st.sampled_from([amount_max, amount_max - 1000, 2**62, 2**61])
limit_wallet_ids = st.sampled_from([carol, dan, alice, erin])
limit_operations = st.one_of(
    st.builds(
        Debit,
        idempotency_key=st.just("key"),
        wallet_id=limit_wallet_ids,
        amount=huge_amounts,
        mode=modes,
    ),
    st.builds(
        Credit, idempotency_key=st.just("key"), wallet_id=limit_wallet_ids, amount=huge_amounts
    ),
    st.builds(
        Deposit,
        idempotency_key=st.just("key"),
        reference=st.just("bank"),
        wallet_id=limit_wallet_ids,
        amount=huge_amounts,
    ),
    st.builds(
        Withdrawal,
        idempotency_key=st.just("key"),
        reference=st.just("bank"),
        wallet_id=limit_wallet_ids,
        amount=huge_amounts,
    ),
)


class LedgerMachine(RuleBasedStateMachine):
    """One book and its model, moved by random operations and batches."""

    def __init__(self) -> None:
        super().__init__()
        self.book = make_book()
        self.model = Model()
        self.now = now

    # Drawing operations that name what exists now (and sometimes what does not).

    def _transfer_ids(self) -> st.SearchStrategy[int]:
        return st.sampled_from([*sorted(self.model.transfers), missing])

    def _hold_ids(self) -> st.SearchStrategy[int]:
        others = [*sorted(self.model.transfers)[-2:], missing]
        if not self.model.holds:
            return st.sampled_from(others)
        return st.one_of(
            st.sampled_from(sorted(self.model.holds)),
            st.sampled_from([*sorted(self.model.holds), missing]),
            st.sampled_from(others),
        )

    def operations(self) -> st.SearchStrategy[Operation]:
        same_key = st.just("key")
        return st.one_of(
            st.builds(Credit, idempotency_key=same_key, wallet_id=any_wallet_ids, amount=amounts),
            st.builds(
                Debit,
                idempotency_key=same_key,
                wallet_id=any_wallet_ids,
                amount=amounts,
                mode=modes,
            ),
            st.builds(
                WalletTransfer,
                idempotency_key=same_key,
                source_wallet_id=any_wallet_ids,
                target_wallet_id=any_wallet_ids,
                amount=amounts,
            ),
            st.builds(
                Deposit,
                idempotency_key=same_key,
                reference=same_key,
                wallet_id=any_wallet_ids,
                amount=amounts,
            ),
            st.builds(
                Withdrawal,
                idempotency_key=same_key,
                reference=same_key,
                wallet_id=any_wallet_ids,
                amount=amounts,
            ),
            st.builds(
                Payment,
                idempotency_key=same_key,
                payer_wallet_id=any_wallet_ids,
                payee_wallet_id=any_wallet_ids,
                amount=amounts,
            ),
            st.builds(Void, idempotency_key=same_key, transfer_id=self._transfer_ids()),
            st.builds(
                PlaceHold,
                idempotency_key=same_key,
                wallet_id=any_wallet_ids,
                amount=amounts,
                target_wallet_id=st.none() | any_wallet_ids,
                timeout_s=st.integers(1, 7200),
            ),
            st.builds(
                CaptureHold,
                idempotency_key=same_key,
                hold_id=self._hold_ids(),
                amount=st.none() | st.integers(1, 2000),
            ),
            st.builds(ReleaseHold, idempotency_key=same_key, hold_id=self._hold_ids()),
            st.builds(ExpireHold, idempotency_key=same_key, hold_id=self._hold_ids()),
        )

    def _record(self, postings: list[Posting]) -> None:
        for transfer_id, posting in zip(record(self.book, postings), postings, strict=True):
            self.model.record(transfer_id, posting)

    # Rules.

    @initialize(
        debts=st.lists(st.tuples(debts, modes), min_size=2, max_size=2),
        operations=st.lists(limit_operations, max_size=2),
    )
    def start_near_the_limits(
        self, debts: list[tuple[int, DebitMode]], operations: list[Operation]
    ) -> None:
        """Some runs start with balances near the limits, where overflows live: the wallets
        without a floor run up debts, then a few huge operations."""
        for wallet_id, (amount, mode) in zip((carol, dan), debts, strict=True):
            if amount:
                self._apply(
                    Debit(idempotency_key="key", wallet_id=wallet_id, amount=amount, mode=mode)
                )
        for operation in operations:
            self._apply(operation)

    @rule(data=st.data())
    def apply_one_by_one(self, data: st.DataObject) -> None:
        for _ in range(data.draw(st.integers(1, 4), label="count")):
            self._apply(data.draw(self.operations(), label="operation"))

    def _apply(self, operation: Operation) -> None:
        """Applies one operation: it fails as the model says and changes nothing, or it
        writes what the model says."""
        before = copy.deepcopy(self.book)
        trial = copy.deepcopy(self.model)
        violations, expected = trial.step(operation, self.now)
        ahead = rules.expected_posting(operation, self.book.unit_of, self.book.system_wallets)
        try:
            postings = rules.apply(self.book, operation, self.now)
        except errors.CofferError as error:
            event(f"{type(operation).__name__}: {error.reason}")
            assert violations, f"failed with {error!r}; the model says it succeeds"
            assert type(error) in violations, f"failed with {error!r}, not one of {violations}"
            assert self.book == before
            return
        event(f"{type(operation).__name__}: applied")
        assert not violations, f"succeeded; the model says it fails with one of {violations}"
        assert postings == expected
        # What the ledger wrote ahead is what it keeps.
        assert ahead is None or postings == [ahead]
        self.model = trial
        self._record(postings)

    @rule(data=st.data())
    def apply_batch(self, data: st.DataObject) -> None:
        size = data.draw(st.integers(1, 5), label="size")
        entries: list[Operation | Rejected] = []
        settled: dict[int, errors.CofferError | None] = {}
        for index in range(size):
            linked = data.draw(st.booleans(), label="linked")
            choice = data.draw(st.sampled_from(["apply"] * 6 + ["rejected", "replay", "reused"]))
            if choice == "rejected":
                entries.append(
                    Rejected(errors.InvalidArgument("amount", "must be positive"), linked)
                )
                continue
            operation = data.draw(self.operations(), label="operation")
            entries.append(dataclasses.replace(operation, linked=linked))
            if choice == "replay":
                settled[index] = None
            elif choice == "reused":
                settled[index] = errors.IdempotencyKeyReused("reused")

        # The model's outcomes: chains cut after each unlinked entry; an open chain fails.
        expected: list[Violations | list[Posting]] = []
        working = self.model
        chain: list[int] = []
        for index, entry in enumerate(entries):
            chain.append(index)
            if entry.linked:
                continue
            trial = copy.deepcopy(working)
            results: list[Violations | list[Posting]] = []
            for member in chain:
                item = entries[member]
                if isinstance(item, Rejected):
                    violations, postings = {type(item.error)}, []
                elif member in settled:
                    prior = settled[member]
                    violations, postings = (set(), []) if prior is None else ({type(prior)}, [])
                else:
                    violations, postings = trial.step(item, self.now)
                if violations:
                    # The others fail with it; those after it that are invalid or failed
                    # before keep that answer.
                    results = [
                        violations
                        if other == member
                        else {type(entries[other].error)}  # type: ignore[union-attr]
                        if other > member and isinstance(entries[other], Rejected)
                        else {type(settled[other])}
                        if other > member and settled.get(other) is not None
                        else {errors.LinkedOperationFailed}
                        for other in chain
                    ]
                    break
                results.append(postings)
            else:
                working = trial
            expected.extend(results)
            chain = []
        if chain:
            expected.extend({errors.LinkedOperationFailed} for _ in chain[:-1])
            expected.append({errors.InvalidArgument})

        written_ahead = [
            None
            if isinstance(entry, Rejected)
            else rules.expected_posting(entry, self.book.unit_of, self.book.system_wallets)
            for entry in entries
        ]
        outcomes = rules.apply_all(self.book, entries, self.now, settled)
        assert len(outcomes) == len(entries)
        for outcome, ahead in zip(outcomes, written_ahead, strict=True):
            if isinstance(outcome, list) and outcome and ahead is not None:
                assert outcome == [ahead]
        for outcome, expectation in zip(outcomes, expected, strict=True):
            if isinstance(expectation, set):
                assert isinstance(outcome, errors.CofferError), (outcome, expectation)
                assert type(outcome) in expectation, (outcome, expectation)
            else:
                assert outcome == expectation
        assert self.book.undo is None
        self.model = working
        self._record(
            [posting for outcome in outcomes if isinstance(outcome, list) for posting in outcome]
        )

    @rule(seconds=st.integers(0, 3600))
    def advance_time(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule(data=st.data())
    def cancel_an_empty_wallet(self, data: st.DataObject) -> None:
        """As the ledger does it: only an empty wallet, with nothing on hold."""
        choices = [wallet_id for wallet_id in user_wallet_ids if self._cancellable(wallet_id)]
        # Not every time: a cancelled wallet stays cancelled for the rest of the run.
        wallet_id = data.draw(st.sampled_from([None, None, None, *choices]), label="wallet")
        if wallet_id is None:
            return
        self.book.wallets[wallet_id].status = cancelled
        self.model.active[wallet_id] = False

    def _cancellable(self, wallet_id: int) -> bool:
        wallet = self.book.wallets[wallet_id]
        return wallet.status == active and wallet.posted == 0 and wallet.pending == 0

    # Invariants, after every step.

    @invariant()
    def each_unit_sums_to_zero(self) -> None:
        sums: dict[str, int] = {}
        for wallet in self.book.wallets.values():
            sums[wallet.unit] = sums.get(wallet.unit, 0) + wallet.posted
        assert sums == {"EUR": 0, "PTS": 0}

    @invariant()
    def no_wallet_below_its_minimum(self) -> None:
        for wallet in self.book.wallets.values():
            assert balance_min <= wallet.posted <= balance_max, wallet
            if wallet.owner_kind == system:
                assert wallet.balance_minimum is None and wallet.pending == 0, wallet
            else:
                assert wallet.balance_minimum is not None
                assert wallet.available >= wallet.balance_minimum, wallet

    @invariant()
    def pending_is_the_open_holds(self) -> None:
        held = dict.fromkeys(self.book.wallets, 0)
        for each in self.book.holds.values():
            if each.resolution is None:
                held[each.source_wallet_id] += each.amount
        assert {wallet.id: wallet.pending for wallet in self.book.wallets.values()} == held

    @invariant()
    def book_matches_the_model(self) -> None:
        assert {
            wallet.id: wallet.posted for wallet in self.book.wallets.values()
        } == self.model.posted
        assert {
            wallet.id: wallet.pending for wallet in self.book.wallets.values()
        } == self.model.pending
        assert {
            hold_id: resolutions[each.resolution] for hold_id, each in self.book.holds.items()
        } == {hold_id: each.status for hold_id, each in self.model.holds.items()}
        assert self.book.voided == self.model.voided


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(
    max_examples=40,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# Fuzz: the operations' constructors ----------------------------------------------------------

constructors = [
    Credit,
    Debit,
    WalletTransfer,
    Deposit,
    Withdrawal,
    Payment,
    Void,
    PlaceHold,
    CaptureHold,
    ReleaseHold,
    ExpireHold,
    model.NewWallet,
    model.Unit,
]
# Fields checked under another name.
field_aliases = {"funding_source": "reference", "timeout": "timeout_s"}

odd_integers = st.one_of(
    st.integers(),
    st.integers(-3, 3),
    st.sampled_from(
        [
            amount_max,
            amount_max + 1,
            balance_min,
            balance_min - 1,
            2**64,
            -(2**64),
            model.hold_timeout_s_max,
            model.hold_timeout_s_max + 1,
        ]
    ),
)
lengths = st.sampled_from([0, 1, 32, 33, 64, 65, 128, 129, 256, 257, 512, 513, 1000, 1001, 5000])
odd_texts = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"\A[A-Za-z0-9_.\-]{1,40}\n?\Z"),
    st.builds(lambda character, length: character * length, st.characters(), lengths),
    st.builds(lambda text: text + "\x00", st.text(max_size=5)),
)
odd_metadata = st.one_of(
    st.dictionaries(odd_texts, odd_texts, max_size=4),
    st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), min_size=15, max_size=18),
)
enumerations = {"DebitMode": DebitMode, "OwnerKind": OwnerKind, "UnitKind": model.UnitKind}
values_by_type: dict[str, st.SearchStrategy[Any]] = {
    "int": odd_integers,
    "int | None": st.none() | odd_integers,
    "str": odd_texts,
    "bool": st.booleans(),
    "Mapping[str, str]": odd_metadata,
    "datetime | None": st.none() | st.datetimes(timezones=st.just(UTC)),
    "Owner | None": st.none() | st.builds(model.Owner, st.sampled_from(OwnerKind), odd_texts),
    **{name: st.sampled_from(kind) | odd_integers for name, kind in enumerations.items()},
}


@settings(max_examples=300, deadline=None)
@given(data=st.data(), constructor=st.sampled_from(constructors))
def test_constructors_build_or_name_the_field(data: st.DataObject, constructor: type) -> None:
    names = {each.name for each in dataclasses.fields(constructor)}
    arguments = {
        each.name: data.draw(values_by_type[str(each.type)], label=each.name)
        for each in dataclasses.fields(constructor)
        if each.name != "created_at" or data.draw(st.booleans())
    }
    try:
        built = constructor(**arguments)
    except errors.InvalidArgument as error:
        root = error.field.split("[")[0].split(" ")[0]
        assert field_aliases.get(root, root) in names, error.field
        return
    # Built: it is what was asked, and it can be told apart from other requests.
    for name, value in arguments.items():
        assert getattr(built, name) == value
    if hasattr(built, "request_hash"):
        assert len(built.request_hash()) == 16


def test_unit_codes_are_letters_digits_and_punctuation_only() -> None:
    """`$` in the pattern matches before a trailing newline: "EUR\\n" must not be a code."""
    with pytest.raises(errors.InvalidArgument):
        model.Unit(code="EUR\n", kind=model.UnitKind.currency, name="Euro")
    with pytest.raises(errors.InvalidArgument):
        model.NewWallet(
            idempotency_key="k", owner_id="o", owner_kind=OwnerKind.customer, unit="EUR\n"
        )
