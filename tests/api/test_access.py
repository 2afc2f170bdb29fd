"""Authentication, the role matrix and the scoping of merchants and customers, through real
servers: every RPC of every service, enumerated from the descriptors the server registers,
called with a key of every role."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor

from coffer.clients import Client, Tls, errors
from coffer.clients.client import operations
from coffer.core.model import Role, api_key_prefix, events_watchers_per_principal_max
from coffer.server import roles
from coffer.server.app import Server, Settings, services_described
from coffer.v1 import events_pb2, events_pb2_grpc, transfers_pb2

from support.api import error_info
from support.certificates import Authority

Code = grpc.StatusCode
_keys = itertools.count(1)


def key() -> str:
    return f"access-{next(_keys)}"


def every_rpc() -> list[MethodDescriptor]:
    return [method for service in services_described for method in service.methods]


async def make_key(
    server: Server,
    role: Role,
    *,
    name: str | None = None,
    owner_id: str | None = None,
    expires_at: datetime | None = None,
) -> str:
    """A key made as `coffer keys create` makes one, against the server's database."""
    if owner_id is None and role in (Role.merchant, Role.customer):
        owner_id = f"{role.name}-owner"
    token, _ = await server.gate.access.create_key(
        name=name or role.name,
        role=role,
        owner_id=owner_id,
        expires_at=expires_at,
        created_by="tests",
        actor="tests",
    )
    return token


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def raw_call(
    channel: grpc.aio.Channel, method: MethodDescriptor, request: Any, token: str
) -> Any:
    multicallable = channel.unary_unary(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=lambda message: message.SerializeToString(),
        response_deserializer=message_factory.GetMessageClass(method.output_type).FromString,
    )
    return await multicallable(request, metadata=bearer(token), timeout=10)


@pytest.fixture
async def bare(server: Server) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as opened:
        yield opened


def client(server: Server, token: str | None, **options: Any) -> Client:
    return Client(f"127.0.0.1:{server.port}", api_key=token, **options)


# The matrix ------------------------------------------------------------------------------------


def test_every_rpc_of_every_service_is_in_the_role_matrix() -> None:
    served = {method.full_name for method in every_rpc()}
    assert {"coffer.v1.AccessService.CreateApiKey", "coffer.v1.TransferService.Pay"} <= served
    assert set(roles.allowed) == served, (
        f"not in the role matrix: {sorted(served - set(roles.allowed))}; "
        f"in it, not served: {sorted(set(roles.allowed) - served)}"
    )
    oneof = transfers_pb2.Operation.DESCRIPTOR.oneofs_by_name["operation"]
    kinds = {field.name for field in oneof.fields}
    assert set(roles.batch_operations) == kinds
    assert set(roles.batch_operations.values()) <= served
    assert set(roles.scoped_to_own) <= served


def test_an_rpc_missing_from_the_matrix_is_refused_to_every_role() -> None:
    from coffer.core import errors as core_errors
    from coffer.core.model import Principal

    for role in Role:
        owner = "o" if role in (Role.merchant, Role.customer) else None
        principal = Principal(name="p", role=role, owner_id=owner, scope="@key:1")
        with pytest.raises(core_errors.PermissionDenied, match=r"NewService\.Rpc"):
            roles.authorize(principal, "coffer.v1.NewService.Rpc", None)


async def test_every_role_may_call_exactly_what_the_matrix_allows(
    server: Server, bare: grpc.aio.Channel
) -> None:
    tokens = {role: await make_key(server, role) for role in Role}
    for method in every_rpc():
        request = message_factory.GetMessageClass(method.input_type)()
        for role, token in tokens.items():
            allowed = role in roles.allowed[method.full_name]
            try:
                await raw_call(bare, method, request, token)
            except grpc.aio.AioRpcError as error:
                said = (method.full_name, role.name, error.code(), error.details())
                if allowed:
                    assert error.code() not in (Code.PERMISSION_DENIED, Code.UNAUTHENTICATED), said
                    continue
                assert error.code() == Code.PERMISSION_DENIED, said
                assert error_info(error).reason == "PERMISSION_DENIED", said
                assert role.name in (error.details() or ""), said
                assert method.name in (error.details() or ""), said
            else:
                assert allowed, (method.full_name, role.name)


