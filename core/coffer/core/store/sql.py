"""Every SQL statement the ledger runs, named for what it does; the tables are in
coffer/core/migrations.

Statements that read a wallet's balance take the ledger's clock as a parameter (see
`coffer.core.ledger`): a hold past its expiry holds nothing, even before it is released in the
journal, and whether it is past is decided on one clock, the one that set its expiry.
"""

from __future__ import annotations

from typing import Any

from ..model import TransferFilter, UsageFilter

__all__ = [
    "announce_expiring_grants",
    "audit_expired_mismatched",
    "audit_floors_broken",
    "audit_grants_mismatched",
    "audit_holds_mismatched",
    "audit_pending_mismatched",
    "audit_posted_mismatched",
    "audit_tracked_mismatched",
    "audit_units_unbalanced",
    "audit_voided_twice",
    "count_transfers",
    "count_wallets",
    "delete_commits_through",
    "delete_pending_holds",
    "delete_transfers",
    "insert_commit",
    "insert_expired_wallets",
    "insert_pending_holds",
    "insert_preload_chunk",
    "insert_system_wallet",
    "insert_unit",
    "insert_wallet",
    "lock_holds",
    "lock_wallet",
    "lock_wallets",
    "next_grant_ids",
    "next_transfer_ids",
    "refusal_columns",
    "refusals_table",
    "select_allocations",
    "select_allocations_drawn",
    "select_commits",
    "select_event_bounds",
    "select_event_transfers",
    "select_expired_grants",
    "select_grants_at",
    "select_history_moves",
    "select_history_newer_beyond",
    "select_hold_resolutions",
    "select_hold_terms",
    "select_holds",
    "select_holds_open_at",
    "select_keys_taken",
    "select_lapsed_holds",
    "select_live_grants",
    "select_named_grants",
    "select_oldest_commits",
    "select_one",
    "select_operation_transfers",
    "select_outstanding_totals",
    "select_outstanding_wallets",
    "select_owner_wallets",
    "select_owner_wallets_of_unit",
    "select_referenced_grants",
    "select_referenced_transfers",
    "select_stored_keys",
    "select_system_wallets",
    "select_transfer",
    "select_transfer_allocations",
    "select_transfers_after",
    "select_transfers_by_id",
    "select_transfers_page",
    "select_unit",
    "select_unit_exists",
    "select_unit_scales",
    "select_unit_validities",
    "select_units",
    "select_usage_scan",
    "select_usage_wallet",
    "select_voiding_transfers",
    "select_wallet",
    "select_wallet_by_key",
    "select_wallet_grants",
    "select_wallet_owners",
    "select_wallet_posted",
    "select_wallet_states",
    "select_wallet_units",
    "select_wallets",
    "transfer_columns",
    "transfers_table",
    "update_balance_alert",
    "update_balances",
    "update_grants",
    "update_wallet_status",
    "vacuum_preloaded",
]

select_one = "select 1"

# Units -----------------------------------------------------------------------------------------

_unit_columns = "code, kind, name, plural, description, scale, default_validity, created_at"

# Nothing when the code is taken: the caller compares the definitions.
insert_unit = f"""
    insert into units (code, kind, name, plural, description, scale, default_validity)
    values ($1, $2, $3, $4, $5, $6, $7)
    on conflict (code) do nothing
    returning {_unit_columns}
"""

select_unit = f"select {_unit_columns} from units where code = $1"

select_units = f"select {_unit_columns} from units order by code"

select_unit_exists = "select true from units where code = $1"

select_unit_scales = "select code, scale from units where code = any($1::text[])"

select_unit_validities = "select code, default_validity from units where code = any($1::text[])"

# Wallets ---------------------------------------------------------------------------------------


def _unspendable(now: str) -> str:
    """Whether grant `g` cannot be spent at `now` (`model.grant_spendable`, negated)."""
    return f"(g.valid_from > {now}::timestamptz or g.expires_at <= {now}::timestamptz)"


def _lapsed_reserved(wallet_id: str, now: str, grants_where: str) -> str:
    """What the holds of wallet `wallet_id` lapsed by `now` reserved from its grants that
    match `grants_where` (on `g`), but those voided since. A lapsed hold holds nothing, and
    the batch that releases it returns those reservations to their grants (`rules._unhold`):
    reads count them as their grants' already, as that batch will find them."""
    return f"""coalesce(
        (select -sum(a.amount) from pending_holds h
         join allocations a on a.transfer_id = h.transfer_id
         join grants g on g.id = a.grant_id
         where h.source_wallet_id = {wallet_id} and h.expires_at <= {now}::timestamptz
           and a.amount < 0 and not g.voided and {grants_where}), 0)"""


