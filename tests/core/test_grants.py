"""Grants in the rules: which funds a transfer draws, in which order, what it gives back, and
what expires — against the book alone, and against a model of a wallet as a list of grants.

A wallet's funds are its grants (funds with terms) and its untracked balance (funds that never
expire, valid when received; below 0, what it owes). Its available balance is always their sum
(`WalletState.untracked` is defined so); what the tests check is where each amount goes.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.core import errors, rules
from coffer.core.model import (
    CaptureHold,
    Credit,
    Debit,
    DebitMode,
    Deposit,
    ExpireGrant,
    Operation,
    OwnerKind,
    Payment,
    PlaceHold,
    ReleaseHold,
    SystemWallet,
    TransferKind,
    Void,
    WalletStatus,
    WalletTransfer,
)
from coffer.core.rules import Book, GrantState, HoldState, Posting, TransferState, WalletState

now = datetime(2026, 3, 1, 12, tzinfo=UTC)
day = timedelta(days=1)

operator, funding, expired_wallet = 1, 2, 3
ann, ben, shop = 10, 11, 12

_keys = itertools.count(1)
_ids = itertools.count(1000)


def make_book(*, ann_minimum: int = 0) -> Book:
    book = Book(
        system_wallets={
            ("seat", SystemWallet.operator): operator,
            ("seat", SystemWallet.funding): funding,
            ("seat", SystemWallet.expired): expired_wallet,
        }
    )
    for wallet_id, owner_kind, minimum in (
        (operator, OwnerKind.system, None),
        (funding, OwnerKind.system, None),
        (expired_wallet, OwnerKind.system, None),
        (ann, OwnerKind.customer, ann_minimum),
        (ben, OwnerKind.customer, 0),
        (shop, OwnerKind.merchant, 0),
    ):
        book.wallets[wallet_id] = WalletState(
            id=wallet_id,
            unit="seat",
            owner_kind=owner_kind,
            status=WalletStatus.active,
            balance_minimum=minimum,
            posted=0,
            pending=0,
        )
    return book


def key() -> str:
    return f"key-{next(_keys)}"


def apply(book: Book, operation: Operation, at: datetime = now) -> Posting:
    """Applies an operation and records it as the ledger would (ids for its transfer and the
    grants it made, what a void or a hold release needs later); returns its posting, with the
    grants' ids given."""
    [posting] = rules.apply(book, operation, at)
    transfer_id = next(_ids)
    given = {}
    for made in posting.new_grants:
        given[made.id] = next(_ids)
        del book.grants[made.id]
        made.id = given[made.id]
        book.grants[made.id] = made
        # Its id, part of the spending order: the wallet's queue is made anew, as a later
        # batch's book would.
        book.wallets[made.wallet_id].queue = None
    allocations = tuple((given.get(each, each), change) for each, change in posting.allocations)
    book.transfers[transfer_id] = TransferState(
        transfer_id,
        posting.kind,
        posting.source_wallet_id,
        posting.target_wallet_id,
        posting.amount,
    )
    book.transfer_allocations[transfer_id] = list(allocations)
    book.transfer_grants[transfer_id] = [made.id for made in posting.new_grants]
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
    applied[id(posting)] = transfer_id
    return posting


applied: dict[int, int] = {}


def transfer_id(posting: Posting) -> int:
    return applied[id(posting)]


def credit(
    book: Book,
    wallet_id: int,
    amount: int,
    expires_at: datetime | None = None,
    valid_from: datetime | None = None,
    at: datetime = now,
) -> Posting:
    return apply(
        book,
        Credit(
            idempotency_key=key(),
            wallet_id=wallet_id,
            amount=amount,
            expires_at=expires_at,
            valid_from=valid_from,
        ),
        at,
    )


def debit(
    book: Book,
    wallet_id: int,
    amount: int,
    mode: DebitMode = DebitMode.all_or_nothing,
    at: datetime = now,
) -> Posting:
    return apply(
        book, Debit(idempotency_key=key(), wallet_id=wallet_id, amount=amount, mode=mode), at
    )


def remaining(book: Book, posting: Posting) -> list[int]:
    return [book.grants[made.id].remaining for made in posting.new_grants]


