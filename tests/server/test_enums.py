"""Every enum agrees on all three sides: the proto's (`coffer.v1`, the numbers on the wire), the
core's IntEnums (`coffer.core`), and the numbers PostgreSQL keeps (smallint columns written from
the core's members, and the numbers the schema itself names: defaults, index predicates, check
constraints). Enums are enumerated from the code, so a new one, or a new member, fails here
until it is given its place on each side."""

from __future__ import annotations

import asyncio
import importlib
import itertools
import pkgutil
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from enum import IntEnum
from types import ModuleType

import asyncpg
import grpc
import pytest
from google.protobuf.descriptor import EnumDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

import coffer.core
import coffer.v1
from coffer.core import model
from coffer.v1 import (
    access_pb2,
    access_pb2_grpc,
    grants_pb2,
    grants_pb2_grpc,
    holds_pb2,
    holds_pb2_grpc,
    transfers_pb2,
    transfers_pb2_grpc,
    types_pb2,
    units_pb2,
    units_pb2_grpc,
    wallets_pb2,
    wallets_pb2_grpc,
)

# Core enums with no proto enum, and why.
core_only = {
    "SystemWallet": "names the system wallets of a unit (their owner ids); the API shows them "
    "as wallets of OwnerKind.SYSTEM",
}
# Proto enums with no core enum, and why.
proto_only = {
    "ErrorReason": "the core names its errors by reason strings (coffer.core.errors.reasons()), "
    "which the enum's values spell without their prefix; test_error_reasons holds the two alike",
}
# Where the database keeps each core enum's numbers: (table, column).
stored_in: dict[str, tuple[str, str]] = {
    "UnitKind": ("units", "kind"),
    "OwnerKind": ("wallets", "owner_kind"),
    "WalletStatus": ("wallets", "status"),
    "TransferKind": ("transfers", "kind"),
    # And certificate_mappings.role alike.
    "Role": ("api_keys", "role"),
}
# Core enums whose numbers the database does not keep, and why.
not_stored = {
    "DebitMode": "a request's mode; a transfer keeps what it asked for (amount_requested)",
    "HoldStatus": "derived: pending while the hold is in pending_holds, else the kind of the "
    "transfer that resolved it (capture, release, hold_expiry)",
    "SystemWallet": "kept by name, as the owner_id of a system wallet",
    "EventType": "no column: a transfer's event type follows from its kind "
    "(model.event_type_of_kind), and a record's other changes keep theirs in their JSON "
    "(commits.changes), read back by coffer.core.store.events, whose tests cover every type",
}
# Every number the schema names for an enum column, by (table, column, where), as the members
# it means. A number written into the schema does not follow a renumbered member: each is listed
# here, so that the test fails if it stops meaning its member.
schema_numbers: dict[tuple[str, str, str], frozenset[IntEnum]] = {
    ("wallets", "status", "default"): frozenset({model.WalletStatus.active}),
    ("wallets", "owner_kind", "index wallets_system"): frozenset({model.OwnerKind.system}),
}
hold_expiry_wait_s_max = 10.0
expiration_wait_s_max = 10.0
_keys = itertools.count(1)


def modules(package: ModuleType) -> Iterator[ModuleType]:
    for found in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        yield importlib.import_module(found.name)


def core_enums() -> dict[str, type[IntEnum]]:
    """Every IntEnum defined in a module of coffer.core, by name."""
    found: dict[str, type[IntEnum]] = {}
    for module in modules(coffer.core):
        for value in vars(module).values():
            if (
                isinstance(value, type)
                and issubclass(value, IntEnum)
                and value.__module__ == module.__name__
            ):
                assert value.__name__ not in found, f"two core enums named {value.__name__}"
                found[value.__name__] = value
    return found


def proto_enums() -> dict[str, EnumDescriptor]:
    """Every enum of the generated messages (top-level or nested in a message), by name."""
    found: dict[str, EnumDescriptor] = {}

    def add(descriptor: EnumDescriptor) -> None:
        assert descriptor.name not in found, f"two proto enums named {descriptor.name}"
        found[descriptor.name] = descriptor

    for module in modules(coffer.v1):
        if not module.__name__.endswith("_pb2"):
            continue
        file = module.DESCRIPTOR
        for descriptor in file.enum_types_by_name.values():
            add(descriptor)
        pending = list(file.message_types_by_name.values())
        while pending:
            message = pending.pop()
            for descriptor in message.enum_types:
                add(descriptor)
            pending.extend(message.nested_types)
    return found