def _wallet_columns(now: str) -> str:
    """A wallet's columns, its pending balance less what its holds lapsed by `now` (the
    statement's parameter holding the ledger's clock) still count; unspendable, what its
    grants hold (with what its lapsed holds reserved from them) that cannot be spent then."""
    return f"""
    id, owner_id, owner_kind, unit, status, balance_minimum, posted, metadata, created_at,
    low_balance_threshold, top_up_to,
    (case when tracked = 0 then 0 else coalesce(
        (select sum(g.remaining) from grants g
         where g.wallet_id = wallets.id and g.live and {_unspendable(now)}), 0
    ) end
    + case when pending = 0 then 0
      else {_lapsed_reserved("wallets.id", now, _unspendable(now))} end)::bigint as unspendable,
    pending - case when pending = 0 then 0 else coalesce(
        (select sum(h.amount) from pending_holds h
         where h.source_wallet_id = wallets.id and h.expires_at <= {now}::timestamptz), 0
    ) end::bigint as pending
"""


# A unit's system wallets, one statement per wallet (executemany).
insert_system_wallet = "insert into wallets (owner_id, owner_kind, unit) values ($1, $2, $3)"

# Nothing when the key is taken: the caller reads the wallet it created (select_wallet_by_key).
insert_wallet = f"""
    insert into wallets (owner_id, owner_kind, unit, balance_minimum, metadata,
                         caller, idempotency_key, request_hash, low_balance_threshold, top_up_to)
    values ($1, $2, $3, $4, $5, $6, $7, $8, $10, $11)
    on conflict (caller, idempotency_key) where idempotency_key is not null
    do nothing
    returning {_wallet_columns("$9")}
"""

select_wallet_by_key = f"""
    select {_wallet_columns("$3")}, request_hash from wallets
    where caller = $1 and idempotency_key = $2
"""

select_wallet = f"select {_wallet_columns('$2')} from wallets where id = $1"

select_wallets = f"""
    select {_wallet_columns("$6")} from wallets
    where id > $1
      and ($2::text is null or owner_id = $2)
      and ($3::smallint is null or owner_kind = $3)
      and ($4::text is null or unit = $4)
    order by id
    limit $5
"""

lock_wallet = f"select {_wallet_columns('$2')} from wallets where id = $1 for update"

update_wallet_status = (
    f"update wallets set status = $2 where id = $1 returning {_wallet_columns('$3')}"
)

# Whose wallets these are (for principals limited to their own).
select_wallet_owners = "select id, owner_kind, owner_id from wallets where id = any($1::bigint[])"

update_balance_alert = f"""
    update wallets set low_balance_threshold = $2, top_up_to = $3 where id = $1
    returning {_wallet_columns("$4")}
"""

# Facts that never change: wallets' units, units' system wallets.
select_wallet_units = "select id, unit from wallets where id = any($1::bigint[])"

select_system_wallets = """
    select unit, owner_id, id from wallets
    where owner_kind = $1 and unit = any($2::text[])
"""

# Idempotency keys ------------------------------------------------------------------------------

# Where keys are stored: on the first transfer of a successful operation, under the key's
# digest in $1 (model.key_digest; the caller compares the row's caller and key, which another
# key of the same digest does not share), or as a refusal, under the caller and key in $2, $3.
select_stored_keys = """
    select t.key_digest, t.caller, t.idempotency_key, t.request_hash, t.operation_id,
           null as reason, null as message
    from transfers t
    where t.key_digest = any($1::bytea[])
    union all
    select null, r.caller, r.idempotency_key, r.request_hash, null, r.reason, r.message
    from unnest($2::text[], $3::text[]) as k (caller, key)
    -- One look-up by key each (`limit 1` keeps the planner from joining the whole table,
    -- which it would hash once a batch over a range of sizes; the key is unique).
    cross join lateral (
        select * from refusals
        where caller = k.caller and idempotency_key = k.key
        limit 1
    ) r
"""

# Whether any of the keys in $1, $2 is stored as a refusal, or any digest in $3 is a
# success's: the key's own, or another's of the same digest, which the batch, started over
# with its keys looked up, answers as such.
select_keys_taken = """
    select exists (
        select from refusals r
        join unnest($1::text[], $2::text[]) as k (caller, key)
          on r.caller = k.caller and r.idempotency_key = k.key
    ) or exists (
        select from transfers where key_digest = any($3::bytea[])
    )
"""

# Written with COPY.
refusals_table = "refusals"
refusal_columns = (
    "caller",
    "idempotency_key",
    "request_hash",
    "reason",
    "message",
    "created_at",
)

# A batch ---------------------------------------------------------------------------------------

# The earlier transfers and holds that voids, captures and releases name.
select_referenced_transfers = """
    select id, kind, source_wallet_id, target_wallet_id, amount, hold_id, hold_expires_at,
           created_at
    from transfers where id = any($1::bigint[])
"""

# The wallets of the grants that expirations name.
select_referenced_grants = "select id, wallet_id from grants where id = any($1::bigint[])"

