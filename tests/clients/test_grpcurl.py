"""The grpcurl walkthrough of docs/quickstart-other-languages.md, run as grpcurl runs it: each
command's service and method found by name through the server's reflection, its request
built from the command's JSON, sent through a generic channel method, and its answer printed
as JSON (or its error as grpcurl prints one) and compared with what the page shows.

grpcurl itself is not needed: Python's reflection client does what it does, so the page's
requests are proven to be what the server takes, and its answers what the server gives."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from coffer.server.app import Server

from support.paths import root

page = root / "docs" / "quickstart-other-languages.md"
# The server the page's commands name, replaced by the test's.
page_target = "127.0.0.1:50051"
call_timeout_s = 10.0
_time_pattern = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")


@dataclass(frozen=True)
class Command:
    """One `grpcurl` command of the page and what the page shows it printing."""

    headers: list[tuple[str, str]]
    data: str
    method: str
    shown: str


def page_commands() -> list[Command]:
    """The page's grpcurl walkthrough: its one console block of `grpcurl … -d`."""
    blocks = re.findall(r"^```console\n(.*?)^```$", page.read_text(), re.M | re.S)
    [block] = [each for each in blocks if "$ grpcurl" in each and " -d " in each]
    commands = []
    for chunk in re.split(r"^\$ ", block, flags=re.M)[1:]:
        lines = chunk.splitlines()
        command_lines = [lines.pop(0)]
        while command_lines[-1].endswith("\\"):
            command_lines[-1] = command_lines[-1][:-1]
            command_lines.append(lines.pop(0))
        argv = shlex.split(" ".join(command_lines))
        assert argv[:2] == ["grpcurl", "-plaintext"], argv
        headers, data, rest = [], "", argv[2:]
        while rest[0].startswith("-"):
            flag, value, rest = rest[0], rest[1], rest[2:]
            if flag == "-H":
                name, _, header_value = value.partition(":")
                headers.append((name.strip(), header_value.strip()))
            else:
                assert flag == "-d", flag
                data = value
        assert rest[0] == page_target, rest
        [method] = rest[1:]
        commands.append(Command(headers, data, method, "\n".join(lines)))
    return commands


def call_through_reflection(target: str, command: Command) -> str:
    """What grpcurl prints for the command: the answer as JSON, or the error."""
    service_name, method_name = command.method.split("/")
    with grpc.insecure_channel(target) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        request = json_format.Parse(command.data or "{}", request_class())
        call = channel.unary_unary(
            f"/{service_name}/{method_name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        try:
            response = call(request, metadata=command.headers, timeout=call_timeout_s)
        except grpc.RpcError as error:
            return _error_text(error, pool)
        return json_format.MessageToJson(response, indent=2)


def _error_text(error: Any, pool: descriptor_pool.DescriptorPool) -> str:
    """An error as grpcurl prints it: the code's name, the message and the details, each
    decoded by the type reflection gives for its type URL (as grpcurl decodes them)."""
    code = "".join(part.capitalize() for part in error.code().name.split("_"))
    lines = ["ERROR:", f"  Code: {code}", f"  Message: {error.details()}"]
    status = rpc_status.from_call(error)
    if status is not None and status.details:
        lines.append("  Details:")
        for number, detail in enumerate(status.details, 1):
            type_name = detail.type_url.rpartition("/")[2]
            message = message_factory.GetMessageClass(pool.FindMessageTypeByName(type_name))()
            message.ParseFromString(detail.value)
            shown = json.dumps(
                {"@type": detail.type_url, **json_format.MessageToDict(message)}, indent=2
            )
            lines.append(f"  {number})\t" + "\n    \t".join(shown.splitlines()))
    return "\n".join(lines)


def _comparable(shown: str) -> Any:
    """An answer as data, times aside; an error as its code, message and ErrorInfo."""
    if shown.startswith("ERROR:"):
        code = re.search(r"^  Code: (\w+)$", shown, re.M)
        message = re.search(r"^  Message: (.*)$", shown, re.M)
        reason = re.search(r'"reason": "(\w+)"', shown)
        field = re.search(r'"field": "(\w+)"', shown)
        return [each.group(1) if each else None for each in (code, message, reason, field)]
    return _timeless(json.loads(shown))


def _timeless(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _timeless(each) for key, each in value.items()}
    if isinstance(value, list):
        return [_timeless(each) for each in value]
    if isinstance(value, str) and _time_pattern.fullmatch(value):
        return "<time>"
    return value


def test_the_page_has_the_walkthrough() -> None:
    commands = page_commands()
    methods = [command.method for command in commands]
    assert "coffer.v1.TransferService/Credit" in methods
    assert any(command.shown.startswith("ERROR:") for command in commands)
    # Every write names its caller.
    assert all(
        ("coffer-caller", "ops") in command.headers
        for command in commands
        if not command.method.split("/")[1].startswith(("Get", "List"))
    )


async def test_the_walkthrough_as_written(server: Server) -> None:
    """On a fresh server, each command prints what the page shows, times aside."""
    target = f"127.0.0.1:{server.port}"
    for command in page_commands():
        # The blocking reflection client runs beside the event loop where the server answers.
        printed = await asyncio.to_thread(call_through_reflection, target, command)
        assert _comparable(printed) == _comparable(command.shown), (command.method, printed)
