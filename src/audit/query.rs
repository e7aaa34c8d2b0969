//! The security team's questions: filtered, paged reads of the audit log (`GET /v1/issuances`,
//! `credbroker audit query`) and the lifecycle of one issuance.
//!
//! Paging is newest first in `(tx, id)` order and only over rows below the transaction
//! horizon (migration 0009): every row that can ever appear there has committed already, so a
//! cursor never steps over a row whose transaction committed late (the group-commit writers of
//! several replicas commit in any order). The price: a row becomes visible here once its own
//! transaction and every transaction that started before it have finished, normally within
//! milliseconds; a long-running writing transaction elsewhere on the cluster holds it back.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Serialize;
use sqlx::{Postgres, QueryBuilder, Row};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use super::{AuditError, PgAudit};

/// Every filter, as the API's query parameters (the CLI spells them `--project-path` etc.).
pub const FILTERS: &[&str] = &[
    "since",
    "until",
    "decision",
    "code",
    "role",
    "target",
    "backend",
    "issuer",
    "subject",
    "project_path",
    "namespace_path",
    "pipeline_id",
    "job_id",
    "sha",
    "user_login",
    "credential_sha256",
];

pub const DEFAULT_LIMIT: u32 = 100;
pub const MAX_LIMIT: u32 = 1000;
const MAX_VALUE_CHARS: usize = 512;
/// Every decision a row can hold: the `decision` filter's choices, in the API and on the page.
pub const DECISIONS: &[&str] = &["issued", "denied", "failed", "revoked", "revoke_failed", "admin_request", "audit_read", "recorded"];

/// A bad filter: `parameter` is what the caller must fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {message}")]
pub struct FilterError {
    pub parameter: String,
    pub message: String,
}

fn bad(parameter: &str, message: impl Into<String>) -> FilterError {
    FilterError { parameter: parameter.to_owned(), message: message.into() }
}

/// Where the previous page ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    tx: u64,
    id: Uuid,
}

impl Cursor {
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(format!("{}.{}", self.tx, self.id))
    }

    fn decode(raw: &str) -> Option<Self> {
        let text = String::from_utf8(URL_SAFE_NO_PAD.decode(raw).ok()?).ok()?;
        let (tx, id) = text.split_once('.')?;
        Some(Self { tx: tx.parse().ok()?, id: Uuid::parse_str(id).ok()? })
    }
}

/// `project_path`: exact, or a glob as in policies (`*` within one `/` segment, `**` across).
/// The LIKE prefix lets the index find the candidates; the regex decides, unless the glob is a
/// literal prefix followed by a final `**`, which the LIKE alone matches exactly (the common
/// `group/**`: at 10M rows, a regex per candidate row costs tens of milliseconds).
#[derive(Debug, Clone, PartialEq, Eq)]
enum ProjectPath {
    Exact(String),
    Glob { like_prefix: String, regex: Option<String> },
}