def grant_of(posting: Posting) -> int:
    [made] = posting.new_grants
    return made.id


def check_sums(book: Book) -> None:
    for wallet in book.wallets.values():
        if wallet.owner_kind == OwnerKind.system:
            assert wallet.tracked == 0 and not wallet.grants
            continue
        assert wallet.tracked == sum(grant.remaining for grant in wallet.grants)
        assert wallet.untracked >= (wallet.balance_minimum or 0)


# Grants made -------------------------------------------------------------------------------------


def test_funds_that_never_expire_are_untracked() -> None:
    book = make_book()
    posting = credit(book, ann, 100)
    assert posting.new_grants == () and posting.allocations == ()
    assert book.wallets[ann].tracked == 0 and book.wallets[ann].untracked == 100


def test_a_credit_with_an_expiry_makes_a_grant() -> None:
    book = make_book()
    posting = credit(book, ann, 100, expires_at=now + 30 * day)
    [made] = posting.new_grants
    assert (made.amount, made.remaining, made.valid_from, made.expires_at) == (
        100,
        100,
        now,
        now + 30 * day,
    )
    assert book.wallets[ann].tracked == 100 and book.wallets[ann].untracked == 0


def test_funds_valid_later_are_not_spendable_until_then() -> None:
    book = make_book()
    credit(book, ann, 100, valid_from=now + day)
    wallet = book.wallets[ann]
    assert wallet.posted == 100 and rules.spendable(wallet, now) == 0
    with pytest.raises(errors.InsufficientFunds):
        rules.apply(book, Debit(idempotency_key=key(), wallet_id=ann, amount=1), now)
    assert rules.spendable(wallet, now + day) == 100
    debit(book, ann, 100, at=now + day)
    assert wallet.posted == 0


def test_the_units_default_validity_applies_without_an_expiry() -> None:
    @dataclass
    class SixMonths:
        def after(self, start: datetime) -> datetime:
            return start + 182 * day

    book = make_book()
    book.validities = {"seat": SixMonths()}
    posting = credit(book, ann, 5)
    assert posting.new_grants[0].expires_at == now + 182 * day
    explicit = credit(book, ann, 5, expires_at=now + day)
    assert explicit.new_grants[0].expires_at == now + day


def test_an_expiry_past_is_invalid() -> None:
    book = make_book()
    for expires_at in (now, now - day):
        with pytest.raises(errors.InvalidArgument) as caught:
            rules.apply(
                book,
                Credit(idempotency_key=key(), wallet_id=ann, amount=1, expires_at=expires_at),
                now,
            )
        assert caught.value.field == "expires_at"
    with pytest.raises(errors.InvalidArgument):
        Deposit(
            idempotency_key=key(),
            wallet_id=ann,
            amount=1,
            reference="bank",
            valid_from=now + 2 * day,
            expires_at=now + day,
        )
    with pytest.raises(errors.InvalidArgument):
        Credit(idempotency_key=key(), wallet_id=ann, amount=1, expires_at=datetime(2030, 1, 1))


def test_a_credit_into_a_wallet_that_owes_repays_first() -> None:
    book = make_book(ann_minimum=-50)
    debit(book, ann, 30)
    assert book.wallets[ann].untracked == -30
    posting = credit(book, ann, 100, expires_at=now + day)
    # 30 repaid the debt; only 70 is a grant.
    assert [made.amount for made in posting.new_grants] == [70]
    assert book.wallets[ann].untracked == 0 and book.wallets[ann].tracked == 70
    check_sums(book)


# The order of spending ---------------------------------------------------------------------------


def test_debits_draw_the_soonest_expiry_first_and_the_untracked_last() -> None:
    book = make_book()
    later = credit(book, ann, 10, expires_at=now + 20 * day)
    credit(book, ann, 100)
    sooner = credit(book, ann, 10, expires_at=now + 10 * day)
    never = credit(book, ann, 10, valid_from=now)
    posting = debit(book, ann, 15)
    assert posting.allocations == ((grant_of(sooner), -10), (grant_of(later), -5))
    assert remaining(book, later) == [5] and never.new_grants == ()
    posting = debit(book, ann, 50)
    assert posting.allocations == ((grant_of(later), -5),)
    assert book.wallets[ann].untracked == 65
    check_sums(book)


