"""The client without the Coffer server: a real gRPC server in the test plays it.

The scripted server answers each call with the next outcome the test planned (a rich status
built with `rpc_status.to_status`, as the real server builds them, a delay, or a response), or
with a plain response when nothing is planned; it records every call it got.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, get_args

import grpc
import pytest
import pytest_asyncio
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from coffer import clients
from coffer.clients import Client, Operations, SyncClient, errors, operations
from coffer.clients import client as client_module
from coffer.clients.cli import main
from coffer.clients.client import connections_max
from coffer.core import errors as core_errors
from coffer.v1 import (
    events_pb2,
    holds_pb2,
    holds_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    types_pb2,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)

from support.paths import root

key_pattern = re.compile(r"[0-9a-f]{32}")
mypy_timeout_s = 120


@dataclass
class Call:
    method: str
    request: Any
    caller: str | None
    # The client's address: one a connection.
    peer: str


@dataclass
class Delay:
    seconds: float


@dataclass
class Late:
    """A status, answered after a while."""

    seconds: float
    status: grpc.Status


Outcome = grpc.Status | Delay | Late | Message


class Script:
    def __init__(self) -> None:
        self.outcomes: deque[Outcome] = deque()
        self.calls: list[Call] = []

    def plan(self, *outcomes: Outcome) -> None:
        self.outcomes.extend(outcomes)

    async def answer(
        self, method: str, request: Any, context: grpc.aio.ServicerContext[Any, Any], default: Any
    ) -> Any:
        metadata = dict(context.invocation_metadata() or ())
        caller = metadata.get("coffer-caller")
        self.calls.append(
            Call(method, request, caller if isinstance(caller, str) else None, context.peer())
        )
        outcome = self.outcomes.popleft() if self.outcomes else default
        if isinstance(outcome, Late):
            await asyncio.sleep(outcome.seconds)
            outcome = outcome.status
        if isinstance(outcome, grpc.Status):
            await context.abort_with_status(outcome)
        if isinstance(outcome, Delay):
            await asyncio.sleep(outcome.seconds)
            return default
        return outcome


def rich_status(
    code: grpc.StatusCode,
    message: str,
    reason: str | None = None,
    *,
    field: str | None = None,
    domain: str = "coffer.v1",
) -> grpc.Status:
    status = status_pb2.Status(code=code.value[0], message=message)
    if reason is not None:
        info = error_details_pb2.ErrorInfo(reason=reason, domain=domain)
        if field is not None:
            info.metadata["field"] = field
        status.details.add().Pack(info)
    return rpc_status.to_status(status)


def eur_transfer(**fields: Any) -> types_pb2.Transfer:
    return types_pb2.Transfer(unit="EUR", **fields)


history = [
    eur_transfer(
        id=number,
        kind=types_pb2.TRANSFER_KIND_CREDIT,
        source_wallet_id=1,
        target_wallet_id=7,
        amount=100 * number,
    )
    for number in range(5, 0, -1)
]


class Units(units_pb2_grpc.UnitServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def GetUnit(self, request: Any, context: Any) -> Any:
        default = units_pb2.GetUnitResponse(unit=types_pb2.Unit(code=request.code))
        return await self.script.answer("GetUnit", request, context, default)


class Wallets(wallets_pb2_grpc.WalletServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def GetBalance(self, request: Any, context: Any) -> Any:
        default = wallets_pb2.GetBalanceResponse(
            wallet_id=request.wallet_id,
            unit="EUR",
            balance=types_pb2.Balance(posted=2000, pending=300, available=1700),
        )
        return await self.script.answer("GetBalance", request, context, default)


class Transfers(transfers_pb2_grpc.TransferServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def Credit(self, request: Any, context: Any) -> Any:
        transfer = eur_transfer(
            id=42,
            kind=types_pb2.TRANSFER_KIND_CREDIT,
            source_wallet_id=1,
            target_wallet_id=request.wallet_id,
            amount=request.amount,
            reference=request.reference,
            performed_by=request.performed_by,
        )
        default = transfers_pb2.CreditResponse(transfer=transfer)
        return await self.script.answer("Credit", request, context, default)

    async def SubmitBatch(self, request: Any, context: Any) -> Any:
        results = [transfers_pb2.OperationResult() for _ in request.operations]
        default = transfers_pb2.SubmitBatchResponse(results=results)
        return await self.script.answer("SubmitBatch", request, context, default)

    async def ListTransfers(self, request: Any, context: Any) -> Any:
        start = int(request.page_token or 0)
        end = start + (request.page_size or 100)
        default = transfers_pb2.ListTransfersResponse(
            transfers=history[start:end],
            next_page_token=str(end) if end < len(history) else "",
        )
        return await self.script.answer("ListTransfers", request, context, default)


class Holds(holds_pb2_grpc.HoldServiceServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    async def PlaceHold(self, request: Any, context: Any) -> Any:
        hold = types_pb2.Hold(
            id=5,
            source_wallet_id=request.wallet_id,
            target_wallet_id=request.target_wallet_id or 1,
            unit="EUR",
            amount=request.amount,
            status=types_pb2.HOLD_STATUS_PENDING,
        )
        default = holds_pb2.PlaceHoldResponse(hold=hold, transfer=eur_transfer(id=43))
        return await self.script.answer("PlaceHold", request, context, default)


@dataclass
class Server:
    target: str
    script: Script


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def server() -> AsyncIterator[Server]:
    script = Script()
    grpc_server = grpc.aio.server()
    units_pb2_grpc.add_UnitServiceServicer_to_server(Units(script), grpc_server)
    wallets_pb2_grpc.add_WalletServiceServicer_to_server(Wallets(script), grpc_server)
    transfers_pb2_grpc.add_TransferServiceServicer_to_server(Transfers(script), grpc_server)
    holds_pb2_grpc.add_HoldServiceServicer_to_server(Holds(script), grpc_server)
    health_servicer = health.aio.HealthServicer()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield Server(f"127.0.0.1:{port}", script)
    finally:
        await grpc_server.stop(grace=None)


@pytest.fixture
def script(server: Server) -> Script:
    server.script.outcomes.clear()
    server.script.calls.clear()
    return server.script


@pytest.fixture
def closed_target() -> str:
    """An address where nothing listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"127.0.0.1:{port}"


