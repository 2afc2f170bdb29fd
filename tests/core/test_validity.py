"""Validities (`coffer.core.validity`) without a database: the durations the parser takes and
those it refuses, their canonical text, and when a grant valid from a start expires; with
properties over many of each (the text round-trips; the expiry never moves earlier for a later
start or a longer validity; a day the month lacks ends the grant with the month)."""

from __future__ import annotations

import calendar
import itertools
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from coffer.core import errors, model
from coffer.core.model import Unit, UnitKind, validity_length_max, validity_months_max
from coffer.core.validity import Validity, parse_validity

_day_s = 86_400
# The longest validity, in seconds, a month counted as 30 days.
_length_s_max = validity_months_max * 30 * _day_s


@pytest.mark.parametrize(
    ("text", "months", "days", "seconds", "canonical"),
    [
        ("P6M", 6, 0, 0, "P6M"),
        ("P1Y", 12, 0, 0, "P12M"),
        ("P1Y6M", 18, 0, 0, "P18M"),
        ("P2W", 0, 14, 0, "P14D"),
        ("P30D", 0, 30, 0, "P30D"),
        ("P1W3D", 0, 10, 0, "P10D"),
        ("PT12H", 0, 0, 43_200, "PT43200S"),
        ("PT1H30M", 0, 0, 5_400, "PT5400S"),
        ("PT90S", 0, 0, 90, "PT90S"),
        ("P1M2DT3S", 1, 2, 3, "P1M2DT3S"),
        ("P1Y2M3W4DT5H6M7S", 14, 25, 5 * 3600 + 6 * 60 + 7, "P14M25DT18367S"),
        ("P0Y6M", 6, 0, 0, "P6M"),
        ("P006M", 6, 0, 0, "P6M"),
        ("P0DT1S", 0, 0, 1, "PT1S"),
        ("P100Y", validity_months_max, 0, 0, f"P{validity_months_max}M"),
        ("P36000D", 0, 36_000, 0, "P36000D"),
        (f"PT{_length_s_max}S", 0, 0, _length_s_max, f"PT{_length_s_max}S"),
        ("P99Y11M29DT86400S", validity_months_max - 1, 29, _day_s, "P1199M29DT86400S"),
    ],
)
def test_durations_and_their_canonical_text(
    text: str, months: int, days: int, seconds: int, canonical: str
) -> None:
    validity = parse_validity(text, "default_validity")
    assert validity == Validity(months, days, seconds)
    assert validity.text == canonical
    assert parse_validity(canonical, "default_validity") == validity


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "must be an ISO 8601 duration"),
        ("P", "must be an ISO 8601 duration"),
        ("PT", "must be an ISO 8601 duration"),
        ("P1DT", "must be an ISO 8601 duration"),
        ("PT1", "must be an ISO 8601 duration"),
        ("P1.5D", "must be an ISO 8601 duration"),
        ("P1,5D", "must be an ISO 8601 duration"),
        ("PT0.5S", "must be an ISO 8601 duration"),
        ("-P1D", "must be an ISO 8601 duration"),
        ("P-1D", "must be an ISO 8601 duration"),
        ("P+1D", "must be an ISO 8601 duration"),
        ("p1d", "must be an ISO 8601 duration"),
        ("P1d", "must be an ISO 8601 duration"),
        ("pT1H", "must be an ISO 8601 duration"),
        (" P1D", "must be an ISO 8601 duration"),
        ("P1D ", "must be an ISO 8601 duration"),
        ("P 1D", "must be an ISO 8601 duration"),
        ("P1D\n", "must be an ISO 8601 duration"),
        ("1D", "must be an ISO 8601 duration"),
        ("P1H", "must be an ISO 8601 duration"),
        ("PT1D", "must be an ISO 8601 duration"),
        ("P1M1Y", "must be an ISO 8601 duration"),
        ("PT1S1M", "must be an ISO 8601 duration"),
        ("P1D1D", "must be an ISO 8601 duration"),
        ("P1Y1Y", "must be an ISO 8601 duration"),
        ("P\u0661D", "must be an ISO 8601 duration"),  # ARABIC-INDIC DIGIT ONE
        ("P\uff11D", "must be an ISO 8601 duration"),  # FULLWIDTH DIGIT ONE
        ("P1D\x00", "must be an ISO 8601 duration"),
        ("2024-01-01/P1D", "must be an ISO 8601 duration"),
        ("P0D", "must not be zero"),
        ("PT0S", "must not be zero"),
        ("P0Y0M0W0DT0H0M0S", "must not be zero"),
        ("P1201M", "must be at most 100 years"),
        ("P100Y1D", "must be at most 100 years"),
        ("P36001D", "must be at most 100 years"),
        (f"PT{_length_s_max + 1}S", "must be at most 100 years"),
        ("P" + "9" * 30 + "D", "must be at most 100 years"),
        (
            "P" + "0" * validity_length_max + "1D",
            f"must be at most {validity_length_max} characters",
        ),
        ("P" * (validity_length_max + 1), f"must be at most {validity_length_max} characters"),
    ],
)
def test_what_is_not_a_validity(text: str, problem: str) -> None:
    with pytest.raises(errors.InvalidArgument) as raised:
        parse_validity(text, "default_validity")
    assert raised.value.field == "default_validity"
    assert raised.value.message.startswith(f"default_validity: {problem}"), raised.value.message


