//! Looker end to end: the real broker (real Postgres, a real OIDC issuer over HTTP) against
//! (1) a stateful Looker API 4.0 stand-in (tests/common/looker_standin.rs) where real token
//! values matter: login, login-as-user, logout invalidating the token; and (2) Prism serving
//! Looker's official API 4.0 spec, so every request the broker sends is checked against the
//! published schema (PEERS.md; installed by scripts/test.sh under .cache/prism).

mod common;

use std::process::{Child, Command, Stdio};

use std::time::{Duration, Instant};

use common::looker_standin::{looker_tables, revocation_key_extra, LookerStandin, CLIENT_SECRET};
use common::TestApp;
use serde_json::{json, Value};

const POLICIES: &str = r#"
[[role]]
name = "looker-by-id"
backend = "looker"
issuer = "gitlab"
default_ttl = "30m"
max_ttl = "2h"
user_id = "42"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "looker-by-email"
backend = "looker"
issuer = "gitlab"
default_ttl = "30m"
max_ttl = "1h"
user_email = "reports-bot@example.com"
[role.claims]
job_project_path = "platform/orders"

[[role]]
name = "looker-associative"
backend = "looker"
issuer = "gitlab"
default_ttl = "30m"
max_ttl = "1h"
user_id = "42"
associative = "true"
[role.claims]
job_project_path = "platform/orders"
"#;

async fn spawn_app(looker_url: &str, secrets: &std::path::Path, client_secret: &str, policies: &str, database_url: Option<String>) -> TestApp {
    let tables = looker_tables(looker_url, secrets, client_secret);
    TestApp::spawn_full(&revocation_key_extra(secrets), &tables, policies, database_url).await
}

struct LookerApp {
    app: TestApp,
    looker: LookerStandin,
    _secrets: common::TempDir,
}

async fn spawn_with_secret(client_secret: &str) -> LookerApp {
    let looker = LookerStandin::start().await;
    looker.add_user("42", "reports-bot@example.com");
    let secrets = common::temp_dir();
    let app = spawn_app(&looker.url, &secrets.0, client_secret, POLICIES, None).await;
    LookerApp { app, looker, _secrets: secrets }
}

async fn spawn() -> LookerApp {
    spawn_with_secret(CLIENT_SECRET).await
}

/// Calls `GET /api/4.0/user` with a minted token: who Looker thinks we are, or the status.
async fn whoami(looker: &LookerStandin, token: &str) -> Result<Value, u16> {
    let response =
        reqwest::Client::new().get(format!("{}/api/4.0/user", looker.url)).header("authorization", format!("token {token}")).send().await.unwrap();
    match response.status().as_u16() {
        200 => Ok(response.json().await.unwrap()),
        status => Err(status),
    }
}

fn token_of(body: &Value) -> &str {
    body["credential"]["access_token"].as_str().unwrap_or_else(|| panic!("no access_token in {body}"))
}