async def test_a_batch_is_allowed_operation_by_operation(
    server: Server, bare: grpc.aio.Channel
) -> None:
    tokens = {role: await make_key(server, role) for role in Role}
    (submit,) = (method for method in every_rpc() if method.name == "SubmitBatch")
    for kind, rpc in roles.batch_operations.items():
        request = transfers_pb2.SubmitBatchRequest()
        getattr(request.operations.add(), kind).SetInParent()
        for role, token in tokens.items():
            if role in roles.allowed[rpc]:
                response = await raw_call(bare, submit, request, token)
                # Empty, it is refused as invalid, by itself, for what it lacks.
                assert response.results[0].error.reason == "INVALID_ARGUMENT", (kind, role)
            else:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await raw_call(bare, submit, request, token)
                assert raised.value.code() == Code.PERMISSION_DENIED, (kind, role)
                assert kind in (raised.value.details() or ""), (kind, role)


# Scoping ---------------------------------------------------------------------------------------


async def not_found(call: Any) -> errors.NotFound:
    with pytest.raises(errors.NotFound) as raised:
        await call
    return raised.value


async def test_merchants_and_customers_see_others_as_missing(server: Server) -> None:
    """Another owner's wallet, transfer or hold, asked for by a guessed id, answers exactly as
    an id that does not exist: same reason, same message."""
    async with client(server, await make_key(server, Role.admin)) as admin:
        await admin.create_unit(code="EUR", kind="currency", name="Euro", scale=2)

        async def wallet(owner: str, kind: Any = "customer") -> int:
            return (await admin.create_wallet(owner_id=owner, owner_kind=kind, unit="EUR")).id

        alice, bob = await wallet("alice"), await wallet("bob")
        shop, other_shop = await wallet("shop", "merchant"), await wallet("shop-2", "merchant")
        for each in (alice, bob):
            await admin.credit(wallet_id=each, amount=1000)
        others_payment = await admin.pay(payer_wallet_id=bob, payee_wallet_id=other_shop, amount=5)
        others_hold = (await admin.place_hold(wallet_id=bob, amount=5)).hold
        credit_to_shop = await admin.credit(wallet_id=shop, amount=1)
    missing = 9_000_000
    customer_key = await make_key(server, Role.customer, name="alice-app", owner_id="alice")
    merchant_key = await make_key(server, Role.merchant, name="shop-pos", owner_id="shop")

    async with client(server, customer_key, retries_max=0) as customer:
        for call in (customer.get_wallet, customer.get_balance):
            for wallet_id in (bob, shop, missing):
                error = await not_found(call(wallet_id=wallet_id))
                assert (error.reason, error.message) == (
                    "WALLET_NOT_FOUND",
                    f"wallet {wallet_id} does not exist",
                )
        for transfer_id in (others_payment.id, missing):
            error = await not_found(customer.get_transfer(transfer_id=transfer_id))
            assert (error.reason, error.message) == (
                "TRANSFER_NOT_FOUND",
                f"transfer {transfer_id} does not exist",
            )
        for hold_id in (others_hold.id, missing):
            error = await not_found(customer.get_hold(hold_id=hold_id))
            assert (error.reason, error.message) == (
                "HOLD_NOT_FOUND",
                f"hold {hold_id} does not exist",
            )
        for wallet_id in (bob, missing):
            for write in (
                customer.debit(wallet_id=wallet_id, amount=1, idempotency_key=key()),
                customer.pay(payer_wallet_id=wallet_id, payee_wallet_id=shop, amount=1),
                customer.place_hold(wallet_id=wallet_id, amount=1),
            ):
                error = await not_found(write)
                assert (error.reason, error.message) == (
                    "WALLET_NOT_FOUND",
                    f"wallet {wallet_id} does not exist",
                )
        # Its own: reads, a debit, a payment to any merchant, a hold towards the shop.
        assert (await customer.get_wallet(wallet_id=alice)).owner_id == "alice"
        assert [each.id for each in (await customer.list_wallets()).items] == [alice]
        assert (await customer.list_wallets(owner_id="bob")).items == []
        assert (await customer.list_transfers(wallet_id=bob)).items == []
        with pytest.raises(errors.InvalidArgument) as raised:
            await customer.list_transfers()
        assert raised.value.field == "wallet_id"
        await customer.debit(wallet_id=alice, amount=10)
        refunded = await customer.pay(payer_wallet_id=alice, payee_wallet_id=shop, amount=100)
        towards_shop = await customer.place_hold(wallet_id=alice, amount=30, target_wallet_id=shop)
        assert len((await customer.list_transfers(wallet_id=alice)).items) == 4

    async with client(server, merchant_key, retries_max=0) as merchant:
        error = await not_found(merchant.void(transfer_id=others_payment.id))
        assert (error.reason, error.message) == (
            "TRANSFER_NOT_FOUND",
            f"transfer {others_payment.id} does not exist",
        )
        error = await not_found(merchant.capture_hold(hold_id=others_hold.id))
        assert error.message == f"hold {others_hold.id} does not exist"
        error = await not_found(
            merchant.withdraw(wallet_id=other_shop, amount=1, funding_source="iban:1")
        )
        assert error.message == f"wallet {other_shop} does not exist"
        # What it sees but may not touch: a credit into its wallet is no payment to refund.
        with pytest.raises(errors.PermissionDenied, match="only payments"):
            await merchant.void(transfer_id=credit_to_shop.id)
        # A refund, a capture of a hold towards it, a withdrawal.
        await merchant.void(transfer_id=refunded.id)
        await merchant.capture_hold(hold_id=towards_shop.hold.id)
        await merchant.withdraw(wallet_id=shop, amount=1, funding_source="iban:1")
        assert (await merchant.get_transfer(transfer_id=refunded.id)).voided_by_transfer_id


