//! Vault end to end against a real OpenBao server (tests/common/openbao.rs; the open-source
//! Vault fork with the same HTTP API), configured as README's "Vault" section says, with the
//! shipped policy dev/vault/credbroker.hcl, and the broker talking to it through its production
//! `vaultrs` client. Database users come from OpenBao's postgresql-database-plugin on the test's
//! real Postgres, and the test logs in with them.
//!
//! Two cases OpenBao cannot serve stay on the Vault stand-in (tests/common/vault_standin.rs), at
//! the end of this file: Kubernetes auth (it needs a TokenReview API nothing here serves) and the
//! Snowflake database plugin's key-pair response shape (OpenBao ships no Snowflake plugin). The
//! Snowflake configuration README documents uses the identical code path as the Postgres one
//! here: `GET database/creds/ROLE`, then `sys/leases/renew` and `sys/leases/revoke`; only the
//! plugin name and its statements differ.

mod common;

use std::time::{Duration, Instant};

use common::eventually;
use common::openbao::{approle_table, database_for_minted_users, login_and_query, provision, recommended_approle, shipped_policy, OpenBao};
use common::vault_standin::{DbRole, VaultStandin, ROLE_ID, SECRET_ID};
use common::{TempDir, TestApp};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

const TRANSIT_KEY: &str = "credbroker-kafka";

const POLICIES: &str = r#"
[admins]
issuer = "gitlab"
[admins.claims]
project_path = "security/credbroker-admin"

[[role]]
name = "db-reader"
backend = "postgres"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
vault_role = "ci-reader"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "db-templated"
backend = "postgres"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
vault_role = "ci-{job_project_path}"
vault_role_template = "sanitise"
[role.claims]
job_project_path = "platform/*"

[[role]]
name = "db-outside-policy"
backend = "postgres"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
vault_role = "reporting"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "kafka-vault"
backend = "kafka-vault"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
principal = "ci:{job_project_path}"
scope = "orders.write"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "kafka-es"
backend = "kafka-es"
issuer = "gitlab"
default_ttl = "15m"
max_ttl = "1h"
principal = "ci:{job_project_path}"
scope = "orders.write"
[role.claims]
job_project_path = "platform/orders"
"#;

fn vault_tables(address: &str, auth: &str, namespace: Option<&str>) -> String {
    let namespace = namespace.map(|ns| format!("namespace = \"{ns}\"\n")).unwrap_or_default();
    format!(
        r#"
[vault]
address = "{address}"
{namespace}request_timeout_seconds = 5

{auth}

[backends.postgres]
type = "vault_database"
plugin = "postgres"

[backends.kafka-vault]
type = "kafka_oauthbearer"
audience = "kafka-test"
max_ttl = "1h"
signing = {{ vault_transit = "{TRANSIT_KEY}", refresh_seconds = 1 }}

[backends.kafka-es]
type = "kafka_oauthbearer"
audience = "kafka-test"
max_ttl = "1h"
signing = {{ vault_transit = "credbroker-kafka-es" }}
"#
    )
}

struct Bao {
    app: TestApp,
    bao: OpenBao,
    /// The broker's AppRole credentials.
    login: (String, String),
    _secrets: TempDir,
}

async fn spawn_with(approle: Value) -> Bao {
    let bao = OpenBao::start().await;
    let database_url = database_for_minted_users().await;
    let login = provision(&bao, &database_url, approle).await;
    let secrets = common::temp_dir();
    let tables = vault_tables(&bao.url, &approle_table(&secrets, &login.0, &login.1), None);
    let app = TestApp::spawn_full("revocation_poll_seconds = 1", &tables, POLICIES, Some(database_url)).await;
    Bao { app, bao, login, _secrets: secrets }
}

async fn spawn() -> Bao {
    spawn_with(recommended_approle()).await
}

async fn readyz(app: &TestApp) -> (u16, Value) {
    let response = app.client.get(format!("{}/readyz", app.url)).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

fn expires_at(body: &Value) -> OffsetDateTime {
    OffsetDateTime::parse(body["expires_at"].as_str().unwrap(), &Rfc3339).unwrap()
}

async fn assert_login_refused(database_url: &str, credential: &Value) {
    let error = login_and_query(database_url, credential).await.expect_err("the user should be gone").to_string();
    assert!(error.contains("password authentication failed") || error.contains("does not exist"), "{error}");
}

/// The role's `rolvaliduntil`, which the plugin sets to the lease's end at creation and renewal.
async fn valid_until(app: &TestApp, username: &str) -> Option<OffsetDateTime> {
    sqlx::query_scalar("select rolvaliduntil from pg_roles where rolname = $1").bind(username).fetch_one(&app.pool).await.unwrap()
}

async fn post(app: &TestApp, path: &str, token: &str, body: Value) -> (u16, Value) {
    let response = app.client.post(format!("{}{path}", app.url)).bearer_auth(token).json(&body).send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap_or(Value::Null))
}

fn admin_token(app: &TestApp) -> String {
    app.issuer.token_with(json!({"project_path": "security/credbroker-admin", "user_login": "sec-oncall"}))
}

async fn assert_backend_failed(app: &TestApp, role: &str, expected_detail: &str) -> Value {
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": role})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "backend_failed");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains(expected_detail), "{detail}");
    assert!(!looks_like_a_vault_token(detail), "never a Vault token in a detail: {detail}");
    assert!(body.get("credential").is_none());
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "failed");
    assert_eq!(row["code"], "backend_failed");
    assert!(row["detail"].as_str().unwrap().contains(expected_detail));
    body
}

/// OpenBao's service tokens are `s.` and 24 characters; Vault's are `hvs.` and longer.
fn looks_like_a_vault_token(text: &str) -> bool {
    text.split(|c: char| !c.is_ascii_alphanumeric() && c != '.').any(|word| (word.starts_with("s.") || word.starts_with("hvs.")) && word.len() >= 20)
}

/// The leases OpenBao holds under `prefix` (`LIST sys/leases/lookup/PREFIX`).
async fn leases_under(bao: &OpenBao, prefix: &str) -> Vec<String> {
    let (status, answer) = bao.try_call("LIST", &format!("sys/leases/lookup/{prefix}"), None).await;
    if status == 404 {
        return Vec::new();
    }
    assert_eq!(status, 200, "{answer}");
    answer["data"]["keys"].as_array().unwrap().iter().map(|k| format!("{prefix}{}", k.as_str().unwrap())).collect()
}

// ---------------------------------------------------------------- the database engine

