//! Credential lifecycle end to end: real Postgres, real brokers (in-process, and the binary
//! for the SIGKILL case). The credentials a backend revokes are Postgres users minted through a
//! real OpenBao (tests/common/openbao.rs), whose audit log shows every `sys/leases/revoke`. The
//! broker's own deadline schedule is exercised with Looker sessions, the credential here that
//! outlives its grant (Looker ends a session only after its hour), against the Looker stand-in
//! (tests/common/looker_standin.rs; no Looker server runs here).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::looker_standin::{looker_tables, revocation_key_extra, LookerStandin, CLIENT_SECRET};
use common::openbao::{database_for_minted_users, provision, recommended_approle, shipped_policy, vault_section, OpenBao};
use common::{eventually, start_binary, TempDir, TestApp};
use serde_json::{json, Value};

const POLICIES: &str = r#"
[admins]
issuer = "gitlab"
[admins.claims]
project_path = "security/credbroker-admin"
ref_protected = "true"

[[role]]
name = "db-ci"
backend = "postgres"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
vault_role = "ci-reader"
[role.claims]
job_project_path = "platform/*"

[[role]]
name = "db-long"
backend = "postgres"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
max_uses_per_token = 10
vault_role = "ci-reader"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "looker-session"
backend = "looker"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
user_id = "42"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "orders-producer"
backend = "kafka"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
principal = "ci:{job_project_path}"
[role.claims]
job_project_path = "platform/orders"
"#;

struct LifecycleApp {
    app: TestApp,
    bao: OpenBao,
    looker: LookerStandin,
    _secrets: TempDir,
}

/// The Vault-backed database backend and the Looker one, with the schedule's key.
fn backend_tables(bao: &OpenBao, looker: &LookerStandin, secrets: &TempDir, login: &(String, String)) -> String {
    format!(
        "{}\n[backends.postgres]\ntype = \"vault_database\"\nplugin = \"postgres\"\n{}",
        vault_section(bao, secrets, login),
        looker_tables(&looker.url, &secrets.0, CLIENT_SECRET)
    )
}

/// A broker polling its revocation schedule every second, with its own OpenBao and Looker, on
/// `database_url` when given (another broker's).
async fn spawn(database_url: Option<String>, looker: Option<LookerStandin>) -> LifecycleApp {
    spawn_configured("", database_url, looker).await
}

/// As [`spawn`], with `extra` top-level config lines.
async fn spawn_configured(extra: &str, database_url: Option<String>, looker: Option<LookerStandin>) -> LifecycleApp {
    let bao = OpenBao::start().await;
    let database_url = match database_url {
        Some(url) => url,
        None => database_for_minted_users().await,
    };
    let login = provision(&bao, &database_url, recommended_approle()).await;
    let looker = match looker {
        Some(looker) => looker,
        None => LookerStandin::start().await,
    };
    looker.add_user("42", "reports-bot@example.com");
    let secrets = common::temp_dir();
    let tables = backend_tables(&bao, &looker, &secrets, &login);
    let extra = format!("{extra}\n{}", revocation_key_extra(&secrets.0));
    let app = TestApp::spawn_full(&extra, &tables, POLICIES, Some(database_url)).await;
    LifecycleApp { app, bao, looker, _secrets: secrets }
}

/// The leases OpenBao granted that are still alive.
async fn live_leases(bao: &OpenBao) -> Vec<String> {
    let mut live = Vec::new();
    for lease in bao.minted_leases() {
        if !bao.revoked(&lease).await {
            live.push(lease);
        }
    }
    live
}

fn lease(body: &Value) -> String {
    body["credential"]["lease_id"].as_str().unwrap().to_owned()
}

