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

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from . import errors
from .model import (
    CaptureHold,
    Credit,
    Debit,
    DebitMode,
    Deposit,
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
    hold_lapsed,
    hold_status_resolved_by,
    posting_kinds,
)

__all__ = [
    "BalancesAfter",
    "Book",
    "HoldState",
    "Outcome",
    "Posting",
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

    @property
    def available(self) -> int:
        return self.posted - self.pending


@dataclass(slots=True)
class HoldState:
    id: int
    source_wallet_id: int
    target_wallet_id: int
    amount: int
    expires_at: datetime
    # None while open; else the kind of transfer that resolved it.
    resolution: TransferKind | None = None


@dataclass(frozen=True, slots=True)
class TransferState:
    """An earlier transfer, as a void sees it."""

    id: int
    kind: TransferKind
    source_wallet_id: int
    target_wallet_id: int
    amount: int


@dataclass(frozen=True, slots=True)
class Posting:
    """A transfer to write; the ledger gives it an id and the operation's details."""

    kind: TransferKind
    source_wallet_id: int
    target_wallet_id: int
    amount: int
    amount_requested: int | None = None
    voids_transfer_id: int | None = None
    hold_id: int | None = None
    hold_expires_at: datetime | None = None


@dataclass(slots=True)
class Book:
    wallets: dict[int, WalletState] = field(default_factory=dict)
    holds: dict[int, HoldState] = field(default_factory=dict)
    transfers: dict[int, TransferState] = field(default_factory=dict)
    voided: set[int] = field(default_factory=set)
    system_wallets: dict[tuple[str, SystemWallet], int] = field(default_factory=dict)
    # While a linked chain runs: how to undo what it changed.
    undo: list[tuple[str, object, object]] | None = None

    def unit_of(self, wallet_id: int) -> str | None:
        wallet = self.wallets.get(wallet_id)
        return None if wallet is None else wallet.unit

    def adjust(self, wallet: WalletState, posted: int = 0, pending: int = 0) -> None:
        if self.undo is not None:
            self.undo.append(("wallet", wallet, (wallet.posted, wallet.pending)))
        wallet.posted += posted
        wallet.pending += pending
        assert wallet.pending >= 0, wallet
        assert balance_min <= wallet.posted <= balance_max, wallet

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
                target.posted, target.pending = before
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
            if index not in settled and not isinstance(operations[index], Rejected | ExpireHold)
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
            return _credit(book, operation)
        case Debit():
            return _debit(book, operation)
        case WalletTransfer():
            return _transfer(book, operation)
        case Deposit():
            return _deposit(book, operation)
        case Withdrawal():
            return _withdrawal(book, operation)
        case Payment():
            return _payment(book, operation)
        case Void():
            return _void(book, operation)
        case PlaceHold():
            return _place_hold(book, operation, now)
        case CaptureHold():
            return _capture_hold(book, operation, now)
        case ReleaseHold():
            return _release_hold(book, operation, now)
        case ExpireHold():
            return _expire_hold(book, operation, now)
    raise AssertionError(f"unknown operation {operation!r}")


def _credit(book: Book, operation: Credit) -> list[Posting]:
    _user_wallet(book, operation.wallet_id)
    posting = _credit_posting(operation, book.unit_of, book.system_wallets)
    assert posting is not None
    source, target = _check_posting(book, posting)
    # Checks done.
    return [_move(book, posting, source, target)]


def _debit(book: Book, operation: Debit) -> list[Posting]:
    wallet = _user_wallet(book, operation.wallet_id)
    posting = _debit_posting(operation, book.unit_of, book.system_wallets)
    assert posting is not None
    if operation.mode == DebitMode.up_to:
        assert wallet.balance_minimum is not None
        spare = max(0, wallet.available - wallet.balance_minimum)
        posting = replace(posting, amount=min(posting.amount, spare))
    source, target = _check_posting(book, posting)
    # Checks done.
    return [_move(book, posting, source, target)]


def _transfer(book: Book, operation: WalletTransfer) -> list[Posting]:
    _wallet_pair(book, operation.source_wallet_id, operation.target_wallet_id)
    posting = _transfer_posting(operation, book.unit_of, book.system_wallets)
    source, target = _check_posting(book, posting)
    # Checks done.
    return [_move(book, posting, source, target)]


def _deposit(book: Book, operation: Deposit) -> list[Posting]:
    _user_wallet(book, operation.wallet_id)
    posting = _deposit_posting(operation, book.unit_of, book.system_wallets)
    assert posting is not None
    source, target = _check_posting(book, posting)
    # Checks done.
    return [_move(book, posting, source, target)]


def _withdrawal(book: Book, operation: Withdrawal) -> list[Posting]:
    _user_wallet(book, operation.wallet_id)
    posting = _withdrawal_posting(operation, book.unit_of, book.system_wallets)
    assert posting is not None
    source, target = _check_posting(book, posting)
    # Checks done.
    return [_move(book, posting, source, target)]


def _payment(book: Book, operation: Payment) -> list[Posting]:
    payer, payee = _wallet_pair(book, operation.payer_wallet_id, operation.payee_wallet_id)
    if payer.owner_kind != OwnerKind.customer:
        raise errors.WalletKindMismatch(f"payer wallet {payer.id} is not a customer's")
    if payee.owner_kind != OwnerKind.merchant:
        raise errors.WalletKindMismatch(f"payee wallet {payee.id} is not a merchant's")
    posting = _payment_posting(operation, book.unit_of, book.system_wallets)
    source, target = _check_posting(book, posting)
    # Checks done.
    return [_move(book, posting, source, target)]


def _void(book: Book, operation: Void) -> list[Posting]:
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
    # The reverse: back from the original target to the original source.
    source = _wallet(book, original.target_wallet_id)
    target = _wallet(book, original.source_wallet_id)
    _check_active(source)
    _check_active(target)
    _check_move(source, target, original.amount)
    # Checks done.
    book.mark_voided(original.id)
    posting = Posting(
        TransferKind.void, source.id, target.id, original.amount, voids_transfer_id=original.id
    )
    return [_move(book, posting, source, target)]


def _place_hold(book: Book, operation: PlaceHold, now: datetime) -> list[Posting]:
    wallet = _user_wallet(book, operation.wallet_id)
    if operation.target_wallet_id is None:
        target = _system_wallet(book, wallet.unit, SystemWallet.operator)
    else:
        wallet, target = _wallet_pair(book, operation.wallet_id, operation.target_wallet_id)
    _check_move(wallet, target, operation.amount)
    # Checks done.
    book.adjust(wallet, pending=operation.amount)
    expires_at = now + timedelta(seconds=operation.timeout_s)
    return [
        Posting(
            TransferKind.hold, wallet.id, target.id, operation.amount, hold_expires_at=expires_at
        )
    ]


def _capture_hold(book: Book, operation: CaptureHold, now: datetime) -> list[Posting]:
    hold = _open_hold(book, operation.hold_id, now)
    amount = hold.amount if operation.amount is None else operation.amount
    if amount > hold.amount:
        raise errors.CaptureExceedsHold(
            f"hold {hold.id} holds {hold.amount}; cannot capture {amount}"
        )
    source = _wallet(book, hold.source_wallet_id)
    target = _wallet(book, hold.target_wallet_id)
    _check_active(target)
    if target.posted + amount > balance_max:
        raise errors.BalanceOverflow(f"wallet {target.id} would exceed {balance_max}")
    # Checks done: the source keeps its floor, as the hold reserved more than is captured.
    book.resolve(hold, TransferKind.capture)
    book.adjust(source, posted=-amount, pending=-hold.amount)
    book.adjust(target, posted=amount)
    return [Posting(TransferKind.capture, source.id, target.id, amount, hold_id=hold.id)]


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


def _check_posting(book: Book, posting: Posting) -> tuple[WalletState, WalletState]:
    """Checks that the posting's source can spare its amount and its target hold it; returns
    the two."""
    source = book.wallets[posting.source_wallet_id]
    target = book.wallets[posting.target_wallet_id]
    _check_move(source, target, posting.amount)
    return source, target


def _check_move(source: WalletState, target: WalletState, amount: int) -> None:
    if source.balance_minimum is None:
        if source.posted - amount < balance_min:
            raise errors.BalanceOverflow(f"wallet {source.id} would fall below {balance_min}")
    elif source.available - amount < source.balance_minimum:
        raise errors.InsufficientFunds(
            f"wallet {source.id} has {source.available} available"
            + (f" above its minimum {source.balance_minimum}" if source.balance_minimum else "")
            + f", needs {amount}"
        )
    if target.posted + amount > balance_max:
        raise errors.BalanceOverflow(f"wallet {target.id} would exceed {balance_max}")


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


def _move(book: Book, posting: Posting, source: WalletState, target: WalletState) -> Posting:
    book.adjust(source, posted=-posting.amount)
    book.adjust(target, posted=posting.amount)
    return posting


def _unhold(book: Book, hold: HoldState, kind: TransferKind) -> Posting:
    book.resolve(hold, kind)
    book.adjust(book.wallets[hold.source_wallet_id], pending=-hold.amount)
    return Posting(kind, hold.source_wallet_id, hold.target_wallet_id, hold.amount, hold_id=hold.id)