# The error tree.


def test_reasons_mirror_the_domain_errors() -> None:
    client_reasons = errors.reasons()
    domain_reasons = core_errors.reasons()
    assert set(client_reasons) == set(domain_reasons)
    for reason, domain_class in domain_reasons.items():
        client_class = client_reasons[reason]
        assert client_class.__name__ == domain_class.__name__
        assert client_class.code.name.lower() == domain_class.category.value
        assert client_class.retryable == domain_class.retryable
        for domain_parent in domain_class.__mro__[1:]:
            if domain_parent is core_errors.CofferError:
                break
            assert domain_parent.__name__ in {c.__name__ for c in client_class.__mro__}


@pytest.mark.parametrize("reason", sorted(errors.reasons()))
async def test_each_reason_raises_its_class(reason: str, server: Server, script: Script) -> None:
    error_class = errors.reasons()[reason]
    script.plan(rich_status(error_class.code, f"{reason.lower()} happened", reason))
    async with Client(server.target, retries_max=0) as coffer:
        with pytest.raises(error_class) as raised:
            await coffer.get_unit(code="EUR")
    error = raised.value
    assert type(error) is error_class
    assert error.reason == reason
    assert error.code == error_class.code
    assert error.message == f"{reason.lower()} happened"
    assert str(error) == f"{reason}: {reason.lower()} happened"
    assert isinstance(error.__cause__, grpc.aio.AioRpcError)


async def test_invalid_argument_names_its_field(server: Server, script: Script) -> None:
    script.plan(
        rich_status(
            grpc.StatusCode.INVALID_ARGUMENT,
            "amount: must be positive",
            "INVALID_ARGUMENT",
            field="amount",
        )
    )
    async with Client(server.target) as coffer:
        with pytest.raises(errors.InvalidArgument) as raised:
            await coffer.credit(wallet_id=7, amount=0)
    assert raised.value.field == "amount"
    assert raised.value.metadata == {"field": "amount"}
    assert raised.value.retryable is False
    assert len(script.calls) == 1


