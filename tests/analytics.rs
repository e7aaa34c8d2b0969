//! The LookML project (analytics/looker/) against the real SQL views on real Postgres: every
//! dimension's and measure's SQL runs the way Looker would compose it (`${TABLE}` and `${field}`
//! references resolved, measures aggregated by their type), every column of each view is
//! exposed, each explore names a view, and the measures count what the log holds.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::seed_audit_row;
use serde_json::json;
use sqlx::PgPool;

const LOOKML_DIR: &str = "analytics/looker";

struct Field {
    kind: String,
    type_name: String,
    sql: Option<String>,
}

struct View {
    table: String,
    fields: BTreeMap<String, Field>,
}

/// Reads the subset of LookML these files use: top-level `kind: name {` blocks of
/// `key: value` lines, with `sql: ... ;;` values.
fn parse_view(text: &str) -> (String, View) {
    let name = text.lines().find_map(|line| line.strip_prefix("view: ")?.strip_suffix(" {")).expect("a view").to_owned();
    let table = text.lines().find_map(|line| line.trim().strip_prefix("sql_table_name: ")?.strip_suffix(" ;;")).expect("sql_table_name").to_owned();
    let mut fields = BTreeMap::new();
    let mut current: Option<(String, Field)> = None;
    for line in text.lines() {
        if let Some(header) = line.strip_prefix("  ").filter(|l| !l.starts_with(' ')).and_then(|l| l.strip_suffix(" {")) {
            let (kind, field_name) = header.split_once(": ").unwrap();
            current = Some((field_name.to_owned(), Field { kind: kind.to_owned(), type_name: String::new(), sql: None }));
        } else if line == "  }" {
            let (field_name, field) = current.take().expect("a field was open");
            fields.insert(field_name, field);
        } else if let Some((_, field)) = current.as_mut() {
            let line = line.trim();
            if let Some(type_name) = line.strip_prefix("type: ") {
                field.type_name = type_name.to_owned();
            } else if let Some(sql) = line.strip_prefix("sql: ") {
                field.sql = Some(sql.strip_suffix(" ;;").expect("one-line sql ending in ;;").to_owned());
            }
        }
    }
    (name, View { table, fields })
}

fn read_views() -> BTreeMap<String, View> {
    let dir = common::repo_path(&format!("{LOOKML_DIR}/views"));
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with(".view.lkml"))
        .map(|path| parse_view(&std::fs::read_to_string(path).unwrap()))
        .collect()
}

/// The SQL Looker generates for a field: `${TABLE}` is the view's alias, `${other}` the other
/// field's expression; a measure is wrapped in its aggregate.
fn expression(view: &View, name: &str) -> String {
    let field = &view.fields[name];
    let mut sql = field.sql.clone().unwrap_or_default().replace("${TABLE}", "t");
    while let Some(start) = sql.find("${") {
        let end = start + sql[start..].find('}').unwrap();
        let referenced = sql[start + 2..end].to_owned();
        assert!(view.fields.contains_key(&referenced), "{name} refers to unknown field {referenced}");
        sql.replace_range(start..=end, &format!("({})", expression(view, &referenced)));
    }
    if field.kind != "measure" {
        return sql;
    }
    match field.type_name.as_str() {
        "sum" => format!("sum({sql})"),
        "max" => format!("max({sql})"),
        "count_distinct" => format!("count(distinct {sql})"),
        "count" => "count(*)".to_owned(),
        "number" => sql,
        other => panic!("measure {name}: type {other} is not one this test composes"),
    }
}

async fn value(pool: &PgPool, view: &View, field: &str) -> Option<f64> {
    let query = format!("select ({})::float8 from {} t", expression(view, field), view.table);
    sqlx::query_scalar(&query).fetch_one(pool).await.unwrap_or_else(|error| panic!("{field}: {query}: {error}"))
}