#[tokio::test]
async fn a_postgres_user_minted_through_openbao_works_until_revoked_on_demand() {
    let Bao { app, bao, _secrets, .. } = spawn().await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["vault"], "ok");

    let (status, headers, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader", "ttl_seconds": 600})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let credential = &body["credential"];
    let lease_id = credential["lease_id"].as_str().unwrap().to_owned();
    assert!(lease_id.starts_with("database/creds/ci-reader/"), "{lease_id}");
    assert_eq!(login_and_query(&app.database_url, credential).await.unwrap(), 3, "the minted user logs in and reads");
    assert_eq!(body["target"], "postgres");
    assert_eq!(body["env"]["PGUSER"], credential["username"], "libpq's variables, for plugin = \"postgres\"");
    assert_eq!(body["env"]["PGPASSWORD"], credential["password"]);
    let mut wrong = credential.clone();
    wrong["password"] = json!("not-the-password");
    assert_login_refused(&app.database_url, &wrong).await;

    // OpenBao granted its default 1 h; the broker shortened the lease to the 600 s it granted.
    let lease_ttl = bao.lease_ttl(&lease_id).await.expect("the lease is alive");
    assert!((590..=600).contains(&lease_ttl), "OpenBao's lease ends in {lease_ttl} s");
    assert_eq!(body["ttl_seconds"], 600);
    // The plugin's renewal statement moved the role's own expiry to the shortened lease's end.
    let valid_until = valid_until(&app, credential["username"].as_str().unwrap()).await.expect("VALID UNTIL is set");
    assert!((valid_until - expires_at(&body)).whole_seconds().abs() <= 5, "{valid_until} vs {}", body["expires_at"]);

    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "issued");
    assert_eq!(row["credential_handle"], lease_id.as_str());
    let password = credential["password"].as_str().unwrap();
    assert_eq!(row["credential_sha256"], credbroker::types::sha256_hex(password.as_bytes()));
    assert!(!row.to_string().contains(password), "no password in the audit row");

    let (status, report) = post(&app, "/v1/revocations", &admin_token(&app), json!({"issuance": body["issuance_id"]})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["credentials"][0]["outcome"], "revoked", "{report}");
    assert_eq!(bao.lease_ttl(&lease_id).await, None, "the lease is gone from OpenBao");
    assert_login_refused(&app.database_url, credential).await;
}

#[tokio::test]
async fn the_lease_ends_at_the_jobs_deadline_and_the_user_with_it() {
    let Bao { app, bao, _secrets, .. } = spawn().await;
    let deadline = OffsetDateTime::now_utc().unix_timestamp() + 5;
    let (status, _, body) = app.exchange(&app.issuer.token_with(json!({"exp": deadline})), json!({"role": "db-reader"})).await;
    assert_eq!(status, 200, "{body}");
    let credential = body["credential"].clone();
    let lease_ttl = bao.lease_ttl(credential["lease_id"].as_str().unwrap()).await.unwrap();
    assert!(lease_ttl <= 5, "bounded by the job: {lease_ttl}");
    assert_eq!(login_and_query(&app.database_url, &credential).await.unwrap(), 3);
    // OpenBao itself drops the user when the lease expires; nothing depends on the broker.
    let database_url = app.database_url.clone();
    eventually("the user dropped at the deadline", Duration::from_secs(20), async || login_and_query(&database_url, &credential).await.is_err())
        .await;
    // OpenBao counts whole seconds, so the lease may end up to a second or two before the
    // reported expiry; never after it.
    assert!(OffsetDateTime::now_utc() >= expires_at(&body) - time::Duration::seconds(2), "not long before the deadline");
    assert_login_refused(&app.database_url, &credential).await;
}

#[tokio::test]
async fn a_lease_openbao_caps_below_the_request_is_reported_as_openbao_set_it() {
    let Bao { app, bao, _secrets, .. } = spawn().await;
    bao.write("database/roles/ci-reader", json!({ "default_ttl": "300s", "max_ttl": "300s" })).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader", "ttl_seconds": 900})).await;
    assert_eq!(status, 200, "{body}");
    let ttl = body["ttl_seconds"].as_i64().unwrap();
    assert!((295..=300).contains(&ttl), "OpenBao's 300 s, not the requested 900: {ttl}");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["granted_ttl_seconds"], ttl);
    let from_now = (expires_at(&body) - OffsetDateTime::now_utc()).whole_seconds();
    assert!((290..=300).contains(&from_now), "{from_now}");
}

#[tokio::test]
async fn a_templated_vault_role_is_rendered_and_sanitised() {
    let Bao { app, bao: _running, _secrets, .. } = spawn().await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-templated"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["credential"]["lease_id"].as_str().unwrap().starts_with("database/creds/ci-platform-orders/"), "{body}");
    assert_eq!(login_and_query(&app.database_url, &body["credential"]).await.unwrap(), 3);
}

/// The credential is minted, then its `issued` row cannot be written: it never leaves the
/// broker, and the revocation schedule drops the user in OpenBao.
#[tokio::test]
async fn a_credential_that_is_not_delivered_is_revoked_in_openbao() {
    let Bao { app, bao, _secrets, .. } = spawn().await;
    sqlx::query(
        "create function refuse_issued() returns trigger language plpgsql as $$ begin
             if new.decision = 'issued' then raise exception 'disk full (staged by the test)'; end if; return new; end $$",
    )
    .execute(&app.pool)
    .await
    .unwrap();
    sqlx::query("create trigger refuse_issued before insert on audit_events for each row execute function refuse_issued()")
        .execute(&app.pool)
        .await
        .unwrap();
    let (status, _, problem) = app.exchange(&app.issuer.token(), json!({"role": "db-reader"})).await;
    assert_eq!(status, 503, "{problem}");
    assert_eq!(problem["code"], "audit_unavailable");
    // The revocation is recorded as its own row, naming the lease and why.
    let pool = app.pool.clone();
    let mut revoked: Option<Value> = None;
    eventually("the undelivered credential's revoked row", Duration::from_secs(15), async || {
        revoked = sqlx::query_scalar("select to_jsonb(a) from audit_events a where decision = 'revoked'").fetch_optional(&pool).await.unwrap();
        revoked.is_some()
    })
    .await;
    let revoked = revoked.unwrap();
    assert!(revoked["detail"].as_str().unwrap().contains("not_delivered"), "{revoked}");
    let lease_id = revoked["credential_handle"].as_str().unwrap();
    assert!(lease_id.starts_with("database/creds/ci-reader/"), "{revoked}");
    assert_eq!(bao.lease_ttl(lease_id).await, None, "gone from OpenBao");
    assert!(leases_under(&bao, "database/creds/ci-reader/").await.is_empty());
}

