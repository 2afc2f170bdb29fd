"""Domain errors to gRPC statuses: one table, applied in one place (`ErrorInterceptor`).

Every CofferError becomes its category's status code with a `google.rpc.ErrorInfo` detail
carrying the stable reason (and, for bad input, the field). Anything else is a bug: it is
logged with its traceback and the client gets INTERNAL with no details.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from coffer.core import errors

logger = logging.getLogger(__name__)

error_domain = "coffer.v1"

status_codes: dict[errors.Category, grpc.StatusCode] = {
    errors.Category.invalid_argument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.Category.not_found: grpc.StatusCode.NOT_FOUND,
    errors.Category.already_exists: grpc.StatusCode.ALREADY_EXISTS,
    errors.Category.failed_precondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Category.aborted: grpc.StatusCode.ABORTED,
    errors.Category.resource_exhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Category.unavailable: grpc.StatusCode.UNAVAILABLE,
}


def status_code(error: errors.CofferError) -> grpc.StatusCode:
    return status_codes[error.category]


def to_status(error: errors.CofferError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=error_domain)
    if isinstance(error, errors.InvalidArgument):
        info.metadata["field"] = error.field
    detail = any_pb2.Any()
    detail.Pack(info)
    code = status_code(error)
    return rpc_status.to_status(
        status_pb2.Status(code=code.value[0], message=error.message, details=[detail])
    )


Handler = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns what a unary handler raises into the status the client sees."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _guard(handler.unary_unary, handler_call_details.method),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _guard(inner: Handler, method: str) -> Handler:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await inner(request, context)
        except errors.CofferError as error:
            await context.abort_with_status(to_status(error))
        except grpc.aio.AbortError:
            raise
        except Exception:
            logger.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")

    return guarded