def proto_prefix(enum_name: str) -> str:
    """The prefix of a proto enum's values, by buf's STANDARD rule: TransferKind → TRANSFER_KIND."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum_name).upper()


def test_the_enums_are_found() -> None:
    assert {"UnitKind", "TransferKind", "HoldStatus"} <= core_enums().keys()
    assert {"UnitKind", "TransferKind", "HoldStatus"} <= proto_enums().keys()


def test_every_core_enum_has_a_proto_enum_or_says_why_not() -> None:
    core, proto = core_enums(), proto_enums()
    assert core_only.keys() <= core.keys(), "core_only names an enum the core no longer has"
    assert proto_only.keys() <= proto.keys(), "proto_only names an enum the protos no longer have"
    assert core.keys() - core_only.keys() == proto.keys() - proto_only.keys(), (
        "core enums without a proto enum (add one, or to core_only): "
        f"{sorted(core.keys() - core_only.keys() - proto.keys())}; "
        "proto enums without a core enum (add one, or to proto_only): "
        f"{sorted(proto.keys() - proto_only.keys() - core.keys())}"
    )


@pytest.mark.parametrize("name", sorted(proto_enums().keys() - proto_only.keys()))
def test_proto_and_core_number_every_member_alike(name: str) -> None:
    """The proto enum is the core's, member for member and number for number, with
    <PREFIX>_UNSPECIFIED = 0 first (what proto3 reads from an unset field)."""
    prefix = proto_prefix(name)
    expected = {f"{prefix}_UNSPECIFIED": 0} | {
        f"{prefix}_{member.name.upper()}": member.value for member in core_enums()[name]
    }
    assert 0 not in {member.value for member in core_enums()[name]}, "0 is UNSPECIFIED"
    assert {value.name: value.number for value in proto_enums()[name].values} == expected


def test_every_core_enum_has_its_place_in_the_database_said() -> None:
    core = core_enums().keys()
    assert not stored_in.keys() & not_stored.keys()
    assert stored_in.keys() | not_stored.keys() == core, (
        "say where the database keeps each core enum (stored_in), or why it does not "
        f"(not_stored): {sorted(core - stored_in.keys() - not_stored.keys())}; "
        f"no longer enums: {sorted((stored_in.keys() | not_stored.keys()) - core)}"
    )
    for table, column, _ in schema_numbers:
        assert (table, column) in stored_in.values(), (table, column)


# The database ---------------------------------------------------------------------------------


def numbers_named(expression: str, column: str) -> frozenset[int] | None:
    """The numbers an SQL expression, as PostgreSQL prints it, compares `column` with; None if
    it does not mention the column. An expression that mentions it in a form read here by no
    pattern fails the test, rather than be taken for naming nothing."""
    if not re.search(rf"\b{column}\b", expression):
        return None
    name = rf"\(?\b{column}\b\)?(?:::\w+)?"
    numbers = [int(number) for number in re.findall(rf"{name}\s*(?:=|<>)\s*\(?(\d+)\b", expression)]
    for listed in re.findall(
        rf"{name}\s*(?:=|<>)\s*ANY\s*\(\s*(?:ARRAY)?\[([\d\s,]+)\]", expression
    ):
        numbers.extend(int(number) for number in listed.split(","))
    assert numbers, f"cannot read which numbers {expression!r} names for {column}"
    return frozenset(numbers)


async def schema_numbers_found(
    connection: asyncpg.Connection,
) -> dict[tuple[str, str, str], frozenset[int]]:
    """Every number the migrated schema names for an enum column: its default, and what index
    predicates and check constraints compare it with."""
    found: dict[tuple[str, str, str], frozenset[int]] = {}
    for table, column in stored_in.values():
        default = await connection.fetchval(
            """
            select pg_get_expr(d.adbin, d.adrelid)
            from pg_attrdef d
            join pg_attribute a on a.attrelid = d.adrelid and a.attnum = d.adnum
            where d.adrelid = $1::regclass and a.attname = $2
            """,
            table,
            column,
        )
        if default is not None:
            assert re.fullmatch(r"\d+", default), f"{table}.{column} default {default!r}"
            found[(table, column, "default")] = frozenset({int(default)})
        expressions = await connection.fetch(
            """
            select 'index ' || i.indexrelid::regclass::text as place,
                   pg_get_expr(i.indpred, i.indrelid) as expression
            from pg_index i
            where i.indrelid = $1::regclass and i.indpred is not null
            union all
            select 'constraint ' || c.conname, pg_get_constraintdef(c.oid)
            from pg_constraint c
            where c.conrelid = $1::regclass and c.contype = 'c'
            """,
            table,
        )
        for row in expressions:
            numbers = numbers_named(row["expression"], column)
            if numbers is not None:
                found[(table, column, row["place"])] = numbers
    return found


async def test_the_schema_names_each_enum_number_by_its_member(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        for table, column in stored_in.values():
            data_type = await connection.fetchval(
                "select data_type from information_schema.columns"
                " where table_schema = 'public' and table_name = $1 and column_name = $2",
                table,
                column,
            )
            assert data_type == "smallint", (table, column, data_type)
        found = await schema_numbers_found(connection)
    finally:
        await connection.close()
    expected = {
        place: frozenset(member.value for member in members)
        for place, members in schema_numbers.items()
    }
    assert found == expected, "list each number the schema names in schema_numbers"


async def test_numbers_named_reads_what_postgresql_prints(database_url: str) -> None:
    """The patterns of `numbers_named`, on what PostgreSQL prints of a scratch table's checks."""
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            """
            create temporary table scratch (
                kind smallint constraint listed check (kind in (1, 2)),
                other_kind smallint constraint compared check (other_kind <> 7),
                constraint ranged check (kind >= 1)
            )
            """
        )
        printed = {
            row["conname"]: row["definition"]
            for row in await connection.fetch(
                "select conname, pg_get_constraintdef(oid) as definition from pg_constraint"
                " where conrelid = 'scratch'::regclass"
            )
        }
    finally:
        await connection.close()
    assert numbers_named(printed["listed"], "kind") == {1, 2}
    assert numbers_named(printed["compared"], "other_kind") == {7}
    assert numbers_named(printed["compared"], "kind") is None
    with pytest.raises(AssertionError, match="cannot read"):
        numbers_named(printed["ranged"], "kind")
    assert numbers_named("(owner_kind = 3)", "owner_kind") == {3}


