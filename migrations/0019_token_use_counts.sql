-- Replay protection counts a token's uses in one row per (issuer, jti, role) instead of one row
-- per use. A claim was a probe for the highest use number (an index scan plus a heap fetch)
-- and an insert into two indexes; it is now one upsert of one row, which an update leaves
-- in place (no indexed column changes). Concurrent claims on one token, from one replica's
-- batch or from two replicas, queue on that row's lock and each sees the count the one
-- before it left, so a token's uses are never exceeded and no claim loses a race it must
-- retry. bench/README.md (issue 18) has the measurements.
create table token_use_counts (
    issuer text not null,
    jti text not null,
    role text not null,
    -- Uses taken so far, never more than max_uses.
    uses integer not null check (uses >= 1),
    -- The limit the latest claim applied (the role's max_uses_per_token then).
    max_uses integer not null check (max_uses >= 1),
    -- How many uses the latest claiming statement took: its use numbers are
    -- uses - last_claimed + 1 .. uses. Read back by that statement only.
    last_claimed integer not null check (last_claimed >= 0),
    token_expires_at timestamptz not null,
    primary key (issuer, jti, role)
) with (fillfactor = 80); -- room on each page for a row's next count, written in place

create index token_use_counts_token_expires_at on token_use_counts (token_expires_at);

insert into token_use_counts (issuer, jti, role, uses, max_uses, last_claimed, token_expires_at)
select issuer, jti, role, max(use_number), max(use_number), 0, max(token_expires_at)
from token_uses
group by issuer, jti, role;

-- A replica still running the previous version fails its claims (503 audit_unavailable)
-- until it is upgraded: it cannot count uses in a table the others no longer read.
drop table token_uses;

do $$
begin
    if exists (select from pg_roles where rolname = 'credbroker_broker') then
        execute 'grant select, insert, update, delete on token_use_counts to credbroker_broker';
    end if;
end
$$;

-- No query filters or joins on the claims document (the identity claims the log is searched
-- by are columns of their own), but ANALYZE sorted a sample of it for statistics each time the
-- table grew by a tenth: comparing jsonb documents was 5% of the machine's time in a profile
-- of a new log filling at full speed.
alter table audit_events alter column claims set statistics 0;