# What the transfers in $1 changed in grants.
select_allocations = """
    select transfer_id, grant_id, amount from allocations where transfer_id = any($1::bigint[])
"""

# The grants a batch reads, after their wallets are locked (grants change only under that
# lock). The fields of rules.GrantState, in its order (`rows.grant_state`), then the transfer;
# the instants as microseconds since the epoch (exact: `extract` gives a numeric), which the
# batch turns into datetimes through a cache, a few times quicker than decoding a timestamptz.
_batch_grant_columns = """
    id, wallet_id, amount, remaining,
    (extract(epoch from valid_from) * 1000000)::int8 as valid_from,
    (extract(epoch from expires_at) * 1000000)::int8 as expires_at,
    expired, voided, transfer_id
"""

# The grants of the wallets in $1 with something left: by an index scan of `grants_live`, in
# its order, never a bitmap scan (migration 0009 says why; tests/core/test_batch_plans.py).
select_live_grants = f"select {_batch_grant_columns} from batch_live_grants($1::bigint[])"

# The grants in $1, and those the transfers in $2 made, the oldest first.
select_named_grants = f"""
    select {_batch_grant_columns} from grants
    where id = any($1::bigint[]) or transfer_id = any($2::bigint[])
    order by id
"""

next_grant_ids = "select array(select nextval('grants_id') from generate_series(1, $1))"

# A batch's updates from arrays of values name their rows twice: joined to the values, and by
# `id = any(...)`, through which the planner reads them by key. Joined alone, it costs the
# batch's look-ups by key above one pass over the table, and hashes the whole table once a
# batch over a range of sizes (from some tens of thousands of rows; tests/core/
# test_batch_plans.py).
update_grants = """
    update grants g
    set remaining = v.remaining, expires_at = v.expires_at, expired = v.expired,
        voided = v.voided,
        -- A new expiry (a void of an expiration) is announced again.
        announced = g.announced and g.expires_at is not distinct from v.expires_at
    from unnest($1::bigint[], $2::bigint[], $3::timestamptz[], $4::bigint[], $5::boolean[])
        as v (id, remaining, expires_at, expired, voided)
    where g.id = v.id and g.id = any($1::bigint[])
"""

# In ascending id order, so that batches never deadlock.
# What the rules read of a wallet: the fields of rules.WalletState, in its order
# (`rows.wallet_state`).
_wallet_state_columns = """
    id, unit, owner_kind, status, balance_minimum, posted, pending, owner_id,
    low_balance_threshold, top_up_to, low_balance_crossings, tracked
"""

lock_wallets = f"""
    select {_wallet_state_columns}
    from wallets where id = any($1::bigint[])
    order by id
    for update
"""

# The open holds named in $1, and those of the wallets in $2 lapsed by $3.
lock_holds = """
    select h.transfer_id, h.source_wallet_id, h.target_wallet_id, h.amount,
           h.expires_at, t.created_at
    from pending_holds h
    join transfers t on t.id = h.transfer_id
    where h.transfer_id = any($1::bigint[])
       or (h.source_wallet_id = any($2::bigint[]) and h.expires_at <= $3)
    order by h.transfer_id
    for update of h
"""

# How holds no longer open were resolved.
select_hold_resolutions = "select hold_id, kind from transfers where hold_id = any($1::bigint[])"

# Which of the transfers in $1 are voided.
select_voiding_transfers = """
    select voids_transfer_id from transfers
    where voids_transfer_id = any($1::bigint[])
"""

next_transfer_ids = "select array(select nextval('transfers_id') from generate_series(1, $1))"

# Written with COPY, in this order.
transfers_table = "transfers"
transfer_columns = (
    "id",
    "operation_id",
    "kind",
    "source_wallet_id",
    "target_wallet_id",
    "amount",
    "amount_requested",
    "caller",
    "idempotency_key",
    "key_digest",
    "request_hash",
    "note",
    "reference",
    "performed_by",
    "metadata",
    "voids_transfer_id",
    "hold_id",
    "hold_expires_at",
    "created_at",
)

# Transfers written ahead that did not happen after all.
delete_transfers = "delete from transfers where id = any($1::bigint[])"

insert_pending_holds = """
    insert into pending_holds
        (transfer_id, source_wallet_id, target_wallet_id, amount, expires_at)
    select * from unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                         $5::timestamptz[])
"""

delete_pending_holds = "delete from pending_holds where transfer_id = any($1::bigint[])"

# Its rows named twice, as `update_grants` says.
update_balances = """
    update wallets w
    set posted = v.posted, pending = v.pending, low_balance_crossings = v.crossings,
        tracked = v.tracked
    from unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
        as v (id, posted, pending, crossings, tracked)
    where w.id = v.id and w.id = any($1::bigint[])
"""