/// Without `update` on sys/leases/renew (the shipped policy minus that line, and no `default`
/// policy to grant it), a lease cannot be shortened: it is revoked and nothing is handed out.
#[tokio::test]
async fn a_lease_that_cannot_be_shortened_is_revoked_and_never_handed_out() {
    let bao = OpenBao::start().await;
    let database_url = database_for_minted_users().await;
    provision(&bao, &database_url, recommended_approle()).await;
    let shipped = shipped_policy();
    let without_renew: String = shipped.lines().filter(|line| !line.contains("sys/leases/renew")).collect::<Vec<_>>().join("\n");
    bao.policy("credbroker-no-renew", &without_renew).await;
    let (role_id, secret_id) = bao.approle("no-renew", json!({ "token_policies": "credbroker-no-renew", "token_no_default_policy": true })).await;
    let secrets = common::temp_dir();
    let tables = vault_tables(&bao.url, &approle_table(&secrets, &role_id, &secret_id), None);
    let app = TestApp::spawn_full("", &tables, POLICIES, Some(database_url)).await;
    assert_backend_failed(&app, "db-reader", "Vault would not shorten the 3600 s lease from database/creds/ci-reader").await;
    assert!(leases_under(&bao, "database/creds/ci-reader/").await.is_empty(), "the lease was revoked");
}

/// README's "Vault-side setup" as the operator runs it: dev/vault/setup.sh, the same `bao`
/// commands, against a fresh OpenBao; the broker then logs in with the AppRole files it wrote
/// and mints a Postgres user that can log in.
#[tokio::test]
async fn the_readme_setup_commands_configure_openbao_for_the_broker() {
    let bao = OpenBao::start().await;
    let database_url = database_for_minted_users().await;
    let out = common::temp_dir();
    let (host_port_database, script) = (database_url.trim_start_matches("postgres://postgres@").to_owned(), common::repo_path("dev/vault/setup.sh"));
    let credentials = out.0.join("openbao");
    let (bao_url, written) = (bao.url.clone(), credentials.clone());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("sh")
            .arg(script)
            .arg(&written)
            .env("BAO_ADDR", bao_url)
            .env("BAO_TOKEN", common::openbao::ROOT_TOKEN)
            .env("CREDBROKER_VAULT_PG", host_port_database)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(credentials.join("secret-id")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the secret_id file is private");
    let auth = format!(
        "[vault.approle]\nrole_id_file = \"{}\"\nsecret_id_file = \"{}\"\n",
        credentials.join("role-id").display(),
        credentials.join("secret-id").display()
    );
    let app = TestApp::spawn_full("", &vault_tables(&bao.url, &auth, None), POLICIES, Some(database_url)).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(login_and_query(&app.database_url, &body["credential"]).await.unwrap(), 3);
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "kafka-vault"})).await;
    assert_eq!(status, 200, "transit signing as set up: {body}");
}

// ---------------------------------------------------------------- the broker's own token

/// Vault revokes every lease a token created when the token dies. With a 12 s token TTL and a
/// 30 s max TTL, a grant of 599 s cannot be kept: the credential ends with the token, and says
/// so. Later, when the token is too old for a grant a fresh token could keep, the broker logs
/// in again first.
#[tokio::test]
async fn no_credential_outlives_the_vault_token_that_minted_it() {
    let Bao { app, bao, _secrets, .. } =
        spawn_with(json!({ "token_policies": "credbroker", "token_no_default_policy": true, "token_ttl": "12s", "token_max_ttl": "30s" })).await;
    let logged_in = OffsetDateTime::now_utc();
    let (status, _, first) = app.exchange(&app.issuer.token(), json!({"role": "db-reader", "ttl_seconds": 599})).await;
    assert_eq!(status, 200, "{first}");
    let first_end = expires_at(&first);
    assert!(first_end <= logged_in + time::Duration::seconds(31), "capped at the token's max TTL: {first_end}");
    assert!(first["ttl_seconds"].as_i64().unwrap() <= 30, "{first}");
    let row = app.audit_row(first["issuance_id"].as_str().unwrap()).await;
    let recorded_end = OffsetDateTime::parse(row["expires_at"].as_str().unwrap(), &Rfc3339).unwrap();
    assert!((recorded_end - first_end).abs() < time::Duration::milliseconds(1), "the row says when it really ends: {recorded_end}");
    let lease_ttl = bao.lease_ttl(first["credential"]["lease_id"].as_str().unwrap()).await.unwrap();
    assert!(lease_ttl <= 30, "the lease itself was shortened to the token's end: {lease_ttl}");

    // Half the token's life later, a 20 s grant would outlive it: a fresh login keeps it whole.
    tokio::time::sleep(Duration::from_secs(16)).await;
    let (status, _, second) = app.exchange(&app.issuer.token(), json!({"role": "db-reader", "ttl_seconds": 20})).await;
    assert_eq!(status, 200, "{second}");
    assert!(second["ttl_seconds"].as_i64().unwrap() >= 19, "the full grant, from a new token: {second}");

    // The first token dies at its max TTL, and the first user with it; the second lives on.
    let (database_url, first_credential) = (app.database_url.clone(), first["credential"].clone());
    eventually("the first user dropped with its token", Duration::from_secs(25), async || {
        login_and_query(&database_url, &first_credential).await.is_err()
    })
    .await;
    assert!(OffsetDateTime::now_utc() >= first_end - time::Duration::seconds(2), "not before its reported end");
    assert_eq!(login_and_query(&app.database_url, &second["credential"]).await.unwrap(), 3, "the second user outlives the first token");
}

/// The broker's tokens: OpenBao's accessors for logins to the `credbroker` AppRole or JWT role.
async fn broker_accessors(bao: &OpenBao) -> Vec<String> {
    let listed = bao.call("LIST", "auth/token/accessors", None).await;
    let mut accessors = Vec::new();
    for accessor in listed["data"]["keys"].as_array().unwrap() {
        let (status, token) = bao.try_call("POST", "auth/token/lookup-accessor", Some(json!({ "accessor": accessor }))).await;
        let meta = &token["data"]["meta"];
        if status == 200 && (meta["role_name"] == "credbroker" || meta["role"] == "credbroker") {
            accessors.push(accessor.as_str().unwrap().to_owned());
        }
    }
    accessors
}

async fn revoke_broker_tokens(bao: &OpenBao) {
    for accessor in broker_accessors(bao).await {
        bao.write("auth/token/revoke-accessor", json!({ "accessor": accessor })).await;
    }
}