impl ProjectPath {
    fn parse(raw: &str) -> Self {
        if !raw.contains('*') {
            return Self::Exact(raw.to_owned());
        }
        let literal = &raw[..raw.find('*').unwrap_or(raw.len())];
        let mut like_prefix: String = literal
            .chars()
            .flat_map(|c| match c {
                '%' | '_' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        like_prefix.push('%');
        let mut regex = String::from("^");
        let mut chars = raw.chars().peekable();
        while let Some(c) = chars.next() {
            if c == '*' {
                if chars.peek() == Some(&'*') {
                    chars.next();
                    regex.push_str(".*");
                } else {
                    regex.push_str("[^/]*");
                }
            } else if c.is_ascii_alphanumeric() || c == '/' || c == '-' || c == '_' {
                regex.push(c);
            } else {
                regex.push('\\');
                regex.push(c);
            }
        }
        regex.push('$');
        let prefix_only = raw.strip_suffix("**").is_some_and(|head| !head.contains('*'));
        Self::Glob { like_prefix, regex: (!prefix_only).then_some(regex) }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IssuanceFilter {
    pub since: Option<OffsetDateTime>,
    pub until: Option<OffsetDateTime>,
    decisions: Vec<String>,
    /// Exact-match text columns, by column name.
    exact: Vec<(&'static str, String)>,
    project_path: Option<ProjectPath>,
    /// Full SHA-1/SHA-256 commit ids match exactly, shorter hex prefixes as a prefix.
    sha: Option<String>,
    pub limit: u32,
    cursor: Option<Cursor>,
}

impl IssuanceFilter {
    /// From query parameters (`name=value` pairs). Unknown or repeated parameters, empty values
    /// and values of the wrong shape are refused naming the parameter.
    pub fn parse<K: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>, now: OffsetDateTime) -> Result<Self, FilterError> {
        let mut filter = Self { limit: DEFAULT_LIMIT, ..Self::default() };
        let mut seen: Vec<String> = Vec::new();
        for (name, value) in pairs {
            let (name, value) = (name.as_ref(), value.as_ref().trim());
            if seen.iter().any(|s| s == name) {
                return Err(bad(name, "given more than once"));
            }
            seen.push(name.to_owned());
            if !FILTERS.contains(&name) && name != "limit" && name != "cursor" {
                return Err(bad(name, format!("unknown parameter; filters are {}, plus limit and cursor", FILTERS.join(", "))));
            }
            if value.is_empty() {
                return Err(bad(name, "must not be empty"));
            }
            if value.chars().count() > MAX_VALUE_CHARS || value.chars().any(char::is_control) {
                return Err(bad(name, format!("must be at most {MAX_VALUE_CHARS} printable characters")));
            }
            match name {
                "since" => filter.since = Some(parse_time(value, now).map_err(|m| bad(name, m))?),
                "until" => filter.until = Some(parse_time(value, now).map_err(|m| bad(name, m))?),
                "decision" => {
                    for decision in value.split(',').map(str::trim) {
                        if !DECISIONS.contains(&decision) {
                            return Err(bad(name, format!("{decision:?} is not one of {}", DECISIONS.join(", "))));
                        }
                        filter.decisions.push(decision.to_owned());
                    }
                }
                "project_path" => {
                    if value.contains("***") {
                        return Err(bad(name, "`***` is not a pattern; use `*` (one segment) or `**` (any depth)"));
                    }
                    filter.project_path = Some(ProjectPath::parse(value));
                }
                "sha" => {
                    if !(7..=64).contains(&value.len()) || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(bad(name, "must be a commit id or a prefix of one: 7 to 64 hexadecimal digits"));
                    }
                    filter.sha = Some(value.to_ascii_lowercase());
                }
                "pipeline_id" | "job_id" if !value.bytes().all(|b| b.is_ascii_digit()) => {
                    return Err(bad(name, "must be a number"));
                }
                "credential_sha256" if value.len() != 64 || !value.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    return Err(bad(name, "must be a SHA-256 fingerprint: 64 hexadecimal digits"));
                }
                "limit" => {
                    filter.limit = value
                        .parse()
                        .ok()
                        .filter(|limit| (1..=MAX_LIMIT).contains(limit))
                        .ok_or_else(|| bad(name, format!("must be a whole number from 1 to {MAX_LIMIT}")))?;
                }
                "cursor" => {
                    filter.cursor = Some(Cursor::decode(value).ok_or_else(|| bad(name, "is not a cursor this broker returned"))?);
                }
                _ => {
                    let column = FILTERS.iter().find(|filter| **filter == name).expect("checked above");
                    let value = if name == "credential_sha256" { value.to_ascii_lowercase() } else { value.to_owned() };
                    filter.exact.push((column, value));
                }
            }
        }
        if let (Some(since), Some(until)) = (filter.since, filter.until) {
            if until <= since {
                return Err(bad("until", "must be later than since"));
            }
        }
        Ok(filter)
    }

    fn push_conditions(&self, query: &mut QueryBuilder<'_, Postgres>) {
        // A scalar subquery, so the horizon is computed once per query, not once per candidate row.
        query.push(" where a.tx < (select pg_snapshot_xmin(pg_current_snapshot()))");
        if let Some(since) = self.since {
            query.push(" and a.occurred_at >= ").push_bind(since);
        }
        if let Some(until) = self.until {
            query.push(" and a.occurred_at < ").push_bind(until);
        }
        if !self.decisions.is_empty() {
            query.push(" and a.decision = any(").push_bind(self.decisions.clone()).push(")");
        }
        for (column, value) in &self.exact {
            // Column names come from FILTERS, never from the caller.
            query.push(format_args!(" and a.{column} = ")).push_bind(value.clone());
        }
        match &self.project_path {
            None => {}
            Some(ProjectPath::Exact(path)) => {
                query.push(" and a.project_path = ").push_bind(path.clone());
            }
            Some(ProjectPath::Glob { like_prefix, regex }) => {
                query.push(" and a.project_path like ").push_bind(like_prefix.clone());
                if let Some(regex) = regex {
                    query.push(" and a.project_path ~ ").push_bind(regex.clone());
                }
            }
        }
        match &self.sha {
            Some(sha) if sha.len() == 40 || sha.len() == 64 => {
                query.push(" and a.sha = ").push_bind(sha.clone());
            }
            Some(prefix) => {
                query.push(" and a.sha like ").push_bind(format!("{prefix}%"));
            }
            None => {}
        }
        if let Some(cursor) = &self.cursor {
            query.push(" and (a.tx, a.id) < (").push_bind(cursor.tx.to_string()).push("::xid8, ").push_bind(cursor.id).push(")");
        }
    }
}

/// An RFC 3339 time, or a span counted back from now: `90s`, `15m`, `2h`, `7d`, `2w`, `1d12h`.
pub fn parse_time(raw: &str, now: OffsetDateTime) -> Result<OffsetDateTime, String> {
    if let Ok(at) = OffsetDateTime::parse(raw, &Rfc3339) {
        return Ok(at);
    }
    let fail = || format!("{raw:?} is neither an RFC 3339 time (2024-05-01T00:00:00Z) nor a span back from now (90m, 2h, 7d, 2w)");
    let mut seconds: i64 = 0;
    let mut number = String::new();
    for c in raw.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            'w' => 604_800,
            _ => return Err(fail()),
        };
        let count: i64 = number.parse().map_err(|_| fail())?;
        seconds = count.checked_mul(unit).and_then(|part| seconds.checked_add(part)).ok_or_else(fail)?;
        number.clear();
    }
    // Ten years back is further than any audit log goes; beyond it is a typo.
    if !number.is_empty() || seconds == 0 || seconds > 10 * 366 * 86_400 {
        return Err(fail());
    }
    Ok(now - time::Duration::seconds(seconds))
}

