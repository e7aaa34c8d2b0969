-- The verified claims of each row as `json`, which keeps the text, instead of `jsonb`, which
-- takes it apart (issue 18). Building jsonb from a job token's claims (about 900 bytes from
-- GitLab) was the costliest part of receiving a row: 11% of Postgres' time in the writer's
-- statement at 64 connections, about 7 us a row, on the one statement every response in its
-- batch waits for. `json` only checks that the text is JSON (about a quarter of that); jsonb is
-- built when a row is read for its claims (one record at a time: the detail view, the
-- lifecycle, a revocation selector) and when it is sealed, off the exchange's path. The text is
-- also the token's own where the broker can (src/audit/record.rs): key order and all.
--
-- A new column, not `alter column claims type json`: that rewrites the whole table and every
-- index under an exclusive lock, minutes at 10M rows with no exchange able to write its row.
-- Rows written before this migration keep their claims in `claims` (jsonb); every read takes
-- `coalesce(claims_json::jsonb, claims)`. The broker only ever writes text that jsonb reads as
-- the broker read it, so that cast cannot fail on a row it wrote (and a row's sealed content,
-- `to_jsonb(row)`, is what it was with jsonb). Null on old rows, so their sealed hashes stay.
alter table audit_events add column claims_json json;
alter table audit_events alter column claims_json set statistics 0;

do $$
begin
    if exists (select from pg_roles where rolname = 'credbroker_broker') then
        execute 'grant insert (claims_json) on audit_events to credbroker_broker';
    end if;
end
$$;