async def test_invalid_argument_names_its_field_from_bad_request(
    server: Server, script: Script
) -> None:
    """A status whose ErrorInfo does not name the field (as a server of another make may send
    it) still gives the field, from the standard BadRequest detail."""
    status = status_pb2.Status(
        code=grpc.StatusCode.INVALID_ARGUMENT.value[0], message="amount: must be positive"
    )
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason="INVALID_ARGUMENT", domain="coffer.v1")
    )
    violation = error_details_pb2.BadRequest.FieldViolation(
        field="amount", description="amount: must be positive"
    )
    status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    script.plan(rpc_status.to_status(status))
    async with Client(server.target) as coffer:
        with pytest.raises(errors.InvalidArgument) as raised:
            await coffer.credit(wallet_id=7, amount=0)
    assert raised.value.field == "amount"
    assert raised.value.metadata == {}


@pytest.mark.parametrize(
    ("status", "error_class", "reason"),
    [
        (rich_status(grpc.StatusCode.NOT_FOUND, "gone"), errors.NotFound, "NOT_FOUND"),
        (
            rich_status(grpc.StatusCode.FAILED_PRECONDITION, "new rule", "A_NEW_REASON"),
            errors.FailedPrecondition,
            "A_NEW_REASON",
        ),
        (
            rich_status(grpc.StatusCode.NOT_FOUND, "elsewhere", "WALLET_NOT_FOUND", domain="x.y"),
            errors.NotFound,
            "NOT_FOUND",
        ),
        (
            rich_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "too big"),
            errors.ResourceExhausted,
            "RESOURCE_EXHAUSTED",
        ),
        (rich_status(grpc.StatusCode.DATA_LOSS, "oops"), errors.Internal, "DATA_LOSS"),
    ],
)
async def test_status_without_a_known_reason_becomes_its_code_class(
    status: grpc.Status,
    error_class: type[errors.CofferError],
    reason: str,
    server: Server,
    script: Script,
) -> None:
    script.plan(status)
    async with Client(server.target) as coffer:
        with pytest.raises(errors.CofferError) as raised:
            await coffer.get_unit(code="EUR")
    assert type(raised.value) is error_class
    assert raised.value.reason == reason
    assert raised.value.field is None
    # None of these is worth retrying.
    assert len(script.calls) == 1


async def test_unimplemented_method_is_internal(server: Server, script: Script) -> None:
    async with Client(server.target) as coffer:
        with pytest.raises(errors.Internal) as raised:
            await coffer.cancel_wallet(wallet_id=7)
    assert raised.value.code == grpc.StatusCode.UNIMPLEMENTED
    assert raised.value.reason == "UNIMPLEMENTED"


async def test_sync_rpc_error_is_translated_too(server: Server, script: Script) -> None:
    script.plan(
        rich_status(
            grpc.StatusCode.FAILED_PRECONDITION, "wallet 7 is cancelled", "WALLET_NOT_ACTIVE"
        )
    )

    def call() -> errors.CofferError:
        with grpc.insecure_channel(server.target) as channel:
            stub = units_pb2_grpc.UnitServiceStub(channel)
            try:
                stub.GetUnit(units_pb2.GetUnitRequest(code="EUR"), timeout=5)
            except grpc.RpcError as error:
                return errors.from_rpc_error(error)
        raise AssertionError("the call succeeded")

    error = await asyncio.to_thread(call)
    assert type(error) is errors.WalletNotActive
    assert error.message == "wallet 7 is cancelled"


def test_from_operation_error() -> None:
    failed_precondition = grpc.StatusCode.FAILED_PRECONDITION.value[0]
    error = errors.from_operation_error(
        transfers_pb2.OperationError(
            reason="INSUFFICIENT_FUNDS",
            message="wallet 7 has 300 available, needs 500",
            code=failed_precondition,
        )
    )
    assert type(error) is errors.InsufficientFunds
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION
    assert str(error) == "INSUFFICIENT_FUNDS: wallet 7 has 300 available, needs 500"
    linked = errors.from_operation_error(
        transfers_pb2.OperationError(
            reason="LINKED_OPERATION_FAILED", message="", code=grpc.StatusCode.ABORTED.value[0]
        )
    )
    assert type(linked) is errors.LinkedOperationFailed
    unknown = errors.from_operation_error(
        transfers_pb2.OperationError(reason="A_NEW_REASON", message="", code=failed_precondition)
    )
    assert type(unknown) is errors.FailedPrecondition
    assert unknown.reason == "A_NEW_REASON"
    assert (
        type(errors.from_operation_error(transfers_pb2.OperationError(code=99))) is errors.Internal
    )
    # status_code, the google.rpc.Code, is read first; the bare code of an older server after.
    by_status_code = errors.from_operation_error(
        transfers_pb2.OperationError(
            reason="A_NEWER_REASON", status_code=code_pb2.FAILED_PRECONDITION
        )
    )
    assert type(by_status_code) is errors.FailedPrecondition
    assert by_status_code.code == grpc.StatusCode.FAILED_PRECONDITION


