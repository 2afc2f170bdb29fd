"""Validation: whether an operation can be applied to the locked state, and what it writes.

Pure and synchronous: `apply` takes the book (the states of the wallets, holds and earlier
transfers a batch touches, locked by the caller) and one operation; it either raises one
specific `CofferError`, leaving the book as it was, or returns the postings to write and
updates the book. Each function runs its checks first, then — after the line
`# Checks done.` — only writes, which cannot fail.

`apply_all` runs a batch in order, with linked chains applied all or nothing.

What an operation that moves money between the wallets it names posts is said once, by
`posting_of`: `apply` posts it once its checks pass, and the ledger writes it ahead, before it
locks any wallet (`expected_posting`), so that the locks are held only to validate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple, Protocol

from . import errors
from .model import (
    CaptureHold,
    Credit,
    Debit,
    DebitMode,
    Deposit,
    ExpireGrant,
    ExpireHold,
    Operation,
    Owner,
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
    balance_max,
    balance_min,
    check_grant_instant,
    grant_spendable,
    hold_lapsed,
    hold_status_resolved_by,
    posting_kinds,
)

__all__ = [
    "BalancesAfter",
    "Book",
    "GrantState",
    "HoldState",
    "Outcome",
    "Posting",
    "SpendQueue",
    "TransferState",
    "WalletState",
    "apply",
    "apply_all",
    "balances_after",
    "check_resolvable_by",
    "check_voidable_by",
    "expected_posting",
    "kept_refusals",
    "posting_of",
    "seal",
    "spend_order",
    "spend_queue",
    "spendable",
    "system_wallet_kinds",
    "unrecorded_pending",
    "wallets_named",
]


@dataclass(slots=True)
class WalletState:
    id: int
    unit: str
    owner_kind: OwnerKind
    status: WalletStatus
    # None for system wallets, which have no floor.
    balance_minimum: int | None
    posted: int
    pending: int
    # The owner's id, for operations limited to one owner's wallets (`Operation.owner_limit`).
    owner_id: str = ""
    # The balance alert (see model.Wallet) and how many times the wallet fell below it.
    low_balance_threshold: int | None = None
    top_up_to: int | None = None
    low_balance_crossings: int = 0
    # What the wallet's grants hold (the sum of their remainders), and, when it is not 0, its
    # grants with something left (the book loads them with the wallet), and those the batch
    # touches. What is not in grants is its untracked balance (`untracked`).
    tracked: int = 0
    grants: list[GrantState] = field(default_factory=list)
    # Its grants split at an instant, kept while neither the grants nor their terms change
    # (`spend_queue`); None when it must be made anew. A cache: not part of the wallet's
    # state (its equality, its repr).
    queue: SpendQueue | None = field(default=None, compare=False, repr=False)

    @property
    def available(self) -> int:
        return self.posted - self.pending

    @property
    def untracked(self) -> int:
        """Funds that never expire and are always valid, not kept as grants; below 0, what
        the wallet owes (it overdrew, down to its minimum)."""
        return self.posted - self.pending - self.tracked


@dataclass(slots=True)
class GrantState:
    """A grant, as the rules see it. A grant the batch makes has a provisional id, below 0,
    until it is written."""

    id: int
    wallet_id: int
    amount: int
    remaining: int
    valid_from: datetime
    expires_at: datetime | None
    expired: int = 0
    # Taken back by the void of the transfer that made it: what a hold reserved from it no
    # longer returns to it (the void took that much from the wallet's other funds).
    voided: bool = False

    def spendable(self, now: datetime) -> bool:
        return self.remaining > 0 and grant_spendable(self.valid_from, self.expires_at, now)

    def state(self) -> tuple[int, datetime | None, int, bool]:
        """What of a grant a batch may change (and undoes, and writes)."""
        return self.remaining, self.expires_at, self.expired, self.voided


class SpendQueue(NamedTuple):
    """A wallet's grants as of `at`: those valid then, in the order they are spent
    (`spend_order`), and the others (not valid yet, or past their expiry)."""

    at: datetime
    valid: list[GrantState]
    invalid: list[GrantState]


def spend_queue(wallet: WalletState, now: datetime) -> SpendQueue:
    """The wallet's grants as of `now`, sorted once while they and their terms stay as they
    are: what changes them (a grant made or undone, an expiry extended or restored) drops the
    wallet's queue."""
    queue = wallet.queue
    if queue is None or queue.at != now:
        valid: list[GrantState] = []
        invalid: list[GrantState] = []
        for grant in wallet.grants:
            (valid if _valid(grant, now) else invalid).append(grant)
        valid.sort(key=_spend_key)
        queue = wallet.queue = SpendQueue(now, valid, invalid)
    return queue


class Validity(Protocol):
    """A unit's default validity (coffer.core.validity.Validity)."""

    def after(self, start: datetime) -> datetime: ...


@dataclass(slots=True)
class HoldState:
    id: int
    source_wallet_id: int
    target_wallet_id: int
    amount: int
    expires_at: datetime
    # None while open; else the kind of transfer that resolved it.
    resolution: TransferKind | None = None
    # What it reserved from the source's grants: (grant id, change to its remainder), the
    # change below 0; the rest of its amount is from the untracked balance.
    allocations: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True, slots=True)
class TransferState:
    """An earlier transfer, as a void sees it."""

    id: int
    kind: TransferKind
    source_wallet_id: int
    target_wallet_id: int
    amount: int


class Posting(NamedTuple):
    """A transfer to write; the ledger gives it an id and the operation's details. A named
    tuple, not a dataclass: the rules make one or two a transfer, and a tuple is made in C."""

    kind: TransferKind
    source_wallet_id: int
    target_wallet_id: int
    amount: int
    amount_requested: int | None = None
    voids_transfer_id: int | None = None
    hold_id: int | None = None
    hold_expires_at: datetime | None = None
    # What it changed in grants (not part of the journal row, so not of `same_row`, by which a
    # transfer written ahead is confirmed): each (grant id, change to its remainder), and the
    # grants it made.
    allocations: tuple[tuple[int, int], ...] = ()
    new_grants: tuple[GrantState, ...] = ()

    def same_row(self, other: Posting) -> bool:
        """Whether the two write the same journal row."""
        return self[:_posting_row_fields] == other[:_posting_row_fields]