#[tokio::test]
async fn approle_login_renews_the_token_and_logs_in_again_when_it_dies() {
    let Bao { app, bao, _secrets, .. } =
        spawn_with(json!({ "token_policies": "credbroker", "token_no_default_policy": true, "token_ttl": "3s", "token_max_ttl": "1h" })).await;
    let accessors = broker_accessors(&bao).await;
    assert_eq!(accessors.len(), 1, "logged in once at startup");

    // Renewed (renew-self) at two thirds of the 3 s TTL: the same token is still alive later.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(broker_accessors(&bao).await, accessors, "renewed, not replaced");
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "kafka-vault"})).await;
    assert_eq!(status, 200, "{body}");

    // The token is revoked: the next renewal fails and the broker logs in again by itself.
    revoke_broker_tokens(&bao).await;
    eventually("a fresh login", Duration::from_secs(10), async || !broker_accessors(&bao).await.is_empty()).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader"})).await;
    assert_eq!(status, 200, "{body}");

    // A token revoked between renewals is noticed by the request itself: one login, one retry.
    revoke_broker_tokens(&bao).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(login_and_query(&app.database_url, &body["credential"]).await.unwrap(), 3);
}

#[tokio::test]
async fn wrong_approle_credentials_leave_the_broker_unauthenticated() {
    let bao = OpenBao::start().await;
    let database_url = database_for_minted_users().await;
    let (role_id, _) = provision(&bao, &database_url, recommended_approle()).await;
    let secrets = common::temp_dir();
    let tables = vault_tables(&bao.url, &approle_table(&secrets, &role_id, "not-the-secret-id"), None);
    let app = TestApp::spawn_full("", &tables, POLICIES, Some(database_url)).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    let check = body["checks"]["vault"].as_str().unwrap();
    assert!(check.starts_with("unauthenticated") && check.contains("invalid role or secret ID"), "{check}");
    assert!(!check.contains("not-the-secret-id"), "the secret id never appears: {check}");
    assert_backend_failed(&app, "db-reader", "approle").await;
}

/// `[vault.jwt]`: the broker logs in with a JWT from a file (a workload-identity token), which
/// OpenBao's jwt auth checks against a public key; the file is read again at every login.
#[tokio::test]
async fn jwt_auth_logs_in_with_the_token_file_and_reads_it_again_at_each_login() {
    let bao = OpenBao::start().await;
    let database_url = database_for_minted_users().await;
    provision(&bao, &database_url, recommended_approle()).await;
    let key = credbroker::signing::SigningKey::from_pem(common::rsa_pem(0).as_bytes()).unwrap();
    bao.enable_auth("jwt", "jwt").await;
    bao.write("auth/jwt/config", json!({ "jwt_validation_pubkeys": [public_pem(common::rsa_pem(0))], "bound_issuer": "https://ci.example" })).await;
    let bind_subject = async |subject: &str| {
        bao.write(
            "auth/jwt/role/credbroker",
            json!({ "role_type": "jwt", "user_claim": "sub", "bound_subject": subject, "bound_audiences": ["openbao"],
                    "token_policies": "credbroker", "token_no_default_policy": true, "token_ttl": "1h" }),
        )
        .await;
    };
    let login_jwt = |subject: &str| {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = json!({ "iss": "https://ci.example", "sub": subject, "aud": "openbao", "iat": now, "nbf": now, "exp": now + 3600 });
        key.sign(&claims).unwrap()
    };
    bind_subject("credbroker-blue").await;
    let secrets = common::temp_dir();
    let token_file = secrets.0.join("vault-login.jwt");
    std::fs::write(&token_file, login_jwt("credbroker-blue")).unwrap();
    let auth = format!("[vault.jwt]\nrole = \"credbroker\"\ntoken_file = \"{}\"\n", token_file.display());
    let app = TestApp::spawn_full("", &vault_tables(&bao.url, &auth, None), POLICIES, Some(database_url)).await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader"})).await;
    assert_eq!(status, 200, "{body}");

    // The identity on disk is replaced and only the new one is accepted; the Vault token dies.
    bind_subject("credbroker-green").await;
    std::fs::write(&token_file, login_jwt("credbroker-green")).unwrap();
    revoke_broker_tokens(&bao).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader"})).await;
    assert_eq!(status, 200, "logged in again with the file's new content: {body}");

    // A token OpenBao rejects: the broker fails with OpenBao's own message, never the token.
    std::fs::write(&token_file, login_jwt("someone-else")).unwrap();
    revoke_broker_tokens(&bao).await;
    let body = assert_backend_failed(&app, "db-reader", "Vault login (jwt) failed").await;
    assert!(!body.to_string().contains("eyJ"), "no JWT in the answer: {body}");
}

fn public_pem(private_pem: &str) -> String {
    use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(private_pem).unwrap();
    key.to_public_key().to_public_key_pem(LineEnding::LF).unwrap()
}

/// `[vault] namespace`: logins and mints happen inside the namespace, while `/readyz`'s
/// `sys/health` goes to the root namespace (the only one that answers it).
#[tokio::test]
async fn a_broker_in_a_namespace_becomes_ready_and_mints_there() {
    let bao = OpenBao::start().await;
    bao.write("sys/namespaces/platform", json!({})).await;
    let database_url = common::fresh_database().await;
    let in_namespace = |method: &'static str, path: String, body: Option<Value>| {
        let bao = &bao;
        async move {
            let (status, answer) = bao.call_as(common::openbao::ROOT_TOKEN, Some("platform"), method, &path, body).await;
            assert!((200..300).contains(&status), "{path}: {status} {answer}");
            answer
        }
    };
    in_namespace("POST", "sys/auth/approle".into(), Some(json!({ "type": "approle" }))).await;
    in_namespace("POST", "sys/mounts/transit".into(), Some(json!({ "type": "transit" }))).await;
    in_namespace("POST", format!("transit/keys/{TRANSIT_KEY}"), Some(json!({ "type": "rsa-2048" }))).await;
    let policy = shipped_policy();
    in_namespace("POST", "sys/policies/acl/credbroker".into(), Some(json!({ "policy": policy }))).await;
    in_namespace("POST", "auth/approle/role/credbroker".into(), Some(recommended_approle())).await;
    let role_id = in_namespace("GET", "auth/approle/role/credbroker/role-id".into(), None).await["data"]["role_id"].as_str().unwrap().to_owned();
    let secret_id = in_namespace("POST", "auth/approle/role/credbroker/secret-id".into(), Some(json!({}))).await["data"]["secret_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let secrets = common::temp_dir();
    let tables = vault_tables(&bao.url, &approle_table(&secrets, &role_id, &secret_id), Some("platform"));
    let app = TestApp::spawn_full("", &tables, POLICIES, Some(database_url)).await;

    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["checks"]["vault"], "ok");
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "kafka-vault"})).await;
    assert_eq!(status, 200, "signed by the namespace's transit key: {body}");
}

// ---------------------------------------------------------------- failures

#[tokio::test]
async fn a_path_the_brokers_policy_lacks_is_a_502_naming_the_path() {
    let Bao { app, bao, _secrets, .. } = spawn().await;
    assert_backend_failed(&app, "db-outside-policy", "GET database/creds/reporting: 1 error occurred").await;
    let body = assert_backend_failed(&app, "db-outside-policy", "permission denied").await;
    assert!(body["detail"].as_str().unwrap().contains("database/creds/reporting"), "{body}");
    assert!(leases_under(&bao, "database/creds/reporting/").await.is_empty());
}