def test_among_equal_expiries_the_oldest_goes_first() -> None:
    book = make_book()
    first = credit(book, ann, 10, expires_at=now + day)
    second = credit(book, ann, 10, expires_at=now + day)
    posting = debit(book, ann, 12)
    assert posting.allocations == ((grant_of(first), -10), (grant_of(second), -2))


def test_grants_past_their_expiry_are_not_spent() -> None:
    book = make_book()
    credit(book, ann, 10, expires_at=now + day)
    credit(book, ann, 5)
    later = now + 2 * day
    assert rules.spendable(book.wallets[ann], later) == 5
    with pytest.raises(errors.InsufficientFunds):
        rules.apply(book, Debit(idempotency_key=key(), wallet_id=ann, amount=6), later)
    # An up-to debit takes what is spendable and reports the rest.
    posting = debit(book, ann, 8, DebitMode.up_to, at=later)
    assert (posting.amount, posting.amount_requested, posting.allocations) == (5, 8, ())


def test_a_transfer_keeps_the_expiries_of_what_it_moves() -> None:
    book = make_book()
    credit(book, ann, 10, expires_at=now + day)
    credit(book, ann, 10)
    posting = apply(
        book,
        WalletTransfer(
            idempotency_key=key(), source_wallet_id=ann, target_wallet_id=ben, amount=15
        ),
    )
    assert [(made.amount, made.expires_at) for made in posting.new_grants] == [(10, now + day)]
    assert book.wallets[ben].untracked == 5 and book.wallets[ben].tracked == 10
    check_sums(book)


def test_a_payment_pays_the_merchant_in_funds_that_never_expire() -> None:
    book = make_book()
    credit(book, ann, 10, expires_at=now + day)
    posting = apply(
        book,
        Payment(idempotency_key=key(), payer_wallet_id=ann, payee_wallet_id=shop, amount=10),
    )
    assert posting.new_grants == () and book.wallets[shop].untracked == 10


# Holds -------------------------------------------------------------------------------------------


def place(book: Book, amount: int) -> int:
    return transfer_id(
        apply(
            book,
            PlaceHold(idempotency_key=key(), wallet_id=ann, amount=amount, timeout_s=30 * 86400),
        )
    )


def test_a_hold_reserves_from_grants_and_its_release_returns_them() -> None:
    book = make_book()
    soon = credit(book, ann, 10, expires_at=now + day)
    credit(book, ann, 10)
    hold_id = place(book, 15)
    assert book.holds[hold_id].allocations == ((grant_of(soon), -10),)
    assert remaining(book, soon) == [0] and book.wallets[ann].untracked == 5
    posting = apply(book, ReleaseHold(idempotency_key=key(), hold_id=hold_id))
    assert posting.allocations == ((grant_of(soon), 10),)
    assert remaining(book, soon) == [10] and book.wallets[ann].untracked == 10
    check_sums(book)


def test_a_capture_after_a_reserved_grant_expired_captures_what_is_valid() -> None:
    book = make_book()
    soon = credit(book, ann, 10, expires_at=now + day)
    credit(book, ann, 10)
    hold_id = place(book, 15)
    posting = apply(book, CaptureHold(idempotency_key=key(), hold_id=hold_id), now + 2 * day)
    # Only the 5 from the untracked balance was still valid: the 10 returns to its grant, which
    # an expiration run then takes.
    assert (posting.amount, posting.amount_requested) == (5, 15)
    assert posting.allocations == ((grant_of(soon), 10),)
    assert book.wallets[ann].pending == 0 and remaining(book, soon) == [10]
    check_sums(book)


def test_a_capture_in_time_takes_the_grants_first() -> None:
    book = make_book()
    soon = credit(book, ann, 10, expires_at=now + day)
    credit(book, ann, 10)
    hold_id = place(book, 15)
    posting = apply(book, CaptureHold(idempotency_key=key(), hold_id=hold_id, amount=12))
    assert (posting.amount, posting.amount_requested, posting.allocations) == (12, None, ())
    # 10 from the grant, 2 of the 5 reserved from the untracked balance; 3 back to it.
    assert remaining(book, soon) == [0] and book.wallets[ann].untracked == 8
    check_sums(book)