# The fields of a Posting that its journal row holds: those before `allocations`.
_posting_row_fields = Posting._fields.index("allocations")


@dataclass(slots=True)
class Book:
    wallets: dict[int, WalletState] = field(default_factory=dict)
    holds: dict[int, HoldState] = field(default_factory=dict)
    transfers: dict[int, TransferState] = field(default_factory=dict)
    voided: set[int] = field(default_factory=set)
    system_wallets: dict[tuple[str, SystemWallet], int] = field(default_factory=dict)
    # Every grant loaded or made, by id; the grants each earlier transfer (that a void names)
    # made; what each earlier transfer (that a void names) and each hold changed in grants.
    grants: dict[int, GrantState] = field(default_factory=dict)
    transfer_grants: dict[int, list[int]] = field(default_factory=dict)
    transfer_allocations: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    # The default validity of each unit that has one.
    validities: Mapping[str, Validity] = field(default_factory=dict)
    # The state of each grant before the batch first changed it, by id.
    grants_before: dict[int, tuple[int, datetime | None, int, bool]] = field(default_factory=dict)
    # While a linked chain runs: how to undo what it changed.
    undo: list[tuple[str, object, object]] | None = None

    def unit_of(self, wallet_id: int) -> str | None:
        wallet = self.wallets.get(wallet_id)
        return None if wallet is None else wallet.unit

    def adjust(self, wallet: WalletState, posted: int = 0, pending: int = 0) -> None:
        if self.undo is not None:
            self.undo.append(("wallet", wallet, (wallet.posted, wallet.pending, wallet.tracked)))
        wallet.posted += posted
        wallet.pending += pending
        assert wallet.pending >= 0, wallet
        assert balance_min <= wallet.posted <= balance_max, wallet

    def _touch(self, grant: GrantState) -> None:
        """Before a grant first changes: its state as read (see `grants_before`)."""
        if grant.id not in self.grants_before:
            self.grants_before[grant.id] = grant.state()

    def change_grant(self, wallet: WalletState, grant: GrantState, change: int) -> None:
        """Adds `change` to what is left of a grant of the wallet."""
        if self.undo is not None:
            self.undo.append(("wallet", wallet, (wallet.posted, wallet.pending, wallet.tracked)))
            self.undo.append(("grant", grant, grant.state()))
        self._touch(grant)
        grant.remaining += change
        wallet.tracked += change
        assert 0 <= grant.remaining <= grant.amount, grant

    def expire_grant(self, wallet: WalletState, grant: GrantState) -> int:
        """Takes what is left of a grant, as expired; returns it."""
        amount = grant.remaining
        self.change_grant(wallet, grant, -amount)
        grant.expired += amount
        return amount

    def extend_grant(self, grant: GrantState, expires_at: datetime) -> None:
        if self.undo is not None:
            self.undo.append(("grant", grant, grant.state()))
        self._touch(grant)
        grant.expires_at = expires_at
        self.wallets[grant.wallet_id].queue = None

    def void_grant(self, grant: GrantState) -> None:
        if self.undo is not None:
            self.undo.append(("grant", grant, grant.state()))
        self._touch(grant)
        grant.voided = True

    def changed_grants(self) -> tuple[list[GrantState], list[GrantState]]:
        """The grants read (not made by the batch) whose state the batch changed: those to
        write, as two lists: those whose remainder alone changed (draws and returns: most),
        and the others."""
        remainders: list[GrantState] = []
        others: list[GrantState] = []
        for grant_id, before in self.grants_before.items():
            if grant_id < 0:
                continue
            grant = self.grants[grant_id]
            after = grant.state()
            if after != before:
                (remainders if after[1:] == before[1:] else others).append(grant)
        return remainders, others

    def add_grant(
        self,
        wallet: WalletState,
        amount: int,
        valid_from: datetime,
        expires_at: datetime | None,
    ) -> GrantState:
        """A new grant of the wallet, with a provisional id."""
        grant = GrantState(-len(self.grants) - 1, wallet.id, amount, 0, valid_from, expires_at)
        while grant.id in self.grants:
            grant.id -= 1
        if self.undo is not None:
            self.undo.append(("new grant", wallet, grant))
        self.grants[grant.id] = grant
        wallet.grants.append(grant)
        wallet.queue = None
        # The amount is added as a change, so that the wallet's tracked sum follows.
        grant.remaining = 0
        self.change_grant(wallet, grant, amount)
        return grant

    def resolve(self, hold: HoldState, kind: TransferKind) -> None:
        if self.undo is not None:
            self.undo.append(("hold", hold, hold.resolution))
        hold.resolution = kind

    def mark_voided(self, transfer_id: int) -> None:
        if self.undo is not None:
            self.undo.append(("voided", transfer_id, None))
        self.voided.add(transfer_id)

    def rollback(self) -> None:
        assert self.undo is not None
        for kind, target, before in reversed(self.undo):
            if kind == "wallet":
                assert isinstance(target, WalletState) and isinstance(before, tuple)
                target.posted, target.pending, target.tracked = before
            elif kind == "grant":
                assert isinstance(target, GrantState) and isinstance(before, tuple)
                target.remaining, target.expires_at, target.expired, target.voided = before
                self.wallets[target.wallet_id].queue = None
            elif kind == "new grant":
                assert isinstance(target, WalletState) and isinstance(before, GrantState)
                target.grants.remove(before)
                # (Dropped already by the "grant" entry the new grant's amount made: said
                # here too, where the grant leaves.)
                target.queue = None
                del self.grants[before.id]
            elif kind == "hold":
                assert isinstance(target, HoldState)
                assert before is None or isinstance(before, TransferKind)
                target.resolution = before
            else:
                assert isinstance(target, int)
                self.voided.discard(target)
        self.undo.clear()


Outcome = list[Posting] | errors.CofferError
# The balances right after a transfer: its source's posted and pending, its target's.
BalancesAfter = tuple[int, int, int, int]
# The pending of a balance not recorded (no balance is ever pending below 0): a lapsed hold's
# target, when the batch that releases the hold (having locked its source) did not lock it;
# the release does not change it.
unrecorded_pending = -1