# What a batch that changed grants writes of them and of its wallets, in one statement (one
# round trip under the locks, where four took 2.5 ms more a batch of the credits load): the
# balances as `update_balances` ($1 to $5); the grants made, with their ids ($6 to $12, their
# time $19); the remainders of the grants it drew from or returned to, the most of those it
# changed ($13, $14; the others: `update_grants`, before); each transfer's allocations ($15 to
# $18: transfer, grant, the grant's wallet, the change to what is left of it). Each part names
# rows none of the others does (the grants made are not among those drawn from: `Book.
# changed_grants`): the parts see the rows as they were before the statement.
update_balances_and_grants = f"""
    with made as (
        insert into grants
            (wallet_id, id, transfer_id, amount, remaining, valid_from, expires_at, created_at)
        select w, i, t, a, r, f, e, $19::timestamptz
        from unnest($6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[], $10::bigint[],
                    $11::timestamptz[], $12::timestamptz[]) as v (w, i, t, a, r, f, e)
    ), remainders as (
        update grants g
        set remaining = v.remaining
        from unnest($13::bigint[], $14::bigint[]) as v (id, remaining)
        where g.id = v.id and g.id = any($13::bigint[])
    ), allocated as (
        insert into allocations (transfer_id, grant_id, wallet_id, amount)
        select * from unnest($15::bigint[], $16::bigint[], $17::bigint[], $18::bigint[])
    )
    {update_balances}
"""

# The holds lapsed by $1, the earliest first, at most $2.
select_lapsed_holds = """
    select transfer_id from pending_holds where expires_at <= $1
    order by expires_at limit $2
"""

# Grants (coffer.core.store.grants) --------------------------------------------------------------

# Grants past their expiry at $1 with something left, the soonest first, at most $2, with
# their units.
select_expired_grants = """
    select g.id, g.expired, w.unit from grants g join wallets w on w.id = g.wallet_id
    where g.live and g.expires_at <= $1
    order by g.expires_at, g.id
    limit $2
"""

# The expired-credits wallets of the units in $1 that have none yet.
insert_expired_wallets = """
    insert into wallets (owner_id, owner_kind, unit)
    select $2, $3, code from unnest($1::text[]) as u (code)
    on conflict (unit, owner_id) where owner_kind = 3 do nothing
"""

_grant_columns = """
    g.id, g.wallet_id, w.unit, g.transfer_id, g.amount, g.remaining, g.valid_from, g.expires_at,
    g.expired, g.created_at
"""

# Marks as announced, and returns, grants with something left expiring by $1 not announced
# yet, at most $2; those another transaction holds are left for the next time.
announce_expiring_grants = f"""
    with chosen as (
        select id from grants
        where live and expires_at <= $1 and not announced
        order by expires_at, id
        limit $2
        for update skip locked
    ), marked as (
        update grants g set announced = true from chosen where g.id = chosen.id
        returning g.*
    )
    select {_grant_columns} from marked g join wallets w on w.id = g.wallet_id
    order by g.expires_at, g.id
"""

# A wallet's grants ($1) after id $2, with something left unless $3, at most $4.
select_wallet_grants = f"""
    select {_grant_columns} from grants g join wallets w on w.id = g.wallet_id
    where g.wallet_id = $1 and g.id > $2 and ($3 or g.live)
    order by g.id
    limit $4
"""

# What a wallet's grants ($1) with something left hold at $2: what expires by then (with what
# the wallet's holds lapsed by now, $3, reserved from them), and what is not valid yet.
select_grants_at = f"""
    select (coalesce(sum(remaining) filter (where expires_at <= $2), 0)
            + {_lapsed_reserved("$1", "$3", "g.expires_at <= $2")})::bigint as expiring,
           coalesce(sum(remaining) filter (where valid_from > $2
                                           and (expires_at is null or expires_at > $2)), 0
           )::bigint as not_yet_valid
    from grants
    where wallet_id = $1 and live
"""


# Transfers and holds ---------------------------------------------------------------------------

_select_transfers = """
    select t.id, t.operation_id, t.kind, t.source_wallet_id, t.target_wallet_id, w.unit,
           t.amount, t.amount_requested, t.note, t.reference, t.performed_by, t.metadata,
           t.created_at, t.voids_transfer_id, t.hold_id, t.hold_expires_at,
           v.id as voided_by
    from transfers t
    join wallets w on w.id = t.source_wallet_id
    left join transfers v on v.voids_transfer_id = t.id
"""

select_transfer = f"{_select_transfers} where t.id = $1"

# What the transfers in $1 changed in grants, as reads answer it: by transfer, then grant.
select_transfer_allocations = """
    select transfer_id, grant_id, amount from allocations
    where transfer_id = any($1::bigint[])
    order by transfer_id, grant_id
"""

# The transfers of the operations in $1, each of at most $2 transfers: an operation's
# transfers have consecutive ids from its own (operation_id).
select_operation_transfers = f"""
    {_select_transfers}
    join unnest($1::bigint[]) as o (id)
      on t.id between o.id and o.id + $2 - 1 and t.operation_id = o.id
    order by t.id
"""