# Calls: metadata, idempotency keys, retries, deadlines.


async def test_call_sends_caller_and_a_fresh_key(server: Server, script: Script) -> None:
    async with Client(server.target, caller="shop-1") as coffer:
        first = await coffer.credit(wallet_id=7, amount=1500, reference="order-1")
        await coffer.credit(wallet_id=7, amount=1500)
    assert first.amount == 1500
    assert first.reference == "order-1"
    assert [call.caller for call in script.calls] == ["shop-1", "shop-1"]
    keys = [call.request.idempotency_key for call in script.calls]
    assert all(key_pattern.fullmatch(key) for key in keys)
    assert keys[0] != keys[1]


async def test_given_key_is_sent_as_is(server: Server, script: Script) -> None:
    async with Client(server.target) as coffer:
        await coffer.credit(wallet_id=7, amount=1, idempotency_key="order-1:credit")
    assert script.calls[0].request.idempotency_key == "order-1:credit"
    assert script.calls[0].caller == "default"


async def test_unavailable_is_retried_with_the_same_key(server: Server, script: Script) -> None:
    unavailable = rich_status(grpc.StatusCode.UNAVAILABLE, "store unreachable", "UNAVAILABLE")
    overloaded = rich_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", "OVERLOADED")
    script.plan(unavailable, overloaded)
    async with Client(server.target, retries_max=2) as coffer:
        transfer = await coffer.credit(wallet_id=7, amount=500)
    assert transfer.id == 42
    assert len(script.calls) == 3
    assert len({call.request.idempotency_key for call in script.calls}) == 1


async def test_a_retry_goes_over_the_next_connection(server: Server, script: Script) -> None:
    """With several connections, each attempt takes the connection whose turn it is: a retry
    is not stuck on the connection (a server's process) that failed it."""
    unavailable = rich_status(grpc.StatusCode.UNAVAILABLE, "store unreachable", "UNAVAILABLE")
    script.plan(unavailable, unavailable)
    async with Client(server.target, retries_max=2, connections=3) as coffer:
        assert (await coffer.credit(wallet_id=7, amount=500)).id == 42
        assert (await coffer.get_balance(wallet_id=7)).balance.posted == 2000
    assert len(script.calls) == 4
    assert len({call.peer for call in script.calls[:3]}) == 3
    # The turn went on from the last attempt: the next call over the first connection again.
    assert script.calls[3].peer == script.calls[0].peer


