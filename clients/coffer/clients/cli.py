"""The operator's command line, on top of SyncClient: `coffer COMMAND …`.

The server's distribution adds its own commands (`serve`, `migrate`, `bench`, and `keys` and
`certificates` against the database itself) through the entry point group `coffer.commands`:
each is a function taking the arguments after its name, and returning the exit code. `keys`
and `certificates` are also the client's, through the server's AccessService: with an API key
(`--api-key` or COFFER_API_KEY) they run here, even where the server's are installed.

Exit codes: 0 done, 1 the server refused (a domain error such as INSUFFICIENT_FUNDS, or
credentials refused), 2 bad usage, 3 the server could not be reached in time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2

from coffer.clients import errors, limits
from coffer.clients.client import (
    Page,
    SyncClient,
    expiring_within_days_default,
    target_default,
    timeout_s_default,
)
from coffer.clients.tls import Tls
from coffer.v1 import (
    access_pb2,
    events_pb2,
    grants_pb2,
    holds_pb2,
    reports_pb2,
    transfers_pb2,
    types_pb2,
    units_pb2,
    wallets_pb2,
)

__all__ = [
    "add_principal_options",
    "argument_parser",
    "deadline_s_max",
    "main",
    "moment",
]

program = "coffer"
# The entry point group through which other distributions add commands to `coffer`.
command_entry_points = "coffer.commands"
target_environment_variable = "COFFER_TARGET"
caller_environment_variable = "COFFER_CALLER"
api_key_environment_variable = "COFFER_API_KEY"
api_key_option = "--api-key"
# Commands both the client (through the RPC, with an API key) and the server (against the
# database) have.
access_commands = frozenset({"keys", "certificates"})
caller_default = "cli"
# The TLS options' variables. The client's certificate and key say CLIENT, so that a shell
# that runs `coffer serve` with COFFER_TLS_CERT and COFFER_TLS_KEY (the server's) does not
# make every command present the server's certificate as its own.
tls_environment_variables = {
    "tls_ca": "COFFER_TLS_CA",
    "tls_cert": "COFFER_TLS_CLIENT_CERT",
    "tls_key": "COFFER_TLS_CLIENT_KEY",
}
exit_ok = 0
exit_refused = 1
exit_usage = 2
exit_unreachable = 3
# The longest deadline --deadline takes: a day.
deadline_s_max = 24 * 3600.0
list_limit_default = 100
history_limit_default = 20
list_limit_max = 10_000
amount_help = "an integer amount in the unit's minor units (e.g. cents: 1500 is EUR 15.00)"

_Item = TypeVar("_Item")


@dataclass(frozen=True, slots=True)
class _Output:
    # Printed with --json: the RPC's response message, as proto3 JSON.
    message: Message
    # Printed otherwise; called only then, so that it may ask the server for more.
    render: Callable[[], list[str]]
    exit_code: int = exit_ok
    # The command printed as it went (a stream followed): nothing more to print.
    printed: bool = False


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    installed = _installed_commands()
    if argv and argv[0] in installed and not (argv[0] in access_commands and _api_key_given(argv)):
        command: Callable[[list[str]], int] = installed[argv[0]].load()
        return command(argv[1:])
    command_line = argument_parser(installed)
    try:
        arguments = command_line.parse_args(argv)
    except SystemExit as exit_:
        # --help exits 0, bad usage 2; return the code rather than leave the interpreter.
        return exit_.code if isinstance(exit_.code, int) else exit_usage
    if arguments.command is None:
        command_line.print_help(sys.stderr)
        return exit_usage
    try:
        client = SyncClient(
            arguments.target,
            caller=arguments.caller,
            api_key=arguments.api_key or None,
            timeout_s=arguments.deadline,
            tls=_tls(arguments),
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_usage
    try:
        with client:
            output: _Output = arguments.handler(client, arguments)
            if output.printed:
                pass
            elif arguments.json:
                print(
                    json_format.MessageToJson(
                        output.message, always_print_fields_with_no_presence=True
                    )
                )
            else:
                for line in output.render():
                    print(line)
            return output.exit_code
    except _BadUsage as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_usage
    except (errors.Unavailable, errors.DeadlineExceeded) as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_unreachable
    except errors.CofferError as error:
        print(f"error: {error}", file=sys.stderr)
        return exit_refused
    except KeyboardInterrupt:
        return 130


class _BadUsage(Exception):
    """Options that parse one by one but not together: exit 2, nothing sent."""


# The parser.


def _api_key_given(argv: list[str]) -> bool:
    return bool(os.environ.get(api_key_environment_variable)) or any(
        each == api_key_option or each.startswith(api_key_option + "=") for each in argv
    )


def _installed_commands() -> dict[str, importlib.metadata.EntryPoint]:
    """Commands other distributions add to `coffer` (the server's), by name."""
    return {
        entry.name: entry for entry in importlib.metadata.entry_points(group=command_entry_points)
    }


def argument_parser(
    installed: dict[str, importlib.metadata.EntryPoint] | None = None,
) -> argparse.ArgumentParser:
    """The parser of the `coffer` command line; `installed`: the commands other distributions
    add (by default, those of the `coffer.commands` entry points), named in its help."""
    if installed is None:
        installed = _installed_commands()
    if installed:
        more = (
            "Also installed: "
            + ", ".join(f"`{program} {name}`" for name in sorted(installed))
            + "."
        )
    else:
        more = "The server's commands (`serve`, `migrate`, `bench`) come with the server."
    parser = argparse.ArgumentParser(
        prog=program,
        description="Operate a Coffer server: units, wallets, transfers, holds. "
        "Amounts are integers in the unit's minor units (cents for EUR).",
        epilog=f"{more} Exit codes: 0 done, 1 refused by the server, 2 bad usage, "
        "3 server unreachable.",
    )
    _add_global_options(parser, suppress=False)
    # The same options after the command (`coffer balance 7 --json`), without defaults there
    # so as not to override the ones given before it. `hold place` has a --target of its own
    # (the wallet a capture goes to): there the server's --target goes before the command.
    shared = argparse.ArgumentParser(add_help=False)
    _add_global_options(shared, suppress=True)
    shared_but_target = argparse.ArgumentParser(add_help=False)
    _add_global_options(shared_but_target, suppress=True, target=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", title="operator commands")

    def command(
        group: Any,
        name: str,
        help: str,
        handler: Callable[[SyncClient, argparse.Namespace], _Output],
        *,
        target: bool = True,
    ) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(
            name, help=help, description=help, parents=[shared if target else shared_but_target]
        )
        sub.set_defaults(handler=handler)
        return sub

    def group(name: str, help: str) -> Any:
        sub = commands.add_parser(name, help=help, description=help)
        return sub.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)

    units = group("unit", "units: currencies and credit types")
    sub = command(units, "create", "create a unit (idempotent by code)", _unit_create)
    sub.add_argument("code", metavar="CODE", help='e.g. "EUR", or a credit type such as "seat"')
    sub.add_argument("--kind", required=True, choices=_names(types_pb2.UnitKind))
    sub.add_argument(
        "--scale", required=True, type=_scale, help="minor-unit digits: 2 for EUR, 0 for seats"
    )
    sub.add_argument("--name", required=True, help='e.g. "Euro"')
    sub.add_argument("--plural", default="", help='e.g. "Euros"')
    sub.add_argument("--description", default="")
    sub.add_argument(
        "--validity",
        default="",
        type=_validity,
        metavar="DURATION",
        help="how long its credits that name no expiry stay valid, an ISO 8601 duration:"
        " P6M (six months), P1Y, P30D, PT12H (default: no expiry)",
    )
    command(units, "list", "list the units", _unit_list)

    wallets = group("wallet", "wallets")
    sub = command(wallets, "create", "create a wallet", _wallet_create)
    sub.add_argument("--owner", required=True, metavar="ID", help="the owner's id in your system")
    sub.add_argument("--owner-kind", required=True, choices=["customer", "merchant"])
    sub.add_argument("--unit", required=True, metavar="CODE")
    sub.add_argument(
        "--minimum",
        type=_int64,
        metavar="N",
        help="lowest available balance allowed, in minor units (default 0; negative: overdraft)",
    )
    _add_metadata_option(sub)
    _add_alert_options(sub)
    sub.add_argument("--idempotency-key", metavar="KEY", help="default: a fresh random key")
    sub = command(wallets, "show", "show a wallet", _wallet_show)
    sub.add_argument("wallet", type=_identifier, metavar="ID")
    sub = command(wallets, "list", "list wallets, oldest first", _wallet_list)
    sub.add_argument("--owner", default="", metavar="ID")
    sub.add_argument("--unit", default="", metavar="CODE")
    sub.add_argument("--limit", type=_limit, default=list_limit_default, metavar="N")
    sub = command(wallets, "cancel", "cancel an empty wallet", _wallet_cancel)
    sub.add_argument("wallet", type=_identifier, metavar="ID")
    sub = command(
        wallets,
        "alert",
        "set a wallet's low-balance alert (events LOW_BALANCE, TOP_UP_REQUESTED), or clear it",
        _wallet_alert,
    )
    sub.add_argument("wallet", type=_identifier, metavar="ID")
    _add_alert_options(sub)
    sub.add_argument("--clear", action="store_true", help="no alert any more")

    sub = command(commands, "credit", "the operator funds a wallet", _credit)
    _add_wallet_amount(sub)
    _add_terms_options(sub)
    _add_mutation_options(sub, reference=True)
    sub = command(commands, "debit", "a wallet spends, back to the operator", _debit)
    _add_wallet_amount(sub)
    sub.add_argument(
        "--mode",
        choices=_names(types_pb2.DebitMode),
        default="all-or-nothing",
        help="up-to: debit what is available and report the rest (default: all-or-nothing)",
    )
    _add_mutation_options(sub, reference=True)
    sub = command(commands, "transfer", "move an amount between two wallets of one unit", _transfer)
    sub.add_argument("source_wallet", type=_identifier, metavar="SOURCE", help="the source wallet")
    sub.add_argument("target_wallet", type=_identifier, metavar="TARGET", help="the target wallet")
    sub.add_argument("amount", type=_int64, metavar="AMOUNT", help=amount_help)
    _add_mutation_options(sub, reference=True)
    sub = command(commands, "deposit", "from an external funding source into a wallet", _deposit)
    _add_wallet_amount(sub)
    sub.add_argument(
        "--source", required=True, metavar="REF", help="the funding source, e.g. a bank account"
    )
    _add_terms_options(sub)
    _add_mutation_options(sub, reference=False)
    sub = command(
        commands, "withdraw", "from a wallet out to an external funding source", _withdraw
    )
    _add_wallet_amount(sub)
    sub.add_argument(
        "--source", required=True, metavar="REF", help="the funding source, e.g. a bank account"
    )
    _add_mutation_options(sub, reference=False)
    sub = command(commands, "pay", "a customer pays a merchant", _pay)
    sub.add_argument("payer", type=_identifier, metavar="PAYER", help="the customer's wallet")
    sub.add_argument("payee", type=_identifier, metavar="PAYEE", help="the merchant's wallet")
    sub.add_argument("amount", type=_int64, metavar="AMOUNT", help=amount_help)
    _add_mutation_options(sub, reference=True)

    holds = group("hold", "holds: reserve now, capture or release later")
    sub = command(
        holds, "place", "reserve an amount of a wallet's balance", _hold_place, target=False
    )
    _add_wallet_amount(sub)
    sub.add_argument(
        "--target",
        dest="target_wallet",
        type=_identifier,
        default=0,
        metavar="WALLET",
        help="where a capture goes (default: the operator)",
    )
    sub.add_argument(
        "--timeout",
        type=_hold_timeout,
        metavar="SECONDS",
        help=f"until the hold releases itself (default {limits.hold_timeout_s_default})",
    )
    _add_mutation_options(sub, reference=True)
    sub = command(holds, "capture", "post all or part of a hold", _hold_capture)
    sub.add_argument("hold", type=_identifier, metavar="HOLD")
    sub.add_argument(
        "--amount", type=_int64, metavar="N", help=f"default: all of it; {amount_help}"
    )
    _add_mutation_options(sub, reference=True)
    sub = command(holds, "release", "give a hold back", _hold_release)
    sub.add_argument("hold", type=_identifier, metavar="HOLD")
    _add_mutation_options(sub, reference=False)
    sub = command(holds, "show", "show a hold", _hold_show)
    sub.add_argument("hold", type=_identifier, metavar="HOLD")

    sub = command(commands, "void", "reverse a transfer with a new one", _void)
    sub.add_argument("transfer", type=_identifier, metavar="TRANSFER")
    sub.add_argument(
        "--expires-at",
        type=moment,
        metavar="ISO",
        help="for the void of an expiration, and required there: the restored grant's new "
        "expiry, e.g. 2027-06-30T23:59:59Z",
    )
    _add_mutation_options(sub, reference=False)
    sub = command(commands, "balance", "a wallet's balance, now, in the past or to come", _balance)
    sub.add_argument("wallet", type=_identifier, metavar="WALLET")
    sub.add_argument(
        "--at",
        type=moment,
        metavar="ISO",
        help="the balance at that time: in the past, posted and pending then, from the journal "
        "(e.g. 2026-11-28T04:00:00Z); to come, the balance then if nothing more moves (what "
        "expires by then gone, what becomes valid by then spendable)",
    )
    sub = command(
        commands,
        "grants",
        "a wallet's grants (funds with a start or an expiry), oldest first",
        _grants,
    )
    sub.add_argument("wallet", type=_identifier, metavar="WALLET")
    sub.add_argument(
        "--all", action="store_true", help="also those with nothing left (spent or expired)"
    )
    sub.add_argument("--limit", type=_limit, default=list_limit_default, metavar="N")
    command(
        commands,
        "expire",
        "run an expiration now: what is left of the grants past their expiry moves to the "
        "expired-credits wallets",
        _expire,
    )
    sub = command(commands, "history", "a wallet's transfers, newest first", _history)
    sub.add_argument("wallet", type=_identifier, metavar="WALLET")
    sub.add_argument(
        "--kind",
        nargs="+",
        action="extend",
        choices=_names(types_pb2.TransferKind),
        default=[],
        metavar="K",
    )
    sub.add_argument("--reference", default="", metavar="R")
    sub.add_argument("--limit", type=_limit, default=history_limit_default, metavar="N")
    sub = command(
        commands,
        "events",
        "the event stream, oldest first, one line each, from --after (with --follow, then "
        "each as it commits, until interrupted)",
        _events,
    )
    sub.add_argument(
        "--after",
        default="",
        metavar="CURSOR",
        help="a cursor an event line gave (default: the oldest event kept)",
    )
    sub.add_argument("--follow", action="store_true", help="keep printing events as they come")
    sub.add_argument(
        "--wallet", type=_identifier, action="append", default=[], metavar="ID", dest="wallets"
    )
    sub.add_argument("--owner", default="", metavar="ID", help="events of this owner's wallets")
    sub.add_argument(
        "--type",
        nargs="+",
        action="extend",
        choices=_names(events_pb2.EventType),
        default=[],
        metavar="T",
        dest="types",
    )
    sub.add_argument(
        "--limit",
        type=_limit,
        default=list_limit_default,
        metavar="N",
        help=f"most events without --follow (default {list_limit_default})",
    )
    sub = command(
        commands,
        "usage",
        "the usage register: debits, payments and captures, newest first, each with the grants "
        "it drew from",
        _usage,
    )
    sub.add_argument("--wallet", type=_identifier, metavar="ID", help="the wallet that spent")
    sub.add_argument("--owner", default="", metavar="ID", help="of this owner's wallets")
    sub.add_argument("--unit", default="", metavar="CODE")
    sub.add_argument("--performed-by", default="", metavar="WHO")
    sub.add_argument("--since", type=moment, metavar="ISO", help="made at or after this time")
    sub.add_argument("--until", type=moment, metavar="ISO", help="made before this time")
    sub.add_argument("--reference", default="", metavar="R")
    sub.add_argument("--limit", type=_limit, default=list_limit_default, metavar="N")
    sub = command(
        commands,
        "outstanding",
        "what a unit's wallets hold, and what of it expires soon, with the totals",
        _outstanding,
    )
    sub.add_argument("unit", metavar="UNIT")
    sub.add_argument(
        "--within",
        type=_horizon,
        default=expiring_within_days_default,
        metavar="DAYS",
        help="count as expiring what expires within this many days "
        f"(default {expiring_within_days_default}; 0: what is past its expiry, not yet expired)",
    )
    sub.add_argument("--limit", type=_limit, default=list_limit_default, metavar="N")
    command(commands, "health", "check that the server is serving (gRPC health)", _health)

    keys = group("keys", "API keys (administrators; with the server, also against its database)")
    sub = command(keys, "create", "make an API key, shown this once", _keys_create)
    add_principal_options(sub)
    sub.add_argument(
        "--expires-at",
        type=moment,
        metavar="ISO",
        help="when it stops being good, e.g. 2027-01-31T00:00:00Z (default: never)",
    )
    sub = command(keys, "list", "list the API keys (never their secrets)", _keys_list)
    sub.add_argument("--limit", type=_limit, default=list_limit_default, metavar="N")
    sub = command(keys, "revoke", "revoke an API key for good", _keys_revoke)
    sub.add_argument("key", type=_identifier, metavar="ID")
    certificates = group("certificates", "client certificates mapped to principals (mTLS)")
    sub = command(certificates, "map", "map a certificate's subject common name", _certificates_map)
    sub.add_argument("subject", metavar="COMMON_NAME")
    add_principal_options(sub)
    sub = command(certificates, "unmap", "remove a mapping", _certificates_unmap)
    sub.add_argument("subject", metavar="COMMON_NAME")
    sub = command(certificates, "list", "list the mappings", _certificates_list)
    sub.add_argument("--limit", type=_limit, default=list_limit_default, metavar="N")
    return parser


def add_principal_options(sub: argparse.ArgumentParser) -> None:
    """The options naming a principal (`coffer keys create`, `coffer certificates map`), of
    both forms of those commands: through the server, and the server's own on the database."""
    sub.add_argument("--role", required=True, choices=_names(access_pb2.Role))
    sub.add_argument("--name", required=True, help='the principal\'s name, e.g. "ops"')
    sub.add_argument(
        "--owner",
        default="",
        metavar="ID",
        help="for merchants and customers: the owner whose wallets it may touch",
    )


def moment(text: str) -> datetime:
    """An ISO 8601 time that says its time zone (an option's type)."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"say the time zone, e.g. {text}Z")
    try:
        moment.astimezone(UTC)
    except OverflowError:
        raise argparse.ArgumentTypeError(f"not in the years 1 to 9999 in UTC: {text}") from None
    return moment


def _key_row(key: access_pb2.ApiKey) -> list[str]:
    return [
        str(key.id),
        _name(access_pb2.Role, key.role),
        key.name,
        key.owner_id or "-",
        _time(key.created_at),
        _time(key.expires_at),
        _time(key.revoked_at),
    ]


_key_header = ["ID", "ROLE", "NAME", "OWNER", "CREATED", "EXPIRES", "REVOKED"]


def _keys_create(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    made = client.create_api_key(
        name=arguments.name,
        role=arguments.role,
        owner_id=arguments.owner,
        expires_at=arguments.expires_at,
    )

    def render() -> list[str]:
        return [made.api_key, *_table(_key_header, [_key_row(made.key)], right=set())]

    return _Output(made, render)


def _keys_list(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    keys, next_page_token = _collect(
        lambda page_size, page_token: client.list_api_keys(
            page_size=page_size, page_token=page_token
        ),
        arguments.limit,
    )
    return _Output(
        access_pb2.ListApiKeysResponse(keys=keys, next_page_token=next_page_token),
        lambda: _table(_key_header, [_key_row(key) for key in keys], right=set()),
    )


def _keys_revoke(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    key = client.revoke_api_key(key_id=arguments.key)
    return _Output(
        access_pb2.RevokeApiKeyResponse(key=key),
        lambda: _table(_key_header, [_key_row(key)], right=set()),
    )


_mapping_header = ["SUBJECT", "ROLE", "NAME", "OWNER", "MAPPED"]


def _mapping_row(mapping: access_pb2.CertificateMapping) -> list[str]:
    return [
        mapping.subject,
        _name(access_pb2.Role, mapping.role),
        mapping.name,
        mapping.owner_id or "-",
        _time(mapping.created_at),
    ]


def _certificates_map(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    mapping = client.map_certificate(
        subject=arguments.subject,
        name=arguments.name,
        role=arguments.role,
        owner_id=arguments.owner,
    )
    return _Output(
        access_pb2.MapCertificateResponse(mapping=mapping),
        lambda: _table(_mapping_header, [_mapping_row(mapping)], right=set()),
    )


def _certificates_unmap(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    mapping = client.unmap_certificate(subject=arguments.subject)
    return _Output(
        access_pb2.UnmapCertificateResponse(mapping=mapping),
        lambda: _table(_mapping_header, [_mapping_row(mapping)], right=set()),
    )


def _certificates_list(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    mappings, next_page_token = _collect(
        lambda page_size, page_token: client.list_certificate_mappings(
            page_size=page_size, page_token=page_token
        ),
        arguments.limit,
    )
    return _Output(
        access_pb2.ListCertificateMappingsResponse(
            mappings=mappings, next_page_token=next_page_token
        ),
        lambda: _table(_mapping_header, [_mapping_row(m) for m in mappings], right=set()),
    )


def _add_global_options(
    parser: argparse.ArgumentParser, *, suppress: bool, target: bool = True
) -> None:
    def default(value: object) -> object:
        return argparse.SUPPRESS if suppress else value

    if target:
        parser.add_argument(
            "--target",
            default=default(os.environ.get(target_environment_variable) or target_default),
            metavar="HOST:PORT",
            help=f"the server (default: ${target_environment_variable} or {target_default})",
        )
    parser.add_argument(
        "--caller",
        default=default(os.environ.get(caller_environment_variable) or caller_default),
        metavar="NAME",
        help=f"who calls; idempotency keys are scoped to it "
        f"(default: ${caller_environment_variable} or {caller_default})",
    )
    parser.add_argument(
        api_key_option,
        default=default(os.environ.get(api_key_environment_variable, "")),
        metavar="KEY",
        help="authenticate with this API key (default: $COFFER_API_KEY; a server on loopback "
        "with no credential made yet needs none)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print the response as JSON",
    )
    parser.add_argument(
        "--deadline",
        type=_seconds,
        default=default(timeout_s_default),
        metavar="SECONDS",
        help=f"how long a call may take, retries included (default {timeout_s_default:g})",
    )
    for name, metavar, what in (
        ("tls_ca", "PEM", "use TLS, trusting the certificate authorities of this file"),
        ("tls_cert", "PEM", "with --tls-key, present this client certificate (mTLS)"),
        ("tls_key", "PEM", "the unencrypted private key of --tls-cert"),
    ):
        variable = tls_environment_variables[name]
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=default(os.environ.get(variable, "")),
            metavar=metavar,
            help=f"{what} (default: ${variable})",
        )


def _tls(arguments: argparse.Namespace) -> Tls | None:
    """The TLS options, or None (plaintext) when none is given; ValueError if one is wrong."""
    if not (arguments.tls_ca or arguments.tls_cert or arguments.tls_key):
        return None
    if bool(arguments.tls_cert) != bool(arguments.tls_key):
        raise ValueError("--tls-cert and --tls-key go together: give both, or neither")
    return Tls.from_files(
        ca=arguments.tls_ca or None,
        cert=arguments.tls_cert or None,
        key=arguments.tls_key or None,
    )


def _add_wallet_amount(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("wallet", type=_identifier, metavar="WALLET")
    parser.add_argument("amount", type=_int64, metavar="AMOUNT", help=amount_help)


def _add_mutation_options(parser: argparse.ArgumentParser, *, reference: bool) -> None:
    parser.add_argument(
        "--note", default="", help=f"why (up to {limits.note_length_max:,} characters)"
    )
    if reference:
        parser.add_argument("--reference", default="", help="your reference, e.g. an order id")
    user = os.environ.get("USER") or os.environ.get("USERNAME") or ""
    parser.add_argument("--performed-by", default=user, metavar="WHO", help="default: $USER")
    _add_metadata_option(parser)
    parser.add_argument(
        "--idempotency-key",
        metavar="KEY",
        help="resend with the same key to apply it once (default: a fresh random key)",
    )


def _add_terms_options(parser: argparse.ArgumentParser) -> None:
    """The terms of funds coming in (`coffer credit`, `coffer deposit`)."""
    parser.add_argument(
        "--valid-from",
        type=moment,
        metavar="ISO",
        help="from when the funds can be spent, e.g. 2027-01-01T00:00:00Z (default: now)",
    )
    expiry = parser.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires-at",
        type=moment,
        metavar="ISO",
        help="when the funds expire, e.g. 2027-06-30T23:59:59Z (default: the unit's validity "
        "after the start, if it has one, else never)",
    )
    expiry.add_argument(
        "--expires-in-days",
        type=_days,
        metavar="DAYS",
        help="they expire this many days from now (or from --valid-from), by this machine's clock",
    )


def _add_alert_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threshold",
        type=_int64,
        metavar="N",
        help="below this available balance, in minor units, a LOW_BALANCE event, once per crossing",
    )
    parser.add_argument(
        "--top-up-to",
        type=_int64,
        metavar="N",
        help="with --threshold: also ask for a top-up to this balance (TOP_UP_REQUESTED)",
    )


def _add_metadata_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metadata",
        nargs="+",
        action="extend",
        type=_key_value,
        default=[],
        metavar="K=V",
        help=f"up to {limits.metadata_entries_max} entries",
    )


def _int64(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    # Every integer the API carries is an int64, the range of a balance.
    if not limits.balance_min <= value <= limits.balance_max:
        raise argparse.ArgumentTypeError(f"out of the 64-bit range: {text}")
    return value


def _identifier(text: str) -> int:
    value = _int64(text)
    if not 0 < value <= limits.id_max:
        raise argparse.ArgumentTypeError(f"not an id: {text}")
    return value


def _scale(text: str) -> int:
    value = _int64(text)
    if not 0 <= value <= limits.unit_scale_max:
        raise argparse.ArgumentTypeError(f"not 0 to {limits.unit_scale_max}: {text}")
    return value


def _validity(text: str) -> str:
    """A duration's text, if not too long; the server checks its form."""
    if len(text) > limits.validity_length_max:
        raise argparse.ArgumentTypeError(
            f"longer than {limits.validity_length_max} characters: {text}"
        )
    return text


def _horizon(text: str) -> int:
    """The days ahead of the outstanding overview's expiring amounts."""
    value = _int64(text)
    if not 0 <= value <= limits.expiring_within_days_max:
        raise argparse.ArgumentTypeError(f"not 0 to {limits.expiring_within_days_max:,}: {text}")
    return value


def _limit(text: str) -> int:
    value = _int64(text)
    if not 1 <= value <= list_limit_max:
        raise argparse.ArgumentTypeError(f"not 1 to {list_limit_max}: {text}")
    return value


def _days(text: str) -> int:
    """A whole number of days, within the longest validity a unit may have."""
    value = _int64(text)
    days_max = limits.validity_months_max * 30
    if not 1 <= value <= days_max:
        raise argparse.ArgumentTypeError(f"not 1 to {days_max:,} days: {text}")
    return value


def _seconds(text: str) -> float:
    """A call's deadline: a positive number of seconds, up to a day."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 < value <= deadline_s_max:
        raise argparse.ArgumentTypeError(f"not more than 0 and up to {deadline_s_max:g}: {text}")
    return value


def _hold_timeout(text: str) -> timedelta:
    """A hold's timeout: whole seconds, within the ledger's bounds."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of seconds: {text!r}") from None
    if not limits.hold_timeout_s_min <= value <= limits.hold_timeout_s_max:
        raise argparse.ArgumentTypeError(
            f"not {limits.hold_timeout_s_min} to {limits.hold_timeout_s_max:,} seconds: {text}"
        )
    return timedelta(seconds=value)


