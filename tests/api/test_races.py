"""Identical new requests at once: one answer, and the operation stored once.

For every kind of the batch API's `Operation` oneof (enumerated, so a new kind cannot be
missed), `copies` copies of one new request under one key are sent at once, half through each
of two servers on one database (two batchers, two connection pools, as two server processes
would), as single calls and as batches of one operation: for a request that succeeds and for
one that is refused. Every copy gets the same answer, exactly one of them not marked a replay;
the journal holds the operation once (one transfer or one refusal under the key, never both);
the books balance.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message

from coffer.server.app import Server, Settings

from support.books import assert_books_balance
from support.replay import Answer, Code, World, operation_kinds, scenarios

copies = 8
routes = pytest.mark.parametrize("batched", [False, True], ids=["single", "batch"])


@pytest.fixture
async def worlds(
    database_url: str, open_channel: Callable[[str], grpc.aio.Channel]
) -> AsyncIterator[list[World]]:
    """Two servers on one database, a world seen through each (one journal connection)."""
    servers: list[Server] = []
    channels: list[grpc.aio.Channel] = []
    connection = await asyncpg.connect(database_url)
    try:
        for _ in range(2):
            servers.append(
                await Server.start(
                    Settings(database_url=database_url, listen="127.0.0.1:0", pool_size=4)
                )
            )
            channels.append(open_channel(f"127.0.0.1:{servers[-1].port}"))
        for channel in channels:
            await channel.channel_ready()
        worlds = [World(channel, connection) for channel in channels]
        await worlds[0].setup()
        yield worlds
    finally:
        await connection.close()
        for channel in channels:
            await channel.close()
        for server in servers:
            await server.stop()


async def race(worlds: list[World], kind: str, request: Message, batched: bool) -> list[Answer]:
    """The same request, `copies` times at once, half through each server."""
    return list(
        await asyncio.gather(
            *(worlds[number % 2].call(kind, request, batched) for number in range(copies))
        )
    )


def assert_one_answer(answers: list[Answer]) -> Answer:
    """Every copy answered the same, and all but one say they are a replay; the first."""
    first = [answer for answer in answers if not answer.replayed]
    assert len(first) == 1, answers
    assert all(answer.same_as(first[0]) for answer in answers), answers
    return first[0]


@routes
@pytest.mark.parametrize("kind", operation_kinds)
async def test_identical_new_requests_at_once(
    worlds: list[World], database_url: str, kind: str, batched: bool
) -> None:
    world = worlds[0]
    success, refusal = scenarios[kind]

    request = await success(world)
    first = assert_one_answer(await race(worlds, kind, request, batched))
    assert first.code == Code.OK, first
    assert await world.stored(request) == (1, 0)

    request, reason, enable = await refusal(world)
    first = assert_one_answer(await race(worlds, kind, request, batched))
    assert first.reason == reason, first
    assert await world.stored(request) == (0, 1)
    # Kept: now that the request would succeed, its key still answers the refusal.
    await enable()
    again = await world.call(kind, request, batched)
    assert again.replayed and again.same_as(first), (again, first)
    assert await world.stored(request) == (0, 1)

    await assert_books_balance(database_url)