# Voids -------------------------------------------------------------------------------------------


def void(book: Book, posting: Posting, expires_at: datetime | None = None) -> Posting:
    return apply(
        book, Void(idempotency_key=key(), transfer_id=transfer_id(posting), expires_at=expires_at)
    )


def test_the_void_of_a_debit_returns_each_amount_to_its_grant() -> None:
    book = make_book()
    first = credit(book, ann, 10, expires_at=now + day)
    second = credit(book, ann, 10, expires_at=now + 2 * day)
    credit(book, ann, 10)
    spent = debit(book, ann, 25)
    posting = void(book, spent)
    assert posting.allocations == ((grant_of(first), 10), (grant_of(second), 10))
    assert remaining(book, first) + remaining(book, second) == [10, 10]
    assert book.wallets[ann].untracked == 10
    check_sums(book)


def test_the_void_of_a_credit_removes_its_grant() -> None:
    book = make_book()
    granted = credit(book, ann, 10, expires_at=now + day)
    posting = void(book, granted)
    assert posting.allocations == ((grant_of(granted), -10),)
    assert book.wallets[ann].posted == 0 and book.wallets[ann].tracked == 0


def test_the_void_of_a_spent_credit_takes_the_rest_from_other_funds_or_is_refused() -> None:
    book = make_book()
    granted = credit(book, ann, 10, expires_at=now + day)
    debit(book, ann, 4)
    with pytest.raises(errors.GrantSpent):
        rules.apply(book, Void(idempotency_key=key(), transfer_id=transfer_id(granted)), now)
    credit(book, ann, 4)
    posting = void(book, granted)
    assert posting.allocations == ((grant_of(granted), -6),)
    assert (book.wallets[ann].posted, book.wallets[ann].untracked) == (0, 0)
    check_sums(book)


def test_the_void_of_a_transfer_takes_back_the_grants_it_made() -> None:
    book = make_book()
    source = credit(book, ann, 10, expires_at=now + day)
    moved = apply(
        book,
        WalletTransfer(
            idempotency_key=key(), source_wallet_id=ann, target_wallet_id=ben, amount=10
        ),
    )
    posting = void(book, moved)
    assert posting.allocations == ((grant_of(moved), -10), (grant_of(source), 10))
    assert remaining(book, source) == [10] and book.wallets[ben].posted == 0
    check_sums(book)


def test_expiration_and_its_void() -> None:
    book = make_book()
    granted = credit(book, ann, 10, expires_at=now + day)
    debit(book, ann, 3)
    grant_id = grant_of(granted)
    with pytest.raises(errors.GrantNotExpired):
        rules.apply(book, ExpireGrant(idempotency_key=key(), grant_id=grant_id), now)
    later = now + 2 * day
    expired = apply(book, ExpireGrant(idempotency_key=key(), grant_id=grant_id), later)
    assert (expired.kind, expired.source_wallet_id, expired.target_wallet_id, expired.amount) == (
        TransferKind.expiration,
        ann,
        expired_wallet,
        7,
    )
    assert book.grants[grant_id].expired == 7 and book.wallets[ann].posted == 0
    with pytest.raises(errors.GrantNotExpired):
        rules.apply(book, ExpireGrant(idempotency_key=key(), grant_id=grant_id), later)
    # Its void needs a new expiry, to come.
    for expires_at, field in ((None, "expires_at"), (now, "expires_at")):
        with pytest.raises(errors.InvalidArgument) as caught:
            rules.apply(
                book,
                Void(
                    idempotency_key=key(),
                    transfer_id=transfer_id(expired),
                    expires_at=expires_at,
                ),
                later,
            )
        assert caught.value.field == field
    [restored] = rules.apply(
        book,
        Void(idempotency_key=key(), transfer_id=transfer_id(expired), expires_at=later + day),
        later,
    )
    assert restored.allocations == ((grant_id, 7),)
    assert book.grants[grant_id].expires_at == later + day and book.grants[grant_id].remaining == 7
    assert rules.spendable(book.wallets[ann], later) == 7
    check_sums(book)


