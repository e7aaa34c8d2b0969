//! The columns of `audit_events`, declared once. The list below drives the INSERT the writers
//! run, the SELECT list of every read, the API's JSON and the CSV header, so a new column is
//! a migration plus one line here (README, "Adding an audit column").

use serde::{Deserialize, Serialize};
use std::borrow::Cow;

use serde_json::{Map, Value};
use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::types::Oid;
use sqlx::postgres::{PgArgumentBuffer, PgArguments, PgHasArrayType, PgTypeInfo};
use sqlx::query::Query;
use sqlx::Postgres;
use time::OffsetDateTime;
use uuid::Uuid;

use super::AuditEvent;

/// `column: type = "sql array element type", from event => value;` for every written column
/// but the claims, which are written always and read only where a single record is shown
/// ([`CLAIMS`]).
macro_rules! audit_columns {
    ($( $(#[$meta:meta])* $field:ident $column:literal : $type:ty = $sql:literal, |$event:ident| $value:expr; )*) => {
        /// One row as the API, the CLI, the page and the lifecycle read it. Never a secret:
        /// credentials and job tokens appear only as SHA-256 fingerprints.
        #[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
        pub struct AuditRecord {
            $(
                $(#[$meta])*
                #[serde(rename = $column)]
                #[sqlx(rename = $column)]
                pub $field: $type,
            )*
            /// Set by Postgres when the row is inserted.
            #[serde(with = "time::serde::rfc3339")]
            pub recorded_at: OffsetDateTime,
            /// Only where one record is shown in full (the detail view, the lifecycle).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub claims: Option<Value>,
        }

        /// The written columns, in the order of [`ColumnArrays`]'s binds.
        const WRITTEN: &[(&str, &str)] = &[$(($column, $sql)),*];

        /// Many events as one array per column, so a batch of any size is one statement with
        /// a fixed shape, which Postgres plans once per connection.
        #[derive(Default)]
        struct ColumnArrays<'a> {
            $( $field: Vec<<$type as Column>::Written<'a>>, )*
            claims: Vec<Option<StoredClaims<'a>>>,
        }

        impl<'a> ColumnArrays<'a> {
            fn push(&mut self, row: &'a AuditEvent) {
                $( { let $event = row; self.$field.push(Storable::storable($value)); } )*
                self.claims.push(storable_claims(row));
            }

            fn bind(self, query: Query<'a, Postgres, PgArguments>) -> Query<'a, Postgres, PgArguments> {
                query $( .bind(self.$field) )* .bind(self.claims)
            }
        }

        /// Binds one event's columns, one parameter each, after the query's other parameters
        /// ([`insert_one_sql`]).
        pub(super) fn bind_row<'a>(query: Query<'a, Postgres, PgArguments>, row: &'a AuditEvent) -> Query<'a, Postgres, PgArguments> {
            query $( .bind({ let $event = row; let value: <$type as Column>::Written<'a> = Storable::storable($value); value }) )* .bind(storable_claims(row))
        }
    };
}

/// How a column's value is bound when a row is written: text as it lies in the event, so a row
/// costs no copy of its strings before sqlx encodes them.
trait Column {
    type Written<'a>;
}

impl Column for String {
    type Written<'a> = Cow<'a, str>;
}

impl Column for Option<String> {
    type Written<'a> = Option<Cow<'a, str>>;
}

macro_rules! written_as_is {
    ($($type:ty),*) => { $( impl Column for $type { type Written<'a> = $type; } )* };
}
written_as_is!(Uuid, Option<Uuid>, OffsetDateTime, Option<OffsetDateTime>, i32, Option<i32>, Option<i64>);

fn text(value: &Option<String>) -> Option<Cow<'_, str>> {
    value.as_deref().map(Cow::Borrowed)
}

/// The claims are the row's largest part: the token's own JSON while it is still theirs and
/// Postgres reads it as serde_json did ([`readable_as_sent`]), else the fields, encoded where
/// they lie unless a NUL must be replaced.
fn storable_claims(row: &AuditEvent) -> Option<StoredClaims<'_>> {
    let claims = row.claims.as_deref()?;
    Some(match claims.received_json() {
        Some(json) if readable_as_sent(json, claims) => StoredClaims::Received(json),
        _ if fields_hold_nul(claims.fields()) => {
            StoredClaims::Fields(Cow::Owned(claims.fields().clone().into_iter().map(|(name, value)| (name.storable(), value.storable())).collect()))
        }
        _ => StoredClaims::Fields(Cow::Borrowed(claims.fields())),
    })
}

/// Whether jsonb takes the token's text as the same claims serde_json parsed. The column is
/// `json`, which would take more, but every read and the seal parse it as jsonb ([`CLAIMS`],
/// `to_jsonb(row)`), so what it holds must read there as the broker read it, and no signed
/// token can leave a row that cannot be read or sealed. Not when it has a `\u` escape: jsonb
/// refuses `\u0000`, and how it reads an escape above U+007F depends on the database's
/// encoding. Nor when it has a number serde_json holds as a float: jsonb's numeric refuses
/// exponents serde_json rounds to zero or infinity (`1e-20000`). GitLab's claims are strings,
/// integers and booleans, sent without escapes. A false alarm (an escaped backslash before a
/// `u`) only costs writing the fields out.
fn readable_as_sent(json: &str, claims: &crate::types::Claims) -> bool {
    fn integers_only(value: &Value) -> bool {
        match value {
            Value::Number(number) => !number.is_f64(),
            Value::Array(items) => items.iter().all(integers_only),
            Value::Object(fields) => fields.values().all(integers_only),
            _ => true,
        }
    }
    !json.contains("\\u") && claims.values_other_than_plain_strings().all(integers_only)
}

/// The `claims_json` column as bound: `json`, whose binary form is the text itself.
enum StoredClaims<'a> {
    /// JSON that serde_json parsed, and Postgres reads alike ([`readable_as_sent`]).
    Received(&'a str),
    Fields(Cow<'a, Map<String, Value>>),
}

/// `json` and `json[]`: built-in types, whose OIDs are the same in every database.
const JSON: Oid = Oid(114);
const JSON_ARRAY: Oid = Oid(199);

impl sqlx::Type<Postgres> for StoredClaims<'_> {
    fn type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSON)
    }
}

impl PgHasArrayType for StoredClaims<'_> {
    fn array_type_info() -> PgTypeInfo {
        PgTypeInfo::with_oid(JSON_ARRAY)
    }
}

impl sqlx::Encode<'_, Postgres> for StoredClaims<'_> {
    fn encode_by_ref(&self, buf: &mut PgArgumentBuffer) -> Result<IsNull, BoxDynError> {
        match self {
            Self::Fields(fields) => serde_json::to_writer(&mut **buf, fields)?,
            Self::Received(json) => buf.extend_from_slice(json.as_bytes()),
        }
        Ok(IsNull::No)
    }
}

/// Postgres' `text` and `jsonb` cannot hold U+0000, and one row that carries it (a caller's
/// field, a claim) fails the INSERT of its whole batch, and with it every other request in that
/// batch. Such a character is stored as U+FFFD instead: the row is written, and shows where.
trait Storable {
    fn storable(self) -> Self;
}

impl Storable for String {
    fn storable(self) -> Self {
        if self.contains('\0') { self.replace('\0', "\u{FFFD}") } else { self }
    }
}

impl Storable for Cow<'_, str> {
    fn storable(self) -> Self {
        if self.contains('\0') { Cow::Owned(self.replace('\0', "\u{FFFD}")) } else { self }
    }
}

impl Storable for Value {
    fn storable(self) -> Self {
        match self {
            Value::String(text) => Value::String(text.storable()),
            Value::Array(items) => Value::Array(items.into_iter().map(Storable::storable).collect()),
            Value::Object(fields) => Value::Object(fields.into_iter().map(|(name, value)| (name.storable(), value.storable())).collect()),
            other => other,
        }
    }
}

fn holds_nul(value: &Value) -> bool {
    match value {
        Value::String(text) => text.contains('\0'),
        Value::Array(items) => items.iter().any(holds_nul),
        Value::Object(fields) => fields_hold_nul(fields),
        _ => false,
    }
}

fn fields_hold_nul(fields: &Map<String, Value>) -> bool {
    fields.iter().any(|(name, value)| name.contains('\0') || holds_nul(value))
}

impl<T: Storable> Storable for Option<T> {
    fn storable(self) -> Self {
        self.map(Storable::storable)
    }
}

macro_rules! storable_as_is {
    ($($type:ty),*) => { $( impl Storable for $type { fn storable(self) -> Self { self } } )* };
}
storable_as_is!(Uuid, OffsetDateTime, i32, i64);

audit_columns! {
    id "id": Uuid = "uuid", |event| event.id;
    #[serde(with = "time::serde::rfc3339")]
    occurred_at "occurred_at": OffsetDateTime = "timestamptz", |event| event.occurred_at;
    decision "decision": String = "text", |event| Cow::Borrowed(event.decision.as_str());
    code "code": Option<String> = "text", |event| text(&event.code);
    detail "detail": Option<String> = "text", |event| text(&event.detail);
    issuer "issuer": Option<String> = "text", |event| text(&event.issuer);
    subject "subject": Option<String> = "text", |event| text(&event.subject);
    project_path "project_path": Option<String> = "text", |event| event.claim_text("project_path");
    job_project_path "job_project_path": Option<String> = "text", |event| event.claim_text("job_project_path");
    namespace_path "namespace_path": Option<String> = "text", |event| event.claim_text("namespace_path");
    pipeline_id "pipeline_id": Option<String> = "text", |event| event.claim_text("pipeline_id");
    job_id "job_id": Option<String> = "text", |event| event.claim_text("job_id");
    git_ref "ref": Option<String> = "text", |event| event.claim_text("ref");
    ref_type "ref_type": Option<String> = "text", |event| event.claim_text("ref_type");
    sha "sha": Option<String> = "text", |event| event.claim_text("sha");
    user_login "user_login": Option<String> = "text", |event| event.claim_text("user_login");
    environment "environment": Option<String> = "text", |event| event.claim_text("environment");
    runner_id "runner_id": Option<i64> = "bigint", |event| event.claim_text("runner_id").and_then(|id| id.parse().ok());
    role "role": Option<String> = "text", |event| text(&event.role);
    target "target": Option<String> = "text", |event| text(&event.target);
    backend "backend": Option<String> = "text", |event| text(&event.backend);
    requested_ttl_seconds "requested_ttl_seconds": Option<i32> = "integer", |event| event.requested_ttl_seconds.map(|s| s as i32);
    granted_ttl_seconds "granted_ttl_seconds": Option<i32> = "integer", |event| event.granted_ttl_seconds.map(|s| s as i32);
    #[serde(with = "time::serde::rfc3339::option")]
    expires_at "expires_at": Option<OffsetDateTime> = "timestamptz", |event| event.expires_at;
    #[serde(with = "time::serde::rfc3339::option")]
    job_deadline "job_deadline": Option<OffsetDateTime> = "timestamptz", |event| event.job_deadline;
    overshoot_seconds "overshoot_seconds": Option<i32> = "integer", |event| event.overshoot_seconds.map(|s| s as i32);
    credential_sha256 "credential_sha256": Option<String> = "text", |event| text(&event.credential_sha256);
    credential_handle "credential_handle": Option<String> = "text", |event| text(&event.credential_handle);
    job_token_sha256 "job_token_sha256": Option<String> = "text", |event| text(&event.job_token_sha256);
    renews_issuance_id "renews_issuance_id": Option<Uuid> = "uuid", |event| event.renews_issuance;
    about_issuance_id "about_issuance_id": Option<Uuid> = "uuid", |event| event.about_issuance;
    request_id "request_id": String = "text", |event| Cow::Borrowed(&event.request_id);
    client_addr "client_addr": Option<String> = "text", |event| text(&event.client_addr);
    user_agent "user_agent": Option<String> = "text", |event| text(&event.user_agent);
    occurrences "occurrences": i32 = "integer", |event| event.occurrences as i32;
    endpoint "endpoint": Option<String> = "text", |event| event.endpoint.map(Cow::Borrowed);
    policy_version "policy_version": Option<String> = "text", |event| text(&event.policy_version);
}

/// Column order of CSV output (and the fields the page's detail view lists).
pub static RECORD_FIELDS: std::sync::LazyLock<Vec<&'static str>> = std::sync::LazyLock::new(|| {
    let mut fields: Vec<&str> = WRITTEN.iter().map(|(column, _)| *column).collect();
    fields.insert(2, "recorded_at");
    fields
});

/// What a read selects for [`AuditRecord`], from `audit_events a`, without `claims`. Rows
/// written before migration 0014 keep their lineage in `audit_lineage_backfill`.
pub static SELECT_LIST: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let mut list: Vec<String> = WRITTEN
        .iter()
        .map(|(column, _)| match *column {
            "renews_issuance_id" | "about_issuance_id" => {
                format!("coalesce(a.{column}, (select b.{column} from audit_lineage_backfill b where b.id = a.id)) as {column}")
            }
            column => format!("a.{column}"),
        })
        .collect();
    list.push("a.recorded_at".into());
    list.join(", ")
});

