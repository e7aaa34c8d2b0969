# Broker activity on Looker dashboards, next to deployment metrics. The connection reads the
# audit database as a login in credbroker_auditor (read-only; see README "Auditing").
connection: "credbroker_audit"

include: "/views/*.view.lkml"

# The log only grows, so a new row is the only reason to refresh cached results.
datagroup: credbroker_audit_rows {
  sql_trigger: select max(recorded_at) from audit_events ;;
  max_cache_age: "1 hour"
}

persist_with: credbroker_audit_rows

explore: issuance_daily {
  label: "Credentials per day"
  description: "Issued, denied, failed and revoked credentials per day, role, target and project"
}

explore: denials_recent {
  label: "Denials, last 7 days"
  description: "Every refused request of the last seven days, with who asked and why"
}

explore: long_lived_overshoots {
  label: "Credentials that outlived their job"
  description: "Credentials a role let live past the job's deadline (STS's 900 s floor), and whether the broker ended them"
}

explore: credential_lineage {
  label: "Credential lifecycles"
  description: "Each issued credential with its renewals, releases and revocations, grouped by the chain's first issuance"
}
