"""Random operations of every kind, for the tests that put the server under a load: the bank
test (replays) and the fault tests. The kinds come from the `Operation` oneof, so a new kind
fails here until it can be drawn."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from random import Random

from google.protobuf.message import Message

from coffer.v1 import holds_pb2, transfers_pb2, types_pb2

from support.replay import operation_kinds


@dataclass(slots=True)
class Wallets:
    customers: list[int]
    merchants: list[int]


def random_operation(
    pick: Random,
    key: str,
    wallets: Wallets,
    *,
    transfers: Sequence[int],
    holds: Sequence[int],
    amount_max: int,
    short_hold_timeout_s: int | None = None,
) -> tuple[str, Message]:
    """A random operation of any kind, under `key`: its kind and request. Voids, captures
    and releases name the caller's own `transfers` and `holds` (some voided or resolved
    already); a tenth of the holds lapse after `short_hold_timeout_s`, if given. Amounts up to
    `amount_max`, so that some are refused."""
    kind = pick.choice(operation_kinds)
    if (kind == "void" and not transfers) or (
        kind in ("capture_hold", "release_hold") and not holds
    ):
        kind = "credit"
    customer = pick.choice(wallets.customers)
    amount = pick.randint(1, amount_max)
    common = {"idempotency_key": key, "note": f"note {key}"}
    match kind:
        case "credit":
            request: Message = transfers_pb2.CreditRequest(
                wallet_id=pick.choice([*wallets.customers, *wallets.merchants]),
                amount=amount,
                **common,
            )
        case "debit":
            mode = pick.choice([types_pb2.DEBIT_MODE_ALL_OR_NOTHING, types_pb2.DEBIT_MODE_UP_TO])
            request = transfers_pb2.DebitRequest(
                wallet_id=customer, amount=amount, mode=mode, **common
            )
        case "transfer":
            request = transfers_pb2.TransferRequest(
                source_wallet_id=customer,
                target_wallet_id=pick.choice(wallets.customers),
                amount=amount,
                **common,
            )
        case "deposit":
            request = transfers_pb2.DepositRequest(
                wallet_id=customer, amount=amount, funding_source="iban:load", **common
            )
        case "withdraw":
            request = transfers_pb2.WithdrawRequest(
                wallet_id=customer, amount=amount, funding_source="iban:load", **common
            )
        case "pay":
            request = transfers_pb2.PayRequest(
                payer_wallet_id=customer,
                payee_wallet_id=pick.choice(wallets.merchants),
                amount=amount,
                **common,
            )
        case "void":
            request = transfers_pb2.VoidRequest(transfer_id=pick.choice(transfers), **common)
        case "place_hold":
            request = holds_pb2.PlaceHoldRequest(wallet_id=customer, amount=amount, **common)
            if short_hold_timeout_s is not None and pick.random() < 0.1:
                request.timeout.seconds = short_hold_timeout_s
        case "capture_hold":
            request = holds_pb2.CaptureHoldRequest(hold_id=pick.choice(holds), **common)
            if pick.random() < 0.5:
                request.amount = pick.randint(1, amount_max)
        case "release_hold":
            request = holds_pb2.ReleaseHoldRequest(hold_id=pick.choice(holds), **common)
        case _:
            raise AssertionError(f"no random {kind} yet")
    return kind, request