# The holds in $1 (transfers of kind $2), each with the transfer that resolved it, if any.
select_holds = """
    select h.id, h.source_wallet_id, h.target_wallet_id, w.unit, h.amount,
           h.hold_expires_at, h.created_at, r.id as resolved_by, r.kind as resolved_kind,
           r.amount as resolved_amount
    from transfers h
    join wallets w on w.id = h.source_wallet_id
    left join transfers r on r.hold_id = h.id
    where h.id = any($1::bigint[]) and h.kind = $2
"""


def select_transfers_page(
    where: TransferFilter, limit: int, before_id: int | None
) -> tuple[str, list[Any]]:
    """A page of history, newest first: the statement and its arguments. Only the conditions
    a filter sets are written, so that each page is one index range scan."""
    arguments: list[Any] = []

    def argument(value: Any, cast: str) -> str:
        arguments.append(value)
        return f"${len(arguments)}::{cast}"

    conditions = []
    if before_id is not None:
        conditions.append(f"t.id < {argument(before_id, 'bigint')}")
    if where.kinds:
        conditions.append(f"t.kind = any({argument(list(where.kinds), 'smallint[]')})")
    if where.start is not None:
        conditions.append(f"t.created_at >= {argument(where.start, 'timestamptz')}")
    if where.end is not None:
        conditions.append(f"t.created_at < {argument(where.end, 'timestamptz')}")
    if where.reference:
        conditions.append(f"t.reference = {argument(where.reference, 'text')}")
    if where.wallet_id is not None:
        # One index range scan per side of the transfer, merged.
        wallet = argument(where.wallet_id, "bigint")
        sides = [
            f"""(select t.id from transfers t where t.{side} = {wallet}
                 {"".join(" and " + condition for condition in conditions)}
                 order by t.id desc limit {limit})"""
            for side in ("source_wallet_id", "target_wallet_id")
        ]
        query = f"""
            {_select_transfers}
            where t.id in (select id from ({" union all ".join(sides)}) ids)
            order by t.id desc limit {limit}
        """
    else:
        where_clause = " and ".join(conditions) or "true"
        query = f"{_select_transfers} where {where_clause} order by t.id desc limit {limit}"
    return query, arguments


# Reports (coffer.core.store.reports) ------------------------------------------------------------

# Whether the wallet ($1) has more than $3 transfers above id $2: two index range scans, each
# bounded.
select_history_newer_beyond = """
    select (select count(*) from (
        select 1 from transfers where target_wallet_id = $1 and id > $2 limit $3 + 1
    ) t) + (select count(*) from (
        select 1 from transfers where source_wallet_id = $1 and id > $2 limit $3 + 1
    ) s) > $3
"""

# The wallet's posting transfers (kinds $4) from id $3 on, as the wallet saw them (+ in, - out):
# those above id $2 summed into one row (id null), the others one row each. Two index range
# scans, one per side (transfers_target, transfers_source).
select_history_moves = """
    with moved as (
        select id, amount as signed from transfers
        where target_wallet_id = $1 and id >= $3 and kind = any($4::smallint[])
        union all
        select id, -amount from transfers
        where source_wallet_id = $1 and id >= $3 and kind = any($4::smallint[])
    )
    select null::bigint as id, coalesce(sum(signed), 0)::bigint as signed
    from moved where id > $2
    union all
    select id, signed from moved where id <= $2
"""

# A wallet's posted balance as stored, and its unit.
select_wallet_posted = "select unit, posted from wallets where id = $1"

# The transfers of wallet $1 stamped after $2, on each side: those above the last id of that
# side stamped at or before $3 (the instant less `model.stamp_lag_s_max`), which bounds the
# walk back. Each side is one index range scan backward from its newest transfer
# (transfers_source, transfers_target) down to that id, and one forward up from it.
select_transfers_after = """
    select t.id, t.kind, t.source_wallet_id, t.target_wallet_id, t.amount, t.hold_id
    from transfers t
    where t.source_wallet_id = $1 and t.created_at > $2
      and t.id > coalesce((select max(b.id) from transfers b
                           where b.source_wallet_id = $1 and b.created_at <= $3), 0)
    union all
    select t.id, t.kind, t.source_wallet_id, t.target_wallet_id, t.amount, t.hold_id
    from transfers t
    where t.target_wallet_id = $1 and t.created_at > $2
      and t.id > coalesce((select max(b.id) from transfers b
                           where b.target_wallet_id = $1 and b.created_at <= $3), 0)
"""

# The holds of wallet $1 open now that were placed by $2 and lapse after it: they held then.
select_holds_open_at = """
    select h.transfer_id as id, h.amount
    from pending_holds h
    join transfers t on t.id = h.transfer_id
    where h.source_wallet_id = $1 and h.expires_at > $2 and t.created_at <= $2
"""