def test_an_expiry_only_for_the_void_of_an_expiration() -> None:
    book = make_book()
    granted = credit(book, ann, 10)
    with pytest.raises(errors.InvalidArgument):
        rules.apply(
            book,
            Void(
                idempotency_key=key(),
                transfer_id=transfer_id(granted),
                expires_at=now + day,
            ),
            now,
        )


def test_a_failed_linked_chain_undoes_its_grants() -> None:
    book = make_book()
    credit(book, ann, 10, expires_at=now + day)
    before = (book.wallets[ann].tracked, [grant.remaining for grant in book.wallets[ann].grants])
    operations = [
        Credit(idempotency_key=key(), wallet_id=ann, amount=5, expires_at=now + day, linked=True),
        Debit(idempotency_key=key(), wallet_id=ann, amount=12, linked=True),
        Debit(idempotency_key=key(), wallet_id=ann, amount=100),
    ]
    outcomes = rules.apply_all(book, operations, now)
    assert all(isinstance(outcome, errors.CofferError) for outcome in outcomes)
    after = (book.wallets[ann].tracked, [grant.remaining for grant in book.wallets[ann].grants])
    assert after == before and len(book.grants) == 1


def test_a_grant_restored_by_the_void_of_its_expiration_is_spent_at_once() -> None:
    """The void of an expiration gives its grant a new expiry: a debit at the same instant
    draws from it (the book's view of the wallet's grants, read before, follows)."""
    book = make_book()
    grant_id = grant_of(credit(book, ann, 10, expires_at=now + day))
    later = now + 2 * day
    expired = apply(book, ExpireGrant(idempotency_key=key(), grant_id=grant_id), later)
    credit(book, ann, 5, expires_at=later + 10 * day, at=later)
    assert rules.spendable(book.wallets[ann], later) == 5
    apply(
        book,
        Void(idempotency_key=key(), transfer_id=transfer_id(expired), expires_at=later + day),
        later,
    )
    assert debit(book, ann, 7, at=later).allocations == ((grant_id, -7),)
    check_sums(book)


def test_a_refused_debit_leaves_the_book_as_it_was() -> None:
    """What the book keeps to spend a wallet's grants faster is not part of its state."""
    book = make_book()
    credit(book, ann, 10, expires_at=now + day)
    before = copy.deepcopy(book)
    with pytest.raises(errors.InsufficientFunds):
        rules.apply(book, Debit(idempotency_key=key(), wallet_id=ann, amount=11), now)
    assert book.wallets[ann].queue is not None
    assert book == before


def test_a_chain_undone_puts_back_the_expiry_its_void_of_an_expiration_gave() -> None:
    """A linked chain that restores an expired grant and then fails is undone, its grant
    expired again: what a hold released later returns to the grant is not spendable."""
    book = make_book()
    grant_id = grant_of(credit(book, ann, 10, expires_at=now + day))
    hold_id = place(book, 4)
    later = now + 2 * day
    expired = apply(book, ExpireGrant(idempotency_key=key(), grant_id=grant_id), later)
    chain = [
        Void(
            idempotency_key=key(),
            transfer_id=transfer_id(expired),
            expires_at=later + day,
            linked=True,
        ),
        Debit(idempotency_key=key(), wallet_id=ann, amount=100),
    ]
    outcomes = rules.apply_all(book, chain, later)
    assert all(isinstance(outcome, errors.CofferError) for outcome in outcomes)
    assert book.grants[grant_id].expires_at == now + day
    apply(book, ReleaseHold(idempotency_key=key(), hold_id=hold_id), later)
    assert book.grants[grant_id].remaining == 4
    assert rules.spendable(book.wallets[ann], later) == 0
    with pytest.raises(errors.InsufficientFunds):
        rules.apply(book, Debit(idempotency_key=key(), wallet_id=ann, amount=4), later)
    check_sums(book)


# Against a model ---------------------------------------------------------------------------------


@dataclass
class ModelGrant:
    id: int
    remaining: int
    valid_from: datetime
    expires_at: datetime | None