async def test_retries_are_bounded(server: Server, script: Script) -> None:
    overloaded = rich_status(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", "OVERLOADED")
    script.plan(overloaded, overloaded, overloaded, overloaded)
    async with Client(server.target, retries_max=2) as coffer:
        with pytest.raises(errors.Overloaded) as raised:
            await coffer.credit(wallet_id=7, amount=500)
    assert raised.value.retryable is True
    assert len(script.calls) == 3


async def test_domain_errors_are_not_retried(server: Server, script: Script) -> None:
    script.plan(
        rich_status(
            grpc.StatusCode.FAILED_PRECONDITION,
            "wallet 7 has 300 available, needs 500",
            "INSUFFICIENT_FUNDS",
        )
    )
    async with Client(server.target, retries_max=3) as coffer:
        with pytest.raises(errors.InsufficientFunds):
            await coffer.credit(wallet_id=7, amount=500)
    assert len(script.calls) == 1


async def test_deadline(server: Server, script: Script) -> None:
    script.plan(Delay(2.0))
    async with Client(server.target, timeout_s=0.2) as coffer:
        with pytest.raises(errors.DeadlineExceeded) as raised:
            await coffer.get_unit(code="EUR")
    assert raised.value.reason == "DEADLINE_EXCEEDED"
    assert len(script.calls) == 1


async def test_the_servers_deadline_exceeded_is_retried_within_the_deadline(
    server: Server, script: Script
) -> None:
    # The server dropped the operation unapplied, its deadline (a proxy's, shorter) passed;
    # the client's has not: the same request again, with the same key, is safe.
    script.plan(
        rich_status(grpc.StatusCode.DEADLINE_EXCEEDED, "dropped unapplied", "DEADLINE_EXCEEDED")
    )
    async with Client(server.target, timeout_s=10, retries_max=2) as coffer:
        transfer = await coffer.credit(wallet_id=7, amount=500)
    assert transfer.id == 42
    assert len(script.calls) == 2
    assert len({call.request.idempotency_key for call in script.calls}) == 1


async def test_the_servers_deadline_exceeded_at_the_deadline_is_raised(
    server: Server, script: Script
) -> None:
    # As the real server answers it: when the deadline the client gave it has passed. Then
    # the client's has too, or all but: no time for a retry.
    timeout_s = 0.3
    deadline_exceeded = rich_status(
        grpc.StatusCode.DEADLINE_EXCEEDED, "dropped unapplied", "DEADLINE_EXCEEDED"
    )
    script.plan(*[Late(timeout_s - 0.02, deadline_exceeded)] * 4)
    started = time.monotonic()
    async with Client(server.target, timeout_s=timeout_s, retries_max=3) as coffer:
        with pytest.raises(errors.DeadlineExceeded) as raised:
            await coffer.credit(wallet_id=7, amount=500)
    assert raised.value.retryable
    assert len(script.calls) == 1
    assert time.monotonic() - started < timeout_s + 1


async def test_unreachable_server(closed_target: str) -> None:
    async with Client(closed_target, timeout_s=5, retries_max=1) as coffer:
        with pytest.raises(errors.Unavailable) as raised:
            await coffer.get_unit(code="EUR")
    assert raised.value.reason == "UNAVAILABLE"
    assert raised.value.code == grpc.StatusCode.UNAVAILABLE


async def test_server_that_comes_up_during_the_retries_is_reached(closed_target: str) -> None:
    script = Script()

    async def start_late() -> grpc.aio.Server:
        await asyncio.sleep(0.3)
        late = grpc.aio.server()
        units_pb2_grpc.add_UnitServiceServicer_to_server(Units(script), late)
        late.add_insecure_port(closed_target)
        await late.start()
        return late

    starting = asyncio.create_task(start_late())
    try:
        async with Client(closed_target, timeout_s=10, retries_max=6) as coffer:
            unit = await coffer.get_unit(code="EUR")
    finally:
        await (await starting).stop(grace=None)
    assert unit.code == "EUR"


def test_client_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="caller"):
        Client(caller="")
    with pytest.raises(ValueError, match="caller"):
        Client(caller="naïve")
    with pytest.raises(ValueError, match="caller"):
        Client(caller="x" * 129)
    with pytest.raises(ValueError, match="caller"):
        Client(caller="shop backend")
    with pytest.raises(ValueError, match="caller must not start with '@'"):
        Client(caller="@coffer")
    assert Client(caller="x" * 128).caller == "x" * 128
    with pytest.raises(ValueError, match="retries_max"):
        Client(retries_max=11)
    with pytest.raises(ValueError, match="timeout_s"):
        Client(timeout_s=0)
    for connections in (0, connections_max + 1, True, 1.5):
        with pytest.raises(ValueError, match=f"connections must be 1 to {connections_max}"):
            Client(connections=connections)  # type: ignore[arg-type]
    assert Client(connections=connections_max).connections == connections_max


async def test_iterator_walks_every_page(server: Server, script: Script) -> None:
    async with Client(server.target) as coffer:
        page = await coffer.list_transfers(
            wallet_id=7, kinds=["credit", "hold_expiry"], page_size=2
        )
        transfers = [transfer async for transfer in coffer.iter_transfers(wallet_id=7, page_size=2)]
    assert [transfer.id for transfer in page.items] == [5, 4]
    assert page.next_page_token == "2"
    assert list(script.calls[0].request.kinds) == [
        types_pb2.TRANSFER_KIND_CREDIT,
        types_pb2.TRANSFER_KIND_HOLD_EXPIRY,
    ]
    assert [transfer.id for transfer in transfers] == [5, 4, 3, 2, 1]
    assert [call.request.page_token for call in script.calls[1:]] == ["", "2", "4"]