#[tokio::test]
async fn a_sealed_openbao_is_a_502_and_the_broker_recovers_when_it_is_unsealed() {
    let Bao { app, bao, _secrets, .. } = spawn().await;
    bao.seal().await;
    assert_backend_failed(&app, "db-reader", "Vault is sealed").await;
    assert_backend_failed(&app, "kafka-vault", "Vault is sealed").await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["checks"]["vault"].as_str().unwrap().contains("503"), "{body}");

    bao.unseal().await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader"})).await;
    assert_eq!(status, 200, "unsealed again, no broker restart: {body}");
    assert_eq!(login_and_query(&app.database_url, &body["credential"]).await.unwrap(), 3);
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn a_stopped_openbao_is_a_502_and_the_broker_recovers_when_it_is_back() {
    let Bao { app, mut bao, login, _secrets } = spawn().await;
    bao.stop();
    assert_backend_failed(&app, "db-reader", "unreachable").await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["checks"]["vault"].as_str().unwrap().starts_with("unreachable"), "{body}");

    // An in-memory server comes back empty: the operator sets it up again, with the broker's
    // same AppRole credentials, and the broker logs in again by itself.
    bao.restart().await;
    provision(&bao, &app.database_url, recommended_approle()).await;
    bao.write("auth/approle/role/credbroker/role-id", json!({ "role_id": login.0 })).await;
    bao.write("auth/approle/role/credbroker/custom-secret-id", json!({ "secret_id": login.1 })).await;
    eventually("the broker ready again", Duration::from_secs(40), async || readyz(&app).await.0 == 200).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader"})).await;
    assert_eq!(status, 200, "{body}");
}

/// The real binary, logging at debug level: through a mint, a seal and a stop of OpenBao, its
/// log never shows the AppRole secret_id, a minted password, or a Vault token.
#[tokio::test]
async fn no_secret_reaches_the_log_through_failures_and_recovery() {
    let mut bao = OpenBao::start().await;
    let database_url = database_for_minted_users().await;
    let login = provision(&bao, &database_url, recommended_approle()).await;
    let issuer = common::TestIssuer::start().await;
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("kafka.pem"), common::rsa_pem(2)).unwrap();
    std::fs::write(dir.0.join("policies/test.toml"), POLICIES).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let url = format!("http://127.0.0.1:{port}");
    let tables = vault_tables(&bao.url, &approle_table(&dir, &login.0, &login.1), None);
    let config = dir.0.join("credbroker.toml");
    std::fs::write(&config, common::config_text_with_tables(&issuer.url, &database_url, &url, "log_format = \"json\"", &tables)).unwrap();
    let log = dir.0.join("broker.log");
    std::env::set_var("CREDBROKER_LOG", "debug");
    let _broker = common::start_binary(&config, port, &log).await;
    let client = reqwest::Client::new();
    let exchange = async |role: &str| {
        let response = client.post(format!("{url}/v1/credentials")).bearer_auth(issuer.token()).json(&json!({ "role": role })).send().await.unwrap();
        (response.status().as_u16(), response.json::<Value>().await.unwrap())
    };
    let (status, minted) = exchange("db-reader").await;
    assert_eq!(status, 200, "{minted}");
    bao.seal().await;
    let (status, sealed) = exchange("db-reader").await;
    assert_eq!((status, sealed["code"].as_str()), (502, Some("backend_failed")), "{sealed}");
    bao.unseal().await;
    assert_eq!(exchange("kafka-vault").await.0, 200, "recovered without a restart");
    bao.stop();
    assert_eq!(exchange("db-reader").await.0, 502);

    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("backend_failed") || text.contains("sealed"), "the failures are logged: {text}");
    let password = minted["credential"]["password"].as_str().unwrap();
    for (what, secret) in [("the secret_id", login.1.as_str()), ("the minted password", password)] {
        assert!(!text.contains(secret), "{what} is in the log");
    }
    assert!(!looks_like_a_vault_token(&text), "a Vault token is in the log");
}

#[tokio::test]
async fn an_unreachable_vault_is_a_502_with_a_failed_row_and_no_credential() {
    // A port that was just free: nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let secrets = common::temp_dir();
    let tables = vault_tables(&format!("http://{closed}"), &approle_table(&secrets, "role", "secret"), None);
    let app = TestApp::spawn_full("", &tables, POLICIES, None).await;
    assert_backend_failed(&app, "db-reader", "unreachable").await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    assert!(body["checks"]["vault"].as_str().unwrap().starts_with("unreachable"), "{body}");
}

// ---------------------------------------------------------------- transit signing

async fn validate(app: &TestApp, token: String) -> Value {
    let (jwks_url, issuer) = (format!("{}/.well-known/jwks.json", app.url), app.public_url.clone());
    let output = tokio::task::spawn_blocking(move || common::kip768_validate(&jwks_url, "kafka-test", &issuer, &token)).await.unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap()
}

async fn published_kids(app: &TestApp) -> Vec<String> {
    let jwks: Value = reqwest::get(format!("{}/.well-known/jwks.json", app.url)).await.unwrap().json().await.unwrap();
    jwks["keys"].as_array().unwrap().iter().filter_map(|k| k["kid"].as_str().map(str::to_owned)).collect()
}

#[tokio::test]
async fn kafka_tokens_signed_by_openbao_transit_verify_across_a_key_rotation() {
    let Bao { app, bao, _secrets, .. } = spawn().await;
    let (status, _, first) = app.exchange(&app.issuer.token(), json!({"role": "kafka-vault"})).await;
    assert_eq!(status, 200, "{first}");
    let first_token = first["credential"]["token"].as_str().unwrap().to_owned();
    let first_kid = first["credential"]["key_id"].as_str().unwrap().to_owned();
    assert_eq!(jsonwebtoken::decode_header(&first_token).unwrap().alg, jsonwebtoken::Algorithm::RS256);

    // Rotate in OpenBao; the broker picks up version 2 within refresh_seconds.
    bao.write(&format!("transit/keys/{TRANSIT_KEY}/rotate"), json!({})).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let second = loop {
        let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "kafka-vault"})).await;
        assert_eq!(status, 200, "{body}");
        if body["credential"]["key_id"] != first_kid.as_str() {
            break body;
        }
        assert!(Instant::now() < deadline, "the rotated key was never used");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let kids = published_kids(&app).await;
    assert!(kids.contains(&first_kid), "the old version stays published while its tokens live: {kids:?}");
    assert!(kids.iter().any(|kid| second["credential"]["key_id"] == kid.as_str()));
    let expected = json!({"principal": "ci:platform/orders", "scope": ["orders.write"]});
    assert_eq!(validate(&app, first_token).await, expected, "signed before the rotation, still valid");
    assert_eq!(validate(&app, second["credential"]["token"].as_str().unwrap().to_owned()).await, expected);
}

