-- The journal's idempotency keys indexed by one 16-byte digest instead of two texts.
--
-- 0001 indexed every keyed transfer under (caller, idempotency_key): two texts in each entry
-- of a unique B-tree, as long as the callers' keys. The index now holds `key_digest`, the
-- digest of the two (coffer.core.model.key_digest: 4 bytes of SHA-256 over the caller and the
-- key without its last 3 characters, then 12 bytes of SHA-256 over the caller and the key,
-- the caller after its UTF-8 length as 4 bytes big-endian). The first transfer of a keyed
-- operation carries it, beside its caller and key, which stay: the history, the reports and
-- the check of a replay read them, and a lookup by digest compares them, so two keys that
-- share a digest are told apart (the later is refused, IDEMPOTENCY_KEY_UNAVAILABLE). Refusals
-- keep their own primary key on the two texts (0002): they are few. Wallets keep theirs too.
--
-- Upgrading: the migration takes an ACCESS EXCLUSIVE lock on transfers (its first statement
-- on the table) and holds it to its end, for as long as the backfill of every keyed transfer
-- takes: no read or write of the journal goes through meanwhile. Stop the servers of the
-- older version before migrating, and start the new ones after. An older server left running
-- writes keys without a digest, which `transfers_key_digest_present` refuses: its batches fail
-- rather than apply an operation twice (the old server would look keys up in an index no
-- longer there).
--
-- The digest of the backfill is computed in SQL over the UTF-8 bytes of the texts, which are
-- the database's own bytes only in a database encoded in UTF8: any other is refused here. A
-- transfer with a key and no caller (which no version of the ledger writes) is digested as if
-- its caller were empty, which no caller is.

do $$
begin
    if pg_catalog.getdatabaseencoding() <> 'UTF8' then
        raise exception 'coffer needs a database encoded in UTF8; this one is %',
            pg_catalog.getdatabaseencoding()
            using hint = 'create the database with ENCODING ''UTF8'' and migrate that one';
    end if;
end
$$;

alter table transfers add column key_digest bytea;

-- First: the backfill then writes one index fewer.
drop index transfers_idempotency;

create function pg_temp.key_digest(caller text, idempotency_key text) returns bytea
language sql immutable
as $$
    select substr(sha256(scope || convert_to(left(idempotency_key, -3), 'UTF8')), 1, 4)
        || substr(sha256(scope || convert_to(idempotency_key, 'UTF8')), 1, 12)
    from (
        select int4send(octet_length(convert_to(coalesce(caller, ''), 'UTF8')))
            || convert_to(coalesce(caller, ''), 'UTF8') as scope
    ) as scoped
$$;

-- The backfill as a rewrite of the table, not an update of its keyed rows: one pass, and the
-- table and its indexes written anew, where an update would leave a dead version of every
-- keyed transfer behind in the table and in each index.
alter table transfers alter column key_digest type bytea using
    case when idempotency_key is not null then pg_temp.key_digest(caller, idempotency_key) end;

drop function pg_temp.key_digest(text, text);

create unique index transfers_key_digest on transfers (key_digest)
    where key_digest is not null;

alter table transfers add constraint transfers_key_digest_present
    check ((idempotency_key is null) = (key_digest is null));
