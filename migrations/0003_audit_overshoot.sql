-- A role with on_short_deadline = "allow_overshoot" may be issued a credential that outlives
-- its job (AWS STS cannot issue less than 900 s); the row says by how many seconds.
alter table audit_events add column overshoot_seconds integer check (overshoot_seconds > 0);