async fn rows_for_handle(pool: &sqlx::PgPool, decision: &str, handle: &str) -> Vec<Value> {
    sqlx::query_scalar("select to_jsonb(a) from audit_events a where decision = $1 and credential_handle = $2")
        .bind(decision)
        .bind(handle)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// Exchanges a token with `changes` for `role`; returns the body.
async fn issue(app: &TestApp, role: &str, changes: Value) -> Value {
    let (status, _, body) = app.exchange(&app.issuer.token_with(changes), json!({ "role": role })).await;
    assert_eq!(status, 200, "{body}");
    body
}

fn admin_token(app: &TestApp) -> String {
    app.issuer.token_with(json!({"project_path": "security/credbroker-admin", "user_login": "sec-oncall"}))
}

async fn post(app: &TestApp, path: &str, token: &str, body: Value) -> (u16, Value) {
    let response = app.client.post(format!("{}{path}", app.url)).bearer_auth(token).json(&body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

/// The Looker session token a credential carries (never in a row).
fn session_token(body: &Value) -> String {
    body["credential"]["access_token"].as_str().unwrap_or_else(|| panic!("no session token: {body}")).to_owned()
}

#[tokio::test]
async fn deadline_revocation_fires_once_across_two_brokers_sharing_the_database() {
    let first = spawn(None, None).await;
    let second = spawn(Some(first.app.database_url.clone()), Some(first.looker.clone())).await;
    let looker = &first.looker;
    let deadline = time::OffsetDateTime::now_utc().unix_timestamp() + 4;
    let body = issue(&first.app, "looker-session", json!({"exp": deadline})).await;
    let token = session_token(&body);
    let issuance_id = body["issuance_id"].as_str().unwrap().to_owned();
    assert!(looker.session(&token).is_some(), "not before the deadline");
    let state: String =
        sqlx::query_scalar("select state from revocations where issuance_id = $1::uuid").bind(&issuance_id).fetch_one(&first.app.pool).await.unwrap();
    assert_eq!(state, "pending", "scheduled durably when issued");

    eventually("the session ended at the deadline", Duration::from_secs(15), async || looker.session(&token).is_none()).await;
    // Due at the granted expiry, which the grant may put a little before the deadline.
    let expires_at = time::OffsetDateTime::parse(body["expires_at"].as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    assert!(expires_at.unix_timestamp() <= deadline);
    assert!(time::OffsetDateTime::now_utc() >= expires_at, "ended before {expires_at}");
    // Both brokers keep polling; neither revokes it again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(looker.logouts().len(), 1, "exactly one logout across both brokers");
    let rows: Vec<Value> = sqlx::query_scalar("select to_jsonb(a) from audit_events a where decision = 'revoked' and about_issuance_id = $1::uuid")
        .bind(&issuance_id)
        .fetch_all(&second.app.pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["project_path"], "platform/orders", "the revoked row carries the issued row's identity");
    assert_eq!(rows[0]["role"], "looker-session");
    let failed: i64 =
        sqlx::query_scalar("select count(*) from audit_events where decision = 'revoke_failed'").fetch_one(&first.app.pool).await.unwrap();
    assert_eq!(failed, 0);
}

#[tokio::test]
async fn a_lease_vault_shortens_itself_is_not_scheduled() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let body = issue(&app, "db-ci", json!({})).await;
    let scheduled: i64 = sqlx::query_scalar("select count(*) from revocations").fetch_one(&app.pool).await.unwrap();
    assert_eq!(scheduled, 0, "{body}");
    assert_eq!(bao.revocations().len(), 0);
}

/// The broker's policy loses `sys/leases/revoke` (an operator's mistake): an on-demand
/// revocation fails with OpenBao's reason, is audited, and is retried until the policy is back.
#[tokio::test]
async fn failed_revocations_are_audited_and_retried_with_backoff() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let body = issue(&app, "db-ci", json!({})).await;
    let lease_id = lease(&body);
    let shipped = shipped_policy();
    let without_revoke: String = shipped.lines().filter(|line| !line.contains("sys/leases/revoke")).collect::<Vec<_>>().join("\n");
    bao.policy("credbroker", &without_revoke).await;
    let (status, report) = post(&app, "/v1/revocations", &admin_token(&app), json!({"issuance": body["issuance_id"]})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["credentials"][0]["outcome"], "revoke_failed", "{report}");
    let failed = rows_for_handle(&app.pool, "revoke_failed", &lease_id).await;
    assert_eq!(failed.len(), 1, "{failed:?}");
    let detail = failed[0]["detail"].as_str().unwrap();
    assert!(detail.contains("permission denied") && detail.contains("retrying in 2 s"), "{detail}");
    assert!(!bao.revoked(&lease_id).await);

    bao.policy("credbroker", &shipped).await;
    eventually("the retried revocation", Duration::from_secs(10), async || bao.revoked(&lease_id).await).await;
    eventually("its revoked row", Duration::from_secs(5), async || !rows_for_handle(&app.pool, "revoked", &lease_id).await.is_empty()).await;
    assert_eq!(bao.revocations_of(&lease_id), 1);
}

#[tokio::test]
async fn revoke_selects_by_issuance_job_pipeline_project_subject_and_time() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let admin = admin_token(&app);
    let revoke = |body: Value| {
        let (app, admin) = (&app, admin.clone());
        async move { post(app, "/v1/revocations", &admin, body).await }
    };

    // --issuance
    let a = issue(&app, "db-ci", json!({"job_id": "1001"})).await;
    let (status, report) = revoke(json!({"issuance": a["issuance_id"]})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["matched"], 1);
    assert_eq!(report["credentials"][0]["outcome"], "revoked", "{report}");
    assert!(bao.revoked(&lease(&a)).await);
    let rows = rows_for_handle(&app.pool, "revoked", &lease(&a)).await;
    assert_eq!(rows.len(), 1);
    assert!(rows[0]["detail"].as_str().unwrap().contains("requested by gitlab:"), "{}", rows[0]["detail"]);
    // Asking again finds it already revoked and does not call Vault again.
    let (_, report) = revoke(json!({"issuance": a["issuance_id"]})).await;
    assert_eq!(report["credentials"][0]["outcome"], "already_revoked", "{report}");
    assert_eq!(bao.revocations_of(&lease(&a)), 1);

    // --job (numbers accepted as well as strings); another job's credential is untouched.
    let b = issue(&app, "db-ci", json!({"job_id": "2002"})).await;
    let other = issue(&app, "db-ci", json!({"job_id": "2003"})).await;
    let (_, report) = revoke(json!({"job": 2002})).await;
    assert_eq!(report["matched"], 1, "{report}");
    assert!(bao.revoked(&lease(&b)).await);
    assert!(!bao.revoked(&lease(&other)).await);

    // --pipeline
    let c = issue(&app, "db-ci", json!({"pipeline_id": "7007"})).await;
    let (_, report) = revoke(json!({"pipeline": "7007"})).await;
    assert_eq!(report["summary"]["revoked"], 1, "{report}");
    assert!(bao.revoked(&lease(&c)).await);

    // --subject
    let d = issue(&app, "db-ci", json!({"sub": "project_path:platform/orders:ref_type:branch:ref:release"})).await;
    let (_, report) = revoke(json!({"subject": "project_path:platform/orders:ref_type:branch:ref:release"})).await;
    assert_eq!(report["summary"]["revoked"], 1, "{report}");
    assert!(bao.revoked(&lease(&d)).await);

    // --project with --role: only that role's credentials of the project; the Kafka token
    // (broker-signed JWT) is reported as staying valid, with until when.
    let e = issue(&app, "db-ci", json!({"project_path": "platform/billing", "job_project_path": "platform/billing"})).await;
    let kafka = issue(&app, "orders-producer", json!({"project_path": "platform/billing"})).await;
    let (_, report) = revoke(json!({"project": "platform/billing", "role": "orders-producer"})).await;
    assert_eq!(report["matched"], 1, "{report}");
    assert_eq!(report["credentials"][0]["outcome"], "not_revocable");
    assert!(report["credentials"][0]["detail"].as_str().unwrap().contains("kafka_oauthbearer"), "{report}");
    // Postgres keeps microseconds, the exchange answered with nanoseconds.
    let at = |value: &Value| time::OffsetDateTime::parse(value.as_str().unwrap(), &time::format_description::well_known::Rfc3339).unwrap();
    assert!((at(&report["credentials"][0]["valid_until"]) - at(&kafka["expires_at"])).abs() < time::Duration::milliseconds(1), "{report}");
    assert_eq!(report["remains_valid_until"], report["credentials"][0]["valid_until"]);
    assert!(!bao.revoked(&lease(&e)).await, "the role filter kept the database user");
    let (_, report) = revoke(json!({"project": "platform/billing"})).await;
    assert_eq!(report["summary"], json!({"revoked": 1, "not_revocable": 1}), "{report}");
    assert!(bao.revoked(&lease(&e)).await);

    // --issued-since (a duration back from now, or RFC 3339)
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let since = time::OffsetDateTime::now_utc();
    let f = issue(&app, "db-ci", json!({})).await;
    let since = since.format(&time::format_description::well_known::Rfc3339).unwrap();
    let (_, report) = revoke(json!({"issued_since": since, "role": "db-ci"})).await;
    assert_eq!(report["matched"], 1, "only the credential issued after {since}: {report}");
    assert!(bao.revoked(&lease(&f)).await);
    assert!(!bao.revoked(&lease(&other)).await);

    // Bad selectors are refused with a clear reason and audited.
    for bad in [json!({}), json!({"role": "db-ci"}), json!({"job": "1", "pipeline": "2"}), json!({"issued_since": "yesterday"})] {
        let (status, problem) = revoke(bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {problem}");
        assert_eq!(problem["code"], "invalid_request");
    }
}

#[tokio::test]
async fn dry_run_lists_without_revoking() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let snowflake = issue(&app, "db-ci", json!({})).await;
    issue(&app, "orders-producer", json!({})).await;
    let (status, report) = post(&app, "/v1/revocations", &admin_token(&app), json!({"project": "platform/orders", "dry_run": true})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["summary"], json!({"would_revoke": 1, "not_revocable": 1}), "{report}");
    assert_eq!(bao.revocations().len(), 0);
    let lease_id = snowflake["credential"]["lease_id"].as_str().unwrap();
    assert!(rows_for_handle(&app.pool, "revoked", lease_id).await.is_empty());
    let requests: i64 = sqlx::query_scalar(
        "select count(*) from audit_events where decision = 'admin_request' and detail like 'revoke (dry run) by gitlab:%(user sec-oncall)%'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert_eq!(requests, 1, "the dry run is audited with who asked");
}

#[tokio::test]
async fn revoking_without_admin_rights_is_403_and_audited() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let body = issue(&app, "db-ci", json!({})).await;
    let outsider = app.issuer.token_with(json!({"user_login": "mallory"}));
    let (status, problem) = post(&app, "/v1/revocations", &outsider, json!({"issuance": body["issuance_id"]})).await;
    assert_eq!(status, 403, "{problem}");
    assert_eq!(problem["code"], "access_denied");
    assert!(problem["detail"].as_str().unwrap().contains("[admins]"), "{problem}");
    let row = app.audit_row(problem["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "denied");
    assert_eq!(row["code"], "access_denied");
    assert_eq!(row["user_login"], "mallory");
    assert_eq!(row["target"], "revoke");
    assert!(row["detail"].as_str().unwrap().contains("claim project_path"), "{row}");
    assert_eq!(bao.revocations().len(), 0);

    // The same for freeze; an unverifiable token is a 401.
    let (status, _) = post(&app, "/v1/freezes", &outsider, json!({"all": true})).await;
    assert_eq!(status, 403);
    let (status, _) = post(&app, "/v1/revocations", "not-a-jwt", json!({"job": "1"})).await;
    assert_eq!(status, 401);
}

#[tokio::test]
async fn a_freeze_on_one_broker_stops_issuance_on_another_until_lifted() {
    let first = spawn(None, None).await;
    let second = spawn(Some(first.app.database_url.clone()), None).await;
    let admin = admin_token(&second.app);
    let (status, body) = post(&second.app, "/v1/freezes", &admin, json!({"role": "db-ci"})).await;
    assert_eq!(status, 200, "{body}");

    let (status, _, problem) = first.app.exchange(&first.app.issuer.token(), json!({"role": "db-ci"})).await;
    assert_eq!(status, 403, "{problem}");
    assert_eq!(problem["code"], "access_denied");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("frozen") && detail.contains("role db-ci") && detail.contains("sec-oncall"), "{detail}");
    // Other roles still work.
    issue(&first.app, "orders-producer", json!({})).await;

    // A project freeze, with an end.
    let (status, body) = post(&second.app, "/v1/freezes", &admin, json!({"project": "platform/orders", "until": "2s"})).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = first.app.exchange(&first.app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 403);
    tokio::time::sleep(Duration::from_millis(2200)).await;
    issue(&first.app, "orders-producer", json!({})).await;

    let response =
        second.app.client.delete(format!("{}/v1/freezes", second.app.url)).bearer_auth(&admin).json(&json!({"role": "db-ci"})).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.json::<Value>().await.unwrap()["lifted"], 1);
    issue(&first.app, "db-ci", json!({})).await;
    let audited: Vec<String> = sqlx::query_scalar("select detail from audit_events where decision = 'admin_request' order by occurred_at")
        .fetch_all(&first.app.pool)
        .await
        .unwrap();
    assert_eq!(audited.len(), 3, "{audited:?}");
    assert!(audited[0].starts_with("freeze role db-ci by gitlab:"), "{audited:?}");
    assert!(audited[2].starts_with("unfreeze role db-ci by gitlab:"), "{audited:?}");
}

// ---------------------------------------------------------------- the binary

const BIN: &str = env!("CARGO_BIN_EXE_credbroker");

#[tokio::test]
async fn a_broker_killed_with_sigkill_revokes_what_fell_due_on_its_next_start() {
    let looker = LookerStandin::start().await;
    looker.add_user("42", "reports-bot@example.com");
    let issuer = common::TestIssuer::start().await;
    let database_url = common::fresh_database().await;
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("kafka.pem"), common::rsa_pem(2)).unwrap();
    // The Looker role alone: this broker has no Vault.
    let looker_role = POLICIES.split("[[role]]").find(|role| role.contains("looker-session")).unwrap();
    std::fs::write(dir.0.join("policies/test.toml"), format!("[[role]]{looker_role}")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let text = common::config_text_with_tables(
        &issuer.url,
        &database_url,
        &url,
        &revocation_key_extra(&dir.0),
        &looker_tables(&looker.url, &dir.0, CLIENT_SECRET),
    );
    let config = dir.0.join("credbroker.toml");
    std::fs::write(&config, text).unwrap();
    let log = dir.0.join("broker.log");

    let mut broker = start_binary(&config, port, &log).await;
    let deadline = time::OffsetDateTime::now_utc().unix_timestamp() + 3;
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/credentials"))
        .bearer_auth(issuer.token_with(json!({"exp": deadline})))
        .json(&json!({"role": "looker-session"}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    let token = session_token(&body);
    broker.0.kill().unwrap(); // SIGKILL: no shutdown code runs
    broker.0.wait().unwrap();

    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(looker.session(&token).is_some(), "nobody was running at the deadline");
    let _broker = start_binary(&config, port, &log).await;
    eventually("the overdue logout after restart", Duration::from_secs(10), async || looker.session(&token).is_none()).await;
    drop(broker);
    assert_eq!(looker.logouts().len(), 1);
    let pool = sqlx::PgPool::connect(&database_url).await.unwrap();
    eventually("its revoked row", Duration::from_secs(5), async || rows_for_handle(&pool, "revoked", "42").await.len() == 1).await;
}

fn cli(args: &[&str], token: &str) -> std::process::Output {
    Command::new(BIN).args(args).env("CREDBROKER_ID_TOKEN", token).env_remove("CREDBROKER_CONFIG").stdin(Stdio::null()).output().unwrap()
}

#[tokio::test]
async fn the_cli_revokes_freezes_and_unfreezes() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let admin = admin_token(&app);
    let body = issue(&app, "db-ci", json!({"job_id": "4242"})).await;
    let lease_id = body["credential"]["lease_id"].as_str().unwrap().to_owned();
    let url = app.url.clone();
    let run = move |args: Vec<String>, token: String| {
        tokio::task::spawn_blocking(move || cli(&args.iter().map(String::as_str).collect::<Vec<_>>(), &token))
    };
    let args = |list: &[&str]| list.iter().map(|a| a.to_string()).chain(["--url".to_owned(), url.clone()]).collect::<Vec<_>>();

    let dry = run(args(&["revoke", "--job", "4242", "--dry-run"]), admin.clone()).await.unwrap();
    assert!(dry.status.success(), "{}", String::from_utf8_lossy(&dry.stderr));
    let out = String::from_utf8_lossy(&dry.stdout);
    assert!(out.contains("would affect 1 live credential") && out.contains("would_revoke"), "{out}");
    assert!(!bao.revoked(&lease_id).await);

    let done = run(args(&["revoke", "--job", "4242"]), admin.clone()).await.unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    assert!(String::from_utf8_lossy(&done.stdout).contains("revoked"), "{}", String::from_utf8_lossy(&done.stdout));
    assert!(bao.revoked(&lease_id).await);

    // Two selectors, or none, are a usage error before anything is sent.
    let usage = run(args(&["revoke", "--job", "1", "--pipeline", "2"]), admin.clone()).await.unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let usage = run(args(&["revoke", "--role", "db-ci"]), admin.clone()).await.unwrap();
    assert_eq!(usage.status.code(), Some(2));

    // Not an admin: access_denied's exit status.
    let outsider = app.issuer.token();
    let refused = run(args(&["revoke", "--job", "4242"]), outsider).await.unwrap();
    assert_eq!(refused.status.code(), Some(13), "{}", String::from_utf8_lossy(&refused.stderr));

    let frozen = run(args(&["freeze", "--all", "--until", "1h"]), admin.clone()).await.unwrap();
    assert!(frozen.status.success(), "{}", String::from_utf8_lossy(&frozen.stderr));
    let (status, _, problem) = app.exchange(&app.issuer.token(), json!({"role": "orders-producer"})).await;
    assert_eq!(status, 403, "{problem}");
    assert!(problem["detail"].as_str().unwrap().contains("frozen: new credentials for all"), "{problem}");
    let lifted = run(args(&["unfreeze", "--all"]), admin).await.unwrap();
    assert!(lifted.status.success(), "{}", String::from_utf8_lossy(&lifted.stderr));
    issue(&app, "orders-producer", json!({})).await;
}

/// A test-only trigger on the audit table: `body` runs for each issued row before it is written.
async fn on_issued_row(pool: &sqlx::PgPool, body: &str) {
    sqlx::query(&format!(
        "create function test_on_issued() returns trigger language plpgsql as $$
         begin
             if new.decision = 'issued' then {body}; end if;
             return new;
         end $$"
    ))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("create trigger test_on_issued before insert on audit_events for each row execute function test_on_issued()")
        .execute(pool)
        .await
        .unwrap();
}

async fn eventually_revoked_row(pool: &sqlx::PgPool, lease_id: &str) -> Value {
    let started = Instant::now();
    loop {
        if let Some(row) = rows_for_handle(pool, "revoked", lease_id).await.pop() {
            return row;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no revoked row for {lease_id}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_credential_whose_issued_row_cannot_be_written_is_revoked_not_leaked() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    on_issued_row(&app.pool, "raise exception 'disk full (staged by the test)'").await;
    let (status, _, problem) = app.exchange(&app.issuer.token(), json!({"role": "db-ci"})).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["code"], "audit_unavailable");
    let lease_id = bao.minted_leases().pop().expect("a lease was minted");
    eventually("the undelivered lease revoked", Duration::from_secs(10), async || bao.revoked(&lease_id).await).await;
    let row = eventually_revoked_row(&app.pool, &lease_id).await;
    assert!(row["detail"].as_str().unwrap().contains("not_delivered"), "{row}");
}

#[tokio::test]
async fn a_request_cancelled_after_minting_has_its_credential_revoked() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn_configured("request_timeout_seconds = 1", None, None).await;
    // The issued row takes longer to write than the request may take: the request is dropped
    // while it waits, after the credential was minted.
    on_issued_row(&app.pool, "perform pg_sleep(2)").await;
    let (status, _, problem) = app.exchange(&app.issuer.token(), json!({"role": "db-ci"})).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["code"], "request_timeout");
    let lease_id = bao.minted_leases().pop().expect("a lease was minted");
    eventually("the cancelled request's lease revoked", Duration::from_secs(10), async || bao.revoked(&lease_id).await).await;
    let row = eventually_revoked_row(&app.pool, &lease_id).await;
    assert!(row["detail"].as_str().unwrap().contains("not_delivered"), "{row}");
}

// ---------------------------------------------------------------- credbroker exec

fn exec_command(app: &TestApp, token: &str, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("exec").args(["--url", &app.url]).args(args).env("CREDBROKER_ID_TOKEN", token).env_remove("CREDBROKER_CONFIG");
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
    command
}

async fn wait_output(command: Command) -> std::process::Output {
    let mut command = command;
    tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap()
}

#[tokio::test]
async fn exec_renews_before_expiry_revokes_on_exit_and_propagates_the_exit_code() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let out = common::temp_dir();
    let script = format!(
        "echo \"$PGUSER\" > {dir}/env-user; stat -c %a \"$CREDBROKER_CREDENTIALS_DIR/db-long.json\" > {dir}/mode; \
         sleep 4.5; cp \"$CREDBROKER_CREDENTIALS_DIR/db-long.json\" {dir}/latest.json; \
         echo \"$CREDBROKER_CREDENTIALS_DIR\" > {dir}/credentials-dir; exit 7",
        dir = out.0.display()
    );
    let output = wait_output(exec_command(
        &app,
        &app.issuer.token(),
        &["--role", "db-long", "--role", "orders-producer", "--ttl", "3s", "--", "sh", "-c", &script],
    ))
    .await;
    assert_eq!(output.status.code(), Some(7), "{}", String::from_utf8_lossy(&output.stderr));

    let leases = bao.minted_leases();
    assert!(leases.len() >= 2, "renewed at least once: {leases:?}");
    assert!(leases.iter().all(|lease| bao.revocations_of(lease) == 1), "every lease revoked when the command exited: {leases:?}");

    let issued: Vec<Value> =
        sqlx::query_scalar("select to_jsonb(a) from audit_events a where decision = 'issued' and role = 'db-long' order by occurred_at")
            .fetch_all(&app.pool)
            .await
            .unwrap();
    assert_eq!(issued.len(), leases.len());
    let first = issued[0]["id"].as_str().unwrap();
    for renewal in &issued[1..] {
        assert_eq!(renewal["renews_issuance_id"], first, "each renewal links to the first, in its typed column");
    }
    let latest: Value = serde_json::from_str(&std::fs::read_to_string(out.0.join("latest.json")).unwrap()).unwrap();
    assert_ne!(latest["issuance_id"], issued[0]["id"], "the file holds the renewed credential");
    assert_eq!(std::fs::read_to_string(out.0.join("mode")).unwrap().trim(), "600");
    assert!(!std::fs::read_to_string(out.0.join("env-user")).unwrap().trim().is_empty(), "credentials in the environment");
    let credentials_dir = std::fs::read_to_string(out.0.join("credentials-dir")).unwrap();
    assert!(!std::path::Path::new(credentials_dir.trim()).exists(), "the credential files are removed");
    let revoked: i64 = sqlx::query_scalar("select count(*) from audit_events where decision = 'revoked' and detail like '%exec_exit%'")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(revoked >= 1);
}