async def test_a_batch_with_an_operation_the_role_may_not_do_applies_nothing(
    server: Server,
) -> None:
    async with client(server, await make_key(server, Role.admin)) as admin:
        await admin.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
        alice = (await admin.create_wallet(owner_id="alice", owner_kind="customer", unit="EUR")).id
        await admin.credit(wallet_id=alice, amount=1000)
        before = (await admin.list_transfers(wallet_id=alice)).items
    token = await make_key(server, Role.customer, owner_id="alice")
    async with client(server, token, retries_max=0) as customer:
        with pytest.raises(errors.PermissionDenied, match="credit"):
            await customer.submit_batch(
                [
                    operations.debit(wallet_id=alice, amount=10),
                    operations.credit(wallet_id=alice, amount=10),
                ]
            )
        assert (await customer.list_transfers(wallet_id=alice)).items == before
        assert (await customer.get_balance(wallet_id=alice)).balance.posted == 1000


async def test_a_merchant_batch_with_a_void_it_may_not_make_applies_nothing(
    server: Server,
) -> None:
    """A merchant may void only payments into its wallets, and capture or release only holds
    towards them: a batch holding another void or capture of what it sees is refused whole,
    before its other operations are applied."""
    async with client(server, await make_key(server, Role.admin)) as admin:
        await admin.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
        shop = (await admin.create_wallet(owner_id="shop", owner_kind="merchant", unit="EUR")).id
        alice = (await admin.create_wallet(owner_id="alice", owner_kind="customer", unit="EUR")).id
        credit = await admin.credit(wallet_id=shop, amount=1000)
        await admin.credit(wallet_id=alice, amount=1000)
        payment = await admin.pay(payer_wallet_id=alice, payee_wallet_id=shop, amount=100)
        from_shop = (await admin.place_hold(wallet_id=shop, amount=5, target_wallet_id=alice)).hold
    token = await make_key(server, Role.merchant, owner_id="shop")
    async with client(server, token, retries_max=0) as merchant:
        before = (await merchant.list_transfers(wallet_id=shop)).items
        withdraw = operations.withdraw(wallet_id=shop, amount=10, funding_source="iban:1")
        for forbidden, named in (
            (operations.void(transfer_id=credit.id), f"transfer {credit.id}"),
            (operations.capture_hold(hold_id=from_shop.id), f"hold {from_shop.id}"),
            (operations.release_hold(hold_id=from_shop.id), f"hold {from_shop.id}"),
        ):
            with pytest.raises(errors.PermissionDenied, match=named):
                await merchant.submit_batch([withdraw, forbidden])
            assert (await merchant.list_transfers(wallet_id=shop)).items == before
        # A refund is its to make, in a batch too.
        results = await merchant.submit_batch([withdraw, operations.void(transfer_id=payment.id)])
        assert [(result.HasField("error"), len(result.transfers)) for result in results] == [
            (False, 1),
            (False, 1),
        ], results


