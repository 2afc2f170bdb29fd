"""Coffer's Python client.

    from coffer.clients import Client, errors

    async with Client("127.0.0.1:50051", caller="shop") as coffer:
        try:
            await coffer.pay(payer_wallet_id=7, payee_wallet_id=9, amount=2599)
        except errors.InsufficientFunds as error:
            ...

`SyncClient` offers the same methods for blocking code; `Tls` says what a client trusts, and
for mTLS what it presents (`Client(…, tls=Tls.from_files(ca="ca.pem"))`); `operations`
builds the operations of a batch (`submit_batch`); `format_amount` prints an amount with its
unit ("25.99 EUR") from the unit and scale every Transfer, Hold and Balance carries. The
protobuf messages are here too: `Transfer`, `Wallet`, `Hold`, `Event`…, and their modules
`types_pb2`, `units_pb2`, `wallets_pb2`, `transfers_pb2`, `holds_pb2`, `events_pb2`,
`grants_pb2`, `reports_pb2`. `watch_events` follows the event stream (`list_events` pages
through it); `list_grants` shows a wallet's credits that expire; `list_usage`, `outstanding`
and `past_balance` read the reports.
"""

from coffer.clients import errors
from coffer.clients.client import (
    Client,
    DebitResult,
    EventPage,
    HoldResult,
    Operations,
    Page,
    SyncClient,
    WalletBalance,
    operations,
)
from coffer.clients.errors import CofferError
from coffer.clients.money import format_amount
from coffer.clients.tls import Tls
from coffer.v1 import (
    events_pb2,
    grants_pb2,
    holds_pb2,
    reports_pb2,
    transfers_pb2,
    types_pb2,
    units_pb2,
    wallets_pb2,
)
from coffer.v1.events_pb2 import Event
from coffer.v1.transfers_pb2 import BatchOutcomes, Operation, OperationResult
from coffer.v1.types_pb2 import Balance, Grant, Hold, Transfer, Unit, Wallet

__all__ = [
    "Balance",
    "BatchOutcomes",
    "Client",
    "CofferError",
    "DebitResult",
    "Event",
    "EventPage",
    "Grant",
    "Hold",
    "HoldResult",
    "Operation",
    "OperationResult",
    "Operations",
    "Page",
    "SyncClient",
    "Tls",
    "Transfer",
    "Unit",
    "Wallet",
    "WalletBalance",
    "errors",
    "events_pb2",
    "format_amount",
    "grants_pb2",
    "holds_pb2",
    "operations",
    "reports_pb2",
    "transfers_pb2",
    "types_pb2",
    "units_pb2",
    "wallets_pb2",
]
