-- The fingerprint filter (`credential_sha256=` on /audit, `credbroker audit query --credential-sha256`)
-- only ever asks for one whole fingerprint (src/audit/filter.rs refuses anything but 64 hex
-- digits): equality, which a hash index answers as well as a btree. On the insert path the
-- btree was the costliest index of an issued row: every fingerprint is random, so each insert
-- descends to a random leaf comparing 64-character keys under the database's collation, about
-- 5 µs of Postgres per row of the 30 an issued row costs in a 28-row INSERT; the hash index
-- adds 1 to 2 (bench/README.md, issue 18). It is also a fraction of the btree's size.
--
-- `if not exists`: on a big table, create it first by hand without blocking inserts
-- (`create index concurrently audit_events_credential_sha256_hash on audit_events using hash
-- (credential_sha256)`), and this migration then only drops the btree.
create index if not exists audit_events_credential_sha256_hash on audit_events using hash (credential_sha256);
drop index audit_events_credential_sha256;
