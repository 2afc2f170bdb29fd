"""The ErrorReason enum of the protos (coffer/v1/errors.proto) says what the code does: one
value per reason the server gives, each with the status code the server's table gives its
category and the retryability the core gives its error; and the client's typed errors agree
with it. Clients in other languages learn the reasons from the enum alone, so a reason added,
renamed or moved to another status code fails here until the enum says so."""

from __future__ import annotations

import re

import grpc
import pytest
from google.protobuf.descriptor import EnumValueDescriptor
from google.rpc import code_pb2

from coffer.clients import errors as client_errors
from coffer.core import errors
from coffer.server.errors import status_codes
from coffer.v1 import errors_pb2

from support.paths import root

prefix = "ERROR_REASON_"


def reason_values() -> dict[str, EnumValueDescriptor]:
    """The enum's values but UNSPECIFIED, by their wire reason (the name without the prefix)."""
    values = errors_pb2.ErrorReason.DESCRIPTOR.values
    assert all(value.name.startswith(prefix) for value in values)
    return {
        value.name.removeprefix(prefix): value
        for value in values
        if value.name != f"{prefix}UNSPECIFIED"
    }


def status_code_of(value: EnumValueDescriptor) -> int:
    options = value.GetOptions()
    assert options.HasExtension(errors_pb2.status_code), f"{value.name} has no status_code"
    return options.Extensions[errors_pb2.status_code]


def retryable_of(value: EnumValueDescriptor) -> bool:
    options = value.GetOptions()
    assert options.HasExtension(errors_pb2.retryable), f"{value.name} has no retryable"
    return options.Extensions[errors_pb2.retryable]


def test_unspecified_is_zero_and_says_nothing() -> None:
    unspecified = errors_pb2.ErrorReason.DESCRIPTOR.values_by_number[0]
    assert unspecified.name == f"{prefix}UNSPECIFIED"
    assert not unspecified.GetOptions().ListFields()


def test_the_enum_lists_exactly_the_reasons_the_server_gives() -> None:
    assert reason_values().keys() == errors.reasons().keys(), (
        f"reasons missing from the enum: {sorted(errors.reasons().keys() - reason_values())}; "
        f"in the enum, not given: {sorted(reason_values().keys() - errors.reasons().keys())}"
    )


@pytest.mark.parametrize("reason", sorted(errors.reasons()))
def test_each_value_has_the_code_and_retryability_the_server_gives(reason: str) -> None:
    error = errors.reasons()[reason]
    value = reason_values()[reason]
    code = status_codes[error.category]
    assert status_code_of(value) == code.value[0], (reason, code)
    # The enum google.rpc.Code and gRPC's status codes number alike; so do their names.
    assert code_pb2.Code.Name(status_code_of(value)) == code.name
    assert retryable_of(value) == error.retryable
    # Each value's comment, as reflection and generated code show it, names its code too.
    assert code.name in _comment(value), value.name


@pytest.mark.parametrize("reason", sorted(errors.reasons()))
def test_the_clients_typed_errors_agree_with_the_enum(reason: str) -> None:
    value = reason_values()[reason]
    client_class = client_errors.reasons()[reason]
    assert client_class.reason == reason
    assert client_class.code == _grpc_code(status_code_of(value))
    assert client_class.retryable == retryable_of(value)


def test_the_client_knows_every_reason_of_the_enum() -> None:
    assert client_errors.reasons().keys() == reason_values().keys()


def _grpc_code(number: int) -> grpc.StatusCode:
    (code,) = (code for code in grpc.StatusCode if code.value[0] == number)
    return code


def _comment(value: EnumValueDescriptor) -> str:
    """The comment just above the value in coffer/v1/errors.proto."""
    text = (root / "protos" / "coffer" / "v1" / "errors.proto").read_text()
    lines = text.splitlines()
    (index,) = (i for i, line in enumerate(lines) if line.strip().startswith(f"{value.name} "))
    comment: list[str] = []
    for line in reversed(lines[:index]):
        if not line.strip().startswith("//"):
            break
        comment.insert(0, line.strip().removeprefix("//").strip())
    return " ".join(comment)


def test_the_readme_names_every_reason() -> None:
    """The README's API section lists the reasons for readers: each of the enum's, none
    other, so that the list cannot drift from the enum."""
    from support.paths import readme

    section = readme.read_text().split("## The API", 1)[1].split("\n## ", 1)[0]
    start = section.index("The reasons:")
    listed = set(re.findall(r"`([A-Z][A-Z_]+)`", section[start : section.index(". In a batch")]))
    enum_reasons = {
        value.name.removeprefix("ERROR_REASON_")
        for value in errors_pb2.ErrorReason.DESCRIPTOR.values
        if value.number
    }
    codes = {code.name for code in grpc.StatusCode}
    assert listed - codes == enum_reasons - codes, (listed ^ enum_reasons) - codes
    assert enum_reasons <= listed
