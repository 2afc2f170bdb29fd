"""The amount formatter: integer arithmetic only, every scale a unit may have, int64's ends."""

from __future__ import annotations

from typing import Any

import pytest

from coffer.clients import format_amount
from coffer.clients.limits import amount_max, unit_scale_max

int64_max = 2**63 - 1
int64_min = -(2**63)


@pytest.mark.parametrize(
    ("amount", "unit", "scale", "text"),
    [
        (2599, "EUR", 2, "25.99 EUR"),
        (150, "session", 2, "1.50 session"),
        (5, "EUR", 2, "0.05 EUR"),
        (100, "EUR", 2, "1.00 EUR"),
        (0, "EUR", 2, "0.00 EUR"),
        (-2599, "EUR", 2, "-25.99 EUR"),
        # A negative amount under one major unit keeps its sign (divmod of -5 would give -1, 95).
        (-5, "EUR", 2, "-0.05 EUR"),
        (-100, "EUR", 2, "-1.00 EUR"),
        (3, "seat", 0, "3 seat"),
        (0, "seat", 0, "0 seat"),
        (-3, "seat", 0, "-3 seat"),
        (1, "wei", 18, "0.000000000000000001 wei"),
        (10**18, "wei", 18, "1.000000000000000000 wei"),
        (-1, "wei", 18, "-0.000000000000000001 wei"),
        (int64_max, "wei", 18, "9.223372036854775807 wei"),
        (int64_min, "wei", 18, "-9.223372036854775808 wei"),
        (int64_max, "seat", 0, "9223372036854775807 seat"),
        (int64_min, "seat", 0, "-9223372036854775808 seat"),
        (int64_max, "EUR", 2, "92233720368547758.07 EUR"),
        (int64_min, "EUR", 2, "-92233720368547758.08 EUR"),
        # Past 2^53 a float would round: 9007199254740993 must not print as ...992.
        (9007199254740993, "EUR", 2, "90071992547409.93 EUR"),
        (1234, "", 2, "12.34"),
    ],
)
def test_formats(amount: int, unit: str, scale: int, text: str) -> None:
    assert format_amount(amount, unit, scale) == text


def test_every_scale_round_trips() -> None:
    """Reading the text back as an integer of minor units gives the amount, at every scale."""
    for scale in range(unit_scale_max + 1):
        for amount in (0, 1, -1, 7 * 10**scale + 3, amount_max, -amount_max, int64_min):
            number = format_amount(amount, "", scale)
            digits = number.replace(".", "")
            assert int(digits) == amount, (amount, scale, number)
            assert ("." in number) == (scale > 0)
            if scale:
                assert len(number.split(".")[1]) == scale


@pytest.mark.parametrize("amount", [25.99, 2599.0, True, "2599", None])
def test_refuses_what_is_not_an_integer(amount: Any) -> None:
    with pytest.raises(TypeError, match="an amount is an int"):
        format_amount(amount, "EUR", 2)


@pytest.mark.parametrize("scale", [-1, unit_scale_max + 1, 2.0, None])
def test_refuses_a_scale_no_unit_has(scale: Any) -> None:
    with pytest.raises(ValueError, match="a scale is an int from 0 to 18"):
        format_amount(1, "EUR", scale)
