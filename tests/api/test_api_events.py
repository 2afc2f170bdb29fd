"""The event stream through the real server: exactly once, in commit order, under concurrent
writers and consumers that drop and resume; across a server restart; the stream's errors.

16 writers send random operations of every kind (single calls and SubmitBatch, holds that
lapse, voids, refusals) while 4 consumers follow WatchEvents, each dropping its stream at
random and resuming from the last cursor it handled. Afterwards each consumer holds every
event exactly once, in the order ListEvents gives them; the transfers they name are the
journal's, each once; and per wallet, each balance after follows from the one before by the
transfer's effect, ending at the wallet's balance.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable

import asyncpg
import grpc
import pytest

from coffer.server.app import Server, Settings
from coffer.v1 import (
    events_pb2,
    events_pb2_grpc,
    holds_pb2,
    transfers_pb2,
    types_pb2,
    wallets_pb2,
)

from support.api import Api, error_info, key
from support.replay import rpc_of
from support.workload import Wallets, random_operation

writers = 16
operations_per_writer = 200
consumers = 4
customers_count = 12
merchants_count = 3
Code = grpc.StatusCode


def watch(
    channel: grpc.aio.Channel, cursor: str, **filters: object
) -> grpc.aio.UnaryStreamCall[events_pb2.WatchEventsRequest, events_pb2.WatchEventsResponse]:
    return events_pb2_grpc.EventServiceStub(channel).WatchEvents(
        events_pb2.WatchEventsRequest(after_cursor=cursor, filter=events_pb2.EventFilter(**filters))
    )


async def every_event(channel: grpc.aio.Channel, cursor: str = "") -> list[events_pb2.Event]:
    stub = events_pb2_grpc.EventServiceStub(channel)
    found: list[events_pb2.Event] = []
    while True:
        page = await stub.ListEvents(
            events_pb2.ListEventsRequest(after_cursor=cursor, page_size=1000)
        )
        found.extend(page.events)
        cursor = page.next_cursor
        if page.caught_up:
            return found


async def writer(
    number: int, api: Api, wallets: Wallets, outcomes: Counter[str], done: list[int]
) -> None:
    pick = random.Random(number)
    transfers: list[int] = []
    holds: list[int] = []
    sent = 0
    while sent < operations_per_writer:
        if pick.random() < 0.5:
            kind, request = random_operation(
                pick,
                key(),
                wallets,
                transfers=transfers,
                holds=holds,
                amount_max=400,
                short_hold_timeout_s=1,
            )
            service, method = rpc_of(kind)
            stub = {"TransferService": api.transfers, "HoldService": api.holds}[service]
            try:
                response = await getattr(stub, method)(request)
            except grpc.aio.AioRpcError as error:
                outcomes[error_info(error).reason] += 1
            else:
                outcomes["OK"] += 1
                transfers.append(response.transfer.id)
                if kind == "place_hold":
                    holds.append(response.hold.id)
            sent += 1
            continue
        size = pick.randint(2, 20)
        operations = []
        for _ in range(size):
            kind, request = random_operation(
                pick, key(), wallets, transfers=transfers, holds=holds, amount_max=400
            )
            operations.append(transfers_pb2.Operation(**{kind: request}))
        response = await api.transfers.SubmitBatch(
            transfers_pb2.SubmitBatchRequest(operations=operations)
        )
        for operation, result in zip(operations, response.results, strict=True):
            if result.HasField("error"):
                outcomes[result.error.reason] += 1
                continue
            outcomes["OK"] += 1
            transfers.append(result.transfers[0].id)
            if operation.WhichOneof("operation") == "place_hold":
                holds.append(result.hold.id)
        sent += size
    done.append(number)


async def consumer(
    number: int, channel: grpc.aio.Channel, until: asyncio.Future[str], seen: list[str]
) -> list[events_pb2.Event]:
    """Follows the stream, dropping it after a random number of events and resuming from the
    last cursor handled, until it has handled the event whose cursor `until` gives."""
    pick = random.Random(1000 + number)
    handled: list[events_pb2.Event] = []
    cursor = ""
    while not (until.done() and cursor == until.result()):
        stream = watch(channel, cursor)
        take = pick.randint(1, 300)
        try:
            async with asyncio.timeout(2):
                async for response in stream:
                    handled.append(response.event)
                    cursor = response.event.cursor
                    take -= 1
                    if take == 0 or (until.done() and cursor == until.result()):
                        break
        except TimeoutError:
            pass  # caught up, for now
        finally:
            stream.cancel()
        seen[number] = cursor
    return handled


def effects_hold(
    events: list[events_pb2.Event], wallet_balances: dict[int, tuple[int, int]]
) -> None:
    """Per wallet, each balance after is the one before plus the transfer's effect; the last
    is the wallet's stored balance."""
    balances: dict[int, tuple[int, int]] = {}
    held: dict[int, int] = {}
    for event in events:
        if (
            event.WhichOneof("body") == "wallet"
            and event.type == events_pb2.EVENT_TYPE_WALLET_CREATED
        ):
            balances[event.wallet.id] = (0, 0)
            continue
        if event.WhichOneof("body") != "transfer":
            continue
        transfer = event.transfer.transfer
        source = balances.get(transfer.source_wallet_id, (0, 0))
        target = balances.get(transfer.target_wallet_id, (0, 0))
        amount = transfer.amount
        kind = transfer.kind
        if kind == types_pb2.TRANSFER_KIND_HOLD:
            held[transfer.id] = amount
            source = (source[0], source[1] + amount)
        elif kind == types_pb2.TRANSFER_KIND_CAPTURE:
            source = (source[0] - amount, source[1] - held[transfer.hold_id])
            target = (target[0] + amount, target[1])
        elif kind in (types_pb2.TRANSFER_KIND_RELEASE, types_pb2.TRANSFER_KIND_HOLD_EXPIRY):
            source = (source[0], source[1] - amount)
        else:
            source = (source[0] - amount, source[1])
            target = (target[0] + amount, target[1])
        after_source = event.transfer.source_balance
        after_target = event.transfer.target_balance
        assert (after_source.posted, after_source.pending) == source, event
        # Unset for a lapsed hold's target, which its release does not change, when the
        # batch that released it had not locked the target.
        if event.transfer.HasField("target_balance"):
            assert (after_target.posted, after_target.pending) == target, event
        assert after_source.available == after_source.posted - after_source.pending
        balances[transfer.source_wallet_id] = source
        balances[transfer.target_wallet_id] = target
    for wallet_id, balance in balances.items():
        assert wallet_balances[wallet_id] == balance, wallet_id