def key() -> str:
    return f"enums-{next(_keys)}"


async def test_rows_keep_the_numbers_the_api_shows(
    channel: grpc.aio.Channel, database_url: str
) -> None:
    """Through the API, every member of every stored enum is made (units of each kind, wallets
    of each owner kind and status, transfers of each kind, holds of each status); each row read
    back keeps the number the API showed for it."""
    units = units_pb2_grpc.UnitServiceStub(channel)
    wallets = wallets_pb2_grpc.WalletServiceStub(channel)
    transfers = transfers_pb2_grpc.TransferServiceStub(channel)
    holds = holds_pb2_grpc.HoldServiceStub(channel)

    for code, kind in (("EUR", types_pb2.UNIT_KIND_CURRENCY), ("seat", types_pb2.UNIT_KIND_CREDIT)):
        await units.CreateUnit(
            units_pb2.CreateUnitRequest(code=code, kind=kind, name=code, scale=2)
        )

    async def wallet(owner_kind: int) -> int:
        created = await wallets.CreateWallet(
            wallets_pb2.CreateWalletRequest(
                idempotency_key=key(), owner_id=key(), owner_kind=owner_kind, unit="EUR"
            )
        )
        return created.wallet.id

    customer = await wallet(types_pb2.OWNER_KIND_CUSTOMER)
    merchant = await wallet(types_pb2.OWNER_KIND_MERCHANT)
    await wallets.CancelWallet(
        wallets_pb2.CancelWalletRequest(wallet_id=await wallet(types_pb2.OWNER_KIND_CUSTOMER))
    )
    credited = await transfers.Credit(
        transfers_pb2.CreditRequest(idempotency_key=key(), wallet_id=customer, amount=1000)
    )
    await transfers.Debit(
        transfers_pb2.DebitRequest(idempotency_key=key(), wallet_id=customer, amount=10)
    )
    await transfers.Transfer(
        transfers_pb2.TransferRequest(
            idempotency_key=key(), source_wallet_id=customer, target_wallet_id=merchant, amount=10
        )
    )
    await transfers.Deposit(
        transfers_pb2.DepositRequest(
            idempotency_key=key(), wallet_id=customer, amount=100, funding_source="iban:1"
        )
    )
    await transfers.Withdraw(
        transfers_pb2.WithdrawRequest(
            idempotency_key=key(), wallet_id=customer, amount=10, funding_source="iban:1"
        )
    )
    await transfers.Pay(
        transfers_pb2.PayRequest(
            idempotency_key=key(), payer_wallet_id=customer, payee_wallet_id=merchant, amount=10
        )
    )
    await transfers.Void(
        transfers_pb2.VoidRequest(idempotency_key=key(), transfer_id=credited.transfer.id)
    )

    async def hold(timeout_s: int = 600) -> int:
        placed = await holds.PlaceHold(
            holds_pb2.PlaceHoldRequest(
                idempotency_key=key(),
                wallet_id=customer,
                amount=10,
                timeout=Duration(seconds=timeout_s),
            )
        )
        return placed.hold.id

    hold_ids = [await hold() for _ in range(3)]
    await holds.CaptureHold(
        holds_pb2.CaptureHoldRequest(idempotency_key=key(), hold_id=hold_ids[1])
    )
    await holds.ReleaseHold(
        holds_pb2.ReleaseHoldRequest(idempotency_key=key(), hold_id=hold_ids[2])
    )
    hold_ids.append(await hold(timeout_s=model.hold_timeout_s_min))
    async with asyncio.timeout(hold_expiry_wait_s_max):
        while True:
            lapsed = await holds.GetHold(holds_pb2.GetHoldRequest(hold_id=hold_ids[-1]))
            if lapsed.hold.resolved_by_transfer_id:
                break
            await asyncio.sleep(0.1)

    # An expiration: a credit that expires a second from now, once it has.
    expires_at = Timestamp()
    expires_at.FromDatetime(datetime.now(UTC) + timedelta(seconds=1))
    await transfers.Credit(
        transfers_pb2.CreditRequest(
            idempotency_key=key(), wallet_id=customer, amount=5, expires_at=expires_at
        )
    )
    grants = grants_pb2_grpc.GrantServiceStub(channel)
    async with asyncio.timeout(expiration_wait_s_max):
        while True:
            await asyncio.sleep(0.2)
            run = await grants.RunExpiration(grants_pb2.RunExpirationRequest())
            if run.expired_count:
                break

    shown_statuses = {
        (await holds.GetHold(holds_pb2.GetHoldRequest(hold_id=hold_id))).hold.status
        for hold_id in hold_ids
    }
    assert shown_statuses == {member.value for member in model.HoldStatus}

    listed_units = (await units.ListUnits(units_pb2.ListUnitsRequest())).units
    listed_wallets = (await wallets.ListWallets(wallets_pb2.ListWalletsRequest())).wallets
    listed_transfers = (
        await transfers.ListTransfers(transfers_pb2.ListTransfersRequest())
    ).transfers
    # Keys of every role, the first (which ends the open mode) an administrator's.
    access = access_pb2_grpc.AccessServiceStub(channel)
    made = await access.CreateApiKey(
        access_pb2.CreateApiKeyRequest(name="admin", role=access_pb2.ROLE_ADMIN)
    )
    bearer = (("authorization", f"Bearer {made.api_key}"),)
    shown_roles = {made.key.role}
    for role in model.Role:
        owned = role in (model.Role.merchant, model.Role.customer)
        made = await access.CreateApiKey(
            access_pb2.CreateApiKeyRequest(
                name=role.name, role=role.value, owner_id="owner" if owned else ""
            ),
            metadata=bearer,
        )
        shown_roles.add(made.key.role)
    assert shown_roles == {member.value for member in model.Role}
    connection = await asyncpg.connect(database_url)
    try:
        unit_rows = {
            row["code"]: row for row in await connection.fetch("select code, kind from units")
        }
        wallet_rows = {
            row["id"]: row
            for row in await connection.fetch(
                "select id, owner_id, owner_kind, status from wallets"
            )
        }
        transfer_rows = {
            row["id"]: row for row in await connection.fetch("select id, kind from transfers")
        }
        kept = {
            name: {
                row[0] for row in await connection.fetch(f"select distinct {column} from {table}")
            }
            for name, (table, column) in stored_in.items()
        }
    finally:
        await connection.close()

    assert len(listed_units) == len(unit_rows)
    assert len(listed_wallets) == len(wallet_rows)
    assert len(listed_transfers) == len(transfer_rows)
    for unit in listed_units:
        assert unit_rows[unit.code]["kind"] == unit.kind, unit
    for each in listed_wallets:
        row = wallet_rows[each.id]
        assert (row["owner_kind"], row["status"]) == (each.owner_kind, each.status), each
        if each.owner_kind == types_pb2.OWNER_KIND_SYSTEM:
            assert row["owner_id"] in model.SystemWallet.__members__, row
    for transfer in listed_transfers:
        assert transfer_rows[transfer.id]["kind"] == transfer.kind, transfer

    for name, numbers in kept.items():
        assert numbers == {member.value for member in core_enums()[name]}, (
            f"rows keep {sorted(numbers)} for {name}: make every member here"
        )
