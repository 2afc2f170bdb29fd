"""What the EMI checkout examples (Python and Node.js) print of the histories and balances,
word by word: the same flow, told the same way."""

from __future__ import annotations

__all__ = ["histories_printed"]


def histories_printed(
    customer: int, merchant: int, payment_id: str, deposit_id: str, order: str
) -> list[list[str]]:
    """Both wallets' histories and balances after a deposit of 50.00 EUR and a payment of
    25.99 EUR, as the examples print them (each line split into words)."""
    return [
        [],
        ["customer", "wallet", f"{customer},", "newest", "first:"],
        [f"#{payment_id}", "payment", "-25.99", "EUR", order],
        [f"#{deposit_id}", "deposit", "+50.00", "EUR", "iban:DE89370400440532013000"],
        ["balance", "24.01", "EUR,", "available", "24.01", "EUR"],
        [],
        ["merchant", "wallet", f"{merchant},", "newest", "first:"],
        [f"#{payment_id}", "payment", "+25.99", "EUR", order],
        ["balance", "25.99", "EUR,", "available", "25.99", "EUR"],
    ]