# The holds in $1 (hold transfers of kind $2) with their terms.
select_hold_terms = """
    select id, amount, created_at, hold_expires_at from transfers
    where id = any($1::bigint[]) and kind = $2
"""


def _expiring(now: str, horizon: str) -> str:
    """What a wallet's grants have left that expires by `horizon`, with what its holds lapsed
    by `now` reserved from them."""
    return f"""(case when tracked = 0 then 0 else coalesce(
            (select sum(g.remaining) from grants g
             where g.wallet_id = wallets.id and g.live
               and g.expires_at <= {horizon}), 0) end
        + case when pending = 0 then 0
          else {_lapsed_reserved("wallets.id", now, f"g.expires_at <= {horizon}")} end)"""


# The customers' and merchants' wallets ($2) of unit $1 with something posted, after id $3, at
# most $5, each with its balance at $4 and what its grants have left that expires by $6.
select_outstanding_wallets = f"""
    select {_wallet_columns("$4")},
        {_expiring("$4", "$6")}::bigint as expiring
    from wallets
    where unit = $1 and owner_kind = any($2::smallint[]) and posted > 0 and id > $3
    order by id
    limit $5
"""

# The totals of those wallets, all of them (at $4).
select_outstanding_totals = f"""
    select count(*) as wallets, coalesce(sum(posted), 0) as outstanding,
        coalesce(sum({_expiring("$4", "$3")}), 0) as expiring
    from wallets
    where unit = $1 and owner_kind = any($2::smallint[]) and posted > 0
"""

# The wallets of owner $1, of the kinds $2, of unit $3 (null: any), by id.
select_owner_wallets_of_unit = """
    select id from wallets
    where owner_id = $1 and owner_kind = any($2::smallint[]) and ($3::text is null or unit = $3)
    order by id
"""

# Wallet $1, if it is of unit $2 (null: any).
select_usage_wallet = "select id from wallets where id = $1 and ($2::text is null or unit = $2)"

# The allocations of the transfers in $1, each with its grant's terms and, if the grant was
# voided (taken back by the void of the transfer that made it), that void.
select_allocations_drawn = """
    select a.transfer_id, a.grant_id, a.wallet_id, a.amount, g.valid_from, g.expires_at,
           case when g.voided then
               (select v.id from transfers v where v.voids_transfer_id = g.transfer_id)
           end as voided_by
    from allocations a
    join grants g on g.id = a.grant_id
    where a.transfer_id = any($1::bigint[])
"""

select_transfers_by_id = f"{_select_transfers} where t.id = any($1::bigint[]) order by t.id desc"


def select_usage_scan(
    where: UsageFilter,
    wallet_ids: list[int] | None,
    kinds: list[int],
    before_id: int | None,
    scanned_max: int,
    rows_max: int,
) -> tuple[str, list[Any]]:
    """The scan of one page of the usage register: the statement and its arguments. It looks
    at the transfers newest first, at most `scanned_max` (per wallet, with `wallet_ids`),
    below `before_id`, along one index range: the source's (transfers_source), for each
    wallet of `wallet_ids`; else the reference's (transfers_reference) when the filter names
    one; else the primary key. Each row it returns is a transfer that matched (the filter and
    the `kinds`), or the last one looked at (`last_scanned`), with its wallet (0 without
    `wallet_ids`); at most `rows_max` a wallet."""
    arguments: list[Any] = []

    def argument(value: Any, cast: str) -> str:
        arguments.append(value)
        return f"${len(arguments)}::{cast}"

    matched = [f"t.kind = any({argument(kinds, 'smallint[]')})"]
    if where.start is not None:
        matched.append(f"t.created_at >= {argument(where.start, 'timestamptz')}")
    if where.end is not None:
        matched.append(f"t.created_at < {argument(where.end, 'timestamptz')}")
    if where.performed_by is not None:
        matched.append(f"t.performed_by = {argument(where.performed_by, 'text')}")
    ranges = []
    if before_id is not None:
        ranges.append(f"t.id < {argument(before_id, 'bigint')}")
    if wallet_ids is not None:
        # The unit is the wallets' own: the caller picked those of the unit.
        ranges.append("t.source_wallet_id = o.wallet_id")
        if where.reference is not None:
            matched.append(f"t.reference = {argument(where.reference, 'text')}")
    else:
        if where.reference is not None:
            ranges.append(f"t.reference = {argument(where.reference, 'text')}")
        if where.unit is not None:
            matched.append(
                "exists (select from wallets w where w.id = t.source_wallet_id"
                f" and w.unit = {argument(where.unit, 'text')})"
            )
    scanned = argument(scanned_max, "bigint")
    page = f"""
        select s.id, s.matched, s.position = {scanned} as last_scanned
        from (
            select t.id, ({" and ".join(matched)}) as matched,
                   row_number() over (order by t.id desc) as position
            from transfers t
            where {" and ".join(ranges) or "true"}
            order by t.id desc
            limit {scanned}
        ) s
        where s.matched or s.position = {scanned}
        order by s.id desc
        limit {argument(rows_max, "bigint")}
    """
    if wallet_ids is None:
        return f"select 0::bigint as wallet_id, p.* from ({page}) p", arguments
    wallets = argument(wallet_ids, "bigint[]")
    query = f"""
        select o.wallet_id, p.*
        from unnest({wallets}) as o (wallet_id)
        cross join lateral ({page}) p
    """
    return query, arguments


