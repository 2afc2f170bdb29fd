"""Coffer's Python client: `Client` for asyncio, `SyncClient` for blocking code.

    async with Client("127.0.0.1:50051", caller="shop") as coffer:
        wallet = await coffer.create_wallet(owner_id="c-42", owner_kind="customer", unit="EUR")
        transfer = await coffer.credit(wallet_id=wallet.id, amount=1500, note="welcome bonus")

Every call:
- with `api_key=`, sends it as `authorization: Bearer <key>` metadata: the server
  authenticates the call as the key's principal, to which idempotency keys are scoped (over
  TLS, `tls=`, off the local machine: a key sent in plaintext can be read on the way);
- sends the caller's name in the `coffer-caller` metadata (`caller=`, "default" if not given;
  what a caller may be is `coffer.clients.caller`): a label, which names the principal (and
  scopes idempotency keys) only on a server without credentials on loopback (its open mode);
- has a deadline, `timeout_s` from its start, which covers its retries too;
- retries what is worth retrying (`error.retryable`: UNAVAILABLE, OVERLOADED, and
  DEADLINE_EXCEEDED) up to `retries_max` times with exponential backoff and jitter (waiting
  at least the server's retry-after hint), resending the same request, hence the same
  idempotency key, and never past the deadline: a DEADLINE_EXCEEDED, the client's own or the
  server's (it dropped an operation unapplied when the deadline it was given passed), comes
  when the deadline has passed, so it is raised at once;
- raises the typed errors of `coffer.clients.errors`.

With `connections=N` the client opens N connections (a gRPC channel each). A server of
several processes (`coffer serve --workers`) gives each connection to one of its processes, so
a client that opens one reaches one of them: open one per process at least (two are advised)
to reach them all. The kernel picks a process for each connection by a hash of its addresses,
so the client asks each connection which process it reached (`coffer.clients.workers`) and
opens again those that leave a process unreached: before its first call, within half its
deadline and at most `spread_rounds_max` rounds; then every `spread_recheck_s`; sooner while a
process is left unreached (after `spread_retry_s_min`, doubling up to `spread_retry_s_max`), or
once a call gets gRPC's own UNAVAILABLE (a process gone: not the server's UNAVAILABLE errors).
The call that finds a spread due makes it (within half its deadline); other calls do not wait
for it. Each call goes to the process with the fewest of the client's calls in flight (the
first such in turn), over its connections in turn; event streams count apart, and a spread
never replaces a connection that carries one. Where the processes are not known (a server
that does not say, a check that failed, a proxy in between), each connection counts as a
process of its own.

Mutating calls take an `idempotency_key`; without one they use a fresh uuid4 hex, which still
makes the client's own retries safe. Pass your own (e.g. derived from an order id) to make
retries across processes safe as well.

Amounts are integers in the unit's minor units (cents for EUR).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import random
import re
import threading
import time
import uuid
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, Concatenate, Generic, Literal, ParamSpec, Protocol, Self, TypeVar

import grpc
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2

from coffer.clients.caller import caller_metadata_key, check_caller
from coffer.clients.errors import ResourceExhausted, from_rpc_error
from coffer.clients.tls import Tls
from coffer.clients.workers import Worker, spread, worker_metadata_key
from coffer.v1 import (
    access_pb2,
    access_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    grants_pb2,
    grants_pb2_grpc,
    holds_pb2,
    holds_pb2_grpc,
    reports_pb2,
    reports_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    types_pb2,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)
from coffer.v1.events_pb2 import Event
from coffer.v1.reports_pb2 import GetOutstandingResponse, GetPastBalanceResponse, UsageEntry
from coffer.v1.transfers_pb2 import BatchOutcomes, Operation, OperationResult
from coffer.v1.types_pb2 import Balance, Grant, Hold, Transfer, Unit, Wallet

target_default = "127.0.0.1:50051"
# The caller of a client not told otherwise. (The server has no default: a call that writes
# without a caller is refused.)
caller_default = "default"
health_check_method = "/grpc.health.v1.Health/Check"
authorization_metadata_key = "authorization"
# What an API key may be, to be sent as metadata: visible ASCII, no spaces.
_api_key_pattern = re.compile(r"[!-~]{1,256}")
timeout_s_default = 10.0
# What `outstanding` counts as expiring when not told: what expires within this many days.
expiring_within_days_default = 30
retries_max_default = 3
retries_max_limit = 10
connections_max = 64
# Spreading a client's connections over a server's workers: at most this many rounds of
# asking each connection which worker it reached and opening again those that crowd one,
# each check within spread_check_timeout_s.
spread_rounds_max = 32
spread_check_timeout_s = 2.0
# A spread that left a worker unreached (a worker restarting, say) is tried again after
# spread_retry_s_min, then twice as long each time, up to spread_retry_s_max; one after a
# call found the server unreachable, no sooner than spread_retry_s_min after the last.
spread_retry_s_min = 1.0
spread_retry_s_max = 30.0
# A spread that reached every worker is made again after spread_recheck_s: a worker restarted,
# or a connection that reconnected to another worker on its own, is found then.
spread_recheck_s = 30.0
backoff_s_min = 0.1
backoff_s_max = 2.0
reconnect_backoff_ms_min = 100
reconnect_backoff_ms_max = 2000
# A full batch (8,000 operations, each with metadata) can pass gRPC's default of 4 MiB.
message_bytes_max = 64 * 1024 * 1024

UnitKindName = Literal["currency", "credit"]
RoleName = Literal["admin", "manager", "service", "merchant", "customer"]
OwnerKindName = Literal["customer", "merchant", "system"]
DebitModeName = Literal["all_or_nothing", "up_to"]
TransferKindName = Literal[
    "credit",
    "debit",
    "transfer",
    "deposit",
    "withdrawal",
    "payment",
    "hold",
    "capture",
    "release",
    "hold_expiry",
    "void",
    "expiration",
]

EventTypeName = Literal[
    "transfer",
    "hold_placed",
    "hold_captured",
    "hold_released",
    "hold_expired",
    "wallet_created",
    "wallet_cancelled",
    "wallet_alert_set",
    "unit_created",
    "low_balance",
    "top_up_requested",
    "api_key_created",
    "api_key_revoked",
    "certificate_mapped",
    "certificate_unmapped",
    "grant_created",
    "grant_expiring_soon",
    "grant_expired",
]

ItemT = TypeVar("ItemT")
RequestT = TypeVar("RequestT")
ResponseT = TypeVar("ResponseT")
ResultT = TypeVar("ResultT")
CallableT = TypeVar("CallableT", bound=Callable[..., Any])
ParametersP = ParamSpec("ParametersP")


@dataclass(frozen=True, slots=True)
class Page(Generic[ItemT]):
    items: list[ItemT]
    # Empty on the last page.
    next_page_token: str


@dataclass(frozen=True, slots=True)
class EventPage:
    events: list[Event]
    # Where the next page starts; never empty.
    next_cursor: str
    # The page reached the newest event committed when it was read.
    caught_up: bool


@dataclass(frozen=True, slots=True)
class DebitResult:
    transfer: Transfer
    amount_debited: int
    # Up-to mode: what the wallet could not cover, to be charged otherwise.
    amount_remaining: int


@dataclass(frozen=True, slots=True)
class HoldResult:
    hold: Hold
    # The hold, capture or release transfer the call made.
    transfer: Transfer


@dataclass(frozen=True, slots=True)
class WalletBalance:
    wallet_id: int
    unit: str
    balance: Balance


async def _every(
    list_page: Callable[..., Awaitable[Page[ItemT]]], **filters: Any
) -> AsyncIterator[ItemT]:
    """Every item of a paged list, page after page: `list_page` called with the filters and
    each page's `next_page_token` until there is none."""
    page_token = ""
    while True:
        page = await list_page(page_token=page_token, **filters)
        for item in page.items:
            yield item
        if not page.next_page_token:
            return
        page_token = page.next_page_token


