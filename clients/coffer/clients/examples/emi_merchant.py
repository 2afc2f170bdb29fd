"""An e-money institution's checkout, end to end, with the async client.

    python -m coffer.clients.examples.emi_merchant --target 127.0.0.1:50051

It creates the EUR unit (idempotent: a second run finds it), a customer's wallet and a
merchant's, tops the customer up from a bank account, pays the merchant for an order, shows
what an overdrawing payment raises, and prints both wallets' histories and balances.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import uuid

from coffer.clients import Client, Transfer, errors, format_amount, types_pb2

__all__ = ["main", "run"]


def _history_line(transfer: Transfer, wallet_id: int) -> str:
    """A transfer as one wallet sees it; the transfer carries its unit and scale, so no
    GetUnit call is needed to print 25.99 EUR."""
    sign = 1 if transfer.target_wallet_id == wallet_id else -1
    kind = types_pb2.TransferKind.Name(transfer.kind).removeprefix("TRANSFER_KIND_").lower()
    money = format_amount(sign * transfer.amount, transfer.unit, transfer.unit_scale)
    amount = ("+" if sign > 0 else "") + money
    return f"  #{transfer.id:<6} {kind:<10} {amount:>14}  {transfer.reference or transfer.note}"


async def run(target: str) -> None:
    # One order of this shop; a real shop would take the order id from its own database.
    order = f"order-{uuid.uuid4().hex[:8]}"
    # The client names this caller on every call; the server scopes idempotency keys to it.
    async with Client(target, caller="emi-example-shop") as coffer:
        try:
            eur = await coffer.create_unit(
                code="EUR",
                kind="currency",
                scale=2,
                name="Euro",
                plural="Euros",
                description="The euro, in cents",
            )
        except errors.UnitExists:
            # Someone created EUR with other names: use it as it is.
            eur = await coffer.get_unit(code="EUR")
        customer = await coffer.create_wallet(
            owner_id="customer-ada", owner_kind="customer", unit="EUR"
        )
        merchant = await coffer.create_wallet(
            owner_id="merchant-bakery", owner_kind="merchant", unit="EUR"
        )
        print(f"customer wallet {customer.id}, merchant wallet {merchant.id}")

        # Idempotency keys derived from the order: run this step twice, it applies once.
        top_up = await coffer.deposit(
            wallet_id=customer.id,
            amount=5000,
            funding_source="iban:DE89370400440532013000",
            note="top-up by SEPA transfer",
            idempotency_key=f"{order}:top-up",
        )
        deposited = format_amount(top_up.amount, top_up.unit, top_up.unit_scale)
        print(f"deposited {deposited} (transfer {top_up.id})")
        payment = await coffer.pay(
            payer_wallet_id=customer.id,
            payee_wallet_id=merchant.id,
            amount=2599,
            reference=order,
            note="2 sourdough loaves, 1 cake",
            idempotency_key=f"{order}:payment",
        )
        paid = format_amount(payment.amount, payment.unit, payment.unit_scale)
        print(f"paid {paid} for {order} (transfer {payment.id})")

        try:
            await coffer.pay(
                payer_wallet_id=customer.id,
                payee_wallet_id=merchant.id,
                amount=1_000_000,
                reference=f"{order}-too-big",
            )
        except errors.InsufficientFunds as error:
            asked = format_amount(1_000_000, eur.code, eur.scale)
            print(f"a payment of {asked} was refused: {error}")

        for title, wallet in (("customer", customer), ("merchant", merchant)):
            print(f"\n{title} wallet {wallet.id}, newest first:")
            async for transfer in coffer.iter_transfers(wallet_id=wallet.id):
                print(_history_line(transfer, wallet.id))
            balance = (await coffer.get_balance(wallet_id=wallet.id)).balance
            posted = format_amount(balance.posted, balance.unit, balance.unit_scale)
            available = format_amount(balance.available, balance.unit, balance.unit_scale)
            print(f"  balance {posted}, available {available}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target",
        default=os.environ.get("COFFER_TARGET") or "127.0.0.1:50051",
        metavar="HOST:PORT",
        help="the Coffer server (default: $COFFER_TARGET or 127.0.0.1:50051)",
    )
    arguments = parser.parse_args(argv)
    try:
        asyncio.run(run(arguments.target))
    except errors.CofferError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3 if isinstance(error, errors.Unavailable | errors.DeadlineExceeded) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
