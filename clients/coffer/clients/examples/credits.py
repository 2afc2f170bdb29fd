"""Credits that expire, in four stories, with the sync client.

    python -m coffer.clients.examples.credits --target 127.0.0.1:50051

1. A venue sells a season pass of 10 seats that expire at the end of the season, and spends
   one per game.
2. A coach sells 5 sessions valid 6 months (the unit's default validity), records half a
   session with a note and who gave it, and reads the usage register and the outstanding
   overview.
3. A booking site gives a €20 goodwill credit valid 30 days to a customer who also paid money
   in: the next booking spends the goodwill first.
4. A loyalty programme's awards expire at the end of the month, and an expiration run removes
   what is left (here the month ends two seconds from now, and the example runs the expiration
   itself, as the server does every hour).

Each run makes units once (a second run finds them) and wallets of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta

from coffer.clients import Grant, SyncClient, errors, format_amount

__all__ = ["main", "run"]

# The loyalty story's month, shortened.
month_end_in_s = 2.0


def _unit(coffer: SyncClient, code: str, **definition: object) -> None:
    """Makes the unit, or finds it made (by an earlier run)."""
    with contextlib.suppress(errors.UnitExists):
        coffer.create_unit(code=code, **definition)  # type: ignore[arg-type]


def _grants(coffer: SyncClient, wallet_id: int) -> str:
    listed: list[Grant] = coffer.list_grants(wallet_id=wallet_id).items
    return ", ".join(
        f"{format_amount(grant.remaining, grant.unit, grant.unit_scale)} left of "
        f"{format_amount(grant.amount, grant.unit, grant.unit_scale)}"
        + (
            f" until {grant.expires_at.ToDatetime(tzinfo=UTC):%Y-%m-%d}"
            if grant.HasField("expires_at")
            else ""
        )
        for grant in listed
    )


def run(target: str) -> None:
    run_id = uuid.uuid4().hex[:8]
    now = datetime.now(UTC)
    with SyncClient(target, caller="credits-example") as coffer:
        # 1. The venue's season pass.
        _unit(coffer, "seat", kind="credit", name="Seat", plural="Seats", scale=0)
        fan = coffer.create_wallet(owner_id=f"fan-{run_id}", owner_kind="customer", unit="seat")
        season_end = now + timedelta(days=200)
        coffer.credit(
            wallet_id=fan.id,
            amount=10,
            expires_at=season_end,
            note="season pass",
            reference=f"pass-{run_id}",
        )
        for game in ("Rovers", "United"):
            coffer.debit(
                wallet_id=fan.id, amount=1, note=f"home game vs {game}", performed_by="gate 3"
            )
        after_season = coffer.future_balance(wallet_id=fan.id, at=season_end + timedelta(1))
        print(
            f"venue: {coffer.get_balance(wallet_id=fan.id).balance.available} seats left "
            f"({_grants(coffer, fan.id)}); after the season: {after_season.balance.posted}"
        )

        # 2. The coach's sessions: the unit's default validity, six months.
        _unit(
            coffer,
            "session",
            kind="credit",
            name="Coaching session",
            plural="Coaching sessions",
            scale=2,
            default_validity="P6M",
        )
        client = coffer.create_wallet(
            owner_id=f"client-{run_id}", owner_kind="customer", unit="session"
        )
        coffer.credit(wallet_id=client.id, amount=500, note="5-session pack")
        coffer.debit(
            wallet_id=client.id, amount=50, note="half a session: warm-up", performed_by="coach Bo"
        )
        [used] = coffer.list_usage(wallet_id=client.id).items
        left = coffer.get_balance(wallet_id=client.id).balance.available
        print(
            f"coach: {format_amount(left, 'session', 2)} left "
            f"({_grants(coffer, client.id)}); used "
            f"{format_amount(used.transfer.amount, 'session', 2)} "
            f"by {used.transfer.performed_by}: {used.transfer.note}"
        )
        overview = coffer.outstanding("session", expiring_within_days=31)
        [mine] = [each for each in overview.wallets if each.wallet_id == client.id]
        print(
            f"coach: outstanding {format_amount(mine.posted, 'session', 2)} for "
            f"{mine.owner_id}, expiring within 31 days {format_amount(mine.expiring, 'session', 2)}"
        )

        # 3. The booking site's goodwill, beside money paid in.
        _unit(coffer, "EUR", kind="currency", name="Euro", plural="Euros", scale=2)
        guest = coffer.create_wallet(owner_id=f"guest-{run_id}", owner_kind="customer", unit="EUR")
        coffer.deposit(wallet_id=guest.id, amount=5000, funding_source="card:4242")
        coffer.credit(
            wallet_id=guest.id,
            amount=2000,
            expires_at=now + timedelta(days=30),
            note="goodwill: session cancelled late",
        )
        booked = coffer.debit(wallet_id=guest.id, amount=1500, note="session with Bo")
        drawn = sum(-each.amount for each in booked.transfer.allocations)
        print(
            f"booking: paid {format_amount(1500, 'EUR', 2)}, "
            f"{format_amount(drawn, 'EUR', 2)} of it from the goodwill; "
            f"{_grants(coffer, guest.id)}"
        )

        # 4. The loyalty programme's monthly awards.
        _unit(coffer, "point", kind="credit", name="Point", plural="Points", scale=0)
        member = coffer.create_wallet(
            owner_id=f"member-{run_id}", owner_kind="customer", unit="point"
        )
        month_end = datetime.now(UTC) + timedelta(seconds=month_end_in_s)
        coffer.credit(wallet_id=member.id, amount=120, expires_at=month_end, note="awards")
        coffer.debit(wallet_id=member.id, amount=20, note="coffee")
        time.sleep(month_end_in_s + 0.5)
        expired = coffer.run_expiration()
        print(
            f"loyalty: the month ended, the run expired {expired} grant(s); "
            f"{coffer.get_balance(wallet_id=member.id).balance.posted} points left"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=os.environ.get("COFFER_TARGET", "127.0.0.1:50051"))
    arguments = parser.parse_args(argv)
    try:
        run(arguments.target)
    except errors.CofferError as error:
        print(f"error: {error.reason}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
