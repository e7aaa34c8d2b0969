-- Credential lifecycle (issue 6): the durable revocation schedule, freezes, and the decisions
-- they add to the audit log.

-- 'revoke_failed': an attempt to end a credential failed (retried until it succeeds or gives up).
-- 'admin_request': who asked the broker to revoke, freeze or unfreeze, and with what selector.
alter table audit_events drop constraint audit_events_decision_check;
alter table audit_events add constraint audit_events_decision_check
    check (decision in ('issued', 'denied', 'failed', 'revoked', 'revoke_failed', 'admin_request'));

-- One row per credential the broker has to end itself. Replicas claim due rows with
-- `for update skip locked` and push `next_attempt_at` out while they work, so a replica that
-- dies mid-attempt leaves the row to another one after the claim lapses. Never holds a secret:
-- `handle` is the backend's own reference (a Vault lease id).
create table revocations (
    issuance_id uuid primary key,
    backend text not null,
    handle text not null,
    due_at timestamptz not null,
    next_attempt_at timestamptz not null,
    -- deadline | on_demand | not_delivered | exec_exit
    reason text not null,
    requested_by text,
    attempts integer not null default 0 check (attempts >= 0),
    state text not null default 'pending' check (state in ('pending', 'revoked', 'failed')),
    last_error text,
    revoked_at timestamptz,
    created_at timestamptz not null default clock_timestamp()
);

create index revocations_pending on revocations (next_attempt_at) where state = 'pending';

-- On-demand revocation selects among credentials that have not expired yet: a small slice of
-- the log, found through this index whatever the selector.
create index audit_events_live_issued on audit_events (expires_at) where decision = 'issued';

-- Stops new issuance for a project, a role or everything until lifted or `until` passes.
create table freezes (
    id uuid primary key,
    scope text not null check (scope in ('project', 'role', 'all')),
    -- The project path or role name; '*' for scope 'all'.
    value text not null,
    frozen_by text not null,
    frozen_at timestamptz not null default clock_timestamp(),
    until timestamptz,
    lifted_by text,
    lifted_at timestamptz
);

create index freezes_active on freezes (scope, value) where lifted_at is null;
