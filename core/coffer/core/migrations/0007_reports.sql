-- Reports (coffer.core.store.reports). The outstanding overview reads a unit's wallets by id,
-- and sums them all: without an index on the unit, every page would read the wallets of every
-- unit. A wallet's unit never changes, so the index costs one entry per wallet made and
-- nothing on the hot path: the updates of balances touch no indexed column and stay heap-only.
--
-- The other reports need no index of their own: the usage register reads transfers along
-- transfers_source, transfers_reference or the primary key, and allocations by transfer; a
-- past balance and the balances after history entries along transfers_source and
-- transfers_target.

create index wallets_unit on wallets (unit, id);