def test_the_limits_are_the_models() -> None:
    assert validity_length_max == model.validity_length_max == 32
    assert validity_months_max == model.validity_months_max == 100 * 12
    # The longest canonical text fits in the limit, so what is stored reads back.
    longest = Validity(0, 36_000 - 1, _day_s - 1).text
    assert len(longest) <= validity_length_max
    assert len(Validity(validity_months_max - 1, 29, _day_s - 1).text) <= validity_length_max


def _utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


@pytest.mark.parametrize(
    ("start", "text", "expiry"),
    [
        (_utc(2024, 1, 15, 10, 30), "P1M", _utc(2024, 2, 15, 10, 30)),
        (_utc(2024, 1, 15, 10, 30), "P6M", _utc(2024, 7, 15, 10, 30)),
        (_utc(2024, 11, 30, 23, 59, 59), "P3M", _utc(2025, 2, 28) + timedelta(days=1)),
        (_utc(2024, 12, 31, 8), "P1M", _utc(2025, 1, 31, 8)),
        (_utc(2024, 1, 15), "P1Y", _utc(2025, 1, 15)),
        (_utc(2024, 1, 15), "P30D", _utc(2024, 2, 14)),
        (_utc(2024, 1, 15), "PT12H", _utc(2024, 1, 15, 12)),
        # A day the month lacks: the grant runs to the end of the month's last day.
        (_utc(2023, 1, 31, 10), "P1M", _utc(2023, 3, 1)),  # through 28 February
        (_utc(2024, 1, 31, 10), "P1M", _utc(2024, 3, 1)),  # through 29 February
        (_utc(2024, 1, 29, 10), "P1M", _utc(2024, 2, 29, 10)),
        (_utc(2023, 1, 29, 10), "P1M", _utc(2023, 3, 1)),
        (_utc(2024, 3, 31, 10), "P1M", _utc(2024, 5, 1)),  # through 30 April
        (_utc(2024, 2, 29, 10), "P1Y", _utc(2025, 3, 1)),  # through 28 February 2025
        (_utc(2024, 2, 29, 10), "P4Y", _utc(2028, 2, 29, 10)),
        # Months first, then days, then seconds.
        (_utc(2024, 1, 31, 10), "P1M1D", _utc(2024, 3, 2)),
        (_utc(2024, 1, 31, 10), "P1MT1S", _utc(2024, 3, 1, 0, 0, 1)),
        (_utc(2024, 1, 30, 10), "P1D", _utc(2024, 1, 31, 10)),
        (_utc(2024, 12, 31, 23, 59, 59, 999_999), "PT1S", _utc(2025, 1, 1, 0, 0, 0, 999_999)),
        # In UTC: 1 March 01:00 at +02:00 is 28 February 23:00 UTC.
        (
            datetime(2023, 3, 1, 1, tzinfo=timezone(timedelta(hours=2))),
            "P1M",
            _utc(2023, 3, 28, 23),
        ),
        (
            datetime(2024, 1, 31, 20, tzinfo=timezone(timedelta(hours=-5))),
            "P1M",
            _utc(2024, 3, 1, 1),
        ),
    ],
)
def test_expiry(start: datetime, text: str, expiry: datetime) -> None:
    got = parse_validity(text, "v").after(start)
    assert got == expiry
    assert got.utcoffset() == timedelta(0)


def test_a_start_must_say_its_time_zone() -> None:
    with pytest.raises(AssertionError, match="timezone-aware"):
        Validity(months=1).after(datetime(2024, 1, 1))


def test_a_validity_built_by_hand_keeps_the_rules() -> None:
    for months, days, seconds in [(0, 0, 0), (-1, 2, 0), (validity_months_max + 1, 0, 0)]:
        with pytest.raises(AssertionError):
            Validity(months, days, seconds)


# A unit's default validity ------------------------------------------------------------------


def _unit(default_validity: str) -> Unit:
    return Unit(code="pack", kind=UnitKind.credit, name="Pack", default_validity=default_validity)


def test_a_units_default_validity_is_kept_canonical() -> None:
    assert _unit("").default_validity == ""
    assert _unit("P1Y6M").default_validity == "P18M"
    assert _unit("P18M").same_definition(_unit("P1Y6M"))
    assert not _unit("P6M").same_definition(_unit("P7M"))
    assert not _unit("P6M").same_definition(_unit(""))
    for bad in ["P0D", "6 months", "P1.5M"]:
        with pytest.raises(errors.InvalidArgument) as raised:
            _unit(bad)
        assert raised.value.field == "default_validity"


# Properties ----------------------------------------------------------------------------------