def balances_after(book: Book, postings: list[Posting]) -> BalancesAfter:
    """The balances of the wallets of an operation's one transfer, as `apply` left them (a
    wallet not in the book: unrecorded, see `unrecorded_pending`)."""
    assert len(postings) == 1, postings
    posting = postings[0]
    source = book.wallets[posting.source_wallet_id]
    target = book.wallets.get(posting.target_wallet_id)
    if target is None:
        assert posting.kind == TransferKind.hold_expiry, posting
        return source.posted, source.pending, 0, unrecorded_pending
    return source.posted, source.pending, target.posted, target.pending


def apply_all(
    book: Book,
    operations: Sequence[Operation | Rejected],
    now: datetime,
    settled: Mapping[int, errors.CofferError | None] | None = None,
    after: dict[int, BalancesAfter] | None = None,
) -> list[Outcome]:
    """Applies operations in order. The indexes in `settled` were settled before: with None,
    elsewhere (a replay), succeeding with nothing to write; with an error, failing with it.
    A failing operation fails only itself, unless it is in a linked chain: then the whole
    chain is undone, the failing operation keeps its error, those after it that are invalid
    or were settled with an error keep theirs, and the others fail with
    LinkedOperationFailed. `after`, if given, gets the balances after each operation that
    succeeded anew (`balances_after`), by index (an undone chain's stay, with its errors)."""
    settled = settled or {}
    outcomes: list[Outcome] = []
    for chain_indexes in _chains(operations):
        start, end = chain_indexes.start, chain_indexes.stop - 1
        if operations[end].linked:
            # A chain left open by the batch's last operation.
            outcomes.extend(_linked_failed() for _ in range(start, end))
            outcomes.append(_open_chain())
            break
        book.undo = [] if end > start else None
        chain: list[Outcome] = []
        for index in chain_indexes:
            operation = operations[index]
            if isinstance(operation, Rejected):
                error = operation.error
            elif index in settled:
                prior = settled[index]
                if prior is None:
                    chain.append([])
                    continue
                error = prior
            else:
                try:
                    postings = apply(book, operation, now)
                except errors.CofferError as raised:
                    error = raised
                else:
                    chain.append(postings)
                    if after is not None:
                        after[index] = balances_after(book, postings)
                    continue
            chain.append(error)
            if book.undo is not None:
                book.rollback()
                chain = [
                    outcome if isinstance(outcome, errors.CofferError) else _linked_failed()
                    for outcome in chain
                ]
                chain.extend(
                    _failed_with_chain(operations, settled, later)
                    for later in range(index + 1, end + 1)
                )
                break
        book.undo = None
        outcomes.extend(chain)
    return outcomes


def _chains(operations: Sequence[Operation | Rejected]) -> Iterator[range]:
    """The indexes of each linked chain of a batch, in order: a chain runs up to and with
    the first operation not linked (a lone operation is a chain of one). The last chain is
    left open when the batch ends linked."""
    start = 0
    for index, operation in enumerate(operations):
        if not operation.linked:
            yield range(start, index + 1)
            start = index + 1
    if start < len(operations):
        yield range(start, len(operations))


def kept_refusals(
    operations: Sequence[Operation | Rejected],
    outcomes: Sequence[Outcome],
    settled: Mapping[int, errors.CofferError | None],
) -> list[int]:
    """The operations refused anew whose refusals are kept under their keys, so that a retry
    gets the same answer: refusals for a reason of state (`CofferError.refusal`). A chain
    that failed for any other reason (an invalid operation, a reused key) never ran: none of
    its answers is kept. Hold expiry is the ledger's own, retried by design: never kept."""
    kept: list[int] = []
    for chain in _chains(operations):
        failures = [outcomes[index] for index in chain if isinstance(outcomes[index], Exception)]
        if not failures or not all(
            isinstance(failure, errors.CofferError) and failure.refusal for failure in failures
        ):
            continue
        kept.extend(
            index
            for index in chain
            if index not in settled
            and not isinstance(operations[index], Rejected | ExpireHold | ExpireGrant)
        )
    return kept


def seal(operations: Sequence[Operation | Rejected]) -> list[Operation | Rejected]:
    """A batch as it may be applied, also after others: its last operation, if linked (a
    chain left open), is rejected, and so fails its chain."""
    sealed = list(operations)
    if sealed and sealed[-1].linked:
        sealed[-1] = Rejected(_open_chain())
    return sealed


def posting_of(
    operation: Operation,
    unit_of: Callable[[int], str | None],
    system_wallets: Mapping[tuple[str, SystemWallet], int],
) -> Posting | None:
    """What an operation that moves posted money between the wallets it names posts if it
    succeeds: of what kind, from which wallet, to which, how much. For an up-to debit,
    `amount_requested` is what was asked, and `amount` the most it moves: `apply` lowers it to
    what the wallet can spare. None for the others, whose posting the state decides (a void
    reverses its transfer, a capture or a release follows its hold) or which post no move (a
    hold reserves), and where the unit of a wallet named is not known (it may not exist).
    `unit_of` says a wallet's unit, or None."""
    posting = _postings.get(type(operation))
    return None if posting is None else posting(operation, unit_of, system_wallets)


_UnitOf = Callable[[int], str | None]
_SystemWallets = Mapping[tuple[str, SystemWallet], int]


def _credit_posting(
    operation: Credit, unit_of: _UnitOf, system_wallets: _SystemWallets
) -> Posting | None:
    unit = unit_of(operation.wallet_id)
    if unit is None:
        return None
    operator = system_wallets[(unit, SystemWallet.operator)]
    return Posting(TransferKind.credit, operator, operation.wallet_id, operation.amount)


def _debit_posting(
    operation: Debit, unit_of: _UnitOf, system_wallets: _SystemWallets
) -> Posting | None:
    unit = unit_of(operation.wallet_id)
    if unit is None:
        return None
    operator = system_wallets[(unit, SystemWallet.operator)]
    if operation.mode == DebitMode.up_to:
        return Posting(
            TransferKind.debit,
            operation.wallet_id,
            operator,
            operation.amount,
            amount_requested=operation.amount,
        )
    return Posting(TransferKind.debit, operation.wallet_id, operator, operation.amount)


