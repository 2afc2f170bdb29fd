"""How long a grant of credits stays valid: an ISO 8601 duration, such as a unit's default
validity (`Unit.default_validity`, "P6M": six months from each credit).

The durations are the subset `P[nY][nM][nW][nD][T[nH][nM][nS]]`: upper-case designators,
each with a non-negative whole number (no fractions, no sign), at least one of them, not all
zero, and `T` only before hours, minutes or seconds. A validity keeps three integers: months
(a year is 12), days (a week is 7) and seconds (an hour is 3,600, a minute 60). Its text is
at most `model.validity_length_max` characters, and it lasts at most
`model.validity_months_max` months (100 years), a month counted as 30 days and a day as
86,400 seconds, as PostgreSQL compares intervals.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from .errors import InvalidArgument
from .model import validity_length_max, validity_months_max

__all__ = ["Validity", "parse_validity"]

_day_s = 86_400
_month_days = 30
# The longest a validity may last, in seconds, a month counted as 30 days.
_length_s_max = validity_months_max * _month_days * _day_s

_pattern = re.compile(
    r"P(?:(?P<years>[0-9]+)Y)?(?:(?P<months>[0-9]+)M)?(?:(?P<weeks>[0-9]+)W)?"
    r"(?:(?P<days>[0-9]+)D)?"
    r"(?:T(?=[0-9])(?:(?P<hours>[0-9]+)H)?(?:(?P<minutes>[0-9]+)M)?(?:(?P<seconds>[0-9]+)S)?)?"
)
_form = "an ISO 8601 duration P[nY][nM][nW][nD][T[nH][nM][nS]] of whole numbers (P6M, P30D, PT12H)"


def _length_s(months: int, days: int, seconds: int) -> int:
    return (months * _month_days + days) * _day_s + seconds


@dataclass(frozen=True, slots=True)
class Validity:
    """A duration in calendar months, days and seconds (each 0 or more, not all 0, at most
    `model.validity_months_max` months in all). Build one with `parse_validity`."""

    months: int = 0
    days: int = 0
    seconds: int = 0

    def __post_init__(self) -> None:
        parts = (self.months, self.days, self.seconds)
        assert all(type(part) is int and part >= 0 for part in parts), parts
        assert any(parts), "a validity is not zero"
        assert _length_s(*parts) <= _length_s_max, parts

    @property
    def text(self) -> str:
        """The canonical form: "P", the months as "nM" and the days as "nD", then "T" and the
        seconds as "nS", each only when not zero: P1Y6M is P18M, P2W is P14D, PT1H30M is
        PT5400S, P1M2DT3S stays. Parsing it gives this validity again."""
        date = (f"{self.months}M" if self.months else "") + (f"{self.days}D" if self.days else "")
        time = f"T{self.seconds}S" if self.seconds else ""
        return f"P{date}{time}"

    def after(self, start: datetime) -> datetime:
        """When a grant valid from `start` (timezone-aware) expires, in UTC.

        Computed in UTC: months first, as calendar months (the same day and time of day that
        many months on); when that day does not exist in the month (31 January + P1M), the
        grant runs to the end of the month's last day (28 or 29 February) and expires as the
        next month begins (1 March, 00:00). Then the days, of 86,400 seconds each, then the
        seconds. The result is never earlier for a later start, nor for a longer validity in
        any of its parts. The expiry must fall before the year 10,000 (else ValueError or
        OverflowError, as `datetime` says)."""
        assert start.utcoffset() is not None, "start must be timezone-aware"
        start = start.astimezone(UTC)
        year, month_index = divmod(start.year * 12 + start.month - 1 + self.months, 12)
        month = month_index + 1
        last_day = calendar.monthrange(year, month)[1]
        if start.day <= last_day:
            moved = start.replace(year=year, month=month)
        else:
            moved = datetime(year, month, last_day, tzinfo=UTC) + timedelta(days=1)
        return moved + timedelta(days=self.days, seconds=self.seconds)


def parse_validity(text: str, field: str) -> Validity:
    """The validity `text` spells (see the module's docstring for the form); InvalidArgument
    naming `field` when it spells none, or one that is zero or too long."""
    if len(text) > validity_length_max:
        raise InvalidArgument(field, f"must be at most {validity_length_max} characters")
    match = _pattern.fullmatch(text)
    if match is None or not any(match.groups()):
        raise InvalidArgument(field, f"must be {_form}, not {text!r}")
    number = {name: int(value or 0) for name, value in match.groupdict().items()}
    months = number["years"] * 12 + number["months"]
    days = number["weeks"] * 7 + number["days"]
    seconds = number["hours"] * 3600 + number["minutes"] * 60 + number["seconds"]
    if not (months or days or seconds):
        raise InvalidArgument(field, f"must not be zero: {text}")
    if _length_s(months, days, seconds) > _length_s_max:
        raise InvalidArgument(
            field,
            f"must be at most {validity_months_max // 12} years (P{validity_months_max}M,"
            f" a month counted as {_month_days} days): {text}",
        )
    return Validity(months, days, seconds)