/// A revocation by the security team ends the chain: the job cannot renew its way back.
#[tokio::test]
async fn a_credential_revoked_on_demand_cannot_be_renewed() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let token = app.issuer.token();
    let (status, _, first) = app.exchange(&token, json!({"role": "db-long"})).await;
    assert_eq!(status, 200, "{first}");
    let first = first["issuance_id"].as_str().unwrap().to_owned();
    let (status, _, renewed) = app.exchange(&token, json!({"role": "db-long", "renews": first})).await;
    assert_eq!(status, 200, "the same job renews while nothing is revoked: {renewed}");
    let (status, body) = post(&app, "/v1/revocations", &admin_token(&app), json!({"job": "123456"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(live_leases(&bao).await.is_empty(), "every lease of the job revoked");

    let (status, _, problem) = app.exchange(&token, json!({"role": "db-long", "renews": first})).await;
    assert_eq!(status, 400, "{problem}");
    assert_eq!(problem["code"], "invalid_request");
    assert!(problem["detail"].as_str().unwrap().contains("revoked by the security team"), "{problem}");
    let row = app.audit_row(problem["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "denied");
}

#[tokio::test]
async fn exec_says_plainly_when_the_role_does_not_allow_renewal() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let output = wait_output(exec_command(&app, &app.issuer.token(), &["--role", "db-ci", "--ttl", "2s", "--", "sh", "-c", "sleep 2.5"])).await;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("cannot renew db-ci") && stderr.contains("max_uses_per_token"), "{stderr}");
    assert_eq!(bao.minted_leases().len(), 1);
}

#[tokio::test]
async fn exec_forwards_signals_and_exits_with_the_commands_status() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let mut command = exec_command(&app, &app.issuer.token(), &["--role", "db-ci", "--", "sh", "-c", "trap 'exit 42' TERM; sleep 30 & wait"]);
    let mut child = command.spawn().unwrap();
    eventually("the credential", Duration::from_secs(10), async || !bao.minted_leases().is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SAFETY: a signal to the child process this test started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap()).await.unwrap();
    assert_eq!(status.code(), Some(42));
    assert!(bao.minted_leases().iter().all(|lease| bao.revocations_of(lease) == 1), "revoked after the command ended");
}

/// A renewal revokes the credential it replaced while the command still runs (not at exit):
/// the command's environment keeps the first credential, the files hold the live one.
#[tokio::test]
async fn exec_revokes_a_superseded_credential_at_renewal_while_the_command_runs() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let out = common::temp_dir();
    let stop = out.0.join("stop");
    let script = format!(
        "echo \"$PGUSER\" > {dir}/env-user; while [ ! -e {stop} ]; do sleep 0.1; done; \
         cp \"$CREDBROKER_CREDENTIALS_DIR/db-long.json\" {dir}/latest.json; exit 3",
        dir = out.0.display(),
        stop = stop.display()
    );
    let mut child = exec_command(&app, &app.issuer.token(), &["--role", "db-long", "--ttl", "3s", "--", "sh", "-c", &script]).spawn().unwrap();

    let first_lease = async {
        eventually("the first credential", Duration::from_secs(10), async || bao.minted_leases().len() == 1).await;
        bao.minted_leases().remove(0)
    }
    .await;
    // Revoked by the broker (its lease may also run out: only the revoke call counts).
    eventually("the first lease revoked at renewal", Duration::from_secs(10), async || bao.revocations_of(&first_lease) == 1).await;
    assert!(child.try_wait().unwrap().is_none(), "revoked while the command still runs, not at its exit");
    let (renewed, revoked) = (bao.minted_leases().len(), bao.revocations().len());
    assert!(renewed >= 2 && revoked == renewed - 1, "one live credential after renewal: {renewed} leases, {revoked} revoked");
    // The row follows OpenBao's answer.
    let superseded = eventually_revoked_row(&app.pool, &first_lease).await;
    assert_eq!(rows_for_handle(&app.pool, "revoked", &first_lease).await.len(), 1);
    let detail = superseded["detail"].as_str().unwrap();
    assert!(detail.contains("superseded") && detail.contains("superseded by issuance"), "{detail}");

    std::fs::write(&stop, "").unwrap();
    let output = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap()).await.unwrap();
    assert_eq!(output.status.code(), Some(3), "{}", String::from_utf8_lossy(&output.stderr));
    let env_user = std::fs::read_to_string(out.0.join("env-user")).unwrap();
    let latest: Value = serde_json::from_str(&std::fs::read_to_string(out.0.join("latest.json")).unwrap()).unwrap();
    assert_ne!(latest["env"]["PGUSER"].as_str().unwrap(), env_user.trim(), "the file holds the renewed user, the environment the first");
    // Each lease revoked exactly once: superseded ones are not revoked again at exit.
    assert!(bao.minted_leases().iter().all(|lease| bao.revocations_of(lease) == 1), "{:?}", bao.revocations());
}