async def test_every_event_exactly_once_in_commit_order_under_concurrent_writers(
    database_url: str, open_channel: Callable[[str], grpc.aio.Channel]
) -> None:
    server = await Server.start(
        Settings(database_url=database_url, listen="127.0.0.1:0", hold_expiry_interval_s=0.2)
    )
    channel = open_channel(f"127.0.0.1:{server.port}")
    try:
        api = Api(channel)
        await api.setup_units()
        customers = [await api.funded(5000) for _ in range(customers_count)]
        merchants = [
            await api.wallet(kind=types_pb2.OWNER_KIND_MERCHANT) for _ in range(merchants_count)
        ]
        for wallet_id in customers[:4]:
            await api.wallets.SetBalanceAlert(
                wallets_pb2.SetBalanceAlertRequest(
                    wallet_id=wallet_id, low_balance_threshold=1000, top_up_to=4000
                )
            )
        wallets = Wallets(customers, merchants)
        outcomes: Counter[str] = Counter()
        done: list[int] = []
        until: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        seen = [""] * consumers
        following = [
            asyncio.create_task(consumer(number, channel, until, seen))
            for number in range(consumers)
        ]
        await asyncio.gather(
            *(writer(number, api, wallets, outcomes, done) for number in range(writers))
        )
        # Holds left to lapse, while the consumers follow: their expiries come in too.
        for _ in range(3):
            wallet_id = await api.funded(10)
            request = holds_pb2.PlaceHoldRequest(
                idempotency_key=key(), wallet_id=wallet_id, amount=1
            )
            request.timeout.seconds = 1
            await api.holds.PlaceHold(request)
        await asyncio.sleep(2.5)
        reference = await every_event(channel)
        until.set_result(reference[-1].cursor)
        async with asyncio.timeout(120):
            handled = await asyncio.gather(*following)
        print(f"\nevents: {len(reference)}, outcomes: {dict(outcomes)}")
        assert sum(outcomes.values()) >= writers * operations_per_writer
        assert outcomes["OK"] > 1000 and outcomes["INSUFFICIENT_FUNDS"] > 0, outcomes
        for events in handled:
            assert [event.cursor for event in events] == [event.cursor for event in reference]
            # The same events, as they were made: what happened since (a void) changes none.
            assert events == reference
        types = Counter(events_pb2.EventType.Name(event.type) for event in reference)
        assert {
            "EVENT_TYPE_TRANSFER",
            "EVENT_TYPE_HOLD_PLACED",
            "EVENT_TYPE_HOLD_CAPTURED",
            "EVENT_TYPE_HOLD_RELEASED",
            "EVENT_TYPE_HOLD_EXPIRED",
            "EVENT_TYPE_LOW_BALANCE",
            "EVENT_TYPE_TOP_UP_REQUESTED",
        } <= types.keys(), types
        connection = await asyncpg.connect(database_url)
        try:
            journal = [row["id"] for row in await connection.fetch("select id from transfers")]
            stored = {
                row["id"]: (row["posted"], row["pending"])
                for row in await connection.fetch("select id, posted, pending from wallets")
            }
        finally:
            await connection.close()
        named = [
            event.transfer.transfer.id
            for event in reference
            if event.WhichOneof("body") == "transfer"
        ]
        assert len(named) == len(set(named)) and set(named) == set(journal)
        effects_hold(reference, stored)
        assert (server.admission.calls, server.admission.bytes) == (0, 0)
        assert server.ledger.watchers == 0
    finally:
        await channel.close()
        await server.stop()


