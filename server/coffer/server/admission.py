"""Admission: what the server takes in before it decodes a request, and how it registers the
services so that every request passes through here. An RPC takes one request: unary, or
server streaming, whose call counts as in progress until its stream ends.

Each RPC's request deserializer is wrapped (`register` builds the method handlers from the
service descriptors, so no RPC is left out). The wrapped deserializer, given a request's bytes:
- refuses it with Overloaded, before decoding it, when admitting it would pass `calls_max`
  calls or `queued_bytes_max` request bytes in progress at once (memory);
- refuses a large request (over `request_bytes_small_max`: a batch call) also when it would
  use the budget's last `request_bytes_max` bytes, kept for single calls and reads; when the
  batch calls queued already would take more than `batch_calls_wait_ms_max` to apply (their
  wait, and the time to recover once the load stops); or when the event loop runs more
  than `loop_lag_ms_max` late (the server's one thread is busy: decoding more would delay
  every call, single calls first) — single calls, cheap, are refused by the memory bounds
  only;
- refuses it with MalformedRequest when its bytes do not decode as the request message
  (truncated, a varint of 11 bytes, invalid UTF-8 in a string), logged at INFO;
- else counts its bytes and the call as in progress, and returns it `Admitted`.

A refusal comes back as `Refused`, a value, not an exception (gRPC would answer an exception
in a deserializer with UNKNOWN): the servicer's guard (`errors.translate_errors`) raises its
error there, so that it reaches the client as every other error does, with its status and
ErrorInfo. The guard releases an admitted request's bytes and call when the call completes,
however it completes.

Requests larger than `request_bytes_max` never reach the deserializer: gRPC refuses them
itself with RESOURCE_EXHAUSTED ("Received message larger than max"), without ErrorInfo.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from coffer.core import errors
from coffer.core.model import batch_operations_max

__all__ = [
    "Admission",
    "Admitted",
    "Observe",
    "Refused",
    "loop_check_interval_s",
    "loop_lag_ms_max",
    "register",
    "request_bytes_max",
    "request_bytes_small_max",
]

logger = logging.getLogger(__name__)

# The largest request: a batch of batch_operations_max (8,000) operations of 1 KiB each on
# average. A transfer with its key, a note and a reference takes 150 to 300 bytes; a larger
# request (long notes and metadata on every operation) must be split into several batches.
request_bytes_max = batch_operations_max * 1024
# Requests up to this size (every single-operation call and read) may use the budget's last
# request_bytes_max bytes, which larger ones may not.
request_bytes_small_max = 64 * 1024
# Larger requests are refused while the batch calls queued would take longer than this to
# apply, or while the event loop runs later than this.
batch_calls_wait_ms_max = 500
loop_lag_ms_max = 20
# How often the event loop's lateness is measured.
loop_check_interval_s = 0.01


class Admitted:
    """A decoded request, its bytes counted as in progress until `release`."""

    __slots__ = ("_admission", "message", "size")

    def __init__(self, admission: Admission, message: Message, size: int) -> None:
        self._admission: Admission | None = admission
        self.message = message
        self.size = size

    def release(self) -> None:
        """The call completed: its bytes and its place are free again. Idempotent."""
        admission, self._admission = self._admission, None
        if admission is not None:
            admission.bytes -= self.size
            admission.calls -= 1

    def __del__(self) -> None:
        # The guard releases every admitted request when its call ends; should a call end
        # without reaching the guard, the count must still not leak, or the server would
        # refuse everything in the end.
        self.release()


class Refused:
    """A request refused before it was decoded, or that could not be decoded."""

    __slots__ = ("error",)

    def __init__(self, error: errors.CofferError) -> None:
        self.error = error


class Admission:
    def __init__(
        self,
        *,
        queued_bytes_max: int,
        calls_max: int,
        retry_after_ms: Callable[[], int],
        batch_calls_drain_ms: Callable[[], int],
    ) -> None:
        assert queued_bytes_max >= 2 * request_bytes_max and calls_max > 0
        self.queued_bytes_max = queued_bytes_max
        self.calls_max = calls_max
        self._large_bytes_max = queued_bytes_max - request_bytes_max
        self._retry_after_ms = retry_after_ms
        self._batch_calls_drain_ms = batch_calls_drain_ms
        # In progress: request bytes admitted and calls, until their calls complete.
        self.bytes = 0
        self.calls = 0
        self.refused = 0
        # How late the event loop runs (watch_loop), in ms, smoothed over the last checks.
        self.loop_lag_ms = 0

    async def watch_loop(self) -> None:
        """Measures how late the event loop runs, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(loop_check_interval_s)
            late_ms = max(int((loop.time() - started - loop_check_interval_s) * 1000), 0)
            # Smoothed: one long step (decoding a large request) is not a busy server.
            self.loop_lag_ms = (7 * self.loop_lag_ms + late_ms) // 8

    def _busy(self, size: int) -> str | None:
        """Why a request of `size` bytes may not be admitted now, or None."""
        if self.calls >= self.calls_max:
            return f"{self.calls} calls are in progress already"
        if size <= request_bytes_small_max:
            if self.bytes + size > self.queued_bytes_max:
                return f"{self.bytes} request bytes are in progress already"
            return None
        if self.bytes + size > self._large_bytes_max:
            return f"{self.bytes} request bytes are in progress already"
        if self._batch_calls_drain_ms() > batch_calls_wait_ms_max:
            return "the batch calls waiting already will take a while"
        if self.loop_lag_ms > loop_lag_ms_max:
            return "the server is busy"
        return None

    def deserializer(
        self, parse: Callable[[bytes], Message], message_name: str
    ) -> Callable[[bytes], Admitted | Refused]:
        def deserialize(data: bytes) -> Admitted | Refused:
            size = len(data)
            busy = self._busy(size)
            if busy is not None:
                self.refused += 1
                return Refused(
                    errors.Overloaded(
                        f"{busy}; retry shortly", retry_after_ms=self._retry_after_ms()
                    )
                )
            try:
                message = parse(data)
            except DecodeError as error:
                logger.info("a malformed %s (%d bytes): %s", message_name, size, error)
                return Refused(
                    errors.MalformedRequest(f"the request is not a valid {message_name}")
                )
            self.bytes += size
            self.calls += 1
            return Admitted(self, message, size)

        return deserialize