def _transfer_posting(
    operation: WalletTransfer, unit_of: _UnitOf, system_wallets: _SystemWallets
) -> Posting:
    return Posting(
        TransferKind.transfer,
        operation.source_wallet_id,
        operation.target_wallet_id,
        operation.amount,
    )


def _deposit_posting(
    operation: Deposit, unit_of: _UnitOf, system_wallets: _SystemWallets
) -> Posting | None:
    unit = unit_of(operation.wallet_id)
    if unit is None:
        return None
    funding = system_wallets[(unit, SystemWallet.funding)]
    return Posting(TransferKind.deposit, funding, operation.wallet_id, operation.amount)


def _withdrawal_posting(
    operation: Withdrawal, unit_of: _UnitOf, system_wallets: _SystemWallets
) -> Posting | None:
    unit = unit_of(operation.wallet_id)
    if unit is None:
        return None
    funding = system_wallets[(unit, SystemWallet.funding)]
    return Posting(TransferKind.withdrawal, operation.wallet_id, funding, operation.amount)


def _payment_posting(
    operation: Payment, unit_of: _UnitOf, system_wallets: _SystemWallets
) -> Posting:
    return Posting(
        TransferKind.payment,
        operation.payer_wallet_id,
        operation.payee_wallet_id,
        operation.amount,
    )


# By kind, looked up by type: quicker than matching, in the write-ahead's loop.
_postings: dict[type[Operation], Callable[[Any, _UnitOf, _SystemWallets], Posting | None]] = {
    Credit: _credit_posting,
    Debit: _debit_posting,
    WalletTransfer: _transfer_posting,
    Deposit: _deposit_posting,
    Withdrawal: _withdrawal_posting,
    Payment: _payment_posting,
}


def expected_posting(
    operation: Operation,
    unit_of: Callable[[int], str | None],
    system_wallets: Mapping[tuple[str, SystemWallet], int],
) -> Posting | None:
    """The posting `apply` makes of an operation if it succeeds, where that does not depend
    on the wallets' state: `posting_of`, but not an up-to debit's, whose amount the balance
    decides. Such a posting may be written before the wallets are locked, and `apply` then
    only confirms it."""
    posting = posting_of(operation, unit_of, system_wallets)
    if posting is None or posting.amount_requested is not None:
        return None
    return posting


# The operations that move money with a system wallet of their wallet's unit: credits and
# debits with the operator, which issues and takes units back; deposits and withdrawals with
# funding, the world outside; a hold placed without a target holds for the operator.
system_wallet_kinds: frozenset[type[Operation]] = frozenset(
    {Credit, Debit, Deposit, Withdrawal, PlaceHold}
)


def wallets_named(operation: Operation | Rejected) -> tuple[int, ...]:
    """The wallets an operation names itself (not through a transfer or a hold)."""
    match operation:
        case Credit() | Debit() | Deposit() | Withdrawal():
            return (operation.wallet_id,)
        case WalletTransfer():
            return (operation.source_wallet_id, operation.target_wallet_id)
        case Payment():
            return (operation.payer_wallet_id, operation.payee_wallet_id)
        case PlaceHold():
            if operation.target_wallet_id is None:
                return (operation.wallet_id,)
            return (operation.wallet_id, operation.target_wallet_id)
    return ()


def _failed_with_chain(
    operations: Sequence[Operation | Rejected],
    settled: Mapping[int, errors.CofferError | None],
    index: int,
) -> errors.CofferError:
    """The answer of an operation after the one that failed its chain: its own error if it
    is invalid or failed before, else LinkedOperationFailed."""
    operation = operations[index]
    if isinstance(operation, Rejected):
        return operation.error
    return settled.get(index) or _linked_failed()


def _open_chain() -> errors.CofferError:
    return errors.InvalidArgument("linked", "the last operation of a batch cannot be linked")


def _linked_failed() -> errors.CofferError:
    return errors.LinkedOperationFailed("another operation of the linked chain failed")


def apply(book: Book, operation: Operation, now: datetime) -> list[Posting]:
    if operation.owner_limit is not None:
        _check_owner(book, operation, operation.owner_limit)
    match operation:
        case Credit():
            return _credit(book, operation, now)
        case Debit():
            return _debit(book, operation, now)
        case WalletTransfer():
            return _transfer(book, operation, now)
        case Deposit():
            return _deposit(book, operation, now)
        case Withdrawal():
            return _withdrawal(book, operation, now)
        case Payment():
            return _payment(book, operation, now)
        case Void():
            return _void(book, operation, now)
        case PlaceHold():
            return _place_hold(book, operation, now)
        case CaptureHold():
            return _capture_hold(book, operation, now)
        case ReleaseHold():
            return _release_hold(book, operation, now)
        case ExpireHold():
            return _expire_hold(book, operation, now)
        case ExpireGrant():
            return _expire_grant(book, operation, now)
    raise AssertionError(f"unknown operation {operation!r}")


def _credit(book: Book, operation: Credit, now: datetime) -> list[Posting]:
    wallet = _user_wallet(book, operation.wallet_id)
    posting = _credit_posting(operation, book.unit_of, book.system_wallets)
    assert posting is not None
    terms = _terms(book, wallet, operation.valid_from, operation.expires_at, now)
    source, target = _check_posting(book, posting, now)
    # Checks done.
    return [_move(book, posting, source, target, now, parts=[(posting.amount, *terms)])]


def _debit(book: Book, operation: Debit, now: datetime) -> list[Posting]:
    wallet = _user_wallet(book, operation.wallet_id)
    posting = _debit_posting(operation, book.unit_of, book.system_wallets)
    assert posting is not None
    if operation.mode == DebitMode.up_to:
        assert wallet.balance_minimum is not None
        spare = max(0, spendable(wallet, now) - wallet.balance_minimum)
        posting = posting._replace(amount=min(posting.amount, spare))
    source, target = _check_posting(book, posting, now)
    # Checks done.
    return [_move(book, posting, source, target, now)]