# Credentials -----------------------------------------------------------------------------------


async def every_event(listing: Client, **filters: Any) -> list[Any]:
    """Every event the client may see, from the oldest kept on, through its pages."""
    found, cursor = [], ""
    while True:
        page = await listing.list_events(after_cursor=cursor, page_size=1000, **filters)
        found.extend(page.events)
        cursor = page.next_cursor
        if page.caught_up:
            return found


async def test_access_changes_are_audit_events_that_scoped_principals_never_see(
    server: Server,
) -> None:
    """Each key made or revoked and each certificate mapped or unmapped is an event naming its
    actor (the scope of the principal that did it; the database commands name themselves),
    seen by the roles that see every wallet; a customer sees the events of its own wallets
    alone, listed or watched, whatever its filter asks."""
    admin_key = await make_key(server, Role.admin, name="ops")
    admin_scope = "@key:" + admin_key.split("_")[1]
    async with client(server, admin_key) as admin:
        made = await admin.create_api_key(name="alice-app", role="customer", owner_id="alice")
        old = await admin.create_api_key(name="alice-old", role="customer", owner_id="alice")
        await admin.map_certificate(subject="pos-1", name="pos", role="service")
        await admin.unmap_certificate(subject="pos-1")
        await admin.revoke_api_key(key_id=old.key.id)
        await admin.revoke_api_key(key_id=old.key.id)  # revoked already: no second event
        audit_types: Any = (
            "api_key_created",
            "api_key_revoked",
            "certificate_mapped",
            "certificate_unmapped",
        )
        audit = [
            (event.type, event.actor, event.WhichOneof("body"), list(event.wallet_ids))
            for event in await every_event(admin, types=audit_types)
        ]
        assert audit == [
            (events_pb2.EVENT_TYPE_API_KEY_CREATED, "tests", "api_key", []),
            (events_pb2.EVENT_TYPE_API_KEY_CREATED, admin_scope, "api_key", []),
            (events_pb2.EVENT_TYPE_API_KEY_CREATED, admin_scope, "api_key", []),
            (events_pb2.EVENT_TYPE_CERTIFICATE_MAPPED, admin_scope, "certificate_mapping", []),
            (events_pb2.EVENT_TYPE_CERTIFICATE_UNMAPPED, admin_scope, "certificate_mapping", []),
            (events_pb2.EVENT_TYPE_API_KEY_REVOKED, admin_scope, "api_key", []),
        ]
        keys = [event.api_key for event in (await every_event(admin, types=audit_types))[:3]]
        assert [key.name for key in keys] == ["ops", "alice-app", "alice-old"]
        # The records, never a secret.
        assert made.api_key not in str(await every_event(admin))

        await admin.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
        alice = (await admin.create_wallet(owner_id="alice", owner_kind="customer", unit="EUR")).id
        bob = (await admin.create_wallet(owner_id="bob", owner_kind="customer", unit="EUR")).id
        shop = (await admin.create_wallet(owner_id="alice", owner_kind="merchant", unit="EUR")).id
        for wallet_id in (alice, bob, shop):
            await admin.credit(wallet_id=wallet_id, amount=100)
        # Paid to another owner: the customer sees its own balance after, not the other's,
        # nor who acted.
        await admin.pay(payer_wallet_id=alice, payee_wallet_id=shop, amount=30)
        manager_key = await make_key(server, Role.manager)
        every = await every_event(admin)
        audit_count = len(await every_event(admin, types=audit_types))
    # Staff other than administrators do not see the audit trail of access.
    async with client(server, manager_key) as manager:
        assert await every_event(manager, types=audit_types) == []
        assert len(await every_event(manager)) == len(every) - audit_count
    async with client(server, made.api_key) as customer:
        seen = await every_event(customer)
        assert [(event.type, alice in event.wallet_ids) for event in seen] == [
            (events_pb2.EVENT_TYPE_WALLET_CREATED, True),
            (events_pb2.EVENT_TYPE_TRANSFER, True),
            (events_pb2.EVENT_TYPE_TRANSFER, True),
        ]
        credited, paid = seen[1].transfer, seen[2].transfer
        assert not credited.HasField("source_balance")
        assert credited.target_balance.available == 100
        assert paid.source_balance.available == 70 and not paid.HasField("target_balance")
        assert [event.actor for event in seen] == ["", "", ""]
        # Another owner's wallets, or another kind's of the same owner id, by filter: nothing.
        assert await every_event(customer, wallet_ids=[bob, shop]) == []
        assert await every_event(customer, owner_id="bob") == []
        watched = []
        async for event in customer.watch_events():
            watched.append(event)
            if len(watched) == len(seen):
                break
        assert watched == seen