# Events (coffer.core.store.events) --------------------------------------------------------------

# A write transaction's record, as its last statement: the counter's update takes the row lock
# that orders the records (held until the commit), the record takes the position it gives, and
# the notification goes out at the commit.
insert_commit = """
    with counter as (
        update event_counter set position = position + 1 returning position
    ), inserted as (
        insert into commits (position, created_at, transfer_ids, balances, changes)
        select position, $1, $2, $3, $4 from counter
        returning position
    )
    select position, pg_notify('coffer_events', position::text) from inserted
"""

# The last position given, and the oldest kept (the one after the last given when none is).
select_event_bounds = """
    select c.position as head,
           coalesce((select min(position) from commits), c.position + 1) as kept_from
    from event_counter c
"""

# The wallets of an owner.
# The wallets of owner $1, of kind $2 (null: of any kind).
select_owner_wallets = (
    "select id from wallets where owner_id = $1 and ($2::smallint is null or owner_kind = $2)"
)

# Records from position $1 up to (not with) $2, at most $3.
select_commits = """
    select position, created_at, transfer_ids, balances, changes from commits
    where position >= $1 and position < $2
    order by position
    limit $3
"""

# The transfers $1 (with their callers), of the wallets $2 and the kinds $3 (null: any). As
# they were committed: an event never changes once made, so what happened later (a void) is
# left out; its own event says it.
select_event_transfers = """
    select t.id, t.operation_id, t.kind, t.source_wallet_id, t.target_wallet_id, w.unit,
           t.amount, t.amount_requested, t.note, t.reference, t.performed_by, t.metadata,
           t.created_at, t.voids_transfer_id, t.hold_id, t.hold_expires_at, t.caller,
           null::bigint as voided_by
    from transfers t
    join wallets w on w.id = t.source_wallet_id
    where t.id = any($1::bigint[])
      and ($2::bigint[] is null
           or t.source_wallet_id = any($2::bigint[]) or t.target_wallet_id = any($2::bigint[]))
      and ($3::smallint[] is null or t.kind = any($3::smallint[]))
"""

# The oldest records, at most $1, with their times: retention deletes a prefix of them.
select_oldest_commits = "select position, created_at from commits order by position limit $1"

delete_commits_through = "delete from commits where position <= $1"

# The check of the books (coffer.core.audit). Each query returns the first $n mismatches in
# order, each with the count of all of them.

count_transfers = "select count(*) from transfers"

count_wallets = "select count(*) from wallets"

audit_units_unbalanced = """
select unit as subject, sum(posted) as stored, 0 as expected, count(*) over () as count
from wallets
group by unit
having sum(posted) <> 0
order by unit
limit $1
"""

# What flowed in and what flowed out, summed apart: two parallel scans of the journal are
# faster than one that makes two rows of each transfer.
audit_posted_mismatched = """
with inflow as (
    select target_wallet_id as wallet_id, sum(amount) as amount
    from transfers where kind = any($1::smallint[]) group by target_wallet_id
), outflow as (
    select source_wallet_id as wallet_id, sum(amount) as amount
    from transfers where kind = any($1::smallint[]) group by source_wallet_id
)
select w.id as subject, w.posted as stored,
       coalesce(i.amount, 0) - coalesce(o.amount, 0) as expected, count(*) over () as count
from wallets w
left join inflow i on i.wallet_id = w.id
left join outflow o on o.wallet_id = w.id
where w.posted <> coalesce(i.amount, 0) - coalesce(o.amount, 0)
order by w.id
limit $2
"""

audit_pending_mismatched = """
select w.id as subject, w.pending as stored, coalesce(h.amount, 0) as expected,
       count(*) over () as count
from wallets w
left join (select source_wallet_id, sum(amount) as amount
           from pending_holds group by source_wallet_id) h on h.source_wallet_id = w.id
where w.pending <> coalesce(h.amount, 0)
order by w.id
limit $1
"""

# The untracked balance: what the grants do not hold.
audit_floors_broken = """
select id as subject, posted - pending - tracked as stored, balance_minimum as expected,
       count(*) over () as count
from wallets
where balance_minimum is not null and posted - pending - tracked < balance_minimum
order by id
limit $1
"""

