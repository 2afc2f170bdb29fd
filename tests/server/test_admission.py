"""Admission's rules, on its deserializer alone: what is refused before it is decoded, and
why; what an admitted request holds until it is released."""

from __future__ import annotations

import asyncio
import time

from coffer.core import errors
from coffer.server.admission import (
    Admission,
    Admitted,
    Refused,
    loop_check_interval_s,
    loop_lag_ms_max,
    request_bytes_max,
    request_bytes_small_max,
)
from coffer.v1 import transfers_pb2, units_pb2

queued_bytes_max = 2 * request_bytes_max
# How long an idle event loop may take to be measured as on time again.
loop_settle_s_max = 30.0


def admission(*, calls_max: int = 100, drain_ms: int = 0) -> Admission:
    return Admission(
        queued_bytes_max=queued_bytes_max,
        calls_max=calls_max,
        retry_after_ms=lambda: 250,
        batch_calls_drain_ms=lambda: drain_ms,
    )


def small() -> bytes:
    """A single call's request, or a small batch call's: both read alike."""
    request = transfers_pb2.SubmitBatchRequest()
    request.operations.add().credit.wallet_id = 7
    return request.SerializeToString()


def large(size: int = request_bytes_small_max + 1) -> bytes:
    request = transfers_pb2.SubmitBatchRequest()
    request.operations.add().credit.note = "n" * (size - 8)
    data = request.SerializeToString()
    assert request_bytes_small_max < len(data) <= request_bytes_max
    return data


def refused(outcome: Admitted | Refused) -> errors.CofferError:
    assert isinstance(outcome, Refused), outcome
    return outcome.error


def test_admitted_requests_are_counted_until_released() -> None:
    gate = admission()
    decode = gate.deserializer(transfers_pb2.SubmitBatchRequest.FromString, "SubmitBatchRequest")
    data = small()
    first, second = decode(data), decode(data)
    assert isinstance(first, Admitted) and first.message.operations[0].credit.wallet_id == 7
    assert isinstance(second, Admitted)
    assert (gate.calls, gate.bytes) == (2, 2 * len(data))
    first.release()
    first.release()  # idempotent
    assert (gate.calls, gate.bytes) == (1, len(data))
    del second  # a call that never reached the guard still gives its place back
    assert (gate.calls, gate.bytes) == (0, 0)


def test_calls_past_calls_max_are_overloaded_with_a_hint() -> None:
    gate = admission(calls_max=2)
    decode = gate.deserializer(transfers_pb2.SubmitBatchRequest.FromString, "SubmitBatchRequest")
    held = [decode(small()), decode(small())]
    error = refused(decode(small()))
    assert isinstance(error, errors.Overloaded) and error.retry_after_ms == 250
    assert gate.refused == 1 and gate.calls == 2
    held[0].release()  # type: ignore[union-attr]
    assert isinstance(decode(small()), Admitted)


def test_large_requests_leave_the_last_bytes_to_small_ones() -> None:
    gate = admission()
    decode = gate.deserializer(transfers_pb2.SubmitBatchRequest.FromString, "SubmitBatchRequest")
    data = large(request_bytes_max // 2 - 16)
    held = [decode(data), decode(data)]  # half of the large requests' share each
    assert all(isinstance(each, Admitted) for each in held)
    assert isinstance(refused(decode(large())), errors.Overloaded)
    # A small request may still use the rest of the budget.
    assert isinstance(decode(small()), Admitted)


def test_large_requests_wait_for_the_queued_batch_calls() -> None:
    gate = admission(drain_ms=600)
    decode = gate.deserializer(transfers_pb2.SubmitBatchRequest.FromString, "SubmitBatchRequest")
    error = refused(decode(large()))
    assert "batch calls waiting" in error.message
    assert isinstance(decode(small()), Admitted)


async def test_large_requests_wait_while_the_event_loop_runs_late() -> None:
    gate = admission()
    decode = gate.deserializer(transfers_pb2.SubmitBatchRequest.FromString, "SubmitBatchRequest")
    watching = asyncio.create_task(gate.watch_loop())
    try:
        # A busy server: the loop runs some 30 ms late at every turn.
        while gate.loop_lag_ms <= loop_lag_ms_max:
            time.sleep(0.03)
            await asyncio.sleep(0)
        assert "busy" in refused(decode(large())).message
        assert isinstance(decode(small()), Admitted)
        # Idle again: the smoothed lateness falls back within a few checks (on a loaded
        # machine, more: the bound is generous, and only says that it does fall back).
        async with asyncio.timeout(loop_settle_s_max):
            while gate.loop_lag_ms > loop_lag_ms_max:
                await asyncio.sleep(loop_check_interval_s)
        assert isinstance(decode(large()), Admitted)
    finally:
        watching.cancel()


def test_malformed_bytes_are_refused_and_not_counted() -> None:
    gate = admission()
    decode = gate.deserializer(units_pb2.GetUnitRequest.FromString, "coffer.v1.GetUnitRequest")
    error = refused(decode(b"\x0a\x05ab"))
    assert isinstance(error, errors.MalformedRequest)
    assert error.message == "the request is not a valid coffer.v1.GetUnitRequest"
    assert (gate.calls, gate.bytes, gate.refused) == (0, 0, 0)