async def test_batch_fills_missing_keys_only(server: Server, script: Script) -> None:
    keyed = operations.credit(wallet_id=7, amount=5, idempotency_key="k-1", linked=True)
    bare = transfers_pb2.Operation(credit=transfers_pb2.CreditRequest(wallet_id=7, amount=6))
    async with Client(server.target) as coffer:
        results = await coffer.submit_batch([keyed, bare])
    assert len(results) == 2
    sent = script.calls[0].request.operations
    assert sent[0].credit.idempotency_key == "k-1"
    assert sent[0].linked is True
    assert key_pattern.fullmatch(sent[1].credit.idempotency_key)
    # The caller's messages are left as they were.
    assert bare.credit.idempotency_key == ""


async def test_hold_timeout_is_a_duration(server: Server, script: Script) -> None:
    async with Client(server.target) as coffer:
        result = await coffer.place_hold(wallet_id=7, amount=500, timeout=timedelta(minutes=5))
    assert result.hold.status == types_pb2.HOLD_STATUS_PENDING
    assert script.calls[0].request.timeout.seconds == 300


async def test_health(server: Server, script: Script) -> None:
    async with Client(server.target) as coffer:
        assert await coffer.health() == "SERVING"


async def test_sync_client(server: Server, script: Script) -> None:
    script.plan(
        rich_status(
            grpc.StatusCode.FAILED_PRECONDITION, "wallet 7 is cancelled", "WALLET_NOT_ACTIVE"
        )
    )

    def use() -> tuple[type[errors.CofferError], types_pb2.Transfer, list[int]]:
        with SyncClient(server.target, caller="batch-job") as coffer:
            with pytest.raises(errors.CofferError) as raised:
                coffer.credit(wallet_id=7, amount=1)
            transfer = coffer.credit(wallet_id=7, amount=250)
            ids = [transfer.id for transfer in coffer.iter_transfers(wallet_id=7, page_size=3)]
        with pytest.raises(RuntimeError, match="closed"):
            coffer.get_unit(code="EUR")
        return type(raised.value), transfer, ids

    error_class, transfer, ids = await asyncio.to_thread(use)
    assert error_class is errors.WalletNotActive
    assert transfer.amount == 250
    assert ids == [5, 4, 3, 2, 1]
    assert {call.caller for call in script.calls} == {"batch-job"}


# Operation builders.


def test_operation_builders() -> None:
    built = {
        "credit": operations.credit(wallet_id=7, amount=1),
        "debit": operations.debit(wallet_id=7, amount=1, mode="up_to"),
        "transfer": operations.transfer(source_wallet_id=7, target_wallet_id=8, amount=1),
        "deposit": operations.deposit(wallet_id=7, amount=1, funding_source="iban:DE89"),
        "withdraw": operations.withdraw(wallet_id=7, amount=1, funding_source="iban:DE89"),
        "pay": operations.pay(payer_wallet_id=7, payee_wallet_id=8, amount=1),
        "void": operations.void(transfer_id=42),
        "place_hold": operations.place_hold(wallet_id=7, amount=1, timeout=timedelta(hours=2)),
        "capture_hold": operations.capture_hold(hold_id=5),
        "release_hold": operations.release_hold(hold_id=5),
    }
    oneof = transfers_pb2.Operation.DESCRIPTOR.oneofs_by_name["operation"]
    assert set(built) == {field.name for field in oneof.fields}
    keys = set()
    for kind, operation in built.items():
        assert operation.WhichOneof("operation") == kind
        assert operation.linked is False
        key = getattr(operation, kind).idempotency_key
        assert key_pattern.fullmatch(key)
        keys.add(key)
    assert len(keys) == len(built)
    assert built["debit"].debit.mode == types_pb2.DEBIT_MODE_UP_TO
    assert built["place_hold"].place_hold.timeout.seconds == 7200
    assert not built["capture_hold"].capture_hold.HasField("amount")
    assert operations.capture_hold(hold_id=5, amount=0).capture_hold.HasField("amount")
    linked = operations.credit(
        wallet_id=7, amount=1, idempotency_key="k", metadata={"a": "b"}, linked=True
    )
    assert linked.linked is True
    assert linked.credit.idempotency_key == "k"
    assert dict(linked.credit.metadata) == {"a": "b"}
    with pytest.raises(ValueError, match="all_or_nothing, up_to"):
        operations.debit(wallet_id=7, amount=1, mode="sometimes")  # type: ignore[arg-type]