def _transfer(book: Book, operation: WalletTransfer, now: datetime) -> list[Posting]:
    _wallet_pair(book, operation.source_wallet_id, operation.target_wallet_id)
    posting = _transfer_posting(operation, book.unit_of, book.system_wallets)
    source, target = _check_posting(book, posting, now)
    # Checks done.
    return [_move(book, posting, source, target, now, carry=True)]


def _deposit(book: Book, operation: Deposit, now: datetime) -> list[Posting]:
    wallet = _user_wallet(book, operation.wallet_id)
    posting = _deposit_posting(operation, book.unit_of, book.system_wallets)
    assert posting is not None
    terms = _terms(book, wallet, operation.valid_from, operation.expires_at, now)
    source, target = _check_posting(book, posting, now)
    # Checks done.
    return [_move(book, posting, source, target, now, parts=[(posting.amount, *terms)])]


def _withdrawal(book: Book, operation: Withdrawal, now: datetime) -> list[Posting]:
    _user_wallet(book, operation.wallet_id)
    posting = _withdrawal_posting(operation, book.unit_of, book.system_wallets)
    assert posting is not None
    source, target = _check_posting(book, posting, now)
    # Checks done.
    return [_move(book, posting, source, target, now)]


def _payment(book: Book, operation: Payment, now: datetime) -> list[Posting]:
    payer, payee = _wallet_pair(book, operation.payer_wallet_id, operation.payee_wallet_id)
    if payer.owner_kind != OwnerKind.customer:
        raise errors.WalletKindMismatch(f"payer wallet {payer.id} is not a customer's")
    if payee.owner_kind != OwnerKind.merchant:
        raise errors.WalletKindMismatch(f"payee wallet {payee.id} is not a merchant's")
    posting = _payment_posting(operation, book.unit_of, book.system_wallets)
    source, target = _check_posting(book, posting, now)
    # Checks done.
    return [_move(book, posting, source, target, now)]


def _void(book: Book, operation: Void, now: datetime) -> list[Posting]:
    """The reverse of a transfer, back from its target to its source. The target gives back
    first what is left of the grants the transfer made there, then, for what of them was
    spent, its other funds in the order of a debit (if they cannot cover it: GrantSpent). The
    source gets back into each of its grants what the transfer took from it (the void of an
    expiration, with the new expiry it names); the rest into its untracked balance."""
    original = book.transfers.get(operation.transfer_id)
    if original is None:
        raise errors.TransferNotFound(f"transfer {operation.transfer_id} does not exist")
    if original.kind == TransferKind.void:
        raise errors.NotVoidable(f"transfer {original.id} is a void; a void cannot be voided")
    if original.kind not in posting_kinds:
        raise errors.NotVoidable(
            f"transfer {original.id} is a {original.kind.name}, which moves no posted money"
        )
    if original.id in book.voided:
        raise errors.AlreadyVoided(f"transfer {original.id} is voided already")
    if original.kind == TransferKind.expiration:
        if operation.expires_at is None:
            raise errors.InvalidArgument(
                "expires_at", "is required to void an expiration: the grant's new expiry"
            )
        _check_future("expires_at", operation.expires_at, now)
    elif operation.expires_at is not None:
        raise errors.InvalidArgument("expires_at", "is only for the void of an expiration")
    # The reverse: back from the original target to the original source.
    source = _wallet(book, original.target_wallet_id)
    target = _wallet(book, original.source_wallet_id)
    _check_active(source)
    _check_active(target)
    own = [book.grants[grant_id] for grant_id in book.transfer_grants.get(original.id, ())]
    if any(grant.expired for grant in own):
        raise errors.NotVoidable(
            f"what transfer {original.id} granted wallet {source.id} expired in part: its void "
            "would take back what expired (void the expiration first)"
        )
    _check_give_back(source, target, original, own, now)
    # Checks done.
    book.mark_voided(original.id)
    drawn = _draw(book, source, original.amount, now, first=own)
    for grant in own:
        book.void_grant(grant)
    restored = []
    for grant_id, change in _net(book.transfer_allocations.get(original.id, ())):
        grant = book.grants[grant_id]
        if grant.wallet_id != target.id or change >= 0:
            continue
        book.change_grant(target, grant, -change)
        if operation.expires_at is not None:
            book.extend_grant(grant, operation.expires_at)
        restored.append((grant_id, -change))
    book.adjust(source, posted=-original.amount)
    book.adjust(target, posted=original.amount)
    return [
        Posting(
            TransferKind.void,
            source.id,
            target.id,
            original.amount,
            voids_transfer_id=original.id,
            allocations=(*drawn, *restored),
        )
    ]


def _place_hold(book: Book, operation: PlaceHold, now: datetime) -> list[Posting]:
    wallet = _user_wallet(book, operation.wallet_id)
    if operation.target_wallet_id is None:
        target = _system_wallet(book, wallet.unit, SystemWallet.operator)
    else:
        wallet, target = _wallet_pair(book, operation.wallet_id, operation.target_wallet_id)
    _check_move(wallet, target, operation.amount, now)
    # Checks done: the hold reserves from the wallet's grants as a debit draws.
    drawn = _draw(book, wallet, operation.amount, now)
    book.adjust(wallet, pending=operation.amount)
    expires_at = now + timedelta(seconds=operation.timeout_s)
    return [
        Posting(
            TransferKind.hold,
            wallet.id,
            target.id,
            operation.amount,
            hold_expires_at=expires_at,
            allocations=tuple(drawn),
        )
    ]