/// One INSERT for any number of rows: every written column as an array, unnested.
static INSERT: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_sql(1, None));

/// One INSERT for one row: every written column a parameter of its own.
static INSERT_ONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_one_sql(1, None));

/// A row's claims, as a read selects them from `audit_events a`: `json` since migration 0023,
/// `jsonb` in rows written before it. Parsed as jsonb, as they always were, so a repeated name
/// keeps its last value whichever column holds them.
pub const CLAIMS: &str = "coalesce(a.claims_json::jsonb, a.claims)";

/// One claim of a row of `audit_events a` as text, without parsing the rest as [`CLAIMS`] does
/// (`->>` on json scans the text, and also keeps a repeated name's last value).
pub fn claim_text(name: &str) -> String {
    format!("coalesce(a.claims_json ->> '{name}', a.claims ->> '{name}')")
}

fn column_list() -> String {
    WRITTEN.iter().map(|(column, _)| *column).chain(["claims_json"]).collect::<Vec<_>>().join(", ")
}

/// The types of the written columns and of the claims, in bind order.
fn column_types() -> impl Iterator<Item = &'static str> {
    WRITTEN.iter().map(|(_, sql)| *sql).chain(["json"])
}

/// The INSERT's text, its arrays bound from `$first` on. With `only_where`, a condition on the
/// rows (`e.ord`, 1-based, is a row's position in the arrays), only the rows it holds for are
/// inserted: how a statement that claims token uses writes the rows of the claims it won
/// (`claims.rs`).
pub(super) fn insert_sql(first: usize, only_where: Option<&str>) -> String {
    let columns = column_list();
    let arrays = column_types().enumerate().map(|(n, sql)| format!("${}::{sql}[]", n + first)).collect::<Vec<_>>().join(", ");
    match only_where {
        None => format!("insert into audit_events ({columns}) select * from unnest({arrays})"),
        Some(condition) => format!(
            "insert into audit_events ({columns}) select {columns} from unnest({arrays}) with ordinality as e ({columns}, ord)
             where {condition}"
        ),
    }
}

