-- Gogs deliveries (issue 14). Gogs signs the body only: X-Gogs-Delivery and X-Gogs-Event are
-- not covered, so keying replay protection on the delivery id let a captured body be sent again
-- under a fresh id for a second delivery token. The guard now keys on what is signed: one
-- payload (by SHA-256) is accepted once per hook, whatever delivery id it comes with. The
-- primary key decides between concurrent deliveries of one body, on any number of replicas.
create table gogs_delivery_payloads (
    hook text not null,
    payload_sha256 text not null,
    -- The delivery that brought this payload first. Withdrawing a delivery whose audit row could
    -- not be written (so that Gogs may redeliver it) frees its payload with it.
    delivery_id text not null references gogs_deliveries (delivery_id) on delete cascade,
    primary key (hook, payload_sha256)
);

-- Earlier deliveries may already repeat a payload (the replays this closes): the first one
-- received keeps it, so the backfill cannot fail on old data.
insert into gogs_delivery_payloads (hook, payload_sha256, delivery_id)
select distinct on (hook, payload_sha256) hook, payload_sha256, delivery_id
from gogs_deliveries
order by hook, payload_sha256, received_at, delivery_id
on conflict do nothing;

-- Every delivery now has its row in audit_events (the one record auditors read); this is that
-- row's id. Null for deliveries received before this migration.
alter table gogs_deliveries add column audit_id uuid;

-- 'recorded': a signed Gogs delivery stored without a delivery token (an event the broker does
-- not act on, or a hook that neither forwards nor returns tokens).
alter table audit_events drop constraint audit_events_decision_check;
alter table audit_events add constraint audit_events_decision_check
    check (decision in ('issued', 'denied', 'failed', 'revoked', 'revoke_failed', 'admin_request', 'audit_read', 'recorded'));

do $$
begin
    if exists (select from pg_roles where rolname = 'credbroker_broker') then
        execute 'grant select, insert on gogs_delivery_payloads to credbroker_broker';
        -- Only to withdraw a delivery whose audit row could not be written (see above).
        execute 'grant delete on gogs_deliveries, gogs_delivery_payloads to credbroker_broker';
    end if;
end
$$;