async def test_missing_invalid_revoked_and_expired_credentials(server: Server) -> None:
    admin_key = await make_key(server, Role.admin)
    server.gate.credentials_made()
    async with client(server, None, retries_max=0) as anonymous:
        with pytest.raises(errors.CredentialsMissing):
            await anonymous.list_units()
    # Made up: an id past int64 (the largest id a key may have) too.
    for wrong in (
        "coffer_1_" + "A" * 43,
        "coffer_9999999999999999999_" + "A" * 43,
        "not-a-key",
        admin_key[:-1] + "B",
    ):
        async with client(server, wrong, retries_max=0) as guessing:
            with pytest.raises(errors.CredentialsInvalid):
                await guessing.list_units()
    async with client(server, admin_key) as admin:
        made = await admin.create_api_key(name="billing", role="service")
        assert made.api_key.startswith(f"coffer_{made.key.id}_")
        async with client(server, made.api_key, retries_max=0) as billing:
            await billing.list_units()
            revoked = await admin.revoke_api_key(key_id=made.key.id)
            assert revoked.HasField("revoked_at")
            # Revoked through this server: refused at once.
            with pytest.raises(errors.CredentialsRevoked):
                await billing.list_units()
        soon = datetime.now(UTC) + timedelta(seconds=1)
        brief = await admin.create_api_key(name="brief", role="service", expires_at=soon)
        async with client(server, brief.api_key, retries_max=0) as short_lived:
            await short_lived.list_units()
            await asyncio.sleep((soon - datetime.now(UTC)).total_seconds() + 0.1)
            with pytest.raises(errors.CredentialsExpired):
                await short_lived.list_units()
        listed = [each.name for each in (await admin.list_api_keys()).items]
        assert listed == ["admin", "billing", "brief"]
        with pytest.raises(errors.ApiKeyNotFound):
            await admin.revoke_api_key(key_id=999)
        with pytest.raises(errors.InvalidArgument) as raised:
            await admin.create_api_key(name="shop", role="merchant")
        assert raised.value.field == "owner_id"


async def test_a_revocation_elsewhere_is_seen_within_the_cache_time(
    server: Server, database_url: str
) -> None:
    """Two servers on one database, each with its own cache: a key revoked through one is
    refused by the other within the cache's time."""
    other = await Server.start(Settings(database_url=database_url, listen="127.0.0.1:0"))
    try:
        token = await make_key(server, Role.service)
        admin_key = await make_key(server, Role.admin)
        async with client(other, token, retries_max=0) as elsewhere:
            await elsewhere.list_units()  # cached there
            async with client(server, admin_key) as admin:
                key_id = int(token.split("_")[1])
                await admin.revoke_api_key(key_id=key_id)
            revoked_at = asyncio.get_running_loop().time()
            ttl_s = other.settings.credentials_cache_ttl_s
            while True:
                try:
                    await elsewhere.list_units()
                except errors.CredentialsRevoked:
                    break
                assert asyncio.get_running_loop().time() - revoked_at < ttl_s + 0.5
                await asyncio.sleep(0.05)
    finally:
        await other.stop()


