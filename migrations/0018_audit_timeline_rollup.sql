-- The /audit page's chart (issue 18): issued and denied events per 10 minutes, target and
-- decision, kept exact as rows arrive and leave. The page's default view (everything, the
-- last 7 days) used to aggregate every audit row of the week (about 780,000 at 10M rows,
-- 1.6 s); it now sums a few thousand rows of this table (bench/audit_scale, bench/README.md).
-- The 10 minutes are TIMELINE_GRAIN in src/audit/query.rs, which widens the chart's window to
-- them; every bar width of the chart is a multiple of them.
--
-- Each row belongs to the database backend that wrote it (writer = pg_backend_pid()): a
-- backend only ever adds to its own rows, and no two running backends share a pid, so two
-- transactions never update the same row. The group-commit writers of two replicas commit
-- side by side as before instead of queueing on the current 10 minutes' row lock until the
-- other one's commit is on disk. The chart sums over writers. So that it does not sum one row
-- per connection of every replica for every bucket, each broker merges the rows of the last
-- day's closed buckets every 10 minutes (audit_timeline_compact()). Writer 0 holds merged rows
-- (no backend has pid 0).
create table audit_timeline (
    -- A multiple of 10 minutes since the Unix epoch.
    bucket_start timestamptz not null,
    -- '' for rows without a target (a refusal before the role was known).
    target text not null,
    decision text not null check (decision in ('issued', 'denied')),
    writer integer not null,
    -- sum(occurrences): an aggregated row of unattributed denials counts as many.
    events bigint not null check (events > 0),
    primary key (bucket_start, target, decision, writer)
);

-- Security definer: the broker's role may read the table but not write it, so it cannot
-- make the chart say anything its audit rows do not. One statement per INSERT (a whole
-- group-commit batch), keys in order.
create function audit_timeline_add() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
begin
    insert into audit_timeline as t (bucket_start, target, decision, writer, events)
    select date_bin('10 minutes', n.occurred_at, timestamptz 'epoch'), coalesce(n.target, ''), n.decision, pg_backend_pid(),
           sum(n.occurrences)
    from new_rows n
    where n.decision in ('issued', 'denied')
    group by 1, 2, 3
    order by 1, 2, 3
    on conflict (bucket_start, target, decision, writer) do update set events = t.events + excluded.events;
    return null;
end
$$;

-- Rows leave audit_events only through audit_archive() (migration 0013's guard refuses every
-- other DELETE, and every UPDATE and TRUNCATE). Their counts leave with them: each bucket
-- they were in is merged into one writer-0 row holding what remains. Rows are locked in key
-- order first, as writers lock theirs, so a late row being written into one of those buckets
-- (an aggregated denial counted while Postgres was away) waits or is waited for, never
-- deadlocks; and DELETE ... RETURNING reads the counts as last committed.
create function audit_timeline_remove() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    short bigint;
begin
    create temporary table audit_timeline_gone on commit drop as
    select date_bin('10 minutes', o.occurred_at, timestamptz 'epoch') as bucket_start, coalesce(o.target, '') as target, o.decision,
           sum(o.occurrences) as events
    from old_rows o
    where o.decision in ('issued', 'denied')
    group by 1, 2, 3;

    perform from audit_timeline t join audit_timeline_gone g using (bucket_start, target, decision)
    order by t.bucket_start, t.target, t.decision, t.writer
    for update of t;

    with removed as (
        delete from audit_timeline t using audit_timeline_gone g
        where t.bucket_start = g.bucket_start and t.target = g.target and t.decision = g.decision
        returning t.bucket_start, t.target, t.decision, t.events
    ),
    remaining as (
        select g.bucket_start, g.target, g.decision, coalesce(sum(r.events), 0) - g.events as events
        from audit_timeline_gone g
        left join removed r using (bucket_start, target, decision)
        group by g.bucket_start, g.target, g.decision, g.events
    ),
    kept as (
        insert into audit_timeline (bucket_start, target, decision, writer, events)
        select bucket_start, target, decision, 0, events from remaining where events > 0
        order by 1, 2, 3
    )
    select count(*) into short from remaining where events < 0;
    if short > 0 then
        raise warning 'audit_timeline counted fewer events than were archived in % buckets: rebuild it (select audit_timeline_rebuild())', short;
    end if;
    drop table audit_timeline_gone;
    return null;