def _capture_hold(book: Book, operation: CaptureHold, now: datetime) -> list[Posting]:
    """Captures what is asked of a hold, as far as what it reserved is still valid: what it
    reserved from grants since expired is released to them, and the capture, short of what
    was asked, says what was (`amount_requested`). It captures from the grants first, in the
    order the hold reserved from them, then from the untracked balance; the rest of the hold
    returns to its grants (to the untracked balance from a grant voided since). Captured into
    a customer's wallet, the funds keep their expiries, as a transfer's; into a merchant's they
    never expire, as a payment's."""
    hold = _open_hold(book, operation.hold_id, now)
    asked = hold.amount if operation.amount is None else operation.amount
    if asked > hold.amount:
        raise errors.CaptureExceedsHold(
            f"hold {hold.id} holds {hold.amount}; cannot capture {asked}"
        )
    source = _wallet(book, hold.source_wallet_id)
    target = _wallet(book, hold.target_wallet_id)
    _check_active(target)
    lapsed = sum(
        change for grant_id, change in hold.allocations if not _valid(book.grants[grant_id], now)
    )
    amount = min(asked, hold.amount + lapsed)
    if target.posted + amount > balance_max:
        raise errors.BalanceOverflow(f"wallet {target.id} would exceed {balance_max}")
    # Checks done: the source keeps its floor, as the hold reserved more than is captured.
    book.resolve(hold, TransferKind.capture)
    left = amount
    returned = []
    captured = []
    # In the order reserved: the order of spending (whatever order they were stored in).
    reserved = sorted(hold.allocations, key=lambda each: _spend_key(book.grants[each[0]]))
    for grant_id, change in reserved:
        grant = book.grants[grant_id]
        taken = min(-change, left) if _valid(grant, now) else 0
        left -= taken
        if taken:
            captured.append((grant_id, -taken))
        if -change - taken and not grant.voided:
            book.change_grant(source, grant, -change - taken)
            returned.append((grant_id, -change - taken))
    made: list[GrantState] = []
    if target.owner_kind == OwnerKind.customer:
        made = _receive(book, target, _carried(book, captured, amount, now), now)
    book.adjust(source, posted=-amount, pending=-hold.amount)
    book.adjust(target, posted=amount)
    return [
        Posting(
            TransferKind.capture,
            source.id,
            target.id,
            amount,
            amount_requested=asked if amount < asked else None,
            hold_id=hold.id,
            allocations=tuple(returned),
            new_grants=tuple(made),
        )
    ]


def _release_hold(book: Book, operation: ReleaseHold, now: datetime) -> list[Posting]:
    hold = _open_hold(book, operation.hold_id, now)
    # Checks done.
    return [_unhold(book, hold, TransferKind.release)]


def _expire_hold(book: Book, operation: ExpireHold, now: datetime) -> list[Posting]:
    hold = _hold(book, operation.hold_id)
    if hold.resolution is not None:
        raise errors.HoldNotPending(f"hold {hold.id} is {_resolution_name(hold)} already")
    if not hold_lapsed(hold.expires_at, now):
        raise errors.HoldNotPending(f"hold {hold.id} has not expired")
    # Checks done.
    return [_unhold(book, hold, TransferKind.hold_expiry)]


def _expire_grant(book: Book, operation: ExpireGrant, now: datetime) -> list[Posting]:
    grant = book.grants.get(operation.grant_id)
    if grant is None:
        raise errors.GrantNotFound(f"grant {operation.grant_id} does not exist")
    if grant.expires_at is None or now < grant.expires_at:
        when = "never" if grant.expires_at is None else f"at {grant.expires_at.isoformat()}"
        raise errors.GrantNotExpired(f"grant {grant.id} expires {when}")
    if not grant.remaining:
        raise errors.GrantNotExpired(f"grant {grant.id} has nothing left to expire")
    wallet = book.wallets[grant.wallet_id]
    target = _system_wallet(book, wallet.unit, SystemWallet.expired)
    if target.posted + grant.remaining > balance_max:
        raise errors.BalanceOverflow(f"wallet {target.id} would exceed {balance_max}")
    # Checks done.
    amount = book.expire_grant(wallet, grant)
    book.adjust(wallet, posted=-amount)
    book.adjust(target, posted=amount)
    return [
        Posting(
            TransferKind.expiration,
            wallet.id,
            target.id,
            amount,
            allocations=((grant.id, -amount),),
        )
    ]


# Lookups and checks ----------------------------------------------------------------------------


def _check_owner(book: Book, operation: Operation, owner: Owner) -> None:
    """For an operation limited to one owner's wallets, first of all its checks: the wallet it
    acts on as that owner is theirs (a debit's, a withdrawal's, a payment's payer, a hold's
    source), or the transfer it voids or the hold it resolves touches a wallet of theirs; else
    it is not found, as a missing one is, so that ids of others tell nothing. A void must be of
    a payment into a wallet of theirs (a refund), a capture or a release of a hold towards one:
    else PermissionDenied."""
    match operation:
        case Credit() | Debit() | Deposit() | Withdrawal() | PlaceHold():
            _owned_wallet(book, operation.wallet_id, owner)
        case WalletTransfer():
            _owned_wallet(book, operation.source_wallet_id, owner)
        case Payment():
            _owned_wallet(book, operation.payer_wallet_id, owner)
        case Void():
            original = book.transfers.get(operation.transfer_id)
            if original is None or not (
                _owns(book, original.source_wallet_id, owner)
                or _owns(book, original.target_wallet_id, owner)
            ):
                raise errors.TransferNotFound(f"transfer {operation.transfer_id} does not exist")
            check_voidable_by(
                owner, original.id, original.kind, _owns(book, original.target_wallet_id, owner)
            )
        case CaptureHold() | ReleaseHold():
            hold = book.holds.get(operation.hold_id)
            if hold is None or not (
                _owns(book, hold.source_wallet_id, owner)
                or _owns(book, hold.target_wallet_id, owner)
            ):
                raise errors.HoldNotFound(f"hold {operation.hold_id} does not exist")
            check_resolvable_by(owner, hold.id, _owns(book, hold.target_wallet_id, owner))
        case _:
            raise AssertionError(f"{type(operation).__name__} is not limited to an owner")


def check_voidable_by(
    owner: Owner, transfer_id: int, kind: TransferKind, target_owned: bool
) -> None:
    """An owner may void, of the transfers it sees, only payments into its own wallets (a
    refund); else PermissionDenied. (The ledger checks it before a batch too, so that a batch
    with such a void is refused whole: `Ledger.check_owner_limits`.)"""
    if kind != TransferKind.payment or not target_owned:
        raise errors.PermissionDenied(
            f"a {owner.kind.name} may void only payments into its own wallets: "
            f"transfer {transfer_id} is not one"
        )