async def test_open_mode_only_on_loopback_and_only_without_credentials(
    server: Server, database_url: str
) -> None:
    # On loopback, no credential yet: open, as the local administrator.
    async with client(server, None) as local:
        await local.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
        made = await local.create_api_key(name="first-admin", role="admin")
        # Made through this server: the open mode ends at once.
        with pytest.raises(errors.CredentialsMissing):
            await local.list_units()
    async with client(server, made.api_key) as admin:
        # Made by the local principal, named by the client's caller label.
        assert [each.created_by for each in (await admin.list_api_keys()).items] == ["default"]
        # Revoked, unmapped: credentials were made, and the open mode stays over.
        await admin.map_certificate(subject="pos-1", name="pos", role="service")
        await admin.unmap_certificate(subject="pos-1")
        await admin.revoke_api_key(key_id=made.key.id)
    assert await server.gate.access.credentials_exist()
    # Off loopback, authentication is on even in a database without credentials.
    exposed = await Server.start(
        Settings(database_url=database_url, listen="0.0.0.0:0", insecure=True)
    )
    try:
        assert not exposed.gate.open_allowed
        async with Client(f"127.0.0.1:{exposed.port}", retries_max=0) as anonymous:
            with pytest.raises(errors.CredentialsMissing):
                await anonymous.list_units()
    finally:
        await exposed.stop()


async def test_off_loopback_without_any_credential_everything_is_unauthenticated(
    database_url: str,
) -> None:
    exposed = await Server.start(
        Settings(database_url=database_url, listen="0.0.0.0:0", insecure=True)
    )
    try:
        assert not await exposed.gate.open()
        async with Client(f"127.0.0.1:{exposed.port}", retries_max=0) as anonymous:
            for call in (anonymous.list_units(), anonymous.list_api_keys()):
                with pytest.raises(errors.CredentialsMissing):
                    await call
    finally:
        await exposed.stop()


async def test_idempotency_keys_are_scoped_to_the_principal(server: Server) -> None:
    async with client(server, await make_key(server, Role.admin)) as admin:
        await admin.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
        wallet = (await admin.create_wallet(owner_id="a", owner_kind="customer", unit="EUR")).id
    first, second = await make_key(server, Role.service), await make_key(server, Role.service)
    async with client(server, first) as one, client(server, second) as two:
        credited = await one.credit(wallet_id=wallet, amount=5, idempotency_key="order-1")
        other = await two.credit(wallet_id=wallet, amount=5, idempotency_key="order-1")
        assert credited.id != other.id
        assert await one.credit(wallet_id=wallet, amount=5, idempotency_key="order-1") == credited
        assert (await one.get_balance(wallet_id=wallet)).balance.posted == 10


async def test_performed_by_defaults_to_the_principals_name(server: Server) -> None:
    async with client(server, await make_key(server, Role.admin)) as admin:
        await admin.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
        wallet = (await admin.create_wallet(owner_id="a", owner_kind="customer", unit="EUR")).id
    async with client(server, await make_key(server, Role.service, name="billing")) as billing:
        assert (await billing.credit(wallet_id=wallet, amount=5)).performed_by == "billing"
        named = await billing.credit(wallet_id=wallet, amount=5, performed_by="ops:kim")
        assert named.performed_by == "ops:kim"


