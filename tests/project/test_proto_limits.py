"""The limits the protos' comments state are the core's: every field whose comment gives a
limit names the number `coffer.core.model` defines, so that a limit changed in the model fails
here until the API's documentation says the same."""

from __future__ import annotations

from importlib import resources

import pytest
from google.protobuf import descriptor_pb2

from coffer.clients import caller
from coffer.core import model
from coffer.server.admission import request_bytes_max

# For each field name: what its comment must say (in any case), wherever the field is.
_field_phrases: dict[str, tuple[str, ...]] = {
    "idempotency_key": (f"Up to {model.idempotency_key_length_max} characters",),
    "note": (f"up to {model.note_length_max:,} characters",),
    "reference": (f"up to {model.reference_length_max:,} characters",),
    "performed_by": (f"up to {model.performed_by_length_max:,} characters",),
    "metadata": (
        f"up to {model.metadata_entries_max} entries",
        f"keys 1 to {model.metadata_key_length_max} characters",
        f"values up to {model.metadata_value_length_max:,}",
    ),
    "owner_id": (f"up to {model.owner_id_length_max:,} characters",),
    "page_size": (
        f"1 to {model.page_size_max}",
        f"0 means {model.page_size_default}",
    ),
    "timeout": (
        f"{model.hold_timeout_s_min} second to {model.hold_timeout_s_max // 86_400} days",
        f"unset means {model.hold_timeout_s_default // 3600} hour",
    ),
    "default_validity": (
        f"up to {model.validity_length_max} characters",
        f"at most {model.validity_months_max // 12} years",
    ),
    "operations": (
        f"to {model.batch_operations_max:,} operations",
        f"{request_bytes_max:,} bytes",
    ),
}
# Fields of these names that carry no limit of their own (answers, filters).
_limitless = {
    ("Transfer", "note"),
    ("Transfer", "reference"),
    ("Transfer", "performed_by"),
    ("Transfer", "metadata"),
    ("Hold", "reference"),
    ("Hold", "note"),
    ("Wallet", "metadata"),
    ("Wallet", "owner_id"),
    ("SubmitBatchResponse", "operations"),
    ("ApiKey", "owner_id"),
    ("CertificateMapping", "owner_id"),
    ("Unit", "default_validity"),
    ("OutstandingWallet", "owner_id"),
}


def _files() -> list[descriptor_pb2.FileDescriptorProto]:
    data = resources.files("coffer.v1").joinpath("descriptors.binpb").read_bytes()
    return [
        file
        for file in descriptor_pb2.FileDescriptorSet.FromString(data).file
        if file.package == "coffer.v1"
    ]


def _comments(file: descriptor_pb2.FileDescriptorProto) -> dict[tuple[int, ...], str]:
    return {
        tuple(location.path): location.leading_comments.replace("\n", " ")
        for location in file.source_code_info.location
    }


def _limited_fields() -> list[tuple[str, str, str]]:
    """(message, field, comment) of every top-level message's field named in the table."""
    found = []
    for file in _files():
        comments = _comments(file)
        for m, message in enumerate(file.message_type):
            for f, field in enumerate(message.field):
                if field.name in _field_phrases and (message.name, field.name) not in _limitless:
                    comment = " ".join(comments.get((4, m, 2, f), "").split())
                    found.append((message.name, field.name, comment))
    return found


def test_the_table_meets_fields() -> None:
    named = {field for _, field, _ in _limited_fields()}
    assert named == set(_field_phrases), set(_field_phrases) - named


@pytest.mark.parametrize(
    ("message", "field", "comment"),
    _limited_fields(),
    ids=[f"{message}.{field}" for message, field, _ in _limited_fields()],
)
def test_a_fields_comment_states_the_models_limit(message: str, field: str, comment: str) -> None:
    missing = [phrase for phrase in _field_phrases[field] if phrase.lower() not in comment.lower()]
    assert not missing, f"{message}.{field}: {comment!r} lacks {missing}"


def test_each_service_states_the_caller_rule() -> None:
    phrase = f"`coffer-caller` metadata, 1 to {caller.caller_length_max} visible ASCII characters"
    for file in _files():
        comments = _comments(file)
        for s, service in enumerate(file.service):
            comment = " ".join(comments.get((6, s), "").split())
            assert phrase in comment, (service.name, comment)
