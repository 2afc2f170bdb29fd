"""The server's logs: their two formats, and the line each refused or failed batch call gets.

`configure(level, "text" | "json")` sends every log record to standard error: as text
(`time level logger: message key=value …`), or as one JSON object per line with `time` (UTC,
ISO 8601), `level`, `logger`, `message`, the record's structured fields (given as
`extra={"fields": {...}}`) and, with a traceback, `exception`. In a worker of `coffer serve
--workers N`, every record also carries the field `worker` (its number, 1 to N).

A batch call (SubmitBatch) some of whose operations were refused, or that failed as a whole
(refused at once, or failed by the database), gets one line: its principal (who is calling),
its request id, its counts and its reasons. The request id is the client's `x-request-id`
metadata when it sends a usable one (1 to `request_id_length_max` visible ASCII characters),
else one made here, which the server returns to the client as `x-request-id` in the call's
initial metadata. Nothing else of a call is logged: never a metadata value (`authorization`
above all) nor the request's contents (notes, metadata, idempotency keys); error messages
and the fields they name are left out too, as some quote what they refuse (a metadata
entry's key). Both formats also leave out of tracebacks what a database error quotes (the
DETAIL of PostgreSQL's errors: a failing row, a duplicate key).
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import grpc

from coffer.core import errors
from coffer.core.model import Applied

__all__ = [
    "JsonFormatter",
    "TextFormatter",
    "batch_answered",
    "batch_failed",
    "configure",
    "log_formats",
    "request_id",
    "request_id_length_max",
    "request_id_metadata_key",
]

logger = logging.getLogger(__name__)

log_formats = ("text", "json")
request_id_metadata_key = "x-request-id"
request_id_length_max = 128
# What a record's own attributes are named; anything else a record carries came as `extra`.
_fields_attribute = "fields"
_Context = grpc.aio.ServicerContext[Any, Any]


class _Formatter(logging.Formatter):
    """Tracebacks without what a database error quotes of a request; `process_fields`, the
    fields of every record of this process (before each record's own)."""

    def __init__(self, fmt: str | None = None, process_fields: Mapping[str, Any] | None = None):
        super().__init__(fmt)
        self.process_fields = dict(process_fields or {})

    def fields(self, record: logging.LogRecord) -> dict[str, Any]:
        """The process's fields, then the record's."""
        fields = dict(self.process_fields)
        given = getattr(record, _fields_attribute, None)
        if isinstance(given, Mapping):
            fields.update(given)
        return fields

    def formatException(self, ei: Any) -> str:
        text = super().formatException(ei)
        for cause in _chain(ei[1]):
            shown = str(cause)
            redacted = _redacted(cause)
            if shown and redacted is not None:
                text = text.replace(shown, redacted)
        return text


def _redacted(error: BaseException) -> str | None:
    """What a traceback says of `error` instead of its text, when that may quote a request:
    PostgreSQL's DETAIL and HINT (a failing row, a duplicate key's value), asyncpg's DataError
    (the argument that did not encode). None: its text as it is."""
    if isinstance(error, asyncpg.PostgresError):
        return f"{error.args[0]} (SQLSTATE {error.sqlstate}; its detail left out of the log)"
    if isinstance(error, asyncpg.DataError):
        return "an argument of a query did not encode (its value left out of the log)"
    return None


def _chain(error: BaseException | None) -> list[BaseException]:
    """`error`, what it was raised from or while handling, and so on."""
    found: list[BaseException] = []
    while error is not None and all(error is not each for each in found):
        found.append(error)
        error = error.__cause__ or error.__context__
    return found


class JsonFormatter(_Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = self.fields(record)
        # The record's own keys win over fields of the same name.
        entry.update(
            time=datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            level=record.levelname,
            logger=record.name,
            message=record.getMessage(),
        )
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


class TextFormatter(_Formatter):
    """`time level logger: message`, then the record's fields as ` key=value`."""

    def __init__(self, process_fields: Mapping[str, Any] | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s", process_fields)

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        return line + "".join(
            f" {key}={_text(value)}" for key, value in self.fields(record).items()
        )


def _text(value: object) -> str:
    if isinstance(value, str) and value and value.isprintable() and " " not in value:
        return value
    if isinstance(value, int | float | str | Mapping | Sequence | None):
        return json.dumps(value, separators=(",", ":"), default=str)
    return json.dumps(str(value))


def configure(level: str, log_format: str, *, worker: int | None = None) -> None:
    """Every record at `level` ("debug", "info", "warning") or above to standard error, in
    `log_format` (one of `log_formats`); with `worker`, each with the field `worker`."""
    assert log_format in log_formats, log_format
    process_fields = {} if worker is None else {"worker": worker}
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(process_fields=process_fields)
        if log_format == "json"
        else TextFormatter(process_fields)
    )
    logging.basicConfig(level=level.upper(), handlers=[handler])


async def request_id(context: _Context) -> str:
    """The call's request id: the client's, or one made here and sent back to it in the
    initial metadata. Called at most once per call, before its answer."""
    for key, value in context.invocation_metadata() or ():
        if (
            key == request_id_metadata_key
            and isinstance(value, str)
            and 0 < len(value) <= request_id_length_max
            and value.isascii()
            and value.isprintable()
        ):
            return value
    made = uuid.uuid4().hex
    try:
        await context.send_initial_metadata(((request_id_metadata_key, made),))
    except Exception as error:
        # The call may be over already (its caller gone): the line still names the id.
        logger.debug("the request id %s could not be sent: %s", made, type(error).__name__)
    return made


async def batch_answered(
    context: _Context, principal: str | None, answers: Sequence[Applied | errors.CofferError]
) -> None:
    """Logs, at INFO, a batch call some of whose operations were refused; nothing else."""
    reasons: dict[str, int] = {}
    for answer in answers:
        if not isinstance(answer, Applied):
            reasons[answer.reason] = reasons.get(answer.reason, 0) + 1
    if not reasons:
        return
    refused = sum(reasons.values())
    logger.info(
        "a batch call's operations were refused: %d of %d",
        refused,
        len(answers),
        extra={
            _fields_attribute: {
                "event": "batch_refused",
                "principal": principal,
                "request_id": await request_id(context),
                "operations": len(answers),
                "applied": len(answers) - refused,
                "refused": refused,
                "reasons": reasons,
            }
        },
    )


async def batch_failed(
    context: _Context, principal: str | None, operations: int, error: errors.CofferError
) -> None:
    """Logs a batch call of `operations` operations that failed as a whole with `error`:
    at WARNING when the server or its database failed it (UNAVAILABLE, INTERNAL), else at
    INFO (bad input, overload, a deadline passed)."""
    server_side = error.category in (errors.Category.unavailable, errors.Category.internal)
    logger.log(
        logging.WARNING if server_side else logging.INFO,
        "a batch call of %d operations failed: %s",
        operations,
        error.reason,
        extra={
            _fields_attribute: {
                "event": "batch_failed",
                "principal": principal,
                "request_id": await request_id(context),
                "operations": operations,
                "reason": error.reason,
                "retryable": error.retryable,
            }
        },
    )
