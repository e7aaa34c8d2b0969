-- Tamper evidence (issue 7): signed checkpoints over the audit log, and database roles that
-- can append to it but not change it.

-- One checkpoint seals the rows after the previous one, in (tx, id) order, up to the
-- horizon of finished transactions. It keeps each row's id and SHA-256 (so `audit verify`
-- can name the row that changed), a hash chain over them starting from the previous
-- checkpoint's root, and a JWS over all of it made with the broker's seal key.
create table audit_checkpoints (
    number bigint primary key check (number >= 1),
    first_tx xid8 not null,
    first_id uuid not null,
    last_tx xid8 not null,
    last_id uuid not null,
    row_count integer not null check (row_count >= 1),
    first_occurred_at timestamptz not null,
    last_occurred_at timestamptz not null,
    event_ids uuid[] not null,
    -- row_count SHA-256 digests of 32 bytes, concatenated in event_ids order.
    row_hashes bytea not null,
    previous_root bytea not null,
    root bytea not null,
    key_id text not null,
    signature text not null,
    sealed_by text not null,
    sealed_at timestamptz not null default clock_timestamp()
);

create index audit_checkpoints_last_occurred_at on audit_checkpoints (last_occurred_at);

create trigger audit_checkpoints_append_only
    before update or delete or truncate on audit_checkpoints
    for each statement execute function audit_events_reject_change();

-- credbroker_broker: what `serve` needs. It may append to the audit tables and read them,
-- never change or delete them (nor drop the append-only triggers: it owns nothing).
-- credbroker_auditor: read-only, for `audit query --database-url`, `audit verify` and Looker.
-- Roles belong to the cluster, so they are created once and only if missing; a migrating user
-- without CREATEROLE gets a warning and the roles must be created by hand (README, Auditing).
do $$
begin
    if not exists (select from pg_roles where rolname = 'credbroker_broker') then
        create role credbroker_broker nologin;
    end if;
    if not exists (select from pg_roles where rolname = 'credbroker_auditor') then
        create role credbroker_auditor nologin;
    end if;
exception
    when insufficient_privilege then
        raise warning 'cannot create roles credbroker_broker and credbroker_auditor: create them by hand and rerun the grants of migration 0010';
    when duplicate_object or unique_violation then
        -- Another database on this cluster is migrating at the same moment and created them.
        null;
end
$$;

do $$
begin
    if exists (select from pg_roles where rolname = 'credbroker_broker') then
        execute 'grant usage on schema public to credbroker_broker, credbroker_auditor';
        execute 'grant select, insert on audit_events, audit_checkpoints, gogs_deliveries to credbroker_broker';
        execute 'grant select, insert, update, delete on token_uses, revocations, freezes, event_outbox to credbroker_broker';
        -- gogs_deliveries records the forwarding outcome after the fact.
        execute 'grant update (forward_url, forward_status) on gogs_deliveries to credbroker_broker';
        execute 'grant select, update on event_outbox_settings to credbroker_broker';
        execute 'grant select on _sqlx_migrations to credbroker_broker';
        execute 'grant usage on all sequences in schema public to credbroker_broker';
        execute 'grant select on audit_events, audit_checkpoints, revocations, freezes, issuance_daily, denials_recent, long_lived_overshoots to credbroker_auditor';
    end if;
end
$$;
