"""Amounts as people read them: 2599 in a unit of scale 2 is "25.99 EUR".

Every amount Coffer answers is an integer in its unit's minor units, and every `Transfer`,
`Hold` and `Balance` carries its unit's code and scale, so one answer is enough to print it:

    format_amount(transfer.amount, transfer.unit, transfer.unit_scale)   # "25.99 EUR"
    format_amount(balance.available, balance.unit, balance.unit_scale)  # "1.50 session"

Only integer arithmetic: a float cannot hold every int64 amount (2^53 is the last integer a
double counts exactly), so the digits are split with `divmod` by 10**scale, never divided.
"""

from __future__ import annotations

from coffer.clients.limits import unit_scale_max

__all__ = ["format_amount"]


def format_amount(amount: int, unit: str = "", scale: int = 0) -> str:
    """`amount` minor units of a unit of `scale` (0 to 18) in major units, with exactly
    `scale` decimals, a leading "-" when negative, and the unit's code after a space when
    given: (2599, "EUR", 2) is "25.99 EUR", (-5, "EUR", 2) is "-0.05 EUR", (3, "seat", 0) is
    "3 seat". A float or a bool is refused (TypeError): amounts are integers."""
    if type(amount) is not int:
        raise TypeError(f"an amount is an int of minor units, not {type(amount).__name__}")
    if type(scale) is not int or not 0 <= scale <= unit_scale_max:
        raise ValueError(f"a scale is an int from 0 to {unit_scale_max}, not {scale!r}")
    sign = "-" if amount < 0 else ""
    # Split the magnitude: divmod of a negative number rounds toward minus infinity.
    major, minor = divmod(abs(amount), 10**scale)
    number = f"{sign}{major}.{minor:0{scale}d}" if scale else f"{sign}{major}"
    return f"{number} {unit}" if unit else number