def test_public_names() -> None:
    assert set(clients.__all__) == {
        "Balance",
        "BatchOutcomes",
        "Client",
        "CofferError",
        "DebitResult",
        "Event",
        "EventPage",
        "Grant",
        "Hold",
        "HoldResult",
        "Operation",
        "OperationResult",
        "Operations",
        "Page",
        "SyncClient",
        "Tls",
        "Transfer",
        "Unit",
        "Wallet",
        "WalletBalance",
        "errors",
        "events_pb2",
        "format_amount",
        "grants_pb2",
        "holds_pb2",
        "operations",
        "reports_pb2",
        "transfers_pb2",
        "types_pb2",
        "units_pb2",
        "wallets_pb2",
    }
    for name in clients.__all__:
        assert getattr(clients, name) is not None


def test_sync_client_offers_every_client_method() -> None:
    public = {name for name in vars(Client) if not name.startswith("_")}
    assert public - {"close"} <= set(vars(SyncClient))


def test_each_operation_is_declared_once() -> None:
    """Client's and SyncClient's methods of an operation are built from its builder in
    Operations: the same words and keyword arguments, but `linked`, which the builder takes
    first; the single calls return what their response carries."""
    builders = {
        name: builder
        for name, builder in vars(Operations).items()
        if isinstance(builder, staticmethod)
    }
    oneof = transfers_pb2.Operation.DESCRIPTOR.oneofs_by_name["operation"]
    assert set(builders) == {field.name for field in oneof.fields}
    results = {"debit": "DebitResult", "place_hold": "HoldResult", "capture_hold": "HoldResult"}
    results["release_hold"] = "HoldResult"
    for name in builders:
        built = inspect.signature(getattr(Operations, name))
        [linked, *arguments] = built.parameters.values()
        assert (linked.name, linked.default) == ("linked", False)
        assert all(each.kind is inspect.Parameter.KEYWORD_ONLY for each in arguments), name
        for client_class in (Client, SyncClient):
            method = getattr(client_class, name)
            signature = inspect.signature(method)
            assert list(signature.parameters.values())[1:] == arguments, (client_class, name)
            assert signature.return_annotation == results.get(name, "Transfer"), name
            assert method.__doc__ == getattr(Operations, name).__doc__


def test_literal_names_are_the_protos() -> None:
    """The names the typed client takes for the API's enums, spelled out for type checkers,
    are the protos' values."""

    def values(enum: Any, prefix: str) -> list[str]:
        return [each.name.removeprefix(prefix).lower() for each in enum.DESCRIPTOR.values[1:]]

    assert list(get_args(client_module.TransferKindName)) == values(
        types_pb2.TransferKind, "TRANSFER_KIND_"
    )
    assert list(get_args(client_module.UnitKindName)) == values(types_pb2.UnitKind, "UNIT_KIND_")
    assert list(get_args(client_module.OwnerKindName)) == values(types_pb2.OwnerKind, "OWNER_KIND_")
    assert list(get_args(client_module.DebitModeName)) == values(types_pb2.DebitMode, "DEBIT_MODE_")
    assert list(get_args(client_module.EventTypeName)) == values(
        events_pb2.EventType, "EVENT_TYPE_"
    )


