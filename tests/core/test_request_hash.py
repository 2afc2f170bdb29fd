"""The digest of what a request asks (`Operation.request_hash`) is stored with its transfer and
compared with a replay's, across processes and versions: its bytes must never change. These
are the digests of one request of each kind as the ledger has always computed them."""

from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta, timezone
from enum import IntEnum
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from coffer.core import model

at = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
common: dict[str, Any] = {
    "idempotency_key": "order-1",
    "caller": "shop",
    "note": "a note",
    "reference": "ref-1",
    "performed_by": "ann",
    "metadata": {"b": "2", "a": "1"},
}
# Each kind's own fields, and its digest (hex) with `common`.
requests: dict[str, tuple[dict[str, Any], str]] = {
    "Credit": (
        {"wallet_id": 7, "amount": 500, "valid_from": at, "expires_at": at.replace(year=2031)},
        "b855106ed04b2368982b602ad05c09d4",
    ),
    "Debit": (
        {"wallet_id": 7, "amount": 500, "mode": model.DebitMode.up_to},
        "621c06384304e836f76fd852581bbd61",
    ),
    "WalletTransfer": (
        {"source_wallet_id": 7, "target_wallet_id": 8, "amount": 500},
        "471a958170828a919a6aa68c00b43dbe",
    ),
    "Deposit": (
        {"wallet_id": 7, "amount": 500, "valid_from": at, "expires_at": at.replace(year=2031)},
        "8297fc2eee2a5ef27170002370a34758",
    ),
    "Withdrawal": ({"wallet_id": 7, "amount": 500}, "710546a39a58ef96727fd1bf6747c475"),
    "Payment": (
        {"payer_wallet_id": 7, "payee_wallet_id": 8, "amount": 500},
        "62110bbc3441d08297a41682458dc007",
    ),
    "Void": ({"transfer_id": 9, "expires_at": at}, "6ff8fe7835b3cf61e7dca06ab3ba7552"),
    "PlaceHold": (
        {"wallet_id": 7, "amount": 500, "target_wallet_id": 8, "timeout_s": 60},
        "139cc37667d3cefea6b96e281544f372",
    ),
    "CaptureHold": ({"hold_id": 9, "amount": 300}, "3b5dca93d7bc6682ebe7a72709fdaedb"),
    "ReleaseHold": ({"hold_id": 9}, "26f7a44b4d0ff7b5ccba0c97e50d12ad"),
    "ExpireHold": ({"hold_id": 9}, "a9f2a823fa1bb7224690408bf2d305f9"),
    "ExpireGrant": ({"grant_id": 9}, "3987b00155725d2f37f58e9f904f5e7d"),
}


def test_every_kind_of_operation_has_its_known_digest() -> None:
    assert {kind.__name__ for kind in model.Operation.__subclasses__()} == set(requests)
    for name, (fields, digest) in requests.items():
        operation = getattr(model, name)(**common, **fields)
        assert operation.request_hash().hex() == digest, name


def test_a_new_wallets_request_has_its_known_digest() -> None:
    wallet = model.NewWallet(
        idempotency_key="wallet-1",
        caller="shop",
        owner_id="ann",
        owner_kind=model.OwnerKind.customer,
        unit="EUR",
        balance_minimum=-500,
        metadata={"b": "2", "a": "1"},
        low_balance_threshold=100,
        top_up_to=1000,
    )
    assert wallet.request_hash().hex() == "6529148fa11800dcd237fa00cc6362e3"


def test_fields_added_since_are_left_out_while_unset() -> None:
    """A credit stored before credits had terms: its digest is that of a credit without
    them; a deposit's with one term set, that of the term alone."""
    credit = model.Credit(idempotency_key="k", wallet_id=7, amount=5)
    assert credit.request_hash().hex() == "e2231aac7c923caf2e381fe8c5d270b2"
    deposit = model.Deposit(**common, wallet_id=7, amount=500, expires_at=at.replace(year=2031))
    assert deposit.request_hash().hex() == "219d5e1401c25c090882123fa8c1ef56"
    assert (
        credit.request_hash()
        != model.Credit(idempotency_key="k", wallet_id=7, amount=5, expires_at=at).request_hash()
    )


def reference_digest(operation: model.Operation) -> bytes:
    """The digest as specified: BLAKE2b (16 bytes) of the repr of a list of the operation's
    type's name and its fields' values in their order, without the key, the caller, the link
    and the owner limit; metadata as its sorted items; enums as their numbers; the terms
    (valid from, expires at) as (name, ISO time in UTC), left out while unset."""
    items: list[Any] = [type(operation).__name__]
    for each in dataclasses.fields(operation):
        value = getattr(operation, each.name)
        if each.name in ("idempotency_key", "caller", "linked", "owner_limit"):
            continue
        if each.name == "metadata":
            value = tuple(sorted(value.items()))
        elif isinstance(value, IntEnum):
            value = int(value)
        elif each.name in ("valid_from", "expires_at"):
            if value is None:
                continue
            value = (each.name, value.astimezone(UTC).isoformat())
        items.append(value)
    return hashlib.blake2b(repr(items).encode(), digest_size=16).digest()


texts = st.text(st.characters(blacklist_characters="\x00"), max_size=12)
zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=9, minutes=30))]
)


@settings(max_examples=200, deadline=None)
@given(data=st.data(), name=st.sampled_from(sorted(requests)))
def test_the_digest_is_as_specified(data: st.DataObject, name: str) -> None:
    """Any request of any kind: its texts and metadata varied, its times in any zone (the
    same instant gives the same digest) or, where optional, unset."""
    fields, _ = requests[name]
    varied: dict[str, Any] = {
        **common,
        "note": data.draw(texts),
        "reference": data.draw(texts.filter(bool)),
        "metadata": data.draw(st.dictionaries(texts.filter(bool), texts, max_size=3)),
    }
    for field, value in fields.items():
        if isinstance(value, datetime):
            in_zone = value.astimezone(data.draw(zones))
            value = data.draw(st.sampled_from([in_zone, None]))
        varied[field] = value
    operation = getattr(model, name)(**varied)
    assert operation.request_hash() == reference_digest(operation)
