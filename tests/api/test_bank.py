"""The bank test: random operations of every kind, then every one replayed with its key.

16 clients each send 2,000 random operations — every kind of the batch API's `Operation`
oneof, both debit modes, holds that lapse — over 20 wallets, through the real server, so the
batcher coalesces them into mixed batches. Half the clients send single calls; the other half
send SubmitBatch calls of a few operations, some of them linked into chains. Then every call
is sent again — each single call, and each batch as the same batch request — in random order
and concurrently. Every operation's replay must return its first answer (success or refusal)
marked as a replay, no balance may move, and the books must balance.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from dataclasses import dataclass

import asyncpg
import grpc
from google.protobuf.message import Message

from coffer.server.app import Server
from coffer.v1 import (
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

from support.api import error_info
from support.books import assert_books_balance
from support.normalized import normalized_reply, normalized_result
from support.replay import operation_kinds, rpc_of
from support.workload import Wallets, random_operation

clients = 16
operations_per_client = 2000
customers = 12
merchants = 8
seed = 20261130
# A few holds lapse during the run, so captures and releases meet expired holds too.
short_hold_timeout_s = 1
# Up to the wallets' usual balance, so that some operations are refused.
amount_max = 3000
# The clients that send batches (every other one): operations per batch, and how likely an
# operation (but the last) is linked to the next.
batch_operations_max = 6
linked_share = 0.3


@dataclass(slots=True)
class Sent:
    caller: str
    kind: str
    request: Message
    # The first answer: ("OK", normalized reply) or (code name, reason, message).
    answer: tuple[str, ...] = ()
    # Sent as an operation of a batch (the reply is its OperationResult).
    batched: bool = False


@dataclass(slots=True)
class SentBatch:
    caller: str
    operations: list[Sent]
    request: transfers_pb2.SubmitBatchRequest


class Bank:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.stubs = {
            "TransferService": transfers_pb2_grpc.TransferServiceStub(channel),
            "HoldService": holds_pb2_grpc.HoldServiceStub(channel),
        }
        self.units = units_pb2_grpc.UnitServiceStub(channel)
        self.wallets = wallets_pb2_grpc.WalletServiceStub(channel)
        self.customers: list[int] = []
        self.merchants: list[int] = []

    async def open(self) -> None:
        metadata = (("coffer-caller", "bank"),)
        await self.units.CreateUnit(
            units_pb2.CreateUnitRequest(
                code="EUR", kind=types_pb2.UNIT_KIND_CURRENCY, name="Euro", scale=2
            ),
            metadata=metadata,
        )
        for number in range(customers + merchants):
            kind = types_pb2.OWNER_KIND_CUSTOMER if number < customers else 0
            response = await self.wallets.CreateWallet(
                wallets_pb2.CreateWalletRequest(
                    idempotency_key=f"wallet-{number}",
                    owner_id=f"owner-{number}",
                    owner_kind=kind or types_pb2.OWNER_KIND_MERCHANT,
                    unit="EUR",
                ),
                metadata=metadata,
            )
            (self.customers if number < customers else self.merchants).append(response.wallet.id)

    async def send(self, sent: Sent) -> tuple[tuple[str, ...], bool]:
        """Sends a request; returns its answer, normalized, and whether it was a replay."""
        service, method = rpc_of(sent.kind)
        call = getattr(self.stubs[service], method)(
            sent.request, metadata=(("coffer-caller", sent.caller),), timeout=60
        )
        try:
            reply = await call
        except grpc.aio.AioRpcError as error:
            assert error.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), error
            replayed = _replayed(error.trailing_metadata())
            return (error.code().name, error_info(error).reason, error.details() or ""), replayed
        return ("OK", normalized_reply(reply)), _replayed(await call.trailing_metadata())

    async def send_batch(self, sent: SentBatch) -> list[tuple[tuple[str, ...], bool]]:
        """Sends a batch; returns each operation's answer, normalized, and whether it was a
        replay."""
        response = await self.stubs["TransferService"].SubmitBatch(
            sent.request, metadata=(("coffer-caller", sent.caller),), timeout=60
        )
        assert len(response.results) == len(sent.operations), response
        answers = []
        for each, result in zip(sent.operations, response.results, strict=True):
            replayed = result.replayed
            if result.HasField("error"):
                error = result.error
                assert error.reason not in ("INTERNAL", "INVALID_ARGUMENT"), error
                code = _codes[error.code].name
                answers.append(((code, error.reason, error.message), replayed))
            else:
                answers.append((("OK", normalized_result(each.kind, result)), replayed))
        return answers


def _replayed(trailing: object) -> bool:
    return any(name == "coffer-replayed" for name, _ in trailing or ())  # type: ignore[attr-defined]


_codes = {code.value[0]: code for code in grpc.StatusCode}


class Client:
    """One client's random operations; it remembers its own transfers and holds, to void,
    capture and release them (some more than once). Every other client sends its operations
    in batches."""

    def __init__(self, bank: Bank, number: int) -> None:
        self.bank = bank
        self.caller = f"bank-client-{number}"
        self.random = random.Random(seed + number)
        self.batches = number % 2 == 1
        self.transfers: list[int] = []
        self.holds: list[int] = []
        self.sent: list[Sent] = []
        # What was sent, call by call: a single operation or a batch.
        self.calls: list[Sent | SentBatch] = []

    async def run(self) -> None:
        while len(self.sent) < operations_per_client:
            if self.batches:
                await self.run_batch()
                continue
            sent = Sent(self.caller, *self.operation(f"{self.caller}-{len(self.sent)}"))
            sent.answer, replayed = await self.bank.send(sent)
            assert not replayed, sent
            self.remember(sent)
            self.calls.append(sent)

    async def run_batch(self) -> None:
        pick = self.random
        count = min(pick.randint(1, batch_operations_max), operations_per_client - len(self.sent))
        operations = [
            Sent(self.caller, *self.operation(f"{self.caller}-{len(self.sent) + number}"))
            for number in range(count)
        ]
        request = transfers_pb2.SubmitBatchRequest()
        for number, each in enumerate(operations):
            each.batched = True
            request.operations.add(
                linked=number < count - 1 and pick.random() < linked_share,
                **{each.kind: each.request},
            )
        sent = SentBatch(self.caller, operations, request)
        for each, (answer, replayed) in zip(
            operations, await self.bank.send_batch(sent), strict=True
        ):
            assert not replayed, each
            each.answer = answer
            self.remember(each)
        self.calls.append(sent)

    def remember(self, sent: Sent) -> None:
        self.sent.append(sent)
        if sent.answer[0] != "OK":
            return
        if sent.batched:
            result = transfers_pb2.OperationResult.FromString(bytes.fromhex(sent.answer[1]))
            if sent.kind == "place_hold":
                self.holds.append(result.hold.id)
            else:
                self.transfers.append(result.transfers[0].id)
            return
        reply = type(_reply_types[sent.kind])()
        reply.ParseFromString(bytes.fromhex(sent.answer[1]))
        if sent.kind == "place_hold":
            self.holds.append(reply.hold.id)  # type: ignore[attr-defined]
        else:
            self.transfers.append(reply.transfer.id)  # type: ignore[attr-defined]

    def operation(self, key: str) -> tuple[str, Message]:
        return random_operation(
            self.random,
            key,
            Wallets(self.bank.customers, self.bank.merchants),
            transfers=self.transfers,
            holds=self.holds,
            amount_max=amount_max,
            short_hold_timeout_s=short_hold_timeout_s,
        )


_reply_types: dict[str, Message] = {}
for _kind in operation_kinds:
    _service, _method = rpc_of(_kind)
    _module = transfers_pb2 if _service == "TransferService" else holds_pb2
    _reply_types[_kind] = getattr(_module, f"{_method}Response")()


async def _balances(database_url: str) -> dict[int, tuple[int, int]]:
    connection = await asyncpg.connect(database_url)
    try:
        # Balances as the API shows them: lapsed holds hold nothing.
        rows = await connection.fetch(
            """
            select w.id, w.posted, w.pending - coalesce(
                (select sum(h.amount) from pending_holds h
                 where h.source_wallet_id = w.id and h.expires_at <= now()), 0) as pending
            from wallets w
            """
        )
    finally:
        await connection.close()
    return {row["id"]: (row["posted"], row["pending"]) for row in rows}


async def test_every_operation_replayed_gives_the_first_answer(
    server: Server, channel: grpc.aio.Channel, database_url: str
) -> None:
    bank = Bank(channel)
    await bank.open()
    workers = [Client(bank, number) for number in range(clients)]
    await asyncio.gather(*(worker.run() for worker in workers))
    sent = [each for worker in workers for each in worker.sent]
    calls = [call for worker in workers for call in worker.calls]
    batches = [call for call in calls if isinstance(call, SentBatch)]
    outcomes = Counter(
        each.answer[0] if each.answer[0] == "OK" else each.answer[1] for each in sent
    )
    kinds = Counter(each.kind for each in sent)
    assert len(sent) == clients * operations_per_client
    assert set(kinds) == set(operation_kinds), kinds
    assert set(Counter(each.kind for each in sent if each.batched)) == set(operation_kinds)
    assert outcomes["OK"] > len(sent) // 3, outcomes
    assert outcomes["INSUFFICIENT_FUNDS"] > 0, outcomes
    assert outcomes["LINKED_OPERATION_FAILED"] > 0, outcomes
    # Let the short holds lapse, so that nothing moves by itself from here on.
    await asyncio.sleep(short_hold_timeout_s + 0.5)
    before = await _balances(database_url)

    order = list(calls)
    random.Random(seed).shuffle(order)
    changed: list[tuple[Sent, tuple[str, ...], bool]] = []

    async def replay(share: list[Sent | SentBatch]) -> None:
        for call in share:
            if isinstance(call, SentBatch):
                answers = list(zip(call.operations, await bank.send_batch(call), strict=True))
            else:
                answers = [(call, await bank.send(call))]
            for each, (answer, replayed) in answers:
                if answer != each.answer or not replayed:
                    changed.append((each, answer, replayed))

    await asyncio.gather(*(replay(order[start::clients]) for start in range(clients)))
    print(
        f"\nbank: {len(sent)} operations replayed ({sum(len(b.operations) for b in batches)} "
        f"in {len(batches)} batches), {len(changed)} answers changed; {outcomes}"
    )
    assert changed == [], Counter(
        (each.kind, each.batched, each.answer[:2], answer[:2], replayed)
        for each, answer, replayed in changed
    )
    assert await _balances(database_url) == before
    await assert_books_balance(database_url)
