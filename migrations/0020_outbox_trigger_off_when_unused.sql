-- With no publisher configured, the outbox trigger still ran for every INSERT into
-- audit_events, only to find the outbox disabled: a sixth of a lone exchange's statement in
-- Postgres (bench/README.md, issue 18). Turning the outbox on or off now also enables or
-- disables the trigger itself. ALTER TABLE needs the table's owner, which the broker's own
-- role (credbroker_broker) is not, so the switch is a function that runs as the owner, and
-- only the broker may call it: whoever can call it can stop the SIEM stream. The setting stays
-- the one source of truth, and the trigger still checks it.
create function event_outbox_set_enabled(turn_on boolean) returns void
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
    update event_outbox_settings set enabled = turn_on;
    -- Only a change takes ALTER TABLE's lock, which waits for inserts in flight.
    if turn_on is distinct from (
        select tgenabled <> 'D' from pg_trigger
        where tgrelid = 'audit_events'::regclass and tgname = 'audit_events_to_outbox'
    ) then
        if turn_on then
            alter table audit_events enable trigger audit_events_to_outbox;
        else
            alter table audit_events disable trigger audit_events_to_outbox;
        end if;
    end if;
end
$$;

revoke all on function event_outbox_set_enabled(boolean) from public;

select event_outbox_set_enabled((select enabled from event_outbox_settings));

do $$
begin
    if exists (select from pg_roles where rolname = 'credbroker_broker') then
        execute 'grant execute on function event_outbox_set_enabled(boolean) to credbroker_broker';
    end if;
end
$$;