async def test_a_consumer_misses_nothing_across_a_server_restart(
    database_url: str, open_channel: Callable[[str], grpc.aio.Channel]
) -> None:
    settings = Settings(database_url=database_url, listen="127.0.0.1:0")
    first = await Server.start(settings)
    channel = open_channel(f"127.0.0.1:{first.port}")
    api = Api(channel)
    await api.setup_units()
    wallet_id = await api.funded(10)
    handled: list[events_pb2.Event] = []
    stream = watch(channel, "")

    async def follow(stream: object) -> None:
        async for response in stream:  # type: ignore[attr-defined]
            handled.append(response.event)

    following = asyncio.create_task(follow(stream))
    for _ in range(20):
        await api.transfers.Credit(
            transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet_id, amount=1)
        )
    async with asyncio.timeout(10):
        while len(handled) < 24:
            await asyncio.sleep(0.01)
    await first.stop()
    # The stream ends with UNAVAILABLE: resume from the last cursor, on another server.
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        await following
    assert ended.value.code() == Code.UNAVAILABLE
    await channel.close()
    second = await Server.start(settings)
    channel = open_channel(f"127.0.0.1:{second.port}")
    try:
        api = Api(channel)
        for _ in range(20):
            await api.transfers.Credit(
                transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=wallet_id, amount=1)
            )
        reference = await every_event(channel)
        stream = watch(channel, handled[-1].cursor)
        async with asyncio.timeout(10):
            async for response in stream:
                handled.append(response.event)
                if response.event.cursor == reference[-1].cursor:
                    break
        stream.cancel()
        assert handled == reference
        assert len(reference) == 2 + 1 + 41  # units, the wallet, its credits
    finally:
        await channel.close()
        await second.stop()


async def test_stream_errors_are_statuses(server: Server, channel: grpc.aio.Channel) -> None:
    stub = events_pb2_grpc.EventServiceStub(channel)
    for request, field in [
        (events_pb2.WatchEventsRequest(after_cursor="nonsense"), "after_cursor"),
        (
            events_pb2.WatchEventsRequest(filter=events_pb2.EventFilter(types=[99])),
            "filter.types",
        ),
        (
            events_pb2.WatchEventsRequest(filter=events_pb2.EventFilter(wallet_ids=[-1])),
            "filter.wallet_ids",
        ),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stub.WatchEvents(request):
                pass
        assert raised.value.code() == Code.INVALID_ARGUMENT
        assert error_info(raised.value).metadata["field"] == field
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await stub.ListEvents(events_pb2.ListEventsRequest(page_size=1001))
    assert error_info(raised.value).metadata["field"] == "page_size"
    # The bound on watchers: the one past it is OVERLOADED, with a retry hint.
    server.ledger.watchers_max = 1
    first = stub.WatchEvents(events_pb2.WatchEventsRequest())
    await asyncio.sleep(0.3)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async for _ in stub.WatchEvents(events_pb2.WatchEventsRequest()):
            pass
    assert raised.value.code() == Code.RESOURCE_EXHAUSTED
    assert error_info(raised.value).reason == "OVERLOADED"
    first.cancel()
    async with asyncio.timeout(5):
        while server.ledger.watchers or server.admission.calls:
            await asyncio.sleep(0.01)


async def test_a_balance_alert_out_of_its_rules_is_refused_by_field(
    channel: grpc.aio.Channel,
) -> None:
    api = Api(channel)
    await api.setup_units()
    wallet_id = await api.wallet()
    for request, field in [
        (wallets_pb2.SetBalanceAlertRequest(wallet_id=wallet_id, top_up_to=5), "top_up_to"),
        (
            wallets_pb2.SetBalanceAlertRequest(
                wallet_id=wallet_id, low_balance_threshold=10, top_up_to=5
            ),
            "top_up_to",
        ),
        (wallets_pb2.SetBalanceAlertRequest(low_balance_threshold=10), "wallet_id"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await api.wallets.SetBalanceAlert(request)
        assert raised.value.code() == Code.INVALID_ARGUMENT
        assert error_info(raised.value).metadata["field"] == field


async def test_events_off_answers_events_disabled(
    database_url: str, open_channel: Callable[[str], grpc.aio.Channel]
) -> None:
    server = await Server.start(
        Settings(database_url=database_url, listen="127.0.0.1:0", events=False)
    )
    channel = open_channel(f"127.0.0.1:{server.port}")
    try:
        stub = events_pb2_grpc.EventServiceStub(channel)
        for call in (
            stub.ListEvents(events_pb2.ListEventsRequest()),
            stub.WatchEvents(events_pb2.WatchEventsRequest()).read(),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call
            assert raised.value.code() == Code.FAILED_PRECONDITION
            assert error_info(raised.value).reason == "EVENTS_DISABLED"
    finally:
        await channel.close()
        await server.stop()
