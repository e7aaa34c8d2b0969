-- Audit queries at scale and archiving by time partition (issue 7).

-- "By project over a time window" (exact path or a `group/**` glob) at 10 million rows:
-- bench/audit_scale (bench/README.md) measures it. The query finds a page's ids from the index
-- alone and reads only those rows (src/audit/query.rs); that needs tx and id in the index.
-- Without them every matching row is read to sort it by (tx, id): at 10M rows the busiest
-- project's week took 4x as long, and a group's past week did not finish within the broker's 10 s
-- statement timeout. text_pattern_ops serves both `=` and LIKE-prefix, so this
-- one index replaces 0001's audit_events_project_path and 0009's audit_events_project_prefix:
-- one index fewer to maintain on the insert path.
--
-- `if not exists`: on a big table, create it first by hand without blocking inserts
-- (`create index concurrently audit_events_project_window on audit_events ...`, same
-- definition), and this migration then only drops the two old ones.
create index if not exists audit_events_project_window
    on audit_events (project_path text_pattern_ops, occurred_at) include (tx, id);
drop index audit_events_project_path;
drop index audit_events_project_prefix;

-- Archiving (`credbroker audit archive`): whole sealed checkpoints, oldest first, leave the
-- database for an archive file, and `audit verify` still proves what remains. Removing sealed
-- rows goes through audit_archive() alone; the append-only triggers keep refusing every other
-- DELETE, UPDATE and TRUNCATE.

-- One row per archive run. It keeps the last archived checkpoint's place, root and signed JWS:
-- the first remaining checkpoint's previous_root must equal that root, and the JWS proves the
-- seal key made it, so `audit verify` checks the link without the archived rows.
create table audit_archives (
    through_checkpoint bigint primary key,
    first_checkpoint bigint not null check (first_checkpoint between 1 and through_checkpoint),
    last_tx xid8 not null,
    last_id uuid not null,
    root bytea not null,
    key_id text not null,
    signature text not null,
    -- Every archived row occurred before this time.
    cut timestamptz not null,
    row_count bigint not null check (row_count >= 1),
    -- SHA-256 of the archive file, as written before the rows were removed.
    archive_sha256 text not null,
    archived_by text not null default session_user,
    archived_at timestamptz not null default clock_timestamp(),
    -- The archiving transaction: the guard below lets that transaction, and no other, delete.
    tx xid8 not null default pg_current_xact_id()
);

create function audit_archives_reject_change() returns trigger language plpgsql as $$
begin
    raise exception 'audit_archives is append-only';
end
$$;

create trigger audit_archives_append_only
    before update or delete or truncate on audit_archives
    for each statement execute function audit_archives_reject_change();

-- The append-only guard of audit_events and audit_checkpoints (0001, 0010), now with one
-- exception: a DELETE in a transaction that has just recorded an archive, which only
-- audit_archive() below does (nobody else may insert into audit_archives). UPDATE and
-- TRUNCATE stay refused always. Same trigger names, so operators' runbooks still apply.
create function audit_log_guard() returns trigger language plpgsql as $$
begin
    if tg_op = 'DELETE' and exists (select from audit_archives where tx = pg_current_xact_id()) then
        return null;
    end if;
    raise exception '% is append-only', tg_table_name;
end
$$;

drop trigger audit_events_append_only on audit_events;
create trigger audit_events_append_only
    before update or delete or truncate on audit_events
    for each statement execute function audit_log_guard();

drop trigger audit_checkpoints_append_only on audit_checkpoints;
create trigger audit_checkpoints_append_only
    before update or delete or truncate on audit_checkpoints
    for each statement execute function audit_log_guard();

-- Removes checkpoints from the oldest remaining through `through` and exactly the rows they
-- sealed, after recording the archive. Refuses, removing nothing, unless every one of those
-- checkpoints is whole and older than `cut` (a checkpoint with a row at or after the cut would
-- be split), the sealed rows are all there, and no unsealed row sits in the archived range.
-- Not security definer: it runs with the caller's rights, and only the owner may execute it.
create function audit_archive(through bigint, cut timestamptz, archive_sha256 text) returns bigint
language plpgsql
set search_path = public, pg_temp
as $$
declare
    first_number bigint;
    last_checkpoint audit_checkpoints;
    straddling bigint;
    sealed bigint;
    removed bigint;
begin
    -- The sealer's lock (src/audit/seal.rs, SEAL_LOCK = 0x6372_6564_5f73_6561): no checkpoint is written meanwhile.
    perform pg_advisory_xact_lock(7165901438872413537);
    select min(number) into first_number from audit_checkpoints;
    if first_number is null or through < first_number then
        raise exception 'audit_archive: checkpoint % is not a remaining checkpoint (oldest remaining: %)', through, first_number;
    end if;
    select * into last_checkpoint from audit_checkpoints where number = through;
    if not found then
        raise exception 'audit_archive: checkpoint % does not exist', through;
    end if;
    if (select count(*) from audit_checkpoints where number between first_number and through) <> through - first_number + 1 then
        raise exception 'audit_archive: checkpoints between % and % are missing; run audit verify', first_number, through;
    end if;
    select min(number) into straddling from audit_checkpoints where number between first_number and through and last_occurred_at >= cut;
    if straddling is not null then
        raise exception 'audit_archive: checkpoint % has rows at or after the cut %; only whole checkpoints older than the cut can be archived',
            straddling, cut;
    end if;
    select sum(row_count) into sealed from audit_checkpoints where number between first_number and through;

    insert into audit_archives (through_checkpoint, first_checkpoint, last_tx, last_id, root, key_id, signature, cut, row_count, archive_sha256)
    values (through, first_number, last_checkpoint.last_tx, last_checkpoint.last_id, last_checkpoint.root, last_checkpoint.key_id,
            last_checkpoint.signature, cut, sealed, archive_sha256);

    delete from audit_events a
    using (select unnest(event_ids) as id from audit_checkpoints where number between first_number and through) s
    where a.id = s.id and (a.tx, a.id) <= (last_checkpoint.last_tx, last_checkpoint.last_id) and a.occurred_at < cut;
    get diagnostics removed = row_count;
    if removed <> sealed then
        raise exception 'audit_archive: checkpoints % to % sealed % rows but % are in place; run audit verify',
            first_number, through, sealed, removed;
    end if;
    if exists (select from audit_events a where (a.tx, a.id) <= (last_checkpoint.last_tx, last_checkpoint.last_id)) then
        raise exception 'audit_archive: rows that were never sealed sit in the archived range; run audit verify';
    end if;
    delete from audit_checkpoints where number between first_number and through;
    return removed;
end
$$;

revoke all on function audit_archive(bigint, timestamptz, text) from public;

do $$
begin
    if exists (select from pg_roles where rolname = 'credbroker_broker') then
        execute 'grant select on audit_archives to credbroker_broker, credbroker_auditor';
    end if;
end
$$;
