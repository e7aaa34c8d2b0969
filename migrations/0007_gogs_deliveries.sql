-- Gogs webhook deliveries the broker accepted (signature checked). The delivery id is the
-- primary key, so a replayed delivery cannot be recorded, or acted on, twice.
create table gogs_deliveries (
    delivery_id text primary key,
    hook text not null,
    event text not null,
    -- 'accepted' events are parsed and may get a delivery token; 'ignored' ones are only kept.
    outcome text not null check (outcome in ('accepted', 'ignored')),
    repository text,
    ref text,
    ref_type text,
    before_sha text,
    after_sha text,
    pusher text,
    payload_sha256 text not null,
    received_at timestamptz not null default clock_timestamp(),
    -- The delivery token handed out, by fingerprint only, and when it stops working.
    token_sha256 text,
    token_expires_at timestamptz,
    forward_url text,
    forward_status text
);

create index gogs_deliveries_received_at on gogs_deliveries (received_at desc);
create index gogs_deliveries_repository on gogs_deliveries (repository, received_at desc);

-- Events for the SIEM stream. Rows are written by triggers in the same transaction as the row
-- they describe, so an issued credential or an accepted delivery cannot commit without its
-- event; a publisher claims pending rows (skip locked), sends them and marks them delivered,
-- retrying with backoff while the sink is down. Nothing is queued unless a publisher is
-- configured (event_outbox_settings.enabled), so an unused outbox cannot grow.
create table event_outbox (
    id bigserial primary key,
    kind text not null,
    event_key text not null,
    payload jsonb not null,
    created_at timestamptz not null default clock_timestamp(),
    attempts integer not null default 0,
    next_attempt_at timestamptz not null default clock_timestamp(),
    delivered_at timestamptz,
    last_error text
);

create index event_outbox_pending on event_outbox (next_attempt_at) where delivered_at is null;

create table event_outbox_settings (
    only_row boolean primary key default true check (only_row),
    enabled boolean not null default false
);
insert into event_outbox_settings (only_row, enabled) values (true, false);

create function event_outbox_from_audit() returns trigger language plpgsql as $$
begin
    if new.decision in ('issued', 'revoked') and (select enabled from event_outbox_settings) then
        insert into event_outbox (kind, event_key, payload) values (
            'credential.' || new.decision,
            new.id::text,
            jsonb_build_object(
                'id', new.id, 'occurred_at', new.occurred_at, 'decision', new.decision,
                'issuer', new.issuer, 'subject', new.subject, 'role', new.role,
                'target', new.target, 'backend', new.backend,
                'project_path', new.project_path, 'ref', new.ref, 'sha', new.sha,
                'expires_at', new.expires_at, 'credential_sha256', new.credential_sha256,
                'credential_handle', new.credential_handle
            )
        );
    end if;
    return null;
end
$$;

create trigger audit_events_to_outbox
    after insert on audit_events
    for each row execute function event_outbox_from_audit();

create function event_outbox_from_gogs_delivery() returns trigger language plpgsql as $$
begin
    if (select enabled from event_outbox_settings) then
        insert into event_outbox (kind, event_key, payload) values (
            'gogs.delivery',
            new.delivery_id,
            jsonb_build_object(
                'delivery_id', new.delivery_id, 'hook', new.hook, 'event', new.event,
                'outcome', new.outcome, 'repository', new.repository, 'ref', new.ref,
                'ref_type', new.ref_type, 'before', new.before_sha, 'after', new.after_sha,
                'pusher', new.pusher, 'received_at', new.received_at
            )
        );
    end if;
    return null;
end
$$;

create trigger gogs_deliveries_to_outbox
    after insert on gogs_deliveries
    for each row execute function event_outbox_from_gogs_delivery();
