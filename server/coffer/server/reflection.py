"""Server reflection, as `grpc.reflection.v1` and `grpc.reflection.v1alpha`, with comments.

grpcio-reflection serves v1alpha only, and from descriptors without source info: the stubs'
embedded descriptors carry no comments, and its answers copy descriptors anew, which drops
them. So `grpcurl describe` would show a bare schema, and clients asking v1 (grpcurl, Postman,
the other languages' reflection clients) would get UNIMPLEMENTED. This servicer answers both
versions, whose messages are the same on the wire, from the FileDescriptorProtos as protoc
wrote them with their comments (`coffer.v1`'s `descriptors.binpb`, which
scripts/gen_protos.py generates), plus the health and reflection services' own files.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from importlib import resources
from typing import Any

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

__all__ = [
    "Reflection",
    "described_files",
    "v1_service_name",
    "v1alpha_service_name",
]

v1alpha_service_name = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].full_name
v1_service_name = "grpc.reflection.v1.ServerReflection"
_v1alpha_package = reflection_pb2.DESCRIPTOR.package
_v1_package = "grpc.reflection.v1"

_Request = reflection_pb2.ServerReflectionRequest
_Response = reflection_pb2.ServerReflectionResponse


def described_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """Every file reflection describes, each after the files it imports: the API's, with their
    comments, then the health service's and both reflection versions' (without comments)."""
    descriptors = resources.files("coffer.v1").joinpath("descriptors.binpb").read_bytes()
    files = list(descriptor_pb2.FileDescriptorSet.FromString(descriptors).file)
    for module in (health_pb2, reflection_pb2):
        copied = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(copied)
        files.append(copied)
    files.append(_as_v1(files[-1]))
    return files


def _as_v1(v1alpha: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """The v1 reflection file: v1alpha's, which it equals but for its package."""
    v1 = descriptor_pb2.FileDescriptorProto()
    v1.CopyFrom(v1alpha)
    v1.name = v1alpha.name.replace("v1alpha", "v1")
    v1.package = _v1_package
    v1.ClearField("options")
    prefix_old, prefix_new = f".{_v1alpha_package}.", f".{_v1_package}."
    for message in v1.message_type:
        for field in message.field:
            if field.type_name.startswith(prefix_old):
                field.type_name = prefix_new + field.type_name.removeprefix(prefix_old)
    for service in v1.service:
        for method in service.method:
            method.input_type = prefix_new + method.input_type.removeprefix(prefix_old)
            method.output_type = prefix_new + method.output_type.removeprefix(prefix_old)
    return v1


class Reflection:
    """Answers reflection requests about `service_names` from `files` (each after its imports)."""

    def __init__(
        self, service_names: Iterable[str], files: Sequence[descriptor_pb2.FileDescriptorProto]
    ) -> None:
        self._service_names = sorted(service_names)
        self._pool = descriptor_pool.DescriptorPool()
        self._serialized: dict[str, bytes] = {}
        self._imports: dict[str, tuple[str, ...]] = {}
        for file in files:
            serialized = file.SerializeToString()
            self._pool.AddSerializedFile(serialized)
            self._serialized[file.name] = serialized
            self._imports[file.name] = tuple(file.dependency)

    def _file_of(self, symbol: str) -> descriptor.FileDescriptor:
        """The file that defines `symbol`: a message, enum, service, field, enum value,
        extension, or a method (`package.Service.Method`, which the pool does not look up by
        itself). KeyError when none does."""
        try:
            return self._pool.FindFileContainingSymbol(symbol)
        except KeyError:
            service_name, _, method_name = symbol.rpartition(".")
            service = self._pool.FindServiceByName(service_name)
            if method_name not in service.methods_by_name:
                raise
            return service.file

    def add_to(self, server: grpc.aio.Server) -> None:
        """Serves both versions on `server`."""
        handler = grpc.stream_stream_rpc_method_handler(
            self.ServerReflectionInfo,
            request_deserializer=_Request.FromString,
            response_serializer=_Response.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            tuple(
                grpc.method_handlers_generic_handler(name, {"ServerReflectionInfo": handler})
                for name in (v1_service_name, v1alpha_service_name)
            )
        )

    async def ServerReflectionInfo(
        self, requests: AsyncIterator[_Request], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[_Response]:
        async for request in requests:
            yield self.answer(request)

    def answer(self, request: _Request) -> _Response:
        asked = request.WhichOneof("message_request")
        try:
            if asked == "list_services":
                return _Response(
                    original_request=request,
                    list_services_response=reflection_pb2.ListServiceResponse(
                        service=[
                            reflection_pb2.ServiceResponse(name=name)
                            for name in self._service_names
                        ]
                    ),
                )
            if asked == "file_by_filename":
                return self._files(request, self._pool.FindFileByName(request.file_by_filename))
            if asked == "file_containing_symbol":
                return self._files(request, self._file_of(request.file_containing_symbol))
            if asked == "file_containing_extension":
                extended = request.file_containing_extension
                message = self._pool.FindMessageTypeByName(extended.containing_type)
                extension = self._pool.FindExtensionByNumber(message, extended.extension_number)
                return self._files(
                    request, self._pool.FindFileContainingSymbol(extension.full_name)
                )
            if asked == "all_extension_numbers_of_type":
                message = self._pool.FindMessageTypeByName(request.all_extension_numbers_of_type)
                numbers = sorted(each.number for each in self._pool.FindAllExtensions(message))
                return _Response(
                    original_request=request,
                    all_extension_numbers_response=reflection_pb2.ExtensionNumberResponse(
                        base_type_name=message.full_name, extension_number=numbers
                    ),
                )
        except KeyError:
            return _error(request, grpc.StatusCode.NOT_FOUND, "not found")
        return _error(request, grpc.StatusCode.INVALID_ARGUMENT, "no request set")

    def _files(self, request: _Request, found: descriptor.FileDescriptor) -> _Response:
        """The file found and every file it imports, directly or not, with their comments."""
        names: list[str] = []
        pending = [found.name]
        while pending:
            name = pending.pop()
            if name not in names:
                names.append(name)
                pending.extend(self._imports[name])
        return _Response(
            original_request=request,
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=[self._serialized[name] for name in names]
            ),
        )


def _error(request: _Request, code: grpc.StatusCode, message: str) -> _Response:
    number: int = code.value[0]
    return _Response(
        original_request=request,
        error_response=reflection_pb2.ErrorResponse(error_code=number, error_message=message),
    )
