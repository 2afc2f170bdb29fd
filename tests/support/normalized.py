"""Replies and batch results in a form a replay's can be compared with the first's."""

from __future__ import annotations

from google.protobuf.message import Message

from coffer.v1 import (
    holds_pb2,
    transfers_pb2,
)


def normalized_reply(reply: Message) -> str:
    """The reply without the fields that describe later events: a replay shows them as they
    stand now (a transfer voided since, a hold captured, released or expired since)."""
    copy = type(reply)()
    copy.CopyFrom(reply)
    if copy.HasField("transfer"):  # type: ignore[attr-defined]
        copy.transfer.ClearField("voided_by_transfer_id")  # type: ignore[attr-defined]
    if isinstance(copy, holds_pb2.PlaceHoldResponse):
        for name in ("status", "resolved_by_transfer_id", "amount_captured"):
            copy.hold.ClearField(name)
    return copy.SerializeToString(deterministic=True).hex()


def normalized_result(kind: str, result: transfers_pb2.OperationResult) -> str:
    """A batch's result for an operation, normalized as `normalized_reply` does a reply, and
    without its replay marker."""
    copy = transfers_pb2.OperationResult()
    copy.CopyFrom(result)
    copy.ClearField("replayed")
    for transfer in copy.transfers:
        transfer.ClearField("voided_by_transfer_id")
    if kind == "place_hold":
        for name in ("status", "resolved_by_transfer_id", "amount_captured"):
            copy.hold.ClearField(name)
    return copy.SerializeToString(deterministic=True).hex()
