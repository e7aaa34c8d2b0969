-- bench/audit_scale: fills audit_events with :rows rows shaped like a busy GitLab
-- installation's 90 days (bench/README.md, "audit_scale"). Run by bench/audit_scale with
-- psql -v rows=N on a cluster with wal_level = minimal: the table is truncated and filled in
-- one transaction, so the rows skip the WAL and are written once.
--
-- Shape, per row number i (oldest first):
--   * time: spread evenly over the 90 days up to now, with up to 2 s of jitter;
--   * tx: 4 rows per inserting transaction (a group-commit batch), in time order; values
--     below 2^32, which the script makes lie below the horizon by starting the cluster in
--     transaction-id epoch 1 (pg_resetwal -e 1): the rows read as long committed;
--   * 2 rows per job (a credential and its renewal or a second role), 4 jobs per pipeline,
--     one 40-hex commit per pipeline;
--   * ~2,000 projects under 100 top-level groups, a quarter of them one subgroup deeper;
--     skewed: project 0 (a monorepo) gets ~2% of all rows, the quietest ~0.01%;
--   * decisions: 94% issued, 3.5% denied, 1.5% failed, 1% revoked;
--   * claims: the GitLab ID token's claims, ~1 kB of json in claims_json, as the broker stores them
--     (migration 0023).

\set ON_ERROR_STOP on
begin;
-- No trigger fires (append-only guard, outbox): this is a bulk load by the cluster owner.
set local session_replication_role = replica;
set local maintenance_work_mem = '1GB';
set local synchronous_commit = off;

-- Indexes are built after the load (sorted builds, not 10M random insertions), from the
-- definitions the migrations created: the bench measures exactly the migrations' indexes.
create temporary table bench_indexes on commit drop as
select indexname, indexdef from pg_indexes where schemaname = 'public' and tablename = 'audit_events';
alter table audit_events drop constraint audit_events_pkey;
do $$
declare name text;
begin
    for name in select indexname from bench_indexes where indexname <> 'audit_events_pkey' loop
        execute format('drop index %I', name);
    end loop;
end
$$;

truncate audit_events;

insert into audit_events (
    id, occurred_at, recorded_at, request_id, decision, code, detail, issuer, subject, job_token_sha256,
    project_path, job_project_path, namespace_path, pipeline_id, job_id, ref, ref_type, sha, user_login,
    environment, runner_id, claims_json, role, target, backend, requested_ttl_seconds, granted_ttl_seconds,
    expires_at, job_deadline, client_addr, user_agent, credential_sha256, credential_handle, occurrences, tx)
select
    gen_random_uuid(), r.at, r.at + interval '3 milliseconds', 'req-' || md5(r.i::text), r.decision,
    case r.decision when 'denied' then 'access_denied' when 'failed' then 'backend_failed' end,
    case r.decision
        when 'denied' then 'no role binding matched: claim ref_protected is "false", policy requires "true"'
        when 'failed' then 'backend kafka: connection refused'
        when 'revoked' then 'revoked on demand by security@example.com'
        else 'issued 900s'
    end,
    'gitlab', 'project_path:' || r.project_path || ':ref_type:branch:ref:main', encode(sha256(('job' || r.job)::bytea), 'hex'),
    r.project_path, r.project_path, r.namespace_path, r.pipeline::text, r.job::text, 'main', 'branch', r.sha, r.user_login,
    case when r.job % 3 = 0 then 'production' end, r.pipeline % 300,
    jsonb_build_object(
        'iss', 'https://gitlab.example.com', 'sub', 'project_path:' || r.project_path || ':ref_type:branch:ref:main',
        'aud', 'credbroker', 'iat', extract(epoch from r.at)::bigint - 5, 'nbf', extract(epoch from r.at)::bigint - 10,
        'exp', extract(epoch from r.at)::bigint + 3595, 'jti', md5('jti' || r.job),
        'namespace_id', (r.project % 100 + 1000)::text, 'namespace_path', r.namespace_path,
        'project_id', (r.project + 20000)::text, 'project_path', r.project_path,
        'user_id', (r.pipeline % 500 + 100)::text, 'user_login', r.user_login,
        'user_email', r.user_login || '@example.com', 'user_access_level', 'developer',
        'pipeline_id', r.pipeline::text, 'pipeline_source', 'push', 'job_id', r.job::text,
        'ref', 'main', 'ref_type', 'branch', 'ref_path', 'refs/heads/main', 'ref_protected', 'true',
        'runner_id', r.pipeline % 300, 'runner_environment', 'self-hosted', 'sha', r.sha,
        'project_visibility', 'internal',
        'ci_config_ref_uri', 'gitlab.example.com/' || r.project_path || '//.gitlab-ci.yml@refs/heads/main',
        'ci_config_sha', r.sha, 'deployment_tier', 'production', 'environment_protected', 'false')::json,
    'role-' || (r.project % 20), r.target, r.target, 900,
    case when r.decision = 'issued' then 900 end,
    case when r.decision = 'issued' then r.at + interval '15 minutes' end,
    r.at + interval '1 hour',
    '10.' || (r.pipeline % 250) || '.' || (r.job % 250) || '.7', 'credbroker-cli/0.1',
    case when r.decision = 'issued' then encode(sha256(('credential' || r.i)::bytea), 'hex') end,
    case when r.decision = 'issued' and r.target = 'vault' then 'auth/token/create/' || md5('lease' || r.i) end,
    1,
    (r.i / 4 + 10000)::text::xid8
from (
    select s.i, s.job, s.pipeline, s.at, s.project, s.sha,
        case when s.roll < 0.94 then 'issued' when s.roll < 0.975 then 'denied' when s.roll < 0.99 then 'failed' else 'revoked' end as decision,
        format('grp-%s', lpad((s.project % 100)::text, 3, '0')) ||
            case when s.project % 4 = 0 then '/team-' || (s.project % 5) else '' end as namespace_path,
        format('grp-%s', lpad((s.project % 100)::text, 3, '0')) ||
            case when s.project % 4 = 0 then '/team-' || (s.project % 5) else '' end || '/svc-' || s.project as project_path,
        'user-' || (s.pipeline % 500) as user_login,
        (array['kafka', 'aws', 'vault', 'snowflake'])[s.project % 4 + 1] as target
    from (
        select g.i, 50000000 + g.i / 2 as job, 2000000 + g.i / 8 as pipeline,
            now() - interval '90 days' + (interval '90 days' * g.i / :rows) + random() * interval '2 seconds' as at,
            floor(2000 * power((abs(hashint8(g.i / 8)) % 1000000) / 1000000.0, 2))::int as project,
            md5((g.i / 8)::text) || left(md5('sha' || (g.i / 8)), 8) as sha,
            random() as roll
        from generate_series(0, :rows - 1) as g(i)
    ) s
) r;

alter table audit_events add constraint audit_events_pkey primary key (id);
do $$
declare definition text;
begin
    for definition in select indexdef from bench_indexes where indexname <> 'audit_events_pkey' loop
        execute definition;
    end loop;
end
$$;
commit;