#[tokio::test]
async fn every_lookml_field_runs_against_the_views_and_counts_right() {
    let pool = PgPool::connect(&common::fresh_database().await).await.unwrap();
    credbroker::audit::migrate(&pool).await.unwrap();
    for (decision, project) in [("issued", "platform/orders"), ("issued", "platform/orders"), ("denied", "platform/orders"), ("denied", "data/x")] {
        let credential = (decision == "issued").then(|| format!("{:064x}", rand::random::<u64>()));
        seed_audit_row(
            &pool,
            json!({"decision": decision, "role": "r", "target": "kafka", "project_path": project, "subject": project, "pipeline_id": "1",
                   "code": (decision == "denied").then_some("access_denied"), "credential_sha256": credential}),
        )
        .await;
    }

    let views = read_views();
    assert_eq!(views.keys().collect::<Vec<_>>(), ["credential_lineage", "denials_recent", "issuance_daily", "long_lived_overshoots"]);
    for (name, view) in &views {
        for (field_name, field) in &view.fields {
            if field.kind == "measure" || field.sql.is_some() {
                let query = format!("select {} from {} t", expression(view, field_name), view.table);
                if let Err(error) = sqlx::query(&query).fetch_all(&pool).await {
                    panic!("{name}.{field_name}: {query}: {error}");
                }
            }
        }
        // Every column of the SQL view is reachable from Looker.
        let columns: Vec<String> =
            sqlx::query_scalar("select column_name::text from information_schema.columns where table_name = $1 order by ordinal_position")
                .bind(&view.table)
                .fetch_all(&pool)
                .await
                .unwrap();
        assert!(!columns.is_empty(), "{} is not a view in the database", view.table);
        let referenced: BTreeSet<String> = view
            .fields
            .values()
            .filter_map(|f| f.sql.clone())
            .collect::<Vec<_>>()
            .join(" ")
            .split("${TABLE}.")
            .skip(1)
            .map(|rest| rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect())
            .collect();
        for column in columns {
            assert!(referenced.contains(&column), "{name}: column {column} has no dimension or measure");
        }
    }

    let daily = &views["issuance_daily"];
    assert_eq!(value(&pool, daily, "events").await, Some(4.0));
    assert_eq!(value(&pool, daily, "issued").await, Some(2.0));
    assert_eq!(value(&pool, daily, "denied").await, Some(2.0));
    assert_eq!(value(&pool, daily, "denial_rate").await, Some(0.5));
    let denials = &views["denials_recent"];
    assert_eq!(value(&pool, denials, "denials").await, Some(2.0));
    assert_eq!(value(&pool, denials, "subjects").await, Some(2.0));

    // The model includes these views and explores only views it defines.
    let model = std::fs::read_to_string(common::repo_path(&format!("{LOOKML_DIR}/credbroker.model.lkml"))).unwrap();
    assert!(model.contains("include: \"/views/*.view.lkml\""));
    let explores: Vec<&str> = model.lines().filter_map(|line| line.strip_prefix("explore: ")?.strip_suffix(" {")).collect();
    assert_eq!(explores, ["issuance_daily", "denials_recent", "long_lived_overshoots", "credential_lineage"]);
    // The datagroup's trigger query runs too (as credbroker_auditor may: select on audit_events).
    let trigger = model.split("sql_trigger: ").nth(1).unwrap().split(" ;;").next().unwrap();
    sqlx::query(trigger).fetch_one(&pool).await.unwrap();

    // A Looker connection logs in as a member of credbroker_auditor, which may read every view.
    let mut auditor = pool.acquire().await.unwrap();
    sqlx::query("set role credbroker_auditor").execute(&mut *auditor).await.unwrap();
    for view in views.values() {
        let query = format!("select count(*) from {}", view.table);
        sqlx::query(&query).fetch_one(&mut *auditor).await.unwrap_or_else(|error| panic!("{query}: {error}"));
    }
}

#[tokio::test]
async fn credential_lineage_counts_a_renewed_and_revoked_credential_as_one_chain() {
    let pool = PgPool::connect(&common::fresh_database().await).await.unwrap();
    credbroker::audit::migrate(&pool).await.unwrap();
    let issued = |n: u64| json!({"decision": "issued", "role": "r", "target": "kafka", "credential_sha256": format!("{n:064x}")});
    let first = seed_audit_row(&pool, issued(1)).await;
    let other = seed_audit_row(&pool, issued(2)).await;
    let mut renewal = issued(3);
    renewal["renews_issuance_id"] = json!(first);
    let renewal = seed_audit_row(&pool, renewal).await;
    let revocation = seed_audit_row(&pool, json!({"decision": "revoked", "role": "r", "about_issuance_id": renewal})).await;

    let lineage = &read_views()["credential_lineage"];
    assert_eq!(value(&pool, lineage, "chains").await, Some(2.0), "two first issuances");
    assert_eq!(value(&pool, lineage, "renewals").await, Some(1.0));
    assert_eq!(value(&pool, lineage, "revocations").await, Some(1.0));
    let chain: Vec<uuid::Uuid> = sqlx::query_scalar("select id from credential_lineage where first_issuance_id = $1 order by occurred_at, id")
        .bind(first)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(chain.len(), 3, "the first issuance, its renewal and the renewal's revocation");
    assert!(chain.contains(&revocation) && !chain.contains(&other));
}
