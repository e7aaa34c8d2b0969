-- Reads straight from the database (`credbroker audit query --database-url`, `audit tail`)
-- are recorded like reads through the broker: an `audit_read` row, before any row is shown.
--
-- credbroker_auditor may not INSERT (it must not be able to forge decisions), so the row is
-- written by this function, which runs as its owner and can write nothing but an audit_read
-- row. The reader is named by session_user, the role that logged in, which the caller cannot
-- choose (set role changes current_user only); what the caller says it reads goes in detail.
create function record_audit_read(what text) returns uuid
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    row_id uuid := gen_random_uuid();
begin
    if what is null or what = '' or length(what) > 2000 then
        raise exception 'record_audit_read: describe the read in 1 to 2000 characters';
    end if;
    insert into audit_events (id, occurred_at, request_id, decision, target, subject, detail)
    values (row_id, clock_timestamp(), 'database:' || row_id, 'audit_read', 'audit_log', session_user,
            'database role ' || session_user || ': ' || what);
    return row_id;
end
$$;

revoke all on function record_audit_read(text) from public;

do $$
begin
    if exists (select from pg_roles where rolname = 'credbroker_auditor') then
        execute 'grant execute on function record_audit_read(text) to credbroker_auditor';
    end if;
end
$$;
