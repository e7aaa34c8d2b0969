-- The /audit chart's rollup (migration 0018) without a trigger on the exchange's path (issue
-- 18). The statement-level trigger of 0018 ran inside every INSERT into audit_events: a
-- PL/pgSQL call, a security-definer switch and an upsert, about a sixth of Postgres' CPU on a
-- lone exchange's statement (bench/README.md). The rollup now counts rows after they commit,
-- the way the seal reads them (migration 0009): by tx, below the transaction horizon, where
-- no row can appear any more.
--
-- The invariant: audit_timeline counts exactly the rows whose tx is below
-- audit_timeline_progress.counted_below. The chart adds the rows from counted_below on, read
-- from audit_events in the same snapshot (src/audit/query.rs), so it is exact at every
-- moment, as the trigger's rollup was, whether or not a catch-up has run lately. Brokers call
-- audit_timeline_catch_up() every second (src/startup.rs); a horizon held back by a long
-- transaction only leaves more rows for the chart to add itself.
--
-- Still only these security-definer functions write the rollup. The broker's role can neither
-- write it nor move counted_below, and it can no longer choose a row's tx (an INSERT naming tx
-- is refused), so no row it writes can land below counted_below uncounted.
--
-- Rows are counted as writer 0 only. audit_timeline_compact() stays for brokers of an earlier
-- version during an upgrade; it finds nothing to merge.

create table audit_timeline_progress (
    -- One row.
    singleton boolean primary key default true check (singleton),
    counted_below xid8 not null
);

insert into audit_timeline_progress (counted_below) values ('0');

drop trigger audit_events_timeline_add on audit_events;
drop function audit_timeline_add();

-- Counts the rows that got below the horizon since the last call, and moves counted_below up
-- to it. One call at a time: another call, or one while an archive runs, counts nothing and
-- returns 0. Returns how many rollup rows it added to. Call it on its own, as brokers do: in a
-- repeatable-read transaction that began before another catch-up committed, it cannot lock the
-- progress row. Without JIT: a second's rows cost less to count than a plan costs to compile.
create function audit_timeline_catch_up() returns bigint
language plpgsql
security definer
set search_path = public, pg_temp
set jit = off
as $$
declare
    below xid8;
    horizon xid8;
    written bigint;
begin
    select counted_below into below from audit_timeline_progress for update skip locked;
    if not found then
        return 0;
    end if;
    -- Every transaction below the horizon has ended, so the INSERT below, whose snapshot is
    -- taken after this one, sees every row that will ever carry such a tx.
    horizon := pg_snapshot_xmin(pg_current_snapshot());
    if horizon <= below then
        return 0;
    end if;
    insert into audit_timeline as t (bucket_start, target, decision, writer, events)
    select date_bin('10 minutes', a.occurred_at, timestamptz 'epoch'), coalesce(a.target, ''), a.decision, 0, sum(a.occurrences)
    from audit_events a
    where a.tx >= below and a.tx < horizon and a.decision in ('issued', 'denied')
    group by 1, 2, 3
    order by 1, 2, 3
    on conflict (bucket_start, target, decision, writer) do update set events = t.events + excluded.events;
    get diagnostics written = row_count;
    update audit_timeline_progress set counted_below = horizon;
    return written;
end
$$;

revoke all on function audit_timeline_catch_up() from public;

-- As migration 0018's, but an archived row leaves the rollup only if it was counted there (tx
-- below counted_below); a row not counted yet leaves with the table's rows. The progress row
-- is held (share) until the archive commits: a catch-up in progress is waited for, and its
-- counts are then taken out too; one that starts meanwhile counts nothing.
create or replace function audit_timeline_remove() returns trigger
language plpgsql
security definer
set search_path = public, pg_temp
as $$
declare
    short bigint;
    below xid8;
begin
    select counted_below into below from audit_timeline_progress for share;

    create temporary table audit_timeline_gone on commit drop as
    select date_bin('10 minutes', o.occurred_at, timestamptz 'epoch') as bucket_start, coalesce(o.target, '') as target, o.decision,
           sum(o.occurrences) as events
    from old_rows o
    where o.decision in ('issued', 'denied') and o.tx < below
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

-- Recounts the rollup from audit_events, up to the horizon, and sets counted_below there. For
-- this migration, and after rows were loaded by hand. Writers need not wait: what commits
-- above the horizon is counted by the next catch-up. Only the owner may run it.
create or replace function audit_timeline_rebuild() returns bigint
language plpgsql
set search_path = public, pg_temp
as $$
declare
    written bigint;
    horizon xid8;
begin
    perform from audit_timeline_progress for update;
    horizon := pg_snapshot_xmin(pg_current_snapshot());
    delete from audit_timeline;
    insert into audit_timeline (bucket_start, target, decision, writer, events)
    select date_bin('10 minutes', occurred_at, timestamptz 'epoch'), coalesce(target, ''), decision, 0, sum(occurrences)
    from audit_events
    where decision in ('issued', 'denied') and tx < horizon
    group by 1, 2, 3
    order by 1, 2, 3;
    get diagnostics written = row_count;
    update audit_timeline_progress set counted_below = horizon;
    return written;
end
$$;

select audit_timeline_rebuild();

do $$
begin
    if exists (select from pg_roles where rolname = 'credbroker_broker') then
        execute 'grant select on audit_timeline_progress to credbroker_broker, credbroker_auditor';
        execute 'grant execute on function audit_timeline_catch_up() to credbroker_broker';
        -- Every column but tx. A column added later needs its own grant (README, "Adding an
        -- audit column").
        execute 'revoke insert on audit_events from credbroker_broker';
        execute (
            select format('grant insert (%s) on audit_events to credbroker_broker', string_agg(quote_ident(attname), ', ' order by attnum))
            from pg_attribute
            where attrelid = 'audit_events'::regclass and attnum > 0 and not attisdropped and attname <> 'tx'
        );
    end if;
end
$$;