/// An `ecdsa-p256` transit key signs ES256 tokens (the broker asks for `marshaling_algorithm =
/// jws`), which an independent verifier accepts against the broker's JWKS.
#[tokio::test]
async fn kafka_tokens_signed_by_an_ecdsa_transit_key_verify_as_es256() {
    let Bao { app, bao, _secrets, .. } = spawn().await;
    // The shipped policy names one signing key; a second one needs its own lines.
    let shipped = shipped_policy();
    let second_key = "path \"transit/sign/credbroker-kafka-es\" { capabilities = [\"update\"] }\n\
                      path \"transit/keys/credbroker-kafka-es\" { capabilities = [\"read\"] }\n";
    bao.policy("credbroker", &format!("{shipped}{second_key}")).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "kafka-es"})).await;
    assert_eq!(status, 200, "{body}");
    let token = body["credential"]["token"].as_str().unwrap().to_owned();
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let jwks: Value = reqwest::get(format!("{}/.well-known/jwks.json", app.url)).await.unwrap().json().await.unwrap();
    let published = jwks["keys"].as_array().unwrap().iter().find(|k| k["kid"] == header.kid.clone().unwrap().as_str()).cloned();
    assert_eq!(published.as_ref().map(|k| (k["kty"].clone(), k["crv"].clone())), Some((json!("EC"), json!("P-256"))), "{jwks}");
    assert_eq!(validate(&app, token).await, json!({"principal": "ci:platform/orders", "scope": ["orders.write"]}));
}

// ---------------------------------------------------------------- KV secret sources

/// Secret sources read through the broker's own AppRole login and the shipped policy, so the
/// README's paths (`credbroker/...` on `secret/`, KV v2, and `kv/`, KV v1) are the ones it may read.
#[tokio::test]
async fn secret_sources_read_kv_v2_and_v1_with_caching_and_rotation() {
    use credbroker::vault::secret_source::{self, KvVersion, SecretSource, VaultKvSecret};
    use secrecy::ExposeSecret;
    let bao = OpenBao::start().await;
    let database_url = database_for_minted_users().await;
    let (role_id, secret_id) = provision(&bao, &database_url, recommended_approle()).await;
    let put_v2 = async |data: Value| {
        bao.write("secret/data/credbroker/looker/admin", json!({ "data": data })).await;
    };
    put_v2(json!({"client_id": "looker-admin", "client_secret": "first-secret"})).await;
    bao.write("kv/credbroker/snowflake/ci_loader", json!({"private_key": "v1-secret"})).await;
    bao.write("secret/data/elsewhere/admin", json!({ "data": {"client_secret": "out-of-policy"} })).await;
    let table: toml::Table =
        format!("address = \"{}\"\n[approle]\nrole_id = \"{role_id}\"\nsecret_id_env = \"CREDBROKER_TEST_VAULT_SECRET_ID\"\n", bao.url)
            .parse()
            .unwrap();
    // Set once, before any thread reads the environment; nextest runs each test in its own process.
    std::env::set_var("CREDBROKER_TEST_VAULT_SECRET_ID", &secret_id);
    let config = credbroker::vault::VaultConfig::parse(&table, "test.toml", std::path::Path::new("/"), false).unwrap();
    let vault = credbroker::vault::Vault::new(config).unwrap();
    let v2 = |path: &str, key: &str, cache: Duration| VaultKvSecret::new(vault.clone(), KvVersion::V2, "secret", path, key, cache);

    let cached = v2("credbroker/looker/admin", "client_secret", Duration::from_secs(60));
    assert_eq!(cached.read().await.unwrap().expose_secret(), "first-secret");
    assert_eq!(cached.cached_version(), Some(1));
    put_v2(json!({"client_id": "looker-admin", "client_secret": "rotated-secret"})).await;
    assert_eq!(cached.read().await.unwrap().expose_secret(), "first-secret", "served from the cache");
    cached.invalidate();
    assert_eq!(cached.read().await.unwrap().expose_secret(), "rotated-secret", "re-read after rotation");
    assert_eq!(cached.cached_version(), Some(2));

    let missing = v2("credbroker/looker/admin", "nope", Duration::ZERO);
    let error = missing.read().await.unwrap_err().to_string();
    assert!(error.contains("vault kv secret/credbroker/looker/admin#nope") && !error.contains("rotated-secret"), "{error}");
    assert!(v2("credbroker/looker/gone", "x", Duration::ZERO).read().await.unwrap_err().to_string().contains("404"));
    let refused = v2("elsewhere/admin", "client_secret", Duration::ZERO).read().await.unwrap_err().to_string();
    assert!(refused.contains("403") && refused.contains("secret/data/elsewhere/admin"), "outside the shipped policy: {refused}");

    // The same sources parsed from a backend table, KV v1 included.
    let dir = common::temp_dir();
    let parse = |text: &str| {
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("s = {text}")).unwrap()["s"].clone();
        secret_source::parse(&value, "test.toml", "backends.snowflake.private_key", &dir.0, Some(&vault))
    };
    let kv1 = parse("{ vault_kv = \"credbroker/snowflake/ci_loader\", key = \"private_key\", mount = \"kv\", kv_version = 1 }").unwrap();
    assert_eq!(kv1.read().await.unwrap().expose_secret(), "v1-secret");
    let kv2 = parse("{ vault_kv = \"credbroker/looker/admin\", key = \"client_secret\", cache_seconds = 0 }").unwrap();
    assert_eq!(kv2.read().await.unwrap().expose_secret(), "rotated-secret");
    for (bad, key) in [
        ("\"inline\"", "backends.snowflake.private_key"),
        ("{ vault_kv = \"credbroker/x\" }", "private_key.key"),
        ("{ file = \"a\", env = \"B\" }", "private_key.env"),
        ("{ vault_kv = \"p\", key = \"k\", cache_seconds = -1 }", "private_key.cache_seconds"),
        ("{ vault_kv = \"p\", key = \"k\", kv_version = 3 }", "private_key.kv_version"),
    ] {
        let error = parse(bad).err().unwrap().to_string();
        assert!(error.contains(&format!("{key}`")), "{bad}: {error}");
    }
}