@st.composite
def validities(draw: st.DrawFn) -> Validity:
    """Any validity, from the shortest to the longest; often of a few months."""
    months = draw(st.integers(0, 24) | st.integers(0, validity_months_max))
    room_s = _length_s_max - months * 30 * _day_s
    days = draw(st.integers(0, room_s // _day_s))
    seconds = draw(st.integers(0, room_s - days * _day_s))
    if not (months or days or seconds):
        seconds = 1
    return Validity(months, days, seconds)


@st.composite
def spellings(draw: st.DrawFn) -> str:
    """Any text of the form, some components left out, some zero, some with leading zeros."""

    def part(designator: str) -> str:
        number = draw(st.none() | st.integers(0, 400))
        if number is None:
            return ""
        return f"{'0' * draw(st.integers(0, 2))}{number}{designator}"

    date = "".join(part(designator) for designator in "YMWD")
    time = "".join(part(designator) for designator in "HMS")
    return f"P{date}{'T' + time if time else ''}"


_offsets = st.just(UTC) | st.integers(-14 * 60, 14 * 60).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)


@st.composite
def month_ends(draw: st.DrawFn) -> datetime:
    """A start in the last days of a month (where a day another month lacks is met), UTC."""
    year, month = draw(st.integers(1970, 2299)), draw(st.integers(1, 12))
    last_day = calendar.monthrange(year, month)[1]
    day = draw(st.integers(last_day - 2, last_day))
    moment = draw(st.times())
    return datetime.combine(datetime(year, month, day).date(), moment, tzinfo=UTC)


# Starts from 1970 to 2300, to the microsecond, in UTC or at an offset of up to 14 hours; half
# of them in the last days of a month.
starts = month_ends() | st.datetimes(
    min_value=datetime(1970, 1, 1), max_value=datetime(2300, 1, 1), timezones=_offsets
)


@given(validities())
def test_the_text_round_trips(validity: Validity) -> None:
    text = validity.text
    assert len(text) <= validity_length_max
    assert parse_validity(text, "v") == validity
    assert parse_validity(text, "v").text == text


@given(spellings())
def test_any_spelling_parses_to_its_canonical_text_or_is_refused(text: str) -> None:
    try:
        validity = parse_validity(text, "v")
    except errors.InvalidArgument as error:
        assert error.field == "v"
        return
    assert parse_validity(validity.text, "v") == validity


@given(st.text(max_size=validity_length_max + 2))
def test_any_text_is_a_validity_or_invalid_argument(text: str) -> None:
    try:
        validity = parse_validity(text, "v")
    except errors.InvalidArgument as error:
        assert error.field == "v"
    else:
        assert text.startswith("P") and parse_validity(validity.text, "v") == validity


@given(validities(), starts, st.timedeltas(timedelta(0), timedelta(days=800)))
def test_a_later_start_never_expires_earlier(
    validity: Validity, start: datetime, later: timedelta
) -> None:
    assert validity.after(start) <= validity.after(start + later)


def test_a_later_start_never_expires_earlier_about_the_ends_of_months() -> None:
    """Every hour from the 26th of each month of a leap-year cycle to the 3rd of the next,
    with every validity of 1 to 13 months: across the midnight before a day another month
    lacks, a later start has an earlier time of day."""
    for year, month in itertools.product(range(2023, 2027), range(1, 13)):
        first = _utc(year, month, 26)
        starts = [first + timedelta(hours=hours) for hours in range(9 * 24)]
        for months in range(1, 14):
            expiries = [Validity(months=months).after(start) for start in starts]
            assert expiries == sorted(expiries), (year, month, months)


@given(validities(), starts, st.sampled_from(["months", "days", "seconds"]), st.integers(1, 40))
def test_a_longer_validity_never_expires_earlier(
    validity: Validity, start: datetime, part: str, more: int
) -> None:
    parts = {"months": validity.months, "days": validity.days, "seconds": validity.seconds}
    parts[part] += more
    assume((parts["months"] * 30 + parts["days"]) * _day_s + parts["seconds"] <= _length_s_max)
    assert validity.after(start) < Validity(**parts).after(start)


@given(starts, st.integers(1, validity_months_max))
def test_a_day_the_month_lacks_ends_the_grant_with_the_month(start: datetime, months: int) -> None:
    expiry = Validity(months=months).after(start)
    start = start.astimezone(UTC)
    year, index = divmod(start.year * 12 + start.month - 1 + months, 12)
    last_day = calendar.monthrange(year, index + 1)[1]
    if start.day <= last_day:
        assert (expiry.year, expiry.month, expiry.day) == (year, index + 1, start.day)
        assert expiry.time() == start.time()
    else:
        assert expiry - timedelta(days=1) == datetime(year, index + 1, last_day, tzinfo=UTC)


@given(validities(), starts)
def test_the_expiry_is_after_the_start_and_in_utc(validity: Validity, start: datetime) -> None:
    expiry = validity.after(start)
    assert expiry > start
    assert expiry.utcoffset() == timedelta(0)
    # At most its months of 31 days, plus its days and seconds, later.
    longest = timedelta(days=validity.months * 31 + validity.days, seconds=validity.seconds)
    assert expiry - start <= longest