def check_resolvable_by(owner: Owner, hold_id: int, target_owned: bool) -> None:
    """An owner may capture or release, of the holds it sees, only holds towards its own
    wallets; else PermissionDenied."""
    if not target_owned:
        raise errors.PermissionDenied(
            f"a {owner.kind.name} may capture or release only holds towards its own "
            f"wallets: hold {hold_id} is not one"
        )


def _owns(book: Book, wallet_id: int, owner: Owner) -> bool:
    wallet = book.wallets.get(wallet_id)
    return wallet is not None and owner.owns(wallet.owner_kind, wallet.owner_id)


def _owned_wallet(book: Book, wallet_id: int, owner: Owner) -> None:
    if not _owns(book, wallet_id, owner):
        raise errors.WalletNotFound(f"wallet {wallet_id} does not exist")


def _wallet(book: Book, wallet_id: int) -> WalletState:
    wallet = book.wallets.get(wallet_id)
    if wallet is None:
        raise errors.WalletNotFound(f"wallet {wallet_id} does not exist")
    return wallet


def _user_wallet(book: Book, wallet_id: int) -> WalletState:
    """A customer's or merchant's active wallet: system wallets are moved only by the ledger."""
    wallet = _wallet(book, wallet_id)
    if wallet.owner_kind == OwnerKind.system:
        raise errors.WalletKindMismatch(f"wallet {wallet_id} is a system wallet")
    _check_active(wallet)
    return wallet


def _wallet_pair(book: Book, source_id: int, target_id: int) -> tuple[WalletState, WalletState]:
    if source_id == target_id:
        raise errors.SameWallet(f"source and target are both wallet {source_id}")
    source = _user_wallet(book, source_id)
    target = _user_wallet(book, target_id)
    if source.unit != target.unit:
        raise errors.UnitMismatch(
            f"wallet {source.id} holds {source.unit}, wallet {target.id} holds {target.unit}"
        )
    return source, target


def _system_wallet(book: Book, unit: str, which: SystemWallet) -> WalletState:
    wallet_id = book.system_wallets[(unit, which)]
    return book.wallets[wallet_id]


def _check_active(wallet: WalletState) -> None:
    if wallet.status != WalletStatus.active:
        raise errors.WalletNotActive(f"wallet {wallet.id} is {wallet.status.name}")


def _check_posting(book: Book, posting: Posting, now: datetime) -> tuple[WalletState, WalletState]:
    """Checks that the posting's source can spare its amount and its target hold it; returns
    the two."""
    source = book.wallets[posting.source_wallet_id]
    target = book.wallets[posting.target_wallet_id]
    _check_move(source, target, posting.amount, now)
    return source, target


def _check_move(source: WalletState, target: WalletState, amount: int, now: datetime) -> None:
    if source.balance_minimum is None:
        if source.posted - amount < balance_min:
            raise errors.BalanceOverflow(f"wallet {source.id} would fall below {balance_min}")
    else:
        can = spendable(source, now)
        if can - amount < source.balance_minimum:
            raise errors.InsufficientFunds(
                f"wallet {source.id} has {can} available"
                + (f" above its minimum {source.balance_minimum}" if source.balance_minimum else "")
                + f", needs {amount}"
            )
    _check_room(target, amount)


def _check_room(target: WalletState, amount: int) -> None:
    if target.posted + amount > balance_max:
        raise errors.BalanceOverflow(f"wallet {target.id} would exceed {balance_max}")


def _check_give_back(
    source: WalletState,
    target: WalletState,
    original: TransferState,
    own: Sequence[GrantState],
    now: datetime,
) -> None:
    """That the target of a transfer (`source`, for its void) can give back its amount: what
    is left of the grants it made there (`own`), and its other funds that it can spend."""
    amount = original.amount
    if source.balance_minimum is None:
        if source.posted - amount < balance_min:
            raise errors.BalanceOverflow(f"wallet {source.id} would fall below {balance_min}")
    else:
        left = sum(grant.remaining for grant in own)
        others = spendable(source, now) - sum(
            grant.remaining for grant in own if grant.spendable(now)
        )
        if left + others - amount < source.balance_minimum:
            granted = sum(grant.amount for grant in own)
            if left < granted:
                raise errors.GrantSpent(
                    f"transfer {original.id} granted {granted} to wallet {source.id}, "
                    f"{granted - left} of it spent; the wallet's other funds cannot cover it"
                )
            raise errors.InsufficientFunds(
                f"wallet {source.id} has {left + others} available"
                + (f" above its minimum {source.balance_minimum}" if source.balance_minimum else "")
                + f", needs {amount}"
            )
    _check_room(target, amount)


def _check_future(name: str, value: datetime, now: datetime) -> None:
    if value <= now:
        raise errors.InvalidArgument(name, f"is past: it must be after {now.isoformat()}")


def _terms(
    book: Book,
    wallet: WalletState,
    valid_from: datetime | None,
    expires_at: datetime | None,
    now: datetime,
) -> tuple[datetime, datetime | None]:
    """The terms of the grant of funds coming in from outside (a credit, a deposit): valid from
    when asked, or now (a start past is now); until the expiry asked, else the unit's default
    validity after the start, else never."""
    start = now if valid_from is None or valid_from < now else valid_from
    if expires_at is None:
        validity = book.validities.get(wallet.unit)
        if validity is not None:
            try:
                expires_at = validity.after(start)
                check_grant_instant("valid_from", expires_at)
            except (ValueError, OverflowError, errors.InvalidArgument) as error:
                raise errors.InvalidArgument(
                    "valid_from", "is too far ahead: the unit's validity after it passes 9999"
                ) from error
    else:
        _check_future("expires_at", expires_at, now)
    return start, expires_at


def _hold(book: Book, hold_id: int) -> HoldState:
    hold = book.holds.get(hold_id)
    if hold is None:
        raise errors.HoldNotFound(f"hold {hold_id} does not exist")
    return hold


def _open_hold(book: Book, hold_id: int, now: datetime) -> HoldState:
    hold = _hold(book, hold_id)
    if hold.resolution == TransferKind.hold_expiry:
        raise errors.HoldExpired(f"hold {hold.id} expired at {hold.expires_at.isoformat()}")
    if hold.resolution is not None:
        raise errors.HoldNotPending(f"hold {hold.id} is {_resolution_name(hold)} already")
    if hold_lapsed(hold.expires_at, now):
        raise errors.HoldExpired(f"hold {hold.id} expired at {hold.expires_at.isoformat()}")
    return hold


