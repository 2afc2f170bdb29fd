"""The digest of what a request asks (`Operation.request_hash`) is stored with its transfer and
compared with a replay's, across processes and versions: its bytes must never change. These
are the digests of one request of each kind as the ledger has always computed them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

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
    "Deposit": ({"wallet_id": 7, "amount": 500}, "a936a7e3cfee94682b54a807f5c93f8c"),
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


def test_fields_added_since_are_left_out_while_unset() -> None:
    """A credit stored before credits had terms: its digest is that of a credit without
    them."""
    credit = model.Credit(idempotency_key="k", wallet_id=7, amount=5)
    assert credit.request_hash().hex() == "e2231aac7c923caf2e381fe8c5d270b2"
    assert (
        credit.request_hash()
        != model.Credit(idempotency_key="k", wallet_id=7, amount=5, expires_at=at).request_hash()
    )