#[tokio::test]
async fn file_and_environment_secret_sources() {
    use credbroker::vault::secret_source;
    use secrecy::ExposeSecret;
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("key.pem"), "file-secret\n").unwrap();
    std::env::set_var("CREDBROKER_TEST_SECRET", "env-secret");
    let parse = |text: &str| {
        let value: toml::Value = toml::from_str::<toml::Table>(&format!("s = {text}")).unwrap()["s"].clone();
        secret_source::parse(&value, "test.toml", "backends.looker.admin_client_secret", &dir.0, None)
    };
    assert_eq!(parse("{ file = \"key.pem\" }").unwrap().read().await.unwrap().expose_secret(), "file-secret");
    assert_eq!(parse("{ env = \"CREDBROKER_TEST_SECRET\" }").unwrap().read().await.unwrap().expose_secret(), "env-secret");
    let error = parse("{ vault_kv = \"credbroker/x\", key = \"k\" }").err().unwrap().to_string();
    assert!(error.contains("needs a [vault] section"), "{error}");
}

// ---------------------------------------------------------------- README and load-time checks

/// README's policy block is the file the tests, dev.sh and docker compose load into OpenBao.
#[test]
fn readme_shows_the_shipped_vault_policy() {
    let readme = std::fs::read_to_string(common::repo_path("README.md")).unwrap();
    let shipped = shipped_policy();
    let block = readme.split("```hcl\n").nth(1).and_then(|rest| rest.split("```").next()).expect("README has an hcl block");
    assert_eq!(block, shipped, "README's credbroker.hcl differs from dev/vault/credbroker.hcl");
    for statement in ["dev/vault/postgres-create-user.sql", "dev/vault/postgres-drop-user.sql"] {
        let sql = std::fs::read_to_string(common::repo_path(statement)).unwrap();
        assert!(readme.contains(sql.trim()), "README shows {statement}");
    }
}

/// The broker's configuration and policies as `serve` and `policy check --config` load them.
fn load_with(vault_section: &str, policies: &str) -> anyhow::Result<credbroker::policy::PolicySet> {
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("policies/test.toml"), policies).unwrap();
    let text = format!(
        r#"
listen = "127.0.0.1:0"
public_url = "http://127.0.0.1:1"
audience = "credbroker"
database_url = "postgres://127.0.0.1:1/none"
policy_dir = "policies"
[[issuers]]
name = "gitlab"
issuer = "https://gitlab.example.com"
{vault_section}
[backends.snowflake]
type = "vault_database"
[backends.static-secrets]
type = "vault_kv"
"#
    );
    let path = dir.0.join("credbroker.toml");
    let config = credbroker::config::Config::parse(&text, &path, std::iter::empty())?;
    let backends = credbroker::backend::Backends::build(&config, None)?;
    credbroker::startup::load_policies(&config, &backends, false)
}

const APPROLE: &str = "[vault]\naddress = \"http://127.0.0.1:1\"\n[vault.approle]\nrole_id = \"r\"\nsecret_id_env = \"VAULT_SECRET_ID\"\n";

#[test]
fn policies_that_would_hand_out_static_secrets_or_unbounded_vault_roles_are_refused_at_load() {
    let role = |extra: &str, backend: &str| {
        format!("[[role]]\nname = \"r1\"\nbackend = \"{backend}\"\nissuer = \"gitlab\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\n{extra}\n[role.claims]\njob_project_path = \"platform/orders\"\n")
    };
    let cases = [
        (role("", "static-secrets"), "key `backend`", "never hands a static KV secret"),
        (role("vault_role = \"ci-{job_project_path}\"", "snowflake"), "key `vault_role`", "vault_role_template = \"sanitise\""),
        (role("vault_role = \"ci-{ref}\"\nvault_role_template = \"sanitise\"", "snowflake"), "key `vault_role`", "does not bind"),
        (role("vault_role = \"ci\"\nvault_role_template = \"yes\"", "snowflake"), "key `vault_role_template`", "not an option"),
        (role("vault_role = \"ci\"\nmount = \"{project_path}\"", "snowflake"), "key `mount`", "literal"),
        (role("vault_role = \"ci/x\"", "snowflake"), "key `vault_role`", "not a Vault role name"),
    ];
    for (policy, key, message) in cases {
        let error = format!("{:#}", load_with(APPROLE, &policy).unwrap_err());
        assert!(error.contains("test.toml: role r1: ") && error.contains(key) && error.contains(message), "{error}");
    }
    assert!(load_with(APPROLE, &role("vault_role = \"ci-reader\"", "snowflake")).is_ok());
    let error = format!("{:#}", load_with("", &role("vault_role = \"ci-reader\"", "snowflake")).unwrap_err());
    assert!(error.contains("backends.snowflake.type") && error.contains("[vault]"), "{error}");
}

#[tokio::test]
async fn a_static_vault_token_is_refused_outside_dev_mode() {
    let dir = common::temp_dir();
    let text = common::config_text_with_tables(
        "https://gitlab.example.com",
        "postgres://127.0.0.1:1/none",
        "http://127.0.0.1:1",
        "",
        "[vault]\naddress = \"http://127.0.0.1:1\"\n[vault.token]\ntoken_env = \"VAULT_TOKEN\"\n",
    );
    std::fs::write(dir.0.join("kafka.pem"), common::rsa_pem(2)).unwrap();
    let path = dir.0.join("credbroker.toml");
    let config = credbroker::config::Config::parse(&text, &path, std::iter::empty()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = credbroker::startup::ServeOptions::default();
    let error = credbroker::startup::Application::build_on(listener, config, options).await.err().unwrap().to_string();
    assert!(error.contains("vault.token") && error.contains("serve --dev") && error.contains("allow_outside_dev"), "{error}");
}

// ---------------------------------------------------------------- the stand-in's two cases

/// STAND-IN (tests/common/vault_standin.rs), because OpenBao's Kubernetes auth needs a
/// Kubernetes TokenReview API that nothing here serves: `[vault.kubernetes]` logs in with the
/// service-account token file's content and reads the file again at every login (a projected
/// token is replaced on disk while the broker runs, and the old one stops validating).
#[tokio::test]
async fn kubernetes_login_sends_the_token_file_and_reads_it_again_at_each_login() {
    let vault = VaultStandin::start().await;
    vault.add_db_role("ci-reader", DbRole { default_ttl: 3600, max_ttl: 86400, renewable: true, key_pair: false });
    vault.set_kubernetes_mount("k8s-prod", "credbroker", "eyJ.first-token.sig");
    let secrets = common::temp_dir();
    let token_file = secrets.0.join("vault-login.jwt");
    std::fs::write(&token_file, "eyJ.first-token.sig\n").unwrap();
    let auth = format!("[vault.kubernetes]\nmount = \"k8s-prod\"\nrole = \"credbroker\"\ntoken_file = \"{}\"\n", token_file.display());
    let app = TestApp::spawn_full("", &vault_tables(&vault.url, &auth, None), POLICIES, None).await;

    let expected = |jwt: &str| ("k8s-prod".to_owned(), Some("credbroker".to_owned()), jwt.to_owned());
    assert_eq!(vault.with(|s| s.jwt_logins.clone()), vec![expected("eyJ.first-token.sig")], "logged in at startup");
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader"})).await;
    assert_eq!(status, 200, "{body}");

    std::fs::write(&token_file, "eyJ.second-token.sig\n").unwrap();
    vault.set_kubernetes_mount("k8s-prod", "credbroker", "eyJ.second-token.sig");
    vault.revoke_all_tokens();
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "db-reader"})).await;
    assert_eq!(status, 200, "logged in again with the new file content: {body}");
    assert_eq!(vault.with(|s| s.jwt_logins.last().cloned()), Some(expected("eyJ.second-token.sig")));

    vault.set_kubernetes_mount("k8s-prod", "credbroker", "eyJ.third-token.sig");
    vault.revoke_all_tokens();
    assert_backend_failed(&app, "db-reader", "permission denied").await;
    let (status, body) = readyz(&app).await;
    assert_eq!(status, 503, "{body}");
    let check = body["checks"]["vault"].as_str().unwrap();
    assert!(check.contains("permission denied") && !check.contains("second-token"), "{check}");
}