/// [`insert_sql`] for exactly one row, its columns bound from `$first` on, one parameter each
/// ([`bind_row`]). Postgres then receives no array and unnests none: a lone exchange's
/// statement binds and runs about a sixth faster (bench/README, eighth session). With
/// `only_where`, the row is inserted only if the condition holds.
pub(super) fn insert_one_sql(first: usize, only_where: Option<&str>) -> String {
    let values = column_types().enumerate().map(|(n, sql)| format!("${}::{sql}", n + first)).collect::<Vec<_>>().join(", ");
    let condition = only_where.map(|condition| format!(" where {condition}")).unwrap_or_default();
    format!("insert into audit_events ({}) select {values}{condition}", column_list())
}

/// The INSERT of these events, ready to run: one row's statement for one event.
pub(super) fn insert(events: &[AuditEvent]) -> Query<'_, Postgres, PgArguments> {
    match events {
        [event] => bind_row(sqlx::query(INSERT_ONE.as_str()), event),
        _ => bind_rows(sqlx::query(INSERT.as_str()), events.iter()),
    }
}

/// Binds the events' columns, one array each, after the query's other parameters ([`insert_sql`]).
pub(super) fn bind_rows<'a>(query: Query<'a, Postgres, PgArguments>, events: impl Iterator<Item = &'a AuditEvent>) -> Query<'a, Postgres, PgArguments> {
    let mut columns = ColumnArrays::default();
    for event in events {
        columns.push(event);
    }
    columns.bind(query)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_claims(sent: &str) -> AuditEvent {
        let mut event = AuditEvent::new(Uuid::new_v4(), crate::audit::Decision::Denied, OffsetDateTime::now_utc(), "r");
        event.claims = Some(std::sync::Arc::new(crate::types::Claims::parse(sent.as_bytes().to_vec()).unwrap()));
        event
    }

    fn stored_claims(received: &str) -> Option<Value> {
        let event = with_claims(received);
        let mut columns = ColumnArrays::default();
        columns.push(&event);
        columns.claims.pop().unwrap().map(|claims| match claims {
            StoredClaims::Received(json) => {
                assert_eq!(json, received, "the token's own text");
                serde_json::from_str(json).unwrap()
            }
            StoredClaims::Fields(fields) => Value::Object(fields.into_owned()),
        })
    }

    #[test]
    fn a_nul_is_stored_as_a_replacement_character() {
        let mut event = AuditEvent::new(Uuid::new_v4(), crate::audit::Decision::Denied, OffsetDateTime::now_utc(), "r");
        event.role = Some("a\0b".into());
        let mut columns = ColumnArrays::default();
        columns.push(&event);
        assert_eq!(columns.role, [Some(Cow::from("a\u{FFFD}b"))]);
        let received = r#"{"sub\u0000": ["x\u0000"], "ref": "main"}"#;
        assert_eq!(stored_claims(received), Some(serde_json::json!({"sub\u{FFFD}": ["x\u{FFFD}"], "ref": "main"})));
    }

    #[test]
    fn claims_are_stored_as_the_token_sent_them_until_something_is_added() {
        let sent = r#"{"sub": "job", "ref": "main", "n": -1, "big": 18446744073709551615, "é": [true, null, {"k": "\/"}]}"#;
        assert!(matches!(storable_claims(&with_claims(sent)), Some(StoredClaims::Received(json)) if json == sent));
        // An escape, a float, an integer past u64 (a float to serde_json), an escaped backslash
        // before a `u` (a false alarm): the fields, written out, say the same.
        for sent in [r#"{"ref": "\u006dain"}"#, r#"{"n": 1.5}"#, r#"{"n": 1e-20000}"#, r#"{"n": 18446744073709551616}"#, r#"{"path": "a\\user"}"#] {
            assert!(matches!(storable_claims(&with_claims(sent)), Some(StoredClaims::Fields(_))), "{sent}");
            assert_eq!(stored_claims(sent), Some(serde_json::from_str(sent).unwrap()), "{sent}");
        }
        let mut claims = crate::types::Claims::parse(br#"{"sub": "job"}"#.to_vec()).unwrap();
        assert_eq!(claims.received_json(), Some(r#"{"sub": "job"}"#));
        claims.insert("delivery_id".into(), Value::from("d1"));
        assert_eq!(claims.received_json(), None, "the text no longer says what the fields do");
        assert_eq!(Value::Object(claims.fields().clone()), serde_json::json!({"sub": "job", "delivery_id": "d1"}));
    }

    #[test]
    fn the_insert_binds_one_array_per_column_and_a_lone_row_one_value_per_column() {
        let binds = INSERT.matches("::").count();
        assert_eq!(binds, WRITTEN.len() + 1, "{}", *INSERT);
        assert!(INSERT.contains(&format!("${}::json[]", WRITTEN.len() + 1)));
        assert_eq!(INSERT_ONE.matches("::").count(), WRITTEN.len() + 1, "{}", *INSERT_ONE);
        assert!(INSERT_ONE.ends_with(&format!("${}::json", WRITTEN.len() + 1)), "{}", *INSERT_ONE);
        let names: std::collections::HashSet<_> = RECORD_FIELDS.iter().collect();
        assert_eq!(names.len(), RECORD_FIELDS.len(), "no column is declared twice");
    }
}