# What a type checker sees of the client, as its users' code would: each line marked
# `# error: CODE` must be refused with that code, every other line accepted.
typed_use = """\
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import assert_type

from coffer.clients import (
    Client, DebitResult, Grant, HoldResult, Operation, Page, SyncClient, Transfer, Wallet,
    WalletBalance, operations
)


async def asynchronous(coffer: Client) -> None:
    assert_type(await coffer.credit(wallet_id=1, amount=2), Transfer)
    assert_type(await coffer.debit(wallet_id=1, amount=2, mode="up_to"), DebitResult)
    assert_type(await coffer.release_hold(hold_id=1), HoldResult)
    assert_type(coffer.iter_transfers(wallet_id=1), AsyncIterator[Transfer])
    await coffer.credit(wallet_id=1, amount=2, linked=True)  # error: call-arg
    await coffer.debit(wallet_id=1, amount=2, mode="sometimes")  # error: arg-type
    assert_type(await coffer.credit(wallet_id=1, amount=2, expires_at=datetime.now(UTC)), Transfer)
    assert_type(await coffer.list_grants(wallet_id=1), Page[Grant])
    assert_type(coffer.iter_grants(wallet_id=1, include_spent=True), AsyncIterator[Grant])
    assert_type(await coffer.run_expiration(), int)
    await coffer.credit(wallet_id=1, amount=2, valid_from="now")  # error: arg-type


def synchronous(coffer: SyncClient) -> None:
    assert_type(coffer.credit(wallet_id=1, amount=2), Transfer)
    assert_type(coffer.debit(wallet_id=1, amount=2), DebitResult)
    assert_type(coffer.place_hold(wallet_id=1, amount=2), HoldResult)
    assert_type(coffer.list_wallets(), Page[Wallet])
    assert_type(coffer.iter_transfers(wallet_id=1), Iterator[Transfer])
    coffer.pay(payer_wallet_id=1, payee_wallet_id="2", amount=3)  # error: arg-type
    coffer.void(transfer_id=1, linked=False)  # error: call-arg
    coffer.transfer(source_wallet_id=1, amount=3)  # error: call-arg
    assert_type(coffer.future_balance(wallet_id=1, at=datetime.now(UTC)), WalletBalance)
    assert_type(coffer.iter_grants(wallet_id=1), Iterator[Grant])
    assert_type(coffer.void(transfer_id=1, expires_at=datetime.now(UTC)), Transfer)
    coffer.future_balance(wallet_id=1)  # error: call-arg


def batched() -> None:
    assert_type(operations.credit(wallet_id=1, amount=2, linked=True), Operation)
    assert_type(operations.capture_hold(hold_id=1, amount=None), Operation)
    operations.deposit(wallet_id=1, amount=2)  # error: call-arg
"""


def test_the_client_is_typed_for_its_users(tmp_path: Path) -> None:
    use = tmp_path / "use.py"
    use.write_text(typed_use)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "cache"), str(use)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=mypy_timeout_s,
    )
    expected = {
        (number, line.rpartition("# error: ")[2])
        for number, line in enumerate(typed_use.splitlines(), start=1)
        if "# error: " in line
    }
    found = {
        (int(match.group(1)), match.group(2))
        for match in re.finditer(r"use\.py:(\d+): error: .*\[([a-z-]+)\]$", result.stdout, re.M)
    }
    assert found == expected, result.stdout + result.stderr


# The CLI, where only the scripted server can show it (the rest is in test_cli.py, against the
# real server).


async def test_cli_json_is_the_response_as_it_came(
    server: Server, script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--target", server.target, "credit", "7", "1500", "--json"]
    assert await asyncio.to_thread(main, argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["transfer"]["amount"] == "1500"
    assert printed["transfer"]["kind"] == "TRANSFER_KIND_CREDIT"
    # No balance is asked for, as the line printed without --json would.
    assert [call.method for call in script.calls] == ["Credit"]


async def test_cli_prints_a_time_not_given_as_a_dash(
    server: Server, script: Script, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real server dates every transfer; a reply without a time still prints."""
    argv = ["--target", server.target, "history", "7", "--limit", "1"]
    assert await asyncio.to_thread(main, argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split()[:5] == ["5", "-", "credit", "+500", "EUR"]


async def test_an_overloaded_retry_waits_for_the_server_hint(
    server: Server, script: Script
) -> None:
    status = status_pb2.Status(
        code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], message="too much is waiting"
    )
    info = error_details_pb2.ErrorInfo(reason="OVERLOADED", domain="coffer.v1")
    info.metadata["retry_after_ms"] = "400"
    status.details.add().Pack(info)
    script.plan(rpc_status.to_status(status))
    async with Client(server.target, retries_max=1) as coffer:
        started = time.monotonic()
        await coffer.credit(wallet_id=7, amount=500)
        waited_s = time.monotonic() - started
    assert len(script.calls) == 2
    assert waited_s >= 0.4  # the client's own backoff would have been 0.05 to 0.1 s
    error = errors.from_rpc_error(
        grpc.aio.AioRpcError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
        )
    )
    assert isinstance(error, errors.Overloaded) and error.retry_after_ms == 400