async def test_rates_refuse_with_a_retry_after_hint(database_url: str) -> None:
    limited = await Server.start(
        Settings(
            database_url=database_url,
            listen="127.0.0.1:0",
            rate_limit_calls_per_s=1,
            rate_limit_burst=2,
            authentication_failures_per_s=1,
        )
    )
    try:
        token = await make_key(limited, Role.service)
        async with client(limited, token, retries_max=0) as fast:
            await fast.list_units()
            await fast.list_units()
            with pytest.raises(errors.RateLimited) as raised:
                await fast.list_units()
            assert raised.value.retry_after_ms is not None
            assert 0 < raised.value.retry_after_ms <= 1000
            # A refused call counts too: one for its role as well.
            await asyncio.sleep(raised.value.retry_after_ms / 1000)
            with pytest.raises(errors.PermissionDenied):
                await fast.list_api_keys()
            with pytest.raises(errors.RateLimited):
                await fast.list_units()
        # Guessing: two failures (the burst), then refused unchecked, whatever the key.
        async with client(limited, "coffer_1_" + "A" * 43, retries_max=0) as guessing:
            for _ in range(2):
                with pytest.raises(errors.CredentialsInvalid):
                    await guessing.list_units()
            with pytest.raises(errors.RateLimited, match="failed authentications"):
                await guessing.list_units()
        # The typed client waits the hint and retries.
        async with client(limited, token, retries_max=3) as patient:
            for _ in range(3):
                await patient.list_units()
    finally:
        await limited.stop()


async def test_a_host_guessing_keys_does_not_lock_out_the_keys_in_use(database_url: str) -> None:
    """Behind one address (a NAT, a TLS proxy), a client guessing keys empties the host's
    bucket of failures; a key already known to the server goes on working past its cache
    time, while unknown ones are refused unchecked."""
    guarded = await Server.start(
        Settings(
            database_url=database_url,
            listen="127.0.0.1:0",
            authentication_failures_per_s=0.1,
            credentials_cache_ttl_s=0.1,
        )
    )
    try:
        token = await make_key(guarded, Role.service)
        async with client(guarded, token, retries_max=0) as known:
            await known.list_units()
            async with client(guarded, "coffer_1_" + "A" * 43, retries_max=0) as guessing:
                with pytest.raises(errors.CredentialsInvalid):
                    await guessing.list_units()
                with pytest.raises(errors.RateLimited, match="failed authentications"):
                    await guessing.list_units()
            # Past its cache time: looked up again, not refused with the host.
            await asyncio.sleep(0.2)
            await known.list_units()
        other = await make_key(guarded, Role.service)
        async with client(guarded, other, retries_max=0) as unknown_yet:
            with pytest.raises(errors.RateLimited, match="failed authentications"):
                await unknown_yet.list_units()
    finally:
        await guarded.stop()


