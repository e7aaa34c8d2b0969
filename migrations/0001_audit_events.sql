-- One append-only row per decision. Identity claims are columns so the security team can
-- filter without jsonb gymnastics; all claims are kept as jsonb for anything else.
create table audit_events (
    id uuid primary key,
    occurred_at timestamptz not null,
    recorded_at timestamptz not null default clock_timestamp(),
    request_id text not null,
    decision text not null check (decision in ('issued', 'denied', 'failed', 'revoked')),
    code text,
    detail text,
    issuer text,
    subject text,
    job_token_sha256 text,
    project_path text,
    job_project_path text,
    namespace_path text,
    pipeline_id text,
    job_id text,
    ref text,
    ref_type text,
    sha text,
    user_login text,
    environment text,
    runner_id bigint,
    claims jsonb,
    role text,
    target text,
    backend text,
    requested_ttl_seconds integer,
    granted_ttl_seconds integer,
    expires_at timestamptz,
    job_deadline timestamptz,
    client_addr text,
    user_agent text,
    credential_sha256 text,
    credential_handle text,
    -- Greater than one only for aggregated rows of unattributable denials.
    occurrences integer not null default 1 check (occurrences >= 1),
    check (decision <> 'issued' or (credential_sha256 is not null and expires_at is not null))
);

create index audit_events_recorded_at on audit_events (recorded_at desc);
create index audit_events_project_path on audit_events (project_path, occurred_at desc);
create index audit_events_job_id on audit_events (job_id);

create function audit_events_reject_change() returns trigger language plpgsql as $$
begin
    raise exception 'audit_events is append-only';
end
$$;

create trigger audit_events_append_only
    before update or delete or truncate on audit_events
    for each statement execute function audit_events_reject_change();

-- Replay protection: each (issuer, jti, role) may be used max_uses_per_token times. The
-- primary key makes concurrent replicas agree without any lock of ours.
create table token_uses (
    issuer text not null,
    jti text not null,
    role text not null,
    use_number integer not null check (use_number >= 1),
    token_expires_at timestamptz not null,
    used_at timestamptz not null default clock_timestamp(),
    primary key (issuer, jti, role, use_number)
);

create index token_uses_token_expires_at on token_uses (token_expires_at);