@dataclass
class ModelWallet:
    """A wallet as a list of grants, and its untracked balance."""

    grants: list[ModelGrant]
    untracked: int
    minimum: int

    def valid(self, grant: ModelGrant, at: datetime) -> bool:
        return grant.valid_from <= at and (grant.expires_at is None or at < grant.expires_at)

    def spendable(self, at: datetime) -> int:
        return self.untracked + sum(
            grant.remaining for grant in self.grants if self.valid(grant, at)
        )

    def debit(self, amount: int, at: datetime) -> list[tuple[int, int]] | None:
        if self.spendable(at) - amount < self.minimum:
            return None
        drawn = []
        order = sorted(
            (grant for grant in self.grants if grant.remaining and self.valid(grant, at)),
            key=lambda grant: (grant.expires_at is None, grant.expires_at or at, grant.id),
        )
        for grant in order:
            taken = min(grant.remaining, amount)
            if taken:
                grant.remaining -= taken
                amount -= taken
                drawn.append((grant.id, -taken))
        self.untracked -= amount
        return drawn


steps = st.lists(
    st.one_of(
        st.tuples(
            st.just("credit"),
            st.integers(1, 50),
            st.one_of(st.none(), st.integers(1, 10)),
            st.integers(0, 3),
        ),
        st.tuples(st.just("debit"), st.integers(1, 80), st.none(), st.integers(0, 0)),
        st.tuples(st.just("wait"), st.integers(1, 4), st.none(), st.integers(0, 0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, minimum=st.sampled_from([0, -30]))
def test_spending_follows_the_model(
    steps: list[tuple[str, int, int | None, int]], minimum: int
) -> None:
    """Credits (with an expiry some days ahead or none, valid now or some days later), debits
    and time passing: each debit draws what the model draws, from the same grants, or fails
    where the model cannot cover it; every grant's remainder is the model's."""
    book = make_book(ann_minimum=minimum)
    model = ModelWallet([], 0, minimum)
    at = now
    for kind, amount, expires_in, starts_in in steps:
        if kind == "wait":
            at += amount * day
        elif kind == "credit":
            valid_from = at + starts_in * day
            expires_at = None if expires_in is None else valid_from + expires_in * day
            posting = credit(book, ann, amount, expires_at=expires_at, valid_from=valid_from, at=at)
            owed = max(0, -model.untracked)
            repaid = min(owed, amount)
            if expires_at is None and starts_in == 0:
                model.untracked += amount
                assert posting.new_grants == ()
            else:
                model.untracked += repaid
                if amount - repaid:
                    [made] = posting.new_grants
                    model.grants.append(
                        ModelGrant(made.id, amount - repaid, valid_from, expires_at)
                    )
                else:
                    assert posting.new_grants == ()
        else:
            expected = model.debit(amount, at)
            if expected is None:
                with pytest.raises(errors.InsufficientFunds):
                    rules.apply(
                        book, Debit(idempotency_key=key(), wallet_id=ann, amount=amount), at
                    )
            else:
                assert debit(book, ann, amount, at=at).allocations == tuple(expected)
        wallet = book.wallets[ann]
        assert wallet.untracked == model.untracked
        assert {grant.id: grant.remaining for grant in wallet.grants} == {
            grant.id: grant.remaining for grant in model.grants
        }
        assert rules.spendable(wallet, at) == model.spendable(at)
        check_sums(book)


def test_grant_state_spendable_matches_the_model() -> None:
    grant = GrantState(1, ann, 10, 10, now, now + day)
    model = ModelWallet([], 0, 0)
    for at in (now - day, now, now + day / 2, now + day, now + 2 * day):
        assert grant.spendable(at) == model.valid(ModelGrant(1, 10, now, now + day), at)


# Holds, voids and expiries together --------------------------------------------------------------


def test_a_hold_released_after_the_void_of_its_grant_does_not_bring_the_grant_back() -> None:
    """A credit's grant partly reserved by a hold, then the credit voided (the held part
    counted as spent, taken from the untracked balance), then the hold released: the held part
    returns to the untracked balance, not to the voided grant (else the wallet's own funds,
    which never expire, would expire)."""
    book = make_book()
    credit(book, ann, 10)
    granted = credit(book, ann, 10, expires_at=now + day)
    hold_id = place(book, 6)
    void(book, granted)
    apply(book, ReleaseHold(idempotency_key=key(), hold_id=hold_id))
    wallet = book.wallets[ann]
    assert (wallet.posted, wallet.pending) == (10, 0)
    assert remaining(book, granted) == [0] and wallet.untracked == 10
    check_sums(book)


def test_a_hold_captured_into_another_customers_wallet_keeps_the_expiries() -> None:
    """A transfer between wallets carries the expiries; so does a hold towards another
    customer's wallet, captured: else it would make expiring funds never expire."""
    book = make_book()
    credit(book, ann, 10, expires_at=now + day)
    placed = apply(
        book,
        PlaceHold(
            idempotency_key=key(), wallet_id=ann, target_wallet_id=ben, amount=10, timeout_s=60
        ),
    )
    apply(book, CaptureHold(idempotency_key=key(), hold_id=transfer_id(placed)))
    assert book.wallets[ben].tracked == 10
    assert [grant.expires_at for grant in book.wallets[ben].grants] == [now + day]


def test_the_void_of_a_transfer_whose_grant_expired_is_refused() -> None:
    """What a transfer carried expired in its target: its void would take the target's own
    funds for it (as if spent) and restore the source's grant, to expire again. It is refused
    until the expiration is voided."""
    book = make_book()
    credit(book, ann, 10, expires_at=now + day)
    moved = apply(
        book,
        WalletTransfer(
            idempotency_key=key(), source_wallet_id=ann, target_wallet_id=ben, amount=10
        ),
    )
    credit(book, ben, 10)
    later = now + 2 * day
    expired = apply(book, ExpireGrant(idempotency_key=key(), grant_id=grant_of(moved)), later)
    assert book.wallets[ben].posted == 10
    with pytest.raises(errors.NotVoidable):
        rules.apply(book, Void(idempotency_key=key(), transfer_id=transfer_id(moved)), later)
    assert book.wallets[ben].posted == 10
    # Voiding the expiration restores the grant to the target (with a new expiry); the
    # transfer stays, as a grant that expired once can never be taken back by a void.
    apply(
        book,
        Void(idempotency_key=key(), transfer_id=transfer_id(expired), expires_at=later + day),
        later,
    )
    assert book.wallets[ben].posted == 20
    with pytest.raises(errors.NotVoidable):
        rules.apply(book, Void(idempotency_key=key(), transfer_id=transfer_id(moved)), later)


def test_a_start_whose_default_expiry_falls_past_the_year_9999_is_invalid() -> None:
    """The unit's default validity after a start far ahead overflows `datetime`: that credit
    alone is invalid, not the whole batch (every operation coalesced into it)."""
    from coffer.core.validity import parse_validity

    book = make_book()
    book.validities = {"seat": parse_validity("P1Y", "default_validity")}
    far = Credit(
        idempotency_key=key(),
        wallet_id=ann,
        amount=1,
        valid_from=datetime(9999, 6, 1, tzinfo=UTC),
    )
    fine = Credit(idempotency_key=key(), wallet_id=ben, amount=1)
    outcomes = rules.apply_all(book, [far, fine], now)
    assert isinstance(outcomes[0], errors.InvalidArgument)
    assert outcomes[0].field == "valid_from"
    assert isinstance(outcomes[1], list)


def test_a_partial_capture_takes_in_the_order_reserved_however_stored() -> None:
    """The ledger reads a hold's reservations in no set order: a partial capture still takes
    the soonest expiry first."""
    book = make_book()
    later = credit(book, ann, 10, expires_at=now + 2 * day)
    sooner = credit(book, ann, 10, expires_at=now + day)
    hold_id = place(book, 20)
    hold = book.holds[hold_id]
    # Stored by grant id: the later expiry (the older grant) first.
    hold.allocations = tuple(sorted(hold.allocations))
    assert hold.allocations[0][0] == grant_of(later)
    apply(book, CaptureHold(idempotency_key=key(), hold_id=hold_id, amount=10))
    assert remaining(book, sooner) == [0] and remaining(book, later) == [10]