def _resolution_name(hold: HoldState) -> str:
    assert hold.resolution is not None
    return hold_status_resolved_by[hold.resolution].name


# Writes ----------------------------------------------------------------------------------------


# Grants: a transfer draws from its source's grants (`_draw`) and makes grants on its target
# (`_receive`); what is not in grants is the untracked balance, which never expires.


def spendable(wallet: WalletState, now: datetime) -> int:
    """What the wallet has available that it can spend now: its available balance, less what
    its grants hold that is not valid yet, or past its expiry and not yet expired by a run."""
    if not wallet.tracked:
        return wallet.available
    invalid = spend_queue(wallet, now).invalid
    if not invalid:
        return wallet.available
    return wallet.available - sum(grant.remaining for grant in invalid)


_never = datetime.max.replace(tzinfo=UTC)


def spend_order(expires_at: datetime | None, grant_id: int) -> tuple[bool, datetime, bool, int]:
    """The order in which a wallet's grants are spent, as a sort key: the soonest expiry first,
    those that never expire last; among equals, the oldest first (grants made by this batch,
    their ids provisional, below 0, after those before it). The untracked balance comes after
    every grant."""
    return (expires_at is None, expires_at or _never, grant_id < 0, abs(grant_id))


def _spend_key(grant: GrantState) -> tuple[bool, datetime, bool, int]:
    return spend_order(grant.expires_at, grant.id)


def _draw(
    book: Book,
    wallet: WalletState,
    amount: int,
    now: datetime,
    first: Sequence[GrantState] = (),
) -> list[tuple[int, int]]:
    """Takes `amount` from the wallet's grants it can spend now, in the order of `_spend_key`
    (after the grants `first`, whatever their terms), as far as they go; the rest comes from the
    untracked balance (the caller checked that the wallet can spare it). Returns what it took
    from each grant, as changes to their remainders."""
    if not wallet.tracked:
        return []
    order: Sequence[GrantState] = spend_queue(wallet, now).valid
    if first:
        skip = {grant.id for grant in first}
        order = [*first, *(grant for grant in order if grant.id not in skip)]
    drawn: list[tuple[int, int]] = []
    left = amount
    for grant in order:
        if not left:
            break
        if grant.remaining:
            taken = min(grant.remaining, left)
            book.change_grant(wallet, grant, -taken)
            drawn.append((grant.id, -taken))
            left -= taken
    return drawn


# Funds coming into a wallet, in order: (amount, valid from, expires at).
_Parts = Sequence[tuple[int, datetime, datetime | None]]


def _receive(book: Book, wallet: WalletState, parts: _Parts, now: datetime) -> list[GrantState]:
    """Makes the grants of funds coming into a user's wallet. Funds that never expire and are
    valid now are untracked. A wallet that owes (its untracked balance below 0) is repaid first,
    from the funds in the order they come: what repays is untracked; only the rest of each part
    becomes a grant."""
    if wallet.owner_kind == OwnerKind.system or not parts:
        return []
    owed = max(0, -wallet.untracked)
    made = []
    for amount, valid_from, expires_at in parts:
        repaid = min(owed, amount)
        owed -= repaid
        if amount - repaid and (expires_at is not None or valid_from > now):
            made.append(book.add_grant(wallet, amount - repaid, valid_from, expires_at))
    return made


def _carried(book: Book, drawn: Sequence[tuple[int, int]], amount: int, now: datetime) -> _Parts:
    """What a transfer between two wallets brings its target: the funds it took from grants
    that expire keep their expiries; the rest never expires."""
    parts: list[tuple[int, datetime, datetime | None]] = []
    for grant_id, change in drawn:
        expires_at = book.grants[grant_id].expires_at
        if expires_at is not None:
            parts.append((-change, now, expires_at))
    rest = amount - sum(part[0] for part in parts)
    if rest:
        parts.append((rest, now, None))
    return parts


def _net(allocations: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """The changes to each grant, summed, in the order the grants first come."""
    net: dict[int, int] = {}
    for grant_id, change in allocations:
        net[grant_id] = net.get(grant_id, 0) + change
    return list(net.items())


def _valid(grant: GrantState, now: datetime) -> bool:
    return grant_spendable(grant.valid_from, grant.expires_at, now)


def _move(
    book: Book,
    posting: Posting,
    source: WalletState,
    target: WalletState,
    now: datetime,
    *,
    parts: _Parts = (),
    carry: bool = False,
) -> Posting:
    """Moves the posting's amount: drawn from the source's grants, into the target as `parts`
    (with `carry`, as `_carried` says; none: untracked)."""
    drawn = _draw(book, source, posting.amount, now)
    if carry and drawn:
        # (Funds drawn from the untracked balance alone never expire: nothing to carry.)
        parts = _carried(book, drawn, posting.amount, now)
    made = _receive(book, target, parts, now)
    book.adjust(source, posted=-posting.amount)
    book.adjust(target, posted=posting.amount)
    if drawn or made:
        # Built anew rather than by `replace`, some times quicker.
        posting = Posting(
            posting.kind,
            posting.source_wallet_id,
            posting.target_wallet_id,
            posting.amount,
            posting.amount_requested,
            posting.voids_transfer_id,
            posting.hold_id,
            posting.hold_expires_at,
            tuple(drawn),
            tuple(made),
        )
    return posting


def _unhold(book: Book, hold: HoldState, kind: TransferKind) -> Posting:
    """Releases a hold: what it reserved from grants returns to them (to the untracked balance
    from a grant voided since)."""
    book.resolve(hold, kind)
    source = book.wallets[hold.source_wallet_id]
    returned = []
    for grant_id, change in hold.allocations:
        grant = book.grants[grant_id]
        if not grant.voided:
            book.change_grant(source, grant, -change)
            returned.append((grant_id, -change))
    book.adjust(source, pending=-hold.amount)
    return Posting(
        kind,
        hold.source_wallet_id,
        hold.target_wallet_id,
        hold.amount,
        hold_id=hold.id,
        allocations=tuple(returned),
    )
