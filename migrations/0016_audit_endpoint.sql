-- Which door a request for a credential came through (issue 17): `credentials` for
-- POST /v1/credentials, `oauth_token` for the OAuth token endpoint (POST /oauth/token). Both
-- go through the same verify, decide, single-use and record path; the column tells them apart
-- for auditors. Null on rows that are not credential requests, and on rows written before
-- this migration, whose sealed hashes therefore stay as they were.
alter table audit_events add column endpoint text;