async def test_keys_and_authorization_values_are_never_logged(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        admin_key = await make_key(server, Role.admin)
        async with client(server, admin_key) as admin:
            made = await admin.create_api_key(name="billing", role="service")
            await admin.revoke_api_key(key_id=made.key.id)
        for token in (made.api_key, admin_key[:-2] + "xx", "Bearer-garbage"):
            async with client(server, token, retries_max=0) as wrong:
                with pytest.raises(errors.Unauthenticated):
                    await wrong.list_units()
    logged = caplog.text
    assert caplog.records, "the server logs nothing at DEBUG: this test would show nothing"
    # A key is the prefix, its id, "_", then its secret in base64url (which may hold "_").
    secrets = [
        key.removeprefix(api_key_prefix).split("_", 1)[1] for key in (admin_key, made.api_key)
    ]
    for secret in (admin_key, made.api_key, *secrets):
        assert secret not in logged
    assert "Bearer" not in logged


async def test_a_client_certificate_authenticates_the_principal_it_is_mapped_to(
    database_url: str, tmp_path: Path
) -> None:
    authority = Authority(tmp_path, "clients")
    server_certificate = authority.issue_server()
    mutual = await Server.start(
        Settings(
            database_url=database_url,
            listen="127.0.0.1:0",
            tls_cert=str(server_certificate.cert),
            tls_key=str(server_certificate.key),
            tls_client_ca=str(authority.cert),
        )
    )
    target = f"127.0.0.1:{mutual.port}"

    def tls(common_name: str) -> Tls:
        issued = authority.issue_client(common_name)
        return Tls.from_files(ca=authority.cert, cert=issued.cert, key=issued.key)

    try:
        admin_key = await make_key(mutual, Role.admin)
        # A key goes first: the certificate it connects with is mapped to no one.
        async with Client(target, api_key=admin_key, tls=tls("admin-desk")) as admin:
            await admin.create_unit(code="EUR", kind="currency", name="Euro", scale=2)
            shop = await admin.create_wallet(owner_id="shop", owner_kind="merchant", unit="EUR")
            other = await admin.create_wallet(owner_id="other", owner_kind="merchant", unit="EUR")
            await admin.credit(wallet_id=shop.id, amount=10)
            await admin.map_certificate(
                subject="pos-7", name="shop-pos", role="merchant", owner_id="shop"
            )
        options: dict[str, Any] = {
            "retries_max": 0,
            "channel_options": [("grpc.use_local_subchannel_pool", 1)],
        }
        async with Client(target, tls=tls("pos-7"), **options) as pos:
            assert [each.id for each in (await pos.list_wallets()).items] == [shop.id]
            with pytest.raises(errors.WalletNotFound):
                await pos.get_wallet(wallet_id=other.id)
            with pytest.raises(errors.PermissionDenied):
                await pos.credit(wallet_id=shop.id, amount=1)
            withdrawn = await pos.withdraw(
                wallet_id=shop.id, amount=1, funding_source="iban:1", idempotency_key="pos-w-1"
            )
        assert withdrawn.performed_by == "shop-pos"
        # Mapped again, to another owner: a new idempotency scope, where the first mapping's
        # keys replay nothing.
        async with Client(target, api_key=admin_key, tls=tls("admin-desk")) as admin:
            await admin.credit(wallet_id=other.id, amount=10)
            await admin.map_certificate(
                subject="pos-7", name="other-pos", role="merchant", owner_id="other"
            )
        async with Client(target, tls=tls("pos-7"), **options) as pos:
            again = await pos.withdraw(
                wallet_id=other.id, amount=1, funding_source="iban:1", idempotency_key="pos-w-1"
            )
            assert again.id != withdrawn.id and again.source_wallet_id == other.id
            with pytest.raises(errors.WalletNotFound):
                await pos.get_wallet(wallet_id=shop.id)
        async with Client(target, tls=tls("pos-8"), **options) as unmapped:
            with pytest.raises(errors.CredentialsInvalid, match="pos-8"):
                await unmapped.list_units()
    finally:
        await mutual.stop()


def test_coffer_serve_refuses_plaintext_off_loopback_without_insecure(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from coffer.server.cli import serve

    assert serve(["--listen", "0.0.0.0:0", "--database-url", "postgresql://nobody@/none"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("coffer serve: --listen must be a loopback address to serve plaintext")
    assert "--insecure" in err and "--tls-cert" in err


async def test_one_principal_may_not_take_every_watcher(
    server: Server, bare: grpc.aio.Channel
) -> None:
    """A principal has at most `events_watchers_per_principal_max` streams of events at once;
    past them OVERLOADED, while another principal still watches; one ended frees its place."""
    greedy, other = await make_key(server, Role.admin), await make_key(server, Role.admin)
    stub = events_pb2_grpc.EventServiceStub(bare)

    async def opened(token: str) -> Any:
        """A stream, once the server has taken it: its first event (a key made, which
        administrators see)."""
        stream = stub.WatchEvents(events_pb2.WatchEventsRequest(), metadata=bearer(token))
        await stream.read()
        return stream

    streams = [await opened(greedy) for _ in range(events_watchers_per_principal_max)]
    try:
        refused = stub.WatchEvents(events_pb2.WatchEventsRequest(), metadata=bearer(greedy))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await refused.read()
        assert raised.value.code() == Code.RESOURCE_EXHAUSTED
        assert error_info(raised.value).reason == "OVERLOADED"
        streams.append(await opened(other))
        streams.pop(0).cancel()
        async with asyncio.timeout(10):
            while True:
                try:
                    streams.append(await opened(greedy))
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.05)
    finally:
        for stream in streams:
            stream.cancel()