# What wraps each RPC method as registered, given the method and its service's and method's
# names (the metrics' `observed`).
Observe = Callable[[Any, str, str], Any]


def register(
    server: grpc.aio.Server,
    servicer: Any,
    service: ServiceDescriptor,
    admission: Admission,
    observe: Observe | None = None,
) -> None:
    """Serves `service` with `servicer` (whose RPC methods are guarded by translate_errors),
    every request passing through `admission`; each method wrapped by `observe`, if given."""
    handlers = {}
    for method in service.methods:
        # One request each: unary, or server streaming (the call, and its request's bytes,
        # count as in progress until the stream ends).
        assert not method.client_streaming, method.full_name
        request = message_factory.GetMessageClass(method.input_type)
        response = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(servicer, method.name)
        if observe is not None:
            behavior = observe(behavior, service.full_name, method.name)
        handler = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        handlers[method.name] = handler(
            behavior,
            request_deserializer=admission.deserializer(
                request.FromString, method.input_type.full_name
            ),
            response_serializer=response.SerializeToString,
        )
    # As a generic handler only, not also as registered methods: grpc.aio's server waits for
    # the next call on one future per registered method, and every call that comes in makes
    # it wait on all of them anew (a set of some forty futures, each given a callback and then
    # rid of it), a cost per call that grows with the RPCs served. Generic handlers are asked
    # in turn, one per service, each a dictionary lookup of the method's full name.
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
