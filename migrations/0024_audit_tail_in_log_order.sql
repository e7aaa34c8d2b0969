-- `audit tail` now lists the latest rows in the log's own order, newest transaction first
-- (`tx desc, id desc`), as /v1/audit and the /audit page always have, from the (tx, id) index
-- (audit_events_tx) they use. Nothing else read audit_events by recorded_at, so its index only
-- cost every inserted row one more index entry, and every batch one more relation to lock
-- (bench/README.md, twenty-third session). The column stays: it is when the row was written.
--
-- `if exists`: DROP INDEX takes the table's exclusive lock, only for a moment, but it first
-- waits for every transaction using the table. On a busy one, drop it by hand without that
-- (`drop index concurrently audit_events_recorded_at`), and this migration then does nothing.
drop index if exists audit_events_recorded_at;
