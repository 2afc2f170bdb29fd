"""The gate every call passes before its handler runs (the guard of `errors.translate_errors`
calls `Gate.admit`): who calls (authentication), whether it calls too fast (rate limits), and
whether its role may make the call (`roles.authorize`).

Who calls, in this order:
- an API key in the `authorization` metadata (`Bearer coffer_…`);
- else, on an mTLS connection, the client certificate's subject common name, mapped to a
  principal (`Access.map_certificate`);
- else, in the open mode, the local administrator, named by the `coffer-caller` label (or
  "local"): the open mode is allowed only to a server listening on a loopback address, and
  lasts while no credential was ever made in its database (checked again every `cache_ttl_s`;
  at once when this server makes one);
- else CREDENTIALS_MISSING.

A constant cost per call: credentials are looked up in the database once per `cache_ttl_s` at
most, then answered from a bounded cache (by a SHA-256 of the key; the keys themselves are not
kept). A revocation (or an unmapped certificate) in this process takes effect at once; one made
by another process within `cache_ttl_s`.

Rates: each principal (by its idempotency scope) has a token bucket of `calls_per_s` with
`calls_burst`; every call takes a token, those refused for their role too. Failed
authentications take a token of their peer host's bucket (`failures_per_s`, much smaller), and
while that is empty the host's calls with credentials never seen are refused unchecked:
guessing keys costs the guesser, not the database, while the keys already in use behind the
same address (a NAT, a TLS proxy) are looked up again as their cache time passes. Both maps of
buckets are bounded (the least recently used bucket goes first). A refusal is
RESOURCE_EXHAUSTED RATE_LIMITED with a `retry_after_ms` hint.

The `coffer-caller` label is checked by its one rule (`coffer.clients.caller`) wherever it is
sent; with credentials it names nothing more.

Nothing here logs a key or an `authorization` value.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import grpc

from coffer.clients.caller import caller_metadata_key, check_caller
from coffer.core import errors
from coffer.core.access import Access, key_scope
from coffer.core.model import Principal, Role, local_principal_name

from . import roles

__all__ = [
    "Gate",
    "RateLimits",
    "TokenBuckets",
    "authorization_metadata_key",
    "bearer_scheme",
    "buckets_max",
    "cache_entries_max",
    "cache_ttl_s_default",
]

authorization_metadata_key = "authorization"
bearer_scheme = "bearer"
# How long a credential looked up (and whether any exists) is taken as it was.
cache_ttl_s_default = 2.0
# Credentials cached at once, and token buckets kept, per process.
cache_entries_max = 10_000
buckets_max = 100_000
# gRPC's peer names the transport first: "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000".
_peer_prefixes = ("ipv4:", "ipv6:")
_common_name_property = "x509_common_name"


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Calls a second and burst per principal; failed authentications a second (and burst,
    twice that) per peer host."""

    calls_per_s: float
    calls_burst: int
    failures_per_s: float