class Operations:
    """The operations that move money, each declared once, here: as the builder of a batch
    operation, for `submit_batch` (use them as `operations.credit(...)`).

    `Client` and `SyncClient` build their methods of the same names from these builders (see
    `_single_call`), so that an argument added here reaches the three at once and a type
    checker sees the same keyword arguments on each. `linked=True` links the operation to the
    next one of its batch, so that the chain succeeds or fails as a whole; a single call has
    no next, so its method has no `linked`. It comes first because a leading argument is the
    one a typed signature can drop (`Concatenate`).

    Each fills a fresh idempotency key unless given one. Times (`valid_from`, `expires_at`)
    must be timezone-aware (`datetime.now(UTC)`), else ValueError.
    """

    @staticmethod
    def credit(
        linked: bool = False,
        *,
        wallet_id: int,
        amount: int,
        note: str = "",
        reference: str = "",
        performed_by: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        valid_from: datetime | None = None,
        expires_at: datetime | None = None,
    ) -> Operation:
        """The operator funds a wallet. `valid_from`: from when the funds can be spent (None:
        now); `expires_at`: when they expire (None: the unit's default validity after the
        start, if it has one, else never)."""
        request = transfers_pb2.CreditRequest(
            idempotency_key=_key(idempotency_key),
            wallet_id=wallet_id,
            amount=amount,
            note=note,
            reference=reference,
            performed_by=performed_by,
            metadata=_metadata(metadata),
            valid_from=_timestamp(valid_from),
            expires_at=_timestamp(expires_at),
        )
        return Operation(credit=request, linked=linked)

    @staticmethod
    def debit(
        linked: bool = False,
        *,
        wallet_id: int,
        amount: int,
        mode: DebitModeName = "all_or_nothing",
        note: str = "",
        reference: str = "",
        performed_by: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Operation:
        """A wallet spends, back to the operator. "up_to" debits what is available down to the
        wallet's minimum and reports the rest as `amount_remaining`."""
        request = transfers_pb2.DebitRequest(
            idempotency_key=_key(idempotency_key),
            wallet_id=wallet_id,
            amount=amount,
            mode=_enum(types_pb2.DebitMode, "DEBIT_MODE_", mode),
            note=note,
            reference=reference,
            performed_by=performed_by,
            metadata=_metadata(metadata),
        )
        return Operation(debit=request, linked=linked)

    @staticmethod
    def transfer(
        linked: bool = False,
        *,
        source_wallet_id: int,
        target_wallet_id: int,
        amount: int,
        note: str = "",
        reference: str = "",
        performed_by: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Operation:
        """Between two wallets of one unit."""
        request = transfers_pb2.TransferRequest(
            idempotency_key=_key(idempotency_key),
            source_wallet_id=source_wallet_id,
            target_wallet_id=target_wallet_id,
            amount=amount,
            note=note,
            reference=reference,
            performed_by=performed_by,
            metadata=_metadata(metadata),
        )
        return Operation(transfer=request, linked=linked)

    @staticmethod
    def deposit(
        linked: bool = False,
        *,
        wallet_id: int,
        amount: int,
        funding_source: str,
        note: str = "",
        performed_by: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        valid_from: datetime | None = None,
        expires_at: datetime | None = None,
    ) -> Operation:
        """From an external funding source (a bank account, a card reference) into a wallet.
        `valid_from` and `expires_at` as for a credit."""
        request = transfers_pb2.DepositRequest(
            idempotency_key=_key(idempotency_key),
            wallet_id=wallet_id,
            amount=amount,
            funding_source=funding_source,
            note=note,
            performed_by=performed_by,
            metadata=_metadata(metadata),
            valid_from=_timestamp(valid_from),
            expires_at=_timestamp(expires_at),
        )
        return Operation(deposit=request, linked=linked)

    @staticmethod
    def withdraw(
        linked: bool = False,
        *,
        wallet_id: int,
        amount: int,
        funding_source: str,
        note: str = "",
        performed_by: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Operation:
        """From a wallet out to an external funding source."""
        request = transfers_pb2.WithdrawRequest(
            idempotency_key=_key(idempotency_key),
            wallet_id=wallet_id,
            amount=amount,
            funding_source=funding_source,
            note=note,
            performed_by=performed_by,
            metadata=_metadata(metadata),
        )
        return Operation(withdraw=request, linked=linked)

    @staticmethod
    def pay(
        linked: bool = False,
        *,
        payer_wallet_id: int,
        payee_wallet_id: int,
        amount: int,
        note: str = "",
        reference: str = "",
        performed_by: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Operation:
        """From a customer's wallet to a merchant's."""
        request = transfers_pb2.PayRequest(
            idempotency_key=_key(idempotency_key),
            payer_wallet_id=payer_wallet_id,
            payee_wallet_id=payee_wallet_id,
            amount=amount,
            note=note,
            reference=reference,
            performed_by=performed_by,
            metadata=_metadata(metadata),
        )
        return Operation(pay=request, linked=linked)

    @staticmethod
    def void(
        linked: bool = False,
        *,
        transfer_id: int,
        note: str = "",
        performed_by: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        expires_at: datetime | None = None,
    ) -> Operation:
        """Reverses a transfer with a new one; the voided transfer stays, marked voided.
        `expires_at`: for the void of an expiration alone, and required there, the new expiry
        of the grant it restores."""
        request = transfers_pb2.VoidRequest(
            idempotency_key=_key(idempotency_key),
            transfer_id=transfer_id,
            note=note,
            performed_by=performed_by,
            metadata=_metadata(metadata),
            expires_at=_timestamp(expires_at),
        )
        return Operation(void=request, linked=linked)

    @staticmethod
    def place_hold(
        linked: bool = False,
        *,
        wallet_id: int,
        amount: int,
        target_wallet_id: int = 0,
        timeout: timedelta | None = None,
        note: str = "",
        reference: str = "",
        performed_by: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Operation:
        """Reserves an amount of the wallet's available balance, for a capture to
        `target_wallet_id` (0: the unit's operator wallet). It expires after `timeout`
        (1 second to 30 days; default 1 hour)."""
        request = holds_pb2.PlaceHoldRequest(
            idempotency_key=_key(idempotency_key),
            wallet_id=wallet_id,
            target_wallet_id=target_wallet_id,
            amount=amount,
            timeout=_duration(timeout),
            note=note,
            reference=reference,
            performed_by=performed_by,
            metadata=_metadata(metadata),
        )
        return Operation(place_hold=request, linked=linked)

    @staticmethod
    def capture_hold(
        linked: bool = False,
        *,
        hold_id: int,
        amount: int | None = None,
        note: str = "",
        reference: str = "",
        performed_by: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Operation:
        """Posts all of the hold (no `amount`), or `amount` of it and releases the rest."""
        request = holds_pb2.CaptureHoldRequest(
            idempotency_key=_key(idempotency_key),
            hold_id=hold_id,
            amount=amount,
            note=note,
            reference=reference,
            performed_by=performed_by,
            metadata=_metadata(metadata),
        )
        return Operation(capture_hold=request, linked=linked)

    @staticmethod
    def release_hold(
        linked: bool = False,
        *,
        hold_id: int,
        note: str = "",
        performed_by: str = "",
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
    ) -> Operation:
        """Gives the hold's amount back to the wallet's available balance."""
        request = holds_pb2.ReleaseHoldRequest(
            idempotency_key=_key(idempotency_key),
            hold_id=hold_id,
            note=note,
            performed_by=performed_by,
            metadata=_metadata(metadata),
        )
        return Operation(release_hold=request, linked=linked)


operations = Operations()


@dataclass(frozen=True, slots=True)
class _Stubs:
    channel: grpc.aio.Channel
    access: access_pb2_grpc.AccessServiceAsyncStub
    units: units_pb2_grpc.UnitServiceAsyncStub
    wallets: wallets_pb2_grpc.WalletServiceAsyncStub
    transfers: transfers_pb2_grpc.TransferServiceAsyncStub
    holds: holds_pb2_grpc.HoldServiceAsyncStub
    events: events_pb2_grpc.EventServiceAsyncStub
    grants: grants_pb2_grpc.GrantServiceAsyncStub
    reports: reports_pb2_grpc.ReportServiceAsyncStub
    health_check: grpc.aio.UnaryUnaryMultiCallable[
        health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
    ]
    # The calls in flight on this connection, and its event streams (one item each, the
    # dataclass being frozen). A spread never replaces a connection that carries a stream.
    calls: list[int] = field(default_factory=lambda: [0])
    streams: list[int] = field(default_factory=lambda: [0])


@dataclass(slots=True)
class _Group:
    """The connections known to reach one server process (each connection a group of its
    own while that is not known), and whose turn it is."""

    connections: list[_Stubs]
    turn: int = 0

    def calls(self) -> int:
        """The calls in flight on the process, over its connections."""
        return sum(stubs.calls[0] for stubs in self.connections)


class _TransferResponse(Protocol):
    @property
    def transfer(self) -> Transfer: ...


class _HoldResponse(Protocol):
    @property
    def hold(self) -> Hold: ...

    @property
    def transfer(self) -> Transfer: ...


def _transfer(response: _TransferResponse) -> Transfer:
    return response.transfer


def _debit_result(response: transfers_pb2.DebitResponse) -> DebitResult:
    return DebitResult(response.transfer, response.amount_debited, response.amount_remaining)


def _hold_result(response: _HoldResponse) -> HoldResult:
    return HoldResult(response.hold, response.transfer)


def _single_call(
    build: Callable[Concatenate[bool, ParametersP], Operation],
    route: Callable[
        [_Stubs, Operation], tuple[grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT], RequestT]
    ],
    result: Callable[[ResponseT], ResultT],
) -> Callable[Concatenate[Client, ParametersP], Coroutine[Any, Any, ResultT]]:
    """The Client method of an operation declared in `Operations`: it takes the builder's
    keyword arguments (its `linked` bound to False), sends the request the builder made to the
    RPC that `route` picks (with the request, typed alike), and returns what `result` makes of
    the response."""

    async def call(
        self: Client, /, *args: ParametersP.args, **kwargs: ParametersP.kwargs
    ) -> ResultT:
        operation = build(False, *args, **kwargs)
        _, request = route(self._stubs(), operation)
        return result(await self._call(lambda stubs: route(stubs, operation)[0], request))

    # What help() and editors show: the builder's name, words and arguments, without `linked`.
    signature = inspect.signature(build)
    call.__name__ = build.__name__
    call.__qualname__ = f"Client.{build.__name__}"
    call.__doc__ = build.__doc__
    call.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[
            inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY),
            *(each for name, each in signature.parameters.items() if name != "linked"),
        ],
        return_annotation=inspect.signature(result).return_annotation,
    )
    return call


class Client:
    """An asyncio client of one Coffer server. Use it as `async with Client(...) as coffer`,
    from one event loop (its channel opens on the loop of the first call); calls may run
    concurrently on it."""

    def __init__(
        self,
        target: str = target_default,
        *,
        caller: str = caller_default,
        api_key: str | None = None,
        timeout_s: float = timeout_s_default,
        retries_max: int = retries_max_default,
        tls: Tls | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        connections: int = 1,
    ) -> None:
        """`api_key` authenticates every call (`authorization: Bearer <key>`); `tls` makes
        the channel use TLS: the authorities to trust, and for mTLS the
        client's certificate and key (`Tls.from_files(ca=…, cert=…, key=…)`); `credentials`
        (e.g. grpc.ssl_channel_credentials()) does too, built by hand, in its place;
        `channel_options` are added to the channel's gRPC arguments (e.g.
        `("grpc.use_local_subchannel_pool", 1)` for a connection of its own); `connections`
        (1 to `connections_max`) channels are opened, each its own connection, and each call
        takes one of the server process with the fewest calls in flight (see the module's
        words)."""
        if not target:
            raise ValueError("target must name a server, e.g. 127.0.0.1:50051")
        try:
            check_caller(caller)
        except ValueError as error:
            raise ValueError(f"caller {error}") from None
        if api_key is not None and not _api_key_pattern.fullmatch(api_key):
            raise ValueError("api_key must be 1 to 256 visible ASCII characters (no spaces)")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if not 0 <= retries_max <= retries_max_limit:
            raise ValueError(f"retries_max must be 0 to {retries_max_limit}")
        if (
            isinstance(connections, bool)
            or not isinstance(connections, int)
            or not 1 <= connections <= connections_max
        ):
            raise ValueError(f"connections must be 1 to {connections_max}, not {connections!r}")
        if tls is not None:
            if credentials is not None:
                raise ValueError("give tls or credentials, not both")
            credentials = tls.credentials()
        self.target = target
        self.caller = caller
        self.timeout_s = timeout_s
        self.retries_max = retries_max
        self.connections = connections
        self._credentials = credentials
        self._channel_options = tuple(channel_options)
        self._call_metadata: tuple[tuple[str, str], ...] = ((caller_metadata_key, caller),)
        if api_key is not None:
            self._call_metadata += ((authorization_metadata_key, f"Bearer {api_key}"),)
        # One a connection, once opened; the same by server process reached; the group whose
        # turn it is.
        self._stubs_open: list[_Stubs] = []
        self._groups: list[_Group] = []
        self._turn = 0
        # When the connections are to be spread over the server's workers, by the first call
        # after it (time.monotonic()): once opened, then spread_recheck_s after each spread,
        # sooner while a worker is unreached or once a call found the server unreachable;
        # None with one connection, or while a spread runs. When the last spread ended.
        self._spread_at: float | None = None
        self._spread_last = 0.0
        self._spread_retry_s = spread_retry_s_min
        self._spreading = asyncio.Lock()
        # The closing of connections a spread replaced, which had calls in flight.
        self._closing: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
        self._stubs()
        return self

    async def __aexit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channels; a later call opens new ones."""
        async with self._spreading:
            opened, self._stubs_open, self._groups = self._stubs_open, [], []
            for stubs in opened:
                await stubs.channel.close()
            # Those a spread replaced, once their calls end.
            await asyncio.gather(*self._closing)

    # Units.

    async def create_unit(
        self,
        *,
        code: str,
        kind: UnitKindName,
        scale: int,
        name: str,
        plural: str = "",
        description: str = "",
        default_validity: str = "",
    ) -> Unit:
        """Idempotent by code: an existing unit with the same fields is returned as it is.
        `default_validity`: how long its credits that name no expiry stay valid, an ISO 8601
        duration such as "P6M" ("" for no expiry)."""
        request = units_pb2.CreateUnitRequest(
            code=code,
            kind=_enum(types_pb2.UnitKind, "UNIT_KIND_", kind),
            name=name,
            plural=plural,
            description=description,
            scale=scale,
            default_validity=default_validity,
        )
        response = await self._call(lambda stubs: stubs.units.CreateUnit, request)
        return response.unit

    async def get_unit(self, *, code: str) -> Unit:
        request = units_pb2.GetUnitRequest(code=code)
        response = await self._call(lambda stubs: stubs.units.GetUnit, request)
        return response.unit

    async def list_units(self) -> list[Unit]:
        response = await self._call(
            lambda stubs: stubs.units.ListUnits, units_pb2.ListUnitsRequest()
        )
        return list(response.units)

    # Wallets.

    async def create_wallet(
        self,
        *,
        owner_id: str,
        owner_kind: Literal["customer", "merchant"],
        unit: str,
        balance_minimum: int | None = None,
        metadata: Mapping[str, str] | None = None,
        idempotency_key: str | None = None,
        low_balance_threshold: int | None = None,
        top_up_to: int | None = None,
    ) -> Wallet:
        """`balance_minimum` is the lowest available balance allowed: 0 by default, negative
        for an overdraft. `low_balance_threshold` and `top_up_to`: a balance alert from the
        start (see `set_balance_alert`)."""
        request = wallets_pb2.CreateWalletRequest(
            idempotency_key=_key(idempotency_key),
            owner_id=owner_id,
            owner_kind=_enum(types_pb2.OwnerKind, "OWNER_KIND_", owner_kind),
            unit=unit,
            balance_minimum=balance_minimum,
            metadata=_metadata(metadata),
            low_balance_threshold=low_balance_threshold,
            top_up_to=top_up_to,
        )
        response = await self._call(lambda stubs: stubs.wallets.CreateWallet, request)
        return response.wallet

    async def get_wallet(self, *, wallet_id: int) -> Wallet:
        request = wallets_pb2.GetWalletRequest(wallet_id=wallet_id)
        response = await self._call(lambda stubs: stubs.wallets.GetWallet, request)
        return response.wallet

    async def get_balance(self, *, wallet_id: int) -> WalletBalance:
        request = wallets_pb2.GetBalanceRequest(wallet_id=wallet_id)
        response = await self._call(lambda stubs: stubs.wallets.GetBalance, request)
        return WalletBalance(response.wallet_id, response.unit, response.balance)

    async def list_wallets(
        self,
        *,
        owner_id: str = "",
        owner_kind: OwnerKindName | None = None,
        unit: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[Wallet]:
        """One page of wallets, oldest first; empty filters match all. Page size 0 means 100."""
        request = wallets_pb2.ListWalletsRequest(
            owner_id=owner_id,
            owner_kind=_enum(types_pb2.OwnerKind, "OWNER_KIND_", owner_kind),
            unit=unit,
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._call(lambda stubs: stubs.wallets.ListWallets, request)
        return Page(list(response.wallets), response.next_page_token)

    async def iter_wallets(
        self,
        *,
        owner_id: str = "",
        owner_kind: OwnerKindName | None = None,
        unit: str = "",
        page_size: int = 0,
    ) -> AsyncIterator[Wallet]:
        """Every wallet that matches, page after page."""
        async for item in _every(
            self.list_wallets,
            owner_id=owner_id,
            owner_kind=owner_kind,
            unit=unit,
            page_size=page_size,
        ):
            yield item

    async def cancel_wallet(self, *, wallet_id: int) -> Wallet:
        """Only an empty wallet can be cancelled; cancelling it again returns it unchanged."""
        request = wallets_pb2.CancelWalletRequest(wallet_id=wallet_id)
        response = await self._call(lambda stubs: stubs.wallets.CancelWallet, request)
        return response.wallet

    async def set_balance_alert(
        self,
        *,
        wallet_id: int,
        low_balance_threshold: int | None,
        top_up_to: int | None = None,
    ) -> Wallet:
        """Below `low_balance_threshold` (available, in minor units; None: no alert) the event
        stream says LOW_BALANCE, once per crossing; with `top_up_to`, it also asks for a top-up
        to that balance (TOP_UP_REQUESTED). Setting what is set changes nothing."""
        request = wallets_pb2.SetBalanceAlertRequest(
            wallet_id=wallet_id,
            low_balance_threshold=low_balance_threshold,
            top_up_to=top_up_to,
        )
        response = await self._call(lambda stubs: stubs.wallets.SetBalanceAlert, request)
        return response.wallet

    # Transfers. The operations that move money are declared once, in `Operations`: each
    # method takes the keyword arguments of its builder there, but `linked`, and returns what
    # its response carries.

    credit = _single_call(
        Operations.credit,
        lambda stubs, operation: (stubs.transfers.Credit, operation.credit),
        _transfer,
    )
    debit = _single_call(
        Operations.debit,
        lambda stubs, operation: (stubs.transfers.Debit, operation.debit),
        _debit_result,
    )
    transfer = _single_call(
        Operations.transfer,
        lambda stubs, operation: (stubs.transfers.Transfer, operation.transfer),
        _transfer,
    )
    deposit = _single_call(
        Operations.deposit,
        lambda stubs, operation: (stubs.transfers.Deposit, operation.deposit),
        _transfer,
    )
    withdraw = _single_call(
        Operations.withdraw,
        lambda stubs, operation: (stubs.transfers.Withdraw, operation.withdraw),
        _transfer,
    )
    pay = _single_call(
        Operations.pay,
        lambda stubs, operation: (stubs.transfers.Pay, operation.pay),
        _transfer,
    )
    void = _single_call(
        Operations.void,
        lambda stubs, operation: (stubs.transfers.Void, operation.void),
        _transfer,
    )

    async def submit_batch(self, operations: Sequence[Operation]) -> list[OperationResult]:
        """Applies the operations in order in one database transaction; one result each, in
        order. A failed operation has `result.error` set (see errors.from_operation_error) and
        fails only itself, or its linked chain. Operations without an idempotency key get one.
        """
        request = _batch_request(operations, compact=False)
        response = await self._call(lambda stubs: stubs.transfers.SubmitBatch, request)
        return list(response.results)

    async def submit_batch_compact(self, operations: Sequence[Operation]) -> BatchOutcomes:
        """As `submit_batch`, answered in columns: `outcomes.transfer_ids[i]` is the transfer
        operation i made (0 when it failed), `outcomes.failed` the errors of those that failed
        with their index; `amounts_remaining` and `replayed` are empty unless some operation
        left something to cover or was replayed. For callers that keep what they sent: the
        server does less for each operation, and the answer is a few bytes each."""
        request = _batch_request(operations, compact=True)
        response = await self._call(lambda stubs: stubs.transfers.SubmitBatch, request)
        return response.outcomes

    async def get_transfer(self, *, transfer_id: int) -> Transfer:
        request = transfers_pb2.GetTransferRequest(transfer_id=transfer_id)
        response = await self._call(lambda stubs: stubs.transfers.GetTransfer, request)
        return response.transfer

    async def list_transfers(
        self,
        *,
        wallet_id: int = 0,
        kinds: Sequence[TransferKindName] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        reference: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[Transfer]:
        """One page of history, newest first: transfers into or out of `wallet_id` (0 for all),
        of `kinds` (empty for all), from `start_time` (inclusive) to `end_time` (exclusive)."""
        request = transfers_pb2.ListTransfersRequest(
            wallet_id=wallet_id,
            kinds=[_enum(types_pb2.TransferKind, "TRANSFER_KIND_", kind) for kind in kinds],
            start_time=_timestamp(start_time),
            end_time=_timestamp(end_time),
            reference=reference,
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._call(lambda stubs: stubs.transfers.ListTransfers, request)
        return Page(list(response.transfers), response.next_page_token)

    async def iter_transfers(
        self,
        *,
        wallet_id: int = 0,
        kinds: Sequence[TransferKindName] = (),
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        reference: str = "",
        page_size: int = 0,
    ) -> AsyncIterator[Transfer]:
        """Every transfer that matches, newest first, page after page."""
        async for item in _every(
            self.list_transfers,
            wallet_id=wallet_id,
            kinds=kinds,
            start_time=start_time,
            end_time=end_time,
            reference=reference,
            page_size=page_size,
        ):
            yield item

    # Holds; placing, capturing and releasing are declared in `Operations` too.

    place_hold = _single_call(
        Operations.place_hold,
        lambda stubs, operation: (stubs.holds.PlaceHold, operation.place_hold),
        _hold_result,
    )
    capture_hold = _single_call(
        Operations.capture_hold,
        lambda stubs, operation: (stubs.holds.CaptureHold, operation.capture_hold),
        _hold_result,
    )
    release_hold = _single_call(
        Operations.release_hold,
        lambda stubs, operation: (stubs.holds.ReleaseHold, operation.release_hold),
        _hold_result,
    )

    async def get_hold(self, *, hold_id: int) -> Hold:
        request = holds_pb2.GetHoldRequest(hold_id=hold_id)
        response = await self._call(lambda stubs: stubs.holds.GetHold, request)
        return response.hold

    # Events.

    async def list_events(
        self,
        *,
        after_cursor: str = "",
        page_size: int = 0,
        wallet_ids: Sequence[int] = (),
        owner_id: str = "",
        types: Sequence[EventTypeName] = (),
    ) -> EventPage:
        """One page of events after `after_cursor` ("" from the oldest kept), in commit order,
        of `wallet_ids`, of `owner_id`'s wallets, of `types` (empty: all). With a filter a page
        may hold few events, or none, while more follow: go on from `next_cursor` until
        `caught_up`."""
        request = events_pb2.ListEventsRequest(
            after_cursor=after_cursor,
            page_size=page_size,
            filter=_event_filter(wallet_ids, owner_id, types),
        )
        response = await self._call(lambda stubs: stubs.events.ListEvents, request)
        return EventPage(list(response.events), response.next_cursor, response.caught_up)

    async def watch_events(
        self,
        *,
        after_cursor: str = "",
        wallet_ids: Sequence[int] = (),
        owner_id: str = "",
        types: Sequence[EventTypeName] = (),
    ) -> AsyncIterator[Event]:
        """The events after `after_cursor`, then each as it commits, without end (close the
        iterator to stop). When the stream breaks for a reason worth retrying (the server
        stopping or restarting, OVERLOADED), it opens again after the last event given, up to
        `retries_max` times in a row, so that no event is missed or given twice."""
        cursor = after_cursor
        attempt = 0
        while True:
            request = events_pb2.WatchEventsRequest(
                after_cursor=cursor, filter=_event_filter(wallet_ids, owner_id, types)
            )
            if self._spread_due():
                await self._connect(time.monotonic() + self.timeout_s)
            _, stubs = self._take()
            stream = stubs.events.WatchEvents(request, metadata=self._call_metadata)
            stubs.streams[0] += 1
            try:
                async for response in stream:
                    attempt = 0
                    cursor = response.event.cursor
                    yield response.event
            except grpc.RpcError as cause:
                error = from_rpc_error(cause)
                if error.code == grpc.StatusCode.UNAVAILABLE and not error.from_server:
                    self._spread_soon()
                if not error.retryable or attempt >= self.retries_max:
                    raise error from cause
                backoff_s = _backoff_s(attempt)
                if isinstance(error, ResourceExhausted) and error.retry_after_ms:
                    backoff_s = max(backoff_s, error.retry_after_ms / 1000)
                await asyncio.sleep(backoff_s)
                attempt += 1
            finally:
                stubs.streams[0] -= 1
                stream.cancel()

    # Grants: credits that expire.

    async def list_grants(
        self,
        *,
        wallet_id: int,
        include_spent: bool = False,
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[Grant]:
        """One page of a wallet's grants, oldest first: those with something left, or with
        `include_spent` all. Page size 0 means 100."""
        request = grants_pb2.ListGrantsRequest(
            wallet_id=wallet_id,
            include_spent=include_spent,
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._call(lambda stubs: stubs.grants.ListGrants, request)
        return Page(list(response.grants), response.next_page_token)

    async def iter_grants(
        self, *, wallet_id: int, include_spent: bool = False, page_size: int = 0
    ) -> AsyncIterator[Grant]:
        """Every grant `list_grants` lists, page after page."""
        async for item in _every(
            self.list_grants,
            wallet_id=wallet_id,
            include_spent=include_spent,
            page_size=page_size,
        ):
            yield item

    # Reports.

    async def list_usage(
        self,
        *,
        wallet_id: int = 0,
        owner_id: str = "",
        unit: str = "",
        performed_by: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        reference: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> Page[UsageEntry]:
        """One page of the usage register, newest first: debits, payments and captures, each
        with the grants it drew from (`entry.drawn`) and what it took from untracked funds
        (`entry.untracked`). Of the wallet `wallet_id` (the one that spent; 0 for any), of
        `owner_id`'s wallets, in `unit`, by `performed_by`, from `start_time` (inclusive) to
        `end_time` (exclusive), with `reference`; empty filters match all. A page looks at a
        bounded number of transfers: it may be short, even empty, while more follow (go on
        until `next_page_token` is empty; `iter_usage` does)."""
        request = reports_pb2.ListUsageRequest(
            filter=reports_pb2.UsageFilter(
                wallet_id=wallet_id,
                owner_id=owner_id,
                unit=unit,
                performed_by=performed_by,
                start_time=_timestamp(start_time),
                end_time=_timestamp(end_time),
                reference=reference,
            ),
            page_size=page_size,
            page_token=page_token,
        )
        response = await self._call(lambda stubs: stubs.reports.ListUsage, request)
        return Page(list(response.entries), response.next_page_token)

    async def iter_usage(
        self,
        *,
        wallet_id: int = 0,
        owner_id: str = "",
        unit: str = "",
        performed_by: str = "",
        start_time: datetime | None = None,
        end_time: datetime | None = None,
        reference: str = "",
        page_size: int = 0,
    ) -> AsyncIterator[UsageEntry]:
        """Every consumption that matches, newest first, page after page."""
        async for item in _every(
            self.list_usage,
            wallet_id=wallet_id,
            owner_id=owner_id,
            unit=unit,
            performed_by=performed_by,
            start_time=start_time,
            end_time=end_time,
            reference=reference,
            page_size=page_size,
        ):
            yield item

    async def future_balance(self, *, wallet_id: int, at: datetime) -> WalletBalance:
        """The wallet's balance at `at`, a time to come (timezone-aware), if nothing more
        moves: what expires by then is gone, what becomes valid by then is spendable."""
        timestamp = _timestamp(at)
        request = grants_pb2.GetFutureBalanceRequest(wallet_id=wallet_id, time=timestamp)
        response = await self._call(lambda stubs: stubs.grants.GetFutureBalance, request)
        return WalletBalance(response.wallet_id, response.unit, response.balance)

    async def run_expiration(self) -> int:
        """Runs an expiration now (staff only): what is left of every grant past its expiry
        moves to its unit's expired-credits wallet. Returns how many grants it expired."""
        request = grants_pb2.RunExpirationRequest()
        response = await self._call(lambda stubs: stubs.grants.RunExpiration, request)
        return response.expired_count

    async def outstanding(
        self,
        unit: str,
        *,
        expiring_within_days: int = expiring_within_days_default,
        page_size: int = 0,
        page_token: str = "",
    ) -> GetOutstandingResponse:
        """One page of the unit's outstanding overview: its customers' and merchants' wallets
        with something posted, by id, each with what of it expires within
        `expiring_within_days` (default 30; 0: what is past its expiry and not yet expired);
        the first page (no `page_token`) also has the `totals`."""
        request = reports_pb2.GetOutstandingRequest(
            unit=unit,
            expiring_within_days=expiring_within_days,
            page_size=page_size,
            page_token=page_token,
        )
        return await self._call(lambda stubs: stubs.reports.GetOutstanding, request)

    async def past_balance(self, wallet_id: int, at: datetime) -> GetPastBalanceResponse:
        """The wallet's posted and pending balances at `at`, a past instant (timezone-aware);
        the cost grows with the wallet's transfers since then."""
        request = reports_pb2.GetPastBalanceRequest(wallet_id=wallet_id, time=_timestamp(at))
        return await self._call(lambda stubs: stubs.reports.GetPastBalance, request)

    # Health.

    # Access (administrators only).

    async def create_api_key(
        self,
        *,
        name: str,
        role: RoleName,
        owner_id: str = "",
        expires_at: datetime | None = None,
    ) -> access_pb2.CreateApiKeyResponse:
        """Makes an API key: `.api_key` is the key, shown this once; `.key` its record.
        `owner_id` is for merchants and customers: the owner whose wallets it may touch. Not
        idempotent: a retry after a lost answer may make a second key (revoke the one not
        used)."""
        request = access_pb2.CreateApiKeyRequest(
            name=name,
            role=_enum(access_pb2.Role, "ROLE_", role),
            owner_id=owner_id,
            expires_at=_timestamp(expires_at),
        )
        return await self._call(lambda stubs: stubs.access.CreateApiKey, request)

    async def list_api_keys(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> Page[access_pb2.ApiKey]:
        """One page of keys (never their secrets), oldest first."""
        request = access_pb2.ListApiKeysRequest(page_size=page_size, page_token=page_token)
        response = await self._call(lambda stubs: stubs.access.ListApiKeys, request)
        return Page(list(response.keys), response.next_page_token)

    async def revoke_api_key(self, *, key_id: int) -> access_pb2.ApiKey:
        request = access_pb2.RevokeApiKeyRequest(key_id=key_id)
        return (await self._call(lambda stubs: stubs.access.RevokeApiKey, request)).key

    async def map_certificate(
        self, *, subject: str, name: str, role: RoleName, owner_id: str = ""
    ) -> access_pb2.CertificateMapping:
        """Maps a client certificate's subject common name to a principal (mTLS)."""
        request = access_pb2.MapCertificateRequest(
            subject=subject,
            name=name,
            role=_enum(access_pb2.Role, "ROLE_", role),
            owner_id=owner_id,
        )
        return (await self._call(lambda stubs: stubs.access.MapCertificate, request)).mapping

    async def unmap_certificate(self, *, subject: str) -> access_pb2.CertificateMapping:
        request = access_pb2.UnmapCertificateRequest(subject=subject)
        return (await self._call(lambda stubs: stubs.access.UnmapCertificate, request)).mapping

    async def list_certificate_mappings(
        self, *, page_size: int = 0, page_token: str = ""
    ) -> Page[access_pb2.CertificateMapping]:
        request = access_pb2.ListCertificateMappingsRequest(
            page_size=page_size, page_token=page_token
        )
        response = await self._call(lambda stubs: stubs.access.ListCertificateMappings, request)
        return Page(list(response.mappings), response.next_page_token)

    async def health(self, *, service: str = "") -> str:
        """The standard gRPC health check: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN"…"""
        request = health_pb2.HealthCheckRequest(service=service)
        response = await self._call(lambda stubs: stubs.health_check, request)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _spread_due(self) -> bool:
        """Whether a call is to spread the connections first: none is open yet, or it is time
        to and no spread runs (calls do not wait for one that does: they take the
        connections as they are)."""
        return not self._stubs_open or (
            self._spread_at is not None
            and time.monotonic() >= self._spread_at
            and not self._spreading.locked()
        )

    async def _connect(self, deadline: float) -> None:
        """Opens the connections, if they are not, and spreads them over the server's workers
        if it is time to (`workers.spread`): asks each which worker it reached and opens again
        those that leave a worker unreached, at most `spread_rounds_max` rounds, within half
        the time to `deadline` (a call's). A replaced connection closes once its calls end
        (within the client's timeout); one that carries an event stream is not replaced. What
        it leaves, it checks last, and the calls then go worker by worker. It spreads them
        again `spread_retry_s_min` after it ends while a worker is unreached (then twice as
        long each time, up to `spread_retry_s_max`), else `spread_recheck_s` after. If it is
        cancelled, the next call spreads them again."""
        async with self._spreading:
            if not self._stubs_open:
                self._open_all()
            now = time.monotonic()
            if self._spread_at is None or now < self._spread_at:
                return
            self._spread_at = None
            try:
                unreached = await self._spread(now + (deadline - now) / 2)
            except BaseException:
                self._spread_by(now)
                raise
            finally:
                self._spread_last = time.monotonic()
            # One asked meanwhile (a call found the server unreachable): no sooner than
            # spread_retry_s_min after this one.
            self._spread_not_before(self._spread_last + spread_retry_s_min)
            if unreached:
                self._spread_by(self._spread_last + self._spread_retry_s)
                self._spread_retry_s = min(2 * self._spread_retry_s, spread_retry_s_max)
            else:
                self._spread_by(self._spread_last + spread_recheck_s)
                self._spread_retry_s = spread_retry_s_min

    async def _spread(self, deadline: float) -> bool:
        """The rounds of a spread (`_connect`); whether to spread again later: it left a
        worker unreached, or a check failed or did not end in time. (Not when the server
        does not say which worker answered, or the answers look like a proxy's.)"""
        # What the connections kept from the round before had reached, by position.
        kept: dict[int, Worker | None] = {}
        # As known before, until a connection is replaced.
        groups = self._groups
        unreached = True
        for spread_round in range(spread_rounds_max):
            opened = self._stubs_open
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                break
            check_s = min(remaining_s, spread_check_timeout_s)
            checks = await asyncio.gather(*(self._worker_of(each, check_s) for each in opened))
            if not all(answered for _, answered in checks):
                break
            reached = [worker for worker, _ in checks]
            # A connection that changed worker between checks goes through a proxy.
            if any(reached[position] != worker for position, worker in kept.items()):
                unreached = False
                break
            found = spread(
                reached, [position for position, each in enumerate(opened) if each.streams[0]]
            )
            if found is None:
                unreached = False
                break
            groups = [_Group([opened[position] for position in group]) for group in found.groups]
            unreached, again = found.unreached, found.again
            if not again or spread_round == spread_rounds_max - 1:
                break
            groups = []
            kept = dict(enumerate(reached))
            replaced = list(opened)
            for position in again:
                del kept[position]
                replaced[position] = self._open()
            self._stubs_open = replaced
            self._groups = [_Group([stubs]) for stubs in replaced]
            for position in again:
                self._close_later(opened[position])
        self._groups = groups or [_Group([stubs]) for stubs in self._stubs_open]
        return unreached

    def _close_later(self, stubs: _Stubs) -> None:
        """Closes a connection a spread replaced: at once if no call is in flight on it, else
        once they end, within the client's timeout."""
        task = asyncio.ensure_future(
            stubs.channel.close(grace=self.timeout_s if stubs.calls[0] else None)
        )
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _spread_soon(self) -> None:
        """After a call found the server unreachable (a worker stopped, its connections
        gone to others): spread the connections again before the next call, though no sooner
        than `spread_retry_s_min` after the last spread."""
        if self.connections > 1:
            self._spread_by(self._spread_last + spread_retry_s_min)

    def _spread_not_before(self, at: float) -> None:
        """A spread asked for, if any, comes no sooner than `at`."""
        if self._spread_at is not None:
            self._spread_at = max(self._spread_at, at)

    def _spread_by(self, at: float) -> None:
        """Spread the connections again at `at` (time.monotonic()), or sooner if asked."""
        if self._spread_at is None or at < self._spread_at:
            self._spread_at = at

    def _open_all(self) -> None:
        """Opens the connections, each a group of its own until their workers are known."""
        self._stubs_open = [self._open() for _ in range(self.connections)]
        self._groups = [_Group([stubs]) for stubs in self._stubs_open]
        self._turn = 0
        self._spread_at = 0.0 if self.connections > 1 else None
        self._spread_retry_s = spread_retry_s_min

    async def _worker_of(self, stubs: _Stubs, timeout_s: float) -> tuple[Worker | None, bool]:
        """The worker a connection reached, as its health check says (None if it does not
        say: a server of another kind), and whether the check was answered."""
        call = stubs.health_check(
            health_pb2.HealthCheckRequest(), timeout=timeout_s, metadata=self._call_metadata
        )
        try:
            await call
            trailing = await call.trailing_metadata()
        except grpc.RpcError as error:
            # A server without the health service answers, and says no worker.
            answered = error.code() in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.NOT_FOUND)
            return None, answered
        for key, value in trailing or ():
            if key == worker_metadata_key and isinstance(value, str):
                return Worker.parse(value), True
        return None, True

    # The boundary: every call goes through here.

    def _stubs(self) -> _Stubs:
        """The stubs of the connection the next call would take (opening them first)."""
        if not self._stubs_open:
            self._open_all()
        group = self._groups[self._turn % len(self._groups)]
        return group.connections[group.turn % len(group.connections)]

    def _take(self) -> tuple[_Group, _Stubs]:
        """The connection a call takes: of the group (the server process) with the fewest
        calls in flight, the first such from the one whose turn it is, the connection whose
        turn it is; the turns pass to the next."""
        if not self._stubs_open:
            self._open_all()
        groups = self._groups
        chosen = self._turn % len(groups)
        group = groups[chosen]
        fewest = group.calls() if len(groups) > 1 else 0
        step = 1
        while fewest and step < len(groups):
            position = (self._turn + step) % len(groups)
            calls = groups[position].calls()
            if calls < fewest:
                chosen, group, fewest = position, groups[position], calls
            step += 1
        self._turn = (chosen + 1) % len(groups)
        stubs = group.connections[group.turn % len(group.connections)]
        group.turn = (group.turn + 1) % len(group.connections)
        return group, stubs

    def _open(self) -> _Stubs:
        options = [
            ("grpc.max_send_message_length", message_bytes_max),
            ("grpc.max_receive_message_length", message_bytes_max),
            # Reconnect about as fast as the retries come, so that a retry after a
            # server restart finds it rather than failing on gRPC's own 1 s backoff.
            ("grpc.initial_reconnect_backoff_ms", reconnect_backoff_ms_min),
            ("grpc.min_reconnect_backoff_ms", reconnect_backoff_ms_min),
            ("grpc.max_reconnect_backoff_ms", reconnect_backoff_ms_max),
            *self._channel_options,
        ]
        if self.connections > 1:
            # gRPC lets channels to one target with the same arguments share a connection;
            # a subchannel pool of its own gives each channel its own.
            options.append(("grpc.use_local_subchannel_pool", 1))
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(self.target, options=options)
        else:
            channel = grpc.aio.secure_channel(self.target, self._credentials, options=options)
        return _Stubs(
            channel=channel,
            access=access_pb2_grpc.AccessServiceStub(channel),
            units=units_pb2_grpc.UnitServiceStub(channel),
            wallets=wallets_pb2_grpc.WalletServiceStub(channel),
            transfers=transfers_pb2_grpc.TransferServiceStub(channel),
            holds=holds_pb2_grpc.HoldServiceStub(channel),
            events=events_pb2_grpc.EventServiceStub(channel),
            grants=grants_pb2_grpc.GrantServiceStub(channel),
            reports=reports_pb2_grpc.ReportServiceStub(channel),
            health_check=channel.unary_unary(
                health_check_method,
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            ),
        )

    async def _call(
        self,
        method: Callable[[_Stubs], grpc.aio.UnaryUnaryMultiCallable[RequestT, ResponseT]],
        request: RequestT,
    ) -> ResponseT:
        """Sends the request to the RPC `method` picks from a connection's stubs, and again
        (the same request, over the connection it takes then) while it fails with an
        error worth retrying (`retryable`), there are retries left and the backoff ends before
        the deadline. The server is given the time left as its deadline, so its
        DEADLINE_EXCEEDED, like gRPC's own, means that none is left: raised at once."""
        deadline = time.monotonic() + self.timeout_s
        attempt = 0
        while True:
            if self._spread_due():
                await self._connect(deadline)
            _, stubs = self._take()
            stubs.calls[0] += 1
            try:
                return await method(stubs)(
                    request,
                    timeout=max(deadline - time.monotonic(), 0.0),
                    metadata=self._call_metadata,
                )
            except grpc.RpcError as cause:
                error = from_rpc_error(cause)
                if error.code == grpc.StatusCode.UNAVAILABLE and not error.from_server:
                    self._spread_soon()
                backoff_s = _backoff_s(attempt)
                if isinstance(error, ResourceExhausted) and error.retry_after_ms:
                    backoff_s = max(backoff_s, error.retry_after_ms / 1000)
                if (
                    not error.retryable
                    or attempt >= self.retries_max
                    or time.monotonic() + backoff_s >= deadline
                ):
                    raise error from cause
            finally:
                stubs.calls[0] -= 1
            await asyncio.sleep(backoff_s)
            attempt += 1


def _blocking(
    method: Callable[Concatenate[Client, ParametersP], Coroutine[Any, Any, ResultT]],
) -> Callable[Concatenate[SyncClient, ParametersP], ResultT]:
    """The Client method, run on the SyncClient's event loop; same arguments, same result."""

    def call(self: SyncClient, /, *args: ParametersP.args, **kwargs: ParametersP.kwargs) -> ResultT:
        return self._run(method(self._client, *args, **kwargs))

    return _as_sync_method(method, call)


def _blocking_iterator(
    method: Callable[Concatenate[Client, ParametersP], AsyncIterator[ItemT]],
) -> Callable[Concatenate[SyncClient, ParametersP], Iterator[ItemT]]:
    """The Client iterator, run on the SyncClient's event loop one item at a time."""

    def call(
        self: SyncClient, /, *args: ParametersP.args, **kwargs: ParametersP.kwargs
    ) -> Iterator[ItemT]:
        iterator = method(self._client, *args, **kwargs)
        while True:
            try:
                item = self._run(_next(iterator))
            except StopAsyncIteration:
                return
            yield item

    return _as_sync_method(method, call)


def _as_sync_method(method: Callable[..., Any], call: CallableT) -> CallableT:
    """`call`, named and documented as the SyncClient's method of `method`'s name."""
    functools.update_wrapper(call, method)
    call.__qualname__ = f"SyncClient.{method.__name__}"
    return call


async def _next(iterator: AsyncIterator[ItemT]) -> ItemT:
    return await anext(iterator)


def _batch_request(
    operations: Sequence[Operation], *, compact: bool
) -> transfers_pb2.SubmitBatchRequest:
    """A SubmitBatch request of copies of the operations, each keyed (a fresh key where it
    has none)."""
    request = transfers_pb2.SubmitBatchRequest(operations=operations, compact=compact)
    for operation in request.operations:
        kind = operation.WhichOneof("operation")
        if kind is not None:
            inner = getattr(operation, kind)
            if not inner.idempotency_key:
                inner.idempotency_key = _key(None)
    return request


class SyncClient:
    """The blocking face of `Client`: the same methods, run on an event loop of its own in a
    background thread. Use it as `with SyncClient(...) as coffer`; it is safe to share between
    threads."""

    def __init__(
        self,
        target: str = target_default,
        *,
        caller: str = caller_default,
        api_key: str | None = None,
        timeout_s: float = timeout_s_default,
        retries_max: int = retries_max_default,
        tls: Tls | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        connections: int = 1,
    ) -> None:
        self._client = Client(
            target,
            caller=caller,
            api_key=api_key,
            timeout_s=timeout_s,
            retries_max=retries_max,
            tls=tls,
            credentials=credentials,
            connections=connections,
        )
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="coffer-client", daemon=True
        )
        self._thread.start()
        self._closed = False

    @property
    def target(self) -> str:
        return self._client.target

    @property
    def caller(self) -> str:
        return self._client.caller

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel and stops the background thread; closing twice does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result()
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def _run(self, coroutine: Coroutine[Any, Any, ResultT]) -> ResultT:
        if self._closed:
            coroutine.close()
            raise RuntimeError("the client is closed")
        future = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        try:
            return future.result()
        except BaseException:
            # E.g. KeyboardInterrupt while waiting: don't leave the call running.
            future.cancel()
            raise

    create_unit = _blocking(Client.create_unit)
    get_unit = _blocking(Client.get_unit)
    list_units = _blocking(Client.list_units)
    create_wallet = _blocking(Client.create_wallet)
    get_wallet = _blocking(Client.get_wallet)
    get_balance = _blocking(Client.get_balance)
    list_wallets = _blocking(Client.list_wallets)
    iter_wallets = _blocking_iterator(Client.iter_wallets)
    cancel_wallet = _blocking(Client.cancel_wallet)
    set_balance_alert = _blocking(Client.set_balance_alert)
    credit = _blocking(Client.credit)
    debit = _blocking(Client.debit)
    transfer = _blocking(Client.transfer)
    deposit = _blocking(Client.deposit)
    withdraw = _blocking(Client.withdraw)
    pay = _blocking(Client.pay)
    void = _blocking(Client.void)
    submit_batch = _blocking(Client.submit_batch)
    submit_batch_compact = _blocking(Client.submit_batch_compact)
    get_transfer = _blocking(Client.get_transfer)
    list_transfers = _blocking(Client.list_transfers)
    iter_transfers = _blocking_iterator(Client.iter_transfers)
    place_hold = _blocking(Client.place_hold)
    capture_hold = _blocking(Client.capture_hold)
    release_hold = _blocking(Client.release_hold)
    get_hold = _blocking(Client.get_hold)
    create_api_key = _blocking(Client.create_api_key)
    list_api_keys = _blocking(Client.list_api_keys)
    revoke_api_key = _blocking(Client.revoke_api_key)
    map_certificate = _blocking(Client.map_certificate)
    unmap_certificate = _blocking(Client.unmap_certificate)
    list_certificate_mappings = _blocking(Client.list_certificate_mappings)
    list_events = _blocking(Client.list_events)
    watch_events = _blocking_iterator(Client.watch_events)
    list_grants = _blocking(Client.list_grants)
    iter_grants = _blocking_iterator(Client.iter_grants)
    future_balance = _blocking(Client.future_balance)
    run_expiration = _blocking(Client.run_expiration)
    list_usage = _blocking(Client.list_usage)
    iter_usage = _blocking_iterator(Client.iter_usage)
    outstanding = _blocking(Client.outstanding)
    past_balance = _blocking(Client.past_balance)
    health = _blocking(Client.health)


def _event_filter(
    wallet_ids: Sequence[int], owner_id: str, types: Sequence[EventTypeName]
) -> events_pb2.EventFilter:
    return events_pb2.EventFilter(
        wallet_ids=wallet_ids,
        owner_id=owner_id,
        types=[_enum(events_pb2.EventType, "EVENT_TYPE_", each) for each in types],
    )


def _key(idempotency_key: str | None) -> str:
    return uuid.uuid4().hex if idempotency_key is None else idempotency_key


def _metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    return dict(metadata or {})


def _enum(enum: Any, prefix: str, name: str | None) -> Any:
    """The value of `prefix + NAME` in a protobuf enum; None is the unspecified value 0."""
    if name is None:
        return 0
    try:
        return enum.Value(prefix + name.upper())
    except ValueError:
        names = [value.name.removeprefix(prefix).lower() for value in enum.DESCRIPTOR.values[1:]]
        raise ValueError(f"{name!r} is none of {', '.join(names)}") from None


def _timestamp(moment: datetime | None) -> Timestamp | None:
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError("times must be timezone-aware, e.g. datetime.now(UTC)")
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp


def _duration(span: timedelta | None) -> Duration | None:
    if span is None:
        return None
    duration = Duration()
    duration.FromTimedelta(span)
    return duration


def _backoff_s(attempt: int) -> float:
    """Exponential, capped, with jitter so that clients retrying together spread out."""
    ceiling_s = min(backoff_s_min * 2**attempt, backoff_s_max)
    return random.uniform(ceiling_s / 2, ceiling_s)


__all__ = [
    "Client",
    "DebitModeName",
    "DebitResult",
    "EventPage",
    "EventTypeName",
    "HoldResult",
    "Operations",
    "OwnerKindName",
    "Page",
    "RoleName",
    "SyncClient",
    "TransferKindName",
    "UnitKindName",
    "WalletBalance",
    "connections_max",
    "expiring_within_days_default",
    "operations",
    "spread_check_timeout_s",
    "spread_recheck_s",
    "spread_retry_s_max",
    "spread_retry_s_min",
    "spread_rounds_max",
    "target_default",
    "timeout_s_default",
]