/// One row as the API, the CLI and the page show it. Never a secret: fingerprints only.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct IssuanceRecord {
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub occurred_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub recorded_at: OffsetDateTime,
    pub decision: String,
    pub code: Option<String>,
    pub detail: Option<String>,
    pub issuer: Option<String>,
    pub subject: Option<String>,
    pub project_path: Option<String>,
    pub namespace_path: Option<String>,
    pub pipeline_id: Option<String>,
    pub job_id: Option<String>,
    #[sqlx(rename = "ref")]
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
    pub sha: Option<String>,
    pub user_login: Option<String>,
    pub environment: Option<String>,
    pub role: Option<String>,
    pub target: Option<String>,
    pub backend: Option<String>,
    pub requested_ttl_seconds: Option<i32>,
    pub granted_ttl_seconds: Option<i32>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub job_deadline: Option<OffsetDateTime>,
    pub overshoot_seconds: Option<i32>,
    pub credential_sha256: Option<String>,
    pub credential_handle: Option<String>,
    pub client_addr: Option<String>,
    pub occurrences: i32,
    /// Only in the detail view.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub claims: Option<serde_json::Value>,
}

/// Column order of CSV output and of the CLI's table.
pub const RECORD_FIELDS: &[&str] = &[
    "id",
    "occurred_at",
    "recorded_at",
    "decision",
    "code",
    "detail",
    "issuer",
    "subject",
    "project_path",
    "namespace_path",
    "pipeline_id",
    "job_id",
    "ref",
    "sha",
    "user_login",
    "environment",
    "role",
    "target",
    "backend",
    "requested_ttl_seconds",
    "granted_ttl_seconds",
    "expires_at",
    "job_deadline",
    "overshoot_seconds",
    "credential_sha256",
    "credential_handle",
    "client_addr",
    "occurrences",
];

const RECORD_COLUMNS: &str = "a.id, a.occurred_at, a.recorded_at, a.decision, a.code, a.detail, a.issuer, a.subject,
    a.project_path, a.namespace_path, a.pipeline_id, a.job_id, a.ref, a.sha, a.user_login, a.environment,
    a.role, a.target, a.backend, a.requested_ttl_seconds, a.granted_ttl_seconds, a.expires_at, a.job_deadline,
    a.overshoot_seconds, a.credential_sha256, a.credential_handle, a.client_addr, a.occurrences";

