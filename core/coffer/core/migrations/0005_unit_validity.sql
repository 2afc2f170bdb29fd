-- A unit's default validity: how long a credit of the unit stays valid when it names no expiry
-- of its own, as an ISO 8601 duration in the canonical form coffer.core.validity writes
-- ("P6M", "P30D", "PT43200S"); '' for none, which every unit made before this migration has.

alter table units add column default_validity text not null default '';