def _key_value(text: str) -> tuple[str, str]:
    key, equals, value = text.partition("=")
    if not key or not equals:
        raise argparse.ArgumentTypeError(f"not KEY=VALUE: {text!r}")
    return key, value


def _mutation(arguments: argparse.Namespace) -> dict[str, Any]:
    """The options every mutating command has, as keyword arguments of the client."""
    options: dict[str, Any] = {
        "note": arguments.note,
        "performed_by": arguments.performed_by,
        "metadata": dict(arguments.metadata),
        "idempotency_key": arguments.idempotency_key,
    }
    if "reference" in arguments:
        options["reference"] = arguments.reference
    return options


# The commands.


def _unit_create(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    unit = client.create_unit(
        code=arguments.code,
        kind=arguments.kind,
        scale=arguments.scale,
        name=arguments.name,
        plural=arguments.plural,
        description=arguments.description,
        default_validity=arguments.validity,
    )
    return _Output(units_pb2.CreateUnitResponse(unit=unit), lambda: [_unit_line(unit)])


def _unit_list(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    units = client.list_units()
    rows = [
        [
            unit.code,
            _name(types_pb2.UnitKind, unit.kind),
            str(unit.scale),
            unit.default_validity or "-",
            unit.name,
            unit.plural,
        ]
        for unit in units
    ]
    return _Output(
        units_pb2.ListUnitsResponse(units=units),
        lambda: _table(["CODE", "KIND", "SCALE", "VALIDITY", "NAME", "PLURAL"], rows, right={2}),
    )


def _wallet_create(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    wallet = client.create_wallet(
        owner_id=arguments.owner,
        owner_kind=arguments.owner_kind,
        unit=arguments.unit,
        balance_minimum=arguments.minimum,
        metadata=dict(arguments.metadata),
        idempotency_key=arguments.idempotency_key,
        low_balance_threshold=arguments.threshold,
        top_up_to=arguments.top_up_to,
    )
    return _Output(wallets_pb2.CreateWalletResponse(wallet=wallet), lambda: _wallet_lines(wallet))


def _wallet_alert(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    if arguments.clear == (arguments.threshold is not None) or (
        arguments.clear and arguments.top_up_to is not None
    ):
        print("error: give --threshold (and --top-up-to, if wanted), or --clear", file=sys.stderr)
        return _Output(wallets_pb2.SetBalanceAlertResponse(), list, exit_usage, printed=True)
    wallet = client.set_balance_alert(
        wallet_id=arguments.wallet,
        low_balance_threshold=arguments.threshold,
        top_up_to=arguments.top_up_to,
    )
    return _Output(
        wallets_pb2.SetBalanceAlertResponse(wallet=wallet), lambda: _wallet_lines(wallet)
    )


def _wallet_show(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    wallet = client.get_wallet(wallet_id=arguments.wallet)
    return _Output(wallets_pb2.GetWalletResponse(wallet=wallet), lambda: _wallet_lines(wallet))


def _wallet_list(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    wallets, next_page_token = _collect(
        lambda page_size, page_token: client.list_wallets(
            owner_id=arguments.owner,
            unit=arguments.unit,
            page_size=page_size,
            page_token=page_token,
        ),
        arguments.limit,
    )

    def render() -> list[str]:
        rows = [
            [
                str(wallet.id),
                wallet.owner_id,
                _name(types_pb2.OwnerKind, wallet.owner_kind),
                wallet.unit,
                _name(types_pb2.WalletStatus, wallet.status),
                str(wallet.balance.posted),
                str(wallet.balance.pending),
                str(wallet.balance.available),
            ]
            for wallet in wallets
        ]
        lines = _table(
            ["ID", "OWNER", "KIND", "UNIT", "STATUS", "POSTED", "PENDING", "AVAILABLE"],
            rows,
            right={0, 5, 6, 7},
        )
        if next_page_token:
            lines.append(f"(more than {arguments.limit}; raise --limit to see them)")
        return lines

    response = wallets_pb2.ListWalletsResponse(wallets=wallets, next_page_token=next_page_token)
    return _Output(response, render)


def _wallet_cancel(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    wallet = client.cancel_wallet(wallet_id=arguments.wallet)
    return _Output(wallets_pb2.CancelWalletResponse(wallet=wallet), lambda: _wallet_lines(wallet))


def _expires_at(arguments: argparse.Namespace) -> datetime | None:
    """When funds coming in expire: --expires-at, or --expires-in-days from --valid-from or
    from now; None: as the unit says."""
    if arguments.expires_in_days is None:
        expires_at: datetime | None = arguments.expires_at
        return expires_at
    start = arguments.valid_from or datetime.now(UTC)
    try:
        return start + timedelta(days=arguments.expires_in_days)
    except OverflowError:
        raise _BadUsage("--expires-in-days: the expiry would fall after the year 9999") from None


def _credit(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    transfer = client.credit(
        wallet_id=arguments.wallet,
        amount=arguments.amount,
        valid_from=arguments.valid_from,
        expires_at=_expires_at(arguments),
        **_mutation(arguments),
    )
    return _Output(
        transfers_pb2.CreditResponse(transfer=transfer),
        lambda: [
            _transfer_line(transfer, arguments.wallet)
            + _balance_after(client, transfer, arguments.wallet)
        ],
    )


def _debit(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    result = client.debit(
        wallet_id=arguments.wallet,
        amount=arguments.amount,
        mode=arguments.mode.replace("-", "_"),
        **_mutation(arguments),
    )
    response = transfers_pb2.DebitResponse(
        transfer=result.transfer,
        amount_debited=result.amount_debited,
        amount_remaining=result.amount_remaining,
    )

    def render() -> list[str]:
        line = _transfer_line(result.transfer, arguments.wallet)
        if result.amount_remaining:
            line += f"  remaining {result.amount_remaining} due"
        return [line + _balance_after(client, result.transfer, arguments.wallet)]

    return _Output(response, render)


def _transfer(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    transfer = client.transfer(
        source_wallet_id=arguments.source_wallet,
        target_wallet_id=arguments.target_wallet,
        amount=arguments.amount,
        **_mutation(arguments),
    )
    return _Output(
        transfers_pb2.TransferResponse(transfer=transfer), lambda: [_transfer_line(transfer)]
    )


def _deposit(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    transfer = client.deposit(
        wallet_id=arguments.wallet,
        amount=arguments.amount,
        funding_source=arguments.source,
        valid_from=arguments.valid_from,
        expires_at=_expires_at(arguments),
        **_mutation(arguments),
    )
    return _Output(
        transfers_pb2.DepositResponse(transfer=transfer),
        lambda: [
            _transfer_line(transfer, arguments.wallet)
            + _balance_after(client, transfer, arguments.wallet)
        ],
    )


def _withdraw(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    transfer = client.withdraw(
        wallet_id=arguments.wallet,
        amount=arguments.amount,
        funding_source=arguments.source,
        **_mutation(arguments),
    )
    return _Output(
        transfers_pb2.WithdrawResponse(transfer=transfer),
        lambda: [
            _transfer_line(transfer, arguments.wallet)
            + _balance_after(client, transfer, arguments.wallet)
        ],
    )


def _pay(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    transfer = client.pay(
        payer_wallet_id=arguments.payer,
        payee_wallet_id=arguments.payee,
        amount=arguments.amount,
        **_mutation(arguments),
    )
    return _Output(transfers_pb2.PayResponse(transfer=transfer), lambda: [_transfer_line(transfer)])


def _hold_place(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    result = client.place_hold(
        wallet_id=arguments.wallet,
        amount=arguments.amount,
        target_wallet_id=arguments.target_wallet,
        timeout=arguments.timeout,
        **_mutation(arguments),
    )
    return _Output(
        holds_pb2.PlaceHoldResponse(hold=result.hold, transfer=result.transfer),
        lambda: [_hold_line(result.hold), _transfer_line(result.transfer)],
    )


def _hold_capture(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    result = client.capture_hold(
        hold_id=arguments.hold, amount=arguments.amount, **_mutation(arguments)
    )
    return _Output(
        holds_pb2.CaptureHoldResponse(hold=result.hold, transfer=result.transfer),
        lambda: [_hold_line(result.hold), _transfer_line(result.transfer)],
    )


def _hold_release(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    result = client.release_hold(hold_id=arguments.hold, **_mutation(arguments))
    return _Output(
        holds_pb2.ReleaseHoldResponse(hold=result.hold, transfer=result.transfer),
        lambda: [_hold_line(result.hold), _transfer_line(result.transfer)],
    )


def _hold_show(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    hold = client.get_hold(hold_id=arguments.hold)
    return _Output(holds_pb2.GetHoldResponse(hold=hold), lambda: [_hold_line(hold)])


def _void(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    transfer = client.void(
        transfer_id=arguments.transfer, expires_at=arguments.expires_at, **_mutation(arguments)
    )
    return _Output(
        transfers_pb2.VoidResponse(transfer=transfer), lambda: [_transfer_line(transfer)]
    )


def _balance(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    at: datetime | None = arguments.at
    response: Message
    if at is not None and at <= datetime.now(UTC):
        past = client.past_balance(arguments.wallet, at)
        return _Output(
            past,
            lambda: [
                f"wallet {past.wallet_id}  {past.unit}  posted {past.posted}  pending "
                f"{past.pending}  at {_time(past.time)}"
            ],
        )
    if at is None:
        result = client.get_balance(wallet_id=arguments.wallet)
        response = wallets_pb2.GetBalanceResponse(
            wallet_id=result.wallet_id, unit=result.unit, balance=result.balance
        )
        when = ""
    else:
        result = client.future_balance(wallet_id=arguments.wallet, at=at)
        response = grants_pb2.GetFutureBalanceResponse(
            wallet_id=result.wallet_id,
            unit=result.unit,
            time=_timestamp_of(at),
            balance=result.balance,
        )
        when = f"  at {at.astimezone(UTC):%Y-%m-%d %H:%M:%S}"
    return _Output(
        response,
        lambda: [
            f"wallet {result.wallet_id}  {result.unit}  {_balance_text(result.balance)}{when}"
        ],
    )


def _grants(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    grants, next_page_token = _collect(
        lambda page_size, page_token: client.list_grants(
            wallet_id=arguments.wallet,
            include_spent=arguments.all,
            page_size=page_size,
            page_token=page_token,
        ),
        arguments.limit,
    )

    def render() -> list[str]:
        rows = [
            [
                str(grant.id),
                str(grant.amount),
                str(grant.remaining),
                _time(grant.valid_from),
                _time(grant.expires_at) if grant.HasField("expires_at") else "never",
                str(grant.transfer_id),
            ]
            for grant in grants
        ]
        lines = _table(
            ["ID", "AMOUNT", "REMAINING", "VALID FROM (UTC)", "EXPIRES (UTC)", "TRANSFER"],
            rows,
            right={0, 1, 2, 5},
        )
        if next_page_token:
            lines.append(f"(more than {arguments.limit}; raise --limit to see them)")
        return lines

    response = grants_pb2.ListGrantsResponse(grants=grants, next_page_token=next_page_token)
    return _Output(response, render)


def _expire(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    count = client.run_expiration()
    return _Output(
        grants_pb2.RunExpirationResponse(expired_count=count),
        lambda: [f"expired {count} grant{'' if count == 1 else 's'}"],
    )


def _history(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    transfers, next_page_token = _collect(
        lambda page_size, page_token: client.list_transfers(
            wallet_id=arguments.wallet,
            kinds=[kind.replace("-", "_") for kind in arguments.kind],
            reference=arguments.reference,
            page_size=page_size,
            page_token=page_token,
        ),
        arguments.limit,
    )

    def render() -> list[str]:
        rows = []
        for transfer in transfers:
            incoming = transfer.target_wallet_id == arguments.wallet
            counterpart = transfer.source_wallet_id if incoming else transfer.target_wallet_id
            rows.append(
                [
                    str(transfer.id),
                    _time(transfer.create_time),
                    _name(types_pb2.TransferKind, transfer.kind),
                    _signed_amount(transfer, incoming),
                    transfer.unit,
                    str(counterpart),
                    str(transfer.balance_after) if transfer.HasField("balance_after") else "",
                    transfer.reference,
                    transfer.note,
                ]
            )
        lines = _table(
            [
                "ID",
                "TIME (UTC)",
                "KIND",
                "AMOUNT",
                "UNIT",
                "WALLET",
                "BALANCE",
                "REFERENCE",
                "NOTE",
            ],
            rows,
            right={0, 3, 5, 6},
        )
        if next_page_token:
            lines.append(f"(more than {arguments.limit}; raise --limit to see them)")
        return lines

    response = transfers_pb2.ListTransfersResponse(
        transfers=transfers, next_page_token=next_page_token
    )
    return _Output(response, render)


def _usage(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    entries, next_page_token = _collect(
        lambda page_size, page_token: client.list_usage(
            wallet_id=arguments.wallet or 0,
            owner_id=arguments.owner,
            unit=arguments.unit,
            performed_by=arguments.performed_by,
            start_time=arguments.since,
            end_time=arguments.until,
            reference=arguments.reference,
            page_size=page_size,
            page_token=page_token,
        ),
        arguments.limit,
    )

    def render() -> list[str]:
        rows = [
            [
                _time(entry.transfer.create_time),
                str(entry.transfer.id),
                _name(types_pb2.TransferKind, entry.transfer.kind),
                str(entry.transfer.source_wallet_id),
                str(entry.transfer.amount),
                entry.transfer.unit,
                entry.transfer.performed_by,
                entry.transfer.note,
                _drawn_text(entry),
            ]
            for entry in entries
        ]
        lines = _table(
            [
                "TIME (UTC)",
                "TRANSFER",
                "KIND",
                "WALLET",
                "AMOUNT",
                "UNIT",
                "PERFORMED BY",
                "NOTE",
                "DRAWN FROM",
            ],
            rows,
            right={1, 3, 4},
        )
        if next_page_token:
            lines.append(f"(more than {arguments.limit}; raise --limit to see them)")
        return lines

    response = reports_pb2.ListUsageResponse(entries=entries, next_page_token=next_page_token)
    return _Output(response, render)


def _drawn_text(entry: reports_pb2.UsageEntry) -> str:
    """E.g. `grant 4: 100 (expires 2026-12-28 04:49:06), untracked: 50  voided by transfer 9`."""
    parts = []
    for drawn in entry.drawn:
        expiry = f" (expires {_time(drawn.expires_at)})" if drawn.HasField("expires_at") else ""
        parts.append(f"grant {drawn.grant_id}: {drawn.amount}{expiry}")
    if entry.untracked or not parts:
        parts.append(f"untracked: {entry.untracked}")
    text = ", ".join(parts)
    if entry.transfer.voided_by_transfer_id:
        text += f"  voided by transfer {entry.transfer.voided_by_transfer_id}"
    return text


def _outstanding(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    pages: list[reports_pb2.GetOutstandingResponse] = []

    def fetch(page_size: int, page_token: str) -> Page[reports_pb2.OutstandingWallet]:
        page = client.outstanding(
            arguments.unit,
            expiring_within_days=arguments.within,
            page_size=page_size,
            page_token=page_token,
        )
        pages.append(page)
        return Page(list(page.wallets), page.next_page_token)

    wallets, next_page_token = _collect(fetch, arguments.limit)
    first = pages[0]
    response = reports_pb2.GetOutstandingResponse(
        unit=first.unit,
        unit_scale=first.unit_scale,
        expiring_before=first.expiring_before,
        wallets=wallets,
        totals=first.totals,
        next_page_token=next_page_token,
    )

    def render() -> list[str]:
        rows = [
            [
                str(wallet.wallet_id),
                wallet.owner_id,
                _name(types_pb2.OwnerKind, wallet.owner_kind),
                str(wallet.posted),
                str(wallet.available),
                str(wallet.expiring),
            ]
            for wallet in wallets
        ]
        lines = _table(
            ["WALLET", "OWNER", "KIND", "POSTED", "AVAILABLE", "EXPIRING"],
            rows,
            right={0, 3, 4, 5},
        )
        if next_page_token:
            lines.append(f"(more than {arguments.limit}; raise --limit to see them)")
        totals = first.totals
        lines.append(
            f"total  {totals.wallets} wallet{'' if totals.wallets == 1 else 's'}  "
            f"outstanding {totals.outstanding} {first.unit}  "
            f"expiring {totals.expiring} {first.unit} by {_time(first.expiring_before)}"
        )
        return lines

    return _Output(response, render)


def _events(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    filters: dict[str, Any] = {
        "wallet_ids": arguments.wallets,
        "owner_id": arguments.owner,
        "types": [each.replace("-", "_") for each in arguments.types],
    }
    if arguments.follow:
        for event in client.watch_events(after_cursor=arguments.after, **filters):
            if arguments.json:
                print(json_format.MessageToJson(event, indent=None), flush=True)
            else:
                print(_event_line(event), flush=True)
        return _Output(events_pb2.ListEventsResponse(), list, printed=True)
    events: list[events_pb2.Event] = []
    cursor = arguments.after
    caught_up = False
    while len(events) < arguments.limit and not caught_up:
        page = client.list_events(
            after_cursor=cursor,
            page_size=min(arguments.limit - len(events), limits.page_size_max),
            **filters,
        )
        events.extend(page.events)
        cursor, caught_up = page.next_cursor, page.caught_up

    def render() -> list[str]:
        lines = [_event_line(event) for event in events]
        if not caught_up:
            lines.append(f"(more: --after {cursor})")
        return lines

    response = events_pb2.ListEventsResponse(events=events, next_cursor=cursor, caught_up=caught_up)
    return _Output(response, render)


def _health(client: SyncClient, arguments: argparse.Namespace) -> _Output:
    status = client.health()
    response = health_pb2.HealthCheckResponse(
        status=health_pb2.HealthCheckResponse.ServingStatus.Value(status)
    )
    return _Output(response, lambda: [status], exit_ok if status == "SERVING" else exit_refused)


def _collect(fetch: Callable[[int, str], Page[_Item]], limit: int) -> tuple[list[_Item], str]:
    """Up to `limit` items, page after page, and the token of the page after them."""
    items: list[_Item] = []
    page_token = ""
    while len(items) < limit:
        page = fetch(min(limit - len(items), limits.page_size_max), page_token)
        items.extend(page.items)
        page_token = page.next_page_token
        if not page_token:
            break
    return items[:limit], page_token


# Human output.


def _unit_line(unit: types_pb2.Unit) -> str:
    names = "/".join(name for name in (unit.name, unit.plural) if name)
    kind = _name(types_pb2.UnitKind, unit.kind)
    validity = f"  validity {unit.default_validity}" if unit.default_validity else ""
    return f"unit {unit.code}  {kind}  scale {unit.scale}{validity}  {names}".rstrip()


def _wallet_lines(wallet: types_pb2.Wallet) -> list[str]:
    minimum = str(wallet.balance_minimum) if wallet.HasField("balance_minimum") else "none"
    lines = [
        f"wallet {wallet.id}  {_name(types_pb2.OwnerKind, wallet.owner_kind)} {wallet.owner_id}  "
        f"{wallet.unit}  {_name(types_pb2.WalletStatus, wallet.status)}",
        f"balance   {_balance_text(wallet.balance)}  minimum {minimum}",
        f"created   {_time(wallet.create_time)}",
    ]
    if wallet.metadata:
        lines.append(
            "metadata  " + ", ".join(f"{k}={v}" for k, v in sorted(wallet.metadata.items()))
        )
    if wallet.HasField("low_balance_threshold"):
        alert = f"alert     below {wallet.low_balance_threshold}"
        if wallet.HasField("top_up_to"):
            alert += f", top up to {wallet.top_up_to}"
        lines.append(alert)
    return lines


def _balance_text(balance: types_pb2.Balance) -> str:
    unspendable = f"  unspendable {balance.unspendable}" if balance.unspendable else ""
    return (
        f"posted {balance.posted}  pending {balance.pending}{unspendable}"
        f"  available {balance.available}"
    )


def _balance_after(client: SyncClient, transfer: types_pb2.Transfer, wallet_id: int) -> str:
    """The wallet's posted balance right after the transfer, for the line of a movement that
    succeeded, as its history says (`balance_after` of its entry: among the newest, or else
    among those stamped when it was, as for a replay of an old one); and what the wallet has
    available, when nothing has posted since and it differs. On failure the line goes without
    them, so that nobody repeats a movement that took place."""
    stamp = transfer.create_time.ToDatetime(tzinfo=UTC)
    try:
        found = [
            each
            for each in client.list_transfers(wallet_id=wallet_id, page_size=10).items
            if each.id == transfer.id
        ] or [
            each
            for each in client.list_transfers(
                wallet_id=wallet_id,
                start_time=stamp,
                end_time=stamp + timedelta(microseconds=1),
                page_size=limits.page_size_max,
            ).items
            if each.id == transfer.id
        ]
        balance = client.get_balance(wallet_id=wallet_id).balance
    except errors.CofferError:
        return ""
    if not found:
        return ""
    after = found[0].balance_after
    text = f"  balance {after}"
    if balance.posted == after and balance.available != after:
        text += f" (available {balance.available})"
    return text


def _transfer_line(transfer: types_pb2.Transfer, wallet_id: int | None = None) -> str:
    """E.g. `transfer 42  credit  +1500 EUR  wallet 7`, from the point of view of `wallet_id`."""
    parts = [f"transfer {transfer.id}", _name(types_pb2.TransferKind, transfer.kind)]
    if wallet_id in (transfer.source_wallet_id, transfer.target_wallet_id):
        sign = "+" if transfer.target_wallet_id == wallet_id else "-"
        parts += [f"{sign}{transfer.amount} {transfer.unit}", f"wallet {wallet_id}"]
    else:
        parts += [
            f"{transfer.amount} {transfer.unit}",
            f"wallet {transfer.source_wallet_id} -> wallet {transfer.target_wallet_id}",
        ]
    if transfer.amount_requested and transfer.amount_requested != transfer.amount:
        parts.append(f"requested {transfer.amount_requested}")
    if transfer.hold_id:
        parts.append(f"hold {transfer.hold_id}")
    if transfer.voids_transfer_id:
        parts.append(f"voids transfer {transfer.voids_transfer_id}")
    if transfer.voided_by_transfer_id:
        parts.append(f"voided by transfer {transfer.voided_by_transfer_id}")
    if transfer.HasField("hold_expire_time"):
        parts.append(f"expires {_time(transfer.hold_expire_time)}")
    if transfer.reference:
        parts.append(f"reference {transfer.reference}")
    return "  ".join(parts)


def _event_line(event: events_pb2.Event) -> str:
    """E.g. `AAAAAAAAAAUAAAAB  2026-11-28 04:49:06  transfer  shop  transfer 4  credit  …`: the
    cursor to resume after it, when, what, who, and the details."""
    body = event.WhichOneof("body")
    if body == "transfer":
        moved = event.transfer
        details = _transfer_line(moved.transfer)
        # A wallet not the reader's own has no balance shown: "-".
        source = moved.source_balance.available if moved.HasField("source_balance") else "-"
        target = moved.target_balance.available if moved.HasField("target_balance") else "-"
        details += f"  balances {source} / {target}"
    elif body == "wallet":
        details = _wallet_lines(event.wallet)[0]
    elif body == "unit":
        details = _unit_line(event.unit)
    elif body == "balance_alert":
        alert = event.balance_alert
        details = f"wallet {alert.wallet_id}  " + (
            f"threshold {alert.low_balance_threshold}"
            + (f"  top up to {alert.top_up_to}" if alert.HasField("top_up_to") else "")
            if alert.HasField("low_balance_threshold")
            else "no alert"
        )
    elif body == "low_balance":
        low = event.low_balance
        details = (
            f"wallet {low.wallet_id}  available {low.balance.available} {low.balance.unit}"
            f"  below {low.low_balance_threshold}"
        )
    elif body == "grant":
        details = _grant_line(event.grant)
    elif body == "top_up_request":
        top_up = event.top_up_request
        details = (
            f"wallet {top_up.wallet_id}  top up {top_up.amount} {top_up.balance.unit}"
            f"  to {top_up.top_up_to}  request {top_up.request_id}"
        )
    else:
        details = ""
    parts = [
        event.cursor,
        _time(event.create_time),
        _name(events_pb2.EventType, event.type),
        event.actor,
        details,
    ]
    return "  ".join(part for part in parts if part)


def _grant_line(grant: types_pb2.Grant) -> str:
    """E.g. `grant 3  wallet 7  450 of 500 session  valid from …  expires …  transfer 1`."""
    expires = _time(grant.expires_at) if grant.HasField("expires_at") else "never"
    return (
        f"grant {grant.id}  wallet {grant.wallet_id}  {grant.remaining} of {grant.amount} "
        f"{grant.unit}  valid from {_time(grant.valid_from)}  expires {expires}"
        f"  transfer {grant.transfer_id}"
    )


def _timestamp_of(moment: datetime) -> Timestamp:
    timestamp = Timestamp()
    timestamp.FromDatetime(moment)
    return timestamp


def _signed_amount(transfer: types_pb2.Transfer, incoming: bool) -> str:
    """+ into the wallet, - out of it; in parentheses what is only reserved or freed."""
    if transfer.kind not in limits.posting_kinds:
        return f"({transfer.amount})"
    return f"{'+' if incoming else '-'}{transfer.amount}"


def _hold_line(hold: types_pb2.Hold) -> str:
    """E.g. `hold 8  pending  500 EUR  wallet 7 -> wallet 1  expires …`."""
    amount = f"{hold.amount} {hold.unit}"
    if hold.status == types_pb2.HOLD_STATUS_CAPTURED:
        amount = f"{hold.amount_captured} of {amount}"
    parts = [
        f"hold {hold.id}",
        _name(types_pb2.HoldStatus, hold.status),
        amount,
        f"wallet {hold.source_wallet_id} -> wallet {hold.target_wallet_id}",
    ]
    if hold.status == types_pb2.HOLD_STATUS_PENDING:
        parts.append(f"expires {_time(hold.expire_time)}")
    return "  ".join(parts)


def _name(enum: Any, value: int) -> str:
    """A protobuf enum value as the CLI spells it: TRANSFER_KIND_HOLD_EXPIRY is hold-expiry."""
    unspecified = enum.DESCRIPTOR.values[0].name
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(unspecified.removesuffix("UNSPECIFIED")).lower().replace("_", "-")


def _names(enum: Any) -> list[str]:
    """Every value of a protobuf enum but the unspecified one, as the CLI spells them: the
    choices of an option are the API's, never a list of our own."""
    return [_name(enum, value.number) for value in enum.DESCRIPTOR.values[1:]]


def _time(timestamp: Timestamp) -> str:
    if not timestamp.seconds and not timestamp.nanos:
        return "-"
    return timestamp.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], *, right: set[int]) -> list[str]:
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), *(line(row) for row in rows)]


if __name__ == "__main__":
    sys.exit(main())