audit_tracked_mismatched = """
select w.id as subject, w.tracked as stored, coalesce(g.remaining, 0) as expected,
       count(*) over () as count
from wallets w
left join (select wallet_id, sum(remaining) as remaining
           from grants group by wallet_id) g on g.wallet_id = w.id
where w.tracked <> coalesce(g.remaining, 0)
order by w.id
limit $1
"""

audit_grants_mismatched = """
select g.id as subject, g.remaining as stored, g.amount + coalesce(a.amount, 0) as expected,
       count(*) over () as count
from grants g
left join (select grant_id, sum(amount) as amount
           from allocations group by grant_id) a on a.grant_id = g.id
where g.remaining <> g.amount + coalesce(a.amount, 0)
order by g.id
limit $1
"""

# What the expirations ($1: their kind) took from each grant.
audit_expired_mismatched = """
select g.id as subject, g.expired as stored, coalesce(e.amount, 0) as expected,
       count(*) over () as count
from grants g
left join (select a.grant_id, -sum(a.amount) as amount
           from allocations a join transfers t on t.id = a.transfer_id
           where t.kind = $1 group by a.grant_id) e on e.grant_id = g.id
where g.expired <> coalesce(e.amount, 0)
order by g.id
limit $2
"""

# An open hold is a hold transfer no other transfer resolved (captured, released, expired:
# each names it in hold_id); pending_holds must hold exactly those, with their terms.
audit_holds_mismatched = """
with unresolved as (
    select t.id, t.source_wallet_id, t.target_wallet_id, t.amount, t.hold_expires_at
    from transfers t
    where t.kind = $1::smallint
      and not exists (select from transfers r where r.hold_id = t.id)
)
select coalesce(u.id, p.transfer_id) as subject, coalesce(p.amount, 0) as stored,
       coalesce(u.amount, 0) as expected, count(*) over () as count
from unresolved u
full join pending_holds p on p.transfer_id = u.id
where (u.source_wallet_id, u.target_wallet_id, u.amount, u.hold_expires_at)
      is distinct from (p.source_wallet_id, p.target_wallet_id, p.amount, p.expires_at)
order by 1
limit $2
"""

audit_voided_twice = """
select voids_transfer_id as subject, count(*) as stored, 1 as expected, count(*) over () as count
from transfers
where voids_transfer_id is not null
group by voids_transfer_id
having count(*) > 1
order by 1
limit $1
"""


# The preload of history (coffer.core.preload).

select_wallet_states = f"""
select {_wallet_state_columns}
from wallets where id = any($1::bigint[])
"""

# Each transfer: a source drawn among the wallets, a target among the others (never the
# source), an amount from 1 to $8; the balances change by what the chunk moved, in the same
# statement. $1 the wallets, $2 and $3 the chunk's first and last number, $4 the count, $5 the
# latest time, $6 the spread, $7 the kind, $9 who performed them; each keyed, when $10 (the
# caller) is not null, by $11 followed by its number, with that key's digest, the chunk's
# $12[number - $2 + 1].
insert_preload_chunk = """
with chosen as (
    select nextval('transfers_id') as id,
           g,
           floor(random() * cardinality($1::bigint[]))::int as source_index,
           floor(random() * (cardinality($1::bigint[]) - 1))::int as offset_index,
           1 + floor(random() * $8::bigint)::bigint as amount
    from generate_series($2::bigint, $3::bigint) as g
), inserted as (
    insert into transfers (id, operation_id, kind, source_wallet_id, target_wallet_id, amount,
                           performed_by, created_at, caller, idempotency_key, key_digest)
    select id, id, $7::smallint,
           ($1::bigint[])[source_index + 1],
           ($1::bigint[])[(source_index + 1 + offset_index) % cardinality($1::bigint[]) + 1],
           amount,
           $9::text,
           $5::timestamptz - $6::interval * (1 - g::float8 / $4::float8),
           $10::text,
           case when $10::text is not null then $11::text || g end,
           keys.digest
    from chosen
    -- Joined, not subscripted: finding an element of an array of bytea walks it from the start.
    left join unnest($12::bytea[]) with ordinality as keys (digest, position)
      on keys.position = g - $2::bigint + 1
    returning source_wallet_id, target_wallet_id, amount
), changes as (
    select wallet_id, sum(change) as change from (
        select source_wallet_id as wallet_id, -amount as change from inserted
        union all
        select target_wallet_id, amount from inserted
    ) as postings
    group by wallet_id
)
update wallets set posted = wallets.posted + changes.change
from changes where wallets.id = changes.wallet_id
"""

# After a bulk load: what autovacuum would otherwise do over the whole load at once, later
# (marking its pages all-visible, dropping the wallets' replaced rows), and the planner's
# statistics. Not in a transaction block.
vacuum_preloaded = "vacuum (analyze) transfers, wallets"
