-- The database side of dev/vault/setup.sh: the group every user Vault creates joins
-- (postgres-create-user.sql), holding the grants, and a table for the demo to read.
-- Safe to run again.
do $$ begin create role ci_reader nologin; exception when duplicate_object then null; end $$;
create table if not exists demo_orders (id integer primary key, item text not null);
insert into demo_orders values (1, 'coffee'), (2, 'tea'), (3, 'cake') on conflict do nothing;
grant select on demo_orders to ci_reader;
