"""A batch's set-based statements over tables that grow (balances, grants, refusals) find their
rows through the primary key, whatever the size of the table. Joined to arrays of values alone,
they were planned, over a range of table sizes from some tens of thousands of rows, as a hash
of the whole table once a batch (the batch's look-ups by key costed above one pass): 17 ms a
batch of 866 over 50,000 wallets, 24 ms over 65,000 grants; 4 and 6 ms through the key.
The live grants of a batch's wallets are read by an index scan, never a bitmap scan
(migration 0009 says why)."""

from __future__ import annotations

import asyncpg

from coffer.core.store import sql

rows = 50_000
named = 900


async def test_a_batch_reads_its_rows_by_key(database_url: str) -> None:
    connection = await asyncpg.connect(database_url)
    try:
        await connection.execute(
            "insert into units (code, kind, name, scale) values ('seat', 2, 'Seat', 0)"
        )
        await connection.execute(
            "insert into wallets (owner_id, owner_kind, unit, balance_minimum)"
            " select 'owner-' || n, 1, 'seat', 0 from generate_series(1, $1::int) n",
            rows,
        )
        await connection.execute(
            "insert into grants"
            " (wallet_id, id, transfer_id, amount, remaining, valid_from, created_at)"
            " select n, n, n, 10, 10, now(), now() from generate_series(1, $1::int) n",
            rows,
        )
        await connection.execute(
            "insert into refusals"
            " (caller, idempotency_key, request_hash, reason, message, created_at)"
            " select 'shop', 'key-' || n, '\\x00', 'INSUFFICIENT_FUNDS', '', now()"
            " from generate_series(1, $1::int) n",
            rows,
        )
        for table in ("wallets", "grants", "refusals"):
            await connection.execute(f"analyze {table}")
        ids = list(range(1, rows, rows // named))
        zeros = [0] * len(ids)
        statements = (
            ("wallets", sql.update_balances, (ids, zeros, zeros, zeros, zeros)),
            *(
                (
                    table,
                    sql.update_balances_and_grants,
                    (ids, zeros, zeros, zeros, zeros, *[[]] * 7, ids, zeros, *[[]] * 4, None),
                )
                for table in ("wallets", "grants")
            ),
            (
                "grants",
                sql.update_grants,
                (ids, zeros, [None] * len(ids), zeros, [False] * len(ids)),
            ),
            (
                "refusals",
                sql.select_stored_keys,
                ([b"\x00" * 16], ["shop"] * len(ids), [f"key-{n}" for n in ids]),
            ),
        )
        for table, statement, arguments in statements:
            plan = await _plan(connection, statement, *arguments)
            assert f"Seq Scan on {table}" not in plan, plan
            assert f"{table}_pkey" in plan, plan
        # The live grants of a batch's wallets: by an index scan of `grants_live`, not by a
        # bitmap (migration 0009 says why), which the planner picks for these values alone.
        # Wallets keep the grants they spent: two each.
        await connection.execute(
            "insert into grants"
            " (wallet_id, id, transfer_id, amount, remaining, valid_from, created_at)"
            " select n % $1::int + 1, n, n, 10, 0, now(), now()"
            " from generate_series($1::int + 1, 3 * $1::int) n",
            rows,
        )
        await connection.execute("analyze grants")
        # Left to itself, the planner reads them by bitmap: why the function exists.
        live = "select * from grants where wallet_id = any($1::bigint[]) and live"
        assert "Bitmap" in await _plan(connection, live, ids)
        async with connection.transaction():
            found = await connection.fetch(sql.select_live_grants, ids)
            # Rows fetched through the index count only a plain index scan; a scan of the
            # table counts on the table.
            fetched, table_scans = await connection.fetchrow(
                "select pg_stat_get_xact_tuples_fetched('grants_live'::regclass),"
                " pg_stat_get_xact_numscans('grants'::regclass)"
            )
        assert (fetched, table_scans) == (len(ids), 0)
        # The live grant of each wallet (its id the wallet's), in the wallets' order.
        assert found == await connection.fetch(sql.select_named_grants, ids, [])
    finally:
        await connection.close()


async def _plan(connection: asyncpg.Connection, statement: str, *arguments: object) -> str:
    found = await connection.fetch("explain " + statement, *arguments)
    return "\n".join(row[0] for row in found)