#[tokio::test]
async fn a_job_gets_a_session_acting_as_the_roles_user_attributed_to_that_user() {
    let lk = spawn().await;
    let (status, headers, body) = lk.app.exchange(&lk.app.issuer.token(), json!({"role": "looker-by-id"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(headers["cache-control"], "no-store");
    let token = token_of(&body);
    assert_eq!(whoami(&lk.looker, token).await.unwrap()["id"], "42");
    let session = lk.looker.session(token).unwrap();
    assert_eq!(session.associative.as_deref(), Some("false"));

    let credential = &body["credential"];
    assert_eq!(credential["token_type"], "Bearer");
    assert_eq!(credential["base_url"], lk.looker.url);
    assert_eq!(credential["user_id"], "42");
    assert_eq!(credential["expires_at"], body["expires_at"]);
    // Looker's hour is the ceiling even though the role allows 2h.
    assert!(body["ttl_seconds"].as_u64().unwrap() <= 3600);
    assert!(credential["ttl_rule"].as_str().unwrap().contains("Looker"), "{credential}");
    assert_eq!(body["env"]["LOOKERSDK_BASE_URL"], lk.looker.url);
    assert_eq!(body["env"]["LOOKERSDK_ACCESS_TOKEN"], token);

    let row = lk.app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "issued");
    assert_eq!(row["credential_sha256"], credbroker::types::sha256_hex(token.as_bytes()));
    assert_eq!(row["credential_handle"], "42");
    assert!(!row.to_string().contains(token));

    // The admin session is reused; associative = "true" is passed through when a role asks.
    let (status, _, body) = lk.app.exchange(&lk.app.issuer.token(), json!({"role": "looker-associative"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(lk.looker.session(token_of(&body)).unwrap().associative.as_deref(), Some("true"));
    assert_eq!(lk.looker.logins(), 1);
    assert_eq!(lk.looker.user_logins(), 2);
}

#[tokio::test]
async fn user_email_is_resolved_once() {
    let lk = spawn().await;
    for _ in 0..2 {
        let (status, _, body) = lk.app.exchange(&lk.app.issuer.token(), json!({"role": "looker-by-email"})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(whoami(&lk.looker, token_of(&body)).await.unwrap()["email"], "reports-bot@example.com");
        assert_eq!(body["credential"]["user_id"], "42");
    }
    assert_eq!(lk.looker.email_lookups(), 1);
}

/// The `revocations` row of an issuance, as JSON (bytea shows as hex).
async fn revocation_row(pool: &sqlx::PgPool, issuance_id: &str) -> Option<Value> {
    sqlx::query_scalar::<_, Value>("select to_jsonb(r) from revocations r where issuance_id = $1")
        .bind(uuid::Uuid::parse_str(issuance_id).unwrap())
        .fetch_optional(pool)
        .await
        .unwrap()
}

/// Every `revocations` row as stored, as raw text and bytes, for "the token is not in it".
async fn revocations_hold(pool: &sqlx::PgPool, token: &str) -> bool {
    let rows: Vec<(String, Option<Vec<u8>>)> =
        sqlx::query_as("select to_jsonb(r)::text, sealed_secret from revocations r").fetch_all(pool).await.unwrap();
    assert!(!rows.is_empty(), "no revocations row at all");
    rows.iter().any(|(json, sealed)| {
        json.contains(token)
            || json.contains(&hex::encode(token))
            || sealed.as_ref().is_some_and(|bytes| bytes.windows(token.len()).any(|w| w == token.as_bytes()))
    })
}

async fn wait_until_logged_out(looker: &LookerStandin, token: &str, deadline: i64) {
    let started = Instant::now();
    while whoami(looker, token).await.is_ok() {
        assert!(started.elapsed() < Duration::from_secs(15), "the session outlived the job");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(time::OffsetDateTime::now_utc().unix_timestamp() >= deadline - 1, "ended before the deadline");
    assert_eq!(whoami(looker, token).await, Err(401));
}

/// After the worker's `revoked` row: the schedule is done and its ciphertext gone.
async fn assert_revoked_and_forgotten(pool: &sqlx::PgPool, issuance_id: &str) {
    let started = Instant::now();
    loop {
        let row = revocation_row(pool, issuance_id).await.unwrap();
        if row["state"] == "revoked" {
            assert_eq!(row["sealed_secret"], Value::Null, "ciphertext kept after use: {row}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "not marked revoked: {row}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let revoked: Vec<Value> =
        sqlx::query_scalar("select to_jsonb(a) from audit_events a where decision = 'revoked' and about_issuance_id = $1::uuid")
            .bind(issuance_id)
            .fetch_all(pool)
            .await
            .unwrap();
    assert_eq!(revoked.len(), 1, "{revoked:?}");
    assert_eq!(revoked[0]["backend"], "looker");
    assert_eq!(revoked[0]["credential_handle"], "42");
}

#[tokio::test]
async fn the_session_ends_at_the_job_deadline_when_that_is_sooner_than_lookers_hour() {
    let lk = spawn().await;
    let deadline = time::OffsetDateTime::now_utc().unix_timestamp() + 3;
    let job_token = lk.app.issuer.token_with(json!({"exp": deadline}));
    let (status, _, body) = lk.app.exchange(&job_token, json!({"role": "looker-by-id"})).await;
    assert_eq!(status, 200, "{body}");
    let token = token_of(&body).to_owned();
    let issuance_id = body["issuance_id"].as_str().unwrap().to_owned();
    assert!(body["credential"]["ttl_rule"].as_str().unwrap().contains("logout"), "{body}");
    assert_eq!(whoami(&lk.looker, &token).await.unwrap()["id"], "42");

    // Handed to the durable schedule, the token only sealed.
    let row = revocation_row(&lk.app.pool, &issuance_id).await.expect("no revocation scheduled");
    assert_eq!(row["state"], "pending");
    assert_eq!(row["reason"], "deadline");
    assert_eq!(row["handle"], "42");
    assert!(row["sealed_secret"].as_str().is_some_and(|hex| hex.len() > 2 * (12 + 16)), "{row}");
    assert!(!revocations_hold(&lk.app.pool, &token).await, "the token is in the revocations table in clear");

    wait_until_logged_out(&lk.looker, &token, deadline).await;
    let logouts = lk.looker.logouts();
    assert_eq!(logouts.len(), 1);
    assert_eq!(logouts[0].user_id, "42");
    assert_revoked_and_forgotten(&lk.app.pool, &issuance_id).await;
}

/// A broker issues a short-lived session and dies (its whole runtime is shut down, so nothing
/// in its memory survives); a second broker on the same database ends the session at the deadline.
#[tokio::test]
async fn the_deadline_logout_survives_a_broker_restart() {
    let looker = LookerStandin::start().await;
    looker.add_user("42", "reports-bot@example.com");
    let secrets = common::temp_dir();
    let issuer = common::TestIssuer::start().await;
    let database_url = common::fresh_database().await;
    let text = common::config_text_with_tables(
        &issuer.url,
        &database_url,
        "http://127.0.0.1:1",
        &revocation_key_extra(&secrets.0),
        &looker_tables(&looker.url, &secrets.0, CLIENT_SECRET),
    );
    std::fs::write(secrets.0.join("kafka.pem"), common::rsa_pem(2)).unwrap();
    std::fs::write(secrets.0.join("policies/test.toml"), POLICIES).unwrap();
    let config_path = secrets.0.join("credbroker.toml");
    std::fs::write(&config_path, &text).unwrap();

    // The first broker, on a runtime of its own.
    let (first_runtime, first_url) = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let url = runtime.block_on(async move {
            let config = credbroker::config::Config::parse(&text, &config_path, std::iter::empty()).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let application = credbroker::startup::Application::build_on(listener, config, Default::default()).await.unwrap();
            tokio::spawn(application.run_until_stopped());
            url
        });
        (runtime, url)
    })
    .await
    .unwrap();
    let deadline = time::OffsetDateTime::now_utc().unix_timestamp() + 4;
    let response = reqwest::Client::new()
        .post(format!("{first_url}/v1/credentials"))
        .bearer_auth(issuer.token_with(json!({"exp": deadline})))
        .json(&json!({"role": "looker-by-id"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    let token = token_of(&body).to_owned();
    let issuance_id = body["issuance_id"].as_str().unwrap().to_owned();
    first_runtime.shutdown_background();
    assert_eq!(whoami(&looker, &token).await.unwrap()["id"], "42", "the session must still be live after the first broker died");

    let second = spawn_app(&looker.url, &secrets.0, CLIENT_SECRET, POLICIES, Some(database_url)).await;
    assert!(!revocations_hold(&second.pool, &token).await, "the token is in the revocations table in clear");
    wait_until_logged_out(&looker, &token, deadline).await;
    assert_eq!(looker.logouts().len(), 1);
    assert_revoked_and_forgotten(&second.pool, &issuance_id).await;
}

/// With `revocation_secret_key = { vault_transit = ... }` the key never leaves Vault: the token
/// is sealed by `transit/encrypt` (the issuance id as associated data) and opened by
/// `transit/decrypt` only when the worker ends the session.
#[tokio::test]
async fn the_session_token_can_be_sealed_by_vault_transit_instead() {
    use common::openbao::{provision, recommended_approle, vault_section, OpenBao};
    let bao = OpenBao::start().await;
    let login = provision(&bao, &common::fresh_database().await, recommended_approle()).await;
    let looker = LookerStandin::start().await;
    looker.add_user("42", "reports-bot@example.com");
    let secrets = common::temp_dir();
    let tables = format!("{}{}", vault_section(&bao, &secrets, &login), looker_tables(&looker.url, &secrets.0, CLIENT_SECRET));
    let extra = "revocation_secret_key = { vault_transit = \"credbroker-revocations\" }\nrevocation_poll_seconds = 1";
    let app = TestApp::spawn_full(extra, &tables, POLICIES, None).await;

    let deadline = time::OffsetDateTime::now_utc().unix_timestamp() + 3;
    let (status, _, body) = app.exchange(&app.issuer.token_with(json!({"exp": deadline})), json!({"role": "looker-by-id"})).await;
    assert_eq!(status, 200, "{body}");
    let token = token_of(&body).to_owned();
    let issuance_id = body["issuance_id"].as_str().unwrap().to_owned();
    let sealed: Vec<u8> = sqlx::query_scalar("select sealed_secret from revocations").fetch_one(&app.pool).await.unwrap();
    assert!(sealed.starts_with(b"vault:v1:"), "Vault's ciphertext is stored");
    assert!(!revocations_hold(&app.pool, &token).await, "the token is in the revocations table in clear");
    let issuance_bytes = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, uuid::Uuid::parse_str(&issuance_id).unwrap().as_bytes());
    let encryptions = bao.requests_to("transit/encrypt/credbroker-revocations");
    assert_eq!(encryptions.len(), 1);
    assert_eq!(encryptions[0]["associated_data"], issuance_bytes.as_str(), "bound to its row");

    wait_until_logged_out(&looker, &token, deadline).await;
    assert_revoked_and_forgotten(&app.pool, &issuance_id).await;
    assert_eq!(bao.requests_to("transit/decrypt/credbroker-revocations").len(), 1);
}

#[tokio::test]
async fn a_job_ends_its_own_session_early_and_nobody_elses() {
    let lk = spawn().await;
    // A 30 min grant: Looker's own hour would outlive it, so the logout is due at the grant's end.
    let (status, _, body) = lk.app.exchange(&lk.app.issuer.token(), json!({"role": "looker-by-id"})).await;
    assert_eq!(status, 200, "{body}");
    let token = token_of(&body).to_owned();
    let issuance_id = body["issuance_id"].as_str().unwrap().to_owned();
    assert_eq!(revocation_row(&lk.app.pool, &issuance_id).await.unwrap()["state"], "pending");

    // The job ends its own credential (what `credbroker exec` does at exit): logged out now.
    let response =
        lk.app.client.delete(format!("{}/v1/credentials/{issuance_id}", lk.app.url)).bearer_auth(lk.app.issuer.token()).send().await.unwrap();
    assert_eq!(response.status(), 403, "another job token must not end it");
    let job_token = lk.app.issuer.token();
    let (status, _, body) = lk.app.exchange(&job_token, json!({"role": "looker-by-id"})).await;
    assert_eq!(status, 200, "{body}");
    let own_token = token_of(&body).to_owned();
    let own_id = body["issuance_id"].as_str().unwrap().to_owned();
    let response = lk.app.client.delete(format!("{}/v1/credentials/{own_id}", lk.app.url)).bearer_auth(&job_token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["outcome"], "revoked", "{answer}");
    assert_eq!(whoami(&lk.looker, &own_token).await, Err(401));
    assert_revoked_and_forgotten(&lk.app.pool, &own_id).await;
    // The first session is untouched.
    assert_eq!(whoami(&lk.looker, &token).await.unwrap()["id"], "42");
}

/// `credbroker exec` whose command cannot start (exit 5) still ends the session it obtained,
/// through the same `DELETE /v1/credentials/{id}` it uses at the command's exit.
#[tokio::test]
async fn exec_ends_the_session_it_obtained_when_the_command_cannot_start() {
    let lk = spawn().await;
    let mut command = Command::new(env!("CARGO_BIN_EXE_credbroker"));
    command
        .args(["exec", "--url", &lk.app.url, "--role", "looker-by-id", "--", "/nonexistent/command"])
        .env("CREDBROKER_ID_TOKEN", lk.app.issuer.token())
        .env_remove("CREDBROKER_CONFIG")
        .stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap()).await.unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("cannot run \"/nonexistent/command\""), "{stderr}");

    let issued: Vec<String> = sqlx::query_scalar("select id::text from audit_events where decision = 'issued' and role = 'looker-by-id'")
        .fetch_all(&lk.app.pool)
        .await
        .unwrap();
    assert_eq!(issued.len(), 1, "{issued:?}");
    assert_eq!(lk.looker.live_sessions_of("42"), 0, "the session exec obtained outlived it");
    assert!(lk.looker.logouts().iter().any(|session| session.user_id == "42"), "Looker was never told to end it");
    assert_revoked_and_forgotten(&lk.app.pool, &issued[0]).await;
}

#[tokio::test]
async fn a_looker_backend_without_a_revocation_key_is_refused_at_startup() {
    let secrets = common::temp_dir();
    std::fs::write(secrets.0.join("policies/test.toml"), POLICIES).unwrap();
    std::fs::write(secrets.0.join("kafka.pem"), common::rsa_pem(2)).unwrap();
    let tables = looker_tables("http://127.0.0.1:9", &secrets.0, CLIENT_SECRET);
    let text = common::config_text_with_tables("https://gitlab.example.com", "postgres://127.0.0.1:1/none", "http://127.0.0.1:1", "", &tables);
    let path = secrets.0.join("credbroker.toml");
    let config = credbroker::config::Config::parse(&text, &path, std::iter::empty()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = format!("{:#}", credbroker::startup::Application::build_on(listener, config, Default::default()).await.err().unwrap());
    assert!(error.contains("revocation_secret_key") && error.contains("backend looker") && error.contains("base64"), "{error}");

    // A key of the wrong size is refused naming the key.
    std::fs::write(secrets.0.join("short.key"), "c2hvcnQ=\n").unwrap();
    let text = text.replacen("\nlisten", &format!("revocation_secret_key = {{ file = \"{}\" }}\nlisten", secrets.0.join("short.key").display()), 1);
    let config = credbroker::config::Config::parse(&text, &path, std::iter::empty()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = format!("{:#}", credbroker::startup::Application::build_on(listener, config, Default::default()).await.err().unwrap());
    assert!(error.contains("revocation_secret_key") && error.contains("exactly 32"), "{error}");
}

#[tokio::test]
async fn the_admin_session_is_renewed_when_looker_ends_or_expires_it() {
    let lk = spawn().await;
    let (status, _, body) = lk.app.exchange(&lk.app.issuer.token(), json!({"role": "looker-by-id"})).await;
    assert_eq!(status, 200, "{body}");
    lk.looker.drop_admin_sessions();
    let (status, _, body) = lk.app.exchange(&lk.app.issuer.token(), json!({"role": "looker-by-id"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(lk.looker.logins(), 2);
    // A token about to expire (inside the renewal margin) is replaced before use.
    lk.looker.set_admin_expires_in(30);
    lk.looker.drop_admin_sessions();
    for _ in 0..2 {
        let (status, _, body) = lk.app.exchange(&lk.app.issuer.token(), json!({"role": "looker-by-id"})).await;
        assert_eq!(status, 200, "{body}");
    }
    // One re-login after the 401, one because the 30 s token is inside the renewal margin.
    assert_eq!(lk.looker.logins(), 4);
}

#[tokio::test]
async fn a_wrong_admin_key_or_unknown_user_fails_with_a_clear_reason() {
    let lk = spawn_with_secret("wrong-secret").await;
    let (status, _, body) = lk.app.exchange(&lk.app.issuer.token(), json!({"role": "looker-by-id"})).await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "backend_failed");
    let row = lk.app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert_eq!(row["decision"], "failed");
    let detail = row["detail"].as_str().unwrap();
    assert!(detail.contains("admin login") && detail.contains("404"), "{detail}");
    assert!(!row.to_string().contains("wrong-secret"));

    let lk = spawn().await;
    lk.looker.add_user("7", "someone@example.com");
    let policies = POLICIES.replace("user_id = \"42\"\n[role.claims]", "user_id = \"999\"\n[role.claims]");
    let secrets = common::temp_dir();
    let app = spawn_app(&lk.looker.url, &secrets.0, CLIENT_SECRET, &policies, None).await;
    let (status, _, body) = app.exchange(&app.issuer.token(), json!({"role": "looker-by-id"})).await;
    assert_eq!(status, 502, "{body}");
    let row = app.audit_row(body["issuance_id"].as_str().unwrap()).await;
    assert!(row["detail"].as_str().unwrap().contains("login as Looker user 999 refused"), "{row}");
}

fn load(policy: &str) -> anyhow::Result<()> {
    let dir = common::temp_dir();
    std::fs::write(dir.0.join("policies/test.toml"), policy).unwrap();
    common::load_offline(&dir.0, &looker_tables("https://looker.example.com", &dir.0, CLIENT_SECRET))
}

#[test]
fn roles_must_name_exactly_one_looker_user() {
    let role = |extra: &str| {
        format!("[[role]]\nname = \"r1\"\nbackend = \"looker\"\nissuer = \"gitlab\"\ndefault_ttl = \"5m\"\nmax_ttl = \"1h\"\n{extra}\n[role.claims]\njob_project_path = \"platform/orders\"\n")
    };
    for (extra, message) in [
        ("", "is required (or user_email"),
        ("user_id = \"1\"\nuser_email = \"a@example.com\"", "not both"),
        ("user_id = \"1\"\nassociative = \"yes\"", "must be \"true\" or \"false\""),
        ("user_id = \"{user_id}\"", "allow_claims_in"),
    ] {
        let error = format!("{:#}", load(&role(extra)).unwrap_err());
        assert!(error.contains("role r1") && error.contains(message), "{extra}: {error}");
    }
    load(&role("user_email = \"a@example.com\"")).unwrap();
}

#[test]
fn bad_looker_configuration_is_refused_naming_the_key() {
    for (bad, good, key) in [
        ("base_url = \"https://looker.example.com\"", "base_url = \"https://looker.example.com/api/4.0\"", "base_url"),
        ("base_url = \"https://looker.example.com\"", "base_url = \"http://looker.example.com\"", "base_url"),
        ("timeout_seconds = 5", "timeout_seconds = 0", "timeout_seconds"),
        ("timeout_seconds = 5", "timeout_seconds = 5\nca_file = \"missing.pem\"", "ca_file"),
    ] {
        let dir = common::temp_dir();
        let tables = looker_tables("https://looker.example.com", &dir.0, CLIENT_SECRET).replace(bad, good);
        let text = format!("listen = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:1\"\naudience = \"a\"\ndatabase_url = \"postgres://x/y\"\npolicy_dir = \"policies\"\n[[issuers]]\nname = \"gitlab\"\nissuer = \"https://gitlab.example.com\"\n{tables}");
        let config = credbroker::config::Config::parse(&text, &dir.0.join("c.toml"), std::iter::empty()).unwrap();
        let error = credbroker::backend::Backends::build(&config, None).err().unwrap().to_string();
        assert!(error.contains(&format!("backends.looker.{key}")), "{good}: {error}");
    }
}

// ---------------------------------------------------------------- Prism

/// Prism serving the official spec with every path under /api/4.0 (Prism ignores the server
/// URL's path, PEERS.md), on a free port; its log records each request's validation.
struct Prism {
    child: Child,
    url: String,
    log: std::path::PathBuf,
    _dir: common::TempDir,
}

impl Prism {
    fn start() -> Self {
        let binary = common::repo_path(".cache/prism/node_modules/.bin/prism");
        assert!(binary.exists(), "{} missing: scripts/test.sh installs @stoplight/prism-cli", binary.display());
        let dir = common::temp_dir();
        let spec: Value = serde_json::from_slice(&std::fs::read(common::repo_path("tests/fixtures/looker-api-4.0.oas.json")).unwrap())
            .expect("the Looker spec at tests/fixtures/looker-api-4.0.oas.json");
        let mut spec = spec;
        let paths = spec["paths"].as_object().unwrap().iter().map(|(path, item)| (format!("/api/4.0{path}"), item.clone())).collect();
        spec["paths"] = Value::Object(paths);
        let spec_file = dir.0.join("looker-api-4.0.prefixed.json");
        std::fs::write(&spec_file, spec.to_string()).unwrap();
        let log = dir.0.join("prism.log");
        // The free port is only free when asked; another test's server may take it before Prism
        // binds. So Prism is ready when its own log says it listens (a connect could reach the
        // other server), and a Prism that exited is started again on another port.
        for _attempt in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
            let mut child = Command::new(&binary)
                .args(["mock", "-h", "127.0.0.1", "-p", &port.to_string()])
                .arg(&spec_file)
                .stdout(Stdio::from(std::fs::File::create(&log).unwrap()))
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let started = Instant::now();
            let listening = format!("listening on http://127.0.0.1:{port}");
            loop {
                if std::fs::read_to_string(&log).unwrap_or_default().contains(&listening) {
                    return Self { child, url: format!("http://127.0.0.1:{port}"), log, _dir: dir };
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(90),
                    "Prism did not listen on {port}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(250));
            }
        }
        panic!("Prism exited three times: {}", std::fs::read_to_string(&log).unwrap_or_default());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

impl Drop for Prism {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn every_request_the_broker_sends_passes_lookers_published_schema() {
    let prism = tokio::task::spawn_blocking(Prism::start).await.unwrap();

    // Prism really checks: the same login with a JSON body instead of a form is rejected.
    let malformed = reqwest::Client::new().post(format!("{}/api/4.0/login", prism.url)).json(&json!({"client_id": "x"})).send().await.unwrap();
    assert_eq!(malformed.status(), 400);
    let violations = malformed.headers()["sl-violations"].to_str().unwrap().to_owned();
    assert!(violations.contains("application/x-www-form-urlencoded"), "{violations}");

    let secrets = common::temp_dir();
    let app = spawn_app(&prism.url, &secrets.0, CLIENT_SECRET, POLICIES, None).await;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    for role in ["looker-by-id", "looker-by-email", "looker-associative"] {
        // A short job, so the broker also sends its logout at the deadline.
        let (status, _, body) = app.exchange(&app.issuer.token_with(json!({"exp": now + 3})), json!({"role": role})).await;
        assert_eq!(status, 200, "{role}: {body}");
    }
    let started = Instant::now();
    while prism.log().matches("delete /api/4.0/logout").count() < 3 {
        assert!(started.elapsed() < Duration::from_secs(15), "no logouts reached Prism:\n{}", prism.log());
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let log = prism.log();
    for request in ["post /api/4.0/login ", "post /api/4.0/login/42", "get /api/4.0/users/credential/email/reports-bot", "delete /api/4.0/logout"] {
        assert!(log.contains(request), "Prism never saw {request}:\n{log}");
    }
    // The malformed request above is the only violation in the log.
    assert_eq!(log.matches("Violation:").count(), 1, "{log}");
    assert_eq!(log.matches("The request passed the validation rules").count(), log.matches("Request received").count() - 1, "{log}");
}