/// One page, and where the next begins (None: this was the last).
#[derive(Debug, Clone, Serialize)]
pub struct IssuancePage {
    pub items: Vec<IssuanceRecord>,
    pub next_cursor: Option<String>,
}

/// Issued and denied events per target over a window, for the `/audit` page's chart.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub until: OffsetDateTime,
    pub bucket_seconds: i64,
    /// Oldest bucket first; buckets without events are absent.
    pub points: Vec<TimelinePoint>,
}

#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TimelinePoint {
    #[serde(with = "time::serde::rfc3339")]
    pub start: OffsetDateTime,
    /// Empty for rows with no target (a refusal before the role was known).
    pub target: String,
    /// `issued` or `denied`.
    pub decision: String,
    pub events: i64,
}

/// The chart's window when the filter sets no `since`.
pub const DEFAULT_TIMELINE_SPAN: time::Duration = time::Duration::days(7);

/// At most about 60 bars whatever the window, in widths people read easily.
fn bucket_seconds(span: time::Duration) -> i64 {
    match span.whole_hours() {
        ..=6 => 600,
        7..=48 => 3600,
        49..=336 => 6 * 3600,
        337..=1488 => 86_400,
        _ => 7 * 86_400,
    }
}

/// One issuance and what happened to it afterwards.
#[derive(Debug, Clone, Serialize)]
pub struct IssuanceLifecycle {
    pub issuance: IssuanceRecord,
    /// The issuance this one renews (`credbroker exec`), if it is a renewal.
    pub renews: Option<Uuid>,
    /// issued, renewed, revoked, revoke_failed: oldest first.
    pub lifecycle: Vec<LifecycleStep>,
    /// The broker's own revocation schedule for it, if any.
    pub revocation: Option<RevocationState>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LifecycleStep {
    pub event: String,
    pub id: Uuid,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub expires_at: Option<OffsetDateTime>,
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RevocationState {
    pub state: String,
    pub reason: String,
    #[serde(with = "time::serde::rfc3339")]
    pub due_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
    pub requested_by: Option<String>,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// The issuance a renewal names in its detail ("renews issuance <id>", written by the broker).
fn renewed_issuance(detail: Option<&str>) -> Option<Uuid> {
    let rest = detail?.split("renews issuance ").nth(1)?;
    Uuid::parse_str(rest.get(..36)?).ok()
}

impl PgAudit {
    /// Records a read made straight against the database (`audit query --database-url`,
    /// `audit tail`) as an `audit_read` row naming the logged-in database role (migration
    /// 0012). Callers read nothing when this fails: an unrecorded read is not allowed.
    pub async fn record_direct_read(&self, what: &str) -> Result<Uuid, AuditError> {
        Ok(sqlx::query_scalar("select record_audit_read($1)").bind(what).fetch_one(self.pool()).await?)
    }

    /// One page of rows matching the filter, newest first.
    ///
    /// Two steps in one statement (bench/audit_scale measures why): the inner select finds the
    /// page's ids from the columns the filter and the order need, which migration 0013's
    /// covering index holds for the project and time filters, so a big match (a group's month,
    /// 100,000 rows) is sorted from the index without reading those rows; only the page's rows
    /// are then read, by primary key. The inner `a` is the inner select's own alias.
    ///
    /// Unnamed statement (`persistent(false)`): planned with the values each time. A named one
    /// is switched by Postgres to a generic plan after five runs, and a generic plan cannot use
    /// a LIKE prefix (`project_path=group/**`, `sha=0123abc`) or a partial index, so a broker
    /// that had answered a question five times would answer it the sixth time by scanning.
    pub async fn query_issuances(&self, filter: &IssuanceFilter) -> Result<IssuancePage, AuditError> {
        let mut query = QueryBuilder::new(format!(
            "select {RECORD_COLUMNS}, null::jsonb as claims, a.tx::text as tx from audit_events a
             where a.id = any(array(select a.id from audit_events a"
        ));
        filter.push_conditions(&mut query);
        query.push(" order by a.tx desc, a.id desc limit ").push_bind(i64::from(filter.limit) + 1);
        query.push(")) order by a.tx desc, a.id desc");
        let rows = query.build().persistent(false).fetch_all(self.pool()).await?;
        let mut items = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in rows.iter().take(filter.limit as usize) {
            let record = <IssuanceRecord as sqlx::FromRow<_>>::from_row(row)?;
            let tx: String = row.try_get("tx")?;
            last = Some(Cursor { tx: tx.parse().map_err(|e| sqlx::Error::Decode(Box::new(e)))?, id: record.id });
            items.push(record);
        }
        let next_cursor = (rows.len() > filter.limit as usize).then(|| last.map(|cursor| cursor.encode())).flatten();
        Ok(IssuancePage { items, next_cursor })
    }

    /// Issued and denied events per target in buckets over the filter's window (`since`, by
    /// default [`DEFAULT_TIMELINE_SPAN`] back from `now`, to `until` or `now`), under the same
    /// filters as [`PgAudit::query_issuances`] but not its paging, and likewise planned with
    /// the values each time (unnamed statement).
    pub async fn issuance_timeline(&self, filter: &IssuanceFilter, now: OffsetDateTime) -> Result<Timeline, AuditError> {
        let until = filter.until.unwrap_or(now);
        let since = filter.since.unwrap_or(until - DEFAULT_TIMELINE_SPAN);
        let bucket = bucket_seconds(until - since);
        let window = IssuanceFilter { since: Some(since), until: Some(until), cursor: None, ..filter.clone() };
        let mut query = QueryBuilder::new("select date_bin(make_interval(secs => ");
        query.push_bind(bucket as f64).push("), a.occurred_at, ").push_bind(since);
        query.push(") as start, coalesce(a.target, '') as target, a.decision, sum(a.occurrences)::bigint as events from audit_events a");
        window.push_conditions(&mut query);
        query.push(" and a.decision in ('issued', 'denied') group by 1, 2, 3 order by 1, 2, 3");
        let points = query.build_query_as::<TimelinePoint>().persistent(false).fetch_all(self.pool()).await?;
        Ok(Timeline { since, until, bucket_seconds: bucket, points })
    }

    /// Any row by id, with claims; for an issued row also its renewals and revocations.
    pub async fn issuance_lifecycle(&self, id: Uuid) -> Result<Option<IssuanceLifecycle>, AuditError> {
        let row = sqlx::query_as::<_, IssuanceRecord>(&format!("select {RECORD_COLUMNS}, a.claims from audit_events a where a.id = $1"))
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        let Some(issuance) = row else { return Ok(None) };
        let renews = renewed_issuance(issuance.detail.as_deref());
        let mut lifecycle = Vec::new();
        let mut revocation = None;
        if issuance.decision == "issued" {
            lifecycle.push(LifecycleStep {
                event: "issued".into(),
                id: issuance.id,
                at: issuance.occurred_at,
                expires_at: issuance.expires_at,
                detail: issuance.detail.clone(),
            });
            // Renewals come from the same job and name the first issuance in their detail;
            // the job id (indexed) keeps this from scanning the log.
            let later = sqlx::query(
                "select id, occurred_at, expires_at, detail, decision from audit_events
                 where (decision = 'issued' and job_id is not distinct from $2 and issuer is not distinct from $3
                        and occurred_at >= $4 and detail like '%renews issuance ' || $1::text || '%')
                    or request_id = 'revocation:' || $1::text
                 order by occurred_at, id",
            )
            .bind(id)
            .bind(&issuance.job_id)
            .bind(&issuance.issuer)
            .bind(issuance.occurred_at)
            .fetch_all(self.pool())
            .await?;
            for row in later {
                let decision: String = row.try_get("decision")?;
                lifecycle.push(LifecycleStep {
                    event: if decision == "issued" { "renewed".into() } else { decision },
                    id: row.try_get("id")?,
                    at: row.try_get("occurred_at")?,
                    expires_at: row.try_get("expires_at")?,
                    detail: row.try_get("detail")?,
                });
            }
            revocation = sqlx::query(
                "select state, reason, due_at, revoked_at, requested_by, attempts, last_error from revocations where issuance_id = $1",
            )
            .bind(id)
            .fetch_optional(self.pool())
            .await?
            .map(|row| -> Result<RevocationState, sqlx::Error> {
                Ok(RevocationState {
                    state: row.try_get("state")?,
                    reason: row.try_get("reason")?,
                    due_at: row.try_get("due_at")?,
                    revoked_at: row.try_get("revoked_at")?,
                    requested_by: row.try_get("requested_by")?,
                    attempts: row.try_get("attempts")?,
                    last_error: row.try_get("last_error")?,
                })
            })
            .transpose()?;
        }
        Ok(Some(IssuanceLifecycle { issuance, renews, lifecycle, revocation }))
    }
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    const NOW: OffsetDateTime = datetime!(2024-05-10 12:00 UTC);

    fn parse(pairs: &[(&str, &str)]) -> Result<IssuanceFilter, FilterError> {
        IssuanceFilter::parse(pairs.iter().copied(), NOW)
    }

    #[test]
    fn bad_filters_name_the_parameter() {
        for (pairs, parameter) in [
            (vec![("since", "yesterday")], "since"),
            (vec![("until", "5x")], "until"),
            (vec![("decision", "granted")], "decision"),
            (vec![("limit", "1001")], "limit"),
            (vec![("limit", "0")], "limit"),
            (vec![("cursor", "garbage")], "cursor"),
            (vec![("sha", "xyz")], "sha"),
            (vec![("sha", "abc")], "sha"),
            (vec![("pipeline_id", "12a")], "pipeline_id"),
            (vec![("job_id", "1 or 1=1")], "job_id"),
            (vec![("credential_sha256", "abc")], "credential_sha256"),
            (vec![("project", "x")], "project"),
            (vec![("role", "")], "role"),
            (vec![("role", "a"), ("role", "b")], "role"),
            (vec![("since", "2h"), ("until", "3h")], "until"),
            (vec![("project_path", "a/***")], "project_path"),
        ] {
            let error = parse(&pairs).unwrap_err();
            assert_eq!(error.parameter, parameter, "{pairs:?}: {error}");
        }
    }

    #[test]
    fn times_are_rfc3339_or_spans_back_from_now() {
        assert_eq!(parse_time("7d", NOW).unwrap(), datetime!(2024-05-03 12:00 UTC));
        assert_eq!(parse_time("1d12h", NOW).unwrap(), datetime!(2024-05-09 00:00 UTC));
        assert_eq!(parse_time("2w", NOW).unwrap(), datetime!(2024-04-26 12:00 UTC));
        assert_eq!(parse_time("2024-05-01T00:00:00Z", NOW).unwrap(), datetime!(2024-05-01 00:00 UTC));
        assert!(parse_time("7", NOW).is_err());
        assert!(parse_time("0h", NOW).is_err());
    }

    #[test]
    fn project_globs_follow_policy_rules() {
        assert_eq!(ProjectPath::parse("platform/orders"), ProjectPath::Exact("platform/orders".into()));
        assert_eq!(
            ProjectPath::parse("plat_form/*"),
            ProjectPath::Glob { like_prefix: "plat\\_form/%".into(), regex: Some("^plat_form/[^/]*$".into()) }
        );
        // A literal prefix and a final `**`: the LIKE alone is exact.
        assert_eq!(ProjectPath::parse("a.b/**"), ProjectPath::Glob { like_prefix: "a.b/%".into(), regex: None });
        assert_eq!(
            ProjectPath::parse("a/**/c"),
            ProjectPath::Glob { like_prefix: "a/%".into(), regex: Some("^a/.*/c$".into()) }
        );
        assert_eq!(ProjectPath::parse("*"), ProjectPath::Glob { like_prefix: "%".into(), regex: Some("^[^/]*$".into()) });
        assert_eq!(ProjectPath::parse("a/*/**"), ProjectPath::Glob { like_prefix: "a/%".into(), regex: Some("^a/[^/]*/.*$".into()) });
    }

    #[test]
    fn timeline_buckets_keep_the_bar_count_readable() {
        assert_eq!(bucket_seconds(time::Duration::hours(1)), 600);
        assert_eq!(bucket_seconds(time::Duration::days(1)), 3600);
        assert_eq!(bucket_seconds(DEFAULT_TIMELINE_SPAN), 6 * 3600);
        assert_eq!(bucket_seconds(time::Duration::days(30)), 86_400);
        assert_eq!(bucket_seconds(time::Duration::days(365)), 7 * 86_400);
    }

    #[test]
    fn cursors_round_trip() {
        let cursor = Cursor { tx: 12345, id: Uuid::new_v4() };
        assert_eq!(Cursor::decode(&cursor.encode()), Some(cursor));
    }

    #[test]
    fn renewals_name_the_first_issuance() {
        let first = Uuid::new_v4();
        assert_eq!(renewed_issuance(Some(&format!("renews issuance {first}"))), Some(first));
        assert_eq!(renewed_issuance(Some(&format!("issued 900s ...; renews issuance {first}"))), Some(first));
        assert_eq!(renewed_issuance(Some("nothing")), None);
    }
}
