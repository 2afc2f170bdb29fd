-- Refusals: operations the ledger refused for a reason of state (insufficient funds, a
-- transfer already voided, a hold no longer pending, an unknown wallet…), kept under their
-- idempotency key with the digest of the request, so that a retry with the same key and
-- request gets the same refusal forever, even after what made it fail has changed. Written in
-- the same database transaction as the batch's postings. Requests refused as invalid never
-- ran and are not kept. Successes keep their keys on their transfers (0001); a batch looks a
-- key up in both tables, after it holds its wallets' locks.

create table refusals (
    caller text not null,
    idempotency_key text not null,
    request_hash bytea not null,
    reason text not null,
    message text not null,
    created_at timestamptz not null,
    primary key (caller, idempotency_key)
);