/// `DELETE /v1/credentials/{id}` refused: without a valid token (401) or with another job's
/// token (403), each with a `denied` row; a malformed body is a 400, also recorded.
#[tokio::test]
async fn refused_credential_releases_are_audited() {
    let LifecycleApp { app, bao, _secrets, .. } = spawn(None, None).await;
    let body = issue(&app, "db-ci", json!({})).await;
    let issuance_id = body["issuance_id"].as_str().unwrap();
    let delete = |token: String, body: &'static str| {
        let request = app.client.delete(format!("{}/v1/credentials/{issuance_id}", app.url)).bearer_auth(token).body(body);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.json::<Value>().await.unwrap())
        }
    };
    let denied_rows = || async {
        sqlx::query_scalar::<_, Value>("select to_jsonb(a) from audit_events a where decision = 'denied' and target = 'release' order by occurred_at")
            .fetch_all(&app.pool)
            .await
            .unwrap()
    };

    let (status, problem) = delete("not-a-jwt".into(), "").await;
    assert_eq!((status, problem["code"].as_str()), (401, Some("invalid_token")), "{problem}");
    let rows = denied_rows().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["code"], "invalid_token");
    assert!(rows[0]["detail"].as_str().unwrap().contains(issuance_id), "{}", rows[0]);

    let other_job = app.issuer.token_with(json!({"job_id": "999"}));
    let (status, problem) = delete(other_job, "").await;
    assert_eq!((status, problem["code"].as_str()), (403, Some("access_denied")), "{problem}");
    let rows = denied_rows().await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[1]["code"], "access_denied");
    assert_eq!(rows[1]["job_id"], "999");
    assert_eq!(rows[1]["id"], problem["issuance_id"], "the problem names the audit row");
    assert!(rows[1]["detail"].as_str().unwrap().contains(&format!("no credential {issuance_id} was issued for this job token")), "{}", rows[1]);

    let (status, problem) = delete(app.issuer.token(), "{\"superseded\": true}").await;
    assert_eq!((status, problem["code"].as_str()), (400, Some("invalid_request")), "{problem}");
    assert_eq!(denied_rows().await.len(), 3);
    assert!(bao.revocations().is_empty(), "nothing refused was revoked");
}

#[test]
fn exec_help_says_the_environment_keeps_the_first_credential() {
    let output = Command::new(BIN).args(["exec", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout).replace('\n', " ");
    assert!(output.status.success());
    for promise in ["ENVIRONMENT IS NOT UPDATED", "keeps the first credential", "must read the file", "revokes the credential it replaced"] {
        assert!(help.contains(promise), "`exec --help` lacks {promise:?}: {help}");
    }
}
