"""How the typed client spreads its connections over a server's workers, against a gRPC server
in the test that plays them: its health check names, for each connection (each client
address), the worker the test chooses, and its GetBalance answers as the test plans. (The real
`coffer serve --workers 2` is tests/server/test_workers.py's.)"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
import pytest_asyncio
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from coffer.clients import Client, errors
from coffer.clients import client as client_module
from coffer.clients.workers import Worker, new_instance, worker_metadata_key
from coffer.v1 import types_pb2, wallets_pb2, wallets_pb2_grpc

instance = new_instance()


@dataclass
class Play:
    """What the server says: `worker(peer, checks)` names the worker of a connection at its
    check number `checks` (from 1), None for none; `checks` counts each peer's checks;
    `check_delay_s` holds every check; `answers` are GetBalance's planned statuses; `balances`
    records the peer of each GetBalance answered."""

    worker: Callable[[str, int], Worker | None] = lambda peer, checks: None
    checks: dict[str, int] = field(default_factory=dict)
    check_delay_s: float = 0.0
    answers: deque[grpc.Status] = field(default_factory=deque)
    balances: list[str] = field(default_factory=list)


class Health(health_pb2_grpc.HealthServicer):
    def __init__(self, play: Play) -> None:
        self.play = play

    async def Check(self, request: Any, context: Any) -> health_pb2.HealthCheckResponse:
        peer = context.peer()
        checks = self.play.checks[peer] = self.play.checks.get(peer, 0) + 1
        await asyncio.sleep(self.play.check_delay_s)
        worker = self.play.worker(peer, checks)
        if worker is not None:
            context.set_trailing_metadata(((worker_metadata_key, worker.metadata()),))
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class Wallets(wallets_pb2_grpc.WalletServiceServicer):
    def __init__(self, play: Play) -> None:
        self.play = play

    async def GetBalance(self, request: Any, context: Any) -> wallets_pb2.GetBalanceResponse:
        if self.play.answers:
            await context.abort_with_status(self.play.answers.popleft())
        self.play.balances.append(context.peer())
        return wallets_pb2.GetBalanceResponse(
            balance=types_pb2.Balance(unit="EUR", posted=request.wallet_id)
        )


@dataclass
class Server:
    target: str
    play: Play


@pytest_asyncio.fixture(loop_scope="session")
async def server() -> AsyncIterator[Server]:
    play = Play()
    grpc_server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(Health(play), grpc_server)
    wallets_pb2_grpc.add_WalletServiceServicer_to_server(Wallets(play), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        yield Server(f"127.0.0.1:{port}", play)
    finally:
        await grpc_server.stop(grace=None)


def by_arrival(play: Play, numbers: list[int]) -> Callable[[str, int], Worker | None]:
    """Workers of 2 by the order connections first check: the k-th connection seen reaches
    worker numbers[k] (the last one for those after)."""
    seen: list[str] = []

    def worker(peer: str, checks: int) -> Worker:
        if peer not in seen:
            seen.append(peer)
        return Worker(numbers[min(seen.index(peer), len(numbers) - 1)], 2, instance)

    return worker


def unavailable(*, from_server: bool) -> grpc.Status:
    """UNAVAILABLE as the server says it (with its ErrorInfo), or as gRPC or a proxy does."""
    status = status_pb2.Status(code=grpc.StatusCode.UNAVAILABLE.value[0], message="gone")
    if from_server:
        info = error_details_pb2.ErrorInfo(reason="UNAVAILABLE", domain="coffer.v1")
        status.details.add().Pack(info)
    return rpc_status.to_status(status)


async def test_connections_that_leave_a_worker_unreached_are_opened_again(server: Server) -> None:
    play = server.play
    # The first three connections reach worker 1; the ones opened after them, worker 2.
    play.worker = by_arrival(play, [1, 1, 1, 2])
    async with Client(server.target, connections=3) as client:
        for _ in range(4):
            await client.get_balance(wallet_id=7)
    # Of the three, the two after the first were opened again (5 connections in all; the
    # first checked twice, as the spread checks what it leaves), and the calls went to
    # worker 1, 2, 1, 2.
    assert sorted(play.checks.values()) == [1, 1, 1, 1, 2], play.checks
    reached = [play.worker(peer, 1) for peer in play.balances]
    assert [worker.number for worker in reached if worker] == [1, 2, 1, 2]


async def test_the_answers_of_a_proxy_leave_the_connections_as_they_are(server: Server) -> None:
    play = server.play

    def worker(peer: str, checks: int) -> Worker:
        # Each call to the proxy reaches another worker.
        return Worker(2 - checks % 2, 2, instance)

    play.worker = worker
    async with Client(server.target, connections=2) as client:
        await client.get_balance(wallet_id=7)
    # Both reached worker 1 at first; one was opened again; then the one kept named worker 2:
    # a proxy. Nothing more was opened.
    assert len(play.checks) == 3, play.checks


async def test_only_grpcs_own_unavailable_spreads_them_again(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module, "spread_retry_s_min", 0.0)
    play = server.play
    play.worker = by_arrival(play, [1, 2])
    async with Client(server.target, connections=2, retries_max=1) as client:
        await client.get_balance(wallet_id=7)
        assert sum(play.checks.values()) == 2
        # The server's own UNAVAILABLE (a lock timeout, say), retried: no spread.
        play.answers.append(unavailable(from_server=True))
        await client.get_balance(wallet_id=7)
        assert sum(play.checks.values()) == 2
        # gRPC's (a worker gone): the retry spreads them first.
        play.answers.append(unavailable(from_server=False))
        await client.get_balance(wallet_id=7)
        assert sum(play.checks.values()) == 4
        with pytest.raises(errors.Unavailable) as raised:
            play.answers.extend([unavailable(from_server=False)] * 2)
            await client.get_balance(wallet_id=7)
        assert raised.value.from_server is False


async def test_a_call_does_not_wait_for_a_spread_another_runs(
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every call after a spread finds the next one due.
    monkeypatch.setattr(client_module, "spread_recheck_s", 0.0)
    play = server.play
    play.worker = by_arrival(play, [1, 2])
    async with Client(server.target, connections=2, timeout_s=5.0) as client:
        await client.get_balance(wallet_id=7)
        # The next spread, held by its checks.
        play.check_delay_s = 600.0
        spreading = asyncio.create_task(client.get_balance(wallet_id=7))
        await asyncio.sleep(0.5)
        assert not spreading.done()
        await client.get_balance(wallet_id=7)
        assert not spreading.done()
        await spreading


async def test_a_spread_takes_half_the_first_calls_deadline_at_most(server: Server) -> None:
    play = server.play
    play.worker = by_arrival(play, [1, 2])
    # Checks that never answer (the server's stop ends them).
    play.check_delay_s = 600.0
    async with Client(server.target, connections=2, timeout_s=5.0) as client:
        # The checks were given half the call's 5 s, at most spread_check_timeout_s (2 s)
        # each round, and the call went on without them.
        started = time.monotonic()
        await client.get_balance(wallet_id=7)
        assert 1.9 < time.monotonic() - started < 4.0
        assert sum(play.checks.values()) == 2
        # Until the next spread is due (spread_retry_s_min after), no call spreads them.
        await client.get_balance(wallet_id=7)
        assert sum(play.checks.values()) == 2
