"""Server reflection through the real server, as grpcurl and other languages' clients use it:
both versions answer, list every service, and describe the API with its comments."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from coffer.server.app import Server

services_expected = [
    "coffer.v1.AccessService",
    "coffer.v1.EventService",
    "coffer.v1.GrantService",
    "coffer.v1.HoldService",
    "coffer.v1.ReportService",
    "coffer.v1.TransferService",
    "coffer.v1.UnitService",
    "coffer.v1.WalletService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
]


def leading_comment(file: descriptor_pb2.FileDescriptorProto, path: list[int]) -> str:
    """The comment before the element at `path` (descriptor.proto's field numbers)."""
    for location in file.source_code_info.location:
        if list(location.path) == path:
            return location.leading_comments
    return ""


def message_path(file: descriptor_pb2.FileDescriptorProto, name: str) -> list[int]:
    [index] = [i for i, message in enumerate(file.message_type) if message.name == name]
    return [4, index]  # FileDescriptorProto.message_type


def method_path(file: descriptor_pb2.FileDescriptorProto, service: str, method: str) -> list[int]:
    [s] = [i for i, each in enumerate(file.service) if each.name == service]
    [m] = [i for i, each in enumerate(file.service[s].method) if each.name == method]
    return [6, s, 2, m]  # FileDescriptorProto.service, ServiceDescriptorProto.method


def describe_v1alpha(port: int) -> tuple[list[str], descriptor_pb2.FileDescriptorProto, str]:
    """What grpcurl does through v1alpha, with grpcio-reflection's own client (which is
    synchronous: run it in a thread)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        file = database.FindFileContainingSymbol("coffer.v1.TransferService")
        # The whole API resolves, imports included, into a pool of the client's own.
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindMethodByName("coffer.v1.TransferService.Pay")
        return services, file, method.input_type.full_name


async def test_v1alpha_lists_every_service_and_describes_with_comments(server: Server) -> None:
    services, file, pay_input = await asyncio.to_thread(describe_v1alpha, server.port)
    assert sorted(services) == services_expected
    assert file.name == "coffer/v1/transfers.proto"
    assert pay_input == "coffer.v1.PayRequest"
    service = leading_comment(file, [6, 0])
    assert "coffer-caller" in service
    pay = leading_comment(file, method_path(file, "TransferService", "Pay"))
    assert "A customer pays a merchant" in pay
    assert "FAILED_PRECONDITION INSUFFICIENT_FUNDS" in pay
    assert "BigInt" in service


async def v1_exchange(
    channel: grpc.aio.Channel, *requests: reflection_pb2.ServerReflectionRequest
) -> list[reflection_pb2.ServerReflectionResponse]:
    """A raw v1 call: its messages are v1alpha's on the wire."""
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    return [response async for response in call(iter(requests))]


async def test_v1_lists_every_service_and_describes_with_comments(
    channel: grpc.aio.Channel,
) -> None:
    listed, balance, wallets, v1, unknown = await v1_exchange(
        channel,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="coffer.v1.Balance"),
        reflection_pb2.ServerReflectionRequest(file_by_filename="coffer/v1/wallets.proto"),
        reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="grpc.reflection.v1.ServerReflection"
        ),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="coffer.v1.Nothing"),
    )
    assert sorted(each.name for each in listed.list_services_response.service) == (
        services_expected
    )
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(each)
        for each in balance.file_descriptor_response.file_descriptor_proto
    ]
    # The file asked for first, then what it imports.
    assert [file.name for file in files] == [
        "coffer/v1/types.proto",
        "google/protobuf/timestamp.proto",
    ]
    comment = leading_comment(files[0], message_path(files[0], "Balance"))
    assert "minor units" in comment and "BigInt" in comment
    [wallets_file, *imported] = [
        descriptor_pb2.FileDescriptorProto.FromString(each)
        for each in wallets.file_descriptor_response.file_descriptor_proto
    ]
    assert "coffer/v1/types.proto" in [file.name for file in imported]
    cancel = leading_comment(
        wallets_file, method_path(wallets_file, "WalletService", "CancelWallet")
    )
    assert "WALLET_NOT_EMPTY" in cancel
    [v1_file] = [
        descriptor_pb2.FileDescriptorProto.FromString(each)
        for each in v1.file_descriptor_response.file_descriptor_proto
    ]
    assert v1_file.package == "grpc.reflection.v1"
    assert v1_file.service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_methods_and_status_details_are_found_by_name(channel: grpc.aio.Channel) -> None:
    """What grpcurl asks: the file of a method named in full (`describe
    coffer.v1.TransferService.Pay`), and of the status details a failed call carries, which no
    file of the API imports (to print an error's details)."""
    symbols = [
        "coffer.v1.TransferService.Pay",
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
        "google.rpc.Status",
        "coffer.v1.TransferService.Nothing",
    ]
    *found, unknown = await v1_exchange(
        channel,
        *(reflection_pb2.ServerReflectionRequest(file_containing_symbol=s) for s in symbols),
    )
    names = [
        descriptor_pb2.FileDescriptorProto.FromString(
            response.file_descriptor_response.file_descriptor_proto[0]
        ).name
        for response in found
    ]
    assert names == [
        "coffer/v1/transfers.proto",
        "google/rpc/error_details.proto",
        "google/rpc/error_details.proto",
        "google/rpc/status.proto",
    ]
    assert unknown.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


async def test_every_element_of_the_api_is_described(channel: grpc.aio.Channel) -> None:
    """What reflection serves of each file carries a comment for every message, field, enum,
    enum value, service and method: what buf lint's COMMENT rules ask of the protos."""
    names = ["errors", "holds", "transfers", "types", "units", "wallets"]
    responses = await v1_exchange(
        channel,
        *(
            reflection_pb2.ServerReflectionRequest(file_by_filename=f"coffer/v1/{name}.proto")
            for name in names
        ),
    )
    bare: list[str] = []
    for name, response in zip(names, responses, strict=True):
        file = descriptor_pb2.FileDescriptorProto.FromString(
            response.file_descriptor_response.file_descriptor_proto[0]
        )
        assert file.name == f"coffer/v1/{name}.proto"
        commented = {
            tuple(location.path)
            for location in file.source_code_info.location
            if location.leading_comments.strip()
        }
        for m, message in enumerate(file.message_type):
            if message.options.map_entry:
                continue
            paths = {(4, m): message.name}
            paths |= {
                (4, m, 2, f): f"{message.name}.{field.name}"
                for f, field in enumerate(message.field)
            }
            # proto3 `optional` fields have a oneof each, of protoc's own, without a comment.
            synthetic = {field.oneof_index for field in message.field if field.proto3_optional}
            paths |= {
                (4, m, 8, o): f"{message.name}.{oneof.name}"
                for o, oneof in enumerate(message.oneof_decl)
                if o not in synthetic
            }
            bare += [label for path, label in paths.items() if path not in commented]
        for e, enum in enumerate(file.enum_type):
            paths = {(5, e): enum.name}
            paths |= {(5, e, 2, v): value.name for v, value in enumerate(enum.value)}
            bare += [label for path, label in paths.items() if path not in commented]
        for s, service in enumerate(file.service):
            paths = {(6, s): service.name}
            paths |= {(6, s, 2, m): method.name for m, method in enumerate(service.method)}
            bare += [label for path, label in paths.items() if path not in commented]
    assert not bare, bare
