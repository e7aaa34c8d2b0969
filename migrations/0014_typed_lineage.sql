-- Typed lineage (issue 14): which issuance a row continues or is about, as uuid columns the
-- broker writes from verified facts. Until now these links were read back out of text a
-- caller could choose (a `revocation:<id>` request id, "renews issuance <id>" in detail), so
-- anyone could write a step into another issuance's history.
--
-- renews_issuance_id: on an issued row, the first issuance of the chain this renewal continues
--   (`credbroker exec`), accepted only from the same job.
-- about_issuance_id: on a revoked, revoke_failed or release row, the issuance it is about.
alter table audit_events add column renews_issuance_id uuid;
alter table audit_events add column about_issuance_id uuid;

create index audit_events_renews_issuance on audit_events (renews_issuance_id) where renews_issuance_id is not null;
create index audit_events_about_issuance on audit_events (about_issuance_id) where about_issuance_id is not null;

-- The old text links are no longer read; their index goes.
drop index audit_events_request_id;

-- Rows written before this migration keep their links here rather than in the new columns:
-- they are append-only and most are sealed in signed checkpoints, so setting a column on them
-- would change the hashes `audit verify` checks. Only links the old broker itself wrote are
-- carried over, never text a caller could have put there:
-- - revoked / revoke_failed rows are written only by the revocation worker, which named the
--   issuance in the request id;
-- - a renewal's "renews issuance <id>" is kept only where the first issuance has the same
--   issuer, subject and (present, equal) job id, the rule the broker now enforces.
create table audit_lineage_backfill (
    id uuid primary key,
    renews_issuance_id uuid,
    about_issuance_id uuid,
    check (renews_issuance_id is not null or about_issuance_id is not null)
);

insert into audit_lineage_backfill (id, about_issuance_id)
select a.id, substr(a.request_id, 12)::uuid
from audit_events a
where a.decision in ('revoked', 'revoke_failed')
  and a.request_id ~ '^revocation:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$';

insert into audit_lineage_backfill (id, renews_issuance_id)
select renewal.id, first.id
from audit_events renewal
join audit_events first
  on first.id = substring(renewal.detail from 'renews issuance ([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})')::uuid
where renewal.decision = 'issued'
  and renewal.detail like '%renews issuance %'
  and first.decision = 'issued'
  and first.issuer = renewal.issuer
  and first.subject = renewal.subject
  and first.job_id = renewal.job_id
on conflict (id) do nothing;

create index audit_lineage_backfill_renews on audit_lineage_backfill (renews_issuance_id) where renews_issuance_id is not null;
create index audit_lineage_backfill_about on audit_lineage_backfill (about_issuance_id) where about_issuance_id is not null;

create trigger audit_lineage_backfill_append_only
    before update or delete or truncate on audit_lineage_backfill
    for each statement execute function audit_events_reject_change();

-- Every step of every issued credential's life, for analytics: issued (first or renewal),
-- released, revoked, revoke_failed, each with the chain's first issuance.
create view credential_lineage as
with links as (
    select a.id, a.occurred_at, a.decision, a.role, a.target, a.backend, a.project_path, a.pipeline_id, a.job_id,
           a.expires_at,
           coalesce(a.renews_issuance_id, b.renews_issuance_id) as renews_issuance_id,
           coalesce(a.about_issuance_id, b.about_issuance_id) as about_issuance_id
    from audit_events a
    left join audit_lineage_backfill b on b.id = a.id
    where a.decision = 'issued' or a.about_issuance_id is not null or b.about_issuance_id is not null
)
select l.id, l.occurred_at, l.decision, l.role, l.target, l.backend, l.project_path, l.pipeline_id, l.job_id,
       l.expires_at, l.renews_issuance_id, l.about_issuance_id,
       case when l.decision = 'issued' then coalesce(l.renews_issuance_id, l.id)
            else coalesce(about.renews_issuance_id, l.about_issuance_id) end as first_issuance_id
from links l
left join links about on about.id = l.about_issuance_id;

do $$
begin
    if exists (select from pg_roles where rolname = 'credbroker_broker') then
        execute 'grant select on audit_lineage_backfill, credential_lineage to credbroker_broker, credbroker_auditor';
    end if;
end
$$;
