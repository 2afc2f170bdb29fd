-- The live grants of a batch's wallets, read by a plain index scan of `grants_live`, never a
-- bitmap scan (`sql.select_live_grants` calls it).
--
-- A grant spent to nothing leaves its entry in `grants_live` until a vacuum comes by (the row
-- no longer matches the index's predicate). An index scan that meets such an entry marks it
-- dead in the index, once, and later scans skip it; a bitmap scan marks nothing, and visits
-- the row of each such entry again in the table, batch after batch. Measured under the credits
-- load of `coffer bench` (grants spent and made all the time): 47,158 entries visited for the
-- 2,532 grants of a batch's 632 wallets, 6–11 ms by bitmap; the same read by index scan once
-- it had marked them, 1.7 ms. Given a batch's ids as values, the planner picks a bitmap (or a
-- whole scan, when they are most of the wallets with grants); a function that sets the plan
-- types it may use keeps to the index, whatever the values.

create function batch_live_grants(wallet_ids bigint[])
returns setof grants
language sql stable
set enable_bitmapscan = off
set enable_seqscan = off
as $$
    select * from grants where wallet_id = any(wallet_ids) and live order by wallet_id, id
$$;
