-- The audit writer inserts many rows per statement (group commit). A row-level trigger ran a
-- PL/pgSQL call and a settings lookup for each of them; one statement-level trigger over the
-- statement's new rows does the same work once per batch. Same events, same payloads.
drop trigger audit_events_to_outbox on audit_events;
drop function event_outbox_from_audit();

create function event_outbox_from_audit_batch() returns trigger language plpgsql as $$
begin
    if (select enabled from event_outbox_settings) then
        insert into event_outbox (kind, event_key, payload)
        select
            'credential.' || n.decision,
            n.id::text,
            jsonb_build_object(
                'id', n.id, 'occurred_at', n.occurred_at, 'decision', n.decision,
                'issuer', n.issuer, 'subject', n.subject, 'role', n.role,
                'target', n.target, 'backend', n.backend,
                'project_path', n.project_path, 'ref', n.ref, 'sha', n.sha,
                'expires_at', n.expires_at, 'credential_sha256', n.credential_sha256,
                'credential_handle', n.credential_handle
            )
        from new_rows n
        where n.decision in ('issued', 'revoked')
        order by n.recorded_at, n.id;
    end if;
    return null;
end
$$;

create trigger audit_events_to_outbox
    after insert on audit_events
    referencing new table as new_rows
    for each statement execute function event_outbox_from_audit_batch();
