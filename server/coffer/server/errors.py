"""Domain errors to gRPC statuses: one table, applied in one place (`translate_errors`).

Every CofferError becomes its category's status code with a `google.rpc.ErrorInfo` detail
carrying the stable reason (and, for bad input, the `field`; for OVERLOADED and RATE_LIMITED,
`retry_after_ms`).
Bad input named by a field also carries the standard `google.rpc.BadRequest`, one field
violation, which generic gRPC tooling understands without knowing Coffer's ErrorInfo (whose
`field` stays for the clients that read it). Anything else is a bug: it is logged with its
traceback and the client gets INTERNAL (reason INTERNAL), with the details only in the log.

The guard is also where every call is let in, before its handler runs: admission's verdict
(`admission.Refused`), then the gate (`gate.Gate.admit`: authentication, rate limits, the role
matrix), whose principal the handler gets as its argument.

The reasons, with their status codes and whether a retry may succeed, are published to
clients as the `ErrorReason` enum of coffer/v1/errors.proto; the tests hold this table, the
core's errors and that enum to one another.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol, TypeVar

import grpc
from google.protobuf import any_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from coffer.clients.errors import error_domain, replayed_metadata_key
from coffer.core import errors
from coffer.core.model import Principal

from .admission import Admitted, Refused
from .gate import Gate

__all__ = ["Gated", "replayed_metadata", "status_codes", "translate_errors"]

logger = logging.getLogger(__name__)

status_codes: dict[errors.Category, grpc.StatusCode] = {
    errors.Category.invalid_argument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Category.not_found: grpc.StatusCode.NOT_FOUND,
    errors.Category.already_exists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Category.failed_precondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Category.aborted: grpc.StatusCode.ABORTED,
    errors.Category.unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Category.permission_denied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Category.resource_exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Category.deadline_exceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Category.unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Category.internal: grpc.StatusCode.INTERNAL,
}
# ErrorInfo metadata keys.
field_key = "field"
retry_after_ms_key = "retry_after_ms"


# Trailing metadata of a replayed answer: the stored outcome of an earlier request.
replayed_metadata = ((replayed_metadata_key, "true"),)


def _to_status(error: errors.CofferError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=error_domain)
    details = [any_pb2.Any()]
    if isinstance(error, errors.InvalidArgument):
        info.metadata[field_key] = error.field
        violation = error_details_pb2.BadRequest.FieldViolation(
            field=error.field, description=error.message
        )
        details.append(any_pb2.Any())
        details[1].Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    elif isinstance(error, errors.Overloaded | errors.RateLimited):
        info.metadata[retry_after_ms_key] = str(error.retry_after_ms)
    details[0].Pack(info)
    code = status_codes[error.category]
    status = rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=error.message, details=details)
    )
    if error.replayed:
        return _Status(status.code, status.details, (*status.trailing_metadata, *replayed_metadata))
    return status


@dataclass(frozen=True, slots=True)
class _Status(grpc.Status):
    """A status as `rpc_status.to_status` makes one, with trailing metadata of its own added
    (`grpc.Status` only names the three attributes the server reads)."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


_internal_error = errors.Internal("internal error; see the server log")

# A handler as the servicers define it, and as gRPC calls it once guarded: unary, or server
# streaming (an async generator).
_Handler = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any], Principal], Awaitable[Any]]
_Guarded = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]
_StreamHandler = Callable[
    [Any, Any, grpc.aio.ServicerContext[Any, Any], Principal], AsyncGenerator[Any, None]
]
_GuardedStream = Callable[[Any, Any, grpc.aio.ServicerContext[Any, Any]], AsyncGenerator[Any, None]]
_Servicer = TypeVar("_Servicer", bound=type)


class Gated(Protocol):
    """A servicer: its gate lets each call in."""

    gate: Gate


def translate_errors(service: ServiceDescriptor) -> Callable[[_Servicer], _Servicer]:
    """Class decorator for the servicer of `service`: every RPC of the service is a method of
    it, `(request, context, principal)`, which gRPC calls as `(request, context)` once
    guarded. What a call raises, from admission to its handler, becomes the status the client
    sees. (A decorator rather than a server interceptor: grpc.aio runs interceptors on every
    call, at a cost that shows at thousands of calls a second.)

    The guarded methods take the request as `admission` hands it over: `Admitted` (unwrapped
    for the method, released when the call completes), `Refused` (its error is the answer),
    or a plain message. The servicer's `gate` admits the call and names its principal. A
    server-streaming method (an async generator) is guarded alike: what it raises, before its
    first response or after, ends its stream with that status."""

    def decorate(servicer: _Servicer) -> _Servicer:
        for method in service.methods:
            inner = vars(servicer).get(method.name)
            if method.server_streaming:
                assert inner is not None and inspect.isasyncgenfunction(inner), (
                    f"{servicer.__name__} does not define {method.name} as a stream"
                )
                setattr(servicer, method.name, _guard_stream(inner, method.full_name))
                continue
            assert inner is not None and inspect.iscoroutinefunction(inner), (
                f"{servicer.__name__} does not define {method.name}"
            )
            setattr(servicer, method.name, _guard(inner, method.full_name))
        return servicer

    return decorate


async def _answer_failure(
    context: grpc.aio.ServicerContext[Any, Any], method: str, error: Exception
) -> NoReturn:
    """Ends a call that raised `error` with its status: a CofferError's own; an abort as it
    is; anything else, a bug, logged with its traceback and answered INTERNAL."""
    if isinstance(error, grpc.aio.AbortError):
        raise error
    if not isinstance(error, errors.CofferError):
        logger.error("%s failed", method, exc_info=error)
        error = _internal_error
    await context.abort_with_status(_to_status(error))


def _guard(inner: _Handler, method: str) -> _Guarded:
    @functools.wraps(inner)
    async def guarded(
        self: Gated, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        admitted = request if type(request) is Admitted else None
        try:
            if admitted is not None:
                message = admitted.message
            elif type(request) is Refused:
                raise request.error
            else:
                message = request
            principal = await self.gate.admit(context, method, message)
            return await inner(self, message, context, principal)
        except Exception as error:
            await _answer_failure(context, method, error)
        finally:
            if admitted is not None:
                admitted.release()

    return guarded


def _guard_stream(inner: _StreamHandler, method: str) -> _GuardedStream:
    @functools.wraps(inner)
    async def guarded(
        self: Gated, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[Any, None]:
        admitted = request if type(request) is Admitted else None
        try:
            if type(request) is Refused:
                raise request.error
            message = admitted.message if admitted is not None else request
            principal = await self.gate.admit(context, method, message)
            # Closed however the stream ends (a client cancelling included), at once.
            async with aclosing(inner(self, message, context, principal)) as responses:
                async for response in responses:
                    yield response
        except Exception as error:
            await _answer_failure(context, method, error)
        finally:
            if admitted is not None:
                admitted.release()

    return guarded