/// STAND-IN (tests/common/vault_standin.rs), because OpenBao ships no Snowflake database plugin:
/// the plugin's `rsa_private_key` credential type answers with `rsa_private_key` instead of
/// `password` (Vault's database API docs), and the broker turns it into the Snowflake CLI's
/// key-pair variables. Everything else about it is the code path tested on OpenBao above.
#[tokio::test]
async fn key_pair_users_reach_the_cli_as_snowflake_variables() {
    let vault = VaultStandin::start().await;
    vault.add_db_role("ci-reader", DbRole { default_ttl: 3600, max_ttl: 86400, renewable: true, key_pair: true });
    let secrets = common::temp_dir();
    let tables =
        vault_tables(&vault.url, &approle_table(&secrets, ROLE_ID, SECRET_ID), None).replace("plugin = \"postgres\"", "plugin = \"snowflake\"");
    let policies = POLICIES.replace("vault_role = \"ci-reader\"", "vault_role = \"ci-reader\"\naccount = \"ACME-PROD\"");
    let app = TestApp::spawn_full("", &tables, &policies, None).await;
    let (url, token) = (app.url.clone(), app.issuer.token());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
            .args(["exchange", "--url", &url, "--role", "db-reader", "--format", "env", "--token-env", "JOB_TOKEN"])
            .env("JOB_TOKEN", token)
            .env_remove("CREDBROKER_CONFIG")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    let private_key = common::rsa_pem(1);
    assert!(stdout.contains(&format!("export SNOWFLAKE_PRIVATE_KEY_RAW='{private_key}'")), "{stdout}");
    assert!(stdout.contains("export SNOWFLAKE_AUTHENTICATOR='SNOWFLAKE_JWT'\n"), "{stdout}");
    assert!(stdout.contains("export SNOWFLAKE_ACCOUNT='ACME-PROD'\n"), "{stdout}");
    assert!(stdout.contains("export SNOWFLAKE_USER='V_APPROLE_CI_READER_"), "{stdout}");
    assert!(!stdout.contains("SNOWFLAKE_PASSWORD"), "{stdout}");
    let lease = vault.with(|s| s.leases.keys().find(|id| id.starts_with("database/creds/ci-reader/")).cloned()).unwrap();
    let row: Value = sqlx::query_scalar("select to_jsonb(a) from audit_events a where decision = 'issued'").fetch_one(&app.pool).await.unwrap();
    assert_eq!(row["credential_handle"], lease.as_str());
    assert!(!row.to_string().contains("PRIVATE KEY"), "no key in the audit row");
}

/// STAND-IN (tests/common/vault_standin.rs), for the Snowflake plugin's answers as above:
/// `--out-dir` writes a connections.toml entry for a Snowflake user from Vault, with its
/// password or with its key pair as a private key file, and the real snowflake-connector-python
/// logs in with that entry alone, against the Snowflake login stand-in of
/// tests/snowflake_login_standin.py, which checks the password, or the key-pair JWT the
/// connector signed with the key file.
#[tokio::test]
async fn snowflake_users_from_vault_log_in_with_their_out_dir_connections_entry() {
    for key_pair in [false, true] {
        let vault = VaultStandin::start().await;
        vault.add_db_role("ci-reader", DbRole { default_ttl: 3600, max_ttl: 86400, renewable: true, key_pair });
        let secrets = common::temp_dir();
        let tables =
            vault_tables(&vault.url, &approle_table(&secrets, ROLE_ID, SECRET_ID), None).replace("plugin = \"postgres\"", "plugin = \"snowflake\"");
        let policies = POLICIES.replace("vault_role = \"ci-reader\"", "vault_role = \"ci-reader\"\naccount = \"ACME-PROD\"\nwarehouse = \"CI_WH\"");
        let app = TestApp::spawn_full("", &tables, &policies, None).await;
        let out = secrets.0.join("credentials");
        let (url, token, dir) = (app.url.clone(), app.issuer.token(), out.clone());
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_credbroker"))
                .args(["exchange", "--url", &url, "--role", "db-reader", "--format", "json", "--out-dir"])
                .arg(&dir)
                .env("CREDBROKER_ID_TOKEN", token)
                .env_remove("CREDBROKER_CONFIG")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let reply: Value = serde_json::from_slice(&output.stdout).unwrap();
        let user = reply["credential"]["username"].as_str().unwrap().to_owned();
        let entry = std::fs::read_to_string(out.join("db-reader.connections.toml")).unwrap();
        let expected = if key_pair {
            let key_file = out.join("db-reader.snowflake-key.p8");
            assert_eq!(std::fs::read_to_string(&key_file).unwrap(), common::rsa_pem(1));
            assert!(entry.contains("authenticator = \"SNOWFLAKE_JWT\"") && !entry.contains("password"), "{entry}");
            format!("{user}:{}", key_file.display())
        } else {
            format!("{user}:{}", reply["credential"]["password"].as_str().unwrap())
        };
        let connections = out.join("db-reader.connections.toml");
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new("python3")
                .arg(common::repo_path("tests/snowflake_login_standin.py"))
                .args(["-", "-", "-", "-"])
                .arg(connections)
                .arg("db-reader")
                .env("EXPECT_DATABASE_USER", expected)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let seen: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&output.stderr)));
        assert!(output.status.success(), "key pair {key_pair}: {seen}");
        assert_eq!(seen["login"]["ACCOUNT_NAME"], "ACME-PROD", "{seen}");
        assert_eq!(seen["login"]["LOGIN_NAME"], user.as_str(), "{seen}");
    }
}
