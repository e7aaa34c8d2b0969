-- Audit queries (issue 7): a stable order to page and seal in, reads recorded as rows, the
-- indexes the security team's common questions need, and views for analytics.

-- The inserting transaction's id (64-bit, never wraps). Rows are paged and sealed in
-- (tx, id) order, and only below the oldest transaction still running
-- (pg_snapshot_xmin(pg_current_snapshot())): every row that will ever appear below that
-- horizon has already committed, so a cursor can never step over a row that commits late.
-- A timestamp or a sequence cannot promise that: both are taken before commit, and the
-- group-commit writers of several replicas commit in any order.
alter table audit_events add column tx xid8 not null default pg_current_xact_id();

-- 'audit_read': who read the audit log through the broker, and with which filters.
alter table audit_events drop constraint audit_events_decision_check;
alter table audit_events add constraint audit_events_decision_check
    check (decision in ('issued', 'denied', 'failed', 'revoked', 'revoke_failed', 'admin_request', 'audit_read'));

create index audit_events_tx on audit_events (tx, id);
create index audit_events_occurred_at on audit_events (occurred_at);
-- Prefix search on commit ids (people paste short SHAs) and glob search on project paths.
create index audit_events_sha on audit_events (sha text_pattern_ops);
create index audit_events_project_prefix on audit_events (project_path text_pattern_ops, occurred_at);
create index audit_events_pipeline_id on audit_events (pipeline_id);
create index audit_events_credential_sha256 on audit_events (credential_sha256);
create index audit_events_denied on audit_events (occurred_at) where decision = 'denied';
-- The lifecycle of one issuance: its revocation attempts carry request_id 'revocation:<id>'.
create index audit_events_request_id on audit_events (request_id);

-- Per day (UTC), role, target, project and decision: what dashboards plot.
create view issuance_daily as
select (occurred_at at time zone 'UTC')::date as day,
       role, target, project_path, decision,
       sum(occurrences)::bigint as events,
       count(distinct subject) as subjects,
       count(distinct pipeline_id) as pipelines
from audit_events
where decision in ('issued', 'denied', 'failed', 'revoked', 'revoke_failed')
group by 1, 2, 3, 4, 5;

-- Denials of the last seven days, newest first, with who and why.
create view denials_recent as
select id, occurred_at, code, detail, issuer, subject, project_path, namespace_path, pipeline_id,
       job_id, ref, sha, user_login, role, target, client_addr, occurrences
from audit_events
where decision = 'denied' and occurred_at > now() - interval '7 days';

-- Credentials that outlived their job because the role allows it (STS's 900 s minimum), and
-- whether the broker ended them at the deadline.
create view long_lived_overshoots as
select a.id, a.occurred_at, a.role, a.target, a.backend, a.project_path, a.pipeline_id, a.job_id,
       a.user_login, a.granted_ttl_seconds, a.overshoot_seconds, a.expires_at, a.job_deadline,
       r.state as revocation_state, r.revoked_at
from audit_events a
left join revocations r on r.issuance_id = a.id
where a.decision = 'issued' and a.overshoot_seconds is not null;
