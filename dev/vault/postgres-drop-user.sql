-- Ends the user's open sessions too: dropping a role does not close its connections.
select pg_terminate_backend(pid) from pg_stat_activity where usename = '{{name}}';
drop role if exists "{{name}}";