end
$$;

create trigger audit_events_timeline_add
    after insert on audit_events
    referencing new table as new_rows
    for each statement execute function audit_timeline_add();

create trigger audit_events_timeline_remove
    after delete on audit_events
    referencing old table as old_rows
    for each statement execute function audit_timeline_remove();

-- Merges each bucket's rows (bucket_start in [since, before)) into its writer-0 row; the sums
-- stay as they were. Every broker calls it every 10 minutes for the last day's buckets older
-- than 30 minutes, which writers no longer add to (src/startup.rs); one at a time (the others
-- skip), and skipping any row a writer still holds (a late row: an aggregated denial), which
-- is merged next time. Writers never wait for writer-0 rows, so a writer waits for this at
-- most, never the other way round. Returns how many rows were merged.
create function audit_timeline_compact(since timestamptz, before timestamptz) returns bigint
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    merged bigint;
begin
    -- 'cred_tim'
    if not pg_try_advisory_xact_lock(7165901438872480109) then
        return 0;
    end if;
    with spread as (
        select bucket_start, target, decision
        from audit_timeline
        where bucket_start >= since and bucket_start < before
        group by 1, 2, 3
        having count(*) > 1 or min(writer) <> 0
    ),
    locked as materialized (
        select t.bucket_start, t.target, t.decision, t.writer
        from audit_timeline t join spread s using (bucket_start, target, decision)
        where t.writer <> 0
        order by 1, 2, 3, 4
        for update of t skip locked
    ),
    removed as (
        delete from audit_timeline t using locked l
        where t.bucket_start = l.bucket_start and t.target = l.target and t.decision = l.decision and t.writer = l.writer
        returning t.bucket_start, t.target, t.decision, t.events
    ),
    kept as (
        insert into audit_timeline as t (bucket_start, target, decision, writer, events)
        select bucket_start, target, decision, 0, sum(events) from removed group by 1, 2, 3 order by 1, 2, 3
        on conflict (bucket_start, target, decision, writer) do update set events = t.events + excluded.events
    )
    select count(*) into merged from removed;
    return merged;
end
$$;

revoke all on function audit_timeline_compact(timestamptz, timestamptz) from public;

-- Recounts the whole table from audit_events, holding off writers meanwhile (share lock, until
-- the calling transaction ends). For this migration, and after rows were loaded with triggers
-- off (session_replication_role = replica). Only the owner may run it.
create function audit_timeline_rebuild() returns bigint
language plpgsql
set search_path = public, pg_temp
as $$
declare
    written bigint;
begin
    lock table audit_events in share mode;
    delete from audit_timeline;
    insert into audit_timeline (bucket_start, target, decision, writer, events)
    select date_bin('10 minutes', occurred_at, timestamptz 'epoch'), coalesce(target, ''), decision, 0, sum(occurrences)
    from audit_events
    where decision in ('issued', 'denied')
    group by 1, 2, 3
    order by 1, 2, 3;
    get diagnostics written = row_count;
    return written;
end
$$;

revoke all on function audit_timeline_rebuild() from public;

-- The triggers above exist from here on, and their lock keeps every writer out until this
-- migration commits: the rows counted now and the rows the trigger counts never overlap.
select audit_timeline_rebuild();

do $$
begin
    if exists (select from pg_roles where rolname = 'credbroker_broker') then
        execute 'grant select on audit_timeline to credbroker_broker, credbroker_auditor';
        execute 'grant execute on function audit_timeline_compact(timestamptz, timestamptz) to credbroker_broker';
    end if;
end
$$;
