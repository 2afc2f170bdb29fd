-- Grants: funds a wallet received that carry terms (a start, an expiry), with what is left of
-- them, and the allocations that say which grants each transfer drew from or returned to.
--
-- Funds that never expire and are valid when received are not kept as grants: they are the
-- wallet's untracked balance, posted - pending - tracked, where `tracked` is the sum of its
-- grants' remainders (below 0, the untracked balance is what the wallet owes). A wallet that
-- never receives such funds has no grant row and pays nothing for grants. Grants change only
-- under their wallet's row lock, which every batch takes first.
--
-- allocations: for each transfer, the change it made to each grant's remainder: below 0 drawn
-- (a debit, a payment, a transfer, a hold, an expiration), above 0 returned (a void, a hold
-- released, captured in part, or expired). For every grant,
-- remaining = amount + the sum of its allocations; expired sums what runs expired.

alter table wallets
    add column tracked bigint not null default 0,
    -- The floor holds for the untracked balance, and so for the available balance.
    drop constraint available_above_minimum,
    add constraint untracked_above_minimum check (
        balance_minimum is null or posted - pending - tracked >= balance_minimum
    );

create table grants (
    wallet_id bigint not null,
    id bigint primary key,
    -- The transfer that brought the funds in.
    transfer_id bigint not null,
    amount bigint not null check (amount > 0),
    remaining bigint not null check (remaining >= 0 and remaining <= amount),
    valid_from timestamptz not null,
    expires_at timestamptz,
    expired bigint not null default 0,
    -- Taken back by the void of the transfer that made it: a hold's reservation no longer
    -- returns to it.
    voided boolean not null default false,
    -- Whether the stream has said it expires soon.
    announced boolean not null default false,
    created_at timestamptz not null,
    -- Whether something is left: what the partial indexes say, so that no index names
    -- `remaining`, and a draw that leaves something is a HOT update (no index entry written).
    live boolean generated always as (remaining > 0) stored,
    constraint expires_after_start check (expires_at is null or expires_at > valid_from)
) with (fillfactor = 70);

create sequence grants_id owned by grants.id;

create index grants_live on grants (wallet_id, id) where live;
create index grants_wallet on grants (wallet_id, id);
create index grants_expiry on grants (expires_at, id) where live and expires_at is not null;
create index grants_transfer on grants (transfer_id);

create table allocations (
    transfer_id bigint not null,
    grant_id bigint not null,
    wallet_id bigint not null,
    amount bigint not null check (amount <> 0),
    primary key (transfer_id, grant_id)
);

-- No index by grant: nothing reads a grant's allocations but the check of the books, which
-- reads them all.
