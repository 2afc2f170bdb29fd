-- The event stream: one record per committed write transaction, in commit order.
--
-- event_counter holds one row, the position of the last record. Each write transaction
-- updates it as its last statement (coffer.core.store.events): the row lock that update takes
-- is held until the transaction commits, so positions are given in commit order, with no gap
-- (a transaction that rolls back gives its position back), and a reader that sees a position
-- sees every position below it.
--
-- commits holds the records. A record names the transfers its transaction wrote, in the order
-- they were applied (the journal holds the transfers themselves), with the balances of each
-- transfer's source and target after it: four int64 per transfer (source posted, source
-- pending, target posted, target pending), little-endian, in `balances`. The other changes
-- (a unit or a wallet created, a wallet cancelled, a balance alert set, a low balance, a top-up
-- requested) are in `changes`, a JSON array, in order, after the transfers, each with the
-- wallets it concerns. Retention deletes the oldest records, always a prefix of the positions:
-- the positions kept are contiguous.

create table event_counter (
    single boolean primary key default true check (single),
    position bigint not null
);

insert into event_counter (position) values (0);

create table commits (
    position bigint primary key,
    created_at timestamptz not null,
    transfer_ids bigint[] not null,
    balances bytea not null,
    changes jsonb not null
);

-- Low balance: below `low_balance_threshold` (available, in minor units; null: no alert) the
-- ledger says so once per crossing, and with `top_up_to` asks for a top-up to that amount;
-- `low_balance_crossings` counts the crossings, naming each top-up request.
alter table wallets
    add column low_balance_threshold bigint,
    add column top_up_to bigint,
    add column low_balance_crossings bigint not null default 0;
