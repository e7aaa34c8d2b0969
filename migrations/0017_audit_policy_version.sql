-- The version of the policy set that decided each request (issue 16): the lowercase hex
-- SHA-256 over the set's files that `credbroker policy check` prints, so the security team can
-- say which policy granted a credential. Null on rows written before this migration (their
-- sealed hashes stay as they were) and on rows no policy decided.
alter table audit_events add column policy_version text;