class TokenBuckets:
    """A token bucket per key, at most `entries_max` of them (the least recently used is
    dropped: it comes back full)."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        *,
        entries_max: int = buckets_max,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        assert rate_per_s > 0 and burst >= 1 and entries_max > 0
        self._rate_per_s = rate_per_s
        self._burst = burst
        self._entries_max = entries_max
        self._clock = clock
        # key -> (tokens, when they were counted)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, key: str) -> tuple[float, float]:
        now = self._clock()
        found = self._buckets.get(key)
        if found is None:
            return float(self._burst), now
        tokens, then = found
        return min(float(self._burst), tokens + (now - then) * self._rate_per_s), now

    def empty(self, key: str) -> int | None:
        """None if the bucket has a token; else in how many ms it will."""
        tokens, _ = self._tokens(key)
        if tokens >= 1:
            return None
        return max(1, math.ceil((1 - tokens) / self._rate_per_s * 1000))

    def take(self, key: str) -> int | None:
        """Takes a token: None if there was one; else in how many ms there will be (nothing
        taken)."""
        tokens, now = self._tokens(key)
        if tokens < 1:
            self._buckets[key] = (tokens, now)
            self._buckets.move_to_end(key)
            return max(1, math.ceil((1 - tokens) / self._rate_per_s * 1000))
        self._buckets[key] = (tokens - 1, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._entries_max:
            self._buckets.popitem(last=False)
        return None


@dataclass(frozen=True, slots=True)
class _Cached:
    principal: Principal
    expires_at: datetime | None
    fetched_at: float


class Gate:
    """Authenticates, rate-limits and authorizes every call (`admit`). `open_allowed`: the
    server listens on a loopback address, where the open mode may be."""

    def __init__(
        self,
        access: Access,
        *,
        open_allowed: bool,
        limits: RateLimits,
        cache_ttl_s: float = cache_ttl_s_default,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.access = access
        self.open_allowed = open_allowed
        self._cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._keys: OrderedDict[bytes, _Cached] = OrderedDict()
        self._certificates: OrderedDict[str, _Cached] = OrderedDict()
        self._calls = TokenBuckets(limits.calls_per_s, limits.calls_burst, clock=clock)
        self._failures = TokenBuckets(
            limits.failures_per_s, max(1, math.ceil(2 * limits.failures_per_s)), clock=clock
        )
        # Whether a credential exists, and when that was last asked (None: never).
        self._credentials_exist = False
        self._credentials_checked_at: float | None = None
        self._credentials_check: asyncio.Task[bool] | None = None

    async def admit(
        self, context: grpc.aio.ServicerContext[Any, Any], method: str, request: Any
    ) -> Principal:
        """The principal of the call to `method` (an RPC's full name) with `request`; or
        the error to answer it with."""
        authorization: list[str] = []
        label: str | None = None
        for key, value in context.invocation_metadata() or ():
            if key == authorization_metadata_key:
                authorization.append(value if isinstance(value, str) else "")
            elif key == caller_metadata_key:
                if label is not None:
                    raise errors.InvalidArgument(caller_metadata_key, "must be sent once")
                try:
                    label = check_caller(value)
                except ValueError as error:
                    raise errors.InvalidArgument(caller_metadata_key, str(error)) from None
        if authorization:
            principal = await self._by_key(authorization, context)
        else:
            subject = _common_name(context)
            open_now = await self.open()
            if subject is not None and not open_now:
                principal = await self._by_certificate(subject, context)
            elif open_now:
                name = label or local_principal_name
                principal = Principal(name=name, role=Role.admin, owner_id=None, scope=name)
            else:
                self._failed(context)
                raise errors.CredentialsMissing(
                    "send an API key as `authorization: Bearer <key>` metadata, or connect "
                    "with a client certificate mapped to a principal"
                )
        retry_after_ms = self._calls.take(principal.scope)
        if retry_after_ms is not None:
            raise errors.RateLimited(
                f"{principal.name} calls faster than its rate allows", retry_after_ms=retry_after_ms
            )
        roles.authorize(principal, method, request)
        return principal

    async def open(self) -> bool:
        """Whether calls without credentials are the local administrator's now."""
        if not self.open_allowed or self._credentials_exist:
            return False
        checked_at = self._credentials_checked_at
        if checked_at is not None and self._clock() - checked_at < self._cache_ttl_s:
            return True
        # One check at a time, which the calls arriving meanwhile share.
        if self._credentials_check is None:
            self._credentials_check = asyncio.ensure_future(self.access.credentials_exist())
        check = self._credentials_check
        try:
            exist = await asyncio.shield(check)
        finally:
            if self._credentials_check is check and check.done():
                self._credentials_check = None
        if exist:
            self._credentials_exist = True
        self._credentials_checked_at = self._clock()
        return not exist

    def credentials_made(self) -> None:
        """A credential was made through this server: the open mode ends at once."""
        self._credentials_exist = True

    def forget_key(self, key_id: int) -> None:
        """A key was revoked through this server: it is refused at once."""
        scope = key_scope(key_id)
        for digest in [d for d, cached in self._keys.items() if cached.principal.scope == scope]:
            del self._keys[digest]

    def forget_certificate(self, subject: str) -> None:
        """A certificate was mapped again or unmapped through this server."""
        self._certificates.pop(subject, None)

    async def _by_key(
        self, authorization: list[str], context: grpc.aio.ServicerContext[Any, Any]
    ) -> Principal:
        token = _bearer(authorization)
        digest = hashlib.sha256(token.encode()).digest()
        cached = self._keys.get(digest)
        now = self._clock()
        if cached is not None and now - cached.fetched_at < self._cache_ttl_s:
            self._keys.move_to_end(digest)
            if cached.expires_at is not None and cached.expires_at <= datetime.now(UTC):
                raise errors.CredentialsExpired(
                    f"the API key expired at {cached.expires_at.isoformat()}"
                )
            return cached.principal
        if cached is None:
            # Known keys refresh past the host's failures: a client guessing keys behind the
            # same address (a NAT, a TLS proxy) does not lock out the keys already in use.
            self._check_failures(context)
        try:
            principal, expires_at = await self.access.authenticate(token)
        except errors.Unauthenticated:
            self._keys.pop(digest, None)
            self._failed(context)
            raise
        _remember(self._keys, digest, _Cached(principal, expires_at, now))
        return principal

    async def _by_certificate(
        self, subject: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Principal:
        cached = self._certificates.get(subject)
        now = self._clock()
        if cached is not None and now - cached.fetched_at < self._cache_ttl_s:
            self._certificates.move_to_end(subject)
            return cached.principal
        if cached is None:
            self._check_failures(context)
        try:
            principal = await self.access.principal_for_certificate(subject)
        except errors.Unauthenticated:
            self._certificates.pop(subject, None)
            self._failed(context)
            raise
        _remember(self._certificates, subject, _Cached(principal, None, now))
        return principal

    def _check_failures(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        retry_after_ms = self._failures.empty(_peer_host(context))
        if retry_after_ms is not None:
            raise errors.RateLimited(
                "too many failed authentications from this host", retry_after_ms=retry_after_ms
            )

    def _failed(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._failures.take(_peer_host(context))


def _remember(cache: OrderedDict[Any, _Cached], key: Any, value: _Cached) -> None:
    cache[key] = value
    cache.move_to_end(key)
    while len(cache) > cache_entries_max:
        cache.popitem(last=False)


def _bearer(authorization: list[str]) -> str:
    """The key of the one `authorization: Bearer <key>` value."""
    if len(authorization) > 1:
        raise errors.CredentialsInvalid("send one authorization metadata value, not several")
    scheme, _, token = authorization[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != bearer_scheme or not token:
        raise errors.CredentialsInvalid("the authorization metadata must be `Bearer <API key>`")
    return token


def _common_name(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The subject common name of the client's certificate, on an mTLS connection."""
    for name in context.auth_context().get(_common_name_property) or ():
        return name.decode(errors="replace") if isinstance(name, bytes) else str(name)
    return None


def _peer_host(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    peer = context.peer() or ""
    for prefix in _peer_prefixes:
        if peer.startswith(prefix):
            return peer[len(prefix) :].rsplit(":", 1)[0]
    return peer
